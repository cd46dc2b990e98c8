/* The site's ETA: the throughput of recent copies fitted as a per-user
 * overhead plus time per message and per byte, how many ran at once, and
 * the remaining users' sizes. See site_eta.h. */
#include "site_eta.h"

#include <string.h>

/* Samples older than this before the newest are left out: a sweep stopped
 * for a night says nothing of its speed. */
#define WINDOW_MS (3600 * 1000ULL)

/* (Not libm's: the daemon links without it.) */
static double dmax(double a, double b)
{
	return a > b ? a : b;
}

static double dabs(double a)
{
	return a < 0 ? -a : a;
}

void ms_eta_note(struct ms_eta *e, uint64_t now_ms, double seconds,
		 uint64_t msgs, uint64_t bytes)
{
	e->s[e->next] = (struct ms_eta_sample){
		.end_ms = now_ms, .seconds = seconds > 0 ? seconds : 0,
		.msgs = msgs, .bytes = bytes,
	};
	e->next = (e->next + 1) % MS_ETA_SAMPLES;
	if (e->n < MS_ETA_SAMPLES)
		e->n++;
}

static uint64_t minus(int64_t whole, uint64_t done)
{
	return whole > 0 && (uint64_t)whole > done ? (uint64_t)whole - done : 0;
}

void ms_eta_count(struct ms_eta_sizes *t, enum ms_eta_kind kind,
		  const struct ms_user_info *u, const struct ms_user_size *sz)
{
	int exact = sz->messages >= 0 && sz->bytes >= 0;

	t->users++;
	t->copied_msgs += u->msgs;
	t->copied_bytes += u->bytes;
	if (exact) {
		t->ref_users++;
		t->ref_msgs += (uint64_t)sz->messages;
		t->ref_bytes += (uint64_t)sz->bytes;
	}
	switch (kind) {
	case MS_ETA_MOVED:
		t->moved++;
		/* A moved mailbox never surveyed: its copy is its size. */
		if (!exact && u->msgs > 0) {
			t->ref_users++;
			t->ref_msgs += u->msgs;
			t->ref_bytes += u->bytes;
		}
		return;
	case MS_ETA_FAILED:
		t->failed++;
		return;
	case MS_ETA_OFF:
		t->off++;
		return;
	case MS_ETA_LEFT:
		break;
	}
	t->left++;
	if (exact) {
		t->known++;
		t->known_msgs += minus(sz->messages, u->msgs);
		t->known_bytes += minus(sz->bytes, u->bytes);
	} else if (sz->messages >= 0) {
		t->msgs_only++;
		t->msgs_only_msgs += minus(sz->messages, u->msgs);
	} else {
		t->unknown++;
		t->unknown_copied_msgs += u->msgs;
		t->unknown_copied_bytes += u->bytes;
	}
}

/* The remaining messages and bytes, estimating what the survey has not
 * given from the mean message (of every copy so far) and the mean
 * mailbox (of those known whole); -1 when there is nothing to go by. */
static int remaining(const struct ms_eta_sizes *t, double *msgs_r,
		     double *bytes_r)
{
	double msg_size = -1, mean_msgs = 0, mean_bytes = 0;

	if (t->copied_msgs > 0)
		msg_size = (double)t->copied_bytes / (double)t->copied_msgs;
	else if (t->ref_msgs > 0)
		msg_size = (double)t->ref_bytes / (double)t->ref_msgs;
	if ((t->msgs_only > 0 && msg_size < 0) ||
	    (t->unknown > 0 && t->ref_users == 0))
		return -1;
	if (t->ref_users > 0) {
		mean_msgs = (double)t->ref_msgs / (double)t->ref_users;
		mean_bytes = (double)t->ref_bytes / (double)t->ref_users;
	}
	*msgs_r = (double)(t->known_msgs + t->msgs_only_msgs) +
		  dmax(0, t->unknown * mean_msgs - (double)t->unknown_copied_msgs);
	*bytes_r = (double)t->known_bytes +
		   (t->msgs_only_msgs > 0 ? t->msgs_only_msgs * msg_size : 0) +
		   dmax(0, t->unknown * mean_bytes -
			(double)t->unknown_copied_bytes);
	return 0;
}

/* What one copy costs, in seconds of a copy's own time: a + b * messages
 * + c * bytes, fitted to the samples by least squares. */
struct cost {
	double a, b, c;
};

/* Least squares of seconds against 1 and the columns `use` names (bit 0:
 * messages, bit 1: bytes), by the normal equations. -1 when they have no
 * single answer or a coefficient comes out negative (messages and bytes
 * of equal-sized messages are one column twice). */
static int fit(const struct ms_eta_sample *const *v, unsigned int n, int use,
	       struct cost *c)
{
	double A[3][4] = { { 0 } }, x[3], coef[3] = { 0 };
	int idx[3], k = 0;

	idx[k++] = 0;
	if (use & 1)
		idx[k++] = 1;
	if (use & 2)
		idx[k++] = 2;
	if (k > 1 && n < (unsigned int)k + 1)
		return -1;
	for (unsigned int s = 0; s < n; s++) {
		/* thousands of messages and MB: the sums stay of one scale */
		double f[3] = { 1, v[s]->msgs / 1e3, v[s]->bytes / 1e6 };

		for (int i = 0; i < k; i++) {
			for (int j = 0; j < k; j++)
				A[i][j] += f[idx[i]] * f[idx[j]];
			A[i][3] += f[idx[i]] * v[s]->seconds;
		}
	}
	for (int i = 0; i < k; i++) {
		int p = i;

		for (int r = i + 1; r < k; r++)
			if (dabs(A[r][i]) > dabs(A[p][i]))
				p = r;
		if (dabs(A[p][i]) < 1e-9 * (1 + dabs(A[0][0])))
			return -1;
		for (int j = 0; j < 4 && p != i; j++) {
			double tmp = A[i][j];

			A[i][j] = A[p][j];
			A[p][j] = tmp;
		}
		for (int r = 0; r < k; r++) {
			double m = A[r][i] / A[i][i];

			for (int j = 0; j < 4 && r != i; j++)
				A[r][j] -= m * A[i][j];
		}
	}
	for (int i = 0; i < k; i++) {
		x[i] = A[i][3] / A[i][i];
		if (x[i] < 0)
			return -1;
		coef[idx[i]] = x[i];
	}
	*c = (struct cost){ coef[0], coef[1] / 1e3, coef[2] / 1e6 };
	return 0;
}

/* The measured throughput: the samples of the last hour, their cost
 * model, and how many copies ran at once (their own time over the wall
 * time from the first one's start to the last one's end, idle gaps
 * between them counted). NULL when nothing was measured. */
static json_t *throughput(const struct ms_eta *e, struct cost *c,
			  double *parallel_r)
{
	const struct ms_eta_sample *v[MS_ETA_SAMPLES];
	double busy = 0, span, msgs = 0, bytes = 0, first = 1e300;
	uint64_t newest = 0;
	unsigned int n = 0;

	for (unsigned int i = 0; i < e->n; i++)
		if (e->s[i].end_ms > newest)
			newest = e->s[i].end_ms;
	for (unsigned int i = 0; i < e->n; i++) {
		const struct ms_eta_sample *s = &e->s[i];

		if (s->end_ms + WINDOW_MS < newest)
			continue;
		v[n++] = s;
		busy += s->seconds;
		msgs += (double)s->msgs;
		bytes += (double)s->bytes;
		if ((double)s->end_ms / 1e3 - s->seconds < first)
			first = (double)s->end_ms / 1e3 - s->seconds;
	}
	if (n == 0)
		return NULL;
	span = dmax((double)newest / 1e3 - first, 1e-3);
	/* Per-user overhead, per message, per byte; the simpler models
	 * when the samples cannot tell those apart. */
	if (fit(v, n, 3, c) < 0 && fit(v, n, 2, c) < 0 &&
	    fit(v, n, 1, c) < 0)
		fit(v, n, 0, c);
	*parallel_r = dmax(busy / span, 0.01);
	return json_pack("{s:i, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f}",
			 "copies", (int)n, "seconds", span,
			 "bytes_per_second", bytes / span,
			 "messages_per_second", msgs / span,
			 "users_per_hour", n * 3600.0 / span,
			 "user_overhead_seconds", c->a,
			 "seconds_per_message", c->b,
			 "seconds_per_mb", c->c * 1e6,
			 "parallel", *parallel_r);
}

static json_t *count_or_null(int known, double v)
{
	return known ? json_integer((json_int_t)(v + 0.5)) : json_null();
}

json_t *ms_eta_json(const struct ms_eta *e, const struct ms_eta_sizes *t)
{
	double msgs = 0, bytes = 0, parallel = 1;
	int sized = remaining(t, &msgs, &bytes) == 0;
	struct cost c = { 0 };
	json_t *tp = throughput(e, &c, &parallel);
	json_t *o = json_pack("{s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:I, "
			      "s:I, s:I, s:o}",
			      "users", (json_int_t)t->users,
			      "remaining_users", (json_int_t)t->left,
			      "moved_users", (json_int_t)t->moved,
			      "failed_users", (json_int_t)t->failed,
			      "off_users", (json_int_t)t->off,
			      "remaining_messages", count_or_null(sized, msgs),
			      "remaining_bytes", count_or_null(sized, bytes),
			      "sizes_known", (json_int_t)t->known,
			      "sizes_estimated",
			      (json_int_t)(t->msgs_only + t->unknown),
			      "sizes_messages_only", (json_int_t)t->msgs_only,
			      "throughput", tp != NULL ? tp : json_null());
	const char *unknown = NULL;

	if (t->left == 0) {
		json_object_set_new(o, "eta_seconds", json_integer(0));
		return o;
	}
	if (tp == NULL)
		unknown = "no copy measured yet";
	else if (!sized)
		unknown = "the remaining users' sizes are not known yet";
	if (unknown != NULL) {
		json_object_set_new(o, "eta_seconds", json_null());
		json_object_set_new(o, "unknown", json_string(unknown));
		return o;
	}
	json_object_set_new(o, "eta_seconds", json_integer((json_int_t)(
		(c.a * (double)t->left + c.b * msgs + c.c * bytes) /
		parallel + 0.5)));
	return o;
}
