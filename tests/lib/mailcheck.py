"""Test corpora and mailbox comparison over IMAP (imaplib).

    msg = make_message(1, 2000)                    # bytes, RFC 5322, CRLF
    append(m, 'Archive.2020', msg, ['\\Seen'], 946684800)
    append_many(m, 'INBOX', [(msg, flags, date), ...])   # MULTIAPPEND
    snap = snapshot(m)   # {'Archive/2020': [(sha256, ('\\Seen',), epoch)]}
    want = map_snapshot(snap, dst_sep='/',
                        src_special=special_use(src_conn),
                        dst_special=special_use(dst_conn))
    assert_snapshots_equal(want, snapshot(dst_conn))

Folder keys: the folder name decoded from modified UTF-7 to UTF-8, its
hierarchy levels joined with '/'. Inside a level, '%' is written "%25" and
'/' "%2F" so that a key is unambiguous whatever the server's separator
(a Maildir++ folder "a/b" at top level has key "a%2Fb"; the folder "a%2Fb"
has key "a%252Fb"). INBOX is always "INBOX". Folders that are \\Noselect or
\\NonExistent are not part of a snapshot.
"""

import base64
import calendar
import hashlib
import imaplib
import random
import re
import time

__all__ = [
    'mutf7_encode', 'mutf7_decode', 'quote_mailbox', 'make_message',
    'append', 'append_many', 'create_folder', 'list_folders', 'snapshot',
    'special_use', 'subscriptions', 'map_name', 'map_snapshot',
    'map_names', 'diff_snapshots', 'assert_snapshots_equal', 'count',
    'parse_imap_date', 'fetch_all', 'ImapParseError', 'key_of',
    'server_name', 'unselect', 'message_ids',
]


class ImapParseError(ValueError):
    pass


# ------------------------------------------------------ modified UTF-7 (3501)

def mutf7_encode(s):
    """UTF-8 str -> modified UTF-7 str (RFC 3501 5.1.3)."""
    out, buf = [], []

    def flush():
        if buf:
            b = ''.join(buf).encode('utf-16-be')
            out.append('&' + base64.b64encode(b).decode().rstrip('=')
                       .replace('/', ',') + '-')
            buf.clear()

    for ch in s:
        if 0x20 <= ord(ch) <= 0x7e:
            flush()
            out.append('&-' if ch == '&' else ch)
        else:
            buf.append(ch)
    flush()
    return ''.join(out)


def mutf7_decode(s):
    """modified UTF-7 str -> str. Raises ValueError when invalid."""
    if isinstance(s, bytes):
        s = s.decode('ascii')
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c != '&':
            out.append(c)
            i += 1
            continue
        j = s.find('-', i)
        if j < 0:
            raise ValueError('unterminated & in %r' % s)
        if j == i + 1:
            out.append('&')
        else:
            b64 = s[i + 1:j].replace(',', '/')
            b64 += '=' * (-len(b64) % 4)
            out.append(base64.b64decode(b64, validate=True)
                       .decode('utf-16-be'))
        i = j + 1
    return ''.join(out)


def quote_mailbox(name):
    """A UTF-8 folder name (in the server's own separator) as an IMAP
    quoted string in modified UTF-7, ready for imaplib commands."""
    m = mutf7_encode(name)
    return '"' + m.replace('\\', '\\\\').replace('"', '\\"') + '"'


# --------------------------------------------------------------- messages

_DAY = ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun']
_MON = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep',
        'Oct', 'Nov', 'Dec']


def _rfc5322_date(epoch):
    t = time.gmtime(epoch)
    return '%s, %02d %s %04d %02d:%02d:%02d +0000' % (
        _DAY[t.tm_wday], t.tm_mday, _MON[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec)


def make_message(i, size=1000, msgid=None, date=None, subject=None,
                 sender='sender@example.org', to='rcpt@example.net',
                 extra_headers=()):
    """A valid RFC 5322 message (CRLF line ends) of about size bytes (never
    less), deterministic in its arguments.

    msgid: None -> '<msg-I@mailshift.test>'; False -> no Message-ID header;
    a str -> that value. date: epoch seconds for the Date: header (default
    a fixed date derived from i)."""
    if date is None:
        date = 1600000000 + i * 61
    hdr = ['From: Test Sender <%s>' % sender,
           'To: <%s>' % to,
           'Subject: %s' % (subject if subject is not None
                            else 'Test message %d' % i),
           'Date: %s' % _rfc5322_date(date)]
    if msgid is None:
        msgid = '<msg-%d@mailshift.test>' % i
    if msgid is not False:
        hdr.append('Message-ID: %s' % msgid)
    hdr += list(extra_headers)
    hdr += ['MIME-Version: 1.0',
            'Content-Type: text/plain; charset=us-ascii',
            'Content-Transfer-Encoding: 7bit']
    head = ('\r\n'.join(hdr) + '\r\n\r\n').encode()
    first = ('Message %d body.\r\n' % i).encode()
    need = size - len(head) - len(first)
    body = b''
    if need > 0:
        # base64 lines of 76 chars + CRLF (78 bytes) carry 57 random bytes.
        nraw = (need // 78 + 1) * 57
        raw = random.Random(i * 7919 + size).randbytes(nraw)
        body = base64.encodebytes(raw).replace(b'\n', b'\r\n')
    return head + first + body


# ----------------------------------------------------------------- append

def _check(typ, data, what):
    if typ != 'OK':
        raise imaplib.IMAP4.error('%s: %s %r' % (what, typ, data))
    return data


def _flags_str(flags):
    if flags is None:
        return ''
    if isinstance(flags, str):
        flags = flags.split()
    return ' '.join(flags)


def _date_str(date):
    if date is None:
        return None
    if isinstance(date, str):
        return date if date.startswith('"') else '"%s"' % date
    if isinstance(date, (int, float)):
        t = time.gmtime(date)
        return '"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
            t.tm_mday, _MON[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min,
            t.tm_sec)
    return imaplib.Time2Internaldate(date)


def create_folder(imap, folder, subscribe=True):
    """CREATE (ignores ALREADYEXISTS) and optionally SUBSCRIBE."""
    q = quote_mailbox(folder)
    typ, data = imap.create(q)
    if typ != 'OK' and b'ALREADYEXISTS' not in b' '.join(
            d for d in data if isinstance(d, bytes)):
        raise imaplib.IMAP4.error('CREATE %s: %r' % (folder, data))
    if subscribe:
        _check(*imap.subscribe(q), what='SUBSCRIBE ' + folder)


def append(imap, folder, msg, flags=(), date=None):
    """APPENDs one message exactly as given (no line-end rewriting, unlike
    imaplib.append). flags: list or space-separated str; date: epoch,
    datetime, or an INTERNALDATE string. Returns the APPENDUID uid or
    None."""
    return append_many(imap, folder, [(msg, flags, date)])[0]


def append_many(imap, folder, items, batch=100, select=True):
    """APPENDs many messages with MULTIAPPEND and LITERAL+ (batch per
    command). items: iterable of msg or (msg, flags, date). The folder is
    SELECTed first (Dovecot's Maildir APPEND is much cheaper then).
    Returns the list of APPENDUID uids (None where unknown)."""
    q = quote_mailbox(folder).encode()
    if select:
        _check(*imap.select(q.decode()), what='SELECT ' + folder)
    uids = []
    chunk = []

    def flush():
        if not chunk:
            return
        parts = [b'APPEND ', q]
        for msg, flags, date in chunk:
            fl = _flags_str(flags)
            parts.append(b' (' + fl.encode() + b')')
            ds = _date_str(date)
            if ds:
                parts.append(b' ' + ds.encode())
            parts.append(b' {%d+}\r\n' % len(msg))
            parts.append(msg)
        parts.append(b'\r\n')
        tag = imap._new_tag()
        imap.send(tag + b' ' + b''.join(parts))
        typ, data = imap._command_complete('APPEND', tag)
        _check(typ, data, 'APPEND %s' % folder)
        m = re.search(rb'\[APPENDUID \d+ ([0-9:,]+)\]', data[-1] or b'')
        if m:
            got = _expand_uidset(m.group(1).decode())
            uids.extend(got if len(got) == len(chunk) else [None] * len(chunk))
        else:
            uids.extend([None] * len(chunk))
        chunk.clear()

    for it in items:
        if isinstance(it, (bytes, bytearray)):
            it = (bytes(it), (), None)
        chunk.append(it)
        if len(chunk) >= batch:
            flush()
    flush()
    if select and imap.state == 'SELECTED':
        unselect(imap)
    return uids


def unselect(imap):
    """UNSELECT (RFC 3691): leaves the folder without expunging (CLOSE
    would expunge \\Deleted messages)."""
    _check(*imap.unselect(), what='UNSELECT')


def _expand_uidset(s):
    out = []
    for part in s.split(','):
        if ':' in part:
            a, b = part.split(':')
            a, b = int(a), int(b)
            out.extend(range(min(a, b), max(a, b) + 1))
        else:
            out.append(int(part))
    return out


# ---------------------------------------------------- response tokenizer

class _Lit(bytes):
    """A literal's bytes (distinct from an atom)."""


_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\+?\}\s*$'
                    rb'|([^\s()"\[\]{}]+(?:\[[^\]]*\](?:<[0-9.]+>)?)?))')


def _tokens(data):
    """Yields tokens of imaplib response data (a list of bytes and
    (bytes, literal) tuples): '(' ')' markers, atoms as str, quoted strings
    as bytes, literals as _Lit."""
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            text, lit = item[0], item[1]
        else:
            text, lit = item, None
        pos = 0
        text = text.rstrip(b'\r\n')
        while pos < len(text):
            if text[pos:].strip() == b'':
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ImapParseError('cannot parse %r at %d' % (text, pos))
            pos = m.end()
            if m.group(1):
                yield '('
            elif m.group(2):
                yield ')'
            elif m.group(3) is not None:
                yield re.sub(rb'\\(.)', rb'\1', m.group(3))
            elif m.group(4) is not None:
                if lit is None:
                    raise ImapParseError('literal marker without data: %r'
                                         % text)
                if len(lit) != int(m.group(4)):
                    raise ImapParseError('literal length %d != %s'
                                         % (len(lit), m.group(4).decode()))
                yield _Lit(lit)
                lit = None
            else:
                yield m.group(5).decode('ascii', 'replace')
        if lit is not None:
            raise ImapParseError('literal without marker after %r' % text)


def _parse(tokens):
    """Turns a token stream into a list of values (nested lists for
    parenthesised lists)."""
    stack = [[]]
    for t in tokens:
        if t == '(' and not isinstance(t, bytes):
            stack.append([])
        elif t == ')' and not isinstance(t, bytes):
            if len(stack) == 1:
                raise ImapParseError('unbalanced )')
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(t)
    if len(stack) != 1:
        raise ImapParseError('unbalanced (')
    return stack[0]


def parse_imap_date(s):
    """'17-Jul-1996 02:44:25 -0700' -> epoch seconds."""
    if isinstance(s, bytes):
        s = s.decode()
    m = re.match(r'\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) '
                 r'([+-])(\d\d)(\d\d)\s*$', s)
    if not m:
        raise ImapParseError('bad date-time %r' % s)
    mon = [x.lower() for x in _MON].index(m.group(2).lower()) + 1
    t = calendar.timegm((int(m.group(3)), mon, int(m.group(1)),
                         int(m.group(4)), int(m.group(5)), int(m.group(6)),
                         0, 0, 0))
    off = (int(m.group(8)) * 60 + int(m.group(9))) * 60
    return t - off if m.group(7) == '+' else t + off


def fetch_all(imap, folder, items='(BODY.PEEK[] FLAGS INTERNALDATE)',
              uids='1:*'):
    """EXAMINEs folder (UTF-8 name, server separator) and UID FETCHes
    items; returns {uid: {ITEM: value}} (BODY[] as bytes, FLAGS as a list
    of str, INTERNALDATE as epoch, others as parsed)."""
    typ, data = imap.select(quote_mailbox(folder), readonly=True)
    _check(typ, data, 'EXAMINE ' + folder)
    try:
        exists = int(data[0])
        if exists == 0:
            return {}
        typ, data = imap.uid('FETCH', uids, items)
        _check(typ, data, 'UID FETCH in ' + folder)
        out = {}
        vals = _parse(_tokens(data))
        i = 0
        while i < len(vals):
            seq = vals[i]
            if not isinstance(seq, str) or not seq.isdigit() or \
                    i + 1 >= len(vals) or not isinstance(vals[i + 1], list):
                raise ImapParseError('unexpected FETCH data %r' % (seq,))
            lst = vals[i + 1]
            i += 2
            d = {}
            for j in range(0, len(lst) - 1, 2):
                k = lst[j].upper() if isinstance(lst[j], str) else lst[j]
                v = lst[j + 1]
                if k == 'INTERNALDATE':
                    v = parse_imap_date(v)
                elif k in ('UID', 'RFC822.SIZE'):
                    v = int(v)
                elif k.startswith('BODY') or k.startswith('RFC822'):
                    if isinstance(v, str) and v.upper() == 'NIL':
                        v = None
                    else:
                        v = bytes(v)
                    k = 'BODY[]' if k.startswith('BODY[]') else k
                d[k] = v
            if 'UID' not in d:
                continue
            out.setdefault(d['UID'], {}).update(d)
        return out
    finally:
        if imap.state == 'SELECTED':
            unselect(imap)


def message_ids(imap):
    """collections.Counter of the Message-IDs (as written, '' when there is
    none) of the messages in every selectable folder (EXAMINE): what is
    there, and how many times, whatever the folder names."""
    from collections import Counter
    ids = Counter()
    for f in list_folders(imap):
        if '\\noselect' in f['attrs'] or '\\nonexistent' in f['attrs']:
            continue
        typ, data = imap.select(quote_mailbox(f['name']), readonly=True)
        _check(typ, data, 'EXAMINE ' + f['name'])
        try:
            if int(data[0]) == 0:
                continue
            typ, data = imap.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS '
                                   '(MESSAGE-ID)])')
            _check(typ, data, 'FETCH in ' + f['name'])
            for part in data:
                if isinstance(part, tuple):
                    hdr = part[1].decode(errors='replace')
                    ids[hdr.partition(':')[2].strip()] += 1
        finally:
            unselect(imap)
    return ids


# ----------------------------------------------------------------- folders

def _key_level(level):
    return level.replace('%', '%25').replace('/', '%2F')


def _unkey_level(level):
    return re.sub('%([0-9A-Fa-f]{2})', lambda m: chr(int(m.group(1), 16)),
                  level)


def key_of(raw_name, sep):
    """Snapshot key of a raw (mUTF-7) folder name with separator sep."""
    if raw_name.upper() == 'INBOX':
        return 'INBOX'
    name = mutf7_decode(raw_name)
    levels = name.split(sep) if sep else [name]
    return '/'.join(_key_level(l) for l in levels)


def server_name(key, sep):
    """The UTF-8 folder name on a server with separator sep for a key
    (inverse of key_of, before mUTF-7); for quote_mailbox/fetch_all."""
    levels = [_unkey_level(l) for l in key.split('/')]
    for l in levels:
        if sep and sep in l and len(levels) > 1:
            raise ValueError('level %r contains the separator %r' % (l, sep))
    return sep.join(levels) if sep else levels[0]


def list_folders(imap, subscribed=False):
    """[{'raw', 'name' (UTF-8, server sep), 'key', 'sep', 'attrs'}] from
    LIST "" "*" (or LSUB "" "*")."""
    typ, data = (imap.lsub if subscribed else imap.list)('""', '"*"')
    _check(typ, data, 'LSUB' if subscribed else 'LIST')
    vals = _parse(_tokens(data))
    out = []
    for i in range(0, len(vals), 3):
        attrs, sep, raw = vals[i:i + 3]
        if not isinstance(attrs, list):
            raise ImapParseError('bad LIST response %r' % (vals[i:i + 3],))
        sep = '' if (isinstance(sep, str) and sep.upper() == 'NIL') else \
            (sep.decode() if isinstance(sep, bytes) else sep)
        raw = raw.decode() if isinstance(raw, bytes) else raw
        out.append({'raw': raw, 'name': mutf7_decode(raw), 'sep': sep,
                    'key': key_of(raw, sep),
                    'attrs': [a.lower() for a in attrs]})
    return out


def special_use(imap):
    """{key: '\\Sent', ...} from the LIST special-use attributes."""
    uses = ('\\all', '\\archive', '\\drafts', '\\flagged', '\\junk',
            '\\sent', '\\trash')
    out = {}
    for f in list_folders(imap):
        for a in f['attrs']:
            if a in uses:
                out[f['key']] = '\\' + a[1:].capitalize()
    return out


def subscriptions(imap):
    """Set of keys of the subscribed folders (LSUB)."""
    return {f['key'] for f in list_folders(imap, subscribed=True)}


def snapshot(imap, with_uids=False):
    """{key: sorted list of (sha256 hex of the bytes, sorted tuple of
    flags without \\Recent, INTERNALDATE epoch)} for every selectable
    folder (EXAMINE, so nothing is changed). with_uids=True adds the
    source UID as a 4th element (then the lists are sorted by UID)."""
    snap = {}
    for f in list_folders(imap):
        if '\\noselect' in f['attrs'] or '\\nonexistent' in f['attrs']:
            continue
        msgs = fetch_all(imap, f['name'])
        entries = []
        for uid, d in msgs.items():
            body = d.get('BODY[]')
            if body is None:
                raise ImapParseError('no BODY[] for UID %d in %s'
                                     % (uid, f['name']))
            flags = tuple(sorted(x for x in d.get('FLAGS', [])
                                 if x.lower() != '\\recent'))
            e = (hashlib.sha256(body).hexdigest(), flags,
                 d['INTERNALDATE'])
            entries.append(e + (uid,) if with_uids else e)
        entries.sort(key=(lambda e: e[3]) if with_uids else None)
        snap[f['key']] = entries
    return snap


def count(snap):
    """Total number of messages in a snapshot."""
    return sum(len(v) for v in snap.values())


# ----------------------------------------------------------------- mapping

def map_name(key, dst_sep, src_special=None, dst_special=None):
    """The destination key the mover should give a source folder key:
    a folder with a special-use attribute that some destination folder also
    has goes to that destination folder; otherwise every level containing
    dst_sep gets '%' -> '%25' and dst_sep -> '%XX' (daemon/mailbox.h)."""
    src_special = src_special or {}
    dst_special = dst_special or {}
    use = src_special.get(key)
    if use:
        for dkey, duse in dst_special.items():
            if duse == use:
                return dkey
    if key.upper() == 'INBOX':
        return 'INBOX'
    levels = [_unkey_level(l) for l in key.split('/')]
    out = []
    for l in levels:
        if dst_sep and dst_sep in l:
            l = l.replace('%', '%25').replace(dst_sep, '%%%02X' % ord(dst_sep))
        out.append(_key_level(l))
    return '/'.join(out)


def map_names(keys, dst_sep, src_special=None, dst_special=None):
    return {map_name(k, dst_sep, src_special, dst_special) for k in keys}


def map_snapshot(snap, dst_sep, src_special=None, dst_special=None):
    """A source snapshot as the destination's snapshot should look after a
    copy (folder keys mapped with map_name)."""
    out = {}
    for k, v in snap.items():
        nk = map_name(k, dst_sep, src_special, dst_special)
        if nk in out:
            raise ValueError('two source folders map to %r' % nk)
        out[nk] = sorted(e[:3] for e in v)
    return out


def diff_snapshots(want, got, limit=30):
    """Human-readable differences (empty list when equal)."""
    diffs = []
    for k in sorted(set(want) | set(got)):
        if k not in got:
            diffs.append('folder %r missing (%d messages expected)'
                         % (k, len(want[k])))
            continue
        if k not in want:
            diffs.append('unexpected folder %r (%d messages)'
                         % (k, len(got[k])))
            continue
        w = sorted(e[:3] for e in want[k])
        g = sorted(e[:3] for e in got[k])
        if w == g:
            continue
        diffs.append('folder %r: %d messages expected, %d present'
                     % (k, len(w), len(g)))
        # Pair by body hash to show flag/date differences and dups/losses.
        from collections import Counter
        wb, gb = Counter(e[0] for e in w), Counter(e[0] for e in g)
        for h in sorted(set(wb) | set(gb)):
            if wb[h] != gb[h]:
                diffs.append('  body %s…: expected %d copies, found %d'
                             % (h[:12], wb[h], gb[h]))
        wm = {}
        for e in w:
            wm.setdefault(e[0], []).append(e[1:])
        for e in g:
            exp = wm.get(e[0])
            if exp and e[1:] not in exp and len(exp) == 1 and \
                    wb[e[0]] == gb[e[0]]:
                diffs.append('  body %s…: expected flags %s date %d, got '
                             'flags %s date %d' % (e[0][:12], exp[0][0],
                                                   exp[0][1], e[1], e[2]))
    if len(diffs) > limit:
        diffs = diffs[:limit] + ['... %d more' % (len(diffs) - limit)]
    return diffs


def assert_snapshots_equal(want, got, what='destination'):
    d = diff_snapshots(want, got)
    if d:
        raise AssertionError('%s differs from the expected snapshot:\n  %s'
                             % (what, '\n  '.join(d)))
