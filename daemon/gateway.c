/* The gateway: see gateway.h and docs/gateway-spec.md.
 *
 * A session is one client connection. Before login it is ours: we answer
 * the pre-login commands ourselves and capture the credentials. At login we
 * look the user up, open a connection to the server that holds the user's
 * mail, replay the login there (after an IMAP ID with the client's address)
 * and pass the server's answer on with the client's tag. From then on bytes
 * are relayed both ways, with backpressure.
 *
 * Per user (struct guser) we count open sessions, hold logins while the
 * user is being flipped, and keep the captured password in memory only for
 * as long as a copy needs it.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/evp.h>

#include "config.h"
#include "gateway.h"
#include "gw_login.h"
#include "gw_route.h"
#include "log.h"
#include "net.h"
#include "pop3_uidl.h"
#include "util.h"

#define GW_INBUF_MAX 8192	/* pre-login command line, literals
				   included; more buffered than this:
				   not read */
/* What may be buffered at all: GW_INBUF_MAX, then one read (net.c reads at
 * most 64 KiB at a time) before reading stops. */
#define GW_INBUF_HARD (GW_INBUF_MAX + 64 * 1024 + 16 * 1024)
#define GW_ARG_MAX 8
#define GW_LITERAL_MAX 4096	/* a pre-login literal (user, password) */
#define GW_BAD_MAX 10		/* bad pre-login commands: we hang up */
#define PRELOGIN_TIMEOUT_MS (180 * 1000)	/* since the client's last bytes */
#define PRELOGIN_MAX_MS (10 * 60 * 1000)	/* since it connected, at most */
/* Commands before login on one connection: a client needs a handful; one
 * that sends thousands (and reads nothing) only costs the others time. */
#define PRELOGIN_CMDS_MAX 1000
#define GW_BACKEND_TIMEOUT_MS (30 * 1000)
#define INPROGRESS_MS (10 * 1000)
/* A pre-login client's output queue: above HIGH it is not read any more
 * (it sends commands and does not read the answers) until it drops to
 * LOW. */
#define PRELOGIN_OUT_HIGH (64 * 1024)
#define PRELOGIN_OUT_LOW (16 * 1024)
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
	/* Sends the login, SASL PLAIN b64, to the greeted server. */
	void (*send_login)(struct session *s, const char *b64);
	/* A line of the server's during login: see backend_line(). */
	int (*backend_line)(struct session *s, char *line);
	/* The relay's filter (POP3 UIDLs), when s->ur is set. */
	void (*relay_client)(struct session *s, const char *data, size_t len);
	int (*relay_server)(struct session *s, const char *data, size_t len);
	void (*relay_free)(struct session *s);
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
	unsigned int bad;
	char tag[256];

	struct ms_login login;		/* captured (wiped when done with) */

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

	struct guser *gu;
	uv_timer_t timer;		/* one at a time; its close frees us */
	int admitted;			/* counted by ms_gw_admit() */
	uint64_t held_since;
	int c_paused, b_paused;		/* MS_PAUSE_* bits (gw_login.h) */
	char *penalty_reply;
	/* POP3 to the destination, of a user whose INBOX was copied: the
	 * source's UIDLs put back (NULL for every other session) */
	struct uidl_relay *ur;
};

struct uidl_relay {
	struct ms_pop3_rw rw;
	struct ms_uidl_map map;
	uint64_t rewritten;		/* UIDLs replaced, for the log */
};

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
	int resume;			/* recover(): copy interrupted by a
					   crash, to be started again */
	int rollback;			/* the cutover runs back to the source */
	char *pw;			/* captured password, for the copies */
	uv_timer_t *grace;		/* cutover: waiting before the delta */
	struct ms_gateway *gw;
};

/* Client connections from one address (IMAP, POP3 and SMTP together). */
#define ADDR_BUCKETS 1024
struct addr_count {
	struct addr_count *next;
	unsigned int n;
	char addr[64];
};

struct listener {
	uv_tcp_t tcp;
	struct ms_gateway *gw;
	struct ms_gw_listen cfg;
	int open;
};

struct ms_gateway {
	uv_loop_t *loop;
	struct ms_gw_config cfg;
	struct ms_store *store;
	struct ms_tls_server *tls;
	struct listener *listeners[MS_GW_MAX_LISTEN];
	unsigned int nlisteners;
	struct session *sessions;
	uint64_t next_id;
	struct guser *users[USER_BUCKETS];
	struct ms_mover *mover;
	unsigned int closing_handles;
	unsigned int copies;		/* mover jobs running */
	uv_timer_t *sweep_timer;
	uint64_t sweep_next_ms;		/* rate: no new sweep start before */
	uint64_t logins_ok, logins_failed;
	uv_tcp_t *metrics;
	unsigned int mclients;
	struct mclient *mlist, *mlist_tail;	/* newest first */
	struct mcount_ctx {
		uint64_t states[MS_USER_NSTATES];
		uint64_t msgs, bytes;
	} mcache;			/* the users' counts ... */
	uint64_t mcache_ms;		/* ... as of then (0: never) */
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
};

static void gw_session_close(struct session *s);
static int gw_sessions_kick(struct ms_gateway *gw, const char *user);
static void gw_login_start(struct session *s);
static void gw_route_login(struct session *s);
static void user_copy_start(struct ms_gateway *gw, struct guser *gu);
static void gw_login_failed(struct session *s, const char *reply);
static void gw_cutover_begin(struct ms_gateway *gw, struct guser *gu);
static int gw_login_accepted(struct session *s);
static int gw_prelogin_reading(const struct session *s);
static void gw_prelogin_process(struct session *s);
static void gw_line_too_long(struct session *s);
static int gw_too_many_commands(struct session *s);

/* ---- small helpers ---- */

const char *ms_policy_name(enum ms_policy p)
{
	return p == MS_POLICY_HOLD ? "hold" : p == MS_POLICY_OFF ? "off" :
	       "passthrough";
}

int ms_policy_parse(const char *s, enum ms_policy *p)
{
	if (!strcmp(s, "passthrough"))
		*p = MS_POLICY_PASSTHROUGH;
	else if (!strcmp(s, "hold"))
		*p = MS_POLICY_HOLD;
	else if (!strcmp(s, "off"))
		*p = MS_POLICY_OFF;
	else
		return -1;
	return 0;
}

/* A reply to the client (nothing once the client is gone). */
#define out(s, ...) \
	do { \
		if ((s)->c != NULL) \
			ms_conn_printf((s)->c, __VA_ARGS__); \
	} while (0)

static void gw_clear_args(struct session *s)
{
	for (unsigned int i = 0; i < s->argc; i++)
		ms_secret_free(&s->argv[i]);
	s->argc = 0;
	s->lit_need = 0;
}

static struct guser *gw_user_get(struct ms_gateway *gw, const char *name)
{
	unsigned int h = ms_str_hash(name) % USER_BUCKETS;
	struct guser *gu;

	for (gu = gw->users[h]; gu != NULL; gu = gu->next)
		if (strcmp(gu->name, name) == 0)
			return gu;
	gu = calloc(1, sizeof(*gu));
	if (gu == NULL)
		return NULL;
	snprintf(gu->name, sizeof(gu->name), "%s", name);
	gu->next = gw->users[h];
	gw->users[h] = gu;
	return gu;
}

static struct guser *gw_user_find(struct ms_gateway *gw, const char *name)
{
	for (struct guser *gu = gw->users[ms_str_hash(name) % USER_BUCKETS];
	     gu != NULL; gu = gu->next)
		if (strcmp(gu->name, name) == 0)
			return gu;
	return NULL;
}

static enum ms_policy user_policy(struct ms_gateway *gw,
				  const struct ms_user_info *info)
{
	enum ms_policy p = gw->cfg.policy;
	const char *at = strrchr(info->name, '@');

	if (info->policy[0] != '\0' && ms_policy_parse(info->policy, &p) == 0)
		return p;
	for (unsigned int i = 0; at != NULL && i < gw->cfg.ndomains; i++)
		if (strcasecmp(gw->cfg.domains[i].domain, at + 1) == 0)
			return gw->cfg.domains[i].policy;
	return gw->cfg.policy;
}

/* The user's row, or what an unknown user would get (on the source, the
 * default policy): nothing is written. */
static int user_lookup(struct ms_gateway *gw, const char *name,
		       struct ms_user_info *info)
{
	int found = 0;

	if (ms_store_user_info(gw->store, name, info, &found) < 0)
		return -1;
	if (!found) {
		memset(info, 0, sizeof(*info));
		snprintf(info->name, sizeof(info->name), "%s", name);
		snprintf(info->state, sizeof(info->state), "%s",
			 ms_user_state_names[MS_USER_SOURCE]);
	}
	return 0;
}

/* The user's row, added when the user is unknown (on the source). Only
 * for users a server accepted, or the operator named. */
static int user_state(struct ms_gateway *gw, const char *name,
		      struct ms_user_info *info)
{
	int64_t id;

	if (ms_store_user_get(gw->store, name, &id) < 0)
		return -1;
	return user_lookup(gw, name, info);
}

static void set_state(struct ms_gateway *gw, const char *name,
		      enum ms_user_state state, const char *error)
{
	int64_t id;

	if (ms_store_user_get(gw->store, name, &id) < 0 ||
	    ms_store_user_set_state(gw->store, id, ms_user_state_names[state],
				    error) < 0)
		ms_log(MS_LOG_ERROR, "%s: store: %s", name,
		       ms_store_error(gw->store));
	else
		ms_info("%s: state %s", name, ms_user_state_names[state]);
}

/* ---- timers ---- */

static void gw_timer_stop(struct session *s)
{
	uv_timer_stop(&s->timer);
}

static void gw_timer_start(struct session *s, uv_timer_cb cb, uint64_t ms,
			   uint64_t repeat)
{
	uv_timer_start(&s->timer, cb, ms, repeat);
}

static void on_idle_timeout(uv_timer_t *t)
{
	struct session *s = t->data;

	if (s->proto == MS_GW_IMAP)
		out(s, "* BYE Disconnected for inactivity.\r\n");
	else
		out(s, "-ERR Disconnected for inactivity.\r\n");
	gw_session_close(s);
}

/* ---- session lifetime ---- */

static void gw_session_uncount(struct session *s)
{
	struct ms_gateway *gw = s->gw;
	struct guser *gu = s->gu;

	if (!s->counted || gu == NULL)
		return;
	s->counted = 0;
	gu->sessions--;
	/* The last session of a verified user ends: flip now. */
	if (gu->sessions == 0 && gu->flip_pending && !gu->copying) {
		gu->flip_pending = 0;
		gw_cutover_begin(gw, gu);
	}
}

/* Pre-login input holds passwords: wiped before it is let go. */
static void inbuf_free(struct session *s)
{
	if (s->in != NULL)
		OPENSSL_cleanse(s->in, s->incap);
	free(s->in);
	s->in = NULL;
	s->inlen = s->incap = 0;
}

/* Room for len more bytes of input (what it held wiped when it moves). */
static int inbuf_reserve(struct session *s, size_t len)
{
	return ms_secret_reserve(&s->in, &s->incap, s->inlen, s->inlen + len,
				 GW_INBUF_MAX, GW_INBUF_HARD);
}

/* The pre-login idle timer: PRELOGIN_TIMEOUT_MS from now, but never past
 * PRELOGIN_MAX_MS since the client connected (NOOPs do not keep a session
 * that never logs in alive). */
static void gw_prelogin_timer(struct session *s);

static void bin_free(struct session *s)
{
	if (s->bin != NULL)
		OPENSSL_cleanse(s->bin, GW_INBUF_MAX + 1);
	free(s->bin);
	s->bin = NULL;
	s->binlen = 0;
}

/* Ends the session. Its memory goes when the timer's handle is closed, on
 * a later turn of the loop, so that a caller up the stack (a command loop
 * that just ran LOGOUT) may still look at s->st, which is SS_CLOSING. */
static void gw_session_close(struct session *s)
{
	struct ms_gateway *gw = s->gw;

	if (s->st == SS_CLOSING)
		return;
	s->st = SS_CLOSING;
	ms_conn_close(&s->b);
	ms_conn_close(&s->c);
	gw_clear_args(s);
	ms_login_wipe(&s->login);
	inbuf_free(s);
	bin_free(s);
	free(s->penalty_reply);
	s->penalty_reply = NULL;
	if (s->ur != NULL)
		s->pr->relay_free(s);
	if (s->prev != NULL)
		s->prev->next = s->next;
	else
		gw->sessions = s->next;
	if (s->next != NULL)
		s->next->prev = s->prev;
	s->next = s->prev = NULL;
	gw_session_uncount(s);
	if (s->admitted)
		ms_gw_unadmit(gw, s->peer);
	s->admitted = 0;
	ms_close_free((uv_handle_t *)&s->timer, s);
}

/* ---- relay ---- */

static void on_backend_read(struct ms_conn *conn, const char *data, size_t len);

static void on_client_drain(struct ms_conn *conn)
{
	struct session *s = ms_conn_ctx(conn);

	ms_pause_clear(s->b, &s->b_paused, MS_PAUSE_WRITE);
	if (s->st != SS_RELAY && (s->c_paused & MS_PAUSE_WRITE)) {
		/* A pre-login client read its answers: on with its
		 * commands. */
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_WRITE);
		gw_prelogin_process(s);
	}
}

static void on_backend_drain(struct ms_conn *conn)
{
	struct session *s = ms_conn_ctx(conn);

	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_WRITE);
}

/* ---- POP3 UIDLs (pop3_uidl.h, docs/gateway-spec.md) ---- */

static const char *uidl_format(const char *f)
{
	return f[0] != '\0' ? f : MS_UIDL_FORMAT_DEFAULT;
}

static int uidl_map(void *ctx, const char *uidl, char *out, size_t outsz)
{
	struct session *s = ctx;
	int r = ms_uidl_translate(&s->ur->map, uidl, out, outsz);

	if (r < 0)
		ms_log(MS_LOG_ERROR, "session %llu: %s: POP3 UIDL: store: %s",
		       (unsigned long long)s->id, s->gu->name,
		       ms_store_error(s->gw->store));
	else
		s->ur->rewritten += (uint64_t)r;
	return r;
}

static int uidl_out(void *ctx, const char *data, size_t len)
{
	struct session *s = ctx;

	return ms_conn_write(s->c, data, len) < 0 ? -1 : 0;
}

/* At a POP3 login to the destination: when the mover copied the user's
 * INBOX, the session shows the source's UIDLs. Only then is anything
 * allocated. NULL, or why it cannot be told. */
static const char *uidl_relay_start(struct session *s)
{
	struct ms_gateway *gw = s->gw;
	struct ms_user_info info;
	struct ms_folder_state fs;
	int found = 0;

	if (s->proto != MS_GW_POP3 || !s->to_dst)
		return NULL;
	if (ms_store_user_info(gw->store, ms_login_name(&s->login), &info,
			       &found) < 0 ||
	    (found && ms_store_folder_find_dst(gw->store, info.id, "INBOX",
					       &fs, &found) < 0))
		return ms_store_error(gw->store);
	if (!found || fs.dst_uidvalidity == 0)
		return NULL;
	s->ur = calloc(1, sizeof(*s->ur));
	if (s->ur == NULL)
		return "out of memory";
	ms_pop3_rw_init(&s->ur->rw, uidl_map, s);
	s->ur->map.store = gw->store;
	s->ur->map.folder_id = fs.id;
	s->ur->map.src_uidvalidity = fs.src_uidvalidity;
	s->ur->map.dst_uidvalidity = fs.dst_uidvalidity;
	s->ur->map.src_format = uidl_format(gw->cfg.src_uidl_format);
	s->ur->map.dst_format = uidl_format(gw->cfg.dst_uidl_format);
	return NULL;
}

static void uidl_relay_free(struct session *s)
{
	if (s->ur == NULL)
		return;
	if (s->ur->rewritten > 0)
		ms_info("session %llu: %s: %llu POP3 UIDLs shown as the "
			"source's", (unsigned long long)s->id, s->gu->name,
			(unsigned long long)s->ur->rewritten);
	ms_pop3_rw_clear(&s->ur->rw);
	free(s->ur);
	s->ur = NULL;
}

/* The rewriter lost track: the session is relayed as it is from now on. */
static void uidl_relay_check(struct session *s)
{
	const char *why = ms_pop3_rw_gave_up(&s->ur->rw);

	if (why == NULL)
		return;
	ms_warn("session %llu: %s: POP3 UIDLs passed on unchanged from now on: "
		"%s", (unsigned long long)s->id, s->gu->name, why);
	uidl_relay_free(s);
	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
}

/* The client's commands (which pass on unchanged): the answers to expect. */
static void uidl_relay_client(struct session *s, const char *data, size_t len)
{
	ms_pop3_rw_client(&s->ur->rw, data, len);
	if (ms_pop3_rw_pending(&s->ur->rw) >= MS_POP3_RW_PIPELINE_SOFT)
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	uidl_relay_check(s);
}

/* The server's answers, to the client with the UIDLs translated. -1 when
 * the session must end (the client is gone, the store failed). */
static int uidl_relay_server(struct session *s, const char *data, size_t len)
{
	if (ms_pop3_rw_server(&s->ur->rw, data, len, uidl_out, s) < 0)
		return -1;
	if (ms_pop3_rw_pending(&s->ur->rw) < MS_POP3_RW_PIPELINE_SOFT / 2)
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	uidl_relay_check(s);
	ms_relay_pressure(s->c, s->b, &s->b_paused);
	return 0;
}

static void enter_relay(struct session *s, const char *rest, size_t restlen)
{
	gw_timer_stop(s);
	s->st = SS_RELAY;
	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_WRITE | MS_PAUSE_INPUT);
	ms_login_wipe(&s->login);
	bin_free(s);
	/* The login is over: the usual backpressure, no more wiping. */
	ms_conn_set_water(s->c, 0, 0);
	ms_conn_set_wipe(s->c, 0);
	ms_conn_set_wipe(s->b, 0);
	/* What the server sent after its login reply. */
	if (restlen > 0 && s->ur != NULL) {
		if (s->pr->relay_server(s, rest, restlen) < 0) {
			gw_session_close(s);
			return;
		}
	} else if (restlen > 0) {
		ms_conn_write(s->c, rest, restlen);
	}
	/* What the client pipelined after its login command. */
	if (s->inlen > 0) {
		if (s->ur != NULL)
			s->pr->relay_client(s, s->in, s->inlen);
		ms_conn_write(s->b, s->in, s->inlen);
	}
	inbuf_free(s);
}

/* ---- backend login ---- */

static void gw_backend_fail(struct session *s, const char *why)
{
	ms_warn("session %llu: %s: %s", (unsigned long long)s->id,
		s->login.user != NULL ? s->login.user : "?", why);
	gw_timer_stop(s);
	ms_conn_close(&s->b);
	gw_session_uncount(s);
	bin_free(s);
	if (s->proto == MS_GW_IMAP)
		out(s, "%s NO [UNAVAILABLE] Mail server temporarily "
		    "unavailable, try again later.\r\n", s->tag);
	else
		out(s, "-ERR [SYS/TEMP] Mail server temporarily unavailable, "
		    "try again later.\r\n");
	ms_login_wipe(&s->login);
	s->st = SS_PRELOGIN;
	gw_prelogin_timer(s);
	/* Commands the client pipelined behind the login. */
	gw_prelogin_process(s);
}

static void gw_backend_send_login(struct session *s)
{
	char *b64 = ms_login_sasl_plain(&s->login);

	if (b64 == NULL) {
		gw_backend_fail(s, "out of memory");
		return;
	}
	s->bst = BS_LOGIN;
	s->pr->send_login(s, b64);
	ms_secret_free(&b64);
}

static void pop3_send_login(struct session *s, const char *b64)
{
	char line[256];

	/* The client's address, when the server's greeting offered us
	 * XCLIENT (Dovecot: to login_trusted_networks), ahead of the login
	 * in the same write; its answer is skipped. */
	if (s->b_xclient) {
		snprintf(line, sizeof(line), "XCLIENT ADDR=%s PORT=%u\r\n",
			 s->peer, s->peer_port);
		ms_conn_write(s->b, line, strlen(line));
	}
	ms_conn_write(s->b, "AUTH PLAIN ", 11);
	ms_conn_write(s->b, b64, strlen(b64));
	ms_conn_write(s->b, "\r\n", 2);
}

static void imap_send_login(struct session *s, const char *b64)
{
	char line[256];

	/* The client's address, for servers that trust us with it
	 * (Dovecot: login_trusted_networks). */
	snprintf(line, sizeof(line), "ms1 ID (\"x-originating-ip\" \"%s\" "
		 "\"x-originating-port\" \"%u\" \"x-connected-ip\" "
		 "\"%s\")\r\n", s->peer, s->peer_port, s->local);
	ms_conn_write(s->b, line, strlen(line));
	if (s->b_sasl_ir) {
		ms_conn_write(s->b, "ms2 AUTHENTICATE PLAIN ", 23);
		ms_conn_write(s->b, b64, strlen(b64));
		ms_conn_write(s->b, "\r\n", 2);
	} else {
		ms_conn_write(s->b, "ms2 AUTHENTICATE PLAIN\r\n", 24);
		s->bst = BS_LOGIN_CONT;
	}
}

/* The server greeted us: STARTTLS first when it is to be used (the
 * protocol's command), else the login. */
static void gw_backend_greeted(struct session *s, const char *starttls)
{
	if (s->server->tls_mode == MS_TLS_STARTTLS) {
		s->bst = BS_STARTTLS;
		ms_conn_write(s->b, starttls, strlen(starttls));
	} else {
		gw_backend_send_login(s);
	}
}

static void gw_backend_on_tls(struct ms_conn *conn, int status,
			      const char *error)
{
	struct session *s = ms_conn_ctx(conn);

	if (status != 0) {
		gw_backend_fail(s, error != NULL ? error : "STARTTLS failed");
		return;
	}
	if (s->proto == MS_GW_IMAP)
		s->b_sasl_ir = 1;	/* asked again below if not */
	gw_backend_send_login(s);
}

/* One line from the server during login. Returns 0 to go on reading,
 * 1 when the session left the login phase (failed), 2 when the login was
 * accepted (the rest of the input belongs to the relay), -1 when a hold's
 * password check succeeded, GW_TLS_STARTED when the STARTTLS handshake
 * began: nothing may follow the go-ahead in plaintext. */
#define GW_TLS_STARTED 3
static int backend_line(struct session *s, char *line, size_t len)
{
	while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
		line[--len] = '\0';
	return s->pr->backend_line(s, line);
}

static int pop3_backend_line(struct session *s, char *line)
{
	int ok = strncmp(line, "+OK", 3) == 0;
	const char *why;

	if (!ok && strncmp(line, "-ERR", 4) != 0) {
		gw_backend_fail(s, "unexpected reply from the server");
		return 1;
	}
	switch (s->bst) {
	case BS_GREETING:
		if (!ok) {
			gw_backend_fail(s, "the server refused us");
			return 1;
		}
		s->b_xclient = strstr(line, "[XCLIENT]") != NULL;
		gw_backend_greeted(s, "STLS\r\n");
		return 0;
	case BS_STARTTLS:
		if (!ok || ms_conn_starttls(s->b, gw_backend_on_tls) < 0) {
			gw_backend_fail(s, "STLS refused");
			return 1;
		}
		return GW_TLS_STARTED;
	default:
		break;
	}
	if (s->b_xclient) {
		s->b_xclient = 0;
		if (!ok)
			ms_info("session %llu: XCLIENT refused: %s",
				(unsigned long long)s->id, line);
		return 0;
	}
	if (!ok) {
		gw_login_failed(s, line);
		return 1;
	}
	if (s->verify_only)
		return -1;
	if ((why = uidl_relay_start(s)) != NULL) {
		/* Which UIDLs to show is not known: better no
		 * session than a mailbox downloaded again. */
		gw_backend_fail(s, why);
		return 1;
	}
	out(s, "%s\r\n", line);
	return 2;
}

static int imap_backend_line(struct session *s, char *line)
{
	if (s->bst == BS_GREETING) {
		if (strncmp(line, "* OK", 4) != 0) {
			gw_backend_fail(s, "bad greeting from the server");
			return 1;
		}
		s->b_sasl_ir = strcasestr(line, " SASL-IR") != NULL;
		gw_backend_greeted(s, "ms0 STARTTLS\r\n");
		return 0;
	}
	if (s->bst == BS_STARTTLS) {
		if (line[0] == '*')
			return 0;
		if (strncasecmp(line, "ms0 OK", 6) != 0 ||
		    ms_conn_starttls(s->b, gw_backend_on_tls) < 0) {
			gw_backend_fail(s, "STARTTLS refused by the server");
			return 1;
		}
		return GW_TLS_STARTED;
	}
	if (s->bst == BS_LOGIN_CONT && line[0] == '+') {
		char *b64 = ms_login_sasl_plain(&s->login);

		if (b64 != NULL) {
			ms_conn_write(s->b, b64, strlen(b64));
			ms_conn_write(s->b, "\r\n", 2);
			ms_secret_free(&b64);
		}
		s->bst = BS_LOGIN;
		return 0;
	}
	if (strncmp(line, "ms2 ", 4) != 0)
		return 0;	/* untagged, or the ID's reply */
	if (strncasecmp(line + 4, "OK", 2) != 0) {
		/* The server's own words: the client may try again. */
		char reply[GW_INBUF_MAX + 80];

		snprintf(reply, sizeof(reply), "%s %s", s->tag, line + 4);
		gw_login_failed(s, reply);
		return 1;
	}
	if (s->verify_only)
		return -1;
	out(s, "%s %s\r\n", s->tag, line + 4);
	return 2;
}

static void gw_hold(struct session *s);

/* ---- repeated failures from one address are slowed down ---- */

#define PENALTY_SLOTS 4096
#define PENALTY_FREE_FAILS 2		/* failures answered at once */
#define PENALTY_MAX_MS 15000
#define PENALTY_FORGET_MS (10 * 60 * 1000)

struct penalty {
	char addr[64];
	unsigned int fails;
	uint64_t last_ms;
};

static struct penalty *penalty_slot(struct ms_gateway *gw, const char *addr)
{
	if (gw->penalties == NULL) {
		gw->penalties = calloc(PENALTY_SLOTS, sizeof(*gw->penalties));
		if (gw->penalties == NULL)
			return NULL;
	}
	/* One slot per hash: a collision only shares a penalty. */
	return &gw->penalties[ms_str_hash(addr) % PENALTY_SLOTS];
}

static uint64_t penalty_ms(struct ms_gateway *gw, const char *addr, int failed)
{
	struct penalty *p = penalty_slot(gw, addr);
	uint64_t now = uv_now(gw->loop);

	if (p == NULL)
		return 0;
	/* Another address in the slot takes its count over (a collision
	 * shares a penalty, it never clears one); an old one is forgotten. */
	if (now - p->last_ms > PENALTY_FORGET_MS)
		p->fails = 0;
	if (strcmp(p->addr, addr) != 0)
		snprintf(p->addr, sizeof(p->addr), "%s", addr);
	p->last_ms = now;
	if (!failed) {
		p->fails = 0;
		return 0;
	}
	if (++p->fails <= PENALTY_FREE_FAILS)
		return 0;
	return p->fails - PENALTY_FREE_FAILS >= 5 ? PENALTY_MAX_MS :
		1000ULL << (p->fails - PENALTY_FREE_FAILS - 1);
}

static void on_penalty_over(uv_timer_t *t)
{
	struct session *s = t->data;

	if (s->penalty_reply != NULL) {
		out(s, "%s\r\n", s->penalty_reply);
		free(s->penalty_reply);
		s->penalty_reply = NULL;
	}
	s->st = SS_PRELOGIN;
	gw_prelogin_timer(s);
	/* Commands the client sent meanwhile. */
	gw_prelogin_process(s);
}

/* The server refused the login: its reply goes to the client (who may try
 * again), after a pause that grows with the address's recent failures. */
static void gw_login_failed(struct session *s, const char *reply)
{
	uint64_t delay = penalty_ms(s->gw, s->peer, 1);

	s->gw->logins_failed++;
	ms_conn_close(&s->b);
	gw_session_uncount(s);
	ms_login_wipe(&s->login);
	if (delay == 0) {
		out(s, "%s\r\n", reply);
		s->st = SS_PRELOGIN;
		gw_prelogin_timer(s);
		/* Commands the client pipelined behind the login. */
		gw_prelogin_process(s);
		return;
	}
	free(s->penalty_reply);
	s->penalty_reply = strdup(reply);
	s->st = SS_HELD_PENALTY;
	gw_timer_start(s, on_penalty_over, delay, 0);
}

static void on_backend_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct session *s = ms_conn_ctx(conn);

	if (s->st == SS_RELAY) {
		if (s->ur == NULL ?
		    ms_relay(s->c, s->b, &s->b_paused, data, len) < 0 :
		    s->pr->relay_server(s, data, len) < 0)
			gw_session_close(s);
		return;
	}
	while (len > 0 && s->st == SS_BACKEND) {
		const char *lf = memchr(data, '\n', len);
		size_t n = lf != NULL ? (size_t)(lf - data) + 1 : len;
		int r;

		if (s->bin == NULL)
			s->bin = malloc(GW_INBUF_MAX + 1);
		if (s->bin == NULL || s->binlen + n > GW_INBUF_MAX) {
			gw_backend_fail(s, "server line too long");
			return;
		}
		memcpy(s->bin + s->binlen, data, n);
		s->binlen += n;
		data += n;
		len -= n;
		if (lf == NULL)
			return;
		s->bin[s->binlen] = '\0';
		s->binlen = 0;
		r = backend_line(s, s->bin, strlen(s->bin));
		if (r == GW_TLS_STARTED) {
			/* Whatever came with the go-ahead was not protected
			 * by TLS: an attacker on the path may have put it
			 * there (a forged login reply). */
			if (len > 0)
				gw_backend_fail(s, "the server sent data after "
						"its STARTTLS go-ahead");
			return;
		}
		if (r == 2) {
			if (gw_login_accepted(s) < 0)
				return;
			s->gw->logins_ok++;
			penalty_ms(s->gw, s->peer, 0);
			enter_relay(s, data, len);
			return;
		}
		if (r == -1) {
			/* hold: the password is good; wait for the copy
			 * (which must not count this session as one on the
			 * source). */
			ms_conn_close(&s->b);
			gw_session_uncount(s);
			if (gw_login_accepted(s) < 0)
				return;
			gw_hold(s);
			return;
		}
		if (r == 1)
			return;
	}
}

static void on_backend_error(struct ms_conn *conn, const char *error)
{
	struct session *s = ms_conn_ctx(conn);

	if (s->st == SS_BACKEND) {
		gw_backend_fail(s, error);
		return;
	}
	gw_session_close(s);
}

static void on_backend_connect(struct ms_conn *conn, int status,
			       const char *error)
{
	struct session *s = ms_conn_ctx(conn);

	if (status != 0) {
		gw_backend_fail(s, error != NULL ? error : "connect failed");
		return;
	}
	s->bst = BS_GREETING;
}

static void on_backend_timeout(uv_timer_t *t)
{
	gw_backend_fail(t->data, "no answer from the server");
}

static void gw_backend_connect(struct session *s, int to_dst, int verify_only)
{
	struct ms_gateway *gw = s->gw;
	struct ms_conn_callbacks cb = {
		.on_connect = on_backend_connect,
		.on_read = on_backend_read,
		.on_error = on_backend_error,
		.on_drain = on_backend_drain,
		.ctx = s,
	};
	const struct ms_server_cfg *srv;

	if (s->proto == MS_GW_IMAP)
		srv = to_dst ? &gw->cfg.dst_imap : &gw->cfg.src_imap;
	else
		srv = to_dst ? &gw->cfg.dst_pop3 : &gw->cfg.src_pop3;
	s->to_dst = to_dst;
	s->verify_only = verify_only;
	s->server = srv;
	/* Counted while connected to a server: the flip waits for the
	 * user's last such session to end. */
	if (!s->counted && s->gu != NULL) {
		s->gu->sessions++;
		s->counted = 1;
	}
	if (!to_dst && !verify_only && s->gu != NULL)
		s->gu->touched = 1;
	s->st = SS_BACKEND;
	s->bst = BS_GREETING;
	if (srv->host[0] == '\0') {
		gw_backend_fail(s, "no such server configured");
		return;
	}
	gw_timer_start(s, on_backend_timeout, GW_BACKEND_TIMEOUT_MS, 0);
	if (ms_server_connect(gw->loop, srv, &cb, &s->b) < 0)
		gw_backend_fail(s, "cannot connect");
	else
		ms_conn_set_wipe(s->b, 1);	/* the login goes this way */
}

/* ---- routing and a user's life ---- */

static void held_release(struct ms_gateway *gw, struct guser *gu)
{
	for (struct session *s = gw->sessions, *next; s != NULL; s = next) {
		next = s->next;
		/* A session without gu: held for a user found in cutover in
		 * the store, whose password no server has checked yet. */
		if (s->st == SS_HELD && (s->gu == gu || (s->gu == NULL &&
		    !strcmp(ms_login_name(&s->login), gu->name))))
			gw_route_login(s);
	}
}

/* A mover job of the user's ended: the user, or NULL when unknown. */
static struct guser *job_ended(struct ms_gateway *gw, const char *user)
{
	struct guser *gu = gw_user_find(gw, user);

	gw->copies--;
	if (gu != NULL)
		gu->copying = 0;
	return gu;
}

static void on_copy_done(const struct ms_user_report *rep, void *ctx)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = job_ended(gw, rep->user);

	if (gu == NULL)
		return;
	if (!rep->ok) {
		ms_warn("%s: copy failed: %s", gu->name,
			rep->error != NULL ? rep->error : "?");
		gu->cutover = 0;
		gu->flip_pending = 0;
		set_state(gw, gu->name, MS_USER_FAILED, rep->error);
		ms_secret_free(&gu->pw);
		held_release(gw, gu);
		return;
	}
	if (!gu->cutover && gu->sessions == 0 && gu->touched) {
		/* The user worked on the source while this copy ran and has
		 * logged off since: a last delta, with nobody on the
		 * source, before the flip. */
		gw_cutover_begin(gw, gu);
		return;
	}
	if (gu->cutover || gu->sessions == 0) {
		/* Verified with no session open (a last delta, or a copy
		 * nobody touched the source during): the map flips; held
		 * logins go on. */
		gu->cutover = 0;
		gu->flip_pending = 0;
		ms_secret_free(&gu->pw);
		set_state(gw, gu->name, MS_USER_DESTINATION, NULL);
		held_release(gw, gu);
		return;
	}
	/* Sessions are open on the source: flip when the last one ends. */
	set_state(gw, gu->name, MS_USER_COPYING, NULL);
	gu->flip_pending = 1;
	held_release(gw, gu);
	if (gu->force) {
		/* The operator wants it now: end the sessions; the last one
		 * to go starts the cutover. */
		gu->force = 0;
		gw_sessions_kick(gw, gu->name);
	}
}

static int have_admin(const struct ms_gateway *gw)
{
	return gw->cfg.src_admin != NULL && gw->cfg.dst_admin != NULL;
}

static void user_copy_start(struct ms_gateway *gw, struct guser *gu)
{
	if (gu->copying || gw->mover == NULL ||
	    (gu->pw == NULL && !have_admin(gw)))
		return;
	gu->copying = 1;
	gw->copies++;
	gu->touched = gu->sessions > 0;
	/* A side with an admin login uses it (the user's own password is
	 * not the admin's); the other side the captured password. */
	if (ms_mover_add_user(gw->mover, gu->name,
			      gw->cfg.src_admin != NULL ? NULL : gu->pw,
			      gw->cfg.dst_admin != NULL ? NULL : gu->pw,
			      on_copy_done, gw) < 0) {
		gu->copying = 0;
		gw->copies--;
		set_state(gw, gu->name, MS_USER_FAILED,
			  "cannot start the copy");
		return;
	}
	if (gu->cutover)
		set_state(gw, gu->name, MS_USER_CUTOVER, NULL);
}

/* Cutover: from now on logins are held and inbound mail for the user is
 * deferred (451). The source's MTA gets a moment to deliver what it took
 * before the deferrals began; then the last delta runs. */
#define CUTOVER_GRACE_MS 2000

static void rollback_start(struct ms_gateway *gw, struct guser *gu);

/* In the store's last_error of a user in cutover: the cutover runs back to
 * the source (a crash in it is told apart at the next start). */
#define ROLLBACK_MARK "rolling back to the source"

/* The grace is over: the last delta, or the rollback's reverse delta. */
static void grace_over(struct ms_gateway *gw, struct guser *gu)
{
	if (gu->rollback)
		rollback_start(gw, gu);
	else
		user_copy_start(gw, gu);
}

static void on_grace(uv_timer_t *t)
{
	struct guser *gu = t->data;

	ms_close_free((uv_handle_t *)t, t);
	gu->grace = NULL;
	grace_over(gu->gw, gu);
}

static void gw_cutover_begin(struct ms_gateway *gw, struct guser *gu)
{
	gu->cutover = 1;
	set_state(gw, gu->name, MS_USER_CUTOVER,
		  gu->rollback ? ROLLBACK_MARK : NULL);
	if (gu->grace != NULL)
		return;
	gu->grace = malloc(sizeof(*gu->grace));
	if (gu->grace == NULL) {
		grace_over(gw, gu);
		return;
	}
	gu->gw = gw;
	uv_timer_init(gw->loop, gu->grace);
	gu->grace->data = gu;
	uv_timer_start(gu->grace, on_grace, CUTOVER_GRACE_MS, 0);
}

static void gw_held_tick(uv_timer_t *t)
{
	struct session *s = t->data;
	uint64_t held = uv_now(s->gw->loop) - s->held_since;

	if (held >= (uint64_t)s->gw->cfg.hold_max_seconds * 1000) {
		struct ms_user_info info;

		/* Too long: a user being copied goes on to the source (the
		 * copy goes on); one in cutover gets a temporary failure. */
		if (user_lookup(s->gw, ms_login_name(&s->login), &info) == 0 &&
		    !ms_user_in(&info, MS_USER_CUTOVER)) {
			gw_timer_stop(s);
			s->st = SS_PRELOGIN;
			gw_backend_connect(s, 0, 0);
			return;
		}
		if (s->proto == MS_GW_IMAP)
			out(s, "%s NO [UNAVAILABLE] Your mail is being moved, "
			    "try again in a minute.\r\n", s->tag);
		else
			out(s, "-ERR [IN-USE] Your mail is being moved, try "
			    "again in a minute.\r\n");
		ms_login_wipe(&s->login);
		s->st = SS_PRELOGIN;
		gw_prelogin_timer(s);
		return;
	}
	/* RFC 9585: tells the client the command is still going. */
	if (s->proto == MS_GW_IMAP)
		out(s, "* OK [INPROGRESS (\"%s\" NIL NIL)] Moving your mail, "
		    "please wait.\r\n", s->tag);
}

/* The login waits for the user's flip (held_release() goes on with it);
 * an IMAP client hears INPROGRESS meanwhile. */
static void gw_hold(struct session *s)
{
	s->st = SS_HELD;
	s->held_since = uv_now(s->gw->loop);
	gw_timer_start(s, gw_held_tick, INPROGRESS_MS, INPROGRESS_MS);
}

/* Decides where a logging-in user's session goes, now. Nothing is kept
 * for a user no server has accepted a password of yet: s->gu is NULL for
 * them (unknown to us, or known from the store only). */
static void gw_route_login(struct session *s)
{
	struct ms_gateway *gw = s->gw;
	struct guser *gu = s->gu;
	struct ms_user_info info;
	enum ms_policy pol;

	if (user_lookup(gw, ms_login_name(&s->login), &info) < 0) {
		gw_backend_fail(s, ms_store_error(gw->store));
		return;
	}
	pol = user_policy(gw, &info);
	if (ms_user_in(&info, MS_USER_DESTINATION)) {
		gw_backend_connect(s, 1, 0);
		return;
	}
	if (ms_user_in(&info, MS_USER_CUTOVER) || (gu != NULL && gu->cutover)) {
		if (s->st != SS_HELD) {
			gw_hold(s);
		}
		return;
	}
	if (s->st == SS_HELD) {
		/* Released: the copy finished (or failed) or timed out. */
		gw_timer_stop(s);
		gw_backend_connect(s, 0, 0);
		return;
	}
	if (ms_user_in(&info, MS_USER_SOURCE) && pol == MS_POLICY_HOLD &&
	    gw->mover != NULL && (gu == NULL || !gu->copying)) {
		/* Check the password at the source, then hold. */
		gw_backend_connect(s, 0, 1);
		return;
	}
	if (gu != NULL && gu->copying && pol == MS_POLICY_HOLD &&
	    ms_user_in(&info, MS_USER_COPYING) && gu->sessions == 0) {
		gw_hold(s);
		return;
	}
	gw_backend_connect(s, 0, 0);
}

/* The server accepted the user's password: from now on the user exists
 * for us (a row in the store, per-user state in memory). A passthrough
 * user's first login, or a hold's password check (s->verify_only),
 * starts the copy with the captured password. -1 when the session
 * failed instead. */
static int gw_login_accepted(struct session *s)
{
	struct ms_gateway *gw = s->gw;
	const char *name = ms_login_name(&s->login);
	struct ms_user_info info;
	struct guser *gu;

	if (user_state(gw, name, &info) < 0) {
		gw_backend_fail(s, ms_store_error(gw->store));
		return -1;
	}
	if (s->gu == NULL && (s->gu = gw_user_get(gw, name)) == NULL) {
		gw_backend_fail(s, "out of memory");
		return -1;
	}
	gu = s->gu;
	if (!s->counted && !s->verify_only) {
		/* Connected to a server from now on: the flip waits for
		 * the user's last such session. */
		gu->sessions++;
		s->counted = 1;
		if (!s->to_dst)
			gu->touched = 1;
	}
	if (!s->verify_only &&
	    (s->to_dst || (!ms_user_in(&info, MS_USER_SOURCE) &&
			   !ms_user_in(&info, MS_USER_COPYING)) ||
	     user_policy(gw, &info) != MS_POLICY_PASSTHROUGH ||
	     gw->cfg.src_imap.host[0] == '\0' ||
	     gw->cfg.dst_imap.host[0] == '\0'))
		return 0;
	ms_secret_free(&gu->pw);
	gu->pw = strdup(s->login.pass);
	user_copy_start(gw, gu);
	return 0;
}

/* A clear error for a login we refuse to pass on. */
static void gw_login_refuse(struct session *s, const char *imap_code,
			    const char *pop3_code, const char *text)
{
	if (s->proto == MS_GW_IMAP)
		out(s, "%s NO [%s] %s\r\n", s->tag, imap_code, text);
	else
		out(s, "-ERR [%s] %s\r\n", pop3_code, text);
	ms_login_wipe(&s->login);
}

/* Plaintext passwords over a connection that is not TLS, from a client
 * outside the trusted networks: refused (RFC 3501 LOGINDISABLED, as
 * Dovecot's disable_plaintext_auth). 1 when refused (answered). */
static int gw_plaintext_refused(struct session *s)
{
	if (s->tls || ms_gw_plaintext_ok(s->gw, s->peer))
		return 0;
	ms_info("session %llu: %s: plaintext login refused (not TLS, not a "
		"trusted network)", (unsigned long long)s->id, s->peer);
	gw_login_refuse(s, "PRIVACYREQUIRED", "AUTH", "Plaintext "
			"authentication disallowed on non-secure (SSL/TLS) "
			"connections.");
	return 1;
}

int ms_gw_login_names_check(const char *session, const char *user,
			    const char *name)
{
	const char *why;

	if (strlen(user) > MS_GW_USER_MAX || strlen(name) > MS_GW_USER_MAX) {
		ms_info("%s: refused a user name of %zu bytes", session,
			strlen(user) > strlen(name) ? strlen(user) :
			strlen(name));
		return MS_GW_NAME_TOO_LONG;
	}
	if ((why = ms_user_name_check(user)) != NULL ||
	    (why = ms_user_name_check(name)) != NULL) {
		ms_info("%s: refused the user name \"%s\": %s", session, name,
			why);
		return MS_GW_NAME_INVALID;
	}
	return 0;
}

static void gw_login_start(struct session *s)
{
	char what[64];
	const char *name;

	if (gw_plaintext_refused(s))
		return;

	if (s->login.user == NULL || s->login.pass == NULL ||
	    s->login.user[0] == '\0') {
		gw_login_refuse(s, "AUTHENTICATIONFAILED", "AUTH",
				"Authentication failed.");
		return;
	}
	name = ms_login_name(&s->login);
	snprintf(what, sizeof(what), "session %llu", (unsigned long long)s->id);
	switch (ms_gw_login_names_check(what, s->login.user, name)) {
	case MS_GW_NAME_TOO_LONG:
		gw_login_refuse(s, "CANNOT", "AUTH", "User name too long "
				"(at most " MS_STR(MS_GW_USER_MAX) " bytes).");
		return;
	case MS_GW_NAME_INVALID:
		gw_login_refuse(s, "AUTHENTICATIONFAILED", "AUTH",
				"Invalid characters in the user name.");
		return;
	}
	/* Another user than this session's last login: its count goes. */
	if (s->gu != NULL && strcmp(s->gu->name, name) != 0) {
		gw_session_uncount(s);
		s->gu = NULL;
	}
	if (s->gu == NULL)
		s->gu = gw_user_find(s->gw, name);
	gw_timer_stop(s);
	gw_route_login(s);
}

/* ---- IMAP before login ---- */

/* The capabilities before login: the servers' common ones, then ours. */
static void imap_capability(struct session *s, const char *fmt)
{
	int starttls = s->gw->tls != NULL && !s->tls;
	char caps[4096];

	snprintf(caps, sizeof(caps), "%s%s%s",
		 ms_caps_get(s->gw->caps, MS_CAPS_IMAP),
		 starttls ? " STARTTLS" : "",
		 s->tls || ms_gw_plaintext_ok(s->gw, s->peer) ?
		 " AUTH=PLAIN AUTH=LOGIN" : " LOGINDISABLED");
	out(s, fmt, caps);
}

static void gw_client_on_tls(struct ms_conn *conn, int status,
			     const char *error)
{
	struct session *s = ms_conn_ctx(conn);

	if (status != 0) {
		gw_session_close(s);
		return;
	}
	s->tls = 1;
	s->st = SS_PRELOGIN;
}

static void imap_bad(struct session *s, const char *tag, const char *text)
{
	out(s, "%s BAD %s\r\n", tag, text);
	if (++s->bad >= GW_BAD_MAX) {
		out(s, "* BYE Too many invalid commands.\r\n");
		gw_session_close(s);
	}
}

static void imap_command(struct session *s)
{
	const char *tag, *cmd;

	if (s->argc == 0)
		return;
	tag = s->argv[0];
	if (strlen(tag) >= sizeof(s->tag)) {
		/* Answered with a cut tag, the client would wait forever. */
		imap_bad(s, "*", "Tag too long.");
		return;
	}
	snprintf(s->tag, sizeof(s->tag), "%s", tag);
	if (s->argc < 2) {
		imap_bad(s, "*", "Error in IMAP command received by server.");
		return;
	}
	cmd = s->argv[1];
	if (!strcasecmp(cmd, "CAPABILITY")) {
		imap_capability(s, "* CAPABILITY %s\r\n");
		out(s, "%s OK Pre-login capabilities listed.\r\n", tag);
	} else if (!strcasecmp(cmd, "NOOP")) {
		out(s, "%s OK NOOP completed.\r\n", tag);
	} else if (!strcasecmp(cmd, "ID")) {
		out(s, "* ID (\"name\" \"mailshift\")\r\n%s OK ID completed.\r\n",
		    tag);
	} else if (!strcasecmp(cmd, "LOGOUT")) {
		out(s, "* BYE Logging out\r\n%s OK Logout completed.\r\n", tag);
		gw_session_close(s);
	} else if (!strcasecmp(cmd, "STARTTLS")) {
		if (s->gw->tls == NULL || s->tls) {
			imap_bad(s, tag, "TLS is not available.");
			return;
		}
		out(s, "%s OK Begin TLS negotiation now.\r\n", tag);
		/* Nothing the client sent after STARTTLS in the clear may
		 * count (command injection, RFC 3501 11.1). */
		s->inlen = 0;
		s->st = SS_STARTTLS;
		if (ms_conn_starttls_server(s->c, s->gw->tls,
					    gw_client_on_tls) < 0)
			gw_session_close(s);
	} else if (!strcasecmp(cmd, "LOGIN")) {
		if (s->argc != 4) {
			imap_bad(s, tag, "Invalid arguments.");
			return;
		}
		ms_login_wipe(&s->login);
		s->login.user = strdup(s->argv[2]);
		s->login.pass = strdup(s->argv[3]);
		gw_login_start(s);
	} else if (!strcasecmp(cmd, "AUTHENTICATE")) {
		if (s->argc < 3 || s->argc > 4) {
			imap_bad(s, tag, "Invalid arguments.");
			return;
		}
		if (gw_plaintext_refused(s))
			return;
		if (!strcasecmp(s->argv[2], "PLAIN")) {
			if (s->argc == 4) {
				if (ms_login_take_plain(&s->login, s->argv[3]) < 0) {
					imap_bad(s, tag, "Invalid base64 data.");
					return;
				}
				gw_login_start(s);
				return;
			}
			s->st = SS_AUTH_PLAIN;
			out(s, "+ \r\n");
		} else if (!strcasecmp(s->argv[2], "LOGIN")) {
			s->st = SS_AUTH_USER;
			out(s, "+ VXNlcm5hbWU6\r\n");
		} else {
			out(s, "%s NO Unsupported authentication mechanism.\r\n",
			    tag);
		}
	} else {
		imap_bad(s, tag, "Please log in first.");
	}
}

/* A line of an AUTHENTICATE exchange (base64, or "*" to cancel). */
static void imap_auth_line(struct session *s, char *line)
{
	char *step;
	int r;

	if (!strcmp(line, "*")) {
		s->st = SS_PRELOGIN;
		out(s, "%s BAD Authentication aborted by client.\r\n", s->tag);
		ms_login_wipe(&s->login);
		return;
	}
	if (s->st == SS_AUTH_PLAIN) {
		s->st = SS_PRELOGIN;
		if (ms_login_take_plain(&s->login, line) < 0) {
			imap_bad(s, s->tag, "Invalid base64 data.");
			return;
		}
		gw_login_start(s);
		return;
	}
	r = ms_login_decode_step(line, &step);
	if (r < 0) {
		ms_login_wipe(&s->login);
		s->st = SS_PRELOGIN;
		imap_bad(s, s->tag, r == MS_LOGIN_NUL ?
			 "Invalid characters in the login." :
			 "Invalid base64 data.");
		return;
	}
	if (s->st == SS_AUTH_USER) {
		ms_login_wipe(&s->login);
		s->login.user = step;
		s->st = SS_AUTH_PASS;
		out(s, "+ UGFzc3dvcmQ6\r\n");
		return;
	}
	s->login.pass = step;
	s->st = SS_PRELOGIN;
	gw_login_start(s);
}

/* Splits one command line into s->argv (atoms and quoted strings); a
 * trailing {N} or {N+} starts a literal. Returns 1 when the command is
 * complete, 0 when a literal follows, -1 on a syntax error. */
static int imap_tokenize(struct session *s, const char *p)
{
	while (*p != '\0') {
		char tok[GW_LITERAL_MAX + 1];
		size_t n = 0;

		while (*p == ' ')
			p++;
		if (*p == '\0')
			break;
		if (s->argc == GW_ARG_MAX)
			return -1;
		if (*p == '"') {
			for (p++; *p != '"'; p++) {
				if (*p == '\0' || n == GW_LITERAL_MAX)
					return -1;
				if (*p == '\\' && (p[1] == '"' || p[1] == '\\'))
					p++;
				tok[n++] = *p;
			}
			p++;
		} else if (*p == '{') {
			char *e;
			unsigned long len = strtoul(p + 1, &e, 10);
			int plus = *e == '+';

			if (e == p + 1 || (plus && e[1] != '}') ||
			    (!plus && *e != '}') || e[plus + 1] != '\0' ||
			    len > GW_LITERAL_MAX)
				return -1;
			s->lit_need = len;
			s->argv[s->argc] = calloc(1, len + 1);
			if (s->argv[s->argc] == NULL)
				return -1;
			s->argc++;
			if (!plus)
				out(s, "+ OK\r\n");
			return 0;
		} else {
			while (*p != '\0' && *p != ' ' && n < GW_LITERAL_MAX)
				tok[n++] = *p++;
			/* Longer: an error, never two arguments. */
			if (*p != '\0' && *p != ' ')
				return -1;
		}
		tok[n] = '\0';
		s->argv[s->argc++] = strdup(tok);
		OPENSSL_cleanse(tok, n);
	}
	return 1;
}

static void imap_process(struct session *s)
{
	while (s->inlen > 0 && gw_prelogin_reading(s) &&
	       !ms_conn_over_high(s->c)) {
		char *lf, *line;
		size_t linelen;
		int r;

		if (s->lit_need > 0) {
			char *arg = s->argv[s->argc - 1];
			size_t have = strlen(arg);
			size_t n = s->inlen < s->lit_need ? s->inlen : s->lit_need;

			/* A NUL inside a login literal cannot be replayed. */
			if (memchr(s->in, '\0', n) != NULL) {
				gw_clear_args(s);
				s->inlen = 0;
				imap_bad(s, "*", "Invalid literal.");
				return;
			}
			memcpy(arg + have, s->in, n);
			arg[have + n] = '\0';
			memmove(s->in, s->in + n, s->inlen - n);
			s->inlen -= n;
			s->lit_need -= n;
			continue;
		}
		lf = memchr(s->in, '\n', s->inlen);
		if ((lf == NULL && s->inlen >= GW_INBUF_MAX) ||
		    (lf != NULL && (size_t)(lf - s->in) >= GW_INBUF_MAX)) {
			gw_line_too_long(s);
			return;
		}
		if (lf == NULL)
			return;
		linelen = (size_t)(lf - s->in);
		line = s->in;
		line[linelen] = '\0';
		if (linelen > 0 && line[linelen - 1] == '\r')
			line[linelen - 1] = '\0';
		if (memchr(line, '\0', linelen > 0 ? linelen - 1 : 0) != NULL &&
		    strlen(line) + 1 < linelen) {
			/* A NUL byte inside the line: never valid. */
			memmove(s->in, lf + 1, s->inlen - linelen - 1);
			s->inlen -= linelen + 1;
			gw_clear_args(s);
			imap_bad(s, "*", "Invalid characters in command.");
			if (s->st == SS_CLOSING)
				return;
			continue;
		}
		if (s->st != SS_PRELOGIN) {
			char copy[GW_INBUF_MAX];

			snprintf(copy, sizeof(copy), "%s", line);
			memmove(s->in, lf + 1, s->inlen - linelen - 1);
			s->inlen -= linelen + 1;
			imap_auth_line(s, copy);
			OPENSSL_cleanse(copy, sizeof(copy));
			continue;
		}
		r = imap_tokenize(s, line);
		memmove(s->in, lf + 1, s->inlen - linelen - 1);
		s->inlen -= linelen + 1;
		if (r < 0) {
			char tag[sizeof(s->tag)];

			snprintf(tag, sizeof(tag), "%s", s->argc > 0 &&
				 strlen(s->argv[0]) < sizeof(tag) ?
				 s->argv[0] : "*");
			gw_clear_args(s);
			imap_bad(s, tag, "Error in IMAP command received by "
				 "server.");
			if (s->st == SS_CLOSING)
				return;
			continue;
		}
		if (r == 0)
			continue;	/* a literal follows */
		if (gw_too_many_commands(s))
			return;
		imap_command(s);
		if (s->st == SS_CLOSING)
			return;
		gw_clear_args(s);
	}
}

/* ---- POP3 before login ---- */

/* CAPA: the servers' common capabilities; USER and SASL PLAIN only where
 * a plaintext password is welcome. */
static void pop3_capa(struct session *s)
{
	const char *caps = ms_caps_get(s->gw->caps, MS_CAPS_POP3);
	int auth = s->tls || ms_gw_plaintext_ok(s->gw, s->peer);

	out(s, "+OK\r\n");
	while (*caps != '\0') {
		const char *eol = strstr(caps, "\r\n");
		size_t n = eol != NULL ? (size_t)(eol - caps) : strlen(caps);

		if (auth || !((n == 4 && !strncasecmp(caps, "USER", 4)) ||
			      (n >= 5 && !strncasecmp(caps, "SASL ", 5))))
			out(s, "%.*s\r\n", (int)n, caps);
		caps += n;
		if (eol != NULL)
			caps += 2;
	}
	out(s, "%s.\r\n", s->gw->tls != NULL && !s->tls ? "STLS\r\n" : "");
}

static void pop3_command(struct session *s, char *line)
{
	char *arg = strchr(line, ' ');

	if (arg != NULL)
		*arg++ = '\0';
	if (!strcasecmp(line, "CAPA")) {
		pop3_capa(s);
	} else if (!strcasecmp(line, "NOOP")) {
		out(s, "+OK\r\n");
	} else if (!strcasecmp(line, "QUIT")) {
		out(s, "+OK Logging out\r\n");
		gw_session_close(s);
	} else if (!strcasecmp(line, "STLS")) {
		if (s->gw->tls == NULL || s->tls) {
			out(s, "-ERR TLS is not available.\r\n");
			return;
		}
		out(s, "+OK Begin TLS negotiation now.\r\n");
		s->inlen = 0;
		s->st = SS_STARTTLS;
		if (ms_conn_starttls_server(s->c, s->gw->tls,
					    gw_client_on_tls) < 0)
			gw_session_close(s);
	} else if (!strcasecmp(line, "USER") && arg != NULL) {
		if (gw_plaintext_refused(s))
			return;
		ms_login_wipe(&s->login);
		s->login.user = strdup(arg);
		out(s, "+OK\r\n");
	} else if (!strcasecmp(line, "PASS") && arg != NULL &&
		   s->login.user != NULL) {
		s->login.pass = strdup(arg);
		gw_login_start(s);
	} else if (!strcasecmp(line, "AUTH") && arg != NULL) {
		char *ir = strchr(arg, ' ');

		if (ir != NULL)
			*ir++ = '\0';
		if (strcasecmp(arg, "PLAIN") != 0) {
			out(s, "-ERR Unsupported authentication mechanism.\r\n");
			return;
		}
		if (gw_plaintext_refused(s))
			return;
		if (ir == NULL) {
			s->st = SS_AUTH_PLAIN;
			out(s, "+ \r\n");
			return;
		}
		if (ms_login_take_plain(&s->login, ir) < 0) {
			out(s, "-ERR Invalid base64 data.\r\n");
			return;
		}
		gw_login_start(s);
	} else {
		out(s, "-ERR Unknown command.\r\n");
		if (++s->bad >= GW_BAD_MAX)
			gw_session_close(s);
	}
}

static void pop3_process(struct session *s)
{
	while (s->inlen > 0 && (s->st == SS_PRELOGIN || s->st == SS_AUTH_PLAIN) &&
	       !ms_conn_over_high(s->c)) {
		char line[GW_INBUF_MAX];
		char *lf = memchr(s->in, '\n', s->inlen);
		size_t linelen;

		if ((lf == NULL && s->inlen >= GW_INBUF_MAX) ||
		    (lf != NULL && (size_t)(lf - s->in) >= GW_INBUF_MAX)) {
			gw_line_too_long(s);
			return;
		}
		if (lf == NULL)
			return;
		linelen = (size_t)(lf - s->in);
		memcpy(line, s->in, linelen);
		line[linelen] = '\0';
		if (linelen > 0 && line[linelen - 1] == '\r')
			line[linelen - 1] = '\0';
		memmove(s->in, lf + 1, s->inlen - linelen - 1);
		s->inlen -= linelen + 1;
		if (gw_too_many_commands(s)) {
			OPENSSL_cleanse(line, linelen);
			return;
		}
		if (s->st == SS_AUTH_PLAIN) {
			s->st = SS_PRELOGIN;
			if (!strcmp(line, "*")) {
				out(s, "-ERR Authentication aborted.\r\n");
			} else if (ms_login_take_plain(&s->login, line) < 0) {
				out(s, "-ERR Invalid base64 data.\r\n");
			} else {
				gw_login_start(s);
			}
		} else {
			pop3_command(s, line);
		}
		OPENSSL_cleanse(line, linelen);
		if (s->st == SS_CLOSING)
			return;
	}
}

static void imap_greet(struct session *s)
{
	imap_capability(s, "* OK [CAPABILITY %s] mailshift ready.\r\n");
}

static void pop3_greet(struct session *s)
{
	out(s, "+OK mailshift ready.\r\n");
}

static const struct gw_proto imap_proto = {
	.greet = imap_greet,
	.process = imap_process,
	.send_login = imap_send_login,
	.backend_line = imap_backend_line,
};

static const struct gw_proto pop3_proto = {
	.greet = pop3_greet,
	.process = pop3_process,
	.send_login = pop3_send_login,
	.backend_line = pop3_backend_line,
	.relay_client = uidl_relay_client,
	.relay_server = uidl_relay_server,
	.relay_free = uidl_relay_free,
};

/* ---- client connection ---- */

static int gw_prelogin_reading(const struct session *s)
{
	return s->st == SS_PRELOGIN || s->st == SS_AUTH_PLAIN ||
		s->st == SS_AUTH_USER || s->st == SS_AUTH_PASS;
}

/* One more command before login: 1 (and the session ends) when that is
 * more than PRELOGIN_CMDS_MAX. */
static int gw_too_many_commands(struct session *s)
{
	if (++s->ncmds <= PRELOGIN_CMDS_MAX)
		return 0;
	ms_warn("session %llu: %s: more than %d commands before login",
		(unsigned long long)s->id, s->peer, PRELOGIN_CMDS_MAX);
	if (s->proto == MS_GW_IMAP)
		out(s, "* BYE Too many commands before login.\r\n");
	else
		out(s, "-ERR Too many commands before login.\r\n");
	gw_clear_args(s);
	gw_session_close(s);
	return 1;
}

static void gw_line_too_long(struct session *s)
{
	if (s->proto == MS_GW_IMAP)
		out(s, "* BYE Input line too long.\r\n");
	else
		out(s, "-ERR Input line too long.\r\n");
	gw_session_close(s);
}

static void gw_prelogin_timer(struct session *s)
{
	uint64_t now = uv_now(s->gw->loop);
	uint64_t end = s->born_ms + PRELOGIN_MAX_MS;
	uint64_t ms = PRELOGIN_TIMEOUT_MS;

	if (end <= now)
		ms = 1;
	else if (end - now < ms)
		ms = end - now;
	gw_timer_start(s, on_idle_timeout, ms, 0);
}

/* The commands buffered so far, while the client reads our answers: one
 * that does not is not read any more (until on_client_drain); nor is one
 * that sent GW_INBUF_MAX bytes we cannot take yet (a login under way).
 * Called again from inside (a login refused at once): the running loop
 * goes on with the next command. */
static void gw_prelogin_process(struct session *s)
{
	if (s->processing || s->st == SS_CLOSING)
		return;
	if (gw_prelogin_reading(s)) {
		s->processing = 1;
		s->pr->process(s);
		s->processing = 0;
	}
	if (s->st == SS_CLOSING || s->st == SS_RELAY)
		return;
	if (gw_prelogin_reading(s) && ms_conn_over_high(s->c))
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_WRITE);
	if (s->inlen >= GW_INBUF_MAX)
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_INPUT);
	else
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_INPUT);
}

static void on_client_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct session *s = ms_conn_ctx(conn);

	if (s->st == SS_RELAY) {
		if (s->ur != NULL)
			s->pr->relay_client(s, data, len);
		if (ms_relay(s->b, s->c, &s->c_paused, data, len) < 0)
			gw_session_close(s);
		return;
	}
	if (s->st == SS_STARTTLS)
		return;
	if (inbuf_reserve(s, len) < 0) {
		/* Cannot happen while reading stops at GW_INBUF_MAX. */
		gw_line_too_long(s);
		return;
	}
	memcpy(s->in + s->inlen, data, len);
	s->inlen += len;
	if (gw_prelogin_reading(s))
		gw_prelogin_timer(s);
	gw_prelogin_process(s);
}

static void on_client_error(struct ms_conn *conn, const char *error)
{
	gw_session_close(ms_conn_ctx(conn));
}

static void on_client_connect(struct ms_conn *conn, int status,
			      const char *error)
{
	struct session *s = ms_conn_ctx(conn);

	if (status != 0) {
		gw_session_close(s);
		return;
	}
	ms_conn_peer_addr(conn, s->peer, sizeof(s->peer), &s->peer_port);
	ms_conn_local_addr(conn, s->local, sizeof(s->local), &s->local_port);
	s->pr->greet(s);
	s->st = SS_PRELOGIN;
	gw_prelogin_timer(s);
}

/* Takes one pending connection of an IMAP or POP3 listener (cfg), for
 * the protocol pr. */
static void gw_session_accept(struct ms_gateway *gw, uv_stream_t *server,
			      const struct ms_gw_listen *cfg,
			      const struct gw_proto *pr)
{
	struct ms_conn_callbacks cb = {
		.on_connect = on_client_connect,
		.on_read = on_client_read,
		.on_error = on_client_error,
		.on_drain = on_client_drain,
	};
	const char *why;
	struct session *s;

	s = calloc(1, sizeof(*s));
	if (s == NULL) {
		ms_drop_connection(server);
		return;
	}
	s->gw = gw;
	s->id = ++gw->next_id;
	s->proto = cfg->proto;
	s->pr = pr;
	s->tls = cfg->implicit_tls;
	s->since = time(NULL);
	s->st = SS_PRELOGIN;
	cb.ctx = s;
	if (ms_conn_accept(server, cfg->implicit_tls ? gw->tls : NULL, &cb,
			   &s->c) < 0) {
		free(s);
		return;
	}
	ms_conn_peer_addr(s->c, s->peer, sizeof(s->peer), &s->peer_port);
	if (ms_gw_admit(gw, s->peer, &why) < 0) {
		/* Said in plaintext only: a TLS client is just closed. */
		if (!cfg->implicit_tls)
			ms_conn_printf(s->c, s->proto == MS_GW_IMAP ?
				       "* BYE %s\r\n" : "-ERR [SYS/TEMP] %s\r\n",
				       why);
		ms_conn_close(&s->c);
		free(s);
		return;
	}
	s->admitted = 1;
	/* Until the login is over: small output queue (a client that sends
	 * and never reads stops being read), secrets wiped. */
	ms_conn_set_water(s->c, PRELOGIN_OUT_HIGH, PRELOGIN_OUT_LOW);
	ms_conn_set_wipe(s->c, 1);
	uv_timer_init(gw->loop, &s->timer);
	s->timer.data = s;
	s->born_ms = uv_now(gw->loop);
	/* From the start: a TLS handshake that never ends is timed out. */
	gw_prelogin_timer(s);
	s->next = gw->sessions;
	if (s->next != NULL)
		s->next->prev = s;
	gw->sessions = s;
}

static void imap_accept(struct ms_gateway *gw, uv_stream_t *listener,
			const struct ms_gw_listen *cfg)
{
	gw_session_accept(gw, listener, cfg, &imap_proto);
}

static void pop3_accept(struct ms_gateway *gw, uv_stream_t *listener,
			const struct ms_gw_listen *cfg)
{
	gw_session_accept(gw, listener, cfg, &pop3_proto);
}

/* The IMAP and POP3 front ends: their sessions are the mailbox sessions
 * (ms_gw_mailbox_sessions). */
const struct ms_gw_frontend ms_gw_imap_frontend = {
	.name = "imap",
	.protos = 1 << MS_GW_IMAP,
	.accept = imap_accept,
};

const struct ms_gw_frontend ms_gw_pop3_frontend = {
	.name = "pop3",
	.protos = 1 << MS_GW_POP3,
	.accept = pop3_accept,
};

/* ---- listeners ---- */

/* The front ends the gateway serves, each as it describes itself
 * (gw_route.h); the order of the sessions list. */
static const struct ms_gw_frontend *const frontends[] = {
	&ms_gw_imap_frontend,
	&ms_gw_pop3_frontend,
	&ms_gw_mailbox_sessions,
	&ms_gw_smtp_frontend,
};

#define for_each_frontend(fe) \
	for (const struct ms_gw_frontend *const *fe = frontends; \
	     fe < frontends + sizeof(frontends) / sizeof(frontends[0]); fe++)

/* A listener's pending connection goes to the front end of its protocol. */
static void on_connection(uv_stream_t *server, int status)
{
	struct listener *l = server->data;

	if (status < 0)
		return;
	for_each_frontend(fe)
		if ((*fe)->accept != NULL &&
		    ((*fe)->protos & 1U << l->cfg.proto)) {
			(*fe)->accept(l->gw, server, &l->cfg);
			return;
		}
	ms_drop_connection(server);
}

/* ---- limits and defaults before login ---- */

static int addr_trusted(struct ms_gateway *gw, const char *addr);

int ms_gw_admit(struct ms_gateway *gw, const char *addr,
		const char **why_r)
{
	unsigned int max = gw->cfg.max_conns ? gw->cfg.max_conns :
		MS_GW_MAX_CONNS;
	unsigned int per = gw->cfg.max_conns_per_ip ? gw->cfg.max_conns_per_ip :
		MS_GW_MAX_CONNS_PER_IP;
	struct addr_count **head =
		&gw->per_addr[ms_str_hash(addr) % ADDR_BUCKETS];
	struct addr_count *a;

	if (gw->nconns >= max) {
		*why_r = "Too many connections.";
		ms_warn("connection from %s refused: %u connections (the "
			"[listen] max_connections)", addr, gw->nconns);
		return -1;
	}
	for (a = *head; a != NULL; a = a->next)
		if (strcmp(a->addr, addr) == 0)
			break;
	/* The trusted networks (a webmail, the site's own relays) are
	 * many users behind one address: only the overall limit. */
	if (a != NULL && a->n >= per && !addr_trusted(gw, addr)) {
		*why_r = "Too many connections from your address.";
		ms_warn("connection from %s refused: %u from that address (the "
			"[listen] max_connections_per_ip)", addr, a->n);
		return -1;
	}
	if (a == NULL) {
		a = calloc(1, sizeof(*a));
		if (a == NULL) {
			*why_r = "Out of memory, try again later.";
			return -1;
		}
		snprintf(a->addr, sizeof(a->addr), "%s", addr);
		a->next = *head;
		*head = a;
	}
	a->n++;
	gw->nconns++;
	return 0;
}

void ms_gw_unadmit(struct ms_gateway *gw, const char *addr)
{
	struct addr_count **pp =
		&gw->per_addr[ms_str_hash(addr) % ADDR_BUCKETS];

	for (; *pp != NULL; pp = &(*pp)->next) {
		struct addr_count *a = *pp;

		if (strcmp(a->addr, addr) != 0)
			continue;
		gw->nconns--;
		if (--a->n == 0) {
			*pp = a->next;
			free(a);
		}
		return;
	}
}

static int addr_trusted(struct ms_gateway *gw, const char *addr)
{
	static struct ms_cidr loopback[2];
	const struct ms_cidr *t = gw->cfg.trusted;
	unsigned int n = gw->cfg.ntrusted;

	if (!gw->cfg.trusted_set) {
		if (loopback[0].family == 0) {
			ms_cidr_parse("127.0.0.0/8", &loopback[0]);
			ms_cidr_parse("::1", &loopback[1]);
		}
		t = loopback;
		n = 2;
	}
	for (unsigned int i = 0; i < n; i++)
		if (ms_cidr_match(&t[i], addr))
			return 1;
	return 0;
}

int ms_gw_plaintext_ok(struct ms_gateway *gw, const char *addr)
{
	return gw->cfg.plaintext_auth || addr_trusted(gw, addr);
}

static int parse_count(const char *key, const char *value, unsigned int max,
		       unsigned int *out, char *err, size_t errsz)
{
	char *end;
	unsigned long v;

	if (*value < '0' || *value > '9' ||
	    (v = strtoul(value, &end, 10), *end != '\0') || v == 0 || v > max) {
		snprintf(err, errsz, "%s: a number from 1 to %u", key, max);
		return -1;
	}
	*out = (unsigned int)v;
	return 0;
}

int ms_gw_listen_key(struct ms_gw_config *cfg, const char *key,
		     const char *value, char *err, size_t errsz)
{
	if (!strcmp(key, "max_connections"))
		return parse_count(key, value, 1000000, &cfg->max_conns, err,
				   errsz);
	if (!strcmp(key, "max_connections_per_ip"))
		return parse_count(key, value, 1000000, &cfg->max_conns_per_ip,
				   err, errsz);
	if (!strcmp(key, "plaintext_auth")) {
		if ((cfg->plaintext_auth = ms_parse_bool(value)) < 0) {
			snprintf(err, errsz, "plaintext_auth: yes or no");
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "trusted_networks")) {
		char buf[2048], *save = NULL;

		if (strlen(value) >= sizeof(buf)) {
			snprintf(err, errsz, "trusted_networks: too long");
			return -1;
		}
		snprintf(buf, sizeof(buf), "%s", value);
		cfg->ntrusted = 0;
		cfg->trusted_set = 1;
		for (char *w = strtok_r(buf, " ,\t", &save); w != NULL;
		     w = strtok_r(NULL, " ,\t", &save)) {
			if (cfg->ntrusted == MS_GW_MAX_TRUSTED) {
				snprintf(err, errsz, "trusted_networks: at "
					 "most %d", MS_GW_MAX_TRUSTED);
				return -1;
			}
			if (ms_cidr_parse(w, &cfg->trusted[cfg->ntrusted]) < 0) {
				snprintf(err, errsz, "trusted_networks: \"%s\" "
					 "is not an address or ADDR/BITS", w);
				return -1;
			}
			cfg->ntrusted++;
		}
		return 0;
	}
	return 1;
}

/* ---- control ---- */

json_t *ms_gateway_policies(struct ms_gateway *gw)
{
	json_t *o = json_object(), *d = json_object();

	json_object_set_new(o, "default", json_string(
		ms_policy_name(gw->cfg.policy)));
	for (unsigned int i = 0; i < gw->cfg.ndomains; i++)
		json_object_set_new(d, gw->cfg.domains[i].domain, json_string(
			ms_policy_name(gw->cfg.domains[i].policy)));
	json_object_set_new(o, "domains", d);
	json_object_set_new(o, "hold_max_seconds",
			    json_integer(gw->cfg.hold_max_seconds));
	/* Which of those were set at run time ("" = the default). */
	json_object_set(o, "set", gw->policy_set);
	return o;
}

static int policy_collect(void *ctx, const char *scope, const char *policy)
{
	json_object_set_new(ctx, scope, json_string(policy));
	return 0;
}

/* cfg's policies = the config file's, then the store's overrides. */
static int policies_load(struct ms_gateway *gw, char *err, size_t errsz)
{
	json_t *set = json_object();
	json_t *v;
	const char *scope;

	if (ms_store_policy_foreach(gw->store, policy_collect, set) != 0) {
		snprintf(err, errsz, "store: %s", ms_store_error(gw->store));
		json_decref(set);
		return -1;
	}
	gw->cfg.policy = gw->conf_policy;
	gw->cfg.ndomains = gw->conf_ndomains;
	memcpy(gw->cfg.domains, gw->conf_domains, sizeof(gw->cfg.domains));
	json_object_foreach(set, scope, v) {
		enum ms_policy p;
		unsigned int i;

		if (ms_policy_parse(json_string_value(v), &p) < 0)
			continue;
		if (*scope == '\0') {
			gw->cfg.policy = p;
			continue;
		}
		for (i = 0; i < gw->cfg.ndomains; i++)
			if (!strcasecmp(gw->cfg.domains[i].domain, scope))
				break;
		if (i == MS_GW_MAX_DOMAINS)
			continue;	/* refused when it was set */
		if (i == gw->cfg.ndomains) {
			snprintf(gw->cfg.domains[i].domain,
				 sizeof(gw->cfg.domains[i].domain), "%s",
				 scope);
			gw->cfg.ndomains++;
		}
		gw->cfg.domains[i].policy = p;
	}
	json_decref(gw->policy_set);
	gw->policy_set = set;
	return 0;
}

int ms_gateway_set_policy(struct ms_gateway *gw, const char *domain,
			  const char *policy, char *err, size_t errsz)
{
	char lower[sizeof(gw->cfg.domains[0].domain)];
	enum ms_policy p;

	if (domain != NULL) {
		unsigned int n = 0;

		if (*domain == '\0' || strlen(domain) >=
		    sizeof(gw->cfg.domains[0].domain) ||
		    strpbrk(domain, "@ \t\r\n\"\\") != NULL) {
			snprintf(err, errsz, "invalid domain \"%s\"", domain);
			return -1;
		}
		for (size_t i = 0; i <= strlen(domain); i++)
			lower[i] = (char)tolower((unsigned char)domain[i]);
		domain = lower;
		for (unsigned int i = 0; i < gw->cfg.ndomains; i++)
			n += strcasecmp(gw->cfg.domains[i].domain, domain) != 0;
		if (policy != NULL && n >= MS_GW_MAX_DOMAINS) {
			snprintf(err, errsz, "at most %d domains have a policy",
				 MS_GW_MAX_DOMAINS);
			return -1;
		}
	}
	if (policy != NULL && ms_policy_parse(policy, &p) < 0) {
		snprintf(err, errsz, "invalid policy \"%s\" (passthrough, hold "
			 "or off)", policy);
		return -1;
	}
	if (ms_store_policy_set(gw->store, domain != NULL ? domain : "",
				policy) < 0) {
		snprintf(err, errsz, "store: %s", ms_store_error(gw->store));
		return -1;
	}
	ms_info("policy of %s%s: %s", domain != NULL ? "@" : "",
		domain != NULL ? domain : "every user (the default)",
		policy != NULL ? policy : "the config file's again");
	return policies_load(gw, err, errsz);
}

/* "ADDR:PORT" ("[V6]:PORT") as a JSON string. */
static json_t *json_addr(const char *addr, unsigned int port)
{
	char buf[96];

	snprintf(buf, sizeof(buf), strchr(addr, ':') != NULL ? "[%s]:%u" :
		 "%s:%u", addr, port);
	return json_string(buf);
}

json_t *ms_gw_session_json(const struct ms_gw_session_row *r)
{
	json_t *o = json_object();

	json_object_set_new(o, "id", json_integer((json_int_t)r->id));
	json_object_set_new(o, "user", r->user != NULL ?
			    json_string(r->user) : json_null());
	json_object_set_new(o, "proto", json_string(r->proto));
	json_object_set_new(o, "client", json_string(r->client));
	json_object_set_new(o, "local", json_addr(r->local, r->local_port));
	json_object_set_new(o, "server", json_string(r->server));
	json_object_set_new(o, "state", json_string(r->state));
	json_object_set_new(o, "tls", json_boolean(r->tls));
	json_object_set_new(o, "since", json_integer(r->since));
	return o;
}

/* ---- the mailbox sessions (IMAP, POP3), as the gateway reaches them ---- */

static void gw_sessions_json(struct ms_gateway *gw, json_t *a)
{
	for (struct session *s = gw->sessions; s != NULL; s = s->next) {
		const char *state = s->st == SS_RELAY ? "relay" :
			s->st == SS_HELD ? "held" : s->st == SS_BACKEND ?
			"login" : "prelogin";
		struct ms_gw_session_row row = {
			.id = s->id,
			.user = s->gu != NULL ? s->gu->name : NULL,
			.proto = s->proto == MS_GW_IMAP ? "imap" : "pop3",
			.client = s->peer,
			.local = s->local,
			.local_port = s->local_port,
			.server = s->st == SS_RELAY || s->st == SS_BACKEND ?
				  (s->to_dst ? "destination" : "source") : "-",
			.state = state,
			.tls = s->tls,
			.since = s->since,
		};

		json_array_append_new(a, ms_gw_session_json(&row));
	}
}

static unsigned int gw_sessions_count(struct ms_gateway *gw)
{
	unsigned int n = 0;

	for (struct session *s = gw->sessions; s != NULL; s = s->next)
		n++;
	return n;
}

static void gw_sessions_close_all(struct ms_gateway *gw)
{
	while (gw->sessions != NULL)
		gw_session_close(gw->sessions);
}

const struct ms_gw_frontend ms_gw_mailbox_sessions = {
	.name = "mailbox sessions",
	.mailbox = 1,
	.sessions = gw_sessions_json,
	.count = gw_sessions_count,
	.kick = gw_sessions_kick,
	.close_all = gw_sessions_close_all,
};

/* ---- control ---- */

json_t *ms_gateway_sessions(struct ms_gateway *gw)
{
	json_t *a = json_array();

	for_each_frontend(fe)
		if ((*fe)->sessions != NULL)
			(*fe)->sessions(gw, a);
	return a;
}

int ms_gateway_kick(struct ms_gateway *gw, const char *user)
{
	int n = 0;

	for_each_frontend(fe)
		if ((*fe)->kick != NULL)
			n += (*fe)->kick(gw, user);
	return n;
}

unsigned int ms_gateway_nsessions(struct ms_gateway *gw)
{
	unsigned int n = 0;

	for_each_frontend(fe)
		if ((*fe)->mailbox && (*fe)->count != NULL)
			n += (*fe)->count(gw);
	return n;
}

enum ms_route ms_gw_route(struct ms_gateway *gw, const char *user)
{
	struct ms_user_info info;
	struct guser *gu = gw_user_find(gw, user);
	int found = 0;

	if (gu != NULL && gu->cutover)
		return MS_ROUTE_DEFER;
	if (ms_store_user_info(gw->store, user, &info, &found) < 0 || !found)
		return MS_ROUTE_SOURCE;
	if (ms_user_in(&info, MS_USER_DESTINATION))
		return MS_ROUTE_DESTINATION;
	if (ms_user_in(&info, MS_USER_CUTOVER))
		return MS_ROUTE_DEFER;
	/* Mail for the source while the user's copy runs may land after
	 * its folder was read: the flip then needs a cutover (mail
	 * deferred, the source's MTA given its grace, a last delta). */
	if (gu != NULL && (gu->copying || gu->flip_pending))
		gu->touched = 1;
	return MS_ROUTE_SOURCE;
}

const struct ms_gw_config *ms_gw_config(struct ms_gateway *gw)
{
	return &gw->cfg;
}

struct ms_tls_server *ms_gw_tls(struct ms_gateway *gw)
{
	return gw->tls;
}

uv_loop_t *ms_gw_loop(struct ms_gateway *gw)
{
	return gw->loop;
}

int ms_gateway_migrate(struct ms_gateway *gw, const char *user,
		       const char **error_r)
{
	struct ms_user_info info;
	struct guser *gu;

	if (gw->mover == NULL) {
		*error_r = "no [source] and [destination] imap configured";
		return -1;
	}
	if (user_state(gw, user, &info) < 0) {
		*error_r = ms_store_error(gw->store);
		return -1;
	}
	if (ms_user_in(&info, MS_USER_DESTINATION)) {
		*error_r = "already on the destination";
		return -1;
	}
	gu = gw_user_get(gw, user);
	if (gu == NULL) {
		*error_r = "out of memory";
		return -1;
	}
	if (gu->pw == NULL && !have_admin(gw)) {
		*error_r = "needs admin logins ([source] admin, [destination] "
			   "admin) or a login of the user since the start";
		return -1;
	}
	gu->force = 1;
	if (gu->flip_pending) {
		gu->force = 0;
		gw_sessions_kick(gw, user);
		return 0;
	}
	if (!gu->copying) {
		set_state(gw, user, MS_USER_COPYING, NULL);
		user_copy_start(gw, gu);
	}
	return 0;
}

/* ---- rollback: the destination's changes back to the source ---- */

static void on_rollback_done(const struct ms_user_report *rep, void *ctx)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = job_ended(gw, rep->user);

	if (gu == NULL)
		return;
	gu->cutover = 0;
	gu->rollback = 0;
	if (rep->ok) {
		int64_t id;

		ms_info("%s: rolled back: %llu messages copied to the source, "
			"%llu flag changes, %llu expunged; policy off", gu->name,
			(unsigned long long)rep->copied,
			(unsigned long long)rep->flags_updated,
			(unsigned long long)rep->expunged);
		set_state(gw, gu->name, MS_USER_SOURCE, NULL);
		/* Sent back on purpose: neither the next login nor the
		 * sweep moves the user again until the operator says so
		 * (policy, or migrate --daemon). */
		if (ms_store_user_get(gw->store, gu->name, &id) < 0 ||
		    ms_store_user_set_policy(gw->store, id, "off") < 0)
			ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
			       ms_store_error(gw->store));
	} else {
		/* The destination still holds everything: stay there. */
		ms_warn("%s: rollback failed: %s", gu->name,
			rep->error != NULL ? rep->error : "?");
		set_state(gw, gu->name, MS_USER_DESTINATION,
			  rep->error != NULL ? rep->error : "rollback failed");
	}
	held_release(gw, gu);
}

static void rollback_start(struct ms_gateway *gw, struct guser *gu)
{
	gu->copying = 1;
	gw->copies++;
	if (ms_mover_add_rollback(gw->mover, gu->name, NULL, NULL,
				  on_rollback_done, gw) < 0) {
		struct ms_user_report rep = {
			.user = gu->name,
			.error = "cannot start the rollback",
		};

		on_rollback_done(&rep, gw);
	}
}

int ms_gateway_rollback(struct ms_gateway *gw, const char *user,
			const char **error_r)
{
	struct ms_user_info info;
	struct guser *gu;

	if (gw->mover == NULL) {
		*error_r = "no [source] and [destination] imap configured";
		return -1;
	}
	if (!have_admin(gw)) {
		*error_r = "needs admin logins ([source] admin, [destination] "
			   "admin)";
		return -1;
	}
	if (user_lookup(gw, user, &info) < 0) {
		*error_r = ms_store_error(gw->store);
		return -1;
	}
	if (!ms_user_in(&info, MS_USER_DESTINATION)) {
		*error_r = "not on the destination";
		return -1;
	}
	if ((gu = gw_user_get(gw, user)) == NULL) {
		*error_r = "out of memory";
		return -1;
	}
	if (gu->copying || gu->cutover) {
		*error_r = "a copy runs for the user";
		return -1;
	}
	/* As a cutover the other way: logins held, sessions ended, mail
	 * deferred, the destination's MTA given its grace, then the
	 * reverse delta; verified, the map flips back. */
	gu->rollback = 1;
	gw_cutover_begin(gw, gu);
	gw_sessions_kick(gw, user);
	return 0;
}

const char *ms_gateway_user_copy(struct ms_gateway *gw, const char *user)
{
	struct guser *gu = gw_user_find(gw, user);

	if (gu == NULL)
		return "";
	if (gu->rollback)
		return "rolling back";
	if (gu->copying)
		return gu->cutover ? "last delta" : "copying";
	if (gu->flip_pending)
		return "verified, flips at log-off";
	return "";
}

unsigned int ms_gateway_user_sessions(struct ms_gateway *gw, const char *user)
{
	struct guser *gu = gw_user_find(gw, user);

	return gu != NULL ? gu->sessions : 0;
}

/* Ends the user's IMAP and POP3 sessions (BYE): the operator's kick, and a
 * cutover's or rollback's. */
static int gw_sessions_kick(struct ms_gateway *gw, const char *user)
{
	int n = 0;

	for (struct session *s = gw->sessions, *next; s != NULL; s = next) {
		next = s->next;
		if (s->gu == NULL || strcmp(s->gu->name, user) != 0)
			continue;
		if (s->proto == MS_GW_IMAP)
			out(s, "* BYE Administrator ended this session.\r\n");
		else if (s->st != SS_RELAY)
			out(s, "-ERR Administrator ended this session.\r\n");
		gw_session_close(s);
		n++;
	}
	return n;
}

void ms_gateway_progress(struct ms_gateway *gw, struct ms_progress *p)
{
	memset(p, 0, sizeof(*p));
	if (gw->mover != NULL)
		ms_mover_progress(gw->mover, p);
}

/* ---- after a restart, and the sweep ---- */

static int recover_one(void *ctx, const struct ms_user_info *u)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu;

	/* A rollback a crash interrupted: the destination still holds all
	 * the mail; the user stays there and the operator runs it again. */
	if (ms_user_in(u, MS_USER_CUTOVER) &&
	    !strcmp(u->last_error, ROLLBACK_MARK)) {
		set_state(gw, u->name, MS_USER_DESTINATION, "rollback "
			  "interrupted: run mailshiftctl rollback again");
		return 0;
	}
	/* A cutover a crash interrupted: nobody is held any more, and the
	 * last delta has to run again. Back to copying. */
	if (ms_user_in(u, MS_USER_CUTOVER))
		set_state(gw, u->name, MS_USER_COPYING,
			  "interrupted cutover, resumed");
	else if (!ms_user_in(u, MS_USER_COPYING))
		return 0;
	/* With admin logins the copy goes on now (else at the user's next
	 * login, or the sweep's turn); it flips once verified, through a
	 * cutover if anything reached the source meanwhile. */
	if (gw->mover != NULL && have_admin(gw) &&
	    user_policy(gw, u) != MS_POLICY_OFF &&
	    (gu = gw_user_get(gw, u->name)) != NULL)
		gu->resume = 1;
	return 0;
}

static void recover(struct ms_gateway *gw)
{
	if (ms_store_user_foreach(gw->store, recover_one, gw) < 0)
		ms_log(MS_LOG_ERROR, "store: %s", ms_store_error(gw->store));
	for (unsigned int i = 0; i < USER_BUCKETS; i++)
		for (struct guser *gu = gw->users[i]; gu != NULL; gu = gu->next)
			if (gu->resume) {
				gu->resume = 0;
				ms_info("%s: resuming the interrupted copy",
					gu->name);
				user_copy_start(gw, gu);
			}
}

struct sweep_ctx {
	struct ms_gateway *gw;
	unsigned int want;
};

static int sweep_one(void *ctx, const struct ms_user_info *u)
{
	struct sweep_ctx *sc = ctx;
	struct ms_gateway *gw = sc->gw;
	struct guser *gu;

	if (sc->want == 0 || uv_now(gw->loop) < gw->sweep_next_ms)
		return 1;
	if ((!ms_user_in(u, MS_USER_SOURCE) &&
	     !ms_user_in(u, MS_USER_COPYING)) ||
	    user_policy(gw, u) == MS_POLICY_OFF)
		return 0;
	gu = gw_user_get(gw, u->name);
	if (gu == NULL || gu->copying || gu->flip_pending || gu->sessions > 0)
		return 0;
	set_state(gw, gu->name, MS_USER_COPYING, NULL);
	user_copy_start(gw, gu);
	if (gu->copying) {
		sc->want--;
		if (gw->cfg.sweep_rate > 0)
			gw->sweep_next_ms = uv_now(gw->loop) +
				3600000ULL / gw->cfg.sweep_rate;
	}
	return 0;
}

static int in_window(const struct ms_gateway *gw)
{
	time_t now = time(NULL);
	struct tm tm;
	int min;

	if (gw->cfg.sweep_from < 0 || gw->cfg.sweep_to < 0)
		return 1;
	localtime_r(&now, &tm);
	min = tm.tm_hour * 60 + tm.tm_min;
	if (gw->cfg.sweep_from <= gw->cfg.sweep_to)
		return min >= gw->cfg.sweep_from && min < gw->cfg.sweep_to;
	return min >= gw->cfg.sweep_from || min < gw->cfg.sweep_to;
}

/* Moves users who never log in, a few at a time, inside the window. */
static void on_sweep(uv_timer_t *t)
{
	struct ms_gateway *gw = t->data;
	unsigned int conc = gw->cfg.sweep_concurrency ?
		gw->cfg.sweep_concurrency : 1;
	struct sweep_ctx sc = { .gw = gw };

	if (!in_window(gw) || gw->copies >= conc)
		return;
	sc.want = conc - gw->copies;
	if (ms_store_user_foreach(gw->store, sweep_one, &sc) < 0)
		ms_log(MS_LOG_ERROR, "sweep: store: %s", ms_store_error(gw->store));
}

/* ---- metrics (Prometheus text format, HTTP/1.0, one request) ---- */

#define METRICS_TIMEOUT_MS (10 * 1000)	/* to send the request */
#define METRICS_CLIENTS_MAX 64		/* at once; the oldest waiting for
					   its request makes room */
#define METRICS_CACHE_MS 5000		/* the users' counts are this fresh */

struct mclient {
	struct mclient *next, *prev;	/* gw->mclients_list: oldest last */
	uv_tcp_t tcp;
	uv_timer_t timer;
	int handles;			/* open: freed when both are closed */
	int answered;			/* the request came in */
	struct ms_gateway *gw;
	char req[1024];
	size_t len;
};

static int mcount(void *ctx, const struct ms_user_info *u)
{
	struct mcount_ctx *mc = ctx;

	for (int i = 0; i < MS_USER_NSTATES; i++)
		if (ms_user_in(u, i))
			mc->states[i]++;
	mc->msgs += u->msgs;
	mc->bytes += u->bytes;
	return 0;
}

static void on_mclient_close(uv_handle_t *h)
{
	struct mclient *mc = h->data;

	if (--mc->handles == 0)
		free(mc);
}

static void mclient_close(struct mclient *mc)
{
	struct ms_gateway *gw = mc->gw;

	if (mc->handles == 2 && !uv_is_closing((uv_handle_t *)&mc->timer)) {
		/* Leaves the list at its first close. */
		if (mc->prev != NULL)
			mc->prev->next = mc->next;
		else
			gw->mlist = mc->next;
		if (mc->next != NULL)
			mc->next->prev = mc->prev;
		else
			gw->mlist_tail = mc->prev;
		gw->mclients--;
	}
	if (!uv_is_closing((uv_handle_t *)&mc->tcp))
		uv_close((uv_handle_t *)&mc->tcp, on_mclient_close);
	if (!uv_is_closing((uv_handle_t *)&mc->timer))
		uv_close((uv_handle_t *)&mc->timer, on_mclient_close);
}

static void on_mwrite(uv_write_t *req, int status)
{
	struct mclient *mc = req->handle->data;

	free(req->data);
	free(req);
	mclient_close(mc);
}

static void on_mtimeout(uv_timer_t *t)
{
	mclient_close(t->data);
}

static void metrics_reply(struct mclient *mc)
{
	struct ms_gateway *gw = mc->gw;
	struct mcount_ctx cnt;
	char *body = malloc(4096), *resp;
	size_t pos = 0;
	uv_write_t *req;
	uv_buf_t buf;
	int n;

	if (body == NULL)
		goto close;
	/* The users table is walked at most every METRICS_CACHE_MS, however
	 * often the endpoint is asked. */
	if (gw->mcache_ms == 0 ||
	    uv_now(gw->loop) - gw->mcache_ms >= METRICS_CACHE_MS) {
		memset(&gw->mcache, 0, sizeof(gw->mcache));
		ms_store_user_foreach(gw->store, mcount, &gw->mcache);
		gw->mcache_ms = uv_now(gw->loop);
		if (gw->mcache_ms == 0)
			gw->mcache_ms = 1;
	}
	cnt = gw->mcache;
	pos += (size_t)snprintf(body + pos, 4096 - pos,
		"# HELP mailshift_users Users by state.\n"
		"# TYPE mailshift_users gauge\n");
	for (int i = 0; i < MS_USER_NSTATES; i++)
		pos += (size_t)snprintf(body + pos, 4096 - pos,
			"mailshift_users{state=\"%s\"} %llu\n",
			ms_user_state_names[i],
			(unsigned long long)cnt.states[i]);
	pos += (size_t)snprintf(body + pos, 4096 - pos,
		"# TYPE mailshift_sessions gauge\nmailshift_sessions %u\n"
		"# TYPE mailshift_copies_running gauge\n"
		"mailshift_copies_running %u\n"
		"# TYPE mailshift_messages_copied_total counter\n"
		"mailshift_messages_copied_total %llu\n"
		"# TYPE mailshift_bytes_copied_total counter\n"
		"mailshift_bytes_copied_total %llu\n"
		"# TYPE mailshift_logins_total counter\n"
		"mailshift_logins_total{result=\"ok\"} %llu\n"
		"mailshift_logins_total{result=\"failed\"} %llu\n",
		ms_gateway_nsessions(gw), gw->copies,
		(unsigned long long)cnt.msgs, (unsigned long long)cnt.bytes,
		(unsigned long long)gw->logins_ok,
		(unsigned long long)gw->logins_failed);
	resp = malloc(pos + 256);
	req = malloc(sizeof(*req));
	if (resp == NULL || req == NULL) {
		free(resp);
		free(req);
		free(body);
		goto close;
	}
	n = snprintf(resp, pos + 256, "HTTP/1.0 200 OK\r\nContent-Type: "
		     "text/plain; version=0.0.4\r\nContent-Length: %zu\r\n"
		     "Connection: close\r\n\r\n%s", pos, body);
	free(body);
	req->data = resp;
	buf = uv_buf_init(resp, (unsigned int)n);
	if (uv_write(req, (uv_stream_t *)&mc->tcp, &buf, 1, on_mwrite) == 0)
		return;
	free(resp);
	free(req);
close:
	mclient_close(mc);
}

static void on_malloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
	struct mclient *mc = h->data;

	*buf = uv_buf_init(mc->req + mc->len, (unsigned int)(sizeof(mc->req) -
							     mc->len - 1));
}

static void on_mread(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
	struct mclient *mc = st->data;

	if (n < 0 || mc->len + (size_t)n >= sizeof(mc->req) - 1) {
		mclient_close(mc);
		return;
	}
	mc->len += (size_t)n;
	mc->req[mc->len] = '\0';
	if (strstr(mc->req, "\r\n\r\n") != NULL ||
	    strstr(mc->req, "\n\n") != NULL) {
		uv_read_stop(st);
		uv_timer_stop(&mc->timer);
		mc->answered = 1;
		metrics_reply(mc);
	}
}

static void on_metrics_conn(uv_stream_t *server, int status)
{
	struct ms_gateway *gw = server->data;
	struct mclient *mc;

	if (status < 0)
		return;
	if (gw->mclients >= METRICS_CLIENTS_MAX) {
		/* Full of clients that say nothing (or are slow): the
		 * oldest of those goes, a monitoring system gets in. */
		struct mclient *old = gw->mlist_tail;

		while (old != NULL && old->answered)
			old = old->prev;
		if (old != NULL)
			mclient_close(old);
	}
	if (gw->mclients >= METRICS_CLIENTS_MAX ||
	    (mc = calloc(1, sizeof(*mc))) == NULL) {
		ms_drop_connection(server);
		return;
	}
	gw->mclients++;
	mc->next = gw->mlist;
	if (mc->next != NULL)
		mc->next->prev = mc;
	else
		gw->mlist_tail = mc;
	gw->mlist = mc;
	mc->gw = gw;
	mc->handles = 2;
	uv_tcp_init(gw->loop, &mc->tcp);
	mc->tcp.data = mc;
	uv_timer_init(gw->loop, &mc->timer);
	mc->timer.data = mc;
	uv_timer_start(&mc->timer, on_mtimeout, METRICS_TIMEOUT_MS, 0);
	if (uv_accept(server, (uv_stream_t *)&mc->tcp) < 0 ||
	    uv_read_start((uv_stream_t *)&mc->tcp, on_malloc, on_mread) < 0)
		mclient_close(mc);
}

static int metrics_start(struct ms_gateway *gw, char *err, size_t errsz)
{
	gw->metrics = calloc(1, sizeof(*gw->metrics));
	if (gw->metrics == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	if (ms_listen(gw->loop, gw->metrics, gw->cfg.metrics, 0,
		      on_metrics_conn, err, errsz) < 0) {
		free(gw->metrics);
		gw->metrics = NULL;
		return -1;
	}
	gw->metrics->data = gw;
	return 0;
}

/* ---- setup ---- */

static int caps_start(struct ms_gateway *gw)
{
	const struct ms_gw_config *cfg = &gw->cfg;
	const struct ms_server_cfg *srv[MS_CAPS_N][2] = {
		[MS_CAPS_IMAP] = { &cfg->src_imap, &cfg->dst_imap },
		[MS_CAPS_POP3] = { &cfg->src_pop3, &cfg->dst_pop3 },
		[MS_CAPS_SMTP] = { &cfg->src_smtp, &cfg->dst_smtp },
		[MS_CAPS_SUBMISSION] = { &cfg->src_submission,
					 &cfg->dst_submission },
	};

	return ms_caps_new(gw->loop, srv, cfg->caps_refresh, &gw->caps);
}

const char *ms_gw_caps(struct ms_gateway *gw, enum ms_caps_kind kind)
{
	return ms_caps_get(gw->caps, kind);
}

json_t *ms_gateway_caps_json(struct ms_gateway *gw)
{
	return ms_caps_json(gw->caps);
}

int ms_gateway_new(uv_loop_t *loop, const struct ms_gw_config *cfg,
		   struct ms_store *store, struct ms_gateway **gw_r,
		   char *err, size_t errsz)
{
	struct ms_gateway *gw = calloc(1, sizeof(*gw));

	if (gw == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	gw->loop = loop;
	gw->cfg = *cfg;
	gw->store = store;
	gw->conf_policy = cfg->policy;
	gw->conf_ndomains = cfg->ndomains;
	memcpy(gw->conf_domains, cfg->domains, sizeof(gw->conf_domains));
	if (policies_load(gw, err, errsz) < 0)
		goto fail;
	if (cfg->cert[0] != '\0' &&
	    ms_tls_server_new(cfg->cert, cfg->key, &gw->tls, err, errsz) < 0)
		goto fail;
	if (cfg->src_imap.host[0] != '\0' && cfg->dst_imap.host[0] != '\0') {
		struct ms_server_cfg src = cfg->src_imap, dst = cfg->dst_imap;
		struct ms_mover_opts mo = { 0 };

		src.max_conns = dst.max_conns = cfg->connections;
		src.admin = cfg->src_admin;
		src.password = cfg->src_admin_pw;
		dst.admin = cfg->dst_admin;
		dst.password = cfg->dst_admin_pw;
		gw->mover = ms_mover_new(loop, store, &src, &dst, &mo);
	}
	for (unsigned int i = 0; i < cfg->nlisten; i++) {
		struct listener *l;

		if (cfg->listen[i].implicit_tls && gw->tls == NULL) {
			snprintf(err, errsz, "listener %s: implicit TLS needs "
				 "[tls] cert and key", cfg->listen[i].addr);
			goto fail;
		}
		l = calloc(1, sizeof(*l));
		if (l == NULL) {
			snprintf(err, errsz, "out of memory");
			goto fail;
		}
		l->gw = gw;
		l->cfg = cfg->listen[i];
		if (ms_listen(loop, &l->tcp, l->cfg.addr, cfg->transparent,
			      on_connection, err, errsz) < 0) {
			free(l);
			goto fail;
		}
		/* ms_listen initialised the handle: data is ours now. */
		l->tcp.data = l;
		l->open = 1;
		gw->listeners[gw->nlisteners++] = l;
	}
	if (caps_start(gw) < 0) {
		snprintf(err, errsz, "out of memory");
		goto fail;
	}
	recover(gw);
	if (cfg->sweep && gw->mover != NULL && have_admin(gw)) {
		gw->sweep_timer = malloc(sizeof(*gw->sweep_timer));
		if (gw->sweep_timer != NULL) {
			uv_timer_init(loop, gw->sweep_timer);
			gw->sweep_timer->data = gw;
			uv_timer_start(gw->sweep_timer, on_sweep, 1000,
				       (cfg->sweep_interval ? cfg->sweep_interval :
					10) * 1000ULL);
		}
	} else if (cfg->sweep) {
		ms_warn("[sweep] needs admin logins for both servers "
			"([source] admin, [destination] admin): sweep off");
	}
	if (cfg->metrics[0] != '\0' && metrics_start(gw, err, errsz) < 0)
		goto fail;
	*gw_r = gw;
	return 0;
fail:
	ms_gateway_free(&gw);
	return -1;
}

void ms_gateway_free(struct ms_gateway **gwp)
{
	struct ms_gateway *gw = *gwp;

	if (gw == NULL)
		return;
	*gwp = NULL;
	for_each_frontend(fe)
		if ((*fe)->close_all != NULL)
			(*fe)->close_all(gw);
	/* Listener memory goes in the close callbacks, on the next turn of
	 * the loop: the caller runs the loop once more. */
	for (unsigned int i = 0; i < gw->nlisteners; i++)
		ms_close_free((uv_handle_t *)&gw->listeners[i]->tcp,
			      gw->listeners[i]);
	if (gw->sweep_timer != NULL)
		ms_close_free((uv_handle_t *)gw->sweep_timer, gw->sweep_timer);
	if (gw->metrics != NULL)
		ms_close_free((uv_handle_t *)gw->metrics, gw->metrics);
	ms_mover_free(&gw->mover);
	ms_caps_free(&gw->caps);
	json_decref(gw->policy_set);
	for (unsigned int i = 0; i < USER_BUCKETS; i++) {
		while (gw->users[i] != NULL) {
			struct guser *gu = gw->users[i];

			gw->users[i] = gu->next;
			ms_secret_free(&gu->pw);
			if (gu->grace != NULL)
				ms_close_free((uv_handle_t *)gu->grace,
					      gu->grace);
			free(gu);
		}
	}
	ms_tls_server_free(&gw->tls);
	free(gw->penalties);
	for (unsigned int i = 0; i < ADDR_BUCKETS; i++)
		while (gw->per_addr[i] != NULL) {
			struct addr_count *a = gw->per_addr[i];

			gw->per_addr[i] = a->next;
			free(a);
		}
	free(gw);
}
