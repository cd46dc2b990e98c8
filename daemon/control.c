/* The control socket: a UNIX socket, one JSON object per line each way
 * (docs/gateway-spec.md). Only root, the daemon's own user and members of
 * [control] group may talk (checked on the peer's credentials, not only on
 * the socket's mode). Input is bounded: a request line, the replies a
 * client leaves unread, the number of clients. A bad request gets
 * {"ok": false, "error": ...}, changes nothing, and the connection stays
 * usable. The reads of status and sessions go to the store's reader
 * (reader.h): the client's reply waits for them, the loop does not; so
 * does migrate --all's walk of the map, whose starts then run a slice of
 * the loop's turn at a time; a client's pipelined requests are handled a
 * slice of a turn at a time too. */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <jansson.h>

#include "control.h"
#include "net.h"
#include "reader.h"
#include "util.h"
#include "log.h"
#include "steer.h"

#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59	/* Linux 4.13; older libc headers lack it */
#endif

#define REQ_MAX (64 * 1024)		/* a request line, without its '\n' */
#define UNREAD_MAX (1024 * 1024)	/* replies queued before reading stops */
#define CLIENTS_MAX 64
/* A turn of the loop spends about this long on a client's requests, or
 * on migrate --all's starts (one at least): each may write to the store,
 * and the sessions wait meanwhile. */
#define SLICE_NS (10 * 1000 * 1000ULL)

struct cclient;
struct migrate_run;

struct ms_control {
	uv_loop_t *loop;
	uv_pipe_t pipe;
	int listening;
	struct ms_gateway *gw;
	struct ms_store *store;
	struct ms_control_access acc;
	char *path;
	struct cclient *clients;
	unsigned int nclients;
	struct cclient *current;	/* whose request runs (NULL: one of
					   ms_control_request()'s caller) */
	struct migrate_run *runs;	/* migrate --all's, going on */
	uv_idle_t *more;		/* clients' requests left for the next
					   turn: their time was up */
};

struct cclient {
	uv_pipe_t pipe;
	uv_shutdown_t shutdown;
	struct ms_control *ctl;
	struct cclient *next, **pprev;
	char *buf;			/* REQ_MAX + 1 bytes, once read */
	size_t len;
	int closing;			/* no more requests nor replies */
	int paused;			/* reading stopped: replies unread */
	struct ms_read *rd;		/* its request's reads, on the store's
					   reader: the next requests wait */
	struct migrate_run *run;	/* its migrate --all, going on: the
					   next requests wait too */
	int more;			/* requests left for the next turn */
};

/* A request's reply that comes later (deferred()). */
static const int pending_mark;
#define PENDING ((json_t *)(uintptr_t)&pending_mark)

/* Replaces what is not valid UTF-8 with '?': JSON cannot carry it. */
static void utf8_scrub(char *s)
{
	for (unsigned char *p = (unsigned char *)s; *p != '\0';) {
		size_t n = ms_utf8_len(p);

		if (n == 0)
			*p++ = '?';
		else
			p += n;
	}
}

/* A JSON string of text that may come from elsewhere (a login name, a
 * server's reply in last_error): scrubbed rather than lost. */
static json_t *json_text(const char *s)
{
	json_t *j = json_string(s);
	char *copy;

	if (j != NULL || (copy = strdup(s)) == NULL)
		return j;
	utf8_scrub(copy);
	j = json_string(copy);
	free(copy);
	return j;
}

static json_t *error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static json_t *error(const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* The message may quote the request (jansson's own errors do) or
	 * cut a character in two. */
	return json_pack("{s:b, s:o}", "ok", 0, "error", json_text(msg));
}

/* ---- requests ---- */

/* The request's string field: *v NULL when absent (or null); -1 with
 * *rep set when it is something else than a string. */
static int field_str(json_t *req, const char *key, const char **v,
		     json_t **rep)
{
	json_t *j = json_object_get(req, key);

	*v = NULL;
	if (j == NULL || json_is_null(j))
		return 0;
	if (!json_is_string(j)) {
		*rep = error("\"%s\" must be a string", key);
		return -1;
	}
	*v = json_string_value(j);
	return 0;
}

/* "user": present, a string, 1 to 255 bytes, no control character (it
 * goes into logs and into the store). */
static int field_user(json_t *req, const char **user, json_t **rep)
{
	if (field_str(req, "user", user, rep) < 0)
		return -1;
	if (*user == NULL || **user == '\0') {
		*rep = error("%s", "a user name is needed");
		return -1;
	}
	if (strlen(*user) >= sizeof(((struct ms_user_info *)0)->name)) {
		*rep = error("user name too long (at most %zu bytes)",
			     sizeof(((struct ms_user_info *)0)->name) - 1);
		return -1;
	}
	for (const unsigned char *p = (const void *)*user; *p != '\0'; p++) {
		if (*p < 0x20 || *p == 0x7f) {
			*rep = error("%s", "a control character in the user "
				     "name");
			return -1;
		}
	}
	return 0;
}

static json_t *user_json(struct ms_control *ctl, const struct ms_user_info *u)
{
	return json_pack("{s:o, s:s, s:s, s:s, s:o?, s:I, s:I, s:I, s:I}",
			 "user", json_text(u->name), "state", u->state,
			 "copy", ctl->gw != NULL ?
				ms_gateway_user_copy(ctl->gw, u->name) : "",
			 "policy", u->policy[0] != '\0' ? u->policy : "default",
			 "error", u->last_error[0] != '\0' ?
				json_text(u->last_error) : NULL,
			 "messages", (json_int_t)u->msgs,
			 "bytes", (json_int_t)u->bytes,
			 "sessions", (json_int_t)(ctl->gw != NULL ?
				ms_gateway_user_sessions(ctl->gw, u->name) : 0),
			 "updated", (json_int_t)u->updated_at);
}

/* status's counts of the users (read on the store's reader) */
struct list_ctx {
	json_int_t counts[MS_USER_NSTATES];
	json_int_t msgs, bytes;
};

static int on_user(void *ctx, const struct ms_user_info *u)
{
	struct list_ctx *lc = ctx;

	for (int i = 0; i < MS_USER_NSTATES; i++)
		if (ms_user_in(u, i))
			lc->counts[i]++;
	lc->msgs += (json_int_t)u->msgs;
	lc->bytes += (json_int_t)u->bytes;
	return 0;
}

/* user.add / user.set's fields, all checked before anything is written. */
struct user_change {
	const char *user, *state, *policy;
	int force;
};

static json_t *user_change_parse(json_t *req, int create,
				 struct user_change *uc)
{
	json_t *rep = NULL, *force = json_object_get(req, "force");
	enum ms_policy p;

	if (field_user(req, &uc->user, &rep) < 0 ||
	    field_str(req, "state", &uc->state, &rep) < 0 ||
	    field_str(req, "policy", &uc->policy, &rep) < 0)
		return rep;
	if (force != NULL && !json_is_boolean(force))
		return error("%s", "\"force\" must be true or false");
	uc->force = json_is_true(force);
	if (uc->state != NULL && ms_user_state_parse(uc->state) < 0)
		return error("invalid state \"%.64s\" (source, copying, "
			     "cutover, destination, failed)", uc->state);
	if (uc->policy != NULL && strcmp(uc->policy, "default") != 0 &&
	    ms_policy_parse(uc->policy, &p) < 0)
		return error("invalid policy \"%.64s\" (passthrough, hold, off "
			     "or default)", uc->policy);
	if (!create && uc->state == NULL && uc->policy == NULL)
		return error("%s", "nothing to set (state, policy)");
	return NULL;
}

/* A state change by hand that cannot be right: NULL when it may go. */
static json_t *state_change_refused(struct ms_control *ctl,
				    const struct user_change *uc,
				    const struct ms_user_info *info)
{
	const char *copy;

	if (uc->state == NULL || !strcmp(uc->state, info->state))
		return NULL;
	/* The map is what the gateway acts on: a wrong word here strands
	 * mail. */
	copy = ctl->gw != NULL ? ms_gateway_user_copy(ctl->gw, uc->user) : "";
	if (copy[0] != '\0')
		return error("a copy runs for %s (%s): wait for it, or end it "
			     "with mailshiftctl kick", uc->user, copy);
	if (ms_user_in(info, MS_USER_DESTINATION) && !uc->force)
		return error("%s is on the destination: mail that arrived there "
			     "since would be left behind; mailshiftctl rollback "
			     "%s brings it back (--force to set the state "
			     "anyway)", uc->user, uc->user);
	return NULL;
}

/* The writes, all or none. */
static int user_write(struct ms_store *st, const struct user_change *uc)
{
	int64_t id;

	if (ms_store_begin(st) < 0)
		return -1;
	if (ms_store_user_get(st, uc->user, &id) < 0 ||
	    (uc->state != NULL &&
	     ms_store_user_set_state(st, id, uc->state, NULL) < 0) ||
	    (uc->policy != NULL &&
	     ms_store_user_set_policy(st, id, strcmp(uc->policy, "default") ?
				      uc->policy : NULL) < 0) ||
	    ms_store_commit(st) < 0) {
		ms_store_rollback(st);
		return -1;
	}
	return 0;
}

/* The store's error for a change that did not go (a table locked past
 * ms_gateway_change_lock_ms() said as such). */
static json_t *store_refused(struct ms_control *ctl)
{
	char why[600];

	ms_store_refusal(ctl->store, why, sizeof(why));
	return error("%s", why);
}

/* One transaction, its statements waiting at most half a heartbeat for a
 * lock (ms_gateway_change_lock_ms()): the loop waits for them. */
static json_t *user_update(struct ms_control *ctl, json_t *req, int create)
{
	struct user_change uc = { 0 };
	struct ms_user_info info;
	json_t *rep;
	int found;

	if ((rep = user_change_parse(req, create, &uc)) != NULL)
		return rep;
	if (ms_store_begin(ctl->store) < 0)
		return store_refused(ctl);
	if (ms_store_lock_wait(ctl->store, ctl->gw != NULL ?
			       ms_gateway_change_lock_ms(ctl->gw) : 1000) < 0 ||
	    ms_store_user_info(ctl->store, uc.user, &info, &found) < 0)
		goto failed;
	if (!found && !create)
		rep = error("no such user \"%s\"", uc.user);
	else if (found)
		rep = state_change_refused(ctl, &uc, &info);
	if (rep != NULL) {
		ms_store_rollback(ctl->store);
		return rep;
	}
	if (user_write(ctl->store, &uc) < 0 ||
	    ms_store_user_info(ctl->store, uc.user, &info, &found) < 0 ||
	    !found || ms_store_commit(ctl->store) < 0)
		goto failed;
	/* backend = kmod: the operator's state reaches the kernel as the
	 * gateway's own changes do (lifecycle.c's store_state()), so a session
	 * of a user set to destination left on the source is reset. */
	if (uc.state != NULL)
		ms_steer_user_state(uc.user, ms_user_state_parse(uc.state));
	return json_pack("{s:b, s:o}", "ok", 1, "user", user_json(ctl, &info));
failed:
	rep = store_refused(ctl);
	ms_store_rollback(ctl->store);
	return rep;
}

/* ---- reads off the loop ---- */

static void process_lines(struct cclient *cc);
static void reply(struct cclient *cc, json_t *o);

typedef json_t *read_finish_fn(struct ms_control *ctl, void *arg,
			       const char *error);

struct deferred {
	struct ms_control *ctl;
	struct cclient *cc;
	ms_read_work_fn *work;
	read_finish_fn *finish;
	ms_read_drop_fn *drop;
	void *arg;
};

static int deferred_work(struct ms_store *store, void *arg, char *err,
			 size_t errsz)
{
	struct deferred *d = arg;

	return d->work(store, d->arg, err, errsz);
}

static void deferred_drop(void *arg)
{
	struct deferred *d = arg;

	d->drop(d->arg);
	free(d);
}

/* The reads are in: the reply goes out, then the client's next
 * requests. */
static void deferred_done(void *arg, const char *error)
{
	struct deferred *d = arg;
	struct cclient *cc = d->cc;

	cc->rd = NULL;
	reply(cc, d->finish(d->ctl, d->arg, error));
	deferred_drop(d);
	process_lines(cc);
}

/* A request's reads (work) and its reply made of them (finish; arg freed
 * by drop after): on the store's reader for a client of the socket, the
 * reply then PENDING; else (ms_control_request()'s caller, no gateway) at
 * once. */
static json_t *deferred(struct ms_control *ctl, ms_read_work_fn *work,
			read_finish_fn *finish, ms_read_drop_fn *drop,
			void *arg)
{
	struct ms_reader *r = ctl->gw != NULL ? ms_gateway_reader(ctl->gw) :
			      NULL;
	struct cclient *cc = ctl->current;
	struct deferred *d;
	char err[512] = "";
	json_t *rep;
	int rc;

	if (cc == NULL || r == NULL) {
		rc = ms_read_now(ctl->store, work, arg, err, sizeof(err));
		rep = finish(ctl, arg, rc < 0 ? err : NULL);
		drop(arg);
		return rep;
	}
	if ((d = calloc(1, sizeof(*d))) == NULL) {
		drop(arg);
		return error("%s", "out of memory");
	}
	*d = (struct deferred){ ctl, cc, work, finish, drop, arg };
	if ((cc->rd = ms_read_start(r, deferred_work, deferred_done,
				    deferred_drop, d)) == NULL) {
		deferred_drop(d);
		return error("%s", "out of memory");
	}
	return PENDING;
}

/* ---- status ---- */

struct status_read {
	struct list_ctx lc;		/* the counts (no users' objects) */
	struct ms_view_count vc;
	struct ms_retirement retired;
	int retired_found;
	struct ms_site_read *site;	/* with a gateway */
	int clustered;
	struct ms_gateway_rows rows;
};

static int status_work(struct ms_store *store, void *arg, char *err,
		       size_t errsz)
{
	struct status_read *sr = arg;

	if (ms_store_user_foreach(store, on_user, &sr->lc) != 0 ||
	    ms_store_view_count(store, &sr->vc) < 0 ||
	    ms_store_retirement_get(store, &sr->retired,
				    &sr->retired_found) < 0 ||
	    (sr->site != NULL && ms_site_read(store, sr->site) < 0) ||
	    (sr->clustered && ms_gateway_rows_read(store, &sr->rows) < 0))
		return -1;
	return 0;
}

static void status_drop(void *arg)
{
	struct status_read *sr = arg;

	if (sr->retired_found)
		free(sr->retired.record);
	free(sr->site);
	ms_gateway_rows_free(&sr->rows);
	free(sr);
}

/* mailshiftctl retire --apply's record: {at, uid, forced} or null. */
static json_t *retired_json(const struct status_read *sr)
{
	if (!sr->retired_found)
		return json_null();
	return json_pack("{s:I,s:I,s:b}", "at", (json_int_t)sr->retired.at,
			 "uid", (json_int_t)sr->retired.uid, "forced",
			 sr->retired.forced);
}

/* Every gateway on the store, for status and sessions: [] with SQLite. */
static json_t *gateways_json(struct ms_control *ctl,
			     const struct ms_gateway_rows *rows)
{
	return ctl->gw != NULL ? ms_gateway_rows_json(ctl->gw, rows) :
	       json_array();
}

static json_t *status_finish(struct ms_control *ctl, void *arg,
			     const char *err)
{
	struct status_read *sr = arg;
	const struct list_ctx *lc = &sr->lc;
	const struct ms_view_count *vc = &sr->vc;
	struct ms_progress p = { 0 };
	json_t *by_state, *rep;

	if (err != NULL)
		return error("store: %s", err);
	by_state = json_object();
	for (int i = 0; i < MS_USER_NSTATES; i++)
		json_object_set_new(by_state, ms_user_state_names[i],
				    json_integer(lc->counts[i]));
	if (ctl->gw != NULL)
		ms_gateway_progress(ctl->gw, &p);
	rep = json_pack("{s:b, s:o, s:I, s:I, s:I, s:I, s:I, s:f, s:o, s:o}",
			 "ok", 1, "states", by_state,
			 "messages", lc->msgs, "bytes", lc->bytes,
			 "sessions", (json_int_t)(ctl->gw != NULL ?
			 ms_gateway_nsessions(ctl->gw) : 0),
			 "copy_messages_done", (json_int_t)p.msgs_done,
			 "copy_messages_todo", (json_int_t)p.msgs_todo,
			 "copy_seconds", p.seconds, "capabilities",
			 ctl->gw != NULL ? ms_gateway_caps_json(ctl->gw) :
			 json_object(), "retired", retired_json(sr));
	/* Users whose clients need the gateway's IMAP view: a folder whose
	 * UIDs it translates (docs/mover.md, "Identity"), or one the move
	 * renamed, whose old name it answers. */
	json_object_set_new(rep, "view_users",
			    json_integer((json_int_t)vc->users));
	json_object_set_new(rep, "identity_not_kept_users",
			    json_integer((json_int_t)vc->lost_users));
	json_object_set_new(rep, "identity_not_kept_folders",
			    json_integer((json_int_t)vc->lost_folders));
	json_object_set_new(rep, "renamed_folders",
			    json_integer((json_int_t)vc->renamed_folders));
	/* The site's ETA (docs/mover.md, "The site's ETA"). */
	if (sr->site != NULL)
		json_object_set_new(rep, "site",
				    ms_gateway_site_json(ctl->gw, sr->site));
	/* The caps that protect the source, and the back-off. */
	json_object_set_new(rep, "mover", ctl->gw != NULL ?
			    ms_gateway_mover_json(ctl->gw) : json_null());
	/* Several gateways on one store: each one's heartbeat and load. */
	json_object_set_new(rep, "gateways", gateways_json(ctl, &sr->rows));
	return rep;
}

static json_t *cmd_status(struct ms_control *ctl, json_t *req)
{
	struct status_read *sr = calloc(1, sizeof(*sr));

	if (sr == NULL || (ctl->gw != NULL &&
			   (sr->site = ms_gateway_site_prepare(ctl->gw)) ==
			   NULL)) {
		free(sr);
		return error("%s", "out of memory");
	}
	sr->clustered = ctl->gw != NULL && ms_gateway_clustered(ctl->gw);
	return deferred(ctl, status_work, status_finish, status_drop, sr);
}

/* ---- user.list, user.show: the rows read, then what the gateway does
 * for each (on the loop) ---- */

struct urow {
	char *name, *error;		/* error NULL: none */
	char state[16], policy[16];
	uint64_t msgs, bytes;
	int64_t updated;
};

struct users_read {
	char *one;			/* user.show's; NULL: every user */
	struct urow *v;
	size_t n, cap;
	int oom;
};

static int urow_add(void *ctx, const struct ms_user_info *u)
{
	struct users_read *ur = ctx;
	struct urow *r;

	if (ur->n == ur->cap) {
		size_t cap = ur->cap ? ur->cap * 2 : 64;

		if ((r = realloc(ur->v, cap * sizeof(*r))) == NULL)
			goto oom;
		ur->v = r;
		ur->cap = cap;
	}
	r = &ur->v[ur->n];
	memset(r, 0, sizeof(*r));
	if ((r->name = strdup(u->name)) == NULL ||
	    (u->last_error[0] != '\0' &&
	     (r->error = strdup(u->last_error)) == NULL)) {
		free(r->name);
		goto oom;
	}
	snprintf(r->state, sizeof(r->state), "%s", u->state);
	snprintf(r->policy, sizeof(r->policy), "%s", u->policy);
	r->msgs = u->msgs;
	r->bytes = u->bytes;
	r->updated = u->updated_at;
	ur->n++;
	return 0;
oom:
	ur->oom = 1;
	return -1;
}

static int users_work(struct ms_store *store, void *arg, char *err,
		      size_t errsz)
{
	struct users_read *ur = arg;
	struct ms_user_info info;
	int found = 0, r;

	if (ur->one != NULL)
		r = ms_store_user_info(store, ur->one, &info, &found) < 0 ||
		    (found && urow_add(ur, &info) < 0) ? -1 : 0;
	else
		r = ms_store_user_foreach(store, urow_add, ur) != 0 ? -1 : 0;
	if (r < 0 && ur->oom)
		snprintf(err, errsz, "out of memory");
	return r;
}

static void users_drop(void *arg)
{
	struct users_read *ur = arg;

	for (size_t i = 0; i < ur->n; i++) {
		free(ur->v[i].name);
		free(ur->v[i].error);
	}
	free(ur->v);
	free(ur->one);
	free(ur);
}

static json_t *urow_json(struct ms_control *ctl, const struct urow *r)
{
	struct ms_user_info u = { .msgs = r->msgs, .bytes = r->bytes,
				  .updated_at = r->updated };

	snprintf(u.name, sizeof(u.name), "%s", r->name);
	snprintf(u.state, sizeof(u.state), "%s", r->state);
	snprintf(u.policy, sizeof(u.policy), "%s", r->policy);
	snprintf(u.last_error, sizeof(u.last_error), "%s",
		 r->error != NULL ? r->error : "");
	return user_json(ctl, &u);
}

static json_t *users_finish(struct ms_control *ctl, void *arg,
			    const char *err)
{
	struct users_read *ur = arg;
	json_t *users;

	if (err != NULL)
		return error("store: %s", err);
	if (ur->one != NULL)
		return ur->n == 0 ? error("no such user \"%s\"", ur->one) :
		       json_pack("{s:b, s:o}", "ok", 1, "user",
				 urow_json(ctl, &ur->v[0]));
	users = json_array();
	for (size_t i = 0; i < ur->n; i++)
		json_array_append_new(users, urow_json(ctl, &ur->v[i]));
	return json_pack("{s:b, s:o}", "ok", 1, "users", users);
}

static json_t *users_ask(struct ms_control *ctl, const char *one)
{
	struct users_read *ur = calloc(1, sizeof(*ur));

	if (ur == NULL || (one != NULL && (ur->one = strdup(one)) == NULL)) {
		free(ur);
		return error("%s", "out of memory");
	}
	return deferred(ctl, users_work, users_finish, users_drop, ur);
}

static json_t *cmd_user_list(struct ms_control *ctl, json_t *req)
{
	return users_ask(ctl, NULL);
}

static json_t *cmd_user_show(struct ms_control *ctl, json_t *req)
{
	const char *user;
	json_t *rep;

	if (field_user(req, &user, &rep) < 0)
		return rep;
	return users_ask(ctl, user);
}

static json_t *cmd_user_add(struct ms_control *ctl, json_t *req)
{
	return user_update(ctl, req, 1);
}

static json_t *cmd_user_set(struct ms_control *ctl, json_t *req)
{
	return user_update(ctl, req, 0);
}

static json_t *cmd_policy_set(struct ms_control *ctl, json_t *req)
{
	const char *dom, *pol;
	char err[256];
	json_t *rep;

	/* A "domain" of another type must not fall back to the default
	 * policy: every user's. */
	if (field_str(req, "domain", &dom, &rep) < 0 ||
	    field_str(req, "policy", &pol, &rep) < 0)
		return rep;
	if (pol == NULL)
		return error("%s", "a policy is needed (passthrough, hold, off "
			     "or config)");
	if (ctl->gw == NULL)
		return error("%s", "no gateway");
	if (ms_gateway_set_policy(ctl->gw, dom, strcmp(pol, "config") ? pol :
				  NULL, err, sizeof(err)) < 0)
		return error("%s", err);
	return json_pack("{s:b, s:o}", "ok", 1, "policy",
			 ms_gateway_policies(ctl->gw));
}

static json_t *cmd_policy(struct ms_control *ctl, json_t *req)
{
	if (ctl->gw == NULL)
		return error("%s", "no gateway");
	return json_pack("{s:b, s:o}", "ok", 1, "policy",
			 ms_gateway_policies(ctl->gw));
}

/* A whole number from min to max in the request's key, or absent (*v
 * left as it is); -1 with *rep set otherwise. */
static int field_count(json_t *req, const char *key, json_int_t min,
		       json_int_t max, json_int_t *v, json_t **rep)
{
	json_t *j = json_object_get(req, key);

	if (j == NULL || json_is_null(j))
		return 0;
	if (!json_is_integer(j) || json_integer_value(j) < min ||
	    json_integer_value(j) > max) {
		*rep = error("\"%s\" must be a whole number from %lld to %lld",
			     key, (long long)min, (long long)max);
		return -1;
	}
	*v = json_integer_value(j);
	return 0;
}

/* The mover's caps, changed while it runs: connections per server,
 * commands per second to the source (0: none). */
static json_t *cmd_policy_limits(struct ms_control *ctl, json_t *req)
{
	json_int_t conns = 0, cps = -1;
	char err[256];
	json_t *rep;

	if (field_count(req, "connections", 1, 64, &conns, &rep) < 0 ||
	    field_count(req, "commands_per_second", 0, 100000, &cps, &rep) < 0)
		return rep;
	if (conns == 0 && cps < 0)
		return error("%s", "nothing to set (connections, "
			     "commands_per_second)");
	if (ctl->gw == NULL)
		return error("%s", "no gateway");
	if (ms_gateway_set_limits(ctl->gw, (unsigned int)conns, (double)cps,
				  err, sizeof(err)) < 0)
		return error("%s", err);
	return json_pack("{s:b, s:o}", "ok", 1, "mover",
			 ms_gateway_mover_json(ctl->gw));
}

/* ---- sessions: this gateway's, and every gateway's row ---- */

static int rows_work(struct ms_store *store, void *arg, char *err,
		     size_t errsz)
{
	return ms_gateway_rows_read(store, arg);
}

static void rows_drop(void *arg)
{
	ms_gateway_rows_free(arg);
	free(arg);
}

static json_t *sessions_finish(struct ms_control *ctl, void *arg,
			       const char *err)
{
	if (err != NULL)
		return error("store: %s", err);
	return json_pack("{s:b, s:o, s:o}", "ok", 1, "sessions",
			 ctl->gw != NULL ? ms_gateway_sessions(ctl->gw) :
			 json_array(), "gateways", gateways_json(ctl, arg));
}

static json_t *cmd_sessions(struct ms_control *ctl, json_t *req)
{
	struct ms_gateway_rows *rows = calloc(1, sizeof(*rows));

	if (rows == NULL)
		return error("%s", "out of memory");
	if (ctl->gw == NULL || !ms_gateway_clustered(ctl->gw)) {
		json_t *rep = sessions_finish(ctl, rows, NULL);

		rows_drop(rows);
		return rep;
	}
	return deferred(ctl, rows_work, sessions_finish, rows_drop, rows);
}

static json_t *cmd_migrate(struct ms_control *ctl, json_t *req)
{
	const char *user, *why = NULL;
	json_t *rep;

	if (field_user(req, &user, &rep) < 0)
		return rep;
	if (ctl->gw == NULL || ms_gateway_migrate(ctl->gw, user, &why) != 0)
		return error("%s", why != NULL ? why : "no gateway");
	return json_pack("{s:b, s:s}", "ok", 1, "user", user);
}

/* ---- migrate --all: the walk on the store's reader, the starts in
 * slices of the loop's turns ---- */

struct names {
	char **v;
	size_t n, cap;
	int oom;
};

struct migrate_run {
	struct ms_control *ctl;
	struct cclient *cc;		/* NULL once it left: the run goes on */
	struct migrate_run *next;
	struct ms_read *rd;		/* the walk, until it is in */
	int slicing;			/* idle started (after the walk) */
	uv_idle_t idle;
	struct names nm;
	size_t at;
	unsigned int started;
	char error[256];
};

static void names_free(struct names *nm)
{
	for (size_t i = 0; i < nm->n; i++)
		free(nm->v[i]);
	free(nm->v);
	*nm = (struct names){ 0 };
}

/* The users not on the destination whose policy moves them. */
static int name_add(void *ctx, const struct ms_user_info *u)
{
	struct names *nm = ctx;

	if (ms_user_in(u, MS_USER_DESTINATION) || !strcmp(u->policy, "off"))
		return 0;
	if (nm->n == nm->cap) {
		size_t cap = nm->cap ? nm->cap * 2 : 256;
		char **v = realloc(nm->v, cap * sizeof(*v));

		if (v == NULL)
			return nm->oom = -1;
		nm->v = v;
		nm->cap = cap;
	}
	if ((nm->v[nm->n] = strdup(u->name)) == NULL)
		return nm->oom = -1;
	nm->n++;
	return 0;
}

/* The walk, on the store's reader (or here and now). */
static int names_work(struct ms_store *store, void *arg, char *err,
		      size_t errsz)
{
	struct migrate_run *mr = arg;

	if (ms_store_user_foreach(store, name_add, &mr->nm) != 0) {
		if (mr->nm.oom)
			snprintf(err, errsz, "out of memory");
		return -1;
	}
	return 0;
}

/* Starts the next users' copies, for budget ns (0: all of them); stops
 * at the first that cannot start. 1 once the run is over. */
static int run_slice(struct migrate_run *mr, uint64_t budget)
{
	uint64_t t0 = uv_hrtime();

	while (mr->at < mr->nm.n && mr->error[0] == '\0') {
		const char *why = NULL;
		int r = mr->ctl->gw == NULL ? -1 :
			ms_gateway_migrate(mr->ctl->gw, mr->nm.v[mr->at++],
					   &why);

		/* 1: on the destination since the walk, nothing to start */
		if (r < 0)
			snprintf(mr->error, sizeof(mr->error), "%s",
				 why != NULL ? why : "no gateway");
		else if (r == 0)
			mr->started++;
		if (budget != 0 && uv_hrtime() - t0 >= budget)
			break;
	}
	return mr->at == mr->nm.n || mr->error[0] != '\0';
}

static json_t *run_reply(const struct migrate_run *mr)
{
	return json_pack("{s:b, s:i, s:s?}", "ok", mr->error[0] == '\0',
			 "started", (int)mr->started, "error",
			 mr->error[0] ? mr->error : NULL);
}

static void run_free(struct migrate_run *mr)
{
	names_free(&mr->nm);
	free(mr);
}

static void on_run_closed(uv_handle_t *h)
{
	run_free(h->data);
}

/* Off the control's list; freed now, or once its handle is closed. */
static void run_end(struct migrate_run *mr)
{
	struct migrate_run **pp = &mr->ctl->runs;

	while (*pp != mr)
		pp = &(*pp)->next;
	*pp = mr->next;
	if (mr->cc != NULL)
		mr->cc->run = NULL;
	if (mr->rd != NULL) {
		ms_read_cancel(mr->rd);	/* its drop() frees it */
	} else if (mr->slicing) {
		uv_close((uv_handle_t *)&mr->idle, on_run_closed);
	} else {
		run_free(mr);
	}
}

/* The run is over: the log's line, and the reply to its client if it is
 * still there. */
static void run_done(struct migrate_run *mr)
{
	struct cclient *cc = mr->cc;

	ms_info("migrate --all: %u cop%s started%s%s", mr->started,
		mr->started == 1 ? "y" : "ies", mr->error[0] ? "; stopped: " :
		"", mr->error);
	if (cc != NULL) {
		cc->run = NULL;
		mr->cc = NULL;
		reply(cc, run_reply(mr));
		process_lines(cc);
	}
	run_end(mr);
}

static void on_run_turn(uv_idle_t *idle)
{
	struct migrate_run *mr = idle->data;

	if (run_slice(mr, SLICE_NS))
		run_done(mr);
}

static void names_drop(void *arg)
{
	run_free(arg);
}

/* The walk is in: the starts, a slice in each turn of the loop. */
static void names_done(void *arg, const char *error)
{
	struct migrate_run *mr = arg;

	mr->rd = NULL;
	if (error != NULL)
		snprintf(mr->error, sizeof(mr->error), "store: %s", error);
	if (mr->error[0] != '\0' || mr->nm.n == 0 ||
	    uv_idle_init(mr->ctl->loop, &mr->idle) < 0) {
		run_slice(mr, 0);
		run_done(mr);
		return;
	}
	mr->idle.data = mr;
	mr->slicing = 1;
	uv_idle_start(&mr->idle, on_run_turn);
}

/* The walk is a read (the store's reader); each start writes, a slice of
 * them in each turn of the loop, the client's reply once all are. Once
 * asked, it goes on if the client leaves. */
static json_t *cmd_migrate_all(struct ms_control *ctl, json_t *req)
{
	struct ms_reader *r = ctl->gw != NULL ? ms_gateway_reader(ctl->gw) :
			      NULL;
	struct migrate_run *mr = calloc(1, sizeof(*mr));
	json_t *rep;
	char err[512];

	(void)req;
	if (mr == NULL)
		return error("%s", "out of memory");
	mr->ctl = ctl;
	/* no client of the socket to wait, or no reader: all at once */
	if (ctl->current == NULL || r == NULL) {
		if (ms_read_now(ctl->store, names_work, mr, err,
				sizeof(err)) < 0)
			snprintf(mr->error, sizeof(mr->error), "store: %s",
				 err);
		run_slice(mr, 0);
		rep = run_reply(mr);
		run_free(mr);
		return rep;
	}
	if ((mr->rd = ms_read_start(r, names_work, names_done, names_drop,
				    mr)) == NULL) {
		run_free(mr);
		return error("%s", "out of memory");
	}
	mr->cc = ctl->current;
	mr->cc->run = mr;
	mr->next = ctl->runs;
	ctl->runs = mr;
	return PENDING;
}

static json_t *cmd_rollback(struct ms_control *ctl, json_t *req)
{
	const char *user, *why = NULL;
	json_t *rep;

	if (field_user(req, &user, &rep) < 0)
		return rep;
	if (ctl->gw == NULL)
		return error("%s", "no gateway");
	if (ms_gateway_rollback(ctl->gw, user, &why) < 0)
		return error("%s: %s", user, why != NULL ? why : "failed");
	return json_pack("{s:b}", "ok", 1);
}

static json_t *cmd_kick(struct ms_control *ctl, json_t *req)
{
	const char *user;
	json_t *rep;

	if (field_user(req, &user, &rep) < 0)
		return rep;
	return json_pack("{s:b, s:i}", "ok", 1, "kicked", ctl->gw != NULL ?
			 ms_gateway_kick(ctl->gw, user) : 0);
}

static json_t *dispatch(struct ms_control *ctl, json_t *req)
{
	static const struct {
		const char *name;
		json_t *(*fn)(struct ms_control *ctl, json_t *req);
	} cmds[] = {
		{ "status", cmd_status }, { "user.list", cmd_user_list },
		{ "user.show", cmd_user_show }, { "user.add", cmd_user_add },
		{ "user.set", cmd_user_set }, { "policy.set", cmd_policy_set },
		{ "policy", cmd_policy }, { "sessions", cmd_sessions },
		{ "policy.limits", cmd_policy_limits },
		{ "migrate", cmd_migrate }, { "migrate.all", cmd_migrate_all },
		{ "rollback", cmd_rollback }, { "kick", cmd_kick },
	};
	json_t *rep = NULL;
	const char *cmd;

	if (field_str(req, "cmd", &cmd, &rep) < 0)
		return rep;
	if (cmd == NULL)
		return error("%s", "no \"cmd\"");
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (!strcmp(cmd, cmds[i].name))
			return cmds[i].fn(ctl, req);
	return error("unknown command \"%.64s\"", cmd);
}

json_t *ms_control_request(struct ms_control *ctl, const char *line,
			   size_t len)
{
	json_error_t jerr;
	json_t *req, *rep;

	/* jansson would stop at a NUL and take what comes before it. */
	if (memchr(line, '\0', len) != NULL)
		return error("%s", "a NUL byte in the request");
	req = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
	if (req == NULL)
		return error("bad JSON: %s", jerr.text);
	rep = json_is_object(req) ? dispatch(ctl, req) :
		error("%s", "a request is a JSON object");
	json_decref(req);
	return rep;
}

/* ---- the socket ---- */

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void on_client_close(uv_handle_t *h)
{
	struct cclient *cc = h->data;

	if (cc->pprev != NULL) {
		*cc->pprev = cc->next;
		if (cc->next != NULL)
			cc->next->pprev = cc->pprev;
		cc->ctl->nclients--;
	}
	free(cc->buf);
	free(cc);
}

/* At once: what is queued is dropped, what is asked of the store's reader
 * let go. */
static void client_close(struct cclient *cc)
{
	ms_read_cancel(cc->rd);
	cc->rd = NULL;
	if (cc->run != NULL)
		cc->run->cc = NULL;
	cc->run = NULL;
	cc->closing = 1;
	if (!uv_is_closing((uv_handle_t *)&cc->pipe))
		uv_close((uv_handle_t *)&cc->pipe, on_client_close);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
	client_close(req->handle->data);
}

/* Once the replies queued so far are written. */
static void client_end(struct cclient *cc)
{
	if (cc->closing)
		return;
	cc->closing = 1;
	uv_read_stop((uv_stream_t *)&cc->pipe);
	if (uv_shutdown(&cc->shutdown, (uv_stream_t *)&cc->pipe,
			on_shutdown) < 0)
		client_close(cc);
}

static size_t unread(struct cclient *cc)
{
	return uv_stream_get_write_queue_size((uv_stream_t *)&cc->pipe);
}

static void on_write_done(uv_write_t *req, int status)
{
	struct cclient *cc = req->handle->data;

	free(req->data);
	free(req);
	if (status < 0)
		client_close(cc);	/* gone; or already closing */
	else if (cc->paused && !cc->closing && !cc->more &&
		 unread(cc) < UNREAD_MAX / 2)
		process_lines(cc);	/* caught up (the idle has the rest) */
}

static void reply(struct cclient *cc, json_t *o)
{
	static const char nomem[] = "{\"ok\":false,\"error\":\"out of memory\"}";
	char *text = o != NULL ? json_dumps(o, JSON_COMPACT |
					    JSON_PRESERVE_ORDER) : NULL;
	size_t len;
	uv_write_t *req;
	uv_buf_t buf;

	json_decref(o);
	if (cc->closing)
		goto out;
	/* Every request gets its line, or the client would wait forever. */
	if (text == NULL && (text = malloc(sizeof(nomem))) != NULL)
		memcpy(text, nomem, sizeof(nomem));
	req = malloc(sizeof(*req));
	if (text == NULL || req == NULL) {
		free(req);
		client_close(cc);
		goto out;
	}
	len = strlen(text);
	text[len] = '\n';	/* the terminating NUL becomes the line end */
	req->data = text;
	buf = uv_buf_init(text, (unsigned int)len + 1);
	if (uv_write(req, (uv_stream_t *)&cc->pipe, &buf, 1, on_write_done) < 0) {
		free(req);
		client_close(cc);
		goto out;
	}
	return;
out:
	free(text);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct cclient *cc = h->data;

	if (cc->buf == NULL)
		cc->buf = malloc(REQ_MAX + 1);
	/* The request goes straight into the client's buffer: at most one
	 * line of REQ_MAX bytes and its '\n'. process_lines() leaves room. */
	if (cc->buf == NULL || cc->len > REQ_MAX)
		*buf = uv_buf_init(NULL, 0);
	else
		*buf = uv_buf_init(cc->buf + cc->len,
				   (unsigned int)(REQ_MAX + 1 - cc->len));
}

/* Answers each complete line, in order; stops reading while the client
 * leaves too many replies unread, or a reply waits for the store's
 * reader, and resumes when it catches up. */
static void on_more(uv_idle_t *idle)
{
	struct ms_control *ctl = idle->data;
	int left = 0;

	for (struct cclient *cc = ctl->clients; cc != NULL; cc = cc->next) {
		if (!cc->more)
			continue;
		cc->more = 0;
		process_lines(cc);
		left |= cc->more;
	}
	if (!left)
		uv_idle_stop(idle);
}

/* The client's next requests in the loop's next turn. */
static void later(struct cclient *cc)
{
	struct ms_control *ctl = cc->ctl;

	if (ctl->more == NULL) {
		if ((ctl->more = malloc(sizeof(*ctl->more))) == NULL ||
		    uv_idle_init(ctl->loop, ctl->more) < 0) {
			free(ctl->more);
			ctl->more = NULL;
			cc->more = 0;	/* they wait for its next bytes */
			return;
		}
		ctl->more->data = ctl;
	}
	uv_idle_start(ctl->more, on_more);
}

static void process_lines(struct cclient *cc)
{
	uint64_t t0 = uv_hrtime();
	size_t pos = 0;
	char *lf;

	while (!cc->closing && cc->rd == NULL && cc->run == NULL &&
	       unread(cc) < UNREAD_MAX &&
	       (lf = memchr(cc->buf + pos, '\n', cc->len - pos)) != NULL) {
		size_t linelen = (size_t)(lf - (cc->buf + pos));
		json_t *rep;

		cc->ctl->current = cc;
		rep = ms_control_request(cc->ctl, cc->buf + pos, linelen);
		cc->ctl->current = NULL;
		if (rep != PENDING)
			reply(cc, rep);
		pos += linelen + 1;
		/* the rest in the next turn: the sessions go on meanwhile */
		if (uv_hrtime() - t0 >= SLICE_NS) {
			cc->more = 1;
			break;
		}
	}
	if (cc->closing)
		return;
	memmove(cc->buf, cc->buf + pos, cc->len - pos);
	cc->len -= pos;
	if (cc->rd != NULL || cc->run != NULL ||
	    memchr(cc->buf, '\n', cc->len) != NULL) {
		if (!cc->paused)
			uv_read_stop((uv_stream_t *)&cc->pipe);
		cc->paused = 1;
		if (cc->more)
			later(cc);
		return;
	}
	cc->more = 0;
	if (cc->len > REQ_MAX) {
		reply(cc, error("request too long (more than %d bytes in a "
				"line)", REQ_MAX));
		client_end(cc);
		return;
	}
	if (cc->paused &&
	    uv_read_start((uv_stream_t *)&cc->pipe, on_alloc, on_read) == 0)
		cc->paused = 0;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
	struct cclient *cc = stream->data;

	if (nread == UV_EOF) {
		client_end(cc);		/* the replies still go out */
		return;
	}
	if (nread < 0) {
		client_close(cc);
		return;
	}
	cc->len += (size_t)nread;
	process_lines(cc);
}

/* May this peer talk to us? Its credentials are the kernel's, taken when
 * it connected: root, the daemon's own user, or a member of the control
 * group (its primary group or one of its supplementary groups). */
static int peer_allowed(const struct ms_control *ctl, int fd,
			const struct ucred *cr)
{
	gid_t small[64], *groups = small;
	socklen_t len = sizeof(small);
	int n, ok = 0;

	if (cr->uid == 0 || cr->uid == ctl->acc.owner)
		return 1;
	if (ctl->acc.group == (gid_t)-1)
		return 0;
	if (cr->gid == ctl->acc.group)
		return 1;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0) {
		if (errno != ERANGE || (groups = malloc(len)) == NULL ||
		    getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups,
			       &len) < 0) {
			if (groups != small)
				free(groups);
			return 0;
		}
	}
	n = (int)(len / sizeof(gid_t));
	for (int i = 0; i < n && !ok; i++)
		ok = groups[i] == ctl->acc.group;
	if (groups != small)
		free(groups);
	return ok;
}

/* Who is at the other end; -1 when the kernel cannot say. */
static int peer_cred(uv_pipe_t *pipe, int *fd_r, struct ucred *cr)
{
	socklen_t len = sizeof(*cr);
	uv_os_fd_t fd;

	if (uv_fileno((uv_handle_t *)pipe, &fd) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cr, &len) < 0)
		return -1;
	*fd_r = fd;
	return 0;
}

/* Accepted, but not to be served: one error line, then closed. */
static void client_refuse(struct cclient *cc, const char *why)
{
	reply(cc, error("%s", why));
	client_end(cc);
}

static void on_connection(uv_stream_t *server, int status)
{
	struct ms_control *ctl = server->data;
	struct cclient *cc;
	struct ucred cr;
	int fd, known;

	if (status < 0 || (cc = calloc(1, sizeof(*cc))) == NULL)
		return;
	cc->ctl = ctl;
	uv_pipe_init(ctl->loop, &cc->pipe, 0);
	cc->pipe.data = cc;
	if (uv_accept(server, (uv_stream_t *)&cc->pipe) < 0) {
		client_close(cc);
		return;
	}
	cc->next = ctl->clients;
	if (cc->next != NULL)
		cc->next->pprev = &cc->next;
	cc->pprev = &ctl->clients;
	ctl->clients = cc;
	ctl->nclients++;
	known = peer_cred(&cc->pipe, &fd, &cr) == 0;
	if (!known || !peer_allowed(ctl, fd, &cr)) {
		ms_warn("control socket: refused a client (uid %ld, pid %ld): "
			"only root, the daemon's user%s may use it",
			known ? (long)cr.uid : -1L, known ? (long)cr.pid : -1L,
			ctl->acc.group != (gid_t)-1 ?
			" and members of [control] group" : "");
		client_refuse(cc, "permission denied");
		return;
	}
	if (ctl->nclients > CLIENTS_MAX) {
		client_refuse(cc, "too many control connections");
		return;
	}
	if (uv_read_start((uv_stream_t *)&cc->pipe, on_alloc, on_read) < 0)
		client_close(cc);
}

/* The path must be free to bind: a stale socket (nobody listening) is
 * removed; anything else (a file, a directory, a link, a live socket) is
 * left alone and refused. */
static int path_free(const char *path, char *err, size_t errsz)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, r, e;

	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		snprintf(err, errsz, "control socket %s: %s", path,
			 strerror(errno));
		return -1;
	}
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errsz, "control socket %s: exists and is not a "
			 "socket; refusing to replace it (remove it, or choose "
			 "another [control] socket)", path);
		return -1;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	r = fd >= 0 ? connect(fd, (struct sockaddr *)&sa, sizeof(sa)) : -1;
	e = errno;
	if (fd >= 0)
		close(fd);
	if (r == 0 || e == EAGAIN) {
		snprintf(err, errsz, "control socket %s: in use (is another "
			 "mailshiftd running?)", path);
		return -1;
	}
	if (e != ECONNREFUSED) {
		snprintf(err, errsz, "control socket %s: %s", path, strerror(e));
		return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		snprintf(err, errsz, "control socket %s: %s", path,
			 strerror(errno));
		return -1;
	}
	return 0;
}

/* Who may connect, on the file system: the owner (the daemon's user) and,
 * with a control group, its members. The peer check stands behind it. */
static int path_access(const char *path, const struct ms_control_access *acc,
		       char *err, size_t errsz)
{
	int grp = acc->group != (gid_t)-1;

	if ((acc->owner != 0 || grp) &&
	    lchown(path, acc->owner, grp ? acc->group : (gid_t)-1) < 0) {
		snprintf(err, errsz, "control socket %s: chown: %s", path,
			 strerror(errno));
		return -1;
	}
	if (grp && chmod(path, 0660) < 0) {
		snprintf(err, errsz, "control socket %s: chmod: %s", path,
			 strerror(errno));
		return -1;
	}
	return 0;
}

struct ms_control *ms_control_detached(struct ms_gateway *gw,
				       struct ms_store *store)
{
	struct ms_control *ctl = calloc(1, sizeof(*ctl));

	if (ctl != NULL) {
		ctl->gw = gw;
		ctl->store = store;
		ctl->acc.group = (gid_t)-1;
	}
	return ctl;
}

int ms_control_new(uv_loop_t *loop, const char *path,
		   const struct ms_control_access *acc, struct ms_gateway *gw,
		   struct ms_store *store, struct ms_control **ctl_r,
		   char *err, size_t errsz)
{
	struct ms_control *ctl;
	mode_t old;
	int r;

	if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		snprintf(err, errsz, "control socket %s: path too long", path);
		return -1;
	}
	if (path_free(path, err, errsz) < 0)
		return -1;
	ctl = ms_control_detached(gw, store);
	if (ctl == NULL || (ctl->path = strdup(path)) == NULL) {
		free(ctl);
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	ctl->loop = loop;
	ctl->acc = *acc;
	uv_pipe_init(loop, &ctl->pipe, 0);
	ctl->pipe.data = ctl;
	ctl->listening = 1;
	/* Owner-only from the first instant: no window with a wider mode. */
	old = umask(0177);
	r = uv_pipe_bind(&ctl->pipe, path);
	umask(old);
	if (r < 0) {
		free(ctl->path);	/* not ours to remove */
		ctl->path = NULL;
	}
	if (r == 0 && path_access(path, acc, err, errsz) < 0) {
		*ctl_r = ctl;
		ms_control_free(ctl_r);
		return -1;
	}
	if (r == 0)
		r = uv_listen((uv_stream_t *)&ctl->pipe, 16, on_connection);
	if (r < 0) {
		snprintf(err, errsz, "control socket %s: %s", path,
			 uv_strerror(r));
		*ctl_r = ctl;
		ms_control_free(ctl_r);
		return -1;
	}
	*ctl_r = ctl;
	return 0;
}

static void on_ctl_close(uv_handle_t *h)
{
	struct ms_control *ctl = h->data;

	free(ctl->path);
	free(ctl);
}

void ms_control_free(struct ms_control **ctlp)
{
	struct ms_control *ctl = *ctlp;

	if (ctl == NULL)
		return;
	*ctlp = NULL;
	/* The clients' close callbacks may run after ctl's: they must not
	 * reach it. */
	while (ctl->clients != NULL) {
		struct cclient *cc = ctl->clients;

		ctl->clients = cc->next;
		cc->pprev = NULL;
		client_close(cc);
	}
	/* a migrate --all cut short: the users not reached stay as they
	 * are (their copies start at their logins, or the next run) */
	while (ctl->runs != NULL)
		run_end(ctl->runs);
	if (ctl->more != NULL)
		ms_close_free((uv_handle_t *)ctl->more, ctl->more);
	if (!ctl->listening) {
		free(ctl->path);
		free(ctl);
		return;
	}
	if (ctl->path != NULL)
		unlink(ctl->path);
	uv_close((uv_handle_t *)&ctl->pipe, on_ctl_close);
}
