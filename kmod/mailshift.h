/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The mailshift module's shared declarations: the steering table of a
 * network namespace, its counters, and what the hooks and the netlink
 * family call in each other.
 */
#ifndef _MAILSHIFT_H
#define _MAILSHIFT_H

#include <linux/atomic.h>
#include <linux/mutex.h>
#include <linux/netfilter.h>
#include <linux/rcupdate.h>
#include <linux/types.h>
#include <linux/workqueue.h>
#include <net/netfilter/nf_conntrack.h>

#include "uapi/mailshift.h"

/* Counter slots outlive tables: a new table reuses the slot of an entry
 * with the same address, port and prefix, so counts carry over.
 */
#define MS_MAX_SLOTS (2 * MAILSHIFT_MAX_ENTRIES)

/* The connection's counter slot (+ 1) lives in this 32-bit word of its
 * conntrack labels (bits 96 to 127).
 */
#define MS_LABEL_WORD 3
#define MS_LABEL_BIT 127

struct ms_key {
	u8 family;			/* NFPROTO_IPV4, NFPROTO_IPV6 */
	u8 plen;			/* client prefix length, 0 = any */
	u16 port;			/* host order, 0 = other ports */
	union nf_inet_addr addr;
	union nf_inet_addr prefix;
};

struct ms_entry {
	struct ms_key key;
	u8 action;			/* enum mailshift_action */
	u32 slot;
};

struct ms_port {
	u16 port, listener;
};

/* Read by the hooks under RCU, replaced whole by a writer holding
 * ms_lock; never changed in place.
 */
struct ms_table {
	struct rcu_head rcu;
	u32 mark, route_mark;
	u32 route_table, route_priority;	/* userspace's, kept */
	unsigned int nports, nentries;
	struct ms_port ports[MAILSHIFT_MAX_PORTS];
	bool has_src[2], has_dst[2];	/* [0] IPv4, [1] IPv6 */
	union nf_inet_addr src[2], dst[2];
	/* Most specific first: entries with a longer client prefix, then
	 * those without one, so the first match decides.
	 */
	struct ms_entry entries[];
};

struct ms_slot {
	atomic64_t conns, packets, bytes;
	struct ms_key key;
	bool used;
};

#define MS_SESSION_BUCKETS 4096
#define MS_USER_BUCKETS 1024

/* A session's connection as conntrack has it in the original direction:
 * the client's address and port, and the address and port it connected
 * to (ports in network order).
 */
struct ms_skey {
	u8 family;			/* NFPROTO_IPV4, NFPROTO_IPV6 */
	__be16 cport, lport;
	union nf_inet_addr caddr, laddr;
};

/* A user with sessions in the map; goes with its last session. */
struct ms_user {
	struct hlist_node node;		/* in ms_net.ubuckets, ms_lock */
	struct rcu_head rcu;
	atomic64_t resets;
	unsigned int nsessions;		/* ms_lock */
	u8 state;			/* enum mailshift_user_state */
	u8 len;
	char name[];
};

struct ms_session {
	struct hlist_node node;		/* in ms_net.sbuckets, RCU */
	struct rcu_head rcu;
	struct ms_skey key;
	struct ms_user *user;
	u8 server;			/* MAILSHIFT_SOURCE, _DESTINATION */
	unsigned long added;		/* jiffies */
	atomic64_t packets, resets;
};

struct ms_net {
	struct ms_table __rcu *table;
	struct ms_slot *slots;		/* MS_MAX_SLOTS, from the first SET */
	atomic64_t rejected;
	u32 generation;			/* changes with every SET and DEL */
	bool hooked;
	/* The session map: from the first SET, until the namespace goes. */
	struct hlist_head *sbuckets, *ubuckets;
	unsigned int nsessions;
	u32 sgeneration;		/* changes with every session change */
	struct delayed_work gc;
	struct net *net;
};

extern unsigned int ms_net_id;
extern struct mutex ms_lock;

struct ms_net *ms_net(struct net *net);
int ms_table_replace(struct net *net, struct ms_table *t,
		     struct netlink_ext_ack *extack);
void ms_table_delete(struct net *net);
bool ms_key_eq(const struct ms_key *a, const struct ms_key *b);

unsigned int ms_sessions_max(void);
int ms_sessions_init(struct ms_net *mn);
void ms_sessions_seed(void);
void ms_sessions_net_init(struct ms_net *mn, struct net *net);
void ms_sessions_net_stop(struct ms_net *mn);
void ms_sessions_net_free(struct ms_net *mn);
int ms_session_add(struct ms_net *mn, const struct ms_skey *k,
		   const char *name, unsigned int len, u8 server, int state,
		   struct netlink_ext_ack *extack);
int ms_session_del(struct ms_net *mn, const struct ms_skey *k,
		   struct netlink_ext_ack *extack);
void ms_sessions_flush(struct ms_net *mn);
struct ms_user *ms_user_find(struct ms_net *mn, const char *name,
			     unsigned int len);
struct ms_session *ms_session_find(struct ms_net *mn, const struct nf_conn *ct);
bool ms_session_stale(const struct ms_session *s);

int ms_hooks_register(struct net *net);
void ms_hooks_unregister(struct net *net);

int ms_genl_init(void);
void ms_genl_uninit(void);

#endif /* _MAILSHIFT_H */
