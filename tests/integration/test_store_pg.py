"""The store on PostgreSQL ([store] url, docs/mailshift.conf.5) against a
real server the harness starts (tests/lib/postgres.py), with real Dovecots:
mailshiftd moves a user with its map in PostgreSQL; `mailshiftctl store
copy` takes a migration's state from SQLite to PostgreSQL and back, every
row the same; and each bad input at start (an unreachable server, a
password in the URL, a schema from a newer mailshift, a database of
another migration, a UTF8 database) is a clear error that changes no row.
"""
import imaplib
import os
import sqlite3
import subprocess

import pytest

import dovecot as dc
import gateway as gwlib
import postgres
from conftest import Migrator, wait_for
from test_gateway_ops import admin_conf

# Each test names its engine: SQLite paths stay SQLite files here.
pytestmark = pytest.mark.sqlite_store

# Every table of the store and its columns (daemon/store.c, copy_tables).
TABLES = {
    'users': 'id, name, state, policy, last_error, msgs_copied, '
             'bytes_copied, updated_at',
    'folders': 'id, user_id, src_name, dst_name, src_uidvalidity, '
               'dst_uidvalidity, hwm, modseq, msgs, bytes',
    'messages': 'folder_id, src_uid, uidl, state, size, date, msgid, '
                'flags, dst_uid, dst_floor',
    'rintents': 'folder_id, dst_uid, size, date, msgid, flags, src_floor',
    'folder_identity': 'folder_id, state, reason',
    'user_moves': 'user_id, first_copy, moved',
    'policies': 'scope, policy',
    'source_use': 'key, kind, name, at, slack',
    'retirements': 'id, at, uid, forced, record',
    'user_sizes': 'user_id, messages, bytes, how, at',
    'folder_src_next': 'folder_id, uidnext',
    'folder_renames': 'folder_id, old_name, sep',
    'user_namespaces': 'user_id, src_prefix, src_sep, dst_prefix, dst_sep',
    'jobs': 'user_id, kind, state, owner, lease_until, attempts, '
            'last_error, updated_at',
    'gateways': 'name, started, heartbeat, sessions, copies',
    'cutover_requests': 'user_id, seq, gateway, kind, at',
    'cutover_acks': 'user_id, seq, gateway, at',
    'meta': 'key, value',
}
NULL = '(null)'


@pytest.fixture(scope='module')
def pg(test_root):
    server = postgres.Postgres(os.path.join(test_root, 'postgres'))
    server.start()
    yield server
    server.stop()


_dbs = [0]


@pytest.fixture
def new_db(pg):
    """new_db() -> (name, url) of a fresh database of the role."""
    def make(**params):
        _dbs[0] += 1
        name = 'm%d' % _dbs[0]
        return name, pg.create_db(name, **params)
    return make


def pg_rows(pg, db):
    """{table: sorted rows as tuples of str} of a PostgreSQL store."""
    return {t: sorted(tuple(r) for r in pg.psql(
        db, 'SELECT %s FROM %s' % (cols, t), null=NULL))
        for t, cols in TABLES.items()}


def sqlite_rows(path):
    con = sqlite3.connect('file:%s?mode=ro' % path, uri=True, timeout=5)
    con.text_factory = lambda b: b.decode('utf-8', 'surrogateescape')
    out = {}
    try:
        for t, cols in TABLES.items():
            try:
                rows = con.execute('SELECT %s FROM %s' % (cols, t)).fetchall()
            except sqlite3.OperationalError:
                rows = []           # meta: made when first needed
            out[t] = sorted(tuple(NULL if v is None else str(v) for v in r)
                            for r in rows)
    finally:
        con.close()
    return out


def store_copy(ctl, src, dst, *opts, env=None):
    return subprocess.run([ctl, 'store', 'copy'] + list(opts) + [src, dst],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def move(g, pair, user='alice'):
    assert g.ctl('user', 'add', user).rc == 0
    r = g.ctl('migrate', '--daemon', user)
    assert r.rc == 0, r.describe()
    st = g.wait_state(user, ('destination', 'failed'), timeout=120)
    assert st == 'destination', (st, g.log_tail())
    pair.assert_copied(user)


def lands_on_destination(g, pair, user='alice'):
    """Whether a login through the gateway sees the destination's mailbox:
    after the copy both hold the same, so a message put on the destination
    alone tells them apart."""
    m = pair.dst.imap(user)
    try:
        m.append('INBOX', None, None,
                 b'Subject: only-on-dst\r\n\r\nbody\r\n')
    finally:
        m.logout()
    m = imaplib.IMAP4('127.0.0.1', g.imap_port)
    try:
        m.login(user, pair.dst.password(user))
        m.select('INBOX', readonly=True)
        typ, data = m.search(None, 'SUBJECT', 'only-on-dst')
        return typ == 'OK' and data[0].split() != []
    finally:
        m.logout()


def test_gateway_moves_user_on_postgresql(pair, pg, new_db, workdir):
    """[store] url: mailshiftd keeps its map in PostgreSQL, moves alice,
    and routes her to the destination; no SQLite file is made."""
    db, url = new_db()
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), pair.src, pair.dst,
                         store_url=url, env=pg.env(),
                         extra_conf=admin_conf(workdir, sweep=False))
    g.start()
    try:
        move(g, pair)
        assert lands_on_destination(g, pair)
    finally:
        g.stop()
    rows = pg_rows(pg, db)
    assert [r[1:3] for r in rows['users']] == [('alice', 'destination')]
    assert len(rows['messages']) > 0
    assert all(r[3] == '1' for r in rows['messages'])   # every one done
    assert rows['meta'] == [('migration', 'source 127.0.0.1:%d, '
                             'destination 127.0.0.1:%d'
                             % (pair.src.imap_port, pair.dst.imap_port))]
    assert not os.path.exists(g.store_path)


def test_store_copy_round_trip(pair, pg, new_db, workdir, ctl):
    """A migration's state from SQLite to PostgreSQL and back, every row of
    every table the same; a non-empty target refused unless --replace;
    mailshiftd then carries on from the copy on PostgreSQL."""
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), pair.src, pair.dst,
                         extra_conf=admin_conf(workdir, sweep=False))
    g.start()
    try:
        move(g, pair)
        assert g.ctl('policy', '--domain', 'example.org', 'hold').rc == 0
        # from the running daemon's store: one instant of it
        db, url = new_db()
        r = store_copy(ctl, g.store_path, url, env=pg.env())
        assert r.returncode == 0, r.stderr
    finally:
        g.stop()
    want = sqlite_rows(g.store_path)
    assert want['users'] and want['messages'] and want['policies']
    assert 'messages %d' % len(want['messages']) in r.stdout.splitlines()
    assert pg_rows(pg, db) == want

    back = os.path.join(workdir, 'back.db')
    r = store_copy(ctl, url, back, env=pg.env())
    assert r.returncode == 0, r.stderr
    assert sqlite_rows(back) == want

    # the target holds a migration now: refused, and left as it was
    r = store_copy(ctl, back, url, env=pg.env())
    assert r.returncode != 0
    assert 'not empty' in r.stderr, r.stderr
    assert pg_rows(pg, db) == want
    r = store_copy(ctl, back, url, '--replace', env=pg.env())
    assert r.returncode == 0, r.stderr
    assert pg_rows(pg, db) == want

    # the copy is a store mailshiftd runs on: alice stays moved, and a new
    # user gets an id above the copied ones
    g2 = gwlib.Mailshiftd(os.path.join(workdir, 'gw2'), pair.src, pair.dst,
                          store_url=url, env=pg.env())
    g2.start()
    try:
        assert g2.state('alice') == 'destination'
        assert lands_on_destination(g2, pair)
        assert g2.ctl('user', 'add', 'bulk').rc == 0
    finally:
        g2.stop()
    ids = sorted(int(r[0]) for r in pg_rows(pg, db)['users'])
    assert len(ids) == 2 and ids[1] > ids[0]


def start_refused(g):
    """Starts g, which must exit at start; its log."""
    with pytest.raises(dc.HarnessError) as e:
        g.start(timeout=60)
    assert 'exited at start' in str(e.value), str(e.value)
    return g.log_text()


def test_bad_input_at_start(pair, pg, new_db, workdir):
    """Each refused at start with an error saying what is wrong, and no
    row of the database changed: an unreachable server, a password in the
    URL, a schema from a newer mailshift, the database of another
    migration (the source and destination swapped), a UTF8 database."""
    def gw(name, url, src=pair.src, dst=pair.dst):
        return gwlib.Mailshiftd(os.path.join(workdir, name), src, dst,
                                store_url=url, env=pg.env())

    dead = dc.free_port()
    log = start_refused(gw('dead', 'postgresql://mailshift@127.0.0.1:%d/x'
                           % dead))
    assert 'cannot connect' in log, log

    db, url = new_db()
    g = gw('pw', url.replace('mailshift@', 'mailshift:Pg-in-url-9q@'))
    log = start_refused(g)
    assert 'password file' in log, log
    assert 'Pg-in-url-9q' not in log
    # a configuration error: `mailshiftd -t` says so too
    r = subprocess.run([g.binary, '-t', '-c', g.config_path],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and 'password file' in r.stderr, r.stderr
    assert 'Pg-in-url-9q' not in r.stderr + r.stdout

    g = gw('first', url)
    g.start()
    g.stop()
    before = pg_rows(pg, db)
    assert before['meta']

    log = start_refused(gw('other', url, src=pair.dst, dst=pair.src))
    assert 'another migration' in log, log
    assert pg_rows(pg, db) == before

    pg.admin(db, 'UPDATE mailshift_schema SET version = 99')
    log = start_refused(gw('newer', url))
    assert 'newer' in log, log
    assert pg_rows(pg, db) == before
    assert pg.admin(db, 'SELECT version FROM mailshift_schema') == [['99']]

    pg.admin('postgres', "CREATE DATABASE utf OWNER mailshift ENCODING "
             "'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    log = start_refused(gw('utf', pg.url('utf')))
    assert 'SQL_ASCII' in log, log
    assert pg.admin('utf', "SELECT count(*) FROM pg_tables WHERE "
                    "schemaname = 'public'") == [['0']]


def test_tls_from_the_url(pair, workdir, ca, wrong_ca):
    """TLS is the URL's sslmode: verify-full against the server's CA
    connects over TLS; a server that requires TLS refuses sslmode=disable,
    and a certificate from another CA is refused at start."""
    server = postgres.Postgres(os.path.join(workdir, 'pgtls'), ssl=True,
                               tls_ca=ca)
    server.start()
    try:
        server.create_db('tls')

        def gw(name, **params):
            return gwlib.Mailshiftd(os.path.join(workdir, name), pair.src,
                                    pair.dst, env=server.env(),
                                    store_url=server.url('tls', **params))

        g = gw('gw', sslmode='verify-full', sslrootcert=ca.ca_file)
        g.start()
        try:
            assert g.ctl('user', 'add', 'alice').rc == 0
            assert server.admin('tls', "SELECT bool_and(s.ssl) FROM "
                                "pg_stat_ssl s JOIN pg_stat_activity a "
                                "USING (pid) WHERE a.usename = "
                                "'mailshift'") == [['t']]
        finally:
            g.stop()
        log = start_refused(gw('plain', sslmode='disable'))
        assert 'cannot connect' in log and 'no encryption' in log, log
        log = start_refused(gw('wrongca', sslmode='verify-full',
                               sslrootcert=wrong_ca.ca_file))
        assert 'cannot connect' in log and 'certificate' in log, log
    finally:
        server.stop()


def test_store_copy_usage(ctl, workdir):
    """store copy: usage errors exit 2; a SQLite source that is not there
    is an error (exit 1), not an empty store made and copied."""
    for args in ([], ['a'], ['a', 'b', 'c'], ['--bogus', 'a', 'b']):
        r = subprocess.run([ctl, 'store', 'copy'] + args,
                           stdin=subprocess.DEVNULL, capture_output=True,
                           text=True)
        assert r.returncode == 2 and 'Usage' in r.stderr, (args, r.stderr)
    missing = os.path.join(workdir, 'missing.db')
    r = store_copy(ctl, missing, os.path.join(workdir, 'to.db'))
    assert r.returncode == 1 and 'missing.db' in r.stderr, r.stderr
    assert not os.path.exists(missing)


def test_database_restart(pair, pg, new_db, workdir):
    """The server restarted under a running mailshiftd: the statement that
    finds the connection gone fails, the next ones connect again; the map
    is as it was and new writes land."""
    db, url = new_db()
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), pair.src, pair.dst,
                         store_url=url, env=pg.env())
    g.start()
    try:
        assert g.ctl('user', 'add', 'alice').rc == 0
        pg.restart()
        assert wait_for(lambda: g.ctl('user', 'add', 'bulk').rc == 0, 30,
                        interval=0.2), g.log_tail()
        assert g.state('alice') == 'source'
        assert g.alive
    finally:
        g.stop()
    assert sorted(r[1] for r in pg_rows(pg, db)['users']) == ['alice',
                                                             'bulk']


@pytest.mark.parametrize('point', ['copy.appended:2', 'copy.recorded:2'],
                         ids=['appended', 'recorded'])
def test_kill9_exactly_once(make_pair, pg, new_db, workdir, point):
    """The mover's exactly-once on PostgreSQL: mailshiftd killed (a crash
    point of the hook build) with a window on the destination and its
    intents open, or just recorded; the start resumes the copy, and the
    destination holds every message once."""
    pair = make_pair(users=('bulk',))
    db, url = new_db()
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), pair.src, pair.dst,
                         store_url=url, connections=1,
                         binary=gwlib.MAILSHIFTD_HOOKS,
                         env=dict(pg.env(), MAILSHIFT_CRASH_AT=point),
                         extra_conf=admin_conf(workdir, sweep=False))
    g.start()
    try:
        assert g.ctl('user', 'add', 'bulk').rc == 0
        assert g.ctl('migrate', '--daemon', 'bulk').rc == 0
        g.wait_crashed()
        assert pg.admin(db, "SELECT state FROM users") == [['copying']]
        g.restart_after_crash()
        st = g.wait_state('bulk', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, g.log_tail())
        assert 'bulk: resuming the interrupted copy' in g.log_text()
    finally:
        g.stop()
    pair.assert_copied('bulk')
    assert pg.admin(db, "SELECT count(*) FROM messages WHERE state = 0") \
        == [['0']]


def test_migrate_cli_on_postgresql(pair, pg, new_db, ctl, monkeypatch):
    """`mailshiftctl migrate --store postgresql://...` (no daemon): the copy
    state in the database; a second run copies nothing."""
    db, url = new_db()
    monkeypatch.setenv('PGPASSFILE', pg.passfile)
    m = Migrator(ctl, pair, url)
    m.run('alice', expect_rc=0)
    pair.assert_copied('alice')
    done = pg.admin(db, 'SELECT count(*) FROM messages WHERE state = 1')
    assert int(done[0][0]) > 0
    before = pair.dst_snapshot('alice', with_uids=True)
    m.run('alice', expect_rc=0)
    assert pair.dst_snapshot('alice', with_uids=True) == before
    assert pg.admin(db, 'SELECT count(*) FROM messages WHERE state = 1') \
        == done
