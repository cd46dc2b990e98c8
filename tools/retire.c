/* mailshiftctl retire: whether the source can be switched off (--check),
 * switching it off in the kernel (--apply: the mail ports straight to the
 * destination, the gateway left to drain what it carries), and the record
 * an operator files (--report). Everything comes from mailshift.conf: the
 * store, the control socket, the admin logins (passwords from their files,
 * never from argv), [steer] and [retire]. See docs/deployment.md,
 * "Retiring the source". */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <uv.h>

#include "config.h"
#include "dconfig.h"
#include "gw_route.h"
#include "mover.h"
#include "steer.h"
#include "store.h"
#include "subcommands.h"

#define DEFAULT_CONFIG "/etc/mailshift/mailshift.conf"

struct ropts {
	const char *config, *output;
	int json, force;
	struct ms_dconfig *c;
	struct ms_store *store;
	char err[1200];
};

/* What --check found: the JSON answer and, in it, the reasons. */
struct check {
	json_t *out;
	json_t *reasons;
	json_t *moved;			/* names of the users on the destination */
};

static void usage(FILE *f)
{
	fprintf(f,
"Usage: %s retire [-c FILE] [--json] --check\n"
"       %s retire [-c FILE] [--json] --apply [--force]\n"
"       %s retire [-c FILE] [--json] --report [--output FILE]\n"
"  --check    whether the source can be switched off: every user on the\n"
"             destination, a last comparison of each with the source finds\n"
"             nothing new there, no session open to it, nothing sent to it\n"
"             for [retire] quiet_period; else what holds it back\n"
"  --apply    after a passing check: the mail ports straight to the\n"
"             destination in the kernel ([steer]); sessions the gateway\n"
"             carries are not cut; the retirement is recorded\n"
"  --force    --apply over a failed check (says what it overrides)\n"
"  --report   the record to file: users, messages and bytes moved, the\n"
"             verification, the dates (--output FILE: there, mode 0600)\n"
"  -c, --config FILE  mailshift.conf (default " DEFAULT_CONFIG ")\n"
"Exit status: 0 can retire / done, 1 not yet (reasons given) or failed,\n"
"2 usage or configuration.\n", prog, prog, prog);
}

static int fail(struct ropts *o, int rc)
{
	return cli_fail(o->json, "retire", o->err, rc);
}

static void when(int64_t t, char *buf, size_t sz)
{
	time_t tt = (time_t)t;
	struct tm tm;

	if (t <= 0) {
		snprintf(buf, sz, "-");
		return;
	}
	gmtime_r(&tt, &tm);
	strftime(buf, sz, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

static int load(struct ropts *o)
{
	static struct ms_dconfig c;
	char *err = NULL;

	o->c = &c;
	if (ms_dconfig_load(o->config, &c, o->err, sizeof(o->err)) < 0)
		return -1;
	/* Opening would create an empty store: a wrong path must not read
	 * as "no user left on the source". */
	if (!ms_store_is_url(c.store) && access(c.store, F_OK) < 0) {
		snprintf(o->err, sizeof(o->err), "store %s: %s", c.store,
			 strerror(errno));
		return -1;
	}
	if (ms_store_open(c.store, &o->store, &err) < 0) {
		snprintf(o->err, sizeof(o->err), "store %s: %s", c.store,
			 err != NULL ? err : "cannot open");
		free(err);
		return -1;
	}
	return 0;
}

static void reason(struct check *ck, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void reason(struct check *ck, const char *fmt, ...)
{
	char buf[1600];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	json_array_append_new(ck->reasons, json_string(buf));
}

/* ---- users ---- */

struct users_ctx {
	struct check *ck;
	json_t *not_moved;
	json_int_t total;
};

static int on_user(void *ctx, const struct ms_user_info *u)
{
	struct users_ctx *uc = ctx;

	uc->total++;
	if (!strcmp(u->state, "destination")) {
		json_array_append_new(uc->ck->moved, json_string(u->name));
		return 0;
	}
	json_array_append_new(uc->not_moved, json_pack("{s:s,s:s,s:s?}",
		"user", u->name, "state", u->state, "error",
		u->last_error[0] != '\0' ? u->last_error : NULL));
	reason(uc->ck, "user %s is not on the destination (state %s%s%s)",
	       u->name, u->state, u->last_error[0] != '\0' ? ": " : "",
	       u->last_error);
	return 0;
}

static int check_users(struct ropts *o, struct check *ck)
{
	struct users_ctx uc = { .ck = ck, .not_moved = json_array() };

	if (ms_store_user_foreach(o->store, on_user, &uc) != 0) {
		json_decref(uc.not_moved);
		snprintf(o->err, sizeof(o->err), "store: %s",
			 ms_store_error(o->store));
		return -1;
	}
	if (uc.total == 0)
		reason(ck, "the map has no user: nothing was moved");
	json_object_set_new(ck->out, "users", json_pack("{s:I,s:I,s:o}",
		"total", uc.total, "on_destination",
		(json_int_t)json_array_size(ck->moved), "not_moved",
		uc.not_moved));
	return 0;
}

/* ---- sessions the gateway has open to the source ---- */

static void check_sessions(struct ropts *o, struct check *ck)
{
	json_t *rep = ctl_request(o->c->control, json_pack("{s:s}", "cmd",
							    "sessions"));
	json_t *open = json_array(), *s;
	char since[40];
	size_t i;

	if (rep == NULL || !json_is_true(json_object_get(rep, "ok"))) {
		reason(ck, "mailshiftd did not answer at %s: its sessions to "
		       "the source are not known", o->c->control);
		json_object_set_new(ck->out, "sessions", json_null());
		json_decref(open);
		json_decref(rep);
		return;
	}
	json_array_foreach(json_object_get(rep, "sessions"), i, s) {
		const char *user = json_string_value(json_object_get(s, "user"));

		if (strcmp(json_string_value(json_object_get(s, "server")) ?: "",
			   "source") != 0)
			continue;
		json_array_append(open, s);
		when(json_integer_value(json_object_get(s, "since")), since,
		     sizeof(since));
		reason(ck, "session %" JSON_INTEGER_FORMAT " of %s (%s from "
		       "%s, since %s) is open to the source",
		       json_integer_value(json_object_get(s, "id")),
		       user != NULL ? user : "(not logged in)",
		       json_string_value(json_object_get(s, "proto")) ?: "?",
		       json_string_value(json_object_get(s, "client")) ?: "?",
		       since);
	}
	json_object_set_new(ck->out, "sessions", open);
	json_decref(rep);
}

/* ---- what the gateway sent to the source in the quiet period ---- */

struct use_ctx {
	struct check *ck;
	json_t *uses;
	unsigned int quiet;
};

static int on_use(void *ctx, const struct ms_source_use *u)
{
	struct use_ctx *uc = ctx;
	int64_t until = u->at + u->slack + uc->quiet;
	char at[40], end[40];
	static const struct {
		const char *kind, *what;
	} kinds[] = {
		{ "session", "a login" }, { "submission", "a submission" },
		{ "mail", "mail" },
	};
	const char *what = u->kind;

	for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
		if (!strcmp(u->kind, kinds[i].kind))
			what = kinds[i].what;
	when(u->at, at, sizeof(at));
	when(until, end, sizeof(end));
	json_array_append_new(uc->uses, json_pack("{s:s,s:s,s:s,s:I,s:I}",
		"user", u->key, "kind", u->kind, "name", u->name, "at",
		(json_int_t)u->at, "quiet_until", (json_int_t)until));
	if (!strcmp(u->key, "*"))
		reason(uc->ck, "%s for %s, a name the map does not know, went "
		       "to the source at %s (the last such recorded; quiet "
		       "until %s)", what, u->name, at, end);
	else
		reason(uc->ck, "%s of %s went to the source at %s (quiet "
		       "until %s)", what, u->key, at, end);
	return 0;
}

static int check_use(struct ropts *o, struct check *ck, int64_t now)
{
	struct use_ctx uc = { .ck = ck, .uses = json_array(),
			      .quiet = o->c->retire.quiet_period };

	if (ms_store_source_use_foreach(o->store, now - uc.quiet, on_use,
					&uc) != 0) {
		json_decref(uc.uses);
		snprintf(o->err, sizeof(o->err), "store: %s",
			 ms_store_error(o->store));
		return -1;
	}
	json_object_set_new(ck->out, "source_use", uc.uses);
	return 0;
}

/* ---- the kernel: a mail port still steered straight to the source ---- */

static void check_steering(struct ropts *o, struct check *ck)
{
	json_t *state = NULL, *v, *to_src = json_array();
	struct ms_steer_entry e;
	char err[600];
	size_t i;

	if (!o->c->steer.present) {
		json_decref(to_src);
		return;
	}
	if (!cli_have_net_admin() ||
	    ms_steer_read(&o->c->steer, &state, err, sizeof(err)) < 0) {
		json_object_set_new(ck->out, "steering", json_null());
		json_object_set_new(ck->out, "note", json_string(
			"the steering table was not read (needs CAP_NET_ADMIN)"));
		json_decref(to_src);
		return;
	}
	json_array_foreach(json_object_get(state, "entries"), i, v) {
		if (ms_steer_entry_parse(json_string_value(v), &e, err,
					 sizeof(err)) < 0 ||
		    e.port == MS_STEER_OTHER || e.action != MS_STEER_SOURCE)
			continue;
		json_array_append(to_src, v);
		reason(ck, "the kernel steers \"%s\" straight to the source "
		       "(the gateway does not see those sessions)",
		       json_string_value(v));
	}
	json_object_set_new(ck->out, "steering", to_src);
	json_decref(state);
}

/* ---- the last comparison: the mover's verify-only pass ---- */

struct vrun {
	struct check *ck;
	json_t *results;
};

static void folder_reasons(struct check *ck, const struct ms_user_report *rep)
{
	for (unsigned int i = 0; i < rep->nfolders; i++) {
		const struct ms_folder_report *f = &rep->folders[i];

		if (f->not_copied > 0)
			reason(ck, "%s: %llu message(s) in \"%s\" reached the "
			       "source after the last copy", rep->user,
			       (unsigned long long)f->not_copied, f->source);
		if (f->expunge_pending > 0)
			reason(ck, "%s: %llu message(s) expunged from \"%s\" "
			       "on the source are still on the destination",
			       rep->user,
			       (unsigned long long)f->expunge_pending,
			       f->source);
		if (!f->verified && f->mismatch[0] != '\0')
			reason(ck, "%s: \"%s\" differs: %s", rep->user,
			       f->source, f->mismatch);
	}
}

static void on_verified(const struct ms_user_report *rep, void *ctx)
{
	struct vrun *vr = ctx;

	json_array_append_new(vr->results, migrate_report_json(rep));
	if (rep->error != NULL && !rep->mismatch)
		reason(vr->ck, "%s: the comparison with the source failed: %s",
		       rep->user, rep->error);
	folder_reasons(vr->ck, rep);
}

/* The admin login of one side, its password read from its file. */
static int admin_server(struct ropts *o, int dst, struct ms_server_cfg *srv,
			char **pw)
{
	const char *name = dst ? o->c->dst_admin : o->c->src_admin;
	const char *pwf = dst ? o->c->dst_admin_pwf : o->c->src_admin_pwf;

	*srv = dst ? o->c->gw.dst_imap : o->c->gw.src_imap;
	if (srv->host[0] == '\0' || name[0] == '\0') {
		snprintf(o->err, sizeof(o->err), "comparing the users' mail "
			 "needs [%s] imap and admin (with admin_password_file)",
			 dst ? "destination" : "source");
		return -1;
	}
	*pw = ms_read_secret_file(pwf, o->err, sizeof(o->err));
	if (*pw == NULL)
		return -1;
	srv->admin = name;
	srv->password = *pw;
	srv->max_conns = o->c->gw.connections;
	return 0;
}

static void wipe(char **pw)
{
	if (*pw == NULL)
		return;
	OPENSSL_cleanse(*pw, strlen(*pw));
	free(*pw);
	*pw = NULL;
}

/* Compares each user of names with the source, as migrate --verify-only
 * does; the reports go into *results. -1 with o->err (configuration). */
static int verify(struct ropts *o, struct check *ck, json_t *names,
		  json_t **results)
{
	struct ms_mover_opts mo = {
		.verify_only = 1,
		.names = (enum ms_mover_names)o->c->gw.mover_names,
	};
	struct vrun vr = { .ck = ck, .results = json_array() };
	struct ms_server_cfg src, dst;
	struct ms_mover *m;
	char *spw = NULL, *dpw = NULL;
	uv_loop_t loop;
	json_t *v;
	size_t i;

	*results = vr.results;
	if (admin_server(o, 0, &src, &spw) < 0 ||
	    admin_server(o, 1, &dst, &dpw) < 0) {
		wipe(&spw);
		wipe(&dpw);
		return -1;
	}
	uv_loop_init(&loop);
	m = ms_mover_new(&loop, o->store, &src, &dst, &mo);
	/* The mover keeps its own copies. */
	wipe(&spw);
	wipe(&dpw);
	if (m == NULL) {
		snprintf(o->err, sizeof(o->err), "out of memory");
		uv_loop_close(&loop);
		return -1;
	}
	json_array_foreach(names, i, v)
		if (ms_mover_add_user(m, json_string_value(v), NULL, NULL,
				      on_verified, &vr) < 0)
			reason(ck, "%s: the comparison could not start: %s",
			       json_string_value(v), ms_store_error(o->store));
	uv_run(&loop, UV_RUN_DEFAULT);
	ms_mover_free(&m);
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_loop_close(&loop);
	return 0;
}

/* ---- --check ---- */

/* Users whose clients see the source's UIDs only through the gateway's
 * IMAP view: a warning, not a reason (the source can go; the gateway must
 * stay). */
static int check_view(struct ropts *o, struct check *ck)
{
	struct ms_view_count vc;
	char buf[600];

	if (ms_store_view_count(o->store, &vc) < 0) {
		snprintf(o->err, sizeof(o->err), "store: %s",
			 ms_store_error(o->store));
		return -1;
	}
	json_object_set_new(ck->out, "view_users", json_integer((json_int_t)
								vc.users));
	if (vc.users == 0)
		return 0;
	snprintf(buf, sizeof(buf), "%llu user(s) (%llu folder(s) with new "
		 "UIDs, %llu renamed) see the source's UIDVALIDITY, UIDs or "
		 "folder names only through the gateway's IMAP view: retiring "
		 "the gateway, or steering IMAP straight to the destination "
		 "(--apply), would make their clients download those folders "
		 "again", (unsigned long long)vc.users,
		 (unsigned long long)vc.lost_folders,
		 (unsigned long long)vc.renamed_folders);
	json_object_set_new(ck->out, "warnings", json_pack("[s]", buf));
	return 0;
}

/* 0 when the source can go, 1 when not (ck->reasons), 2 with o->err. */
static int run_check(struct ropts *o, struct check *ck)
{
	int64_t now = time(NULL);
	json_t *results = NULL;

	ck->out = json_object();
	ck->reasons = json_array();
	ck->moved = json_array();
	json_object_set_new(ck->out, "checked_at", json_integer(now));
	json_object_set_new(ck->out, "quiet_period",
			    json_integer(o->c->retire.quiet_period));
	if (check_users(o, ck) < 0)
		return 2;
	check_sessions(o, ck);
	if (check_use(o, ck, now) < 0)
		return 2;
	check_steering(o, ck);
	if (check_view(o, ck) < 0)
		return 2;
	if (verify(o, ck, ck->moved, &results) < 0) {
		json_decref(results);
		return 2;
	}
	json_object_set_new(ck->out, "verification", results);
	json_object_set_new(ck->out, "can_retire",
			    json_boolean(json_array_size(ck->reasons) == 0));
	json_object_set(ck->out, "reasons", ck->reasons);
	return json_array_size(ck->reasons) == 0 ? 0 : 1;
}

static void check_free(struct check *ck)
{
	json_decref(ck->out);
	json_decref(ck->reasons);
	json_decref(ck->moved);
}

static void print_check(const struct check *ck, FILE *f)
{
	json_t *v;
	size_t i;

	json_array_foreach(json_object_get(ck->out, "warnings"), i, v)
		fprintf(f, "warning: %s\n", json_string_value(v));
	if (json_array_size(ck->reasons) == 0) {
		fprintf(f, "the source can be retired: %zu user(s), all on the "
			"destination and identical there; nothing sent to the "
			"source for the quiet period\n",
			json_array_size(ck->moved));
		return;
	}
	fprintf(f, "the source cannot be retired yet (%zu reason(s)):\n",
		json_array_size(ck->reasons));
	json_array_foreach(ck->reasons, i, v)
		fprintf(f, "  - %s\n", json_string_value(v));
}

static int cmd_check(struct ropts *o)
{
	struct check ck = { 0 };
	int rc = run_check(o, &ck);

	if (rc == 2) {
		check_free(&ck);
		return fail(o, 2);
	}
	if (o->json) {
		json_dumpf(ck.out, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		putchar('\n');
	} else {
		print_check(&ck, stdout);
	}
	check_free(&ck);
	return rc;
}

/* ---- --apply ---- */

static json_int_t gateway_sessions(struct ropts *o)
{
	json_t *rep = ctl_request(o->c->control, json_pack("{s:s}", "cmd",
							    "sessions"));
	json_int_t n = rep != NULL ?
		(json_int_t)json_array_size(json_object_get(rep, "sessions")) :
		-1;

	json_decref(rep);
	return n;
}

static int cmd_apply(struct ropts *o)
{
	struct check ck = { 0 };
	struct ms_retirement r = { 0 };
	unsigned int n = 0;
	json_int_t left;
	int rc, lock;
	char *record;

	if (!o->c->steer.present) {
		snprintf(o->err, sizeof(o->err), "%s: no [steer] section: "
			 "nothing says which mail ports to send to the "
			 "destination", o->config);
		return fail(o, 2);
	}
	if (!cli_have_net_admin()) {
		snprintf(o->err, sizeof(o->err), "changing the kernel's "
			 "steering needs CAP_NET_ADMIN (run as root); nothing "
			 "was changed");
		return fail(o, 1);
	}
	rc = run_check(o, &ck);
	if (rc == 2) {
		check_free(&ck);
		return fail(o, 2);
	}
	if (rc != 0 && !o->force) {
		print_check(&ck, stderr);
		check_free(&ck);
		snprintf(o->err, sizeof(o->err), "not applied: the check did "
			 "not pass (nothing was changed; --force overrides)");
		return fail(o, 1);
	}
	if (rc != 0) {
		fprintf(stderr, "%s retire: WARNING: --force: retiring the "
			"source although the check did not pass; what it "
			"found may be lost with the source:\n", prog);
		print_check(&ck, stderr);
	}
	lock = ms_steer_lock(o->err, sizeof(o->err));
	if (lock < 0 ||
	    steer_all_to_destination(o->c, &n, o->err, sizeof(o->err)) < 0) {
		if (lock >= 0)
			close(lock);
		check_free(&ck);
		return fail(o, 1);
	}
	close(lock);
	record = json_dumps(ck.out, JSON_COMPACT | JSON_PRESERVE_ORDER);
	r.at = time(NULL);
	r.uid = (unsigned int)getuid();
	r.forced = rc != 0;
	r.record = record;
	if (record == NULL || ms_store_retirement_add(o->store, &r) < 0) {
		snprintf(o->err, sizeof(o->err), "the mail ports go to the "
			 "destination, but the retirement was not recorded: "
			 "store: %s", ms_store_error(o->store));
		free(record);
		check_free(&ck);
		return fail(o, 1);
	}
	free(record);
	check_free(&ck);
	left = gateway_sessions(o);
	if (o->json) {
		json_t *j = json_pack("{s:b,s:s,s:I,s:I,s:I,s:b}", "ok", 1,
				      "done", "retired", "entries",
				      (json_int_t)n, "at", (json_int_t)r.at,
				      "uid", (json_int_t)r.uid, "forced",
				      r.forced);

		json_object_set_new(j, "gateway_sessions", left >= 0 ?
				    json_integer(left) : json_null());
		json_dumpf(j, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		putchar('\n');
		json_decref(j);
		return 0;
	}
	printf("retired: %u steering entries; new connections to the mail "
	       "ports go straight to the destination\n", n);
	if (left > 0)
		printf("mailshiftd still carries %lld session(s): they end on "
		       "their own (mailshiftctl sessions); stop mailshiftd "
		       "once there are none\n", (long long)left);
	else if (left == 0)
		printf("mailshiftd carries no session: it can be stopped\n");
	return 0;
}

/* ---- --report ---- */

struct report_ctx {
	struct ropts *o;
	json_t *users;
	json_int_t msgs, bytes, on_dst;
	int64_t first, last;
	int error;
};

static int on_report_user(void *ctx, const struct ms_user_info *u)
{
	struct report_ctx *rc = ctx;
	int64_t first = 0, moved = 0;

	if (ms_store_user_moves(rc->o->store, u->id, &first, &moved) < 0) {
		rc->error = 1;
		return 1;
	}
	json_array_append_new(rc->users, json_pack("{s:s,s:s,s:I,s:I,s:I,s:I}",
		"user", u->name, "state", u->state, "messages",
		(json_int_t)u->msgs, "bytes", (json_int_t)u->bytes,
		"first_copy", (json_int_t)first, "moved", (json_int_t)moved));
	rc->msgs += (json_int_t)u->msgs;
	rc->bytes += (json_int_t)u->bytes;
	rc->on_dst += !strcmp(u->state, "destination");
	if (first > 0 && (rc->first == 0 || first < rc->first))
		rc->first = first;
	if (moved > rc->last)
		rc->last = moved;
	return 0;
}

/* The verification the report gives: the one the retirement rested on,
 * else one made now (null when no admin login is configured). */
static json_t *report_verification(struct ropts *o, json_t *retired,
				   json_t *users)
{
	struct check ck = { .reasons = json_array(), .moved = json_array() };
	json_t *record = json_object_get(retired, "record"), *results, *u, *v;
	size_t i;

	if (record != NULL) {
		v = json_pack("{s:O?,s:O?,s:O?}", "checked_at",
			      json_object_get(record, "checked_at"), "users",
			      json_object_get(record, "verification"),
			      "reasons", json_object_get(record, "reasons"));
		check_free(&ck);
		return v;
	}
	json_array_foreach(users, i, u)
		if (!strcmp(json_string_value(json_object_get(u, "state")),
			    "destination"))
			json_array_append(ck.moved, json_object_get(u, "user"));
	if (verify(o, &ck, ck.moved, &results) < 0) {
		json_decref(results);
		check_free(&ck);
		return json_pack("{s:s}", "not_done", o->err);
	}
	v = json_pack("{s:I,s:o,s:O}", "checked_at", (json_int_t)time(NULL),
		      "users", results, "reasons", ck.reasons);
	check_free(&ck);
	return v;
}

static json_t *build_report(struct ropts *o)
{
	struct report_ctx rc = { .o = o, .users = json_array() };
	struct ms_retirement r;
	json_t *out, *retired = json_null();
	json_error_t jerr;
	int found = 0;

	if (ms_store_user_foreach(o->store, on_report_user, &rc) != 0 ||
	    rc.error || ms_store_retirement_get(o->store, &r, &found) < 0) {
		json_decref(rc.users);
		snprintf(o->err, sizeof(o->err), "store: %s",
			 ms_store_error(o->store));
		return NULL;
	}
	if (found) {
		retired = json_pack("{s:I,s:I,s:b,s:o*}", "at",
				    (json_int_t)r.at, "uid", (json_int_t)r.uid,
				    "forced", r.forced, "record",
				    json_loads(r.record, 0, &jerr));
		free(r.record);
	}
	out = json_pack("{s:I,s:o,s:o,s:{s:I,s:I,s:I,s:I},s:I,s:I}",
		"generated_at", (json_int_t)time(NULL),
		"source", ms_json_addr(o->c->gw.src_imap.host,
				       o->c->gw.src_imap.port),
		"destination", ms_json_addr(o->c->gw.dst_imap.host,
					    o->c->gw.dst_imap.port),
		"totals", "users", (json_int_t)json_array_size(rc.users),
		"on_destination", rc.on_dst, "messages", rc.msgs,
		"bytes", rc.bytes,
		"first_move", (json_int_t)rc.first,
		"last_move", (json_int_t)rc.last);
	json_object_set_new(out, "verification",
			    report_verification(o, retired, rc.users));
	json_object_set_new(out, "users", rc.users);
	if (json_is_object(retired))
		json_object_del(retired, "record");
	json_object_set_new(out, "retired", retired);
	return out;
}

/* A user's line of the verification: "yes (51 = 51 messages)". */
static void verified_text(json_t *report, const char *user, char *buf,
			  size_t sz)
{
	json_int_t src = 0, dst = 0, left = 0;
	json_t *u, *f;
	size_t i, j;

	snprintf(buf, sz, "not compared");
	json_array_foreach(json_object_get(report, "users"), i, u) {
		if (strcmp(json_string_value(json_object_get(u, "user")) ?: "",
			   user) != 0)
			continue;
		json_array_foreach(json_object_get(u, "folders"), j, f) {
			src += json_integer_value(json_object_get(f,
							"source_messages"));
			dst += json_integer_value(json_object_get(f,
							"dest_messages"));
			left += json_integer_value(json_object_get(f,
							"not_copied")) +
				json_integer_value(json_object_get(f,
							"expunge_pending"));
		}
		/* Identical as far as copied, with mail left on the source:
		 * not a "yes" on the record. */
		snprintf(buf, sz, "%s (%" JSON_INTEGER_FORMAT " source, %"
			 JSON_INTEGER_FORMAT " destination messages%s)",
			 json_is_true(json_object_get(u, "ok")) && left == 0 ?
			 "yes" : "NO", src, dst, left > 0 ?
			 "; changes on the source not copied" : "");
	}
}

static void print_report(json_t *rep, FILE *f)
{
	json_t *t = json_object_get(rep, "totals"), *ver, *ret, *u, *v;
	char a[40], b[40], text[200];
	size_t i;

	when(json_integer_value(json_object_get(rep, "generated_at")), a,
	     sizeof(a));
	fprintf(f, "mailshift migration record\n\ngenerated:    %s\n"
		"source:       %s\ndestination:  %s\n", a,
		json_string_value(json_object_get(rep, "source")),
		json_string_value(json_object_get(rep, "destination")));
	fprintf(f, "users:        %" JSON_INTEGER_FORMAT " (%"
		JSON_INTEGER_FORMAT " on the destination)\n"
		"moved:        %" JSON_INTEGER_FORMAT " messages, %"
		JSON_INTEGER_FORMAT " bytes\n",
		json_integer_value(json_object_get(t, "users")),
		json_integer_value(json_object_get(t, "on_destination")),
		json_integer_value(json_object_get(t, "messages")),
		json_integer_value(json_object_get(t, "bytes")));
	when(json_integer_value(json_object_get(rep, "first_move")), a,
	     sizeof(a));
	when(json_integer_value(json_object_get(rep, "last_move")), b,
	     sizeof(b));
	fprintf(f, "first move:   %s (first copy began)\n"
		"last move:    %s (last user to the destination)\n", a, b);
	ret = json_object_get(rep, "retired");
	if (json_is_object(ret)) {
		when(json_integer_value(json_object_get(ret, "at")), a,
		     sizeof(a));
		fprintf(f, "retired:      %s by uid %" JSON_INTEGER_FORMAT
			"%s\n", a, json_integer_value(json_object_get(ret,
								"uid")),
			json_is_true(json_object_get(ret, "forced")) ?
			" (FORCED over a failed check)" : "");
	} else {
		fprintf(f, "retired:      not yet\n");
	}
	ver = json_object_get(rep, "verification");
	when(json_integer_value(json_object_get(ver, "checked_at")), a,
	     sizeof(a));
	if (json_object_get(ver, "not_done") != NULL)
		fprintf(f, "verification: not done: %s\n",
			json_string_value(json_object_get(ver, "not_done")));
	else
		fprintf(f, "verification: %s, %zu remark(s)\n", a,
			json_array_size(json_object_get(ver, "reasons")));
	json_array_foreach(json_object_get(ver, "reasons"), i, v)
		fprintf(f, "  - %s\n", json_string_value(v));
	fprintf(f, "\n%-24s %-12s %9s %12s %-23s %-23s %s\n", "USER", "STATE",
		"MESSAGES", "BYTES", "FIRST COPY", "MOVED", "VERIFIED");
	json_array_foreach(json_object_get(rep, "users"), i, u) {
		const char *name = json_string_value(json_object_get(u,
								     "user"));

		when(json_integer_value(json_object_get(u, "first_copy")), a,
		     sizeof(a));
		when(json_integer_value(json_object_get(u, "moved")), b,
		     sizeof(b));
		verified_text(ver, name, text, sizeof(text));
		fprintf(f, "%-24s %-12s %9" JSON_INTEGER_FORMAT " %12"
			JSON_INTEGER_FORMAT " %-23s %-23s %s\n", name,
			json_string_value(json_object_get(u, "state")),
			json_integer_value(json_object_get(u, "messages")),
			json_integer_value(json_object_get(u, "bytes")), a, b,
			text);
	}
}

static int cmd_report(struct ropts *o)
{
	json_t *rep = build_report(o);
	FILE *f = stdout;
	int fd;

	if (rep == NULL)
		return fail(o, 1);
	if (o->output != NULL) {
		fd = open(o->output, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW |
			  O_CLOEXEC, 0600);
		if (fd < 0 || (f = fdopen(fd, "w")) == NULL) {
			snprintf(o->err, sizeof(o->err), "%s: %s", o->output,
				 strerror(errno));
			if (fd >= 0)
				close(fd);
			json_decref(rep);
			return fail(o, 1);
		}
	}
	if (o->json) {
		json_dumpf(rep, f, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		fputc('\n', f);
	} else {
		print_report(rep, f);
	}
	json_decref(rep);
	if (f != stdout && fclose(f) != 0) {
		snprintf(o->err, sizeof(o->err), "%s: %s", o->output,
			 strerror(errno));
		return fail(o, 1);
	}
	if (f != stdout && !o->json)
		printf("report written to %s\n", o->output);
	return 0;
}

int retire_main(int argc, char *argv[])
{
	struct ropts o = { .config = DEFAULT_CONFIG };
	int (*cmd)(struct ropts *) = NULL;
	int ret;

	for (int i = 1; i < argc; i++) {
		int (*c)(struct ropts *) = NULL;

		if ((!strcmp(argv[i], "-c") || !strcmp(argv[i], "--config")) &&
		    i + 1 < argc)
			o.config = argv[++i];
		else if (!strcmp(argv[i], "--output") && i + 1 < argc)
			o.output = argv[++i];
		else if (!strcmp(argv[i], "--json") || !strcmp(argv[i], "-j"))
			o.json = 1;
		else if (!strcmp(argv[i], "--force"))
			o.force = 1;
		else if (!strcmp(argv[i], "--check"))
			c = cmd_check;
		else if (!strcmp(argv[i], "--apply"))
			c = cmd_apply;
		else if (!strcmp(argv[i], "--report"))
			c = cmd_report;
		else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else {
			usage(stderr);
			return 2;
		}
		if (c != NULL && cmd != NULL && c != cmd) {
			usage(stderr);
			return 2;
		}
		if (c != NULL)
			cmd = c;
	}
	if (cmd == NULL || (o.force && cmd != cmd_apply) ||
	    (o.output != NULL && cmd != cmd_report)) {
		usage(stderr);
		return 2;
	}
	if (load(&o) < 0)
		return fail(&o, 2);
	ret = cmd(&o);
	ms_store_close(&o.store);
	return ret;
}
