#!/usr/bin/python3
"""The kernel module benchmark (bench/README.md, "Kernel module"): not a
test. Boots the module test's VM (tests/integration/test_kmod.py builds it:
Debian's cloud kernel under qemu TCG, the module, the tools) with
bench/kmod_guest.sh as /init and bench/kmod_load (static) in it, and prints
connection set-up rate, one stream's throughput and the UDP packet rate of
unrelated traffic through each way of steering, and their ratios to plain
routing, for the same VM run. Writes the numbers as JSON too (--results).

    /usr/bin/python3 bench/kmod_bench.py [--results DIR]

Exit 0 when it ran, 1 when it could not (no qemu, no kernel, a failed
build or a VM that ended early)."""

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests', 'integration'))
import test_kmod  # noqa: E402 (the VM's build and boot)

SCENARIOS = ['plain', 'nftdnat', 'nft', 'kmod', 'session']
METRICS = ['connections_per_s', 'stream_mb_per_s', 'udp_packets_per_s']


def parse(res):
    """{scenario: {metric: best value}} from the BENCH lines (one per
    round: the best counts, as in the other benchmarks)."""
    out = {}
    for line in res.splitlines():
        w = line.split()
        if len(w) == 4 and w[0] == 'BENCH':
            row = out.setdefault(w[1], {})
            row[w[2]] = max(row.get(w[2], 0.0), float(w[3]))
    return out


def table(got):
    lines = ['%-9s %18s %18s %22s' % ('', 'connections/s', 'stream MB/s',
                                      'UDP packets/s')]
    base = got.get('plain', {})
    for sc in SCENARIOS:
        row = got.get(sc, {})
        cells = []
        for m in METRICS:
            v, b = row.get(m), base.get(m)
            cells.append('-' if v is None else '%.0f (%.2f)' % (v, v / b)
                         if b else '%.0f' % v)
        lines.append('%-9s %18s %18s %22s' % tuple([sc] + cells))
    # Per packet: the time one more UDP packet takes against plain
    # routing, and the module's hook against the same conntrack and NAT
    # without it (nftdnat). TCG time: compare, do not quote.
    def cost(a, b):
        v = got.get(a, {}).get('udp_packets_per_s')
        w = got.get(b, {}).get('udp_packets_per_s')
        return (1 / v - 1 / w) * 1e6 if v and w else None
    for sc in SCENARIOS[1:]:
        c = cost(sc, 'plain')
        if c is not None:
            lines.append('%s: %+.1f us per UDP packet against plain '
                         'routing' % (sc, c))
    c = cost('kmod', 'nftdnat')
    if c is not None:
        lines.append('the hook: %+.1f us per UDP packet against conntrack '
                     'and NAT without it (kmod against nftdnat)' % c)
    return '\n'.join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--results', default=os.path.join(HERE, 'results'))
    args = ap.parse_args()
    qemu = shutil.which('qemu-system-x86_64')
    ctl = os.environ.get('MAILSHIFTCTL',
                         os.path.join(REPO, 'tools', 'mailshiftctl'))
    if qemu is None or not os.access(ctl, os.X_OK):
        print('kmod_bench: needs qemu-system-x86_64 and a built '
              'tools/mailshiftctl (make)')
        return 1
    os.makedirs(test_kmod.WORK, exist_ok=True)
    load = os.path.join(test_kmod.WORK, 'kmod_load')
    r = test_kmod._run(['gcc', '-O2', '-Wall', '-Wextra', '-Werror',
                        '-static', '-o', load,
                        os.path.join(HERE, 'kmod_load.c')])
    if r.returncode != 0:
        print(r.stdout)
        return 1
    # One VM at a time per tree (the test takes the same lock).
    with open(os.path.join(test_kmod.WORK, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            built = test_kmod.build_vm(
                ctl, os.path.join(HERE, 'kmod_guest.sh'), load)
        except BaseException as e:      # pytest.skip, assert
            print('kmod_bench: cannot build the VM: %s' % e)
            return 1
        t0 = time.time()
        res, con, status = test_kmod.run_vm(qemu, *built)
    if 'BENCH-END' not in res:
        print(res)
        print(con[-3000:])
        print('kmod_bench: the VM ended early (status %d)' % status)
        return 1
    got = parse(res)
    print(table(got))
    print('(one VM run, %.0f s, qemu TCG on one vCPU: ratios to plain '
          'routing in brackets)' % (time.time() - t0))
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, 'kmod-%s.json'
                        % time.strftime('%Y%m%d-%H%M%S'))
    with open(path, 'w') as f:
        json.dump({'results': got, 'info': [l for l in res.splitlines()
                                            if l.startswith('INFO')]},
                  f, indent=2)
    print('results: %s' % path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
