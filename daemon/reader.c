/* The store's reader (reader.h). One mutex guards the two lists: reads to
 * run, which every thread takes from, and reads run whose done() the loop
 * is to call (woken by the async handle). A read's `cancelled` and the
 * count are the loop's alone.
 */
#include "reader.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "net.h"
#include "store.h"

struct ms_read {
	struct ms_read *next;
	struct ms_reader *r;
	ms_read_work_fn *work;
	ms_read_done_fn *done;
	ms_read_drop_fn *drop;
	void *arg;
	int status;
	int cancelled;
	char error[512];
};

struct rlist {
	struct ms_read *head, *tail;
};

struct rthread {
	struct ms_reader *r;
	struct ms_store *store;		/* this thread's alone */
	pthread_t thread;
	int started;
};

struct ms_reader {
	struct rthread t[MS_READERS_MAX];
	unsigned int n;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int stop;
	struct rlist todo, done;
	uv_async_t async;
	unsigned int pending;
};

static void rlist_add(struct rlist *l, struct ms_read *rd)
{
	rd->next = NULL;
	if (l->tail != NULL)
		l->tail->next = rd;
	else
		l->head = rd;
	l->tail = rd;
}

static struct ms_read *rlist_take(struct rlist *l)
{
	struct ms_read *rd = l->head;

	if (rd != NULL) {
		l->head = rd->next;
		if (l->head == NULL)
			l->tail = NULL;
	}
	return rd;
}

int ms_read_now(struct ms_store *store, ms_read_work_fn *work, void *arg,
		char *err, size_t errsz)
{
	int r;

	err[0] = '\0';
	r = work(store, arg, err, errsz);
	if (r < 0 && err[0] == '\0')
		snprintf(err, errsz, "%s", ms_store_error(store));
	return r;
}

static void *run(void *arg)
{
	struct rthread *t = arg;
	struct ms_reader *r = t->r;

	pthread_mutex_lock(&r->lock);
	while (!r->stop) {
		struct ms_read *rd = rlist_take(&r->todo);

		if (rd == NULL) {
			pthread_cond_wait(&r->cond, &r->lock);
			continue;
		}
		pthread_mutex_unlock(&r->lock);
		rd->status = ms_read_now(t->store, rd->work, rd->arg,
					 rd->error, sizeof(rd->error));
		if (rd->status < 0)
			ms_store_settle(t->store);
		pthread_mutex_lock(&r->lock);
		rlist_add(&r->done, rd);
		uv_async_send(&r->async);
	}
	pthread_mutex_unlock(&r->lock);
	return NULL;
}

static void finish(struct ms_read *rd)
{
	rd->r->pending--;
	if (rd->cancelled)
		rd->drop(rd->arg);
	else
		rd->done(rd->arg, rd->status < 0 ? rd->error : NULL);
	free(rd);
}

static void on_done(uv_async_t *a)
{
	struct ms_reader *r = a->data;
	struct rlist l;
	struct ms_read *rd;

	pthread_mutex_lock(&r->lock);
	l = r->done;
	r->done.head = r->done.tail = NULL;
	pthread_mutex_unlock(&r->lock);
	/* done() may start another read: it goes on the reader's list */
	while ((rd = rlist_take(&l)) != NULL)
		finish(rd);
}

/* Stops and joins the threads started, closes every store. */
static void stop_threads(struct ms_reader *r)
{
	pthread_mutex_lock(&r->lock);
	r->stop = 1;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
	for (unsigned int i = 0; i < r->n; i++) {
		if (r->t[i].started)
			pthread_join(r->t[i].thread, NULL);
		ms_store_close(&r->t[i].store);
	}
}

int ms_reader_new(uv_loop_t *loop, struct ms_store **stores, unsigned int n,
		  struct ms_reader **r_out, char *err, size_t errsz)
{
	struct ms_reader *r = calloc(1, sizeof(*r));

	*r_out = NULL;
	if (r == NULL || n == 0 || n > MS_READERS_MAX) {
		snprintf(err, errsz, r == NULL ? "out of memory" :
			 "the reader: from 1 to %d threads", MS_READERS_MAX);
		for (unsigned int i = 0; i < n; i++)
			ms_store_close(&stores[i]);
		free(r);
		return -1;
	}
	r->n = n;
	for (unsigned int i = 0; i < n; i++) {
		r->t[i].r = r;
		r->t[i].store = stores[i];
		stores[i] = NULL;
	}
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
	if (uv_async_init(loop, &r->async, on_done) < 0) {
		snprintf(err, errsz, "the reader's handle: cannot make it");
		stop_threads(r);
		free(r);
		return -1;
	}
	r->async.data = r;
	for (unsigned int i = 0; i < n; i++) {
		if (pthread_create(&r->t[i].thread, NULL, run, &r->t[i]) != 0) {
			snprintf(err, errsz, "the reader's thread: cannot "
				 "start it");
			stop_threads(r);
			ms_close_free((uv_handle_t *)&r->async, r);
			return -1;
		}
		r->t[i].started = 1;
	}
	*r_out = r;
	return 0;
}

void ms_reader_free(struct ms_reader *r)
{
	struct ms_read *rd;

	if (r == NULL)
		return;
	stop_threads(r);
	/* Nobody waits any more: what was asked is let go. */
	while ((rd = rlist_take(&r->done)) != NULL ||
	       (rd = rlist_take(&r->todo)) != NULL) {
		rd->drop(rd->arg);
		free(rd);
	}
	pthread_mutex_destroy(&r->lock);
	pthread_cond_destroy(&r->cond);
	ms_close_free((uv_handle_t *)&r->async, r);
}

struct ms_read *ms_read_start(struct ms_reader *r, ms_read_work_fn *work,
			      ms_read_done_fn *done, ms_read_drop_fn *drop,
			      void *arg)
{
	struct ms_read *rd = calloc(1, sizeof(*rd));

	if (rd == NULL)
		return NULL;
	rd->r = r;
	rd->work = work;
	rd->done = done;
	rd->drop = drop;
	rd->arg = arg;
	r->pending++;
	pthread_mutex_lock(&r->lock);
	rlist_add(&r->todo, rd);
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->lock);
	return rd;
}

void ms_read_cancel(struct ms_read *rd)
{
	if (rd != NULL)
		rd->cancelled = 1;
}

unsigned int ms_reader_pending(const struct ms_reader *r)
{
	return r->pending;
}
