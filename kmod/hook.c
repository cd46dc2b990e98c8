// SPDX-License-Identifier: GPL-2.0
/*
 * The packet path: a PRE_ROUTING hook per family that decides a new
 * connection from the steering table (kept in its conntrack mark, so a
 * later table never moves it), counts, and hands connections to proxy to
 * the local transparent listener with the kernel's TPROXY helpers; and a
 * function in the NAT core that translates connections steered to the
 * source or the destination, so their replies come back translated. The
 * same hook enforces the session map (session.c).
 */
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/inetdevice.h>
#include <net/ip.h>
#include <net/ipv6.h>
#include <net/netfilter/ipv4/nf_reject.h>
#include <net/netfilter/ipv6/nf_reject.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_ecache.h>
#include <net/netfilter/nf_conntrack_labels.h>
#include <net/netfilter/nf_nat.h>
#include <net/netfilter/nf_tproxy.h>

#include "mailshift.h"

/* What the hook needs of a TCP or UDP packet. */
struct ms_pkt {
	u8 pf, proto;
	bool syn;			/* a connection's first TCP segment */
	int thoff;
	__be16 sport, dport;
	union nf_inet_addr saddr, daddr;
};

static int parse_ports(struct sk_buff *skb, struct ms_pkt *p)
{
	struct tcphdr _th;
	const struct tcphdr *th;
	struct udphdr _uh;
	const struct udphdr *uh;

	if (p->proto == IPPROTO_TCP) {
		th = skb_header_pointer(skb, p->thoff, sizeof(_th), &_th);
		if (!th)
			return -EINVAL;
		p->sport = th->source;
		p->dport = th->dest;
		p->syn = th->syn && !th->ack && !th->fin && !th->rst;
		return 0;
	}
	if (p->proto == IPPROTO_UDP) {
		uh = skb_header_pointer(skb, p->thoff, sizeof(_uh), &_uh);
		if (!uh)
			return -EINVAL;
		p->sport = uh->source;
		p->dport = uh->dest;
		return 0;
	}
	return -EPROTONOSUPPORT;
}

/* Conntrack has reassembled fragments before us (its defrag hooks run
 * first): a fragment here is one it could not, and is left alone.
 */
static int parse(struct sk_buff *skb, u8 pf, struct ms_pkt *p)
{
	unsigned short frag_off = 0;
	int proto, thoff = 0;

	memset(p, 0, sizeof(*p));
	p->pf = pf;
	if (pf == NFPROTO_IPV4) {
		const struct iphdr *iph = ip_hdr(skb);

		if (ip_is_fragment(iph))
			return -EINVAL;
		p->proto = iph->protocol;
		p->thoff = ip_hdrlen(skb);
		p->saddr.ip = iph->saddr;
		p->daddr.ip = iph->daddr;
	} else {
		proto = ipv6_find_hdr(skb, &thoff, -1, &frag_off, NULL);
		if (proto < 0 || frag_off)
			return -EINVAL;
		p->proto = proto;
		p->thoff = thoff;
		p->saddr.in6 = ipv6_hdr(skb)->saddr;
		p->daddr.in6 = ipv6_hdr(skb)->daddr;
	}
	return parse_ports(skb, p);
}

static struct sock *sk_lookup(struct net *net, struct sk_buff *skb,
			      const struct ms_pkt *p,
			      const union nf_inet_addr *daddr, __be16 dport,
			      enum nf_tproxy_lookup_t type)
{
	if (p->pf == NFPROTO_IPV4)
		return nf_tproxy_get_sock_v4(net, skb, p->proto, p->saddr.ip,
					     daddr->ip, p->sport, dport,
					     skb->dev, type);
	return nf_tproxy_get_sock_v6(net, skb, p->thoff, p->proto,
				     &p->saddr.in6, &daddr->in6, p->sport,
				     dport, skb->dev, type);
}

static const struct ms_port *mail_port(const struct ms_table *t, u16 port)
{
	unsigned int i;

	for (i = 0; i < t->nports; i++)
		if (t->ports[i].port == port)
			return &t->ports[i];
	return NULL;
}

static bool in_prefix(const struct ms_pkt *p, const struct ms_key *k)
{
	if (p->pf == NFPROTO_IPV4)
		return !((p->saddr.ip ^ k->prefix.ip) & inet_make_mask(k->plen));
	return ipv6_prefix_equal(&p->saddr.in6, &k->prefix.in6, k->plen);
}

/* The first entry that matches: the table is sorted most specific first.
 * A mail port's entry takes a TCP SYN; an "other ports" entry takes the
 * first packet of any TCP or UDP connection to another port.
 */
static const struct ms_entry *lookup(const struct ms_table *t,
				     const struct ms_pkt *p)
{
	bool mail = mail_port(t, ntohs(p->dport));
	const struct ms_entry *e;
	unsigned int i;

	for (i = 0; i < t->nentries; i++) {
		e = &t->entries[i];
		if (e->key.family != p->pf ||
		    !nf_inet_addr_cmp(&e->key.addr, &p->daddr))
			continue;
		if (e->key.port && (p->proto != IPPROTO_TCP || !p->syn ||
				    e->key.port != ntohs(p->dport)))
			continue;
		if (!e->key.port && mail)
			continue;
		if (e->key.plen && !in_prefix(p, &e->key))
			continue;
		return e;
	}
	return NULL;
}

static void decide(struct ms_net *mn, const struct ms_table *t,
		   struct nf_conn *ct, const struct ms_pkt *p)
{
	u32 data[MS_LABEL_WORD + 1] = { 0 }, mask[MS_LABEL_WORD + 1] = { 0 };
	const struct ms_entry *e = lookup(t, p);

	if (!e)
		return;
	WRITE_ONCE(ct->mark, t->mark | e->action);
	nf_conntrack_event_cache(IPCT_MARK, ct);
	data[MS_LABEL_WORD] = e->slot + 1;
	mask[MS_LABEL_WORD] = ~0U;
	nf_connlabels_replace(ct, data, mask, ARRAY_SIZE(data));
	if (!nf_ct_is_confirmed(ct))
		atomic64_inc(&mn->slots[e->slot].conns);
}

static void count(struct ms_net *mn, const struct nf_conn *ct,
		  const struct sk_buff *skb)
{
	struct nf_conn_labels *labels = nf_ct_labels_find(ct);
	struct ms_slot *s;
	u32 slot;

	if (!labels)
		return;
	slot = ((const u32 *)labels->bits)[MS_LABEL_WORD];
	if (!slot || slot > MS_MAX_SLOTS)
		return;
	s = &mn->slots[slot - 1];
	atomic64_inc(&s->packets);
	atomic64_add(skb->len, &s->bytes);
}

/* nft's "reject with tcp reset": the sender is told at once. */
static unsigned int send_reset(struct sk_buff *skb,
			       const struct nf_hook_state *state)
{
	if (state->pf == NFPROTO_IPV4)
		nf_send_reset(state->net, state->sk, skb, state->hook);
	else
		nf_send_reset6(state->net, state->sk, skb, state->hook);
	return NF_DROP;
}

/* Fail closed: a connection to proxy that finds no transparent socket is
 * reset, never routed on to the old server.
 */
static unsigned int reject(struct ms_net *mn, struct sk_buff *skb,
			   const struct nf_hook_state *state)
{
	atomic64_inc(&mn->rejected);
	return send_reset(skb, state);
}

/* A packet of a session in the map: counted, and reset when its user's
 * mail has left the server the session goes to (a stale session must not
 * write to the old server after the flip). Checked before anything else,
 * so the proxy's own connections are caught too.
 */
static bool stale_session(struct ms_net *mn, const struct nf_conn *ct)
{
	struct ms_session *s = ms_session_find(mn, ct);

	if (!s)
		return false;
	atomic64_inc(&s->packets);
	if (!ms_session_stale(s))
		return false;
	atomic64_inc(&s->resets);
	atomic64_inc(&s->user->resets);
	return true;
}

/* What nft's "tproxy to :PORT" does, and xt TPROXY's failure: the listener
 * for the port on the address the packet came in on (TIME_WAIT handled as
 * TCP would), or a reset. Consumes tw.
 */
static unsigned int tproxy(struct ms_net *mn, const struct ms_table *t,
			   struct sk_buff *skb,
			   const struct nf_hook_state *state,
			   const struct ms_pkt *p, struct sock *tw)
{
	const struct ms_port *port = mail_port(t, ntohs(p->dport));
	union nf_inet_addr laddr = { };
	struct sock *sk = NULL;
	__be16 lport;

	if (!port || !port->listener) {
		if (tw)
			sock_gen_put(tw);
		return reject(mn, skb, state);
	}
	lport = htons(port->listener);
	if (p->pf == NFPROTO_IPV4)
		laddr.ip = nf_tproxy_laddr4(skb, 0, p->daddr.ip);
	else
		laddr.in6 = *nf_tproxy_laddr6(skb, &in6addr_any,
					      &p->daddr.in6);
	if (tw && p->pf == NFPROTO_IPV4)
		sk = nf_tproxy_handle_time_wait4(state->net, skb, laddr.ip,
						 lport, tw);
	else if (tw)
		sk = nf_tproxy_handle_time_wait6(skb, p->proto, p->thoff,
						 state->net, &laddr.in6, lport,
						 tw);
	else
		sk = sk_lookup(state->net, skb, p, &laddr, lport,
			       NF_TPROXY_LOOKUP_LISTENER);
	if (!sk || !nf_tproxy_sk_is_transparent(sk))
		return reject(mn, skb, state);
	nf_tproxy_assign_sock(skb, sk);
	skb->mark = t->route_mark;
	return NF_ACCEPT;
}

static unsigned int ms_hook(void *priv, struct sk_buff *skb,
			    const struct nf_hook_state *state)
{
	struct ms_net *mn = ms_net(state->net);
	const struct ms_table *t = rcu_dereference(mn->table);
	enum ip_conntrack_info ctinfo;
	struct sock *sk = NULL;
	struct nf_conn *ct;
	struct ms_pkt p;

	if (!t || parse(skb, state->pf, &p) < 0)
		return NF_ACCEPT;
	ct = nf_ct_get(skb, &ctinfo);
	if (ct && p.proto == IPPROTO_TCP && stale_session(mn, ct))
		return send_reset(skb, state);
	/* A packet of a transparent socket's connection (a proxied client,
	 * or a server answering the gateway's upstream connection made from
	 * the client's address) is delivered locally.
	 */
	if (p.proto == IPPROTO_TCP)
		sk = sk_lookup(state->net, skb, &p, &p.daddr, p.dport,
			       NF_TPROXY_LOOKUP_ESTABLISHED);
	if (sk && sk->sk_state != TCP_TIME_WAIT) {
		bool transparent = inet_sk_transparent(sk);

		sock_gen_put(sk);
		sk = NULL;
		if (transparent) {
			if (ct)
				count(mn, ct, skb);
			skb->mark = t->route_mark;
			return NF_ACCEPT;
		}
	}
	if (!ct)
		goto out;
	if (ctinfo == IP_CT_NEW)
		decide(mn, t, ct, &p);
	count(mn, ct, skb);
	if (CTINFO2DIR(ctinfo) == IP_CT_DIR_ORIGINAL &&
	    p.proto == IPPROTO_TCP &&
	    READ_ONCE(ct->mark) == (t->mark | MAILSHIFT_PROXY))
		return tproxy(mn, t, skb, state, &p, sk);
out:
	if (sk)
		sock_gen_put(sk);
	return NF_ACCEPT;
}

/* Called by the NAT core for a new connection it has no destination
 * binding for; a binding made here rewrites this connection's packets and
 * its replies for its whole life.
 */
static unsigned int ms_nat(void *priv, struct sk_buff *skb,
			   const struct nf_hook_state *state)
{
	const struct ms_table *t = rcu_dereference(ms_net(state->net)->table);
	struct nf_nat_range2 range = { .flags = NF_NAT_RANGE_MAP_IPS };
	int v6 = state->pf == NFPROTO_IPV6;
	enum ip_conntrack_info ctinfo;
	struct nf_conn *ct;
	u32 mark;

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || !t)
		return NF_ACCEPT;
	mark = READ_ONCE(ct->mark);
	if ((mark & ~0xffU) != t->mark)
		return NF_ACCEPT;
	switch (mark & 0xff) {
	case MAILSHIFT_DESTINATION:
		if (!t->has_dst[v6])
			return NF_ACCEPT;
		range.min_addr = t->dst[v6];
		break;
	case MAILSHIFT_SOURCE:
		/* Already on its way to the source: nothing to translate. */
		if (!t->has_src[v6] ||
		    nf_inet_addr_cmp(&t->src[v6],
				     &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.u3))
			return NF_ACCEPT;
		range.min_addr = t->src[v6];
		break;
	default:
		return NF_ACCEPT;
	}
	range.max_addr = range.min_addr;
	return nf_nat_setup_info(ct, &range, NF_NAT_MANIP_DST);
}

/* After conntrack (which gives the connection) and before the NAT core's
 * destination translation (which reads our decision).
 */
static const struct nf_hook_ops ms_nf_ops[] = {
	{
		.hook = ms_hook,
		.pf = NFPROTO_IPV4,
		.hooknum = NF_INET_PRE_ROUTING,
		.priority = NF_IP_PRI_MANGLE,
	},
	{
		.hook = ms_hook,
		.pf = NFPROTO_IPV6,
		.hooknum = NF_INET_PRE_ROUTING,
		.priority = NF_IP6_PRI_MANGLE,
	},
};

static const struct nf_hook_ops ms_nat_ops = {
	.hook = ms_nat,
	.pf = NFPROTO_INET,
	.hooknum = NF_INET_PRE_ROUTING,
	.priority = NF_IP_PRI_NAT_DST,
};

/* Conntrack (with defragmentation) and labels are turned on in a
 * namespace only while it has a table.
 */
int ms_hooks_register(struct net *net)
{
	int ret;

	ret = nf_ct_netns_get(net, NFPROTO_INET);
	if (ret)
		return ret;
	ret = nf_connlabels_get(net, MS_LABEL_BIT);
	if (ret)
		goto err_ct;
	ret = nf_register_net_hooks(net, ms_nf_ops, ARRAY_SIZE(ms_nf_ops));
	if (ret)
		goto err_labels;
	ret = nf_nat_inet_register_fn(net, &ms_nat_ops);
	if (ret)
		goto err_hooks;
	return 0;

err_hooks:
	nf_unregister_net_hooks(net, ms_nf_ops, ARRAY_SIZE(ms_nf_ops));
err_labels:
	nf_connlabels_put(net);
err_ct:
	nf_ct_netns_put(net, NFPROTO_INET);
	return ret;
}

void ms_hooks_unregister(struct net *net)
{
	nf_nat_inet_unregister_fn(net, &ms_nat_ops);
	nf_unregister_net_hooks(net, ms_nf_ops, ARRAY_SIZE(ms_nf_ops));
	nf_connlabels_put(net);
	nf_ct_netns_put(net, NFPROTO_INET);
}
