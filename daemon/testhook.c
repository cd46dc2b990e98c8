/* Crash points of test builds (testhook.h). Built into every build; empty
 * unless MS_TEST_HOOKS is defined. */
#include "testhook.h"

#ifdef MS_TEST_HOOKS
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static struct {
	int parsed;
	char name[128];
	unsigned long at, hits;
} crash;

/* MAILSHIFT_CRASH_AT, once: "name" or "name:N". */
static void crash_parse(void)
{
	const char *v = getenv("MAILSHIFT_CRASH_AT");
	const char *colon;
	size_t len;

	crash.parsed = 1;
	crash.at = 1;
	if (v == NULL || *v == '\0')
		return;
	colon = strrchr(v, ':');
	len = colon != NULL ? (size_t)(colon - v) : strlen(v);
	if (len >= sizeof(crash.name))
		return;
	if (colon != NULL) {
		char *end;

		crash.at = strtoul(colon + 1, &end, 10);
		if (*end != '\0' || crash.at == 0) {
			/* A typo must not pass for a point never reached. */
			fprintf(stderr, "MAILSHIFT_CRASH_AT=%s: bad count\n", v);
			exit(2);
		}
	}
	memcpy(crash.name, v, len);
	crash.name[len] = '\0';
}

void ms_crash_point(const char *name)
{
	char line[256];
	int n;

	if (!crash.parsed)
		crash_parse();
	if (crash.name[0] == '\0' || strcmp(name, crash.name) != 0 ||
	    ++crash.hits != crash.at)
		return;
	/* One write(2), so the test can tell this kill from any other; then
	 * the kill, with nothing buffered flushed. */
	n = snprintf(line, sizeof(line), "mailshift: crash point %s:%lu: "
		     "SIGKILL\n", name, crash.hits);
	if (n > 0 && write(STDERR_FILENO, line, (size_t)n) < 0)
		n = 0;
	raise(SIGKILL);
}

/* MAILSHIFT_TEST_TIME_SCALE, read once. */
uint64_t ms_test_time(uint64_t ms)
{
	static unsigned long scale;

	if (scale == 0) {
		const char *v = getenv("MAILSHIFT_TEST_TIME_SCALE");
		char *end;

		scale = 1;
		if (v != NULL && *v != '\0') {
			scale = strtoul(v, &end, 10);
			if (*end != '\0' || scale == 0) {
				fprintf(stderr, "MAILSHIFT_TEST_TIME_SCALE=%s: "
					"bad scale\n", v);
				exit(2);
			}
		}
	}
	return ms / scale > 0 ? ms / scale : 1;
}
#else
/* ISO C wants a translation unit to hold something. */
typedef int ms_testhook_unused;
#endif
