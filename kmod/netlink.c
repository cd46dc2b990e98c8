// SPDX-License-Identifier: GPL-2.0
/*
 * The generic netlink family "mailshift": replaces, dumps and removes the
 * steering table of the caller's network namespace, and adds, removes and
 * dumps the sessions of its session map (uapi/mailshift.h is the
 * contract). A request is checked whole before anything changes.
 */
#include <linux/inetdevice.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <net/genetlink.h>
#include <net/ipv6.h>
#include <net/netlink.h>

#include "mailshift.h"

static const struct nla_policy port_policy[MAILSHIFT_P_MAX + 1] = {
	[MAILSHIFT_P_PORT] = NLA_POLICY_MIN(NLA_U16, 1),
	[MAILSHIFT_P_LISTENER] = { .type = NLA_U16 },
};

static const struct nla_policy entry_policy[MAILSHIFT_E_MAX + 1] = {
	[MAILSHIFT_E_FAMILY] = { .type = NLA_U8 },
	[MAILSHIFT_E_ADDR] = { .type = NLA_BINARY, .len = 16 },
	[MAILSHIFT_E_PORT] = { .type = NLA_U16 },
	[MAILSHIFT_E_PREFIX] = { .type = NLA_BINARY, .len = 16 },
	[MAILSHIFT_E_PREFIX_LEN] = NLA_POLICY_MAX(NLA_U8, 128),
	[MAILSHIFT_E_ACTION] = NLA_POLICY_RANGE(NLA_U8, MAILSHIFT_PROXY,
						MAILSHIFT_DESTINATION),
};

static const struct nla_policy policy[MAILSHIFT_A_MAX + 1] = {
	[MAILSHIFT_A_MARK] = { .type = NLA_U32 },
	[MAILSHIFT_A_ROUTE_MARK] = NLA_POLICY_MIN(NLA_U32, 1),
	[MAILSHIFT_A_ROUTE_TABLE] = { .type = NLA_U32 },
	[MAILSHIFT_A_ROUTE_PRIORITY] = { .type = NLA_U32 },
	[MAILSHIFT_A_PORTS] = NLA_POLICY_NESTED_ARRAY(port_policy),
	[MAILSHIFT_A_SOURCE4] = NLA_POLICY_EXACT_LEN(4),
	[MAILSHIFT_A_SOURCE6] = NLA_POLICY_EXACT_LEN(16),
	[MAILSHIFT_A_DEST4] = NLA_POLICY_EXACT_LEN(4),
	[MAILSHIFT_A_DEST6] = NLA_POLICY_EXACT_LEN(16),
	[MAILSHIFT_A_ENTRIES] = NLA_POLICY_NESTED_ARRAY(entry_policy),
};

static int parse_ports(struct ms_table *t, const struct nlattr *list,
		       struct netlink_ext_ack *extack)
{
	struct nlattr *tb[MAILSHIFT_P_MAX + 1], *nla;
	unsigned int i;
	int rem, ret;

	nla_for_each_nested(nla, list, rem) {
		if (t->nports == MAILSHIFT_MAX_PORTS) {
			NL_SET_ERR_MSG_ATTR(extack, nla, "too many ports");
			return -E2BIG;
		}
		ret = nla_parse_nested(tb, MAILSHIFT_P_MAX, nla, port_policy,
				       extack);
		if (ret)
			return ret;
		if (!tb[MAILSHIFT_P_PORT]) {
			NL_SET_ERR_MSG_ATTR(extack, nla, "a port without its number");
			return -EINVAL;
		}
		t->ports[t->nports].port = nla_get_u16(tb[MAILSHIFT_P_PORT]);
		if (tb[MAILSHIFT_P_LISTENER])
			t->ports[t->nports].listener =
				nla_get_u16(tb[MAILSHIFT_P_LISTENER]);
		for (i = 0; i < t->nports; i++) {
			if (t->ports[i].port == t->ports[t->nports].port) {
				NL_SET_ERR_MSG_ATTR(extack, nla,
						    "a port given twice");
				return -EINVAL;
			}
		}
		t->nports++;
	}
	return 0;
}

static int get_addr(union nf_inet_addr *a, u8 family, const struct nlattr *nla,
		    struct netlink_ext_ack *extack)
{
	int len = family == NFPROTO_IPV4 ? 4 : 16;

	if (nla_len(nla) != len) {
		NL_SET_ERR_MSG_ATTR(extack, nla,
				    "address length does not match the family");
		return -EINVAL;
	}
	memcpy(a, nla_data(nla), len);
	return 0;
}

/* The prefix's host bits must be zero: the lookup compares whole words. */
static int get_prefix(struct ms_key *k, struct nlattr **tb,
		      const struct nlattr *nla, struct netlink_ext_ack *extack)
{
	union nf_inet_addr masked;
	int ret;

	if (!tb[MAILSHIFT_E_PREFIX_LEN]) {
		NL_SET_ERR_MSG_ATTR(extack, nla, "a prefix without its length");
		return -EINVAL;
	}
	ret = get_addr(&k->prefix, k->family, tb[MAILSHIFT_E_PREFIX], extack);
	if (ret)
		return ret;
	k->plen = nla_get_u8(tb[MAILSHIFT_E_PREFIX_LEN]);
	if (k->plen == 0 || (k->family == NFPROTO_IPV4 && k->plen > 32)) {
		NL_SET_ERR_MSG_ATTR(extack, tb[MAILSHIFT_E_PREFIX_LEN],
				    "prefix length out of range");
		return -EINVAL;
	}
	if (k->family == NFPROTO_IPV4) {
		masked.ip = k->prefix.ip & inet_make_mask(k->plen);
		masked.in6.s6_addr32[1] = 0;
		masked.in6.s6_addr32[2] = 0;
		masked.in6.s6_addr32[3] = 0;
	} else {
		ipv6_addr_prefix(&masked.in6, &k->prefix.in6, k->plen);
	}
	if (!nf_inet_addr_cmp(&masked, &k->prefix)) {
		NL_SET_ERR_MSG_ATTR(extack, tb[MAILSHIFT_E_PREFIX],
				    "bits set after the prefix length");
		return -EINVAL;
	}
	return 0;
}

static int parse_entry(struct ms_table *t, const struct nlattr *nla,
		       struct netlink_ext_ack *extack)
{
	struct ms_entry *e = &t->entries[t->nentries];
	struct nlattr *tb[MAILSHIFT_E_MAX + 1];
	u8 family;
	int ret;

	ret = nla_parse_nested(tb, MAILSHIFT_E_MAX, nla, entry_policy, extack);
	if (ret)
		return ret;
	if (!tb[MAILSHIFT_E_FAMILY] || !tb[MAILSHIFT_E_ADDR] ||
	    !tb[MAILSHIFT_E_PORT] || !tb[MAILSHIFT_E_ACTION]) {
		NL_SET_ERR_MSG_ATTR(extack, nla,
				    "an entry needs family, address, port and action");
		return -EINVAL;
	}
	family = nla_get_u8(tb[MAILSHIFT_E_FAMILY]);
	if (family != AF_INET && family != AF_INET6) {
		NL_SET_ERR_MSG_ATTR(extack, tb[MAILSHIFT_E_FAMILY],
				    "family is AF_INET or AF_INET6");
		return -EAFNOSUPPORT;
	}
	e->key.family = family == AF_INET ? NFPROTO_IPV4 : NFPROTO_IPV6;
	ret = get_addr(&e->key.addr, e->key.family, tb[MAILSHIFT_E_ADDR],
		       extack);
	if (ret)
		return ret;
	if (tb[MAILSHIFT_E_PREFIX]) {
		ret = get_prefix(&e->key, tb, nla, extack);
		if (ret)
			return ret;
	}
	e->key.port = nla_get_u16(tb[MAILSHIFT_E_PORT]);
	e->action = nla_get_u8(tb[MAILSHIFT_E_ACTION]);
	t->nentries++;
	return 0;
}

static int parse_entries(struct ms_table *t, const struct nlattr *list,
			 struct netlink_ext_ack *extack)
{
	struct nlattr *nla;
	unsigned int i;
	int rem, ret;

	nla_for_each_nested(nla, list, rem) {
		if (t->nentries == MAILSHIFT_MAX_ENTRIES) {
			NL_SET_ERR_MSG_ATTR(extack, nla, "too many entries");
			return -E2BIG;
		}
		ret = parse_entry(t, nla, extack);
		if (ret)
			return ret;
		for (i = 0; i + 1 < t->nentries; i++) {
			if (ms_key_eq(&t->entries[i].key,
				      &t->entries[t->nentries - 1].key)) {
				NL_SET_ERR_MSG_ATTR(extack, nla,
						    "two entries for the same address, port and prefix");
				return -EINVAL;
			}
		}
	}
	return 0;
}

/* What an entry can do must be possible with the table's settings. */
static int check_entries(const struct ms_table *t,
			 struct netlink_ext_ack *extack)
{
	const struct ms_entry *e;
	unsigned int i, j;
	int v6;

	for (i = 0; i < t->nentries; i++) {
		e = &t->entries[i];
		v6 = e->key.family == NFPROTO_IPV6;
		for (j = 0; e->key.port && j < t->nports; j++)
			if (t->ports[j].port == e->key.port)
				break;
		if (e->key.port && j == t->nports) {
			NL_SET_ERR_MSG_MOD(extack,
					   "an entry's port is not a mail port");
			return -EINVAL;
		}
		if (e->action == MAILSHIFT_PROXY && !e->key.port) {
			NL_SET_ERR_MSG_MOD(extack,
					   "only mail ports go to the proxy");
			return -EINVAL;
		}
		if (e->action == MAILSHIFT_DESTINATION && !t->has_dst[v6]) {
			NL_SET_ERR_MSG_MOD(extack,
					   "an entry steers to a destination the table has no address for");
			return -EINVAL;
		}
	}
	return 0;
}

static void get_server(bool *has, union nf_inet_addr *a,
		       const struct nlattr *nla)
{
	if (!nla)
		return;
	*has = true;
	memcpy(a, nla_data(nla), nla_len(nla));
}

/* Longer client prefixes first, entries without one last. */
static int by_prefix(const void *a, const void *b)
{
	const struct ms_entry *x = a, *y = b;
	int lx = x->key.plen ? x->key.plen : -1;
	int ly = y->key.plen ? y->key.plen : -1;

	return ly - lx;
}

static struct ms_table *parse_table(struct genl_info *info)
{
	struct netlink_ext_ack *extack = info->extack;
	struct nlattr **attrs = info->attrs;
	struct ms_table *t;
	int ret;

	if (GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_MARK) ||
	    GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_ROUTE_MARK) ||
	    GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_PORTS)) {
		NL_SET_ERR_MSG_MOD(extack,
				   "a table needs a mark, a route mark and ports");
		return ERR_PTR(-EINVAL);
	}
	t = kvzalloc(struct_size(t, entries, MAILSHIFT_MAX_ENTRIES),
		     GFP_KERNEL);
	if (!t)
		return ERR_PTR(-ENOMEM);
	t->mark = nla_get_u32(attrs[MAILSHIFT_A_MARK]);
	if (!t->mark || (t->mark & 0xff)) {
		NL_SET_ERR_MSG_ATTR(extack, attrs[MAILSHIFT_A_MARK],
				    "the mark base must be nonzero with its low 8 bits zero");
		ret = -EINVAL;
		goto err;
	}
	t->route_mark = nla_get_u32(attrs[MAILSHIFT_A_ROUTE_MARK]);
	if (attrs[MAILSHIFT_A_ROUTE_TABLE])
		t->route_table = nla_get_u32(attrs[MAILSHIFT_A_ROUTE_TABLE]);
	if (attrs[MAILSHIFT_A_ROUTE_PRIORITY])
		t->route_priority =
			nla_get_u32(attrs[MAILSHIFT_A_ROUTE_PRIORITY]);
	get_server(&t->has_src[0], &t->src[0], attrs[MAILSHIFT_A_SOURCE4]);
	get_server(&t->has_src[1], &t->src[1], attrs[MAILSHIFT_A_SOURCE6]);
	get_server(&t->has_dst[0], &t->dst[0], attrs[MAILSHIFT_A_DEST4]);
	get_server(&t->has_dst[1], &t->dst[1], attrs[MAILSHIFT_A_DEST6]);
	ret = parse_ports(t, attrs[MAILSHIFT_A_PORTS], extack);
	if (!ret && attrs[MAILSHIFT_A_ENTRIES])
		ret = parse_entries(t, attrs[MAILSHIFT_A_ENTRIES], extack);
	if (!ret)
		ret = check_entries(t, extack);
	if (ret)
		goto err;
	sort(t->entries, t->nentries, sizeof(t->entries[0]), by_prefix, NULL);
	return t;

err:
	kvfree(t);
	return ERR_PTR(ret);
}

static int ms_set_table(struct sk_buff *skb, struct genl_info *info)
{
	struct ms_table *t = parse_table(info);
	int ret;

	if (IS_ERR(t))
		return PTR_ERR(t);
	mutex_lock(&ms_lock);
	ret = ms_table_replace(genl_info_net(info), t, info->extack);
	mutex_unlock(&ms_lock);
	if (ret)
		kvfree(t);
	return ret;
}

static int ms_del_table(struct sk_buff *skb, struct genl_info *info)
{
	mutex_lock(&ms_lock);
	ms_table_delete(genl_info_net(info));
	mutex_unlock(&ms_lock);
	return 0;
}

static int put_addr(struct sk_buff *skb, int type, u8 family,
		    const union nf_inet_addr *a)
{
	return nla_put(skb, type, family == NFPROTO_IPV4 ? 4 : 16, a);
}

static int put_header(struct sk_buff *skb, const struct ms_net *mn,
		      const struct ms_table *t)
{
	struct nlattr *list, *port;
	unsigned int i;

	if (nla_put_u8(skb, MAILSHIFT_A_INSTALLED, !!t) ||
	    nla_put_u32(skb, MAILSHIFT_A_GENERATION, mn->generation) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_A_REJECTED,
			      atomic64_read(&mn->rejected), MAILSHIFT_A_PAD))
		return -EMSGSIZE;
	if (!t)
		return 0;
	if (nla_put_u32(skb, MAILSHIFT_A_MARK, t->mark) ||
	    nla_put_u32(skb, MAILSHIFT_A_ROUTE_MARK, t->route_mark) ||
	    nla_put_u32(skb, MAILSHIFT_A_ROUTE_TABLE, t->route_table) ||
	    nla_put_u32(skb, MAILSHIFT_A_ROUTE_PRIORITY, t->route_priority) ||
	    (t->has_src[0] && nla_put_in_addr(skb, MAILSHIFT_A_SOURCE4,
					      t->src[0].ip)) ||
	    (t->has_src[1] && nla_put_in6_addr(skb, MAILSHIFT_A_SOURCE6,
					       &t->src[1].in6)) ||
	    (t->has_dst[0] && nla_put_in_addr(skb, MAILSHIFT_A_DEST4,
					      t->dst[0].ip)) ||
	    (t->has_dst[1] && nla_put_in6_addr(skb, MAILSHIFT_A_DEST6,
					       &t->dst[1].in6)))
		return -EMSGSIZE;
	list = nla_nest_start(skb, MAILSHIFT_A_PORTS);
	if (!list)
		return -EMSGSIZE;
	for (i = 0; i < t->nports; i++) {
		port = nla_nest_start(skb, i + 1);
		if (!port ||
		    nla_put_u16(skb, MAILSHIFT_P_PORT, t->ports[i].port) ||
		    nla_put_u16(skb, MAILSHIFT_P_LISTENER, t->ports[i].listener))
			return -EMSGSIZE;
		nla_nest_end(skb, port);
	}
	nla_nest_end(skb, list);
	return 0;
}

static int put_entry(struct sk_buff *skb, const struct ms_net *mn,
		     const struct ms_entry *e, unsigned int index)
{
	const struct ms_slot *s = &mn->slots[e->slot];
	u8 family = e->key.family == NFPROTO_IPV4 ? AF_INET : AF_INET6;
	struct nlattr *list, *nest;

	list = nla_nest_start(skb, MAILSHIFT_A_ENTRIES);
	if (!list)
		return -EMSGSIZE;
	nest = nla_nest_start(skb, index + 1);
	if (!nest ||
	    nla_put_u8(skb, MAILSHIFT_E_FAMILY, family) ||
	    put_addr(skb, MAILSHIFT_E_ADDR, e->key.family, &e->key.addr) ||
	    nla_put_u16(skb, MAILSHIFT_E_PORT, e->key.port) ||
	    nla_put_u8(skb, MAILSHIFT_E_ACTION, e->action) ||
	    (e->key.plen &&
	     (put_addr(skb, MAILSHIFT_E_PREFIX, e->key.family,
		       &e->key.prefix) ||
	      nla_put_u8(skb, MAILSHIFT_E_PREFIX_LEN, e->key.plen))) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_E_CONNECTIONS,
			      atomic64_read(&s->conns), MAILSHIFT_E_PAD) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_E_PACKETS,
			      atomic64_read(&s->packets), MAILSHIFT_E_PAD) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_E_BYTES,
			      atomic64_read(&s->bytes), MAILSHIFT_E_PAD))
		return -EMSGSIZE;
	nla_nest_end(skb, nest);
	nla_nest_end(skb, list);
	return 0;
}

static struct genl_family ms_genl_family;

/* One message with the table's settings, then one per entry. cb->args[0]
 * is the next message: 0 the settings, i + 1 entry i. A SET or DEL between
 * two calls changes the generation, and the dump is flagged interrupted.
 */
static int ms_get_table(struct sk_buff *skb, struct netlink_callback *cb)
{
	struct net *net = sock_net(skb->sk);
	struct ms_net *mn = ms_net(net);
	const struct ms_table *t;
	unsigned long i;
	void *hdr;
	int ret = 0;

	mutex_lock(&ms_lock);
	t = rcu_dereference_protected(mn->table, lockdep_is_held(&ms_lock));
	cb->seq = mn->generation + 1;
	for (i = cb->args[0]; i <= (t ? t->nentries : 0); i++) {
		hdr = genlmsg_put(skb, NETLINK_CB(cb->skb).portid,
				  cb->nlh->nlmsg_seq, &ms_genl_family,
				  NLM_F_MULTI, MAILSHIFT_CMD_GET_TABLE);
		if (!hdr)
			break;
		genl_dump_check_consistent(cb, hdr);
		ret = i == 0 ? put_header(skb, mn, t) :
			       put_entry(skb, mn, &t->entries[i - 1], i - 1);
		if (ret) {
			genlmsg_cancel(skb, hdr);
			break;
		}
		genlmsg_end(skb, hdr);
	}
	mutex_unlock(&ms_lock);
	/* A message that fits in no buffer would end the dump early. */
	if (ret && i == cb->args[0])
		return ret;
	cb->args[0] = i;
	return skb->len;
}

/* ------------------------------------------------------ the session map */

static const struct nla_policy session_add_policy[MAILSHIFT_A_MAX + 1] = {
	[MAILSHIFT_A_USER] = { .type = NLA_NUL_STRING,
			       .len = MAILSHIFT_USER_MAX },
	[MAILSHIFT_A_SERVER] = NLA_POLICY_RANGE(NLA_U8, MAILSHIFT_SOURCE,
						MAILSHIFT_DESTINATION),
	[MAILSHIFT_A_USER_STATE] =
		NLA_POLICY_MAX(NLA_U8, __MAILSHIFT_USER_STATE_MAX - 1),
	[MAILSHIFT_A_CLIENT] = { .type = NLA_BINARY, .len = 16 },
	[MAILSHIFT_A_CLIENT_PORT] = NLA_POLICY_MIN(NLA_U16, 1),
	[MAILSHIFT_A_LOCAL] = { .type = NLA_BINARY, .len = 16 },
	[MAILSHIFT_A_LOCAL_PORT] = NLA_POLICY_MIN(NLA_U16, 1),
};

static const struct nla_policy session_del_policy[MAILSHIFT_A_MAX + 1] = {
	[MAILSHIFT_A_CLIENT] = { .type = NLA_BINARY, .len = 16 },
	[MAILSHIFT_A_CLIENT_PORT] = NLA_POLICY_MIN(NLA_U16, 1),
	[MAILSHIFT_A_LOCAL] = { .type = NLA_BINARY, .len = 16 },
	[MAILSHIFT_A_LOCAL_PORT] = NLA_POLICY_MIN(NLA_U16, 1),
};

static const struct nla_policy user_state_policy[MAILSHIFT_A_MAX + 1] = {
	[MAILSHIFT_A_USER] = { .type = NLA_NUL_STRING,
			       .len = MAILSHIFT_USER_MAX },
	[MAILSHIFT_A_USER_STATE] =
		NLA_POLICY_MAX(NLA_U8, __MAILSHIFT_USER_STATE_MAX - 1),
};

/* A dump of the map takes no attribute at all. */
static const struct nla_policy session_get_policy[MAILSHIFT_A_MAX + 1] = {};

/* The four attributes that name a session's connection. */
static int parse_skey(struct ms_skey *k, struct genl_info *info)
{
	struct netlink_ext_ack *extack = info->extack;
	struct nlattr **attrs = info->attrs;
	int len;

	if (GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_CLIENT) ||
	    GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_CLIENT_PORT) ||
	    GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_LOCAL) ||
	    GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_LOCAL_PORT)) {
		NL_SET_ERR_MSG_MOD(extack,
				   "a session needs client and local addresses and ports");
		return -EINVAL;
	}
	memset(k, 0, sizeof(*k));
	len = nla_len(attrs[MAILSHIFT_A_CLIENT]);
	if (len != 4 && len != 16) {
		NL_SET_ERR_MSG_ATTR(extack, attrs[MAILSHIFT_A_CLIENT],
				    "an address is 4 or 16 bytes");
		return -EINVAL;
	}
	k->family = len == 4 ? NFPROTO_IPV4 : NFPROTO_IPV6;
	memcpy(&k->caddr, nla_data(attrs[MAILSHIFT_A_CLIENT]), len);
	if (get_addr(&k->laddr, k->family, attrs[MAILSHIFT_A_LOCAL], extack))
		return -EINVAL;
	k->cport = htons(nla_get_u16(attrs[MAILSHIFT_A_CLIENT_PORT]));
	k->lport = htons(nla_get_u16(attrs[MAILSHIFT_A_LOCAL_PORT]));
	return 0;
}

/* The user's name: never empty (the policy bounds its length). */
static const char *user_name(struct genl_info *info, unsigned int *len)
{
	const struct nlattr *nla = info->attrs[MAILSHIFT_A_USER];

	if (GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_USER)) {
		NL_SET_ERR_MSG_MOD(info->extack, "a user name is needed");
		return NULL;
	}
	*len = strnlen(nla_data(nla), nla_len(nla));
	if (!*len) {
		NL_SET_ERR_MSG_ATTR(info->extack, nla, "the user name is empty");
		return NULL;
	}
	return nla_data(nla);
}

static int ms_session_add_nl(struct sk_buff *skb, struct genl_info *info)
{
	struct nlattr **attrs = info->attrs;
	struct ms_skey k;
	const char *name;
	unsigned int len;
	int ret, state = -1;

	ret = parse_skey(&k, info);
	if (ret)
		return ret;
	name = user_name(info, &len);
	if (!name)
		return -EINVAL;
	if (GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_SERVER)) {
		NL_SET_ERR_MSG_MOD(info->extack, "a session needs its server");
		return -EINVAL;
	}
	if (attrs[MAILSHIFT_A_USER_STATE])
		state = nla_get_u8(attrs[MAILSHIFT_A_USER_STATE]);
	mutex_lock(&ms_lock);
	ret = ms_session_add(ms_net(genl_info_net(info)), &k, name, len,
			     nla_get_u8(attrs[MAILSHIFT_A_SERVER]), state,
			     info->extack);
	mutex_unlock(&ms_lock);
	return ret;
}

static int ms_session_del_nl(struct sk_buff *skb, struct genl_info *info)
{
	struct ms_skey k;
	int ret;

	ret = parse_skey(&k, info);
	if (ret)
		return ret;
	mutex_lock(&ms_lock);
	ret = ms_session_del(ms_net(genl_info_net(info)), &k, info->extack);
	mutex_unlock(&ms_lock);
	return ret;
}

static int ms_user_state_nl(struct sk_buff *skb, struct genl_info *info)
{
	struct ms_user *u;
	const char *name;
	unsigned int len;

	name = user_name(info, &len);
	if (!name)
		return -EINVAL;
	if (GENL_REQ_ATTR_CHECK(info, MAILSHIFT_A_USER_STATE)) {
		NL_SET_ERR_MSG_MOD(info->extack, "a user state is needed");
		return -EINVAL;
	}
	mutex_lock(&ms_lock);
	u = ms_user_find(ms_net(genl_info_net(info)), name, len);
	if (u)
		WRITE_ONCE(u->state,
			   nla_get_u8(info->attrs[MAILSHIFT_A_USER_STATE]));
	mutex_unlock(&ms_lock);
	return 0;
}

static int put_session(struct sk_buff *skb, const struct ms_session *s)
{
	const struct ms_skey *k = &s->key;

	if (nla_put_string(skb, MAILSHIFT_A_USER, s->user->name) ||
	    nla_put_u8(skb, MAILSHIFT_A_USER_STATE, READ_ONCE(s->user->state)) ||
	    nla_put_u8(skb, MAILSHIFT_A_SERVER, s->server) ||
	    put_addr(skb, MAILSHIFT_A_CLIENT, k->family, &k->caddr) ||
	    nla_put_u16(skb, MAILSHIFT_A_CLIENT_PORT, ntohs(k->cport)) ||
	    put_addr(skb, MAILSHIFT_A_LOCAL, k->family, &k->laddr) ||
	    nla_put_u16(skb, MAILSHIFT_A_LOCAL_PORT, ntohs(k->lport)) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_A_PACKETS,
			      atomic64_read(&s->packets), MAILSHIFT_A_PAD) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_A_RESETS,
			      atomic64_read(&s->resets), MAILSHIFT_A_PAD) ||
	    nla_put_u64_64bit(skb, MAILSHIFT_A_USER_RESETS,
			      atomic64_read(&s->user->resets), MAILSHIFT_A_PAD))
		return -EMSGSIZE;
	return 0;
}

static int put_sessions_header(struct sk_buff *skb, const struct ms_net *mn)
{
	if (nla_put_u32(skb, MAILSHIFT_A_SESSIONS, mn->nsessions) ||
	    nla_put_u32(skb, MAILSHIFT_A_MAX_SESSIONS, ms_sessions_max()) ||
	    nla_put_u32(skb, MAILSHIFT_A_GENERATION, mn->sgeneration))
		return -EMSGSIZE;
	return 0;
}

/* One message with the map's size, then one per session, in bucket
 * order: cb->args[0] is 1 once the first is out, args[1] the bucket,
 * args[2] the next session's place in it. A change between two calls
 * changes the generation: the dump is flagged interrupted.
 */
static int ms_session_get_nl(struct sk_buff *skb, struct netlink_callback *cb)
{
	struct ms_net *mn = ms_net(sock_net(skb->sk));
	unsigned long b, i;
	struct ms_session *s;
	void *hdr;
	int ret = 0, put = 0;

	mutex_lock(&ms_lock);
	cb->seq = mn->sgeneration + 1;
	if (!cb->args[0]) {
		hdr = genlmsg_put(skb, NETLINK_CB(cb->skb).portid,
				  cb->nlh->nlmsg_seq, &ms_genl_family,
				  NLM_F_MULTI, MAILSHIFT_CMD_SESSION_GET);
		ret = hdr ? put_sessions_header(skb, mn) : -EMSGSIZE;
		if (ret)
			goto out;
		genl_dump_check_consistent(cb, hdr);
		genlmsg_end(skb, hdr);
		cb->args[0] = 1;
		put++;
	}
	for (b = cb->args[1]; mn->sbuckets && b < MS_SESSION_BUCKETS; b++) {
		i = 0;
		hlist_for_each_entry(s, &mn->sbuckets[b], node) {
			if (i++ < cb->args[2])
				continue;
			hdr = genlmsg_put(skb, NETLINK_CB(cb->skb).portid,
					  cb->nlh->nlmsg_seq, &ms_genl_family,
					  NLM_F_MULTI,
					  MAILSHIFT_CMD_SESSION_GET);
			ret = hdr ? put_session(skb, s) : -EMSGSIZE;
			if (ret) {
				if (hdr)
					genlmsg_cancel(skb, hdr);
				goto out;
			}
			genl_dump_check_consistent(cb, hdr);
			genlmsg_end(skb, hdr);
			cb->args[2] = i;
			put++;
		}
		cb->args[1] = b + 1;
		cb->args[2] = 0;
	}
out:
	mutex_unlock(&ms_lock);
	/* A message that fits in no buffer would end the dump early. */
	if (ret && !put)
		return ret;
	return skb->len;
}

static const struct genl_ops ms_genl_ops[] = {
	{
		.cmd = MAILSHIFT_CMD_SET_TABLE,
		.doit = ms_set_table,
		.flags = GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd = MAILSHIFT_CMD_GET_TABLE,
		.dumpit = ms_get_table,
		.flags = GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd = MAILSHIFT_CMD_DEL_TABLE,
		.doit = ms_del_table,
		.flags = GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd = MAILSHIFT_CMD_SESSION_ADD,
		.doit = ms_session_add_nl,
		.policy = session_add_policy,
		.maxattr = MAILSHIFT_A_MAX,
		.flags = GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd = MAILSHIFT_CMD_SESSION_DEL,
		.doit = ms_session_del_nl,
		.policy = session_del_policy,
		.maxattr = MAILSHIFT_A_MAX,
		.flags = GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd = MAILSHIFT_CMD_SESSION_GET,
		.dumpit = ms_session_get_nl,
		.policy = session_get_policy,
		.maxattr = MAILSHIFT_A_MAX,
		.flags = GENL_UNS_ADMIN_PERM,
	},
	{
		.cmd = MAILSHIFT_CMD_USER_STATE,
		.doit = ms_user_state_nl,
		.policy = user_state_policy,
		.maxattr = MAILSHIFT_A_MAX,
		.flags = GENL_UNS_ADMIN_PERM,
	},
};

static struct genl_family ms_genl_family __ro_after_init = {
	.name = MAILSHIFT_GENL_NAME,
	.version = MAILSHIFT_GENL_VERSION,
	.maxattr = MAILSHIFT_A_MAX,
	.policy = policy,
	.netnsok = true,
	.module = THIS_MODULE,
	.ops = ms_genl_ops,
	.n_ops = ARRAY_SIZE(ms_genl_ops),
	/* Every command is checked strictly (reserved header bits, flags). */
	.resv_start_op = MAILSHIFT_CMD_SET_TABLE,
};

int __init ms_genl_init(void)
{
	return genl_register_family(&ms_genl_family);
}

void ms_genl_uninit(void)
{
	genl_unregister_family(&ms_genl_family);
}
