/* Several gateways on one PostgreSQL store: the heartbeat, the
 * notifications, the reconcile and the cutover's acknowledgements (see
 * cluster.h and docs/design.md, "Several gateways").
 *
 * One libpq connection of the cluster's own, in non-blocking mode: its
 * socket is a uv_poll handle on the gateway's loop, and the queries go one
 * at a time from a queue, each answered through a callback. A query never
 * waits on the loop, and a lost connection only stops the queue: it is
 * made again after RECONNECT_MS, LISTENs again, and catches up (a full
 * reconcile) before the gateway routes a login again.
 *
 * The store's triggers (daemon/store.c, schema_pg_notify) number every
 * change of a user's state or policy, of a cutover request or of the
 * policies, and NOTIFY channel mailshift. A notification makes this
 * gateway reconcile at once; each heartbeat also compares the store's
 * change counter with the last one seen, so that a lost notification
 * only delays.
 */
#include "cluster.h"
#include "log.h"
#include "net.h"
#include "store.h"
#include "util.h"
#include "watchdog.h"

#include <ctype.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

/* a lost connection is made again this long after */
#define RECONNECT_MS 1000
/* a change may commit after a later-numbered one: each reconcile looks
 * this many numbers back, at users it may have seen already (what it does
 * for one is the same the second time) */
#define VERSION_OVERLAP 100
#define NOW_MS "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)"
#define MAX_PARAMS 4

struct ms_cluster;
typedef void query_done(struct ms_cluster *c, PGresult *res, void *arg);

/* A query waiting for the connection, or on the wire (the queue's head). */
struct cq {
	struct cq *next;
	const char *sql;
	int nparams;
	char *params[MAX_PARAMS];
	query_done *done;		/* res NULL: the connection was lost */
	void *arg;			/* freed after done */
	char *text;			/* sql when it is owned (freed) */
	int told;			/* done hears a loss (res NULL) too */
	PGresult *res;			/* the last result so far */
};

/* A user's row in the map: what routing a login reads of the users
 * table. */
struct muser {
	struct muser *next;
	int64_t id;
	char state[16];
	char policy[16];		/* "" = the configured default */
	char name[];
};

/* A user written through this gateway's store (id 0: one added): its
 * copy in the map is not trusted until a reconcile queued after the write
 * has read the users back. */
struct stale {
	struct stale *next;
	int64_t id;
	unsigned int gen;		/* c->gen at the write */
};

/* A user's cutover request as this gateway knows it. */
struct pending {
	struct pending *next;
	char user[256];
	int64_t seq;
	int mine;			/* asked by this gateway */
	int ready;			/* mine: every live gateway acked */
	int checking;			/* mine: a readiness query is queued */
	int seen;			/* in the last reconcile's rows */
	unsigned int born;		/* c->gen when it was made: a reconcile
					   queued before may not see it */
	char said[128];			/* the gateway said waited for last */
};

struct ms_cluster {
	uv_loop_t *loop;
	struct ms_store *store;
	char name[128];
	char *url;
	unsigned int heartbeat_ms, timeout_ms;
	const struct ms_cluster_ops *ops;
	void *ctx;
	struct ms_watchdog *wd;		/* the deadline, when the loop is held */

	PGconn *conn;
	int connected;			/* LISTENing, the queue runs */
	PostgresPollingStatusType polling;	/* while connecting */
	uv_poll_t *poll;
	int poll_fd;
	int poll_events;
	uv_timer_t *tick;		/* heartbeat, reconcile, readiness */
	uv_timer_t *retry;		/* a new connection */
	uv_timer_t *deadline;		/* when the others may fence this
					   gateway soon: its relays end */
	struct cq *head, *tail;
	int flushing;			/* output not all sent yet */
	int inflight;			/* the head is on the wire */

	uint64_t last_ok;		/* uv_now() when the last heartbeat
					   the database took was sent */
	unsigned int epoch;		/* counts the times it lost touch */
	int caught_up;			/* a reconcile of this epoch ended */
	int rec_failed;			/* a reconcile's read failed (a lock
					   waited for in vain): the next
					   heartbeat reconciles again */
	int ack_failed;			/* an acknowledgement was not written:
					   the next heartbeat reconciles */
	int fenced;			/* out of time: its relays ended, until
					   it has caught up */
	int reconcile_queued;
	unsigned int gen;		/* counts the reconciles queued */
	int64_t seen_version;		/* the newest user change seen */
	int64_t counter_seen;		/* the change counter, last seen */
	struct pending *pending;
	struct muser **map;		/* the users, by name's hash */
	size_t map_size, map_n;
	unsigned int map_epoch;		/* loaded in this epoch */
	int map_loading;		/* a load is queued */
	struct stale *stale;
	struct add *adds;		/* users to add to the store */
	int lost_said;			/* a lost connection was logged */
	int out_said;			/* out of time was logged */
};

/* A user the map does not hold, whose row is to be written (a first
 * login): tried again each heartbeat until it is in. */
struct add {
	struct add *next;
	int sent;			/* its INSERT is queued */
	int said;			/* a failure was logged */
	char name[];
};

static void conn_lost(struct ms_cluster *c, const char *why);
static void add_send(struct ms_cluster *c, struct add *a);
static void queue_run(struct ms_cluster *c);
static void reconcile(struct ms_cluster *c);

/* ---- pure logic ---- */

int ms_cluster_parse_ms(const char *s, unsigned int *ms_r)
{
	unsigned long long v = 0;
	const char *p = s;

	if (!isdigit((unsigned char)*p))
		return -1;
	while (isdigit((unsigned char)*p) && v <= 86400000ULL)
		v = v * 10 + (unsigned int)(*p++ - '0');
	if (!strcmp(p, "ms"))
		;
	else if (*p == '\0' || !strcmp(p, "s"))
		v *= 1000;
	else
		return -1;
	if (v > 86400000ULL)
		return -1;
	*ms_r = (unsigned int)v;
	return 0;
}

const char *ms_cluster_check(unsigned int heartbeat_ms,
			     unsigned int timeout_ms)
{
	if (heartbeat_ms < 100 || heartbeat_ms > 60000)
		return "heartbeat: from 100ms to 60s";
	if (timeout_ms > 600000)
		return "timeout: at most 10m";
	/* one heartbeat lost on the way is no reason to fence a gateway */
	if (timeout_ms < 3 * heartbeat_ms)
		return "timeout: at least three heartbeats";
	return NULL;
}

int ms_cluster_in_time(uint64_t now, uint64_t last_ok,
		       unsigned int heartbeat_ms, unsigned int timeout_ms)
{
	if (last_ok == 0 || now < last_ok)
		return last_ok != 0;
	return now - last_ok + heartbeat_ms < timeout_ms;
}

/* ---- the map (docs/design.md, "Several gateways", "The map") ---- */

static size_t map_slot(const struct ms_cluster *c, const char *name)
{
	return ms_str_hash(name) & (c->map_size - 1);
}

static struct muser *map_find(const struct ms_cluster *c, const char *name)
{
	if (c->map == NULL)
		return NULL;
	for (struct muser *u = c->map[map_slot(c, name)]; u != NULL;
	     u = u->next)
		if (!strcmp(u->name, name))
			return u;
	return NULL;
}

static void map_clear(struct ms_cluster *c)
{
	for (size_t i = 0; c->map != NULL && i < c->map_size; i++)
		while (c->map[i] != NULL) {
			struct muser *u = c->map[i];

			c->map[i] = u->next;
			free(u);
		}
	c->map_n = 0;
}

/* Twice the buckets when the chains grow long. */
static void map_grow(struct ms_cluster *c)
{
	size_t size = c->map_size != 0 ? c->map_size * 2 : 1024;
	struct muser **old = c->map, **map = calloc(size, sizeof(*map));
	size_t old_size = c->map_size;

	if (map == NULL)
		return;		/* longer chains: slower, not wrong */
	c->map = map;
	c->map_size = size;
	for (size_t i = 0; i < old_size; i++)
		while (old[i] != NULL) {
			struct muser *u = old[i];
			size_t h = map_slot(c, u->name);

			old[i] = u->next;
			u->next = map[h];
			map[h] = u;
		}
	free(old);
}

/* The user's row as the store has it now. -1: out of memory (the map
 * is then not trusted: see map_load). */
static int map_put(struct ms_cluster *c, int64_t id, const char *name,
		   const char *state, const char *policy)
{
	struct muser *u = map_find(c, name);

	if (u == NULL) {
		size_t len = strlen(name);

		if (c->map_n >= c->map_size * 2)
			map_grow(c);
		if (c->map == NULL ||
		    (u = calloc(1, sizeof(*u) + len + 1)) == NULL)
			return -1;
		memcpy(u->name, name, len + 1);
		u->next = c->map[map_slot(c, name)];
		c->map[map_slot(c, name)] = u;
		c->map_n++;
	}
	u->id = id;
	snprintf(u->state, sizeof(u->state), "%s", state);
	snprintf(u->policy, sizeof(u->policy), "%s", policy);
	return 0;
}

static int stale_has(const struct ms_cluster *c, int64_t id)
{
	for (const struct stale *s = c->stale; s != NULL; s = s->next)
		if (s->id == id)
			return 1;
	return 0;
}

/* The writes a reconcile queued as gen has read back. */
static void stale_clear(struct ms_cluster *c, unsigned int gen)
{
	for (struct stale **sp = &c->stale; *sp != NULL;) {
		struct stale *s = *sp;

		if (s->gen < gen) {
			*sp = s->next;
			free(s);
		} else {
			sp = &s->next;
		}
	}
}

/* ms_store_on_user_write: before this gateway writes a user (a flip, the
 * mover's states, mailshiftctl through the control socket). */
static void user_written(void *ctx, int64_t id)
{
	struct ms_cluster *c = ctx;
	struct stale *s;

	for (s = c->stale; s != NULL; s = s->next)
		if (s->id == id) {
			s->gen = c->gen;
			return;
		}
	if ((s = malloc(sizeof(*s))) == NULL) {
		c->map_epoch = c->epoch - 1;	/* not trusted: loaded again */
		return;
	}
	s->id = id;
	s->gen = c->gen;
	s->next = c->stale;
	c->stale = s;
}

int ms_cluster_user(const struct ms_cluster *c, const char *name,
		    struct ms_user_info *info)
{
	const struct muser *u;

	if (!ms_cluster_sure(c) || c->map_epoch != c->epoch)
		return -1;
	if ((u = map_find(c, name)) == NULL)
		return stale_has(c, 0) ? -1 : 0;
	if (stale_has(c, u->id))
		return -1;
	memset(info, 0, sizeof(*info));
	info->id = u->id;
	snprintf(info->name, sizeof(info->name), "%s", u->name);
	snprintf(info->state, sizeof(info->state), "%s", u->state);
	snprintf(info->policy, sizeof(info->policy), "%s", u->policy);
	return 1;
}

/* ---- the pending requests ---- */

static struct pending *pending_find(struct ms_cluster *c, const char *user)
{
	for (struct pending *p = c->pending; p != NULL; p = p->next)
		if (!strcmp(p->user, user))
			return p;
	return NULL;
}

static struct pending *pending_get(struct ms_cluster *c, const char *user)
{
	struct pending *p = pending_find(c, user);

	if (p != NULL)
		return p;
	if ((p = calloc(1, sizeof(*p))) == NULL)
		return NULL;
	snprintf(p->user, sizeof(p->user), "%s", user);
	p->born = c->gen;
	p->next = c->pending;
	c->pending = p;
	return p;
}

static void pending_drop(struct ms_cluster *c, struct pending *gone)
{
	for (struct pending **pp = &c->pending; *pp != NULL;
	     pp = &(*pp)->next)
		if (*pp == gone) {
			*pp = gone->next;
			free(gone);
			return;
		}
}

int ms_cluster_holds(const struct ms_cluster *c, const char *user)
{
	for (const struct pending *p = c->pending; p != NULL; p = p->next)
		if (!strcmp(p->user, user))
			return 1;
	return 0;
}

struct ms_watchdog *ms_cluster_watchdog(const struct ms_cluster *c)
{
	return c->wd;
}

int ms_cluster_sure(const struct ms_cluster *c)
{
	/* The loop's time as of now, not as of this turn's start: a call
	 * before this one may have held the loop past the deadline. */
	uv_update_time(c->loop);
	return c->connected && c->caught_up &&
	       ms_cluster_in_time(uv_now(c->loop), c->last_ok,
				  c->heartbeat_ms, c->timeout_ms);
}

/* ---- the query queue ---- */

static void cq_free(struct cq *q)
{
	for (int i = 0; i < q->nparams; i++)
		free(q->params[i]);
	free(q->text);
	PQclear(q->res);
	free(q->arg);
	free(q);
}

/* q at the queue's end, sent now when it is the head. */
static void cq_push(struct ms_cluster *c, struct cq *q)
{
	if (c->tail != NULL)
		c->tail->next = q;
	else
		c->head = q;
	c->tail = q;
	if (c->head == q)
		queue_run(c);
}

/* Queues sql with up to MAX_PARAMS text parameters (copied); arg is
 * freed after done. Nothing when there is no connection: what it would
 * have done is done again by the catch-up. */
static void query(struct ms_cluster *c, const char *sql, query_done *done,
		  void *arg, int nparams, ...)
{
	struct cq *q;
	va_list ap;

	if (!c->connected || (q = calloc(1, sizeof(*q))) == NULL) {
		free(arg);
		return;
	}
	q->sql = sql;
	q->done = done;
	q->arg = arg;
	va_start(ap, nparams);
	for (int i = 0; i < nparams && i < MAX_PARAMS; i++) {
		const char *v = va_arg(ap, const char *);

		q->params[q->nparams++] = strdup(v);
	}
	va_end(ap);
	cq_push(c, q);
}

static void watch(struct ms_cluster *c, int events);

/* Sends the head of the queue. */
static void queue_run(struct ms_cluster *c)
{
	struct cq *q = c->head;

	if (q == NULL || !c->connected || c->inflight)
		return;
	/* (a text of several statements, in one implicit transaction, goes
	 * as a simple query: it takes no parameters) */
	if (q->text != NULL ? !PQsendQuery(c->conn, q->text) :
	    !PQsendQueryParams(c->conn, q->sql, q->nparams, NULL,
			       (const char *const *)q->params, NULL, NULL, 0)) {
		conn_lost(c, PQerrorMessage(c->conn));
		return;
	}
	c->inflight = 1;
	c->flushing = PQflush(c->conn) == 1;
	watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
}

/* The head's results, as far as they have come. */
static void queue_read(struct ms_cluster *c)
{
	while (c->head != NULL && c->inflight && !PQisBusy(c->conn)) {
		struct cq *q = c->head;
		PGresult *res = PQgetResult(c->conn);

		if (res != NULL) {
			PQclear(q->res);
			q->res = res;
			continue;
		}
		c->head = q->next;
		if (c->head == NULL)
			c->tail = NULL;
		c->inflight = 0;
		q->done(c, q->res, q->arg);
		cq_free(q);
		if (c->conn == NULL || !c->connected)
			return;
		queue_run(c);
	}
}

static int res_ok(PGresult *res)
{
	ExecStatusType st = PQresultStatus(res);

	return res != NULL && (st == PGRES_TUPLES_OK ||
			       st == PGRES_COMMAND_OK);
}

static void res_warn(struct ms_cluster *c, const char *what, PGresult *res)
{
	const char *m = res != NULL ?
		PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;

	ms_warn("cluster: %s: %s", what, m != NULL ? m : "failed");
}

/* ---- notifications ---- */

static void ready_check(struct ms_cluster *c, struct pending *p);

static void notified(struct ms_cluster *c, const char *what)
{
	if (!strcmp(what, "p")) {
		c->ops->policies(c->ctx);
		return;
	}
	if (!strcmp(what, "a")) {
		for (struct pending *p = c->pending; p != NULL; p = p->next)
			if (p->mine && !p->ready)
				ready_check(c, p);
		return;
	}
	reconcile(c);
}

static void on_readable(struct ms_cluster *c)
{
	PGnotify *n;

	if (!PQconsumeInput(c->conn)) {
		conn_lost(c, PQerrorMessage(c->conn));
		return;
	}
	queue_read(c);
	while (c->conn != NULL && c->connected &&
	       (n = PQnotifies(c->conn)) != NULL) {
		notified(c, n->extra);
		PQfreemem(n);
	}
	if (c->conn != NULL && PQstatus(c->conn) == CONNECTION_BAD)
		conn_lost(c, PQerrorMessage(c->conn));
}

/* ---- the connection ---- */

static void on_poll(uv_poll_t *h, int status, int events);

/* The socket watched for events; a new socket (libpq may change it while
 * connecting) gets a new handle. */
static void watch(struct ms_cluster *c, int events)
{
	int fd = PQsocket(c->conn);

	if (c->poll != NULL && c->poll_fd != fd) {
		ms_close_free((uv_handle_t *)c->poll, c->poll);
		c->poll = NULL;
	}
	if (c->poll == NULL) {
		if (fd < 0 || (c->poll = malloc(sizeof(*c->poll))) == NULL)
			return;
		if (uv_poll_init(c->loop, c->poll, fd) != 0) {
			free(c->poll);
			c->poll = NULL;
			return;
		}
		c->poll->data = c;
		c->poll_fd = fd;
		c->poll_events = 0;
	}
	if (events != c->poll_events) {
		uv_poll_start(c->poll, events, on_poll);
		c->poll_events = events;
	}
}

static void on_retry(uv_timer_t *t);
static void heartbeat(struct ms_cluster *c);

static void conn_close(struct ms_cluster *c)
{
	struct cq *q;

	c->connected = 0;
	c->inflight = 0;
	c->caught_up = 0;
	c->epoch++;
	c->reconcile_queued = 0;
	while ((q = c->head) != NULL) {
		c->head = q->next;
		if (q->told)
			q->done(c, NULL, q->arg);
		cq_free(q);
	}
	c->tail = NULL;
	for (struct pending *p = c->pending; p != NULL; p = p->next)
		p->checking = 0;
	if (c->poll != NULL) {
		ms_close_free((uv_handle_t *)c->poll, c->poll);
		c->poll = NULL;
	}
	PQfinish(c->conn);
	c->conn = NULL;
}

static void conn_lost(struct ms_cluster *c, const char *why)
{
	char msg[256];
	size_t n;

	snprintf(msg, sizeof(msg), "%s", why != NULL ? why : "?");
	n = strlen(msg);
	while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
		msg[--n] = '\0';
	if (!c->lost_said)
		ms_warn("cluster: the connection to the database is lost (%s): "
			"logins whose state is not sure are held, then refused "
			"for now", msg);
	c->lost_said = 1;
	conn_close(c);
	uv_timer_start(c->retry, on_retry, RECONNECT_MS, 0);
}

static void on_listening(struct ms_cluster *c, PGresult *res, void *arg)
{
	if (!res_ok(res)) {
		conn_lost(c, "LISTEN failed");
		return;
	}
	if (c->lost_said)
		ms_info("cluster: connected to the database again");
	c->lost_said = 0;
	heartbeat(c);
	reconcile(c);
}

/* How long a statement here waits for a lock: half a heartbeat. */
static unsigned int lock_ms(const struct ms_cluster *c)
{
	return c->heartbeat_ms / 2 ? c->heartbeat_ms / 2 : 1;
}

static void on_lock_timeout(struct ms_cluster *c, PGresult *res, void *arg)
{
	if (!res_ok(res))
		res_warn(c, "lock_timeout", res);
}

/* Connected: LISTEN, then the heartbeat and a catch-up. Every statement
 * on this connection waits at most half a heartbeat for a lock (a table
 * another connection locked): one that waited longer would hold up the
 * queue, and the heartbeat behind it, until the others fence this
 * gateway. What fails so is tried again (the reconcile at the next
 * heartbeat). */
static void conn_up(struct ms_cluster *c)
{
	char ms[16];

	if (PQsetnonblocking(c->conn, 1) != 0) {
		conn_lost(c, PQerrorMessage(c->conn));
		return;
	}
	c->connected = 1;
	watch(c, UV_READABLE);
	query(c, "LISTEN mailshift", on_listening, NULL, 0);
	snprintf(ms, sizeof(ms), "%u", lock_ms(c));
	query(c, "SELECT set_config('lock_timeout', $1, false)",
	      on_lock_timeout, NULL, 1, ms);
}

static void connect_poll(struct ms_cluster *c)
{
	c->polling = PQconnectPoll(c->conn);
	switch (c->polling) {
	case PGRES_POLLING_OK:
		conn_up(c);
		return;
	case PGRES_POLLING_FAILED:
		conn_lost(c, PQerrorMessage(c->conn));
		return;
	case PGRES_POLLING_READING:
		watch(c, UV_READABLE);
		return;
	default:
		watch(c, UV_WRITABLE);
		return;
	}
}

static void on_poll(uv_poll_t *h, int status, int events)
{
	struct ms_cluster *c = h->data;

	if (c->conn == NULL || h != c->poll)
		return;
	if (!c->connected) {
		connect_poll(c);
		return;
	}
	if (status < 0) {
		conn_lost(c, uv_strerror(status));
		return;
	}
	if ((events & UV_WRITABLE) && c->flushing) {
		int r = PQflush(c->conn);

		if (r < 0) {
			conn_lost(c, PQerrorMessage(c->conn));
			return;
		}
		c->flushing = r == 1;
		watch(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
	}
	if (events & UV_READABLE)
		on_readable(c);
}

/* A connection begun; never waits (PQconnectStartParams). The bounds are
 * the store's (store_pg.c): the URL's own values come later and win. */
static void conn_start(struct ms_cluster *c)
{
	const char *keys[MS_PG_PARAMS], *vals[MS_PG_PARAMS];

	ms_store_pg_params(c->url, "mailshift-cluster", keys, vals);
	c->conn = PQconnectStartParams(keys, vals, 1);
	if (c->conn == NULL || PQstatus(c->conn) == CONNECTION_BAD) {
		conn_lost(c, c->conn != NULL ? PQerrorMessage(c->conn) :
			  "out of memory");
		return;
	}
	c->polling = PGRES_POLLING_WRITING;
	watch(c, UV_WRITABLE);
}

static void on_retry(uv_timer_t *t)
{
	struct ms_cluster *c = t->data;

	if (c->conn == NULL)
		conn_start(c);
}

/* ---- fencing itself ---- */

/* No heartbeat taken for the timeout minus one heartbeat: from now on
 * another gateway may fence this one, and flip (or roll back) a user
 * without its acknowledgement. Every session it relays ends now, before
 * they may (ops->fenced), and no login is routed until it has caught up:
 * nothing a client writes through it can land after the others' last
 * delta. */
static void out_of_time(struct ms_cluster *c)
{
	unsigned int shut;

	c->caught_up = 0;
	c->epoch++;
	if (c->fenced)
		return;
	c->fenced = 1;
	c->out_said = 1;
	ms_warn("cluster: no heartbeat taken for %llu ms: the other gateways "
		"may fence this one soon: its sessions end, logins are held "
		"until it has caught up",
		(unsigned long long)(uv_now(c->loop) - c->last_ok));
	shut = c->wd != NULL ? ms_watchdog_fired(c->wd) : 0;
	if (shut > 0)
		ms_warn("cluster: the loop was held past the deadline: the "
			"watchdog had shut %u relayed sessions down", shut);
	c->ops->fenced(c->ctx);
}

static void on_deadline(uv_timer_t *t);

/* The deadline from the last heartbeat taken: a timer of its own, not
 * the heartbeat's tick, which may come up to a heartbeat late. */
static void deadline_arm(struct ms_cluster *c)
{
	uint64_t now = uv_now(c->loop);
	uint64_t due = c->last_ok + c->timeout_ms - c->heartbeat_ms;

	uv_timer_start(c->deadline, on_deadline, due > now ? due - now : 0, 0);
	/* Half a heartbeat later: a loop that runs ends the sessions itself
	 * (with a BYE) first; still half a heartbeat before the others may
	 * fence this gateway. */
	if (c->wd != NULL)
		ms_watchdog_arm(c->wd, due + c->heartbeat_ms / 2);
}

static void on_deadline(uv_timer_t *t)
{
	struct ms_cluster *c = t->data;

	if (ms_cluster_in_time(uv_now(c->loop), c->last_ok, c->heartbeat_ms,
			       c->timeout_ms))
		deadline_arm(c);
	else
		out_of_time(c);
}

/* ---- the heartbeat ---- */

static void on_heartbeat(struct ms_cluster *c, PGresult *res, void *arg)
{
	uint64_t sent = *(uint64_t *)arg;

	if (!res_ok(res)) {
		res_warn(c, "heartbeat", res);
		return;
	}
	/* Out of time before this one: what the others did meanwhile is
	 * caught up with before a login is routed again. */
	if (!ms_cluster_in_time(sent, c->last_ok, c->heartbeat_ms,
				c->timeout_ms))
		out_of_time(c);
	if (sent > c->last_ok)
		c->last_ok = sent;
	deadline_arm(c);
	if (c->out_said)
		ms_info("cluster: heartbeat taken again");
	c->out_said = 0;
	if (!c->caught_up || c->ack_failed || c->rec_failed)
		reconcile(c);
}

static void heartbeat(struct ms_cluster *c)
{
	unsigned int sessions = 0, copies = 0;
	uint64_t *sent = malloc(sizeof(*sent));
	char s[16], k[16];

	if (sent == NULL)
		return;
	*sent = uv_now(c->loop);
	c->ops->counts(c->ctx, &sessions, &copies);
	snprintf(s, sizeof(s), "%u", sessions);
	snprintf(k, sizeof(k), "%u", copies);
	query(c, "INSERT INTO gateways (name, started, heartbeat, sessions,"
	      " copies) VALUES ($1, " NOW_MS ", " NOW_MS ", $2, $3)"
	      " ON CONFLICT (name) DO UPDATE SET heartbeat ="
	      " excluded.heartbeat, sessions = excluded.sessions,"
	      " copies = excluded.copies", on_heartbeat, sent, 3, c->name, s,
	      k);
}

/* ---- the reconcile ---- */

struct rec_arg {
	unsigned int epoch;		/* c->epoch when it was queued */
	unsigned int gen;
};

static void on_acked_row(struct ms_cluster *c, PGresult *res, void *arg)
{
	if (!res_ok(res)) {
		res_warn(c, "acknowledgement", res);
		c->ack_failed = 1;
	}
}

/* The acknowledgement of p's request written (again: an upsert). */
static void ack_write(struct ms_cluster *c, struct pending *p)
{
	char seq[24];

	snprintf(seq, sizeof(seq), "%" PRId64, p->seq);
	query(c, "INSERT INTO cutover_acks (user_id, seq, gateway, at)"
	      " SELECT r.user_id, r.seq, $3, " NOW_MS " FROM cutover_requests"
	      " r JOIN users u ON u.id = r.user_id WHERE u.name = $1 AND"
	      " r.seq = $2 ON CONFLICT (user_id, gateway) DO UPDATE SET"
	      " seq = excluded.seq, at = excluded.at", on_acked_row, NULL, 3,
	      p->user, seq, c->name);
}

/* A request this gateway has not acknowledged: the user's sessions to a
 * server end here, its logins are held (the pending entry), then the
 * acknowledgement is written. */
static void acknowledge(struct ms_cluster *c, struct pending *p,
			const char *kind, const char *by)
{
	ms_info("%s: %s asked by gateway %s: its logins held here, its "
		"sessions ended", p->user, kind, by);
	c->ops->hold(c->ctx, p->user);
	ack_write(c, p);
}

static void request_row(struct ms_cluster *c, PGresult *res, int row)
{
	const char *user = PQgetvalue(res, row, 0);
	int64_t seq = strtoll(PQgetvalue(res, row, 1), NULL, 10);
	const char *by = PQgetvalue(res, row, 2);
	const char *kind = PQgetvalue(res, row, 3);
	int acked = !strcmp(PQgetvalue(res, row, 4), "t");
	struct pending *p = pending_find(c, user);
	int fresh = p == NULL || p->seq != seq;

	if (p == NULL && (p = pending_get(c, user)) == NULL)
		return;
	p->seen = 1;
	if (fresh) {
		p->seq = seq;
		p->mine = !strcmp(by, c->name);
		p->ready = 0;
		p->said[0] = '\0';
	}
	/* Its own request too: the sessions the cutover's own gateway has
	 * of the user are ended the same way (it has none but a
	 * rollback's, which it ended already). */
	if (fresh && !p->mine && !acked)
		acknowledge(c, p, kind, by);
	else if (!p->mine && !acked)
		/* held here already, and the acknowledgement was sent, but
		 * the store does not have it: lost with the connection (the
		 * database restarted as it went), or still on its way (the
		 * write is an upsert). Without it the cutover would wait on
		 * a live gateway for good. */
		ack_write(c, p);
	else if (fresh && !p->mine)
		c->ops->hold(c->ctx, p->user);	/* acked before a restart */
	if (p->mine && !p->ready)
		ready_check(c, p);
}

static void on_requests(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct rec_arg *ra = arg;
	struct pending *p, *next;

	c->reconcile_queued = 0;
	if (!res_ok(res)) {
		res_warn(c, "reconcile", res);
		c->rec_failed = 1;
		return;
	}
	c->ack_failed = 0;	/* written again below where still missing */
	for (p = c->pending; p != NULL; p = p->next)
		p->seen = 0;
	for (int i = 0; i < PQntuples(res); i++)
		request_row(c, res, i);
	/* Requests gone: the user flipped (or it was given up); held
	 * logins go on. */
	for (p = c->pending; p != NULL; p = next) {
		char user[256];

		next = p->next;
		if (p->seen || p->born >= ra->gen)
			continue;
		snprintf(user, sizeof(user), "%s", p->user);
		pending_drop(c, p);
		c->ops->settled(c->ctx, user);
	}
	if (ra->epoch == c->epoch && !c->caught_up &&
	    c->map_epoch == c->epoch && ms_cluster_in_time(uv_now(c->loop), c->last_ok, c->heartbeat_ms,
			       c->timeout_ms)) {
		c->caught_up = 1;
		c->fenced = 0;
		ms_info("cluster: caught up with the store");
	}
}

static void on_changes(struct ms_cluster *c, PGresult *res, void *arg)
{
	int64_t top = c->seen_version;

	if (!res_ok(res)) {
		res_warn(c, "reconcile", res);
		c->rec_failed = 1;
		return;
	}
	for (int i = 0; i < PQntuples(res); i++) {
		int64_t v = strtoll(PQgetvalue(res, i, 2), NULL, 10);

		/* the map first: the sessions ended next log in again */
		if (map_put(c, strtoll(PQgetvalue(res, i, 3), NULL, 10),
			    PQgetvalue(res, i, 0), PQgetvalue(res, i, 1),
			    PQgetvalue(res, i, 4)) < 0)
			c->map_epoch = c->epoch - 1;	/* loaded again */
		c->ops->changed(c->ctx, PQgetvalue(res, i, 0),
				PQgetvalue(res, i, 1));
		if (v > top)
			top = v;
	}
	c->seen_version = top;
	stale_clear(c, *(unsigned int *)arg);
}

/* The whole map, read again at each catch-up (the first at start): a
 * change this gateway missed while it was out of touch is in it. */
static void on_users(struct ms_cluster *c, PGresult *res, void *arg)
{
	unsigned int epoch = *(unsigned int *)arg;

	c->map_loading = 0;
	if (!res_ok(res)) {
		res_warn(c, "the users", res);
		return;
	}
	map_clear(c);
	for (int i = 0; i < PQntuples(res); i++)
		if (map_put(c, strtoll(PQgetvalue(res, i, 0), NULL, 10),
			    PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
			    PQgetvalue(res, i, 3)) < 0) {
			ms_warn("cluster: the users: out of memory");
			return;
		}
	c->map_epoch = epoch;
}

static void map_load(struct ms_cluster *c)
{
	unsigned int *epoch;

	if (c->map_loading || (epoch = malloc(sizeof(*epoch))) == NULL)
		return;
	*epoch = c->epoch;
	c->map_loading = 1;
	query(c, "SELECT id, name, state, COALESCE(policy, '') FROM users",
	      on_users, epoch, 0);
	if (!c->connected)
		c->map_loading = 0;
}

/* What changed since the last reconcile (users whose state or policy
 * changed, with an overlap), then every request under way; first the
 * whole map when this gateway is catching up. Not inside a transaction
 * of the store's: its queries would not see what the transaction writes
 * and would be taken as having read it back. */
static void reconcile(struct ms_cluster *c)
{
	struct rec_arg *ra;
	unsigned int *gen;
	char since[24];

	if (c->reconcile_queued || ms_store_in_transaction(c->store) ||
	    (ra = malloc(sizeof(*ra))) == NULL)
		return;
	if ((gen = malloc(sizeof(*gen))) == NULL) {
		free(ra);
		return;
	}
	if (c->map_epoch != c->epoch)
		map_load(c);
	ra->epoch = c->epoch;
	ra->gen = *gen = ++c->gen;
	c->reconcile_queued = 1;
	c->rec_failed = 0;		/* set again if this one fails */
	snprintf(since, sizeof(since), "%" PRId64,
		 c->seen_version > VERSION_OVERLAP ?
		 c->seen_version - VERSION_OVERLAP : 0);
	query(c, "SELECT u.name, u.state, c.version, u.id,"
	      " COALESCE(u.policy, '') FROM user_changes c"
	      " JOIN users u ON u.id = c.user_id WHERE c.version > $1"
	      " ORDER BY c.version", on_changes, gen, 1, since);
	query(c, "SELECT u.name, r.seq, r.gateway, r.kind, EXISTS (SELECT 1"
	      " FROM cutover_acks a WHERE a.user_id = r.user_id AND"
	      " a.seq = r.seq AND a.gateway = $1) FROM cutover_requests r"
	      " JOIN users u ON u.id = r.user_id", on_requests, ra, 1,
	      c->name);
	if (!c->connected)
		c->reconcile_queued = 0;
}

/* The store's change counter against the last one seen: a notification
 * lost (or one this gateway was not connected for) only delays. */
static void on_counter(struct ms_cluster *c, PGresult *res, void *arg)
{
	int64_t v;

	if (!res_ok(res) || PQntuples(res) != 1) {
		res_warn(c, "change counter", res);
		return;
	}
	v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	if (v != c->counter_seen) {
		c->counter_seen = v;
		c->ops->policies(c->ctx);
		reconcile(c);
	}
}

/* ---- this gateway's own requests ---- */

struct ready_arg {
	char user[256];
	int64_t seq;
};

static void on_ready(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct ready_arg *ra = arg;
	struct pending *p = pending_find(c, ra->user);
	int waiting = 0;

	if (p == NULL || p->seq != ra->seq || !p->mine)
		return;
	p->checking = 0;
	if (!res_ok(res)) {
		res_warn(c, "acknowledgements", res);
		return;
	}
	for (int i = 0; i < PQntuples(res); i++) {
		const char *gw = PQgetvalue(res, i, 0);
		long long age = strtoll(PQgetvalue(res, i, 1), NULL, 10);

		if (age <= (long long)c->timeout_ms) {
			if (!waiting && strcmp(p->said, gw) != 0) {
				ms_info("%s: waiting for gateway %s to "
					"acknowledge", p->user, gw);
				snprintf(p->said, sizeof(p->said), "%s", gw);
			}
			waiting = 1;
			continue;
		}
		ms_warn("%s: gateway %s fenced: no heartbeat for %lld ms "
			"(timeout %u ms): not waited for", p->user, gw, age,
			c->timeout_ms);
	}
	if (waiting || p->ready)
		return;
	p->ready = 1;
	ms_info("%s: every live gateway acknowledged", p->user);
	c->ops->acked(c->ctx, p->user);
}

/* The gateways that have not acknowledged p, with the age of their last
 * heartbeat (the database's clock): past the timeout, fenced. */
static void ready_check(struct ms_cluster *c, struct pending *p)
{
	struct ready_arg *ra;
	char seq[24];

	if (p->checking || !c->connected ||
	    (ra = malloc(sizeof(*ra))) == NULL)
		return;
	snprintf(ra->user, sizeof(ra->user), "%s", p->user);
	ra->seq = p->seq;
	p->checking = 1;
	snprintf(seq, sizeof(seq), "%" PRId64, p->seq);
	query(c, "SELECT g.name, " NOW_MS " - g.heartbeat FROM gateways g"
	      " WHERE g.name <> $3 AND NOT EXISTS (SELECT 1 FROM cutover_acks"
	      " a JOIN users u ON u.id = a.user_id WHERE u.name = $1 AND"
	      " a.seq = $2 AND a.gateway = g.name) ORDER BY g.name", on_ready,
	      ra, 3, p->user, seq, c->name);
}

int ms_cluster_request(struct ms_cluster *c, struct ms_store *store,
		       int64_t user_id, const char *user, const char *kind)
{
	struct pending *p;
	int64_t seq = 0;

	if (ms_store_cutover_request(store, user_id, c->name, kind, &seq) < 0)
		return -1;
	if ((p = pending_get(c, user)) == NULL)
		return -1;
	p->seq = seq;
	p->mine = 1;
	p->ready = 0;
	p->checking = 0;
	p->said[0] = '\0';
	return 0;
}

int ms_cluster_ready(struct ms_cluster *c, const char *user)
{
	struct pending *p = pending_find(c, user);

	if (p == NULL || !p->mine)
		return 0;
	if (!p->ready)
		ready_check(c, p);
	return p->ready;
}

void ms_cluster_settle(struct ms_cluster *c, const char *user)
{
	struct pending *p = pending_find(c, user);

	if (p != NULL)
		pending_drop(c, p);
}

/* ---- the timer: each heartbeat ---- */

static void on_tick(uv_timer_t *t)
{
	struct ms_cluster *c = t->data;

	/* (a socket libpq never gave: begun again) */
	if (c->conn == NULL && !uv_is_active((uv_handle_t *)c->retry))
		conn_start(c);
	if (!c->connected)
		return;
	if (c->caught_up && !ms_cluster_in_time(uv_now(c->loop), c->last_ok,
						c->heartbeat_ms,
						c->timeout_ms))
		out_of_time(c);
	heartbeat(c);
	query(c, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END"
	      " FROM changes", on_counter, NULL, 0);
	for (struct pending *p = c->pending; p != NULL; p = p->next)
		if (p->mine && !p->ready)
			ready_check(c, p);
	for (struct add *a = c->adds; a != NULL; a = a->next)
		if (!a->sent)
			add_send(c, a);
}

/* ---- jobs on this connection (docs/design.md, "Jobs and leases") ----
 *
 * The jobs' timer's claim and lease renewals, and the survey's look for
 * its next user, go here rather than on the store's blocking connection: a users table locked or slow by someone
 * else then delays them, not the gateway's loop. Each is one text of
 * statements, one implicit transaction, sent as a simple query with its
 * values quoted by libpq (PQescapeLiteral). Each starts with a lock
 * timeout of half a heartbeat: one waiting for a lock fails soon
 * instead of holding up the heartbeat queued behind it (the gateway
 * would fence itself); the timer tries again at its next turn, as after
 * any failure. Each caller hears the end (done) exactly once, also when
 * the connection is lost: a claim whose answer was lost may have
 * committed, and its jobs, not renewed, are taken over once their lease
 * has run out, as a dead gateway's are. */

struct job_q {
	ms_cluster_claimed *claimed;
	ms_cluster_renewed *renewed;
	ms_cluster_jobs_done *done;
	ms_cluster_sized *sized;
	void *ctx;
	unsigned int n;			/* renew: the users asked */
	char **users;
};

static void job_q_free(struct job_q *j)
{
	for (unsigned int i = 0; j->users != NULL && i < j->n; i++)
		free(j->users[i]);
	free(j->users);
}

/* Queues text (taken over), its end told through done whatever
 * happens; arg is freed after done. */
static void text_query(struct ms_cluster *c, char *text, query_done *done,
		       void *arg)
{
	struct cq *q;

	if (text == NULL || !c->connected ||
	    (q = calloc(1, sizeof(*q))) == NULL) {
		free(text);
		done(c, NULL, arg);
		free(arg);
		return;
	}
	q->text = text;
	q->done = done;
	q->arg = arg;
	q->told = 1;
	cq_push(c, q);
}

/* "SET LOCAL lock_timeout" (lock_ms()) and fmt's text, or NULL. */
static char *job_text(struct ms_cluster *c, const char *fmt, ...)
{
	char *text = NULL, *body = NULL;
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vasprintf(&body, fmt, ap);
	va_end(ap);
	if (r < 0)
		return NULL;
	if (asprintf(&text, "SET LOCAL lock_timeout = %u; %s", lock_ms(c),
		     body) < 0)
		text = NULL;
	free(body);
	return text;
}

/* A value quoted for the text, or NULL. */
static char *literal(struct ms_cluster *c, const char *v)
{
	char *l, *copy;

	if (c->conn == NULL || (l = PQescapeLiteral(c->conn, v,
						    strlen(v))) == NULL)
		return NULL;
	copy = strdup(l);
	PQfreemem(l);
	return copy;
}

static const char *job_error(PGresult *res)
{
	if (res == NULL)
		return "the cluster's connection to the database is lost";
	return PQresultErrorMessage(res);
}

/* ---- users added on this connection (a first login) ---- */

static struct add *add_find(struct ms_cluster *c, const char *name,
			    struct add ***prev_r)
{
	struct add **pp = &c->adds;

	for (; *pp != NULL; pp = &(*pp)->next)
		if (!strcmp((*pp)->name, name))
			break;
	if (prev_r != NULL)
		*prev_r = pp;
	return *pp;
}

static void on_added(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct add **pp, *a = add_find(c, arg, &pp);

	if (a == NULL)
		return;
	a->sent = 0;
	if (res == NULL || PQresultStatus(res) != PGRES_COMMAND_OK) {
		/* (a lock held past half a heartbeat, the connection lost:
		 * again at the next heartbeat) */
		if (!a->said)
			ms_warn("cluster: user %s: store: %s: written again "
				"at the next heartbeat", a->name,
				job_error(res));
		a->said = 1;
		return;
	}
	*pp = a->next;
	free(a);
}

static void add_send(struct ms_cluster *c, struct add *a)
{
	char *name = literal(c, a->name), *arg = strdup(a->name);

	if (name == NULL || arg == NULL) {
		free(name);
		free(arg);
		return;
	}
	a->sent = 1;
	text_query(c, job_text(c, "INSERT INTO users (name, updated_at) "
			       "VALUES (%s, %lld) ON CONFLICT (name) DO "
			       "NOTHING", name, (long long)time(NULL)),
		   on_added, arg);
	free(name);
}

void ms_cluster_user_add(struct ms_cluster *c, const char *name)
{
	struct add *a = add_find(c, name, NULL);

	if (a == NULL) {
		if ((a = calloc(1, sizeof(*a) + strlen(name) + 1)) == NULL)
			return;
		strcpy(a->name, name);
		a->next = c->adds;
		c->adds = a;
	}
	if (!a->sent)
		add_send(c, a);
}

static void on_claimed(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct job_q *j = arg;
	int n;

	(void)c;
	if (!res_ok(res)) {
		j->done(j->ctx, job_error(res), 0);
		return;
	}
	/* told after the commit (the answer comes after it): the callback
	 * starts copies */
	n = PQntuples(res);
	for (int i = 0; i < n; i++)
		j->claimed(j->ctx, PQgetvalue(res, i, 0),
			   PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
			   PQgetvalue(res, i, 3));
	j->done(j->ctx, NULL, (unsigned int)n);
}

void ms_cluster_job_claim(struct ms_cluster *c, const char *owner,
			  unsigned int lease_ms, unsigned int max, int queued,
			  ms_cluster_claimed *claimed,
			  ms_cluster_jobs_done *done, void *ctx)
{
	struct job_q *j = calloc(1, sizeof(*j));
	char *o = literal(c, owner), *text = NULL, *enq = NULL;

	if (j == NULL) {
		free(o);
		done(ctx, "out of memory", 0);
		return;
	}
	j->claimed = claimed;
	j->done = done;
	j->ctx = ctx;
	/* The same statements as ms_store_job_enqueue() and _claim(), the
	 * claim's select and update made one (the rows stay locked
	 * between them, as in the store's transaction). */
	if (queued && asprintf(&enq, MS_JOB_ENQUEUE_NEW "; "
			       MS_JOB_ENQUEUE_AGAIN "; ", NOW_MS, NOW_MS) < 0)
		enq = NULL;
	if (o != NULL && (enq != NULL || !queued))
		text = job_text(c, "%s"
			"WITH c AS (SELECT j.user_id, u.name, j.kind,"
			" coalesce(j.owner, '') AS owner, j.state FROM jobs j"
			" JOIN users u ON u.id = j.user_id WHERE (j.state ="
			" 'running' AND j.lease_until < " NOW_MS ")%s"
			" ORDER BY u.name LIMIT %u FOR UPDATE OF j SKIP LOCKED),"
			" t AS (UPDATE jobs SET state = 'running', owner = %s,"
			" lease_until = " NOW_MS " + %u, attempts ="
			" jobs.attempts + 1, updated_at = " NOW_MS " FROM c"
			" WHERE jobs.user_id = c.user_id RETURNING c.name,"
			" c.kind, c.state, c.owner)"
			" SELECT name, kind, state, owner FROM t ORDER BY name",
			queued ? enq : "",
			queued ? " OR j.state = 'queued'" : "", max, o,
			lease_ms);
	free(o);
	free(enq);
	text_query(c, text, on_claimed, j);
}

static void on_size_next(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct job_q *j = arg;

	(void)c;
	if (!res_ok(res))
		j->sized(j->ctx, job_error(res), NULL);
	else
		j->sized(j->ctx, NULL, PQntuples(res) > 0 ?
			 PQgetvalue(res, 0, 0) : "");
}

void ms_cluster_size_next(struct ms_cluster *c, ms_cluster_sized *sized,
			  void *ctx)
{
	struct job_q *j = calloc(1, sizeof(*j));

	if (j == NULL) {
		sized(ctx, "out of memory", NULL);
		return;
	}
	j->sized = sized;
	j->ctx = ctx;
	text_query(c, job_text(c, "%s", MS_SIZE_NEXT_SQL), on_size_next, j);
}

/* ---- writes that wait on nothing (the survey's sizes, the source's
 * uses) ---- */

struct write_q {
	ms_cluster_written *done;
	void *ctx;
};

static void on_written(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct write_q *w = arg;

	(void)c;
	w->done(w->ctx, res_ok(res) ? NULL : job_error(res));
}

/* text (taken over: NULL when it could not be made) queued; done told. */
static void write_text(struct ms_cluster *c, char *text,
		       ms_cluster_written *done, void *ctx)
{
	struct write_q *w = calloc(1, sizeof(*w));

	if (w == NULL || text == NULL) {
		free(w);
		free(text);
		done(ctx, "out of memory");
		return;
	}
	w->done = done;
	w->ctx = ctx;
	text_query(c, text, on_written, w);
}

struct policies_q {
	int (*row)(void *ctx, const char *scope, const char *policy);
	ms_cluster_written *done;
	void *ctx;
};

static void on_policies(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct policies_q *q = arg;

	(void)c;
	if (!res_ok(res) || PQnfields(res) != 2) {
		q->done(q->ctx, job_error(res));
		return;
	}
	for (int r = 0; r < PQntuples(res); r++)
		q->row(q->ctx, PQgetvalue(res, r, 0), PQgetvalue(res, r, 1));
	q->done(q->ctx, NULL);
}

void ms_cluster_policies(struct ms_cluster *c,
			 int (*row)(void *ctx, const char *scope,
				    const char *policy),
			 ms_cluster_written *done, void *ctx)
{
	struct policies_q *q = calloc(1, sizeof(*q));

	if (q == NULL) {
		done(ctx, "out of memory");
		return;
	}
	q->row = row;
	q->done = done;
	q->ctx = ctx;
	text_query(c, job_text(c, "SELECT scope, policy FROM policies ORDER "
			       "BY scope"), on_policies, q);
}

void ms_cluster_size_set(struct ms_cluster *c, const char *user,
			 const struct ms_user_size *sz,
			 ms_cluster_written *done, void *ctx)
{
	char *name, *how, *text = NULL;

	if (!c->connected) {
		done(ctx, job_error(NULL));
		return;
	}
	name = literal(c, user);
	how = literal(c, sz->how);
	if (name != NULL && how != NULL)
		text = job_text(c, "INSERT INTO user_sizes (user_id, messages,"
				" bytes, how, at) SELECT id, %lld, %lld, %s, "
				"%lld FROM users WHERE name = %s ON CONFLICT "
				"(user_id) DO UPDATE SET messages = "
				"excluded.messages, bytes = excluded.bytes, "
				"how = excluded.how, at = excluded.at",
				(long long)sz->messages, (long long)sz->bytes,
				how, (long long)(sz->at != 0 ? sz->at :
						 (int64_t)time(NULL)), name);
	free(name);
	free(how);
	write_text(c, text, done, ctx);
}

void ms_cluster_source_uses(struct ms_cluster *c,
			    const struct ms_source_use *u, size_t n,
			    ms_cluster_written *done, void *ctx)
{
	char *body = NULL;
	size_t len = 0;
	int ok = 1;
	FILE *f;

	if (!c->connected) {
		done(ctx, job_error(NULL));
		return;
	}
	if ((f = open_memstream(&body, &len)) == NULL) {
		done(ctx, "out of memory");
		return;
	}
	for (size_t i = 0; ok && i < n; i++) {
		char *key = literal(c, u[i].key), *kind = literal(c, u[i].kind);
		char *name = literal(c, u[i].name);

		ok = key != NULL && kind != NULL && name != NULL;
		if (ok)
			fprintf(f, "%sINSERT INTO source_use (key, kind, name,"
				" at, slack) VALUES (%s, %s, %s, %lld, %lld) "
				"ON CONFLICT (key, kind) DO UPDATE SET name = "
				"excluded.name, at = excluded.at, slack = "
				"excluded.slack WHERE source_use.at <= "
				"excluded.at", i > 0 ? "; " : "", key, kind,
				name, (long long)u[i].at,
				(long long)u[i].slack);
		free(key);
		free(kind);
		free(name);
	}
	ok = fclose(f) == 0 && ok;
	/* (the jobs' lock timeout first, as for every text here) */
	write_text(c, ok ? job_text(c, "%s", body) : NULL, done, ctx);
	free(body);
}

static void on_renewed(struct ms_cluster *c, PGresult *res, void *arg)
{
	struct job_q *j = arg;

	(void)c;
	if (!res_ok(res)) {
		j->done(j->ctx, job_error(res), 0);
		job_q_free(j);
		return;
	}
	for (unsigned int i = 0; i < j->n; i++) {
		int held = 0;

		for (int r = 0; r < PQntuples(res) && !held; r++)
			held = !strcmp(PQgetvalue(res, r, 0), j->users[i]);
		j->renewed(j->ctx, i, held);
	}
	j->done(j->ctx, NULL, j->n);
	job_q_free(j);
}

/* users' names quoted, separated by commas, or NULL. */
static char *literal_list(struct ms_cluster *c, char *const *users,
			  unsigned int n)
{
	size_t len = 1, at = 0;
	char **l = calloc(n, sizeof(*l));
	char *list = NULL;
	unsigned int i;

	for (i = 0; l != NULL && i < n; i++) {
		if ((l[i] = literal(c, users[i])) == NULL)
			break;
		len += strlen(l[i]) + 1;
	}
	if (l != NULL && i == n && (list = malloc(len)) != NULL)
		for (i = 0; i < n; i++)
			at += (size_t)sprintf(list + at, "%s%s", i ? "," : "",
					      l[i]);
	for (i = 0; l != NULL && i < n; i++)
		free(l[i]);
	free(l);
	return list;
}

void ms_cluster_job_renew(struct ms_cluster *c, const char *owner,
			  unsigned int lease_ms, const char *const *users,
			  unsigned int n, ms_cluster_renewed *renewed,
			  ms_cluster_jobs_done *done, void *ctx)
{
	struct job_q *j = calloc(1, sizeof(*j));
	char *o = literal(c, owner), *list = NULL, *text = NULL;
	unsigned int i;

	if (j == NULL || (j->users = calloc(n ? n : 1,
					    sizeof(*j->users))) == NULL) {
		free(j);
		free(o);
		done(ctx, "out of memory", 0);
		return;
	}
	for (i = 0; i < n && (j->users[i] = strdup(users[i])) != NULL; i++)
		;
	j->n = i;
	j->renewed = renewed;
	j->done = done;
	j->ctx = ctx;
	if (o != NULL && i == n &&
	    (list = literal_list(c, j->users, n)) != NULL)
		text = job_text(c, "UPDATE jobs SET lease_until = " NOW_MS
				" + %u FROM users u WHERE u.id = jobs.user_id"
				" AND u.name IN (%s) AND jobs.owner = %s AND"
				" jobs.state = 'running' RETURNING u.name",
				lease_ms, list, o);
	free(o);
	free(list);
	text_query(c, text, on_renewed, j);
}

/* ---- start and stop ---- */

int ms_cluster_new(uv_loop_t *loop, struct ms_store *store,
		   const struct ms_cluster_cfg *cfg,
		   const struct ms_cluster_ops *ops, void *ctx,
		   struct ms_cluster **c_r, char *err, size_t errsz)
{
	struct ms_cluster *c;

	*c_r = NULL;
	/* The first heartbeat, with the store's own connection: a start
	 * that cannot reach the database says so. */
	if (ms_store_gateway_register(store, cfg->name) < 0) {
		snprintf(err, errsz, "gateway %s: store: %s", cfg->name,
			 ms_store_error(store));
		return -1;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL || (c->url = strdup(cfg->url)) == NULL ||
	    (c->tick = malloc(sizeof(*c->tick))) == NULL ||
	    (c->retry = malloc(sizeof(*c->retry))) == NULL ||
	    (c->deadline = malloc(sizeof(*c->deadline))) == NULL) {
		if (c != NULL) {
			free(c->url);
			free(c->tick);
			free(c->retry);
		}
		free(c);
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	c->loop = loop;
	c->store = store;
	snprintf(c->name, sizeof(c->name), "%s", cfg->name);
	c->heartbeat_ms = cfg->heartbeat_ms;
	c->timeout_ms = cfg->timeout_ms;
	c->ops = ops;
	c->ctx = ctx;
	uv_timer_init(loop, c->tick);
	uv_timer_init(loop, c->retry);
	uv_timer_init(loop, c->deadline);
	c->tick->data = c->retry->data = c->deadline->data = c;
	c->last_ok = uv_now(loop);
	if (c->last_ok == 0)
		c->last_ok = 1;
	if (ms_watchdog_new(&c->wd) < 0)
		ms_warn("cluster: no watchdog thread: a loop held in a blocking "
			"call would end its relays late");
	deadline_arm(c);
	c->map_epoch = c->epoch - 1;	/* not loaded yet */
	ms_store_on_user_write(store, user_written, c);
	conn_start(c);
	uv_timer_start(c->tick, on_tick, c->heartbeat_ms, c->heartbeat_ms);
	*c_r = c;
	return 0;
}

void ms_cluster_free(struct ms_cluster **cp)
{
	struct ms_cluster *c = *cp;

	if (c == NULL)
		return;
	*cp = NULL;
	if (c->conn != NULL)
		conn_close(c);
	/* A clean stop: nobody waits for this gateway's acknowledgement. */
	if (ms_store_gateway_remove(c->store, c->name) < 0)
		ms_warn("cluster: store: %s", ms_store_error(c->store));
	ms_close_free((uv_handle_t *)c->tick, c->tick);
	ms_close_free((uv_handle_t *)c->retry, c->retry);
	ms_close_free((uv_handle_t *)c->deadline, c->deadline);
	ms_watchdog_free(c->wd);
	while (c->pending != NULL)
		pending_drop(c, c->pending);
	ms_store_on_user_write(c->store, NULL, NULL);
	map_clear(c);
	free(c->map);
	stale_clear(c, UINT_MAX);
	while (c->adds != NULL) {
		struct add *a = c->adds;

		c->adds = a->next;
		free(a);
	}
	free(c->url);
	free(c);
}
