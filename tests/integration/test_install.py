"""What a packager and an operator get: `make install` with DESTDIR and
PREFIX puts the programs, the man pages and the example config where they
belong, and `mailshiftd -t` checks a configuration (the installed example,
made to point at this test's files) without opening anything."""

import os
import shutil
import subprocess

import pytest

import gateway as gwlib

REPO = gwlib.REPO
INSTALLED = {
    'usr/bin/mailshiftctl': 0o755,
    'usr/sbin/mailshiftd': 0o755,
    'usr/share/man/man5/mailshift.conf.5': 0o644,
    'usr/share/man/man8/mailshiftd.8': 0o644,
    'usr/share/man/man8/mailshiftctl.8': 0o644,
    'usr/share/doc/mailshift/mailshift.conf.example': 0o644,
    'usr/lib/systemd/system/mailshiftd.socket': 0o644,
    'usr/lib/systemd/system/mailshiftd.service': 0o644,
}


def make(*args):
    return subprocess.run(['make', '--no-print-directory', '-C', REPO] +
                          list(args), capture_output=True, text=True,
                          timeout=600)


def test_install_and_uninstall(workdir):
    dest = os.path.join(workdir, 'dest')
    r = make('install', 'DESTDIR=' + dest, 'PREFIX=/usr')
    assert r.returncode == 0, r.stdout + r.stderr
    found = set()
    for top, _, files in os.walk(dest):
        for f in files:
            found.add(os.path.relpath(os.path.join(top, f), dest))
    assert found == set(INSTALLED), found
    for rel, mode in INSTALLED.items():
        assert os.stat(os.path.join(dest, rel)).st_mode & 0o777 == mode, rel
    # The installed programs run; the man pages render without a warning.
    for prog in ('usr/bin/mailshiftctl', 'usr/sbin/mailshiftd'):
        r = subprocess.run([os.path.join(dest, prog), '-h'],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and 'Usage' in r.stdout + r.stderr, r
    for rel in INSTALLED:
        if '/man/' in rel:
            r = subprocess.run(['groff', '-man', '-ww', '-z',
                                os.path.join(dest, rel)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and r.stderr == '', (rel, r.stderr)
    r = make('uninstall', 'DESTDIR=' + dest, 'PREFIX=/usr')
    assert r.returncode == 0, r.stdout + r.stderr
    left = [os.path.join(t, f) for t, _, fs in os.walk(dest) for f in fs]
    assert left == [], left


def example_for(workdir, ca):
    """The shipped example, its paths moved into workdir; the files it
    names made as an operator would (root-only secrets)."""
    text = open(os.path.join(REPO, 'etc', 'mailshift.conf')).read()
    for pw in ('source-admin.pw', 'dest-admin.pw'):
        p = os.path.join(workdir, pw)
        with open(p, 'w') as f:
            f.write('not-a-real-password\n')
        os.chmod(p, 0o600)
    key = os.path.join(workdir, 'key.pem')
    shutil.copy(ca.key_file, key)
    os.chmod(key, 0o600)
    subst = {
        '/etc/mailshift/tls/cert.pem': ca.cert_file,
        '/etc/mailshift/tls/key.pem': key,
        '/etc/mailshift/source-admin.pw':
            os.path.join(workdir, 'source-admin.pw'),
        '/etc/mailshift/dest-admin.pw':
            os.path.join(workdir, 'dest-admin.pw'),
        '/var/lib/mailshift/': workdir + '/',
        '/run/mailshift/': workdir + '/',
        'user     = mailshift': 'user     = nobody',
    }
    for old, new in subst.items():
        assert old in text, old
        text = text.replace(old, new)
    conf = os.path.join(workdir, 'mailshift.conf')
    with open(conf, 'w') as f:
        f.write(text)
    return conf


def check(conf):
    return subprocess.run([gwlib.MAILSHIFTD, '-t', '-c', conf],
                          capture_output=True, text=True, timeout=30)


def test_check_config(workdir, ca):
    if os.geteuid() != 0:
        pytest.fail('needs root (the secret files must be root-owned)')
    conf = example_for(workdir, ca)
    before = sorted(os.listdir(workdir))
    r = check(conf)
    assert r.returncode == 0 and 'configuration ok' in r.stdout, r
    # Nothing opened, nothing written: no store, no socket, no pid file.
    assert sorted(os.listdir(workdir)) == before

    # Each thing a start would refuse, -t refuses, naming it.
    pw = os.path.join(workdir, 'source-admin.pw')
    os.chmod(pw, 0o644)
    r = check(conf)
    assert r.returncode == 2 and 'source-admin.pw' in r.stderr, r
    os.chmod(pw, 0o600)

    key = os.path.join(workdir, 'key.pem')
    os.chmod(key, 0o644)
    r = check(conf)
    assert r.returncode == 2 and 'key.pem' in r.stderr, r
    os.chmod(key, 0o600)

    text = open(conf).read()
    with open(conf, 'w') as f:
        f.write(text.replace('user     = nobody',
                             'user     = no-such-user-here'))
    r = check(conf)
    assert r.returncode == 2 and 'no-such-user-here' in r.stderr, r

    with open(conf, 'w') as f:
        f.write(text.replace('[sweep]', '[sweep]\nenabeld = yes'))
    r = check(conf)
    assert r.returncode == 2 and 'enabeld' in r.stderr, r

    with open(conf, 'w') as f:
        f.write(text)
    assert check(conf).returncode == 0


def test_systemd_units_verify(workdir):
    """The installed units are valid for systemd (systemd-analyze verify,
    which also checks that ExecStart names the installed mailshiftd), and
    the socket unit is transparent, as docs/deployment.md's listeners."""
    prefix = os.path.join(workdir, 'usr')
    r = make('install', 'PREFIX=' + prefix)
    assert r.returncode == 0, r.stdout + r.stderr
    units = os.path.join(prefix, 'lib', 'systemd', 'system')
    service = os.path.join(units, 'mailshiftd.service')
    with open(service) as f:
        text = f.read()
    assert 'ExecStart=%s/sbin/mailshiftd -f -c ' % prefix in text, text
    with open(os.path.join(units, 'mailshiftd.socket')) as f:
        assert 'Transparent=yes' in f.read()
    r = subprocess.run(['systemd-analyze', 'verify', '--man=no',
                        os.path.join(units, 'mailshiftd.socket'), service],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == '', r.stderr
