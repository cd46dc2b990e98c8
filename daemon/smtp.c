/* SMTP side of the gateway: inbound SMTP (25) routed per recipient, and
 * submission (587 with STARTTLS, 465 with implicit TLS) routed by AUTH.
 * See docs/gateway-spec.md ("SMTP").
 *
 * Inbound: we speak SMTP to the client ourselves. Each RCPT is looked up in
 * the map; the first accepted recipient binds the transaction to the MTA of
 * that recipient's server (source or destination). We connect to that MTA
 * when the first recipient arrives (EHLO, STARTTLS when configured, XCLIENT
 * with the client's address when it is offered, EHLO again), replay MAIL and
 * then each RCPT, and pass the MTA's own answers on. DATA is streamed to the
 * MTA as it comes, dot-stuffing and all (it is the same on both hops), up
 * to the terminating CRLF.CRLF; the client gets the MTA's final answer.
 * Nothing is queued here: when the MTA is unreachable the client gets a 4xx
 * and its own queue retries.
 *
 * Submission: we answer EHLO, STARTTLS and AUTH (PLAIN, LOGIN) ourselves;
 * the authenticated user is routed like an IMAP login, the AUTH is replayed
 * at that server's submission service and from its 235 on the session is
 * the server's: bytes are relayed both ways.
 *
 * A front end like IMAP's and POP3's: it sees the gateway through
 * gw_route.h only (a user's route, admission, TLS, capabilities, config)
 * and the login mechanics through gw_login.h, and the gateway reaches it
 * through ms_gw_smtp_frontend only. Nothing of the listeners, of the other
 * protocols' sessions or of a user's life is here; it queues no mail.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "gw_login.h"
#include "gw_route.h"
#include "log.h"
#include "net.h"
#include "retire.h"
#include "testhook.h"
#include "util.h"

#define LINE_MAX_LEN 4096	/* a command line (RFC 5321: 512; lenient) */
#define INBUF_PAUSE (32 * 1024)	/* stop reading the client above this */
#define SMTP_INBUF_MAX (256 * 1024) /* hard limit (a read is at most 64 KB) */
#define REPLY_MAX (16 * 1024)	/* one reply of an MTA, all its lines */
#define SMTP_BAD_MAX 10		/* bad commands before we hang up */
/* Commands that move no mail (EHLO, HELO, NOOP, RSET, VRFY, HELP) between
 * two messages (Postfix's smtpd_junk_command_limit): more end the session,
 * a client that sends thousands only costs the others time. */
#define JUNK_MAX 100
#define CLIENT_OUT_HIGH (64 * 1024)	/* our answers queued: stop reading */
#define CLIENT_OUT_LOW (16 * 1024)
#define RCPT_MAX 100		/* recipients per transaction (RFC minimum) */
#define IDLE_TIMEOUT_MS (300 * 1000)	/* like Postfix's smtpd_timeout */
#define SMTP_BACKEND_TIMEOUT_MS (30 * 1000)
#define DATA_END_TIMEOUT_MS (600 * 1000) /* RFC 5321 4.5.3.2.6 */
#define ID_BASE 1000000		/* SMTP session ids: apart from IMAP's */

enum smtp_cstate {
	C_CONNECTING,		/* accepted, implicit TLS handshake */
	C_CMD,			/* reading commands */
	C_STARTTLS,		/* our 220 went out, handshake running */
	C_WAIT,			/* a command waits for the MTA's answer */
	C_DATA,			/* streaming the message to the MTA */
	C_DATA_SINK,		/* the MTA is gone: swallow the message */
	C_DATA_END,		/* waiting for the MTA's final answer */
	C_AUTH_PLAIN,		/* AUTH PLAIN: waiting for the response */
	C_AUTH_USER,		/* AUTH LOGIN: waiting for the name */
	C_AUTH_PASS,		/* ... and the password */
	C_RELAY,		/* submission after AUTH: bytes both ways */
	C_CLOSING,
};

enum smtp_bstate {
	B_NONE,			/* no connection to an MTA */
	B_CONNECT,
	B_GREETING,
	B_EHLO,
	B_STARTTLS,		/* STARTTLS sent, waiting for 220 */
	B_TLS,			/* handshake */
	B_XCLIENT,
	B_READY,		/* greeted, no transaction */
	B_MAIL,
	B_RCPT,
	B_TXN,			/* MAIL accepted, waiting for the client */
	B_DATA,			/* DATA sent, waiting for 354 */
	B_BODY,
	B_DOT,			/* waiting for the final answer */
	B_AUTH,
	B_RELAY,
};

struct smtp_session {
	struct smtp_session *next, *prev;
	struct ms_gateway *gw;
	uint64_t id;
	enum ms_gw_proto proto;
	enum smtp_cstate st;
	struct ms_conn *c, *b;
	uv_timer_t timer;		/* frees the session when closed */
	int tls;			/* the client side is TLS */
	char peer[64], local[64];
	uint16_t peer_port, local_port;
	time_t since;
	unsigned int bad;
	unsigned int junk;		/* JUNK_MAX */
	/* Why reading is paused (MS_PAUSE_* bits, gw_login.h): the client
	 * for the MTA's full queue (WRITE), our full input buffer (INPUT),
	 * its unread answers (OUTPUT: its commands wait); the MTA for the
	 * client's full queue (WRITE). */
	int c_paused, b_paused;
	int processing;			/* inside client_process() */
	int admitted;			/* counted by ms_gw_admit() */

	/* client input (command lines) */
	char *in;
	size_t inlen, incap;
	char helo[256];			/* "" until HELO/EHLO */

	/* inbound transaction */
	char *mail;			/* "FROM:<...> params", NULL: none */
	char *rcpt;			/* the RCPT being replayed */
	unsigned int nrcpt;		/* recipients accepted */
	int side;			/* bound to: -1 none, 0 src, 1 dst */
	int txn_lost;			/* the MTA went away mid-transaction */
	int data_scan;			/* end-of-data scanner state */

	/* submission */
	struct ms_login login;		/* captured (wiped when done with) */
	char *auth_user;		/* authenticated (for the listing) */

	/* MTA */
	enum smtp_bstate bst;
	int b_side;			/* the MTA's side: 0 src, 1 dst */
	const struct ms_server_cfg *server;
	int b_tls, b_xclient_done;
	int b_has_starttls, b_has_xclient, b_xclient_port, b_xclient_helo;
	char *bin;			/* a reply being read */
	size_t binlen;
	size_t b_unread;		/* bytes of the read after this reply */
};

static struct smtp_session *sessions;
static uint64_t next_id = ID_BASE;

static void smtp_session_close(struct smtp_session *s);
static void client_process(struct smtp_session *s);
static void backend_start(struct smtp_session *s, int side);
static void backend_lost(struct smtp_session *s, const char *why);

/* ---- small helpers ---- */

/* A reply to the client (nothing once the client is gone). */
#define out(s, ...) \
	do { \
		if ((s)->c != NULL) \
			ms_conn_printf((s)->c, __VA_ARGS__); \
	} while (0)

/* A reply of the MTA, passed on as it is. */
static void out_raw(struct smtp_session *s, const char *text)
{
	if (s->c != NULL)
		ms_conn_write(s->c, text, strlen(text));
}

static void bout(struct smtp_session *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void bout(struct smtp_session *s, const char *fmt, ...)
{
	char buf[LINE_MAX_LEN + 64];
	va_list ap;
	int n;

	if (s->b == NULL)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(buf))
		return;
	ms_conn_write(s->b, buf, (size_t)n);
	OPENSSL_cleanse(buf, (size_t)n);
}

static const char *user_name(const struct smtp_session *s)
{
	return s->auth_user != NULL ? s->auth_user : "-";
}

/* ---- timer ---- */

static void timer_set(struct smtp_session *s, uv_timer_cb cb, uint64_t ms)
{
	if (s->st == C_CLOSING)
		return;
	uv_timer_stop(&s->timer);
	if (cb != NULL)
		uv_timer_start(&s->timer, cb, MS_TEST_TIME(ms), 0);
}

static void smtp_client_on_idle(uv_timer_t *t)
{
	struct smtp_session *s = t->data;

	out(s, "421 4.4.2 %s Error: timeout exceeded\r\n", ms_host_name());
	smtp_session_close(s);
}

static void smtp_backend_on_timeout(uv_timer_t *t)
{
	backend_lost(t->data, "no answer from the mail server");
}

static void idle_timer(struct smtp_session *s)
{
	timer_set(s, smtp_client_on_idle, IDLE_TIMEOUT_MS);
}

/* ---- session lifetime ---- */

static void txn_reset(struct smtp_session *s)
{
	free(s->mail);
	s->mail = NULL;
	free(s->rcpt);
	s->rcpt = NULL;
	s->nrcpt = 0;
	s->side = -1;
	s->txn_lost = 0;
}

static void backend_close(struct smtp_session *s, int quit)
{
	if (s->b != NULL && quit)
		ms_conn_write(s->b, "QUIT\r\n", 6);
	ms_conn_close(&s->b);
	s->bst = B_NONE;
	s->binlen = 0;
	s->b_paused = 0;
	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_WRITE);
}

static void smtp_session_close(struct smtp_session *s)
{
	if (s->st == C_CLOSING)
		return;
	s->st = C_CLOSING;
	uv_timer_stop(&s->timer);
	backend_close(s, s->bst == B_READY || s->bst == B_TXN);
	ms_conn_close(&s->c);
	ms_login_wipe(&s->login);
	txn_reset(s);
	ms_secret_buf_free(&s->in, s->incap);
	s->inlen = s->incap = 0;
	ms_secret_buf_free(&s->bin, REPLY_MAX + 1);
	free(s->auth_user);
	s->auth_user = NULL;
	if (s->prev != NULL)
		s->prev->next = s->next;
	else
		sessions = s->next;
	if (s->next != NULL)
		s->next->prev = s->prev;
	s->next = s->prev = NULL;
	if (s->admitted)
		ms_gw_unadmit(s->gw, s->peer);
	s->admitted = 0;
	/* The memory goes with the timer handle, on the loop's next turn:
	 * callers up the stack may still look at s->st. */
	ms_close_free((uv_handle_t *)&s->timer, s);
}

/* Back to reading commands (after an answer from the MTA, or ours). */
static void client_resume(struct smtp_session *s)
{
	if (s->st == C_CLOSING)
		return;
	s->st = C_CMD;
	idle_timer(s);
	client_process(s);
}

/* ---- routing ---- */

/* Where mail for a recipient goes. The map's user names are whatever the
 * operator imported: full addresses ("alice@example.org") or bare names
 * ("alice"). ms_gw_route() answers SOURCE both for users in state
 * source and for users the map does not know, so we ask in turn, and the
 * first answer other than SOURCE decides:
 *   1. the address as given, with its domain in lower case;
 *   2. all of it in lower case;
 *   3. the local part alone, as given, then in lower case;
 *   4. the same without a "+extension" (alice+lists@ -> alice@, alice).
 * None of them known elsewhere: the source. (So a map must not hold
 * "bob@example.org" on the source and an unrelated "bob" elsewhere: mail for
 * the former would follow the latter.) */
static enum ms_route route_rcpt(struct ms_gateway *gw, const char *addr)
{
	char cand[8][512];
	unsigned int n = 0;
	size_t len = strlen(addr);
	const char *at = strrchr(addr, '@');
	size_t llen = at != NULL ? (size_t)(at - addr) : len;
	const char *plus = memchr(addr, '+', llen);

	if (len >= sizeof(cand[0]))
		return ms_gw_route(gw, addr);
	for (int ext = 0; ext < 2; ext++) {
		/* ext 1: without "+extension" */
		size_t keep = ext ? (size_t)(plus - addr) : llen;

		if (ext && (plus == NULL || plus == addr))
			break;
		snprintf(cand[n], sizeof(cand[n]), "%.*s%s", (int)keep, addr,
			 at != NULL ? at : "");
		for (char *p = strrchr(cand[n], '@'); p != NULL && *p; p++)
			*p = (char)tolower((unsigned char)*p);
		n++;
		memcpy(cand[n], cand[n - 1], sizeof(cand[n]));
		for (char *p = cand[n]; *p; p++)
			*p = (char)tolower((unsigned char)*p);
		n++;
		if (at != NULL) {
			snprintf(cand[n], sizeof(cand[n]), "%.*s", (int)keep,
				 addr);
			n++;
			memcpy(cand[n], cand[n - 1], sizeof(cand[n]));
			for (char *p = cand[n]; *p; p++)
				*p = (char)tolower((unsigned char)*p);
			n++;
		}
	}
	for (unsigned int i = 0; i < n; i++) {
		enum ms_route r;
		int seen = 0;

		for (unsigned int j = 0; j < i && !seen; j++)
			seen = strcmp(cand[i], cand[j]) == 0;
		if (seen || cand[i][0] == '\0')
			continue;
		r = ms_gw_route(gw, cand[i]);
		if (r != MS_ROUTE_SOURCE)
			return r;
	}
	return MS_ROUTE_SOURCE;
}

/* "FROM:<path> params" / "TO:<path> params": checks the syntax, copies the
 * address (without a source route) into addr. Returns 0 or -1. */
static int parse_path(const char *arg, const char *kw, char *addr,
		      size_t addrsz, const char **rest_r)
{
	size_t kl = strlen(kw);
	const char *p, *e, *a;

	if (strncasecmp(arg, kw, kl) != 0)
		return -1;
	p = arg + kl;
	while (*p == ' ')
		p++;
	if (*p != '<')
		return -1;
	e = strchr(p, '>');
	if (e == NULL || (e[1] != '\0' && e[1] != ' '))
		return -1;
	a = p + 1;
	if (*a == '@') {		/* <@relay,@relay:user@domain> */
		const char *colon = memchr(a, ':', (size_t)(e - a));

		if (colon == NULL)
			return -1;
		a = colon + 1;
	}
	if ((size_t)(e - a) >= addrsz)
		return -1;
	memcpy(addr, a, (size_t)(e - a));
	addr[e - a] = '\0';
	for (const char *q = addr; *q != '\0'; q++)
		if ((unsigned char)*q <= ' ' || (unsigned char)*q >= 127 ||
		    *q == '<' || *q == '>')
			return -1;
	for (*rest_r = e + 1; **rest_r == ' '; (*rest_r)++)
		;
	return 0;
}

/* ---- the MTA connection ---- */

/* xtext (RFC 3461) of s into buf. */
static void xtext(const char *in, char *buf, size_t sz)
{
	size_t n = 0;

	for (; *in != '\0' && n + 4 < sz; in++) {
		unsigned char ch = (unsigned char)*in;

		if (ch < 33 || ch > 126 || ch == '+' || ch == '=')
			n += (size_t)snprintf(buf + n, sz - n, "+%02X", ch);
		else
			buf[n++] = (char)ch;
	}
	buf[n] = '\0';
}

static void send_ehlo(struct smtp_session *s)
{
	/* After XCLIENT we speak for the client: its HELO name goes into
	 * the MTA's Received: line. */
	const char *name = s->b_xclient_done && s->helo[0] != '\0' ?
		s->helo : ms_host_name();

	s->bst = B_EHLO;
	s->b_has_starttls = s->b_has_xclient = 0;
	s->b_xclient_port = s->b_xclient_helo = 0;
	bout(s, "EHLO %s\r\n", name);
}

static void smtp_backend_on_tls(struct ms_conn *conn, int status,
				const char *error)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	if (status != 0) {
		backend_lost(s, error != NULL ? error : "STARTTLS failed");
		return;
	}
	s->b_tls = 1;
	send_ehlo(s);
}

static void backend_auth(struct smtp_session *s)
{
	if (ms_login_send_plain(s->b, "AUTH PLAIN ", &s->login) < 0) {
		backend_lost(s, "out of memory");
		return;
	}
	s->bst = B_AUTH;
}

/* The MTA is greeted (and under TLS, and told who the client is): on with
 * what the client is waiting for. */
static void backend_ready(struct smtp_session *s)
{
	s->bst = B_READY;
	if (s->proto == MS_GW_SUBMISSION) {
		backend_auth(s);
		return;
	}
	if (s->st == C_WAIT && s->rcpt != NULL && s->mail != NULL) {
		s->bst = B_MAIL;
		bout(s, "MAIL %s\r\n", s->mail);
	}
}

/* A complete reply in the login phase (greeting, EHLO, STARTTLS, XCLIENT). */
static void backend_setup_reply(struct smtp_session *s, int code,
				const char *text)
{
	switch (s->bst) {
	case B_GREETING:
		if (code != 220) {
			backend_lost(s, "the mail server refused us");
			return;
		}
		send_ehlo(s);
		return;
	case B_EHLO:
		if (code != 250) {
			backend_lost(s, "EHLO refused by the mail server");
			return;
		}
		/* Capabilities: one per line after the first. */
		for (const char *l = strchr(text, '\n'); l != NULL && l[1] != '\0';
		     l = strchr(l + 1, '\n')) {
			const char *kw = l + 5;	/* "\n250-" / "\n250 " */

			if (strlen(l) < 6)
				break;
			if (!strncasecmp(kw, "STARTTLS", 8) &&
			    (kw[8] == '\r' || kw[8] == '\n'))
				s->b_has_starttls = 1;
			else if (!strncasecmp(kw, "XCLIENT", 7) &&
				 (kw[7] == ' ' || kw[7] == '\r')) {
				const char *e = strchr(kw, '\r');
				char attrs[512];
				size_t n = e != NULL ? (size_t)(e - kw) :
					strlen(kw);

				snprintf(attrs, sizeof(attrs), "%.*s ", (int)n, kw);
				s->b_has_xclient = strstr(attrs, " ADDR ") != NULL;
				s->b_xclient_port = strstr(attrs, " PORT ") != NULL;
				s->b_xclient_helo = strstr(attrs, " HELO ") != NULL;
			}
		}
		if (s->server->tls_mode == MS_TLS_STARTTLS && !s->b_tls) {
			if (!s->b_has_starttls) {
				backend_lost(s, "the mail server offers no "
					     "STARTTLS");
				return;
			}
			s->bst = B_STARTTLS;
			bout(s, "STARTTLS\r\n");
			return;
		}
		if (s->b_has_xclient && !s->b_xclient_done && s->peer[0]) {
			char helo[600], addr[80];

			s->bst = B_XCLIENT;
			snprintf(addr, sizeof(addr), "%s%s",
				 strchr(s->peer, ':') != NULL ? "IPV6:" : "",
				 s->peer);
			helo[0] = '\0';
			if (s->b_xclient_helo && s->helo[0] != '\0') {
				char x[520];

				xtext(s->helo, x, sizeof(x));
				snprintf(helo, sizeof(helo), " HELO=%s", x);
			}
			if (s->b_xclient_port)
				bout(s, "XCLIENT ADDR=%s PORT=%u NAME=[UNAVAILABLE]"
				     "%s\r\n", addr, s->peer_port, helo);
			else
				bout(s, "XCLIENT ADDR=%s NAME=[UNAVAILABLE]%s\r\n",
				     addr, helo);
			return;
		}
		backend_ready(s);
		return;
	case B_STARTTLS:
		s->bst = B_TLS;
		if (code != 220 ||
		    ms_conn_starttls(s->b, smtp_backend_on_tls) < 0)
			backend_lost(s, "STARTTLS refused by the mail server");
		else if (s->binlen > 0 || s->b_unread > 0)
			/* Came with the go-ahead, not protected by TLS: an
			 * attacker on the path may have put it there. */
			backend_lost(s, "the mail server sent data after its "
				     "STARTTLS go-ahead");
		return;
	case B_XCLIENT:
		/* Postfix answers with a new greeting (220); a new EHLO is
		 * due either way. A refusal: go on without. */
		if (code != 220 && code != 250)
			ms_warn("smtp %llu: XCLIENT refused by the mail server: "
				"%d", (unsigned long long)s->id, code);
		s->b_xclient_done = 1;
		send_ehlo(s);
		return;
	default:
		return;
	}
}

static void submission_fail(struct smtp_session *s, const char *reply)
{
	out_raw(s, reply);
	ms_login_wipe(&s->login);
	backend_close(s, 1);
	client_resume(s);
}

/* One complete reply of the MTA; text is every line with its CRLF. */
static void backend_reply(struct smtp_session *s, int code, const char *text)
{
	switch (s->bst) {
	case B_GREETING:
	case B_EHLO:
	case B_STARTTLS:
	case B_XCLIENT:
		backend_setup_reply(s, code, text);
		return;
	case B_AUTH:
		if (code == 334) {
			/* No initial response taken: send it again. */
			if (ms_login_send_plain(s->b, "", &s->login) < 0)
				backend_lost(s, "out of memory");
			return;
		}
		if (code / 100 != 2) {
			/* The server's own words: the client may try again. */
			ms_info("smtp %llu: submission login refused for %s",
				(unsigned long long)s->id, s->login.user);
			submission_fail(s, text);
			return;
		}
		free(s->auth_user);
		s->auth_user = strdup(ms_login_name(&s->login));
		ms_info("smtp %llu: %s: submission via the %s", (unsigned long
			long)s->id, user_name(s), s->b_side ? "destination" :
			"source");
		ms_login_wipe(&s->login);
		out_raw(s, text);
		s->bst = B_RELAY;
		s->st = C_RELAY;
		ms_conn_set_wipe(s->c, 0);
		ms_conn_set_wipe(s->b, 0);
		ms_conn_set_water(s->c, 0, 0);
		uv_timer_stop(&s->timer);
		/* What the client pipelined after its AUTH. */
		if (s->inlen > 0) {
			ms_conn_write(s->b, s->in, s->inlen);
			OPENSSL_cleanse(s->in, s->inlen);
			s->inlen = 0;
		}
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_INPUT);
		return;
	case B_MAIL:
		if (code / 100 != 2) {
			/* We said 250 to MAIL already: the MTA's refusal is
			 * the answer to the recipient that made us ask. */
			out_raw(s, text);
			free(s->rcpt);
			s->rcpt = NULL;
			s->bst = B_READY;
			client_resume(s);
			return;
		}
		s->bst = B_RCPT;
		bout(s, "RCPT %s\r\n", s->rcpt);
		return;
	case B_RCPT:
		s->bst = B_TXN;
		free(s->rcpt);
		s->rcpt = NULL;
		if (code / 100 == 2) {
			s->nrcpt++;
			s->side = s->b_side;
		}
		out_raw(s, text);
		client_resume(s);
		return;
	case B_DATA:
		if (code != 354) {
			out_raw(s, text);
			txn_reset(s);
			backend_close(s, 1);
			client_resume(s);
			return;
		}
		out_raw(s, text);
		s->bst = B_BODY;
		s->st = C_DATA;
		s->data_scan = 2;	/* at the start of a line */
		idle_timer(s);
		client_process(s);	/* data that came early */
		return;
	case B_DOT:
		out_raw(s, text);
		s->junk = 0;		/* a message went through */
		txn_reset(s);
		s->bst = B_READY;
		client_resume(s);
		return;
	default:
		/* An answer nobody asked for (idle, or during the body). */
		backend_lost(s, "unexpected reply from the mail server");
		return;
	}
}

static void smtp_backend_on_read(struct ms_conn *conn, const char *data,
				 size_t len)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	if (s->bst == B_RELAY) {
		if (ms_relay(s->c, s->b, &s->b_paused, data, len) < 0)
			smtp_session_close(s);
		return;
	}
	/* s->b may change under us: a refused AUTH closes this connection
	 * and a pipelined AUTH of the client may open the next one. */
	while (len > 0 && s->b == conn && s->st != C_CLOSING) {
		char *line;
		size_t ll;
		long n;

		if (s->bst == B_RELAY) {
			if (ms_relay(s->c, s->b, &s->b_paused, data, len) < 0)
				smtp_session_close(s);
			return;
		}
		n = ms_line_take(&s->bin, &s->binlen, REPLY_MAX, data, len);
		if (n < 0) {
			backend_lost(s, "reply from the mail server too long");
			return;
		}
		line = s->bin + s->binlen - n;
		data += n;
		len -= (size_t)n;
		ll = (size_t)n;
		if (line[ll - 1] != '\n')
			return;
		/* "ddd-text" continues, "ddd text" or "ddd" ends a reply. */
		if (ll < 4 || !isdigit((unsigned char)line[0]) ||
		    !isdigit((unsigned char)line[1]) ||
		    !isdigit((unsigned char)line[2]) ||
		    (line[3] != ' ' && line[3] != '-' && line[3] != '\r' &&
		     line[3] != '\n') ||
		    (line != s->bin && strncmp(line, s->bin, 3) != 0)) {
			backend_lost(s, "bad reply from the mail server");
			return;
		}
		if (line[ll - 2] != '\r') {
			/* A bare LF: pass it on as CRLF. */
			if (s->binlen + 1 > REPLY_MAX) {
				backend_lost(s, "reply from the mail server "
					     "too long");
				return;
			}
			line[ll - 1] = '\r';
			line[ll] = '\n';
			s->binlen++;
		}
		if (line[3] == '-')
			continue;
		s->bin[s->binlen] = '\0';
		s->binlen = 0;
		s->b_unread = len;
		backend_reply(s, atoi(s->bin), s->bin);
		s->b_unread = 0;
	}
}

static void smtp_backend_on_error(struct ms_conn *conn, const char *error)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	if (s->bst == B_RELAY) {
		/* The server ended the session (after QUIT, or its timeout). */
		smtp_session_close(s);
		return;
	}
	backend_lost(s, error);
}

static void smtp_backend_on_connect(struct ms_conn *conn, int status,
				    const char *error)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	if (status != 0) {
		backend_lost(s, error != NULL ? error : "connect failed");
		return;
	}
	s->bst = B_GREETING;
}

static void smtp_backend_on_drain(struct ms_conn *conn)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_WRITE);
}

/* The MTA failed us (down, timed out, spoke nonsense): whatever the client
 * waits for gets a temporary failure, so that it tries again later. */
static void backend_lost(struct smtp_session *s, const char *why)
{
	enum smtp_bstate was = s->bst;

	if (s->st == C_CLOSING)
		return;
	ms_warn("smtp %llu: %s mail server %s:%u: %s", (unsigned long long)s->id,
		s->b_side ? "destination" : "source",
		s->server != NULL ? s->server->host : "?",
		s->server != NULL ? s->server->port : 0, why);
	backend_close(s, 0);
	if (s->proto == MS_GW_SUBMISSION) {
		if (s->st == C_RELAY) {
			smtp_session_close(s);
			return;
		}
		if (s->st == C_WAIT)
			submission_fail(s, "454 4.7.0 Mail server temporarily "
					"unavailable, try again later\r\n");
		return;
	}
	switch (s->st) {
	case C_WAIT:
		free(s->rcpt);
		s->rcpt = NULL;
		if (was == B_DATA) {
			out(s, "451 4.4.2 Lost connection to the mail server, "
			    "try again later\r\n");
			txn_reset(s);
		} else if (s->nrcpt > 0) {
			/* The recipients it took are gone with it. */
			out(s, "451 4.4.2 Lost connection to the mail server, "
			    "try again later\r\n");
			s->txn_lost = 1;
		} else {
			out(s, "451 4.4.1 Mail server temporarily unavailable, "
			    "try again later\r\n");
		}
		client_resume(s);
		return;
	case C_DATA:
		/* Swallow the rest of the message; answer at its end. */
		s->st = C_DATA_SINK;
		return;
	case C_DATA_END:
		out(s, "451 4.4.2 Lost connection to the mail server, try "
		    "again later\r\n");
		txn_reset(s);
		client_resume(s);
		return;
	default:
		if (s->nrcpt > 0)
			s->txn_lost = 1;
		return;
	}
}

static void backend_start(struct smtp_session *s, int side)
{
	const struct ms_gw_config *cfg = ms_gw_config(s->gw);
	struct ms_conn_callbacks cb = {
		.on_connect = smtp_backend_on_connect,
		.on_read = smtp_backend_on_read,
		.on_error = smtp_backend_on_error,
		.on_drain = smtp_backend_on_drain,
		.ctx = s,
	};
	const struct ms_server_cfg *srv;

	if (s->proto == MS_GW_SUBMISSION)
		srv = side ? &cfg->dst_submission : &cfg->src_submission;
	else
		srv = side ? &cfg->dst_smtp : &cfg->src_smtp;
	s->server = srv;
	s->b_side = side;
	s->b_tls = s->b_xclient_done = 0;
	s->binlen = 0;
	s->st = C_WAIT;
	s->bst = B_CONNECT;
	timer_set(s, smtp_backend_on_timeout, SMTP_BACKEND_TIMEOUT_MS);
	if (srv->host[0] == '\0') {
		backend_lost(s, "no such server configured");
		return;
	}
	if (ms_server_connect_for(ms_gw_loop(s->gw), srv, s->peer, s->peer_port,
				  &cb, &s->b) < 0) {
		s->b = NULL;
		backend_lost(s, "cannot connect");
		return;
	}
	if (s->proto == MS_GW_SUBMISSION)
		ms_conn_set_wipe(s->b, 1);	/* the AUTH goes this way */
}

/* ---- commands ---- */

static void bad_command(struct smtp_session *s, const char *reply)
{
	out(s, "%s", reply);
	if (++s->bad >= SMTP_BAD_MAX) {
		out(s, "421 4.7.0 %s Error: too many errors\r\n", ms_host_name());
		smtp_session_close(s);
	}
}

/* AUTH over TLS when the gateway has a certificate (after STARTTLS, as
 * Postfix's smtpd_tls_auth_only); without one, only from the trusted
 * networks ([listen] plaintext_auth, trusted_networks): a password never
 * crosses the network in the clear by default. */
static int auth_offered(const struct smtp_session *s)
{
	if (s->proto != MS_GW_SUBMISSION)
		return 0;
	if (ms_gw_tls(s->gw) != NULL)
		return s->tls;
	return ms_gw_plaintext_ok(s->gw, s->peer);
}

static void cmd_ehlo(struct smtp_session *s, const char *arg, int ehlo)
{
	int starttls = ms_gw_tls(s->gw) != NULL && !s->tls;

	if (arg == NULL || *arg == '\0') {
		bad_command(s, ehlo ? "501 5.5.4 Syntax: EHLO hostname\r\n" :
			    "501 5.5.4 Syntax: HELO hostname\r\n");
		return;
	}
	/* A name we can repeat safely (in EHLO and XCLIENT to the MTA). */
	snprintf(s->helo, sizeof(s->helo), "%s", arg);
	for (char *p = s->helo; *p != '\0'; p++)
		if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 127) {
			snprintf(s->helo, sizeof(s->helo), "[%s]", s->peer);
			break;
		}
	txn_reset(s);
	if (s->bst == B_TXN)
		backend_close(s, 1);
	if (!ehlo) {
		out(s, "250 %s\r\n", ms_host_name());
		return;
	}
	out(s, "250-%s\r\n%s%s%s250 ENHANCEDSTATUSCODES\r\n", ms_host_name(),
	    ms_gw_caps(s->gw, s->proto == MS_GW_SMTP ? MS_CAPS_SMTP :
		       MS_CAPS_SUBMISSION),
	    starttls ? "250-STARTTLS\r\n" : "",
	    auth_offered(s) ? "250-AUTH PLAIN LOGIN\r\n" : "");
}

static void smtp_client_on_tls(struct ms_conn *conn, int status,
			       const char *error)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	if (status != 0) {
		smtp_session_close(s);
		return;
	}
	s->tls = 1;
	/* RFC 3207 4.2: forget what the client told us before. */
	s->helo[0] = '\0';
	txn_reset(s);
	if (s->bst == B_TXN)
		backend_close(s, 1);
	client_resume(s);
}

static void cmd_starttls(struct smtp_session *s, const char *arg)
{
	if (arg != NULL) {
		bad_command(s, "501 5.5.4 Syntax: STARTTLS\r\n");
		return;
	}
	if (ms_gw_tls(s->gw) == NULL) {
		bad_command(s, "502 5.5.1 Error: command not implemented\r\n");
		return;
	}
	if (s->tls) {
		out(s, "554 5.5.1 Error: TLS already active\r\n");
		return;
	}
	out(s, "220 2.0.0 Ready to start TLS\r\n");
	/* Nothing the client sent in the clear after STARTTLS counts
	 * (command injection, CVE-2011-0411). */
	OPENSSL_cleanse(s->in, s->inlen);
	s->inlen = 0;
	s->st = C_STARTTLS;
	if (ms_conn_starttls_server(s->c, ms_gw_tls(s->gw),
				    smtp_client_on_tls) < 0)
		smtp_session_close(s);
}

static void cmd_mail(struct smtp_session *s, const char *arg)
{
	char addr[1024];
	const char *rest;

	if (s->helo[0] == '\0') {
		out(s, "503 5.5.1 Error: send HELO/EHLO first\r\n");
		return;
	}
	if (s->proto == MS_GW_SUBMISSION) {
		out(s, "530 5.7.0 Authentication required\r\n");
		return;
	}
	if (s->mail != NULL) {
		out(s, "503 5.5.1 Error: nested MAIL command\r\n");
		return;
	}
	if (arg == NULL || parse_path(arg, "FROM:", addr, sizeof(addr),
				      &rest) < 0) {
		bad_command(s, "501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
		return;
	}
	for (const char *p = rest; *p != '\0'; p++)
		if ((unsigned char)*p < ' ' || (unsigned char)*p >= 127) {
			bad_command(s, "501 5.5.4 Bad MAIL parameters\r\n");
			return;
		}
	txn_reset(s);
	if (s->bst == B_TXN)
		backend_close(s, 1);
	if (asprintf(&s->mail, "FROM:<%s>%s%s", addr, *rest ? " " : "",
		     rest) < 0) {
		s->mail = NULL;
		out(s, "451 4.3.0 Error: out of memory\r\n");
		return;
	}
	out(s, "250 2.1.0 Ok\r\n");
}

static void cmd_rcpt(struct smtp_session *s, const char *arg)
{
	char addr[1024];
	const char *rest;
	enum ms_route r;
	int side;

	if (s->mail == NULL) {
		out(s, "503 5.5.1 Error: need MAIL command\r\n");
		return;
	}
	if (arg == NULL || parse_path(arg, "TO:", addr, sizeof(addr),
				      &rest) < 0 || addr[0] == '\0') {
		bad_command(s, "501 5.5.4 Syntax: RCPT TO:<address>\r\n");
		return;
	}
	for (const char *p = rest; *p != '\0'; p++)
		if ((unsigned char)*p < ' ' || (unsigned char)*p >= 127) {
			bad_command(s, "501 5.5.4 Bad RCPT parameters\r\n");
			return;
		}
	if (s->txn_lost) {
		out(s, "451 4.4.2 Lost connection to the mail server, try "
		    "again later\r\n");
		return;
	}
	if (s->nrcpt >= RCPT_MAX) {
		out(s, "452 4.5.3 Error: too many recipients\r\n");
		return;
	}
	r = route_rcpt(s->gw, addr);
	if (r == MS_ROUTE_DEFER) {
		ms_info("smtp %llu: <%s> deferred: mailbox being moved",
			(unsigned long long)s->id, addr);
		out(s, "451 4.2.0 Mailbox being moved, try again later\r\n");
		return;
	}
	side = r == MS_ROUTE_DESTINATION;
	if (!side)	/* for retire --check */
		ms_retire_note("mail", addr);
	if (s->side >= 0 && s->side != side) {
		/* RFC 5321 4.5.3.1.10: the sender retries it in another
		 * transaction, which goes to the other server. */
		out(s, "452 4.5.3 Too many recipients (other server), retry in "
		    "another transaction\r\n");
		return;
	}
	free(s->rcpt);
	if (asprintf(&s->rcpt, "TO:<%s>%s%s", addr, *rest ? " " : "",
		     rest) < 0) {
		s->rcpt = NULL;
		out(s, "451 4.3.0 Error: out of memory\r\n");
		return;
	}
	if (s->b != NULL && s->b_side == side &&
	    (s->bst == B_TXN || s->bst == B_READY)) {
		s->st = C_WAIT;
		timer_set(s, smtp_backend_on_timeout, SMTP_BACKEND_TIMEOUT_MS);
		if (s->bst == B_TXN) {
			s->bst = B_RCPT;
			bout(s, "RCPT %s\r\n", s->rcpt);
		} else {
			s->bst = B_MAIL;
			bout(s, "MAIL %s\r\n", s->mail);
		}
		return;
	}
	/* No MTA yet, or the other side's with no recipient taken. */
	backend_close(s, s->bst == B_READY || s->bst == B_TXN);
	backend_start(s, side);
}

static void cmd_data(struct smtp_session *s, const char *arg)
{
	if (arg != NULL) {
		bad_command(s, "501 5.5.4 Syntax: DATA\r\n");
		return;
	}
	if (s->mail == NULL) {
		out(s, "503 5.5.1 Error: need RCPT command\r\n");
		return;
	}
	if (s->txn_lost || (s->nrcpt > 0 && (s->b == NULL ||
					      s->bst != B_TXN))) {
		out(s, "451 4.4.2 Lost connection to the mail server, try "
		    "again later\r\n");
		txn_reset(s);
		return;
	}
	if (s->nrcpt == 0) {
		out(s, "554 5.5.1 Error: no valid recipients\r\n");
		return;
	}
	s->st = C_WAIT;
	s->bst = B_DATA;
	timer_set(s, smtp_backend_on_timeout, SMTP_BACKEND_TIMEOUT_MS);
	bout(s, "DATA\r\n");
}

static void auth_start(struct smtp_session *s)
{
	const char *name = ms_login_name(&s->login);
	char what[64];
	enum ms_route r;

	if (s->login.user == NULL || s->login.pass == NULL ||
	    s->login.user[0] == '\0') {
		ms_login_wipe(&s->login);
		out(s, "535 5.7.8 Error: authentication failed\r\n");
		return;
	}
	snprintf(what, sizeof(what), "smtp %llu", (unsigned long long)s->id);
	switch (ms_gw_login_names_check(what, s->login.user, name)) {
	case MS_GW_NAME_TOO_LONG:
		ms_login_wipe(&s->login);
		out(s, "501 5.5.4 User name too long (at most "
		    MS_STR(MS_GW_USER_MAX) " bytes)\r\n");
		return;
	case MS_GW_NAME_INVALID:
		ms_login_wipe(&s->login);
		out(s, "535 5.7.8 Error: authentication failed (invalid "
		    "characters in the user name)\r\n");
		return;
	}
	r = ms_gw_route(s->gw, name);
	if (r == MS_ROUTE_DEFER) {
		ms_info("smtp %llu: %s: submission deferred: mailbox being "
			"moved", (unsigned long long)s->id, name);
		ms_login_wipe(&s->login);
		out(s, "454 4.7.0 Temporary authentication failure, try again "
		    "later\r\n");
		return;
	}
	if (r == MS_ROUTE_SOURCE)
		ms_retire_note("submission", name);
	backend_close(s, 0);
	backend_start(s, r == MS_ROUTE_DESTINATION);
}

static void cmd_auth(struct smtp_session *s, char *arg)
{
	char *ir;

	if (s->proto != MS_GW_SUBMISSION) {
		out(s, "503 5.5.1 Error: authentication not enabled\r\n");
		return;
	}
	if (!auth_offered(s)) {
		if (ms_gw_tls(s->gw) != NULL)
			out(s, "530 5.7.0 Must issue a STARTTLS command "
			    "first\r\n");
		else
			out(s, "538 5.7.11 Encryption required for requested "
			    "authentication mechanism\r\n");
		return;
	}
	if (s->helo[0] == '\0') {
		out(s, "503 5.5.1 Error: send HELO/EHLO first\r\n");
		return;
	}
	if (arg == NULL) {
		bad_command(s, "501 5.5.4 Syntax: AUTH mechanism\r\n");
		return;
	}
	ir = strchr(arg, ' ');
	if (ir != NULL)
		*ir++ = '\0';
	if (!strcasecmp(arg, "PLAIN")) {
		if (ir == NULL) {
			s->st = C_AUTH_PLAIN;
			out(s, "334 \r\n");
			return;
		}
		if (ms_login_take_plain(&s->login, ir) < 0) {
			out(s, "501 5.5.2 Invalid base64 data\r\n");
			return;
		}
		auth_start(s);
	} else if (!strcasecmp(arg, "LOGIN")) {
		ms_login_wipe(&s->login);
		if (ir != NULL && strcmp(ir, "=") != 0) {
			if (ms_login_decode_step(ir, &s->login.user) < 0) {
				out(s, "501 5.5.2 Invalid base64 data\r\n");
				return;
			}
			s->st = C_AUTH_PASS;
			out(s, "334 UGFzc3dvcmQ6\r\n");
			return;
		}
		s->st = C_AUTH_USER;
		out(s, "334 VXNlcm5hbWU6\r\n");
	} else {
		out(s, "504 5.5.4 Unsupported authentication mechanism\r\n");
	}
}

/* A line of an AUTH exchange (base64, or "*" to cancel). */
static void auth_line(struct smtp_session *s, const char *line)
{
	enum smtp_cstate st = s->st;
	char *step;

	s->st = C_CMD;
	if (!strcmp(line, "*")) {
		ms_login_wipe(&s->login);
		out(s, "501 5.7.0 Authentication aborted\r\n");
		return;
	}
	if (st == C_AUTH_PLAIN) {
		if (ms_login_take_plain(&s->login, line) < 0) {
			out(s, "501 5.5.2 Invalid base64 data\r\n");
			return;
		}
		auth_start(s);
		return;
	}
	if (!strcmp(line, "=")) {
		/* RFC 4954: an empty response. */
		step = strdup("");
		if (step == NULL)
			return;
	} else if (ms_login_decode_step(line, &step) < 0) {
		ms_login_wipe(&s->login);
		out(s, "501 5.5.2 Invalid base64 data\r\n");
		return;
	}
	if (st == C_AUTH_USER) {
		ms_login_wipe(&s->login);
		s->login.user = step;
		s->st = C_AUTH_PASS;
		out(s, "334 UGFzc3dvcmQ6\r\n");
		return;
	}
	s->login.pass = step;
	auth_start(s);
}

static int is_junk(const char *cmd)
{
	static const char *const junk[] = {
		"EHLO", "HELO", "NOOP", "RSET", "VRFY", "HELP",
	};

	for (size_t i = 0; i < sizeof(junk) / sizeof(junk[0]); i++)
		if (!strcasecmp(cmd, junk[i]))
			return 1;
	return 0;
}

static void command(struct smtp_session *s, char *line)
{
	char *arg = strchr(line, ' ');

	if (arg != NULL) {
		*arg++ = '\0';
		while (*arg == ' ')
			arg++;
		if (*arg == '\0')
			arg = NULL;
	}
	if (is_junk(line) && ++s->junk > JUNK_MAX) {
		ms_warn("smtp %llu: %s: more than %d commands without a message",
			(unsigned long long)s->id, s->peer, JUNK_MAX);
		out(s, "421 4.7.0 %s Error: too many commands without a "
		    "message\r\n", ms_host_name());
		smtp_session_close(s);
		return;
	}
	if (!strcasecmp(line, "EHLO"))
		cmd_ehlo(s, arg, 1);
	else if (!strcasecmp(line, "HELO"))
		cmd_ehlo(s, arg, 0);
	else if (!strcasecmp(line, "MAIL"))
		cmd_mail(s, arg);
	else if (!strcasecmp(line, "RCPT"))
		cmd_rcpt(s, arg);
	else if (!strcasecmp(line, "DATA"))
		cmd_data(s, arg);
	else if (!strcasecmp(line, "RSET")) {
		if (s->bst == B_TXN)
			backend_close(s, 1);
		txn_reset(s);
		out(s, "250 2.0.0 Ok\r\n");
	} else if (!strcasecmp(line, "NOOP"))
		out(s, "250 2.0.0 Ok\r\n");
	else if (!strcasecmp(line, "QUIT")) {
		out(s, "221 2.0.0 Bye\r\n");
		smtp_session_close(s);
	} else if (!strcasecmp(line, "STARTTLS"))
		cmd_starttls(s, arg);
	else if (!strcasecmp(line, "AUTH"))
		cmd_auth(s, arg);
	else if (!strcasecmp(line, "VRFY"))
		out(s, "502 5.5.1 VRFY command is disabled\r\n");
	else if (!strcasecmp(line, "HELP"))
		out(s, "214 2.0.0 See RFC 5321\r\n");
	else if (line[0] == '\0')
		bad_command(s, "500 5.5.2 Error: bad syntax\r\n");
	else
		bad_command(s, "502 5.5.2 Error: command not recognized\r\n");
}

/* ---- message data ---- */

/* Scans the message for its end (CRLF.CRLF; we start after the CRLF of
 * DATA). A bare CR or LF ends the session: an MTA behind us might take it
 * for a line end and then read the rest as commands (SMTP smuggling).
 * Returns the bytes that belong to the message (its end included) and sets
 * *end; or -1 on a bare CR/LF. */
static long data_scan(struct smtp_session *s, const char *d, size_t len,
		      int *end)
{
	/* states: 0 in a line, 1 CR, 2 line start, 3 ".", 4 ".CR" */
	int st = s->data_scan;

	*end = 0;
	for (size_t i = 0; i < len; i++) {
		char ch = d[i];

		if (st == 1 || st == 4) {
			if (ch != '\n')
				return -1;
			if (st == 4) {
				s->data_scan = 2;
				*end = 1;
				return (long)i + 1;
			}
			st = 2;
		} else if (ch == '\n') {
			return -1;
		} else if (ch == '\r') {
			st = st == 3 ? 4 : 1;
		} else if (st == 2 && ch == '.') {
			st = 3;
		} else {
			st = 0;
		}
	}
	s->data_scan = st;
	return (long)len;
}

/* Message bytes from the client (C_DATA or C_DATA_SINK). Returns how many
 * were taken; the rest (after the end of the message) are commands. */
static size_t data_feed(struct smtp_session *s, const char *d, size_t len)
{
	int end;
	long n = data_scan(s, d, len, &end);

	if (n < 0) {
		ms_warn("smtp %llu: bare CR or LF in message data from %s",
			(unsigned long long)s->id, s->peer);
		out(s, "521 5.5.2 %s Error: bare <CR> or <LF> received\r\n",
		    ms_host_name());
		smtp_session_close(s);
		return len;
	}
	if (s->st == C_DATA) {
		if (ms_relay(s->b, s->c, &s->c_paused, d, (size_t)n) < 0) {
			smtp_session_close(s);
			return len;
		}
	}
	if (!end)
		return (size_t)n;
	if (s->st == C_DATA_SINK) {
		out(s, "451 4.4.2 Lost connection to the mail server, try "
		    "again later\r\n");
		txn_reset(s);
		s->st = C_CMD;
		idle_timer(s);
		return (size_t)n;
	}
	s->st = C_DATA_END;
	s->bst = B_DOT;
	timer_set(s, smtp_backend_on_timeout, DATA_END_TIMEOUT_MS);
	return (size_t)n;
}

/* ---- client input ---- */

static int in_append(struct smtp_session *s, const char *data, size_t len)
{
	if (ms_secret_reserve(&s->in, &s->incap, s->inlen, s->inlen + len,
			      4096, SMTP_INBUF_MAX) < 0)
		return -1;
	memcpy(s->in + s->inlen, data, len);
	s->inlen += len;
	return 0;
}

static void in_consume(struct smtp_session *s, size_t n)
{
	memmove(s->in, s->in + n, s->inlen - n);
	OPENSSL_cleanse(s->in + s->inlen - n, n);
	s->inlen -= n;
}

/* Works through what the client sent, as long as we are not waiting for
 * something else. */
static void client_process(struct smtp_session *s)
{
	/* Called again from inside (a command answered at once, e.g. with
	 * the MTA down): the loop below goes on with the next line. */
	if (s->processing)
		return;
	s->processing = 1;
	while (s->inlen > 0 && s->st != C_CLOSING) {
		char line[LINE_MAX_LEN + 1];
		char *lf;
		size_t ll;

		if (s->st == C_DATA || s->st == C_DATA_SINK) {
			size_t n = data_feed(s, s->in, s->inlen);

			if (s->st == C_CLOSING)
				return;
			in_consume(s, n);
			continue;
		}
		if (s->st != C_CMD && s->st != C_AUTH_PLAIN &&
		    s->st != C_AUTH_USER && s->st != C_AUTH_PASS)
			break;
		if (ms_conn_over_high(s->c)) {
			/* Answers pile up unread: no more commands (nor
			 * reading) until they drain. */
			ms_pause_set(s->c, &s->c_paused, MS_PAUSE_OUTPUT);
			break;
		}
		lf = memchr(s->in, '\n', s->inlen);
		if (lf == NULL) {
			if (s->inlen > LINE_MAX_LEN)
				goto too_long;
			break;
		}
		ll = (size_t)(lf - s->in);
		if (ll > LINE_MAX_LEN)
			goto too_long;
		memcpy(line, s->in, ll);
		line[ll] = '\0';
		if (ll > 0 && line[ll - 1] == '\r')
			line[--ll] = '\0';
		in_consume(s, (size_t)(lf - s->in) + 1);
		if (strlen(line) != ll) {
			bad_command(s, "500 5.5.2 Error: bad syntax\r\n");
		} else if (s->st == C_CMD) {
			command(s, line);
		} else {
			auth_line(s, line);
		}
		OPENSSL_cleanse(line, ll);
	}
	s->processing = 0;
	if (s->st == C_CLOSING)
		return;
	if (s->inlen < INBUF_PAUSE)
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_INPUT);
	return;
too_long:
	s->processing = 0;
	out(s, "500 5.5.2 Error: line too long\r\n");
	smtp_session_close(s);
}

static void smtp_client_on_read(struct ms_conn *conn, const char *data,
				size_t len)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	switch (s->st) {
	case C_RELAY:
		if (ms_relay(s->b, s->c, &s->c_paused, data, len) < 0)
			smtp_session_close(s);
		return;
	case C_STARTTLS:
	case C_CONNECTING:
	case C_CLOSING:
		return;		/* plaintext after STARTTLS: dropped */
	case C_DATA:
	case C_DATA_SINK:
		idle_timer(s);
		if (s->inlen == 0) {
			/* Straight through, no copy. */
			size_t n = data_feed(s, data, len);

			if (s->st == C_CLOSING)
				return;
			data += n;
			len -= n;
			if (len == 0)
				return;
		}
		break;
	case C_CMD:
	case C_AUTH_PLAIN:
	case C_AUTH_USER:
	case C_AUTH_PASS:
		idle_timer(s);
		break;
	default:
		break;
	}
	if (in_append(s, data, len) < 0) {
		out(s, "421 4.3.0 %s Error: too much input\r\n", ms_host_name());
		smtp_session_close(s);
		return;
	}
	client_process(s);
	if (s->st != C_CLOSING && s->inlen >= INBUF_PAUSE)
		/* Waiting for the MTA with a full buffer: stop reading. */
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_INPUT);
}

static void smtp_client_on_error(struct ms_conn *conn, const char *error)
{
	smtp_session_close(ms_conn_ctx(conn));
}

static void smtp_client_on_drain(struct ms_conn *conn)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	ms_pause_clear(s->b, &s->b_paused, MS_PAUSE_WRITE);
	if (s->c_paused & MS_PAUSE_OUTPUT) {
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_OUTPUT);
		client_process(s);
	}
}

static void smtp_client_on_connect(struct ms_conn *conn, int status,
				   const char *error)
{
	struct smtp_session *s = ms_conn_ctx(conn);

	if (status != 0) {
		smtp_session_close(s);
		return;
	}
	ms_conn_peer_addr(conn, s->peer, sizeof(s->peer), &s->peer_port);
	ms_conn_local_addr(conn, s->local, sizeof(s->local), &s->local_port);
	out(s, "220 %s ESMTP mailshift\r\n", ms_host_name());
	client_resume(s);
}

/* ---- the front end, as the gateway reaches it (gw_route.h) ---- */

static void smtp_accept(struct ms_gateway *gw, uv_stream_t *listener,
			const struct ms_gw_listen *cfg, const void *arg)
{
	struct ms_conn_callbacks cb = {
		.on_connect = smtp_client_on_connect,
		.on_read = smtp_client_on_read,
		.on_error = smtp_client_on_error,
		.on_drain = smtp_client_on_drain,
	};
	struct smtp_session *s = calloc(1, sizeof(*s));
	const char *why;

	if (s == NULL) {
		ms_drop_connection(listener);
		return;
	}
	s->gw = gw;
	s->id = ++next_id;
	s->proto = cfg->proto;
	s->tls = cfg->implicit_tls;
	s->since = time(NULL);
	s->st = C_CONNECTING;
	s->side = -1;
	cb.ctx = s;
	uv_timer_init(ms_gw_loop(gw), &s->timer);
	s->timer.data = s;
	if (ms_conn_accept(listener, cfg->implicit_tls ? ms_gw_tls(gw) :
			   NULL, &cb, &s->c) < 0) {
		ms_close_free((uv_handle_t *)&s->timer, s);
		return;
	}
	ms_conn_peer_addr(s->c, s->peer, sizeof(s->peer), &s->peer_port);
	if (ms_gw_admit(gw, s->peer, &why) < 0) {
		/* Said in plaintext only: a TLS client is just closed. */
		if (!cfg->implicit_tls)
			out(s, "421 4.7.0 %s\r\n", why);
		ms_conn_close(&s->c);
		ms_close_free((uv_handle_t *)&s->timer, s);
		return;
	}
	s->admitted = 1;
	/* Our answers: a small queue (a client that does not read them is
	 * not read either). */
	ms_conn_set_water(s->c, CLIENT_OUT_HIGH, CLIENT_OUT_LOW);
	/* Until AUTH is over, a submission client's bytes may hold a
	 * password: wiped. */
	if (s->proto == MS_GW_SUBMISSION)
		ms_conn_set_wipe(s->c, 1);
	/* A client that never finishes its TLS handshake. */
	timer_set(s, smtp_client_on_idle, IDLE_TIMEOUT_MS);
	s->next = sessions;
	if (s->next != NULL)
		s->next->prev = s;
	sessions = s;
}

static void smtp_sessions(struct ms_gateway *gw, json_t *array)
{
	for (struct smtp_session *s = sessions; s != NULL; s = s->next) {
		struct ms_gw_session_row row;
		const char *state;

		if (s->gw != gw)
			continue;
		switch (s->st) {
		case C_RELAY:
			state = "relay";
			break;
		case C_DATA:
		case C_DATA_SINK:
		case C_DATA_END:
			state = "data";
			break;
		case C_WAIT:
			state = s->proto == MS_GW_SUBMISSION ? "login" :
				"transaction";
			break;
		default:
			state = s->proto == MS_GW_SUBMISSION ? "prelogin" :
				s->mail != NULL ? "transaction" : "command";
			break;
		}
		row = (struct ms_gw_session_row){
			.id = s->id,
			.user = s->auth_user,
			.proto = s->proto == MS_GW_SMTP ? "smtp" : "submission",
			.client = s->peer,
			.local = s->local,
			.local_port = s->local_port,
			.server = s->b == NULL ? "-" :
				  s->b_side ? "destination" : "source",
			.state = state,
			.tls = s->tls,
			.since = s->since,
		};
		json_array_append_new(array, ms_gw_session_json(&row));
	}
}

/* Ends the gateway's SMTP sessions, or only the ones user authenticated;
 * the client gets "421 CODE HOST WHY" unless its session is relayed (a
 * reply of ours could land in the middle of the MTA's). Returns how many. */
static int end_sessions(struct ms_gateway *gw, const char *user,
			const char *code, const char *why)
{
	int n = 0;

	for (struct smtp_session *s = sessions, *next; s != NULL; s = next) {
		next = s->next;
		if (s->gw != gw || (user != NULL && (s->auth_user == NULL ||
						     strcmp(s->auth_user, user))))
			continue;
		if (s->st != C_RELAY)
			out(s, "421 %s %s %s\r\n", code, ms_host_name(), why);
		smtp_session_close(s);
		n++;
	}
	return n;
}

static void smtp_close_all(struct ms_gateway *gw)
{
	end_sessions(gw, NULL, "4.3.2", "Service shutting down");
}

/* Submission sessions do not touch the mailbox: a cutover neither waits
 * for them nor ends them; the operator's kick does. */
static int smtp_kick(struct ms_gateway *gw, const char *user)
{
	return end_sessions(gw, user, "4.7.0", "Administrator ended this "
			    "session");
}

const struct ms_gw_frontend ms_gw_smtp_frontend = {
	.name = "smtp",
	.protos = 1 << MS_GW_SMTP | 1 << MS_GW_SUBMISSION,
	.accept = smtp_accept,
	.sessions = smtp_sessions,
	.kick = smtp_kick,
	.close_all = smtp_close_all,
};
