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

#ifdef MS_TEST_HOOKS
void ms_crash_point(const char *name);
#define MS_CRASH_POINT(name) ms_crash_point(name)
#else
#define MS_CRASH_POINT(name) do { } while (0)
#endif

#endif
