/* What the gateway lets in, and the rest of what its front ends may ask
 * of it (gw_route.h) besides a user's route: connections at once, all
 * together and per client address; plaintext logins and the trusted
 * networks; the names a login may give; the [listen] keys that set these;
 * the config, loop, TLS context and capabilities; one row of the sessions
 * list. It holds no session and no user.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "gw_internal.h"
#include "log.h"

/* Client connections from one address (IMAP, POP3 and SMTP together). */
struct addr_count {
	struct addr_count *next;
	unsigned int n;
	char addr[64];
};

static int addr_trusted(struct ms_gateway *gw, const char *addr);

int ms_gw_login_names_check(const char *session, const char *user,
			    const char *name)
{
	const char *why;

	if (strlen(user) > MS_GW_USER_MAX || strlen(name) > MS_GW_USER_MAX) {
		ms_info("%s: refused a user name of %zu bytes", session,
			strlen(user) > strlen(name) ? strlen(user) :
			strlen(name));
		return MS_GW_NAME_TOO_LONG;
	}
	if ((why = ms_user_name_check(user)) != NULL ||
	    (why = ms_user_name_check(name)) != NULL) {
		ms_info("%s: refused the user name \"%s\": %s", session, name,
			why);
		return MS_GW_NAME_INVALID;
	}
	return 0;
}

int ms_gw_admit(struct ms_gateway *gw, const char *addr,
		const char **why_r)
{
	unsigned int max = gw->cfg.max_conns ? gw->cfg.max_conns :
		MS_GW_MAX_CONNS;
	unsigned int per = gw->cfg.max_conns_per_ip ? gw->cfg.max_conns_per_ip :
		MS_GW_MAX_CONNS_PER_IP;
	struct addr_count **head =
		&gw->per_addr[ms_str_hash(addr) % ADDR_BUCKETS];
	struct addr_count *a;

	if (gw->nconns >= max) {
		*why_r = "Too many connections.";
		ms_warn("connection from %s refused: %u connections (the "
			"[listen] max_connections)", addr, gw->nconns);
		return -1;
	}
	for (a = *head; a != NULL; a = a->next)
		if (strcmp(a->addr, addr) == 0)
			break;
	/* The trusted networks (a webmail, the site's own relays) are
	 * many users behind one address: only the overall limit. */
	if (a != NULL && a->n >= per && !addr_trusted(gw, addr)) {
		*why_r = "Too many connections from your address.";
		ms_warn("connection from %s refused: %u from that address (the "
			"[listen] max_connections_per_ip)", addr, a->n);
		return -1;
	}
	if (a == NULL) {
		a = calloc(1, sizeof(*a));
		if (a == NULL) {
			*why_r = "Out of memory, try again later.";
			return -1;
		}
		snprintf(a->addr, sizeof(a->addr), "%s", addr);
		a->next = *head;
		*head = a;
	}
	a->n++;
	gw->nconns++;
	return 0;
}

void ms_gw_unadmit(struct ms_gateway *gw, const char *addr)
{
	struct addr_count **pp =
		&gw->per_addr[ms_str_hash(addr) % ADDR_BUCKETS];

	for (; *pp != NULL; pp = &(*pp)->next) {
		struct addr_count *a = *pp;

		if (strcmp(a->addr, addr) != 0)
			continue;
		gw->nconns--;
		if (--a->n == 0) {
			*pp = a->next;
			free(a);
		}
		return;
	}
}

static int addr_trusted(struct ms_gateway *gw, const char *addr)
{
	static struct ms_cidr loopback[2];
	const struct ms_cidr *t = gw->cfg.trusted;
	unsigned int n = gw->cfg.ntrusted;

	if (!gw->cfg.trusted_set) {
		if (loopback[0].family == 0) {
			ms_cidr_parse("127.0.0.0/8", &loopback[0]);
			ms_cidr_parse("::1", &loopback[1]);
		}
		t = loopback;
		n = 2;
	}
	for (unsigned int i = 0; i < n; i++)
		if (ms_cidr_match(&t[i], addr))
			return 1;
	return 0;
}

int ms_gw_plaintext_ok(struct ms_gateway *gw, const char *addr)
{
	return gw->cfg.plaintext_auth || addr_trusted(gw, addr);
}

static int parse_count(const char *key, const char *value, unsigned int max,
		       unsigned int *out, char *err, size_t errsz)
{
	char *end;
	unsigned long v;

	if (*value < '0' || *value > '9' ||
	    (v = strtoul(value, &end, 10), *end != '\0') || v == 0 || v > max) {
		snprintf(err, errsz, "%s: a number from 1 to %u", key, max);
		return -1;
	}
	*out = (unsigned int)v;
	return 0;
}

int ms_gw_listen_key(struct ms_gw_config *cfg, const char *key,
		     const char *value, char *err, size_t errsz)
{
	if (!strcmp(key, "max_connections"))
		return parse_count(key, value, 1000000, &cfg->max_conns, err,
				   errsz);
	if (!strcmp(key, "max_connections_per_ip"))
		return parse_count(key, value, 1000000, &cfg->max_conns_per_ip,
				   err, errsz);
	if (!strcmp(key, "plaintext_auth"))
		return ms_config_bool(&cfg->plaintext_auth, key, value, err,
				      errsz);
	if (!strcmp(key, "trusted_networks")) {
		char buf[2048], *save = NULL;

		if (strlen(value) >= sizeof(buf)) {
			snprintf(err, errsz, "trusted_networks: too long");
			return -1;
		}
		snprintf(buf, sizeof(buf), "%s", value);
		cfg->ntrusted = 0;
		cfg->trusted_set = 1;
		for (char *w = strtok_r(buf, " ,\t", &save); w != NULL;
		     w = strtok_r(NULL, " ,\t", &save)) {
			if (cfg->ntrusted == MS_GW_MAX_TRUSTED) {
				snprintf(err, errsz, "trusted_networks: at "
					 "most %d", MS_GW_MAX_TRUSTED);
				return -1;
			}
			if (ms_cidr_parse(w, &cfg->trusted[cfg->ntrusted]) < 0) {
				snprintf(err, errsz, "trusted_networks: \"%s\" "
					 "is not an address or ADDR/BITS", w);
				return -1;
			}
			cfg->ntrusted++;
		}
		return 0;
	}
	return 1;
}

/* "ADDR:PORT" ("[V6]:PORT") as a JSON string. */
json_t *ms_json_addr(const char *addr, unsigned int port)
{
	char buf[96];

	snprintf(buf, sizeof(buf), strchr(addr, ':') != NULL ? "[%s]:%u" :
		 "%s:%u", addr, port);
	return json_string(buf);
}

json_t *ms_gw_session_json(const struct ms_gw_session_row *r)
{
	json_t *o = json_object();

	json_object_set_new(o, "id", json_integer((json_int_t)r->id));
	json_object_set_new(o, "user", r->user != NULL ?
			    json_string(r->user) : json_null());
	json_object_set_new(o, "proto", json_string(r->proto));
	json_object_set_new(o, "client", json_string(r->client));
	json_object_set_new(o, "local", ms_json_addr(r->local, r->local_port));
	json_object_set_new(o, "server", json_string(r->server));
	json_object_set_new(o, "state", json_string(r->state));
	json_object_set_new(o, "tls", json_boolean(r->tls));
	json_object_set_new(o, "since", json_integer(r->since));
	return o;
}

const struct ms_gw_config *ms_gw_config(struct ms_gateway *gw)
{
	return &gw->cfg;
}

struct ms_tls_server *ms_gw_tls(struct ms_gateway *gw)
{
	return gw->tls;
}

uv_loop_t *ms_gw_loop(struct ms_gateway *gw)
{
	return gw->loop;
}

const char *ms_gw_caps(struct ms_gateway *gw, enum ms_caps_kind kind)
{
	return ms_caps_get(gw->caps, kind);
}

void gw_admit_free(struct ms_gateway *gw)
{
	for (unsigned int i = 0; i < ADDR_BUCKETS; i++)
		while (gw->per_addr[i] != NULL) {
			struct addr_count *a = gw->per_addr[i];

			gw->per_addr[i] = a->next;
			free(a);
		}
}
