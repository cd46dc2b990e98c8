/* Unit tests for the store's reader (daemon/reader.c): a read's work runs
 * on a reader's thread, not the loop's, with that thread's own store (a
 * second connection to a real SQLite file, seeing what the first wrote);
 * done() comes on the loop, with one thread in the order the reads were
 * given, with the store's error when the work failed; with two threads a
 * read that does not end holds up no other; a cancelled read is dropped
 * and its done() never called; reads still waiting at the end are
 * dropped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "reader.h"
#include "store.h"

struct fixture {
	char dir[64], path[128];
	struct ms_store *store;		/* the loop's */
	uv_loop_t loop;
	struct ms_reader *r;
};

struct ask {
	const char *user;
	pthread_t ran_on;
	int64_t id;
	int found;
	int done, dropped;
	char error[256];
	int *order, *n;			/* where done() writes its turn */
	int turn;
};

static atomic_int let_go;	/* a read of user "wait" runs until set */

/* A reader of n threads on a fresh SQLite file. */
static int setup_n(void **state, unsigned int n)
{
	struct fixture *f = calloc(1, sizeof(*f));
	struct ms_store *more[2];
	char *error = NULL, err[256];

	assert_non_null(f);
	snprintf(f->dir, sizeof(f->dir), "/tmp/ms-reader-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/store.db", f->dir);
	assert_int_equal(ms_store_open(f->path, &f->store, &error), 0);
	for (unsigned int i = 0; i < n; i++)
		assert_int_equal(ms_store_open(f->path, &more[i], &error), 0);
	assert_int_equal(uv_loop_init(&f->loop), 0);
	assert_int_equal(ms_reader_new(&f->loop, more, n, &f->r, err,
				       sizeof(err)), 0);
	assert_null(more[0]);
	atomic_store(&let_go, 0);
	*state = f;
	return 0;
}

static int setup(void **state)
{
	return setup_n(state, 1);
}

static int setup2(void **state)
{
	return setup_n(state, 2);
}

static int teardown(void **state)
{
	struct fixture *f = *state;
	char p[200];

	atomic_store(&let_go, 1);	/* a failed test's slow read ends */
	ms_reader_free(f->r);
	uv_run(&f->loop, UV_RUN_NOWAIT);
	assert_int_equal(uv_loop_close(&f->loop), 0);
	ms_store_close(&f->store);
	for (const char *const *sfx = (const char *const[]){ "", "-wal",
	     "-shm", NULL }; *sfx != NULL; sfx++) {
		snprintf(p, sizeof(p), "%s%s", f->path, *sfx);
		unlink(p);
	}
	rmdir(f->dir);
	free(f);
	return 0;
}

static int work(struct ms_store *store, void *arg, char *err, size_t errsz)
{
	struct ask *a = arg;
	struct ms_user_info info;

	a->ran_on = pthread_self();
	while (strcmp(a->user, "wait") == 0 && !atomic_load(&let_go))
		usleep(1000);
	if (strcmp(a->user, "!") == 0) {
		snprintf(err, errsz, "asked to fail");
		return -1;
	}
	if (ms_store_user_info(store, a->user, &info, &a->found) < 0)
		return -1;
	if (a->found)
		a->id = info.id;
	return 0;
}

static void done(void *arg, const char *error)
{
	struct ask *a = arg;

	a->done++;
	snprintf(a->error, sizeof(a->error), "%s", error ? error : "");
	if (a->order != NULL)
		a->turn = (*a->n)++;
}

static void drop(void *arg)
{
	((struct ask *)arg)->dropped++;
}

/* Runs the loop until every read is answered (done or dropped), 5 s at
 * most. */
static void settle(struct fixture *f)
{
	for (int i = 0; i < 500 && ms_reader_pending(f->r) > 0; i++) {
		uv_run(&f->loop, UV_RUN_NOWAIT);
		usleep(10000);
	}
	assert_int_equal(ms_reader_pending(f->r), 0);
}

static void reads_on_its_thread(void **state)
{
	struct fixture *f = *state;
	struct ask a = { .user = "alice" }, b = { .user = "nobody" };
	int64_t id;

	assert_int_equal(ms_store_user_get(f->store, "alice", &id), 0);
	assert_non_null(ms_read_start(f->r, work, done, drop, &a));
	assert_non_null(ms_read_start(f->r, work, done, drop, &b));
	/* done() only ever on the loop: nothing before it runs */
	usleep(50000);
	assert_int_equal(a.done + b.done, 0);
	settle(f);
	assert_int_equal(a.done, 1);
	assert_int_equal(a.dropped, 0);
	assert_false(pthread_equal(a.ran_on, pthread_self()));
	assert_true(a.found);
	assert_int_equal(a.id, id);
	assert_string_equal(a.error, "");
	assert_int_equal(b.done, 1);
	assert_false(b.found);
}

static void in_order_with_errors(void **state)
{
	struct fixture *f = *state;
	struct ask a[6];
	int n = 0;

	for (int i = 0; i < 6; i++) {
		a[i] = (struct ask){ .user = i % 2 ? "!" : "alice",
				     .order = &n, .n = &n };
		assert_non_null(ms_read_start(f->r, work, done, drop, &a[i]));
	}
	settle(f);
	for (int i = 0; i < 6; i++) {
		assert_int_equal(a[i].done, 1);
		assert_int_equal(a[i].turn, i);
		assert_string_equal(a[i].error, i % 2 ? "asked to fail" : "");
	}
}

/* Two threads: a read that does not end (a locked table) holds up its
 * thread only; the reads after it are answered meanwhile, on the other. */
static void slow_read_holds_up_no_other(void **state)
{
	struct fixture *f = *state;
	struct ask slow = { .user = "wait" }, a[4];
	int64_t id;
	int n = 0;

	assert_int_equal(ms_store_user_get(f->store, "alice", &id), 0);
	slow.order = slow.n = &n;
	assert_non_null(ms_read_start(f->r, work, done, drop, &slow));
	for (int i = 0; i < 4; i++) {
		a[i] = (struct ask){ .user = "alice", .order = &n, .n = &n };
		assert_non_null(ms_read_start(f->r, work, done, drop, &a[i]));
	}
	for (int i = 0; i < 500 && ms_reader_pending(f->r) > 1; i++) {
		uv_run(&f->loop, UV_RUN_NOWAIT);
		usleep(10000);
	}
	assert_int_equal(ms_reader_pending(f->r), 1);
	assert_int_equal(slow.done, 0);
	for (int i = 0; i < 4; i++) {
		assert_int_equal(a[i].done, 1);
		assert_true(a[i].found);
		assert_int_equal(a[i].id, id);
		assert_false(pthread_equal(a[i].ran_on, slow.ran_on));
	}
	atomic_store(&let_go, 1);
	settle(f);
	assert_int_equal(slow.done, 1);
	assert_int_equal(slow.turn, 4);
}

static void cancelled_is_dropped(void **state)
{
	struct fixture *f = *state;
	struct ask a = { .user = "alice" }, b = { .user = "alice" };
	struct ms_read *rd = ms_read_start(f->r, work, done, drop, &a);

	assert_non_null(rd);
	assert_non_null(ms_read_start(f->r, work, done, drop, &b));
	ms_read_cancel(rd);
	settle(f);
	assert_int_equal(a.done, 0);
	assert_int_equal(a.dropped, 1);
	assert_int_equal(b.done, 1);
	assert_int_equal(b.dropped, 0);
}

static void waiting_at_the_end_dropped(void **state)
{
	struct fixture *f = *state;
	struct ask a[20];

	for (int i = 0; i < 20; i++) {
		a[i] = (struct ask){ .user = "alice" };
		assert_non_null(ms_read_start(f->r, work, done, drop, &a[i]));
	}
	ms_reader_free(f->r);		/* before the loop ran */
	f->r = NULL;
	for (int i = 0; i < 20; i++) {
		assert_int_equal(a[i].done, 0);
		assert_int_equal(a[i].dropped, 1);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(reads_on_its_thread, setup,
						teardown),
		cmocka_unit_test_setup_teardown(in_order_with_errors, setup,
						teardown),
		cmocka_unit_test_setup_teardown(slow_read_holds_up_no_other,
						setup2, teardown),
		cmocka_unit_test_setup_teardown(cancelled_is_dropped, setup,
						teardown),
		cmocka_unit_test_setup_teardown(cancelled_is_dropped, setup2,
						teardown),
		cmocka_unit_test_setup_teardown(waiting_at_the_end_dropped,
						setup, teardown),
		cmocka_unit_test_setup_teardown(waiting_at_the_end_dropped,
						setup2, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
