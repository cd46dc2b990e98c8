/* The store's database drivers: the few calls store.c makes of an SQL
 * engine, with an embedded SQLite (store_sqlite.c) and a PostgreSQL server
 * through libpq (store_pg.c) behind them.
 *
 * SQL is written once, in the dialect both engines accept, with numbered
 * parameters "?1".."?N" (the PostgreSQL driver turns them into "$1".."$N").
 * Text bound to a statement is not copied: it must outlive the statement's
 * next step (store.c binds the caller's buffers and resets right after).
 */
#ifndef MS_STORE_DB_H
#define MS_STORE_DB_H

#include <stddef.h>
#include <stdint.h>

/* Each driver's connection and statement begin with their driver, so
 * that the calls below find it. */
struct db;
struct db_stmt;
#define DB_DRIVER(h) (*(const struct db_driver *const *)(h))

enum { DB_ERROR = -1, DB_DONE = 0, DB_ROW = 1 };

/* How a statement is kept (db_prepare's mode). */
enum {
	DB_ONCE = 0,		/* used for a call or two */
	DB_KEEP = 1,		/* for the connection's life (prepared on the
				   PostgreSQL server) */
	DB_STREAM = 2,		/* a query whose rows come one at a time
				   (PostgreSQL: single-row mode), not all at
				   once: nothing else runs on its connection
				   until it is done or reset */
};

struct db_driver {
	const char *name;
	/* 1 for SQLite: store.c picks the schema's types (written once,
	 * as a macro) and names an index SQLite would not choose itself. */
	int sqlite_dialect;

	/* app: the connection's name where the engine shows one */
	int (*open)(const char *target, const char *app, struct db **db_r,
		    char *err, size_t errsz);
	void (*close)(struct db *db);	/* rolls back what is open */
	const char *(*errmsg)(struct db *db);

	/* mode: DB_ONCE, DB_KEEP or DB_STREAM */
	int (*prepare)(struct db *db, const char *sql, int mode,
		       struct db_stmt **st_r);
	void (*finalize)(struct db_stmt *st);
	void (*bind_int64)(struct db_stmt *st, int idx, int64_t v);
	void (*bind_text)(struct db_stmt *st, int idx, const char *text);
	int (*step)(struct db_stmt *st);	/* DB_ROW, DB_DONE, DB_ERROR */
	void (*reset)(struct db_stmt *st);	/* and unbinds: NULL again */
	int64_t (*column_int64)(struct db_stmt *st, int col);
	/* NULL for an SQL NULL (and, SQLite, out of memory: is_null says) */
	const char *(*column_text)(struct db_stmt *st, int col, size_t *len_r);
	int (*column_is_null)(struct db_stmt *st, int col);
	int (*changes)(struct db *db);	/* rows the last statement changed */
	int (*exec)(struct db *db, const char *sql);
	int (*in_transaction)(struct db *db);

	/* A read-only transaction whose reads all see one instant. */
	const char *begin_snapshot;
	/* The write transaction that creates or upgrades the schema: one
	 * process at a time, the version read again inside. */
	int (*begin_schema)(struct db *db);
	int (*get_version)(struct db *db, int *version_r);
	int (*set_version)(struct db *db, int version);
	/* After rows were written with their ids (store copy): the next id
	 * handed out is above them. NULL when the engine needs nothing. */
	int (*sync_ids)(struct db *db, const char *table);
};

extern const struct db_driver ms_db_sqlite;
extern const struct db_driver ms_db_pg;

/* The driver for a store target: a postgresql:// URL or a file path. */
const struct db_driver *ms_db_driver_for(const char *target);

static inline const char *db_errmsg(struct db *db)
{
	return DB_DRIVER(db)->errmsg(db);
}

static inline void db_close(struct db *db)
{
	if (db != NULL)
		DB_DRIVER(db)->close(db);
}

static inline int db_prepare(struct db *db, const char *sql, int mode,
			     struct db_stmt **st_r)
{
	return DB_DRIVER(db)->prepare(db, sql, mode, st_r);
}

static inline void db_finalize(struct db_stmt *st)
{
	if (st != NULL)
		DB_DRIVER(st)->finalize(st);
}

static inline void db_bind_int64(struct db_stmt *st, int idx, int64_t v)
{
	DB_DRIVER(st)->bind_int64(st, idx, v);
}

/* NULL binds an SQL NULL */
static inline void db_bind_text(struct db_stmt *st, int idx, const char *t)
{
	DB_DRIVER(st)->bind_text(st, idx, t);
}

static inline int db_step(struct db_stmt *st)
{
	return DB_DRIVER(st)->step(st);
}

static inline void db_reset(struct db_stmt *st)
{
	DB_DRIVER(st)->reset(st);
}

static inline int64_t db_column_int64(struct db_stmt *st, int col)
{
	return DB_DRIVER(st)->column_int64(st, col);
}

static inline const char *db_column_text(struct db_stmt *st, int col,
					 size_t *len_r)
{
	return DB_DRIVER(st)->column_text(st, col, len_r);
}

static inline int db_column_is_null(struct db_stmt *st, int col)
{
	return DB_DRIVER(st)->column_is_null(st, col);
}

static inline int db_changes(struct db *db)
{
	return DB_DRIVER(db)->changes(db);
}

static inline int db_exec(struct db *db, const char *sql)
{
	return DB_DRIVER(db)->exec(db, sql);
}

static inline int db_in_transaction(struct db *db)
{
	return DB_DRIVER(db)->in_transaction(db);
}

#endif
