"""A loopback IMAP proxy (threads) that counts the commands a server sees
and plays a busy or broken server for chosen users.

    p = ThrottleProxy(server_port).start()   # p.url(): imap://127.0.0.1:PORT
    ...
    p.stop()

Every command line a client sends is recorded in p.commands as
(time.monotonic(), user or None, verb), in order. p.max_logged is the most
logged-in connections open at once, counted at each login (a connection
whose client has closed counts as gone even before the proxy noticed:
its TCP state, as tcpproxy does), p.max_users the most users among
them; logged_open() those open now;
reset_max() starts counting again. Connections that never log in (the
daemon's capability probes) are not counted.

Misbehaving, for the tests of docs/mover.md "Protecting the source" and
of bad input:

    p.busy(n)             the next n commands sent after a login on a
                          connection with nothing else in flight are
                          answered "NO [UNAVAILABLE] Server
                          busy, try again later" by the proxy itself, not
                          passed on (p.refused counts them)
    p.refuse_login[u] = (n, reply)
                          u's next n logins get `reply` (text after the
                          tag, e.g. b'NO [UNAVAILABLE] Temporary
                          authentication failure.'); n None: every one
    p.refuse_folder[(u, folder)] = reply
                          u's SELECT/EXAMINE of folder (as sent, mUTF-7)
                          gets reply
    p.refuse_pipelined[(u, verb)] = reply
                          the first of u's commands `verb` (e.g. 'UID
                          FETCH') sent while another command of its
                          connection is in flight gets reply, once
                          (p.refused_pipelined counts it); the reply is
                          given between two of the server's responses
    p.drop_at_body_fetch.add(u)
                          each of u's connections is reset (RST) when it
                          sends its first UID FETCH ... BODY.PEEK[]
                          (p.dropped counts them)

Plaintext IMAP only: the proxy must read the traffic. Logins are seen as
LOGIN or AUTHENTICATE PLAIN with an initial response (SASL-IR, which
Dovecot offers); with a master login the user is the authzid.
"""

import base64
import re
import threading
import time

import hostileproxy
from hostileproxy import _abort, _astrings, _Framer
from tcpproxy import _open

BUSY_REPLY = b'NO [UNAVAILABLE] Server busy, try again later'


class _Conn(hostileproxy._Conn):
    def __init__(self, proxy, client, server):
        super().__init__(proxy, client, server)
        self.pending = set()         # tags sent on, not answered yet
        self.send_lock = threading.Lock()
        self.inject = []             # our replies, for the next boundary
        with proxy._lock:
            proxy._conns.add(self)


class ThrottleProxy(hostileproxy.HostileImapProxy):
    """The hostile proxy's listener and threads (tampering with nobody),
    with its own up and down pumps."""
    conn_class = _Conn

    def __init__(self, target_port, target_host='127.0.0.1'):
        super().__init__(target_port, user=None, kind='garbage',
                         target_host=target_host)
        self.commands = []
        self.max_logged = 0
        self.max_users = 0
        self._conns = set()
        self.refused = 0
        self.dropped = 0
        self.refuse_login = {}
        self.refuse_folder = {}
        self.refuse_pipelined = {}
        self.refused_pipelined = 0
        self.drop_at_body_fetch = set()
        self._busy = 0

    def busy(self, n):
        with self._lock:
            self._busy = n

    def logged_open(self):
        with self._lock:
            return sum(1 for c in self._conns
                       if c.user is not None and _open(c.client))

    def reset_max(self):
        with self._lock:
            self.max_logged = 0

    # ------------------------------------------------------------ threads

    def _reply(self, conn, tag, text):
        """Our reply: now when the server owes nothing on the connection,
        else after the server's response being sent (never inside one)."""
        line = tag + b' ' + text + b'\r\n'
        with conn.send_lock:
            if conn.pending:
                conn.inject.append(line)
            else:
                conn.client.sendall(line)

    def _up(self, conn):
        fr = _Framer()
        while not self._stop.is_set():
            data = conn.client.recv(65536)
            if not data:
                return
            out = bytearray()
            for ev in fr.feed(data):
                if ev[0] != 'line':
                    out += ev[1]
                    continue
                line, first, lit = ev[1], ev[2], ev[3]
                if first:
                    conn.pieces = []
                conn.pieces.append((line, None))
                if lit:
                    out += line
                    continue
                verdict = self._command(conn, conn.pieces)
                if verdict == 'drop':
                    with self._lock:
                        self.dropped += 1
                    _abort(conn.client)
                    _abort(conn.server)
                    return
                if verdict is not None:
                    self._reply(conn, conn.pieces[0][0].split(b' ', 1)[0],
                                verdict)
                    continue
                out += line
            if out:
                conn.server.sendall(out)

    def _command(self, conn, pieces):
        """Records a complete command; returns None (pass it on), the
        reply to give instead, or 'drop'."""
        args = _astrings(pieces)
        if len(args) < 2:
            return None
        tag, verb = args[0], args[1].upper()
        if verb == b'UID' and len(args) > 2:
            verb = b'UID ' + args[2].upper()
        user = self._login_user(verb, args)
        with self._lock:
            self.commands.append((time.monotonic(), user or conn.user,
                                  verb.decode('ascii', 'replace')))
        if user is not None:
            rule = self.refuse_login.get(user)
            if rule is not None and (rule[0] is None or rule[0] > 0):
                if rule[0] is not None:
                    self.refuse_login[user] = (rule[0] - 1, rule[1])
                return rule[1]
            conn.pending.add(tag)
            with self._lock:
                conn.user = user
                users = [c.user for c in self._conns
                         if c.user is not None and _open(c.client)]
                self.max_logged = max(self.max_logged, len(users))
                self.max_users = max(self.max_users, len(set(users)))
            return None
        if verb in (b'SELECT', b'EXAMINE') and len(args) > 2:
            reply = self.refuse_folder.get(
                (conn.user, args[2].decode('utf-8', 'replace')))
            if reply is not None:
                return reply
        if verb == b'UID FETCH' and b'BODY.PEEK[]' in pieces[0][0].upper() \
                and conn.user in self.drop_at_body_fetch:
            return 'drop'
        key = (conn.user, verb.decode('ascii', 'replace'))
        with self._lock:
            reply = self.refuse_pipelined.get(key) if conn.pending else None
            if reply is not None:
                del self.refuse_pipelined[key]
                self.refused_pipelined += 1
        if reply is not None:
            return reply
        with self._lock:
            refuse = self._busy > 0 and not conn.pending and \
                conn.user is not None
            if refuse:
                self._busy -= 1
                self.refused += 1
        if refuse:
            return BUSY_REPLY
        conn.pending.add(tag)
        return None

    @staticmethod
    def _login_user(verb, args):
        if verb == b'LOGIN' and len(args) >= 3:
            return args[2].decode('utf-8', 'replace')
        if verb == b'AUTHENTICATE' and len(args) >= 4:
            try:
                parts = base64.b64decode(args[3], validate=True).split(b'\0')
            except ValueError:
                return None
            if len(parts) == 3:
                return (parts[0] or parts[1]).decode('utf-8', 'replace')
        return None

    def _down(self, conn):
        fr = _Framer()
        tagged = re.compile(rb'^(\S+) (OK|NO|BAD)\b', re.I)
        while not self._stop.is_set():
            data = conn.server.recv(65536)
            if not data:
                return
            with conn.send_lock:
                out = bytearray()
                for ev in fr.feed(data):
                    out += ev[1]
                    if ev[0] != 'line' or ev[3]:
                        continue        # a literal follows: not a boundary
                    m = tagged.match(ev[1]) if ev[2] else None
                    if m:
                        conn.pending.discard(m.group(1))
                    out += b''.join(conn.inject)
                    conn.inject.clear()
                conn.client.sendall(out)
