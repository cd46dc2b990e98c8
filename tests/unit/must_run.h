/* skip_or_fail(): what a unit test says when it cannot run on this machine
 * (no IPv6 loopback, not root). Include after <cmocka.h>. */
#ifndef MS_TEST_MUST_RUN_H
#define MS_TEST_MUST_RUN_H

#include <stdlib.h>

/* The test fails, saying why, unless the run allows skips
 * (MAILSHIFT_ALLOW_SKIP=1): the suite never passes in silence over what it
 * did not test. */
#define skip_or_fail(fmt, ...) do {					\
	if (getenv("MAILSHIFT_ALLOW_SKIP") == NULL)			\
		fail_msg(fmt ": set MAILSHIFT_ALLOW_SKIP=1 to skip",	\
			 __VA_ARGS__);					\
	print_message("SKIPPED (MAILSHIFT_ALLOW_SKIP): " fmt "\n",	\
		      __VA_ARGS__);					\
	skip();								\
} while (0)

#endif
