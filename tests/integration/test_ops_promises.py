"""Operating mailshiftd as mailshift.conf(5), gateway-spec.md and
deployment.md promise: the metrics endpoint's names and freshness; the
sweep's window, its default concurrency of one, and its refusal to run
without admin logins; a user whose copy failed stays on the source with
the error and moves once the cause is fixed; domain policies compared
without regard to case.

Fixtures of test_gateway.py (gpair, make_gw) and test_gateway_ops.py's
admin_conf and http_get."""

import imaplib
import os
import time

import dovecot as dc
import fakeserver
import gateway as gwlib
import mailcheck as mc
from conftest import (MASTER, _failed, dst_server, src_server, stop_all,
                      wait_for)
from test_gateway import GW_USERS, direct, gw_imap, sessions
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_gateway_ops import admin_conf, http_get

STATES = ('source', 'copying', 'cutover', 'destination', 'failed')


def metrics(port):
    """{name (with its labels): value} of a GET /metrics, and the head."""
    text = http_get(port)
    head, body = text.split('\r\n\r\n', 1)
    values = {}
    for line in body.splitlines():
        if line and not line.startswith('#'):
            name, value = line.rsplit(' ', 1)
            values[name] = int(value)
    return head, values


def test_metrics(gpair, make_gw, workdir):
    """Every documented name, each with the gateway's name ([gateway]
    name), users per state no older than 5 s, open sessions, logins; the
    Prometheus text format's content type."""
    port = dc.free_port()
    g = make_gw(tls=False, policy='off', extra_conf='[metrics]\nlisten = '
                '127.0.0.1:%d\n[gateway]\nname = gw-m' % port)
    gl = 'gateway="gw-m"'

    head, m = metrics(port)
    assert head.startswith('HTTP/1.0 200 OK\r\n') and \
        'Content-Type: text/plain; version=0.0.4' in head, head
    want = {'mailshift_users{%s,state="%s"}' % (gl, s) for s in STATES} | {
        '%s{%s}' % (n, gl) for n in (
            'mailshift_sessions', 'mailshift_copies_running',
            'mailshift_messages_copied_total',
            'mailshift_bytes_copied_total', 'mailshift_sweeps_total',
            'mailshift_store_reads_waiting')} | {
        'mailshift_logins_total{%s,result="ok"}' % gl,
        'mailshift_logins_total{%s,result="failed"}' % gl}
    assert set(m) == want, m
    assert all(v == 0 for v in m.values()), m

    for u, st in (('alice', 'source'), ('bob', 'destination'),
                  ('carol', 'failed')):
        assert g.ctl('user', 'add', u, 'state', st).rc == 0
    t0 = time.monotonic()

    def counted():
        return all(metrics(port)[1]['mailshift_users{%s,state="%s"}'
                                      % (gl, s)] == 1
                   for s in ('source', 'destination', 'failed'))
    assert wait_for(counted, 30, 0.2), metrics(port)
    print('users counted after %.1f s (at most 5 s promised)'
          % (time.monotonic() - t0))

    imap = gw_imap(g)
    assert imap.login('alice', GW_USERS['alice'])[0] == 'OK'
    bad = gw_imap(g)
    try:
        bad.login('bob', 'Wr0ng-pw')
    except imaplib.IMAP4.error:
        pass
    m = metrics(port)[1]
    assert m['mailshift_sessions{%s}' % gl] == len(sessions(g)) >= 1, m
    assert m['mailshift_logins_total{%s,result="ok"}' % gl] == 1, m
    assert m['mailshift_logins_total{%s,result="failed"}' % gl] == 1, m
    imap.logout()
    bad.logout()


def sweep_conf(workdir, window=None):
    """Admin logins and a sweep every second, at its default concurrency."""
    conf = admin_conf(workdir, sweep=False) + '\n[sweep]\nenabled = yes\n' \
        'interval = 1\n'
    return conf + ('window = %s\n' % window if window else '')


def window_around(now_min, start, length):
    """HH:MM-HH:MM from now + start minutes, length minutes long."""
    def hhmm(m):
        m %= 24 * 60
        return '%02d:%02d' % (m // 60, m % 60)
    return '%s-%s' % (hhmm(now_min + start), hhmm(now_min + start + length))


def now_minutes():
    t = time.localtime()
    return t.tm_hour * 60 + t.tm_min


def test_sweep_window(gpair, make_gw, workdir):
    """Outside its window the sweep starts nobody (and says so once);
    inside it (the window may wrap midnight) it moves users."""
    g = make_gw(tls=False, policy='passthrough', extra_conf=sweep_conf(
        workdir, window_around(now_minutes(), 120, 60)))
    assert g.ctl('user', 'add', 'alice').rc == 0
    assert wait_for(lambda: 'sweep: outside its window' in g.log_text(),
                    30, 0.1), g.log_tail(10)
    assert g.state('alice') == 'source', g.user('alice')
    g.stop()

    g = make_gw(tls=False, policy='passthrough', extra_conf=sweep_conf(
        workdir, window_around(now_minutes(), -60, 120)))
    assert g.ctl('user', 'add', 'bob').rc == 0
    assert g.wait_state('bob', ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail(10)
    assert 'sweep: outside' not in g.log_text()
    gpair.assert_copied('bob')


def test_sweep_concurrency_default_one(gpair, make_gw, workdir):
    """Without concurrency, the sweep copies one user at a time."""
    for i, u in enumerate(('alice', 'bob')):
        direct(gpair.src, u, mc.append_many, 'INBOX', [
            mc.make_message(700000 + 10000 * i + k, 900)
            for k in range(1200)])
    g = make_gw(tls=False, policy='passthrough', connections=1,
                extra_conf=sweep_conf(workdir))
    for u in ('alice', 'bob'):
        assert g.ctl('user', 'add', u).rc == 0
    most = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = g.ctl('status', '--json').json['states']
        most = max(most, st['copying'] + st['cutover'])
        if st['destination'] + st['failed'] == 2:
            break
        time.sleep(0.05)
    assert [g.state(u) for u in ('alice', 'bob')] == ['destination'] * 2, \
        g.log_tail(20)
    assert most == 1, 'the sweep copied %d users at once' % most
    for u in ('alice', 'bob'):
        gpair.assert_copied(u)


def test_sweep_needs_admin_logins(gpair, make_gw):
    g = make_gw(tls=False, policy='passthrough',
                extra_conf='[sweep]\nenabled = yes\ninterval = 1\n')
    assert '[sweep] needs admin logins for both servers ([source] admin, ' \
        '[destination] admin): sweep off' in g.log_text(), g.log_tail(10)
    assert g.ctl('user', 'add', 'alice').rc == 0
    assert g.state('alice') == 'source'


def test_failed_copy_is_retried(gpair, make_gw, workdir):
    """A copy that fails (here: a wrong destination admin password) leaves
    the user failed, on the source, with the error in `user show`; once
    the cause is fixed (and mailshiftd restarted, to read the file again)
    `migrate --daemon` moves the user."""
    bad = os.path.join(workdir, 'dst-admin.pw')
    with open(bad, 'w') as f:
        f.write('not-the-master-pw\n')
    os.chmod(bad, 0o600)
    # (A key given again: the last one wins.)
    g = make_gw(tls=False, policy='passthrough', extra_conf=admin_conf(
        workdir, sweep=False) + '\n[destination]\nadmin_password_file = %s'
        % bad)
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('failed', 'destination'),
                        timeout=60) == 'failed'
    u = g.user('alice')
    assert 'destination' in (u['error'] or '') and 'login failed' in \
        u['error'], u
    r = g.ctl('user', 'show', 'alice')
    assert 'error:    %s' % u['error'] in r.stdout, r.describe()
    m = gw_imap(g)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    assert [s['server'] for s in sessions(g) if s['user'] == 'alice'] == \
        ['source']
    m.logout()

    with open(bad, 'w') as f:
        f.write(MASTER[1] + '\n')
    g.stop()
    g.start()
    assert g.state('alice') == 'failed'
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination', g.user('alice')
    assert g.user('alice')['error'] is None, g.user('alice')
    gpair.assert_copied('alice')


def test_domain_policy_ignores_case(workdir, ca, request):
    """[policy] domain.DOMAIN applies to name@domain whatever the case of
    either: here hold, so the first login returns served by the
    destination."""
    users = {'dora@example.org': 'Gw-dora-Pw-2k4x'}
    src = src_server(workdir, ca, users, name='domsrc')
    dst = dst_server(workdir, ca, users, name='domdst')
    g = None
    try:
        src.start()
        dst.start()
        direct(src, 'dora@example.org', mc.append_many, 'INBOX',
               [mc.make_message(1 + i, 700) for i in range(5)])
        g = gwlib.Mailshiftd(os.path.join(workdir, 'domgw'), src, dst,
                             policy='passthrough',
                             domains={'Example.ORG': 'hold'})
        g.start()
        m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=60)
        assert m.login('dora@example.org', users['dora@example.org'])[0] \
            == 'OK'
        assert g.state('dora@example.org') == 'destination', \
            g.user('dora@example.org')
        m.logout()
    finally:
        if g is not None:
            g.stop()
            if _failed(request):
                print(g.log_tail(30))
        stop_all(src, dst)


def test_backend_insecure(gpair, make_gw, wrong_ca):
    """[source] insecure = yes: the server's certificate is not verified
    (labs only); without it a certificate the ca_file did not sign fails
    the login as the server being down."""
    for insecure, want in (('no', 'NO'), ('yes', 'OK')):
        g = make_gw(tls=False, policy='off', src_schemes=('imaps', None),
                    extra_conf='[source]\nca_file = %s\ninsecure = %s\n'
                    % (wrong_ca.ca_file, insecure))
        m = gw_imap(g)
        typ, data = m._simple_command('LOGIN', 'alice',
                                      '"%s"' % GW_USERS['alice'])
        assert typ == want, (insecure, typ, data, g.log_tail(5))
        if typ == 'NO':
            assert b'[UNAVAILABLE]' in data[-1], data
        m.shutdown()
        g.stop()


def test_submission_session_outlives_the_flip(gpair, make_gw):
    """Submission sessions are not among the sessions a flip waits for,
    and a cutover does not end them: the user flips (through a cutover)
    while a submission session to the source's service stays open and
    relayed."""
    import smtplib
    sub = fakeserver.MailServer('smtp', login='accept')
    try:
        g = make_gw(tls=False, policy='passthrough', submission=True,
                    smtp_backends={'source': {'submission': sub.url()}})
        m = gw_imap(g)
        assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
        s = smtplib.SMTP('127.0.0.1', g.submission_port, timeout=30)
        s.ehlo('laptop')
        s.user, s.password = 'alice', GW_USERS['alice']
        assert s.auth('PLAIN', s.auth_plain)[0] == 235
        assert sub.logins == [(False, b'alice')], sub.logins
        m.logout()
        assert g.wait_state('alice', ('destination', 'failed'),
                            timeout=60) == 'destination', g.log_tail(10)
        assert 'alice: state cutover' in g.log_text()
        assert s.noop()[0] == 250
        assert [(x['proto'], x['server'], x['state']) for x in sessions(g)
                if x['user'] == 'alice'] == [('submission', 'source',
                                              'relay')]
        s.quit()
    finally:
        sub.close()
