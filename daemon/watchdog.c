/* The fence's watchdog (watchdog.h). One mutex guards everything; the
 * thread holds it only to look at the deadline and, once, to shut the
 * sockets down. shutdown(2) on a socket the loop is using is safe: the
 * loop sees the end or an error on its next read or write. A socket's
 * descriptor is removed (under the mutex) before the loop closes it, so
 * the thread never touches a number that was reused. */
#include "watchdog.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

struct entry {
	int fd[2];
	unsigned int *slot;
};

struct ms_watchdog {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int stop;
	uint64_t due;			/* 0: none */
	unsigned int fired;		/* relays shut down, +1; 0: not */
	struct entry *v;
	unsigned int n, cap;
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void shut(const struct entry *e)
{
	for (int i = 0; i < 2; i++)
		if (e->fd[i] >= 0)
			shutdown(e->fd[i], SHUT_RDWR);
}

static void *run(void *arg)
{
	struct ms_watchdog *wd = arg;

	pthread_mutex_lock(&wd->lock);
	while (!wd->stop) {
		uint64_t now = now_ms();
		struct timespec at;

		if (wd->due == 0 || wd->fired) {
			pthread_cond_wait(&wd->cond, &wd->lock);
			continue;
		}
		if (now < wd->due) {
			at.tv_sec = (time_t)(wd->due / 1000);
			at.tv_nsec = (long)(wd->due % 1000) * 1000000;
			pthread_cond_timedwait(&wd->cond, &wd->lock, &at);
			continue;
		}
		for (unsigned int i = 0; i < wd->n; i++)
			shut(&wd->v[i]);
		wd->fired = wd->n + 1;
	}
	pthread_mutex_unlock(&wd->lock);
	return NULL;
}

int ms_watchdog_new(struct ms_watchdog **wd_r)
{
	struct ms_watchdog *wd = calloc(1, sizeof(*wd));
	pthread_condattr_t ca;

	*wd_r = NULL;
	if (wd == NULL)
		return -1;
	pthread_mutex_init(&wd->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&wd->cond, &ca);
	pthread_condattr_destroy(&ca);
	if (pthread_create(&wd->thread, NULL, run, wd) != 0) {
		pthread_cond_destroy(&wd->cond);
		pthread_mutex_destroy(&wd->lock);
		free(wd);
		return -1;
	}
	*wd_r = wd;
	return 0;
}

void ms_watchdog_free(struct ms_watchdog *wd)
{
	if (wd == NULL)
		return;
	pthread_mutex_lock(&wd->lock);
	wd->stop = 1;
	pthread_cond_signal(&wd->cond);
	pthread_mutex_unlock(&wd->lock);
	pthread_join(wd->thread, NULL);
	for (unsigned int i = 0; i < wd->n; i++)
		*wd->v[i].slot = 0;
	free(wd->v);
	pthread_cond_destroy(&wd->cond);
	pthread_mutex_destroy(&wd->lock);
	free(wd);
}

void ms_watchdog_arm(struct ms_watchdog *wd, uint64_t due)
{
	pthread_mutex_lock(&wd->lock);
	wd->due = due;
	wd->fired = 0;
	pthread_cond_signal(&wd->cond);
	pthread_mutex_unlock(&wd->lock);
}

unsigned int ms_watchdog_fired(struct ms_watchdog *wd)
{
	unsigned int n;

	pthread_mutex_lock(&wd->lock);
	n = wd->fired ? wd->fired - 1 : 0;
	pthread_mutex_unlock(&wd->lock);
	return n;
}

void ms_watchdog_add(struct ms_watchdog *wd, unsigned int *slot, int fd1,
		     int fd2)
{
	struct entry e = { { fd1, fd2 }, slot };

	pthread_mutex_lock(&wd->lock);
	if (wd->fired) {
		shut(&e);
		goto out;
	}
	if (wd->n == wd->cap) {
		unsigned int cap = wd->cap ? wd->cap * 2 : 64;
		struct entry *v = realloc(wd->v, cap * sizeof(*v));

		/* no room: not watched, ended by the loop alone */
		if (v == NULL)
			goto out;
		wd->v = v;
		wd->cap = cap;
	}
	wd->v[wd->n++] = e;
	*slot = wd->n;
out:
	pthread_mutex_unlock(&wd->lock);
}

void ms_watchdog_remove(struct ms_watchdog *wd, unsigned int *slot)
{
	unsigned int i;

	if (*slot == 0)
		return;
	pthread_mutex_lock(&wd->lock);
	i = *slot - 1;
	wd->v[i] = wd->v[--wd->n];
	*wd->v[i].slot = i + 1;
	*slot = 0;
	pthread_mutex_unlock(&wd->lock);
}
