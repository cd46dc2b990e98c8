/* The gateway's IMAP and POP3 sessions, both protocols alike.
 *
 * A session is one client connection. Before login it is ours: we answer
 * the pre-login commands ourselves and capture the credentials. At login we
 * look the user up, open a connection to the server that holds the user's
 * mail, replay the login there (after an IMAP ID with the client's address)
 * and pass the server's answer on with the client's tag. From then on bytes
 * are relayed both ways, with backpressure.
 *
 * Here: a session's life and timers; its pre-login input, read with
 * backpressure and wiped; the login replayed at the server (connect,
 * STARTTLS, SASL PLAIN), its failures slowed down per client address; the
 * relay; the mailbox sessions as the gateway lists, kicks and closes them.
 *
 * It reaches a protocol (gw_imap.c, gw_pop3.c) through the session's
 * struct gw_proto only, never by name, and asks the user's life cycle
 * (lifecycle.c) where a login goes; the life cycle releases held logins
 * and ends sessions through the struct gw_user_sessions this file gives
 * it. It holds no protocol's syntax, no user's state, and nothing of the
 * listeners or the control socket.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cluster.h"
#include "gw_internal.h"
#include "log.h"
#include "retire.h"
#include "steer.h"
#include "testhook.h"
#include "watchdog.h"

#define PRELOGIN_TIMEOUT_MS (180 * 1000)	/* since the client's last bytes */
#define PRELOGIN_MAX_MS (10 * 60 * 1000)	/* since it connected, at most */
/* Commands before login on one connection: a client needs a handful; one
 * that sends thousands (and reads nothing) only costs the others time. */
#define PRELOGIN_CMDS_MAX 1000
#define GW_BACKEND_TIMEOUT_MS (30 * 1000)
/* A pre-login client's output queue: above HIGH it is not read any more
 * (it sends commands and does not read the answers) until it drops to
 * LOW. */
#define PRELOGIN_OUT_HIGH (64 * 1024)
#define PRELOGIN_OUT_LOW (16 * 1024)

static void gw_prelogin_process(struct session *s);
static void route_login(struct session *s);
static void hold(struct session *s);
static int login_accepted(struct session *s);

void gw_clear_args(struct session *s)
{
	for (unsigned int i = 0; i < s->argc; i++)
		ms_secret_free(&s->argv[i]);
	s->argc = 0;
	s->lit_need = 0;
	s->id_line = 0;
}

/* ---- timers ---- */

void gw_timer_stop(struct session *s)
{
	uv_timer_stop(&s->timer);
}

void gw_timer_start(struct session *s, uv_timer_cb cb, uint64_t ms,
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

/* ---- the log an operator reads (docs/gateway-spec.md, "The log") ---- */

/* "ADDR:PORT", or "[ADDR]:PORT" for IPv6. */
static void addr_port(char *buf, size_t sz, const char *addr, uint16_t port)
{
	snprintf(buf, sz, strchr(addr, ':') != NULL ? "[%s]:%u" : "%s:%u",
		 addr, port);
}

static const char *session_user(const struct session *s)
{
	if (s->login.user != NULL)
		return ms_login_name(&s->login);
	return s->gu != NULL ? s->gu->name : "?";
}

static const char *session_server(const struct session *s)
{
	return s->to_dst ? "destination" : "source";
}

/* One line per login that came to an end: who, from where, how, to which
 * server ("-": none was asked), and the result; what follows (may be
 * NULL) closes the line. */
void gw_log_login(struct session *s, enum ms_log_level level,
		  const char *server, const char *result, const char *more)
{
	char client[80];

	addr_port(client, sizeof(client), s->peer, s->peer_port);
	ms_log(level, "session %llu: login: user=<%s> client=%s proto=%s "
	       "mechanism=%s tls=%s server=%s result=%s%s%s",
	       (unsigned long long)s->id, session_user(s), client,
	       s->proto == MS_GW_IMAP ? "imap" : "pop3",
	       s->mech != NULL ? s->mech : "-", s->tls ? "yes" : "no",
	       server != NULL ? server : session_server(s), result,
	       more != NULL ? " " : "", more != NULL ? more : "");
}

/* The end of a session a server took the login of: how long it was open
 * and the bytes relayed each way. */
static void log_session_end(struct session *s)
{
	uint64_t ms = uv_now(s->gw->loop) - s->born_ms;
	char client[80];

	addr_port(client, sizeof(client), s->peer, s->peer_port);
	ms_info("session %llu: end: user=<%s> client=%s proto=%s server=%s "
		"duration=%llu.%03llus in=%llu out=%llu",
		(unsigned long long)s->id, session_user(s), client,
		s->proto == MS_GW_IMAP ? "imap" : "pop3", session_server(s),
		(unsigned long long)(ms / 1000),
		(unsigned long long)(ms % 1000),
		(unsigned long long)s->bytes_in,
		(unsigned long long)s->bytes_out);
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
	/* (A hold's password check is no session the user worked in.) */
	if (gu->sessions == 0 && !s->verify_only)
		gu->idle_since = uv_now(gw->loop);
	/* The last session of a verified user ends: flip once the user has
	 * not come back for [policy] flip_quiet. */
	if (gu->sessions == 0 && gu->flip_pending && !gu->copying)
		gw_flip_when_quiet(gw, gu);
}

/* Pre-login input holds passwords: wiped before it is let go. */
static void inbuf_free(struct session *s)
{
	ms_secret_buf_free(&s->in, s->incap);
	s->inlen = s->incap = 0;
}

/* Room for len more bytes of input (what it held wiped when it moves). */
static int inbuf_reserve(struct session *s, size_t len)
{
	return ms_secret_reserve(&s->in, &s->incap, s->inlen, s->inlen + len,
				 GW_INBUF_MAX, GW_INBUF_HARD);
}

static void bin_free(struct session *s)
{
	ms_secret_buf_free(&s->bin, GW_INBUF_MAX + 1);
	s->binlen = 0;
}

/* Several gateways: the thread that ends relays at the fence's deadline
 * when the loop is held (watchdog.h). */
static struct ms_watchdog *watchdog(const struct ms_gateway *gw)
{
	return gw->cluster != NULL ? ms_cluster_watchdog(gw->cluster) : NULL;
}

/* Ends the session. Its memory goes when the timer's handle is closed, on
 * a later turn of the loop, so that a caller up the stack (a command loop
 * that just ran LOGOUT) may still look at s->st, which is SS_CLOSING. */
void gw_session_close(struct session *s)
{
	struct ms_gateway *gw = s->gw;
	struct ms_watchdog *wd;

	if (s->st == SS_CLOSING)
		return;
	if (s->logged_in)
		log_session_end(s);
	if (s->st == SS_RELAY)
		ms_steer_session_end(s->peer, s->peer_port, s->local,
				     s->local_port);
	s->st = SS_CLOSING;
	ms_read_cancel(s->rd);
	s->rd = NULL;
	if ((wd = watchdog(gw)) != NULL)
		ms_watchdog_remove(wd, &s->wd_slot);
	ms_conn_close(&s->b);
	ms_conn_close(&s->c);
	gw_clear_args(s);
	ms_login_wipe(&s->login);
	inbuf_free(s);
	bin_free(s);
	free(s->penalty_reply);
	s->penalty_reply = NULL;
	if (gw_filtered(s))
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

static void enter_relay(struct session *s, const char *rest, size_t restlen)
{
	struct ms_watchdog *wd;

	gw_timer_stop(s);
	s->st = SS_RELAY;
	s->logged_in = 1;
	/* Several gateways: ended at the deadline even by a held loop. */
	if ((wd = watchdog(s->gw)) != NULL)
		ms_watchdog_add(wd, &s->wd_slot, ms_conn_fd(s->c),
				ms_conn_fd(s->b));
	gw_log_login(s, MS_LOG_INFO, NULL, "ok", NULL);
	/* backend = kmod: the kernel's view of who is where (steer_kmod.c). */
	if (s->gu != NULL)
		ms_steer_session_add(s->gu->name, s->peer, s->peer_port,
				     s->local, s->local_port, s->to_dst);
	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_WRITE | MS_PAUSE_INPUT);
	ms_login_wipe(&s->login);
	bin_free(s);
	/* The login is over: the usual backpressure, no more wiping. */
	ms_conn_set_water(s->c, 0, 0);
	ms_conn_set_wipe(s->c, 0);
	ms_conn_set_wipe(s->b, 0);
	/* What the server sent after its login reply. */
	s->bytes_out += restlen;
	s->bytes_in += s->inlen;
	if (restlen > 0 && gw_filtered(s)) {
		if (s->pr->relay_server(s, rest, restlen) < 0) {
			gw_session_close(s);
			return;
		}
	} else if (restlen > 0) {
		ms_conn_write(s->c, rest, restlen);
	}
	/* What the client pipelined after its login command. */
	if (s->inlen > 0 && s->iv != NULL) {
		if (s->pr->relay_client_out(s, s->in, s->inlen) < 0) {
			gw_session_close(s);
			return;
		}
	} else if (s->inlen > 0) {
		if (s->ur != NULL)
			s->pr->relay_client(s, s->in, s->inlen);
		ms_conn_write(s->b, s->in, s->inlen);
	}
	inbuf_free(s);
}

/* ---- backend login ---- */

void gw_backend_fail(struct session *s, const char *why)
{
	char more[600];

	snprintf(more, sizeof(more), "reason=%s", why);
	gw_log_login(s, MS_LOG_WARN, s->st == SS_BACKEND ? NULL : "-",
		     "unavailable", more);
	gw_timer_stop(s);
	ms_read_cancel(s->rd);
	s->rd = NULL;
	ms_conn_close(&s->b);
	/* read for this login: another may be another user's */
	if (gw_filtered(s))
		s->pr->relay_free(s);
	gw_session_uncount(s);
	bin_free(s);
	gw_login_refuse(s, "UNAVAILABLE", "SYS/TEMP", "Mail server "
			"temporarily unavailable, try again later.");
	s->st = SS_PRELOGIN;
	gw_prelogin_timer(s);
	/* Commands the client pipelined behind the login. */
	gw_prelogin_process(s);
}

static void gw_backend_send_login(struct session *s)
{
	s->bst = BS_LOGIN;
	if (s->pr->send_login(s) < 0)
		gw_backend_fail(s, "out of memory");
}

/* The server greeted us: STARTTLS first when it is to be used (the
 * protocol's command), else the login. */
void gw_backend_greeted(struct session *s, const char *starttls)
{
	if (s->server->tls_mode == MS_TLS_STARTTLS) {
		s->bst = BS_STARTTLS;
		ms_conn_write(s->b, starttls, strlen(starttls));
	} else {
		gw_backend_send_login(s);
	}
}

void gw_backend_on_tls(struct ms_conn *conn, int status,
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
static int backend_line(struct session *s, char *line, size_t len)
{
	while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
		line[--len] = '\0';
	return s->pr->backend_line(s, line);
}

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
void gw_login_failed(struct session *s, const char *reply)
{
	uint64_t delay = penalty_ms(s->gw, s->peer, 1);
	char more[40];

	snprintf(more, sizeof(more), "delay=%llums",
		 (unsigned long long)delay);
	gw_log_login(s, MS_LOG_INFO, NULL, "failed", more);
	s->gw->logins_failed++;
	ms_conn_close(&s->b);
	/* read for this login: the next may be another user's */
	if (gw_filtered(s))
		s->pr->relay_free(s);
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
		s->bytes_out += len;
		if (!gw_filtered(s) ?
		    ms_relay(s->c, s->b, &s->b_paused, data, len) < 0 :
		    s->pr->relay_server(s, data, len) < 0)
			gw_session_close(s);
		return;
	}
	while (len > 0 && s->st == SS_BACKEND) {
		long n = ms_line_take(&s->bin, &s->binlen, GW_INBUF_MAX, data,
				      len);
		int r;

		if (n < 0) {
			gw_backend_fail(s, "server line too long");
			return;
		}
		data += n;
		len -= (size_t)n;
		if (s->bin[s->binlen - 1] != '\n')
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
			if (login_accepted(s) < 0)
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
			if (login_accepted(s) < 0)
				return;
			gw_log_login(s, MS_LOG_INFO, NULL, "held", NULL);
			hold(s);
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

void gw_backend_connect(struct session *s, int to_dst, int verify_only)
{
	struct ms_gateway *gw = s->gw;
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
	if (!to_dst)	/* for retire --check */
		ms_retire_note("session", ms_login_name(&s->login));
	s->st = SS_BACKEND;
	s->bst = BS_GREETING;
	if (srv->host[0] == '\0') {
		gw_backend_fail(s, "no such server configured");
		return;
	}
	gw_timer_start(s, on_backend_timeout,
		       MS_TEST_TIME(GW_BACKEND_TIMEOUT_MS), 0);
	/* The rows the relay's filter needs are read first, off the loop:
	 * whether the server takes the login or not, the client hears
	 * nothing of the server before they are in. */
	if (to_dst && !verify_only && s->pr->relay_load != NULL)
		s->pr->relay_load(s);
	else
		gw_backend_go(s, NULL);
}

void gw_backend_go(struct session *s, const char *why)
{
	struct ms_conn_callbacks cb = {
		.on_connect = on_backend_connect,
		.on_read = on_backend_read,
		.on_error = on_backend_error,
		.on_drain = on_backend_drain,
		.ctx = s,
	};

	if (why != NULL) {
		gw_backend_fail(s, why);
		return;
	}
	if (ms_server_connect_for(s->gw->loop, s->server, s->peer,
				  s->peer_port, &cb, &s->b) < 0)
		gw_backend_fail(s, "cannot connect");
	else
		ms_conn_set_wipe(s->b, 1);	/* the login goes this way */
}

void gw_read_login(struct session *s, size_t size, ms_read_work_fn *work,
		   ms_read_done_fn *done, ms_read_drop_fn *drop)
{
	struct gw_login_read *lr = calloc(1, size);

	if (lr == NULL || (lr->user = strdup(ms_login_name(&s->login))) ==
	    NULL) {
		free(lr);
		gw_backend_go(s, "out of memory");
		return;
	}
	lr->s = s;
	if (gw_read(s, work, done, drop, lr) < 0)
		gw_backend_go(s, "out of memory");
}

void gw_login_read_free(struct gw_login_read *lr)
{
	free(lr->user);
	free(lr);
}

int gw_read_start(struct ms_gateway *gw, ms_read_work_fn *work,
		  ms_read_done_fn *done, ms_read_drop_fn *drop, void *arg,
		  struct ms_read **rd_r)
{
	char err[512] = "";
	int r;

	*rd_r = NULL;
	if (gw->reader != NULL) {
		*rd_r = ms_read_start(gw->reader, work, done, drop, arg);
		if (*rd_r != NULL)
			return 0;
		drop(arg);
		return -1;
	}
	r = ms_read_now(gw->store, work, arg, err, sizeof(err));
	done(arg, r < 0 ? err : NULL);
	return 0;
}

int gw_read(struct session *s, ms_read_work_fn *work, ms_read_done_fn *done,
	    ms_read_drop_fn *drop, void *arg)
{
	struct ms_read *rd;
	int r = gw_read_start(s->gw, work, done, drop, arg, &rd);

	/* done() may have run: it cleared s->rd, and rd is NULL */
	if (rd != NULL)
		s->rd = rd;
	return r;
}

/* A clear error for a login we refuse to pass on. */
void gw_login_refuse(struct session *s, const char *imap_code,
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
int gw_plaintext_refused(struct session *s)
{
	if (s->tls || ms_gw_plaintext_ok(s->gw, s->peer))
		return 0;
	gw_log_login(s, MS_LOG_INFO, "-", "refused", "reason=plaintext login "
		     "refused (not TLS, not a trusted network)");
	gw_login_refuse(s, "PRIVACYREQUIRED", "AUTH", "Plaintext "
			"authentication disallowed on non-secure (SSL/TLS) "
			"connections.");
	return 1;
}

void gw_login_start(struct session *s)
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
	route_login(s);
}

void gw_client_on_tls(struct ms_conn *conn, int status,
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

/* ---- client connection ---- */

int gw_prelogin_reading(const struct session *s)
{
	return s->st == SS_PRELOGIN || s->st == SS_AUTH_PLAIN ||
		s->st == SS_AUTH_USER || s->st == SS_AUTH_PASS;
}

/* One more command before login: 1 (and the session ends) when that is
 * more than PRELOGIN_CMDS_MAX. */
int gw_too_many_commands(struct session *s)
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

void gw_line_too_long(struct session *s)
{
	if (s->proto == MS_GW_IMAP)
		out(s, "* BYE Input line too long.\r\n");
	else
		out(s, "-ERR Input line too long.\r\n");
	gw_session_close(s);
}

/* The next whole line of the pre-login input, without its CR LF, made a
 * string in place: its length up to the LF, or -1 when there is none yet,
 * or when it is too long (the session is ended: gw_line_too_long()). */
long gw_input_line(struct session *s)
{
	char *lf = memchr(s->in, '\n', s->inlen);
	size_t linelen;

	if ((lf == NULL && s->inlen >= gw_line_max(s)) ||
	    (lf != NULL && (size_t)(lf - s->in) >= gw_line_max(s))) {
		gw_line_too_long(s);
		return -1;
	}
	if (lf == NULL)
		return -1;
	linelen = (size_t)(lf - s->in);
	s->in[linelen] = '\0';
	if (linelen > 0 && s->in[linelen - 1] == '\r')
		s->in[linelen - 1] = '\0';
	return (long)linelen;
}

/* Drops the line of gw_input_line() (linelen bytes and the LF). */
void gw_input_drop(struct session *s, size_t linelen)
{
	memmove(s->in, s->in + linelen + 1, s->inlen - linelen - 1);
	s->inlen -= linelen + 1;
}

/* The pre-login idle timer: PRELOGIN_TIMEOUT_MS from now, but never past
 * PRELOGIN_MAX_MS since the client connected (NOOPs do not keep a session
 * that never logs in alive). */
void gw_prelogin_timer(struct session *s)
{
	uint64_t now = uv_now(s->gw->loop);
	uint64_t end = s->born_ms + MS_TEST_TIME(PRELOGIN_MAX_MS);
	uint64_t ms = MS_TEST_TIME(PRELOGIN_TIMEOUT_MS);

	if (end <= now)
		ms = 1;
	else if (end - now < ms)
		ms = end - now;
	gw_timer_start(s, on_idle_timeout, ms, 0);
}

/* The commands buffered so far, while the client reads our answers: one
 * that does not is not read any more (until on_client_drain); nor is one
 * that sent a line's worth (gw_line_max) we cannot take yet (a login under
 * way).
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
	if (s->inlen >= gw_line_max(s))
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_INPUT);
	else
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_INPUT);
}

static void on_client_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct session *s = ms_conn_ctx(conn);

	if (s->st == SS_RELAY) {
		s->bytes_in += len;
		if (s->iv != NULL) {
			if (s->pr->relay_client_out(s, data, len) < 0)
				gw_session_close(s);
			return;
		}
		if (s->ur != NULL)
			s->pr->relay_client(s, data, len);
		if (ms_relay(s->b, s->c, &s->c_paused, data, len) < 0)
			gw_session_close(s);
		return;
	}
	if (s->st == SS_STARTTLS)
		return;
	if (inbuf_reserve(s, len) < 0) {
		/* Cannot happen while reading stops at gw_line_max(). */
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

/* Takes one pending connection of an IMAP or POP3 listener (cfg): the
 * accept of those front ends, whose arg is their struct gw_proto. */
void gw_session_accept(struct ms_gateway *gw, uv_stream_t *server,
		       const struct ms_gw_listen *cfg, const void *arg)
{
	const struct gw_proto *pr = arg;
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

/* ---- the mailbox sessions, as the gateway reaches them ---- */

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

unsigned int ms_gateway_nsessions(struct ms_gateway *gw)
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

/* ---- routed and held logins: the user's life cycle decides ---- */

static void store_wait(struct session *s, int was_unsure, const char *why);

/* Where the login goes, as lifecycle.c says. A login held because the
 * user's state could not be known is asked about again as a new one. */
static void route_login(struct session *s)
{
	const char *why = NULL;
	int unsure = s->unsure;

	s->unsure = 0;
	switch (gw_route_login(s->gw, s->gu, ms_login_name(&s->login),
			       s->st == SS_HELD && !unsure, &why)) {
	case GW_LOGIN_FAIL:
		gw_backend_fail(s, why);
		return;
	case GW_LOGIN_UNSURE:
		store_wait(s, unsure, why);
		return;
	case GW_LOGIN_DESTINATION:
		gw_backend_connect(s, 1, 0);
		return;
	case GW_LOGIN_HOLD:
		if (s->st != SS_HELD || unsure)
			hold(s);
		return;
	case GW_LOGIN_CHECK_HOLD:
		gw_backend_connect(s, 0, 1);
		return;
	case GW_LOGIN_SOURCE:
		if (s->st == SS_HELD)
			gw_timer_stop(s);
		gw_backend_connect(s, 0, 0);
		return;
	}
}

/* The server accepted the password: the user's life cycle takes note.
 * -1 when the session failed instead. */
static int login_accepted(struct session *s)
{
	const char *why = NULL;

	if (gw_login_accepted(s, &why) == 0)
		return 0;
	gw_backend_fail(s, why);
	return -1;
}

static void held_tick(uv_timer_t *t);

/* A held login's next tick: its next progress line, every INPROGRESS_MS,
 * or the end of hold_max_seconds when that comes first (a limit that is
 * not a multiple of INPROGRESS_MS is kept, not rounded up to one). */
static void held_timer(struct session *s)
{
	uint64_t held = uv_now(s->gw->loop) - s->held_since;
	uint64_t max = (uint64_t)s->gw->cfg.hold_max_seconds * 1000;
	uint64_t next = INPROGRESS_MS - held % INPROGRESS_MS;

	if (max <= held)
		next = 0;
	else if (max - held < next)
		next = max - held;
	gw_timer_start(s, held_tick, next, 0);
}

static void held_tick(uv_timer_t *t)
{
	struct session *s = t->data;
	uint64_t held = uv_now(s->gw->loop) - s->held_since;

	if (held >= (uint64_t)s->gw->cfg.hold_max_seconds * 1000) {
		/* Too long: a user being copied goes on to the source (the
		 * copy goes on); one in cutover gets a temporary failure. */
		if (gw_hold_over_to_source(s->gw, ms_login_name(&s->login))) {
			gw_timer_stop(s);
			s->st = SS_PRELOGIN;
			gw_backend_connect(s, 0, 0);
			return;
		}
		gw_log_login(s, MS_LOG_INFO, "-", "unavailable", "reason=held "
			     "too long (the user is being moved)");
		gw_login_refuse(s, "UNAVAILABLE", "IN-USE", "Your mail is "
				"being moved, try again in a minute.");
		s->st = SS_PRELOGIN;
		gw_prelogin_timer(s);
		return;
	}
	/* RFC 9585: tells the client the command is still going. */
	if (s->proto == MS_GW_IMAP)
		out(s, "* OK [INPROGRESS (\"%s\" NIL NIL)] Moving your mail, "
		    "please wait.\r\n", s->tag);
	held_timer(s);
}

/* The login waits for the user's flip (release_held() goes on with it);
 * an IMAP client hears INPROGRESS meanwhile. */
static void hold(struct session *s)
{
	s->st = SS_HELD;
	s->held_since = uv_now(s->gw->loop);
	held_timer(s);
}

/* Asked again this often while the user's state cannot be known. */
#define STORE_WAIT_MS 250

static void on_store_wait(uv_timer_t *t)
{
	route_login(t->data);
}

/* The user's state cannot be known now (the store out of reach, or this
 * gateway not caught up with the others): the login waits, asked again
 * every STORE_WAIT_MS, up to [gateway] timeout; then a temporary failure.
 * Never routed on a guess. */
static void store_wait(struct session *s, int was_unsure, const char *why)
{
	uint64_t now = uv_now(s->gw->loop);

	if (!was_unsure) {
		s->st = SS_HELD;
		s->unsure_since = now;
	}
	if (now - s->unsure_since >= s->gw->cfg.gw_timeout_ms) {
		gw_backend_fail(s, why != NULL ? why : "the user's state is "
				"not known");
		return;
	}
	s->unsure = 1;
	gw_timer_start(s, on_store_wait, STORE_WAIT_MS, 0);
}

static void release_held(struct ms_gateway *gw, struct guser *gu)
{
	for (struct session *s = gw->sessions, *next; s != NULL; s = next) {
		next = s->next;
		/* A session without gu: held for a user found in cutover in
		 * the store, whose password no server has checked yet. */
		if (s->st == SS_HELD && (s->gu == gu || (s->gu == NULL &&
		    !strcmp(ms_login_name(&s->login), gu->name))))
			route_login(s);
	}
}

/* Ends the user's sessions relayed to a server (to_dst 1: the
 * destination, 0: the source, -1: either): a cutover or a state change
 * another gateway (or mailshiftctl) made. user NULL: every user's, this
 * gateway may be fenced by the others. Held logins stay held. */
static int end_relays(struct ms_gateway *gw, const char *user, int to_dst)
{
	const char *why = user == NULL ? "this gateway lost touch with the "
		"others" : to_dst < 0 ? "the user's cutover began" :
		"the user's state changed";
	int n = 0;

	for (struct session *s = gw->sessions, *next; s != NULL; s = next) {
		next = s->next;
		if (s->gu == NULL || s->st != SS_RELAY ||
		    (user != NULL && strcmp(s->gu->name, user) != 0) ||
		    (to_dst >= 0 && s->to_dst != to_dst))
			continue;
		if (s->proto == MS_GW_IMAP)
			out(s, "* BYE [UNAVAILABLE] %s\r\n", user == NULL ?
			    "The gateway lost its database, log in again." :
			    "Your mailbox is moving, log in again.");
		ms_info("session %llu: ended: user=<%s> %s",
			(unsigned long long)s->id, s->gu->name, why);
		gw_session_close(s);
		n++;
	}
	return n;
}

const struct gw_user_sessions gw_mailbox_user_sessions = {
	.release_held = release_held,
	.kick = gw_sessions_kick,
	.end_relays = end_relays,
};

const struct ms_gw_frontend ms_gw_mailbox_sessions = {
	.name = "mailbox sessions",
	.sessions = gw_sessions_json,
	.kick = gw_sessions_kick,
	.close_all = gw_sessions_close_all,
};

/* Ends the user's IMAP and POP3 sessions (BYE): the operator's kick, and a
 * cutover's or rollback's. */
int gw_sessions_kick(struct ms_gateway *gw, const char *user)
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
