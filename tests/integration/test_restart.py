"""Restarts refuse nothing: mailshiftd restarted (or killed -9) in router
mode while a client keeps connecting through the steering, in
test_steer.py's namespaces (client, gateway, source, destination; real
Dovecots; its env fixture, made and removed by this module).

With socket activation the test holds the transparent listening sockets
as systemd's socket unit does (tests/lib/sdactivate.py) and each mailshiftd
inherits them: while none runs, the kernel queues new connections on them,
and the next daemon greets them. Without it (test_steer.py's
test_kill9_leaves_diverted_ports_closed) the table refuses them.
"""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

import dovecot as dc
import gateway as gwlib
import netns
import sdactivate
from conftest import wait_for
from test_steer import (CLI_ADDR, IMAP_LISTEN, POP3_LISTEN, SERVICE_ADDR,
                        Remote, close, env, login_tags, refused,
                        segments_sent_again, side_of, steered)

__all__ = ['env', 'steered']        # fixtures used here, made by test_steer


greeting = gwlib.first_line


def greeted(line):
    return line.startswith(b'* OK') or line.startswith(b'+OK')


class Attempts:
    """A client connecting to SERVICE_ADDR:port again and again (one at a
    time, from CLI_ADDR, in the client's namespace), waiting for each
    greeting: .ok counts the greeted ones, .failures lists the others."""

    def __init__(self, env, port=143):
        self.env = env
        self.port = port
        self.ok = 0
        self.failures = []
        self.latencies = []
        self.sent_again = []        # (phase, seconds to greeting, segments)
        self.phase = 'start'        # named in failures
        self.done = threading.Event()
        self.thread = threading.Thread(target=env.cli.call, args=(self.run,),
                                       daemon=True)

    def run(self):
        while not self.done.is_set():
            t0 = time.monotonic()
            try:
                with socket.create_connection(
                        (SERVICE_ADDR, self.port), timeout=60,
                        source_address=(CLI_ADDR, 0)) as s:
                    line = greeting(s)
                    again = segments_sent_again(s)
            except OSError as e:
                self.failures.append((self.phase, repr(e)))
                continue
            if again:
                self.sent_again.append((self.phase, time.monotonic() - t0,
                                        again))
            if greeted(line):
                self.ok += 1
                self.latencies.append(time.monotonic() - t0)
            else:
                self.failures.append((self.phase, line))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(90)

    def more(self, n, timeout=60):
        """Waits until n more attempts were greeted."""
        want = self.ok + n
        assert wait_for(lambda: self.ok >= want, timeout, 0.02), \
            (self.ok, want, self.failures)


def connect_now(env, port):
    """A connection made from the client now (while no daemon runs): it
    completes in the kernel, on the inherited socket's queue."""
    return env.cli.call(socket.create_connection, (SERVICE_ADDR, port),
                        timeout=60, source_address=(CLI_ADDR, 0))


def held_sockets(env, transparent=True, extra=()):
    return sdactivate.Sockets(
        [('0.0.0.0', IMAP_LISTEN, 'imap'), ('0.0.0.0', POP3_LISTEN, 'pop3')]
        + list(extra), transparent=transparent, netns=env.gw_ns.name)


def test_restart_with_inherited_sockets_refuses_nothing(steered):
    env = steered
    gw = env.gw
    gw.stop()
    socks = held_sockets(env)
    gw.activation = socks
    try:
        gw.start()
        assert 'listener(s), inherited)' in gw.log_text()
        src_before = env.from_clients(env.src_ns)
        _, rejected0 = env.stats()
        with Attempts(env) as loop:
            loop.more(5)
            for stop in ('SIGTERM', 'SIGKILL'):
                loop.phase = stop
                if stop == 'SIGTERM':
                    assert gw.stop() == 0 and not gw.killed
                else:
                    os.kill(gw.pid, signal.SIGKILL)
                    gw.proc.wait()
                    gw.proc = None
                # No daemon now: these are queued on the held sockets.
                waiting = [connect_now(env, p) for p in (143, 143, 110)]
                gw.start()
                for s in waiting:
                    with s:
                        line = greeting(s)
                        assert greeted(line), (stop, line)
                loop.more(5)
        # A restart refuses nothing. kill -9 may take with it the one
        # attempt the dead daemon had accepted and not yet greeted (the
        # loop makes one at a time): ended, never refused.
        lost = [f for f in loop.failures if f[0] == 'SIGKILL' and
                (f[1] == b'' or 'ConnectionResetError' in str(f[1]))]
        assert len(lost) <= 1 and len(loop.failures) == len(lost), \
            loop.failures
        # Nothing was refused by the table, nothing reached the source.
        _, rejected = env.stats()
        assert rejected == rejected0
        assert env.from_clients(env.src_ns) == src_before
        m, tags = login_tags(env, 'alice')
        try:
            assert side_of(env, tags, 'alice') == 'source'
        finally:
            close(m)
    finally:
        gw.stop()
        gw.activation = None
        socks.close()
        gw.start()


class SystemdActivate:
    """systemd's own implementation of the protocol in place of the test's
    launcher: systemd-socket-activate binds, waits for a first connection,
    then sets the variables and execs (for gateway.Mailshiftd's
    activation=)."""

    def __init__(self, *addrs):
        self.argv = ['systemd-socket-activate']
        self.argv += ['--listen=' + a for a in addrs]
        self.argv += ['--fdname=imap:pop3']
        # it passes on only the variables it is told to (the store's
        # password file, on PostgreSQL: tests/lib/storemode.py)
        if 'PGPASSFILE' in os.environ:
            self.argv += ['-E', 'PGPASSFILE']

    def launcher(self):
        return self.argv

    def fds(self):
        return ()


def test_systemd_socket_activate_starts_it(workdir, ctl):
    """mailshiftd takes its listeners from systemd's socket activation
    (no namespace needed: loopback, servers nobody asks)."""
    imap, pop3 = dc._free_ports(2)
    nowhere = Remote(None, '127.0.0.1')
    gw = gwlib.Mailshiftd(
        os.path.join(workdir, 'gw'), nowhere, nowhere, policy='off',
        ctl_binary=ctl, imap_port=imap, pop3_port=pop3,
        activation=SystemdActivate('127.0.0.1:%d' % imap,
                                   '127.0.0.1:%d' % pop3))
    first = {}

    def connect_first():
        # the connection that makes systemd-socket-activate start it
        deadline = time.monotonic() + 30
        while 'line' not in first and time.monotonic() < deadline:
            try:
                with socket.create_connection(('127.0.0.1', pop3), 60) as s:
                    first['line'] = greeting(s)
            except OSError:
                time.sleep(0.05)

    t = threading.Thread(target=connect_first, daemon=True)
    t.start()
    try:
        gw.start()
        t.join(60)
        assert first.get('line', b'').startswith(b'+OK'), first
        assert 'mailshiftd ready (2 listener(s), inherited)' in \
            gw.log_text(), gw.log_tail()
        assert gw.stop() == 0
    finally:
        gw.stop()


@pytest.mark.parametrize('case', ['missing', 'extra', 'not transparent',
                                  'dual-stack'])
def test_inherited_sockets_must_match_the_config(env, case):
    """A socket unit and a [listen] section that disagree stop mailshiftd at
    start with the reason, whichever way they disagree."""
    gw = env.gw
    gw.stop()
    conf = gw.extra_conf
    if case == 'missing':
        socks = sdactivate.Sockets([('0.0.0.0', IMAP_LISTEN, 'imap')],
                                   transparent=True, netns=env.gw_ns.name)
        want = ('listener 0.0.0.0:%d: no inherited socket is bound to it'
                % POP3_LISTEN)
    elif case == 'extra':
        socks = held_sockets(env, extra=[('127.0.0.1', 10999, 'other')])
        want = ('inherited socket "other" (fd 5) on 127.0.0.1:10999 '
                'matches no [listen] address')
    elif case == 'not transparent':
        socks = held_sockets(env, transparent=False)
        want = 'is not transparent but [listen] transparent is yes'
    else:
        # an IPv6 listener whose inherited socket takes IPv4 too
        gw.extra_conf = conf.replace('[listen]\n',
                                     '[listen]\nimap = [::]:10144\n', 1)
        socks = sdactivate.Sockets(
            [('0.0.0.0', IMAP_LISTEN, 'imap'),
             ('0.0.0.0', POP3_LISTEN, 'pop3'), ('::', 10144, 'imap6')],
            transparent=True, netns=env.gw_ns.name, v6only=False)
        want = 'listener [::]:10144: the inherited socket "imap6" (fd 5) ' \
            'takes IPv4 too'
    gw.activation = socks
    try:
        with pytest.raises(dc.HarnessError):
            gw.start()
        assert want in gw.log_text(), gw.log_tail()
    finally:
        gw.stop()
        gw.activation = None
        gw.extra_conf = conf
        socks.close()
        gw.start()


# ------------------------------------------ the NFQUEUE hold (no activation)

class Pending:
    """One connection attempt from the client, in a thread of its own:
    .wait() gives the greeting line, or the exception it ended with."""

    def __init__(self, env, port):
        self.result = None
        self.sent_again = 0
        self.thread = threading.Thread(target=self._run, args=(env, port),
                                       daemon=True)
        self.thread.start()

    def _run(self, env, port):
        try:
            with connect_now(env, port) as s:
                self.result = greeting(s)
                self.sent_again = segments_sent_again(s)
        except OSError as e:
            self.result = e

    def wait(self, timeout=90):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), 'attempt still waiting'
        return self.result


def hold_start(env, *args):
    """mailshiftctl steer hold ARGS in the gateway namespace, once it says
    it holds."""
    p = subprocess.Popen(
        netns.exec_prefix(env.gw_ns.name) +
        [env.ctl_binary, 'steer', '-c', env.gw.config_path, 'hold'] +
        list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith('holding'):
        p.kill()
        pytest.fail('steer hold did not start: %r %s'
                    % (line, p.communicate()[1]))
    return p


def queued(env):
    """Packets waiting in the gateway namespace's NFQUEUEs for a verdict."""
    r = env.gw_ns.run(['cat', '/proc/net/netfilter/nfnetlink_queue'])
    return sum(int(l.split()[2]) for l in r.stdout.splitlines())


def retransmitted(env):
    """SYNs the client namespace sent again (TcpExt TCPSynRetrans: a SYN
    lost on the way is sent again a second later)."""
    lines = [l.split() for l in env.cli.run(['cat', '/proc/net/netstat'])
             .stdout.splitlines() if l.startswith('TcpExt:')]
    return int(lines[1][lines[0].index('TCPSynRetrans')])


def test_hold_restart_without_activation_refuses_nothing(steered):
    """A restart of a mailshiftd that binds its own listeners: steer hold
    queues the SYNs that arrive while none listens and lets them go to
    the new one, none lost on the way."""
    env = steered
    gw = env.gw
    src_before = env.from_clients(env.src_ns)
    _, rejected0 = env.stats()
    retrans0 = retransmitted(env)
    with Attempts(env) as loop:
        loop.more(3)
        hold = hold_start(env, '--timeout', '60')
        held_from = time.monotonic()
        try:
            loop.phase = 'hold'
            assert gw.stop() == 0 and not gw.killed
            waiting = [Pending(env, p) for p in (143, 143, 110)]
            # Held in the kernel's queue, neither refused nor passed on.
            assert wait_for(lambda: queued(env) >= 3, 30, 0.02), \
                queued(env)
            assert [w.result for w in waiting] == [None] * 3
            gw.start()
            out, err = hold.communicate(timeout=60)
            held_for = time.monotonic() - held_from
            assert hold.returncode == 0, (out, err)
            assert 'a new mailshiftd listens: ' in out, out
            for w in waiting:
                assert greeted(w.wait()), w.result
            loop.more(3)
        finally:
            if hold.poll() is None:
                hold.terminate()
                hold.wait(30)
    assert not loop.failures, loop.failures
    _, rejected = env.stats()
    assert rejected == rejected0
    assert env.from_clients(env.src_ns) == src_before
    assert queued(env) == 0
    # Let go, not dropped: no client had to send its SYN again, but for
    # what the wait itself explains: a SYN still held at the client's
    # retransmission timeouts (1 s, then 2 and 4 more: RFC 6298) is sent
    # again while it waits (a machine slow to start mailshiftd again, the
    # sanitizers' build). At most 4 connections wait (the 3 above and the
    # loop's one); with a hold under 1 s, none may be sent again.
    per_syn = 0
    while 2 ** (per_syn + 1) - 1 < held_for:
        per_syn += 1
    print('held %.2f s: %d SYN(s) sent again' % (
        held_for, retransmitted(env) - retrans0))
    assert retransmitted(env) - retrans0 <= 4 * per_syn, \
        (retransmitted(env) - retrans0, held_for, loop.sent_again,
         [w.sent_again for w in waiting])


def test_hold_rejects_past_its_timeout(steered):
    """No new mailshiftd within the timeout: what was held goes on to the
    steering table, which resets it (fail closed), and hold says so."""
    env = steered
    gw = env.gw
    gw.stop()
    try:
        src_before = env.from_clients(env.src_ns)
        _, rejected0 = env.stats()
        hold = hold_start(env, '--timeout', '5')
        w = Pending(env, 143)
        assert wait_for(lambda: queued(env) >= 1 or hold.poll() is not None,
                        30, 0.02)
        out, err = hold.communicate(timeout=60)
        assert hold.returncode == 1, (out, err)
        assert 'no new mailshiftd listened within 5 s' in err, err
        assert isinstance(w.wait(), ConnectionRefusedError), w.result
        _, rejected = env.stats()
        assert rejected > rejected0
        assert env.from_clients(env.src_ns) == src_before
    finally:
        gw.start()


def test_hold_is_bounded_and_stops_on_sigterm(steered):
    """--max: attempts over the bound go on at once (the kernel's queue
    length, fail-open: to the table's reset, while the first waits);
    SIGTERM lets go what is held and removes the rules (the fixture's
    dump)."""
    env = steered
    gw = env.gw
    gw.stop()
    try:
        hold = hold_start(env, '--max', '1', '--timeout', '60')
        first = Pending(env, 143)
        assert wait_for(lambda: queued(env) >= 1, 30, 0.02)
        over = Pending(env, 110)
        assert isinstance(over.wait(), ConnectionRefusedError), over.result
        assert first.result is None
        hold.send_signal(signal.SIGTERM)
        out, err = hold.communicate(timeout=60)
        assert hold.returncode == 0, (out, err)
        assert 'stopped: 1 held and let go' in out, out
        # let go with no mailshiftd: the table resets it
        assert isinstance(first.wait(), ConnectionRefusedError), \
            first.result
        assert queued(env) == 0
    finally:
        gw.start()


def test_hold_killed_fails_closed_and_remove_cleans_up(steered):
    """A hold killed -9 leaves its rule, whose queue nobody reads now:
    attempts go past it (--queue-bypass) to the table's reset, never to
    the old server; steer remove then takes the rule and its raw table
    away (the fixture's full dump), as a new hold would."""
    env = steered
    gw = env.gw
    gw.stop()
    try:
        src_before = env.from_clients(env.src_ns)
        hold = hold_start(env)
        hold.kill()
        hold.communicate(timeout=60)
        rules = env.gw_ns.run(['iptables-nft', '-t', 'raw', '-S',
                               'PREROUTING']).stdout
        assert rules.count('--comment mailshift-hold') == 2, rules
        err = refused(env, 143)
        assert isinstance(err, ConnectionRefusedError), err
        assert env.from_clients(env.src_ns) == src_before
        # a new hold starts clean: one rule per port, not two
        hold = hold_start(env, '--timeout', '60')
        rules = env.gw_ns.run(['iptables-nft', '-t', 'raw', '-S',
                               'PREROUTING']).stdout
        assert rules.count('--comment mailshift-hold') == 2, rules
        hold.kill()
        hold.communicate(timeout=60)
    finally:
        gw.start()
