/* The mover's copy of one folder: opening both sides, the windows of
 * metadata, intents and streamed bodies (MULTIAPPEND), and the flag
 * changes of messages copied in earlier runs. It must not decide what is
 * already on the destination (pairing after a crash is mover_intent.c's)
 * nor compare the two sides (mover_verify.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "testhook.h"
#include "mover_internal.h"


/* ---- workers: one folder ---- */

void mv_folder_done(struct worker *w)
{
	struct ujob *u = w->u;
	struct ms_mover *m = u->m;
	uint64_t t0 = uv_hrtime();

	if (!m->verify_only &&
	    mv_store_check(w, ms_store_folder_update(m->store, &w->f->st)) < 0)
		return;
	mv_ph_store(u, t0);
	m->folders_done++;
	u->folders_done++;
	w->f = NULL;
	w->state = W_IDLE;
	mv_job_schedule(u);
}

static void on_open_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx);

void mv_worker_next_folder(struct worker *w)
{
	struct ujob *u = w->u;
	char qs[2100], qd[2100];
	struct fjob *f = NULL;

	if (u->failed || w->state != W_IDLE)
		return;
	for (unsigned int i = 0; i < u->nfolders; i++) {
		if (u->folders[i].selected_by_plan && !u->folders[i].taken) {
			f = &u->folders[i];
			break;
		}
	}
	if (f == NULL)
		return;
	f->taken = 1;
	w->f = f;
	w->state = W_BUSY;
	w->phase = PH_OPEN;
	w->s_uidvalidity = w->s_uidnext = w->s_exists = 0;
	w->d_uidvalidity = w->d_uidnext = w->d_exists = 0;
	w->s_modseq = 0;
	w->s_nomodseq = 0;
	w->dedup_done = 0;
	w->repair_done = 0;
	w->v_all_src = w->v_norecs = 0;
	w->v_pre = 0;
	w->settled = 0;
	/* qs: the folder read from, qd: the one written to */
	ms_imap_quote(qs, sizeof(qs), u->reverse ? f->dst : f->src);
	ms_imap_quote(qd, sizeof(qd), u->reverse ? f->src : f->dst);
	w->pending = 2;
	if (ms_imapc_has_cap(w->s, "CONDSTORE"))
		ms_imapc_cmd(w->s, on_open_reply, w, "EXAMINE %s (CONDSTORE)", qs);
	else
		ms_imapc_cmd(w->s, on_open_reply, w, "EXAMINE %s", qs);
	ms_imapc_cmd(w->d, on_open_reply, w, "%s %s",
		     u->m->verify_only ? "EXAMINE" : "SELECT", qd);
}

/* The copy pass, once open intents are settled. */
void mv_after_match(struct worker *w)
{
	if (w->u->reverse)
		mv_rb_start_scan(w);
	else
		mv_start_copy(w);
}

static int unmapped_rec(void *ctx, const struct ms_msg_rec *rec)
{
	return rec->dst_uid == 0;
}

static void on_open_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct worker *w = ctx;
	struct ujob *u = w->u;
	struct ms_store *store = u->m->store;
	struct ms_folder_state *st = &w->f->st;
	uint32_t src_uv, dst_uv;
	uint64_t pending = 0, t0;
	int reset = 0, ret;

	if (mv_reply_failed(w, c == w->s ? "EXAMINE" : "SELECT", r, c))
		return;
	if (--w->pending > 0)
		return;
	if (w->s_uidvalidity == 0 || w->d_uidvalidity == 0) {
		mv_job_fail(u, "folder \"%s\": the server sent no UIDVALIDITY",
			    w->f->rep.source);
		return;
	}
	src_uv = u->reverse ? w->d_uidvalidity : w->s_uidvalidity;
	dst_uv = u->reverse ? w->s_uidvalidity : w->d_uidvalidity;
	if (u->m->verify_only) {
		mv_vo_open(w, src_uv, dst_uv);
		return;
	}
	/* Opened again in this run (folder_reopen() in mover.c) and found
	 * made anew: mv_id_open() gives its identity up. */
	if (!u->reverse && w->f->run_src_uv != 0 &&
	    w->f->run_src_uv != src_uv)
		w->f->moved_src_uv = w->f->run_src_uv;
	if (!u->reverse)
		w->f->run_src_uv = src_uv;
	if (st->src_uidvalidity != 0 && st->src_uidvalidity != src_uv) {
		ms_warn("%s: folder \"%s\": source UIDVALIDITY changed "
			"(%u -> %u); matching messages by fingerprint",
			u->name, w->f->rep.source, st->src_uidvalidity, src_uv);
		reset = 1;
	} else if (st->dst_uidvalidity != 0 && st->dst_uidvalidity != dst_uv) {
		ms_warn("%s: folder \"%s\": destination UIDVALIDITY changed "
			"(%u -> %u); matching messages by fingerprint",
			u->name, w->f->rep.destination, st->dst_uidvalidity,
			dst_uv);
		reset = 1;
	} else if (u->reverse) {
		/* An interrupted forward copy first: which of its messages
		 * the destination holds is for it to settle. */
		if (mv_store_check(w, ms_store_msg_count(store, st->id,
						      MS_MSG_INTENT,
						      &pending)) < 0)
			return;
		if (pending > 0) {
			mv_job_fail(u, "folder \"%s\": an interrupted copy left "
				    "%llu message(s) unfinished; run the copy to "
				 "its end first, then roll back", w->f->rep.source,
				 (unsigned long long)pending);
			return;
		}
		/* A rollback maps messages by their destination UIDs: where
		 * the copy did not learn them (no UIDPLUS), fingerprints. */
		ret = ms_store_msg_foreach(store, st->id, MS_MSG_DONE,
					   unmapped_rec, NULL);
		if (mv_store_check(w, ret) < 0)
			return;
		if (ret > 0) {
			ms_warn("%s: folder \"%s\": destination UIDs of copied "
				"messages unknown (no UIDPLUS); matching "
				"messages by fingerprint", u->name,
				w->f->rep.source);
			reset = 1;
		}
	}
	if (reset && mv_store_check(w, ms_store_folder_reset(store, st->id)) < 0)
		return;
	if (reset) {
		st->src_uidvalidity = st->dst_uidvalidity = 0;
		st->hwm = 0;
		st->modseq = 0;
		st->msgs = st->bytes = 0;
	}
	ret = u->reverse ? ms_store_rintent_count(store, st->id, &pending) :
		ms_store_msg_count(store, st->id, MS_MSG_INTENT, &pending);
	if (mv_store_check(w, ret) < 0)
		return;
	st->src_uidvalidity = src_uv;
	st->dst_uidvalidity = dst_uv;
	snprintf(st->dst_name, sizeof(st->dst_name), "%s", w->f->dst);
	t0 = uv_hrtime();
	if (mv_store_check(w, ms_store_folder_update(store, st)) < 0)
		return;
	/* The old name the gateway answers (a rollback keeps the record: the
	 * destination's folder is still the renamed one). */
	if (!u->reverse && mv_store_check(w, ms_store_rename_set(store, st->id,
	    w->f->old[0] != '\0' ? w->f->old : NULL, u->dst_sep)) < 0)
		return;
	mv_ph_store(u, t0);
	w->open_pending = pending;
	mv_id_open(w, reset);
}

/* The folder is open on both sides and its identity settled: match what a
 * crash or an earlier copy left, then copy. */
void mv_open_continue(struct worker *w)
{
	struct ms_folder_state *st = &w->f->st;

	w->old_hwm = st->hwm;
	if (w->open_pending > 0) {
		mv_start_match(w, 1, 0);
	} else if (st->msgs == 0 && w->d_exists > 0) {
		/* Mail we have no record of is there already: pair it up
		 * rather than append a second copy. */
		mv_start_match(w, 0, 1);
	} else {
		mv_after_match(w);
	}
}

/* ---- copy: windows of metadata, intents, streamed bodies ---- */

static struct window *window_new(struct worker *w, unsigned int cap)
{
	struct window *win = calloc(1, sizeof(*win));

	if (win == NULL)
		return NULL;
	win->w = w;
	win->msgs = calloc(cap, sizeof(*win->msgs));
	win->order = calloc(cap, sizeof(*win->order));
	if (win->msgs == NULL || win->order == NULL) {
		free(win->msgs);
		free(win->order);
		free(win);
		return NULL;
	}
	win->cap = cap;
	return win;
}

void mv_window_free(struct window *win)
{
	if (win == NULL)
		return;
	while (win->acs != NULL) {
		struct append_cmd *ac = win->acs;

		win->acs = ac->next;
		free(ac);
	}
	free(win->msgs);
	free(win->order);
	free(win);
}

static void on_seek_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	w->next_seq = w->min_new_seq != 0 ? w->min_new_seq : w->s_exists + 1;
	w->phase = PH_COPY;
	mv_copy_pump(w);
}

void mv_start_copy(struct worker *w)
{
	w->fresh = w->f->st.msgs == 0;
	w->multiappend = ms_imapc_has_cap(w->d, "MULTIAPPEND");
	w->phase = PH_SEEK;
	w->pending = 0;
	w->min_new_seq = 0;
	if (w->s_exists == 0) {
		mv_id_finish(w);
		return;
	}
	if (w->f->st.hwm == 0) {
		w->next_seq = 1;
		w->phase = PH_COPY;
		mv_copy_pump(w);
		return;
	}
	/* Find the first message above the high-water mark. */
	ms_imapc_cmd(w->s, on_seek_reply, w, "UID FETCH %u:* (UID)",
		     w->f->st.hwm + 1);
}

static void on_meta_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx);
static void on_body_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx);
static int meta_left(const struct worker *w);

static int write_intents(struct worker *w, struct window *win)
{
	struct ms_store *store = w->u->m->store;
	struct ms_msg_rec rec;

	if (ms_store_begin(store) < 0)
		return -1;
	for (unsigned int i = 0; i < win->n; i++) {
		struct wmsg *msg = &win->msgs[i];
		int found = 0;

		/* A folder that had nothing done when the pass began has
		 * nothing done among the UIDs it has not reached yet. (A
		 * rollback copies what its scan found no record of.) */
		if (!w->fresh && !w->u->reverse &&
		    ms_store_msg_get(store, w->f->st.id, msg->uid, &rec,
				     &found) < 0)
			goto fail;
		if (found && rec.state == MS_MSG_DONE) {
			msg->skip = 1;
			continue;
		}
		memset(&rec, 0, sizeof(rec));
		rec.state = MS_MSG_INTENT;
		rec.size = msg->size;
		rec.date = msg->date;
		snprintf(rec.msgid, sizeof(rec.msgid), "%s", msg->msgid);
		snprintf(rec.flags, sizeof(rec.flags), "%s", msg->flags);
		rec.dst_floor = w->d_uidnext != 0 ? w->d_uidnext : 1;
		if (w->u->reverse) {
			rec.dst_uid = msg->uid;
			if (ms_store_rintent_put(store, w->f->st.id, &rec) < 0)
				goto fail;
			continue;
		}
		rec.src_uid = msg->uid;
		if (ms_store_msg_put(store, w->f->st.id, &rec) < 0)
			goto fail;
	}
	/* Committed before a single byte of these messages is sent. */
	return ms_store_commit(store);
fail:
	ms_store_rollback(store);
	return -1;
}

/* Keeping identity: one window per run of consecutive source UIDs (the
 * messages to copy; those done already stay with the run before them), so
 * that each APPEND can start where the destination's next UID was put.
 * Returns the list, chained by next; on no memory, win whole (the gate
 * then loses identity at the gap, the copy goes on). */
static struct window *split_runs(struct worker *w, struct window *win)
{
	struct window *head = win, *cur = win, *nw;
	unsigned int start = 0, n = win->n;
	uint32_t last = 0;

	for (unsigned int i = 0; i < n; i++) {
		struct wmsg *msg = &win->msgs[i];

		if (msg->skip)
			continue;
		if (last != 0 && msg->uid != last + 1 && i > start) {
			nw = window_new(w, n - i);
			if (nw == NULL)
				return head;
			memcpy(nw->msgs, win->msgs + i,
			       (n - i) * sizeof(*nw->msgs));
			nw->n = n - i;
			cur->n = i - start;
			cur->next = nw;
			cur = nw;
			start = i;
		}
		last = msg->uid;
	}
	return head;
}

static void on_meta_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct worker *w = ctx;
	struct window *win = w->meta;
	uint64_t t0;

	if (mv_reply_failed(w, "FETCH", r, c))
		return;
	w->meta = NULL;
	t0 = uv_hrtime();
	if (write_intents(w, win) < 0) {
		mv_window_free(win);
		mv_job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
		return;
	}
	mv_ph_store(w->u, t0);
	w->ready = w->identity ? split_runs(w, win) : win;
	mv_copy_pump(w);
}

void mv_meta_fetch(struct worker *w, const struct fetch *f)
{
	struct window *win = w->meta;
	struct wmsg *msg;

	if (win == NULL || !f->has_uid || !f->has_size || !f->has_date)
		return;
	if (!w->u->reverse && f->uid <= w->f->st.hwm && w->f->st.hwm != 0)
		return;
	if (win->n == win->cap)
		return;
	msg = &win->msgs[win->n];
	memset(msg, 0, sizeof(*msg));
	msg->uid = f->uid;
	msg->seq = f->seq;
	msg->size = f->size;
	if (ms_imap_date_parse(f->date, &msg->date) < 0 ||
	    strlen(f->date) >= sizeof(msg->datestr)) {
		mv_job_fail(w->u, "folder \"%s\": FETCH: bad INTERNALDATE \"%.40s\"",
			    w->f->rep.source, f->date);
		return;
	}
	snprintf(msg->datestr, sizeof(msg->datestr), "%s", f->date);
	snprintf(msg->flags, sizeof(msg->flags), "%s", f->flags);
	snprintf(msg->msgid, sizeof(msg->msgid), "%s", f->msgid);
	win->n++;
}

static void uid_set(const struct window *win, char *buf, size_t bufsz)
{
	size_t pos = 0;
	unsigned int i = 0;

	buf[0] = '\0';
	while (i < win->n) {
		uint32_t a, b;

		if (win->msgs[i].skip) {
			i++;
			continue;
		}
		a = b = win->msgs[i].uid;
		while (i + 1 < win->n && !win->msgs[i + 1].skip &&
		       win->msgs[i + 1].uid == b + 1)
			b = win->msgs[++i].uid;
		i++;
		pos += (size_t)snprintf(buf + pos, bufsz - pos, "%s%u", pos ? "," : "", a);
		if (b != a)
			pos += (size_t)snprintf(buf + pos, bufsz - pos, ":%u", b);
		if (pos >= bufsz)
			break;
	}
}

/* Windows wait in w->appends, oldest first, until their APPEND is answered;
 * window_finish() frees them as they leave the head of that list. */
static void window_queue(struct worker *w, struct window *win)
{
	struct window **pp = &w->appends;

	win->next = NULL;
	while (*pp != NULL)
		pp = &(*pp)->next;
	*pp = win;
}

/* One APPEND command: messages order[first .. first+count-1] of win. */
static void window_record(struct worker *w, struct window *win)
{
	struct ujob *u = w->u;
	struct ms_mover *m = u->m;
	struct ms_store *store = m->store;
	int64_t id = w->f->st.id;
	uint32_t max_uid = 0;
	uint64_t msgs = 0, bytes = 0;

	/* The server saved the window's messages; their intents are open. */
	if (win->nstreamed > 0)
		MS_CRASH_POINT(u->reverse ? "rollback.appended" :
			       "copy.appended");
	if (ms_store_begin(store) < 0)
		goto fail;
	for (unsigned int i = 0; i < win->nstreamed; i++) {
		struct wmsg *msg = &win->msgs[win->order[i]];

		struct ms_msg_rec rec;

		/* The whole record again: the Message-ID is only known now,
		 * from the bytes that went by. */
		memset(&rec, 0, sizeof(rec));
		rec.src_uid = msg->uid;
		rec.state = MS_MSG_DONE;
		rec.size = msg->size;
		rec.date = msg->date;
		memcpy(rec.msgid, msg->msgid, sizeof(msg->msgid));
		memcpy(rec.flags, msg->flags, sizeof(msg->flags));
		rec.dst_uid = msg->dst_uid;
		if (u->reverse) {
			/* Recorded as a forward copy knows it: by the UID the
			 * source gave it. Without one the intent stays open
			 * for the next run to reconcile. */
			if (msg->dst_uid == 0) {
				ms_store_rollback(store);
				mv_job_fail(u, "folder \"%s\": APPEND: the source "
					    "named no UID for the message "
					    "(APPENDUID)", w->f->rep.source);
				return;
			}
			rec.src_uid = msg->dst_uid;
			rec.dst_uid = msg->uid;
			if (ms_store_rintent_delete(store, id, msg->uid) < 0)
				goto fail;
		}
		if (ms_store_msg_put(store, id, &rec) < 0)
			goto fail;
		msgs++;
		bytes += msg->size;
		if (msg->dst_uid >= w->d_uidnext)
			w->d_uidnext = msg->dst_uid + 1;
	}
	for (unsigned int i = 0; i < win->n; i++) {
		struct wmsg *msg = &win->msgs[i];

		if (msg->uid > max_uid)
			max_uid = msg->uid;
		/* Expunged on the side read between metadata and body. */
		if (msg->skip || msg->streamed)
			continue;
		if ((u->reverse ? ms_store_rintent_delete(store, id, msg->uid) :
		     ms_store_msg_delete(store, id, msg->uid, "")) < 0)
			goto fail;
	}
	win->max_uid = max_uid;
	win->finished = 1;
	/* The high-water mark only moves over windows that are all done:
	 * replies may come out of order, and every UID below the mark must
	 * be done or the next run would never look at it again. (It counts
	 * source UIDs: a rollback sets it when it has verified.) */
	while (w->appends != NULL && w->appends->finished) {
		struct window *head = w->appends;

		if (!u->reverse && head->max_uid > w->f->st.hwm)
			w->f->st.hwm = head->max_uid;
		w->appends = head->next;
		mv_window_free(head);
	}
	w->f->st.msgs += msgs;
	w->f->st.bytes += bytes;
	if (ms_store_folder_update(store, &w->f->st) < 0 ||
	    (!u->reverse && ms_store_user_add_progress(store, u->user_id, msgs,
						       bytes) < 0) ||
	    ms_store_commit(store) < 0)
		goto fail;
	w->f->rep.copied += msgs;
	u->copied += msgs;
	u->bytes += bytes;
	m->msgs_done += msgs;
	m->bytes_done += bytes;
	if (msgs > 0)
		MS_CRASH_POINT(u->reverse ? "rollback.recorded" :
			       "copy.recorded");
	return;
fail:
	ms_store_rollback(store);
	mv_job_fail(u, "store: %s", ms_store_error(store));
}

/* The window's records, in the store's time (mv_ph_store()). */
static void window_finish(struct worker *w, struct window *win)
{
	struct ujob *u = w->u;
	uint64_t t0 = uv_hrtime();

	window_record(w, win);
	mv_ph_store(u, t0);
}

static void on_append_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx)
{
	struct append_cmd *ac = ctx;
	struct window *win = ac->win;
	struct worker *w = win->w;
	uint32_t *uids = NULL;
	long n = 0;

	if (mv_reply_failed(w, "APPEND", r, c))
		return;
	if (r->code != NULL && strcasecmp(r->code, "APPENDUID") == 0 &&
	    r->code_argc >= 2 && ms_imap_arg_str(&r->code_args[1]) != NULL) {
		uids = calloc(ac->count + 1, sizeof(*uids));
		if (uids != NULL)
			n = mv_parse_uid_set(ms_imap_arg_str(&r->code_args[1]), uids,
					     ac->count);
		if (n != (long)ac->count) {
			/* Not fatal: the mapping is only needed for flag
			 * updates and expunges, which then warn. */
			ms_warn("%s: folder \"%s\": APPENDUID does not match "
				"the %u messages sent", w->u->name,
				w->f->rep.source, ac->count);
			n = 0;
		}
		for (long i = 0; i < n; i++) {
			struct wmsg *msg = &win->msgs[win->order[ac->first + i]];

			msg->dst_uid = uids[i];
			mv_id_appended(w, msg->uid, uids[i]);
		}
	}
	free(uids);
	if (--win->replies_pending == 0 && win->body_done)
		window_finish(w, win);
	mv_copy_pump(w);
}

/* Ends the APPEND command being written, if any. */
static int append_close(struct worker *w, struct window *win)
{
	if (!win->open)
		return 0;
	win->open = 0;
	if (ms_imapc_append_end(w->d) < 0) {
		mv_folder_fail(w, "APPEND", NULL, w->d);
		return -1;
	}
	return 0;
}

static void on_body_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct worker *w = ctx;
	struct window *win = w->body;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	if (w->cur != NULL) {
		mv_job_fail(w->u, "folder \"%s\": UID FETCH: reply before the "
			    "end of a message", w->f->rep.source);
		return;
	}
	w->body = NULL;
	window_queue(w, win);
	if (append_close(w, win) < 0)
		return;
	win->body_done = 1;
	/* The folder's last window is read: the source's side of its
	 * verification may be asked while the destination saves it. */
	if (w->ready == NULL && w->meta == NULL && !meta_left(w) &&
	    mv_verify_prefetch_src(w) < 0)
		return;
	if (win->replies_pending == 0)
		window_finish(w, win);
	mv_copy_pump(w);
}

/* Whether metadata windows are left to fetch: by sequence number from
 * next_seq on; in a rollback, the destination UIDs todo[next_seq...]. */
static int meta_left(const struct worker *w)
{
	if (w->u->reverse)
		return w->next_seq < w->todo.n;
	return w->next_seq != 0 && w->next_seq <= w->s_exists;
}

/* Asks for the next metadata window. Returns 0, or -1 when the job
 * failed. */
static int meta_next(struct worker *w)
{
	unsigned int batch = w->u->m->batch;
	uint32_t end;
	char *set = NULL;

	if (w->u->reverse) {
		size_t n = w->todo.n - w->next_seq;

		if (n > batch)
			n = batch;
		w->meta = window_new(w, (unsigned int)n);
		if (w->meta == NULL ||
		    mv_uid_list_set(w->todo.v + w->next_seq, n, &set) == 0) {
			mv_window_free(w->meta);
			w->meta = NULL;
			mv_job_fail(w->u, "out of memory");
			return -1;
		}
		ms_imapc_cmd(w->s, on_meta_reply, w, "UID FETCH %s (UID FLAGS "
			     "INTERNALDATE RFC822.SIZE)", set);
		free(set);
		w->next_seq += (uint32_t)n;
		return 0;
	}
	/* More to copy than when the verification was asked for early. */
	if (mv_verify_prefetch_drop(w))
		return 0;
	end = w->next_seq + batch - 1;
	if (end > w->s_exists)
		end = w->s_exists;
	w->meta = window_new(w, end - w->next_seq + 1);
	if (w->meta == NULL) {
		mv_job_fail(w->u, "out of memory");
		return -1;
	}
	ms_imapc_cmd(w->s, on_meta_reply, w,
		     "FETCH %u:%u (UID FLAGS INTERNALDATE RFC822.SIZE)",
		     w->next_seq, end);
	w->next_seq = end + 1;
	return 0;
}

/* Moves the copy pipeline forward: at most one metadata window, one ready
 * window, one streaming window, any number of APPEND replies awaited. */
void mv_copy_pump(struct worker *w)
{
	char set[8192];

	if (w->u->failed || w->phase != PH_COPY)
		return;
	/* At most MAX_APPENDS windows sent and not yet answered: bounds the
	 * open intents, and what a killed run can leave in flight. */
	unsigned int inflight = 0;

	for (struct window *a = w->appends; a != NULL; a = a->next)
		inflight++;
	if (w->body == NULL && w->ready != NULL && inflight < MAX_APPENDS &&
	    mv_id_gate(w, w->ready)) {
		struct window *win = w->ready;
		unsigned int tocopy = 0;

		w->ready = win->next;
		win->next = NULL;
		for (unsigned int i = 0; i < win->n; i++)
			tocopy += !win->msgs[i].skip;
		if (tocopy == 0) {
			window_queue(w, win);
			win->body_done = 1;
			window_finish(w, win);
		} else {
			mv_id_sent(w, win);
			uid_set(win, set, sizeof(set));
			w->body = win;
			ms_imapc_cmd(w->s, on_body_reply, w,
				     "UID FETCH %s (UID BODY.PEEK[])", set);
		}
	}
	if (w->meta == NULL && w->ready == NULL && meta_left(w) &&
	    meta_next(w) < 0)
		return;
	if (w->meta == NULL && w->ready == NULL && w->body == NULL &&
	    w->appends == NULL && !meta_left(w)) {
		if (w->u->reverse)
			mv_start_verify(w);
		else
			mv_id_finish(w);
	}
}

int mv_on_literal_start(void *ctx, const struct ms_imap_response *partial,
			uint64_t size)
{
	struct worker *w = ctx;
	struct window *win = w->body;
	const struct ms_imap_arg *list;
	const struct ms_imap_arg *name;
	uint32_t uid = 0;
	uint64_t n;
	struct wmsg *msg = NULL;

	if (win == NULL || w->phase != PH_COPY || partial->argc < 3 ||
	    partial->args[2].type != MS_ARG_LIST)
		return 0;
	list = &partial->args[2];
	if (list->list_count == 0)
		return 0;
	name = &list->list[list->list_count - 1];
	if (!ms_imap_arg_is(name, "BODY[]"))
		return 0;
	for (unsigned int i = 0; i + 1 < list->list_count; i += 2)
		if (ms_imap_arg_is(&list->list[i], "UID") &&
		    ms_imap_arg_number(&list->list[i + 1], &n) == 0)
			uid = (uint32_t)n;
	for (unsigned int i = 0; i < win->n; i++) {
		if (uid != 0 ? win->msgs[i].uid == uid :
		    (ms_imap_arg_number(&partial->args[0], &n) == 0 &&
		     win->msgs[i].seq == n)) {
			msg = &win->msgs[i];
			break;
		}
	}
	if (msg == NULL || msg->skip || msg->streamed) {
		mv_job_fail(w->u, "folder \"%s\": UID FETCH: unexpected message "
			    "body (UID %u)", w->f->rep.source, uid);
		return -1;
	}
	/* Part of the window is in its APPEND, the rest to come. */
	if (win->nstreamed > 0)
		MS_CRASH_POINT(w->u->reverse ? "rollback.mid-batch" :
			       "copy.mid-batch");
	/* One MULTIAPPEND (RFC 3502) per window where the server has it,
	 * else one pipelined APPEND per message. */
	if (win->open && !w->multiappend &&
	    append_close(w, win) < 0)
		return -1;
	if (!win->open) {
		struct append_cmd *ac = calloc(1, sizeof(*ac));

		if (ac == NULL) {
			mv_job_fail(w->u, "out of memory");
			return -1;
		}
		ac->win = win;
		ac->first = win->nstreamed;
		ac->next = win->acs;
		win->acs = ac;
		if (ms_imapc_append_begin(w->d, on_append_reply, ac,
					  w->u->reverse ? w->f->src :
					  w->f->dst) < 0) {
			mv_folder_fail(w, "APPEND", NULL, w->d);
			return -1;
		}
		win->appending = win->open = 1;
		win->replies_pending++;
		win->cur_cmd = ac;
	}
	win->cur_cmd->count++;
	/* RFC822.SIZE from some servers differs from the bytes they send;
	 * what we store is what we send. */
	msg->size = size;
	if (ms_imapc_append_msg(w->d, msg->flags, msg->datestr, size) < 0) {
		mv_folder_fail(w, "APPEND", NULL, w->d);
		return -1;
	}
	msg->streamed = 1;
	win->order[win->nstreamed++] = (uint32_t)(msg - win->msgs);
	w->cur = msg;
	w->hdrlen = 0;
	w->hdr_done = 0;
	return 1;
}

static void header_scan(struct worker *w, const char *data, size_t len)
{
	size_t n = len < HDR_MAX - w->hdrlen ? len : HDR_MAX - w->hdrlen;
	size_t from = w->hdrlen > 3 ? w->hdrlen - 3 : 0;

	memcpy(w->hdr + w->hdrlen, data, n);
	w->hdrlen += n;
	if (w->hdrlen == HDR_MAX ||
	    memmem(w->hdr + from, w->hdrlen - from, "\r\n\r\n", 4) != NULL ||
	    (w->hdrlen >= 2 && memcmp(w->hdr, "\r\n", 2) == 0)) {
		mv_extract_msgid(w->hdr, w->hdrlen, w->cur->msgid,
				 sizeof(w->cur->msgid));
		w->hdr_done = 1;
	}
}

int mv_on_literal_data(void *ctx, const void *data, size_t len)
{
	struct worker *w = ctx;

	if (w->cur == NULL)
		return -1;
	if (!w->hdr_done)
		header_scan(w, data, len);
	if (ms_imapc_append_data(w->d, data, len) < 0) {
		mv_folder_fail(w, "APPEND", NULL, w->d);
		return -1;
	}
	if (!w->s_paused && ms_imapc_write_pending(w->d) >= MS_CONN_HIGH_WATER) {
		/* The destination is slower: stop reading the source. */
		w->s_paused = 1;
		ms_imapc_read_pause(w->s, 1);
	}
	return 0;
}

void mv_on_literal_end(void *ctx)
{
	struct worker *w = ctx;

	if (w->cur != NULL && !w->hdr_done)
		mv_extract_msgid(w->hdr, w->hdrlen, w->cur->msgid,
				 sizeof(w->cur->msgid));
	w->cur = NULL;
}

void mv_on_dst_drain(struct ms_imapc *c, void *ctx)
{
	struct worker *w = ctx;

	if (w->s_paused) {
		w->s_paused = 0;
		ms_imapc_read_pause(w->s, 0);
	}
}

/* ---- flags ---- */

struct flag_store {
	struct worker *w;
	uint32_t src_uid;
	char flags[FLAGS_MAX];
};

static void on_flag_store_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx)
{
	struct flag_store *fs = ctx;
	struct worker *w = fs->w;
	int ret;

	if (r == NULL || r->status != MS_STATUS_OK) {
		free(fs);
		mv_folder_fail(w, "UID STORE", r, c);
		return;
	}
	/* The store learns the new flags only once the destination has
	 * them: a crash in between makes the next run set them again. */
	ret = ms_store_msg_set_flags(w->u->m->store, w->f->st.id, fs->src_uid,
				     fs->flags);
	free(fs);
	if (mv_store_check(w, ret) < 0)
		return;
	w->f->rep.flags_updated++;
	w->u->flags_updated++;
	if (--w->pending == 0) {
		if (w->phase == PH_FLAGS)
			mv_start_verify(w);
		else if (w->phase == PH_MATCH)
			mv_on_match_src_reply(w->s, r, w);
		else if (w->phase == PH_RSCAN_DST)
			mv_rb_scan_done(w);
		else if (w->phase == PH_REPAIR)
			mv_repair_expunge(w);
	}
}

void mv_flag_store(struct worker *w, uint32_t src_uid, uint32_t dst_uid,
		   const char *flags)
{
	struct flag_store *fs = calloc(1, sizeof(*fs));

	if (fs == NULL) {
		mv_job_fail(w->u, "out of memory");
		return;
	}
	fs->w = w;
	fs->src_uid = src_uid;
	snprintf(fs->flags, sizeof(fs->flags), "%s", flags);
	w->pending++;
	if (ms_imapc_cmd(w->d, on_flag_store_reply, fs,
			 "UID STORE %u FLAGS.SILENT (%s)", dst_uid, flags) < 0) {
		free(fs);
		mv_folder_fail(w, "UID STORE", NULL, w->d);
	}
}

void mv_flags_fetch(struct worker *w, const struct fetch *f)
{
	struct ms_store *store = w->u->m->store;
	struct ms_msg_rec rec;
	int found = 0;

	if (!f->has_uid || !f->has_flags || f->uid > w->old_hwm)
		return;
	if (mv_store_check(w, ms_store_msg_get(store, w->f->st.id, f->uid, &rec,
					    &found)) < 0)
		return;
	if (!found || rec.state != MS_MSG_DONE || strcmp(rec.flags, f->flags) == 0)
		return;
	if (rec.dst_uid == 0) {
		ms_warn("%s: folder \"%s\": flags of UID %u changed but its "
			"destination UID is unknown (no UIDPLUS)", w->u->name,
			w->f->rep.source, f->uid);
		return;
	}
	mv_flag_store(w, f->uid, rec.dst_uid, f->flags);
}

static void on_flags_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			   void *ctx)
{
	struct worker *w = ctx;

	if (mv_reply_last(w, "UID FETCH", r, c))
		mv_start_verify(w);
}

void mv_start_flags(struct worker *w)
{
	struct ms_folder_state *st = &w->f->st;

	w->phase = PH_FLAGS;
	w->pending = 1;
	if (w->old_hwm == 0 || w->s_exists == 0) {
		w->pending = 0;
		mv_start_verify(w);
		return;
	}
	if (st->modseq != 0 && w->s_modseq != 0 && !w->s_nomodseq)
		ms_imapc_cmd(w->s, on_flags_reply, w,
			     "UID FETCH 1:%u (UID FLAGS) (CHANGEDSINCE %llu)",
			     w->old_hwm, (unsigned long long)st->modseq);
	else
		ms_imapc_cmd(w->s, on_flags_reply, w, "UID FETCH 1:%u (UID FLAGS)",
			     w->old_hwm);
}
