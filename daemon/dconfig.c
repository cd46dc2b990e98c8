/* mailshiftd's configuration file: one handler per section, every value
 * checked (a number is digits in a range, a path fits, a policy is one of
 * three words), each error naming the key. See docs/mailshift.conf.5. */
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "cluster.h"
#include "dconfig.h"
#include "mover.h"
#include "pop3_uidl.h"
#include "reader.h"

typedef int key_fn(struct ms_dconfig *c, const char *key, const char *value,
		   char *err, size_t errsz);

static int set_buf(char *dst, size_t sz, const char *key, const char *v,
		   char *err, size_t errsz)
{
	if (strlen(v) >= sz) {
		snprintf(err, errsz, "%s: value too long (at most %zu bytes)",
			 key, sz - 1);
		return -1;
	}
	snprintf(dst, sz, "%s", v);
	return 0;
}

static int set_uint(unsigned int *dst, const char *key, const char *v,
		    unsigned int min, unsigned int max, char *err,
		    size_t errsz)
{
	if (ms_parse_uint(v, min, max, dst) == 0)
		return 0;
	snprintf(err, errsz, "%s: \"%.40s\" is not a whole number from %u "
		 "to %u", key, v, min, max);
	return -1;
}

static int unknown(const char *key, const char *section, char *err,
		   size_t errsz)
{
	snprintf(err, errsz, "unknown key \"%s\" in [%s]", key, section);
	return -1;
}

/* A server URL of the given protocol into t. */
static int set_url(struct ms_server_cfg *t, enum ms_proto proto,
		   const char *what, const char *value, char *err,
		   size_t errsz)
{
	const char *why = NULL;

	if (ms_server_parse_url(t, value, &why) < 0 || t->proto != proto) {
		snprintf(err, errsz, "%.300s: %s", value,
			 why != NULL ? why : what);
		return -1;
	}
	return 0;
}

static int backend_key(struct ms_dconfig *c, int dst, const char *key,
		       const char *value, char *err, size_t errsz)
{
	struct ms_gw_config *g = &c->gw;
	const char *why;

	if (!strcmp(key, "imap") || !strcmp(key, "url"))
		return set_url(dst ? &g->dst_imap : &g->src_imap, MS_PROTO_IMAP,
			       "not an IMAP URL", value, err, errsz);
	if (!strcmp(key, "pop3"))
		return set_url(dst ? &g->dst_pop3 : &g->src_pop3, MS_PROTO_POP3,
			       "not a POP3 URL", value, err, errsz);
	if (!strcmp(key, "smtp"))
		return set_url(dst ? &g->dst_smtp : &g->src_smtp, MS_PROTO_SMTP,
			       "not an SMTP URL", value, err, errsz);
	if (!strcmp(key, "submission"))
		return set_url(dst ? &g->dst_submission : &g->src_submission,
			       MS_PROTO_SMTP, "not an SMTP URL", value, err,
			       errsz);
	if (!strcmp(key, "pop3_uidl_format")) {
		if (ms_uidl_format_check(value, &why) < 0) {
			snprintf(err, errsz, "pop3_uidl_format \"%.100s\": %s",
				 value, why);
			return -1;
		}
		return set_buf(dst ? g->dst_uidl_format : g->src_uidl_format,
			       sizeof(g->src_uidl_format), key, value, err,
			       errsz);
	}
	if (!strcmp(key, "admin"))
		return set_buf(dst ? c->dst_admin : c->src_admin,
			       sizeof(c->src_admin), key, value, err, errsz);
	if (!strcmp(key, "admin_password_file"))
		return set_buf(dst ? c->dst_admin_pwf : c->src_admin_pwf,
			       sizeof(c->src_admin_pwf), key, value, err, errsz);
	if (dst && !strcmp(key, "doveadm_url")) {
		if (ms_doveadm_parse_url(&g->doveadm, value, &why) < 0) {
			snprintf(err, errsz, "doveadm_url %.300s: %s", value,
				 why);
			return -1;
		}
		return 0;
	}
	if (dst && !strcmp(key, "doveadm_key_file"))
		return set_buf(c->dst_doveadm_keyf, sizeof(c->dst_doveadm_keyf),
			       key, value, err, errsz);
	if (!strcmp(key, "server_name"))
		return set_buf(dst ? c->dst_sn : c->src_sn, sizeof(c->src_sn),
			       key, value, err, errsz);
	if (!strcmp(key, "ca_file"))
		return set_buf(dst ? c->dst_ca : c->src_ca, sizeof(c->src_ca),
			       key, value, err, errsz);
	if (!strcmp(key, "insecure"))
		return ms_config_bool(dst ? &c->dst_insecure : &c->src_insecure,
				      key, value, err, errsz);
	if (!strcmp(key, "transparent"))
		return ms_config_bool(dst ? &c->dst_transparent :
				      &c->src_transparent, key, value, err, errsz);
	if (!dst && !strcmp(key, "commands_per_second"))
		return set_uint(&g->src_commands_per_second, key, value, 0,
				100000, err, errsz);
	return unknown(key, dst ? "destination" : "source", err, errsz);
}

static int source_key(struct ms_dconfig *c, const char *key, const char *v,
		      char *err, size_t errsz)
{
	return backend_key(c, 0, key, v, err, errsz);
}

static int destination_key(struct ms_dconfig *c, const char *key,
			   const char *v, char *err, size_t errsz)
{
	return backend_key(c, 1, key, v, err, errsz);
}

static int listen_key(struct ms_dconfig *c, const char *key,
		      const char *value, char *err, size_t errsz)
{
	static const struct {
		const char *key;
		enum ms_gw_proto proto;
		int tls;
	} kinds[] = {
		{ "imap", MS_GW_IMAP, 0 }, { "imaps", MS_GW_IMAP, 1 },
		{ "pop3", MS_GW_POP3, 0 }, { "pop3s", MS_GW_POP3, 1 },
		{ "smtp", MS_GW_SMTP, 0 },
		{ "submission", MS_GW_SUBMISSION, 0 },
		{ "submissions", MS_GW_SUBMISSION, 1 },
	};
	struct ms_gw_config *g = &c->gw;
	int r;

	if (!strcmp(key, "transparent"))
		return ms_config_bool(&g->transparent, key, value, err, errsz);
	/* Limits and plaintext logins: the gateway's own keys. */
	if ((r = ms_gw_listen_key(g, key, value, err, errsz)) <= 0)
		return r;
	for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
		if (strcmp(key, kinds[i].key) != 0)
			continue;
		if (g->nlisten == MS_GW_MAX_LISTEN) {
			snprintf(err, errsz, "too many listeners (at most %d)",
				 MS_GW_MAX_LISTEN);
			return -1;
		}
		if (set_buf(g->listen[g->nlisten].addr,
			    sizeof(g->listen[0].addr), key, value, err,
			    errsz) < 0)
			return -1;
		g->listen[g->nlisten].proto = kinds[i].proto;
		g->listen[g->nlisten++].implicit_tls = kinds[i].tls;
		return 0;
	}
	snprintf(err, errsz, "unknown listener \"%s\" (imap, imaps, pop3, "
		 "pop3s, smtp, submission, submissions, transparent)", key);
	return -1;
}

static int tls_key(struct ms_dconfig *c, const char *key, const char *value,
		   char *err, size_t errsz)
{
	if (!strcmp(key, "cert"))
		return set_buf(c->gw.cert, sizeof(c->gw.cert), key, value, err,
			       errsz);
	if (!strcmp(key, "key"))
		return set_buf(c->gw.key, sizeof(c->gw.key), key, value, err,
			       errsz);
	return unknown(key, "tls", err, errsz);
}

static int store_key(struct ms_dconfig *c, const char *key, const char *value,
		     char *err, size_t errsz)
{
	if (!strcmp(key, "path"))
		return set_buf(c->store, sizeof(c->store), key, value, err,
			       errsz);
	/* A PostgreSQL database in place of the file (store_pg.c): the
	 * store is then named by its URL wherever it was by its path. */
	if (!strcmp(key, "url")) {
		char why[256];

		if (ms_store_url_check(value, why, sizeof(why)) < 0) {
			snprintf(err, errsz, "url: %s", why);
			return -1;
		}
		return set_buf(c->store, sizeof(c->store), key, value, err,
			       errsz);
	}
	/* A PostgreSQL store's answers: how long one is waited for. */
	if (!strcmp(key, "timeout")) {
		if (ms_parse_duration(value, &c->store_timeout) < 0 ||
		    c->store_timeout < 1 || c->store_timeout > 600) {
			snprintf(err, errsz, "timeout: \"%.40s\" is not a "
				 "duration from 1s to 10m", value);
			return -1;
		}
		return 0;
	}
	/* The store's reader's threads, each with a connection of its
	 * own (reader.h). */
	if (!strcmp(key, "readers"))
		return set_uint(&c->store_readers, key, value, 1,
				MS_READERS_MAX, err, errsz);
	if (!strcmp(key, "backend")) {
		if (strcmp(value, "sqlite") != 0) {
			snprintf(err, errsz, "backend: only \"sqlite\"");
			return -1;
		}
		return 0;
	}
	return unknown(key, "store", err, errsz);
}

static int control_key(struct ms_dconfig *c, const char *key,
		       const char *value, char *err, size_t errsz)
{
	if (!strcmp(key, "socket"))
		return set_buf(c->control, sizeof(c->control), key, value, err,
			       errsz);
	if (!strcmp(key, "group"))
		return set_buf(c->control_group, sizeof(c->control_group), key,
			       value, err, errsz);
	return unknown(key, "control", err, errsz);
}

static int daemon_key(struct ms_dconfig *c, const char *key,
		      const char *value, char *err, size_t errsz)
{
	if (!strcmp(key, "pid_file"))
		return set_buf(c->pid_file, sizeof(c->pid_file), key, value,
			       err, errsz);
	if (!strcmp(key, "user"))
		return set_buf(c->user, sizeof(c->user), key, value, err,
			       errsz);
	if (!strcmp(key, "group"))
		return set_buf(c->group, sizeof(c->group), key, value, err,
			       errsz);
	if (!strcmp(key, "capability_refresh"))
		return set_uint(&c->gw.caps_refresh, key, value, 1, 86400, err,
				errsz);
	return unknown(key, "daemon", err, errsz);
}

static int policy_word(enum ms_policy *p, const char *key, const char *value,
		       char *err, size_t errsz)
{
	if (ms_policy_parse(value, p) == 0)
		return 0;
	snprintf(err, errsz, "%s: policy \"%.40s\" (passthrough, hold or off)",
		 key, value);
	return -1;
}

static int domain_policy(struct ms_gw_config *g, const char *domain,
			 const char *value, char *err, size_t errsz)
{
	if (*domain == '\0' || strlen(domain) >= sizeof(g->domains[0].domain) ||
	    strpbrk(domain, "@ \t\"\\") != NULL) {
		snprintf(err, errsz, "domain.%.200s: not a domain name", domain);
		return -1;
	}
	if (g->ndomains == MS_GW_MAX_DOMAINS) {
		snprintf(err, errsz, "too many domain policies (at most %d)",
			 MS_GW_MAX_DOMAINS);
		return -1;
	}
	if (policy_word(&g->domains[g->ndomains].policy, "domain policy",
			value, err, errsz) < 0)
		return -1;
	snprintf(g->domains[g->ndomains++].domain,
		 sizeof(g->domains[0].domain), "%s", domain);
	return 0;
}

/* A duration (retire.h's: 5, 5s, 2m) of at most an hour: a user who has
 * not come back for that long is gone, and a flip must not wait longer. */
static int flip_quiet(struct ms_gw_config *g, const char *value, char *err,
		      size_t errsz)
{
	if (ms_parse_duration(value, &g->flip_quiet) < 0 ||
	    g->flip_quiet > 3600) {
		snprintf(err, errsz, "flip_quiet: \"%.40s\" is not a duration "
			 "from 0s to 1h (a number with s, m or h)", value);
		return -1;
	}
	return 0;
}

static int policy_key(struct ms_dconfig *c, const char *key,
		      const char *value, char *err, size_t errsz)
{
	struct ms_gw_config *g = &c->gw;

	if (!strcmp(key, "hold_max_seconds"))
		return set_uint(&g->hold_max_seconds, key, value, 0, 86400,
				err, errsz);
	if (!strcmp(key, "connections"))
		return set_uint(&g->connections, key, value, 1, 64, err, errsz);
	if (!strcmp(key, "flip_quiet"))
		return flip_quiet(g, value, err, errsz);
	if (!strcmp(key, "on_first_login"))
		return policy_word(&g->policy, key, value, err, errsz);
	if (!strncmp(key, "domain.", 7))
		return domain_policy(g, key + 7, value, err, errsz);
	return unknown(key, "policy", err, errsz);
}

/* "H:MM" or "HH:MM" into minutes after midnight; 24:00 only as an end. */
static int parse_hhmm(const char *s, const char **end, int is_end, int *min)
{
	int h = 0, n = 0;

	while (*s >= '0' && *s <= '9' && n < 2) {
		h = h * 10 + (*s++ - '0');
		n++;
	}
	if (n == 0 || *s++ != ':' || s[0] < '0' || s[0] > '5' || s[1] < '0' ||
	    s[1] > '9')
		return -1;
	*min = h * 60 + (s[0] - '0') * 10 + (s[1] - '0');
	*end = s + 2;
	return h < 24 || (is_end && *min == 24 * 60) ? 0 : -1;
}

static int sweep_key(struct ms_dconfig *c, const char *key, const char *value,
		     char *err, size_t errsz)
{
	struct ms_gw_config *g = &c->gw;
	const char *p;
	int from, to;

	if (!strcmp(key, "enabled"))
		return ms_config_bool(&g->sweep, key, value, err, errsz);
	if (!strcmp(key, "concurrency"))
		return set_uint(&g->sweep_concurrency, key, value, 1, 1000, err,
				errsz);
	if (!strcmp(key, "rate"))
		return set_uint(&g->sweep_rate, key, value, 0, 1000000, err,
				errsz);
	if (!strcmp(key, "interval"))
		return set_uint(&g->sweep_interval, key, value, 1, 86400, err,
				errsz);
	if (!strcmp(key, "survey")) {
		unsigned int n;

		if (set_uint(&n, key, value, 0, 6000, err, errsz) < 0)
			return -1;
		g->survey_rate = (int)n;
		return 0;
	}
	if (!strcmp(key, "window")) {
		if (parse_hhmm(value, &p, 0, &from) < 0 || *p++ != '-' ||
		    parse_hhmm(p, &p, 1, &to) < 0 || *p != '\0') {
			snprintf(err, errsz, "window: HH:MM-HH:MM (00:00 to "
				 "24:00)");
			return -1;
		}
		g->sweep_from = from;
		g->sweep_to = to;
		return 0;
	}
	return unknown(key, "sweep", err, errsz);
}

static int metrics_key(struct ms_dconfig *c, const char *key,
		       const char *value, char *err, size_t errsz)
{
	if (!strcmp(key, "listen"))
		return set_buf(c->gw.metrics, sizeof(c->gw.metrics), key, value,
			       err, errsz);
	return unknown(key, "metrics", err, errsz);
}

static int mover_key(struct ms_dconfig *c, const char *key, const char *value,
		     char *err, size_t errsz)
{
	enum ms_mover_names n;

	/* names is the gateway's too (its copies, retire's comparison);
	 * the rest is mailshiftctl migrate's, and it checks them. */
	if (strcmp(key, "names") != 0)
		return 0;
	if (ms_mover_names_parse(value, &n) < 0) {
		snprintf(err, errsz, "names: \"%.40s\" is not source or "
			 "destination", value);
		return -1;
	}
	c->gw.mover_names = (int)n;
	return 0;
}

static int steer_key(struct ms_dconfig *c, const char *key, const char *value,
		     char *err, size_t errsz)
{
	return ms_steer_key(&c->steer, key, value, err, errsz);
}

static int takeover_key(struct ms_dconfig *c, const char *key,
			const char *value, char *err, size_t errsz)
{
	return ms_takeover_key(&c->takeover, key, value, err, errsz);
}

static int retire_key(struct ms_dconfig *c, const char *key,
		      const char *value, char *err, size_t errsz)
{
	return ms_retire_key(&c->retire, key, value, err, errsz);
}

/* [gateway]: the name the jobs it takes carry, and their lease. */
static int gateway_key(struct ms_dconfig *c, const char *key,
		       const char *value, char *err, size_t errsz)
{
	if (!strcmp(key, "name")) {
		if (*value == '\0' || ms_user_name_check(value) != NULL) {
			snprintf(err, errsz, "name: not empty, no control "
				 "characters");
			return -1;
		}
		return set_buf(c->gw.gw_name, sizeof(c->gw.gw_name), key,
			       value, err, errsz);
	}
	if (!strcmp(key, "lease")) {
		if (ms_parse_duration(value, &c->gw.job_lease) < 0 ||
		    c->gw.job_lease < 2 || c->gw.job_lease > 3600) {
			snprintf(err, errsz, "lease: \"%.40s\" is not a "
				 "duration from 2s to 1h", value);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "heartbeat") || !strcmp(key, "timeout")) {
		unsigned int *ms = key[0] == 'h' ? &c->gw.gw_heartbeat_ms :
				   &c->gw.gw_timeout_ms;

		if (key[0] == 'h')
			c->gw_heartbeat_set = 1;
		else
			c->gw_timeout_set = 1;
		if (ms_cluster_parse_ms(value, ms) < 0) {
			snprintf(err, errsz, "%s: \"%.40s\" is not a duration "
				 "(a number with ms or s)", key, value);
			return -1;
		}
		return 0;
	}
	return unknown(key, "gateway", err, errsz);
}

static int on_key(void *ctx, const char *section, const char *key,
		  const char *value, char *err, size_t errsz)
{
	static const struct {
		const char *name;
		key_fn *fn;
	} sections[] = {
		{ "listen", listen_key }, { "tls", tls_key },
		{ "source", source_key }, { "destination", destination_key },
		{ "store", store_key }, { "control", control_key },
		{ "daemon", daemon_key }, { "policy", policy_key },
		{ "sweep", sweep_key }, { "metrics", metrics_key },
		{ "mover", mover_key }, { "steer", steer_key },
		{ "takeover", takeover_key },
		{ "retire", retire_key }, { "gateway", gateway_key },
	};

	for (size_t i = 0; i < sizeof(sections) / sizeof(sections[0]); i++)
		if (!strcmp(section, sections[i].name))
			return sections[i].fn(ctx, key, value, err, errsz);
	snprintf(err, errsz, "unknown section [%s]", section);
	return -1;
}

static void defaults(struct ms_dconfig *c)
{
	memset(c, 0, sizeof(*c));
	c->gw.policy = MS_POLICY_PASSTHROUGH;
	c->gw.sweep_from = c->gw.sweep_to = -1;
	c->gw.survey_rate = -1;
	c->gw.hold_max_seconds = 60;
	c->gw.flip_quiet = 5;
	c->gw.connections = 4;
	c->gw.job_lease = 60;
	c->gw.gw_heartbeat_ms = 2000;
	c->gw.gw_timeout_ms = 10000;
	snprintf(c->gw.gw_name, sizeof(c->gw.gw_name), "%s", ms_host_name());
	ms_steer_defaults(&c->steer);
	ms_takeover_defaults(&c->takeover);
	ms_retire_defaults(&c->retire);
	snprintf(c->store, sizeof(c->store), "/var/lib/mailshift/mailshift.db");
	c->store_timeout = MS_STORE_PG_TIMEOUT_MS / 1000;
	c->store_readers = 2;
	snprintf(c->control, sizeof(c->control), "/run/mailshift/control.sock");
}

/* What one key cannot say: keys that go together. */
static int check(const char *path, struct ms_dconfig *c, char *err,
		 size_t errsz)
{
	const char *why_s;
	char why[512];

	/* Unset, they follow a short lease: the timeout half of it (at
	 * most 10 s), the heartbeat a fifth of that (at most 2 s). */
	if (!c->gw_timeout_set && c->gw.gw_timeout_ms >= c->gw.job_lease * 500)
		c->gw.gw_timeout_ms = c->gw.job_lease * 500;
	if (!c->gw_heartbeat_set &&
	    c->gw.gw_heartbeat_ms > c->gw.gw_timeout_ms / 5)
		c->gw.gw_heartbeat_ms = c->gw.gw_timeout_ms / 5;
	if ((why_s = ms_cluster_check(c->gw.gw_heartbeat_ms,
				      c->gw.gw_timeout_ms)) != NULL) {
		snprintf(err, errsz, "%s: [gateway] %s", path, why_s);
		return -1;
	}
	/* A cutover waits for a gateway's acknowledgement at most the
	 * timeout, under the lease of its job. */
	if (c->gw.gw_timeout_ms >= c->gw.job_lease * 1000ULL) {
		snprintf(err, errsz, "%s: [gateway] timeout must be shorter "
			 "than lease", path);
		return -1;
	}
	if (ms_store_is_url(c->store))
		snprintf(c->gw.store_url, sizeof(c->gw.store_url), "%s",
			 c->store);
	if (c->gw.nlisten == 0) {
		snprintf(err, errsz, "%s: no [listen] address", path);
		return -1;
	}
	if ((c->gw.cert[0] != '\0') != (c->gw.key[0] != '\0')) {
		snprintf(err, errsz, "%s: [tls] needs both cert and key", path);
		return -1;
	}
	for (int side = 0; side < 2; side++) {
		if ((side ? c->dst_admin : c->src_admin)[0] != '\0' &&
		    (side ? c->dst_admin_pwf : c->src_admin_pwf)[0] == '\0') {
			snprintf(err, errsz, "%s: [%s] admin needs "
				 "admin_password_file", path,
				 side ? "destination" : "source");
			return -1;
		}
	}
	if ((c->gw.doveadm.host[0] != '\0') != (c->dst_doveadm_keyf[0] != '\0')) {
		snprintf(err, errsz, "%s: [destination] doveadm_url and "
			 "doveadm_key_file go together", path);
		return -1;
	}
	if (c->group[0] != '\0' && c->user[0] == '\0') {
		snprintf(err, errsz, "%s: [daemon] group needs user", path);
		return -1;
	}
	if (ms_steer_check(&c->steer, why, sizeof(why)) < 0) {
		snprintf(err, errsz, "%s: %s", path, why);
		return -1;
	}
	return 0;
}

/* Each server's TLS settings apply to all its protocols. */
static void wire_tls(struct ms_dconfig *c)
{
	struct ms_gw_config *g = &c->gw;
	const char *sca = c->src_ca[0] != '\0' ? c->src_ca : NULL;
	const char *dca = c->dst_ca[0] != '\0' ? c->dst_ca : NULL;
	const char *ssn = c->src_sn[0] != '\0' ? c->src_sn : NULL;
	const char *dsn = c->dst_sn[0] != '\0' ? c->dst_sn : NULL;
	struct ms_server_cfg *src[] = { &g->src_imap, &g->src_pop3,
					&g->src_smtp, &g->src_submission };
	struct ms_server_cfg *dst[] = { &g->dst_imap, &g->dst_pop3,
					&g->dst_smtp, &g->dst_submission };

	for (size_t i = 0; i < sizeof(src) / sizeof(src[0]); i++) {
		src[i]->ca_file = sca;
		src[i]->insecure = c->src_insecure;
		src[i]->server_name = ssn;
		dst[i]->server_name = dsn;
		dst[i]->ca_file = dca;
		dst[i]->insecure = c->dst_insecure;
		/* not TLS, but per server and every protocol alike too */
		src[i]->transparent = c->src_transparent;
		dst[i]->transparent = c->dst_transparent;
	}
	g->doveadm.tls.ca_file = dca;
	g->doveadm.tls.insecure = c->dst_insecure;
	g->doveadm.tls.server_name = dsn;
}

int ms_dconfig_load(const char *path, struct ms_dconfig *c, char *err,
		    size_t errsz)
{
	defaults(c);
	if (ms_ini_parse(path, on_key, c, err, errsz) < 0 ||
	    check(path, c, err, errsz) < 0)
		return -1;
	wire_tls(c);
	return 0;
}
