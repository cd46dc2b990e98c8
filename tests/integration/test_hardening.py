"""mailshiftd against hostile clients and servers (the hardening issue):
each test states a behaviour the gateway must have, and fails with what
broke when it has not.

  A  pre-login LOGOUT/QUIT and too many bad commands end that session only
     (run with glibc's heap poisoning: a use of the freed session crashes)
  B  failed logins with made-up names leave nothing behind: no store row,
     no change in the counts, nothing for the sweep
  C  STARTTLS command injection, both sides; capabilities of a STARTTLS
     server are asked over TLS
  D  connection limits ([listen] max_connections, max_connections_per_ip),
     over-long user names, a client that pipelines and never reads
  E  control bytes from clients and servers never reach the log raw
  F  [listen] plaintext_auth and trusted_networks
  G  [source] server_name: the backend's certificate checked against it
  H  the metrics endpoint: idle clients timed out, long lines refused

The servers (a source and a destination Dovecot with a master user, the
source's Postfix for submission) are shared by the module; each test runs
its own mailshiftd in front of them (hgw), or in front of scripted servers
(tests/lib/fakeserver.py MailServer) where a real one will not misbehave.
Both Dovecots trust the gateway with the client's address
(login_trusted_networks), so their own failed-login slowdown is per client.
Clients that fail logins on purpose connect from addresses of their own
(127.0.x.y) so that the gateway's per-address slowdown does not stretch the
tests.
"""

import base64
import contextlib
import imaplib
import os
import poplib
import re
import secrets
import smtplib
import socket
import threading
import time

import pytest

import dovecot as dc
import fakeserver
import gateway as gwlib
import leakcheck
import postfix as pf
from conftest import _failed, dst_server, src_server, stop_all, wait_for
from test_gateway import (check_greeting, greeting_caps, read_line,
                          read_until_close, sasl_plain,
                          send_all_ignoring_reset)
from test_gateway_ops import admin_conf, http_get
from test_smtp import read_reply

DOMAIN = 'example.test'
HUSERS = {'alice': 'Hd-alice-Pw-3k9q', 'bob': 'Hd-bob-Pw-7x2m',
          'carol': 'Hd-carol-Pw-5v1z', 'dave': 'Hd-dave-Pw-0p4w'}
WRONG_PW = 'Hd-Wr0ng-Pw-61c'
leakcheck.CHECK.secret(WRONG_PW, 'the wrong password of test_hardening')
# glibc: no per-thread cache, and freed memory filled with 0x5a (165 ^
# 0xff): a session used after it was freed reads garbage, and crashes on
# the normal build instead of carrying on by luck.
HEAP_POISON = {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0',
               'MALLOC_PERTURB_': '165'}


# ---------------------------------------------------------------- servers

class Env:
    pass


@contextlib.contextmanager
def mail_servers(parent, ca, performance=False):
    """A source Dovecot (with LMTP and an auth listener for its Postfix), a
    destination Dovecot and the source's Postfix (submission with STARTTLS,
    SASL by the source Dovecot); users HUSERS, same passwords on both."""
    e = Env()
    e.root = dc.make_test_root(prefix='hard-', parent=parent)
    lmtp, auth = dc._free_ports(2)
    trusted = 'login_trusted_networks = 127.0.0.1/32'
    e.src = src_server(e.root, ca, dict(HUSERS), performance=performance,
                       extra_conf=pf.lmtp_conf(lmtp, 'mx.src.test', auth) +
                       '\n' + trusted)
    e.dst = dst_server(e.root, ca, dict(HUSERS), performance=performance,
                       extra_conf=trusted)
    e.mta = pf.Postfix(os.path.join(e.root, 'src-mta'), 'hsrc', DOMAIN, lmtp,
                       users=HUSERS, sasl_port=auth,
                       tls=(ca.cert_file, ca.key_file))
    try:
        e.src.start()
        e.dst.start()
        e.mta.start()
        yield e
    finally:
        stop_all(e.mta)
        stop_all(e.src, e.dst)
        dc.remove_test_root(e.root)


@pytest.fixture(scope='module')
def henv(test_root, ca):
    with mail_servers(test_root, ca) as e:
        yield e


def gateway_factory(henv, workdir, ca, request):
    """make(tls=True, **Mailshiftd kwargs) -> a started mailshiftd in front
    of henv's servers (submission to the source's Postfix); a config it
    refuses fails the test with its words. Returns (make, stop_all)."""
    made = []

    def make(tls=True, src=None, smtp_backends=None, policy='off', **kw):
        g = gwlib.Mailshiftd(
            os.path.join(workdir, 'gw%d' % len(made)), src or henv.src,
            henv.dst, tls_ca=ca if tls else None, policy=policy,
            smtp_backends=smtp_backends or {'source': {
                'submission': henv.mta.url('smtp+starttls')}},
            smtp_ca_file=ca.ca_file, **kw)
        made.append(g)
        try:
            g.start()
            return g
        except dc.HarnessError as ex:
            why = str(ex)
        pytest.fail('mailshiftd refused this config (a key it does not know '
                    'yet?):\n%s\n%s' % (g.extra_conf, why), pytrace=False)

    def stop():
        for g in made:
            rc = g.proc.poll() if g.proc is not None else None
            g.stop()
            if _failed(request):
                print('----- mailshiftd %s (exit %s; last lines)\n%s'
                      % (g.log_path, rc, g.log_tail(60)))
    return make, stop


@pytest.fixture
def hgw(henv, workdir, ca, request):
    make, stop = gateway_factory(henv, workdir, ca, request)
    yield make
    stop()


# ---------------------------------------------------------------- helpers

def dial(port, src='127.0.0.1', timeout=10):
    """A socket from the loopback address src, and the server's first
    line."""
    s = socket.create_connection(('127.0.0.1', port), timeout=timeout,
                                 source_address=(src, 0))
    return s, read_line(s)


def imap_reply(s, tag):
    """Lines up to the one tagged tag (b'' when the server closed)."""
    data = b''
    while True:
        line = read_line(s)
        if not line:
            return data
        data += line
        if line.startswith(tag + b' '):
            return data


def read_until(s, pattern, timeout=10):
    """What the server sends until pattern matches it, it closes, or
    timeout."""
    s.settimeout(0.2)
    data = b''
    deadline = time.monotonic() + timeout
    while not re.search(pattern, data) and time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def plain_ir(user, pw):
    """A SASL PLAIN response (bytes in, base64 bytes out)."""
    return base64.b64encode(b'\0' + user + b'\0' + pw)


def alive_or_fail(gw, after):
    if not gw.alive:
        rc = gw.proc.returncode if gw.proc is not None else None
        pytest.fail('mailshiftd died (exit status %s, a negative number is '
                    'the signal) after %s:\n%s' % (rc, after, gw.log_tail(30)),
                    pytrace=False)


def real_login(gw, user='alice', src='127.0.0.1'):
    """A real user's IMAP login through the gateway works (then LOGOUT)."""
    m = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=60)
    try:
        typ, data = m.login(user, HUSERS[user])
        assert typ == 'OK', data
    finally:
        m.logout()


def store_names(gw):
    res = gw.ctl('user', 'list', '--json')
    assert res.rc == 0 and isinstance(res.json, dict), res.describe()
    return {u['user'] for u in res.json['users']}


def state_counts(gw):
    res = gw.ctl('status', '--json')
    assert res.rc == 0 and isinstance(res.json, dict), res.describe()
    return res.json['states']


def nsessions(gw):
    res = gw.ctl('sessions', '--json')
    assert res.rc == 0 and isinstance(res.json, dict), res.describe()
    return len(res.json['sessions'])


def wait_sessions(gw, n, timeout=15):
    assert wait_for(lambda: nsessions(gw) == n, timeout, 0.05), \
        'the gateway still lists %d sessions (want %d)' % (nsessions(gw), n)


def log_since(path, offset):
    try:
        with open(path, 'rb') as f:
            f.seek(offset)
            return f.read().decode(errors='replace')
    except OSError:
        return ''


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def token():
    return secrets.token_hex(4)


# ---------------------------------------------- A: pre-login use after free

IMAP_CLOSERS = [
    # (what, bytes sent in one write, regex the whole answer must match)
    ('LOGOUT', b'a LOGOUT\r\n', rb'\* BYE [^\r\n]*\r\na OK [^\r\n]*\r\n'),
    ('NOOP, LOGOUT, NOOP pipelined', b'a NOOP\r\nb LOGOUT\r\nc NOOP\r\n',
     rb'a OK [^\r\n]*\r\n\* BYE [^\r\n]*\r\nb OK [^\r\n]*\r\n'),
    ('10 unknown commands', b'x FOO\r\n' * 10,
     rb'(\S+ BAD [^\r\n]*\r\n){10}\* BYE Too many invalid commands\.\r\n'),
    ('12 unknown commands', b'x FOO\r\n' * 12,
     rb'(\S+ BAD [^\r\n]*\r\n){10}\* BYE Too many invalid commands\.\r\n'),
    ('10 lines with a NUL', b'x\0y\r\n' * 10,
     rb'(\S+ BAD [^\r\n]*\r\n){10}\* BYE Too many invalid commands\.\r\n'),
    ('10 bad SASL responses', b'a AUTHENTICATE PLAIN\r\n!!\r\n' * 10,
     rb'(\+ \r\na BAD [^\r\n]*\r\n){10}\* BYE Too many invalid '
     rb'commands\.\r\n'),
    ('10 unterminated strings', b'x LOGIN "ab\r\n' * 10,
     rb'(\S+ BAD [^\r\n]*\r\n){10}\* BYE Too many invalid commands\.\r\n'),
]
POP3_CLOSERS = [
    ('QUIT', b'QUIT\r\n', rb'\+OK[^\r\n]*\r\n'),
    ('NOOP, QUIT, NOOP pipelined', b'NOOP\r\nQUIT\r\nNOOP\r\n',
     rb'\+OK[^\r\n]*\r\n\+OK[^\r\n]*\r\n'),
    ('10 unknown commands', b'FOO\r\n' * 10, rb'(-ERR [^\r\n]*\r\n){10,11}'),
]


def test_prelogin_session_end_is_clean(hgw):
    """IMAP LOGOUT / POP3 QUIT before login, alone or pipelined, and the
    BAD_MAX'th bad command: the answer, then the connection closes, and
    nothing after it is processed; the daemon lives on (under heap
    poisoning a use of the freed session would crash it), an open session
    is undisturbed and a real login works."""
    gw = hgw(tls=False, env=HEAP_POISON)
    keep = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    assert keep.login('bob', HUSERS['bob'])[0] == 'OK'
    assert keep.select('INBOX', readonly=True)[0] == 'OK'
    problems = []
    cases = [(gw.imap_port, 'IMAP') + c for c in IMAP_CLOSERS] + \
        [(gw.pop3_port, 'POP3') + c for c in POP3_CLOSERS]
    for i, (port, proto, what, payload, want) in enumerate(cases):
        s, greeting = dial(port, '127.0.5.%d' % (i + 1))
        assert greeting.startswith((b'* OK', b'+OK')), greeting
        s.sendall(payload)
        data, closed = read_until_close(s, 10)
        s.close()
        if not re.fullmatch(want, data):
            problems.append('%s %s: answered %r' % (proto, what, data))
        if not closed:
            problems.append('%s %s: the connection stayed open' %
                            (proto, what))
        alive_or_fail(gw, '%s %s before login' % (proto, what))
        typ, data = keep.noop()
        assert typ == 'OK', ('the open session after %s %s' % (proto, what),
                             data)
    # A LOGOUT behind a refused login answered late (the third failure
    # from an address: the gateway slows it down), taken up when the
    # delayed answer goes out. (The first two on connections of their own,
    # the slowing down is per address.)
    for tag in (b'a0', b'a1'):
        s, _ = dial(gw.imap_port, '127.0.5.99')
        s.sendall(b'%s LOGIN nobody-%s wrong\r\n' % (tag, token().encode()))
        assert re.search(rb'(^|\n)%s NO ' % tag, imap_reply(s, tag))
        s.close()
    s, _ = dial(gw.imap_port, '127.0.5.99')
    s.sendall(b'a2 LOGIN nobody-x wrong\r\nb LOGOUT\r\n')
    data, closed = read_until_close(s, 30)
    s.close()
    if not re.fullmatch(rb'a2 NO [^\r\n]*\r\n\* BYE [^\r\n]*\r\n'
                        rb'b OK [^\r\n]*\r\n', data) or not closed:
        problems.append('IMAP LOGOUT behind a delayed refusal: %r (%s)' % (
            data, 'closed' if closed else 'still open'))
    alive_or_fail(gw, 'LOGOUT behind a delayed refusal')
    real_login(gw)
    typ, data = keep.select('INBOX', readonly=True)
    assert typ == 'OK', data
    keep.logout()
    alive_or_fail(gw, 'the last case')
    assert not problems, '\n'.join(problems)


# --------------------------------------- B: made-up users leave no trace

def failed_logins(gw, names):
    """One failed login per name, with WRONG_PW, in turn by IMAP LOGIN,
    IMAP AUTHENTICATE PLAIN, POP3 USER/PASS, POP3 AUTH PLAIN and
    submission AUTH PLAIN (over implicit TLS); each from an address of its
    own. Returns [(how, name, reply)] of the replies that are not a
    refusal."""
    odd = []
    pw = WRONG_PW.encode()
    for i, name in enumerate(names):
        src = '127.0.2.%d' % (i + 1)
        n = name.encode()
        how = ('imap-login', 'imap-plain', 'pop3-user', 'pop3-plain',
               'submission')[i % 5]
        if how.startswith('imap'):
            s, _ = dial(gw.imap_port, src)
            s.sendall(b'a LOGIN %s %s\r\n' % (n, pw) if how == 'imap-login'
                      else b'a AUTHENTICATE PLAIN %s\r\n' % plain_ir(n, pw))
            reply = imap_reply(s, b'a')
            ok = re.search(rb'(^|\n)a NO ', reply)
        elif how.startswith('pop3'):
            s, _ = dial(gw.pop3_port, src)
            if how == 'pop3-user':
                s.sendall(b'USER %s\r\nPASS %s\r\n' % (n, pw))
                reply = read_line(s) + read_line(s)
                ok = re.fullmatch(rb'\+OK[^\n]*\n-ERR [^\n]*\n', reply)
            else:
                s.sendall(b'AUTH PLAIN %s\r\n' % plain_ir(n, pw))
                reply = read_line(s)
                ok = reply.startswith(b'-ERR')
        else:
            c = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port,
                                 timeout=30, source_address=(src, 0),
                                 context=gw.tls_ca.ssl_context())
            c.ehlo('attacker.test')
            code, reply = c.docmd('AUTH', 'PLAIN ' + sasl_plain(name,
                                                                WRONG_PW))
            ok = code == 535
            s = c
        if not ok:
            odd.append((how, name, reply))
        s.close()
    return odd


def test_unknown_users_leave_no_trace(hgw, workdir):
    """Failed logins with made-up names (every login kind) write nothing to
    the store: no row, the same counts, nothing the sweep would try; a real
    user's login still creates the user."""
    gw = hgw(tls=True, submission=True, policy='passthrough',
             extra_conf=admin_conf(workdir))
    before = state_counts(gw)
    assert not store_names(gw), 'harness: the store is not empty at start'
    names = ['nobody-%s-%02d' % (token(), i) for i in range(25)]
    odd = failed_logins(gw, names)
    assert not odd, 'harness: logins that were not refused: %s' % odd

    rows = sorted(store_names(gw) & set(names))
    assert not rows, 'failed logins of made-up users wrote %d of %d names ' \
        'into the store (user list): %s' % (len(rows), len(names), rows[:5])
    assert state_counts(gw) == before, \
        'status counts changed by failed logins: %s -> %s' % (
            before, state_counts(gw))

    # The sweep has run since (it moved dave, whom the operator added); it
    # never tried one of the names.
    assert gw.ctl('user', 'add', 'dave').rc == 0
    st = gw.wait_state('dave', ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, gw.log_tail())
    tried = [l for l in gw.log_text().splitlines()
             if any(n in l for n in names) and
             re.search(r'(?i)cop(y|ying)|state|sweep|migrat', l)]
    assert not tried, 'the daemon acted on made-up users:\n' + \
        '\n'.join(tried[:10])

    # A real login still makes the user known.
    m = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    assert m.login('carol', HUSERS['carol'])[0] == 'OK'
    st = gw.state('carol')
    m.logout()
    assert st in ('source', 'copying'), \
        'a real login did not create the user: state %r' % st
    alive_or_fail(gw, 'the failed logins')


# ------------------------------------------- C: STARTTLS command injection

# What a man-in-the-middle adds to the server's STARTTLS go-ahead, in the
# same write: the answer to the gateway's login that follows (the
# gateway's tags: ms0 STARTTLS, ms1 ID, ms2 AUTHENTICATE).
INJECT = {'imap': b'ms2 OK Logged in\r\n',
          'pop3': b'+OK Logged in\r\n',
          'smtp': b'235 2.7.0 Authentication successful\r\n'}


def fake_backend_gw(hgw, fake):
    """A gateway whose source server of fake's protocol is fake (with
    STARTTLS), IMAP and POP3 logins of the destination still real."""
    if fake.proto == 'smtp':
        return hgw(tls=True, submission=True, smtp_backends={
            'source': {'submission': fake.url('smtp+starttls')}})
    return hgw(tls=False, src_schemes=('imap+starttls', 'pop3+starttls'),
               extra_conf='[source]\n%s = %s' % (
                   fake.proto, fake.url(fake.proto + '+starttls')))


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_server_starttls_injection(hgw, ca, proto):
    """A source that answers STARTTLS with the go-ahead and, in the same
    write, a plaintext "login OK": the client's login is refused (never
    taken as done), the log says the server sent data after the go-ahead,
    no password goes out in plaintext, the daemon serves on."""
    ctx = fakeserver.tls_server_context(ca.cert_file, ca.key_file)
    fake = fakeserver.MailServer(proto, tls=ctx, inject=INJECT[proto])
    try:
        gw = fake_backend_gw(hgw, fake)
        name, pw = 'nobody-%s' % token(), WRONG_PW
        if proto == 'imap':
            m = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
            try:
                typ, data = m._simple_command('LOGIN', name, pw)
            except imaplib.IMAP4.error as ex:
                typ, data = 'NO', [str(ex).encode()]
            m.shutdown()
            assert typ == 'NO', 'the client\'s login was answered %s %r ' \
                '(the injected "ms2 OK" taken as the login)' % (typ, data)
        elif proto == 'pop3':
            p = poplib.POP3('127.0.0.1', gw.pop3_port, timeout=30)
            p.user(name)
            try:
                reply = p.pass_(pw)
            except poplib.error_proto as ex:
                reply = str(ex).encode()
            p.close()
            assert b'-ERR' in reply, 'the POP3 login was answered %r (the ' \
                'injected "+OK" taken as the login)' % reply
        else:
            c = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port,
                                 timeout=30, context=ca.ssl_context())
            c.ehlo('laptop')
            code, text = c.docmd('AUTH', 'PLAIN ' + sasl_plain(name, pw))
            c.close()
            assert 400 <= code < 500, 'submission AUTH after an injected ' \
                '235 was answered %d %r (want a temporary failure)' % (
                    code, text)
        assert wait_for(lambda: re.search(
            r'(?i)after (the |its )?(STARTTLS|STLS)', gw.log_text()), 10,
            0.05), 'the log does not say that the server sent data after ' \
            'the STARTTLS go-ahead:\n%s' % gw.log_tail(15)
        assert not [u for tls, u in fake.logins if not tls], \
            'credentials sent in plaintext: %s' % fake.logins
        alive_or_fail(gw, 'the injected STARTTLS reply')
        assert gw.ctl('user', 'add', 'alice', 'state', 'destination').rc == 0
        real_login(gw)
    finally:
        fake.close()


def test_client_starttls_injection(hgw, henv, ca):
    """Commands a client pipelines behind STARTTLS (in the clear, in the
    same packet) are dropped: after the handshake nothing answers them and
    no login reaches a server (IMAP LOGIN, POP3 USER, submission AUTH, all
    with a real user's password)."""
    gw = hgw(tls=True, submission=True)
    user, pw = 'carol', HUSERS['carol'].encode()
    dovecot_log = size(henv.src.log_path)
    ctx = ca.ssl_context()

    s, _ = dial(gw.imap_port)
    s.sendall(b'a STARTTLS\r\nb LOGIN carol %s\r\n' % pw)
    assert read_line(s).startswith(b'a OK'), 'no STARTTLS go-ahead'
    t = ctx.wrap_socket(s, server_hostname='127.0.0.1')
    t.sendall(b'c NOOP\r\n')
    data = imap_reply(t, b'c')
    assert re.search(rb'(^|\n)c OK', data), data
    assert not re.search(rb'(^|\n)b ', data), \
        'IMAP: the LOGIN sent in the clear behind STARTTLS was answered ' \
        'inside TLS: %r' % data
    t.close()

    s, _ = dial(gw.pop3_port)
    s.sendall(b'STLS\r\nUSER carol\r\n')
    assert read_line(s).startswith(b'+OK'), 'no STLS go-ahead'
    t = ctx.wrap_socket(s, server_hostname='127.0.0.1')
    t.sendall(b'PASS %s\r\n' % pw)
    reply = read_line(t)
    assert reply.startswith(b'-ERR'), \
        'POP3: the USER sent in the clear behind STLS counted: PASS got %r' \
        % reply
    t.close()

    s, _ = dial(gw.submission_port)
    s.sendall(b'EHLO laptop\r\n')
    assert read_reply(s).startswith(b'250')
    s.sendall(b'STARTTLS\r\nAUTH PLAIN %s\r\n' % plain_ir(b'carol', pw))
    assert read_reply(s).startswith(b'220'), 'no STARTTLS go-ahead'
    t = ctx.wrap_socket(s, server_hostname='127.0.0.1')
    t.sendall(b'NOOP\r\n')
    reply = read_reply(t)
    assert reply.startswith(b'250'), \
        'submission: the AUTH sent in the clear behind STARTTLS was ' \
        'answered inside TLS: %r' % reply
    t.sendall(b'QUIT\r\n')
    t.close()

    seen = [l for l in log_since(henv.src.log_path, dovecot_log).splitlines()
            if 'user=<%s>' % user in l]
    assert not seen, 'a login injected behind STARTTLS reached the ' \
        'server:\n' + '\n'.join(seen)
    assert not re.search(r'%s: submission via' % user, gw.log_text()), \
        gw.log_tail(10)
    alive_or_fail(gw, 'STARTTLS injection by clients')


CAPS_KIND = {'imap': 'imap', 'pop3': 'pop3', 'smtp': 'submission'}


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_capabilities_of_starttls_servers_asked_over_tls(hgw, ca, proto):
    """A STARTTLS server lists XPLAINONLY before TLS and XTLSONLY after:
    the gateway's probe does STARTTLS first, so status shows XTLSONLY,
    never XPLAINONLY."""
    ctx = fakeserver.tls_server_context(ca.cert_file, ca.key_file)
    fake = fakeserver.MailServer(proto, tls=ctx,
                                 caps=(b'XPLAINONLY', b'XTLSONLY'))
    try:
        gw = fake_backend_gw(hgw, fake)
        kind = CAPS_KIND[proto]
        got = {}

        def asked():
            caps = (gw.ctl('status', '--json').json or {}).get(
                'capabilities') or {}
            got.update(caps.get(kind) or {})
            return got.get('source') is not None
        assert wait_for(asked, 20, 0.1), \
            'the %s probe of the STARTTLS server never got an answer:\n%s' % (
                kind, gw.log_tail(10))
        listed = got['source'].upper().split()
        assert 'XPLAINONLY' not in listed, \
            'capabilities taken before STARTTLS: %r' % got['source']
        assert 'XTLSONLY' in listed, \
            'capabilities not asked again over TLS: %r' % got['source']
        assert fake.starttls >= 1
    finally:
        fake.close()


# --------------------------------------------------------------- D: limits

# The trusted networks (loopback by default) have no per-address limit:
# here only 192.0.2.0/24 is trusted, and plaintext logins are let through
# for the session that stays open meanwhile.
LIMITS = ('[listen]\nmax_connections = 8\nmax_connections_per_ip = 5\n'
          'trusted_networks = 192.0.2.0/24\nplaintext_auth = yes')


def hold(port, src, n, want):
    """n connections from src, each greeted with want."""
    out = []
    for _ in range(n):
        s, g = dial(port, src)
        assert g.startswith(want), \
            'connection %d from %s: %r (want %r)' % (len(out) + 1, src, g,
                                                     want)
        out.append(s)
    return out


def greets(port, src, want):
    """A new connection from src is greeted with want (then closed)."""
    try:
        s, g = dial(port, src)
    except OSError:
        return False
    s.close()
    return g.startswith(want)


def refused(port, src):
    s, first = dial(port, src)
    rest, closed = read_until_close(s, 10)
    s.close()
    assert closed, 'over the limit, the connection stayed open after %r' % \
        first
    return first + rest


def close_all(socks):
    for s in socks:
        s.close()
    del socks[:]


def test_connection_limits(hgw):
    """max_connections_per_ip 5 and max_connections 8: the next one gets the
    protocol's refusal and is closed, sessions already open go on, and
    once some close new ones are taken again."""
    gw = hgw(tls=False, smtp=True, extra_conf=LIMITS)
    keep = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    assert keep.login('bob', HUSERS['bob'])[0] == 'OK'
    wait_sessions(gw, 1)
    per_ip = [(gw.imap_port, b'* OK',
               rb'\* BYE Too many connections from your address\.\r\n'),
              (gw.pop3_port, b'+OK', rb'-ERR \[SYS/TEMP\] Too many '
               rb'connections[^\r\n]*\r\n'),
              (gw.smtp_port, b'220', rb'421 4\.7\.0 Too many '
               rb'connections[^\r\n]*\r\n')]
    for i, (port, greeting, want) in enumerate(per_ip):
        src = '127.0.6.%d' % (i + 1)
        held = hold(port, src, 5, greeting)
        try:
            got = refused(port, src)
            assert re.fullmatch(want, got), \
                'the 6th connection from %s got %r (want %r)' % (src, got,
                                                                 want)
            # Another address is still welcome.
            other = hold(port, '127.0.7.%d' % (i + 1), 1, greeting)
            close_all(other)
            # One of src's goes: src is welcome again.
            held.pop().close()
            assert wait_for(lambda: greets(port, src, greeting), 10, 0.1), \
                'a place from %s freed, still refused' % src
        finally:
            close_all(held)
        assert keep.noop()[0] == 'OK'
        wait_sessions(gw, 1)
    gw.stop()

    # From a trusted network only max_connections counts.
    gw = hgw(tls=False, extra_conf='[listen]\nmax_connections = 20\n'
             'max_connections_per_ip = 2\ntrusted_networks = 127.0.6.0/24')
    held = hold(gw.imap_port, '127.0.6.9', 6, b'* OK')
    try:
        held += hold(gw.imap_port, '127.0.5.9', 2, b'* OK')
        got = refused(gw.imap_port, '127.0.5.9')
        assert re.fullmatch(rb'\* BYE Too many connections from your '
                            rb'address\.\r\n', got), got
    finally:
        close_all(held)
    gw.stop()

    gw = hgw(tls=False, smtp=True, extra_conf=LIMITS)
    keep = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    assert keep.login('bob', HUSERS['bob'])[0] == 'OK'
    wait_sessions(gw, 1)
    total = []
    try:
        for i in range(7):      # with keep: 8
            total += hold(gw.imap_port, '127.0.8.%d' % (i + 1), 1, b'* OK')
        for port, want in ((gw.imap_port, rb'\* BYE Too many connections\.'
                            rb'\r\n'),
                           (gw.pop3_port, rb'-ERR \[SYS/TEMP\] Too many '
                            rb'connections[^\r\n]*\r\n'),
                           (gw.smtp_port, rb'421 4\.7\.0 Too many '
                            rb'connections[^\r\n]*\r\n')):
            got = refused(port, '127.0.9.1')
            assert re.fullmatch(want, got), \
                'over max_connections: %r (want %r)' % (got, want)
        assert keep.noop()[0] == 'OK'
        total.pop().close()
        assert wait_for(lambda: greets(gw.smtp_port, '127.0.9.2', b'220'),
                        10, 0.1), 'a place freed, still refused'

    finally:
        close_all(total)
    keep.logout()
    alive_or_fail(gw, 'the connection limits')


def test_long_user_names(hgw, henv):
    """A user name longer than 255 bytes is refused as too long by every
    login command; no login reaches a server and the store gets no row."""
    gw = hgw(tls=True, submission=True)
    mark = 'longname-%s-' % token()
    name = (mark + 'x' * 300)[:300]
    n, pw = name.encode(), WRONG_PW.encode()
    dovecot_log = size(henv.src.log_path)
    problems = []

    s, _ = dial(gw.imap_port, '127.0.3.1')
    s.sendall(b'a LOGIN %s %s\r\n' % (n, pw))
    r = imap_reply(s, b'a')
    if not re.search(rb'(?i)(^|\n)a NO [^\n]*too long', r):
        problems.append('IMAP LOGIN: %r' % r[-200:])
    s.sendall(b'b AUTHENTICATE PLAIN %s\r\n' % plain_ir(n, pw))
    r = imap_reply(s, b'b')
    if not re.search(rb'(?i)(^|\n)b NO [^\n]*too long', r):
        problems.append('IMAP AUTHENTICATE PLAIN: %r' % r[-200:])
    s.close()

    s, _ = dial(gw.pop3_port, '127.0.3.2')
    s.sendall(b'USER %s\r\n' % n)
    r = read_line(s)
    if r.startswith(b'+OK'):
        s.sendall(b'PASS %s\r\n' % pw)
        r = read_line(s)
    if not re.match(rb'(?i)-ERR [^\n]*too long', r):
        problems.append('POP3 USER/PASS: %r' % r)
    s.sendall(b'AUTH PLAIN %s\r\n' % plain_ir(n, pw))
    r = read_line(s)
    if not re.match(rb'(?i)-ERR [^\n]*too long', r):
        problems.append('POP3 AUTH PLAIN: %r' % r)
    s.close()

    c = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port, timeout=30,
                         source_address=('127.0.3.3', 0),
                         context=gw.tls_ca.ssl_context())
    c.ehlo('laptop')
    code, text = c.docmd('AUTH', 'PLAIN ' + plain_ir(n, pw).decode())
    c.close()
    if code != 501 or b'too long' not in text.lower():
        problems.append('submission AUTH PLAIN: %d %r' % (code, text))

    rows = [u for u in store_names(gw) if u.startswith(mark)]
    if rows:
        problems.append('store rows: %s' % [len(u) for u in rows])
    if mark in log_since(henv.src.log_path, dovecot_log):
        problems.append('the source Dovecot saw a login of %s...' % mark)
    alive_or_fail(gw, 'long user names')
    assert not problems, 'a user name of 300 bytes:\n' + '\n'.join(problems)


def test_tags_that_are_not_atoms_are_refused(hgw):
    """A tag is sent back in every answer and quoted in INPROGRESS lines:
    one that is a quoted string, a literal, or holds a byte RFC 3501 does
    not allow in a tag is answered untagged (* BAD) and never echoed; the
    session goes on, and a tag with ']' (an ASTRING-CHAR) is fine."""
    gw = hgw(tls=False)
    bad = [b'"q\\"t" NOOP', b'"plain" NOOP', b'a\\b NOOP', b'a"b NOOP',
           b'a+b NOOP', b'a(b NOOP', b'a%b NOOP', b'a*b NOOP',
           b'{3+}\r\nabc NOOP', b'a\x7fb NOOP', b'a\x01b NOOP']
    for cmd in bad:    # a session each: 10 bad commands end one
        s, greeting = dial(gw.imap_port)
        assert greeting.startswith(b'* OK'), greeting
        s.sendall(cmd + b'\r\n')
        line = read_line(s)
        assert line.startswith(b'* BAD '), (cmd, line)
        # the next command is answered: the session is intact
        s.sendall(b'ok1 NOOP\r\n')
        assert imap_reply(s, b'ok1').endswith(b'ok1 OK NOOP completed.\r\n')
        s.close()
    s, _ = dial(gw.imap_port)
    s.sendall(b'x]y NOOP\r\n')
    assert imap_reply(s, b'x]y').startswith(b'x]y OK'), 'a ] tag refused'
    s.sendall(b'z LOGOUT\r\n')
    assert b'z OK' in imap_reply(s, b'z')
    s.close()
    alive_or_fail(gw, 'tags that are not atoms')


def test_nul_in_sasl_login_refused(hgw, henv):
    """A NUL byte in a SASL LOGIN name or password (IMAP AUTHENTICATE LOGIN,
    submission AUTH LOGIN, with or without an initial response) is refused
    by every front end alike, never cut: no login reaches a server."""
    gw = hgw(tls=True, submission=True)
    mark = 'nul-%s' % token()
    b64 = lambda b: base64.b64encode(b)
    name, pw = mark.encode(), WRONG_PW.encode()
    dovecot_log = size(henv.src.log_path)
    problems = []

    s, _ = dial(gw.imap_port, '127.0.3.4')
    for tag, steps in ((b'a', [name + b'\0x']),
                       (b'b', [name, pw + b'\0x'])):
        s.sendall(tag + b' AUTHENTICATE LOGIN\r\n')
        r = read_line(s)
        for step in steps:
            if not r.startswith(b'+'):
                break
            s.sendall(b64(step) + b'\r\n')
            r = read_line(s)
        if not r.startswith(tag + b' BAD Invalid characters'):
            problems.append('IMAP AUTHENTICATE LOGIN %r: %r' % (steps, r))
    s.close()

    c = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port, timeout=30,
                         source_address=('127.0.3.5', 0),
                         context=gw.tls_ca.ssl_context())
    c.ehlo('laptop')
    code, text = c.docmd('AUTH', 'LOGIN ' + b64(name + b'\0x').decode())
    if code != 501:
        problems.append('submission AUTH LOGIN IR: %d %r' % (code, text))
    code, text = c.docmd('AUTH', 'LOGIN')
    if code == 334:
        code, text = c.docmd(b64(name).decode())
    if code == 334:
        code, text = c.docmd(b64(pw + b'\0x').decode())
    if code != 501:
        problems.append('submission AUTH LOGIN password: %d %r' %
                        (code, text))
    c.close()

    if mark in log_since(henv.src.log_path, dovecot_log):
        problems.append('the source Dovecot saw a login of %s' % mark)
    alive_or_fail(gw, 'NUL bytes in SASL LOGIN')
    assert not problems, 'NUL in a SASL LOGIN:\n' + '\n'.join(problems)


def flood(port, src, payload, stop, results, rcvbuf=None, socks=None):
    """A client that sends payload (pipelined commands) as fast as the
    gateway takes it and never reads. Once it has sent all, been closed, or
    sent nothing for 3 s, (bytes sent, how it ended) goes into results;
    the connection is held until stop is set. rcvbuf: a small receive
    buffer (the answers then wait in the gateway, not in the kernel);
    socks: a list the socket is put in (to read it later)."""
    try:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.bind((src, 0))
        s.connect(('127.0.0.1', port))
    except OSError as ex:
        s.close()
        results.append((0, 'cannot connect: %s' % ex))
        return
    if socks is not None:
        socks.append(s)
    s.settimeout(0.5)
    sent, idle, how = 0, 0.0, 'sent all'
    try:
        while sent < len(payload) and not stop.is_set():
            try:
                sent += s.send(payload[sent:sent + 65536])
                idle = 0.0
            except socket.timeout:
                idle += 0.5
                if idle >= 3:
                    how = 'blocked'
                    break
    except OSError as ex:
        how = 'closed by the gateway (%s)' % ex.__class__.__name__
    results.append((sent, how))
    stop.wait()
    if socks is None:
        s.close()


def flood_clients(port, addrs, payload, **kw):
    """One flood() thread per address; returns (stop event, threads,
    results)."""
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=flood, daemon=True,
                                args=(port, a, payload, stop, results),
                                kwargs=kw)
               for a in addrs]
    for t in threads:
        t.start()
    return stop, threads, results


# Under the sanitizers (make check-asan) freed memory waits in ASan's
# quarantine (tests/asan-check keeps it to 64 MB) and its shadow memory
# counts too: memory bounds get this much more there. The plain run holds
# them to the real numbers.
SANITIZER_SLACK_KB = 128 * 1024 if os.environ.get('MAILSHIFT_SANITIZER') \
    else 0


def peak_rss_while(gw, busy, base_kb, limit_kb, settle=25):
    """The daemon's peak VmRSS since the caller's gw.rss_peak_reset() (its
    VmHWM: every spike counts, not only sampled ones), read every 0.2 s
    while busy() is true, then settle times more; returns it. Fails at once
    over base_kb + limit_kb."""
    peak = 0
    while settle > 0:
        if not busy():
            settle -= 1
        rss = gw.rss_kb('VmHWM')
        if rss is None:
            alive_or_fail(gw, 'clients that pipeline and never read')
        peak = max(peak, rss)
        assert peak - base_kb < limit_kb + SANITIZER_SLACK_KB, \
            'mailshiftd grew by %d MB (VmRSS %d MB, baseline %d MB)' % (
                (peak - base_kb) // 1024, peak // 1024, base_kb // 1024)
        time.sleep(0.2)
    return peak


# A command answered before login, pipelined 200,000 times.
FLOOD = {'imap': b'a CAPABILITY\r\n', 'pop3': b'CAPA\r\n',
         'smtp': b'EHLO x\r\n'}
# How many a client may send: before login (IMAP, POP3), and without a
# message (SMTP: EHLO, NOOP, RSET, ...). The log line of a client cut there.
BUDGET = {'imap': 1000, 'pop3': 1000, 'smtp': 100}
CUT = {'imap': b'commands before login', 'pop3': b'commands before login',
       'smtp': b'commands without a message'}


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_prelogin_output_is_bounded(hgw, proto):
    """50 clients pipeline 200,000 commands each (IMAP CAPABILITY, POP3
    CAPA, SMTP EHLO) and never read: the daemon's memory stays within 64
    MB of what it was, and it serves on. A client is cut off (and the log
    says why) only past its command budget, never before."""
    gw = hgw(tls=False, smtp=True)
    port = {'imap': gw.imap_port, 'pop3': gw.pop3_port,
            'smtp': gw.smtp_port}[proto]
    real_login(gw)
    base = gw.rss_kb()
    gw.rss_peak_reset()
    stop, threads, results = flood_clients(
        port, ['127.0.4.%d' % (i + 1) for i in range(50)],
        FLOOD[proto] * 200000)
    try:
        peak = peak_rss_while(gw, lambda: len(results) < len(threads),
                              base, 64 * 1024)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    print('VmRSS baseline %d kB, peak %d kB; clients (bytes sent, end): %s'
          % (base, peak, sorted(results)))
    alive_or_fail(gw, 'clients that pipeline and never read')
    real_login(gw)
    dropped = [r for r in results if r[1].startswith('closed')]
    early = [r for r in dropped
             if r[0] < BUDGET[proto] * len(FLOOD[proto])]
    assert not early, 'the gateway hung up on %d clients before their ' \
        'budget of %d commands: %s' % (len(early), BUDGET[proto], early[:3])
    with open(gw.log_path, 'rb') as f:
        cut = f.read().count(CUT[proto])
    assert cut >= len(dropped), 'clients cut off without a word in the ' \
        'log: %d closed, %d logged' % (len(dropped), cut)


# Pipelined below the budget, with a small receive buffer: the answers
# wait in the gateway, which must stop reading rather than hang up.
PIPELINE = {'imap': (b'a CAPABILITY\r\n', 900, rb'a OK '),
            'pop3': (b'CAPA\r\n', 900, rb'\r\n\.\r\n'),
            'smtp': (b'NOOP\r\n', 90, rb'250 2\.0\.0 Ok\r\n')}


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_prelogin_pipelining_waits_for_the_reader(hgw, proto):
    """50 clients with a 4 KB receive buffer pipeline commands within
    their budget and do not read: nobody is cut off and memory stays
    bounded; when they read, each gets every answer."""
    gw = hgw(tls=False, smtp=True)
    port = {'imap': gw.imap_port, 'pop3': gw.pop3_port,
            'smtp': gw.smtp_port}[proto]
    cmd, n, answer = PIPELINE[proto]
    base = gw.rss_kb()
    gw.rss_peak_reset()
    socks = []
    stop, threads, results = flood_clients(
        port, ['127.0.14.%d' % (i + 1) for i in range(50)], cmd * n,
        rcvbuf=4096, socks=socks)
    try:
        peak_rss_while(gw, lambda: len(results) < len(threads), base,
                       64 * 1024)
        dropped = [r for r in results if r[1].startswith('closed')]
        assert not dropped, 'the gateway hung up on %d of 50 clients ' \
            'whose commands were all valid: %s' % (len(dropped), dropped[:3])
        for s in socks:
            data, got = b'', 0
            s.settimeout(30)
            while got < n:
                chunk = s.recv(65536)
                assert chunk, 'closed after %d of %d answers' % (got, n)
                data += chunk
                got = len(re.findall(answer, data))
            assert got == n, (got, n)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        for s in socks:
            s.close()
    alive_or_fail(gw, 'clients that pipeline and read late')


# ------------------------------------------------------ E: log escaping

FORGED = b'2026-01-01T00:00:00Z mailshift error: forged'
# A user name that, logged as it is, starts a line of its own.
EVIL = b'evil\r\n' + FORGED + b' \x1b[2J\x07\x08\x7f\tend'
# Server texts: a terminal escape, a CR in mid-line, a bell.
NOISE = b' \x1b[31mXEVIL\r' + FORGED + b'\x1b]0;t\x07'


def test_log_has_no_raw_control_bytes(hgw):
    """User names with CR, LF and other control bytes (AUTHENTICATE PLAIN,
    an IMAP literal, POP3 AUTH PLAIN and USER, submission AUTH PLAIN) are
    refused before any server sees them, and logged escaped; servers whose
    replies carry control bytes (greeting and capabilities, an XCLIENT
    refusal, a 535) to the logins of ordinary names: the log has no line
    forged from either and no control byte but its line ends and tabs."""
    imap = fakeserver.MailServer('imap', caps=(b'XEVIL\x1b[31m', b''),
                                 extra=NOISE, login='close')
    pop3 = fakeserver.MailServer('pop3', caps=(b'XEVIL\x1b[31m', b''),
                                 extra=NOISE, login='close', xclient=True)
    smtp = fakeserver.MailServer('smtp', caps=(b'XEVIL\x1b[31m', b''),
                                 extra=NOISE)
    try:
        gw = hgw(tls=False, submission=True, smtp_backends={
            'source': {'submission': smtp.url('smtp')}},
            extra_conf='[source]\nimap = %s\npop3 = %s' % (imap.url(),
                                                            pop3.url()))
        pw = WRONG_PW.encode()
        s, _ = dial(gw.imap_port, '127.0.10.1')
        s.sendall(b'a AUTHENTICATE PLAIN %s\r\n' % plain_ir(EVIL, pw))
        assert re.search(rb'(^|\n)a NO ', imap_reply(s, b'a'))
        s.sendall(b'b LOGIN {%d+}\r\n%s %s\r\n' % (len(EVIL), EVIL, pw))
        assert re.search(rb'(^|\n)b NO ', imap_reply(s, b'b'))
        s.sendall(b'c LOGIN victim %s\r\n' % pw)
        assert re.search(rb'(^|\n)c NO ', imap_reply(s, b'c'))
        s.close()
        s, _ = dial(gw.pop3_port, '127.0.10.2')
        s.sendall(b'AUTH PLAIN %s\r\n' % plain_ir(EVIL, pw))
        assert read_line(s).startswith(b'-ERR')
        s.sendall(b'USER evil\x1b[2J\x07\x08name\r\nPASS %s\r\n' % pw)
        assert read_line(s).startswith(b'+OK')
        assert read_line(s).startswith(b'-ERR')
        s.sendall(b'USER victim\r\nPASS %s\r\n' % pw)
        assert read_line(s).startswith(b'+OK')
        assert read_line(s).startswith(b'-ERR')
        s.close()
        c = smtplib.SMTP('127.0.0.1', gw.submission_port, timeout=30,
                         source_address=('127.0.10.3', 0))
        c.ehlo('laptop')
        code, _ = c.docmd('AUTH', 'PLAIN ' + plain_ir(EVIL, pw).decode())
        assert code == 535, code
        code, _ = c.docmd('AUTH', 'PLAIN ' + plain_ir(b'victim', pw).decode())
        assert code == 535, code
        c.close()
        gw.wait_capabilities('imap', 'pop3', 'submission')
        assert imap.logins and pop3.logins and smtp.logins, \
            'harness: a login did not reach a fake server'
        for f in (imap, pop3, smtp):
            assert not any(b'evil' in repr(x).encode() for x in f.logins), \
                'a user name with control bytes reached a server: %r' % \
                f.logins
        alive_or_fail(gw, 'control bytes in names and replies')
    finally:
        for f in (imap, pop3, smtp):
            f.close()
    with open(gw.log_path, 'rb') as f:
        log = f.read()
    assert b'XEVIL' in log, 'harness: no server text reached the log'
    assert b'refused the user name "evil\\r\\n2026-01-01T00:00:00Z' in log, \
        'the refused name is not in the log, escaped'
    lines = log.split(b'\n')
    forged = [l for l in lines if l.lstrip(b'\r').startswith(FORGED[:20])]
    assert not forged, 'log lines forged by a client or server: %r' % forged
    raw = [l for l in lines if re.search(rb'[\x00-\x08\x0b-\x1f\x7f]', l)]
    assert not raw, 'log lines with raw control bytes:\n' + \
        '\n'.join(repr(l) for l in raw[:10])


# -------------------------------------------------- F: plaintext logins

UNTRUSTED = '[listen]\nplaintext_auth = no\ntrusted_networks = 192.0.2.0/24'


def test_plaintext_auth_refused_when_untrusted(hgw, ca):
    """From an address outside trusted_networks, with plaintext_auth = no:
    no plaintext login (IMAP LOGINDISABLED and PRIVACYREQUIRED, POP3 -ERR
    [AUTH], submission 530 5.7.0 and no AUTH offered, 538 5.7.11 from a
    gateway without a certificate); after STARTTLS the
    same connection logs in."""
    gw = hgw(tls=True, submission=True, extra_conf=UNTRUSTED)
    pw = HUSERS['alice']
    ctx = ca.ssl_context()

    m = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    for where, caps in (('greeting', greeting_caps(m.welcome)),
                        ('CAPABILITY', set(m.capability()[1][0].decode()
                                           .upper().split()))):
        assert 'LOGINDISABLED' in caps and 'STARTTLS' in caps and \
            not caps & {'AUTH=PLAIN', 'AUTH=LOGIN'}, \
            'plaintext IMAP %s from an untrusted address: %s' % (where,
                                                                 caps)
    for args in (('LOGIN', 'alice', '"%s"' % pw),
                 ('AUTHENTICATE', 'PLAIN', sasl_plain('alice', pw))):
        typ, data = m._simple_command(*args)
        assert typ == 'NO' and b'[PRIVACYREQUIRED]' in data[-1], \
            'plaintext IMAP %s from an untrusted address: %s %r' % (
                args[0], typ, data)
    assert m.starttls(ssl_context=ctx)[0] == 'OK'
    caps = set(m.capability()[1][0].decode().upper().split())
    assert 'AUTH=PLAIN' in caps and 'LOGINDISABLED' not in caps, caps
    assert m.login('alice', pw)[0] == 'OK'
    m.logout()

    p = poplib.POP3('127.0.0.1', gw.pop3_port, timeout=30)
    want = r'-ERR \[AUTH\] Plaintext authentication disallowed'
    try:
        p.user('alice')       # may be refused already, or at PASS
        with pytest.raises(poplib.error_proto, match=want):
            p.pass_(pw)
    except poplib.error_proto as ex:
        assert re.search(want, str(ex)), ex
    with pytest.raises(poplib.error_proto, match=want):
        p._shortcmd('AUTH PLAIN ' + sasl_plain('alice', pw))
    p.stls(context=ctx)
    p.user('alice')
    assert p.pass_(pw).startswith(b'+OK')
    p.quit()

    s = smtplib.SMTP('127.0.0.1', gw.submission_port, timeout=30)
    s.ehlo('laptop')
    assert 'auth' not in s.esmtp_features, s.esmtp_features
    code, text = s.docmd('AUTH', 'PLAIN ' + sasl_plain('alice', pw))
    assert code == 530 and text.startswith(b'5.7.0'), (code, text)
    s.starttls(context=ctx)
    s.ehlo('laptop')
    assert 'PLAIN' in s.esmtp_features.get('auth', '').upper().split()
    s.user, s.password = 'alice', pw
    assert s.auth('PLAIN', s.auth_plain)[0] == 235
    s.quit()

    # Without a certificate there is no STARTTLS to ask for: 538.
    gw = hgw(tls=False, submission=True, extra_conf=UNTRUSTED)
    s = smtplib.SMTP('127.0.0.1', gw.submission_port, timeout=30)
    s.ehlo('laptop')
    assert 'auth' not in s.esmtp_features and \
        'starttls' not in s.esmtp_features, s.esmtp_features
    code, text = s.docmd('AUTH', 'PLAIN ' + sasl_plain('alice', pw))
    assert code == 538 and text.startswith(b'5.7.11'), (code, text)
    s.quit()


@pytest.mark.parametrize('conf', [
    '', '[listen]\nplaintext_auth = no\ntrusted_networks = 192.0.2.0/24 '
    '127.0.0.1/32', '[listen]\nplaintext_auth = yes\ntrusted_networks = '
    '192.0.2.0/24'], ids=['default', 'trusted', 'plaintext_auth-yes'])
def test_plaintext_auth_allowed(hgw, conf):
    """From a trusted address (127.0.0.0/8 by default), or with
    plaintext_auth = yes, plaintext IMAP and POP3 logins work."""
    gw = hgw(tls=True, extra_conf=conf)
    m = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    check_greeting(m.welcome, starttls=True)
    assert m.login('alice', HUSERS['alice'])[0] == 'OK'
    m.logout()
    p = poplib.POP3('127.0.0.1', gw.pop3_port, timeout=30)
    p.user('alice')
    assert p.pass_(HUSERS['alice']).startswith(b'+OK')
    p.quit()


# ----------------------------------------------- G: the backend's TLS name

def test_backend_tls_server_name(hgw, workdir, ca):
    """[source] server_name: the source's certificate is checked against it
    (and it goes out as SNI: the Dovecot serves the mail.test certificate
    only when asked for mail.test) while the gateway connects to an IP
    address; a wrong name is a temporary failure and a name mismatch in
    the log."""
    default = ca.server_cert('default-test', ('default.test',))
    named, key = ca.issue('mail-test', ('mail.test',))
    srv = src_server(workdir, ca, dict(HUSERS), name='namesrc',
                     tls_ca=default, extra_conf=(
                         'local_name mail.test {\n  ssl_cert = <%s\n'
                         '  ssl_key = <%s\n}' % (named, key)))
    srv.start()
    try:
        for name in (None, 'mail.test', 'wrong.test'):
            gw = hgw(tls=False, src=srv, src_schemes=('imaps', 'pop3s'),
                     extra_conf='[source]\nserver_name = %s' % name
                     if name else '')
            m = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
            typ, data = m._simple_command('LOGIN', 'alice',
                                          '"%s"' % HUSERS['alice'])
            m.shutdown()
            p = poplib.POP3('127.0.0.1', gw.pop3_port, timeout=30)
            p.user('alice')
            try:
                pop3 = p.pass_(HUSERS['alice'])
                p.quit()
            except poplib.error_proto as ex:
                pop3 = str(ex).encode()
                p.close()
            if name == 'mail.test':
                assert typ == 'OK', 'IMAP with server_name = mail.test: ' \
                    '%s %r\n%s' % (typ, data, gw.log_tail(5))
                assert pop3.startswith(b'+OK'), pop3
                continue
            assert typ == 'NO' and b'[UNAVAILABLE]' in data[-1], \
                (name, typ, data)
            assert b'-ERR [SYS/TEMP]' in pop3, (name, pop3)
            assert name is None or re.search(r'(?i)name mismatch',
                                             gw.log_text()), \
                'server_name %s: the log does not say "name mismatch":\n%s' \
                % (name, gw.log_tail(10))
    finally:
        srv.stop()


# ------------------------------------------------------- H: metrics

def metrics_gw(hgw):
    port = dc.free_port()
    gw = hgw(tls=False, extra_conf='[metrics]\nlisten = 127.0.0.1:%d' % port)
    gw.metrics_port = port
    return gw


def test_metrics_idle_client_is_closed(hgw):
    """A client of the metrics endpoint that sends nothing is closed after
    a timeout (10 s by default)."""
    gw = metrics_gw(hgw)
    s = socket.create_connection(('127.0.0.1', gw.metrics_port), timeout=5)
    t = time.monotonic()
    data, closed = read_until_close(s, 30)
    s.close()
    took = time.monotonic() - t
    assert closed, 'an idle metrics client was still connected after 30 s'
    print('closed after %.1f s' % took)
    # By the timeout, not at once (the timer starts at the accept, after
    # t; a coarse clock may lag it by a tick).
    assert took >= 9.9, 'closed after %.2f s, before the 10 s timeout' % took
    assert http_get(gw.metrics_port).startswith('HTTP/1.0 200')


def test_metrics_beside_idle_clients_and_long_lines(hgw):
    """With 200 idle clients connected GET /metrics still answers; an
    over-long request line is closed."""
    gw = metrics_gw(hgw)
    idle = [socket.create_connection(('127.0.0.1', gw.metrics_port),
                                     timeout=5) for _ in range(200)]
    try:
        text = http_get(gw.metrics_port)
        assert text.startswith('HTTP/1.0 200') and 'mailshift_users' in \
            text, text[:300]
        s = socket.create_connection(('127.0.0.1', gw.metrics_port),
                                     timeout=5)
        send_all_ignoring_reset(s, b'GET /' + b'a' * 100000)
        data, closed = read_until_close(s, 10)
        s.close()
        assert closed, 'a 100 KB request line was not closed'
        assert b'200 OK' not in data, data[:200]
    finally:
        for s in idle:
            s.close()
    assert http_get(gw.metrics_port).startswith('HTTP/1.0 200')
    alive_or_fail(gw, 'metrics clients')


# ------------------------------- found while writing these (not the issue's)

def test_commands_pipelined_behind_a_refused_login_are_answered(hgw):
    """Commands pipelined behind a login the server refuses are answered
    at once, not when the client happens to send more."""
    gw = hgw(tls=False)
    for port, src, payload, want in (
            (gw.imap_port, '127.0.12.1',
             b'a LOGIN nobody-x wrong\r\nb NOOP\r\n', rb'(^|\n)b OK'),
            (gw.pop3_port, '127.0.12.2',
             b'USER nobody-x\r\nPASS wrong\r\nNOOP\r\n',
             rb'\A\+OK[^\n]*\n-ERR[^\n]*\n\+OK')):
        s, _ = dial(port, src)
        s.sendall(payload)
        data = read_until(s, want)
        s.close()
        assert re.search(want, data), \
            'no answer to the command behind the refused login: %r' % data



def test_command_budget_before_login(hgw):
    """1,000 commands before login are answered; the next ends the session
    with a clear word (IMAP, POP3). On port 25, 100 commands that move no
    mail (NOOP here) are answered, the next gets 421; a message resets
    the count (not tried here: the limit itself is the point)."""
    gw = hgw(tls=False, smtp=True)
    for port, src, cmd, n, ok, last in (
            (gw.imap_port, '127.0.15.1', b'a NOOP\r\n', BUDGET['imap'],
             rb'a OK ', rb'\* BYE Too many commands before login\.\r\n'),
            (gw.pop3_port, '127.0.15.2', b'NOOP\r\n', BUDGET['pop3'],
             rb'\+OK', rb'-ERR Too many commands before login\.\r\n'),
            (gw.smtp_port, '127.0.15.3', b'NOOP\r\n', BUDGET['smtp'],
             rb'250 ', rb'421 4\.7\.0 [^\r\n]*too many commands without '
             rb'a message\r\n')):
        s, _ = dial(port, src)
        s.sendall(cmd * (n + 5))
        data, closed = read_until_close(s, 60)
        s.close()
        assert closed, 'still open after %d commands' % (n + 5)
        lines = data.split(b'\r\n')
        got = sum(1 for l in lines if re.match(ok, l + b' '))
        assert got == n, '%d answered of %d (want all of the budget)' % (
            got, n)
        assert re.search(last + rb'\Z', data), data[-200:]
    real_login(gw)
    alive_or_fail(gw, 'the command budget')
