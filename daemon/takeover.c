/* Address takeover, the kernel side: [takeover] of mailshift.conf, the
 * checks against the host made before anything changes, the service
 * address added and deleted with libnl-route-3, its announcement (a
 * gratuitous ARP on an AF_PACKET socket, an unsolicited neighbour
 * advertisement on a raw ICMPv6 socket), and the table
 * "inet mailshift_takeover". The mail ports and the forwarding of the
 * other ports are the steering table's (steer.c): the VIP is one of its
 * service addresses and the old server's new address its source, so they
 * are decided, counted and shown like any steered address. The takeover
 * table adds what a forwarded connection needs for its replies to come
 * back through this host (masquerade), and records what was done so that
 * giveback can undo exactly that. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <net/ethernet.h>
#include <net/if_arp.h>
#include <netpacket/packet.h>
#include <netinet/icmp6.h>
#include <netinet/in.h>
#include <nftables/libnftables.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>

#include "config.h"
#include "takeover.h"

void ms_takeover_defaults(struct ms_takeover_cfg *t)
{
	memset(t, 0, sizeof(*t));
	t->masquerade = 1;
}

int ms_takeover_key(struct ms_takeover_cfg *t, const char *key,
		    const char *v, char *err, size_t errsz)
{
	t->present = 1;
	if (!strcmp(key, "address"))
		return ms_steer_addr_parse(v, 0, &t->vip, err, errsz);
	if (!strcmp(key, "source_address"))
		return ms_steer_addr_parse(v, 0, &t->source, err, errsz);
	if (!strcmp(key, "device")) {
		if (*v == '\0' || strlen(v) >= sizeof(t->dev) ||
		    strchr(v, '/') != NULL) {
			snprintf(err, errsz, "device: an interface name (at "
				 "most %zu characters)", sizeof(t->dev) - 1);
			return -1;
		}
		snprintf(t->dev, sizeof(t->dev), "%s", v);
		return 0;
	}
	if (!strcmp(key, "masquerade"))
		return ms_config_bool(&t->masquerade, key, v, err, errsz);
	snprintf(err, errsz, "unknown key \"%s\" in [takeover]", key);
	return -1;
}

int ms_takeover_check(const struct ms_takeover_cfg *t, char *err,
		      size_t errsz)
{
	if (t->vip.family == 0 || t->dev[0] == '\0' ||
	    t->source.family == 0) {
		snprintf(err, errsz, "a takeover needs the service address "
			 "(--vip), the device (--dev) and the old server's "
			 "new address (--source-addr), or [takeover] "
			 "address, device and source_address");
		return -1;
	}
	if (t->vip.family != t->source.family) {
		snprintf(err, errsz, "the service address %s and the old "
			 "server's new address %s are not of one family",
			 t->vip.text, t->source.text);
		return -1;
	}
	if (!memcmp(t->vip.a, t->source.a, 16)) {
		snprintf(err, errsz, "the old server's new address is the "
			 "service address %s: renumber the old server first "
			 "and give its new address", t->vip.text);
		return -1;
	}
	return 0;
}

int ms_takeover_steer(const struct ms_takeover_cfg *t,
		      struct ms_steer_cfg *s, char *err, size_t errsz)
{
	int v6 = t->vip.family == AF_INET6;
	unsigned int i;

	for (i = 0; i < s->naddrs; i++)
		if (!memcmp(&s->addrs[i].a, t->vip.a, 16) &&
		    s->addrs[i].family == t->vip.family)
			break;
	if (i == s->naddrs) {
		if (s->naddrs == MS_STEER_MAX_ADDRS) {
			snprintf(err, errsz, "[steer] has too many addresses");
			return -1;
		}
		s->addrs[s->naddrs++] = t->vip;
	}
	if (s->src[v6].family != 0 && memcmp(s->src[v6].a, t->source.a, 16)) {
		snprintf(err, errsz, "[steer] source is %s, but the old "
			 "server's new address is %s: make them one",
			 s->src[v6].text, t->source.text);
		return -1;
	}
	s->src[v6] = t->source;
	s->present = 1;
	return ms_steer_check(s, err, errsz);
}

/* ---------------------------------------------------------- the host */

/* A number from /proc/sys (0 when unreadable). */
static int sysctl_int(const char *path)
{
	char buf[16] = "";
	FILE *f = fopen(path, "re");

	if (f == NULL)
		return 0;
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	fclose(f);
	return atoi(buf);
}

/* The host address is a /32 of its own: with arp_ignore 2 or more (the
 * larger of "all" and the device's counts) the kernel would not answer
 * ARP requests for it from the clients' subnet. */
static int answers_arp(const struct ms_takeover_cfg *t, char *err,
		       size_t errsz)
{
	char path[128];
	int all, dev;

	if (t->vip.family != AF_INET)
		return 0;
	all = sysctl_int("/proc/sys/net/ipv4/conf/all/arp_ignore");
	snprintf(path, sizeof(path), "/proc/sys/net/ipv4/conf/%s/arp_ignore",
		 t->dev);
	dev = sysctl_int(path);
	if (all < 2 && dev < 2)
		return 0;
	snprintf(err, errsz, "arp_ignore is %d (net.ipv4.conf.all and .%s): "
		 "the host would not answer ARP for %s/32; set it to 0 or 1",
		 all > dev ? all : dev, t->dev, t->vip.text);
	return -1;
}

static int forwarding(const struct ms_takeover_cfg *t, char *err,
		      size_t errsz)
{
	char path[128];

	if (t->vip.family == AF_INET)
		snprintf(path, sizeof(path),
			 "/proc/sys/net/ipv4/conf/%s/forwarding", t->dev);
	else
		snprintf(path, sizeof(path),
			 "/proc/sys/net/ipv6/conf/all/forwarding");
	if (sysctl_int(path) != 0)
		return 0;
	snprintf(err, errsz, "forwarding is off (%s is 0): the service "
		 "address's other ports are forwarded to the old server; "
		 "turn it on (sysctl) first", path + strlen("/proc/sys/"));
	return -1;
}

/* Where (which device) addr is an address of the host; 0 when nowhere. */
static int addr_where(struct nl_cache *addrs, const struct ms_steer_addr *a)
{
	for (struct rtnl_addr *x = (void *)nl_cache_get_first(addrs);
	     x != NULL; x = (void *)nl_cache_get_next((void *)x)) {
		struct nl_addr *l = rtnl_addr_get_local(x);

		if (l != NULL && nl_addr_get_family(l) == a->family &&
		    !memcmp(nl_addr_get_binary_addr(l), a->a,
			    a->family == AF_INET ? 4 : 16))
			return rtnl_addr_get_ifindex(x);
	}
	return 0;
}

static int link_check(struct nl_sock *sk, const struct ms_takeover_cfg *t,
		      unsigned char mac[6], int *ifindex, char *err,
		      size_t errsz)
{
	struct rtnl_link *link = NULL;
	struct nl_addr *ll;
	int ret = -1;

	if (rtnl_link_get_kernel(sk, 0, t->dev, &link) < 0) {
		snprintf(err, errsz, "device %s does not exist", t->dev);
		return -1;
	}
	ll = rtnl_link_get_addr(link);
	*ifindex = rtnl_link_get_ifindex(link);
	if (!(rtnl_link_get_flags(link) & IFF_UP))
		snprintf(err, errsz, "device %s is down", t->dev);
	else if (rtnl_link_get_arptype(link) != ARPHRD_ETHER || ll == NULL ||
		 nl_addr_get_len(ll) != 6)
		snprintf(err, errsz, "device %s has no Ethernet address to "
			 "announce the service address with", t->dev);
	else {
		memcpy(mac, nl_addr_get_binary_addr(ll), 6);
		ret = 0;
	}
	rtnl_link_put(link);
	return ret;
}

int ms_takeover_host_check(const struct ms_takeover_cfg *t,
			   unsigned char mac[6], int *ifindex, char *err,
			   size_t errsz)
{
	struct nl_sock *sk = nl_socket_alloc();
	struct nl_cache *addrs = NULL;
	char name[IF_NAMESIZE] = "?";
	int ret = -1, where, e;

	if (sk == NULL || (e = nl_connect(sk, NETLINK_ROUTE)) < 0 ||
	    (e = rtnl_addr_alloc_cache(sk, &addrs)) < 0) {
		snprintf(err, errsz, "rtnetlink: cannot read the addresses: %s",
			 sk == NULL ? "out of memory" : nl_geterror(e));
		goto out;
	}
	if (link_check(sk, t, mac, ifindex, err, errsz) < 0)
		goto out;
	if ((where = addr_where(addrs, &t->vip)) != 0) {
		if_indextoname(where, name);
		snprintf(err, errsz, "%s is already an address of this host "
			 "(device %s): is it still the old server's, or taken "
			 "over already?", t->vip.text, name);
		goto out;
	}
	if ((where = addr_where(addrs, &t->source)) != 0) {
		if_indextoname(where, name);
		snprintf(err, errsz, "the old server's new address %s is an "
			 "address of this host (device %s)", t->source.text,
			 name);
		goto out;
	}
	ret = forwarding(t, err, errsz) < 0 ? -1 : answers_arp(t, err, errsz);
out:
	if (addrs != NULL)
		nl_cache_free(addrs);
	nl_socket_free(sk);
	return ret;
}

int ms_takeover_addr(int add, const struct ms_steer_addr *vip, int ifindex,
		     char *err, size_t errsz)
{
	struct nl_sock *sk = nl_socket_alloc();
	struct rtnl_addr *a = rtnl_addr_alloc();
	unsigned int len = vip->family == AF_INET ? 32 : 128;
	struct nl_addr *local = nl_addr_build(vip->family, vip->a, len / 8);
	int e = -NLE_NOMEM;

	if (sk != NULL && a != NULL && local != NULL &&
	    (e = nl_connect(sk, NETLINK_ROUTE)) == 0) {
		nl_addr_set_prefixlen(local, len);
		rtnl_addr_set_ifindex(a, ifindex);
		rtnl_addr_set_family(a, vip->family);
		rtnl_addr_set_local(a, local);
		rtnl_addr_set_prefixlen(a, len);
		/* Usable at once: the announcement is the news. And
		 * deprecated (preferred lifetime 0): it answers for itself,
		 * but the host's own connections (masquerade too) keep
		 * leaving from its own address. */
		if (vip->family == AF_INET6) {
			rtnl_addr_set_flags(a, IFA_F_NODAD);
			rtnl_addr_set_valid_lifetime(a, 0xffffffff);
			rtnl_addr_set_preferred_lifetime(a, 0);
		}
		e = add ? rtnl_addr_add(sk, a, NLM_F_EXCL) :
			  rtnl_addr_delete(sk, a, 0);
		/* Deleting what someone already deleted is no error. */
		if (!add && e == -NLE_NOADDR)
			e = 0;
	}
	if (e < 0)
		snprintf(err, errsz, "rtnetlink: cannot %s address %s/%u: %s",
			 add ? "add" : "delete", vip->text, len,
			 nl_geterror(e));
	nl_addr_put(local);
	rtnl_addr_put(a);
	nl_socket_free(sk);
	return e < 0 ? -1 : 0;
}

/* A request and a reply, both "VIP is at mac" to everyone: hosts update
 * an entry they have on either (a request is what most of them heed). */
static int garp(const struct ms_steer_addr *vip, int ifindex,
		const unsigned char mac[6], char *err, size_t errsz)
{
	struct sockaddr_ll to = {
		.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ARP),
		.sll_ifindex = ifindex, .sll_halen = 6,
		.sll_addr = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff },
	};
	unsigned char pkt[28];
	struct arphdr *h = (struct arphdr *)pkt;
	int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, htons(ETH_P_ARP));
	int ret = 0;

	if (fd < 0) {
		snprintf(err, errsz, "AF_PACKET socket: %s", strerror(errno));
		return -1;
	}
	h->ar_hrd = htons(ARPHRD_ETHER);
	h->ar_pro = htons(ETH_P_IP);
	h->ar_hln = 6;
	h->ar_pln = 4;
	memcpy(pkt + 8, mac, 6);		/* sender: us, the VIP */
	memcpy(pkt + 14, vip->a, 4);
	memcpy(pkt + 24, vip->a, 4);		/* target: the VIP */
	for (int op = ARPOP_REQUEST; op <= ARPOP_REPLY && ret == 0; op++) {
		h->ar_op = htons(op);
		/* A request's target hardware address is unknown (zero); a
		 * gratuitous reply names the sender again. */
		memset(pkt + 18, 0, 6);
		if (op == ARPOP_REPLY)
			memcpy(pkt + 18, mac, 6);
		if (sendto(fd, pkt, sizeof(pkt), 0, (struct sockaddr *)&to,
			   sizeof(to)) != sizeof(pkt)) {
			snprintf(err, errsz, "gratuitous ARP for %s: %s",
				 vip->text, strerror(errno));
			ret = -1;
		}
	}
	close(fd);
	return ret;
}

/* To all nodes, from the VIP, override set, not solicited: neighbours
 * replace the link-layer address they have for it (RFC 4861 7.2.6). */
static int unsolicited_na(const struct ms_steer_addr *vip, int ifindex,
			  const unsigned char mac[6], char *err,
			  size_t errsz)
{
	struct {
		struct nd_neighbor_advert na;
		struct nd_opt_hdr opt;
		unsigned char ll[6];
	} __attribute__((packed)) m = {
		.na.nd_na_type = ND_NEIGHBOR_ADVERT,
		.na.nd_na_flags_reserved = ND_NA_FLAG_OVERRIDE,
		.opt = { .nd_opt_type = ND_OPT_TARGET_LINKADDR, .nd_opt_len = 1 },
	};
	struct sockaddr_in6 from = { .sin6_family = AF_INET6 };
	struct sockaddr_in6 to = { .sin6_family = AF_INET6,
				   .sin6_scope_id = (uint32_t)ifindex };
	int fd = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMPV6);
	int hops = 255, ret = -1;

	memcpy(&m.na.nd_na_target, vip->a, 16);
	memcpy(m.ll, mac, 6);
	memcpy(&from.sin6_addr, vip->a, 16);
	inet_pton(AF_INET6, "ff02::1", &to.sin6_addr);
	/* The kernel fills in the checksum of an ICMPv6 raw socket; a
	 * neighbour accepts neighbour discovery only with hop limit 255. */
	if (fd >= 0 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_HOPS, &hops,
		       sizeof(hops)) == 0 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_IF, &ifindex,
		       sizeof(ifindex)) == 0 &&
	    bind(fd, (struct sockaddr *)&from, sizeof(from)) == 0 &&
	    sendto(fd, &m, sizeof(m), 0, (struct sockaddr *)&to,
		   sizeof(to)) == sizeof(m))
		ret = 0;
	else
		snprintf(err, errsz, "unsolicited neighbour advertisement "
			 "for %s: %s", vip->text, strerror(errno));
	if (fd >= 0)
		close(fd);
	return ret;
}

/* Three times, 100 ms apart: one lost frame must not leave a neighbour
 * sending to the old server's MAC until its entry expires (RFC 4861 allows
 * up to three unsolicited advertisements). */
int ms_takeover_announce(const struct ms_steer_addr *vip, int ifindex,
			 const unsigned char mac[6], char *err, size_t errsz)
{
	struct timespec pause = { 0, 100 * 1000 * 1000 };

	for (int i = 0; i < 3; i++) {
		if (i > 0)
			nanosleep(&pause, NULL);
		if ((vip->family == AF_INET ? garp(vip, ifindex, mac, err,
						    errsz) :
		     unsolicited_na(vip, ifindex, mac, err, errsz)) < 0)
			return -1;
	}
	return 0;
}

/* ------------------------------------------------------------ the table */

#define RECORD "mailshift takeover vip %s dev %s source %s steer %d"

char *ms_takeover_ruleset(const struct ms_takeover_cfg *t, uint32_t mark,
			  int steer_before)
{
	const char *ip = t->vip.family == AF_INET ? "ip" : "ip6";
	char *text = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	if (f == NULL)
		return NULL;
	/* The connections the steering table sent to a server by DNAT
	 * (actions source and destination): without masquerade the
	 * server would answer the client directly, from its own address,
	 * and the client would drop the answer. */
	fprintf(f, "table inet %s\ndelete table inet %s\n"
		"table inet %s {\n\tchain postrouting {\n"
		"\t\ttype nat hook postrouting priority srcnat; "
		"policy accept;\n"
		"\t\tct original %s daddr %s ct mark { 0x%08x, 0x%08x } "
		"counter%s comment \"" RECORD "\"\n\t}\n",
		MS_TAKEOVER_TABLE, MS_TAKEOVER_TABLE, MS_TAKEOVER_TABLE,
		ip, t->vip.text, mark | MS_STEER_SOURCE,
		mark | MS_STEER_DESTINATION,
		t->masquerade ? " masquerade" : "", t->vip.text, t->dev,
		t->source.text, steer_before);
	fputs("}\n", f);
	if (fclose(f) != 0) {
		free(text);
		return NULL;
	}
	return text;
}

static int parse_record(const char *c, struct ms_takeover_state *st,
			char *err, size_t errsz)
{
	char vip[64], dev[IFNAMSIZ], src[64];

	if (sscanf(c, "mailshift takeover vip %63s dev %15s source %63s "
		   "steer %d", vip, dev, src, &st->steer_before) != 4 ||
	    ms_steer_addr_parse(vip, 0, &st->vip, err, errsz) < 0 ||
	    ms_steer_addr_parse(src, 0, &st->source, err, errsz) < 0) {
		snprintf(err, errsz, "table inet %s has a record mailshift "
			 "cannot read: \"%.200s\"", MS_TAKEOVER_TABLE, c);
		return -1;
	}
	snprintf(st->dev, sizeof(st->dev), "%s", dev);
	st->installed = 1;
	return 0;
}

int ms_takeover_read(struct ms_takeover_state *st, char *err, size_t errsz)
{
	struct nft_ctx *nft = nft_ctx_new(NFT_CTX_DEFAULT);
	json_t *all = NULL, *item;
	size_t i;
	int ret = -1, table = 0;

	memset(st, 0, sizeof(*st));
	if (nft == NULL || nft_ctx_buffer_output(nft) < 0 ||
	    nft_ctx_buffer_error(nft) < 0) {
		snprintf(err, errsz, "libnftables: out of memory");
		goto out;
	}
	nft_ctx_output_set_flags(nft, NFT_CTX_OUTPUT_JSON);
	if (nft_run_cmd_from_buffer(nft, "list tables") != 0 ||
	    (all = json_loads(nft_ctx_get_output_buffer(nft), 0,
			      NULL)) == NULL) {
		snprintf(err, errsz, "nftables: cannot list the tables");
		goto out;
	}
	json_array_foreach(json_object_get(all, "nftables"), i, item) {
		json_t *t = json_object_get(item, "table");

		table |= t != NULL && !strcmp(json_string_value(
			json_object_get(t, "name")) ?: "", MS_TAKEOVER_TABLE) &&
			 !strcmp(json_string_value(json_object_get(t,
				"family")) ?: "", "inet");
	}
	json_decref(all);
	all = NULL;
	ret = 0;
	if (!table)
		goto out;
	ret = -1;
	if (nft_run_cmd_from_buffer(nft, "list table inet "
				    MS_TAKEOVER_TABLE) != 0 ||
	    (all = json_loads(nft_ctx_get_output_buffer(nft), 0,
			      NULL)) == NULL) {
		snprintf(err, errsz, "nftables: cannot list table inet %s",
			 MS_TAKEOVER_TABLE);
		goto out;
	}
	json_array_foreach(json_object_get(all, "nftables"), i, item) {
		const char *c = json_string_value(json_object_get(
			json_object_get(item, "rule"), "comment"));

		if (c != NULL && !strncmp(c, "mailshift takeover ", 19)) {
			ret = parse_record(c, st, err, errsz);
			goto out;
		}
	}
	snprintf(err, errsz, "table inet %s has no takeover record; delete "
		 "it by hand (nft delete table inet %s)", MS_TAKEOVER_TABLE,
		 MS_TAKEOVER_TABLE);
out:
	json_decref(all);
	if (nft != NULL)
		nft_ctx_free(nft);
	return ret;
}
