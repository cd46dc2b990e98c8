"""mailshiftd (the gateway daemon) for tests, in front of two Dovecots.

    gw = Mailshiftd(root_dir, src, dst, tls_ca=ca, policy='passthrough')
    gw.start()                       # waits for the IMAP greeting + socket
    m = imaplib.IMAP4('127.0.0.1', gw.imap_port)
    rc, out, err, j = gw.ctl('user', 'show', 'alice', '--json')
    gw.stop()                        # SIGTERM to its PID, waits

The config file (docs/gateway-spec.md, docs/mailshift.conf.5) gets free
loopback ports for the imap/pop3 listeners (and imaps/pop3s when tls_ca is
given: a certificate for 127.0.0.1/localhost issued by that TestCA, key mode
0600), the [source]/[destination] IMAP and POP3 URLs of the two Dovecot
instances, and the store and control socket inside root_dir.

SMTP (optional): smtp=True adds an inbound SMTP listener (gw.smtp_port),
submission=True a submission listener (gw.submission_port; with tls_ca also
an implicit-TLS one, gw.submissions_port); smtp_backends={'source': {'smtp':
URL, 'submission': URL}, 'destination': {...}} gives the MTAs' URLs, and
smtp_ca_file the CA that verifies them (smtp+starttls://, smtps://). The daemon
runs in the foreground (-f) with stdout and stderr in root_dir/mailshiftd.log.

Transparent proxying (TPROXY): listen_host='0.0.0.0' with fixed imap_port /
pop3_port (instead of free loopback ports) and transparent=True ([listen]
transparent = yes); netns='NAME' runs the daemon inside that network
namespace (`ip netns exec NAME mailshiftd ...`, which execs, so gw.pid is the
daemon's) and makes the readiness check connect there (its 127.0.0.1). The
control socket is a UNIX socket: gw.ctl() works from any namespace.

env={'NAME': 'value'} adds to the daemon's environment (e.g. glibc's
MALLOC_PERTURB_); gw.rss_kb() is its resident memory, gw.rss_kb('VmHWM') its
peak since gw.rss_peak_reset().

Socket activation: activation=sdactivate.Sockets(...) (bound by the test,
held across restarts, as systemd's socket unit) makes start() pass them on
the way systemd does; the config must name the same addresses (fixed
ports).

Crash points: binary=MAILSHIFTD_HOOKS (make hooks) and env={
'MAILSHIFT_CRASH_AT': 'cutover.grace'} make the daemon kill itself there;
gw.wait_crashed() waits for that and checks it; gw.restart_after_crash()
starts it again on the same store, without the crash point.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import dovecot as dc
import leakcheck
import storemode

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MAILSHIFTD = os.environ.get('MAILSHIFTD') or \
    os.path.join(REPO, 'daemon', 'mailshiftd')
MAILSHIFTCTL = os.environ.get('MAILSHIFTCTL') or \
    os.path.join(REPO, 'tools', 'mailshiftctl')
# The builds with the crash points of daemon/testhook.h (make hooks), for
# the tests that kill a process at a chosen instant (MAILSHIFT_CRASH_AT).
MAILSHIFTD_HOOKS = os.environ.get('MAILSHIFTD_HOOKS') or \
    os.path.join(REPO, 'build', 'hooks', 'mailshiftd')
MAILSHIFTCTL_HOOKS = os.environ.get('MAILSHIFTCTL_HOOKS') or \
    os.path.join(REPO, 'build', 'hooks', 'mailshiftctl')


def crash_line(point):
    """What a hook build writes to stderr as it kills itself at crash
    point "name" or "name:N" (daemon/testhook.c)."""
    name, _, n = point.partition(':')
    return 'mailshift: crash point %s:%s: SIGKILL' % (name, n or '1')


def first_line(sock):
    """What sock receives up to its first LF (b'' when it ends before
    sending anything): a server's greeting."""
    data = b''
    while b'\n' not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b'\n', 1)[0]


def noops_while(port, fn, every=0.05):
    """Runs fn() in a thread while a client of the IMAP port port, not
    logged in (the gateway answers it itself), sends a NOOP each every
    seconds: (fn's result, how many NOOPs, the slowest one's seconds)."""
    c = socket.create_connection(('127.0.0.1', port), timeout=30)
    f = c.makefile('rb')
    done = {}
    try:
        assert f.readline().startswith(b'* OK')
        t = threading.Thread(target=lambda: done.update(r=fn()),
                             daemon=True)
        worst, noops = 0.0, 0
        t.start()
        while t.is_alive():
            t0 = time.monotonic()
            c.sendall(b'n%d NOOP\r\n' % noops)
            assert f.readline().startswith(b'n%d OK' % noops)
            worst = max(worst, time.monotonic() - t0)
            noops += 1
            time.sleep(every)
        t.join()
    finally:
        c.close()
    assert 'r' in done, 'fn raised (its thread printed why)'
    return done['r'], noops, worst


class CtlResult:
    """What one mailshiftctl run gave: unpacks as (rc, stdout, stderr,
    json); json is the parsed stdout when --json was given (None when it
    is not valid JSON)."""

    def __init__(self, argv, rc, stdout, stderr, want_json):
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.json = None
        if want_json and stdout.strip():
            try:
                self.json = json.loads(stdout)
            except ValueError:
                self.json = None

    def __iter__(self):
        return iter((self.rc, self.stdout, self.stderr, self.json))

    def describe(self):
        return ('argv: %s\nrc: %s\nstdout: %s\nstderr: %s'
                % (' '.join(self.argv), self.rc, self.stdout.strip()[:4000],
                   self.stderr.strip()[:4000]))


class Mailshiftd:
    """One mailshiftd. See the module docstring.

    src, dst: started dovecot.Dovecot instances. policy: [policy]
    on_first_login. hold_max: hold_max_seconds. connections: mover
    connections per server. domains: {domain: policy}. src_schemes /
    dst_schemes: (imap scheme, pop3 scheme) of the backend URLs; with a TLS
    scheme the backend's CA goes into ca_file."""

    def __init__(self, root_dir, src, dst, tls_ca=None, policy='passthrough',
                 hold_max=60, connections=2, domains=None,
                 src_schemes=('imap', 'pop3'), dst_schemes=('imap', 'pop3'),
                 binary=None, ctl_binary=None, extra_conf='', smtp=False,
                 submission=False, smtp_backends=None, smtp_ca_file=None,
                 listen_host='127.0.0.1', imap_port=None, pop3_port=None,
                 transparent=False, netns=None, env=None, activation=None,
                 flip_quiet=1, store_url=None):
        self.root_dir = os.path.abspath(root_dir)
        self.src = src
        self.dst = dst
        self.tls_ca = tls_ca
        self.policy = policy
        self.hold_max = hold_max
        # [policy] flip_quiet: 1 s, not the default 5 s, so that each of
        # the suite's many flips waits less (test_flip_quiet.py and
        # test_config.c hold the default and the period itself).
        self.flip_quiet = flip_quiet
        self.connections = connections
        self.domains = dict(domains or {})
        self.src_schemes = src_schemes
        self.dst_schemes = dst_schemes
        self.binary = binary or MAILSHIFTD
        self.ctl_binary = ctl_binary or MAILSHIFTCTL
        self.extra_conf = extra_conf
        self.smtp = smtp
        self.submission = submission
        self.smtp_backends = dict(smtp_backends or {})
        self.smtp_ca_file = smtp_ca_file
        self.listen_host = listen_host
        self.fixed_ports = (imap_port, pop3_port)
        self.transparent = transparent
        self.netns = netns
        self.env = dict(env or {})
        # sdactivate.Sockets: the daemon inherits its listeners from them
        self.activation = activation
        self.smtp_port = self.submission_port = self.submissions_port = None
        self.config_path = os.path.join(self.root_dir, 'mailshift.conf')
        self.log_path = os.path.join(self.root_dir, 'mailshiftd.log')
        self.store_path = os.path.join(self.root_dir, 'mailshift.db')
        # [store] url in place of path: a PostgreSQL database
        # (tests/lib/postgres.py; its password file in env's PGPASSFILE).
        # Without one, the suite's engine (tests/lib/storemode.py) decides.
        # Then start() waits, past the greeting, until the daemon has
        # caught up with the store: until then it defers what it cannot
        # be sure of (mail with 451), which a test on SQLite never sees.
        self.await_catch_up = False
        if store_url is None:
            target = storemode.store_for(self.store_path)
            if storemode.is_url(target):
                store_url = target
                self.await_catch_up = True
        self.store_url = store_url
        self.socket_path = os.path.join(self.root_dir, 'control.sock')
        self.pid_file = os.path.join(self.root_dir, 'mailshiftd.pid')
        self.cert_file = self.key_file = None
        self.imap_port = self.imaps_port = None
        self.pop3_port = self.pop3s_port = None
        self.proc = None
        self.killed = False        # stop() had to SIGKILL it

    # ---------------------------------------------------------------- config

    def _backend(self, server, schemes, side):
        imap_scheme, pop3_scheme = schemes
        lines = ['imap = %s' % server.url(imap_scheme)]
        if pop3_scheme and server.pop3_port is not None:
            lines.append('pop3 = %s' % server.url(pop3_scheme))
        if any(s and s != 'imap' and s != 'pop3' for s in schemes):
            lines.append('ca_file = %s' % server.tls_ca.ca_file)
        elif self.smtp_ca_file:
            lines.append('ca_file = %s' % self.smtp_ca_file)
        for key, url in sorted(self.smtp_backends.get(side, {}).items()):
            lines.append('%s = %s' % (key, url))
        return lines

    def config_text(self):
        pop3_line = 'pop3 = %s:%d' % (self.listen_host, self.pop3_port)
        lines = ['# generated by tests/lib/gateway.py',
                 '[daemon]', 'pid_file = %s' % self.pid_file, '',
                 '[listen]',
                 'imap = %s:%d' % (self.listen_host, self.imap_port),
                 pop3_line]
        if self.transparent:
            lines.append('transparent = yes')
        if self.tls_ca is not None:
            lines += ['imaps = 127.0.0.1:%d' % self.imaps_port,
                      'pop3s = 127.0.0.1:%d' % self.pop3s_port,
                      '', '[tls]', 'cert = %s' % self.cert_file,
                      'key = %s' % self.key_file]
        smtp_lines = []
        if self.smtp_port:
            smtp_lines.append('smtp = 127.0.0.1:%d' % self.smtp_port)
        if self.submission_port:
            smtp_lines.append('submission = 127.0.0.1:%d'
                              % self.submission_port)
        if self.submissions_port:
            smtp_lines.append('submissions = 127.0.0.1:%d'
                              % self.submissions_port)
        if smtp_lines:
            # Listeners belong to [listen]: put them right after imap/pop3.
            at = lines.index(pop3_line) + 1
            lines[at:at] = smtp_lines
        lines += ['', '[source]'] + self._backend(self.src, self.src_schemes,
                                                  'source')
        lines += ['', '[destination]'] + self._backend(
            self.dst, self.dst_schemes, 'destination')
        lines += ['', '[store]', 'url = %s' % self.store_url
                  if self.store_url else 'path = %s' % self.store_path,
                  '', '[policy]', 'on_first_login = %s' % self.policy,
                  'hold_max_seconds = %d' % self.hold_max,
                  'flip_quiet = %ds' % self.flip_quiet,
                  'connections = %d' % self.connections]
        for d, p in self.domains.items():
            lines.append('domain.%s = %s' % (d, p))
        lines += ['', '[control]', 'socket = %s' % self.socket_path]
        if self.extra_conf:
            lines += ['', self.extra_conf]
        return '\n'.join(lines) + '\n'

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout=15.0):
        if self.proc is not None:
            raise dc.HarnessError('mailshiftd already running')
        if not os.access(self.binary, os.X_OK):
            raise dc.HarnessError('%s is missing: build it with `make -C %s '
                                  'all`' % (self.binary, REPO))
        os.makedirs(self.root_dir, exist_ok=True)
        ports = dc._free_ports(7 if self.smtp or self.submission else 4)
        self.imap_port, self.pop3_port = ports[0], ports[1]
        if self.fixed_ports[0] is not None:
            self.imap_port = self.fixed_ports[0]
        if self.fixed_ports[1] is not None:
            self.pop3_port = self.fixed_ports[1]
        if self.smtp:
            self.smtp_port = ports[4]
        if self.submission:
            self.submission_port = ports[5]
            if self.tls_ca is not None:
                self.submissions_port = ports[6]
        if self.tls_ca is not None:
            self.imaps_port, self.pop3s_port = ports[2], ports[3]
            if self.cert_file is None:
                name = 'mailshiftd-%d-%d' % (os.getpid(), id(self) % 100000)
                self.cert_file, self.key_file = self.tls_ca.issue(
                    name, ('127.0.0.1', 'localhost'))
                os.chmod(self.key_file, 0o600)
        text = self.config_text()
        with open(self.config_path, 'w') as f:
            f.write(text)
        # (a subclass's own config may name another store)
        catch_up = self.await_catch_up and self.store_url in text
        self.killed = False
        log = open(self.log_path, 'ab')
        log_from = log.tell()
        try:
            prefix = []
            if self.netns is not None:
                import netns
                prefix = netns.exec_prefix(self.netns)
            fds = ()
            if self.activation is not None:
                prefix += self.activation.launcher()
                fds = self.activation.fds()
            self.proc = subprocess.Popen(
                prefix + [self.binary, '-c', self.config_path, '-f', '-v'],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=dict(os.environ, **self.env),
                pass_fds=fds)
        finally:
            log.close()
        # What it writes, for the session's leak check (its config is ours).
        leakcheck.CHECK.register_files(
            'mailshiftd in %s' % self.root_dir,
            [self.log_path, self.store_path], dirs=[self.root_dir],
            exclude=[self.config_path], pid=self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise dc.HarnessError('mailshiftd exited at start (rc %s):\n%s'
                                      % (rc, self.log_tail()))
            if os.path.exists(self.socket_path) and self._greets() and \
                    (not catch_up or
                     b'cluster: caught up' in self._log_since(log_from)):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise dc.HarnessError('mailshiftd not ready within %.0f s:\n%s'
                                      % (timeout, self.log_tail()))
            time.sleep(0.02)

    def _connect_local(self, port, timeout=2):
        """A TCP connection to one of the daemon's listeners, made where
        the daemon runs (its namespace's loopback for a wildcard listen
        host)."""
        host = self.listen_host
        if host in ('0.0.0.0', '::', '[::]'):
            host = '127.0.0.1'
        if self.netns is None:
            return socket.create_connection((host, port), timeout=timeout)
        import netns
        return netns.call_in_netns(self.netns, socket.create_connection,
                                   (host, port), timeout=timeout)

    def _greets(self):
        try:
            with self._connect_local(self.imap_port) as s:
                return first_line(s).startswith(b'* OK')
        except OSError:
            return False

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self, field='VmRSS'):
        """The daemon's resident memory (VmRSS, in kB), or None when it is
        not running. field='VmHWM': its peak, see rss_peak_reset()."""
        try:
            with open('/proc/%d/status' % self.proc.pid) as f:
                for line in f:
                    if line.startswith(field + ':'):
                        return int(line.split()[1])
        except (OSError, AttributeError):
            pass
        return None

    def rss_peak_reset(self):
        """Restarts the daemon's peak resident memory (VmHWM) from its
        VmRSS now (Linux's clear_refs 5): rss_kb('VmHWM') is then the
        highest it reached since, however briefly (no sample can miss
        it)."""
        with open('/proc/%d/clear_refs' % self.proc.pid, 'w') as f:
            f.write('5')

    def stop(self, timeout=10.0):
        """SIGTERM to the daemon's PID; waits up to timeout, then SIGKILL
        (self.killed = True). Returns the exit status (None when it was
        not running)."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            leakcheck.CHECK.sample([p.pid])
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.stack_at_kill = dc.backtrace(p.pid)
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.proc = None
        self.returncode = p.returncode
        return p.returncode

    def wait_crashed(self, timeout=60.0):
        """Waits for a hook build started with MAILSHIFT_CRASH_AT (in env)
        to die at that crash point: killed by SIGKILL, its log naming the
        point. Fails the test otherwise (a daemon still running at the
        deadline is stopped)."""
        point = self.env['MAILSHIFT_CRASH_AT']
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError('mailshiftd never reached crash point %s '
                                 'in %.0f s:\n%s'
                                 % (point, timeout, self.log_tail()))
        self.proc = None
        self.returncode = rc
        if rc != -signal.SIGKILL or crash_line(point) not in self.log_text():
            raise AssertionError('mailshiftd did not die at crash point %s '
                                 '(exit status %s):\n%s'
                                 % (point, rc, self.log_tail()))
        return rc

    def restart_after_crash(self):
        """start() again after wait_crashed(), without the crash point."""
        del self.env['MAILSHIFT_CRASH_AT']
        return self.start()

    def kill9_restart(self):
        """SIGKILL to the daemon's PID (a crash at this very moment), then
        start() again on the same config and store."""
        leakcheck.CHECK.sample([self.proc.pid])
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        return self.start()

    def _log_since(self, offset):
        try:
            with open(self.log_path, 'rb') as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b''

    def log_text(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode(errors='replace')
        except OSError:
            return ''

    def log_tail(self, n=40):
        return '\n'.join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------- control

    def ctl(self, *args, timeout=30, env=None, socket_arg=True):
        """Runs tools/mailshiftctl SUBCOMMAND -s SOCKET ARGS...; returns a
        CtlResult (unpacks as rc, stdout, stderr, json)."""
        args = list(args)
        argv = [self.ctl_binary] + args[:1]
        if socket_arg:
            argv += ['-s', self.socket_path]
        argv += args[1:]
        e = {k: v for k, v in os.environ.items()
             if not k.startswith('MAILSHIFT_')}
        if env:
            e.update(env)
        r = subprocess.run(argv, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, env=e)
        return CtlResult(argv, r.returncode, r.stdout.decode(errors='replace'),
                         r.stderr.decode(errors='replace'),
                         '--json' in args or '-j' in args)

    def wait_capabilities(self, *kinds, timeout=20.0):
        """Waits until the daemon has asked the servers (each configured
        one) for their capabilities for each protocol of kinds ('imap',
        'pop3', 'smtp', 'submission'); returns status's "capabilities"
        object."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.ctl('status', '--json')
            caps = (res.json or {}).get('capabilities') or {}
            if all(caps.get(k) and None not in caps[k].values()
                   for k in kinds):
                return caps
            if time.monotonic() > deadline:
                raise AssertionError('capabilities not asked in %.0f s: %s'
                                     % (timeout, res.describe()))
            time.sleep(0.1)

    def user(self, name):
        """The user's record from `user show NAME --json` (a dict), or
        None when the command fails."""
        res = self.ctl('user', 'show', name, '--json')
        if res.rc != 0 or not isinstance(res.json, dict):
            return None
        u = res.json.get('user')
        return u if isinstance(u, dict) else res.json

    def state(self, name):
        u = self.user(name)
        return u.get('state') if u else None

    def wait_state(self, name, states, timeout=30.0, interval=0.05):
        """Polls until the user's state is one of states; returns the last
        state seen."""
        if isinstance(states, str):
            states = (states,)
        deadline = time.monotonic() + timeout
        st = self.state(name)
        while st not in states and time.monotonic() < deadline:
            time.sleep(interval)
            st = self.state(name)
        return st

