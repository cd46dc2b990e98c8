"""`mailshiftctl migrate` as docs/cli-spec.md and mailshiftctl(8) promise
it, where test_mover.py does not look: the per-server connection cap, a
copy into a destination the store knows nothing of, the login mechanism
forced, --dest-user with %u, the config file (no password key, ranges,
the command line winning), the progress bar and its default, the JSON
summary's fields, --rollback's usage errors.

Fixtures from conftest.py (make_pair, Migrator); a proxy in front of each
server (tests/lib/tcpproxy.py) counts the connections open at once."""

import os
import pty
import re
import select
import signal
import subprocess
import time

import pytest

import mailcheck as mc
import tcpproxy
from conftest import DST_USERS, MASTER, SRC_USERS, Migrator, server_snapshot
from test_gateway import direct
from test_mover import ok_summary

USERS = ('u1', 'u2', 'u3')
SUMMARY_KEYS = {'user', 'ok', 'error', 'verified', 'copied', 'bytes',
                'flags_updated', 'expunged', 'repaired', 'seconds', 'folders',
                'phases'}
FOLDER_KEYS = {'source', 'destination', 'copied', 'flags_updated', 'expunged',
               'source_messages', 'dest_messages', 'source_bytes',
               'dest_bytes', 'verified', 'mismatch', 'repaired', 'error'}


def test_connection_cap_and_unknown_destination(make_pair, ctl, workdir):
    """Several users in one process never hold more than --connections
    (default 4) connections to either server; a second copy with a store
    that knows nothing (the destination already full) matches by
    fingerprint and copies nothing, changing nothing."""
    pair = make_pair(users=USERS)
    proxies = [tcpproxy.CuttingProxy(pair.src.imap_port).start(),
               tcpproxy.CuttingProxy(pair.dst.imap_port).start()]
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    try:
        for n, conns, store in ((1, ['--connections', '1'], 'one.db'),
                                (4, [], 'fresh.db'),
                                (2, ['--connections', '2'], 'two.db')):
            for p in proxies:
                p.max_open = 0
            before = pair.dst_snapshot('u1', with_uids=True)
            res = m.run(list(USERS), '--source-admin', MASTER[0],
                        '--dest-admin', MASTER[0], *conns,
                        src_password=MASTER[1], dst_password=MASTER[1],
                        source=proxies[0].url(), dest=proxies[1].url(),
                        store=os.path.join(workdir, store), expect_rc=0)
            assert res.json['ok'] is True, res.describe()
            got = {u['user']: u for u in res.json['users']}
            assert set(got) == set(USERS), res.describe()
            for p, side in zip(proxies, ('source', 'destination')):
                assert 1 <= p.max_open <= n, \
                    '%d connections to the %s at once with %s' % (
                        p.max_open, side, conns or 'the default')
            if n == 1:
                assert all(u['copied'] == 15 for u in got.values()), \
                    res.describe()
                continue
            # The store knows nothing of what the destination holds.
            assert all(u['copied'] == 0 and u['verified'] for u in
                       got.values()), res.describe()
            assert pair.dst_snapshot('u1', with_uids=True) == before
        for u in USERS:
            pair.assert_copied(u)
    finally:
        for p in proxies:
            p.stop()


def logins(proxy):
    """The login commands a client sent through proxy, in order: 'LOGIN'
    or 'AUTHENTICATE PLAIN' / 'AUTHENTICATE LOGIN'."""
    return [m.group(1).decode().upper() for m in re.finditer(
        rb'(?im)^\S+ (LOGIN|AUTHENTICATE \w+)[ \r]', bytes(proxy.up))]


def proxied(pair):
    """Proxies in front of pair's IMAP servers that keep what the client
    sends."""
    return [tcpproxy.CuttingProxy(pair.src.imap_port, keep_up=True).start(),
            tcpproxy.CuttingProxy(pair.dst.imap_port, keep_up=True).start()]


def test_auth_user_and_summary(make_pair, ctl, workdir):
    """--source-auth / --dest-auth force the mechanism (default: PLAIN when
    offered); --dest-user with %u names the destination's login; the JSON
    summary has every field cli-spec.md lists."""
    pair = make_pair(users=('smallie',))
    pair.dst.add_user('copy-smallie', DST_USERS['smallie'])
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    src, dst = proxied(pair)
    try:
        res = m.run('smallie', '--dest-user', 'copy-%u', source=src.url(),
                    dest=dst.url(), expect_rc=0)
        j = ok_summary(res, 'smallie')
        assert set(j) == SUMMARY_KEYS, j
        assert isinstance(j['seconds'], float) and j['expunged'] == 0, j
        for f in j['folders']:
            assert set(f) == FOLDER_KEYS and f['error'] is None, f
        assert set(logins(src)) == set(logins(dst)) == \
            {'AUTHENTICATE PLAIN'}, (logins(src), logins(dst))
        pair.assert_copied('smallie', dst_user='copy-smallie')
        assert not pair.dst_snapshot('smallie').get('INBOX')

        for p in (src, dst):
            p.up.clear()
        res = m.run('smallie', '--source-auth', 'login', '--dest-auth',
                    'plain', '--dest-user', 'copy-%u', source=src.url(),
                    dest=dst.url(), expect_rc=0)
        assert ok_summary(res)['copied'] == 0, res.describe()
        assert set(logins(src)) == {'LOGIN'}, logins(src)
        assert set(logins(dst)) == {'AUTHENTICATE PLAIN'}, logins(dst)
    finally:
        src.stop()
        dst.stop()
    res = m.run('smallie', '--source-auth', 'cram-md5')
    assert res.rc == 2 and 'source auth "cram-md5": expected plain or ' \
        'login' in res.stderr, res.describe()


def write(path, text, mode=0o600):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_config_file_rules(make_pair, ctl, workdir):
    """A password key is refused; [mover] numbers are checked like the
    options; options on the command line win over the file; [source] auth
    forces the mechanism."""
    pair = make_pair(users=('smallie',))
    src, dst = proxied(pair)
    m = Migrator(ctl, pair, os.path.join(workdir, 'unused.db'))
    pwf = write(os.path.join(workdir, 'src.pw'), SRC_USERS['smallie'] + '\n')
    base = ('[source]\nurl = %s\npassword_file = %s\nauth = login\n'
            '[destination]\nurl = %s\n[store]\npath = %s\n'
            % (src.url(), pwf, dst.url(),
               os.path.join(workdir, 'from-file.db')))
    cfg = os.path.join(workdir, 'mailshift.conf')
    for extra, why in (('[destination]\npassword = x\n',
                        'passwords do not go into the config file'),
                       ('[mover]\nconnections = 65\n', 'connections: "65"'),
                       ('[mover]\nconnections = many\n',
                        'connections: "many"'),
                       ('[mover]\nbatch = 0\n', 'batch: "0"'),
                       ('[source]\nfolder = x\n', 'unknown key "folder"')):
        write(cfg, base + extra)
        res = m.run('smallie', '-c', cfg, bare=True, src_password=False)
        assert res.rc == 2 and why in res.stderr, (extra, res.describe())
    assert not os.path.exists(os.path.join(workdir, 'from-file.db'))
    assert not src.up, 'a refused configuration contacted the source'

    write(cfg, base + '[mover]\nconnections = 2\nbatch = 5\n')
    store = os.path.join(workdir, 'from-argv.db')
    try:
        res = m.run('smallie', '-c', cfg, '--store', store, bare=True,
                    src_password=False, expect_rc=0)
    finally:
        src.stop()
        dst.stop()
    ok_summary(res, 'smallie')
    assert os.path.exists(store)
    assert not os.path.exists(os.path.join(workdir, 'from-file.db'))
    assert set(logins(src)) == {'LOGIN'}, logins(src)
    pair.assert_copied('smallie')


def test_progress_bar(pair, migrator):
    """--progress draws the bar on stderr, --no-progress does not; by
    default it is drawn when stderr is a terminal."""
    bar = re.compile(r'\[#{30}\] 100%  folders \d+/\d+  msgs \d+/\d+ ')
    res = migrator.run('alice', '--progress', expect_rc=0)
    assert bar.search(res.stderr), res.describe()
    res = migrator.run('alice', expect_rc=0)          # --no-progress
    assert '[' not in res.stderr and 'msgs' not in res.stderr, res.describe()

    argv = [a for a in migrator.argv('alice', []) if a != '--no-progress']
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(argv, env=migrator.env('alice', None, None),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=slave, start_new_session=True)
        os.close(slave)
        out, _ = p.communicate(timeout=120)
        seen = b''
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:               # EIO: the pty's other end closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert p.returncode == 0, (out, seen)
    assert bar.search(seen.decode(errors='replace')), seen[-500:]
    assert mc.count(pair.dst_snapshot('alice')) > 0


@pytest.mark.parametrize('args,why', [
    (['--source', 'pop3://127.0.0.1:1', '--rollback'],
     '--rollback needs an IMAP source'),
    (['--rollback', '--daemon'], '--rollback runs here, not through '
     'mailshiftd'),
    (['--rollback', '--all'], '--rollback runs here, not through mailshiftd'),
], ids=['pop3-source', 'daemon', 'all'])
def test_rollback_usage_errors(ctl, workdir, args, why):
    """--rollback: a POP3 source, --daemon or --all are usage errors (exit
    2) and nothing is contacted (the URLs point at a closed port)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('MAILSHIFT_')}
    env['MAILSHIFT_SOURCE_PASSWORD'] = env['MAILSHIFT_DEST_PASSWORD'] = 'x'
    argv = [ctl, 'migrate', '--store', os.path.join(workdir, 's.db'),
            '--dest', 'imap://127.0.0.1:1']
    if '--source' not in args:
        argv += ['--source', 'imap://127.0.0.1:1']
    r = subprocess.run(argv + args + ['smallie'], env=env, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and why in r.stderr, (argv + args, r)
    assert not os.path.exists(os.path.join(workdir, 's.db'))


def test_colliding_names_stop_the_copy(make_pair, ctl, workdir):
    """Two source folders that would land on one destination name (here
    the source's \\Sent folder "Sent" and a plain folder "Sent Items", the
    destination's \\Sent) stop the copy with an error naming both; nothing
    is merged (names = destination: with the source's names there is no
    such pair)."""
    pair = make_pair(users=('smallie',))
    pair.names = 'destination'
    direct(pair.src, 'smallie', mc.create_folder, 'Sent Items')
    direct(pair.src, 'smallie', mc.append_many, 'Sent Items',
           [mc.make_message(77000, 900)])
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    res = m.run('smallie')
    assert res.rc == 1, res.describe()
    assert re.search(r'folders "(Sent|Sent Items)" and "(Sent|Sent Items)" '
                     r'would both', res.stderr), res.describe()
    assert not any(pair.dst_snapshot('smallie').values()), \
        'mail was copied although two folders collide'


def test_password_prompt(pair, migrator):
    """Without a password file or the environment, the passwords are
    asked for on the terminal (/dev/tty), not echoed, and the copy runs."""
    argv = migrator.argv('alice', [])
    env = migrator.env('alice', False, False)
    pid, fd = pty.fork()
    if pid == 0:                            # the child: the pty is its tty
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    seen = b''
    deadline = time.monotonic() + 120

    def read_more():
        """What the child wrote next; b'' at its end (EIO)."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            pytest.fail('mailshiftctl hung at its password prompt; it '
                        'wrote: %r' % seen[-500:], pytrace=False)
        try:
            return os.read(fd, 65536)
        except OSError:                     # EIO: the child's side closed
            return b''
    try:
        for what, pw in (('source', SRC_USERS['alice']),
                         ('destination', DST_USERS['alice'])):
            prompt = ('%s password for alice: ' % what).encode()
            while prompt not in seen:
                chunk = read_more()
                assert chunk, seen
                seen += chunk
            seen = seen.split(prompt, 1)[1]
            os.write(fd, pw.encode() + b'\n')
        chunk = read_more()
        while chunk:
            seen += chunk
            chunk = read_more()
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen[-2000:]
    for pw in (SRC_USERS['alice'], DST_USERS['alice']):
        assert pw.encode() not in seen, 'the password was echoed'
    pair.assert_copied('alice')


def test_batch(make_pair, ctl, workdir):
    """Messages go in windows of --batch (default 100): one MULTIAPPEND
    per window of each folder, seen on the wire."""
    pair = make_pair(users=('smallie',))
    direct(pair.src, 'smallie', mc.append_many, 'INBOX',
           [mc.make_message(78000 + i, 600) for i in range(250)])
    sizes = [len(v) for v in server_snapshot(pair.src, 'smallie').values()
             if v]
    m = Migrator(ctl, pair, os.path.join(workdir, 'store.db'))
    for batch, args, user in ((100, [], 'smallie'),
                              (30, ['--batch', '30'], 'b30-smallie')):
        if user != 'smallie':
            pair.dst.add_user(user, DST_USERS['smallie'])
        dst = tcpproxy.CuttingProxy(pair.dst.imap_port, keep_up=True).start()
        try:
            res = m.run('smallie', '--dest-user', user, *args,
                        dest=dst.url(), store=os.path.join(workdir, user),
                        expect_rc=0)
        finally:
            dst.stop()
        ok_summary(res, 'smallie')
        appends = re.findall(rb'(?m)^\S+ APPEND ', bytes(dst.up))
        assert len(appends) == sum(-(-n // batch) for n in sizes), \
            (batch, len(appends), sizes)
        pair.assert_copied('smallie', dst_user=user)
