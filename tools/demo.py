#!/usr/bin/python3
"""make demo: two local Dovecots, a demo mailbox, moved while you watch.

Starts a source Dovecot ('.' separator, Maildir++) and a destination Dovecot
('/' separator, its Sent folder called "Sent Items") on loopback ports, fills
the source with a demo user's mail, moves it with `mailshiftctl migrate`
(live progress bar, then the per-folder verification), shows that a second
run copies nothing, and stops everything it started.
"""

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
USER, PASSWORD = 'demo', 'demo-secret'


def say(text):
    print('\n\033[1m== %s\033[0m' % text, flush=True)


def fill(src):
    rng = random.Random(7)
    imap = src.imap(USER)
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


def main():
    if not os.path.exists(CTL):
        sys.exit('demo: build first (make)')
    root = make_test_root(prefix='mailshift-demo-')
    src = Dovecot(os.path.join(root, 'source'), 'demo-src',
                  users={USER: PASSWORD}, separator='.',
                  special_use={'Sent': '\\Sent'})
    dst = Dovecot(os.path.join(root, 'destination'), 'demo-dst',
                  users={USER: PASSWORD}, separator='/', layout='fs',
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
        print('%d messages in 8 folders (%.1fs)' % (n, time.time() - t))
        store = os.path.join(root, 'mailshift.db')
        say('moving %s: exact, verified' % USER)
        rc = migrate(src, dst, store)
        if rc == 0:
            say('second run: incremental, nothing new to copy')
            rc = migrate(src, dst, store)
        say('done' if rc == 0 else 'FAILED (exit %d)' % rc)
    finally:
        src.stop()
        dst.stop()
        remove_test_root(root)
    return rc


if __name__ == '__main__':
    sys.exit(main())
