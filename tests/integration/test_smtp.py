"""Integration tests of mailshiftd's SMTP side (docs/gateway-spec.md, "SMTP"):
inbound SMTP routed per recipient and submission routed by AUTH, with
Python's smtplib as the client.

Backends, as a site runs them: two Postfix
instances (tests/lib/postfix.py), each delivering its virtual domain
example.test over LMTP into its Dovecot (source, destination). The
submission services of both Postfixes authenticate against their Dovecot
(SASL type dovecot over TCP) and offer STARTTLS; the gateway reaches them
with smtp+starttls:// and verifies their certificate.

The servers and one mailshiftd are shared by the whole module (starting
two Postfixes takes seconds); every test uses users of its own. Map user
names are bare ("alice"), except carol, who is in the map by her full
address: both forms route.
"""

import base64
import collections
import imaplib
import os
import random
import smtplib
import socket
import ssl
import threading
import time

import pytest

import dovecot as dc
import fakeserver
import gateway as gwlib
import leakcheck
import mailcheck as mc
import postfix as pf
import tcpproxy
from conftest import stop_all, store_bytes, store_rows, wait_for

DOMAIN = 'example.test'
USERS = {u: 'Smtp-%s-Pw-%04d' % (u, i) for i, u in enumerate(
    ('alice', 'bob', 'carol', 'dave', 'erin', 'gina', 'hank', 'ivan',
     'judy', 'kate', 'liam', 'mona', 'nora', 'olga'))}
WRONG_PW = 'Wr0ng-Smtp-Pw-31x'
leakcheck.CHECK.secret(WRONG_PW, 'the wrong password of test_smtp')


def addr(user):
    return '%s@%s' % (user, DOMAIN)


class Env:
    pass


@pytest.fixture(scope='module')
def env(test_root, ca):
    root = dc.make_test_root(prefix='smtp-', parent=test_root)
    e = Env()
    e.root = root
    e.ca = ca
    ports = dc._free_ports(4)
    e.src = dc.Dovecot(os.path.join(root, 'src'), 'src', users=dict(USERS),
                       extra_conf=pf.lmtp_conf(ports[0], 'mx.src.test',
                                               ports[1]))
    e.dst = dc.Dovecot(os.path.join(root, 'dst'), 'dst', users=dict(USERS),
                       extra_conf=pf.lmtp_conf(ports[2], 'mx.dst.test',
                                               ports[3]))
    tls = (ca.cert_file, ca.key_file)
    e.src_mta = pf.Postfix(os.path.join(root, 'src-mta'), 'src', DOMAIN,
                           ports[0], users=USERS, sasl_port=ports[1], tls=tls)
    # The destination MTA offers a little less and takes bigger messages:
    # the gateway's EHLO lists what both offer (test_ehlo_capabilities).
    e.dst_mta = pf.Postfix(os.path.join(root, 'dst-mta'), 'dst', DOMAIN,
                           ports[2], users=USERS, sasl_port=ports[3], tls=tls,
                           extra_main_cf='message_size_limit = 20480000\n'
                           'smtpd_discard_ehlo_keywords = dsn, etrn')
    e.gw = None
    errors = []

    def start(*servers):
        try:
            for s in servers:
                s.start()
        except Exception as ex:         # noqa: BLE001 (reported below)
            errors.append(ex)

    try:
        ts = [threading.Thread(target=start, args=(e.src, e.src_mta)),
              threading.Thread(target=start, args=(e.dst, e.dst_mta))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        e.gw = gwlib.Mailshiftd(
            os.path.join(root, 'gw'), e.src, e.dst, tls_ca=ca,
            policy='passthrough', smtp=True, submission=True,
            smtp_backends={
                'source': {'smtp': e.src_mta.url('smtp'),
                           'submission': e.src_mta.url('smtp+starttls')},
                'destination': {'smtp': e.dst_mta.url('smtp'),
                                'submission': e.dst_mta.url('smtp+starttls')},
            }, smtp_ca_file=ca.ca_file)
        e.gw.start()
        yield e
    finally:
        try:
            if e.gw is not None:
                e.gw.stop()
            stop_all(e.src_mta, e.dst_mta)
            stop_all(e.src, e.dst)
            password_check(e)
        finally:
            dc.remove_test_root(root)


def password_check(e):
    """No password used here shows up in the daemon's log or store, in any
    encoding (raw, base64, SASL PLAIN...): a quick check of this module;
    the session's leak check (tests/lib/leakcheck.py) looks at every file
    and process of every module."""
    if e.gw is None:
        return
    secrets = {pw: 'the password of %s' % u for u, pw in USERS.items()}
    secrets[WRONG_PW] = 'the wrong password'
    scanner = leakcheck.Scanner(secrets, users=USERS)
    with open(e.gw.log_path, 'rb') as f:
        log = f.read()
    for what, data in (('log', log), ('store', store_bytes(e.gw.store_path))):
        hits = scanner.scan(data)
        assert not hits, 'mailshiftd %s: %s' % (what, hits)


@pytest.fixture
def gw(env, request):
    yield env.gw
    rep = getattr(request.node, 'rep_call', None)
    if rep is None or rep.failed:
        print('----- mailshiftd (last lines)\n%s' % env.gw.log_tail(40))
        print('----- source MTA\n%s' % env.src_mta.log_tail(15))
        print('----- destination MTA\n%s' % env.dst_mta.log_tail(15))


# -------------------------------------------------------------- helpers

def message(tag, body='Hello.\r\n'):
    msgid = '<%s.%d@mailshift.test>' % (tag, random.randrange(1 << 30))
    msg = ('From: Sender <sender@remote.test>\r\n'
           'To: someone@%s\r\n'
           'Subject: smtp test %s\r\n'
           'Message-ID: %s\r\n'
           'Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n'
           '\r\n%s' % (DOMAIN, tag, msgid, body)).encode()
    return msg, msgid


def smtp(gw, source='127.0.0.1', timeout=30):
    return smtplib.SMTP('127.0.0.1', gw.smtp_port, timeout=timeout,
                        source_address=(source, 0))


def count(server, user, msgid):
    """Messages in user's INBOX on server with this Message-ID."""
    m = server.imap(user)
    try:
        typ, data = m.select('INBOX', readonly=True)
        assert typ == 'OK', data
        typ, data = m.search(None, 'HEADER', 'Message-ID', '"%s"' % msgid)
        assert typ == 'OK', data
        return len(data[0].split())
    finally:
        m.logout()


def fetch(server, user, msgid):
    m = server.imap(user)
    try:
        m.select('INBOX', readonly=True)
        typ, data = m.search(None, 'HEADER', 'Message-ID', '"%s"' % msgid)
        uid = data[0].split()[0]
        typ, data = m.fetch(uid, '(BODY.PEEK[])')
        return data[0][1]
    finally:
        m.logout()


def settled(env, timeout=15):
    """Both MTAs have delivered (or bounced) everything they took."""
    assert wait_for(lambda: env.src_mta.queue_empty() and
                    env.dst_mta.queue_empty(), timeout, 0.02), \
        'a Postfix queue did not drain:\n%s\n%s' % (
            env.src_mta.log_tail(10), env.dst_mta.log_tail(10))


def where(env, user, msgid):
    """(copies on the source, copies on the destination), once settled."""
    settled(env)
    return count(env.src, user, msgid), count(env.dst, user, msgid)


def assert_moved(env, user, sent, after_flip=()):
    """Once the user is on the destination: the destination holds, by
    Message-ID over all folders, exactly what the source holds (so each
    message once, none left only on the source) plus the messages of
    after_flip (sent after the flip: not on the source); each message of
    sent (sent while the copy ran) is on the source once."""
    settled(env)
    m = env.src.imap(user)
    try:
        src = mc.message_ids(m)
    finally:
        m.logout()
    m = env.dst.imap(user)
    try:
        dst = mc.message_ids(m)
    finally:
        m.logout()
    for i in sent:
        assert src[i] == 1 and dst[i] == 1, (i, src[i], dst[i])
    for i in after_flip:
        assert src[i] == 0 and dst[i] == 1, (i, src[i], dst[i])
    assert [i for i in src if dst[i] != src[i]] == [], \
        'not exactly once on the destination'
    assert dst == src + collections.Counter(after_flip), \
        'on the destination and not on the source'


def set_state(gw, user, state):
    res = gw.ctl('user', 'add', user, 'state', state, '--force')
    if res.rc != 0:
        res = gw.ctl('user', 'set', user, 'state', state, '--force')
    assert res.rc == 0, res.describe()
    assert gw.state(user) == state


def sessions(gw):
    res = gw.ctl('sessions', '--json')
    assert res.rc == 0 and isinstance(res.json, dict), res.describe()
    return res.json['sessions']


def plain(user, pw):
    return base64.b64encode(('\0%s\0%s' % (user, pw)).encode()).decode()


# ---------------------------------------------------------------- tests

def test_source_user(env, gw):
    """(a) A recipient on the source: delivered there exactly once, not on
    the destination; the MTA saw the client's own address (XCLIENT)."""
    set_state(gw, 'alice', 'source')
    msg, msgid = message('a')
    s = smtp(gw, source='127.0.0.2')
    code, text = s.ehlo('client.remote.test')
    assert code == 250
    feats = s.esmtp_features
    assert 'size' in feats and '8bitmime' in feats and \
        'enhancedstatuscodes' in feats and 'starttls' in feats, feats
    assert 'auth' not in feats, 'AUTH offered on port 25'
    assert s.sendmail('sender@remote.test', [addr('alice')], msg) == {}
    s.quit()
    assert where(env, 'alice', msgid) == (1, 0)
    got = fetch(env.src, 'alice', msgid)
    # Postfix's Received: line names the client, not the gateway.
    assert b'[127.0.0.2]' in got and b'client.remote.test' in got, got[:800]
    assert got.endswith(msg), 'the message body changed on the way'
    # The same over STARTTLS.
    msg, msgid = message('a-tls')
    s = smtp(gw)
    s.starttls(context=env.ca.ssl_context())
    s.ehlo('client.remote.test')
    assert 'starttls' not in s.esmtp_features
    assert 'auth' not in s.esmtp_features
    assert s.sendmail('sender@remote.test', [addr('alice')], msg) == {}
    s.quit()
    assert where(env, 'alice', msgid) == (1, 0)


def ehlo_keywords(s, name='caps.remote.test'):
    code, text = s.ehlo(name)
    assert code == 250, text
    return text.decode().split('\n')[1:]


def test_ehlo_capabilities(env, gw):
    """EHLO lists only what both MTAs offer (asked at start): the
    destination MTA here discards DSN and ETRN and takes bigger messages,
    so the gateway offers neither and the smaller SIZE; port 25 only what
    the gateway relays; STARTTLS and AUTH are the gateway's own."""
    caps = gw.wait_capabilities('smtp', 'submission')
    src_kw = caps['smtp']['source'].split('\n')
    dst_kw = caps['smtp']['destination'].split('\n')
    assert 'DSN' in src_kw and 'DSN' not in dst_kw, caps['smtp']
    assert 'SIZE 10240000' in src_kw and 'SIZE 20480000' in dst_kw, \
        caps['smtp']
    assert 'ETRN' in caps['submission']['source'].split('\n')

    s = smtp(gw)
    assert ehlo_keywords(s) == ['PIPELINING', 'SIZE 10240000', '8BITMIME',
                                'STARTTLS', 'ENHANCEDSTATUSCODES']
    s.quit()

    s = smtplib.SMTP('127.0.0.1', gw.submission_port, timeout=30)
    before = ehlo_keywords(s)
    assert before == ['PIPELINING', 'SIZE 10240000', 'VRFY', '8BITMIME',
                      'CHUNKING', 'STARTTLS', 'ENHANCEDSTATUSCODES'], before
    s.starttls(context=env.ca.ssl_context())
    after = ehlo_keywords(s)
    assert 'STARTTLS' not in after and 'AUTH PLAIN LOGIN' in after, after
    assert [k for k in after if k != 'AUTH PLAIN LOGIN'] == \
        [k for k in before if k != 'STARTTLS'], (before, after)
    s.quit()


def test_destination_user(env, gw):
    """(b) Users in state destination (by bare name and by full address)
    get their mail on the destination."""
    set_state(gw, 'bob', 'destination')
    set_state(gw, addr('carol'), 'destination')
    msg, msgid = message('b')
    s = smtp(gw)
    assert s.sendmail('sender@remote.test', [addr('bob')], msg) == {}
    assert s.sendmail('sender@remote.test', [addr('carol')], msg) == {}
    s.quit()
    assert where(env, 'bob', msgid) == (0, 1)
    assert where(env, 'carol', msgid) == (0, 1)
    # Addresses in another case, or with a +extension, are still theirs.
    msg, msgid = message('b2')
    s = smtp(gw)
    assert s.sendmail('sender@remote.test', ['BOB@Example.TEST',
                                             'carol+lists@' + DOMAIN],
                      msg) == {}
    s.quit()
    assert where(env, 'bob', msgid) == (0, 1)
    assert where(env, 'carol', msgid) == (0, 1)


def test_cutover_defers(env, gw):
    """(c) In cutover, RCPT gets 451 4.2.0 and nothing is delivered."""
    set_state(gw, 'dave', 'cutover')
    msg, msgid = message('c')
    s = smtp(gw)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as ex:
        s.sendmail('sender@remote.test', [addr('dave')], msg)
    code, text = ex.value.recipients[addr('dave')]
    assert code == 451 and text.startswith(b'4.2.0'), (code, text)
    # The session goes on.
    assert s.noop()[0] == 250
    s.quit()
    assert where(env, 'dave', msgid) == (0, 0)


def test_recipients_on_both_sides(env, gw):
    """(d) One transaction, a recipient on each side: the first binds it
    (destination here), the other gets 452 4.5.3 and is delivered by a
    second transaction to the source. Every copy exactly once."""
    set_state(gw, 'gina', 'destination')
    set_state(gw, 'erin', 'source')
    msg, msgid = message('d')
    s = smtp(gw)
    refused = s.sendmail('sender@remote.test', [addr('gina'), addr('erin')],
                         msg)
    assert set(refused) == {addr('erin')}, refused
    code, text = refused[addr('erin')]
    assert code == 452 and text.startswith(b'4.5.3'), (code, text)
    # The sender's retry: a new transaction, the other server.
    assert s.sendmail('sender@remote.test', [addr('erin')], msg) == {}
    s.quit()
    assert where(env, 'gina', msgid) == (0, 1)
    assert where(env, 'erin', msgid) == (1, 0)


def test_unknown_recipient(env, gw):
    """(e) A recipient nobody knows goes to the source MTA, whose 550 5.1.1
    the client gets; a good recipient in the same transaction still gets
    the message."""
    set_state(gw, 'alice', 'source')
    msg, msgid = message('e')
    s = smtp(gw)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as ex:
        s.sendmail('sender@remote.test', ['nobody@' + DOMAIN], msg)
    code, text = ex.value.recipients['nobody@' + DOMAIN]
    assert code == 550 and text.startswith(b'5.1.1'), (code, text)
    refused = s.sendmail('sender@remote.test',
                         ['nobody2@' + DOMAIN, addr('alice')], msg)
    assert list(refused) == ['nobody2@' + DOMAIN], refused
    assert refused['nobody2@' + DOMAIN][0] == 550
    s.quit()
    assert where(env, 'alice', msgid) == (1, 0)


def source_use(gw):
    """{(user, kind): (name, at, slack)}: when mailshiftd last sent mail,
    a submission or a login to the source (the store's source_use, what
    mailshiftctl retire --check reads)."""
    return {(k, kind): (name, at, slack) for k, kind, name, at, slack in
            store_rows(gw.store_path, 'SELECT key, kind, name, at, slack '
                       'FROM source_use')}


def test_source_use_is_recorded(env, gw):
    """What retire --check counts: a recipient and a submission sent to
    the source are recorded under the user's map name; a recipient the map
    does not know under "*" with its address (the last one written: an
    earlier test's within the minute). A row covers uses up to its slack
    after it (mailshiftd writes one a minute per user at most)."""
    set_state(gw, 'alice', 'source')
    set_state(gw, 'ivan', 'source')
    t0 = int(time.time())
    msg, msgid = message('use')
    s = smtp(gw)
    refused = s.sendmail('sender@remote.test',
                         ['nobody3@' + DOMAIN, addr('alice').upper()], msg)
    assert list(refused) == ['nobody3@' + DOMAIN], refused
    s.quit()
    s = smtplib.SMTP('127.0.0.1', gw.submission_port, timeout=30)
    s.starttls(context=env.ca.ssl_context())
    s.login('ivan', USERS['ivan'])
    s.quit()
    t1 = int(time.time())
    # Written within a second (a second's uses go in one transaction).
    keys = (('alice', 'mail'), ('*', 'mail'), ('ivan', 'submission'))
    wait_for(lambda: all(k in source_use(gw) for k in keys), 10)
    use = source_use(gw)
    for key, name in ((('alice', 'mail'), None),
                      (('*', 'mail'), 'nobody'),
                      (('ivan', 'submission'), 'ivan')):
        assert key in use, (key, use)
        got, at, slack = use[key]
        assert at <= t1 and at + slack >= t0, (key, use[key], t0, t1)
        assert name is None or got.startswith(name), (key, use[key])


def test_mail_during_copy(env, gw):
    """(f) A message for a user whose mail is being copied (passthrough
    login, copy running) reaches the user exactly once: after the flip it
    is on the destination once. Mail after the flip goes there directly."""
    user = 'hank'
    m = env.src.imap(user)
    mc.append_many(m, 'INBOX', [(mc.make_message(i, 3000), [], None)
                                for i in range(150)])
    m.logout()
    im = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=30)
    typ, data = im.login(user, USERS[user])
    assert typ == 'OK', data
    # The copy runs now; mail arrives meanwhile.
    msg1, id1 = message('f1')
    s = smtp(gw)
    assert s.sendmail('sender@remote.test', [addr(user)], msg1) == {}
    assert gw.wait_state(user, 'copying', timeout=10) == 'copying'
    settled(env)
    assert count(env.src, user, id1) == 1
    msg2, id2 = message('f2')
    assert s.sendmail('sender@remote.test', [addr(user)], msg2) == {}
    settled(env)
    im.logout()
    # Mail sent while the user flips (last delta): deferred with 451, or
    # delivered to the destination once the flip is done; the sender
    # retries deferred mail. Whether this one met the cutover depends on
    # timing: test_real_cutover_defers holds a cutover open and asserts
    # the 451. (Mail the source MTA took just before the cutover can still
    # be in its queue when the last delta runs: a known gap,
    # docs/gateway-spec.md "SMTP"; the 2 s the gateway gives that MTA is
    # a timer no test measures, see docs/testing.md.)
    assert gw.wait_state(user, ('cutover', 'destination'), timeout=30) in \
        ('cutover', 'destination')
    msg3, id3 = message('f3')
    deadline = time.monotonic() + 30
    while True:
        try:
            assert s.sendmail('sender@remote.test', [addr(user)],
                              msg3) == {}
            break
        except smtplib.SMTPRecipientsRefused as ex:
            code, _ = ex.recipients[addr(user)]
            assert code == 451, ex.recipients
            assert time.monotonic() < deadline
            time.sleep(0.1)
    st = gw.wait_state(user, ('destination', 'failed'), timeout=30)
    assert st == 'destination', gw.user(user)
    msg4, id4 = message('f4')
    assert s.sendmail('sender@remote.test', [addr(user)], msg4) == {}
    s.quit()
    settled(env)
    for i in (id1, id2):
        assert count(env.dst, user, i) == 1, i
    assert count(env.dst, user, id4) == 1 and count(env.src, user, id4) == 0
    assert count(env.dst, user, id3) == 1 and count(env.src, user, id3) == 0
    assert_moved(env, user, (id1, id2), (id3, id4))


def test_mail_during_held_copy(env, gw):
    """A message that reaches the source while a held login's copy runs,
    after the copy has read INBOX (the bulk is in a folder copied later):
    nobody used the source, but the flip still goes through a cutover, so
    the message is on the destination exactly once when the login is
    served there."""
    user = 'nora'
    m = env.src.imap(user)
    m.create('Zbulk')
    mc.append_many(m, 'Zbulk', [(mc.make_message(i, 2000), [], None)
                                for i in range(4000)])
    m.logout()
    assert gw.ctl('policy', user, 'hold').rc == 0
    result = {}

    def held_login():
        im = imaplib.IMAP4('127.0.0.1', gw.imap_port, timeout=120)
        result['login'] = im.login(user, USERS[user])
        result['exists'] = int(im.select('INBOX', readonly=True)[1][0])
        im.logout()

    t = threading.Thread(target=held_login)
    t.start()
    try:
        assert gw.wait_state(user, 'copying', timeout=20) == 'copying'
        msg, msgid = message('held')
        s = smtp(gw)
        assert s.sendmail('sender@remote.test', [addr(user)], msg) == {}
        s.quit()
        settled(env)
    finally:
        t.join(120)
    assert result.get('login', ('',))[0] == 'OK', result
    assert gw.state(user) == 'destination'
    assert where(env, user, msgid) == (1, 1)
    assert result['exists'] == 1, result
    assert_moved(env, user, (msgid,))


def test_real_cutover_defers(env):
    """A real cutover, with mail: a passthrough user's copy is verified
    while the user's IMAP session is open; the session ends, so the user
    goes through cutover (mail deferred, 2 s for the source's MTA, the
    last delta). The gateway here reaches the destination's IMAP through
    a proxy that the test stalls, so the last delta waits and the cutover
    lasts until the test lets it go on. Meanwhile: RCPT for the user gets
    451 4.2.0 and nothing is delivered; a transaction whose recipient the
    source's MTA took before the cutover ends its data during it, is
    delivered to the source and carried by the last delta. After the
    flip the sender's retry of the deferred message is delivered to the
    destination. Every message is then on the destination exactly once,
    none only on the source."""
    user = 'olga'
    m = env.src.imap(user)
    mc.append_many(m, 'INBOX', [(mc.make_message(5000 + i, 2000), [], None)
                                for i in range(50)])
    m.logout()
    proxy = tcpproxy.CuttingProxy(env.dst.imap_port).start()
    g = gwlib.Mailshiftd(
        os.path.join(env.root, 'gw-cutover'), env.src,
        tcpproxy.Behind(env.dst, proxy), policy='passthrough', smtp=True,
        smtp_backends={'source': {'smtp': env.src_mta.url('smtp')},
                       'destination': {'smtp': env.dst_mta.url('smtp')}})
    g.start()
    try:
        im = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=30)
        assert im.login(user, USERS[user])[0] == 'OK'
        s = smtp(g)
        msg1, id1 = message('rc1')          # while the copy runs
        assert s.sendmail('sender@remote.test', [addr(user)], msg1) == {}
        assert wait_for(lambda: (g.user(user) or {}).get('copy', '')
                        .startswith('verified'), 60, 0.05), g.user(user)
        msg2, id2 = message('rc2')          # verified: the last delta's
        assert s.sendmail('sender@remote.test', [addr(user)], msg2) == {}
        settled(env)
        # A transaction bound to the source's MTA before the cutover.
        t = smtp(g)
        assert t.ehlo('late.remote.test')[0] == 250
        assert t.mail('sender@remote.test')[0] == 250
        assert t.rcpt(addr(user))[0] == 250

        proxy.stall()
        conns = proxy.connections
        im.logout()
        assert g.wait_state(user, ('cutover', 'destination', 'failed'),
                            timeout=30) == 'cutover', g.user(user)
        msg3, id3 = message('rc3')

        def deferred(when):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as ex:
                s.sendmail('sender@remote.test', [addr(user)], msg3)
            code, text = ex.value.recipients[addr(user)]
            assert code == 451 and text.startswith(b'4.2.0'), \
                (when, code, text)

        deferred('as the cutover began')
        assert wait_for(lambda: proxy.connections > conns, 60, 0.05), \
            'the last delta never reached the destination'
        deferred('while the last delta waits for the destination')
        msg4, id4 = message('rc4')
        code, text = t.data(msg4)
        assert code == 250, (code, text)
        t.quit()
        settled(env)
        assert g.state(user) == 'cutover', g.user(user)
        assert (count(env.src, user, id4), count(env.src, user, id3)) == \
            (1, 0)

        proxy.resume()
        st = g.wait_state(user, ('destination', 'failed'), timeout=60)
        assert st == 'destination', g.user(user)
        # The sender retries the deferred message.
        assert s.sendmail('sender@remote.test', [addr(user)], msg3) == {}
        s.quit()
        assert_moved(env, user, (id1, id2, id4), (id3,))
    except BaseException:
        print('----- mailshiftd (last lines)\n%s' % g.log_tail(60))
        raise
    finally:
        g.stop()
        proxy.stop()
        e = Env()
        e.gw = g
        password_check(e)


def test_submission(env, gw):
    """(g) Submission on 587: no AUTH before STARTTLS; after it AUTH PLAIN
    with a wrong password gives the server's 535 and the client tries
    again; the message goes through the user's server. Also 465 (implicit
    TLS) with AUTH LOGIN for a user on the destination."""
    set_state(gw, 'ivan', 'source')
    ctx = env.ca.ssl_context()
    s = smtplib.SMTP('127.0.0.1', gw.submission_port, timeout=30,
                     source_address=('127.0.0.9', 0))
    s.ehlo('laptop')
    assert 'starttls' in s.esmtp_features
    assert 'auth' not in s.esmtp_features, 'AUTH offered before STARTTLS'
    code, _ = s.docmd('AUTH', 'PLAIN ' + plain('ivan', USERS['ivan']))
    assert code == 530
    code, _ = s.docmd('MAIL', 'FROM:<ivan@%s>' % DOMAIN)
    assert code == 530
    s.starttls(context=ctx)
    s.ehlo('laptop')
    assert 'PLAIN' in s.esmtp_features.get('auth', '').upper().split()
    code, text = s.docmd('AUTH', 'PLAIN ' + plain('ivan', WRONG_PW))
    assert code == 535, (code, text)
    assert s.docmd('AUTH', 'LOGIN')[0] == 334
    assert s.docmd('*')[0] == 501          # cancelled
    # PLAIN with the response after a 334 this time.
    s.user, s.password = 'ivan', USERS['ivan']
    code, text = s.auth('PLAIN', s.auth_plain, initial_response_ok=False)
    assert code == 235, (code, text)
    assert any(x['proto'] == 'submission' and x['user'] == 'ivan' and
               x['server'] == 'source' and x['state'] == 'relay' and
               x['tls'] for x in sessions(gw))
    msg, msgid = message('g')
    assert s.sendmail(addr('ivan'), [addr('judy')], msg) == {}
    s.quit()
    assert where(env, 'judy', msgid) == (1, 0)

    # 465, AUTH LOGIN, a user on the destination.
    set_state(gw, 'kate', 'destination')
    s = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port, timeout=30,
                         context=ctx)
    s.ehlo('laptop')
    s.user, s.password = 'kate', USERS['kate']
    code, text = s.auth('LOGIN', s.auth_login, initial_response_ok=False)
    assert code == 235, (code, text)
    msg, msgid = message('g2')
    assert s.sendmail(addr('kate'), [addr('judy')], msg) == {}
    s.quit()
    assert where(env, 'judy', msgid) == (0, 1)

    # A user in cutover: a temporary failure.
    set_state(gw, 'liam', 'cutover')
    s = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port, timeout=30,
                         context=ctx)
    s.ehlo('laptop')
    code, text = s.docmd('AUTH', 'PLAIN ' + plain('liam', USERS['liam']))
    assert code == 454 and text.startswith(b'4.7.0'), (code, text)
    s.quit()

    # mailshiftctl kick ends the user's submission sessions too.
    s = smtplib.SMTP_SSL('127.0.0.1', gw.submissions_port, timeout=30,
                         context=ctx)
    s.ehlo('laptop')
    s.user, s.password = 'kate', USERS['kate']
    assert s.auth('PLAIN', s.auth_plain)[0] == 235
    other = smtp(gw)                      # someone else's session stays
    other.ehlo('other.remote.test')
    r = gw.ctl('kick', 'kate', '--json')
    assert r.rc == 0 and r.json['kicked'] == 1, r.describe()
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        s.noop()
        s.noop()
    assert not any(x['user'] == 'kate' for x in sessions(gw))
    assert other.noop()[0] == 250
    other.quit()


def read_reply(sock, timeout=10):
    """One SMTP reply (all lines) or b'' when the server closed."""
    sock.settimeout(timeout)
    data = b''
    while True:
        try:
            c = sock.recv(1)
        except OSError:
            return data
        if not c:
            return data
        data += c
        if data.endswith(b'\n'):
            last = data.split(b'\n')[-2]
            if len(last) < 4 or last[3:4] != b'-':
                return data


def closed(sock, timeout=10):
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except OSError:
        return True
    return False


def test_hostile(env, gw):
    """(h) A 100 KB line, garbage, TLS garbage and a bare LF in the data on
    port 25: clear errors or a closed connection, never a crash; a
    concurrent session carries on and delivers."""
    set_state(gw, 'mona', 'source')
    good = smtp(gw)
    good.ehlo('good.remote.test')
    assert good.mail('sender@remote.test')[0] == 250
    assert good.rcpt(addr('mona'))[0] == 250
    listed = [x for x in sessions(gw) if x['proto'] == 'smtp']
    assert any(x['server'] == 'source' and x['state'] == 'transaction' and
               x['user'] is None and x['client'] == '127.0.0.1'
               for x in listed), listed

    # A 100 KB line.
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    assert read_reply(h).startswith(b'220')
    try:
        h.sendall(b'EHLO ' + b'x' * 100000 + b'\r\n')
    except OSError:
        pass
    assert read_reply(h).startswith(b'500'), 'no 500 for a 100 KB line'
    assert closed(h)
    h.close()

    # Garbage lines: errors, then the door.
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    assert read_reply(h).startswith(b'220')
    rnd = random.Random(25)
    junk = b''.join(bytes(rnd.randrange(1, 256) for _ in range(60)) + b'\r\n'
                    for _ in range(30))
    try:
        h.sendall(junk)
    except OSError:
        pass
    assert closed(h), 'garbage did not end the session'
    h.close()

    # TLS garbage: a ClientHello on the plaintext port, and after STARTTLS
    # bytes that are not TLS.
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(h, server_hostname='x').do_handshake()
    h.close()
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    read_reply(h)
    h.sendall(b'EHLO x\r\n')
    read_reply(h)
    h.sendall(b'STARTTLS\r\n')
    assert read_reply(h).startswith(b'220')
    h.sendall(bytes(rnd.randrange(256) for _ in range(5000)))
    assert closed(h)
    h.close()

    # A bare LF inside the message (SMTP smuggling): refused, closed.
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    read_reply(h)
    for cmd, want in ((b'EHLO x', b'250'),
                      (b'MAIL FROM:<sender@remote.test>', b'250'),
                      (b'RCPT TO:<%s>' % addr('mona').encode(), b'250'),
                      (b'DATA', b'354')):
        h.sendall(cmd + b'\r\n')
        r = read_reply(h)
        assert r.startswith(want), (cmd, r)
    h.sendall(b'Subject: smuggle\r\n\r\nhi\n.\nMAIL FROM:<x@y>\r\n.\r\n')
    r = read_reply(h)
    assert r.startswith(b'521'), r
    assert closed(h)
    h.close()

    # The concurrent session is fine.
    msg, msgid = message('h')
    code, _ = good.data(msg)
    assert code == 250
    good.quit()
    assert where(env, 'mona', msgid) == (1, 0)
    # Only that message: nothing of the smuggling attempt was delivered.
    m = env.src.imap('mona')
    assert m.select('INBOX', readonly=True)[1][0] == b'1'
    m.logout()
    assert gw.alive
    # The other listeners too.
    with socket.create_connection(('127.0.0.1', gw.imap_port),
                                  timeout=10) as c:
        assert c.recv(100).startswith(b'* OK')


def test_big_message_and_pipelining(env, gw):
    """A 3 MB message with dot-stuffed lines and 8-bit bytes arrives
    byte-exact (MAIL parameters passed on); commands pipelined in one
    write are answered in order."""
    set_state(gw, 'mona', 'source')
    lines = []
    for i in range(40000):
        lead = ('.', '..', '', 'x')[i % 4]
        lines.append('%sline %06d caf\xe9 %s' % (lead, i, 'y' * 60))
    body = ('\r\n'.join(lines) + '\r\n.\r\n').encode('latin-1')
    msg, msgid = message('big', body=body.decode('latin-1'))
    msg = msg.decode('latin-1').encode('latin-1')
    s = smtp(gw)
    s.ehlo('big.remote.test')
    assert s.sendmail('sender@remote.test', [addr('mona')], msg,
                      mail_options=['BODY=8BITMIME', 'SIZE=%d' % len(msg)]
                      ) == {}
    s.quit()
    assert where(env, 'mona', msgid) == (1, 0)
    assert fetch(env.src, 'mona', msgid).endswith(msg)

    msg, msgid = message('pipe')
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    assert read_reply(h).startswith(b'220')
    h.sendall(b'EHLO pipe.test\r\nMAIL FROM:<sender@remote.test>\r\n'
              b'RCPT TO:<nobody9@%s>\r\nRCPT TO:<%s>\r\nDATA\r\n'
              % (DOMAIN.encode(), addr('mona').encode()))
    for want in (b'250', b'250', b'550', b'250', b'354'):
        r = read_reply(h)
        assert r.startswith(want), (want, r)
    h.sendall(msg + b'.\r\nQUIT\r\n')
    assert read_reply(h).startswith(b'250')
    assert read_reply(h).startswith(b'221')
    assert closed(h)
    h.close()
    assert where(env, 'mona', msgid) == (1, 0)


def test_backend_down_and_shutdown(env, test_root):
    """MTAs that do not answer: RCPT gets 451 4.4.1, AUTH 454 (both
    temporary: the client retries; nothing is queued by the gateway). AUTH
    is offered in the clear when no [tls] is configured. At shutdown an open
    SMTP session gets 421 and the daemon exits cleanly."""
    dead = dc._free_ports(2)
    g = gwlib.Mailshiftd(
        os.path.join(env.root, 'gw-down'), env.src, env.dst, smtp=True,
        submission=True, smtp_backends={
            'source': {'smtp': 'smtp://127.0.0.1:%d' % dead[0],
                       'submission': 'smtp://127.0.0.1:%d' % dead[1]},
            'destination': {'smtp': 'smtp://127.0.0.1:%d' % dead[0]}})
    g.start()
    try:
        s = smtp(g)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as ex:
            s.sendmail('sender@remote.test', [addr('alice')], b'x\r\n')
        code, text = ex.value.recipients[addr('alice')]
        assert code == 451 and text.startswith(b'4.4.1'), (code, text)
        s.rset()
        # Still usable; the destination has no submission service at all.
        sub = smtplib.SMTP('127.0.0.1', g.submission_port, timeout=30)
        sub.ehlo('x')
        assert 'PLAIN' in sub.esmtp_features.get('auth', '').upper()
        code, text = sub.docmd('AUTH', 'PLAIN ' + plain('alice',
                                                        USERS['alice']))
        assert code == 454, (code, text)
        set_state(g, 'bob', 'destination')
        code, text = sub.docmd('AUTH', 'PLAIN ' + plain('bob', USERS['bob']))
        assert code == 454, (code, text)
        sub.close()
        assert s.mail('sender@remote.test')[0] == 250
        # SIGTERM with the session open.
        assert g.stop() == 0 and not g.killed
        assert read_reply(s.sock).startswith(b'421')
        s.close()
    finally:
        g.stop()
        log = g.log_text()
        for pw in USERS.values():
            assert pw not in log


def test_command_edge_cases(env, gw):
    """Protocol corners on port 25: order errors, HELO, RSET, a refused
    first recipient that does not bind the transaction, STARTTLS command
    injection, AUTH refused."""
    set_state(gw, 'gina', 'destination')
    h = socket.create_connection(('127.0.0.1', gw.smtp_port), timeout=10)
    assert read_reply(h).startswith(b'220')

    def cmd(line):
        h.sendall(line + b'\r\n')
        return read_reply(h)

    assert cmd(b'MAIL FROM:<a@remote.test>').startswith(b'503')
    assert cmd(b'HELO').startswith(b'501')
    assert cmd(b'HELO old.remote.test').startswith(b'250 ')
    assert cmd(b'AUTH PLAIN AGFAYg==').startswith(b'503')
    assert cmd(b'RCPT TO:<%s>' % addr('gina').encode()).startswith(b'503')
    assert cmd(b'DATA').startswith(b'503')
    assert cmd(b'MAIL FROM:a@remote.test').startswith(b'501')
    assert cmd(b'MAIL FROM:<a@remote.test>').startswith(b'250')
    assert cmd(b'MAIL FROM:<a@remote.test>').startswith(b'503')
    assert cmd(b'DATA').startswith(b'554')
    assert cmd(b'RCPT TO:<>').startswith(b'501')
    # Refused by the source: nothing is bound, gina (destination) is fine.
    assert cmd(b'RCPT TO:<nobody3@%s>' % DOMAIN.encode()).startswith(b'550')
    assert cmd(b'RCPT TO:<%s>' % addr('gina').encode()).startswith(b'250')
    assert cmd(b'RCPT TO:<%s>' % addr('alice').encode()).startswith(
        b'452 4.5.3')
    assert cmd(b'RSET').startswith(b'250')
    # After RSET the other side is fine again.
    assert cmd(b'MAIL FROM:<a@remote.test>').startswith(b'250')
    assert cmd(b'RCPT TO:<%s>' % addr('alice').encode()).startswith(b'250')
    assert cmd(b'VRFY alice').startswith(b'502')
    assert cmd(b'NOOP').startswith(b'250')
    # STARTTLS with a command behind it in the same packet: the command
    # is dropped (it was sent in the clear).
    h.sendall(b'STARTTLS\r\nRSET\r\n')
    assert read_reply(h).startswith(b'220')
    ctx = env.ca.ssl_context()
    t = ctx.wrap_socket(h, server_hostname='127.0.0.1')
    t.sendall(b'NOOP\r\n')
    assert read_reply(t).startswith(b'250 ')
    # The transaction was forgotten with TLS (RFC 3207 4.2).
    t.sendall(b'EHLO again.remote.test\r\n')
    r = read_reply(t)
    assert b'STARTTLS' not in r and r.startswith(b'250-'), r
    t.sendall(b'RCPT TO:<%s>\r\n' % addr('alice').encode())
    assert read_reply(t).startswith(b'503')
    t.sendall(b'QUIT\r\n')
    assert read_reply(t).startswith(b'221')
    t.close()
    settled(env)


class FakeMTA(fakeserver.LoopbackServer):
    """A scripted SMTP server on loopback (one thread per connection):
    behaviour(conn_no) names what connection number conn_no does."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.seen = []
        super().__init__()

    def handle(self, c, n):
        how = self.behaviour(n)
        f = c.makefile('rb')
        try:
            c.sendall(b'220 fake ESMTP\r\n')
            if how == 'close-at-greeting':
                return
            indata = False
            for line in f:
                self.seen.append(line)
                if indata:
                    if line == b'.\r\n':
                        indata = False
                        c.sendall(b'250 2.0.0 queued\r\n')
                    continue
                verb = line[:4].upper()
                if verb == b'EHLO':
                    if how == 'long-reply':
                        c.sendall(b'250-' + b'x' * 20000 + b'\r\n')
                        continue
                    c.sendall(b'250-fake\r\n250 8BITMIME\r\n')
                elif verb == b'DATA':
                    c.sendall(b'354 go ahead\r\n')
                    if how == 'close-in-data':
                        f.readline()
                        return
                    indata = True
                elif verb == b'QUIT':
                    c.sendall(b'221 bye\r\n')
                    return
                elif how == 'garbage-reply':
                    c.sendall(b'hello there\r\n')
                else:
                    c.sendall(b'250 2.0.0 ok\r\n')
        except OSError:
            pass
        finally:
            f.close()
            c.close()


def test_hostile_mta(env):
    """An MTA that closes at its greeting, answers with a 20 KB line or
    with garbage, or goes away in the middle of the data: the client gets
    a temporary failure (451) each time, never a crash, and the next
    transaction (a well-behaved connection) delivers."""
    # Connection 1 is the gateway asking what the MTA offers (at start).
    plan = {2: 'close-at-greeting', 3: 'long-reply', 4: 'garbage-reply',
            5: 'close-in-data'}
    mta = FakeMTA(lambda n: plan.get(n, 'good'))
    g = gwlib.Mailshiftd(
        os.path.join(env.root, 'gw-hostile-mta'), env.src, env.dst,
        smtp=True, smtp_backends={
            'source': {'smtp': 'smtp://127.0.0.1:%d' % mta.port}})
    g.start()
    try:
        caps = g.wait_capabilities('smtp')
        assert caps['smtp'] == {'source': '8BITMIME',
                                'advertised': '250-8BITMIME\r\n'}, caps
        assert mta.conns == 1
        s = smtp(g)
        s.ehlo('x')
        for n in (1, 2, 3):
            assert s.mail('a@remote.test')[0] == 250
            code, text = s.rcpt(addr('alice'))
            assert code == 451, (n, code, text)
            s.rset()
        assert s.mail('a@remote.test')[0] == 250
        assert s.rcpt(addr('alice'))[0] == 250
        body = b'Subject: x\r\n\r\n' + b'line\r\n' * 50000
        code, text = s.data(body)
        assert code == 451 and text.startswith(b'4.4.2'), (code, text)
        s.rset()
        msg, _ = message('hostile-mta')
        assert s.sendmail('a@remote.test', [addr('alice')], msg) == {}
        s.quit()
        assert mta.conns == 6
        assert g.alive
    finally:
        g.stop()
        mta.close()
    assert g.returncode == 0
