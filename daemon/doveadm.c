/* Dovecot's doveadm HTTP API: a one-request HTTP/1.1 client over net.c
 * (see doveadm.h). Small on purpose: one POST per connection, the
 * reply read to its Content-Length or to the close. The request does not
 * say "Connection: close": Dovecot 2.3.19 then never answers a refused
 * key (a 401 that is never sent); the reply's Content-Length ends it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "doveadm.h"
#include "util.h"

#define REPLY_MAX (64 * 1024)
#define TIMEOUT_MS 30000

struct ms_doveadm_req {
	uv_timer_t timer;
	struct ms_conn *conn;
	char *request;			/* holds the key: wiped */
	size_t reqlen;
	char *reply;
	size_t replen;
	ms_doveadm_cb *cb;
	void *ctx;
	char error[300];		/* set: fail with it at the next turn */
	int done;
};

int ms_doveadm_parse_url(struct ms_doveadm_cfg *cfg, const char *url,
			 const char **why)
{
	const char *rest, *slash, *colon;
	size_t hostlen;
	char *end;
	long port;

	memset(cfg, 0, sizeof(*cfg));
	if (strncasecmp(url, "http://", 7) == 0) {
		rest = url + 7;
		cfg->port = 8080;
	} else if (strncasecmp(url, "https://", 8) == 0) {
		rest = url + 8;
		cfg->port = 443;
		cfg->tls.mode = MS_TLS_IMPLICIT;
	} else {
		*why = "not an http:// or https:// URL";
		return -1;
	}
	slash = strchr(rest, '/');
	hostlen = slash != NULL ? (size_t)(slash - rest) : strlen(rest);
	colon = memchr(rest, ':', hostlen);
	if (colon != NULL) {
		port = strtol(colon + 1, &end, 10);
		if (end != rest + hostlen || port < 1 || port > 65535) {
			*why = "bad port";
			return -1;
		}
		cfg->port = (uint16_t)port;
		hostlen = (size_t)(colon - rest);
	}
	if (hostlen == 0 || hostlen >= sizeof(cfg->host)) {
		*why = "bad host";
		return -1;
	}
	memcpy(cfg->host, rest, hostlen);
	snprintf(cfg->path, sizeof(cfg->path), "%s",
		 slash != NULL ? slash : "/doveadm/v1");
	return 0;
}

static void on_timer_close(uv_handle_t *h)
{
	struct ms_doveadm_req *q = h->data;

	ms_secret_buf_free(&q->request, q->reqlen);
	free(q->reply);
	free(q);
}

static void req_free(struct ms_doveadm_req *q)
{
	ms_conn_close(&q->conn);
	uv_timer_stop(&q->timer);
	uv_close((uv_handle_t *)&q->timer, on_timer_close);
}

static void finish(struct ms_doveadm_req *q, int ok, const char *error)
{
	if (q->done)
		return;
	q->done = 1;
	q->cb(q->ctx, ok, error);
	req_free(q);
}

/* s, at most n bytes of it, into out (outsz bytes) with every control
 * character a '?': a server's word goes into an error text as words. */
static void plain_text(char *out, size_t outsz, const char *s, size_t n)
{
	size_t i;

	for (i = 0; s[i] != '\0' && i < n && i + 1 < outsz; i++)
		out[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' :
			 s[i];
	out[i] = '\0';
}

/* The body is a JSON array of replies: [["doveadmResponse", ..., tag]] or
 * [["error", {"type": ..., "exitCode": N}, tag]]. */
static int parse_body(const char *body, size_t len, char *err, size_t errsz)
{
	json_t *j = json_loadb(body, len, 0, NULL);
	json_t *first = json_array_get(j, 0);
	const char *kind = json_string_value(json_array_get(first, 0));
	json_t *info = json_array_get(first, 1);
	char word[64];

	if (kind != NULL && strcmp(kind, "doveadmResponse") == 0) {
		json_decref(j);
		return MS_DOVEADM_OK;
	}
	if (kind != NULL && strcmp(kind, "error") == 0) {
		json_int_t code = json_integer_value(json_object_get(info,
								     "exitCode"));
		const char *type = json_string_value(json_object_get(info,
								     "type"));

		plain_text(word, sizeof(word), type != NULL ? type : "error",
			   60);
		snprintf(err, errsz, "doveadm mailboxUpdate: %s %lld%s",
			 word, (long long)code,
			 code == 68 ? " (no such user or mailbox)" :
			 code == 75 ? " (temporary failure)" : "");
	} else {
		snprintf(err, errsz, "doveadm API: unexpected reply");
	}
	json_decref(j);
	return MS_DOVEADM_FAILED;
}

/* "HTTP/1.x NNN ...": NNN, or -1. */
static int status_code(const char *reply)
{
	const char *p = reply + 9;
	char *end;
	long code;

	if (strncmp(reply, "HTTP/1.", 7) != 0 || reply[7] < '0' ||
	    reply[7] > '9' || reply[8] != ' ')
		return -1;
	code = strtol(p, &end, 10);
	return end != p && code >= 100 && code <= 999 ? (int)code : -1;
}

int ms_doveadm_reply(const char *reply, size_t len, int at_close, char *err,
		     size_t errsz)
{
	const char *hend, *cl, *body;
	size_t blen;
	int code;

	err[0] = '\0';
	hend = strstr(reply, "\r\n\r\n");
	if (hend == NULL)
		return MS_DOVEADM_MORE;
	body = hend + 4;
	blen = len - (size_t)(body - reply);
	cl = strcasestr(reply, "\r\nContent-Length:");
	if (cl != NULL && cl < hend) {
		size_t want = 0;

		/* Digits on the header's own line, nothing else: never a
		 * number read on into the next line or the body. */
		for (cl += 17; *cl == ' ' || *cl == '\t'; cl++)
			;
		if (*cl < '0' || *cl > '9') {
			snprintf(err, errsz, "doveadm API: bad Content-Length");
			return MS_DOVEADM_FAILED;
		}
		for (; *cl >= '0' && *cl <= '9'; cl++) {
			if (want > REPLY_MAX) {
				snprintf(err, errsz, "doveadm API: reply too "
					 "long");
				return MS_DOVEADM_FAILED;
			}
			want = want * 10 + (size_t)(*cl - '0');
		}
		while (*cl == ' ' || *cl == '\t')
			cl++;
		if (*cl != '\r') {
			snprintf(err, errsz, "doveadm API: bad Content-Length");
			return MS_DOVEADM_FAILED;
		}
		if (blen < want)
			return MS_DOVEADM_MORE;
		blen = want;
	} else if (!at_close) {
		return MS_DOVEADM_MORE;
	}
	if ((code = status_code(reply)) < 0) {
		snprintf(err, errsz, "doveadm API: not an HTTP reply");
		return MS_DOVEADM_FAILED;
	}
	if (code == 200)
		return parse_body(body, blen, err, errsz);
	snprintf(err, errsz, "doveadm API: HTTP %d%s", code,
		 code == 401 ? " (the API key was refused)" :
		 code == 403 ? " (forbidden)" :
		 code == 404 ? " (no doveadm API at that path)" : "");
	return MS_DOVEADM_FAILED;
}

/* Whole reply in? Returns 1 when handled. at_close: nothing more comes. */
static int try_reply(struct ms_doveadm_req *q, int at_close)
{
	char err[200];
	int r;

	if (q->reply == NULL)
		return 0;
	q->reply[q->replen] = '\0';
	r = ms_doveadm_reply(q->reply, q->replen, at_close, err, sizeof(err));
	if (r == MS_DOVEADM_MORE)
		return 0;
	finish(q, r == MS_DOVEADM_OK, r == MS_DOVEADM_OK ? NULL : err);
	return 1;
}

static void on_read(struct ms_conn *c, const char *data, size_t len)
{
	struct ms_doveadm_req *q = ms_conn_ctx(c);
	char *n;

	if (q->replen + len > REPLY_MAX) {
		finish(q, 0, "doveadm API: reply too long");
		return;
	}
	n = realloc(q->reply, q->replen + len + 1);
	if (n == NULL) {
		finish(q, 0, "out of memory");
		return;
	}
	q->reply = n;
	memcpy(q->reply + q->replen, data, len);
	q->replen += len;
	try_reply(q, 0);
}

static void on_error(struct ms_conn *c, const char *error)
{
	struct ms_doveadm_req *q = ms_conn_ctx(c);
	char err[300];

	if (try_reply(q, 1))
		return;
	snprintf(err, sizeof(err), "doveadm API: %s", error);
	finish(q, 0, err);
}

static void on_connect(struct ms_conn *c, int status, const char *error)
{
	struct ms_doveadm_req *q = ms_conn_ctx(c);
	char err[300];

	if (status != 0) {
		snprintf(err, sizeof(err), "doveadm API: %s", error);
		finish(q, 0, err);
		return;
	}
	if (ms_conn_write(c, q->request, q->reqlen) < 0)
		finish(q, 0, "doveadm API: write failed");
}

static void on_timeout(uv_timer_t *t)
{
	struct ms_doveadm_req *q = t->data;

	finish(q, 0, q->error[0] != '\0' ? q->error :
	       "doveadm API: no answer in 30 s");
}

/* The request: the JSON command and the headers, key in base64. */
static char *build_request(const struct ms_doveadm_cfg *cfg, const char *user,
			   const char *mailbox,
			   const struct ms_doveadm_update *up, size_t *len_r)
{
	json_t *params = json_pack("{s:s, s:s}", "user", user,
				   "mailbox", mailbox);
	json_t *cmd;
	char *body, *key64, *req = NULL;
	size_t klen = strlen(cfg->key);
	int n;

	if (up->uid_validity != 0)
		json_object_set_new(params, "uidValidity",
				    json_integer(up->uid_validity));
	if (up->min_next_uid != 0)
		json_object_set_new(params, "minNextUid",
				    json_integer(up->min_next_uid));
	if (up->min_highest_modseq != 0)
		json_object_set_new(params, "minHighestModseq",
				    json_integer((json_int_t)up->min_highest_modseq));
	cmd = json_pack("[[s, o, s]]", "mailboxUpdate", params, "m");
	body = json_dumps(cmd, JSON_COMPACT);
	json_decref(cmd);
	key64 = calloc(1, 4 * ((klen + 2) / 3) + 1);
	if (body == NULL || key64 == NULL)
		goto out;
	EVP_EncodeBlock((unsigned char *)key64, (const unsigned char *)cfg->key,
			(int)klen);
	n = asprintf(&req, "POST %s HTTP/1.1\r\nHost: %s:%u\r\n"
		     "Authorization: X-Dovecot-API %s\r\n"
		     "Content-Type: application/json\r\n"
		     "Content-Length: %zu\r\n\r\n%s",
		     cfg->path, cfg->host, cfg->port, key64, strlen(body), body);
	if (n < 0)
		req = NULL;
	else
		*len_r = (size_t)n;
out:
	ms_secret_free(&key64);
	free(body);
	return req;
}

int ms_doveadm_mailbox_update(uv_loop_t *loop, const struct ms_doveadm_cfg *cfg,
			      const char *user, const char *mailbox,
			      const struct ms_doveadm_update *up,
			      ms_doveadm_cb *cb, void *ctx,
			      struct ms_doveadm_req **req_r)
{
	static const struct ms_conn_callbacks cbs = {
		.on_connect = on_connect, .on_read = on_read,
		.on_error = on_error,
	};
	struct ms_conn_callbacks mine = cbs;
	struct ms_doveadm_req *q = calloc(1, sizeof(*q));
	int ret;

	if (q == NULL)
		return -1;
	q->request = build_request(cfg, user, mailbox, up, &q->reqlen);
	if (q->request == NULL) {
		free(q);
		return -1;
	}
	q->cb = cb;
	q->ctx = ctx;
	uv_timer_init(loop, &q->timer);
	q->timer.data = q;
	mine.ctx = q;
	ret = ms_conn_connect(loop, cfg->host, cfg->port, &cfg->tls, &mine,
			      &q->conn);
	if (ret < 0) {
		/* Reported from the loop, as every other outcome. */
		snprintf(q->error, sizeof(q->error), "doveadm API: %s:%u: %s",
			 cfg->host, cfg->port, uv_strerror(ret));
		q->conn = NULL;
		uv_timer_start(&q->timer, on_timeout, 0, 0);
	} else {
		ms_conn_set_wipe(q->conn, 1);
		uv_timer_start(&q->timer, on_timeout, TIMEOUT_MS, 0);
	}
	*req_r = q;
	return 0;
}

void ms_doveadm_cancel(struct ms_doveadm_req **req)
{
	struct ms_doveadm_req *q = *req;

	if (q == NULL)
		return;
	*req = NULL;
	if (q->done)
		return;
	q->done = 1;
	req_free(q);
}
