"""The timeouts of minutes, checked in seconds: the test build (make hooks,
daemon/testhook.h) divides them by MAILSHIFT_TEST_TIME_SCALE, so each test
here runs mailshiftd with a scale and checks that the timeout fires no
sooner than its scaled value, that it does fire, and with the documented
answer. The normal build never reads the variable
(test_crash.py::test_normal_builds_have_no_crash_points).

The servers behind the gateway are scripted (tests/lib/fakeserver.py): none
of these timeouts needs a mailbox.
"""

import os
import socket
import subprocess
import tempfile
import time

import pytest

import fakeserver
import dovecot as dc
import gateway as gwlib
import leakcheck
from conftest import wait_for
from test_gateway import read_line, read_until_close
from test_gateway_ops import admin_conf, metric
from test_limits import both_to, scripted_gw
from test_smtp import read_reply
from test_smtp_promises import RecordingMTA

SCALE = 60
PASSWORD = 'Ts-secret-Pw-4r8n'
leakcheck.CHECK.secret(PASSWORD, 'the password of test_timescale')
# libuv's timers count from the loop's cached clock, a little behind the
# real one: a timer may end that much before its time by our clock.
SLACK = 0.1


def scaled(seconds):
    return seconds / SCALE


def hooked_gw(workdir, name, request, scale=SCALE, **kw):
    """The test build, its clock scaled, in front of a scripted server."""
    return scripted_gw(os.path.join(workdir, name), request,
                       binary=gwlib.MAILSHIFTD_HOOKS,
                       env={'MAILSHIFT_TEST_TIME_SCALE': str(scale)}, **kw)


@pytest.fixture
def fake_gw(workdir, request):
    """A scaled mailshiftd in front of a refusing IMAP server, with an SMTP
    listener relaying to a recording MTA."""
    mta = RecordingMTA()
    try:
        with hooked_gw(workdir, 'tsgw', request, smtp=True,
                       smtp_backends=both_to(mta)) as g:
            yield g
    finally:
        mta.close()


def wait_closed(s, deadline):
    """What the gateway sends until it closes s, and when it closed."""
    data, closed = read_until_close(s, timeout=deadline)
    assert closed, data
    return data, time.monotonic()


def test_prelogin_idle_since_last_command(fake_gw):
    """A client that never logs in is closed 180 s after its last command
    (IMAP: * BYE; POP3: -ERR), and a command starts the count again."""
    t0 = time.monotonic()
    s = socket.create_connection(('127.0.0.1', fake_gw.imap_port),
                                 timeout=30)
    assert read_line(s).startswith(b'* OK')
    # Half the timeout in, a command: the count starts again from it.
    time.sleep(scaled(90))
    t1 = time.monotonic()
    s.sendall(b'a1 NOOP\r\n')
    assert read_line(s).startswith(b'a1 OK'), 'NOOP'
    data, t_end = wait_closed(s, scaled(180) + 30)
    s.close()
    assert b'* BYE Disconnected for inactivity.' in data, data
    assert t_end - t1 >= scaled(180) - SLACK, (t_end - t1, t_end - t0)

    t0 = time.monotonic()
    p = socket.create_connection(('127.0.0.1', fake_gw.pop3_port),
                                 timeout=30)
    assert read_line(p).startswith(b'+OK')
    data, t_end = wait_closed(p, scaled(180) + 30)
    p.close()
    assert data.startswith(b'-ERR Disconnected for inactivity.'), data
    assert t_end - t0 >= scaled(180) - SLACK, t_end - t0


def test_prelogin_at_most_ten_minutes(fake_gw):
    """Commands do not keep a client that never logs in: it is closed 10
    minutes after it connected, however busy."""
    t0 = time.monotonic()
    s = socket.create_connection(('127.0.0.1', fake_gw.imap_port),
                                 timeout=30)
    assert read_line(s).startswith(b'* OK')
    s.settimeout(0.2)
    data = b''
    n = 0
    deadline = t0 + scaled(600) + 60
    while time.monotonic() < deadline:
        # A command every third of the idle timeout: that one never fires.
        n += 1
        try:
            s.sendall(b'n%d NOOP\r\n' % n)
        except OSError:
            break
        until = time.monotonic() + scaled(60)
        got = None
        while time.monotonic() < until:
            try:
                got = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                got = b''
            if not got:
                break
            data += got
        if got == b'':
            break
    t_end = time.monotonic()
    s.close()
    assert b'* BYE Disconnected for inactivity.' in data, data[-200:]
    assert t_end - t0 >= scaled(600) - SLACK, t_end - t0
    assert t_end < deadline, 'never closed'


def test_smtp_idle(fake_gw):
    """An SMTP client silent for 5 minutes gets 421 4.4.2 and is closed."""
    s = socket.create_connection(('127.0.0.1', fake_gw.smtp_port),
                                 timeout=30)
    assert read_reply(s).startswith(b'220')
    t1 = time.monotonic()       # the timer starts after the EHLO came
    s.sendall(b'EHLO client.example\r\n')
    assert read_reply(s).startswith(b'250')
    reply = read_reply(s, timeout=scaled(300) + 30)
    t_end = time.monotonic()
    assert reply.startswith(b'421 4.4.2 '), reply
    assert t_end - t1 >= scaled(300) - SLACK, t_end - t1
    assert read_reply(s) == b''
    s.close()


def test_smtp_end_of_data_unanswered(workdir, request):
    """An MTA that never answers the end of a message is given up 10
    minutes after it (RFC 5321 4.5.3.2.6): 451 4.4.2 to the client, whose
    session goes on."""
    mta = RecordingMTA()
    mta.mute_at_end = True
    try:
        with hooked_gw(workdir, 'tsdata', request, smtp=True,
                       smtp_backends=both_to(mta)) as g:
            s = socket.create_connection(('127.0.0.1', g.smtp_port),
                                         timeout=30)
            assert read_reply(s).startswith(b'220')
            for line in (b'EHLO client.test', b'MAIL FROM:<a@remote.test>',
                         b'RCPT TO:<alice@example.test>'):
                s.sendall(line + b'\r\n')
                assert read_reply(s).startswith(b'250'), line
            s.sendall(b'DATA\r\n')
            assert read_reply(s).startswith(b'354')
            t0 = time.monotonic()
            s.sendall(b'Subject: t\r\n\r\nhi\r\n.\r\n')
            reply = read_reply(s, timeout=scaled(600) + 30)
            took = time.monotonic() - t0
            assert reply.startswith(b'451 4.4.2 '), reply
            assert took >= scaled(600) - SLACK, took
            s.sendall(b'NOOP\r\n')
            assert read_reply(s).startswith(b'250')
            s.close()
    finally:
        mta.close()


class SilentIMAP(fakeserver.LoopbackServer):
    """Takes connections and never says a word."""

    pop3_port = None
    tls_ca = None

    def url(self, scheme='imap'):
        return 'imap://127.0.0.1:%d' % self.port

    def handle(self, c, n):
        pass        # kept open by LoopbackServer until close()


def test_silent_server_given_up(workdir, request):
    """A server that never greets is given up 30 s after the connect: the
    client's login gets NO [UNAVAILABLE] and the session stays usable."""
    silent = SilentIMAP()
    try:
        with hooked_gw(workdir, 'tssilent', request, imap=silent) as g:
            s = socket.create_connection(('127.0.0.1', g.imap_port),
                                         timeout=30)
            assert read_line(s).startswith(b'* OK')
            s.settimeout(scaled(30) + 30)
            t0 = time.monotonic()
            s.sendall(b'a1 LOGIN alice %s\r\n' % PASSWORD.encode())
            reply = read_line(s)
            t_end = time.monotonic()
            assert reply.startswith(b'a1 NO [UNAVAILABLE]'), reply
            assert t_end - t0 >= scaled(30) - SLACK, t_end - t0
            assert 'no answer from the server' in g.log_text(), \
                g.log_tail()
            s.sendall(b'a2 NOOP\r\n')
            assert read_line(s).startswith(b'a2 OK')
            s.close()
    finally:
        silent.close()


def test_sweep_default_interval(workdir, request):
    """[sweep] without an interval passes every 10 s: four passes take
    more than three intervals (scale 10: a second each), and not much more
    than four."""
    port = dc.free_port()
    interval = 10 / 10
    with hooked_gw(workdir, 'tssweep', request, scale=10,
                   extra_conf=admin_conf(workdir, sweep=False,
                                         metrics_port=port) +
                   '\n[sweep]\nenabled = yes\n') as g:
        assert wait_for(lambda: metric(port, 'mailshift_sweeps_total') >= 1,
                        60, 0.05), g.log_tail()
        first = metric(port, 'mailshift_sweeps_total')
        t0 = time.monotonic()
        assert wait_for(lambda: metric(port, 'mailshift_sweeps_total') >=
                        first + 4, 60, 0.05), g.log_tail()
        took = time.monotonic() - t0
        assert 3 * interval - SLACK <= took < 4 * interval + 10, took


class MuteAfterLogin(fakeserver.LoopbackServer):
    """An IMAP server that greets, answers CAPABILITY and takes the login,
    then never says another word."""

    def handle(self, c, n):
        c.sendall(b'* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] x\r\n')
        for line in c.makefile('rb'):
            tag, _, rest = line.partition(b' ')
            verb = rest.split(b' ', 1)[0].strip().upper()
            if verb == b'CAPABILITY':
                c.sendall(b'* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n'
                          + tag + b' OK done\r\n')
            elif verb in (b'LOGIN', b'AUTHENTICATE'):
                c.sendall(tag + b' OK logged in\r\n')
            else:
                return      # silent from here on; kept open until close()


def test_silent_server_given_up_by_the_mover(ctl_hooks, workdir):
    """A server that stops answering is given up after 300 s: the mover
    fails with the reason, it does not wait for ever."""
    mute = MuteAfterLogin()
    url = 'imap://127.0.0.1:%d' % mute.port
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('MAILSHIFT_')}
    env.update(MAILSHIFT_SOURCE_PASSWORD=PASSWORD,
               MAILSHIFT_DEST_PASSWORD=PASSWORD,
               MAILSHIFT_TEST_TIME_SCALE=str(SCALE))
    store = os.path.join(tempfile.mkdtemp(dir=workdir), 'mover.db')
    leakcheck.CHECK.register_files('the mover store', [store])
    argv = [ctl_hooks, 'migrate', '--source', url, '--dest', url,
            '--store', store, '--no-progress', 'alice']
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=scaled(300) + 120)
    finally:
        mute.close()
    took = time.monotonic() - t0
    err = r.stderr.decode(errors='replace')
    assert r.returncode not in (0, None), err
    assert 'no reply from the server for 300 seconds' in err, err
    assert took >= scaled(300) - SLACK, took
