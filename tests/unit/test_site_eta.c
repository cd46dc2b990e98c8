/* Unit tests for daemon/site_eta.c: the cost model fitted to recent
 * copies, copies at once, sizes estimated where the survey has none, and
 * "unknown" rather than a number when nothing is measured or known. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "site_eta.h"

static void add(struct ms_eta_sizes *t, enum ms_eta_kind kind,
		int64_t msgs, int64_t bytes, uint64_t copied_msgs,
		uint64_t copied_bytes)
{
	struct ms_user_info u = { .msgs = copied_msgs,
				  .bytes = copied_bytes };
	struct ms_user_size sz = { .messages = msgs, .bytes = bytes };

	ms_eta_count(t, kind, &u, &sz);
}

static json_int_t jint(json_t *o, const char *k)
{
	return json_integer_value(json_object_get(o, k));
}

/* Nothing copied yet: no number, and why. */
static void test_unknown_before_a_copy(void **state)
{
	struct ms_eta e = { 0 };
	struct ms_eta_sizes t = { 0 };
	json_t *o;

	(void)state;
	add(&t, MS_ETA_LEFT, 100, 100000, 0, 0);
	o = ms_eta_json(&e, &t);
	assert_true(json_is_null(json_object_get(o, "eta_seconds")));
	assert_true(json_is_null(json_object_get(o, "throughput")));
	assert_string_equal(json_string_value(json_object_get(o, "unknown")),
			    "no copy measured yet");
	assert_int_equal(jint(o, "remaining_bytes"), 100000);
	json_decref(o);
}

/* Copies of 1 s per user plus 1 s per MB, four at once: the model is
 * found again and the ETA is the remaining work over four. */
static void test_fit_and_parallel(void **state)
{
	struct ms_eta e = { 0 };
	struct ms_eta_sizes t = { 0 };
	uint64_t now = 1000000;
	json_t *o, *tp;

	(void)state;
	for (int i = 0; i < 40; i++) {
		uint64_t bytes = (uint64_t)(1 + i % 7) * 1000000;
		/* (messages of two sizes: messages and bytes told apart) */
		uint64_t msgs = bytes / (i % 2 ? 1000 : 4000);
		double secs = 1 + bytes / 1e6;

		/* four lanes, each copy starting when its lane's last ends */
		now += (uint64_t)(secs * 1000 / 4);
		ms_eta_note(&e, now, secs, msgs, bytes);
	}
	for (int i = 0; i < 10; i++)
		add(&t, MS_ETA_LEFT, 1000, 3000000, 0, 0);
	o = ms_eta_json(&e, &t);
	tp = json_object_get(o, "throughput");
	assert_non_null(tp);
	assert_int_equal(jint(tp, "copies"), 40);
	assert_true(json_real_value(json_object_get(
		tp, "user_overhead_seconds")) > 0.99);
	assert_true(json_real_value(json_object_get(
		tp, "user_overhead_seconds")) < 1.01);
	/* 10 users x (1 + 3) s over about 4 at once: about 10 s */
	assert_true(jint(o, "eta_seconds") >= 9 && jint(o, "eta_seconds") <= 12);
	json_decref(o);
}

/* Sizes: what is copied is left out; messages-only users get the mean
 * message, unsurveyed ones the mean mailbox; failed and off users are
 * not counted; nothing to go by: unknown. */
static void test_sizes(void **state)
{
	struct ms_eta e = { 0 };
	struct ms_eta_sizes t = { 0 };
	json_t *o;

	(void)state;
	ms_eta_note(&e, 5000, 2, 10, 10000);
	add(&t, MS_ETA_MOVED, 10, 10000, 10, 10000);	/* 1000 B/message */
	add(&t, MS_ETA_LEFT, 30, 50000, 10, 10000);	/* 20 and 40000 left */
	add(&t, MS_ETA_LEFT, 5, -1, 0, 0);		/* 5 x 1000 B */
	add(&t, MS_ETA_LEFT, -1, -1, 0, 0);		/* the mean mailbox */
	add(&t, MS_ETA_FAILED, 99, 99, 0, 0);
	add(&t, MS_ETA_OFF, -1, -1, 0, 0);
	o = ms_eta_json(&e, &t);
	assert_int_equal(jint(o, "remaining_users"), 3);
	assert_int_equal(jint(o, "sizes_known"), 1);
	assert_int_equal(jint(o, "sizes_estimated"), 2);
	assert_int_equal(jint(o, "failed_users"), 1);
	assert_int_equal(jint(o, "off_users"), 1);
	/* mean mailbox of the three known whole: (10+30+99)/3 messages,
	 * (10000+50000+99)/3 bytes */
	assert_int_equal(jint(o, "remaining_messages"), 20 + 5 + 46);
	assert_int_equal(jint(o, "remaining_bytes"),
			 40000 + 5000 + 20033);
	assert_true(json_is_integer(json_object_get(o, "eta_seconds")));
	json_decref(o);

	memset(&t, 0, sizeof(t));
	add(&t, MS_ETA_LEFT, -1, -1, 0, 0);
	o = ms_eta_json(&e, &t);
	assert_true(json_is_null(json_object_get(o, "eta_seconds")));
	assert_true(json_is_null(json_object_get(o, "remaining_bytes")));
	assert_string_equal(json_string_value(json_object_get(o, "unknown")),
			    "the remaining users' sizes are not known yet");
	json_decref(o);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_unknown_before_a_copy),
		cmocka_unit_test(test_fit_and_parallel),
		cmocka_unit_test(test_sizes),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
