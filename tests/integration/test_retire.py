"""mailshiftctl retire: whether the source can be switched off, switching it
off, and the record an operator files (docs/deployment.md, "Retiring the
source").

On loopback (real Dovecots with master logins and mailshiftd, the fixtures
of test_gateway.py): --check refuses while a user is not on the
destination, while a session through the gateway is open to the source,
while the quiet period after one runs, and while mail appended straight to
the source after the move sits there; it passes when all is clean; --report
gives what was moved, as the servers hold it.

In network namespaces (test_steer.py's topology and fixture): --apply
refuses over a failed check and changes nothing; with --force it sends the
mail ports straight to the destination in one change: a new client of the
service address reaches the destination without the gateway, a session the
gateway carries goes on, `status` shows the retirement.
"""

import imaplib
import json
import os
import time

import pytest

import mailcheck as mc
from conftest import MASTER, wait_for
from test_gateway import GW_USERS, direct, marker
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_gateway_ops import admin_conf
from test_steer import (BATCH_PREFIX, SERVICE_ADDR, USERS, close,
                        gw_sessions, inbox_tags, login_tags, logins, side_of)
from test_steer import env  # noqa: F401 (fixture)

QUIET = 20          # [retire] quiet_period of the loopback tests, seconds


def retire(g, *args):
    """mailshiftctl retire -c CONFIG ARGS (no socket option: retire reads
    the config)."""
    return g.ctl('retire', '-c', g.config_path, *args, socket_arg=False,
                 timeout=120)


def check(g):
    r = retire(g, '--check', '--json')
    assert r.rc in (0, 1) and isinstance(r.json, dict), r.describe()
    assert r.json['can_retire'] == (r.rc == 0), r.describe()
    return r


def reasons_about(r, text):
    return [x for x in r.json['reasons'] if text in x]


def retire_gw(make_gw, workdir, policy='off'):
    conf = admin_conf(workdir, sweep=False) + \
        '\n[retire]\nquiet_period = %ds\nrecord_interval = 1s\n' % QUIET
    g = make_gw(tls=False, policy=policy, extra_conf=conf)
    for u in ('alice', 'bob'):
        r = g.ctl('user', 'add', u)
        assert r.rc == 0, r.describe()
    return g


def migrate(g, *users):
    r = g.ctl('migrate', '--daemon', *users)
    assert r.rc == 0, r.describe()
    for u in users:
        assert g.wait_state(u, ('destination', 'failed'), timeout=120) == \
            'destination', g.log_tail()


def test_check_refuses_until_clean(gpair, make_gw, workdir):
    g = retire_gw(make_gw, workdir)

    # Nobody moved yet.
    r = check(g)
    assert r.rc == 1, r.describe()
    assert sorted(u['user'] for u in r.json['users']['not_moved']) == \
        ['alice', 'bob'], r.json
    assert reasons_about(r, 'user alice is not on the destination'), r.json
    assert r.json['sessions'] == [] and r.json['source_use'] == [], r.json

    # alice, on the source (policy off), has a session through the
    # gateway open to the source.
    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=30)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    assert m.select('INBOX')[0] == 'OK'
    # The use is written within a second (one transaction a second).
    deadline = time.monotonic() + 10
    r = check(g)
    while not r.json['source_use'] and time.monotonic() < deadline:
        time.sleep(0.1)
        r = check(g)
    assert r.rc == 1, r.describe()
    assert [s['user'] for s in r.json['sessions']] == ['alice'], r.json
    assert reasons_about(r, 'of alice (imap from 127.0.0.1'), r.json
    assert [(u['user'], u['kind']) for u in r.json['source_use']] == \
        [('alice', 'session')], r.json
    m.logout()

    # The session is over; the quiet period after it runs (QUIET seconds
    # from the login: this check comes well within them).
    r = check(g)
    assert r.rc == 1 and r.json['sessions'] == [], r.describe()
    use = r.json['source_use']
    assert [(u['user'], u['kind']) for u in use] == [('alice', 'session')], \
        r.json
    assert use[0]['quiet_until'] >= use[0]['at'] + QUIET, use
    assert r.json['checked_at'] < use[0]['quiet_until'], r.json
    assert reasons_about(r, 'a login of alice went to the source'), r.json

    # Both moved.
    migrate(g, 'alice', 'bob')
    r = check(g)
    assert r.json['users']['not_moved'] == [], r.json
    # The verification found both users' copies identical.
    assert sorted(v['user'] for v in r.json['verification']) == \
        ['alice', 'bob'], r.json
    assert all(v['ok'] for v in r.json['verification']), r.json
    # No doveadm here: the gateway shows both the source's UIDs (its IMAP
    # view), which the check warns about; not a reason: the source can go,
    # the gateway must stay.
    assert r.json['view_users'] == 2, r.json
    assert [w for w in r.json['warnings'] if 'IMAP view' in w], r.json

    # Once the quiet period is over, nothing holds the source back.
    time.sleep(max(0, use[0]['quiet_until'] - time.time()))
    assert wait_for(lambda: check(g).rc == 0, 60, 1), check(g).describe()
    r = retire(g, '--check')
    assert r.rc == 0 and 'the source can be retired' in r.stdout, \
        r.describe()
    assert 'warning: 2 user(s) (' in r.stdout, r.describe()

    # Mail appended straight to the source after the move holds it back.
    msg = mc.make_message(990001, 300)
    direct(gpair.src, 'alice', lambda imap: imap.append(
        'INBOX', None, None, msg))
    r = check(g)
    assert r.rc == 1, r.describe()
    why = reasons_about(r, 'alice: 1 message(s) in "INBOX" reached the '
                        'source after the last copy')
    assert why, r.json
    inbox = [f for v in r.json['verification'] if v['user'] == 'alice'
             for f in v['folders'] if f['source'] == 'INBOX']
    assert inbox and inbox[0]['not_copied'] == 1, r.json
    # Text: the same reasons, one a line.
    r = retire(g, '--check')
    assert r.rc == 1 and why[0] in r.stdout, r.describe()
    # The record does not call alice's copy verified.
    r = retire(g, '--report')
    assert r.rc == 0 and why[0] in r.stdout, r.describe()
    line = [l for l in r.stdout.splitlines() if l.startswith('alice ')]
    assert len(line) == 1 and ' NO (' in line[0] and line[0].endswith(
        'destination messages; changes on the source not copied)'), r.stdout


def mailbox_totals(server, user):
    """(messages, bytes) of every selectable folder of user on server."""
    def count(imap):
        n = size = 0
        for f in mc.list_folders(imap):
            if '\\noselect' in f['attrs'] or '\\nonexistent' in f['attrs']:
                continue
            for d in mc.fetch_all(imap, f['name'], '(RFC822.SIZE)').values():
                n += 1
                size += int(d['RFC822.SIZE'])
        return n, size
    return direct(server, user, count)


def test_report_matches_what_was_moved(gpair, make_gw, workdir):
    g = retire_gw(make_gw, workdir)
    t0 = int(time.time())
    migrate(g, 'alice', 'bob')
    t1 = int(time.time())
    out = os.path.join(workdir, 'record.json')
    r = retire(g, '--report', '--json', '--output', out)
    assert r.rc == 0, r.describe()
    assert os.stat(out).st_mode & 0o777 == 0o600
    with open(out) as f:
        rep = json.load(f)

    want = {u: mailbox_totals(gpair.src, u) for u in ('alice', 'bob')}
    assert want == {u: mailbox_totals(gpair.dst, u) for u in want}, want
    assert want['alice'][0] > 0, want
    users = {u['user']: u for u in rep['users']}
    assert sorted(users) == ['alice', 'bob'], rep
    for u, (msgs, size) in want.items():
        assert (users[u]['messages'], users[u]['bytes']) == (msgs, size), \
            (u, users[u], msgs, size)
        assert users[u]['state'] == 'destination', users[u]
        assert t0 <= users[u]['first_copy'] <= users[u]['moved'] <= t1 + 1, \
            (users[u], t0, t1)
    tot = rep['totals']
    assert (tot['users'], tot['on_destination']) == (2, 2), tot
    assert tot['messages'] == sum(m for m, _ in want.values()), tot
    assert tot['bytes'] == sum(b for _, b in want.values()), tot
    assert rep['first_move'] == min(u['first_copy'] for u in users.values())
    assert rep['last_move'] == max(u['moved'] for u in users.values())
    assert rep['retired'] is None, rep
    # Not retired: the report compares now, and each user is identical.
    ver = {v['user']: v for v in rep['verification']['users']}
    assert sorted(ver) == ['alice', 'bob'] and \
        all(v['ok'] for v in ver.values()), rep['verification']
    for u, (msgs, _) in want.items():
        assert sum(f['source_messages'] for f in ver[u]['folders']) == msgs
        assert sum(f['dest_messages'] for f in ver[u]['folders']) == msgs

    # The text form says the same.
    r = retire(g, '--report')
    assert r.rc == 0, r.describe()
    assert 'moved:        %d messages, %d bytes' % (tot['messages'],
                                                     tot['bytes']) in r.stdout
    assert 'retired:      not yet' in r.stdout, r.stdout
    for u, (msgs, _) in want.items():
        line = [l for l in r.stdout.splitlines() if l.startswith(u + ' ')]
        assert len(line) == 1 and line[0].endswith(
            'yes (%d source, %d destination messages)' % (msgs, msgs)), \
            r.stdout


# ------------------------------------------------- --apply, in namespaces

def ns_retire(env, conf, *args):
    """mailshiftctl retire -c conf ARGS in the gateway's namespace."""
    r = env.gw_ns.run([env.ctl_binary, 'retire', '-c', conf] + list(args),
                      check=False, timeout=120)
    r.json = None
    if '--json' in args and r.stdout.strip():
        r.json = json.loads(r.stdout)
    return r


def retire_conf(env):
    """retire's own file: the gateway's, with admin logins (the harness's
    Dovecots have a master login) and a short quiet period. The gateway
    records its uses of the source every second (it is restarted once
    for that)."""
    if 'record_interval' not in env.gw.extra_conf:
        env.gw.stop()
        env.gw.extra_conf += '\n[retire]\nrecord_interval = 1s\n'
        env.gw.start()
    pwf = os.path.join(env.root, 'retire-admin.pw')
    with open(pwf, 'w') as f:
        f.write(MASTER[1] + '\n')
    os.chmod(pwf, 0o600)
    conf = os.path.join(env.root, 'retire.conf')
    with open(env.gw.config_path) as f:
        text = f.read()
    with open(conf, 'w') as f:
        f.write(text + '\n'.join(
            ['', '[source]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf, '[destination]',
             'admin = %s' % MASTER[0], 'admin_password_file = %s' % pwf,
             '[retire]', 'quiet_period = 1s', '']))
    return conf, pwf


def decisions(env):
    """{entry without its action: action} of the installed table."""
    show = env.steer('show', '--json', check=0).json
    assert show['installed'], show
    return {e['entry'].rsplit(' ', 1)[0]: e['action']
            for e in show['entries']}


def test_apply_steers_to_the_destination(env):
    assert env.dump() == env.clean, 'a previous test left steering behind'
    conf, _ = retire_conf(env)
    env.steer('install', check=0)
    try:
        before = decisions(env)
        assert before['%s 143' % SERVICE_ADDR] == 'proxy', before
        # A session the gateway carries to the source (alice, policy off).
        carried, tags = login_tags(env, 'alice')
        assert side_of(env, tags, 'alice') == 'source'
        try:
            # The check fails (alice on the source, her session open):
            # --apply refuses and changes nothing.
            r = ns_retire(env, conf, '--apply')
            assert r.returncode == 1, (r.stdout, r.stderr)
            assert 'not applied' in r.stderr, r.stderr
            assert 'user alice is not on the destination' in r.stderr
            assert decisions(env) == before
            assert ns_retire(env, conf, '--report', '--json').json[
                'retired'] is None

            # --force: applied, with the warning.
            r = ns_retire(env, conf, '--apply', '--force', '--json')
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert 'WARNING: --force' in r.stderr, r.stderr
            assert r.json['done'] == 'retired' and r.json['forced'], r.json
            assert r.json['gateway_sessions'] >= 1, r.json
            after = decisions(env)
            assert set(after) == set(before), (before, after)
            for key, action in after.items():
                want = before[key] if key.endswith(' other') else \
                    'destination'
                assert action == want, (key, before, after)
            assert '%s 143 %s' % (SERVICE_ADDR, BATCH_PREFIX) in after

            # A new client of the service address reaches the destination
            # straight: the gateway carries no new session.
            stats0, _ = env.stats()
            m, tags = login_tags(env, 'alice')
            try:
                assert side_of(env, tags, 'alice') == 'destination'
                assert len(gw_sessions(env, 'alice')) == 1
            finally:
                close(m)
            stats, _ = env.stats()
            key = '%s 143 destination' % SERVICE_ADDR
            assert stats[key] >= stats0[key] + 1, (stats0, stats)

            # The session the gateway carried goes on, to the source.
            assert carried.noop()[0] == 'OK'
            assert side_of(env, inbox_tags(carried), 'alice') == 'source'
        finally:
            close(carried)
        assert wait_for(lambda: not gw_sessions(env, 'alice'), 20, 0.1)

        # status and the report show the retirement.
        st = env.gw.ctl('status', '--json')
        assert st.rc == 0, st.describe()
        ret = st.json['retired']
        assert ret['forced'] is True and ret['uid'] == os.getuid(), ret
        assert ret['at'] >= r.json['at'], (ret, r.json)
        st = env.gw.ctl('status')
        assert 'source retired: ' in st.stdout and 'forced' in st.stdout, \
            st.stdout
        rep = ns_retire(env, conf, '--report', '--json').json
        assert rep['retired'] == ret, rep
        assert any('alice is not on the destination' in x
                   for x in rep['verification']['reasons']), rep
    finally:
        env.steer('remove', check=0)
    assert env.dump() == env.clean


def test_apply_without_an_installed_table(env):
    """Nothing installed: --apply installs [steer]'s table with every mail
    port sent to the destination, in one change; a mailshiftd that owns the
    steering ([steer] manage = yes) started after it keeps it so (the store
    says the migration is retired); steer remove leaves the namespace as it
    was."""
    assert env.dump() == env.clean, 'a previous test left steering behind'
    conf, _ = retire_conf(env)
    try:
        r = ns_retire(env, conf, '--apply', '--force', '--json')
        assert r.returncode == 0, (r.stdout, r.stderr)
        after = decisions(env)
        assert after['%s 143' % SERVICE_ADDR] == 'destination', after
        assert after['%s 110' % SERVICE_ADDR] == 'destination', after
        assert after['%s 143 %s' % (SERVICE_ADDR, BATCH_PREFIX)] == \
            'destination', after
        assert r.json['entries'] == len(after), (r.json, after)
        m = login_tags(env, 'alice')[0]
        try:
            assert gw_sessions(env, 'alice') == []
        finally:
            close(m)
        plain = env.gw.extra_conf
        env.gw.stop()
        env.gw.extra_conf = plain + '\n[steer]\nmanage = yes\n'
        try:
            env.gw.start()
            assert 'steering installed for a retired migration' in \
                env.gw.log_text(), env.gw.log_tail()
            assert decisions(env) == after
            m = login_tags(env, 'alice')[0]
            try:
                assert gw_sessions(env, 'alice') == []
            finally:
                close(m)
        finally:
            env.gw.stop()
            env.gw.extra_conf = plain
            env.gw.start()
    finally:
        env.steer('remove', check=0)
    assert env.dump() == env.clean


def empty_inbox(server, user):
    def expunge(imap):
        assert imap.select('INBOX')[0] == 'OK'
        imap.store('1:*', '+FLAGS.SILENT', '(\\Deleted)')
        assert imap.expunge()[0] == 'OK'
    direct(server, user, expunge)


def test_apply_after_a_passing_check(env):
    """The whole way: both users copied and on the destination, a session
    the gateway carries (to the destination), the check passes, --apply
    without --force; the carried session goes on. Last of the module: it
    moves both users (the destination's own marker messages are put back
    at the end)."""
    assert env.dump() == env.clean, 'a previous test left steering behind'
    conf, pwf = retire_conf(env)
    env.steer('install', check=0)
    try:
        # The destination's mailboxes become copies of the source's.
        for u in USERS:
            empty_inbox(env.dst, u)
        r = env.gw_ns.run(
            [env.ctl_binary, 'migrate', '--no-progress',
             '--source', env.gw.src.url(), '--dest', env.gw.dst.url(),
             '--source-admin', MASTER[0], '--source-password-file', pwf,
             '--dest-admin', MASTER[0], '--dest-password-file', pwf,
             '--store', env.gw.store_url or env.gw.store_path] + list(USERS),
            check=False, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        for u in USERS:
            res = env.gw.ctl('user', 'set', u, 'state', 'destination',
                             '--force')
            assert res.rc == 0, res.describe()
        # bob through the gateway, which carries him to the destination.
        carried = login_tags(env, 'bob')[0]
        try:
            assert [s['server'] for s in gw_sessions(env, 'bob')] == \
                ['destination']
            # Passes once the quiet period after any earlier use is over.
            assert wait_for(lambda: ns_retire(env, conf, '--check')
                            .returncode == 0, 30, 0.5), \
                ns_retire(env, conf, '--check').stdout
            r = ns_retire(env, conf, '--apply', '--json')
            if r.returncode != 0:       # the whole of what the check said
                pytest.fail('retire --apply after a passing check: exit '
                            '%d\nstdout: %s\nstderr: %s'
                            % (r.returncode, r.stdout, r.stderr),
                            pytrace=False)
            assert r.json['forced'] is False and \
                r.json['gateway_sessions'] == 1, r.json
            assert 'WARNING' not in r.stderr, r.stderr
            for key, action in decisions(env).items():
                assert key.endswith(' other') or action == 'destination', \
                    (key, action)
            # A new client: a login at the destination, none at the
            # source, none through the gateway.
            at_src, at_dst = len(logins(env.src, 'alice')), \
                len(logins(env.dst, 'alice'))
            m = login_tags(env, 'alice')[0]
            try:
                assert gw_sessions(env, 'alice') == []
            finally:
                close(m)
            assert wait_for(lambda: len(logins(env.dst, 'alice')) ==
                            at_dst + 1, 10, 0.1)
            assert len(logins(env.src, 'alice')) == at_src
            assert carried.noop()[0] == 'OK'
            assert inbox_tags(carried), 'bob lost his mail'
            assert len(gw_sessions(env, 'bob')) == 1
        finally:
            close(carried)
        rep = ns_retire(env, conf, '--report', '--json').json
        assert rep['retired']['forced'] is False, rep
        assert rep['verification']['reasons'] == [], rep['verification']
        assert sorted(v['user'] for v in rep['verification']['users']) == \
            sorted(USERS), rep['verification']
    finally:
        env.steer('remove', check=0)
        for i, u in enumerate(USERS):
            empty_inbox(env.dst, u)
            msg, _ = marker('steer-dst-%s-%s' % (u, env.uid), 10 + i)
            direct(env.dst, u, lambda imap: imap.append('INBOX', None, None,
                                                        msg))
    assert env.dump() == env.clean
