/* What the gateway's own files share: struct ms_gateway, a session
 * (struct session: IMAP and POP3 alike), a user (struct guser), and the
 * functions these files call in each other. For gateway.c, gw_session.c,
 * gw_imap.c, gw_imap_view.c, gw_pop3.c, lifecycle.c, gw_admit.c and metrics.c only: the
 * daemon sees gateway.h, the SMTP front end gw_route.h, never this.
 */
#ifndef MS_GW_INTERNAL_H
#define MS_GW_INTERNAL_H

#include <stdint.h>
#include <time.h>

#include <jansson.h>
#include <uv.h>

#include "caps.h"
#include "gateway.h"
#include "gw_login.h"
#include "gw_route.h"
#include "log.h"
#include "mover.h"
#include "net.h"
#include "reader.h"
#include "site_eta.h"
#include "store.h"
#include "survey.h"

#define GW_INBUF_MAX 8192	/* pre-login command line, literals
				   included; more buffered than this:
				   not read */
/* An IMAP ID command line (RFC 2971: up to 30 field-value pairs, fields of
 * 30 octets, values of 1024: 31,809 bytes with a tag of two) is let grow to
 * this, its CRLF included; every other line stops at GW_INBUF_MAX. */
#define GW_ID_LINE_MAX (32 * 1024)
/* What may be buffered at all: the longest line, then one read (net.c
 * reads at most 64 KiB at a time) before reading stops. */
#define GW_INBUF_HARD (GW_ID_LINE_MAX + 64 * 1024 + 16 * 1024)
#define GW_ARG_MAX 8
#define GW_LITERAL_MAX 4096	/* a pre-login literal (user, password) */
#define GW_BAD_MAX 10		/* bad pre-login commands: we hang up */
#define INPROGRESS_MS (10 * 1000)
#define USER_BUCKETS 1024

enum gw_sstate {
	SS_PRELOGIN,
	SS_AUTH_PLAIN,		/* waiting for the SASL PLAIN response */
	SS_AUTH_USER,		/* AUTHENTICATE LOGIN: waiting for the name */
	SS_AUTH_PASS,		/* ... and the password */
	SS_STARTTLS,
	SS_BACKEND,		/* connecting and logging in at the server */
	SS_HELD,		/* waiting for the user's flip */
	SS_HELD_PENALTY,	/* a failed login's reply, delayed */
	SS_RELAY,
	SS_CLOSING,
};

enum gw_bstate { BS_GREETING, BS_STARTTLS, BS_LOGIN, BS_LOGIN_CONT };

struct guser;
struct session;

/* What differs between IMAP and POP3 in a session: the session code
 * reaches the protocol through this table, never by name. */
struct gw_proto {
	/* The greeting, once the client is connected. */
	void (*greet)(struct session *s);
	/* Works through the pre-login commands buffered in s->in. */
	void (*process)(struct session *s);
	/* Sends the login (SASL PLAIN) to the greeted server; -1 when out
	 * of memory. */
	int (*send_login)(struct session *s);
	/* A line of the server's during login: see backend_line(). */
	int (*backend_line)(struct session *s, char *line);
	/* The relay's filter (POP3 UIDLs, the IMAP view), when
	 * gw_filtered(): the client's bytes seen (POP3) or passed on by the
	 * filter itself (IMAP: relay_client_out, -1 ends the session), the
	 * server's passed on. */
	void (*relay_client)(struct session *s, const char *data, size_t len);
	int (*relay_client_out)(struct session *s, const char *data,
				size_t len);
	int (*relay_server)(struct session *s, const char *data, size_t len);
	void (*relay_free)(struct session *s);
	/* Before a login to the destination: what the filter will need,
	 * read off the loop (gw_read()); then gw_backend_go(). */
	void (*relay_load)(struct session *s);
};

struct session {
	struct session *next, *prev;
	struct ms_gateway *gw;
	uint64_t id;
	enum ms_gw_proto proto;
	const struct gw_proto *pr;	/* proto's table */
	enum gw_sstate st;
	struct ms_conn *c, *b;
	int tls;			/* client side is TLS now */
	char peer[64], local[64];
	uint16_t peer_port, local_port;
	time_t since;

	/* pre-login input */
	char *in;
	size_t inlen, incap;
	int processing;			/* in gw_prelogin_process() */
	unsigned int ncmds;		/* commands before login */
	uint64_t born_ms;		/* uv_now() at accept */
	char *argv[GW_ARG_MAX];
	unsigned int argc;
	size_t lit_need;		/* literal bytes still to come */
	int id_line;			/* the command read is an IMAP ID: its
					   line may be GW_ID_LINE_MAX long */
	unsigned int bad;
	char tag[256];

	struct ms_login login;		/* captured (wiped when done with) */
	const char *mech;		/* how the client logged in, for the
					   log: "imap-login", "pop3-user",
					   "sasl-plain", "sasl-login" */
	int logged_in;			/* a server took the login: the end
					   of the session is logged */
	uint64_t bytes_in, bytes_out;	/* relayed from / to the client */

	/* backend */
	enum gw_bstate bst;
	const struct ms_server_cfg *server;
	int to_dst;
	int verify_only;		/* hold: check the password, then wait */
	char *bin;
	size_t binlen;
	int b_sasl_ir;
	int b_xclient;			/* POP3: XCLIENT offered in the greeting;
					   then: its answer still due */
	int counted;			/* counted in gu->sessions */
	unsigned int wd_slot;		/* relaying: the cluster's watchdog's */

	struct guser *gu;
	uv_timer_t timer;		/* one at a time; its close frees us */
	int admitted;			/* counted by ms_gw_admit() */
	uint64_t held_since;
	int unsure;			/* held: the user's state cannot be
					   known now (the store, the other
					   gateways), since unsure_since */
	uint64_t unsure_since;
	int c_paused, b_paused;		/* MS_PAUSE_* bits (gw_login.h) */
	char *penalty_reply;
	/* POP3 to the destination, of a user whose INBOX was copied: the
	 * source's UIDLs put back (NULL for every other session) */
	struct uidl_relay *ur;
	/* IMAP to the destination, of a user with a folder that did not
	 * keep its identity or was renamed: the source's view
	 * (gw_imap_view.c; NULL for every other session) */
	struct imap_view_relay *iv;
	struct ms_read *rd;		/* the store's reader at work for us */
};

/* The relay passes the session's bytes through its filter (POP3 UIDLs,
 * the IMAP view). */
static inline int gw_filtered(const struct session *s)
{
	return s->ur != NULL || s->iv != NULL;
}

/* How many bytes the command line being read may have. */
static inline size_t gw_line_max(const struct session *s)
{
	return s->id_line ? GW_ID_LINE_MAX : GW_INBUF_MAX;
}

struct guser {
	struct guser *next;
	char name[256];
	unsigned int sessions;
	int copying;			/* a mover job runs for the user */
	int cutover;			/* the running job is the last delta */
	int flip_pending;		/* verified; flip at the last log-off */
	int touched;			/* a session used the source while the
					   copy ran: a last delta is needed */
	int force;			/* the operator asked: end the user's
					   sessions (BYE) once verified */
	int resume;			/* gw_recover(): copy interrupted by a
					   crash, to be started again */
	int rollback;			/* the cutover runs back to the source */
	int logged_state;		/* the state -v said last, + 1 (0:
					   none yet) */
	char *pw;			/* captured password, for the copies */
	uv_timer_t *grace;		/* cutover: waiting before the delta */
	uv_timer_t *quiet;		/* verified: waiting for flip_quiet
					   without a session to the source */
	uint64_t idle_since;		/* uv_now() when its last session to
					   a server ended (0: none yet) */
	int flip_now;			/* the operator moves the user: no
					   quiet period */
	struct ms_gateway *gw;
	int job_held;			/* this gateway holds the user's job
					   (its lease, in the store) */
	int lease_lost;			/* another gateway took the job: this
					   one writes nothing for the user */
	unsigned int job_gen;		/* counts the times it was held */
	uint64_t lease_at;		/* uv_hrtime() when the request that
					   last confirmed the job was sent */
	int await_acks;			/* the grace is over: the delta waits
					   for the other gateways' acks */
	int begin_retry;		/* the cutover's request could not be
					   written: tried again (grace timer) */
	int alone;			/* several gateways' store, none other
					   there as the copy began: joins */
	int64_t joins;			/* the gateways' joins then (store.h,
					   ms_store_gateway_joins) */
};

#define ADDR_BUCKETS 1024	/* per-address counts (gw_admit.c) */

struct gw_user_sessions;

struct ms_gateway {
	uv_loop_t *loop;
	struct ms_gw_config cfg;
	struct ms_store *store;
	struct ms_reader *reader;	/* the store's reads off the loop
					   (NULL: done on it) */
	struct ms_tls_server *tls;
	struct listener *listeners[MS_GW_MAX_LISTEN];
	unsigned int nlisteners;
	struct session *sessions;
	uint64_t next_id;
	struct guser *users[USER_BUCKETS];
	struct ms_mover *mover;
	/* The sessions, as the user's life cycle reaches them. */
	const struct gw_user_sessions *user_sessions;
	unsigned int copies;		/* mover jobs running */
	struct ms_progress copies_base;	/* the mover's counts when the
					   running copies began */
	uv_timer_t *sweep_timer;
	uint64_t sweep_next_ms;		/* rate: no new sweep start before */
	uint64_t sweeps;		/* passes that looked for users */
	int sweep_outside;		/* its last look was outside the window */
	uint64_t logins_ok, logins_failed;
	uv_tcp_t *metrics;
	unsigned int mclients;
	struct mclient *mlist, *mlist_tail;	/* newest first */
	struct mcount_ctx {
		uint64_t states[MS_USER_NSTATES];
		uint64_t msgs, bytes;
	} mcache;			/* the users' counts ... */
	uint64_t mcache_ms;		/* ... as of then (0: never) */
	struct ms_read *mread;		/* the counts being read again */
	struct penalty *penalties;
	struct addr_count *per_addr[ADDR_BUCKETS];	/* connections */
	unsigned int nconns;
	struct ms_caps *caps;		/* advertised before login */
	/* The config file's policies; cfg's are these with the overrides
	 * set at run time (kept in the store) applied. */
	enum ms_policy conf_policy;
	unsigned int conf_ndomains;
	__typeof__(((struct ms_gw_config *)0)->domains) conf_domains;
	json_t *policy_set;		/* {scope: policy} from the store */
	struct ms_survey *survey;	/* the source's mailbox sizes */
	struct ms_eta eta;		/* recent copies, for the site's ETA */
	uv_timer_t *lease_timer;	/* renews the leases of the jobs held */
	int lease_failing;		/* the last renewal failed (said
					   once) */
	/* PostgreSQL: the claim and the renewal under way on the cluster's
	 * connection (one of each at a time). */
	int claiming;
	int claim_sweep;		/* the claim's queued jobs too */
	unsigned int claimed;		/* jobs the last claim took */
	int renewing;
	uint64_t claim_sent, renew_sent;	/* uv_hrtime() then */
	struct guser **renew_gu;	/* the renewal's users ... */
	unsigned int *renew_gen;	/* ... and their job_gen then */
	/* Several gateways on one PostgreSQL store (cluster.c); NULL with
	 * SQLite. */
	struct ms_cluster *cluster;
};

/* A reply to the client (nothing once the client is gone). */
#define out(s, ...) \
	do { \
		if ((s)->c != NULL) \
			ms_conn_printf((s)->c, __VA_ARGS__); \
	} while (0)

/* A line from the server during login (gw_proto's backend_line). Returns
 * 0 to go on reading, 1 when the session left the login phase (failed),
 * 2 when the login was accepted (the rest of the input belongs to the
 * relay), -1 when a hold's password check succeeded, GW_TLS_STARTED when
 * the STARTTLS handshake began: nothing may follow the go-ahead in
 * plaintext. */
#define GW_TLS_STARTED 3

/* ---- gw_session.c: IMAP and POP3 sessions ---- */

void gw_clear_args(struct session *s);
void gw_timer_stop(struct session *s);
void gw_timer_start(struct session *s, uv_timer_cb cb, uint64_t ms,
		    uint64_t repeat);
void gw_session_close(struct session *s);
void gw_backend_fail(struct session *s, const char *why);
void gw_log_login(struct session *s, enum ms_log_level level,
		  const char *server, const char *result, const char *more);
void gw_backend_greeted(struct session *s, const char *starttls);
void gw_backend_on_tls(struct ms_conn *conn, int status,
		       const char *error);
void gw_login_failed(struct session *s, const char *reply);
void gw_backend_connect(struct session *s, int to_dst, int verify_only);
/* A login answered as refused ("TAG NO [IMAP_CODE] TEXT", "-ERR
 * [POP3_CODE] TEXT") and wiped. */
void gw_login_refuse(struct session *s, const char *imap_code,
		     const char *pop3_code, const char *text);
int gw_plaintext_refused(struct session *s);
/* A read of the store's for the session: on the store's reader, else at
 * once (done() called before it returns). s->rd is the read until done()
 * clears it; the session's end cancels it. -1: out of memory (drop()
 * called). */
int gw_read(struct session *s, ms_read_work_fn *work, ms_read_done_fn *done,
	    ms_read_drop_fn *drop, void *arg);
/* The same for the gateway: *rd_r the read until done() (NULL at once
 * without a reader). */
int gw_read_start(struct ms_gateway *gw, ms_read_work_fn *work,
		  ms_read_done_fn *done, ms_read_drop_fn *drop, void *arg,
		  struct ms_read **rd_r);
/* A read for the user logging in: arg (size bytes, zeroed) begins with
 * this. Started, or gw_backend_go() is told why not. */
struct gw_login_read {
	struct session *s;
	char *user;			/* the login's name */
};
void gw_read_login(struct session *s, size_t size, ms_read_work_fn *work,
		   ms_read_done_fn *done, ms_read_drop_fn *drop);
void gw_login_read_free(struct gw_login_read *lr);
/* On to the server after the relay's filter was read (why: what failed). */
void gw_backend_go(struct session *s, const char *why);
void gw_login_start(struct session *s);
void gw_client_on_tls(struct ms_conn *conn, int status,
		      const char *error);
int gw_prelogin_reading(const struct session *s);
int gw_too_many_commands(struct session *s);
void gw_line_too_long(struct session *s);
long gw_input_line(struct session *s);
void gw_input_drop(struct session *s, size_t linelen);
void gw_prelogin_timer(struct session *s);
extern const struct gw_user_sessions gw_mailbox_user_sessions;
void gw_session_accept(struct ms_gateway *gw, uv_stream_t *server,
		       const struct ms_gw_listen *cfg, const void *arg);
int gw_sessions_kick(struct ms_gateway *gw, const char *user);

/* ---- gw_imap_view.c: the IMAP view of a moved user ---- */

/* Before an IMAP login to the destination: the user's rows read (the
 * store's reader), s->iv set when the user needs the view, then
 * gw_backend_go(). */
void gw_imap_view_load(struct session *s);
void gw_imap_view_free(struct session *s);
int gw_imap_view_client(struct session *s, const char *data, size_t len);
int gw_imap_view_server(struct session *s, const char *data, size_t len);

/* ---- lifecycle.c: each user's life ---- */

/* The one way up from the user's life cycle to the sessions: the session
 * code (gw_session.c) asks lifecycle.c where a login goes and acts on the
 * answer; lifecycle.c reaches sessions only through these, registered at
 * gw_lifecycle_start(), never by name. */
struct gw_user_sessions {
	/* The user's held logins may go on: each is routed again. */
	void (*release_held)(struct ms_gateway *gw, struct guser *gu);
	/* Ends the user's sessions; returns how many. */
	int (*kick)(struct ms_gateway *gw, const char *user);
	/* Ends the user's sessions relayed to the destination (to_dst 1),
	 * the source (0) or either (-1); user NULL: every user's. Held
	 * logins stay held. */
	int (*end_relays)(struct ms_gateway *gw, const char *user,
			  int to_dst);
};

/* Where a login goes now (gw_route_login()). */
enum gw_login_way {
	GW_LOGIN_FAIL,		/* the store failed: *why_r says why */
	GW_LOGIN_SOURCE,
	GW_LOGIN_DESTINATION,
	GW_LOGIN_CHECK_HOLD,	/* the password checked at the source, then
				   held */
	GW_LOGIN_HOLD,		/* held (or held still) */
	GW_LOGIN_UNSURE,	/* the user's state cannot be known now (the
				   store is out of reach, or this gateway
				   has not caught up with the others): held
				   a while, then a temporary failure */
};

struct guser *gw_user_find(struct ms_gateway *gw, const char *name);
void gw_cutover_begin(struct ms_gateway *gw, struct guser *gu);
enum gw_login_way gw_route_login(struct ms_gateway *gw, struct guser *gu,
				 const char *name, int held,
				 const char **why_r);
int gw_hold_over_to_source(struct ms_gateway *gw, const char *name);
int gw_login_accepted(struct session *s, const char **why_r);
void gw_flip_when_quiet(struct ms_gateway *gw, struct guser *gu);
int gw_policies_load(struct ms_gateway *gw, char *err, size_t errsz);
int gw_lifecycle_start(struct ms_gateway *gw,
		       const struct gw_user_sessions *sessions, char *err,
		       size_t errsz);
void gw_lifecycle_free(struct ms_gateway *gw);

/* ---- gw_admit.c: admission ---- */

/* The per-address counts (at stop). */
void gw_admit_free(struct ms_gateway *gw);

/* ---- metrics.c: the Prometheus endpoint ---- */

int gw_metrics_start(struct ms_gateway *gw, char *err, size_t errsz);

#endif
