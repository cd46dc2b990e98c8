/* Unit tests for the pure parts of several gateways on one store
 * (daemon/cluster.c): [gateway] heartbeat and timeout read and checked,
 * and when a gateway may still count on not being fenced. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cluster.h"

static void durations(void **state)
{
	unsigned int ms = 0;

	assert_int_equal(ms_cluster_parse_ms("2s", &ms), 0);
	assert_int_equal(ms, 2000);
	assert_int_equal(ms_cluster_parse_ms("3", &ms), 0);
	assert_int_equal(ms, 3000);
	assert_int_equal(ms_cluster_parse_ms("250ms", &ms), 0);
	assert_int_equal(ms, 250);
	assert_int_equal(ms_cluster_parse_ms("86400s", &ms), 0);
	assert_int_equal(ms, 86400000);
	ms = 7;
	for (const char *const *bad = (const char *const[]){ "", "s", "-1s",
	     "1m", "2 s", "1.5s", "86401s", "99999999999999999999ms",
	     "10msx", NULL }; *bad != NULL; bad++)
		assert_int_equal(ms_cluster_parse_ms(*bad, &ms), -1);
	assert_int_equal(ms, 7);
}

static void heartbeat_and_timeout(void **state)
{
	assert_null(ms_cluster_check(2000, 10000));
	assert_null(ms_cluster_check(100, 300));
	assert_non_null(ms_cluster_check(99, 10000));
	assert_non_null(ms_cluster_check(60001, 600000));
	/* a heartbeat lost on the way fences no gateway */
	assert_non_null(ms_cluster_check(1000, 2999));
	assert_null(ms_cluster_check(1000, 3000));
	assert_non_null(ms_cluster_check(2000, 600001));
}

static void in_time(void **state)
{
	/* never taken: not in time */
	assert_false(ms_cluster_in_time(5000, 0, 250, 1500));
	/* the others fence at last_ok + timeout; a heartbeat's margin */
	assert_true(ms_cluster_in_time(1000, 1000, 250, 1500));
	assert_true(ms_cluster_in_time(2249, 1000, 250, 1500));
	assert_false(ms_cluster_in_time(2250, 1000, 250, 1500));
	assert_false(ms_cluster_in_time(60000, 1000, 250, 1500));
	/* a clock read before the heartbeat was sent */
	assert_true(ms_cluster_in_time(900, 1000, 250, 1500));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(durations),
		cmocka_unit_test(heartbeat_and_timeout),
		cmocka_unit_test(in_time),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
