/* Unit tests for daemon/store.c, each against a fresh store in its own
 * temporary directory, or, when MS_TEST_STORE_URL names a PostgreSQL
 * database (make unit-pg), in that database emptied first. The tests of
 * what only SQLite has (its file, pragmas, old files) are skipped there,
 * and PostgreSQL's own bad input is checked instead. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <libpq-fe.h>
#include <sqlite3.h>

#include "store.h"

struct fixture {
	char dir[64];
	char path[512];			/* the file, or the URL */
	struct ms_store *store;
};

/* MS_TEST_STORE_URL, or NULL for SQLite */
static const char *pg_url;

/* A connection to the test database, for what the test checks beside the
 * store (as another gateway would see it). */
static PGconn *pg_connect(void)
{
	PGconn *c = PQconnectdb(pg_url);

	if (PQstatus(c) != CONNECTION_OK) {
		fprintf(stderr, "%s: %s", pg_url, PQerrorMessage(c));
		fail();
	}
	return c;
}

/* Runs sql; the first column of the first row (NULL for none) into buf. */
static void pg_sql(const char *sql, char *buf, size_t size)
{
	PGconn *c = pg_connect();
	PGresult *res = PQexec(c, sql);
	ExecStatusType rc = PQresultStatus(res);

	if (rc != PGRES_TUPLES_OK && rc != PGRES_COMMAND_OK) {
		fprintf(stderr, "%s: %s", sql, PQresultErrorMessage(res));
		fail();
	}
	if (buf != NULL) {
		assert_true(rc == PGRES_TUPLES_OK && PQntuples(res) > 0);
		snprintf(buf, size, "%s", PQgetisnull(res, 0, 0) ? "(null)" :
			 PQgetvalue(res, 0, 0));
	}
	PQclear(res);
	PQfinish(c);
}

/* What each engine says of a row whose parent is missing */
#define FK_ERROR (pg_url != NULL ? "foreign key" : "FOREIGN KEY")

/* SQLite's own tests have nothing to check on PostgreSQL. */
#define SQLITE_ONLY() do { if (pg_url != NULL) skip(); } while (0)

static void store_path(const struct fixture *f, const char *suffix,
		       char *buf, size_t size)
{
	snprintf(buf, size, "%s%s", f->path, suffix);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	char *error = NULL;

	if (f == NULL)
		return -1;
	snprintf(f->dir, sizeof(f->dir), "/tmp/ms-store-test.XXXXXX");
	if (mkdtemp(f->dir) == NULL) {
		free(f);
		return -1;
	}
	snprintf(f->path, sizeof(f->path), "%s/store.db", f->dir);
	if (pg_url != NULL) {
		snprintf(f->path, sizeof(f->path), "%s", pg_url);
		pg_sql("SET client_min_messages = warning; DROP SCHEMA public "
		       "CASCADE; CREATE SCHEMA public",
		       NULL, 0);
	}
	/* the common umask: SQLite alone would make the file 0644 */
	umask(022);
	if (ms_store_open(f->path, &f->store, &error) < 0) {
		fprintf(stderr, "ms_store_open: %s\n", error);
		free(error);
		rmdir(f->dir);
		free(f);
		return -1;
	}
	assert_null(error);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;
	static const char *const suffixes[] = { "", "-wal", "-shm",
						"-journal" };
	char buf[160];
	size_t i;

	ms_store_close(&f->store);
	for (i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
		store_path(f, suffixes[i], buf, sizeof(buf));
		unlink(buf);
	}
	if (rmdir(f->dir) < 0)
		fprintf(stderr, "leftover files in %s\n", f->dir);
	free(f);
	return 0;
}

/* One integer from a separate SQLite connection, as another process would
 * see the file. */
static int64_t sql_int(const struct fixture *f, const char *sql)
{
	sqlite3 *db;
	sqlite3_stmt *st;
	int64_t v;
	char buf[32];

	if (pg_url != NULL) {
		pg_sql(sql, buf, sizeof(buf));
		/* a boolean comes as t or f, where SQLite has 1 and 0 */
		if (!strcmp(buf, "t") || !strcmp(buf, "f"))
			return buf[0] == 't';
		return strtoll(buf, NULL, 10);
	}
	assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY,
					 NULL), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL),
			 SQLITE_OK);
	assert_int_equal(sqlite3_step(st), SQLITE_ROW);
	v = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	sqlite3_close(db);
	return v;
}

static void sql_text(const struct fixture *f, const char *sql, char *buf,
		     size_t size)
{
	sqlite3 *db;
	sqlite3_stmt *st;
	const unsigned char *t;

	if (pg_url != NULL) {
		pg_sql(sql, buf, size);
		return;
	}
	assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY,
					 NULL), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL),
			 SQLITE_OK);
	assert_int_equal(sqlite3_step(st), SQLITE_ROW);
	t = sqlite3_column_text(st, 0);
	snprintf(buf, size, "%s", t ? (const char *)t : "(null)");
	sqlite3_finalize(st);
	sqlite3_close(db);
}

static int64_t make_folder(struct fixture *f, const char *user,
			   const char *folder)
{
	struct ms_folder_state fs;
	int64_t uid;

	assert_int_equal(ms_store_user_get(f->store, user, &uid), 0);
	assert_int_equal(ms_store_folder_get(f->store, uid, folder, &fs), 0);
	return fs.id;
}

static void imap_rec(struct ms_msg_rec *r, uint32_t uid, int state)
{
	memset(r, 0, sizeof(*r));
	r->src_uid = uid;
	r->state = state;
	r->size = 1000 + uid;
	r->date = 837596665 + uid;
	snprintf(r->msgid, sizeof(r->msgid), "<%u@example.net>", uid);
	snprintf(r->flags, sizeof(r->flags), "\\Seen");
	r->dst_floor = 100 + uid;
}

static void test_open_file(void **state)
{
	struct fixture *f = *state;
	struct stat st;
	char buf[160], mode[16];
	char *error = NULL;
	struct ms_store *s = NULL;

	SQLITE_ONLY();
	assert_int_equal(stat(f->path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	/* the WAL and its index inherit the database's mode */
	store_path(f, "-wal", buf, sizeof(buf));
	if (stat(buf, &st) == 0)
		assert_int_equal(st.st_mode & 0777, 0600);

	sql_text(f, "PRAGMA journal_mode", mode, sizeof(mode));
	assert_string_equal(mode, "wal");
	assert_int_equal(sql_int(f, "PRAGMA user_version"),
			 MS_STORE_SCHEMA_VERSION);
	assert_int_equal(sql_int(f, "SELECT count(*) FROM sqlite_master "
				 "WHERE type = 'table' AND name IN "
				 "('users', 'folders', 'messages', 'rintents')"),
			 4);

	/* no parent directory is created */
	snprintf(buf, sizeof(buf), "%s/nonexistent/store.db", f->dir);
	assert_int_equal(ms_store_open(buf, &s, &error), -1);
	assert_null(s);
	assert_non_null(error);
	assert_non_null(strstr(error, "nonexistent"));
	free(error);

	/* a store from a newer mailshift is refused, not "upgraded" */
	{
		sqlite3 *db;
		char sql[64];

		store_path(f, ".new", buf, sizeof(buf));
		assert_int_equal(sqlite3_open(buf, &db), SQLITE_OK);
		snprintf(sql, sizeof(sql), "PRAGMA user_version = %d",
			 MS_STORE_SCHEMA_VERSION + 1);
		assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL),
				 SQLITE_OK);
		sqlite3_close(db);
		error = NULL;
		assert_int_equal(ms_store_open(buf, &s, &error), -1);
		assert_non_null(error);
		assert_non_null(strstr(error, "newer"));
		free(error);
		unlink(buf);
	}
}

static void test_users(void **state)
{
	struct fixture *f = *state;
	int64_t a, a2, b;
	char buf[256];

	assert_int_equal(ms_store_user_get(f->store, "alice", &a), 0);
	assert_int_equal(ms_store_user_get(f->store, "alice", &a2), 0);
	assert_int_equal(a, a2);
	assert_int_equal(ms_store_user_get(f->store, "bob", &b), 0);
	assert_int_not_equal(a, b);

	sql_text(f, "SELECT state FROM users WHERE name = 'alice'", buf,
		 sizeof(buf));
	assert_string_equal(buf, "source");

	assert_int_equal(ms_store_user_set_state(f->store, a, "failed",
						 "source: login failed"), 0);
	sql_text(f, "SELECT state || ' ' || last_error FROM users "
		 "WHERE name = 'alice'", buf, sizeof(buf));
	assert_string_equal(buf, "failed source: login failed");
	assert_int_equal(ms_store_user_set_state(f->store, a, "copying",
						 NULL), 0);
	assert_int_equal(sql_int(f, "SELECT last_error IS NULL FROM users "
				 "WHERE name = 'alice'"), 1);

	assert_int_equal(ms_store_user_set_state(f->store, a, "bogus", NULL),
			 -1);
	assert_non_null(strstr(ms_store_error(f->store), "bogus"));
	assert_int_equal(ms_store_user_set_state(f->store, 9999, "copying",
						 NULL), -1);
	assert_non_null(strstr(ms_store_error(f->store), "no such user"));

	assert_int_equal(ms_store_user_add_progress(f->store, a, 3, 3000), 0);
	assert_int_equal(ms_store_user_add_progress(f->store, a, 2, 500), 0);
	assert_int_equal(sql_int(f, "SELECT msgs_copied FROM users "
				 "WHERE name = 'alice'"), 5);
	assert_int_equal(sql_int(f, "SELECT bytes_copied FROM users "
				 "WHERE name = 'alice'"), 3500);
	assert_int_equal(sql_int(f, "SELECT msgs_copied FROM users "
				 "WHERE name = 'bob'"), 0);
	assert_int_equal(ms_store_user_add_progress(f->store, 9999, 1, 1),
			 -1);
}

static void test_folders(void **state)
{
	struct fixture *f = *state;
	struct ms_folder_state fs, fs2, other;
	struct ms_msg_rec r;
	int64_t uid, uid2;
	uint64_t n;
	char name[1100];

	assert_int_equal(ms_store_user_get(f->store, "alice", &uid), 0);
	assert_int_equal(ms_store_user_get(f->store, "bob", &uid2), 0);

	memset(&fs, 0xa5, sizeof(fs));
	assert_int_equal(ms_store_folder_get(f->store, uid, "Archive.2020",
					     &fs), 0);
	assert_true(fs.id > 0);
	assert_int_equal(fs.user_id, uid);
	assert_string_equal(fs.src_name, "Archive.2020");
	assert_string_equal(fs.dst_name, "");
	assert_int_equal(fs.src_uidvalidity, 0);
	assert_int_equal(fs.dst_uidvalidity, 0);
	assert_int_equal(fs.hwm, 0);
	assert_int_equal(fs.modseq, 0);
	assert_int_equal(fs.msgs, 0);
	assert_int_equal(fs.bytes, 0);

	/* same (user, name): same row; other user: another row */
	assert_int_equal(ms_store_folder_get(f->store, uid, "Archive.2020",
					     &fs2), 0);
	assert_int_equal(fs2.id, fs.id);
	assert_int_equal(ms_store_folder_get(f->store, uid2, "Archive.2020",
					     &other), 0);
	assert_int_not_equal(other.id, fs.id);

	snprintf(fs.dst_name, sizeof(fs.dst_name), "Archive/2020");
	fs.src_uidvalidity = 4000000000u;
	fs.dst_uidvalidity = 77;
	fs.hwm = 4294967295u;
	fs.modseq = 9223372036854775807ull;
	fs.msgs = 12;
	fs.bytes = 1ull << 40;
	assert_int_equal(ms_store_folder_update(f->store, &fs), 0);
	assert_int_equal(ms_store_folder_get(f->store, uid, "Archive.2020",
					     &fs2), 0);
	assert_memory_equal(&fs, &fs2, offsetof(struct ms_folder_state,
						src_name));
	assert_string_equal(fs2.dst_name, "Archive/2020");
	assert_int_equal(fs2.src_uidvalidity, 4000000000u);
	assert_int_equal(fs2.dst_uidvalidity, 77);
	assert_int_equal(fs2.hwm, 4294967295u);
	assert_true(fs2.modseq == 9223372036854775807ull);
	assert_int_equal(fs2.msgs, 12);
	assert_true(fs2.bytes == 1ull << 40);

	/* reset forgets messages and state but keeps the destination name */
	imap_rec(&r, 5, MS_MSG_DONE);
	assert_int_equal(ms_store_msg_put(f->store, fs.id, &r), 0);
	imap_rec(&r, 6, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fs.id, &r), 0);
	assert_int_equal(ms_store_msg_put(f->store, other.id, &r), 0);
	assert_int_equal(ms_store_folder_reset(f->store, fs.id), 0);
	assert_int_equal(ms_store_folder_get(f->store, uid, "Archive.2020",
					     &fs2), 0);
	assert_int_equal(fs2.id, fs.id);
	assert_string_equal(fs2.dst_name, "Archive/2020");
	assert_int_equal(fs2.src_uidvalidity, 0);
	assert_int_equal(fs2.dst_uidvalidity, 0);
	assert_int_equal(fs2.hwm, 0);
	assert_int_equal(fs2.modseq, 0);
	assert_int_equal(fs2.msgs, 0);
	assert_int_equal(fs2.bytes, 0);
	assert_int_equal(ms_store_msg_count(f->store, fs.id, -1, &n), 0);
	assert_int_equal(n, 0);
	/* the other user's folder is untouched */
	assert_int_equal(ms_store_msg_count(f->store, other.id, -1, &n), 0);
	assert_int_equal(n, 1);

	/* errors */
	assert_int_equal(ms_store_folder_reset(f->store, 9999), -1);
	assert_non_null(strstr(ms_store_error(f->store), "no such folder"));
	fs2.id = 9999;
	assert_int_equal(ms_store_folder_update(f->store, &fs2), -1);
	assert_int_equal(ms_store_folder_get(f->store, 9999, "x", &fs2), -1);
	assert_non_null(strstr(ms_store_error(f->store), FK_ERROR));
	memset(name, 'a', sizeof(name) - 1);
	name[sizeof(name) - 1] = '\0';
	assert_int_equal(ms_store_folder_get(f->store, uid, name, &fs2), -1);
}

static void test_messages(void **state)
{
	struct fixture *f = *state;
	struct ms_msg_rec r, got;
	int64_t fid = make_folder(f, "alice", "INBOX");
	int found = -1;
	uint64_t n;

	assert_int_equal(ms_store_msg_get(f->store, fid, 1, &got, &found), 0);
	assert_int_equal(found, 0);

	imap_rec(&r, 7, MS_MSG_INTENT);
	r.size = 5000000000ull;
	r.date = -315619200;
	snprintf(r.flags, sizeof(r.flags), "$Forwarded \\Seen");
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 7, &got, &found), 0);
	assert_int_equal(found, 1);
	assert_int_equal(got.src_uid, 7);
	assert_int_equal(got.state, MS_MSG_INTENT);
	assert_true(got.size == 5000000000ull);
	assert_true(got.date == -315619200);
	assert_string_equal(got.msgid, "<7@example.net>");
	assert_string_equal(got.flags, "$Forwarded \\Seen");
	assert_int_equal(got.dst_uid, 0);
	assert_int_equal(got.dst_floor, 107);
	assert_string_equal(got.uidl, "");

	/* done, keeping the recorded flags (NULL) or setting new ones */
	assert_int_equal(ms_store_msg_done(f->store, fid, 7, 42, NULL), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 7, &got, &found), 0);
	assert_int_equal(got.state, MS_MSG_DONE);
	assert_int_equal(got.dst_uid, 42);
	assert_string_equal(got.flags, "$Forwarded \\Seen");
	assert_int_equal(ms_store_msg_done(f->store, fid, 7, 43, "\\Answered"),
			 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 7, &got, &found), 0);
	assert_int_equal(got.dst_uid, 43);
	assert_string_equal(got.flags, "\\Answered");
	assert_int_equal(ms_store_msg_set_flags(f->store, fid, 7, ""), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 7, &got, &found), 0);
	assert_string_equal(got.flags, "");
	assert_int_equal(got.state, MS_MSG_DONE);

	/* done/set_flags need an existing record */
	assert_int_equal(ms_store_msg_done(f->store, fid, 8, 1, NULL), -1);
	assert_non_null(strstr(ms_store_error(f->store),
			       "no such message record"));
	assert_int_equal(ms_store_msg_set_flags(f->store, fid, 8, "x"), -1);
	assert_non_null(strstr(ms_store_error(f->store),
			       "no such message record"));

	/* put replaces */
	imap_rec(&r, 7, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 7, &got, &found), 0);
	assert_int_equal(got.state, MS_MSG_INTENT);
	assert_int_equal(got.dst_uid, 0);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 1);

	/* invalid records */
	imap_rec(&r, 0, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), -1);
	imap_rec(&r, 9, MS_MSG_INTENT);
	snprintf(r.uidl, sizeof(r.uidl), "both");
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), -1);
	imap_rec(&r, 9, 5);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), -1);
	imap_rec(&r, 9, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, 9999, &r), -1);
	assert_non_null(strstr(ms_store_error(f->store), FK_ERROR));

	/* delete; deleting again is fine */
	assert_int_equal(ms_store_msg_delete(f->store, fid, 7, NULL), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 7, &got, &found), 0);
	assert_int_equal(found, 0);
	assert_int_equal(ms_store_msg_delete(f->store, fid, 7, NULL), 0);
}

static void test_uidl(void **state)
{
	struct fixture *f = *state;
	struct ms_msg_rec r, got;
	int64_t fid = make_folder(f, "carol", "INBOX");
	int found;
	uint64_t n;

	memset(&r, 0, sizeof(r));
	r.state = MS_MSG_INTENT;
	r.size = 10;
	snprintf(r.uidl, sizeof(r.uidl), "UID-b");
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	snprintf(r.uidl, sizeof(r.uidl), "UID-a");
	r.size = 20;
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);

	assert_int_equal(ms_store_msg_get_uidl(f->store, fid, "UID-a", &got,
					       &found), 0);
	assert_int_equal(found, 1);
	assert_int_equal(got.src_uid, 0);
	assert_string_equal(got.uidl, "UID-a");
	assert_int_equal(got.size, 20);
	assert_int_equal(ms_store_msg_get_uidl(f->store, fid, "UID-c", &got,
					       &found), 0);
	assert_int_equal(found, 0);
	/* a POP3 record is no IMAP UID 0 record */
	assert_int_equal(ms_store_msg_get(f->store, fid, 0, &got, &found), 0);
	assert_int_equal(found, 0);

	/* replace by UIDL, done by put */
	r.state = MS_MSG_DONE;
	r.dst_uid = 5;
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_msg_get_uidl(f->store, fid, "UID-a", &got,
					       &found), 0);
	assert_int_equal(got.state, MS_MSG_DONE);
	assert_int_equal(got.dst_uid, 5);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(ms_store_msg_count(f->store, fid, MS_MSG_DONE, &n), 0);
	assert_int_equal(n, 1);

	assert_int_equal(ms_store_msg_delete(f->store, fid, 0, "UID-b"), 0);
	assert_int_equal(ms_store_msg_get_uidl(f->store, fid, "UID-b", &got,
					       &found), 0);
	assert_int_equal(found, 0);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 1);
}

struct walk {
	uint32_t uids[4096];
	char uidls[8][128];
	size_t n;
	size_t stop_after;
	struct ms_store *store;
	int64_t folder_id;
};

static int walk_cb(void *ctx, const struct ms_msg_rec *rec)
{
	struct walk *w = ctx;

	if (w->n < sizeof(w->uidls) / sizeof(w->uidls[0]))
		snprintf(w->uidls[w->n], sizeof(w->uidls[0]), "%s", rec->uidl);
	w->uids[w->n++] = rec->src_uid;
	if (w->stop_after && w->n == w->stop_after)
		return 77;
	return 0;
}

/* Marks every record it sees done: the recovery pass does this. */
static int done_cb(void *ctx, const struct ms_msg_rec *rec)
{
	struct walk *w = ctx;

	w->n++;
	return ms_store_msg_done(w->store, w->folder_id, rec->src_uid,
				 rec->src_uid + 1000, NULL);
}

/* The done record with destination UID dst_uid has source UID src_uid
 * (0: there is none). */
static void expect_dst(struct fixture *f, int64_t fid, uint32_t dst_uid,
		       uint32_t src_uid)
{
	struct ms_msg_rec got;
	int found = 7;

	assert_int_equal(ms_store_msg_get_dst(f->store, fid, dst_uid, &got,
					      &found), 0);
	assert_int_equal(found, src_uid != 0);
	if (found) {
		assert_int_equal(got.src_uid, src_uid);
		assert_int_equal(got.state, MS_MSG_DONE);
		assert_int_equal(got.dst_uid, dst_uid);
	}
}

/* The gateway's POP3 UIDLs: done records by destination UID, and the
 * folder a user's INBOX was copied to. */
static void test_by_dst(void **state)
{
	struct fixture *f = *state;
	struct ms_folder_state fs, got_fs;
	struct ms_msg_rec r, got;
	int64_t alice, bob, fid, pfid;
	int found = 7;

	fid = make_folder(f, "alice", "INBOX");
	assert_int_equal(ms_store_user_get(f->store, "alice", &alice), 0);
	assert_int_equal(ms_store_user_get(f->store, "bob", &bob), 0);

	/* no row names the destination's INBOX yet (dst_name ""), and the
	 * lookup creates none */
	assert_int_equal(ms_store_folder_find_dst(f->store, alice, "INBOX",
						  &got_fs, &found), 0);
	assert_int_equal(found, 0);
	assert_int_equal(ms_store_folder_get(f->store, alice, "INBOX", &fs), 0);
	snprintf(fs.dst_name, sizeof(fs.dst_name), "INBOX");
	fs.src_uidvalidity = 11;
	fs.dst_uidvalidity = 22;
	assert_int_equal(ms_store_folder_update(f->store, &fs), 0);
	assert_int_equal(ms_store_folder_find_dst(f->store, alice, "inbox",
						  &got_fs, &found), 0);
	assert_int_equal(found, 1);
	assert_int_equal(got_fs.id, fid);
	assert_int_equal(got_fs.src_uidvalidity, 11);
	assert_int_equal(got_fs.dst_uidvalidity, 22);
	/* another user's rows are not alice's */
	assert_int_equal(ms_store_folder_find_dst(f->store, bob, "INBOX",
						  &got_fs, &found), 0);
	assert_int_equal(found, 0);
	assert_int_equal(sql_int(f, "SELECT count(*) FROM folders"), 1);

	/* done records are found by destination UID, intents are not */
	imap_rec(&r, 5, MS_MSG_INTENT);
	r.dst_uid = 0;
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	imap_rec(&r, 6, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_msg_done(f->store, fid, 6, 1, NULL), 0);
	imap_rec(&r, 9, MS_MSG_DONE);
	r.dst_uid = 2;
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	expect_dst(f, fid, 1, 6);
	expect_dst(f, fid, 2, 9);
	expect_dst(f, fid, 3, 0);
	/* an intent that names a destination UID (a rollback's floor, a
	 * reconciled one not yet marked) is not a copy */
	imap_rec(&r, 10, MS_MSG_INTENT);
	r.dst_uid = 3;
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	expect_dst(f, fid, 3, 0);
	/* the same destination UID in another folder is another message */
	pfid = make_folder(f, "alice", "pop3:INBOX");
	memset(&r, 0, sizeof(r));
	snprintf(r.uidl, sizeof(r.uidl), "UIDL-x");
	r.state = MS_MSG_DONE;
	r.dst_uid = 1;
	assert_int_equal(ms_store_msg_put(f->store, pfid, &r), 0);
	assert_int_equal(ms_store_msg_get_dst(f->store, pfid, 1, &got,
					      &found), 0);
	assert_int_equal(found, 1);
	assert_string_equal(got.uidl, "UIDL-x");
	assert_int_equal(got.src_uid, 0);
	expect_dst(f, fid, 1, 6);
	if (pg_url != NULL) {
		assert_int_equal(sql_int(f, "SELECT count(*) FROM pg_indexes "
					 "WHERE indexname = 'messages_dst'"),
				 1);
		goto reset;
	}
	/* one lookup in the index on both columns, not a scan of the folder
	 * (the store names the index: without statistics SQLite would
	 * rather walk the primary key's folder_id prefix) */
	assert_int_equal(sql_int(f, "SELECT count(*) FROM sqlite_master WHERE "
				 "type = 'index' AND name = 'messages_dst'"), 1);
	{
		sqlite3 *db;
		sqlite3_stmt *st;
		int uses = 0, rc;

		assert_int_equal(sqlite3_open_v2(f->path, &db,
						 SQLITE_OPEN_READONLY, NULL),
				 SQLITE_OK);
		assert_int_equal(sqlite3_prepare_v2(db, "EXPLAIN QUERY PLAN "
			"SELECT src_uid FROM messages INDEXED BY messages_dst "
			"WHERE folder_id = 1 AND dst_uid = 2 AND state = 1", -1,
			&st, NULL), SQLITE_OK);
		while ((rc = sqlite3_step(st)) == SQLITE_ROW)
			uses += strstr((const char *)sqlite3_column_text(st, 3),
				       "messages_dst (folder_id=? AND "
				       "dst_uid=?)") != NULL;
		assert_int_equal(rc, SQLITE_DONE);
		assert_int_equal(uses, 1);
		sqlite3_finalize(st);
		sqlite3_close(db);
	}
reset:
	/* a folder reset forgets them */
	assert_int_equal(ms_store_folder_reset(f->store, fid), 0);
	expect_dst(f, fid, 2, 0);
}

static void test_foreach(void **state)
{
	struct fixture *f = *state;
	struct ms_msg_rec r;
	int64_t fid = make_folder(f, "alice", "INBOX");
	int64_t pop = make_folder(f, "alice", "POP");
	struct walk *w = calloc(1, sizeof(*w));
	uint64_t n;
	uint32_t i;

	assert_non_null(w);
	/* out of order, more than one page, every third one done */
	assert_int_equal(ms_store_begin(f->store), 0);
	for (i = 0; i < 1000; i++) {
		uint32_t uid = (i * 7919) % 1000 + 1;

		imap_rec(&r, uid, uid % 3 == 0 ? MS_MSG_DONE : MS_MSG_INTENT);
		assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	}
	assert_int_equal(ms_store_commit(f->store), 0);

	assert_int_equal(ms_store_msg_foreach(f->store, fid, -1, walk_cb, w),
			 0);
	assert_int_equal(w->n, 1000);
	for (i = 0; i < 1000; i++)
		assert_int_equal(w->uids[i], i + 1);

	memset(w, 0, sizeof(*w));
	assert_int_equal(ms_store_msg_foreach(f->store, fid, MS_MSG_DONE,
					      walk_cb, w), 0);
	assert_int_equal(w->n, 333);
	for (i = 0; i < w->n; i++)
		assert_int_equal(w->uids[i], 3 * (i + 1));
	assert_int_equal(ms_store_msg_count(f->store, fid, MS_MSG_DONE, &n),
			 0);
	assert_int_equal(n, 333);
	assert_int_equal(ms_store_msg_count(f->store, fid, MS_MSG_INTENT, &n),
			 0);
	assert_int_equal(n, 667);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 1000);

	/* a non-zero return stops the walk and is returned */
	memset(w, 0, sizeof(*w));
	w->stop_after = 200;
	assert_int_equal(ms_store_msg_foreach(f->store, fid, -1, walk_cb, w),
			 77);
	assert_int_equal(w->n, 200);

	/* the callback may write to the store, inside a batch or not */
	memset(w, 0, sizeof(*w));
	w->store = f->store;
	w->folder_id = fid;
	assert_int_equal(ms_store_begin(f->store), 0);
	assert_int_equal(ms_store_msg_foreach(f->store, fid, MS_MSG_INTENT,
					      done_cb, w), 0);
	assert_int_equal(ms_store_commit(f->store), 0);
	assert_int_equal(w->n, 667);
	assert_int_equal(ms_store_msg_count(f->store, fid, MS_MSG_INTENT, &n),
			 0);
	assert_int_equal(n, 0);

	/* POP3 records walk in UIDL byte order */
	memset(&r, 0, sizeof(r));
	snprintf(r.uidl, sizeof(r.uidl), "b");
	assert_int_equal(ms_store_msg_put(f->store, pop, &r), 0);
	snprintf(r.uidl, sizeof(r.uidl), "B");
	assert_int_equal(ms_store_msg_put(f->store, pop, &r), 0);
	snprintf(r.uidl, sizeof(r.uidl), "a");
	assert_int_equal(ms_store_msg_put(f->store, pop, &r), 0);
	memset(w, 0, sizeof(*w));
	assert_int_equal(ms_store_msg_foreach(f->store, pop, -1, walk_cb, w),
			 0);
	assert_int_equal(w->n, 3);
	assert_string_equal(w->uidls[0], "B");
	assert_string_equal(w->uidls[1], "a");
	assert_string_equal(w->uidls[2], "b");

	/* empty folder */
	memset(w, 0, sizeof(*w));
	assert_int_equal(ms_store_msg_foreach(f->store, 9999, -1, walk_cb, w),
			 0);
	assert_int_equal(w->n, 0);
	free(w);
}

/* Rollback intents: keyed by destination UID, walked in that order,
 * forgotten with the folder's messages. */
static int rintent_cb(void *ctx, const struct ms_msg_rec *rec)
{
	struct walk *w = ctx;

	assert_int_equal(rec->src_uid, 0);
	assert_int_equal(rec->state, MS_MSG_INTENT);
	assert_string_equal(rec->uidl, "");
	assert_int_equal(rec->size, 1000 + rec->dst_uid);
	assert_int_equal(rec->dst_floor, 100 + rec->dst_uid);
	w->uids[w->n++] = rec->dst_uid;
	/* the walk may write: the recovery deletes what it settles */
	if (w->store != NULL)
		return ms_store_rintent_delete(w->store, w->folder_id,
					       rec->dst_uid);
	return 0;
}

static void test_rintents(void **state)
{
	struct fixture *f = *state;
	struct ms_msg_rec r;
	int64_t fid = make_folder(f, "alice", "INBOX");
	int64_t other = make_folder(f, "alice", "Sent");
	struct walk *w = calloc(1, sizeof(*w));
	uint64_t n;
	uint32_t i;

	assert_non_null(w);
	assert_int_equal(ms_store_begin(f->store), 0);
	for (i = 0; i < 300; i++) {
		uint32_t uid = (i * 7919) % 300 + 1;

		imap_rec(&r, 0, MS_MSG_INTENT);
		r.dst_uid = uid;
		r.size = 1000 + uid;
		r.dst_floor = 100 + uid;
		assert_int_equal(ms_store_rintent_put(f->store, fid, &r), 0);
	}
	assert_int_equal(ms_store_commit(f->store), 0);
	/* put replaces */
	assert_int_equal(ms_store_rintent_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_rintent_count(f->store, fid, &n), 0);
	assert_int_equal(n, 300);
	/* and is no message record */
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 0);
	r.dst_uid = 0;
	assert_int_equal(ms_store_rintent_put(f->store, fid, &r), -1);

	assert_int_equal(ms_store_rintent_foreach(f->store, fid, rintent_cb,
						  w), 0);
	assert_int_equal(w->n, 300);
	for (i = 0; i < 300; i++)
		assert_int_equal(w->uids[i], i + 1);

	assert_int_equal(ms_store_rintent_delete(f->store, fid, 7), 0);
	assert_int_equal(ms_store_rintent_delete(f->store, fid, 7), 0);
	assert_int_equal(ms_store_rintent_count(f->store, fid, &n), 0);
	assert_int_equal(n, 299);

	/* deleting while walking, inside a transaction */
	memset(w, 0, sizeof(*w));
	w->store = f->store;
	w->folder_id = fid;
	assert_int_equal(ms_store_begin(f->store), 0);
	assert_int_equal(ms_store_rintent_foreach(f->store, fid, rintent_cb,
						  w), 0);
	assert_int_equal(ms_store_commit(f->store), 0);
	assert_int_equal(w->n, 299);
	assert_int_equal(ms_store_rintent_count(f->store, fid, &n), 0);
	assert_int_equal(n, 0);

	/* a reset forgets them, in that folder only */
	imap_rec(&r, 0, MS_MSG_INTENT);
	r.dst_uid = 5;
	assert_int_equal(ms_store_rintent_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_rintent_put(f->store, other, &r), 0);
	assert_int_equal(ms_store_folder_reset(f->store, fid), 0);
	assert_int_equal(ms_store_rintent_count(f->store, fid, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(ms_store_rintent_count(f->store, other, &n), 0);
	assert_int_equal(n, 1);
	free(w);
}

struct folder_walk {
	char names[8][64];
	uint32_t hwm[8];
	size_t n;
};

static int folder_cb(void *ctx, const struct ms_folder_state *st)
{
	struct folder_walk *fw = ctx;

	snprintf(fw->names[fw->n], sizeof(fw->names[0]), "%s", st->src_name);
	fw->hwm[fw->n++] = st->hwm;
	return fw->n == 8 ? 5 : 0;
}

static int rename_cb(void *ctx, const char *old_name, const char *dst_name,
		     char sep)
{
	char *buf = ctx;
	size_t n = strlen(buf);

	snprintf(buf + n, 256 - n, "%s>%s%c;", old_name, dst_name, sep);
	return 0;
}

/* Folder identity: no row is "never tried"; LOST rows are counted per
 * user and folder; the row goes with its folder. Renames: counted as
 * needing the view too, walked per user, gone when cleared. */
static void test_identity(void **state)
{
	struct fixture *f = *state;
	struct ms_folder_state a, b, c, d;
	int64_t alice, bob, carol;
	struct ms_view_count vc;
	char walk[256] = "";
	int st;

	assert_int_equal(ms_store_user_get(f->store, "alice", &alice), 0);
	assert_int_equal(ms_store_user_get(f->store, "bob", &bob), 0);
	assert_int_equal(ms_store_user_get(f->store, "carol", &carol), 0);
	assert_int_equal(ms_store_folder_get(f->store, alice, "INBOX", &a), 0);
	assert_int_equal(ms_store_folder_get(f->store, alice, "Work", &b), 0);
	assert_int_equal(ms_store_folder_get(f->store, bob, "INBOX", &c), 0);
	assert_int_equal(ms_store_folder_get(f->store, carol, "Sent", &d), 0);
	assert_int_equal(ms_store_identity_get(f->store, a.id, &st), 0);
	assert_int_equal(st, MS_ID_NONE);
	assert_int_equal(ms_store_identity_set(f->store, a.id, MS_ID_KEPT,
					       NULL), 0);
	assert_int_equal(ms_store_identity_get(f->store, a.id, &st), 0);
	assert_int_equal(st, MS_ID_KEPT);
	assert_int_equal(ms_store_view_count(f->store, &vc), 0);
	assert_int_equal(vc.users, 0);
	assert_int_equal(vc.lost_folders, 0);
	assert_int_equal(ms_store_identity_set(f->store, a.id, MS_ID_LOST,
					       "wrong key"), 0);
	assert_int_equal(ms_store_identity_set(f->store, b.id, MS_ID_LOST,
					       "not empty"), 0);
	assert_int_equal(ms_store_identity_set(f->store, c.id, MS_ID_KEPT,
					       NULL), 0);
	assert_int_equal(ms_store_identity_get(f->store, a.id, &st), 0);
	assert_int_equal(st, MS_ID_LOST);
	assert_int_equal(ms_store_view_count(f->store, &vc), 0);
	assert_int_equal(vc.users, 1);
	assert_int_equal(vc.lost_folders, 2);
	assert_int_equal(vc.renamed_folders, 0);
	assert_int_equal(sql_int(f, "SELECT count(*) FROM folder_identity"), 3);

	/* carol kept her identity, but "Sent" became "Sent Items": she
	 * needs the view too; alice's renamed folder counts her once */
	assert_int_equal(ms_store_identity_set(f->store, d.id, MS_ID_KEPT,
					       NULL), 0);
	snprintf(d.dst_name, sizeof(d.dst_name), "Sent Items");
	assert_int_equal(ms_store_folder_update(f->store, &d), 0);
	snprintf(b.dst_name, sizeof(b.dst_name), "Projects");
	assert_int_equal(ms_store_folder_update(f->store, &b), 0);
	assert_int_equal(ms_store_rename_set(f->store, d.id, "Sent", '/'), 0);
	assert_int_equal(ms_store_rename_set(f->store, d.id, "Sent", '.'), 0);
	assert_int_equal(ms_store_rename_set(f->store, b.id, "Work", '.'), 0);
	assert_int_equal(ms_store_view_count(f->store, &vc), 0);
	assert_int_equal(vc.users, 2);
	assert_int_equal(vc.lost_users, 1);
	assert_int_equal(vc.lost_folders, 2);
	assert_int_equal(vc.renamed_folders, 2);
	assert_int_equal(ms_store_rename_foreach(f->store, carol, rename_cb,
						 walk), 0);
	assert_string_equal(walk, "Sent>Sent Items.;");
	assert_int_equal(ms_store_rename_set(f->store, d.id, NULL, 0), 0);
	assert_int_equal(ms_store_view_count(f->store, &vc), 0);
	assert_int_equal(vc.users, 1);
	assert_int_equal(vc.renamed_folders, 1);
}

static void test_folder_foreach(void **state)
{
	struct fixture *f = *state;
	struct ms_folder_state fs;
	struct folder_walk fw = { 0 };
	int64_t alice, bob;

	assert_int_equal(ms_store_user_get(f->store, "alice", &alice), 0);
	assert_int_equal(ms_store_user_get(f->store, "bob", &bob), 0);
	assert_int_equal(ms_store_folder_foreach(f->store, alice, folder_cb,
						 &fw), 0);
	assert_int_equal(fw.n, 0);
	make_folder(f, "alice", "Sent");
	make_folder(f, "bob", "Other");
	assert_int_equal(ms_store_folder_get(f->store, alice, "INBOX", &fs), 0);
	fs.hwm = 42;
	assert_int_equal(ms_store_folder_update(f->store, &fs), 0);
	assert_int_equal(ms_store_folder_foreach(f->store, alice, folder_cb,
						 &fw), 0);
	assert_int_equal(fw.n, 2);
	assert_string_equal(fw.names[0], "INBOX");
	assert_int_equal(fw.hwm[0], 42);
	assert_string_equal(fw.names[1], "Sent");
}

/* A store written by the first schema gains the rintents table and keeps
 * its rows. */
static void test_upgrade(void **state)
{
	struct fixture *f = *state;
	struct ms_store *s = NULL;
	struct ms_folder_state fs;
	struct ms_msg_rec r;
	sqlite3 *db;
	char buf[160];
	int64_t uid;
	uint64_t n;

	SQLITE_ONLY();
	store_path(f, ".v1", buf, sizeof(buf));
	assert_int_equal(sqlite3_open(buf, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db,
		"CREATE TABLE users (id INTEGER PRIMARY KEY,"
		" name TEXT UNIQUE NOT NULL, state TEXT NOT NULL DEFAULT"
		" 'source', policy TEXT, last_error TEXT, msgs_copied INTEGER"
		" DEFAULT 0, bytes_copied INTEGER DEFAULT 0, updated_at"
		" INTEGER);"
		"CREATE TABLE folders (id INTEGER PRIMARY KEY, user_id INTEGER"
		" REFERENCES users(id) ON DELETE CASCADE, src_name TEXT NOT"
		" NULL, dst_name TEXT NOT NULL DEFAULT '', src_uidvalidity"
		" INTEGER, dst_uidvalidity INTEGER, hwm INTEGER, modseq"
		" INTEGER, msgs INTEGER, bytes INTEGER,"
		" UNIQUE(user_id, src_name));"
		"CREATE TABLE messages (folder_id INTEGER REFERENCES"
		" folders(id) ON DELETE CASCADE, src_uid INTEGER NOT NULL,"
		" uidl TEXT NOT NULL DEFAULT '', state INTEGER, size INTEGER,"
		" date INTEGER, msgid TEXT, flags TEXT, dst_uid INTEGER,"
		" dst_floor INTEGER, PRIMARY KEY(folder_id, src_uid, uidl))"
		" WITHOUT ROWID;"
		"INSERT INTO users (id, name) VALUES (1, 'old');"
		"INSERT INTO folders VALUES (1, 1, 'INBOX', 'INBOX', 5, 6, 9,"
		" 0, 1, 10);"
		"PRAGMA user_version = 1;", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);

	assert_int_equal(ms_store_open(buf, &s, NULL), 0);
	/* the gateway's lookup by destination UID works on the old rows */
	{
		struct ms_msg_rec got;
		int found = 0;

		assert_int_equal(ms_store_msg_get_dst(s, 1, 4, &got, &found), 0);
		assert_int_equal(found, 0);
	}
	assert_int_equal(ms_store_user_get(s, "old", &uid), 0);
	assert_int_equal(uid, 1);
	assert_int_equal(ms_store_folder_get(s, uid, "INBOX", &fs), 0);
	assert_int_equal(fs.hwm, 9);
	imap_rec(&r, 0, MS_MSG_INTENT);
	r.dst_uid = 3;
	assert_int_equal(ms_store_rintent_put(s, fs.id, &r), 0);
	assert_int_equal(ms_store_rintent_count(s, fs.id, &n), 0);
	assert_int_equal(n, 1);
	/* schema 6's survey table is there too */
	{
		struct ms_user_size sz = { .messages = 3, .bytes = 300,
					   .how = "status-size" };

		assert_int_equal(ms_store_size_set(s, uid, &sz), 0);
	}
	ms_store_close(&s);
	/* and reopening it changes nothing */
	assert_int_equal(ms_store_open(buf, &s, NULL), 0);
	assert_int_equal(ms_store_rintent_count(s, fs.id, &n), 0);
	assert_int_equal(n, 1);
	ms_store_close(&s);
	for (const char *const *sfx = (const char *const[]){ "", "-wal",
	     "-shm", NULL }; *sfx != NULL; sfx++) {
		char p[200];

		snprintf(p, sizeof(p), "%s%s", buf, *sfx);
		unlink(p);
	}
}

static void test_transactions(void **state)
{
	struct fixture *f = *state;
	struct ms_msg_rec r, got;
	int64_t fid = make_folder(f, "alice", "INBOX");
	int found;
	uint64_t n;

	/* rollback discards */
	assert_int_equal(ms_store_begin(f->store), 0);
	imap_rec(&r, 1, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 1, &got, &found), 0);
	assert_int_equal(found, 1);
	assert_int_equal(ms_store_rollback(f->store), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 1, &got, &found), 0);
	assert_int_equal(found, 0);

	/* nested: only the outermost commit counts */
	assert_int_equal(ms_store_begin(f->store), 0);
	assert_int_equal(ms_store_begin(f->store), 0);
	imap_rec(&r, 2, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_commit(f->store), 0);
	/* not visible to another connection yet */
	assert_int_equal(sql_int(f, "SELECT count(*) FROM messages"), 0);
	assert_int_equal(ms_store_commit(f->store), 0);
	assert_int_equal(sql_int(f, "SELECT count(*) FROM messages"), 1);

	/* an inner rollback rolls back everything; the outer commit then
	 * has nothing to commit */
	assert_int_equal(ms_store_begin(f->store), 0);
	imap_rec(&r, 3, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_begin(f->store), 0);
	assert_int_equal(ms_store_rollback(f->store), 0);
	assert_int_equal(ms_store_commit(f->store), -1);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 1);

	/* a failing helper inside a batch leaves the batch to the caller */
	assert_int_equal(ms_store_begin(f->store), 0);
	imap_rec(&r, 4, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	assert_int_equal(ms_store_folder_reset(f->store, 9999), -1);
	assert_int_equal(ms_store_commit(f->store), 0);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 2);

	assert_int_equal(ms_store_commit(f->store), -1);
	/* a rollback with nothing open (a failed begin, a commit the
	 * engine rolled back) does nothing and keeps the error that said
	 * why */
	assert_int_equal(ms_store_rollback(f->store), 0);
	assert_string_equal(ms_store_error(f->store), "commit without begin");

	/* closing with an open transaction discards it */
	assert_int_equal(ms_store_begin(f->store), 0);
	imap_rec(&r, 5, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	ms_store_close(&f->store);
	assert_null(f->store);
	assert_int_equal(ms_store_open(f->path, &f->store, NULL), 0);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 2);
}

static void test_reopen(void **state)
{
	struct fixture *f = *state;
	struct ms_folder_state fs;
	struct ms_msg_rec r, got;
	int64_t uid, uid2;
	int found;

	assert_int_equal(ms_store_user_get(f->store, "alice", &uid), 0);
	assert_int_equal(ms_store_folder_get(f->store, uid, "Sent", &fs), 0);
	fs.hwm = 99;
	snprintf(fs.dst_name, sizeof(fs.dst_name), "Sent Items");
	assert_int_equal(ms_store_folder_update(f->store, &fs), 0);
	imap_rec(&r, 99, MS_MSG_DONE);
	assert_int_equal(ms_store_msg_put(f->store, fs.id, &r), 0);

	ms_store_close(&f->store);
	ms_store_close(&f->store);	/* harmless */
	assert_int_equal(ms_store_open(f->path, &f->store, NULL), 0);

	assert_int_equal(ms_store_user_get(f->store, "alice", &uid2), 0);
	assert_int_equal(uid2, uid);
	memset(&fs, 0, sizeof(fs));
	assert_int_equal(ms_store_folder_get(f->store, uid, "Sent", &fs), 0);
	assert_int_equal(fs.hwm, 99);
	assert_string_equal(fs.dst_name, "Sent Items");
	assert_int_equal(ms_store_msg_get(f->store, fs.id, 99, &got, &found),
			 0);
	assert_int_equal(found, 1);
	assert_int_equal(got.state, MS_MSG_DONE);
	assert_string_equal(got.msgid, "<99@example.net>");
}

/* Two handles on one file, as the daemon and mailshiftctl would have: WAL
 * lets one read while the other holds a write transaction. */
static void test_two_handles(void **state)
{
	struct fixture *f = *state;
	struct ms_store *s2;
	struct ms_msg_rec r, got;
	int64_t fid = make_folder(f, "alice", "INBOX");
	int64_t uid, uid2;
	int found;

	assert_int_equal(ms_store_open(f->path, &s2, NULL), 0);
	assert_int_equal(ms_store_user_get(s2, "alice", &uid2), 0);
	assert_int_equal(ms_store_user_get(f->store, "alice", &uid), 0);
	assert_int_equal(uid, uid2);

	assert_int_equal(ms_store_begin(f->store), 0);
	imap_rec(&r, 1, MS_MSG_INTENT);
	assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
	/* the reader is not blocked and does not see uncommitted data */
	assert_int_equal(ms_store_msg_get(s2, fid, 1, &got, &found), 0);
	assert_int_equal(found, 0);
	assert_int_equal(ms_store_commit(f->store), 0);
	assert_int_equal(ms_store_msg_get(s2, fid, 1, &got, &found), 0);
	assert_int_equal(found, 1);

	/* and the other way round */
	assert_int_equal(ms_store_msg_done(s2, fid, 1, 10, NULL), 0);
	assert_int_equal(ms_store_msg_get(f->store, fid, 1, &got, &found), 0);
	assert_int_equal(got.dst_uid, 10);
	ms_store_close(&s2);
}

/* A real second process, writing concurrently with this one. */
static void test_two_processes(void **state)
{
	struct fixture *f = *state;
	struct ms_msg_rec r;
	int64_t fid = make_folder(f, "alice", "INBOX");
	uint64_t n;
	uint32_t i;
	int status;
	pid_t pid;

	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		struct ms_store *s;

		/* no cmocka in the child: exit status only */
		if (ms_store_open(f->path, &s, NULL) < 0)
			_exit(1);
		for (i = 1; i <= 500; i++) {
			imap_rec(&r, 2 * i, MS_MSG_INTENT);
			if (ms_store_begin(s) < 0 ||
			    ms_store_msg_put(s, fid, &r) < 0 ||
			    ms_store_commit(s) < 0)
				_exit(2);
		}
		ms_store_close(&s);
		_exit(0);
	}
	for (i = 1; i <= 500; i++) {
		imap_rec(&r, 2 * i - 1, MS_MSG_INTENT);
		assert_int_equal(ms_store_begin(f->store), 0);
		assert_int_equal(ms_store_msg_put(f->store, fid, &r), 0);
		assert_int_equal(ms_store_commit(f->store), 0);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(ms_store_msg_count(f->store, fid, -1, &n), 0);
	assert_int_equal(n, 1000);
}

static int count_use(void *ctx, const struct ms_source_use *u)
{
	unsigned int *n = ctx;

	(*n)++;
	return 0;
}

/* retire's records: a use is found while at + slack reaches the period
 * asked about; a note replaces the (key, kind) row; the move dates follow
 * the state; the latest retirement is read back. */
static void test_retirement(void **state)
{
	struct fixture *f = *state;
	struct ms_source_use u = { .key = "alice", .kind = "session",
				   .name = "alice", .at = 1000, .slack = 60 };
	struct ms_retirement r = { .at = 5000, .uid = 7, .forced = 1,
				   .record = "{\"ok\": true}" }, got;
	int64_t id, first, moved;
	unsigned int n = 0;
	int found;

	assert_int_equal(ms_store_source_use_note(f->store, &u), 0);
	assert_int_equal(ms_store_source_use_foreach(f->store, 1060, count_use,
						     &n), 0);
	assert_int_equal(n, 1);
	n = 0;
	assert_int_equal(ms_store_source_use_foreach(f->store, 1061, count_use,
						     &n), 0);
	assert_int_equal(n, 0);
	u.at = 2000;
	assert_int_equal(ms_store_source_use_note(f->store, &u), 0);
	assert_int_equal(ms_store_source_use_foreach(f->store, 0, count_use,
						     &n), 0);
	assert_int_equal(n, 1);

	assert_int_equal(ms_store_user_get(f->store, "alice", &id), 0);
	assert_int_equal(ms_store_user_moves(f->store, id, &first, &moved), 0);
	assert_true(first == 0 && moved == 0);
	assert_int_equal(ms_store_user_set_state(f->store, id, "copying", NULL),
			 0);
	assert_int_equal(ms_store_user_set_state(f->store, id, "destination",
						 NULL), 0);
	assert_int_equal(ms_store_user_moves(f->store, id, &first, &moved), 0);
	assert_true(first > 0 && moved >= first);

	assert_int_equal(ms_store_retirement_get(f->store, &got, &found), 0);
	assert_int_equal(found, 0);
	assert_int_equal(ms_store_retirement_add(f->store, &r), 0);
	assert_int_equal(ms_store_retirement_get(f->store, &got, &found), 0);
	assert_int_equal(found, 1);
	assert_true(got.at == 5000 && got.uid == 7 && got.forced == 1);
	assert_string_equal(got.record, r.record);
	free(got.record);
}

/* PostgreSQL at start: the schema's version in its own table; a URL with a
 * password, an unreachable server, a newer schema and a database of
 * another migration each refused with an error saying so, and no row
 * changed by the refusals. */
static void test_pg_open(void **state)
{
	struct fixture *f = *state;
	struct ms_store *s = NULL;
	char url[600], buf[64];
	char *error = NULL;
	int64_t uid;

	if (pg_url == NULL)
		skip();
	assert_int_equal(sql_int(f, "SELECT version FROM mailshift_schema"),
			 MS_STORE_SCHEMA_VERSION);
	assert_int_equal(sql_int(f, "SELECT count(*) FROM pg_tables WHERE "
				 "tablename IN ('users', 'folders', "
				 "'messages', 'rintents')"), 4);

	snprintf(url, sizeof(url), "%s%spassword=secret", pg_url,
		 strchr(pg_url, '?') ? "&" : "?");
	assert_int_equal(ms_store_open(url, &s, &error), -1);
	assert_null(s);
	assert_non_null(strstr(error, "password file"));
	assert_null(strstr(error, "secret"));
	free(error);

	assert_int_equal(ms_store_open("postgresql://mailshift@127.0.0.1:1/x",
				       &s, &error), -1);
	assert_non_null(strstr(error, "cannot connect"));
	free(error);

	/* the first open for a migration records it; another is refused
	 * and changes nothing */
	ms_store_close(&f->store);
	assert_int_equal(ms_store_open_migration(pg_url, "src=a dst=b", &s,
						 NULL), 0);
	assert_int_equal(ms_store_user_get(s, "alice", &uid), 0);
	ms_store_close(&s);
	assert_int_equal(ms_store_open_migration(pg_url, "src=a dst=b", &s,
						 NULL), 0);
	ms_store_close(&s);
	assert_int_equal(ms_store_open_migration(pg_url, "src=a dst=c", &s,
						 &error), -1);
	assert_non_null(strstr(error, "another migration"));
	free(error);
	sql_text(f, "SELECT value FROM meta", buf, sizeof(buf));
	assert_string_equal(buf, "src=a dst=b");
	assert_int_equal(sql_int(f, "SELECT count(*) FROM users"), 1);

	snprintf(url, sizeof(url), "UPDATE mailshift_schema SET version = %d",
		 MS_STORE_SCHEMA_VERSION + 1);
	pg_sql(url, NULL, 0);
	assert_int_equal(ms_store_open(pg_url, &s, &error), -1);
	assert_non_null(strstr(error, "newer"));
	free(error);
	assert_int_equal(sql_int(f, "SELECT version FROM mailshift_schema"),
			 MS_STORE_SCHEMA_VERSION + 1);
	pg_sql("UPDATE mailshift_schema SET version = 7", NULL, 0);
	assert_int_equal(ms_store_open(pg_url, &f->store, NULL), 0);
}

/* [store] url at config time (no server needed): a password anywhere in
 * the URL is refused, and no error repeats the URL or a part of it. */
static void test_url_check(void **state)
{
	static const char *const bad[] = {
		"postgresql://u:S3cr3t-pw@db/m",
		"postgres://u:S3cr3t-pw@[::1/m",	/* and malformed */
		"postgresql://u@db/m?sslmode=require&Password=S3cr3t-pw",
		"postgresql://u@db/m?password=S3cr3t-pw",
		"postgresql://u@db/S3cr3t-pw%zz",
		"postgresql://u@db/m?S3cr3t-pw=1",
		"/var/lib/mailshift/S3cr3t-pw.db",
	};
	char err[256];
	size_t i;

	assert_int_equal(ms_store_url_check("postgresql://u@db.example/m?"
					    "sslmode=verify-full", err,
					    sizeof(err)), 0);
	assert_int_equal(ms_store_url_check("postgres://db/m", err,
					    sizeof(err)), 0);
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		assert_int_equal(ms_store_url_check(bad[i], err, sizeof(err)),
				 -1);
		assert_true(err[0] != '\0');
		assert_null(strstr(err, "S3cr3t"));
	}
	assert_int_equal(ms_store_url_check(bad[0], err, sizeof(err)), -1);
	assert_non_null(strstr(err, "password file"));
}

static int size_cb(void *ctx, const struct ms_user_info *u,
		   const struct ms_user_size *sz)
{
	struct ms_user_size *got = ctx;

	if (!strcmp(u->name, "alice") || !strcmp(u->name, "bob"))
		got[u->name[0] == 'b'] = *sz;
	return 0;
}

/* The survey's sizes: the next user is one not surveyed yet, still to
 * move and not off; the walk gives every user, -1 where nothing is known. */
static void test_sizes(void **state)
{
	struct fixture *f = *state;
	struct ms_user_size sz = { .messages = 12, .bytes = 3456,
				   .how = "status-size" }, got[2];
	char name[256];
	int64_t a, b, c;
	int found;

	assert_int_equal(ms_store_user_get(f->store, "alice", &a), 0);
	assert_int_equal(ms_store_user_get(f->store, "bob", &b), 0);
	assert_int_equal(ms_store_user_get(f->store, "carol", &c), 0);
	assert_int_equal(ms_store_user_set_policy(f->store, c, "off"), 0);
	assert_int_equal(ms_store_size_next(f->store, name, sizeof(name),
					    &found), 0);
	assert_int_equal(found, 1);
	assert_string_equal(name, "alice");
	assert_int_equal(ms_store_size_set(f->store, a, &sz), 0);
	assert_int_equal(ms_store_size_next(f->store, name, sizeof(name),
					    &found), 0);
	assert_string_equal(name, "bob");
	assert_int_equal(ms_store_user_set_state(f->store, b, "destination",
						 NULL), 0);
	assert_int_equal(ms_store_size_next(f->store, name, sizeof(name),
					    &found), 0);
	assert_int_equal(found, 0);

	assert_int_equal(ms_store_size_foreach(f->store, size_cb, got), 0);
	assert_true(got[0].messages == 12 && got[0].bytes == 3456);
	assert_string_equal(got[0].how, "status-size");
	assert_true(got[0].at > 0);
	assert_true(got[1].messages == -1 && got[1].bytes == -1);
	assert_string_equal(got[1].how, "");
}

struct claims {
	int n;
	char users[4][16], was[4][16], owner[4][16];
};

static void claim_cb(void *ctx, const char *user, const char *kind,
		     const char *was_state, const char *was_owner)
{
	struct claims *c = ctx;

	(void)kind;
	if (c->n < 4) {
		snprintf(c->users[c->n], sizeof(c->users[0]), "%s", user);
		snprintf(c->was[c->n], sizeof(c->was[0]), "%s", was_state);
		snprintf(c->owner[c->n], sizeof(c->owner[0]), "%s", was_owner);
	}
	c->n++;
}

/* Jobs and leases: one owner at a time; a lease renewed only by its
 * owner; an expired one taken over; the sweep's queue claimed in name
 * order, a job held by one gateway not claimed by another. */
/* PostgreSQL: a flip without a cutover needs no other gateway to have
 * come, nor come and gone, since the copy began (gateway_joins). */
static void test_gateway_joins(void **state)
{
	struct fixture *f = *state;
	int64_t j0, j1;
	int others = -1, alone = -1;

	if (pg_url == NULL)
		skip();
	assert_int_equal(ms_store_gateway_register(f->store, "gw1"), 0);
	assert_int_equal(ms_store_gateway_joins(f->store, "gw1", &j0,
						&others), 0);
	assert_int_equal(others, 0);
	assert_int_equal(ms_store_begin(f->store), 0);
	assert_int_equal(ms_store_gateway_alone(f->store, j0, &alone), 0);
	assert_int_equal(alone, 1);
	assert_int_equal(ms_store_commit(f->store), 0);
	/* gw1's own start again (its row there): not a join */
	assert_int_equal(ms_store_gateway_register(f->store, "gw1"), 0);
	assert_int_equal(ms_store_gateway_alone(f->store, j0, &alone), 0);
	assert_int_equal(alone, 1);

	/* gw2 came and went: no row of another now, but not alone */
	assert_int_equal(ms_store_gateway_register(f->store, "gw2"), 0);
	assert_int_equal(ms_store_gateway_joins(f->store, "gw1", &j1,
						&others), 0);
	assert_int_equal(others, 1);
	assert_int_equal(ms_store_gateway_remove(f->store, "gw2"), 0);
	assert_int_equal(ms_store_gateway_joins(f->store, "gw1", &j1,
						&others), 0);
	assert_int_equal(others, 0);
	assert_true(j1 != j0);
	assert_int_equal(ms_store_gateway_alone(f->store, j0, &alone), 0);
	assert_int_equal(alone, 0);
	assert_int_equal(ms_store_gateway_alone(f->store, j1, &alone), 0);
	assert_int_equal(alone, 1);
}

static void test_jobs(void **state)
{
	struct fixture *f = *state;
	struct claims c = { 0 };
	int64_t a, b;
	int taken, held;

	assert_int_equal(ms_store_user_get(f->store, "alice", &a), 0);
	assert_int_equal(ms_store_user_get(f->store, "bob", &b), 0);
	assert_int_equal(ms_store_job_take(f->store, "alice", "login", "gw1",
					   60000, &taken), 0);
	assert_int_equal(taken, 1);
	assert_int_equal(ms_store_job_take(f->store, "alice", "sweep", "gw2",
					   60000, &taken), 0);
	assert_int_equal(taken, 0);
	assert_int_equal(ms_store_job_renew(f->store, "alice", "gw2", 60000,
					    &held), 0);
	assert_int_equal(held, 0);
	assert_int_equal(ms_store_job_renew(f->store, "alice", "gw1", 60000,
					    &held), 0);
	assert_int_equal(held, 1);

	/* the queue: bob only (alice's job runs); gw2 claims it */
	assert_int_equal(ms_store_job_enqueue(f->store), 0);
	assert_int_equal(ms_store_job_claim(f->store, "gw2", 60000, 5, 1,
					    claim_cb, &c), 0);
	assert_int_equal(c.n, 1);
	assert_string_equal(c.users[0], "bob");
	assert_string_equal(c.was[0], "queued");
	c.n = 0;
	assert_int_equal(ms_store_job_claim(f->store, "gw1", 60000, 5, 1,
					    claim_cb, &c), 0);
	assert_int_equal(c.n, 0);

	/* ended by its owner only */
	assert_int_equal(ms_store_job_end(f->store, b, "gw1", "done", NULL,
					  &held), 0);
	assert_int_equal(held, 0);
	assert_int_equal(ms_store_job_end(f->store, b, "gw2", "failed", "x",
					  &held), 0);
	assert_int_equal(held, 1);

	/* a lease that ran out is taken over, saying whose it was */
	assert_int_equal(ms_store_job_renew(f->store, "alice", "gw1", 0,
					    &held), 0);
	assert_int_equal(held, 1);
	usleep(20000);
	assert_int_equal(ms_store_job_claim(f->store, "gw2", 60000, 5, 0,
					    claim_cb, &c), 0);
	assert_int_equal(c.n, 1);
	assert_string_equal(c.users[0], "alice");
	assert_string_equal(c.was[0], "running");
	assert_string_equal(c.owner[0], "gw1");
	assert_int_equal(ms_store_job_renew(f->store, "alice", "gw1", 60000,
					    &held), 0);
	assert_int_equal(held, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_url_check),
		cmocka_unit_test_setup_teardown(test_pg_open, setup, teardown),
		cmocka_unit_test_setup_teardown(test_open_file, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_users, setup, teardown),
		cmocka_unit_test_setup_teardown(test_folders, setup, teardown),
		cmocka_unit_test_setup_teardown(test_messages, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_uidl, setup, teardown),
		cmocka_unit_test_setup_teardown(test_by_dst, setup, teardown),
		cmocka_unit_test_setup_teardown(test_foreach, setup, teardown),
		cmocka_unit_test_setup_teardown(test_rintents, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_folder_foreach, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_identity, setup, teardown),
		cmocka_unit_test_setup_teardown(test_upgrade, setup, teardown),
		cmocka_unit_test_setup_teardown(test_transactions, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_reopen, setup, teardown),
		cmocka_unit_test_setup_teardown(test_two_handles, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_two_processes, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_retirement, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_sizes, setup, teardown),
		cmocka_unit_test_setup_teardown(test_jobs, setup, teardown),
		cmocka_unit_test_setup_teardown(test_gateway_joins, setup,
						teardown),
	};

	pg_url = getenv("MS_TEST_STORE_URL");
	if (pg_url != NULL && *pg_url == '\0')
		pg_url = NULL;
	return cmocka_run_group_tests(tests, NULL, NULL);
}
