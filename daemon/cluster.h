/* Several gateways on one PostgreSQL store (docs/design.md, "Several
 * gateways"): each gateway's heartbeat in the store's `gateways` table, the
 * store's notifications (LISTEN mailshift) and a periodic reconcile that
 * keep it current with what the others write, and the cutover's
 * acknowledgements. A connection of its own to the database, in libpq's
 * non-blocking mode, its socket watched by the event loop: nothing here
 * ever waits on the database.
 *
 * The cluster knows users by name only and nothing of sessions: it tells
 * the gateway through struct ms_cluster_ops what to do, the gateway asks
 * it whether a login may be routed (ms_cluster_sure, ms_cluster_holds).
 * With an SQLite store (one gateway) there is no cluster.
 */
#ifndef MS_CLUSTER_H
#define MS_CLUSTER_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

struct ms_store;
struct ms_cluster;
struct ms_user_info;
struct ms_user_size;
struct ms_source_use;

struct ms_cluster_ops {
	/* A cutover or rollback of user was asked (by any gateway): the
	 * user's sessions connected to a server end here. Its new logins
	 * are held from now on (ms_cluster_holds) until it is settled. */
	void (*hold)(void *ctx, const char *user);
	/* The user's request is over (flipped, or given up): its held
	 * logins are routed again. */
	void (*settled)(void *ctx, const char *user);
	/* The user's state is now state, as any gateway or mailshiftctl
	 * wrote it: a session here on the other server ends. */
	void (*changed)(void *ctx, const char *user, const char *state);
	/* The run-time policies may have changed. */
	void (*policies)(void *ctx);
	/* Every live gateway has acknowledged this gateway's request for
	 * user (or was fenced): its cutover may go on. */
	void (*acked)(void *ctx, const char *user);
	/* No heartbeat of this gateway's taken for the timeout minus one
	 * heartbeat: the others may fence it soon and move its users
	 * without it. Every session relayed to a server ends here now;
	 * logins are not routed until it has caught up (ms_cluster_sure). */
	void (*fenced)(void *ctx);
	/* This gateway's counts, for its heartbeat. */
	void (*counts)(void *ctx, unsigned int *sessions,
		       unsigned int *copies);
};

struct ms_cluster_cfg {
	const char *url;		/* the store's postgresql:// URL */
	const char *name;		/* [gateway] name */
	unsigned int heartbeat_ms;	/* [gateway] heartbeat */
	unsigned int timeout_ms;	/* [gateway] timeout */
};

/* The jobs' timer's work on this connection rather than the store's
 * blocking one (docs/design.md, "Jobs and leases"). _claim: as
 * ms_store_job_claim() (with queued, the sweep's queue made first, as
 * ms_store_job_enqueue()); claimed hears each job taken, after the
 * commit. _renew: the leases of owner's jobs of users[0..n-1] (n > 0);
 * renewed hears each index, held 0 when the job is no longer owner's.
 * done hears the end exactly once, possibly at once: error NULL, or why
 * nothing was done (nothing renewed or claimed that it knows of). */
typedef void ms_cluster_claimed(void *ctx, const char *user,
				const char *kind, const char *was_state,
				const char *was_owner);
typedef void ms_cluster_renewed(void *ctx, unsigned int i, int held);
typedef void ms_cluster_jobs_done(void *ctx, const char *error,
				  unsigned int n);
void ms_cluster_job_claim(struct ms_cluster *c, const char *owner,
			  unsigned int lease_ms, unsigned int max, int queued,
			  ms_cluster_claimed *claimed,
			  ms_cluster_jobs_done *done, void *ctx);
/* The next user the survey sizes, as ms_store_size_next(): sized hears
 * it ("" when none), or why not, exactly once. */
typedef void ms_cluster_sized(void *ctx, const char *error,
			      const char *user);
void ms_cluster_size_next(struct ms_cluster *c, ms_cluster_sized *sized,
			  void *ctx);
void ms_cluster_job_renew(struct ms_cluster *c, const char *owner,
			  unsigned int lease_ms, const char *const *users,
			  unsigned int n, ms_cluster_renewed *renewed,
			  ms_cluster_jobs_done *done, void *ctx);
/* Writes on this connection, not the loop's to wait on: _size_set as
 * ms_store_size_set() for the user of that name; _source_uses as
 * ms_store_source_use_note() for u[0..n-1] (copied before it returns),
 * in one transaction, a row never set back to an older use. done hears
 * the end exactly once, possibly at once: error NULL when committed. */
typedef void ms_cluster_written(void *ctx, const char *error);
/* The policies' rows, as ms_store_policy_foreach() (row for each, in
 * scope order), then done exactly once (error NULL: all were given). */
void ms_cluster_policies(struct ms_cluster *c,
			 int (*row)(void *ctx, const char *scope,
				    const char *policy),
			 ms_cluster_written *done, void *ctx);
void ms_cluster_size_set(struct ms_cluster *c, const char *user,
			 const struct ms_user_size *sz,
			 ms_cluster_written *done, void *ctx);
void ms_cluster_source_uses(struct ms_cluster *c,
			    const struct ms_source_use *u, size_t n,
			    ms_cluster_written *done, void *ctx);

/* Registers the gateway (a blocking write through store, at start) and
 * starts the connection, the heartbeat and the reconcile. */
int ms_cluster_new(uv_loop_t *loop, struct ms_store *store,
		   const struct ms_cluster_cfg *cfg,
		   const struct ms_cluster_ops *ops, void *ctx,
		   struct ms_cluster **c_r, char *err, size_t errsz);
/* At a clean stop: the gateway's row goes (nobody waits for its
 * acknowledgement), the connection closes. */
void ms_cluster_free(struct ms_cluster **c);

/* Whether this gateway knows what the others wrote: its connection is up,
 * its heartbeat is recent enough that no other gateway has fenced it,
 * and it has caught up since it came back. When not, logins are not
 * routed (held, then a temporary failure). */
int ms_cluster_sure(const struct ms_cluster *c);
/* The thread that ends relays at the deadline when the loop cannot
 * (watchdog.h); NULL when it could not be started. */
struct ms_watchdog *ms_cluster_watchdog(const struct ms_cluster *c);
/* A user the map is sure not to hold (ms_cluster_user() said 0), whose
 * row is written on this connection without waiting (a first login):
 * with a lock timeout of half a heartbeat, tried again each heartbeat
 * until it is in. */
void ms_cluster_user_add(struct ms_cluster *c, const char *name);
/* Whether a cutover or rollback of user is under way (this gateway's or
 * another's): its logins are held. */
int ms_cluster_holds(const struct ms_cluster *c, const char *user);

/* The map (docs/design.md, "Several gateways"): the user's row as the
 * store has it, from memory, kept current by the notifications and the
 * reconcile. 1: info has its id, name, state and policy; 0: the store has
 * no such user; -1: ask the store (this gateway is not sure, the map is
 * not loaded, or the user was written here since it was last read). */
int ms_cluster_user(const struct ms_cluster *c, const char *name,
		    struct ms_user_info *info);

/* This gateway asks for user's cutover (kind "cutover" or "rollback"):
 * written through store, inside the caller's transaction (with the
 * user's state). */
int ms_cluster_request(struct ms_cluster *c, struct ms_store *store,
		       int64_t user_id, const char *user, const char *kind);
/* Whether every live gateway has acknowledged this gateway's request for
 * user; when not yet, ops->acked() says when. */
int ms_cluster_ready(struct ms_cluster *c, const char *user);
/* This gateway ended user's request (its final state written): nothing
 * more is held or awaited here for it. */
void ms_cluster_settle(struct ms_cluster *c, const char *user);

/* ---- pure logic, for the unit tests ---- */

/* "2s", "500ms", "2" (seconds) as ms: 0, or -1 when it is not one. */
int ms_cluster_parse_ms(const char *s, unsigned int *ms_r);
/* [gateway] heartbeat and timeout that go together: NULL, or why not. */
const char *ms_cluster_check(unsigned int heartbeat_ms,
			     unsigned int timeout_ms);
/* Whether a gateway whose last heartbeat that the database took was
 * sent at last_ok (ms, this gateway's clock; 0: none yet) may still
 * count on not being fenced at now: the others fence it timeout after
 * the database wrote that heartbeat, and one heartbeat is kept as a
 * margin. */
int ms_cluster_in_time(uint64_t now, uint64_t last_ok,
		       unsigned int heartbeat_ms, unsigned int timeout_ms);

#endif
