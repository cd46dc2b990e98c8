/* The map and jobs store: per user, per folder and per message copy state.
 *
 * Embedded SQLite in WAL mode (synchronous=NORMAL: a commit survives a kill -9
 * of the process, which is what the mover's exactly-once promise needs), or
 * a PostgreSQL database named by a postgresql:// URL (store_pg.c); the same
 * calls on either.
 * Every function returns 0 on success and -1 on failure; ms_store_error()
 * then says why. Nothing here ever stores a password.
 */
#ifndef MS_STORE_H
#define MS_STORE_H

#include <stddef.h>
#include <stdint.h>

/* The store's schema version (store.c says what each one added). */
#define MS_STORE_SCHEMA_VERSION 12

struct ms_store;

/* target: a SQLite file path or a postgresql:// URL. Creates or upgrades
 * the schema; a store from a newer program is refused. */
int ms_store_open(const char *path, struct ms_store **store_r, char **error_r);
/* As ms_store_open, and the store belongs to the migration named by pair
 * (its source and destination, as text): recorded at the first open,
 * refused with an error when the store holds another one; in the schema's
 * transaction, so a refused open changes nothing. */
int ms_store_open_migration(const char *target, const char *pair,
			    struct ms_store **store_r, char **error_r);
/* As ms_store_open_migration (pair may be NULL), the connection named app
 * where the engine shows names ("mailshift" otherwise). */
int ms_store_open_as(const char *target, const char *pair, const char *app,
		     struct ms_store **store_r, char **error_r);
/* Whether target names a database server (a postgresql:// URL). */
int ms_store_is_url(const char *target);
/* 0 for a postgresql:// URL libpq can read and that holds no password;
 * else -1 and why in err (which never repeats the URL). */
int ms_store_url_check(const char *url, char *err, size_t errsz);
/* The libpq keywords and values a connection to url opens with (bounds
 * on how long a dead server holds a call; application name app), for
 * PQconnectdbParams with expand_dbname: the URL's own values win. */
#define MS_PG_PARAMS 8
/* How long a PostgreSQL store's statement (or reconnection) is waited for
 * before the call fails and its connection is dropped: [store] timeout. */
#define MS_STORE_PG_TIMEOUT_MS 30000
extern unsigned int ms_store_pg_timeout_ms;
void ms_store_pg_params(const char *url, const char *app,
			const char *keys[MS_PG_PARAMS],
			const char *vals[MS_PG_PARAMS]);
void ms_store_close(struct ms_store **store);
const char *ms_store_error(const struct ms_store *store);

/* Explicit transactions (nestable: only the outermost begin/commit count). */
int ms_store_begin(struct ms_store *store);
int ms_store_commit(struct ms_store *store);
int ms_store_rollback(struct ms_store *store);
/* After a call that failed outside any transaction of the caller's: what
 * the engine still holds open (a statement the lost connection cut short)
 * is rolled back, so that the next call may connect again. */
void ms_store_settle(struct ms_store *store);

/* A user's state (docs/design.md, "A user's life"). Its name, in the
 * store, the control socket's replies and the metrics, is the one in
 * ms_user_state_names; a new user starts in source. */
enum ms_user_state {
	MS_USER_SOURCE,
	MS_USER_COPYING,
	MS_USER_CUTOVER,
	MS_USER_DESTINATION,
	MS_USER_FAILED,
	MS_USER_NSTATES
};
extern const char *const ms_user_state_names[MS_USER_NSTATES];
/* The state s names, or -1. */
int ms_user_state_parse(const char *s);

/* Users. state is one of ms_user_state_names. */
int ms_store_user_get(struct ms_store *store, const char *name,
		      int64_t *user_id_r);	/* creates it when missing */
int ms_store_user_set_state(struct ms_store *store, int64_t user_id,
			    const char *state, const char *last_error);
/* Adds to the user's running totals of copied messages and bytes. */
int ms_store_user_add_progress(struct ms_store *store, int64_t user_id,
			       uint64_t msgs, uint64_t bytes);

struct ms_user_info {
	int64_t id;
	char name[256];
	char state[16];
	char policy[16];		/* "" = the configured default */
	char last_error[512];
	uint64_t msgs, bytes;		/* copied so far */
	int64_t updated_at;
};

/* Whether u is in state st. */
int ms_user_in(const struct ms_user_info *u, enum ms_user_state st);

/* Called before each write of a user's state or policy through store
 * (user_id 0: a user is added): a copy of the users table kept elsewhere
 * (cluster.c's map) asks the store about that user until it has read the
 * change back. */
typedef void ms_store_user_write_cb(void *ctx, int64_t user_id);
/* Whether a transaction (ms_store_begin) is open. */
int ms_store_in_transaction(const struct ms_store *store);
/* Inside a transaction: a statement that waits longer than ms for a lock
 * (a table another connection holds) fails, until the transaction ends
 * (PostgreSQL's lock_timeout; SQLite has one writer, and its busy timeout
 * bounds the wait: nothing to do). ms_store_refusal() tells that
 * failure. */
int ms_store_lock_wait(struct ms_store *store, unsigned int ms);
/* What to tell an operator whose change failed (and was rolled back):
 * "store busy: ..." for a lock waited for in vain, else "store: ERROR". */
void ms_store_refusal(const struct ms_store *store, char *buf, size_t n);
void ms_store_on_user_write(struct ms_store *store, ms_store_user_write_cb *cb,
			    void *ctx);

/* Looks a user up without creating it: 0 and *found_r = 0/1. */
int ms_store_user_info(struct ms_store *store, const char *name,
		       struct ms_user_info *info_r, int *found_r);
/* Every user in name order; a non-zero return from cb stops the walk. */
typedef int ms_store_user_cb(void *ctx, const struct ms_user_info *info);
int ms_store_user_foreach(struct ms_store *store, ms_store_user_cb *cb,
			  void *ctx);
/* "passthrough", "hold", "off", or NULL/"" for the configured default. */
int ms_store_user_set_policy(struct ms_store *store, int64_t user_id,
			     const char *policy);

/* Policies set at run time, overriding the config file's: scope "" is the
 * default, otherwise a domain. policy NULL removes the override. */
int ms_store_policy_set(struct ms_store *store, const char *scope,
			const char *policy);
typedef int ms_store_policy_cb(void *ctx, const char *scope,
			       const char *policy);
int ms_store_policy_foreach(struct ms_store *store, ms_store_policy_cb *cb,
			    void *ctx);

/* Folders: one row per (user, source folder name). */
struct ms_folder_state {
	int64_t id;
	int64_t user_id;
	char src_name[1024];		/* source name, mUTF-7, source separator */
	char dst_name[1024];		/* destination name, as created there */
	uint32_t src_uidvalidity;	/* 0 = never seen */
	uint32_t dst_uidvalidity;	/* 0 = never seen */
	uint32_t hwm;			/* every source UID <= hwm is done */
	uint64_t modseq;		/* source HIGHESTMODSEQ of the last
					   complete flag sync, 0 = none */
	uint64_t msgs;			/* messages recorded done */
	uint64_t bytes;			/* their RFC822.SIZE sum */
};

/* Loads the folder's row, creating a zeroed one when missing. */
int ms_store_folder_get(struct ms_store *store, int64_t user_id,
			const char *src_name, struct ms_folder_state *st_r);
/* Writes back every field but id/user_id/src_name. */
int ms_store_folder_update(struct ms_store *store,
			   const struct ms_folder_state *st);
/* Forgets every message and rollback intent of the folder (UIDVALIDITY
 * changed) and zeroes uidvalidities, hwm, modseq, msgs and bytes. */
int ms_store_folder_reset(struct ms_store *store, int64_t folder_id);
/* The user's row whose destination folder is dst_name (case-insensitive;
 * the newest when several are), without creating one: 0 and *found_r. */
int ms_store_folder_find_dst(struct ms_store *store, int64_t user_id,
			     const char *dst_name, struct ms_folder_state *st_r,
			     int *found_r);
/* Every folder row of the user in source-name order; a non-zero return
 * from cb stops the walk and is returned. */
typedef int ms_store_folder_cb(void *ctx, const struct ms_folder_state *st);
int ms_store_folder_foreach(struct ms_store *store, int64_t user_id,
			    ms_store_folder_cb *cb, void *ctx);

/* Folder identity: whether the destination folder has the source's
 * UIDVALIDITY and every copied message the source's UID (docs/mover.md,
 * "Identity"). MS_ID_NONE: never tried (no row). MS_ID_LOST: the gateway
 * must translate this folder's UIDs; reason says why. */
enum { MS_ID_NONE = 0, MS_ID_KEPT = 1, MS_ID_LOST = 2 };
int ms_store_identity_get(struct ms_store *store, int64_t folder_id,
			  int *state_r);
int ms_store_identity_set(struct ms_store *store, int64_t folder_id,
			  int state, const char *reason);
/* Who needs the gateway's IMAP view: users with a folder whose identity
 * was not kept or a folder the move renamed; the users and folders not
 * kept; the folders renamed. */
struct ms_view_count {
	uint64_t users;
	uint64_t lost_users, lost_folders;
	uint64_t renamed_folders;
};
int ms_store_view_count(struct ms_store *store, struct ms_view_count *c);

/* Folders the move renamed (names = destination; docs/gateway-spec.md,
 * "Old folder names"): old_name the name the user's clients knew, as the
 * destination has names kept, sep the destination's separator ('\0':
 * none). old_name NULL: the folder was not renamed (the row goes). */
int ms_store_rename_set(struct ms_store *store, int64_t folder_id,
			const char *old_name, char sep);
/* The user's renamed folders that were copied: old name, destination name,
 * separator. A non-zero return from cb stops the walk and is returned. */
typedef int ms_store_rename_cb(void *ctx, const char *old_name,
			       const char *dst_name, char sep);
int ms_store_rename_foreach(struct ms_store *store, int64_t user_id,
			    ms_store_rename_cb *cb, void *ctx);

/* A user's personal namespaces as the mover found them: prefix ("" for
 * none) and separator ('\0' for none) of each side. The gateway's IMAP
 * view shows the source's to the user's clients (docs/gateway-spec.md, "A
 * source with a namespace prefix"). */
struct ms_user_ns {
	char src_prefix[64], dst_prefix[64];
	char src_sep, dst_sep;
};
int ms_store_namespace_set(struct ms_store *store, int64_t user_id,
			   const struct ms_user_ns *ns);
/* found_r 0 (ns zeroed): never recorded (a user copied before schema 11,
 * or a POP3 source). */
int ms_store_namespace_get(struct ms_store *store, int64_t user_id,
			   struct ms_user_ns *ns, int *found_r);

/* Messages. An intent (state MS_MSG_INTENT) is written and committed before
 * the message's bytes leave for the destination; it becomes MS_MSG_DONE with
 * the destination UID (0 when the server has no UIDPLUS) once the server
 * accepted it. */
enum { MS_MSG_INTENT = 0, MS_MSG_DONE = 1 };

struct ms_msg_rec {
	uint32_t src_uid;		/* IMAP source UID (0 for POP3) */
	int state;			/* MS_MSG_INTENT or MS_MSG_DONE */
	uint64_t size;			/* RFC822.SIZE */
	int64_t date;			/* INTERNALDATE as epoch seconds */
	char msgid[512];		/* Message-ID header value, "" if none */
	char flags[1024];		/* flags and keywords, space-separated,
					   sorted, without \Recent */
	uint32_t dst_uid;		/* 0 = unknown */
	uint32_t dst_floor;		/* destination UIDNEXT when the intent
					   was written: the message, if it got
					   there, has a UID >= this (for a
					   rollback intent: the source's) */
	char uidl[128];			/* POP3 source: the UIDL; else "" */
};

/* Insert or replace the record for (folder, src_uid) or, for POP3 folders
 * (src_uid == 0), for (folder, uidl). */
int ms_store_msg_put(struct ms_store *store, int64_t folder_id,
		     const struct ms_msg_rec *rec);
/* Loads one record; returns 0 and *found_r = 0/1. */
int ms_store_msg_get(struct ms_store *store, int64_t folder_id,
		     uint32_t src_uid, struct ms_msg_rec *rec_r, int *found_r);
int ms_store_msg_get_uidl(struct ms_store *store, int64_t folder_id,
			  const char *uidl, struct ms_msg_rec *rec_r,
			  int *found_r);
/* The done record of the message the mover copied to destination UID
 * dst_uid (> 0) in the folder: one indexed lookup. */
int ms_store_msg_get_dst(struct ms_store *store, int64_t folder_id,
			 uint32_t dst_uid, struct ms_msg_rec *rec_r,
			 int *found_r);
/* Marks (folder, src_uid) done with its destination UID and flags. */
int ms_store_msg_done(struct ms_store *store, int64_t folder_id,
		      uint32_t src_uid, uint32_t dst_uid, const char *flags);
int ms_store_msg_set_flags(struct ms_store *store, int64_t folder_id,
			   uint32_t src_uid, const char *flags);
/* Deletes one record (src_uid, or uidl when src_uid == 0). */
int ms_store_msg_delete(struct ms_store *store, int64_t folder_id,
			uint32_t src_uid, const char *uidl);

/* Calls cb for every record of the folder in source-UID order (then UIDL
 * order), or only those in `state` when state >= 0. A non-zero return from
 * cb stops the walk and is returned. */
typedef int ms_store_msg_cb(void *ctx, const struct ms_msg_rec *rec);
int ms_store_msg_foreach(struct ms_store *store, int64_t folder_id, int state,
			 ms_store_msg_cb *cb, void *ctx);
/* Number of records of the folder in `state` (or all when state < 0). */
int ms_store_msg_count(struct ms_store *store, int64_t folder_id, int state,
		       uint64_t *count_r);

/* Rollback intents (docs/mover.md, "Rollback"): a destination message about
 * to be appended to the source, written and committed before its bytes
 * leave, deleted in the transaction that records it done under the source
 * UID it got. They travel as struct ms_msg_rec: dst_uid is the key, src_uid
 * is 0 (not known yet), state MS_MSG_INTENT, uidl "", and dst_floor holds
 * the *source's* UIDNEXT when the intent was written. Put replaces. */
int ms_store_rintent_put(struct ms_store *store, int64_t folder_id,
			 const struct ms_msg_rec *rec);
int ms_store_rintent_delete(struct ms_store *store, int64_t folder_id,
			    uint32_t dst_uid);
/* In destination-UID order; the callback may write to the store (as for
 * ms_store_msg_foreach). */
int ms_store_rintent_foreach(struct ms_store *store, int64_t folder_id,
			     ms_store_msg_cb *cb, void *ctx);
int ms_store_rintent_count(struct ms_store *store, int64_t folder_id,
			   uint64_t *count_r);

/* Retirement of the source (mailshiftctl retire). */
struct ms_source_use {
	char key[256];			/* the user, or "*": a name the map
					   does not know */
	char kind[16];			/* "session" (IMAP, POP3),
					   "submission", "mail" */
	char name[512];			/* the name given (the last one for
					   "*") */
	int64_t at;			/* when it was written */
	int64_t slack;			/* later uses of the same key and kind,
					   up to at + slack, were not written */
};

/* Replaces the (key, kind) row. */
int ms_store_source_use_note(struct ms_store *store,
			     const struct ms_source_use *u);
/* The rows with at + slack >= since, newest first. */
typedef int ms_store_source_use_cb(void *ctx, const struct ms_source_use *u);
int ms_store_source_use_foreach(struct ms_store *store, int64_t since,
				ms_store_source_use_cb *cb, void *ctx);
/* When the user's first copy began and when the user last went to the
 * destination (epoch seconds, 0 = not recorded: a store older than
 * schema 4 or a user never moved). */
int ms_store_user_moves(struct ms_store *store, int64_t user_id,
			int64_t *first_copy_r, int64_t *moved_r);

struct ms_retirement {
	int64_t at;
	unsigned int uid;		/* who ran retire --apply */
	int forced;			/* --force over a failed check */
	char *record;			/* JSON text: the check it rested on
					   (malloc'd by _get; never a password) */
};
int ms_store_retirement_add(struct ms_store *store,
			    const struct ms_retirement *r);
/* The latest: 0 and *found_r = 0/1 (r->record then to be freed). */
int ms_store_retirement_get(struct ms_store *store, struct ms_retirement *r,
			    int *found_r);

/* Copies every row of every table of from into to (mailshiftctl store
 * copy), in one transaction on to and from one snapshot of from. A target
 * holding any row is refused unless replace, which empties it first (in
 * the same transaction). cb, when not NULL, hears each table's row count.
 * On failure to is as it was and ms_store_error(to) says why. */
typedef void ms_store_copy_cb(void *ctx, const char *table, uint64_t rows);
int ms_store_copy(struct ms_store *from, struct ms_store *to, int replace,
		  ms_store_copy_cb *cb, void *ctx);
/* The survey of the source's mailbox sizes (daemon/survey.c), for the
 * site's ETA: per user, what the source said of its mailbox. how:
 * "status-size" (STATUS SIZE, RFC 8438: messages and bytes exact),
 * "quota" (STATUS MESSAGES, bytes from GETQUOTAROOT's STORAGE),
 * "messages" (STATUS MESSAGES only: bytes -1), "failed" (both -1). */
struct ms_user_size {
	int64_t messages, bytes;	/* -1: not known */
	char how[16];
	int64_t at;			/* when (epoch seconds; 0 in _set: now) */
};

/* Replaces the user's row. */
int ms_store_size_set(struct ms_store *store, int64_t user_id,
		      const struct ms_user_size *sz);
/* The survey's next user (ms_store_size_next), also asked on the
 * cluster's connection. */
#define MS_SIZE_NEXT_SQL "SELECT name FROM users WHERE state IN" \
	" ('source', 'copying', 'failed') AND coalesce(policy, '') != 'off'" \
	" AND id NOT IN (SELECT user_id FROM user_sizes) ORDER BY name" \
	" LIMIT 1"

/* The first user by name the survey has not been to, among those still
 * to move (source, copying, failed; not policy off): 0 and *found_r. */
int ms_store_size_next(struct ms_store *store, char *name, size_t namesz,
		       int *found_r);
/* Every user in name order with its size (how "" and -1s: none yet); a
 * non-zero return from cb stops the walk and is returned. */
typedef int ms_store_size_cb(void *ctx, const struct ms_user_info *u,
			     const struct ms_user_size *sz);
int ms_store_size_foreach(struct ms_store *store, ms_store_size_cb *cb,
			  void *ctx);

/* The source's UIDNEXT at the folder's last copy pass, which the gateway's
 * IMAP view numbers new mail above (docs/gateway-spec.md, "The IMAP
 * view"); 0 when never recorded. */
int ms_store_src_next_set(struct ms_store *store, int64_t folder_id,
			  uint32_t uidnext);
int ms_store_src_next_get(struct ms_store *store, int64_t folder_id,
			  uint32_t *uidnext_r);

/* Jobs (docs/design.md, "Jobs and leases"): one row per user, the user's
 * copy (or rollback) as work any gateway may take. A job is "running" for
 * its owner (a gateway's [gateway] name) until its lease expires, counted
 * in ms on the database's clock; the owner renews it while it works.
 * _take: the user's job for owner, when no other owner holds a lease that
 * has not expired (*taken_r 0/1; the user is made when missing). */
int ms_store_job_take(struct ms_store *store, const char *user,
		      const char *kind, const char *owner,
		      unsigned int lease_ms, int *taken_r);
/* The lease again from now; *held_r 0: owner no longer holds it. */
int ms_store_job_renew(struct ms_store *store, const char *user,
		       const char *owner, unsigned int lease_ms, int *held_r);
/* The job ends in state ("done", "failed" or "queued", with error), if
 * owner still holds it (*held_r): inside a caller's transaction, so that
 * the user's new state is written only with it. */
int ms_store_job_end(struct ms_store *store, int64_t user_id,
		     const char *owner, const char *state, const char *error,
		     int *held_r);
/* The sweep: a queued job for every user still to move (source, copying;
 * not policy off) whose job is missing, done or failed. Its two
 * statements, each %s the engine's "now" (the cluster's claim runs them
 * too). */
#define MS_JOB_ENQUEUE_NEW "INSERT INTO jobs (user_id, kind, state," \
	" updated_at) SELECT id, 'sweep', 'queued', %s FROM users WHERE" \
	" state IN ('source', 'copying') AND coalesce(policy, '') != 'off'" \
	" AND id NOT IN (SELECT user_id FROM jobs) ON CONFLICT DO NOTHING"
#define MS_JOB_ENQUEUE_AGAIN "UPDATE jobs SET kind = 'sweep', state =" \
	" 'queued', updated_at = %s WHERE state IN ('done', 'failed') AND" \
	" user_id IN (SELECT id FROM users WHERE state IN ('source'," \
	" 'copying') AND coalesce(policy, '') != 'off')"
int ms_store_job_enqueue(struct ms_store *store);
/* Takes up to max jobs for owner, in user-name order: running ones whose
 * lease expired, and queued ones too when queued. cb hears each after
 * the commit, with the job's kind, state and owner before the claim. */
typedef void ms_store_job_cb(void *ctx, const char *user, const char *kind,
			     const char *was_state, const char *was_owner);
int ms_store_job_claim(struct ms_store *store, const char *owner,
		       unsigned int lease_ms, unsigned int max, int queued,
		       ms_store_job_cb *cb, void *ctx);

/* Several gateways on one store (docs/design.md, "Several gateways").
 * _request: the user's cutover (kind "cutover" or "rollback") asked by
 * gateway, replacing an earlier one and its acknowledgements; *seq_r
 * tells it apart. A final state of the user's (ms_store_user_set_state:
 * destination, source, failed) clears it in the same transaction, as
 * _clear does. */
int ms_store_cutover_request(struct ms_store *store, int64_t user_id,
			     const char *gateway, const char *kind,
			     int64_t *seq_r);
int ms_store_cutover_clear(struct ms_store *store, int64_t user_id);
/* The gateway's row, (re)started now; removed at a clean stop. */
int ms_store_gateway_register(struct ms_store *store, const char *name);
int ms_store_gateway_remove(struct ms_store *store, const char *name);
/* A flip without a cutover (PostgreSQL): _joins, as the user's copy
 * begins, reads the count of gateways' rows ever inserted (the store's
 * trigger counts them) and how many rows other than name's there are;
 * _alone, inside the flip's transaction, locks that count until the
 * commit (a gateway's start waits for it) and says whether it is still
 * joins: no other gateway came (or came and went) since. */
int ms_store_gateway_joins(struct ms_store *store, const char *name,
			   int64_t *joins_r, int *others_r);
int ms_store_gateway_alone(struct ms_store *store, int64_t joins,
			   int *alone_r);
struct ms_gateway_row {
	char name[128];
	int64_t started_ms, heartbeat_ms;	/* the database's clock */
	int64_t age_ms;			/* since the last heartbeat */
	int64_t sessions, copies;	/* as of that heartbeat */
};
/* Every gateway's row, by name; a non-zero return from cb stops. */
typedef int ms_store_gateway_cb(void *ctx, const struct ms_gateway_row *g);
int ms_store_gateway_foreach(struct ms_store *store, ms_store_gateway_cb *cb,
			     void *ctx);

#endif
