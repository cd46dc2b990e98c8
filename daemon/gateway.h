/* The gateway, as the daemon and its control socket see it: listeners for
 * IMAP, POP3, inbound SMTP and submission whose sessions go to the server
 * that holds each user's mail, and each user's life (copy on first login,
 * flip when verified, rollback). See docs/gateway-spec.md and
 * docs/design.md. The protocol front ends do not use this header: they see
 * the gateway through gw_route.h only. */
#ifndef MS_GATEWAY_H
#define MS_GATEWAY_H

#include <jansson.h>
#include <uv.h>

#include "caps.h"
#include "gw_config.h"
#include "mover.h"
#include "store.h"
#include "util.h"

struct ms_gateway;

int ms_gateway_new(uv_loop_t *loop, const struct ms_gw_config *cfg,
		   struct ms_store *store, struct ms_gateway **gw_r,
		   char *err, size_t errsz);
/* Closes the listeners and every session. */
void ms_gateway_free(struct ms_gateway **gw);
/* The store's reads a session makes on its way to the destination go to
 * r (reader.h), off the loop; without one they are made on the loop. */
struct ms_reader;
void ms_gateway_set_reader(struct ms_gateway *gw, struct ms_reader *r);
struct ms_reader *ms_gateway_reader(struct ms_gateway *gw);

/* A clean stop's first step: the listeners are closed, so nothing more is
 * accepted (with inherited sockets, new connections wait in the kernel for
 * the next mailshiftd), while connections already accepted are still
 * greeted on the loop's next turn. */
void ms_gateway_stop_listening(struct ms_gateway *gw);

/* For the control socket. */
/* Every front end's sessions (docs/gateway-spec.md, "sessions"). */
json_t *ms_gateway_sessions(struct ms_gateway *gw);
/* Every gateway on the store (several on one PostgreSQL store, each with
 * its heartbeat's age, sessions, copies, and whether it is live): [] with
 * SQLite, NULL when the store fails. */
json_t *ms_gateway_cluster_json(struct ms_gateway *gw);
/* The same in two steps, for a read off the loop: the rows (any thread
 * with a store of its own; -1: ms_store_error()), then the array (the
 * rows only read when ms_gateway_clustered()). */
struct ms_gateway_row;
struct ms_gateway_rows {
	struct ms_gateway_row *v;
	size_t n, cap;
};
int ms_gateway_clustered(const struct ms_gateway *gw);
int ms_gateway_rows_read(struct ms_store *store, struct ms_gateway_rows *rows);
json_t *ms_gateway_rows_json(struct ms_gateway *gw,
			     const struct ms_gateway_rows *rows);
void ms_gateway_rows_free(struct ms_gateway_rows *rows);
/* {"default": P, "domains": {D: P}, "hold_max_seconds": N, "set": {S: P}}
 * ("set": what was set at run time; scope "" = the default). */
json_t *ms_gateway_policies(struct ms_gateway *gw);
/* Sets the default policy (domain NULL) or a domain's, kept in the store
 * and applied to logins from now on; policy NULL: back to the config
 * file's. Returns 0, or -1 with err filled. */
int ms_gateway_set_policy(struct ms_gateway *gw, const char *domain,
			  const char *policy, char *err, size_t errsz);
/* The sessions that hold a mailbox open (IMAP, POP3: the ones a cutover
 * waits for and ends). */
unsigned int ms_gateway_nsessions(struct ms_gateway *gw);
/* What the gateway is doing for the user now: "copying", "last delta",
 * "verified, flips at log-off", or "". */
const char *ms_gateway_user_copy(struct ms_gateway *gw, const char *user);
/* Sends a user on the destination back to the source (docs/mover.md,
 * "Rollback"): logins held, sessions ended, mail deferred, the reverse
 * delta, verified, state source. Needs admin logins. A failed rollback
 * leaves the user on the destination with the error. */
int ms_gateway_rollback(struct ms_gateway *gw, const char *user,
			const char **error_r);
unsigned int ms_gateway_user_sessions(struct ms_gateway *gw, const char *user);
/* Ends every session of the user, of every front end (IMAP: BYE; SMTP
 * submission: 421). Returns how many. */
int ms_gateway_kick(struct ms_gateway *gw, const char *user);
/* How long an operator's change (user add/set, a policy) waits for a
 * table's lock before it is refused with nothing changed (PostgreSQL):
 * half a heartbeat, as the cluster's own writes (the gateway's loop, and
 * its sessions, wait as long; the heartbeat is taken in between). */
unsigned int ms_gateway_change_lock_ms(const struct ms_gateway *gw);

/* Moves the user now: copy, verify, end the user's sessions (BYE), last
 * delta, flip. Needs admin logins (or a login of the user since start).
 * 0 when it goes on (here, or on the gateway that has the user's job); 1
 * when the user is already on the destination, -1 when it cannot: both
 * with *error_r set. */
int ms_gateway_migrate(struct ms_gateway *gw, const char *user,
		       const char **error_r);
void ms_gateway_progress(struct ms_gateway *gw, struct ms_progress *p);
/* The site's ETA, status's "site" object (site_eta.h); NULL when the store
 * fails. In three steps for a read off the loop: the policies copied
 * (NULL: out of memory; free() it), the sizes read (any thread with a
 * store of its own; -1: ms_store_error()), the object made. */
json_t *ms_gateway_site(struct ms_gateway *gw);
struct ms_site_read;
struct ms_site_read *ms_gateway_site_prepare(struct ms_gateway *gw);
int ms_site_read(struct ms_store *store, struct ms_site_read *sr);
json_t *ms_gateway_site_json(struct ms_gateway *gw,
			     const struct ms_site_read *sr);
/* What the servers offer and what is advertised (caps.h). */
json_t *ms_gateway_caps_json(struct ms_gateway *gw);
/* The mover's caps and how it stands with them (ms_mover_pace()):
 * {"connections", "connections_open": {"source", "destination"},
 * "connections_waiting", "commands_per_second", "pace", "backing_off",
 * "source_commands", "backoffs", "backoff_reason"}; null without a mover. */
json_t *ms_gateway_mover_json(struct ms_gateway *gw);
/* Changes the mover's caps while it runs (ms_mover_set_limits()):
 * connections 0 and commands_per_second < 0 leave that one as it is. Kept
 * until mailshiftd stops. Returns 0, or -1 with err filled. */
int ms_gateway_set_limits(struct ms_gateway *gw, unsigned int connections,
			  double commands_per_second, char *err, size_t errsz);

#endif
