"""Real IMAP clients across a move (docs/mover.md, "Identity"): mbsync
(isync) and offlineimap3 sync a user's mail through mailshiftd (IMAPS)
while the user is on the source, each changes a flag offline, then the
user is moved (`mailshiftctl migrate --daemon`) to a Dovecot destination
with its doveadm HTTP API, and each client syncs again: no error, no
warning, nothing downloaded again, no duplicate on either side, and each
offline flag change on the message it was made on.

Both servers here have the same separator and folder names, so what the
clients could notice is the UIDVALIDITY and the UIDs only (folder names
are issue 11's item 3).

The same runs against a destination that cannot keep identity (no doveadm
configured): there the gateway's IMAP view (docs/gateway-spec.md) shows
the clients the source's UIDVALIDITY and UIDs, and mail delivered after
the flip arrives numbered above the source's UIDNEXT.
"""

import os
import re
import subprocess

import pytest

import corpus
import gateway as gwlib
import mailcheck as mc
from conftest import MASTER, SRC_USERS

USER = 'u1'
FOLDERS = {'INBOX': 30, 'Work': 15}
GAPS = {'INBOX': (3, 4, 10, 25), 'Work': (2, 7)}
MBSYNC = '/usr/bin/mbsync'
OFFLINEIMAP = '/usr/bin/offlineimap'


@pytest.fixture
def cpair(make_pair):
    """Source and destination alike but for the doveadm API: '.'
    separator, Maildir++, the source's special-use folders."""
    same = dict(separator='.', layout='maildir++',
                special_use=corpus.SRC_SPECIAL, listescape=True)
    return make_pair(users=(), src_kw=same,
                     dst_kw=dict(same, doveadm_http=True))


def on_server(folder, prefix=''):
    """The server's name of a folder: below its namespace prefix."""
    return folder if folder == 'INBOX' else prefix + folder


def fill(server, prefix=''):
    m = server.imap(USER)
    try:
        for name, n in FOLDERS.items():
            folder = on_server(name, prefix)
            if folder != 'INBOX':
                mc.create_folder(m, folder)
            mc.append_many(m, folder, [
                (mc.make_message(i, 700, subject='%s %d' % (name, i)),
                 ['\\Seen'] if i % 3 == 0 else [], 1500000000 + i)
                for i in range(1, n + 1)])
            m.select(mc.quote_mailbox(folder))
            for uid in GAPS[name]:
                m.uid('STORE', str(uid), '+FLAGS.SILENT', '(\\Deleted)')
            m.expunge()
            m.close()
    finally:
        m.logout()


def write_secret(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(text + '\n')


def gw_conf(workdir, dst, key_file=None, doveadm=True, extra=()):
    """The gateway's config: the admin logins, the destination's doveadm
    API unless doveadm is False (then the gateway translates), and extra
    lines."""
    pwf = os.path.join(workdir, 'admin.pw')
    write_secret(pwf, MASTER[1])
    lines = ['[source]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf,
             '[destination]', 'admin = %s' % MASTER[0],
             'admin_password_file = %s' % pwf]
    if doveadm:
        lines += ['doveadm_url = %s' % dst.doveadm_url(),
                  'doveadm_key_file = %s' % (key_file or
                                             dst.doveadm_key_file)]
    return '\n'.join(lines + list(extra))


class Client:
    """One client's configuration and local maildir."""

    def __init__(self, workdir, name, gw, ca):
        self.dir = os.path.join(workdir, name)
        self.maildir = os.path.join(self.dir, 'mail')
        os.makedirs(self.maildir)
        self.pwfile = os.path.join(self.dir, 'pw')
        write_secret(self.pwfile, SRC_USERS[USER])
        self.gw, self.ca = gw, ca

    def run(self):
        r = subprocess.run(self.argv(), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=120, env=dict(os.environ, HOME=self.dir))
        out = r.stdout.decode(errors='replace')
        assert r.returncode == 0, '%s failed (%d):\n%s' % (
            self.argv()[0], r.returncode, out)
        bad = [l for l in out.splitlines()
               if re.search(r'warn|error|fail|invalid|changed', l, re.I)]
        assert not bad, '%s said:\n%s' % (self.argv()[0], out)
        return out

    def local(self):
        """{folder: {unique name: flags}} of the local maildir."""
        out = {}
        for folder in FOLDERS:
            d = self.folder_dir(folder)
            msgs = {}
            for sub in ('cur', 'new'):
                for fn in os.listdir(os.path.join(d, sub)):
                    base, _, info = fn.partition(':')
                    msgs[self.unique(base)] = info.partition(',')[2]
            out[folder] = msgs
        return out

    def unique(self, base):
        return base

    def flag_offline(self, folder, subject):
        """Adds F (\\Flagged) to the local copy of the message with that
        Subject, as a mail reader would (moving it to cur/)."""
        d = self.folder_dir(folder)
        want = re.compile(rb'^Subject: ' + re.escape(subject.encode()) +
                          rb'\r?$', re.M)
        for sub in ('cur', 'new'):
            for fn in os.listdir(os.path.join(d, sub)):
                with open(os.path.join(d, sub, fn), 'rb') as f:
                    head = f.read(4000)
                if not want.search(head):
                    continue
                base, _, info = fn.partition(':2,')
                flags = ''.join(sorted(set(info) | {'F'}))
                os.rename(os.path.join(d, sub, fn),
                          os.path.join(d, 'cur', '%s:2,%s' % (base, flags)))
                return
        raise AssertionError('no local message %r in %s' % (subject, d))


class Mbsync(Client):
    def __init__(self, *a):
        super().__init__(*a)
        self.rc = os.path.join(self.dir, 'mbsyncrc')
        with open(self.rc, 'w') as f:
            f.write('\n'.join([
                'IMAPAccount gw', 'Host 127.0.0.1',
                'Port %d' % self.gw.imaps_port, 'User %s' % USER,
                'PassCmd "cat %s"' % self.pwfile, 'SSLType IMAPS',
                'CertificateFile %s' % self.ca.ca_file, '',
                'IMAPStore far', 'Account gw', '',
                'MaildirStore near', 'Path %s/' % self.maildir,
                'Inbox %s/INBOX' % self.maildir, 'SubFolders Verbatim', '',
                'Channel c', 'Far :far:', 'Near :near:', 'Patterns *',
                'Create Both', 'Expunge Both', 'SyncState *', 'Sync All',
                '']))

    def argv(self):
        return [MBSYNC, '-c', self.rc, '-a']

    def folder_dir(self, folder):
        return os.path.join(self.maildir, folder)

    def unique(self, base):
        # mbsync renames a file when its flags change but keeps the
        # unique part; ",U=<uid>" it adds to the name.
        return base.split(',U=')[0]


class Offlineimap(Client):
    def __init__(self, *a):
        super().__init__(*a)
        self.rc = os.path.join(self.dir, 'offlineimaprc')
        with open(self.rc, 'w') as f:
            f.write('\n'.join([
                '[general]', 'accounts = gw',
                'metadata = %s/meta' % self.dir, 'ui = basic', '',
                '[Account gw]', 'localrepository = local',
                'remoterepository = remote', '',
                '[Repository local]', 'type = Maildir',
                'localfolders = %s' % self.maildir, 'sep = .', '',
                '[Repository remote]', 'type = IMAP',
                'remotehost = 127.0.0.1',
                'remoteport = %d' % self.gw.imaps_port,
                'remoteuser = %s' % USER,
                'remotepassfile = %s' % self.pwfile, 'ssl = yes',
                'sslcacertfile = %s' % self.ca.ca_file,
                'starttls = no', 'maxconnections = 1', '']))

    def argv(self):
        return [OFFLINEIMAP, '-c', self.rc, '-o', '-u', 'basic']

    def folder_dir(self, folder):
        return os.path.join(self.maildir, folder)

    def unique(self, base):
        # offlineimap names files "<time>_<n>.<pid>.<host>,U=<uid>,FMD5=...".
        return base.split(',U=')[0]


def server_view(server, prefix=''):
    """{folder: {Subject: flags without \\Recent}} (and the message count,
    to see duplicates)."""
    m = server.imap(USER)
    out = {}
    try:
        for folder in FOLDERS:
            msgs = mc.fetch_all(m, on_server(folder, prefix),
                                '(FLAGS BODY.PEEK[HEADER.FIELDS '
                                '(SUBJECT)])')
            subj = {}
            for d in msgs.values():
                hdr = d['BODY[HEADER.FIELDS (SUBJECT)]'].decode()
                s = hdr.split(':', 1)[1].strip()
                assert s not in subj, 'duplicate %r in %s' % (s, folder)
                subj[s] = sorted(f for f in d['FLAGS']
                                 if f.lower() != '\\recent')
            out[folder] = subj
    finally:
        m.logout()
    return out


def same_password(pair):
    """One password on both servers, as at a real site."""
    pair.dst.stop()
    pair.dst.add_user(USER, SRC_USERS[USER])
    pair.dst.start()


def deliver(server, folder, subject):
    """New mail, straight into the server (as its LDA would)."""
    m = server.imap(USER)
    try:
        mc.append_many(m, folder, [(mc.make_message(9000, 700,
                                                    subject=subject),
                                    [], 1600000000)])
    finally:
        m.logout()


CLIENTS_PRESENT = pytest.mark.skipif(
    not (os.access(MBSYNC, os.X_OK) and os.access(OFFLINEIMAP, os.X_OK)),
    reason='mbsync (isync) or offlineimap3 not installed: '
    'tests/install-deps.sh installs them')


@CLIENTS_PRESENT
@pytest.mark.parametrize('identity', ['doveadm', 'gateway'])
def test_clients_notice_nothing(cpair, workdir, ca, identity):
    """identity: kept by the mover through doveadm, or shown by the
    gateway's IMAP view (no doveadm configured)."""
    fill(cpair.src)
    same_password(cpair)
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), cpair.src, cpair.dst,
                         tls_ca=ca, policy='off',
                         extra_conf=gw_conf(workdir, cpair.dst,
                                            doveadm=identity == 'doveadm'))
    g.start()
    try:
        clients = [Mbsync(workdir, 'mbsync', g, ca),
                   Offlineimap(workdir, 'offlineimap', g, ca)]
        for c in clients:
            c.run()
        before = [c.local() for c in clients]
        for b in before:
            assert {f: len(v) for f, v in b.items()} == {
                f: n - len(GAPS[f]) for f, n in FOLDERS.items()}
        # Offline, before the move: each flags one message.
        clients[0].flag_offline('INBOX', 'INBOX 11')
        clients[1].flag_offline('Work', 'Work 8')

        assert g.ctl('migrate', '--daemon', USER).rc == 0
        g.wait_state(USER, ('destination',), timeout=120)
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == \
            (0 if identity == 'doveadm' else 1), j

        for _ in range(2):              # the second run settles the other's
            for c in clients:           # flag change: still nothing new
                c.run()
        src = server_view(cpair.src)
        dst = server_view(cpair.dst)
        for folder in FOLDERS:
            # Nothing lost or doubled on the destination.
            assert sorted(dst[folder]) == sorted(src[folder])
        assert '\\Flagged' in dst['INBOX']['INBOX 11']
        assert '\\Flagged' in dst['Work']['Work 8']
        flagged = [(f, s) for f in FOLDERS for s, fl in dst[f].items()
                   if '\\Flagged' in fl]
        assert sorted(flagged) == [('INBOX', 'INBOX 11'), ('Work', 'Work 8')]
        for c, b in zip(clients, before):
            after = c.local()
            for folder in FOLDERS:
                # No download again, no duplicate: the same local files.
                assert sorted(after[folder]) == sorted(b[folder]), \
                    (c.argv()[0], folder)
            # Both flag changes reached both clients, on the right file.
            assert sum('F' in fl for f in FOLDERS
                       for fl in after[f].values()) == 2

        # Mail delivered after the flip reaches both, once.
        deliver(cpair.dst, 'INBOX', 'after the flip')
        for c in clients:
            c.run()
            c.run()
        assert 'after the flip' in server_view(cpair.dst)['INBOX']
        for c, b in zip(clients, before):
            new = set(c.local()['INBOX']) - set(b['INBOX'])
            assert len(new) == 1, (c.argv()[0], sorted(new))
    finally:
        g.stop()


def test_status_counts_users_without_identity(cpair, workdir, ca):
    """A wrong API key: the move still succeeds, exact, and `mailshiftctl
    status` counts the user among those whose folders did not keep their
    UIDVALIDITY and UIDs."""
    fill(cpair.src)
    bad = os.path.join(workdir, 'wrong.key')
    write_secret(bad, 'not-the-key')
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), cpair.src, cpair.dst,
                         tls_ca=ca, policy='off',
                         extra_conf=gw_conf(workdir, cpair.dst, bad))
    g.start()
    try:
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == 0, j
        assert g.ctl('migrate', '--daemon', USER).rc == 0
        g.wait_state(USER, ('destination',), timeout=120)
        cpair.assert_copied(USER)
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == 1, j
        assert j['identity_not_kept_folders'] >= len(FOLDERS), j
        r = g.ctl('status')
        assert 'identity not kept: 1 users' in r.stdout, r.describe()
        assert 'the gateway translates them' in r.stdout, r.describe()
        assert 'API key was refused' in g.log_text()
        assert 'not-the-key' not in g.log_text()
    finally:
        g.stop()


def test_daemon_refuses_key_file_others_can_read(cpair, workdir):
    loose = os.path.join(workdir, 'loose.key')
    with open(loose, 'w') as f:
        f.write(cpair.dst.doveadm_key + '\n')
    os.chmod(loose, 0o644)
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gwbad'), cpair.src,
                         cpair.dst, extra_conf=gw_conf(workdir, cpair.dst,
                                                       loose))
    with pytest.raises(Exception) as e:
        g.start(timeout=5)
    g.stop()
    said = str(e.value) + g.log_text()
    assert 'readable by others' in said or 'chmod 600' in said, said
    assert cpair.dst.doveadm_key not in said


# Dovecot's own capabilities less SPECIAL-USE: a Courier-style server.
NO_SPECIAL_USE = ('imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID '
                  'ENABLE IDLE LITERAL+ MULTIAPPEND UNSELECT CHILDREN '
                  'NAMESPACE UIDPLUS LIST-EXTENDED CONDSTORE QRESYNC ESEARCH '
                  'LIST-STATUS MOVE')


@pytest.fixture
def courier_pair(make_pair):
    """A Courier-style source (every folder below the personal namespace
    "INBOX.", no SPECIAL-USE); the destination as cpair's."""
    return make_pair(users=(), src_kw=dict(prefix='INBOX.', special_use={},
                                           listescape=False,
                                           extra_conf=NO_SPECIAL_USE),
                     dst_kw=dict(separator='.', layout='maildir++',
                                 special_use=corpus.SRC_SPECIAL,
                                 listescape=True, doveadm_http=True))


def courier_round(pair, workdir, ca, identity, client_class, name):
    """One client synced through the gateway from the Courier-style source,
    an offline flag change, the move, two more syncs: no error or warning
    (Client.run), both servers' folders alike, the flag on its message
    alone, the same local files. Returns the client and `status --json`
    after the move."""
    fill(pair.src, prefix='INBOX.')
    same_password(pair)
    g = gwlib.Mailshiftd(os.path.join(workdir, 'gw'), pair.src, pair.dst,
                         tls_ca=ca, policy='off',
                         extra_conf=gw_conf(workdir, pair.dst,
                                            doveadm=identity == 'doveadm'))
    g.start()
    try:
        c = client_class(workdir, name, g, ca)
        c.run()
        before = c.local()
        assert {f: len(v) for f, v in before.items()} == {
            f: n - len(GAPS[f]) for f, n in FOLDERS.items()}
        c.flag_offline('Work', 'Work 8')

        assert g.ctl('migrate', '--daemon', USER).rc == 0
        g.wait_state(USER, ('destination',), timeout=120)
        rc, out, err, j = g.ctl('status', '--json')
        assert j['identity_not_kept_users'] == \
            (0 if identity == 'doveadm' else 1), j
        c.run()
        c.run()
    finally:
        g.stop()
    src = server_view(pair.src, prefix='INBOX.')
    dst = server_view(pair.dst)
    for folder in FOLDERS:
        # Nothing lost or doubled (nothing uploaded again).
        assert sorted(dst[folder]) == sorted(src[folder]), folder
    assert [(f, s) for f in FOLDERS for s, fl in dst[f].items()
            if '\\Flagged' in fl] == [('Work', 'Work 8')]
    after = c.local()
    for folder in FOLDERS:
        # No download again, no duplicate: the same local files.
        assert sorted(after[folder]) == sorted(before[folder]), folder
    assert sum('F' in fl for f in FOLDERS
               for fl in after[f].values()) == 1
    return c, j


@CLIENTS_PRESENT
@pytest.mark.parametrize('identity', ['doveadm', 'gateway'])
def test_courier_source_mbsync(courier_pair, workdir, ca, identity):
    """A source whose folders are below "INBOX." ("INBOX.Work"): the mover
    drops the prefix ("Work"); mbsync, which takes the prefix from
    NAMESPACE (UseNamespace, its default), synced through the gateway
    before and after the move, runs on with no error or warning, downloads
    nothing again, and an offline flag change lands on the right
    message."""
    mb, j = courier_round(courier_pair, workdir, ca, identity, Mbsync,
                          'mbsync')
    assert j['renamed_folders'] == 0, j     # a prefix is no rename
    # No folder of the prefixed names (the destination's own empty
    # special-use folders come along).
    assert not [f for f in os.listdir(mb.maildir)
                if f.startswith('INBOX.')], os.listdir(mb.maildir)


class OfflineimapPlain(Offlineimap):
    """offlineimap3 with no setting for Courier (no nametrans, folders made
    on either side as by default): it ignores NAMESPACE, so its local
    folders are the source's names with the prefix ("INBOX.Work")."""

    def folder_dir(self, folder):
        return os.path.join(self.maildir, on_server(folder, 'INBOX.'))


@CLIENTS_PRESENT
@pytest.mark.parametrize('identity', ['doveadm', 'gateway'])
def test_courier_source_offlineimap(courier_pair, workdir, ca, identity):
    """offlineimap3 against a Courier-style source with a plain
    configuration (no nametrans: local "INBOX.Work"), synced through the
    gateway before and after the move: the gateway shows the moved user
    the source's namespace ("INBOX." and its separator), so it runs on
    with no error or warning, downloads nothing again, makes no folder on
    either side, no duplicate, an offline flag change on the right
    message."""
    c, j = courier_round(courier_pair, workdir, ca, identity,
                         OfflineimapPlain, 'offlineimap')
    # Local folders the source's names, none of the destination's.
    local = sorted(f for f in os.listdir(c.maildir) if not f.startswith('.'))
    assert 'INBOX.Work' in local and 'Work' not in local, local
    # No folder made on the destination from a local one.
    m = courier_pair.dst.imap(USER)
    try:
        names = [f['name'] for f in mc.list_folders(m)]
    finally:
        m.logout()
    assert not [n for n in names if n.startswith('INBOX.')], names
