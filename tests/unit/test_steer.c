/* Unit tests for daemon/steer.c: the [steer] keys and what goes together,
 * the decisions they expand to, and the nft script built from them (the
 * kernel side is tests/integration/test_steer.py's). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "expect.h"
#include "steer.h"

static struct ms_steer_cfg cfg;

/* Feeds "key = value" lines (NULL-terminated pairs); the first error. */
static int keys(char *err, size_t errsz, ...)
{
	const char *k, *v;
	va_list ap;
	int r = 0;

	ms_steer_defaults(&cfg);
	va_start(ap, errsz);
	while (r == 0 && (k = va_arg(ap, const char *)) != NULL) {
		v = va_arg(ap, const char *);
		r = ms_steer_key(&cfg, k, v, err, errsz);
	}
	va_end(ap);
	return r == 0 ? ms_steer_check(&cfg, err, errsz) : r;
}

#define BASE "address", "10.0.1.2", "port", "143 10143", "port", "110 10110"

static void steer_keys(void **state)
{
	char err[512];

	expect_error(keys(err, sizeof(err), BASE, NULL), err, NULL);
	expect_error(keys(err, sizeof(err), "port", "143 10143", NULL), err,
	       "names no address");
	expect_error(keys(err, sizeof(err), "address", "10.0.1.2", NULL), err,
	       "names no mail port");
	expect_error(keys(err, sizeof(err), "address", "10.0.1.0/24", NULL), err,
	       "not a prefix");
	expect_error(keys(err, sizeof(err), "address", "mail.example", NULL), err,
	       "not an IPv4 or IPv6");
	expect_error(keys(err, sizeof(err), BASE, "address", "10.0.1.2", NULL), err,
	       "given twice");
	expect_error(keys(err, sizeof(err), BASE, "port", "143", NULL), err,
	       "port 143 given twice");
	expect_error(keys(err, sizeof(err), BASE, "port", "00000000000000000025",
		    NULL), err, "MAIL-PORT");
	expect_error(keys(err, sizeof(err), "address", "10.0.1.2", "port", "25",
		    NULL), err, "has no listener port");
	expect_error(keys(err, sizeof(err), "address", "10.0.1.2", "port", "25",
		    "action", "source", NULL), err, NULL);
	/* A port without a listener is fine when no decision proxies it. */
	expect_error(keys(err, sizeof(err), BASE, "port", "25", "destination",
		    "10.0.2.2", "entry", "10.0.1.2 25 destination", NULL), err,
	       NULL);
	expect_error(keys(err, sizeof(err), BASE, "port", "25", "destination",
		    "10.0.2.2", "entry", "10.0.1.2 25 destination", "entry",
		    "10.0.1.2 25 10.9.0.0/16 proxy", NULL), err,
	       "has no listener port");
	expect_error(keys(err, sizeof(err), BASE, "action", "destination", NULL),
	       err, "no IPv4 destination");
	expect_error(keys(err, sizeof(err), BASE, "other_ports", "proxy", NULL), err,
	       "source or destination");
	expect_error(keys(err, sizeof(err), BASE, "mark", "0x4d530001", NULL), err,
	       "low 8 bits");
	expect_error(keys(err, sizeof(err), BASE, "route_table", "254", NULL), err,
	       "route_table");
	expect_error(keys(err, sizeof(err), BASE, "rule_priority", "auto", NULL),
	       err, NULL);
	expect_error(keys(err, sizeof(err), BASE, "destination", "10.0.2.2",
		    "destination", "10.0.2.3", NULL), err, "one IPv4");
	expect_error(keys(err, sizeof(err), BASE, "colour", "blue", NULL), err,
	       "unknown key \"colour\" in [steer]");
	expect_error(keys(err, sizeof(err), BASE, NULL), err, NULL);
	assert_int_equal(cfg.backend, MS_STEER_BACKEND_NFT);
	expect_error(keys(err, sizeof(err), BASE, "backend", "kmod", NULL), err,
	       NULL);
	assert_int_equal(cfg.backend, MS_STEER_BACKEND_KMOD);
	expect_error(keys(err, sizeof(err), BASE, "backend", "ebpf", NULL), err,
	       "backend: nft or kmod");
}

static void steer_entries(void **state)
{
	char err[512];

	expect_error(keys(err, sizeof(err), BASE, "destination", "10.0.2.2",
		    "entry", "10.0.1.2 143 10.9.0.0/16 destination",
		    "entry", "10.0.1.2 143 10.9.8.0/24 proxy",
		    "entry", "10.0.1.2 other destination", NULL), err, NULL);
	expect_error(keys(err, sizeof(err), BASE, "destination", "10.0.2.2",
		    "entry", "10.0.1.2 143 10.9.0.0/16 destination",
		    "entry", "10.0.1.2 143 10.9.0.0/16 proxy", NULL), err,
	       "contradicts");
	expect_error(keys(err, sizeof(err), BASE, "entry", "10.0.1.2 143 source",
		    "entry", "10.0.1.2 143 source", NULL), err, "repeats");
	expect_error(keys(err, sizeof(err), BASE, "entry", "10.0.1.3 143 source",
		    NULL), err, "not a service address");
	expect_error(keys(err, sizeof(err), BASE, "entry", "10.0.1.2 993 source",
		    NULL), err, "not a mail port");
	expect_error(keys(err, sizeof(err), BASE, "entry", "10.0.1.2 other proxy",
		    NULL), err, "only mail ports");
	expect_error(keys(err, sizeof(err), BASE, "entry",
		    "10.0.1.2 143 10.9.0.1/16 source", NULL), err,
	       "bits set after the prefix");
	expect_error(keys(err, sizeof(err), BASE, "entry",
		    "10.0.1.2 143 2001:db8::/32 source", NULL), err,
	       "not of the address's family");
	expect_error(keys(err, sizeof(err), BASE, "entry", "10.0.1.2 143", NULL),
	       err, "ADDRESS PORT [PREFIX] ACTION");
	expect_error(keys(err, sizeof(err), BASE, "entry",
		    "10.0.1.2 143 10.9.0.0/16 source extra", NULL), err,
	       "ADDRESS PORT [PREFIX] ACTION");
}

static void steer_ruleset(void **state)
{
	static struct ms_steer_entry e[64];
	struct ms_steer_route rt = { 0x4d530000, 100, 101, 3 };
	char err[512], *text;
	unsigned int n;

	expect_error(keys(err, sizeof(err), BASE, "address", "2001:db8::2",
		    "destination", "10.0.2.2", "entry",
		    "10.0.1.2 143 10.9.0.0/16 destination", "entry",
		    "10.0.1.2 143 10.9.8.0/24 proxy", NULL), err, NULL);
	n = ms_steer_expand(&cfg, e);
	/* 2 addresses x (2 ports + other) + 2 prefix entries. */
	assert_int_equal(n, 8);
	text = ms_steer_ruleset(&cfg, e, n, &rt, NULL);
	assert_non_null(text);
	/* One transaction that replaces the table whether or not it was
	 * there. */
	assert_ptr_equal(strstr(text, "table inet mailshift\ndelete table "
				"inet mailshift\ntable inet mailshift {\n"),
			 text);
	assert_non_null(strstr(text, "tproxy ip to :10143 meta mark set "
			       "0x4d530000 accept"));
	assert_non_null(strstr(text, "tproxy ip6 to :10110"));
	assert_non_null(strstr(text, "ct mark 0x4d530001 counter name "
			       "\"rejected\" reject with tcp reset"));
	assert_non_null(strstr(text, "ct mark 0x4d530003 meta nfproto ipv4 "
			       "dnat ip to 10.0.2.2"));
	assert_non_null(strstr(text, "table 100 priority 101"));
	/* The longest prefix is decided first. */
	assert_true(strstr(text, "\"10.0.1.2 143 10.9.8.0/24 proxy\"") <
		    strstr(text, "\"10.0.1.2 143 10.9.0.0/16 destination\""));
	assert_true(strstr(text, "\"10.0.1.2 143 10.9.0.0/16 destination\"") <
		    strstr(text, "\"10.0.1.2 143 proxy\""));
	assert_non_null(strstr(text, "ip6 daddr 2001:db8::2 tcp dport 143 "
			       "tcp flags & (fin | syn | rst | ack) == syn"));
	free(text);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(steer_keys),
		cmocka_unit_test(steer_entries),
		cmocka_unit_test(steer_ruleset),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
