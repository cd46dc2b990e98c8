/* The store's SQLite driver (store_db.h): an embedded database file in WAL
 * mode, synchronous=NORMAL (a commit survives a kill -9 of the process),
 * created owner-only.
 */
#include "store_db.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

struct db {
	const struct db_driver *d;	/* first: see store_db.h */
	sqlite3 *h;
	char error[256];
};

struct db_stmt {
	const struct db_driver *d;
	struct db *db;
	sqlite3_stmt *st;
};

static const char *lite_errmsg(struct db *db)
{
	if (db->error[0] != '\0')
		return db->error;
	return sqlite3_errmsg(db->h);
}

static void lite_close(struct db *db)
{
	if (db == NULL)
		return;
	/* an open transaction is rolled back by the close */
	sqlite3_close(db->h);
	free(db);
}

static int lite_exec(struct db *db, const char *sql)
{
	db->error[0] = '\0';
	return sqlite3_exec(db->h, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
}

/* One text value of a pragma. */
static int pragma_text(struct db *db, const char *sql, char *buf,
		       size_t size)
{
	sqlite3_stmt *st;
	const unsigned char *t;
	int ret = -1;

	if (sqlite3_prepare_v2(db->h, sql, -1, &st, NULL) != SQLITE_OK)
		return -1;
	if (sqlite3_step(st) == SQLITE_ROW) {
		t = sqlite3_column_text(st, 0);
		snprintf(buf, size, "%s", t ? (const char *)t : "");
		ret = 0;
	}
	sqlite3_finalize(st);
	return ret;
}

static int set_pragmas(struct db *db, char *err, size_t errsz)
{
	char mode[32];

	/* First, so that every later step waits out another process's write
	 * lock instead of failing with SQLITE_BUSY at once. */
	if (sqlite3_busy_timeout(db->h, 5000) != SQLITE_OK) {
		snprintf(err, errsz, "busy_timeout: %s", sqlite3_errmsg(db->h));
		return -1;
	}
	/* journal_mode answers with the mode now in force: a file system
	 * without shared memory would leave us in rollback mode, where two
	 * processes block each other. Refuse that rather than limp along. */
	if (pragma_text(db, "PRAGMA journal_mode = WAL", mode,
			sizeof(mode)) < 0) {
		snprintf(err, errsz, "journal_mode: %s", sqlite3_errmsg(db->h));
		return -1;
	}
	if (strcmp(mode, "wal") != 0) {
		snprintf(err, errsz, "journal_mode: cannot switch to WAL "
			 "(got %s)", mode[0] ? mode : "nothing");
		return -1;
	}
	if (lite_exec(db, "PRAGMA synchronous = NORMAL") < 0 ||
	    lite_exec(db, "PRAGMA foreign_keys = ON") < 0) {
		snprintf(err, errsz, "pragma: %s", sqlite3_errmsg(db->h));
		return -1;
	}
	return 0;
}

static int lite_open(const char *path, const char *app, struct db **db_r,
		     char *err, size_t errsz)
{
	struct db *db;
	int fd;

	*db_r = NULL;
	/* SQLite would create the file 0644 (less the umask). The store names
	 * users and their folders, so create it ourselves, owner-only; the
	 * -wal and -shm files inherit the database file's mode. */
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd >= 0) {
		/* exactly 0600 even under an odd umask such as 0277 */
		if (fchmod(fd, 0600) < 0) {
			snprintf(err, errsz, "%s: chmod: %s", path,
				 strerror(errno));
			close(fd);
			return -1;
		}
		close(fd);
	} else if (errno != EEXIST) {
		snprintf(err, errsz, "%s: %s", path, strerror(errno));
		return -1;
	}

	db = calloc(1, sizeof(*db));
	if (db == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	db->d = &ms_db_sqlite;
	if (sqlite3_open_v2(path, &db->h, SQLITE_OPEN_READWRITE |
			    SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
		if (db->h == NULL)
			snprintf(err, errsz, "%s: out of memory", path);
		else
			snprintf(err, errsz, "%s: %s", path,
				 sqlite3_errmsg(db->h));
		lite_close(db);
		return -1;
	}
	if (set_pragmas(db, err, errsz) < 0) {
		lite_close(db);
		return -1;
	}
	*db_r = db;
	return 0;
}

static int lite_prepare(struct db *db, const char *sql, int mode,
			struct db_stmt **st_r)
{
	struct db_stmt *st = calloc(1, sizeof(*st));

	db->error[0] = '\0';
	if (st == NULL) {
		snprintf(db->error, sizeof(db->error), "out of memory");
		return -1;
	}
	st->d = &ms_db_sqlite;
	st->db = db;
	/* PERSISTENT: these live as long as the connection */
	if (sqlite3_prepare_v3(db->h, sql, -1,
			       mode == DB_KEEP ? SQLITE_PREPARE_PERSISTENT : 0,
			       &st->st, NULL) != SQLITE_OK) {
		free(st);
		return -1;
	}
	*st_r = st;
	return 0;
}

static void lite_finalize(struct db_stmt *st)
{
	if (st == NULL)
		return;
	sqlite3_finalize(st->st);
	free(st);
}

static void lite_bind_int64(struct db_stmt *st, int idx, int64_t v)
{
	sqlite3_bind_int64(st->st, idx, v);
}

/* SQLITE_STATIC: see store_db.h on the text's lifetime */
static void lite_bind_text(struct db_stmt *st, int idx, const char *text)
{
	if (text != NULL)
		sqlite3_bind_text(st->st, idx, text, -1, SQLITE_STATIC);
}

static int lite_step(struct db_stmt *st)
{
	int rc;

	st->db->error[0] = '\0';
	rc = sqlite3_step(st->st);
	if (rc == SQLITE_ROW)
		return DB_ROW;
	if (rc == SQLITE_DONE)
		return DB_DONE;
	return DB_ERROR;
}

static void lite_reset(struct db_stmt *st)
{
	sqlite3_reset(st->st);
	sqlite3_clear_bindings(st->st);
}

static int64_t lite_column_int64(struct db_stmt *st, int col)
{
	return sqlite3_column_int64(st->st, col);
}

static const char *lite_column_text(struct db_stmt *st, int col,
				    size_t *len_r)
{
	const unsigned char *t = sqlite3_column_text(st->st, col);

	if (len_r != NULL)
		*len_r = t != NULL ? (size_t)sqlite3_column_bytes(st->st, col) :
			 0;
	return (const char *)t;
}

static int lite_column_is_null(struct db_stmt *st, int col)
{
	return sqlite3_column_type(st->st, col) == SQLITE_NULL;
}

static int lite_changes(struct db *db)
{
	return sqlite3_changes(db->h);
}

static int lite_in_transaction(struct db *db)
{
	return !sqlite3_get_autocommit(db->h);
}

/* IMMEDIATE: two processes opening a new store at once must not both
 * create it. */
static int lite_begin_schema(struct db *db)
{
	return lite_exec(db, "BEGIN IMMEDIATE");
}

static int lite_get_version(struct db *db, int *version_r)
{
	char buf[32];

	db->error[0] = '\0';
	if (pragma_text(db, "PRAGMA user_version", buf, sizeof(buf)) < 0)
		return -1;
	*version_r = atoi(buf);
	return 0;
}

static int lite_set_version(struct db *db, int version)
{
	char sql[64];

	snprintf(sql, sizeof(sql), "PRAGMA user_version = %d", version);
	return lite_exec(db, sql);
}

const struct db_driver ms_db_sqlite = {
	.name = "sqlite",
	.sqlite_dialect = 1,
	/* deferred: in WAL mode the first read fixes the snapshot, and no
	 * writer waits for it */
	.begin_snapshot = "BEGIN",
	.open = lite_open,
	.close = lite_close,
	.errmsg = lite_errmsg,
	.prepare = lite_prepare,
	.finalize = lite_finalize,
	.bind_int64 = lite_bind_int64,
	.bind_text = lite_bind_text,
	.step = lite_step,
	.reset = lite_reset,
	.column_int64 = lite_column_int64,
	.column_text = lite_column_text,
	.column_is_null = lite_column_is_null,
	.changes = lite_changes,
	.exec = lite_exec,
	.in_transaction = lite_in_transaction,
	.begin_schema = lite_begin_schema,
	.get_version = lite_get_version,
	.set_version = lite_set_version,
};
