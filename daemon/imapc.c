/* IMAP client connection: see imapc.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "imapc.h"
#include "log.h"
#include "testhook.h"
#include "util.h"

enum imapc_state {
	ST_CONNECTING,
	ST_GREETING,
	ST_CAPA,
	ST_STARTTLS,
	ST_LOGIN,
	ST_POSTCAPA,
	ST_READY,
	ST_FAILED,
};

struct cmd {
	struct cmd *next;
	char tag[16];
	char name[24];		/* "UID FETCH", for error messages */
	ms_imapc_cmd_cb *cb;
	void *ctx;
	/* with a pacer (pacer.h) */
	uint64_t sent_ms;	/* 0: not sent yet (held by the pace) */
	char *text;		/* the command without its tag, to send
				   again after a busy refusal */
	unsigned int tries;	/* sent again so far */
};

/* A command the pace holds back: sent when the pacer gives a token (and
 * not before not_before: a refused command's back-off). */
struct paced {
	struct paced *next;
	struct cmd *cmd;
	uint64_t not_before;
};

/* Output held back until the server's continuation for a synchronising
 * literal: each node is released by one "+" response. */
struct held {
	struct held *next;
	size_t len;
	char data[];
};

struct ms_imapc {
	uv_loop_t *loop;
	struct ms_conn *conn;
	struct ms_imap_parser *parser;
	struct ms_imap_parser_callbacks lit;
	enum imapc_state state;

	char *host;
	uint16_t port;
	struct ms_tls_opts tls;
	char *ca_file;
	char *server_name;
	char *user;
	char *admin;
	char *password;
	enum ms_auth_mech mech;
	unsigned int timeout_secs;

	ms_imapc_ready_cb *ready;
	void *ready_ctx;
	ms_imapc_untagged_cb *untagged;
	void *untagged_ctx;
	void (*drain)(struct ms_imapc *c, void *ctx);
	void *drain_ctx;
	void (*lost)(struct ms_imapc *c, void *ctx);
	void *lost_ctx;
	ms_read_gate_cb *gate;
	void *gate_ctx;

	struct cmd *cmds, *cmds_tail;
	unsigned int tag_seq;
	char caps[4096];	/* " CAP1 CAP2 ... " upper-case */
	int literal_plus;	/* LITERAL+ is in caps */
	char sep;
	char error[512];

	uv_timer_t *timer;
	struct ms_busy busy;	/* inside a callback: defer free */
	int tls_began;		/* STARTTLS go-ahead taken in this read */

	/* streaming APPEND */
	int appending;
	struct held *held, *held_tail, *held_cur;
	size_t held_bytes;
	int waiting_cont;	/* synchronising literals awaiting "+" */

	/* the pace (pacer.h) */
	struct ms_pacer *pacer;
	struct paced *paced, *paced_tail;
	uv_timer_t *pace_timer;
	uint64_t last_reply_ms;	/* a reply's latency counts from here at
				   the earliest: pipelined commands wait
				   for the ones before them */
	int busy_refused;	/* the login was refused as busy */
};

static void fail(struct ms_imapc *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void imapc_send(struct ms_imapc *c, const void *data, size_t len);

static char *xstrdup_or_null(const char *s)
{
	return s == NULL ? NULL : strdup(s);
}

const char *ms_imapc_error(const struct ms_imapc *c)
{
	return c->error[0] != '\0' ? c->error : "unknown error";
}

int ms_imapc_busy_refused(const struct ms_imapc *c)
{
	return c->busy_refused;
}

int ms_imapc_failed(const struct ms_imapc *c)
{
	return c->state == ST_FAILED;
}

char ms_imapc_separator(const struct ms_imapc *c)
{
	return c->sep;
}

void ms_imapc_set_untagged(struct ms_imapc *c, ms_imapc_untagged_cb *cb,
			   void *ctx)
{
	c->untagged = cb;
	c->untagged_ctx = ctx;
}

void ms_imapc_set_gate(struct ms_imapc *c, ms_read_gate_cb *gate, void *ctx)
{
	c->gate = gate;
	c->gate_ctx = ctx;
}

void ms_imapc_set_literal_hooks(struct ms_imapc *c,
				const struct ms_imap_parser_callbacks *cb)
{
	if (cb != NULL)
		c->lit = *cb;
	else
		memset(&c->lit, 0, sizeof(c->lit));
}

void ms_imapc_set_drain(struct ms_imapc *c,
			void (*cb)(struct ms_imapc *c, void *ctx), void *ctx)
{
	c->drain = cb;
	c->drain_ctx = ctx;
}

void ms_imapc_set_lost(struct ms_imapc *c,
		       void (*cb)(struct ms_imapc *c, void *ctx), void *ctx)
{
	c->lost = cb;
	c->lost_ctx = ctx;
}

int ms_imapc_has_cap(const struct ms_imapc *c, const char *cap)
{
	char needle[128];

	if (snprintf(needle, sizeof(needle), " %s ", cap) >= (int)sizeof(needle))
		return 0;
	return strcasestr(c->caps, needle) != NULL;
}

static void set_caps(struct ms_imapc *c, const struct ms_imap_arg *args,
		     unsigned int argc)
{
	size_t pos = 1;

	c->caps[0] = ' ';
	c->caps[1] = '\0';
	for (unsigned int i = 0; i < argc; i++) {
		const char *s = ms_imap_arg_str(&args[i]);
		size_t len;

		if (s == NULL)
			continue;
		len = strlen(s);
		if (pos + len + 2 >= sizeof(c->caps))
			break;
		memcpy(c->caps + pos, s, len);
		pos += len;
		c->caps[pos++] = ' ';
		c->caps[pos] = '\0';
	}
	c->literal_plus = ms_imapc_has_cap(c, "LITERAL+");
}

const char *ms_imapc_resp_summary(const struct ms_imap_response *resp,
				  char *buf, size_t bufsz)
{
	static const char *const names[] = {
		[MS_STATUS_NONE] = "", [MS_STATUS_OK] = "OK",
		[MS_STATUS_NO] = "NO", [MS_STATUS_BAD] = "BAD",
		[MS_STATUS_BYE] = "BYE", [MS_STATUS_PREAUTH] = "PREAUTH",
	};

	if (resp == NULL) {
		snprintf(buf, bufsz, "no reply");
		return buf;
	}
	if (resp->code != NULL)
		snprintf(buf, bufsz, "%s [%s] %s", names[resp->status],
			 resp->code, resp->text != NULL ? resp->text : "");
	else
		snprintf(buf, bufsz, "%s %s", names[resp->status],
			 resp->text != NULL ? resp->text : "");
	return buf;
}

int ms_imap_quote(char *buf, size_t bufsz, const char *s)
{
	size_t pos = 0;

	if (bufsz < 3)
		return -1;
	buf[pos++] = '"';
	for (; *s != '\0'; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '\r' || ch == '\n' || ch >= 0x80)
			return -1;
		if (pos + 4 >= bufsz)
			return -1;
		if (ch == '"' || ch == '\\')
			buf[pos++] = '\\';
		buf[pos++] = (char)ch;
	}
	buf[pos++] = '"';
	buf[pos] = '\0';
	return 0;
}

/* ---- failure and teardown ---- */

static void cmd_free(struct cmd *cmd)
{
	free(cmd->text);
	free(cmd);
}

static void paced_drop(struct ms_imapc *c)
{
	while (c->paced != NULL) {
		struct paced *pc = c->paced;

		c->paced = pc->next;
		free(pc);
	}
	c->paced_tail = NULL;
	if (c->pace_timer != NULL)
		uv_timer_stop(c->pace_timer);
}

static void fail_commands(struct ms_imapc *c)
{
	while (c->cmds != NULL) {
		struct cmd *cmd = c->cmds;

		c->cmds = cmd->next;
		if (c->cmds == NULL)
			c->cmds_tail = NULL;
		if (cmd->cb != NULL)
			cmd->cb(c, NULL, cmd->ctx);
		cmd_free(cmd);
	}
}

static void fail(struct ms_imapc *c, const char *fmt, ...)
{
	enum imapc_state old = c->state;
	char msg[400];
	va_list ap;

	if (c->state == ST_FAILED)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (c->cmds != NULL && old == ST_READY)
		snprintf(c->error, sizeof(c->error), "%s: %s", c->cmds->name, msg);
	else
		snprintf(c->error, sizeof(c->error), "%s", msg);
	c->state = ST_FAILED;
	ms_secret_free(&c->password);
	if (c->timer != NULL)
		uv_timer_stop(c->timer);
	paced_drop(c);
	ms_conn_close(&c->conn);
	ms_busy_enter(&c->busy);
	if (old != ST_READY && c->ready != NULL) {
		c->ready(c, c->error, c->ready_ctx);
	} else {
		fail_commands(c);
		if (c->lost != NULL && !c->busy.free_pending)
			c->lost(c, c->lost_ctx);
	}
	c->busy.depth--;	/* the caller's guard frees */
}

static void really_free(void *obj)
{
	struct ms_imapc *c = obj;

	struct held *h;

	ms_conn_close(&c->conn);
	ms_imap_parser_free(&c->parser);
	while ((h = c->held) != NULL) {
		c->held = h->next;
		free(h);
	}
	while (c->cmds != NULL) {
		struct cmd *cmd = c->cmds;

		c->cmds = cmd->next;
		cmd_free(cmd);
	}
	paced_drop(c);
	if (c->pace_timer != NULL)
		ms_close_free((uv_handle_t *)c->pace_timer, c->pace_timer);
	if (c->timer != NULL)
		ms_close_free((uv_handle_t *)c->timer, c->timer);
	ms_secret_free(&c->password);
	free(c->host);
	free(c->ca_file);
	free(c->server_name);
	free(c->user);
	free(c->admin);
	free(c);
}

/* fail() from a connection callback: the owner may free us from the
 * callbacks fail() calls. */
static void fail_guarded(struct ms_imapc *c, const char *what,
			 const char *error)
{
	ms_busy_enter(&c->busy);
	fail(c, "%s%s", what, error);
	ms_busy_leave(&c->busy, really_free, c);
}

void ms_imapc_free(struct ms_imapc **cp)
{
	struct ms_imapc *c = *cp;

	if (c == NULL)
		return;
	*cp = NULL;
	c->ready = NULL;
	c->untagged = NULL;
	c->drain = NULL;
	c->lost = NULL;
	/* Pending commands' callbacks are not called once the owner frees. */
	for (struct cmd *cmd = c->cmds; cmd != NULL; cmd = cmd->next)
		cmd->cb = NULL;
	if (ms_busy_defer(&c->busy)) {
		ms_conn_close(&c->conn);
		c->state = ST_FAILED;
		return;
	}
	really_free(c);
}

/* ---- output ---- */

static void imapc_send(struct ms_imapc *c, const void *data, size_t len)
{
	if (c->state == ST_FAILED || len == 0)
		return;
	if (c->waiting_cont > 0) {
		/* Appended to the last held segment. */
		struct held *t = c->held_tail;
		struct held *n = realloc(t, sizeof(*t) + t->len + len);

		if (n == NULL) {
			fail(c, "out of memory");
			return;
		}
		if (n != t) {
			struct held **pp = &c->held;

			while (*pp != t)
				pp = &(*pp)->next;
			*pp = n;
			c->held_tail = n;
		}
		memcpy(n->data + n->len, data, len);
		n->len += len;
		c->held_bytes += len;
		return;
	}
	if (ms_conn_write(c->conn, data, len) < 0)
		fail(c, "write failed");
}

/* Starts a new held segment: what follows is sent after the next "+". */
static int hold_next(struct ms_imapc *c)
{
	struct held *h = calloc(1, sizeof(*h));

	if (h == NULL)
		return -1;
	MS_LIST_APPEND(c->held, c->held_tail, h);
	c->waiting_cont++;
	return 0;
}

static void release_held(struct ms_imapc *c)
{
	struct held *h = c->held;

	if (h == NULL)
		return;
	c->held = h->next;
	if (c->held == NULL)
		c->held_tail = NULL;
	c->waiting_cont--;
	c->held_bytes -= h->len;
	if (h->len > 0 && ms_conn_write(c->conn, h->data, h->len) < 0)
		fail(c, "write failed");
	free(h);
}

size_t ms_imapc_write_pending(const struct ms_imapc *c)
{
	return c->held_bytes + (c->conn != NULL ? ms_conn_write_pending(c->conn) : 0);
}

void ms_imapc_read_pause(struct ms_imapc *c, int paused)
{
	if (c->conn != NULL)
		ms_conn_read_pause(c->conn, paused);
}

static struct cmd *cmd_push(struct ms_imapc *c, ms_imapc_cmd_cb *cb,
			    void *ctx, const char *text)
{
	struct cmd *cmd = calloc(1, sizeof(*cmd));
	size_t n = 0;

	if (cmd == NULL)
		return NULL;
	snprintf(cmd->tag, sizeof(cmd->tag), "m%u", ++c->tag_seq);
	/* The verb, or "UID FETCH" style pairs, for error messages. */
	while (text[n] != '\0' && text[n] != ' ')
		n++;
	if (strncasecmp(text, "UID ", 4) == 0) {
		n = 4;
		while (text[n] != '\0' && text[n] != ' ')
			n++;
	}
	if (n >= sizeof(cmd->name))
		n = sizeof(cmd->name) - 1;
	memcpy(cmd->name, text, n);
	cmd->cb = cb;
	cmd->ctx = ctx;
	MS_LIST_APPEND(c->cmds, c->cmds_tail, cmd);
	if (c->timer != NULL)
		uv_timer_again(c->timer);
	return cmd;
}

/* ---- the pace (pacer.h) ---- */

static void write_cmd(struct ms_imapc *c, struct cmd *cmd, const char *text)
{
	char prefix[20];

	snprintf(prefix, sizeof(prefix), "%s ", cmd->tag);
	imapc_send(c, prefix, strlen(prefix));
	imapc_send(c, text, strlen(text));
	imapc_send(c, "\r\n", 2);
	cmd->sent_ms = uv_now(c->loop);
	if (c->timer != NULL)
		uv_timer_again(c->timer);
}

/* Once per change of the shared pace, whichever connection sees it. */
static void pace_log(struct ms_imapc *c)
{
	ms_pacer_log(c->pacer, c->host, c->port);
}

static void pace_arm(struct ms_imapc *c, uint64_t ms);

/* Sends what the pace held back, oldest first, as tokens allow. */
static void pace_flush(struct ms_imapc *c)
{
	while (c->paced != NULL && c->state != ST_FAILED) {
		struct paced *pc = c->paced;
		uint64_t now = uv_now(c->loop), wait = 0;

		if (pc->not_before > now)
			wait = pc->not_before - now;
		else
			wait = ms_pacer_take(c->pacer, now, 0);
		pace_log(c);
		if (wait > 0) {
			pace_arm(c, wait);
			return;
		}
		c->paced = pc->next;
		if (c->paced == NULL)
			c->paced_tail = NULL;
		write_cmd(c, pc->cmd, pc->cmd->text);
		free(pc);
	}
}

static void on_pace_timer(uv_timer_t *t)
{
	struct ms_imapc *c = t->data;

	ms_busy_enter(&c->busy);
	pace_flush(c);
	ms_busy_leave(&c->busy, really_free, c);
}

static void pace_arm(struct ms_imapc *c, uint64_t ms)
{
	if (c->pace_timer == NULL) {
		c->pace_timer = malloc(sizeof(*c->pace_timer));
		if (c->pace_timer == NULL) {
			fail(c, "out of memory");
			return;
		}
		uv_timer_init(c->loop, c->pace_timer);
		c->pace_timer->data = c;
	}
	uv_timer_start(c->pace_timer, on_pace_timer, ms, 0);
}

/* Holds cmd back (at the head when first: a refused command sent again
 * before the ones queued behind it). */
static int pace_hold(struct ms_imapc *c, struct cmd *cmd, uint64_t not_before,
		     int first)
{
	struct paced *pc = calloc(1, sizeof(*pc));

	if (pc == NULL)
		return -1;
	pc->cmd = cmd;
	pc->not_before = not_before;
	if (first) {
		pc->next = c->paced;
		c->paced = pc;
		if (c->paced_tail == NULL)
			c->paced_tail = pc;
	} else {
		MS_LIST_APPEND(c->paced, c->paced_tail, pc);
	}
	pace_arm(c, 0);
	return 0;
}

/* A command that cannot wait (an APPEND, a login: bytes follow it at
 * once): what is held goes first, then it, the bucket going into debt. */
static void pace_must(struct ms_imapc *c)
{
	uint64_t now = uv_now(c->loop);

	if (c->pacer == NULL)
		return;
	while (c->paced != NULL && c->state != ST_FAILED) {
		struct paced *pc = c->paced;

		c->paced = pc->next;
		ms_pacer_take(c->pacer, now, 1);
		write_cmd(c, pc->cmd, pc->cmd->text);
		free(pc);
	}
	c->paced_tail = NULL;
	ms_pacer_take(c->pacer, now, 1);
	pace_log(c);
}

/* Commands whose reply time says something about the server's load, not
 * about the amount of mail asked for. */
static int latency_counts(const struct cmd *cmd)
{
	static const char *const bulky[] = {
		"FETCH", "APPEND", "SEARCH", "EXPUNGE", "COPY", "MOVE",
		"STORE", "IDLE", "AUTHENTICATE", "LOGIN",
	};

	for (size_t i = 0; i < sizeof(bulky) / sizeof(bulky[0]); i++)
		if (strstr(cmd->name, bulky[i]) != NULL)
			return 0;
	return 1;
}

/* A tagged reply, seen by the pace: its latency, a busy refusal. 1 when
 * the command was held back to be sent again (its callback waits). */
static int pace_reply(struct ms_imapc *c, struct cmd *cmd,
		      const struct ms_imap_response *r)
{
	uint64_t now = uv_now(c->loop), from, delay;
	char why[200], buf[160];

	if (c->pacer == NULL || cmd->sent_ms == 0)
		return 0;
	from = cmd->sent_ms > c->last_reply_ms ? cmd->sent_ms : c->last_reply_ms;
	c->last_reply_ms = now;
	if (r->status == MS_STATUS_OK) {
		if (c->state == ST_READY && latency_counts(cmd))
			ms_pacer_latency(c->pacer, now, now - from);
		pace_log(c);
		return 0;
	}
	if (r->status != MS_STATUS_NO ||
	    !ms_pacer_is_busy_reply(r->code, r->text))
		return 0;
	snprintf(why, sizeof(why), "%s: %s", cmd->name,
		 ms_imapc_resp_summary(r, buf, sizeof(buf)));
	ms_pacer_busy(c->pacer, now, why);
	pace_log(c);
	/* Sent again only when nothing else of ours is in flight: a command
	 * sent after it may depend on it (a FETCH on a SELECT). */
	delay = ms_pacer_retry_delay(cmd->tries + 1);
	if (cmd->text == NULL || delay == 0)
		return 0;
	for (struct cmd *o = c->cmds; o != NULL; o = o->next)
		if (o->sent_ms != 0)
			return 0;
	cmd->tries++;
	cmd->sent_ms = 0;
	snprintf(cmd->tag, sizeof(cmd->tag), "m%u", ++c->tag_seq);
	cmd->next = c->cmds;
	c->cmds = cmd;
	if (c->cmds_tail == NULL)
		c->cmds_tail = cmd;
	if (pace_hold(c, cmd, now + delay, 1) < 0) {
		fail(c, "out of memory");
		return 1;
	}
	ms_info("%s:%u: %s sent again in %llu ms (retry %u of %u)", c->host,
		c->port, cmd->name, (unsigned long long)delay, cmd->tries,
		MS_PACER_RETRIES);
	return 1;
}

static int send_cmd_text(struct ms_imapc *c, ms_imapc_cmd_cb *cb, void *ctx,
			 const char *text)
{
	struct cmd *cmd;

	if (c->state == ST_FAILED)
		return -1;
	cmd = cmd_push(c, cb, ctx, text);
	if (cmd == NULL) {
		fail(c, "out of memory");
		return -1;
	}
	if (c->pacer == NULL) {
		write_cmd(c, cmd, text);
		return 0;
	}
	/* Kept: held back by the pace, or sent again after a refusal. */
	cmd->text = strdup(text);
	if (cmd->text == NULL) {
		fail(c, "out of memory");
		return -1;
	}
	if (c->paced != NULL ||
	    ms_pacer_take(c->pacer, uv_now(c->loop), 0) != 0) {
		if (pace_hold(c, cmd, 0, 0) < 0) {
			fail(c, "out of memory");
			return -1;
		}
		return 0;
	}
	pace_log(c);
	write_cmd(c, cmd, text);
	return 0;
}

int ms_imapc_cmd(struct ms_imapc *c, ms_imapc_cmd_cb *cb, void *ctx,
		 const char *fmt, ...)
{
	char stackbuf[2048], *text;
	va_list ap;
	int len, ret;

	va_start(ap, fmt);
	len = ms_vformat(stackbuf, sizeof(stackbuf), &text, fmt, ap);
	va_end(ap);
	if (len < 0)
		return -1;
	ret = send_cmd_text(c, cb, ctx, text);
	if (text != stackbuf)
		free(text);
	return ret;
}

int ms_imapc_append_begin(struct ms_imapc *c, ms_imapc_cmd_cb *cb, void *ctx,
			  const char *mailbox)
{
	char quoted[2100];
	struct cmd *cmd;
	char line[2200];

	if (c->state == ST_FAILED || c->appending)
		return -1;
	if (ms_imap_quote(quoted, sizeof(quoted), mailbox) < 0)
		return -1;
	pace_must(c);
	cmd = cmd_push(c, cb, ctx, "APPEND");
	if (cmd == NULL)
		return -1;
	snprintf(line, sizeof(line), "%s APPEND %s", cmd->tag, quoted);
	imapc_send(c, line, strlen(line));
	cmd->sent_ms = uv_now(c->loop);
	c->appending = 1;
	return c->state == ST_FAILED ? -1 : 0;
}

int ms_imapc_append_msg(struct ms_imapc *c, const char *flags,
			const char *date, uint64_t size)
{
	char line[1400];
	int plus = c->literal_plus;

	if (!c->appending || c->state == ST_FAILED)
		return -1;
	snprintf(line, sizeof(line), " (%s)%s%s%s {%llu%s}\r\n", flags,
		 date != NULL ? " \"" : "", date != NULL ? date : "",
		 date != NULL ? "\"" : "", (unsigned long long)size,
		 plus ? "+" : "");
	imapc_send(c, line, strlen(line));
	if (!plus && hold_next(c) < 0) {
		fail(c, "out of memory");
		return -1;
	}
	return c->state == ST_FAILED ? -1 : 0;
}

int ms_imapc_append_data(struct ms_imapc *c, const void *data, size_t len)
{
	if (!c->appending || c->state == ST_FAILED)
		return -1;
	imapc_send(c, data, len);
	return c->state == ST_FAILED ? -1 : 0;
}

int ms_imapc_append_end(struct ms_imapc *c)
{
	if (!c->appending || c->state == ST_FAILED)
		return -1;
	imapc_send(c, "\r\n", 2);
	c->appending = 0;
	return c->state == ST_FAILED ? -1 : 0;
}

/* ---- login sequence ---- */

static void on_postcapa(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx);

static void become_ready(struct ms_imapc *c)
{
	c->state = ST_READY;
	ms_secret_free(&c->password);
	ms_busy_enter(&c->busy);
	if (c->ready != NULL)
		c->ready(c, NULL, c->ready_ctx);
	c->busy.depth--;	/* the caller's guard frees */
}

static void after_login(struct ms_imapc *c, const struct ms_imap_response *r)
{
	if (r->code != NULL && strcasecmp(r->code, "CAPABILITY") == 0) {
		set_caps(c, r->code_args, r->code_argc);
		c->state = ST_POSTCAPA;
		/* Learn the hierarchy separator before handing over. */
		ms_imapc_cmd(c, on_postcapa, NULL, "LIST \"\" \"\"");
		return;
	}
	c->state = ST_POSTCAPA;
	ms_imapc_cmd(c, on_postcapa, NULL, "CAPABILITY");
	ms_imapc_cmd(c, on_postcapa, NULL, "LIST \"\" \"\"");
}

/* A reply during the login: 1 when OK; 0 when the connection failed (r
 * NULL: already said) or the server refused (failed now, the message after
 * what). */
static int login_reply_ok(struct ms_imapc *c, const struct ms_imap_response *r,
			  const char *what)
{
	char buf[300];

	if (r == NULL)
		return 0;
	if (r->status == MS_STATUS_OK)
		return 1;
	c->busy_refused = ms_pacer_is_busy_reply(r->code, r->text);
	if (c->busy_refused && c->pacer != NULL) {
		char why[200];

		snprintf(why, sizeof(why), "login refused: %s",
			 ms_imapc_resp_summary(r, buf, sizeof(buf)));
		ms_pacer_busy(c->pacer, uv_now(c->loop), why);
		pace_log(c);
	}
	fail(c, "%s%s", what, ms_imapc_resp_summary(r, buf, sizeof(buf)));
	return 0;
}

static void on_postcapa(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	if (!login_reply_ok(c, r, ""))
		return;
	/* The last of the post-login commands makes us ready (the command
	 * being answered is already off the queue). */
	if (c->cmds == NULL)
		become_ready(c);
}

static void on_login(struct ms_imapc *c, const struct ms_imap_response *r,
		     void *ctx)
{
	if (r == NULL)
		return;
	ms_secret_free(&c->password);
	/* The login went out: the bulk of the session is not wiped. */
	ms_conn_set_wipe(c->conn, 0);
	if (!login_reply_ok(c, r, "login failed: "))
		return;
	after_login(c, r);
}

static int needs_literal(const char *s)
{
	for (; *s != '\0'; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '\r' || ch == '\n' || ch >= 0x80)
			return 1;
	}
	return 0;
}

/* A string argument as a quoted string, or as a literal for 8-bit data. */
static void send_astring(struct ms_imapc *c, const char *s)
{
	char buf[1100];

	if (!needs_literal(s) && ms_imap_quote(buf, sizeof(buf), s) == 0) {
		imapc_send(c, buf, strlen(buf));
		OPENSSL_cleanse(buf, sizeof(buf));
		return;
	}
	if (ms_imapc_has_cap(c, "LITERAL+")) {
		snprintf(buf, sizeof(buf), "{%zu+}\r\n", strlen(s));
		imapc_send(c, buf, strlen(buf));
	} else {
		snprintf(buf, sizeof(buf), "{%zu}\r\n", strlen(s));
		imapc_send(c, buf, strlen(buf));
		if (hold_next(c) < 0) {
			fail(c, "out of memory");
			return;
		}
	}
	imapc_send(c, s, strlen(s));
}

static void start_login(struct ms_imapc *c)
{
	int plain;
	struct cmd *cmd;
	char line[64];

	c->state = ST_LOGIN;
	if (ms_imapc_has_cap(c, "LOGINDISABLED") && !ms_conn_is_tls(c->conn) &&
	    c->admin == NULL && c->mech == MS_AUTH_LOGIN) {
		fail(c, "login failed: the server disables LOGIN without TLS");
		return;
	}
	pace_must(c);
	plain = c->admin != NULL || c->mech == MS_AUTH_PLAIN ||
		(c->mech == MS_AUTH_AUTO && ms_imapc_has_cap(c, "AUTH=PLAIN"));
	if (plain) {
		/* authzid NUL authcid NUL password, base64 (RFC 4616). */
		char *b64 = c->admin != NULL ?
			ms_sasl_plain(c->user, c->admin, c->password) :
			ms_sasl_plain("", c->user, c->password);

		if (b64 == NULL) {
			fail(c, "out of memory");
			return;
		}
		cmd = cmd_push(c, on_login, NULL, "AUTHENTICATE");
		if (cmd == NULL) {
			ms_secret_free(&b64);
			fail(c, "out of memory");
			return;
		}
		snprintf(line, sizeof(line), "%s AUTHENTICATE PLAIN", cmd->tag);
		imapc_send(c, line, strlen(line));
		if (ms_imapc_has_cap(c, "SASL-IR")) {
			imapc_send(c, " ", 1);
		} else {
			imapc_send(c, "\r\n", 2);
			hold_next(c);
		}
		imapc_send(c, b64, strlen(b64));
		imapc_send(c, "\r\n", 2);
		ms_secret_free(&b64);
		return;
	}
	cmd = cmd_push(c, on_login, NULL, "LOGIN");
	if (cmd == NULL) {
		fail(c, "out of memory");
		return;
	}
	snprintf(line, sizeof(line), "%s LOGIN ", cmd->tag);
	imapc_send(c, line, strlen(line));
	send_astring(c, c->user);
	imapc_send(c, " ", 1);
	send_astring(c, c->password);
	imapc_send(c, "\r\n", 2);
}

static void on_capa(struct ms_imapc *c, const struct ms_imap_response *r,
		    void *ctx);

static void on_tls_done(struct ms_conn *conn, int status, const char *error)
{
	struct ms_imapc *c = ms_conn_ctx(conn);

	if (status != 0) {
		/* The owner may free us from its callback. */
		fail_guarded(c, "STARTTLS: ",
			     error != NULL ? error : "handshake failed");
		return;
	}
	/* Capabilities learnt before TLS must be forgotten (RFC 3501 6.2.1). */
	c->caps[0] = '\0';
	c->literal_plus = 0;
	c->state = ST_CAPA;
	ms_imapc_cmd(c, on_capa, NULL, "CAPABILITY");
}

static void on_starttls(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	if (!login_reply_ok(c, r, "STARTTLS: "))
		return;
	if (ms_conn_starttls(c->conn, on_tls_done) < 0)
		fail(c, "STARTTLS: cannot start TLS");
	else
		c->tls_began = 1;
}

static void after_capa(struct ms_imapc *c)
{
	if (c->tls.mode == MS_TLS_STARTTLS && !ms_conn_is_tls(c->conn)) {
		if (!ms_imapc_has_cap(c, "STARTTLS")) {
			fail(c, "STARTTLS: the server does not offer STARTTLS");
			return;
		}
		c->state = ST_STARTTLS;
		ms_imapc_cmd(c, on_starttls, NULL, "STARTTLS");
		return;
	}
	start_login(c);
}

static void on_capa(struct ms_imapc *c, const struct ms_imap_response *r,
		    void *ctx)
{
	if (!login_reply_ok(c, r, "CAPABILITY: "))
		return;
	after_capa(c);
}

/* ---- input ---- */

static void handle_untagged(struct ms_imapc *c, const struct ms_imap_response *r)
{
	if (r->status == MS_STATUS_BYE) {
		/* Kept for the error message of the coming disconnect. */
		snprintf(c->error, sizeof(c->error), "server said BYE: %s",
			 r->text != NULL ? r->text : "");
		return;
	}
	if (r->code != NULL && strcasecmp(r->code, "CAPABILITY") == 0)
		set_caps(c, r->code_args, r->code_argc);
	if (r->status == MS_STATUS_NONE && r->argc >= 1 &&
	    ms_imap_arg_is(&r->args[0], "CAPABILITY")) {
		set_caps(c, r->args + 1, r->argc - 1);
		return;
	}
	if (c->state == ST_GREETING) {
		if (r->status == MS_STATUS_PREAUTH) {
			fail(c, "server greeted with PREAUTH; refusing an "
				"unauthenticated session");
			return;
		}
		if (r->status != MS_STATUS_OK) {
			fail(c, "bad greeting");
			return;
		}
		if (c->caps[0] == '\0') {
			c->state = ST_CAPA;
			ms_imapc_cmd(c, on_capa, NULL, "CAPABILITY");
		} else {
			after_capa(c);
		}
		return;
	}
	if (c->state == ST_POSTCAPA && r->argc >= 4 &&
	    ms_imap_arg_is(&r->args[0], "LIST")) {
		const char *s = ms_imap_arg_str(&r->args[2]);

		c->sep = s != NULL ? s[0] : '\0';
		return;
	}
	if (c->untagged != NULL)
		c->untagged(c, r, c->untagged_ctx);
}

static void handle_response(struct ms_imapc *c, const struct ms_imap_response *r)
{
	struct cmd *cmd;

	switch (r->kind) {
	case MS_RESP_UNTAGGED:
		handle_untagged(c, r);
		return;
	case MS_RESP_CONTINUATION:
		if (c->waiting_cont > 0) {
			release_held(c);
			return;
		}
		fail(c, "unexpected continuation request");
		return;
	case MS_RESP_TAGGED:
		break;
	}
	/* Servers may run pipelined commands concurrently and answer them
	 * out of order (Dovecot does, for FETCHes): match by tag. */
	struct cmd **pp = &c->cmds, *prev = NULL;

	while (*pp != NULL && strcmp((*pp)->tag, r->tag) != 0) {
		prev = *pp;
		pp = &(*pp)->next;
	}
	cmd = *pp;
	if (cmd == NULL) {
		fail(c, "reply with unknown tag \"%.20s\"", r->tag);
		return;
	}
	*pp = cmd->next;
	if (c->cmds_tail == cmd)
		c->cmds_tail = prev;
	if (c->cmds == NULL && c->timer != NULL)
		uv_timer_stop(c->timer);
	/* A tagged reply ends any synchronising literal wait of the command
	 * (the server refused it). */
	if (r->status != MS_STATUS_OK) {
		while (c->waiting_cont > 0 && c->held != NULL) {
			struct held *h = c->held;

			c->held = h->next;
			c->held_bytes -= h->len;
			c->waiting_cont--;
			free(h);
		}
		c->held_tail = NULL;
		c->waiting_cont = 0;
	}
	if (pace_reply(c, cmd, r))
		return;
	if (cmd->cb != NULL)
		cmd->cb(c, r, cmd->ctx);
	cmd_free(cmd);
}

static void on_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct ms_imapc *c = ms_conn_ctx(conn);

	if (c->timer != NULL && c->cmds != NULL)
		uv_timer_again(c->timer);
	ms_busy_enter(&c->busy);
	if (c->gate != NULL && !c->gate(c->gate_ctx))
		len = 0;	/* its owner stopped: nothing more is taken */
	while (len > 0 && c->state != ST_FAILED && !c->busy.free_pending) {
		const struct ms_imap_response *resp;
		ssize_t n = ms_imap_parser_feed(c->parser, data, len, &resp);

		if (n < 0) {
			fail(c, "malformed response: %s",
			     ms_imap_parser_error(c->parser));
			break;
		}
		data += n;
		len -= (size_t)n;
		if (resp != NULL)
			handle_response(c, resp);
		if (c->tls_began) {
			/* Whatever came with the go-ahead was not protected
			 * by TLS: an attacker on the path may have put it
			 * there (CVE-2011-0411 class). */
			c->tls_began = 0;
			if (len > 0 && c->state != ST_FAILED)
				fail(c, "STARTTLS: the server sent data after "
				     "its go-ahead");
			break;
		}
	}
	ms_busy_leave(&c->busy, really_free, c);
}

static void on_error(struct ms_conn *conn, const char *error)
{
	struct ms_imapc *c = ms_conn_ctx(conn);

	fail_guarded(c, "", strncmp(c->error, "server said BYE", 15) == 0 ?
		     c->error : error);
}

static void on_drain(struct ms_conn *conn)
{
	struct ms_imapc *c = ms_conn_ctx(conn);

	if (c->drain != NULL)
		c->drain(c, c->drain_ctx);
}

static void on_connect(struct ms_conn *conn, int status, const char *error)
{
	struct ms_imapc *c = ms_conn_ctx(conn);

	if (status != 0) {
		fail_guarded(c, "", error != NULL ? error : "connect failed");
		return;
	}
	c->state = ST_GREETING;
	uv_timer_again(c->timer);
}

static void on_timeout(uv_timer_t *t)
{
	struct ms_imapc *c = t->data;

	ms_busy_enter(&c->busy);
	fail(c, "no reply from the server for %u seconds", c->timeout_secs);
	ms_busy_leave(&c->busy, really_free, c);
}

static int lit_start(void *ctx, const struct ms_imap_response *partial,
		     uint64_t size)
{
	struct ms_imapc *c = ctx;

	if (c->lit.literal_start == NULL)
		return 0;
	return c->lit.literal_start(c->lit.ctx, partial, size);
}

static int lit_data(void *ctx, const void *data, size_t len)
{
	struct ms_imapc *c = ctx;

	return c->lit.literal_data != NULL ?
		c->lit.literal_data(c->lit.ctx, data, len) : 0;
}

static void lit_end(void *ctx)
{
	struct ms_imapc *c = ctx;

	if (c->lit.literal_end != NULL)
		c->lit.literal_end(c->lit.ctx);
}

static void on_timeout_failed_connect(uv_timer_t *t)
{
	struct ms_imapc *c = t->data;

	ms_busy_enter(&c->busy);
	if (c->ready != NULL)
		c->ready(c, c->error, c->ready_ctx);
	ms_busy_leave(&c->busy, really_free, c);
}

struct ms_imapc *ms_imapc_new(uv_loop_t *loop,
			      const struct ms_imapc_settings *set,
			      ms_imapc_ready_cb *ready, void *ctx)
{
	static const struct ms_conn_callbacks conn_cb = {
		.on_connect = on_connect,
		.on_read = on_read,
		.on_error = on_error,
		.on_drain = on_drain,
	};
	struct ms_imap_parser_callbacks pcb = {
		.literal_start = lit_start,
		.literal_data = lit_data,
		.literal_end = lit_end,
	};
	struct ms_conn_callbacks cb = conn_cb;
	struct ms_imapc *c = calloc(1, sizeof(*c));
	int ret;

	if (c == NULL)
		return NULL;
	c->loop = loop;
	c->host = strdup(set->host);
	c->port = set->port;
	c->tls = set->tls;
	c->ca_file = xstrdup_or_null(set->tls.ca_file);
	c->server_name = xstrdup_or_null(set->tls.server_name);
	c->tls.ca_file = c->ca_file;
	c->tls.server_name = c->server_name;
	c->user = strdup(set->user != NULL ? set->user : "");
	c->admin = xstrdup_or_null(set->admin);
	c->password = strdup(set->password != NULL ? set->password : "");
	c->mech = set->mech;
	c->timeout_secs = set->timeout_secs != 0 ? set->timeout_secs : 300;
	c->pacer = set->pacer;
	c->ready = ready;
	c->ready_ctx = ctx;
	pcb.ctx = c;
	c->parser = ms_imap_parser_new(&ms_imap_parser_default_limits, &pcb);
	c->timer = malloc(sizeof(*c->timer));
	if (c->host == NULL || c->user == NULL || c->password == NULL ||
	    c->parser == NULL || c->timer == NULL) {
		free(c->timer);
		c->timer = NULL;
		really_free(c);
		return NULL;
	}
	uv_timer_init(loop, c->timer);
	c->timer->data = c;
	uv_timer_start(c->timer, on_timeout,
		       MS_TEST_TIME(c->timeout_secs * 1000ULL),
		       MS_TEST_TIME(c->timeout_secs * 1000ULL));
	cb.ctx = c;
	c->state = ST_CONNECTING;
	ret = ms_conn_connect(loop, c->host, c->port, &c->tls, &cb, &c->conn);
	if (ret == 0)
		ms_conn_set_wipe(c->conn, 1);	/* until the login is done */
	if (ret < 0) {
		snprintf(c->error, sizeof(c->error), "connect to %s:%u: %s",
			 c->host, c->port, uv_strerror(ret));
		c->state = ST_FAILED;
		uv_timer_stop(c->timer);
		ms_secret_free(&c->password);
		/* Report asynchronously: callers expect no callback from
		 * inside ms_imapc_new(). */
		c->timer->data = c;
		uv_timer_start(c->timer, on_timeout_failed_connect, 0, 0);
	}
	return c;
}
