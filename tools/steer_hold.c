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
#include <fcntl.h>
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

#include <jansson.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <nftables/libnftables.h>

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

/* Runs argv (no shell); with out, its standard output goes into *out
 * (malloc'd, NUL-terminated). 0 when it exited 0, else -1. */
static int run_argv(const char *const argv[], char **out)
{
	int fds[2] = { -1, -1 }, status;
	size_t len = 0, cap = 0;
	char *buf = NULL;
	pid_t pid;

	if (out != NULL && pipe2(fds, O_CLOEXEC) < 0)
		return -1;
	pid = fork();
	if (pid == 0) {
		if (out != NULL)
			dup2(fds[1], STDOUT_FILENO);
		execvp(argv[0], (char *const *)argv);
		_exit(127);
	}
	if (out != NULL) {
		close(fds[1]);
		for (ssize_t n = 1; pid > 0 && n > 0; len += (size_t)n) {
			if (cap - len < 4096) {
				char *b = realloc(buf, cap += 65536);

				if (b == NULL)
					break;
				buf = b;
			}
			n = read(fds[0], buf + len, cap - len - 1);
			if (n < 0)
				n = 0;
		}
		close(fds[0]);
		if (buf != NULL)
			buf[len] = '\0';
		*out = buf;
	}
	if (pid < 0)
		return -1;
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

static const char *xt_program(int v6)
{
	return v6 ? "ip6tables-nft" : "iptables-nft";
}

/* iptables-nft / ip6tables-nft: NFQUEUE is an xt target, and the kernels
 * this runs on may lack nft's own "queue". */
static int xtables(int v6, const char *op, const struct ms_steer_addr *a,
		   unsigned int port, unsigned int queue)
{
	char p[8], q[8];
	const char *argv[] = { xt_program(v6), "-w", "-t", "raw", op,
		"PREROUTING", "-d", a->text, "-p", "tcp", "--syn", "--dport",
		p, "-m", "comment", "--comment", HOLD_COMMENT, "-j", "NFQUEUE",
		"--queue-num", q, "--queue-bypass", NULL };

	snprintf(p, sizeof(p), "%u", port);
	snprintf(q, sizeof(q), "%u", queue);
	return run_argv(argv, NULL);
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

/* The rules of the raw table of a family: -1 when there is no such
 * table. (iptables-nft makes the table when it adds the first rule.) */
static int table_rules(int v6)
{
	struct nft_ctx *nft = nft_ctx_new(NFT_CTX_DEFAULT);
	json_t *all = NULL, *item;
	int n = -1;
	size_t i;

	if (nft == NULL)
		return -1;
	nft_ctx_output_set_flags(nft, NFT_CTX_OUTPUT_JSON);
	if (nft_ctx_buffer_output(nft) == 0 && nft_ctx_buffer_error(nft) == 0 &&
	    nft_run_cmd_from_buffer(nft, v6 ? "list table ip6 raw" :
				    "list table ip raw") == 0)
		all = json_loads(nft_ctx_get_output_buffer(nft), 0, NULL);
	if (all != NULL) {
		n = 0;
		json_array_foreach(json_object_get(all, "nftables"), i, item)
			n += json_object_get(item, "rule") != NULL;
		json_decref(all);
	}
	nft_ctx_free(nft);
	return n;
}

static int table_exists(int v6)
{
	return table_rules(v6) >= 0;
}

static void delete_table(int v6)
{
	char err[256];

	ms_steer_nft_run(v6 ? "delete table ip6 raw\n" :
			 "delete table ip raw\n", 0, err, sizeof(err));
}

/* One "-S" line: deleted when it is ours ("-A PREROUTING ... --comment
 * mailshift-hold ...", words without spaces or quotes, as we wrote it). */
static void delete_rule(int v6, char *line)
{
	const char *argv[48] = { xt_program(v6), "-w", "-t", "raw", "-D" };
	char *save = NULL, *w;
	size_t n = 5;

	if (strncmp(line, "-A PREROUTING ", 14) != 0 ||
	    !strstr(line, " --comment " HOLD_COMMENT " "))
		return;
	for (w = strtok_r(line + 3, " ", &save); w && n < 47;
	     w = strtok_r(NULL, " ", &save))
		argv[n++] = w;
	argv[n] = NULL;
	run_argv(argv, NULL);
}

/* The tables iptables-nft made for us. Only once nothing is queued from
 * them: unregistering a hook drops the packets it queued. */
static void remove_tables(struct hold *h)
{
	for (int v6 = 0; v6 < 2; v6++)
		if (!h->raw_existed[v6] && table_exists(v6))
			delete_table(v6);
}

/* Deletes every rule of ours in the raw tables, whatever its address, port
 * or queue (what a hold killed before it could clean up leaves), then a
 * raw table left with no rule. For steer remove, and before a hold. */
void steer_hold_clean(void)
{
	for (int v6 = 0; v6 < 2; v6++) {
		const char *list[] = { xt_program(v6), "-w", "-t", "raw", "-S",
				       "PREROUTING", NULL };
		char *out = NULL, *line, *save = NULL;

		if (table_rules(v6) < 0)
			continue;	/* no table: nothing of ours */
		if (run_argv(list, &out) == 0 && out != NULL)
			for (line = strtok_r(out, "\n", &save); line;
			     line = strtok_r(NULL, "\n", &save))
				delete_rule(v6, line);
		free(out);
		if (table_rules(v6) == 0)
			delete_table(v6);
	}
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
	signal(SIGTERM, on_stop);
	signal(SIGINT, on_stop);
	if (open_queue(&h, &nh, err, errsz) < 0)
		goto out;
	/* ours from a hold that died (the queue was free: none runs) */
	steer_hold_clean();
	for (int v6 = 0; v6 < 2; v6++)
		h.raw_existed[v6] = table_exists(v6);
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
