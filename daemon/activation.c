/* Socket activation by hand: the protocol of sd_listen_fds(3) is three
 * environment variables and fds from 3 up, so it is read here rather than
 * by linking libsystemd for one call (docs/dependencies.md). The inherited
 * sockets are matched to the [listen] addresses by getsockname(). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "activation.h"
#include "net.h"

#define FIRST_FD 3		/* SD_LISTEN_FDS_START */
#define MAX_FDS 64

struct inherited {
	int fd;
	int taken;
	char name[64];		/* LISTEN_FDNAMES' entry, or "fd N" */
	struct sockaddr_storage ss;
};

static struct inherited fds[MAX_FDS];
static int nfds;

static int env_number(const char *name, long *v)
{
	const char *s = getenv(name);
	char *e;

	if (s == NULL || *s == '\0')
		return -1;
	errno = 0;
	*v = strtol(s, &e, 10);
	return *e || errno || *v < 0 ? -1 : 0;
}

/* "ADDR:PORT" of a bound socket, for messages. */
static void format_addr(const struct sockaddr_storage *ss, char *out,
			size_t outsz)
{
	char a[INET6_ADDRSTRLEN] = "?";

	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const void *)ss;

		inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof(a));
		snprintf(out, outsz, "[%s]:%u", a, ntohs(s6->sin6_port));
	} else if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *s4 = (const void *)ss;

		inet_ntop(AF_INET, &s4->sin_addr, a, sizeof(a));
		snprintf(out, outsz, "%s:%u", a, ntohs(s4->sin_port));
	} else {
		snprintf(out, outsz, "(address family %d)", ss->ss_family);
	}
}

static int same_addr(const struct sockaddr_storage *a,
		     const struct sockaddr_storage *b)
{
	const struct sockaddr_in6 *a6 = (const void *)a, *b6 = (const void *)b;
	const struct sockaddr_in *a4 = (const void *)a, *b4 = (const void *)b;

	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET6)
		return a6->sin6_port == b6->sin6_port &&
		       !memcmp(&a6->sin6_addr, &b6->sin6_addr,
			       sizeof(a6->sin6_addr));
	return a4->sin_port == b4->sin_port &&
	       a4->sin_addr.s_addr == b4->sin_addr.s_addr;
}

static int sockopt(int fd, int level, int opt)
{
	int v = 0;
	socklen_t len = sizeof(v);

	return getsockopt(fd, level, opt, &v, &len) < 0 ? -1 : v;
}

/* What each inherited fd is: a listening TCP socket and its address. */
static int describe(struct inherited *in, char *err, size_t errsz)
{
	socklen_t len = sizeof(in->ss);

	if (getsockname(in->fd, (struct sockaddr *)&in->ss, &len) < 0 ||
	    (in->ss.ss_family != AF_INET && in->ss.ss_family != AF_INET6) ||
	    sockopt(in->fd, SOL_SOCKET, SO_TYPE) != SOCK_STREAM ||
	    sockopt(in->fd, SOL_SOCKET, SO_ACCEPTCONN) != 1) {
		snprintf(err, errsz, "inherited socket %s is not a listening "
			 "TCP/IP socket (the socket unit may list only "
			 "ListenStream= addresses)", in->name);
		return -1;
	}
	/* it is ours now: no program we might start inherits it */
	fcntl(in->fd, F_SETFD, FD_CLOEXEC);
	return 0;
}

int ms_activation_init(char *err, size_t errsz)
{
	const char *names = getenv("LISTEN_FDNAMES");
	long pid, n;

	if (env_number("LISTEN_PID", &pid) < 0 || pid != (long)getpid() ||
	    env_number("LISTEN_FDS", &n) < 0 || n == 0)
		return 0;	/* not activated, or meant for another process */
	if (n > MAX_FDS) {
		snprintf(err, errsz, "LISTEN_FDS=%ld: at most %d inherited "
			 "sockets", n, MAX_FDS);
		return -1;
	}
	for (nfds = 0; nfds < n; nfds++) {
		struct inherited *in = &fds[nfds];
		size_t len = names ? strcspn(names, ":") : 0;

		in->fd = FIRST_FD + nfds;
		if (len > 0 && len < sizeof(in->name))
			snprintf(in->name, sizeof(in->name), "\"%.*s\" (fd %d)",
				 (int)len, names, in->fd);
		else
			snprintf(in->name, sizeof(in->name), "fd %d", in->fd);
		if (names)
			names = names[len] ? names + len + 1 : NULL;
		if (describe(in, err, errsz) < 0)
			return -1;
	}
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	return nfds;
}

/* The inherited socket for addrport, checked against the config. */
static int take(const char *addrport, int transparent, char *err,
		size_t errsz)
{
	struct sockaddr_storage want;
	int v6, t;

	if (ms_addrport_parse(addrport, &want) < 0) {
		snprintf(err, errsz, "bad listen address %s (want ADDR:PORT "
			 "or [IPV6]:PORT)", addrport);
		return -1;
	}
	for (int i = 0; i < nfds; i++) {
		struct inherited *in = &fds[i];

		if (in->taken || !same_addr(&in->ss, &want))
			continue;
		v6 = want.ss_family == AF_INET6;
		t = v6 ? sockopt(in->fd, SOL_IPV6, IPV6_TRANSPARENT) :
			 sockopt(in->fd, SOL_IP, IP_TRANSPARENT);
		if (!t != !transparent) {
			snprintf(err, errsz, "listener %s: the inherited socket "
				 "%s is %stransparent but [listen] transparent "
				 "is %s (Transparent= in the socket unit)",
				 addrport, in->name, t ? "" : "not ",
				 transparent ? "yes" : "no");
			return -1;
		}
		if (v6 && sockopt(in->fd, IPPROTO_IPV6, IPV6_V6ONLY) != 1) {
			snprintf(err, errsz, "listener %s: the inherited socket "
				 "%s takes IPv4 too; mailshiftd's IPv6 listeners "
				 "are IPv6-only (BindIPv6Only=ipv6-only in the "
				 "socket unit)", addrport, in->name);
			return -1;
		}
		in->taken = 1;
		return in->fd;
	}
	snprintf(err, errsz, "listener %s: no inherited socket is bound to "
		 "it (the socket unit needs ListenStream=%s)", addrport,
		 addrport);
	return -1;
}

int ms_activation_listen(uv_loop_t *loop, uv_tcp_t *tcp, const char *addrport,
			 int transparent, uv_connection_cb cb, char *err,
			 size_t errsz)
{
	int fd;

	if (nfds == 0)
		return ms_listen(loop, tcp, addrport, transparent, cb, err,
				 errsz);
	fd = take(addrport, transparent, err, errsz);
	if (fd < 0)
		return UV_EINVAL;
	return ms_listen_fd(loop, tcp, fd, addrport, cb, err, errsz);
}

int ms_activation_check_all_taken(char *err, size_t errsz)
{
	char a[80];

	for (int i = 0; i < nfds; i++) {
		if (fds[i].taken)
			continue;
		format_addr(&fds[i].ss, a, sizeof(a));
		snprintf(err, errsz, "inherited socket %s on %s matches no "
			 "[listen] address of the configuration", fds[i].name,
			 a);
		return -1;
	}
	return 0;
}
