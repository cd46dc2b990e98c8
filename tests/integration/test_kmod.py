"""The mailshift kernel module (kmod/, docs/kmod.md) in a real kernel.

The host kernel may not load modules, so the test boots Debian's current
cloud kernel (the version linux-image-cloud-amd64 names; the image is
downloaded with apt, not installed) under qemu with TCG, with an initramfs
built here: busybox-static, the distribution modules mailshift.ko needs,
the module built against that kernel's headers, tests/kmod/kt (static) and
this tree's mailshiftctl and mailshiftd with their libraries. Inside the VM
tests/kmod/guest.sh builds three network namespaces (client, gateway,
servers), installs the table with `mailshiftctl steer` through the
module's generic netlink family and checks proxy, DNAT, a table change
under open connections, the session map (written by mailshiftd itself
relaying IMAP logins to scripted servers, and enforced when the operator
moves the user), fail closed and rmmod; it reports PASS/FAIL lines
and the counters on a second serial port, which this test asserts on;
tests/kmod/ktnl sends bad netlink input (malformed, oversized, unknown and
missing attributes, bad flags, no CAP_NET_ADMIN) and interrupts a dump. A
guest oops, panic or WARN fails it.
"""

import json
import fcntl
import os
import re
import shutil
import subprocess

import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
KDIR_TESTS = os.path.join(REPO, 'tests', 'kmod')
# conftest.py puts tests/lib on the path for pytest; bench/kmod_bench.py
# imports this module without it.
sys.path.insert(0, os.path.join(REPO, 'tests', 'lib'))
import gateway as gwlib  # noqa: E402 (MAILSHIFTD: the gateway to test)
WORK = os.path.join(REPO, 'build', 'kmod')

# Every check guest.sh makes; each must come back as PASS.
CHECKS = [
    'insmod mailshift.ko',
    'steer install (genl)',
    'the nft backend refuses to steer what the module steers',
    'proxy: IPv4 to the transparent listener, original destination',
    'proxy: IPv6 to the transparent listener, original destination',
    'destination: DNAT, the reply comes back translated',
    'other ports: straight to the source',
    'steer set 10.77.1.2 143 destination',
    'steer set 10.77.1.2 143 10.77.0.64/26 proxy',
    'after the change: new connections to the destination',
    "after the change: the prefix's new connections to the proxy",
    'table change: the open proxied connection goes on',
    'table change: the open DNATed connection goes on',
    'steer set 10.77.1.2 143 default',
    'moved: the session still going to the source is reset',
    'moved: the session to the destination goes on',
    'cutover: even a session to the destination is reset',
    'sessions: deleted, or gone with their connection',
    'moved: a session to the source deleted from the map goes on',
    'steer sessions with the nft backend: a clear error',
    'fail closed: IPv4 refused when no listener',
    'fail closed: IPv6 refused when no listener',
    'fail closed: nothing reached the source',
    '40 connections during 20 table changes all answered',
    "mailshiftd: alice's login relayed to the source",
    "mailshiftd: alice's session 1 written",
    'mailshiftctl user set alice state destination',
    'mailshiftd: moved, the open session to the source is reset',
    "mailshiftd: alice's new login relayed to the destination",
    "mailshiftd: alice's session 2 written",
    'mailshiftd: the session to the destination goes on',
    'mailshiftd: alice logs out',
    "mailshiftd: the logged out session's entry deleted",
    'mailshiftd stopped: its sessions deleted',
    'mailshiftd: every write into the module worked',
    'the module refuses to steer what an nft table steers',
    "a second namespace's own table",
    "a second namespace's own session map",
    'the second namespace deleted with its table',
    'genl: a u16 for the u32 mark is refused',
    'genl: a table without ports is refused',
    'genl: an unknown attribute is refused',
    'genl: an oversized IPv4 address is refused',
    'genl: a mark with low bits set is refused',
    'genl: an entry on a port that is not a mail port is refused',
    'genl: host bits after the prefix length are refused',
    'genl: an action out of range is refused',
    'genl: two entries for one address and port are refused',
    'genl: more entries than the limit are refused',
    'genl: unknown header flags are refused',
    'genl: the table is as it was after every refusal',
    'genl: a dump interrupted by a SET is flagged NLM_F_DUMP_INTR',
    'genl: a session: a u32 for the u8 server is refused',
    'genl: a session: an oversized user name is refused',
    'genl: a session without its user is refused',
    'genl: a session without its addresses is refused',
    'genl: a session: IPv4 client, IPv6 local is refused',
    'genl: a session: a 5-byte address is refused',
    'genl: a session: a server out of range is refused',
    'genl: a session: a user state out of range is refused',
    "genl: a session: a table's attribute is refused",
    'genl: a user state without the state is refused',
    'genl: a session DEL with a user attribute is refused',
    'genl: a DEL of a session not in the map is refused',
    'genl: a session: unknown header flags are refused',
    'genl: the session map is as it was after every refusal',
    'genl: a session over max_sessions is refused',
    'genl: a session dump interrupted by an ADD is flagged NLM_F_DUMP_INTR',
    'genl: a SET without CAP_NET_ADMIN is refused',
    'genl: a dump without CAP_NET_ADMIN is refused',
    'genl: a DEL without CAP_NET_ADMIN is refused',
    'genl: a session ADD without CAP_NET_ADMIN is refused',
    'genl: a session DEL without CAP_NET_ADMIN is refused',
    'genl: a session dump without CAP_NET_ADMIN is refused',
    'genl: a user state without CAP_NET_ADMIN is refused',
    'steer remove',
    'after remove: straight to the source',
    'rmmod mailshift with live namespaces',
    'without the module: a clear error',
]
# The kernel's reports, and a sanitizer's from an ASan mailshiftctl (make
# check-asan runs this test with one; in the VM its reports reach only the
# console).
GUEST_TROUBLE = re.compile(r'(BUG:|WARNING:|Oops|Call Trace|Kernel panic|'
                           r'general protection|Sanitizer|runtime error:)')


def _run(cmd, **kw):
    return subprocess.run(cmd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


@pytest.fixture(scope='module')
def vm(ctl):
    """Builds everything and boots the VM once; returns (results text,
    console text, qemu's exit status). One run at a time per tree: make
    check runs the suite and its sanitizer run side by side, and both would
    build into, boot from and read back the same files of build/kmod/."""
    qemu = shutil.which('qemu-system-x86_64')
    if qemu is None:
        pytest.skip('qemu-system-x86_64 is missing (tests/install-deps.sh '
                    'installs qemu-system-x86)')
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(WORK, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _boot(qemu, ctl)


def _boot(qemu, ctl):
    return run_vm(qemu, *build_vm(ctl))


def build_vm(ctl, init=None, extra=None):
    """Builds the module, the tools and the initramfs (/init: init, default
    tests/kmod/guest.sh; extra: one more static program); returns (kernel
    root, version, initramfs). bench/kmod_bench.py uses it too."""
    r = _run([os.path.join(KDIR_TESTS, 'kernel.sh'),
              os.path.join(WORK, 'kernel')])
    if r.returncode != 0:
        pytest.skip('no kernel image to boot: ' + r.stdout.strip())
    root = r.stdout.strip().splitlines()[-1]
    kver = os.path.basename(root)
    kdir = '/usr/src/linux-headers-' + kver
    if not os.path.isdir(kdir):
        pytest.skip('%s is missing (tests/install-deps.sh installs the '
                    'headers of the kernel linux-image-cloud-amd64 names)'
                    % kdir)
    r = _run(['make', '--no-print-directory', '-C', REPO, 'kmod',
              'KDIR=' + kdir])
    assert r.returncode == 0, r.stdout
    assert 'warning' not in r.stdout.lower(), r.stdout
    kt = os.path.join(WORK, 'kt')
    r = _run(['gcc', '-O2', '-Wall', '-Wextra', '-Werror', '-static', '-o',
              kt, os.path.join(KDIR_TESTS, 'kt.c')])
    assert r.returncode == 0, r.stdout
    # ktnl writes the session map through mailshift's own library, as
    # mailshiftd does.
    ktnl = os.path.join(WORK, 'ktnl')
    r = _run(['make', '--no-print-directory', '-C', REPO, 'daemon/libms.a'])
    assert r.returncode == 0, r.stdout
    # What daemon/libms.a links with, as the Makefile says.
    libs = _run(['make', '--no-print-directory', '-s', '-C', REPO,
                 'print-libs'])
    assert libs.returncode == 0, libs.stdout
    r = _run(['gcc', '-O2', '-Wall', '-Wextra', '-Werror', '-D_GNU_SOURCE',
              '-I', os.path.join(REPO, 'daemon'), '-o', ktnl,
              os.path.join(KDIR_TESTS, 'ktnl.c'),
              os.path.join(REPO, 'daemon', 'libms.a')] + libs.stdout.split())
    assert r.returncode == 0, r.stdout
    # The gateway under test in the VM: this tree's (or MAILSHIFTD's).
    if not os.access(gwlib.MAILSHIFTD, os.X_OK):
        pytest.fail('%s is missing: build it with `make -C %s`'
                    % (gwlib.MAILSHIFTD, REPO), pytrace=False)
    initrd = os.path.join(WORK, 'initramfs.gz')
    r = _run([os.path.join(KDIR_TESTS, 'mkinitramfs.sh'), root, kver,
              os.path.join(REPO, 'kmod', 'mailshift.ko'), kt, ktnl, ctl,
              gwlib.MAILSHIFTD, initrd] + ([init] if init else []) + ([extra] if extra else []))
    assert r.returncode == 0, r.stdout
    return root, kver, initrd


def run_vm(qemu, root, kver, initrd):
    """Boots it; returns (second serial port's text, console, status)."""
    console = os.path.join(WORK, 'console.txt')
    results = os.path.join(WORK, 'results.txt')
    for f in (console, results):
        if os.path.exists(f):
            os.unlink(f)
    # KVM hangs on the build machines: TCG only. A guest panic reboots,
    # and -no-reboot makes that an exit without the result line.
    r = _run(['timeout', '300', qemu, '-machine', 'accel=tcg', '-cpu', 'max',
              '-m', '768', '-smp', '1', '-nodefaults', '-display', 'none',
              '-no-reboot', '-kernel',
              os.path.join(root, 'boot', 'vmlinuz-' + kver),
              '-initrd', initrd, '-append',
              'console=ttyS0 panic=-1 oops=panic panic_on_warn=1 quiet',
              '-serial', 'file:' + console, '-serial', 'file:' + results,
              '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04'])
    with open(results, errors='replace') as f:
        res = f.read()
    with open(console, errors='replace') as f:
        con = f.read()
    return res, con, r.returncode


def test_vm_ran_to_the_end(vm):
    res, con, status = vm
    assert 'KTEST-RESULT rc=' in res, \
        'no result line (guest panic or timeout, qemu status %d); ' \
        'console:\n%s' % (status, con[-4000:])
    assert not GUEST_TROUBLE.search(con), con[-6000:]


@pytest.mark.parametrize('name', CHECKS)
def test_guest_check(vm, name):
    res = vm[0]
    lines = res.splitlines()
    # A line may go on with details: "PASS: NAME (...)".
    assert any(l == 'PASS: ' + name or l.startswith('PASS: %s (' % name)
               for l in lines), \
        '\n'.join(l for l in lines if l.startswith(('FAIL', 'INFO'))) or res


def test_no_guest_failures(vm):
    res, _, status = vm
    fails = [l for l in res.splitlines() if l.startswith('FAIL')]
    assert not fails, '\n'.join(fails)
    assert 'KTEST-RESULT rc=0' in res
    # isa-debug-exit: qemu exits with (N << 1) | 1 for the guest's N.
    assert status == 1, status


def _stats(res):
    m = re.search(r'STATS-BEGIN\n(.*?)STATS-END', res, re.S)
    assert m, res
    return json.loads(m.group(1))


def _entry(stats, text):
    for e in stats['entries']:
        if e['entry'] == text:
            return e
    raise AssertionError('no entry %r in %s' % (text, stats))


def test_counters(vm):
    st = _stats(vm[0])
    # The prefix entry (its action changed twice, its counter carried
    # on): the DNATed connection, the held one, the proxied one after.
    batch = _entry(st, '10.77.1.2 143 10.77.0.64/26 proxy')
    assert batch['connections'] >= 3, batch
    assert batch['packets'] >= 3 * 3, batch
    assert batch['bytes'] > batch['packets'] * 40, batch
    # Port 143 for everyone else: proxied, the held one, one to the
    # destination, one refused (a SYN sent again is counted again).
    plain = _entry(st, '10.77.1.2 143 proxy')
    assert plain['connections'] >= 4, plain
    # The proxied connections' packets count too, not only their SYNs.
    assert plain['packets'] >= 4 + 2 * 4, plain
    assert _entry(st, 'fd77:1::2 143 proxy')['connections'] >= 2, st
    assert _entry(st, '10.77.1.2 other source')['connections'] >= 1, st
    # Never used: nothing counted.
    assert _entry(st, '10.77.1.2 110 proxy')['connections'] == 0, st
    assert st['rejected'] >= 2, st


def _block(res, name):
    m = re.search(r'%s-BEGIN\n(.*?)%s-END' % (name, name), res, re.S)
    assert m, res
    return json.loads(m.group(1))


def _ports(res):
    m = re.search(r"INFO: alice's ports (\d+) (\d+) (\d+)", res)
    assert m, res
    return [int(p) for p in m.groups()]


def test_session_map(vm):
    """steer sessions lists what the gateway wrote: alice's three
    sessions (and bob's one), each with its client and local address and port and its
    server, her state still routed."""
    res = vm[0]
    p1, p2, p3 = _ports(res)
    st = _block(res, 'SESSIONS-ADDED')
    assert st['backend'] == 'kmod' and st['sessions'] == 4, st
    assert st['max_sessions'] == 65536, st
    assert sorted(u['user'] for u in st['users']) == ['alice', 'bob'], st
    alice = [u for u in st['users'] if u['user'] == 'alice'][0]
    assert alice['state'] == 'routed' and alice['resets'] == 0, alice
    got = sorted((s['client'], s['local'], s['server'], s['resets'])
                 for s in alice['sessions'])
    want = sorted([('10.77.0.66:%d' % p1, '10.77.1.2:143', 'source', 0),
                   ('10.77.0.66:%d' % p2, '10.77.1.2:143', 'destination', 0),
                   ('10.77.0.66:%d' % p3, '10.77.1.2:143', 'source', 0)])
    assert got == want, alice


def test_session_map_enforced(vm):
    """Once alice is moved, her session to the source was reset at the
    hook and counted, per session and for her; her other session to the
    source, idle, was not touched. bob, in a cutover: his session to the
    destination was reset too."""
    res = vm[0]
    p1, p2, p3 = _ports(res)
    st = _block(res, 'SESSIONS-MOVED')
    alice = [u for u in st['users'] if u['user'] == 'alice']
    assert alice, st
    alice = alice[0]
    assert alice['state'] == 'moved', alice
    assert alice['resets'] >= 1, alice
    by_client = {s['client']: s for s in alice['sessions']}
    idle = by_client['10.77.0.66:%d' % p3]
    assert idle['server'] == 'source' and idle['resets'] == 0, alice
    # The reset one, when the collection has not taken it yet.
    reset = by_client.get('10.77.0.66:%d' % p1)
    assert reset is None or (reset['resets'] >= 1 and
                             reset['packets'] >= 1), alice
    bob = [u for u in st['users'] if u['user'] == 'bob']
    assert not bob or (bob[0]['state'] == 'cutover' and
                       bob[0]['resets'] >= 1), st


def test_sessions_nft_backend(ctl):
    """The nft backend keeps no session map: steer sessions says so and
    exits 2 (on the host: no module needed)."""
    r = _run([ctl, 'steer', '--backend', 'nft', 'sessions'])
    assert r.returncode == 2, r.stdout
    assert 'the nft backend keeps no session map' in r.stdout, r.stdout


def _alice(st):
    users = [u for u in st['users'] if u['user'] == 'alice']
    assert st['backend'] == 'kmod' and len(users) == 1, st
    return users[0], {s['client']: s for s in users[0]['sessions']}


def _e2e_client(res, which):
    m = re.search(r"INFO: alice's session %d (10\.77\.0\.2:\d+)" % which,
                  res)
    assert m, res
    return m.group(1)


def test_mailshiftd_writes_the_map(vm):
    """mailshiftd itself (backend kmod) wrote alice's relayed session:
    the client's address and port as the client had them, the service
    address it connected to, the source; she is routed."""
    res = vm[0]
    first = _e2e_client(res, 1)
    st = _block(res, 'E2E-SOURCE')
    assert st['sessions'] == 1, st
    alice, by_client = _alice(st)
    assert alice['state'] == 'routed' and alice['resets'] == 0, alice
    assert list(by_client) == [first], alice
    s = by_client[first]
    assert (s['local'], s['server'], s['resets']) == \
        ('10.77.1.2:143', 'source', 0), s
    assert s['packets'] >= 1, s


def test_mailshiftd_move_enforced(vm):
    """After mailshiftctl user set alice state destination, mailshiftd
    pushed moved into the module: her open session to the source was
    reset at the hook and counted; her new login went to the destination
    and was written so; its entry went with her logout (the collection
    held off: mailshiftd's delete), while the reset one, still open in
    mailshiftd, stayed until mailshiftd stopped."""
    res = vm[0]
    first = _e2e_client(res, 1)
    second = _e2e_client(res, 2)
    assert first != second, res
    st = _block(res, 'E2E-MOVED')
    assert st['sessions'] == 2, st
    alice, by_client = _alice(st)
    assert alice['state'] == 'moved' and alice['resets'] >= 1, alice
    assert sorted(by_client) == sorted([first, second]), alice
    assert by_client[first]['server'] == 'source', alice
    assert by_client[first]['resets'] >= 1, alice
    dst = by_client[second]
    assert (dst['local'], dst['server'], dst['resets']) == \
        ('10.77.1.2:143', 'destination', 0), alice
    st = _block(res, 'E2E-LOGOUT')
    assert st['sessions'] == 1, st
    alice, by_client = _alice(st)
    assert list(by_client) == [first], alice
