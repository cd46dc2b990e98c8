"""Copies as shared work (docs/design.md, "Jobs and leases"): two mailshiftd
on one PostgreSQL store (tests/lib/postgres.py) in front of real Dovecots.
With the sweep on, every user is copied exactly once, the work spread over
both gateways; a gateway killed with -9 mid-copy (a crash point of the hook
build) loses its lease, and the other takes the job over and finishes the
copy from the intent log, exactly once; a copy that lasts many leases is
kept by its gateway's renewals, the other never takes it, and a first login
there starts no second copy.
"""
import imaplib
import os
import re
import signal
import time

import gateway as gwlib
import tcpproxy
from conftest import wait_for
from test_gateway_ops import admin_conf
from test_store_pg import new_db, pg  # noqa: F401 (fixtures)

LEASE = 3           # [gateway] lease, seconds
SWEEP_USERS = ('alice', 'smallie', 'u1', 'u2', 'u3')


def job_conf(workdir, name, sweep):
    """Admin logins, the jobs' timer each second (with the sweep on or
    off), the gateway's name and a short lease."""
    return '\n'.join([admin_conf(workdir, sweep=False), '[sweep]',
                      'enabled = %s' % ('yes' if sweep else 'no'),
                      'interval = 1', 'concurrency = 1', '[gateway]',
                      'name = %s' % name, 'lease = %ds' % LEASE])


def two_gateways(pair, pg, url, workdir, sweep, dst=None, **a_kw):
    """gw-a (a_kw: its binary, env) and gw-b, started on one store (dst:
    the destination as both see it)."""
    made = []
    for name, kw in (('gw-a', a_kw), ('gw-b', {})):
        env = dict(pg.env(), **kw.pop('env', {}))
        g = gwlib.Mailshiftd(os.path.join(workdir, name), pair.src,
                             dst or pair.dst, store_url=url, env=env,
                             connections=1,
                             extra_conf=job_conf(workdir, name, sweep), **kw)
        made.append(g)
        try:
            g.start()
        except BaseException:
            for m in made:
                m.stop()
            raise
    return made


def jobs(pg, db):
    """{user: (state, owner, attempts)} of the jobs table."""
    return {r[0]: (r[1], r[2], int(r[3])) for r in pg.admin(
        db, 'SELECT u.name, j.state, j.owner, j.attempts FROM jobs j '
        'JOIN users u ON u.id = j.user_id')}


def copies_started(g, user):
    """The user's copies started in g's log; a cutover's last delta (with
    several gateways every flip has one) is part of the same move."""
    return len(re.findall(r'^.*: %s: copy started$' % re.escape(user),
                          g.log_text(), re.M))


def test_sweep_spread_over_two_gateways(make_pair, pg, new_db, workdir):
    """Two gateways sweep one store: each user moved, its destination the
    same as its source (none missing, none twice), its job taken once and
    its copy started once over both logs; each gateway did some."""
    pair = make_pair(users=SWEEP_USERS)
    db, url = new_db()
    gws = two_gateways(pair, pg, url, workdir, sweep=True)
    try:
        for u in SWEEP_USERS:
            assert gws[0].ctl('user', 'add', u).rc == 0

        def all_moved():
            return all(gws[0].state(u) in ('destination', 'failed')
                       for u in SWEEP_USERS)
        assert wait_for(all_moved, 300, 0.5), \
            gws[0].log_tail() + gws[1].log_tail()
        for u in SWEEP_USERS:
            assert gws[0].state(u) == 'destination', u
    finally:
        for g in gws:
            g.stop()
    for u in SWEEP_USERS:
        pair.assert_copied(u)
    got = jobs(pg, db)
    assert sorted(got) == sorted(SWEEP_USERS), got
    assert all(st == 'done' and n == 1 for st, _, n in got.values()), got
    assert {o for _, o, _ in got.values()} == {'gw-a', 'gw-b'}, got
    for u in SWEEP_USERS:
        assert sum(copies_started(g, u) for g in gws) == 1, u
    assert pg.admin(db, 'SELECT count(*) FROM messages WHERE state = 0') \
        == [['0']]


def test_kill9_other_gateway_finishes(make_pair, pg, new_db, workdir):
    """gw-a killed (-9, at a crash point) with a window of bulk's on the
    destination and its intents open: once its lease expires, gw-b takes
    the job over, resumes the copy from the intent log and moves bulk; the
    destination holds every message once."""
    pair = make_pair(users=('bulk',))
    db, url = new_db()
    a, b = two_gateways(pair, pg, url, workdir, sweep=False,
                        binary=gwlib.MAILSHIFTD_HOOKS,
                        env={'MAILSHIFT_CRASH_AT': 'copy.appended:2'})
    try:
        assert a.ctl('user', 'add', 'bulk').rc == 0
        assert a.ctl('migrate', '--daemon', 'bulk').rc == 0
        a.wait_crashed()
        assert jobs(pg, db) == {'bulk': ('running', 'gw-a', 1)}
        assert int(pg.admin(db, 'SELECT count(*) FROM messages WHERE '
                            'state = 0')[0][0]) > 0
        st = b.wait_state('bulk', ('destination', 'failed'), timeout=180)
        assert st == 'destination', (st, b.log_tail())
        log = b.log_text()
        assert 'bulk: the lease of gateway gw-a on its job (migrate) ' \
            'expired: taken over' in log, log
        assert 'bulk: resuming the interrupted copy' in log, log
    finally:
        a.stop()
        b.stop()
    pair.assert_copied('bulk')
    assert jobs(pg, db) == {'bulk': ('done', 'gw-b', 2)}
    assert pg.admin(db, 'SELECT count(*) FROM messages WHERE state = 0') \
        == [['0']]


def stalled_copy(pair, pg, url, workdir, proxy):
    """gw-a and gw-b with the destination behind proxy, which is stalled;
    then `migrate --daemon bulk` on gw-a: its copy waits there."""
    gws = two_gateways(pair, pg, url, workdir, sweep=False,
                       dst=tcpproxy.Behind(pair.dst, proxy))
    try:
        assert gws[0].ctl('user', 'add', 'bulk').rc == 0
        proxy.stall()
        assert gws[0].ctl('migrate', '--daemon', 'bulk').rc == 0
    except BaseException:
        for g in gws:
            g.stop()
        raise
    return gws


def login_and_out(g, pair, user):
    """A passthrough login of user through g (to the source), then out."""
    m = imaplib.IMAP4('127.0.0.1', g.imap_port)
    try:
        m.login(user, pair.src.password(user))
        assert m.select('INBOX', readonly=True)[0] == 'OK'
    finally:
        m.logout()


def test_lease_renewed_while_copy_runs(make_pair, pg, new_db, workdir):
    """bulk's copy on gw-a held up (the destination stalled behind a proxy)
    for more than three leases: gw-a's renewals keep the job; gw-b, looking
    for expired jobs each second, never takes it, and bulk's first login
    through gw-b starts no copy there beside it; the copy then ends on
    gw-a, exactly once."""
    pair = make_pair(users=('bulk',))
    db, url = new_db()
    proxy = tcpproxy.CuttingProxy(pair.dst.imap_port).start()
    gws = []
    try:
        gws = stalled_copy(pair, pg, url, workdir, proxy)
        a, b = gws
        assert jobs(pg, db) == {'bulk': ('running', 'gw-a', 1)}

        def lease_until():
            return int(pg.admin(db, 'SELECT lease_until FROM jobs')[0][0])
        first = lease_until()
        login_and_out(b, pair, 'bulk')
        assert wait_for(lambda: lease_until() > first + 3 * LEASE * 1000,
                        60, 0.2), a.log_tail()
        assert jobs(pg, db) == {'bulk': ('running', 'gw-a', 1)}
        log = b.log_text()
        assert 'bulk: its job runs on another gateway' in log, log
        assert 'taken over' not in log
        assert copies_started(b, 'bulk') == 0
        proxy.resume()
        st = a.wait_state('bulk', ('destination', 'failed'), timeout=180)
        assert st == 'destination', (st, a.log_tail())
    finally:
        proxy.resume()
        for g in gws:
            g.stop()
        proxy.stop()
    pair.assert_copied('bulk')
    assert jobs(pg, db) == {'bulk': ('done', 'gw-a', 1)}
    assert 'lease lost' not in a.log_text()


def let_go(gws, proxy, stopped):
    """gw-a (gws[0]) continued when stopped, the proxy flowing and
    holding nothing, the gateways and the proxy stopped."""
    if stopped:
        os.kill(gws[0].pid, signal.SIGCONT)
    proxy.resume()
    proxy.release()
    for g in gws:
        g.stop()
    proxy.stop()


def moved_by_b(pair, pg, db, a):
    """bulk moved by gw-b after taking the job over (its second attempt),
    every message once; gw-a, stopped and continued, neither failed nor
    flipped it."""
    pair.assert_copied('bulk')
    assert jobs(pg, db) == {'bulk': ('done', 'gw-b', 2)}
    log = a.log_text()
    assert 'bulk: copy failed' not in log and \
        'bulk: state destination' not in log, log


def test_stalled_gateway_stops_its_copy(make_pair, pg, new_db, workdir):
    """gw-a stopped (SIGSTOP by its PID) while its copy of bulk waits on
    the stalled destination: once its lease expires gw-b takes the job
    over and copies; gw-a continued (SIGCONT) finds its lease taken, stops
    its copy and writes nothing for bulk; gw-b moves bulk, every message
    once."""
    pair = make_pair(users=('bulk',))
    db, url = new_db()
    proxy = tcpproxy.CuttingProxy(pair.dst.imap_port).start()
    gws = []
    stopped = False
    try:
        gws = stalled_copy(pair, pg, url, workdir, proxy)
        a, b = gws
        assert wait_for(lambda: proxy.connections >= 1, 30, 0.05)
        os.kill(a.pid, signal.SIGSTOP)
        stopped = True
        proxy.resume()
        assert wait_for(lambda: 'bulk: copy started' in b.log_text(), 60,
                        0.1), b.log_tail()
        assert 'bulk: the lease of gateway gw-a on its job (migrate) ' \
            'expired: taken over' in b.log_text()
        os.kill(a.pid, signal.SIGCONT)
        stopped = False
        assert wait_for(lambda: 'bulk: lease lost' in a.log_text(), 30,
                        0.1), a.log_tail()
        st = b.wait_state('bulk', ('destination', 'failed'), timeout=180)
        assert st == 'destination', (st, b.log_tail())
        assert a.alive
    finally:
        let_go(gws, proxy, stopped)
    moved_by_b(pair, pg, db, a)
    assert pg.admin(db, "SELECT state, last_error FROM users") == \
        [['destination', '']]


def test_stalled_mid_append_exactly_once(make_pair, pg, new_db, workdir):
    """gw-a stopped (SIGSTOP) with an APPEND of bulk's sent, held back by
    a proxy before the destination (as a busy server carries out a stalled
    client's commands late): gw-b takes the job over once the lease has
    run out and finds the intents of that APPEND open with nothing on the
    destination; while it waits to look again (the settle wait) the held
    APPEND reaches the destination, and gw-b pairs those messages instead
    of sending them again. gw-a continued (SIGCONT) after gw-b has moved
    bulk takes nothing its servers answer: its lease not confirmed for
    longer than the lease, it stops its copy at once, before a command or
    a store write follows from what it reads (the answer to its APPEND).
    Every message once on the destination, no intent left open, no row
    written by gw-a after it was continued."""
    pair = make_pair(users=('bulk',))
    db, url = new_db()
    proxy = tcpproxy.CuttingProxy(pair.dst.imap_port,
                                  hold_from=b' APPEND ').start()
    gws = []
    stopped = False
    try:
        gws = two_gateways(pair, pg, url, workdir, sweep=False,
                           dst=tcpproxy.Behind(pair.dst, proxy))
        a, b = gws
        assert a.ctl('user', 'add', 'bulk').rc == 0
        assert a.ctl('migrate', '--daemon', 'bulk').rc == 0
        assert proxy.holding.wait(60), a.log_tail()
        time.sleep(0.5)         # the rest of the APPEND into the proxy
        os.kill(a.pid, signal.SIGSTOP)
        stopped = True
        assert int(pg.admin(db, 'SELECT count(*) FROM messages WHERE '
                            'state = 0')[0][0]) > 0
        assert wait_for(lambda: 'looking again' in b.log_text(), 60, 0.05), \
            b.log_tail()
        assert 'bulk: the lease of gateway gw-a on its job (migrate) ' \
            'expired: taken over' in b.log_text()
        proxy.release()
        st = b.wait_state('bulk', ('destination', 'failed'), timeout=180)
        assert st == 'destination', (st, b.log_tail())
        before = pg.admin(db, 'SELECT folder_id, src_uid, dst_uid, state '
                          'FROM messages ORDER BY 1, 2')
        os.kill(a.pid, signal.SIGCONT)
        stopped = False
        assert wait_for(lambda: 'bulk: lease lost' in a.log_text(),
                        30, 0.1), a.log_tail()
        time.sleep(1)           # anything gw-a would do next
        assert pg.admin(db, 'SELECT folder_id, src_uid, dst_uid, state '
                        'FROM messages ORDER BY 1, 2') == before
        # stopped by its own clock, not by the renewal's answer
        assert 'bulk: lease lost here' in a.log_text(), a.log_tail()
        assert a.alive
    finally:
        let_go(gws, proxy, stopped)
    moved_by_b(pair, pg, db, a)
    assert pg.admin(db, 'SELECT count(*) FROM messages WHERE state = 0') \
        == [['0']]
