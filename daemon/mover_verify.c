/* The mover's verification of a folder: count, size sum and flags of
 * both sides, each copy against its source message (with verify_content
 * the bytes' SHA-256), the repair of what differs, and verify-only runs,
 * which compare and write nothing. Nothing is copied here except what a
 * repair hands back to the copy of mover_copy.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "log.h"
#include "testhook.h"
#include "mover_internal.h"

/* ---- verify ---- */

static int vlist_push(struct vlist *l, const struct fetch *f)
{
	if (MS_ARRAY_ROOM(l->v, l->n, l->cap, 64) < 0)
		return -1;
	memset(&l->v[l->n], 0, sizeof(l->v[0]));
	l->sorted = 0;
	l->v[l->n].uid = f->uid;
	l->v[l->n].size = f->size;
	l->v[l->n].fhash = mv_flags_hash(f->flags);
	l->n++;
	return 0;
}

static int cmp_vmsg(const void *a, const void *b)
{
	const struct vmsg *x = a, *y = b;

	return x->uid < y->uid ? -1 : x->uid > y->uid;
}

static void vlist_sort(struct vlist *l)
{
	if (!l->sorted)
		mv_sort_n(l->v, l->n, sizeof(*l->v), cmp_vmsg);
	l->sorted = 1;
}

/* The digest of v (of l), or NULL when it has none. */
static const unsigned char *vmsg_md(const struct vlist *l,
				    const struct vmsg *v)
{
	return v->has_md ? l->md[v - l->v] : NULL;
}

static struct vmsg *vlist_find(const struct vlist *l, uint32_t uid)
{
	struct vmsg key = { .uid = uid };

	if (l->n == 0)
		return NULL;
	return bsearch(&key, l->v, l->n, sizeof(*l->v), cmp_vmsg);
}

void mv_verify_free(struct worker *w)
{
	for (int side = 0; side < 2; side++) {
		free(w->vm[side].v);
		free(w->vm[side].md);
		memset(&w->vm[side], 0, sizeof(w->vm[side]));
		EVP_MD_CTX_free(w->md[side]);
		w->md[side] = NULL;
	}
	ms_u32vec_free(&w->rp_flags);
	ms_u32vec_free(&w->rp_flags_dst);
	ms_u32vec_free(&w->rp_redo);
}

/* side 0: the side read from, 1: the side written to. */
void mv_verify_fetch(struct worker *w, int side, const struct fetch *f)
{
	int fwd = !w->u->reverse;

	if (!f->has_uid || !f->has_size || !f->has_flags)
		return;
	/* (Asked during the copy, before the high-water mark moved: the
	 * messages above it are set aside when the copy is done,
	 * verify_pre_trim().) */
	if (side == 0 && fwd && f->uid > w->f->st.hwm && !w->v_all_src &&
	    w->v_pre == 0) {
		w->v_later++;	/* arrived after this run's copy */
		return;
	}
	if (fwd && vlist_push(&w->vm[side], f) < 0) {
		mv_job_fail(w->u, "out of memory");
		return;
	}
	if (side == 0) {
		if (ms_u32vec_push(&w->src_uids, f->uid) < 0) {
			mv_job_fail(w->u, "out of memory");
			return;
		}
	} else if (ms_u32vec_push(&w->dst_uids, f->uid) < 0) {
		mv_job_fail(w->u, "out of memory");
		return;
	} else if (w->u->reverse && !ms_u32vec_has(&w->known, f->uid)) {
		/* On the source, claimed by no record: it arrived there
		 * after the copy (w->known: the claimed source UIDs). */
		w->v_only[0]++;
		w->v_only[1] += f->size;
		w->v_only[2] += mv_flags_hash(f->flags);
	}
	w->v_count[side]++;
	w->v_bytes[side] += f->size;
	w->v_fhash[side] += mv_flags_hash(f->flags);
}

/* ---- verify: message by message ----
 *
 * Counts and sums say that something differs, not what, and miss changes
 * that cancel out. So both sides' messages are also paired through the
 * done records: the copy of every compared source message must be on the
 * destination with the source's size and flags (with verify_content: the
 * same bytes). What a normal run finds wrong with its own copies it mends
 * once (below) and verifies again; a verify-only run reports it. */

static void vcount_add(struct vcount *c, uint32_t uid)
{
	if (c->n++ == 0)
		c->first = uid;
}

/* Sets the copy of src_uid (its record's destination UID dst_uid, 0 when
 * it is missing) aside for the repair: copied again, the present copy
 * expunged first. Returns 0, or -1 when out of memory. */
static int redo_later(struct worker *w, const struct ms_msg_rec *rec,
		      uint32_t dst_uid)
{
	/* (A copy that cannot be expunged exactly is not sent again.) */
	if (w->u->m->verify_only ||
	    (dst_uid != 0 && !ms_imapc_has_cap(w->d, "UIDPLUS")))
		return 0;
	if (ms_u32vec_push(&w->rp_redo, rec->src_uid) < 0 ||
	    (dst_uid != 0 && ms_u32vec_push(&w->expunge, dst_uid) < 0))
		return -1;
	w->rp_bytes += rec->size;
	return 0;
}

static int pair_rec(void *ctx, const struct ms_msg_rec *rec)
{
	struct worker *w = ctx;
	struct vcheck *vc = &w->vc;
	struct vmsg *s, *d;

	if (rec->dst_uid == 0) {
		vc->unknown++;		/* no UIDPLUS: the sums only */
		return 0;
	}
	s = vlist_find(&w->vm[0], rec->src_uid);
	d = vlist_find(&w->vm[1], rec->dst_uid);
	if (d != NULL)
		d->claimed = 1;
	if (s == NULL) {
		/* Verify-only: an expunge (or a copy) not carried over yet;
		 * a normal run has done both before it verifies. */
		if (d != NULL && w->u->m->verify_only) {
			d->excluded = 1;
			w->f->rep.expunge_pending += rec->src_uid <= w->f->st.hwm;
		}
		return 0;
	}
	if (d == NULL) {
		vcount_add(&vc->lost, s->uid);
		return redo_later(w, rec, 0);
	}
	if (d->size != s->size) {
		vcount_add(&vc->resized, s->uid);
		return redo_later(w, rec, d->uid);
	}
	if (w->u->m->verify_content && (!s->has_md || !d->has_md ||
					memcmp(vmsg_md(&w->vm[0], s),
					       vmsg_md(&w->vm[1], d),
					       MD_LEN) != 0)) {
		vcount_add(&vc->altered, s->uid);
		return redo_later(w, rec, d->uid);
	}
	if (d->fhash != s->fhash) {
		vcount_add(&vc->flags, s->uid);
		if (!w->u->m->verify_only &&
		    (ms_u32vec_push(&w->rp_flags, s->uid) < 0 ||
		     ms_u32vec_push(&w->rp_flags_dst, d->uid) < 0))
			return -1;
	}
	return 0;
}

/* Sums of the compared messages of each side (a verify-only run leaves
 * out the destination copies of what it does not compare). */
static void verify_sums(struct worker *w)
{
	for (int side = 0; side < 2; side++) {
		w->v_count[side] = w->v_bytes[side] = w->v_fhash[side] = 0;
		w->vc.md_sum[side] = 0;
		for (size_t i = 0; i < w->vm[side].n; i++) {
			const struct vmsg *v = &w->vm[side].v[i];
			uint64_t h = 0;

			if (v->excluded)
				continue;
			if (v->has_md)
				memcpy(&h, vmsg_md(&w->vm[side], v), sizeof(h));
			w->v_count[side]++;
			w->v_bytes[side] += v->size;
			w->v_fhash[side] += v->fhash;
			w->vc.md_sum[side] += h;
			w->vc.unclaimed += side == 1 && !v->claimed;
		}
	}
}

static int verify_compare(struct worker *w)
{
	struct ms_store *store = w->u->m->store;

	memset(&w->vc, 0, sizeof(w->vc));
	w->f->rep.expunge_pending = 0;
	w->expunge.n = w->rp_flags.n = w->rp_flags_dst.n = w->rp_redo.n = 0;
	w->rp_bytes = 0;
	vlist_sort(&w->vm[0]);
	vlist_sort(&w->vm[1]);
	if (!w->v_norecs &&
	    ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, pair_rec,
				 w) != 0) {
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return -1;
	}
	verify_sums(w);
	return 0;
}

static int verify_ok(const struct worker *w)
{
	const struct vcheck *vc = &w->vc;

	return w->v_count[0] == w->v_count[1] &&
	       w->v_bytes[0] == w->v_bytes[1] &&
	       w->v_fhash[0] == w->v_fhash[1] && w->v_missing == 0 &&
	       vc->lost.n == 0 && vc->resized.n == 0 && vc->altered.n == 0 &&
	       vc->flags.n == 0 &&
	       (!w->u->m->verify_content || vc->md_sum[0] == vc->md_sum[1]);
}

static size_t why_add(char *buf, size_t sz, size_t pos, const char *what,
		      const struct vcount *c)
{
	if (c->n == 0 || pos >= sz)
		return pos;
	return pos + (size_t)snprintf(buf + pos, sz - pos, ", %llu %s (source "
				      "UID %u%s)", (unsigned long long)c->n,
				      what, c->first, c->n > 1 ? ", ..." : "");
}

/* What the comparison found, for the report and the log. */
static void verify_why(const struct worker *w, char *buf, size_t sz)
{
	const struct vcheck *vc = &w->vc;
	size_t pos;

	pos = (size_t)snprintf(buf, sz, "source %llu messages / %llu bytes, "
			       "destination %llu messages / %llu bytes%s%s",
			       (unsigned long long)w->v_count[0],
			       (unsigned long long)w->v_bytes[0],
			       (unsigned long long)w->v_count[1],
			       (unsigned long long)w->v_bytes[1],
			       w->v_fhash[0] != w->v_fhash[1] ?
			       ", flags differ" : "",
			       w->v_missing ? ", messages not copied" : "");
	pos = why_add(buf, sz, pos, "copied message(s) missing on the "
		      "destination", &vc->lost);
	pos = why_add(buf, sz, pos, "message(s) of another size there",
		      &vc->resized);
	pos = why_add(buf, sz, pos, "message(s) with other bytes there",
		      &vc->altered);
	pos = why_add(buf, sz, pos, "message(s) with other flags there",
		      &vc->flags);
	if (vc->unclaimed > 0 && vc->unknown == 0 && pos < sz)
		pos += (size_t)snprintf(buf + pos, sz - pos, ", %llu destination "
					"message(s) no copy accounts for",
					(unsigned long long)vc->unclaimed);
	if (w->u->m->verify_content && vc->md_sum[0] != vc->md_sum[1] &&
	    vc->altered.n == 0 && pos < sz)
		snprintf(buf + pos, sz - pos, ", the bytes differ");
}

/* A folder's verification failed: the report says what was found; the
 * user's error names the first such folder. */
static void folder_mismatch(struct ujob *u, struct fjob *f)
{
	f->rep.verified = 0;
	u->mismatch = 1;
	if (u->error[0] == '\0')
		snprintf(u->error, sizeof(u->error), "folder \"%s\": "
			 "verification failed: %s", f->rep.source,
			 f->rep.mismatch);
}

static void start_repair(struct worker *w);
static void start_digest(struct worker *w);

static void verify_finish(struct worker *w)
{
	struct fjob *f = w->f;
	struct ms_folder_report *rep = &f->rep;

	if (verify_compare(w) < 0)
		return;
	rep->source_messages = w->v_count[0];
	rep->dest_messages = w->v_count[1];
	rep->source_bytes = w->v_bytes[0];
	rep->dest_bytes = w->v_bytes[1];
	rep->verified = verify_ok(w);
	rep->mismatch[0] = '\0';
	if (!rep->verified)
		verify_why(w, rep->mismatch, sizeof(rep->mismatch));
	if (!rep->verified && !w->repair_done &&
	    w->rp_flags.n + w->rp_redo.n > 0) {
		start_repair(w);
		return;
	}
	if (!rep->verified) {
		folder_mismatch(w->u, f);
		if (w->v_missing && w->v_first_missing <= f->st.hwm)
			f->st.hwm = w->v_first_missing - 1;
	}
	if (w->u->m->verify_only)
		rep->not_copied = w->v_later;
	if (w->s_modseq != 0 && !w->s_nomodseq)
		f->st.modseq = w->s_modseq;
	mv_folder_done(w);
}

static void on_verify_dst_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	/* More on the side written to than expected: copies a killed run
	 * left there? (In a rollback, source messages no record claims.) */
	if ((w->u->reverse ? w->v_only[0] > 0 : w->v_count[1] > w->v_count[0]) &&
	    !w->dedup_done && !w->u->m->verify_only &&
	    ms_imapc_has_cap(w->d, "UIDPLUS")) {
		mv_start_dedup(w);
		return;
	}
	if (w->u->reverse)
		mv_rb_verify_done(w);
	else if (w->u->m->verify_content)
		start_digest(w);
	else
		verify_finish(w);
}

/* ---- verify: content ----
 *
 * With verify_content both sides' messages are fetched once more (UID
 * FETCH BODY.PEEK[]) and hashed as their bytes stream by, nothing
 * buffered; the copies are then compared by SHA-256. It reads both
 * mailboxes in full: an option, not the default. */

static int literal_is_body(const struct ms_imap_response *partial)
{
	const struct ms_imap_arg *list;

	if (partial->argc < 3 || partial->args[2].type != MS_ARG_LIST)
		return 0;
	list = &partial->args[2];
	return list->list_count > 0 &&
	       ms_imap_arg_is(&list->list[list->list_count - 1], "BODY[]");
}

static int on_digest_start(void *ctx, const struct ms_imap_response *partial,
			   uint64_t size)
{
	struct digest_side *ds = ctx;
	struct worker *w = ds->w;
	EVP_MD_CTX **md = &w->md[ds->side];

	if (w->phase != PH_DIGEST || !literal_is_body(partial))
		return 0;
	if (*md == NULL)
		*md = EVP_MD_CTX_new();
	if (*md == NULL || EVP_DigestInit_ex(*md, EVP_sha256(), NULL) != 1) {
		mv_job_fail(w->u, "out of memory");
		return -1;
	}
	w->md_have[ds->side] = 0;
	return 1;
}

static int on_digest_data(void *ctx, const void *data, size_t len)
{
	struct digest_side *ds = ctx;

	return EVP_DigestUpdate(ds->w->md[ds->side], data, len) == 1 ? 0 : -1;
}

static void on_digest_end(void *ctx)
{
	struct digest_side *ds = ctx;
	struct worker *w = ds->w;

	if (EVP_DigestFinal_ex(w->md[ds->side], w->md_last[ds->side],
			       NULL) == 1)
		w->md_have[ds->side] = 1;
}

/* The FETCH response whose body was just hashed: the digest is its UID's. */
void mv_digest_fetch(struct worker *w, int side, const struct fetch *f)
{
	struct vmsg *v;

	if (!f->has_body || !f->has_uid || !w->md_have[side])
		return;
	w->md_have[side] = 0;
	v = vlist_find(&w->vm[side], f->uid);
	if (v == NULL)
		return;
	memcpy(w->vm[side].md[v - w->vm[side].v], w->md_last[side], MD_LEN);
	v->has_md = 1;
}

static void on_digest_reply(struct ms_imapc *c,
			    const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (!mv_reply_last(w, "UID FETCH", r, c))
		return;
	/* The copy's hooks back on the side read from, none on the other. */
	mv_worker_hooks(w);
	ms_imapc_set_literal_hooks(w->d, NULL);
	verify_finish(w);
}

static void start_digest(struct worker *w)
{
	static const struct ms_imap_parser_callbacks hooks = {
		.literal_start = on_digest_start,
		.literal_data = on_digest_data,
		.literal_end = on_digest_end,
	};

	w->phase = PH_DIGEST;
	w->pending = 0;
	for (int side = 0; side < 2; side++) {
		struct ms_imap_parser_callbacks cb = hooks;
		struct ms_imapc *c = side == 0 ? w->s : w->d;
		struct vlist *l = &w->vm[side];
		void *md;

		if (l->n == 0)
			continue;
		vlist_sort(l);
		md = realloc(l->md, l->n * sizeof(*l->md));
		if (md == NULL) {
			mv_job_fail(w->u, "out of memory");
			return;
		}
		l->md = md;
		w->dg[side] = (struct digest_side){ w, side };
		cb.ctx = &w->dg[side];
		ms_imapc_set_literal_hooks(c, &cb);
		w->pending++;
		if (side == 0 && !w->v_all_src)
			ms_imapc_cmd(c, on_digest_reply, w, "UID FETCH 1:%u "
				     "(UID BODY.PEEK[])", w->f->st.hwm);
		else
			ms_imapc_cmd(c, on_digest_reply, w, "UID FETCH 1:* "
				     "(UID BODY.PEEK[])");
	}
	if (w->pending == 0)
		verify_finish(w);
}

/* ---- verify: repair ----
 *
 * What verification found wrong with the copies a normal run made, it
 * mends once per folder, then verifies again from the start: flags are
 * set again from the source (UID STORE); a copy missing on the
 * destination, or of another size or with other bytes, is copied again: a
 * present one is expunged (exactly it, UID EXPUNGE), then its record goes
 * and the high-water mark moves back below it (one transaction), then the
 * copy pass runs (intents, APPEND, done records, as ever). A crash in
 * between leaves a record whose copy is gone, which the next run finds
 * missing and copies again. Destination mail no record claims is never
 * touched here (the exact leftovers of a killed run excepted, see dedup):
 * it is reported. */

static void on_repair_flags_reply(struct ms_imapc *c,
				  const struct ms_imap_response *r, void *ctx)
{
	if (mv_reply_last(ctx, "UID FETCH", r, c))
		mv_repair_expunge(ctx);
}

/* The source's flags of a message whose copy has others: set them. */
void mv_repair_flags_fetch(struct worker *w, const struct fetch *f)
{
	size_t lo = 0, hi = w->rp_flags.n;

	if (!f->has_uid || !f->has_flags)
		return;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (w->rp_flags.v[mid] < f->uid)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < w->rp_flags.n && w->rp_flags.v[lo] == f->uid)
		mv_flag_store(w, f->uid, w->rp_flags_dst.v[lo], f->flags);
}

/* Copies that are to be copied again: records gone, the high-water mark
 * below the first, then the copy pass. */
void mv_repair_redo(struct worker *w)
{
	struct ujob *u = w->u;
	struct ms_store *store = u->m->store;
	struct ms_folder_state *st = &w->f->st;
	int ret;

	if (w->rp_redo.n == 0) {
		mv_start_verify(w);
		return;
	}
	ret = ms_store_begin(store);
	for (size_t i = 0; ret == 0 && i < w->rp_redo.n; i++)
		ret = ms_store_msg_delete(store, st->id, w->rp_redo.v[i], "");
	if (ret == 0) {
		st->msgs -= w->rp_redo.n < st->msgs ? w->rp_redo.n : st->msgs;
		st->bytes -= w->rp_bytes < st->bytes ? w->rp_bytes : st->bytes;
		if (w->rp_redo.v[0] <= st->hwm)
			st->hwm = w->rp_redo.v[0] - 1;
		ret = ms_store_folder_update(store, st);
	}
	if (ret == 0)
		ret = ms_store_commit(store);
	if (ret < 0) {
		ms_store_rollback(store);
		mv_job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	u->m->msgs_todo += w->rp_redo.n;
	mv_start_copy(w);
}

void mv_repair_expunge(struct worker *w)
{
	if (w->expunge.n > 0)
		mv_expunge_uids(w);	/* on_expunge_reply(): mv_repair_redo() */
	else
		mv_repair_redo(w);
}

static void start_repair(struct worker *w)
{
	struct ujob *u = w->u;
	size_t n = w->rp_flags.n + w->rp_redo.n;
	char *set = NULL;

	w->repair_done = 1;
	w->phase = PH_REPAIR;
	ms_warn("%s: folder \"%s\": mending %zu copied message(s) the "
		"destination holds otherwise: %s", u->name, w->f->rep.source, n,
		w->f->rep.mismatch);
	w->f->rep.repaired += n;
	u->repaired += n;
	if (w->rp_flags.n == 0) {
		mv_repair_expunge(w);
		return;
	}
	if (mv_uid_list_set(w->rp_flags.v, w->rp_flags.n, &set) == 0) {
		mv_job_fail(u, "out of memory");
		return;
	}
	w->pending = 1;
	ms_imapc_cmd(w->s, on_repair_flags_reply, w, "UID FETCH %s (UID FLAGS)",
		     set);
	free(set);
}

static void verify_dst_reset(struct worker *w)
{
	w->v_count[1] = w->v_bytes[1] = w->v_fhash[1] = 0;
	memset(w->v_only, 0, sizeof(w->v_only));
	w->dst_uids.n = 0;
	w->vm[1].n = 0;
}

void mv_verify_dst(struct worker *w)
{
	w->phase = PH_VERIFY_DST;
	w->v_early = 0;
	verify_dst_reset(w);
	ms_imapc_cmd(w->d, on_verify_dst_reply, w,
		     "UID FETCH 1:* (UID RFC822.SIZE FLAGS)");
}

/* ---- the destination's side early ----
 *
 * A forward copy asks both sides at once: one round trip per folder
 * instead of two. The destination's answer is what is compared unless the
 * source's shows expunges to carry over first: then it is thrown away and
 * asked again once they are done (mv_verify_dst()). Nothing is sent to the
 * destination before the early FETCH is answered. */
enum {
	V_EARLY_NONE,
	V_EARLY_SENT,		/* asked, the source's answer not in yet */
	V_EARLY_IN,		/* answered while the source's was awaited */
	V_EARLY_AWAITED,	/* the source's is in: compare when it comes */
	V_EARLY_DROP,		/* expunges first: thrown away when it comes */
};

static void on_verify_src_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx);
static void verify_expunge(struct worker *w);

static void on_verify_early_reply(struct ms_imapc *c,
				  const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;
	int state = w->v_early;

	if (state == V_EARLY_AWAITED) {
		w->v_early = V_EARLY_NONE;
		on_verify_dst_reply(c, r, w);
		return;
	}
	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	if (state == V_EARLY_DROP) {
		w->v_early = V_EARLY_NONE;
		verify_expunge(w);
	} else {
		w->v_early = V_EARLY_IN;
	}
}

static void verify_early(struct worker *w)
{
	w->v_early = V_EARLY_NONE;
	if (w->u->reverse || w->u->m->verify_only)
		return;
	verify_dst_reset(w);
	w->v_early = V_EARLY_SENT;
	ms_imapc_cmd(w->d, on_verify_early_reply, w,
		     "UID FETCH 1:* (UID RFC822.SIZE FLAGS)");
}

/* The source's side is in and nothing is to be expunged: compare, with
 * the destination's early answer when it was asked early. */
static void verify_dst_next(struct worker *w)
{
	if (w->v_early == V_EARLY_NONE) {
		mv_verify_dst(w);
		return;
	}
	w->phase = PH_VERIFY_DST;
	if (w->v_early == V_EARLY_SENT) {
		w->v_early = V_EARLY_AWAITED;
		return;
	}
	w->v_early = V_EARLY_NONE;
	on_verify_dst_reply(w->d, &(struct ms_imap_response){
		.status = MS_STATUS_OK }, w);
}

/* Walks the store's done records (in UID order) against the source's
 * UIDs: a record whose UID the source no longer has was expunged there.
 * Its source UID goes to w->vanished and its destination UID to
 * w->expunge; the record itself stays until the destination has expunged
 * the message (mv_drop_vanished()). */
static int find_vanished(void *ctx, const struct ms_msg_rec *rec)
{
	struct worker *w = ctx;

	if (rec->src_uid > w->f->st.hwm)
		return 0;
	if (ms_u32vec_has(&w->src_uids, rec->src_uid) || rec->dst_uid == 0)
		return 0;
	if (ms_u32vec_push(&w->vanished, rec->src_uid) < 0 ||
	    ms_u32vec_push(&w->expunge, rec->dst_uid) < 0)
		return -1;
	w->vanished_bytes += rec->size;
	return 0;
}

/* The records of the messages in w->vanished go, in one transaction with
 * the folder's counts. Called once the destination has expunged them (or
 * cannot: no UIDPLUS): a crash before leaves records whose messages are
 * gone from both sides, which the next run finds vanished again and
 * expunges (a no-op) once more. The other order could leave a destination
 * message no record claims, which no later run would take away. */
int mv_drop_vanished(struct worker *w)
{
	struct ms_store *store = w->u->m->store;
	struct ms_folder_state *st = &w->f->st;
	int ret = ms_store_begin(store);

	for (size_t i = 0; ret == 0 && i < w->vanished.n; i++)
		ret = ms_store_msg_delete(store, st->id, w->vanished.v[i], "");
	if (ret == 0) {
		st->msgs -= w->vanished.n < st->msgs ? w->vanished.n : st->msgs;
		st->bytes -= w->vanished_bytes < st->bytes ?
			     w->vanished_bytes : st->bytes;
		ret = ms_store_folder_update(store, st);
	}
	if (ret == 0)
		ret = ms_store_commit(store);
	if (ret < 0) {
		ms_store_rollback(store);
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return -1;
	}
	return 0;
}

struct missing_ctx {
	struct worker *w;
	size_t pos;
};

static int count_present(void *ctx, const struct ms_msg_rec *rec)
{
	struct missing_ctx *mc = ctx;
	struct worker *w = mc->w;

	while (mc->pos < w->src_uids.n && w->src_uids.v[mc->pos] < rec->src_uid) {
		/* A source UID with no done record below it: not copied. */
		if (w->v_missing++ == 0)
			w->v_first_missing = w->src_uids.v[mc->pos];
		mc->pos++;
	}
	if (mc->pos < w->src_uids.n && w->src_uids.v[mc->pos] == rec->src_uid)
		mc->pos++;
	return 0;
}

static void on_verify_src_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;
	struct ms_store *store = w->u->m->store;
	struct missing_ctx mc = { .w = w };

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	/* Halfway: the side read from is counted, the other not yet. */
	MS_CRASH_POINT(w->u->reverse ? "rollback.verify" : "copy.verify");
	ms_u32vec_sort(&w->src_uids);
	if (w->u->reverse) {
		mv_rb_verify_claims(w);
		return;
	}
	w->v_missing = 0;
	if (w->v_norecs) {
		mv_verify_dst(w);		/* verify-only: no record applies */
		return;
	}
	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, count_present,
				 &mc) != 0) {
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	for (; mc.pos < w->src_uids.n; mc.pos++)
		if (w->v_missing++ == 0)
			w->v_first_missing = w->src_uids.v[mc.pos];
	if (w->u->m->verify_only) {
		mv_verify_dst(w);		/* expunges are left as they are */
		return;
	}
	w->expunge.n = w->vanished.n = 0;
	w->vanished_bytes = 0;
	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, find_vanished,
				 w) != 0) {
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	if (w->expunge.n == 0 || !ms_imapc_has_cap(w->d, "UIDPLUS")) {
		if (w->expunge.n > 0)
			ms_warn("%s: folder \"%s\": %zu message(s) gone from the "
				"source stay on the destination (no UIDPLUS)",
				w->u->name, w->f->rep.source, w->expunge.n);
		if (w->vanished.n > 0 && mv_drop_vanished(w) < 0)
			return;
		verify_dst_next(w);
		return;
	}
	w->phase = PH_EXPUNGE;
	if (w->v_early == V_EARLY_SENT) {
		/* its answer first: on_verify_early_reply() goes on */
		w->v_early = V_EARLY_DROP;
		return;
	}
	w->v_early = V_EARLY_NONE;
	verify_expunge(w);
}

/* Expunge exactly those: UID EXPUNGE leaves other \Deleted mail be.
 * on_expunge_reply() drops their records afterwards. */
static void verify_expunge(struct worker *w)
{
	w->phase = PH_EXPUNGE;
	mv_expunge_uids(w);
}

static void verify_src_reset(struct worker *w)
{
	w->v_count[0] = w->v_bytes[0] = w->v_fhash[0] = 0;
	w->src_uids.n = 0;
	w->vm[0].n = 0;
	w->v_later = 0;
}

/* ---- the source's side asked during the copy ----
 *
 * A folder copied whole in this pass (no earlier copy, so no flag pass
 * comes between) has the source's verify FETCH sent as soon as its last
 * BODY[] FETCH is answered: the source answers it while the destination
 * saves the last APPEND, and the verification then waits only for the
 * destination's FETCH (sent, as ever, once the APPENDs are answered and
 * recorded). The source's answer may name messages that arrived after
 * the copy's last window: they are set aside once the high-water mark
 * has moved, as the FETCH asked after the copy would have. (Sending the
 * destination's FETCH behind the last APPEND, before its answer, doubled
 * Dovecot's work on the destination: the bench's site row.) */
enum {
	V_PRE_NONE,
	V_PRE_SENT,		/* asked, the copy goes on */
	V_PRE_IN,		/* answered before the copy ended */
	V_PRE_AWAITED,		/* the copy ended: go on when it comes */
	V_PRE_DROP,		/* the copy went on: thrown away */
};

static void on_verify_src_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx);

/* The source messages above the high-water mark out of the compared ones
 * (they reached the source after the copy's last window). */
static void verify_pre_trim(struct worker *w)
{
	struct vlist *l = &w->vm[0];
	uint32_t hwm = w->f->st.hwm;
	size_t n = 0;

	for (size_t i = 0; i < l->n; i++) {
		if (l->v[i].uid <= hwm) {
			l->v[n++] = l->v[i];
			continue;
		}
		w->v_later++;
		w->v_count[0]--;
		w->v_bytes[0] -= l->v[i].size;
		w->v_fhash[0] -= l->v[i].fhash;
	}
	l->n = n;
	n = 0;
	for (size_t i = 0; i < w->src_uids.n; i++)
		if (w->src_uids.v[i] <= hwm)
			w->src_uids.v[n++] = w->src_uids.v[i];
	w->src_uids.n = n;
	w->v_pre = V_PRE_NONE;
}

static void on_verify_pre_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	if (w->v_pre == V_PRE_SENT) {
		w->v_pre = V_PRE_IN;
		return;
	}
	if (w->v_pre == V_PRE_DROP) {
		w->v_pre = V_PRE_NONE;
		mv_copy_pump(w);	/* the window it held back */
		return;
	}
	verify_pre_trim(w);
	on_verify_src_reply(c, r, w);
}

/* Called with the folder's last BODY[] FETCH answered: asks the source
 * for its side when the folder qualifies (above). Returns 0, or -1 when
 * the job failed. */
int mv_verify_prefetch_src(struct worker *w)
{
	struct ms_mover *m = w->u->m;

	if (w->u->reverse || m->verify_only || m->verify_content ||
	    w->identity || w->old_hwm != 0 || w->repair_done ||
	    w->v_pre != V_PRE_NONE)
		return 0;
	verify_src_reset(w);
	w->v_pre = V_PRE_SENT;
	if (ms_imapc_cmd(w->s, on_verify_pre_reply, w,
			 "UID FETCH 1:* (UID RFC822.SIZE FLAGS)") < 0) {
		mv_folder_fail(w, "UID FETCH", NULL, w->s);
		return -1;
	}
	return 0;
}

/* The copy goes on after the early FETCH was sent (mail reached the
 * source folder and was announced with EXISTS): its answer may lack
 * messages this pass is to copy, which would then look expunged there.
 * It is thrown away, and the source asked again when the copy is done.
 * Returns 1 while its answer is awaited: the next window waits for it
 * (Dovecot may answer two pipelined FETCHes interleaved, and the
 * untagged answers do not say whose they are); on_verify_pre_reply()
 * moves the copy on. */
int mv_verify_prefetch_drop(struct worker *w)
{
	if (w->v_pre == V_PRE_SENT || w->v_pre == V_PRE_DROP) {
		w->v_pre = V_PRE_DROP;
		return 1;
	}
	w->v_pre = V_PRE_NONE;
	return 0;
}

void mv_start_verify(struct worker *w)
{
	w->phase = PH_VERIFY_SRC;
	if (w->v_pre != V_PRE_NONE)
		verify_early(w);
	if (w->v_pre == V_PRE_SENT) {
		w->v_pre = V_PRE_AWAITED;
		return;
	}
	if (w->v_pre == V_PRE_IN) {
		verify_pre_trim(w);
		on_verify_src_reply(w->s, &(struct ms_imap_response){
			.status = MS_STATUS_OK }, w);
		return;
	}
	verify_src_reset(w);
	verify_early(w);
	if (w->s_exists == 0) {
		on_verify_src_reply(w->s, &(struct ms_imap_response){
			.status = MS_STATUS_OK }, w);
		return;
	}
	ms_imapc_cmd(w->s, on_verify_src_reply, w,
		     "UID FETCH 1:* (UID RFC822.SIZE FLAGS)");
}

/* ---- verify only ----
 *
 * ms_mover_opts.verify_only (`mailshiftctl migrate --verify-only`): the
 * plan and the verification of a normal run with every write left out.
 * Both folders are EXAMINEd; nothing is created, copied, mended or
 * expunged; the store is only read. What earlier runs copied (the source
 * UIDs up to a folder's high-water mark) is compared; mail that reached
 * the source since and expunges not carried over yet are counted
 * (not_copied, expunge_pending), not compared. */

struct row_find {
	const char *name;
	struct ms_folder_state *st;
};

static int find_row(void *ctx, const struct ms_folder_state *st)
{
	struct row_find *rf = ctx;

	if (strcmp(st->src_name, rf->name) != 0)
		return 0;
	*rf->st = *st;
	return 1;
}

/* Settles what needs no connection: a folder no run has copied (nothing
 * to compare yet) and a copied folder the destination no longer has.
 * Returns 0, or -1 when the job failed. */
int mv_vo_plan_folder(struct ujob *u, struct fjob *f)
{
	struct ms_mover *m = u->m;
	struct row_find rf = { f->src, &f->st };
	int ret = ms_store_folder_foreach(m->store, u->user_id, find_row, &rf);

	if (ret < 0) {
		mv_job_fail(u, "store: %s", ms_store_error(m->store));
		return -1;
	}
	if (ret == 0)
		memset(&f->st, 0, sizeof(f->st));
	if (f->st.dst_uidvalidity == 0) {
		f->rep.not_copied = f->status_msgs;
		f->rep.verified = 1;
	} else if (f->dst_missing) {
		f->rep.source_messages = f->status_msgs;
		snprintf(f->rep.mismatch, sizeof(f->rep.mismatch), "the "
			 "destination folder \"%s\" is missing",
			 f->rep.destination);
		folder_mismatch(u, f);
	} else {
		return 0;		/* a worker compares it */
	}
	f->taken = 1;
	u->folders_done++;
	m->folders_done++;
	return 0;
}

void mv_vo_open(struct worker *w, uint32_t src_uv, uint32_t dst_uv)
{
	struct ms_folder_state *st = &w->f->st;

	if (st->src_uidvalidity != src_uv || st->dst_uidvalidity != dst_uv) {
		/* The records name UIDs that are no more. */
		ms_warn("%s: folder \"%s\": UIDVALIDITY changed since the copy; "
			"comparing the folders as wholes", w->u->name,
			w->f->rep.source);
		w->v_norecs = 1;
		w->v_all_src = st->src_uidvalidity != src_uv;
	}
	w->old_hwm = st->hwm;
	mv_start_verify(w);
}
