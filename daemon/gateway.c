/* The gateway: see gateway.h, docs/gateway-spec.md and docs/design.md.
 *
 * This file holds struct ms_gateway's setup and teardown, the listeners,
 * and the table of front ends: a listener's connection goes to the front
 * end of its protocol, and the control socket's sessions, kick and close
 * all go to every front end, through struct ms_gw_frontend (gw_route.h)
 * only. No protocol, session or user's life is handled here.
 *
 * The files of the gateway: gw_session.c (IMAP and POP3 sessions, relay,
 * login at the server), gw_imap.c and gw_pop3.c (the protocols before
 * login), smtp.c (inbound SMTP and submission), lifecycle.c (routing and
 * each user's life), gw_admit.c (admission, what front ends may ask),
 * metrics.c, gw_login.c (the login mechanics all front ends share).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "activation.h"
#include "gw_internal.h"
#include "log.h"

struct listener {
	uv_tcp_t tcp;
	struct ms_gateway *gw;
	struct ms_gw_listen cfg;
	int open;
};

/* ---- listeners ---- */

/* The front ends the gateway serves, each as it describes itself
 * (gw_route.h); the order of the sessions list. */
static const struct ms_gw_frontend *const frontends[] = {
	&ms_gw_imap_frontend,
	&ms_gw_pop3_frontend,
	&ms_gw_mailbox_sessions,
	&ms_gw_smtp_frontend,
};

#define for_each_frontend(fe) \
	for (const struct ms_gw_frontend *const *fe = frontends; \
	     fe < frontends + sizeof(frontends) / sizeof(frontends[0]); fe++)

/* A listener's pending connection goes to the front end of its protocol. */
static void on_connection(uv_stream_t *server, int status)
{
	struct listener *l = server->data;

	if (status < 0)
		return;
	for_each_frontend(fe)
		if ((*fe)->accept != NULL &&
		    ((*fe)->protos & 1U << l->cfg.proto)) {
			(*fe)->accept(l->gw, server, &l->cfg, (*fe)->arg);
			return;
		}
	ms_drop_connection(server);
}

/* ---- control ---- */

json_t *ms_gateway_sessions(struct ms_gateway *gw)
{
	json_t *a = json_array();

	for_each_frontend(fe)
		if ((*fe)->sessions != NULL)
			(*fe)->sessions(gw, a);
	return a;
}

int ms_gateway_kick(struct ms_gateway *gw, const char *user)
{
	int n = 0;

	for_each_frontend(fe)
		if ((*fe)->kick != NULL)
			n += (*fe)->kick(gw, user);
	return n;
}

/* ---- setup ---- */

static int caps_start(struct ms_gateway *gw)
{
	const struct ms_gw_config *cfg = &gw->cfg;
	const struct ms_server_cfg *srv[MS_CAPS_N][2] = {
		[MS_CAPS_IMAP] = { &cfg->src_imap, &cfg->dst_imap },
		[MS_CAPS_POP3] = { &cfg->src_pop3, &cfg->dst_pop3 },
		[MS_CAPS_SMTP] = { &cfg->src_smtp, &cfg->dst_smtp },
		[MS_CAPS_SUBMISSION] = { &cfg->src_submission,
					 &cfg->dst_submission },
	};

	return ms_caps_new(gw->loop, srv, cfg->caps_refresh, &gw->caps);
}

json_t *ms_gateway_caps_json(struct ms_gateway *gw)
{
	return ms_caps_json(gw->caps);
}

/* The survey of the source's mailbox sizes, with the sweep's admin login
 * (src): on with the sweep unless [sweep] survey says otherwise. */
static void gw_survey_start(struct ms_gateway *gw,
			    const struct ms_server_cfg *src)
{
	int rate = gw->cfg.survey_rate >= 0 ? gw->cfg.survey_rate :
		   gw->cfg.sweep ? 60 : 0;

	if (rate == 0)
		return;
	if (gw->cfg.src_admin == NULL) {
		ms_warn("[sweep] survey needs the source's admin login "
			"([source] admin): survey off");
		return;
	}
	gw->survey = ms_survey_new(gw->loop, gw->store, src,
				   (unsigned int)rate, gw->mover);
}

json_t *ms_gateway_mover_json(struct ms_gateway *gw)
{
	struct ms_mover_pace p;

	if (gw->mover == NULL)
		return json_null();
	ms_mover_pace(gw->mover, &p);
	return json_pack("{s:i, s:{s:i, s:i}, s:i, s:f, s:f, s:b, s:I, s:I, "
			 "s:s}", "connections", (int)p.connections,
			 "connections_open", "source", (int)p.src_open,
			 "destination", (int)p.dst_open, "connections_waiting",
			 (int)p.waiting, "commands_per_second",
			 p.commands_per_second, "pace", p.pace, "backing_off",
			 p.backing_off, "source_commands",
			 (json_int_t)p.commands, "backoffs",
			 (json_int_t)p.backoffs, "backoff_reason", p.reason);
}

int ms_gateway_set_limits(struct ms_gateway *gw, unsigned int connections,
			  double commands_per_second, char *err, size_t errsz)
{
	if (gw->mover == NULL) {
		snprintf(err, errsz, "no mover (the config has no IMAP source "
			 "and destination)");
		return -1;
	}
	ms_mover_set_limits(gw->mover, connections, commands_per_second);
	return 0;
}

int ms_gateway_new(uv_loop_t *loop, const struct ms_gw_config *cfg,
		   struct ms_store *store, struct ms_gateway **gw_r,
		   char *err, size_t errsz)
{
	struct ms_gateway *gw = calloc(1, sizeof(*gw));

	if (gw == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	gw->loop = loop;
	gw->cfg = *cfg;
	gw->store = store;
	gw->conf_policy = cfg->policy;
	gw->conf_ndomains = cfg->ndomains;
	memcpy(gw->conf_domains, cfg->domains, sizeof(gw->conf_domains));
	if (gw_policies_load(gw, err, errsz) < 0)
		goto fail;
	if (cfg->cert[0] != '\0' &&
	    ms_tls_server_new(cfg->cert, cfg->key, &gw->tls, err, errsz) < 0)
		goto fail;
	if (cfg->src_imap.host[0] != '\0' && cfg->dst_imap.host[0] != '\0') {
		struct ms_server_cfg src = cfg->src_imap, dst = cfg->dst_imap;
		struct ms_mover_opts mo = {
			.caller_flips = 1,
			.names = (enum ms_mover_names)cfg->mover_names,
		};

		src.max_conns = dst.max_conns = cfg->connections;
		mo.commands_per_second = cfg->src_commands_per_second;
		src.admin = cfg->src_admin;
		src.password = cfg->src_admin_pw;
		dst.admin = cfg->dst_admin;
		dst.password = cfg->dst_admin_pw;
		if (cfg->doveadm.key != NULL)
			mo.doveadm = &cfg->doveadm;
		gw->mover = ms_mover_new(loop, store, &src, &dst, &mo);
		gw_survey_start(gw, &src);
	}
	for (unsigned int i = 0; i < cfg->nlisten; i++) {
		struct listener *l;

		if (cfg->listen[i].implicit_tls && gw->tls == NULL) {
			snprintf(err, errsz, "listener %s: implicit TLS needs "
				 "[tls] cert and key", cfg->listen[i].addr);
			goto fail;
		}
		l = calloc(1, sizeof(*l));
		if (l == NULL) {
			snprintf(err, errsz, "out of memory");
			goto fail;
		}
		l->gw = gw;
		l->cfg = cfg->listen[i];
		if (ms_activation_listen(loop, &l->tcp, l->cfg.addr,
					 cfg->transparent, on_connection, err,
					 errsz) < 0) {
			free(l);
			goto fail;
		}
		/* ms_listen initialised the handle: data is ours now. */
		l->tcp.data = l;
		l->open = 1;
		gw->listeners[gw->nlisteners++] = l;
	}
	if (ms_activation_check_all_taken(err, errsz) < 0)
		goto fail;
	if (caps_start(gw) < 0) {
		snprintf(err, errsz, "out of memory");
		goto fail;
	}
	if (gw_lifecycle_start(gw, &gw_mailbox_user_sessions, err,
			       errsz) < 0)
		goto fail;
	if (cfg->metrics[0] != '\0' && gw_metrics_start(gw, err, errsz) < 0)
		goto fail;
	*gw_r = gw;
	return 0;
fail:
	ms_gateway_free(&gw);
	return -1;
}

void ms_gateway_stop_listening(struct ms_gateway *gw)
{
	/* Listener memory goes in the close callbacks. */
	for (unsigned int i = 0; i < gw->nlisteners; i++)
		ms_close_free((uv_handle_t *)&gw->listeners[i]->tcp,
			      gw->listeners[i]);
	gw->nlisteners = 0;
}

void ms_gateway_set_reader(struct ms_gateway *gw, struct ms_reader *r)
{
	gw->reader = r;
}

struct ms_reader *ms_gateway_reader(struct ms_gateway *gw)
{
	return gw->reader;
}

void ms_gateway_free(struct ms_gateway **gwp)
{
	struct ms_gateway *gw = *gwp;

	if (gw == NULL)
		return;
	*gwp = NULL;
	for_each_frontend(fe)
		if ((*fe)->close_all != NULL)
			(*fe)->close_all(gw);
	/* on the next turn of the loop: the caller runs the loop once more */
	ms_gateway_stop_listening(gw);
	if (gw->metrics != NULL)
		ms_close_free((uv_handle_t *)gw->metrics, gw->metrics);
	ms_read_cancel(gw->mread);
	/* the survey first: it holds a slot of the mover's */
	ms_survey_free(&gw->survey);
	ms_mover_free(&gw->mover);
	ms_caps_free(&gw->caps);
	json_decref(gw->policy_set);
	gw_lifecycle_free(gw);
	ms_tls_server_free(&gw->tls);
	free(gw->penalties);
	gw_admit_free(gw);
	free(gw);
}

/* ---- several gateways: their rows, for status and sessions ---- */

static int row_add(void *ctx, const struct ms_gateway_row *g)
{
	struct ms_gateway_rows *rows = ctx;

	if (rows->n == rows->cap) {
		size_t cap = rows->cap ? rows->cap * 2 : 8;
		struct ms_gateway_row *v = realloc(rows->v, cap * sizeof(*v));

		if (v == NULL)
			return -1;
		rows->v = v;
		rows->cap = cap;
	}
	rows->v[rows->n++] = *g;
	return 0;
}

int ms_gateway_rows_read(struct ms_store *store, struct ms_gateway_rows *rows)
{
	rows->n = 0;
	return ms_store_gateway_foreach(store, row_add, rows) != 0 ? -1 : 0;
}

void ms_gateway_rows_free(struct ms_gateway_rows *rows)
{
	free(rows->v);
	memset(rows, 0, sizeof(*rows));
}

unsigned int ms_gateway_change_lock_ms(const struct ms_gateway *gw)
{
	return gw->cfg.gw_heartbeat_ms / 2 ? gw->cfg.gw_heartbeat_ms / 2 : 1;
}

int ms_gateway_clustered(const struct ms_gateway *gw)
{
	return gw->cluster != NULL;
}

json_t *ms_gateway_rows_json(struct ms_gateway *gw,
			     const struct ms_gateway_rows *rows)
{
	json_t *a = json_array();

	for (size_t i = 0; gw->cluster != NULL && i < rows->n; i++) {
		const struct ms_gateway_row *g = &rows->v[i];

		json_array_append_new(a, json_pack(
			"{s:s, s:I, s:I, s:I, s:I, s:b, s:b}", "name", g->name,
			"started", (json_int_t)(g->started_ms / 1000),
			"heartbeat_age_ms", (json_int_t)g->age_ms,
			"sessions", (json_int_t)g->sessions,
			"copies", (json_int_t)g->copies,
			"live", g->age_ms <= (int64_t)gw->cfg.gw_timeout_ms,
			"this", !strcmp(g->name, gw->cfg.gw_name)));
	}
	return a;
}

json_t *ms_gateway_cluster_json(struct ms_gateway *gw)
{
	struct ms_gateway_rows rows = { 0 };
	json_t *a = NULL;

	if (gw->cluster == NULL || ms_gateway_rows_read(gw->store, &rows) == 0)
		a = ms_gateway_rows_json(gw, &rows);
	ms_gateway_rows_free(&rows);
	return a;
}
