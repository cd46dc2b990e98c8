"""A loopback IMAP man-in-the-middle (threads) that turns one user's server
into a hostile one, once.

    p = HostileImapProxy(server_port, user='eve', trigger='body-fetch',
                         kind='long_line')
    p.start()        # p.port / p.url(): listen on 127.0.0.1
    ...              # point the client at p.url() instead of the server
    p.stop()

Everything passes through unchanged except on connections that logged in
as `user` (the client's LOGIN, or AUTHENTICATE PLAIN with or without an
initial response: base64 of "authzid NUL authcid NUL password", the user is
the authzid when there is one, else the authcid). There, the server's reply
to the nth such command (counted over all of the user's connections) is
replaced by the hostile bytes of `kind`:

    trigger 'body-fetch': `UID FETCH ... BODY.PEEK[]` (the mover's body
        fetch); the first response that is an untagged FETCH carrying
        BODY[] or the command's tagged reply is replaced.
    trigger 'append': `APPEND ...`; its tagged reply is replaced (the
        server has stored the messages by then, the client never hears so).

From then on the connection stays open, the client's bytes still reach the
server, and everything else the server sends on it is dropped: the client
has to notice the bad response itself (no convenient EOF).

After the tamper: p.tampered (Event) is set, p.tampered_folder is the folder
selected (SELECT/EXAMINE) on that connection when the command was sent
(decoded from modified UTF-7, the server's own separator),
p.tampered_command its command line (e.g. 'UID FETCH 1:100 (UID
BODY.PEEK[])'). p.logins lists every user that logged in through the proxy.

Plaintext IMAP only (imap://, no STARTTLS): the proxy must read the
traffic.
"""

import base64
import random
import re
import socket
import struct
import threading

__all__ = ['HostileImapProxy', 'KINDS', 'payload']

# ------------------------------------------------------------ hostile bytes

UNKNOWN_TAG = b'ZZ9999'


def _garbage():
    """A TLS-record-looking header (a ServerHello's handshake record) then
    deterministic binary noise with NULs, CRs and LFs in it."""
    rnd = random.Random(4711)
    body = bytes(rnd.randrange(256) for _ in range(4096))
    return b'\x16\x03\x03\x10\x00\x02\x00\x00\x46\x03\x03' + body + b'\r\n'


KINDS = {
    # 100 KB of text and never a CRLF
    'long_line': lambda tag: b'* 1 FETCH (UID 1 BODY[] "' + b'A' * 100000,
    # a literal of ~100 GB announced, then noise
    'huge_literal': lambda tag: (b'* 1 FETCH (UID 1 BODY[] {99999999999}\r\n'
                                 + b'\xa5Z' * 32768),
    # binary garbage (a TLS record where IMAP text belongs)
    'garbage': lambda tag: _garbage(),
    # 200 nested lists (balanced: only the depth is wrong)
    'deep_nesting': lambda tag: (b'* 1 FETCH ' + b'(' * 200 + b')' * 200
                                 + b'\r\n'),
    # more ')' than '('
    'unbalanced': lambda tag: (b'* 1 FETCH (UID 1 FLAGS (\\Seen))))) '
                               b'BODY[] NIL)\r\n'),
    # a tagged reply to a command nobody sent
    'unknown_tag': lambda tag: UNKNOWN_TAG + b' OK Completed (0.001 secs).'
                                             b'\r\n',
}


def payload(kind, tag=b''):
    return KINDS[kind](tag)


# ------------------------------------------------------------- helpers

_LITERAL_END = re.compile(rb'\{(\d+)\+?\}\r?\n\Z')
_BODY_FETCH = re.compile(rb'^UID\s+FETCH\s.*\bBODY(?:\.PEEK)?\[\]', re.I)
_FETCH_BODY_RESP = re.compile(rb'^\*\s+\d+\s+FETCH\s.*\bBODY\[\]', re.I)
_LINE_CAP = 1024 * 1024          # longer client/server lines: stop looking
_CAPTURE_LITERAL = 1024          # literals kept for LOGIN/SELECT arguments


def _mutf7_decode(s):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c != '&':
            out.append(c)
            i += 1
            continue
        j = s.find('-', i)
        if j < 0:
            return s
        if j == i + 1:
            out.append('&')
        else:
            b64 = s[i + 1:j].replace(',', '/')
            b64 += '=' * (-len(b64) % 4)
            try:
                out.append(base64.b64decode(b64).decode('utf-16-be'))
            except ValueError:
                return s
        i = j + 1
    return ''.join(out)


def _astrings(pieces):
    """The arguments of a command as bytes (atoms, quoted strings, and the
    captured literals in order). pieces: [(line bytes, literal or None)]."""
    out = []
    for text, lit in pieces:
        text = text.rstrip(b'\r\n')
        m = _LITERAL_END.search(text + b'\r\n')
        if m:
            text = text[:m.start()]
        pos = 0
        while pos < len(text):
            c = text[pos:pos + 1]
            if c == b' ':
                pos += 1
            elif c == b'"':
                val, pos = bytearray(), pos + 1
                while pos < len(text) and text[pos:pos + 1] != b'"':
                    if text[pos:pos + 1] == b'\\':
                        pos += 1
                    val += text[pos:pos + 1]
                    pos += 1
                out.append(bytes(val))
                pos += 1
            else:
                end = text.find(b' ', pos)
                end = len(text) if end < 0 else end
                out.append(text[pos:end])
                pos = end
        if m:
            out.append(lit if lit is not None else b'')
    return out


def _abort(sock):
    """Close with RST (SO_LINGER 0); wakes a thread blocked in recv()."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack('ii', 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# --------------------------------------------------------------- framing

class _Framer:
    """Splits an IMAP byte stream (either direction) into lines and
    literals. feed(data) yields ('line', bytes) for each complete line
    (with its CRLF; `first` tells whether it starts a command/response or
    continues one after a literal) and ('literal', bytes) for literal
    data as it arrives. Over-long lines switch it to pass-through
    ('raw')."""

    def __init__(self):
        self.buf = bytearray()
        self.lit_left = 0
        self.first = True
        self.raw = False

    def feed(self, data):
        pos = 0
        n = len(data)
        while pos < n:
            if self.raw:
                yield 'raw', data[pos:]
                return
            if self.lit_left:
                take = min(self.lit_left, n - pos)
                yield 'literal', data[pos:pos + take]
                self.lit_left -= take
                pos += take
                continue
            nl = data.find(b'\n', pos)
            if nl < 0:
                self.buf += data[pos:]
                if len(self.buf) > _LINE_CAP:
                    self.raw = True
                    chunk, self.buf = bytes(self.buf), bytearray()
                    yield 'raw', chunk
                return
            self.buf += data[pos:nl + 1]
            pos = nl + 1
            line, self.buf = bytes(self.buf), bytearray()
            first = self.first
            m = _LITERAL_END.search(line)
            if m:
                self.lit_left = int(m.group(1))
                self.first = False
            else:
                self.first = True
            yield ('line', line, first, self.lit_left)


class _Conn:
    """State of one proxied connection."""

    def __init__(self, proxy, client, server):
        self.proxy = proxy
        self.client = client
        self.server = server
        self.user = None
        self.sasl_pending = False
        self.selected = None
        self.armed_tag = None        # tag whose reply gets replaced
        self.armed_cmd = None
        self.armed_folder = None
        self.dropping = False
        # the command being read from the client
        self.pieces = []
        self.capture_next = False


# ------------------------------------------------------------------ proxy

class HostileImapProxy:
    conn_class = _Conn      # a subclass's own state per connection

    def __init__(self, target_port, user, kind, trigger='body-fetch', nth=1,
                 target_host='127.0.0.1'):
        if kind not in KINDS:
            raise ValueError('unknown kind %r (%s)' % (kind, sorted(KINDS)))
        if trigger not in ('body-fetch', 'append'):
            raise ValueError('trigger must be body-fetch or append')
        self.target = (target_host, target_port)
        self.user = user
        self.kind = kind
        self.trigger = trigger
        self.nth = nth
        self.seen = 0                # trigger commands by user so far
        self.logins = []
        self.connections = 0
        self.tampered = threading.Event()
        self.tampered_folder = None
        self.tampered_command = None
        self.errors = []             # proxy-side exceptions (harness bugs)
        self._lock = threading.Lock()
        self._socks = set()
        self._threads = []
        self._stop = threading.Event()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(('127.0.0.1', 0))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]

    def url(self, scheme='imap'):
        if scheme != 'imap':
            raise ValueError('the hostile proxy speaks plaintext IMAP only')
        return 'imap://127.0.0.1:%d' % self.port

    def start(self):
        t = threading.Thread(target=self._accept_loop, daemon=True,
                             name='hostileproxy-accept')
        t.start()
        self._threads.append(t)
        return self

    def stop(self):
        self._stop.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for s in socks:
            _abort(s)
        for t in self._threads:
            t.join(timeout=5)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError('hostileproxy: threads still running: %s'
                               % alive)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ threads

    def _accept_loop(self):
        self._lsock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                c, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=10)
            except OSError:
                _abort(c)
                continue
            s.settimeout(None)
            c.settimeout(None)
            conn = self.conn_class(self, c, s)
            with self._lock:
                self.connections += 1
                self._socks.update((c, s))
            for fn, name in ((self._up, 'up'), (self._down, 'down')):
                t = threading.Thread(target=self._run, args=(fn, conn),
                                     daemon=True,
                                     name='hostileproxy-%s-%d'
                                     % (name, self.connections))
                t.start()
                self._threads.append(t)

    def _run(self, fn, conn):
        try:
            fn(conn)
        except OSError:
            pass
        except Exception as e:          # a harness bug: report, not hide
            self.errors.append('%s: %r' % (fn.__name__, e))
        # one direction ended: end both (as tcpproxy does)
        for x in (conn.client, conn.server):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _up(self, conn):
        """Client -> server: forwarded as is; commands are looked at
        before their last byte is passed on."""
        fr = _Framer()
        while not self._stop.is_set():
            data = conn.client.recv(65536)
            if not data:
                return
            for ev in fr.feed(data):
                if ev[0] == 'line':
                    self._client_line(conn, ev[1], ev[2], ev[3])
                elif ev[0] == 'literal' and conn.capture_next:
                    conn.pieces[-1] = (conn.pieces[-1][0],
                                       (conn.pieces[-1][1] or b'') + ev[1])
            conn.server.sendall(data)

    def _client_line(self, conn, line, first, lit_size):
        if first:
            conn.pieces = []
        conn.pieces.append((line, None))
        conn.capture_next = 0 < lit_size <= _CAPTURE_LITERAL
        if first and not conn.sasl_pending:
            self._command_start(conn, line)
        if lit_size == 0:               # the command is complete
            self._command_end(conn, conn.pieces)

    def _command_start(self, conn, line):
        parts = line.rstrip(b'\r\n').split(b' ', 1)
        if len(parts) < 2:
            return
        tag, rest = parts
        if conn.user != self.user or self.tampered.is_set():
            return
        if self.trigger == 'body-fetch':
            hit = _BODY_FETCH.match(rest)
        else:
            hit = re.match(rb'APPEND\s', rest, re.I)
        if not hit:
            return
        with self._lock:
            self.seen += 1
            arm = self.seen == self.nth
        if arm:
            conn.armed_tag = tag
            conn.armed_cmd = rest.decode('ascii', 'replace')[:200]
            conn.armed_folder = conn.selected

    def _command_end(self, conn, pieces):
        if conn.sasl_pending:
            conn.sasl_pending = False
            self._sasl_plain(conn, pieces[0][0].strip())
            return
        args = _astrings(pieces)
        if len(args) < 2:
            return
        cmd = args[1].upper()
        if cmd == b'LOGIN' and len(args) >= 3:
            self._logged_in(conn, args[2])
        elif cmd == b'AUTHENTICATE' and len(args) >= 3 and \
                args[2].upper() == b'PLAIN':
            if len(args) >= 4:
                self._sasl_plain(conn, args[3])
            else:
                conn.sasl_pending = True
        elif cmd in (b'SELECT', b'EXAMINE') and len(args) >= 3:
            conn.selected = _mutf7_decode(args[2].decode('utf-8', 'replace'))

    def _sasl_plain(self, conn, b64):
        try:
            parts = base64.b64decode(b64, validate=True).split(b'\0')
        except ValueError:
            return
        if len(parts) == 3:
            self._logged_in(conn, parts[0] or parts[1])

    def _logged_in(self, conn, user):
        conn.user = user.decode('utf-8', 'replace')
        with self._lock:
            self.logins.append(conn.user)

    def _down(self, conn):
        """Server -> client: forwarded response by response (literal bytes
        as they come) until the armed reply, which is replaced."""
        fr = _Framer()
        while not self._stop.is_set():
            data = conn.server.recv(65536)
            if not data:
                return
            if conn.dropping:
                continue
            out = bytearray()
            for ev in fr.feed(data):
                if conn.dropping:
                    break
                if ev[0] != 'line':
                    out += ev[1]
                    continue
                line, first = ev[1], ev[2]
                if first and conn.armed_tag is not None and \
                        self._is_armed_reply(conn, line):
                    out += payload(self.kind, conn.armed_tag)
                    conn.dropping = True
                    self.tampered_folder = conn.armed_folder
                    self.tampered_command = conn.armed_cmd
                    self.tampered.set()
                    break
                out += line
            if out:
                conn.client.sendall(out)

    def _is_armed_reply(self, conn, line):
        if line.startswith(conn.armed_tag + b' '):
            return True
        return self.trigger == 'body-fetch' and \
            _FETCH_BODY_RESP.match(line) is not None
