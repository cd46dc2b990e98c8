/* Where each user's copy spends its wall time (docs/mover.md, "Phases"):
 * queue, login, plan, copy, flags, verify, store, in wall-clock
 * nanoseconds per user.
 *
 * Each moment of a user's wall time is counted at most once. A libuv
 * prepare handle, run once per turn of the loop just before it waits,
 * charges the time since the last turn: the time spent inside the store's
 * writes for the user (stamped around them, mv_ph_store()) to "store", the
 * rest split evenly among the user's connection pairs at work, each in its
 * phase; "queue" only gets the moments when none is at work and one waits
 * for a connection slot. What a turn's callbacks do is charged to the
 * phases the pairs were in when the turn began: the reply that ends a
 * phase belongs to it. No clock is read per message. */
#include <stdlib.h>

#include "mover_internal.h"

const char *const ms_mover_phase_names[MS_PH_N] = {
	[MS_PH_QUEUE] = "queue", [MS_PH_LOGIN] = "login",
	[MS_PH_PLAN] = "plan", [MS_PH_COPY] = "copy",
	[MS_PH_FLAGS] = "flags", [MS_PH_VERIFY] = "verify",
	[MS_PH_STORE] = "store",
};

/* The phase a connection pair is in, -1 for none (idle, closed). */
static int worker_phase(const struct worker *w)
{
	switch (w->state) {
	case W_CONNECTING:
		if (!w->have_src_slot)
			return MS_PH_QUEUE;
		/* worker 0 plans on its connections before it is W_IDLE */
		return w->s_ready && w->d_ready ? MS_PH_PLAN : MS_PH_LOGIN;
	case W_BUSY:
		break;
	default:
		return -1;
	}
	switch (w->phase) {
	case PH_FLAGS:
	case PH_RSCAN_SRC:	/* a rollback's scan carries flags and */
	case PH_RSCAN_DST:	/* expunges over */
	case PH_REXPUNGE:
		return MS_PH_FLAGS;
	case PH_VERIFY_SRC:
	case PH_EXPUNGE:
	case PH_VERIFY_DST:
	case PH_DEDUP:
	case PH_DIGEST:
	case PH_REPAIR:
		return MS_PH_VERIFY;
	default:		/* open, match, seek, copy */
		return MS_PH_COPY;
	}
}

/* Charges u's time up to now by the phases its pairs were in (u->ph_in),
 * then notes the phases they are in now. */
void mv_ph_charge(struct ujob *u, uint64_t now)
{
	uint64_t dt = now > u->ph_last ? now - u->ph_last : 0;
	uint64_t st = u->ph_store_ns < dt ? u->ph_store_ns : dt;
	unsigned int work = 0;

	u->ph_last = now;
	u->ph_store_ns = 0;
	u->ph_ns[MS_PH_STORE] += st;
	dt -= st;
	for (int p = MS_PH_LOGIN; p < MS_PH_STORE; p++)
		work += u->ph_in[p];
	if (work > 0) {
		for (int p = MS_PH_LOGIN; p < MS_PH_STORE; p++)
			u->ph_ns[p] += dt * u->ph_in[p] / work;
	} else if (u->ph_in[MS_PH_QUEUE] > 0) {
		u->ph_ns[MS_PH_QUEUE] += dt;
	}
	for (int p = 0; p < MS_PH_N; p++)
		u->ph_in[p] = 0;
	for (unsigned int i = 0; i < u->nworkers; i++) {
		int p = worker_phase(&u->workers[i]);

		if (p >= 0)
			u->ph_in[p]++;
	}
}

/* Time spent in the store's writes for u since t0 (uv_hrtime()). */
void mv_ph_store(struct ujob *u, uint64_t t0)
{
	u->ph_store_ns += uv_hrtime() - t0;
}

static void on_tick(uv_prepare_t *h)
{
	struct ms_mover *m = h->data;
	uint64_t now = uv_hrtime();

	for (struct ujob *u = m->jobs; u != NULL; u = u->next)
		if (!u->finished)
			mv_ph_charge(u, now);
	if (m->jobs == NULL)
		uv_prepare_stop(h);
}

/* Starts the ticks (idempotent); they stop when no job is left. The
 * handle does not keep the loop alive. */
int mv_ph_start(struct ms_mover *m)
{
	if (m->ph_tick == NULL) {
		m->ph_tick = calloc(1, sizeof(*m->ph_tick));
		if (m->ph_tick == NULL)
			return -1;
		uv_prepare_init(m->loop, m->ph_tick);
		uv_unref((uv_handle_t *)m->ph_tick);
		m->ph_tick->data = m;
	}
	return uv_prepare_start(m->ph_tick, on_tick);
}

void mv_ph_free(struct ms_mover *m)
{
	if (m->ph_tick != NULL)
		ms_close_free((uv_handle_t *)m->ph_tick, m->ph_tick);
	m->ph_tick = NULL;
}
