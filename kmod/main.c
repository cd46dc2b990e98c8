// SPDX-License-Identifier: GPL-2.0
/*
 * mailshift.ko: module init and exit, the state of each network namespace,
 * and the one writer path that replaces or removes a namespace's steering
 * table.
 */
#include <linux/bitmap.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <net/genetlink.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>

#include "mailshift.h"

unsigned int ms_net_id __read_mostly;
/* The one writer lock: table changes of every namespace, and the dumps. */
DEFINE_MUTEX(ms_lock);

struct ms_net *ms_net(struct net *net)
{
	return net_generic(net, ms_net_id);
}

bool ms_key_eq(const struct ms_key *a, const struct ms_key *b)
{
	return a->family == b->family && a->plen == b->plen &&
	       a->port == b->port && nf_inet_addr_cmp(&a->addr, &b->addr) &&
	       nf_inet_addr_cmp(&a->prefix, &b->prefix);
}

static int find_slot(const struct ms_net *mn, const struct ms_key *key)
{
	int i;

	for (i = 0; i < MS_MAX_SLOTS; i++)
		if (mn->slots[i].used && ms_key_eq(&mn->slots[i].key, key))
			return i;
	return -1;
}

/* A slot no entry of the new table keeps: one never used if there is one,
 * else the first one whose key is gone (its counts start again).
 */
static int free_slot(const struct ms_net *mn, const unsigned long *taken)
{
	int i, gone = -1;

	for (i = 0; i < MS_MAX_SLOTS; i++) {
		if (test_bit(i, taken))
			continue;
		if (!mn->slots[i].used)
			return i;
		if (gone < 0)
			gone = i;
	}
	return gone;
}

/* Each entry of t gets the slot of its key, so its counters carry over a
 * replacement, or a fresh one.
 */
static int assign_slots(struct ms_net *mn, struct ms_table *t)
{
	unsigned long *taken = bitmap_zalloc(MS_MAX_SLOTS, GFP_KERNEL);
	struct ms_slot *s;
	unsigned int i;
	int n;

	if (!taken)
		return -ENOMEM;
	for (i = 0; i < t->nentries; i++) {
		n = find_slot(mn, &t->entries[i].key);
		t->entries[i].slot = n < 0 ? U32_MAX : n;
		if (n >= 0)
			set_bit(n, taken);
	}
	for (i = 0; i < t->nentries; i++) {
		if (t->entries[i].slot != U32_MAX)
			continue;
		/* Cannot fail: there are twice as many slots as entries. */
		n = free_slot(mn, taken);
		set_bit(n, taken);
		s = &mn->slots[n];
		atomic64_set(&s->conns, 0);
		atomic64_set(&s->packets, 0);
		atomic64_set(&s->bytes, 0);
		s->key = t->entries[i].key;
		s->used = true;
		t->entries[i].slot = n;
	}
	bitmap_free(taken);
	return 0;
}

/* Takes t on success; on failure the caller frees it and nothing changed. */
int ms_table_replace(struct net *net, struct ms_table *t,
		     struct netlink_ext_ack *extack)
{
	struct ms_net *mn = ms_net(net);
	struct ms_table *old;
	int ret;

	lockdep_assert_held(&ms_lock);
	if (!mn->slots) {
		mn->slots = kvcalloc(MS_MAX_SLOTS, sizeof(*mn->slots),
				     GFP_KERNEL);
		if (!mn->slots)
			return -ENOMEM;
	}
	ret = ms_sessions_init(mn);
	if (ret)
		return ret;
	if (!mn->hooked) {
		ret = ms_hooks_register(net);
		if (ret) {
			NL_SET_ERR_MSG_MOD(extack,
					   "cannot register the netfilter hooks");
			return ret;
		}
		mn->hooked = true;
	}
	ret = assign_slots(mn, t);
	if (ret)
		return ret;
	old = rcu_replace_pointer(mn->table, t, lockdep_is_held(&ms_lock));
	mn->generation++;
	if (old)
		kvfree_rcu(old, rcu);
	return 0;
}

void ms_table_delete(struct net *net)
{
	struct ms_net *mn = ms_net(net);
	struct ms_table *old;

	lockdep_assert_held(&ms_lock);
	old = rcu_replace_pointer(mn->table, NULL, lockdep_is_held(&ms_lock));
	/* Without the hooks nothing could enforce the map. */
	ms_sessions_flush(mn);
	if (mn->hooked) {
		ms_hooks_unregister(net);
		mn->hooked = false;
	}
	mn->generation++;
	if (old)
		kvfree_rcu(old, rcu);
}

static int __net_init ms_net_init(struct net *net)
{
	ms_sessions_net_init(ms_net(net), net);
	return 0;
}

static void __net_exit ms_net_pre_exit(struct net *net)
{
	ms_sessions_net_stop(ms_net(net));
	mutex_lock(&ms_lock);
	ms_table_delete(net);
	mutex_unlock(&ms_lock);
}

/* The core waited for an RCU grace period after pre_exit: no hook of this
 * namespace runs any more.
 */
static void __net_exit ms_net_exit(struct net *net)
{
	kvfree(ms_net(net)->slots);
	ms_sessions_net_free(ms_net(net));
}

static struct pernet_operations ms_net_ops = {
	.init = ms_net_init,
	.pre_exit = ms_net_pre_exit,
	.exit = ms_net_exit,
	.id = &ms_net_id,
	.size = sizeof(struct ms_net),
};

static int __init ms_init(void)
{
	int ret;

	ms_sessions_seed();
	ret = register_pernet_subsys(&ms_net_ops);
	if (ret)
		return ret;
	/* Last: from here on userspace can reach us. */
	ret = ms_genl_init();
	if (ret)
		goto err_pernet;
	pr_info("loaded (genl family %s version %d)\n", MAILSHIFT_GENL_NAME,
		MAILSHIFT_GENL_VERSION);
	return 0;

err_pernet:
	unregister_pernet_subsys(&ms_net_ops);
	return ret;
}

static void __exit ms_exit(void)
{
	ms_genl_uninit();
	unregister_pernet_subsys(&ms_net_ops);
	/* The tables, sessions and users freed with kvfree_rcu. */
	rcu_barrier();
}

module_init(ms_init);
module_exit(ms_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("mailshift: steers mail connections to a gateway or a server");
MODULE_ALIAS_GENL_FAMILY(MAILSHIFT_GENL_NAME);
