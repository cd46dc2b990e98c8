"""The sweep protects the source (docs/mover.md, "Protecting the source"):
many users copied at once under one connection cap per server, a cap on
the commands per second the source sees (all users together), both
changed while mailshiftd runs (`mailshiftctl policy`), the back-off when
the source says it is busy ([UNAVAILABLE]) and the recovery after it; and
bad input (a login refused, a folder refused, connections dropped) fails
that user alone, with its reason, and a retry copies nothing twice.

The source and the destination are real Dovecots seen through
tests/lib/throttleproxy.py, which counts the commands and the logged-in
connections each server sees and plays the busy or broken server."""

import os
import time

import pytest

import mailcheck as mc
import tcpproxy
import throttleproxy
import gateway as gwlib
from conftest import (MASTER, Migrator, Pair, dst_server, src_server,
                      stop_all, wait_for)
from test_gateway_ops import admin_conf

USERS = ['pace%d' % i for i in range(8)]
SRC_PW = {u: 'Src-%s-Pw-9q' % u for u in USERS}
DST_PW = {u: pw.replace('Src-', 'Dst-') for u, pw in SRC_PW.items()}
FOLDERS = ('INBOX', 'Work', 'Archive')
BIG = 'pace6'   # INBOX: 230 messages, three copy windows: the next window's
                # metadata FETCH goes while the last one's bodies stream
SLACK = 8       # commands that cannot wait (logins): debt the bucket repays
JITTER = 0.5    # seconds the proxy's threads may see commands late, bunched
LOGIN_BUSY = b'NO [UNAVAILABLE] Temporary authentication failure.'


@pytest.fixture
def site(workdir, ca):
    """Eight users, three folders of five messages each (BIG's INBOX 230),
    on the source; an empty destination; both behind a ThrottleProxy."""
    src = src_server(workdir, ca, dict(SRC_PW))
    dst = dst_server(workdir, ca, dict(DST_PW))
    proxies = []
    try:
        src.start()
        dst.start()
        for n, u in enumerate(USERS):
            m = src.imap(u)
            try:
                for f, folder in enumerate(FOLDERS):
                    if folder != 'INBOX':
                        mc.create_folder(m, folder)
                    count = 230 if (u, folder) == (BIG, 'INBOX') else 5
                    mc.append_many(m, folder, [
                        (mc.make_message(70000 + n * 1000 + f * 300 + i, 800),
                         ['\\Seen'] if i % 2 else [], None)
                        for i in range(count)])
            finally:
                m.logout()
        pair = Pair(workdir, src, dst)
        pair.sproxy = throttleproxy.ThrottleProxy(src.imap_port).start()
        proxies.append(pair.sproxy)
        pair.dproxy = throttleproxy.ThrottleProxy(dst.imap_port).start()
        proxies.append(pair.dproxy)
        yield pair
    finally:
        for p in proxies:
            print('proxy errors: %s' % p.errors)
            p.stop()
        stop_all(src, dst)


@pytest.fixture
def make_site_gw(site, workdir):
    """make_site_gw(connections, conf) -> a started mailshiftd in front of
    the site's proxies, with admin logins and conf's lines added."""
    made = []

    def make(connections, conf=''):
        g = gwlib.Mailshiftd(os.path.join(workdir, 'gw%d' % len(made)),
                             tcpproxy.Behind(site.src, site.sproxy),
                             tcpproxy.Behind(site.dst, site.dproxy),
                             connections=connections,
                             extra_conf=admin_conf(workdir, sweep=False) +
                             '\n' + conf)
        made.append(g)
        g.start()
        return g
    yield make
    for g in made:
        g.stop()
        print('----- mailshiftd %s (last lines)\n%s' % (g.log_path,
                                                        g.log_tail(80)))
    assert not site.sproxy.errors and not site.dproxy.errors, \
        (site.sproxy.errors, site.dproxy.errors)


def sweep_conf(concurrency=8):
    return '[sweep]\nenabled = yes\ninterval = 1\nconcurrency = %d\n' \
        % concurrency


def add_users(g, users=USERS):
    for u in users:
        r = g.ctl('user', 'add', u)
        assert r.rc == 0, r.describe()


def states(g):
    res = g.ctl('user', 'list', '--json')
    assert res.rc == 0, res.describe()
    return {u['user']: u for u in res.json['users']}


def wait_settled(g, users=USERS, timeout=240):
    """Waits until every user is on the destination or failed; returns
    {user: record}."""
    last = {}

    def settled():
        last.update(states(g))
        return all(last.get(u, {}).get('state') in ('destination', 'failed')
                   for u in users)
    assert wait_for(settled, timeout, 0.5), (
        {u: last.get(u, {}).get('state') for u in users}, g.log_tail(60),
        g.ctl('status').stdout)
    return last


def mover_status(g):
    res = g.ctl('status', '--json')
    assert res.rc == 0, res.describe()
    return res.json['mover']


def user_commands(proxy, since=0.0):
    """The times of the commands of logged-in sessions and of logins (not
    the daemon's capability probes, which never log in)."""
    return [t for t, u, _ in proxy.commands if u is not None and t >= since]


def max_in_window(times, seconds):
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - seconds:
            j += 1
        best = max(best, i - j + 1)
    return best


def cap_bound(rate, seconds=2.0):
    """The most commands a cap of rate lets through in `seconds`, as the
    proxy counts them: its burst (a second's worth), the logins that
    cannot wait, and the proxy's own lateness."""
    return int(rate * (seconds + JITTER) + rate + SLACK)


def assert_all_copied(site, g, users=USERS):
    for u in users:
        st = g.state(u)
        assert st == 'destination', (u, st, g.user(u), g.log_tail(40))
        site.assert_copied(u)


# ------------------------------------------------------------------ tests

def test_pace_and_connection_caps_hold(site, make_site_gw):
    """Eight users swept at once, 3 connections per server, 15 commands a
    second to the source: the source never sees more than 3 logged-in
    connections of ours, nor more commands in any 2 s than the cap
    allows (its burst of a second's worth, and the logins that cannot
    wait); the destination never more than 3 connections."""
    rate = 15
    g = make_site_gw(3, '[source]\ncommands_per_second = %d\n' % rate +
                     sweep_conf(8))
    m = mover_status(g)
    assert m['connections'] == 3 and m['commands_per_second'] == rate, m
    add_users(g)
    wait_settled(g)
    assert_all_copied(site, g)
    times = user_commands(site.sproxy)
    bound = cap_bound(rate)
    # the copy asks for far more than the cap lets through: the cap bit
    assert len(times) > 3 * bound, 'harness: %d commands only' % len(times)
    worst = max_in_window(times, 2.0)
    span = times[-1] - times[0]
    print('%d commands in %.1f s, at most %d in 2 s (bound %d); logged-in '
          'connections at most %d / %d' % (len(times), span, worst, bound,
                                          site.sproxy.max_logged,
                                          site.dproxy.max_logged))
    assert worst <= bound, (worst, bound)
    assert span >= (len(times) - rate - SLACK) / rate, (span, len(times))
    assert site.sproxy.max_logged <= 3, site.sproxy.max_logged
    assert site.dproxy.max_logged <= 3, site.dproxy.max_logged
    # more than one user at once: the budget is shared, not per user
    assert site.sproxy.max_users >= 2, site.sproxy.max_users
    m = mover_status(g)
    assert m['source_commands'] >= len(times) - SLACK, (m, len(times))
    r = g.ctl('status')
    assert 'commands per second to the source: 15.0' in r.stdout, r.stdout


def test_migrate_commands_per_second(site, ctl, workdir):
    """The standalone `mailshiftctl migrate --commands-per-second`: the
    eight users copied in one run through the master user, 3 connections
    per server, 15 commands a second to the source: no 2 s holds more
    than the cap lets through, the copy took as long as the cap makes it,
    and every user is on the destination, whole."""
    rate = 15
    m = Migrator(ctl, site, os.path.join(workdir, 'cps.db'))
    src = tcpproxy.Behind(site.src, site.sproxy).url('imap')
    dst = tcpproxy.Behind(site.dst, site.dproxy).url('imap')
    res = m.run(USERS, '--source-admin', MASTER[0], '--dest-admin',
                MASTER[0], '--connections', '3', '--commands-per-second',
                str(rate), src_password=MASTER[1], dst_password=MASTER[1],
                source=src, dest=dst, timeout=300)
    assert res.rc == 0, res.describe()
    for u in USERS:
        site.assert_copied(u)
    times = user_commands(site.sproxy)
    bound = cap_bound(rate)
    assert len(times) > 3 * bound, 'harness: %d commands only' % len(times)
    worst = max_in_window(times, 2.0)
    print('%d commands in %.1f s, at most %d in 2 s (bound %d)'
          % (len(times), times[-1] - times[0], worst, bound))
    assert worst <= bound, (worst, bound)
    assert times[-1] - times[0] >= (len(times) - rate - SLACK) / rate
    assert site.sproxy.max_logged <= 3, site.sproxy.max_logged
    r = m.run(USERS[:1], '--commands-per-second', 'fast',
              src_password=False, dst_password=False, source=src, dest=dst)
    assert r.rc == 2 and '--commands-per-second' in r.stderr, r.describe()


def test_policy_changes_caps_mid_sweep(site, make_site_gw):
    """`mailshiftctl policy --commands-per-second` and `--connections`
    while the sweep runs: the new pace is taken at once (more commands in
    2 s than the old cap allowed), and the connections above the lowered
    cap are given back as their folder ends, no copy cut: every user
    ends on the destination, whole."""
    old = 4
    g = make_site_gw(3, '[source]\ncommands_per_second = %d\n' % old +
                     sweep_conf(8))
    add_users(g)
    assert wait_for(lambda: len(user_commands(site.sproxy)) >= 30, 120,
                    0.1), g.log_tail(40)
    before = max_in_window(user_commands(site.sproxy), 2.0)
    old_bound = cap_bound(old)
    assert before <= old_bound, (before, old_bound)
    r = g.ctl('policy', '--commands-per-second', '400', '--connections',
              '1')
    assert r.rc == 0, r.describe()
    assert 'commands per second to the source: 400.0' in r.stdout, r.stdout
    changed = time.monotonic()
    m = mover_status(g)
    assert m['connections'] == 1 and m['commands_per_second'] == 400, m
    # the surplus connections go as their folders end
    assert wait_for(lambda: site.sproxy.logged_open() <= 1 and
                    site.dproxy.logged_open() <= 1, 120, 0.05), \
        (site.sproxy.logged_open(), site.dproxy.logged_open())
    site.sproxy.reset_max()
    site.dproxy.reset_max()
    wait_settled(g)
    assert_all_copied(site, g)
    after = max_in_window(user_commands(site.sproxy, changed), 2.0)
    assert after > old_bound, (after, old_bound)
    assert site.sproxy.max_logged <= 1, site.sproxy.max_logged
    assert site.dproxy.max_logged <= 1, site.dproxy.max_logged
    assert 'connections per server: 1 (were 3)' in g.log_text()


def test_backoff_on_unavailable_recovers(site, make_site_gw):
    """The source answers four commands "NO [UNAVAILABLE]" and refuses a
    user's first two logins the same way: the mover lowers its pace (said
    once per change, shown by status), sends the refused commands and
    logins again later, copies everyone, and comes back to full pace."""
    g = make_site_gw(2, sweep_conf(8))
    site.sproxy.busy(4)
    site.sproxy.refuse_login['pace3'] = (2, LOGIN_BUSY)
    add_users(g)
    seen = {}

    def backing_off():
        m = mover_status(g)
        if m['backing_off']:
            seen.update(m)
        return bool(seen) or all(
            u['state'] in ('destination', 'failed')
            for u in states(g).values())
    assert wait_for(backing_off, 120, 0.1), g.log_tail(40)
    assert seen, 'status never showed the back-off\n' + g.log_tail(40)
    assert 'UNAVAILABLE' in seen['backoff_reason'], seen
    assert 0 < seen['pace'], seen
    wait_settled(g)
    assert_all_copied(site, g)
    assert site.sproxy.refused == 4, site.sproxy.refused
    log = g.log_text()
    assert 'is busy (' in log and 'commands per second lowered to' in log, \
        g.log_tail(60)
    assert 'sent again in' in log, g.log_tail(60)
    assert 'pace3: source: login failed: NO [UNAVAILABLE]' in log and \
        'logging in again in' in log, g.log_tail(60)
    # recovery: step by step, then the full pace again
    assert wait_for(lambda: not mover_status(g)['backing_off'], 120, 0.5), \
        mover_status(g)
    assert 'back to full pace' in g.log_text(), g.log_tail(40)
    m = mover_status(g)
    assert m['backoffs'] >= 1 and m['pace'] == 0, m


def test_pipelined_busy_reopens_folder(site, make_site_gw):
    """A busy refusal of a command pipelined behind another (BIG's next
    metadata FETCH while its bodies stream) cannot be sent again alone:
    the folder is given back and opened again after the back-off's wait,
    and the copy ends exact, nothing twice."""
    g = make_site_gw(2)
    site.sproxy.refuse_pipelined[(BIG, 'FETCH')] = throttleproxy.BUSY_REPLY
    add_users(g, [BIG])
    r = g.ctl('migrate', '--daemon', BIG)
    assert r.rc == 0, r.describe()
    wait_settled(g, [BIG])
    assert site.sproxy.refused_pipelined == 1, \
        'harness: no FETCH of %s was pipelined' % BIG
    assert_all_copied(site, g, [BIG])
    log = g.log_text()
    assert '%s: folder "INBOX": FETCH: NO [UNAVAILABLE]' % BIG in log and \
        'reconnecting (retry 1 of 3)' in log, g.log_tail(60)


def test_bad_input_fails_one_user_only(site, make_site_gw):
    """`migrate --all` with three broken users: pace0's login is refused
    (AUTHENTICATIONFAILED), pace1's folder Work is refused, every
    connection of pace2 is reset at its first body fetch. Those three are
    failed with their reasons; the five others are copied whole. Once the
    source behaves, migrating the three again copies each message once."""
    g = make_site_gw(3)
    site.sproxy.refuse_login['pace0'] = (
        None, b'NO [AUTHENTICATIONFAILED] Authentication failed.')
    site.sproxy.refuse_folder[('pace1', 'Work')] = \
        b'NO [SERVERBUG] Internal error occurred.'
    site.sproxy.drop_at_body_fetch.add('pace2')
    add_users(g)
    r = g.ctl('migrate', '--all')
    assert r.rc == 0, r.describe()
    got = wait_settled(g)
    bad = ('pace0', 'pace1', 'pace2')
    for u in bad:
        assert got[u]['state'] == 'failed', (u, got[u])
    assert 'AUTHENTICATIONFAILED' in got['pace0']['error'], got['pace0']
    assert 'Work' in got['pace1']['error'] and \
        'SERVERBUG' in got['pace1']['error'], got['pace1']
    assert 'FETCH' in got['pace2']['error'] and \
        'closed' in got['pace2']['error'], got['pace2']
    assert site.sproxy.dropped >= 1, site.sproxy.dropped
    assert_all_copied(site, g, [u for u in USERS if u not in bad])
    # the source behaves again: the three are moved, nothing twice
    site.sproxy.refuse_login.clear()
    site.sproxy.refuse_folder.clear()
    site.sproxy.drop_at_body_fetch.clear()
    for u in bad:
        r = g.ctl('migrate', '--daemon', u)
        assert r.rc == 0, r.describe()
    wait_settled(g)
    assert_all_copied(site, g)
