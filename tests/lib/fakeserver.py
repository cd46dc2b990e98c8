"""Scripted servers on loopback for tests: a base class that listens on a
free 127.0.0.1 port and runs handle() for each connection in a thread of
its own.

    class Greeter(fakeserver.LoopbackServer):
        def handle(self, conn, n):          # n: 1 for the first connection
            conn.sendall(b'* OK hello\\r\\n')

    srv = Greeter()
    srv.port, srv.conns                     # the port; connections so far
    srv.close()                             # stops accepting, closes all

handle() may keep the connection open and return (close() closes it);
socket errors in handle() end that connection only.
"""

import socket
import threading


class LoopbackServer:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = 0
        self._open = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def handle(self, conn, n):
        raise NotImplementedError

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            self._open.append(c)
            threading.Thread(target=self._run, args=(c, self.conns),
                             daemon=True).start()

    def _run(self, conn, n):
        try:
            self.handle(conn, n)
        except OSError:
            pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # wakes accept()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for c in self._open:
            try:
                c.close()
            except OSError:
                pass
