/* kmod_load: the load of the kernel module benchmark (bench/kmod_bench.py),
 * run in its VM's network namespaces, built static. Not part of mailshift.
 *   kmod_load sink ADDR PORT        a TCP server: accepts, reads to the
 *                                   end, closes; one connection at a time
 *   kmod_load udpsink ADDR PORT     a UDP socket that drains what comes
 *   kmod_load rate ADDR PORT SECS   connects and closes again and again:
 *                                   "connections N persec R"
 *   kmod_load stream [-p SPORT] ADDR PORT SECS
 *                                   one connection (from SPORT if given)
 *                                   writing 64 KiB at a time: "bytes N
 *                                   mbps R" (MB/s)
 *   kmod_load udp ADDR PORT SECS    64-byte datagrams as fast as they go:
 *                                   "packets N persec R" */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(const char *a, int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };

	sa.sin_port = htons(port);
	if (inet_pton(AF_INET, a, &sa.sin_addr) != 1) {
		fprintf(stderr, "kmod_load: %s: not an IPv4 address\n", a);
		exit(2);
	}
	return sa;
}

static int bound(int type, const char *a, int port)
{
	struct sockaddr_in sa = addr_of(a, port);
	int fd = socket(AF_INET, type, 0), one = 1;

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("kmod_load: bind");
		exit(1);
	}
	return fd;
}

static _Noreturn void sink(const char *a, int port)
{
	int fd = bound(SOCK_STREAM, a, port), c;
	static char buf[1 << 16];

	listen(fd, 512);
	printf("listening\n");
	fflush(stdout);
	for (;;) {
		c = accept(fd, NULL, NULL);
		if (c < 0)
			continue;
		while (read(c, buf, sizeof(buf)) > 0)
			;
		close(c);
	}
}

static _Noreturn void udpsink(const char *a, int port)
{
	int fd = bound(SOCK_DGRAM, a, port);
	char buf[2048];

	printf("listening\n");
	fflush(stdout);
	for (;;)
		recv(fd, buf, sizeof(buf), 0);
}

static int rate(const char *a, int port, double secs)
{
	struct sockaddr_in sa = addr_of(a, port);
	double t0 = now(), t;
	long n = 0;
	int fd;

	do {
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			perror("kmod_load: connect");
			return 1;
		}
		close(fd);
		n++;
		t = now() - t0;
	} while (t < secs);
	printf("connections %ld persec %.1f\n", n, n / t);
	return 0;
}

static int stream(const char *a, int port, double secs, int sport)
{
	struct sockaddr_in sa = addr_of(a, port);
	struct sockaddr_in from = { .sin_family = AF_INET };
	static char buf[1 << 16];
	double t0, t;
	long long n = 0;
	ssize_t w;
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	if (sport) {
		from.sin_port = htons(sport);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&from, sizeof(from)) < 0) {
			perror("kmod_load: bind");
			return 1;
		}
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		perror("kmod_load: connect");
		return 1;
	}
	t0 = now();
	do {
		w = write(fd, buf, sizeof(buf));
		if (w < 0) {
			perror("kmod_load: write");
			return 1;
		}
		n += w;
		t = now() - t0;
	} while (t < secs);
	close(fd);
	printf("bytes %lld mbps %.1f\n", n, n / t / 1e6);
	return 0;
}

static int udp(const char *a, int port, double secs)
{
	struct sockaddr_in sa = addr_of(a, port);
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	char buf[64] = "kmod_load";
	double t0 = now(), t;
	long n = 0;

	connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	do {
		/* A full queue or an ICMP error: sent again. */
		if (send(fd, buf, sizeof(buf), 0) == sizeof(buf))
			n++;
		t = now() - t0;
	} while (t < secs);
	printf("packets %ld persec %.1f\n", n, n / t);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "sink"))
		sink(argv[2], atoi(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "udpsink"))
		udpsink(argv[2], atoi(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "rate"))
		return rate(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc == 7 && !strcmp(argv[1], "stream") &&
	    !strcmp(argv[2], "-p"))
		return stream(argv[4], atoi(argv[5]), atof(argv[6]),
			      atoi(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "stream"))
		return stream(argv[2], atoi(argv[3]), atof(argv[4]), 0);
	if (argc == 5 && !strcmp(argv[1], "udp"))
		return udp(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: kmod_load sink|udpsink|rate|stream|udp ...\n");
	return 2;
}
