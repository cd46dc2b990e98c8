/* What several unit tests check the same way: expect_error(), a call's
 * result (0, or -1 with a message in err) against what the test wants;
 * remove_dir(), a test's scratch directory emptied and removed. Include
 * after <cmocka.h>. */
#ifndef MS_TEST_EXPECT_H
#define MS_TEST_EXPECT_H

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Success when want is NULL; else failure (-1) with want in err. */
static inline void expect_error(int r, const char *err, const char *want)
{
	if (want == NULL) {
		if (r != 0)
			fail_msg("unexpected error: %s", err);
		return;
	}
	assert_int_equal(r, -1);
	if (strstr(err, want) == NULL)
		fail_msg("error \"%s\" does not say \"%s\"", err, want);
}

/* Removes dir's files names[0] to names[n - 1] (those there), then dir. */
static inline int remove_dir(const char *dir, const char *const *names,
			     size_t n)
{
	char path[256];

	for (size_t i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
	}
	return rmdir(dir);
}

#endif
