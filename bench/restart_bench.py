#!/usr/bin/python3
"""Restart benchmark: what clients see while mailshiftd restarts in router
mode, with each of the ways mailshift has to bridge the restart.

    make bench-restart                           # deps, build, the full run
    /usr/bin/python3 bench/restart_bench.py      # the same, without the build
    /usr/bin/python3 bench/restart_bench.py --restarts 3 --clients 2

Two network namespaces made here and removed afterwards: a client, and a
gateway running mailshiftd (transparent listeners) behind the steering
table `mailshiftctl steer install` makes for the service address. Clients
(threads in the client namespace) connect to the service address's IMAP port
one attempt after the other (connect, read the greeting, close) while
mailshiftd is restarted (SIGTERM, then a new one on the same config, as
fast as it starts) a number of times, for each mechanism:

  none        mailshiftd binds its own listeners: while none runs, the
              steering table resets new connections (fail closed);
  activation  the listening sockets are held by a launcher, as systemd's
              mailshiftd.socket does (tests/lib/sdactivate.py), and each
              mailshiftd inherits them;
  hold        mailshiftd binds its own listeners, and `mailshiftctl steer
              hold` queues new SYNs (NFQUEUE) from before the stop until the
              new mailshiftd listens.

Per mechanism: attempts, failed attempts (refused, reset, closed without a
greeting, timed out), the time from the stop to the new mailshiftd's first
greeting, and the latency (connect to greeting) of the attempts started in
those windows against the others.

Not a test: it is not part of `make check`, it exits 0 whatever it measures,
and 1 only when it could not run at all. See bench/README.md.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))

import dovecot as dc            # noqa: E402  (tests/lib)
import gateway as gwlib         # noqa: E402
import netns                    # noqa: E402
import sdactivate               # noqa: E402

NET = '10.234.'
CLI_ADDR = NET + '0.2'
GW_ADDR = NET + '0.1'
SERVICE_ADDR = NET + '1.2'
IMAP_LISTEN, POP3_LISTEN = 10143, 10110
MECHANISMS = ('none', 'activation', 'hold')

STEER_CONF = """[listen]
trusted_networks = %(net)s0.0/24

[steer]
address = %(svc)s
port = 143 %(imap)d
port = 110 %(pop3)d
""" % {'net': NET, 'svc': SERVICE_ADDR, 'imap': IMAP_LISTEN,
       'pop3': POP3_LISTEN}


class Nowhere:
    """[source]/[destination] for a gateway that only greets: nothing is
    asked of them during the benchmark."""
    pop3_port = 110
    tls_ca = None

    def url(self, scheme='imap'):
        return '%s://%s:%d' % (scheme, SERVICE_ADDR,
                               {'imap': 143, 'pop3': 110}[scheme])


class Clients:
    """n threads in the client namespace, each making attempts one after
    the other; every attempt is (start, end, outcome)."""

    def __init__(self, cli, n, timeout):
        self.cli = cli
        self.timeout = timeout
        self.done = threading.Event()
        self.attempts = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=cli.call, args=(self.run,),
                                         daemon=True) for _ in range(n)]

    def one(self):
        t0 = time.monotonic()
        try:
            with socket.create_connection((SERVICE_ADDR, 143),
                                          self.timeout) as s:
                line = gwlib.first_line(s)
            outcome = 'ok' if line.startswith(b'* OK') else 'no greeting'
        except ConnectionRefusedError:
            outcome = 'refused'
        except ConnectionResetError:
            outcome = 'reset'
        except socket.timeout:
            outcome = 'timeout'
        except OSError as e:
            outcome = type(e).__name__
        return t0, time.monotonic(), outcome

    def run(self):
        while not self.done.is_set():
            a = self.one()
            with self.lock:
                self.attempts.append(a)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for t in self.threads:
            t.join(self.timeout + 30)


def ms(x):
    return round(x * 1000, 1)


def summarize(mech, attempts, windows):
    def in_window(a):
        return any(w0 <= a[0] <= w1 for w0, w1 in windows)

    during = [a for a in attempts if in_window(a)]
    other = [a for a in attempts if not in_window(a)]
    lat = sorted(a[1] - a[0] for a in during if a[2] == 'ok')
    base = sorted(a[1] - a[0] for a in other if a[2] == 'ok')
    failed = [a for a in attempts if a[2] != 'ok']
    kinds = {}
    for a in failed:
        kinds[a[2]] = kinds.get(a[2], 0) + 1
    # attempts that took over half a second: when they began, relative to
    # the restart window they fell in (a lost SYN is sent again after 1 s)
    slow = []
    for a in attempts:
        if a[2] == 'ok' and a[1] - a[0] > 0.5:
            w0, w1 = min(windows, key=lambda w: abs(a[0] - w[0]))
            slow.append({'began_ms': ms(a[0] - w0), 'took_ms': ms(a[1] - a[0]),
                         'window_ms': ms(w1 - w0)})
    return {
        'mechanism': mech,
        'slow': slow,
        'attempts': len(attempts),
        'failed': len(failed),
        'failures': kinds,
        'restarts': len(windows),
        'window_ms_mean': ms(statistics.mean(w1 - w0 for w0, w1 in windows)),
        'attempts_in_windows': len(during),
        'window_latency_ms_p50': ms(lat[len(lat) // 2]) if lat else None,
        'window_latency_ms_max': ms(lat[-1]) if lat else None,
        'other_latency_ms_p50': ms(base[len(base) // 2]) if base else None,
        'other_latency_ms_p99': ms(base[int(len(base) * 0.99)])
        if base else None,
    }


class Bench:
    def __init__(self, a):
        self.a = a
        uid = '%d-%s' % (os.getpid(), os.urandom(2).hex())
        self.cli = netns.NetNS('ms-rbcli-' + uid)
        self.gw_ns = netns.NetNS('ms-rbgw-' + uid)
        self.root = dc.make_test_root('mailshift-restartbench-')
        self.gw = None
        self.ctl = gwlib.MAILSHIFTCTL

    def log(self, msg):
        print('restart-bench: %s' % msg, flush=True)

    def setup(self):
        self.cli.add()
        self.gw_ns.add()
        netns.veth_pair(self.cli, 'c0', self.gw_ns, 'g0')
        self.cli.ip('addr', 'add', CLI_ADDR + '/24', 'dev', 'c0')
        self.cli.ip('link', 'set', 'c0', 'up')
        self.cli.ip('route', 'add', 'default', 'via', GW_ADDR)
        # Tens of thousands of attempts leave as many TIME_WAITs: let
        # connect() reuse their ports, or later runs slow down.
        self.cli.run(['sysctl', '-qw', 'net.ipv4.tcp_tw_reuse=1'])
        self.gw_ns.ip('addr', 'add', GW_ADDR + '/24', 'dev', 'g0')
        self.gw_ns.ip('link', 'set', 'g0', 'up')
        # the service address's network, behind the gateway (a veth pair
        # with its other end unused: kernels without the dummy driver)
        self.gw_ns.ip('link', 'add', 'g1', 'type', 'veth', 'peer', 'name',
                      'g1p')
        self.gw_ns.ip('addr', 'add', NET + '1.1/24', 'dev', 'g1')
        self.gw_ns.ip('link', 'set', 'g1p', 'up')
        self.gw_ns.ip('link', 'set', 'g1', 'up')
        self.gw_ns.run(['sysctl', '-qw', 'net.ipv4.ip_forward=1'])
        self.gw = gwlib.Mailshiftd(
            os.path.join(self.root, 'gw'), Nowhere(), Nowhere(),
            policy='off', listen_host='0.0.0.0', imap_port=IMAP_LISTEN,
            pop3_port=POP3_LISTEN, transparent=True, netns=self.gw_ns.name,
            extra_conf=STEER_CONF)
        self.gw.start()
        self.steer('install')

    def steer(self, *args):
        return self.gw_ns.run([self.ctl, 'steer', '-c', self.gw.config_path]
                              + list(args), timeout=60)

    def hold(self):
        p = subprocess.Popen(
            netns.exec_prefix(self.gw_ns.name) +
            [self.ctl, 'steer', '-c', self.gw.config_path, 'hold',
             '--timeout', '60'], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not p.stdout.readline().startswith('holding'):
            p.kill()
            raise RuntimeError('steer hold: %s' % p.communicate()[1])
        return p

    def restart(self, mech):
        """One restart; returns (the restart began: the hold or the stop,
        the new daemon greeted)."""
        t0 = time.monotonic()
        hold = self.hold() if mech == 'hold' else None
        self.gw.stop()
        self.gw.start()
        t1 = time.monotonic()
        if hold is not None:
            hold.communicate(timeout=90)
        return t0, t1

    def run(self, mech):
        socks = None
        self.gw.stop()
        if mech == 'activation':
            socks = sdactivate.Sockets(
                [('0.0.0.0', IMAP_LISTEN, 'imap'),
                 ('0.0.0.0', POP3_LISTEN, 'pop3')], transparent=True,
                netns=self.gw_ns.name)
            self.gw.activation = socks
        try:
            self.gw.start()
            windows = []
            with Clients(self.cli, self.a.clients, self.a.timeout) as c:
                time.sleep(self.a.settle)       # load before the first
                for _ in range(self.a.restarts):
                    windows.append(self.restart(mech))
                    time.sleep(self.a.settle)   # load between restarts
            return summarize(mech, c.attempts, windows)
        finally:
            self.gw.stop()
            self.gw.activation = None
            if socks is not None:
                socks.close()

    def cleanup(self):
        if self.gw is not None:
            self.gw.stop()
        for ns in (self.cli, self.gw_ns):
            if not ns.added:
                continue
            for p in ns.pids():
                if p != os.getpid():
                    os.kill(p, signal.SIGKILL)
            ns.delete()
        shutil.rmtree(self.root, ignore_errors=True)


def report(rows):
    cols = ('mechanism', 'attempts', 'failed', 'restarts', 'window_ms_mean',
            'attempts_in_windows', 'window_latency_ms_p50',
            'window_latency_ms_max', 'other_latency_ms_p50',
            'other_latency_ms_p99')
    print(' | '.join(cols))
    for r in rows:
        print(' | '.join(str(r[k]) for k in cols) +
              ('   failures: %s' % r['failures'] if r['failures'] else ''))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--restarts', type=int, default=5)
    p.add_argument('--clients', type=int, default=4,
                   help='client threads, each one attempt at a time')
    p.add_argument('--settle', type=float, default=1.0,
                   help='seconds of load before and between restarts')
    p.add_argument('--timeout', type=float, default=30.0,
                   help="a client's connect and greeting timeout")
    p.add_argument('--only', default=','.join(MECHANISMS))
    p.add_argument('--results', default=os.path.join(HERE, 'results'))
    a = p.parse_args()
    if os.geteuid() != 0:
        print('restart-bench: needs root (network namespaces, nftables)',
              file=sys.stderr)
        return 1
    b = Bench(a)
    rows = []
    try:
        b.setup()
        for mech in a.only.split(','):
            b.log('%s: %d restarts, %d clients' % (mech, a.restarts,
                                                   a.clients))
            rows.append(b.run(mech))
        b.steer('remove')
    except (OSError, RuntimeError, dc.HarnessError) as e:
        print('restart-bench: cannot run: %s' % e, file=sys.stderr)
        return 1
    finally:
        b.cleanup()
    report(rows)
    os.makedirs(a.results, exist_ok=True)
    out = os.path.join(a.results, 'restart-%s.json'
                       % time.strftime('%Y%m%d-%H%M%S'))
    with open(out, 'w') as f:
        json.dump({'args': vars(a), 'results': rows}, f, indent=2)
    b.log('results in %s' % out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
