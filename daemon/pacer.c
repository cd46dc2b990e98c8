/* The source's pace: a token bucket and the back-off (see pacer.h). */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "pacer.h"

void ms_pacer_init(struct ms_pacer *p, double rate, uint64_t now)
{
	memset(p, 0, sizeof(*p));
	p->rate = rate > 0 ? rate : 0;
	p->tokens = p->rate > 1 ? p->rate : 1;
	p->refilled_ms = p->win_ms = now;
}

void ms_pacer_set_rate(struct ms_pacer *p, double rate, uint64_t now)
{
	p->rate = rate > 0 ? rate : 0;
	p->changes++;
	p->last_change = MS_PACE_SET;
	(void)now;
}

double ms_pacer_rate(const struct ms_pacer *p)
{
	if (p->limit > 0 && (p->rate == 0 || p->limit < p->rate))
		return p->limit;
	return p->rate;
}

/* The commands' rate over the last second or so: what a back-off halves
 * when there is no cap to halve. */
static void measure(struct ms_pacer *p, uint64_t now)
{
	if (now - p->win_ms < 1000)
		return;
	p->recent = (double)p->win_n * 1000.0 / (double)(now - p->win_ms);
	p->win_ms = now;
	p->win_n = 0;
}

static void sent(struct ms_pacer *p)
{
	p->commands++;
	p->win_n++;
}

uint64_t ms_pacer_take(struct ms_pacer *p, uint64_t now, int must)
{
	double eff, burst;

	ms_pacer_tick(p, now);
	measure(p, now);
	eff = ms_pacer_rate(p);
	if (eff == 0) {
		sent(p);
		return 0;
	}
	/* One second's worth at most: a calm spell is no licence for a
	 * burst the server would feel. */
	burst = eff > 1 ? eff : 1;
	if (now > p->refilled_ms)
		p->tokens += (double)(now - p->refilled_ms) * eff / 1000.0;
	p->refilled_ms = now;
	if (p->tokens > burst)
		p->tokens = burst;
	if (p->tokens >= 1 || must) {
		p->tokens -= 1;
		sent(p);
		return 0;
	}
	return (uint64_t)((1 - p->tokens) * 1000.0 / eff) + 1;
}

int ms_pacer_busy(struct ms_pacer *p, uint64_t now, const char *why)
{
	double base;

	snprintf(p->reason, sizeof(p->reason), "%s", why);
	if (p->level > 0 && now - p->backoff_ms < MS_PACER_HOLD_MS)
		return 0;
	measure(p, now);
	base = ms_pacer_rate(p);
	if (base == 0)
		base = p->recent > MS_PACER_BASE ? p->recent : MS_PACER_BASE;
	if (base < 2 * MS_PACER_MIN_RATE)
		base = 2 * MS_PACER_MIN_RATE;
	if (p->level == 0)
		p->before = base;
	p->limit = base / 2;
	if (p->limit < MS_PACER_MIN_RATE)
		p->limit = MS_PACER_MIN_RATE;
	if (p->tokens > 1)
		p->tokens = 1;
	p->level++;
	p->backoffs++;
	p->changes++;
	p->last_change = MS_PACE_DOWN;
	p->backoff_ms = now;
	p->recover_ms = now + MS_PACER_RECOVER_MS;
	return 1;
}

int ms_pacer_latency(struct ms_pacer *p, uint64_t now, uint64_t ms)
{
	char why[100];

	if (p->lat_n >= MS_PACER_LAT_SAMPLES && ms > MS_PACER_SLOW_FLOOR_MS &&
	    (double)ms > MS_PACER_SLOW_FACTOR * p->lat_norm) {
		snprintf(why, sizeof(why), "slow replies: %llu ms, the norm "
			 "%.0f ms", (unsigned long long)ms, p->lat_norm);
		/* Learnt slowly: a server slower for good becomes the
		 * norm instead of a back-off without end. */
		p->lat_norm += ((double)ms - p->lat_norm) / 32;
		return ms_pacer_busy(p, now, why);
	}
	if (p->lat_n == 0)
		p->lat_norm = (double)ms;
	else
		p->lat_norm += ((double)ms - p->lat_norm) / 8;
	p->lat_n++;
	return 0;
}

int ms_pacer_tick(struct ms_pacer *p, uint64_t now)
{
	double target;

	if (p->level == 0 || now < p->recover_ms)
		return 0;
	target = p->before;
	if (p->rate > 0 && p->rate < target)
		target = p->rate;
	p->limit *= MS_PACER_RAISE;
	p->recover_ms = now + MS_PACER_RECOVER_MS;
	p->changes++;
	p->last_change = MS_PACE_UP;
	if (p->limit >= target) {
		p->limit = 0;
		p->level = 0;
	}
	return 1;
}

uint64_t ms_pacer_retry_delay(unsigned int n)
{
	uint64_t d;

	if (n == 0 || n > MS_PACER_RETRIES)
		return 0;
	d = (uint64_t)MS_PACER_RETRY_BASE_MS << (n - 1);
	return d < MS_PACER_RETRY_MAX_MS ? d : MS_PACER_RETRY_MAX_MS;
}

void ms_pacer_log(struct ms_pacer *p, const char *host, unsigned int port)
{
	double r = ms_pacer_rate(p);

	if (p->changes == p->logged)
		return;
	p->logged = p->changes;
	if (p->limit > 0 && p->last_change == MS_PACE_DOWN)
		ms_warn("%s:%u is busy (%s): commands per second lowered to "
			"%.1f", host, port, p->reason, r);
	else if (p->last_change == MS_PACE_UP && p->limit > 0)
		ms_info("%s:%u calm again: commands per second raised to "
			"%.1f", host, port, r);
	else if (p->last_change == MS_PACE_UP && r > 0)
		ms_info("%s:%u calm again: back to the cap, %.1f commands per "
			"second", host, port, r);
	else if (p->last_change == MS_PACE_UP)
		ms_info("%s:%u calm again: back to full pace (no cap)", host,
			port);
}

static int has_word(const char *text, const char *word)
{
	size_t n = strlen(word);

	for (; *text != '\0'; text++)
		if (strncasecmp(text, word, n) == 0)
			return 1;
	return 0;
}

int ms_pacer_is_busy_reply(const char *code, const char *text)
{
	static const char *const codes[] = {
		"UNAVAILABLE", "LIMIT", "INUSE", "THROTTLED",
	};
	static const char *const words[] = {
		"throttl", "rate limit", "try again later", "slow down",
		"too many requests", "server busy", "server is busy",
	};

	for (size_t i = 0; code != NULL && i < sizeof(codes) / sizeof(codes[0]); i++)
		if (strcasecmp(code, codes[i]) == 0)
			return 1;
	for (size_t i = 0; text != NULL && i < sizeof(words) / sizeof(words[0]); i++)
		if (has_word(text, words[i]))
			return 1;
	return 0;
}
