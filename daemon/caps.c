/* The capabilities the gateway advertises before login: the servers are
 * asked, their lists intersected. See caps.h. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "caps.h"
#include "log.h"
#include "net.h"
#include "util.h"

#define PROBE_TIMEOUT_MS (10 * 1000)
#define PROBE_REPLY_MAX (16 * 1024)
#define RETRY_S 30		/* after a failed ask */
#define MAX_ITEMS 128
#define MERGED_MAX 1500		/* fits one reply line (ms_conn_printf) */

static const char *const kind_name[MS_CAPS_N] = {
	"imap", "pop3", "smtp", "submission"
};

/* What Dovecot 2.3 and Postfix 3.7 list; stands in for a server not yet
 * asked. */
static const char *const builtin[MS_CAPS_N] = {
	"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+",
	"CAPA\nTOP\nUIDL\nRESP-CODES\nPIPELINING\nAUTH-RESP-CODE",
	"SIZE\n8BITMIME",
	"SIZE\n8BITMIME",
};

/* ---- merging ---- */

struct items {
	char *v[MAX_ITEMS];
	unsigned int n;
};

/* Splits a copy of list at sep (and CR/LF), dropping empty items and
 * folding runs of blanks inside lines to one space. */
static void split(const char *list, char sep, struct items *it, char *buf,
		  size_t bufsz)
{
	size_t n = 0;
	char *start = buf;

	it->n = 0;
	for (const char *p = list; ; p++) {
		int end = *p == '\0' || *p == sep || *p == '\n' ||
			*p == '\r' || (sep == ' ' && *p == '\t');

		if (end || n + 1 >= bufsz) {
			while (start < buf + n && buf[n - 1] == ' ')
				n--;
			buf[n++] = '\0';
			if (*start != '\0' && it->n < MAX_ITEMS)
				it->v[it->n++] = start;
			start = buf + n;
			if (*p == '\0' || n + 1 >= bufsz)
				break;
			continue;
		}
		if (*p == ' ' || *p == '\t') {
			if (start == buf + n || buf[n - 1] == ' ')
				continue;
			buf[n++] = ' ';
			continue;
		}
		buf[n++] = *p;
	}
}

/* The first word of an item, compared case-insensitively. */
static int key_is(const char *item, const char *key)
{
	size_t n = strlen(key);

	return strncasecmp(item, key, n) == 0 &&
		(item[n] == '\0' || item[n] == ' ');
}

static const char *find_key(const struct items *it, const char *item)
{
	size_t n = strcspn(item, " =");

	for (unsigned int i = 0; i < it->n; i++)
		if (strncasecmp(it->v[i], item, n) == 0 &&
		    (it->v[i][n] == '\0' || it->v[i][n] == ' ' ||
		     it->v[i][n] == '='))
			return it->v[i];
	return NULL;
}

static int has_item(const struct items *it, const char *item)
{
	for (unsigned int i = 0; i < it->n; i++)
		if (!strcasecmp(it->v[i], item))
			return 1;
	return 0;
}

static int imap_own(const char *atom)
{
	return !strcasecmp(atom, "STARTTLS") ||
		!strcasecmp(atom, "LOGINDISABLED") ||
		!strcasecmp(atom, "SASL-IR") ||
		!strncasecmp(atom, "AUTH=", 5);
}

static int pop3_own(const char *line)
{
	return key_is(line, "STLS") || key_is(line, "USER") ||
		key_is(line, "SASL") || key_is(line, "IMPLEMENTATION");
}

static int smtp_own(const char *line)
{
	return key_is(line, "STARTTLS") || key_is(line, "AUTH") ||
		!strncasecmp(line, "AUTH=", 5) ||
		key_is(line, "ENHANCEDSTATUSCODES") ||
		key_is(line, "XCLIENT") || key_is(line, "XFORWARD");
}

/* Inbound SMTP: what smtp.c passes on unchanged (MAIL/RCPT parameters are
 * replayed as given, DATA streamed, commands answered in order). */
static int smtp_relayed(const char *line)
{
	return key_is(line, "SIZE") || key_is(line, "8BITMIME") ||
		key_is(line, "PIPELINING") || key_is(line, "DSN");
}

static unsigned long size_limit(const char *line)
{
	const char *v = line + 4;

	while (*v == ' ')
		v++;
	return strtoul(v, NULL, 10);	/* "" (no fixed limit): 0 */
}

static void add(char **out, size_t *len, size_t *cap, const char *fmt,
		const char *item)
{
	int n = snprintf(NULL, 0, fmt, item);

	if (n < 0 || *len + (size_t)n > MERGED_MAX)
		return;
	if (*len + (size_t)n + 1 > *cap) {
		size_t ncap = (*len + (size_t)n + 1) * 2;
		char *p = realloc(*out, ncap);

		if (p == NULL)
			return;
		*out = p;
		*cap = ncap;
	}
	snprintf(*out + *len, *cap - *len, fmt, item);
	*len += (size_t)n;
}

char *ms_caps_merge(enum ms_caps_kind kind, const char *a, const char *b)
{
	char abuf[8192], bbuf[8192];
	struct items ia, ib;
	char sep = kind == MS_CAPS_IMAP ? ' ' : '\n';
	char *out = NULL, tmp[64];
	size_t len = 0, cap = 0;

	if (a == NULL) {
		a = b;
		b = NULL;
	}
	if (a == NULL)
		a = builtin[kind];
	split(a, sep, &ia, abuf, sizeof(abuf));
	if (b != NULL)
		split(b, sep, &ib, bbuf, sizeof(bbuf));
	add(&out, &len, &cap, "%s", "");
	for (unsigned int i = 0; i < ia.n; i++) {
		const char *x = ia.v[i], *y;

		switch (kind) {
		case MS_CAPS_IMAP:
			if (imap_own(x) || (b != NULL && !has_item(&ib, x)))
				continue;
			add(&out, &len, &cap, len > 0 ? " %s" : "%s", x);
			break;
		case MS_CAPS_POP3:
			if (pop3_own(x) || (b != NULL && !has_item(&ib, x)))
				continue;
			add(&out, &len, &cap, "%s\r\n", x);
			break;
		case MS_CAPS_SMTP:
		case MS_CAPS_SUBMISSION:
			if (smtp_own(x) ||
			    (kind == MS_CAPS_SMTP && !smtp_relayed(x)))
				continue;
			if (key_is(x, "SIZE")) {
				unsigned long la = size_limit(x), lb = 0;

				if (b != NULL) {
					if ((y = find_key(&ib, x)) == NULL ||
					    !key_is(y, "SIZE"))
						continue;
					lb = size_limit(y);
				}
				if (la == 0 || (lb != 0 && lb < la))
					la = lb;
				if (la == 0) {
					add(&out, &len, &cap, "250-%s\r\n",
					    "SIZE");
				} else {
					snprintf(tmp, sizeof(tmp), "SIZE %lu",
						 la);
					add(&out, &len, &cap, "250-%s\r\n",
					    tmp);
				}
				continue;
			}
			if (b != NULL && !has_item(&ib, x))
				continue;
			add(&out, &len, &cap, "250-%s\r\n", x);
			break;
		default:
			break;
		}
	}
	if (kind == MS_CAPS_IMAP)
		add(&out, &len, &cap, len > 0 ? " %s" : "%s", "SASL-IR");
	else if (kind == MS_CAPS_POP3)
		add(&out, &len, &cap, "%s", "USER\r\nSASL PLAIN\r\n");
	return out;
}

/* ---- asking the servers ---- */

enum pstate {
	P_GREETING,
	P_STARTTLS,		/* STARTTLS / STLS sent, waiting for the OK */
	P_TLS,			/* the handshake runs */
	P_REPLY,
	P_DONE,
};

/* probe_line(): the handshake started; nothing may follow the go-ahead. */
#define PROBE_TLS_STARTED 2

struct probe {
	struct ms_caps *caps;
	enum ms_caps_kind kind;
	int side;
	struct ms_conn *conn;
	uv_timer_t *timer;
	enum pstate st;
	int ok;			/* POP3 +OK / SMTP domain line seen */
	int tls;			/* a STARTTLS server: upgraded now */
	char *buf;			/* the server's bytes, not yet lines */
	size_t len;
	char *list;			/* collected */
	size_t listlen;
};

struct ms_caps {
	uv_loop_t *loop;
	const struct ms_server_cfg *srv[MS_CAPS_N][2];
	char *raw[MS_CAPS_N][2];	/* the server's last answer */
	time_t asked[MS_CAPS_N][2];	/* when it last answered */
	char *adv[MS_CAPS_N];
	struct probe *probe[MS_CAPS_N][2];
	uv_timer_t *timer;
	unsigned int refresh_s;
};

static int configured(const struct ms_caps *c, int k, int side)
{
	return c->srv[k][side] != NULL && c->srv[k][side]->host[0] != '\0';
}

/* A list as one log line: "250-" prefixes dropped, line ends as one
 * space, none at the end. */
static void one_line(const char *list, char *out, size_t outsz)
{
	size_t n = 0;

	for (const char *p = list; *p != '\0' && n + 2 < outsz; p++) {
		if (!strncmp(p, "250-", 4) && (p == list || p[-1] == '\n'))
			p += 3;
		else if (*p == '\r' || *p == '\n') {
			if (n > 0 && out[n - 1] != ' ')
				out[n++] = ' ';
		} else
			out[n++] = *p;
	}
	while (n > 0 && out[n - 1] == ' ')
		n--;
	out[n] = '\0';
}

static void remerge(struct ms_caps *c, enum ms_caps_kind k)
{
	const char *in[2];
	char *m;

	for (int side = 0; side < 2; side++)
		in[side] = !configured(c, k, side) ? NULL :
			c->raw[k][side] != NULL ? c->raw[k][side] :
			builtin[k];
	if ((m = ms_caps_merge(k, in[0], in[1])) == NULL)
		return;
	if (c->adv[k] != NULL && !strcmp(c->adv[k], m)) {
		free(m);
		return;
	}
	free(c->adv[k]);
	c->adv[k] = m;
	if (in[0] != NULL || in[1] != NULL) {
		char shown[1024];

		one_line(m, shown, sizeof(shown));
		ms_info("capabilities: %s before login: %s", kind_name[k],
			shown);
	}
}

static void probe_free(struct probe *p)
{
	if (p == NULL)
		return;
	p->caps->probe[p->kind][p->side] = NULL;
	ms_conn_close(&p->conn);
	if (p->timer != NULL)
		ms_close_free((uv_handle_t *)p->timer, p->timer);
	free(p->buf);
	free(p->list);
	free(p);
}

static void probe_end(struct probe *p, const char *error)
{
	struct ms_caps *c = p->caps;
	const struct ms_server_cfg *srv = c->srv[p->kind][p->side];
	const char *side = p->side ? "destination" : "source";

	if (error != NULL) {
		ms_warn("capabilities: cannot ask the %s %s server %s:%u: %s",
			side, kind_name[p->kind], srv->host, srv->port, error);
	} else {
		if (c->raw[p->kind][p->side] == NULL ||
		    strcmp(c->raw[p->kind][p->side], p->list) != 0) {
			char shown[1024];

			one_line(p->list, shown, sizeof(shown));
			ms_info("capabilities: %s %s server %s:%u: %s", side,
				kind_name[p->kind], srv->host, srv->port,
				shown);
		}
		free(c->raw[p->kind][p->side]);
		c->raw[p->kind][p->side] = p->list;
		p->list = NULL;
		c->asked[p->kind][p->side] = time(NULL);
		remerge(c, p->kind);
	}
	probe_free(p);
}

static void list_add(struct probe *p, const char *item, size_t n, char sep)
{
	char *l = realloc(p->list, p->listlen + n + 2);

	if (l == NULL)
		return;
	p->list = l;
	if (p->listlen > 0)
		p->list[p->listlen++] = sep;
	memcpy(p->list + p->listlen, item, n);
	p->listlen += n;
	p->list[p->listlen] = '\0';
}

/* "... [CAPABILITY a b c] ..." or "* CAPABILITY a b c" */
static void imap_take(struct probe *p, const char *caps, size_t n)
{
	free(p->list);
	p->list = NULL;
	p->listlen = 0;
	list_add(p, caps, n, ' ');
}

static int wants_tls(const struct probe *p)
{
	return p->caps->srv[p->kind][p->side]->tls_mode == MS_TLS_STARTTLS &&
		!p->tls;
}

static void on_probe_tls(struct ms_conn *conn, int status, const char *error)
{
	struct probe *p = ms_conn_ctx(conn);

	if (status != 0) {
		probe_end(p, error != NULL ? error : "STARTTLS failed");
		return;
	}
	/* What the server lists over TLS is what clients will see. */
	p->tls = 1;
	p->ok = 0;
	p->st = P_REPLY;
	free(p->list);
	p->list = NULL;
	p->listlen = 0;
	if (p->kind == MS_CAPS_IMAP)
		ms_conn_printf(p->conn, "p CAPABILITY\r\n");
	else if (p->kind == MS_CAPS_POP3)
		ms_conn_printf(p->conn, "CAPA\r\n");
	else
		ms_conn_printf(p->conn, "EHLO %s\r\n", ms_host_name());
}

/* The server's answer to our STARTTLS / STLS: 1 when done (refused),
 * PROBE_TLS_STARTED. */
static int probe_starttls(struct probe *p, int ok)
{
	if (!ok || ms_conn_starttls(p->conn, on_probe_tls) < 0) {
		probe_end(p, "STARTTLS refused");
		return 1;
	}
	p->st = P_TLS;
	return PROBE_TLS_STARTED;
}

/* One line from the server (CRLF removed). Returns 1 when done,
 * PROBE_TLS_STARTED when the handshake began, else 0. */
static int probe_line(struct probe *p, char *l)
{
	const char *q;

	switch (p->kind) {
	case MS_CAPS_IMAP:
		if (p->st == P_STARTTLS) {
			if (strncmp(l, "p ", 2) != 0)
				return 0;
			return probe_starttls(p, !strncasecmp(l, "p OK", 4));
		}
		if (p->st == P_GREETING) {
			if (strncmp(l, "* OK", 4) != 0) {
				probe_end(p, "no IMAP greeting");
				return 1;
			}
			if (wants_tls(p)) {
				ms_conn_printf(p->conn, "p STARTTLS\r\n");
				p->st = P_STARTTLS;
				return 0;
			}
			if ((q = strstr(l, "[CAPABILITY ")) != NULL &&
			    strchr(q, ']') != NULL) {
				q += 12;
				imap_take(p, q, (size_t)(strchr(q, ']') - q));
				ms_conn_printf(p->conn, "p LOGOUT\r\n");
				probe_end(p, NULL);
				return 1;
			}
			ms_conn_printf(p->conn, "p CAPABILITY\r\n");
			p->st = P_REPLY;
		} else if (!strncasecmp(l, "* CAPABILITY ", 13)) {
			imap_take(p, l + 13, strlen(l + 13));
		} else if (!strncmp(l, "p ", 2)) {
			ms_conn_printf(p->conn, "p LOGOUT\r\n");
			probe_end(p, p->list != NULL && !strncmp(l, "p OK", 4) ?
				  NULL : "CAPABILITY failed");
			return 1;
		}
		return 0;
	case MS_CAPS_POP3:
		if (p->st == P_STARTTLS)
			return probe_starttls(p, !strncmp(l, "+OK", 3));
		if (p->st == P_GREETING) {
			if (strncmp(l, "+OK", 3) != 0) {
				probe_end(p, "no POP3 greeting");
				return 1;
			}
			if (wants_tls(p)) {
				ms_conn_printf(p->conn, "STLS\r\n");
				p->st = P_STARTTLS;
				return 0;
			}
			ms_conn_printf(p->conn, "CAPA\r\n");
			p->st = P_REPLY;
		} else if (!p->ok) {
			if (strncmp(l, "+OK", 3) != 0) {
				ms_conn_printf(p->conn, "QUIT\r\n");
				probe_end(p, "CAPA refused");
				return 1;
			}
			p->ok = 1;
		} else if (!strcmp(l, ".")) {
			ms_conn_printf(p->conn, "QUIT\r\n");
			if (p->list == NULL)
				p->list = strdup("");
			probe_end(p, p->list == NULL ? "out of memory" : NULL);
			return 1;
		} else {
			l += l[0] == '.';	/* dot-stuffing */
			list_add(p, l, strlen(l), '\n');
		}
		return 0;
	default:
		/* SMTP: "220-..."/"220 ..." then "250-domain", "250-KW"...,
		 * "250 KW". */
		if (strlen(l) < 4 || !isdigit((unsigned char)l[0]) ||
		    (l[3] != ' ' && l[3] != '-' && l[3] != '\0')) {
			probe_end(p, "not an SMTP reply");
			return 1;
		}
		if (p->st == P_STARTTLS)
			return l[3] == '-' ? 0 :
				probe_starttls(p, !strncmp(l, "220", 3));
		if (p->st == P_GREETING) {
			if (strncmp(l, "220", 3) != 0) {
				probe_end(p, "no SMTP greeting");
				return 1;
			}
			if (l[3] != '-') {
				ms_conn_printf(p->conn, "EHLO %s\r\n",
					       ms_host_name());
				p->st = P_REPLY;
			}
			return 0;
		}
		if (strncmp(l, "250", 3) != 0) {
			ms_conn_printf(p->conn, "QUIT\r\n");
			probe_end(p, "EHLO refused");
			return 1;
		}
		if (p->ok)	/* after the domain line */
			list_add(p, l + 4, strlen(l + 4), '\n');
		p->ok = 1;
		if (l[3] != '-' && wants_tls(p)) {
			/* Listed in plaintext: asked again over TLS. */
			ms_conn_printf(p->conn, "STARTTLS\r\n");
			p->st = P_STARTTLS;
			return 0;
		}
		if (l[3] != '-') {
			ms_conn_printf(p->conn, "QUIT\r\n");
			if (p->list == NULL)
				p->list = strdup("");
			probe_end(p, p->list == NULL ? "out of memory" : NULL);
			return 1;
		}
		return 0;
	}
}

static void on_probe_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct probe *p = ms_conn_ctx(conn);
	char *nl;
	size_t off = 0;

	if (p->len + len > PROBE_REPLY_MAX) {
		probe_end(p, "reply too long");
		return;
	}
	memcpy(p->buf + p->len, data, len);
	p->len += len;
	while ((nl = memchr(p->buf + off, '\n', p->len - off)) != NULL) {
		char *l = p->buf + off;

		*nl = '\0';
		if (nl > l && nl[-1] == '\r')
			nl[-1] = '\0';
		off = (size_t)(nl - p->buf) + 1;
		switch (probe_line(p, l)) {
		case 0:
			continue;
		case PROBE_TLS_STARTED:
			/* Not protected by TLS: an attacker on the path may
			 * have put it there (capabilities we would
			 * advertise). */
			if (off < p->len) {
				probe_end(p, "the server sent data after its "
					  "STARTTLS go-ahead");
				return;
			}
			p->len = 0;
			return;
		default:
			return;
		}
	}
	memmove(p->buf, p->buf + off, p->len - off);
	p->len -= off;
}

static void on_probe_connect(struct ms_conn *conn, int status,
			     const char *error)
{
	if (status != 0)
		probe_end(ms_conn_ctx(conn), error);
}

static void on_probe_error(struct ms_conn *conn, const char *error)
{
	probe_end(ms_conn_ctx(conn), error);
}

static void on_probe_timeout(uv_timer_t *t)
{
	probe_end(t->data, "no answer in time");
}

static void probe_start(struct ms_caps *c, enum ms_caps_kind k, int side)
{
	const struct ms_server_cfg *srv = c->srv[k][side];
	struct ms_conn_callbacks cb = {
		.on_connect = on_probe_connect,
		.on_read = on_probe_read,
		.on_error = on_probe_error,
	};
	struct probe *p = calloc(1, sizeof(*p));
	int r;

	if (p == NULL || (p->buf = malloc(PROBE_REPLY_MAX)) == NULL ||
	    (p->timer = malloc(sizeof(*p->timer))) == NULL) {
		if (p != NULL)
			free(p->buf);
		free(p);
		return;
	}
	p->caps = c;
	p->kind = k;
	p->side = side;
	c->probe[k][side] = p;
	uv_timer_init(c->loop, p->timer);
	p->timer->data = p;
	uv_timer_start(p->timer, on_probe_timeout, PROBE_TIMEOUT_MS, 0);
	cb.ctx = p;
	/* STARTTLS servers are asked after the upgrade, like clients that
	 * will log in through us (STARTTLS and AUTH= are the gateway's own
	 * anyway). */
	r = ms_server_connect(c->loop, srv, &cb, &p->conn);
	if (r < 0)
		probe_end(p, uv_strerror(r));
}

static void on_refresh(uv_timer_t *t)
{
	struct ms_caps *c = t->data;
	time_t now = time(NULL);
	int failed = 0;

	for (int k = 0; k < MS_CAPS_N; k++)
		for (int side = 0; side < 2; side++) {
			if (!configured(c, k, side) || c->probe[k][side])
				continue;
			if (c->asked[k][side] == 0 ||
			    now - c->asked[k][side] >= (time_t)c->refresh_s)
				probe_start(c, k, side);
		}
	for (int k = 0; k < MS_CAPS_N; k++)
		for (int side = 0; side < 2; side++)
			if (configured(c, k, side) && c->asked[k][side] == 0)
				failed = 1;
	/* Probes still running count as failed for the next look: a
	 * server that never answered is asked again soon. */
	uv_timer_start(c->timer, on_refresh, (failed && RETRY_S < c->refresh_s ?
					      RETRY_S : c->refresh_s) * 1000ULL,
		       0);
}

int ms_caps_new(uv_loop_t *loop,
		const struct ms_server_cfg *servers[MS_CAPS_N][2],
		unsigned int refresh_s, struct ms_caps **caps_r)
{
	struct ms_caps *c = calloc(1, sizeof(*c));

	if (c == NULL || (c->timer = malloc(sizeof(*c->timer))) == NULL) {
		free(c);
		return -1;
	}
	c->loop = loop;
	c->refresh_s = refresh_s != 0 ? refresh_s : 300;
	memcpy(c->srv, servers, sizeof(c->srv));
	for (int k = 0; k < MS_CAPS_N; k++)
		remerge(c, k);
	uv_timer_init(loop, c->timer);
	c->timer->data = c;
	on_refresh(c->timer);
	*caps_r = c;
	return 0;
}

void ms_caps_free(struct ms_caps **caps)
{
	struct ms_caps *c = *caps;

	if (c == NULL)
		return;
	for (int k = 0; k < MS_CAPS_N; k++) {
		for (int side = 0; side < 2; side++) {
			probe_free(c->probe[k][side]);
			free(c->raw[k][side]);
		}
		free(c->adv[k]);
	}
	ms_close_free((uv_handle_t *)c->timer, c->timer);
	free(c);
	*caps = NULL;
}

const char *ms_caps_get(struct ms_caps *caps, enum ms_caps_kind kind)
{
	if (caps == NULL || caps->adv[kind] == NULL) {
		static char *fallback[MS_CAPS_N];

		if (fallback[kind] == NULL)
			fallback[kind] = ms_caps_merge(kind, NULL, NULL);
		return fallback[kind] != NULL ? fallback[kind] : "";
	}
	return caps->adv[kind];
}

json_t *ms_caps_json(struct ms_caps *c)
{
	json_t *o = json_object();

	for (int k = 0; k < MS_CAPS_N; k++) {
		json_t *e;

		if (!configured(c, k, 0) && !configured(c, k, 1))
			continue;
		e = json_object();
		json_object_set_new(e, "advertised",
				    json_string(ms_caps_get(c, k)));
		for (int side = 0; side < 2; side++) {
			const char *name = side ? "destination" : "source";

			if (!configured(c, k, side))
				continue;
			json_object_set_new(e, name, c->raw[k][side] != NULL ?
					    json_string(c->raw[k][side]) :
					    json_null());
		}
		json_object_set_new(o, kind_name[k], e);
	}
	return o;
}
