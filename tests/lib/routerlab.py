"""Router mode in network namespaces: a client, a router (the gateway), the
source and the destination host, each server a real Dovecot answering on
its host's address and the standard ports. Shared by
tests/integration/test_steer.py and `make demo-router` (tools/demo_router.py).

    NET.0.2  client    c0 ─┐
                            g0 NET.0.1  router (gateway)  g1 NET.1.1 ─ s0 NET.1.2  source
                                                           g2 NET.2.1 ─ d0 NET.2.2  destination

    wire(cli, gw, src, dst, NET)          # veths, addresses, routes, forwarding
    serve_standard_ports(ns, dovecot, NET, NET6)

The harness's Dovecot listens on its namespace's 127.0.0.1 on ports of its
own choosing; a DNAT in the server's namespace (route_localnet) brings ports
143 and 110 of the host's address there. Each server's namespace also counts
packets from the client network to those ports ("from_clients", before
anything else sees them).
"""

import shutil

NFT = shutil.which('nft') or '/usr/sbin/nft'

SERVER_NFT = """
table inet host {
  chain raw {
    type filter hook prerouting priority raw; policy accept;
    ip saddr %(net)s0.0/24 tcp dport { 143, 110 } counter \\
      comment "from_clients"
    ip6 saddr %(net6)s:/64 tcp dport { 143, 110 } counter \\
      comment "from_clients"
  }
  chain nat {
    type nat hook prerouting priority dstnat; policy accept;
    tcp dport 143 dnat ip to 127.0.0.1:%(imap)d
    tcp dport 110 dnat ip to 127.0.0.1:%(pop3)d
  }
}
"""


class Remote:
    """A harness Dovecot as mailshiftd reaches it from the gateway: by its
    host's address and the standard ports (for gateway.Mailshiftd)."""

    def __init__(self, server, addr):
        self.server = server
        self.addr = addr
        self.pop3_port = 110
        self.tls_ca = None

    def url(self, scheme='imap'):
        return '%s://%s:%d' % (scheme, self.addr,
                               {'imap': 143, 'pop3': 110}[scheme])


def router_addrs(net):
    """The router's addresses on the client's, the source's and the
    destination's segment."""
    return (net + '0.1', net + '1.1', net + '2.1')


def wire(cli, gw, src, dst, net, cli_extra=()):
    """Connects the four namespaces (netns.NetNS, added) with veth pairs:
    the client NET.0.2 (and cli_extra addresses), the source NET.1.2 and
    the destination NET.2.2, each /24 with its default route via the
    router, which forwards IPv4."""
    import netns
    gw_addrs = router_addrs(net)
    netns.veth_pair(cli, 'c0', gw, 'g0')
    netns.veth_pair(src, 's0', gw, 'g1')
    netns.veth_pair(dst, 'd0', gw, 'g2')
    for ns, dev, addrs, via in (
            (cli, 'c0', (net + '0.2',) + tuple(cli_extra), gw_addrs[0]),
            (src, 's0', (net + '1.2',), gw_addrs[1]),
            (dst, 'd0', (net + '2.2',), gw_addrs[2])):
        for a in addrs:
            ns.ip('addr', 'add', a + '/24', 'dev', dev)
        ns.ip('link', 'set', dev, 'up')
        ns.ip('route', 'add', 'default', 'via', via)
    for dev, a in zip(('g0', 'g1', 'g2'), gw_addrs):
        gw.ip('addr', 'add', a + '/24', 'dev', dev)
        gw.ip('link', 'set', dev, 'up')
    gw.run(['sysctl', '-qw', 'net.ipv4.ip_forward=1'])


def serve_standard_ports(ns, server, net, net6):
    """Ports 143 and 110 of ns's addresses to server (a started harness
    Dovecot inside ns), and the from_clients counters."""
    ns.run(['sysctl', '-qw', 'net.ipv4.conf.all.route_localnet=1'])
    ns.run([NFT, '-f', '-'], input=SERVER_NFT % {
        'net': net, 'net6': net6, 'imap': server.imap_port,
        'pop3': server.pop3_port})
