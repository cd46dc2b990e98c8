/* The mover's rollback: the reverse delta. Its workers read from the
 * destination and write to the source; here are the plan (which folders,
 * by which names), the scan of each folder against its done records and
 * the final check of the claims. It must not grow a copy or verification
 * of its own: those are the forward ones (mover_copy.c, mover_verify.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "mover_internal.h"

static void rb_start_copy(struct worker *w);

/* ---- rollback: the reverse delta ----
 *
 * A rollback job's workers read from the destination (w->s) and write to
 * the source (w->d); open, reconcile, match, copy and verify (mover_copy.c,
 * mover_intent.c, mover_verify.c) serve both directions. What is the rollback's own: the plan (which destination
 * folder goes to which source folder) and the scan, which compares both
 * servers with the folder's done records before anything is copied:
 *
 *   destination UID with no record            new: appended to the source
 *   record, destination message gone          expunged on the source too
 *   record, both there, flags differ          the destination's set on the
 *                                             source (UID STORE)
 *   record, the source lost its message       the record goes; the message
 *                                             is appended again
 *
 * See docs/mover.md, "Rollback". */

/* Collects the folder rows a forward copy opened (only those hold
 * records). */
int mv_collect_row(void *ctx, const struct ms_folder_state *st)
{
	struct rows *r = ctx;

	if (st->dst_uidvalidity == 0)
		return 0;
	if (MS_ARRAY_ROOM(r->v, r->n, r->cap, 16) < 0)
		return -1;
	r->v[r->n++] = *st;
	return 0;
}

/* The inverse of ms_mailbox_translate(): the source name of a folder made
 * on the destination. The name is split on the destination's separator; a
 * level holding an escaped separator ("%2F" for '/') was escaped as a
 * whole, so its "%XX" of the separator and its "%25" are decoded; the
 * levels are joined with the source's separator. The caller checks that
 * the forward rule gives the name back. NULL when out of memory. */
static char *reverse_name(const char *name, char src_sep, char dst_sep)
{
	static const char hex[] = "0123456789ABCDEF";
	const char esc[4] = { '%', hex[(unsigned char)dst_sep >> 4],
			      hex[dst_sep & 0xf], '\0' };
	char *out = malloc(strlen(name) + 1), *o = out;
	const char *p = name;

	if (out == NULL)
		return NULL;
	for (;;) {
		const char *end = dst_sep != '\0' ? strchr(p, dst_sep) : NULL;
		int escaped;

		if (end == NULL)
			end = p + strlen(p);
		escaped = dst_sep != '\0' &&
			  memmem(p, (size_t)(end - p), esc, 3) != NULL;
		for (const char *q = p; q < end; q++) {
			if (escaped && end - q >= 3 && strncmp(q, esc, 3) == 0) {
				*o++ = dst_sep;
				q += 2;
			} else if (escaped && end - q >= 3 &&
				   strncmp(q, "%25", 3) == 0) {
				*o++ = '%';
				q += 2;
			} else {
				*o++ = *q;
			}
		}
		if (*end == '\0')
			break;
		*o++ = src_sep != '\0' ? src_sep : dst_sep;
		p = end + 1;
	}
	*o = '\0';
	return out;
}

/* Fills a folder job of the rollback: source name src, destination name
 * dst, what the source's LIST said of src (sf, NULL when it has no such
 * folder). */
static void rb_fjob(struct ujob *u, struct fjob *f, const char *src,
		    const char *dst, const struct fjob *sf)
{
	memset(f, 0, sizeof(*f));
	snprintf(f->src, sizeof(f->src), "%s", src);
	snprintf(f->dst, sizeof(f->dst), "%s", dst);
	if (sf != NULL) {
		f->subscribed = sf->subscribed;
		memcpy(f->special, sf->special, sizeof(f->special));
	}
	mv_to_utf8(f->rep.source, sizeof(f->rep.source), f->src, u->src_sep);
	mv_to_utf8(f->rep.destination, sizeof(f->rep.destination), f->dst,
		   u->dst_sep);
}

/* The source name for destination folder d, which no record maps: with
 * names = destination, the source's folder of d's special use when no
 * other folder job has it; else the reverse of the separator rule (and of
 * the namespace prefixes). Returns 0 (out filled), 1 when
 * d has no name on the source that maps back to it, -1 when out of
 * memory. */
static int rb_source_name(struct ujob *u, const struct dfolder *d,
			  const struct fjob *jobs, unsigned int njobs,
			  char *out, size_t outsz)
{
	char back[1024], *t;
	const struct fjob *sf;

	out[0] = '\0';
	for (unsigned int i = 0; u->m->names == MS_NAMES_DESTINATION &&
	     d->special[0] != '\0' && i < u->nfolders && out[0] == '\0'; i++) {
		const struct fjob *s = &u->folders[i];
		unsigned int j;

		if (s->noselect || strcasecmp(s->special, d->special) != 0)
			continue;
		for (j = 0; j < njobs && !mv_name_eq(jobs[j].src, s->src); j++)
			;
		if (j == njobs)
			snprintf(out, outsz, "%s", s->src);
	}
	if (out[0] == '\0') {
		t = reverse_name(mv_unprefixed(d->name, u->dst_prefix),
				 u->src_sep, u->dst_sep);
		if (t == NULL)
			return -1;
		snprintf(out, outsz, "%s%s", strcasecmp(t, "INBOX") == 0 ?
			 "" : u->src_prefix, t);
		free(t);
	}
	/* The name must come back as it is, or a later forward copy would
	 * put the folder somewhere else. */
	sf = mv_find_folder(u, out);
	if (mv_map_forward(u, out, sf != NULL ? sf->special : "", back,
			   sizeof(back)) < 0)
		return -1;
	return mv_name_eq(back, d->name) ? 0 : 1;
}

/* The folder jobs for the folders a copy made: each goes back where it came
 * from. Returns 0, or -1 when the job failed. */
static int rb_plan_copied(struct ujob *u, const struct rows *rows,
			  struct fjob *jobs, unsigned int *n)
{
	struct ms_store *store = u->m->store;

	for (size_t i = 0; i < rows->n; i++) {
		const struct ms_folder_state *st = &rows->v[i];
		const struct fjob *sf = mv_find_folder(u, st->src_name);
		struct dfolder *d = mv_find_dfolder(u, st->dst_name);
		struct fjob *f;
		int ret = mv_folder_wanted(u, st->src_name);

		if (ret < 0) {
			mv_job_fail(u, "out of memory");
			return -1;
		}
		if (ret == 0)
			continue;
		if (d == NULL || d->noselect) {
			/* Deleted on the destination. Deleting a whole folder
			 * on the source is not the rollback's to do: it stays
			 * as it is and is reported; its records go, so that a
			 * later forward copy takes it for the new folder it
			 * then is. */
			if (ms_store_folder_reset(store, st->id) < 0) {
				mv_job_fail(u, "store: %s", ms_store_error(store));
				return -1;
			}
			if (sf == NULL)
				continue;	/* gone from both */
			f = &jobs[(*n)++];
			rb_fjob(u, f, st->src_name, st->dst_name, sf);
			f->rep.dst_deleted = 1;
			ms_warn("%s: folder \"%s\": deleted on the destination; "
				"left on the source as it is", u->name,
				f->rep.source);
			continue;
		}
		f = &jobs[(*n)++];
		rb_fjob(u, f, st->src_name, st->dst_name, sf);
		f->st = *st;
		/* Gone from the source: created again, and its new
		 * UIDVALIDITY voids the records. */
		f->rep.created = sf == NULL || sf->noselect;
		f->dst_subscribed = d->subscribed;
		f->selected_by_plan = 1;
		d->claimed = 1;
	}
	return 0;
}

/* The folder jobs for the destination folders made since the copy. Returns
 * 0, or -1 when the job failed. */
static int rb_plan_new(struct ujob *u, struct fjob *jobs, unsigned int *n)
{
	struct ms_store *store = u->m->store;
	char src[1024], dn[1024];

	for (unsigned int i = 0; i < u->ndfolders; i++) {
		struct dfolder *d = &u->dfolders[i];
		const struct fjob *sf;
		struct fjob *f, *same = NULL;
		int ret;

		if (d->claimed || d->noselect)
			continue;
		mv_to_utf8(dn, sizeof(dn), d->name, u->dst_sep);
		ret = rb_source_name(u, d, jobs, *n, src, sizeof(src));
		if (ret > 0) {
			mv_job_fail(u, "folder \"%s\" on the destination has no "
				    "name on the source that a copy would map back "
				    "to it (a level holds the source's separator "
				    "'%c'?); nothing was rolled back (rename it on "
				 "the destination, or --exclude it)", dn,
				 u->src_sep);
			return -1;
		}
		if (ret == 0)
			ret = mv_folder_wanted(u, src);
		if (ret < 0) {
			mv_job_fail(u, "out of memory");
			return -1;
		}
		if (ret == 0)
			continue;
		for (unsigned int j = 0; j < *n; j++)
			if (mv_name_eq(jobs[j].src, src))
				same = &jobs[j];
		if (same != NULL && !same->rep.dst_deleted) {
			mv_job_fail(u, "folders \"%s\" and \"%s\" on the destination "
				    "would both become \"%s\" on the source; nothing "
				 "was merged (rename one, or --exclude one)",
				 same->rep.destination, dn, same->rep.source);
			return -1;
		}
		/* (A folder deleted on the destination and made again under
		 * a name that maps to it: this folder job is that one.) */
		f = same != NULL ? same : &jobs[(*n)++];
		sf = mv_find_folder(u, src);
		rb_fjob(u, f, src, d->name, sf);
		if (ms_store_folder_get(store, u->user_id, src, &f->st) < 0) {
			mv_job_fail(u, "store: %s", ms_store_error(store));
			return -1;
		}
		f->rep.created = sf == NULL || sf->noselect;
		f->dst_subscribed = d->subscribed;
		f->selected_by_plan = 1;
		d->claimed = 1;
	}
	return 0;
}

/* Plan stage 2 of a rollback: the folder jobs, then CREATE and
 * subscriptions on the source. u->folders holds the source's LIST until
 * the folder jobs replace it. */
void mv_rb_plan(struct ujob *u)
{
	struct ms_mover *m = u->m;
	struct ms_imapc *sc = mv_src_conn(&u->workers[0]);
	struct rows rows = { 0 };
	struct fjob *jobs = NULL, *f;
	unsigned int n = 0, cap;
	char q[2100];

	if (!ms_imapc_has_cap(sc, "UIDPLUS")) {
		mv_job_fail(u, "source: the server has no UIDPLUS; a rollback needs "
			    "it to learn the UIDs of the messages it appends");
		return;
	}
	if (ms_store_folder_foreach(m->store, u->user_id, mv_collect_row,
				    &rows) != 0) {
		mv_job_fail(u, "store: %s", ms_store_error(m->store));
		goto out;
	}
	cap = (unsigned int)rows.n + u->ndfolders + 1;
	jobs = calloc(cap, sizeof(*jobs));
	if (jobs == NULL) {
		mv_job_fail(u, "out of memory");
		goto out;
	}
	if (rb_plan_copied(u, &rows, jobs, &n) < 0 ||
	    rb_plan_new(u, jobs, &n) < 0)
		goto out;
	free(u->folders);
	u->folders = jobs;
	u->nfolders = n;
	u->capfolders = cap;
	jobs = NULL;

	u->plan_pending = 1;
	for (unsigned int i = 0; i < u->nfolders; i++) {
		f = &u->folders[i];
		if (!f->selected_by_plan)
			continue;
		if (ms_imap_quote(q, sizeof(q), f->src) < 0) {
			mv_job_fail(u, "folder \"%s\": name cannot be sent",
				    f->rep.source);
			goto out;
		}
		if (f->rep.created && strcasecmp(f->src, "INBOX") != 0) {
			u->plan_pending++;
			ms_imapc_cmd(sc, mv_on_create_reply, u, "CREATE %s", q);
		}
		/* Subscriptions as the destination has them. */
		if (f->dst_subscribed != f->subscribed) {
			u->plan_pending++;
			ms_imapc_cmd(sc, mv_on_plan_reply, u, "%s %s",
				     f->dst_subscribed ? "SUBSCRIBE" :
				     "UNSUBSCRIBE", q);
		}
	}
	if (--u->plan_pending == 0)
		mv_plan_step(u);
out:
	free(jobs);
	free(rows.v);
}

static int cmp_rrec(const void *a, const void *b)
{
	const struct rrec *x = a, *y = b;

	return x->dst_uid < y->dst_uid ? -1 : x->dst_uid > y->dst_uid;
}

static int load_rrec(void *ctx, const struct ms_msg_rec *rec)
{
	struct worker *w = ctx;
	struct rrec *rr;

	if (MS_ARRAY_ROOM(w->rrecs, w->nrrecs, w->caprrecs, 256) < 0)
		return -1;
	rr = &w->rrecs[w->nrrecs++];
	memset(rr, 0, sizeof(*rr));
	rr->src_uid = rec->src_uid;
	rr->dst_uid = rec->dst_uid;
	rr->size = rec->size;
	rr->fhash = mv_flags_hash(rec->flags);
	return 0;
}

static struct rrec *rrec_find(struct worker *w, uint32_t dst_uid)
{
	struct rrec key = { .dst_uid = dst_uid };

	if (w->nrrecs == 0)
		return NULL;
	return bsearch(&key, w->rrecs, w->nrrecs, sizeof(*w->rrecs),
		       cmp_rrec);
}

static int cmp_fp_uid(const void *a, const void *b)
{
	const struct fpent *x = a, *y = b;

	return x->uid < y->uid ? -1 : x->uid > y->uid;
}

/* The scan's entry for source UID uid (w->fps sorted by UID), or NULL. */
static struct fpent *rscan_src_find(struct worker *w, uint32_t uid)
{
	struct fpent key = { .uid = uid };

	if (w->nfps == 0)
		return NULL;
	return bsearch(&key, w->fps, w->nfps, sizeof(*w->fps), cmp_fp_uid);
}

static void on_rscan_dst_reply(struct ms_imapc *c,
			       const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_last(w, "UID FETCH", r, c))
		mv_rb_scan_done(w);
}

static void on_rscan_src_reply(struct ms_imapc *c,
			       const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	if (w->nfps > 1)
		mv_sort_n(w->fps, w->nfps, sizeof(*w->fps), cmp_fp_uid);
	/* The destination's flags are compared as they come; flag STOREs
	 * to the source count in w->pending too. */
	w->phase = PH_RSCAN_DST;
	w->pending = 1;
	ms_imapc_cmd(w->s, on_rscan_dst_reply, w, "UID FETCH 1:* (UID FLAGS)");
}

/* The scan: records first, then the source's UIDs and flags, then the
 * destination's. */
void mv_rb_start_scan(struct worker *w)
{
	struct ms_store *store = w->u->m->store;

	w->nrrecs = 0;
	w->nfps = 0;
	w->todo.n = 0;
	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, load_rrec,
				 w) != 0) {
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	if (w->nrrecs > 1)
		mv_sort_n(w->rrecs, w->nrrecs, sizeof(*w->rrecs), cmp_rrec);
	w->phase = PH_RSCAN_SRC;
	ms_imapc_cmd(w->d, on_rscan_src_reply, w, "UID FETCH 1:* (UID FLAGS)");
}

void mv_rscan_src_fetch(struct worker *w, const struct fetch *f)
{
	if (f->has_uid && f->has_flags &&
	    mv_fps_push(w, 0, f->uid, mv_flags_hash(f->flags)) < 0)
		mv_job_fail(w->u, "out of memory");
}

void mv_rscan_dst_fetch(struct worker *w, const struct fetch *f)
{
	struct ms_store *store = w->u->m->store;
	struct rrec *rr;
	struct fpent *sp;
	uint64_t fh;

	if (!f->has_uid || !f->has_flags)
		return;
	rr = rrec_find(w, f->uid);
	sp = rr != NULL ? rscan_src_find(w, rr->src_uid) : NULL;
	if (rr != NULL)
		rr->seen = 1;
	if (rr != NULL && sp == NULL)
		rr->drop = 1;	/* the source lost it: appended again */
	if (sp == NULL) {
		/* (An unsolicited FETCH may name a UID twice: the list is
		 * made unique before the copy.) */
		if (ms_u32vec_push(&w->todo, f->uid) < 0)
			mv_job_fail(w->u, "out of memory");
		return;
	}
	fh = mv_flags_hash(f->flags);
	if (sp->fhash != fh)
		mv_flag_store(w, rr->src_uid, rr->src_uid, f->flags);
	else if (rr->fhash != fh)
		/* The servers agree already (a STORE whose answer a killed
		 * run did not see): the record catches up. */
		mv_store_check(w, ms_store_msg_set_flags(store, w->f->st.id,
						      rr->src_uid, f->flags));
}

/* Deletes the records marked drop == 1 (and marks them 2). Returns 0, or
 * -1 when the job failed. */
static int rb_drop_records(struct worker *w)
{
	struct ms_store *store = w->u->m->store;
	struct ms_folder_state *st = &w->f->st;

	if (ms_store_begin(store) < 0)
		goto fail;
	for (size_t i = 0; i < w->nrrecs; i++) {
		struct rrec *rr = &w->rrecs[i];

		if (rr->drop != 1)
			continue;
		if (ms_store_msg_delete(store, st->id, rr->src_uid, "") < 0)
			goto fail;
		rr->drop = 2;
		st->msgs = st->msgs > 0 ? st->msgs - 1 : 0;
		st->bytes = st->bytes > rr->size ? st->bytes - rr->size : 0;
	}
	if (ms_store_folder_update(store, st) < 0 ||
	    ms_store_commit(store) < 0)
		goto fail;
	return 0;
fail:
	ms_store_rollback(store);
	mv_job_fail(w->u, "store: %s", ms_store_error(store));
	return -1;
}

void mv_rb_scan_done(struct worker *w)
{
	w->expunge.n = 0;
	for (size_t i = 0; i < w->nrrecs; i++) {
		struct rrec *rr = &w->rrecs[i];

		if (rr->seen)
			continue;
		/* Gone from the destination: from the source too. Its
		 * record goes only once the source has expunged it, or a
		 * crash in between would leave a message no record claims,
		 * which a forward copy would bring back. */
		if (rscan_src_find(w, rr->src_uid) == NULL)
			rr->drop = 1;
		else if (ms_u32vec_push(&w->expunge, rr->src_uid) < 0) {
			mv_job_fail(w->u, "out of memory");
			return;
		}
	}
	if (rb_drop_records(w) < 0)
		return;
	if (w->expunge.n > 0) {
		w->phase = PH_REXPUNGE;
		mv_expunge_uids(w);
		return;
	}
	rb_start_copy(w);
}

void mv_rb_expunged(struct worker *w)
{
	for (size_t i = 0; i < w->nrrecs; i++)
		if (!w->rrecs[i].seen && w->rrecs[i].drop == 0)
			w->rrecs[i].drop = 1;
	if (rb_drop_records(w) < 0)
		return;
	w->f->rep.expunged += w->expunge.n;
	w->u->expunged += w->expunge.n;
	rb_start_copy(w);
}

static void rb_start_copy(struct worker *w)
{
	struct ms_mover *m = w->u->m;

	mv_u32vec_uniq(&w->todo);
	m->msgs_todo += w->todo.n;
	w->multiappend = ms_imapc_has_cap(w->d, "MULTIAPPEND");
	w->next_seq = 0;
	w->phase = PH_COPY;
	mv_copy_pump(w);
}

struct rclaims {
	struct ms_u32vec src, dst;
};

static int collect_rclaim(void *ctx, const struct ms_msg_rec *rec)
{
	struct rclaims *c = ctx;

	if (ms_u32vec_push(&c->src, rec->src_uid) < 0 ||
	    ms_u32vec_push(&c->dst, rec->dst_uid) < 0)
		return -1;
	return 0;
}

/* Verification, after the destination's UIDs are in (w->src_uids, side
 * read): every one of them must have a done record; the source UIDs the
 * records claim go to w->known for the source's side. */
void mv_rb_verify_claims(struct worker *w)
{
	struct ms_store *store = w->u->m->store;
	struct rclaims c = { { 0 }, { 0 } };

	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE,
				 collect_rclaim, &c) != 0) {
		ms_u32vec_free(&c.src);
		ms_u32vec_free(&c.dst);
		mv_job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	ms_u32vec_sort(&c.src);
	ms_u32vec_sort(&c.dst);
	ms_u32vec_free(&w->known);
	w->known = c.src;
	w->v_missing = 0;
	for (size_t i = 0; i < w->src_uids.n; i++)
		if (!ms_u32vec_has(&c.dst, w->src_uids.v[i]) &&
		    w->v_missing++ == 0)
			w->v_first_missing = w->src_uids.v[i];
	ms_u32vec_free(&c.dst);
	mv_verify_dst(w);
}

/* Both sides are in: side 0 the destination, side 1 the source, of which
 * v_only are the messages no record claims (kept, not compared). */
void mv_rb_verify_done(struct worker *w)
{
	struct ujob *u = w->u;
	struct fjob *f = w->f;
	struct ms_folder_report *rep = &f->rep;
	uint32_t hwm = 0;

	rep->source_messages = w->v_count[1];
	rep->source_bytes = w->v_bytes[1];
	rep->dest_messages = w->v_count[0];
	rep->dest_bytes = w->v_bytes[0];
	rep->source_only = w->v_only[0];
	rep->verified = w->v_count[1] - w->v_only[0] == w->v_count[0] &&
			w->v_bytes[1] - w->v_only[1] == w->v_bytes[0] &&
			w->v_fhash[1] - w->v_only[2] == w->v_fhash[0] &&
			w->v_missing == 0;
	if (!rep->verified) {
		u->mismatch = 1;
		if (u->error[0] == '\0')
			snprintf(u->error, sizeof(u->error),
				 "folder \"%s\": verification failed: "
				 "destination %llu messages / %llu bytes, "
				 "source %llu messages / %llu bytes (%llu no "
				 "record claims)%s%s", rep->source,
				 (unsigned long long)w->v_count[0],
				 (unsigned long long)w->v_bytes[0],
				 (unsigned long long)w->v_count[1],
				 (unsigned long long)w->v_bytes[1],
				 (unsigned long long)w->v_only[0],
				 w->v_fhash[0] != w->v_fhash[1] - w->v_only[2] ?
				 ", flags differ" : "",
				 w->v_missing ? ", messages not copied" : "");
	}
	if (w->v_only[0] > 0)
		ms_warn("%s: folder \"%s\": %llu message(s) on the source that "
			"the destination never had are kept (they arrived after "
			"the copy?); a forward copy takes them over", u->name,
			rep->source, (unsigned long long)w->v_only[0]);
	/* The high-water mark (source UIDs) moves up to the first source
	 * message no record claims: every UID below it is done. */
	ms_u32vec_sort(&w->dst_uids);
	for (size_t i = 0; i < w->dst_uids.n &&
	     ms_u32vec_has(&w->known, w->dst_uids.v[i]); i++)
		hwm = w->dst_uids.v[i];
	if (hwm > f->st.hwm)
		f->st.hwm = hwm;
	mv_folder_done(w);
}
