/* Unit tests for the small shared pieces that read outside bytes:
 * address ranges (daemon/util.c, [listen] trusted_networks) and the log's
 * escaping (daemon/log.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "log.h"
#include "util.h"

static void cidr_v4(void **state)
{
	struct ms_cidr c;

	assert_int_equal(ms_cidr_parse("192.0.2.0/24", &c), 0);
	assert_true(ms_cidr_match(&c, "192.0.2.0"));
	assert_true(ms_cidr_match(&c, "192.0.2.255"));
	assert_false(ms_cidr_match(&c, "192.0.3.1"));
	assert_false(ms_cidr_match(&c, "::1"));
	assert_false(ms_cidr_match(&c, "not an address"));
	/* a prefix that does not end on a byte */
	assert_int_equal(ms_cidr_parse("10.0.0.0/9", &c), 0);
	assert_true(ms_cidr_match(&c, "10.127.255.255"));
	assert_false(ms_cidr_match(&c, "10.128.0.0"));
	/* a bare address is one address */
	assert_int_equal(ms_cidr_parse("127.0.0.1", &c), 0);
	assert_true(ms_cidr_match(&c, "127.0.0.1"));
	assert_false(ms_cidr_match(&c, "127.0.0.2"));
	/* /0: everything of that family */
	assert_int_equal(ms_cidr_parse("0.0.0.0/0", &c), 0);
	assert_true(ms_cidr_match(&c, "203.0.113.9"));
	assert_false(ms_cidr_match(&c, "2001:db8::1"));
}

static void cidr_v6(void **state)
{
	struct ms_cidr c;

	assert_int_equal(ms_cidr_parse("2001:db8::/33", &c), 0);
	assert_true(ms_cidr_match(&c, "2001:db8:7fff::1"));
	assert_false(ms_cidr_match(&c, "2001:db8:8000::1"));
	assert_false(ms_cidr_match(&c, "192.0.2.1"));
	assert_int_equal(ms_cidr_parse("::1", &c), 0);
	assert_true(ms_cidr_match(&c, "::1"));
	assert_false(ms_cidr_match(&c, "::2"));
}

static void cidr_refused(void **state)
{
	static const char *const bad[] = {
		"", "/24", "192.0.2.0/", "192.0.2.0/33", "192.0.2.0/-1",
		"192.0.2.0/+8", "192.0.2.0/8x", "2001:db8::/129", "host.example",
		"192.0.2.0/24/8", "1.2.3.4 ", "::1/ 8",
		"0123456789012345678901234567890123456789012345678901234567890123",
	};
	struct ms_cidr c;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (ms_cidr_parse(bad[i], &c) == 0)
			fail_msg("\"%s\" was taken for an address range", bad[i]);
}

static void escape(void **state)
{
	static const char in[] = "a\r\nb\tc\\d\x1b[31m\x7f\x01";
	char out[64];

	size_t n = ms_log_escape(out, sizeof(out), in, sizeof(in) - 1);

	assert_int_equal(n, strlen(out));
	assert_string_equal(out, "a\\r\\nb\\tc\\\\d\\x1b[31m\\x7f\\x01");
	/* NUL bytes inside the input are shown too, not an end */
	assert_int_equal(ms_log_escape(out, sizeof(out), "x\0y", 3), 6);
	assert_string_equal(out, "x\\x00y");
	/* cut at a whole escape, never half of one */
	assert_int_equal(ms_log_escape(out, 4, "ab\ncd", 5), 2);
	assert_string_equal(out, "ab");
	assert_int_equal(ms_log_escape(out, 1, "abc", 3), 0);
	assert_string_equal(out, "");
}

static void user_names(void **state)
{
	static const char *const good[] = {
		"alice", "alice@example.org", "j\xc3\xb6rg", "\xe2\x82\xac",
		"\xf0\x9f\x93\xa7 mail", "a b\"c\\d",
	};
	static const char *const bad[] = {
		"evil\r\nforged", "tab\there", "esc\x1b[31m", "del\x7f",
		"latin1 \xe9t\xe9", "\xc0\xaf", "\xed\xa0\x80",
		"\xf4\x90\x80\x80", "cut \xe2\x82",
	};

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		if (ms_user_name_check(good[i]) != NULL)
			fail_msg("\"%s\" refused: %s", good[i],
				 ms_user_name_check(good[i]));
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_non_null(ms_user_name_check(bad[i]));
	assert_string_equal(ms_user_name_check("a\rb"), "control characters");
	assert_string_equal(ms_user_name_check("a\xff" "b"), "not UTF-8");
}

/* What one ms_log() call writes to stderr (a pipe), in buf. */
static size_t captured_log(char *buf, size_t sz, const char *user)
{
	int fds[2], saved;
	size_t len = 0;
	ssize_t n;

	assert_int_equal(pipe(fds), 0);
	fflush(stderr);
	saved = dup(2);
	dup2(fds[1], 2);
	ms_log(MS_LOG_ERROR, "user %s refused", user);
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	close(fds[1]);
	while (len < sz - 1 && (n = read(fds[0], buf + len, sz - 1 - len)) > 0)
		len += (size_t)n;
	close(fds[0]);
	buf[len] = '\0';
	return len;
}

/* ms_log() writes one line whatever the message holds. */
static void log_one_line(void **state)
{
	char buf[4096];
	size_t n = captured_log(buf, sizeof(buf),
				"evil\r\n2026-01-01T00:00:00Z mailshift error: "
				"forged");

	assert_true(n > 0);
	assert_non_null(strstr(buf, "user evil\\r\\n2026-01-01T00:00:00Z "
			       "mailshift error: forged refused\n"));
	assert_ptr_equal(strchr(buf, '\n'), buf + n - 1);
	assert_null(strchr(buf, '\r'));
}

/* A message is at most 8 KiB (security.md): a longer one is cut, and
 * says so. */
static void log_bounded(void **state)
{
	static char user[20000], buf[40000];
	size_t n;
	char *msg;

	memset(user, 'a', sizeof(user) - 1);
	n = captured_log(buf, sizeof(buf), user);
	msg = strstr(buf, ": user a");
	assert_non_null(msg);
	msg += 2;
	/* 8191 bytes of the message, then "...", then the line's end. */
	assert_int_equal(buf + n - msg, 8191 + 3 + 1);
	assert_memory_equal(buf + n - 4, "...\n", 4);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(cidr_v4),
		cmocka_unit_test(cidr_v6),
		cmocka_unit_test(cidr_refused),
		cmocka_unit_test(escape),
		cmocka_unit_test(user_names),
		cmocka_unit_test(log_one_line),
		cmocka_unit_test(log_bounded),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
