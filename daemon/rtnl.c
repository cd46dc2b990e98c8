/* The policy routing TPROXY needs, with libnl-route-3 (no `ip`
 * subprocess): a diverted packet carries mailshift's mark, the rule
 * "fwmark MARK lookup TABLE" sends it to TABLE, whose only route "local
 * default dev lo" delivers it to the local transparent socket although
 * the host does not own its destination address. Rules and routes are
 * tagged with routing protocol MS_RTNL_PROTO so that mailshift removes
 * only its own and never takes a table, priority or mark the host uses. */
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/fib_rules.h>
#include <linux/rtnetlink.h>
#include <netlink/netlink.h>
#include <netlink/route/route.h>
#include <netlink/route/rule.h>

#include "rtnl.h"

struct host {
	struct nl_sock *sk;
	struct nl_cache *rules, *routes;
};

static void host_free(struct host *h)
{
	if (h->rules != NULL)
		nl_cache_free(h->rules);
	if (h->routes != NULL)
		nl_cache_free(h->routes);
	if (h->sk != NULL)
		nl_socket_free(h->sk);
	memset(h, 0, sizeof(*h));
}

static int host_load(struct host *h, char *err, size_t errsz)
{
	int e;

	memset(h, 0, sizeof(*h));
	if ((h->sk = nl_socket_alloc()) == NULL) {
		snprintf(err, errsz, "rtnetlink: out of memory");
		return -1;
	}
	if ((e = nl_connect(h->sk, NETLINK_ROUTE)) < 0 ||
	    (e = rtnl_rule_alloc_cache(h->sk, AF_UNSPEC, &h->rules)) < 0 ||
	    (e = rtnl_route_alloc_cache(h->sk, AF_UNSPEC, 0, &h->routes)) < 0) {
		snprintf(err, errsz, "rtnetlink: cannot read the routing "
			 "rules and routes: %s", nl_geterror(e));
		host_free(h);
		return -1;
	}
	return 0;
}

static int rule_ours(struct rtnl_rule *r)
{
	uint8_t p = 0;

	return rtnl_rule_get_protocol(r, &p) == 0 && p == MS_RTNL_PROTO;
}

static int route_ours(struct rtnl_route *r)
{
	return rtnl_route_get_protocol(r) == MS_RTNL_PROTO;
}

#define each_rule(h, r) \
	for (struct rtnl_rule *r = (void *)nl_cache_get_first((h)->rules); \
	     r != NULL; r = (void *)nl_cache_get_next((void *)r))
#define each_route(h, r) \
	for (struct rtnl_route *r = (void *)nl_cache_get_first((h)->routes); \
	     r != NULL; r = (void *)nl_cache_get_next((void *)r))

static int table_used(struct host *h, uint32_t t)
{
	each_rule(h, r)
		if (!rule_ours(r) && rtnl_rule_get_table(r) == t)
			return 1;
	each_route(h, r)
		if (!route_ours(r) && rtnl_route_get_table(r) == t)
			return 1;
	return 0;
}

static int prio_used(struct host *h, uint32_t p)
{
	each_rule(h, r)
		if (!rule_ours(r) && rtnl_rule_get_prio(r) == p)
			return 1;
	return 0;
}

/* The local routes go through lo, which the kernel wants up (for IPv6;
 * libnl would only say "Unspecific failure"). */
static int lo_up(char *err, size_t errsz)
{
	struct ifreq ifr = { .ifr_name = "lo" };
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), up;

	up = fd >= 0 && ioctl(fd, SIOCGIFFLAGS, &ifr) == 0 &&
	     (ifr.ifr_flags & IFF_UP);
	if (fd >= 0)
		close(fd);
	if (!up)
		snprintf(err, errsz, "the loopback interface (lo) is not up; "
			 "the local routes need it");
	return up ? 0 : -1;
}

int ms_rtnl_plan(const struct ms_steer_cfg *s, struct ms_steer_route *rt,
		 char *err, size_t errsz)
{
	struct ms_steer_route had = { 0 };
	struct host h;

	if (lo_up(err, errsz) < 0 || host_load(&h, err, errsz) < 0)
		return -1;
	each_rule(&h, r) {
		if (rule_ours(r) && had.table == 0) {
			had.table = rtnl_rule_get_table(r);
			had.priority = rtnl_rule_get_prio(r);
		}
		if (!rule_ours(r) && rtnl_rule_get_mark(r) == s->mark) {
			snprintf(err, errsz, "mark 0x%08x is used by a routing "
				 "rule of the host (priority %u); choose "
				 "another ([steer] mark)", s->mark,
				 rtnl_rule_get_prio(r));
			goto fail;
		}
	}
	rt->mark = s->mark;
	rt->families = ms_steer_families(s);
	rt->table = s->table ? s->table : had.table;
	rt->priority = s->priority ? s->priority : had.priority;
	if (rt->table != 0 && table_used(&h, rt->table)) {
		snprintf(err, errsz, "routing table %u is used by the host; "
			 "choose another ([steer] route_table)", rt->table);
		goto fail;
	}
	if (rt->priority != 0 && prio_used(&h, rt->priority)) {
		snprintf(err, errsz, "rule priority %u is used by the host; "
			 "choose another ([steer] rule_priority)",
			 rt->priority);
		goto fail;
	}
	for (uint32_t t = MS_RTNL_AUTO_TABLE; rt->table == 0 && t < 253; t++)
		if (!table_used(&h, t))
			rt->table = t;
	for (uint32_t p = MS_RTNL_AUTO_PRIO; rt->priority == 0 && p < 32766;
	     p++)
		if (!prio_used(&h, p))
			rt->priority = p;
	if (rt->table == 0 || rt->priority == 0) {
		snprintf(err, errsz, "no free routing table or rule priority "
			 "found; set [steer] route_table and rule_priority");
		goto fail;
	}
	host_free(&h);
	return 0;
fail:
	host_free(&h);
	return -1;
}

static int rule_in(struct rtnl_rule *r, const struct ms_steer_route *rt);
static int route_in(struct rtnl_route *r, const struct ms_steer_route *rt);

static int have_rule(struct host *h, int family,
		     const struct ms_steer_route *rt)
{
	each_rule(h, r)
		if (rule_ours(r) && rtnl_rule_get_family(r) == family &&
		    rule_in(r, rt))
			return 1;
	return 0;
}

static int have_route(struct host *h, int family,
		      const struct ms_steer_route *rt)
{
	each_route(h, r)
		if (route_ours(r) && rtnl_route_get_family(r) == family &&
		    route_in(r, rt))
			return 1;
	return 0;
}

static struct rtnl_rule *make_rule(int family, const struct ms_steer_route *rt)
{
	struct rtnl_rule *r = rtnl_rule_alloc();

	if (r == NULL)
		return NULL;
	rtnl_rule_set_family(r, family);
	rtnl_rule_set_prio(r, rt->priority);
	rtnl_rule_set_mark(r, rt->mark);
	rtnl_rule_set_mask(r, 0xffffffff);
	rtnl_rule_set_table(r, rt->table);
	rtnl_rule_set_action(r, FR_ACT_TO_TBL);
	rtnl_rule_set_protocol(r, MS_RTNL_PROTO);
	return r;
}

/* "local default dev lo table T proto 77". */
static struct rtnl_route *make_route(int family,
				     const struct ms_steer_route *rt)
{
	static const unsigned char zero[16];
	struct rtnl_route *r = rtnl_route_alloc();
	struct rtnl_nexthop *nh = rtnl_route_nh_alloc();
	struct nl_addr *dst = nl_addr_build(family, zero,
					    family == AF_INET ? 4 : 16);

	if (r == NULL || nh == NULL || dst == NULL) {
		rtnl_route_put(r);
		rtnl_route_nh_free(nh);
		nl_addr_put(dst);
		return NULL;
	}
	nl_addr_set_prefixlen(dst, 0);
	rtnl_route_set_family(r, family);
	rtnl_route_set_type(r, RTN_LOCAL);
	rtnl_route_set_scope(r, RT_SCOPE_HOST);
	rtnl_route_set_table(r, rt->table);
	rtnl_route_set_protocol(r, MS_RTNL_PROTO);
	rtnl_route_set_dst(r, dst);
	nl_addr_put(dst);
	rtnl_route_nh_set_ifindex(nh, (int)if_nametoindex("lo"));
	rtnl_route_add_nexthop(r, nh);
	return r;
}

static int change(struct nl_sock *sk, int add, int rule, int family,
		  const struct ms_steer_route *rt)
{
	int e = -NLE_NOMEM;

	if (rule) {
		struct rtnl_rule *r = make_rule(family, rt);

		if (r != NULL)
			e = add ? rtnl_rule_add(sk, r, NLM_F_CREATE | NLM_F_EXCL) :
				  rtnl_rule_delete(sk, r, 0);
		rtnl_rule_put(r);
	} else {
		struct rtnl_route *r = make_route(family, rt);

		if (r != NULL)
			e = add ? rtnl_route_add(sk, r, NLM_F_CREATE |
						 NLM_F_EXCL) :
				  rtnl_route_delete(sk, r, 0);
		rtnl_route_put(r);
	}
	return e;
}

static const int families[2] = { AF_INET, AF_INET6 };

void ms_rtnl_undo(const struct ms_steer_route *rt, unsigned int added)
{
	struct nl_sock *sk = nl_socket_alloc();

	if (sk == NULL || nl_connect(sk, NETLINK_ROUTE) < 0) {
		nl_socket_free(sk);
		return;
	}
	/* The rule before the route: never a rule into an empty table. */
	for (int bit = 0; bit < 4; bit++)
		if (added & (1u << bit))
			change(sk, 0, !(bit & 1), families[bit >> 1], rt);
	nl_socket_free(sk);
}

int ms_rtnl_install(const struct ms_steer_route *rt, unsigned int *added,
		    char *err, size_t errsz)
{
	struct host h;
	int e;

	*added = 0;
	if (host_load(&h, err, errsz) < 0)
		return -1;
	/* The route before the rule: the rule never points at an empty
	 * table. bit = family * 2 + (0 rule, 1 route). */
	for (int f = 0; f < 2; f++) {
		for (int route = 1; route >= 0; route--) {
			if (!(rt->families & (1u << f)) ||
			    (route ? have_route(&h, families[f], rt) :
			     have_rule(&h, families[f], rt)))
				continue;
			e = change(h.sk, 1, !route, families[f], rt);
			if (e < 0) {
				snprintf(err, errsz, "rtnetlink: cannot add "
					 "the %s %s (table %u, priority %u): "
					 "%s%s; nothing was changed",
					 f ? "IPv6" : "IPv4",
					 route ? "local route" : "rule",
					 rt->table, rt->priority,
					 nl_geterror(e), f && route ?
					 " (is IPv6 disabled on lo?)" : "");
				host_free(&h);
				ms_rtnl_undo(rt, *added);
				*added = 0;
				return -1;
			}
			*added |= 1u << (f * 2 + route);
		}
	}
	host_free(&h);
	return 0;
}

/* Whether a rule or route of ours is part of rt. */
static int rule_in(struct rtnl_rule *r, const struct ms_steer_route *rt)
{
	int f = rtnl_rule_get_family(r) == AF_INET6;

	return (rt->families & (1u << f)) &&
	       rtnl_rule_get_table(r) == rt->table &&
	       rtnl_rule_get_prio(r) == rt->priority &&
	       rtnl_rule_get_mark(r) == rt->mark;
}

static int route_in(struct rtnl_route *r, const struct ms_steer_route *rt)
{
	int f = rtnl_route_get_family(r) == AF_INET6;

	return (rt->families & (1u << f)) && rtnl_route_get_table(r) == rt->table;
}

/* Deletes mailshift's rules and routes that are not part of keep (all of
 * them when keep is NULL). */
static int delete_ours(const struct ms_steer_route *keep, char *err,
		       size_t errsz)
{
	struct host h;
	int e, ret = 0;

	if (host_load(&h, err, errsz) < 0)
		return -1;
	each_rule(&h, r) {
		if (!rule_ours(r) || (keep != NULL && rule_in(r, keep)))
			continue;
		if ((e = rtnl_rule_delete(h.sk, r, 0)) < 0) {
			snprintf(err, errsz, "rtnetlink: cannot delete rule "
				 "priority %u: %s", rtnl_rule_get_prio(r),
				 nl_geterror(e));
			ret = -1;
		}
	}
	each_route(&h, r) {
		if (!route_ours(r) || (keep != NULL && route_in(r, keep)))
			continue;
		if ((e = rtnl_route_delete(h.sk, r, 0)) < 0) {
			snprintf(err, errsz, "rtnetlink: cannot delete the "
				 "local route of table %u: %s",
				 rtnl_route_get_table(r), nl_geterror(e));
			ret = -1;
		}
	}
	host_free(&h);
	return ret;
}

int ms_rtnl_prune(const struct ms_steer_route *rt, char *err, size_t errsz)
{
	return delete_ours(rt, err, errsz);
}

int ms_rtnl_remove(char *err, size_t errsz)
{
	return delete_ours(NULL, err, errsz);
}

static const char *family_name(int family)
{
	return family == AF_INET ? "ipv4" : "ipv6";
}

json_t *ms_rtnl_show(char *err, size_t errsz)
{
	json_t *o = json_pack("{s:[],s:[]}", "rules", "routes");
	struct host h;

	if (host_load(&h, err, errsz) < 0) {
		json_decref(o);
		return NULL;
	}
	each_rule(&h, r)
		if (rule_ours(r))
			json_array_append_new(json_object_get(o, "rules"),
				json_pack("{s:s,s:I,s:I,s:I}", "family",
					  family_name(rtnl_rule_get_family(r)),
					  "priority",
					  (json_int_t)rtnl_rule_get_prio(r),
					  "mark",
					  (json_int_t)rtnl_rule_get_mark(r),
					  "table",
					  (json_int_t)rtnl_rule_get_table(r)));
	each_route(&h, r)
		if (route_ours(r))
			json_array_append_new(json_object_get(o, "routes"),
				json_pack("{s:s,s:I}", "family",
					  family_name(rtnl_route_get_family(r)),
					  "table",
					  (json_int_t)rtnl_route_get_table(r)));
	host_free(&h);
	return o;
}
