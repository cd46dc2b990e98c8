"""mailshiftd operations: the background sweep with admin (master) logins,
metrics, recovery of an interrupted cutover, and kill -9 of the daemon in
the middle of a copy (no message lost or duplicated after the restart).

Reuses the fixtures of test_gateway.py (gpair: a source holding alice's and
bob's corpora, an empty destination; make_gw: a started mailshiftd)."""

import imaplib
import json
import os
import re
import select
import socket
import time
import zlib

import pytest

import corpus
import dovecot
import fakeserver
import gateway as gwlib
import mailcheck as mc
from conftest import MASTER, Migrator, store_rows, wait_for
from test_gateway import (GW_USERS, count_msgid, direct, exists, marker,
                          read_line, sessions)
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)


def admin_conf(workdir, mode=0o600, sweep=True, metrics_port=None):
    pwf = os.path.join(workdir, 'admin.pw')
    with open(pwf, 'w') as f:
        f.write(MASTER[1] + '\n')
    os.chmod(pwf, mode)
    lines = ['[source]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf,
             '[destination]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf]
    if sweep:
        lines += ['[sweep]', 'enabled = yes', 'interval = 1',
                  'concurrency = 1']
    if metrics_port:
        lines += ['[metrics]', 'listen = 127.0.0.1:%d' % metrics_port]
    return '\n'.join(lines)


def http_get(port, path='/metrics'):
    s = socket.create_connection(('127.0.0.1', port), timeout=10)
    s.sendall(b'GET ' + path.encode() + b' HTTP/1.0\r\n\r\n')
    data = b''
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    return data.decode()


def test_sweep_moves_users_who_never_log_in(gpair, make_gw, workdir):
    port = gwlib.free_port() if hasattr(gwlib, 'free_port') else None
    if port is None:
        import dovecot
        port = dovecot.free_port()
    g = make_gw(tls=False, policy='passthrough',
                extra_conf=admin_conf(workdir, metrics_port=port))
    for u in ('alice', 'bob'):
        r = g.ctl('user', 'add', u, '--json')
        assert r.rc == 0, r.describe()
    # Nobody logs in: the sweep moves both, one at a time.
    for u in ('alice', 'bob'):
        st = g.wait_state(u, ('destination', 'failed'), timeout=60)
        assert st == 'destination', (u, st, g.log_tail())
        gpair.assert_copied(u)
    text = http_get(port)
    assert text.startswith('HTTP/1.0 200'), text
    assert re.search(r'^mailshift_users\{gateway="[^"]*",state="destination"'
                     r'\} 2$', text, re.M), text
    assert 'mailshift_messages_copied_total' in text, text


def test_admin_password_file_must_be_root_only(gpair, workdir):
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gwbad'), gpair.src, gpair.dst,
                         extra_conf=admin_conf(workdir, mode=0o644))
    with pytest.raises(Exception) as e:
        g.start(timeout=5)
    g.stop()
    assert 'readable by others' in g.log_text() or 'readable by others' in \
        str(e.value), (str(e.value), g.log_text())


def hooked_gw(make_gw, workdir, point, **kw):
    """A started hook build of mailshiftd (make hooks) that kills itself at
    crash point (daemon/testhook.h); admin logins, no sweep: nothing but
    the start resumes an interrupted copy."""
    return make_gw(tls=False, policy='passthrough', connections=1,
                   extra_conf=admin_conf(workdir, sweep=False),
                   binary=gwlib.MAILSHIFTD_HOOKS,
                   env={'MAILSHIFT_CRASH_AT': point}, **kw)


def restart_resumed(g, user):
    """Starts a daemon that died at its crash point again, without it, and
    checks that the start itself resumed the user's copy to its end."""
    g.restart_after_crash()
    st = g.wait_state(user, ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())
    assert '%s: resuming the interrupted copy' % user in g.log_text()


def store_state(g, user):
    """The user's state in the store of a daemon that is not running."""
    return store_rows(g.store_path, "SELECT state FROM users WHERE name = "
                      "'%s'" % user)[0][0]


def inbox_done(g, user):
    """Messages of the user's INBOX the store records done."""
    return store_rows(g.store_path, "SELECT count(*) FROM messages m, "
                      "folders f, users u WHERE m.folder_id = f.id AND "
                      "f.user_id = u.id AND u.name = '%s' AND f.src_name = "
                      "'INBOX' AND m.state = 1" % user)[0][0]


def precopied_gw(gpair, make_gw, workdir, ctl, point, user='alice'):
    """A hook build of mailshiftd dying at point, over a store into which
    `mailshiftctl migrate` copied the user first: the copy that runs while
    the user is logged in then copies nothing, and the first time a copy
    point is reached is in the cutover."""
    g = hooked_gw(make_gw, workdir, point)
    g.stop()
    Migrator(ctl, gpair, g.store_path).run(
        user, src_password=GW_USERS[user], dst_password=GW_USERS[user],
        expect_rc=0)
    g.start()
    return g


def session_then_cutover(g, user, work):
    """The user logs in through the gateway, waits until the copy is
    verified, calls work(imap) (changes on the source) and logs off: the
    cutover begins. The daemon must stay alive until then (a crash point
    reached too early fails here)."""
    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=60)
    assert m.login(user, GW_USERS[user])[0] == 'OK'
    wait_for(lambda: not g.alive or (g.user(user) or {}).get(
        'copy', '').startswith('verified'), 60, interval=0.05)
    assert g.alive, 'mailshiftd died before the cutover:\n' + g.log_tail()
    assert g.user(user)['copy'].startswith('verified'), g.user(user)
    work(m)
    m.logout()


def test_interrupted_cutover_is_resumed(gpair, make_gw, workdir, ctl):
    """The daemon dies in a real cutover, after the grace, with the whole
    delta (mail the user added on the source in the session) still to
    copy: at start the user goes back to copying and, with admin logins,
    is copied and flipped at once."""
    g = precopied_gw(gpair, make_gw, workdir, ctl, 'cutover.grace')
    before = gpair.dst_snapshot('alice')
    session_then_cutover(g, 'alice', lambda m: mc.append_many(m, 'INBOX', [
        (mc.make_message(690000 + i, 700), [['\\Seen'], []][i % 2],
         1500000000 + i) for i in range(25)]))
    g.wait_crashed()
    assert store_state(g, 'alice') == 'cutover'
    assert gpair.dst_snapshot('alice') == before, 'the delta had begun'
    restart_resumed(g, 'alice')
    gpair.assert_copied('alice')


def test_kill9_daemon_in_cutover(gpair, make_gw, workdir, ctl):
    """kill -9 of mailshiftd during a real cutover, 200 messages into a
    delta of 450 the user added on the source through the gateway: after
    the restart nothing is lost or duplicated and the user ends on the
    destination."""
    g = precopied_gw(gpair, make_gw, workdir, ctl, 'copy.recorded:2')
    session_then_cutover(g, 'alice', lambda m: mc.append_many(m, 'INBOX', [
        (mc.make_message(700000 + i, 800), (), 1500000000 + i)
        for i in range(450)]))
    g.wait_crashed()
    assert store_state(g, 'alice') == 'cutover'
    # Two windows of the delta recorded; later ones may be on the
    # destination already, their intents open.
    total = len(direct(gpair.src, 'alice', mc.snapshot)['INBOX'])
    assert inbox_done(g, 'alice') == total - 250
    assert len(gpair.dst_snapshot('alice')['INBOX']) >= total - 250
    restart_resumed(g, 'alice')
    gpair.assert_copied('alice')


def test_kill9_daemon_mid_copy(gpair, make_gw, workdir):
    """kill -9 of mailshiftd in the middle of a copy (no sweep, nobody
    logs in): the start resumes it; nothing is lost or copied twice."""
    m = gpair.src.imap('alice')
    try:
        mc.append_many(m, 'INBOX', [(mc.make_message(900000 + i, 600), (),
                                     1500000000 + i) for i in range(300)])
    finally:
        m.logout()
    g = hooked_gw(make_gw, workdir, 'copy.recorded:2')
    assert g.ctl('user', 'add', 'alice').rc == 0
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    g.wait_crashed()
    assert store_state(g, 'alice') == 'copying'
    # INBOX first (the biggest): two windows of 100 recorded of its 300
    # and more.
    assert inbox_done(g, 'alice') == 200
    restart_resumed(g, 'alice')
    gpair.assert_copied('alice')


class RefusingIMAP(fakeserver.LoopbackServer):
    """A loopback IMAP server that refuses every login at once (Dovecot
    slows repeated failures down itself, which would hide ours)."""

    pop3_port = None
    tls_ca = None
    greeting = b'* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] x\r\n'

    def url(self, scheme='imap'):
        return 'imap://127.0.0.1:%d' % self.port

    def handle(self, c, n):
        with c:
            c.sendall(self.greeting)
            for line in c.makefile('rb'):
                tag = line.split(b' ', 1)[0]
                if b' AUTHENTICATE ' in line.upper():
                    c.sendall(tag + b' NO [AUTHENTICATIONFAILED] '
                              b'Authentication failed.\r\n')
                else:
                    c.sendall(tag + b' OK done\r\n')


def reply_delays(g, addr):
    """The delays (ms) mailshiftd -v logged for the replies to failed logins
    from addr, in order."""
    return [int(d) for d in re.findall(
        r' client=%s:\d+ .* result=failed delay=(\d+)ms$' % re.escape(addr),
        g.log_text(), re.M)]


def test_repeated_failures_are_slowed_down(workdir):
    """The first two failures from an address are answered at once, later
    ones after a growing pause (1 s, then 2 s); another address is not
    slowed down. The daemon's log says which delay each reply got; the
    client's monotonic clock shows it waited at least that; and the order of
    the answers shows the other address was not held: answered while the
    first one's penalised reply was still due."""
    fake = RefusingIMAP()
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gwpen'), fake, fake,
                         policy='off', src_schemes=('imap', None),
                         dst_schemes=('imap', None))
    a = b = None
    try:
        g.start()
        a = socket.create_connection(('127.0.0.1', g.imap_port), timeout=60)
        assert read_line(a).startswith(b'* OK')
        took = []
        for i in range(4):
            t = time.monotonic()
            a.sendall(b'a%d LOGIN alice wrong-%d\r\n' % (i, i))
            if i == 3:
                break
            reply = read_line(a)
            took.append(time.monotonic() - t)
            assert reply.startswith(b'a%d NO [AUTHENTICATIONFAILED]' % i), \
                reply
        assert reply_delays(g, '127.0.0.1')[:3] == [0, 0, 1000], g.log_tail()
        assert took[2] >= 0.9, took
        # The 4th is held 2 s. Meanwhile another address (a second
        # connection from 127.0.0.2) fails its first login: answered at
        # once, so before the 4th.
        assert wait_for(lambda: reply_delays(g, '127.0.0.1') ==
                        [0, 0, 1000, 2000], 30), g.log_tail()
        b = socket.create_connection(('127.0.0.1', g.imap_port), timeout=60,
                                     source_address=('127.0.0.2', 0))
        assert read_line(b).startswith(b'* OK')
        b.sendall(b'b1 LOGIN bob wrong\r\n')
        reply = read_line(b)
        assert reply.startswith(b'b1 NO [AUTHENTICATIONFAILED]'), reply
        assert not select.select([a], [], [], 0)[0], \
            'the penalised reply came before the other address\'s'
        assert reply_delays(g, '127.0.0.2') == [0], g.log_tail()
        reply = read_line(a)
        took.append(time.monotonic() - t)
        assert reply.startswith(b'a3 NO [AUTHENTICATIONFAILED]'), reply
        assert took[3] >= 1.8, took
        assert g.alive
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        g.stop()
        fake.close()


def test_operator_moves_a_logged_in_user(gpair, make_gw, workdir):
    import imaplib
    from test_gateway import GW_USERS
    g = make_gw(tls=False, policy='off',
                extra_conf=admin_conf(workdir, sweep=False))
    m = imaplib.IMAP4('127.0.0.1', g.imap_port)
    m.login('alice', GW_USERS['alice'])
    m.select('INBOX')
    r = g.ctl('migrate', '--daemon', 'alice')
    assert r.rc == 0, r.describe()
    # Copied, verified; her session is ended with a BYE, the last delta
    # runs, the map flips.
    st = g.wait_state('alice', ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())
    # Her session got its BYE before the last delta began, so before the
    # flip: it is there to read.
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        m.noop()
    gpair.assert_copied('alice')
    # --all moves every user the map holds that is not across yet (bob).
    assert g.ctl('user', 'add', 'bob').rc == 0
    r = g.ctl('migrate', '--all')
    assert r.rc == 0, r.describe()
    st = g.wait_state('bob', ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())
    gpair.assert_copied('bob')


def control_requests(g, lines, batch=500):
    """The replies to lines (JSON requests), pipelined on one connection
    to g's control socket, batch at a time (the replies of a batch are
    read before the next is sent: the gateway stops reading a client that
    leaves too many unread)."""
    got = b''
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(g.socket_path)
        for i in range(0, len(lines), batch):
            part = lines[i:i + batch]
            s.sendall(b''.join(json.dumps(l).encode() + b'\n'
                               for l in part))
            want = got.count(b'\n') + len(part)
            while got.count(b'\n') < want:
                d = s.recv(65536)
                assert d, got[-200:]
                got += d
    return [json.loads(l) for l in got.splitlines()]


def test_migrate_all_stalls_no_session(gpair, make_gw, workdir):
    """`migrate --all` over 5,000 users: the walk of the map is a read on
    the store's reader, and each user's start (its job, its state, the
    copy queued: writes) runs in slices of the loop's turns, so a client's
    NOOPs (before login: the gateway's own answer), one each 0.05 s all
    through, each take well under a second; every user is started, and
    the reply counts them, and so does the log. A run whose client leaves
    at once goes on to its end."""
    g = make_gw(tls=False, extra_conf=admin_conf(workdir, sweep=False))
    n = 5000
    got = control_requests(g, [{'cmd': 'user.add', 'user': 'many%05d' % i}
                               for i in range(n)])
    assert all(r.get('ok') for r in got), [r for r in got if not r['ok']]
    r, noops, worst = gwlib.noops_while(
        g.imap_port, lambda: g.ctl('migrate', '--all', '--json'))
    assert r.rc == 0, r.describe()
    assert r.json['started'] == n, r.json
    print('migrate --all of %d users: %d NOOPs, the worst %.3f s'
          % (n, noops, worst))
    assert noops >= 5, ('migrate --all took too little to measure', noops)
    assert worst < 0.5, worst
    shown = g.ctl('user', 'show', 'many%05d' % (n - 1), '--json').json
    assert shown['user']['state'] in ('copying', 'failed'), shown
    said = 'migrate --all: %d copies started' % n
    assert g.log_text().count(said) == 1, g.log_tail(20)
    # asked, and the client gone at once: it goes on to its end
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(g.socket_path)
        s.sendall(b'{"cmd":"migrate.all"}\n')
    assert wait_for(lambda: g.log_text().count(said) == 2, 60), \
        [l for l in g.log_text().splitlines() if 'migrate --all' in l]
    assert g.ctl('status').rc == 0


def gw_login(g, user):
    """user logged in through the gateway (IMAP)."""
    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=60)
    typ, data = m.login(user, GW_USERS[user])
    assert typ == 'OK', data
    return m


def sees_new_mail(m, server, user, tag):
    """Whether the gateway session m (of user) shows a message appended
    straight to server just now: the server the session is on, as the
    servers see it."""
    msg, msgid = marker(tag, zlib.crc32(tag.encode()) % 90000)
    direct(server, user, mc.append, 'INBOX', msg, [], corpus.D2015)
    return count_msgid(m, msgid) == 1


def logout_seen(g, m, user):
    """Logs m out and waits until mailshiftd has seen the user's last
    session end (where it decides whether to flip)."""
    m.logout()
    assert wait_for(lambda: not [s for s in sessions(g)
                                 if s.get('user') == user], 30, 0.05), \
        sessions(g)


def assert_not_copied(g, user):
    """No copy of user started: no state, or on the source, and no copy
    running or done (a copy starts at login, before the client's OK)."""
    u = g.user(user) or {}
    assert u.get('state') in (None, 'source') and not u.get('copy'), u


def test_policy_command(gpair, make_gw):
    g = make_gw(tls=False, policy='passthrough', domains={'example.org': 'hold'})
    r = g.ctl('policy', '--json')
    assert r.rc == 0, r.describe()
    assert r.json['policy']['default'] == 'passthrough', r.json
    assert r.json['policy']['domains'] == {'example.org': 'hold'}, r.json
    r = g.ctl('policy', 'alice', 'off', '--json')
    assert r.rc == 0, r.describe()
    assert g.user('alice')['policy'] == 'off'
    # What it does: alice's next login (passthrough would start her copy)
    # is the source's, and nothing is copied, before or after her logout.
    m = gw_login(g, 'alice')
    assert sees_new_mail(m, gpair.src, 'alice', 'policy-cmd-off')
    assert_not_copied(g, 'alice')
    logout_seen(g, m, 'alice')
    assert_not_copied(g, 'alice')
    r = g.ctl('policy', 'alice', 'sometimes')
    assert r.rc != 0 and 'invalid policy' in r.stderr, r.describe()


def test_policy_set_at_run_time(gpair, make_gw):
    """The default and a domain's policy changed with mailshiftctl take
    effect for the next login, survive a restart (kept in the store) and
    go back to the config file's with "config". Each change is checked by
    where the next login goes, seen at the servers, and whether a copy
    starts."""
    g = make_gw(tls=False, policy='passthrough',
                domains={'example.org': 'hold'})
    dave, erin = 'dave@example.net', 'erin@example.org'

    def policy():
        r = g.ctl('policy', '--json')
        assert r.rc == 0, r.describe()
        return r.json['policy']

    def served_by_source_no_copy(user, tag):
        m = gw_login(g, user)
        assert sees_new_mail(m, gpair.src, user, tag)
        assert_not_copied(g, user)
        logout_seen(g, m, user)
        assert_not_copied(g, user)

    def served_by_source_then_moved(user, tag):
        m = gw_login(g, user)
        assert sees_new_mail(m, gpair.src, user, tag)
        u = g.user(user)
        assert u['copy'] in ('copying', 'verified, flips at log-off'), u
        logout_seen(g, m, user)
        assert g.wait_state(user, ('destination', 'failed'),
                            timeout=60) == 'destination', g.user(user)
        gpair.assert_copied(user)

    r = g.ctl('policy', '--default', 'off', '--json')
    assert r.rc == 0, r.describe()
    assert r.json['policy']['default'] == 'off'
    assert r.json['policy']['set'] == {'': 'off'}
    served_by_source_no_copy('carol', 'policy-off')

    assert g.ctl('policy', '--default', 'hold').rc == 0
    m = gw_login(g, 'carol')            # hold: copied first, then served
    assert g.state('carol') == 'destination', g.user('carol')
    assert sees_new_mail(m, gpair.dst, 'carol', 'policy-hold')
    m.logout()

    r = g.ctl('policy', '--domain', '@Example.NET', 'off')
    assert r.rc == 0, r.describe()
    assert '@example.net: off  [set with mailshiftctl]' in r.stdout, r.stdout
    assert g.ctl('policy', '--domain', 'example.org', 'passthrough').rc == 0
    for bad, why in ((('--default', 'sometimes'), 'invalid policy'),
                     (('--domain', 'a b', 'off'), 'invalid domain'),
                     (('--domain', 'x@y', 'off'), 'invalid domain'),
                     (('--domain', 'example.org'), 'Usage')):
        r = g.ctl('policy', *bad)
        assert r.rc != 0 and why in r.stderr, r.describe()
    want = {'default': 'hold', 'domains': {'example.org': 'passthrough',
                                           'example.net': 'off'},
            'hold_max_seconds': 60,
            'set': {'': 'hold', 'example.net': 'off',
                    'example.org': 'passthrough'}}
    assert policy() == want
    # The domains' policies win over the default (hold).
    served_by_source_no_copy(dave, 'policy-net-off')
    served_by_source_then_moved(erin, 'policy-org-passthrough')

    g.stop()                            # kept in the store
    g.start()
    assert policy() == want
    served_by_source_no_copy(dave, 'policy-net-off-restarted')

    assert g.ctl('policy', '--default', 'config').rc == 0
    assert g.ctl('policy', '--domain', 'example.org', 'config').rc == 0
    assert g.ctl('policy', '--domain', 'EXAMPLE.net', 'config').rc == 0
    assert policy() == {'default': 'passthrough',
                        'domains': {'example.org': 'hold'},
                        'hold_max_seconds': 60, 'set': {}}
    # example.net has no policy of its own any more: the config file's
    # default, passthrough.
    served_by_source_then_moved(dave, 'policy-config')


def metric(port, name):
    """The value of metric name (no labels but the gateway's name) at the
    metrics listener."""
    text = http_get(port)
    m = re.search(r'^%s\{gateway="[^"]*"\} (\d+)$' % re.escape(name), text,
                  re.M)
    assert m, (name, text)
    return int(m.group(1))


def test_sweep_rate(gpair, make_gw, workdir):
    port = dovecot.free_port()
    conf = admin_conf(workdir) + '\nrate = 1\n' + \
        '[metrics]\nlisten = 127.0.0.1:%d\n' % port   # rate: 1 user an hour
    g = make_gw(tls=False, policy='passthrough', extra_conf=conf)
    for u in ('alice', 'bob'):
        assert g.ctl('user', 'add', u).rc == 0
    st = {}

    def one_moved():
        st.update({u: g.state(u) for u in ('alice', 'bob')})
        return 'destination' in st.values()
    wait_for(one_moved, 30, 0.2)
    assert sorted(st.values()) == ['destination', 'source'], st
    # Three more passes of the sweep look for users (nothing is copying,
    # so each could start the other one) and start nobody.
    passes = metric(port, 'mailshift_sweeps_total')
    assert wait_for(lambda: metric(port, 'mailshift_sweeps_total') >=
                    passes + 3, 60, 0.2), g.log_tail()
    assert sorted(g.state(u) for u in ('alice', 'bob')) == \
        ['destination', 'source']


def test_state_change_guard(gpair, make_gw, workdir):
    """`user set USER state ...` refuses what would strand mail: a user on
    the destination sent back by hand (without --force), and any change
    while the user's copy runs."""
    g = make_gw(tls=False, policy='passthrough',
                extra_conf=admin_conf(workdir, sweep=False))
    assert g.ctl('user', 'add', 'carol', 'state', 'destination').rc == 0
    r = g.ctl('user', 'set', 'carol', 'state', 'source')
    assert r.rc != 0 and 'mailshiftctl rollback carol' in r.stderr, \
        r.describe()
    assert g.state('carol') == 'destination'
    r = g.ctl('user', 'set', 'carol', 'state', 'source', '--force')
    assert r.rc == 0, r.describe()
    assert g.state('carol') == 'source'

    m = gpair.src.imap('bob')
    try:
        mc.append_many(m, 'INBOX', [(mc.make_message(800000 + i, 600), (),
                                     None) for i in range(3000)])
    finally:
        m.logout()
    r = g.ctl('migrate', '--daemon', 'bob')
    assert r.rc == 0, r.describe()
    assert g.wait_state('bob', 'copying', timeout=10) == 'copying'
    r = g.ctl('user', 'set', 'bob', 'state', 'destination')
    assert r.rc != 0 and 'a copy runs for bob' in r.stderr, r.describe()
    assert g.wait_state('bob', ('destination', 'failed'),
                        timeout=60) == 'destination'
    gpair.assert_copied('bob')


def test_rollback(gpair, make_gw, workdir):
    """mailshiftctl rollback: a user on the destination who worked there
    (new messages, flags, expunges, a new folder) is sent back to the
    source with all of it; open sessions get a BYE; the next login is
    served by the source; moving the user again duplicates nothing."""
    g = make_gw(tls=False, policy='passthrough',
                extra_conf=admin_conf(workdir, sweep=False))
    pw = GW_USERS['alice']
    r = g.ctl('rollback', 'alice')
    assert r.rc != 0 and 'not on the destination' in r.stderr, r.describe()
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination'

    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=60)
    assert m.login('alice', pw)[0] == 'OK'
    assert [s['server'] for s in g.ctl('sessions', '--json').json[
        'sessions'] if s['user'] == 'alice'] == ['destination']
    mc.append_many(m, 'INBOX', [(mc.make_message(910000 + i, 900),
                                 ('\\Seen',) if i % 2 else (),
                                 1600000000 + i) for i in range(40)])
    m.select('INBOX')
    typ, data = m.uid('SEARCH', 'ALL')
    uids = data[0].split()
    m.uid('STORE', b','.join(uids[:5]), '+FLAGS', '(\\Flagged $Later)')
    m.uid('STORE', b','.join(uids[5:8]), '+FLAGS', '(\\Deleted)')
    m.expunge()
    assert m.create('Since/Moved')[0] == 'OK'
    mc.append_many(m, 'Since/Moved', [mc.make_message(920000 + i, 700)
                                      for i in range(7)])
    m.select('INBOX')

    r = g.ctl('rollback', 'alice', '--wait')
    assert r.rc == 0 and 'alice: source' in r.stdout, \
        (r.describe(), g.log_tail(30))
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        m.noop()
        m.noop()
    gpair.assert_copied('alice')         # the source holds what dst holds
    # Sent back on purpose: policy off, so that neither this login nor
    # a sweep moves the user again by itself.
    assert g.user('alice')['policy'] == 'off'
    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=60)
    assert m.login('alice', pw)[0] == 'OK'
    assert [s['server'] for s in g.ctl('sessions', '--json').json[
        'sessions'] if s['user'] == 'alice'] == ['source']
    typ, data = m.select('Since.Moved', readonly=True)  # the source's '.'
    assert typ == 'OK' and int(data[0]) == 7, data
    logout_seen(g, m, 'alice')
    u = g.user('alice')
    assert u['state'] == 'source' and u['copy'] == '', u

    # Moved again: nothing twice.
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination'
    gpair.assert_copied('alice')

    # A user the store never copied: refused, left where it is.
    assert g.ctl('user', 'add', 'carol', 'state', 'destination').rc == 0
    r = g.ctl('rollback', 'carol', '--wait')
    assert r.rc != 0 and 'destination' in r.stderr, r.describe()
    u = g.user('carol')
    assert u['state'] == 'destination' and 'nothing to roll back' in \
        (u.get('error') or ''), u


def test_rollback_killed(gpair, make_gw, workdir):
    """kill -9 of mailshiftd in the middle of a rollback (300 of 600 new
    messages recorded on the source): at the next start the user is on
    the destination (which holds everything) with a note; rolling back
    again ends exact, nothing twice."""
    g = hooked_gw(make_gw, workdir, 'rollback.recorded:3')
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination'
    m = gpair.dst.imap('alice')
    try:
        mc.append_many(m, 'INBOX', [(mc.make_message(930000 + i, 700), (),
                                     1600000000 + i) for i in range(600)])
    finally:
        m.logout()
    before = direct(gpair.src, 'alice', exists)
    done = inbox_done(g, 'alice')
    assert g.ctl('rollback', 'alice').rc == 0
    g.wait_crashed()
    assert store_state(g, 'alice') == 'cutover'
    # Three windows of 100 recorded; later ones may be on the source
    # already, their intents open.
    assert inbox_done(g, 'alice') == done + 300
    assert direct(gpair.src, 'alice', exists) >= before + 300
    g.restart_after_crash()
    u = g.user('alice')
    assert u['state'] == 'destination' and 'rollback interrupted' in \
        (u.get('error') or ''), u
    r = g.ctl('rollback', 'alice', '--wait')
    assert r.rc == 0, (r.describe(), g.log_tail(30))
    gpair.assert_copied('alice')
