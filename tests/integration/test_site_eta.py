"""The site's ETA (docs/mover.md, "The site's ETA"): mailshiftd's survey
asks the source for each not-yet-moved user's mailbox size with the admin
login, and `mailshiftctl status` turns the sizes and the copies measured
into the time the site still needs: "unknown" before any copy, a number
once one was measured.

Fixtures of test_gateway.py (gpair: alice's and bob's corpora on the
source, carol with an empty mailbox) and test_gateway_ops.py's
admin_conf."""

import mailcheck as mc
from conftest import store_rows, wait_for
from test_gateway import direct
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_gateway_ops import admin_conf

USERS = ('alice', 'bob', 'carol')


def real_size(imap):
    """(messages, bytes) of every selectable folder, from each message's
    RFC822.SIZE (not STATUS: what the survey is checked against)."""
    msgs = size = 0
    for f in mc.list_folders(imap):
        if '\\noselect' in f['attrs'] or '\\nonexistent' in f['attrs']:
            continue
        got = mc.fetch_all(imap, f['name'], items='(RFC822.SIZE)')
        msgs += len(got)
        size += sum(d['RFC822.SIZE'] for d in got.values())
    return msgs, size


def surveyed(g):
    return {name: (m, b, how) for name, m, b, how in store_rows(
        g.store_path, 'SELECT name, messages, bytes, how FROM user_sizes '
        'JOIN users ON users.id = user_id')}


def site(g):
    r = g.ctl('status', '--json')
    assert r.rc == 0, r.describe()
    return r.json['site']


def test_status_eta_unknown_then_measured(gpair, make_gw, workdir):
    g = make_gw(tls=False, extra_conf=admin_conf(
        workdir, sweep=False) + '\n[sweep]\nsurvey = 600')
    for u in USERS:
        assert g.ctl('user', 'add', u).rc == 0
    real = {u: direct(gpair.src, u, real_size) for u in USERS}
    assert real['alice'][0] > 0 and real['bob'][0] > 0, real
    assert real['carol'] == (0, 0), real
    # The survey's sizes are the source's, to the byte (Dovecot offers
    # STATUS=SIZE).
    wait_for(lambda: len(surveyed(g)) == len(USERS), 60)
    sizes = surveyed(g)
    for u in USERS:
        assert sizes[u] == real[u] + ('status-size',), (u, sizes, real)

    # Nothing measured yet: no number, and said so.
    s = site(g)
    assert s['eta_seconds'] is None and s['throughput'] is None, s
    assert s['unknown'] == 'no copy measured yet', s
    assert s['remaining_users'] == 3 and s['sizes_known'] == 3, s
    assert s['sizes_estimated'] == 0, s
    assert s['remaining_messages'] == sum(m for m, b in real.values()), s
    assert s['remaining_bytes'] == sum(b for m, b in real.values()), s
    r = g.ctl('status')
    assert 'site done in: unknown, no copy measured yet (3 of 3 users ' \
        'left' in r.stdout, r.stdout

    # One user moved: the ETA is measured, for the two left.
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail()
    s = site(g)
    assert s['remaining_users'] == 2 and s['moved_users'] == 1, s
    assert s['remaining_bytes'] == real['bob'][1], s
    assert s['remaining_messages'] == real['bob'][0], s
    tp = s['throughput']
    assert tp['copies'] == 1 and tp['bytes_per_second'] > 0, s
    assert tp['messages_per_second'] > 0, s
    assert isinstance(s['eta_seconds'], int) and s['eta_seconds'] >= 0, s
    assert 'unknown' not in s, s
    r = g.ctl('status')
    assert 'site done in about ' in r.stdout, r.stdout
    assert '(2 of 3 users left' in r.stdout and 'measured ' in r.stdout, \
        r.stdout

    # Everyone moved: nothing left.
    for u in ('bob', 'carol'):
        assert g.ctl('migrate', '--daemon', u).rc == 0
        assert g.wait_state(u, ('destination', 'failed'),
                            timeout=60) == 'destination', g.log_tail()
    s = site(g)
    assert s['remaining_users'] == 0 and s['eta_seconds'] == 0, s
    assert 'site done: no user left to move' in g.ctl('status').stdout
