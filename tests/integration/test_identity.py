"""Identity on the destination (docs/mover.md, "Identity"): with Dovecot's
doveadm HTTP API on the destination, every copied folder keeps the source's
UIDVALIDITY and every message the source's UID, across expunge gaps and
incremental runs; UIDNEXT and HIGHESTMODSEQ end at least the source's.
Where that cannot be (a wrong API key, a destination folder that already
holds mail) the copy is still exact and the folder is recorded as "not
kept", counted by `mailshiftctl status`.

Real Dovecot source and destination (conftest's pair; the destination with
doveadm_http=True: its HTTP API on a loopback port with a random key).
"""

import os
import socket

import pytest

import hostileproxy
import mailcheck as mc
from conftest import Migrator, store_rows
from test_mover import _force_new_uidvalidity

USER = 'smallie'


@pytest.fixture
def idpair(make_pair):
    return make_pair(users=(USER,), dst_kw={'doveadm_http': True})


@pytest.fixture
def idmig(ctl, idpair, workdir):
    return Migrator(ctl, idpair, os.path.join(workdir, 'store.db'))


def doveadm_args(dst, key_file=None):
    return ['--dest-doveadm-url', dst.doveadm_url(),
            '--dest-doveadm-key-file', key_file or dst.doveadm_key_file]


def make_gaps(server, user):
    """Expunges some messages in every folder holding three or more (the
    second, and the last but one): gaps in the middle and near the end.
    Returns how many went."""
    m = server.imap(user)
    gone = 0
    try:
        for f in mc.list_folders(m):
            if '\\noselect' in f['attrs']:
                continue
            typ, data = m.select(mc.quote_mailbox(f['name']))
            n = int(data[0])
            if n < 3:
                continue
            m.store('2,%d' % (n - 1), '+FLAGS.SILENT', '(\\Deleted)')
            m.expunge()
            gone += 2
            m.close()
    finally:
        m.logout()
    return gone


def identity_view(server, user):
    """{folder key: (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, [(UID, sha256 of
    the bytes)...])} of every selectable folder."""
    import hashlib
    m = server.imap(user)
    out = {}
    try:
        for f in mc.list_folders(m):
            if '\\noselect' in f['attrs'] or '\\nonexistent' in f['attrs']:
                continue
            q = mc.quote_mailbox(f['name'])
            typ, data = m.status(q, '(UIDVALIDITY UIDNEXT HIGHESTMODSEQ)')
            assert typ == 'OK', data
            toks = data[0].decode().split('(', 1)[1].rstrip(')').split()
            st = dict(zip(toks[0::2], (int(x) for x in toks[1::2])))
            msgs = mc.fetch_all(m, f['name'], '(UID BODY.PEEK[])')
            uids = sorted((uid, hashlib.sha256(d['BODY[]']).hexdigest())
                          for uid, d in msgs.items())
            out[f['key']] = (st['UIDVALIDITY'], st['UIDNEXT'],
                             st.get('HIGHESTMODSEQ', 0), uids)
    finally:
        m.logout()
    return out


def assert_identity(pair, user, only=None):
    """Every source folder (or those in only) has, on the destination, the
    source's UIDVALIDITY and each message under the source's UID; UIDNEXT
    and HIGHESTMODSEQ at least the source's."""
    s = pair.src.imap(user)
    d = pair.dst.imap(user)
    try:
        sspec, dspec = pair.specials(s, d)
    finally:
        s.logout()
        d.logout()
    src, dst = identity_view(pair.src, user), identity_view(pair.dst, user)
    checked = 0
    for key, (uv, nxt, modseq, msgs) in src.items():
        if only is not None and key not in only:
            continue
        dkey = mc.map_name(key, '/', sspec, dspec)
        assert dkey in dst, 'folder %r (%r) missing' % (key, dkey)
        duv, dnxt, dmodseq, dmsgs = dst[dkey]
        assert duv == uv, '%r: UIDVALIDITY %d, source %d' % (key, duv, uv)
        assert dmsgs == msgs, '%r: UIDs differ:\n%s\n%s' % (key, msgs, dmsgs)
        assert dnxt >= nxt, '%r: UIDNEXT %d < source %d' % (key, dnxt, nxt)
        assert dmodseq >= modseq, '%r: HIGHESTMODSEQ %d < %d' % (
            key, dmodseq, modseq)
        checked += 1
    assert checked > 0
    return src


def only_folder_not_kept(idpair, idmig, folder, why):
    """Copies again with doveadm: exact, folder alone "not kept" (why in
    its reason), every other folder's identity kept. Returns the run."""
    res = idmig.run(USER, *doveadm_args(idpair.dst), expect_rc=0)
    idpair.assert_copied(USER)
    ids = folder_identity(res)
    assert ids[folder][0] == 'not kept', ids
    assert why in ids[folder][1], ids
    others = {k: v for k, v in ids.items() if k != folder}
    assert others and all(v[0] == 'kept' for v in others.values()), ids
    assert_identity(idpair, USER, only=set(others))
    return res


def folder_identity(res):
    return {f['source']: (f.get('identity'), f.get('identity_error'))
            for f in res.json['folders']}


def test_gaps_keep_uidvalidity_and_uids(idpair, idmig):
    gone = make_gaps(idpair.src, USER)
    assert gone >= 4
    res = idmig.run(USER, *doveadm_args(idpair.dst), expect_rc=0)
    assert res.json['ok'] is True, res.describe()
    idpair.assert_copied(USER)
    src = assert_identity(idpair, USER)
    # Some folder really had a gap to keep.
    assert any(len(m) >= 2 and m[-1][0] - m[0][0] >= len(m)
               for _, _, _, m in src.values())
    ids = folder_identity(res)
    assert set(v[0] for v in ids.values()) == {'kept'}, ids
    rows = store_rows(idmig.store, 'SELECT state FROM folder_identity')
    assert rows and all(r[0] == 1 for r in rows), rows

    # New mail and a new gap on the source: the next run goes on above.
    s = idpair.src.imap(USER)
    try:
        for i in range(4):
            mc.append(s, 'INBOX', mc.make_message(9000 + i, size=600))
        s.select('INBOX')
        typ, data = s.search(None, 'ALL')
        last = data[0].split()[-3].decode()
        s.store(last, '+FLAGS.SILENT', '(\\Deleted)')
        s.expunge()
    finally:
        s.logout()
    res = idmig.run(USER, *doveadm_args(idpair.dst), expect_rc=0)
    assert res.json['copied'] == 3, res.describe()
    ids = folder_identity(res)
    assert set(v[0] for v in ids.values()) == {'kept'}, res.describe()
    idpair.assert_copied(USER)
    assert_identity(idpair, USER)


def test_wrong_key_falls_back(idpair, idmig, workdir):
    bad = os.path.join(workdir, 'wrong.key')
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write('not-the-key\n')
    make_gaps(idpair.src, USER)
    res = idmig.run(USER, *doveadm_args(idpair.dst, bad), expect_rc=0)
    idpair.assert_copied(USER)
    ids = folder_identity(res)
    assert all(v[0] == 'not kept' and '401' in v[1] for v in ids.values()), \
        ids
    assert 'not kept' in res.stderr and 'API key was refused' in res.stderr
    assert 'not-the-key' not in res.stderr + res.stdout
    rows = store_rows(idmig.store, 'SELECT state, reason FROM '
                      'folder_identity')
    assert len(rows) == len(ids) and all(r[0] == 2 for r in rows), rows


def test_key_file_readable_by_others_refused(idpair, idmig, workdir):
    loose = os.path.join(workdir, 'loose.key')
    with open(loose, 'w') as f:
        f.write(idpair.dst.doveadm_key + '\n')
    os.chmod(loose, 0o644)
    res = idmig.run(USER, *doveadm_args(idpair.dst, loose), expect_rc=2)
    assert 'doveadm API key' in res.stderr and '600' in res.stderr, \
        res.describe()
    assert idpair.dst.doveadm_key not in res.stderr


def test_nonempty_destination_folder_falls_back(idpair, idmig):
    """A destination folder already holding a copy of a source message (a
    user's earlier try, say): its UIDVALIDITY cannot be set then. The
    mover pairs the message up as ever, and that folder only is "not
    kept"."""
    make_gaps(idpair.src, USER)
    s = idpair.src.imap(USER)
    try:
        one = mc.fetch_all(s, 'Archive')
    finally:
        s.logout()
    uid = min(one)
    d = idpair.dst.imap(USER)
    try:
        mc.create_folder(d, 'Archive')
        flags = [f for f in one[uid]['FLAGS'] if f.lower() != '\\recent']
        mc.append(d, 'Archive', one[uid]['BODY[]'], flags=flags,
                  date=one[uid]['INTERNALDATE'])
    finally:
        d.logout()
    only_folder_not_kept(idpair, idmig, 'Archive', 'already holds 1 message')
    n = store_rows(idmig.store, 'SELECT count(*) FROM folder_identity '
                   'WHERE state = 2')
    assert n[0][0] == 1


def test_no_doveadm_not_kept(idpair, idmig):
    """No doveadm_url: nothing is tried, no warning, and every folder is
    recorded as not kept (status counts such users)."""
    res = idmig.run(USER, expect_rc=0)
    idpair.assert_copied(USER)
    assert 'not kept' not in res.stderr
    assert all(v == (None, None) for v in folder_identity(res).values())
    rows = store_rows(idmig.store, 'SELECT state, reason FROM '
                      'folder_identity')
    assert len(rows) == len(res.json['folders']), rows
    assert all(r[0] == 2 and r[1].startswith('not tried') for r in rows), \
        rows


def test_api_down_falls_back(idpair, idmig, workdir):
    """A doveadm API that cannot be reached (nothing listens on its port):
    the copy is exact, every folder says why it is "not kept", and the
    store records it for the gateway to translate."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]       # closed again: nothing listens
    make_gaps(idpair.src, USER)
    res = idmig.run(USER, '--dest-doveadm-url',
                    'http://127.0.0.1:%d/doveadm/v1' % port,
                    '--dest-doveadm-key-file', idpair.dst.doveadm_key_file,
                    expect_rc=0)
    idpair.assert_copied(USER)
    ids = folder_identity(res)
    assert ids and all(v[0] == 'not kept' and v[1] for v in ids.values()), \
        ids
    assert 'not kept' in res.stderr, res.describe()
    rows = store_rows(idmig.store, 'SELECT state, reason FROM '
                      'folder_identity')
    assert len(rows) == len(ids) and all(r[0] == 2 and r[1] for r in rows), \
        rows


def test_source_uidvalidity_change_falls_back(idpair, idmig):
    """The source gives a copied folder a new UIDVALIDITY (recreated)
    between two passes: the next pass copies it exactly again, and that
    folder alone is "not kept" (its destination already holds the old
    copies), saying so; the others keep their identity."""
    make_gaps(idpair.src, USER)
    res = idmig.run(USER, *doveadm_args(idpair.dst), expect_rc=0)
    assert set(v[0] for v in folder_identity(res).values()) == {'kept'}
    _force_new_uidvalidity(idpair.src, USER, ['INBOX'])
    res = only_folder_not_kept(idpair, idmig, 'INBOX', 'UIDVALIDITY changed')
    assert 'INBOX' in res.stderr and 'not kept' in res.stderr


class RecreateMidPass(hostileproxy.HostileImapProxy):
    """Passes everything on, but when the server's first answer to the
    user's first body fetch in `folder` comes, holds it until recreate()
    has deleted the folder on the server and made it again with the same
    messages (Dovecot gives it a new UIDVALIDITY): the source changes in
    the middle of the mover's copy of that folder.

    every=True: the same on every connection's first body fetch in the
    folder, which then gets the answer Dovecot gives when it notices (the
    whole answer is not left to the race with Dovecot's output buffer):
    `* BYE FETCH failed: Mailbox was deleted under us`, and the connection
    closes. However often the mover opens it again, the folder has changed
    under it."""

    BYE = b'* BYE FETCH failed: Mailbox was deleted under us\r\n'

    def __init__(self, port, user, folder, recreate, every=False):
        super().__init__(port, user=user, kind='garbage',
                         trigger='body-fetch', nth=1)
        self.folder, self.recreate, self.every = folder, recreate, every
        self.times = 0

    def _command_start(self, conn, line):
        if conn.selected != self.folder:
            return
        if self.every:
            with self._lock:
                self.seen = 0   # armed again on each connection
            self.tampered.clear()
        super()._command_start(conn, line)

    def _down(self, conn):
        fr = hostileproxy._Framer()
        while not self._stop.is_set():
            data = conn.server.recv(65536)
            if not data:
                return
            out = bytearray()
            for ev in fr.feed(data):
                if ev[0] == 'line' and ev[2] and conn.armed_tag and \
                        not self.tampered.is_set() and \
                        self._is_armed_reply(conn, ev[1]):
                    self.tampered_folder = conn.armed_folder
                    self.tampered_command = conn.armed_cmd
                    self.recreate(self.folder)
                    self.times += 1
                    self.tampered.set()
                    if self.every:
                        conn.client.sendall(bytes(out) + self.BYE)
                        hostileproxy._abort(conn.client)
                        hostileproxy._abort(conn.server)
                        return
                out += ev[1]
            conn.client.sendall(out)


def recreate_folder(server, user, folder):
    """Deletes folder and makes it again with the same messages (bytes,
    flags, dates), as an admin restoring it would: a new UIDVALIDITY."""
    m = server.imap(user)
    try:
        typ, data = m.status(mc.quote_mailbox(folder), '(UIDVALIDITY)')
        old = data[0]
        msgs = mc.fetch_all(m, folder)
        assert m.delete(mc.quote_mailbox(folder))[0] == 'OK'
        mc.create_folder(m, folder)
        mc.append_many(m, folder, [
            (d['BODY[]'], [f for f in d['FLAGS'] if f.lower() != '\\recent'],
             d['INTERNALDATE']) for _, d in sorted(msgs.items())])
        typ, data = m.status(mc.quote_mailbox(folder), '(UIDVALIDITY)')
        assert data[0] != old, 'harness: UIDVALIDITY kept (%r)' % data
    finally:
        m.logout()


def _big_folder(server, folder, n=40):
    s = server.imap(USER)
    try:
        mc.create_folder(s, folder)
        mc.append_many(s, folder, [(mc.make_message(9500 + i, 2000,
                                                    subject='big %d' % i),
                                    ['\\Seen'] if i % 2 else [],
                                    1500000000 + i) for i in range(n)])
    finally:
        s.logout()


def copy_recreating(idpair, idmig, folder, every=False):
    """USER copied through a RecreateMidPass proxy that makes folder anew
    on the source (once, or every time: every): (the proxy, the result)."""
    proxy = RecreateMidPass(idpair.src.imap_port, USER, folder,
                            lambda f: recreate_folder(idpair.src, USER, f),
                            every=every)
    proxy.start()
    try:
        res = idmig.run(USER, *doveadm_args(idpair.dst),
                        source=proxy.url(), expect_rc=None)
    finally:
        proxy.stop()
    return proxy, res


def test_uidvalidity_change_mid_pass(idpair, idmig):
    """The source folder is deleted and made again (same messages, a new
    UIDVALIDITY) while the mover is fetching its messages: in that same
    run the mover opens the folder again (new connections, as after a
    lost connection), sees the new UIDVALIDITY, matches what it already
    copied by fingerprint and copies the rest, exactly (nothing lost,
    nothing twice); the folder reports the server's words and why it did
    not keep its identity (the gateway's view takes it), the other
    folders keep theirs, and the user's copy succeeds (exit 0)."""
    folder = 'Big'
    _big_folder(idpair.src, folder)
    make_gaps(idpair.src, USER)
    proxy, res = copy_recreating(idpair, idmig, folder)
    assert proxy.tampered.is_set(), 'harness: no body fetch in %s' % folder
    assert res.rc == 0, res.describe()
    assert res.json['ok'] is True, res.describe()
    # The folder's error: the server's words (Dovecot's vary with the
    # moment: "Mailbox was deleted under us", "Internal error occurred"),
    # in the report and in the log, with the reopen.
    errs = {f['source']: f.get('error') for f in res.json['folders']}
    assert errs[folder] and errs[folder].startswith('UID FETCH: '), errs
    assert 'folder "%s": %s; reconnecting (retry 1 of 3)' % (
        folder, errs[folder]) in res.stderr, res.describe()
    assert all(v is None for k, v in errs.items() if k != folder), errs
    ids = folder_identity(res)
    assert ids[folder][0] == 'not kept', ids
    assert "the source's UIDVALIDITY changed during the copy" in \
        (ids[folder][1] or ''), ids
    # Exact: the destination equals the source (multisets of bytes, flags,
    # dates per folder: a duplicate or a loss breaks it).
    want, got = idpair.assert_copied(USER)
    assert len(got[folder]) == 38, len(got[folder])   # 40 less 2 gaps
    others = {k: v for k, v in ids.items() if k != folder}
    assert others and all(v[0] == 'kept' for v in others.values()), ids
    assert_identity(idpair, USER, only=set(others))
    # The next run finds nothing to do and says the folder is not kept.
    again = idmig.run(USER, *doveadm_args(idpair.dst), expect_rc=0)
    assert again.json['copied'] == 0, again.describe()
    assert folder_identity(again)[folder][0] == 'not kept'
    idpair.assert_copied(USER)


def test_uidvalidity_changing_fails_after_retries(idpair, idmig):
    """A source folder made anew each time the mover reads it: opened
    again a bounded number of times (3), then the user fails with the
    folder and the server's words; what was copied stays exact."""
    folder = 'Big'
    _big_folder(idpair.src, folder)
    proxy, res = copy_recreating(idpair, idmig, folder, every=True)
    assert res.rc == 1, res.describe()
    assert 'retry 3 of 3' in res.stderr, res.describe()
    assert 'retry 4 of' not in res.stderr, res.describe()
    assert 'folder "%s": UID FETCH: ' % folder in res.json['error'], \
        res.describe()
    assert proxy.times == 4, proxy.times
    # A later run, the source left alone, copies exactly.
    idmig.run(USER, *doveadm_args(idpair.dst), expect_rc=0)
    idpair.assert_copied(USER)
