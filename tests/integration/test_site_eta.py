"""The site's ETA (docs/mover.md, "The site's ETA"): mailshiftd's survey
asks the source for each not-yet-moved user's mailbox size with the admin
login, and `mailshiftctl status` turns the sizes and the copies measured
into the time the site still needs: "unknown" before any copy, a number
once one was measured.

Fixtures of test_gateway.py (gpair: alice's and bob's corpora on the
source, carol with an empty mailbox) and test_gateway_ops.py's
admin_conf; a Dovecot without STATUS=SIZE but with QUOTA of its own."""

import os

import pytest

import gateway as gwlib
import mailcheck as mc
from conftest import dst_server, src_server, stop_all, store_rows, wait_for
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
    assert wait_for(lambda: len(surveyed(g)) == len(USERS), 60, 0.1), \
        (surveyed(g), g.log_tail())
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


def test_survey_on_with_the_sweep(gpair, make_gw, workdir):
    """No [sweep] survey: with the sweep on, the survey runs (60 a minute);
    alice failed (the sweep leaves her alone) and is still surveyed."""
    g = make_gw(tls=False, extra_conf=admin_conf(workdir))
    assert g.ctl('user', 'add', 'alice', 'state', 'failed').rc == 0
    assert wait_for(lambda: 'alice' in surveyed(g), 30, 0.1), g.log_tail()
    assert surveyed(g)['alice'] == direct(gpair.src, 'alice', real_size) + (
        'status-size',)
    assert g.state('alice') == 'failed'


# Dovecot without STATUS=SIZE (the capability list set by hand), with the
# quota plugin or not: the survey falls back to GETQUOTAROOT's STORAGE, or
# to the messages alone (the bytes then estimated).
CAPS = ('imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE '
        'LITERAL+ NAMESPACE UIDPLUS')
QUOTA_CONF = '\n'.join([
    CAPS + ' QUOTA',
    'protocol imap {', '  mail_plugins = $mail_plugins imap_quota', '}',
    'plugin {', '  quota = count:User quota', '  quota_rule = *:storage=1G',
    '  quota_vsizes = yes', '}'])


@pytest.mark.parametrize('quota', [True, False], ids=['quota', 'messages'])
def test_survey_without_status_size(workdir, ca, quota):
    users = {'alice': 'Site-alice-Pw-4k2', 'bob': 'Site-bob-Pw-9x1'}
    src = src_server(workdir, ca, users, mail_plugins='quota' if quota
                     else '', extra_conf=QUOTA_CONF if quota else CAPS)
    dst = dst_server(workdir, ca, users)
    g = None
    try:
        src.start()
        dst.start()
        m = src.imap('alice')
        try:
            mc.create_folder(m, 'Projects')
            for i in range(12):
                mc.append(m, 'INBOX' if i % 3 else 'Projects',
                          mc.make_message(i, size=700 + 300 * i))
            typ, caps = m.capability()
            caps = caps[0].decode().upper().split()
        finally:
            m.logout()
        assert 'STATUS=SIZE' not in caps and \
            ('QUOTA' in caps) == quota, ' '.join(caps)
        real = {u: direct(src, u, real_size) for u in users}
        g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), src, dst,
                             extra_conf=admin_conf(workdir, sweep=False) +
                             '\n[sweep]\nsurvey = 600')
        g.start()
        for u in users:
            assert g.ctl('user', 'add', u).rc == 0
        assert wait_for(lambda: len(surveyed(g)) == len(users), 60, 0.1), \
            (surveyed(g), g.log_tail())
        sizes = surveyed(g)
        for u in users:
            msgs, size, how = sizes[u]
            assert msgs == real[u][0], (u, sizes, real)
            if quota:
                # STORAGE is in KiB, rounded up
                assert how == 'quota', (u, sizes)
                assert real[u][1] <= size < real[u][1] + 1024, (u, sizes,
                                                                real)
            else:
                assert how == 'messages' and size == -1, (u, sizes)
        s = site(g)
        assert s['eta_seconds'] is None, s
        assert s['sizes_known'] == (2 if quota else 0), s
        assert s['sizes_messages_only'] == (0 if quota else 2), s
        # Messages only, nothing copied: no mean message size to go by.
        if not quota:
            assert s['remaining_bytes'] is None, s
            assert s['remaining_messages'] is None, s
    finally:
        if g is not None:
            g.stop()
        stop_all(src, dst)
