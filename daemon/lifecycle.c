/* Each user's life, as the gateway runs it: where a login goes now
 * (routing by state and policy), held logins, the copy started on a first
 * login, the flip at the last log-off, the cutover, the rollback, recovery
 * at start, the sweep of users who never log in; the policies. See
 * docs/design.md.
 *
 * Per user (struct guser) we count open sessions, hold logins while the
 * user is being flipped, and keep the captured password in memory only for
 * as long as a copy needs it.
 *
 * It decides where a login goes, and when a user's held logins go on or
 * its sessions end; the sessions (gw_session.c) act on that. It reaches
 * them only through the struct gw_user_sessions given at start, never by
 * name; it speaks no protocol and holds no connection.
 */
#include <ctype.h>
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

static void rollback_start(struct ms_gateway *gw, struct guser *gu);

/* ---- policies and users ---- */

const char *ms_policy_name(enum ms_policy p)
{
	return p == MS_POLICY_HOLD ? "hold" : p == MS_POLICY_OFF ? "off" :
	       "passthrough";
}

int ms_policy_parse(const char *s, enum ms_policy *p)
{
	if (!strcmp(s, "passthrough"))
		*p = MS_POLICY_PASSTHROUGH;
	else if (!strcmp(s, "hold"))
		*p = MS_POLICY_HOLD;
	else if (!strcmp(s, "off"))
		*p = MS_POLICY_OFF;
	else
		return -1;
	return 0;
}

static struct guser *gw_user_get(struct ms_gateway *gw, const char *name)
{
	unsigned int h = ms_str_hash(name) % USER_BUCKETS;
	struct guser *gu;

	for (gu = gw->users[h]; gu != NULL; gu = gu->next)
		if (strcmp(gu->name, name) == 0)
			return gu;
	gu = calloc(1, sizeof(*gu));
	if (gu == NULL)
		return NULL;
	snprintf(gu->name, sizeof(gu->name), "%s", name);
	gu->next = gw->users[h];
	gw->users[h] = gu;
	return gu;
}

struct guser *gw_user_find(struct ms_gateway *gw, const char *name)
{
	for (struct guser *gu = gw->users[ms_str_hash(name) % USER_BUCKETS];
	     gu != NULL; gu = gu->next)
		if (strcmp(gu->name, name) == 0)
			return gu;
	return NULL;
}

/* The user's own policy, else its domain's, else the default. */
static enum ms_policy policy_of(enum ms_policy def,
				const struct ms_gw_domain *domains,
				unsigned int ndomains,
				const struct ms_user_info *info)
{
	enum ms_policy p = def;
	const char *at = strrchr(info->name, '@');

	if (info->policy[0] != '\0' && ms_policy_parse(info->policy, &p) == 0)
		return p;
	for (unsigned int i = 0; at != NULL && i < ndomains; i++)
		if (strcasecmp(domains[i].domain, at + 1) == 0)
			return domains[i].policy;
	return def;
}

static enum ms_policy user_policy(struct ms_gateway *gw,
				  const struct ms_user_info *info)
{
	return policy_of(gw->cfg.policy, gw->cfg.domains, gw->cfg.ndomains,
			 info);
}

/* The user's row, *found_r 0 when the store has none. With several
 * gateways, from the map in memory when it is current (cluster.h): a slow
 * database slows no login of a user it knows. */
static int user_find(struct ms_gateway *gw, const char *name,
		     struct ms_user_info *info, int *found_r)
{
	int r = gw->cluster != NULL ?
		ms_cluster_user(gw->cluster, name, info) : -1;

	if (r >= 0) {
		*found_r = r;
		return 0;
	}
	return ms_store_user_info(gw->store, name, info, found_r);
}

/* What an unknown user is: on the source, the default policy. */
static void unknown_user(const char *name, struct ms_user_info *info)
{
	memset(info, 0, sizeof(*info));
	snprintf(info->name, sizeof(info->name), "%s", name);
	snprintf(info->state, sizeof(info->state), "%s",
		 ms_user_state_names[MS_USER_SOURCE]);
}

/* The user's row, or what an unknown user would get (on the source, the
 * default policy): nothing is written. */
static int user_lookup(struct ms_gateway *gw, const char *name,
		       struct ms_user_info *info)
{
	int found = 0;

	if (user_find(gw, name, info, &found) < 0)
		return -1;
	if (!found)
		unknown_user(name, info);
	return 0;
}

/* The user's row, added when the user is unknown (on the source). Only
 * for users a server accepted, or the operator named. A user in the map
 * is read from it; adding one is a write, on the store's connection. */
static int user_state(struct ms_gateway *gw, const char *name,
		      struct ms_user_info *info)
{
	int64_t id;

	if (gw->cluster != NULL &&
	    ms_cluster_user(gw->cluster, name, info) == 1)
		return 0;
	if (ms_store_user_get(gw->store, name, &id) < 0)
		return -1;
	return user_lookup(gw, name, info);
}

/* user_state() for a login a server accepted: on several gateways' store
 * a user the map is sure not to hold is added over the cluster's
 * connection without waiting on the database (a first login), and is on
 * the source meanwhile, as its new row will say. */
static int login_user(struct ms_gateway *gw, const char *name,
		      struct ms_user_info *info)
{
	if (gw->cluster != NULL &&
	    ms_cluster_user(gw->cluster, name, info) == 0) {
		ms_cluster_user_add(gw->cluster, name);
		unknown_user(name, info);
		return 0;
	}
	return user_state(gw, name, info);
}

/* "USER: state STATE" at -v, once per change: the mover writes "copying"
 * and "failed" itself, and the gateway writes some states again (a last
 * delta's cutover, an operator's migrate, a copy that ends with sessions
 * open), so what was said last is kept per user. */
static void log_state(struct ms_gateway *gw, const char *name,
		      enum ms_user_state state)
{
	struct guser *gu = gw_user_find(gw, name);

	if (gu != NULL && gu->logged_state == (int)state + 1)
		return;
	if (gu != NULL)
		gu->logged_state = (int)state + 1;
	ms_info("%s: state %s", name, ms_user_state_names[state]);
}

/* ---- jobs and leases (docs/design.md, "Jobs and leases") ---- */

static unsigned int lease_ms(const struct ms_gateway *gw)
{
	return gw->cfg.job_lease * 1000;
}

/* The user's job for this gateway: 0 when it holds it now, -1 when
 * another gateway does (or the store failed). */
static int job_hold(struct ms_gateway *gw, struct guser *gu,
		    const char *kind)
{
	uint64_t sent = uv_hrtime();
	int taken;

	if (gu->job_held)
		return 0;
	if (ms_store_job_take(gw->store, gu->name, kind, gw->cfg.gw_name,
			      lease_ms(gw), &taken) < 0) {
		ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
		       ms_store_error(gw->store));
		return -1;
	}
	if (!taken) {
		ms_info("%s: its job runs on another gateway", gu->name);
		return -1;
	}
	gu->job_held = 1;
	gu->job_gen++;
	gu->lease_lost = 0;
	gu->lease_at = sent;
	return 0;
}

/* The job is not this gateway's (or may not be): the copy here stops,
 * and nothing more is written for the user. */
static void lease_drop(struct ms_gateway *gw, struct guser *gu,
		       const char *why)
{
	gu->job_held = 0;
	gu->lease_lost = 1;
	gu->flip_pending = 0;
	gu->cutover = 0;
	gu->rollback = 0;
	gu->force = 0;
	gu->flip_now = 0;
	gu->await_acks = 0;
	gu->begin_retry = 0;
	if (gu->quiet != NULL)
		uv_timer_stop(gu->quiet);
	if (gu->grace != NULL) {
		ms_close_free((uv_handle_t *)gu->grace, gu->grace);
		gu->grace = NULL;
	}
	if (gu->copying && gw->mover != NULL)
		ms_mover_cancel(gw->mover, gu->name, why);
	gw->user_sessions->release_held(gw, gu);
}

/* Another gateway took the user's job (this one's lease expired): the
 * copy here stops, and nothing more is written for the user. */
static void lease_lost(struct ms_gateway *gw, struct guser *gu)
{
	ms_warn("%s: lease lost: another gateway has the user's job; the "
		"copy here stops", gu->name);
	lease_drop(gw, gu, "lease lost to another gateway");
}

/* The mover's fence (ms_mover_set_fence): several gateways may act for a
 * user's copy only while its job's lease is sure to be theirs. The lease
 * runs on the database's clock from a renewal's commit, which comes after
 * its request was sent here: counted from the sending, with a twentieth
 * of it to spare (two clocks' rates, NTP's slewing), it has not run out
 * for the others either. A gateway stalled past that (its process
 * stopped, its host frozen) wakes up to answers its copy no longer takes:
 * it stops as if the lease were lost (the job is taken over, maybe by this
 * gateway again, once it has run out). On SQLite nobody else takes a job
 * over. */
static int copy_fence(void *ctx, const char *user)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = gw_user_find(gw, user);
	uint64_t lease_ns = (uint64_t)lease_ms(gw) * 1000000, age;

	if (gw->cluster == NULL || gu == NULL || !gu->job_held)
		return 1;
	age = uv_hrtime() - gu->lease_at;
	if (age < lease_ns - lease_ns / 20)
		return 1;
	ms_warn("%s: lease lost here: last confirmed %.1f s ago, another "
		"gateway may have the job; the copy here stops", gu->name,
		(double)age / 1e9);
	lease_drop(gw, gu, "its job's lease not confirmed in time");
	return 0;
}

/* The user's state written with the job: a final state (destination,
 * failed, source) ends it, any other renews it, in one transaction, and
 * only while this gateway still holds it. 1: the job was lost. */
static int job_state(struct ms_gateway *gw, struct guser *gu, int64_t id,
		     enum ms_user_state state, const char *error,
		     const int64_t *joins)
{
	int final = state == MS_USER_DESTINATION || state == MS_USER_FAILED ||
		    state == MS_USER_SOURCE;
	int held = 0, alone = 0, r = 0;
	uint64_t sent = uv_hrtime();

	if (ms_store_begin(gw->store) < 0)
		return -1;
	/* 2: another gateway came (or came and went) meanwhile */
	if (joins != NULL &&
	    (r = ms_store_gateway_alone(gw->store, *joins, &alone)) == 0 &&
	    !alone)
		r = 2;
	if (r == 0)
		r = final ? ms_store_job_end(gw->store, id, gw->cfg.gw_name,
					     state == MS_USER_FAILED ?
					     "failed" : "done", error,
					     &held) :
			ms_store_job_renew(gw->store, gu->name,
					   gw->cfg.gw_name, lease_ms(gw),
					   &held);
	if (r == 0 && !held)
		r = 1;
	if (r == 0)
		r = ms_store_user_set_state(gw->store, id,
					    ms_user_state_names[state], error);
	if (r != 0) {
		ms_store_rollback(gw->store);
		return r;
	}
	if (ms_store_commit(gw->store) < 0)
		return -1;
	if (final)
		gu->job_held = 0;
	else
		gu->lease_at = sent;
	return 0;
}

/* What follows a state written for the user. */
static void state_written(struct ms_gateway *gw, const char *name,
			  enum ms_user_state state)
{
	/* backend = kmod: the kernel resets what is left behind. */
	ms_steer_user_state(name, state);
	/* A final state ended the user's cutover request with it. */
	if (gw->cluster != NULL && state != MS_USER_CUTOVER &&
	    state != MS_USER_COPYING)
		ms_cluster_settle(gw->cluster, name);
}

static int store_state(struct ms_gateway *gw, const char *name,
		       enum ms_user_state state, const char *error)
{
	struct guser *gu = gw_user_find(gw, name);
	int64_t id;
	int r = 0;

	if (gu != NULL && gu->lease_lost)
		return -1;
	if (ms_store_user_get(gw->store, name, &id) < 0 ||
	    (gu != NULL && gu->job_held ?
	     (r = job_state(gw, gu, id, state, error, NULL)) != 0 :
	     ms_store_user_set_state(gw->store, id, ms_user_state_names[state],
				     error) < 0)) {
		if (r == 1) {
			lease_lost(gw, gu);
			return -1;
		}
		ms_log(MS_LOG_ERROR, "%s: store: %s", name,
		       ms_store_error(gw->store));
		return -1;
	}
	state_written(gw, name, state);
	return 0;
}

/* Several gateways' store: as the copy begins, whether any other gateway
 * is there (a row of its, live or not). None: the flip may go without a
 * cutover if none came meanwhile either (flip_alone). */
static void joins_note(struct ms_gateway *gw, struct guser *gu)
{
	int others = 0;

	gu->alone = 0;
	if (gw->cluster == NULL || gu->cutover || gu->rollback)
		return;
	if (ms_store_gateway_joins(gw->store, gw->cfg.gw_name, &gu->joins,
				   &others) < 0) {
		ms_warn("%s: store: %s: its flip goes through a cutover",
			gu->name, ms_store_error(gw->store));
		return;
	}
	gu->alone = others == 0;
}

/* The copy verified, nobody touched the source through this gateway
 * meanwhile, and no other gateway was there as it began: the flip, in
 * the job's transaction, if none came (or came and went) since; the
 * count of joins stays locked until the commit, so one starting now sees
 * the flip once it is in. 0: flipped (or the job was lost); 1: not alone
 * or not sure, nothing written (a cutover then). */
static int flip_alone(struct ms_gateway *gw, struct guser *gu)
{
	int64_t id;
	int r;

	if (!gu->alone || !gu->job_held || gu->lease_lost)
		return 1;
	gu->alone = 0;
	if (ms_store_user_get(gw->store, gu->name, &id) < 0) {
		ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
		       ms_store_error(gw->store));
		return 1;
	}
	MS_CRASH_POINT("cutover.flip-before");
	r = job_state(gw, gu, id, MS_USER_DESTINATION, NULL, &gu->joins);
	if (r == 2) {
		ms_info("%s: another gateway started during the copy: a "
			"cutover", gu->name);
		return 1;
	}
	if (r == 1) {
		lease_lost(gw, gu);
		return 0;
	}
	if (r < 0) {
		ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
		       ms_store_error(gw->store));
		return 1;
	}
	MS_CRASH_POINT("cutover.flip-after");
	state_written(gw, gu->name, MS_USER_DESTINATION);
	log_state(gw, gu->name, MS_USER_DESTINATION);
	return 0;
}

/* The job ends without a state of the user's written (nothing to copy
 * here now): any gateway may take it again. */
static void job_release(struct ms_gateway *gw, struct guser *gu)
{
	int64_t id;
	int held;

	if (!gu->job_held)
		return;
	gu->job_held = 0;
	if (ms_store_user_get(gw->store, gu->name, &id) < 0 ||
	    ms_store_job_end(gw->store, id, gw->cfg.gw_name, "done", NULL,
			     &held) < 0)
		ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
		       ms_store_error(gw->store));
}

static void set_state(struct ms_gateway *gw, const char *name,
		      enum ms_user_state state, const char *error)
{
	if (store_state(gw, name, state, error) == 0)
		log_state(gw, name, state);
}

/* ---- the quiet period before a flip ([policy] flip_quiet) ---- */

static uint64_t quiet_ms(const struct ms_gateway *gw)
{
	return MS_TEST_TIME(gw->cfg.flip_quiet * 1000ULL);
}

/* Whether the user's last session to a server ended less than flip_quiet
 * ago. */
static int left_just_now(struct ms_gateway *gw, const struct guser *gu)
{
	return gw->cfg.flip_quiet > 0 && gu->idle_since != 0 &&
		uv_now(gw->loop) - gu->idle_since < quiet_ms(gw);
}

static void on_quiet(uv_timer_t *t)
{
	struct guser *gu = t->data;

	/* Back meanwhile: the end of that session waits again. */
	if (gu->sessions > 0 || !gu->flip_pending || gu->copying)
		return;
	gu->flip_pending = 0;
	gw_cutover_begin(gu->gw, gu);
}

/* A verified user with no session open: the cutover begins once none has
 * been open for flip_quiet, so that a client that reconnects for each
 * folder (neomutt) is not flipped between two connections. A login
 * meanwhile goes to the source as before (the user is still copying) and
 * its end starts the wait again. The operator's move does not wait. */
void gw_flip_when_quiet(struct ms_gateway *gw, struct guser *gu)
{
	uint64_t idle = uv_now(gw->loop) - gu->idle_since;

	if (gu->flip_now || !left_just_now(gw, gu)) {
		gu->flip_now = 0;
		gu->flip_pending = 0;
		if (gu->quiet != NULL)
			uv_timer_stop(gu->quiet);
		gw_cutover_begin(gw, gu);
		return;
	}
	if (gu->quiet == NULL) {
		gu->quiet = malloc(sizeof(*gu->quiet));
		if (gu->quiet == NULL) {
			gu->flip_now = 1;
			gw_flip_when_quiet(gw, gu);
			return;
		}
		gu->gw = gw;
		uv_timer_init(gw->loop, gu->quiet);
		gu->quiet->data = gu;
	}
	ms_info("%s: no session open: flips in %u s unless the user logs in "
		"again", gu->name, gw->cfg.flip_quiet);
	uv_timer_start(gu->quiet, on_quiet, quiet_ms(gw) - idle, 0);
}

/* ---- routing and a user's life ---- */

static void held_release(struct ms_gateway *gw, struct guser *gu)
{
	gw->user_sessions->release_held(gw, gu);
}

static int sessions_kick(struct ms_gateway *gw, const char *user)
{
	return gw->user_sessions->kick(gw, user);
}

/* A mover job starts. The first of a busy spell notes the mover's counts
 * so far: `status` shows the running copies' progress, not the sum of
 * every copy since the start. */
static void copies_start(struct ms_gateway *gw)
{
	if (gw->copies++ == 0 && gw->mover != NULL)
		ms_mover_progress(gw->mover, &gw->copies_base);
}

/* A mover job of the user's ended: the user, or NULL when unknown. */
static struct guser *job_ended(struct ms_gateway *gw, const char *user)
{
	struct guser *gu = gw_user_find(gw, user);

	gw->copies--;
	if (gu != NULL)
		gu->copying = 0;
	return gu;
}

static void on_copy_done(const struct ms_user_report *rep, void *ctx)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = job_ended(gw, rep->user);

	if (gu == NULL)
		return;
	if (gu->lease_lost) {
		/* stopped: the user is another gateway's now */
		ms_secret_free(&gu->pw);
		held_release(gw, gu);
		return;
	}
	/* A copy's own time, for the site's ETA (a last delta is part of
	 * a move measured already). */
	if (rep->ok && !gu->cutover)
		ms_eta_note(&gw->eta, uv_now(gw->loop), rep->seconds -
			    rep->phase_ms[MS_PH_QUEUE] / 1e3, rep->copied,
			    rep->bytes);
	if (!rep->ok) {
		ms_warn("%s: copy failed: %s", gu->name,
			rep->error != NULL ? rep->error : "?");
		gu->cutover = 0;
		gu->flip_pending = 0;
		set_state(gw, gu->name, MS_USER_FAILED, rep->error);
		ms_secret_free(&gu->pw);
		held_release(gw, gu);
		return;
	}
	ms_info("%s: copy verified: %llu messages, %llu bytes copied",
		gu->name, (unsigned long long)rep->copied,
		(unsigned long long)rep->bytes);
	if (!gu->cutover && gu->sessions == 0 && left_just_now(gw, gu)) {
		/* The user's last session ended a moment ago: maybe a client
		 * between two connections (one per folder). Held logins wait
		 * for the flip. */
		set_state(gw, gu->name, MS_USER_COPYING, NULL);
		gu->flip_pending = 1;
		gw_flip_when_quiet(gw, gu);
		return;
	}
	if (!gu->cutover && gu->sessions == 0 && !gu->touched &&
	    gw->cluster != NULL && flip_alone(gw, gu) == 0) {
		/* No other gateway there since the copy began: flipped as
		 * with one gateway on its own store. */
		gu->flip_pending = 0;
		ms_secret_free(&gu->pw);
		held_release(gw, gu);
		return;
	}
	if (!gu->cutover && gu->sessions == 0 &&
	    (gu->touched || gw->cluster != NULL)) {
		/* The user worked on the source while this copy ran and has
		 * logged off since: a last delta, with nobody on the
		 * source, before the flip. With several gateways, always
		 * (but above): the others may have had sessions, which the
		 * cutover's request ends before its delta. */
		gw_cutover_begin(gw, gu);
		return;
	}
	if (gu->cutover || gu->sessions == 0) {
		/* Verified with no session open (a last delta, or a copy
		 * nobody touched the source during): the map flips; held
		 * logins go on. */
		gu->cutover = 0;
		gu->flip_pending = 0;
		ms_secret_free(&gu->pw);
		MS_CRASH_POINT("cutover.flip-before");
		set_state(gw, gu->name, MS_USER_DESTINATION, NULL);
		MS_CRASH_POINT("cutover.flip-after");
		held_release(gw, gu);
		return;
	}
	/* Sessions are open on the source: flip when the last one ends. */
	set_state(gw, gu->name, MS_USER_COPYING, NULL);
	gu->flip_pending = 1;
	held_release(gw, gu);
	if (gu->force) {
		/* The operator wants it now: end the sessions; the last one
		 * to go starts the cutover, with no quiet period. */
		gu->force = 0;
		gu->flip_now = 1;
		sessions_kick(gw, gu->name);
	}
}

static int gw_have_admin(const struct ms_gateway *gw)
{
	return gw->cfg.src_admin != NULL && gw->cfg.dst_admin != NULL;
}

static void user_copy_start(struct ms_gateway *gw, struct guser *gu)
{
	if (gu->copying || gw->mover == NULL ||
	    (gu->pw == NULL && !gw_have_admin(gw)))
		return;
	/* A first login's copy too: never at once with another gateway's
	 * job for the user. */
	if (job_hold(gw, gu, "login") < 0)
		return;
	gu->copying = 1;
	copies_start(gw);
	gu->touched = gu->sessions > 0;
	joins_note(gw, gu);
	/* A side with an admin login uses it (the user's own password is
	 * not the admin's); the other side the captured password. */
	if (ms_mover_add_user(gw->mover, gu->name,
			      gw->cfg.src_admin != NULL ? NULL : gu->pw,
			      gw->cfg.dst_admin != NULL ? NULL : gu->pw,
			      on_copy_done, gw) < 0) {
		gu->copying = 0;
		gw->copies--;
		set_state(gw, gu->name, MS_USER_FAILED,
			  "cannot start the copy");
		return;
	}
	ms_info("%s: copy started%s", gu->name, gu->cutover ?
		" (the last delta)" : "");
	/* The mover wrote "copying"; a last delta's user stays in cutover
	 * (written back). */
	if (gu->cutover)
		store_state(gw, gu->name, MS_USER_CUTOVER, NULL);
	else
		log_state(gw, gu->name, MS_USER_COPYING);
}

/* Cutover: from now on logins are held and inbound mail for the user is
 * deferred (451). The source's MTA gets a moment to deliver what it took
 * before the deferrals began; then the last delta runs. */
#define CUTOVER_GRACE_MS 2000

/* In the store's last_error of a user in cutover: the cutover runs back to
 * the source (a crash in it is told apart at the next start). */
#define ROLLBACK_MARK "rolling back to the source"

/* The grace is over: the last delta, or the rollback's reverse delta. */
static void grace_over(struct ms_gateway *gw, struct guser *gu)
{
	if (gu->rollback)
		rollback_start(gw, gu);
	else
		user_copy_start(gw, gu);
}

static void on_grace(uv_timer_t *t)
{
	struct guser *gu = t->data;
	struct ms_gateway *gw = gu->gw;

	ms_close_free((uv_handle_t *)t, t);
	gu->grace = NULL;
	if (gu->begin_retry) {
		gu->begin_retry = 0;
		gw_cutover_begin(gw, gu);
		return;
	}
	/* Logins held, sessions ended, mail deferred; no delta begun. */
	MS_CRASH_POINT(gu->rollback ? "rollback.grace" : "cutover.grace");
	/* Several gateways: the delta waits until every live one has held
	 * the user's logins and ended its sessions (cl_acked). */
	if (gw->cluster != NULL && !ms_cluster_ready(gw->cluster, gu->name)) {
		gu->await_acks = 1;
		return;
	}
	grace_over(gw, gu);
}

/* The cutover's state and, with several gateways, its request to the
 * others, in one transaction. 1: the user's job is another gateway's
 * now (nothing more to do here). */
static int cutover_write(struct ms_gateway *gw, struct guser *gu)
{
	const char *mark = gu->rollback ? ROLLBACK_MARK : NULL;
	int64_t id;

	if (gw->cluster == NULL) {
		set_state(gw, gu->name, MS_USER_CUTOVER, mark);
		return 0;
	}
	if (ms_store_user_get(gw->store, gu->name, &id) < 0 ||
	    ms_store_begin(gw->store) < 0)
		goto fail;
	if (store_state(gw, gu->name, MS_USER_CUTOVER, mark) < 0) {
		ms_store_rollback(gw->store);
		if (gu->lease_lost)
			return 1;
		return -1;		/* said by store_state() */
	}
	if (ms_cluster_request(gw->cluster, gw->store, id, gu->name,
			       gu->rollback ? "rollback" : "cutover") < 0 ||
	    ms_store_commit(gw->store) < 0) {
		ms_store_rollback(gw->store);
		goto fail;
	}
	log_state(gw, gu->name, MS_USER_CUTOVER);
	return 0;
fail:
	ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
	       ms_store_error(gw->store));
	return -1;
}

void gw_cutover_begin(struct ms_gateway *gw, struct guser *gu)
{
	int r;

	gu->cutover = 1;
	r = cutover_write(gw, gu);
	if (r > 0 || gu->grace != NULL)
		return;
	gu->grace = malloc(sizeof(*gu->grace));
	if (gu->grace == NULL) {
		if (r == 0)
			grace_over(gw, gu);
		return;
	}
	gu->gw = gw;
	uv_timer_init(gw->loop, gu->grace);
	gu->grace->data = gu;
	/* The others cannot be told: no delta, the request is written
	 * again in a second (logins held here meanwhile). */
	if (r < 0) {
		ms_warn("%s: cannot ask the other gateways for the cutover: "
			"again in 1 s", gu->name);
		gu->begin_retry = 1;
		uv_timer_start(gu->grace, on_grace, 1000, 0);
		return;
	}
	uv_timer_start(gu->grace, on_grace, CUTOVER_GRACE_MS, 0);
}

/* A login held for hold_max_seconds: 1 when it goes on to the source
 * (the user is being copied: the copy goes on), 0 when it is refused (in
 * cutover; or the store failed). */
int gw_hold_over_to_source(struct ms_gateway *gw, const char *name)
{
	struct ms_user_info info;

	if (gw->cluster != NULL && (!ms_cluster_sure(gw->cluster) ||
				    ms_cluster_holds(gw->cluster, name)))
		return 0;
	return user_lookup(gw, name, &info) == 0 &&
	       !ms_user_in(&info, MS_USER_CUTOVER);
}

/* Decides where a logging-in user's session goes, now; held: the session
 * is held already. Nothing is kept for a user no server has accepted a
 * password of yet: gu is NULL for them (unknown to us, or known from the
 * store only). */
enum gw_login_way gw_route_login(struct ms_gateway *gw, struct guser *gu,
				 const char *name, int held,
				 const char **why_r)
{
	struct ms_user_info info;
	enum ms_policy pol;

	/* Several gateways: what the others wrote is not known now (this
	 * one lost touch, or has not caught up since). */
	if (gw->cluster != NULL && !ms_cluster_sure(gw->cluster)) {
		*why_r = "not caught up with the other gateways";
		return GW_LOGIN_UNSURE;
	}
	if (user_lookup(gw, name, &info) < 0) {
		*why_r = ms_store_error(gw->store);
		return gw->cluster != NULL ? GW_LOGIN_UNSURE : GW_LOGIN_FAIL;
	}
	pol = user_policy(gw, &info);
	if (ms_user_in(&info, MS_USER_DESTINATION))
		return GW_LOGIN_DESTINATION;
	if (ms_user_in(&info, MS_USER_CUTOVER) || (gu != NULL && gu->cutover) ||
	    (gw->cluster != NULL && ms_cluster_holds(gw->cluster, name)))
		return GW_LOGIN_HOLD;
	if (held)
		return GW_LOGIN_SOURCE;	/* released: the copy ended, or
					   the hold timed out */
	if (ms_user_in(&info, MS_USER_SOURCE) && pol == MS_POLICY_HOLD &&
	    gw->mover != NULL && (gu == NULL || !gu->copying))
		return GW_LOGIN_CHECK_HOLD;
	if (gu != NULL && gu->copying && pol == MS_POLICY_HOLD &&
	    ms_user_in(&info, MS_USER_COPYING) && gu->sessions == 0)
		return GW_LOGIN_HOLD;
	return GW_LOGIN_SOURCE;
}

/* The server accepted the user's password: from now on the user exists
 * for us (a row in the store, per-user state in memory). A passthrough
 * user's first login, or a hold's password check (s->verify_only),
 * starts the copy with the captured password. -1 when the session
 * failed instead. */
int gw_login_accepted(struct session *s, const char **why_r)
{
	struct ms_gateway *gw = s->gw;
	const char *name = ms_login_name(&s->login);
	struct ms_user_info info;
	struct guser *gu;

	/* A login routed while this gateway was sure, which the server
	 * accepts after it ended its relays (it may be fenced): not let
	 * in. */
	if (gw->cluster != NULL && !s->verify_only &&
	    !ms_cluster_sure(gw->cluster)) {
		*why_r = "not caught up with the other gateways";
		return -1;
	}
	if (login_user(gw, name, &info) < 0) {
		*why_r = ms_store_error(gw->store);
		return -1;
	}
	/* A login routed to the source before a cutover's request came:
	 * not let in behind the others' backs. */
	if (gw->cluster != NULL && !s->to_dst && !s->verify_only &&
	    ms_cluster_holds(gw->cluster, name)) {
		*why_r = "the user's cutover began meanwhile";
		return -1;
	}
	if (s->gu == NULL && (s->gu = gw_user_get(gw, name)) == NULL) {
		*why_r = "out of memory";
		return -1;
	}
	gu = s->gu;
	if (!s->counted && !s->verify_only) {
		/* Connected to a server from now on: the flip waits for
		 * the user's last such session. */
		gu->sessions++;
		s->counted = 1;
		if (!s->to_dst)
			gu->touched = 1;
	}
	if (!s->verify_only &&
	    (s->to_dst || (!ms_user_in(&info, MS_USER_SOURCE) &&
			   !ms_user_in(&info, MS_USER_COPYING)) ||
	     user_policy(gw, &info) != MS_POLICY_PASSTHROUGH ||
	     gw->cfg.src_imap.host[0] == '\0' ||
	     gw->cfg.dst_imap.host[0] == '\0'))
		return 0;
	ms_secret_free(&gu->pw);
	gu->pw = strdup(s->login.pass);
	user_copy_start(gw, gu);
	return 0;
}

/* ---- policies, as the control socket sets them ---- */

json_t *ms_gateway_policies(struct ms_gateway *gw)
{
	json_t *o = json_object(), *d = json_object();

	json_object_set_new(o, "default", json_string(
		ms_policy_name(gw->cfg.policy)));
	for (unsigned int i = 0; i < gw->cfg.ndomains; i++)
		json_object_set_new(d, gw->cfg.domains[i].domain, json_string(
			ms_policy_name(gw->cfg.domains[i].policy)));
	json_object_set_new(o, "domains", d);
	json_object_set_new(o, "hold_max_seconds",
			    json_integer(gw->cfg.hold_max_seconds));
	/* Which of those were set at run time ("" = the default). */
	json_object_set(o, "set", gw->policy_set);
	return o;
}

static int policy_collect(void *ctx, const char *scope, const char *policy)
{
	json_object_set_new(ctx, scope, json_string(policy));
	return 0;
}

/* cfg's policies = the config file's, then set's (the store's overrides,
 * taken over). */
static void policies_apply(struct ms_gateway *gw, json_t *set)
{
	json_t *v;
	const char *scope;

	gw->cfg.policy = gw->conf_policy;
	gw->cfg.ndomains = gw->conf_ndomains;
	memcpy(gw->cfg.domains, gw->conf_domains, sizeof(gw->cfg.domains));
	json_object_foreach(set, scope, v) {
		enum ms_policy p;
		unsigned int i;

		if (ms_policy_parse(json_string_value(v), &p) < 0)
			continue;
		if (*scope == '\0') {
			gw->cfg.policy = p;
			continue;
		}
		for (i = 0; i < gw->cfg.ndomains; i++)
			if (!strcasecmp(gw->cfg.domains[i].domain, scope))
				break;
		if (i == MS_GW_MAX_DOMAINS)
			continue;	/* refused when it was set */
		if (i == gw->cfg.ndomains) {
			snprintf(gw->cfg.domains[i].domain,
				 sizeof(gw->cfg.domains[i].domain), "%s",
				 scope);
			gw->cfg.ndomains++;
		}
		gw->cfg.domains[i].policy = p;
	}
	json_decref(gw->policy_set);
	gw->policy_set = set;
}

int gw_policies_load(struct ms_gateway *gw, char *err, size_t errsz)
{
	json_t *set = json_object();

	if (ms_store_policy_foreach(gw->store, policy_collect, set) != 0) {
		snprintf(err, errsz, "store: %s", ms_store_error(gw->store));
		json_decref(set);
		return -1;
	}
	policies_apply(gw, set);
	return 0;
}

int ms_gateway_set_policy(struct ms_gateway *gw, const char *domain,
			  const char *policy, char *err, size_t errsz)
{
	char lower[sizeof(gw->cfg.domains[0].domain)];
	enum ms_policy p;

	if (domain != NULL) {
		unsigned int n = 0;

		if (*domain == '\0' || strlen(domain) >=
		    sizeof(gw->cfg.domains[0].domain) ||
		    strpbrk(domain, "@ \t\r\n\"\\") != NULL) {
			snprintf(err, errsz, "invalid domain \"%s\"", domain);
			return -1;
		}
		for (size_t i = 0; i <= strlen(domain); i++)
			lower[i] = (char)tolower((unsigned char)domain[i]);
		domain = lower;
		for (unsigned int i = 0; i < gw->cfg.ndomains; i++)
			n += strcasecmp(gw->cfg.domains[i].domain, domain) != 0;
		if (policy != NULL && n >= MS_GW_MAX_DOMAINS) {
			snprintf(err, errsz, "at most %d domains have a policy",
				 MS_GW_MAX_DOMAINS);
			return -1;
		}
	}
	if (policy != NULL && ms_policy_parse(policy, &p) < 0) {
		snprintf(err, errsz, "invalid policy \"%s\" (passthrough, hold "
			 "or off)", policy);
		return -1;
	}
	if (ms_store_begin(gw->store) < 0 ||
	    ms_store_lock_wait(gw->store, ms_gateway_change_lock_ms(gw)) < 0 ||
	    ms_store_policy_set(gw->store, domain != NULL ? domain : "",
				policy) < 0 || ms_store_commit(gw->store) < 0) {
		ms_store_refusal(gw->store, err, errsz);
		ms_store_rollback(gw->store);
		return -1;
	}
	ms_info("policy of %s%s: %s", domain != NULL ? "@" : "",
		domain != NULL ? domain : "every user (the default)",
		policy != NULL ? policy : "the config file's again");
	return gw_policies_load(gw, err, errsz);
}

enum ms_route ms_gw_route(struct ms_gateway *gw, const char *user)
{
	struct ms_user_info info;
	struct guser *gu = gw_user_find(gw, user);
	int found = 0;

	if (gu != NULL && gu->cutover)
		return MS_ROUTE_DEFER;
	/* Several gateways: never on a guess (451: the MTA tries again). */
	if (gw->cluster != NULL && (!ms_cluster_sure(gw->cluster) ||
				    ms_cluster_holds(gw->cluster, user)))
		return MS_ROUTE_DEFER;
	if (user_find(gw, user, &info, &found) < 0)
		return gw->cluster != NULL ? MS_ROUTE_DEFER : MS_ROUTE_SOURCE;
	if (!found)
		return MS_ROUTE_SOURCE;
	if (ms_user_in(&info, MS_USER_DESTINATION))
		return MS_ROUTE_DESTINATION;
	if (ms_user_in(&info, MS_USER_CUTOVER))
		return MS_ROUTE_DEFER;
	/* Mail for the source while the user's copy runs may land after
	 * its folder was read: the flip then needs a cutover (mail
	 * deferred, the source's MTA given its grace, a last delta). */
	if (gu != NULL && (gu->copying || gu->flip_pending))
		gu->touched = 1;
	return MS_ROUTE_SOURCE;
}

int ms_gateway_migrate(struct ms_gateway *gw, const char *user,
		       const char **error_r)
{
	struct ms_user_info info;
	struct guser *gu;

	if (gw->mover == NULL) {
		*error_r = "no [source] and [destination] imap configured";
		return -1;
	}
	if (user_state(gw, user, &info) < 0) {
		*error_r = ms_store_error(gw->store);
		return -1;
	}
	if (ms_user_in(&info, MS_USER_DESTINATION)) {
		*error_r = "already on the destination";
		return 1;
	}
	gu = gw_user_get(gw, user);
	if (gu == NULL) {
		*error_r = "out of memory";
		return -1;
	}
	if (gu->pw == NULL && !gw_have_admin(gw)) {
		*error_r = "needs admin logins ([source] admin, [destination] "
			   "admin) or a login of the user since the start";
		return -1;
	}
	if (!gu->copying && !gu->flip_pending &&
	    job_hold(gw, gu, "migrate") < 0)
		return 0;	/* moved by the gateway that has its job */
	gu->force = 1;
	if (gu->flip_pending) {
		gu->force = 0;
		gu->flip_now = 1;
		if (gu->sessions == 0 && !gu->copying)
			gw_flip_when_quiet(gw, gu);	/* in its quiet period */
		else
			sessions_kick(gw, user);
		return 0;
	}
	if (!gu->copying) {
		set_state(gw, user, MS_USER_COPYING, NULL);
		user_copy_start(gw, gu);
	}
	return 0;
}

/* ---- rollback: the destination's changes back to the source ---- */

/* The rollback's flip: state source and policy off in one transaction. (A
 * crash between two writes would leave a user sent back on purpose whom the
 * next login moves again.) */
static int rollback_flip(struct ms_gateway *gw, const char *name)
{
	int64_t id;

	if (ms_store_user_get(gw->store, name, &id) < 0 ||
	    ms_store_begin(gw->store) < 0)
		return -1;
	if (job_state(gw, gw_user_find(gw, name), id, MS_USER_SOURCE,
		      NULL, NULL) != 0 ||
	    ms_store_user_set_policy(gw->store, id, "off") < 0 ||
	    ms_store_user_set_state(gw->store, id,
				    ms_user_state_names[MS_USER_SOURCE],
				    NULL) < 0 ||
	    ms_store_commit(gw->store) < 0) {
		ms_store_rollback(gw->store);
		return -1;
	}
	/* backend = kmod: as store_state() does (the kernel had cutover). */
	ms_steer_user_state(name, MS_USER_SOURCE);
	if (gw->cluster != NULL)
		ms_cluster_settle(gw->cluster, name);
	return 0;
}

static void on_rollback_done(const struct ms_user_report *rep, void *ctx)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = job_ended(gw, rep->user);

	if (gu == NULL)
		return;
	gu->cutover = 0;
	gu->rollback = 0;
	if (gu->lease_lost) {
		held_release(gw, gu);
		return;
	}
	if (rep->ok) {
		ms_info("%s: rolled back: %llu messages copied to the source, "
			"%llu flag changes, %llu expunged; policy off", gu->name,
			(unsigned long long)rep->copied,
			(unsigned long long)rep->flags_updated,
			(unsigned long long)rep->expunged);
		/* Sent back on purpose: neither the next login nor the
		 * sweep moves the user again until the operator says so
		 * (policy, or migrate --daemon). */
		MS_CRASH_POINT("rollback.flip-before");
		if (rollback_flip(gw, gu->name) < 0)
			ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
			       ms_store_error(gw->store));
		else
			log_state(gw, gu->name, MS_USER_SOURCE);
		MS_CRASH_POINT("rollback.flip-after");
	} else {
		/* The destination still holds everything: stay there. */
		ms_warn("%s: rollback failed: %s", gu->name,
			rep->error != NULL ? rep->error : "?");
		set_state(gw, gu->name, MS_USER_DESTINATION,
			  rep->error != NULL ? rep->error : "rollback failed");
	}
	held_release(gw, gu);
}

static void rollback_start(struct ms_gateway *gw, struct guser *gu)
{
	gu->copying = 1;
	copies_start(gw);
	if (ms_mover_add_rollback(gw->mover, gu->name, NULL, NULL,
				  on_rollback_done, gw) < 0) {
		struct ms_user_report rep = {
			.user = gu->name,
			.error = "cannot start the rollback",
		};

		on_rollback_done(&rep, gw);
	}
}

int ms_gateway_rollback(struct ms_gateway *gw, const char *user,
			const char **error_r)
{
	struct ms_user_info info;
	struct guser *gu;

	if (gw->mover == NULL) {
		*error_r = "no [source] and [destination] imap configured";
		return -1;
	}
	if (!gw_have_admin(gw)) {
		*error_r = "needs admin logins ([source] admin, [destination] "
			   "admin)";
		return -1;
	}
	if (user_lookup(gw, user, &info) < 0) {
		*error_r = ms_store_error(gw->store);
		return -1;
	}
	if (!ms_user_in(&info, MS_USER_DESTINATION)) {
		*error_r = "not on the destination";
		return -1;
	}
	if ((gu = gw_user_get(gw, user)) == NULL) {
		*error_r = "out of memory";
		return -1;
	}
	if (gu->copying || gu->cutover) {
		*error_r = "a copy runs for the user";
		return -1;
	}
	if (job_hold(gw, gu, "rollback") < 0) {
		*error_r = "a job of the user runs on another gateway";
		return -1;
	}
	/* As a cutover the other way: logins held, sessions ended, mail
	 * deferred, the destination's MTA given its grace, then the
	 * reverse delta; verified, the map flips back. */
	gu->rollback = 1;
	gw_cutover_begin(gw, gu);
	sessions_kick(gw, user);
	return 0;
}

const char *ms_gateway_user_copy(struct ms_gateway *gw, const char *user)
{
	struct guser *gu = gw_user_find(gw, user);

	if (gu == NULL)
		return "";
	if (gu->rollback)
		return "rolling back";
	if (gu->copying)
		return gu->cutover ? "last delta" : "copying";
	if (gu->flip_pending)
		return "verified, flips at log-off";
	return "";
}

unsigned int ms_gateway_user_sessions(struct ms_gateway *gw, const char *user)
{
	struct guser *gu = gw_user_find(gw, user);

	return gu != NULL ? gu->sessions : 0;
}

/* The running copies' progress; nothing when none runs ("copying now"
 * is said only while something copies). */
void ms_gateway_progress(struct ms_gateway *gw, struct ms_progress *p)
{
	const struct ms_progress *b = &gw->copies_base;

	memset(p, 0, sizeof(*p));
	if (gw->mover == NULL || gw->copies == 0)
		return;
	ms_mover_progress(gw->mover, p);
	p->msgs_todo -= b->msgs_todo;
	p->msgs_done -= b->msgs_done;
	p->bytes_done -= b->bytes_done;
	p->seconds -= b->seconds;
}

/* ---- the site's ETA ---- */

/* The site's sizes, counted on whichever thread reads the store: the
 * policies as they were when asked (the loop may change them). */
struct ms_site_read {
	enum ms_policy policy;
	struct ms_gw_domain domains[MS_GW_MAX_DOMAINS];
	unsigned int ndomains;
	struct ms_eta_sizes t;
};

static int eta_user(void *ctx, const struct ms_user_info *u,
		    const struct ms_user_size *sz)
{
	struct ms_site_read *sr = ctx;
	enum ms_eta_kind kind = MS_ETA_LEFT;

	if (ms_user_in(u, MS_USER_DESTINATION))
		kind = MS_ETA_MOVED;
	else if (ms_user_in(u, MS_USER_FAILED))
		kind = MS_ETA_FAILED;
	else if (policy_of(sr->policy, sr->domains, sr->ndomains, u) ==
		 MS_POLICY_OFF)
		kind = MS_ETA_OFF;
	ms_eta_count(&sr->t, kind, u, sz);
	return 0;
}

struct ms_site_read *ms_gateway_site_prepare(struct ms_gateway *gw)
{
	struct ms_site_read *sr = calloc(1, sizeof(*sr));

	if (sr == NULL)
		return NULL;
	sr->policy = gw->cfg.policy;
	sr->ndomains = gw->cfg.ndomains;
	memcpy(sr->domains, gw->cfg.domains, sizeof(sr->domains));
	return sr;
}

int ms_site_read(struct ms_store *store, struct ms_site_read *sr)
{
	memset(&sr->t, 0, sizeof(sr->t));
	return ms_store_size_foreach(store, eta_user, sr) != 0 ? -1 : 0;
}

json_t *ms_gateway_site_json(struct ms_gateway *gw,
			     const struct ms_site_read *sr)
{
	return ms_eta_json(&gw->eta, &sr->t);
}

/* Every user with the survey's size, counted as the sweep and migrate
 * --all see them; the estimate from the copies measured so far. */
json_t *ms_gateway_site(struct ms_gateway *gw)
{
	struct ms_site_read *sr = ms_gateway_site_prepare(gw);
	json_t *j = NULL;

	if (sr != NULL && ms_site_read(gw->store, sr) == 0)
		j = ms_gateway_site_json(gw, sr);
	free(sr);
	return j;
}

/* ---- after a restart, the sweep, and jobs taken over ---- */

/* A job this gateway has just taken (a resumed one, one claimed from the
 * queue, or one whose owner's lease expired): the user's state tells what
 * is left to do. why: said when the copy starts. */
static void job_start(struct ms_gateway *gw, struct guser *gu,
		      const char *why)
{
	struct ms_user_info info;

	if (user_lookup(gw, gu->name, &info) < 0) {
		job_release(gw, gu);
		return;
	}
	/* A rollback a crash interrupted: the destination still holds all
	 * the mail; the user stays there and the operator runs it again. */
	if (ms_user_in(&info, MS_USER_CUTOVER) &&
	    !strcmp(info.last_error, ROLLBACK_MARK)) {
		set_state(gw, gu->name, MS_USER_DESTINATION, "rollback "
			  "interrupted: run mailshiftctl rollback again");
		return;
	}
	/* A cutover a crash interrupted: nobody is held any more, and the
	 * last delta has to run again. Back to copying. */
	if (ms_user_in(&info, MS_USER_CUTOVER)) {
		int64_t id;

		/* Its request too, in one transaction: the others' held
		 * logins go on, to the source. */
		if (ms_store_user_get(gw->store, gu->name, &id) < 0 ||
		    ms_store_begin(gw->store) < 0 ||
		    ms_store_cutover_clear(gw->store, id) < 0)
			ms_log(MS_LOG_ERROR, "%s: store: %s", gu->name,
			       ms_store_error(gw->store));
		set_state(gw, gu->name, MS_USER_COPYING,
			  "interrupted cutover, resumed");
		if (ms_store_commit(gw->store) < 0)
			ms_store_rollback(gw->store);
		snprintf(info.state, sizeof(info.state), "%s",
			 ms_user_state_names[MS_USER_COPYING]);
	}
	if (gu->copying || gu->flip_pending)
		return;			/* at work here already */
	/* With admin logins the copy goes on now (else at the user's next
	 * login); it flips once verified, through a cutover if anything
	 * reached the source meanwhile. A user with a session here and no
	 * copy (a policy's) is left to its logins. */
	if ((!ms_user_in(&info, MS_USER_SOURCE) &&
	     !ms_user_in(&info, MS_USER_COPYING)) || gw->mover == NULL ||
	    !gw_have_admin(gw) || user_policy(gw, &info) == MS_POLICY_OFF ||
	    gu->sessions > 0) {
		job_release(gw, gu);
		return;
	}
	if (why != NULL) {
		ms_info("%s: %s", gu->name, why);
		/* Copying already (before the restart): the resumed copy's
		 * start is no change to log again. */
		gu->logged_state = MS_USER_COPYING + 1;
	}
	set_state(gw, gu->name, MS_USER_COPYING, NULL);
	user_copy_start(gw, gu);
	if (!gu->copying)
		job_release(gw, gu);
}

static int recover_one(void *ctx, const struct ms_user_info *u)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu;

	if (!ms_user_in(u, MS_USER_CUTOVER) && !ms_user_in(u, MS_USER_COPYING))
		return 0;
	if ((gu = gw_user_get(gw, u->name)) != NULL)
		gu->resume = 1;
	return 0;
}

/* Copies and cutovers a crash interrupted: those whose job this gateway
 * can take (its own from before the crash, or nobody's); another
 * gateway's running job is left to it. */
static void gw_recover(struct ms_gateway *gw)
{
	if (ms_store_user_foreach(gw->store, recover_one, gw) < 0)
		ms_log(MS_LOG_ERROR, "store: %s", ms_store_error(gw->store));
	for (unsigned int i = 0; i < USER_BUCKETS; i++)
		for (struct guser *gu = gw->users[i]; gu != NULL; gu = gu->next)
			if (gu->resume) {
				gu->resume = 0;
				if (job_hold(gw, gu, "resume") == 0)
					job_start(gw, gu, "resuming the "
						  "interrupted copy");
			}
}

static void on_claim(void *ctx, const char *user, const char *kind,
		     const char *was_state, const char *was_owner)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = gw_user_get(gw, user);
	int expired = !strcmp(was_state, "running");

	gw->claimed++;
	if (gu == NULL)
		return;
	gu->job_held = 1;
	gu->job_gen++;
	gu->lease_lost = 0;
	gu->lease_at = gw->claim_sent;
	if (expired)
		ms_info("%s: the lease of gateway %s on its job (%s) expired: "
			"taken over", user, was_owner, kind);
	job_start(gw, gu, expired ? "resuming the interrupted copy" : NULL);
	if (gu->copying && !expired && gw->cfg.sweep_rate > 0)
		gw->sweep_next_ms = uv_now(gw->loop) +
			3600000ULL / gw->cfg.sweep_rate;
}

static int in_window(const struct ms_gateway *gw)
{
	time_t now = time(NULL);
	struct tm tm;
	int min;

	if (gw->cfg.sweep_from < 0 || gw->cfg.sweep_to < 0)
		return 1;
	localtime_r(&now, &tm);
	min = tm.tm_hour * 60 + tm.tm_min;
	if (gw->cfg.sweep_from <= gw->cfg.sweep_to)
		return min >= gw->cfg.sweep_from && min < gw->cfg.sweep_to;
	return min >= gw->cfg.sweep_from || min < gw->cfg.sweep_to;
}

static unsigned int sweep_conc(const struct ms_gateway *gw)
{
	return gw->cfg.sweep_concurrency ? gw->cfg.sweep_concurrency : 1;
}

/* The users this gateway is moving: copies running, and users between
 * their copy and their flip (a cutover's grace and acknowledgements, whose
 * last delta is a copy still to come). Each takes a sweep slot. */
static unsigned int moving(const struct ms_gateway *gw)
{
	unsigned int n = gw->copies;

	for (unsigned int i = 0; i < USER_BUCKETS; i++)
		for (const struct guser *gu = gw->users[i]; gu != NULL;
		     gu = gu->next)
			if (gu->cutover && !gu->copying)
				n++;
	return n;
}

/* After a claim that took claimed jobs: how many to claim next (0:
 * none). Claimed jobs with nothing to copy here (a policy off, a user
 * logged in) are let go: claim on past them. */
static unsigned int claim_more(const struct ms_gateway *gw,
			       unsigned int claimed)
{
	unsigned int busy = moving(gw);

	if (claimed == 0 || busy >= sweep_conc(gw) ||
	    (gw->cfg.sweep_rate > 0 && uv_now(gw->loop) < gw->sweep_next_ms))
		return 0;
	return sweep_conc(gw) - busy;
}

static void claim_async(struct ms_gateway *gw, unsigned int want);

static void on_claim_done(void *ctx, const char *error, unsigned int n)
{
	struct ms_gateway *gw = ctx;
	unsigned int want;

	gw->claiming = 0;
	if (gw->cluster == NULL)
		return;			/* stopping */
	if (error != NULL) {
		ms_log(MS_LOG_ERROR, "jobs: store: %s", error);
		return;
	}
	(void)n;
	if ((want = claim_more(gw, gw->claimed)) > 0)
		claim_async(gw, want);
}

/* PostgreSQL: the claim on the cluster's connection, so that a slow or
 * locked users table holds up no login (docs/design.md, "Jobs and
 * leases"); the sweep's queue is made first in the same transaction. */
static void claim_async(struct ms_gateway *gw, unsigned int want)
{
	int queued = gw->claim_sweep;

	gw->claiming = 1;
	gw->claimed = 0;
	gw->claim_sent = uv_hrtime();
	ms_cluster_job_claim(gw->cluster, gw->cfg.gw_name, lease_ms(gw), want,
			     queued, on_claim, on_claim_done, gw);
}

/* SQLite: the claim on the store's connection (one gateway). */
static void claim_sync(struct ms_gateway *gw, unsigned int want)
{
	if (gw->claim_sweep && ms_store_job_enqueue(gw->store) < 0)
		ms_log(MS_LOG_ERROR, "sweep: store: %s",
		       ms_store_error(gw->store));
	do {
		gw->claimed = 0;
		gw->claim_sent = uv_hrtime();
		if (ms_store_job_claim(gw->store, gw->cfg.gw_name,
				       lease_ms(gw), want, gw->claim_sweep,
				       on_claim, gw) < 0) {
			ms_log(MS_LOG_ERROR, "jobs: store: %s",
			       ms_store_error(gw->store));
			return;
		}
	} while ((want = claim_more(gw, gw->claimed)) > 0);
}

/* Each interval: the jobs whose owner's lease expired are taken over;
 * with the sweep on and inside its window, users who never log in are
 * queued as jobs and a few taken, a few at a time (the queue is the
 * store's, shared by every gateway on it). */
static void gw_on_sweep(uv_timer_t *t)
{
	struct ms_gateway *gw = t->data;
	unsigned int conc = sweep_conc(gw), busy = moving(gw);
	unsigned int want;
	int outside = !in_window(gw);

	/* Said once each way: an operator wondering why nobody moves. */
	if (gw->cfg.sweep && outside != gw->sweep_outside)
		ms_info("sweep: %s its window %02d:%02d-%02d:%02d",
			outside ? "outside" : "inside", gw->cfg.sweep_from / 60,
			gw->cfg.sweep_from % 60, gw->cfg.sweep_to / 60,
			gw->cfg.sweep_to % 60);
	gw->sweep_outside = outside;
	if (busy >= conc || gw->claiming)
		return;
	want = conc - busy;
	if (gw->cfg.sweep && !outside)
		gw->sweeps++;
	gw->claim_sweep = gw->cfg.sweep && !outside &&
			  uv_now(gw->loop) >= gw->sweep_next_ms;
	if (gw->claim_sweep && gw->cfg.sweep_rate > 0)
		want = 1;
	if (gw->cluster != NULL)
		claim_async(gw, want);
	else
		claim_sync(gw, want);
}

/* A renewal failed (said once until one succeeds): the leases are
 * renewed at the next turn; one not renewed in time is lost. */
static void renew_failed(struct ms_gateway *gw, const char *error)
{
	if (!gw->lease_failing)
		ms_log(MS_LOG_ERROR, "jobs: cannot renew a lease: %s", error);
	gw->lease_failing = 1;
}

static void on_renewed(void *ctx, unsigned int i, int held)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = gw->renew_gu[i];

	/* (a job ended or taken again since the renewal was sent: not
	 * what it answers for) */
	if (gw->cluster == NULL || !gu->job_held ||
	    gu->job_gen != gw->renew_gen[i])
		return;
	if (held)
		gu->lease_at = gw->renew_sent;
	else
		lease_lost(gw, gu);
}

static void on_renew_done(void *ctx, const char *error, unsigned int n)
{
	struct ms_gateway *gw = ctx;

	(void)n;
	gw->renewing = 0;
	free(gw->renew_gu);
	free(gw->renew_gen);
	gw->renew_gu = NULL;
	gw->renew_gen = NULL;
	if (gw->cluster == NULL)
		return;			/* stopping */
	if (error != NULL)
		renew_failed(gw, error);
	else
		gw->lease_failing = 0;
}

/* PostgreSQL: every lease held, in one statement on the cluster's
 * connection. */
static void renew_async(struct ms_gateway *gw)
{
	const char **names;
	unsigned int n = 0, i;

	for (i = 0; i < USER_BUCKETS; i++)
		for (struct guser *gu = gw->users[i]; gu != NULL;
		     gu = gu->next)
			n += gu->job_held != 0;
	if (n == 0)
		return;
	names = calloc(n, sizeof(*names));
	gw->renew_gu = calloc(n, sizeof(*gw->renew_gu));
	gw->renew_gen = calloc(n, sizeof(*gw->renew_gen));
	if (names == NULL || gw->renew_gu == NULL || gw->renew_gen == NULL) {
		free(names);
		on_renew_done(gw, "out of memory", 0);
		return;
	}
	n = 0;
	for (i = 0; i < USER_BUCKETS; i++)
		for (struct guser *gu = gw->users[i]; gu != NULL;
		     gu = gu->next)
			if (gu->job_held) {
				names[n] = gu->name;
				gw->renew_gu[n] = gu;
				gw->renew_gen[n++] = gu->job_gen;
			}
	gw->renewing = 1;
	gw->renew_sent = uv_hrtime();
	ms_cluster_job_renew(gw->cluster, gw->cfg.gw_name, lease_ms(gw),
			     names, n, on_renewed, on_renew_done, gw);
	free(names);
}

/* SQLite: each lease on the store's connection. */
static void renew_sync(struct ms_gateway *gw)
{
	for (unsigned int i = 0; i < USER_BUCKETS; i++) {
		for (struct guser *gu = gw->users[i]; gu != NULL;
		     gu = gu->next) {
			uint64_t sent = uv_hrtime();
			int held;

			if (!gu->job_held)
				continue;
			if (ms_store_job_renew(gw->store, gu->name,
					       gw->cfg.gw_name, lease_ms(gw),
					       &held) < 0) {
				renew_failed(gw, ms_store_error(gw->store));
				return;
			}
			gw->lease_failing = 0;
			if (!held)
				lease_lost(gw, gu);
			else
				gu->lease_at = sent;
		}
	}
}

/* The leases of the jobs this gateway holds, renewed at a third of their
 * time: one found taken is lost (the gateway stalled past it). */
static void on_lease_timer(uv_timer_t *t)
{
	struct ms_gateway *gw = t->data;

	if (gw->cluster == NULL)
		renew_sync(gw);
	else if (!gw->renewing)
		renew_async(gw);
}

static uv_timer_t *timer_new(struct ms_gateway *gw, uv_timer_cb cb,
			     uint64_t first, uint64_t every)
{
	uv_timer_t *t = malloc(sizeof(*t));

	if (t == NULL)
		return NULL;
	uv_timer_init(gw->loop, t);
	t->data = gw;
	uv_timer_start(t, cb, first, every);
	return t;
}

/* ---- several gateways: what the cluster asks of this one (cluster.h) ---- */

/* A cutover or rollback of the user's was asked: its sessions here to a
 * server end (its logins are held by the cluster from now on). */
static void cl_hold(void *ctx, const char *user)
{
	struct ms_gateway *gw = ctx;

	gw->user_sessions->end_relays(gw, user, -1);
}

/* The user's request is over: logins held for it are routed again. */
static void cl_settled(void *ctx, const char *user)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = gw_user_find(gw, user), tmp;

	if (gu == NULL) {
		memset(&tmp, 0, sizeof(tmp));
		snprintf(tmp.name, sizeof(tmp.name), "%s", user);
		gu = &tmp;
	}
	held_release(gw, gu);
}

/* The user's state, as the store has it now: a session here on the
 * other server ends (a mapping set by mailshiftctl on another gateway, a
 * flip this gateway did not see because it was cut off). */
static void cl_changed(void *ctx, const char *user, const char *state)
{
	struct ms_gateway *gw = ctx;
	int st = ms_user_state_parse(state);

	if (st == MS_USER_DESTINATION)
		gw->user_sessions->end_relays(gw, user, 0);
	else if (st == MS_USER_SOURCE || st == MS_USER_COPYING ||
		 st == MS_USER_FAILED)
		gw->user_sessions->end_relays(gw, user, 1);
}

/* The others may fence this gateway soon: every session it relays ends,
 * to either server. Not only the source's: a user on the destination
 * leaves it by a rollback, which fences this gateway the same way (see
 * docs/design.md, "Several gateways"). */
static void cl_fenced(void *ctx)
{
	struct ms_gateway *gw = ctx;

	gw->user_sessions->end_relays(gw, NULL, -1);
}

struct policies_read {
	struct ms_gateway *gw;
	json_t *set;
};

static int policy_row(void *ctx, const char *scope, const char *policy)
{
	struct policies_read *pr = ctx;

	return policy_collect(pr->set, scope, policy);
}

static void on_policies_read(void *ctx, const char *error)
{
	struct policies_read *pr = ctx;

	if (error != NULL) {
		/* (the next change or reconcile reads them again) */
		ms_log(MS_LOG_ERROR, "policies: store: %s", error);
		json_decref(pr->set);
	} else {
		policies_apply(pr->gw, pr->set);
	}
	free(pr);
}

/* The policies changed (or may have): read again on the cluster's
 * connection, the loop waiting on nothing. */
static void cl_policies(void *ctx)
{
	struct ms_gateway *gw = ctx;
	struct policies_read *pr = calloc(1, sizeof(*pr));

	if (pr == NULL || (pr->set = json_object()) == NULL) {
		free(pr);
		ms_log(MS_LOG_ERROR, "policies: out of memory");
		return;
	}
	pr->gw = gw;
	ms_cluster_policies(gw->cluster, policy_row, on_policies_read, pr);
}

/* Every live gateway acknowledged this one's request: the delta. */
static void cl_acked(void *ctx, const char *user)
{
	struct ms_gateway *gw = ctx;
	struct guser *gu = gw_user_find(gw, user);

	if (gu == NULL || !gu->await_acks)
		return;
	gu->await_acks = 0;
	grace_over(gw, gu);
}

static void cl_counts(void *ctx, unsigned int *sessions, unsigned int *copies)
{
	struct ms_gateway *gw = ctx;

	*sessions = ms_gateway_nsessions(gw);
	*copies = gw->copies;
}

/* retire.c's question, from the map. */
static int cl_known(void *ctx, const char *name)
{
	struct ms_gateway *gw = ctx;
	struct ms_user_info info;

	return ms_cluster_user(gw->cluster, name, &info);
}

/* The source's uses (retire.c) written on the cluster's connection. */
static void cl_write_uses(void *ctx, const struct ms_source_use *u, size_t n,
			  ms_retire_done_cb *done, void *done_ctx)
{
	struct ms_gateway *gw = ctx;

	ms_cluster_source_uses(gw->cluster, u, n, done, done_ctx);
}

static const struct ms_cluster_ops cluster_ops = {
	.hold = cl_hold,
	.settled = cl_settled,
	.changed = cl_changed,
	.policies = cl_policies,
	.fenced = cl_fenced,
	.acked = cl_acked,
	.counts = cl_counts,
};

static int cluster_start(struct ms_gateway *gw, char *err, size_t errsz)
{
	const struct ms_cluster_cfg cc = {
		.url = gw->cfg.store_url,
		.name = gw->cfg.gw_name,
		.heartbeat_ms = gw->cfg.gw_heartbeat_ms,
		.timeout_ms = gw->cfg.gw_timeout_ms,
	};

	if (gw->cfg.store_url[0] == '\0')
		return 0;
	if (ms_cluster_new(gw->loop, gw->store, &cc, &cluster_ops, gw,
			   &gw->cluster, err, errsz) < 0)
		return -1;
	ms_retire_set_known(cl_known, gw);
	ms_retire_set_writer(cl_write_uses, gw);
	if (gw->mover != NULL)
		ms_mover_set_fence(gw->mover, copy_fence, gw);
	ms_survey_set_cluster(gw->survey, gw->cluster);
	return 0;
}

/* ---- start and stop ---- */

/* At start: copies and cutovers a crash interrupted, found in the store;
 * the sweep's timer. */
int gw_lifecycle_start(struct ms_gateway *gw,
		       const struct gw_user_sessions *sessions, char *err,
		       size_t errsz)
{
	const struct ms_gw_config *cfg = &gw->cfg;

	gw->user_sessions = sessions;
	if (cluster_start(gw, err, errsz) < 0)
		return -1;
	gw->lease_timer = timer_new(gw, on_lease_timer, lease_ms(gw) / 3,
				    lease_ms(gw) / 3);
	gw_recover(gw);
	/* The jobs' timer: the sweep, and jobs other gateways left behind. */
	if (gw->mover != NULL && gw_have_admin(gw))
		gw->sweep_timer = timer_new(gw, gw_on_sweep, 1000,
					    MS_TEST_TIME((cfg->sweep_interval ?
							  cfg->sweep_interval :
							  10) * 1000ULL));
	else if (cfg->sweep)
		ms_warn("[sweep] needs admin logins for both servers "
			"([source] admin, [destination] admin): sweep off");
	return 0;
}

/* At stop: the sweep's timer, the users kept in memory (their captured
 * passwords wiped). */
void gw_lifecycle_free(struct ms_gateway *gw)
{
	if (gw->cluster != NULL) {
		ms_retire_set_known(NULL, NULL);
		ms_retire_set_writer(NULL, NULL);
	}
	/* (a batch of uses out is told lost: written at ms_retire_stop) */
	ms_cluster_free(&gw->cluster);
	if (gw->sweep_timer != NULL)
		ms_close_free((uv_handle_t *)gw->sweep_timer, gw->sweep_timer);
	if (gw->lease_timer != NULL)
		ms_close_free((uv_handle_t *)gw->lease_timer, gw->lease_timer);
	for (unsigned int i = 0; i < USER_BUCKETS; i++) {
		while (gw->users[i] != NULL) {
			struct guser *gu = gw->users[i];

			gw->users[i] = gu->next;
			ms_secret_free(&gu->pw);
			if (gu->grace != NULL)
				ms_close_free((uv_handle_t *)gu->grace,
					      gu->grace);
			if (gu->quiet != NULL)
				ms_close_free((uv_handle_t *)gu->quiet,
					      gu->quiet);
			free(gu);
		}
	}
}
