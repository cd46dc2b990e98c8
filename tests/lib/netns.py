"""Network namespaces for tests: create, run commands in, open sockets in,
delete.

    ns = NetNS('ms-gw-%d' % os.getpid())
    ns.add()                              # ip netns add; lo up
    ns.ip('addr', 'add', '10.1.0.1/24', 'dev', 'g0')   # ip -n NS ...
    ns.run(['nft', '-f', '-'], input=ruleset)            # ip netns exec NS ...
    m = ns.call(imaplib.IMAP4, '10.1.1.2', 143)          # socket made in NS
    ns.delete()        # ip netns del: its veths, rules and routes go too

call_in_netns(name, fn, ...) runs fn in a short-lived thread that has
joined the namespace with setns(2) (only that thread moves; the process and
its other threads stay where they are). Sockets fn creates stay in that
namespace for their whole life, so a client object built there (imaplib,
poplib, socket.create_connection) can be used from any thread afterwards.
Namespaces are found by name in /run/netns (what `ip netns add` makes).
Only the namespace's own name is ever deleted: nothing is cleaned up by
pattern.
"""

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import threading

IP = shutil.which('ip') or '/usr/sbin/ip'
NETNS_DIR = '/run/netns'
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6',
                    use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NetNSError(RuntimeError):
    pass


class NotPermitted(NetNSError):
    """`ip netns add` was refused (not root / no CAP_SYS_ADMIN)."""


def _setns(name):
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, 'setns(%s): %s' % (name, os.strerror(e)))
    finally:
        os.close(fd)


def call_in_netns(name, fn, *args, **kwargs):
    """fn(*args, **kwargs) run in network namespace name (None: here, in
    this thread); returns its result or raises its exception."""
    if name is None:
        return fn(*args, **kwargs)
    box = {}

    def run():
        try:
            _setns(name)
            box['value'] = fn(*args, **kwargs)
        except BaseException as e:      # handed to the caller
            box['error'] = e

    t = threading.Thread(target=run, name='netns-' + name, daemon=True)
    t.start()
    t.join()
    if 'error' in box:
        raise box['error']
    return box['value']


def exec_prefix(name):
    """argv prefix running a command in namespace name ([] for None)."""
    return [] if name is None else [IP, 'netns', 'exec', name]


class NetNS:
    """One named network namespace (see the module docstring)."""

    def __init__(self, name):
        self.name = name
        self.added = False

    @property
    def path(self):
        return os.path.join(NETNS_DIR, self.name)

    def add(self):
        if os.path.exists(self.path):
            raise NetNSError('network namespace %s exists already'
                             % self.name)
        r = subprocess.run([IP, 'netns', 'add', self.name],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if r.returncode != 0:
            out = r.stdout.decode(errors='replace').strip()
            if os.geteuid() != 0 or 'not permitted' in out.lower():
                raise NotPermitted('ip netns add %s: %s' % (self.name, out))
            raise NetNSError('ip netns add %s: rc %d: %s'
                             % (self.name, r.returncode, out))
        self.added = True
        self.ip('link', 'set', 'lo', 'up')
        return self

    def delete(self):
        """ip netns del NAME (only when this object added it). Its
        interfaces (veth ends), addresses, routes, rules and nft tables go
        with it; processes still inside keep it alive, so stop them first."""
        if not self.added:
            return
        r = subprocess.run([IP, 'netns', 'del', self.name],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if r.returncode != 0 and os.path.exists(self.path):
            raise NetNSError('ip netns del %s: %s' % (
                self.name, r.stdout.decode(errors='replace').strip()))
        self.added = False

    def pids(self):
        """PIDs of processes whose network namespace is this one."""
        try:
            want = os.stat(self.path)
        except OSError:
            return []
        out = []
        for d in os.listdir('/proc'):
            if not d.isdigit():
                continue
            try:
                st = os.stat('/proc/%s/ns/net' % d)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                out.append(int(d))
        return out

    def ip(self, *args, check=True):
        """ip -n NAME ARGS..."""
        return self._run([IP, '-n', self.name] + list(args), check=check)

    def run(self, argv, input=None, check=True, timeout=30):
        """ip netns exec NAME ARGV...; CompletedProcess (text output)."""
        return self._run(exec_prefix(self.name) + list(argv), input=input,
                         check=check, timeout=timeout)

    @staticmethod
    def _run(argv, input=None, check=True, timeout=30):
        r = subprocess.run(argv, input=input, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=timeout,
                           stdin=None if input is not None else
                           subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise NetNSError('%s: rc %d: %s' % (' '.join(argv), r.returncode,
                                                (r.stderr or r.stdout)
                                                .strip()))
        return r

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) inside this namespace (call_in_netns)."""
        return call_in_netns(self.name, fn, *args, **kwargs)

    def __repr__(self):
        return 'NetNS(%r)' % self.name


def veth_pair(a, a_if, b, b_if):
    """A veth pair: end a_if in namespace a, b_if in b (NetNS objects)."""
    r = subprocess.run([IP, 'link', 'add', a_if, 'netns', a.name, 'type',
                        'veth', 'peer', 'name', b_if, 'netns', b.name],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise NetNSError('veth %s/%s: %s' % (
            a_if, b_if, r.stdout.decode(errors='replace').strip()))
