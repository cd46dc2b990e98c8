/* The Prometheus endpoint (text format over HTTP/1.0, one request per
 * connection): users by state, sessions, copies running, messages and
 * bytes copied, logins. It only reads the gateway's counters and the
 * store; slow or silent clients cannot hold it (a timeout, a cap on
 * clients, the users' counts cached).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gw_internal.h"

#define METRICS_TIMEOUT_MS (10 * 1000)	/* to send the request */
#define METRICS_CLIENTS_MAX 64		/* at once; the oldest waiting for
					   its request makes room */
#define METRICS_CACHE_MS 5000		/* the users' counts are this fresh */
/* the body: twelve series, each with the gateway's name (127 bytes, twice
 * that escaped) */
#define METRICS_BODY_MAX 16384

struct mclient {
	struct mclient *next, *prev;	/* gw->mclients_list: oldest last */
	uv_tcp_t tcp;
	uv_timer_t timer;
	int handles;			/* open: freed when both are closed */
	int answered;			/* the request came in */
	int waiting;			/* for the users' counts */
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

/* A Prometheus label's value: backslash, quote and newline escaped. */
static void label_value(const char *v, char *out, size_t outsz)
{
	size_t n = 0;

	for (; *v != '\0' && n + 3 < outsz; v++) {
		if (*v == '\\' || *v == '"' || *v == '\n')
			out[n++] = '\\';
		out[n++] = *v == '\n' ? 'n' : *v;
	}
	out[n] = '\0';
}

static void metrics_write(struct mclient *mc);

struct mcount_read {
	struct ms_gateway *gw;
	struct mcount_ctx cnt;
};

/* On the store's reader. */
static int mcount_work(struct ms_store *store, void *arg, char *err,
		       size_t errsz)
{
	struct mcount_read *r = arg;

	return ms_store_user_foreach(store, mcount, &r->cnt) == 0 ? 0 : -1;
}

static void mcount_drop(void *arg)
{
	free(arg);
}

/* The counts are in (or the store failed: the last ones stay, logged):
 * every client waiting gets its answer. */
static void mcount_done(void *arg, const char *error)
{
	struct mcount_read *r = arg;
	struct ms_gateway *gw = r->gw;
	struct mclient *mc, *next;

	gw->mread = NULL;
	if (error != NULL)
		ms_log(MS_LOG_ERROR, "metrics: the users' counts: store: %s",
		       error);
	else
		gw->mcache = r->cnt;
	gw->mcache_ms = uv_now(gw->loop);
	if (gw->mcache_ms == 0)
		gw->mcache_ms = 1;
	free(r);
	for (mc = gw->mlist; mc != NULL; mc = next) {
		next = mc->next;
		if (mc->waiting) {
			mc->waiting = 0;
			metrics_write(mc);
		}
	}
}

/* The users table is walked at most every METRICS_CACHE_MS, however often
 * the endpoint is asked, and on the store's reader: a scrape waits for
 * the walk, the loop does not. */
static void metrics_reply(struct mclient *mc)
{
	struct ms_gateway *gw = mc->gw;
	struct mcount_read *r;

	if (gw->mcache_ms != 0 &&
	    uv_now(gw->loop) - gw->mcache_ms < METRICS_CACHE_MS) {
		metrics_write(mc);
		return;
	}
	mc->waiting = 1;
	if (gw->mread != NULL)
		return;
	if ((r = calloc(1, sizeof(*r))) == NULL) {
		mclient_close(mc);
		return;
	}
	r->gw = gw;
	if (gw_read_start(gw, mcount_work, mcount_done, mcount_drop, r,
			  &gw->mread) < 0)
		mclient_close(mc);
}

static void metrics_write(struct mclient *mc)
{
	struct ms_gateway *gw = mc->gw;
	struct mcount_ctx cnt;
	char name[2 * sizeof(gw->cfg.gw_name) + 1];
	char *body = malloc(METRICS_BODY_MAX), *resp;
	size_t pos = 0;
	uv_write_t *req;
	uv_buf_t buf;
	int n;

	if (body == NULL)
		goto close;
	cnt = gw->mcache;
	label_value(gw->cfg.gw_name, name, sizeof(name));
	pos += (size_t)snprintf(body + pos, METRICS_BODY_MAX - pos,
		"# HELP mailshift_users Users by state.\n"
		"# TYPE mailshift_users gauge\n");
	for (int i = 0; i < MS_USER_NSTATES; i++)
		pos += (size_t)snprintf(body + pos, METRICS_BODY_MAX - pos,
			"mailshift_users{gateway=\"%s\",state=\"%s\"} %llu\n",
			name, ms_user_state_names[i],
			(unsigned long long)cnt.states[i]);
	/* Every series carries the gateway's name ([gateway] name): several
	 * gateways on one store are told apart. */
	pos += (size_t)snprintf(body + pos, METRICS_BODY_MAX - pos,
		"# TYPE mailshift_sessions gauge\n"
		"mailshift_sessions{gateway=\"%s\"} %u\n"
		"# TYPE mailshift_copies_running gauge\n"
		"mailshift_copies_running{gateway=\"%s\"} %u\n"
		"# TYPE mailshift_messages_copied_total counter\n"
		"mailshift_messages_copied_total{gateway=\"%s\"} %llu\n"
		"# TYPE mailshift_bytes_copied_total counter\n"
		"mailshift_bytes_copied_total{gateway=\"%s\"} %llu\n"
		"# TYPE mailshift_logins_total counter\n"
		"mailshift_logins_total{gateway=\"%s\",result=\"ok\"} %llu\n"
		"mailshift_logins_total{gateway=\"%s\",result=\"failed\"} "
		"%llu\n"
		"# TYPE mailshift_sweeps_total counter\n"
		"mailshift_sweeps_total{gateway=\"%s\"} %llu\n"
		"# HELP mailshift_store_reads_waiting Reads given to the "
		"store's reader and not answered yet.\n"
		"# TYPE mailshift_store_reads_waiting gauge\n"
		"mailshift_store_reads_waiting{gateway=\"%s\"} %u\n",
		name, ms_gateway_nsessions(gw), name, gw->copies, name,
		(unsigned long long)cnt.msgs, name,
		(unsigned long long)cnt.bytes, name,
		(unsigned long long)gw->logins_ok, name,
		(unsigned long long)gw->logins_failed, name,
		(unsigned long long)gw->sweeps, name,
		gw->reader != NULL ? ms_reader_pending(gw->reader) : 0);
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

int gw_metrics_start(struct ms_gateway *gw, char *err, size_t errsz)
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
