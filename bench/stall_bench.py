#!/usr/bin/python3
"""Stall benchmark: what the gateway adds to one command's round trip,
against talking to Dovecot directly, for a client that writes its commands
in pieces without TCP_NODELAY (Nagle on, as most clients' sockets).

    make bench-stall                              # deps, build, the run
    /usr/bin/python3 bench/stall_bench.py         # the same, without the build
    MAILSHIFTD=/path/to/old/mailshiftd bench/stall_bench.py   # another build

One Dovecot 2.3 (tests/lib/dovecot.py) holds the user; mailshiftd
(tests/lib/gateway.py, `[policy] on_first_login = off`) is in front of it.
On one logged-in, SELECTed session per target it times, per round:

  split   a NOOP written in two send()s: "TAG NOOP", then "\\r\\n";
  append  an APPEND of a 400-byte message: the command line, the server's
          continuation, then the message and its CRLF in two send()s;
  whole   a NOOP in one send() (the floor: nothing waits for an ACK).

and reports each target's median in ms and the gateway's as a ratio to
direct. A client's Nagle holds the second piece until the first is
acknowledged: a peer that delays its ACK (the kernel's delayed ACK, up to
40 ms) stalls every such command. Not a test: it exits 0 whatever it
measures, 1 only when it could not run. See bench/README.md.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))

import dovecot as dc            # noqa: E402  (tests/lib)
import gateway as gwlib         # noqa: E402

USER, PASSWORD = 'stall', 'stall-pw-1'
MESSAGE = (b'From: a@example.org\r\nTo: b@example.org\r\nSubject: stall\r\n'
           b'\r\n' + b'a line of the body of the message\r\n' * 10)


def session(port):
    """A logged-in IMAP session (Nagle left on), INBOX selected."""
    s = socket.create_connection(('127.0.0.1', port), timeout=30)
    f = s.makefile('rb')
    f.readline()
    for tag, cmd in ((b'l', b'LOGIN %s %s' % (USER.encode(),
                                             PASSWORD.encode())),
                     (b's', b'SELECT INBOX')):
        s.sendall(tag + b' ' + cmd + b'\r\n')
        while True:
            line = f.readline()
            if not line:
                raise RuntimeError('connection closed at %r' % cmd)
            if line.startswith(tag + b' '):
                if not line.startswith(tag + b' OK'):
                    raise RuntimeError('%r: %r' % (cmd, line))
                break
    return s, f


def wait_tagged(f, tag):
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError('connection closed')
        if line.startswith(tag + b' '):
            return line


def one(kind, s, f, i):
    tag = b'%s%d' % (kind[0].encode(), i)
    t = time.perf_counter()
    if kind == 'whole':
        s.send(tag + b' NOOP\r\n')
    elif kind == 'split':
        s.send(tag + b' NOOP')
        s.send(b'\r\n')
    else:
        s.send(tag + b' APPEND INBOX {%d}\r\n' % len(MESSAGE))
        if not f.readline().startswith(b'+'):
            raise RuntimeError('no continuation for APPEND')
        s.send(MESSAGE)
        s.send(b'\r\n')
    wait_tagged(f, tag)
    return (time.perf_counter() - t) * 1000


def measure(targets, rounds):
    """{target: {kind: [ms, ...]}}, the targets interleaved per round."""
    conns = {name: session(port) for name, port in targets}
    out = {name: {k: [] for k in KINDS} for name, _ in targets}
    for i in range(rounds):
        for kind in KINDS:
            for name, _ in targets:
                s, f = conns[name]
                out[name][kind].append(one(kind, s, f, i))
    for s, f in conns.values():
        s.close()
    return out


KINDS = ('whole', 'split', 'append')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=200)
    ap.add_argument('--results', default=os.path.join(HERE, 'results'))
    args = ap.parse_args()
    root = dc.make_test_root(prefix='mailshift-stall-')
    started = []
    try:
        users = {USER: PASSWORD}
        src = dc.Dovecot(os.path.join(root, 'src'), 'src', users=users)
        dst = dc.Dovecot(os.path.join(root, 'dst'), 'dst', users=users)
        for d in (src, dst):
            d.start()
            started.append(d)
        gw = gwlib.Mailshiftd(os.path.join(root, 'gw'), src, dst,
                              policy='off')
        os.makedirs(gw.root_dir, exist_ok=True)
        gw.start()
        started.append(gw)
        res = measure((('direct', src.imap_port),
                       ('mailshiftd', gw.imap_port)), args.rounds)
    except Exception as e:                  # noqa: BLE001
        print('stall bench could not run: %s' % e, file=sys.stderr)
        return 1
    finally:
        for p in reversed(started):
            p.stop()
        dc.remove_test_root(root)
    med = {t: {k: statistics.median(v) for k, v in kinds.items()}
           for t, kinds in res.items()}
    print('binary: %s, %d rounds, medians' % (gwlib.MAILSHIFTD, args.rounds))
    print('%-8s %12s %12s %8s' % ('command', 'direct ms', 'gateway ms',
                                  'ratio'))
    for k in KINDS:
        d, g = med['direct'][k], med['mailshiftd'][k]
        print('%-8s %12.3f %12.3f %7.1fx' % (k, d, g, g / d if d else 0))
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, 'stall-%s.json'
                        % time.strftime('%Y%m%dT%H%M%S'))
    with open(path, 'w') as f:
        json.dump({'binary': gwlib.MAILSHIFTD, 'rounds': args.rounds,
                   'median_ms': med, 'samples_ms': res}, f, indent=1)
    print('results: %s' % path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
