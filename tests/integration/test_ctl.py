"""mailshiftctl's control commands as docs/mailshiftctl.8 and
docs/gateway-spec.md ("mailshiftctl") promise them: the subcommands, their
tables and --json answers, exit statuses (0 done, 1 an error, 2 usage),
where the control socket is looked for, kick, policy per user, import
errors; rollback and migrate --daemon without admin logins.

One mailshiftd in front of gpair (test_gateway's fixtures) per test; the
usage checks need no daemon at all (a socket path where nothing listens:
a command that reached for it would exit 1, not 2)."""

import imaplib
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time

import pytest

import gateway as gwlib
import mailcheck as mc
import tcpproxy
from conftest import wait_for
from test_gateway_ops import admin_conf
from test_gateway import (GW_USERS, direct, gw_imap, raw_connect,
                          read_until_close, sessions, user_list)
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)

STATES = ('source', 'copying', 'cutover', 'destination', 'failed')
DEFAULT_SOCKET = '/run/mailshift/control.sock'


def run(ctl, *args, env=None):
    """mailshiftctl ARGS with no MAILSHIFT_* variable but env's: (rc,
    stdout, stderr)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith('MAILSHIFT_')}
    e.update(env or {})
    r = subprocess.run([ctl] + list(args), env=e, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def test_usage_help_and_version(ctl, workdir):
    nowhere = os.path.join(workdir, 'nothing-here.sock')
    for args in (['help'], ['--help'], ['-h']):
        rc, out, err = run(ctl, *args)
        assert rc == 0 and out.startswith('Usage: mailshiftctl'), (args, out)
        for sub in ('migrate', 'status', 'user', 'sessions', 'kick',
                    'policy', 'rollback'):
            assert '  %s: ' % sub in out, (sub, out)
    for args in (['version'], ['--version']):
        rc, out, err = run(ctl, *args)
        assert rc == 0 and re.fullmatch(r'mailshift \S+\n', out), (args, out)
    rc, out, err = run(ctl)
    assert rc == 2 and err.startswith('Usage: '), (rc, err)
    rc, out, err = run(ctl, 'frobnicate')
    assert rc == 2 and "invalid subcommand `frobnicate'" in err, (rc, err)

    # Usage errors: exit 2, a usage line, and the socket never asked.
    for args in (['status', 'extra'], ['sessions', 'extra'], ['user'],
                 ['user', 'bogus'], ['user', 'show'], ['user', 'add'],
                 ['user', 'set', 'alice'], ['user', 'set', 'alice', 'state'],
                 ['user', 'add', 'alice', 'colour', 'red'], ['kick'],
                 ['kick', 'alice', 'bob'], ['policy', '--default'],
                 ['policy', '--domain', 'example.org'],
                 ['policy', 'alice', 'off', 'extra'], ['rollback'],
                 ['rollback', '--wait'], ['migrate', '--daemon'],
                 ['migrate', '--all', 'alice'],
                 ['migrate', '--rollback', '--all'],
                 ['migrate', '--rollback', '--daemon', 'alice']):
        rc, out, err = run(ctl, args[0], '-s', nowhere, *args[1:])
        assert rc == 2, (args, rc, out, err)
        assert 'Usage' in err or 'usage' in err or '--rollback' in err, \
            (args, err)
        assert 'cannot reach' not in err, (args, err)

    # No daemon: exit 1, naming the socket looked for.
    rc, out, err = run(ctl, 'status', '-s', nowhere)
    assert rc == 1 and 'cannot reach mailshiftd at %s' % nowhere in err, err
    # Where it is looked for: -s, else MAILSHIFT_CONTROL, else the
    # [control] socket of -c FILE, else /run/mailshift/control.sock.
    from_env = os.path.join(workdir, 'from-env.sock')
    from_conf = os.path.join(workdir, 'from-conf.sock')
    conf = os.path.join(workdir, 'mailshift.conf')
    with open(conf, 'w') as f:
        f.write('[listen]\nimap = 127.0.0.1:143\n[control]\nsocket = %s\n'
                % from_conf)
    for args, env, want in (
            ([], {'MAILSHIFT_CONTROL': from_env}, from_env),
            (['-s', nowhere], {'MAILSHIFT_CONTROL': from_env}, nowhere),
            (['-c', conf], {}, from_conf),
            ([], {}, DEFAULT_SOCKET)):
        rc, out, err = run(ctl, 'sessions', *args, env=env)
        assert rc == 1 and 'cannot reach mailshiftd at %s:' % want in err, \
            (args, env, rc, err)
    bad = os.path.join(workdir, 'bad.conf')
    with open(bad, 'w') as f:
        f.write('[control\n')
    rc, out, err = run(ctl, 'status', '-c', bad)
    assert rc == 2 and '%s:1: ' % bad in err, (rc, err)


def status_lines(text):
    return text.rstrip('\n').split('\n')


def test_tables_and_json(gpair, make_gw, workdir):
    """Each command's table, and its --json answer; errors exit 1 with the
    daemon's words."""
    g = make_gw(tls=False, policy='off')
    r = g.ctl('user', 'add', 'alice')
    assert r.rc == 0, r.describe()
    assert status_lines(r.stdout) == [
        'user:     alice', 'state:    source', 'policy:   default',
        'sessions: 0', 'moved:    0 messages, 0 bytes'], r.stdout
    r = g.ctl('user', 'add', 'bob', 'state', 'failed', 'policy', 'hold',
              '--json')
    assert r.rc == 0 and r.json['ok'] is True, r.describe()
    u = r.json['user']
    assert set(u) == {'user', 'state', 'copy', 'policy', 'error', 'messages',
                      'bytes', 'sessions', 'updated'}, u
    assert (u['user'], u['state'], u['policy'], u['copy'], u['error']) == \
        ('bob', 'failed', 'hold', '', None), u
    assert abs(u['updated'] - time.time()) < 3600, u

    for args, want in ((('user', 'show', 'nosuch'), 'no such user "nosuch"'),
                       (('user', 'set', 'nosuch', 'state', 'failed'),
                        'no such user "nosuch"'),
                       (('user', 'set', 'bob', 'state', 'bogus'),
                        'invalid state "bogus"'),
                       (('user', 'add', 'carol', 'policy', 'sometimes'),
                        'invalid policy "sometimes"'),
                       (('policy', 'bob', 'sometimes'), 'invalid policy')):
        r = g.ctl(*args)
        assert r.rc == 1 and 'mailshiftctl: ' in r.stderr and \
            want in r.stderr and r.stdout == '', (args, r.describe())
    assert g.user('carol') is None, 'a refused user.add made a user'

    # import: header and comments skipped; a bad line stops it (exit 1,
    # FILE:LINE and the daemon's words).
    csv = os.path.join(workdir, 'users.csv')
    with open(csv, 'w') as f:
        f.write('user,state,policy\n# a comment\n\ncarol\ndave,destination\n'
                'erin,,off\n')
    r = g.ctl('user', 'import', csv)
    assert r.rc == 0 and r.stdout == '3 user(s) imported\n', r.describe()
    assert (g.state('dave'), g.user('erin')['policy'],
            g.user('carol')['policy']) == ('destination', 'off', 'default')
    with open(csv, 'w') as f:
        f.write('frank\ngina,nowhere\n')
    r = g.ctl('user', 'import', csv)
    assert r.rc == 1 and '%s:2: invalid state "nowhere"' % csv in r.stderr, \
        r.describe()
    r = g.ctl('user', 'import', os.path.join(workdir, 'missing.csv'))
    assert r.rc == 1 and 'missing.csv' in r.stderr, r.describe()

    # A user's policy; "default" gives back the domain's or the global one.
    r = g.ctl('policy', 'alice', 'hold')
    assert r.rc == 0 and 'policy:   hold' in r.stdout, r.describe()
    r = g.ctl('policy', 'alice', 'default', '--json')
    assert r.rc == 0 and r.json['user']['policy'] == 'default', r.describe()
    r = g.ctl('policy')
    assert r.rc == 0 and r.stdout == 'default: off (hold at most 60 s)\n', \
        r.describe()
    r = g.ctl('policy', '--json')
    assert r.json == {'ok': True, 'policy': {
        'default': 'off', 'domains': {}, 'hold_max_seconds': 60,
        'set': {}}}, r.describe()

    # Sessions: alice over IMAP (from 127.0.0.1) and POP3 (127.0.0.2).
    m = gw_imap(g)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    ps = socket.create_connection(('127.0.0.1', g.pop3_port), timeout=30,
                                  source_address=('127.0.0.2', 0))
    ps.recv(4096)
    ps.sendall(b'USER alice\r\nPASS %s\r\n' % GW_USERS['alice'].encode())
    reply = b''
    while reply.count(b'\n') < 2:
        chunk = ps.recv(4096)
        assert chunk, reply
        reply += chunk
    assert reply.split(b'\n')[1].startswith(b'+OK'), reply
    ss = {s['proto']: s for s in sessions(g) if s['user'] == 'alice'}
    assert set(ss) == {'imap', 'pop3'}, ss
    now = time.time()
    for proto, client, port in (('imap', '127.0.0.1', g.imap_port),
                                ('pop3', '127.0.0.2', g.pop3_port)):
        s = ss[proto]
        assert (s['client'], s['local'], s['server'], s['state']) == \
            (client, '127.0.0.1:%d' % port, 'source', 'relay'), s
        assert isinstance(s['id'], int) and abs(s['since'] - now) < 600, s
    r = g.ctl('sessions')
    assert r.rc == 0, r.describe()
    lines = status_lines(r.stdout)
    # (on a PostgreSQL store the gateways' table comes first)
    lines = lines[[l.startswith('ID ') for l in lines].index(True):]
    assert re.fullmatch(r'ID +USER +PROTO +CLIENT +CONNECTED TO +SERVER +'
                        r'STATE +SINCE', lines[0]), lines[0]
    for proto, client, port in (('imap', '127.0.0.1', g.imap_port),
                                ('pop3', '127.0.0.2', g.pop3_port)):
        row = r'%d +alice +%s +%s +127\.0\.0\.1:%d +source +relay +' \
            r'\d\d:\d\d:\d\d' % (ss[proto]['id'], proto,
                                 re.escape(client), port)
        assert any(re.fullmatch(row, l) for l in lines[1:]), (row, lines)

    r = g.ctl('user', 'list')
    lines = status_lines(r.stdout)
    assert re.fullmatch(r'USER +STATE +POLICY +SESSIONS +MESSAGES',
                        lines[0]), lines[0]
    assert any(re.fullmatch(r'alice +source +default +2 +0', l)
               for l in lines), lines
    assert any(re.fullmatch(r'dave +destination +default +0 +0', l)
               for l in lines), lines
    assert user_list(g)['alice']['sessions'] == 2

    # status: users per state, moved, sessions, the bar.
    counts = {k: 0 for k in STATES}
    for u in user_list(g).values():
        counts[u['state']] += 1
    r = g.ctl('status', '--json')
    j = r.json
    assert j['ok'] is True and j['states'] == counts, r.describe()
    assert (j['messages'], j['bytes'], j['sessions']) == (0, 0, 2), j
    assert (j['copy_messages_done'], j['copy_messages_todo']) == (0, 0), j
    assert isinstance(j['copy_seconds'], float), j
    assert set(j['capabilities']) == {'imap', 'pop3'}, j['capabilities']
    for caps in j['capabilities'].values():
        assert set(caps) == {'advertised', 'source', 'destination'}, caps
    r = g.ctl('status')
    lines = status_lines(r.stdout)
    total = sum(counts.values())
    assert lines[0] == 'users: %d' % total, lines
    assert lines[1:6] == ['  %-12s %d' % (k, counts[k]) for k in STATES], \
        lines
    assert lines[6] == 'moved: 0 messages, 0.0 MB', lines
    assert lines[7] == 'sessions: 2', lines
    fill = 30 * counts['destination'] // total
    assert lines[8] == '[%s%s] %d of %d users on the destination' % (
        '#' * fill, '-' * (30 - fill), counts['destination'], total), lines

    # kick: both of alice's sessions end, IMAP with a BYE.
    raw, _ = raw_connect(g.imap_port)
    raw.sendall(b'k1 LOGIN bob "%s"\r\n' % GW_USERS['bob'].encode())
    assert read_line_tagged(raw, b'k1').startswith(b'k1 OK'), 'bob login'
    r = g.ctl('kick', 'alice', '--json')
    assert r.rc == 0 and r.json == {'ok': True, 'kicked': 2}, r.describe()
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        m.noop()
        m.noop()
    data, closed = read_until_close(ps, 10)
    assert closed, 'the POP3 session was not ended'
    ps.close()
    assert not [s for s in sessions(g) if s['user'] == 'alice']
    # bob's session is untouched; a user without sessions: nothing kicked.
    raw.sendall(b'k2 NOOP\r\n')
    assert read_line_tagged(raw, b'k2').startswith(b'k2 OK')
    r = g.ctl('kick', 'carol', '--json')
    assert r.rc == 0 and r.json['kicked'] == 0, r.describe()
    r = g.ctl('kick', 'bob')
    assert r.rc == 0 and r.stdout == '', r.describe()
    data, closed = read_until_close(raw, 10)
    raw.close()
    assert closed and data.startswith(b'* BYE'), data


def read_line_tagged(s, tag):
    """Lines from s up to the one tagged tag; returns that line."""
    buf = b''
    while True:
        c = s.recv(1)
        assert c, 'closed before %r: %r' % (tag, buf)
        buf += c
        if buf.endswith(b'\n'):
            if buf.startswith(tag + b' '):
                return buf
            buf = b''


def test_operator_commands_need_admin_logins(gpair, make_gw):
    """rollback needs admin logins in the daemon's config; migrate
    --daemon needs them or a login of the user since the start; --wait
    exits 1 for a user who did not end on the source."""
    g = make_gw(tls=False, policy='off')
    assert g.ctl('user', 'add', 'alice', 'state', 'destination').rc == 0
    assert g.ctl('user', 'add', 'bob').rc == 0
    for args, want in ((('rollback', 'alice'), 'alice: needs admin logins'),
                       (('rollback', 'alice', '--wait'),
                        'alice: needs admin logins'),
                       (('rollback', 'bob'), 'bob: needs admin logins'),
                       (('migrate', '--daemon', 'bob'),
                        'bob: needs admin logins'),
                       (('migrate', '--daemon', 'alice'),
                        'alice: already on the destination')):
        r = g.ctl(*args)
        assert r.rc == 1 and want in r.stderr, (args, r.describe())
    assert g.state('alice') == 'destination' and g.state('bob') == 'source'
    r = g.ctl('migrate', '--all', '--json')
    assert r.rc == 1 and 'needs admin logins' in r.stderr, r.describe()


def test_rollback_wait_exit_status(gpair, make_gw, workdir):
    """rollback --wait: 0 and "USER: source" when the user ends on the
    source, 1 when not (a user on the destination the store never
    copied); a user not on the destination is refused at once."""
    g = make_gw(tls=False, policy='off',
                extra_conf=admin_conf(workdir, sweep=False))
    assert g.ctl('user', 'add', 'carol', 'state', 'destination').rc == 0
    r = g.ctl('rollback', 'carol', '--wait')
    assert r.rc == 1 and 'carol: destination: ' in r.stderr and \
        'nothing to roll back' in r.stderr, r.describe()
    assert g.ctl('user', 'add', 'bob').rc == 0
    r = g.ctl('rollback', 'bob', '--wait')
    assert r.rc == 1 and 'bob: bob: not on the destination' in r.stderr, \
        r.describe()
    assert g.ctl('migrate', '--daemon', 'alice').rc == 0
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination'
    r = g.ctl('rollback', 'alice', '--wait')
    assert r.rc == 0 and r.stdout == 'alice: rolling back\nalice: source\n', \
        r.describe()
    assert g.user('alice')['policy'] == 'off'
    gpair.assert_copied('alice')


class Via:
    """A server as the gateway's config sees it, reached through a proxy
    (IMAP only)."""

    pop3_port = None
    tls_ca = None

    def __init__(self, proxy):
        self.proxy = proxy

    def url(self, scheme='imap'):
        return self.proxy.url(scheme)


def test_status_rate_eta_and_watch(gpair, make_gw, workdir):
    """While a copy runs, `status` shows how far it is, its rate and ETA;
    `status --watch` redraws it every second on a terminal. (The copy is
    held mid-way: a proxy in front of the destination stops passing the
    APPENDs on after 300 KB.)"""
    direct(gpair.src, 'alice', mc.append_many, 'INBOX',
           [mc.make_message(600000 + i, 900) for i in range(1500)])
    proxy = tcpproxy.CuttingProxy(gpair.dst.imap_port,
                                  hold_up_after=300 * 1024).start()
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gwrate'), gpair.src,
                         Via(proxy), policy='off', connections=1,
                         src_schemes=('imap', None),
                         dst_schemes=('imap', None),
                         extra_conf=admin_conf(workdir, sweep=False))
    try:
        g.start()
        assert g.ctl('migrate', '--daemon', 'alice').rc == 0
        line = re.compile(r'^copying now: (\d+) of (\d+) messages, (\d+) '
                          r'msg/s, ETA (\d+) s$', re.M)
        assert wait_for(lambda: line.search(g.ctl('status').stdout), 60,
                        0.2), (g.ctl('status').stdout, proxy.holding.is_set())
        done, todo, rate, eta = map(int, line.search(
            g.ctl('status').stdout).groups())
        assert proxy.holding.is_set() and 0 < done < todo and rate > 0, \
            (done, todo, rate)
        assert watch_frames(g, 2, b'copying now: ')
        proxy.release()
        assert g.wait_state('alice', ('destination', 'failed'),
                            timeout=60) == 'destination'
    finally:
        g.stop()
        proxy.stop()
    gpair.assert_copied('alice')


def watch_frames(g, n, want):
    """`status --watch` on a terminal: reads until n whole frames were
    drawn (each starts by clearing the screen); all must hold want and
    the bar."""
    master, slave = pty.openpty()
    w = subprocess.Popen([g.ctl_binary, 'status', '-s', g.socket_path,
                          '--watch'], stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=subprocess.PIPE, start_new_session=True)
    os.close(slave)
    seen = b''
    deadline = time.monotonic() + 60
    try:
        while seen.count(b'\033[H\033[2J') <= n:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([master], [], [], left)[0], \
                'status --watch drew %r in 60 s' % seen[-2000:]
            chunk = os.read(master, 65536)
            assert chunk, seen
            seen += chunk
    finally:
        os.kill(w.pid, signal.SIGTERM)
        w.wait(timeout=10)
        os.close(master)
    for f in seen.split(b'\033[H\033[2J')[1:n + 1]:
        assert want in f and b'users on the destination\r\n' in f, f
    return True
