#!/usr/bin/python3
"""Mover benchmark: mailshift against mbsync, doveadm backup over imapc, and
two protocol floors, on one deterministic corpus, side by side.

    make bench                                  # the full run (20,000 messages)
    /usr/bin/python3 bench/mover_bench.py --messages 2000 --only mbsync,doveadm

Two Dovecot 2.3 instances (tests/lib/dovecot.py, high-performance mode, maildir
on tmpfs, separator '.' on both) serve as source and destination. The source
is loaded once with MULTIAPPEND and snapshotted; before every run the source
maildir is restored from that snapshot (so no run profits from index/cache
fields another tool made the source build) and the destination is a brand-new
empty instance. Every run is then verified against the source: messages and
bytes per folder, SHA-256 of every body, flags and INTERNALDATEs.

Not a test: it is not part of `make check`, and it exits 0 even when a target
is missed (it exits 1 only when the benchmark itself could not run).
See bench/README.md.
"""

import argparse
import base64
import bisect
import calendar
import collections
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))

USER = 'bench'
PASSWORD = 'bench-pw-1'
# (as in the test harness, MAILSHIFTCTL names another build to measure)
MAILSHIFTCTL = os.environ.get('MAILSHIFTCTL') or os.path.join(REPO, 'tools',
                                                              'mailshiftctl')
MBSYNC = shutil.which('mbsync') or '/usr/bin/mbsync'
DOVEADM = shutil.which('doveadm') or '/usr/bin/doveadm'
GNU_TIME = '/usr/bin/time'      # Debian package "time"
TOOLS = ('fetch-floor', 'append-floor', 'multiappend-floor',
         'mailshift', 'doveadm', 'mbsync')
FLOORS = ('fetch-floor', 'append-floor', 'multiappend-floor')
# Run only when --only names them: mailshift keeping UIDVALIDITY and UIDs
# through the destination's doveadm HTTP API (docs/mover.md, "Identity").
EXTRA_TOOLS = ('mailshift-identity',)
# Its own corpus and source, after the others: many users at once against
# one with the same messages (see "the site row" below).
SITE = 'site'

# Targets from the issue.
TARGET_VS_DOVEADM = 1.2
TARGET_VS_MBSYNC = 4.0
TARGET_RSS_MB = 50.0

RECV = 1 << 20
MB = 1e6


class BenchError(RuntimeError):
    pass


# ============================================================== the corpus

# (name, share of the messages, INTERNALDATE years)
FOLDERS = [
    ('INBOX', 0.30, (2025, 2026)),
    ('Sent Items', 0.12, (2019, 2026)),
    ('Drafts', 0.01, (2025, 2026)),
    ('Trash', 0.04, (2025, 2026)),
    ('Archive', 0.08, (2015, 2021)),
    ('Archive.2022', 0.15, (2022, 2022)),
    ('Archive.2023', 0.15, (2023, 2023)),
    ('Projects', 0.03, (2020, 2026)),
    ('Projects.Alpha', 0.08, (2021, 2026)),
    ('Projects.Alpha.Specs', 0.04, (2021, 2026)),
]
KEYWORDS = ['$Forwarded', '$MDNSent', '$Junk', '$NotJunk', '$label1',
            '$label2', 'Work', 'Personal', 'Later']
MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep',
          'Oct', 'Nov', 'Dec']
WDAYS = ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun']
TZS = [0, 0, 60, 60, 120, -300, -240, -420, 330, 540, 600, -180]
FIRST = ['Anna', 'Ben', 'Chloé', 'Dmitri', 'Eva', 'Farid', 'Greta', 'Hiro',
         'Ines', 'Jonas', 'Kemal', 'Lena', 'Marco', 'Nadia', 'Oskar',
         'Priya', 'Quentin', 'Rosa', 'Sven', 'Tara', 'Uwe', 'Vera']
LAST = ['Becker', 'Costa', 'Dubois', 'Eriksen', 'Fischer', 'García',
        'Hansen', 'Ivanova', 'Jensen', 'Kowalski', 'Lindqvist', 'Moreau',
        'Nakamura', 'Okafor', 'Petrov', 'Rossi', 'Schmidt', 'Tanaka']
DOMAINS = ['example.org', 'example.net', 'corp.example.com',
           'mail.example.de', 'lists.example.org', 'partner.example']
UTF8_SUBJECTS = ['Grüße aus München', 'Réunion à Paris', 'Смета проекта',
                 '会議の議事録', 'Año nuevo — planificación']


def _words(rng, n=3000):
    syl = ['ka', 'lo', 'mi', 'ne', 'ru', 'sa', 'te', 'vo', 'an', 'er', 'in',
           'or', 'ul', 'ex', 'tra', 'pro', 'con', 'dis', 'ment', 'tion',
           'ly', 'ing', 'ed', 'st', 'ar', 'ol', 'um', 'is']
    common = ('the of and to in is that for it as with was on be by this '
              'are from at or have an not but which all will can we our '
              'please thanks meeting report attached see below regards '
              'project update review draft final budget schedule').split()
    out = list(common)
    while len(out) < n:
        out.append(''.join(rng.choice(syl)
                           for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return out


class Pool:
    """A block of CRLF lines; messages take slices of whole lines from it,
    which keeps generating 20,000 messages (~370 MB) to a few seconds."""

    def __init__(self, data):
        self.data = data
        self.starts = [0]
        i = data.find(b'\r\n')
        while i >= 0:
            self.starts.append(i + 2)
            i = data.find(b'\r\n', i + 2)
        self.starts.pop()       # the end of the data is not a line start

    def take(self, rng, size):
        """Whole lines, about size bytes (at least one line)."""
        size = min(size, len(self.data) - 1)
        hi = bisect.bisect_right(self.starts, len(self.data) - size - 1)
        i = rng.randrange(max(1, hi))
        a = self.starts[i]
        j = bisect.bisect_left(self.starts, a + size)
        b = self.starts[j] if j < len(self.starts) else len(self.data)
        if b <= a:
            b = self.data.find(b'\r\n', a) + 2
        return self.data[a:b]


def _text_pool(rng, words, nbytes):
    lines, total = [], 0
    while total < nbytes:
        if rng.random() < 0.12:
            line = ''
        else:
            ws, n = [], 0
            target = rng.randint(30, 76)
            while n < target:
                w = rng.choice(words)
                ws.append(w)
                n += len(w) + 1
            line = ' '.join(ws)
            line = line[0].upper() + line[1:]
            if rng.random() < 0.5:
                line += '.'
        lines.append(line)
        total += len(line) + 2
    return Pool(('\r\n'.join(lines) + '\r\n').encode())


def _b64_pool(rng, nbytes):
    raw = rng.randbytes(nbytes)
    enc = base64.encodebytes(raw).replace(b'\n', b'\r\n')
    return Pool(enc)


def _internaldate(epoch, tzmin):
    t = time.gmtime(epoch + tzmin * 60)
    sign = '+' if tzmin >= 0 else '-'
    return '%02d-%s-%04d %02d:%02d:%02d %s%02d%02d' % (
        t.tm_mday, MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min,
        t.tm_sec, sign, abs(tzmin) // 60, abs(tzmin) % 60)


def _rfc822date(epoch, tzmin):
    t = time.gmtime(epoch + tzmin * 60)
    sign = '+' if tzmin >= 0 else '-'
    return '%s, %02d %s %04d %02d:%02d:%02d %s%02d%02d' % (
        WDAYS[t.tm_wday], t.tm_mday, MONTHS[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec, sign, abs(tzmin) // 60,
        abs(tzmin) % 60)


def parse_internaldate(s):
    """'dd-Mon-yyyy hh:mm:ss +zzzz' (day maybe space-padded) -> epoch."""
    d, rest = s.strip().split('-', 1)
    mon, rest = rest.split('-', 1)
    year, hms, zone = rest.split(' ')
    h, m, sec = (int(x) for x in hms.split(':'))
    epoch = calendar.timegm((int(year), MONTHS.index(mon) + 1, int(d),
                             h, m, sec, 0, 0, 0))
    off = int(zone[1:3]) * 3600 + int(zone[3:5]) * 60
    return epoch - off if zone[0] == '+' else epoch + off


def _addr(rng, name=None):
    f, l = rng.choice(FIRST), rng.choice(LAST)
    d = rng.choice(DOMAINS)
    local = (f + '.' + l).lower().encode('ascii', 'ignore').decode()
    disp = '%s %s' % (f, l)
    if not disp.isascii():
        disp = '=?UTF-8?B?%s?=' % base64.b64encode(disp.encode()).decode()
    return '%s <%s@%s>' % (disp, local, d)


def _flags_for(rng, folder):
    fl = []
    if folder == 'Drafts':
        fl = ['\\Draft'] + (['\\Seen'] if rng.random() < 0.5 else [])
    elif folder == 'Sent Items':
        fl = ['\\Seen']
    elif folder in ('INBOX', 'Trash'):
        if rng.random() < 0.7:
            fl.append('\\Seen')
    else:
        if rng.random() < 0.97:
            fl.append('\\Seen')
    if folder != 'Drafts':
        if rng.random() < 0.12:
            fl.append('\\Answered')
        if rng.random() < 0.05:
            fl.append('\\Flagged')
    if rng.random() < 0.10:
        fl += rng.sample(KEYWORDS, rng.choice((1, 1, 2)))
    return fl


def _message(rng, seq, folder, epoch, tzmin, size, big, text, b64):
    """One message, CRLF line ends, about size bytes."""
    frm, to = _addr(rng), _addr(rng)
    if folder == 'Sent Items':
        frm = 'Bench User <bench@example.org>'
    else:
        to = 'Bench User <bench@example.org>'
    if rng.random() < 0.05:
        s = rng.choice(UTF8_SUBJECTS)
        subj = '=?UTF-8?B?%s?=' % base64.b64encode(s.encode()).decode()
    else:
        subj = text.take(rng, 20).split(b'\r\n')[0].decode()[:70] or 'Hello'
    if rng.random() < 0.3:
        subj = 'Re: ' + subj
    host = 'mail-%d.%s' % (rng.randrange(1, 40), rng.choice(DOMAINS))
    ip = '.'.join(str(rng.randrange(1, 255)) for _ in range(4))
    qid = '4%s' % ''.join(rng.choice('BCDFGHJKLMNPQRSTVWXYZ0123456789')
                          for _ in range(11))
    recv_date = _rfc822date(epoch, tzmin)
    sent_date = _rfc822date(epoch - rng.randrange(1, 600),
                            rng.choice(TZS))
    h = ['Return-Path: <%s>' % frm.split('<')[-1].rstrip('>'),
         'Received: from %s (%s [%s])\r\n\tby mx.example.org (Postfix) with '
         'ESMTPS id %s\r\n\tfor <bench@example.org>; %s'
         % (host, host, ip, qid, recv_date)]
    if rng.random() < 0.6:
        h.append('Received: by %s (Postfix, from userid %d)\r\n\tid %s; %s'
                 % (host, rng.randrange(100, 2000), qid[::-1], sent_date))
    h += ['From: ' + frm, 'To: ' + to]
    if rng.random() < 0.2:
        h.append('Cc: %s, %s' % (_addr(rng), _addr(rng)))
    h += ['Subject: ' + subj, 'Date: ' + sent_date]
    if rng.random() < 0.97:
        h.append('Message-ID: <%d.%s.%x@%s>'
                 % (epoch, qid, rng.getrandbits(32), host))
    if subj.startswith('Re:') and rng.random() < 0.8:
        ref = '<%x.%x@%s>' % (rng.getrandbits(40), epoch - 86400,
                              rng.choice(DOMAINS))
        h += ['In-Reply-To: ' + ref, 'References: ' + ref]
    if rng.random() < 0.4:
        h.append('X-Mailer: %s' % rng.choice(
            ['Thunderbird 115.6.0', 'Apple Mail (2.3774)',
             'Microsoft Outlook 16.0', 'Roundcube Webmail/1.6.5']))
    h.append('MIME-Version: 1.0')
    boundary = '=_bench_%d_%x' % (seq, rng.getrandbits(48))
    head_len = sum(len(x) + 2 for x in h) + 120
    if big:
        h.append('Content-Type: multipart/mixed; boundary="%s"' % boundary)
        txt = text.take(rng, rng.randint(300, 3000))
        name = 'document-%d.pdf' % seq
        att = b64.take(rng, max(78, size - head_len - len(txt) - 400))
        body = b''.join([
            b'This is a multi-part message in MIME format.\r\n\r\n',
            b'--', boundary.encode(), b'\r\n',
            b'Content-Type: text/plain; charset=utf-8\r\n'
            b'Content-Transfer-Encoding: 8bit\r\n\r\n', txt, b'\r\n',
            b'--', boundary.encode(), b'\r\n',
            b'Content-Type: application/pdf; name="', name.encode(),
            b'"\r\nContent-Disposition: attachment; filename="',
            name.encode(), b'"\r\nContent-Transfer-Encoding: base64\r\n\r\n',
            att, b'\r\n--', boundary.encode(), b'--\r\n'])
    elif rng.random() < 0.3:
        h.append('Content-Type: multipart/alternative; boundary="%s"'
                 % boundary)
        part = max(100, (size - head_len - 400) // 2)
        txt = text.take(rng, part)
        html = b'<html><body><p>' + text.take(rng, part).replace(
            b'\r\n\r\n', b'</p>\r\n<p>') + b'</p></body></html>\r\n'
        body = b''.join([
            b'--', boundary.encode(), b'\r\n',
            b'Content-Type: text/plain; charset=utf-8\r\n'
            b'Content-Transfer-Encoding: 8bit\r\n\r\n', txt, b'\r\n',
            b'--', boundary.encode(), b'\r\n',
            b'Content-Type: text/html; charset=utf-8\r\n'
            b'Content-Transfer-Encoding: 8bit\r\n\r\n', html, b'\r\n',
            b'--', boundary.encode(), b'--\r\n'])
    else:
        h += ['Content-Type: text/plain; charset=utf-8; format=flowed',
              'Content-Transfer-Encoding: 8bit']
        body = text.take(rng, max(40, size - head_len))
    return ('\r\n'.join(h) + '\r\n\r\n').encode() + body


def build_corpus(n, seed, workdir):
    """Writes WORKDIR/corpus.bin (all messages back to back) and returns the
    index: a list of dicts folder/flags/idate (IMAP INTERNALDATE string)/
    epoch/off/len/sha256."""
    rng = random.Random(seed)
    words = _words(rng)
    text = _text_pool(rng, words, 2 << 20)
    b64 = _b64_pool(rng, 8 << 20)
    n_huge = max(1, round(5 * n / 20000))
    idx_big = set(rng.sample(range(n), max(1, n // 10)))
    idx_huge = set(rng.sample(sorted(set(range(n)) - idx_big), n_huge))
    names = [f[0] for f in FOLDERS]
    weights = [f[1] for f in FOLDERS]
    years = {f[0]: f[2] for f in FOLDERS}
    assign = rng.choices(names, weights=weights, k=n)
    for i, name in enumerate(names):      # every folder gets something
        if i < n:
            assign[i] = name
    index = []
    off = 0
    with open(os.path.join(workdir, 'corpus.bin'), 'wb') as out:
        for seq in range(n):
            folder = assign[seq]
            y0, y1 = years[folder]
            lo = calendar.timegm((y0, 1, 1, 0, 0, 0, 0, 0, 0))
            hi = calendar.timegm((y1, 12, 31, 23, 59, 59, 0, 0, 0))
            hi = min(hi, calendar.timegm((2026, 10, 31, 0, 0, 0, 0, 0, 0)))
            epoch = rng.randrange(lo, hi)
            tzmin = rng.choice(TZS)
            if seq in idx_huge:
                size, big = 5 * 1024 * 1024, True
            elif seq in idx_big:
                size, big = rng.randint(50_000, 200_000), True
            else:
                size = int(min(60_000, max(700, rng.lognormvariate(
                    8.29, 0.65))))        # median e^8.29 = ~4 KB
                big = False
            msg = _message(rng, seq, folder, epoch, tzmin, size, big,
                           text, b64)
            flags = _flags_for(rng, folder)
            out.write(msg)
            index.append({'folder': folder, 'flags': flags,
                          'idate': _internaldate(epoch, tzmin),
                          'epoch': epoch, 'off': off, 'len': len(msg),
                          'sha256': hashlib.sha256(msg).hexdigest()})
            off += len(msg)
    with open(os.path.join(workdir, 'corpus.json'), 'w') as f:
        json.dump(index, f)
    return index


def load_corpus(workdir):
    with open(os.path.join(workdir, 'corpus.json')) as f:
        index = json.load(f)
    with open(os.path.join(workdir, 'corpus.bin'), 'rb') as f:
        data = f.read()
    return index, data


# ============================================ a minimal, fast IMAP client

LIT_RE = re.compile(rb'\{(\d+)\+?\}$')
UID_RE = re.compile(rb'\bUID (\d+)')
FLAGS_RE = re.compile(rb'\bFLAGS \(([^)]*)\)')
IDATE_RE = re.compile(rb'\bINTERNALDATE "([^"]+)"')
LIST_RE = re.compile(rb'^\* LIST \(([^)]*)\) (NIL|"(?:[^"\\]|\\.)*") (.*)$')


def imap_quote(s):
    return b'"' + s.encode().replace(b'\\', b'\\\\').replace(b'"', b'\\"') \
        + b'"'


def imap_unquote(b):
    if b.startswith(b'"'):
        return re.sub(rb'\\(.)', rb'\1', b[1:-1]).decode()
    return b.decode()


class Imap:
    """One plaintext IMAP connection. Reads in big chunks into a bytearray
    and skips or hashes literals without splitting them into lines."""

    def __init__(self, port, host='127.0.0.1', timeout=600):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self.n = 0
        self.scratch = memoryview(bytearray(RECV))
        greeting = self.readline()
        if not greeting.startswith(b'* OK'):
            raise BenchError('bad greeting %r' % greeting[:200])

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self):
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        chunk = self.sock.recv(RECV)
        if not chunk:
            raise BenchError('IMAP: connection closed by server')
        self.buf += chunk

    def readline(self):
        """The next line without CRLF (bytes)."""
        while True:
            i = self.buf.find(b'\r\n', self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return line
            self._fill()

    def literal(self, n, sink=None):
        """Consumes an n-byte literal; sink(memoryview) gets its pieces."""
        avail = len(self.buf) - self.pos
        if avail >= n:
            if sink is not None:
                with memoryview(self.buf) as mv:
                    sink(mv[self.pos:self.pos + n])
            self.pos += n
            return
        if sink is not None and avail:
            with memoryview(self.buf) as mv:
                sink(mv[self.pos:])
        del self.buf[:]
        self.pos = 0
        left = n - avail
        while left:
            k = self.sock.recv_into(self.scratch, min(left, RECV))
            if not k:
                raise BenchError('IMAP: connection closed inside a literal')
            if sink is not None:
                sink(self.scratch[:k])
            left -= k

    def tag(self):
        self.n += 1
        return b'A%d' % self.n

    def send(self, data):
        self.sock.sendall(data)

    def command(self, cmd, untagged=None):
        """Sends cmd (bytes, no tag) and waits for its tagged reply.
        Returns the untagged lines (a literal is inlined after a NUL)."""
        t = self.tag()
        self.send(t + b' ' + cmd + b'\r\n')
        return self.wait(t, cmd)

    def wait(self, t, what=b''):
        lines = []
        pre = t + b' '
        while True:
            line = self.readline()
            if line.startswith(pre):
                if line[len(pre):len(pre) + 2] != b'OK':
                    raise BenchError('IMAP %s: %s' % (
                        what[:60].decode(errors='replace'),
                        line.decode(errors='replace')))
                return lines
            m = LIT_RE.search(line)
            while m:
                chunks = []
                self.literal(int(m.group(1)), lambda mv: chunks.append(
                    bytes(mv)))
                line = line + b'\x00' + b''.join(chunks)
                nxt = self.readline()
                line += nxt
                m = LIT_RE.search(nxt)
            lines.append(line)

    def login(self, user, password):
        self.command(b'LOGIN ' + imap_quote(user) + b' ' +
                     imap_quote(password))

    def capabilities(self):
        for line in self.command(b'CAPABILITY'):
            if line.startswith(b'* CAPABILITY '):
                return set(line[13:].upper().split())
        return set()

    def list_folders(self):
        """[(name, attributes)] of selectable folders."""
        out = []
        for line in self.command(b'LIST "" "*"'):
            if b'\x00' in line:     # name sent as a literal
                head, name = line.split(b'\x00', 1)
                m = LIST_RE.match(head + b' x')
                if not m:
                    continue
                attrs, name = m.group(1), name.decode()
            else:
                m = LIST_RE.match(line)
                if not m:
                    continue
                attrs, name = m.group(1), imap_unquote(m.group(3))
            a = attrs.lower()
            if b'\\noselect' in a or b'\\nonexistent' in a:
                continue
            out.append(name)
        return out

    def fetch_all(self, on_msg, items=b'BODY.PEEK[] FLAGS INTERNALDATE'):
        """UID FETCH 1:* in the selected folder; returns (messages, body
        bytes). With on_msg, on_msg(text_before_literal, size) is called
        before each literal and returns a sink for its pieces (memoryviews
        valid only during the call) or None to skip them; once the FETCH
        response is complete, on_msg(text_after_literal, None) is called.
        Without on_msg, literals are skipped without copying."""
        t = self.tag()
        self.send(t + b' UID FETCH 1:* (' + items + b')\r\n')
        pre = t + b' '
        count = 0
        nbytes = 0
        while True:
            line = self.readline()
            if line.startswith(pre):
                if line[len(pre):len(pre) + 2] != b'OK':
                    raise BenchError('UID FETCH: %s'
                                     % line.decode(errors='replace'))
                return count, nbytes
            if not line.endswith(b'}'):
                continue
            m = LIT_RE.search(line)
            if not m:
                continue
            meta = line
            while m:
                n = int(m.group(1))
                sink = on_msg(meta, n) if on_msg else None
                self.literal(n, sink)
                nbytes += n
                rest = self.readline()
                meta = rest
                m = LIT_RE.search(rest) if rest.endswith(b'}') else None
            if on_msg:
                on_msg(meta, None)
            count += 1


def fetch_snapshot(port, user, password, strip_tuid=False):
    """{folder: [(sha256, size, flags, epoch, sha256_without_X-TUID)]}."""
    c = Imap(port)
    try:
        c.login(user, password)
        out = {}
        for folder in c.list_folders():
            c.command(b'EXAMINE ' + imap_quote(folder))
            recs = []
            state = {}

            def on_msg(meta, n):
                if n is not None:
                    state['meta'] = meta
                    parts = state['parts'] = []
                    return lambda mv: parts.append(bytes(mv))
                # end of one message: meta is the text after the literal
                full = state['meta'] + b' ' + meta
                body = b''.join(state['parts'])
                fm = FLAGS_RE.search(full)
                flags = frozenset(f for f in (fm.group(1).decode().split()
                                              if fm else [])
                                  if f != '\\Recent')
                im = IDATE_RE.search(full)
                epoch = parse_internaldate(im.group(1).decode()) if im \
                    else None
                sha = hashlib.sha256(body).hexdigest()
                alt = sha
                if strip_tuid:
                    hend = body.find(b'\r\n\r\n')
                    head = body[:hend + 2]
                    i = head.find(b'X-TUID: ')
                    if i == 0 or (i > 0 and head[i - 2:i] == b'\r\n'):
                        j = body.find(b'\r\n', i) + 2
                        alt = hashlib.sha256(body[:i] + body[j:]).hexdigest()
                recs.append((sha, len(body), flags, epoch, alt))
                return None
            c.fetch_all(on_msg)
            out[folder] = recs
        c.command(b'LOGOUT')
        return out
    finally:
        c.close()


def append_cmd_parts(folder_q, msgs, data):
    """APPEND (MULTIAPPEND when len(msgs) > 1) with LITERAL+ literals."""
    parts = [b' APPEND ', folder_q]
    mv = memoryview(data)
    for m in msgs:
        parts.append(b' (' + ' '.join(m['flags']).encode() + b') "' +
                     m['idate'].encode() + b'" {%d+}\r\n' % m['len'])
        parts.append(mv[m['off']:m['off'] + m['len']])
    parts.append(b'\r\n')
    return parts


def append_folder(c, folder, msgs, data, per_cmd, window):
    """APPENDs msgs into the SELECTed folder, per_cmd messages per command,
    at most window commands in flight."""
    fq = imap_quote(folder)
    inflight = collections.deque()
    for i in range(0, len(msgs), per_cmd):
        t = c.tag()
        parts = append_cmd_parts(fq, msgs[i:i + per_cmd], data)
        parts[0] = t + parts[0]
        c.send(b''.join(parts))
        inflight.append(t)
        if len(inflight) >= window:
            c.wait(inflight.popleft(), b'APPEND')
    while inflight:
        c.wait(inflight.popleft(), b'APPEND')


def load_folders(port, user, password, index, data, folders, per_cmd,
                 window, create=True):
    c = Imap(port)
    try:
        c.login(user, password)
        caps = c.capabilities()
        if b'LITERAL+' not in caps:
            raise BenchError('server lacks LITERAL+')
        if per_cmd > 1 and b'MULTIAPPEND' not in caps:
            raise BenchError('server lacks MULTIAPPEND')
        by = collections.defaultdict(list)
        for m in index:
            by[m['folder']].append(m)
        for folder in folders:
            if create and folder.upper() != 'INBOX':
                c.command(b'CREATE ' + imap_quote(folder))
            c.command(b'SELECT ' + imap_quote(folder))
            append_folder(c, folder, by[folder], data, per_cmd, window)
        c.command(b'LOGOUT')
    finally:
        c.close()


def split_folders(index, k):
    """Folders spread over k workers, greedily by bytes."""
    size = collections.Counter()
    for m in index:
        size[m['folder']] += m['len']
    bins = [[0, []] for _ in range(k)]
    for f, s in sorted(size.items(), key=lambda x: -x[1]):
        b = min(bins, key=lambda x: x[0])
        b[0] += s
        b[1].append(f)
    return [b[1] for b in bins if b[1]]


# ================================================== floors (child process)

def floor_main(a):
    """Runs one floor in this (child) process and writes its own timings,
    measured after the corpus is in memory, to a.out as JSON."""
    password = os.environ['BENCH_FLOOR_PASSWORD']
    index, data = (load_corpus(a.workdir) if a.floor != 'fetch'
                   else ([], b''))
    folders = sorted({m['folder'] for m in index})
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    groups = [None]
    if a.floor == 'fetch':
        c = Imap(a.port)
        c.login(a.user, password)
        folders = c.list_folders()
        c.command(b'LOGOUT')
        c.close()
        groups = [folders[i::a.connections] for i in range(a.connections)]
    else:
        groups = split_folders(index, a.connections)
    pids = []
    rfd, wfd = os.pipe()
    for g in groups:
        if not g:
            continue
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            rc = 0
            try:
                res = {'msgs': 0, 'bytes': 0}
                if a.floor == 'fetch':
                    c = Imap(a.port)
                    c.login(a.user, password)
                    for folder in g:
                        c.command(b'EXAMINE ' + imap_quote(folder))
                        n, b = c.fetch_all(None)
                        res['msgs'] += n
                        res['bytes'] += b
                    c.command(b'LOGOUT')
                    c.close()
                else:
                    per_cmd, window = ((1, a.window) if a.floor == 'append'
                                       else (a.batch, 2))
                    load_folders(a.port, a.user, password, index, data, g,
                                 per_cmd, window)
                    for m in index:
                        if m['folder'] in g:
                            res['msgs'] += 1
                            res['bytes'] += m['len']
                os.write(wfd, (json.dumps(res) + '\n').encode())
            except Exception as e:   # report, the parent decides
                os.write(wfd, (json.dumps({'error': str(e)}) + '\n').encode())
                rc = 1
            os._exit(rc)
        pids.append(pid)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        reports = [json.loads(x) for x in f.read().splitlines()]
    for pid in pids:
        os.waitpid(pid, 0)
    t1 = time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    rc = resource.getrusage(resource.RUSAGE_CHILDREN)
    errors = [r['error'] for r in reports if 'error' in r]
    out = {'seconds': t1 - t0,
           'cpu': (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
           + rc.ru_utime + rc.ru_stime,
           'msgs': sum(r.get('msgs', 0) for r in reports),
           'bytes': sum(r.get('bytes', 0) for r in reports),
           'connections': len(pids),
           'error': '; '.join(errors) or None}
    with open(a.out, 'w') as f:
        json.dump(out, f)
    return 1 if errors else 0


# ============================================================ measurement

def run_measured(argv, env=None, stdout=None, stderr=None, timeout=3600):
    """Runs argv as a child; returns wall time, peak RSS and CPU (user+sys)
    of the child and the descendants it reaped.

    The numbers are wait4()'s rusage, taken by GNU time(1) rather than by
    this process: Linux carries a forked child's high-water RSS across
    exec(), so a tool forked straight from this (large) Python process
    would report at least our own RSS as its peak. time(1) is ~1 MB."""
    out = open(stdout, 'wb') if stdout else subprocess.DEVNULL
    err = open(stderr, 'wb') if stderr else subprocess.DEVNULL
    rus = (stderr or '/dev/shm/mover-bench-%d' % os.getpid()) + '.rusage'
    try:
        t0 = time.monotonic()
        p = subprocess.Popen([GNU_TIME, '-f', '%x %M %U %S', '-o', rus,
                              '--'] + argv, env=env,
                             stdin=subprocess.DEVNULL, stdout=out,
                             stderr=err)
        def kill_tool():
            for k in descendants(p.pid):    # the tool, then time(1) ends
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tool()
            raise BenchError('%s: timed out after %d s'
                             % (os.path.basename(argv[0]), timeout))
        except BaseException:               # interrupted: leave nothing
            kill_tool()
            raise
        wall = time.monotonic() - t0
        with open(rus) as f:
            last = f.read().strip().splitlines()[-1].split()
        os.unlink(rus)
        # "%x" is the tool's exit status; a tool killed by a signal makes
        # time(1) print "Command terminated by signal N" first.
        rc, rss_kb, cu, cs = int(last[0]), int(last[1]), float(last[2]), \
            float(last[3])
        if p.returncode != rc and p.returncode != 0:
            rc = p.returncode
        return {'rc': rc, 'wall': wall, 'rss_mb': rss_kb / 1024.0,
                'cpu': cu + cs, 'cpu_user': cu, 'cpu_sys': cs}
    finally:
        if stdout:
            out.close()
        if stderr:
            err.close()


CLK = os.sysconf('SC_CLK_TCK')


def _proc_table():
    procs = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                s = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        procs[int(d)] = (int(s[1]), sum(int(x) for x in s[11:15]), s[0])
    return procs


def machine_busy():
    """(busy, irq+softirq) CPU seconds of all CPUs since boot (/proc/stat);
    loopback TCP's receive work is softirq time, charged to no process."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK, (v[5] + v[6]) / CLK


def descendants(root_pid, procs=None):
    procs = procs if procs is not None else _proc_table()
    kids = collections.defaultdict(list)
    for pid, v in procs.items():
        kids[v[0]].append(pid)
    out, todo = [], list(kids.get(root_pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


def tree_cpu(root_pid):
    """CPU seconds used so far by a Dovecot master and everything under it,
    including exited children it reaped (cutime/cstime)."""
    if root_pid is None:
        return 0.0
    procs = _proc_table()
    total = sum(procs[p][1] for p in [root_pid] + descendants(root_pid, procs)
                if p in procs)
    return total / CLK


# ================================================================= runs

class Bench:
    def __init__(self, a):
        self.a = a
        import dovecot      # tests/lib/dovecot.py
        self.dv = dovecot
        self.workdir = a.workdir or dovecot.make_test_root(
            'mailshift-bench-', parent='/dev/shm')
        os.chmod(self.workdir, 0o755)
        self.servers = []
        self.src = None
        self.results = []

    def log(self, msg):
        print('[%7.1fs] %s' % (time.monotonic() - T0, msg), flush=True)

    def dovecot(self, name, users, **kw):
        """A started Dovecot of the benchmarks' kind (maildir++, '.', no
        POP3, tuned for speed) with users {name: password}; kw: more of
        dovecot.Dovecot's settings. Stopped by cleanup()."""
        s = self.dv.Dovecot(os.path.join(self.workdir, name), name,
                            users=users, separator='.', layout='maildir++',
                            performance=True, pop3=False, **kw)
        self.servers.append(s)
        s.start()
        return s

    def server(self, name, doveadm_http=False):
        return self.dovecot(name, {USER: PASSWORD},
                            doveadm_http=doveadm_http)

    def stop(self, s):
        """Stops s (by its master PID) and waits until the processes that
        were under its master are gone too."""
        if s.pid is None:
            return
        kids = descendants(s.pid)
        s.stop()
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def drop(self, s):
        self.stop(s)
        self.servers.remove(s)
        shutil.rmtree(s.root_dir, ignore_errors=True)

    def cleanup(self):
        for s in list(self.servers):
            try:
                self.stop(s)
            except Exception as e:
                print('stopping %s: %s' % (s.name, e), file=sys.stderr)
        self.servers = []
        if not self.a.keep and not self.a.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---------------------------------------------------------- the source

    def prepare(self):
        a = self.a
        t = time.monotonic()
        self.index = build_corpus(a.messages, a.seed, self.workdir)
        self.total_bytes = sum(m['len'] for m in self.index)
        self.log('corpus: %d messages, %.1f MB in %d folders, %.1f s'
                 % (len(self.index), self.total_bytes / MB,
                    len({m['folder'] for m in self.index}),
                    time.monotonic() - t))
        _, data = load_corpus(self.workdir)
        self.src = self.server('src')
        t = time.monotonic()
        folders = [f[0] for f in FOLDERS]
        load_folders(self.src.imap_port, USER, PASSWORD, self.index, data,
                     folders, 100, 2)
        del data
        self.log('source loaded by MULTIAPPEND in %.1f s'
                 % (time.monotonic() - t))
        t = time.monotonic()
        self.snap = fetch_snapshot(self.src.imap_port, USER, PASSWORD)
        want = collections.defaultdict(list)
        for m in self.index:
            want[m['folder']].append(
                (m['sha256'], m['len'], frozenset(m['flags']),
                 parse_internaldate(m['idate'])))
        bad = []
        for f in folders:
            got = sorted(r[:4] for r in self.snap.get(f, []))
            if got != sorted(want[f]):
                bad.append(f)
        if bad or set(self.snap) != set(folders):
            raise BenchError('source does not hold the corpus exactly '
                             '(folders %s; listed %s)' % (bad,
                                                          sorted(self.snap)))
        self.log('source verified against the corpus (bytes, flags, '
                 'dates) in %.1f s' % (time.monotonic() - t))
        if a.gaps > 0:
            self.make_gaps(a.gaps)
        # The pristine source, restored before every run.
        self.stop(self.src)
        self.pristine = os.path.join(self.workdir, 'src-pristine')
        subprocess.run(['cp', '-a', self.src.mail_dir, self.pristine],
                       check=True)

    def make_gaps(self, n):
        """Expunges n source messages spread evenly over every folder (each
        alone: n gaps in the UIDs), and takes the snapshot again."""
        every = max(2, len(self.index) // n)
        c = Imap(self.src.imap_port)
        c.login(USER, PASSWORD)
        gone = 0
        for f in self.snap:
            # Sequence numbers: stable until the EXPUNGE.
            doomed = list(range(1, len(self.snap[f]) + 1))[every // 2::every]
            if not doomed:
                continue
            c.command(b'SELECT ' + imap_quote(f))
            for i in range(0, len(doomed), 500):
                c.command(b'STORE ' + b','.join(
                    str(u).encode() for u in doomed[i:i + 500]) +
                    b' +FLAGS.SILENT (\\Deleted)')
            c.command(b'EXPUNGE')
            gone += len(doomed)
        c.close()
        self.gaps = gone
        self.snap = fetch_snapshot(self.src.imap_port, USER, PASSWORD)
        self.log('source: %d messages expunged (as many gaps)' % gone)

    def fresh_source(self):
        self.stop(self.src)
        shutil.rmtree(self.src.mail_dir)
        subprocess.run(['cp', '-a', self.pristine, self.src.mail_dir],
                       check=True)
        self.src.start()

    # ------------------------------------------------------------ one run

    def run(self, tool):
        a = self.a
        self.fresh_source()
        dst = self.server('dst-' + tool,
                          doveadm_http=(tool == 'mailshift-identity'))
        rundir = os.path.join(self.workdir, 'run-' + tool)
        os.makedirs(rundir)
        res = {'tool': tool, 'ok': False, 'error': None}
        self.log('%s: running' % tool)
        cpu_src0, cpu_dst0 = tree_cpu(self.src.pid), tree_cpu(dst.pid)
        busy0 = machine_busy()
        try:
            m = getattr(self, 'run_' + tool.replace('-', '_'))(dst, rundir,
                                                               res)
        except (BenchError, OSError) as e:
            m = None
            res['error'] = str(e)
        busy1 = machine_busy()
        busy, irq = busy1[0] - busy0[0], busy1[1] - busy0[1]
        res['irq_cpu'] = irq
        res['server_cpu_src'] = tree_cpu(self.src.pid) - cpu_src0
        res['server_cpu_dst'] = tree_cpu(dst.pid) - cpu_dst0
        # CPU that processes other than the tool and the two servers used
        # meanwhile (other users of the machine, the kernel's softirqs).
        res['total_cpu'] = res['server_cpu_src'] + res['server_cpu_dst'] + \
            (m['cpu'] if m else 0.0)
        res['other_cpu'] = max(0.0, busy - irq - res['server_cpu_src'] -
                               res['server_cpu_dst'] -
                               (m.get('cpu_process', m['cpu']) if m
                                else 0.0))
        if m is not None:
            res.update(seconds=m['wall'], rss_mb=m['rss_mb'], cpu=m['cpu'],
                       cpu_user=m.get('cpu_user'), cpu_sys=m.get('cpu_sys'))
            if tool != 'fetch-floor':
                try:
                    self.verify(dst, res, strip_tuid=(tool == 'mbsync'))
                except (BenchError, OSError) as e:
                    res['error'] = res['error'] or 'verify: %s' % e
            if not res['error'] and res.get('complete'):
                res['ok'] = True
        for k in ('seconds',):
            if res.get(k):
                res['msgs_per_s'] = len(self.index) / res[k]
                res['mb_per_s'] = self.total_bytes / MB / res[k]
        self.log('%s: %s' % (tool, 'ok %.2f s' % res['seconds']
                             if res['ok'] else 'FAILED: %s' % res['error']))
        if res['error']:
            res['dest_log_tail'] = dst.log_tail(15)
            res['source_log_tail'] = self.src.log_tail(15)
        self.drop(dst)
        if not a.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        return res

    def verify(self, dst, res, strip_tuid=False):
        t = time.monotonic()
        snap = fetch_snapshot(dst.imap_port, USER, PASSWORD, strip_tuid)
        src = self.snap
        per = {}
        complete = exact = exact_alt = flags_ok = dates_ok = True
        sysflags_ok = True

        def sysfl(fl):
            return tuple(sorted(x for x in fl if x.startswith('\\')))
        for f, recs in src.items():
            d = snap.get(f, [])
            cnt_ok = len(d) == len(recs)
            b_src = sum(r[1] for r in recs)
            b_dst = sum(r[1] for r in d)
            ex = sorted(r[0] for r in d) == sorted(r[0] for r in recs)
            ex_alt = sorted(r[4] for r in d) == sorted(r[0] for r in recs)
            key = 4 if strip_tuid else 0
            fl = sorted((r[key], tuple(sorted(r[2]))) for r in d) == \
                sorted((r[0], tuple(sorted(r[2]))) for r in recs)
            dt = sorted((r[key], r[3]) for r in d) == \
                sorted((r[0], r[3]) for r in recs)
            sfl = sorted((r[key], sysfl(r[2])) for r in d) == \
                sorted((r[0], sysfl(r[2])) for r in recs)
            sysflags_ok &= sfl
            per[f] = {'src_msgs': len(recs), 'dst_msgs': len(d),
                      'src_bytes': b_src, 'dst_bytes': b_dst,
                      'exact': ex, 'flags': fl, 'dates': dt}
            complete &= cnt_ok
            exact &= ex
            exact_alt &= ex_alt
            flags_ok &= fl
            dates_ok &= dt
        extra = {f: len(r) for f, r in snap.items() if f not in src}
        res['folders'] = per
        res['extra_dest_folders'] = extra
        res['dest_msgs'] = sum(len(r) for r in snap.values())
        res['dest_bytes'] = sum(x[1] for r in snap.values() for x in r)
        res['complete'] = complete and not any(extra.values())
        res['exact'] = exact and res['complete']
        if strip_tuid:
            res['exact_without_x_tuid'] = exact_alt and res['complete']
        res['flags_preserved'] = flags_ok
        res['system_flags_preserved'] = sysflags_ok
        res['keywords_src'] = sum(1 for r in src.values() for x in r
                                  for f in x[2] if not f.startswith('\\'))
        res['keywords_dst'] = sum(1 for r in snap.values() for x in r
                                  for f in x[2] if not f.startswith('\\'))
        res['dates_preserved'] = dates_ok
        if not res['complete']:
            short = {f: '%d/%d' % (v['dst_msgs'], v['src_msgs'])
                     for f, v in per.items()
                     if v['dst_msgs'] != v['src_msgs']}
            res['error'] = res['error'] or (
                'incomplete copy: folders %s, extra %s' % (short, extra))
        self.log('  verified in %.1f s: complete=%s exact=%s flags=%s '
                 'dates=%s' % (time.monotonic() - t, res['complete'],
                               res['exact'], flags_ok, dates_ok))

    # ------------------------------------------------------------ the tools

    def _env(self, **kw):
        env = dict(os.environ)
        env.update(kw)
        return env

    def _floor(self, kind, dst, rundir, res):
        a = self.a
        port = self.src.imap_port if kind == 'fetch' else dst.imap_port
        out = os.path.join(rundir, 'floor.json')
        argv = [sys.executable, os.path.abspath(__file__), '--_floor', kind,
                '--_port', str(port), '--_out', out,
                '--workdir', self.workdir, '--_user', USER,
                '--_connections', str(a.floor_connections),
                '--_window', str(a.append_window),
                '--_batch', str(a.multiappend_batch)]
        res['command'] = ' '.join(argv)
        m = run_measured(argv, env=self._env(BENCH_FLOOR_PASSWORD=PASSWORD),
                         stderr=os.path.join(rundir, 'stderr'),
                         timeout=a.timeout)
        try:
            with open(out) as f:
                fr = json.load(f)
        except (OSError, ValueError):
            raise BenchError('floor %s failed (rc %d): %s' % (
                kind, m['rc'], _tail(os.path.join(rundir, 'stderr'))))
        if fr.get('error') or m['rc'] != 0:
            raise BenchError('floor %s: %s' % (kind, fr.get('error')))
        # The floor's own clock and CPU exclude reading the corpus into
        # memory; its peak RSS includes the corpus (see README).
        m['wall'] = fr['seconds']
        m['cpu_process'] = m['cpu']
        m['cpu'] = fr['cpu']
        m['cpu_user'] = m['cpu_sys'] = None
        res['connections'] = fr['connections']
        res['client_cpu_share'] = fr['cpu'] / fr['seconds'] / \
            fr['connections']
        if kind == 'fetch':
            want_n = sum(len(r) for r in self.snap.values())
            want_b = sum(x[1] for r in self.snap.values() for x in r)
            res['dest_msgs'], res['dest_bytes'] = fr['msgs'], fr['bytes']
            res['complete'] = (fr['msgs'], fr['bytes']) == (want_n, want_b)
            res['exact'] = None
            if not res['complete']:
                res['error'] = 'read %d msgs/%d bytes, source has %d/%d' % (
                    fr['msgs'], fr['bytes'], want_n, want_b)
        return m

    def run_fetch_floor(self, dst, rundir, res):
        return self._floor('fetch', dst, rundir, res)

    def run_append_floor(self, dst, rundir, res):
        return self._floor('append', dst, rundir, res)

    def run_multiappend_floor(self, dst, rundir, res):
        return self._floor('multiappend', dst, rundir, res)

    def run_mailshift(self, dst, rundir, res, extra=()):
        a = self.a
        if not os.access(MAILSHIFTCTL, os.X_OK):
            raise BenchError('%s not built (make all)' % MAILSHIFTCTL)
        argv = [MAILSHIFTCTL, 'migrate', USER,
                '--source', self.src.url('imap'), '--dest', dst.url('imap'),
                '--store', os.path.join(rundir, 'mailshift.db'),
                '--json', '--no-progress'] + a.mailshift_arg + list(extra)
        res['command'] = ' '.join(argv)
        so, se = os.path.join(rundir, 'stdout'), os.path.join(rundir,
                                                             'stderr')
        m = run_measured(argv, env=self._env(
            MAILSHIFT_SOURCE_PASSWORD=PASSWORD,
            MAILSHIFT_DEST_PASSWORD=PASSWORD), stdout=so, stderr=se,
            timeout=a.timeout)
        try:
            with open(so) as f:
                summary = json.loads(f.read() or 'null')
        except ValueError as e:
            summary = None
            res['json_error'] = 'stdout is not JSON: %s' % e
        res['tool_summary'] = summary
        if m['rc'] != 0:
            res['error'] = 'mailshiftctl exit %d: %s' % (m['rc'],
                                                         _tail(se))
        elif not isinstance(summary, dict) or not summary.get('ok') or \
                not summary.get('verified'):
            res['error'] = 'mailshiftctl exit 0 but summary says %s' % (
                json.dumps(summary)[:300] if summary is not None
                else res.get('json_error'))
        return m

    def run_mailshift_identity(self, dst, rundir, res):
        """mailshift with the destination's doveadm API: every folder keeps
        the source's UIDVALIDITY and UIDs (one API request per gap)."""
        extra = ['--dest-doveadm-url', dst.doveadm_url(),
                 '--dest-doveadm-key-file', dst.doveadm_key_file]
        m = self.run_mailshift(dst, rundir, res, extra)
        summary = res.get('tool_summary') or {}
        kept = [f.get('identity') for f in summary.get('folders', [])]
        res['identity_kept'] = kept.count('kept')
        res['gaps'] = getattr(self, 'gaps', 0)
        if not res.get('error') and kept.count('kept') != len(kept):
            res['error'] = 'identity not kept in %d folder(s)' % (
                len(kept) - kept.count('kept'))
        return m

    def run_mbsync(self, dst, rundir, res):
        a = self.a
        state = os.path.join(rundir, 'state') + '/'
        os.makedirs(state)
        rc = os.path.join(rundir, 'mbsyncrc')

        def acct(name, port):
            return ('IMAPAccount %s\nHost 127.0.0.1\nPort %d\nUser %s\n'
                    'Pass "%s"\nSSLType None\nAuthMechs LOGIN\n\n'
                    'IMAPStore %s\nAccount %s\n\n'
                    % (name, port, USER, PASSWORD, name, name))
        conf = (acct('src', self.src.imap_port) +
                acct('dst', dst.imap_port) +
                'Channel move\nFar :src:\nNear :dst:\nPatterns *\n'
                'Create Near\nSync Pull\nExpunge None\nRemove None\n'
                'CopyArrivalDate yes\nSyncState %s\n' % state)
        fd = os.open(rc, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(conf)
        argv = [MBSYNC, '-q', '-c', rc, 'move']
        res['command'] = ' '.join(argv)
        res['config'] = conf.replace(PASSWORD, '***')
        se = os.path.join(rundir, 'stderr')
        m = run_measured(argv, stderr=se, timeout=a.timeout)
        if m['rc'] != 0:
            res['error'] = 'mbsync exit %d: %s' % (m['rc'], _tail(se))
        return m

    def run_doveadm(self, dst, rundir, res):
        a = self.a
        argv = [DOVEADM, '-c', dst.config_path,
                '-o', 'imapc_host=127.0.0.1',
                '-o', 'imapc_port=%d' % self.src.imap_port,
                '-o', 'imapc_user=%s' % USER,
                '-o', 'imapc_password=%s' % PASSWORD,
                '-o', 'imapc_ssl=no',
                '-o', 'imapc_features=rfc822.size fetch-headers',
                '-o', 'mail_prefetch_count=20',
                'backup', '-R', '-u', USER, 'imapc:']
        res['command'] = ' '.join(argv).replace(PASSWORD, '***')
        se = os.path.join(rundir, 'stderr')
        m = run_measured(argv, stderr=se, timeout=a.timeout)
        if m['rc'] != 0:
            res['error'] = 'doveadm exit %d: %s' % (m['rc'], _tail(se))
        return m


def _tail(path, n=600):
    try:
        with open(path, 'rb') as f:
            s = f.read().decode(errors='replace').strip()
        return s[-n:] if s else '(no output)'
    except OSError:
        return '(no output)'


# ======================================================= the site row

# Many small mailboxes at once against one with the same messages (issue
# 12): SITE_USERS users of SITE_MSGS messages in SITE_FOLDERS folders each,
# and one user holding all of them in the same folders.
SITE_FOLDERS_ALL = (['INBOX', 'Sent', 'Drafts', 'Trash', 'Junk', 'Archive',
                     'Projects', 'Projects.Alpha', 'Projects.Beta', 'Lists']
                    + ['Archive.%d' % y for y in range(2015, 2025)])
SITE_ONE = 'siteall'
SITE_PHASES = ('queue', 'login', 'plan', 'copy', 'flags', 'verify', 'store')


def site_user(i):
    return 'site%02d' % i


def build_site_corpus(users, per_user, nfolders, seed, workdir):
    """WORKDIR/site.bin and the index: per_user messages for each of users
    users, spread over nfolders folders (each gets at least one); the
    message sizes as in the main corpus without the 5 MiB ones."""
    rng = random.Random(seed)
    words = _words(rng)
    text = _text_pool(rng, words, 2 << 20)
    b64 = _b64_pool(rng, 8 << 20)
    folders = SITE_FOLDERS_ALL[:nfolders]
    weights = [6, 2] + [1] * (len(folders) - 2)
    index, off, seq = [], 0, 0
    lo = calendar.timegm((2015, 1, 1, 0, 0, 0, 0, 0, 0))
    hi = calendar.timegm((2026, 10, 31, 0, 0, 0, 0, 0, 0))
    with open(os.path.join(workdir, 'site.bin'), 'wb') as out:
        for u in range(users):
            assign = rng.choices(folders, weights=weights[:len(folders)],
                                 k=per_user)
            assign[:len(folders)] = folders[:per_user]
            for folder in assign:
                epoch, tzmin = rng.randrange(lo, hi), rng.choice(TZS)
                big = rng.random() < 0.1
                size = rng.randint(50_000, 200_000) if big else int(min(
                    60_000, max(700, rng.lognormvariate(8.29, 0.65))))
                msg = _message(rng, seq, folder, epoch, tzmin, size, big,
                               text, b64)
                out.write(msg)
                index.append({'user': site_user(u), 'folder': folder,
                              'flags': _flags_for(rng, folder),
                              'idate': _internaldate(epoch, tzmin),
                              'off': off, 'len': len(msg)})
                off += len(msg)
                seq += 1
    return index, folders


class ConnCounter:
    """The most ESTABLISHED TCP connections to each of some local ports
    seen at once, from /proc/net/tcp every 10 ms. A sample: a peak shorter
    than that can be missed, and the kernel walks its table while it is
    read (a page per read): a socket it shows twice (entries moved by
    others' connections meanwhile) is counted once, by its peer address,
    but a connection closed and another opened during one read can both
    be: an exact count needs the client's own connect() and close() calls
    (bench/README.md)."""

    def __init__(self, ports):
        self.ports = {'%04X' % p: p for p in ports}
        self.max = dict.fromkeys(ports, 0)
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _sample(self):
        with open('/proc/net/tcp', 'rb', buffering=0) as f:
            data = f.readall().decode()
        peers = collections.defaultdict(set)
        for line in data.splitlines()[1:]:
            x = line.split()
            port = self.ports.get(x[1].rsplit(':', 1)[1])
            if port is not None and x[3] == '01':
                peers[port].add(x[2])   # a socket read twice counts once
        for p in self.max:
            self.max[p] = max(self.max[p], len(peers[p]))

    def _run(self):
        while not self.stop_ev.is_set():
            self._sample()
            self.stop_ev.wait(0.01)

    def stop(self):
        self.stop_ev.set()
        self.t.join()
        return self.max


class SiteBench(Bench):
    """The site row: its own source (SITE users and SITE_ONE), a new
    destination per run, mailshift only."""

    def server(self, name, doveadm_http=False):
        users = {site_user(i): PASSWORD for i in range(self.a.site_users)}
        users[SITE_ONE] = PASSWORD
        return self.dovecot(name, users)

    def prepare(self):
        a = self.a
        t = time.monotonic()
        self.index, self.folders = build_site_corpus(
            a.site_users, a.site_messages, a.site_folders, a.seed + 12,
            self.workdir)
        self.total_bytes = sum(m['len'] for m in self.index)
        self.log('site corpus: %d users x %d messages in %d folders '
                 '(%d messages, %.1f MB), and %s with all of them, %.1f s'
                 % (a.site_users, a.site_messages, len(self.folders),
                    len(self.index), self.total_bytes / MB, SITE_ONE,
                    time.monotonic() - t))
        with open(os.path.join(self.workdir, 'site.bin'), 'rb') as f:
            data = f.read()
        self.src = self.server('site-src')
        t = time.monotonic()
        by = collections.defaultdict(list)
        for m in self.index:
            by[m['user']].append(m)
        for user, msgs in sorted(by.items()):
            load_folders(self.src.imap_port, user, PASSWORD, msgs, data,
                         self.folders, 100, 2)
        load_folders(self.src.imap_port, SITE_ONE, PASSWORD, self.index,
                     data, self.folders, 100, 2)
        del data
        self.log('site source loaded by MULTIAPPEND in %.1f s'
                 % (time.monotonic() - t))
        t = time.monotonic()
        self.snaps = {u: fetch_snapshot(self.src.imap_port, u, PASSWORD)
                      for u in list(by) + [SITE_ONE]}
        one = collections.Counter()
        for u in by:
            for f, recs in self.snaps[u].items():
                one.update((f, r[:4]) for r in recs)
        want = collections.Counter(
            (f, r[:4]) for f, recs in self.snaps[SITE_ONE].items()
            for r in recs)
        if one != want or sum(want.values()) != len(self.index):
            raise BenchError('site source: %s does not hold exactly the '
                             'users\' messages' % SITE_ONE)
        self.log('site source read back in %.1f s' % (time.monotonic() - t))
        self.stop(self.src)
        self.pristine = os.path.join(self.workdir, 'site-src-pristine')
        subprocess.run(['cp', '-a', self.src.mail_dir, self.pristine],
                       check=True)

    def run_site(self, kind):
        """kind 'many': every site user in one mailshiftctl; 'one':
        SITE_ONE. Verified user by user against the source."""
        a = self.a
        users = ([site_user(i) for i in range(a.site_users)]
                 if kind == 'many' else [SITE_ONE])
        self.fresh_source()
        dst = self.server('site-dst-' + kind)
        rundir = os.path.join(self.workdir, 'run-site-' + kind)
        os.makedirs(rundir)
        res = {'tool': 'site-' + kind, 'users': len(users), 'ok': False,
               'error': None}
        argv = [MAILSHIFTCTL, 'migrate'] + users + [
            '--source', self.src.url('imap'), '--dest', dst.url('imap'),
            '--store', os.path.join(rundir, 'mailshift.db'), '--json',
            '--no-progress'] + a.mailshift_arg
        res['command'] = ' '.join(argv[:3] + ['...'] + argv[-8:]) \
            if kind == 'many' else ' '.join(argv)
        so, se = os.path.join(rundir, 'stdout'), os.path.join(rundir,
                                                             'stderr')
        self.log('site-%s: running (%d user(s))' % (kind, len(users)))
        cpu_src0, cpu_dst0 = tree_cpu(self.src.pid), tree_cpu(dst.pid)
        cc = ConnCounter([self.src.imap_port, dst.imap_port])
        try:
            m = run_measured(argv, env=self._env(
                MAILSHIFT_SOURCE_PASSWORD=PASSWORD,
                MAILSHIFT_DEST_PASSWORD=PASSWORD), stdout=so, stderr=se,
                timeout=a.timeout)
        finally:
            conns = cc.stop()
        res['server_cpu_src'] = tree_cpu(self.src.pid) - cpu_src0
        res['server_cpu_dst'] = tree_cpu(dst.pid) - cpu_dst0
        res['max_conns_src'] = conns[self.src.imap_port]
        res['max_conns_dst'] = conns[dst.imap_port]
        res.update(seconds=m['wall'], rss_mb=m['rss_mb'], cpu=m['cpu'])
        res['msgs_per_s'] = len(self.index) / m['wall']
        try:
            with open(so) as f:
                summary = json.loads(f.read() or 'null')
        except ValueError:
            summary = None
        if m['rc'] != 0 or not isinstance(summary, dict) or \
                not summary.get('ok'):
            res['error'] = 'mailshiftctl exit %d: %s' % (m['rc'], _tail(se))
        else:
            rows = summary.get('users', [summary])
            res['phases'] = summary.get('phases')
            res['user_seconds'] = sum(u['seconds'] for u in rows)
            res['copied'] = sum(u['copied'] for u in rows)
            try:
                bad = [u for u in users if self.site_diff(dst, u)]
                if bad:
                    res['error'] = 'copies differ from the source: %s' % (
                        ', '.join(bad[:5]))
            except (BenchError, OSError) as e:
                res['error'] = 'verify: %s' % e
        res['ok'] = res['error'] is None
        self.log('site-%s: %s' % (kind, 'ok %.2f s' % res['seconds']
                                  if res['ok'] else
                                  'FAILED: %s' % res['error']))
        self.drop(dst)
        if not a.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        return res

    def site_diff(self, dst, user):
        """1 when user's destination mailbox is not the source's (bytes,
        flags, INTERNALDATEs per folder)."""
        got = fetch_snapshot(dst.imap_port, user, PASSWORD)
        want = self.snaps[user]
        for f, recs in want.items():
            if sorted(r[:4] for r in got.get(f, [])) != \
                    sorted(r[:4] for r in recs):
                return 1
        return int(any(got[f] for f in got if f not in want))


def site_main(a):
    """The site row: rounds of one user and many users (best of each);
    returns the JSON for the results file, or None when it failed."""
    b = SiteBench(a)
    try:
        b.log('site: work directory %s' % b.workdir)
        b.prepare()
        runs = collections.defaultdict(list)
        for i in range(max(1, a.repeat)):
            for kind in (('one', 'many') if i % 2 == 0 else ('many', 'one')):
                runs[kind].append(b.run_site(kind))
    finally:
        b.cleanup()
    best = {}
    for kind, rs in runs.items():
        ok = [r for r in rs if r['ok']]
        best[kind] = dict(min(ok, key=lambda r: r['seconds']) if ok
                          else rs[-1])
        best[kind]['repeats'] = [{k: r.get(k) for k in (
            'ok', 'seconds', 'rss_mb', 'cpu', 'max_conns_src',
            'max_conns_dst', 'error')} for r in rs]
    site_report(a, b, best)
    return {'users': a.site_users, 'messages_per_user': a.site_messages,
            'folders': len(b.folders), 'messages': len(b.index),
            'bytes': b.total_bytes, 'runs': best}


def site_report(a, b, best):
    one, many = best.get('one'), best.get('many')
    print()
    print('site: %d users x %d messages in %d folders (%d messages, %.1f MB) '
          'in one mailshiftctl, against one user with all of them; %s'
          % (a.site_users, a.site_messages, len(b.folders), len(b.index),
             b.total_bytes / MB, ' '.join(a.mailshift_arg) or
             'connections: the default (4 per server)'))
    hdr = ('row', 'users', 'msgs', 'seconds', 'msg/s', 'RSS MB', 'CPU s',
           'srv CPU s', 'max conns src/dst', 'ok')
    rows = []
    for kind, r in (('one', one), ('many', many)):
        if r is None or r.get('seconds') is None:
            continue
        rows.append(('site-' + kind, str(r['users']), str(len(b.index)),
                     '%.2f' % r['seconds'], '%.0f' % r['msgs_per_s'],
                     '%.1f' % r['rss_mb'], '%.2f' % r['cpu'],
                     '%.1f/%.1f' % (r['server_cpu_src'], r['server_cpu_dst']),
                     '%d/%d' % (r['max_conns_src'], r['max_conns_dst']),
                     'yes' if r['ok'] else 'FAILED'))
    w = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h)
         for i, h in enumerate(hdr)]
    fmt = '  '.join('%%-%ds' if i == 0 else '%%%ds' for i in
                    range(len(hdr))) % tuple(w)
    print(fmt % hdr)
    for x in rows:
        print(fmt % x)
    for r in (one, many):
        if r is not None and r.get('error'):
            print('%s: ERROR: %s' % (r['tool'], r['error']))
    if not (one and many and one['ok'] and many['ok']):
        return
    print('many/one (msg/s): %.2f; memory per user: at most %.0f KB (the '
          'many-user run\'s peak RSS / %d users; %+.1f MB against the '
          'one-user run)'
          % (many['msgs_per_s'] / one['msgs_per_s'],
             many['rss_mb'] * 1024 / many['users'], many['users'],
             many['rss_mb'] - one['rss_mb']))
    print('where the time goes (ms summed over the users; each moment of a '
          'user\'s wall time counted once, docs/mover.md "Phases"; "at '
          'work" leaves the queue out):')
    print('  %-7s %10s %7s %8s %10s %7s' % ('phase', 'many', 'share',
                                             'at work', 'one', 'share'))
    tot_m, tot_o = many['user_seconds'] * 1000, one['user_seconds'] * 1000
    work = max(1, sum(v for k, v in many['phases'].items() if k != 'queue'))
    for k in SITE_PHASES:
        vm, vo = many['phases'].get(k, 0), one['phases'].get(k, 0)
        print('  %-7s %10d %6.1f%% %7s %10d %6.1f%%' % (
            k, vm, 100 * vm / tot_m, '' if k == 'queue' else
            '%.1f%%' % (100 * vm / work), vo, 100 * vo / tot_o))
    print('  %-7s %10.0f %7s %8s %10.0f' % ('wall', tot_m, '', '', tot_o))


# ================================================================ report

def report(b, args_line):
    rs = {r['tool']: r for r in b.results}
    hdr = ('tool', 'msgs', 'MB', 'seconds', 'msg/s', 'MB/s', 'RSS MB',
           'CPU s', 'srv CPU s', 'total CPU', 'others', 'exact?')
    rows = []
    for r in b.results:
        if r.get('seconds') is None:
            rows.append((r['tool'], '-', '-', '-', '-', '-', '-', '-', '-',
                         '-', '-', 'FAILED'))
            continue
        if r['tool'] == 'fetch-floor':
            exact = 'n/a'
        elif r.get('exact'):
            exact = 'yes'
        elif r['tool'] == 'mbsync' and r.get('exact_without_x_tuid'):
            exact = 'no (X-TUID)'
        else:
            exact = 'no'
        if not r['ok']:
            exact += ' FAILED'
        rows.append((r['tool'], str(r.get('dest_msgs', '-')),
                     '%.1f' % (r.get('dest_bytes', 0) / MB),
                     '%.2f' % r['seconds'], '%.0f' % r['msgs_per_s'],
                     '%.1f' % r['mb_per_s'], '%.1f' % r['rss_mb'],
                     '%.2f' % r['cpu'],
                     '%.1f/%.1f' % (r['server_cpu_src'],
                                    r['server_cpu_dst']),
                     '%.2f' % r['total_cpu'], '%.1f' % r['other_cpu'],
                     exact))
    w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(hdr)]
    lines = []
    fmt = '  '.join('%%-%ds' if i in (0, 11) else '%%%ds' for i in
                    range(len(hdr))) % tuple(w)
    lines.append(fmt % hdr)
    lines.append('  '.join('-' * x for x in w))
    for x in rows:
        lines.append(fmt % x)
    print()
    print('mover benchmark: %d messages, %.1f MB, %d folders; %s'
          % (len(b.index), b.total_bytes / MB,
             len({m['folder'] for m in b.index}), args_line))
    print('\n'.join(lines))
    print('(srv CPU s = CPU of the source/destination Dovecot process trees '
          'during the run; doveadm writes the destination itself, so its '
          'own CPU includes that work. others = CPU seconds used by other '
          'processes on the machine meanwhile; irq/softirq time is in the '
          'JSON as irq_cpu)')
    ncpu = os.cpu_count() or 1
    noisy = [r['tool'] for r in b.results if r.get('seconds') and
             r['other_cpu'] > 0.25 * ncpu * r['seconds']]
    if noisy:
        print('WARNING: the machine was busy with other work during: %s '
              '(more than a quarter of its CPU); compare those rows with '
              'care, or rerun with --repeat' % ', '.join(noisy))
    conns = [a for a in b.a.mailshift_arg if 'connections' in a]
    print('(total CPU = tool + both servers: the work a copy cost, much less '
          'sensitive to other load than seconds)')
    print('connections: floors %d each; mailshift %s; doveadm and mbsync 1 '
          'per server' % (b.a.floor_connections,
                          ' '.join(conns) or 'its default (4 per server)'))
    for r in b.results:
        if r['tool'] in FLOORS and r.get('client_cpu_share') is not None:
            share = r['client_cpu_share']
            print('%s: client CPU %.0f%% of wall per connection%s' % (
                r['tool'], 100 * share,
                ' -> the Python client is (close to) the bottleneck'
                if share > 0.85 else ''))
    for r in b.results:
        if r.get('error'):
            print('%s: ERROR: %s' % (r['tool'], r['error']))
        if r.get('complete') and (not r.get('flags_preserved', True) or
                                  not r.get('dates_preserved', True)):
            print('%s: flags preserved: %s (system flags: %s; keywords '
                  '%d of %d kept), INTERNALDATEs preserved: %s' % (
                      r['tool'], r.get('flags_preserved'),
                      r.get('system_flags_preserved'), r['keywords_dst'],
                      r['keywords_src'], r.get('dates_preserved')))

    targets = {}
    ms = rs.get('mailshift')

    def rate(t):
        r = rs.get(t)
        return r['msgs_per_s'] if r and r['ok'] else None
    ratios = {}
    if rate('mailshift'):
        for t in ('doveadm', 'mbsync', 'fetch-floor', 'append-floor',
                  'multiappend-floor'):
            if rate(t):
                ratios['mailshift/' + t] = rate('mailshift') / rate(t)
    cpu_ratios = {}
    if rs.get('mailshift', {}).get('ok'):
        for t in ('doveadm', 'mbsync'):
            if rs.get(t, {}).get('ok'):
                cpu_ratios['%s/mailshift' % t] = \
                    rs[t]['total_cpu'] / rs['mailshift']['total_cpu']
    ratios_all = dict(ratios)
    ratios_all.update({'total_cpu ' + k: v for k, v in cpu_ratios.items()})
    print()
    if ratios:
        print('ratios (messages/s): ' + ', '.join(
            '%s %.2fx' % (k, v) for k, v in ratios.items()))
    if cpu_ratios:
        print('total CPU, other tool over mailshift: ' + ', '.join(
            '%s %.2fx' % (k, v) for k, v in cpu_ratios.items()))
    if ms is not None:
        def mark(ok):
            return 'n/a' if ok is None else ('met' if ok else 'NOT met')
        r_d = ratios.get('mailshift/doveadm')
        r_m = ratios.get('mailshift/mbsync')
        targets = {
            'vs_doveadm_imapc>=%.1fx' % TARGET_VS_DOVEADM:
                None if r_d is None else r_d >= TARGET_VS_DOVEADM,
            'vs_mbsync>=%.1fx' % TARGET_VS_MBSYNC:
                None if r_m is None else r_m >= TARGET_VS_MBSYNC,
            'byte_exact': bool(ms.get('exact')) if ms['ok'] else False,
            'peak_rss<%dMB' % TARGET_RSS_MB:
                (ms['rss_mb'] < TARGET_RSS_MB) if ms['ok'] else None,
        }
        print('targets for mailshift:')
        vals = {'vs_doveadm_imapc>=%.1fx' % TARGET_VS_DOVEADM:
                'n/a' if r_d is None else '%.2fx' % r_d,
                'vs_mbsync>=%.1fx' % TARGET_VS_MBSYNC:
                'n/a' if r_m is None else '%.2fx' % r_m,
                'byte_exact': 'yes' if ms.get('exact') else 'no',
                'peak_rss<%dMB' % TARGET_RSS_MB:
                '%.1f MB' % ms['rss_mb'] if ms.get('rss_mb') else 'n/a'}
        for k, v in targets.items():
            print('  %-22s %-10s %s' % (k, vals[k], mark(v)))
    return ratios_all, targets


def machine_info():
    info = {'nproc': os.cpu_count()}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
        with open('/proc/meminfo') as f:
            info['mem_kb'] = int(f.readline().split()[1])
    except OSError:
        pass
    for name, argv in (('dovecot', ['dovecot', '--version']),
                       ('mbsync', [MBSYNC, '--version']),
                       ('kernel', ['uname', '-r'])):
        try:
            info[name] = subprocess.run(argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT,
                                        text=True).stdout.strip()
        except OSError:
            info[name] = None
    try:
        with open(MAILSHIFTCTL, 'rb') as f:
            info['mailshiftctl_sha256'] = hashlib.sha256(f.read()).hexdigest()
        info['mailshiftctl_mtime'] = time.strftime(
            '%Y-%m-%dT%H:%M:%S', time.localtime(os.stat(MAILSHIFTCTL).st_mtime))
    except OSError:
        pass
    try:
        info['git'] = subprocess.run(
            ['git', '-C', REPO, 'describe', '--always', '--dirty'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True).stdout.strip()
    except OSError:
        pass
    return info


def main():
    p = argparse.ArgumentParser(
        description='mailshift mover benchmark (see bench/README.md)')
    p.add_argument('--messages', type=int, default=20000,
                   help='corpus size (default 20000)')
    p.add_argument('--only', default=None,
                   help='comma-separated subset of: ' +
                   ','.join(TOOLS + EXTRA_TOOLS))
    p.add_argument('--gaps', type=int, default=0,
                   help='expunge this many source messages, spread evenly '
                   '(gaps in the UIDs), before the runs')
    p.add_argument('--seed', type=int, default=20240501,
                   help='corpus PRNG seed')
    p.add_argument('--workdir', default=None,
                   help='work directory (default: a new dir in /dev/shm, '
                   'removed at the end)')
    p.add_argument('--keep', action='store_true',
                   help='keep the work directory and per-run files')
    p.add_argument('--timeout', type=int, default=3600,
                   help='per-run timeout in seconds')
    p.add_argument('--repeat', type=int, default=3,
                   help='run every tool N times, in interleaved rounds, and '
                   'report the fastest successful run of each (all are in '
                   'the JSON; default 3)')
    p.add_argument('--floor-connections', type=int, default=1,
                   help='connections used by the floors (default 1)')
    p.add_argument('--append-window', type=int, default=16,
                   help='single APPENDs in flight in append-floor')
    p.add_argument('--multiappend-batch', type=int, default=100,
                   help='messages per MULTIAPPEND in multiappend-floor')
    p.add_argument('--mailshift-arg', action='append', default=[],
                   help='extra argument for mailshiftctl migrate '
                   '(repeatable, e.g. --mailshift-arg=--connections=8)')
    p.add_argument('--results', default=os.path.join(HERE, 'results'),
                   help='directory for the JSON results')
    p.add_argument('--site-users', type=int, default=40,
                   help='the site row: users copied at once (default 40)')
    p.add_argument('--site-messages', type=int, default=400,
                   help='the site row: messages per user (default 400)')
    p.add_argument('--site-folders', type=int, default=20,
                   choices=range(2, len(SITE_FOLDERS_ALL) + 1),
                   metavar='N', help='the site row: folders per user '
                   '(2-%d, default 20)' % len(SITE_FOLDERS_ALL))
    p.add_argument('--_floor', choices=('fetch', 'append', 'multiappend'),
                   help=argparse.SUPPRESS)
    p.add_argument('--_port', type=int, help=argparse.SUPPRESS)
    p.add_argument('--_user', help=argparse.SUPPRESS)
    p.add_argument('--_out', help=argparse.SUPPRESS)
    p.add_argument('--_connections', type=int, default=1,
                   help=argparse.SUPPRESS)
    p.add_argument('--_window', type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument('--_batch', type=int, default=100, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._floor:
        a.floor, a.port, a.user, a.out = a._floor, a._port, a._user, a._out
        a.connections, a.window, a.batch = a._connections, a._window, \
            a._batch
        return floor_main(a)

    tools = list(TOOLS) + [SITE]
    if a.only:
        tools = [t.strip() for t in a.only.split(',') if t.strip()]
        bad = [t for t in tools if t not in TOOLS + EXTRA_TOOLS + (SITE,)]
        if bad:
            p.error('unknown tool(s) %s; choose from %s'
                    % (','.join(bad), ','.join(TOOLS + (SITE,))))
    site = SITE in tools
    tools = [t for t in tools if t != SITE]
    if os.geteuid() != 0:
        p.error('must run as root (Dovecot stores mail as uid 65534)')

    b = Bench(a)
    args_line = ' '.join(sys.argv[1:]) or '(defaults)'
    ratios, targets, site_doc = {}, {}, None

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if tools:
            ratios, targets = main_rows(b, a, tools, args_line)
        else:
            b.index, b.total_bytes = [], 0
        if site:
            site_doc = site_main(a)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 1
    except BenchError as e:
        print('mover_bench: %s' % e, file=sys.stderr)
        return 1
    finally:
        b.cleanup()

    os.makedirs(a.results, exist_ok=True)
    stamp = time.strftime('%Y-%m-%dT%H%M%S')
    path = os.path.join(a.results, 'mover-%s.json' % stamp)
    doc = {'date': stamp, 'argv': sys.argv[1:], 'machine': machine_info(),
           'corpus': {'messages': len(b.index), 'bytes': b.total_bytes,
                      'folders': collections.Counter(
                          m['folder'] for m in b.index),
                      'seed': a.seed},
           'results': b.results, 'ratios': ratios,
           'targets': targets, 'site': site_doc}
    with open(path, 'w') as f:
        json.dump(doc, f, indent=1, default=str)
    print('\nresults written to %s' % os.path.relpath(path))
    return 0


def main_rows(b, a, tools, args_line):
    """The one-mailbox rows: each tool in rotated rounds, the report."""
    b.log('work directory %s' % b.workdir)
    b.prepare()
    # Interleaved, rotated rounds: a busy spell on a shared machine
    # then hurts every tool rather than all runs of one.
    allruns = collections.defaultdict(list)
    n = max(1, a.repeat)
    for i in range(n):
        if n > 1:
            b.log('round %d of %d' % (i + 1, n))
        k = i % len(tools)
        for t in tools[k:] + tools[:k]:
            allruns[t].append(b.run(t))
    for t in tools:
        runs = allruns[t]
        ok = [r for r in runs if r['ok']]
        best = dict(min(ok, key=lambda r: r['seconds']) if ok
                    else runs[-1])
        if len(runs) > 1:
            best['repeats'] = [
                {k: r.get(k) for k in ('ok', 'seconds', 'rss_mb', 'cpu',
                                       'server_cpu_src', 'server_cpu_dst',
                                       'other_cpu', 'irq_cpu', 'error')}
                for r in runs]
        b.results.append(best)
    return report(b, args_line)


T0 = time.monotonic()

if __name__ == '__main__':
    sys.exit(main())
