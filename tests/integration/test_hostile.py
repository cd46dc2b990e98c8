"""A malformed or hostile server response (docs/mover.md, "Failure
behaviour"): it ends that user's copy with a clear error that names the
folder and the command; nothing already copied is lost or duplicated;
other users' copies go on.

A man-in-the-middle (tests/lib/hostileproxy.py) sits in front of one of
the real Dovecots and, on eve's connections only, replaces one reply with
hostile bytes: the source's reply to a body fetch (`UID FETCH ...
BODY.PEEK[]`), or the destination's reply to an APPEND. alice is copied in
the same run through the same proxy and must come out complete and
verified. A second run for eve straight against the real servers (same
store) must then finish the copy exactly: every message once, and every
message the failed run had already put on the destination kept (same UID).

Both users log in through the master user (--source-admin/--dest-admin),
as in test_many_users; eve exists on both servers with a small corpus
(fill_eve) made in the test.
"""

import collections
import os
import re

import pytest

import corpus
import hostileproxy
import mailcheck as mc
from conftest import (DST_USERS, MASTER, SRC_USERS, Migrator, Pair,
                      _install_maildirs, dst_server, src_server, stop_all)

EVE = 'eve'
OTHER = 'alice'
ERR_LINE = re.compile(r'^mailshiftctl: (\S+): (.+): (.+)$')
FOLDER_RE = re.compile(r'folder "((?:[^"\\]|\\.)*)"')
RUN_TIMEOUT = 40        # a hang is a failure (with a backtrace), not a wait

# eve's source folders ('.' separator) and their destination names ('/'
# separator; the source's \Sent "Sent" is the destination's "Sent Items").
EVE_FOLDERS = {'INBOX': 'INBOX', 'Work': 'Work', 'Work.2024': 'Work/2024',
               'Sent': 'Sent Items'}

# What the error must say, per kind of hostile reply (hostileproxy.KINDS).
REASONS = {
    'long_line': r'malformed response: line too long',
    'huge_literal': r'malformed response: literal too large',
    'garbage': r'malformed response',
    'deep_nesting': r'malformed response: .*nest',
    'unbalanced': r'malformed response',
    'unknown_tag': r'unknown tag',
}


def fill_eve(imap, base=30000):
    """230 messages in INBOX (three copy windows of 100), 40 in Work, 12 in
    Work.2024, 3 in Sent; some without Message-ID, one stored twice."""
    flagsets = [[], ['\\Seen'], ['\\Seen', '\\Flagged'], ['$Forwarded'],
                ['\\Answered', '\\Seen', 'project-x']]

    def items(n, first, folder_no):
        out = []
        for i in range(n):
            k = first + i
            out.append((mc.make_message(k, 300 + (k * 53) % 2500,
                                        msgid=False if i % 50 == 7 else None),
                        flagsets[i % len(flagsets)],
                        1430000000 + folder_no * 100000 + i * 60))
        return out

    mc.create_folder(imap, 'Work')
    mc.create_folder(imap, 'Work.2024')
    inbox = items(230, base, 0)
    twin = mc.make_message(base + 999, 1200)
    inbox += [(twin, ['\\Seen'], 1430000000), (twin, ['\\Seen'], 1430000000)]
    mc.append_many(imap, 'INBOX', inbox)
    mc.append_many(imap, 'Work', items(40, base + 300, 1))
    mc.append_many(imap, 'Work.2024', items(12, base + 400, 2))
    mc.append_many(imap, 'Sent', items(3, base + 500, 3))


@pytest.fixture
def eve_pair(workdir, ca, golden, request):
    """A started Pair (as make_pair makes) with alice's standard corpus and
    eve's (fill_eve) on the source; eve exists on both servers from the
    start (no passwd-file reload wait)."""
    src = src_server(workdir, ca, dict(SRC_USERS, eve='Src-eve-Pw-31'))
    dst = dst_server(workdir, ca, dict(DST_USERS, eve='Dst-eve-Pw-31'))
    try:
        _install_maildirs(src, golden, (OTHER,))
        src.start()
        dst.start()
        pair = Pair(workdir, src, dst)
        pair.names = 'destination'      # EVE_FOLDERS' "Sent Items"
        m = pair.src_imap(EVE)
        try:
            fill_eve(m)
        finally:
            m.logout()
        yield pair
    finally:
        stop_all(src, dst)
        rep = getattr(request.node, 'rep_call', None)
        if rep is None or rep.failed:
            for s in (src, dst):    # shown with the failure report
                print('----- %s: %s (last lines)' % (s.name, s.log_path))
                print('\n'.join(l for l in s.log_tail(1000).splitlines()
                                if re.search(r': (Warning|Error|Fatal|Panic)'
                                             r': ', l))[-6000:])


@pytest.fixture
def hostile_migrator(ctl, eve_pair, workdir):
    return Migrator(ctl, eve_pair, os.path.join(workdir, 'store.db'))


_EXPECTED = {}


def expected(pair, user, cache=False):
    """The destination snapshot a complete copy of user gives (the source
    mapped onto the destination's names). cache=True: once per session
    (alice's source is the same golden maildir in every test)."""
    if cache and user in _EXPECTED:
        return _EXPECTED[user]
    s = pair.src_imap(user)
    try:
        specials = ((corpus.SRC_SPECIAL, corpus.DST_SPECIAL)
                    if pair.names == 'destination' else ())
        want = mc.map_snapshot(mc.snapshot(s), '/', *specials)
    finally:
        s.logout()
    if cache:
        _EXPECTED[user] = want
    return want


def migrate(m, users, source=None, dest=None):
    return m.run(users, '--source-admin', MASTER[0], '--dest-admin',
                 MASTER[0], src_password=MASTER[1], dst_password=MASTER[1],
                 source=source, dest=dest, timeout=RUN_TIMEOUT)


def assert_equal(want, got_with_uids, what):
    mc.assert_snapshots_equal(want, {k: sorted(e[:3] for e in v)
                                     for k, v in got_with_uids.items()},
                              what)


def folder_names(name):
    """Both names of one of eve's folders (source and destination), from
    either."""
    for s, d in EVE_FOLDERS.items():
        if name in (s, d):
            return {s, d}
    return {name}


def check_hostile_run(res, pair, proxy, command_re, reason_re):
    """The run through the hostile proxy: eve failed with a clear error,
    alice was copied and verified."""
    assert proxy.errors == [], 'harness: proxy errors %s' % proxy.errors
    assert proxy.tampered.is_set(), \
        'harness: the proxy never tampered (logins seen: %s)\n%s' \
        % (proxy.logins, res.describe())
    assert EVE in proxy.logins and OTHER in proxy.logins, \
        'harness: logins through the proxy: %s' % proxy.logins
    # No crash: a negative status is a signal (SIGSEGV, SIGABRT, ...).
    assert res.rc >= 0, 'mailshiftctl died of signal %d\n%s' % (
        -res.rc, res.describe())
    assert res.rc == 1, res.describe()

    j = res.json
    assert isinstance(j, dict) and isinstance(j.get('users'), list), \
        'no multi-user JSON summary\n' + res.describe()
    assert j.get('ok') is False, res.describe()
    by_user = {u.get('user'): u for u in j['users']}
    assert set(by_user) == {EVE, OTHER}, res.describe()

    # eve: an error naming the folder, the command and what was wrong
    eve = by_user[EVE]
    assert eve.get('ok') is False, res.describe()
    err = eve.get('error')
    assert isinstance(err, str) and err, res.describe()
    # (shown with a failure report)
    print('eve: %s\nproxy: replaced the reply to %r in %r' % (
        err, proxy.tampered_command, proxy.tampered_folder))
    folders = FOLDER_RE.findall(err)
    want_names = folder_names(proxy.tampered_folder)
    assert folders and folders[0] in want_names, \
        'error %r does not name the folder %s (the hostile reply came on ' \
        'a connection with %r selected, command %r)\n%s' % (
            err, ' or '.join(repr(n) for n in sorted(want_names)),
            proxy.tampered_folder, proxy.tampered_command, res.describe())
    assert re.search(command_re, err), \
        'error %r does not name the command (%s)\n%s' % (
            err, command_re, res.describe())
    assert re.search(reason_re, err), \
        'error %r does not say what was wrong (%s)\n%s' % (
            err, reason_re, res.describe())

    # ... and the same on stderr, one line for eve
    lines = res.stderr.strip().splitlines()
    eve_lines = [l for l in lines if l.startswith('mailshiftctl: %s: ' % EVE)]
    assert eve_lines, 'no "mailshiftctl: eve: ..." line\n' + res.describe()
    assert any(ERR_LINE.match(l) and FOLDER_RE.search(l) and
               FOLDER_RE.search(l).group(1) in want_names and
               re.search(command_re, l) and re.search(reason_re, l)
               for l in eve_lines), res.describe()
    assert not [l for l in lines
                if l.startswith('mailshiftctl: %s: ' % OTHER)], \
        res.describe()

    # alice (other users go on): copied and verified in the same run
    alice = by_user[OTHER]
    assert alice.get('ok') is True, res.describe()
    assert alice.get('error') is None, res.describe()
    assert alice.get('verified') is True, res.describe()
    want = expected(pair, OTHER, cache=True)
    assert_equal(want, pair.dst_snapshot(OTHER, with_uids=True),
                 "alice's destination")
    assert alice.get('copied') == mc.count(want), res.describe()


def check_partial_copy(pair, want):
    """After the failed run: eve's destination holds only source messages,
    none more often than the source has it (nothing duplicated, nothing
    foreign). Returns the snapshot (with UIDs)."""
    got = pair.dst_snapshot(EVE, with_uids=True)
    problems = []
    for key, entries in got.items():
        have = collections.Counter(e[0] for e in entries)
        allowed = collections.Counter(e[0] for e in want.get(key, []))
        for h, n in have.items():
            if n > allowed[h]:
                problems.append('%s: body %s... %d times on the destination, '
                                '%d at the source' % (key, h[:12], n,
                                                      allowed[h]))
    assert not problems, 'after the failed run, eve\'s destination:\n  ' + \
        '\n  '.join(problems)
    return got


def check_rerun(m, pair, want, partial):
    """A run for eve straight against both servers finishes the copy: the
    destination equals the source, what was there stays (same UIDs), and
    only the missing messages are APPENDed."""
    res = migrate(m, EVE)
    assert res.rc >= 0, 'mailshiftctl died of signal %d\n%s' % (
        -res.rc, res.describe())
    assert res.rc == 0, res.describe()
    j = res.json
    assert isinstance(j, dict), res.describe()
    assert j.get('user') == EVE and j.get('ok') is True and \
        j.get('verified') is True and j.get('error') is None, res.describe()

    final = pair.dst_snapshot(EVE, with_uids=True)
    assert_equal(want, final, "eve's destination after the rerun")
    kept = {(k, e[3], e[0]) for k, v in final.items() for e in v}
    lost = [(k, e[3]) for k, v in partial.items() for e in v
            if (k, e[3], e[0]) not in kept]
    assert not lost, 'messages the failed run had copied are gone or were ' \
        'replaced after the rerun (folder, UID): %s' % lost[:20]
    # Messages the failed run stored without hearing the OK (in-flight
    # APPENDs) are matched, not copied again. (<=: an in-flight APPEND may
    # still have completed after the partial snapshot was taken.)
    missing = mc.count(want) - mc.count(partial)
    assert j.get('copied') <= missing, \
        'the rerun APPENDed %s messages, only %d were missing\n%s' % (
            j.get('copied'), missing, res.describe())


# ------------------------------------------------------------------ tests

SOURCE_CASES = [(kind, 1) for kind in sorted(REASONS)] + [('garbage', 3)]


@pytest.mark.parametrize(
    'kind,nth', SOURCE_CASES,
    ids=['%s-%s' % (k, 'first' if n == 1 else 'fetch%d' % n)
         for k, n in SOURCE_CASES])
def test_hostile_source(eve_pair, hostile_migrator, kind, nth):
    """The source answers eve's nth body fetch (UID FETCH ... BODY.PEEK[])
    with hostile bytes of `kind`."""
    pair, m = eve_pair, hostile_migrator
    want = expected(pair, EVE)
    proxy = hostileproxy.HostileImapProxy(pair.src.imap_port, user=EVE,
                                          kind=kind, trigger='body-fetch',
                                          nth=nth)
    proxy.start()
    try:
        res = migrate(m, [EVE, OTHER], source=proxy.url())
    finally:
        proxy.stop()
    assert (proxy.tampered_command or '').upper().startswith('UID FETCH'), \
        'harness: tampered %r' % proxy.tampered_command
    check_hostile_run(res, pair, proxy, r'\b(UID )?FETCH\b', REASONS[kind])
    partial = check_partial_copy(pair, want)
    check_rerun(m, pair, want, partial)


@pytest.mark.parametrize('kind', ['garbage', 'unknown_tag'])
def test_hostile_destination(eve_pair, hostile_migrator, kind):
    """The destination answers eve's first APPEND with hostile bytes of
    `kind` (after storing the messages: the client never hears the OK)."""
    pair, m = eve_pair, hostile_migrator
    want = expected(pair, EVE)
    proxy = hostileproxy.HostileImapProxy(pair.dst.imap_port, user=EVE,
                                          kind=kind, trigger='append')
    proxy.start()
    try:
        res = migrate(m, [EVE, OTHER], dest=proxy.url())
    finally:
        proxy.stop()
    assert (proxy.tampered_command or '').upper().startswith('APPEND'), \
        'harness: tampered %r' % proxy.tampered_command
    check_hostile_run(res, pair, proxy, r'\bAPPEND\b', REASONS[kind])
    partial = check_partial_copy(pair, want)
    check_rerun(m, pair, want, partial)
