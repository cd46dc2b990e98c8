"""mailshiftctl steer: router mode, in network namespaces, with the table,
rule and route the product installs itself (no hand-written ruleset).

Topology (made here, names carrying this run's id):

    ms-scli-ID  c0 10.232.0.2/24 (+ 10.232.0.66, a "site moved as a batch")
                   | default via 10.232.0.1
    ms-sgw-ID   g0 10.232.0.1/24  g1 10.232.1.1/24  g2 10.232.2.1/24
                ip_forward=1; mailshiftd, transparent listeners
                0.0.0.0:10143 (IMAP) and 0.0.0.0:10110 (POP3)
    ms-ssrc-ID  s0 10.232.1.2/24: the source (old) server, the service
                address; a real Dovecot answering on ports 143 and 110
    ms-sdst-ID  d0 10.232.2.2/24: the destination server, the same

IPv6 (fd00:232::/64 for the client, fd00:232:1::/64 for the source,
fd00:232:1::2 the service address) is on the client's and the source's
segments only: test_ipv6_divert_and_fail_closed uses it with a transparent
listener of its own.

The servers' namespaces each have a counter of packets that arrive from the
client network on the mail ports ("from_clients", before anything else
sees them): a connection that leaks past the gateway to the source shows
up there, whatever happens to it afterwards.

[steer]: address 10.232.1.2, ports 143 -> 10143 and 110 -> 10110, action
proxy, destination 10.232.2.2, and one entry: clients in 10.232.0.64/26
connecting to port 143 are sent straight to the destination (DNAT).
mailshiftd's policy is 'off': alice stays on the source; bob is in the map
as migrated (state destination).

Every test starts with nothing of mailshift's in the gateway namespace and
leaves it that way (steer remove; the fixture checks with a full dump).
"""

import imaplib
import json
import os
import poplib
import random
import signal
import socket
import subprocess

import pytest

import gateway as gwlib
import netns
import nsworld
import routerlab
from routerlab import Remote    # test_takeover.py takes it from here
from conftest import dst_server, src_server, stop_all, wait_for
from test_gateway import GW_USERS, marker, sessions
from test_tproxy import _copy_binary, _remove_namespaces

NET = '10.232.'
CLI_ADDR = NET + '0.2'
CLI_BATCH_ADDR = NET + '0.66'      # in BATCH_PREFIX
BATCH_PREFIX = NET + '0.64/26'
GW_ADDRS = routerlab.router_addrs(NET)
SERVICE_ADDR = NET + '1.2'          # the source server's own address
DST_ADDR = NET + '2.2'
# IPv6: the client and the source's segments only (test_ipv6_...).
NET6 = 'fd00:232:'
CLI6 = NET6 + ':2'
GW6 = (NET6 + ':1', NET6 + '1::1')
SERVICE6 = NET6 + '1::2'
IMAP_LISTEN = 10143
POP3_LISTEN = 10110
NFT = routerlab.NFT
USERS = {'alice': GW_USERS['alice'], 'bob': GW_USERS['bob']}

STEER_CONF = """[steer]
address = %(svc)s
port = 143 %(imap)d
port = 110 %(pop3)d
destination = %(dst)s
entry = %(svc)s 143 %(batch)s destination
""" % {'svc': SERVICE_ADDR, 'imap': IMAP_LISTEN, 'pop3': POP3_LISTEN,
       'dst': DST_ADDR, 'batch': BATCH_PREFIX}

class Env:
    def __init__(self, ctl, ns, src, dst, gw):
        self.ctl_binary = ctl
        self.cli, self.gw_ns, self.src_ns, self.dst_ns = ns
        self.src = src
        self.dst = dst
        self.gw = gw

    def steer(self, *args, config=None, prefix=(), check=None):
        """mailshiftctl steer -c CONFIG ARGS... run inside the gateway
        namespace; CompletedProcess (text), .json when it printed JSON."""
        argv = list(prefix) + [self.ctl_binary, 'steer', '-c',
                               config or self.gw.config_path] + list(args)
        return nsworld.ctl(self.gw_ns, argv, check)

    def dump(self):
        """Everything of the gateway namespace's that steering could
        touch, as text."""
        out = []
        for argv in ([NFT, 'list', 'ruleset'], ['ip', 'rule'],
                     ['ip', '-6', 'rule'],
                     ['ip', 'route', 'show', 'table', 'all'],
                     ['ip', '-6', 'route', 'show', 'table', 'all']):
            r = self.gw_ns.run(argv)
            out.append('$ %s\n%s' % (' '.join(argv), r.stdout))
        return '\n'.join(out)

    def from_clients(self, ns):
        """Packets from the client network to ports 143/110 that reached
        server namespace ns."""
        r = ns.run([NFT, '-j', 'list', 'table', 'inet', 'host'])
        counts = [e['counter']['packets']
                  for item in json.loads(r.stdout)['nftables']
                  if item.get('rule', {}).get('comment') == 'from_clients'
                  for e in item['rule']['expr'] if 'counter' in e]
        assert len(counts) == 2, r.stdout       # IPv4, IPv6
        return sum(counts)

    def stats(self):
        r = self.steer('stats', '--json', check=0)
        return {e['entry']: e['connections'] for e in r.json['entries']}, \
            r.json['rejected']


def _server(make, root, ns):
    s = make(root, None, dict(USERS), netns=ns.name)
    s.start()
    routerlab.serve_standard_ports(ns, s, NET, NET6)
    return s


def _settled(ns):
    routes = ns.run(['ip', '-6', 'route', 'show', 'table', 'all']).stdout
    tentative = ns.run(['ip', '-6', 'addr', 'show', 'tentative']).stdout
    return not tentative.strip() and all(
        'fe80::/64 dev %s ' % d in routes and
        'multicast ff00::/8 dev %s ' % d in routes
        for d in ('g0', 'g1', 'g2'))


@pytest.fixture(scope='module')
def env(test_root, ctl):
    uid, nss, root = nsworld.begin(
        test_root, 'steer', NFT, 'nftables, policy routing',
        ('ms-scli-', 'ms-sgw-', 'ms-ssrc-', 'ms-sdst-'))
    cli, gw_ns, src_ns, dst_ns = nss
    servers, gw = [], None
    try:
        nsworld.add_all(nss)
        routerlab.wire(cli, gw_ns, src_ns, dst_ns, NET, (CLI_BATCH_ADDR,))
        # IPv6 (nodad: usable at once) on the client's and the source's
        # segments.
        for ns, dev, a, via in ((cli, 'c0', CLI6, GW6[0]),
                                (src_ns, 's0', SERVICE6, GW6[1])):
            ns.ip('-6', 'addr', 'add', a + '/64', 'dev', dev, 'nodad')
            ns.ip('-6', 'route', 'add', 'default', 'via', via)
        for dev, a in zip(('g0', 'g1'), GW6):
            gw_ns.ip('-6', 'addr', 'add', a + '/64', 'dev', dev, 'nodad')
        gw_ns.run(['sysctl', '-qw', 'net.ipv6.conf.all.forwarding=1'])

        src = _server(src_server, root, src_ns)
        servers.append(src)
        dst = _server(dst_server, root, dst_ns)
        servers.append(dst)
        nsworld.seed(((src, 'src'), (dst, 'dst')), USERS,
                     'steer-%s-%s-' + uid, marker)

        gw = gwlib.Mailshiftd(
            os.path.join(root, 'gw'), Remote(src, SERVICE_ADDR),
            Remote(dst, DST_ADDR), policy='off',
            binary=_copy_binary(gwlib.MAILSHIFTD, root), ctl_binary=ctl,
            listen_host='0.0.0.0', imap_port=IMAP_LISTEN,
            pop3_port=POP3_LISTEN, transparent=True, netns=gw_ns.name,
            extra_conf='[listen]\ntrusted_networks = %s0.0/24\n\n%s'
            % (NET, STEER_CONF))
        gw.start()
        r = gw.ctl('user', 'add', 'bob', 'state', 'destination')
        assert r.rc == 0, r.describe()
        e = Env(ctl, nss, src, dst, gw)
        e.uid = uid
        e.root = root
        # The kernel adds IPv6 link-local addresses and routes a moment
        # after a link comes up: the reference dump waits for them.
        assert wait_for(lambda: _settled(gw_ns), 20, 0.1), e.dump()
        e.clean = e.dump()
        yield e
    finally:
        nsworld.end(gw, nss, root, lambda: stop_all(*servers),
                    _remove_namespaces)


@pytest.fixture
def steered(env):
    """steer install for one test; steer remove after it, and the gateway
    namespace must then be exactly as it was before."""
    assert env.dump() == env.clean, 'a previous test left steering behind'
    if not env.gw.alive:
        env.gw.start()
    r = env.steer('install', check=0)
    assert 'installed' in r.stdout, r.stdout
    yield env
    # Shown with a failure's report (captured output).
    print('----- mailshiftd log (last lines)\n' + env.gw.log_tail(30))
    env.steer('remove', check=0)
    assert env.dump() == env.clean


# -------------------------------------------------------------- clients

def _from(base, source):
    class Bound(base):
        def _create_socket(self, timeout):
            return socket.create_connection((self.host, self.port), timeout,
                                            source_address=(source, 0))
    return Bound


def cli_imap(env, source=CLI_ADDR):
    return env.cli.call(_from(imaplib.IMAP4, source), SERVICE_ADDR, 143,
                        timeout=10)


def cli_pop3(env, source=CLI_ADDR):
    return env.cli.call(_from(poplib.POP3, source), SERVICE_ADDR, 110,
                        timeout=10)


def inbox_tags(m):
    """The marker subjects in INBOX: which server's mailbox this is."""
    typ, data = m.select('INBOX', readonly=True)
    assert typ == 'OK', data
    typ, data = m.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
    assert typ == 'OK', data
    return [d[1].decode().split('marker ', 1)[1].strip() for d in data
            if isinstance(d, tuple)]


def login_tags(env, user, source=CLI_ADDR):
    """Logs user in through SERVICE_ADDR:143; returns (open IMAP, tags)."""
    m = cli_imap(env, source)
    typ, data = m.login(user, USERS[user])
    assert typ == 'OK', data
    return m, inbox_tags(m)


def side_of(env, tags, user):
    want = {s: 'steer-%s-%s-%s' % (s, user, env.uid) for s in ('src', 'dst')}
    assert tags in ([want['src']], [want['dst']]), (tags, want)
    return 'source' if tags == [want['src']] else 'destination'


def gw_sessions(env, user):
    return [s for s in sessions(env.gw) if s.get('user') == user]


def logins(server, user):
    """Dovecot's login lines for user (its log)."""
    with open(server.log_path, errors='replace') as f:
        return [l for l in f if '-login: Info: Login: user=<%s>' % user in l]


def close(m):
    try:
        m.logout()
    except (OSError, imaplib.IMAP4.error):
        m.shutdown()


def refused(env, port, addr=SERVICE_ADDR, source=None):
    """The exception a plain connect from the client to addr:port raised
    (fails the test when it connected)."""
    try:
        s = env.cli.call(socket.create_connection, (addr, port), timeout=5,
                         source_address=(source, 0) if source else None)
    except OSError as e:
        return e
    s.close()
    pytest.fail('connection to %s:%d succeeded' % (addr, port))


def segments_sent_again(sock):
    """What this connection sent again so far, its SYN included (struct
    tcp_info's tcpi_total_retrans, at byte 100)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[100:104], 'little')


# ---------------------------------------------------------------- tests

def test_dry_run_prints_and_changes_nothing(env):
    assert env.dump() == env.clean
    r = env.steer('--dry-run', 'install', check=0)
    out = r.stdout
    for want in ('table inet mailshift {', 'delete table inet mailshift',
                 'tproxy ip to :%d' % IMAP_LISTEN,
                 'tproxy ip to :%d' % POP3_LISTEN,
                 'reject with tcp reset',
                 'comment "%s 143 %s destination"' % (SERVICE_ADDR,
                                                       BATCH_PREFIX),
                 'comment "%s 110 proxy"' % SERVICE_ADDR,
                 'dnat ip to %s' % DST_ADDR,
                 'rule fwmark 0x4d530000 lookup 100 priority 100'):
        assert want in out, (want, out)
    assert env.dump() == env.clean
    # What it printed is what install applies: the kernel's listing of
    # the installed table has the same rules (nft prints them its way).
    env.steer('install', check=0)
    try:
        listed = env.gw_ns.run([NFT, 'list', 'table', 'inet',
                                'mailshift']).stdout
        for line in out.splitlines():
            if 'comment "' in line:
                assert line.split('comment ')[1] in listed, (line, listed)
    finally:
        env.steer('remove', check=0)
    assert env.dump() == env.clean


def test_router_mode_routes_users_per_map(steered):
    env = steered
    src_before = env.from_clients(env.src_ns)
    dst_before = env.from_clients(env.dst_ns)
    bob_src_logins = len(logins(env.src, 'bob'))
    alice_src_logins = len(logins(env.src, 'alice'))
    stats0, _ = env.stats()

    # alice is on the source: proxied there by mailshiftd.
    m, tags = login_tags(env, 'alice')
    try:
        assert side_of(env, tags, 'alice') == 'source'
        s = gw_sessions(env, 'alice')
        assert len(s) == 1 and s[0]['server'] == 'source', s
        assert s[0]['client'] == CLI_ADDR, s
        assert s[0]['local'] == '%s:143' % SERVICE_ADDR, s
    finally:
        close(m)
    # [source] names the very address the divert catches: mailshiftd's
    # own connection to it is not diverted (prerouting sees only what
    # arrives) and reaches the real server, from the gateway's address.
    assert 'imap://%s:143' % SERVICE_ADDR in open(env.gw.config_path).read()
    assert wait_for(lambda: len(logins(env.src, 'alice')) >
                    alice_src_logins, 10)
    new = logins(env.src, 'alice')[alice_src_logins:]
    assert len(new) == 1 and 'rip=%s,' % GW_ADDRS[1] in new[0], new
    # bob is migrated: mailshiftd sends him to the destination ...
    m, tags = login_tags(env, 'bob')
    try:
        assert side_of(env, tags, 'bob') == 'destination'
        s = gw_sessions(env, 'bob')
        assert len(s) == 1 and s[0]['server'] == 'destination', s
    finally:
        close(m)
    p = cli_pop3(env)
    try:
        p.user('bob')
        assert p.pass_(USERS['bob']).startswith(b'+OK')
        assert p.stat()[0] == 1
        resp, lines, _ = p.retr(1)
        assert any(('steer-dst-bob-%s' % env.uid).encode() in l
                   for l in lines), lines
        p.quit()
    finally:
        p.close()
    # ... and never reaches the source: no login there, and no packet of
    # the client's went past the gateway.
    assert len(logins(env.src, 'bob')) == bob_src_logins
    assert env.from_clients(env.src_ns) == src_before
    assert env.from_clients(env.dst_ns) == dst_before

    # A client of the batch prefix goes straight to the destination
    # (DNAT: the destination sees the client's own address; mailshiftd
    # has no session for it), even for alice, who is on the source.
    m, tags = login_tags(env, 'alice', CLI_BATCH_ADDR)
    try:
        assert side_of(env, tags, 'alice') == 'destination'
        assert gw_sessions(env, 'alice') == []
    finally:
        close(m)
    assert env.from_clients(env.dst_ns) > dst_before
    assert env.from_clients(env.src_ns) == src_before
    assert wait_for(lambda: any('rip=%s' % CLI_BATCH_ADDR in l
                                for l in logins(env.dst, 'alice')), 5)

    stats, rejected = env.stats()
    # (At least: a SYN the kernel sends again is a new decision too.)
    assert stats['%s 143 proxy' % SERVICE_ADDR] >= \
        stats0['%s 143 proxy' % SERVICE_ADDR] + 2, stats
    assert stats['%s 110 proxy' % SERVICE_ADDR] >= \
        stats0['%s 110 proxy' % SERVICE_ADDR] + 1, stats
    key = '%s 143 %s destination' % (SERVICE_ADDR, BATCH_PREFIX)
    assert stats[key] >= stats0[key] + 1, stats
    assert rejected == 0


def test_set_during_open_sessions_cuts_none(steered):
    env = steered
    proxied, tags = login_tags(env, 'alice')
    assert side_of(env, tags, 'alice') == 'source'
    direct, tags = login_tags(env, 'alice', CLI_BATCH_ADDR)
    assert side_of(env, tags, 'alice') == 'destination'
    try:
        counted, _ = env.stats()
        # Every decision flipped while both sessions are open.
        env.steer('set', SERVICE_ADDR, '143', 'destination', check=0)
        env.steer('set', SERVICE_ADDR, '143', BATCH_PREFIX, 'proxy',
                  check=0)
        show = env.steer('show', '--json', check=0).json
        entries = {e['entry'] for e in show['entries']}
        assert '%s 143 destination' % SERVICE_ADDR in entries, show
        assert '%s 143 %s proxy' % (SERVICE_ADDR, BATCH_PREFIX) in \
            entries, show
        # Both sessions go on where they started.
        for m, side in ((proxied, 'source'), (direct, 'destination')):
            assert m.noop()[0] == 'OK'
            assert side_of(env, inbox_tags(m), 'alice') == side
        # The table was replaced; each entry's counter carried over (an
        # entry is its address, port and prefix; the action changed).
        def by_key(stats):
            return {k.rsplit(' ', 1)[0]: v for k, v in stats.items()}
        assert by_key(env.stats()[0]) == by_key(counted)
        assert sum(counted.values()) >= 2, counted
        # New connections follow the new table.
        m, tags = login_tags(env, 'alice')
        try:
            assert side_of(env, tags, 'alice') == 'destination'
        finally:
            close(m)
        m, tags = login_tags(env, 'alice', CLI_BATCH_ADDR)
        try:
            assert side_of(env, tags, 'alice') == 'source'   # proxied
        finally:
            close(m)
        # And back: the override goes, the address's entry is the
        # configured one again; the first sessions still run.
        env.steer('set', SERVICE_ADDR, '143', BATCH_PREFIX, 'default',
                  check=0)
        env.steer('set', SERVICE_ADDR, '143', 'default', check=0)
        show = env.steer('show', '--json', check=0).json
        entries = {e['entry'] for e in show['entries']}
        assert '%s 143 proxy' % SERVICE_ADDR in entries, show
        assert not any(BATCH_PREFIX in e for e in entries), show
        for m, side in ((proxied, 'source'), (direct, 'destination')):
            assert m.noop()[0] == 'OK'
            assert side_of(env, inbox_tags(m), 'alice') == side
    finally:
        close(proxied)
        close(direct)


def test_kill9_leaves_diverted_ports_closed(steered):
    env = steered
    open_session, tags = login_tags(env, 'alice')
    src_before = env.from_clients(env.src_ns)
    _, rejected0 = env.stats()
    os.kill(env.gw.pid, signal.SIGKILL)
    env.gw.proc.wait()
    env.gw.proc = None
    try:
        # The open proxied session is reset, not passed on.
        with pytest.raises((OSError, imaplib.IMAP4.abort)):
            open_session.noop()
        for port in (143, 110):
            err = refused(env, port)
            assert isinstance(err, ConnectionRefusedError), (port, err)
        _, rejected = env.stats()
        assert rejected >= rejected0 + 2, (rejected0, rejected)
        # Nothing reached the source.
        assert env.from_clients(env.src_ns) == src_before
        # The batch prefix is steered to the destination, not to
        # mailshiftd: it still works.
        m, tags = login_tags(env, 'alice', CLI_BATCH_ADDR)
        try:
            assert side_of(env, tags, 'alice') == 'destination'
        finally:
            close(m)
    finally:
        open_session.shutdown()
        env.gw.start()
    m, tags = login_tags(env, 'alice')
    try:
        assert side_of(env, tags, 'alice') == 'source'
    finally:
        close(m)


def test_remove_leaves_nothing_behind(env):
    assert env.dump() == env.clean
    env.steer('install', check=0)
    installed = env.dump()
    assert 'table inet mailshift' in installed
    assert 'fwmark 0x4d530000 lookup 100 proto 77' in installed
    assert 'local default dev lo table 100 proto 77' in installed
    # Installing again replaces the table; the routing is not doubled.
    env.steer('install', check=0)
    assert env.dump().count('proto 77') == installed.count('proto 77')
    # Installing with another priority, table and mark moves the routing:
    # nothing of the first install is left next to it.
    moved = _conf(env, 'moved.conf', STEER_CONF + 'rule_priority = 300\n'
                  'route_table = 200\nmark = 0x7a000000\n')
    env.steer('install', config=moved, check=0)
    rules = env.gw_ns.run(['ip', 'rule']).stdout
    routes = env.gw_ns.run(['ip', 'route', 'show', 'table', 'all']).stdout
    assert [l for l in rules.splitlines() if 'proto 77' in l] == \
        ['300:\tfrom all fwmark 0x7a000000 lookup 200 proto 77'], rules
    assert [l for l in routes.splitlines() if 'proto 77' in l] == \
        ['local default dev lo table 200 proto 77 scope host '], routes
    # steer set refuses a configuration whose mark is not the table's.
    r = env.steer('set', SERVICE_ADDR, '143', 'destination', check=2)
    assert 'run steer install' in r.stderr, r.stderr
    env.steer('remove', check=0)
    assert env.dump() == env.clean
    # Removing what is not there is no error, and changes nothing.
    env.steer('remove', check=0)
    assert env.dump() == env.clean


def _conf(env, name, steer_text):
    """The daemon's configuration with [steer] replaced."""
    with open(env.gw.config_path) as f:
        text = f.read()
    path = os.path.join(env.root, name)
    with open(path, 'w') as f:
        f.write(text.replace(STEER_CONF, steer_text))
    return path


def test_bad_input_changes_nothing(env):
    assert env.dump() == env.clean
    env.steer('install', check=0)
    try:
        before = env.dump()
        contradicts = _conf(env, 'contradicts.conf', STEER_CONF +
                            'entry = %s 143 %s proxy\n'
                            % (SERVICE_ADDR, BATCH_PREFIX))
        no_address = _conf(env, 'noaddr.conf', '[steer]\nport = 143 10143\n')
        cases = [
            (dict(config=contradicts), 2, 'contradicts'),
            (dict(config=no_address), 2, 'names no address'),
        ]
        for kw, rc, text in cases:
            r = env.steer('install', check=rc, **kw)
            assert text in r.stderr, r.stderr
            assert env.dump() == before
        # mailshiftd refuses them at start too.
        for path in (contradicts, no_address):
            r = subprocess.run([env.gw.binary, '-t', '-c', path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
            assert r.returncode == 2 and ('names no address' in r.stderr or
                                          'contradicts' in r.stderr), r.stderr

        # Another table already diverting a steered port.
        env.gw_ns.run([NFT, '-f', '-'], input="""
table ip other {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr %s tcp dport 143 dnat to 192.0.2.1
  }
}""" % SERVICE_ADDR)
        other = env.dump()
        r = env.steer('install', check=1)
        assert 'table ip other' in r.stderr and 'already diverts' in \
            r.stderr, r.stderr
        assert env.dump() == other
        env.gw_ns.run([NFT, 'delete', 'table', 'ip', 'other'])
        assert env.dump() == before

        # A priority the host uses.
        env.gw_ns.ip('rule', 'add', 'from', '192.0.2.7', 'lookup', '55',
                      'priority', '4242')
        taken = _conf(env, 'taken.conf', STEER_CONF + 'rule_priority = 4242\n')
        r = env.steer('install', config=taken, check=1)
        assert 'priority 4242 is used' in r.stderr, r.stderr
        env.gw_ns.ip('rule', 'del', 'priority', '4242')
        assert env.dump() == before

        # With --json, an error is JSON too.
        r = env.steer('install', '--json', config=contradicts, check=2)
        assert r.json['ok'] is False and 'contradicts' in \
            r.json['error'], r.stdout
        assert env.dump() == before

        # Wrong set arguments.
        r = env.steer('set', '192.0.2.9', '143', 'proxy', check=2)
        assert 'not a service address' in r.stderr or \
            'not steered' in r.stderr, r.stderr
        r = env.steer('set', SERVICE_ADDR, '143', 'sideways', check=2)
        assert 'action' in r.stderr, r.stderr
        r = env.steer('set', SERVICE_ADDR, 'other', 'proxy', check=2)
        assert 'only mail ports' in r.stderr, r.stderr
        assert env.dump() == before

        # No CAP_NET_ADMIN: refused before anything is read or changed.
        for cmd in (('install',), ('remove',),
                    ('set', SERVICE_ADDR, '143', 'destination')):
            r = env.steer(*cmd, prefix=('setpriv', '--bounding-set',
                                        '-net_admin', '--inh-caps',
                                        '-net_admin'), check=1)
            assert 'CAP_NET_ADMIN' in r.stderr, r.stderr
            assert env.dump() == before
    finally:
        env.steer('remove', check=0)
    assert env.dump() == env.clean


def test_failed_install_leaves_kernel_as_it_was(env):
    """A change that fails half-way (here: the IPv6 local route, refused
    because lo has IPv6 disabled, after the IPv4 rule and route went in)
    is undone: the namespace is exactly as before."""
    assert env.dump() == env.clean
    dual = _conf(env, 'dual.conf', STEER_CONF + 'address = fd00:232:1::2\n')
    sysctl = 'net.ipv6.conf.lo.disable_ipv6'
    env.gw_ns.run(['sysctl', '-qw', sysctl + '=1'])
    try:
        before = env.dump()
        r = env.steer('install', config=dual, check=1)
        assert 'IPv6 local route' in r.stderr and 'nothing was changed' in \
            r.stderr, r.stderr
        assert env.dump() == before
    finally:
        env.gw_ns.run(['sysctl', '-qw', sysctl + '=0'])
    assert wait_for(lambda: env.dump() == env.clean, 10, 0.1), env.dump()
    # With IPv6 back, the same configuration installs (both families).
    env.steer('install', config=dual, check=0)
    try:
        rules = env.gw_ns.run(['ip', '-6', 'rule']).stdout
        assert 'fwmark 0x4d530000 lookup 100 proto 77' in rules, rules
        listed = env.gw_ns.run([NFT, 'list', 'table', 'inet',
                                'mailshift']).stdout
        assert 'tproxy ip6 to :%d' % IMAP_LISTEN in listed, listed
    finally:
        env.steer('remove', config=dual, check=0)
    assert env.dump() == env.clean


def test_manage_installs_at_start_and_fails_closed_at_stop(env):
    """[steer] manage = yes: mailshiftd installs the steering once its
    listeners are open, and a clean stop leaves it installed: the proxied
    ports are refused, nothing goes to the source."""
    assert env.dump() == env.clean
    gw = env.gw
    plain = gw.extra_conf
    gw.stop()
    gw.extra_conf = plain + 'manage = yes\n'
    try:
        gw.start()
        show = env.steer('show', '--json', check=0).json
        assert show['installed'] is True, show
        assert len(show['routing']['rules']) == 1, show
        assert 'steering installed' in gw.log_text()
        m, tags = login_tags(env, 'alice')
        try:
            assert side_of(env, tags, 'alice') == 'source'
        finally:
            close(m)
        src_before = env.from_clients(env.src_ns)
        assert gw.stop() == 0 and not gw.killed
        assert 'steering left installed' in gw.log_text()
        for port in (143, 110):
            err = refused(env, port)
            assert isinstance(err, ConnectionRefusedError), (port, err)
        assert env.from_clients(env.src_ns) == src_before
        assert env.steer('show', '--json', check=0).json['installed']
    finally:
        gw.stop()
        gw.extra_conf = plain
        env.steer('remove', check=0)
        gw.start()
    assert env.dump() == env.clean


def _transparent_listener6(port):
    """A listening IPv6 socket with IPV6_TRANSPARENT on [::]:port (v6 only:
    mailshiftd has 0.0.0.0:port), made in the calling thread's namespace."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.IPPROTO_IPV6, 75, 1)        # IPV6_TRANSPARENT
    s.bind(('::', port))
    s.listen(4)
    s.settimeout(10)
    return s


def test_ipv6_divert_and_fail_closed(env):
    """The same table for an IPv6 service address: a client's connection
    to [SERVICE6]:143 reaches a transparent listener on the gateway with
    its original destination; with nothing listening it is reset; nothing
    reaches the source."""
    assert env.dump() == env.clean
    dual = _conf(env, 'dual6.conf', STEER_CONF + 'address = %s\n' % SERVICE6)
    env.steer('install', config=dual, check=0)
    try:
        src_before = env.from_clients(env.src_ns)
        lst = env.gw_ns.call(_transparent_listener6, IMAP_LISTEN)
        try:
            c = env.cli.call(socket.create_connection, (SERVICE6, 143),
                             timeout=10)
            conn, peer = lst.accept()
            try:
                assert peer[0] == CLI6, peer
                assert conn.getsockname()[:2] == (SERVICE6, 143), \
                    conn.getsockname()
                conn.sendall(b'* OK ipv6\r\n')
                assert c.recv(64) == b'* OK ipv6\r\n'
            finally:
                conn.close()
                c.close()
        finally:
            lst.close()
        _, rejected0 = env.stats()
        err = refused(env, 143, SERVICE6)
        assert isinstance(err, ConnectionRefusedError), err
        # Reset by the table's reject, not by the source.
        assert env.stats()[1] >= rejected0 + 1
        assert env.from_clients(env.src_ns) == src_before
        stats, _ = env.stats()
        assert stats['%s 143 proxy' % SERVICE6] >= 2, stats
    finally:
        env.steer('remove', config=dual, check=0)
    assert env.dump() == env.clean


def _hold_steer_lock():
    """What mailshiftctl steer holds while it changes the steering (an
    abstract UNIX socket of the namespace)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind('\0mailshift-steer')
    return s


def test_changes_wait_for_each_other(steered):
    """Two changes never interleave: while another holds the namespace's
    steering lock, a change waits, and gives up after 10 s changing
    nothing; once the lock is free it goes through."""
    env = steered
    before = env.dump()
    lock = env.gw_ns.call(_hold_steer_lock)
    try:
        r = env.steer('set', SERVICE_ADDR, '143', 'destination', check=1)
        assert 'another steering change' in r.stderr, r.stderr
        assert env.dump() == before
        waiting = subprocess.Popen(
            netns.exec_prefix(env.gw_ns.name) +
            [env.ctl_binary, 'steer', '-c', env.gw.config_path, 'set',
             SERVICE_ADDR, '110', 'destination'],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True)

        def started():
            try:
                with open('/proc/%d/comm' % waiting.pid) as f:
                    return f.read().strip() == 'mailshiftctl'
            except OSError:
                return False
        assert wait_for(started, 10, 0.02)
        assert env.dump() == before
    finally:
        lock.close()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, (out, err)
    entries = {e['entry'] for e in
               env.steer('show', '--json', check=0).json['entries']}
    assert '%s 110 destination' % SERVICE_ADDR in entries, entries
    assert '%s 143 proxy' % SERVICE_ADDR in entries, entries


TRANSPARENT_CONF = """
[source]
transparent = yes

[destination]
transparent = yes
"""


def login_rip(env, server, user, fn):
    """Runs fn() (a login of user's that reaches server) and returns the
    rip= of the one login line it added to server's own log."""
    before = len(logins(server, user))
    fn()
    assert wait_for(lambda: len(logins(server, user)) > before, 10)
    new = logins(server, user)[before:]
    assert len(new) == 1, new
    return new[0].split('rip=', 1)[1].split(',', 1)[0]


def _imap_session(env, user, want_side, source=CLI_ADDR, addr=None):
    """A real IMAP login and FETCH through the gateway (to SERVICE_ADDR:143,
    or to addr:IMAP_LISTEN from the gateway's own namespace)."""
    if addr is None:
        m = cli_imap(env, source)
    else:
        m = env.gw_ns.call(_from(imaplib.IMAP4, addr), addr, IMAP_LISTEN,
                           timeout=10)
    try:
        typ, data = m.login(user, USERS[user])
        assert typ == 'OK', data
        assert side_of(env, inbox_tags(m), user) == want_side
    finally:
        close(m)


def _pop3_session(env, user):
    p = cli_pop3(env)
    try:
        p.user(user)
        assert p.pass_(USERS[user]).startswith(b'+OK')
        resp, lines, _ = p.retr(1)
        assert any(('steer-dst-%s-%s' % (user, env.uid)).encode() in l
                   for l in lines), lines
        p.quit()
    finally:
        p.close()


def test_transparent_upstream_servers_see_the_client(steered):
    """[source]/[destination] transparent = yes: mailshiftd connects to
    the servers from the client's own address, so each server's own log
    (Dovecot's rip=) names the client, not the gateway; without it, the
    gateway. A client of the gateway's own host is connected from the
    host's address (said once at -v)."""
    env = steered
    gw = env.gw
    # Without: the source sees the gateway's address on its segment.
    rip = login_rip(env, env.src, 'alice',
                     lambda: _imap_session(env, 'alice', 'source'))
    assert rip == GW_ADDRS[1], rip
    plain = gw.extra_conf
    gw.stop()
    gw.extra_conf = plain + TRANSPARENT_CONF
    try:
        gw.start()
        src_before = env.from_clients(env.src_ns)
        rip = login_rip(env, env.src, 'alice',
                         lambda: _imap_session(env, 'alice', 'source'))
        assert rip == CLI_ADDR, rip
        # The upstream's packets came from the client's address (the
        # source's counter of packets from the client network grew) ...
        assert env.from_clients(env.src_ns) > src_before
        # ... and the destination's too, for bob (POP3, migrated).
        rip = login_rip(env, env.dst, 'bob', lambda: _pop3_session(env,
                                                                    'bob'))
        assert rip == CLI_ADDR, rip
        # A client on the gateway's own host: its address is local, the
        # server would answer it directly: a normal connect.
        rip = login_rip(env, env.src, 'alice', lambda: _imap_session(
            env, 'alice', 'source', addr=GW_ADDRS[0]))
        assert rip == GW_ADDRS[1], rip
        said = 'transparent upstream: client %s is this host\'s own ' \
            'address' % GW_ADDRS[0]
        assert wait_for(lambda: said in gw.log_text(), 5), gw.log_tail(20)
        _, rejected = env.stats()
        assert rejected == 0
    finally:
        gw.stop()
        gw.extra_conf = plain
        gw.start()


def _greet_from(port):
    """(In the client's namespace.) Connects from CLI_ADDR:port to the
    service's IMAP port: (greeting, segments sent again); then LOGOUT,
    which mailshiftd answers and closes first."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((CLI_ADDR, port))
        s.settimeout(10)
        s.connect((SERVICE_ADDR, 143))
        line = gwlib.first_line(s)
        again = segments_sent_again(s)
        s.sendall(b'a LOGOUT\r\n')
        while s.recv(4096):
            pass
    return line, again


def test_client_port_reused_is_diverted_at_once(steered):
    """A client back on the source port of a connection the gateway closed
    first (the gateway's end lingers in TIME_WAIT) reaches mailshiftd with
    its first SYN: the SYN is decided and proxied, not handed to the old
    socket, which would answer with the old connection's ACK (the client
    resets it and sends its SYN again)."""
    env = steered
    port = random.randrange(20000, 30000)      # below the ephemeral range
    line, again = env.cli.call(_greet_from, port)
    assert line.startswith(b'* OK') and again == 0, (line, again)
    lingering = env.gw_ns.run(
        ['ss', '-tanH', 'state', 'time-wait', 'src', '%s:143' % SERVICE_ADDR,
         'dst', '%s:%d' % (CLI_ADDR, port)]).stdout
    assert lingering.strip(), 'the gateway did not close first'
    # the client's end is gone once the gateway acknowledged its FIN
    assert wait_for(lambda: not env.cli.run(
        ['ss', '-tanH', 'sport', '= :%d' % port]).stdout.strip(), 10)
    _, rejected0 = env.stats()
    src_before = env.from_clients(env.src_ns)
    line, again = env.cli.call(_greet_from, port)
    assert line.startswith(b'* OK'), line
    assert again == 0, 'the SYN was sent %d more time(s)' % again
    _, rejected = env.stats()
    assert rejected == rejected0
    assert env.from_clients(env.src_ns) == src_before
