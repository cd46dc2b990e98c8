/* Identity on the destination (docs/mover.md, "Identity"): each folder
 * gets the source's UIDVALIDITY before its first message, every message
 * the source's UID (the destination's next UID raised to it through
 * Dovecot's doveadm API before each run of consecutive UIDs is appended),
 * and at the end UIDNEXT and HIGHESTMODSEQ at least the source's. Where
 * that cannot be done the copy goes on as ever and the folder is recorded
 * as not kept, for the gateway to translate. It decides nothing about what
 * is copied: the copy pass (mover_copy.c) asks it before each window. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "mover_internal.h"

#define ID_REOPENS 3

static int id_wanted(const struct worker *w)
{
	const struct ujob *u = w->u;

	return u->m->identity && !u->reverse && !u->m->verify_only &&
	       u->pop == NULL;
}

/* A forward copy of an IMAP source without the doveadm API: the folder
 * gets the destination's own UIDVALIDITY and UIDs. */
static int untried(const struct worker *w)
{
	const struct ujob *u = w->u;

	return !u->m->identity && !u->reverse && !u->m->verify_only &&
	       u->pop == NULL;
}

static void id_request(struct worker *w, const struct ms_doveadm_update *up,
		       ms_doveadm_cb *cb)
{
	struct ujob *u = w->u;
	char mbox[1024];

	mv_to_utf8(mbox, sizeof(mbox), w->f->dst, u->dst_sep);
	if (ms_doveadm_mailbox_update(u->m->loop, &u->m->doveadm, u->dst_login,
				      mbox, up, cb, w, &w->id_req) < 0)
		mv_job_fail(u, "out of memory");
}

/* The folder's identity is lost from here on: said once, recorded, the
 * copy goes on. */
static void id_lost(struct worker *w, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void id_lost(struct worker *w, const char *fmt, ...)
{
	struct ms_folder_report *rep = &w->f->rep;
	va_list ap;

	w->identity = 0;
	if (rep->identity == -1)
		return;
	rep->identity = -1;
	va_start(ap, fmt);
	vsnprintf(rep->identity_error, sizeof(rep->identity_error), fmt, ap);
	va_end(ap);
	ms_warn("%s: folder \"%s\": UIDVALIDITY and UIDs not kept: %s; the "
		"gateway must translate them", w->u->name, rep->source,
		rep->identity_error);
	mv_store_check(w, ms_store_identity_set(w->u->m->store, w->f->st.id,
						MS_ID_LOST,
						rep->identity_error));
}

static void id_kept(struct worker *w)
{
	w->identity = 1;
	w->id_next = w->d_uidnext;
	w->f->rep.identity = 1;
	mv_store_check(w, ms_store_identity_set(w->u->m->store, w->f->st.id,
						MS_ID_KEPT, NULL));
}

/* ---- open: UIDVALIDITY ---- */

static void on_reselect(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx);

static void reselect(struct worker *w)
{
	char q[2100];

	ms_imap_quote(q, sizeof(q), w->f->dst);
	w->d_uidvalidity = w->d_uidnext = w->d_exists = 0;
	ms_imapc_cmd(w->d, on_reselect, w, "SELECT %s", q);
}

static void on_reopen(struct ms_imapc *c, const struct ms_imap_response *r,
		      void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		mv_folder_fail(w, "UNSELECT", r, c);
		return;
	}
	reselect(w);
}

static void on_reselect(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		mv_folder_fail(w, "SELECT", r, c);
		return;
	}
	/* The store follows: a later run must not take the change for a
	 * folder made anew. */
	w->f->st.dst_uidvalidity = w->d_uidvalidity;
	if (mv_store_check(w, ms_store_folder_update(w->u->m->store,
						     &w->f->st)) < 0)
		return;
	if (w->d_uidvalidity != w->s_uidvalidity && w->d_exists == 0 &&
	    w->f->rep.identity != -1 && w->id_tries++ < ID_REOPENS) {
		ms_imapc_cmd(w->d, on_reopen, w, "UNSELECT");
		return;
	}
	if (w->d_uidvalidity != w->s_uidvalidity || w->d_exists != 0)
		id_lost(w, "the destination kept UIDVALIDITY %u (the source's "
			"is %u)", w->d_uidvalidity, w->s_uidvalidity);
	else
		id_kept(w);
	if (!w->u->failed)
		mv_open_continue(w);
}

static void on_set_uidvalidity(void *ctx, int ok, const char *error)
{
	struct worker *w = ctx;

	w->id_req = NULL;
	if (!ok)
		id_lost(w, "%s", error);
	/* Opened again either way: the connection left it for the change. */
	reselect(w);
}

static void on_unselect(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	struct worker *w = ctx;
	struct ms_doveadm_update up = { .uid_validity = w->s_uidvalidity };

	if (r == NULL || r->status != MS_STATUS_OK) {
		mv_folder_fail(w, "UNSELECT", r, c);
		return;
	}
	/* Dovecot ends a session whose selected folder changes UIDVALIDITY
	 * under it: the folder is left first. */
	id_request(w, &up, on_set_uidvalidity);
}

/* After EXAMINE and SELECT (and the store's checks of on_open_reply):
 * decides whether this folder keeps its identity, gives a fresh one the
 * source's UIDVALIDITY, then mv_open_continue(). reset: the store's
 * records were just dropped (a UIDVALIDITY changed). */
void mv_id_open(struct worker *w, int reset)
{
	struct ms_folder_state *st = &w->f->st;
	int state = MS_ID_NONE;

	w->identity = w->id_final = 0;
	w->id_tries = 0;
	if (!id_wanted(w) && !untried(w)) {
		mv_open_continue(w);
		return;
	}
	if (mv_store_check(w, ms_store_identity_get(w->u->m->store, st->id,
						    &state)) < 0)
		return;
	if (!id_wanted(w)) {
		/* Counted by status like any folder not kept; not a warning:
		 * the site has not asked for it. */
		if (state == MS_ID_NONE &&
		    mv_store_check(w, ms_store_identity_set(w->u->m->store,
				st->id, MS_ID_LOST, "not tried (no doveadm_url "
				"for the destination)")) < 0)
			return;
		mv_open_continue(w);
		return;
	}
	if (w->f->moved_src_uv != 0) {
		/* What was copied under the old UIDVALIDITY keeps the
		 * destination's (possibly the old source's) numbers: the
		 * gateway's view gives the clients the new source's. */
		id_lost(w, "the source's UIDVALIDITY changed during the copy "
			"(%u -> %u)", w->f->moved_src_uv, w->s_uidvalidity);
	} else if (state == MS_ID_LOST) {
		w->f->rep.identity = -1;
		snprintf(w->f->rep.identity_error,
			 sizeof(w->f->rep.identity_error),
			 "not kept by an earlier run");
	} else if (st->msgs == 0 && w->open_pending == 0 && w->d_exists == 0) {
		if (w->d_uidvalidity == w->s_uidvalidity) {
			id_kept(w);
		} else if (!ms_imapc_has_cap(w->d, "UNSELECT")) {
			id_lost(w, "the destination has no UNSELECT");
		} else {
			ms_imapc_cmd(w->d, on_unselect, w, "UNSELECT");
			return;
		}
	} else if (reset) {
		id_lost(w, "a UIDVALIDITY changed since the last copy and the "
			"destination folder holds %u message(s)", w->d_exists);
	} else if (state == MS_ID_KEPT) {
		if (w->d_uidvalidity == w->s_uidvalidity)
			id_kept(w);
		else
			id_lost(w, "the destination folder's UIDVALIDITY is %u, "
				"the source's %u", w->d_uidvalidity,
				w->s_uidvalidity);
	} else if (w->d_exists > 0 && st->msgs == 0) {
		id_lost(w, "the destination folder already holds %u "
			"message(s)", w->d_exists);
	} else {
		id_lost(w, "copied by an earlier run that did not keep it");
	}
	if (!w->u->failed)
		mv_open_continue(w);
}

/* ---- the copy: one run of consecutive UIDs per APPEND ---- */

static uint32_t first_uid(const struct window *win, int last)
{
	uint32_t uid = 0;

	for (unsigned int i = 0; i < win->n; i++) {
		if (win->msgs[i].skip)
			continue;
		uid = win->msgs[i].uid;
		if (!last)
			break;
	}
	return uid;
}

static void on_min_next_uid(void *ctx, int ok, const char *error)
{
	struct worker *w = ctx;

	w->id_req = NULL;
	if (ok)
		w->id_next = w->d_uidnext = w->id_want;
	else
		id_lost(w, "%s", error);
	mv_copy_pump(w);
}

/* Whether win (one run of consecutive source UIDs) may be sent now: its
 * first UID must be the one the destination gives next. When it is not,
 * everything sent before is let finish, then the destination's next UID is
 * raised to it (a gap: expunged source messages). 0: wait. */
int mv_id_gate(struct worker *w, const struct window *win)
{
	uint32_t first = first_uid(win, 0);
	struct ms_doveadm_update up = { 0 };

	if (!w->identity || first == 0 || first == w->id_next)
		return 1;
	if (w->id_req != NULL || w->body != NULL || w->appends != NULL)
		return 0;
	if (first < w->d_uidnext) {
		id_lost(w, "the destination's next UID is %u, above source UID "
			"%u", w->d_uidnext, first);
		return 1;
	}
	if (first == w->d_uidnext) {
		w->id_next = first;
		return 1;
	}
	w->id_want = up.min_next_uid = first;
	id_request(w, &up, on_min_next_uid);
	return 0;
}

void mv_id_sent(struct worker *w, const struct window *win)
{
	if (w->identity)
		w->id_next = first_uid(win, 1) + 1;
}

/* APPENDUID named dst_uid for the source's src_uid. */
void mv_id_appended(struct worker *w, uint32_t src_uid, uint32_t dst_uid)
{
	if (w->identity && src_uid != dst_uid)
		id_lost(w, "the destination gave UID %u to source UID %u "
			"(another client appended?)", dst_uid, src_uid);
}

/* ---- the end: UIDNEXT and HIGHESTMODSEQ ---- */

static void on_final(void *ctx, int ok, const char *error)
{
	struct worker *w = ctx;

	w->id_req = NULL;
	if (!ok)
		id_lost(w, "%s", error);
	mv_start_flags(w);
}

/* The copy pass is over: the destination's UIDNEXT and HIGHESTMODSEQ are
 * raised to the source's (mail the source numbers later gets its own UIDs
 * in the next run; a client's CHANGEDSINCE of the source's MODSEQ asks for
 * nothing it has), then the flag pass. */
void mv_id_finish(struct worker *w)
{
	struct ms_doveadm_update up = { 0 };

	/* The gateway's IMAP view numbers new mail above it. */
	if (!w->u->reverse && w->s_uidnext != 0 &&
	    mv_store_check(w, ms_store_src_next_set(w->u->m->store,
						    w->f->st.id,
						    w->s_uidnext)) < 0)
		return;
	if (!w->identity || w->id_final) {
		mv_start_flags(w);
		return;
	}
	w->id_final = 1;
	up.min_next_uid = w->s_uidnext;
	if (!w->s_nomodseq)
		up.min_highest_modseq = w->s_modseq;
	if (up.min_next_uid == 0 && up.min_highest_modseq == 0) {
		mv_start_flags(w);
		return;
	}
	id_request(w, &up, on_final);
}

void mv_id_cancel(struct worker *w)
{
	ms_doveadm_cancel(&w->id_req);
}
