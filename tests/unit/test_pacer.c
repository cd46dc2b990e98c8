/* Unit tests for the source's pace (daemon/pacer.c): the token bucket on
 * the commands sent, the back-off when the server says it is busy or
 * answers slowly, the gradual recovery, the retries' waits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "pacer.h"

/* Commands sent from t0 to t1 (ms) by a sender asking as soon as the
 * pacer lets it: the most the pacer allows. */
static unsigned int drain(struct ms_pacer *p, uint64_t t0, uint64_t t1)
{
	unsigned int n = 0;
	uint64_t t = t0;

	while (t < t1) {
		uint64_t wait = ms_pacer_take(p, t, 0);

		if (wait == 0)
			n++;
		else
			t += wait;
	}
	return n;
}

static void bucket_caps_the_rate(void **state)
{
	struct ms_pacer p;
	unsigned int n;
	uint64_t wait;

	ms_pacer_init(&p, 10, 1000);
	/* 10 s at 10/s: 100, plus the one second's burst at the start */
	n = drain(&p, 1000, 11000);
	assert_in_range(n, 100, 111);
	assert_int_equal(p.commands, n);
	/* an empty bucket says how long to wait: about 1/rate */
	while ((wait = ms_pacer_take(&p, 12000, 0)) == 0)
		;
	assert_in_range(wait, 1, 101);
}

static void no_cap_never_waits(void **state)
{
	struct ms_pacer p;

	ms_pacer_init(&p, 0, 0);
	for (int i = 0; i < 10000; i++)
		assert_int_equal(ms_pacer_take(&p, 5, 0), 0);
	assert_true(ms_pacer_rate(&p) == 0);
}

static void must_goes_into_debt(void **state)
{
	struct ms_pacer p;

	ms_pacer_init(&p, 2, 0);
	/* a login or an APPEND cannot wait: it goes, and is repaid */
	for (int i = 0; i < 6; i++)
		assert_int_equal(ms_pacer_take(&p, 0, 1), 0);
	/* -4 tokens: the next command waits about 2.5 s */
	assert_in_range(ms_pacer_take(&p, 0, 0), 2000, 2600);
	assert_int_equal(ms_pacer_take(&p, 2600, 0), 0);
}

static void busy_halves_then_recovers(void **state)
{
	struct ms_pacer p;
	uint64_t t = 0;
	unsigned int changes;

	ms_pacer_init(&p, 40, 0);
	assert_true(ms_pacer_busy(&p, 100, "NO [UNAVAILABLE] busy"));
	assert_true(ms_pacer_rate(&p) == 20);
	assert_int_equal(p.level, 1);
	assert_string_equal(p.reason, "NO [UNAVAILABLE] busy");
	/* the other connections' refusals of the same moment: one episode */
	assert_false(ms_pacer_busy(&p, 300, "NO [UNAVAILABLE] busy"));
	assert_true(ms_pacer_rate(&p) == 20);
	/* again later: lower still, never below the floor */
	assert_true(ms_pacer_busy(&p, 100 + MS_PACER_HOLD_MS, "[LIMIT]"));
	assert_true(ms_pacer_rate(&p) == 10);
	for (t = 3000; p.limit > MS_PACER_MIN_RATE; t += MS_PACER_HOLD_MS)
		ms_pacer_busy(&p, t, "[LIMIT]");
	t -= MS_PACER_HOLD_MS;		/* the last back-off */
	assert_true(ms_pacer_rate(&p) == MS_PACER_MIN_RATE);
	/* calm: up step by step, a step per MS_PACER_RECOVER_MS, each one
	 * a change to log, until the cap again */
	changes = p.changes;
	assert_false(ms_pacer_tick(&p, t + MS_PACER_RECOVER_MS - 1));
	t += MS_PACER_RECOVER_MS;
	assert_true(ms_pacer_tick(&p, t));
	assert_true(ms_pacer_rate(&p) == MS_PACER_MIN_RATE * MS_PACER_RAISE);
	assert_int_equal(p.changes, changes + 1);
	assert_int_equal(p.last_change, MS_PACE_UP);
	for (int i = 0; i < 100 && p.level > 0; i++) {
		t += MS_PACER_RECOVER_MS;
		assert_true(ms_pacer_tick(&p, t));
	}
	assert_int_equal(p.level, 0);
	assert_true(ms_pacer_rate(&p) == 40);
	assert_false(ms_pacer_tick(&p, t + 10 * MS_PACER_RECOVER_MS));
}

static void busy_without_cap_uses_recent(void **state)
{
	struct ms_pacer p;
	uint64_t t;

	ms_pacer_init(&p, 0, 0);
	/* 200 commands a second for two seconds */
	for (t = 0; t < 2000; t += 5)
		ms_pacer_take(&p, t, 0);
	assert_true(ms_pacer_busy(&p, 2000, "[INUSE]"));
	assert_in_range((long)ms_pacer_rate(&p), 90, 110);
	/* recovered: no cap again */
	for (int i = 0; i < 100 && p.level > 0; i++)
		ms_pacer_tick(&p, 2000 + (uint64_t)(i + 1) * MS_PACER_RECOVER_MS);
	assert_true(ms_pacer_rate(&p) == 0);
}

static void busy_at_once_is_not_a_crawl(void **state)
{
	struct ms_pacer p;

	/* a copy that just began: no rate measured yet */
	ms_pacer_init(&p, 0, 0);
	ms_pacer_take(&p, 1, 0);
	assert_true(ms_pacer_busy(&p, 10, "[UNAVAILABLE]"));
	assert_true(ms_pacer_rate(&p) == MS_PACER_BASE / 2);
}

static void slow_replies_back_off(void **state)
{
	struct ms_pacer p;
	uint64_t t = 0;

	ms_pacer_init(&p, 100, 0);
	for (int i = 0; i < MS_PACER_LAT_SAMPLES; i++)
		assert_false(ms_pacer_latency(&p, t += 10, 20));
	/* slower, but under the floor: not a sign */
	assert_false(ms_pacer_latency(&p, t += 10, MS_PACER_SLOW_FLOOR_MS));
	assert_int_equal(p.level, 0);
	/* far over the norm and the floor */
	assert_true(ms_pacer_latency(&p, t += 10, 5000));
	assert_int_equal(p.level, 1);
	assert_true(ms_pacer_rate(&p) == 50);
}

static void retry_delays_grow_and_end(void **state)
{
	uint64_t last = 0;

	assert_int_equal(ms_pacer_retry_delay(0), 0);
	for (unsigned int n = 1; n <= MS_PACER_RETRIES; n++) {
		uint64_t d = ms_pacer_retry_delay(n);

		assert_true(d > last || d == MS_PACER_RETRY_MAX_MS);
		assert_true(d <= MS_PACER_RETRY_MAX_MS);
		last = d;
	}
	assert_int_equal(ms_pacer_retry_delay(MS_PACER_RETRIES + 1), 0);
}

static void busy_replies_recognised(void **state)
{
	assert_true(ms_pacer_is_busy_reply("UNAVAILABLE", "try later"));
	assert_true(ms_pacer_is_busy_reply("limit", ""));
	assert_true(ms_pacer_is_busy_reply("INUSE", NULL));
	assert_true(ms_pacer_is_busy_reply(NULL, "Request is throttled"));
	assert_true(ms_pacer_is_busy_reply(NULL, "Server busy, try again later"));
	assert_false(ms_pacer_is_busy_reply("NONEXISTENT", "no such mailbox"));
	assert_false(ms_pacer_is_busy_reply("AUTHENTICATIONFAILED",
					    "Authentication failed."));
	assert_false(ms_pacer_is_busy_reply(NULL, NULL));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(bucket_caps_the_rate),
		cmocka_unit_test(no_cap_never_waits),
		cmocka_unit_test(must_goes_into_debt),
		cmocka_unit_test(busy_halves_then_recovers),
		cmocka_unit_test(busy_without_cap_uses_recent),
		cmocka_unit_test(busy_at_once_is_not_a_crawl),
		cmocka_unit_test(slow_replies_back_off),
		cmocka_unit_test(retry_delays_grow_and_end),
		cmocka_unit_test(busy_replies_recognised),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
