"""The mailboxes the integration tests copy.

Source servers use '.' and Maildir++ (with listescape, so "a/b" is a
valid folder name there); destination servers '/' and LAYOUT=fs, with
differently named special-use folders.
"""

import mailcheck as mc

SRC_SPECIAL = {'Sent': '\\Sent', 'Trash': '\\Trash', 'Drafts': '\\Drafts'}
DST_SPECIAL = {'Sent Items': '\\Sent', 'Deleted Items': '\\Trash'}

D1999 = 915181200        # 1999-01-01 09:00:00 UTC
D2005 = 1118000000       # 2005-06-05 19:33:20 UTC
D2015 = 1430000000

MB = 1024 * 1024

# Source folder names (UTF-8, '.' separator).
STANDARD_FOLDERS = ['Archive', 'Archive.2020', 'Archive.2020.Q1',
                    'Entwürfe', '日本語', 'a/b', 'Empty', 'Unsub']
UNSUBSCRIBED = ['Unsub']


def _msg8bit(i):
    """A message with raw UTF-8 in its body (8bit)."""
    return ('From: <a@example.org>\r\nTo: <b@example.net>\r\n'
            'Subject: 8bit %d\r\nDate: Mon, 01 Jun 2015 10:00:00 +0000\r\n'
            'Message-ID: <8bit-%d@mailshift.test>\r\nMIME-Version: 1.0\r\n'
            'Content-Type: text/plain; charset=utf-8\r\n'
            'Content-Transfer-Encoding: 8bit\r\n\r\n'
            'Grüße aus Köln — 日本語のテキスト %d\r\n' % (i, i, i)).encode()


def fill_standard(imap, big=True, base=0):
    """The standard corpus (see the module docstring of test_mover).
    big: include the 20 MB message. base: offset for message numbers, so
    two users' corpora differ."""
    for f in STANDARD_FOLDERS:
        mc.create_folder(imap, f, subscribe=f not in UNSUBSCRIBED)
    b = base
    flagsets = [[], ['\\Seen'], ['\\Seen', '\\Flagged'],
                ['\\Answered', '\\Seen'], ['$Forwarded', '\\Seen'],
                ['project-x'], ['\\Deleted', '\\Seen'],
                ['\\Draft'], ['$Forwarded', 'project-x', '\\Flagged']]
    inbox = []
    for i in range(1, 19):
        inbox.append((mc.make_message(b + i, 400 + 250 * i),
                      flagsets[i % len(flagsets)], D2015 + i * 3600))
    inbox += [
        # no Message-ID at all
        (mc.make_message(b + 100, 900, msgid=False), ['\\Seen'], D2015),
        (mc.make_message(b + 101, 1200, msgid=False), [], D2015 + 5),
        # two different messages with the same Message-ID
        (mc.make_message(b + 102, 800, msgid='<same@mailshift.test>'),
         ['\\Seen'], D2015 + 60),
        (mc.make_message(b + 103, 1500, msgid='<same@mailshift.test>'),
         ['\\Flagged'], D2015 + 120),
        # old INTERNALDATEs
        (mc.make_message(b + 104, 700, date=D1999), ['\\Seen'], D1999),
        (mc.make_message(b + 105, 700, date=D2005), ['\\Answered'], D2005),
        # \Deleted but not expunged
        (mc.make_message(b + 106, 600), ['\\Deleted'], D2015 + 7),
        (_msg8bit(b + 107), ['\\Seen'], D2015 + 8),
    ]
    # the same bytes twice (a real mailbox can hold a message twice)
    twin = mc.make_message(b + 108, 1000)
    inbox += [(twin, ['\\Seen'], D2015 + 9), (twin, ['\\Seen'], D2015 + 9)]
    mc.append_many(imap, 'INBOX', inbox)
    mc.append_many(imap, 'Archive', [
        (mc.make_message(b + 200 + i, 2000), ['\\Seen'], D2005 + i)
        for i in range(3)])
    mc.append_many(imap, 'Archive.2020', [
        (mc.make_message(b + 210, 3000, date=D1999), ['\\Seen'], D1999),
        (mc.make_message(b + 211, 3000), ['$Forwarded'], D2015),
        (mc.make_message(b + 212, 3000, msgid=False), [], D2015 + 1)])
    q1 = [(mc.make_message(b + 220 + i, 5000), ['\\Seen', 'project-x'],
           D2015 + 100 + i) for i in range(3)]
    if big:
        q1.append((mc.make_message(b + 229, 20 * MB), ['$Forwarded',
                                                       '\\Seen'], D2005))
    mc.append_many(imap, 'Archive.2020.Q1', q1, batch=1)
    mc.append_many(imap, 'Sent', [
        (mc.make_message(b + 300 + i, 1500), ['\\Seen'], D2015 + 300 + i)
        for i in range(3)])
    mc.append_many(imap, 'Trash', [
        (mc.make_message(b + 310, 1000), ['\\Seen', '\\Deleted'], D2015),
        (mc.make_message(b + 311, 1000), ['\\Seen'], D2015)])
    mc.append_many(imap, 'Drafts', [
        (mc.make_message(b + 320 + i, 800, msgid=False), ['\\Draft'],
         D2015 + i) for i in range(2)])
    mc.append_many(imap, 'Entwürfe', [
        (mc.make_message(b + 330 + i, 900), ['\\Draft', '\\Seen'], D2015 + i)
        for i in range(2)])
    mc.append_many(imap, '日本語', [
        (_msg8bit(b + 340), [], D2015),
        (mc.make_message(b + 341, 1300), ['\\Answered'], D2005)])
    mc.append_many(imap, 'a/b', [
        (mc.make_message(b + 350 + i, 700), ['\\Seen'], D2015 + i)
        for i in range(2)])
    mc.append_many(imap, 'Unsub', [
        (mc.make_message(b + 360, 700), [], D2015)])


def fill_small(imap, base):
    """A small corpus: INBOX (10) and Work (5)."""
    mc.create_folder(imap, 'Work')
    mc.append_many(imap, 'INBOX', [
        (mc.make_message(base + i, 500 + 100 * i,
                         msgid=False if i == 3 else None),
         ['\\Seen'] if i % 2 else [], D2015 + i) for i in range(10)])
    mc.append_many(imap, 'Work', [
        (mc.make_message(base + 50 + i, 800), ['$Forwarded'] if i == 1
         else [], D2005 + i) for i in range(5)])


BULK_FOLDERS = {'INBOX': 1000, 'Bulk.A': 800, 'Bulk.B': 700, 'Bulk.C': 500}
BULK_BIG = ('Bulk.Big', 4)


def fill_bulk(imap, base=100000):
    """~3000 small messages over several folders and 4 x 1 MB ones. Every
    97th message has no Message-ID; every 101st repeats the previous
    message's Message-ID with different bytes."""
    n = base
    for folder, count in BULK_FOLDERS.items():
        if folder != 'INBOX':
            mc.create_folder(imap, folder)
        items = []
        for i in range(count):
            n += 1
            if i % 97 == 5:
                msgid = False
            elif i % 101 == 7:
                msgid = '<msg-%d@mailshift.test>' % (n - 1)
            else:
                msgid = None
            flags = [['\\Seen'], [], ['\\Seen', '$Forwarded'],
                     ['\\Flagged']][i % 4]
            items.append((mc.make_message(n, 300 + (i * 37) % 900,
                                          msgid=msgid), flags, D2015 + n))
        mc.append_many(imap, folder, items)
    folder, count = BULK_BIG
    mc.create_folder(imap, folder)
    mc.append_many(imap, folder, [
        (mc.make_message(n + 1 + i, MB), ['\\Seen'], D2005 + i)
        for i in range(count)], batch=1)
    return sum(BULK_FOLDERS.values()) + count


def fill_pop3(imap, base=500000):
    """INBOX only (POP3 sees nothing else): 15 messages, one of 1 MB, two
    without Message-ID, two sharing one."""
    items = []
    for i in range(12):
        items.append((mc.make_message(base + i, 600 + 300 * i), [],
                      D2015 + i))
    items += [
        (mc.make_message(base + 20, 900, msgid=False), [], D2015),
        (mc.make_message(base + 21, 950, msgid='<msg-%d@mailshift.test>'
                         % (base + 1)), [], D2015),
        (mc.make_message(base + 22, MB), ['\\Seen'], D2005),
    ]
    mc.append_many(imap, 'INBOX', items)
    return len(items)
