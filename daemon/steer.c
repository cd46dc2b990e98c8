/* Steering: the [steer] section (parsed strictly, like every section), the
 * decisions it makes, and the nftables table "inet mailshift" built from
 * them as one nft script. The script is applied with libnftables, which
 * sends it to the kernel as one netlink batch: the table is created,
 * replaced or deleted in one transaction, never half-applied.
 *
 * The table decides each connection once, at its first packet (a SYN for
 * TCP), by setting the connection's conntrack mark to mark|action; every
 * later packet follows that mark (or the conntrack NAT binding), so a
 * changed table never moves an established session. Connections marked
 * for the proxy that find no transparent socket are reset: nft's tproxy
 * lets a packet through when nothing listens, and that packet would reach
 * the old server. */
#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <nftables/libnftables.h>

#include "config.h"
#include "steer.h"

static const char *const action_names[] = {
	[MS_STEER_NONE] = "none", [MS_STEER_PROXY] = "proxy",
	[MS_STEER_SOURCE] = "source", [MS_STEER_DESTINATION] = "destination",
};

const char *ms_steer_action_name(enum ms_steer_action a)
{
	return a <= MS_STEER_DESTINATION ? action_names[a] : "?";
}

int ms_steer_action_parse(const char *s, enum ms_steer_action *a)
{
	for (int i = MS_STEER_PROXY; i <= MS_STEER_DESTINATION; i++) {
		if (!strcmp(s, action_names[i])) {
			*a = i;
			return 0;
		}
	}
	return -1;
}

/* Sets the bits after the first len to zero; returns whether any was set. */
static int mask_host_bits(unsigned char *a, unsigned int bytes,
			  unsigned int len)
{
	int had = 0;

	for (unsigned int i = 0; i < bytes; i++) {
		unsigned int keep = len >= 8 * (i + 1) ? 8 :
				    len > 8 * i ? len - 8 * i : 0;
		unsigned char m = keep == 0 ? 0 : (unsigned char)(0xff << (8 - keep));

		had |= (a[i] & ~m) != 0;
		a[i] &= m;
	}
	return had;
}

int ms_steer_addr_parse(const char *s, int prefix_ok, struct ms_steer_addr *a,
			char *err, size_t errsz)
{
	char buf[64], *slash;
	unsigned int max;

	memset(a, 0, sizeof(*a));
	if (strlen(s) >= sizeof(buf))
		goto bad;
	snprintf(buf, sizeof(buf), "%s", s);
	slash = strchr(buf, '/');
	if (slash != NULL)
		*slash++ = '\0';
	if (inet_pton(AF_INET, buf, a->a) == 1)
		a->family = AF_INET;
	else if (inet_pton(AF_INET6, buf, a->a) == 1)
		a->family = AF_INET6;
	else
		goto bad;
	max = a->family == AF_INET ? 32 : 128;
	a->len = max;
	if (slash != NULL) {
		if (!prefix_ok) {
			snprintf(err, errsz, "\"%.64s\": an address, not a "
				 "prefix", s);
			return -1;
		}
		if (ms_parse_uint(slash, 0, max, &a->len) < 0)
			goto bad;
		if (mask_host_bits(a->a, max / 8, a->len)) {
			snprintf(err, errsz, "\"%.64s\": bits set after the "
				 "prefix length", s);
			return -1;
		}
	}
	inet_ntop(a->family, a->a, buf, sizeof(buf));
	if (a->len == max)
		snprintf(a->text, sizeof(a->text), "%s", buf);
	else
		snprintf(a->text, sizeof(a->text), "%s/%u", buf, a->len);
	return 0;
bad:
	snprintf(err, errsz, "\"%.64s\" is not an IPv4 or IPv6 %s", s,
		 prefix_ok ? "address or prefix" : "address");
	return -1;
}

static int addr_eq(const struct ms_steer_addr *x, const struct ms_steer_addr *y)
{
	return x->family == y->family && x->len == y->len &&
	       memcmp(x->a, y->a, 16) == 0;
}

void ms_steer_defaults(struct ms_steer_cfg *s)
{
	memset(s, 0, sizeof(*s));
	s->action = MS_STEER_PROXY;
	s->other = MS_STEER_SOURCE;
	s->mark = 0x4d530000;		/* "MS" */
}

/* The next white-space separated word of *p into w: 1, 0 at the end, -1
 * when it does not fit (never cut short: "0000000000143" is not "00000"). */
static int word(const char **p, char *w, size_t wsz)
{
	size_t n = 0;

	while (isspace((unsigned char)**p))
		(*p)++;
	while (**p != '\0' && !isspace((unsigned char)**p)) {
		if (n + 1 == wsz)
			return -1;
		w[n++] = *(*p)++;
	}
	w[n] = '\0';
	return n > 0;
}

int ms_steer_entry_parse(const char *s, struct ms_steer_entry *e, char *err,
			 size_t errsz)
{
	char w[4][80], extra[8];
	const char *p = s;
	int n = 0, r = 0;

	memset(e, 0, sizeof(*e));
	while (n < 4 && (r = word(&p, w[n], sizeof(w[0]))) > 0)
		n++;
	if (r < 0 || n < 3 || word(&p, extra, sizeof(extra)) != 0) {
		snprintf(err, errsz, "\"%.100s\": want ADDRESS PORT [PREFIX] "
			 "ACTION", s);
		return -1;
	}
	if (ms_steer_addr_parse(w[0], 0, &e->addr, err, errsz) < 0)
		return -1;
	if (strcmp(w[1], "other") != 0 &&
	    ms_parse_uint(w[1], 1, 65535, &e->port) < 0) {
		snprintf(err, errsz, "\"%.20s\": a port is 1 to 65535 or "
			 "\"other\"", w[1]);
		return -1;
	}
	if (n == 4 && (ms_steer_addr_parse(w[2], 1, &e->prefix, err,
					   errsz) < 0))
		return -1;
	if (n == 4 && e->prefix.family != e->addr.family) {
		snprintf(err, errsz, "%s: client prefix %s is not of the "
			 "address's family", e->addr.text, e->prefix.text);
		return -1;
	}
	if (ms_steer_action_parse(w[n - 1], &e->action) < 0) {
		snprintf(err, errsz, "\"%.20s\": action proxy, source or "
			 "destination", w[n - 1]);
		return -1;
	}
	return 0;
}

void ms_steer_entry_text(const struct ms_steer_entry *e, char *buf, size_t sz)
{
	char port[8];

	snprintf(port, sizeof(port), "%u", e->port);
	snprintf(buf, sz, "%s %s%s%s %s", e->addr.text,
		 e->port == MS_STEER_OTHER ? "other" : port,
		 e->prefix.family ? " " : "", e->prefix.text,
		 ms_steer_action_name(e->action));
}

/* The counter of an entry's decisions: its address, port and prefix,
 * not its action (a changed action keeps counting on). */
void ms_steer_counter_name(const struct ms_steer_entry *e, char *buf,
			   size_t sz)
{
	size_t n;

	snprintf(buf, sz, "e%c_%s_%u%s%s", e->addr.family == AF_INET ? '4' :
		 '6', e->addr.text, e->port, e->prefix.family ? "_" : "",
		 e->prefix.text);
	for (n = 0; buf[n] != '\0'; n++)
		if (!isalnum((unsigned char)buf[n]))
			buf[n] = '_';
}

static int parse_mark(const char *v, uint32_t *m)
{
	char *end;
	unsigned long long x;

	if (!isdigit((unsigned char)*v))
		return -1;
	x = strtoull(v, &end, 0);
	if (*end != '\0' || x == 0 || x > 0xffffffffULL || (x & 0xff) != 0)
		return -1;
	*m = (uint32_t)x;
	return 0;
}

static int set_auto(uint32_t *dst, const char *key, const char *v,
		    unsigned int min, unsigned int max, char *err, size_t errsz)
{
	unsigned int x;

	if (!strcmp(v, "auto")) {
		*dst = 0;
		return 0;
	}
	if (ms_parse_uint(v, min, max, &x) < 0) {
		snprintf(err, errsz, "%s: \"auto\" or a whole number from %u "
			 "to %u", key, min, max);
		return -1;
	}
	*dst = x;
	return 0;
}

static int server_addr(struct ms_steer_addr *pair, const char *key,
		       const char *v, char *err, size_t errsz)
{
	struct ms_steer_addr a;

	if (ms_steer_addr_parse(v, 0, &a, err, errsz) < 0)
		return -1;
	if (pair[a.family == AF_INET6].family != 0) {
		snprintf(err, errsz, "%s: one %s address only", key,
			 a.family == AF_INET ? "IPv4" : "IPv6");
		return -1;
	}
	pair[a.family == AF_INET6] = a;
	return 0;
}

static int port_key(struct ms_steer_cfg *s, const char *v, char *err,
		    size_t errsz)
{
	char w[3][16];
	const char *p = v;
	unsigned int port, listener = 0;
	int n = 0, r = 0;

	while (n < 3 && (r = word(&p, w[n], sizeof(w[0]))) > 0)
		n++;
	if (r < 0 || n < 1 || n > 2 || ms_parse_uint(w[0], 1, 65535, &port) < 0 ||
	    (n == 2 && ms_parse_uint(w[1], 1, 65535, &listener) < 0)) {
		snprintf(err, errsz, "port: \"%.40s\": want MAIL-PORT "
			 "[LISTENER-PORT] (1 to 65535)", v);
		return -1;
	}
	for (unsigned int i = 0; i < s->nports; i++) {
		if (s->ports[i].port == port) {
			snprintf(err, errsz, "port %u given twice", port);
			return -1;
		}
	}
	if (s->nports == MS_STEER_MAX_PORTS) {
		snprintf(err, errsz, "too many ports (at most %d)",
			 MS_STEER_MAX_PORTS);
		return -1;
	}
	s->ports[s->nports].port = port;
	s->ports[s->nports++].listener = listener;
	return 0;
}

static int addr_key(struct ms_steer_cfg *s, const char *v, char *err,
		    size_t errsz)
{
	struct ms_steer_addr a;

	if (ms_steer_addr_parse(v, 0, &a, err, errsz) < 0)
		return -1;
	for (unsigned int i = 0; i < s->naddrs; i++) {
		if (addr_eq(&s->addrs[i], &a)) {
			snprintf(err, errsz, "address %s given twice", a.text);
			return -1;
		}
	}
	if (s->naddrs == MS_STEER_MAX_ADDRS) {
		snprintf(err, errsz, "too many addresses (at most %d)",
			 MS_STEER_MAX_ADDRS);
		return -1;
	}
	s->addrs[s->naddrs++] = a;
	return 0;
}

int ms_steer_key(struct ms_steer_cfg *s, const char *key, const char *v,
		 char *err, size_t errsz)
{
	s->present = 1;
	if (!strcmp(key, "address"))
		return addr_key(s, v, err, errsz);
	if (!strcmp(key, "port"))
		return port_key(s, v, err, errsz);
	if (!strcmp(key, "source") || !strcmp(key, "destination"))
		return server_addr(key[0] == 's' ? s->src : s->dst, key, v,
				   err, errsz);
	if (!strcmp(key, "action") || !strcmp(key, "other_ports")) {
		enum ms_steer_action *a = key[0] == 'a' ? &s->action : &s->other;

		if (ms_steer_action_parse(v, a) < 0 ||
		    (a == &s->other && *a == MS_STEER_PROXY)) {
			snprintf(err, errsz, "%s: %s", key, a == &s->other ?
				 "source or destination" :
				 "proxy, source or destination");
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "entry")) {
		if (s->nentries == MS_STEER_MAX_ENTRIES) {
			snprintf(err, errsz, "too many entries (at most %d)",
				 MS_STEER_MAX_ENTRIES);
			return -1;
		}
		return ms_steer_entry_parse(v, &s->entries[s->nentries++], err,
					    errsz);
	}
	if (!strcmp(key, "mark")) {
		if (parse_mark(v, &s->mark) < 0) {
			snprintf(err, errsz, "mark: a 32-bit number whose low "
				 "8 bits are zero, e.g. 0x4d530000");
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "route_table"))
		/* 253-255 are the kernel's default, main and local tables. */
		return set_auto(&s->table, key, v, 1, 252, err, errsz);
	if (!strcmp(key, "rule_priority"))
		/* Before the main table's rule (32766). */
		return set_auto(&s->priority, key, v, 1, 32765, err, errsz);
	if (!strcmp(key, "backend")) {
		if (strcmp(v, "nft") != 0 && strcmp(v, "kmod") != 0) {
			snprintf(err, errsz, "backend: nft or kmod");
			return -1;
		}
		s->backend = v[0] == 'k' ? MS_STEER_BACKEND_KMOD :
			     MS_STEER_BACKEND_NFT;
		return 0;
	}
	if (!strcmp(key, "manage"))
		return ms_config_bool(&s->manage, key, v, err, errsz);
	snprintf(err, errsz, "unknown key \"%s\" in [steer]", key);
	return -1;
}

void ms_steer_entries_retired(struct ms_steer_entry *e, unsigned int n)
{
	for (unsigned int i = 0; i < n; i++)
		if (e[i].port != MS_STEER_OTHER)
			e[i].action = MS_STEER_DESTINATION;
}

void ms_steer_cfg_retired(struct ms_steer_cfg *s)
{
	s->action = MS_STEER_DESTINATION;
	ms_steer_entries_retired(s->entries, s->nentries);
}

unsigned int ms_steer_families(const struct ms_steer_cfg *s)
{
	unsigned int f = 0;

	for (unsigned int i = 0; i < s->naddrs; i++)
		f |= s->addrs[i].family == AF_INET ? 1 : 2;
	return f;
}

static int is_addr(const struct ms_steer_cfg *s, const struct ms_steer_addr *a)
{
	for (unsigned int i = 0; i < s->naddrs; i++)
		if (addr_eq(&s->addrs[i], a))
			return 1;
	return 0;
}

static int port_index(const struct ms_steer_cfg *s, unsigned int port)
{
	for (unsigned int i = 0; i < s->nports; i++)
		if (s->ports[i].port == port)
			return (int)i;
	return -1;
}

/* Whether action can be taken for an entry of address family af, port. */
static int action_ok(const struct ms_steer_cfg *s,
		     const struct ms_steer_entry *e, char *err, size_t errsz)
{
	int v6 = e->addr.family == AF_INET6;
	char t[200];

	ms_steer_entry_text(e, t, sizeof(t));
	if (e->action == MS_STEER_PROXY && e->port == MS_STEER_OTHER) {
		snprintf(err, errsz, "%s: only mail ports go to the proxy", t);
		return -1;
	}
	if (e->action == MS_STEER_PROXY &&
	    s->ports[port_index(s, e->port)].listener == 0) {
		snprintf(err, errsz, "%s: port %u has no listener port (port "
			 "= %u LISTENER-PORT)", t, e->port, e->port);
		return -1;
	}
	if (e->action == MS_STEER_DESTINATION && s->dst[v6].family == 0) {
		snprintf(err, errsz, "%s: no %s destination address ([steer] "
			 "destination)", t, v6 ? "IPv6" : "IPv4");
		return -1;
	}
	return 0;
}

int ms_steer_entries_check(const struct ms_steer_cfg *s,
			   const struct ms_steer_entry *e, unsigned int n,
			   char *err, size_t errsz)
{
	char t[200], u[200];

	for (unsigned int i = 0; i < n; i++) {
		ms_steer_entry_text(&e[i], t, sizeof(t));
		if (!is_addr(s, &e[i].addr)) {
			snprintf(err, errsz, "%s: %s is not a service address "
				 "([steer] address)", t, e[i].addr.text);
			return -1;
		}
		if (e[i].port != MS_STEER_OTHER && port_index(s, e[i].port) < 0) {
			snprintf(err, errsz, "%s: %u is not a mail port "
				 "([steer] port)", t, e[i].port);
			return -1;
		}
		if (action_ok(s, &e[i], err, errsz) < 0)
			return -1;
		for (unsigned int j = 0; j < i; j++) {
			if (!addr_eq(&e[i].addr, &e[j].addr) ||
			    e[i].port != e[j].port ||
			    e[i].prefix.family != e[j].prefix.family ||
			    (e[i].prefix.family && !addr_eq(&e[i].prefix,
							    &e[j].prefix)))
				continue;
			ms_steer_entry_text(&e[j], u, sizeof(u));
			snprintf(err, errsz, "\"%s\" %s \"%s\"", t,
				 e[i].action == e[j].action ? "repeats" :
				 "contradicts", u);
			return -1;
		}
	}
	return 0;
}

int ms_steer_check(const struct ms_steer_cfg *s, char *err, size_t errsz)
{
	struct ms_steer_entry *e;
	unsigned int n;
	int ret = 0;

	if (!s->present)
		return 0;
	if (s->naddrs == 0) {
		snprintf(err, errsz, "[steer] names no address (address = "
			 "the mail service's address)");
		return -1;
	}
	if (s->nports == 0) {
		snprintf(err, errsz, "[steer] names no mail port (port = "
			 "143 10143, ...)");
		return -1;
	}
	if (ms_steer_entries_check(s, s->entries, s->nentries, err,
				   errsz) < 0)
		return -1;
	/* Every decision the defaults leave must be possible too. */
	e = calloc(MS_STEER_MAX_EXPANDED, sizeof(*e));
	if (e == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	n = ms_steer_expand(s, e);
	for (unsigned int i = 0; i < n && ret == 0; i++)
		ret = action_ok(s, &e[i], err, errsz);
	free(e);
	return ret;
}

/* Index of the given entry for e's address, port and prefix, or -1. */
static int given(const struct ms_steer_cfg *s, const struct ms_steer_entry *e)
{
	for (unsigned int i = 0; i < s->nentries; i++) {
		const struct ms_steer_entry *g = &s->entries[i];

		if (addr_eq(&g->addr, &e->addr) && g->port == e->port &&
		    g->prefix.family == e->prefix.family &&
		    (!g->prefix.family || addr_eq(&g->prefix, &e->prefix)))
			return (int)i;
	}
	return -1;
}

unsigned int ms_steer_expand(const struct ms_steer_cfg *s,
			     struct ms_steer_entry *out)
{
	unsigned int n = 0;

	for (unsigned int i = 0; i < s->naddrs; i++) {
		for (unsigned int j = 0; j <= s->nports; j++) {
			struct ms_steer_entry e = { .addr = s->addrs[i] };
			int g;

			e.port = j < s->nports ? s->ports[j].port :
				 MS_STEER_OTHER;
			e.action = j < s->nports ? s->action : s->other;
			if ((g = given(s, &e)) >= 0)
				e.action = s->entries[g].action;
			out[n++] = e;
		}
	}
	for (unsigned int i = 0; i < s->nentries; i++)
		if (s->entries[i].prefix.family)
			out[n++] = s->entries[i];
	return n;
}

/* ------------------------------------------------------------ the ruleset */

static const char *fam(const struct ms_steer_addr *a)
{
	return a->family == AF_INET ? "ip" : "ip6";
}

static void ports_set(FILE *f, const struct ms_steer_cfg *s)
{
	fputs("{ ", f);
	for (unsigned int i = 0; i < s->nports; i++)
		fprintf(f, "%s%u", i ? ", " : "", s->ports[i].port);
	fputs(" }", f);
}

static void counter_decl(FILE *f, const char *name, json_t *counters)
{
	json_t *c = json_object_get(counters, name);

	fprintf(f, "\tcounter %s { packets %" JSON_INTEGER_FORMAT " bytes %"
		JSON_INTEGER_FORMAT " }\n", name,
		json_integer_value(json_object_get(c, "packets")),
		json_integer_value(json_object_get(c, "bytes")));
}

static void decide_rule(FILE *f, const struct ms_steer_cfg *s,
			const struct ms_steer_entry *e)
{
	char name[128], text[200];

	ms_steer_counter_name(e, name, sizeof(name));
	ms_steer_entry_text(e, text, sizeof(text));
	fprintf(f, "\t\t%s daddr %s ", fam(&e->addr), e->addr.text);
	if (e->prefix.family)
		fprintf(f, "%s saddr %s ", fam(&e->prefix), e->prefix.text);
	if (e->port == MS_STEER_OTHER) {
		fputs("meta l4proto { tcp, udp } th dport != ", f);
		ports_set(f, s);
	} else {
		/* A SYN: a connection's first packet, not one conntrack
		 * picked up in the middle. */
		fprintf(f, "tcp dport %u tcp flags & (fin | syn | rst | ack) "
			"== syn", e->port);
	}
	fprintf(f, " counter name \"%s\" ct mark set 0x%08x return comment "
		"\"%s\"\n", name, s->mark | e->action, text);
}

/* Prefix entries first, longest prefix first: the most specific wins. */
static int by_prefix(const void *a, const void *b)
{
	const struct ms_steer_entry *x = a, *y = b;
	int lx = x->prefix.family ? (int)x->prefix.len : -1;
	int ly = y->prefix.family ? (int)y->prefix.len : -1;

	return ly - lx;
}

static void nat_rules(FILE *f, const struct ms_steer_cfg *s)
{
	for (int v6 = 0; v6 < 2; v6++) {
		const char *nf = v6 ? "ipv6" : "ipv4", *ip = v6 ? "ip6" : "ip";

		if (s->dst[v6].family)
			fprintf(f, "\t\tct mark 0x%08x meta nfproto %s dnat %s "
				"to %s\n", s->mark | MS_STEER_DESTINATION, nf,
				ip, s->dst[v6].text);
		if (s->src[v6].family)
			fprintf(f, "\t\tct mark 0x%08x meta nfproto %s %s "
				"daddr != %s dnat %s to %s\n",
				s->mark | MS_STEER_SOURCE, nf, ip,
				s->src[v6].text, ip, s->src[v6].text);
	}
}

/* Proxied connections to mailshiftd's listener for their port, in the
 * families of the service addresses. */
static void tproxy_rules(FILE *f, const struct ms_steer_cfg *s,
			 const struct ms_steer_route *rt)
{
	unsigned int fams = ms_steer_families(s);

	for (unsigned int i = 0; i < s->nports; i++) {
		for (int v6 = 0; v6 < 2; v6++) {
			if (s->ports[i].listener == 0 || !(fams & (1u << v6)))
				continue;
			fprintf(f, "\t\tct mark 0x%08x meta nfproto %s tcp "
				"dport %u tproxy %s to :%u meta mark set "
				"0x%08x accept\n", s->mark | MS_STEER_PROXY,
				v6 ? "ipv6" : "ipv4", s->ports[i].port,
				v6 ? "ip6" : "ip", s->ports[i].listener,
				rt->mark);
		}
	}
}

char *ms_steer_ruleset(const struct ms_steer_cfg *s,
		       const struct ms_steer_entry *e, unsigned int n,
		       const struct ms_steer_route *rt, json_t *counters)
{
	struct ms_steer_entry *sorted = malloc(sizeof(*e) * (n ? n : 1));
	uint32_t proxy = s->mark | MS_STEER_PROXY;
	char *text = NULL, name[128];
	size_t len = 0;
	FILE *f;

	if (sorted == NULL || (f = open_memstream(&text, &len)) == NULL) {
		free(sorted);
		return NULL;
	}
	memcpy(sorted, e, sizeof(*e) * n);
	qsort(sorted, n, sizeof(*e), by_prefix);
	/* Creating the table first makes the delete valid when there is
	 * none: the three lines are one transaction. */
	fprintf(f, "table inet %s\ndelete table inet %s\n"
		"table inet %s {\n", MS_STEER_TABLE, MS_STEER_TABLE,
		MS_STEER_TABLE);
	for (unsigned int i = 0; i < n; i++) {
		ms_steer_counter_name(&sorted[i], name, sizeof(name));
		counter_decl(f, name, counters);
	}
	counter_decl(f, "rejected", counters);
	/* A connection's first packet (a SYN) never takes the socket
	 * shortcut: it goes through the decision and tproxy. A socket the
	 * gateway closed first lingers in TIME_WAIT; a client that comes back
	 * on the same source port would otherwise reach it, get the old
	 * connection's ACK, reset it and send its SYN again (tproxy hands
	 * such a SYN to the listener). */
	fprintf(f, "\n\tchain divert {\n"
		"\t\ttype filter hook prerouting priority mangle; "
		"policy accept;\n"
		"\t\ttcp flags & (fin | syn | rst | ack) != syn "
		"socket transparent 1 meta mark set "
		"0x%08x accept comment \"mailshift steer mark 0x%08x table %u "
		"priority %u\"\n\t\tct state new jump decide\n", rt->mark,
		rt->mark, rt->table, rt->priority);
	tproxy_rules(f, s, rt);
	fprintf(f, "\t\tct mark 0x%08x counter name \"rejected\" reject with "
		"tcp reset comment \"fail closed: mailshiftd is not "
		"listening\"\n\t}\n\n\tchain decide {\n", proxy);
	for (unsigned int i = 0; i < n; i++)
		decide_rule(f, s, &sorted[i]);
	fprintf(f, "\t}\n\n\tchain nat {\n\t\ttype nat hook prerouting "
		"priority dstnat; policy accept;\n");
	nat_rules(f, s);
	fprintf(f, "\t}\n}\n");
	free(sorted);
	if (fclose(f) != 0) {
		free(text);
		return NULL;
	}
	return text;
}

/* ------------------------------------------------------------ the kernel */

static struct nft_ctx *nft_new(int json)
{
	struct nft_ctx *nft = nft_ctx_new(NFT_CTX_DEFAULT);

	if (nft == NULL)
		return NULL;
	if (json)
		nft_ctx_output_set_flags(nft, NFT_CTX_OUTPUT_JSON);
	if (nft_ctx_buffer_output(nft) < 0 || nft_ctx_buffer_error(nft) < 0) {
		nft_ctx_free(nft);
		return NULL;
	}
	return nft;
}

/* nft's error text on one line, without its "Error: " prefixes. */
static void nft_error(struct nft_ctx *nft, const char *what, char *err,
		      size_t errsz)
{
	const char *e = nft_ctx_get_error_buffer(nft);
	size_t n;

	snprintf(err, errsz, "%s: %s", what, e != NULL && *e ? e :
		 "failed");
	for (n = strlen(err); n > 0 && isspace((unsigned char)err[n - 1]);)
		err[--n] = '\0';
	for (char *p = err; *p; p++)
		if (*p == '\n')
			*p = ' ';
}

int ms_steer_nft_run(const char *script, int check_only, char *err,
		     size_t errsz)
{
	struct nft_ctx *nft = nft_new(0);
	int ret = 0;

	if (nft == NULL) {
		snprintf(err, errsz, "libnftables: out of memory");
		return -1;
	}
	nft_ctx_set_dry_run(nft, check_only);
	if (nft_run_cmd_from_buffer(nft, script) != 0) {
		nft_error(nft, check_only ? "nftables refuses the ruleset" :
			  "nftables", err, errsz);
		ret = -1;
	}
	nft_ctx_free(nft);
	return ret;
}

/* Whether a "dport" match's right side covers port: a number, a set of
 * numbers and ranges, or a range. */
static int covers(json_t *right, unsigned int port)
{
	json_t *v, *set = json_object_get(right, "set"),
		      *range = json_object_get(right, "range");
	size_t i;

	if (json_is_integer(right))
		return json_integer_value(right) == (json_int_t)port;
	if (json_is_array(range))
		return json_integer_value(json_array_get(range, 0)) <=
		       (json_int_t)port &&
		       json_integer_value(json_array_get(range, 1)) >=
		       (json_int_t)port;
	json_array_foreach(set, i, v)
		if (covers(v, port))
			return 1;
	return 0;
}

/* Looks through a rule's expressions for what it does (tproxy, dnat,
 * redirect, queue) and which destination ports it matches. */
static void scan_expr(json_t *x, int *diverts, int *dport_seen,
		      int *port_hit, const struct ms_steer_cfg *s)
{
	const char *k;
	json_t *v;
	size_t i;

	if (json_is_array(x)) {
		json_array_foreach(x, i, v)
			scan_expr(v, diverts, dport_seen, port_hit, s);
		return;
	}
	if (!json_is_object(x))
		return;
	json_object_foreach(x, k, v) {
		if (!strcmp(k, "tproxy") || !strcmp(k, "dnat") ||
		    !strcmp(k, "redirect") || !strcmp(k, "queue"))
			*diverts = 1;
		if (!strcmp(k, "match")) {
			json_t *l = json_object_get(v, "left");
			json_t *p = json_object_get(json_object_get(l,
						"payload"), "field");

			if (json_is_string(p) &&
			    !strcmp(json_string_value(p), "dport")) {
				*dport_seen = 1;
				for (unsigned int j = 0; j < s->nports; j++)
					*port_hit |= covers(json_object_get(v,
						"right"), s->ports[j].port);
			}
		}
		scan_expr(v, diverts, dport_seen, port_hit, s);
	}
}

/* A rule of another table that diverts connections to one of our
 * addresses on one of our ports (or on every port). */
static int conflicts(const struct ms_steer_cfg *s, json_t *rule)
{
	int diverts = 0, dport_seen = 0, port_hit = 0, addr_hit = 0;
	char *text = json_dumps(json_object_get(rule, "expr"), JSON_COMPACT);

	for (unsigned int i = 0; text != NULL && i < s->naddrs; i++) {
		char quoted[72];

		snprintf(quoted, sizeof(quoted), "\"%s\"", s->addrs[i].text);
		addr_hit |= strstr(text, quoted) != NULL;
	}
	free(text);
	if (!addr_hit)
		return 0;
	scan_expr(json_object_get(rule, "expr"), &diverts, &dport_seen,
		  &port_hit, s);
	return diverts && (port_hit || !dport_seen);
}

static void read_route(json_t *state, const char *comment)
{
	unsigned int mark, table, prio;

	if (sscanf(comment, "mailshift steer mark %x table %u priority %u",
		   &mark, &table, &prio) == 3)
		json_object_set_new(state, "route", json_pack("{s:I,s:I,s:I}",
				    "mark", (json_int_t)mark, "table",
				    (json_int_t)table, "priority",
				    (json_int_t)prio));
}

static void read_item(const struct ms_steer_cfg *s, json_t *state,
		      json_t *item)
{
	json_t *r = json_object_get(item, "rule"),
	       *c = json_object_get(item, "counter");
	const char *table = json_string_value(json_object_get(r ? r : c,
							      "table"));
	const char *family = json_string_value(json_object_get(r ? r : c,
							       "family"));
	int ours = table != NULL && family != NULL &&
		   !strcmp(table, MS_STEER_TABLE) && !strcmp(family, "inet");
	const char *comment = json_string_value(json_object_get(r, "comment"));
	const char *chain = json_string_value(json_object_get(r, "chain"));

	if (c != NULL && ours) {
		json_object_set_new(json_object_get(state, "counters"),
			json_string_value(json_object_get(c, "name")),
			json_pack("{s:O,s:O}", "packets",
				  json_object_get(c, "packets"), "bytes",
				  json_object_get(c, "bytes")));
	} else if (r != NULL && ours && comment != NULL && chain != NULL) {
		if (!strcmp(chain, "divert"))
			read_route(state, comment);
		else if (!strcmp(chain, "decide"))
			json_array_append_new(json_object_get(state,
					      "entries"), json_string(comment));
	} else if (r != NULL && !ours && conflicts(s, r)) {
		json_array_append_new(json_object_get(state, "conflicts"),
			json_pack("{s:s,s:s,s:I}", "table", table ? table : "",
				  "family", family ? family : "", "handle",
				  json_integer_value(json_object_get(r,
								"handle"))));
	}
}

int ms_steer_conflict(json_t *state, char *err, size_t errsz)
{
	json_t *c = json_array_get(json_object_get(state, "conflicts"), 0);

	if (c == NULL)
		return 0;
	snprintf(err, errsz, "table %s %s (rule handle %" JSON_INTEGER_FORMAT
		 ") already diverts a [steer] address and port; remove it "
		 "first (nothing was changed)",
		 json_string_value(json_object_get(c, "family")),
		 json_string_value(json_object_get(c, "table")),
		 json_integer_value(json_object_get(c, "handle")));
	return -1;
}

int ms_steer_nft_read(const struct ms_steer_cfg *s, json_t **state,
		      char *err, size_t errsz)
{
	struct nft_ctx *nft;
	json_t *all, *items, *item, *t;
	json_error_t jerr;
	size_t i;

	*state = NULL;
	nft = nft_new(1);
	if (nft == NULL) {
		snprintf(err, errsz, "libnftables: out of memory");
		return -1;
	}
	if (nft_run_cmd_from_buffer(nft, "list ruleset") != 0) {
		nft_error(nft, "nftables: cannot list the ruleset", err, errsz);
		nft_ctx_free(nft);
		return -1;
	}
	all = json_loads(nft_ctx_get_output_buffer(nft), 0, &jerr);
	nft_ctx_free(nft);
	items = json_object_get(all, "nftables");
	if (!json_is_array(items)) {
		snprintf(err, errsz, "nftables: unreadable JSON listing: %s",
			 jerr.text);
		json_decref(all);
		return -1;
	}
	*state = json_pack("{s:b,s:[],s:{},s:[]}", "installed", 0, "entries",
			   "counters", "conflicts");
	json_array_foreach(items, i, item) {
		t = json_object_get(item, "table");
		if (t != NULL && !strcmp(json_string_value(json_object_get(t,
					"name")) ?: "", MS_STEER_TABLE) &&
		    !strcmp(json_string_value(json_object_get(t, "family")) ?:
			    "", "inet"))
			json_object_set_new(*state, "installed", json_true());
		read_item(s, *state, item);
	}
	json_decref(all);
	return 0;
}
