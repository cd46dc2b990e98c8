/* Unit tests for daemon/retire.c: the gateway's record of its use of the
 * source (the map's name for what a client gave, the throttle) against a
 * fresh store, and durations. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "retire.h"
#include "store.h"

static char dir[] = "/tmp/ms-retire-test.XXXXXX";
static char path[128];
static struct ms_store *store;

struct rows {
	unsigned int n;
	struct ms_source_use last[8];
};

static int collect(void *ctx, const struct ms_source_use *u)
{
	struct rows *r = ctx;

	if (r->n < 8)
		r->last[r->n] = *u;
	r->n++;
	return 0;
}

/* The row of (key, kind), or NULL. */
static const struct ms_source_use *row(struct rows *r, const char *key,
				       const char *kind)
{
	memset(r, 0, sizeof(*r));
	assert_int_equal(ms_store_source_use_foreach(store, 0, collect, r), 0);
	for (unsigned int i = 0; i < r->n && i < 8; i++)
		if (!strcmp(r->last[i].key, key) &&
		    !strcmp(r->last[i].kind, kind))
			return &r->last[i];
	return NULL;
}

static void names(void **state)
{
	struct ms_retire_cfg cfg;
	struct rows r;
	const struct ms_source_use *u;
	int64_t id;

	ms_retire_defaults(&cfg);
	ms_retire_init(NULL, store, &cfg);
	assert_int_equal(ms_store_user_get(store, "alice", &id), 0);
	assert_int_equal(ms_store_user_get(store, "bob@example.org", &id), 0);

	ms_retire_note("session", "alice");
	u = row(&r, "alice", "session");
	assert_non_null(u);
	assert_string_equal(u->name, "alice");
	assert_int_equal(u->slack, 60);
	/* a recipient: its address, in any case, or its local part, with
	 * or without a +extension */
	ms_retire_note("mail", "ALICE+lists@example.org");
	assert_non_null(u = row(&r, "alice", "mail"));
	assert_string_equal(u->name, "ALICE+lists@example.org");
	ms_retire_note("mail", "Bob+x@Example.org");
	assert_non_null(row(&r, "bob@example.org", "mail"));
	assert_null(row(&r, "*", "mail"));
	/* a name the map does not know: "*", with the name */
	ms_retire_note("mail", "carol@example.org");
	assert_non_null(u = row(&r, "*", "mail"));
	assert_string_equal(u->name, "carol@example.org");
	/* a login is looked up as it is */
	ms_retire_note("session", "ALICE");
	assert_non_null(u = row(&r, "*", "session"));
	assert_string_equal(u->name, "ALICE");
	/* another unknown name within the interval: the row covers it */
	ms_retire_note("session", "nobody");
	assert_string_equal(row(&r, "*", "session")->name, "ALICE");
}

/* A second use within record_interval is not written (the row's slack
 * covers it); another kind or user is. */
static void throttle(void **state)
{
	struct ms_retire_cfg cfg = { .quiet_period = 10,
				     .record_interval = 3600 };
	struct ms_source_use old = { .key = "alice", .kind = "session",
				     .name = "alice", .at = 5, .slack = 3600 };
	struct rows r;
	int64_t id;

	ms_retire_init(NULL, store, &cfg);
	assert_int_equal(ms_store_user_get(store, "alice", &id), 0);
	ms_retire_note("session", "alice");
	assert_int_equal(row(&r, "alice", "session")->slack, 3600);
	/* Make the row look old: a throttled note leaves it so. */
	assert_int_equal(ms_store_source_use_note(store, &old), 0);
	ms_retire_note("session", "alice");
	assert_int_equal(row(&r, "alice", "session")->at, 5);
	ms_retire_note("submission", "alice");
	assert_non_null(row(&r, "alice", "submission"));
	/* A new process (init) writes again. */
	ms_retire_init(NULL, store, &cfg);
	ms_retire_note("session", "alice");
	assert_true(row(&r, "alice", "session")->at > 5);
}

static void durations(void **state)
{
	unsigned int v = 7;

	assert_int_equal(ms_parse_duration("90", &v), 0);
	assert_int_equal(v, 90);
	assert_int_equal(ms_parse_duration("15m", &v), 0);
	assert_int_equal(v, 900);
	assert_int_equal(ms_parse_duration("24h", &v), 0);
	assert_int_equal(v, 86400);
	assert_int_equal(ms_parse_duration("400d", &v), 0);
	assert_int_equal(v, 400 * 86400);
	v = 7;
	assert_int_equal(ms_parse_duration("401d", &v), -1);
	assert_int_equal(ms_parse_duration("", &v), -1);
	assert_int_equal(ms_parse_duration("1h30m", &v), -1);
	assert_int_equal(ms_parse_duration("-1s", &v), -1);
	assert_int_equal(ms_parse_duration("5 s", &v), -1);
	assert_int_equal(ms_parse_duration("99999999999999999999", &v), -1);
	assert_int_equal(v, 7);
}

static int setup(void **state)
{
	char *err = NULL;

	memcpy(dir, "/tmp/ms-retire-test.XXXXXX", sizeof(dir));
	if (mkdtemp(dir) == NULL)
		return -1;
	snprintf(path, sizeof(path), "%s/store.db", dir);
	if (ms_store_open(path, &store, &err) < 0) {
		fprintf(stderr, "ms_store_open: %s\n", err);
		free(err);
		return -1;
	}
	return 0;
}

static int teardown(void **state)
{
	char p[160];

	/* no write may reach a closed store */
	ms_retire_init(NULL, NULL, &(struct ms_retire_cfg){ 0 });
	ms_store_close(&store);
	for (const char *const *sfx = (const char *const[]){ "", "-wal",
	     "-shm", NULL }; *sfx != NULL; sfx++) {
		snprintf(p, sizeof(p), "%s%s", path, *sfx);
		unlink(p);
	}
	return rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(names, setup, teardown),
		cmocka_unit_test_setup_teardown(throttle, setup, teardown),
		cmocka_unit_test(durations),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
