#!/usr/bin/python3
"""Gateway benchmark: mailshiftd against nginx's mail proxy, Dovecot's own
proxy and Perdition, and against talking to Dovecot directly, side by side.

    make bench-gateway                            # deps, build, the full run
    /usr/bin/python3 bench/gateway_bench.py       # the same, without the build
    /usr/bin/python3 bench/gateway_bench.py --repeat 1 --idle-sessions 1000

One backend Dovecot 2.3 (tests/lib/dovecot.py, high-performance mode, maildir
on tmpfs) holds the users. In front of it, each on its own loopback ports:
mailshiftd (users in state `source`, `[policy] on_first_login = off`, so it
never copies), nginx's mail proxy (auth_http answered by the same nginx from a
static location), a second Dovecot as proxy (passdb proxy=y host= port=) and
Perdition (fork per connection). A C load generator (bench/gateway_loadgen.c,
compiled into the work directory) measures:

  1. logins/s: N sessions, C at a time, each connect, LOGIN, SELECT INBOX,
     LOGOUT (POP3: USER/PASS, STAT, QUIT);
  2. the proxy's CPU per login (utime+stime of its process tree, /proc);
  3. relay: `UID FETCH 1:* BODY.PEEK[]` of a 100 MB INBOX, MB/s and the
     proxy's CPU per 100 MB;
  4. memory per idle session: N sessions logged in, SELECTed and idle,
     (PSS of the proxy tree with them open - before) / N; for mailshiftd also
     with TLS on the client side (imaps).

Not a test: it is not part of `make check`, it exits 0 when a target is
missed, and 1 only when it could not run at all. See bench/README.md.
"""

import argparse
import base64
import collections
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))

import dovecot as dc            # noqa: E402  (tests/lib)
import gateway as gwlib         # noqa: E402

PASSWORD = 'bench-pw-1'
USER_PREFIX = 'u'
RELAY_USER = 'relay'
LOADGEN_SRC = os.path.join(HERE, 'gateway_loadgen.c')
NGINX = shutil.which('nginx') or '/usr/sbin/nginx'
NGINX_MAIL_MODULE = '/usr/lib/nginx/modules/ngx_mail_module.so'
PERDITION = shutil.which('perdition') or '/usr/sbin/perdition'
CC = os.environ.get('CC') or shutil.which('cc') or 'cc'

TARGETS = ('direct', 'mailshiftd', 'nginx', 'dovecot-proxy', 'perdition')
PROXIES = TARGETS[1:]
TESTS = ('logins', 'relay', 'idle')

# Targets from the issue.
TARGET_RELAY_SHARE = 0.90       # relay MB/s at least 90% of direct
TARGET_IDLE_KB = 8.0            # per idle plaintext session
TARGET_IDLE_TLS_KB = 40.0       # per idle TLS session

MB = 1e6
CLK = os.sysconf('SC_CLK_TCK')


class BenchError(RuntimeError):
    pass


# ============================================================ /proc helpers

def _proc_table():
    """pid -> (ppid, CPU ticks incl. reaped children, state)."""
    procs = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                s = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        procs[int(d)] = (int(s[1]), sum(int(x) for x in s[11:15]), s[0])
    return procs


def _tree(roots, procs):
    kids = collections.defaultdict(list)
    for pid, v in procs.items():
        kids[v[0]].append(pid)
    out = []
    todo = [r for r in roots if r in procs]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def tree_cpu(roots):
    """CPU seconds (user+sys) used so far by the process trees under roots,
    including exited children they reaped (cutime/cstime) and zombies."""
    procs = _proc_table()
    return sum(procs[p][1] for p in _tree(roots, procs)) / CLK


def tree_procs(roots):
    """Live (non-zombie) processes in the trees."""
    procs = _proc_table()
    return [p for p in _tree(roots, procs) if procs[p][2] != 'Z']


def tree_mem(roots):
    """Summed RSS and PSS (KiB) of the live processes under roots."""
    rss = pss = n = 0
    for p in tree_procs(roots):
        try:
            with open('/proc/%d/smaps_rollup' % p) as f:
                for line in f:
                    if line.startswith('Rss:'):
                        rss += int(line.split()[1])
                    elif line.startswith('Pss:'):
                        pss += int(line.split()[1])
        except OSError:
            continue
        n += 1
    return {'rss_kb': rss, 'pss_kb': pss, 'procs': n}


def proc_cpu_all():
    """pid -> (name, own user+sys ticks) of every process (for naming the
    processes behind the 'others' CPU)."""
    out = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                raw = f.read()
            name = raw[raw.index('(') + 1:raw.rindex(')')]
            s = raw.rsplit(')', 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (name, int(s[11]) + int(s[12]))
    return out


def machine_busy():
    """(busy, irq+softirq) CPU seconds of all CPUs since boot (/proc/stat);
    busy includes irq+softirq (loopback TCP's receive work), not steal."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: steal is not ours
    return (sum(v[:7]) - v[3] - v[4]) / CLK, (v[5] + v[6]) / CLK


def _stat_fields():
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return dict(zip(('user', 'nice', 'system', 'idle', 'iowait', 'irq',
                     'softirq', 'steal'), v[:8]))


def _alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


def _stop_pid(proc, grace=10.0):
    """SIGTERM to a child we started (a Popen), SIGKILL after grace."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _kill_leftovers(pids, grace=5.0):
    """TERM, then KILL, to each of pids (processes of ours) still alive."""
    pids = [p for p in pids if _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LogWatch:
    """New lines of a log file since mark(), filtered for trouble."""

    WORDS = ('error', 'fatal', 'panic', 'crit', 'alert', 'emerg', 'warn',
             'fail')

    def __init__(self, path):
        self.path = path
        self.pos = 0

    def mark(self):
        try:
            self.pos = os.path.getsize(self.path)
        except OSError:
            self.pos = 0

    def trouble(self, limit=5):
        """(count, first lines) of new lines that look like problems."""
        try:
            with open(self.path, 'rb') as f:
                f.seek(self.pos)
                data = f.read(8 << 20).decode(errors='replace')
        except OSError:
            return 0, []
        bad = [l for l in data.splitlines()
               if any(w in l.lower() for w in self.WORDS)]
        return len(bad), [l[:300] for l in bad[:limit]]


# ================================================================ targets

class Target:
    """One way of reaching the backend. ports(proto) -> port; roots() ->
    PIDs whose process trees are the proxy (empty for direct)."""

    name = None
    tls_port = None

    def __init__(self, bench):
        self.b = bench
        self.dir = os.path.join(bench.workdir, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.logs = []

    def port(self, proto):
        raise NotImplementedError

    def roots(self):
        return []

    def alive(self):
        return all(_alive(p) for p in self.roots())

    def start(self):
        pass

    def stop(self):
        pass

    def restart(self):
        self.stop()
        self.start()

    def version(self):
        return None

    def describe(self):
        return ''


class Direct(Target):
    name = 'direct'

    def port(self, proto):
        be = self.b.backend
        return be.imap_port if proto == 'imap' else be.pop3_port

    def describe(self):
        return 'the backend Dovecot itself'


class MailshiftdTarget(Target):
    name = 'mailshiftd'

    def __init__(self, bench):
        super().__init__(bench)
        self.gw = gwlib.Mailshiftd(self.dir, bench.backend, bench.dst,
                                   tls_ca=bench.ca, policy='off')
        self.logs = [LogWatch(self.gw.log_path)]
        self.imported = False

    def start(self):
        self.gw.start()
        self.tls_port = self.gw.imaps_port
        if not self.imported:
            csv = os.path.join(self.dir, 'users.csv')
            with open(csv, 'w') as f:
                for u in self.b.user_names() + [RELAY_USER]:
                    f.write('%s,source\n' % u)
            r = self.gw.ctl('user', 'import', csv)
            if r.rc != 0:
                raise BenchError('mailshiftctl user import: %s'
                                 % r.describe())
            self.imported = True

    def stop(self):
        if self.gw.proc is not None:
            self.gw.stop()

    def port(self, proto):
        return self.gw.imap_port if proto == 'imap' else self.gw.pop3_port

    def roots(self):
        return [self.gw.pid] if self.gw.pid else []

    def alive(self):
        return self.gw.alive

    def status(self):
        r = self.gw.ctl('status', '--json')
        return r.json if r.rc == 0 else {'error': r.describe()}

    def describe(self):
        return ('mailshiftd, users in state source, [policy] on_first_login '
                '= off')


class NginxTarget(Target):
    name = 'nginx'

    def __init__(self, bench):
        super().__init__(bench)
        self.proc = None
        self.conf = os.path.join(self.dir, 'nginx.conf')
        self.err = os.path.join(self.dir, 'error.log')
        self.logs = [LogWatch(self.err)]

    def start(self):
        a, be = self.b.a, self.b.backend
        self.imap, self.pop3, self.auth = dc._free_ports(3)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        tmp = os.path.join(self.dir, 'tmp')
        os.makedirs(tmp, exist_ok=True)
        temps = ''.join('  %s_temp_path %s/%s;\n' % (k, tmp, k) for k in
                        ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
        conf = (
            '# generated by bench/gateway_bench.py\n'
            'load_module %(mod)s;\n'
            'daemon off;\n'
            'user nobody nogroup;\n'
            'worker_processes %(workers)s;\n'
            'worker_rlimit_nofile %(nofile)d;\n'
            'pid %(dir)s/nginx.pid;\n'
            'error_log %(err)s error;\n'
            'events { worker_connections %(wconn)d; }\n'
            'http {\n'
            '  access_log off;\n'
            '%(temps)s'
            '  server {\n'
            '    listen 127.0.0.1:%(auth)d;\n'
            '    location = /auth/imap {\n'
            '      add_header Auth-Status OK;\n'
            '      add_header Auth-Server 127.0.0.1;\n'
            '      add_header Auth-Port %(bimap)d;\n'
            '      return 204;\n'
            '    }\n'
            '    location = /auth/pop3 {\n'
            '      add_header Auth-Status OK;\n'
            '      add_header Auth-Server 127.0.0.1;\n'
            '      add_header Auth-Port %(bpop3)d;\n'
            '      return 204;\n'
            '    }\n'
            '  }\n'
            '}\n'
            'mail {\n'
            '  server_name mail.bench.test;\n'
            '  proxy_pass_error_message on;\n'
            '  server {\n'
            '    listen 127.0.0.1:%(imap)d;\n'
            '    protocol imap;\n'
            '    imap_auth login plain;\n'
            '    auth_http 127.0.0.1:%(auth)d/auth/imap;\n'
            '  }\n'
            '  server {\n'
            '    listen 127.0.0.1:%(pop3)d;\n'
            '    protocol pop3;\n'
            '    pop3_auth plain;\n'
            '    auth_http 127.0.0.1:%(auth)d/auth/pop3;\n'
            '  }\n'
            '}\n') % {
                'mod': NGINX_MAIL_MODULE, 'workers': a.nginx_workers,
                'nofile': nofile, 'wconn': max(1024, nofile - 100),
                'dir': self.dir, 'err': self.err, 'temps': temps,
                'auth': self.auth, 'imap': self.imap, 'pop3': self.pop3,
                'bimap': be.imap_port, 'bpop3': be.pop3_port}
        with open(self.conf, 'w') as f:
            f.write(conf)
        out = open(os.path.join(self.dir, 'stdout.log'), 'ab')
        try:
            self.proc = subprocess.Popen(
                [NGINX, '-p', self.dir + '/', '-e', self.err, '-c',
                 self.conf], stdin=subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True)
        finally:
            out.close()
        _wait_greeting(self.imap, b'* OK', self.proc, 'nginx', self.err)
        _wait_greeting(self.pop3, b'+OK', self.proc, 'nginx', self.err)

    def stop(self):
        _stop_pid(self.proc)
        self.proc = None

    def port(self, proto):
        return self.imap if proto == 'imap' else self.pop3

    def roots(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None \
            else []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None and \
            len(tree_procs([self.proc.pid])) > 1

    def version(self):
        return _cmd_out([NGINX, '-v'])

    def describe(self):
        return ('nginx mail proxy, %s worker(s), auth_http from a static '
                'nginx location' % self.b.a.nginx_workers)


class ProxyDovecot(dc.Dovecot):
    """A Dovecot whose passdb says proxy=y host=127.0.0.1 port=<backend's
    port for the service> (a passwd-file per service, %s in its path)."""

    def __init__(self, root_dir, name, users, backend, extra_conf=''):
        super().__init__(root_dir, name, users=users, performance=True,
                         pop3=True, extra_conf=extra_conf)
        self.backend = backend

    def _write_passwd(self):
        super()._write_passwd()
        for svc, port in (('imap', self.backend.imap_port),
                          ('pop3', self.backend.pop3_port)):
            path = '%s.%s' % (self.passwd_path, svc)
            with open(path + '.tmp', 'w') as f:
                for u, pw in self.users.items():
                    f.write('%s:{PLAIN}%s::::::proxy=y host=127.0.0.1 '
                            'port=%d\n' % (u, pw, port))
            dc._auth_readable(path + '.tmp')
            os.rename(path + '.tmp', path)

    def _config(self):
        c = super()._config()
        old = 'args = scheme=PLAIN username_format=%%u %s\n' % \
            self.passwd_path
        if old not in c:
            raise BenchError('dovecot.py config changed: cannot find the '
                             'passdb line to make the proxy')
        return c.replace(old, 'args = scheme=PLAIN username_format=%%u '
                         '%s.%%s\n' % self.passwd_path)


class DovecotProxyTarget(Target):
    name = 'dovecot-proxy'

    def __init__(self, bench):
        super().__init__(bench)
        # Proxied sessions stay in the login processes: two of them (one
        # per core), each allowed most of the open-files limit.
        per = max(1000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                         - 200) // 2)
        extra = '\n'.join(
            'service %s-login {\n  service_count = 0\n  process_min_avail '
            '= 2\n  client_limit = %d\n}' % (s, per) for s in
            ('imap', 'pop3'))
        self.dv = ProxyDovecot(self.dir, 'proxy', bench.all_users(),
                               bench.backend, extra_conf=extra)
        self.logs = [LogWatch(self.dv.log_path)]

    def start(self):
        self.dv.start()

    def stop(self):
        self.dv.stop()

    def port(self, proto):
        return self.dv.imap_port if proto == 'imap' else self.dv.pop3_port

    def roots(self):
        return [self.dv.pid] if self.dv.pid else []

    def alive(self):
        return self.dv.running

    def describe(self):
        return ('Dovecot 2.3 as proxy (passdb proxy=y), high-performance '
                'login processes (2)')


class PerditionTarget(Target):
    name = 'perdition'

    def __init__(self, bench):
        super().__init__(bench)
        self.procs = {}
        self.log = os.path.join(self.dir, 'perdition.log')
        self.conf = os.path.join(self.dir, 'empty.conf')
        self.logs = [LogWatch(self.log)]

    def start(self):
        be = self.b.backend
        open(self.conf, 'w').close()
        if not os.path.exists(self.log):
            open(self.log, 'w').close()
        os.chown(self.log, dc.MAIL_UID, dc.MAIL_GID)   # -F file: nobody
        self.ports = {}
        for proto, bport, mode in (('imap', be.imap_port, 'IMAP4'),
                                   ('pop3', be.pop3_port, 'POP3')):
            lport = dc.free_port()
            argv = [PERDITION, '-P', mode, '-f', self.conf, '-M', '',
                    '-s', '127.0.0.1:%d' % bport, '-l', str(lport),
                    '-b', '127.0.0.1:%d' % lport, '--no_daemon',
                    '-F', self.log, '-n', '-u', 'nobody', '-g', 'nogroup',
                    '--pid_file', '']
            out = open(os.path.join(self.dir, 'stdout.log'), 'ab')
            try:
                # Perdition uses select() and, in each child, close()s every
                # fd up to the open-files limit: run it with the usual 1024
                # (with 20,000 each login costs ~5x the CPU).
                self.procs[proto] = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True, preexec_fn=_nofile_1024)
            finally:
                out.close()
            self.ports[proto] = lport
            _wait_greeting(lport, b'* OK' if proto == 'imap' else b'+OK',
                           self.procs[proto], 'perdition', self.log)

    def stop(self):
        for p in self.procs.values():
            kids = tree_procs([p.pid])
            _stop_pid(p)
            _kill_leftovers([k for k in kids if k != p.pid])
        self.procs = {}

    def port(self, proto):
        return self.ports[proto]

    def roots(self):
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def alive(self):
        return bool(self.procs) and all(p.poll() is None
                                        for p in self.procs.values())

    def version(self):
        return _cmd_out(['dpkg-query', '-W', '-f', '${Version}',
                         'perdition'])

    def describe(self):
        return 'Perdition, a process per connection (open-files limit 1024)'


def _nofile_1024():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


def _cmd_out(argv):
    try:
        return subprocess.run(argv, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def _wait_greeting(port, prefix, proc, what, log, timeout=15.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError('%s exited at start (rc %s): %s'
                             % (what, proc.returncode, _tail(log)))
        try:
            with socket.create_connection(('127.0.0.1', port),
                                          timeout=2) as s:
                data = gwlib.first_line(s)
                if data.startswith(prefix):
                    return
                last = data
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise BenchError('%s: port %d never greeted (%r): %s'
                     % (what, port, last, _tail(log)))


def _tail(path, n=800):
    try:
        with open(path, 'rb') as f:
            s = f.read().decode(errors='replace').strip()
        return s[-n:] if s else '(empty log)'
    except OSError:
        return '(no log)'


TARGET_CLASSES = {'direct': Direct, 'mailshiftd': MailshiftdTarget,
                  'nginx': NginxTarget, 'dovecot-proxy': DovecotProxyTarget,
                  'perdition': PerditionTarget}


# =============================================================== the bench

class Bench:
    def __init__(self, a):
        self.a = a
        self.workdir = a.workdir or dc.make_test_root('mailshift-gwbench-',
                                                      parent='/dev/shm')
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.servers = []
        self.targets = {}
        self.results = []
        self.notes = []
        self.loadgen = os.path.join(self.workdir, 'gateway_loadgen')
        self.relay_bytes = 0

    def log(self, msg):
        print('[%7.1fs] %s' % (time.monotonic() - T0, msg), flush=True)

    def user_names(self):
        return ['%s%04d' % (USER_PREFIX, i) for i in range(self.a.users)]

    def all_users(self):
        u = {n: PASSWORD for n in self.user_names()}
        u[RELAY_USER] = PASSWORD
        return u

    # ------------------------------------------------------------- set-up

    def build_loadgen(self):
        argv = [CC, '-O2', '-Wall', '-o', self.loadgen, LOADGEN_SRC,
                '-lssl', '-lcrypto']
        r = subprocess.run(argv, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise BenchError('cannot build the load generator (%s): %s'
                             % (' '.join(argv), r.stdout[-2000:]))

    def setup(self):
        a = self.a
        self.build_loadgen()
        self.ca = dc.TestCA(os.path.join(self.workdir, 'ca'))
        extra = '\n'.join([
            'mail_max_userip_connections = 100000',
            'default_process_limit = 2000',
            'service imap {\n  process_limit = 2000\n}',
            'service pop3 {\n  process_limit = 2000\n}',
        ])
        self.backend = dc.Dovecot(os.path.join(self.workdir, 'backend'),
                                  'backend', users=self.all_users(),
                                  performance=True, pop3=True,
                                  extra_conf=extra)
        self.servers.append(self.backend)
        self.backend.start()
        # mailshiftd needs a destination; with policy off it gets nothing.
        self.dst = dc.Dovecot(os.path.join(self.workdir, 'dst'), 'dst',
                              users={}, pop3=True)
        self.servers.append(self.dst)
        self.dst.start()
        self.load_relay()
        self.log('backend: %d users, INBOX of %s: %d message(s), %.1f MB'
                 % (a.users, RELAY_USER, a.relay_messages,
                    self.relay_bytes / MB))
        # First logins create the maildirs: do them all before measuring.
        for proto in ('imap', 'pop3'):
            r = self.loadgen_run(self.backend_port(proto), proto,
                                 sessions=a.users, concurrency=50)
            if r.get('errors'):
                raise BenchError('warm-up on the backend failed: %s'
                                 % r.get('error_samples'))
        for name in self.names:
            t = TARGET_CLASSES[name](self)
            self.targets[name] = t
            try:
                t.start()
                self.warm(t)
            except (BenchError, dc.HarnessError, OSError) as e:
                self.notes.append('%s: could not start: %s' % (name, e))
                self.log('%s: could not start: %s' % (name, e))
                t.failed = str(e)
                try:
                    t.stop()
                except Exception:
                    pass
                continue
            t.failed = None
            self.log('%s: up (%s)' % (name, t.describe()))

    def backend_port(self, proto):
        return self.backend.imap_port if proto == 'imap' else \
            self.backend.pop3_port

    def warm(self, t, tls=False):
        """A few untimed sessions: lazy initialisation, caches."""
        for proto in ('imap',) if tls else ('imap', 'pop3'):
            r = self.loadgen_run(t.tls_port if tls else t.port(proto), proto,
                                 sessions=200, concurrency=20, tls=tls)
            if r.get('errors') or r.get('timed_out'):
                raise BenchError('%s: warm-up %s failed: %s'
                                 % (t.name, proto, r.get('error_samples')))

    def load_relay(self):
        """The relay user's INBOX: relay_messages messages of about
        relay_mb MB in all (base64 text, CRLF), appended over IMAP."""
        a = self.a
        total = int(a.relay_mb * MB)
        per = total // a.relay_messages
        s = socket.create_connection(('127.0.0.1', self.backend.imap_port))
        f = s.makefile('rb')

        def wait(tag):
            while True:
                line = f.readline()
                if not line:
                    raise BenchError('backend closed while loading')
                if line.startswith(tag + b' '):
                    if not line.startswith(tag + b' OK'):
                        raise BenchError('loading the relay mailbox: %r'
                                         % line)
                    return
        f.readline()
        s.sendall(b'a LOGIN %s %s\r\n' % (RELAY_USER.encode(),
                                          PASSWORD.encode()))
        wait(b'a')
        s.sendall(b'b SELECT INBOX\r\n')
        wait(b'b')
        rng = random.Random(a.seed)
        for i in range(a.relay_messages):
            hdr = ('From: Bench <bench@example.org>\r\n'
                   'To: %s@example.org\r\nSubject: relay %d\r\n'
                   'Date: Mon, 4 May 2026 10:00:00 +0000\r\n'
                   'Message-ID: <relay-%d@bench.example.org>\r\n'
                   'MIME-Version: 1.0\r\n'
                   'Content-Type: application/octet-stream\r\n'
                   'Content-Transfer-Encoding: base64\r\n\r\n'
                   % (RELAY_USER, i, i)).encode()
            need = per - len(hdr)
            body = base64.encodebytes(rng.randbytes(need * 3 // 4 + 64))
            body = body.replace(b'\n', b'\r\n')[:need]
            body = body[:body.rfind(b'\r\n') + 2]
            msg = hdr + body
            s.sendall(b'c%d APPEND INBOX {%d+}\r\n' % (i, len(msg)))
            s.sendall(msg)
            s.sendall(b'\r\n')
            wait(b'c%d' % i)
            self.relay_bytes += len(msg)
        s.sendall(b'z LOGOUT\r\n')
        s.close()
        # Fetch it once directly (untimed), which checks the size too.
        r = self.loadgen_run(self.backend.imap_port, 'imap', mode='fetch',
                             user=RELAY_USER)
        if not r.get('fetch_ok') or r.get('literal_bytes') != self.relay_bytes:
            raise BenchError('relay mailbox check: %s' % r)

    # ------------------------------------------------------ load generator

    def loadgen_argv(self, port, proto, mode='cycle', sessions=1,
                     concurrency=1, user=None, tls=False, timeout=None,
                     fetches=1):
        argv = [self.loadgen, '--port', str(port), '--proto', proto,
                '--mode', mode, '--sessions', str(sessions),
                '--concurrency', str(concurrency), '--users',
                str(self.a.users), '--user-prefix', USER_PREFIX,
                '--password', PASSWORD, '--src-ips', '32',
                '--timeout', str(timeout or self.a.timeout),
                '--fetches', str(fetches)]
        if user:
            argv += ['--user', user]
        if tls:
            argv += ['--tls', '--ca', self.ca.ca_file]
        return argv

    def loadgen_run(self, port, proto, **kw):
        argv = self.loadgen_argv(port, proto, **kw)
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, timeout=(kw.get('timeout') or
                                                   self.a.timeout) + 30)
        except subprocess.TimeoutExpired:
            return {'errors': 1, 'error_samples': ['load generator hung'],
                    'timed_out': True}
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError('load generator failed (rc %d): %s %s'
                             % (r.returncode, r.stdout[-500:],
                                r.stderr[-500:]))
        out['argv'] = ' '.join(argv).replace(PASSWORD, '***')
        return out

    # ---------------------------------------------------------- measuring

    def _snap(self, t):
        return {'all': proc_cpu_all(), 'stat': _stat_fields(),
                'proxy': tree_cpu(t.roots()),
                'backend': tree_cpu([p for p in (self.backend.pid,
                                                 self.dst.pid) if p]),
                'busy': machine_busy(), 't': time.monotonic(),
                'procs': len(tree_procs(t.roots()))}

    def _settle(self, t, procs_before, timeout=10.0):
        """Waits until forked children of the proxy are gone again."""
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while time.monotonic() < deadline and \
                len(tree_procs(t.roots())) > procs_before:
            time.sleep(0.05)

    def _account(self, res, t, s0, s1, lg_cpu):
        res['proxy_cpu'] = s1['proxy'] - s0['proxy']
        res['backend_cpu'] = s1['backend'] - s0['backend']
        busy = s1['busy'][0] - s0['busy'][0]
        irq = s1['busy'][1] - s0['busy'][1]
        res['irq_cpu'] = irq
        res['loadgen_cpu'] = lg_cpu
        # The irq/softirq time (loopback TCP) of /proc/stat is, on these
        # kernels, also in the times of the processes it interrupted (the
        # sums agree), so it is not subtracted here.
        res['other_cpu'] = max(0.0, busy - res['proxy_cpu'] -
                               res['backend_cpu'] - lg_cpu)
        res['elapsed'] = s1['t'] - s0['t']
        # Who the others were: the processes outside the proxy, backend
        # and load generator that used the most CPU meanwhile.
        mine = set(_tree(t.roots() + [self.backend.pid, self.dst.pid],
                         _proc_table()))
        deltas = []
        for pid, (name, ticks) in s1['all'].items():
            if pid in mine or pid == os.getpid() or name == 'gateway_loadgen':
                continue
            before = s0['all'].get(pid)     # (kworkers change names)
            d = ticks - (before[1] if before else 0)
            if d > 0:
                deltas.append((d / CLK, '%s[%d]' % (name, pid)))
        deltas.sort(reverse=True)
        res['others_top'] = [(n, round(c, 2)) for c, n in deltas[:5]]
        res['stat_delta'] = {k: round((s1['stat'][k] - s0['stat'][k]) / CLK, 2)
                             for k in s0['stat']}

    def _check(self, t, res):
        for w in t.logs:
            n, lines = w.trouble()
            if n:
                res['log_trouble'] = {'count': n, 'first': lines}
        if t.roots() or t.name != 'direct':
            if not t.alive():
                res['crashed'] = True
                res['error'] = (res.get('error') or '') + \
                    ' %s is not running any more' % t.name
                self.notes.append('%s died during %s %s'
                                  % (t.name, res['test'],
                                     res.get('proto', '')))
                try:
                    t.stop()
                    t.start()
                except Exception as e:
                    self.notes.append('%s: restart failed: %s' % (t.name, e))

    def run_logins(self, t, proto):
        a = self.a
        res = {'target': t.name, 'test': 'logins', 'proto': proto,
               'ok': False, 'error': None}
        for w in t.logs:
            w.mark()
        s0 = self._snap(t)
        r = self.loadgen_run(t.port(proto), proto, sessions=a.sessions,
                             concurrency=a.concurrency)
        self._settle(t, s0['procs'])
        s1 = self._snap(t)
        lg_cpu = r.get('cpu_user', 0) + r.get('cpu_sys', 0)
        self._account(res, t, s0, s1, lg_cpu)
        res['loadgen'] = r
        n_ok = r.get('ok', 0)
        res['sessions_ok'] = n_ok
        res['errors'] = r.get('errors', 0)
        if n_ok:
            res['logins_per_s'] = n_ok / r['wall']
            res['proxy_us_per_login'] = res['proxy_cpu'] / n_ok * 1e6
            res['backend_us_per_login'] = res['backend_cpu'] / n_ok * 1e6
            res['loadgen_cpu_share'] = lg_cpu / r['wall']
            res['lat_ms'] = r.get('lat_ms')
        if r.get('errors') or r.get('timed_out'):
            res['error'] = '%d of %d sessions failed: %s' % (
                r.get('errors', 0), a.sessions,
                '; '.join(r.get('error_samples', [])[:3]))
        else:
            res['ok'] = n_ok == a.sessions
        self._check(t, res)
        return res

    def run_relay(self, t):
        res = {'target': t.name, 'test': 'relay', 'ok': False,
               'error': None}
        for w in t.logs:
            w.mark()
        s0 = self._snap(t)
        k = self.a.relay_fetches
        r = self.loadgen_run(t.port('imap'), 'imap', mode='fetch',
                             user=RELAY_USER, fetches=k)
        self._settle(t, s0['procs'])
        s1 = self._snap(t)
        lg_cpu = r.get('cpu_user', 0) + r.get('cpu_sys', 0)
        self._account(res, t, s0, s1, lg_cpu)
        res['loadgen'] = r
        if r.get('fetch_ok') and \
                r.get('literal_bytes') == k * self.relay_bytes:
            # the fastest of the session's k FETCHes; CPU over all k
            sec = min(r['fetch_seconds_each'])
            res['ok'] = True
            res['bytes'] = self.relay_bytes
            res['fetches'] = k
            res['seconds'] = sec
            res['seconds_each'] = r['fetch_seconds_each']
            res['mb_per_s'] = self.relay_bytes / MB / sec
            scale = 100 * MB / r['literal_bytes']
            res['proxy_cpu_per_100mb'] = res['proxy_cpu'] * scale
            res['backend_cpu_per_100mb'] = res['backend_cpu'] * scale
            res['client_cpu_share'] = r.get('fetch_cpu', 0) / \
                r['fetch_seconds_total']
        else:
            res['error'] = 'fetch failed: got %s of %d bytes: %s' % (
                r.get('literal_bytes'), k * self.relay_bytes,
                '; '.join(r.get('error_samples', [])[:3]))
        self._check(t, res)
        return res

    def run_idle(self, t, tls=False):
        """N sessions logged in, SELECTed and idle: memory of the proxy tree
        (and of the backend) with them open, less before."""
        a = self.a
        name = t.name + ('+tls' if tls else '')
        res = {'target': name, 'test': 'idle', 'ok': False, 'error': None,
               'tls': tls}
        n = self.idle_n
        res['sessions_wanted'] = n
        # A fresh proxy, so memory freed by earlier tests (and kept by its
        # allocator) cannot hide the sessions' cost; then a warm-up.
        if t.name != 'direct':
            t.restart()
        self.warm(t, tls=tls)
        time.sleep(1.0)
        for w in t.logs:
            w.mark()
        be_roots = [self.backend.pid]
        m0, b0 = tree_mem(t.roots()), tree_mem(be_roots)
        s0 = self._snap(t)
        port = t.tls_port if tls else t.port('imap')
        argv = self.loadgen_argv(port, 'imap', mode='idle', sessions=n,
                                 concurrency=a.concurrency, tls=tls)
        res['argv'] = ' '.join(argv).replace(PASSWORD, '***')
        p = subprocess.Popen(argv, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready = None
        try:
            line = _readline(p.stdout, a.timeout + 30)
            if line.startswith(b'READY '):
                ready = json.loads(line[6:])
            elif line.startswith(b'DONE '):
                ready = json.loads(line[5:])
                res['error'] = 'opening timed out'
            else:
                res['error'] = 'load generator: %r %r' % (
                    line, p.stderr.read(2000) if p.poll() is not None
                    else b'')
            if ready is not None:
                time.sleep(a.idle_settle)
                m1, b1 = tree_mem(t.roots()), tree_mem(be_roots)
                # and once more, to see that it is stable
                time.sleep(1.0)
                m2 = tree_mem(t.roots())
                res['open_seconds'] = ready['wall']
                res['sessions'] = ready['established'] - ready['dropped']
                res['errors'] = ready['errors']
                res['error_samples'] = ready['error_samples']
                res['mem_before'], res['mem_open'] = m0, m1
                res['mem_open_later'] = m2
                res['backend_mem_before'], res['backend_mem_open'] = b0, b1
            if p.poll() is None:
                p.stdin.write(b'close\n')
                p.stdin.flush()
                line = _readline(p.stdout, 60)
                if line.startswith(b'DONE '):
                    res['done'] = json.loads(line[5:])
        finally:
            if p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._settle(t, s0['procs'], timeout=30)
        s1 = self._snap(t)
        lg = res.get('done') or ready or {}
        self._account(res, t, s0, s1, lg.get('cpu_user', 0) +
                      lg.get('cpu_sys', 0))
        k = res.get('sessions') or 0
        if k:
            res['pss_kb_per_session'] = \
                (m1['pss_kb'] - m0['pss_kb']) / k
            res['rss_kb_per_session'] = \
                (m1['rss_kb'] - m0['rss_kb']) / k
            res['backend_pss_kb_per_session'] = \
                (b1['pss_kb'] - b0['pss_kb']) / k
            res['ok'] = not res.get('error') and k == n
            if k < n:
                res['error'] = (res.get('error') or '') + \
                    '%d of %d sessions opened: %s' % (
                        k, n, '; '.join(res.get('error_samples', [])[:3]))
        elif not res.get('error'):
            res['error'] = 'no session opened: %s' % '; '.join(
                (ready or {}).get('error_samples', [])[:3])
        res['dropped'] = (res.get('done') or {}).get('dropped')
        self._check(t, res)
        # Let the backend release the sessions before the next test.
        time.sleep(2.0)
        return res

    def idle_sessions(self):
        """The idle count that fits the open-files limit: a proxy holds
        two sockets per session (the load generator one)."""
        want = self.a.idle_sessions
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        fit = (hard - 200) // 2
        if want > fit:
            self.notes.append(
                'idle sessions: %d asked, %d used (open-files limit %d; a '
                'proxy holds 2 sockets per session)' % (want, fit, hard))
            return fit
        return want

    # --------------------------------------------------------------- main

    def run(self):
        a = self.a
        self.names = a.targets
        self.setup()
        live = [n for n in self.names if not self.targets[n].failed]
        self.idle_n = self.idle_sessions()
        allruns = collections.defaultdict(list)
        if 'logins' in a.tests or 'relay' in a.tests:
            rounds = max(1, a.repeat)
            for i in range(rounds):
                if rounds > 1:
                    self.log('round %d of %d' % (i + 1, rounds))
                k = i % len(live)
                for name in live[k:] + live[:k]:
                    t = self.targets[name]
                    if 'logins' in a.tests:
                        for proto in ('imap', 'pop3'):
                            r = self.run_logins(t, proto)
                            allruns[(name, 'logins', proto)].append(r)
                            self.log('%-14s %s logins: %s' % (
                                name, proto, _brief(r)))
                    if 'relay' in a.tests:
                        r = self.run_relay(t)
                        allruns[(name, 'relay', None)].append(r)
                        self.log('%-14s relay: %s' % (name, _brief(r)))
        if 'idle' in a.tests:
            for name in live:
                t = self.targets[name]
                variants = [False]
                if name == 'mailshiftd' and t.tls_port:
                    variants.append(True)
                for tls in variants:
                    try:
                        r = self.run_idle(t, tls)
                    except (BenchError, dc.HarnessError, OSError) as e:
                        r = {'target': name + ('+tls' if tls else ''),
                             'test': 'idle', 'ok': False, 'error': str(e),
                             'tls': tls}
                    allruns[(r['target'], 'idle', None)].append(r)
                    self.log('%-14s idle: %s' % (r['target'], _brief(r)))
        for key, runs in allruns.items():
            self.results.append(pick_best(key, runs))
        if 'mailshiftd' in self.targets and \
                not self.targets['mailshiftd'].failed:
            self.ms_status = self.targets['mailshiftd'].status()
        else:
            self.ms_status = None
        # With policy off nothing may reach the destination.
        try:
            with open(self.dst.log_path, 'rb') as f:
                self.dst_logins = f.read().count(b'-login: Info: Login:')
        except OSError:
            self.dst_logins = None
        if self.dst_logins:
            self.notes.append('the destination Dovecot saw %d logins (policy '
                              'off should send none there)'
                              % self.dst_logins)

    def cleanup(self):
        for t in self.targets.values():
            try:
                t.stop()
            except Exception as e:
                print('stopping %s: %s' % (t.name, e), file=sys.stderr)
        for s in self.servers:
            try:
                s.stop()
            except Exception as e:
                print('stopping %s: %s' % (s.name, e), file=sys.stderr)
        if not self.a.keep and not self.a.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _readline(f, timeout):
    r, _, _ = select.select([f], [], [], timeout)
    if not r:
        return b''
    return f.readline()


def _brief(r):
    if r['test'] == 'logins' and r.get('logins_per_s'):
        s = '%.0f/s, proxy %.0f us/login, loadgen %.0f%%' % (
            r['logins_per_s'], r['proxy_us_per_login'],
            100 * r['loadgen_cpu_share'])
    elif r['test'] == 'relay' and r.get('mb_per_s'):
        s = '%.0f MB/s, proxy %.2f s CPU/100 MB' % (
            r['mb_per_s'], r['proxy_cpu_per_100mb'])
    elif r['test'] == 'idle' and r.get('sessions'):
        s = '%d sessions, %.1f KB PSS/session (RSS %.1f), backend %.1f' % (
            r['sessions'], r['pss_kb_per_session'],
            r['rss_kb_per_session'], r['backend_pss_kb_per_session'])
    else:
        s = 'FAILED'
    if r.get('error'):
        s += ' ERROR: %s' % r['error']
    return s


def pick_best(key, runs):
    """The best successful run (most logins/s, most MB/s); all runs are
    kept under 'repeats'."""
    name, test, proto = key
    metric = {'logins': 'logins_per_s', 'relay': 'mb_per_s'}.get(test)
    ok = [r for r in runs if r['ok']]
    if metric and ok:
        best = dict(max(ok, key=lambda r: r[metric]))
    else:
        best = dict(ok[0] if ok else runs[-1])
    if len(runs) > 1:
        keys = ('ok', 'logins_per_s', 'proxy_us_per_login',
                'backend_us_per_login', 'mb_per_s', 'proxy_cpu_per_100mb',
                'other_cpu', 'irq_cpu', 'loadgen_cpu', 'error')
        best['repeats'] = [{k: r.get(k) for k in keys if k in r}
                           for r in runs]
        for k in ('proxy_us_per_login', 'proxy_cpu_per_100mb',
                  'logins_per_s', 'mb_per_s'):
            vals = [r[k] for r in ok if r.get(k) is not None]
            if vals:
                best[k + '_median'] = statistics.median(vals)
    return best


# ================================================================= report

def _fmt_table(hdr, rows, left=(0,)):
    w = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h)
         for i, h in enumerate(hdr)]
    fmt = '  '.join(('%%-%ds' if i in left else '%%%ds') % w[i]
                    for i in range(len(hdr)))
    out = [fmt % tuple(hdr), '  '.join('-' * x for x in w)]
    out += [fmt % tuple(x) for x in rows]
    return out


def report(b):
    a = b.a
    R = {}
    for r in b.results:
        R[(r['target'], r['test'], r.get('proto'))] = r
    lines = []
    ncpu = os.cpu_count() or 1
    noisy = set()

    def others(r):
        el = r.get('elapsed') or 0
        if el and r.get('other_cpu', 0) > 0.25 * ncpu * el:
            noisy.add('%s %s%s' % (r['target'], r['test'],
                                   ' ' + r['proto'] if r.get('proto')
                                   else ''))
        return '%.2f' % r.get('other_cpu', 0)

    if 'logins' in a.tests:
        for proto in ('imap', 'pop3'):
            d = R.get(('direct', 'logins', proto))
            rows = []
            for name in a.targets:
                r = R.get((name, 'logins', proto))
                if r is None:
                    continue
                if not r.get('logins_per_s'):
                    rows.append((name,) + ('-',) * 8 + ('FAILED',))
                    continue
                rel = ('%.2fx' % (r['logins_per_s'] / d['logins_per_s'])
                       if d and d.get('logins_per_s') else '-')
                pcpu = ('-' if name == 'direct'
                        else '%.0f' % r['proxy_us_per_login'])
                rows.append((
                    name, '%.0f' % r['logins_per_s'], rel, pcpu,
                    '%.0f' % r['backend_us_per_login'],
                    '%.1f/%.1f' % (r['lat_ms']['p50'], r['lat_ms']['p99']),
                    '%.0f%%' % (100 * r['loadgen_cpu_share']),
                    '%.2f' % r['irq_cpu'], others(r),
                    'ok' if r['ok'] else 'ERRORS %d' % r.get('errors', 0)))
            lines.append('')
            lines.append('%s logins: %d sessions, %d concurrent, each '
                         'connect, %s, close (best of %d rounds)'
                         % (proto.upper(), a.sessions, a.concurrency,
                            'LOGIN, SELECT INBOX, LOGOUT' if proto == 'imap'
                            else 'USER/PASS, STAT, QUIT', a.repeat))
            lines += _fmt_table(
                ('target', 'logins/s', 'vs direct', 'proxy us/login',
                 'backend us/login', 'p50/p99 ms', 'loadgen CPU',
                 'irq s', 'others s', 'status'), rows, left=(0, 9))

    if 'relay' in a.tests:
        d = R.get(('direct', 'relay', None))
        rows = []
        for name in a.targets:
            r = R.get((name, 'relay', None))
            if r is None:
                continue
            if not r.get('mb_per_s'):
                rows.append((name,) + ('-',) * 9 + ('FAILED',))
                continue
            rel = ('%.0f%%' % (100 * r['mb_per_s'] / d['mb_per_s'])
                   if d and d.get('mb_per_s') else '-')
            rows.append((
                name, '%.3f' % r['seconds'], '%.0f' % r['mb_per_s'],
                '%.0f' % r.get('mb_per_s_median', r['mb_per_s']), rel,
                '-' if name == 'direct' else
                '%.3f' % r['proxy_cpu_per_100mb'],
                '-' if name == 'direct' else
                '%.3f' % r.get('proxy_cpu_per_100mb_median',
                               r['proxy_cpu_per_100mb']),
                '%.3f' % r['backend_cpu_per_100mb'],
                '%.0f%%' % (100 * r['client_cpu_share']),
                others(r), 'ok' if r['ok'] else 'FAILED'))
        lines.append('')
        lines.append('relay: UID FETCH 1:* BODY.PEEK[] of %.1f MB (%d '
                     'message(s)), %d times in one session; the fastest '
                     'FETCH, CPU over all (best of %d rounds)'
                     % (b.relay_bytes / MB, a.relay_messages,
                        a.relay_fetches, a.repeat))
        lines += _fmt_table(
            ('target', 'seconds', 'MB/s', 'median', 'of direct',
             'proxy CPU s/100MB', 'median', 'backend CPU s/100MB',
             'client CPU', 'others s', 'status'),
            rows, left=(0, 10))
        lines.append('(median: of the %d rounds; the other columns are the '
                     'best round\'s)' % a.repeat)

    if 'idle' in a.tests:
        rows = []
        for name in list(a.targets) + ['mailshiftd+tls']:
            r = R.get((name, 'idle', None))
            if r is None:
                continue
            if not r.get('sessions'):
                rows.append((name,) + ('-',) * 6 + ('FAILED',))
                continue
            direct = name == 'direct'
            rows.append((
                name, str(r['sessions']),
                '-' if direct else '%.1f' % r['pss_kb_per_session'],
                '-' if direct else '%.1f' % r['rss_kb_per_session'],
                '-' if direct else '%d' % r['mem_open']['procs'],
                '%.1f' % r['backend_pss_kb_per_session'] if direct else '-',
                '%.1f' % r['open_seconds'],
                'ok' if r['ok'] else 'ERROR: %s' % r.get('error')))
        lines.append('')
        lines.append('idle sessions: N logged in, SELECTed and idle; KB '
                     '(KiB) per session = (proxy tree with them open - '
                     'before) / N; backend: Dovecot\'s own, shown for '
                     'direct only (behind a proxy it depends on the imap '
                     'processes left by earlier tests)')
        lines += _fmt_table(
            ('target', 'N', 'PSS KB/session', 'RSS KB/session',
             'proxy procs', 'backend PSS KB/session', 'open s', 'status'),
            rows, left=(0, 7))

    lines.append('(proxy us/login, CPU s/100MB: user+sys CPU of the proxy\'s '
                 'process tree (/proc, reaped children included) per login / '
                 'per 100 MB relayed; backend: the Dovecot behind it. irq s: '
                 'irq+softirq time of the machine (loopback TCP), already '
                 'inside the process times. others s: CPU used meanwhile by '
                 'processes other than proxy, backend and load generator.)')
    if noisy:
        lines.append('WARNING: the machine was busy with other work during: '
                     '%s (more than a quarter of its CPU); compare those '
                     'rows with care, or rerun with --repeat'
                     % ', '.join(sorted(noisy)))
    for r in b.results:
        if r.get('test') == 'logins' and r.get('loadgen_cpu_share', 0) > 0.8:
            lines.append('WARNING: the load generator used %.0f%% of a core '
                         'in %s %s: it may be the bottleneck'
                         % (100 * r['loadgen_cpu_share'], r['target'],
                            r['proto']))
        if r.get('test') == 'relay' and r.get('client_cpu_share', 0) > 0.8:
            lines.append('WARNING: the fetch client used %.0f%% of a core '
                         'for %s: it may be the bottleneck'
                         % (100 * r['client_cpu_share'], r['target']))
    for r in b.results:
        if r.get('error'):
            lines.append('%s %s%s: ERROR: %s' % (
                r['target'], r['test'],
                ' ' + r['proto'] if r.get('proto') else '', r['error']))
        if r.get('log_trouble'):
            lt = r['log_trouble']
            lines.append('%s %s%s: %d log line(s) look like trouble, e.g. %s'
                         % (r['target'], r['test'],
                            ' ' + r['proto'] if r.get('proto') else '',
                            lt['count'], lt['first'][0]))
    for n in b.notes:
        lines.append('note: ' + n)

    # ---- ratios and targets
    ratios = {}
    ms = 'mailshiftd'

    def get(name, test, proto, key):
        r = R.get((name, test, proto))
        return r.get(key) if r and r.get('ok') else None

    for other in PROXIES[1:]:
        for proto in ('imap', 'pop3'):
            x, y = (get(ms, 'logins', proto, 'logins_per_s'),
                    get(other, 'logins', proto, 'logins_per_s'))
            if x and y:
                ratios['logins/s %s mailshiftd/%s' % (proto, other)] = x / y
            x, y = (get(ms, 'logins', proto, 'proxy_us_per_login'),
                    get(other, 'logins', proto, 'proxy_us_per_login'))
            if x and y:
                ratios['CPU/login %s %s/mailshiftd' % (proto, other)] = y / x
        x, y = (get(ms, 'relay', None, 'mb_per_s'),
                get(other, 'relay', None, 'mb_per_s'))
        if x and y:
            ratios['relay MB/s mailshiftd/%s' % other] = x / y
        x, y = (get(ms, 'relay', None, 'proxy_cpu_per_100mb'),
                get(other, 'relay', None, 'proxy_cpu_per_100mb'))
        if x and y:
            ratios['CPU/100MB %s/mailshiftd' % other] = y / x
        x = R.get((ms, 'idle', None), {}).get('pss_kb_per_session')
        y = R.get((other, 'idle', None), {}).get('pss_kb_per_session')
        if x and y:
            ratios['idle KB %s/mailshiftd' % other] = y / x
    if ratios:
        lines.append('')
        lines.append('ratios (> 1 favours mailshiftd):')
        for k, v in ratios.items():
            lines.append('  %-40s %.2fx' % (k, v))

    targets = collections.OrderedDict()

    def mark(ok):
        return 'n/a' if ok is None else ('met' if ok else 'NOT met')

    def medians(key, test, proto, fmt):
        x = get(ms, test, proto, key + '_median')
        y = get('nginx', test, proto, key + '_median')
        return (' (medians ' + fmt + ' vs ' + fmt + ')') % (x, y) \
            if x is not None and y is not None else ''

    for proto in ('imap', 'pop3'):
        x = get(ms, 'logins', proto, 'proxy_us_per_login')
        y = get('nginx', 'logins', proto, 'proxy_us_per_login')
        targets['CPU/login < nginx (%s)' % proto.upper()] = (
            None if x is None or y is None else x < y,
            '-' if x is None or y is None else
            '%.0f vs %.0f us' % (x, y) +
            medians('proxy_us_per_login', 'logins', proto, '%.0f'))
    x = get(ms, 'relay', None, 'proxy_cpu_per_100mb')
    y = get('nginx', 'relay', None, 'proxy_cpu_per_100mb')
    targets['CPU/100MB < nginx'] = (
        None if x is None or y is None else x < y,
        '-' if x is None or y is None else '%.3f vs %.3f s' % (x, y) +
        medians('proxy_cpu_per_100mb', 'relay', None, '%.3f'))
    x = get(ms, 'relay', None, 'mb_per_s')
    y = get('direct', 'relay', None, 'mb_per_s')
    xm = get(ms, 'relay', None, 'mb_per_s_median')
    ym = get('direct', 'relay', None, 'mb_per_s_median')
    targets['relay >= %.0f%% of direct' % (100 * TARGET_RELAY_SHARE)] = (
        None if x is None or y is None else x >= TARGET_RELAY_SHARE * y,
        '-' if x is None or y is None else
        '%.0f%% (%.0f vs %.0f MB/s)' % (100 * x / y, x, y) +
        (' (medians %.0f%%)' % (100 * xm / ym) if xm and ym else ''))
    for name, lim in ((ms, TARGET_IDLE_KB), (ms + '+tls', TARGET_IDLE_TLS_KB)):
        r = R.get((name, 'idle', None)) or {}
        x = r.get('pss_kb_per_session')
        k = r.get('sessions')
        targets['idle %s <= %.0f KB/session' % (
            'TLS' if name.endswith('tls') else 'plaintext', lim)] = (
            None if x is None else x <= lim,
            '-' if x is None else '%.1f KB (N=%d)' % (x, k))
    for proto in ('imap', 'pop3'):
        x = get(ms, 'logins', proto, 'logins_per_s')
        others_ = {o: get(o, 'logins', proto, 'logins_per_s')
                   for o in PROXIES[1:]}
        others_ = {o: v for o, v in others_.items() if v}
        if x and others_:
            best_o = max(others_, key=others_.get)
            targets['logins/s >= every other proxy (%s)' % proto.upper()] = (
                x >= others_[best_o],
                '%.0f vs %.0f (%s)' % (x, others_[best_o], best_o))
        else:
            targets['logins/s >= every other proxy (%s)' % proto.upper()] = (
                None, '-')
    lines.append('')
    lines.append('targets for mailshiftd:')
    for k, (ok, val) in targets.items():
        lines.append('  %-38s %-44s %s' % (k, val, mark(ok)))
    print('\n'.join(lines))
    return ratios, {k: {'met': v[0], 'value': v[1]}
                    for k, v in targets.items()}


def machine_info(b):
    info = {'nproc': os.cpu_count()}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
        with open('/proc/meminfo') as f:
            info['mem_kb'] = int(f.readline().split()[1])
    except OSError:
        pass
    info['nofile'] = resource.getrlimit(resource.RLIMIT_NOFILE)
    info['dovecot'] = _cmd_out([dc.DOVECOT, '--version'])
    info['nginx'] = _cmd_out([NGINX, '-v'])
    info['perdition'] = _cmd_out(['dpkg-query', '-W', '-f', '${Version}',
                                  'perdition'])
    info['kernel'] = _cmd_out(['uname', '-r'])
    try:
        with open(gwlib.MAILSHIFTD, 'rb') as f:
            info['mailshiftd_sha256'] = hashlib.sha256(f.read()).hexdigest()
        info['mailshiftd_mtime'] = time.strftime(
            '%Y-%m-%dT%H:%M:%S',
            time.localtime(os.stat(gwlib.MAILSHIFTD).st_mtime))
    except OSError:
        pass
    info['git'] = _cmd_out(['git', '-C', REPO, 'describe', '--always',
                            '--dirty'])
    return info


def main():
    p = argparse.ArgumentParser(
        description='mailshift gateway benchmark (see bench/README.md)')
    p.add_argument('--only', default=None,
                   help='comma-separated subset of: ' + ','.join(TARGETS))
    p.add_argument('--tests', default=','.join(TESTS),
                   help='comma-separated subset of: ' + ','.join(TESTS))
    p.add_argument('--sessions', type=int, default=2000,
                   help='sessions per login run (default 2000)')
    p.add_argument('--concurrency', type=int, default=50,
                   help='sessions at a time (default 50)')
    p.add_argument('--users', type=int, default=1000,
                   help='distinct users (default 1000)')
    p.add_argument('--relay-mb', type=float, default=100.0,
                   help='size of the relay user\'s INBOX in MB (default 100)')
    p.add_argument('--relay-messages', type=int, default=1,
                   help='messages it is split into (default 1)')
    p.add_argument('--relay-fetches', type=int, default=3,
                   help='FETCHes of the whole INBOX per relay session; the '
                   'fastest counts, CPU is over all (default 3)')
    p.add_argument('--idle-sessions', type=int, default=5000,
                   help='idle sessions for the memory test (default 5000)')
    p.add_argument('--idle-settle', type=float, default=2.0,
                   help='seconds to wait with all idle sessions open before '
                   'measuring (default 2)')
    p.add_argument('--repeat', type=int, default=3,
                   help='rounds of the login and relay tests, rotated; the '
                   'best run counts (default 3)')
    p.add_argument('--nginx-workers', default='auto',
                   help='nginx worker_processes (default auto)')
    p.add_argument('--seed', type=int, default=20240501)
    p.add_argument('--timeout', type=int, default=600,
                   help='seconds one load generator run may take')
    p.add_argument('--workdir', default=None)
    p.add_argument('--keep', action='store_true',
                   help='keep the work directory (configs, logs)')
    p.add_argument('--results', default=os.path.join(HERE, 'results'))
    a = p.parse_args()
    a.targets = list(TARGETS)
    if a.only:
        a.targets = [t.strip() for t in a.only.split(',') if t.strip()]
        bad = [t for t in a.targets if t not in TARGETS]
        if bad:
            p.error('unknown target(s) %s' % ','.join(bad))
    a.tests = [t.strip() for t in a.tests.split(',') if t.strip()]
    bad = [t for t in a.tests if t not in TESTS]
    if bad:
        p.error('unknown test(s) %s' % ','.join(bad))
    if os.geteuid() != 0:
        p.error('must run as root (Dovecot stores mail as uid 65534)')
    if not os.access(gwlib.MAILSHIFTD, os.X_OK) and 'mailshiftd' in a.targets:
        p.error('%s is missing: run `make -C %s all`' % (gwlib.MAILSHIFTD,
                                                          REPO))
    missing = []
    if 'nginx' in a.targets and not (os.access(NGINX, os.X_OK) and
                                     os.path.exists(NGINX_MAIL_MODULE)):
        missing.append('nginx + libnginx-mod-mail')
    if 'perdition' in a.targets and not os.access(PERDITION, os.X_OK):
        missing.append('perdition')
    if missing:
        p.error('missing %s: run tests/install-deps.sh' % ', '.join(missing))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    b = Bench(a)

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        b.log('work directory %s' % b.workdir)
        b.run()
        ratios, targets = report(b)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 1
    except (BenchError, dc.HarnessError) as e:
        print('gateway_bench: %s' % e, file=sys.stderr)
        return 1
    finally:
        b.cleanup()

    os.makedirs(a.results, exist_ok=True)
    stamp = time.strftime('%Y-%m-%dT%H%M%S')
    path = os.path.join(a.results, 'gateway-%s.json' % stamp)
    doc = {'date': stamp, 'argv': sys.argv[1:], 'machine': machine_info(b),
           'settings': {k: v for k, v in vars(a).items()},
           'idle_sessions_used': getattr(b, 'idle_n', None),
           'relay_bytes': b.relay_bytes,
           'targets_described': {n: t.describe()
                                 for n, t in b.targets.items()},
           'mailshiftd_status_after': getattr(b, 'ms_status', None),
           'destination_logins': getattr(b, 'dst_logins', None),
           'results': b.results, 'ratios': ratios, 'targets': targets,
           'notes': b.notes}
    with open(path, 'w') as f:
        json.dump(doc, f, indent=1, default=str)
    print('\nresults written to %s' % os.path.relpath(path))
    return 0


T0 = time.monotonic()

if __name__ == '__main__':
    sys.exit(main())
