"""The mover's verification, negative: a copy is made, then the destination
is damaged by real means (IMAP to the destination Dovecot, or its Maildir
files edited on disk) and `mailshiftctl migrate --verify-only` must exit 3
naming the folder; a normal run then repairs what it copied, or fails.
Also expunges made on the source after a copy (docs/mover.md, "Verify").

Fixtures and helpers are test_mover's (conftest.py).
"""

from collections import Counter

import mailcheck as mc
from test_mover import ok_summary


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
