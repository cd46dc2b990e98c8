"""mailshiftd with least privilege ([daemon] user, docs/mailshift.conf.5):
it opens what needs root, then runs as `nobody` with no capability (or
only CAP_NET_ADMIN and CAP_NET_RAW for transparent listeners), not
dumpable, and still serves logins and moves users; the control socket
serves root, the daemon's user and members of [control] group only, and
refuses others with one JSON error line; oversized control lines are
refused; a wrong store directory owner or a file where the socket goes is
a clear error at start.

Reuses test_gateway.py's fixtures (gpair: a source holding alice's and
bob's corpora, an empty destination) and tests/lib/gateway.py's Mailshiftd.
Clients of another uid run as subprocesses with user=/group=/extra_groups=
(the tests run as root, like the rest of the suite)."""

import grp
import imaplib
import json
import os
import pwd
import re
import stat
import subprocess
import sys

import pytest

import dovecot as dc
import gateway as gwlib
from conftest import _failed, wait_for
from test_gateway import GW_USERS, exists, direct
from test_gateway import gpair, gw_golden  # noqa: F401 (fixtures)
from test_steer import _from

# About the daemon's files as nobody: its store is the SQLite file.
pytestmark = pytest.mark.sqlite_store

NOBODY = pwd.getpwnam('nobody')
OTHER = pwd.getpwnam('daemon')          # neither root nor nobody
CTL_GROUP = grp.getgrnam('mail')        # the [control] group of the tests
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
NET_CAPS = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
PERMISSION_DENIED = {'ok': False, 'error': 'permission denied'}


@pytest.fixture
def make_unpriv(gpair, workdir, request):
    """make_unpriv(extra_conf='', **Mailshiftd kwargs) -> a started
    mailshiftd with [daemon] user = nobody, its directory (store, control
    socket, pid file) nobody's. Stopped (SIGTERM by PID) after the test."""
    made = []

    def make(extra_conf='', **kw):
        root = os.path.join(workdir, 'unpriv%d' % len(made))
        os.makedirs(root)
        os.chown(root, NOBODY.pw_uid, NOBODY.pw_gid)
        os.chmod(root, 0o755)
        g = gwlib.Mailshiftd(root, gpair.src, gpair.dst,
                             extra_conf='[daemon]\nuser = nobody\n' +
                             extra_conf, **kw)
        made.append(g)
        g.start()
        return g

    yield make
    for g in made:
        g.stop()
        if _failed(request):
            print('----- mailshiftd %s (last lines)' % g.log_path)
            print(g.log_tail(60))


def status_fields(path):
    """/proc/.../status as {field: value}."""
    with open(path) as f:
        return dict(line.rstrip('\n').split(':\t', 1) for line in f
                    if ':\t' in line)


def tasks(pid):
    """/proc/PID/status of each of the process's threads, main one first."""
    tids = sorted(int(t) for t in os.listdir('/proc/%d/task' % pid))
    tids.remove(pid)
    return [status_fields('/proc/%d/task/%d/status' % (pid, t))
            for t in [pid] + tids]


def caps(st, name):
    return int(st[name], 16)


def limits(pid):
    """/proc/PID/limits as {name: (soft, hard)}."""
    out = {}
    with open('/proc/%d/limits' % pid) as f:
        for line in f.readlines()[1:]:
            m = re.match(r'(.+?)\s{2,}(\S+)\s+(\S+)', line)
            if m:
                out[m.group(1)] = (m.group(2), m.group(3))
    return out


# One control client, used here (as root) and, run by `python3 -c`, as
# another user: sends data, returns what comes back: `lines` lines, or
# (lines None) all until the daemon closes. A daemon that refuses a client
# closes before reading: the client's write may then fail, and its reads
# end with a reset after the daemon's last line.
CONTROL_RAW = r'''
import socket


def control_raw(path, data, lines=None):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        while lines is None or out.count(b"\n") < lines:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            out += d
        return out
'''
_ns = {}
exec(CONTROL_RAW, _ns)
control_raw = _ns['control_raw']

# As another user: {"errno": N} when it cannot connect, else {"reply":
# what came back}.
CLIENT = CONTROL_RAW + r'''
import json, sys

path, line, lines = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
try:
    out = control_raw(path, line + b"\n", None if lines == "all" else 1)
except (PermissionError, ConnectionRefusedError, FileNotFoundError) as e:
    print(json.dumps({"errno": e.errno}))
    sys.exit(0)
print(json.dumps({"reply": out.decode(errors="replace")}))
'''


def client(path, line, uid=0, gid=0, groups=(), until_closed=False):
    """One request as uid/gid/groups; until_closed: read until the daemon
    closes (else one line)."""
    r = subprocess.run([sys.executable, '-c', CLIENT, path, line,
                        'all' if until_closed else '1'],
                       user=uid, group=gid, extra_groups=list(groups),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors='replace')
    out = json.loads(r.stdout)
    if out.get('reply'):
        out['json'] = json.loads(out['reply'])
    return out


def status_ok(out):
    return out.get('json', {}).get('ok') is True and \
        'states' in out['json'], out


# ------------------------------------------------------------------ tests

def test_runs_as_nobody(gpair, make_unpriv, ca):
    """Every thread runs as nobody:nogroup with no supplementary group and
    no capability at all (bounding set included); the process is not
    dumpable (its /proc files are root's, nobody cannot read its memory or
    environment) and has no core limit; logins still reach Dovecot (TLS
    too: the key was read as root), and the user is moved and flipped, so
    the store is written as nobody."""
    g = make_unpriv(tls_ca=ca, policy='passthrough')
    assert 'running as uid %d gid %d' % (NOBODY.pw_uid, NOBODY.pw_gid) in \
        g.log_text(), g.log_tail()
    for st in tasks(g.pid):
        assert st['Uid'].split() == [str(NOBODY.pw_uid)] * 4, st
        assert st['Gid'].split() == [str(NOBODY.pw_gid)] * 4, st
        assert st['Groups'].strip() == '', st
        for c in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
            assert caps(st, c) == 0, (c, st)
        assert st['NoNewPrivs'] == '1', st

    # Not dumpable: the kernel gives its /proc files to root, and a
    # process of the same uid cannot read them. A dumpable nobody
    # process shows the difference.
    other = subprocess.Popen(['sleep', '60'], user=NOBODY.pw_uid,
                             group=NOBODY.pw_gid, extra_groups=[])
    try:
        assert os.stat('/proc/%d/environ' % other.pid).st_uid == \
            NOBODY.pw_uid
        assert os.stat('/proc/%d/environ' % g.pid).st_uid == 0
        probe = subprocess.run(
            [sys.executable, '-c', 'open("/proc/%d/environ").read()' % g.pid],
            user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        assert probe.returncode != 0 and b'PermissionError' in probe.stderr, \
            probe.stderr
    finally:
        other.kill()
        other.wait()
    lim = limits(g.pid)
    assert lim['Max core file size'] == ('0', '0'), lim
    soft, hard = lim['Max open files']
    assert soft == hard, lim

    # Logins through it, plain and TLS.
    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=30)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    n_src = direct(gpair.src, 'alice', exists)
    assert exists(m) == n_src
    m.logout()
    m = imaplib.IMAP4_SSL('127.0.0.1', g.imaps_port,
                          ssl_context=ca.ssl_context(), timeout=30)
    assert m.login('bob', GW_USERS['bob'])[0] == 'OK'
    assert exists(m) == direct(gpair.src, 'bob', exists)
    m.logout()
    # The copy, the verification and the flip: the store written as
    # nobody, through its -wal file.
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail()
    gpair.assert_copied('alice')
    for suffix in ('', '-wal', '-shm'):
        assert os.stat(g.store_path + suffix).st_uid == NOBODY.pw_uid, suffix
    assert os.stat(g.socket_path).st_uid == NOBODY.pw_uid
    assert stat.S_IMODE(os.stat(g.socket_path).st_mode) == 0o600

    # At exit, nobody removes what it may: the pid file and the socket.
    assert g.stop() == 0, g.log_tail()
    assert not os.path.exists(g.pid_file)
    assert not os.path.exists(g.socket_path)


def test_transparent_net_caps(make_unpriv):
    """With transparent listeners the event loop's thread keeps
    CAP_NET_ADMIN and CAP_NET_RAW (effective and permitted), nothing else;
    every other thread has none; the bounding set holds those two only."""
    g = make_unpriv(transparent=True)
    assert 'with CAP_NET_ADMIN, CAP_NET_RAW' in g.log_text(), g.log_tail()
    main, *others = tasks(g.pid)
    assert caps(main, 'CapEff') == NET_CAPS, main
    assert caps(main, 'CapPrm') == NET_CAPS, main
    for st in [main] + others:
        assert st['Uid'].split() == [str(NOBODY.pw_uid)] * 4, st
        assert caps(st, 'CapBnd') == NET_CAPS, st
        assert caps(st, 'CapInh') == 0 and caps(st, 'CapAmb') == 0, st
    for st in others:
        assert caps(st, 'CapEff') == 0 and caps(st, 'CapPrm') == 0, st
    # The transparent listener serves.
    m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=30)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()


def test_transparent_upstream_keeps_net_caps(make_unpriv):
    """A server's transparent = yes (connecting from the client's address:
    IP_TRANSPARENT on the upstream socket) keeps the same two capabilities
    as transparent listeners, and nothing else."""
    g = make_unpriv(extra_conf='[source]\ntransparent = yes\n\n'
                    '[destination]\ntransparent = yes\n')
    assert 'with CAP_NET_ADMIN, CAP_NET_RAW' in g.log_text(), g.log_tail()
    main, *others = tasks(g.pid)
    assert caps(main, 'CapEff') == NET_CAPS, main
    assert caps(main, 'CapBnd') == NET_CAPS, main
    for st in others:
        assert caps(st, 'CapEff') == 0 and caps(st, 'CapPrm') == 0, st
    # A loopback client (127.0.0.2: its replies would come from 127.0.0.1)
    # is connected from the host's address, said once at -v.
    m = _from(imaplib.IMAP4, '127.0.0.2')('127.0.0.1', g.imap_port,
                                          timeout=30)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()
    said = 'transparent upstream: client 127.0.0.2 is this host\'s own'
    assert wait_for(lambda: said in g.log_text(), 10), g.log_tail()


def test_kmod_backend_keeps_net_caps(make_unpriv):
    """[steer] backend = kmod: mailshiftd writes its sessions into the
    module's session map for its whole life, so it keeps the same two
    capabilities. This host cannot load the module: relayed logins go on,
    and the trouble is logged once, not per session."""
    g = make_unpriv(extra_conf='[steer]\nbackend = kmod\n'
                    'address = 10.77.1.2\nport = 143 10143\n')
    assert 'with CAP_NET_ADMIN, CAP_NET_RAW' in g.log_text(), g.log_tail()
    main, *_ = tasks(g.pid)
    assert caps(main, 'CapEff') == NET_CAPS, main
    for _ in range(2):
        m = imaplib.IMAP4('127.0.0.1', g.imap_port, timeout=30)
        assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
        m.select('INBOX')
        m.logout()
    said = 'steering: the mailshift kernel module is not loaded'
    assert wait_for(lambda: said in g.log_text(), 10), g.log_tail()
    assert g.log_text().count(said) == 1, g.log_tail()


def test_control_socket_peers(make_unpriv):
    """[control] group = mail: the socket is nobody:mail 0660. Root, the
    daemon's user and members of mail (primary or supplementary group) are
    served; another user cannot connect; should the socket's mode let him
    (here: chmod 0666), the daemon still refuses him on his credentials,
    with one JSON error line, closes, and logs his uid and pid."""
    g = make_unpriv(extra_conf='[control]\ngroup = mail\n')
    st = os.stat(g.socket_path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
        (NOBODY.pw_uid, CTL_GROUP.gr_gid, 0o660)
    req = '{"cmd":"status"}'
    assert status_ok(client(g.socket_path, req))
    assert status_ok(client(g.socket_path, req, NOBODY.pw_uid,
                            NOBODY.pw_gid))
    assert status_ok(client(g.socket_path, req, OTHER.pw_uid, OTHER.pw_gid,
                            [CTL_GROUP.gr_gid]))
    assert status_ok(client(g.socket_path, req, OTHER.pw_uid,
                            CTL_GROUP.gr_gid))
    res = g.ctl('status', '--json')             # mailshiftctl, as root
    assert res.rc == 0, res.describe()

    out = client(g.socket_path, req, OTHER.pw_uid, OTHER.pw_gid)
    assert out == {'errno': 13}, out            # EACCES: the mode
    os.chmod(g.socket_path, 0o666)
    try:
        out = client(g.socket_path, req, OTHER.pw_uid, OTHER.pw_gid,
                     until_closed=True)
    finally:
        os.chmod(g.socket_path, 0o660)
    # One line, then closed.
    assert out['reply'] == json.dumps(PERMISSION_DENIED,
                                      separators=(',', ':')) + '\n', out
    # mailshiftctl says so too.
    os.chmod(g.socket_path, 0o666)
    try:
        r = subprocess.run([g.ctl_binary, 'status', '-s', g.socket_path],
                           user=OTHER.pw_uid, group=OTHER.pw_gid,
                           extra_groups=[], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
    finally:
        os.chmod(g.socket_path, 0o660)
    assert r.returncode != 0
    assert b'permission denied' in r.stderr, r.stderr
    assert wait_for(lambda: re.search(
        r'control socket: refused a client \(uid %d, pid \d+\)' %
        OTHER.pw_uid, g.log_text()), 10), g.log_tail()
    assert status_ok(client(g.socket_path, req))


def test_control_lines_bounded(make_unpriv):
    """A request line of 64 KiB is served; one byte more gets an error
    line and the connection is closed; several requests in one write are
    each answered, in order."""
    g = make_unpriv()
    path = g.socket_path
    fill = 64 * 1024 - len('{"cmd":"status"}')
    line = b'{"cmd":"status"' + b' ' * fill + b'}'
    assert len(line) == 64 * 1024
    rep = json.loads(control_raw(path, line + b'\n', 1))
    assert rep['ok'] is True, rep
    rep = control_raw(path, b'{"cmd":"status"' + b' ' * (fill + 1) + b'}\n')
    assert rep.count(b'\n') == 1, rep
    assert json.loads(rep) == {'ok': False, 'error': 'request too long '
                               '(more than 65536 bytes in a line)'}
    # No newline at all, well over the limit: the same, then closed.
    rep = control_raw(path, b'x' * (100 * 1024))
    assert json.loads(rep)['error'].startswith('request too long'), rep
    reps = control_raw(path, b'{"cmd":"status"}\n{"cmd":5}\n'
                       b'{"cmd":"user.list"}\n', 3)
    reps = [json.loads(r) for r in reps.splitlines()]
    assert [r['ok'] for r in reps] == [True, False, True], reps
    assert reps[1]['error'] == '"cmd" must be a string'
    assert 'users' in reps[2]
    res = g.ctl('status', '--json')
    assert res.rc == 0, res.describe()


def minimal_conf(d, user=True, store_dir=None):
    """A configuration of mailshiftd alone (no server is reached), its
    store, socket and pid file in d (the store in store_dir if given)."""
    text = ('[daemon]\n%spid_file = %s/pid\n'
            '[listen]\nimap = 127.0.0.1:%d\n'
            '[store]\npath = %s/store.db\n'
            '[control]\nsocket = %s/control.sock\n'
            % ('user = nobody\n' if user else '', d, dc.free_port(),
               store_dir or d, d))
    path = os.path.join(d, 'mailshift.conf')
    with open(path, 'w') as f:
        f.write(text)
    return path


def run_daemon(conf):
    """Runs mailshiftd on conf, expecting it to exit at start."""
    r = subprocess.run([gwlib.MAILSHIFTD, '-c', conf, '-f'],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stderr.decode(errors='replace')


def test_file_at_socket_path(workdir):
    """A regular file where the control socket goes: mailshiftd exits with
    a clear message and the file is left as it was. Run as root without
    [daemon] user, it says so first."""
    conf = minimal_conf(workdir, user=False)
    sock = os.path.join(workdir, 'control.sock')
    with open(sock, 'w') as f:
        f.write('not a socket\n')
    rc, err = run_daemon(conf)
    assert rc != 0
    assert 'running as root: set [daemon] user' in err, err
    assert 'control socket %s: exists and is not a socket; refusing to ' \
        'replace it' % sock in err, err
    with open(sock) as f:
        assert f.read() == 'not a socket\n'
    assert not os.path.exists(os.path.join(workdir, 'pid'))


def test_store_dir_owner(workdir):
    """[daemon] user = nobody with the store in a root-owned directory, or
    a store file of root's: a clear error at start, before listening, and
    nothing made there."""
    d = os.path.join(workdir, 'run')
    store_dir = os.path.join(workdir, 'rootstore')
    for x in (d, store_dir):
        os.makedirs(x)
        os.chmod(x, 0o755)
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    conf = minimal_conf(d, store_dir=store_dir)
    rc, err = run_daemon(conf)
    assert rc == 2, err
    assert '%s: user nobody cannot write in it (Permission denied): the ' \
        "store's directory must be writable by [daemon] user" % store_dir \
        in err, err
    assert os.listdir(store_dir) == []
    assert not os.path.exists(os.path.join(d, 'control.sock'))

    # The directory is nobody's, the store file root's.
    os.chown(store_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    with open(os.path.join(store_dir, 'store.db'), 'w'):
        pass
    os.chmod(os.path.join(store_dir, 'store.db'), 0o600)
    rc, err = run_daemon(conf)
    assert rc == 2, err
    assert "user nobody cannot read and write it (Permission denied): the " \
        "store's files must belong to [daemon] user" in err, err
