"""mailshiftd behind a real nftables TPROXY divert, in network namespaces.

Topology (made here, names carrying this process's id; the ruleset is
written by hand here, the minimal divert: test_steer.py tests the table
`mailshiftctl steer` installs):

    ms-cli-PID  c0 10.231.0.2/24 --veth-- g0 10.231.0.1/24  ms-gw-PID
                default via 10.231.0.1                g1 10.231.1.1/24 (the old
                                                      mail server's segment)

SERVICE_ADDR 10.231.1.2 (the old mail server's address) is owned by nobody;
the gateway routes it out g1 (a veth whose peer stays in the gateway
namespace, so nothing answers there) and forwards (ip_forward=1). In the
gateway namespace, all on its own 127.0.0.1: a source and a destination
Dovecot and mailshiftd with transparent listeners on 0.0.0.0:10143 (IMAP)
and 0.0.0.0:10110 (POP3) in front of them. The nft ruleset diverts the
client's connections to SERVICE_ADDR:143/110 to those listeners (`tproxy
ip to :PORT`, the `socket transparent 1` mark rule, `ip rule fwmark 0x1
lookup 100`, `local 0.0.0.0/0 dev lo table 100`) and ends with a reject
(fail closed); a forward-hook counter on SERVICE_ADDR sees anything that
would leak past the gateway towards the old server.

The clients are Python's imaplib/poplib with their sockets created inside
the client namespace (netns.call_in_netns: setns() in a short-lived thread).
The gateway's policy is 'off' (sessions stay on the source, nothing is
copied): the test is about the divert, not the migration.
"""

import imaplib
import json
import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import dovecot as dc
import gateway as gwlib
import netns
from conftest import dst_server, src_server, stop_all, wait_for
from test_gateway import GW_USERS, marker, sessions

CLI_ADDR = '10.231.0.2'
GW_ADDR = '10.231.0.1'
OLD_NET_GW = '10.231.1.1'
SERVICE_ADDR = '10.231.1.2'
IMAP_LISTEN = 10143
POP3_LISTEN = 10110
TABLE = 'mailshift_tproxy_test'
FWMARK = '0x1'
ROUTE_TABLE = '100'
USER = 'alice'
NFT = shutil.which('nft') or '/usr/sbin/nft'

# Each counting rule is found by its comment (nft -j list table).
DIVERT = 'meta mark set %s accept' % FWMARK
RULESET = """
table inet %(table)s {
  chain divert {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 counter %(divert)s comment "socket"
    ip daddr %(svc)s tcp dport 143 counter tproxy ip to :%(imap)d %(divert)s \\
      comment "tproxy-imap"
    ip daddr %(svc)s tcp dport 110 counter tproxy ip to :%(pop3)d %(divert)s \\
      comment "tproxy-pop3"
    ip daddr %(svc)s tcp dport { 110, 143 } counter reject with tcp reset \\
      comment "fail-closed"
  }
  chain leak {
    type filter hook forward priority filter; policy accept;
    ip daddr %(svc)s counter comment "forwarded"
  }
}
""" % {'table': TABLE, 'divert': DIVERT, 'svc': SERVICE_ADDR,
       'imap': IMAP_LISTEN, 'pop3': POP3_LISTEN}


class Env:
    """What the fixture built: namespaces, servers, daemon, the message."""

    def __init__(self, cli, gw_ns, src, dst, gw, msg, msgid, dst_msgid):
        self.cli = cli
        self.gw_ns = gw_ns
        self.src = src
        self.dst = dst
        self.gw = gw
        self.msg = msg
        self.msgid = msgid
        self.dst_msgid = dst_msgid

    def counters(self):
        """{rule comment: packets} of the test table (nft -j)."""
        r = self.gw_ns.run([NFT, '-j', 'list', 'table', 'inet', TABLE])
        out = {}
        for item in json.loads(r.stdout)['nftables']:
            rule = item.get('rule')
            if not rule or 'comment' not in rule:
                continue
            for e in rule['expr']:
                if 'counter' in e:
                    out[rule['comment']] = e['counter']['packets']
        assert set(out) == {'socket', 'tproxy-imap', 'tproxy-pop3',
                            'fail-closed', 'forwarded'}, r.stdout
        return out

    def sessions_of(self, proto):
        return [s for s in sessions(self.gw)
                if s.get('proto') == proto and s.get('user') == USER]


def _copy_binary(src, dst_dir):
    """A copy of a binary taken now (others may rebuild the tree's while
    the test runs)."""
    if not os.access(src, os.X_OK):
        pytest.fail('%s is missing: build it with `make`' % src,
                    pytrace=False)
    dst = os.path.join(dst_dir, os.path.basename(src))
    for _ in range(50):           # the linker may be writing it right now
        try:
            shutil.copy2(src, dst)
            return dst
        except OSError:
            time.sleep(0.2)
    pytest.fail('cannot copy %s' % src, pytrace=False)


def _kill_leftovers(ns):
    """Processes still inside one of our namespaces (ours by definition,
    taken by PID): TERM, then KILL. Returns their PIDs."""
    pids = [p for p in ns.pids() if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        if wait_for(lambda: not any(dc._alive(p) for p in pids), 2.0, 0.02):
            break
    return pids


def _remove_namespaces(nss):
    """Stops what is left in each namespace we added (by PID) and deletes
    it; returns the problems found."""
    problems = []
    for ns in nss:
        if ns.added:
            left = _kill_leftovers(ns)
            if left:
                problems.append('processes left in %s: %s'
                                % (ns.name, left))
            ns.delete()
    for ns in nss:
        if os.path.exists(ns.path):
            problems.append('namespace %s still exists' % ns.name)
    return problems


@pytest.fixture(scope='module')
def env(test_root, ctl):
    if os.geteuid() != 0:
        pytest.skip('needs root: `ip netns add` (network namespaces, nft, '
                    'IP_TRANSPARENT) is not permitted for uid %d'
                    % os.geteuid())
    if not os.access(NFT, os.X_OK):
        pytest.fail('nft (package nftables) is not installed: '
                    'apt-get install nftables', pytrace=False)
    # This run's id: the PID, plus a random part (PIDs get reused).
    uid = '%d-%s' % (os.getpid(), os.urandom(2).hex())
    cli = netns.NetNS('ms-cli-' + uid)
    gw_ns = netns.NetNS('ms-gw-' + uid)
    root = os.path.join(test_root, 'tproxy-' + uid)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    os.chmod(root, 0o755)
    servers = []
    gw = None
    try:
        try:
            cli.add()
        except netns.NotPermitted as e:
            pytest.skip('network namespaces not permitted here: %s' % e)
        gw_ns.add()

        # Topology.
        netns.veth_pair(cli, 'c0', gw_ns, 'g0')
        cli.ip('addr', 'add', CLI_ADDR + '/24', 'dev', 'c0')
        cli.ip('link', 'set', 'c0', 'up')
        cli.ip('route', 'add', 'default', 'via', GW_ADDR)
        gw_ns.ip('addr', 'add', GW_ADDR + '/24', 'dev', 'g0')
        gw_ns.ip('link', 'set', 'g0', 'up')
        # The old server's segment: SERVICE_ADDR is routed out g1, where
        # nobody owns it (g1's peer stays in this namespace, address-less).
        gw_ns.ip('link', 'add', 'g1', 'type', 'veth', 'peer', 'name', 'g1p')
        gw_ns.ip('addr', 'add', OLD_NET_GW + '/24', 'dev', 'g1')
        gw_ns.ip('link', 'set', 'g1', 'up')
        gw_ns.ip('link', 'set', 'g1p', 'up')
        gw_ns.run(['sysctl', '-qw', 'net.ipv4.ip_forward=1'])

        # The divert.
        gw_ns.run([NFT, '-f', '-'], input=RULESET)
        gw_ns.ip('rule', 'add', 'fwmark', FWMARK, 'lookup', ROUTE_TABLE)
        gw_ns.ip('route', 'add', 'local', '0.0.0.0/0', 'dev', 'lo', 'table',
                 ROUTE_TABLE)

        # The mail servers and the gateway, inside ms-gw.
        users = {USER: GW_USERS[USER]}
        # The source trusts the gateway with the client's addresses (ID
        # x-originating-ip, x-connected-ip): its log shows what it was told.
        src = src_server(root, None, dict(users), netns=gw_ns.name,
                         extra_conf='login_trusted_networks = 127.0.0.1/32')
        dst = dst_server(root, None, dict(users), netns=gw_ns.name)
        servers += [src, dst]
        src.start()
        dst.start()
        msg, msgid = marker('tproxy-src-' + uid, 1)
        dmsg, dst_msgid = marker('tproxy-dst-' + uid, 2)
        for server, m in ((src, msg), (dst, dmsg)):
            imap = server.imap(USER)        # made inside ms-gw
            try:
                typ, data = imap.append('INBOX', None, None, m)
                assert typ == 'OK', data
            finally:
                imap.logout()

        gw = gwlib.Mailshiftd(
            os.path.join(root, 'gw'), src, dst, policy='off',
            binary=_copy_binary(gwlib.MAILSHIFTD, root), ctl_binary=ctl,
            listen_host='0.0.0.0', imap_port=IMAP_LISTEN,
            pop3_port=POP3_LISTEN, transparent=True, netns=gw_ns.name,
            # The client logs in over plaintext: its network is trusted
            # (by default only loopback is).
            extra_conf='[listen]\ntrusted_networks = %s/24' % CLI_ADDR)
        gw.start()
        yield Env(cli, gw_ns, src, dst, gw, msg, msgid, dst_msgid)
    finally:
        problems = []
        if gw is not None:
            gw.stop()
            if gw.killed:
                problems.append('mailshiftd did not exit on SIGTERM')
        stop_all(*servers)
        problems += _remove_namespaces((gw_ns, cli))
        if gw is not None and problems:
            print('----- mailshiftd log (last lines)\n' + gw.log_tail(60))
        shutil.rmtree(root, ignore_errors=True)
        assert not problems, problems


# -------------------------------------------------------------- helpers

def cli_imap(env):
    """imaplib connected from the client namespace to SERVICE_ADDR:143."""
    return env.cli.call(imaplib.IMAP4, SERVICE_ADDR, 143, timeout=10)


def cli_pop3(env):
    return env.cli.call(poplib.POP3, SERVICE_ADDR, 110, timeout=10)


def assert_client_ends(sock, port):
    """The client's own view: it talks to SERVICE_ADDR:port from CLI_ADDR."""
    assert sock.getpeername() == (SERVICE_ADDR, port), sock.getpeername()
    assert sock.getsockname()[0] == CLI_ADDR, sock.getsockname()


def one_session(env, proto, port):
    """The user's only session of proto, once it is relaying; checks the
    addresses mailshiftd reports for it."""
    wait_for(lambda: any(s.get('state') == 'relay'
                         for s in env.sessions_of(proto)), 5.0, 0.05)
    ss = env.sessions_of(proto)
    assert len(ss) == 1, sessions(env.gw)
    s = ss[0]
    assert s['state'] == 'relay' and s['server'] == 'source', s
    # The client's address, not the gateway's or 127.0.0.1: the divert
    # kept it.
    assert s['client'] == CLI_ADDR, s
    # The original destination the kernel diverted, as the accepted
    # socket's local address; the listener itself is 0.0.0.0:101xx.
    assert s['local'] == '%s:%d' % (SERVICE_ADDR, port), s
    return s


def connect_fails_closed(env, port):
    """A plain TCP connect from the client to SERVICE_ADDR:port; returns
    the exception it raised (or fails when it connected)."""
    try:
        s = env.cli.call(socket.create_connection, (SERVICE_ADDR, port),
                         timeout=5)
    except OSError as e:
        return e
    s.close()
    pytest.fail('connection to %s:%d succeeded with mailshiftd down'
                % (SERVICE_ADDR, port))


# ---------------------------------------------------------------- tests

def test_imap_diverted_to_transparent_listener(env):
    before = env.counters()
    m = cli_imap(env)
    try:
        assert m.welcome.startswith(b'* OK'), m.welcome
        assert m.welcome.endswith(b'mailshift ready.'), m.welcome
        assert_client_ends(m.sock, 143)
        typ, data = m.login(USER, GW_USERS[USER])
        assert typ == 'OK', data
        typ, data = m.select('INBOX', readonly=True)
        assert typ == 'OK' and data == [b'1'], (typ, data)
        typ, data = m.search(None, 'HEADER', 'Message-ID',
                             '"%s"' % env.msgid)
        assert typ == 'OK' and data == [b'1'], (typ, data)
        typ, data = m.fetch('1', '(BODY.PEEK[])')
        assert typ == 'OK', data
        assert data[0][1] == env.msg, data
        # The source's mailbox, not the destination's.
        typ, data = m.search(None, 'HEADER', 'Message-ID',
                             '"%s"' % env.dst_msgid)
        assert typ == 'OK' and data == [b''], (typ, data)

        # While the session is open, mailshiftd reports its addresses.
        one_session(env, 'imap', 143)
        m.logout()
        # The server was told the client's address and the one it
        # connected to (x-connected-ip): the old server's, the divert's
        # original destination, not the gateway's own.
        assert wait_for(lambda: re.search(
            r'imap-login: Info: Login: user=<%s>, method=\S+, rip=%s, '
            r'lip=%s,' % (USER, re.escape(CLI_ADDR),
                          re.escape(SERVICE_ADDR)),
            open(env.src.log_path).read()) is not None, 10), \
            open(env.src.log_path).read()[-2000:]
    finally:
        if m.state != 'LOGOUT':
            m.shutdown()
    after = env.counters()
    # The divert really happened: the IMAP tproxy rule saw the SYN ...
    assert after['tproxy-imap'] >= before['tproxy-imap'] + 1, (before, after)
    # ... the rest of the connection matched the transparent socket ...
    assert after['socket'] > before['socket'], (before, after)
    # ... and nothing was rejected or forwarded towards the old server.
    assert after['fail-closed'] == before['fail-closed'], (before, after)
    assert after['forwarded'] == 0, after
    assert after['tproxy-pop3'] == before['tproxy-pop3'], (before, after)
    wait_for(lambda: not env.sessions_of('imap'), 5.0, 0.05)
    assert not env.sessions_of('imap'), sessions(env.gw)


def test_pop3_diverted_to_transparent_listener(env):
    before = env.counters()
    p = cli_pop3(env)
    try:
        assert p.getwelcome().startswith(b'+OK'), p.getwelcome()
        assert_client_ends(p.sock, 110)
        p.user(USER)
        resp = p.pass_(GW_USERS[USER])
        assert resp.startswith(b'+OK'), resp
        count, size = p.stat()
        assert (count, size) == (1, len(env.msg)), (count, size)
        resp, lines, octets = p.retr(1)
        assert resp.startswith(b'+OK'), resp
        assert b'\r\n'.join(lines) + b'\r\n' == env.msg, lines

        one_session(env, 'pop3', 110)
        p.quit()
    finally:
        try:
            p.close()
        except OSError:
            pass
    after = env.counters()
    assert after['tproxy-pop3'] >= before['tproxy-pop3'] + 1, (before, after)
    assert after['socket'] > before['socket'], (before, after)
    assert after['fail-closed'] == before['fail-closed'], (before, after)
    assert after['forwarded'] == 0, after
    assert after['tproxy-imap'] == before['tproxy-imap'], (before, after)


def test_fails_closed_without_mailshiftd(env):
    gw = env.gw
    gw.stop()
    try:
        assert not gw.killed, 'mailshiftd did not exit on SIGTERM'
        for port in (143, 110):
            before = env.counters()
            err = connect_fails_closed(env, port)
            after = env.counters()
            # Refused at once by the reject rule (a TCP reset), not a
            # timeout or an ICMP error from somewhere further on: one
            # packet met the rule, so the first SYN got the reset (a
            # retransmitted one would count twice) ...
            assert isinstance(err, ConnectionRefusedError), (port, err)
            assert after['fail-closed'] == before['fail-closed'] + 1, \
                (port, before, after)
            # ... the tproxy rule matched but found no transparent
            # listener (its counter comes before the tproxy expression) ...
            rule = 'tproxy-imap' if port == 143 else 'tproxy-pop3'
            assert after[rule] == before[rule] + 1, (port, before, after)
            # ... and nothing went on towards the old server's segment.
            assert after['forwarded'] == 0, (port, after)
    finally:
        # Back up: the same divert works again (so the refusal came from
        # the daemon being down, not from a broken topology).
        gw.start()
    m = cli_imap(env)
    try:
        typ, data = m.login(USER, GW_USERS[USER])
        assert typ == 'OK', data
        one_session(env, 'imap', 143)
        m.logout()
    finally:
        if m.state != 'LOGOUT':
            m.shutdown()


# A plugin for the pytest run below: `ip netns add` refused, as on a
# machine (or container) that does not allow network namespaces.
REFUSE_NETNS = """
import netns


def _refused(self):
    raise netns.NotPermitted('ip netns add %s: Operation not permitted '
                             '(refused on purpose)' % self.name)


netns.NetNS.add = _refused
"""


@pytest.mark.parametrize('allow_skip', [False, True], ids=['strict', 'allow'])
def test_refused_namespaces_fail_the_run(workdir, allow_skip):
    """Where network namespaces are refused, these tests fail the run
    (saying why) unless MAILSHIFT_ALLOW_SKIP=1, which makes them skips that
    pytest lists with the reason: never a silent pass. Runs this file's
    first test in a pytest of its own with `ip netns add` refused."""
    with open(os.path.join(workdir, 'refuse_netns.py'), 'w') as f:
        f.write(REFUSE_NETNS)
    env = {k: v for k, v in os.environ.items()
           if k != 'MAILSHIFT_ALLOW_SKIP'}
    if allow_skip:
        env['MAILSHIFT_ALLOW_SKIP'] = '1'
    env['PYTHONPATH'] = os.pathsep.join(
        [workdir, os.path.dirname(gwlib.__file__)] +
        [p for p in [os.environ.get('PYTHONPATH')] if p])
    r = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'refuse_netns',
         '-p', 'no:cacheprovider', __file__, '-k',
         'test_imap_diverted_to_transparent_listener'],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = r.stdout.decode(errors='replace')
    why = 'network namespaces not permitted here: ip netns add'
    if allow_skip:
        assert r.returncode == 0, out
        assert re.search(r'^SKIPPED .*%s' % re.escape(why), out, re.M), out
        assert re.search(r'\b1 skipped\b', out), out
    else:
        assert r.returncode == 1, out
        assert 'skipped, and skips are not allowed (set ' \
            'MAILSHIFT_ALLOW_SKIP=1 to allow them)' in out, out
        assert why in out, out
        assert re.search(r'\b1 error\b', out), out
