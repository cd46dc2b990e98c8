/* The pace of the commands the mover sends to one server (the source): a
 * token bucket shared by all of its connections, all users together, and
 * the back-off when the server says it is busy ([UNAVAILABLE], [LIMIT],
 * [INUSE], throttling text) or answers far slower than its recent norm.
 * Pure logic on a millisecond clock the caller passes (unit-tested alone:
 * tests/unit/test_pacer.c); imapc.c applies it to the commands it sends,
 * the mover owns one per server. See docs/mover.md, "Protecting the
 * source". */
#ifndef MS_PACER_H
#define MS_PACER_H

#include <stdint.h>

#define MS_PACER_MIN_RATE 1.0		/* the back-off goes no lower (cmd/s) */
#define MS_PACER_BASE 20.0		/* without a cap, a back-off halves at
					   least this (the rate just measured
					   may be a moment's: a copy starting) */
#define MS_PACER_HOLD_MS 1000		/* signals within this of a back-off
					   are the same episode */
#define MS_PACER_RECOVER_MS 5000	/* calm this long: one step back up */
#define MS_PACER_RAISE 1.5		/* each step back up multiplies by it */
#define MS_PACER_SLOW_FLOOR_MS 1500	/* a reply is never "slow" below it */
#define MS_PACER_SLOW_FACTOR 8		/* ... nor below this times the norm */
#define MS_PACER_LAT_SAMPLES 8		/* replies before the norm counts */
#define MS_PACER_RETRY_BASE_MS 500	/* a refused command's first wait */
#define MS_PACER_RETRY_MAX_MS 16000
#define MS_PACER_RETRIES 5		/* then the refusal is the answer */

struct ms_pacer {
	double rate;			/* the configured cap, cmd/s; 0: none */
	double limit;			/* the back-off's own cap; 0: none */
	double before;			/* the pace the first back-off left */
	double tokens;			/* may go below 0: commands that could
					   not wait (an APPEND's, a login's) */
	uint64_t refilled_ms;
	unsigned int level;		/* back-offs since the last full pace */
	uint64_t backoff_ms;		/* the last back-off */
	uint64_t recover_ms;		/* the next step back up */
	/* the commands' recent rate, for a back-off without a cap */
	uint64_t win_ms;
	unsigned int win_n;
	double recent;
	/* replies' latency, ms */
	double lat_norm;
	unsigned int lat_n;
	uint64_t commands;		/* sent, all told */
	uint64_t backoffs;		/* episodes, all told */
	unsigned int changes;		/* each change of the pace adds one:
					   the caller logs once per change */
	unsigned int logged;		/* the changes the caller logged */
	enum { MS_PACE_SET, MS_PACE_DOWN, MS_PACE_UP } last_change;
	char reason[160];		/* the last back-off's cause */
};

void ms_pacer_init(struct ms_pacer *p, double rate, uint64_t now);
/* The configured cap changes (0: none); the back-off, if any, stays. */
void ms_pacer_set_rate(struct ms_pacer *p, double rate, uint64_t now);
/* The pace in force: the lower of the cap and the back-off; 0: none. */
double ms_pacer_rate(const struct ms_pacer *p);
/* A command is to be sent. 0: it may go (its token is taken); else the
 * milliseconds to wait before asking again. must: it goes now whatever
 * (0 returned), the bucket going into debt that later commands repay. */
uint64_t ms_pacer_take(struct ms_pacer *p, uint64_t now, int must);
/* The server said it is busy (why: its words). 1 when the pace was
 * lowered, 0 when this is the same episode as the last back-off. */
int ms_pacer_busy(struct ms_pacer *p, uint64_t now, const char *why);
/* A reply came ms after its command went: 1 when it was slow enough to
 * back off (and the pace was lowered). */
int ms_pacer_latency(struct ms_pacer *p, uint64_t now, uint64_t ms);
/* Recovery, one step when the server was calm long enough: 1 when the
 * pace changed. ms_pacer_take() calls it. */
int ms_pacer_tick(struct ms_pacer *p, uint64_t now);
/* The wait before the nth retry (n from 1) of a refused command or
 * login; 0 when there is to be no nth retry. */
uint64_t ms_pacer_retry_delay(unsigned int n);
/* Logs the pace's last change once (whichever connection sees it first):
 * a back-off, a step back up, the full pace again. */
void ms_pacer_log(struct ms_pacer *p, const char *host, unsigned int port);
/* 1 when a server's reply (its response code, or NULL, and its text)
 * says it is busy or throttling: try again later. */
int ms_pacer_is_busy_reply(const char *code, const char *text);

#endif
