#!/usr/bin/python3
"""What the servers themselves spend on the site row's two workloads
(bench/README.md, "The site row"): the CPU seconds of the source and the
destination Dovecot (master and everything under it) for each kind of
command a copy sends, over all site users' folders (40 x 20) and over the
one user's (20), one command after another on one connection per user.
No mailshift here: this is the part of the site row no client can take
away. Not part of make check; run as root (Dovecot stores mail as uid
65534).

    bench/site_server_cost.py [--site-users 40] [--site-messages 400]
                              [--site-folders 20] [--seed N]
"""
import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mover_bench as mb   # noqa: E402

Q = mb.imap_quote

# The source: commands per folder (@F@: the folder), after LOGIN.
SRC_OPS = [
    ('STATUS (MESSAGES)', [b'STATUS @F@ (MESSAGES)']),
    ('EXAMINE', [b'EXAMINE @F@']),
    ('EXAMINE (CONDSTORE)', [b'EXAMINE @F@ (CONDSTORE)']),
    ('EXAMINE, metadata FETCH',
     [b'EXAMINE @F@', b'FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)']),
    ('EXAMINE, verify FETCH',
     [b'EXAMINE @F@', b'UID FETCH 1:* (UID RFC822.SIZE FLAGS)']),
    ('EXAMINE, BODY[] FETCH',
     [b'EXAMINE @F@', b'UID FETCH 1:* (UID BODY.PEEK[])']),
]

# The destination (a new Dovecot each): how far each folder goes.
DST_OPS = ['LOGIN only', 'CREATE', 'CREATE, SELECT',
           'CREATE, APPEND (no SELECT)', 'CREATE, SELECT, APPEND',
           'CREATE, SELECT, APPEND, verify FETCH']


def src_cost(b, users, steps):
    b.fresh_source()
    c0 = mb.tree_cpu(b.src.pid)
    for u in users:
        c = mb.Imap(b.src.imap_port)
        c.login(u, mb.PASSWORD)
        for f in b.folders:
            for s in steps:
                c.command(s.replace(b'@F@', Q(f)))
        c.command(b'LOGOUT')
        c.close()
    return mb.tree_cpu(b.src.pid) - c0


def list_status_cost(b, users):
    b.fresh_source()
    c0 = mb.tree_cpu(b.src.pid)
    for u in users:
        c = mb.Imap(b.src.imap_port)
        c.login(u, mb.PASSWORD)
        c.command(b'LIST "" "*" RETURN (STATUS (MESSAGES))')
        c.command(b'LOGOUT')
        c.close()
    return mb.tree_cpu(b.src.pid) - c0


def dst_cost(b, op, users, msgs_of, data):
    d = b.server('cost-dst')
    c0 = mb.tree_cpu(d.pid)
    for u in users:
        c = mb.Imap(d.imap_port)
        c.login(u, mb.PASSWORD)
        byf = collections.defaultdict(list)
        for m in msgs_of(u):
            byf[m['folder']].append(m)
        for f in b.folders if op != 'LOGIN only' else []:
            if f.upper() != 'INBOX':
                c.command(b'CREATE ' + Q(f))
            if 'SELECT' in op:
                c.command(b'SELECT ' + Q(f))
            if 'APPEND' in op:
                mb.append_folder(c, f, byf[f], data, 100, 4)
            if 'verify' in op:
                c.command(b'UID FETCH 1:* (UID RFC822.SIZE FLAGS)')
        c.command(b'LOGOUT')
        c.close()
    cpu = mb.tree_cpu(d.pid) - c0
    b.drop(d)
    return cpu


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--site-users', type=int, default=40)
    p.add_argument('--site-messages', type=int, default=400)
    p.add_argument('--site-folders', type=int, default=20)
    p.add_argument('--seed', type=int, default=20240501)
    a = p.parse_args()
    if os.geteuid() != 0:
        p.error('must run as root (Dovecot stores mail as uid 65534)')
    a.workdir, a.keep = None, False
    b = mb.SiteBench(a)
    rows = []
    try:
        b.prepare()
        many = [mb.site_user(i) for i in range(a.site_users)]
        one = [mb.SITE_ONE]
        for name, steps in SRC_OPS:
            rows.append(('source', name, src_cost(b, many, steps),
                         src_cost(b, one, steps)))
        rows.append(('source', 'LIST RETURN (STATUS) per user',
                     list_status_cost(b, many), list_status_cost(b, one)))
        with open(os.path.join(b.workdir, 'site.bin'), 'rb') as f:
            data = f.read()
        by = collections.defaultdict(list)
        for m in b.index:
            by[m['user']].append(m)
        for op in DST_OPS:
            rows.append(('destination', op,
                         dst_cost(b, op, many, lambda u: by[u], data),
                         dst_cost(b, op, one, lambda u: b.index, data)))
    finally:
        b.cleanup()
    print()
    print('server CPU seconds: %d users x %d folders against 1 user x %d '
          'folders, the same %d messages' % (a.site_users, len(b.folders),
                                             len(b.folders), len(b.index)))
    print('%-12s %-38s %8s %8s' % ('server', 'per folder', 'many', 'one'))
    for side, name, many_cpu, one_cpu in rows:
        print('%-12s %-38s %8.2f %8.2f' % (side, name, many_cpu, one_cpu))
    return 0


if __name__ == '__main__':
    mb.T0 = time.monotonic()
    sys.exit(main())
