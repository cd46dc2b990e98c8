"""mailshiftctl takeover / giveback: the gateway (here also the destination
host) takes over the old server's service address on a shared LAN, in
network namespaces made by this module and removed by their own names.

Topology (names carry this run's id):

    ms-tklan-ID  bridge br0: the LAN (the switch), ports p1 p2 p3
    ms-tkcli-ID  c0 10.233.0.2/24, fd00:233::2/64: a client
    ms-tkgw-ID   g0 10.233.0.3/24, fd00:233::3/64: the gateway; forwarding
                 on; mailshiftd (transparent listeners 0.0.0.0:10143 and
                 :10110) and the destination's Dovecot (on its 127.0.0.1)
    ms-tksrc-ID  s0: the old server, first at the service address
                 10.233.0.10 (fd00:233::10), renumbered by the test to
                 10.233.0.11 (fd00:233::11) as the operator would; a real
                 Dovecot on ports 143/110 of its addresses, and a "web"
                 port 8080 (a line server that says whom it sees)

[steer]: address 10.233.0.10, ports 143 -> 10143 and 110 -> 10110,
source 10.233.0.11 (the old server's new address). alice stays on the
source; bob is in the map as migrated (state destination).

Each test starts from the renumbered state and must leave every namespace
exactly as it found it (a full dump of nft, addresses, rules and routes;
neighbour entries excepted).
"""

import imaplib
import json
import os
import re
import shutil
import socket
import threading

import pytest

import gateway as gwlib
import netns
import nsworld
from conftest import dst_server, src_server, stop_all, wait_for
from test_gateway import GW_USERS, marker, sessions
from test_steer import Remote, login_rip
from test_tproxy import _copy_binary, _remove_namespaces

NET = '10.233.0.'
CLI, GW, VIP, NEWADDR = NET + '2', NET + '3', NET + '10', NET + '11'
NET6 = 'fd00:233::'
CLI6, GW6, VIP6, NEW6 = NET6 + '2', NET6 + '3', NET6 + '10', NET6 + '11'
IMAP_LISTEN, POP3_LISTEN, WEB = 10143, 10110, 8080
NFT = shutil.which('nft') or '/usr/sbin/nft'
USERS = {'alice': GW_USERS['alice'], 'bob': GW_USERS['bob']}

STEER_CONF = """[steer]
address = %s
port = 143 %d
port = 110 %d
source = %s
""" % (VIP, IMAP_LISTEN, POP3_LISTEN, NEWADDR)

# The old server: ports 143/110 of any of its addresses to its Dovecot
# (on the namespace's 127.0.0.1; route_localnet lets the DNAT reach it).
SRC_NFT = """
table ip host {
  chain nat {
    type nat hook prerouting priority dstnat; policy accept;
    tcp dport 143 dnat to 127.0.0.1:%(imap)d
    tcp dport 110 dnat to 127.0.0.1:%(pop3)d
  }
}
"""


class LineServer:
    """The old server's "web" port: says "peer ADDR" to each connection
    and echoes one line back. Its socket lives in the server's namespace."""

    def __init__(self, ns):
        self.sock = ns.call(socket.create_server, ('::', WEB),
                            family=socket.AF_INET6, dualstack_ipv6=True)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, addr = self.sock.accept()
            except OSError:
                return
            with c:
                peer = addr[0].replace('::ffff:', '')
                try:
                    c.sendall(b'peer %s\n' % peer.encode())
                    c.sendall(c.makefile('rb').readline())
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)


def web(env, addr):
    """Connects from the client to addr:8080; returns the peer the old
    server saw, after checking the echo came back."""
    s = env.cli.call(socket.create_connection, (addr, WEB), timeout=10)
    with s:
        f = s.makefile('rb')
        peer = f.readline().decode().split()
        s.sendall(b'hello through %s\n' % addr.encode())
        assert f.readline() == b'hello through %s\n' % addr.encode()
    assert peer[0] == 'peer', peer
    return peer[1]


class Env:
    def __init__(self, ctl, nss):
        self.ctl_binary = ctl
        self.nss = nss
        self.lan, self.cli, self.gw_ns, self.src_ns = nss

    def ctl(self, cmd, *args, config=None, prefix=(), check=None):
        """mailshiftctl CMD -c CONFIG ARGS... in the gateway namespace."""
        argv = list(prefix) + [self.ctl_binary, cmd, '-c',
                               config or self.gw.config_path] + list(args)
        return nsworld.ctl(self.gw_ns, argv, check)

    def takeover(self, *args, **kw):
        return self.ctl('takeover', *args, **kw)

    def dump(self):
        """Every namespace's nft ruleset, addresses, rules and routes."""
        out = []
        for ns in self.nss:
            for argv in ([NFT, 'list', 'ruleset'], ['ip', 'addr'],
                         ['ip', 'rule'], ['ip', '-6', 'rule'],
                         ['ip', 'route', 'show', 'table', 'all'],
                         ['ip', '-6', 'route', 'show', 'table', 'all']):
                r = ns.run(argv)
                # Address lifetimes count down; they say nothing.
                text = re.sub(r'valid_lft \S+ preferred_lft \S+', '',
                              r.stdout)
                out.append('%s $ %s\n%s' % (ns.name, ' '.join(argv), text))
        return '\n'.join(out)

    def mac(self, ns, dev):
        r = ns.ip('-j', 'link', 'show', dev)
        return json.loads(r.stdout)[0]['address']

    def neigh(self, addr):
        """The client's neighbour entry's link-layer address for addr."""
        r = self.cli.ip('-j', 'neigh', 'show', addr, 'dev', 'c0')
        entries = json.loads(r.stdout or '[]')
        return entries[0].get('lladdr') if entries else None


def _settled(env):
    """IPv6 link-local addresses and routes come a moment after a link
    is up; DAD must be over before a dump is a reference."""
    for ns, dev in ((env.cli, 'c0'), (env.gw_ns, 'g0'), (env.src_ns, 's0')):
        if ns.run(['ip', '-6', 'addr', 'show', 'tentative']).stdout.strip():
            return False
        routes = ns.run(['ip', '-6', 'route', 'show', 'table',
                         'all']).stdout
        if 'fe80::/64 dev %s ' % dev not in routes:
            return False
    return True


def _renumber(ns, old, new):
    """What the operator does on the old server: its address becomes new.
    (Deleting first: a primary address takes its secondaries with it.)"""
    for o, n, plen in ((old[0], new[0], 24), (old[1], new[1], 64)):
        ns.ip('addr', 'del', '%s/%d' % (o, plen), 'dev', 's0')
        ns.ip('addr', 'add', '%s/%d' % (n, plen), 'dev', 's0', *(
            ('nodad',) if ':' in n else ()))


@pytest.fixture(scope='module')
def env(test_root, ctl):
    uid, nss, root = nsworld.begin(
        test_root, 'takeover', NFT, 'nftables, addresses',
        ('ms-tklan-', 'ms-tkcli-', 'ms-tkgw-', 'ms-tksrc-'))
    lan, cli, gw_ns, src_ns = nss
    servers, gw, line = [], None, None
    try:
        nsworld.add_all(nss)
        # The switch needs no addresses of its own (nor their settling).
        for k in ('all', 'default'):
            lan.run(['sysctl', '-qw', 'net.ipv6.conf.%s.disable_ipv6=1' % k])
        lan.ip('link', 'add', 'br0', 'type', 'bridge')
        for ns, dev, port, a4, a6 in (
                (cli, 'c0', 'p1', CLI, CLI6), (gw_ns, 'g0', 'p2', GW, GW6),
                (src_ns, 's0', 'p3', VIP, VIP6)):
            netns.veth_pair(ns, dev, lan, port)
            lan.ip('link', 'set', port, 'master', 'br0', 'up')
            ns.ip('addr', 'add', a4 + '/24', 'dev', dev)
            ns.ip('-6', 'addr', 'add', a6 + '/64', 'dev', dev, 'nodad')
            ns.ip('link', 'set', dev, 'up')
        lan.ip('link', 'set', 'br0', 'up')
        gw_ns.run(['sysctl', '-qw', 'net.ipv4.ip_forward=1'])
        gw_ns.run(['sysctl', '-qw', 'net.ipv6.conf.all.forwarding=1'])
        src_ns.run(['sysctl', '-qw', 'net.ipv4.conf.all.route_localnet=1'])

        src = src_server(root, None, dict(USERS), netns=src_ns.name)
        src.start()
        servers.append(src)
        src_ns.run([NFT, '-f', '-'], input=SRC_NFT % {
            'imap': src.imap_port, 'pop3': src.pop3_port})
        dst = dst_server(root, None, dict(USERS), netns=gw_ns.name)
        dst.start()
        servers.append(dst)
        nsworld.seed(((src, 'src'), (dst, 'dst')), USERS,
                     'tk-%s-%s-' + uid, marker)
        line = LineServer(src_ns)

        gw = gwlib.Mailshiftd(
            os.path.join(root, 'gw'), Remote(src, NEWADDR), dst,
            policy='off', binary=_copy_binary(gwlib.MAILSHIFTD, root),
            ctl_binary=ctl, listen_host='0.0.0.0', imap_port=IMAP_LISTEN,
            pop3_port=POP3_LISTEN, transparent=True, netns=gw_ns.name,
            extra_conf='[listen]\ntrusted_networks = %s0/24\n\n%s'
            % (NET, STEER_CONF))
        gw.start()
        r = gw.ctl('user', 'add', 'bob', 'state', 'destination')
        assert r.rc == 0, r.describe()
        e = Env(ctl, nss)
        e.gw, e.src, e.dst, e.uid, e.root = gw, src, dst, uid, root
        assert wait_for(lambda: _settled(e), 20, 0.1), e.dump()
        e.src_mac = e.mac(src_ns, 's0')
        e.gw_mac = e.mac(gw_ns, 'g0')
        # Before the move: the client reaches the old server itself at
        # the service address, and has a neighbour entry for it.
        assert web(e, VIP) == CLI
        assert web(e, VIP6) == CLI6
        assert e.neigh(VIP) == e.src_mac and e.neigh(VIP6) == e.src_mac
        _renumber(src_ns, (VIP, VIP6), (NEWADDR, NEW6))
        assert wait_for(lambda: _settled(e), 20, 0.1), e.dump()
        e.clean = e.dump()
        yield e
    finally:
        def stop_servers():
            if line is not None:
                line.close()
            stop_all(*servers)

        nsworld.end(gw, nss, root, stop_servers, _remove_namespaces)


def _cli_imap(env, user):
    m = env.cli.call(imaplib.IMAP4, VIP, 143, timeout=10)
    typ, data = m.login(user, USERS[user])
    assert typ == 'OK', data
    typ, data = m.select('INBOX', readonly=True)
    assert typ == 'OK', data
    typ, data = m.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
    assert typ == 'OK', data
    tags = [d[1].decode().split('marker ', 1)[1].strip() for d in data
            if isinstance(d, tuple)]
    return m, tags


def _stats(env):
    r = env.ctl('steer', 'stats', '--json', check=0)
    return {e['entry']: e['connections'] for e in r.json['entries']}


def test_takeover_end_to_end_and_giveback(env):
    assert env.dump() == env.clean
    args = ('--vip', VIP, '--dev', 'g0', '--source-addr', NEWADDR)
    r = env.takeover(*args, '--json', check=0)
    assert r.json['ok'] and r.json['vip'] == VIP, r.stdout
    try:
        # The address moved: on the gateway's g0, as a host address.
        addrs = env.gw_ns.ip('-4', 'addr', 'show', 'dev', 'g0').stdout
        assert 'inet %s/32 ' % VIP in addrs, addrs
        # The announcement was heard: the client's entry for the VIP
        # now names the gateway.
        assert wait_for(lambda: env.neigh(VIP) == env.gw_mac, 10, 0.05), \
            (env.neigh(VIP), env.gw_mac, env.src_mac)
        # A second takeover is refused, changing nothing.
        during = env.dump()
        r = env.takeover(*args, check=2)
        assert 'taken over already' in r.stderr, r.stderr
        assert env.dump() == during

        before = _stats(env)
        # IMAP to the VIP reaches mailshiftd, which routes per user.
        for user, side, server in (('alice', 'src', 'source'),
                                   ('bob', 'dst', 'destination')):
            m, tags = _cli_imap(env, user)
            try:
                assert tags == ['tk-%s-%s-%s' % (side, user, env.uid)], tags
                s = [x for x in sessions(env.gw) if x.get('user') == user]
                assert len(s) == 1 and s[0]['server'] == server, s
                assert s[0]['client'] == CLI, s
                assert s[0]['local'] == '%s:143' % VIP, s
            finally:
                m.logout()
        # The web port still reaches the old server, replies included;
        # it sees the gateway (masquerade), so its replies come back
        # through the gateway.
        assert web(env, VIP) == GW
        after = _stats(env)
        assert after['%s 143 proxy' % VIP] >= \
            before['%s 143 proxy' % VIP] + 2, after
        assert after['%s other source' % VIP] >= \
            before['%s other source' % VIP] + 1, after
        show = env.ctl('steer', 'show', '--json', check=0).json
        assert show['installed'] is True, show
        # What giveback would do, changing nothing.
        during = env.dump()
        r = env.ctl('giveback', '--dry-run', check=0)
        assert '# delete address %s from g0' % VIP in r.stdout and \
            'delete tables inet mailshift and inet mailshift_takeover' in \
            r.stdout, r.stdout
        assert env.dump() == during
    finally:
        r = env.ctl('giveback', '--json', check=0)
    assert r.json == {'ok': True, 'done': 'giveback', 'vip': VIP,
                      'device': 'g0'}, r.stdout
    assert env.dump() == env.clean
    r = env.ctl('giveback', check=2)
    assert 'nothing is taken over' in r.stderr, r.stderr
    assert env.dump() == env.clean


def _conf(env, name, extra):
    """The gateway's mailshift.conf plus extra, as another file."""
    path = os.path.join(env.root, name)
    with open(env.gw.config_path) as f:
        text = f.read()
    with open(path, 'w') as f:
        f.write(text + '\n' + extra)
    return path


def test_ipv6_from_config_announces_and_forwards(env):
    """[takeover] in the file instead of options; an IPv6 service address:
    the unsolicited neighbour advertisement moves the client's entry, the
    web port is forwarded (masquerade from the gateway's own address)."""
    assert env.dump() == env.clean
    conf = _conf(env, 'v6.conf', '[takeover]\naddress = %s\ndevice = g0\n'
                 'source_address = %s\n' % (VIP6, NEW6))
    r = env.takeover(config=conf, check=0)
    assert 'takeover: %s on g0, announced' % VIP6 in r.stdout, r.stdout
    try:
        addrs = env.gw_ns.ip('-6', 'addr', 'show', 'dev', 'g0').stdout
        assert 'inet6 %s/128 ' % VIP6 in addrs, addrs
        assert wait_for(lambda: env.neigh(VIP6) == env.gw_mac, 10, 0.05), \
            (env.neigh(VIP6), env.gw_mac, env.src_mac)
        assert web(env, VIP6) == GW6
        stats = _stats(env)
        assert stats['%s other source' % VIP6] >= 1, stats
    finally:
        r = env.ctl('giveback', config=conf, check=0)
    assert 'giveback: %s is no longer on g0' % VIP6 in r.stdout, r.stdout
    assert env.dump() == env.clean


def test_dry_run_prints_and_changes_nothing(env):
    assert env.dump() == env.clean
    r = env.takeover('--dry-run', '--vip', VIP, '--dev', 'g0',
                     '--source-addr', NEWADDR, check=0)
    for want in ('# address %s/32 on g0, then announced (gratuitous ARP)'
                 % VIP, 'table inet mailshift {',
                 'table inet mailshift_takeover {',
                 'tproxy ip to :%d' % IMAP_LISTEN,
                 'comment "%s other source"' % VIP,
                 'dnat ip to %s' % NEWADDR, 'masquerade',
                 'mailshift takeover vip %s dev g0 source %s steer 0'
                 % (VIP, NEWADDR)):
        assert want in r.stdout, (want, r.stdout)
    r = env.takeover('--dry-run', '--no-masquerade', '--vip', VIP, '--dev',
                     'g0', '--source-addr', NEWADDR, check=0)
    assert 'masquerade' not in r.stdout, r.stdout
    assert env.dump() == env.clean


def test_bad_input_changes_nothing(env):
    assert env.dump() == env.clean
    good = {'--vip': VIP, '--dev': 'g0', '--source-addr': NEWADDR}
    for change, rc, says in (
            ({'--vip': GW}, 2, 'already an address of this host'),
            ({'--dev': 'nosuch0'}, 2, 'device nosuch0 does not exist'),
            ({'--source-addr': VIP}, 2, 'is the service address'),
            ({'--source-addr': NEW6}, 2, 'not of one family'),
            ({'--source-addr': NET + '12'}, 2, 'make them one'),
            ({'--vip': 'mail.example'}, 2, 'not an IPv4 or IPv6 address'),
            ({'--dev': None}, 2, 'needs the service address')):
        opts = dict(good, **change)
        args = [x for k, v in opts.items() if v is not None for x in (k, v)]
        r = env.takeover(*args, check=rc)
        assert says in r.stderr, (change, r.stderr)
        assert env.dump() == env.clean, change
    args = [x for kv in good.items() for x in kv]
    # No CAP_NET_ADMIN: refused before anything is read or changed.
    for cmd in ('takeover', 'giveback'):
        r = env.ctl(cmd, *(args if cmd == 'takeover' else ()),
                    prefix=('setpriv', '--bounding-set', '-net_admin',
                            '--inh-caps', '-net_admin'), check=1)
        assert 'CAP_NET_ADMIN' in r.stderr, r.stderr
    # Forwarding off (the other ports could not reach the old server);
    # arp_ignore 2 (the host would not answer ARP for a /32).
    for sysctl, bad, good, says in (
            ('net.ipv4.conf.g0.forwarding', 0, 1, 'forwarding is off'),
            ('net.ipv4.conf.g0.arp_ignore', 2, 0, 'arp_ignore is 2')):
        env.gw_ns.run(['sysctl', '-qw', '%s=%d' % (sysctl, bad)])
        try:
            r = env.takeover(*args, check=2)
            assert says in r.stderr, r.stderr
        finally:
            env.gw_ns.run(['sysctl', '-qw', '%s=%d' % (sysctl, good)])
    # A device that is down.
    env.gw_ns.ip('link', 'add', 'tk8', 'type', 'veth', 'peer', 'tk8p')
    try:
        r = env.takeover('--vip', VIP, '--dev', 'tk8', '--source-addr',
                         NEWADDR, check=2)
        assert 'device tk8 is down' in r.stderr, r.stderr
    finally:
        env.gw_ns.ip('link', 'del', 'tk8')
    assert env.dump() == env.clean


def test_failure_half_way_is_taken_back(env):
    """The tables and routing go in, then the address cannot be added
    (IPv6 is disabled on the device, a veth whose peer stays down): everything is taken back, the
    namespace is exactly as before."""
    assert env.dump() == env.clean
    env.gw_ns.ip('link', 'add', 'tk9', 'type', 'veth', 'peer', 'tk9p')
    try:
        env.gw_ns.run(['sysctl', '-qw',
                       'net.ipv6.conf.tk9.disable_ipv6=1'])
        env.gw_ns.ip('link', 'set', 'tk9', 'up')
        before = env.dump()
        r = env.takeover('--vip', NET6 + '20', '--dev', 'tk9',
                         '--source-addr', NEW6, check=1)
        assert 'cannot add address' in r.stderr and \
            'everything was taken back' in r.stderr, r.stderr
        assert env.dump() == before
    finally:
        env.gw_ns.ip('link', 'del', 'tk9')
    assert env.dump() == env.clean


def test_giveback_puts_back_an_installed_steering(env):
    """Steering installed before the takeover (steer install, or mailshiftd
    with [steer] manage = yes): the takeover changes it in place, giveback
    puts back the table [steer] makes, its routing untouched."""
    assert env.dump() == env.clean
    env.ctl('steer', 'install', check=0)
    try:
        installed = env.dump()
        r = env.takeover('--vip', VIP, '--dev', 'g0', '--source-addr',
                         NEWADDR, '--dry-run', check=0)
        assert 'steer 1"' in r.stdout, r.stdout
        env.takeover('--vip', VIP, '--dev', 'g0', '--source-addr', NEWADDR,
                     check=0)
        assert wait_for(lambda: env.neigh(VIP) == env.gw_mac, 10, 0.05)
        assert web(env, VIP) == GW
        r = env.ctl('giveback', check=0)
        # (Counters carry over, as with every steer change: the table is
        # the one before, with the connections of the takeover counted.)
        assert re.sub(r'packets \d+ bytes \d+', '', env.dump()) == \
            re.sub(r'packets \d+ bytes \d+', '', installed)
    finally:
        env.ctl('steer', 'remove', check=0)
    assert env.dump() == env.clean


def test_giveback_after_the_address_went(env):
    """The operator deleted the address by hand: giveback still removes
    the rest, and the namespace is as before."""
    assert env.dump() == env.clean
    env.takeover('--vip', VIP, '--dev', 'g0', '--source-addr', NEWADDR,
                 check=0)
    try:
        env.gw_ns.ip('addr', 'del', VIP + '/32', 'dev', 'g0')
    finally:
        env.ctl('giveback', check=0)
    assert env.dump() == env.clean


def test_transparent_upstream_needs_the_old_servers_route(env):
    """[source] transparent = yes after a takeover: the old server is on
    the clients' LAN and would answer the client directly; with a route
    to the clients through the gateway (what deployment.md, section 1b,
    asks of the operator) mailshiftd's upstream from the client's address
    works, and the old server's own log names the client."""
    assert env.dump() == env.clean
    gw = env.gw
    plain = gw.extra_conf
    gw.stop()
    gw.extra_conf = plain + '\n[source]\ntransparent = yes\n'
    env.src_ns.ip('route', 'add', CLI + '/32', 'via', GW)
    try:
        gw.start()
        env.takeover('--vip', VIP, '--dev', 'g0', '--source-addr', NEWADDR,
                     check=0)
        try:
            assert wait_for(lambda: env.neigh(VIP) == env.gw_mac, 10,
                            0.05)

            def session():
                m, tags = _cli_imap(env, 'alice')
                m.logout()
                assert tags == ['tk-src-alice-%s' % env.uid], tags
            assert login_rip(env, env.src, 'alice', session) == CLI
        finally:
            env.ctl('giveback', check=0)
    finally:
        env.src_ns.ip('route', 'del', CLI + '/32', 'via', GW)
        gw.stop()
        gw.extra_conf = plain
        gw.start()
    assert env.dump() == env.clean
