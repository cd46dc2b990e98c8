"""What the steering tests (test_steer.py, test_takeover.py) build alike
in network namespaces of their own: the checks that this machine lets them,
the namespaces and the scratch folder, the marked mail both servers start
with, mailshiftctl run inside the gateway's namespace, and the teardown
that must leave nothing behind. Each test keeps its own topology (links,
addresses, routes) and its own servers.

    uid, nss, root = nsworld.begin(test_root, 'steer', NFT, 'nftables',
                                   ('ms-scli-', 'ms-sgw-'))
    try:
        nsworld.add_all(nss)
        ...
    finally:
        nsworld.end(gw, nss, root, lambda: stop_all(*servers),
                    _remove_namespaces)
"""

import json
import os
import shutil

import pytest

import netns


def begin(test_root, name, nft, needs, prefixes):
    """Skips unless root, fails without nft; the namespaces (not added
    yet: add_all() does, inside the caller's try), named prefix + a run id,
    and an empty scratch folder test_root/NAME-ID. (uid, nss, root)."""
    if os.geteuid() != 0:
        pytest.skip('needs root: network namespaces, %s (uid %d)'
                    % (needs, os.geteuid()))
    if not os.access(nft, os.X_OK):
        pytest.fail('nft (package nftables) is not installed',
                    pytrace=False)
    uid = '%d-%s' % (os.getpid(), os.urandom(2).hex())
    nss = [netns.NetNS(p + uid) for p in prefixes]
    root = os.path.join(test_root, '%s-%s' % (name, uid))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    os.chmod(root, 0o755)
    return uid, nss, root


def add_all(nss):
    """Adds the namespaces; skips when this machine does not permit it."""
    try:
        nss[0].add()
    except netns.NotPermitted as e:
        pytest.skip('network namespaces not permitted here: %s' % e)
    for ns in nss[1:]:
        ns.add()


def seed(servers, users, tag, marker):
    """One marked message (marker(tag % (SIDE, USER), n)) in each user's
    INBOX on each (server, side) of servers."""
    for server, side in servers:
        for i, user in enumerate(users):
            m = server.imap(user)
            try:
                msg, _ = marker(tag % (side, user), 10 + i)
                typ, data = m.append('INBOX', None, None, msg)
                assert typ == 'OK', data
            finally:
                m.logout()


def ctl(ns, argv, check=None):
    """argv (mailshiftctl ...) run in namespace ns: the CompletedProcess
    (text), .json when it printed JSON; with check, its exit status must be
    that."""
    r = ns.run(argv, check=False, timeout=60)
    r.json = None
    try:
        r.json = json.loads(r.stdout) if r.stdout.strip() else None
    except ValueError:
        pass
    if check is not None:
        assert r.returncode == check, (argv, r.returncode, r.stdout,
                                       r.stderr)
    return r


def end(gw, nss, root, stop_servers, remove_namespaces):
    """The teardown: the gateway, then stop_servers(), then the namespaces
    (remove_namespaces(nss) returns what it found left); the daemon's log
    tail when anything was; the scratch folder. Fails on leftovers."""
    problems = []
    if gw is not None:
        gw.stop()
    stop_servers()
    problems += remove_namespaces(nss)
    if gw is not None and problems:
        print('----- mailshiftd log (last lines)\n' + gw.log_tail(60))
    shutil.rmtree(root, ignore_errors=True)
    assert not problems, problems
