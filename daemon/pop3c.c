/* POP3 client connection: see pop3c.h. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include "pop3c.h"
#include "util.h"

#define LINE_MAX_LEN 8192

enum state { ST_CONNECTING, ST_GREETING, ST_LOGIN, ST_READY, ST_FAILED };

struct pcmd {
	struct pcmd *next;
	int multiline;
	int in_body;
	ms_pop3c_reply_cb *reply;
	ms_pop3c_line_cb *line;
	void *ctx;
};

struct ms_pop3c {
	struct ms_conn *conn;
	enum state state;
	char *user, *admin, *password;
	enum ms_auth_mech mech;
	int starttls;
	int sasl;		/* CAPA listed SASL PLAIN */
	ms_pop3c_ready_cb *ready;
	void *ready_ctx;
	struct pcmd *cmds, *tail;
	char line[LINE_MAX_LEN];
	size_t linelen;
	char error[400];
	struct ms_busy busy;	/* inside a callback: defer free */
	int tls_began;		/* STLS go-ahead taken in this read */
	ms_read_gate_cb *gate;
	void *gate_ctx;
};

const char *ms_pop3c_error(const struct ms_pop3c *c)
{
	return c->error;
}

void ms_pop3c_set_gate(struct ms_pop3c *c, ms_read_gate_cb *gate, void *ctx)
{
	c->gate = gate;
	c->gate_ctx = ctx;
}

static void really_free(void *obj)
{
	struct ms_pop3c *c = obj;

	ms_conn_close(&c->conn);
	while (c->cmds != NULL) {
		struct pcmd *n = c->cmds->next;

		free(c->cmds);
		c->cmds = n;
	}
	ms_secret_free(&c->password);
	free(c->user);
	free(c->admin);
	free(c);
}

void ms_pop3c_free(struct ms_pop3c **cp)
{
	struct ms_pop3c *c = *cp;

	if (c == NULL)
		return;
	*cp = NULL;
	c->ready = NULL;
	for (struct pcmd *p = c->cmds; p != NULL; p = p->next)
		p->reply = NULL, p->line = NULL;
	ms_conn_close(&c->conn);
	c->state = ST_FAILED;
	if (ms_busy_defer(&c->busy))
		return;
	really_free(c);
}

static void fail(struct ms_pop3c *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void fail(struct ms_pop3c *c, const char *fmt, ...)
{
	enum state old = c->state;
	va_list ap;

	if (c->state == ST_FAILED)
		return;
	va_start(ap, fmt);
	vsnprintf(c->error, sizeof(c->error), fmt, ap);
	va_end(ap);
	c->state = ST_FAILED;
	ms_secret_free(&c->password);
	ms_conn_close(&c->conn);
	if (old != ST_READY) {
		if (c->ready != NULL)
			c->ready(c, c->error, c->ready_ctx);
		return;
	}
	while (c->cmds != NULL) {
		struct pcmd *p = c->cmds;

		c->cmds = p->next;
		if (p->reply != NULL)
			p->reply(c, -1, c->error, p->ctx);
		free(p);
	}
}

/* fail() from a connection callback: the owner may free us from the
 * callbacks fail() calls. */
static void fail_guarded(struct ms_pop3c *c, const char *what,
			 const char *error)
{
	ms_busy_enter(&c->busy);
	fail(c, "%s%s", what, error);
	ms_busy_leave(&c->busy, really_free, c);
}

static int send_line(struct ms_pop3c *c, const char *text)
{
	if (c->state == ST_FAILED)
		return -1;
	if (ms_conn_write(c->conn, text, strlen(text)) < 0 ||
	    ms_conn_write(c->conn, "\r\n", 2) < 0) {
		fail(c, "write failed");
		return -1;
	}
	return 0;
}

static int push(struct ms_pop3c *c, int multiline, ms_pop3c_reply_cb *reply,
		ms_pop3c_line_cb *line, void *ctx, const char *text)
{
	struct pcmd *p = calloc(1, sizeof(*p));

	if (p == NULL)
		return -1;
	p->multiline = multiline;
	p->reply = reply;
	p->line = line;
	p->ctx = ctx;
	MS_LIST_APPEND(c->cmds, c->tail, p);
	return send_line(c, text);
}

int ms_pop3c_cmd(struct ms_pop3c *c, int multiline, ms_pop3c_reply_cb *reply,
		 ms_pop3c_line_cb *line, void *ctx, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	return push(c, multiline, reply, line, ctx, buf);
}

/* ---- login ---- */

/* A reply during the login: 1 when +OK; 0 when the connection failed (ok
 * < 0: already said) or the server said -ERR (failed now, the message
 * after what). */
static int login_reply_ok(struct ms_pop3c *c, int ok, const char *text,
			  const char *what)
{
	if (ok > 0)
		return 1;
	if (ok == 0)
		fail(c, "%s-ERR %s", what, text);
	return 0;
}

static void on_login_reply(struct ms_pop3c *c, int ok, const char *text,
			   void *ctx)
{
	if (!login_reply_ok(c, ok, text, "login failed: "))
		return;
	if (ctx != NULL)
		return;	/* USER accepted; PASS follows */
	ms_secret_free(&c->password);
	ms_conn_set_wipe(c->conn, 0);	/* the bulk is not wiped */
	c->state = ST_READY;
	if (c->ready != NULL)
		c->ready(c, NULL, c->ready_ctx);
}

/* Sends "VERB ARG" as a login command (on_login_reply() with ctx answers
 * it), the line wiped after. -1 when out of memory (the connection then
 * failed). */
static int push_login(struct ms_pop3c *c, const char *verb, const char *arg,
		      void *ctx)
{
	size_t len = strlen(verb) + strlen(arg) + 2;
	char *line = malloc(len);

	if (line == NULL) {
		fail(c, "out of memory");
		return -1;
	}
	snprintf(line, len, "%s %s", verb, arg);
	push(c, 0, on_login_reply, NULL, ctx, line);
	ms_secret_buf_free(&line, len);
	return 0;
}

static void start_login(struct ms_pop3c *c)
{
	c->state = ST_LOGIN;
	if (c->admin != NULL || c->mech == MS_AUTH_PLAIN ||
	    (c->mech == MS_AUTH_AUTO && c->sasl)) {
		char *b64 = c->admin != NULL ?
			ms_sasl_plain(c->user, c->admin, c->password) :
			ms_sasl_plain("", c->user, c->password);

		if (b64 == NULL) {
			fail(c, "out of memory");
			return;
		}
		push_login(c, "AUTH PLAIN", b64, NULL);
		ms_secret_free(&b64);
		return;
	}
	/* USER's reply (ctx c) waits for PASS's. */
	if (push_login(c, "USER", c->user, c) == 0)
		push_login(c, "PASS", c->password, NULL);
}

static void on_capa_line(struct ms_pop3c *c, const char *line, size_t len,
			 void *ctx)
{
	if (len >= 4 && strncasecmp(line, "SASL", 4) == 0 &&
	    strcasestr(line, " PLAIN") != NULL)
		c->sasl = 1;
}

static void on_tls(struct ms_conn *conn, int status, const char *error);

static void on_stls_reply(struct ms_pop3c *c, int ok, const char *text,
			  void *ctx)
{
	if (!login_reply_ok(c, ok, text, "STLS: "))
		return;
	if (ms_conn_starttls(c->conn, on_tls) < 0)
		fail(c, "STLS: cannot start TLS");
	else
		c->tls_began = 1;
}

static void on_capa_reply(struct ms_pop3c *c, int ok, const char *text,
			  void *ctx)
{
	if (ok < 0)
		return;
	if (c->starttls && !ms_conn_is_tls(c->conn)) {
		push(c, 0, on_stls_reply, NULL, NULL, "STLS");
		return;
	}
	start_login(c);
}

static void on_tls(struct ms_conn *conn, int status, const char *error)
{
	struct ms_pop3c *c = ms_conn_ctx(conn);

	if (status != 0) {
		/* The owner may free us from its callback. */
		fail_guarded(c, "STLS: ",
			     error != NULL ? error : "handshake failed");
		return;
	}
	c->sasl = 0;
	push(c, 1, on_capa_reply, on_capa_line, NULL, "CAPA");
}

/* ---- input ---- */

static void handle_line(struct ms_pop3c *c, char *line, size_t len)
{
	struct pcmd *p = c->cmds;
	int ok;

	if (c->state == ST_GREETING) {
		if (len < 3 || strncmp(line, "+OK", 3) != 0) {
			fail(c, "bad greeting");
			return;
		}
		c->state = ST_LOGIN;
		push(c, 1, on_capa_reply, on_capa_line, NULL, "CAPA");
		return;
	}
	if (p == NULL) {
		fail(c, "unexpected line from the server");
		return;
	}
	if (p->in_body) {
		if (len == 3 && memcmp(line, ".\r\n", 3) == 0) {
			c->cmds = p->next;
			if (c->cmds == NULL)
				c->tail = NULL;
			if (p->reply != NULL)
				p->reply(c, 1, "", p->ctx);
			free(p);
			return;
		}
		/* Dot-unstuffing (RFC 1939 3). */
		if (line[0] == '.') {
			line++;
			len--;
		}
		if (p->line != NULL)
			p->line(c, line, len, p->ctx);
		return;
	}
	while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
		line[--len] = '\0';
	if (strncmp(line, "+OK", 3) == 0)
		ok = 1;
	else if (strncmp(line, "-ERR", 4) == 0)
		ok = 0;
	else {
		fail(c, "malformed reply \"%.40s\"", line);
		return;
	}
	line += ok ? 3 : 4;
	while (*line == ' ')
		line++;
	if (ok && p->multiline) {
		p->in_body = 1;
		return;
	}
	c->cmds = p->next;
	if (c->cmds == NULL)
		c->tail = NULL;
	if (p->reply != NULL)
		p->reply(c, ok, line, p->ctx);
	free(p);
}

static void on_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct ms_pop3c *c = ms_conn_ctx(conn);

	ms_busy_enter(&c->busy);
	if (c->gate != NULL && !c->gate(c->gate_ctx))
		len = 0;	/* its owner stopped: nothing more is taken */
	for (size_t i = 0; i < len && c->state != ST_FAILED &&
	     !c->busy.free_pending; i++) {
		if (c->linelen + 2 >= sizeof(c->line)) {
			/* Long body lines are passed on in pieces; status
			 * lines may not be this long. */
			if (c->cmds == NULL || !c->cmds->in_body) {
				fail(c, "line too long");
				break;
			}
			if (c->cmds->line != NULL)
				c->cmds->line(c, c->line, c->linelen,
					      c->cmds->ctx);
			c->linelen = 0;
		}
		c->line[c->linelen++] = data[i];
		if (data[i] == '\n') {
			c->line[c->linelen] = '\0';
			size_t l = c->linelen;

			c->linelen = 0;
			handle_line(c, c->line, l);
			if (c->tls_began) {
				/* Not protected by TLS: an attacker on the
				 * path may have put it there. */
				c->tls_began = 0;
				if (i + 1 < len && c->state != ST_FAILED)
					fail(c, "STLS: the server sent data "
					     "after its go-ahead");
				break;
			}
		}
	}
	ms_busy_leave(&c->busy, really_free, c);
}

static void on_error(struct ms_conn *conn, const char *error)
{
	fail_guarded(ms_conn_ctx(conn), "", error);
}

static void on_connect(struct ms_conn *conn, int status, const char *error)
{
	struct ms_pop3c *c = ms_conn_ctx(conn);

	if (status != 0) {
		fail_guarded(c, "", error != NULL ? error : "connect failed");
		return;
	}
	c->state = ST_GREETING;
}

struct ms_pop3c *ms_pop3c_new(uv_loop_t *loop,
			      const struct ms_imapc_settings *set,
			      ms_pop3c_ready_cb *ready, void *ctx)
{
	struct ms_conn_callbacks cb = {
		.on_connect = on_connect,
		.on_read = on_read,
		.on_error = on_error,
	};
	struct ms_pop3c *c = calloc(1, sizeof(*c));

	if (c == NULL)
		return NULL;
	c->user = strdup(set->user);
	c->admin = set->admin != NULL ? strdup(set->admin) : NULL;
	c->password = strdup(set->password != NULL ? set->password : "");
	c->mech = set->mech;
	c->starttls = set->tls.mode == MS_TLS_STARTTLS;
	c->ready = ready;
	c->ready_ctx = ctx;
	cb.ctx = c;
	if (c->user == NULL || c->password == NULL ||
	    ms_conn_connect(loop, set->host, set->port, &set->tls, &cb,
			    &c->conn) < 0) {
		really_free(c);
		return NULL;
	}
	ms_conn_set_wipe(c->conn, 1);	/* until the login is done */
	return c;
}
