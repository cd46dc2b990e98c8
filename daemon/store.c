/* The SQLite map and jobs store. See store.h for the contracts.
 *
 * Every statement is prepared once in ms_store_open() and reused: the mover
 * writes intents and completions at thousands per second inside batch
 * transactions, and preparing is far more expensive than stepping.
 */
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

/* 1: users, folders, messages, policies; 2: + rintents (rollback intents);
 * 3: + messages_dst (done records by destination UID, for the gateway's
 * POP3 UIDLs); 4: + source_use, user_moves, retirements (mailshiftctl
 * retire); 5: + folder_identity (whether a destination folder kept the
 * source's UIDVALIDITY and UIDs). Every CREATE is IF NOT EXISTS, so the
 * schema text upgrades an older store. */
#define SCHEMA_VERSION 5
/* ms_store_msg_foreach reads this many records at a time (see there) */
#define FOREACH_PAGE 128
#define FLAGS_SIZE sizeof(((struct ms_msg_rec *)0)->flags)

static const char schema_sql[] =
	"CREATE TABLE IF NOT EXISTS users ("
	" id INTEGER PRIMARY KEY,"
	" name TEXT UNIQUE NOT NULL,"
	" state TEXT NOT NULL DEFAULT 'source',"
	" policy TEXT,"
	" last_error TEXT,"
	" msgs_copied INTEGER DEFAULT 0,"
	" bytes_copied INTEGER DEFAULT 0,"
	" updated_at INTEGER);"
	"CREATE TABLE IF NOT EXISTS folders ("
	" id INTEGER PRIMARY KEY,"
	" user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,"
	" src_name TEXT NOT NULL,"
	" dst_name TEXT NOT NULL DEFAULT '',"
	" src_uidvalidity INTEGER,"
	" dst_uidvalidity INTEGER,"
	" hwm INTEGER,"
	" modseq INTEGER,"
	" msgs INTEGER,"
	" bytes INTEGER,"
	" UNIQUE(user_id, src_name));"
	"CREATE TABLE IF NOT EXISTS messages ("
	" folder_id INTEGER REFERENCES folders(id) ON DELETE CASCADE,"
	" src_uid INTEGER NOT NULL,"
	" uidl TEXT NOT NULL DEFAULT '',"
	" state INTEGER,"
	" size INTEGER,"
	" date INTEGER,"
	" msgid TEXT,"
	" flags TEXT,"
	" dst_uid INTEGER,"
	" dst_floor INTEGER,"
	" PRIMARY KEY(folder_id, src_uid, uidl)) WITHOUT ROWID;"
	/* Done records by destination UID (ST_MSG_GET_DST): partial, so an
	 * intent costs the mover no index write until it is done. */
	"CREATE INDEX IF NOT EXISTS messages_dst ON messages"
	" (folder_id, dst_uid) WHERE state = 1;"
	/* Policies set at run time (mailshiftctl policy --default/--domain);
	 * they override the config file's. scope "" = the default, else a
	 * domain. */
	"CREATE TABLE IF NOT EXISTS policies ("
	" scope TEXT PRIMARY KEY,"
	" policy TEXT NOT NULL);"
	/* Rollback intents (store.h): keyed by the destination UID, since
	 * the source UID is only known once the source has the message. */
	"CREATE TABLE IF NOT EXISTS rintents ("
	" folder_id INTEGER REFERENCES folders(id) ON DELETE CASCADE,"
	" dst_uid INTEGER NOT NULL,"
	" size INTEGER,"
	" date INTEGER,"
	" msgid TEXT,"
	" flags TEXT,"
	" src_floor INTEGER,"
	" PRIMARY KEY(folder_id, dst_uid)) WITHOUT ROWID;"
	/* When the gateway last sent a session or a message to the source,
	 * per user (key "*": a name the map does not know) and kind; uses
	 * up to `slack` seconds after `at` may not have been written. */
	"CREATE TABLE IF NOT EXISTS source_use ("
	" key TEXT NOT NULL,"
	" kind TEXT NOT NULL,"
	" name TEXT NOT NULL,"
	" at INTEGER NOT NULL,"
	" slack INTEGER NOT NULL,"
	" PRIMARY KEY(key, kind)) WITHOUT ROWID;"
	/* When a user's first copy began and when the user last went to
	 * the destination (for retire --report). */
	"CREATE TABLE IF NOT EXISTS user_moves ("
	" user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,"
	" first_copy INTEGER,"
	" moved INTEGER);"
	/* retire --apply: when, by whom, and the check it rested on. */
	"CREATE TABLE IF NOT EXISTS retirements ("
	" id INTEGER PRIMARY KEY,"
	" at INTEGER NOT NULL,"
	" uid INTEGER NOT NULL,"
	" forced INTEGER NOT NULL,"
	" record TEXT NOT NULL);"
	/* Whether the destination folder has the source's UIDVALIDITY and
	 * UIDs (state 1) or not (2, with the reason): a folder without a row
	 * was copied without trying. */
	"CREATE TABLE IF NOT EXISTS folder_identity ("
	" folder_id INTEGER PRIMARY KEY REFERENCES folders(id)"
	" ON DELETE CASCADE,"
	" state INTEGER NOT NULL,"
	" reason TEXT NOT NULL DEFAULT '');";

#define FOLDER_COLS "id, user_id, src_name, dst_name, src_uidvalidity, " \
		    "dst_uidvalidity, hwm, modseq, msgs, bytes"
#define MSG_COLS "src_uid, uidl, state, size, date, msgid, flags, dst_uid, " \
		 "dst_floor"
/* A rollback intent read as a struct ms_msg_rec (see store.h). */
#define RINTENT_COLS "0, '', 0, size, date, msgid, flags, dst_uid, src_floor"

enum stmt_id {
	ST_BEGIN,
	ST_COMMIT,
	ST_ROLLBACK,
	ST_USER_GET,
	ST_USER_ADD,
	ST_USER_SET_STATE,
	ST_USER_PROGRESS,
	ST_FOLDER_GET,
	ST_FOLDER_ADD,
	ST_FOLDER_UPDATE,
	ST_FOLDER_RESET,
	ST_FOLDER_FORGET_MSGS,
	ST_FOLDER_FORGET_RINTENTS,
	ST_FOLDER_FIND_DST,
	ST_MSG_PUT,
	ST_MSG_GET,
	ST_MSG_GET_UIDL,
	ST_MSG_GET_DST,
	ST_MSG_DONE,
	ST_MSG_SET_FLAGS,
	ST_MSG_DELETE,
	ST_MSG_PAGE,
	ST_MSG_COUNT,
	ST_RINTENT_PUT,
	ST_RINTENT_DELETE,
	ST_RINTENT_PAGE,
	ST_RINTENT_COUNT,
	ST_COUNT
};

static const char *const stmt_sql[ST_COUNT] = {
	[ST_BEGIN] = "BEGIN IMMEDIATE",
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_USER_GET] = "SELECT id FROM users WHERE name = ?1",
	[ST_USER_ADD] =
		"INSERT OR IGNORE INTO users (name, updated_at) VALUES (?1, ?2)",
	[ST_USER_SET_STATE] =
		"UPDATE users SET state = ?2, last_error = ?3, updated_at = ?4"
		" WHERE id = ?1",
	[ST_USER_PROGRESS] =
		"UPDATE users SET msgs_copied = msgs_copied + ?2,"
		" bytes_copied = bytes_copied + ?3, updated_at = ?4"
		" WHERE id = ?1",
	[ST_FOLDER_GET] =
		"SELECT " FOLDER_COLS " FROM folders"
		" WHERE user_id = ?1 AND src_name = ?2",
	[ST_FOLDER_ADD] =
		"INSERT OR IGNORE INTO folders (user_id, src_name, dst_name,"
		" src_uidvalidity, dst_uidvalidity, hwm, modseq, msgs, bytes)"
		" VALUES (?1, ?2, '', 0, 0, 0, 0, 0, 0)",
	[ST_FOLDER_UPDATE] =
		"UPDATE folders SET dst_name = ?2, src_uidvalidity = ?3,"
		" dst_uidvalidity = ?4, hwm = ?5, modseq = ?6, msgs = ?7,"
		" bytes = ?8 WHERE id = ?1",
	[ST_FOLDER_RESET] =
		"UPDATE folders SET src_uidvalidity = 0, dst_uidvalidity = 0,"
		" hwm = 0, modseq = 0, msgs = 0, bytes = 0 WHERE id = ?1",
	[ST_FOLDER_FORGET_MSGS] = "DELETE FROM messages WHERE folder_id = ?1",
	[ST_FOLDER_FORGET_RINTENTS] =
		"DELETE FROM rintents WHERE folder_id = ?1",
	[ST_FOLDER_FIND_DST] =
		"SELECT " FOLDER_COLS " FROM folders"
		" WHERE user_id = ?1 AND dst_name = ?2 COLLATE NOCASE"
		" ORDER BY id DESC LIMIT 1",
	[ST_MSG_PUT] =
		"INSERT INTO messages (folder_id, src_uid, uidl, state, size,"
		" date, msgid, flags, dst_uid, dst_floor)"
		" VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
		" ON CONFLICT (folder_id, src_uid, uidl) DO UPDATE SET"
		" state = excluded.state, size = excluded.size,"
		" date = excluded.date, msgid = excluded.msgid,"
		" flags = excluded.flags, dst_uid = excluded.dst_uid,"
		" dst_floor = excluded.dst_floor",
	[ST_MSG_GET] =
		"SELECT " MSG_COLS " FROM messages"
		" WHERE folder_id = ?1 AND src_uid = ?2 AND uidl = ''",
	[ST_MSG_GET_UIDL] =
		"SELECT " MSG_COLS " FROM messages"
		" WHERE folder_id = ?1 AND src_uid = 0 AND uidl = ?2",
	[ST_MSG_GET_DST] =
		"SELECT " MSG_COLS " FROM messages INDEXED BY messages_dst"
		" WHERE folder_id = ?1 AND dst_uid = ?2 AND state = 1 LIMIT 1",
	/* flags NULL keeps what the intent recorded */
	[ST_MSG_DONE] =
		"UPDATE messages SET state = 1, dst_uid = ?3,"
		" flags = coalesce(?4, flags)"
		" WHERE folder_id = ?1 AND src_uid = ?2 AND uidl = ''",
	[ST_MSG_SET_FLAGS] =
		"UPDATE messages SET flags = ?3"
		" WHERE folder_id = ?1 AND src_uid = ?2 AND uidl = ''",
	[ST_MSG_DELETE] =
		"DELETE FROM messages"
		" WHERE folder_id = ?1 AND src_uid = ?2 AND uidl = ?3",
	/* keyset pagination over the primary key; ?4 < 0 means any state */
	[ST_MSG_PAGE] =
		"SELECT " MSG_COLS " FROM messages"
		" WHERE folder_id = ?1 AND (src_uid, uidl) > (?2, ?3)"
		" AND (?4 < 0 OR state = ?4)"
		" ORDER BY src_uid, uidl LIMIT ?5",
	[ST_MSG_COUNT] =
		"SELECT count(*) FROM messages"
		" WHERE folder_id = ?1 AND (?2 < 0 OR state = ?2)",
	[ST_RINTENT_PUT] =
		"INSERT OR REPLACE INTO rintents (folder_id, dst_uid, size,"
		" date, msgid, flags, src_floor)"
		" VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
	[ST_RINTENT_DELETE] =
		"DELETE FROM rintents WHERE folder_id = ?1 AND dst_uid = ?2",
	[ST_RINTENT_PAGE] =
		"SELECT " RINTENT_COLS " FROM rintents"
		" WHERE folder_id = ?1 AND dst_uid > ?2"
		" ORDER BY dst_uid LIMIT ?3",
	[ST_RINTENT_COUNT] =
		"SELECT count(*) FROM rintents WHERE folder_id = ?1",
};

struct ms_store {
	sqlite3 *db;
	sqlite3_stmt *st[ST_COUNT];
	sqlite3_stmt *user_info;	/* prepared at first use: every
					   gateway login looks a user up */
	int depth;			/* ms_store_begin nesting */
	char error[512];
};

static int set_error(struct ms_store *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static int set_error(struct ms_store *s, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(s->error, sizeof(s->error), fmt, ap);
	va_end(ap);
	return -1;
}

static int db_error(struct ms_store *s, const char *what)
{
	return set_error(s, "%s: %s", what, sqlite3_errmsg(s->db));
}

/* Returns a prepared statement to its pristine state. Bindings are cleared
 * too: text is bound SQLITE_STATIC, and must not outlive the caller's
 * buffer. */
static void release(sqlite3_stmt *st)
{
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
}

/* Runs a statement that returns no rows. */
static int run(struct ms_store *s, sqlite3_stmt *st, const char *what)
{
	int rc = sqlite3_step(st);

	if (rc != SQLITE_DONE) {
		db_error(s, what);
		release(st);
		return -1;
	}
	release(st);
	return 0;
}

/* run() for a statement that must change a row: when it changed none, an
 * error that says so (none: printf format, "no such user (id %lld)"). */
static int run_row(struct ms_store *s, sqlite3_stmt *st, const char *what,
		   const char *none, ...) __attribute__((format(printf, 4, 5)));

static int run_row(struct ms_store *s, sqlite3_stmt *st, const char *what,
		   const char *none, ...)
{
	va_list ap;

	if (run(s, st, what) < 0)
		return -1;
	if (sqlite3_changes(s->db) > 0)
		return 0;
	va_start(ap, none);
	vsnprintf(s->error, sizeof(s->error), none, ap);
	va_end(ap);
	return -1;
}

/* run() and finalize, for a statement prepared for one call. */
static int run_once(struct ms_store *s, sqlite3_stmt *st, const char *what)
{
	int ret = run(s, st, what);

	sqlite3_finalize(st);
	return ret;
}

/* Steps a query: 1 = a row is there (the caller releases), 0 = no row
 * (released), -1 = error (released). */
static int step_row(struct ms_store *s, sqlite3_stmt *st, const char *what)
{
	int rc = sqlite3_step(st);

	if (rc == SQLITE_ROW)
		return 1;
	if (rc != SQLITE_DONE)
		db_error(s, what);
	release(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

static int bind_text(sqlite3_stmt *st, int idx, const char *text)
{
	return sqlite3_bind_text(st, idx, text, -1, SQLITE_STATIC);
}

/* A fixed-size field handed in by the caller: refuse what would not fit back
 * into the same field when loaded (or is not even terminated). */
static int check_len(struct ms_store *s, const char *text, size_t size,
		     const char *what)
{
	if (strnlen(text, size) >= size)
		return set_error(s, "%s too long", what);
	return 0;
}

static int copy_text(struct ms_store *s, sqlite3_stmt *st, int col,
		     char *dst, size_t size, const char *what)
{
	const unsigned char *text = sqlite3_column_text(st, col);
	int len = sqlite3_column_bytes(st, col);

	if (text == NULL) {
		if (sqlite3_column_type(st, col) != SQLITE_NULL)
			return set_error(s, "%s: out of memory", what);
		dst[0] = '\0';
		return 0;
	}
	/* Only a foreign write can make this happen; truncating a
	 * Message-ID or a name silently would break matching later. */
	if ((size_t)len >= size)
		return set_error(s, "stored %s too long (%d bytes)", what, len);
	memcpy(dst, text, len);
	dst[len] = '\0';
	return 0;
}

static void store_free(struct ms_store *s)
{
	int i;

	for (i = 0; i < ST_COUNT; i++)
		sqlite3_finalize(s->st[i]);
	sqlite3_finalize(s->user_info);
	/* an open transaction is rolled back by the close */
	sqlite3_close(s->db);
	free(s);
}

static int exec(struct ms_store *s, const char *sql, const char *what)
{
	if (sqlite3_exec(s->db, sql, NULL, NULL, NULL) != SQLITE_OK)
		return db_error(s, what);
	return 0;
}

static int get_user_version(struct ms_store *s, int *version_r)
{
	sqlite3_stmt *st;
	int rc;

	if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(s, "schema version");
	rc = sqlite3_step(st);
	if (rc != SQLITE_ROW) {
		db_error(s, "schema version");
		sqlite3_finalize(st);
		return -1;
	}
	*version_r = sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	return 0;
}

static int set_pragmas(struct ms_store *s)
{
	sqlite3_stmt *st;
	const char *mode;
	int rc, ret = 0;

	/* First, so that every later step waits out another process's write
	 * lock instead of failing with SQLITE_BUSY at once. */
	if (sqlite3_busy_timeout(s->db, 5000) != SQLITE_OK)
		return db_error(s, "busy_timeout");

	/* journal_mode answers with the mode now in force: a file system
	 * without shared memory would leave us in rollback mode, where two
	 * processes block each other. Refuse that rather than limp along. */
	if (sqlite3_prepare_v2(s->db, "PRAGMA journal_mode = WAL", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(s, "journal_mode");
	rc = sqlite3_step(st);
	if (rc != SQLITE_ROW) {
		ret = db_error(s, "journal_mode");
	} else {
		mode = (const char *)sqlite3_column_text(st, 0);
		if (mode == NULL || strcmp(mode, "wal") != 0)
			ret = set_error(s, "journal_mode: cannot switch to WAL "
					"(got %s)", mode ? mode : "nothing");
	}
	sqlite3_finalize(st);
	if (ret < 0)
		return -1;

	if (exec(s, "PRAGMA synchronous = NORMAL", "synchronous") < 0 ||
	    exec(s, "PRAGMA foreign_keys = ON", "foreign_keys") < 0)
		return -1;
	return 0;
}

static int create_schema(struct ms_store *s)
{
	char sql[64];
	int version;

	if (get_user_version(s, &version) < 0)
		return -1;
	if (version == SCHEMA_VERSION)
		return 0;
	if (version > SCHEMA_VERSION)
		return set_error(s, "store schema version %d is newer than "
				 "this program's (%d)", version,
				 SCHEMA_VERSION);

	/* IMMEDIATE, and the version read again inside: two processes
	 * opening a new store at once must not both create it. */
	if (exec(s, "BEGIN IMMEDIATE", "create schema") < 0)
		return -1;
	if (get_user_version(s, &version) < 0)
		goto fail;
	if (version < SCHEMA_VERSION) {
		/* A new store, or an older one: the tables it lacks are
		 * created, those it has are left as they are. */
		snprintf(sql, sizeof(sql), "PRAGMA user_version = %d",
			 SCHEMA_VERSION);
		if (exec(s, schema_sql, "create schema") < 0 ||
		    exec(s, sql, "create schema") < 0)
			goto fail;
	}
	if (exec(s, "COMMIT", "create schema") < 0)
		goto fail;
	return 0;
fail:
	sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
	return -1;
}

static int prepare_all(struct ms_store *s)
{
	int i;

	for (i = 0; i < ST_COUNT; i++) {
		/* PERSISTENT: these live as long as the connection */
		if (sqlite3_prepare_v3(s->db, stmt_sql[i], -1,
				       SQLITE_PREPARE_PERSISTENT, &s->st[i],
				       NULL) != SQLITE_OK)
			return db_error(s, "prepare");
	}
	return 0;
}

int ms_store_open(const char *path, struct ms_store **store_r, char **error_r)
{
	struct ms_store *s;
	int fd;

	*store_r = NULL;
	if (error_r)
		*error_r = NULL;

	s = calloc(1, sizeof(*s));
	if (s == NULL) {
		if (error_r)
			*error_r = strdup("out of memory");
		return -1;
	}

	/* SQLite would create the file 0644 (less the umask). The store names
	 * users and their folders, so create it ourselves, owner-only; the
	 * -wal and -shm files inherit the database file's mode. */
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd >= 0) {
		/* exactly 0600 even under an odd umask such as 0277 */
		if (fchmod(fd, 0600) < 0) {
			set_error(s, "%s: chmod: %s", path, strerror(errno));
			close(fd);
			goto fail_nodb;
		}
		close(fd);
	} else if (errno != EEXIST) {
		set_error(s, "%s: %s", path, strerror(errno));
		goto fail_nodb;
	}

	if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
			    NULL) != SQLITE_OK) {
		if (s->db == NULL)
			set_error(s, "%s: out of memory", path);
		else
			set_error(s, "%s: %s", path, sqlite3_errmsg(s->db));
		goto fail;
	}
	if (set_pragmas(s) < 0 || create_schema(s) < 0 || prepare_all(s) < 0)
		goto fail;

	*store_r = s;
	return 0;

fail:
	if (error_r)
		*error_r = strdup(s->error);
	store_free(s);
	return -1;
fail_nodb:
	if (error_r)
		*error_r = strdup(s->error);
	free(s);
	return -1;
}

void ms_store_close(struct ms_store **store)
{
	if (store == NULL || *store == NULL)
		return;
	store_free(*store);
	*store = NULL;
}

const char *ms_store_error(const struct ms_store *store)
{
	if (store == NULL)
		return "no store";
	return store->error;
}

int ms_store_begin(struct ms_store *store)
{
	if (store->depth == 0 &&
	    run(store, store->st[ST_BEGIN], "begin") < 0)
		return -1;
	store->depth++;
	return 0;
}

int ms_store_commit(struct ms_store *store)
{
	if (store->depth == 0)
		return set_error(store, "commit without begin");
	if (store->depth > 1) {
		store->depth--;
		return 0;
	}
	if (run(store, store->st[ST_COMMIT], "commit") < 0) {
		/* Still inside the transaction (e.g. busy): the caller may
		 * roll back. If SQLite already rolled it back, say so by
		 * leaving no depth behind. */
		if (sqlite3_get_autocommit(store->db))
			store->depth = 0;
		return -1;
	}
	store->depth = 0;
	return 0;
}

int ms_store_rollback(struct ms_store *store)
{
	if (store->depth == 0)
		return set_error(store, "rollback without begin");
	store->depth = 0;
	/* Some errors (SQLITE_FULL, SQLITE_IOERR, ...) roll back on their
	 * own; a second ROLLBACK would only fail. */
	if (sqlite3_get_autocommit(store->db))
		return 0;
	return run(store, store->st[ST_ROLLBACK], "rollback");
}

/* Ends the nested transaction of a multi-statement helper. On failure the
 * helper's own outermost transaction is rolled back; inside a caller's
 * transaction only the nesting is undone, and the caller, who knows what
 * else the batch holds, decides whether to roll back. */
static int finish(struct ms_store *s, int ret)
{
	char saved[sizeof(s->error)];

	if (ret == 0)
		return ms_store_commit(s);
	if (s->depth > 1) {
		s->depth--;
		return -1;
	}
	/* keep the error that made us roll back */
	memcpy(saved, s->error, sizeof(saved));
	ms_store_rollback(s);
	memcpy(s->error, saved, sizeof(saved));
	return -1;
}

static int user_lookup(struct ms_store *s, const char *name, int64_t *id_r)
{
	sqlite3_stmt *st = s->st[ST_USER_GET];
	int ret;

	bind_text(st, 1, name);
	ret = step_row(s, st, "user_get");
	if (ret == 1) {
		*id_r = sqlite3_column_int64(st, 0);
		release(st);
	}
	return ret;
}

int ms_store_user_get(struct ms_store *store, const char *name,
		      int64_t *user_id_r)
{
	sqlite3_stmt *st = store->st[ST_USER_ADD];
	int ret;

	ret = user_lookup(store, name, user_id_r);
	if (ret != 0)
		return ret < 0 ? -1 : 0;

	/* Insert under the write lock and look again: another process may
	 * have created the user since our read. */
	if (ms_store_begin(store) < 0)
		return -1;
	bind_text(st, 1, name);
	sqlite3_bind_int64(st, 2, time(NULL));
	ret = run(store, st, "user_get");
	if (ret == 0) {
		ret = user_lookup(store, name, user_id_r);
		if (ret == 0)
			ret = set_error(store, "user_get: user vanished");
	}
	return finish(store, ret < 0 ? -1 : 0);
}

/* Per call: a user's state changes a few times in its life. */
static int exec_user(struct ms_store *s, const char *sql, int64_t user_id,
		     const char *what)
{
	sqlite3_stmt *st;
	int ret;

	if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK)
		return db_error(s, what);
	sqlite3_bind_int64(st, 1, user_id);
	sqlite3_bind_int64(st, 2, time(NULL));
	ret = run(s, st, what);
	sqlite3_finalize(st);
	return ret;
}

/* The dates retire --report gives: the first copy's start, the last
 * flip to the destination. */
static int moves_note(struct ms_store *s, int64_t user_id, const char *state)
{
	if (!strcmp(state, "copying"))
		return exec_user(s, "INSERT INTO user_moves (user_id, "
				 "first_copy) VALUES (?1, ?2) ON CONFLICT "
				 "(user_id) DO UPDATE SET first_copy = "
				 "coalesce(first_copy, ?2)", user_id,
				 "user_moves");
	if (!strcmp(state, "destination"))
		return exec_user(s, "INSERT INTO user_moves (user_id, moved) "
				 "VALUES (?1, ?2) ON CONFLICT (user_id) DO "
				 "UPDATE SET moved = ?2", user_id,
				 "user_moves");
	return 0;
}

const char *const ms_user_state_names[MS_USER_NSTATES] = {
	[MS_USER_SOURCE] = "source",
	[MS_USER_COPYING] = "copying",
	[MS_USER_CUTOVER] = "cutover",
	[MS_USER_DESTINATION] = "destination",
	[MS_USER_FAILED] = "failed",
};

int ms_user_state_parse(const char *s)
{
	for (int i = 0; i < MS_USER_NSTATES; i++)
		if (strcmp(s, ms_user_state_names[i]) == 0)
			return i;
	return -1;
}

int ms_user_in(const struct ms_user_info *u, enum ms_user_state st)
{
	return strcmp(u->state, ms_user_state_names[st]) == 0;
}

int ms_store_user_set_state(struct ms_store *store, int64_t user_id,
			    const char *state, const char *last_error)
{
	sqlite3_stmt *st = store->st[ST_USER_SET_STATE];

	if (state == NULL || ms_user_state_parse(state) < 0)
		return set_error(store, "invalid user state \"%s\"",
				 state ? state : "(null)");

	sqlite3_bind_int64(st, 1, user_id);
	bind_text(st, 2, state);
	if (last_error)
		bind_text(st, 3, last_error);
	sqlite3_bind_int64(st, 4, time(NULL));
	if (run_row(store, st, "user_set_state", "no such user (id %lld)",
		    (long long)user_id) < 0)
		return -1;
	return moves_note(store, user_id, state);
}

int ms_store_user_add_progress(struct ms_store *store, int64_t user_id,
			       uint64_t msgs, uint64_t bytes)
{
	sqlite3_stmt *st = store->st[ST_USER_PROGRESS];

	sqlite3_bind_int64(st, 1, user_id);
	sqlite3_bind_int64(st, 2, (int64_t)msgs);
	sqlite3_bind_int64(st, 3, (int64_t)bytes);
	sqlite3_bind_int64(st, 4, time(NULL));
	return run_row(store, st, "user_add_progress",
		       "no such user (id %lld)", (long long)user_id);
}

/* Columns as in FOLDER_COLS. */
static int read_folder(struct ms_store *s, sqlite3_stmt *st,
		       struct ms_folder_state *st_r)
{
	memset(st_r, 0, sizeof(*st_r));
	st_r->id = sqlite3_column_int64(st, 0);
	st_r->user_id = sqlite3_column_int64(st, 1);
	if (copy_text(s, st, 2, st_r->src_name, sizeof(st_r->src_name),
		      "folder src_name") < 0 ||
	    copy_text(s, st, 3, st_r->dst_name, sizeof(st_r->dst_name),
		      "folder dst_name") < 0)
		return -1;
	/* NULL (a row written by hand) reads as 0 = never seen */
	st_r->src_uidvalidity = (uint32_t)sqlite3_column_int64(st, 4);
	st_r->dst_uidvalidity = (uint32_t)sqlite3_column_int64(st, 5);
	st_r->hwm = (uint32_t)sqlite3_column_int64(st, 6);
	st_r->modseq = (uint64_t)sqlite3_column_int64(st, 7);
	st_r->msgs = (uint64_t)sqlite3_column_int64(st, 8);
	st_r->bytes = (uint64_t)sqlite3_column_int64(st, 9);
	return 0;
}

/* The row a folder statement taking (user_id, name) finds: 1, 0 for none,
 * -1 on error. */
static int folder_row(struct ms_store *s, sqlite3_stmt *st, int64_t user_id,
		      const char *name, const char *what,
		      struct ms_folder_state *st_r)
{
	int ret;

	sqlite3_bind_int64(st, 1, user_id);
	bind_text(st, 2, name);
	ret = step_row(s, st, what);
	if (ret != 1)
		return ret;
	ret = read_folder(s, st, st_r);
	release(st);
	return ret < 0 ? -1 : 1;
}

static int folder_lookup(struct ms_store *s, int64_t user_id,
			 const char *src_name, struct ms_folder_state *st_r)
{
	return folder_row(s, s->st[ST_FOLDER_GET], user_id, src_name,
			  "folder_get", st_r);
}

int ms_store_folder_get(struct ms_store *store, int64_t user_id,
			const char *src_name, struct ms_folder_state *st_r)
{
	sqlite3_stmt *st = store->st[ST_FOLDER_ADD];
	int ret;

	if (check_len(store, src_name, sizeof(st_r->src_name),
		      "folder name") < 0)
		return -1;
	ret = folder_lookup(store, user_id, src_name, st_r);
	if (ret != 0)
		return ret < 0 ? -1 : 0;

	if (ms_store_begin(store) < 0)
		return -1;
	sqlite3_bind_int64(st, 1, user_id);
	bind_text(st, 2, src_name);
	ret = run(store, st, "folder_get");
	if (ret == 0) {
		ret = folder_lookup(store, user_id, src_name, st_r);
		if (ret == 0)
			ret = set_error(store, "folder_get: folder vanished");
	}
	return finish(store, ret < 0 ? -1 : 0);
}

int ms_store_folder_find_dst(struct ms_store *store, int64_t user_id,
			     const char *dst_name, struct ms_folder_state *st_r,
			     int *found_r)
{
	int ret = folder_row(store, store->st[ST_FOLDER_FIND_DST], user_id,
			     dst_name, "folder_find_dst", st_r);

	*found_r = ret > 0;
	return ret < 0 ? -1 : 0;
}

int ms_store_folder_update(struct ms_store *store,
			   const struct ms_folder_state *fs)
{
	sqlite3_stmt *st = store->st[ST_FOLDER_UPDATE];

	if (check_len(store, fs->dst_name, sizeof(fs->dst_name),
		      "destination folder name") < 0)
		return -1;
	sqlite3_bind_int64(st, 1, fs->id);
	sqlite3_bind_text(st, 2, fs->dst_name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 3, fs->src_uidvalidity);
	sqlite3_bind_int64(st, 4, fs->dst_uidvalidity);
	sqlite3_bind_int64(st, 5, fs->hwm);
	sqlite3_bind_int64(st, 6, (int64_t)fs->modseq);
	sqlite3_bind_int64(st, 7, (int64_t)fs->msgs);
	sqlite3_bind_int64(st, 8, (int64_t)fs->bytes);
	return run_row(store, st, "folder_update", "no such folder (id %lld)",
		       (long long)fs->id);
}

int ms_store_folder_reset(struct ms_store *store, int64_t folder_id)
{
	sqlite3_stmt *st;
	int ret;

	/* one transaction: a crash must not leave the old UIDVALIDITY next
	 * to a half-emptied map */
	if (ms_store_begin(store) < 0)
		return -1;
	st = store->st[ST_FOLDER_RESET];
	sqlite3_bind_int64(st, 1, folder_id);
	ret = run_row(store, st, "folder_reset", "no such folder (id %lld)",
		      (long long)folder_id);
	if (ret == 0) {
		st = store->st[ST_FOLDER_FORGET_MSGS];
		sqlite3_bind_int64(st, 1, folder_id);
		ret = run(store, st, "folder_reset");
	}
	if (ret == 0) {
		st = store->st[ST_FOLDER_FORGET_RINTENTS];
		sqlite3_bind_int64(st, 1, folder_id);
		ret = run(store, st, "folder_reset");
	}
	return finish(store, ret);
}

/* A message's size, date, Message-ID and flags, bound in that order from
 * parameter col on. */
static void bind_msg_meta(sqlite3_stmt *st, int col,
			  const struct ms_msg_rec *rec)
{
	sqlite3_bind_int64(st, col, (int64_t)rec->size);
	sqlite3_bind_int64(st, col + 1, rec->date);
	bind_text(st, col + 2, rec->msgid);
	bind_text(st, col + 3, rec->flags);
}

int ms_store_msg_put(struct ms_store *store, int64_t folder_id,
		     const struct ms_msg_rec *rec)
{
	sqlite3_stmt *st = store->st[ST_MSG_PUT];

	if (check_len(store, rec->uidl, sizeof(rec->uidl), "UIDL") < 0 ||
	    check_len(store, rec->msgid, sizeof(rec->msgid),
		      "Message-ID") < 0 ||
	    check_len(store, rec->flags, sizeof(rec->flags), "flags") < 0)
		return -1;
	/* The key is (src_uid, "") for IMAP and (0, uidl) for POP3; a record
	 * with both or neither could never be found again by the getters. */
	if ((rec->src_uid != 0) == (rec->uidl[0] != '\0'))
		return set_error(store, "msg_put: a record needs either a "
				 "source UID or a UIDL");
	if (rec->state != MS_MSG_INTENT && rec->state != MS_MSG_DONE)
		return set_error(store, "msg_put: invalid state %d",
				 rec->state);

	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, rec->src_uid);
	bind_text(st, 3, rec->uidl);
	sqlite3_bind_int(st, 4, rec->state);
	bind_msg_meta(st, 5, rec);
	sqlite3_bind_int64(st, 9, rec->dst_uid);
	sqlite3_bind_int64(st, 10, rec->dst_floor);
	return run(store, st, "msg_put");
}

/* Columns as in MSG_COLS. */
static int read_msg(struct ms_store *s, sqlite3_stmt *st,
		    struct ms_msg_rec *rec)
{
	memset(rec, 0, sizeof(*rec));
	rec->src_uid = (uint32_t)sqlite3_column_int64(st, 0);
	rec->state = sqlite3_column_int(st, 2);
	rec->size = (uint64_t)sqlite3_column_int64(st, 3);
	rec->date = sqlite3_column_int64(st, 4);
	rec->dst_uid = (uint32_t)sqlite3_column_int64(st, 7);
	rec->dst_floor = (uint32_t)sqlite3_column_int64(st, 8);
	if (copy_text(s, st, 1, rec->uidl, sizeof(rec->uidl), "UIDL") < 0 ||
	    copy_text(s, st, 5, rec->msgid, sizeof(rec->msgid),
		      "Message-ID") < 0 ||
	    copy_text(s, st, 6, rec->flags, sizeof(rec->flags), "flags") < 0)
		return -1;
	return 0;
}

static int msg_get(struct ms_store *s, sqlite3_stmt *st,
		   struct ms_msg_rec *rec_r, int *found_r)
{
	int ret;

	*found_r = 0;
	memset(rec_r, 0, sizeof(*rec_r));
	ret = step_row(s, st, "msg_get");
	if (ret <= 0)
		return ret;
	ret = read_msg(s, st, rec_r);
	release(st);
	if (ret < 0)
		return -1;
	*found_r = 1;
	return 0;
}

int ms_store_msg_get(struct ms_store *store, int64_t folder_id,
		     uint32_t src_uid, struct ms_msg_rec *rec_r, int *found_r)
{
	sqlite3_stmt *st = store->st[ST_MSG_GET];

	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, src_uid);
	return msg_get(store, st, rec_r, found_r);
}

int ms_store_msg_get_uidl(struct ms_store *store, int64_t folder_id,
			  const char *uidl, struct ms_msg_rec *rec_r,
			  int *found_r)
{
	sqlite3_stmt *st = store->st[ST_MSG_GET_UIDL];

	sqlite3_bind_int64(st, 1, folder_id);
	bind_text(st, 2, uidl);
	return msg_get(store, st, rec_r, found_r);
}

int ms_store_msg_get_dst(struct ms_store *store, int64_t folder_id,
			 uint32_t dst_uid, struct ms_msg_rec *rec_r,
			 int *found_r)
{
	sqlite3_stmt *st = store->st[ST_MSG_GET_DST];

	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, dst_uid);
	return msg_get(store, st, rec_r, found_r);
}

int ms_store_msg_done(struct ms_store *store, int64_t folder_id,
		      uint32_t src_uid, uint32_t dst_uid, const char *flags)
{
	sqlite3_stmt *st = store->st[ST_MSG_DONE];

	if (flags && check_len(store, flags, FLAGS_SIZE, "flags") < 0)
		return -1;
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, src_uid);
	sqlite3_bind_int64(st, 3, dst_uid);
	if (flags)
		bind_text(st, 4, flags);
	return run_row(store, st, "msg_done", "msg_done: no such message "
		       "record (folder %lld, UID %u)", (long long)folder_id,
		       src_uid);
}

int ms_store_msg_set_flags(struct ms_store *store, int64_t folder_id,
			   uint32_t src_uid, const char *flags)
{
	sqlite3_stmt *st = store->st[ST_MSG_SET_FLAGS];

	if (flags == NULL)
		flags = "";
	if (check_len(store, flags, FLAGS_SIZE, "flags") < 0)
		return -1;
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, src_uid);
	bind_text(st, 3, flags);
	return run_row(store, st, "msg_set_flags", "msg_set_flags: no such "
		       "message record (folder %lld, UID %u)",
		       (long long)folder_id, src_uid);
}

int ms_store_msg_delete(struct ms_store *store, int64_t folder_id,
			uint32_t src_uid, const char *uidl)
{
	sqlite3_stmt *st = store->st[ST_MSG_DELETE];

	/* Deleting what is not there is not an error: the caller wants it
	 * gone, and a retry after a crash must not fail. */
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, src_uid);
	bind_text(st, 3, src_uid != 0 || uidl == NULL ? "" : uidl);
	return run(store, st, "msg_delete");
}

/*
 * Reads FOREACH_PAGE records at a time into memory and runs the callbacks
 * with no statement active. So the callback may call back into the store
 * (msg_done on the intents being walked, even a nested foreach), and a long
 * walk holds no read snapshot open that would keep WAL checkpoints from
 * finishing. Without an enclosing transaction the walk is therefore not one
 * snapshot: records the callback changes may or may not be seen again.
 *
 * rintents: st is ST_RINTENT_PAGE (keyed by the destination UID alone)
 * rather than ST_MSG_PAGE (keyed by source UID and UIDL, filtered by state).
 */
static int walk(struct ms_store *store, sqlite3_stmt *st, int64_t folder_id,
		int state, int rintents, ms_store_msg_cb *cb, void *ctx)
{
	struct ms_msg_rec *page;
	int64_t last_uid = -1;		/* below every key */
	char last_uidl[sizeof(page->uidl)] = "";
	int i, n, ret = 0;

	page = malloc(FOREACH_PAGE * sizeof(*page));
	if (page == NULL)
		return set_error(store, "msg_foreach: out of memory");

	do {
		n = 0;
		sqlite3_bind_int64(st, 1, folder_id);
		sqlite3_bind_int64(st, 2, last_uid);
		if (rintents) {
			sqlite3_bind_int(st, 3, FOREACH_PAGE);
		} else {
			bind_text(st, 3, last_uidl);
			sqlite3_bind_int(st, 4, state < 0 ? -1 : state);
			sqlite3_bind_int(st, 5, FOREACH_PAGE);
		}
		while ((ret = step_row(store, st, "msg_foreach")) == 1) {
			if (read_msg(store, st, &page[n]) < 0) {
				release(st);
				ret = -1;
				break;
			}
			n++;
		}
		if (ret < 0)
			break;
		/* step_row released the statement at SQLITE_DONE */
		if (n > 0) {
			last_uid = rintents ? page[n - 1].dst_uid :
				   page[n - 1].src_uid;
			memcpy(last_uidl, page[n - 1].uidl, sizeof(last_uidl));
		}
		for (i = 0; i < n && ret == 0; i++)
			ret = cb(ctx, &page[i]);
	} while (ret == 0 && n == FOREACH_PAGE);

	free(page);
	return ret;
}

int ms_store_msg_foreach(struct ms_store *store, int64_t folder_id, int state,
			 ms_store_msg_cb *cb, void *ctx)
{
	return walk(store, store->st[ST_MSG_PAGE], folder_id, state, 0, cb,
		    ctx);
}

/* Steps a "SELECT count(*)" statement whose parameters are bound. */
static int count_row(struct ms_store *store, sqlite3_stmt *st,
		     const char *what, uint64_t *count_r)
{
	int ret = step_row(store, st, what);

	if (ret == 0)
		ret = set_error(store, "%s: no result", what);
	if (ret < 0)
		return -1;
	*count_r = (uint64_t)sqlite3_column_int64(st, 0);
	release(st);
	return 0;
}

int ms_store_msg_count(struct ms_store *store, int64_t folder_id, int state,
		       uint64_t *count_r)
{
	sqlite3_stmt *st = store->st[ST_MSG_COUNT];

	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int(st, 2, state < 0 ? -1 : state);
	return count_row(store, st, "msg_count", count_r);
}

/* ---- rollback intents ---- */

int ms_store_rintent_put(struct ms_store *store, int64_t folder_id,
			 const struct ms_msg_rec *rec)
{
	sqlite3_stmt *st = store->st[ST_RINTENT_PUT];

	if (check_len(store, rec->msgid, sizeof(rec->msgid),
		      "Message-ID") < 0 ||
	    check_len(store, rec->flags, sizeof(rec->flags), "flags") < 0)
		return -1;
	if (rec->dst_uid == 0)
		return set_error(store, "rintent_put: no destination UID");
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, rec->dst_uid);
	bind_msg_meta(st, 3, rec);
	sqlite3_bind_int64(st, 7, rec->dst_floor);
	return run(store, st, "rintent_put");
}

int ms_store_rintent_delete(struct ms_store *store, int64_t folder_id,
			    uint32_t dst_uid)
{
	sqlite3_stmt *st = store->st[ST_RINTENT_DELETE];

	/* as msg_delete: what is not there is gone already */
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, dst_uid);
	return run(store, st, "rintent_delete");
}

int ms_store_rintent_foreach(struct ms_store *store, int64_t folder_id,
			     ms_store_msg_cb *cb, void *ctx)
{
	return walk(store, store->st[ST_RINTENT_PAGE], folder_id, -1, 1, cb,
		    ctx);
}

int ms_store_rintent_count(struct ms_store *store, int64_t folder_id,
			   uint64_t *count_r)
{
	sqlite3_stmt *st = store->st[ST_RINTENT_COUNT];

	sqlite3_bind_int64(st, 1, folder_id);
	return count_row(store, st, "rintent_count", count_r);
}

/* ---- the folders of a user (planning a rollback: not a hot path) ---- */

int ms_store_folder_foreach(struct ms_store *store, int64_t user_id,
			    ms_store_folder_cb *cb, void *ctx)
{
	struct ms_folder_state fs;
	sqlite3_stmt *st;
	int rc, ret = 0;

	if (sqlite3_prepare_v2(store->db, "SELECT " FOLDER_COLS " FROM folders"
			       " WHERE user_id = ?1 ORDER BY src_name", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(store, "folder_foreach");
	sqlite3_bind_int64(st, 1, user_id);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		if (read_folder(store, st, &fs) < 0) {
			ret = -1;
			break;
		}
		if ((ret = cb(ctx, &fs)) != 0)
			break;
	}
	sqlite3_finalize(st);
	if (ret == 0 && rc != SQLITE_DONE)
		return set_error(store, "folder_foreach: %s",
				 sqlite3_errstr(rc));
	return ret;
}

/* ---- users, for the gateway and the control commands ----
 * Not on a hot path: statements are prepared per call. */

static void user_row(sqlite3_stmt *st, struct ms_user_info *u)
{
	const unsigned char *t;

	memset(u, 0, sizeof(*u));
	u->id = sqlite3_column_int64(st, 0);
	t = sqlite3_column_text(st, 1);
	snprintf(u->name, sizeof(u->name), "%s", t ? (const char *)t : "");
	t = sqlite3_column_text(st, 2);
	snprintf(u->state, sizeof(u->state), "%s", t ? (const char *)t : "");
	t = sqlite3_column_text(st, 3);
	snprintf(u->policy, sizeof(u->policy), "%s", t ? (const char *)t : "");
	t = sqlite3_column_text(st, 4);
	snprintf(u->last_error, sizeof(u->last_error), "%s",
		 t ? (const char *)t : "");
	u->msgs = (uint64_t)sqlite3_column_int64(st, 5);
	u->bytes = (uint64_t)sqlite3_column_int64(st, 6);
	u->updated_at = sqlite3_column_int64(st, 7);
}

#define USER_COLS "id, name, state, policy, last_error, msgs_copied, " \
	"bytes_copied, updated_at"

int ms_store_user_info(struct ms_store *store, const char *name,
		       struct ms_user_info *info_r, int *found_r)
{
	sqlite3_stmt *st;
	int rc;

	*found_r = 0;
	if (store->user_info == NULL &&
	    sqlite3_prepare_v2(store->db, "SELECT " USER_COLS " FROM users "
			       "WHERE name = ?1", -1, &store->user_info,
			       NULL) != SQLITE_OK)
		return db_error(store, "user_info");
	st = store->user_info;
	sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		user_row(st, info_r);
		*found_r = 1;
	}
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return set_error(store, "user_info: %s", sqlite3_errstr(rc));
	return 0;
}

int ms_store_user_foreach(struct ms_store *store, ms_store_user_cb *cb,
			  void *ctx)
{
	struct ms_user_info u;
	sqlite3_stmt *st;
	int rc, ret = 0;

	if (sqlite3_prepare_v2(store->db, "SELECT " USER_COLS " FROM users "
			       "ORDER BY name", -1, &st, NULL) != SQLITE_OK)
		return db_error(store, "user_foreach");
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		user_row(st, &u);
		if ((ret = cb(ctx, &u)) != 0)
			break;
	}
	sqlite3_finalize(st);
	if (ret == 0 && rc != SQLITE_DONE)
		return set_error(store, "user_foreach: %s", sqlite3_errstr(rc));
	return ret;
}

/* 0 for passthrough, hold and off; else -1 with the store's error set. */
static int bad_policy(struct ms_store *store, const char *policy)
{
	if (!strcmp(policy, "passthrough") || !strcmp(policy, "hold") ||
	    !strcmp(policy, "off"))
		return 0;
	return set_error(store, "invalid policy \"%s\" (passthrough, hold or "
			 "off)", policy);
}

int ms_store_user_set_policy(struct ms_store *store, int64_t user_id,
			     const char *policy)
{
	sqlite3_stmt *st;
	int rc;

	if (policy != NULL && *policy != '\0' && bad_policy(store, policy))
		return -1;
	if (sqlite3_prepare_v2(store->db, "UPDATE users SET policy = ?2 "
			       "WHERE id = ?1", -1, &st, NULL) != SQLITE_OK)
		return db_error(store, "user_set_policy");
	sqlite3_bind_int64(st, 1, user_id);
	if (policy != NULL && *policy != '\0')
		sqlite3_bind_text(st, 2, policy, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc != SQLITE_DONE)
		return set_error(store, "user_set_policy: %s",
				 sqlite3_errstr(rc));
	return 0;
}

int ms_store_policy_set(struct ms_store *store, const char *scope,
			const char *policy)
{
	sqlite3_stmt *st;
	int rc;

	if (policy != NULL && bad_policy(store, policy))
		return -1;
	if (sqlite3_prepare_v2(store->db, policy != NULL ?
			       "INSERT OR REPLACE INTO policies (scope, policy) "
			       "VALUES (?1, ?2)" :
			       "DELETE FROM policies WHERE scope = ?1", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(store, "policy_set");
	sqlite3_bind_text(st, 1, scope, -1, SQLITE_STATIC);
	if (policy != NULL)
		sqlite3_bind_text(st, 2, policy, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc != SQLITE_DONE)
		return set_error(store, "policy_set: %s", sqlite3_errstr(rc));
	return 0;
}

int ms_store_policy_foreach(struct ms_store *store, ms_store_policy_cb *cb,
			    void *ctx)
{
	sqlite3_stmt *st;
	int rc, r = 0;

	if (sqlite3_prepare_v2(store->db, "SELECT scope, policy FROM policies "
			       "ORDER BY scope", -1, &st, NULL) != SQLITE_OK)
		return db_error(store, "policy_foreach");
	while ((rc = sqlite3_step(st)) == SQLITE_ROW && r == 0)
		r = cb(ctx, (const char *)sqlite3_column_text(st, 0),
		       (const char *)sqlite3_column_text(st, 1));
	sqlite3_finalize(st);
	if (r != 0)
		return r;
	if (rc != SQLITE_DONE)
		return set_error(store, "policy_foreach: %s",
				 sqlite3_errstr(rc));
	return 0;
}

/* ---- retirement of the source (mailshiftctl retire) ----
 * The gateway writes a use at most once a minute per user; the rest is
 * read by mailshiftctl. Prepared per call. */

int ms_store_source_use_note(struct ms_store *store,
			     const struct ms_source_use *u)
{
	sqlite3_stmt *st;

	if (sqlite3_prepare_v2(store->db, "INSERT OR REPLACE INTO source_use "
			       "(key, kind, name, at, slack) VALUES (?1, ?2, "
			       "?3, ?4, ?5)", -1, &st, NULL) != SQLITE_OK)
		return db_error(store, "source_use_note");
	bind_text(st, 1, u->key);
	bind_text(st, 2, u->kind);
	bind_text(st, 3, u->name);
	sqlite3_bind_int64(st, 4, u->at);
	sqlite3_bind_int64(st, 5, u->slack);
	return run_once(store, st, "source_use_note");
}

int ms_store_source_use_foreach(struct ms_store *store, int64_t since,
				ms_store_source_use_cb *cb, void *ctx)
{
	struct ms_source_use u;
	sqlite3_stmt *st;
	int rc, ret = 0;

	if (sqlite3_prepare_v2(store->db, "SELECT key, kind, name, at, slack "
			       "FROM source_use WHERE at + slack >= ?1 "
			       "ORDER BY at DESC, key, kind", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(store, "source_use_foreach");
	sqlite3_bind_int64(st, 1, since);
	while (ret == 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
		memset(&u, 0, sizeof(u));
		if (copy_text(store, st, 0, u.key, sizeof(u.key), "key") < 0 ||
		    copy_text(store, st, 1, u.kind, sizeof(u.kind),
			      "kind") < 0 ||
		    copy_text(store, st, 2, u.name, sizeof(u.name),
			      "name") < 0) {
			ret = -1;
			break;
		}
		u.at = sqlite3_column_int64(st, 3);
		u.slack = sqlite3_column_int64(st, 4);
		ret = cb(ctx, &u);
	}
	sqlite3_finalize(st);
	if (ret == 0 && rc != SQLITE_DONE)
		return set_error(store, "source_use_foreach: %s",
				 sqlite3_errstr(rc));
	return ret;
}

int ms_store_user_moves(struct ms_store *store, int64_t user_id,
			int64_t *first_copy_r, int64_t *moved_r)
{
	sqlite3_stmt *st;
	int rc;

	*first_copy_r = *moved_r = 0;
	if (sqlite3_prepare_v2(store->db, "SELECT first_copy, moved FROM "
			       "user_moves WHERE user_id = ?1", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(store, "user_moves");
	sqlite3_bind_int64(st, 1, user_id);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*first_copy_r = sqlite3_column_int64(st, 0);
		*moved_r = sqlite3_column_int64(st, 1);
	}
	sqlite3_finalize(st);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return set_error(store, "user_moves: %s", sqlite3_errstr(rc));
	return 0;
}

int ms_store_retirement_add(struct ms_store *store,
			    const struct ms_retirement *r)
{
	sqlite3_stmt *st;

	if (sqlite3_prepare_v2(store->db, "INSERT INTO retirements (at, uid, "
			       "forced, record) VALUES (?1, ?2, ?3, ?4)", -1,
			       &st, NULL) != SQLITE_OK)
		return db_error(store, "retirement_add");
	sqlite3_bind_int64(st, 1, r->at);
	sqlite3_bind_int64(st, 2, r->uid);
	sqlite3_bind_int(st, 3, r->forced);
	bind_text(st, 4, r->record != NULL ? r->record : "{}");
	return run_once(store, st, "retirement_add");
}

int ms_store_retirement_get(struct ms_store *store, struct ms_retirement *r,
			    int *found_r)
{
	sqlite3_stmt *st;
	const char *text;
	int rc, ret = 0;

	memset(r, 0, sizeof(*r));
	*found_r = 0;
	if (sqlite3_prepare_v2(store->db, "SELECT at, uid, forced, record FROM "
			       "retirements ORDER BY id DESC LIMIT 1", -1, &st,
			       NULL) != SQLITE_OK)
		return db_error(store, "retirement_get");
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		r->at = sqlite3_column_int64(st, 0);
		r->uid = (unsigned int)sqlite3_column_int64(st, 1);
		r->forced = sqlite3_column_int(st, 2);
		text = (const char *)sqlite3_column_text(st, 3);
		r->record = strdup(text != NULL ? text : "{}");
		if (r->record == NULL)
			ret = set_error(store, "retirement_get: out of memory");
		*found_r = ret == 0;
	} else if (rc != SQLITE_DONE) {
		ret = set_error(store, "retirement_get: %s", sqlite3_errstr(rc));
	}
	sqlite3_finalize(st);
	return ret;
}

/* ---- folder identity (once per folder: statements prepared per call) ---- */

static int prepare(struct ms_store *s, const char *sql, sqlite3_stmt **st,
		   const char *what)
{
	if (sqlite3_prepare_v2(s->db, sql, -1, st, NULL) != SQLITE_OK)
		return db_error(s, what);
	return 0;
}

/* The one number a "SELECT x FROM t WHERE folder_id = ?1" gives (*v_r
 * left as it is without a row). */
static int folder_number(struct ms_store *store, const char *sql,
			 int64_t folder_id, const char *what, int64_t *v_r)
{
	sqlite3_stmt *st;
	int rc;

	if (prepare(store, sql, &st, what) < 0)
		return -1;
	sqlite3_bind_int64(st, 1, folder_id);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW)
		*v_r = sqlite3_column_int64(st, 0);
	sqlite3_finalize(st);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return set_error(store, "%s: %s", what, sqlite3_errstr(rc));
	return 0;
}

int ms_store_identity_get(struct ms_store *store, int64_t folder_id,
			  int *state_r)
{
	int64_t v = MS_ID_NONE;
	int ret = folder_number(store, "SELECT state FROM folder_identity"
				" WHERE folder_id = ?1", folder_id,
				"identity_get", &v);

	*state_r = (int)v;
	return ret;
}

int ms_store_identity_set(struct ms_store *store, int64_t folder_id,
			  int state, const char *reason)
{
	sqlite3_stmt *st;

	if (prepare(store, "INSERT OR REPLACE INTO folder_identity"
		    " (folder_id, state, reason) VALUES (?1, ?2, ?3)", &st,
		    "identity_set") < 0)
		return -1;
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int(st, 2, state);
	bind_text(st, 3, reason != NULL ? reason : "");
	if (sqlite3_step(st) != SQLITE_DONE) {
		db_error(store, "identity_set");
		sqlite3_finalize(st);
		return -1;
	}
	sqlite3_finalize(st);
	return 0;
}

int ms_store_identity_lost_users(struct ms_store *store, uint64_t *users_r,
				 uint64_t *folders_r)
{
	sqlite3_stmt *st;
	int rc;

	*users_r = *folders_r = 0;
	if (prepare(store, "SELECT count(DISTINCT f.user_id), count(*)"
		    " FROM folder_identity i JOIN folders f"
		    " ON f.id = i.folder_id WHERE i.state = 2", &st,
		    "identity_lost_users") < 0)
		return -1;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*users_r = (uint64_t)sqlite3_column_int64(st, 0);
		*folders_r = (uint64_t)sqlite3_column_int64(st, 1);
	}
	sqlite3_finalize(st);
	if (rc != SQLITE_ROW)
		return set_error(store, "identity_lost_users: %s",
				 sqlite3_errstr(rc));
	return 0;
}

/* ---- the source's UIDNEXT of a folder's last copy pass (the gateway's
 * IMAP view numbers new mail above it) ---- */

static int src_next_table(struct ms_store *store)
{
	return exec(store, "CREATE TABLE IF NOT EXISTS folder_src_next ("
		    " folder_id INTEGER PRIMARY KEY REFERENCES folders(id)"
		    " ON DELETE CASCADE,"
		    " uidnext INTEGER NOT NULL);", "src_next_table");
}

int ms_store_src_next_set(struct ms_store *store, int64_t folder_id,
			  uint32_t uidnext)
{
	sqlite3_stmt *st;
	int rc;

	if (src_next_table(store) < 0 ||
	    prepare(store, "INSERT OR REPLACE INTO folder_src_next"
		    " (folder_id, uidnext) VALUES (?1, ?2)", &st,
		    "src_next_set") < 0)
		return -1;
	sqlite3_bind_int64(st, 1, folder_id);
	sqlite3_bind_int64(st, 2, uidnext);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if (rc != SQLITE_DONE)
		return set_error(store, "src_next_set: %s", sqlite3_errstr(rc));
	return 0;
}

int ms_store_src_next_get(struct ms_store *store, int64_t folder_id,
			  uint32_t *uidnext_r)
{
	int64_t v = 0;
	int ret = src_next_table(store) < 0 ? -1 :
		  folder_number(store, "SELECT uidnext FROM folder_src_next"
				" WHERE folder_id = ?1", folder_id,
				"src_next_get", &v);

	*uidnext_r = (uint32_t)v;
	return ret;
}
