/* The store's PostgreSQL driver (store_db.h), through libpq in blocking
 * mode. The target is a postgresql:// URL; TLS is the URL's sslmode, the
 * password comes from a password file (~/.pgpass or PGPASSFILE), never from
 * the URL: one there is refused, since the URL sits in the config file and
 * in mailshiftctl's argv.
 *
 * Rows come back whole (PQsendQueryPrepared, then its result), and step()
 * walks them; text comes
 * and goes in the text format, so an integer column is printed and parsed.
 *
 * A statement's answer is waited for at most ms_store_pg_timeout_ms (the
 * daemon's [store] timeout, 30 s unless set): a server that stops answering
 * without resetting the connection (hung, or its process stopped: the
 * kernel still acknowledges every byte, so no TCP timeout fires) fails the
 * statement then, and the connection is dropped as if lost.
 *
 * A lost connection (the server restarted, the network cut) fails the
 * statement that finds it; the next one connects again (at most every
 * RETRY_SECONDS) and prepares the persistent statements anew. Not inside a transaction, though: what it
 * had written is gone with the session, so every statement fails until the
 * caller's ROLLBACK, which then only reconnects.
 */
#include "store.h"
#include "store_db.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <libpq-fe.h>

#define PG_MAX_PARAMS 16
/* a lost connection is tried again at most this often */
#define RETRY_SECONDS 5
/* pg_advisory_xact_lock key for schema changes: "mshf" */
#define SCHEMA_LOCK "1836279910"

struct db {
	const struct db_driver *d;	/* first: see store_db.h */
	PGconn *conn;
	int nstmts;			/* names handed out: ms1, ms2, ... */
	int session;			/* counts reconnections */
	int txn_open;			/* a transaction, when last seen */
	time_t retry_at;		/* no new connection before */
	int broken;			/* an answer not waited for: drop */
	int changes;
	char error[512];
};

struct db_stmt {
	const struct db_driver *d;
	struct db *db;
	char *sql;			/* with $n, for PQexecParams */
	char name[16];			/* "" = not prepared on the server */
	int session;			/* the db->session it was prepared in */
	int stream;			/* DB_STREAM: rows one at a time */
	int streaming;			/* its query is on the wire */
	int nparams;
	const char *values[PG_MAX_PARAMS];
	char ints[PG_MAX_PARAMS][24];
	PGresult *res;
	int row, nrows;
};

static void set_err(struct db *db, const char *prefix, const char *msg)
{
	size_t n;

	snprintf(db->error, sizeof(db->error), "%s%s", prefix,
		 msg != NULL ? msg : "unknown error");
	n = strlen(db->error);
	while (n > 0 && (db->error[n - 1] == '\n' || db->error[n - 1] == ' '))
		db->error[--n] = '\0';
}

static void res_err(struct db *db, PGresult *res)
{
	if (res == NULL)	/* result() or next_result() said why */
		return;
	const char *m = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) :
			NULL;

	set_err(db, "", m != NULL ? m : PQerrorMessage(db->conn));
}

unsigned int ms_store_pg_timeout_ms = MS_STORE_PG_TIMEOUT_MS;

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Until libpq can go on without waiting: 0, or -1 (error set) when the
 * connection failed or the server did not answer by end (then the
 * connection is dropped: what it was doing is not waited for). connect:
 * a reconnection (PQresetPoll) in place of a statement's answer. */
static int await(struct db *db, int64_t end, int connect)
{
	if (db->broken)		/* said when it broke */
		return -1;
	for (;;) {
		struct pollfd p = { .fd = PQsocket(db->conn) };
		int64_t left = end - now_ms();
		int flush = 0;

		if (connect) {
			PostgresPollingStatusType ps = PQresetPoll(db->conn);

			if (ps == PGRES_POLLING_OK)
				return 0;
			if (ps == PGRES_POLLING_FAILED)
				goto failed;
			p.events = ps == PGRES_POLLING_WRITING ? POLLOUT :
				   POLLIN;
		} else {
			flush = PQflush(db->conn);
			if (flush < 0)
				goto failed;
			if (!flush && !PQisBusy(db->conn))
				return 0;
			p.events = POLLIN | (flush ? POLLOUT : 0);
		}
		if (left <= 0) {
			db->broken = 1;
			set_err(db, "", "the database did not answer within the "
				"store's timeout: its connection is dropped");
			return -1;
		}
		if (poll(&p, 1, left > 60000 ? 60000 : (int)left) < 0 &&
		    errno != EINTR) {
			db->broken = 1;
			set_err(db, "poll: ", strerror(errno));
			return -1;
		}
		if (!connect && (p.revents & (POLLIN | POLLERR | POLLHUP)) &&
		    !PQconsumeInput(db->conn))
			goto failed;
	}
failed:
	set_err(db, "", PQerrorMessage(db->conn));
	return -1;
}

/* The next result of what was sent (NULL: the end): 0, or -1 with the
 * error set when none came in time or the connection failed. */
static int next_result(struct db *db, PGresult **res_r)
{
	*res_r = NULL;
	if (await(db, now_ms() + ms_store_pg_timeout_ms, 0) < 0)
		return -1;
	*res_r = PQgetResult(db->conn);
	return 0;
}

/* The last result of what was sent (as PQexec gives it), or NULL with
 * the error set. */
static PGresult *result(struct db *db, int sent)
{
	int64_t end = now_ms() + ms_store_pg_timeout_ms;
	PGresult *last = NULL, *res;

	if (!sent) {
		set_err(db, "", PQerrorMessage(db->conn));
		return NULL;
	}
	for (;;) {
		if (await(db, end, 0) < 0) {
			PQclear(last);
			return NULL;
		}
		res = PQgetResult(db->conn);
		if (res == NULL) {
			if (last == NULL)
				set_err(db, "", PQerrorMessage(db->conn));
			return last;
		}
		PQclear(last);
		last = res;
	}
}

static const char *pg_errmsg(struct db *db)
{
	return db->error;
}

/* CREATE TABLE IF NOT EXISTS says NOTICE for each table it skips: libpq
 * would print that on stderr. */
static void quiet(void *arg, const char *message)
{
}

static void pg_close(struct db *db)
{
	if (db == NULL)
		return;
	/* the server rolls back what the session left open */
	PQfinish(db->conn);
	free(db);
}

/* Whether the URL's user part (before the host's '@') has a ":password",
 * or its query a password=: read before libpq's parser, whose errors may
 * quote what they could not read. */
static int url_has_password(const char *url)
{
	const char *auth = strstr(url, "://"), *end, *at, *q;

	if (auth == NULL)
		return 0;
	auth += 3;
	end = auth + strcspn(auth, "/?");
	at = memrchr(auth, '@', (size_t)(end - auth));
	if (at != NULL && memchr(auth, ':', (size_t)(at - auth)) != NULL)
		return 1;
	for (q = strchr(url, '?'); q != NULL; q = strchr(q + 1, '&'))
		if (!strncasecmp(q + 1, "password=", 9))
			return 1;
	return 0;
}

/* A password in the URL would sit in the config file and in argv. No
 * error repeats the URL. */
static int check_url(const char *url, char *err, size_t errsz)
{
	PQconninfoOption *opts, *o;
	char *perr = NULL;
	size_t n;
	int ret = 0;

	if (url_has_password(url))
		goto password;
	opts = PQconninfoParse(url, &perr);
	if (opts == NULL) {
		/* libpq quotes the part it could not read: left out */
		snprintf(err, errsz, "bad url: %s", perr ? perr : "?");
		n = strcspn(err, "\"\n");
		while (n > 0 && (err[n - 1] == ' ' || err[n - 1] == ':'))
			n--;
		err[n] = '\0';
		PQfreemem(perr);
		return -1;
	}
	for (o = opts; o->keyword != NULL; o++)
		if (!strcmp(o->keyword, "password") && o->val != NULL &&
		    o->val[0] != '\0')
			ret = -1;
	PQconninfoFree(opts);
	if (ret == 0)
		return 0;
password:
	snprintf(err, errsz, "the url holds a password: put it in a password "
		 "file (~/.pgpass or PGPASSFILE) instead");
	return -1;
}

static int pg_exec(struct db *db, const char *sql)
{
	PGresult *res = result(db, PQsendQuery(db->conn, sql));
	ExecStatusType rc = PQresultStatus(res);
	int ret = 0;

	/* a COMMIT here ends what a statement saw open (revive()) */
	if (PQstatus(db->conn) == CONNECTION_OK)
		db->txn_open = PQtransactionStatus(db->conn) != PQTRANS_IDLE;
	if (rc != PGRES_COMMAND_OK && rc != PGRES_TUPLES_OK) {
		res_err(db, res);
		ret = -1;
	}
	PQclear(res);
	return ret;
}

void ms_store_pg_params(const char *url, const char *app,
			const char *keys[MS_PG_PARAMS],
			const char *vals[MS_PG_PARAMS])
{
	/* Bounds on how long a dead server or network can hold a blocking
	 * call: 10 s to connect, 30 s for data not acknowledged, keepalives
	 * on an idle connection. The URL's own values come later and win. */
	static const char *const k[MS_PG_PARAMS] = {
		"connect_timeout", "tcp_user_timeout", "keepalives_idle",
		"keepalives_interval", "keepalives_count",
		"fallback_application_name", "dbname", NULL
	};
	static const char *const v[MS_PG_PARAMS - 3] = {
		"10", "30000", "10", "5", "3"
	};

	for (int i = 0; i < MS_PG_PARAMS; i++)
		keys[i] = k[i];
	for (int i = 0; i < MS_PG_PARAMS - 3; i++)
		vals[i] = v[i];
	vals[MS_PG_PARAMS - 3] = app;
	vals[MS_PG_PARAMS - 2] = url;
	vals[MS_PG_PARAMS - 1] = NULL;
}

static int pg_open(const char *url, const char *app, struct db **db_r,
		   char *err, size_t errsz)
{
	const char *keys[MS_PG_PARAMS], *vals[MS_PG_PARAMS];
	const char *enc;
	struct db *db;

	*db_r = NULL;
	if (check_url(url, err, errsz) < 0)
		return -1;
	db = calloc(1, sizeof(*db));
	if (db == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	db->d = &ms_db_pg;
	ms_store_pg_params(url, app, keys, vals);
	db->conn = PQconnectdbParams(keys, vals, 1);
	if (db->conn == NULL || PQstatus(db->conn) != CONNECTION_OK) {
		set_err(db, "cannot connect: ", db->conn ?
			PQerrorMessage(db->conn) : "out of memory");
		snprintf(err, errsz, "%s", db->error);
		pg_close(db);
		return -1;
	}
	PQsetNoticeProcessor(db->conn, quiet, NULL);
	/* The store keeps the servers' bytes as they came (a Message-ID in
	 * Latin-1, say), as the SQLite file does, and orders names by
	 * bytes: a UTF8 database would refuse the one and re-order the
	 * other. */
	enc = PQparameterStatus(db->conn, "server_encoding");
	if (enc == NULL || strcmp(enc, "SQL_ASCII") != 0) {
		snprintf(err, errsz, "the database's encoding is %s: the store "
			 "needs SQL_ASCII (CREATE DATABASE ... ENCODING "
			 "'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE "
			 "template0)", enc ? enc : "unknown");
		pg_close(db);
		return -1;
	}
	*db_r = db;
	return 0;
}

/* "?12" becomes "$12"; returns the highest parameter number, -1 when it
 * is above PG_MAX_PARAMS. No statement of the store has a '?' in a
 * literal. */
static int rewrite(const char *sql, char *out)
{
	int max = 0;

	for (; *sql != '\0'; sql++) {
		*out++ = *sql == '?' ? '$' : *sql;
		if (*sql == '?') {
			int n = atoi(sql + 1);

			if (n > max)
				max = n;
		}
	}
	*out = '\0';
	return max <= PG_MAX_PARAMS ? max : -1;
}

static int server_prepare(struct db_stmt *st)
{
	PGresult *res = result(st->db, PQsendPrepare(st->db->conn, st->name,
							 st->sql, 0, NULL));
	int ret = 0;

	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		res_err(st->db, res);
		ret = -1;
	}
	PQclear(res);
	st->session = st->db->session;
	return ret;
}

/* The connection made anew (one whose answer was not waited for, too),
 * waited for as long as an answer: 0, or -1 with the error set. */
static int reconnect(struct db *db)
{
	char why[sizeof(db->error)];

	db->broken = 0;
	if (!PQresetStart(db->conn))
		set_err(db, "", PQerrorMessage(db->conn));
	else if (await(db, now_ms() + ms_store_pg_timeout_ms, 1) == 0)
		return 0;
	db->broken = 1;
	snprintf(why, sizeof(why), "%s", db->error);
	set_err(db, "cannot connect again: ", why);
	return -1;
}

/* Whether the server sent something, or closed, while nothing was asked
 * outside a transaction: a server restarted since the last statement has
 * said goodbye (FATAL) and closed; this connection LISTENs to nothing.
 * Such a connection is made again before the statement rather than
 * failing it. */
static int spoke_unasked(struct db *db)
{
	struct pollfd p = { .fd = PQsocket(db->conn), .events = POLLIN };

	return p.fd >= 0 && poll(&p, 1, 0) > 0;
}

/* Before a statement: 0 go on, 1 done already (a ROLLBACK of what a lost
 * session held), -1 not now (error set). */
static int revive(struct db_stmt *st)
{
	struct db *db = st->db;
	int rollback = !strcmp(st->sql, "ROLLBACK"), spoke = 0;

	if (PQstatus(db->conn) == CONNECTION_OK && !db->broken &&
	    (db->txn_open || !(spoke = spoke_unasked(db))))
		goto prepared;
	if (db->txn_open && !rollback) {
		set_err(db, "", "the connection to the database was lost in a "
			"transaction: it must be rolled back");
		return -1;
	}
	/* one try per RETRY_SECONDS: while the server is away each call
	 * fails at once instead of waiting out a connect */
	if (!spoke && time(NULL) < db->retry_at) {
		set_err(db, "", "the connection to the database is lost");
		return -1;
	}
	if (reconnect(db) < 0) {
		db->retry_at = time(NULL) + RETRY_SECONDS;
		return -1;
	}
	db->session++;
	db->txn_open = 0;
	if (rollback)
		return 1;
prepared:
	if (st->name[0] != '\0' && st->session != db->session &&
	    server_prepare(st) < 0)
		return -1;
	return 0;
}

static int pg_prepare(struct db *db, const char *sql, int mode,
		      struct db_stmt **st_r)
{
	struct db_stmt *st = calloc(1, sizeof(*st));

	if (st == NULL || (st->sql = malloc(strlen(sql) + 1)) == NULL) {
		free(st);
		set_err(db, "", "out of memory");
		return -1;
	}
	st->d = &ms_db_pg;
	st->db = db;
	st->nparams = rewrite(sql, st->sql);
	if (st->nparams < 0) {
		set_err(db, "", "too many parameters");
		goto fail;
	}
	st->stream = mode == DB_STREAM;
	if (mode == DB_KEEP) {
		snprintf(st->name, sizeof(st->name), "ms%d", ++db->nstmts);
		if (server_prepare(st) < 0)
			goto fail;
	}
	*st_r = st;
	return 0;
fail:
	free(st->sql);
	free(st);
	return -1;
}

static void pg_reset(struct db_stmt *st)
{
	PGresult *res;

	PQclear(st->res);
	st->res = NULL;
	/* the stream's end, or a stream stopped early: what is left is
	 * read and dropped, or the connection could take no other
	 * statement (no cancel: one that came late would hit the next) */
	if (st->streaming) {
		while (next_result(st->db, &res) == 0 && res != NULL)
			PQclear(res);
		st->streaming = 0;
	}
	memset(st->values, 0, sizeof(st->values));
}

static void pg_finalize(struct db_stmt *st)
{
	if (st == NULL)
		return;
	/* a persistent statement lives on the server until the session
	 * ends, which is when this is called */
	pg_reset(st);
	free(st->sql);
	free(st);
}

static void pg_bind_int64(struct db_stmt *st, int idx, int64_t v)
{
	if (idx < 1 || idx > PG_MAX_PARAMS)
		return;
	snprintf(st->ints[idx - 1], sizeof(st->ints[0]), "%" PRId64, v);
	st->values[idx - 1] = st->ints[idx - 1];
}

static void pg_bind_text(struct db_stmt *st, int idx, const char *text)
{
	if (idx >= 1 && idx <= PG_MAX_PARAMS)
		st->values[idx - 1] = text;
}

static int run(struct db_stmt *st)
{
	struct db *db = st->db;
	ExecStatusType rc;
	int r = revive(st);

	if (r != 0) {
		st->res = NULL;
		st->row = st->nrows = 0;
		return r < 0 ? DB_ERROR : DB_DONE;
	}
	if (st->name[0] != '\0')
		st->res = result(db, PQsendQueryPrepared(db->conn, st->name,
				 st->nparams, st->values, NULL, NULL, 0));
	else
		st->res = result(db, PQsendQueryParams(db->conn, st->sql,
				 st->nparams, NULL, st->values, NULL, NULL, 0));
	if (st->res == NULL)
		return DB_ERROR;
	rc = PQresultStatus(st->res);
	if (PQstatus(db->conn) == CONNECTION_OK)
		db->txn_open = PQtransactionStatus(db->conn) != PQTRANS_IDLE;
	if (rc != PGRES_COMMAND_OK && rc != PGRES_TUPLES_OK) {
		res_err(db, st->res);
		return DB_ERROR;
	}
	/* COMMIT of a transaction a failed statement aborted answers
	 * ROLLBACK: that commit failed */
	if (!strcmp(st->sql, "COMMIT") &&
	    !strcmp(PQcmdStatus(st->res), "ROLLBACK")) {
		set_err(db, "", "the transaction was aborted and rolled back");
		return DB_ERROR;
	}
	db->changes = atoi(PQcmdTuples(st->res));
	st->row = -1;
	st->nrows = rc == PGRES_TUPLES_OK ? PQntuples(st->res) : 0;
	return DB_DONE;
}

/* The next row of a DB_STREAM query, sent as the first step. */
static int stream_step(struct db_stmt *st)
{
	struct db *db = st->db;
	ExecStatusType rc;

	if (!st->streaming) {
		if (revive(st) != 0)
			return DB_ERROR;
		if (!PQsendQueryParams(db->conn, st->sql, st->nparams, NULL,
				       st->values, NULL, NULL, 0) ||
		    !PQsetSingleRowMode(db->conn)) {
			set_err(db, "", PQerrorMessage(db->conn));
			return DB_ERROR;
		}
		st->streaming = 1;
	}
	PQclear(st->res);
	if (next_result(db, &st->res) < 0 || st->res == NULL) {
		if (st->res == NULL && !db->broken)
			set_err(db, "", "the query gave no result");
		pg_reset(st);
		return DB_ERROR;
	}
	rc = PQresultStatus(st->res);
	if (rc == PGRES_SINGLE_TUPLE) {
		st->row = 0;
		return DB_ROW;
	}
	/* the end (an empty PGRES_TUPLES_OK) or an error, then NULL */
	if (rc != PGRES_TUPLES_OK)
		res_err(db, st->res);
	pg_reset(st);
	return rc == PGRES_TUPLES_OK ? DB_DONE : DB_ERROR;
}

static int pg_step(struct db_stmt *st)
{
	if (st->stream)
		return stream_step(st);
	if (st->res == NULL && run(st) == DB_ERROR) {
		pg_reset(st);
		return DB_ERROR;
	}
	st->row++;
	return st->row < st->nrows ? DB_ROW : DB_DONE;
}

static int64_t pg_column_int64(struct db_stmt *st, int col)
{
	return strtoll(PQgetvalue(st->res, st->row, col), NULL, 10);
}

static const char *pg_column_text(struct db_stmt *st, int col, size_t *len_r)
{
	if (PQgetisnull(st->res, st->row, col)) {
		if (len_r != NULL)
			*len_r = 0;
		return NULL;
	}
	if (len_r != NULL)
		*len_r = (size_t)PQgetlength(st->res, st->row, col);
	return PQgetvalue(st->res, st->row, col);
}

static int pg_column_is_null(struct db_stmt *st, int col)
{
	return PQgetisnull(st->res, st->row, col);
}

static int pg_changes(struct db *db)
{
	return db->changes;
}

static int pg_in_transaction(struct db *db)
{
	if (PQstatus(db->conn) != CONNECTION_OK)
		return db->txn_open;
	return PQtransactionStatus(db->conn) != PQTRANS_IDLE;
}

/* One process at a time: two gateways starting on a new database must
 * not both create the tables. */
static int pg_begin_schema(struct db *db)
{
	if (pg_exec(db, "BEGIN") < 0)
		return -1;
	return pg_exec(db, "SELECT pg_advisory_xact_lock(" SCHEMA_LOCK ")");
}

/* One integer from a query, or def when it gives no row or NULL. */
static int query_int(struct db *db, const char *sql, int def, int *v_r)
{
	PGresult *res = result(db, PQsendQuery(db->conn, sql));

	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		res_err(db, res);
		PQclear(res);
		return -1;
	}
	*v_r = PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ?
	       atoi(PQgetvalue(res, 0, 0)) : def;
	PQclear(res);
	return 0;
}

/* The version is a row of its own table: PostgreSQL has no user_version,
 * and the store's meta table is copied between engines, the version not. */
static int pg_get_version(struct db *db, int *version_r)
{
	int exists;

	if (query_int(db, "SELECT 1 WHERE to_regclass('mailshift_schema') "
		      "IS NOT NULL", 0, &exists) < 0)
		return -1;
	if (!exists) {
		*version_r = 0;
		return 0;
	}
	return query_int(db, "SELECT max(version) FROM mailshift_schema", 0,
			 version_r);
}

static int pg_set_version(struct db *db, int version)
{
	char sql[200];

	snprintf(sql, sizeof(sql), "CREATE TABLE IF NOT EXISTS "
		 "mailshift_schema (version INTEGER NOT NULL);"
		 "DELETE FROM mailshift_schema;"
		 "INSERT INTO mailshift_schema VALUES (%d)", version);
	return pg_exec(db, sql);
}

static int pg_sync_ids(struct db *db, const char *table)
{
	char sql[256];

	snprintf(sql, sizeof(sql), "SELECT setval(pg_get_serial_sequence("
		 "'%s', 'id'), coalesce(max(id), 0) + 1, false) FROM %s",
		 table, table);
	return pg_exec(db, sql);
}

const struct db_driver ms_db_pg = {
	.name = "postgresql",
	.sqlite_dialect = 0,
	.begin_snapshot = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
	.open = pg_open,
	.close = pg_close,
	.errmsg = pg_errmsg,
	.prepare = pg_prepare,
	.finalize = pg_finalize,
	.bind_int64 = pg_bind_int64,
	.bind_text = pg_bind_text,
	.step = pg_step,
	.reset = pg_reset,
	.column_int64 = pg_column_int64,
	.column_text = pg_column_text,
	.column_is_null = pg_column_is_null,
	.changes = pg_changes,
	.exec = pg_exec,
	.in_transaction = pg_in_transaction,
	.begin_schema = pg_begin_schema,
	.get_version = pg_get_version,
	.set_version = pg_set_version,
	.sync_ids = pg_sync_ids,
};

int ms_store_url_check(const char *url, char *err, size_t errsz)
{
	if (!ms_store_is_url(url)) {
		snprintf(err, errsz, "not a postgresql:// URL");
		return -1;
	}
	return check_url(url, err, errsz);
}

const struct db_driver *ms_db_driver_for(const char *target)
{
	if (!strncmp(target, "postgresql://", 13) ||
	    !strncmp(target, "postgres://", 11))
		return &ms_db_pg;
	return &ms_db_sqlite;
}
