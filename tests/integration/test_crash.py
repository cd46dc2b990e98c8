"""kill -9 of mailshiftd at chosen instants of a cutover and of a rollback,
each ending exact.

The daemon is the build with crash points (make hooks, daemon/testhook.h):
MAILSHIFT_CRASH_AT=POINT[:N] makes it kill itself with SIGKILL the Nth time
it reaches POINT (docs/testing.md lists them). Each test drives a real
cutover or rollback through the gateway, checks that the daemon died at that
point and what the store held then, starts it again without the variable,
and compares every message of every folder of both servers (bytes, flags,
dates: nothing lost, nothing twice).

The user is carol (GW_USERS): her mailbox starts empty, so that the copy
before the cutover copies nothing and the first time a copy point is reached
is in the cutover's delta. Reuses test_gateway's fixtures (gpair, make_gw).
"""

import os

import pytest

import corpus
import gateway as gwlib
import mailcheck as mc
from conftest import server_snapshot, store_rows
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_gateway_ops import hooked_gw, session_then_cutover

USER = 'carol'
ROLLBACK_MARK = 'rolling back to the source'     # daemon/gateway.c


def point_id(point):
    """A test id short enough for the servers' socket paths."""
    return point.replace('rollback.', '').replace('cutover.', '')


def user_row(g):
    """(state, last_error) of USER in the store of a dead daemon."""
    rows = store_rows(g.store_path, "SELECT state, last_error FROM users "
                      "WHERE name = '%s'" % USER)
    assert len(rows) == 1, rows
    return rows[0]


def open_intents(g, table='messages WHERE state = 0'):
    return store_rows(g.store_path, 'SELECT count(*) FROM ' + table)[0][0]


def selectable(server, user):
    m = server.imap(user)
    try:
        return [f for f in mc.list_folders(m)
                if '\\noselect' not in f['attrs'] and
                '\\nonexistent' not in f['attrs']]
    finally:
        m.logout()


# --------------------------------------------------------------- cutover

# point -> the user's state in the store when the daemon died
CUTOVER = {
    'cutover.grace': 'cutover',
    'copy.mid-batch': 'cutover',
    'copy.appended': 'cutover',
    'copy.recorded': 'cutover',
    'copy.verify': 'cutover',
    'cutover.flip-before': 'cutover',
    'cutover.flip-after': 'destination',
}


# The cutover's delta: what carol adds in her session, a new folder too.
DELTA = {'INBOX': 30, 'Projekte': 12}


def work_on_source(m):
    """What carol does in her session through the gateway (on the
    source) after her copy was verified."""
    mc.append_many(m, 'INBOX', [
        (mc.make_message(960000 + i, 600 + 40 * i),
         [['\\Seen'], [], ['\\Flagged', '$Later']][i % 3],
         corpus.D2015 + i) for i in range(DELTA['INBOX'])])
    mc.create_folder(m, 'Projekte')
    mc.append_many(m, 'Projekte', [
        (mc.make_message(961000 + i, 900), ['\\Seen'], corpus.D2005 + i)
        for i in range(DELTA['Projekte'])])


@pytest.mark.parametrize('point', sorted(CUTOVER), ids=point_id)
def test_kill9_in_cutover(gpair, make_gw, workdir, point):
    # Every folder the source has for carol is verified once by the copy
    # that runs while she is logged in (nothing to copy): the cutover's
    # first verification is the next one.
    nfolders = len(selectable(gpair.src, USER))
    at = point + (':%d' % (nfolders + 1) if point == 'copy.verify' else '')
    g = hooked_gw(make_gw, workdir, at)
    session_then_cutover(g, USER, work_on_source)
    g.wait_crashed()
    n = sum(DELTA.values())

    state, error = user_row(g)
    assert state == CUTOVER[point], (state, error, g.log_tail())
    dst = gpair.dst_snapshot(USER)
    if point == 'cutover.grace':
        # Died before the delta: none of it on the destination.
        assert mc.count(dst) == 0, dst
    elif point in ('copy.mid-batch', 'copy.appended'):
        assert open_intents(g) > 0, 'no intent open at ' + point
        assert mc.count(dst) < n, dst
    elif point == 'copy.recorded':
        assert 0 < mc.count(dst) < n, dst
    elif point == 'copy.verify':
        # Biggest folder first: INBOX copied, Projekte not yet.
        assert len(dst['INBOX']) == DELTA['INBOX'] and \
            not dst.get('Projekte'), dst
    else:
        assert mc.count(dst) == n, dst

    g.restart_after_crash()
    st = g.wait_state(USER, ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())
    if CUTOVER[point] == 'cutover':
        assert '%s: resuming the interrupted copy' % USER in g.log_text()
    gpair.assert_copied(USER)
    assert open_intents(g) == 0


# -------------------------------------------------------------- rollback

# point -> the user's state in the store when the daemon died
ROLLBACK = {
    'rollback.grace': 'cutover',
    'rollback.folder-created': 'cutover',
    'rollback.mid-batch': 'cutover',
    'rollback.appended': 'cutover',
    'rollback.recorded': 'cutover',
    'rollback.verify': 'cutover',
    'rollback.flip-before': 'cutover',
    'rollback.flip-after': 'source',
}


def moved_to_destination(gpair, g):
    """carol with some mail on the source, moved to the destination."""
    s = gpair.src.imap(USER)
    try:
        mc.append_many(s, 'INBOX', [
            (mc.make_message(970000 + i, 700), [['\\Seen'], []][i % 2],
             corpus.D2015 + i) for i in range(20)])
    finally:
        s.logout()
    assert g.ctl('user', 'add', USER).rc == 0
    r = g.ctl('migrate', '--daemon', USER)
    assert r.rc == 0, r.describe()
    st = g.wait_state(USER, ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())


# New mail carol gets on the destination, in a folder made there.
N_NEU = 40


def work_on_destination(gpair):
    """What carol does on the destination before she is sent back: new
    mail in a new folder (which the rollback creates on the source), flag
    changes and an expunge among the copied mail."""
    d = gpair.dst.imap(USER)
    try:
        mc.create_folder(d, 'Neu')
        mc.append_many(d, 'Neu', [
            (mc.make_message(971000 + i, 500 + 30 * i),
             [['\\Seen'], ['$Forwarded'], []][i % 3], corpus.D2005 + i)
            for i in range(N_NEU)])
        d.select('INBOX')
        assert d.uid('STORE', '1:3', '+FLAGS.SILENT', '(\\Flagged)')[0] \
            == 'OK'
        assert d.uid('STORE', '4', '+FLAGS.SILENT', '(\\Deleted)')[0] == 'OK'
        assert d.uid('EXPUNGE', '4')[0] == 'OK'
    finally:
        d.logout()


@pytest.mark.parametrize('point', sorted(ROLLBACK), ids=point_id)
def test_kill9_in_rollback(gpair, make_gw, workdir, point):
    g = hooked_gw(make_gw, workdir, point)
    moved_to_destination(gpair, g)
    work_on_destination(gpair)
    src_before = mc.count(server_snapshot(gpair.src, USER))
    r = g.ctl('rollback', USER)
    assert r.rc == 0, r.describe()
    g.wait_crashed()

    state, error = user_row(g)
    assert state == ROLLBACK[point], (state, error, g.log_tail())
    if state == 'cutover':
        assert error == ROLLBACK_MARK, error
    src = server_snapshot(gpair.src, USER)
    if point == 'rollback.grace':
        assert 'Neu' not in src, sorted(src)
    elif point == 'rollback.folder-created':
        assert src['Neu'] == [], sorted(src)       # made, still empty
    elif point in ('rollback.mid-batch', 'rollback.appended'):
        assert open_intents(g, 'rintents') > 0, 'no intent open at ' + point
    elif point == 'rollback.verify':
        # One folder at a time: none of its copies in flight.
        assert open_intents(g, 'rintents') == 0
    else:
        assert len(src['Neu']) == N_NEU, sorted(src)

    g.restart_after_crash()
    if ROLLBACK[point] == 'cutover':
        # An interrupted rollback: back on the destination (which holds
        # everything), to be run again.
        u = g.user(USER)
        assert u['state'] == 'destination' and \
            'rollback interrupted' in (u.get('error') or ''), u
        r = g.ctl('rollback', USER, '--wait')
        assert r.rc == 0, (r.describe(), g.log_tail(30))
    u = g.user(USER)
    assert u['state'] == 'source' and u['policy'] == 'off', u
    gpair.assert_copied(USER)       # the source holds what dst holds
    # Neu's mail came back, the expunged message went.
    assert mc.count(server_snapshot(gpair.src, USER)) == \
        src_before + N_NEU - 1
    assert open_intents(g, 'rintents') == 0



def test_normal_builds_have_no_crash_points():
    """The crash points exist only in the test builds: a normal build
    never reads MAILSHIFT_CRASH_AT, nor the time scale of
    test_timescale.py. (Under check-asan both names point at the ASan
    build, which has them.)"""
    for normal, hooked in ((gwlib.MAILSHIFTD, gwlib.MAILSHIFTD_HOOKS),
                           (gwlib.MAILSHIFTCTL, gwlib.MAILSHIFTCTL_HOOKS)):
        for word in (b'MAILSHIFT_CRASH_AT', b'MAILSHIFT_TEST_TIME_SCALE'):
            with open(hooked, 'rb') as f:
                assert word in f.read(), (hooked, word)
            if os.path.realpath(normal) != os.path.realpath(hooked):
                with open(normal, 'rb') as f:
                    assert word not in f.read(), (normal, word)
