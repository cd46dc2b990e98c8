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

MailServer is one such server speaking just enough IMAP, POP3 or SMTP to
misbehave on purpose (see there).
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


# ------------------------------------------------------ a scripted mail server

class _Lines:
    """Lines (CRLF kept) from a socket, read with recv() so that what is
    buffered is ours to drop (at STARTTLS: bytes the peer sent after the
    command do not belong to the TLS session)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b''

    def line(self):
        while b'\n' not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b'\n')
        return line + b'\n'

    def restart(self, sock):
        self.sock = sock
        self.buf = b''


def sasl_plain_user(b64):
    """The login name (authcid) of a SASL PLAIN response, or None."""
    import base64
    import binascii
    try:
        parts = base64.b64decode(b64.strip(), validate=True).split(b'\0')
    except (binascii.Error, ValueError):
        return None
    return parts[1] if len(parts) == 3 else None


class MailServer(LoopbackServer):
    """A scripted IMAP, POP3 or SMTP (submission) server on loopback, for
    what a real server will not do: answer STARTTLS with more than the
    go-ahead, put control bytes in its replies, hang up at a login.

        srv = MailServer('imap', tls=server_ctx, inject=b'ms2 OK x\\r\\n')
        srv.url('imap+starttls')       # 'imap+starttls://127.0.0.1:PORT'
        srv.logins                     # [(tls, user bytes)] tried so far

    proto: 'imap', 'pop3' or 'smtp'. tls: a server-side ssl.SSLContext;
    STARTTLS (STLS) is then offered and done. inject: bytes sent right
    after the STARTTLS go-ahead, in the same write (CVE-2011-0411: a
    man-in-the-middle's plaintext "answers"). caps: (before TLS, after TLS)
    capability words of our own (IMAP atoms, POP3 CAPA lines, EHLO
    keywords). extra: bytes put into the greeting, the XCLIENT refusal and
    the login refusal texts. login: 'refuse' (NO, -ERR, 535) or 'close'
    (hang up on the login command); for SMTP also 'accept' (235, then
    every command gets 250: a relayed submission session). xclient: POP3: offer [XCLIENT] in the
    greeting and refuse it.

    Every command line is kept in srv.lines as (tls, line); every login
    attempt (LOGIN, AUTHENTICATE/AUTH PLAIN, USER+PASS) in srv.logins as
    (tls, user); srv.starttls counts STARTTLS go-aheads sent.
    """

    def __init__(self, proto, tls=None, inject=b'', caps=(b'', b''),
                 extra=b'', login='refuse', xclient=False):
        assert proto in ('imap', 'pop3', 'smtp'), proto
        assert login in ('refuse', 'close', 'accept'), login
        self.proto = proto
        self.tls = tls
        self.inject = inject
        self.caps = caps
        self.extra = extra
        self.login = login
        self.xclient = xclient
        self.lines = []
        self.logins = []
        self.starttls = 0
        super().__init__()

    def url(self, scheme=None):
        return '%s://127.0.0.1:%d' % (scheme or self.proto, self.port)

    def handle(self, c, n):
        c.settimeout(30)
        io = _Lines(c)
        st = {'sock': c, 'tls': False}
        try:
            getattr(self, '_' + self.proto)(io, st)
        finally:
            st['sock'].close()      # the TLS socket, once there is one

    # -- shared steps

    def _send(self, st, data):
        st['sock'].sendall(data)

    def _read(self, io, st):
        line = io.line()
        if line is not None:
            self.lines.append((st['tls'], line))
        return line

    def _go_tls(self, io, st, go_ahead):
        """The go-ahead (and the injected bytes) in one write, then the
        server side of the handshake."""
        self.starttls += 1
        self._send(st, go_ahead + self.inject)
        st['sock'] = self.tls.wrap_socket(st['sock'], server_side=True)
        self._open.append(st['sock'])       # close() closes it too
        st['tls'] = True
        io.restart(st['sock'])

    def _commands(self, io, st):
        """(verb in upper case, argument) of each line until EOF."""
        while True:
            line = self._read(io, st)
            if line is None:
                return
            cmd, _, arg = line.rstrip(b'\r\n').partition(b' ')
            yield cmd.upper(), arg

    def _plain(self, io, st, ir, prompt):
        """The user of a SASL PLAIN exchange (after `prompt` when there
        was no initial response)."""
        if not ir:
            self._send(st, prompt)
            ir = self._read(io, st) or b''
        return sasl_plain_user(ir)

    def _login(self, st, user, refusal):
        """A login attempt of user: refused (with extra in the text), or
        True when the connection is to end here."""
        self.logins.append((st['tls'], user))
        if self.login == 'close':
            return True
        self._send(st, refusal + self.extra + b'\r\n')
        return False

    def _caps(self, st):
        return self.caps[1 if st['tls'] else 0]

    # -- IMAP

    def _imap(self, io, st):
        self._send(st, b'* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN' +
                   (b' STARTTLS' if self.tls else b'') +
                   b' ' + self._caps(st) + b'] fake ready' + self.extra +
                   b'\r\n')
        while True:
            line = self._read(io, st)
            if line is None:
                return
            words = line.rstrip(b'\r\n').split(b' ')
            tag, cmd = words[0], (words[1] if len(words) > 1 else b'').upper()
            if cmd == b'CAPABILITY':
                self._send(st, b'* CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN' +
                           (b' STARTTLS' if self.tls and not st['tls']
                            else b'') + b' ' + self._caps(st) + b'\r\n' +
                           tag + b' OK done\r\n')
            elif cmd == b'STARTTLS' and self.tls and not st['tls']:
                self._go_tls(io, st, tag + b' OK Begin TLS\r\n')
            elif cmd == b'ID':
                self._send(st, b'* ID NIL\r\n' + tag + b' OK done\r\n')
            elif cmd in (b'AUTHENTICATE', b'LOGIN'):
                if cmd == b'LOGIN':
                    user = words[2].strip(b'"') if len(words) > 2 else b''
                else:
                    user = self._plain(io, st, words[3] if len(words) > 3
                                       else b'', b'+ \r\n')
                if self._login(st, user, tag + b' NO [AUTHENTICATIONFAILED] '
                               b'Authentication failed.'):
                    return
            elif cmd == b'LOGOUT':
                self._send(st, b'* BYE bye\r\n' + tag + b' OK done\r\n')
                return
            else:
                self._send(st, tag + b' BAD what?\r\n')

    # -- POP3

    def _pop3(self, io, st):
        self._send(st, b'+OK ' + (b'[XCLIENT] ' if self.xclient else b'') +
                   b'fake ready' + self.extra + b'\r\n')
        user = None
        for cmd, arg in self._commands(io, st):
            if cmd == b'CAPA':
                self._send(st, b'+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN\r\n' +
                           (b'STLS\r\n' if self.tls and not st['tls']
                            else b'') +
                           b''.join(c + b'\r\n' for c in
                                    self._caps(st).split()) + b'.\r\n')
            elif cmd == b'STLS' and self.tls and not st['tls']:
                self._go_tls(io, st, b'+OK Begin TLS\r\n')
            elif cmd == b'XCLIENT':
                self._send(st, b'-ERR no' + self.extra + b'\r\n')
            elif cmd == b'USER':
                user = arg
                self._send(st, b'+OK\r\n')
            elif cmd in (b'PASS', b'AUTH'):
                if cmd == b'AUTH':
                    user = self._plain(io, st, arg.partition(b' ')[2],
                                       b'+ \r\n')
                if self._login(st, user,
                               b'-ERR [AUTH] Authentication failed.'):
                    return
            elif cmd == b'QUIT':
                self._send(st, b'+OK bye\r\n')
                return
            else:
                self._send(st, b'-ERR what?\r\n')

    # -- SMTP (submission)

    def _smtp(self, io, st):
        self._send(st, b'220 fake ESMTP' + self.extra + b'\r\n')
        for cmd, arg in self._commands(io, st):
            if cmd in (b'EHLO', b'HELO'):
                self._send(st, b'250-fake\r\n' +
                           b''.join(b'250-' + c + b'\r\n' for c in
                                    self._caps(st).split()) +
                           (b'250-STARTTLS\r\n' if self.tls and not st['tls']
                            else b'') +
                           b'250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n')
            elif cmd == b'STARTTLS' and self.tls and not st['tls']:
                self._go_tls(io, st, b'220 2.0.0 Ready to start TLS\r\n')
            elif cmd == b'AUTH':
                user = self._plain(io, st, arg.partition(b' ')[2],
                                   b'334 \r\n')
                if self.login == 'accept':
                    self.logins.append((st['tls'], user))
                    self._send(st, b'235 2.7.0 Authentication successful'
                               b'\r\n')
                elif self._login(st, user,
                                 b'535 5.7.8 Authentication failed'):
                    return
            elif cmd == b'QUIT':
                self._send(st, b'221 2.0.0 Bye\r\n')
                return
            else:
                self._send(st, b'250 2.0.0 Ok\r\n')


def tls_server_context(cert_file, key_file):
    """A server-side SSLContext for MailServer(tls=...)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
