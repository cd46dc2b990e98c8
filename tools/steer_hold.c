/* mailshiftctl steer hold: new connection attempts to the steered mail
 * ports are held (not refused) from the moment hold is ready until a new
 * mailshiftd listens, and let go then, for restarts without socket
 * activation (with it the listening sockets never go away). The SYNs
 * are queued to this process with NFQUEUE (libnetfilter_queue) from a rule
 * in the raw table's prerouting hook, ahead of conntrack and of the
 * steering table; a packet let go (NF_ACCEPT) carries on from there, so the
 * steering table decides it as if it had just arrived: to the new
 * mailshiftd, or, when none came within the timeout, its fail-closed reset.
 * See docs/deployment.md, "Restarts". */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#include "steer.h"
#include "subcommands.h"

#define HOLD_COMMENT	"mailshift-hold"
#define MAX_INODES	256

struct hold {
	const struct ms_steer_cfg *s;
	unsigned int queue, max, timeout_ms;
	struct nfq_q_handle *qh;
	uint32_t *ids;			/* held packets, oldest first */
	unsigned int nheld, passed, held_total;
	unsigned long old[MAX_INODES];	/* listeners there at the start */
	unsigned int nold;
	int up;				/* held ones let go: the rest too */
	int raw_existed[2];		/* ip raw, ip6 raw before we ran */
};

static volatile sig_atomic_t stop;

static void on_stop(int sig)
{
	(void)sig;
	stop = 1;
}

static long long now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The listening TCP sockets of this network namespace on port: calls fn
 * with each one's inode (from /proc/net/tcp and tcp6). */
static void listeners(unsigned int port, void (*fn)(void *, unsigned long),
		      void *arg)
{
	static const char *const files[] = { "/proc/net/tcp",
					     "/proc/net/tcp6" };
	char line[512];

	for (int i = 0; i < 2; i++) {
		FILE *f = fopen(files[i], "r");
		unsigned int p, st;
		unsigned long inode;

		if (f == NULL)
			continue;
		while (fgets(line, sizeof(line), f))
			if (sscanf(line, " %*u: %*[0-9A-Fa-f]:%X %*[0-9A-Fa-f]:"
				   "%*X %X %*s %*s %*s %*u %*u %lu", &p, &st,
				   &inode) == 3 && st == 0x0A && p == port)
				fn(arg, inode);
		fclose(f);
	}
}

static void remember(void *arg, unsigned long inode)
{
	struct hold *h = arg;

	if (h->nold < MAX_INODES)
		h->old[h->nold++] = inode;
}

struct seen {
	const struct hold *h;
	int fresh;
};

static void look(void *arg, unsigned long inode)
{
	struct seen *v = arg;
	int known = 0;

	for (unsigned int i = 0; i < v->h->nold; i++)
		known |= v->h->old[i] == inode;
	v->fresh |= !known;
}

/* Whether every listener port has a listener that was not there when hold
 * started: a new mailshiftd. (The old one's are never trusted: it may
 * close them at any moment, and what it had not accepted would be reset.) */
static int new_listeners(const struct hold *h)
{
	int all = 1;

	for (unsigned int i = 0; i < h->s->nports; i++) {
		struct seen v = { h, 0 };

		listeners(h->s->ports[i].listener, look, &v);
		all &= v.fresh;
	}
	return all;
}

/* iptables-nft / ip6tables-nft with argv (no shell): NFQUEUE is an xt
 * target, and the kernels this runs on may lack nft's own "queue". */
static int xtables(int v6, const char *op, const struct ms_steer_addr *a,
		   unsigned int port, unsigned int queue)
{
	char p[8], q[8];
	const char *argv[] = { v6 ? "ip6tables-nft" : "iptables-nft", "-w",
		"-t", "raw", op, "PREROUTING", "-d", a->text, "-p", "tcp",
		"--syn", "--dport", p, "-m", "comment", "--comment",
		HOLD_COMMENT, "-j", "NFQUEUE", "--queue-num", q,
		"--queue-bypass", NULL };
	int status;
	pid_t pid;

	snprintf(p, sizeof(p), "%u", port);
	snprintf(q, sizeof(q), "%u", queue);
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		execvp(argv[0], (char *const *)argv);
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* Adds (op "-I") or deletes ("-D") the rule for every service address and
 * mail port. Deleting goes on past a failure. */
static int rules(struct hold *h, const char *op)
{
	int ret = 0;

	for (unsigned int a = 0; a < h->s->naddrs; a++)
		for (unsigned int i = 0; i < h->s->nports; i++)
			if (xtables(h->s->addrs[a].family == AF_INET6, op,
				    &h->s->addrs[a], h->s->ports[i].port,
				    h->queue) < 0) {
				ret = -1;
				if (op[1] == 'I')
					return ret;
			}
	return ret;
}

/* iptables-nft makes the "raw" table when it adds the first rule; it goes
 * again when we made it, so that nothing of ours is left. */
static int table_exists(int v6)
{
	char err[256];

	return ms_steer_nft_run(v6 ? "delete table ip6 raw\n" :
				"delete table ip raw\n", 1, err,
				sizeof(err)) == 0;
}

/* The tables iptables-nft made for us. Only once nothing is queued from
 * them: unregistering a hook drops the packets it queued. */
static void remove_tables(struct hold *h)
{
	char err[256];

	for (int v6 = 0; v6 < 2; v6++)
		if (!h->raw_existed[v6] && table_exists(v6))
			ms_steer_nft_run(v6 ? "delete table ip6 raw\n" :
					 "delete table ip raw\n", 0, err,
					 sizeof(err));
}

static void verdict(struct hold *h, uint32_t id)
{
	nfq_set_verdict(h->qh, id, NF_ACCEPT, 0, NULL);
}

static void release(struct hold *h)
{
	for (unsigned int i = 0; i < h->nheld; i++)
		verdict(h, h->ids[i]);
	h->nheld = 0;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg,
		     struct nfq_data *nfa, void *data)
{
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	struct hold *h = data;
	uint32_t id;

	(void)qh;
	(void)msg;
	if (ph == NULL)
		return 0;
	id = ntohl(ph->packet_id);
	if (h->up) {
		h->passed++;
		verdict(h, id);		/* after the hold: straight on */
	} else if (h->nheld < h->max) {
		h->ids[h->nheld++] = id;
		h->held_total++;
	} else {
		/* the kernel holds no more than max (its queue length,
		 * fail-open: it lets the rest go on itself); a guard */
		verdict(h, id);
	}
	return 0;
}

static int open_queue(struct hold *h, struct nfq_handle **nh, char *err,
		      size_t errsz)
{
	*nh = nfq_open();
	if (*nh == NULL) {
		snprintf(err, errsz, "NFQUEUE: %s", strerror(errno));
		return -1;
	}
	h->qh = nfq_create_queue(*nh, (uint16_t)h->queue, on_packet, h);
	if (h->qh == NULL) {
		snprintf(err, errsz, "NFQUEUE %u: cannot bind it (another "
			 "program holds it?)", h->queue);
		return -1;
	}
	/* only the packet id is needed; a full kernel queue lets packets
	 * go on (to the table's reset) instead of dropping them */
	if (nfq_set_mode(h->qh, NFQNL_COPY_META, 0) < 0 ||
	    nfq_set_queue_maxlen(h->qh, h->max) < 0 ||
	    nfq_set_queue_flags(h->qh, NFQA_CFG_F_FAIL_OPEN,
				NFQA_CFG_F_FAIL_OPEN) < 0) {
		snprintf(err, errsz, "NFQUEUE %u: %s", h->queue,
			 strerror(errno));
		return -1;
	}
	return 0;
}

/* Waits up to ms for the queue's next message and handles it: 1, or 0
 * when none came. */
static int next_packet(struct nfq_handle *nh, int ms)
{
	char buf[4096] __attribute__((aligned));
	struct pollfd p = { .fd = nfq_fd(nh), .events = POLLIN };
	ssize_t n;

	if (poll(&p, 1, ms) <= 0)
		return 0;
	n = recv(p.fd, buf, sizeof(buf), MSG_DONTWAIT);
	if (n > 0)
		nfq_handle_packet(nh, buf, (int)n);
	/* ENOBUFS: the kernel could not tell us of one; go on reading */
	return n > 0 || errno == ENOBUFS;
}

/* Runs until a new mailshiftd listens (0) or the timeout (1). */
static int run(struct hold *h, struct nfq_handle *nh)
{
	long long deadline = now_ms() + h->timeout_ms;

	while (!stop && now_ms() < deadline) {
		if (new_listeners(h))
			return 0;
		next_packet(nh, 10);
	}
	return 1;
}

/* Lets go what is still queued (h->up: at once), until the queue has been
 * quiet for 100 ms: a packet on its way through the hook when the rule
 * went is still queued after, and unbinding would drop it (the client
 * would send its SYN again only a second later). */
static void drain(struct nfq_handle *nh)
{
	while (next_packet(nh, 100))
		;
}

static int number(const char *s, unsigned int max, unsigned int *v)
{
	char *e;
	unsigned long n;

	errno = 0;
	n = strtoul(s, &e, 10);
	if (*s == '\0' || *e || errno || n > max)
		return -1;
	*v = (unsigned int)n;
	return 0;
}

int steer_hold(const struct ms_steer_cfg *s, int argc, char *argv[],
	       char *err, size_t errsz)
{
	struct hold h = { .s = s, .queue = 19795, .max = 4096,
			  .timeout_ms = 30000 };
	struct nfq_handle *nh = NULL;
	unsigned int secs = 30;
	int ret = 1;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--timeout") && i + 1 < argc &&
		    number(argv[i + 1], 3600, &secs) == 0 && secs > 0)
			i++;
		else if (!strcmp(argv[i], "--max") && i + 1 < argc &&
			 number(argv[i + 1], 1 << 20, &h.max) == 0 && h.max)
			i++;
		else if (!strcmp(argv[i], "--queue") && i + 1 < argc &&
			 number(argv[i + 1], 65535, &h.queue) == 0)
			i++;
		else {
			snprintf(err, errsz, "hold: bad argument %s (--timeout "
				 "SECONDS, --max PACKETS, --queue NUM)",
				 argv[i]);
			return 2;
		}
	}
	h.timeout_ms = secs * 1000;
	h.ids = calloc(h.max, sizeof(*h.ids));
	if (h.ids == NULL) {
		snprintf(err, errsz, "out of memory");
		return 1;
	}
	for (unsigned int i = 0; i < s->nports; i++)
		listeners(s->ports[i].listener, remember, &h);
	for (int v6 = 0; v6 < 2; v6++)
		h.raw_existed[v6] = table_exists(v6);
	signal(SIGTERM, on_stop);
	signal(SIGINT, on_stop);
	if (open_queue(&h, &nh, err, errsz) < 0)
		goto out;
	if (rules(&h, "-I") < 0) {
		snprintf(err, errsz, "hold: iptables-nft could not add the "
			 "NFQUEUE rule (package iptables; CAP_NET_ADMIN)");
		goto out_rules;
	}
	printf("holding: new connections to the steered ports wait for a new "
	       "mailshiftd (at most %u s)\n", secs);
	fflush(stdout);
	ret = run(&h, nh);
	/* The rules first: nothing new is queued while the held ones go;
	 * then what the kernel queued meanwhile; the tables last. */
	rules(&h, "-D");
	h.up = 1;
	release(&h);
	drain(nh);
	remove_tables(&h);
	printf("%s: %u held and let go, %u passed at once\n", ret == 0 ?
	       "a new mailshiftd listens" : stop ? "stopped" :
	       "no new mailshiftd within the timeout", h.held_total, h.passed);
	if (ret != 0 && !stop)
		snprintf(err, errsz, "hold: no new mailshiftd listened within "
			 "%u s; held connections went on to the steering "
			 "table (reset while nothing listens)", secs);
	ret = stop ? 0 : ret;
	goto out;
out_rules:
	rules(&h, "-D");
	remove_tables(&h);
out:
	if (h.qh != NULL) {
		release(&h);
		nfq_destroy_queue(h.qh);
	}
	if (nh != NULL)
		nfq_close(nh);
	free(h.ids);
	return ret;
}
