#!/usr/bin/python3
"""make demo: two local Dovecots, the gateway, users moved while you watch.

Starts a source Dovecot ('.' separator, Maildir++) and a destination Dovecot
('/' separator, its Sent folder called "Sent Items") on loopback ports, fills
the source with demo users' mail, and then:

1. moves one user by hand with `mailshiftctl migrate` (live progress bar,
   then the per-folder verification; a second run copies nothing);
2. starts mailshiftd in front of both servers, logs another user in through
   it with a real IMAP client (Python's imaplib): the session is served by
   the source while the user's mail is copied alongside; at log-off the map
   flips, and the next login is served by the destination (status before and
   after);

and stops everything it started.
"""

import imaplib
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, 'tests', 'lib'))

from dovecot import Dovecot, make_test_root, remove_test_root  # noqa: E402
import mailcheck as mc  # noqa: E402

CTL = os.path.join(TOP, 'tools', 'mailshiftctl')
DAEMON = os.path.join(TOP, 'daemon', 'mailshiftd')
USER, PASSWORD = 'demo', 'demo-secret'
USER2 = 'walker'


def say(text):
    print('\n\033[1m== %s\033[0m' % text, flush=True)


def fill(src, user=USER):
    rng = random.Random(7)
    imap = src.imap(user)
    folders = ['INBOX', 'Sent', 'Archive', 'Archive.2019', 'Archive.2020',
               'Projects', 'Projects.mailshift', 'Entw\u00fcrfe']
    for f in folders[1:]:
        mc.create_folder(imap, f)
    n = 0
    for f in folders:
        items = []
        for _ in range(rng.randint(150, 450)):
            size = rng.choice([800, 2000, 4000, 6000, 9000, 60000])
            flags = rng.choice([(), ('\\Seen',), ('\\Seen', '\\Flagged'),
                                ('\\Answered', '\\Seen'), ('$Forwarded',)])
            date = 946684800 + rng.randint(0, 25 * 365 * 86400)
            items.append((mc.make_message(n, size, date=date), flags, date))
            n += 1
        mc.append_many(imap, f, items)
    imap.logout()
    return n


def migrate(src, dst, store):
    env = dict(os.environ, MAILSHIFT_SOURCE_PASSWORD=PASSWORD,
               MAILSHIFT_DEST_PASSWORD=PASSWORD)
    cmd = [CTL, 'migrate', USER, '--source', src.url('imap'),
           '--dest', dst.url('imap'), '--store', store, '--progress']
    print('$ MAILSHIFT_SOURCE_PASSWORD=... MAILSHIFT_DEST_PASSWORD=... '
          + ' '.join(cmd[:2] + [USER] + cmd[3:]), flush=True)
    return subprocess.run(cmd, env=env).returncode


def ctl(sock, *args):
    print('$ mailshiftctl ' + ' '.join(args), flush=True)
    subprocess.run([CTL] + list(args) + ['-s', sock])


def state_of(sock, user):
    r = subprocess.run([CTL, 'user', 'show', user, '--json', '-s', sock],
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout)['user']['state']
    except (ValueError, KeyError):
        return None


def wait_state(sock, user, states, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        st = state_of(sock, user)
        if st in states:
            return st
        time.sleep(0.2)
    return state_of(sock, user)


def gateway_demo(root, src, dst):
    from dovecot import free_port
    port = free_port()
    sock = os.path.join(root, 'control.sock')
    conf = os.path.join(root, 'mailshift.conf')
    with open(conf, 'w') as f:
        f.write('[listen]\nimap = 127.0.0.1:%d\n\n'
                '[source]\nimap = %s\npop3 = %s\n\n'
                '[destination]\nimap = %s\npop3 = %s\n\n'
                '[store]\npath = %s\n\n[control]\nsocket = %s\n\n'
                '[policy]\non_first_login = passthrough\n'
                % (port, src.url('imap'), src.url('pop3'), dst.url('imap'),
                   dst.url('pop3'), os.path.join(root, 'gateway.db'), sock))
    log = open(os.path.join(root, 'mailshiftd.log'), 'w')
    d = subprocess.Popen([DAEMON, '-c', conf, '-f', '-v'], stdout=log,
                         stderr=log, stdin=subprocess.DEVNULL)
    try:
        end = time.time() + 10
        while not os.path.exists(sock) and time.time() < end:
            time.sleep(0.05)
        print('mailshiftd listening on 127.0.0.1:%d, in front of both '
              'servers' % port)
        ctl(sock, 'user', 'add', USER2)
        ctl(sock, 'status')
        say('%s logs in through the gateway (imaplib)' % USER2)
        m = imaplib.IMAP4('127.0.0.1', port)
        m.login(USER2, PASSWORD)
        typ, data = m.select('INBOX', readonly=True)
        print('SELECT INBOX -> %s messages (served by the source; '
              'the copy runs alongside)' % data[0].decode())
        ctl(sock, 'sessions')
        st = None
        end = time.time() + 120
        while time.time() < end:
            r = subprocess.run([CTL, 'user', 'show', USER2, '--json', '-s',
                                sock], capture_output=True, text=True)
            u = json.loads(r.stdout)['user'] if r.returncode == 0 else {}
            if u.get('state') in ('failed',):
                break
            if u.get('copy', '').startswith('verified'):
                st = 'copied'
                break
            time.sleep(0.2)
        ctl(sock, 'user', 'show', USER2)
        say('%s logs off: the last delta runs and the map flips' % USER2)
        m.logout()
        st = wait_state(sock, USER2, ('destination', 'failed'))
        ctl(sock, 'status')
        if st != 'destination':
            print('the flip did not happen (state %s)' % st)
            return 1
        say('%s logs in again: now served by the destination' % USER2)
        m = imaplib.IMAP4('127.0.0.1', port)
        m.login(USER2, PASSWORD)
        typ, data = m.select('INBOX', readonly=True)
        print('SELECT INBOX -> %s messages' % data[0].decode())
        ctl(sock, 'sessions')
        m.logout()
        return 0
    finally:
        d.terminate()
        try:
            d.wait(10)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()
        log.close()


def main():
    if not os.path.exists(CTL):
        sys.exit('demo: build first (make)')
    root = make_test_root(prefix='mailshift-demo-')
    src = Dovecot(os.path.join(root, 'source'), 'demo-src',
                  users={USER: PASSWORD, USER2: PASSWORD}, separator='.',
                  special_use={'Sent': '\\Sent'})
    dst = Dovecot(os.path.join(root, 'destination'), 'demo-dst',
                  users={USER: PASSWORD, USER2: PASSWORD}, separator='/',
                  layout='fs',
                  special_use={'Sent Items': '\\Sent'})
    rc = 1
    try:
        say('starting a source and a destination Dovecot on loopback')
        src.start()
        dst.start()
        print('source       %s  (separator ".", Maildir++)' % src.url('imap'))
        print('destination  %s  (separator "/", Sent folder "Sent Items")'
              % dst.url('imap'))
        say('filling the source with %s\'s mail' % USER)
        t = time.time()
        n = fill(src)
        n2 = fill(src, USER2)
        print('%d + %d messages in 8 folders each (%.1fs)'
              % (n, n2, time.time() - t))
        store = os.path.join(root, 'mailshift.db')
        say('moving %s: exact, verified' % USER)
        rc = migrate(src, dst, store)
        if rc == 0:
            say('second run: incremental, nothing new to copy')
            rc = migrate(src, dst, store)
        if rc == 0:
            say('the gateway: mailshiftd in front of both servers')
            rc = gateway_demo(root, src, dst)
        say('done' if rc == 0 else 'FAILED (exit %d)' % rc)
    finally:
        src.stop()
        dst.stop()
        remove_test_root(root)
    return rc


if __name__ == '__main__':
    sys.exit(main())
