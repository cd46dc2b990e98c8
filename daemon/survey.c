/* The survey of the source's mailbox sizes (survey.h). For each user the
 * store names (ms_store_size_next): log in with the admin login, LIST
 * every folder, STATUS each one for MESSAGES and, where the server offers
 * STATUS=SIZE (RFC 8438), SIZE; without it GETQUOTAROOT INBOX's STORAGE
 * where QUOTA is offered; LOGOUT. Read-only: STATUS selects nothing, so
 * no flag or \Recent changes. One connection at a time, and that one
 * under the mover's connection budget and pace: the survey never adds a
 * connection or a command over the caps that protect the source. */
#include "survey.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cluster.h"
#include "imapc.h"
#include "log.h"
#include "util.h"

#define SURVEY_TIMEOUT_S 60
/* A server's answers are not trusted: more folders than this fail the
 * user's survey, and every count is held below 2^53. */
#define SURVEY_MAX_FOLDERS 100000
#define SURVEY_MAX_COUNT (1ULL << 53)

struct ms_survey {
	uv_loop_t *loop;
	struct ms_store *store;
	struct ms_server_cfg src;
	uv_timer_t *timer;
	struct ms_mover *mover;		/* lends a slot and the pace; or NULL */
	struct ms_imapc *c;		/* the user being surveyed, or NULL;
					   it holds a slot of the mover's */
	char user[256];
	char **folders;			/* LIST's selectable folders */
	unsigned int nfolders, capfolders;
	unsigned int pending;		/* STATUS and GETQUOTAROOT to come */
	uint64_t msgs, bytes;
	int64_t quota_kb;		/* -1: none */
	unsigned int sized;		/* STATUS replies that had SIZE */
	int failed;
	struct ms_cluster *cluster;	/* or NULL: the store's connection */
	struct survey_ask *ask;		/* a look or a write on the
					   cluster's, or NULL */
	/* the cluster's: user's size until it is written (again at each
	 * tick: the user is not surveyed twice, nor the next one begun) */
	int unwritten, unwritten_said;
	struct ms_user_size written;
};

/* A look for the next user, or a write of a size, under way on the
 * cluster's connection; sv NULL once the survey is freed (the answer
 * comes later). */
struct survey_ask {
	struct ms_survey *sv;
};

static void folders_free(struct ms_survey *sv)
{
	for (unsigned int i = 0; i < sv->nfolders; i++)
		free(sv->folders[i]);
	free(sv->folders);
	sv->folders = NULL;
	sv->nfolders = sv->capfolders = 0;
}

/* The connection gone, its slot back to the mover. */
static void survey_close(struct ms_survey *sv)
{
	if (sv->c == NULL)
		return;
	ms_imapc_free(&sv->c);
	if (sv->mover != NULL)
		ms_mover_src_slot_put(sv->mover);
}

static void on_logout(struct ms_imapc *c, const struct ms_imap_response *r,
		      void *ctx)
{
	struct ms_survey *sv = ctx;

	survey_close(sv);
}

/* sv->ask made: 0, or -1 out of memory. */
static int ask_new(struct ms_survey *sv)
{
	if ((sv->ask = calloc(1, sizeof(*sv->ask))) == NULL)
		return -1;
	sv->ask->sv = sv;
	return 0;
}

static void on_size_written(void *ctx, const char *error)
{
	struct survey_ask *ask = ctx;
	struct ms_survey *sv = ask->sv;

	free(ask);
	if (sv == NULL)
		return;			/* freed meanwhile: sized again later */
	sv->ask = NULL;
	if (error == NULL) {
		sv->unwritten = 0;
		sv->unwritten_said = 0;
		return;
	}
	if (!sv->unwritten_said)
		ms_log(MS_LOG_ERROR, "survey: %s: store: %s: written again at "
		       "the next turn", sv->user, error);
	sv->unwritten_said = 1;
}

/* Several gateways: the size written on the cluster's connection (the
 * loop waits on nothing), the next user looked for once it is in. */
static void size_send(struct ms_survey *sv)
{
	if (ask_new(sv) < 0)
		return;			/* again at the next turn */
	ms_cluster_size_set(sv->cluster, sv->user, &sv->written,
			    on_size_written, sv->ask);
}

/* The user's row: what the source said, or "failed" (not tried again
 * until the store's row goes). */
static void finish(struct ms_survey *sv, const char *error)
{
	struct ms_user_size sz = { .messages = -1, .bytes = -1 };
	int64_t id;

	if (error != NULL) {
		ms_warn("survey: %s: %s", sv->user, error);
		snprintf(sz.how, sizeof(sz.how), "failed");
	} else {
		sz.messages = (int64_t)sv->msgs;
		if (sv->nfolders > 0 && sv->sized == sv->nfolders) {
			sz.bytes = (int64_t)sv->bytes;
			snprintf(sz.how, sizeof(sz.how), "status-size");
		} else if (sv->quota_kb >= 0) {
			sz.bytes = sv->quota_kb * 1024;
			snprintf(sz.how, sizeof(sz.how), "quota");
		} else {
			snprintf(sz.how, sizeof(sz.how), "messages");
		}
		ms_debug("survey: %s: %lld messages, %lld bytes (%s)",
			 sv->user, (long long)sz.messages,
			 (long long)sz.bytes, sz.how);
	}
	if (sv->cluster != NULL) {
		sv->written = sz;
		sv->unwritten = 1;
		sv->unwritten_said = 0;
		size_send(sv);
	} else if (ms_store_user_get(sv->store, sv->user, &id) < 0 ||
		   ms_store_size_set(sv->store, id, &sz) < 0) {
		ms_log(MS_LOG_ERROR, "survey: %s: store: %s", sv->user,
		       ms_store_error(sv->store));
	}
	folders_free(sv);
	/* The next user waits for the connection to be gone. */
	if (error != NULL || sv->c == NULL ||
	    ms_imapc_cmd(sv->c, on_logout, sv, "LOGOUT") < 0)
		survey_close(sv);
}

/* a + b, at most SURVEY_MAX_COUNT (a is never above it) */
static uint64_t capped_add(uint64_t a, uint64_t b)
{
	return b >= SURVEY_MAX_COUNT - a ? SURVEY_MAX_COUNT : a + b;
}

static void on_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	struct ms_survey *sv = ctx;
	const struct ms_imap_arg *l;
	uint64_t n;

	if (r->argc >= 4 && ms_imap_arg_is(&r->args[0], "LIST") &&
	    r->args[1].type == MS_ARG_LIST) {
		const char *name = ms_imap_arg_str(&r->args[3]);

		l = &r->args[1];
		for (unsigned int i = 0; i < l->list_count; i++)
			if (ms_imap_arg_is(&l->list[i], "\\Noselect") ||
			    ms_imap_arg_is(&l->list[i], "\\NonExistent"))
				return;
		if (name == NULL || sv->nfolders >= SURVEY_MAX_FOLDERS ||
		    MS_ARRAY_ROOM(sv->folders, sv->nfolders, sv->capfolders,
				  16) < 0 ||
		    (sv->folders[sv->nfolders] = strdup(name)) == NULL) {
			sv->failed = 1;
			return;
		}
		sv->nfolders++;
	} else if (r->argc >= 3 && ms_imap_arg_is(&r->args[0], "STATUS") &&
		   r->args[2].type == MS_ARG_LIST) {
		l = &r->args[2];
		for (unsigned int i = 0; i + 1 < l->list_count; i += 2) {
			if (ms_imap_arg_number(&l->list[i + 1], &n) < 0)
				continue;
			if (ms_imap_arg_is(&l->list[i], "MESSAGES"))
				sv->msgs = capped_add(sv->msgs, n);
			if (ms_imap_arg_is(&l->list[i], "SIZE")) {
				sv->bytes = capped_add(sv->bytes, n);
				sv->sized++;
			}
		}
	} else if (r->argc >= 3 && ms_imap_arg_is(&r->args[0], "QUOTA") &&
		   r->args[2].type == MS_ARG_LIST) {
		/* (STORAGE used limit ...): KiB; the largest root's */
		l = &r->args[2];
		for (unsigned int i = 0; i + 2 < l->list_count; i += 3)
			if (ms_imap_arg_is(&l->list[i], "STORAGE") &&
			    ms_imap_arg_number(&l->list[i + 1], &n) == 0 &&
			    n < SURVEY_MAX_COUNT / 1024 &&
			    (int64_t)n > sv->quota_kb)
				sv->quota_kb = (int64_t)n;
	}
	(void)c;
}

/* One of the counting commands answered: the last one ends the user. */
static void counted(struct ms_survey *sv, const char *error)
{
	if (error != NULL && sv->failed == 0)
		sv->failed = 1;
	if (--sv->pending == 0)
		finish(sv, sv->failed ? "STATUS refused" : NULL);
}

/* A folder STATUS refuses fails the survey: its size would be missing. */
static void on_status(struct ms_imapc *c, const struct ms_imap_response *r,
		      void *ctx)
{
	if (r == NULL) {
		finish(ctx, ms_imapc_error(c));
		return;
	}
	counted(ctx, r->status != MS_STATUS_OK ? "refused" : NULL);
}

/* A refused GETQUOTAROOT leaves only the quota unknown. */
static void on_quota(struct ms_imapc *c, const struct ms_imap_response *r,
		     void *ctx)
{
	if (r == NULL) {
		finish(ctx, ms_imapc_error(c));
		return;
	}
	if (r->status != MS_STATUS_OK)
		((struct ms_survey *)ctx)->quota_kb = -1;
	counted(ctx, NULL);
}

static void on_listed(struct ms_imapc *c, const struct ms_imap_response *r,
		      void *ctx)
{
	struct ms_survey *sv = ctx;
	int size = ms_imapc_has_cap(c, "STATUS=SIZE");
	char q[1100];

	if (r == NULL || r->status != MS_STATUS_OK || sv->failed) {
		finish(sv, r == NULL ? ms_imapc_error(c) : "LIST refused");
		return;
	}
	for (unsigned int i = 0; i < sv->nfolders; i++) {
		if (ms_imap_quote(q, sizeof(q), sv->folders[i]) < 0 ||
		    ms_imapc_cmd(c, on_status, sv, "STATUS %s (MESSAGES%s)",
				 q, size ? " SIZE" : "") < 0) {
			finish(sv, "a folder name it cannot send");
			return;
		}
		sv->pending++;
	}
	if (!size && ms_imapc_has_cap(c, "QUOTA") &&
	    ms_imapc_cmd(c, on_quota, sv, "GETQUOTAROOT INBOX") == 0)
		sv->pending++;
	if (sv->pending == 0)
		finish(sv, NULL);	/* no folder at all */
}

static void on_ready(struct ms_imapc *c, const char *error, void *ctx)
{
	struct ms_survey *sv = ctx;

	if (error != NULL) {
		finish(sv, error);
		return;
	}
	ms_imapc_set_untagged(c, on_untagged, sv);
	if (ms_imapc_cmd(c, on_listed, sv, "LIST \"\" \"*\"") < 0)
		finish(sv, ms_imapc_error(c));
}

/* user ("" none) surveyed now, unless a copy waits for a connection. */
static void survey_start(struct ms_survey *sv, const char *user)
{
	struct ms_imapc_settings set;
	struct ms_pacer *pacer = NULL;
	char *login;

	if (user[0] == '\0' || sv->c != NULL)
		return;
	snprintf(sv->user, sizeof(sv->user), "%s", user);
	/* a copy waiting for a connection goes first: try at the next tick */
	if (sv->mover != NULL && !ms_mover_src_slot_try(sv->mover, &pacer))
		return;
	if ((login = ms_server_login_name(&sv->src, sv->user)) == NULL)
		goto give_back;
	sv->msgs = sv->bytes = 0;
	sv->quota_kb = -1;
	sv->sized = sv->pending = 0;
	sv->failed = 0;
	set = (struct ms_imapc_settings){
		.host = sv->src.host, .port = sv->src.port,
		.tls = ms_server_tls(&sv->src), .user = login,
		.admin = sv->src.admin, .password = sv->src.password,
		.mech = sv->src.mech, .timeout_secs = SURVEY_TIMEOUT_S,
		.pacer = pacer,
	};
	sv->c = ms_imapc_new(sv->loop, &set, on_ready, sv);
	free(login);
	if (sv->c != NULL)
		return;
give_back:
	if (sv->mover != NULL)
		ms_mover_src_slot_put(sv->mover);
}

static void on_next(void *ctx, const char *error, const char *user)
{
	struct survey_ask *ask = ctx;
	struct ms_survey *sv = ask->sv;

	free(ask);
	if (sv == NULL)
		return;			/* freed meanwhile */
	sv->ask = NULL;
	if (error != NULL) {
		ms_log(MS_LOG_ERROR, "survey: store: %s", error);
		return;
	}
	survey_start(sv, user);
}

static void on_tick(uv_timer_t *t)
{
	struct ms_survey *sv = t->data;
	char user[sizeof(sv->user)];
	int found = 0;

	if (sv->c != NULL || sv->ask != NULL)
		return;
	if (sv->cluster != NULL && sv->unwritten) {
		size_send(sv);
		return;
	}
	if (sv->cluster != NULL) {
		if (ask_new(sv) < 0)
			return;
		ms_cluster_size_next(sv->cluster, on_next, sv->ask);
		return;
	}
	if (ms_store_size_next(sv->store, user, sizeof(user), &found) < 0) {
		ms_log(MS_LOG_ERROR, "survey: store: %s",
		       ms_store_error(sv->store));
		return;
	}
	if (found)
		survey_start(sv, user);
}

struct ms_survey *ms_survey_new(uv_loop_t *loop, struct ms_store *store,
				const struct ms_server_cfg *src,
				unsigned int per_minute, struct ms_mover *mover)
{
	struct ms_survey *sv = calloc(1, sizeof(*sv));
	uint64_t every = 60000 / (per_minute > 0 ? per_minute : 1);

	if (sv == NULL || (sv->timer = malloc(sizeof(*sv->timer))) == NULL) {
		free(sv);
		return NULL;
	}
	sv->loop = loop;
	sv->store = store;
	sv->mover = mover;
	sv->src = *src;
	uv_timer_init(loop, sv->timer);
	sv->timer->data = sv;
	uv_timer_start(sv->timer, on_tick, every, every);
	return sv;
}

void ms_survey_set_cluster(struct ms_survey *sv, struct ms_cluster *c)
{
	if (sv != NULL)
		sv->cluster = c;
}

void ms_survey_free(struct ms_survey **svp)
{
	struct ms_survey *sv = *svp;

	if (sv == NULL)
		return;
	*svp = NULL;
	if (sv->ask != NULL)
		sv->ask->sv = NULL;
	survey_close(sv);
	folders_free(sv);
	ms_close_free((uv_handle_t *)sv->timer, sv->timer);
	free(sv);
}
