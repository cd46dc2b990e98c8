/* ktnl: bad input for the mailshift module's generic netlink family, run
 * in the module test's VM (tests/kmod/guest.sh) against an installed
 * table. Prints one PASS or FAIL line per check: malformed, oversized,
 * unknown and missing attributes, contradicting entries and bad header
 * flags are each refused with an extended-ack message and leave the table
 * and the session map as they were; the map's bound; a dump interrupted
 * by a change is flagged NLM_F_DUMP_INTR; without CAP_NET_ADMIN nothing is
 * allowed. Linked with mailshift's library, it also writes the session
 * map as mailshiftd does (steer_kmod.c):
 *   ktnl add USER CLIENT CPORT LOCAL LPORT source|destination
 *   ktnl del CLIENT CPORT LOCAL LPORT
 *   ktnl state USER source|copying|cutover|destination|failed */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/capability.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <netlink/netlink.h>

#include "../../kmod/uapi/mailshift.h"
#include "steer.h"
#include "store.h"

static int failed;

struct reply {
	int error;			/* negative errno, 0 for an ack */
	char msg[256];			/* the extended ack's text */
};

static void result(int ok, const char *name, const struct reply *r)
{
	printf("%s: genl: %s", ok ? "PASS" : "FAIL", name);
	if (r != NULL)
		printf(" (%s%s%s)", strerror(-r->error), r->msg[0] ? ": " : "",
		       r->msg);
	printf("\n");
	failed += !ok;
}

static int on_error(struct sockaddr_nl *who, struct nlmsgerr *e, void *arg)
{
	struct nlmsghdr *nlh = (struct nlmsghdr *)e - 1;
	struct nlattr *tb[NLMSGERR_ATTR_MAX + 1];
	int hlen = sizeof(*nlh) + sizeof(*e);
	struct reply *r = arg;

	(void)who;
	r->error = e->error;
	if (!(nlh->nlmsg_flags & NLM_F_ACK_TLVS))
		return NL_STOP;
	if (!(nlh->nlmsg_flags & NLM_F_CAPPED))
		hlen += e->msg.nlmsg_len - sizeof(*nlh);
	if ((int)nlh->nlmsg_len > hlen &&
	    nla_parse(tb, NLMSGERR_ATTR_MAX, (struct nlattr *)((char *)nlh +
		      hlen), nlh->nlmsg_len - hlen, NULL) == 0 &&
	    tb[NLMSGERR_ATTR_MSG] != NULL)
		snprintf(r->msg, sizeof(r->msg), "%s",
			 (char *)nla_data(tb[NLMSGERR_ATTR_MSG]));
	return NL_STOP;
}

static struct nl_sock *open_sock(int *family)
{
	struct nl_sock *sk = nl_socket_alloc();
	int one = 1;

	if (sk == NULL || genl_connect(sk) < 0)
		return NULL;
	setsockopt(nl_socket_get_fd(sk), SOL_NETLINK, NETLINK_EXT_ACK, &one,
		   sizeof(one));
	setsockopt(nl_socket_get_fd(sk), SOL_NETLINK, NETLINK_CAP_ACK, &one,
		   sizeof(one));
	nl_socket_set_msg_buf_size(sk, 1 << 20);
	*family = genl_ctrl_resolve(sk, MAILSHIFT_GENL_NAME);
	return *family < 0 ? NULL : sk;
}

static struct nl_msg *new_msg(int family, int cmd, int flags)
{
	struct nl_msg *m = nlmsg_alloc_size(256 * 1024);

	genlmsg_put(m, NL_AUTO_PORT, NL_AUTO_SEQ, family, 0, flags, cmd,
		    MAILSHIFT_GENL_VERSION);
	return m;
}

/* Sends m and waits for the ack or the error. */
static struct reply request(struct nl_sock *sk, struct nl_msg *m)
{
	struct reply r = { 0 };

	int ret;

	nl_socket_modify_err_cb(sk, NL_CB_CUSTOM, on_error, &r);
	ret = nl_send_sync(sk, m);
	/* Not the kernel's answer: libnl's own trouble. */
	if (ret < 0 && r.error == 0) {
		r.error = -EPROTO;
		snprintf(r.msg, sizeof(r.msg), "libnl: %s", nl_geterror(ret));
	}
	return r;
}

static void put_ports(struct nl_msg *m)
{
	struct nlattr *l = nla_nest_start(m, MAILSHIFT_A_PORTS | NLA_F_NESTED);
	struct nlattr *p = nla_nest_start(m, 1 | NLA_F_NESTED);

	nla_put_u16(m, MAILSHIFT_P_PORT, 143);
	nla_put_u16(m, MAILSHIFT_P_LISTENER, 10143);
	nla_nest_end(m, p);
	nla_nest_end(m, l);
}

static void put_entry(struct nl_msg *m, int i, const char *addr, int port,
		      const char *prefix, int plen, int action)
{
	struct nlattr *e = nla_nest_start(m, (i + 1) | NLA_F_NESTED);
	struct in_addr a;

	nla_put_u8(m, MAILSHIFT_E_FAMILY, AF_INET);
	inet_pton(AF_INET, addr, &a);
	nla_put(m, MAILSHIFT_E_ADDR, 4, &a);
	nla_put_u16(m, MAILSHIFT_E_PORT, port);
	if (prefix != NULL) {
		inet_pton(AF_INET, prefix, &a);
		nla_put(m, MAILSHIFT_E_PREFIX, 4, &a);
		nla_put_u8(m, MAILSHIFT_E_PREFIX_LEN, plen);
	}
	nla_put_u8(m, MAILSHIFT_E_ACTION, action);
	nla_nest_end(m, e);
}

/* A SET with what every table needs; the caller adds to it. */
static struct nl_msg *set_msg(int family, int flags)
{
	struct nl_msg *m = new_msg(family, MAILSHIFT_CMD_SET_TABLE, flags);

	nla_put_u32(m, MAILSHIFT_A_MARK, 0x4d530000);
	nla_put_u32(m, MAILSHIFT_A_ROUTE_MARK, 0x4d530000);
	put_ports(m);
	return m;
}

/* n valid entries, on 10.78.x.y port 143. */
static void put_entries(struct nl_msg *m, int n)
{
	struct nlattr *l = nla_nest_start(m, MAILSHIFT_A_ENTRIES |
					  NLA_F_NESTED);
	char addr[32];

	for (int i = 0; i < n; i++) {
		snprintf(addr, sizeof(addr), "10.78.%d.%d", i / 250, 1 + i % 250);
		put_entry(m, i, addr, 143, NULL, 0, MAILSHIFT_PROXY);
	}
	nla_nest_end(m, l);
}

/* What a dump of the table or of the session map said. */
struct table_info {
	unsigned int generation, entries, count, messages, interrupted;
};

static int on_dump(struct nl_msg *m, void *arg)
{
	struct nlattr *tb[MAILSHIFT_A_MAX + 1];
	struct table_info *t = arg;

	t->messages++;
	if (nlmsg_hdr(m)->nlmsg_flags & NLM_F_DUMP_INTR)
		t->interrupted = 1;
	if (genlmsg_parse(nlmsg_hdr(m), 0, tb, MAILSHIFT_A_MAX, NULL) < 0)
		return NL_SKIP;
	if (tb[MAILSHIFT_A_GENERATION] != NULL)
		t->generation = nla_get_u32(tb[MAILSHIFT_A_GENERATION]);
	if (tb[MAILSHIFT_A_ENTRIES] != NULL)
		t->entries++;
	if (tb[MAILSHIFT_A_SESSIONS] != NULL)
		t->count = nla_get_u32(tb[MAILSHIFT_A_SESSIONS]);
	return NL_OK;
}

static struct reply dump_of(struct nl_sock *sk, int family, int cmd,
			    struct table_info *t)
{
	struct reply r = { 0 };
	struct nl_msg *m = new_msg(family, cmd, NLM_F_DUMP);

	memset(t, 0, sizeof(*t));
	nl_socket_modify_err_cb(sk, NL_CB_CUSTOM, on_error, &r);
	nl_socket_modify_cb(sk, NL_CB_VALID, NL_CB_CUSTOM, on_dump, t);
	nl_send_auto(sk, m);
	nlmsg_free(m);
	if (nl_recvmsgs_default(sk) == -NLE_DUMP_INTR)
		t->interrupted = 1;
	return r;
}

static struct reply dump(struct nl_sock *sk, int family, struct table_info *t)
{
	return dump_of(sk, family, MAILSHIFT_CMD_GET_TABLE, t);
}

/* A refused request: an error, a message naming it (contains want). */
static void refused(struct nl_sock *sk, struct nl_msg *m, const char *name,
		    const char *want)
{
	struct reply r = request(sk, m);

	result(r.error < 0 && r.error != -EPROTO && r.msg[0] &&
	       (want == NULL || strstr(r.msg, want) != NULL), name, &r);
}

static void bad_input(struct nl_sock *sk, int family)
{
	struct nlattr *l;
	struct nl_msg *m;

	m = new_msg(family, MAILSHIFT_CMD_SET_TABLE, 0);
	nla_put_u16(m, MAILSHIFT_A_MARK, 1);
	nla_put_u32(m, MAILSHIFT_A_ROUTE_MARK, 0x4d530000);
	put_ports(m);
	refused(sk, m, "a u16 for the u32 mark is refused", NULL);

	m = new_msg(family, MAILSHIFT_CMD_SET_TABLE, 0);
	nla_put_u32(m, MAILSHIFT_A_MARK, 0x4d530000);
	nla_put_u32(m, MAILSHIFT_A_ROUTE_MARK, 0x4d530000);
	refused(sk, m, "a table without ports is refused", "needs");

	m = set_msg(family, 0);
	nla_put_u32(m, MAILSHIFT_A_MAX + 1, 1);
	refused(sk, m, "an unknown attribute is refused", NULL);

	m = set_msg(family, 0);
	nla_put(m, MAILSHIFT_A_SOURCE4, 16, "0123456789abcdef");
	refused(sk, m, "an oversized IPv4 address is refused", NULL);

	m = set_msg(family, 0);
	nla_put_u32(m, MAILSHIFT_A_MARK, 0x4d530001);
	refused(sk, m, "a mark with low bits set is refused", "mark");

	m = set_msg(family, 0);
	l = nla_nest_start(m, MAILSHIFT_A_ENTRIES | NLA_F_NESTED);
	put_entry(m, 0, "10.77.1.2", 993, NULL, 0, MAILSHIFT_PROXY);
	nla_nest_end(m, l);
	refused(sk, m, "an entry on a port that is not a mail port is refused",
		"not a mail port");

	m = set_msg(family, 0);
	l = nla_nest_start(m, MAILSHIFT_A_ENTRIES | NLA_F_NESTED);
	put_entry(m, 0, "10.77.1.2", 143, "10.77.0.65", 26, MAILSHIFT_PROXY);
	nla_nest_end(m, l);
	refused(sk, m, "host bits after the prefix length are refused",
		"after the prefix length");

	m = set_msg(family, 0);
	l = nla_nest_start(m, MAILSHIFT_A_ENTRIES | NLA_F_NESTED);
	put_entry(m, 0, "10.77.1.2", 143, NULL, 0, 7);
	nla_nest_end(m, l);
	refused(sk, m, "an action out of range is refused", NULL);

	m = set_msg(family, 0);
	l = nla_nest_start(m, MAILSHIFT_A_ENTRIES | NLA_F_NESTED);
	put_entry(m, 0, "10.77.1.2", 143, NULL, 0, MAILSHIFT_PROXY);
	put_entry(m, 1, "10.77.1.2", 143, NULL, 0, MAILSHIFT_SOURCE);
	nla_nest_end(m, l);
	refused(sk, m, "two entries for one address and port are refused",
		"same address");

	m = set_msg(family, 0);
	put_entries(m, MAILSHIFT_MAX_ENTRIES + 1);
	refused(sk, m, "more entries than the limit are refused",
		"too many entries");

	m = set_msg(family, NLM_F_CREATE);
	refused(sk, m, "unknown header flags are refused", NULL);
}

/* A fresh socket that reads in small pieces: the kernel sizes a dump's
 * messages by the reader's largest read so far, and fills the next one at
 * each read. */
static struct nl_sock *small_reader(void)
{
	struct nl_sock *sk = nl_socket_alloc();

	if (sk == NULL || genl_connect(sk) < 0)
		return NULL;
	nl_socket_disable_msg_peek(sk);
	nl_socket_set_msg_buf_size(sk, 4096);
	return sk;
}

/* Reads a dump of cmd one datagram at a time on a fresh socket and sends
 * change (through other) after the first: 0 with *t, or -1 when the dump
 * was whole in its first read. */
static int interrupt(struct nl_sock *other, int family, int cmd,
		     struct nl_msg *change, struct reply *r,
		     struct table_info *t)
{
	struct nl_sock *sk = small_reader();
	struct nl_msg *m = new_msg(family, cmd, NLM_F_DUMP);
	unsigned char *buf = NULL;
	struct sockaddr_nl who;
	struct nlmsghdr *h;
	int n, done = 0, ret;

	memset(t, 0, sizeof(*t));
	if (sk == NULL) {
		nlmsg_free(m);
		nlmsg_free(change);
		return -1;
	}
	nl_socket_modify_cb(sk, NL_CB_VALID, NL_CB_CUSTOM, on_dump, t);
	nl_send_auto(sk, m);
	nlmsg_free(m);
	/* One datagram: the dump's first part. */
	n = nl_recv(sk, &who, &buf, NULL);
	for (h = (struct nlmsghdr *)buf; n > 0 && nlmsg_ok(h, n);
	     h = nlmsg_next(h, &n))
		done |= h->nlmsg_type == NLMSG_DONE;
	free(buf);
	*r = request(other, change);
	ret = done ? 0 : nl_recvmsgs_default(sk);
	if (ret == -NLE_DUMP_INTR)
		t->interrupted = 1;
	printf("INFO: genl: dump after the change: %u messages, %s\n",
	       t->messages, ret < 0 ? nl_geterror(ret) : "done");
	nl_socket_free(sk);
	return done ? -1 : 0;
}

static void interrupted_dump(struct nl_sock *other, int family)
{
	struct nl_msg *m = set_msg(family, 0);
	struct table_info t;
	struct reply r;

	put_entries(m, 1000);
	r = request(other, m);
	if (r.error) {
		result(0, "a 1000-entry table is taken", &r);
		return;
	}
	m = set_msg(family, 0);
	put_entries(m, 999);
	if (interrupt(other, family, MAILSHIFT_CMD_GET_TABLE, m, &r, &t) < 0) {
		result(0, "the dump of 1000 entries takes more than one read",
		       NULL);
		return;
	}
	result(r.error == 0 && t.interrupted,
	       "a dump interrupted by a SET is flagged NLM_F_DUMP_INTR", &r);
}

/* ---------------------------------------------------- the session map */

#define PARAMS "/sys/module/mailshift/parameters/"

static void put_skey(struct nl_msg *m, const char *client, int cport,
		     const char *local, int lport)
{
	struct in_addr a;

	inet_pton(AF_INET, client, &a);
	nla_put(m, MAILSHIFT_A_CLIENT, 4, &a);
	nla_put_u16(m, MAILSHIFT_A_CLIENT_PORT, cport);
	inet_pton(AF_INET, local, &a);
	nla_put(m, MAILSHIFT_A_LOCAL, 4, &a);
	nla_put_u16(m, MAILSHIFT_A_LOCAL_PORT, lport);
}

/* A SESSION_ADD of a session of "ktnl" from 10.79.x.y:port, nothing
 * connected: the caller adds to it. */
static struct nl_msg *add_msg(int family, int port)
{
	struct nl_msg *m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);

	put_skey(m, "10.79.0.1", port, "10.77.1.2", 143);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	nla_put_u8(m, MAILSHIFT_A_SERVER, MAILSHIFT_SOURCE);
	return m;
}

static struct nl_msg *del_msg(int family, int port)
{
	struct nl_msg *m = new_msg(family, MAILSHIFT_CMD_SESSION_DEL, 0);

	put_skey(m, "10.79.0.1", port, "10.77.1.2", 143);
	return m;
}

static struct nl_msg *state_msg(int family)
{
	struct nl_msg *m = new_msg(family, MAILSHIFT_CMD_USER_STATE, 0);

	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	nla_put_u8(m, MAILSHIFT_A_USER_STATE, MAILSHIFT_USER_MOVED);
	return m;
}

static struct reply map_dump(struct nl_sock *sk, int family,
			     struct table_info *t)
{
	return dump_of(sk, family, MAILSHIFT_CMD_SESSION_GET, t);
}

static int set_param(const char *name, unsigned int v)
{
	char path[128];
	FILE *f;
	int ok;

	snprintf(path, sizeof(path), PARAMS "%s", name);
	f = fopen(path, "w");
	if (f == NULL)
		return -1;
	ok = fprintf(f, "%u\n", v) > 0;
	return fclose(f) == 0 && ok ? 0 : -1;
}

static unsigned int get_param(const char *name)
{
	char path[128];
	unsigned int v = 0;
	FILE *f;

	snprintf(path, sizeof(path), PARAMS "%s", name);
	f = fopen(path, "r");
	if (f == NULL)
		return 0;
	if (fscanf(f, "%u", &v) != 1)
		v = 0;
	fclose(f);
	return v;
}

static void session_bad_input(struct nl_sock *sk, int family)
{
	char name[300];
	struct nl_msg *m;

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);
	put_skey(m, "10.79.0.1", 1000, "10.77.1.2", 143);
	nla_put_u32(m, MAILSHIFT_A_SERVER, MAILSHIFT_SOURCE);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	refused(sk, m, "a session: a u32 for the u8 server is refused", NULL);

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);
	put_skey(m, "10.79.0.1", 1000, "10.77.1.2", 143);
	nla_put_u8(m, MAILSHIFT_A_SERVER, MAILSHIFT_SOURCE);
	memset(name, 'u', sizeof(name));
	name[MAILSHIFT_USER_MAX + 1] = '\0';
	nla_put_string(m, MAILSHIFT_A_USER, name);
	refused(sk, m, "a session: an oversized user name is refused", NULL);

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);
	put_skey(m, "10.79.0.1", 1000, "10.77.1.2", 143);
	nla_put_u8(m, MAILSHIFT_A_SERVER, MAILSHIFT_SOURCE);
	refused(sk, m, "a session without its user is refused", "user name");

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);
	nla_put_u8(m, MAILSHIFT_A_SERVER, MAILSHIFT_SOURCE);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	refused(sk, m, "a session without its addresses is refused",
		"client and local");

	m = add_msg(family, 1000);
	nla_put(m, MAILSHIFT_A_LOCAL, 16, "0123456789abcdef");
	refused(sk, m, "a session: IPv4 client, IPv6 local is refused",
		"does not match");

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);
	nla_put(m, MAILSHIFT_A_CLIENT, 5, "01234");
	nla_put_u16(m, MAILSHIFT_A_CLIENT_PORT, 1000);
	nla_put(m, MAILSHIFT_A_LOCAL, 5, "01234");
	nla_put_u16(m, MAILSHIFT_A_LOCAL_PORT, 143);
	nla_put_u8(m, MAILSHIFT_A_SERVER, MAILSHIFT_SOURCE);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	refused(sk, m, "a session: a 5-byte address is refused", "4 or 16");

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, 0);
	put_skey(m, "10.79.0.1", 1000, "10.77.1.2", 143);
	nla_put_u8(m, MAILSHIFT_A_SERVER, MAILSHIFT_PROXY);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	refused(sk, m, "a session: a server out of range is refused", NULL);

	m = add_msg(family, 1000);
	nla_put_u8(m, MAILSHIFT_A_USER_STATE, __MAILSHIFT_USER_STATE_MAX);
	refused(sk, m, "a session: a user state out of range is refused",
		NULL);

	m = add_msg(family, 1000);
	nla_put_u32(m, MAILSHIFT_A_MARK, 0x4d530000);
	refused(sk, m, "a session: a table's attribute is refused", NULL);

	m = new_msg(family, MAILSHIFT_CMD_USER_STATE, 0);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	refused(sk, m, "a user state without the state is refused",
		"state");

	m = new_msg(family, MAILSHIFT_CMD_SESSION_DEL, 0);
	put_skey(m, "10.79.0.1", 1000, "10.77.1.2", 143);
	nla_put_string(m, MAILSHIFT_A_USER, "ktnl");
	refused(sk, m, "a session DEL with a user attribute is refused", NULL);

	refused(sk, del_msg(family, 1000),
		"a DEL of a session not in the map is refused",
		"no session");

	m = new_msg(family, MAILSHIFT_CMD_SESSION_ADD, NLM_F_CREATE);
	refused(sk, m, "a session: unknown header flags are refused", NULL);
}

/* max_sessions set to what is there plus two: two more are taken, the
 * third is refused, the map stays at the bound. The collection is slowed
 * meanwhile: the sessions added have no connection. */
static void session_bound(struct nl_sock *sk, int family)
{
	unsigned int max = get_param("max_sessions");
	unsigned int gc = get_param("gc_interval");
	struct table_info t;
	struct reply r1, r2, r3;

	map_dump(sk, family, &t);
	if (set_param("gc_interval", 3600) < 0 ||
	    set_param("max_sessions", t.count + 2) < 0) {
		result(0, "setting max_sessions", NULL);
		return;
	}
	r1 = request(sk, add_msg(family, 2001));
	r2 = request(sk, add_msg(family, 2002));
	r3 = request(sk, add_msg(family, 2003));
	result(r1.error == 0 && r2.error == 0 && r3.error == -ENOSPC &&
	       strstr(r3.msg, "full") != NULL,
	       "a session over max_sessions is refused", &r3);
	request(sk, del_msg(family, 2001));
	request(sk, del_msg(family, 2002));
	set_param("max_sessions", max);
	set_param("gc_interval", gc);
}

/* Reads the map's dump one datagram at a time and adds a session after
 * the first. */
static void session_interrupted_dump(struct nl_sock *other, int family)
{
	unsigned int gc = get_param("gc_interval");
	struct table_info t;
	struct reply r;
	int i, whole;

	set_param("gc_interval", 3600);
	for (i = 0; i < 300; i++)
		request(other, add_msg(family, 3000 + i));
	whole = interrupt(other, family, MAILSHIFT_CMD_SESSION_GET,
			  add_msg(family, 3300), &r, &t);
	result(!whole && r.error == 0 && t.interrupted,
	       "a session dump interrupted by an ADD is flagged "
	       "NLM_F_DUMP_INTR", &r);
	for (i = 0; i <= 300; i++)
		request(other, del_msg(family, 3000 + i));
	set_param("gc_interval", gc);
}

static int drop_caps(void)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = { { 0 } };

	return syscall(SYS_capset, &h, d);
}

/* The session map as mailshiftd writes it (steer_kmod.c). */
static int gateway_call(int argc, char **argv)
{
	int st;

	ms_steer_sessions_use(MS_STEER_BACKEND_KMOD);
	if (argc == 8 && !strcmp(argv[1], "add")) {
		ms_steer_session_add(argv[2], argv[3], atoi(argv[4]), argv[5],
				     atoi(argv[6]),
				     !strcmp(argv[7], "destination"));
		return 0;
	}
	if (argc == 6 && !strcmp(argv[1], "del")) {
		ms_steer_session_end(argv[2], atoi(argv[3]), argv[4],
				     atoi(argv[5]));
		return 0;
	}
	if (argc == 4 && !strcmp(argv[1], "state") &&
	    (st = ms_user_state_parse(argv[3])) >= 0) {
		ms_steer_user_state(argv[2], st);
		return 0;
	}
	fprintf(stderr, "usage: ktnl [add|del|state ...]\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct nl_sock *sk, *other;
	struct table_info before, after;
	struct table_info mbefore, mafter;
	int family;
	struct reply r;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 1)
		return gateway_call(argc, argv);
	sk = open_sock(&family);
	other = open_sock(&family);
	if (sk == NULL || other == NULL) {
		result(0, "the mailshift family is there", NULL);
		return 1;
	}
	dump(sk, family, &before);
	bad_input(sk, family);
	dump(sk, family, &after);
	printf("INFO: genl: generation %u -> %u, entries %u -> %u\n",
	       before.generation, after.generation, before.entries,
	       after.entries);
	result(before.entries > 0 && before.generation == after.generation &&
	       before.entries == after.entries,
	       "the table is as it was after every refusal", NULL);
	interrupted_dump(other, family);
	map_dump(sk, family, &mbefore);
	session_bad_input(sk, family);
	map_dump(sk, family, &mafter);
	printf("INFO: genl: session map generation %u -> %u, %u -> %u "
	       "sessions\n", mbefore.generation, mafter.generation,
	       mbefore.count, mafter.count);
	result(mbefore.generation == mafter.generation &&
	       mbefore.count == mafter.count,
	       "the session map is as it was after every refusal", NULL);
	session_bound(sk, family);
	session_interrupted_dump(other, family);
	if (drop_caps() < 0) {
		result(0, "dropping the capabilities", NULL);
		return 1;
	}
	r = request(sk, set_msg(family, 0));
	result(r.error == -EPERM, "a SET without CAP_NET_ADMIN is refused",
	       &r);
	r = dump(sk, family, &after);
	result(r.error == -EPERM, "a dump without CAP_NET_ADMIN is refused",
	       &r);
	r = request(sk, new_msg(family, MAILSHIFT_CMD_DEL_TABLE, 0));
	result(r.error == -EPERM, "a DEL without CAP_NET_ADMIN is refused",
	       &r);
	r = request(sk, add_msg(family, 1000));
	result(r.error == -EPERM,
	       "a session ADD without CAP_NET_ADMIN is refused", &r);
	r = request(sk, del_msg(family, 1000));
	result(r.error == -EPERM,
	       "a session DEL without CAP_NET_ADMIN is refused", &r);
	r = map_dump(sk, family, &mafter);
	result(r.error == -EPERM,
	       "a session dump without CAP_NET_ADMIN is refused", &r);
	r = request(sk, state_msg(family));
	result(r.error == -EPERM,
	       "a user state without CAP_NET_ADMIN is refused", &r);
	return failed != 0;
}
