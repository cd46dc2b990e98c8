"""Integration tests of `mailshiftctl migrate --rollback` (docs/mover.md,
"Rollback") against real Dovecot servers (fixtures in conftest.py).

A user is copied forward, then works on the destination: new mail, flag
changes, expunges, a message moved between folders, new folders. The
rollback must leave the source holding exactly what the destination holds
(bodies byte for byte, flags, INTERNALDATEs; folders named back by the
separator rule), copy only what changed, survive kill -9, and leave the
store such that a later forward copy copies nothing twice.
"""

import os
import signal
import threading

import pytest

import corpus
import gateway as gwlib
import mailcheck as mc
import tcpproxy
from conftest import (DST_USERS, SRC_USERS, Migrator, Result,
                      server_snapshot, store_bytes, store_rows, wait_for)
from test_mover import _force_new_uidvalidity as force_new_uidvalidity
from test_mover import ok_summary as mover_ok_summary

USER = 'smallie'
NEW_PARENT = 'Reisen'
NEW_FOLDER = 'Reisen/Zürich 2024'       # destination name ('/' separator)
NEW_EMPTY = 'Leer'
# A level with the destination's separator escaped: 'x/y' on the source.
NEW_ESCAPED, NEW_ESCAPED_SRC = 'x%2Fy', 'x/y'


def ok_summary(res, rollback=True):
    """A verified single-user summary, of a rollback or not."""
    j = mover_ok_summary(res, USER)
    assert bool(j.get('rollback')) is rollback, res.describe()
    return j


def snap(server, user=USER, with_uids=False):
    return server_snapshot(server, user, with_uids)


def assert_nothing_to_do(pair, m, *args):
    """A run (forward, or with --rollback in args) that finds nothing to
    do: it reports nothing copied, set or expunged and changes neither
    server."""
    before = snap(pair.src, with_uids=True), snap(pair.dst, with_uids=True)
    res = m.run(USER, *args, expect_rc=0)
    j = ok_summary(res, rollback='--rollback' in args)
    assert (j['copied'], j['flags_updated'], j['expunged']) == (0, 0, 0), \
        res.describe()
    assert (snap(pair.src, with_uids=True),
            snap(pair.dst, with_uids=True)) == before, \
        'a run with nothing to do changed a server'


def names_back(pair, user=USER):
    """{destination key: source key} for the folders the forward copy
    made (the inverse of mc.map_name); other keys map to themselves."""
    s, d = pair.src.imap(user), pair.dst.imap(user)
    try:
        src_special, dst_special = pair.specials(s, d)
        keys = [f['key'] for f in mc.list_folders(s)]
    finally:
        s.logout()
        d.logout()
    return {mc.map_name(k, '/', src_special, dst_special): k for k in keys}


@pytest.fixture
def copied(make_pair, ctl, workdir):
    """USER's corpus on a source, copied forward: (pair, migrator,
    {destination key: source key})."""
    pair = make_pair(users=(USER,))
    # The special-use folders go to the destination's and must come back
    # to the source's: the harder way back (names = source is a test of
    # its own in test_names.py).
    pair.names = 'destination'
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run(USER, expect_rc=0)
    assert res.json['copied'] > 30, res.describe()
    return pair, m, names_back(pair)


def assert_rolled_back(pair, back, user=USER):
    """The source holds what the destination holds."""
    got = snap(pair.src, user)
    want = {back.get(k, k): sorted(v) for k, v in snap(pair.dst, user).items()}
    mc.assert_snapshots_equal(want, got, what='source after the rollback')
    return want


def uid_search(m, *criteria):
    typ, data = m.uid('SEARCH', *criteria)
    assert typ == 'OK', data
    return data[0].split()


def change_destination(pair):
    """What a user does on the destination after the move. Returns the
    expected report counts."""
    d = pair.dst.imap(USER)
    try:
        # New mail in INBOX and a subfolder (one \Deleted, not expunged).
        mc.append_many(d, 'INBOX', [
            (mc.make_message(40000 + i, 700 + 300 * i),
             [['\\Seen'], [], ['$Label1', '\\Flagged'], ['\\Deleted']][i],
             corpus.D2015 + 40000 + i) for i in range(4)])
        mc.append_many(d, 'Archive/2020', [
            (mc.make_message(40100 + i, 1500, msgid=False if i else None),
             ['\\Answered'], corpus.D1999 + i) for i in range(2)])
        # A nested new folder with a non-ASCII name, and an empty one.
        mc.create_folder(d, NEW_PARENT)
        mc.create_folder(d, NEW_FOLDER)
        mc.create_folder(d, NEW_EMPTY, subscribe=False)
        mc.append_many(d, NEW_FOLDER, [
            (mc.make_message(40200 + i, 900), ['\\Seen', 'project-x'],
             corpus.D2005 + i) for i in range(3)])
        mc.append_many(d, NEW_PARENT, [
            (mc.make_message(40300, 800), [], corpus.D2015)])
        mc.create_folder(d, NEW_ESCAPED)
        mc.append_many(d, NEW_ESCAPED, [
            (mc.make_message(40310, 800), ['\\Seen'], corpus.D2015)])

        # Flags of copied messages: set and clear flags and keywords.
        d.select(mc.quote_mailbox('INBOX'))
        unseen = uid_search(d, 'UNSEEN', 'UNDELETED', 'UNFLAGGED',
                            'UNKEYWORD', '$Forwarded', 'UNKEYWORD',
                            'project-x', 'UNDRAFT')
        flagged = uid_search(d, 'FLAGGED', 'UNKEYWORD', '$Forwarded')
        fwd = uid_search(d, 'KEYWORD', '$Forwarded', 'UNFLAGGED')
        plain = uid_search(d, 'SEEN', 'UNFLAGGED', 'UNANSWERED',
                           'UNKEYWORD', '$Forwarded', 'UNDELETED')
        assert len(unseen) >= 2 and flagged and fwd and len(plain) >= 4, \
            (unseen, flagged, fwd, plain)
        changed = [unseen[0], flagged[0], fwd[0], plain[0]]
        assert len(set(changed)) == 4
        for uid, op, fl in ((unseen[0], '+FLAGS.SILENT', '(\\Seen)'),
                            (flagged[0], '-FLAGS.SILENT', '(\\Flagged)'),
                            (fwd[0], '-FLAGS.SILENT', '($Forwarded)'),
                            (plain[0], '+FLAGS.SILENT', '($Label2)')):
            assert d.uid('STORE', uid, op, fl)[0] == 'OK'
        # Expunge two copied messages, move one to another folder.
        gone = [u for u in plain[1:] if u not in changed][:2]
        moved = plain[3]
        assert len(gone) == 2 and moved not in gone + changed
        assert d.uid('STORE', b','.join(gone), '+FLAGS.SILENT',
                     '(\\Deleted)')[0] == 'OK'
        assert d.uid('EXPUNGE', b','.join(gone))[0] == 'OK'
        assert d.uid('MOVE', moved, mc.quote_mailbox('Archive'))[0] == 'OK'
        mc.unselect(d)

        d.select(mc.quote_mailbox('Archive/2020'))
        assert d.uid('STORE', '1:*', '+FLAGS.SILENT', '(project-x)')[0] \
            == 'OK'
        mc.unselect(d)
        d.select(mc.quote_mailbox('Sent Items'))
        typ, data = d.uid('SEARCH', 'ALL')
        first = data[0].split()[0]
        assert d.uid('STORE', first, '+FLAGS.SILENT', '(\\Deleted)')[0] \
            == 'OK'
        assert d.uid('EXPUNGE', first)[0] == 'OK'
        mc.unselect(d)
    finally:
        d.logout()
    return {
        # 4 + 2 new, 3 + 1 + 1 in new folders, 1 moved into Archive
        'copied': 4 + 2 + 3 + 1 + 1 + 1,
        # 2 expunged and 1 moved out of INBOX, 1 from Sent Items
        'expunged': 2 + 1 + 1,
        # 4 in INBOX, the 3 copied messages of Archive.2020
        'flags_updated': 4 + 3,
    }


def test_rollback_reverse_delta(copied):
    pair, m, back = copied
    src_before = snap(pair.src)
    expect = change_destination(pair)
    assert snap(pair.src) == src_before, 'harness: the source changed'

    res = m.run(USER, '--rollback', expect_rc=0)
    j = ok_summary(res)
    for k, n in expect.items():
        assert j[k] == n, (k, res.describe())
    folders = {f['destination']: f for f in j['folders']}
    for name in (NEW_PARENT, NEW_FOLDER, NEW_EMPTY):
        assert folders[name]['created'] is True, folders.get(name)
        assert folders[name]['verified'] is True, folders[name]
    assert folders[NEW_FOLDER]['source'] == 'Reisen.Zürich 2024'
    assert folders[NEW_ESCAPED]['source'] == NEW_ESCAPED_SRC
    assert folders[NEW_ESCAPED]['created'] is True
    back[mc.key_of(NEW_ESCAPED, '/')] = mc.key_of(NEW_ESCAPED_SRC, '.')
    assert folders[NEW_FOLDER]['copied'] == 3
    assert folders['INBOX']['created'] is False
    assert folders['INBOX']['copied'] == 4
    assert folders['INBOX']['expunged'] == 3
    assert folders['Sent Items']['source'] == 'Sent'
    assert folders['Sent Items']['expunged'] == 1
    assert folders['Archive']['copied'] == 1
    assert folders['Archive/2020']['flags_updated'] == 3
    assert sum(f['copied'] for f in j['folders']) == j['copied']
    for f in j['folders']:
        assert f['verified'] is True, f
        assert f['source_messages'] == f['dest_messages'], f
        assert f['source_bytes'] == f['dest_bytes'], f
        assert f['source_only'] == 0 and not f['destination_deleted'], f

    want = assert_rolled_back(pair, back)
    assert mc.count(want) == mc.count(src_before) + expect['copied'] - \
        expect['expunged']
    # The new folders are where a forward copy would look for them, and
    # subscribed as on the destination.
    s = pair.src.imap(USER)
    try:
        names = {f['name']: f for f in mc.list_folders(s)}
        subs = mc.subscriptions(s)
    finally:
        s.logout()
    assert 'Reisen.Zürich 2024' in names, sorted(names)
    assert NEW_FOLDER in subs and NEW_PARENT in subs, subs
    assert NEW_EMPTY not in subs, subs
    # The store: every rolled-back message is recorded done, no intent is
    # left open.
    assert store_rows(m.store, 'SELECT count(*) FROM rintents') == [(0,)]
    assert store_rows(m.store, 'SELECT count(*) FROM messages WHERE '
                      'state != 1') == [(0,)]
    assert store_rows(m.store, "SELECT state FROM users WHERE name = "
                      "'%s'" % USER) == [('source',)]
    for pw in (SRC_USERS[USER], DST_USERS[USER]):
        assert pw.encode() not in store_bytes(m.store)

    # Rolling back again changes nothing; nor does a forward copy now.
    assert_nothing_to_do(pair, m, '--rollback')
    assert_nothing_to_do(pair, m)
    pair.assert_copied(USER)

    # New mail on the source is copied forward, exactly that.
    s = pair.src.imap(USER)
    try:
        mc.append_many(s, 'INBOX', [(mc.make_message(40400, 1200),
                                     ['\\Seen'], corpus.D2015)])
        mc.append_many(s, 'Reisen.Zürich 2024', [
            (mc.make_message(40401, 1300), [], corpus.D2015)])
    finally:
        s.logout()
    res = m.run(USER, expect_rc=0)
    j = ok_summary(res, rollback=False)
    assert j['copied'] == 2, res.describe()
    pair.assert_copied(USER)


def test_rollback_kept_on_source(copied):
    """What the rollback does not mirror: a folder deleted on the
    destination stays on the source, mail that reached the source after
    the copy is kept; a destination folder with no name on the source
    stops the rollback before anything changes."""
    pair, m, back = copied
    d = pair.dst.imap(USER)
    try:
        mc.create_folder(d, 'v1.2')     # '.' is the source's separator
        mc.append_many(d, 'INBOX', [(mc.make_message(70000, 900), [],
                                     corpus.D2015)])
    finally:
        d.logout()
    src, dst = snap(pair.src, with_uids=True), snap(pair.dst, with_uids=True)
    res = m.run(USER, '--rollback')
    assert res.rc == 1, res.describe()
    assert 'folder "v1.2" on the destination has no name on the source' \
        in res.stderr, res.describe()
    assert snap(pair.src, with_uids=True) == src
    assert snap(pair.dst, with_uids=True) == dst

    d = pair.dst.imap(USER)
    try:
        assert d.delete(mc.quote_mailbox('v1.2'))[0] == 'OK'
        assert d.delete(mc.quote_mailbox('Unsub'))[0] == 'OK'
    finally:
        d.logout()
    s = pair.src.imap(USER)
    try:
        late = mc.make_message(70001, 1100)
        mc.append_many(s, 'INBOX', [(late, ['\\Seen'], corpus.D2015)])
    finally:
        s.logout()
    unsub = snap(pair.src)['Unsub']
    assert len(unsub) == 1

    res = m.run(USER, '--rollback', expect_rc=0)
    j = ok_summary(res)
    assert j['copied'] == 1, res.describe()
    folders = {f['source']: f for f in j['folders']}
    assert folders['Unsub']['destination_deleted'] is True, folders['Unsub']
    assert folders['INBOX']['source_only'] == 1, folders['INBOX']
    assert folders['INBOX']['verified'] is True
    assert folders['INBOX']['source_messages'] == \
        folders['INBOX']['dest_messages'] + 1
    # The source: the destination's mail, plus both kept as they were.
    got = snap(pair.src)
    want = {back.get(k, k): sorted(v) for k, v in snap(pair.dst).items()}
    assert got.pop('Unsub') == unsub
    late_entry = [e for e in got['INBOX'] if e not in want['INBOX']]
    assert len(late_entry) == 1 and late_entry[0][1] == ('\\Seen',)
    got['INBOX'].remove(late_entry[0])
    mc.assert_snapshots_equal(want, got, what='source after the rollback')

    # A forward copy takes both over (nothing else), then all is level.
    res = m.run(USER, expect_rc=0)
    j = ok_summary(res, rollback=False)
    assert j['copied'] == 2, res.describe()
    pair.assert_copied(USER)
    assert_nothing_to_do(pair, m, '--rollback')


def test_rollback_uidvalidity_changed(copied):
    """A destination folder got a new UIDVALIDITY after the copy: its
    records are void, so the rollback pairs messages by fingerprint and
    appends only what the source lacks."""
    pair, m, back = copied
    folder = 'Archive/2020'
    d = pair.dst.imap(USER)
    try:
        mc.append_many(d, folder, [
            (mc.make_message(80000 + i, 1000 + i), ['\\Flagged'],
             corpus.D2015 + i) for i in range(2)])
        d.select(mc.quote_mailbox(folder))
        assert d.uid('STORE', '1', '+FLAGS.SILENT', '(\\Answered)')[0] \
            == 'OK'
        mc.unselect(d)
    finally:
        d.logout()
    force_new_uidvalidity(pair.dst, USER, [folder])
    res = m.run(USER, '--rollback', expect_rc=0)
    assert 'destination UIDVALIDITY changed' in res.stderr, res.describe()
    j = ok_summary(res)
    assert j['copied'] == 2 and j['flags_updated'] == 1, res.describe()
    assert_rolled_back(pair, back)
    res = m.run(USER, expect_rc=0)
    assert ok_summary(res, rollback=False)['copied'] == 0, res.describe()
    pair.assert_copied(USER)


# One killed run per crash point (daemon/testhook.h), then a clean run: the
# run that creates the new folder on the source dies right after the CREATE;
# the next ones with part of a batch in an APPEND, with a batch the source
# saved but not yet recorded (and more in flight), with batches recorded,
# and halfway through a folder's verification.
RB_CRASHES = ('rollback.folder-created', 'rollback.mid-batch:3',
              'rollback.appended:9', 'rollback.recorded:20',
              'rollback.verify')
N_INBOX, N_SUB = 900, 500


def test_rollback_kill9_resume(copied, ctl_hooks):
    pair, m, back = copied
    d = pair.dst.imap(USER)
    try:
        mc.append_many(d, 'INBOX', [
            (mc.make_message(50000 + i, 400 + (i * 37) % 900,
                             msgid=False if i % 50 == 3 else None),
             [['\\Seen'], [], ['$Forwarded']][i % 3], corpus.D2015 + i)
            for i in range(N_INBOX)])
        mc.create_folder(d, 'Bulk/Neu')
        mc.append_many(d, 'Bulk/Neu', [
            (mc.make_message(60000 + i, 500), ['\\Seen'], corpus.D2005 + i)
            for i in range(N_SUB)])
    finally:
        d.logout()

    def done_rows():
        return store_rows(m.store, 'SELECT count(*) FROM messages '
                          'WHERE state = 1')[0][0]

    def rintents():
        return store_rows(m.store, 'SELECT count(*) FROM rintents')[0][0]

    start = done_rows()
    hooked = Migrator(ctl_hooks, pair, m.store)
    for point in RB_CRASHES:
        hooked.crash(USER, point, '--rollback', '--batch', '20')
        if point == 'rollback.folder-created':
            # Made on the source, nothing in it yet.
            assert snap(pair.src).get('Bulk/Neu') == [], \
                sorted(snap(pair.src))
        if point.startswith(('rollback.mid-batch', 'rollback.appended')):
            # Killed with messages in flight: the next run reconciles.
            assert rintents() > 0, 'no rollback intent open at ' + point
    assert done_rows() < start + N_INBOX + N_SUB, \
        'harness: the killed runs copied everything'

    res = m.run(USER, '--rollback', '--batch', '20', expect_rc=0)
    j = ok_summary(res)
    assert j['copied'] <= N_INBOX + N_SUB - 18 * 20, res.describe()
    assert_rolled_back(pair, back)
    got = snap(pair.src)
    assert len(got['INBOX']) == len(snap(pair.dst)['INBOX'])
    assert len(got['Bulk/Neu']) == N_SUB
    assert store_rows(m.store, 'SELECT count(*) FROM rintents') == [(0,)]

    # And forward: nothing to copy, nothing changed.
    assert_nothing_to_do(pair, m)
    pair.assert_copied(USER)


def test_rollback_never_copied(make_pair, ctl, workdir):
    pair = make_pair(users=(USER,))
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    src, dst = snap(pair.src, with_uids=True), snap(pair.dst, with_uids=True)

    # Unknown to the store.
    res = m.run(USER, '--rollback')
    assert res.rc == 1, res.describe()
    assert res.stderr.strip().splitlines()[-1].startswith(
        'mailshiftctl: %s: nothing to roll back' % USER), res.describe()
    assert res.json is not None and res.json['ok'] is False, res.describe()
    assert res.json['copied'] == 0
    assert store_rows(m.store, 'SELECT count(*) FROM users') == [(0,)]

    # Known (a copy that never got past the login), never copied.
    res = m.run(USER, src_password='Wr0ng-pw-zq81')
    assert res.rc == 1, res.describe()
    before = store_rows(m.store, 'SELECT state, last_error FROM users')
    assert before and before[0][0] == 'failed', before
    res = m.run(USER, '--rollback', '--no-progress')
    assert res.rc == 1, res.describe()
    assert 'nothing to roll back' in res.stderr, res.describe()
    assert store_rows(m.store, 'SELECT state, last_error FROM users') \
        == before
    assert snap(pair.src, with_uids=True) == src
    assert snap(pair.dst, with_uids=True) == dst


def test_rollback_late_append(copied, ctl_hooks):
    """A killed rollback's last complete APPEND reaches the source only
    while the next run is under way (a proxy holds it back, as a busy
    server carries out a dead client's last commands late): the next run
    finds the intents of that batch unmatched, waits before sending them
    again, and pairs them with the late messages; nothing is there twice.
    (A batch of 20 once came out duplicated this way, in a folder the
    rollback had just created on the source.)"""
    pair, m, back = copied
    d = pair.dst.imap(USER)
    try:
        mc.create_folder(d, 'Bulk/Neu')
        mc.append_many(d, 'Bulk/Neu', [
            (mc.make_message(65000 + i, 500), ['\\Seen'], corpus.D2005 + i)
            for i in range(60)])
    finally:
        d.logout()
    proxy = tcpproxy.CuttingProxy(pair.src.imap_port, hold_from=b' APPEND ')
    proxy.start()
    try:
        # Killed streaming the second batch: the first one's whole APPEND
        # is in the proxy, not on the source.
        p = Migrator(ctl_hooks, pair, m.store).popen(
            USER, '--rollback', '--batch', '20', '--connections', '1',
            source=proxy.url('imap'), crash_at='rollback.mid-batch:25')
        out, err = p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL and \
            gwlib.crash_line('rollback.mid-batch:25') in err.decode(), \
            (p.returncode, err.decode(errors='replace')[-2000:])
        # (the proxy's thread reads what the kernel took before the kill
        # in its own time: on a loaded machine after the kill)
        assert proxy.holding.wait(10)
        assert snap(pair.src).get('Bulk/Neu') == []

        # The next run; the held batch reaches the source while it waits.
        p = m.popen(USER, '--rollback', '--batch', '20')
        waiting = threading.Event()
        lines = []

        def read_stderr():
            for line in p.stderr:
                lines.append(line.decode(errors='replace'))
                if 'looking again' in lines[-1]:
                    waiting.set()

        t = threading.Thread(target=read_stderr, daemon=True)
        t.start()
        wait_for(lambda: waiting.is_set() or p.poll() is not None, 60,
                 interval=0.02)
        proxy.release()
        out = p.stdout.read()
        assert p.wait(timeout=120) == 0, ''.join(lines)
        t.join(timeout=10)
    finally:
        proxy.stop()
    got = assert_rolled_back(pair, back)
    assert len(got['Bulk/Neu']) == 60
    assert waiting.is_set(), ''.join(lines)
    j = ok_summary(Result(0, out.decode(), ''.join(lines), p.args))
    # The late batch is paired with its intents, not sent again.
    assert j['copied'] == 60 - 20, ''.join(lines)
