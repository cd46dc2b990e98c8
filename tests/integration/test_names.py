"""Folder names across the move (docs/mover.md, "Folder names"): the
source's names kept by default, the destination's special-use folders with
names = destination, a Courier-style source (every folder below "INBOX.",
no SPECIAL-USE) read through NAMESPACE, and the usual names of special-use
folders standing in for the attributes such a source does not send.

Source: separator '.', personal namespace prefix "INBOX.", capabilities
without SPECIAL-USE, no special-use folders configured. Destination: the
standard one (separator '/', "Sent Items" \\Sent, "Deleted Items"
\\Trash)."""

import os
import subprocess

import pytest

import corpus
import gateway as gwlib
import mailcheck as mc
from conftest import Migrator
from test_mover import ok_summary
from test_privileges import minimal_conf

USER = 'smallie'
# Dovecot's own list less SPECIAL-USE (and CREATE-SPECIAL-USE): a server
# that names its folders but does not mark them.
NO_SPECIAL_USE = ('imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID '
                  'ENABLE IDLE LITERAL+ MULTIAPPEND UNSELECT CHILDREN '
                  'NAMESPACE UIDPLUS LIST-EXTENDED CONDSTORE QRESYNC ESEARCH '
                  'LIST-STATUS MOVE')
# Source folder (below the prefix) -> messages in it.
FOLDERS = {'INBOX': 3, 'INBOX.Sent Messages': 2, 'INBOX.Work': 2,
           'INBOX.Work.2024': 1, 'INBOX.Deleted Items': 1, 'INBOX.Spam': 1}


@pytest.fixture
def courier(make_pair):
    """A pair whose source is Courier-style, USER's folders filled."""
    pair = make_pair(users=(), src_kw=dict(prefix='INBOX.', special_use={},
                                           listescape=False,
                                           extra_conf=NO_SPECIAL_USE))
    s = pair.src.imap(USER)
    try:
        assert 'SPECIAL-USE' not in s.capabilities
        assert s.namespace()[1][0].startswith(b'(("INBOX." ".")')
        for n, (f, count) in enumerate(sorted(FOLDERS.items())):
            if f != 'INBOX':
                mc.create_folder(s, f)
            mc.append_many(s, f, [(mc.make_message(8000 + 10 * n + i, 700),
                                   ['\\Seen'], corpus.D2015 + i)
                                  for i in range(count)])
    finally:
        s.logout()
    return pair


def expected(pair, renames):
    """The destination snapshot a copy should give: every source key
    without the "INBOX/" prefix, then renamed by renames."""
    s = pair.src.imap(USER)
    try:
        snap = mc.snapshot(s)
    finally:
        s.logout()
    out = {}
    for k, v in snap.items():
        if k != 'INBOX' and k.startswith('INBOX/'):
            k = k[len('INBOX/'):]
        out[renames.get(k, k)] = sorted(e[:3] for e in v)
    return out


def copy(ctl, pair, workdir, *args):
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run(USER, *args, expect_rc=0)
    ok_summary(res, USER)
    return m, res


def check_copied(pair, res, renames):
    want = expected(pair, renames)
    got = pair.dst_snapshot(USER)
    # The destination's own special-use folders stay as they were.
    for own in ('Sent Items', 'Deleted Items'):
        if own not in want:
            assert got.pop(own, None) == [], (own, sorted(got))
    mc.assert_snapshots_equal(want, got)
    assert not any(k.startswith('INBOX/') for k in got), sorted(got)
    report = {f['source']: f['destination'] for f in res.json['folders']}
    for src in FOLDERS:
        key = src[len('INBOX.'):] if src != 'INBOX' else src
        assert report[src] == renames.get(key, key), report


def test_source_names_kept(courier, ctl, workdir):
    """Default: the client finds every name it knew, without the source's
    "INBOX." prefix; "Deleted Items" on both sides is one folder."""
    _, res = copy(ctl, courier, workdir)
    check_copied(courier, res, {'Work.2024': 'Work/2024'})


def test_destination_names(courier, ctl, workdir):
    """--names destination: the usual names tell the special use the
    source does not mark ("Sent Messages" is \\Sent, "Spam" \\Junk), and
    those with a destination folder of that use go there."""
    _, res = copy(ctl, courier, workdir, '--names', 'destination')
    check_copied(courier, res, {'Work.2024': 'Work/2024',
                                'Sent Messages': 'Sent Items'})


def test_rollback_gives_the_prefix_back(courier, ctl, workdir):
    """A rollback puts mail made on the destination back below the
    source's "INBOX." prefix, in the folder it came from, and makes a
    folder new on the destination there too."""
    m, _ = copy(ctl, courier, workdir)
    d = courier.dst.imap(USER)
    try:
        mc.append_many(d, 'Work/2024', [(mc.make_message(8900, 600), [],
                                         corpus.D2015)])
        mc.create_folder(d, 'New')
        mc.append_many(d, 'New', [(mc.make_message(8901, 600), [],
                                   corpus.D2015)])
    finally:
        d.logout()
    res = m.run(USER, '--rollback', expect_rc=0)
    report = {f['destination']: f['source'] for f in res.json['folders']}
    assert report.get('Work/2024') == 'INBOX.Work.2024', report
    assert report.get('New') == 'INBOX.New', report
    s = courier.src.imap(USER)
    try:
        got = mc.snapshot(s)
    finally:
        s.logout()
    assert len(got['INBOX/Work/2024']) == FOLDERS['INBOX.Work.2024'] + 1
    assert len(got['INBOX/New']) == 1
    assert 'New' not in got and 'Work' not in got, sorted(got)


def test_names_setting_checked(ctl, workdir):
    """A names value that is neither source nor destination is refused by
    migrate (command line and [mover]) and by mailshiftd -t."""
    r = subprocess.run([ctl, 'migrate', '--names', 'sideways', USER],
                       capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and 'names: "sideways" is not source or ' \
        'destination' in r.stderr, r
    conf = minimal_conf(workdir, user=False)
    with open(conf, 'a') as f:
        f.write('[mover]\nnames = sideways\n')
    r = subprocess.run([ctl, 'migrate', '-c', conf, USER],
                       capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and 'names: "sideways"' in r.stderr, r
    r = subprocess.run([gwlib.MAILSHIFTD, '-t', '-c', conf],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and 'names: "sideways" is not source or ' \
        'destination' in r.stderr, r
    with open(conf) as f:
        text = f.read()
    with open(conf, 'w') as f:
        f.write(text.replace('sideways', 'destination'))
    r = subprocess.run([gwlib.MAILSHIFTD, '-t', '-c', conf],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and 'configuration ok' in r.stdout, r
