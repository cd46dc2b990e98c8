"""Integration tests of `mailshiftctl migrate` (docs/cli-spec.md) against
real Dovecot servers.

Source: separator '.', Maildir++ (listescape on), special-use "Sent"
(\\Sent), "Trash" (\\Trash), "Drafts" (\\Drafts). Destination: separator
'/', LAYOUT=fs, special-use "Sent Items" (\\Sent), "Deleted Items"
(\\Trash). The standard corpus (corpus.fill_standard): nested folders
Archive, Archive.2020, Archive.2020.Q1; "Entwürfe" and "日本語" (mUTF-7);
"a/b" (contains the destination's separator: expected as "a%2Fb"); an
empty folder; an unsubscribed folder; keywords $Forwarded and project-x;
\\Seen \\Flagged \\Answered \\Draft and \\Deleted-not-expunged; dates in
1999 and 2005; a 20 MB message; messages without Message-ID; two
different messages with one Message-ID; one message stored twice.

Snapshots compare, per folder, the multiset of (sha256 of the bytes,
flags without \\Recent, INTERNALDATE).
"""

import os
import re
import subprocess
import time

import pytest

import corpus
import dovecot as dc
import mailcheck as mc
import tcpproxy
from conftest import (DST_USERS, MASTER, SRC_USERS, Migrator, Result,
                      wait_for, store_bytes,
                      store_rows)

ERR_LINE = re.compile(r'^mailshiftctl: (\S+): (.+): (.+)$')


def ok_summary(res, user=None):
    """Asserts a successful single-user JSON summary; returns it."""
    j = res.json
    assert isinstance(j, dict), 'no JSON object\n' + res.describe()
    if user is not None:
        assert j.get('user') == user, res.describe()
    assert j.get('ok') is True, res.describe()
    assert j.get('error') is None, res.describe()
    assert j.get('verified') is True, res.describe()
    return j


def sizes(imap):
    """{key: [RFC822.SIZE, ...]} of every selectable folder."""
    out = {}
    for f in mc.list_folders(imap):
        if '\\noselect' in f['attrs'] or '\\nonexistent' in f['attrs']:
            continue
        out[f['key']] = [d['RFC822.SIZE'] for d in mc.fetch_all(imap, f['name'],
                                               '(RFC822.SIZE)').values()]
    return out


def mapped_subscriptions(pair, user, dst_user=None):
    s = pair.src.imap(user)
    d = pair.dst.imap(dst_user or user)
    try:
        want = mc.map_names(mc.subscriptions(s), '/', *pair.specials(s, d))
        want |= set(pair.own_special(d))
        got = mc.subscriptions(d)
    finally:
        s.logout()
        d.logout()
    return want, got


def no_secret(secret, *blobs):
    for b in blobs:
        if isinstance(b, str):
            b = b.encode()
        assert secret.encode() not in b, \
            'the password %r appears in output or store' % secret


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize('names', ['source', 'destination'])
def test_exact_copy(pair, run_migrate, names):
    pair.names = names
    res = run_migrate('alice', expect_rc=0)
    j = ok_summary(res, 'alice')

    want, got = pair.assert_copied('alice')
    n = mc.count(want)
    assert j['copied'] == n, res.describe()

    s = pair.src.imap('alice')
    try:
        src_sizes = sizes(s)
    finally:
        s.logout()
    assert j['bytes'] == sum(sum(v) for v in src_sizes.values()), \
        res.describe()

    if names == 'destination':
        # Special-use mapping: the source's Sent/Trash mail is in the
        # destination's "Sent Items"/"Deleted Items"; no "Sent"/"Trash"
        # made.
        special = {'Sent': 'Sent Items', 'Trash': 'Deleted Items'}
        assert len(got['Sent Items']) == 3
        assert len(got['Deleted Items']) == 2
        assert 'Sent' not in got and 'Trash' not in got
    else:
        # The client's names are kept: "Sent" and "Trash" are made next
        # to the destination's own (empty) special-use folders.
        special = {'Sent': 'Sent', 'Trash': 'Trash'}
        assert len(got['Sent']) == 3 and len(got['Trash']) == 2
        assert got['Sent Items'] == [] and got['Deleted Items'] == []
    # The destination separator inside a source name is escaped.
    assert len(got['a%252Fb']) == 2, sorted(got)
    assert got['Empty'] == []
    assert len(got['Archive/2020/Q1']) == 4
    assert len(got['Entwürfe']) == 2 and len(got['日本語']) == 2

    want_sub, got_sub = mapped_subscriptions(pair, 'alice')
    assert 'Unsub' not in got_sub
    assert got_sub == want_sub

    # Per-folder report.
    folders = {f['source']: f for f in j['folders']}
    expect_dest = dict(special, **{'Archive.2020': 'Archive/2020',
                                   'a/b': 'a%2Fb', 'Entwürfe': 'Entwürfe',
                                   'Archive.2020.Q1': 'Archive/2020/Q1',
                                   'INBOX': 'INBOX'})
    for src_name, dst_name in expect_dest.items():
        assert src_name in folders, 'folder %r not in report: %s' % (
            src_name, sorted(folders))
        f = folders[src_name]
        assert f['destination'] == dst_name, f
        assert f['verified'] is True, f
        assert f['source_messages'] == f['dest_messages'], f
        assert f['source_bytes'] == f['dest_bytes'], f
    assert folders['INBOX']['source_messages'] == len(want['INBOX'])
    assert folders['Archive.2020.Q1']['source_bytes'] == \
        sum(src_sizes['Archive/2020/Q1'])
    assert sum(f['copied'] for f in j['folders']) == j['copied']


def test_second_run_copies_nothing(pair, run_migrate):
    run_migrate('alice', expect_rc=0)
    before = pair.dst_snapshot('alice', with_uids=True)
    res = run_migrate('alice', expect_rc=0)
    j = ok_summary(res, 'alice')
    assert j['copied'] == 0, res.describe()
    assert j['flags_updated'] == 0, res.describe()
    after = pair.dst_snapshot('alice', with_uids=True)
    assert after == before, 'the destination changed on a run with ' \
        'nothing to copy'
    pair.assert_copied('alice')


def test_incremental(pair, run_migrate):
    run_migrate('alice', expect_rc=0)
    s = pair.src.imap('alice')
    try:
        new = [(mc.make_message(9000 + i, 1500), ['\\Seen'] if i else [],
                corpus.D2015 + 9000 + i) for i in range(3)]
        mc.append_many(s, 'INBOX', new)
        mc.create_folder(s, 'Projects.Neu')
        mc.append_many(s, 'Projects.Neu', [
            (mc.make_message(9100 + i, 900), ['project-x'], corpus.D2005)
            for i in range(2)])
        n_new = 5
        # Flag changes on existing messages: add \Seen, remove \Flagged,
        # add a keyword.
        s.select(mc.quote_mailbox('INBOX'))
        typ, data = s.uid('SEARCH', 'UNSEEN', 'UNDELETED')
        unseen = data[0].split()
        typ, data = s.uid('SEARCH', 'FLAGGED')
        flagged = data[0].split()
        typ, data = s.uid('SEARCH', 'UNKEYWORD', '$Forwarded', 'SEEN')
        plain = data[0].split()
        assert unseen and flagged and plain
        u1, u2 = unseen[0], flagged[0]
        u3 = next(u for u in plain if u not in (u1, u2))
        assert s.uid('STORE', u1, '+FLAGS.SILENT', '(\\Seen)')[0] == 'OK'
        assert s.uid('STORE', u2, '-FLAGS.SILENT', '(\\Flagged)')[0] == 'OK'
        assert s.uid('STORE', u3, '+FLAGS.SILENT', '($Forwarded)')[0] == 'OK'
        mc.unselect(s)
        # and one in a subfolder
        s.select(mc.quote_mailbox('Archive.2020'))
        assert s.uid('STORE', '1:*', '+FLAGS.SILENT', '(project-x)')[0] \
            == 'OK'
        mc.unselect(s)
    finally:
        s.logout()

    res = run_migrate('alice', expect_rc=0)
    j = ok_summary(res, 'alice')
    assert j['copied'] == n_new, res.describe()
    assert j['flags_updated'] >= 3 + 3, res.describe()
    pair.assert_copied('alice')
    want_sub, got_sub = mapped_subscriptions(pair, 'alice')
    assert got_sub == want_sub


# Crash points of the copy (daemon/testhook.h), one killed run each, then
# a clean run: while the plan creates the destination's folders, before
# anything is copied; right after the destination saved a window whose
# intents are still open; in the middle of a window's APPEND; after windows
# were recorded; halfway through a folder's verification.
KILL_SCHEDULES = {
    'early': ['copy.folder-created:2'],
    'appended': ['copy.appended:1'],
    'midway': ['copy.mid-batch:400', 'copy.recorded:8'],
    'verify': ['copy.verify:2'],
    'repeated': ['copy.appended:3', 'copy.recorded:10', 'copy.mid-batch:50',
                 'copy.verify:1'],
}


@pytest.mark.parametrize('schedule', sorted(KILL_SCHEDULES))
def test_kill9_resume(make_pair, ctl, ctl_hooks, workdir, schedule):
    pair = make_pair(users=('bulk',))
    store = os.path.join(workdir, 'store.db')
    m = Migrator(ctl, pair, store)
    hooked = Migrator(ctl_hooks, pair, store)
    for point in KILL_SCHEDULES[schedule]:
        hooked.crash('bulk', point, '--connections', '4')
        if point.startswith('copy.folder-created'):
            # Still planning: no message copied, none about to be.
            assert store_rows(store, 'SELECT count(*) FROM messages') == \
                [(0,)]
        if point.startswith(('copy.appended', 'copy.mid-batch')):
            # Killed with messages in flight: the next run reconciles.
            assert store_rows(store, 'SELECT count(*) FROM messages WHERE '
                              'state = 0')[0][0] > 0, \
                'no intent open at ' + point
    # A run killed at any instant is simply run again: once.
    res = m.run('bulk', expect_rc=0)
    ok_summary(res, 'bulk')

    want, got = pair.snapshots('bulk')
    assert mc.count(got) == mc.count(want) == \
        sum(corpus.BULK_FOLDERS.values()) + corpus.BULK_BIG[1]
    mc.assert_snapshots_equal(want, got)

    # One more run: nothing left to do.
    res = m.run('bulk', expect_rc=0)
    assert ok_summary(res)['copied'] == 0, res.describe()


def _force_new_uidvalidity(server, user, folders):
    """Stops the server, deletes the folders' uid lists and indexes, starts
    it again: Dovecot gives the folders new UIDVALIDITYs."""
    m = server.imap(user)
    old = {}
    for f in folders:
        typ, data = m.status(mc.quote_mailbox(f), '(UIDVALIDITY MESSAGES)')
        old[f] = data[0]
    m.logout()
    server.stop()
    for f in folders:
        d = server.folder_dir(user, f)
        for name in os.listdir(d):
            if name == 'dovecot-uidlist' or name.startswith('dovecot.index'):
                os.unlink(os.path.join(d, name))
    base = server.maildir(user)
    for name in os.listdir(base):
        if name.startswith('dovecot.list.index'):
            os.unlink(os.path.join(base, name))
    # No wait for the clock: Dovecot takes a new folder's UIDVALIDITY from
    # the user's dovecot-uidvalidity counter (the last one given + 1; the
    # clock only when there is no such file), and the check below fails
    # if it did not change.
    server.start()
    m = server.imap(user)
    try:
        for f in folders:
            typ, data = m.status(mc.quote_mailbox(f), '(UIDVALIDITY MESSAGES)')
            assert data[0] != old[f], 'harness: UIDVALIDITY of %s did not ' \
                'change (%r)' % (f, data[0])
    finally:
        m.logout()


def test_uidvalidity_change(pair, run_migrate):
    run_migrate('alice', expect_rc=0)
    _force_new_uidvalidity(pair.src, 'alice', ['INBOX', 'Archive.2020'])
    res = run_migrate('alice', source=pair.src.url('imap'))
    assert res.rc == 0, res.describe()
    ok_summary(res, 'alice')
    pair.assert_copied('alice')
    # And a further run is a no-op.
    res = run_migrate('alice', source=pair.src.url('imap'), expect_rc=0)
    assert ok_summary(res)['copied'] == 0, res.describe()
    pair.assert_copied('alice')


def test_tls(make_pair, ctl, workdir, ca, wrong_ca):
    pair = make_pair(users=('smallie',))
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    # source implicit TLS, destination STARTTLS, verified with the test CA
    res = m.run('smallie', '--ca-file', ca.ca_file,
                source=pair.src.url('imaps'),
                dest=pair.dst.url('imap+starttls'), expect_rc=0)
    ok_summary(res, 'smallie')
    pair.assert_copied('smallie')

    # a CA that did not sign the servers' certificates
    for src_scheme, dst_scheme, side in (('imaps', 'imap', 'source'),
                                         ('imap', 'imap+starttls',
                                          'destination')):
        other = os.path.join(workdir, 'other-%s.db' % side)
        res = m.run('smallie', '--ca-file', wrong_ca.ca_file,
                    source=pair.src.url(src_scheme),
                    dest=pair.dst.url(dst_scheme), store=other)
        assert res.rc == 1, res.describe()
        assert 'certificate' in res.stderr.lower(), res.describe()
        assert side in res.stderr, res.describe()

    # --insecure accepts any certificate
    res = m.run('smallie', '--ca-file', wrong_ca.ca_file, '--insecure',
                source=pair.src.url('imaps'),
                dest=pair.dst.url('imap+starttls'), expect_rc=0)
    ok_summary(res, 'smallie')
    pair.assert_copied('smallie')

    # a certificate from the right CA but for another host name
    other = dc.Dovecot(os.path.join(workdir, 'othername'), 'othername',
                       users=dict(SRC_USERS),
                       tls_ca=ca.server_cert('othername', ['other.example']))
    other.start()
    try:
        res = m.run('smallie', '--ca-file', ca.ca_file,
                    source=other.url('imaps'), dest=pair.dst.url('imap'),
                    store=os.path.join(workdir, 'othername.db'))
        assert res.rc == 1, res.describe()
        assert 'source' in res.stderr, res.describe()
        assert re.search('certificate|host ?name|verif', res.stderr, re.I), \
            res.describe()
    finally:
        other.stop()

    # a plaintext-only server asked for STARTTLS: error, not a silent
    # plaintext login
    plain = dc.Dovecot(os.path.join(workdir, 'plain'), 'plain',
                       users=dict(DST_USERS), separator='/', layout='fs')
    plain.start()
    try:
        res = m.run('smallie', '--ca-file', ca.ca_file,
                    source=pair.src.url('imaps'),
                    dest=plain.url('imap+starttls'),
                    store=os.path.join(workdir, 'plain.db'))
        assert res.rc == 1, res.describe()
        assert 'destination' in res.stderr, res.describe()
    finally:
        plain.stop()


def test_wrong_password(pair, run_migrate, migrator):
    wrong = 'Wr0ng-Pa55word-zq81'
    res = run_migrate('alice', src_password=wrong)
    assert res.rc == 1, res.describe()
    assert 'login failed' in res.stderr, res.describe()
    assert 'source' in res.stderr, res.describe()
    assert ERR_LINE.match(res.stderr.strip().splitlines()[-1]), \
        res.describe()
    no_secret(wrong, res.stdout, res.stderr, store_bytes(migrator.store))
    no_secret(DST_USERS['alice'], res.stdout, res.stderr,
              store_bytes(migrator.store))
    assert res.json is not None and res.json.get('ok') is False, \
        res.describe()

    res = run_migrate('alice', dst_password=wrong)
    assert res.rc == 1, res.describe()
    assert 'login failed' in res.stderr, res.describe()
    assert 'destination' in res.stderr, res.describe()
    no_secret(wrong, res.stdout, res.stderr, store_bytes(migrator.store))
    no_secret(SRC_USERS['alice'], res.stdout, res.stderr,
              store_bytes(migrator.store))

    # A successful run does not store or print the passwords either.
    res = run_migrate('alice', expect_rc=0)
    for pw in (SRC_USERS['alice'], DST_USERS['alice']):
        no_secret(pw, res.stdout, res.stderr, store_bytes(migrator.store))


@pytest.mark.parametrize('cut_after', [64 * 1024, 2 * 1024 * 1024],
                         ids=['64K', '2M'])
def test_server_drops_connection(pair, run_migrate, cut_after):
    """A proxy in front of the source resets every connection once
    cut_after bytes came from the server, and refuses later ones."""
    proxy = tcpproxy.CuttingProxy(pair.src.imap_port, cut_after=cut_after)
    proxy.start()
    try:
        res = run_migrate('alice', source=proxy.url('imap'), timeout=60)
    finally:
        proxy.stop()
    assert proxy.cut.is_set(), 'harness: the proxy never cut (%d bytes)' \
        % proxy.bytes_down
    assert res.rc == 1, res.describe()
    last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''
    assert ERR_LINE.match(last), res.describe()
    assert re.search(r'source|connection|closed|disconnect|eof|reset',
                     last, re.I), res.describe()
    assert res.json is not None and res.json.get('ok') is False, \
        res.describe()

    res = run_migrate('alice', expect_rc=0)
    ok_summary(res, 'alice')
    pair.assert_copied('alice')


VERIFY_FETCH = b'UID FETCH 1:* (UID RFC822.SIZE FLAGS)'


@pytest.mark.parametrize('when', ['copied', 'copying'])
def test_arrival_before_verify(make_pair, ctl, workdir, when):
    """A fresh folder's source verify FETCH goes out as soon as its last
    BODY[] FETCH is answered (docs/mover.md, "Verify"). A proxy in front
    of the source holds it back while a message is appended there:
    'copied': the copy was done (the destination got its verify FETCH):
    the new message is the next run's, left out of this run's comparison;
    'copying': the destination's APPEND is held too, so the source's
    EXISTS can come before the copy ends: the copy goes on with the new
    message and the early answer, which lacks it, is not used (it would
    make the new copy look expunged on the source, and the verification
    would expunge it: mail lost). Either way nothing is expunged, and
    after the next run the destination holds every message once."""
    pair = make_pair(users=())
    s = pair.src.imap('u3')
    try:
        mc.append_many(s, 'INBOX', [
            (mc.make_message(70000 + i, 800), ['\\Seen'], corpus.D2005 + i)
            for i in range(30)])
    finally:
        s.logout()
    sproxy = tcpproxy.CuttingProxy(pair.src.imap_port, hold_at=VERIFY_FETCH)
    dproxy = tcpproxy.CuttingProxy(
        pair.dst.imap_port, keep_up=True,
        hold_at=b' APPEND ' if when == 'copying' else None)
    sproxy.start()
    dproxy.start()
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    try:
        p = m.popen('u3', '--connections', '1', '--include', 'INBOX',
                    source=sproxy.url('imap'), dest=dproxy.url('imap'))
        if when == 'copied':
            ready = lambda: VERIFY_FETCH in dproxy.up   # noqa: E731
        else:
            ready = dproxy.holding.is_set
        wait_for(lambda: (sproxy.holding.is_set() and ready()) or
                 p.poll() is not None, 60)
        assert sproxy.holding.is_set() and ready(), \
            p.communicate(timeout=60)
        s = pair.src.imap('u3')
        try:
            mc.append_many(s, 'INBOX', [(mc.make_message(70100, 900),
                                         [], corpus.D2005 + 100)])
        finally:
            s.logout()
        down = sproxy.bytes_down
        sproxy.release()
        if when == 'copying':
            # the source's answer (and EXISTS) on its way first
            wait_for(lambda: sproxy.bytes_down > down + 1000 or
                     p.poll() is not None, 60)
            dproxy.release()
        out, err = p.communicate(timeout=120)
    finally:
        sproxy.stop()
        dproxy.stop()
    res = Result(p.returncode, out.decode(), err.decode(), p.argv)
    assert res.rc == 0, res.describe()
    j = ok_summary(res, 'u3')
    assert j['expunged'] == 0, res.describe()
    assert j['copied'] == 30 if when == 'copied' else \
        j['copied'] in (30, 31), res.describe()
    d = pair.dst.imap('u3')
    try:
        assert len(mc.fetch_all(d, 'INBOX', '(RFC822.SIZE)')) == j['copied']
    finally:
        d.logout()

    res = m.run('u3', '--include', 'INBOX', expect_rc=0)
    assert ok_summary(res, 'u3')['copied'] == 31 - j['copied'], \
        res.describe()
    want, got = pair.snapshots('u3')
    mc.assert_snapshots_equal({'INBOX': want['INBOX']},
                              {'INBOX': got['INBOX']})
    assert len(got['INBOX']) == 31

def test_pop3_source(make_pair, ctl, workdir):
    pair = make_pair(users=('popper',))
    run_migrate = Migrator(ctl, pair, os.path.join(workdir, 'store.db')).run

    def inbox_bodies(server, user):
        m = server.imap(user)
        try:
            snap = mc.snapshot(m)
        finally:
            m.logout()
        return sorted(e[0] for e in snap['INBOX']), snap

    src_bodies, _ = inbox_bodies(pair.src, 'popper')
    res = run_migrate('popper', source=pair.src.url('pop3'), expect_rc=0)
    j = ok_summary(res, 'popper')
    assert j['copied'] == len(src_bodies), res.describe()
    dst_bodies, snap = inbox_bodies(pair.dst, 'popper')
    assert dst_bodies == src_bodies
    assert all(not v for k, v in snap.items() if k != 'INBOX'), \
        'POP3 source: mail outside INBOX on the destination'
    # POP3 left the source alone
    assert inbox_bodies(pair.src, 'popper')[0] == src_bodies

    s = pair.src.imap('popper')
    try:
        mc.append_many(s, 'INBOX', [(mc.make_message(600000 + i, 1000), [],
                                     corpus.D2015) for i in range(2)])
    finally:
        s.logout()
    src_bodies, _ = inbox_bodies(pair.src, 'popper')
    res = run_migrate('popper', source=pair.src.url('pop3'), expect_rc=0)
    j = ok_summary(res, 'popper')
    assert j['copied'] == 2, res.describe()
    assert inbox_bodies(pair.dst, 'popper')[0] == src_bodies

    res = run_migrate('popper', source=pair.src.url('pop3'), expect_rc=0)
    assert ok_summary(res, 'popper')['copied'] == 0, res.describe()
    assert inbox_bodies(pair.dst, 'popper')[0] == src_bodies

    # the same server over pop3s and pop3+starttls: no duplicates
    for scheme in ('pop3s', 'pop3+starttls'):
        res = run_migrate('popper', '--ca-file', pair.src.tls_ca.ca_file,
                          source=pair.src.url(scheme), expect_rc=0)
        ok_summary(res, 'popper')
        assert inbox_bodies(pair.dst, 'popper')[0] == src_bodies, scheme


def test_admin_login(make_pair, ctl, workdir):
    pair = make_pair(users=('smallie',))
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run('smallie', '--source-admin', MASTER[0],
                src_password=MASTER[1], expect_rc=0)
    ok_summary(res, 'smallie')
    pair.assert_copied('smallie')
    # both sides through the master user, a new destination mailbox
    pair.dst.add_user('smallie2', 'x-unused-pw')
    res = m.run('smallie', '--source-admin', MASTER[0], '--dest-admin',
                MASTER[0], '--dest-user', 'smallie2',
                src_password=MASTER[1], dst_password=MASTER[1],
                store=os.path.join(workdir, 'store2.db'), expect_rc=0)
    ok_summary(res, 'smallie')
    pair.assert_copied('smallie', dst_user='smallie2')
    # a wrong admin password fails the login
    res = m.run('smallie', '--source-admin', MASTER[0],
                src_password='not-the-master-pw',
                store=os.path.join(workdir, 'store3.db'))
    assert res.rc == 1 and 'login failed' in res.stderr, res.describe()


def test_include_exclude(make_pair, ctl, workdir):
    pair = make_pair(users=('smallie',))
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run('smallie', '--exclude', 'Archive*', expect_rc=0)
    ok_summary(res, 'smallie')
    want, got = pair.snapshots('smallie')
    assert not [k for k in got if k.startswith('Archive')], sorted(got)
    for k in list(want):
        if k.startswith('Archive'):
            del want[k]
    mc.assert_snapshots_equal(want, got)
    assert not [f for f in res.json['folders']
                if f['source'].startswith('Archive')], res.describe()

    # --include: only the named folders (a fresh destination mailbox)
    pair.dst.add_user('smallie2', DST_USERS['smallie'])
    res = m.run('smallie', '--include', 'INBOX', '--include', 'Archive/*',
                '--dest-user', 'smallie2',
                store=os.path.join(workdir, 'store2.db'), expect_rc=0)
    ok_summary(res, 'smallie')
    want, got = pair.snapshots('smallie', dst_user='smallie2')
    copied = {k for k, v in got.items() if v}
    assert copied == {'INBOX', 'Archive/2020', 'Archive/2020/Q1'}, \
        sorted(got)
    for k in ('INBOX', 'Archive/2020', 'Archive/2020/Q1'):
        assert sorted(got[k]) == sorted(want[k]), k
    assert 'Entwürfe' not in got and 'Empty' not in got, sorted(got)


def test_password_file_mode(pair, migrator, workdir):
    pwfile = os.path.join(workdir, 'source.pw')
    with open(pwfile, 'w') as f:
        f.write(SRC_USERS['alice'] + '\n')
    os.chmod(pwfile, 0o644)
    res = migrator.run('alice', '--source-password-file', pwfile,
                       src_password=False)
    assert res.rc in (1, 2), res.describe()
    assert res.stderr.strip(), res.describe()
    assert re.search(r'source\.pw|password.file|permission|mode|readable',
                     res.stderr, re.I), res.describe()
    no_secret(SRC_USERS['alice'], res.stdout, res.stderr)
    assert not pair.dst_snapshot('alice').get('INBOX'), \
        'mail was copied although the password file was refused'

    os.chmod(pwfile, 0o600)
    res = migrator.run('alice', '--source-password-file', pwfile,
                       src_password=False, expect_rc=0)
    ok_summary(res, 'alice')
    pair.assert_copied('alice')

    # no password source at all and no terminal: an error, not a hang
    res = migrator.run('alice', src_password=False, timeout=20,
                       store=os.path.join(workdir, 'nopw.db'))
    assert res.rc in (1, 2), res.describe()


def test_many_users(make_pair, ctl, workdir):
    users = ('u1', 'u2', 'u3')
    pair = make_pair(users=users)
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run(list(users), '--source-admin', MASTER[0], '--dest-admin',
                MASTER[0], '--connections', '2', src_password=MASTER[1],
                dst_password=MASTER[1], expect_rc=0)
    j = res.json
    assert j.get('ok') is True, res.describe()
    got_users = {u['user']: u for u in j.get('users', [])}
    assert set(got_users) == set(users), res.describe()
    for u in users:
        assert got_users[u]['ok'] is True, res.describe()
        assert got_users[u]['verified'] is True, res.describe()
        assert got_users[u]['copied'] == 15, res.describe()
        pair.assert_copied(u)


PHASES = ('queue', 'login', 'plan', 'copy', 'flags', 'verify', 'store')
PHASE_LINE = re.compile(r'mailshift info: (\S+): phases \(ms\): (.*); '
                        r'wall (\d+)$', re.M)


def check_phases(user):
    """A user's `phases` (docs/mover.md, "Phases"): every key, whole
    milliseconds >= 0, adding up to no more than its wall time (each moment
    is counted at most once) and, with nothing else on the loop for most of
    it, to most of it. Returns the phases."""
    ph = user.get('phases')
    assert isinstance(ph, dict) and sorted(ph) == sorted(PHASES), user
    for k, v in ph.items():
        assert isinstance(v, int) and v >= 0, (k, user)
    wall = user['seconds'] * 1000
    assert sum(ph.values()) <= wall + 0.001, user
    return ph


def test_phases(make_pair, ctl, workdir):
    """Where the time goes: per user and summed in --json, one -v line per
    user; three users through one connection per server queue for it."""
    users = ('u1', 'u2', 'u3')
    pair = make_pair(users=users)
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run(list(users), '-v', '--source-admin', MASTER[0],
                '--dest-admin', MASTER[0], '--connections', '1',
                src_password=MASTER[1], dst_password=MASTER[1], expect_rc=0)
    j = res.json
    assert j.get('ok') is True, res.describe()
    lines = {mo.group(1): mo for mo in PHASE_LINE.finditer(res.stderr)}
    total = dict.fromkeys(PHASES, 0)
    for u in j['users']:
        ph = check_phases(u)
        # Copied and verified: those phases took time; the ticks ran.
        assert u['copied'] == 15 and ph['copy'] + ph['verify'] > 0, u
        assert sum(ph.values()) >= 0.5 * u['seconds'] * 1000, u
        for k in PHASES:
            total[k] += ph[k]
        # The -v line says the same.
        mo = lines.get(u['user'])
        assert mo is not None, res.describe()
        logged = dict(x.rsplit(' ', 1) for x in mo.group(2).split(', '))
        assert {k: int(v) for k, v in logged.items()} == ph, mo.group(0)
    assert j.get('phases') == total, res.describe()
    # One slot per server: two of the three users waited for it.
    waited = [u['user'] for u in j['users'] if u['phases']['queue'] > 0]
    assert len(waited) >= 2, res.describe()


def test_reverse_separators(make_pair, ctl, workdir):
    """Source '/' (LAYOUT=fs), destination '.' (Maildir++): a '.' inside a
    source level is written %2E, and '%' in such a level %25; with
    --names destination, special-use folders take the destination's
    names."""
    pair = make_pair(users=(),
                     src_kw=dict(separator='/', layout='fs',
                                 special_use=corpus.DST_SPECIAL,
                                 listescape=False),
                     dst_kw=dict(separator='.', layout='maildir++',
                                 special_use={'Sent': '\\Sent',
                                              'Trash': '\\Trash'}))
    pair.names = 'destination'
    s = pair.src.imap('smallie')
    try:
        for f in ('a.b', 'x/y.z', '100%.done', '50%off', 'p/q'):
            mc.create_folder(s, f)
        for n, f in enumerate(('INBOX', 'a.b', 'x/y.z', '100%.done',
                               '50%off', 'p/q', 'Sent Items',
                               'Deleted Items')):
            mc.append_many(s, f, [(mc.make_message(7000 + 10 * n + i, 900),
                                   ['\\Seen'], corpus.D2015 + i)
                                  for i in range(2)])
    finally:
        s.logout()
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run('smallie', expect_rc=0)
    ok_summary(res, 'smallie')
    s, d = pair.src.imap('smallie'), pair.dst.imap('smallie')
    try:
        want = mc.map_snapshot(mc.snapshot(s), '.', *pair.specials(s, d))
        got = mc.snapshot(d)
        names = {f['name'] for f in mc.list_folders(d)}
    finally:
        s.logout()
        d.logout()
    mc.assert_snapshots_equal(want, got)
    for n in ('a%2Eb', 'x.y%2Ez', '100%25%2Edone', '50%off', 'p.q', 'Sent',
              'Trash'):
        assert n in names, (n, sorted(names))
    assert 'Sent Items' not in names and 'Deleted Items' not in names
    report = {f['source']: f['destination'] for f in res.json['folders']}
    assert report.get('a.b') == 'a%2Eb', report
    assert report.get('x/y.z') == 'x.y%2Ez', report
    assert report.get('Sent Items') == 'Sent', report


def test_config_file(make_pair, ctl, workdir, ca):
    """Everything from an INI file (-c): URLs, password files, CA, store,
    connections, exclude."""
    pair = make_pair(users=('smallie',))
    src_pw = os.path.join(workdir, 'src.pw')
    dst_pw = os.path.join(workdir, 'dst.pw')
    for path, pw in ((src_pw, SRC_USERS['smallie']),
                     (dst_pw, DST_USERS['smallie'])):
        with open(path, 'w') as f:
            f.write(pw + '\n')
        os.chmod(path, 0o600)
    store = os.path.join(workdir, 'cfg-store.db')
    cfg = os.path.join(workdir, 'mailshift.conf')
    with open(cfg, 'w') as f:
        f.write('[source]\nurl = %s\nuser = %%u\npassword_file = %s\n'
                'ca_file = %s\n\n'
                '[destination]\nurl = %s\npassword_file = %s\n'
                'ca_file = %s\n\n'
                '[store]\npath = %s\n\n'
                '[mover]\nconnections = 2\nexclude = Archive*\n'
                % (pair.src.url('imaps'), src_pw, ca.ca_file,
                   pair.dst.url('imap+starttls'), dst_pw, ca.ca_file, store))
    m = Migrator(ctl, pair, store)
    res = m.run('smallie', '-c', cfg, bare=True, src_password=False,
                dst_password=False, expect_rc=0)
    ok_summary(res, 'smallie')
    assert os.path.exists(store), 'the store is not where [store] path says'
    want, got = pair.snapshots('smallie')
    assert not [k for k in got if k.startswith('Archive')], sorted(got)
    mc.assert_snapshots_equal(
        {k: v for k, v in want.items() if not k.startswith('Archive')}, got)


@pytest.mark.parametrize('args', [
    [],                                        # no USER
    ['--source', 'http://127.0.0.1:1', 'smallie'],
    ['--frobnicate', 'smallie'],
    ['--dest', 'pop3://127.0.0.1:1', 'smallie'],   # POP3 is source-only
    ['--connections', 'many', 'smallie'],
], ids=['no-user', 'bad-url', 'bad-option', 'pop3-dest', 'bad-number'])
def test_usage_errors(ctl, workdir, args):
    """Usage and configuration errors: exit status 2, a message, and no
    server contacted (the URLs point at a closed port)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('MAILSHIFT_')}
    env['MAILSHIFT_SOURCE_PASSWORD'] = env['MAILSHIFT_DEST_PASSWORD'] = 'x'
    base = {'--source': 'imap://127.0.0.1:1', '--dest': 'imap://127.0.0.1:1'}
    for k in list(base):
        if k in args:
            del base[k]
    argv = [ctl, 'migrate', '--store', os.path.join(workdir, 's.db')]
    for k, v in base.items():
        argv += [k, v]
    argv += args
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=30, start_new_session=True)
    assert r.returncode == 2, (argv, r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip(), (argv, r.stdout)
