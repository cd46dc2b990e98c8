/* The map and jobs store, written once over the drivers of store_db.h
 * (an embedded SQLite file, or a PostgreSQL server). See store.h for the
 * contracts.
 *
 * Every statement is prepared once in ms_store_open() and reused: the mover
 * writes intents and completions at thousands per second inside batch
 * transactions, and preparing is far more expensive than stepping.
 */
#include "store.h"
#include "store_db.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* 1: users, folders, messages, policies; 2: + rintents (rollback intents);
 * 3: + messages_dst (done records by destination UID, for the gateway's
 * POP3 UIDLs); 4: + source_use, user_moves, retirements (mailshiftctl
 * retire); 5: + folder_identity (whether a destination folder kept the
 * source's UIDVALIDITY and UIDs); 6: + user_sizes (the survey of the
 * source's mailbox sizes, for the site's ETA); 7: + folder_src_next (the
 * source's UIDNEXT at a folder's last copy, for the gateway's IMAP view);
 * 8: + jobs (a user's copy as shared work: owner gateway, lease);
 * 9: + folder_renames (a folder's old name, for the gateway's IMAP view);
 * 10: + gateways, cutover_requests, cutover_acks (several gateways on one
 * store: heartbeats, a cutover every live gateway acknowledged), and on
 * PostgreSQL the change counter (sequence changes, user_changes) and the
 * triggers that NOTIFY the gateways; 11: + user_namespaces (both sides'
 * personal namespace prefix and separator, for the gateway's IMAP view of
 * a source with a prefix).
 * Every CREATE is IF NOT EXISTS, so the schema text upgrades an older
 * store. The meta table
 * (which migration the store belongs to) is made when first needed, see
 * claim(). */
#define SCHEMA_VERSION MS_STORE_SCHEMA_VERSION
/* ms_store_msg_foreach reads this many records at a time (see there) */
#define FOREACH_PAGE 128
#define FLAGS_SIZE sizeof(((struct ms_msg_rec *)0)->flags)

/* The schema once, for both engines: ID is a generated key, INT a 64-bit
 * integer, TEXT text ordered by bytes, NOROWID SQLite's clustered table. */
#define SCHEMA(ID, INT, TEXT, NOROWID) \
	"CREATE TABLE IF NOT EXISTS users (" \
	" id " ID "," \
	" name " TEXT " UNIQUE NOT NULL," \
	" state " TEXT " NOT NULL DEFAULT 'source'," \
	" policy " TEXT "," \
	" last_error " TEXT "," \
	" msgs_copied " INT " DEFAULT 0," \
	" bytes_copied " INT " DEFAULT 0," \
	" updated_at " INT ");" \
	"CREATE TABLE IF NOT EXISTS folders (" \
	" id " ID "," \
	" user_id " INT " REFERENCES users(id) ON DELETE CASCADE," \
	" src_name " TEXT " NOT NULL," \
	" dst_name " TEXT " NOT NULL DEFAULT ''," \
	" src_uidvalidity " INT "," \
	" dst_uidvalidity " INT "," \
	" hwm " INT "," \
	" modseq " INT "," \
	" msgs " INT "," \
	" bytes " INT "," \
	" UNIQUE(user_id, src_name));" \
	"CREATE TABLE IF NOT EXISTS messages (" \
	" folder_id " INT " REFERENCES folders(id) ON DELETE CASCADE," \
	" src_uid " INT " NOT NULL," \
	" uidl " TEXT " NOT NULL DEFAULT ''," \
	" state " INT "," \
	" size " INT "," \
	" date " INT "," \
	" msgid " TEXT "," \
	" flags " TEXT "," \
	" dst_uid " INT "," \
	" dst_floor " INT "," \
	" PRIMARY KEY(folder_id, src_uid, uidl))" NOROWID ";" \
	/* Done records by destination UID (ST_MSG_GET_DST): partial, so an \
	 * intent costs the mover no index write until it is done. */ \
	"CREATE INDEX IF NOT EXISTS messages_dst ON messages" \
	" (folder_id, dst_uid) WHERE state = 1;" \
	/* Policies set at run time (mailshiftctl policy --default/--domain); \
	 * they override the config file's. scope "" = the default, else a \
	 * domain. */ \
	"CREATE TABLE IF NOT EXISTS policies (" \
	" scope " TEXT " PRIMARY KEY," \
	" policy " TEXT " NOT NULL);" \
	/* Rollback intents (store.h): keyed by the destination UID, since \
	 * the source UID is only known once the source has the message. */ \
	"CREATE TABLE IF NOT EXISTS rintents (" \
	" folder_id " INT " REFERENCES folders(id) ON DELETE CASCADE," \
	" dst_uid " INT " NOT NULL," \
	" size " INT "," \
	" date " INT "," \
	" msgid " TEXT "," \
	" flags " TEXT "," \
	" src_floor " INT "," \
	" PRIMARY KEY(folder_id, dst_uid))" NOROWID ";" \
	/* When the gateway last sent a session or a message to the source, \
	 * per user (key "*": a name the map does not know) and kind; uses \
	 * up to `slack` seconds after `at` may not have been written. */ \
	"CREATE TABLE IF NOT EXISTS source_use (" \
	" key " TEXT " NOT NULL," \
	" kind " TEXT " NOT NULL," \
	" name " TEXT " NOT NULL," \
	" at " INT " NOT NULL," \
	" slack " INT " NOT NULL," \
	" PRIMARY KEY(key, kind))" NOROWID ";" \
	/* When a user's first copy began and when the user last went to \
	 * the destination (for retire --report). */ \
	"CREATE TABLE IF NOT EXISTS user_moves (" \
	" user_id " INT " PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE," \
	" first_copy " INT "," \
	" moved " INT ");" \
	/* retire --apply: when, by whom, and the check it rested on. */ \
	"CREATE TABLE IF NOT EXISTS retirements (" \
	" id " ID "," \
	" at " INT " NOT NULL," \
	" uid " INT " NOT NULL," \
	" forced " INT " NOT NULL," \
	" record " TEXT " NOT NULL);" \
	/* Whether the destination folder has the source's UIDVALIDITY and \
	 * UIDs (state 1) or not (2, with the reason): a folder without a row \
	 * was copied without trying. */ \
	"CREATE TABLE IF NOT EXISTS folder_identity (" \
	" folder_id " INT " PRIMARY KEY REFERENCES folders(id)" \
	" ON DELETE CASCADE," \
	" state " INT " NOT NULL," \
	" reason " TEXT " NOT NULL DEFAULT '');" \
	/* What the survey learnt of a user's mailbox on the source: \
	 * messages and bytes (-1: not known), how (store.h), when. */ \
	"CREATE TABLE IF NOT EXISTS user_sizes (" \
	" user_id " INT " PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE," \
	" messages " INT " NOT NULL," \
	" bytes " INT " NOT NULL," \
	" how " TEXT " NOT NULL," \
	" at " INT " NOT NULL);" \
	/* The source's UIDNEXT at the folder's last copy pass: the gateway's \
	 * IMAP view numbers new mail above it. */ \
	"CREATE TABLE IF NOT EXISTS folder_src_next (" \
	" folder_id " INT " PRIMARY KEY REFERENCES folders(id)" \
	" ON DELETE CASCADE," \
	" uidnext " INT " NOT NULL);" \
	/* A user's copy as a job any gateway may take (docs/design.md, \
	 * "Jobs and leases"): state queued, running (owner's until \
	 * lease_until, ms on the database's clock), done or failed. */ \
	"CREATE TABLE IF NOT EXISTS jobs (" \
	" user_id " INT " PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE," \
	" kind " TEXT " NOT NULL," \
	" state " TEXT " NOT NULL," \
	" owner " TEXT " NOT NULL DEFAULT ''," \
	" lease_until " INT " NOT NULL DEFAULT 0," \
	" attempts " INT " NOT NULL DEFAULT 0," \
	" last_error " TEXT " NOT NULL DEFAULT ''," \
	" updated_at " INT ");" \
	/* A folder the move renamed (names = destination): the name the \
	 * user's clients knew, as the destination has it when names are \
	 * kept (no source prefix, the destination's separator), and that \
	 * separator. The gateway's IMAP view answers the old name. */ \
	"CREATE TABLE IF NOT EXISTS folder_renames (" \
	" folder_id " INT " PRIMARY KEY REFERENCES folders(id)" \
	" ON DELETE CASCADE," \
	" old_name " TEXT " NOT NULL," \
	" sep " TEXT " NOT NULL);" \
	/* Both sides' personal namespace as the mover found them (NAMESPACE, \
	 * else LIST's separator): the gateway's IMAP view shows a source's \
	 * prefix ("INBOX.") and separator to the moved user's clients. */ \
	"CREATE TABLE IF NOT EXISTS user_namespaces (" \
	" user_id " INT " PRIMARY KEY REFERENCES users(id)" \
	" ON DELETE CASCADE," \
	" src_prefix " TEXT " NOT NULL," \
	" src_sep " TEXT " NOT NULL," \
	" dst_prefix " TEXT " NOT NULL," \
	" dst_sep " TEXT " NOT NULL);" \
	/* Gateways sharing the store (docs/design.md, "Several gateways"): \
	 * heartbeat in ms on the database's clock. */ \
	"CREATE TABLE IF NOT EXISTS gateways (" \
	" name " TEXT " PRIMARY KEY," \
	" started " INT " NOT NULL," \
	" heartbeat " INT " NOT NULL," \
	" sessions " INT " NOT NULL DEFAULT 0," \
	" copies " INT " NOT NULL DEFAULT 0)" NOROWID ";" \
	/* A cutover (or rollback) under way: every live gateway holds the \
	 * user's logins, ends its sessions and acknowledges before the \
	 * delta; gone with the user's final state. seq tells one request \
	 * of a user from the next. */ \
	"CREATE TABLE IF NOT EXISTS cutover_requests (" \
	" user_id " INT " PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE," \
	" seq " INT " NOT NULL," \
	" gateway " TEXT " NOT NULL," \
	" kind " TEXT " NOT NULL," \
	" at " INT " NOT NULL);" \
	"CREATE TABLE IF NOT EXISTS cutover_acks (" \
	" user_id " INT " NOT NULL REFERENCES cutover_requests(user_id)" \
	" ON DELETE CASCADE," \
	" seq " INT " NOT NULL," \
	" gateway " TEXT " NOT NULL," \
	" at " INT " NOT NULL," \
	" PRIMARY KEY(user_id, gateway))" NOROWID ";"

/* PostgreSQL only: what tells the gateways that share the store of a
 * change (docs/design.md, "Several gateways"). Every change of a user's
 * state or policy, of a cutover request and of the run-time policies
 * takes a number from the sequence `changes` (a user's last one in
 * user_changes) and NOTIFYs channel mailshift: "u" a user or a request,
 * "p" the policies, "a" an acknowledgement. The counter lets a gateway
 * that missed notifications find what changed since. */
static const char schema_pg_notify[] =
	"CREATE SEQUENCE IF NOT EXISTS changes;"
	"CREATE TABLE IF NOT EXISTS user_changes ("
	" user_id BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,"
	" version BIGINT NOT NULL);"
	"CREATE INDEX IF NOT EXISTS user_changes_version ON user_changes"
	" (version);"
	"CREATE OR REPLACE FUNCTION mailshift_user_changed() RETURNS trigger"
	" LANGUAGE plpgsql AS $$ BEGIN"
	" IF TG_OP = 'UPDATE' AND NEW.state IS NOT DISTINCT FROM OLD.state"
	" AND NEW.policy IS NOT DISTINCT FROM OLD.policy THEN RETURN NULL;"
	" END IF;"
	" INSERT INTO user_changes (user_id, version) VALUES (NEW.id,"
	" nextval('changes')) ON CONFLICT (user_id) DO UPDATE SET"
	" version = excluded.version;"
	" PERFORM pg_notify('mailshift', 'u'); RETURN NULL; END $$;"
	"CREATE OR REPLACE FUNCTION mailshift_changed() RETURNS trigger"
	" LANGUAGE plpgsql AS $$ BEGIN"
	" IF TG_ARGV[0] != 'a' THEN PERFORM nextval('changes'); END IF;"
	" PERFORM pg_notify('mailshift', TG_ARGV[0]); RETURN NULL; END $$;"
	"DROP TRIGGER IF EXISTS mailshift_users ON users;"
	"CREATE TRIGGER mailshift_users AFTER INSERT OR UPDATE ON users"
	" FOR EACH ROW EXECUTE FUNCTION mailshift_user_changed();"
	"DROP TRIGGER IF EXISTS mailshift_requests ON cutover_requests;"
	"CREATE TRIGGER mailshift_requests AFTER INSERT OR UPDATE OR DELETE"
	" ON cutover_requests FOR EACH STATEMENT"
	" EXECUTE FUNCTION mailshift_changed('u');"
	"DROP TRIGGER IF EXISTS mailshift_acks ON cutover_acks;"
	"CREATE TRIGGER mailshift_acks AFTER INSERT ON cutover_acks"
	" FOR EACH STATEMENT EXECUTE FUNCTION mailshift_changed('a');"
	/* gateway_joins counts the gateways' rows ever inserted (a first
	 * start, or one after a clean stop): a flip without a cutover
	 * (ms_store_gateway_alone) sees that none came, nor came and went,
	 * since the copy began. One row; like user_changes, not copied. */
	"CREATE TABLE IF NOT EXISTS gateway_joins (one BOOLEAN PRIMARY KEY"
	" DEFAULT TRUE CHECK (one), n BIGINT NOT NULL);"
	"INSERT INTO gateway_joins (n) VALUES (0) ON CONFLICT DO NOTHING;"
	"CREATE OR REPLACE FUNCTION mailshift_gateway_joined() RETURNS"
	" trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE gateway_joins SET"
	" n = n + 1; RETURN NULL; END $$;"
	"DROP TRIGGER IF EXISTS mailshift_gateways ON gateways;"
	"CREATE TRIGGER mailshift_gateways AFTER INSERT ON gateways"
	" FOR EACH ROW EXECUTE FUNCTION mailshift_gateway_joined();"
	"DROP TRIGGER IF EXISTS mailshift_policies ON policies;"
	"CREATE TRIGGER mailshift_policies AFTER INSERT OR UPDATE OR DELETE"
	" ON policies FOR EACH STATEMENT"
	" EXECUTE FUNCTION mailshift_changed('p');";

static const char schema_sqlite[] =
	SCHEMA("INTEGER PRIMARY KEY", "INTEGER", "TEXT", " WITHOUT ROWID");
/* COLLATE "C": names in byte order, as SQLite has them */
static const char schema_pg[] =
	SCHEMA("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "BIGINT",
	       "TEXT COLLATE \"C\"", "");

/* Which migration the store holds (key "migration"): a database shared by
 * mistake with another source/destination pair is refused at start. */
static const char meta_sql[] =
	"CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY,"
	" value TEXT NOT NULL)";


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
	[ST_BEGIN] = "BEGIN IMMEDIATE",	/* "BEGIN" on PostgreSQL */
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_USER_GET] = "SELECT id FROM users WHERE name = ?1",
	[ST_USER_ADD] =
		"INSERT INTO users (name, updated_at) VALUES (?1, ?2)"
		" ON CONFLICT DO NOTHING",
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
		"INSERT INTO folders (user_id, src_name, dst_name,"
		" src_uidvalidity, dst_uidvalidity, hwm, modseq, msgs, bytes)"
		" VALUES (?1, ?2, '', 0, 0, 0, 0, 0, 0) ON CONFLICT DO NOTHING",
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
		" WHERE user_id = ?1 AND lower(dst_name) = lower(?2)"
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
		"SELECT " MSG_COLS " FROM messages"
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
		"INSERT INTO rintents (folder_id, dst_uid, size,"
		" date, msgid, flags, src_floor)"
		" VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
		" ON CONFLICT (folder_id, dst_uid) DO UPDATE SET"
		" size = excluded.size, date = excluded.date,"
		" msgid = excluded.msgid, flags = excluded.flags,"
		" src_floor = excluded.src_floor",
	[ST_RINTENT_DELETE] =
		"DELETE FROM rintents WHERE folder_id = ?1 AND dst_uid = ?2",
	[ST_RINTENT_PAGE] =
		"SELECT " RINTENT_COLS " FROM rintents"
		" WHERE folder_id = ?1 AND dst_uid > ?2"
		" ORDER BY dst_uid LIMIT ?3",
	[ST_RINTENT_COUNT] =
		"SELECT count(*) FROM rintents WHERE folder_id = ?1",
};

/* SQLite, without statistics, would rather walk the primary key's
 * folder_id prefix than this index: name it there. */
static const char msg_get_dst_sqlite[] =
	"SELECT " MSG_COLS " FROM messages INDEXED BY messages_dst"
	" WHERE folder_id = ?1 AND dst_uid = ?2 AND state = 1 LIMIT 1";

struct ms_store {
	const struct db_driver *drv;
	struct db *db;
	struct db_stmt *st[ST_COUNT];
	struct db_stmt *user_info;	/* prepared at first use: every
					   gateway login looks a user up */
	int depth;			/* ms_store_begin nesting */
	char error[512];
	ms_store_user_write_cb *on_user_write;	/* ms_store_on_user_write */
	void *on_user_write_ctx;
};

int ms_store_in_transaction(const struct ms_store *s)
{
	return s->depth > 0;
}

void ms_store_on_user_write(struct ms_store *s, ms_store_user_write_cb *cb,
			    void *ctx)
{
	s->on_user_write = cb;
	s->on_user_write_ctx = ctx;
}

/* Told before the write: whoever reads a copy of the row asks the store
 * from now on, also when the write fails or is rolled back. */
static void user_write(struct ms_store *s, int64_t user_id)
{
	if (s->on_user_write != NULL)
		s->on_user_write(s->on_user_write_ctx, user_id);
}

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
	return set_error(s, "%s: %s", what, db_errmsg(s->db));
}

/* Returns a prepared statement to its pristine state. Bindings are cleared
 * too: text is bound without a copy, and must not outlive the caller's
 * buffer. */
static void release(struct db_stmt *st)
{
	db_reset(st);
}

/* Runs a statement that returns no rows. */
static int run(struct ms_store *s, struct db_stmt *st, const char *what)
{
	int rc = db_step(st);

	if (rc != DB_DONE) {
		db_error(s, what);
		release(st);
		return -1;
	}
	release(st);
	return 0;
}

/* run() for a statement that must change a row: when it changed none, an
 * error that says so (none: printf format, "no such user (id %lld)"). */
static int run_row(struct ms_store *s, struct db_stmt *st, const char *what,
		   const char *none, ...) __attribute__((format(printf, 4, 5)));

static int run_row(struct ms_store *s, struct db_stmt *st, const char *what,
		   const char *none, ...)
{
	va_list ap;

	if (run(s, st, what) < 0)
		return -1;
	if (db_changes(s->db) > 0)
		return 0;
	va_start(ap, none);
	vsnprintf(s->error, sizeof(s->error), none, ap);
	va_end(ap);
	return -1;
}

/* run() and finalize, for a statement prepared for one call. */
static int run_once(struct ms_store *s, struct db_stmt *st, const char *what)
{
	int ret = run(s, st, what);

	db_finalize(st);
	return ret;
}

/* Steps a query: 1 = a row is there (the caller releases), 0 = no row
 * (released), -1 = error (released). */
static int step_row(struct ms_store *s, struct db_stmt *st, const char *what)
{
	int rc = db_step(st);

	if (rc == DB_ROW)
		return 1;
	if (rc != DB_DONE)
		db_error(s, what);
	release(st);
	return rc == DB_DONE ? 0 : -1;
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

static int copy_text(struct ms_store *s, struct db_stmt *st, int col,
		     char *dst, size_t size, const char *what)
{
	size_t len;
	const char *text = db_column_text(st, col, &len);

	if (text == NULL) {
		if (!db_column_is_null(st, col))
			return set_error(s, "%s: out of memory", what);
		dst[0] = '\0';
		return 0;
	}
	/* Only a foreign write can make this happen; truncating a
	 * Message-ID or a name silently would break matching later. */
	if (len >= size)
		return set_error(s, "stored %s too long (%zu bytes)", what,
				 len);
	memcpy(dst, text, len);
	dst[len] = '\0';
	return 0;
}

static void store_free(struct ms_store *s)
{
	int i;

	for (i = 0; i < ST_COUNT; i++)
		db_finalize(s->st[i]);
	db_finalize(s->user_info);
	/* an open transaction is rolled back by the close */
	db_close(s->db);
	free(s);
}

static int exec(struct ms_store *s, const char *sql, const char *what)
{
	if (db_exec(s->db, sql) < 0)
		return db_error(s, what);
	return 0;
}

int ms_store_lock_wait(struct ms_store *s, unsigned int ms)
{
	char sql[64];

	if (s->drv->sqlite_dialect)
		return 0;
	if (s->depth == 0)
		return set_error(s, "lock_wait: no transaction");
	snprintf(sql, sizeof(sql), "SET LOCAL lock_timeout = %u", ms ? ms : 1);
	return exec(s, sql, "lock_wait");
}

/* A lock waited for in vain (ms_store_lock_wait()). */
static int busy(const struct ms_store *s)
{
	return strstr(s->error, "lock timeout") != NULL;
}

void ms_store_refusal(const struct ms_store *s, char *buf, size_t n)
{
	if (busy(s))
		snprintf(buf, n, "store busy: a table the change needs is "
			 "locked by another connection; nothing changed, try "
			 "again");
	else
		snprintf(buf, n, "store: %s", s->error);
}

/* A statement for a call or two (DB_ONCE), or -1 with the error. */
static int prepare(struct ms_store *s, const char *sql, struct db_stmt **st,
		   const char *what)
{
	if (db_prepare(s->db, sql, DB_ONCE, st) < 0)
		return db_error(s, what);
	return 0;
}

static int get_version(struct ms_store *s, int *version_r)
{
	if (s->drv->get_version(s->db, version_r) < 0)
		return db_error(s, "schema version");
	return 0;
}

/* The store belongs to the migration named by pair (the source and the
 * destination): recorded at first, compared after. Inside the schema's
 * transaction, so a refusal leaves the database as it was. */
static int claim(struct ms_store *s, const char *pair)
{
	struct db_stmt *st;
	char have[512];
	int ret;

	if (exec(s, meta_sql, "meta") < 0)
		return -1;
	if (prepare(s, "SELECT value FROM meta WHERE key = 'migration'", &st,
		    "meta") < 0)
		return -1;
	ret = step_row(s, st, "meta");
	if (ret == 1) {
		ret = copy_text(s, st, 0, have, sizeof(have), "migration");
		release(st);
		if (ret == 0 && strcmp(have, pair) != 0)
			ret = set_error(s, "the store holds another migration "
					"(%s), not this one (%s)", have, pair);
	} else if (ret == 0) {
		db_finalize(st);
		if (prepare(s, "INSERT INTO meta (key, value) VALUES "
			    "('migration', ?1)", &st, "meta") < 0)
			return -1;
		db_bind_text(st, 1, pair);
		ret = run(s, st, "meta");
	}
	db_finalize(st);
	return ret;
}

static int create_schema(struct ms_store *s, const char *pair)
{
	int version;

	if (get_version(s, &version) < 0)
		return -1;
	if (version > SCHEMA_VERSION)
		return set_error(s, "store schema version %d is newer than "
				 "this program's (%d)", version,
				 SCHEMA_VERSION);
	if (version == SCHEMA_VERSION && pair == NULL)
		return 0;

	/* One process at a time, and the version read again inside: two
	 * processes opening a new store at once must not both create it. */
	if (s->drv->begin_schema(s->db) < 0)
		return db_error(s, "create schema");
	if (get_version(s, &version) < 0)
		goto fail;
	if (version > SCHEMA_VERSION) {
		set_error(s, "store schema version %d is newer than this "
			  "program's (%d)", version, SCHEMA_VERSION);
		goto fail;
	}
	if (version < SCHEMA_VERSION) {
		/* A new store, or an older one: the tables it lacks are
		 * created, those it has are left as they are. */
		if (exec(s, s->drv->sqlite_dialect ? schema_sqlite : schema_pg,
			 "create schema") < 0)
			goto fail;
		if (!s->drv->sqlite_dialect &&
		    exec(s, schema_pg_notify, "create schema") < 0)
			goto fail;
		if (s->drv->set_version(s->db, SCHEMA_VERSION) < 0) {
			db_error(s, "create schema");
			goto fail;
		}
	}
	if (pair != NULL && claim(s, pair) < 0)
		goto fail;
	if (exec(s, "COMMIT", "create schema") < 0)
		goto fail;
	return 0;
fail:
	db_exec(s->db, "ROLLBACK");
	return -1;
}

static int prepare_all(struct ms_store *s)
{
	const char *sql;
	int i;

	for (i = 0; i < ST_COUNT; i++) {
		sql = stmt_sql[i];
		if (i == ST_BEGIN && !s->drv->sqlite_dialect)
			sql = "BEGIN";	/* a write takes its row locks */
		if (i == ST_MSG_GET_DST && s->drv->sqlite_dialect)
			sql = msg_get_dst_sqlite;
		if (db_prepare(s->db, sql, DB_KEEP, &s->st[i]) < 0)
			return db_error(s, "prepare");
	}
	return 0;
}

int ms_store_open_migration(const char *target, const char *pair,
			    struct ms_store **store_r, char **error_r)
{
	return ms_store_open_as(target, pair, "mailshift", store_r, error_r);
}

int ms_store_open_as(const char *target, const char *pair, const char *app,
		     struct ms_store **store_r, char **error_r)
{
	struct ms_store *s;

	*store_r = NULL;
	if (error_r)
		*error_r = NULL;

	s = calloc(1, sizeof(*s));
	if (s == NULL) {
		if (error_r)
			*error_r = strdup("out of memory");
		return -1;
	}
	s->drv = ms_db_driver_for(target);
	if (s->drv->open(target, app, &s->db, s->error, sizeof(s->error)) < 0)
		goto fail;
	if (create_schema(s, pair) < 0 || prepare_all(s) < 0)
		goto fail;

	*store_r = s;
	return 0;

fail:
	if (error_r)
		*error_r = strdup(s->error);
	store_free(s);
	return -1;
}

int ms_store_open(const char *path, struct ms_store **store_r, char **error_r)
{
	return ms_store_open_migration(path, NULL, store_r, error_r);
}

int ms_store_is_url(const char *target)
{
	return ms_db_driver_for(target) != &ms_db_sqlite;
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
		 * roll back. If the engine already rolled it back, say so by
		 * leaving no depth behind. */
		if (!db_in_transaction(store->db))
			store->depth = 0;
		return -1;
	}
	store->depth = 0;
	return 0;
}

void ms_store_settle(struct ms_store *store)
{
	if (store->depth == 0 && db_in_transaction(store->db))
		run(store, store->st[ST_ROLLBACK], "rollback");
}

int ms_store_rollback(struct ms_store *store)
{
	/* Nothing open: a failed begin, or a commit the engine rolled
	 * back. The error that said so stays the one to report. */
	if (store->depth == 0)
		return 0;
	store->depth = 0;
	/* Some errors (SQLITE_FULL, SQLITE_IOERR, ...) roll back on their
	 * own; a second ROLLBACK would only fail. */
	if (!db_in_transaction(store->db))
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
	struct db_stmt *st = s->st[ST_USER_GET];
	int ret;

	db_bind_text(st, 1, name);
	ret = step_row(s, st, "user_get");
	if (ret == 1) {
		*id_r = db_column_int64(st, 0);
		release(st);
	}
	return ret;
}

int ms_store_user_get(struct ms_store *store, const char *name,
		      int64_t *user_id_r)
{
	struct db_stmt *st = store->st[ST_USER_ADD];
	int ret;

	ret = user_lookup(store, name, user_id_r);
	if (ret != 0)
		return ret < 0 ? -1 : 0;

	/* Insert under the write lock and look again: another process may
	 * have created the user since our read. */
	user_write(store, 0);
	if (ms_store_begin(store) < 0)
		return -1;
	db_bind_text(st, 1, name);
	db_bind_int64(st, 2, time(NULL));
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
	struct db_stmt *st;
	int ret;

	if (prepare(s, sql, &st, what) < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	db_bind_int64(st, 2, time(NULL));
	ret = run(s, st, what);
	db_finalize(st);
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
				 "coalesce(user_moves.first_copy, ?2)",
				 user_id,
				 "user_moves");
	if (!strcmp(state, "destination") &&
	    exec_user(s, "INSERT INTO user_moves (user_id, moved) "
		      "VALUES (?1, ?2) ON CONFLICT (user_id) DO "
		      "UPDATE SET moved = ?2", user_id, "user_moves") < 0)
		return -1;
	/* A final state ends the user's cutover request, in the flip's
	 * transaction: the gateways holding its logins let them go. */
	if (!strcmp(state, "destination") || !strcmp(state, "source") ||
	    !strcmp(state, "failed"))
		return ms_store_cutover_clear(s, user_id);
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
	struct db_stmt *st = store->st[ST_USER_SET_STATE];

	if (state == NULL || ms_user_state_parse(state) < 0)
		return set_error(store, "invalid user state \"%s\"",
				 state ? state : "(null)");

	user_write(store, user_id);
	db_bind_int64(st, 1, user_id);
	db_bind_text(st, 2, state);
	if (last_error)
		db_bind_text(st, 3, last_error);
	db_bind_int64(st, 4, time(NULL));
	if (run_row(store, st, "user_set_state", "no such user (id %lld)",
		    (long long)user_id) < 0)
		return -1;
	return moves_note(store, user_id, state);
}

int ms_store_user_add_progress(struct ms_store *store, int64_t user_id,
			       uint64_t msgs, uint64_t bytes)
{
	struct db_stmt *st = store->st[ST_USER_PROGRESS];

	db_bind_int64(st, 1, user_id);
	db_bind_int64(st, 2, (int64_t)msgs);
	db_bind_int64(st, 3, (int64_t)bytes);
	db_bind_int64(st, 4, time(NULL));
	return run_row(store, st, "user_add_progress",
		       "no such user (id %lld)", (long long)user_id);
}

/* Columns as in FOLDER_COLS. */
static int read_folder(struct ms_store *s, struct db_stmt *st,
		       struct ms_folder_state *st_r)
{
	memset(st_r, 0, sizeof(*st_r));
	st_r->id = db_column_int64(st, 0);
	st_r->user_id = db_column_int64(st, 1);
	if (copy_text(s, st, 2, st_r->src_name, sizeof(st_r->src_name),
		      "folder src_name") < 0 ||
	    copy_text(s, st, 3, st_r->dst_name, sizeof(st_r->dst_name),
		      "folder dst_name") < 0)
		return -1;
	/* NULL (a row written by hand) reads as 0 = never seen */
	st_r->src_uidvalidity = (uint32_t)db_column_int64(st, 4);
	st_r->dst_uidvalidity = (uint32_t)db_column_int64(st, 5);
	st_r->hwm = (uint32_t)db_column_int64(st, 6);
	st_r->modseq = (uint64_t)db_column_int64(st, 7);
	st_r->msgs = (uint64_t)db_column_int64(st, 8);
	st_r->bytes = (uint64_t)db_column_int64(st, 9);
	return 0;
}

/* The row a folder statement taking (user_id, name) finds: 1, 0 for none,
 * -1 on error. */
static int folder_row(struct ms_store *s, struct db_stmt *st, int64_t user_id,
		      const char *name, const char *what,
		      struct ms_folder_state *st_r)
{
	int ret;

	db_bind_int64(st, 1, user_id);
	db_bind_text(st, 2, name);
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
	struct db_stmt *st = store->st[ST_FOLDER_ADD];
	int ret;

	if (check_len(store, src_name, sizeof(st_r->src_name),
		      "folder name") < 0)
		return -1;
	ret = folder_lookup(store, user_id, src_name, st_r);
	if (ret != 0)
		return ret < 0 ? -1 : 0;

	if (ms_store_begin(store) < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	db_bind_text(st, 2, src_name);
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
	struct db_stmt *st = store->st[ST_FOLDER_UPDATE];

	if (check_len(store, fs->dst_name, sizeof(fs->dst_name),
		      "destination folder name") < 0)
		return -1;
	db_bind_int64(st, 1, fs->id);
	db_bind_text(st, 2, fs->dst_name);
	db_bind_int64(st, 3, fs->src_uidvalidity);
	db_bind_int64(st, 4, fs->dst_uidvalidity);
	db_bind_int64(st, 5, fs->hwm);
	db_bind_int64(st, 6, (int64_t)fs->modseq);
	db_bind_int64(st, 7, (int64_t)fs->msgs);
	db_bind_int64(st, 8, (int64_t)fs->bytes);
	return run_row(store, st, "folder_update", "no such folder (id %lld)",
		       (long long)fs->id);
}

int ms_store_folder_reset(struct ms_store *store, int64_t folder_id)
{
	struct db_stmt *st;
	int ret;

	/* one transaction: a crash must not leave the old UIDVALIDITY next
	 * to a half-emptied map */
	if (ms_store_begin(store) < 0)
		return -1;
	st = store->st[ST_FOLDER_RESET];
	db_bind_int64(st, 1, folder_id);
	ret = run_row(store, st, "folder_reset", "no such folder (id %lld)",
		      (long long)folder_id);
	if (ret == 0) {
		st = store->st[ST_FOLDER_FORGET_MSGS];
		db_bind_int64(st, 1, folder_id);
		ret = run(store, st, "folder_reset");
	}
	if (ret == 0) {
		st = store->st[ST_FOLDER_FORGET_RINTENTS];
		db_bind_int64(st, 1, folder_id);
		ret = run(store, st, "folder_reset");
	}
	return finish(store, ret);
}

/* A message's size, date, Message-ID and flags, bound in that order from
 * parameter col on. */
static void bind_msg_meta(struct db_stmt *st, int col,
			  const struct ms_msg_rec *rec)
{
	db_bind_int64(st, col, (int64_t)rec->size);
	db_bind_int64(st, col + 1, rec->date);
	db_bind_text(st, col + 2, rec->msgid);
	db_bind_text(st, col + 3, rec->flags);
}

int ms_store_msg_put(struct ms_store *store, int64_t folder_id,
		     const struct ms_msg_rec *rec)
{
	struct db_stmt *st = store->st[ST_MSG_PUT];

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

	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, rec->src_uid);
	db_bind_text(st, 3, rec->uidl);
	db_bind_int64(st, 4, rec->state);
	bind_msg_meta(st, 5, rec);
	db_bind_int64(st, 9, rec->dst_uid);
	db_bind_int64(st, 10, rec->dst_floor);
	return run(store, st, "msg_put");
}

/* Columns as in MSG_COLS. */
static int read_msg(struct ms_store *s, struct db_stmt *st,
		    struct ms_msg_rec *rec)
{
	memset(rec, 0, sizeof(*rec));
	rec->src_uid = (uint32_t)db_column_int64(st, 0);
	rec->state = db_column_int64(st, 2);
	rec->size = (uint64_t)db_column_int64(st, 3);
	rec->date = db_column_int64(st, 4);
	rec->dst_uid = (uint32_t)db_column_int64(st, 7);
	rec->dst_floor = (uint32_t)db_column_int64(st, 8);
	if (copy_text(s, st, 1, rec->uidl, sizeof(rec->uidl), "UIDL") < 0 ||
	    copy_text(s, st, 5, rec->msgid, sizeof(rec->msgid),
		      "Message-ID") < 0 ||
	    copy_text(s, st, 6, rec->flags, sizeof(rec->flags), "flags") < 0)
		return -1;
	return 0;
}

static int msg_get(struct ms_store *s, struct db_stmt *st,
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
	struct db_stmt *st = store->st[ST_MSG_GET];

	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, src_uid);
	return msg_get(store, st, rec_r, found_r);
}

int ms_store_msg_get_uidl(struct ms_store *store, int64_t folder_id,
			  const char *uidl, struct ms_msg_rec *rec_r,
			  int *found_r)
{
	struct db_stmt *st = store->st[ST_MSG_GET_UIDL];

	db_bind_int64(st, 1, folder_id);
	db_bind_text(st, 2, uidl);
	return msg_get(store, st, rec_r, found_r);
}

int ms_store_msg_get_dst(struct ms_store *store, int64_t folder_id,
			 uint32_t dst_uid, struct ms_msg_rec *rec_r,
			 int *found_r)
{
	struct db_stmt *st = store->st[ST_MSG_GET_DST];

	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, dst_uid);
	return msg_get(store, st, rec_r, found_r);
}

int ms_store_msg_done(struct ms_store *store, int64_t folder_id,
		      uint32_t src_uid, uint32_t dst_uid, const char *flags)
{
	struct db_stmt *st = store->st[ST_MSG_DONE];

	if (flags && check_len(store, flags, FLAGS_SIZE, "flags") < 0)
		return -1;
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, src_uid);
	db_bind_int64(st, 3, dst_uid);
	if (flags)
		db_bind_text(st, 4, flags);
	return run_row(store, st, "msg_done", "msg_done: no such message "
		       "record (folder %lld, UID %u)", (long long)folder_id,
		       src_uid);
}

int ms_store_msg_set_flags(struct ms_store *store, int64_t folder_id,
			   uint32_t src_uid, const char *flags)
{
	struct db_stmt *st = store->st[ST_MSG_SET_FLAGS];

	if (flags == NULL)
		flags = "";
	if (check_len(store, flags, FLAGS_SIZE, "flags") < 0)
		return -1;
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, src_uid);
	db_bind_text(st, 3, flags);
	return run_row(store, st, "msg_set_flags", "msg_set_flags: no such "
		       "message record (folder %lld, UID %u)",
		       (long long)folder_id, src_uid);
}

int ms_store_msg_delete(struct ms_store *store, int64_t folder_id,
			uint32_t src_uid, const char *uidl)
{
	struct db_stmt *st = store->st[ST_MSG_DELETE];

	/* Deleting what is not there is not an error: the caller wants it
	 * gone, and a retry after a crash must not fail. */
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, src_uid);
	db_bind_text(st, 3, src_uid != 0 || uidl == NULL ? "" : uidl);
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
static int walk(struct ms_store *store, struct db_stmt *st, int64_t folder_id,
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
		db_bind_int64(st, 1, folder_id);
		db_bind_int64(st, 2, last_uid);
		if (rintents) {
			db_bind_int64(st, 3, FOREACH_PAGE);
		} else {
			db_bind_text(st, 3, last_uidl);
			db_bind_int64(st, 4, state < 0 ? -1 : state);
			db_bind_int64(st, 5, FOREACH_PAGE);
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
		/* step_row released the statement at DB_DONE */
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
static int count_row(struct ms_store *store, struct db_stmt *st,
		     const char *what, uint64_t *count_r)
{
	int ret = step_row(store, st, what);

	if (ret == 0)
		ret = set_error(store, "%s: no result", what);
	if (ret < 0)
		return -1;
	*count_r = (uint64_t)db_column_int64(st, 0);
	release(st);
	return 0;
}

int ms_store_msg_count(struct ms_store *store, int64_t folder_id, int state,
		       uint64_t *count_r)
{
	struct db_stmt *st = store->st[ST_MSG_COUNT];

	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, state < 0 ? -1 : state);
	return count_row(store, st, "msg_count", count_r);
}

/* ---- rollback intents ---- */

int ms_store_rintent_put(struct ms_store *store, int64_t folder_id,
			 const struct ms_msg_rec *rec)
{
	struct db_stmt *st = store->st[ST_RINTENT_PUT];

	if (check_len(store, rec->msgid, sizeof(rec->msgid),
		      "Message-ID") < 0 ||
	    check_len(store, rec->flags, sizeof(rec->flags), "flags") < 0)
		return -1;
	if (rec->dst_uid == 0)
		return set_error(store, "rintent_put: no destination UID");
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, rec->dst_uid);
	bind_msg_meta(st, 3, rec);
	db_bind_int64(st, 7, rec->dst_floor);
	return run(store, st, "rintent_put");
}

int ms_store_rintent_delete(struct ms_store *store, int64_t folder_id,
			    uint32_t dst_uid)
{
	struct db_stmt *st = store->st[ST_RINTENT_DELETE];

	/* as msg_delete: what is not there is gone already */
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, dst_uid);
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
	struct db_stmt *st = store->st[ST_RINTENT_COUNT];

	db_bind_int64(st, 1, folder_id);
	return count_row(store, st, "rintent_count", count_r);
}

/* ---- the folders of a user (planning a rollback: not a hot path) ---- */

int ms_store_folder_foreach(struct ms_store *store, int64_t user_id,
			    ms_store_folder_cb *cb, void *ctx)
{
	struct ms_folder_state fs;
	struct db_stmt *st;
	int rc, ret = 0;

	if (prepare(store, "SELECT " FOLDER_COLS " FROM folders"
		    " WHERE user_id = ?1 ORDER BY src_name", &st,
		    "folder_foreach") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	while ((rc = db_step(st)) == DB_ROW) {
		if (read_folder(store, st, &fs) < 0) {
			ret = -1;
			break;
		}
		if ((ret = cb(ctx, &fs)) != 0)
			break;
	}
	db_finalize(st);
	if (ret == 0 && rc != DB_DONE)
		return db_error(store, "folder_foreach");
	return ret;
}

/* ---- users, for the gateway and the control commands ----
 * Not on a hot path: statements are prepared per call. */

static void user_row(struct db_stmt *st, struct ms_user_info *u)
{
	const char *t;

	memset(u, 0, sizeof(*u));
	u->id = db_column_int64(st, 0);
	t = db_column_text(st, 1, NULL);
	snprintf(u->name, sizeof(u->name), "%s", t ? t : "");
	t = db_column_text(st, 2, NULL);
	snprintf(u->state, sizeof(u->state), "%s", t ? t : "");
	t = db_column_text(st, 3, NULL);
	snprintf(u->policy, sizeof(u->policy), "%s", t ? t : "");
	t = db_column_text(st, 4, NULL);
	snprintf(u->last_error, sizeof(u->last_error), "%s",
		 t ? t : "");
	u->msgs = (uint64_t)db_column_int64(st, 5);
	u->bytes = (uint64_t)db_column_int64(st, 6);
	u->updated_at = db_column_int64(st, 7);
}

#define USER_COLS "id, name, state, policy, last_error, msgs_copied, " \
	"bytes_copied, updated_at"

int ms_store_user_info(struct ms_store *store, const char *name,
		       struct ms_user_info *info_r, int *found_r)
{
	struct db_stmt *st;
	int rc;

	*found_r = 0;
	if (store->user_info == NULL &&
	    prepare(store, "SELECT " USER_COLS " FROM users WHERE name = ?1",
		    &store->user_info, "user_info") < 0)
		return -1;
	st = store->user_info;
	db_bind_text(st, 1, name);
	rc = db_step(st);
	if (rc == DB_ROW) {
		user_row(st, info_r);
		*found_r = 1;
	}
	db_reset(st);
	if (rc != DB_ROW && rc != DB_DONE)
		return db_error(store, "user_info");
	return 0;
}

int ms_store_user_foreach(struct ms_store *store, ms_store_user_cb *cb,
			  void *ctx)
{
	struct ms_user_info u;
	struct db_stmt *st;
	int rc, ret = 0;

	if (prepare(store, "SELECT " USER_COLS " FROM users "
		    "ORDER BY name", &st,
		    "user_foreach") < 0)
		return -1;
	while ((rc = db_step(st)) == DB_ROW) {
		user_row(st, &u);
		if ((ret = cb(ctx, &u)) != 0)
			break;
	}
	db_finalize(st);
	if (ret == 0 && rc != DB_DONE)
		return db_error(store, "user_foreach");
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
	struct db_stmt *st;
	int rc;

	if (policy != NULL && *policy != '\0' && bad_policy(store, policy))
		return -1;
	user_write(store, user_id);
	if (prepare(store, "UPDATE users SET policy = ?2 "
		    "WHERE id = ?1", &st,
		    "user_set_policy") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	if (policy != NULL && *policy != '\0')
		db_bind_text(st, 2, policy);
	rc = db_step(st);
	db_finalize(st);
	if (rc != DB_DONE)
		return db_error(store, "user_set_policy");
	return 0;
}

int ms_store_policy_set(struct ms_store *store, const char *scope,
			const char *policy)
{
	struct db_stmt *st;
	int rc;

	if (policy != NULL && bad_policy(store, policy))
		return -1;
	if (prepare(store, policy != NULL ?
		    "INSERT INTO policies (scope, policy) "
		    "VALUES (?1, ?2) ON CONFLICT (scope) DO UPDATE "
		    "SET policy = excluded.policy" :
		    "DELETE FROM policies WHERE scope = ?1", &st,
		    "policy_set") < 0)
		return -1;
	db_bind_text(st, 1, scope);
	if (policy != NULL)
		db_bind_text(st, 2, policy);
	rc = db_step(st);
	db_finalize(st);
	if (rc != DB_DONE)
		return db_error(store, "policy_set");
	return 0;
}

int ms_store_policy_foreach(struct ms_store *store, ms_store_policy_cb *cb,
			    void *ctx)
{
	struct db_stmt *st;
	int rc, r = 0;

	if (prepare(store, "SELECT scope, policy FROM policies "
		    "ORDER BY scope", &st,
		    "policy_foreach") < 0)
		return -1;
	while ((rc = db_step(st)) == DB_ROW && r == 0)
		r = cb(ctx, db_column_text(st, 0, NULL),
		       db_column_text(st, 1, NULL));
	db_finalize(st);
	if (r != 0)
		return r;
	if (rc != DB_DONE)
		return db_error(store, "policy_foreach");
	return 0;
}

/* ---- retirement of the source (mailshiftctl retire) ----
 * The gateway writes a use at most once a minute per user; the rest is
 * read by mailshiftctl. Prepared per call. */

int ms_store_source_use_note(struct ms_store *store,
			     const struct ms_source_use *u)
{
	struct db_stmt *st;

	if (prepare(store, "INSERT INTO source_use "
		    "(key, kind, name, at, slack) VALUES (?1, ?2, "
		    "?3, ?4, ?5) ON CONFLICT (key, kind) DO UPDATE "
		    "SET name = excluded.name, at = excluded.at, "
		    "slack = excluded.slack", &st,
		    "source_use_note") < 0)
		return -1;
	db_bind_text(st, 1, u->key);
	db_bind_text(st, 2, u->kind);
	db_bind_text(st, 3, u->name);
	db_bind_int64(st, 4, u->at);
	db_bind_int64(st, 5, u->slack);
	return run_once(store, st, "source_use_note");
}

int ms_store_source_use_foreach(struct ms_store *store, int64_t since,
				ms_store_source_use_cb *cb, void *ctx)
{
	struct ms_source_use u;
	struct db_stmt *st;
	int rc, ret = 0;

	if (prepare(store, "SELECT key, kind, name, at, slack "
		    "FROM source_use WHERE at + slack >= ?1 "
		    "ORDER BY at DESC, key, kind", &st,
		    "source_use_foreach") < 0)
		return -1;
	db_bind_int64(st, 1, since);
	while (ret == 0 && (rc = db_step(st)) == DB_ROW) {
		memset(&u, 0, sizeof(u));
		if (copy_text(store, st, 0, u.key, sizeof(u.key), "key") < 0 ||
		    copy_text(store, st, 1, u.kind, sizeof(u.kind),
			      "kind") < 0 ||
		    copy_text(store, st, 2, u.name, sizeof(u.name),
			      "name") < 0) {
			ret = -1;
			break;
		}
		u.at = db_column_int64(st, 3);
		u.slack = db_column_int64(st, 4);
		ret = cb(ctx, &u);
	}
	db_finalize(st);
	if (ret == 0 && rc != DB_DONE)
		return db_error(store, "source_use_foreach");
	return ret;
}

int ms_store_user_moves(struct ms_store *store, int64_t user_id,
			int64_t *first_copy_r, int64_t *moved_r)
{
	struct db_stmt *st;
	int rc;

	*first_copy_r = *moved_r = 0;
	if (prepare(store, "SELECT first_copy, moved FROM "
		    "user_moves WHERE user_id = ?1", &st,
		    "user_moves") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	rc = db_step(st);
	if (rc == DB_ROW) {
		*first_copy_r = db_column_int64(st, 0);
		*moved_r = db_column_int64(st, 1);
	}
	db_finalize(st);
	if (rc != DB_ROW && rc != DB_DONE)
		return db_error(store, "user_moves");
	return 0;
}

int ms_store_retirement_add(struct ms_store *store,
			    const struct ms_retirement *r)
{
	struct db_stmt *st;

	if (prepare(store, "INSERT INTO retirements (at, uid, "
		    "forced, record) VALUES (?1, ?2, ?3, ?4)", &st,
		    "retirement_add") < 0)
		return -1;
	db_bind_int64(st, 1, r->at);
	db_bind_int64(st, 2, r->uid);
	db_bind_int64(st, 3, r->forced);
	db_bind_text(st, 4, r->record != NULL ? r->record : "{}");
	return run_once(store, st, "retirement_add");
}

int ms_store_retirement_get(struct ms_store *store, struct ms_retirement *r,
			    int *found_r)
{
	struct db_stmt *st;
	const char *text;
	int rc, ret = 0;

	memset(r, 0, sizeof(*r));
	*found_r = 0;
	if (prepare(store, "SELECT at, uid, forced, record FROM "
		    "retirements ORDER BY id DESC LIMIT 1", &st,
		    "retirement_get") < 0)
		return -1;
	rc = db_step(st);
	if (rc == DB_ROW) {
		r->at = db_column_int64(st, 0);
		r->uid = (unsigned int)db_column_int64(st, 1);
		r->forced = db_column_int64(st, 2);
		text = db_column_text(st, 3, NULL);
		r->record = strdup(text != NULL ? text : "{}");
		if (r->record == NULL)
			ret = set_error(store, "retirement_get: out of memory");
		*found_r = ret == 0;
	} else if (rc != DB_DONE) {
		ret = db_error(store, "retirement_get");
	}
	db_finalize(st);
	return ret;
}

/* ---- folder identity (once per folder: statements prepared per call) ---- */

/* The one number a "SELECT x FROM t WHERE folder_id = ?1" gives (*v_r
 * left as it is without a row). */
static int folder_number(struct ms_store *store, const char *sql,
			 int64_t folder_id, const char *what, int64_t *v_r)
{
	struct db_stmt *st;
	int rc;

	if (prepare(store, sql, &st, what) < 0)
		return -1;
	db_bind_int64(st, 1, folder_id);
	rc = db_step(st);
	if (rc == DB_ROW)
		*v_r = db_column_int64(st, 0);
	db_finalize(st);
	if (rc != DB_ROW && rc != DB_DONE)
		return db_error(store, what);
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
	struct db_stmt *st;

	if (prepare(store, "INSERT INTO folder_identity"
		    " (folder_id, state, reason) VALUES (?1, ?2, ?3)"
		    " ON CONFLICT (folder_id) DO UPDATE SET"
		    " state = excluded.state, reason = excluded.reason", &st,
		    "identity_set") < 0)
		return -1;
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, state);
	db_bind_text(st, 3, reason != NULL ? reason : "");
	if (db_step(st) != DB_DONE) {
		db_error(store, "identity_set");
		db_finalize(st);
		return -1;
	}
	db_finalize(st);
	return 0;
}

int ms_store_view_count(struct ms_store *store, struct ms_view_count *c)
{
	struct db_stmt *st;
	int rc;

	memset(c, 0, sizeof(*c));
	if (prepare(store, "SELECT"
		    " (SELECT count(DISTINCT user_id) FROM ("
		    "   SELECT f.user_id FROM folder_identity i JOIN folders f"
		    "   ON f.id = i.folder_id WHERE i.state = 2"
		    "   UNION ALL SELECT f.user_id FROM folder_renames r"
		    "   JOIN folders f ON f.id = r.folder_id) AS v),"
		    " (SELECT count(DISTINCT f.user_id) FROM folder_identity i"
		    "   JOIN folders f ON f.id = i.folder_id WHERE i.state = 2),"
		    " (SELECT count(*) FROM folder_identity WHERE state = 2),"
		    " (SELECT count(*) FROM folder_renames)", &st,
		    "view_count") < 0)
		return -1;
	rc = db_step(st);
	if (rc == DB_ROW) {
		c->users = (uint64_t)db_column_int64(st, 0);
		c->lost_users = (uint64_t)db_column_int64(st, 1);
		c->lost_folders = (uint64_t)db_column_int64(st, 2);
		c->renamed_folders = (uint64_t)db_column_int64(st, 3);
	}
	db_finalize(st);
	if (rc != DB_ROW)
		return db_error(store, "view_count");
	return 0;
}

int ms_store_rename_set(struct ms_store *store, int64_t folder_id,
			const char *old_name, char sep)
{
	struct db_stmt *st;
	char sep_s[2] = { sep, '\0' };

	if (old_name == NULL) {
		if (prepare(store, "DELETE FROM folder_renames WHERE"
			    " folder_id = ?1", &st, "rename_set") < 0)
			return -1;
		db_bind_int64(st, 1, folder_id);
		return run_once(store, st, "rename_set");
	}
	if (prepare(store, "INSERT INTO folder_renames (folder_id, old_name,"
		    " sep) VALUES (?1, ?2, ?3) ON CONFLICT (folder_id) DO"
		    " UPDATE SET old_name = excluded.old_name,"
		    " sep = excluded.sep", &st, "rename_set") < 0)
		return -1;
	db_bind_int64(st, 1, folder_id);
	db_bind_text(st, 2, old_name);
	db_bind_text(st, 3, sep_s);
	return run_once(store, st, "rename_set");
}

int ms_store_rename_foreach(struct ms_store *store, int64_t user_id,
			    ms_store_rename_cb *cb, void *ctx)
{
	struct db_stmt *st;
	int rc, ret = 0;

	if (prepare(store, "SELECT r.old_name, f.dst_name, r.sep FROM"
		    " folder_renames r JOIN folders f ON f.id = r.folder_id"
		    " WHERE f.user_id = ?1 AND f.dst_name <> ''"
		    " ORDER BY f.src_name", &st, "rename_foreach") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	while ((rc = db_step(st)) == DB_ROW) {
		const char *old = db_column_text(st, 0, NULL);
		const char *dst = db_column_text(st, 1, NULL);
		const char *sep = db_column_text(st, 2, NULL);

		if ((ret = cb(ctx, old ? old : "", dst ? dst : "",
			      sep != NULL ? sep[0] : '\0')) != 0)
			break;
	}
	db_finalize(st);
	if (ret == 0 && rc != DB_DONE)
		return db_error(store, "rename_foreach");
	return ret;
}

int ms_store_namespace_set(struct ms_store *store, int64_t user_id,
			   const struct ms_user_ns *ns)
{
	struct db_stmt *st;
	char ssep[2] = { ns->src_sep, '\0' }, dsep[2] = { ns->dst_sep, '\0' };

	if (prepare(store, "INSERT INTO user_namespaces (user_id, src_prefix,"
		    " src_sep, dst_prefix, dst_sep) VALUES (?1, ?2, ?3, ?4, ?5)"
		    " ON CONFLICT (user_id) DO UPDATE SET"
		    " src_prefix = excluded.src_prefix,"
		    " src_sep = excluded.src_sep,"
		    " dst_prefix = excluded.dst_prefix,"
		    " dst_sep = excluded.dst_sep", &st, "namespace_set") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	db_bind_text(st, 2, ns->src_prefix);
	db_bind_text(st, 3, ssep);
	db_bind_text(st, 4, ns->dst_prefix);
	db_bind_text(st, 5, dsep);
	return run_once(store, st, "namespace_set");
}

int ms_store_namespace_get(struct ms_store *store, int64_t user_id,
			   struct ms_user_ns *ns, int *found_r)
{
	struct db_stmt *st;
	char sep[2];
	int rc;

	memset(ns, 0, sizeof(*ns));
	*found_r = 0;
	if (prepare(store, "SELECT src_prefix, src_sep, dst_prefix, dst_sep"
		    " FROM user_namespaces WHERE user_id = ?1", &st,
		    "namespace_get") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	rc = db_step(st);
	if (rc == DB_ROW) {
		*found_r = 1;
		if (copy_text(store, st, 0, ns->src_prefix,
			      sizeof(ns->src_prefix), "namespace_get") < 0 ||
		    copy_text(store, st, 1, sep, sizeof(sep),
			      "namespace_get") < 0)
			goto fail;
		ns->src_sep = sep[0];
		if (copy_text(store, st, 2, ns->dst_prefix,
			      sizeof(ns->dst_prefix), "namespace_get") < 0 ||
		    copy_text(store, st, 3, sep, sizeof(sep),
			      "namespace_get") < 0)
			goto fail;
		ns->dst_sep = sep[0];
	}
	db_finalize(st);
	if (rc != DB_ROW && rc != DB_DONE)
		return db_error(store, "namespace_get");
	return 0;
fail:
	db_finalize(st);
	return -1;
}

/* ---- store copy (mailshiftctl store copy): every table, between engines ----
 * Values travel as text: an integer column takes its digits back on either
 * engine, and NULL stays NULL. Parents before children, for the foreign
 * keys; the tables with generated ids keep them. */

static const struct copy_table {
	const char *name, *cols;
	int ncols, ids;
} copy_tables[] = {
	{ "users", "id, name, state, policy, last_error, msgs_copied, "
	  "bytes_copied, updated_at", 8, 1 },
	{ "folders", FOLDER_COLS, 10, 1 },
	{ "messages", "folder_id, " MSG_COLS, 10, 0 },
	{ "rintents", "folder_id, dst_uid, size, date, msgid, flags, "
	  "src_floor", 7, 0 },
	{ "folder_identity", "folder_id, state, reason", 3, 0 },
	{ "user_moves", "user_id, first_copy, moved", 3, 0 },
	{ "policies", "scope, policy", 2, 0 },
	{ "source_use", "key, kind, name, at, slack", 5, 0 },
	{ "retirements", "id, at, uid, forced, record", 5, 1 },
	{ "user_sizes", "user_id, messages, bytes, how, at", 5, 0 },
	{ "folder_src_next", "folder_id, uidnext", 2, 0 },
	{ "folder_renames", "folder_id, old_name, sep", 3, 0 },
	{ "user_namespaces", "user_id, src_prefix, src_sep, dst_prefix, "
	  "dst_sep", 5, 0 },
	{ "jobs", "user_id, kind, state, owner, lease_until, attempts, "
	  "last_error, updated_at", 8, 0 },
	{ "gateways", "name, started, heartbeat, sessions, copies", 5, 0 },
	{ "cutover_requests", "user_id, seq, gateway, kind, at", 5, 0 },
	{ "cutover_acks", "user_id, seq, gateway, at", 4, 0 },
	{ "meta", "key, value", 2, 0 },
};
#define NCOPY (sizeof(copy_tables) / sizeof(copy_tables[0]))

static int copy_rows(struct ms_store *from, struct ms_store *to,
		     const struct copy_table *t, uint64_t *rows_r)
{
	struct db_stmt *rd, *wr;
	char sql[512];
	size_t n;
	int i, rc, ret = 0;

	*rows_r = 0;
	snprintf(sql, sizeof(sql), "SELECT %s FROM %s", t->cols, t->name);
	/* streamed: a table of millions of messages is never in memory */
	if (db_prepare(from->db, sql, DB_STREAM, &rd) < 0)
		return db_error(from, t->name);
	n = (size_t)snprintf(sql, sizeof(sql), "INSERT INTO %s (%s) VALUES (",
			     t->name, t->cols);
	for (i = 1; i <= t->ncols && n < sizeof(sql); i++)
		n += (size_t)snprintf(sql + n, sizeof(sql) - n, "%s?%d",
				      i > 1 ? ", " : "", i);
	snprintf(sql + n, n < sizeof(sql) ? sizeof(sql) - n : 0, ")");
	if (prepare(to, sql, &wr, t->name) < 0) {
		db_finalize(rd);
		return -1;
	}
	/* the row's text is bound as it is: the insert runs before the
	 * next step moves the reader on */
	while ((rc = db_step(rd)) == DB_ROW) {
		for (i = 0; i < t->ncols; i++)
			db_bind_text(wr, i + 1, db_column_text(rd, i, NULL));
		if (run(to, wr, t->name) < 0) {
			ret = -1;
			break;
		}
		(*rows_r)++;
	}
	if (ret == 0 && rc != DB_DONE)
		ret = db_error(from, t->name);
	if (ret == 0 && t->ids && to->drv->sync_ids != NULL &&
	    to->drv->sync_ids(to->db, t->name) < 0)
		ret = db_error(to, t->name);
	db_finalize(rd);
	db_finalize(wr);
	return ret;
}

/* The rows the target holds in all its tables. */
static int copy_count(struct ms_store *s, uint64_t *rows_r)
{
	struct db_stmt *st;
	char sql[128];
	size_t i;
	int ret;

	*rows_r = 0;
	for (i = 0; i < NCOPY; i++) {
		snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s",
			 copy_tables[i].name);
		if (prepare(s, sql, &st, "count") < 0)
			return -1;
		ret = step_row(s, st, "count");
		if (ret == 1)
			*rows_r += (uint64_t)db_column_int64(st, 0);
		db_finalize(st);
		if (ret < 0)
			return -1;
	}
	return 0;
}

/* Children first, so that no foreign key is in the way. */
static int copy_empty(struct ms_store *s)
{
	char sql[128];
	size_t i;

	for (i = NCOPY; i-- > 0;) {
		snprintf(sql, sizeof(sql), "DELETE FROM %s",
			 copy_tables[i].name);
		if (exec(s, sql, "replace") < 0)
			return -1;
	}
	return 0;
}

static int copy_all(struct ms_store *from, struct ms_store *to, int replace,
		    ms_store_copy_cb *cb, void *ctx)
{
	uint64_t rows;
	size_t i;

	if (copy_count(to, &rows) < 0)
		return -1;
	if (rows > 0 && !replace)
		return set_error(to, "the target store is not empty (%llu "
				 "rows): it may hold a migration (--replace "
				 "empties it first)", (unsigned long long)rows);
	if (rows > 0 && copy_empty(to) < 0)
		return -1;
	for (i = 0; i < NCOPY; i++) {
		if (copy_rows(from, to, &copy_tables[i], &rows) < 0)
			return -1;
		if (cb != NULL)
			cb(ctx, copy_tables[i].name, rows);
	}
	return 0;
}

int ms_store_copy(struct ms_store *from, struct ms_store *to, int replace,
		  ms_store_copy_cb *cb, void *ctx)
{
	int ret;

	from->error[0] = to->error[0] = '\0';
	/* the meta table is made when first needed (claim()) */
	if (exec(from, meta_sql, "meta") < 0 || exec(to, meta_sql, "meta") < 0)
		return -1;
	if (exec(from, from->drv->begin_snapshot, "snapshot") < 0)
		return -1;
	if (ms_store_begin(to) < 0) {
		db_exec(from->db, "ROLLBACK");
		return -1;
	}
	ret = copy_all(from, to, replace, cb, ctx);
	/* the copy's error is in from's or to's error: keep it in to's */
	if (ret < 0 && from->error[0] != '\0' && to->error[0] == '\0')
		set_error(to, "%s", from->error);
	ret = finish(to, ret);
	db_exec(from->db, "ROLLBACK");
	return ret;
}

/* ---- the survey of the source's mailbox sizes (the site's ETA) ---- */

int ms_store_size_set(struct ms_store *store, int64_t user_id,
		      const struct ms_user_size *sz)
{
	struct db_stmt *st;

	if (prepare(store, "INSERT INTO user_sizes (user_id, messages, bytes, how, at)"
		    " VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (user_id) DO UPDATE"
		    " SET messages = excluded.messages, bytes = excluded.bytes,"
		    " how = excluded.how, at = excluded.at",
		    &st, "size_set") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	db_bind_int64(st, 2, sz->messages);
	db_bind_int64(st, 3, sz->bytes);
	db_bind_text(st, 4, sz->how);
	db_bind_int64(st, 5, sz->at != 0 ? sz->at : (int64_t)time(NULL));
	return run_once(store, st, "size_set");
}

int ms_store_size_next(struct ms_store *store, char *name, size_t namesz,
		       int *found_r)
{
	struct db_stmt *st;
	int rc;

	*found_r = 0;
	if (prepare(store, MS_SIZE_NEXT_SQL, &st, "size_next") < 0)
		return -1;
	rc = db_step(st);
	if (rc == DB_ROW)
		*found_r = copy_text(store, st, 0, name, namesz, "name") == 0;
	db_finalize(st);
	if (rc != DB_ROW && rc != DB_DONE)
		return db_error(store, "size_next");
	return rc == DB_ROW && !*found_r ? -1 : 0;
}

int ms_store_size_foreach(struct ms_store *store, ms_store_size_cb *cb,
			  void *ctx)
{
	struct ms_user_size sz;
	struct ms_user_info u;
	struct db_stmt *st;
	int rc, ret = 0;

	if (prepare(store, "SELECT " USER_COLS ", coalesce(messages, -1),"
		    " coalesce(bytes, -1), coalesce(how, ''), coalesce(at, 0)"
		    " FROM users LEFT JOIN user_sizes ON user_id = id"
		    " ORDER BY name", &st, "size_foreach") < 0)
		return -1;
	while ((rc = db_step(st)) == DB_ROW) {
		user_row(st, &u);
		memset(&sz, 0, sizeof(sz));
		sz.messages = db_column_int64(st, 8);
		sz.bytes = db_column_int64(st, 9);
		if (copy_text(store, st, 10, sz.how, sizeof(sz.how),
			      "how") < 0) {
			ret = -1;
			break;
		}
		sz.at = db_column_int64(st, 11);
		if ((ret = cb(ctx, &u, &sz)) != 0)
			break;
	}
	db_finalize(st);
	if (ret == 0 && rc != DB_DONE)
		return db_error(store, "size_foreach");
	return ret;
}

/* ---- the source's UIDNEXT of a folder's last copy pass (the gateway's
 * IMAP view numbers new mail above it) ---- */

int ms_store_src_next_set(struct ms_store *store, int64_t folder_id,
			  uint32_t uidnext)
{
	struct db_stmt *st;

	if (prepare(store, "INSERT INTO folder_src_next (folder_id, uidnext)"
		    " VALUES (?1, ?2) ON CONFLICT (folder_id) DO UPDATE"
		    " SET uidnext = excluded.uidnext", &st,
		    "src_next_set") < 0)
		return -1;
	db_bind_int64(st, 1, folder_id);
	db_bind_int64(st, 2, uidnext);
	return run_once(store, st, "src_next_set");
}

int ms_store_src_next_get(struct ms_store *store, int64_t folder_id,
			  uint32_t *uidnext_r)
{
	int64_t v = 0;
	int ret = folder_number(store, "SELECT uidnext FROM folder_src_next"
				" WHERE folder_id = ?1", folder_id,
				"src_next_get", &v);

	*uidnext_r = (uint32_t)v;
	return ret;
}

/* ---- jobs: a user's copy as work any gateway may take (docs/design.md,
 * "Jobs and leases") ----
 * The lease is counted on the database's clock, in ms, so that gateways
 * whose clocks differ still agree on when one has expired. A job is taken
 * by a conditional UPDATE of its row (one row lock, held for the short
 * transaction); the sweep's claim walks the queue with FOR UPDATE SKIP
 * LOCKED on PostgreSQL, so that two gateways claiming at once each get
 * other users and neither waits. SQLite has one writer: a plain
 * transaction is the lock. */

#define NOW_SQLITE "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
#define NOW_PG "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)"

/* sql with every %s the engine's "now" (ms), prepared for one call. */
static int job_prepare(struct ms_store *s, const char *fmt,
		       struct db_stmt **st, const char *what)
{
	const char *now = s->drv->sqlite_dialect ? NOW_SQLITE : NOW_PG;
	char sql[1024];

	snprintf(sql, sizeof(sql), fmt, now, now, now);
	return prepare(s, sql, st, what);
}

/* The user's job row, made (state done) when missing. */
static int job_row(struct ms_store *s, int64_t user_id)
{
	struct db_stmt *st;

	if (job_prepare(s, "INSERT INTO jobs (user_id, kind, state,"
			" updated_at) VALUES (?1, '', 'done', %s)"
			" ON CONFLICT DO NOTHING", &st, "job") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	return run_once(s, st, "job");
}

int ms_store_job_take(struct ms_store *store, const char *user,
		      const char *kind, const char *owner,
		      unsigned int lease_ms, int *taken_r)
{
	struct db_stmt *st;
	int64_t id;
	int ret;

	*taken_r = 0;
	if (ms_store_user_get(store, user, &id) < 0 ||
	    ms_store_begin(store) < 0)
		return -1;
	ret = job_row(store, id);
	if (ret == 0)
		ret = job_prepare(store, "UPDATE jobs SET kind = ?2,"
				  " state = 'running', owner = ?3,"
				  " lease_until = %s + ?4,"
				  " attempts = attempts + 1, updated_at = %s"
				  " WHERE user_id = ?1 AND (state != 'running'"
				  " OR owner = ?3 OR lease_until < %s)", &st,
				  "job_take");
	if (ret == 0) {
		db_bind_int64(st, 1, id);
		db_bind_text(st, 2, kind);
		db_bind_text(st, 3, owner);
		db_bind_int64(st, 4, lease_ms);
		ret = run_once(store, st, "job_take");
		*taken_r = ret == 0 && db_changes(store->db) > 0;
	}
	return finish(store, ret);
}

/* run_once() of an UPDATE of the owner's row: *held_r, whether it was. */
static int run_held(struct ms_store *s, struct db_stmt *st, const char *what,
		    int *held_r)
{
	if (run_once(s, st, what) < 0)
		return -1;
	*held_r = db_changes(s->db) > 0;
	return 0;
}

int ms_store_job_renew(struct ms_store *store, const char *user,
		       const char *owner, unsigned int lease_ms, int *held_r)
{
	struct db_stmt *st;

	*held_r = 0;
	if (job_prepare(store, "UPDATE jobs SET lease_until = %s + ?3"
			" WHERE user_id = (SELECT id FROM users WHERE"
			" name = ?1) AND owner = ?2 AND state = 'running'",
			&st, "job_renew") < 0)
		return -1;
	db_bind_text(st, 1, user);
	db_bind_text(st, 2, owner);
	db_bind_int64(st, 3, lease_ms);
	return run_held(store, st, "job_renew", held_r);
}

int ms_store_job_end(struct ms_store *store, int64_t user_id,
		     const char *owner, const char *state, const char *error,
		     int *held_r)
{
	struct db_stmt *st;

	*held_r = 0;
	if (job_prepare(store, "UPDATE jobs SET state = ?3,"
			" last_error = coalesce(?4, ''), lease_until = 0,"
			" updated_at = %s WHERE user_id = ?1 AND owner = ?2"
			" AND state = 'running'", &st, "job_end") < 0)
		return -1;
	db_bind_int64(st, 1, user_id);
	db_bind_text(st, 2, owner);
	db_bind_text(st, 3, state);
	db_bind_text(st, 4, error);
	return run_held(store, st, "job_end", held_r);
}

int ms_store_job_enqueue(struct ms_store *store)
{
	struct db_stmt *st;
	int ret;

	if (ms_store_begin(store) < 0)
		return -1;
	/* Users still to move with no job yet, and those whose last job
	 * ended without moving them (released, or a failure the operator
	 * has put back since). */
	ret = job_prepare(store, MS_JOB_ENQUEUE_NEW, &st, "job_enqueue");
	if (ret == 0)
		ret = run_once(store, st, "job_enqueue");
	if (ret == 0)
		ret = job_prepare(store, MS_JOB_ENQUEUE_AGAIN, &st,
				  "job_enqueue");
	if (ret == 0)
		ret = run_once(store, st, "job_enqueue");
	return finish(store, ret);
}

struct job_claimed {
	int64_t id;
	char name[256], kind[16], owner[128], state[16];
};

/* The claimable rows, locked (PostgreSQL: those no other claim holds). */
static int claim_select(struct ms_store *s, unsigned int max, int queued,
			struct job_claimed *out, unsigned int *n_r)
{
	struct db_stmt *st;
	char fmt[768];
	int rc;

	*n_r = 0;
	snprintf(fmt, sizeof(fmt), "SELECT j.user_id, u.name, j.kind,"
		 " j.owner, j.state FROM jobs j JOIN users u ON u.id ="
		 " j.user_id WHERE (j.state = 'running' AND j.lease_until <"
		 " %%s)%s ORDER BY u.name LIMIT ?1%s",
		 queued ? " OR j.state = 'queued'" : "",
		 s->drv->sqlite_dialect ? "" : " FOR UPDATE OF j SKIP LOCKED");
	if (job_prepare(s, fmt, &st, "job_claim") < 0)
		return -1;
	db_bind_int64(st, 1, max);
	while ((rc = db_step(st)) == DB_ROW && *n_r < max) {
		struct job_claimed *c = &out[*n_r];

		c->id = db_column_int64(st, 0);
		if (copy_text(s, st, 1, c->name, sizeof(c->name), "name") ||
		    copy_text(s, st, 2, c->kind, sizeof(c->kind), "kind") ||
		    copy_text(s, st, 3, c->owner, sizeof(c->owner), "owner") ||
		    copy_text(s, st, 4, c->state, sizeof(c->state), "state")) {
			db_finalize(st);
			return -1;
		}
		(*n_r)++;
	}
	db_finalize(st);
	if (rc != DB_ROW && rc != DB_DONE)
		return db_error(s, "job_claim");
	return 0;
}

int ms_store_job_claim(struct ms_store *store, const char *owner,
		       unsigned int lease_ms, unsigned int max, int queued,
		       ms_store_job_cb *cb, void *ctx)
{
	struct job_claimed *c;
	struct db_stmt *st;
	unsigned int n = 0, i;
	int ret;

	if (max == 0)
		return 0;
	if ((c = calloc(max, sizeof(*c))) == NULL)
		return set_error(store, "out of memory");
	if (ms_store_begin(store) < 0) {
		free(c);
		return -1;
	}
	ret = claim_select(store, max, queued, c, &n);
	for (i = 0; ret == 0 && i < n; i++) {
		ret = job_prepare(store, "UPDATE jobs SET state = 'running',"
				  " owner = ?2, lease_until = %s + ?3,"
				  " attempts = attempts + 1, updated_at = %s"
				  " WHERE user_id = ?1", &st, "job_claim");
		if (ret < 0)
			break;
		db_bind_int64(st, 1, c[i].id);
		db_bind_text(st, 2, owner);
		db_bind_int64(st, 3, lease_ms);
		ret = run_once(store, st, "job_claim");
	}
	ret = finish(store, ret);
	/* told after the commit: the callback starts copies */
	for (i = 0; ret == 0 && i < n; i++)
		cb(ctx, c[i].name, c[i].kind, c[i].state, c[i].owner);
	free(c);
	return ret;
}

/* ---- several gateways: the cutover's requests, the gateways' rows
 * (docs/design.md, "Several gateways") ---- */

int ms_store_cutover_request(struct ms_store *store, int64_t user_id,
			     const char *gateway, const char *kind,
			     int64_t *seq_r)
{
	struct db_stmt *st;
	int ret;

	if (ms_store_begin(store) < 0)
		return -1;
	/* A request of the user's before this one: its acknowledgements
	 * were for it, not for this one. */
	ret = exec_user(store, "DELETE FROM cutover_acks WHERE user_id = ?1",
			user_id, "cutover_request");
	if (ret == 0)
		ret = job_prepare(store, "INSERT INTO cutover_requests (user_id,"
				  " seq, gateway, kind, at) VALUES (?1, %s, ?2,"
				  " ?3, %s) ON CONFLICT (user_id) DO UPDATE SET"
				  " seq = excluded.seq, gateway = excluded.gateway,"
				  " kind = excluded.kind, at = excluded.at"
				  " RETURNING seq", &st, "cutover_request");
	if (ret == 0) {
		db_bind_int64(st, 1, user_id);
		db_bind_text(st, 2, gateway);
		db_bind_text(st, 3, kind);
		if (db_step(st) == DB_ROW) {
			*seq_r = db_column_int64(st, 0);
			if (db_step(st) != DB_DONE)
				ret = db_error(store, "cutover_request");
		} else {
			ret = db_error(store, "cutover_request");
		}
		db_finalize(st);
	}
	return finish(store, ret);
}

int ms_store_cutover_clear(struct ms_store *store, int64_t user_id)
{
	return exec_user(store, "DELETE FROM cutover_requests WHERE"
			 " user_id = ?1", user_id, "cutover_clear");
}

int ms_store_gateway_register(struct ms_store *store, const char *name)
{
	struct db_stmt *st;

	if (job_prepare(store, "INSERT INTO gateways (name, started,"
			" heartbeat) VALUES (?1, %s, %s) ON CONFLICT (name) DO"
			" UPDATE SET started = excluded.started, heartbeat ="
			" excluded.heartbeat, sessions = 0, copies = 0", &st,
			"gateway_register") < 0)
		return -1;
	db_bind_text(st, 1, name);
	return run_once(store, st, "gateway_register");
}

int ms_store_gateway_remove(struct ms_store *store, const char *name)
{
	struct db_stmt *st;

	if (prepare(store, "DELETE FROM gateways WHERE name = ?1", &st,
		    "gateway_remove") < 0)
		return -1;
	db_bind_text(st, 1, name);
	return run_once(store, st, "gateway_remove");
}

int ms_store_gateway_joins(struct ms_store *store, const char *name,
			   int64_t *joins_r, int *others_r)
{
	struct db_stmt *st;
	int ret;

	if (store->drv->sqlite_dialect)
		return set_error(store, "gateway_joins: PostgreSQL only");
	if (prepare(store, "SELECT n, (SELECT count(*) FROM gateways WHERE"
		    " name <> ?1) FROM gateway_joins", &st, "gateway_joins") < 0)
		return -1;
	db_bind_text(st, 1, name);
	ret = step_row(store, st, "gateway_joins");
	if (ret == 1) {
		*joins_r = db_column_int64(st, 0);
		*others_r = (int)db_column_int64(st, 1);
		release(st);
	}
	db_finalize(st);
	if (ret == 0)
		return set_error(store, "gateway_joins: no counter");
	return ret < 0 ? -1 : 0;
}

int ms_store_gateway_alone(struct ms_store *store, int64_t joins,
			   int *alone_r)
{
	struct db_stmt *st;
	int ret;

	*alone_r = 0;
	if (store->drv->sqlite_dialect)
		return set_error(store, "gateway_alone: PostgreSQL only");
	if (prepare(store, "SELECT n FROM gateway_joins FOR UPDATE", &st,
		    "gateway_alone") < 0)
		return -1;
	ret = step_row(store, st, "gateway_alone");
	if (ret == 1) {
		*alone_r = db_column_int64(st, 0) == joins;
		release(st);
	}
	db_finalize(st);
	return ret < 0 ? -1 : 0;
}

int ms_store_gateway_foreach(struct ms_store *store, ms_store_gateway_cb *cb,
			     void *ctx)
{
	struct ms_gateway_row g;
	struct db_stmt *st;
	int rc, ret = 0;

	if (job_prepare(store, "SELECT name, started, heartbeat, %s -"
			" heartbeat, sessions, copies FROM gateways ORDER BY"
			" name", &st, "gateways") < 0)
		return -1;
	while ((rc = db_step(st)) == DB_ROW) {
		memset(&g, 0, sizeof(g));
		if (copy_text(store, st, 0, g.name, sizeof(g.name), "name")) {
			db_finalize(st);
			return -1;
		}
		g.started_ms = db_column_int64(st, 1);
		g.heartbeat_ms = db_column_int64(st, 2);
		g.age_ms = db_column_int64(st, 3);
		g.sessions = db_column_int64(st, 4);
		g.copies = db_column_int64(st, 5);
		if ((ret = cb(ctx, &g)) != 0)
			break;
	}
	db_finalize(st);
	if (ret == 0 && rc != DB_DONE)
		return db_error(store, "gateways");
	return ret;
}
