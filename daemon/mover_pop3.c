/* The mover with a POP3 source: INBOX only, each message tracked by its
 * UIDL, appended to the destination's INBOX and verified there. It uses
 * the job core of mover.c and the fingerprints of mover_intent.c, and must
 * not reach into the IMAP folder copy, verification or rollback. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "mover_internal.h"

/* ---- POP3 source: INBOX only, tracked by UIDL ----
 *
 * One message at a time: RETR into memory (a POP3 reply's size is not known
 * before its end, and an APPEND literal needs it), then the intent is
 * committed, then the APPEND. Reconciliation after a crash pairs open
 * intents with destination messages by size and Message-ID. */

struct pmsg {
	unsigned int n;
	uint64_t size;
	char uidl[72];
	int done;
};

struct pop3_state {
	struct pmsg *msgs;
	size_t nmsgs, cap;
	size_t cur;
	char *buf;
	size_t len, bufcap;
	int pending;
	uint64_t dst_count, dst_bytes;
};

static struct pop3_state *pstate(struct ujob *u)
{
	return (struct pop3_state *)u->dfolders;
}

static void pop3_next(struct ujob *u);

static void pop3_fail_conn(struct ujob *u)
{
	mv_job_fail(u, "source: %s", ms_pop3c_error(u->pop));
}

static void on_pop3_uidl_line(struct ms_pop3c *c, const char *line, size_t len,
			      void *ctx)
{
	struct ujob *u = ctx;
	struct pop3_state *ps = pstate(u);
	unsigned int n;
	char uidl[72];

	if (sscanf(line, "%u %71s", &n, uidl) != 2)
		return;
	if (MS_ARRAY_ROOM(ps->msgs, ps->nmsgs, ps->cap, 64) < 0)
		return;
	memset(&ps->msgs[ps->nmsgs], 0, sizeof(struct pmsg));
	ps->msgs[ps->nmsgs].n = n;
	snprintf(ps->msgs[ps->nmsgs].uidl, sizeof(ps->msgs[0].uidl), "%s", uidl);
	ps->nmsgs++;
}

static void on_pop3_list_line(struct ms_pop3c *c, const char *line, size_t len,
			      void *ctx)
{
	struct pop3_state *ps = pstate(ctx);
	unsigned int n;
	unsigned long long size;

	if (sscanf(line, "%u %llu", &n, &size) != 2)
		return;
	for (size_t i = 0; i < ps->nmsgs; i++)
		if (ps->msgs[i].n == n)
			ps->msgs[i].size = size;
}

static void pop3_step(struct ujob *u);

/* One of the replies the step waits for came: the last one goes on. */
static void pending_done(struct ujob *u)
{
	if (--pstate(u)->pending == 0)
		pop3_step(u);
}

static void on_pop3_reply(struct ms_pop3c *c, int ok, const char *text,
			  void *ctx)
{
	struct ujob *u = ctx;

	if (ok < 0) {
		pop3_fail_conn(u);
		return;
	}
	if (!ok) {
		mv_job_fail(u, "source: -ERR %s", text);
		return;
	}
	pending_done(u);
}

static void on_pop3_dst_reply(struct ms_imapc *c,
			      const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;

	if (!mv_reply_failed(&u->workers[0], "SELECT", r, c))
		pending_done(u);
}

static void on_pop3_dst_untagged(struct ms_imapc *c,
				 const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);
	struct fetch f;

	if (mv_dst_fetch(w, r, &f) < 0)
		return;
	if (w->phase == PH_MATCH) {
		if (!mv_known_dst(w, f.uid))
			mv_match_dst_fetch(w, &f);
	} else if (w->phase == PH_VERIFY_DST && f.has_size) {
		ps->dst_count++;
		ps->dst_bytes += f.size;
	}
}

static void on_pop3_append(struct ms_imapc *c, const struct ms_imap_response *r,
			   void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);
	struct pmsg *pm = &ps->msgs[ps->cur];
	struct ms_store *store = u->m->store;
	struct ms_msg_rec rec;
	uint32_t dst_uid = 0;
	int found = 0;

	if (mv_reply_failed(w, "APPEND", r, c))
		return;
	if (r->code != NULL && strcasecmp(r->code, "APPENDUID") == 0 &&
	    r->code_argc >= 2) {
		uint64_t n;

		if (ms_imap_arg_number(&r->code_args[1], &n) == 0)
			dst_uid = (uint32_t)n;
	}
	if (ms_store_msg_get_uidl(store, w->f->st.id, pm->uidl, &rec,
				  &found) < 0 || !found) {
		mv_job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	rec.state = MS_MSG_DONE;
	rec.dst_uid = dst_uid;
	if (ms_store_begin(store) < 0 ||
	    ms_store_msg_put(store, w->f->st.id, &rec) < 0)
		goto fail;
	w->f->st.msgs++;
	w->f->st.bytes += rec.size;
	if (ms_store_folder_update(store, &w->f->st) < 0 ||
	    ms_store_user_add_progress(store, u->user_id, 1, rec.size) < 0 ||
	    ms_store_commit(store) < 0)
		goto fail;
	pm->done = 1;
	w->f->rep.copied++;
	u->copied++;
	u->bytes += rec.size;
	u->m->msgs_done++;
	u->m->bytes_done += rec.size;
	ps->cur++;
	pop3_next(u);
	return;
fail:
	ms_store_rollback(store);
	mv_job_fail(u, "store: %s", ms_store_error(store));
}

static void on_pop3_retr_line(struct ms_pop3c *c, const char *line, size_t len,
			      void *ctx)
{
	struct pop3_state *ps = pstate(ctx);

	if (ps->len + len > ps->bufcap) {
		size_t cap = (ps->len + len) * 2;
		char *nb = realloc(ps->buf, cap);

		if (nb == NULL)
			return;
		ps->buf = nb;
		ps->bufcap = cap;
	}
	memcpy(ps->buf + ps->len, line, len);
	ps->len += len;
}

static void on_pop3_retr(struct ms_pop3c *c, int ok, const char *text,
			 void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);
	struct pmsg *pm = &ps->msgs[ps->cur];
	struct ms_store *store = u->m->store;
	struct ms_msg_rec rec;
	size_t hdrlen;
	char *end;

	if (ok < 0) {
		pop3_fail_conn(u);
		return;
	}
	if (!ok) {
		mv_job_fail(u, "source: RETR %u: -ERR %s", pm->n, text);
		return;
	}
	memset(&rec, 0, sizeof(rec));
	snprintf(rec.uidl, sizeof(rec.uidl), "%s", pm->uidl);
	rec.state = MS_MSG_INTENT;
	rec.size = ps->len;
	end = ps->len > 0 ? memmem(ps->buf, ps->len, "\r\n\r\n", 4) : NULL;
	hdrlen = end != NULL ? (size_t)(end - ps->buf) + 2 : ps->len;
	mv_extract_msgid(ps->buf, hdrlen, rec.msgid, sizeof(rec.msgid));
	rec.dst_floor = w->d_uidnext != 0 ? w->d_uidnext : 1;
	/* The intent is committed before the bytes leave. */
	if (ms_store_msg_put(store, w->f->st.id, &rec) < 0) {
		mv_job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	if (ms_imapc_append_begin(w->d, on_pop3_append, u, w->f->dst) < 0 ||
	    ms_imapc_append_msg(w->d, "", NULL, ps->len) < 0 ||
	    ms_imapc_append_data(w->d, ps->buf, ps->len) < 0 ||
	    ms_imapc_append_end(w->d) < 0) {
		mv_folder_fail(w, "APPEND", NULL, w->d);
		return;
	}
}

static void on_pop3_verify(struct ms_imapc *c, const struct ms_imap_response *r,
			   void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);
	struct ms_folder_report *rep = &w->f->rep;
	uint64_t missing = 0;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	for (size_t i = 0; i < ps->nmsgs; i++)
		missing += !ps->msgs[i].done;
	rep->source_messages = ps->nmsgs;
	rep->source_bytes = w->f->st.bytes;
	rep->dest_messages = ps->dst_count;
	rep->dest_bytes = ps->dst_bytes;
	rep->verified = missing == 0 && ps->dst_count == w->f->st.msgs &&
			ps->dst_bytes == w->f->st.bytes;
	if (!rep->verified) {
		u->mismatch = 1;
		snprintf(u->error, sizeof(u->error),
			 "INBOX: verification failed: %zu messages on the "
			 "source (%llu not copied), %llu copied, %llu on the "
			 "destination", ps->nmsgs, (unsigned long long)missing,
			 (unsigned long long)w->f->st.msgs,
			 (unsigned long long)ps->dst_count);
	}
	u->folders_done = u->nfolders;
	u->m->folders_done++;
	free(ps->msgs);
	free(ps->buf);
	free(ps);
	u->dfolders = NULL;
	ms_pop3c_free(&u->pop);
	w->state = W_IDLE;
	u->planned = 1;
	mv_job_maybe_finish(u);
}

static void pop3_next(struct ujob *u)
{
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);

	if (u->failed)
		return;
	while (ps->cur < ps->nmsgs && ps->msgs[ps->cur].done)
		ps->cur++;
	if (ps->cur < ps->nmsgs) {
		ps->len = 0;
		ms_pop3c_cmd(u->pop, 1, on_pop3_retr, on_pop3_retr_line, u,
			     "RETR %u", ps->msgs[ps->cur].n);
		return;
	}
	w->phase = PH_VERIFY_DST;
	ps->dst_count = ps->dst_bytes = 0;
	if (mv_store_check(w, ms_store_folder_update(u->m->store, &w->f->st)) < 0)
		return;
	ms_imapc_cmd(w->d, on_pop3_verify, u, "UID FETCH 1:* (UID RFC822.SIZE)");
}

static int pop3_reconcile_one(void *ctx, const struct ms_msg_rec *rec)
{
	struct worker *w = ctx;
	struct ms_store *store = w->u->m->store;
	struct fpent *e = mv_fp_take(w, mv_fingerprint(rec->size, 0, rec->msgid));
	struct ms_msg_rec done = *rec;

	if (e == NULL)
		return ms_store_msg_delete(store, w->f->st.id, 0, rec->uidl);
	done.state = MS_MSG_DONE;
	done.dst_uid = e->uid;
	w->f->st.msgs++;
	w->f->st.bytes += rec->size;
	return ms_store_msg_put(store, w->f->st.id, &done);
}

static void on_pop3_match(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct ms_store *store = u->m->store;

	if (mv_reply_failed(w, "UID FETCH", r, c))
		return;
	/* POP3 has no INTERNALDATE: fingerprints carry date 0. */
	for (size_t i = 0; i < w->nfps; i++)
		w->fps[i].h = w->fps[i].h;
	mv_sort_n(w->fps, w->nfps, sizeof(*w->fps), mv_cmp_fp);
	if (ms_store_begin(store) < 0 ||
	    ms_store_msg_foreach(store, w->f->st.id, MS_MSG_INTENT,
				 pop3_reconcile_one, w) != 0 ||
	    ms_store_folder_update(store, &w->f->st) < 0 ||
	    ms_store_commit(store) < 0) {
		ms_store_rollback(store);
		mv_job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	w->phase = PH_COPY;
	pop3_step(u);
}

struct pop3_done_ctx {
	struct pop3_state *ps;
};

static int pop3_mark_done(void *ctx, const struct ms_msg_rec *rec)
{
	struct pop3_state *ps = ctx;

	for (size_t i = 0; i < ps->nmsgs; i++)
		if (strcmp(ps->msgs[i].uidl, rec->uidl) == 0)
			ps->msgs[i].done = 1;
	return 0;
}

static void pop3_step(struct ujob *u)
{
	struct worker *w = &u->workers[0];
	struct ms_store *store = u->m->store;
	struct ms_folder_state *st = &w->f->st;
	uint64_t pending = 0;

	if (u->failed)
		return;
	if (w->phase == PH_OPEN) {
		if (ms_store_folder_get(store, u->user_id, w->f->src, st) < 0) {
			mv_job_fail(u, "store: %s", ms_store_error(store));
			return;
		}
		if (st->dst_uidvalidity != 0 &&
		    st->dst_uidvalidity != w->d_uidvalidity) {
			ms_warn("%s: destination INBOX UIDVALIDITY changed; "
				"starting over by UIDL", u->name);
			if (mv_store_check(w, ms_store_folder_reset(store, st->id)) < 0)
				return;
			st->msgs = st->bytes = 0;
		}
		st->dst_uidvalidity = w->d_uidvalidity;
		snprintf(st->dst_name, sizeof(st->dst_name), "%s", w->f->dst);
		if (mv_store_check(w, ms_store_folder_update(store, st)) < 0 ||
		    mv_store_check(w, ms_store_msg_count(store, st->id,
						      MS_MSG_INTENT,
						      &pending)) < 0)
			return;
		u->m->msgs_todo += pstate(u)->nmsgs > st->msgs ?
			pstate(u)->nmsgs - st->msgs : 0;
		if (pending > 0) {
			uint32_t floor = 0;
			struct known_ctx k = { 0 };

			w->phase = PH_MATCH;
			ms_store_msg_foreach(store, st->id, MS_MSG_INTENT,
					     mv_min_floor, &floor);
			if (floor == 0)
				floor = 1;
			k.floor = floor;
			ms_store_msg_foreach(store, st->id, MS_MSG_DONE,
					     mv_collect_known, &k);
			ms_u32vec_sort(&k.uids);
			ms_u32vec_free(&w->known);
			w->known = k.uids;
			w->nfps = 0;
			ms_imapc_cmd(w->d, on_pop3_match, u,
				     "UID FETCH %u:* (UID RFC822.SIZE "
				     "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
				     floor);
			return;
		}
		w->phase = PH_COPY;
	}
	if (ms_store_msg_foreach(store, st->id, MS_MSG_DONE, pop3_mark_done,
				 pstate(u)) != 0) {
		mv_job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	pop3_next(u);
}

static void pop3_maybe_begin(struct ujob *u)
{
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);

	if (!w->s_ready || !w->d_ready)
		return;
	w->phase = PH_OPEN;
	w->state = W_BUSY;
	ms_imapc_set_untagged(w->d, on_pop3_dst_untagged, u);
	ps->pending = 3;
	ms_imapc_cmd(w->d, on_pop3_dst_reply, u, "SELECT \"INBOX\"");
	ms_pop3c_cmd(u->pop, 1, on_pop3_reply, on_pop3_uidl_line, u, "UIDL");
	ms_pop3c_cmd(u->pop, 1, on_pop3_reply, on_pop3_list_line, u, "LIST");
}

/* One side logged in (or failed): the copy begins once both are. */
static void side_ready(struct ujob *u, const char *side, const char *error,
		       int *ready)
{
	if (error != NULL) {
		mv_job_fail(u, "%s: %s", side, error);
		return;
	}
	*ready = 1;
	pop3_maybe_begin(u);
}

static void on_pop3_ready(struct ms_pop3c *c, const char *error, void *ctx)
{
	struct ujob *u = ctx;

	side_ready(u, "source", error, &u->workers[0].s_ready);
}

static void on_pop3_dst_ready(struct ms_imapc *c, const char *error, void *ctx)
{
	struct ujob *u = ctx;

	side_ready(u, "destination", error, &u->workers[0].d_ready);
}

/* A side's connection slot is taken: the settings to connect with. */
static struct ms_imapc_settings slot_taken(struct ujob *u, int dst)
{
	struct worker *w = &u->workers[0];

	if (dst) {
		w->have_dst_slot = 1;
		return mv_server_settings(&u->m->dst, u->dst_login, u->dst_pw);
	}
	w->have_src_slot = 1;
	return mv_server_settings(&u->m->src, u->src_login, u->src_pw);
}

static void pop3_connect_dst(void *ctx)
{
	struct ujob *u = ctx;
	struct ms_imapc_settings set = slot_taken(u, 1);

	u->workers[0].d = ms_imapc_new(u->m->loop, &set, on_pop3_dst_ready, u);
	if (u->workers[0].d == NULL)
		mv_job_fail(u, "out of memory");
	else
		ms_imapc_set_gate(u->workers[0].d, mv_gate, u);
}

static void pop3_connect_src(void *ctx)
{
	struct ujob *u = ctx;
	struct server *s = &u->m->src;
	struct ms_imapc_settings set = slot_taken(u, 0);

	u->pop = ms_pop3c_new(u->m->loop, &set, on_pop3_ready, u);
	if (u->pop != NULL)
		ms_pop3c_set_gate(u->pop, mv_gate, u);
	if (u->pop == NULL) {
		mv_job_fail(u, "source: cannot connect to %s:%u", s->cfg.host,
			    s->cfg.port);
		return;
	}
	mv_slot_wait(u, &u->m->dst, pop3_connect_dst, u);
}

void mv_pop3_start(struct ujob *u)
{
	struct worker *w = &u->workers[0];
	struct fjob *f;

	u->folders = calloc(1, sizeof(*u->folders));
	u->dfolders = calloc(1, sizeof(struct pop3_state) > sizeof(struct dfolder) ?
			     sizeof(struct pop3_state) : sizeof(struct dfolder));
	if (u->folders == NULL || u->dfolders == NULL) {
		mv_job_fail(u, "out of memory");
		return;
	}
	u->nfolders = 1;
	f = &u->folders[0];
	snprintf(f->src, sizeof(f->src), "pop3:INBOX");
	snprintf(f->dst, sizeof(f->dst), "INBOX");
	snprintf(f->rep.source, sizeof(f->rep.source), "INBOX");
	snprintf(f->rep.destination, sizeof(f->rep.destination), "INBOX");
	f->selected_by_plan = 1;
	u->m->folders++;
	memset(w, 0, sizeof(*w));
	w->u = u;
	w->f = f;
	w->state = W_CONNECTING;
	u->nworkers = 1;
	mv_slot_wait(u, &u->m->src, pop3_connect_src, u);
}
