/* Crash points for the tests: MS_CRASH_POINT("name") marks an instant the
 * integration tests kill the process at (docs/testing.md, "Crash points").
 *
 * Only a test build (-DMS_TEST_HOOKS: make hooks, make asan) has them: there
 * the environment variable MAILSHIFT_CRASH_AT = "name" or "name:N" makes
 * the Nth time (default the first) the point is reached end the process
 * with SIGKILL, after one line on stderr and nothing else (no flush, no
 * cleanup: a crash at that very instant). In any other build the macro is
 * empty and the variable is never read. */
#ifndef MS_TESTHOOK_H
#define MS_TESTHOOK_H

/* The time scale of test builds: MS_TEST_TIME(ms) is ms divided by
 * MAILSHIFT_TEST_TIME_SCALE (a whole number, default 1; at least 1 ms),
 * so the tests see the timeouts of minutes fire in seconds. Elsewhere it is
 * ms itself and the variable is never read. */
#ifdef MS_TEST_HOOKS
#include <stdint.h>
void ms_crash_point(const char *name);
uint64_t ms_test_time(uint64_t ms);
#define MS_CRASH_POINT(name) ms_crash_point(name)
#define MS_TEST_TIME(ms) ms_test_time(ms)
#else
#define MS_CRASH_POINT(name) do { } while (0)
#define MS_TEST_TIME(ms) (ms)
#endif

#endif
