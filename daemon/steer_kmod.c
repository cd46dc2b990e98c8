/* The kmod steering backend: the same table as the nftables one, held by
 * the mailshift kernel module (kmod/, docs/kmod.md) and managed over its
 * generic netlink family with libnl-genl-3. kmod/uapi/mailshift.h is the
 * contract. The policy routing is the same as nft's (rtnl.c). Also the
 * module's session map: what mailshiftd writes into it (the only netlink
 * the gateway does) and what steer sessions reads. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/netlink.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/family.h>
#include <netlink/genl/genl.h>
#include <netlink/netlink.h>

#include "../kmod/uapi/mailshift.h"
#include "log.h"
#include "rtnl.h"
#include "steer.h"
#include "store.h"

/* Room for the largest table: about 60 bytes an entry. */
#define KMOD_MSG_SIZE	(MS_STEER_MAX_EXPANDED * 64 + 4096)
#define KMOD_DUMP_TRIES	5

struct kmod {
	struct nl_sock *sk;
	int family;
	int error;			/* the kernel's, negative */
	char msg[256];			/* its extended ack text */
};

/* Keeps the kernel's extended ack message: it names what was wrong. */
static int on_error(struct sockaddr_nl *who, struct nlmsgerr *e, void *arg)
{
	struct nlmsghdr *nlh = (struct nlmsghdr *)e - 1;
	struct nlattr *tb[NLMSGERR_ATTR_MAX + 1];
	int hlen = sizeof(*nlh) + sizeof(*e);
	struct kmod *k = arg;

	(void)who;
	k->error = e->error;
	if (!(nlh->nlmsg_flags & NLM_F_ACK_TLVS))
		return NL_STOP;
	if (!(nlh->nlmsg_flags & NLM_F_CAPPED))
		hlen += e->msg.nlmsg_len - sizeof(*nlh);
	if ((int)nlh->nlmsg_len <= hlen)
		return NL_STOP;
	if (nla_parse(tb, NLMSGERR_ATTR_MAX, (struct nlattr *)((char *)nlh +
		      hlen), nlh->nlmsg_len - hlen, NULL) == 0 &&
	    tb[NLMSGERR_ATTR_MSG] != NULL)
		snprintf(k->msg, sizeof(k->msg), "%.*s",
			 nla_len(tb[NLMSGERR_ATTR_MSG]),
			 (char *)nla_data(tb[NLMSGERR_ATTR_MSG]));
	return NL_STOP;
}

static void kmod_close(struct kmod *k)
{
	nl_socket_free(k->sk);
	k->sk = NULL;
}

/* A module of another interface version is refused, not misread. */
static int kmod_version(struct kmod *k, char *err, size_t errsz)
{
	struct nl_cache *cache = NULL;
	struct genl_family *f = NULL;
	int version = -1;

	if (genl_ctrl_alloc_cache(k->sk, &cache) == 0)
		f = genl_ctrl_search_by_name(cache, MAILSHIFT_GENL_NAME);
	if (f != NULL) {
		version = genl_family_get_version(f);
		genl_family_put(f);
	}
	nl_cache_free(cache);
	if (version == MAILSHIFT_GENL_VERSION)
		return 1;
	snprintf(err, errsz, "the mailshift kernel module speaks interface "
		 "version %d, this mailshiftctl version %d: load the module "
		 "built from the same source", version,
		 MAILSHIFT_GENL_VERSION);
	kmod_close(k);
	return -1;
}

/* 1 when the module's family is there, 0 when the module is not loaded,
 * -1 with err. */
static int kmod_open(struct kmod *k, char *err, size_t errsz)
{
	int one = 1;

	memset(k, 0, sizeof(*k));
	k->sk = nl_socket_alloc();
	if (k->sk == NULL || genl_connect(k->sk) < 0) {
		snprintf(err, errsz, "generic netlink: cannot open a socket");
		kmod_close(k);
		return -1;
	}
	setsockopt(nl_socket_get_fd(k->sk), SOL_NETLINK, NETLINK_EXT_ACK,
		   &one, sizeof(one));
	setsockopt(nl_socket_get_fd(k->sk), SOL_NETLINK, NETLINK_CAP_ACK,
		   &one, sizeof(one));
	nl_socket_modify_err_cb(k->sk, NL_CB_CUSTOM, on_error, k);
	k->family = genl_ctrl_resolve(k->sk, MAILSHIFT_GENL_NAME);
	if (k->family < 0) {
		kmod_close(k);
		return 0;
	}
	return kmod_version(k, err, errsz);
}

static int kmod_need(struct kmod *k, char *err, size_t errsz)
{
	int r = kmod_open(k, err, errsz);

	if (r == 0)
		snprintf(err, errsz, "the mailshift kernel module is not "
			 "loaded ([steer] backend = kmod; modprobe mailshift)");
	return r > 0 ? 0 : -1;
}

static void kmod_error(struct kmod *k, int nlerr, const char *what,
		       char *err, size_t errsz)
{
	int e = k->error ? -k->error : 0;

	snprintf(err, errsz, "mailshift module: %s: %s%s%s", what,
		 e ? strerror(e) : nl_geterror(nlerr), k->msg[0] ? ": " : "",
		 k->msg);
}

static struct nl_msg *kmod_msg(struct kmod *k, int cmd, int flags)
{
	struct nl_msg *m = nlmsg_alloc_size(KMOD_MSG_SIZE);

	if (m != NULL && genlmsg_put(m, NL_AUTO_PORT, NL_AUTO_SEQ, k->family,
				     0, flags, cmd,
				     MAILSHIFT_GENL_VERSION) == NULL) {
		nlmsg_free(m);
		return NULL;
	}
	return m;
}

/* ------------------------------------------------------------ writing */

static int put_addr(struct nl_msg *m, int type, const struct ms_steer_addr *a)
{
	return nla_put(m, type, a->family == AF_INET ? 4 : 16, a->a);
}

static int put_ports(struct nl_msg *m, const struct ms_steer_cfg *s)
{
	struct nlattr *list = nla_nest_start(m, MAILSHIFT_A_PORTS |
					     NLA_F_NESTED), *p;

	if (list == NULL)
		return -1;
	for (unsigned int i = 0; i < s->nports; i++) {
		p = nla_nest_start(m, (i + 1) | NLA_F_NESTED);
		if (p == NULL ||
		    nla_put_u16(m, MAILSHIFT_P_PORT, s->ports[i].port) < 0 ||
		    nla_put_u16(m, MAILSHIFT_P_LISTENER,
				s->ports[i].listener) < 0)
			return -1;
		nla_nest_end(m, p);
	}
	nla_nest_end(m, list);
	return 0;
}

static int put_entry(struct nl_msg *m, const struct ms_steer_entry *e,
		     unsigned int i)
{
	struct nlattr *n = nla_nest_start(m, (i + 1) | NLA_F_NESTED);

	if (n == NULL ||
	    nla_put_u8(m, MAILSHIFT_E_FAMILY, e->addr.family) < 0 ||
	    put_addr(m, MAILSHIFT_E_ADDR, &e->addr) < 0 ||
	    nla_put_u16(m, MAILSHIFT_E_PORT, e->port) < 0 ||
	    nla_put_u8(m, MAILSHIFT_E_ACTION, e->action) < 0 ||
	    (e->prefix.family &&
	     (put_addr(m, MAILSHIFT_E_PREFIX, &e->prefix) < 0 ||
	      nla_put_u8(m, MAILSHIFT_E_PREFIX_LEN, e->prefix.len) < 0)))
		return -1;
	nla_nest_end(m, n);
	return 0;
}

static int put_table(struct nl_msg *m, const struct ms_steer_cfg *s,
		     const struct ms_steer_entry *e, unsigned int n,
		     const struct ms_steer_route *rt)
{
	static const int src[2] = { MAILSHIFT_A_SOURCE4, MAILSHIFT_A_SOURCE6 };
	static const int dst[2] = { MAILSHIFT_A_DEST4, MAILSHIFT_A_DEST6 };
	struct nlattr *list;

	if (nla_put_u32(m, MAILSHIFT_A_MARK, s->mark) < 0 ||
	    nla_put_u32(m, MAILSHIFT_A_ROUTE_MARK, rt->mark) < 0 ||
	    nla_put_u32(m, MAILSHIFT_A_ROUTE_TABLE, rt->table) < 0 ||
	    nla_put_u32(m, MAILSHIFT_A_ROUTE_PRIORITY, rt->priority) < 0 ||
	    put_ports(m, s) < 0)
		return -1;
	for (int v6 = 0; v6 < 2; v6++) {
		if ((s->src[v6].family &&
		     put_addr(m, src[v6], &s->src[v6]) < 0) ||
		    (s->dst[v6].family &&
		     put_addr(m, dst[v6], &s->dst[v6]) < 0))
			return -1;
	}
	list = nla_nest_start(m, MAILSHIFT_A_ENTRIES | NLA_F_NESTED);
	if (list == NULL)
		return -1;
	for (unsigned int i = 0; i < n; i++)
		if (put_entry(m, &e[i], i) < 0)
			return -1;
	nla_nest_end(m, list);
	return 0;
}

static int kmod_do(struct kmod *k, struct nl_msg *m, const char *what,
		   char *err, size_t errsz)
{
	int r = nl_send_sync(k->sk, m);

	if (r < 0) {
		kmod_error(k, r, what, err, errsz);
		return -1;
	}
	return 0;
}

int ms_steer_kmod_set(const struct ms_steer_cfg *s,
		      const struct ms_steer_entry *e, unsigned int n,
		      const struct ms_steer_route *rt, char *err, size_t errsz)
{
	struct nl_msg *m;
	struct kmod k;
	int ret;

	if (kmod_need(&k, err, errsz) < 0)
		return -1;
	m = kmod_msg(&k, MAILSHIFT_CMD_SET_TABLE, 0);
	if (m == NULL || put_table(m, s, e, n, rt) < 0) {
		snprintf(err, errsz, "mailshift module: the table does not fit "
			 "in a message");
		nlmsg_free(m);
		kmod_close(&k);
		return -1;
	}
	ret = kmod_do(&k, m, "setting the table", err, errsz);
	kmod_close(&k);
	return ret;
}

int ms_steer_kmod_remove(char *err, size_t errsz)
{
	struct nl_msg *m;
	struct kmod k;
	int ret = kmod_open(&k, err, errsz);

	if (ret <= 0)
		return ret;
	m = kmod_msg(&k, MAILSHIFT_CMD_DEL_TABLE, 0);
	ret = m == NULL ? -1 : kmod_do(&k, m, "removing the table", err,
				       errsz);
	if (m == NULL)
		snprintf(err, errsz, "out of memory");
	kmod_close(&k);
	return ret;
}

/* ------------------------------------------------------------ reading */

static void addr_of(struct ms_steer_addr *a, int family, const void *bytes,
		    unsigned int len)
{
	char text[64];

	a->family = family;
	memcpy(a->a, bytes, family == AF_INET ? 4 : 16);
	inet_ntop(family, a->a, text, sizeof(text));
	a->len = len;
	if (len == (family == AF_INET ? 32u : 128u))
		snprintf(a->text, sizeof(a->text), "%s", text);
	else
		snprintf(a->text, sizeof(a->text), "%s/%u", text, len);
}

static json_int_t u64_of(struct nlattr *a)
{
	return a != NULL ? (json_int_t)nla_get_u64(a) : 0;
}

static void read_entry(json_t *state, struct nlattr *nest)
{
	struct nlattr *tb[MAILSHIFT_E_MAX + 1];
	struct ms_steer_entry e = { 0 };
	char text[200], name[128];
	int family;

	if (nla_parse_nested(tb, MAILSHIFT_E_MAX, nest, NULL) < 0 ||
	    tb[MAILSHIFT_E_FAMILY] == NULL || tb[MAILSHIFT_E_ADDR] == NULL ||
	    tb[MAILSHIFT_E_PORT] == NULL || tb[MAILSHIFT_E_ACTION] == NULL)
		return;
	family = nla_get_u8(tb[MAILSHIFT_E_FAMILY]);
	if (family != AF_INET && family != AF_INET6)
		return;
	addr_of(&e.addr, family, nla_data(tb[MAILSHIFT_E_ADDR]),
		family == AF_INET ? 32 : 128);
	if (tb[MAILSHIFT_E_PREFIX] != NULL && tb[MAILSHIFT_E_PREFIX_LEN])
		addr_of(&e.prefix, family, nla_data(tb[MAILSHIFT_E_PREFIX]),
			nla_get_u8(tb[MAILSHIFT_E_PREFIX_LEN]));
	e.port = nla_get_u16(tb[MAILSHIFT_E_PORT]);
	e.action = nla_get_u8(tb[MAILSHIFT_E_ACTION]);
	ms_steer_entry_text(&e, text, sizeof(text));
	ms_steer_counter_name(&e, name, sizeof(name));
	json_array_append_new(json_object_get(state, "entries"),
			      json_string(text));
	json_object_set_new(json_object_get(state, "counters"), name,
		json_pack("{s:I,s:I,s:I}",
			  "connections", u64_of(tb[MAILSHIFT_E_CONNECTIONS]),
			  "packets", u64_of(tb[MAILSHIFT_E_PACKETS]),
			  "bytes", u64_of(tb[MAILSHIFT_E_BYTES])));
}

static void read_header(json_t *state, struct nlattr **tb)
{
	json_object_set_new(state, "installed",
			    json_boolean(nla_get_u8(tb[MAILSHIFT_A_INSTALLED])));
	json_object_set_new(json_object_get(state, "counters"), "rejected",
			    json_pack("{s:I}", "packets",
				      u64_of(tb[MAILSHIFT_A_REJECTED])));
	if (tb[MAILSHIFT_A_ROUTE_MARK] == NULL)
		return;
	json_object_set_new(state, "route", json_pack("{s:I,s:I,s:I}",
		"mark", (json_int_t)nla_get_u32(tb[MAILSHIFT_A_ROUTE_MARK]),
		"table", (json_int_t)(tb[MAILSHIFT_A_ROUTE_TABLE] ?
			nla_get_u32(tb[MAILSHIFT_A_ROUTE_TABLE]) : 0),
		"priority", (json_int_t)(tb[MAILSHIFT_A_ROUTE_PRIORITY] ?
			nla_get_u32(tb[MAILSHIFT_A_ROUTE_PRIORITY]) : 0)));
}

static int on_dump(struct nl_msg *m, void *arg)
{
	struct nlattr *tb[MAILSHIFT_A_MAX + 1], *nest;
	json_t *state = arg;
	int rem;

	if (genlmsg_parse(nlmsg_hdr(m), 0, tb, MAILSHIFT_A_MAX, NULL) < 0)
		return NL_SKIP;
	if (tb[MAILSHIFT_A_INSTALLED] != NULL)
		read_header(state, tb);
	if (tb[MAILSHIFT_A_ENTRIES] != NULL)
		nla_for_each_nested(nest, tb[MAILSHIFT_A_ENTRIES], rem)
			read_entry(state, nest);
	return NL_OK;
}

static json_t *empty_state(void)
{
	return json_pack("{s:b,s:[],s:{},s:[],s:s}", "installed", 0,
			 "entries", "counters", "conflicts", "backend",
			 "kmod");
}

/* A dump of cmd into *state (fresh() each try, on_msg each message); one
 * that a change interrupted is read again. */
static int kmod_dump(int cmd, nl_recvmsg_msg_cb_t on_msg, json_t *(*fresh)(void),
		     json_t **state, const char *what, char *err, size_t errsz)
{
	struct nl_msg *m;
	struct kmod k;
	int r, tries = 0;

	*state = NULL;
	if (kmod_need(&k, err, errsz) < 0)
		return -1;
	do {
		json_decref(*state);
		*state = fresh();
		m = kmod_msg(&k, cmd, NLM_F_DUMP);
		nl_socket_modify_cb(k.sk, NL_CB_VALID, NL_CB_CUSTOM, on_msg,
				    *state);
		r = m == NULL ? -NLE_NOMEM : nl_send_auto(k.sk, m);
		nlmsg_free(m);
		if (r >= 0)
			r = nl_recvmsgs_default(k.sk);
	} while (r == -NLE_DUMP_INTR && ++tries < KMOD_DUMP_TRIES);
	if (r < 0) {
		kmod_error(&k, r, what, err, errsz);
		json_decref(*state);
		*state = NULL;
	}
	kmod_close(&k);
	return r < 0 ? -1 : 0;
}

int ms_steer_kmod_read(json_t **state, char *err, size_t errsz)
{
	return kmod_dump(MAILSHIFT_CMD_GET_TABLE, on_dump, empty_state, state,
			 "reading the table", err, errsz);
}

int ms_steer_kmod_busy(char *err, size_t errsz)
{
	json_t *state = NULL;
	struct kmod k;
	int r = kmod_open(&k, err, errsz);

	if (r <= 0)
		return r;
	kmod_close(&k);
	if (ms_steer_kmod_read(&state, err, errsz) < 0)
		return -1;
	r = json_is_true(json_object_get(state, "installed")) ? -1 : 0;
	json_decref(state);
	if (r < 0)
		snprintf(err, errsz, "the mailshift kernel module holds a "
			 "steering table (backend kmod): remove it first "
			 "(mailshiftctl steer --backend kmod remove); nothing "
			 "was changed");
	return r;
}

/* ------------------------------------------------------------ install */

/* Whether the kernel has nf_tables: libnftables exits the process when it
 * cannot open its netlink socket. */
static int nft_usable(void)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC,
			NETLINK_NETFILTER);

	if (fd < 0)
		return 0;
	close(fd);
	return 1;
}

/* Where nftables is there: neither the nft backend's table nor another
 * table's divert of a steered port may steer the same connections. */
static int nft_in_the_way(const struct ms_steer_cfg *s, char *err,
			  size_t errsz)
{
	json_t *state = NULL;
	int r;

	if (!nft_usable())
		return 0;
	r = ms_steer_nft_read(s, &state, err, errsz);
	if (r == 0 && json_is_true(json_object_get(state, "installed"))) {
		snprintf(err, errsz, "the nftables table inet %s is installed "
			 "(backend nft): remove it first (mailshiftctl steer "
			 "--backend nft remove); nothing was changed",
			 MS_STEER_TABLE);
		r = -1;
	}
	if (r == 0)
		r = ms_steer_conflict(state, err, errsz);
	json_decref(state);
	return r;
}

char *ms_steer_kmod_text(const struct ms_steer_cfg *s,
			 const struct ms_steer_entry *e, unsigned int n,
			 const struct ms_steer_route *rt)
{
	char *text = NULL, line[200];
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	if (f == NULL)
		return NULL;
	fprintf(f, "# mailshift module table: mark 0x%08x, packet mark "
		"0x%08x\n", s->mark, rt->mark);
	for (unsigned int i = 0; i < s->nports; i++)
		fprintf(f, "port %u listener %u\n", s->ports[i].port,
			s->ports[i].listener);
	for (int v6 = 0; v6 < 2; v6++) {
		if (s->src[v6].family)
			fprintf(f, "source %s\n", s->src[v6].text);
		if (s->dst[v6].family)
			fprintf(f, "destination %s\n", s->dst[v6].text);
	}
	for (unsigned int i = 0; i < n; i++) {
		ms_steer_entry_text(&e[i], line, sizeof(line));
		fprintf(f, "entry %s\n", line);
	}
	if (fclose(f) != 0) {
		free(text);
		return NULL;
	}
	return text;
}

/* As the nft install: the routing first (taken back when the table cannot
 * be set), then the table, then routing an older install left. */
int ms_steer_kmod_install(const struct ms_steer_cfg *s, int dry_run,
			  char **script, struct ms_steer_route *rt,
			  unsigned int *n, char *err, size_t errsz)
{
	struct ms_steer_entry *e = calloc(MS_STEER_MAX_EXPANDED, sizeof(*e));
	unsigned int added = 0;
	int ret = -1;

	*script = NULL;
	if (e == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	if (nft_in_the_way(s, err, errsz) < 0 ||
	    ms_rtnl_plan(s, rt, err, errsz) < 0)
		goto out;
	*n = ms_steer_expand(s, e);
	*script = ms_steer_kmod_text(s, e, *n, rt);
	if (*script == NULL) {
		snprintf(err, errsz, "out of memory");
		goto out;
	}
	if (dry_run) {
		ret = 0;
		goto out;
	}
	if (ms_rtnl_install(rt, &added, err, errsz) < 0)
		goto out;
	if (ms_steer_kmod_set(s, e, *n, rt, err, errsz) < 0) {
		ms_rtnl_undo(rt, added);
		goto out;
	}
	ret = ms_rtnl_prune(rt, err, errsz);
out:
	free(e);
	return ret;
}

/* ------------------------------------------------------ the session map */

/* "10.0.0.1", "2001:db8::1" or an IPv4-mapped "::ffff:10.0.0.1" (a
 * dual-stack listener's IPv4 client) as conntrack has it: 4 or 16 bytes,
 * or 0 when it is no address. */
static int addr_bytes(const char *text, unsigned char *out)
{
	struct in6_addr a6;

	if (inet_pton(AF_INET, text, out) == 1)
		return 4;
	if (inet_pton(AF_INET6, text, &a6) != 1)
		return 0;
	if (IN6_IS_ADDR_V4MAPPED(&a6)) {
		memcpy(out, &a6.s6_addr[12], 4);
		return 4;
	}
	memcpy(out, &a6, 16);
	return 16;
}

static int put_skey(struct nl_msg *m, const char *client, unsigned int cport,
		    const char *local, unsigned int lport)
{
	unsigned char c[16], l[16];
	int clen = addr_bytes(client, c), llen = addr_bytes(local, l);

	if (clen == 0 || clen != llen)
		return -1;
	return nla_put(m, MAILSHIFT_A_CLIENT, clen, c) < 0 ||
	       nla_put_u16(m, MAILSHIFT_A_CLIENT_PORT, cport) < 0 ||
	       nla_put(m, MAILSHIFT_A_LOCAL, llen, l) < 0 ||
	       nla_put_u16(m, MAILSHIFT_A_LOCAL_PORT, lport) < 0 ? -1 : 0;
}

/* mailshiftd's one socket to the module, opened at the first use and
 * again after a failure; enabled only with backend = kmod. */
static struct {
	int on;
	struct kmod k;
	int open;
	int failing;			/* said once until the next success */
} gw_kmod;

void ms_steer_sessions_use(enum ms_steer_backend backend)
{
	gw_kmod.on = backend == MS_STEER_BACKEND_KMOD;
}

/* Sends one change of the session map: 0, 1 when the kernel answered
 * quiet_errno, -1 on another failure, logged (once in a row): it costs
 * the session nothing, the map is a safety net. */
static int gw_kmod_send(int cmd, const char *what,
			int (*fill)(struct nl_msg *m, const void *arg),
			const void *arg, int quiet_errno)
{
	char err[512];
	struct nl_msg *m;
	int r;

	if (!gw_kmod.open && kmod_need(&gw_kmod.k, err, sizeof(err)) < 0)
		goto failed;
	gw_kmod.open = 1;
	gw_kmod.k.error = 0;
	gw_kmod.k.msg[0] = '\0';
	m = kmod_msg(&gw_kmod.k, cmd, 0);
	if (m == NULL || fill(m, arg) < 0) {
		nlmsg_free(m);
		snprintf(err, sizeof(err), "mailshift module: %s: no such "
			 "address", what);
		goto failed;
	}
	r = kmod_do(&gw_kmod.k, m, what, err, sizeof(err));
	if (r == 0 || (quiet_errno && gw_kmod.k.error == -quiet_errno)) {
		gw_kmod.failing = 0;
		return r == 0 ? 0 : 1;
	}
	/* Opened again next time: a module loaded again has another
	 * family id. */
	kmod_close(&gw_kmod.k);
	gw_kmod.open = 0;
failed:
	if (!gw_kmod.failing)
		ms_warn("steering: %s", err);
	gw_kmod.failing = 1;
	return -1;
}

struct gw_session_msg {
	const char *user, *client, *local;
	unsigned int cport, lport;
	int server;			/* MAILSHIFT_SOURCE, _DESTINATION */
	int state;
};

static int fill_add(struct nl_msg *m, const void *arg)
{
	const struct gw_session_msg *s = arg;

	return put_skey(m, s->client, s->cport, s->local, s->lport) < 0 ||
	       nla_put_string(m, MAILSHIFT_A_USER, s->user) < 0 ||
	       nla_put_u8(m, MAILSHIFT_A_SERVER, s->server) < 0 ? -1 : 0;
}

static int fill_del(struct nl_msg *m, const void *arg)
{
	const struct gw_session_msg *s = arg;

	return put_skey(m, s->client, s->cport, s->local, s->lport);
}

static int fill_state(struct nl_msg *m, const void *arg)
{
	const struct gw_session_msg *s = arg;

	return nla_put_string(m, MAILSHIFT_A_USER, s->user) < 0 ||
	       nla_put_u8(m, MAILSHIFT_A_USER_STATE, s->state) < 0 ? -1 : 0;
}

void ms_steer_session_add(const char *user, const char *client,
			  unsigned int cport, const char *local,
			  unsigned int lport, int to_dst)
{
	struct gw_session_msg s = {
		.user = user, .client = client, .cport = cport,
		.local = local, .lport = lport,
		.server = to_dst ? MAILSHIFT_DESTINATION : MAILSHIFT_SOURCE,
	};

	if (!gw_kmod.on)
		return;
	/* One left from a connection with the same ports that the gateway
	 * did not see end: this one takes its place. */
	if (gw_kmod_send(MAILSHIFT_CMD_SESSION_ADD, "adding a session",
			 fill_add, &s, EEXIST) != 1)
		return;
	gw_kmod_send(MAILSHIFT_CMD_SESSION_DEL, "removing a session", fill_del,
		     &s, ENOENT);
	gw_kmod_send(MAILSHIFT_CMD_SESSION_ADD, "adding a session", fill_add,
		     &s, 0);
}

void ms_steer_session_end(const char *client, unsigned int cport,
			  const char *local, unsigned int lport)
{
	struct gw_session_msg s = {
		.client = client, .cport = cport, .local = local,
		.lport = lport,
	};

	/* Gone already: the collection found its connection over. */
	if (gw_kmod.on)
		gw_kmod_send(MAILSHIFT_CMD_SESSION_DEL, "removing a session",
			     fill_del, &s, ENOENT);
}

void ms_steer_user_state(const char *user, int state)
{
	struct gw_session_msg s = {
		.user = user,
		.state = state == MS_USER_CUTOVER ? MAILSHIFT_USER_CUTOVER :
			 state == MS_USER_DESTINATION ? MAILSHIFT_USER_MOVED :
			 MAILSHIFT_USER_ROUTED,
	};

	if (gw_kmod.on)
		gw_kmod_send(MAILSHIFT_CMD_USER_STATE, "a user's state",
			     fill_state, &s, 0);
}

/* ------------------------------------------------ reading the session map */

static const char *const user_states[] = {
	[MAILSHIFT_USER_ROUTED] = "routed",
	[MAILSHIFT_USER_CUTOVER] = "cutover",
	[MAILSHIFT_USER_MOVED] = "moved",
};

/* "ADDR:PORT", "[V6]:PORT". */
static json_t *addr_port_json(struct nlattr *a, struct nlattr *port)
{
	char text[64], out[80];
	int family = nla_len(a) == 4 ? AF_INET : AF_INET6;

	inet_ntop(family, nla_data(a), text, sizeof(text));
	snprintf(out, sizeof(out), family == AF_INET ? "%s:%u" : "[%s]:%u",
		 text, nla_get_u16(port));
	return json_string(out);
}

/* The user's object in out's "users", made at its first session. */
static json_t *user_of(json_t *out, const char *name, struct nlattr **tb)
{
	json_t *users = json_object_get(out, "users"), *u;
	unsigned int st = nla_get_u8(tb[MAILSHIFT_A_USER_STATE]);
	size_t i;

	json_array_foreach(users, i, u)
		if (!strcmp(json_string_value(json_object_get(u, "user")),
			    name))
			return u;
	u = json_pack("{s:s,s:s,s:I,s:[]}", "user", name, "state",
		      st < sizeof(user_states) / sizeof(user_states[0]) ?
		      user_states[st] : "?", "resets",
		      u64_of(tb[MAILSHIFT_A_USER_RESETS]), "sessions");
	json_array_append_new(users, u);
	return u;
}

static int on_session(struct nl_msg *m, void *arg)
{
	struct nlattr *tb[MAILSHIFT_A_MAX + 1];
	json_t *out = arg, *u;

	if (genlmsg_parse(nlmsg_hdr(m), 0, tb, MAILSHIFT_A_MAX, NULL) < 0)
		return NL_SKIP;
	if (tb[MAILSHIFT_A_SESSIONS] != NULL) {
		json_object_set_new(out, "sessions", json_integer(
			nla_get_u32(tb[MAILSHIFT_A_SESSIONS])));
		json_object_set_new(out, "max_sessions", json_integer(
			nla_get_u32(tb[MAILSHIFT_A_MAX_SESSIONS])));
		return NL_OK;
	}
	if (tb[MAILSHIFT_A_USER] == NULL || tb[MAILSHIFT_A_SERVER] == NULL ||
	    tb[MAILSHIFT_A_USER_STATE] == NULL ||
	    tb[MAILSHIFT_A_CLIENT] == NULL || tb[MAILSHIFT_A_LOCAL] == NULL ||
	    tb[MAILSHIFT_A_CLIENT_PORT] == NULL ||
	    tb[MAILSHIFT_A_LOCAL_PORT] == NULL)
		return NL_SKIP;
	u = user_of(out, nla_get_string(tb[MAILSHIFT_A_USER]), tb);
	json_array_append_new(json_object_get(u, "sessions"),
		json_pack("{s:o,s:o,s:s,s:I,s:I}",
			  "client", addr_port_json(tb[MAILSHIFT_A_CLIENT],
						   tb[MAILSHIFT_A_CLIENT_PORT]),
			  "local", addr_port_json(tb[MAILSHIFT_A_LOCAL],
						  tb[MAILSHIFT_A_LOCAL_PORT]),
			  "server", nla_get_u8(tb[MAILSHIFT_A_SERVER]) ==
			  MAILSHIFT_DESTINATION ? "destination" : "source",
			  "packets", u64_of(tb[MAILSHIFT_A_PACKETS]),
			  "resets", u64_of(tb[MAILSHIFT_A_RESETS])));
	return NL_OK;
}

static json_t *empty_sessions(void)
{
	return json_pack("{s:s,s:i,s:i,s:[]}", "backend", "kmod", "sessions",
			 0, "max_sessions", 0, "users");
}

int ms_steer_kmod_sessions(json_t **out, char *err, size_t errsz)
{
	return kmod_dump(MAILSHIFT_CMD_SESSION_GET, on_session, empty_sessions,
			 out, "reading the session map", err, errsz);
}
