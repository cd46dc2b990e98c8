#!/usr/bin/python3
"""Cluster benchmark: logins per second and flips per second with one, two
and three mailshiftd on one PostgreSQL store, beside one mailshiftd on its
SQLite file, in one run; each reported as a ratio to the SQLite gateway.

    /usr/bin/python3 bench/cluster_bench.py
    /usr/bin/python3 bench/cluster_bench.py --users 200 --logins 2000 --flips 40

Two Dovecots (tests/lib/dovecot.py; the source in high-performance mode)
hold the users, every mailbox empty; a PostgreSQL cluster
(tests/lib/postgres.py) holds one fresh database per configuration. Per
configuration (sqlite-1, pg-1, pg-2, pg-3) the gateways start on a fresh
store with every user imported in state source, [policy] on_first_login =
off (a login never copies), admin logins and no sweep, then:

  1. logins/s: bench/gateway_loadgen.c (built and run through
     bench/gateway_bench.py's Bench) against every gateway at once, the
     sessions split evenly, each connect, LOGIN, SELECT INBOX, LOGOUT; the
     rate is the sessions over the slowest generator's wall time. Each
     login looks its user up in the store (one query).
  2. flips/s: `migrate --daemon USER` for --flips users, dealt round-robin
     over the gateways, each gateway's requests sent at once on its control
     socket (JSON lines, as mailshiftctl sends them); the rate is
     the users over the time until the store says every one is on the
     destination. Each flip takes the user's job (one transaction), copies
     an empty mailbox (logins on both servers, LIST, verify) and writes the
     flip with the job's end (one transaction).

With each rate the CPU seconds per login or flip of the gateways, the
database server and the Dovecots (utime+stime of their process trees,
/proc), which say where a run stops scaling. Not a test: not part of `make
check`; it exits 1 only when it could not run. See bench/README.md.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))
sys.path.insert(0, HERE)

import dovecot as dc            # noqa: E402  (tests/lib)
import gateway as gwlib         # noqa: E402
import postgres                 # noqa: E402
import gateway_bench as gb      # noqa: E402  (the load generator, /proc CPU)

MASTER = ('master', 'Bench-master-pw-4')
CONFIGS = (('sqlite-1', 'sqlite', 1), ('pg-1', 'pg', 1), ('pg-2', 'pg', 2),
           ('pg-3', 'pg', 3))
T0 = time.monotonic()


def log(msg):
    print('[%7.1fs] %s' % (time.monotonic() - T0, msg), flush=True)


class ClusterBench:
    def __init__(self, a):
        self.a = a
        self.workdir = dc.make_test_root('mailshift-clbench-',
                                         parent='/dev/shm')
        os.chmod(self.workdir, 0o755)
        self.lg = gb.Bench(argparse.Namespace(
            workdir=os.path.join(self.workdir, 'lg'), users=a.users,
            timeout=a.timeout))
        self.servers = []
        self.pg = None
        self.results = []

    # ------------------------------------------------------------ set-up

    def setup(self):
        a = self.a
        self.lg.build_loadgen()
        self.ca = dc.TestCA(os.path.join(self.workdir, 'ca'))
        self.lg.ca = self.ca
        users = self.lg.all_users()
        extra = '\n'.join(['mail_max_userip_connections = 100000',
                           'default_process_limit = 2000',
                           'service imap {\n  process_limit = 2000\n}'])
        for name, perf in (('src', True), ('dst', False)):
            s = dc.Dovecot(os.path.join(self.workdir, name), name,
                           users=dict(users), performance=perf,
                           master_user=MASTER, extra_conf=extra)
            self.servers.append(s)
            s.start()
        self.src, self.dst = self.servers
        # first logins make the maildirs: before anything is measured
        for s in self.servers:
            r = self.lg.loadgen_run(s.imap_port, 'imap', sessions=a.users,
                                    concurrency=20)
            if r.get('errors'):
                raise gb.BenchError('warm-up: %s' % r.get('error_samples'))
        self.pg = postgres.Postgres(os.path.join(self.workdir, 'postgres'))
        self.pg.start()
        self.pwf = os.path.join(self.workdir, 'admin.pw')
        with open(self.pwf, 'w') as f:
            f.write(MASTER[1] + '\n')
        os.chmod(self.pwf, 0o600)
        log('%d users on both servers; PostgreSQL on port %d'
            % (a.users, self.pg.port))

    def conf(self, name):
        return '\n'.join([
            '[source]', 'admin = %s' % MASTER[0],
            'admin_password_file = %s' % self.pwf,
            '[destination]', 'admin = %s' % MASTER[0],
            'admin_password_file = %s' % self.pwf,
            '[gateway]', 'name = %s' % name])

    def gateways(self, label, engine, n):
        url = None
        if engine == 'pg':
            self.db = label.replace('-', '_')
            url = self.pg.create_db(self.db)
        gws = []
        for i in range(n):
            name = '%s-gw%d' % (label, i + 1)
            g = gwlib.Mailshiftd(os.path.join(self.workdir, name), self.src,
                                 self.dst, policy='off', store_url=url,
                                 env=self.pg.env(), connections=4,
                                 flip_quiet=0,
                                 extra_conf=self.conf(name))
            g.start(timeout=60)
            gws.append(g)
        csv = os.path.join(self.workdir, label + '-users.csv')
        with open(csv, 'w') as f:
            for u in self.lg.user_names():
                f.write('%s,source\n' % u)
        r = gws[0].ctl('user', 'import', csv, timeout=300)
        if r.rc != 0:
            raise gb.BenchError('user import: %s' % r.describe())
        return gws

    # --------------------------------------------------------- measuring

    def cpu(self, gws):
        pg_pid = int(open(os.path.join(self.pg.data_dir,
                                       'postmaster.pid')).readline())
        return {'gateways': gb.tree_cpu([g.pid for g in gws]),
                'database': gb.tree_cpu([pg_pid]),
                'dovecots': gb.tree_cpu([s.pid for s in self.servers]),
                'machine': gb.machine_busy()[0], 't': time.monotonic()}

    def per(self, c0, c1, n):
        return {k: round((c1[k] - c0[k]) / n * 1e3, 3)
                for k in ('gateways', 'database', 'dovecots', 'machine')}

    def logins(self, gws):
        a = self.a
        each = a.logins // len(gws)
        out = [None] * len(gws)

        def run(i):
            out[i] = self.lg.loadgen_run(gws[i].imap_port, 'imap',
                                         sessions=each,
                                         concurrency=a.concurrency)
        c0 = self.cpu(gws)
        ts = [threading.Thread(target=run, args=(i,))
              for i in range(len(gws))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        c1 = self.cpu(gws)
        ok = sum(r.get('ok', 0) for r in out)
        errors = sum(r.get('errors', 0) for r in out)
        wall = max(r.get('wall', 0) for r in out)
        return {'sessions': each * len(gws), 'ok': ok, 'errors': errors,
                'wall': round(wall, 3),
                'rate': round(ok / wall, 1) if wall else 0,
                'p99_ms': max(r.get('lat_ms', {}).get('p99', 0)
                              for r in out),
                'ms_cpu_per_login': self.per(c0, c1, max(ok, 1))}

    def moved(self, gws):
        """Users the gateways said are on the destination (or failed), from
        their logs: polling the store would add its own load."""
        return sum(g.log_text().count(': state destination') +
                   g.log_text().count(': copy failed') for g in gws)

    def flips(self, gws):
        users = self.lg.user_names()[:self.a.flips]
        errs = []

        def deal(i):
            # the control socket's JSON lines (what `mailshiftctl migrate
            # --daemon` sends), all at once: no process per user
            mine = users[i::len(gws)]
            with socket.socket(socket.AF_UNIX) as sk:
                sk.connect(gws[i].socket_path)
                sk.sendall(b''.join(json.dumps({'cmd': 'migrate',
                                                'user': u}).encode() + b'\n'
                                    for u in mine))
                f = sk.makefile('rb')
                for u in mine:
                    rep = json.loads(f.readline() or b'{}')
                    if not rep.get('ok'):
                        errs.append('%s: %s' % (u, rep))
        c0 = self.cpu(gws)
        ts = [threading.Thread(target=deal, args=(i,))
              for i in range(len(gws))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        deadline = time.monotonic() + self.a.timeout
        while self.moved(gws) < len(users):
            if time.monotonic() > deadline:
                raise gb.BenchError('flips not done in %d s' % self.a.timeout)
            time.sleep(0.1)
        c1 = self.cpu(gws)
        wall = c1['t'] - c0['t']
        failed = sum(gws[0].state(u) == 'failed' for u in users)
        return {'users': len(users), 'failed': failed, 'errors': errs[:3],
                'wall': round(wall, 3), 'rate': round(len(users) / wall, 2),
                'ms_cpu_per_flip': self.per(c0, c1, len(users))}

    def run(self):
        for label, engine, n in CONFIGS:
            gws = self.gateways(label, engine, n)
            try:
                res = {'config': label, 'store': engine, 'gateways': n,
                       'logins': self.logins(gws),
                       'flips': self.flips(gws)}
            finally:
                for g in gws:
                    g.stop()
            self.results.append(res)
            log('%s: %.0f logins/s, %.2f flips/s' % (
                label, res['logins']['rate'], res['flips']['rate']))

    # ------------------------------------------------------------ report

    def report(self):
        base = self.results[0]
        lines = ['| config | logins/s | vs sqlite-1 | flips/s | vs sqlite-1 '
                 '| CPU ms per login: gateways / database / dovecots / '
                 'machine | CPU ms per flip: gateways / database / dovecots '
                 '/ machine |', '|' + '---|' * 7]
        for r in self.results:
            lo, fl = r['logins'], r['flips']
            cl, cf = lo['ms_cpu_per_login'], fl['ms_cpu_per_flip']
            lines.append('| %s | %.0f | %.2f | %.2f | %.2f | %.2f / %.2f / '
                         '%.2f / %.2f | %.1f / %.1f / %.1f / %.1f |' % (
                             r['config'], lo['rate'],
                             lo['rate'] / base['logins']['rate'],
                             fl['rate'], fl['rate'] / base['flips']['rate'],
                             cl['gateways'], cl['database'], cl['dovecots'],
                             cl['machine'], cf['gateways'], cf['database'],
                             cf['dovecots'], cf['machine']))
        print('\n'.join(lines))
        for r in self.results:
            if r['logins']['errors'] or r['flips']['failed'] or \
                    r['flips']['errors']:
                print('%s: %d login error(s), %d flip(s) failed %s'
                      % (r['config'], r['logins']['errors'],
                         r['flips']['failed'], r['flips']['errors']))
        out = os.path.join(self.a.results, 'cluster-%d.json' % time.time())
        os.makedirs(self.a.results, exist_ok=True)
        with open(out, 'w') as f:
            json.dump({'args': vars(self.a), 'cores': os.cpu_count(),
                       'results': self.results}, f, indent=1)
        print('JSON: %s' % out)

    def cleanup(self):
        if self.pg is not None:
            self.pg.stop()
        for s in self.servers:
            s.stop()
        dc.remove_test_root(self.workdir)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--users', type=int, default=300,
                   help='users on both servers and in each store')
    p.add_argument('--logins', type=int, default=3000,
                   help='login sessions per configuration (split over its '
                   'gateways)')
    p.add_argument('--concurrency', type=int, default=20,
                   help='sessions at once per gateway')
    p.add_argument('--flips', type=int, default=150,
                   help='users moved per configuration')
    p.add_argument('--timeout', type=int, default=600)
    p.add_argument('--results', default=os.path.join(HERE, 'results'))
    a = p.parse_args()
    b = ClusterBench(a)
    try:
        b.setup()
        b.run()
        b.report()
    except gb.BenchError as e:
        print('cluster_bench: %s' % e, file=sys.stderr)
        return 1
    finally:
        b.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
