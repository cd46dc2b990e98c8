"""Socket activation for tests, done the way systemd does it
(sd_listen_fds(3)): the test holds the listening sockets, as the socket
unit does, and each daemon it starts gets them as fds 3, 4, ... with
LISTEN_FDS, LISTEN_PID (its own pid) and LISTEN_FDNAMES.

    socks = Sockets([('0.0.0.0', 10143, 'imap'), ...], transparent=True,
                    netns='NAME')       # bound and listening, in NAME
    Popen(socks.launcher() + [mailshiftd, ...], pass_fds=socks.fds())
    ...                                 # restart the daemon: same sockets
    socks.close()

The launcher is this file run as a program: it moves the fds it is given
to 3 and up, sets the variables (LISTEN_PID is known only in the process
that execs the daemon: exec keeps the pid) and execs the rest of argv:

    python3 sdactivate.py FD=NAME... -- PROGRAM ARGS...
"""

import fcntl
import os
import socket
import sys

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def _bind(host, port, transparent, backlog, v6only):
    v6 = ':' in host
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                      socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    if transparent:
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    s.bind((host.strip('[]'), port))
    s.listen(backlog)
    return s


class Sockets:
    """Listening sockets held by the test: (host, port, name) each. IPv6
    ones are IPv6-only unless v6only=False (as systemd's BindIPv6Only=)."""

    def __init__(self, listen, transparent=False, netns=None, backlog=511,
                 v6only=True):
        import netns as nslib
        self.socks = []
        self.names = []
        try:
            for host, port, name in listen:
                self.socks.append(nslib.call_in_netns(
                    netns, _bind, host, port, transparent, backlog,
                    v6only))
                self.names.append(name)
        except BaseException:
            self.close()
            raise

    def fds(self):
        return [s.fileno() for s in self.socks]

    def launcher(self):
        """argv prefix that execs the rest with the sockets passed on."""
        return [sys.executable, os.path.abspath(__file__)] + \
            ['%d=%s' % (fd, n) for fd, n in zip(self.fds(), self.names)] + \
            ['--']

    def close(self):
        for s in self.socks:
            s.close()
        self.socks = []


def main(argv):
    sep = argv.index('--')
    specs = [a.split('=', 1) for a in argv[:sep]]
    prog = argv[sep + 1:]
    # Out of the way first, so that moving one to 3+i never overwrites
    # another still to be moved.
    high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 3 + len(specs))
            for fd, _ in specs]
    for (fd, _), h in zip(specs, high):
        os.close(int(fd))
    for i, h in enumerate(high):
        os.dup2(h, 3 + i, inheritable=True)
        os.close(h)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()),
               LISTEN_FDS=str(len(specs)),
               LISTEN_FDNAMES=':'.join(n for _, n in specs))
    os.execvpe(prog[0], prog, env)


if __name__ == '__main__':
    main(sys.argv[1:])
