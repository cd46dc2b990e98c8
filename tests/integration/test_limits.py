"""The control socket's limits (docs/mailshift.conf.5, [control]): a client
that leaves more than 1 MiB of replies unread is not read from until it
catches up; at most 64 clients at once.

mailshiftd runs in front of a scripted IMAP server (no mailbox is needed);
the tests speak the control protocol (one JSON request a line) on the raw
UNIX socket.
"""

import contextlib
import json
import os
import socket
import threading
import time

import pytest

import gateway as gwlib
from conftest import _failed, wait_for
from test_gateway import imap_reply, read_line, read_until_close
from test_smtp import read_reply
from test_gateway_ops import RefusingIMAP
from test_smtp_promises import RecordingMTA

STATUS = b'{"cmd":"status"}\n'
# A request answered without the store: an error line four times its size.
BAD = b'{"cmd":5}\n'
BAD_REPLY = {'ok': False, 'error': '"cmd" must be a string'}


@contextlib.contextmanager
def scripted_gw(path, request, imap=None, **kw):
    """mailshiftd (kw: gwlib.Mailshiftd's) in front of a scripted IMAP
    server, RefusingIMAP unless imap is given; stopped at the end."""
    own = imap is None
    imap = imap or RefusingIMAP()
    g = gwlib.Mailshiftd(path, imap, imap, policy='off',
                         src_schemes=('imap', None),
                         dst_schemes=('imap', None), **kw)
    try:
        g.start()
        yield g
    finally:
        g.stop()
        if _failed(request):
            print(g.log_tail(30))
        if own:
            imap.close()


def both_to(mta):
    """smtp_backends: both sides' MTA is mta (a scripted one)."""
    return {side: {'smtp': 'smtp://127.0.0.1:%d' % mta.port}
            for side in ('source', 'destination')}


@pytest.fixture
def lgw(workdir, request):
    with scripted_gw(os.path.join(workdir, 'limgw'), request) as g:
        yield g


def control(g):
    """A connection to the control socket (retried while its listen
    backlog is full: EAGAIN on a UNIX socket)."""
    deadline = time.monotonic() + 30
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        try:
            s.connect(g.socket_path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def status_ok(g):
    with control(g) as s:
        s.sendall(STATUS)
        return json.loads(read_line(s))['ok'] is True


def test_control_clients_at_most_64(lgw):
    """64 control clients at once are served; the 65th gets one error line
    and is closed; once one leaves, a new one is served."""
    held = []
    try:
        # Each answered, so each accepted, before the next; the 64th is
        # at the bound.
        for _ in range(64):
            held.append(control(lgw))
            held[-1].sendall(STATUS)
            assert json.loads(read_line(held[-1]))['ok'] is True, len(held)
        # One over: refused, closed.
        s65 = control(lgw)
        rep = b''
        while True:
            try:
                d = s65.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            rep += d
        s65.close()
        assert json.loads(rep) == {'ok': False, 'error':
                                   'too many control connections'}, rep
        # The others are still served.
        held[0].sendall(STATUS)
        assert json.loads(read_line(held[0]))['ok'] is True
        # One leaves: room for one more (the daemon sees the close when
        # it next runs its loop).
        held.pop().close()
        assert wait_for(lambda: status_ok(lgw), 30, 0.1), lgw.log_tail()
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: status_ok(lgw), 30, 0.1), lgw.log_tail()


def test_control_unread_replies_stop_reading(lgw):
    """A client that sends requests and never reads its replies stops
    being read: its writes stall (the daemon would otherwise queue a reply
    for every request, without end), other clients are served meanwhile;
    when it reads, every request is answered and its remaining requests go
    through."""
    s = control(lgw)
    s.setblocking(False)
    total = 4 * 1024 * 1024 // len(BAD)     # 4 MiB: 17 MiB of replies
    data = BAD * total
    sent = 0
    last_progress = time.monotonic()
    deadline = time.monotonic() + 120
    while sent < len(data) and time.monotonic() < deadline:
        try:
            n = s.send(data[sent:sent + 65536])
        except BlockingIOError:
            if time.monotonic() - last_progress > 3:
                break           # no progress for 3 s: not read any more
            time.sleep(0.01)
            continue
        sent += n
        last_progress = time.monotonic()
    assert sent < len(data), \
        'the daemon read 4 MiB of requests with every reply unread'
    assert status_ok(lgw), 'another control client not served'

    # Catch up: read everything while sending the rest.
    got = b''
    deadline = time.monotonic() + 300
    while (sent < len(data) or got.count(b'\n') < total) and \
            time.monotonic() < deadline:
        progressed = False
        try:
            d = s.recv(1 << 20)
            if not d:
                break
            got += d
            progressed = True
        except BlockingIOError:
            pass
        if sent < len(data):
            try:
                sent += s.send(data[sent:sent + 65536])
                progressed = True
            except BlockingIOError:
                pass
        if not progressed:
            time.sleep(0.005)
    s.close()
    lines = got.splitlines()
    assert sent == len(data) and len(lines) == total, \
        (sent, len(data), len(lines), total)
    assert all(json.loads(line) == BAD_REPLY for line in lines[::997])


def test_control_pipelined_reads_in_order(lgw):
    """Requests pipelined on one connection are answered in order, those
    whose reads go to the store's reader (status, user list and show,
    sessions) included: each waits for its reads, the next one behind it.
    Clients that leave with a read still out (sent, then closed at once)
    leave nothing behind: another client is served."""
    reqs = [STATUS, b'{"cmd":"user.list"}\n', BAD,
            b'{"cmd":"user.show","user":"nobody"}\n',
            b'{"cmd":"sessions"}\n', STATUS]
    with control(lgw) as s:
        s.sendall(b''.join(reqs))
        got = b''
        while got.count(b'\n') < len(reqs):
            d = s.recv(65536)
            assert d, got
            got += d
    lines = [json.loads(line) for line in got.splitlines()]
    assert len(lines) == len(reqs), lines
    assert 'states' in lines[0] and 'states' in lines[5], lines
    assert lines[1]['ok'] is True and 'users' in lines[1], lines
    assert lines[2] == BAD_REPLY, lines
    assert lines[3] == {'ok': False,
                        'error': 'no such user "nobody"'}, lines
    assert lines[4]['ok'] is True and 'sessions' in lines[4], lines
    for _ in range(50):
        with control(lgw) as s:
            s.sendall(STATUS + b'{"cmd":"user.list"}\n')
    assert status_ok(lgw)


def pipelined_adds(s, names):
    """user.add of each name pipelined on control connection s: the
    replies, in order (read while they are sent)."""
    reqs = b''.join(b'{"cmd":"user.add","user":"%s"}\n' % n.encode()
                    for n in names)
    sender = threading.Thread(target=s.sendall, args=(reqs,), daemon=True)
    sender.start()
    got = b''
    while got.count(b'\n') < len(names):
        d = s.recv(1 << 20)
        assert d, got[-200:]
        got += d
    sender.join(30)
    replies = [json.loads(line) for line in got.splitlines()]
    assert [r['user']['user'] for r in replies] == list(names), replies[:3]
    return replies


def test_control_pipelined_writes_stall_nothing(lgw):
    """user.add pipelined on one connection, each a write, as many as the
    store makes in some 2 s (timed on 200 first): a turn of the loop spends
    about 10 ms on them and leaves the rest for the next, so a client's
    NOOPs (before login: the gateway's own answer), one each 0.05 s all
    through, each take well under a second; every request is answered, in
    order. (Before, one turn took all a read brought, and a read brings
    up to 64 KiB of requests, 32 reads a turn.)"""
    with control(lgw) as s:
        t0 = time.monotonic()
        pipelined_adds(s, ['w%03d' % i for i in range(200)])
        each = (time.monotonic() - t0) / 200
        n = min(50000, max(1000, int(2.0 / each)))
        names = ['p%05d' % i for i in range(n)]
        replies, noops, worst = gwlib.noops_while(
            lgw.imap_port, lambda: pipelined_adds(s, names))
    assert len(replies) == n
    print('%d pipelined user.add (%.2f ms each): %d NOOPs, the worst %.3f s'
          % (n, each * 1000, noops, worst))
    assert worst < 0.5, worst
    assert noops >= 5, ('too quick to measure', noops)


# ------------------------------------------- the buffer bounds of security.md

def exchange(port, payload, timeout=10):
    """Connects, reads the greeting, sends payload: what comes back until
    the gateway closes or falls silent, and whether it closed."""
    s = socket.create_connection(('127.0.0.1', port), timeout=30)
    try:
        greeting = s.recv(65536)
        assert greeting, 'no greeting'
        s.sendall(payload)
        return read_until_close(s, timeout=timeout)
    finally:
        s.close()


def test_prelogin_line_bounds(lgw):
    """A pre-login command line of 8 KiB (its CRLF included) is taken; one
    byte more gets the too-long answer and the connection is closed. IMAP
    and POP3."""
    for port, cmd, too_long in (
            (lgw.imap_port, b'a1 NOOP ', b'* BYE Input line too long.'),
            (lgw.pop3_port, b'NOOP ', b'-ERR Input line too long.')):
        for extra, over in ((0, False), (1, True)):
            line = cmd + b'x' * (8192 - len(cmd) - 2 + extra) + b'\r\n'
            assert len(line) == 8192 + extra
            data, closed = exchange(port, line, timeout=3 if not over
                                    else 10)
            if over:
                assert closed and data.startswith(too_long), (port, data)
            else:
                assert data and too_long not in data and not closed, \
                    (port, data)


def rfc2971_id(tag=b'a1'):
    """The longest ID command RFC 2971 allows: 30 field-value pairs, fields
    of 30 octets, values of 1024."""
    pairs = b' '.join(b'"%s" "%s"' % ((b'f%02d' % i).ljust(30, b'x'),
                                       b'v' * 1024) for i in range(30))
    return tag + b' ID (' + pairs + b')\r\n'


def id_answered(port, chunks):
    """Sends chunks (waiting for a continuation after each but the last)
    before login: the ID answer's lines, the connection still open."""
    s = socket.create_connection(('127.0.0.1', port), timeout=30)
    try:
        assert read_line(s).startswith(b'* OK')
        for c in chunks[:-1]:
            s.sendall(c)
            assert read_line(s).startswith(b'+'), c[:40]
        s.sendall(chunks[-1])
        lines = imap_reply(s, b'a1')
        s.sendall(b'a2 NOOP\r\n')
        assert imap_reply(s, b'a2')[-1].startswith(b'a2 OK')
        return lines
    finally:
        s.close()


def test_prelogin_id_bound(lgw):
    """An IMAP ID as long as RFC 2971 allows (31,809 bytes with the tag
    "a1"; Dovecot answers it) is answered before login, as is one with a
    literal; an ID line of 32 KiB with its CRLF is taken, one byte more gets
    the too-long answer and the connection is closed. Every other command
    keeps the 8 KiB bound (test_prelogin_line_bounds)."""
    line = rfc2971_id()
    assert len(line) == 31809
    for chunks in ([line], [b'a1 ID ("name" {5}\r\n', b'mutt)\r\n'],
                   [b'a1 id ("name" {4+}\r\nmutt)\r\n']):
        lines = id_answered(lgw.imap_port, chunks)
        assert lines[0].startswith(b'* ID ('), lines
        assert lines[-1].startswith(b'a1 OK'), lines
    for extra, over in ((0, False), (1, True)):
        head = b'a1 ID (' + b' '.join(b'"f" "%s"' % (b'v' * 1000)
                                      for i in range(30)) + b' "pad" "'
        line = head + b'x' * (32768 - len(head) - 4 + extra) + b'")\r\n'
        assert len(line) == 32768 + extra
        if not over:
            assert id_answered(lgw.imap_port, [line])[-1].startswith(
                b'a1 OK')
            continue
        data, closed = exchange(lgw.imap_port, line)
        assert closed and data.startswith(b'* BYE Input line too long.'), \
            data


def test_login_literal_bound(lgw):
    """A login literal of 4 KiB is taken (the continuation, then the
    server's answer); 4 KiB + 1 is not."""
    for size, taken in ((4096, True), (4097, False)):
        s = socket.create_connection(('127.0.0.1', lgw.imap_port),
                                     timeout=30)
        try:
            assert read_line(s).startswith(b'* OK')
            s.sendall(b'a1 LOGIN {%d}\r\n' % size)
            reply = read_line(s)
            if not taken:
                assert not reply.startswith(b'+'), reply
                assert reply.startswith(b'a1 BAD') or \
                    reply.startswith(b'* BYE'), reply
                continue
            assert reply.startswith(b'+'), reply
            s.sendall(b'u' * size + b' pw\r\n')
            reply = read_line(s)
            assert reply.startswith(b'a1 NO'), reply
        finally:
            s.close()


def test_smtp_line_bound(workdir, request):
    """An SMTP command line of 4 KiB before its LF (the CR counted) is
    taken; one byte more gets 500 5.5.2 and the connection is closed."""
    mta = RecordingMTA()
    try:
        with scripted_gw(os.path.join(workdir, 'limsmtp'), request,
                         smtp=True, smtp_backends=both_to(mta)) as g:
            for extra, over in ((0, False), (1, True)):
                line = b'NOOP ' + b'x' * (4096 - 6 + extra) + b'\r\n'
                assert len(line) == 4097 + extra
                data, closed = exchange(g.smtp_port, line,
                                        timeout=3 if not over else 10)
                if over:
                    assert closed and data.startswith(
                        b'500 5.5.2 Error: line too long'), data
                else:
                    assert data and b'line too long' not in data and \
                        not closed, data
    finally:
        mta.close()


def test_server_line_bound(workdir, request):
    """A server's line of 8 KiB (its CRLF included) is read: the login goes
    on to the server's answer; one byte more and the server is given up:
    NO [UNAVAILABLE], the log says why."""
    for size, taken in ((8192, True), (8193, False)):
        imap = RefusingIMAP()
        head = b'* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] '
        imap.greeting = head + b'x' * (size - len(head) - 2) + b'\r\n'
        assert len(imap.greeting) == size
        try:
            with scripted_gw(os.path.join(workdir, 'limsrv%d' % size),
                             request, imap=imap) as g:
                s = socket.create_connection(('127.0.0.1', g.imap_port),
                                             timeout=30)
                assert read_line(s).startswith(b'* OK')
                s.sendall(b'a1 LOGIN alice not-her-password\r\n')
                reply = read_line(s)
                s.close()
                if taken:
                    assert reply.startswith(b'a1 NO [AUTHENTICATIONFAILED]'), \
                        reply
                    assert 'server line too long' not in g.log_text()
                else:
                    assert reply.startswith(b'a1 NO [UNAVAILABLE]'), reply
                    assert 'server line too long' in g.log_text(), \
                        g.log_tail()
        finally:
            imap.close()


def test_smtp_reply_bound(workdir, request):
    """An MTA's reply of 16 KiB (all its lines, CRLFs included) is read;
    one byte more and the MTA is given up, the log says why."""
    for size, taken in ((16384, True), (16385, False)):
        mta = RecordingMTA()
        # A greeting of many lines: "220-" lines, then "220 " and the rest.
        body = b'220-' + b'y' * 996 + b'\r\n'
        lines = body * (size // len(body) - 1)
        last = size - len(lines)
        mta.greeting = lines + b'220 ' + b'z' * (last - 6) + b'\r\n'
        assert len(mta.greeting) == size
        try:
            with scripted_gw(os.path.join(workdir, 'limmta%d' % size),
                             request, smtp=True,
                             smtp_backends=both_to(mta)) as g:
                s = socket.create_connection(('127.0.0.1', g.smtp_port),
                                             timeout=30)
                assert read_reply(s).startswith(b'220')
                for line in (b'EHLO client.test',
                             b'MAIL FROM:<a@remote.test>'):
                    s.sendall(line + b'\r\n')
                    assert read_reply(s).startswith(b'250'), line
                s.sendall(b'RCPT TO:<alice@example.test>\r\n')
                reply = read_reply(s)
                s.close()
                log = g.log_text()
                if taken:
                    assert reply.startswith(b'250'), (reply, g.log_tail())
                    assert 'too long' not in log, g.log_tail()
                else:
                    assert reply[:1] == b'4', reply
                    assert 'reply from the mail server too long' in log, \
                        g.log_tail()
        finally:
            mta.close()
