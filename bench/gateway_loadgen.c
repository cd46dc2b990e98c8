/* Load generator for bench/gateway_bench.py (not part of mailshift itself).
 *
 * One thread, epoll, non-blocking sockets, optional TLS (OpenSSL). Client
 * sockets are spread over 127.0.1.1..127.0.1.N with IP_BIND_ADDRESS_NO_PORT
 * so that repeated runs do not run out of ephemeral ports.
 *
 *   gateway_loadgen --port P --proto imap|pop3 --mode cycle|idle|fetch
 *                   [--sessions N] [--concurrency C] [--users U]
 *                   [--user-prefix u] [--password PW] [--user NAME]
 *                   [--src-ips 32] [--tls --ca FILE] [--fetches K]
 *                   [--timeout S]
 *
 * cycle: N sessions, at most C at a time, each: connect, greeting, LOGIN
 *        (USER/PASS), SELECT INBOX (STAT), LOGOUT (QUIT), close.
 * idle:  N sessions (C opening at a time) that log in, SELECT INBOX and then
 *        stay open. When all are open (or failed) it prints "READY {json}"
 *        and waits for a line (or EOF) on stdin, then closes them all and
 *        prints "DONE {json}". A session the server closes meanwhile counts
 *        as dropped.
 * fetch: one session: login, SELECT INBOX, K times UID FETCH 1:* BODY.PEEK[]
 *        (--fetches K, each timed from the command to its tagged OK), LOGOUT.
 *
 * Session i logs in as PREFIX%04d (i % U) unless --user is given. The result
 * is one JSON object on stdout (after "DONE " in idle mode). Exit 0 when it
 * ran (errors are in the JSON), 2 for bad usage, 3 on --timeout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define LINE_CAP 4096
#define LINE_KEEP 1024		/* prefix kept when a line overflows */
#define LINE_TAIL 64		/* ... and its last bytes (for {N}) */
#define RBUF (1 << 20)
#define MAX_SAMPLES 8

enum proto { P_IMAP, P_POP3 };
enum mode { M_CYCLE, M_IDLE, M_FETCH };
enum st {
	S_FREE, S_CONNECTING, S_TLS, S_GREETING, S_LOGIN, S_SELECT, S_LOGOUT,
	S_IDLE, S_FETCH,
	S_P_USER, S_P_PASS, S_P_STAT, S_P_QUIT,
};
static const char *st_name[] = {
	"free", "connect", "tls-handshake", "greeting", "login", "select",
	"logout", "idle", "fetch", "user", "pass", "stat", "quit",
};

struct conn {
	int fd;
	int idx;
	enum st st;
	SSL *ssl;
	uint32_t ev;
	int bye;
	uint64_t t0;
	char line[LINE_CAP];
	size_t linelen;
	uint64_t lit_left;
};

static enum proto proto = P_IMAP;
static enum mode mode = M_CYCLE;
static int port, nsessions = 1, concurrency = 1, nusers = 1, nsrc = 32;
static const char *user_prefix = "u", *password = "pw", *fixed_user;
static int use_tls;
static const char *ca_file;
static double timeout_s = 600;
static int nfetches = 1;

static int ep;
static SSL_CTX *ctx;
static struct conn *conns;
static char *rbuf;
static int started, finished, ok, errors, active, established, dropped;
static int idle_open;
static uint64_t *lat;
static int nlat;
static char *samples[MAX_SAMPLES];
static int nsamples;
static uint64_t rx_bytes, lit_bytes;
static uint64_t t_start, t_fetch0;
static struct rusage ru_fetch0;
static int fetch_ok, fetches_done;
static double fetch_secs[64], fetch_cpu_total;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("gateway_loadgen: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static void sample(struct conn *c, const char *fmt, ...)
{
	char buf[512];
	int n;
	va_list ap;

	if (nsamples >= MAX_SAMPLES)
		return;
	n = snprintf(buf, sizeof(buf), "session %d (%s): ", c->idx,
		     st_name[c->st]);
	va_start(ap, fmt);
	vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	samples[nsamples++] = strdup(buf);
}

static void set_events(struct conn *c, uint32_t ev)
{
	struct epoll_event e = { .events = ev, .data.ptr = c };

	if (ev == c->ev)
		return;
	if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) < 0)
		die("epoll_ctl: %s", strerror(errno));
	c->ev = ev;
}

static void start_next(void);

static void conn_close(struct conn *c)
{
	if (c->ssl) {
		SSL_free(c->ssl);
		c->ssl = NULL;
	}
	if (c->fd >= 0) {
		close(c->fd);	/* also leaves the epoll set */
		c->fd = -1;
	}
	c->st = S_FREE;
}

/* A session ended (well or not); frees its slot in the opening window. */
static void session_end(struct conn *c, int success)
{
	int was_idle = c->st == S_IDLE;

	if (success) {
		ok++;
		lat[nlat++] = now_ns() - c->t0;
	} else {
		errors++;
	}
	conn_close(c);
	if (was_idle) {
		idle_open--;
		return;
	}
	finished++;
	active--;
	start_next();
}

static void fail(struct conn *c, const char *fmt, ...)
{
	char buf[400];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	sample(c, "%s", buf);
	session_end(c, 0);
}

static const char *user_of(int idx, char *buf, size_t n)
{
	if (fixed_user)
		return fixed_user;
	snprintf(buf, n, "%s%04d", user_prefix, idx % nusers);
	return buf;
}

static int send_str(struct conn *c, const char *s)
{
	size_t len = strlen(s);
	ssize_t w;

	if (c->ssl) {
		int r = SSL_write(c->ssl, s, (int)len);
		if (r != (int)len) {
			fail(c, "SSL_write: error %d", SSL_get_error(c->ssl, r));
			return -1;
		}
		return 0;
	}
	w = send(c->fd, s, len, MSG_NOSIGNAL);
	if (w != (ssize_t)len) {
		fail(c, "send: %s", w < 0 ? strerror(errno) : "short write");
		return -1;
	}
	return 0;
}

static int sendf(struct conn *c, const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	return send_str(c, buf);
}

static int tagged(const char *line, size_t len, char tag, int *okp)
{
	if (len < 2 || line[0] != tag || line[1] != ' ')
		return 0;
	*okp = len >= 4 && strncmp(line + 2, "OK", 2) == 0;
	return 1;
}

/* One complete response line (without CRLF). Returns -1 when the
 * connection is gone. */
static int on_line(struct conn *c, const char *line, size_t len)
{
	char ub[64];
	int good;

	if (proto == P_POP3) {
		int pos = len >= 3 && strncmp(line, "+OK", 3) == 0;
		if (!pos) {
			fail(c, "%.*s", (int)(len > 200 ? 200 : len), line);
			return -1;
		}
		switch (c->st) {
		case S_GREETING:
			c->st = S_P_USER;
			return sendf(c, "USER %s\r\n", user_of(c->idx, ub,
							       sizeof(ub)));
		case S_P_USER:
			c->st = S_P_PASS;
			return sendf(c, "PASS %s\r\n", password);
		case S_P_PASS:
			c->st = S_P_STAT;
			return send_str(c, "STAT\r\n");
		case S_P_STAT:
			if (mode == M_IDLE) {
				c->st = S_IDLE;
				established++;
				idle_open++;
				lat[nlat++] = now_ns() - c->t0;
				active--;
				finished++;
				start_next();
				return 0;
			}
			c->st = S_P_QUIT;
			return send_str(c, "QUIT\r\n");
		case S_P_QUIT:
			session_end(c, 1);
			return -1;
		default:
			return 0;
		}
	}

	switch (c->st) {
	case S_GREETING:
		if (len < 4 || strncmp(line, "* OK", 4) != 0) {
			fail(c, "greeting: %.*s", (int)(len > 200 ? 200 : len),
			     line);
			return -1;
		}
		c->st = S_LOGIN;
		return sendf(c, "a LOGIN %s %s\r\n",
			     user_of(c->idx, ub, sizeof(ub)), password);
	case S_LOGIN:
		if (!tagged(line, len, 'a', &good))
			return 0;
		if (!good) {
			fail(c, "%.*s", (int)(len > 200 ? 200 : len), line);
			return -1;
		}
		c->st = S_SELECT;
		return send_str(c, "b SELECT INBOX\r\n");
	case S_SELECT:
		if (!tagged(line, len, 'b', &good))
			return 0;
		if (!good) {
			fail(c, "%.*s", (int)(len > 200 ? 200 : len), line);
			return -1;
		}
		if (mode == M_IDLE) {
			c->st = S_IDLE;
			established++;
			idle_open++;
			lat[nlat++] = now_ns() - c->t0;
			active--;
			finished++;
			start_next();
			return 0;
		}
		if (mode == M_FETCH) {
			c->st = S_FETCH;
			getrusage(RUSAGE_SELF, &ru_fetch0);
			t_fetch0 = now_ns();
			return send_str(c, "f UID FETCH 1:* BODY.PEEK[]\r\n");
		}
		c->st = S_LOGOUT;
		return send_str(c, "c LOGOUT\r\n");
	case S_FETCH: {
		struct rusage ru;
		uint64_t t1;

		if (!tagged(line, len, 'f', &good))
			return 0;
		t1 = now_ns();
		getrusage(RUSAGE_SELF, &ru);
		if (!good) {
			fail(c, "%.*s", (int)(len > 200 ? 200 : len), line);
			return -1;
		}
		fetch_secs[fetches_done++] = (t1 - t_fetch0) / 1e9;
		fetch_cpu_total +=
			(ru.ru_utime.tv_sec - ru_fetch0.ru_utime.tv_sec) +
			(ru.ru_utime.tv_usec - ru_fetch0.ru_utime.tv_usec) / 1e6 +
			(ru.ru_stime.tv_sec - ru_fetch0.ru_stime.tv_sec) +
			(ru.ru_stime.tv_usec - ru_fetch0.ru_stime.tv_usec) / 1e6;
		if (fetches_done < nfetches) {
			ru_fetch0 = ru;
			t_fetch0 = now_ns();
			return send_str(c, "f UID FETCH 1:* BODY.PEEK[]\r\n");
		}
		fetch_ok = 1;
		c->st = S_LOGOUT;
		return send_str(c, "c LOGOUT\r\n");
	}
	case S_LOGOUT:
		if (len >= 5 && strncmp(line, "* BYE", 5) == 0)
			c->bye = 1;
		if (!tagged(line, len, 'c', &good))
			return 0;
		session_end(c, good);
		return -1;
	default:
		return 0;
	}
}

/* Feeds received bytes through the line/literal machine. Returns -1 when the
 * connection is gone. */
static int feed(struct conn *c, const char *p, size_t n)
{
	rx_bytes += n;
	while (n > 0) {
		if (c->lit_left) {
			size_t k = n < c->lit_left ? n : c->lit_left;
			c->lit_left -= k;
			lit_bytes += k;
			p += k;
			n -= k;
			continue;
		}
		const char *nl = memchr(p, '\n', n);
		size_t k = nl ? (size_t)(nl - p) + 1 : n;
		for (size_t i = 0; i < k; i++) {
			if (c->linelen == LINE_CAP) {
				memmove(c->line + LINE_KEEP,
					c->line + LINE_CAP - LINE_TAIL,
					LINE_TAIL);
				c->linelen = LINE_KEEP + LINE_TAIL;
			}
			c->line[c->linelen++] = p[i];
		}
		p += k;
		n -= k;
		if (!nl)
			break;
		size_t len = c->linelen;
		c->linelen = 0;
		while (len && (c->line[len - 1] == '\n' ||
			       c->line[len - 1] == '\r'))
			len--;
		c->line[len] = 0;
		if (proto == P_IMAP && len >= 3 && c->line[len - 1] == '}') {
			size_t j = len - 2;
			while (j > 0 && c->line[j] >= '0' && c->line[j] <= '9')
				j--;
			if (c->line[j] == '{' && j < len - 2) {
				c->lit_left = strtoull(c->line + j + 1, NULL,
						       10);
				/* the line goes on after the literal; the
				 * part before it is not a tagged reply */
				continue;
			}
		}
		if (on_line(c, c->line, len) < 0)
			return -1;
	}
	return 0;
}

static void on_eof(struct conn *c, const char *why)
{
	if (c->st == S_LOGOUT && c->bye) {
		session_end(c, 1);
		return;
	}
	if (c->st == S_IDLE) {
		dropped++;
		idle_open--;
		conn_close(c);
		return;
	}
	fail(c, "%s", why);
}

static void do_read(struct conn *c)
{
	for (;;) {
		if (c->ssl) {
			int r = SSL_read(c->ssl, rbuf, RBUF);
			if (r > 0) {
				if (feed(c, rbuf, r) < 0)
					return;
				continue;
			}
			int e = SSL_get_error(c->ssl, r);
			if (e == SSL_ERROR_WANT_READ)
				return;
			if (e == SSL_ERROR_ZERO_RETURN ||
			    (e == SSL_ERROR_SYSCALL && r == 0)) {
				on_eof(c, "connection closed (TLS)");
				return;
			}
			char eb[160];
			ERR_error_string_n(ERR_get_error(), eb, sizeof(eb));
			on_eof(c, eb);
			return;
		}
		ssize_t r = recv(c->fd, rbuf, RBUF, 0);
		if (r > 0) {
			if (feed(c, rbuf, r) < 0)
				return;
			if (r < RBUF)
				return;	/* level-triggered: more comes as events */
			continue;
		}
		if (r == 0) {
			on_eof(c, "connection closed by server");
			return;
		}
		if (errno == EAGAIN || errno == EINTR)
			return;
		on_eof(c, strerror(errno));
		return;
	}
}

static void do_handshake(struct conn *c)
{
	int r = SSL_connect(c->ssl);

	if (r == 1) {
		c->st = S_GREETING;
		set_events(c, EPOLLIN);
		do_read(c);
		return;
	}
	int e = SSL_get_error(c->ssl, r);
	if (e == SSL_ERROR_WANT_READ) {
		set_events(c, EPOLLIN);
		return;
	}
	if (e == SSL_ERROR_WANT_WRITE) {
		set_events(c, EPOLLIN | EPOLLOUT);
		return;
	}
	char eb[160];
	ERR_error_string_n(ERR_get_error(), eb, sizeof(eb));
	fail(c, "TLS handshake: %s", eb);
}

static void connected(struct conn *c)
{
	if (use_tls) {
		c->ssl = SSL_new(ctx);
		if (!c->ssl)
			die("SSL_new failed");
		SSL_set_fd(c->ssl, c->fd);
		X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl),
					      "127.0.0.1");
		c->st = S_TLS;
		do_handshake(c);
		return;
	}
	c->st = S_GREETING;
	set_events(c, EPOLLIN);
}

static void start_one(int idx)
{
	struct conn *c = NULL;
	struct sockaddr_in src = { .sin_family = AF_INET }, dst = {
		.sin_family = AF_INET };
	int one = 1;

	for (int i = 0; i < nsessions; i++) {
		/* slots: idle mode keeps every session, else a window of C */
		int k = (mode == M_IDLE) ? idx : (idx + i) % concurrency;
		if (conns[k].st == S_FREE) {
			c = &conns[k];
			break;
		}
		if (mode == M_IDLE)
			break;
	}
	if (!c)
		die("no free connection slot (internal error)");
	memset(c, 0, offsetof(struct conn, line));
	c->linelen = 0;
	c->lit_left = 0;
	c->idx = idx;
	c->t0 = now_ns();
	c->st = S_CONNECTING;
	active++;
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		fail(c, "socket: %s", strerror(errno));
		return;
	}
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one,
		   sizeof(one));
	src.sin_addr.s_addr = htonl(0x7f000100u + 1 + (idx % nsrc));
	if (bind(c->fd, (struct sockaddr *)&src, sizeof(src)) < 0) {
		fail(c, "bind: %s", strerror(errno));
		return;
	}
	dst.sin_addr.s_addr = htonl(0x7f000001u);
	dst.sin_port = htons(port);
	struct epoll_event e = { .events = EPOLLOUT, .data.ptr = c };
	c->ev = EPOLLOUT;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e) < 0)
		die("epoll_ctl add: %s", strerror(errno));
	if (connect(c->fd, (struct sockaddr *)&dst, sizeof(dst)) < 0 &&
	    errno != EINPROGRESS) {
		fail(c, "connect: %s", strerror(errno));
		return;
	}
}

static int in_start_next;

static void start_next(void)
{
	/* iterative, so a run of immediate failures cannot recurse deeply */
	if (in_start_next)
		return;
	in_start_next = 1;
	while (active < concurrency && started < nsessions)
		start_one(started++);
	in_start_next = 0;
}

static void on_event(struct conn *c, uint32_t ev)
{
	if (c->st == S_CONNECTING) {
		int err = 0;
		socklen_t l = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
		if (err) {
			fail(c, "connect: %s", strerror(err));
			return;
		}
		connected(c);
		return;
	}
	if (c->st == S_TLS) {
		do_handshake(c);
		return;
	}
	if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
		do_read(c);
}

static void json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20 || ch >= 0x7f)
			fprintf(f, "\\u%04x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct(double p)
{
	if (nlat == 0)
		return 0;
	int i = (int)(p * (nlat - 1) + 0.5);
	return lat[i] / 1e6;
}

static void report(FILE *f, const char *prefix, int timed_out)
{
	struct rusage ru;
	double wall = (now_ns() - t_start) / 1e9;

	getrusage(RUSAGE_SELF, &ru);
	qsort(lat, nlat, sizeof(*lat), cmp_u64);
	if (prefix)
		fputs(prefix, f);
	fprintf(f, "{\"mode\": \"%s\", \"proto\": \"%s\", \"tls\": %s, "
		"\"sessions\": %d, \"concurrency\": %d, \"ok\": %d, "
		"\"errors\": %d, \"established\": %d, \"dropped\": %d, "
		"\"open\": %d, \"timed_out\": %s, \"wall\": %.6f, "
		"\"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"rx_bytes\": %llu, "
		"\"lat_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
		"\"max\": %.3f}",
		mode == M_CYCLE ? "cycle" : mode == M_IDLE ? "idle" : "fetch",
		proto == P_IMAP ? "imap" : "pop3", use_tls ? "true" : "false",
		nsessions, concurrency, ok, errors, established, dropped,
		idle_open, timed_out ? "true" : "false", wall,
		ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
		ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
		(unsigned long long)rx_bytes, pct(0.5), pct(0.9), pct(0.99),
		nlat ? lat[nlat - 1] / 1e6 : 0.0);
	if (mode == M_FETCH) {
		double tot = 0;

		fprintf(f, ", \"fetch_ok\": %s, \"fetches\": %d, "
			"\"fetch_seconds_each\": [", fetch_ok ? "true" : "false",
			fetches_done);
		for (int i = 0; i < fetches_done; i++) {
			fprintf(f, "%s%.6f", i ? ", " : "", fetch_secs[i]);
			tot += fetch_secs[i];
		}
		fprintf(f, "], \"fetch_seconds_total\": %.6f, "
			"\"fetch_cpu\": %.6f, \"literal_bytes\": %llu",
			tot, fetch_cpu_total, (unsigned long long)lit_bytes);
	}
	fputs(", \"error_samples\": [", f);
	for (int i = 0; i < nsamples; i++) {
		if (i)
			fputs(", ", f);
		json_str(f, samples[i]);
	}
	fputs("]}\n", f);
	fflush(f);
}

static void usage(void)
{
	die("usage: gateway_loadgen --port P [--proto imap|pop3] "
	    "[--mode cycle|idle|fetch] [--sessions N] [--concurrency C] "
	    "[--users U] [--user-prefix S] [--user NAME] [--password PW] "
	    "[--src-ips N] [--tls --ca FILE] [--fetches K] [--timeout S]");
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && (i++, 1))
		if (OPT("--port"))
			port = atoi(v);
		else if (OPT("--proto"))
			proto = strcmp(v, "pop3") == 0 ? P_POP3 : P_IMAP;
		else if (OPT("--mode"))
			mode = strcmp(v, "idle") == 0 ? M_IDLE :
			       strcmp(v, "fetch") == 0 ? M_FETCH : M_CYCLE;
		else if (OPT("--sessions"))
			nsessions = atoi(v);
		else if (OPT("--concurrency"))
			concurrency = atoi(v);
		else if (OPT("--users"))
			nusers = atoi(v);
		else if (OPT("--user-prefix"))
			user_prefix = v;
		else if (OPT("--user"))
			fixed_user = v;
		else if (OPT("--password"))
			password = v;
		else if (OPT("--src-ips"))
			nsrc = atoi(v);
		else if (OPT("--ca"))
			ca_file = v;
		else if (OPT("--timeout"))
			timeout_s = atof(v);
		else if (OPT("--fetches"))
			nfetches = atoi(v);
		else if (strcmp(a, "--tls") == 0)
			use_tls = 1;
		else
			usage();
#undef OPT
	}
	if (port <= 0 || nsessions <= 0 || concurrency <= 0 || nusers <= 0 ||
	    nsrc <= 0 || nsrc > 254 || nfetches < 1 || nfetches > 64)
		usage();
	if (mode == M_FETCH)
		nsessions = concurrency = 1;
	if (concurrency > nsessions)
		concurrency = nsessions;
	if (use_tls) {
		ctx = SSL_CTX_new(TLS_client_method());
		if (!ctx)
			die("SSL_CTX_new failed");
		if (ca_file) {
			if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1)
				die("cannot load CA %s", ca_file);
			SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
		}
	}
	int nslots = mode == M_IDLE ? nsessions : concurrency;
	conns = calloc(nslots, sizeof(*conns));
	lat = calloc(nsessions, sizeof(*lat));
	rbuf = malloc(RBUF);
	if (!conns || !lat || !rbuf)
		die("out of memory");
	for (int i = 0; i < nslots; i++) {
		conns[i].fd = -1;
		conns[i].st = S_FREE;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1: %s", strerror(errno));
	t_start = now_ns();
	uint64_t deadline = t_start + (uint64_t)(timeout_s * 1e9);
	int ready = 0;
	start_next();
	struct epoll_event evs[256];
	for (;;) {
		if (!ready && finished >= nsessions) {
			if (mode != M_IDLE)
				break;
			report(stdout, "READY ", 0);
			ready = 1;
			/* now wait for the end of the hold on stdin */
			struct epoll_event e = { .events = EPOLLIN,
						 .data.ptr = NULL };
			if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e) < 0)
				die("epoll_ctl stdin: %s", strerror(errno));
		}
		if (!ready && now_ns() > deadline) {
			report(stdout, mode == M_IDLE ? "DONE " : NULL, 1);
			return 3;
		}
		int n = epoll_wait(ep, evs, 256, 200);
		if (n < 0 && errno != EINTR)
			die("epoll_wait: %s", strerror(errno));
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (c == NULL) {
				/* stdin: the hold is over (idle mode) */
				for (int k = 0; k < nslots; k++)
					if (conns[k].st == S_IDLE)
						conn_close(&conns[k]);
				report(stdout, "DONE ", 0);
				return 0;
			}
			if (c->st == S_FREE)
				continue;
			on_event(c, evs[i].events);
		}
	}
	report(stdout, NULL, 0);
	return 0;
}
