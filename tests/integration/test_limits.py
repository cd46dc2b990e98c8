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
import time

import pytest

import gateway as gwlib
from conftest import _failed, wait_for
from test_gateway import read_line
from test_gateway_ops import RefusingIMAP

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
