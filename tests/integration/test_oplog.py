"""The log an operator reads (docs/gateway-spec.md, "The log"; mailshiftd -v):
one line per login with its fields, one per session end with its duration
and the bytes relayed each way, each state change of a user once, the start
line at info level, and `mailshiftctl status` without "copying now" when
nothing copies. In front of gpair (test_gateway's fixtures)."""

import base64
import imaplib
import poplib
import re
import socket

import pytest  # noqa: F401  (fixtures)

from conftest import wait_for
from test_gateway import GW_USERS, WRONG_PW, bound_to, gw_imap, read_line
from test_gateway import read_until_close
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)

LOGIN = re.compile(
    r'^\S+ mailshift (?P<level>info|warning): session (?P<id>\d+): login: '
    r'user=<(?P<user>[^>]*)> client=(?P<client>\S+) '
    r'proto=(?P<proto>imap|pop3) mechanism=(?P<mech>\S+) '
    r'tls=(?P<tls>yes|no) server=(?P<server>source|destination|-) '
    r'result=(?P<result>ok|held|failed|unavailable|refused)'
    r'(?: (?P<more>.*))?$', re.M)
END = re.compile(
    r'^\S+ mailshift info: session (?P<id>\d+): end: user=<(?P<user>[^>]*)> '
    r'client=(?P<client>\S+) proto=(?P<proto>imap|pop3) '
    r'server=(?P<server>source|destination) '
    r'duration=(?P<secs>\d+\.\d{3})s in=(?P<in>\d+) out=(?P<out>\d+)$', re.M)


def logins(g):
    return [m.groupdict() for m in LOGIN.finditer(g.log_text())]


def ends(g):
    return {m['id']: m.groupdict() for m in END.finditer(g.log_text())}


def raw_session(g, user):
    """LOGIN on a raw socket from 127.0.0.2, then NOOP and LOGOUT: (client
    port, bytes sent after the login, bytes received after its tagged
    OK)."""
    s = socket.create_connection(('127.0.0.1', g.imap_port), timeout=30,
                                 source_address=('127.0.0.2', 0))
    try:
        assert read_line(s).startswith(b'* OK')
        s.sendall(b'a1 LOGIN %s %s\r\n' % (user.encode(),
                                            GW_USERS[user].encode()))
        while True:
            line = read_line(s)
            assert line, 'closed at the login'
            if line.startswith(b'a1 '):
                assert line.startswith(b'a1 OK'), line
                break
        after = b'a2 NOOP\r\na3 LOGOUT\r\n'
        s.sendall(after)
        got, closed = read_until_close(s, timeout=30)
        assert closed and b'a3 OK' in got, got
        return s.getsockname()[1], len(after), len(got)
    finally:
        s.close()


def test_login_and_session_end_lines(make_gw, ca):
    """Each login's line names the user, the client's address and port, the
    protocol, the mechanism, TLS, the server and the result; a session's
    end its duration and the bytes relayed each way, exactly."""
    g = make_gw(tls=True, policy='off',
                extra_conf='[listen]\ntrusted_networks = 127.0.0.2')
    # Plaintext from outside the trusted networks: refused, no server
    # asked, the mechanism named all the same.
    s = socket.create_connection(('127.0.0.1', g.imap_port), timeout=30)
    try:
        assert read_line(s).startswith(b'* OK')
        ir = base64.b64encode(b'\0alice\0x')
        s.sendall(b'a1 AUTHENTICATE PLAIN %s\r\n' % ir)
        assert read_line(s).startswith(b'a1 NO [PRIVACYREQUIRED]')
    finally:
        s.close()
    # IMAP LOGIN in the clear from a trusted address; a wrong password.
    m = bound_to(imaplib.IMAP4, '127.0.0.2')('127.0.0.1', g.imap_port,
                                             timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        m.login('alice', WRONG_PW)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()
    # AUTHENTICATE PLAIN over implicit TLS.
    m = gw_imap(g, tls=True, ca=ca)
    assert m.authenticate('PLAIN', lambda _: (
        '\0bob\0%s' % GW_USERS['bob']).encode())[0] == 'OK'
    m.logout()
    # POP3 USER and PASS.
    p = bound_to(poplib.POP3, '127.0.0.2')('127.0.0.1', g.pop3_port,
                                           timeout=30)
    p.user('carol')
    p.pass_(GW_USERS['carol'])
    p.quit()
    # A raw session whose bytes are counted here too.
    port, sent, got = raw_session(g, 'alice')

    def have():
        return len(logins(g)) >= 6 and len(ends(g)) >= 4
    assert wait_for(have, 15), g.log_tail(30)
    ls = logins(g)
    want = [
        ('?', 'imap', 'sasl-plain', 'no', '-', 'refused'),
        ('alice', 'imap', 'imap-login', 'no', 'source', 'failed'),
        ('alice', 'imap', 'imap-login', 'no', 'source', 'ok'),
        ('bob', 'imap', 'sasl-plain', 'yes', 'source', 'ok'),
        ('carol', 'pop3', 'pop3-user', 'no', 'source', 'ok'),
        ('alice', 'imap', 'imap-login', 'no', 'source', 'ok')]
    assert [(x['user'], x['proto'], x['mech'], x['tls'], x['server'],
             x['result']) for x in ls] == want, ls
    assert all(x['level'] == 'info' for x in ls), ls
    assert ls[0]['more'].startswith('reason=plaintext login refused'), ls[0]
    assert ls[0]['client'].startswith('127.0.0.1:'), ls[0]
    assert re.fullmatch(r'delay=\d+ms', ls[1]['more']), ls[1]
    assert ls[1]['client'] == ls[2]['client'] and \
        ls[1]['client'].startswith('127.0.0.2:'), ls[1:3]
    assert ls[5]['client'] == '127.0.0.2:%d' % port, (ls[5], port)
    assert all(x['more'] is None for x in ls[2:]), ls
    # One end per session that logged in, with the same user and client.
    e = ends(g)
    for x in ls[2:]:
        assert x['id'] in e, (x, e)
        assert (e[x['id']]['user'], e[x['id']]['client'],
                e[x['id']]['proto'], e[x['id']]['server']) == \
            (x['user'], x['client'], x['proto'], x['server']), (x, e)
        assert int(e[x['id']]['in']) > 0 and int(e[x['id']]['out']) > 0, e
    assert ls[0]['id'] not in e and ls[1]['id'] == ls[2]['id'], (ls, e)
    raw = e[ls[5]['id']]
    assert (int(raw['in']), int(raw['out'])) == (sent, got), (raw, sent,
                                                             got)
    assert float(raw['secs']) >= 0.0


def test_state_changes_logged_once(make_gw):
    """A user moved on first login: each state change is logged once, in
    order; the start line is info, not a warning; once the user is across,
    `status` says nothing of copying."""
    g = make_gw(tls=False, policy='passthrough')
    m = gw_imap(g)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.select('INBOX')
    m.logout()
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination'
    m = gw_imap(g)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()
    assert wait_for(lambda: len(ends(g)) >= 2, 15), g.log_tail(20)
    log = g.log_text()
    states = re.findall(r'^\S+ mailshift info: alice: state (\w+)$', log,
                        re.M)
    assert states == ['copying', 'cutover', 'destination'], log[-3000:]
    assert re.search(r'^\S+ mailshift info: mailshiftd ready ', log, re.M), \
        log[:2000]
    assert 'warning: mailshiftd ready' not in log
    servers = [x['server'] for x in logins(g)]
    assert servers == ['source', 'destination'], logins(g)
    r = g.ctl('status', '--json')
    assert (r.json['copy_messages_done'], r.json['copy_messages_todo']) == \
        (0, 0), r.describe()
    r = g.ctl('status')
    assert r.rc == 0 and 'copying now' not in r.stdout, r.stdout



def test_held_login_lines(make_gw):
    """A held login (policy hold): `held` at the source that checked the
    password, then `ok` at the destination it went on to, one session."""
    g = make_gw(tls=False, policy='hold')
    m = gw_imap(g)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()
    assert wait_for(lambda: len(ends(g)) >= 1, 60), g.log_tail(20)
    ls = logins(g)
    assert [(x['server'], x['result']) for x in ls] == \
        [('source', 'held'), ('destination', 'ok')], ls
    assert ls[0]['id'] == ls[1]['id'] and ls[0]['more'] is None, ls
    assert list(ends(g).values())[0]['server'] == 'destination', ends(g)
