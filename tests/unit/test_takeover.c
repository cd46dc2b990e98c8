/* Unit tests for daemon/takeover.c: the [takeover] keys, the checks made
 * before the kernel is asked, the steering a takeover installs, and the
 * table that records it (the kernel side is
 * tests/integration/test_takeover.py's). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "expect.h"
#include "takeover.h"

/* A [takeover] from three values (NULL: not given), checked. */
static int takeover(struct ms_takeover_cfg *t, const char *vip,
		    const char *dev, const char *src, char *err, size_t errsz)
{
	ms_takeover_defaults(t);
	if ((vip && ms_takeover_key(t, "address", vip, err, errsz) < 0) ||
	    (dev && ms_takeover_key(t, "device", dev, err, errsz) < 0) ||
	    (src && ms_takeover_key(t, "source_address", src, err,
				    errsz) < 0))
		return -1;
	return ms_takeover_check(t, err, errsz);
}

static void takeover_keys(void **state)
{
	struct ms_takeover_cfg t;
	char err[512];

	expect_error(takeover(&t, "192.0.2.10", "eth0", "192.0.2.11", err,
			sizeof(err)), err, NULL);
	assert_int_equal(t.masquerade, 1);
	expect_error(takeover(&t, "192.0.2.10", NULL, "192.0.2.11", err,
			sizeof(err)), err, "--dev");
	expect_error(takeover(&t, "192.0.2.10", "eth0", "192.0.2.10", err,
			sizeof(err)), err, "renumber the old server first");
	expect_error(takeover(&t, "192.0.2.10", "eth0", "2001:db8::11", err,
			sizeof(err)), err, "not of one family");
	expect_error(takeover(&t, "192.0.2.0/24", "eth0", "192.0.2.11", err,
			sizeof(err)), err, "not a prefix");
	expect_error(takeover(&t, "192.0.2.10", "a/b", "192.0.2.11", err,
			sizeof(err)), err, "an interface name");
	expect_error(takeover(&t, "192.0.2.10", "0123456789abcdef", "192.0.2.11",
			err, sizeof(err)), err, "an interface name");
	expect_error(ms_takeover_key(&t, "masquerade", "maybe", err, sizeof(err)),
	       err, "yes or no");
	expect_error(ms_takeover_key(&t, "masquerade", "no", err, sizeof(err)),
	       err, NULL);
	assert_int_equal(t.masquerade, 0);
	expect_error(ms_takeover_key(&t, "vip", "192.0.2.10", err, sizeof(err)),
	       err, "unknown key \"vip\" in [takeover]");
}

static void steer_cfg(struct ms_steer_cfg *s, const char *source)
{
	char err[256];

	ms_steer_defaults(s);
	assert_int_equal(ms_steer_key(s, "port", "143 10143", err,
				      sizeof(err)), 0);
	if (source != NULL)
		assert_int_equal(ms_steer_key(s, "source", source, err,
					      sizeof(err)), 0);
}

static void takeover_steer(void **state)
{
	struct ms_takeover_cfg t;
	struct ms_steer_cfg s;
	char err[512];

	expect_error(takeover(&t, "192.0.2.10", "eth0", "192.0.2.11", err,
			sizeof(err)), err, NULL);
	/* The VIP becomes a service address, the new address its source. */
	steer_cfg(&s, NULL);
	expect_error(ms_takeover_steer(&t, &s, err, sizeof(err)), err, NULL);
	assert_int_equal(s.naddrs, 1);
	assert_string_equal(s.addrs[0].text, "192.0.2.10");
	assert_string_equal(s.src[0].text, "192.0.2.11");
	/* Already listed: not twice. */
	expect_error(ms_takeover_steer(&t, &s, err, sizeof(err)), err, NULL);
	assert_int_equal(s.naddrs, 1);
	/* A [steer] source naming another server is a contradiction. */
	steer_cfg(&s, "192.0.2.99");
	expect_error(ms_takeover_steer(&t, &s, err, sizeof(err)), err,
	       "make them one");
	steer_cfg(&s, "192.0.2.11");
	expect_error(ms_takeover_steer(&t, &s, err, sizeof(err)), err, NULL);
}

static void takeover_ruleset(void **state)
{
	struct ms_takeover_cfg t;
	char err[512], *text;

	expect_error(takeover(&t, "2001:db8::10", "eth0", "2001:db8::11", err,
			sizeof(err)), err, NULL);
	text = ms_takeover_ruleset(&t, 0x4d530000, 1);
	assert_non_null(text);
	assert_non_null(strstr(text, "table inet mailshift_takeover\n"
			       "delete table inet mailshift_takeover\n"));
	assert_non_null(strstr(text, "ct original ip6 daddr 2001:db8::10 "
			       "ct mark { 0x4d530002, 0x4d530003 } counter "
			       "masquerade comment \"mailshift takeover vip "
			       "2001:db8::10 dev eth0 source 2001:db8::11 "
			       "steer 1\""));
	free(text);
	t.masquerade = 0;
	text = ms_takeover_ruleset(&t, 0x4d530000, 0);
	assert_non_null(text);
	assert_null(strstr(text, "masquerade"));
	assert_non_null(strstr(text, "steer 0\""));
	free(text);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(takeover_keys),
		cmocka_unit_test(takeover_steer),
		cmocka_unit_test(takeover_ruleset),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
