/* The mover's de-duplication and intents: pairing destination messages
 * with source ones by fingerprint after a crash, a UIDVALIDITY change or
 * into a non-empty unknown destination; the reconciliation of intents a
 * killed run left open, with the settle wait for its APPENDs; and the
 * removal of copies an interrupted earlier run left behind. It decides
 * what is already there and must not append anything: the copy is
 * mover_copy.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "mover_internal.h"

/* ---- match: pair destination messages with source ones ---- */

int mv_cmp_fp(const void *a, const void *b)
{
	const struct fpent *x = a, *y = b;

	if (x->h != y->h)
		return x->h < y->h ? -1 : 1;
	return x->uid < y->uid ? -1 : x->uid > y->uid;
}

/* The first of the (sorted) fingerprints that is not below h. */
static size_t fp_first(const struct worker *w, uint64_t h)
{
	size_t lo = 0, hi = w->nfps;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (w->fps[mid].h < h)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

struct fpent *mv_fp_take(struct worker *w, uint64_t h)
{
	size_t lo = fp_first(w, h);

	for (; lo < w->nfps && w->fps[lo].h == h; lo++) {
		if (!w->fps[lo].used) {
			w->fps[lo].used = 1;
			return &w->fps[lo];
		}
	}
	return NULL;
}

/* Drops the fingerprints of a match (or a dedup) the worker is done with. */
static void fps_free(struct worker *w)
{
	free(w->fps);
	w->fps = NULL;
	w->nfps = w->capfps = 0;
}

/* Collects the UIDs done records claim on the side written to. */
int mv_collect_known(void *ctx, const struct ms_msg_rec *rec)
{
	struct known_ctx *k = ctx;
	uint32_t uid = k->reverse ? rec->src_uid : rec->dst_uid;

	if (rec->state == MS_MSG_DONE && uid >= k->floor && uid != 0)
		return ms_u32vec_push(&k->uids, uid);
	return 0;
}

/* The open intents of the worker's folder (rollback intents in a
 * rollback), in the order their messages were sent. */
static int foreach_intent(struct worker *w, ms_store_msg_cb *cb, void *ctx)
{
	struct ms_store *store = w->u->m->store;

	if (w->u->reverse)
		return ms_store_rintent_foreach(store, w->f->st.id, cb, ctx);
	return ms_store_msg_foreach(store, w->f->st.id, MS_MSG_INTENT, cb,
				    ctx);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

int mv_min_floor(void *ctx, const struct ms_msg_rec *rec)
{
	uint32_t *floor = ctx;

	if (rec->dst_floor != 0 && (*floor == 0 || rec->dst_floor < *floor))
		*floor = rec->dst_floor;
	return 0;
}

struct reconcile_ctx {
	struct worker *w;
	uint64_t matched, resent;
};

/* A killed run's last APPEND commands can still be in the server's input,
 * or on their way to it, when the next run reconciles: carried out after
 * their intents were found missing and the messages sent again, they would
 * be there twice. So intents with no message yet are not given up at once:
 * the reconciliation waits SETTLE_MS (once per folder; only after a crash
 * left intents whose messages the server does not have), asks the server
 * again, and only then sends them again. Copies carried out later still
 * are removed by the verification's deduplication (start_dedup). */
static void on_settle_noop(struct ms_imapc *c,
			   const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "NOOP", r, c))
		return;
	mv_start_match(w, 1, 0);
}

static void on_settle_timer(uv_timer_t *t)
{
	struct settle_timer *st = (struct settle_timer *)t;
	struct ujob *u = st->u;
	struct worker *w = st->w;

	u->timers--;
	ms_close_free((uv_handle_t *)t, st);
	if (w == NULL || u->failed || u->finished) {
		mv_job_maybe_finish(u);
		return;
	}
	w->settle = NULL;
	/* The NOOP makes the server show what it saved meanwhile. */
	ms_imapc_cmd(w->d, on_settle_noop, w, "NOOP");
}

static int count_missing(void *ctx, const struct ms_msg_rec *rec)
{
	struct reconcile_ctx *rc = ctx;

	if (mv_fp_take(rc->w, mv_fingerprint(rec->size, rec->date,
				       rec->msgid)) == NULL)
		rc->resent++;
	return 0;
}

/* 1 when the reconciliation waits (the worker goes on from the timer), 0
 * when it goes on now, -1 when the job failed. */
static int settle_wait(struct worker *w)
{
	struct reconcile_ctx rc = { .w = w };
	struct settle_timer *st;

	if (w->settled)
		return 0;
	if (foreach_intent(w, count_missing, &rc) != 0) {
		mv_job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
		return -1;
	}
	for (size_t i = 0; i < w->nfps; i++)
		w->fps[i].used = 0;
	if (rc.resent == 0 || (st = calloc(1, sizeof(*st))) == NULL)
		return 0;
	ms_warn("%s: folder \"%s\": %llu unfinished message(s) not on the %s "
		"(yet): looking again in %d s before sending them again",
		w->u->name, w->u->reverse ? w->f->rep.source :
		w->f->rep.destination, (unsigned long long)rc.resent,
		mv_side_name(w, w->d), SETTLE_MS / 1000);
	w->settled = 1;
	fps_free(w);
	st->u = w->u;
	st->w = w;
	w->settle = st;
	uv_timer_init(w->u->m->loop, &st->timer);
	uv_timer_start(&st->timer, on_settle_timer, SETTLE_MS, 0);
	w->u->timers++;
	return 1;
}

static int reconcile_one(void *ctx, const struct ms_msg_rec *rec)
{
	struct reconcile_ctx *rc = ctx;
	struct worker *w = rc->w;
	struct ms_store *store = w->u->m->store;
	struct fpent *e = mv_fp_take(w, mv_fingerprint(rec->size, rec->date,
						  rec->msgid));
	int64_t id = w->f->st.id;

	if (e != NULL && w->u->reverse) {
		/* It got to the source: recorded under the UID it got there,
		 * as a forward copy would have. */
		struct ms_msg_rec done = *rec;

		done.src_uid = e->uid;
		done.state = MS_MSG_DONE;
		done.dst_floor = 0;
		if (ms_store_msg_put(store, id, &done) < 0 ||
		    ms_store_rintent_delete(store, id, rec->dst_uid) < 0)
			return -1;
	} else if (e != NULL) {
		/* It got there before the crash: record it, never resend. */
		if (ms_store_msg_done(store, id, rec->src_uid, e->uid,
				      rec->flags) < 0)
			return -1;
	} else {
		if ((w->u->reverse ?
		     ms_store_rintent_delete(store, id, rec->dst_uid) :
		     ms_store_msg_delete(store, id, rec->src_uid,
					 rec->uidl)) < 0)
			return -1;
		rc->resent++;
		return 0;
	}
	w->f->st.msgs++;
	w->f->st.bytes += rec->size;
	rc->matched++;
	return 0;
}

static void match_finish_reconcile(struct worker *w)
{
	struct ms_store *store = w->u->m->store;
	struct reconcile_ctx rc = { .w = w };

	mv_sort_n(w->fps, w->nfps, sizeof(*w->fps), mv_cmp_fp);
	if (settle_wait(w) != 0)
		return;
	if (mv_store_check(w, ms_store_begin(store)) < 0)
		return;
	if (foreach_intent(w, reconcile_one, &rc) != 0 ||
	    ms_store_folder_update(store, &w->f->st) < 0 ||
	    ms_store_commit(store) < 0) {
		ms_store_rollback(store);
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	if (rc.matched + rc.resent > 0)
		ms_info("%s: folder \"%s\": reconciled %llu unfinished "
			"message(s): %llu already there, %llu to send again",
			w->u->name, w->f->rep.source,
			(unsigned long long)(rc.matched + rc.resent),
			(unsigned long long)rc.matched,
			(unsigned long long)rc.resent);
	fps_free(w);
	mv_after_match(w);
}

void mv_on_match_src_reply(struct ms_imapc *c,
			   const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	if (--w->pending > 0)
		return;
	fps_free(w);
	if (mv_store_check(w, ms_store_folder_update(w->u->m->store,
						  &w->f->st)) < 0)
		return;
	/* hwm stays 0: the copy pass walks the whole folder and skips what
	 * the match recorded as done. */
	mv_after_match(w);
}

static void on_match_dst_reply(struct ms_imapc *c,
			       const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	if (w->match_reconcile) {
		match_finish_reconcile(w);
		return;
	}
	mv_sort_n(w->fps, w->nfps, sizeof(*w->fps), mv_cmp_fp);
	/* Now walk the source and pair each message with an unused
	 * destination one of the same fingerprint. */
	w->phase = PH_MATCH;
	w->pending = 1;
	if (w->s_exists == 0) {
		w->pending = 0;
		w->pending++;
		mv_on_match_src_reply(c, &(struct ms_imap_response){
			.status = MS_STATUS_OK }, w);
		return;
	}
	ms_imapc_cmd(w->s, mv_on_match_src_reply, w,
		     "UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE "
		     "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])");
}

/* Appends an unused entry to w->fps. Returns 0, or -1 when out of
 * memory. */
int mv_fps_push(struct worker *w, uint64_t h, uint32_t uid, uint64_t fhash)
{
	if (MS_ARRAY_ROOM(w->fps, w->nfps, w->capfps, 256) < 0)
		return -1;
	w->fps[w->nfps].h = h;
	w->fps[w->nfps].uid = uid;
	w->fps[w->nfps].used = 0;
	w->fps[w->nfps].fhash = fhash;
	w->nfps++;
	return 0;
}

void mv_match_dst_fetch(struct worker *w, const struct fetch *f)
{
	int64_t date;

	if (!f->has_uid || !f->has_size || !f->has_date)
		return;
	if (ms_imap_date_parse(f->date, &date) < 0)
		return;
	/* Intents are written before the message's bytes (and so its
	 * Message-ID) were seen: reconciliation pairs them by size and
	 * date. That is exact because a server answers APPENDs in order, so
	 * what a killed run got saved is a prefix of what it sent, and the
	 * intents are paired in that same order. */
	if (mv_fps_push(w, mv_fingerprint(f->size, date,
				    w->match_reconcile ? "" : f->msgid),
		     f->uid, mv_flags_hash(f->flags)) < 0)
		mv_job_fail(w->u, "out of memory");
}

void mv_match_src_fetch(struct worker *w, const struct fetch *f)
{
	struct ms_store *store = w->u->m->store;
	struct ms_msg_rec rec;
	struct fpent *e;
	int64_t date;

	if (!f->has_uid || !f->has_size || !f->has_date ||
	    ms_imap_date_parse(f->date, &date) < 0)
		return;
	e = mv_fp_take(w, mv_fingerprint(f->size, date, f->msgid));
	if (e == NULL)
		return;
	/* f is the message read, e the one written (a rollback reads the
	 * destination and writes the source). */
	memset(&rec, 0, sizeof(rec));
	rec.src_uid = w->u->reverse ? e->uid : f->uid;
	rec.state = MS_MSG_DONE;
	rec.size = f->size;
	rec.date = date;
	snprintf(rec.msgid, sizeof(rec.msgid), "%s", f->msgid);
	/* Recorded with the flags the side written to has; the STORE below
	 * records the read side's once it is done. */
	if (e->fhash == mv_flags_hash(f->flags))
		snprintf(rec.flags, sizeof(rec.flags), "%s", f->flags);
	rec.dst_uid = w->u->reverse ? f->uid : e->uid;
	if (mv_store_check(w, ms_store_msg_put(store, w->f->st.id, &rec)) < 0)
		return;
	w->f->st.msgs++;
	w->f->st.bytes += f->size;
	if (e->fhash != mv_flags_hash(f->flags))
		/* Same message, other flags: the read side's win. */
		mv_flag_store(w, rec.src_uid, e->uid, f->flags);
}

void mv_start_match(struct worker *w, int reconcile, uint32_t floor)
{
	struct ms_store *store = w->u->m->store;
	struct known_ctx k = { 0 };

	w->phase = PH_MATCH;
	w->match_reconcile = reconcile;
	w->nfps = 0;
	k.reverse = w->u->reverse;
	if (reconcile) {
		floor = 0;
		if (foreach_intent(w, mv_min_floor, &floor) != 0) {
			mv_job_fail(w->u, "store: %s", ms_store_error(store));
			return;
		}
		if (floor == 0)
			floor = 1;
	}
	w->match_floor = floor;
	/* Destination messages already accounted for are no candidates. */
	k.floor = floor;
	if (reconcile && ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE,
					      mv_collect_known, &k) != 0) {
		ms_u32vec_free(&k.uids);
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	ms_u32vec_sort(&k.uids);
	ms_u32vec_free(&w->known);
	w->known = k.uids;
	/* (After the wait, messages may have come since the SELECT.) */
	if (w->d_exists == 0 && !w->settled) {
		on_match_dst_reply(w->d, &(struct ms_imap_response){
			.status = MS_STATUS_OK }, w);
		return;
	}
	ms_imapc_cmd(w->d, on_match_dst_reply, w,
		     "UID FETCH %u:* (UID FLAGS INTERNALDATE RFC822.SIZE "
		     "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])", floor);
}

/* ---- dedup: copies an interrupted earlier run left behind ----
 *
 * A run killed with complete APPEND commands still in the server's input
 * buffer does not stop the server from saving them; if the next run's
 * reconciliation looked before the server had, those messages were sent
 * again. They are recognisable: destination messages no done record claims,
 * with the fingerprint of one that is claimed. They are expunged (exactly
 * those, UID EXPUNGE) before the verification is repeated. */

struct claim_ctx {
	struct worker *w;
	struct ms_u32vec uids;
	int unknown;
};

static int collect_claims(void *ctx, const struct ms_msg_rec *rec)
{
	struct claim_ctx *cc = ctx;
	uint32_t uid = mv_rec_wr_uid(cc->w->u, rec);

	if (uid == 0) {
		cc->unknown = 1;
		return 0;
	}
	if (ms_u32vec_push(&cc->uids, uid) < 0)
		return -1;
	return mv_fps_push(cc->w, mv_fingerprint(rec->size, rec->date, rec->msgid),
			   uid, 0);
}

static int fp_exists(const struct worker *w, uint64_t h)
{
	size_t lo = fp_first(w, h);

	return lo < w->nfps && w->fps[lo].h == h;
}

void mv_dedup_fetch(struct worker *w, const struct fetch *f)
{
	int64_t date;

	/* A record written without the Message-ID (reconciled) matches
	 * on size and date alone. */
	if (!f->has_uid || !f->has_size || !f->has_date ||
	    ms_imap_date_parse(f->date, &date) < 0 ||
	    (!fp_exists(w, mv_fingerprint(f->size, date, f->msgid)) &&
	     !fp_exists(w, mv_fingerprint(f->size, date, ""))))
		return;
	if (ms_u32vec_push(&w->expunge, f->uid) < 0)
		mv_job_fail(w->u, "out of memory");
}

size_t mv_uid_list_set(const uint32_t *uids, size_t n, char **set_r)
{
	size_t cap = n * 12 + 16, pos = 0;
	char *set = malloc(cap);

	if (set == NULL)
		return 0;
	set[0] = '\0';
	for (size_t i = 0; i < n;) {
		size_t j = i;

		while (j + 1 < n && uids[j + 1] == uids[j] + 1)
			j++;
		pos += (size_t)snprintf(set + pos, cap - pos, "%s%u", pos ? "," : "",
					uids[i]);
		if (j > i)
			pos += (size_t)snprintf(set + pos, cap - pos, ":%u", uids[j]);
		i = j + 1;
	}
	*set_r = set;
	return pos;
}

static void on_expunge_reply(struct ms_imapc *c,
			     const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID EXPUNGE", r, c))
		return;
	if (--w->pending > 0)
		return;
	if (w->phase == PH_REXPUNGE) {
		mv_rb_expunged(w);
		return;
	}
	if (w->phase == PH_REPAIR) {
		mv_repair_redo(w);
		return;
	}
	if (w->phase == PH_EXPUNGE) {
		/* Gone from the destination: now their records go. */
		if (mv_drop_vanished(w) < 0)
			return;
		w->f->rep.expunged += w->expunge.n;
		w->u->expunged += w->expunge.n;
	}
	mv_verify_dst(w);
}

/* Expunges exactly the UIDs in w->expunge on the side written to: \Deleted
 * on them, then UID EXPUNGE (UIDPLUS) of them, which leaves other \Deleted
 * mail be. on_expunge_reply() goes on when both are answered. Returns 0,
 * or -1 when the job failed. */
int mv_expunge_uids(struct worker *w)
{
	char *set = NULL;

	ms_u32vec_sort(&w->expunge);
	if (mv_uid_list_set(w->expunge.v, w->expunge.n, &set) == 0) {
		mv_job_fail(w->u, "out of memory");
		return -1;
	}
	w->pending = 2;
	ms_imapc_cmd(w->d, on_expunge_reply, w,
		     "UID STORE %s +FLAGS.SILENT (\\Deleted)", set);
	ms_imapc_cmd(w->d, on_expunge_reply, w, "UID EXPUNGE %s", set);
	free(set);
	return 0;
}

static void on_dedup_reply(struct ms_imapc *c,
			   const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	fps_free(w);
	if (w->expunge.n == 0) {
		mv_verify_dst(w);
		return;
	}
	ms_warn("%s: folder \"%s\": removing %zu duplicate(s) an interrupted "
		"earlier run left on the %s", w->u->name,
		w->u->reverse ? w->f->rep.source : w->f->rep.destination,
		w->expunge.n, mv_side_name(w, w->d));
	w->f->rep.repaired += w->expunge.n;
	w->u->repaired += w->expunge.n;
	mv_expunge_uids(w);
}

void mv_start_dedup(struct worker *w)
{
	struct claim_ctx cc = { .w = w };
	uint32_t *unclaimed = NULL;
	size_t nun = 0;
	char *set = NULL;

	w->dedup_done = 1;
	w->nfps = 0;
	if (ms_store_msg_foreach(w->u->m->store, w->f->st.id, MS_MSG_DONE,
				 collect_claims, &cc) != 0) {
		ms_u32vec_free(&cc.uids);
		mv_job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
		return;
	}
	ms_u32vec_sort(&cc.uids);
	mv_sort_n(w->fps, w->nfps, sizeof(*w->fps), mv_cmp_fp);
	unclaimed = calloc(w->dst_uids.n + 1, sizeof(*unclaimed));
	for (size_t i = 0; unclaimed != NULL && i < w->dst_uids.n; i++)
		if (!ms_u32vec_has(&cc.uids, w->dst_uids.v[i]))
			unclaimed[nun++] = w->dst_uids.v[i];
	ms_u32vec_free(&cc.uids);
	w->expunge.n = 0;
	if (cc.unknown || nun == 0 || unclaimed == NULL) {
		free(unclaimed);
		/* Nothing we can tell apart: report the mismatch as it is. */
		on_dedup_reply(w->d, &(struct ms_imap_response){
			.status = MS_STATUS_OK }, w);
		return;
	}
	mv_sort_n(unclaimed, nun, sizeof(*unclaimed), cmp_u32);
	mv_uid_list_set(unclaimed, nun, &set);
	free(unclaimed);
	if (set == NULL) {
		mv_job_fail(w->u, "out of memory");
		return;
	}
	w->phase = PH_DEDUP;
	ms_imapc_cmd(w->d, on_dedup_reply, w,
		     "UID FETCH %s (UID RFC822.SIZE INTERNALDATE "
		     "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])", set);
	free(set);
}
