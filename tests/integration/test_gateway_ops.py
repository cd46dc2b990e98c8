"""mailshiftd operations: the background sweep with admin (master) logins,
metrics, recovery of an interrupted cutover, and kill -9 of the daemon in
the middle of a copy (no message lost or duplicated after the restart).

Reuses the fixtures of test_gateway.py (gpair: a source holding alice's and
bob's corpora, an empty destination; make_gw: a started mailshiftd)."""

import os
import signal
import socket
import time

import pytest

import gateway as gwlib
from conftest import MASTER
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)


def admin_conf(workdir, mode=0o600, sweep=True, metrics_port=None):
    pwf = os.path.join(workdir, 'admin.pw')
    with open(pwf, 'w') as f:
        f.write(MASTER[1] + '\n')
    os.chmod(pwf, mode)
    lines = ['[source]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf,
             '[destination]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf]
    if sweep:
        lines += ['[sweep]', 'enabled = yes', 'interval = 1',
                  'concurrency = 1']
    if metrics_port:
        lines += ['[metrics]', 'listen = 127.0.0.1:%d' % metrics_port]
    return '\n'.join(lines)


def http_get(port, path='/metrics'):
    s = socket.create_connection(('127.0.0.1', port), timeout=10)
    s.sendall(b'GET ' + path.encode() + b' HTTP/1.0\r\n\r\n')
    data = b''
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    return data.decode()


def test_sweep_moves_users_who_never_log_in(gpair, make_gw, workdir):
    port = gwlib.free_port() if hasattr(gwlib, 'free_port') else None
    if port is None:
        import dovecot
        port = dovecot.free_port()
    g = make_gw(tls=False, policy='passthrough',
                extra_conf=admin_conf(workdir, metrics_port=port))
    for u in ('alice', 'bob'):
        r = g.ctl('user', 'add', u, '--json')
        assert r.rc == 0, r.describe()
    # Nobody logs in: the sweep moves both, one at a time.
    for u in ('alice', 'bob'):
        st = g.wait_state(u, ('destination', 'failed'), timeout=60)
        assert st == 'destination', (u, st, g.log_tail())
        gpair.assert_copied(u)
    text = http_get(port)
    assert text.startswith('HTTP/1.0 200'), text
    assert 'mailshift_users{state="destination"} 2' in text, text
    assert 'mailshift_messages_copied_total' in text, text


def test_admin_password_file_must_be_root_only(gpair, workdir):
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gwbad'), gpair.src, gpair.dst,
                         extra_conf=admin_conf(workdir, mode=0o644))
    with pytest.raises(Exception) as e:
        g.start(timeout=5)
    g.stop()
    assert 'readable by others' in g.log_text() or 'readable by others' in \
        str(e.value), (str(e.value), g.log_text())


def test_interrupted_cutover_is_resumed(gpair, make_gw, workdir):
    g = make_gw(tls=False, policy='passthrough',
                extra_conf=admin_conf(workdir, sweep=False))
    r = g.ctl('user', 'add', 'alice', 'state', 'cutover', '--json')
    assert r.rc == 0, r.describe()
    g.stop()
    g.start()
    assert g.state('alice') == 'copying', g.log_tail()


def test_kill9_daemon_mid_copy(gpair, make_gw, workdir):
    g = make_gw(tls=False, policy='passthrough', connections=1,
                extra_conf=admin_conf(workdir))
    assert g.ctl('user', 'add', 'alice').rc == 0
    # Kill the daemon while alice is being copied.
    end = time.time() + 30
    while time.time() < end:
        u = g.user('alice')
        if u and u.get('messages', 0) > 0:
            break
        time.sleep(0.01)
    assert u and u.get('messages', 0) > 0, 'the copy never started'
    assert g.state('alice') == 'copying'
    os.kill(g.pid, signal.SIGKILL)
    g.proc.wait()
    g.proc = None
    g.start()
    st = g.wait_state('alice', ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())
    gpair.assert_copied('alice')
