/* Retiring the source: the [retire] section of mailshift.conf, and the
 * gateway's record of what it still sends to the source (a session, a
 * submission, a message), kept in the store for mailshiftctl retire. See
 * docs/deployment.md, "Retiring the source", and mailshift.conf(5). */
#ifndef MS_RETIRE_H
#define MS_RETIRE_H

#include <stddef.h>
#include <uv.h>

#include "store.h"

struct ms_retire_cfg {
	unsigned int quiet_period;	/* seconds without a use of the source
					   before it may be retired */
	unsigned int record_interval;	/* the gateway writes a user's use at
					   most this often (seconds) */
};

void ms_retire_defaults(struct ms_retire_cfg *r);
/* One key of [retire]; 0 or -1 with err. */
int ms_retire_key(struct ms_retire_cfg *r, const char *key, const char *value,
		  char *err, size_t errsz);
/* "90", "90s", "15m", "24h", "7d" into seconds (at most 400 days). */
int ms_parse_duration(const char *s, unsigned int *secs_r);

/* The gateway's side, one per process (like the log): where to write.
 * Uses are written by a timer on loop, a second's worth in one
 * transaction (loop NULL: each when it happens); ms_retire_stop() writes what waits and closes the timer
 * (before the loop's last run). */
void ms_retire_init(uv_loop_t *loop, struct ms_store *store,
		    const struct ms_retire_cfg *r);
void ms_retire_stop(void);
/* Where the uses waiting go instead of the store's connection (several
 * gateways: the cluster's, which holds no loop; NULL: back to the store).
 * cb takes u[0..n-1] (the array stays until done) and calls done exactly
 * once, error NULL when they are in; until then no other batch is sent,
 * and a batch not taken waits for the next one. */
typedef void ms_retire_done_cb(void *ctx, const char *error);
typedef void ms_retire_write_cb(void *ctx, const struct ms_source_use *u,
				size_t n, ms_retire_done_cb *done,
				void *done_ctx);
void ms_retire_set_writer(ms_retire_write_cb *cb, void *ctx);
/* The gateway sends something of name's to the source now: kind
 * "session" (an IMAP or POP3 login), "submission" or "mail" (a
 * recipient). Written under the user's map name, or "*" for a name the map
 * does not know; at most once per record_interval per user and kind. */
void ms_retire_note(const char *kind, const char *name);
/* Where the map's names are looked up first (several gateways: the map in
 * memory, cluster.h): 1 known, 0 not, -1 ask the store. NULL: the store
 * alone. */
typedef int ms_retire_known_cb(void *ctx, const char *name);
void ms_retire_set_known(ms_retire_known_cb *cb, void *ctx);

#endif
