#!/usr/bin/env python3
"""The site benchmark (issue 12, item 4): how good is the ETA
`mailshiftctl status` gives for a whole site?

A source Dovecot with --users users (default 1,000), each with a
log-normal number of small messages spread over 5 to 40 folders; an empty
destination; mailshiftd in front of both with admin (master) logins.
First the survey alone (mailshiftd with [sweep] survey and no sweep) asks
the source for every user's size; then mailshiftd's sweep moves everyone.
When 10% of the users are on the destination the benchmark reads
`mailshiftctl status --json`'s site.eta_seconds and, once the last user
is across, compares it with the time the rest really took (also at 25%
and 50%). A sample of users is compared with the source message by
message at the end.

    python3 bench/site_bench.py                  # 1,000 users (~10 min)
    python3 bench/site_bench.py --users 200      # a quick run

Reuses bench/mover_bench.py's corpus helpers and loader and tests/lib's
Dovecot and mailshiftd harness. Needs Dovecot (tests/install-deps.sh)
and the built tree (make). Results: bench/README.md, "The site's ETA".
"""

import argparse
import collections
import json
import os
import random
import shutil
import sys
import time

import mover_bench as mb    # puts tests/lib on sys.path

import gateway as gwlib     # tests/lib/gateway.py

MASTER = ('benchmaster', 'bench-master-pw-1')
MARKS = (0.10, 0.25, 0.50)


BASE_FOLDERS = ['INBOX', 'Sent', 'Drafts', 'Trash', 'Junk', 'Archive']
MORE_FOLDERS = ['Archive.%d' % y for y in range(2005, 2025)] + [
    'Projects', 'Lists', 'Clients', 'Receipts', 'Travel', 'Family',
    'Newsletters', 'Invoices', 'Reports', 'Team', 'Old', 'Misc', 'Personal',
    'Work']


def site_folders(rng, n):
    """n folder names (5 to 40): the usual six, then some of the others
    (Archive.YEAR below Archive), separator '.'."""
    return BASE_FOLDERS[:n] + rng.sample(MORE_FOLDERS, max(0, n - 6))


def build_site(a, workdir):
    """(index, data, per-user folders): each user's message count drawn
    log-normal (median a.median_messages, sigma a.sigma), its folders 5-40,
    small messages (log-normal around a.msg_size bytes)."""
    rng = random.Random(a.seed)
    words = mb._words(rng)
    text = mb._text_pool(rng, words, 2 << 20)
    b64 = mb._b64_pool(rng, 1 << 20)
    index, folders, chunks = [], {}, []
    off = seq = 0
    lo, hi = 1420070400, 1793491200     # 2015 to 2026
    for i in range(a.users):
        user = 'u%04d' % i
        nf = rng.randint(5, 40)
        folders[user] = site_folders(rng, nf)
        n = max(1, int(rng.lognormvariate(0, a.sigma) * a.median_messages))
        weights = [8] + [1] * (len(folders[user]) - 1)
        for folder in rng.choices(folders[user], weights=weights, k=n):
            size = int(min(20 * a.msg_size,
                           max(400, rng.lognormvariate(0, 0.5) *
                               a.msg_size)))
            epoch, tz = rng.randrange(lo, hi), rng.choice(mb.TZS)
            msg = mb._message(rng, seq, folder, epoch, tz, size, False,
                              text, b64)
            chunks.append(msg)
            index.append({'user': user, 'folder': folder,
                          'flags': mb._flags_for(rng, folder),
                          'idate': mb._internaldate(epoch, tz),
                          'off': off, 'len': len(msg)})
            off += len(msg)
            seq += 1
    return index, b''.join(chunks), folders


class SiteEta(mb.Bench):
    def server(self, name):
        return self.dovecot(name, {u: mb.PASSWORD for u in self.folders},
                            master_user=MASTER)

    def prepare(self):
        a = self.a
        t = time.monotonic()
        self.index, data, self.folders = build_site(a, self.workdir)
        self.total_bytes = sum(m['len'] for m in self.index)
        self.log('site: %d users, %d messages, %.1f MB, %d folders; '
                 'messages per user median %d, max %d; built in %.1f s'
                 % (a.users, len(self.index), self.total_bytes / mb.MB,
                    sum(len(f) for f in self.folders.values()),
                    a.median_messages, max(collections.Counter(
                        m['user'] for m in self.index).values()),
                    time.monotonic() - t))
        self.src = self.server('src')
        self.dst = self.server('dst')
        t = time.monotonic()
        by = collections.defaultdict(list)
        for m in self.index:
            by[m['user']].append(m)
        for user, folders in sorted(self.folders.items()):
            mb.load_folders(self.src.imap_port, user, mb.PASSWORD,
                            by[user], data, folders, 100, 2)
        self.log('source loaded in %.1f s' % (time.monotonic() - t))
        self.by = by

    def gateway(self, conf):
        pwf = os.path.join(self.workdir, 'admin.pw')
        with open(pwf, 'w') as f:
            f.write(MASTER[1] + '\n')
        os.chmod(pwf, 0o600)
        admin = ['[source]', 'admin = %s' % MASTER[0],
                 'admin_password_file = %s' % pwf, '[destination]',
                 'admin = %s' % MASTER[0], 'admin_password_file = %s' % pwf]
        g = gwlib.Mailshiftd(os.path.join(self.workdir, 'gw'), self.src,
                             self.dst, connections=self.a.connections,
                             extra_conf='\n'.join(admin + conf))
        g.start(timeout=60)
        return g

    def site(self, g):
        r = g.ctl('status', '--json', timeout=120)
        if r.rc != 0 or r.json is None:
            raise mb.BenchError('status: %s' % r.describe())
        return r.json['site']

    def add_users(self, g):
        path = os.path.join(self.workdir, 'users.csv')
        with open(path, 'w') as f:
            for u in sorted(self.folders):
                f.write('%s\n' % u)
        r = g.ctl('user', 'import', path, timeout=300)
        if r.rc != 0:
            raise mb.BenchError('user import: %s' % r.describe())

    def survey(self):
        """mailshiftd with the survey only (none with --survey-rate 0: the
        users imported only); returns its seconds."""
        g = self.gateway(['[sweep]', 'survey = %d'
                                    % self.a.survey_rate])
        try:
            self.add_users(g)
            if self.a.survey_rate == 0:
                return 0
            t = time.monotonic()
            while True:
                s = self.site(g)
                if s['sizes_known'] + s['sizes_estimated'] and \
                        s['sizes_estimated'] == 0:
                    break
                if time.monotonic() - t > self.a.timeout:
                    raise mb.BenchError('survey: not done: %s' % s)
                time.sleep(1)
            took = time.monotonic() - t
            self.log('survey: %d users in %.1f s; remaining %d messages, '
                     '%.1f MB (the corpus: %d, %.1f MB)'
                     % (s['sizes_known'], took, s['remaining_messages'],
                        s['remaining_bytes'] / mb.MB, len(self.index),
                        self.total_bytes / mb.MB))
            return took
        finally:
            g.stop()

    def sweep(self):
        a = self.a
        g = self.gateway([
            '[sweep]', 'enabled = yes', 'interval = 1',
            'concurrency = %d' % a.concurrency] +
            (['survey = 0'] if a.survey_rate == 0 else []))
        marks, etas = list(MARKS), {}
        try:
            t0 = time.monotonic()
            while True:
                s = self.site(g)
                now = time.monotonic() - t0
                done = s['moved_users'] / max(1, s['users'])
                while marks and done >= marks[0]:
                    etas[marks[0]] = (now, s)
                    self.log('sweep: %d%% moved after %.1f s: ETA %s s '
                             '(%s)' % (marks[0] * 100, now,
                                       s['eta_seconds'],
                                       json.dumps(s['throughput'])))
                    marks.pop(0)
                if s['remaining_users'] == 0:
                    break
                if s['failed_users']:
                    raise mb.BenchError('sweep: %d users failed: %s'
                                        % (s['failed_users'],
                                           g.log_tail()))
                if now > a.timeout:
                    raise mb.BenchError('sweep: not done after %.0f s: %s'
                                        % (now, s))
                time.sleep(0.5)
            total = time.monotonic() - t0
            self.log('sweep: every user moved in %.1f s' % total)
            self.check_sample()
            return total, etas
        finally:
            g.stop()

    def check_sample(self):
        """a.check random users compared with the source, message by
        message (bytes, flags, dates)."""
        rng = random.Random(self.a.seed + 1)
        users = rng.sample(sorted(self.folders),
                           min(self.a.check, len(self.folders)))
        for u in users:
            want = mb.fetch_snapshot(self.src.imap_port, u, mb.PASSWORD)
            got = mb.fetch_snapshot(self.dst.imap_port, u, mb.PASSWORD)
            for f, recs in want.items():
                if sorted(r[:4] for r in got.get(f, [])) != \
                        sorted(r[:4] for r in recs):
                    raise mb.BenchError('%s: %s differs on the '
                                        'destination' % (u, f))
        self.log('sweep: %d users compared with the source: the same'
                 % len(users))


def report(a, b, survey_s, total, etas, argv):
    print()
    print('site ETA: %d users, %d messages, %.1f MB; survey %.1f s; sweep '
          '(concurrency %d, connections %d) %.1f s'
          % (a.users, len(b.index), b.total_bytes / mb.MB, survey_s,
             a.concurrency, a.connections, total))
    print('| moved | after s | ETA given s | real rest s | real / ETA | '
          'measured MB/s | msg/s | copies at once | sizes known / '
          'estimated |')
    print('|---|---|---|---|---|---|---|---|---|')
    rows = []
    for mark, (at, s) in sorted(etas.items()):
        rest = total - at
        eta = s['eta_seconds']
        tp = s['throughput'] or {}
        ratio = rest / eta if eta else None
        rows.append({'mark': mark, 'at': at, 'eta': eta, 'rest': rest,
                     'ratio': ratio, 'site': s})
        print('| %d%% | %.1f | %s | %.1f | %s | %.2f | %.0f | %.1f | %d / %d |'
              % (mark * 100, at, eta, rest,
                 '%.2f' % ratio if ratio else '-',
                 tp.get('bytes_per_second', 0) / mb.MB,
                 tp.get('messages_per_second', 0), tp.get('parallel', 0),
                 s['sizes_known'], s['sizes_estimated']))
    print('command: %s' % argv)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--users', type=int, default=1000)
    p.add_argument('--median-messages', type=int, default=25,
                   help='median messages per user (default 25)')
    p.add_argument('--sigma', type=float, default=1.0,
                   help='log-normal sigma of the messages per user')
    p.add_argument('--msg-size', type=int, default=1500,
                   help='median message size in bytes (default 1500)')
    p.add_argument('--concurrency', type=int, default=8,
                   help='[sweep] concurrency (default 8)')
    p.add_argument('--connections', type=int, default=8,
                   help='[policy] connections per server (default 8)')
    p.add_argument('--survey-rate', type=int, default=6000,
                   help='[sweep] survey, users per minute, before the '
                   'sweep (default 6000; 0: no survey at all, every size '
                   'estimated from the users moved)')
    p.add_argument('--check', type=int, default=20,
                   help='users compared with the source at the end')
    p.add_argument('--seed', type=int, default=12)
    p.add_argument('--timeout', type=float, default=3600)
    p.add_argument('--workdir', default=None)
    p.add_argument('--keep', action='store_true')
    p.add_argument('--json', default=None,
                   help='also write the results to this file')
    a = p.parse_args()
    b = SiteEta(a)
    try:
        b.log('site ETA: work directory %s' % b.workdir)
        b.prepare()
        survey_s = b.survey()
        total, etas = b.sweep()
    finally:
        b.cleanup()
    rows = report(a, b, survey_s, total, etas, ' '.join(sys.argv))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'args': vars(a), 'machine': mb.machine_info(),
                       'survey_seconds': survey_s, 'sweep_seconds': total,
                       'marks': rows}, f, indent=2)
    ten = [r for r in rows if r['mark'] == MARKS[0]]
    return 0 if ten and ten[0]['ratio'] else 1


if __name__ == '__main__':
    sys.exit(main())
