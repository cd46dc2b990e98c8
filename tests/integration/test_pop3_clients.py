"""The POP3 clients people use, through mailshiftd, before and after their
user is moved (docs/gateway-spec.md, "POP3 UIDLs"): fetchmail and mpop
(mail kept on the server, and not) each download the mailbox once
through the gateway while the user is on the source, then the operator moves
the user, one new message reaches the destination, and each client
downloads exactly that message: nothing twice, nothing missed, no error
and no warning.

Real Dovecots (the source's INBOX has expunge gaps: DROPPED), the real
clients from Debian's packages, run as nobody (as users run them), each
with its own state directory under the test's workdir. Every client's
messages are counted by Message-ID (the clients add headers of their
own)."""

import glob
import os
import shutil
import re
import subprocess

import pytest

import mailcheck as mc
from test_gateway import GW_USERS, direct
from test_gateway import gpair, gw_golden, make_gw  # noqa: F401 (fixtures)
from test_gateway_ops import admin_conf
from test_pop3_uidl import (DROPPED, USER, carol_messages, fill_source,
                            inbox_uidvalidity)

PW = GW_USERS[USER]
NOBODY = 65534
AS_NOBODY = ['setpriv', '--reuid=%d' % NOBODY, '--regid=%d' % NOBODY,
             '--clear-groups']
MSGID = re.compile(rb'^Message-ID:\s*(\S+)', re.I | re.M)
# What a client must not print: an error, a warning, a duplicate.
BAD_OUTPUT = re.compile(r'error|warning|fail|duplicate', re.I)


def secret_file(path, text):
    """A client's configuration holding the password: owner-only, as the
    clients insist."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    shutil.chown(path, NOBODY, NOBODY)
    return path


class Client:
    """One POP3 client with its state in dir; messages land in a
    Maildir (dir/mail/{new,cur})."""

    def __init__(self, name, dir, port, keep=True):
        self.name = name
        self.dir = dir
        self.port = port
        self.keep = keep
        self.mail = os.path.join(dir, 'mail')
        for sub in ('new', 'cur', 'tmp'):
            os.makedirs(os.path.join(self.mail, sub), exist_ok=True)
        for path in [dir] + glob.glob(os.path.join(dir, '**'),
                                      recursive=True):
            shutil.chown(path, NOBODY, NOBODY)

    def argv(self):
        d, port = self.dir, self.port
        if self.name == 'fetchmail':
            rc = secret_file(os.path.join(d, 'fetchmailrc'), (
                'set no syslog\n'
                'poll 127.0.0.1 protocol pop3 port %d timeout 30\n'
                '  user "%s" there password "%s" is "root" here\n'
                '  %s sslproto "" mda "/bin/sh -c \'cat > $(mktemp %s/'
                'new/m.XXXXXX)\'"\n') % (port, USER, PW,
                                         'keep' if self.keep else 'nokeep',
                                         self.mail))
            return ['fetchmail', '-f', rc, '--idfile',
                    os.path.join(d, 'fetchids'), '--nodetach']
        if self.name == 'mpop':
            rc = secret_file(os.path.join(d, 'mpoprc'), (
                'account carol\nhost 127.0.0.1\nport %d\nuser %s\n'
                'password %s\ntls off\nauth user\nkeep %s\n'
                'uidls_file %s\ndelivery maildir %s\ntimeout 30\n'
                % (port, USER, PW, 'on' if self.keep else 'off',
                   os.path.join(d, 'uidls'), self.mail)))
            return ['mpop', '-C', rc, '--quiet', 'carol']
        raise ValueError(self.name)

    def messages(self):
        """[Message-ID, ...] of everything delivered so far."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.mail, '*', '*'))):
            if os.path.basename(os.path.dirname(path)) == 'tmp':
                continue
            with open(path, 'rb') as f:
                m = MSGID.search(f.read())
            assert m, '%s delivered a message without Message-ID: %s' % (
                self.name, path)
            out.append(m.group(1).decode())
        return out

    def sync(self, expect_new):
        """Runs the client once; asserts it exited cleanly, said nothing
        bad, and delivered exactly the Message-IDs expect_new."""
        before = self.messages()
        env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
               'HOME': self.dir, 'LANG': 'C.UTF-8'}
        r = subprocess.run(AS_NOBODY + self.argv(), capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL,
                           cwd=self.dir, env=env)
        # fetchmail: 0 mail fetched, 1 no mail (both fine).
        ok = (0, 1) if self.name == 'fetchmail' else (0,)
        out = r.stdout + r.stderr
        assert r.returncode in ok, (self.name, r.returncode, out)
        assert not BAD_OUTPUT.search(out), (self.name, out)
        got = self.messages()
        new = got[len(before):] if got[:len(before)] == before else None
        new = sorted(set(got) - set(before)) if new is None else sorted(new)
        assert len(got) == len(set(got)), \
            '%s has duplicates: %s' % (self.name, sorted(
                m for m in set(got) if got.count(m) > 1))
        assert new == sorted(expect_new), (self.name, new, expect_new, out)


def test_pop3_clients_across_the_move(gpair, make_gw, workdir):
    n = fill_source(gpair)
    # Different UIDVALIDITYs, so the destination's own UIDLs differ from
    # the source's (Dovecot takes both from the clock otherwise).
    uv = inbox_uidvalidity(gpair.src)
    gpair.dst.doveadm('mailbox', 'update', '-u', USER, '--uid-validity',
                      str(uv + 1000), 'INBOX')
    g = make_gw(tls=False, policy='off',
                extra_conf=admin_conf(workdir, sweep=False))
    on_source = [MSGID.search(m).group(1).decode()
                 for i, m in enumerate(carol_messages()) if i not in DROPPED]
    assert len(on_source) == n
    clients = [Client('fetchmail', os.path.join(workdir, 'fetchmail'),
                      g.pop3_port),
               Client('mpop', os.path.join(workdir, 'mpop'), g.pop3_port)]
    # Not getmail (Debian's getmail6 6.18): its local delivery waits for
    # its child on a condition the SIGCHLD handler notifies, and a child
    # that exits before the wait begins is never seen: the delivery "times
    # out" after the retriever's timeout (seen in make check's sanitizer
    # lane). A fault of the client's own, whatever the server; by hand it
    # downloaded nothing twice across the move.
    for c in clients:
        c.sync(on_source)
        c.sync([])             # a second look, still on the source
    # The user moves while the clients are away.
    r = g.ctl('migrate', '--daemon', USER)
    assert r.rc == 0, r.describe()
    st = g.wait_state(USER, ('destination', 'failed'), timeout=60)
    assert st == 'destination', (st, g.log_tail())
    late = mc.make_message(760500, 700, subject='after the move')
    direct(gpair.dst, USER, mc.append, 'INBOX', late, [], 1591000000)
    late_id = MSGID.search(late).group(1).decode()
    for c in clients:
        c.sync([late_id])
        c.sync([])
    # The gateway did it (not a coincidence of equal UIDLs): it says so.
    assert re.search(r'%s: \d+ POP3 UIDLs shown as the source\'s' % USER,
                     g.log_text()), g.log_tail()


def test_pop3_client_that_deletes_across_the_move(gpair, make_gw, workdir):
    """mpop with keep off: everything downloaded and deleted on the source
    before the move; after it only the new message, deleted in turn; the
    destination is left empty."""
    fill_source(gpair)
    g = make_gw(tls=False, policy='off',
                extra_conf=admin_conf(workdir, sweep=False))
    on_source = [MSGID.search(m).group(1).decode()
                 for i, m in enumerate(carol_messages()) if i not in DROPPED]
    c = Client('mpop', os.path.join(workdir, 'mpop'), g.pop3_port,
               keep=False)
    c.sync(on_source)
    r = g.ctl('migrate', '--daemon', USER)
    assert r.rc == 0, r.describe()
    assert g.wait_state(USER, ('destination', 'failed'),
                        timeout=60) == 'destination', g.log_tail()
    late = mc.make_message(760501, 700, subject='after the move')
    direct(gpair.dst, USER, mc.append, 'INBOX', late, [], 1591000000)
    c.sync([MSGID.search(late).group(1).decode()])
    c.sync([])
    d = gpair.dst.imap(USER)
    try:
        assert int(d.select('INBOX', readonly=True)[1][0]) == 0
    finally:
        d.logout()


@pytest.fixture(autouse=True)
def _clients_installed():
    for tool in ('fetchmail', 'mpop'):
        if subprocess.run(['which', tool], capture_output=True).returncode:
            pytest.fail('%s is not installed: tests/install-deps.sh installs '
                        'it (make check runs it)' % tool, pytrace=False)
