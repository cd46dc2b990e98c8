"""The gateway's IMAP view (docs/gateway-spec.md, "The IMAP view"): a user
moved to a destination that could not keep the folders' identity (no
doveadm configured) sees, through mailshiftd, the source's UIDVALIDITY and
UIDs in every response that carries them (SELECT codes, UID FETCH, UID
SEARCH, STATUS, APPENDUID, COPYUID) and reaches the right message with
every UID command; CONDSTORE and QRESYNC are withheld. A user whose folders
kept their identity, and a user on the source, get the plain relay.

With `[mover] names = destination`, a folder the move renamed (the
source's "Sent" is the destination's "Sent Items" here) keeps its old
name for the moved user: LIST shows the old name only, and commands that
name it reach the new folder; mbsync, which has the old name cached, runs
on without error and downloads nothing again.

Real Dovecot source and destination; Python's imaplib and mbsync as the
clients.
"""

import imaplib
import os
import re
import time

import pytest

import corpus
import gateway as gwlib
import mailcheck as mc
from conftest import SRC_USERS, wait_for
from test_retire import retire
from test_identity_clients import (CLIENTS_PRESENT, FOLDERS, GAPS, USER,
                                   Mbsync, fill, gw_conf, same_password)


def uid_subjects(m, folder):
    """{UID: Subject} of a folder, and the SELECT's untagged codes."""
    typ, _ = m.select(mc.quote_mailbox(folder))
    assert typ == 'OK'
    codes = {k: int(m.untagged_responses[k][-1])
             for k in ('UIDVALIDITY', 'UIDNEXT')}
    typ, data = m.uid('FETCH', '1:*', '(UID BODY.PEEK[HEADER.FIELDS '
                      '(SUBJECT)])')
    assert typ == 'OK', data
    out = {}
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid = int(re.search(rb'UID (\d+)', item[0]).group(1))
        out[uid] = item[1].decode().split(':', 1)[1].strip()
    return out, codes


def seen_by(server_or_conn, folders=FOLDERS):
    """{folder: ({UID: Subject}, codes)} as a connection sees it."""
    m = server_or_conn
    return {f: uid_subjects(m, f) for f in folders}


def status(m, folder):
    typ, data = m.status(mc.quote_mailbox(folder), '(UIDVALIDITY UIDNEXT)')
    assert typ == 'OK', data
    toks = data[0].decode().split('(', 1)[1].rstrip(')').split()
    return dict(zip(toks[0::2], (int(x) for x in toks[1::2])))


def uidvalidity_at(server, folder):
    """The folder's UIDVALIDITY as the server itself gives it (USER's)."""
    m = server.imap(USER)
    try:
        return status(m, folder)['UIDVALIDITY']
    finally:
        m.logout()


def code(m, name):
    """The number in the last OK's [NAME v n...] code."""
    typ, data = m.response(name)
    assert data and data[-1] is not None, (name, m.untagged_responses)
    return [int(x) for x in data[-1].split()]


def connect(g, ca):
    return imaplib.IMAP4_SSL('127.0.0.1', g.imaps_port,
                             ssl_context=ca.ssl_context(), timeout=60)


def through(g, ca):
    m = connect(g, ca)
    m.login(USER, SRC_USERS[USER])
    return m


def moved_gateway(pair, workdir, ca, doveadm, extra=()):
    fill(pair.src)
    # Dovecot's UIDVALIDITY is the folder's creation second: the
    # destination's folders come in a later one, so they differ.
    second = int(time.time())
    same_password(pair)
    assert wait_for(lambda: int(time.time()) > second, 5)
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), pair.src, pair.dst,
                         tls_ca=ca, policy='off',
                         extra_conf=gw_conf(workdir, pair.dst,
                                            doveadm=doveadm, extra=extra))
    g.start()
    return g


def move(g):
    assert g.ctl('migrate', '--daemon', USER).rc == 0
    g.wait_state(USER, ('destination',), timeout=120)


def caps(m):
    typ, data = m.capability()
    assert typ == 'OK'
    return data[0].decode().upper().split()


@pytest.fixture
def vpair(make_pair):
    """The folders of test_identity_clients, on servers alike."""
    same = dict(separator='.', layout='maildir++',
                special_use=corpus.SRC_SPECIAL, listescape=True)
    return make_pair(users=(), src_kw=same, dst_kw=dict(same,
                                                        doveadm_http=True))


def test_view_shows_source_uids(vpair, workdir, ca):
    g = moved_gateway(vpair, workdir, ca, doveadm=False)
    try:
        src = vpair.src.imap(USER)
        try:
            want = seen_by(src)
            src_status = {f: status(src, f) for f in FOLDERS}
        finally:
            src.logout()
        # On the source: the plain relay, CONDSTORE offered as it is.
        m = through(g, ca)
        assert 'CONDSTORE' in caps(m)
        m.logout()
        move(g)
        d = vpair.dst.imap(USER)
        try:
            raw = seen_by(d)
        finally:
            d.logout()
        # The destination numbered them anew: there is something to show.
        assert raw['INBOX'][1]['UIDVALIDITY'] != \
            want['INBOX'][1]['UIDVALIDITY']
        assert sorted(raw['INBOX'][0]) != sorted(want['INBOX'][0])

        m = through(g, ca)
        try:
            assert 'CONDSTORE' not in caps(m)
            assert 'QRESYNC' not in caps(m)
            typ, data = m._simple_command('ENABLE', 'CONDSTORE')
            assert typ == 'OK'
            assert not any(b'CONDSTORE' in (x or b'') for x in
                           m.untagged_responses.get('ENABLED', []))
            for f in FOLDERS:
                uids, codes = uid_subjects(m, f)
                # The same UIDs for the same messages, the same
                # UIDVALIDITY; UIDNEXT no lower than the source's.
                assert uids == want[f][0], f
                assert codes['UIDVALIDITY'] == want[f][1]['UIDVALIDITY']
                assert codes['UIDNEXT'] >= want[f][1]['UIDNEXT']
                st = status(m, f)
                assert st['UIDVALIDITY'] == src_status[f]['UIDVALIDITY']
                assert st['UIDNEXT'] >= src_status[f]['UIDNEXT']
            inbox = {s: u for u, s in want['INBOX'][0].items()}

            # A third folder: INBOX's pairs are let go, then read again.
            assert m.select('Trash')[0] == 'OK'
            m.select('INBOX')
            # UID SEARCH gives UIDs, SEARCH sequence numbers.
            typ, data = m.uid('SEARCH', 'ALL')
            assert sorted(int(x) for x in data[0].split()) == \
                sorted(want['INBOX'][0])
            typ, data = m.search(None, 'ALL')
            assert [int(x) for x in data[0].split()] == \
                list(range(1, len(want['INBOX'][0]) + 1))
            lo, hi = inbox['INBOX 5'], inbox['INBOX 12']
            typ, data = m.uid('SEARCH', 'UID', '%d:%d' % (lo, hi))
            assert sorted(int(x) for x in data[0].split()) == sorted(
                u for u in want['INBOX'][0] if lo <= u <= hi)
            # A flag set by UID lands on that message.
            u11 = inbox['INBOX 11']
            typ, data = m.uid('STORE', str(u11), '+FLAGS', '(\\Flagged)')
            assert typ == 'OK' and b'UID %d' % u11 in data[0], data
            # APPENDUID: the source's UIDVALIDITY, above its UIDNEXT.
            typ, data = m.append('INBOX', None, None,
                                 mc.make_message(9100, 600,
                                                 subject='appended'))
            assert typ == 'OK', data
            v, new = code(m, 'APPENDUID')
            assert v == want['INBOX'][1]['UIDVALIDITY']
            assert new >= want['INBOX'][1]['UIDNEXT']
            uids, _ = uid_subjects(m, 'INBOX')
            assert uids[new] == 'appended'
            # COPYUID: the source set in INBOX's view, the new one in
            # Work's.
            typ, data = m.uid('COPY', str(u11), 'Work')
            assert typ == 'OK', data
            v, srcset, dstset = m.response('COPYUID')[1][-1].split()
            assert int(v) == want['Work'][1]['UIDVALIDITY']
            assert int(srcset) == u11
            assert int(dstset) >= want['Work'][1]['UIDNEXT']
            uids, _ = uid_subjects(m, 'Work')
            assert uids[int(dstset)] == 'INBOX 11'
            # UID EXPUNGE of one message removes that one only.
            m.select('INBOX')
            u7 = inbox['INBOX 7']
            m.uid('STORE', str(u7), '+FLAGS.SILENT', '(\\Deleted)')
            typ, data = m.uid('EXPUNGE', str(u7))
            assert typ == 'OK', data
        finally:
            m.logout()
        d = vpair.dst.imap(USER)
        try:
            got = mc.fetch_all(d, 'INBOX', '(FLAGS BODY.PEEK[HEADER.FIELDS '
                               '(SUBJECT)])')
        finally:
            d.logout()
        subj = {v['BODY[HEADER.FIELDS (SUBJECT)]'].decode().split(':', 1)[1]
                .strip(): v['FLAGS'] for v in got.values()}
        assert 'INBOX 7' not in subj and 'INBOX 8' in subj
        assert [s for s, fl in subj.items() if '\\Flagged' in fl] == \
            ['INBOX 11']
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == 1, j
        assert 'IMAP view' in g.log_text()
    finally:
        g.stop()


def test_kept_identity_is_not_filtered(vpair, workdir, ca):
    """Folders that kept their identity: the server's own capabilities
    (CONDSTORE), its own numbers, no view."""
    g = moved_gateway(vpair, workdir, ca, doveadm=True)
    try:
        move(g)
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == 0, j
        m = through(g, ca)
        try:
            assert 'CONDSTORE' in caps(m)
            uids, codes = uid_subjects(m, 'INBOX')
        finally:
            m.logout()
        d = vpair.dst.imap(USER)
        try:
            assert seen_by(d, ['INBOX'])['INBOX'] == (uids, codes)
        finally:
            d.logout()
        assert 'IMAP view' not in g.log_text()
        assert sorted(uids) == [u for u in range(1, FOLDERS['INBOX'] + 1)
                                if u not in GAPS['INBOX']]
    finally:
        g.stop()


SENT = 5


@pytest.fixture
def npair(make_pair):
    """Source with "Sent", "Trash", "Drafts"; destination with "Sent
    Items" and "Deleted Items" (corpus.SRC_SPECIAL, DST_SPECIAL)."""
    kw = dict(separator='.', layout='maildir++', listescape=True)
    return make_pair(users=(), src_kw=dict(kw, special_use=corpus.SRC_SPECIAL),
                     dst_kw=dict(kw, special_use=corpus.DST_SPECIAL,
                                 doveadm_http=True))


def append_sent(s):
    """SENT messages into the source's "Sent" (connection s)."""
    mc.append_many(s, 'Sent', [(mc.make_message(9200 + i, 600,
                                                subject='sent %d' % i),
                                ['\\Seen'], 1500000000 + i)
                               for i in range(SENT)])


def local_files(client, folder):
    d = client.folder_dir(folder)
    return sorted(client.unique(fn.partition(':')[0])
                  for sub in ('cur', 'new')
                  for fn in os.listdir(os.path.join(d, sub)))


def listed(m):
    return [f['name'] for f in mc.list_folders(m)]


@CLIENTS_PRESENT
def test_old_folder_names_answered(npair, workdir, ca):
    """names = destination, identity kept (doveadm): only the names need
    the view, and the moved user's clients keep "Sent" and "Trash"."""
    s = npair.src.imap(USER)
    try:
        append_sent(s)
    finally:
        s.logout()
    g = moved_gateway(npair, workdir, ca, doveadm=True,
                      extra=['[mover]', 'names = destination'])
    try:
        mb = Mbsync(workdir, 'mbsync', g, ca)
        mb.run()
        before = local_files(mb, 'Sent')
        assert len(before) == SENT
        move(g)
        d = npair.dst.imap(USER)
        try:
            # The mover put "Sent" into the destination's "Sent Items".
            assert 'Sent' not in listed(d)
            assert mc.fetch_all(d, 'Sent Items', '(UID)').keys()
        finally:
            d.logout()

        m = through(g, ca)
        try:
            names = listed(m)
            assert 'Sent' in names and 'Trash' in names, names
            assert 'Sent Items' not in names, names
            assert 'Deleted Items' not in names, names
            # CONDSTORE stays: nothing is translated but names.
            assert 'CONDSTORE' in caps(m)
            typ, data = m.select('Sent')
            assert typ == 'OK' and int(data[0]) == SENT, data
            assert status(m, 'Sent')['UIDNEXT'] > SENT
            typ, data = m.append('Sent', '(\\Seen)', None,
                                 mc.make_message(9300, 600,
                                                 subject='sent later'))
            assert typ == 'OK', data
            typ, data = m.status('Sent', '(MESSAGES)')
            assert typ == 'OK', data
            assert re.match(rb'"?Sent"? \(MESSAGES %d\)' % (SENT + 1),
                            data[0]), data
        finally:
            m.logout()
        d = npair.dst.imap(USER)
        try:
            assert len(mc.fetch_all(d, 'Sent Items', '(UID)')) == SENT + 1
        finally:
            d.logout()
        # mbsync has "Sent" cached: on it goes, nothing downloaded again,
        # no "Sent Items" of its own.
        mb.run()
        mb.run()
        after = local_files(mb, 'Sent')
        assert set(before) <= set(after) and len(after) == SENT + 1
        assert not os.path.exists(mb.folder_dir('Sent Items'))
        assert 'IMAP view' in g.log_text()
        # Every folder kept its identity, yet the user's clients need the
        # gateway for the names: status and retire --check count them.
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == 0, j
        assert j['view_users'] == 1 and j['renamed_folders'] == 2, j
        assert 'renamed: 2 folders' in g.ctl('status').stdout
        r = retire(g, '--check', '--json')
        assert r.json['view_users'] == 1, r.describe()
        assert [w for w in r.json['warnings'] if '2 renamed' in w and
                'IMAP view' in w], r.json
    finally:
        g.stop()


# ---- a renamed folder's subtree; names as literals, quoted, mUTF-7 ----

# Source folders below the source's "Sent" (separator '.'), with the
# number of messages in each; the destination (separator '/') has "Sent
# Items" for \Sent.
SUBTREE = {'Sent.2019': 3, 'Sent.Entwürfe': 2, 'Sent.Say "hi"': 1}


@pytest.fixture
def tpair(make_pair):
    """The harness's usual pair: source '.' with "Sent", "Trash",
    "Drafts"; destination '/' (fs layout) with "Sent Items" and "Deleted
    Items"."""
    return make_pair(users=(), dst_kw=dict(doveadm_http=True))


def send_raw(m, *parts):
    """Sends a command in parts, each but the last ending in a literal's
    {n}: waits for the "+" after a synchronizing one. Returns the lines up
    to the tagged answer (literals in responses read into their line)."""
    tag = parts[0].split(b' ', 1)[0]
    for i, p in enumerate(parts):
        m.send(p)
        if i + 1 < len(parts) and not p.endswith(b'+}\r\n'):
            line = m.readline()
            assert line.startswith(b'+'), (parts, line)
    return read_tagged(m, tag)


def read_tagged(m, tag):
    lines = []
    while True:
        line = m.readline()
        assert line, lines
        lit = re.search(rb'\{(\d+)\}\r\n$', line)
        while lit:
            line += m.read(int(lit.group(1)))
            more = m.readline()
            line += more
            lit = re.search(rb'\{(\d+)\}\r\n$', more)
        lines.append(line)
        if line.startswith(tag + b' '):
            return lines


def tagged_ok(lines):
    assert lines[-1].split(b' ')[1] == b'OK', lines
    return lines


def names_of(server_or_conn, subscribed=False):
    return sorted(f['name'] for f in mc.list_folders(server_or_conn,
                                                     subscribed))


def dst_names(pair, subscribed=False):
    d = pair.dst.imap(USER)
    try:
        return names_of(d, subscribed)
    finally:
        d.logout()


@CLIENTS_PRESENT
def test_renamed_subtree_answered(tpair, workdir, ca):
    """names = destination, no doveadm: the source's "Sent" is the
    destination's "Sent Items", and its subfolders went below it ("Sent
    Items/2019"). Through the gateway the moved user finds the whole
    subtree under its old names (in the destination's separator), with the
    source's UIDVALIDITY and UIDs; every command that names a folder
    reaches the renamed one, whether the name comes as an atom, a quoted
    string with escapes, a literal (synchronizing or not) or in modified
    UTF-7; mbsync, which cached the subtree, runs on."""
    s = tpair.src.imap(USER)
    try:
        append_sent(s)
        for n, (f, count) in enumerate(sorted(SUBTREE.items())):
            mc.create_folder(s, f)
            mc.append_many(s, f, [(mc.make_message(9300 + 10 * n + i, 600,
                                                   subject='%s %d' % (f, i)),
                                   [], 1500000000 + i)
                                  for i in range(count)])
    finally:
        s.logout()
    g = moved_gateway(tpair, workdir, ca, doveadm=False,
                      extra=['[mover]', 'names = destination'])
    try:
        mb = Mbsync(workdir, 'mbsync', g, ca)
        mb.run()

        def local(f):
            # mbsync 1.4 keeps the names in modified UTF-7
            return local_files(mb, mc.mutf7_encode(f.replace('.', '/')))
        before = {f: local(f) for f in ['Sent'] + list(SUBTREE)}
        assert [len(v) for k, v in sorted(before.items())] == \
            [SENT] + [c for _, c in sorted(SUBTREE.items())], before
        src = tpair.src.imap(USER)
        try:
            want = {f: uid_subjects(src, f) for f in SUBTREE}
        finally:
            src.logout()
        move(g)

        # The mover put the subtree below the new name: no "Sent" left
        # on the destination, not even as a parent without mail.
        on_dst = dst_names(tpair)
        for f in SUBTREE:
            assert 'Sent Items/' + f.split('.', 1)[1] in on_dst, on_dst
        assert not [n for n in on_dst if n == 'Sent' or
                    n.startswith('Sent/')], on_dst

        m = through(g, ca)
        try:
            seen = names_of(m)
            for f in SUBTREE:
                assert f.replace('.', '/') in seen, seen
            assert 'Sent' in seen, seen
            assert not [n for n in seen if n.startswith('Sent Items')], seen
            # Each subfolder: the source's UIDVALIDITY and UIDs.
            for f in SUBTREE:
                uids, codes = uid_subjects(m, f.replace('.', '/'))
                assert uids == want[f][0], f
                assert codes['UIDVALIDITY'] == want[f][1]['UIDVALIDITY'], f
                assert codes['UIDNEXT'] >= want[f][1]['UIDNEXT'], f
                st = status(m, f.replace('.', '/'))
                assert st['UIDVALIDITY'] == want[f][1]['UIDVALIDITY'], f
            # A pattern below the old name.
            typ, data = m.list('""', '"Sent/*"')
            assert typ == 'OK' and len(data) == len(SUBTREE), data
            assert all(b'"Sent/' in d or b'}' in d for d in data), data

            # Names as literals: synchronizing (the gateway gives the
            # "+"), and LITERAL+; in modified UTF-7.
            lines = tagged_ok(send_raw(m, b't1 SELECT {9}\r\n',
                                       b'Sent/2019\r\n'))
            assert b'* OK [UIDVALIDITY %d]' % \
                want['Sent.2019'][1]['UIDVALIDITY'] in b''.join(lines), lines
            lines = tagged_ok(send_raw(
                m, b't2 STATUS {17+}\r\n',
                b'Sent/Entw&APw-rfe (MESSAGES UIDVALIDITY)\r\n'))
            assert b'* STATUS "Sent/Entw&APw-rfe" (MESSAGES 2 ' \
                b'UIDVALIDITY %d)' % want['Sent.Entwürfe'][1][
                    'UIDVALIDITY'] in b''.join(lines), lines
            tagged_ok(send_raw(m, b't3 CREATE {9}\r\n', b'Sent/2020\r\n'))
            tagged_ok(send_raw(m, b't4 RENAME {9}\r\n', b'Sent/2020 {9}\r\n',
                               b'Sent/2021\r\n'))
            tagged_ok(send_raw(m, b't5 SUBSCRIBE "Sent/2021"\r\n'))
            msg = mc.make_message(9400, 600, subject='appended')
            lines = tagged_ok(send_raw(m, b't6 APPEND {9}\r\n',
                                       b'Sent/2021 {%d}\r\n' % len(msg),
                                       msg + b'\r\n'))
            assert b'[APPENDUID ' in lines[-1], lines
            # A quoted string with escapes.
            lines = tagged_ok(send_raw(m, b't7 SELECT "Sent/Say \\"hi\\""'
                                       b'\r\n'))
            assert b'* 1 EXISTS' in b''.join(lines), lines
            # COPY and MOVE to old names (one as a literal).
            tagged_ok(send_raw(m, b't8 UID COPY 1:* {9}\r\n',
                               b'Sent/2021\r\n'))
            tagged_ok(send_raw(m, b't9 SELECT Sent/2019\r\n'))
            lines = tagged_ok(send_raw(m, b'u1 UID MOVE 1:* "Sent/2021"\r\n'))
            assert b'COPYUID' in b''.join(lines), lines
            subs = names_of(m, subscribed=True)
            assert 'Sent/2021' in subs, subs
            assert not [n for n in subs if n.startswith('Sent Items')], subs
        finally:
            m.logout()
        # The commands reached the renamed folders.
        assert 'Sent Items/2021' in dst_names(tpair, subscribed=True)
        d = tpair.dst.imap(USER)
        try:
            assert len(mc.fetch_all(d, 'Sent Items/2021', '(UID)')) == \
                1 + 1 + SUBTREE['Sent.2019']
            assert mc.fetch_all(d, 'Sent Items/2019', '(UID)') == {}
        finally:
            d.logout()
        m = through(g, ca)
        try:
            tagged_ok(send_raw(m, b'v1 DELETE {9}\r\n', b'Sent/2021\r\n'))
        finally:
            m.logout()
        on_dst = dst_names(tpair)
        assert 'Sent Items/2021' not in on_dst and \
            'Sent Items/2020' not in on_dst, on_dst

        # mbsync has the subtree cached under the old names: nothing
        # downloaded again, no folder of the new names (the 2019 folder
        # was emptied above: its mail left through the move).
        mb.run()
        mb.run()
        assert local_files(mb, 'Sent') == before['Sent']
        for f in ('Sent.Entwürfe', 'Sent.Say "hi"'):
            assert local(f) == before[f], f
        assert not os.path.exists(mb.folder_dir('Sent Items'))
    finally:
        g.stop()


LIST_RE = re.compile(rb'^\* (LIST|LSUB) \(([^)]*)\) (NIL|"(?:\\.|[^"])*") '
                     rb'(.*)\r\n$', re.S)


def answered(lines):
    """The names of LIST/LSUB answers (quoted, atom or literal), and the
    names of STATUS answers, from send_raw's lines."""
    names, stats = [], []
    for line in lines[:-1]:
        if line.startswith(b'* STATUS '):
            stats.append(line)
            continue
        r = LIST_RE.match(line)
        assert r, line
        n = r.group(4)
        lit = re.match(rb'\{(\d+)\}\r\n', n)
        if lit:
            n = n[lit.end():]
        elif n.startswith(b'"'):
            n = re.sub(rb'\\(.)', rb'\1', n[1:-1])
        names.append(n.decode())
    return sorted(names), stats


def imap_match(pattern, name, delim='/'):
    """RFC 3501's wildcards: "*" anything, "%" anything but delim."""
    rx = ''.join('.*' if c == '*' else '[^%s]*' % re.escape(delim)
                 if c == '%' else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name) is not None


def test_list_patterns_span_rename(tpair, workdir, ca):
    """names = destination: LIST and LSUB patterns whose wildcards span the
    renamed part ("T*" for "Trash", now "Deleted Items"; "%t" for "Sent",
    now "Sent Items"), a reference before the pattern, several patterns
    (RFC 5258) with LIST-STATUS: the answers are those the old names would
    give, exactly what the client's patterns match of the whole list it
    sees, and never a new name."""
    s = tpair.src.imap(USER)
    try:
        append_sent(s)
        mc.create_folder(s, 'Sent.2019')
    finally:
        s.logout()
    g = moved_gateway(tpair, workdir, ca, doveadm=True,
                      extra=['[mover]', 'names = destination'])
    try:
        move(g)
        m = through(g, ca)
        try:
            seen, _ = answered(tagged_ok(send_raw(m, b'a LIST "" "*"\r\n')))
            assert {'INBOX', 'Sent', 'Sent/2019', 'Trash'} <= set(seen), seen
            assert not [n for n in seen if n.startswith(('Sent Items',
                                                         'Deleted'))], seen
            for i, pat in enumerate(['*', '%', 'T*', '%t', 'Sen%', '%t/%',
                                     '*/2019', 'Sent/%', 'S*', 'Tr%', '*h',
                                     'Deleted*', 'Sent Items*', 'INBOX',
                                     'Sent', '%/%']):
                got, _ = answered(tagged_ok(send_raw(
                    m, b'p%d LIST "" "%s"\r\n' % (i, pat.encode()))))
                assert got == sorted(n for n in seen
                                     if imap_match(pat, n)), (pat, got)
            assert answered(tagged_ok(send_raw(
                m, b'b LIST "" "T*"\r\n')))[0] == ['Trash']
            assert answered(tagged_ok(send_raw(
                m, b'b LIST "" "%t/%"\r\n')))[0] == ['Sent/2019']
            # The reference goes before the pattern.
            assert answered(tagged_ok(send_raw(
                m, b'c LIST "Sent/" "%"\r\n')))[0] == ['Sent/2019']
            # Several patterns, and the STATUS of each answer.
            got, stats = answered(tagged_ok(send_raw(
                m, b'd LIST "" ("INBOX" "T*" "%t") RETURN (STATUS '
                b'(MESSAGES))\r\n')))
            assert got == ['INBOX', 'Sent', 'Trash'], got
            assert len(stats) == 3, stats
            assert [x for x in stats if x.startswith(
                b'* STATUS "Sent" (MESSAGES %d)' % SENT) or
                x.startswith(b'* STATUS Sent (MESSAGES %d)' % SENT)], stats
            # LSUB: what is subscribed, by the old names.
            tagged_ok(send_raw(m, b'e SUBSCRIBE "Trash"\r\n'))
            tagged_ok(send_raw(m, b'e SUBSCRIBE "Sent/2019"\r\n'))
            subs, _ = answered(tagged_ok(send_raw(m, b'f LSUB "" "*"\r\n')))
            assert {'Trash', 'Sent/2019'} <= set(subs), subs
            for pat in ('T*', '%t/%', '*9', '%'):
                got, _ = answered(tagged_ok(send_raw(
                    m, b'g LSUB "" "%s"\r\n' % pat.encode())))
                assert got == sorted(n for n in subs
                                     if imap_match(pat, n)), (pat, got)
        finally:
            m.logout()
    finally:
        g.stop()


def test_store_failure_ends_view_session(vpair, workdir, ca):
    """The store becomes unreadable while a moved user's session runs. The
    folders' rows were read at the login: STATUS still shows the source's
    UIDVALIDITY. A folder's pairs are read when it is selected: that
    SELECT's answer is not passed on (no destination UIDVALIDITY under
    the source's), the client gets BYE [UNAVAILABLE] and the session ends.
    A login while the rows cannot be read is refused for now. Mended, the
    next session is whole again."""
    from test_pop3_uidl import break_tables
    g = moved_gateway(vpair, workdir, ca, doveadm=False)
    try:
        move(g)
        dst_uv = uidvalidity_at(vpair.dst, 'Work')
        m = through(g, ca)
        try:
            src_uv = status(m, 'Work')['UIDVALIDITY']
            assert src_uv != dst_uv
            tagged_ok(send_raw(m, b'x0 SELECT INBOX\r\n'))
            undo = break_tables(g.store_path, ['folders', 'messages'])
            try:
                assert status(m, 'Work')['UIDVALIDITY'] == src_uv
                m.send(b'x2 SELECT Work\r\n')
                data = b''
                while True:
                    line = m.readline()
                    if not line:
                        break
                    data += line
                with pytest.raises(imaplib.IMAP4.error) as e:
                    through(g, ca)
                assert 'UNAVAILABLE' in str(e.value), e.value
            finally:
                undo()
        finally:
            m.shutdown()
        assert b'* BYE [UNAVAILABLE]' in data, data
        assert b'%d' % dst_uv not in data, data
        assert b'x2 OK' not in data, data
        assert re.search(r'IMAP view: store failed; the session ends',
                         g.log_text()), g.log_tail()
        m = through(g, ca)
        try:
            assert status(m, 'Work')['UIDVALIDITY'] == src_uv
            uids, codes = uid_subjects(m, 'Work')
            assert codes['UIDVALIDITY'] == src_uv
        finally:
            m.logout()
    finally:
        g.stop()


def test_failed_login_leaves_no_view(vpair, workdir, ca):
    """A moved user's login that the destination refuses (a wrong
    password), her rows read before it was asked: nothing of them stays
    with the connection. Its next login, another user's to the source,
    gets no view (CONDSTORE offered as it is); a third, hers, gets hers."""
    g = moved_gateway(vpair, workdir, ca, doveadm=False)
    other = 'u2' if USER != 'u2' else 'u3'
    try:
        move(g)
        src_uv = uidvalidity_at(vpair.src, 'INBOX')
        for user in (other, USER):
            m = connect(g, ca)
            with pytest.raises(imaplib.IMAP4.error):
                m.login(USER, 'not-' + SRC_USERS[USER])
            m.login(user, SRC_USERS[user])
            if user == other:
                assert 'CONDSTORE' in caps(m)
            else:
                assert 'CONDSTORE' not in caps(m)
                assert status(m, 'INBOX')['UIDVALIDITY'] == src_uv
            m.logout()
    finally:
        g.stop()


def test_api_down_falls_back_to_view(vpair, workdir, ca):
    """The gateway's doveadm API cannot be reached during the move: each
    folder says why its identity was not kept, the copy is exact, and the
    moved user's sessions get the view (the source's UIDVALIDITY and UIDs)
    rather than failing."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]       # closed again: nothing listens
    fill(vpair.src)
    src = vpair.src.imap(USER)
    try:
        want = seen_by(src)
    finally:
        src.logout()
    second = int(time.time())
    same_password(vpair)
    assert wait_for(lambda: int(time.time()) > second, 5)
    conf = gw_conf(workdir, vpair.dst, doveadm=True).replace(
        vpair.dst.doveadm_url(), 'http://127.0.0.1:%d/doveadm/v1' % port)
    assert ':%d/' % port in conf
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), vpair.src, vpair.dst,
                         tls_ca=ca, policy='off', extra_conf=conf)
    g.start()
    try:
        move(g)
        vpair.assert_copied(USER)
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == 1, j
        assert j['identity_not_kept_folders'] >= len(FOLDERS), j
        for f in FOLDERS:
            assert re.search(r'folder "%s": UIDVALIDITY and UIDs not kept: '
                             r'.+; the gateway must translate them' % f,
                             g.log_text()), g.log_tail()
        m = through(g, ca)
        try:
            assert 'CONDSTORE' not in caps(m)
            for f in FOLDERS:
                uids, codes = uid_subjects(m, f)
                assert uids == want[f][0], f
                assert codes['UIDVALIDITY'] == want[f][1]['UIDVALIDITY'], f
        finally:
            m.logout()
    finally:
        g.stop()
