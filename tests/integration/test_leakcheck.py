"""Tests of the session's leak check itself (tests/lib/leakcheck.py): a
check that cannot fail proves nothing, so each encoding of a password is
planted where a mailshift process would write it, and the check must name
it, the encoding and the place, without ever printing the password.

These use a LeakCheck of their own (not the session's CHECK, which must
stay clean), except test_session_sees_direct_runs, which checks that the
session's CHECK sees a mailshiftctl run straight through subprocess.
"""

import base64
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

import leakcheck

PW = 'Lk-alice-Pw-9q3z'            # an ordinary one
ODD = 'Lk "odd\\ Pw/7%'            # needs quoting in IMAP, JSON, URLs
SHORT = 'Lk-7pw'                   # too short for the base64 cores
NL = 'Lk-dave\nPw-5t'               # no grep pattern can hold it raw
SECRETS = {PW.encode(): 'the password of alice',
           ODD.encode(): 'the odd password of bob',
           SHORT.encode(): 'the short password of carol',
           NL.encode(): 'the password of dave'}


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


# (what a log line would hold, the secret's label, the encoding reported)
PLANTS = [
    ('LOGIN alice %s' % PW, 'the password of alice', 'raw'),
    ('a LOGIN bob "%s"' % ODD.replace('\\', '\\\\').replace('"', '\\"'),
     'the odd password of bob', 'IMAP-quoted'),
    ('{"password": "%s"}' % ODD.replace('\\', '\\\\').replace('"', '\\"'),
     'the odd password of bob', 'IMAP-quoted'),      # JSON escapes alike
    ('imap://bob:%s@host' % 'Lk%20%22odd%5C%20Pw%2F7%25',
     'the odd password of bob', 'URL-encoded'),
    ('dump %s' % PW.encode().hex(), 'the password of alice', 'hex'),
    ('DUMP %s' % PW.encode().hex().upper(), 'the password of alice', 'hex'),
    ('C: %s' % b64(PW), 'the password of alice',
     'base64 of the password (AUTH LOGIN)'),
    ('AUTHENTICATE PLAIN %s' % b64('\0alice\0' + PW),
     'the password of alice', "SASL PLAIN (user 'alice', authzid '')"),
    ('AUTH PLAIN %s' % b64('alice\0master\0' + PW),
     'the password of alice', "SASL PLAIN (user 'master', authzid 'alice')"),
    ('AUTH PLAIN %s' % b64('\0bob\0' + ODD),
     'the odd password of bob', "SASL PLAIN (user 'bob', authzid '')"),
    ('x %s' % base64.urlsafe_b64encode(b'\0bob\0' + ODD.encode()).decode(),
     'the odd password of bob', "SASL PLAIN (user 'bob', authzid '')"),
    ('blob %s' % b64('some text around %s and more' % PW),
     'the password of alice', 'base64 of a text holding the password'),
    ('C: %s' % b64(SHORT), 'the short password of carol',
     'base64 of the password (AUTH LOGIN)'),
    ('AUTH PLAIN %s' % b64('\0carol\0' + SHORT),
     'the short password of carol', "SASL PLAIN (user 'carol', authzid '')"),
    ('PASS %s' % NL, 'the password of dave', 'raw'),
    ('AUTH PLAIN %s' % b64('\0dave\0' + NL), 'the password of dave',
     "SASL PLAIN (user 'dave', authzid '')"),
    ('AUTH PLAIN %s' % b64('alice\0carol\0' + SHORT),
     'the short password of carol',
     "SASL PLAIN (user 'carol', authzid 'alice')"),
]


def scanner():
    return leakcheck.Scanner(SECRETS, users=('alice', 'bob', 'carol'))


@pytest.mark.parametrize('engine', ['grep', 'python'])
@pytest.mark.parametrize('line,label,encoding', PLANTS,
                         ids=[p[2].split(' (')[0] + '-%d' % i
                              for i, p in enumerate(PLANTS)])
def test_scanner_finds_each_encoding(tmp_path, monkeypatch, engine, line,
                                     label, encoding):
    """Each encoding, in a file, through grep -F and through the Python
    search (used without grep, and for needles with a newline)."""
    if engine == 'python':
        monkeypatch.setattr(leakcheck, 'GREP', None)
    else:
        assert leakcheck.GREP, 'no grep'
    log = tmp_path / 'mailshiftd.log'
    head = b'2024-01-01 mailshiftd: imap: something harmless\n'
    log.write_bytes(head + line.encode() + b'\n' + head)
    hits = scanner().scan_file(str(log))
    assert (label, encoding) in [(h[1], h[2]) for h in hits], hits
    for off, lab, enc in hits:
        assert len(head) <= off < len(head) + len(line), hits


def test_scanner_clean_text():
    """What mailshiftd logs about a login holds no encoding of it."""
    text = (b'imap: login alice from 127.0.0.1: ok (source)\n'
            b'pop3: AUTH PLAIN from 127.0.0.1: bad credentials\n' +
            base64.b64encode(os.urandom(3000)) + b'\n')
    assert scanner().scan(text) == []


def test_scanner_across_chunks(tmp_path, monkeypatch):
    """Without grep a file is read in chunks: a password across a boundary
    is found, once, as in one piece. grep finds the same."""
    data_at = []
    for at in range(40, 80):
        data_at.append(b'.' * at + b'AUTH PLAIN ' +
                       b64('\0alice\0' + PW).encode() + b' ' +
                       PW.encode() + b'.' * 100)
    want = [scanner().scan(d) for d in data_at]
    f = tmp_path / 'f'
    for d, w in zip(data_at, want):
        assert len(w) == 2, w
        f.write_bytes(d)
        assert scanner().scan_file(str(f)) == w
    monkeypatch.setattr(leakcheck, 'CHUNK', 64)
    monkeypatch.setattr(leakcheck, 'GREP', None)
    for d, w in zip(data_at, want):
        f.write_bytes(d)
        assert scanner().scan_file(str(f)) == w


def test_scanner_big_data(monkeypatch):
    """Data past GREP_FROM goes through grep: the same findings as the
    Python search, at the right offsets."""
    data = b''.join(b'%08d %s\n' % (i, base64.b64encode(os.urandom(60)))
                    for i in range(3000))
    data += b'AUTH PLAIN ' + b64('\0bob\0' + ODD).encode() + b'\n' + data \
        + b'LOGIN alice ' + PW.encode() + b'\n'
    monkeypatch.setattr(leakcheck, 'GREP_FROM', 1000)
    got = scanner().scan(data)
    monkeypatch.setattr(leakcheck, 'GREP', None)
    assert got == scanner().scan(data)
    assert [(h[1], h[2]) for h in got] == [
        ('the odd password of bob', "SASL PLAIN (user 'bob', authzid '')"),
        ('the password of alice', 'raw')], got
    assert data[got[1][0]:].startswith(PW.encode())


def _child(*argv):
    """A python child that sleeps with argv after -c CODE; and one
    grandchild of its own that sleeps too."""
    code = ('import subprocess, sys, time\n'
            'g = subprocess.Popen([sys.executable, "-c", '
            '"import time; time.sleep(60)", sys.argv[1]])\n'
            'print(g.pid, flush=True)\n'
            'time.sleep(60)\n')
    p = subprocess.Popen([sys.executable, '-c', code] + list(argv),
                         stdout=subprocess.PIPE)
    grandchild = int(p.stdout.readline())
    return p, grandchild


def _stop(p, grandchild):
    for pid in (grandchild, p.pid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)


def test_check_finds_each_place(tmp_path):
    """A LeakCheck of its own, each encoding planted in one place a
    mailshift process writes: a log, a store (raw and through its SQL dump)
    and its -wal, a file in its state directory removed before the end,
    captured output, argv (given, sampled, a child's), a core file. Every
    one is reported with its place, the secret never."""
    c = leakcheck.LeakCheck()
    c.start(watch_popen=False)
    try:
        for pw, label in SECRETS.items():
            c.secret(pw, label, user=label.split()[-1])
        state = tmp_path / 'gw'
        state.mkdir()
        log = state / 'mailshiftd.log'
        store = state / 'mailshift.db'
        conf = state / 'mailshift.conf'
        conf.write_text('password = %s\n' % PW)      # ours: excluded
        c.register_files('mailshiftd T', [str(log), str(store)],
                         dirs=[str(state)], exclude=[str(conf)])
        log.write_text('LOGIN alice %s\n' % PW)
        con = sqlite3.connect(str(store))
        con.execute('PRAGMA journal_mode = WAL')
        con.execute('CREATE TABLE t (v TEXT)')
        con.execute('INSERT INTO t VALUES (?)',
                    ('x' + b64('\0bob\0' + ODD),))
        con.commit()
        (state / 'extra.state').write_text(PW.encode().hex())
        c.keep([str(state)])      # while the connection holds the -wal
        con.close()
        c.before_remove(str(state))
        shutil.rmtree(str(state))
        c.blob('stderr of mailshiftctl T', 'error: %s\n' % b64(SHORT))
        c.watch(999999999, 'mailshiftctl T', argv=['mailshiftctl', 'x',
                                                    '--password', PW])
        p, grandchild = _child(ODD)
        try:
            c.watch(p.pid, 'mailshiftd C')
        finally:
            _stop(p, grandchild)
        corename = leakcheck._read('/proc/sys/kernel/core_pattern') \
            .decode().strip()
        corefile = None
        if not corename.startswith('|') and not os.path.isabs(corename):
            corefile = tmp_path / ('core' if corename == 'core' else
                                   corename.replace('%p', '4242'))
            c.cwds.add(str(tmp_path))
            corefile.write_bytes(b'\0' * 100 + b'AUTH=PLAIN ' + PW.encode())
        evidence = c.evidence_dir
        leaks, notes = c.finish()
    finally:
        c.stop()
    text = '\n'.join(leaks)
    for s in SECRETS:
        assert s.decode() not in text
    want = [
        ('the password of alice, raw, in %s' % log),
        ("the odd password of bob, SASL PLAIN (user 'bob', authzid ''), "
         "in %s (mailshiftd T) at offset" % store),
        ("the odd password of bob, SASL PLAIN (user 'bob', authzid ''), "
         "in %s (mailshiftd T) (SQL dump)" % store),
        ("the odd password of bob, SASL PLAIN (user 'bob', authzid ''), "
         "in %s-wal" % store),
        ('the password of alice, hex, in %s' % (state / 'extra.state')),
        ('the short password of carol, base64 of the password (AUTH LOGIN), '
         'in stderr of mailshiftctl T'),
        ('the password of alice, raw, in the argv of mailshiftctl T, argv '
         'given at its start at argument 3'),
        ('the odd password of bob, raw, in the argv of mailshiftd C at '
         'argument 3'),
        ('the odd password of bob, raw, in the argv of process %d (python'
         % grandchild),
    ]
    if corefile is not None:
        want.append('the password of alice, raw, in core file %s at offset '
                    '111' % corefile)
    else:
        assert [n for n in notes if 'core_pattern' in n], notes
    for w in want:
        assert [line for line in leaks if line.startswith(w)], \
            (w, text, notes)
    assert not [line for line in leaks if 'mailshift.conf' in line], text
    assert not os.path.exists(evidence)


class _Session:
    """What pytest_sessionfinish uses of a pytest session."""

    def __init__(self):
        self.exitstatus = 0
        self.reports = []
        self.config = self
        self.pluginmanager = self
        self.hook = self

    def get_plugin(self, name):
        return None

    def pytest_runtest_logreport(self, report):
        self.reports.append(report)


def test_a_leak_fails_the_run(tmp_path, capsys):
    """A finding makes the session's exit status a failure and adds a
    failed report naming it; no finding leaves both alone."""
    for leak in (False, True):
        c = leakcheck.LeakCheck()
        c.start(watch_popen=False)
        c.secret(PW, 'the password of alice')
        log = tmp_path / ('%s.log' % leak)
        log.write_text('LOGIN alice %s\n' % (PW if leak else 'xxx'))
        c.register_files('mailshiftd T', [str(log)])
        s = _Session()
        leakcheck.pytest_sessionfinish(s, c)
        out = capsys.readouterr().out
        assert PW not in out
        if leak:
            assert s.exitstatus == 1
            assert [r.outcome for r in s.reports] == ['failed']
            assert 'the password of alice, raw, in %s' % log in \
                str(s.reports[0].longrepr)
            assert 'LEAK: the password of alice' in out, out
        else:
            assert s.exitstatus == 0 and s.reports == []
            assert 'no secret found' in out, out


def test_a_worker_leak_fails_the_run(tmp_path, capsys):
    """Under pytest-xdist (make check): a worker's finding goes back to the
    controller, which prints it, fails the run and adds a failed report;
    a worker that sent nothing back fails it too."""
    c = leakcheck.LeakCheck()
    c.start(watch_popen=False)
    c.secret(PW, 'the password of alice')
    log = tmp_path / 'w.log'
    log.write_text('LOGIN alice %s\n' % PW)
    c.register_files('mailshiftd T', [str(log)])
    w = _Session()
    w.workerinput, w.workeroutput = {'workerid': 'gw0'}, {}
    leakcheck.pytest_sessionfinish(w, c)
    lines = w.workeroutput['leakcheck']
    assert [x for x in lines if x.startswith('LEAK: the password of alice')]
    assert PW not in ''.join(lines) and w.exitstatus == 0

    class Node:
        def __init__(self, wid, out):
            self.gateway = type('G', (), {'id': wid})
            if out is not None:
                self.workeroutput = out

    for nodes in ([Node('gw0', w.workeroutput)], [Node('gw1', None)]):
        del leakcheck.WORKERS[:]
        for n in nodes:
            leakcheck.worker_done(n)
        ctl = _Session()
        ctl.option = type('O', (), {'dist': 'loadfile', 'numprocesses': 2})
        assert leakcheck.role(ctl) == 'controller'
        leakcheck.pytest_sessionfinish(ctl)
        out = capsys.readouterr().out
        assert ctl.exitstatus == 1 and \
            [r.outcome for r in ctl.reports] == ['failed'], out
        assert PW not in out
        want = 'the password of alice' if nodes[0].gateway.id == 'gw0' \
            else 'gw1 sent no result'
        assert want in str(ctl.reports[0].longrepr), out
    del leakcheck.WORKERS[:]


def test_session_sees_direct_runs(tmp_path):
    """The session's CHECK sees a mailshiftctl run straight through
    subprocess: its argv, the store its --store names, its captured output
    and the password in its environment."""
    assert leakcheck.CHECK.active, 'conftest.py did not start the check'
    fake = tmp_path / 'mailshiftctl'
    shutil.copy('/bin/echo', str(fake))
    store = tmp_path / 'some.db'
    pw = 'Lk-env-Pw-%d' % time.monotonic_ns()
    env = dict(os.environ, MAILSHIFT_SOURCE_PASSWORD=pw)
    r = subprocess.run([str(fake), 'migrate', '--store', str(store)],
                       env=env, stdout=subprocess.PIPE, check=True)
    c = leakcheck.CHECK
    assert (b'\0'.join([str(fake).encode(), b'migrate', b'--store',
                        str(store).encode()]) in c.argv)
    assert str(store) in c.files
    assert c.blobs.get(r.stdout, '').startswith('stdout of mailshiftctl')
    assert c.secrets.get(pw.encode(), '').startswith(
        'the MAILSHIFT_SOURCE_PASSWORD given to mailshiftctl')
