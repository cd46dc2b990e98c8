"""Independent Dovecot instances for tests and benchmarks.

Each Dovecot runs from its own config file with its own base_dir, state_dir,
instance_name, log file, mail directory and loopback ports, so several can
run side by side. Dovecot itself runs as
the current user (root); mail is stored as nobody/nogroup (65534).

    ca = TestCA('/tmp/x/ca')
    src = Dovecot('/tmp/x/src', 'src', users={'alice': 'pw'}, tls_ca=ca)
    src.start()
    m = src.imap('alice')          # logged-in imaplib.IMAP4
    src.url('imaps')               # 'imaps://127.0.0.1:PORT'
    src.stop()

Every directory given as root_dir must be reachable by uid 65534 (every
ancestor needs o+x): use make_test_root() rather than pytest's tmp_path,
whose /tmp/pytest-of-root is 0700.

netns='NAME' runs the instance inside that network namespace (made with
`ip netns add`, see netns.py): started as `ip netns exec NAME dovecot -c
CONF`, its loopback listeners are the namespace's 127.0.0.1, and the
readiness check and the imap()/pop3() helpers open their sockets inside it.
doveadm talks over UNIX sockets and works from anywhere.

doveadm_http=True also opens doveadm's HTTP API on a loopback port with a
random API key: doveadm_url() is its URL and doveadm_key_file a root-only
file holding the key (what mailshift's doveadm_key_file names).
"""

import grp
import imaplib
import math
import os
import poplib
import random
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time

import leakcheck

MAIL_UID = 65534
MAIL_GID = 65534
DOVECOT = shutil.which('dovecot') or '/usr/sbin/dovecot'
DOVEADM = shutil.which('doveadm') or '/usr/bin/doveadm'
OPENSSL = shutil.which('openssl') or '/usr/bin/openssl'


class HarnessError(RuntimeError):
    pass


def make_test_root(prefix='mailshift-test-', parent=None):
    """Creates a fresh directory (mode 0755) usable as a root_dir: every
    ancestor is traversable by others. The caller removes it
    (remove_test_root)."""
    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(d, 0o755)
    _check_traversable(d)
    return d


def remove_test_root(d):
    leakcheck.CHECK.before_remove(d)
    shutil.rmtree(d, ignore_errors=True)


def _check_traversable(path):
    p = os.path.abspath(path)
    while True:
        st = os.stat(p)
        if not st.st_mode & stat.S_IXOTH:
            raise HarnessError(
                '%s is not traversable by uid %d (mode %o): Dovecot cannot '
                'store mail below it; use dovecot.make_test_root()'
                % (p, MAIL_UID, stat.S_IMODE(st.st_mode)))
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def _listen_range():
    """Where the harness picks ports for servers to listen on: below the
    kernel's range for outgoing connections' local ports, so that no
    client's connection can take a port between its pick and the
    server's bind (seen in a loaded run: Dovecot's pop3-login refused with
    "Address already in use"). None: no room below it."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (10000, low - 1) if low > 12000 else None


LISTEN_RANGE = _listen_range()


def _bound():
    """A socket bound to a free port of 127.0.0.1 (not listening)."""
    for _ in range(500 if LISTEN_RANGE else 0):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(('127.0.0.1', random.randint(*LISTEN_RANGE)))
            return s
        except OSError:
            s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(('127.0.0.1', 0))
    return s


def free_port():
    """A TCP port free on 127.0.0.1 right now (bound, then closed), below
    the range of outgoing connections' local ports."""
    s = _bound()
    try:
        return s.getsockname()[1]
    finally:
        s.close()


def _free_ports(n):
    # Hold all sockets open until every port is picked, so they differ.
    socks = []
    try:
        for _ in range(n):
            socks.append(_bound())
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _quote(s):
    return '"' + s.replace('\\', '\\\\').replace('"', '\\"') + '"'


class TestCA:
    """A throw-away certificate authority (openssl CLI) with one server
    certificate for 127.0.0.1 and localhost.

    Attributes: dir, ca_file, ca_key_file, cert_file, key_file."""

    __test__ = False    # not a pytest test class

    def __init__(self, dir, cn='mailshift test CA',
                 server_names=('127.0.0.1', 'localhost')):
        self.dir = os.path.abspath(dir)
        os.makedirs(self.dir, exist_ok=True)
        self.ca_file = os.path.join(self.dir, 'ca.pem')
        self.ca_key_file = os.path.join(self.dir, 'ca.key')
        self._run(['req', '-x509', '-newkey', 'ec', '-pkeyopt',
                   'ec_paramgen_curve:prime256v1', '-nodes',
                   '-keyout', self.ca_key_file, '-out', self.ca_file,
                   '-days', '3650', '-subj', '/CN=' + cn,
                   '-addext', 'basicConstraints=critical,CA:TRUE',
                   '-addext', 'keyUsage=critical,keyCertSign,cRLSign'])
        self._serial = 1
        self.cert_file, self.key_file = self.issue('server', server_names)

    def _run(self, args):
        r = subprocess.run([OPENSSL] + args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise HarnessError('openssl %s failed: %s'
                               % (args[0], r.stderr.decode(errors='replace')))

    def issue(self, name, names=('127.0.0.1', 'localhost')):
        """Issues a server certificate for names (IP addresses or DNS names);
        returns (cert_file, key_file)."""
        key = os.path.join(self.dir, name + '.key')
        csr = os.path.join(self.dir, name + '.csr')
        crt = os.path.join(self.dir, name + '.pem')
        ext = os.path.join(self.dir, name + '.ext')
        san = []
        for n in names:
            try:
                socket.inet_pton(socket.AF_INET, n)
                san.append('IP:' + n)
            except OSError:
                san.append('DNS:' + n)
        with open(ext, 'w') as f:
            f.write('basicConstraints=CA:FALSE\n'
                    'keyUsage=critical,digitalSignature,keyEncipherment\n'
                    'extendedKeyUsage=serverAuth\n'
                    'subjectAltName=%s\n' % ','.join(san))
        self._run(['req', '-newkey', 'ec', '-pkeyopt',
                   'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key,
                   '-out', csr, '-subj', '/CN=' + names[0]])
        self._serial += 1
        self._run(['x509', '-req', '-in', csr, '-CA', self.ca_file,
                   '-CAkey', self.ca_key_file, '-set_serial',
                   str(self._serial), '-days', '3650', '-out', crt,
                   '-extfile', ext])
        os.chmod(key, 0o600)
        return crt, key

    def ssl_context(self):
        """A client SSLContext trusting this CA."""
        return ssl.create_default_context(cafile=self.ca_file)

    def server_cert(self, name, names):
        """Another server certificate from this CA (for names): an object
        usable as Dovecot(tls_ca=...) in place of the CA itself, e.g. to
        test host name verification."""
        cert, key = self.issue(name, names)
        return ServerCert(self, cert, key)


class ServerCert:
    """A certificate/key pair of a TestCA, with the CA's ca_file."""

    def __init__(self, ca, cert_file, key_file):
        self.ca = ca
        self.ca_file = ca.ca_file
        self.cert_file = cert_file
        self.key_file = key_file

    def ssl_context(self):
        return self.ca.ssl_context()


class Dovecot:
    """One Dovecot instance. See the module docstring."""

    _serial = 0

    def __init__(self, root_dir, name, users=None, separator='.',
                 layout='maildir++', special_use=None, tls_ca=None, pop3=True,
                 performance=False, master_user=None, extra_conf='',
                 listescape=False, mail_plugins='', fsync=False,
                 list_index=False, netns=None, prefix='',
                 doveadm_http=False):
        if layout not in ('maildir++', 'fs'):
            raise ValueError('layout must be maildir++ or fs')
        self.root_dir = os.path.abspath(root_dir)
        self.name = name
        self.users = dict(users or {})
        self.separator = separator
        self.layout = layout
        self.special_use = dict(special_use or {})
        self.tls_ca = tls_ca
        self.pop3_enabled = pop3
        self.performance = performance
        self.master_user = master_user
        self.extra_conf = extra_conf
        self.listescape = listescape
        self.mail_plugins = mail_plugins
        self.fsync = fsync
        self.list_index = list_index
        self.netns = netns
        # The personal namespace's prefix: 'INBOX.' makes a Courier-style
        # server (every folder below INBOX).
        self.prefix = prefix
        self.doveadm_http = doveadm_http
        self.doveadm_port = None
        self.doveadm_key = None
        if doveadm_http:
            import secrets
            self.doveadm_key = secrets.token_hex(16)
            self._secret_key()
        for u, pw in self.users.items():
            self._secret(u, pw)
        if master_user:
            self._secret(master_user[0], master_user[1], 'master (admin) ')
        self.base_dir = os.path.join(self.root_dir, 'run')
        self.state_dir = os.path.join(self.root_dir, 'state')
        self.mail_dir = os.path.join(self.root_dir, 'mail')
        self.log_path = os.path.join(self.root_dir, 'dovecot.log')
        self.config_path = os.path.join(self.root_dir, 'dovecot.conf')
        self.passwd_path = os.path.join(self.root_dir, 'passwd')
        self.master_passwd_path = os.path.join(self.root_dir, 'master-passwd')
        self.doveadm_key_file = os.path.join(self.root_dir, 'doveadm.key')
        Dovecot._serial += 1
        self.instance_name = 'mstest-%s-%d-%d' % (name, os.getpid(),
                                                  Dovecot._serial)
        self.imap_port = self.imaps_port = None
        self.pop3_port = self.pop3s_port = None
        self.pid = None

    def _secret_key(self):
        leakcheck.CHECK.secret(self.doveadm_key, 'the doveadm API key of '
                               'Dovecot %s' % self.name)

    def _secret(self, user, pw, kind=''):
        leakcheck.CHECK.secret(pw, 'the %spassword of %s on Dovecot %s'
                               % (kind, user, self.name), user=user)

    # ---------------------------------------------------------------- config

    def _mail_location(self):
        loc = 'maildir:%s/%%u' % self.mail_dir
        if self.layout == 'fs':
            loc += ':LAYOUT=fs'
        return loc

    def _write_passwd(self):
        tmp = self.passwd_path + '.tmp'
        with open(tmp, 'w') as f:
            for u, pw in self.users.items():
                f.write('%s:{PLAIN}%s::::::\n' % (u, pw))
        _auth_readable(tmp)
        # A rename gives the file a new inode, so a running Dovecot
        # notices the change at once (it stats the file per lookup).
        os.rename(tmp, self.passwd_path)

    def _config(self):
        tls = self.tls_ca is not None
        lines = [
            '# generated by tests/lib/dovecot.py',
            'instance_name = %s' % self.instance_name,
            'base_dir = %s' % self.base_dir,
            'state_dir = %s' % self.state_dir,
            'log_path = %s' % self.log_path,
            'info_log_path = %s' % self.log_path,
            'debug_log_path = %s' % self.log_path,
            'listen = 127.0.0.1',
            'protocols = imap%s' % (' pop3' if self.pop3_enabled else ''),
            'disable_plaintext_auth = no',
            'auth_mechanisms = plain login',
            'auth_failure_delay = 0',
            'mail_max_userip_connections = 1000',
            'mail_location = %s' % self._mail_location(),
            'first_valid_uid = %d' % MAIL_UID,
            'last_valid_uid = %d' % MAIL_UID,
            'first_valid_gid = %d' % MAIL_GID,
            'last_valid_gid = %d' % MAIL_GID,
            'mail_uid = %d' % MAIL_UID,
            'mail_gid = %d' % MAIL_GID,
            'pop3_uidl_format = %08Xu%08Xv',
            'mail_fsync = %s' % ('optimized' if self.fsync else 'never'),
            # Dovecot 2.3.19 with the mailbox list index sometimes panics
            # when several sessions of one user create/open folders at once
            # (fcntl EDEADLK on dovecot.list.index.log): off by default.
            'mailbox_list_index = %s' % ('yes' if self.list_index else 'no'),
        ]
        plugins = self.mail_plugins.split()
        if self.listescape and 'listescape' not in plugins:
            plugins.append('listescape')
        lines.append('mail_plugins = %s' % ' '.join(plugins))
        if tls:
            lines += [
                'ssl = yes',
                'ssl_cert = <%s' % self.tls_ca.cert_file,
                'ssl_key = <%s' % self.tls_ca.key_file,
            ]
            if os.path.exists('/usr/share/dovecot/dh.pem'):
                lines.append('ssl_dh = </usr/share/dovecot/dh.pem')
        else:
            lines.append('ssl = no')
        if self.master_user:
            lines += [
                'auth_master_user_separator = *',
                'passdb {',
                '  driver = passwd-file',
                '  master = yes',
                '  pass = yes',
                '  args = scheme=PLAIN %s' % self.master_passwd_path,
                '}',
            ]
        lines += [
            'passdb {',
            '  driver = passwd-file',
            '  args = scheme=PLAIN username_format=%%u %s' % self.passwd_path,
            '}',
            'userdb {',
            '  driver = static',
            '  args = uid=%d gid=%d home=%s/%%u allow_all_users=yes'
            % (MAIL_UID, MAIL_GID, self.mail_dir),
            '}',
            'namespace inbox {',
            '  inbox = yes',
            '  prefix = %s' % self.prefix,
            '  separator = %s' % self.separator,
        ]
        for folder, use in self.special_use.items():
            lines.append('  mailbox %s {' % _quote(folder))
            if use:
                lines.append('    special_use = %s' % use)
            lines.append('    auto = subscribe')
            lines.append('  }')
        lines.append('}')
        def login_service(proto, port, tls_port):
            out = [
                'service %s-login {' % proto,
                '  inet_listener %s {' % proto,
                '    address = 127.0.0.1',
                '    port = %d' % port,
                '  }',
                '  inet_listener %ss {' % proto,
                '    address = 127.0.0.1',
                '    port = %d' % (tls_port or 0),
                '    ssl = yes' if tls else '',
                '  }',
            ]
            if self.performance:
                out += ['  service_count = 0', '  process_min_avail = 2',
                        '  client_limit = 10000']
            return out + ['}']

        lines += login_service('imap', self.imap_port, self.imaps_port)
        if self.pop3_enabled:
            lines += login_service('pop3', self.pop3_port, self.pop3s_port)
        if self.performance:
            lines += [
                'default_client_limit = 10000',
                'default_process_limit = 1000',
                'service imap {', '  service_count = 0',
                '  client_limit = 50', '  process_limit = 400', '}',
                'service pop3 {', '  service_count = 0',
                '  client_limit = 50', '  process_limit = 400', '}',
                'service auth {', '  client_limit = 20000', '}',
                'service anvil {', '  client_limit = 20000', '}',
                'service stats {', '  client_limit = 20000', '}',
            ]
        if self.doveadm_http:
            lines += [
                'doveadm_api_key = %s' % self.doveadm_key,
                'service doveadm {',
                '  inet_listener http {',
                '    address = 127.0.0.1',
                '    port = %d' % self.doveadm_port,
                '  }',
            ]
            if self.performance:
                # One doveadm process for many requests: by default each
                # request starts its own (~20 ms of CPU).
                lines += ['  service_count = 0', '  process_min_avail = 1']
            lines.append('}')
        if self.extra_conf:
            lines.append(self.extra_conf)
        return '\n'.join(l for l in lines if l != '') + '\n'

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout=15.0):
        if self.pid is not None:
            raise HarnessError('%s: already running' % self.name)
        _check_traversable(os.path.dirname(self.root_dir))
        os.makedirs(self.root_dir, exist_ok=True)
        os.chmod(self.root_dir, 0o755)
        os.makedirs(self.state_dir, exist_ok=True)
        if not os.path.isdir(self.mail_dir):
            os.makedirs(self.mail_dir)
            os.chown(self.mail_dir, MAIL_UID, MAIL_GID)
        ports = _free_ports(5)
        self.imap_port, self.pop3_port = ports[0], ports[1]
        if self.doveadm_http:
            self.doveadm_port = ports[4]
            fd = os.open(self.doveadm_key_file,
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, 'w') as f:
                f.write(self.doveadm_key + '\n')
        if self.tls_ca is not None:
            self.imaps_port = ports[2]
            if self.pop3_enabled:
                self.pop3s_port = ports[3]
        if not self.pop3_enabled:
            self.pop3_port = None
        self._write_passwd()
        if self.master_user:
            with open(self.master_passwd_path, 'w') as f:
                f.write('%s:{PLAIN}%s\n' % self.master_user)
            _auth_readable(self.master_passwd_path)
        with open(self.config_path, 'w') as f:
            f.write(self._config())
        self._drop_stale_pidfile()
        with open(self.log_path, 'ab') as log:
            r = subprocess.run(self._netns_prefix() +
                               [DOVECOT, '-c', self.config_path],
                               stdin=subprocess.DEVNULL, stdout=log,
                               stderr=log)
        if r.returncode != 0:
            raise HarnessError('%s: dovecot failed to start (rc %d):\n%s'
                               % (self.name, r.returncode, self.log_tail()))
        deadline = time.monotonic() + timeout
        pidfile = os.path.join(self.base_dir, 'master.pid')
        while True:
            try:
                with open(pidfile) as f:
                    self.pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise HarnessError('%s: no master.pid:\n%s'
                                       % (self.name, self.log_tail()))
                time.sleep(0.02)
        while True:
            try:
                self._wait_greeting(self.imap_port, b'* OK')
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise HarnessError('%s: IMAP port %d never greeted:\n%s'
                                       % (self.name, self.imap_port,
                                          self.log_tail()))
                time.sleep(0.02)
        return self

    def _drop_stale_pidfile(self):
        """A master stopped by stop() is gone, but it daemonized: until
        PID 1 reaps it, it is a zombie, and Dovecot's own "already
        running" check (kill(pid, 0) on master.pid) still sees it. A pid
        file naming no live process is stale: remove it."""
        pidfile = os.path.join(self.base_dir, 'master.pid')
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        if not _alive(pid):
            os.unlink(pidfile)

    def _netns_prefix(self):
        if self.netns is None:
            return []
        import netns
        return netns.exec_prefix(self.netns)

    def _in_netns(self, fn, *args, **kwargs):
        """fn(...) with its sockets made in this instance's namespace."""
        if self.netns is None:
            return fn(*args, **kwargs)
        import netns
        return netns.call_in_netns(self.netns, fn, *args, **kwargs)

    def _wait_greeting(self, port, prefix):
        with self._in_netns(socket.create_connection, ('127.0.0.1', port),
                            timeout=5) as s:
            data = b''
            while b'\n' not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError('closed before greeting')
                data += chunk
            if not data.startswith(prefix):
                raise ConnectionError('bad greeting %r' % data)

    def stop(self, timeout=15.0):
        """TERM to the master (PID from base_dir/master.pid) and wait until
        it and all its children are gone (KILL by PID after timeout)."""
        pid = self.pid
        if pid is None:
            pidfile = os.path.join(self.base_dir, 'master.pid')
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                pid = None
        self.pid = None
        if pid is not None and not _is_dovecot_master(pid, self.config_path):
            pid = None        # gone, or a stale pid file
        # TERM to the master and all its processes at once: the master
        # alone takes ~1 s to exit, and mail processes with a client still
        # connected outlive it by ~10 s. They are all ours (by PID): the
        # master's descendants and every process titled with this
        # instance's name (also when the master is already gone).
        procs = set(self._own_processes())
        if pid is not None:
            procs |= {pid} | set(_descendants(pid))
        if not procs:
            return
        procs = sorted(procs)
        # The master sometimes sleeps seconds in its shutdown after all its
        # children are gone: KILL it 0.3 s after the last child went.
        _terminate(procs, grace=timeout, master=pid, master_grace=0.3)
        # Anything forked meanwhile.
        late = [p for p in self._own_processes() if p not in procs]
        if late:
            _terminate(late, grace=3.0)

    def _own_processes(self):
        """PIDs of live processes titled "dovecot-INSTANCE/..." (Dovecot's
        process titles carry the instance name)."""
        prefix = ('dovecot-%s/' % self.instance_name).encode()
        out = []
        for d in os.listdir('/proc'):
            if not d.isdigit():
                continue
            try:
                with open('/proc/%s/cmdline' % d, 'rb') as f:
                    if f.read(len(prefix)) == prefix:
                        out.append(int(d))
            except OSError:
                continue
        return out

    def restart(self):
        """Stops and starts again (new ports)."""
        self.stop()
        return self.start()

    @property
    def running(self):
        return self.pid is not None and _alive(self.pid)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n=40):
        try:
            with open(self.log_path, 'rb') as f:
                lines = f.read().decode(errors='replace').splitlines()
            return '\n'.join(lines[-n:])
        except OSError:
            return '(no log)'

    # --------------------------------------------------------------- access

    def url(self, scheme='imap'):
        port = {
            'imap': self.imap_port, 'imap+starttls': self.imap_port,
            'imaps': self.imaps_port, 'pop3': self.pop3_port,
            'pop3+starttls': self.pop3_port, 'pop3s': self.pop3s_port,
        }[scheme]
        if port is None:
            raise HarnessError('%s: no %s listener' % (self.name, scheme))
        return '%s://127.0.0.1:%d' % (scheme, port)

    def doveadm_url(self):
        """The doveadm HTTP API's URL (doveadm_http=True)."""
        if self.doveadm_port is None:
            raise HarnessError('%s: no doveadm HTTP listener' % self.name)
        return 'http://127.0.0.1:%d/doveadm/v1' % self.doveadm_port

    def password(self, user):
        return self.users[user]

    def imap(self, user, password=None, tls=False, timeout=60):
        """A logged-in imaplib.IMAP4 (IMAP4_SSL with tls=True)."""
        if tls:
            m = self._in_netns(imaplib.IMAP4_SSL, '127.0.0.1',
                               self.imaps_port,
                               ssl_context=self.tls_ca.ssl_context(),
                               timeout=timeout)
        else:
            m = self._in_netns(imaplib.IMAP4, '127.0.0.1', self.imap_port,
                               timeout=timeout)
        m.login(user, self.users[user] if password is None else password)
        return m

    def pop3(self, user, password=None):
        p = self._in_netns(poplib.POP3, '127.0.0.1', self.pop3_port,
                           timeout=30)
        p.user(user)
        p.pass_(self.users[user] if password is None else password)
        return p

    def add_user(self, user, pw):
        """Adds (or changes) a user; works while the server runs."""
        self.users[user] = pw
        self._secret(user, pw)
        if os.path.isdir(self.root_dir):
            self._write_passwd()
            if self.pid is not None:
                # Dovecot's passwd-file driver re-stats the file at most once
                # per second (by its ioloop clock): a lookup in a later second
                # sees the change.
                now = time.time()
                time.sleep(math.ceil(now) - now + 0.05)

    def maildir(self, user):
        """The user's maildir (owned by 65534)."""
        return os.path.join(self.mail_dir, user)

    def folder_dir(self, user, folder):
        """The directory of folder (a name in this server's separator,
        mUTF-7) inside the user's maildir."""
        base = self.maildir(user)
        if folder.upper() == 'INBOX':
            return base       # Maildir's INBOX is its root, in either layout
        if self.layout == 'maildir++':
            return os.path.join(base, '.' + folder)
        return os.path.join(base, *folder.split(self.separator))

    def doveadm(self, *args, check=True):
        """Runs doveadm against this instance; returns CompletedProcess."""
        r = subprocess.run([DOVEADM, '-c', self.config_path] + list(args),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        if check and r.returncode != 0:
            raise HarnessError('doveadm %s: rc %d: %s'
                               % (' '.join(args), r.returncode,
                                  r.stderr.decode(errors='replace')))
        return r


def _auth_readable(path):
    # Dovecot's auth process runs as the 'dovecot' user: root:dovecot 0640.
    try:
        gid = grp.getgrnam('dovecot').gr_gid
    except KeyError:
        os.chmod(path, 0o644)
        return
    os.chown(path, 0, gid)
    os.chmod(path, 0o640)


def _is_dovecot_master(pid, config_path):
    """pid is alive and is `dovecot -c config_path`."""
    if not _alive(pid):
        return False
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = f.read().split(b'\0')
    except OSError:
        return False
    return config_path.encode() in argv


def _terminate(pids, grace=3.0, master=None, master_grace=None):
    """TERM to each live pid, KILL those still alive after grace. With
    master: KILL it master_grace seconds after all the others are gone."""
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
    start = time.monotonic()
    others_gone = None
    while True:
        left = [p for p in pids if _alive(p)]
        if not left:
            return
        now = time.monotonic()
        if master is not None and left == [master]:
            if others_gone is None:
                others_gone = now
            if now - others_gone > master_grace:
                left_kill = left
                break
        if now - start > grace:
            left_kill = left
            break
        time.sleep(0.02)
    for p in left_kill:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2
    while any(_alive(p) for p in left_kill) and time.monotonic() < deadline:
        time.sleep(0.02)


def _descendants(pid):
    """PIDs of all live descendants of pid (from /proc)."""
    parent = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            parent[int(d)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p:
                out.append(c)
                todo.append(c)
    return out


def _alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        return state != 'Z'
    except (OSError, IndexError):
        return False


def backtrace(pid):
    """All threads' stacks of a live process (gdb), for hang reports."""
    gdb = shutil.which('gdb')
    if not gdb:
        return '(no gdb)'
    try:
        r = subprocess.run([gdb, '-p', str(pid), '-batch', '-nx', '-ex',
                            'thread apply all bt'],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        lines = [l for l in r.stdout.decode(errors='replace').splitlines()
                 if l.startswith(('#', 'Thread'))]
        return '\n'.join(lines[:80])
    except (OSError, subprocess.TimeoutExpired) as e:
        return '(gdb failed: %s)' % e
