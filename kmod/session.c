// SPDX-License-Identifier: GPL-2.0
/*
 * The session map of a network namespace: for each client connection the
 * gateway routed, its user and the server it chose, with the user's state.
 * The packet path finds a connection's session under RCU and resets it
 * when its user's mail has left the server it still flows to; writers
 * hold ms_lock. An entry goes when the gateway deletes it, when the table
 * goes, or when a periodic collection finds its connection gone.
 */
#include <linux/jhash.h>
#include <linux/moduleparam.h>
#include <linux/random.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/workqueue.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_core.h>
#include <net/netfilter/nf_conntrack_zones.h>

#include "mailshift.h"

static unsigned int ms_max_sessions = MAILSHIFT_DEFAULT_SESSIONS;
static unsigned int ms_gc_interval = 10;
static u32 ms_seed __read_mostly;

static int set_max_sessions(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 1, MAILSHIFT_MAX_SESSIONS);
}

static int set_gc_interval(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 1, 3600);
}

static const struct kernel_param_ops max_sessions_ops = {
	.set = set_max_sessions,
	.get = param_get_uint,
};

static const struct kernel_param_ops gc_interval_ops = {
	.set = set_gc_interval,
	.get = param_get_uint,
};

module_param_cb(max_sessions, &max_sessions_ops, &ms_max_sessions, 0644);
MODULE_PARM_DESC(max_sessions, "most sessions in one namespace's map");
module_param_cb(gc_interval, &gc_interval_ops, &ms_gc_interval, 0644);
MODULE_PARM_DESC(gc_interval,
		 "seconds between looks for sessions whose connection is gone");

unsigned int ms_sessions_max(void)
{
	return READ_ONCE(ms_max_sessions);
}

static unsigned long gc_jiffies(void)
{
	return READ_ONCE(ms_gc_interval) * HZ;
}

static u32 key_hash(const struct ms_skey *k)
{
	return jhash2((const u32 *)&k->caddr, sizeof(k->caddr) / sizeof(u32),
		      ms_seed ^ (__force u32)k->cport) & (MS_SESSION_BUCKETS - 1);
}

static u32 name_hash(const char *name, unsigned int len)
{
	return jhash(name, len, ms_seed) & (MS_USER_BUCKETS - 1);
}

/* The session key of a connection: its original direction's addresses
 * and ports, as the client sent its first packet.
 */
static void key_of(struct ms_skey *k, const struct nf_conn *ct)
{
	const struct nf_conntrack_tuple *t =
		&ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;

	memset(k, 0, sizeof(*k));
	k->family = t->src.l3num;
	k->cport = t->src.u.tcp.port;
	k->lport = t->dst.u.tcp.port;
	if (k->family == NFPROTO_IPV4) {
		k->caddr.ip = t->src.u3.ip;
		k->laddr.ip = t->dst.u3.ip;
	} else {
		k->caddr.in6 = t->src.u3.in6;
		k->laddr.in6 = t->dst.u3.in6;
	}
}

static bool key_eq(const struct ms_skey *a, const struct ms_skey *b)
{
	return a->family == b->family && a->cport == b->cport &&
	       a->lport == b->lport && nf_inet_addr_cmp(&a->caddr, &b->caddr) &&
	       nf_inet_addr_cmp(&a->laddr, &b->laddr);
}

/* The packet path: the session of ct, or NULL. Under RCU. */
struct ms_session *ms_session_find(struct ms_net *mn, const struct nf_conn *ct)
{
	struct ms_session *s;
	struct ms_skey k;

	if (!READ_ONCE(mn->nsessions) || !mn->sbuckets)
		return NULL;
	key_of(&k, ct);
	if (k.family != NFPROTO_IPV4 && k.family != NFPROTO_IPV6)
		return NULL;
	hlist_for_each_entry_rcu(s, &mn->sbuckets[key_hash(&k)], node)
		if (key_eq(&s->key, &k))
			return s;
	return NULL;
}

/* Whether a session's packets must be reset: in a cutover nothing of the
 * user may flow anywhere, once moved nothing to the source.
 */
bool ms_session_stale(const struct ms_session *s)
{
	u8 state = READ_ONCE(s->user->state);

	return state == MAILSHIFT_USER_CUTOVER ||
	       (state == MAILSHIFT_USER_MOVED && s->server == MAILSHIFT_SOURCE);
}

static struct ms_session *find_locked(struct ms_net *mn,
				      const struct ms_skey *k)
{
	struct ms_session *s;

	hlist_for_each_entry(s, &mn->sbuckets[key_hash(k)], node)
		if (key_eq(&s->key, k))
			return s;
	return NULL;
}

struct ms_user *ms_user_find(struct ms_net *mn, const char *name,
			     unsigned int len)
{
	struct ms_user *u;

	lockdep_assert_held(&ms_lock);
	if (!mn->ubuckets)
		return NULL;
	hlist_for_each_entry(u, &mn->ubuckets[name_hash(name, len)], node)
		if (u->len == len && !memcmp(u->name, name, len))
			return u;
	return NULL;
}

static struct ms_user *user_get(struct ms_net *mn, const char *name,
				unsigned int len)
{
	struct ms_user *u = ms_user_find(mn, name, len);

	if (u)
		return u;
	u = kzalloc(struct_size(u, name, len + 1), GFP_KERNEL);
	if (!u)
		return NULL;
	memcpy(u->name, name, len);
	u->len = len;
	u->state = MAILSHIFT_USER_ROUTED;
	hlist_add_head(&u->node, &mn->ubuckets[name_hash(name, len)]);
	return u;
}

/* The buckets come with the first table and stay until the namespace
 * goes: the packet path never sees them change.
 */
int ms_sessions_init(struct ms_net *mn)
{
	if (mn->sbuckets)
		return 0;
	mn->ubuckets = kvcalloc(MS_USER_BUCKETS, sizeof(*mn->ubuckets),
				GFP_KERNEL);
	mn->sbuckets = kvcalloc(MS_SESSION_BUCKETS, sizeof(*mn->sbuckets),
				GFP_KERNEL);
	if (mn->ubuckets && mn->sbuckets)
		return 0;
	kvfree(mn->ubuckets);
	kvfree(mn->sbuckets);
	mn->ubuckets = NULL;
	mn->sbuckets = NULL;
	return -ENOMEM;
}

int ms_session_add(struct ms_net *mn, const struct ms_skey *k,
		   const char *name, unsigned int len, u8 server, int state,
		   struct netlink_ext_ack *extack)
{
	struct ms_session *s;
	struct ms_user *u;

	lockdep_assert_held(&ms_lock);
	if (!rcu_access_pointer(mn->table) || !mn->sbuckets) {
		NL_SET_ERR_MSG_MOD(extack,
				   "no steering table is installed in this namespace");
		return -ENOENT;
	}
	if (find_locked(mn, k)) {
		NL_SET_ERR_MSG_MOD(extack,
				   "a session of this client address and port is in the map");
		return -EEXIST;
	}
	if (mn->nsessions >= ms_sessions_max()) {
		NL_SET_ERR_MSG_MOD(extack,
				   "the session map is full (the module's max_sessions)");
		return -ENOSPC;
	}
	s = kzalloc(sizeof(*s), GFP_KERNEL);
	u = s ? user_get(mn, name, len) : NULL;
	if (!u) {
		kfree(s);
		return -ENOMEM;
	}
	if (state >= 0)
		WRITE_ONCE(u->state, state);
	u->nsessions++;
	s->key = *k;
	s->user = u;
	s->server = server;
	s->added = jiffies;
	hlist_add_head_rcu(&s->node, &mn->sbuckets[key_hash(k)]);
	WRITE_ONCE(mn->nsessions, mn->nsessions + 1);
	mn->sgeneration++;
	/* The collection runs while there are sessions. */
	if (mn->nsessions == 1)
		schedule_delayed_work(&mn->gc, gc_jiffies());
	return 0;
}

static void unlink_session(struct ms_net *mn, struct ms_session *s)
{
	struct ms_user *u = s->user;

	hlist_del_rcu(&s->node);
	WRITE_ONCE(mn->nsessions, mn->nsessions - 1);
	mn->sgeneration++;
	/* A reader that found s may still read its user: both go after a
	 * grace period, the user once no session names it.
	 */
	if (!--u->nsessions) {
		hlist_del(&u->node);
		kfree_rcu(u, rcu);
	}
	kfree_rcu(s, rcu);
}

int ms_session_del(struct ms_net *mn, const struct ms_skey *k,
		   struct netlink_ext_ack *extack)
{
	struct ms_session *s = mn->sbuckets ? find_locked(mn, k) : NULL;

	lockdep_assert_held(&ms_lock);
	if (!s) {
		NL_SET_ERR_MSG_MOD(extack,
				   "no session of this client address and port");
		return -ENOENT;
	}
	unlink_session(mn, s);
	return 0;
}

void ms_sessions_flush(struct ms_net *mn)
{
	struct hlist_node *tmp;
	struct ms_session *s;
	unsigned int i;

	lockdep_assert_held(&ms_lock);
	if (!mn->sbuckets)
		return;
	for (i = 0; i < MS_SESSION_BUCKETS; i++)
		hlist_for_each_entry_safe(s, tmp, &mn->sbuckets[i], node)
			unlink_session(mn, s);
}

/* Whether the connection of a session is over: no conntrack entry for it
 * any more, or one that is dying or closing (TIME_WAIT, CLOSE).
 */
static bool connection_gone(struct net *net, const struct ms_skey *k)
{
	struct nf_conntrack_tuple_hash *h;
	struct nf_conntrack_tuple t;
	struct nf_conn *ct;
	bool gone;

	memset(&t, 0, sizeof(t));
	t.src.l3num = k->family;
	t.src.u3 = k->caddr;
	t.src.u.tcp.port = k->cport;
	t.dst.u3 = k->laddr;
	t.dst.u.tcp.port = k->lport;
	t.dst.protonum = IPPROTO_TCP;
	t.dst.dir = IP_CT_DIR_ORIGINAL;
	h = nf_conntrack_find_get(net, &nf_ct_zone_dflt, &t);
	if (!h)
		return true;
	ct = nf_ct_tuplehash_to_ctrack(h);
	gone = NF_CT_DIRECTION(h) != IP_CT_DIR_ORIGINAL || nf_ct_is_dying(ct) ||
	       READ_ONCE(ct->proto.tcp.state) >= TCP_CONNTRACK_TIME_WAIT;
	nf_ct_put(ct);
	return gone;
}

/* Sessions the gateway did not delete (it crashed, or missed the end) go
 * when their connection has. A session younger than one interval is left:
 * the gateway may add it just before the connection is confirmed.
 */
static void ms_sessions_gc(struct work_struct *work)
{
	struct ms_net *mn = container_of(to_delayed_work(work), struct ms_net,
					 gc);
	unsigned long age = gc_jiffies();
	struct hlist_node *tmp;
	struct ms_session *s;
	unsigned int i;

	mutex_lock(&ms_lock);
	for (i = 0; mn->sbuckets && i < MS_SESSION_BUCKETS; i++) {
		hlist_for_each_entry_safe(s, tmp, &mn->sbuckets[i], node) {
			if (time_before(jiffies, s->added + age))
				continue;
			if (connection_gone(mn->net, &s->key))
				unlink_session(mn, s);
		}
		/* A full map is a long walk: others may run meanwhile. */
		cond_resched();
	}
	if (mn->nsessions)
		schedule_delayed_work(&mn->gc, age);
	mutex_unlock(&ms_lock);
}

void ms_sessions_net_init(struct ms_net *mn, struct net *net)
{
	mn->net = net;
	INIT_DELAYED_WORK(&mn->gc, ms_sessions_gc);
}

/* Before the namespace's table goes: no collection runs after this. */
void ms_sessions_net_stop(struct ms_net *mn)
{
	cancel_delayed_work_sync(&mn->gc);
}

void ms_sessions_net_free(struct ms_net *mn)
{
	kvfree(mn->sbuckets);
	kvfree(mn->ubuckets);
}

void __init ms_sessions_seed(void)
{
	ms_seed = get_random_u32();
}
