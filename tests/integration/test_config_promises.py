"""What mailshiftd(8), mailshift.conf(5) and gateway-spec.md ("Running")
promise about starting and stopping mailshiftd: exit status 2 and one line
`mailshiftd: FILE:LINE: why` for a bad configuration, 2 for bad usage, 1
for a listener it cannot open; SIGINT and SIGTERM stop it with 0; the pid
file; no core file and the open-files limit raised whatever the user; the
control socket's path checked (a directory, a symbolic link, a live socket
left alone; a stale one replaced); several listeners of one kind, IPv6 in
brackets; -v logs each login's route, refused plaintext logins, copies
started and verified, and state changes.

Most need no mail server (test_privileges.minimal_conf: mailshiftd alone);
the -v test runs in front of gpair (test_gateway's fixtures)."""

import imaplib
import os
import re
import resource
import signal
import socket
import subprocess

import pytest

import dovecot as dc
import gateway as gwlib
from conftest import wait_for
from test_gateway import GW_USERS, bound_to, gw_imap
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_privileges import minimal_conf, run_daemon


def refused_at(port, host='127.0.0.1'):
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_bad_usage_and_config_exit_2(workdir):
    for argv in ([], ['-x'], ['-f']):
        r = subprocess.run([gwlib.MAILSHIFTD] + argv, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and 'Usage: mailshiftd -c FILE' in r.stderr, \
            (argv, r)
    conf = minimal_conf(workdir, user=False)
    text = open(conf).read()
    port = int(text.split('imap = 127.0.0.1:')[1].split()[0])
    for bad, line, why in (
            ('[daemon]\nbogus = 1\n', 1, 'unknown key "bogus" in [daemon]'),
            ('[policy]\nhold_max_seconds = 1e3\n', 1,
             'hold_max_seconds: "1e3" is not a whole number from 0 to 86400'),
            ('[sweep]\nwindow = 25:00-26:00\n', 1,
             'window: HH:MM-HH:MM (00:00 to 24:00)')):
        with open(conf, 'w') as f:
            f.write(bad + text)
        rc, err = run_daemon(conf)
        # Exactly one line: the file, the line and why.
        assert rc == 2 and err == 'mailshiftd: %s:%d: %s\n' % (
            conf, line + 1, why), (rc, err)
        assert not os.path.exists(os.path.join(workdir, 'control.sock'))
        assert refused_at(port), 'a refused configuration listened'


def test_listener_in_use_exits_1(workdir):
    conf = minimal_conf(workdir, user=False)
    port = int(open(conf).read().split('imap = 127.0.0.1:')[1].split()[0])
    busy = socket.socket()
    busy.bind(('127.0.0.1', port))
    busy.listen(1)
    try:
        rc, err = run_daemon(conf)
    finally:
        busy.close()
    assert rc == 1 and '127.0.0.1:%d' % port in err, (rc, err)
    assert not os.path.exists(os.path.join(workdir, 'pid'))


class Alone(gwlib.Mailshiftd):
    """mailshiftd with no mail server behind it (the harness's start, stop
    and ctl), on a configuration given as text: {imap}, {imap2}, {imap6}
    are free ports, {root} the daemon's directory."""

    def __init__(self, root, text, **kw):
        super().__init__(root, None, None, **kw)
        self.text = text
        self.ports = dc._free_ports(3)

    def config_text(self):
        return self.text.format(root=self.root_dir, imap=self.imap_port,
                                imap2=self.ports[1], imap6=self.ports[2])


def limits(pid):
    """{name: (soft, hard)} from /proc/PID/limits."""
    out = {}
    with open('/proc/%d/limits' % pid) as f:
        for line in f.readlines()[1:]:
            parts = line[26:].split()
            out[line[:26].strip()] = (parts[0], parts[1])
    return out


ALONE = ('[daemon]\npid_file = {root}/mailshiftd.pid\n'
         '[listen]\nimap = 127.0.0.1:{imap}\nimap = 127.0.0.1:{imap2}\n'
         'imap = [::1]:{imap6}\n'
         '[store]\npath = {root}/mailshift.db\n'
         '[control]\nsocket = {root}/control.sock\n')


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM],
                         ids=['SIGINT', 'SIGTERM'])
def test_run_and_stop(workdir, sig):
    """The pid file holds the PID; each [listen] imap line is a listener
    (IPv6 in brackets); no core limit and the open-files soft limit raised
    to the hard one, as root without [daemon] user too; the signal stops
    it with status 0 and the pid file goes."""
    if not socket.has_ipv6 or refused_ipv6_loopback():
        pytest.skip('no IPv6 loopback here: [::1] listeners cannot be tried')
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip('the open-files hard limit (%d) is too low to see it '
                    'raised' % hard)
    g = Alone(os.path.join(workdir, 'alone'), ALONE)
    # A low soft limit to start from (the daemon inherits it).
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        g.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        with open(g.pid_file) as f:
            assert f.read() == '%d\n' % g.pid
        for host, port in (('127.0.0.1', g.imap_port),
                           ('127.0.0.1', g.ports[1]), ('::1', g.ports[2])):
            with socket.create_connection((host, port), timeout=10) as s:
                assert s.recv(4096).startswith(b'* OK'), (host, port)
        lim = limits(g.pid)
        assert lim['Max core file size'] == ('0', '0'), lim
        assert lim['Max open files'] == (str(hard), str(hard)), lim
        os.kill(g.pid, sig)
        assert g.proc.wait(timeout=30) == 0
        assert not os.path.exists(g.pid_file)
        assert refused_at(g.imap_port)
    finally:
        g.stop()


def refused_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(('::1', 0))
        s.close()
        return False
    except OSError:
        return True


def test_control_socket_path(workdir):
    """Anything but a stale socket at [control] socket (a directory, a
    symbolic link, a socket another process listens on) stops mailshiftd
    at start and is left alone; a stale socket is replaced."""
    conf = minimal_conf(workdir, user=False)
    path = os.path.join(workdir, 'control.sock')

    os.mkdir(path)
    rc, err = run_daemon(conf)
    assert rc == 1 and 'control socket %s: exists and is not a socket' \
        % path in err, (rc, err)
    assert os.path.isdir(path) and os.listdir(path) == []
    os.rmdir(path)

    target = os.path.join(workdir, 'target')
    with open(target, 'w') as f:
        f.write('keep\n')
    os.symlink(target, path)
    rc, err = run_daemon(conf)
    assert rc == 1 and 'control socket %s: exists and is not a socket' \
        % path in err, (rc, err)
    assert os.readlink(path) == target and open(target).read() == 'keep\n'
    os.unlink(path)

    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    ino = os.stat(path).st_ino
    try:
        rc, err = run_daemon(conf)
        assert rc == 1 and 'control socket %s: in use' % path in err, \
            (rc, err)
        assert os.stat(path).st_ino == ino
    finally:
        live.close()

    # Now stale: nobody listens on it. mailshiftd replaces it.
    g = Alone(os.path.join(workdir, 'stale'), ALONE.replace(
        'imap = [::1]:{imap6}\n', ''))
    os.makedirs(g.root_dir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(g.socket_path)
    stale.close()
    os.chmod(g.socket_path, 0o644)
    try:
        g.start()
        # Served (a stale socket refuses connections), and mode 0600.
        assert os.stat(g.socket_path).st_mode & 0o777 == 0o600
        r = g.ctl('status', '--json')
        assert r.rc == 0 and r.json['ok'] is True, r.describe()
    finally:
        g.stop()


def test_verbose_log(gpair, make_gw):
    """mailshiftd -v logs each login's route, refused plaintext logins,
    each copy's start and end and users' state changes."""
    g = make_gw(tls=False, policy='passthrough',
                extra_conf='[listen]\ntrusted_networks = 127.0.0.2')
    m = gw_imap(g)
    with pytest.raises(imaplib.IMAP4.error, match='PRIVACYREQUIRED'):
        m.login('alice', GW_USERS['alice'])
    m.shutdown()
    assert wait_for(lambda: 'plaintext login refused' in g.log_text(), 10)
    trusted = bound_to(imaplib.IMAP4, '127.0.0.2')
    m = trusted('127.0.0.1', g.imap_port, timeout=30)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()
    assert g.wait_state('alice', ('destination', 'failed'),
                        timeout=60) == 'destination'
    log = g.log_text()
    assert re.search(r'login: user=<alice> .* proto=imap .* server=source '
                     r'result=ok$', log, re.M), log[-3000:]
    for line in ('alice: copy started', 'alice: copy verified: ',
                 'alice: state cutover', 'alice: copy started (the last '
                 'delta)', 'alice: state destination'):
        assert line in log, (line, log[-3000:])
    m = trusted('127.0.0.1', g.imap_port, timeout=30)
    assert m.login('alice', GW_USERS['alice'])[0] == 'OK'
    m.logout()
    assert wait_for(lambda: re.search(
        r'login: user=<alice> .* proto=imap .* server=destination '
        r'result=ok$', g.log_text(), re.M), 10), g.log_tail(10)


def test_tls_key_must_be_roots(workdir, ca):
    """[tls] key: refused unless root's and readable by its owner only
    (checked by -t and at start alike)."""
    cert, key = ca.issue('keyowner', ('127.0.0.1',))
    conf = minimal_conf(workdir, user=False)
    with open(conf, 'a') as f:
        f.write('[tls]\ncert = %s\nkey = %s\n' % (cert, key))
    os.chmod(key, 0o600)
    r = subprocess.run([gwlib.MAILSHIFTD, '-t', '-c', conf],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and 'configuration ok' in r.stdout, r
    os.chown(key, 65534, -1)
    for argv in (['-t', '-c', conf], ['-c', conf, '-f']):
        r = subprocess.run([gwlib.MAILSHIFTD] + argv, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and 'key file %s belongs to uid 65534: it ' \
            'must belong to root' % key in r.stderr, (argv, r)
    assert not os.path.exists(os.path.join(workdir, 'control.sock'))
