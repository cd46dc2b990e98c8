"""mailshiftd under a login attack (the hardening issue): 10,000 connections
from 200 loopback addresses (127.0.1.1 to 127.0.1.200) with made-up user
names and wrong passwords over IMAP, POP3 and submission, in waves, while
100 other clients pipeline commands and never read. Meanwhile and
afterwards the daemon stays alive and within a stated memory bound, the
store gains no row, and a real user (from 127.0.0.1, an address the attack
does not use: the gateway slows failed logins down per address) logs in.

Not a benchmark: nothing here is timed beyond the deadlines that bound the
run (about a minute and a half). The servers are test_hardening's
(mail_servers), with Dovecot's performance settings (a login process for
many clients); every socket the test opens is closed at the end.
"""

import base64
import random
import re
import resource
import selectors
import socket
import threading
import time

import pytest

from conftest import wait_for
from test_hardening import (HUSERS, SANITIZER_SLACK_KB, WRONG_PW,
                            alive_or_fail, flood_clients,
                            gateway_factory, mail_servers, nsessions,
                            plain_ir, real_login, store_names)

CONNECTIONS = 10000
WAVE = 500                      # connections open at once
WAVE_SECONDS = 3.0              # then the ones still waiting are dropped,
GREET_GRACE = 10.0              # but for those not yet greeted: up to this
                                # much longer to be, and send their login
ATTACKERS = ['127.0.1.%d' % i for i in range(1, 201)]
FLOODERS = ['127.0.3.%d' % i for i in range(1, 101)]
RSS_BOUND_MB = 256              # over the daemon's VmRSS before the attack
RSS_BOUND_KB = RSS_BOUND_MB * 1024 + SANITIZER_SLACK_KB

# (protocol, what is sent after the greeting, the end of the answer, a
# login accepted). IMAP: the tagged reply; POP3: one reply per command
# sent; submission: the reply to AUTH (after EHLO's 250 lines).
KINDS = {
    'imap-login': ('imap', b'a LOGIN %(u)s %(p)s\r\n', rb'(^|\n)a \w+ ',
                   rb'(^|\n)a OK'),
    'imap-plain': ('imap', b'a AUTHENTICATE PLAIN %(ir)s\r\n',
                   rb'(^|\n)a \w+ ', rb'(^|\n)a OK'),
    'pop3-user': ('pop3', b'USER %(u)s\r\nPASS %(p)s\r\n',
                  rb'\A[^\n]*\n[^\n]*\n', rb'\A[^\n]*\n\+OK'),
    'pop3-plain': ('pop3', b'AUTH PLAIN %(ir)s\r\n', rb'\A[^\n]*\n',
                   rb'\A\+OK'),
    'submission': ('submission', b'EHLO x\r\nAUTH PLAIN %(ir)s\r\n',
                   rb'(^|\n)(?!250)\d\d\d[ -]', rb'(^|\n)235 '),
}
# Ten in a row: 3 IMAP LOGIN, 3 AUTHENTICATE PLAIN, 2 POP3 USER/PASS, 1
# POP3 AUTH PLAIN, and every other ten a submission AUTH PLAIN.
MIX = ['imap-login'] * 3 + ['imap-plain'] * 3 + ['pop3-user'] * 2 + \
    ['pop3-plain', 'pop3-user']


@pytest.fixture(scope='module')
def lenv(test_root, ca):
    with mail_servers(test_root, ca, performance=True) as e:
        yield e


@pytest.fixture
def lgw(lenv, workdir, ca, request):
    make, stop = gateway_factory(lenv, workdir, ca, request)
    yield make
    stop()


class Attempt:
    """One attack connection: its socket, what to send once greeted, and
    what ends the answer. outcome: None while it runs."""

    def __init__(self, gw, n, rnd):
        kind = 'submission' if n % 20 == 19 else MIX[n % 10]
        proto, script, self.end, self.ok = KINDS[kind]
        self.kind = kind
        user = ('nobody-%x' % rnd.getrandbits(48)).encode()
        pw = (WRONG_PW + '%d' % n).encode()
        self.payload = script % {b'u': user, b'p': pw,
                                 b'ir': plain_ir(user, pw)}
        self.port = {'imap': gw.imap_port, 'pop3': gw.pop3_port,
                     'submission': gw.submission_port}[proto]
        self.src = ATTACKERS[n % len(ATTACKERS)]
        self.greeted = False
        self.buf = b''
        self.outcome = None
        self.sock = None

    def open(self, sel):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((self.src, 0))
            s.connect_ex(('127.0.0.1', self.port))
        except OSError:
            s.close()
            self.outcome = 'cannot connect'
            return
        self.sock = s
        sel.register(s, selectors.EVENT_READ, self)

    def readable(self, sel, late=False):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = None
        if not data:
            self.finish(sel, 'closed by the gateway')
            return
        self.buf += data
        if not self.greeted:
            if b'\n' not in self.buf:
                return
            self.greeted = True
            self.buf = self.buf.split(b'\n', 1)[1]
            try:
                self.sock.send(self.payload)    # small: fits at once
            except OSError:
                self.finish(sel, 'closed by the gateway')
                return
            if late:                # the login sent, its answer not waited
                self.finish(sel, 'no answer in time')
                return
        if re.search(self.end, self.buf):
            self.finish(sel, 'accepted' if re.search(self.ok, self.buf)
                        else 'refused')

    def finish(self, sel, outcome):
        self.outcome = outcome
        if self.sock is not None:
            sel.unregister(self.sock)
            self.sock.close()
            self.sock = None


def wave(attempts):
    """Opens all, serves them until each has its answer or WAVE_SECONDS
    have passed; then gives the ones not yet greeted (a machine busy with
    other tests, the sanitizers' build) up to GREET_GRACE more to be, and
    to send their login; closes every socket."""
    sel = selectors.DefaultSelector()
    for a in attempts:
        a.open(sel)
    deadline = time.monotonic() + WAVE_SECONDS
    try:
        while time.monotonic() < deadline and sel.get_map():
            for key, _ in sel.select(timeout=0.1):
                key.data.readable(sel)
        for a in attempts:
            if a.outcome is None and a.greeted:
                a.finish(sel, 'no answer in time')
        deadline += GREET_GRACE
        while time.monotonic() < deadline and sel.get_map():
            for key, _ in sel.select(timeout=0.1):
                key.data.readable(sel, late=True)
    finally:
        for a in attempts:
            if a.outcome is None:
                a.finish(sel, 'no answer in time' if a.greeted else
                         'no greeting in time')
        sel.close()


class RealUser(threading.Thread):
    """Logs a real user in through the gateway (from 127.0.0.1) again and
    again until stopped; results: [(ok or the error, seconds)]."""

    def __init__(self, gw):
        super().__init__(daemon=True)
        self.gw = gw
        self.stop = threading.Event()
        self.results = []

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                real_login(self.gw)
                self.results.append((True, time.monotonic() - t))
            except Exception as ex:     # noqa: BLE001 (reported by the test)
                self.results.append(('%s: %s' % (type(ex).__name__, ex),
                                     time.monotonic() - t))
            self.stop.wait(1.0)


class RssWatch(threading.Thread):
    """The daemon's peak VmRSS (its VmHWM, reset at start: every spike
    counts, not only the sampled ones), read every 0.2 s until stopped."""

    def __init__(self, gw):
        super().__init__(daemon=True)
        self.gw = gw
        self.stop = threading.Event()
        self.peak = 0

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.gw.rss_kb('VmHWM') or 0)
            self.stop.wait(0.2)
        self.peak = max(self.peak, self.gw.rss_kb('VmHWM') or 0)


def test_login_attack(lgw):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    gw = lgw(tls=False, submission=True, policy='passthrough')
    assert gw.ctl('user', 'add', 'alice').rc == 0
    real_login(gw)
    known = store_names(gw)
    base = gw.rss_kb()
    gw.rss_peak_reset()
    rnd = random.Random(20260101)
    attempts = [Attempt(gw, n, rnd) for n in range(CONNECTIONS)]

    stop_flood, flooders, flooded = flood_clients(
        gw.imap_port, FLOODERS[:50], b'a NOOP\r\nb CAPABILITY\r\n' * 40000)
    stop_flood2, flooders2, flooded2 = flood_clients(
        gw.pop3_port, FLOODERS[50:], b'NOOP\r\nCAPA\r\n' * 60000)
    user, rss = RealUser(gw), RssWatch(gw)
    user.start()
    rss.start()
    t0 = time.monotonic()
    try:
        for i in range(0, CONNECTIONS, WAVE):
            wave(attempts[i:i + WAVE])
            alive_or_fail(gw, 'wave %d of the attack' % (i // WAVE + 1))
            assert rss.peak - base < RSS_BOUND_KB, \
                'mailshiftd grew by %d MB during the attack (VmRSS %d MB, ' \
                'baseline %d MB)' % ((rss.peak - base) // 1024,
                                     rss.peak // 1024, base // 1024)
    finally:
        user.stop.set()
        rss.stop.set()
        stop_flood.set()
        stop_flood2.set()
        for t in [user, rss] + flooders + flooders2:
            t.join(70)
    took = time.monotonic() - t0

    outcomes = {}
    for a in attempts:
        outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
    print('attack: %.0f s, outcomes %s; VmRSS baseline %d kB, peak %d kB; '
          'real logins %s; flood clients %s'
          % (took, outcomes, base, rss.peak, user.results,
             sorted(set(h for _, h in flooded + flooded2))))
    alive_or_fail(gw, 'the attack')
    accepted = [a.kind for a in attempts if a.outcome == 'accepted']
    assert not accepted, 'logins with made-up names accepted: %d (%s)' % (
        len(accepted), sorted(set(accepted)))
    # The attack was taken: every connection greeted and its login sent.
    # (Its answer mostly waits out the servers' and the gateway's
    # per-address slowdown, past the waves' deadline: how many came back
    # in time measures the machine's speed, not the gateway.)
    greeted = sum(1 for a in attempts if a.greeted)
    assert greeted >= CONNECTIONS * 95 // 100, \
        'harness: only %d of %d connections were greeted (outcomes %s)' % (
            greeted, CONNECTIONS, outcomes)
    bad = [r for r in user.results if r[0] is not True]
    assert user.results and not bad, \
        'the real user\'s logins during the attack: %d failed of %d: %s' % (
            len(bad), len(user.results), bad[:3])
    assert rss.peak - base < RSS_BOUND_KB

    # Afterwards: every attack session is gone, nothing was stored.
    assert wait_for(lambda: nsessions(gw) == 0, 60, 0.5), \
        'sessions still listed a minute after the attack: %d' % nsessions(gw)
    new = store_names(gw) - known
    assert not new, 'the attack left %d users in the store (e.g. %s)' % (
        len(new), sorted(new)[:3])
    real_login(gw)
    alive_or_fail(gw, 'the attack')
