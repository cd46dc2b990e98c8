"""Fixtures for the mailshiftctl integration tests.

Every test gets its own pair of Dovecot instances (source: '.' separator,
Maildir++ with listescape; destination: '/' separator, LAYOUT=fs) with
differently named special-use folders, both with TLS from a session test
CA and a master user. Mail corpora are built once per session on a
"golden" Dovecot and copied (cp -a) into each test's source maildir.

run_migrate(users, *args, ...) runs tools/mailshiftctl migrate with the
passwords in MAILSHIFT_SOURCE_PASSWORD / MAILSHIFT_DEST_PASSWORD (never in
argv), --json and --store in the test's directory, and returns a Result
(rc, json, stderr, stdout).
"""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))
sys.path.insert(0, HERE)

import corpus  # noqa: E402
import dovecot as dc  # noqa: E402
import gateway as gwlib  # noqa: E402
import leakcheck  # noqa: E402
import mailcheck as mc  # noqa: E402
import storemode  # noqa: E402

MAILSHIFTCTL = os.environ.get('MAILSHIFTCTL') or \
    os.path.join(REPO, 'tools', 'mailshiftctl')

MASTER = ('master', 'Mast3r-Secret-pw')

# Users with a prebuilt corpus (golden maildirs) and their passwords.
# Source and destination passwords differ on purpose.
SRC_USERS = {
    'alice': 'Src-alice-Pw-7f3a', 'bulk': 'Src-bulk-Pw-19cc',
    'popper': 'Src-popper-Pw-aa01', 'u1': 'Src-u1-Pw', 'u2': 'Src-u2-Pw',
    'u3': 'Src-u3-Pw', 'smallie': 'Src-smallie-Pw-55',
}
DST_USERS = {u: pw.replace('Src-', 'Dst-') for u, pw in SRC_USERS.items()}


def stop_all(*servers):
    """Stops several Dovecots in parallel."""
    ts = [threading.Thread(target=s.stop) for s in servers if s is not None]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


# ------------------------------------------------------------ session scope

def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'sqlite_store: the test is about the SQLite file itself '
        'and runs on SQLite whatever MS_TEST_STORE says (tests/lib/'
        'storemode.py)')


@pytest.fixture(autouse=True)
def _store_engine(request):
    """Within a @pytest.mark.sqlite_store test every store is SQLite."""
    storemode.force_sqlite = \
        request.node.get_closest_marker('sqlite_store') is not None
    yield
    storemode.force_sqlite = False


def pytest_sessionstart(session):
    # The leak check watches every mailshiftd and mailshiftctl from here on
    # (in each xdist worker: the controller runs no test).
    if leakcheck.role(session.config) != 'controller':
        leakcheck.CHECK.start()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    leakcheck.worker_done(node)


def pytest_sessionfinish(session, exitstatus):
    # After every fixture's teardown: scans what all of them left.
    leakcheck.pytest_sessionfinish(session)


def _ctl_copy(test_root, binary, name, target):
    """A copy of the mailshiftctl binary in test_root/bin/name."""
    if not os.access(binary, os.X_OK):
        pytest.fail('%s is missing or not executable: build it with '
                    '`make -C %s %s` (make check does)' % (binary, REPO, target),
                    pytrace=False)
    bindir = os.path.join(test_root, 'bin')
    os.makedirs(bindir, exist_ok=True)
    copy = os.path.join(bindir, name)
    for _ in range(50):            # the linker may be writing it right now
        try:
            shutil.copy2(binary, copy)
            if subprocess.run([copy, 'migrate', '--help'],
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode in (0, 2):
                return copy
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail('%s does not run (`migrate --help` fails)' % binary,
                pytrace=False)


@pytest.fixture(scope='session')
def ctl(test_root):
    """A copy of tools/mailshiftctl taken at session start (a rebuild
    while the suite runs then cannot break a test half-way)."""
    return _ctl_copy(test_root, MAILSHIFTCTL, 'mailshiftctl', 'all')


@pytest.fixture(scope='session')
def ctl_hooks(test_root):
    """The same of the build with crash points (MAILSHIFTCTL_HOOKS, make
    hooks): MAILSHIFT_CRASH_AT in its environment kills it there."""
    return _ctl_copy(test_root, gwlib.MAILSHIFTCTL_HOOKS, 'mailshiftctl-hooks',
                     'hooks')


@pytest.fixture(scope='session')
def test_root():
    root = dc.make_test_root(prefix='mailshift-it-')
    yield root
    dc.remove_test_root(root)


@pytest.fixture(scope='session')
def ca(test_root):
    return dc.TestCA(os.path.join(test_root, 'ca'))


@pytest.fixture(scope='session')
def wrong_ca(test_root):
    """Another CA: nothing the servers present is signed by it."""
    return dc.TestCA(os.path.join(test_root, 'wrong-ca'), cn='wrong CA')


def src_server(root, ca, users, name='src', **kw):
    opts = dict(separator='.', layout='maildir++',
                special_use=corpus.SRC_SPECIAL, tls_ca=ca,
                master_user=MASTER, listescape=True)
    opts.update(kw)
    return dc.Dovecot(os.path.join(root, name), name, users=users, **opts)


def dst_server(root, ca, users, name='dst', **kw):
    opts = dict(separator='/', layout='fs', special_use=corpus.DST_SPECIAL,
                tls_ca=ca, master_user=MASTER)
    opts.update(kw)
    return dc.Dovecot(os.path.join(root, name), name, users=users, **opts)


@pytest.fixture(scope='session')
def golden(test_root, ca):
    """Builds every corpus once; returns {user: maildir path}."""
    g = src_server(test_root, ca, SRC_USERS, name='golden')
    g.start()
    try:
        def with_imap(user, fn, *a, **kw):
            m = g.imap(user)
            try:
                return fn(m, *a, **kw)
            finally:
                m.logout()
        with_imap('alice', corpus.fill_standard, big=True)
        with_imap('smallie', corpus.fill_standard, big=False, base=1000)
        with_imap('bulk', corpus.fill_bulk)
        with_imap('popper', corpus.fill_pop3)
        for i, u in enumerate(('u1', 'u2', 'u3')):
            with_imap(u, corpus.fill_small, base=2000 + 100 * i)
    finally:
        g.stop()
    return {u: g.maildir(u) for u in SRC_USERS}


# -------------------------------------------------------------- per test

def server_snapshot(server, user, with_uids=False):
    """mailcheck's snapshot of user's mailbox on a Dovecot of the harness
    (a fresh IMAP login)."""
    m = server.imap(user)
    try:
        return mc.snapshot(m, with_uids=with_uids)
    finally:
        m.logout()


class Pair:
    """A source and a destination Dovecot for one test."""

    def __init__(self, workdir, src, dst):
        self.workdir = workdir
        self.src = src
        self.dst = dst
        # The folder names copies take ([mover] names, migrate --names):
        # 'source' keeps every name; 'destination' puts special-use
        # folders into the destination's folder of the same use.
        self.names = 'source'

    def own_special(self, d):
        """The destination's own special-use folders that names =
        'source' leaves as they were (empty, subscribed: auto =
        subscribe): the keys, given an IMAP connection to it."""
        return mc.special_use(d) if self.names == 'source' else {}

    def specials(self, s, d):
        """(source, destination) special-use maps for mc.map_name, given
        IMAP connections to both: empty ones when names are the
        source's."""
        if self.names != 'destination':
            return {}, {}
        return mc.special_use(s), mc.special_use(d)

    def src_imap(self, user):
        return self.src.imap(user)

    def dst_imap(self, user):
        return self.dst.imap(user)

    def dst_snapshot(self, user, with_uids=False):
        return server_snapshot(self.dst, user, with_uids)

    def snapshots(self, user, dst_user=None):
        """(expected destination snapshot from the source, actual
        destination snapshot)."""
        s = self.src.imap(user)
        d = self.dst.imap(dst_user or user)
        try:
            want = mc.map_snapshot(mc.snapshot(s), '/',
                                   *self.specials(s, d))
            got = mc.snapshot(d)
            for k in self.own_special(d):
                want.setdefault(k, [])
        finally:
            s.logout()
            d.logout()
        return want, got

    def assert_copied(self, user, dst_user=None):
        want, got = self.snapshots(user, dst_user)
        mc.assert_snapshots_equal(want, got)
        return want, got


@pytest.fixture
def workdir(test_root, request):
    d = os.path.join(test_root, 'w-' + request.node.name.replace('/', '_')
                     .replace('[', '_').replace(']', '')[:80])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    os.chmod(d, 0o755)
    yield d
    leakcheck.CHECK.before_remove(d)
    shutil.rmtree(d, ignore_errors=True)


def _install_maildirs(server, golden, users):
    os.makedirs(server.mail_dir, exist_ok=True)
    os.chown(server.mail_dir, dc.MAIL_UID, dc.MAIL_GID)
    for u in users:
        subprocess.run(['cp', '-a', golden[u], server.maildir(u)], check=True)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    # A test that cannot run here fails the run, saying why, unless the
    # run allows skips (MAILSHIFT_ALLOW_SKIP=1): the suite never passes in
    # silence over what it did not test.
    if rep.skipped and not hasattr(rep, 'wasxfail') and \
            not os.environ.get('MAILSHIFT_ALLOW_SKIP'):
        why = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else \
            str(rep.longrepr)
        rep.outcome = 'failed'
        rep.longrepr = ('skipped, and skips are not allowed (set '
                        'MAILSHIFT_ALLOW_SKIP=1 to allow them): %s' % why)
    setattr(item, 'rep_' + rep.when, rep)


def _failed(request):
    rep = getattr(request.node, 'rep_call', None)
    return rep is None or rep.failed


@pytest.fixture
def make_pair(workdir, ca, golden, request):
    """make_pair(users=('alice',), src_kw={}, dst_kw={}) -> started Pair,
    the source holding the golden corpora of users."""
    made = []

    def make(users=('alice',), src_kw=None, dst_kw=None):
        src = src_server(workdir, ca, dict(SRC_USERS), **(src_kw or {}))
        dst = dst_server(workdir, ca, dict(DST_USERS), **(dst_kw or {}))
        made.extend([src, dst])
        _install_maildirs(src, golden, users)
        src.start()
        dst.start()
        return Pair(workdir, src, dst)

    yield make
    stop_all(*made)
    if _failed(request):
        # Shown with the failure report (captured stdout).
        for s in made:
            print('----- %s: %s (last lines)' % (s.name, s.log_path))
            print('\n'.join(l for l in s.log_tail(1000).splitlines()
                            if re.search(r': (Warning|Error|Fatal|Panic): ',
                                         l))[-6000:])


@pytest.fixture
def pair(make_pair):
    return make_pair()


# ------------------------------------------------------------- the CLI

class Result:
    def __init__(self, rc, stdout, stderr, argv):
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.argv = argv
        self.json = None
        try:
            self.json = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            self.json = None

    def __iter__(self):           # rc, json, stderr = run_migrate(...)
        return iter((self.rc, self.json, self.stderr))

    def describe(self):
        return ('argv: %s\nrc: %s\nstdout: %s\nstderr: %s'
                % (' '.join(self.argv), self.rc, self.stdout.strip()[:4000],
                   self.stderr.strip()[:4000]))


class Migrator:
    """Runs `mailshiftctl migrate` against a Pair."""

    def __init__(self, ctl, pair, store):
        """store: a SQLite path (on PostgreSQL, a database of its own:
        tests/lib/storemode.py)."""
        self.ctl = ctl
        self.pair = pair
        self.store = storemode.store_for(store)
        if not storemode.is_url(self.store):
            leakcheck.CHECK.register_files('the mover store', [store])

    def argv(self, users, args, source=None, dest=None, store=None,
             json_out=True, bare=False):
        """bare=True: no --source/--dest/--store (a config file gives
        them)."""
        if isinstance(users, str):
            users = [users]
        argv = [self.ctl, 'migrate']
        if not bare:
            argv += ['--source', source or self.pair.src.url('imap'),
                     '--dest', dest or self.pair.dst.url('imap'),
                     '--store', storemode.store_for(store or self.store)]
        argv.append('--no-progress')
        if self.pair.names != 'source' and not bare:
            argv += ['--names', self.pair.names]
        if json_out:
            argv.append('--json')
        return argv + list(args) + list(users)

    def env(self, users, src_password, dst_password, crash_at=None):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('MAILSHIFT_')}
        if crash_at is not None:        # a hook build (ctl_hooks) dies there
            env['MAILSHIFT_CRASH_AT'] = crash_at
        first = users if isinstance(users, str) else users[0]
        if src_password is None:
            src_password = SRC_USERS.get(first)
        if dst_password is None:
            dst_password = DST_USERS.get(first)
        if src_password is not False:
            env['MAILSHIFT_SOURCE_PASSWORD'] = src_password
        if dst_password is not False:
            env['MAILSHIFT_DEST_PASSWORD'] = dst_password
        return env

    def popen(self, users, *args, src_password=None, dst_password=None,
              source=None, dest=None, store=None, crash_at=None):
        argv = self.argv(users, args, source, dest, store)
        p = subprocess.Popen(argv, env=self.env(users, src_password,
                                                dst_password, crash_at),
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        p.argv = argv
        return p

    def crash(self, users, point, *args, timeout=120):
        """Runs the CLI (a hook build: ctl_hooks) with MAILSHIFT_CRASH_AT
        = point and checks that it died there: killed by SIGKILL, its
        stderr naming the point. Returns its stderr."""
        p = self.popen(users, *args, crash_at=point)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc, out, err = kill9(p)
        err = err.decode(errors='replace')
        if p.returncode != -signal.SIGKILL or \
                gwlib.crash_line(point) not in err:
            pytest.fail('mailshiftctl did not die at crash point %s (exit '
                        'status %s)\nargv: %s\nstdout: %s\nstderr: %s'
                        % (point, p.returncode, ' '.join(p.argv),
                           out.decode(errors='replace')[-2000:],
                           err[-3000:]), pytrace=False)
        return err

    def run(self, users, *args, src_password=None, dst_password=None,
            source=None, dest=None, store=None, expect_rc=None, timeout=120,
            json_out=True, bare=False):
        """Runs the CLI (no terminal: new session, stdin /dev/null).
        src_password/dst_password: None = the user's own, False = unset."""
        argv = self.argv(users, args, source, dest, store, json_out, bare)
        p = subprocess.Popen(argv, env=self.env(users, src_password,
                                                dst_password),
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stack = backtrace(p.pid)
            os.kill(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail('mailshiftctl did not finish within %d s: %s\n'
                        'stdout: %s\nstderr: %s\nstack:\n%s'
                        % (timeout, ' '.join(argv),
                           out.decode(errors='replace')[-2000:],
                           err.decode(errors='replace')[-3000:], stack),
                        pytrace=False)
        r = subprocess.CompletedProcess(argv, p.returncode, out, err)
        res = Result(r.returncode, r.stdout.decode(errors='replace'),
                     r.stderr.decode(errors='replace'), argv)
        if expect_rc is not None and res.rc != expect_rc:
            pytest.fail('expected exit status %d\n%s'
                        % (expect_rc, res.describe()), pytrace=False)
        if expect_rc == 0:
            assert res.json is not None, \
                'no JSON summary on stdout\n' + res.describe()
        return res


@pytest.fixture
def migrator(ctl, pair, workdir):
    return Migrator(ctl, pair, os.path.join(workdir, 'store.db'))


@pytest.fixture
def run_migrate(migrator):
    """run_migrate(user_or_users, *args, src_password=None,
    dst_password=None, expect_rc=None, source=URL, dest=URL, store=PATH)
    -> Result (unpacks as rc, json, stderr)."""
    return migrator.run


# ------------------------------------------------------------- helpers

def store_done_count(path):
    """Messages recorded done in the store, read-only (0 when the store or
    its tables do not exist yet, or it is busy)."""
    if not storemode.exists(path):
        return 0
    try:
        return storemode.rows_of(path, 'SELECT count(*) FROM messages '
                                 'WHERE state = 1', timeout=0.2)[0][0]
    except Exception:
        return 0


def store_rows(path, sql):
    """The rows of one query of a store (a SQLite path, the database made
    for it, or a URL), read-only."""
    return storemode.rows_of(path, sql)


def kill9(p):
    """SIGKILL a Popen'd mailshiftctl by PID and reap it."""
    leakcheck.CHECK.sample([p.pid])       # its argv, one last time
    try:
        os.kill(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def store_bytes(path):
    """The store's bytes: the SQLite file with -wal and -shm, or every row
    of the database made for path."""
    return storemode.dump_of(path)


# A hung process's stacks, for failure reports (kept importable here).
backtrace = dc.backtrace


def wait_for(pred, timeout, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
