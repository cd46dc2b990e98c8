"""Inbound SMTP (port 25) as gateway-spec.md ("SMTP") promises it, where
test_smtp.py does not look: the greeting's words, unknown commands and the
tenth bad one, the 4096-byte command line, at most 100 recipients, an MTA
refusing MAIL, the MTA connection kept for the next transaction, session
ids from 1000001, the 421 4.3.2 at shutdown.

The MTAs are scripted (RecordingMTA: it records each connection's lines);
the IMAP side is test_gateway_ops.RefusingIMAP, never logged in to."""

import re
import socket

import pytest

import fakeserver
import gateway as gwlib
from conftest import _failed
from test_gateway_ops import RefusingIMAP
from test_smtp import read_reply


class RecordingMTA(fakeserver.LoopbackServer):
    """An SMTP server that takes everything, except MAIL FROM a sender
    starting "refused@" (550 5.7.1); self.lines[n] are connection n's."""

    greeting = b'220 recording ESMTP\r\n'
    mute_at_end = False     # True: the end of data is never answered

    def __init__(self):
        self.lines = {}
        super().__init__()

    def handle(self, c, n):
        seen = self.lines.setdefault(n, [])
        f = c.makefile('rb')
        c.sendall(self.greeting)
        data = False
        for line in f:
            seen.append(line)
            if data:
                if line == b'.\r\n':
                    data = False
                    if self.mute_at_end:
                        return      # kept open by LoopbackServer
                    c.sendall(b'250 2.0.0 queued\r\n')
                continue
            verb = line[:4].upper()
            if verb == b'EHLO':
                c.sendall(b'250-recording\r\n250 8BITMIME\r\n')
            elif verb == b'MAIL' and b'<refused@' in line:
                c.sendall(b'550 5.7.1 sender refused here\r\n')
            elif verb == b'DATA':
                c.sendall(b'354 go ahead\r\n')
                data = True
            elif verb == b'QUIT':
                c.sendall(b'221 bye\r\n')
                return
            else:
                c.sendall(b'250 2.0.0 ok\r\n')

    def verbs(self, n):
        return [l.split(b' ', 1)[0].rstrip(b'\r\n').upper()
                for l in self.lines.get(n, [])]

    def relays(self):
        """The connections that carried a transaction (not the gateway's
        capability probes): their verbs."""
        return [v for v in map(self.verbs, sorted(self.lines))
                if b'MAIL' in v]


@pytest.fixture
def fake_gw(workdir, request):
    imap = RefusingIMAP()
    mtas = {'source': RecordingMTA(), 'destination': RecordingMTA()}
    g = gwlib.Mailshiftd(
        workdir, imap, imap, policy='off', smtp=True,
        src_schemes=('imap', None), dst_schemes=('imap', None),
        smtp_backends={side: {'smtp': 'smtp://127.0.0.1:%d' % m.port}
                       for side, m in mtas.items()})
    g.mtas = mtas
    try:
        g.start()
        yield g
    finally:
        g.stop()
        if _failed(request):
            print(g.log_tail(30))
        for m in list(mtas.values()) + [imap]:
            m.close()


def dial(g):
    s = socket.create_connection(('127.0.0.1', g.smtp_port), timeout=30)
    return s, read_reply(s)


def cmd(s, line):
    s.sendall(line + b'\r\n')
    return read_reply(s)


def closed(s):
    s.settimeout(10)
    try:
        return s.recv(100) == b''
    except OSError:
        return True


def test_commands_and_lines(fake_gw):
    """`220 HOST ESMTP mailshift`; anything unknown `502 5.5.2`, the tenth
    bad command then `421` and the door; a command line of 4096 bytes is
    read, a longer one gets `500 5.5.2 Error: line too long` and the door."""
    g = fake_gw
    s, greeting = dial(g)
    assert re.fullmatch(rb'220 \S+ ESMTP mailshift\r\n', greeting), greeting
    for i in range(9):
        assert cmd(s, b'FROB %d' % i).startswith(b'502 5.5.2 '), i
    r = cmd(s, b'FROB 9')
    assert r.startswith(b'502 5.5.2 '), r
    rest = read_reply(s)
    assert rest.startswith(b'421 4.7.0 '), rest
    assert closed(s)
    s.close()

    s, _ = dial(g)
    line = b'NOOP ' + b'x' * (4096 - 2 - 5)          # 4096 with CRLF
    assert len(line) + 2 == 4096
    assert cmd(s, line).startswith(b'250'), 'a 4096-byte line refused'
    s.sendall(b'NOOP ' + b'x' * 4092 + b'\r\n')     # 4099
    assert read_reply(s) == b'500 5.5.2 Error: line too long\r\n'
    assert closed(s)
    s.close()


def test_transactions(fake_gw):
    """At most 100 recipients per transaction; an MTA's refusal of MAIL is
    given to the RCPT; the MTA connection is kept for the session's next
    transaction to that server; session ids start above 1000000; at
    shutdown an open session gets 421 4.3.2."""
    g = fake_gw
    src = g.mtas['source']
    s, _ = dial(g)
    assert cmd(s, b'EHLO client.test').startswith(b'250')
    assert cmd(s, b'MAIL FROM:<a@remote.test>').startswith(b'250')
    for i in range(100):
        r = cmd(s, b'RCPT TO:<user%d@example.test>' % i)
        assert r.startswith(b'250'), (i, r)
    r = cmd(s, b'RCPT TO:<user100@example.test>')
    assert r.startswith(b'452 4.5.3'), r
    assert cmd(s, b'DATA').startswith(b'354')
    assert cmd(s, b'Subject: one\r\n\r\nhi\r\n.').startswith(b'250')
    assert [v.count(b'RCPT') for v in src.relays()] == [100], src.lines

    # The next transaction: the same MTA connection.
    assert cmd(s, b'MAIL FROM:<b@remote.test>').startswith(b'250')
    assert cmd(s, b'RCPT TO:<user0@example.test>').startswith(b'250')
    assert cmd(s, b'DATA').startswith(b'354')
    assert cmd(s, b'Subject: two\r\n\r\nhi\r\n.').startswith(b'250')
    assert [v.count(b'MAIL') for v in src.relays()] == [2], src.lines

    # MAIL refused by the MTA: the gateway said 250, the RCPT gets the
    # MTA's answer.
    assert cmd(s, b'MAIL FROM:<refused@remote.test>').startswith(b'250')
    assert cmd(s, b'RCPT TO:<user0@example.test>') == \
        b'550 5.7.1 sender refused here\r\n'
    assert cmd(s, b'RSET').startswith(b'250')

    ids = [x['id'] for x in g.ctl('sessions', '--json').json['sessions']
           if x['proto'] == 'smtp']
    assert ids and min(ids) >= 1000001, ids
    assert g.stop() == 0
    assert read_reply(s).startswith(b'421 4.3.2 '), 'no 421 4.3.2 at shutdown'
    s.close()
