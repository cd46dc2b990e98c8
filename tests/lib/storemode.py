"""Which store engine the integration suite runs on.

MS_TEST_STORE=postgresql runs the whole suite on PostgreSQL: each process
(each pytest-xdist worker) starts one throwaway server (postgres.Postgres)
the first time a store is asked for, and every store the tests name by a
SQLite path becomes a database of its own on it. Unset (or sqlite), the
stores are the SQLite files the tests name. make check runs the suite once
on each engine (docs/testing.md).

    target = store_for('/tmp/x/store.db')   # the path, or a postgresql:// URL
    rows = rows_of(target_or_path, 'SELECT count(*) FROM users')
    data = dump_of(target_or_path)          # every row, as bytes

A test about the SQLite file itself (its bytes, its locks, its mode and
owner) is marked @pytest.mark.sqlite_store: within it store_for() keeps
the path whatever the engine (conftest.py's autouse fixture sets it).

The server's password file is in PGPASSFILE of this process's environment
from its start on, so every mailshiftd and mailshiftctl the tests start
finds it, as an operator's would.
"""

import atexit
import itertools
import os
import re
import sqlite3
import threading

import dovecot

ENGINE = os.environ.get('MS_TEST_STORE', 'sqlite')
if ENGINE not in ('sqlite', 'postgresql'):
    raise SystemExit('MS_TEST_STORE: sqlite or postgresql, not %r' % ENGINE)

_lock = threading.Lock()
_pg = None
_urls = {}                 # SQLite path -> its database's URL
_count = itertools.count(1)
force_sqlite = False       # a @pytest.mark.sqlite_store test runs


def is_url(target):
    return target.startswith(('postgresql://', 'postgres://'))


def on_postgresql():
    return ENGINE == 'postgresql' and not force_sqlite


def server():
    """This process's PostgreSQL server, started on first use."""
    global _pg
    with _lock:
        if _pg is None:
            import postgres
            pg = postgres.Postgres(dovecot.make_test_root(
                prefix='mailshift-store-pg-'))
            pg.start()
            os.environ['PGPASSFILE'] = pg.passfile
            atexit.register(pg.stop)
            _pg = pg
        return _pg


def store_for(path):
    """The store a test that names path runs on: path itself, or on
    PostgreSQL the URL of a database made for that path (the same one each
    time the path is named)."""
    if is_url(path) or not on_postgresql():
        return path
    path = os.path.abspath(path)
    with _lock:
        url = _urls.get(path)
    if url is None:
        pg = server()
        name = 'st%d_%d' % (os.getpid(), next(_count))
        pg.create_db(name)
        # over the UNIX socket: a daemon in a test's network namespace
        # reaches it too
        url = pg.socket_url(name)
        with _lock:
            url = _urls.setdefault(path, url)
    return url


def resolve(path_or_url):
    """What a path names now: its database when one was made for it."""
    if is_url(path_or_url):
        return path_or_url
    with _lock:
        return _urls.get(os.path.abspath(path_or_url), path_or_url)


def _db_name(url):
    m = re.match(r'postgres(?:ql)?://[^/]*/([^?]+)', url)
    if m is None:
        raise ValueError('no database in %s' % url)
    return m.group(1)


def _pg_connect(url):
    import psycopg2
    pg = server()
    con = psycopg2.connect(host=pg.sock_dir, port=pg.port, user='postgres',
                           dbname=_db_name(url))
    con.set_session(readonly=True, autocommit=True)
    return con


def _pg_rows(url):
    """(table, row) for every row of every table of the database."""
    con = _pg_connect(url)
    try:
        cur = con.cursor()
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = "
                    "current_schema()")
        out = []
        for (table,) in cur.fetchall():
            cur.execute('SELECT * FROM "%s"' % table)
            out += [(table, tuple(bytes(v) if isinstance(v, memoryview)
                                  else v for v in row))
                    for row in cur.fetchall()]
        return out
    finally:
        con.close()


def rows_of(path_or_url, sql, timeout=5):
    """The rows of one read-only query, as tuples of ints, strs, bytes
    and None on either engine."""
    target = resolve(path_or_url)
    if is_url(target):
        con = _pg_connect(target)
        try:
            cur = con.cursor()
            cur.execute(sql)
            return [tuple(bytes(v) if isinstance(v, memoryview) else v
                          for v in row) for row in cur.fetchall()]
        finally:
            con.close()
    con = sqlite3.connect('file:%s?mode=ro' % target, uri=True,
                          timeout=timeout)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def exists(path_or_url):
    target = resolve(path_or_url)
    return is_url(target) or os.path.exists(target)


def dump_of(path_or_url):
    """Every byte the store holds: the SQLite file (with -wal, -shm,
    -journal), or every row of every table of the database as text."""
    target = resolve(path_or_url)
    if not is_url(target):
        data = b''
        for suffix in ('', '-wal', '-shm', '-journal'):
            try:
                with open(target + suffix, 'rb') as f:
                    data += f.read()
            except OSError:
                pass
        return data
    return '\n'.join(repr(row) for _, row in _pg_rows(target)).encode()


def rows_dump(path_or_url):
    """Every table's rows in a stable order, read-only: equal dumps, same
    rows (what a run that must change nothing compares)."""
    target = resolve(path_or_url)
    if not is_url(target):
        con = sqlite3.connect('file:%s?mode=ro' % target, uri=True)
        try:
            return list(con.iterdump())
        finally:
            con.close()
    return sorted('%s %r' % (table, row) for table, row in _pg_rows(target))


def admin(path_or_url, sql):
    """Runs sql as the server's superuser in the database made for path
    (PostgreSQL only)."""
    server().admin(_db_name(resolve(path_or_url)), sql)
