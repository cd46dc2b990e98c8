"""Several gateways on one PostgreSQL store (docs/design.md, "Several
gateways"): two and three mailshiftd on one database (tests/lib/postgres.py)
in front of real Dovecots, with a short heartbeat and timeout.

A user logged in on two gateways is moved: the other gateway ends its
session to the source before the delta, holds the user's new logins, and
after the flip neither gateway sends the user to the source; a state or a
policy set through one gateway reaches the other at once (LISTEN/NOTIFY),
and a change whose notification was lost at the next heartbeat (the
change counter);
status and sessions list every gateway with its heartbeat, sessions and
copies; one gateway alone on the store flips without the cutover; a
gateway killed with -9 is fenced after the timeout and the
cutover goes on without it; a gateway stopped (SIGSTOP) past the timeout
ends, when it comes back, the session the others' flip left on the
source; a gateway whose database connection is cut (a proxy) holds logins
and then fails them temporarily, never to the source, ends its sessions
before the others may fence it (nothing written through it after that, the
others' flip after the end), and recovers when the proxy lets connections
through again; the database restarted mid-cutover: the cutover completes,
nothing lost.
"""
import imaplib
import os
import poplib
import re
import signal
import subprocess
import threading
import time

import pytest

import dovecot
import gateway as gwlib
import tcpproxy
from conftest import wait_for
from test_gateway_ops import admin_conf, http_get
from test_store_pg import new_db, pg  # noqa: F401 (fixtures)

HEARTBEAT_MS = 250
TIMEOUT_MS = 1500
LEASE = 3           # [gateway] lease, seconds: a stopped gateway's copy
                    # (a first login's) is taken over soon


def cluster_conf(workdir, name, admin=True, sweep=False):
    return '\n'.join([admin_conf(workdir, sweep=sweep) if admin else '',
                      '[gateway]',
                      'name = %s' % name, 'lease = %ds' % LEASE,
                      'heartbeat = %dms' % HEARTBEAT_MS,
                      'timeout = %dms' % TIMEOUT_MS])


def start_gateways(pair, pg, url, workdir, names, urls=None, envs=None,
                   policy='passthrough', admin=True, sweep=False,
                   confs=None):
    """Started gateways named names on one store (urls/envs: per name,
    the store's URL and the environment, when not url and pg.env(); confs:
    per name, more of its config);
    admin: admin logins, and with them the jobs' timer; sweep: the sweep
    on too, each second)."""
    made = []
    try:
        for name in names:
            g = gwlib.Mailshiftd(
                os.path.join(workdir, name), pair.src, pair.dst,
                store_url=(urls or {}).get(name, url),
                env=(envs or {}).get(name, pg.env()), connections=1,
                policy=policy,
                extra_conf=cluster_conf(workdir, name, admin, sweep) +
                '\n' + (confs or {}).get(name, ''))
            made.append(g)
            g.start()
    except BaseException:
        for g in made:
            g.stop()
        raise
    return made


def stop_all(gws):
    for g in gws:
        g.stop()


def login(g, pair, user, server='src'):
    """A login through g with the password server (src, dst) has."""
    m = imaplib.IMAP4('127.0.0.1', g.imap_port)
    m.login(user, getattr(pair, server).password(user))
    assert m.select('INBOX')[0] == 'OK'
    return m


def ended(m):
    """Whether the server side of m is gone (a BYE, or the socket shut)."""
    try:
        return m.noop()[0] != 'OK'
    except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
        return True


def source_logins(g, user):
    """How many logins of user gateway g has sent to the source (its log
    line for each login a server took)."""
    return len(re.findall(r'login: user=<%s> .* server=source result=ok'
                          % re.escape(user), g.log_text()))


def inbox_count(server, user):
    m = server.imap(user)
    try:
        return int(m.select('INBOX', readonly=True)[1][0])
    finally:
        m.logout()


def mark_destination(pair, user):
    """A message on the destination alone: a session that sees it is
    served by the destination."""
    m = pair.dst.imap(user)
    try:
        m.append('INBOX', None, None, b'Subject: only-on-dst\r\n\r\nbody\r\n')
    finally:
        m.logout()


def on_destination(g, pair, user):
    m = login(g, pair, user, 'dst')
    try:
        typ, data = m.search(None, 'SUBJECT', 'only-on-dst')
        return typ == 'OK' and data[0].split() != []
    finally:
        m.logout()


def gateways(g, cmd='status'):
    r = g.ctl(cmd, '--json')
    assert r.rc == 0, r.describe()
    return {x['name']: x for x in r.json['gateways']}


def test_user_on_two_gateways_moved(make_pair, pg, new_db, workdir):
    """alice logged in through gw-a and gw-b, both to the source; the
    operator moves her on gw-a: gw-b ends its session (asked through the
    store) and acknowledges before the delta, a login through gw-b meanwhile
    is held and served by the destination; after the flip neither gateway
    sends her to the source."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'))
    held = {}
    try:
        ma, mb = login(a, pair, 'alice'), login(b, pair, 'alice')
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        assert wait_for(lambda: ended(mb), 60, 0.05), b.log_tail()
        assert ended(ma)

        def held_login():
            try:
                m = login(b, pair, 'alice', 'dst')
                typ, data = m.search(None, 'ALL')
                held['msgs'] = len(data[0].split())
                m.logout()
            except Exception as e:          # shown by the assert below
                held['error'] = repr(e)
        t = threading.Thread(target=held_login)
        t.start()
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        t.join(60)
        assert 'error' not in held, held
        assert held['msgs'] == inbox_count(pair.dst, 'alice')
        assert 'alice: cutover asked by gateway gw-a' in b.log_text()
        assert 'alice: every live gateway acknowledged' in a.log_text()
        pair.assert_copied('alice')
        mark_destination(pair, 'alice')
        for g in gws:
            assert on_destination(g, pair, 'alice'), g.log_tail()
        # neither the held login nor those after went to the source
        assert [source_logins(g, 'alice') for g in gws] == [1, 1]
    finally:
        stop_all(gws)
    assert pg.admin(db, 'SELECT count(*) FROM cutover_requests') == [['0']]


def test_mapping_change_seen_at_once(make_pair, pg, new_db, workdir):
    """u1 set to the destination through gw-a: gw-b ends its session to
    the source at once (a notification, not the reconcile); the default
    policy set through gw-a is gw-b's at once too."""
    pair = make_pair(users=('u1',))
    db, url = new_db()
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'))
    try:
        assert a.ctl('policy', '--default', 'off').rc == 0
        mb = login(b, pair, 'u1')
        t0 = time.monotonic()
        r = a.ctl('user', 'set', 'u1', 'state', 'destination')
        assert r.rc == 0, r.describe()
        assert wait_for(lambda: ended(mb), 5, 0.01), b.log_tail()
        took = time.monotonic() - t0
        assert took < 1.0, took
        print('session on the other gateway ended after %.3f s' % took)
        t0 = time.monotonic()
        assert a.ctl('policy', '--default', 'hold').rc == 0
        assert wait_for(lambda: b.ctl('policy', '--json').json['policy']
                        ['default'] == 'hold', 5, 0.01)
        took = time.monotonic() - t0
        assert took < 1.0, took
    finally:
        stop_all(gws)


def test_lost_notification_only_delays(make_pair, pg, new_db, workdir):
    """A change whose notification never came: u1 set to the destination
    with the triggers off (session_replication_role = replica: no NOTIFY),
    the change counter moved by hand as the trigger moves it. gw-b finds
    it by comparing the counter at a heartbeat, ends its session of u1 to
    the source and sends u1's next login to the destination."""
    pair = make_pair(users=('u1',))
    db, url = new_db()
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'))
    try:
        assert a.ctl('policy', '--default', 'off').rc == 0
        assert wait_for(lambda: b.ctl('policy', '--json').json['policy']
                        ['default'] == 'off', 5, 0.01)
        mark_destination(pair, 'u1')
        mb = login(b, pair, 'u1')
        time.sleep(2 * HEARTBEAT_MS / 1000)
        assert 'copy' not in b.log_text(), b.log_tail()
        assert not ended(mb)
        t0 = time.monotonic()
        pg.admin(db, "BEGIN; SET LOCAL session_replication_role = replica;"
                 " UPDATE users SET state = 'destination' WHERE name = 'u1';"
                 " INSERT INTO user_changes (user_id, version) SELECT id,"
                 " nextval('changes') FROM users WHERE name = 'u1'"
                 " ON CONFLICT (user_id) DO UPDATE SET"
                 " version = excluded.version; COMMIT;")
        assert wait_for(lambda: ended(mb), 10, 0.01), b.log_tail()
        took = time.monotonic() - t0
        print('session ended %.3f s after the silent change' % took)
        # A heartbeat's counter check, and its reconcile: not the timeout.
        assert took < 4 * HEARTBEAT_MS / 1000 + 0.5, took
        assert on_destination(b, pair, 'u1'), b.log_tail()
    finally:
        stop_all(gws)


@pytest.mark.sqlite_store      # its last gateway: one on SQLite
def test_status_lists_every_gateway(make_pair, pg, new_db, workdir):
    """status and sessions on any gateway list the three, each live with
    a recent heartbeat and its own sessions and copies; one stopped
    cleanly leaves the list; on SQLite (one gateway) there is no list."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b', 'gw-c'))
    try:
        listed = gateways(gws[0])
        assert sorted(listed) == ['gw-a', 'gw-b', 'gw-c'], listed
        assert all(x['live'] and x['heartbeat_age_ms'] < TIMEOUT_MS
                   for x in listed.values()), listed
        assert [n for n, x in listed.items() if x['this']] == ['gw-a']
        m = login(gws[1], pair, 'alice')
        assert wait_for(lambda: gateways(gws[2], 'sessions')['gw-b']
                        ['sessions'] == 1, 10, 0.05)
        assert gateways(gws[2])['gw-a']['sessions'] == 0
        m.logout()
        r = gws[0].ctl('status')
        assert r.rc == 0 and re.search(r'^gw-b +live +[0-9.]+ s ago +\d+ +\d+$',
                                       r.stdout, re.M), r.stdout
        r = gws[0].ctl('sessions')
        assert r.rc == 0 and 'GATEWAY' in r.stdout, r.stdout
        gws[2].stop()
        assert sorted(gateways(gws[0])) == ['gw-a', 'gw-b']
    finally:
        stop_all(gws)
    g = gwlib.Mailshiftd(os.path.join(workdir, 'sqlite'), pair.src,
                         pair.dst)
    g.start()
    try:
        assert gateways(g) == {} and gateways(g, 'sessions') == {}
        assert 'GATEWAY' not in g.ctl('status').stdout
    finally:
        g.stop()


def test_kill9_gateway_fenced_cutover_goes_on(make_pair, pg, new_db,
                                              workdir):
    """gw-c killed (-9) before alice's cutover: it never acknowledges; once
    its heartbeat is older than the timeout it is fenced (status: not
    live) and gw-a's cutover goes on without it, gw-b's acknowledgement
    taken."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b', 'gw-c'))
    a, b, c = gws
    try:
        os.kill(c.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        assert time.monotonic() - killed >= TIMEOUT_MS / 1000
        log = a.log_text()
        assert re.search(r'alice: gateway gw-c fenced: no heartbeat for '
                         r'\d+ ms', log), log
        assert 'alice: cutover asked by gateway gw-a' in b.log_text()
        listed = gateways(a)
        assert not listed['gw-c']['live'] and listed['gw-b']['live'], listed
    finally:
        stop_all(gws)


def test_alone_on_the_store_flips_at_once(make_pair, pg, new_db, workdir):
    """One gateway on the store, none other there since alice's copy
    began: the flip goes as on its own store, without the cutover (no
    grace, no last delta); with gw-b there too, u1's goes through it."""
    pair = make_pair(users=('alice', 'u1'))
    db, url = new_db()
    a, = gws = start_gateways(pair, pg, url, workdir, ('gw-a',))
    try:
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        pair.assert_copied('alice')
        log = a.log_text()
        assert 'alice: state cutover' not in log, log
        assert 'alice: copy started (the last delta)' not in log, log
        gws += start_gateways(pair, pg, url, workdir, ('gw-b',))
        assert a.ctl('migrate', '--daemon', 'u1').rc == 0
        st = a.wait_state('u1', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        assert 'u1: cutover asked by gateway gw-a' in gws[1].log_text()
        assert 'u1: copy started (the last delta)' in a.log_text()
    finally:
        stop_all(gws)


def test_stopped_gateway_catches_up(make_pair, pg, new_db, workdir):
    """gw-b stopped (SIGSTOP) with alice's session to the source open: gw-a
    fences it and moves alice. gw-b continued (SIGCONT) catches up before
    it routes a login: the session left on the source ends, and a login
    there goes to the destination."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'))
    stopped = False
    try:
        mb = login(b, pair, 'alice')
        os.kill(b.pid, signal.SIGSTOP)
        stopped = True
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        assert 'alice: gateway gw-b fenced' in a.log_text()
        os.kill(b.pid, signal.SIGCONT)
        stopped = False
        pair.assert_copied('alice')
        mark_destination(pair, 'alice')
        assert on_destination(b, pair, 'alice'), b.log_tail()
        assert wait_for(lambda: ended(mb), 10, 0.05), b.log_tail()
        assert source_logins(b, 'alice') == 1
    finally:
        if stopped:
            os.kill(b.pid, signal.SIGCONT)
        stop_all(gws)


def partitioned(pair, pg, url, workdir, policy):
    """gw-a and gw-b on one store, gw-b reaching PostgreSQL through a proxy
    that can cut it off: (proxy, [gw-a, gw-b])."""
    proxy = tcpproxy.CuttingProxy(pg.port).start()
    passfile = os.path.join(workdir, 'pgpass-b')
    with open(pg.passfile) as f:
        line = f.read().strip()
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(line + '\n' + line.replace(':%d:' % pg.port,
                                           ':%d:' % proxy.port, 1) + '\n')
    try:
        gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'),
                             urls={'gw-b': url.replace(':%d/' % pg.port,
                                                       ':%d/' % proxy.port)},
                             envs={'gw-b': {'PGPASSFILE': passfile}},
                             policy=policy)
    except BaseException:
        proxy.stop()
        raise
    return proxy, gws


def test_partition_of_one_gateway(make_pair, pg, new_db, workdir):
    """gw-b reaches PostgreSQL through a proxy, which cuts every connection
    and refuses new ones: alice's login through gw-b is held, then fails
    temporarily ([UNAVAILABLE]) and never reaches the source; u1's session
    relayed before ends too (BYE [UNAVAILABLE]: gw-b may be fenced, see
    test_cut_off_gateway_ends_its_relays); gw-a serves alice. The proxy
    restored, gw-b routes logins again. (Policy off: nobody is moved
    meanwhile.)"""
    pair = make_pair(users=('alice', 'u1'))
    db, url = new_db()
    proxy, gws = partitioned(pair, pg, url, workdir, 'off')
    try:
        a, b = gws
        mb = login(b, pair, 'u1')
        proxy.cut_now()
        t0 = time.monotonic()
        try:
            login(b, pair, 'alice')
            assert False, 'a login went through without the store'
        except imaplib.IMAP4.error as e:
            assert b'[UNAVAILABLE]' in e.args[0], e
        waited = time.monotonic() - t0
        assert waited >= TIMEOUT_MS / 1000 * 0.9, waited
        assert source_logins(b, 'alice') == 0
        assert ended(mb), b.log_tail()
        assert re.search(r'ended: user=<u1> this gateway lost touch',
                         b.log_text()), b.log_tail()
        m = login(a, pair, 'alice')
        m.logout()
        proxy.restore()

        def routed():
            try:
                login(b, pair, 'alice').logout()
                return True
            except imaplib.IMAP4.error:
                return False
        assert wait_for(routed, 30, 0.2), b.log_tail()
        login(b, pair, 'u1').logout()
    finally:
        stop_all(gws)
        proxy.stop()


# The time of alice's flip, on the database's clock: the trigger fires in
# the flip's transaction. SECURITY DEFINER: the gateways' role may not
# write the table.
FLIP_CLOCK = """
CREATE TABLE flip_seen (at DOUBLE PRECISION NOT NULL);
CREATE FUNCTION flip_seen() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER AS $$ BEGIN
  INSERT INTO flip_seen VALUES (extract(epoch FROM clock_timestamp()));
  RETURN NEW; END $$;
CREATE TRIGGER flip_seen AFTER UPDATE OF state ON users FOR EACH ROW
  WHEN (NEW.state = 'destination') EXECUTE FUNCTION flip_seen();
"""


# Every heartbeat the database took, by gateway (the gateways row keeps
# only the last).
BEATS = """
CREATE TABLE beats (name TEXT NOT NULL, at BIGINT NOT NULL);
CREATE FUNCTION beat_seen() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER AS $$ BEGIN
  INSERT INTO beats VALUES (NEW.name, NEW.heartbeat);
  RETURN NEW; END $$;
CREATE TRIGGER beat_seen AFTER INSERT OR UPDATE OF heartbeat ON gateways
  FOR EACH ROW EXECUTE FUNCTION beat_seen();
"""


def appender(m, done, failed):
    """APPENDs through m every 20 ms until the session ends: done gets
    (subject, when its OK came), failed when it ended."""
    for i in range(100000):
        subject = 'via-b-%d.' % i   # (SEARCH matches substrings)
        try:
            typ, _ = m.append('INBOX', None, None, (
                'Subject: %s\r\n\r\nbody\r\n' % subject).encode())
        except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
            typ = 'ended'
        if typ != 'OK':
            failed.append(time.time())
            return
        done.append((subject, time.time()))
        time.sleep(0.02)


def appending(g, pair):
    """alice logged in through g, appender() on that session in a thread,
    three APPENDs taken: (thread, done, failed)."""
    m = login(g, pair, 'alice')
    done, failed = [], []
    t = threading.Thread(target=appender, args=(m, done, failed),
                         daemon=True)
    t.start()
    assert wait_for(lambda: len(done) >= 3, 10, 0.02), failed
    return t, done, failed


def appended_once(pair, done):
    """alice copied, every message appender() had an OK for on the
    destination once; then a message there alone (mark_destination)."""
    pair.assert_copied('alice')
    m = pair.dst.imap('alice')
    try:
        m.select('INBOX', readonly=True)
        for subject, _ in done:
            typ, data = m.search(None, 'SUBJECT', subject)
            assert typ == 'OK' and len(data[0].split()) == 1, subject
    finally:
        m.logout()
    mark_destination(pair, 'alice')


def serves_destination(g, pair):
    """Whether alice's login through g is served by the destination."""
    try:
        return on_destination(g, pair, 'alice')
    except imaplib.IMAP4.error:
        return False


def test_cut_off_gateway_ends_its_relays(make_pair, pg, new_db, workdir):
    """gw-b cut off from PostgreSQL while a client APPENDs through its
    session of alice's to the source; gw-a moves alice, fencing gw-b.
    gw-b ends the session (BYE [UNAVAILABLE]) before gw-a may fence it
    (its last heartbeat on the database's clock plus the timeout): no
    APPEND through it is taken after that, the session ended before the
    flip's transaction, and every message APPENDed is on the destination.
    The proxy restored, alice's next login through gw-b goes to the
    destination."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    proxy, gws = partitioned(pair, pg, url, workdir, 'off')
    try:
        a, b = gws
        pg.admin(db, FLIP_CLOCK)
        t, done, failed = appending(b, pair)
        proxy.cut_now()
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        t.join(10)
        assert failed and not t.is_alive(), b.log_tail()
        # gw-b's last heartbeat the database took: the others may fence
        # it from then plus the timeout
        heartbeat = int(pg.admin(db, "SELECT heartbeat FROM gateways "
                                     "WHERE name = 'gw-b'")[0][0]) / 1000
        fence_from = heartbeat + TIMEOUT_MS / 1000
        flip = float(pg.admin(db, 'SELECT min(at) FROM flip_seen')[0][0])
        assert done[-1][1] < fence_from, (done[-1], fence_from)
        assert failed[0] < fence_from, (failed[0], fence_from)
        assert failed[0] < flip, (failed[0], flip)
        assert re.search(r'ended: user=<alice> this gateway lost touch',
                         b.log_text()), b.log_tail()
        assert 'alice: gateway gw-b fenced' in a.log_text(), a.log_tail()
        appended_once(pair, done)
        proxy.restore()
        assert wait_for(lambda: serves_destination(b, pair), 30, 0.2), \
            b.log_tail()
        assert source_logins(b, 'alice') == 1
    finally:
        stop_all(gws)
        proxy.stop()


def store_backend(pg, db, g):
    """The PID of the server process behind g's own blocking connection
    to the store (not the cluster's): found by g's ports (ss) in
    pg_stat_activity."""
    out = subprocess.run(['ss', '-tnpH', 'dst', '127.0.0.1:%d' % pg.port],
                         capture_output=True, text=True, check=True).stdout
    ports = [line.split()[3].rsplit(':', 1)[1] for line in out.splitlines()
             if 'pid=%d,' % g.proc.pid in line]
    assert ports, out
    rows = pg.admin(db, "SELECT pid FROM pg_stat_activity WHERE "
                        "application_name = 'mailshift' AND client_port IN "
                        "(%s)" % ','.join(ports))
    assert len(rows) == 1, (rows, ports)
    return int(rows[0][0])


def test_stalled_database_ends_relays_in_time(make_pair, pg, new_db,
                                              workdir):
    """The server process behind gw-b's store connection stopped (SIGSTOP:
    the kernel still acknowledges every byte, so no TCP timeout fires)
    while a client APPENDs through gw-b's session of alice's to the
    source; an operator's request to gw-b's control socket (a user added:
    written on that connection) then holds gw-b's loop, seen holding (no
    greeting) before gw-a moves alice, fencing gw-b, and u1 logs in. While the loop is still held, gw-b's watchdog ends alice's
    session before gw-a may fence it; the store call fails at [store]
    timeout (6 s), and u1's login is answered with the process still
    stopped; gw-b then serves again. (Heartbeat 500 ms, timeout 3 s.) Every message APPENDed is on the
    destination once."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    # a longer heartbeat here: the watchdog acts half of one before the
    # others may fence, and a thread's wake-up under load takes some
    beat = '[gateway]\nheartbeat = 500ms\ntimeout = 3s\nlease = 10s\n'
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'),
                                policy='off',
                                confs={'gw-a': beat, 'gw-b': beat +
                                       '[store]\ntimeout = 6s\n'})
    stopped = None
    try:
        pg.admin(db, FLIP_CLOCK + BEATS)
        t, done, failed = appending(b, pair)

        def beats_of():
            return [int(r[0]) / 1000 for r in pg.admin(
                db, "SELECT at FROM beats WHERE name = 'gw-b' ORDER BY at")]
        assert wait_for(lambda: len(beats_of()) >= 2, 10, 0.1)
        stopped = store_backend(pg, db, b)
        os.kill(stopped, signal.SIGSTOP)
        stalled_at = time.time()
        added = []
        held = threading.Thread(target=lambda: added.append(
            b.ctl('user', 'add', 'u9')), daemon=True)
        held.start()
        assert wait_for(lambda: not b._greets(), 5, 0.05), b.log_tail()
        answer = {}

        def first_login():
            m = imaplib.IMAP4('127.0.0.1', b.imap_port)
            try:
                m.login('u1', pair.src.password('u1'))
                answer['login'] = 'OK'
            except imaplib.IMAP4.error as e:
                answer['login'] = str(e)
            answer['at'] = time.time()
        u1 = threading.Thread(target=first_login, daemon=True)
        u1.start()
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        t.join(30)
        assert failed and not t.is_alive(), b.log_tail()
        u1.join(30)
        # gw-b's loop ran again at the store's timeout, not at the end of
        # the stop: u1's login had its answer (held, then routed or
        # refused) with the server process still stopped
        assert 'at' in answer, b.log_tail()
        assert answer['at'] - stalled_at < 6 + 10, answer
        # gw-b's last heartbeat before its loop was held: the others may
        # fence it from then plus the timeout
        assert wait_for(lambda: beats_of()[-1] > stalled_at + 5, 30, 0.2)
        beats = beats_of()
        gap = max(range(1, len(beats)), key=lambda i: beats[i] - beats[i - 1])
        fence_from = beats[gap - 1] + 3
        assert beats[gap] - beats[gap - 1] > 4, beats   # the loop was held
        assert failed[0] < fence_from, (failed[0], fence_from)
        # ended by the watchdog: the loop was held until the timeout
        assert failed[0] < stalled_at + 6, (failed[0], stalled_at)
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        flip = float(pg.admin(db, 'SELECT min(at) FROM flip_seen')[0][0])
        assert failed[0] < flip, (failed[0], flip)
        assert 'alice: gateway gw-b fenced' in a.log_text(), a.log_tail()
        assert re.search(r'the watchdog had shut 1 relayed sessions? down',
                         b.log_text()), b.log_tail()
        held.join(30)
        # the request that held the loop failed at [store] timeout
        assert added and added[0].rc != 0 and \
            'did not answer within the store' in added[0].stderr, added
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        appended_once(pair, done)
        assert wait_for(lambda: serves_destination(b, pair), 30, 0.2), \
            b.log_tail()
        login(b, pair, 'u1').logout()
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        stop_all(gws)


def test_database_restart_mid_cutover(make_pair, pg, new_db, workdir):
    """PostgreSQL restarted while alice's cutover waits out its grace: both
    gateways connect again and catch up, the cutover completes, every
    message once, no request left behind."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'))
    try:
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        assert wait_for(lambda: 'alice: state cutover' in a.log_text(), 60,
                        0.02), a.log_tail()
        pg.restart()
        st = a.wait_state('alice', ('destination', 'failed'), timeout=120)
        assert st == 'destination', (st, a.log_tail())
        pair.assert_copied('alice')
        mark_destination(pair, 'alice')
        assert on_destination(b, pair, 'alice'), b.log_tail()
    finally:
        stop_all(gws)
    assert pg.admin(db, 'SELECT count(*) FROM messages WHERE state = 0') \
        == [['0']]
    assert pg.admin(db, 'SELECT count(*) FROM cutover_requests') == [['0']]


def test_lost_acknowledgement_sent_again(make_pair, pg, new_db, workdir):
    """gw-b's acknowledgement of alice's cutover is not written (a trigger
    of the test's refuses the first one, as a database restarting under
    it would lose it): gw-b writes it again at its next heartbeat and the
    cutover completes, rather than waiting on a live gateway for good."""
    pair = make_pair(users=('alice',))
    db, url = new_db()
    a, b = gws = start_gateways(pair, pg, url, workdir, ('gw-a', 'gw-b'))
    try:
        pg.admin(db, "CREATE SEQUENCE test_ack_refused;"
                     " CREATE FUNCTION test_ack_refused() RETURNS trigger"
                     " LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN"
                     " IF NEW.gateway = 'gw-b'"
                     " AND nextval('test_ack_refused') = 1 THEN RAISE"
                     " EXCEPTION 'test: acknowledgement refused'; END IF;"
                     " RETURN NEW; END $$;"
                     " CREATE TRIGGER test_ack_refused BEFORE INSERT ON"
                     " cutover_acks FOR EACH ROW EXECUTE FUNCTION"
                     " test_ack_refused()")
        assert a.ctl('migrate', '--daemon', 'alice').rc == 0
        st = a.wait_state('alice', ('destination', 'failed'), timeout=60)
        assert st == 'destination', (st, a.log_tail(), b.log_tail())
        assert re.search(r'acknowledgement: .*test: acknowledgement '
                         r'refused', b.log_text()), b.log_tail()
        assert pg.admin(db, "SELECT last_value FROM test_ack_refused") \
            != [['1']], 'written once only'
        pair.assert_copied('alice')
    finally:
        stop_all(gws)


def users_locked(pg, db, table='users', mode='AccessExclusiveLock'):
    """Whether another connection holds the table's lock of that mode
    (the users table's ACCESS EXCLUSIVE one)."""
    return pg.admin(db, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON"
                        " c.oid = l.relation WHERE c.relname = '%s' AND"
                        " l.mode = '%s' AND l.granted" % (table, mode)
                    ) == [['1']]


def test_locked_use_tables_slow_no_session(make_pair, pg, new_db,
                                           workdir):
    """The tables of the source's uses and the survey's sizes locked
    against writes (EXCLUSIVE: reads go on), and the policies against
    reads too, for 3 s by another connection: a login's use of the source
    (written a second later) and a user's size (the survey, each 0.1 s)
    are written, and the policies read again after a user was added, on
    the cluster's connection, not the store's blocking one, so an open
    session's NOOPs, one each 0.1 s all through, each take well under a
    second; each gives up on the lock (half a heartbeat), logged, and the
    writes are in once the lock is gone."""
    pair = make_pair(users=('u1', 'u2'))
    db, url = new_db()
    gws = start_gateways(pair, pg, url, workdir, ('gw-a',), policy='off',
                         confs={'gw-a': '[sweep]\nsurvey = 600'})
    a = gws[0]
    locker = None

    def rows(sql):
        return int(pg.admin(db, sql)[0][0])

    try:
        mb = login(a, pair, 'u1')
        # u1's use (as "*": a user the map did not know) and size are in
        # before the lock
        assert wait_for(lambda: rows(
            "SELECT count(*) FROM source_use WHERE name = 'u1'") == 1 and
            rows("SELECT count(*) FROM user_sizes s JOIN users u ON"
                 " u.id = s.user_id WHERE u.name = 'u1'") == 1, 10, 0.1), \
            a.log_tail()
        locker = threading.Thread(target=pg.admin, args=(
            db, 'BEGIN; LOCK TABLE source_use, user_sizes IN EXCLUSIVE MODE;'
                ' LOCK TABLE policies IN ACCESS EXCLUSIVE MODE;'
                ' SELECT pg_sleep(3); COMMIT;'), daemon=True)
        locker.start()
        assert wait_for(lambda: users_locked(pg, db, 'source_use',
                                             'ExclusiveLock') and
                        users_locked(pg, db, 'user_sizes', 'ExclusiveLock')
                        and users_locked(pg, db, 'policies'), 10, 0.02)
        t_end = time.monotonic() + 2.2
        # u1 again, in the map now: its use (a row of its own, not the
        # first login's "*") waits a second; u2, new, is the survey's next
        login(a, pair, 'u1').logout()
        login(a, pair, 'u2').logout()
        worst = 0.0
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            assert mb.noop()[0] == 'OK'
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.1)
        assert users_locked(pg, db, 'source_use', 'ExclusiveLock'), \
            'the lock ended before the measure'
        assert worst < 0.8, worst
        log = a.log_text()
        # both writes ran into the lock while the NOOPs went on
        assert re.search(r'use\(s\) of the source: store: .*lock timeout',
                         log), a.log_tail()
        assert re.search(r'survey: u2: store: .*lock timeout', log), \
            a.log_tail()
        # u2's row, new, moved the store's change counter: the policies
        # are read again, and that read waits on the lock as well
        assert re.search(r'policies: store: .*lock timeout', log), \
            a.log_tail()
        mb.logout()
        # once for each, however long the lock lasted
        assert len(re.findall(r'survey: u2: store:', log)) == 1, \
            a.log_tail()
        # the lock gone, both are in, written again
        assert wait_for(lambda: rows(
            "SELECT count(*) FROM source_use WHERE key = 'u1'") == 1 and
            rows("SELECT count(*) FROM user_sizes s JOIN users u ON"
                 " u.id = s.user_id WHERE u.name = 'u2'") == 1, 10, 0.1), \
            a.log_tail()
    finally:
        if locker is not None:
            locker.join(10)
        stop_all(gws)


def uidvalidity(m, folder):
    typ, data = m.status(folder, '(UIDVALIDITY)')
    assert typ == 'OK', data
    return int(re.search(rb'UIDVALIDITY (\d+)', data[0]).group(1))


def noops_while_locked(pg, db, table, mb, seconds):
    """The worst of mb's NOOPs, one each 0.1 s for seconds, all while
    another connection holds table's lock."""
    worst = 0.0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        assert mb.noop()[0] == 'OK'
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.1)
    assert users_locked(pg, db, table), 'the lock ended before the measure'
    return worst


def one_gateway(make_pair, pg, new_db, workdir, conf=''):
    """Servers with u1 and u2, a gateway gw-a (policy off, more config
    conf) on a new database: (pair, database, gateway, u1's INBOX
    UIDVALIDITY on the source)."""
    pair = make_pair(users=('u1', 'u2'))
    db, url = new_db()
    a = start_gateways(pair, pg, url, workdir, ('gw-a',), policy='off',
                       confs={'gw-a': conf})[0]
    src = pair.src.imap('u1')
    try:
        return pair, db, a, uidvalidity(src, 'INBOX')
    finally:
        src.logout()


def test_locked_folders_slow_no_session(make_pair, pg, new_db, workdir):
    """A moved user's folders did not keep their identity: an IMAP login
    of hers reads their rows (the IMAP view), a POP3 login her INBOX's
    records (the source's UIDLs), a SELECT the folder's pairs. With the
    folders and messages tables locked (ACCESS EXCLUSIVE) for 3 s by
    another connection, each waits on the store's reader, not on the
    gateway's loop: another session's NOOPs, one each 0.1 s all through,
    each take well under a second, and the logins, then the SELECT, are
    answered once the lock is gone, with the source's UIDVALIDITY."""
    pair, db, a, src_uv = one_gateway(make_pair, pg, new_db, workdir)
    lock = ('BEGIN; LOCK TABLE %s IN ACCESS EXCLUSIVE MODE;'
            ' SELECT pg_sleep(3); COMMIT;')
    lockers = []
    try:
        assert a.ctl('migrate', '--daemon', 'u1').rc == 0
        assert a.wait_state('u1', ('destination', 'failed'),
                            timeout=120) == 'destination', a.log_tail()
        mb = login(a, pair, 'u2')
        got = {}

        def moved_login():
            try:
                m = imaplib.IMAP4('127.0.0.1', a.imap_port)
                m.login('u1', pair.dst.password('u1'))
                got['login'] = time.monotonic()
                got['uv'] = uidvalidity(m, 'INBOX')
                got['m'] = m
            except Exception as e:          # shown by the assert below
                got['error'] = repr(e)

        def moved_pop3():
            try:
                p = poplib.POP3('127.0.0.1', a.pop3_port, timeout=30)
                p.user('u1')
                p.pass_(pair.dst.password('u1'))
                got['uidls'] = len(p.uidl()[1])
                p.quit()
            except Exception as e:          # shown by the assert below
                got['pop3 error'] = repr(e)

        # the logins: the folders' rows (IMAP), the INBOX's records (POP3)
        lockers.append(threading.Thread(target=pg.admin, args=(
            db, lock % 'folders, messages'), daemon=True))
        lockers[-1].start()
        assert wait_for(lambda: users_locked(pg, db, 'folders'), 10, 0.02)
        ts = [threading.Thread(target=moved_login),
              threading.Thread(target=moved_pop3)]
        for t in ts:
            t.start()
        assert noops_while_locked(pg, db, 'folders', mb, 2.0) < 0.8
        assert all(t.is_alive() for t in ts), got
        for t in ts:
            t.join(30)
        assert 'error' not in got and 'pop3 error' not in got, got
        assert got['uidls'] == inbox_count(pair.dst, 'u1'), got
        assert got['uv'] == src_uv, got
        assert got['uv'] != uidvalidity_of(pair.dst, 'u1'), got

        # the SELECT: the folder's pairs
        lockers.append(threading.Thread(target=pg.admin, args=(
            db, lock % 'messages'), daemon=True))
        lockers[-1].start()
        assert wait_for(lambda: users_locked(pg, db, 'messages'), 10, 0.02)
        m = got['m']
        sel = {}
        t = threading.Thread(target=lambda: sel.update(
            r=m.select('INBOX'), uv=m.untagged_responses.get('UIDVALIDITY')))
        t.start()
        assert noops_while_locked(pg, db, 'messages', mb, 2.0) < 0.8
        assert t.is_alive(), sel
        t.join(30)
        assert sel['r'][0] == 'OK', sel
        assert sel['uv'] == [b'%d' % src_uv], sel
        m.logout()
        mb.logout()
    finally:
        for locker in lockers:
            locker.join(10)
        a.stop()


def test_locked_users_refuse_operator_change(make_pair, pg, new_db,
                                             workdir):
    """An operator's change (user set, policy) is one transaction whose
    statements wait at most half a heartbeat for a lock (as the cluster's
    own writes), so the heartbeat is taken: with the users and policies
    tables locked (ACCESS EXCLUSIVE, 3 s) by another connection each is
    refused, saying the store is busy and nothing changed, while another
    session's NOOPs, one each 0.1 s, each take well under a second; the
    user and the policies are as they were, and the changes go through
    once the lock is gone."""
    pair, db, a, _ = one_gateway(make_pair, pg, new_db, workdir)
    locker = threading.Thread(target=pg.admin, args=(
        db, 'BEGIN; LOCK TABLE users, policies IN ACCESS EXCLUSIVE MODE;'
        ' SELECT pg_sleep(3); COMMIT;'), daemon=True)
    policy = ('policy', '--domain', 'example.org', 'hold')
    try:
        assert a.ctl('user', 'add', 'u2').rc == 0
        mb = login(a, pair, 'u1')
        locker.start()
        assert wait_for(lambda: users_locked(pg, db), 10, 0.02)
        got = {}
        t = threading.Thread(target=lambda: got.update(
            r=a.ctl('user', 'set', 'u2', 'policy', 'hold'),
            p=a.ctl(*policy)), daemon=True)
        t.start()
        assert noops_while_locked(pg, db, 'users', mb, 2.0) < 0.8
        t.join(30)
        for r in (got['r'], got['p']):
            assert r.rc == 1 and 'store busy' in r.stderr and \
                'nothing changed' in r.stderr, r.describe()
        locker.join(10)
        assert a.ctl('user', 'show', 'u2', '--json').json['user'][
            'policy'] == 'default'
        assert 'example.org' not in a.ctl('policy').stdout
        assert a.ctl('user', 'set', 'u2', 'policy', 'hold').rc == 0
        assert a.ctl('user', 'show', 'u2', '--json').json['user'][
            'policy'] == 'hold'
        assert a.ctl(*policy).rc == 0
        assert 'example.org' in a.ctl('policy').stdout
        mb.logout()
    finally:
        locker.join(10)
        a.stop()


def readers_waiting(pg, db):
    """The store's reader's connections waiting for a lock."""
    return int(pg.admin(db, "SELECT count(*) FROM pg_stat_activity WHERE"
                            " application_name = 'mailshift-reader' AND"
                            " wait_event_type = 'Lock'")[0][0])


def test_slow_read_holds_up_no_other(make_pair, pg, new_db, workdir):
    """The store's reader has two threads ([store] readers, by default): a
    read that waits holds up its own thread only. With folder_renames
    locked (ACCESS EXCLUSIVE) for 5 s by another connection, a moved
    user's IMAP login waits for her folders' rows on one thread; on the
    other her POP3 login reads the INBOX's records and gets every UIDL,
    and a metrics scrape (its walk of the users) counts the one read
    waiting, while the lock is still held; the IMAP login is answered once
    it is gone, with the source's UIDVALIDITY, and no read waits."""
    mport = dovecot.free_port()
    pair, db, a, src_uv = one_gateway(
        make_pair, pg, new_db, workdir,
        '[metrics]\nlisten = 127.0.0.1:%d' % mport)
    waiting = 'mailshift_store_reads_waiting{gateway="gw-a"} '
    locker = threading.Thread(target=pg.admin, args=(
        db, 'BEGIN; LOCK TABLE folder_renames IN ACCESS EXCLUSIVE MODE;'
        ' SELECT pg_sleep(5); COMMIT;'), daemon=True)
    got = {}

    def moved_login():
        try:
            m = imaplib.IMAP4('127.0.0.1', a.imap_port)
            m.login('u1', pair.dst.password('u1'))
            got['uv'] = uidvalidity(m, 'INBOX')
            m.logout()
        except Exception as e:              # shown by the assert below
            got['error'] = repr(e)

    try:
        assert a.ctl('migrate', '--daemon', 'u1').rc == 0
        assert a.wait_state('u1', ('destination', 'failed'),
                            timeout=120) == 'destination', a.log_tail()
        locker.start()
        assert wait_for(lambda: users_locked(pg, db, 'folder_renames'), 10,
                        0.02)
        t = threading.Thread(target=moved_login, daemon=True)
        t.start()
        # the IMAP login's read is waiting for the lock: one thread held
        assert wait_for(lambda: readers_waiting(pg, db) == 1, 10, 0.02), \
            got
        p = poplib.POP3('127.0.0.1', a.pop3_port, timeout=30)
        p.user('u1')
        p.pass_(pair.dst.password('u1'))
        uidls = len(p.uidl()[1])
        p.quit()
        scraped = http_get(mport)
        assert users_locked(pg, db, 'folder_renames'), \
            'the lock ended before the POP3 login was answered'
        assert t.is_alive() and not got, got
        assert uidls == inbox_count(pair.dst, 'u1')
        assert waiting + '1\n' in scraped, scraped
        t.join(30)
        assert got.get('uv') == src_uv, got
        assert waiting + '0\n' in http_get(mport)
    finally:
        locker.join(10)
        a.stop()


def uidvalidity_of(server, user):
    d = server.imap(user)
    try:
        return uidvalidity(d, 'INBOX')
    finally:
        d.logout()


def test_slow_database_slows_no_login(make_pair, pg, new_db, workdir):
    """The users table locked (ACCESS EXCLUSIVE) for 3 s by another
    connection: a login through the gateway of a user in its map, and the
    commands of a session open before, each complete in well under a
    second (the map in memory, docs/design.md "Several gateways"), and so
    does the first login of a user the map does not hold (its row written
    on the cluster's connection, again at each heartbeat until the lock
    is gone); the lock still held after them. With admin logins and the sweep on: the jobs'
    timer's queue and claim, each second, run on the cluster's connection
    ("Jobs and leases") and wait on the lock for half a heartbeat at
    most; the heartbeat behind them keeps the gateway from fencing itself
    (the open session lives on). A metrics scrape and an operator's
    status then walk the users table on the store's reader: each waits
    for the lock, the loop does not."""
    pair = make_pair(users=('u1', 'u2'))
    db, url = new_db()
    mport = dovecot.free_port()
    gws = start_gateways(pair, pg, url, workdir, ('gw-a',), policy='off',
                         sweep=True, confs={'gw-a': '[metrics]\nlisten = '
                                            '127.0.0.1:%d' % mport})
    a = gws[0]
    locker = None
    scraped = {}
    scrape = threading.Thread(target=lambda: scraped.update(
        text=http_get(mport)))
    asked = {}
    status = threading.Thread(target=lambda: asked.update(
        status=a.ctl('status', '--json')))
    try:
        login(a, pair, 'u1').logout()
        mb = login(a, pair, 'u2')
        # Their own policy off: the sweep queues none of them (a claimed
        # job's start and release write on the store's own connection).
        pg.admin(db, "UPDATE users SET policy = 'off'")
        time.sleep(2.5)     # the map has read them, the logins' source
                            # use is written (within a second)
        assert 'lock timeout' not in a.log_text()
        locker = threading.Thread(target=pg.admin, args=(
            db, 'BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE;'
                ' SELECT pg_sleep(3); COMMIT;'), daemon=True)
        locker.start()
        assert wait_for(lambda: users_locked(pg, db), 10, 0.02)
        # The jobs' timer (each second) runs under the lock first: its
        # claim gives up on the lock, and the loop goes on.
        assert wait_for(lambda: re.search(r'jobs: store: .*lock timeout',
                                          a.log_text()), 1.5, 0.05), \
            a.log_tail()
        scrape.start()      # the first: no counts yet, the table walked
        status.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        m = login(a, pair, 'u1')
        took_login = time.monotonic() - t0
        t0 = time.monotonic()
        typ, data = mb.search(None, 'ALL')
        assert typ == 'OK' and data[0].split(), (typ, data)
        assert mb.fetch(data[0].split()[0], '(FLAGS)')[0] == 'OK'
        assert mb.noop()[0] == 'OK'
        took_cmds = time.monotonic() - t0
        # a user the map does not hold: its row is written on the
        # cluster's connection, the login does not wait for it
        t0 = time.monotonic()
        m3 = login(a, pair, 'u3')
        took_new = time.monotonic() - t0
        assert users_locked(pg, db), 'the lock ended before the measure'
        assert scrape.is_alive(), scraped
        assert status.is_alive(), asked
        assert took_login < 0.8, took_login
        assert took_cmds < 0.8, took_cmds
        assert took_new < 0.8, took_new
        scrape.join(30)
        assert re.search(r'^mailshift_users\{gateway="gw-a",state="source"\}'
                         r' [23]$', scraped['text'], re.M), scraped
        status.join(30)
        rc, out, err, j = asked['status']
        assert rc == 0, err
        assert j['states']['source'] in (2, 3), j
        assert [g['name'] for g in j['gateways']] == ['gw-a'], j
        m.logout()
        mb.logout()
        m3.logout()
        # the lock gone, u3's row is in (tried again each heartbeat)
        assert wait_for(lambda: pg.admin(db, "SELECT count(*) FROM users "
                                             "WHERE name = 'u3'") == [['1']],
                        10, 0.1), a.log_tail()
        assert re.search(r'cluster: user u3: store: .*lock timeout.*'
                         r'written again', a.log_text()), a.log_tail()
    finally:
        if locker is not None:
            locker.join(10)
        for t in (scrape, status):
            if t.is_alive():
                t.join(30)
        stop_all(gws)
