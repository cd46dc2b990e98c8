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
 * (lifecycle.c) where a login goes. It holds no protocol's syntax, no
 * user's state, and nothing of the listeners or the control socket.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gw_internal.h"
#include "log.h"
#include "retire.h"
#include "steer.h"
#include "testhook.h"

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

void gw_clear_args(struct session *s)
{
	for (unsigned int i = 0; i < s->argc; i++)
		ms_secret_free(&s->argv[i]);
	s->argc = 0;
	s->lit_need = 0;
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

/* Ends the session. Its memory goes when the timer's handle is closed, on
 * a later turn of the loop, so that a caller up the stack (a command loop
 * that just ran LOGOUT) may still look at s->st, which is SS_CLOSING. */
void gw_session_close(struct session *s)
{
	struct ms_gateway *gw = s->gw;

	if (s->st == SS_CLOSING)
		return;
	if (s->st == SS_RELAY)
		ms_steer_session_end(s->peer, s->peer_port, s->local,
				     s->local_port);
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
	gw_timer_stop(s);
	s->st = SS_RELAY;
	/* backend = kmod: the kernel's view of who is where (steer_kmod.c). */
	if (s->gu != NULL)
		ms_steer_session_add(s->gu->name, s->peer, s->peer_port,
				     s->local, s->local_port, s->to_dst);
	/* -v: each login's route (mailshiftd(8)). */
	ms_info("session %llu: %s: %s login of %s, relayed to the %s",
		(unsigned long long)s->id, s->peer, s->proto == MS_GW_IMAP ?
		"IMAP" : "POP3", s->gu != NULL ? s->gu->name : "?",
		s->to_dst ? "destination" : "source");
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

void gw_backend_fail(struct session *s, const char *why)
{
	ms_warn("session %llu: %s: %s", (unsigned long long)s->id,
		s->login.user != NULL ? s->login.user : "?", why);
	gw_timer_stop(s);
	ms_conn_close(&s->b);
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

	ms_info("session %llu: %s: login failed, reply delayed %llu ms",
		(unsigned long long)s->id, s->peer, (unsigned long long)delay);
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

void gw_backend_connect(struct session *s, int to_dst, int verify_only)
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
	if (ms_server_connect_for(gw->loop, srv, s->peer, s->peer_port, &cb,
				  &s->b) < 0)
		gw_backend_fail(s, "cannot connect");
	else
		ms_conn_set_wipe(s->b, 1);	/* the login goes this way */
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
	ms_info("session %llu: %s: plaintext login refused (not TLS, not a "
		"trusted network)", (unsigned long long)s->id, s->peer);
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
	gw_route_login(s);
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
