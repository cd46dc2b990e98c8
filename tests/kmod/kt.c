/* kt: the small TCP tool the module's VM test runs in its network
 * namespaces (built static, no libc of the guest needed).
 *   kt serve ADDR PORT NAME      a server: greets "NAME sees PEER", echoes
 *   kt tproxy PORT NAME          a transparent listener (IPv4 and IPv6)
 *                                greeting "NAME orig=LOCAL peer=PEER"
 *   kt imapd ADDR PORT NAME      an IMAP server, as much of one as
 *                                mailshiftd asks for: CAPABILITY, ID,
 *                                AUTHENTICATE PLAIN and LOGIN (any
 *                                password: logged "NAME login from PEER"),
 *                                NOOP, LOGOUT
 *   kt connect [-b SRC] [-h FILE] ADDR PORT
 *                                prints the greeting (or "refused",
 *                                "timeout"); with -h it then waits for FILE
 *                                to exist and prints the echo of a line
 *                                sent after it: the connection still works
 *   kt imap [-h FILE] ADDR PORT USER
 *                                an IMAP client: "from " and its own
 *                                address and port, the greeting, "login: "
 *                                and the server's answer to LOGIN; with -h
 *                                it then waits for FILE and sends NOOP
 *                                ("noop: " and the answer, or "noop:
 *                                reset" when the connection was reset);
 *                                then LOGOUT ("logout: " and the answer)
 *   kt exit N                    qemu's isa-debug-exit: the VM ends, N
 *                                its status */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/io.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define TIMEOUT_MS 5000
/* kt imap's password: any will do for kt imapd (not in argv, all the
 * same: mailshift's rule for passwords). */
#define KT_PASSWORD "kt-Pw-1"

enum kt_mode { KT_ECHO, KT_TPROXY, KT_IMAPD };

static int to_sa(const char *addr, int port, struct sockaddr_storage *ss,
		 socklen_t *len)
{
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof(*ss));
	if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		*len = sizeof(*s4);
		return 0;
	}
	if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		*len = sizeof(*s6);
		return 0;
	}
	return -1;
}

static void sa_text(const struct sockaddr_storage *ss, char *buf, size_t sz)
{
	char a[64];

	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *s = (const void *)ss;
		const unsigned char *b = (const void *)&s->sin_addr;

		/* An IPv4 peer of a dual-stack socket reads as IPv4. */
		inet_ntop(AF_INET, b, a, sizeof(a));
		snprintf(buf, sz, "%s:%u", a, ntohs(s->sin_port));
	} else {
		const struct sockaddr_in6 *s = (const void *)ss;

		inet_ntop(AF_INET6, &s->sin6_addr, a, sizeof(a));
		snprintf(buf, sz, "[%s]:%u", a, ntohs(s->sin6_port));
	}
}

/* The tagged answer of an IMAP server to a command; a login is logged,
 * with the peer's address (stdout: the server's log). */
static void imapd_answer(int fd, const char *tag, const char *cmd,
			 const char *name, const char *peer)
{
	if (!strcasecmp(cmd, "CAPABILITY")) {
		dprintf(fd, "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\n"
			"%s OK CAPABILITY completed.\r\n", tag);
	} else if (!strcasecmp(cmd, "ID")) {
		dprintf(fd, "* ID NIL\r\n%s OK ID completed.\r\n", tag);
	} else if (!strcasecmp(cmd, "AUTHENTICATE") ||
		   !strcasecmp(cmd, "LOGIN")) {
		printf("%s login from %s\n", name, peer);
		fflush(stdout);
		dprintf(fd, "%s OK %s logged in.\r\n", tag, name);
	} else if (!strcasecmp(cmd, "NOOP")) {
		dprintf(fd, "%s OK %s NOOP completed.\r\n", tag, name);
	} else if (!strcasecmp(cmd, "LOGOUT")) {
		dprintf(fd, "* BYE %s logging out.\r\n%s OK LOGOUT "
			"completed.\r\n", name, tag);
	} else {
		dprintf(fd, "%s BAD %s: unknown command.\r\n", tag, name);
	}
}

/* kt imapd's session: greets, answers each command until LOGOUT. An
 * AUTHENTICATE without an initial response gets its continuation first. */
static void imapd_one(int fd, const char *name, const char *peer)
{
	FILE *in = fdopen(fd, "r");
	char line[1024], tag[64], cmd[32], ir[8];

	dprintf(fd, "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] %s "
		"ready.\r\n", name);
	while (in != NULL && fgets(line, sizeof(line), in) != NULL) {
		int n = sscanf(line, "%63s %31s %*s %7s", tag, cmd, ir);

		if (n < 2) {
			dprintf(fd, "* BAD %s: no command.\r\n", name);
			continue;
		}
		if (n == 2 && !strcasecmp(cmd, "AUTHENTICATE")) {
			dprintf(fd, "+ \r\n");
			if (fgets(line, sizeof(line), in) == NULL)
				break;
		}
		imapd_answer(fd, tag, cmd, name, peer);
		if (!strcasecmp(cmd, "LOGOUT"))
			break;
	}
	_exit(0);
}

/* Greets, then echoes lines until the peer closes. */
static void serve_one(int fd, const char *name, enum kt_mode mode)
{
	struct sockaddr_storage local, peer;
	socklen_t ll = sizeof(local), pl = sizeof(peer);
	char l[80], p[80], buf[512];
	ssize_t n;

	getsockname(fd, (struct sockaddr *)&local, &ll);
	getpeername(fd, (struct sockaddr *)&peer, &pl);
	sa_text(&local, l, sizeof(l));
	sa_text(&peer, p, sizeof(p));
	if (mode == KT_IMAPD)
		imapd_one(fd, name, p);
	if (mode == KT_TPROXY)
		n = snprintf(buf, sizeof(buf), "%s orig=%s peer=%s\n", name, l,
			     p);
	else
		n = snprintf(buf, sizeof(buf), "%s sees %s\n", name, p);
	if (write(fd, buf, n) != n)
		_exit(1);
	/* The server's log: a leak past the gateway shows here. */
	printf("%s", buf);
	fflush(stdout);
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		if (write(fd, buf, n) != n)
			break;
	_exit(0);
}

static int listen_on(const char *addr, int port, int transparent)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int one = 1, fd;

	if (to_sa(addr, port, &ss, &len) < 0)
		return -1;
	fd = socket(ss.ss_family, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ss.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (transparent &&
	    setsockopt(fd, ss.ss_family == AF_INET ? SOL_IP : SOL_IPV6,
		       ss.ss_family == AF_INET ? IP_TRANSPARENT :
		       IPV6_TRANSPARENT, &one, sizeof(one)) < 0) {
		perror("kt: transparent");
		return -1;
	}
	if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, 64) < 0) {
		perror("kt: bind/listen");
		return -1;
	}
	return fd;
}

static int serve(int nfd, int *fds, const char *name, enum kt_mode mode)
{
	struct pollfd p[2];

	signal(SIGCHLD, SIG_IGN);
	for (int i = 0; i < nfd; i++) {
		if (fds[i] < 0)
			return 1;
		p[i].fd = fds[i];
		p[i].events = POLLIN;
	}
	/* Ready: the test waits for this line. */
	printf("listening\n");
	fflush(stdout);
	for (;;) {
		if (poll(p, nfd, -1) < 0 && errno != EINTR)
			return 1;
		for (int i = 0; i < nfd; i++) {
			int c;

			if (!(p[i].revents & POLLIN))
				continue;
			c = accept(p[i].fd, NULL, NULL);
			if (c < 0)
				continue;
			if (fork() == 0) {
				/* The listener goes with the parent only. */
				for (int j = 0; j < nfd; j++)
					close(fds[j]);
				serve_one(c, name, mode);
			}
			close(c);
		}
	}
}

static int read_line(int fd, char *buf, size_t sz)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	size_t n = 0;

	while (n + 1 < sz) {
		int r = poll(&p, 1, TIMEOUT_MS);
		ssize_t k;

		if (r <= 0) {
			errno = r == 0 ? ETIMEDOUT : errno;
			return -1;
		}
		k = read(fd, buf + n, 1);
		if (k <= 0) {
			/* errno: ECONNRESET for a reset; 0 at the end. */
			errno = k == 0 ? 0 : errno;
			return -1;
		}
		if (buf[n++] == '\n')
			break;
	}
	buf[n] = '\0';
	return 0;
}

static int wait_file(const char *path)
{
	struct stat st;

	for (int i = 0; i < 600; i++) {
		if (stat(path, &st) == 0)
			return 0;
		usleep(50000);
	}
	return -1;
}

/* A connection to ADDR PORT from SRC (or any address): its socket, or
 * -1 when it failed (said: "refused", "timeout" or why), -2 on bad
 * arguments. */
static int dial(const char *src, const char *addr, const char *port)
{
	struct sockaddr_storage ss, bs;
	struct pollfd p;
	socklen_t len, blen;
	int fd, err = 0;

	if (to_sa(addr, atoi(port), &ss, &len) < 0)
		return -2;
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (src && (to_sa(src, 0, &bs, &blen) < 0 ||
		    bind(fd, (struct sockaddr *)&bs, blen) < 0)) {
		perror("kt: bind");
		return -2;
	}
	if (connect(fd, (struct sockaddr *)&ss, len) < 0 &&
	    errno != EINPROGRESS) {
		printf("refused\n");
		return -1;
	}
	p.fd = fd;
	p.events = POLLOUT;
	len = sizeof(err);
	if (poll(&p, 1, TIMEOUT_MS) <= 0) {
		printf("timeout\n");
		return -1;
	}
	getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
	if (err) {
		printf("%s\n", err == ECONNREFUSED ? "refused" : strerror(err));
		return -1;
	}
	return fd;
}

static int connect_to(int argc, char **argv)
{
	const char *src = NULL, *hold = NULL;
	char buf[512];
	int fd, i = 2;

	for (; i + 1 < argc && argv[i][0] == '-'; i += 2) {
		if (!strcmp(argv[i], "-b"))
			src = argv[i + 1];
		else if (!strcmp(argv[i], "-h"))
			hold = argv[i + 1];
	}
	if (i + 2 != argc)
		return 2;
	fd = dial(src, argv[i], argv[i + 1]);
	if (fd < 0)
		return fd == -1 ? 1 : 2;
	if (read_line(fd, buf, sizeof(buf)) < 0) {
		printf("no greeting\n");
		return 1;
	}
	printf("%s", buf);
	fflush(stdout);
	if (!hold)
		return 0;
	if (wait_file(hold) < 0 || write(fd, "again\n", 6) != 6 ||
	    read_line(fd, buf, sizeof(buf)) < 0) {
		printf("held: lost\n");
		return 1;
	}
	printf("held: %s", buf);
	return 0;
}

/* Sends an IMAP command and prints "WHAT: " and its tagged answer, or
 * "WHAT: reset" (the connection was reset) or "WHAT: lost". */
static int imap_say(int fd, const char *tag, const char *cmd,
		    const char *what)
{
	size_t tl = strlen(tag);
	char buf[512];

	if (dprintf(fd, "%s %s\r\n", tag, cmd) < 0)
		goto lost;
	do {
		if (read_line(fd, buf, sizeof(buf)) < 0)
			goto lost;
	} while (strncmp(buf, tag, tl) != 0 || buf[tl] != ' ');
	buf[strcspn(buf, "\r\n")] = '\0';
	printf("%s: %s\n", what, buf + tl + 1);
	return 0;
lost:
	printf("%s: %s\n", what, errno == ECONNRESET ? "reset" : "lost");
	return -1;
}

static int imap_client(int argc, char **argv)
{
	struct sockaddr_storage me;
	socklen_t ml = sizeof(me);
	const char *hold = NULL;
	char buf[512];
	int fd, i = 2;

	if (i + 1 < argc && !strcmp(argv[i], "-h")) {
		hold = argv[i + 1];
		i += 2;
	}
	if (i + 3 != argc)
		return 2;
	fd = dial(NULL, argv[i], argv[i + 1]);
	if (fd < 0)
		return fd == -1 ? 1 : 2;
	/* The client's side, for the test to find the session by. */
	getsockname(fd, (struct sockaddr *)&me, &ml);
	sa_text(&me, buf, sizeof(buf));
	printf("from %s\n", buf);
	if (read_line(fd, buf, sizeof(buf)) < 0) {
		printf("no greeting\n");
		return 1;
	}
	buf[strcspn(buf, "\r\n")] = '\0';
	printf("%s\n", buf);
	snprintf(buf, sizeof(buf), "LOGIN %s %s", argv[i + 2], KT_PASSWORD);
	if (imap_say(fd, "a", buf, "login") < 0)
		return 1;
	if (hold && (wait_file(hold) < 0 ||
		     imap_say(fd, "b", "NOOP", "noop") < 0))
		return 1;
	return imap_say(fd, "c", "LOGOUT", "logout") < 0;
}

int main(int argc, char **argv)
{
	int fds[2];

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 5 && !strcmp(argv[1], "serve")) {
		fds[0] = listen_on(argv[2], atoi(argv[3]), 0);
		return serve(1, fds, argv[4], KT_ECHO);
	}
	if (argc == 5 && !strcmp(argv[1], "imapd")) {
		fds[0] = listen_on(argv[2], atoi(argv[3]), 0);
		return serve(1, fds, argv[4], KT_IMAPD);
	}
	if (argc == 4 && !strcmp(argv[1], "tproxy")) {
		fds[0] = listen_on("0.0.0.0", atoi(argv[2]), 1);
		fds[1] = listen_on("::", atoi(argv[2]), 1);
		return serve(2, fds, argv[3], KT_TPROXY);
	}
	if (argc >= 4 && !strcmp(argv[1], "connect"))
		return connect_to(argc, argv);
	if (argc >= 5 && !strcmp(argv[1], "imap"))
		return imap_client(argc, argv);
	if (argc == 3 && !strcmp(argv[1], "exit")) {
		if (ioperm(0xf4, 4, 1) == 0)
			outl(atoi(argv[2]), 0xf4);
		return 1;
	}
	fprintf(stderr, "usage: kt serve|tproxy|imapd|connect|imap|exit ...\n");
	return 2;
}
