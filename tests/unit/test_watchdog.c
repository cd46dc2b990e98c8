/* Unit tests for the fence's watchdog (daemon/watchdog.c): the relays'
 * sockets shut down at the deadline by its thread, with nothing from the
 * caller's side after arming it; none before it, none removed first; one
 * added after it fired shut at once; a deadline moved on, or cleared,
 * shuts nothing. Real sockets (socketpair): a shut-down end reads EOF. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "watchdog.h"

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Whether the peer of our end was shut down within ms: its other end
 * reads EOF. */
static int peer_ended(int fd, int ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	char c;

	if (poll(&p, 1, ms) != 1)
		return 0;
	return read(fd, &c, 1) == 0;
}

struct pair {
	int ours, theirs;	/* theirs: what the watchdog holds */
};

static void pair_open(struct pair *p)
{
	int fds[2];

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	p->ours = fds[0];
	p->theirs = fds[1];
}

static void pair_close(struct pair *p)
{
	close(p->ours);
	close(p->theirs);
}

static void shuts_at_the_deadline(void **state)
{
	struct ms_watchdog *wd;
	struct pair a, b;
	unsigned int sa = 0, sb = 0;
	uint64_t t0 = now_ms();

	assert_int_equal(ms_watchdog_new(&wd), 0);
	pair_open(&a);
	pair_open(&b);
	ms_watchdog_add(wd, &sa, a.theirs, -1);
	ms_watchdog_add(wd, &sb, b.theirs, -1);
	assert_int_not_equal(sa, 0);
	assert_int_not_equal(sb, 0);
	ms_watchdog_arm(wd, t0 + 300);
	/* nothing before the deadline */
	assert_false(peer_ended(a.ours, 150));
	assert_int_equal(ms_watchdog_fired(wd), 0);
	/* then both, the caller doing nothing */
	assert_true(peer_ended(a.ours, 2000));
	assert_true(peer_ended(b.ours, 2000));
	assert_true(now_ms() >= t0 + 300);
	assert_int_equal(ms_watchdog_fired(wd), 2);
	/* one that starts relaying after it fired: at once */
	{
		struct pair c;
		unsigned int sc = 0;

		pair_open(&c);
		ms_watchdog_add(wd, &sc, -1, c.theirs);
		assert_int_equal(sc, 0);
		assert_true(peer_ended(c.ours, 0) || peer_ended(c.ours, 100));
		pair_close(&c);
	}
	ms_watchdog_remove(wd, &sa);
	ms_watchdog_remove(wd, &sb);
	assert_int_equal(sa, 0);
	ms_watchdog_free(wd);
	pair_close(&a);
	pair_close(&b);
}

static void removed_or_moved_on_is_spared(void **state)
{
	struct ms_watchdog *wd;
	struct pair a, b, c;
	unsigned int sa = 0, sb = 0, sc = 0;

	assert_int_equal(ms_watchdog_new(&wd), 0);
	pair_open(&a);
	pair_open(&b);
	pair_open(&c);
	ms_watchdog_add(wd, &sa, a.theirs, -1);
	ms_watchdog_add(wd, &sb, b.theirs, -1);
	ms_watchdog_add(wd, &sc, c.theirs, -1);
	/* the first removed: the last one moves into its place */
	ms_watchdog_remove(wd, &sa);
	assert_int_equal(sa, 0);
	assert_int_equal(sc, 1);
	ms_watchdog_remove(wd, &sa);		/* twice: nothing */
	/* a heartbeat taken in time moves the deadline on */
	ms_watchdog_arm(wd, now_ms() + 200);
	usleep(100 * 1000);
	ms_watchdog_arm(wd, now_ms() + 10000);
	assert_false(peer_ended(b.ours, 400));
	/* cleared: never */
	ms_watchdog_arm(wd, 0);
	assert_false(peer_ended(b.ours, 100));
	/* a deadline already past: at once, the removed one spared */
	ms_watchdog_arm(wd, now_ms() - 1);
	assert_true(peer_ended(b.ours, 2000));
	assert_true(peer_ended(c.ours, 2000));
	assert_false(peer_ended(a.ours, 100));
	assert_int_equal(ms_watchdog_fired(wd), 2);
	ms_watchdog_free(wd);
	/* freed: every slot says out */
	assert_int_equal(sb, 0);
	assert_int_equal(sc, 0);
	pair_close(&a);
	pair_close(&b);
	pair_close(&c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(shuts_at_the_deadline),
		cmocka_unit_test(removed_or_moved_on_is_spared),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
