#!/usr/bin/python3
"""make demo-router (and the second half of make demo): router mode.

Four network namespaces: a client, a router (mailshiftd's host), the old
mail server and the new one, each server a real Dovecot on ports 143/110 of
its own address. The client always connects to the old server's address:

1. before: the old server answers it directly;
2. `mailshiftctl steer install` on the router (one nftables table, the
   policy routing), `steer show` with its counters;
3. the same client, the same address, no setting changed: mailshiftd
   answers, moves the user while the login waits (policy hold) and serves
   it from the new server, which sees the client's own address
   ([destination] transparent = yes);
4. `steer show` again: the counter of the proxied entry has grown.

Everything it made is removed at the end, also on a failure, Ctrl-C or
SIGTERM. Needs root (network namespaces, nftables, policy routing): without
it, it says so and exits 0, so that `make demo`'s first half still counts.
"""

import imaplib
import os
import signal
import subprocess
import sys
import time

from demo import CTL, DAEMON, say  # and tests/lib on sys.path

import dovecot as dc
import gateway as gwlib
import mailcheck as mc
import netns
import routerlab

USER, PASSWORD = 'carol', 'demo-secret'
NET, NET6 = '10.241.', 'fd00:241:'
CLIENT, OLD, NEW = NET + '0.2', NET + '1.2', NET + '2.2'
ROUTER = routerlab.router_addrs(NET)
MESSAGES = 12

STEER = """[listen]
trusted_networks = %(net)s0.0/24

[destination]
transparent = yes

[steer]
address = %(old)s
port = 143 10143
port = 110 10110
destination = %(new)s
""" % {'net': NET, 'old': OLD, 'new': NEW}

_LEFT = '  client %s ──► router %s (mailshiftd) ──' % (CLIENT, ROUTER[0])
PICTURE = '\n%s┬──► old server %s\n%s└──► new server %s\n' % (
    _LEFT, OLD, ('  (connects to %s:143)' % OLD).ljust(len(_LEFT)), NEW)


def skip(why):
    say('router mode: skipped')
    print('%s\nThe router-mode demo needs root and network namespaces '
          '(run `sudo make demo-router`); the single-host demo above does '
          'not.' % why)
    sys.exit(0)


def steer(gw_ns, conf, *args):
    print('$ mailshiftctl steer %s' % ' '.join(args), flush=True)
    r = gw_ns.run([CTL, 'steer', '-c', conf] + list(args), check=False)
    sys.stdout.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError('mailshiftctl steer %s: exit %d'
                           % (' '.join(args), r.returncode))


def client_session(cli):
    """A real IMAP client in the client's namespace, to the old server's
    address: its greeting, the login, INBOX's size."""
    m = cli.call(imaplib.IMAP4, OLD, 143, timeout=60)
    print('client -> %s:143: %s' % (OLD, m.welcome.decode()))
    t = time.time()
    typ, data = m.login(USER, PASSWORD)
    print('LOGIN %s -> %s (%.1fs)' % (USER, typ, time.time() - t))
    typ, data = m.select('INBOX', readonly=True)
    print('SELECT INBOX -> %s messages' % data[0].decode())
    m.logout()


def login_line(server):
    """The server's own log: its last login line of USER, shortened."""
    with open(server.log_path, errors='replace') as f:
        lines = [l for l in f if 'Login: user=<%s>' % USER in l]
    if not lines:
        return '(none)'
    l = lines[-1]
    return l[l.index('Login:'):].split(', lip=')[0].strip()


def run(root, nss, servers):
    """The demo; servers gets each server and mailshiftd as it starts."""
    cli, gw_ns, old_ns, new_ns = nss
    say('namespaces: a client, a router, the old and the new server')
    print(PICTURE)
    routerlab.wire(cli, gw_ns, old_ns, new_ns, NET)
    for name, ns in (('old', old_ns), ('new', new_ns)):
        s = dc.Dovecot(os.path.join(root, name), 'demo-' + name,
                       users={USER: PASSWORD}, netns=ns.name)
        s.start()
        servers.append(s)
        routerlab.serve_standard_ports(ns, s, NET, NET6)
    old, new = servers[:2]
    imap = old.imap(USER)
    mc.append_many(imap, 'INBOX', [mc.make_message(i, 2000)
                                   for i in range(MESSAGES)])
    imap.logout()
    print('old server: %s has %d messages; new server: empty'
          % (USER, MESSAGES))

    say('before: the client reaches the old server directly')
    client_session(cli)
    print('old server log: %s   (the client)' % login_line(old))

    say('mailshiftd on the router, then the steering')
    gw = gwlib.Mailshiftd(
        os.path.join(root, 'gw'), routerlab.Remote(old, OLD),
        routerlab.Remote(new, NEW), policy='hold', binary=DAEMON,
        ctl_binary=CTL, listen_host='0.0.0.0', imap_port=10143,
        pop3_port=10110, transparent=True, netns=gw_ns.name,
        extra_conf=STEER)
    servers.append(gw)
    gw.start()
    print('[steer] of mailshift.conf:\n  ' +
          STEER.split('[steer]\n')[1].strip().replace('\n', '\n  '))
    steer(gw_ns, gw.config_path, 'install')
    steer(gw_ns, gw.config_path, 'show')

    say('the same client, the same address, no setting changed')
    client_session(cli)
    r = gw.ctl('user', 'show', USER, '--json')
    print('mailshiftctl user show %s: state %s' % (
        USER, r.json['user']['state'] if r.json else '?'))
    print('new server log: %s   (the client itself: [destination] '
          'transparent = yes)' % login_line(new))
    print('old server log: %s   (mailshiftd copying, from the router)'
          % login_line(old))

    say('the counters after')
    steer(gw_ns, gw.config_path, 'show')
    steer(gw_ns, gw.config_path, 'remove')


def main():
    if not os.path.exists(CTL) or not os.path.exists(DAEMON):
        sys.exit('demo-router: build first (make)')
    if os.geteuid() != 0:
        skip('Not root (uid %d).' % os.geteuid())
    if not os.access(routerlab.NFT, os.X_OK):
        skip('nft (package nftables) is not installed.')
    say('router mode: the kernel brings the clients to mailshiftd')
    tag = '%d' % os.getpid()
    nss = [netns.NetNS('msdemo-%s-%s' % (n, tag))
           for n in ('cli', 'router', 'old', 'new')]
    root = dc.make_test_root(prefix='mailshift-demo-router-')
    servers, rc = [], 1

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            nss[0].add()
        except netns.NotPermitted as e:
            skip('Network namespaces are not permitted here: %s' % e)
        for ns in nss[1:]:
            ns.add()
        run(root, nss, servers)
        rc = 0
    except KeyboardInterrupt:
        print('\ninterrupted')
    except (OSError, RuntimeError, subprocess.SubprocessError,
            imaplib.IMAP4.error) as e:
        print('error: %s' % e)
    finally:
        # Everything made, in reverse; a second Ctrl-C waits for it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for s in reversed(servers):
            s.stop()
        for ns in reversed(nss):
            for pid in ns.pids():       # a server start() left half-way
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
            ns.delete()
        dc.remove_test_root(root)
        print('removed: the namespaces (their table, rules, routes), the '
              'servers, mailshiftd and the files')
    say('router mode: done' if rc == 0 else 'router mode: FAILED')
    return rc


if __name__ == '__main__':
    sys.exit(main())
