"""The quiet period before a flip ([policy] flip_quiet, mailshift.conf(5)):
a verified user flips only once no session to the source has been open for
that long, so a client that reconnects for each folder (neomutt) is not
flipped between two connections; a login inside the period goes to the
source with its session whole, and its end starts the wait again. Real
Dovecots (test_gateway's gpair); `mailshiftd -t` checks the range."""

import re
import subprocess
import time

import gateway as gwlib
import mailcheck as mc
from conftest import wait_for
from test_gateway import GW_USERS, gw_imap
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_gateway_ops import admin_conf
from test_privileges import minimal_conf

QUIET = 4
# A flip seen this much before its time by our clock is a failure: the
# daemon's timers run on libuv's cached clock, a little behind ours.
SLACK = 0.3


def login(g):
    m = gw_imap(g)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    return m


def source_logins(g):
    return re.findall(r'login: user=<alice> .* server=(\w+) result=ok$',
                      g.log_text(), re.M)


def test_reconnect_inside_the_quiet_period(gpair, make_gw):
    """alice's copy is verified while her session is open. She logs out
    and straight back in (as neomutt does for another folder): the new
    session reaches the source and works for longer than the period, still
    on the source; she logs out again and the flip comes no sooner than
    flip_quiet after that, carrying what she did in the second session."""
    g = make_gw(tls=False, policy='passthrough', flip_quiet=QUIET)
    m = login(g)
    m.select('INBOX')
    assert wait_for(lambda: (g.user('alice') or {}).get('copy') ==
                    'verified, flips at log-off', 60), g.user('alice')
    m.logout()
    t0 = time.monotonic()
    m = login(g)
    assert source_logins(g) == ['source', 'source'], g.log_tail(10)
    typ, data = m.select('INBOX')
    assert typ == 'OK', data
    # The session stays whole past the first period: never a BYE, the
    # user never flipped while it is open.
    while time.monotonic() - t0 < QUIET + 1:
        assert g.state('alice') == 'copying', g.log_tail(10)
        assert m.noop()[0] == 'OK'
        time.sleep(0.2)
    msg = mc.make_message(424242, 300)
    assert m.append('INBOX', None, None, msg)[0] == 'OK'
    m.logout()
    t1 = time.monotonic()
    st = g.wait_state('alice', ('cutover', 'destination', 'failed'),
                      timeout=QUIET + 60, interval=0.05)
    waited = time.monotonic() - t1
    assert st in ('cutover', 'destination'), (st, g.log_tail(20))
    assert waited >= QUIET - SLACK, \
        'flipped %.2f s after the last session, before flip_quiet' % waited
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail(20)
    # What the second session appended reached the destination.
    gpair.assert_copied('alice')
    assert g.log_text().count('alice: no session open: flips in %d s '
                              'unless the user logs in again' % QUIET) == 2
    m = login(g)
    m.logout()
    assert wait_for(lambda: source_logins(g)[-1:] == ['destination'], 10), \
        g.log_tail(10)


def test_operator_move_does_not_wait(gpair, make_gw, workdir):
    """With a period of an hour, `migrate --daemon` still moves at once: a
    user in her quiet period (verified, logged out), and one with a session
    open (ended with a BYE)."""
    g = make_gw(tls=False, policy='passthrough', flip_quiet=3600,
                extra_conf=admin_conf(workdir, sweep=False))
    m = login(g)
    assert wait_for(lambda: (g.user('alice') or {}).get('copy') ==
                    'verified, flips at log-off', 60), g.user('alice')
    m.logout()
    assert wait_for(lambda: 'alice: no session open: flips in 3600 s' in
                    g.log_text(), 10), g.log_tail(10)
    assert g.state('alice') == 'copying'
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail(20)
    m = gw_imap(g)
    assert m.login('bob', GW_USERS['bob'])[0] == 'OK'
    m.select('INBOX')
    assert g.ctl('migrate', '--daemon', 'bob').rc == 0
    assert g.wait_state('bob', ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail(20)
    assert 'bob: no session open' not in g.log_text()
    gpair.assert_copied('alice')
    gpair.assert_copied('bob')


def test_flip_quiet_range(workdir):
    """`mailshiftd -t` takes 0 to 1 h and refuses more, or no duration."""
    conf = minimal_conf(workdir, user=False)
    text = open(conf).read()
    for value, ok in (('0', True), ('5s', True), ('1h', True),
                      ('3601', False), ('2h', False), ('soon', False)):
        with open(conf, 'w') as f:
            f.write('[policy]\nflip_quiet = %s\n' % value + text)
        r = subprocess.run([gwlib.MAILSHIFTD, '-t', '-c', conf],
                           capture_output=True, text=True, timeout=30)
        if ok:
            assert r.returncode == 0 and 'configuration ok' in r.stdout, \
                (value, r)
        else:
            assert r.returncode == 2 and r.stderr == (
                'mailshiftd: %s:2: flip_quiet: "%s" is not a duration from '
                '0s to 1h (a number with s, m or h)\n' % (conf, value)), \
                (value, r)
