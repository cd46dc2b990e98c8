"""A throwaway PostgreSQL server for tests: Debian's initdb/pg_ctl
(/usr/lib/postgresql/15/bin) make an unprivileged cluster in a temporary
directory, listening on a free loopback port, removed by stop().

    pg = Postgres(root_dir).start()
    url = pg.create_db('m1')        # 'postgresql://mailshift@127.0.0.1:P/m1'
    env = pg.env()                  # {'PGPASSFILE': ...} for the client
    pg.psql('m1', 'SELECT count(*) FROM users')   # rows as lists of str
    pg.stop()

The server refuses to run as root: run as root, the harness runs it (initdb,
pg_ctl, postgres) as nobody (65534) with setpriv, in a data directory that
user owns. Over TCP it asks the role `mailshift` for a password
(scram-sha-256), which mailshift reads from a password file (pgpass(5)) the
harness writes, mode 0600 and owned by whoever reads it (libpq ignores a
group- or world-readable one). The harness itself speaks to the server as
its superuser over a UNIX socket in the cluster's directory (trust), to
create databases and compare rows. ssl=True turns TLS on with a server
certificate from a dovecot.TestCA (tls_ca), so a URL can ask for
sslmode=verify-full, and refuses the role a connection without TLS.
"""

import os
import secrets
import shutil
import subprocess

import dovecot
import leakcheck

PG_BIN = os.environ.get('MS_PG_BIN', '/usr/lib/postgresql/15/bin')
RUN_UID = 65534
RUN_GID = 65534
ROLE = 'mailshift'


class Postgres:
    def __init__(self, root_dir, ssl=False, tls_ca=None):
        self.root_dir = root_dir
        self.data_dir = os.path.join(root_dir, 'data')
        self.sock_dir = os.path.join(root_dir, 'run')
        self.log_path = os.path.join(root_dir, 'postgres.log')
        self.passfile = os.path.join(root_dir, 'pgpass')
        self.password = secrets.token_urlsafe(18)
        leakcheck.CHECK.secret(self.password, 'postgres role ' + ROLE)
        self.ssl = ssl
        self.tls_ca = tls_ca
        self.port = None
        self.running = False

    # --------------------------------------------------------- as the owner

    def _as_owner(self):
        if os.geteuid() != 0:
            return []
        return ['setpriv', '--reuid=%d' % RUN_UID, '--regid=%d' % RUN_GID,
                '--clear-groups', '--']

    def _chown(self, path):
        if os.geteuid() == 0:
            os.chown(path, RUN_UID, RUN_GID)

    def _run(self, args, **kw):
        r = subprocess.run(self._as_owner() + args, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, **kw)
        if r.returncode != 0:
            raise dovecot.HarnessError('%s failed (rc %d): %s%s\n%s'
                                       % (args[0], r.returncode, r.stdout,
                                          r.stderr, self.log_tail()))
        return r

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout=60.0):
        """Starts the server; on failure what was made is removed."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout):
        os.makedirs(self.root_dir, exist_ok=True)
        for d in (self.data_dir, self.sock_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
            self._chown(d)
        self._run([os.path.join(PG_BIN, 'initdb'), '-D', self.data_dir,
                   '-U', 'postgres', '-A', 'trust', '-E', 'SQL_ASCII',
                   '--locale=C', '--no-sync'])
        self.port = dovecot.free_port()
        conf = [
            "listen_addresses = '127.0.0.1'",
            'port = %d' % self.port,
            "unix_socket_directories = '%s'" % self.sock_dir,
            'fsync = off', 'synchronous_commit = on',
            'max_connections = 60', 'shared_buffers = 16MB',
            "password_encryption = 'scram-sha-256'",
        ]
        if self.ssl:
            conf += self._ssl_conf()
        with open(os.path.join(self.data_dir, 'postgresql.auto.conf'),
                  'a') as f:
            f.write('\n'.join(conf) + '\n')
        with open(os.path.join(self.data_dir, 'pg_hba.conf'), 'w') as f:
            # with ssl, TCP without TLS is refused
            f.write('local all postgres trust\n'
                    'local all %s scram-sha-256\n'
                    '%s all %s 127.0.0.1/32 scram-sha-256\n'
                    % (ROLE, 'hostssl' if self.ssl else 'host', ROLE))
        open(self.log_path, 'a').close()
        self._chown(self.log_path)
        self._run([os.path.join(PG_BIN, 'pg_ctl'), '-D', self.data_dir,
                   '-l', self.log_path, '-w', '-t', str(int(timeout)),
                   'start'])
        self.running = True
        # what the store's rows became on disk (the WAL holds every one
        # written) and the server's log, for the session's leak check:
        # no user's password reaches the store on this engine either
        leakcheck.CHECK.register_files(
            'postgres in %s' % self.root_dir, [self.log_path],
            dirs=[os.path.join(self.data_dir, 'pg_wal')])
        self.admin('postgres', "CREATE ROLE %s LOGIN PASSWORD '%s'"
                   % (ROLE, self.password))
        self.write_passfile(self.passfile)
        return self

    def _ssl_conf(self):
        cert, key = self.tls_ca.issue('postgres')
        for src, name in ((cert, 'server.crt'), (key, 'server.key')):
            dst = os.path.join(self.data_dir, name)
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            self._chown(dst)
        return ["ssl = on", "ssl_cert_file = 'server.crt'",
                "ssl_key_file = 'server.key'"]

    def stop(self):
        if self.running:
            subprocess.run(self._as_owner() +
                           [os.path.join(PG_BIN, 'pg_ctl'), '-D',
                            self.data_dir, '-m', 'immediate', '-w', 'stop'],
                           stdin=subprocess.DEVNULL, capture_output=True)
            self.running = False
        dovecot.remove_test_root(self.root_dir)

    def restart(self, timeout=60.0):
        self._run([os.path.join(PG_BIN, 'pg_ctl'), '-D', self.data_dir,
                   '-l', self.log_path, '-w', '-t', str(int(timeout)),
                   '-m', 'fast', 'restart'])

    def log_tail(self, n=30):
        try:
            with open(self.log_path, errors='replace') as f:
                return ''.join(f.readlines()[-n:])
        except OSError:
            return ''

    # ---------------------------------------------------------------- using

    def write_passfile(self, path, uid=None):
        """A pgpass(5) file for the role at path, mode 0600, owned by uid
        (default: whoever runs the harness)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            # (libpq matches a UNIX socket's connection by its directory)
            for host in ('127.0.0.1', self.sock_dir):
                f.write('%s:%d:*:%s:%s\n' % (host, self.port, ROLE,
                                              self.password))
        if uid is not None:
            os.chown(path, uid, -1)
        return path

    def env(self, passfile=None):
        return {'PGPASSFILE': passfile or self.passfile}

    def url(self, db, **params):
        q = '&'.join('%s=%s' % kv for kv in sorted(params.items()))
        return 'postgresql://%s@127.0.0.1:%d/%s%s' % (ROLE, self.port, db,
                                                     '?' + q if q else '')

    def socket_url(self, db):
        """The URL of db over the server's UNIX socket (reached from any
        network namespace)."""
        return 'postgresql://%s@/%s?host=%s&port=%d' % (ROLE, db,
                                                        self.sock_dir,
                                                        self.port)

    def create_db(self, name, **params):
        """A new database owned by the role (SQL_ASCII, C collation, as
        docs/deployment.md asks); its URL."""
        self.admin('postgres', 'CREATE DATABASE %s OWNER %s ENCODING '
                   "'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE "
                   'template0' % (name, ROLE))
        return self.url(name, **params)

    def admin(self, db, sql):
        """Runs sql as the superuser; its rows as lists of str."""
        return self.psql(db, sql, user='postgres')

    def psql(self, db, sql, user='postgres', null=''):
        """Rows as lists of str; an SQL NULL reads as null. The SQL goes
        on stdin: CREATE ROLE's password must not be in an argv."""
        r = subprocess.run([os.path.join(PG_BIN, 'psql'), '-X', '-q', '-A',
                            '-t', '-F', '\x1f', '-P', 'null=' + null,
                            '-v', 'ON_ERROR_STOP=1',
                            '-h', self.sock_dir, '-p', str(self.port),
                            '-U', user, '-d', db, '-f', '-'],
                           input=sql, capture_output=True,
                           text=True, errors='surrogateescape')
        if r.returncode != 0:
            raise dovecot.HarnessError('psql %s: %s' % (sql, r.stderr))
        return [line.split('\x1f') for line in r.stdout.splitlines()]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()



def main(argv):
    """postgres.py CMD...: runs CMD with a fresh server's database in
    MS_TEST_STORE_URL (and its password file in PGPASSFILE), then removes
    the server: how `make unit-pg` runs the store's unit tests."""
    pg = Postgres(dovecot.make_test_root(prefix='mailshift-pg-'))
    try:
        pg.start()
        env = dict(os.environ, MS_TEST_STORE_URL=pg.create_db('unit'),
                   **pg.env())
        return subprocess.run(argv, env=env).returncode
    finally:
        pg.stop()


if __name__ == '__main__':
    import sys
    sys.exit(main(sys.argv[1:]))
