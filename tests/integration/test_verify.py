"""The mover's verification, negative: a copy is made, then the destination
is damaged by real means (IMAP to the destination Dovecot, or its Maildir
files edited on disk) and `mailshiftctl migrate --verify-only` must exit 3
naming the folder; a normal run then repairs what it copied, or fails.
Also expunges made on the source after a copy (docs/mover.md, "Verify").

Fixtures and helpers are test_mover's (conftest.py).
"""

import os
import re
from collections import Counter

import pytest

import corpus
import dovecot as dc
import mailcheck as mc
import storemode
from conftest import Migrator, server_snapshot
from test_mover import ERR_LINE, ok_summary


def _entries(snap):
    """{key: Counter of (sha256, flags, date)} of a snapshot (UIDs
    dropped)."""
    return {k: Counter(e[:3] for e in v) for k, v in snap.items()}


def _expunge(imap, folder, uids):
    """STORE \\Deleted on uids and EXPUNGE, as a mail client does (also
    removing what was \\Deleted before)."""
    typ, data = imap.select(mc.quote_mailbox(folder))
    assert typ == 'OK', data
    for uid in uids:
        typ, data = imap.uid('STORE', str(uid), '+FLAGS.SILENT', '(\\Deleted)')
        assert typ == 'OK', data
    typ, data = imap.expunge()
    assert typ == 'OK', data
    mc.unselect(imap)


def test_source_expunge_propagates(pair, run_migrate):
    run_migrate('alice', expect_rc=0)
    want_before, _ = pair.snapshots('alice')
    dst_before = pair.dst_snapshot('alice', with_uids=True)

    s = pair.src.imap('alice')
    try:
        inbox = mc.fetch_all(s, 'INBOX', '(UID FLAGS)')
        deleted = [u for u, d in inbox.items() if '\\Deleted' in d['FLAGS']]
        chosen = [u for u in sorted(inbox) if u not in deleted][:6:2]
        arch = sorted(mc.fetch_all(s, 'Archive.2020', '(UID)'))
        _expunge(s, 'INBOX', chosen)
        _expunge(s, 'Archive.2020', [arch[-1]])
    finally:
        s.logout()
    want_after, _ = pair.snapshots('alice')
    removed = {k: _entries(want_before)[k] - _entries(want_after).get(
        k, Counter()) for k in want_before}
    n_removed = sum(sum(c.values()) for c in removed.values())
    # The three chosen INBOX messages and those the corpus had marked
    # \Deleted (EXPUNGE takes them too), and one in Archive/2020.
    assert len(chosen) == 3 and deleted, inbox
    assert sum(removed['INBOX'].values()) == 3 + len(deleted), removed
    assert sum(removed['Archive/2020'].values()) == 1, removed
    assert n_removed == 4 + len(deleted), removed

    res = run_migrate('alice', expect_rc=0)
    j = ok_summary(res, 'alice')
    assert j['copied'] == 0 and j['flags_updated'] == 0, res.describe()
    assert j['expunged'] == n_removed, res.describe()
    per_folder = {f['destination']: f['expunged'] for f in j['folders']}
    assert per_folder['INBOX'] == 3 + len(deleted), res.describe()
    assert per_folder['Archive/2020'] == 1, res.describe()

    # The destination lost exactly those messages; every other one kept
    # its UID, bytes, flags and date.
    dst_after = pair.dst_snapshot('alice', with_uids=True)
    for key, entries in dst_before.items():
        gone = removed.get(key, Counter())
        kept = [e for e in entries if e not in dst_after[key]]
        assert Counter(e[:3] for e in kept) == gone, (key, kept, gone)
        assert all(e in entries for e in dst_after[key]), key
    pair.assert_copied('alice')

    # A third run has nothing to do.
    res = run_migrate('alice', expect_rc=0)
    j = ok_summary(res, 'alice')
    assert (j['copied'], j['flags_updated'], j['expunged']) == (0, 0, 0), \
        res.describe()
    assert pair.dst_snapshot('alice', with_uids=True) == dst_after


# ------------------------------------------------- damage to the destination

def _store_dump(path):
    """The store's rows, read-only: equal dumps, same store."""
    return storemode.rows_dump(path)


def _state(pair, m, user):
    return (server_snapshot(pair.src, user, with_uids=True),
            pair.dst_snapshot(user, with_uids=True), _store_dump(m.store))


def _pick(pair, user, folder, n=0):
    """(UID, bytes, flags, date) of the n-th message of a destination
    folder."""
    d = pair.dst.imap(user)
    try:
        msgs = mc.fetch_all(d, folder)
    finally:
        d.logout()
    uid = sorted(msgs)[n]
    return uid, msgs[uid]['BODY[]'], msgs[uid]['FLAGS'], \
        msgs[uid]['INTERNALDATE']


def _rewrite_on_disk(server, user, folder, body, new_body):
    """Puts new_body in place of the Maildir file holding body, keeping its
    UID and flags. Dovecot stores LF line ends, and the physical (S=) and
    CRLF (W=) sizes in the file name. Same size: the bytes change in place.
    Another size: a file with the new sizes in its name takes the old
    one's place, dovecot-uidlist points the UID at it, and the folder's
    index files go, so that Dovecot reads the sizes from the name again."""
    d = server.folder_dir(user, folder)
    old = body.replace(b'\r\n', b'\n')
    new = new_body.replace(b'\r\n', b'\n')
    path = None
    for sub in ('cur', 'new'):
        for name in os.listdir(os.path.join(d, sub)):
            with open(os.path.join(d, sub, name), 'rb') as f:
                if f.read() == old:
                    path = os.path.join(d, sub, name)
    assert path is not None, 'harness: no file in %s holds the message' % d
    if len(new) == len(old):
        with open(path, 'r+b') as f:
            f.write(new)
        return
    base, sep, info = os.path.basename(path).partition(':')
    stem = base.split(',')[0]
    nbase = '%s,S=%d,W=%d' % (stem, len(new), len(new) + new.count(b'\n'))
    npath = os.path.join(os.path.dirname(path), nbase + sep + info)
    with open(npath, 'wb') as f:
        f.write(new)
    os.chown(npath, dc.MAIL_UID, dc.MAIL_GID)
    os.unlink(path)
    uidlist = os.path.join(d, 'dovecot-uidlist')
    with open(uidlist) as f:
        text = f.read()
    assert ':' + base + '\n' in text, text
    with open(uidlist + '.tmp', 'w') as f:
        f.write(text.replace(':' + base + '\n', ':' + nbase + '\n'))
    os.chown(uidlist + '.tmp', dc.MAIL_UID, dc.MAIL_GID)
    os.rename(uidlist + '.tmp', uidlist)
    for name in os.listdir(d):
        if name.startswith('dovecot.index'):
            os.unlink(os.path.join(d, name))


def _expect_rewritten(pair, user, folder, uid, new_body):
    got = _pick(pair, user, folder)
    assert got[0] == uid and got[1] == new_body, \
        'harness: Dovecot does not serve the rewritten message'


def tamper_resized(pair, user):
    uid, body, flags, date = _pick(pair, user, 'Archive/2020')
    new = body.replace(b'\r\n\r\n', b'\r\nX-Tampered: yes\r\n\r\n', 1)
    _rewrite_on_disk(pair.dst, user, 'Archive/2020', body, new)
    _expect_rewritten(pair, user, 'Archive/2020', uid, new)


def tamper_altered(pair, user):
    uid, body, flags, date = _pick(pair, user, 'Archive/2020')
    assert b' body.\r\n' in body
    new = body.replace(b' body.\r\n', b' BODY.\r\n', 1)
    _rewrite_on_disk(pair.dst, user, 'Archive/2020', body, new)
    _expect_rewritten(pair, user, 'Archive/2020', uid, new)


def tamper_flag_dropped(pair, user):
    uid, body, flags, date = _pick(pair, user, 'Archive/2020')
    assert '\\Seen' in flags, flags
    d = pair.dst.imap(user)
    try:
        d.select(mc.quote_mailbox('Archive/2020'))
        typ, data = d.uid('STORE', str(uid), '-FLAGS.SILENT', '(\\Seen)')
        assert typ == 'OK', data
    finally:
        d.logout()


def _append_copy(pair, user, folder, date_shift):
    uid, body, flags, date = _pick(pair, user, folder)
    d = pair.dst.imap(user)
    try:
        mc.append(d, folder, body, [f for f in flags if f != '\\Recent'],
                  date + date_shift)
    finally:
        d.logout()


def tamper_duplicate(pair, user):
    """An exact copy (bytes, flags, INTERNALDATE) of a copied message."""
    _append_copy(pair, user, 'Entwürfe', 0)


def tamper_stray(pair, user):
    """The same bytes with another INTERNALDATE: nothing says it is ours."""
    _append_copy(pair, user, 'Entwürfe', 3600)


def tamper_folder_deleted(pair, user):
    d = pair.dst.imap(user)
    try:
        typ, data = d.delete(mc.quote_mailbox('日本語'))
        assert typ == 'OK', data
    finally:
        d.logout()


# name: (tamper, source folder, destination folder, what the mismatch says,
#        needs --verify-content, exit status of a normal run afterwards)
TAMPERS = {
    'resized': (tamper_resized, 'Archive.2020', 'Archive/2020',
                r'1 message\(s\) of another size there', False, 0),
    'altered': (tamper_altered, 'Archive.2020', 'Archive/2020',
                r'1 message\(s\) with other bytes there', True, 0),
    'flag-dropped': (tamper_flag_dropped, 'Archive.2020', 'Archive/2020',
                     r'flags differ, 1 message\(s\) with other flags', False,
                     0),
    'duplicate': (tamper_duplicate, 'Entwürfe', 'Entwürfe',
                  r'destination 3 messages.*1 destination message\(s\) no '
                  r'copy accounts for', False, 0),
    'stray': (tamper_stray, 'Entwürfe', 'Entwürfe',
              r'destination 3 messages.*1 destination message\(s\) no copy '
              r'accounts for', False, 3),
    'folder-deleted': (tamper_folder_deleted, '日本語', '日本語',
                       r'the destination folder "日本語" is missing', False, 0),
}


def assert_mismatch(res, src_folder, dst_folder, why):
    """Exit status 3; the folder named on standard error and in the JSON
    (its entry not verified, saying why); every other folder verified."""
    assert res.rc == 3, res.describe()
    last = res.stderr.strip().splitlines()[-1]
    assert ERR_LINE.match(last), res.describe()
    assert 'folder "%s": verification failed: ' % src_folder in last, \
        res.describe()
    j = res.json
    assert isinstance(j, dict), res.describe()
    assert j['ok'] is False and j['verified'] is False, res.describe()
    assert 'folder "%s"' % src_folder in j['error'], res.describe()
    bad = [f for f in j['folders'] if not f['verified']]
    assert [(f['source'], f['destination']) for f in bad] == \
        [(src_folder, dst_folder)], res.describe()
    assert re.search(why, bad[0]['mismatch']), res.describe()
    assert all(f['mismatch'] is None for f in j['folders']
               if f['verified']), res.describe()
    return j


@pytest.mark.parametrize('name', sorted(TAMPERS))
def test_damage(make_pair, ctl, workdir, name):
    tamper, src_folder, dst_folder, why, content, normal_rc = TAMPERS[name]
    pair = make_pair(users=('smallie',))
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    ok_summary(m.run('smallie', expect_rc=0), 'smallie')
    res = m.run('smallie', '--verify-only', expect_rc=0)
    assert ok_summary(res)['verify_only'] is True, res.describe()

    tamper(pair, 'smallie')
    before = _state(pair, m, 'smallie')
    opts = ['--verify-only'] + (['--verify-content'] if content else [])
    j = assert_mismatch(m.run('smallie', *opts), src_folder, dst_folder, why)
    assert j['verify_only'] is True and j['copied'] == 0, j
    # The same in the table: the folder's row and what differs.
    res = m.run('smallie', *opts, json_out=False)
    assert res.rc == 3, res.describe()
    assert re.search(r'^smallie: verify only, VERIFICATION FAILED',
                     res.stdout, re.M), res.describe()
    assert re.search(r'^  MISMATCH "%s" -> "%s": .*%s' % (
        re.escape(src_folder), re.escape(dst_folder), why), res.stdout,
        re.M), res.describe()
    assert re.search(r'^  %s\s.*\sMISMATCH$' % re.escape(src_folder),
                     res.stdout, re.M), res.describe()
    assert 'folder "%s": verification failed' % src_folder in res.stderr, \
        res.describe()
    # Nothing was mended or written, on either server or in the store.
    assert _state(pair, m, 'smallie') == before
    if content:
        # Sizes and flags alone do not see a same-size change
        # (docs/mover.md, "Verify").
        m.run('smallie', '--verify-only', expect_rc=0)

    # A normal run mends the copies it made (counted, not silent) and
    # verifies again; mail it has no record of it leaves alone.
    res = m.run('smallie', *opts[1:])
    assert res.rc == normal_rc, res.describe()
    if normal_rc == 3:
        assert_mismatch(res, src_folder, dst_folder, why)
        assert pair.dst_snapshot('smallie', with_uids=True) == before[1]
        return
    j = ok_summary(res, 'smallie')
    pair.assert_copied('smallie')
    # ... and says so: a warning naming the folder.
    assert re.search(r'warning: smallie: folder "(%s|%s)": ' % (
        re.escape(src_folder), re.escape(dst_folder)), res.stderr), \
        res.describe()
    f = {f['source']: f for f in j['folders']}[src_folder]
    if name == 'folder-deleted':
        assert f['copied'] == f['source_messages'] == 2, res.describe()
    else:
        assert j['repaired'] == f['repaired'] == 1, res.describe()
    res = m.run('smallie', '--verify-only', '--verify-content', expect_rc=0)
    ok_summary(res, 'smallie')


def test_not_copied_yet(pair, migrator):
    """Mail that reached the source after the copy, a folder made there
    since, and expunges there not carried over yet are reported, not
    compared: no mismatch, and nothing changes until a normal run."""
    migrator.run('alice', expect_rc=0)
    s = pair.src.imap('alice')
    try:
        mc.append_many(s, 'INBOX', [(mc.make_message(800000 + i, 1200), [],
                                     corpus.D2015 + i) for i in range(2)])
        mc.create_folder(s, 'Later')
        mc.append_many(s, 'Later', [(mc.make_message(800010, 900), [],
                                     corpus.D2015)])
        arch = sorted(mc.fetch_all(s, 'Archive.2020', '(UID)'))
        _expunge(s, 'Archive.2020', [arch[0]])
    finally:
        s.logout()
    before = _state(pair, migrator, 'alice')
    res = migrator.run('alice', '--verify-only', expect_rc=0)
    j = ok_summary(res, 'alice')
    f = {f['source']: f for f in j['folders']}
    assert f['INBOX']['not_copied'] == 2, res.describe()
    assert f['Later']['not_copied'] == 1, res.describe()
    assert f['Archive.2020']['expunge_pending'] == 1, res.describe()
    assert f['Archive.2020']['source_messages'] == \
        f['Archive.2020']['dest_messages'] == 2, res.describe()
    assert sum(x['not_copied'] + x['expunge_pending']
               for x in j['folders']) == 4, res.describe()
    assert _state(pair, migrator, 'alice') == before

    j = ok_summary(migrator.run('alice', expect_rc=0), 'alice')
    assert (j['copied'], j['expunged']) == (3, 1), j
    pair.assert_copied('alice')
    j = ok_summary(migrator.run('alice', '--verify-only', expect_rc=0))
    assert all(x['not_copied'] == x['expunge_pending'] == 0
               for x in j['folders']), j


def test_verify_refusals(pair, migrator, workdir):
    # A user the store never copied: an error, and nothing is made.
    before = pair.dst_snapshot('alice', with_uids=True)
    res = migrator.run('alice', '--verify-only')
    assert res.rc == 1, res.describe()
    assert 'nothing to verify' in res.stderr, res.describe()
    assert pair.dst_snapshot('alice', with_uids=True) == before
    assert not [r for r in _store_dump(migrator.store)
                if r.startswith('INSERT') and 'alice' in r]
    # Not with --rollback, nor a POP3 source: usage errors.
    for args, source in ((['--verify-only', '--rollback'], None),
                         (['--verify-content', '--rollback'], None),
                         (['--verify-only'], pair.src.url('pop3'))):
        res = migrator.run('alice', *args, source=source)
        assert res.rc == 2, res.describe()
        assert res.stderr.strip(), res.describe()
