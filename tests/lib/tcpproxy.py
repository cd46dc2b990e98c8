"""A loopback TCP proxy (threads) that can cut connections on purpose.

    p = CuttingProxy(target_port, cut_after=2 * 1024 * 1024)
    p.start()        # p.port: listen port on 127.0.0.1
    ...              # connect to 127.0.0.1:p.port instead of target_port
    p.stop()

Once cut_after bytes in total have gone from the server to the clients
(over all connections), every connection is closed abruptly (RST) and
new connections are accepted and closed at once (refuse_after_cut=True).
cut_after=None: never cut.

    p.stall()        # a stalled server: nothing more is passed on, either
    ...              # way (new connections are accepted and wait too)
    p.resume()       # what waited goes through, in order

p.cut_now() cuts every connection at once and refuses new ones until
p.restore().
p.connections counts the connections accepted so far: a test stalls the
server, then waits for a client to have connected, and knows it is stuck
there until resume(). Behind(server, p) is a Dovecot as seen through p
(its IMAP URLs point at the proxy), for tests/lib/gateway.py.
hold_from=b' APPEND ': from the first chunk a client sends that holds these
bytes on, what that client sends is held back (p.holding is set) until
p.release(); a client that goes away meanwhile has it delivered then, late,
as a server still carrying out a dead client's last commands would.
keep_up=True keeps what the clients sent, all connections together, in
p.up (to check which commands went out). p.max_open is the most client
connections that were open at once (one whose client has closed counts as
gone even before its pump noticed). hold_up_after=N holds what clients
send once N bytes went up (p.holding is set), until p.release(): a
transfer stalled on purpose, mid-way. hold_at=b'UID FETCH 1:*' holds the
first chunk a client sends that holds these bytes (p.holding is set) until
p.release(), then passes it on as the connection goes on: a command
delayed on its way to a live server.
"""

import select
import socket
import struct
import threading


class CuttingProxy:
    def __init__(self, target_port, cut_after=None, target_host='127.0.0.1',
                 refuse_after_cut=True, hold_from=None, keep_up=False,
                 hold_up_after=None, hold_at=None):
        self.target = (target_host, target_port)
        self.cut_after = cut_after
        self.refuse_after_cut = refuse_after_cut
        self.hold_from = hold_from
        self.holding = threading.Event()
        self.released = threading.Event()
        self.bytes_down = 0          # server -> client
        self.bytes_up = 0            # client -> server
        self.connections = 0
        self.max_open = 0
        self.keep_up = keep_up
        self.up = bytearray()
        self.hold_up_after = hold_up_after
        self.hold_at = hold_at
        self._clients = set()        # client sockets still open
        self.cut = threading.Event()
        self.flowing = threading.Event()     # clear: stalled
        self.flowing.set()
        self._lock = threading.Lock()
        self._socks = set()
        self._threads = []
        self._stop = threading.Event()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(('127.0.0.1', 0))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]

    def start(self):
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def url(self, scheme='imap'):
        return '%s://127.0.0.1:%d' % (scheme, self.port)

    def _accept_loop(self):
        self._lsock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                c, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            if self.cut.is_set() and self.refuse_after_cut:
                _abort(c)
                continue
            try:
                s = socket.create_connection(self.target, timeout=10)
            except OSError:
                _abort(c)
                continue
            s.settimeout(None)
            with self._lock:
                self._socks.update((c, s))
                self._clients = {x for x in self._clients if _open(x)}
                self._clients.add(c)
                self.max_open = max(self.max_open, len(self._clients))
            for a, b, down in ((s, c, True), (c, s, False)):
                t = threading.Thread(target=self._pump, args=(a, b, down),
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def cut_now(self):
        """Every connection closed abruptly (RST) now, new ones refused
        (with refuse_after_cut) until restore(): a network partition."""
        self._cut_all()

    def restore(self):
        """After a cut: new connections go through again."""
        self.cut.clear()

    def stall(self):
        self.flowing.clear()

    def resume(self):
        self.flowing.set()
    def _held(self, held, data):
        """Whether a client's chunk is held back (hold_from)."""
        if self.hold_from is None or self.released.is_set():
            return False
        if held or self.hold_from in data:
            self.holding.set()
            return True
        return False

    def release(self):
        """Delivers what hold_from held back, and holds nothing more."""
        self.released.set()

    def _pump(self, src, dst, down):
        held = []
        try:
            while not self._stop.is_set():
                if held and not select.select([src], [], [], 0.1)[0]:
                    # a client that sends nothing more (stopped): what
                    # was held goes once released
                    if self.released.is_set():
                        dst.sendall(b''.join(held))
                        held = []
                    continue
                data = src.recv(65536)
                if not data:
                    break
                while not self.flowing.wait(0.1):
                    if self._stop.is_set():
                        return
                if not down and self._held(held, data):
                    held.append(data)
                    continue
                if held:
                    dst.sendall(b''.join(held))
                    held = []
                if down and self.cut_after is not None:
                    with self._lock:
                        room = self.cut_after - self.bytes_down
                    if room <= 0 or self.cut.is_set():
                        self._cut_all()
                        return
                    if len(data) > room:
                        data = data[:room]
                if not down and self.hold_up_after is not None and \
                        self.bytes_up + len(data) > self.hold_up_after:
                    self.holding.set()
                    self.released.wait()
                if not down and self.hold_at is not None and \
                        self.hold_at in data and not self.released.is_set():
                    self.holding.set()
                    self.released.wait()
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
                        if self.keep_up:
                            self.up += data
                    reached = (down and self.cut_after is not None and
                               self.bytes_down >= self.cut_after)
                if reached:
                    self._cut_all()
                    return
        except OSError:
            pass
        if held:
            # The client is gone: what it sent reaches the server late.
            self.released.wait()
            if not self._stop.is_set():
                try:
                    dst.sendall(b''.join(held))
                except OSError:
                    pass
        with self._lock:
            self._clients.difference_update((src, dst))
        # Normal end of one direction: close both ends of the pair.
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _cut_all(self):
        self.cut.set()
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for x in socks:
            _abort(x)

    def stop(self):
        self._stop.set()
        self.released.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for x in socks:
            _abort(x)
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Behind:
    """server (a tests/lib/dovecot.Dovecot) as a client sees it through
    proxy: url('imap') is the proxy's, the other schemes the server's own.
    Give it to gateway.Mailshiftd as src or dst."""

    def __init__(self, server, proxy):
        self.server = server
        self.proxy = proxy
        self.pop3_port = server.pop3_port
        self.tls_ca = server.tls_ca

    def url(self, scheme='imap'):
        if scheme == 'imap':
            return self.proxy.url(scheme)
        return self.server.url(scheme)


TCP_ESTABLISHED = 1


def _open(sock):
    """False once the peer closed sock (its FIN came: CLOSE_WAIT, even with
    bytes it sent before still unread here) or it is shut: the kernel's
    TCP state, not a peek, which sees those bytes before the EOF."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return info[0] == TCP_ESTABLISHED


def _abort(sock):
    """Close with RST (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack('ii', 1, 0))
    except OSError:
        pass
    try:
        # shutdown wakes a thread blocked in recv() on this socket.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
