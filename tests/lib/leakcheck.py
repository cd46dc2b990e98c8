"""The suite's password-leak check, over the whole pytest session.

Whatever makes a password registers it (CHECK.secret(): the Dovecot users
and master users in dovecot.py, the tests' wrong passwords, and every
*PASSWORD* variable in the environment of a mailshiftctl). Every mailshiftd
and mailshiftctl the suite starts is seen as subprocess.Popen starts it (the
session replaces subprocess.Popen with a subclass, so a test that runs a
binary directly is seen too), with what the process writes: the file its
stdout and stderr go to, the output a test captures (communicate()), the
store named by --store or by [store] path in its -c config (with -wal,
-journal and -shm), its sanitizer reports (log_path in ASAN_OPTIONS or
UBSAN_OPTIONS); the harness adds state directories (register_files()).

While the session runs, a thread reads the argv (/proc/PID/cmdline) of
those processes and of their children every 50 ms, and of every process
below pytest every 0.5 s; each is also read when it starts and before it
is stopped. The environment is not read: it is the documented way to give
mailshiftctl a password. Registered files are hard-linked into an evidence
directory as they appear, every 0.5 s while their process runs (a store's
-wal lives only while it is open), when it exits and before a test removes
their directory, so that what every process wrote is still there at the
end.

At the end of the session (conftest.py: pytest_sessionfinish, after every
fixture is torn down) finish() scans all of it, the stores also as an SQL
dump, and the core files the processes left, for every secret in every
encoding (encodings()). A finding names whose secret it is, the encoding
and where (file and offset, or process and argument), never the secret.

Scanner (the same matching, for a test's own quick check):
    Scanner({b'pw': 'label'}).scan(data) -> [(offset, label, encoding)]
"""

import base64
import binascii
import glob
import inspect
import json
import os
import re
import resource
import shlex
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse

BINARIES = ('mailshiftd', 'mailshiftctl')
MIN_SECRET = 6      # shorter values ('x' in a usage test) are no passwords
MIN_NEEDLE = 8      # shorter base64 runs would turn up by chance
CHUNK = 16 << 20
GREP = shutil.which('grep')
GREP_FROM = 1 << 20  # bytes: smaller data is searched by Python
SAMPLE_EVERY = 0.05  # s, the mailshift processes and their children
TREE_EVERY = 10      # samples: every process below pytest
SQLITE_SUFFIXES = ('', '-wal', '-journal', '-shm')
B64_CHARS = frozenset(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
                      b'0123456789+/-_=')


# ------------------------------------------------------------ encodings

def _b64_cores(pw):
    """[(base64 text, name)]: whatever bytes come before it, base64 of a
    text holding pw holds one of these (the groups of three bytes that lie
    wholly inside pw, for each of the three offsets pw can start at). So
    they find base64 of pw (AUTH LOGIN, or a base64 dump) and SASL PLAIN
    "authzid NUL user NUL pw" for any user. Shorter than MIN_NEEDLE: None."""
    out = []
    for skip in range(3):
        part = pw[skip:]
        part = part[:len(part) // 3 * 3]
        for enc, name in ((base64.b64encode, 'base64'),
                          (base64.urlsafe_b64encode, 'base64url')):
            core = enc(part)
            out.append((core if len(core) >= MIN_NEEDLE else None, name))
    return out


def encodings(pw, users=()):
    """[(needle, encoding name)] for the secret pw (bytes), each needle
    once: raw, IMAP-quoted, JSON-escaped, URL-encoded, hex, base64 at every
    offset. For a secret too short for the base64 cores, base64 of it and
    SASL PLAIN of it for each of users (with no authzid or one of users),
    spelled out."""
    text = pw.decode('utf-8', 'replace')
    out = [(pw, 'raw'),
           (pw.replace(b'\\', b'\\\\').replace(b'"', b'\\"'), 'IMAP-quoted'),
           (json.dumps(text)[1:-1].encode(), 'JSON-escaped'),
           (urllib.parse.quote(pw, safe='').encode(), 'URL-encoded'),
           (pw.hex().encode(), 'hex'), (pw.hex().upper().encode(), 'hex')]
    cores = _b64_cores(pw)
    out += [c for c in cores if c[0] is not None]
    if any(c[0] is None for c in cores):
        out.append((base64.b64encode(pw), 'base64'))
        names = sorted({u.encode() if isinstance(u, str) else u
                        for u in users})
        for u in names:
            for authz in [b''] + names:
                out.append((base64.b64encode(authz + b'\0' + u + b'\0' + pw),
                            'base64'))
    seen, uniq = set(), []
    for needle, name in out:
        if needle not in seen:
            seen.add(needle)
            uniq.append((needle, name))
    return uniq


def _what_base64(data, start, end, pw):
    """What the base64 run around data[start:end] holds: the encoding's
    name for the report (user names, never the password)."""
    a, b = start, end
    while a > 0 and start - a < 4096 and data[a - 1] in B64_CHARS:
        a -= 1
    while b < len(data) and b - end < 4096 and data[b] in B64_CHARS:
        b += 1
    run = bytes(data[a:b]).rstrip(b'=')
    for lead in range(4):
        part = run[lead:]
        part += b'=' * (-len(part) % 4)
        for dec in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                text = dec(part)
            except (binascii.Error, ValueError):
                continue
            if pw not in text:
                continue
            if text == pw:
                return 'base64 of the password (AUTH LOGIN)'
            m = re.fullmatch(rb'([^\0]*)\0([^\0]*)\0(.*)', text, re.S)
            if m and m.group(3) == pw:
                return 'SASL PLAIN (user %r, authzid %r)' % (
                    m.group(2).decode(errors='replace'),
                    m.group(1).decode(errors='replace'))
            return 'base64 of a text holding the password'
    return 'base64 (inside a longer base64 run)'


class Scanner:
    """Finds every encoding of every secret in bytes. secrets: {secret
    bytes: label}; users: user names for the short-secret SASL forms.

    Files and big data go through grep -F (Aho-Corasick: one pass however
    many needles; Python's find, one pass per needle, takes minutes over a
    session's logs), small data through bytes.find."""

    def __init__(self, secrets, users=()):
        self.needles = {}           # needle -> (secret, label, encoding)
        for pw, label in secrets.items():
            pw = pw.encode() if isinstance(pw, str) else pw
            if len(pw) < MIN_SECRET:
                continue
            for needle, name in encodings(pw, users):
                self.needles.setdefault(needle, (pw, label, name))
        # grep reads a pattern per line: a needle with a newline in it (a
        # password holding one, raw) is searched for by Python
        self.by_python = [n for n in self.needles if b'\n' in n]
        self.by_grep = [n for n in self.needles if b'\n' not in n]
        self.longest = max([len(n) for n in self.needles] or [1])

    def _hit(self, data, i, needle):
        """(offset, label, encoding) of needle at data[i:]."""
        pw, label, name = self.needles[needle]
        if name in ('base64', 'base64url'):             # which one?
            name = _what_base64(data, i, i + len(needle), pw)
        return i, label, name

    def _find(self, data, needles):
        for needle in needles:
            i = data.find(needle)
            while i >= 0:
                yield i, needle
                i = data.find(needle, i + 1)

    def scan(self, data):
        """[(offset, label, encoding)] of every occurrence in data."""
        if GREP and len(data) > GREP_FROM:
            return self._grep(data=data)
        return sorted(self._hit(data, i, n)
                      for i, n in self._find(data, self.needles))

    def scan_file(self, path):
        """scan() over a file of any size."""
        if GREP:
            return self._grep(path=path)
        return self._scan_chunks(path, list(self.needles))

    def _scan_chunks(self, path, needles):
        """Python's search over a file read in chunks that overlap by the
        longest needle (a hit wholly inside the overlap was found in the
        chunk before)."""
        found = []
        with open(path, 'rb') as f:
            pos, keep = 0, b''
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                data = keep + chunk
                base = pos - len(keep)
                for i, n in self._find(data, needles):
                    if base + i + len(n) > pos:
                        off, label, name = self._hit(data, i, n)
                        found.append((base + off, label, name))
                keep = data[-(self.longest - 1):] if self.longest > 1 \
                    else b''
                pos += len(chunk)
        return sorted(found)

    def _grep(self, path=None, data=None):
        if not self.by_grep:
            return []
        with tempfile.NamedTemporaryFile(prefix='leakcheck-') as pats:
            pats.write(b'\n'.join(self.by_grep) + b'\n')
            pats.flush()
            r = subprocess.run(
                [GREP, '-F', '-a', '-b', '-o', '-f', pats.name] +
                ([path] if path else []), input=data,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=dict(os.environ, LC_ALL='C'))
        if r.returncode > 1:
            raise RuntimeError('grep over %s: %s' % (
                path or 'data', r.stderr.decode(errors='replace')))
        found = []
        f = open(path, 'rb') if path else None
        try:
            for line in r.stdout.splitlines():
                off, needle = line.split(b':', 1)
                off = int(off)
                if f is None:
                    found.append(self._hit(data, off, needle))
                    continue
                # around it, to tell which base64 it is
                at = max(0, off - 4096)
                f.seek(at)
                i, label, name = self._hit(f.read(len(needle) + 8192),
                                           off - at, needle)
                found.append((at + i, label, name))
        finally:
            if f is not None:
                f.close()
        if self.by_python:
            found += self._scan_chunks(path, self.by_python) if path else \
                [self._hit(data, i, n)
                 for i, n in self._find(data, self.by_python)]
        return sorted(found)


# ------------------------------------------------------------ the registry

def _current_test():
    return os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]


def _read(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None


def _children(pid):
    """PIDs of pid's children (every thread's: a child's parent is the
    thread that forked it)."""
    kids = []
    try:
        tids = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return kids
    for t in tids:
        data = _read('/proc/%d/task/%s/children' % (pid, t))
        if data:
            kids += [int(x) for x in data.split()]
    return kids


def _cmdline(pid):
    """/proc/PID/cmdline; empty for a moment while the process execs (its
    parent goes on before the new argv is in place): then read again."""
    for _ in range(50):
        data = _read('/proc/%d/cmdline' % pid)
        if data:
            return data
        st = _read('/proc/%d/stat' % pid)
        if not st or st.rsplit(b')', 1)[-1].split()[:1] in ([b'Z'], [b'X']):
            return data             # gone, or a zombie: no argv any more
        time.sleep(0.002)
    return data


def _config_store(path):
    """[store] path of a mailshift config file, or None."""
    section = None
    try:
        with open(path, errors='replace') as f:
            for line in f:
                line = line.strip()
                if line.startswith('['):
                    section = line.strip('[] ')
                elif section == 'store' and '=' in line:
                    k, v = line.split('=', 1)
                    if k.strip() == 'path':
                        return v.strip()
    except OSError:
        pass
    return None


def _argv_list(args, shell):
    if isinstance(args, (str, bytes, os.PathLike)):
        args = os.fsdecode(args)
        return shlex.split(args) if shell else [args]
    return [os.fsdecode(a) for a in args]


class Kept:
    """A registered file kept in the evidence directory (dst): a hard
    link, or a copy renewed at each keep() when it cannot be linked."""

    def __init__(self, dst, label, path):
        self.dst = dst
        self.label = label
        self.path = path
        self.linked = False


class LeakCheck:
    """See the module docstring. One of these per session (CHECK)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.active = False
        self.secrets = {}       # bytes -> label (the first registration)
        self.users = set()
        self.files = {}         # path -> label
        self.dirs = {}          # dir -> (label, set of excluded paths)
        self.pid_files = {}     # pid -> [paths and dirs]
        self.watched = {}       # pid -> label
        self.argv = {}          # argv bytes (NUL-separated) -> where
        self.blobs = {}         # bytes -> label (the first)
        self.cwds = set()
        self.kept = {}          # (dev, ino) -> Kept
        self.evidence_dir = None
        self.processes = 0
        self.samples = 0
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = None
        self._popen = None

    # -- registration (works outside a session too: then only recorded)

    def secret(self, value, label, user=None):
        """Registers a password (str or bytes) with a label saying whose it
        is (printed in reports; the value never is)."""
        if value is None:
            return
        v = value.encode() if isinstance(value, str) else bytes(value)
        with self.lock:
            self.secrets.setdefault(v, label)
            if user:
                self.users.add(user)

    def register_files(self, label, paths=(), dirs=(), exclude=(), pid=None):
        """Files (and directories: every regular file in them but exclude)
        a mailshift process writes. A path may not exist yet."""
        with self.lock:
            for p in paths:
                self.files.setdefault(os.path.abspath(p), label)
            for d in dirs:
                self.dirs[os.path.abspath(d)] = (
                    label, {os.path.abspath(e) for e in exclude})
            if pid is not None:
                self.pid_files.setdefault(pid, []).extend(
                    [os.path.abspath(p) for p in list(paths) + list(dirs)])
        self.keep(list(paths) + list(dirs))

    def blob(self, label, data):
        """Output of a process, captured by the test (not in a file)."""
        if data:
            if isinstance(data, str):
                data = data.encode(errors='surrogateescape')
            with self.lock:
                self.blobs.setdefault(bytes(data), label)

    # -- processes

    def watch(self, pid, label, argv=None, env=None, cwd=None):
        """A mailshift process just started: its argv as given, and as
        /proc shows it now; *PASSWORD* variables of its environment are
        secrets."""
        with self.lock:
            self.watched[pid] = label
            self.processes += 1
            self.cwds.add(os.path.abspath(cwd or os.getcwd()))
            if argv:
                self._argv(b'\0'.join(os.fsencode(a) for a in argv),
                           '%s, argv given at its start' % label, True)
        for k, v in (env or {}).items():
            if 'PASSWORD' in k.upper():
                self.secret(v, 'the %s given to %s' % (k, label))
        self.sample([pid])

    def _argv(self, data, where, named=False):
        """One argv seen: where says whose (a watched process's name wins
        over 'process PID')."""
        with self.lock:
            if named or data not in self.argv:
                self.argv[data] = where

    def sample(self, pids=None, tree=False):
        """Reads the argv of pids (default: every watched process), of
        their descendants and, with tree, of every process below this
        one."""
        with self.lock:
            todo = list(self.watched if pids is None else pids)
            labels = dict(self.watched)
        if tree:
            todo.append(os.getpid())
        seen = set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo += _children(pid)
            if pid == os.getpid():
                continue
            data = _cmdline(pid)
            if data:
                what = labels.get(pid) or 'process %d (%s)' % (
                    pid, os.path.basename(data.split(b'\0')[0]).decode(
                        errors='replace'))
                self._argv(data.rstrip(b'\0'), what, pid in labels)
        with self.lock:
            self.samples += 1

    def exited(self, pid):
        """A watched process is gone: keep what it wrote."""
        with self.lock:
            self.watched.pop(pid, None)
            paths = self.pid_files.pop(pid, [])
        self.keep(paths)

    def _run(self):
        n = 0
        while not self._stop.wait(SAMPLE_EVERY):
            try:
                tree = n % TREE_EVERY == 0
                self.sample(tree=tree)
                if tree:        # a -wal lives only while its store is open
                    with self.lock:
                        live = [p for pid in self.watched
                                for p in self.pid_files.get(pid, ())]
                    self.keep(live)
            except Exception:       # noqa: BLE001 (a process went away)
                pass
            n += 1

    # -- evidence

    def _evidence(self):
        if self.evidence_dir is None:
            self.evidence_dir = tempfile.mkdtemp(prefix='mailshift-leaks-')
        return self.evidence_dir

    def _keep_one(self, path, label):
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        key = (st.st_dev, st.st_ino)
        with self.lock:
            k = self.kept.get(key)
            if k is not None and k.linked:
                return              # the same inode: the link sees it all
            if k is None:
                k = Kept(os.path.join(self._evidence(), '%05d-%s' % (
                    len(self.kept), os.path.basename(path))), label, path)
                try:
                    os.link(path, k.dst)
                    k.linked = True
                except OSError:
                    pass
            if not k.linked:
                try:            # another file system: a copy, renewed
                    shutil.copyfile(path, k.dst)
                except OSError:
                    return
            self.kept[key] = k

    def keep(self, paths=None):
        """Hard-links registered files (default: all of them) into the
        evidence directory, with a store's -wal, -journal and -shm."""
        if not self.active:
            return
        with self.lock:
            files = dict(self.files)
            dirs = dict(self.dirs)
        want = files if paths is None else {
            os.path.abspath(p): files.get(os.path.abspath(p), '')
            for p in paths}
        for p, label in want.items():
            if p in dirs:
                label, exclude = dirs[p]
                try:
                    names = os.listdir(p)
                except OSError:
                    continue
                for n in names:
                    f = os.path.join(p, n)
                    if f not in exclude:
                        self._keep_one(f, label)
                continue
            for suffix in SQLITE_SUFFIXES:
                self._keep_one(p + suffix, label or files.get(p, p))
        if paths is None:
            self.keep(list(dirs))

    def before_remove(self, d):
        """Called before a directory is removed: keeps every registered
        file and directory in it."""
        d = os.path.abspath(d) + os.sep
        with self.lock:
            inside = [p for p in list(self.files) + list(self.dirs)
                      if (p + os.sep).startswith(d)]
        self.keep(inside)

    # -- the session

    def start(self, watch_popen=True):
        """Begins the session: Popen is watched, the sampler runs."""
        self.active = True
        self.started_at = time.time()
        if watch_popen:
            self._popen = subprocess.Popen
            _WatchedPopen.check = self
            subprocess.Popen = _WatchedPopen
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='leakcheck-sampler')
        self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._popen is not None:
            subprocess.Popen = self._popen
            self._popen = None

    def core_files(self):
        """(core files written since the session began, notes saying where
        cores go and whether the processes could write any)."""
        notes = []
        pattern = (_read('/proc/sys/kernel/core_pattern') or b'core') \
            .decode(errors='replace').strip()
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        lim = lambda v: 'unlimited' if v == resource.RLIM_INFINITY \
            else str(v)         # noqa: E731
        notes.append('core files: core_pattern %r, RLIMIT_CORE of the run '
                     '%s (soft) / %s (hard); mailshiftd sets its own to 0 '
                     'and is not dumpable; ASan disables core dumps'
                     % (pattern, lim(soft), lim(hard)))
        if pattern.startswith('|'):
            notes.append('core files: core_pattern pipes cores to a '
                         'program, none can be scanned here')
            return [], notes
        name = re.sub(r'%[^%]', '*', pattern).replace('%%', '%')
        uses_pid = (_read('/proc/sys/kernel/core_uses_pid') or b'0').strip()
        names = [name] + ([name + '.*'] if uses_pid == b'1' and
                          '%p' not in pattern else [])
        with self.lock:
            dirs = set(self.cwds) | {os.path.dirname(p) for p in self.files}
            dirs |= set(self.dirs)
        if os.path.isabs(name):
            dirs = {''}
        found = []
        for d in sorted(dirs):
            for n in names:
                for f in glob.glob(os.path.join(d, n)):
                    try:
                        st = os.stat(f)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode) and \
                            st.st_mtime >= self.started_at - 1:
                        found.append(f)
        return sorted(set(found)), notes

    def _sqlite_dump(self, k):
        """(the SQL text of the kept SQLite file k (a copy of it, with the
        last -wal kept of the same path), None) or (None, an error)."""
        tmp = tempfile.mkdtemp(prefix='dump-', dir=self._evidence())
        path = k.path
        try:
            db = os.path.join(tmp, 'db')
            shutil.copyfile(k.dst, db)
            with self.lock:
                wal = [o.dst for o in self.kept.values()
                       if o.path == path + '-wal']
            if wal:
                shutil.copyfile(wal[-1], db + '-wal')
            con = sqlite3.connect(db)
            try:
                return '\n'.join(con.iterdump()).encode(
                    errors='surrogateescape'), None
            finally:
                con.close()
        except (OSError, sqlite3.Error) as e:
            return None, str(e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def finish(self):
        """Ends the session and scans everything: (findings, notes), each
        a list of lines. Removes the evidence directory."""
        self.stop()
        self.keep()
        t0 = time.monotonic()
        with self.lock:
            scanner = Scanner(self.secrets, self.users)
            kept = list(self.kept.values())
            blobs = [(label, data) for data, label in self.blobs.items()]
            argv = list(self.argv.items())
            nsecrets = len([s for s in self.secrets if len(s) >= MIN_SECRET])
            short = len(self.secrets) - nsecrets
        findings = {}

        def add(hits, where, unit='offset'):
            for off, label, enc in hits:
                k = (label, enc, where, unit)
                first, n = findings.get(k, (off, 0))
                findings[k] = (min(first, off), n + 1)

        notes, dumps, size = [], 0, 0
        for k in kept:
            size += os.path.getsize(k.dst)
            where = '%s (%s)' % (k.path, k.label)
            add(scanner.scan_file(k.dst), where)
            with open(k.dst, 'rb') as f:
                is_db = f.read(16) == b'SQLite format 3\0'
            if is_db:
                text, err = self._sqlite_dump(k)
                if text is None:
                    notes.append('could not dump %s: %s' % (where, err))
                else:
                    dumps += 1
                    add(scanner.scan(text), where + ' (SQL dump)')
        for label, data in blobs:
            add(scanner.scan(data), label)
        for data, where in argv:
            add([(data.count(b'\0', 0, off), label, enc)
                 for off, label, enc in scanner.scan(data)],
                'the argv of ' + where, 'argument')
        cores, core_notes = self.core_files()
        for c in cores:
            add(scanner.scan_file(c), 'core file %s' % c)
        notes = ['%d secrets (%d too short to check) in every encoding '
                 '(raw, IMAP-quoted, JSON, URL, hex, base64 at every '
                 'offset: AUTH LOGIN, SASL PLAIN)' % (nsecrets, short),
                 '%d files kept of %d mailshift processes (%d SQLite '
                 'dumps), %d captured outputs, %d distinct argv from %d '
                 'samples, %d core files; %.1f MB of files scanned in %.0f s'
                 % (len(kept), self.processes, dumps, len(blobs), len(argv),
                    self.samples, len(cores), size / 1e6,
                    time.monotonic() - t0)] + core_notes + notes
        lines = []
        for (label, enc, where, unit), (off, n) in sorted(findings.items()):
            lines.append('%s, %s, in %s at %s %d%s' % (
                label, enc, where, unit, off,
                ' (%d times)' % n if n > 1 else ''))
        # Labels come from paths and argv[0]: mask a secret there too.
        for v in sorted(self.secrets, key=len, reverse=True):
            if len(v) >= MIN_SECRET:
                t = v.decode(errors='replace')
                lines = [x.replace(t, '<secret>') for x in lines]
        if self.evidence_dir is not None:
            shutil.rmtree(self.evidence_dir, ignore_errors=True)
            self.evidence_dir = None
        self.active = False
        return lines, notes


class _WatchedPopen(subprocess.Popen):
    """subprocess.Popen during the session: a mailshiftd or mailshiftctl
    it starts is watched (LeakCheck.watch), with the files it writes."""

    check = None
    _sig = inspect.signature(subprocess.Popen.__init__)

    def __init__(self, args, *a, **kw):
        super().__init__(args, *a, **kw)
        self._leak_label = None
        try:
            self._leak_watch(args, a, kw)
        except Exception:   # noqa: BLE001 (never break the test's Popen)
            pass

    def _leak_watch(self, args, a, kw):
        bound = self._sig.bind(self, args, *a, **kw).arguments
        argv = _argv_list(args, bound.get('shell', False))
        names = [os.path.basename(x) for x in argv]
        binary = next((n for n in names if n in BINARIES), None)
        if binary is None:
            return
        at = names.index(binary)
        label = '%s (pid %d, %s)' % (binary, self.pid,
                                     _current_test() or 'no test')
        self._leak_label = label
        c = self.check
        env = bound.get('env')
        c.watch(self.pid, label, argv, os.environ if env is None else env,
                bound.get('cwd'))
        paths = []
        for which in ('stdout', 'stderr'):
            f = bound.get(which)
            fd = f if isinstance(f, int) else getattr(f, 'fileno',
                                                       lambda: -1)()
            if fd is not None and fd > 2:
                try:
                    p = os.readlink('/proc/self/fd/%d' % fd)
                    if os.path.isfile(p):
                        paths.append(p)
                except OSError:
                    pass
        # A sanitizer build's reports (tests/asan-check): log_path.PID
        for var in ('ASAN_OPTIONS', 'UBSAN_OPTIONS'):
            m = re.search(r'(?:^|:)log_path=([^:]+)',
                          (os.environ if env is None else env).get(var, ''))
            if m:
                paths.append('%s.%d' % (m.group(1), self.pid))
        rest = argv[at + 1:]
        for i, x in enumerate(rest):
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            if x == '--store' and nxt:
                paths.append(os.path.join(bound.get('cwd') or '', nxt))
            elif x.startswith('--store='):
                paths.append(x.split('=', 1)[1])
            elif x in ('-c', '--config') and nxt:
                store = _config_store(nxt)
                if store:
                    paths.append(store)
        c.register_files(label, paths, pid=self.pid)

    def communicate(self, *a, **kw):
        if self._leak_label is not None and self.returncode is None:
            self.check.sample([self.pid])
        out, err = super().communicate(*a, **kw)
        if self._leak_label is not None:
            self.check.blob('stdout of ' + self._leak_label, out)
            self.check.blob('stderr of ' + self._leak_label, err)
        return out, err

    def wait(self, *a, **kw):
        rc = super().wait(*a, **kw)
        self._leak_exit()
        return rc

    def poll(self):
        rc = super().poll()
        self._leak_exit()
        return rc

    def _leak_exit(self):
        if getattr(self, '_leak_label', None) is not None and \
                self.returncode is not None and \
                not getattr(self, '_leak_gone', False):
            self._leak_gone = True
            self.check.exited(self.pid)


CHECK = LeakCheck()


def _failure_report(session, leaks):
    """The findings as a failed test of their own: counted, listed in the
    FAILURES section and the short summary (-rf) like any failure."""
    try:
        from _pytest.reports import TestReport
        rep = TestReport('tests/lib/leakcheck.py::session',
                         ('tests/lib/leakcheck.py', 0, 'leak check'), {},
                         'failed', 'password leaks:\n' + '\n'.join(leaks),
                         'call')
        session.config.hook.pytest_runtest_logreport(report=rep)
    except Exception:   # noqa: BLE001 (the exit status says it anyway)
        pass


# make check runs the suite over pytest-xdist workers: each worker is a
# session of its own, with its own check; the controller runs no test and
# starts no check, and prints what each worker found (worker_done()).
WORKERS = []


def role(config):
    """'worker' (an xdist worker), 'controller' (the xdist controller,
    which runs no test) or 'alone' (a plain pytest session)."""
    if getattr(config, 'workerinput', None) is not None:
        return 'worker'
    opt = getattr(config, 'option', None)
    if getattr(opt, 'dist', 'no') not in ('no', None) and \
            getattr(opt, 'numprocesses', None):
        return 'controller'
    return 'alone'


def worker_done(node):
    """conftest.py's pytest_testnodedown (controller): keeps the lines a
    worker's check sent back."""
    out = getattr(node, 'workeroutput', None) or {}
    WORKERS.append((getattr(getattr(node, 'gateway', None), 'id', '?'),
                    out.get('leakcheck')))


def _reporter(session, title, red=False):
    """A function that writes a line of the check's report: to pytest's
    terminal, under a separator with title, or to stdout."""
    tr = session.config.pluginmanager.get_plugin('terminalreporter')

    def say(line, **kw):
        if tr is not None:
            tr.write_line(line, **kw)
        else:
            print(line)
    if tr is not None:
        tr.ensure_newline()
        tr.write_sep('-', title, red=red)
    return say


def _controller_finish(session):
    say = _reporter(session, 'leak check (tests/lib/leakcheck.py), by worker')
    leaks = []
    for wid, lines in sorted(WORKERS, key=lambda w: str(w[0])):
        if lines is None:       # a worker that crashed: its check is lost
            lines = ['LEAK: (worker %s sent no result: its leak check did '
                     'not run)' % wid]
        for line in lines:
            say('%s: %s' % (wid, line), red=line.startswith('LEAK'))
            if line.startswith('LEAK: '):
                leaks.append('%s: %s' % (wid, line[6:]))
    if leaks:
        if session.exitstatus in (0, 5):
            session.exitstatus = 1
        _failure_report(session, leaks)


def pytest_sessionfinish(session, check=None):
    """conftest.py's pytest_sessionfinish: CHECK.finish(), its notes and
    findings printed, and a finding fails the run."""
    r = role(session.config)
    if r == 'controller':
        _controller_finish(session)
        return
    leaks, notes = (check or CHECK).finish()
    if r == 'worker':       # the controller prints it and fails the run
        session.config.workeroutput['leakcheck'] = \
            ['leak check: ' + n for n in notes] + \
            ['LEAK: ' + line for line in leaks] + \
            (['leak check: no secret found'] if not leaks else [])
        return
    say = _reporter(session, 'leak check (tests/lib/leakcheck.py)',
                    red=bool(leaks))
    for n in notes:
        say('leak check: ' + n)
    for line in leaks:
        say('LEAK: ' + line, red=True)
    if leaks:
        say('leak check: %d leaks: a password reached a log, the store, a '
            'core file, captured output or argv' % len(leaks), red=True)
        if session.exitstatus in (0, 5):     # passed, or nothing ran
            session.exitstatus = 1
        _failure_report(session, leaks)
    else:
        say('leak check: no secret found')
