/* The mover: see mover.h and docs/mover.md.
 *
 * One user job per user. Each job has up to max_conns workers; a worker is a
 * pair of logged-in connections (source, destination) that syncs one folder
 * at a time. Worker 0's connections also do the job's planning (LIST,
 * STATUS, CREATE, SUBSCRIBE).
 *
 * Per folder:
 *   open     EXAMINE source (CONDSTORE), SELECT destination (APPEND into a
 *            selected folder is far cheaper on Dovecot's maildir)
 *   match    only after a crash, a UIDVALIDITY change or into a non-empty
 *            unknown destination: pair messages by fingerprint (size, date,
 *            Message-ID) so that nothing is appended twice
 *   copy     windows of `batch` messages: metadata FETCH -> intents
 *            committed -> BODY.PEEK[] FETCH streamed into one MULTIAPPEND ->
 *            APPENDUID -> done, high-water mark advanced, committed.
 *            Window k+1's metadata is fetched while window k streams.
 *   flags    flag changes of messages copied in earlier runs
 *            (CHANGEDSINCE when CONDSTORE is there) -> UID STORE
 *   verify   messages gone from the source are expunged on the
 *            destination (UID EXPUNGE); then count, size sum and flags of
 *            both sides are compared, and each copy with its source
 *            message (size, flags; with verify_content the bytes'
 *            SHA-256). Copies found different are mended once (flags
 *            set, copied again) and the folder verified again; what still
 *            differs fails the user. verify_only: compare, write nothing.
 *
 * A rollback (ms_mover_add_rollback) runs the same machinery the other way
 * round: its workers read from the destination (w->s) and write to the
 * source (w->d). Per folder: open, reconcile open rollback intents, scan
 * (flags set and expunges carried over to the source, new destination
 * messages listed), copy those, verify. See mover_rollback.c.
 *
 * The files: this one holds the core (jobs, workers, connection slots,
 * FETCH parsing, the API of mover.h); planning is mover_plan.c, open, copy
 * and flags mover_copy.c, match, reconciliation and de-duplication
 * mover_intent.c, verify and repair mover_verify.c, the rollback's own
 * parts mover_rollback.c and a POP3 source mover_pop3.c. What they share is
 * in mover_internal.h. The core must not take in a phase of the work on a
 * folder: each has its file.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "mover_internal.h"

static void worker_start(struct ujob *u, unsigned int idx);

/* ---- small helpers ---- */

/* qsort() that may be given nothing: qsort(NULL, 0, ...) is undefined
 * behaviour (UBSan stops on it). */
void mv_sort_n(void *base, size_t n, size_t size,
	       int (*cmp)(const void *, const void *))
{
	if (n > 1)
		qsort(base, n, size, cmp);
}

static uint64_t now_ms(void)
{
	return uv_hrtime() / 1000000;
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
	const unsigned char *p = data;

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

uint64_t mv_fingerprint(uint64_t size, int64_t date, const char *msgid)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	h = fnv1a(h, &size, sizeof(size));
	h = fnv1a(h, &date, sizeof(date));
	return fnv1a(h, msgid, strlen(msgid));
}

uint64_t mv_flags_hash(const char *flags)
{
	uint64_t h = fnv1a(0xcbf29ce484222325ULL, flags, strlen(flags));

	/* Mix, so that a sum over messages is a good multiset hash. */
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	return h;
}

void mv_to_utf8(char *out, size_t outsz, const char *mutf7, char sep)
{
	char *u = ms_mutf7_to_utf8(mutf7);

	snprintf(out, outsz, "%s", u != NULL ? u : mutf7);
	free(u);
	(void)sep;
}

/* The connections of a worker by server (struct worker: s is read from, d
 * written to). */
struct ms_imapc *mv_src_conn(const struct worker *w)
{
	return w->u->reverse ? w->d : w->s;
}

struct ms_imapc *mv_dst_conn(const struct worker *w)
{
	return w->u->reverse ? w->s : w->d;
}

const char *mv_side_name(const struct worker *w, const struct ms_imapc *c)
{
	return c == mv_src_conn(w) ? "source" : "destination";
}

/* A record's UID on the side written to. */
uint32_t mv_rec_wr_uid(const struct ujob *u, const struct ms_msg_rec *rec)
{
	return u->reverse ? rec->src_uid : rec->dst_uid;
}

int mv_name_eq(const char *a, const char *b)
{
	/* INBOX is INBOX in any case (RFC 3501 5.1) */
	if (strcasecmp(a, "INBOX") == 0)
		return strcasecmp(b, "INBOX") == 0;
	return strcmp(a, b) == 0;
}

void mv_u32vec_uniq(struct ms_u32vec *vec)
{
	size_t n = 0;

	ms_u32vec_sort(vec);
	for (size_t i = 0; i < vec->n; i++)
		if (n == 0 || vec->v[n - 1] != vec->v[i])
			vec->v[n++] = vec->v[i];
	vec->n = n;
}

/* ---- connection slots per server ---- */

/* 1: a slot is taken; 0: cb(ctx) is called when one frees; -1: out of
 * memory. */
static int slot_acquire(struct server *s, struct ujob *u, void (*cb)(void *),
			void *ctx)
{
	struct waiter *wt;

	/* Behind those already waiting: first come, first served. */
	if (s->active < s->cfg.max_conns && s->waiters == NULL) {
		s->active++;
		return 1;
	}
	wt = calloc(1, sizeof(*wt));
	if (wt == NULL)
		return -1;
	wt->u = u;
	wt->cb = cb;
	wt->ctx = ctx;
	MS_LIST_APPEND(s->waiters, s->waiters_tail, wt);
	return 0;
}

/* Calls cb(ctx) once the job has a connection slot at the server: now,
 * or when one frees. The job fails when out of memory. */
void mv_slot_wait(struct ujob *u, struct server *s, void (*cb)(void *),
		  void *ctx)
{
	int r = slot_acquire(s, u, cb, ctx);

	if (r == 1)
		cb(ctx);
	else if (r < 0)
		mv_job_fail(u, "out of memory");
}

static void slot_cancel(struct server *s, void *ctx)
{
	struct waiter **pp = &s->waiters, *prev = NULL;

	while (*pp != NULL) {
		struct waiter *wt = *pp;

		if (wt->ctx == ctx) {
			*pp = wt->next;
			if (s->waiters_tail == wt)
				s->waiters_tail = prev;
			free(wt);
			continue;
		}
		prev = wt;
		pp = &wt->next;
	}
}

/* The first waiter gets a slot (taken for it already). */
static void slot_grant(struct server *s)
{
	struct waiter *wt = s->waiters;

	s->waiters = wt->next;
	if (s->waiters == NULL)
		s->waiters_tail = NULL;
	wt->cb(wt->ctx);
	free(wt);
}

static void slot_release(struct server *s)
{
	/* The slot passes straight to the first waiter, unless the cap was
	 * lowered below what is open: then it is given back. */
	if (s->waiters == NULL || s->active > s->cfg.max_conns) {
		s->active--;
		return;
	}
	slot_grant(s);
}

int ms_mover_src_slot_try(struct ms_mover *m, struct ms_pacer **pacer_r)
{
	struct server *s = &m->src;

	if (s->active >= s->cfg.max_conns || s->waiters != NULL)
		return 0;
	s->active++;
	*pacer_r = s->pacer;
	return 1;
}

void ms_mover_src_slot_put(struct ms_mover *m)
{
	slot_release(&m->src);
}

/* The cap was raised: waiters get the new slots. */
static void slot_grant_more(struct server *s)
{
	while (s->waiters != NULL && s->active < s->cfg.max_conns) {
		s->active++;
		slot_grant(s);
	}
}

/* 1 when the next slot of the server goes to another user than u. */
static int slot_wanted_elsewhere(const struct server *s, const struct ujob *u)
{
	return s->waiters != NULL && s->waiters->u != u;
}

/* ---- FETCH response parsing ---- */

void mv_extract_msgid(const char *hdr, size_t len, char *out, size_t outsz)
{
	size_t pos = 0, i = 0;

	out[0] = '\0';
	/* "Message-ID:" header, possibly folded; the value is kept trimmed
	 * with folding removed. */
	while (i < len) {
		size_t eol = i;

		while (eol < len && hdr[eol] != '\n')
			eol++;
		if (eol - i > 11 && strncasecmp(hdr + i, "message-id:", 11) == 0) {
			size_t j = i + 11;

			for (;;) {
				for (; j < len && hdr[j] != '\n'; j++) {
					char ch = hdr[j];

					if (ch == '\r' || ((ch == ' ' || ch == '\t') &&
							   pos == 0))
						continue;
					if (pos + 1 < outsz)
						out[pos++] = ch;
				}
				/* continuation line? */
				if (j + 1 < len && (hdr[j + 1] == ' ' ||
						    hdr[j + 1] == '\t')) {
					j++;
					continue;
				}
				break;
			}
			while (pos > 0 && (out[pos - 1] == ' ' || out[pos - 1] == '\t'))
				pos--;
			out[pos] = '\0';
			return;
		}
		i = eol + 1;
	}
}

static void join_flags(const struct ms_imap_arg *list, char *out, size_t outsz)
{
	char raw[4096];
	size_t pos = 0;

	raw[0] = '\0';
	for (unsigned int i = 0; i < list->list_count; i++) {
		const char *s = ms_imap_arg_str(&list->list[i]);
		size_t l;

		if (s == NULL)
			continue;
		l = strlen(s);
		if (pos + l + 2 >= sizeof(raw))
			break;
		if (pos > 0)
			raw[pos++] = ' ';
		memcpy(raw + pos, s, l);
		pos += l;
		raw[pos] = '\0';
	}
	if (ms_flags_normalize(raw, out, outsz) < 0)
		out[0] = '\0';
}

/* Returns 0 for a FETCH response, -1 otherwise. */
int mv_parse_fetch(const struct ms_imap_response *r, struct fetch *f)
{
	const struct ms_imap_arg *list;
	uint64_t n;

	if (r->kind != MS_RESP_UNTAGGED || r->argc < 3 ||
	    !ms_imap_arg_is(&r->args[1], "FETCH") ||
	    r->args[2].type != MS_ARG_LIST ||
	    ms_imap_arg_number(&r->args[0], &n) < 0)
		return -1;
	memset(f, 0, sizeof(*f));
	f->seq = (uint32_t)n;
	list = &r->args[2];
	for (unsigned int i = 0; i + 1 < list->list_count; i += 2) {
		const struct ms_imap_arg *k = &list->list[i], *v = &list->list[i + 1];
		const char *name = ms_imap_arg_str(k);

		if (name == NULL)
			continue;
		if (strcasecmp(name, "UID") == 0 &&
		    ms_imap_arg_number(v, &n) == 0 && n > 0 && n <= UINT32_MAX) {
			f->uid = (uint32_t)n;
			f->has_uid = 1;
		} else if (strcasecmp(name, "RFC822.SIZE") == 0 &&
			   ms_imap_arg_number(v, &n) == 0) {
			f->size = n;
			f->has_size = 1;
		} else if (strcasecmp(name, "FLAGS") == 0 &&
			   v->type == MS_ARG_LIST) {
			join_flags(v, f->flags, sizeof(f->flags));
			f->has_flags = 1;
		} else if (strcasecmp(name, "INTERNALDATE") == 0 &&
			   ms_imap_arg_str(v) != NULL) {
			f->date = ms_imap_arg_str(v);
			f->has_date = 1;
		} else if (strncasecmp(name, "BODY[HEADER.FIELDS", 18) == 0) {
			const char *s = ms_imap_arg_str(v);

			if (s != NULL)
				mv_extract_msgid(s, v->len, f->msgid,
						 sizeof(f->msgid));
			f->has_msgid = 1;
		} else if (strcasecmp(name, "BODY[]") == 0) {
			f->has_body = 1;
		}
	}
	return 0;
}

/* Parses an IMAP sequence set of UIDs ("3:5,9") into out (cap entries).
 * Returns the count, or -1 when malformed or too many. */
long mv_parse_uid_set(const char *s, uint32_t *out, size_t cap)
{
	size_t n = 0;

	while (*s != '\0') {
		char *e;
		unsigned long a = strtoul(s, &e, 10), b;

		if (e == s || a == 0 || a > UINT32_MAX)
			return -1;
		b = a;
		if (*e == ':') {
			s = e + 1;
			b = strtoul(s, &e, 10);
			if (e == s || b == 0 || b > UINT32_MAX)
				return -1;
		}
		if (a > b) {
			unsigned long t = a;

			a = b;
			b = t;
		}
		if (b - a + 1 > cap - n)
			return -1;
		for (unsigned long x = a; x <= b; x++)
			out[n++] = (uint32_t)x;
		if (*e == ',')
			e++;
		else if (*e != '\0')
			return -1;
		s = e;
	}
	return (long)n;
}

/* ---- job failure and end ---- */

static void worker_close(struct worker *w)
{
	struct ms_mover *m = w->u->m;
	struct window *win, *next;

	ms_imapc_free(&w->s);
	ms_imapc_free(&w->d);
	mv_id_cancel(w);
	if (w->settle != NULL) {
		w->settle->w = NULL;
		w->settle = NULL;
	}
	if (w->have_src_slot)
		slot_release(&m->src);
	if (w->have_dst_slot)
		slot_release(&m->dst);
	w->have_src_slot = w->have_dst_slot = 0;
	slot_cancel(&m->src, w);
	slot_cancel(&m->dst, w);
	for (struct window **lists[] = { &w->meta, &w->ready, &w->body,
					 &w->appends }, **const *l = lists;
	     l < lists + 4; l++) {
		for (win = **l; win != NULL; win = next) {
			next = win->next;
			mv_window_free(win);
		}
		**l = NULL;
	}
	free(w->fps);
	w->fps = NULL;
	free(w->rrecs);
	w->rrecs = NULL;
	w->nrrecs = w->caprrecs = 0;
	ms_u32vec_free(&w->known);
	ms_u32vec_free(&w->src_uids);
	ms_u32vec_free(&w->expunge);
	ms_u32vec_free(&w->dst_uids);
	ms_u32vec_free(&w->vanished);
	ms_u32vec_free(&w->todo);
	mv_verify_free(w);
	w->state = W_DONE;
}

void mv_job_fail(struct ujob *u, const char *fmt, ...)
{
	va_list ap;

	if (u->failed || u->finished)
		return;
	u->failed = 1;
	va_start(ap, fmt);
	vsnprintf(u->error, sizeof(u->error), fmt, ap);
	va_end(ap);
	/* Nothing already committed is undone: the store keeps every done
	 * message and every open intent for the next run to reconcile. */
	for (unsigned int i = 0; i < u->nworkers; i++)
		worker_close(&u->workers[i]);
	mv_job_maybe_finish(u);
}

static void job_free(struct ujob *u)
{
	ms_secret_free(&u->src_pw);
	ms_secret_free(&u->dst_pw);
	free(u->name);
	free(u->src_login);
	free(u->dst_login);
	free(u->folders);
	free(u->dfolders);
	free(u);
}

static void job_finish_async(uv_handle_t *h)
{
	free(h);
}

/* One line per user at its end: where its wall time went (ms). */
static void log_phases(const struct ujob *u, const struct ms_user_report *rep)
{
	char buf[300];
	size_t pos = 0;

	for (int p = 0; p < MS_PH_N && pos < sizeof(buf); p++)
		pos += (size_t)snprintf(buf + pos, sizeof(buf) - pos, "%s%s %llu",
					p > 0 ? ", " : "", ms_mover_phase_names[p],
					(unsigned long long)rep->phase_ms[p]);
	ms_info("%s: phases (ms): %s; wall %.0f", u->name, buf,
		rep->seconds * 1000);
}

static void job_report(uv_timer_t *t)
{
	struct ujob *u = t->data;
	struct ms_mover *m = u->m;
	struct ms_user_report rep;
	struct ms_folder_report *fr;
	uint64_t now;

	memset(&rep, 0, sizeof(rep));
	fr = calloc(u->nfolders + 1, sizeof(*fr));
	rep.user = u->name;
	rep.rollback = u->reverse;
	rep.verify_only = m->verify_only;
	rep.ok = !u->failed && !u->mismatch;
	rep.mismatch = u->mismatch;
	rep.error = rep.ok ? NULL : u->error;
	rep.copied = u->copied;
	rep.bytes = u->bytes;
	rep.flags_updated = u->flags_updated;
	rep.expunged = u->expunged;
	rep.repaired = u->repaired;
	now = uv_hrtime();
	mv_ph_charge(u, now);
	rep.seconds = (double)(now - u->start_ns) / 1e9;
	for (int p = 0; p < MS_PH_N; p++)
		rep.phase_ms[p] = u->ph_ns[p] / 1000000;
	log_phases(u, &rep);
	for (unsigned int i = 0; fr != NULL && i < u->nfolders; i++) {
		if (!u->folders[i].selected_by_plan &&
		    !u->folders[i].rep.dst_deleted)
			continue;
		fr[rep.nfolders++] = u->folders[i].rep;
	}
	rep.folders = fr;
	if (u->user_id == 0 || m->verify_only) {
		/* a rollback refused before it began, or a verification
		 * only: the store is as it was */
	} else if (rep.ok && m->caller_flips) {
		/* The caller writes the state it flips to: one written here
		 * first ("source") is what a crash before that write would
		 * leave of a cutover. */
	} else if (!u->reverse || rep.ok) {
		int st = rep.ok ? MS_USER_SOURCE : MS_USER_FAILED;

		ms_store_user_set_state(m->store, u->user_id,
					ms_user_state_names[st], rep.error);
	} else {
		/* A failed rollback leaves the mail where it is whole: on the
		 * destination. The state stays; the error is kept. */
		struct ms_user_info info;
		int found = 0;

		if (ms_store_user_info(m->store, u->name, &info, &found) == 0 &&
		    found)
			ms_store_user_set_state(m->store, u->user_id, info.state,
						rep.error);
	}
	m->users_done++;
	/* Unlink before the callback: it may free the mover. */
	for (struct ujob **pp = &m->jobs; *pp != NULL; pp = &(*pp)->next) {
		if (*pp == u) {
			*pp = u->next;
			break;
		}
	}
	if (u->done != NULL)
		u->done(&rep, u->done_ctx);
	free(fr);
	job_free(u);
	uv_close((uv_handle_t *)t, job_finish_async);
}

void mv_job_maybe_finish(struct ujob *u)
{
	uv_timer_t *t;

	if (u->finished || u->timers > 0)
		return;
	if (!u->failed) {
		if (u->pop != NULL || u->planned != 1 ||
		    u->folders_done < u->nfolders)
			return;
		for (unsigned int i = 0; i < u->nworkers; i++)
			if (u->workers[i].state == W_BUSY)
				return;
	}
	u->finished = 1;
	for (unsigned int i = 0; i < u->nworkers; i++)
		worker_close(&u->workers[i]);
	ms_pop3c_free(&u->pop);
	/* Report from a fresh stack: we may be deep inside a callback of a
	 * connection that was just freed. */
	t = malloc(sizeof(*t));
	if (t == NULL)
		return;
	uv_timer_init(u->m->loop, t);
	t->data = u;
	uv_timer_start(t, job_report, 0, 0);
}

static int transient(const char *error)
{
	static const char *const words[] = {
		"closed by server", "read error", "write error", "reset",
		"no reply from the server", "broken pipe",
	};

	for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
		if (strstr(error, words[i]) != NULL)
			return 1;
	return 0;
}

struct retry_timer {
	uv_timer_t timer;
	struct ujob *u;
	unsigned int idx;
};

static void on_retry_timer(uv_timer_t *t)
{
	struct retry_timer *rt = (struct retry_timer *)t;
	struct ujob *u = rt->u;

	u->timers--;
	ms_close_free((uv_handle_t *)t, rt);
	if (u->failed || u->finished) {
		mv_job_maybe_finish(u);
		return;
	}
	worker_start(u, rt->idx);
}

/* The worker's connections are closed; it starts again after delay ms. */
static int worker_restart_later(struct worker *w, uint64_t delay)
{
	struct ujob *u = w->u;
	struct retry_timer *rt = calloc(1, sizeof(*rt));

	if (rt == NULL)
		return -1;
	worker_close(w);
	w->f = NULL;
	rt->u = u;
	rt->idx = w->idx;
	uv_timer_init(u->m->loop, &rt->timer);
	uv_timer_start(&rt->timer, on_retry_timer, delay, 0);
	u->timers++;
	return 0;
}

/* Why a folder is given back to be opened again (folder_retry()). */
enum retry_why {
	RETRY_LOST,		/* the connection went away */
	RETRY_BUSY,		/* the server refused a command as busy */
	RETRY_REOPEN,		/* the side read from refused or ended a
				   command of an open folder */
};

/* The connection of a worker went away in the middle of a folder, a
 * server refused one of its commands as busy (the wait grows, see
 * pacer.h; imapc.c sends such a command again itself only when nothing
 * else was in flight), or the folder may have changed under the mover
 * (folder_reopen()): the store has everything that was committed, so the
 * folder is simply given back and the worker reconnects after a pause.
 * At most MAX_RETRIES times a folder: one that keeps failing fails the
 * user. */
static int folder_retry(struct worker *w, const char *error,
			enum retry_why why)
{
	struct ujob *u = w->u;
	struct fjob *f = w->f;
	uint64_t delay = why == RETRY_BUSY ?
		ms_pacer_retry_delay(f->retries + 1) : RETRY_DELAY_MS;

	if (u->failed || f->retries >= MAX_RETRIES ||
	    (why == RETRY_LOST && !transient(error)) || delay == 0 ||
	    u->m->src.cfg.proto != MS_PROTO_IMAP)
		return -1;
	ms_warn("%s: folder \"%s\": %s; reconnecting (retry %u of %u)",
		u->name, f->rep.source, error, f->retries + 1, MAX_RETRIES);
	if (worker_restart_later(w, delay) < 0)
		return -1;
	f->retries++;
	f->taken = 0;
	snprintf(f->rep.error, sizeof(f->rep.error), "%s", error);
	snprintf(u->conn_error, sizeof(u->conn_error), "folder \"%s\": %s",
		 f->rep.source, error);
	mv_job_schedule(u);
	return 0;
}

/* A command to the side read from failed after the folder was opened:
 * Dovecot ends the session ("Mailbox was deleted under us") or refuses
 * the FETCH ("Internal error occurred") when the folder is deleted and
 * made again while it is read. Only opening it again tells: on new
 * connections, as after a lost connection, where a new UIDVALIDITY is
 * met as on any later run (docs/mover.md, "A source folder recreated
 * mid-copy"). 0 when the folder was given back. */
static int folder_reopen(struct worker *w, const char *cmd,
			 const struct ms_imap_response *r, struct ms_imapc *c)
{
	char buf[400], text[300];

	if (c == NULL || c != w->s || w->phase == PH_OPEN)
		return -1;
	if (r == NULL) {
		if (!ms_imapc_failed(c) ||
		    strstr(ms_imapc_error(c), "server said BYE") == NULL)
			return -1;
		return folder_retry(w, ms_imapc_error(c), RETRY_REOPEN);
	}
	if (r->status != MS_STATUS_NO)
		return -1;
	snprintf(buf, sizeof(buf), "%s: %s", cmd,
		 ms_imapc_resp_summary(r, text, sizeof(text)));
	return folder_retry(w, buf, RETRY_REOPEN);
}

/* A login the server refused as busy: the worker logs in again later,
 * with a longer wait each time, a few times (pacer.h); 1 when it will. */
static int login_retry(struct worker *w, struct ms_imapc *c,
		       const char *error)
{
	struct ujob *u = w->u;
	uint64_t delay = ms_pacer_retry_delay(u->login_tries + 1);

	if (!ms_imapc_busy_refused(c) || delay == 0 || u->failed)
		return 0;
	ms_warn("%s: %s: %s; logging in again in %llu ms (retry %u of %u)",
		u->name, mv_side_name(w, c), error, (unsigned long long)delay,
		u->login_tries + 1, MS_PACER_RETRIES);
	if (worker_restart_later(w, delay) < 0)
		return 0;
	u->login_tries++;
	return 1;
}

/* An idle worker gives its connections back when the cap was lowered
 * below what is open, or when another user waits for a slot and this one
 * has another worker to go on with: one budget, shared by the users. */
static int worker_surplus(const struct worker *w, unsigned int live)
{
	const struct ms_mover *m = w->u->m;

	if (m->src.active > m->src.cfg.max_conns ||
	    m->dst.active > m->dst.cfg.max_conns)
		return 1;
	return live > 1 && (slot_wanted_elsewhere(&m->src, w->u) ||
			    slot_wanted_elsewhere(&m->dst, w->u));
}

/* Hands folders nobody has to idle workers, retires workers whose
 * connections died while they were idle or that are surplus
 * (worker_surplus()), and fails the job when folders are left that no
 * worker (nor a pending reconnect) can take. */
void mv_job_schedule(struct ujob *u)
{
	unsigned int live = u->timers, left = 0, nlive = 0;
	int gave_back = -1;

	if (u->failed || u->finished || u->planned != 1)
		return;
	for (unsigned int i = 0; i < u->nworkers; i++)
		nlive += u->workers[i].state != W_DONE;
	for (unsigned int i = 0; i < u->nworkers; i++) {
		struct worker *w = &u->workers[i];

		if (w->state == W_IDLE && worker_surplus(w, nlive)) {
			worker_close(w);
			nlive--;
			gave_back = (int)i;
		}

		if (w->state == W_IDLE && (ms_imapc_failed(w->s) ||
					   ms_imapc_failed(w->d))) {
			struct ms_imapc *c = ms_imapc_failed(w->s) ? w->s : w->d;

			snprintf(u->conn_error, sizeof(u->conn_error), "%s: %s",
				 mv_side_name(w, c), ms_imapc_error(c));
			worker_close(w);
		}
		if (w->state == W_IDLE)
			mv_worker_next_folder(w);
		if (u->failed)
			return;
		if (w->state != W_DONE)
			live++;
	}
	for (unsigned int i = 0; i < u->nfolders; i++)
		left += u->folders[i].selected_by_plan && !u->folders[i].taken;
	if (left > 0 && live == 0 && gave_back >= 0) {
		/* its last connections went back to a lowered cap: it waits
		 * for a slot again, behind the others */
		worker_start(u, (unsigned int)gave_back);
		return;
	}
	if (left > 0 && live == 0)
		mv_job_fail(u, "%s", u->conn_error[0] != '\0' ? u->conn_error :
			    "no connection left to copy with");
	else
		mv_job_maybe_finish(u);
}

void mv_folder_fail(struct worker *w, const char *cmd,
		    const struct ms_imap_response *r, struct ms_imapc *c)
{
	char buf[400];
	char name[1024];

	if (r == NULL && c != NULL && ms_imapc_failed(c) &&
	    folder_retry(w, ms_imapc_error(c), RETRY_LOST) == 0)
		return;
	if (r != NULL && r->status == MS_STATUS_NO &&
	    ms_pacer_is_busy_reply(r->code, r->text)) {
		snprintf(buf, sizeof(buf), "%s: %s", cmd,
			 ms_imapc_resp_summary(r, name, sizeof(name)));
		if (folder_retry(w, buf, RETRY_BUSY) == 0)
			return;
	}
	if (folder_reopen(w, cmd, r, c) == 0)
		return;
	mv_to_utf8(name, sizeof(name), w->f->src, 0);
	if (r == NULL)
		mv_job_fail(w->u, "folder \"%s\": %s", name,
			    c != NULL ? ms_imapc_error(c) : cmd);
	else
		mv_job_fail(w->u, "folder \"%s\": %s: %s", name, cmd,
			    ms_imapc_resp_summary(r, buf, sizeof(buf)));
}

/* A command's reply: 1 when the command failed, and the folder with it
 * (mv_folder_fail()); 0 when it is OK. */
int mv_reply_failed(struct worker *w, const char *cmd,
		    const struct ms_imap_response *r, struct ms_imapc *c)
{
	if (r != NULL && r->status == MS_STATUS_OK)
		return 0;
	mv_folder_fail(w, cmd, r, c);
	return 1;
}

/* One of w->pending replies: 1 when it is the last and every one was OK,
 * 0 when more are to come or it failed (see mv_reply_failed()). (A reply
 * that may come after the count ran out, as mv_on_match_src_reply() called
 * by a flag STORE's, counts with "--w->pending > 0" instead.) */
int mv_reply_last(struct worker *w, const char *cmd,
		  const struct ms_imap_response *r, struct ms_imapc *c)
{
	if (mv_reply_failed(w, cmd, r, c))
		return 0;
	return --w->pending == 0;
}

int mv_store_check(struct worker *w, int ret)
{
	if (ret < 0)
		mv_job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
	return ret;
}

/* ---- untagged responses ---- */

void mv_select_data(const struct ms_imap_response *r, uint32_t *uidvalidity,
		    uint32_t *uidnext, uint32_t *exists, uint64_t *modseq,
		    int *nomodseq)
{
	uint64_t n;

	if (r->status == MS_STATUS_OK && r->code != NULL) {
		if (strcasecmp(r->code, "UIDVALIDITY") == 0 && r->code_argc >= 1 &&
		    ms_imap_arg_number(&r->code_args[0], &n) == 0)
			*uidvalidity = (uint32_t)n;
		else if (strcasecmp(r->code, "UIDNEXT") == 0 && r->code_argc >= 1 &&
			 ms_imap_arg_number(&r->code_args[0], &n) == 0)
			*uidnext = (uint32_t)n;
		else if (modseq != NULL &&
			 strcasecmp(r->code, "HIGHESTMODSEQ") == 0 &&
			 r->code_argc >= 1 &&
			 ms_imap_arg_number(&r->code_args[0], &n) == 0)
			*modseq = n;
		else if (nomodseq != NULL && strcasecmp(r->code, "NOMODSEQ") == 0)
			*nomodseq = 1;
		return;
	}
	if (r->status == MS_STATUS_NONE && r->argc >= 2 &&
	    ms_imap_arg_is(&r->args[1], "EXISTS") &&
	    ms_imap_arg_number(&r->args[0], &n) == 0)
		*exists = (uint32_t)n;
}

/* ---- workers: connections ---- */

static void worker_connect_src(void *ctx);
static void worker_connect_dst(void *ctx);

static void on_worker_ready(struct ms_imapc *c, const char *error, void *ctx)
{
	struct worker *w = ctx;
	struct ujob *u = w->u;

	if (error != NULL) {
		snprintf(u->conn_error, sizeof(u->conn_error), "%s: %s",
			 mv_side_name(w, c), error);
		if (login_retry(w, c, error))
			return;
		if (u->planned != 1) {
			mv_job_fail(u, "%s", u->conn_error);
			return;
		}
		/* A connection that cannot be made is not fatal while other
		 * workers can carry on; mv_job_schedule() decides. */
		ms_warn("%s: %s: connection failed: %s", u->name,
			mv_side_name(w, c), error);
		worker_close(w);
		mv_job_schedule(u);
		return;
	}
	if (c == w->s)
		w->s_ready = 1;
	else
		w->d_ready = 1;
	if (!w->s_ready || !w->d_ready)
		return;
	mv_worker_hooks(w);
	if (u->planned != 1) {
		mv_plan_step(u);
		return;
	}
	ms_imapc_set_untagged(w->s, mv_on_src_untagged, w);
	ms_imapc_set_untagged(w->d, mv_on_dst_untagged, w);
	w->state = W_IDLE;
	mv_job_schedule(u);
}

/* Connection settings for one of the mover's servers, logging in as login
 * with pw. */
struct ms_imapc_settings mv_server_settings(const struct server *s,
					    const char *login,
					    const char *pw)
{
	return (struct ms_imapc_settings){
		.host = s->cfg.host,
		.port = s->cfg.port,
		.tls = ms_server_tls(&s->cfg),
		.user = login,
		.admin = s->cfg.admin,
		.password = pw,
		.mech = s->cfg.mech,
		.pacer = s->pacer,
	};
}

/* Before a server's answer for u's copy is taken (ms_mover_set_fence). */
int mv_gate(void *ctx)
{
	struct ujob *u = ctx;
	struct ms_mover *m = u->m;

	if (u->fenced)
		return 0;
	if (u->failed || u->finished || m->fence == NULL ||
	    m->fence(m->fence_ctx, u->name))
		return 1;
	u->fenced = 1;
	/* (the fence's owner has cancelled it, as a rule: made sure) */
	ms_mover_cancel(m, u->name, "its job's lease is not known to be "
			"this gateway's any more");
	return 0;
}

static struct ms_imapc *connect_server(struct ujob *u, struct server *s,
				       const char *login, const char *pw,
				       struct worker *w)
{
	struct ms_imapc_settings set = mv_server_settings(s, login, pw);
	struct ms_imapc *c = ms_imapc_new(u->m->loop, &set, on_worker_ready,
					  w);

	if (c != NULL)
		ms_imapc_set_gate(c, mv_gate, u);
	return c;
}

/* Slots are taken per server, connections made per role (struct worker):
 * a rollback reads from the destination and writes to the source. */
static void worker_connect_dst(void *ctx)
{
	struct worker *w = ctx;
	struct ujob *u = w->u;
	struct ms_imapc **cp = u->reverse ? &w->s : &w->d;

	w->have_dst_slot = 1;
	*cp = connect_server(u, &u->m->dst, u->dst_login, u->dst_pw, w);
	if (*cp == NULL)
		mv_job_fail(u, "out of memory");
}

static void worker_connect_src(void *ctx)
{
	struct worker *w = ctx;
	struct ujob *u = w->u;
	struct ms_imapc **cp = u->reverse ? &w->d : &w->s;

	w->have_src_slot = 1;
	*cp = connect_server(u, &u->m->src, u->src_login, u->src_pw, w);
	if (*cp == NULL) {
		mv_job_fail(u, "out of memory");
		return;
	}
	mv_slot_wait(u, &u->m->dst, worker_connect_dst, w);
}

static void worker_start(struct ujob *u, unsigned int idx)
{
	struct worker *w = &u->workers[idx];

	memset(w, 0, sizeof(*w));
	w->u = u;
	w->idx = idx;
	w->state = W_CONNECTING;
	u->nworkers = idx + 1 > u->nworkers ? idx + 1 : u->nworkers;
	/* Source slot first, then destination: one order for every job, so
	 * that jobs waiting for slots cannot deadlock. */
	mv_slot_wait(u, &u->m->src, worker_connect_src, w);
}

void mv_start_workers(struct ujob *u)
{
	unsigned int selected = 0;

	for (unsigned int i = 0; i < u->nfolders; i++)
		selected += u->folders[i].selected_by_plan;
	for (unsigned int i = 1; i < u->want_workers && i < selected &&
	     i < MAX_WORKERS && !u->failed; i++)
		worker_start(u, i);
}

/* ---- untagged dispatch ---- */

void mv_on_src_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	struct worker *w = ctx;
	struct fetch f;
	uint64_t n;

	if (w->f == NULL || w->u->failed)
		return;
	if (w->phase == PH_OPEN) {
		mv_select_data(r, &w->s_uidvalidity, &w->s_uidnext, &w->s_exists,
			       &w->s_modseq, &w->s_nomodseq);
		return;
	}
	if (r->status == MS_STATUS_NONE && r->argc >= 2 &&
	    ms_imap_arg_number(&r->args[0], &n) == 0) {
		if (ms_imap_arg_is(&r->args[1], "EXISTS")) {
			w->s_exists = (uint32_t)n;
			return;
		}
		if (ms_imap_arg_is(&r->args[1], "EXPUNGE")) {
			/* Sequence numbers above it shift down by one. (A
			 * rollback's next_seq counts UIDs, not these.) */
			if (w->s_exists > 0)
				w->s_exists--;
			if (!w->u->reverse && w->next_seq > n)
				w->next_seq--;
			return;
		}
	}
	if (mv_parse_fetch(r, &f) < 0)
		return;
	switch (w->phase) {
	case PH_MATCH:
		mv_match_src_fetch(w, &f);
		break;
	case PH_SEEK:
		if (f.has_uid && f.uid > w->f->st.hwm &&
		    (w->min_new_seq == 0 || f.seq < w->min_new_seq))
			w->min_new_seq = f.seq;
		break;
	case PH_COPY:
		if (f.has_size && !f.has_body && f.has_date)
			mv_meta_fetch(w, &f);
		else if (w->v_pre != 0 && !f.has_body && !f.has_date)
			mv_verify_fetch(w, 0, &f);	/* asked early */
		break;
	case PH_FLAGS:
		mv_flags_fetch(w, &f);
		break;
	case PH_VERIFY_SRC:
		mv_verify_fetch(w, 0, &f);
		break;
	case PH_DIGEST:
		mv_digest_fetch(w, 0, &f);
		break;
	case PH_REPAIR:
		mv_repair_flags_fetch(w, &f);
		break;
	case PH_RSCAN_DST:
		mv_rscan_dst_fetch(w, &f);
		break;
	}
}

int mv_known_dst(struct worker *w, uint32_t uid)
{
	return ms_u32vec_has(&w->known, uid);
}

/* An untagged response of the destination, read alike whatever the
 * source: a SELECT's data while the folder opens (-1: nothing more to do);
 * else 0 with the FETCH in *f, -1 when it is none. */
int mv_dst_fetch(struct worker *w, const struct ms_imap_response *r,
		 struct fetch *f)
{
	if (w->phase == PH_OPEN) {
		mv_select_data(r, &w->d_uidvalidity, &w->d_uidnext, &w->d_exists,
			       NULL, NULL);
		return -1;
	}
	return mv_parse_fetch(r, f);
}

void mv_on_dst_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	struct worker *w = ctx;
	struct fetch f;

	if (w->f == NULL || w->u->failed)
		return;
	if (mv_dst_fetch(w, r, &f) < 0)
		return;
	if (w->phase == PH_MATCH) {
		if (w->match_reconcile && mv_known_dst(w, f.uid))
			return;
		mv_match_dst_fetch(w, &f);
	} else if (w->phase == PH_VERIFY_DST ||
		   (w->phase == PH_VERIFY_SRC && w->v_early != 0)) {
		mv_verify_fetch(w, 1, &f);
	} else if (w->phase == PH_DEDUP) {
		mv_dedup_fetch(w, &f);
	} else if (w->phase == PH_DIGEST) {
		mv_digest_fetch(w, 1, &f);
	} else if (w->phase == PH_RSCAN_SRC) {
		mv_rscan_src_fetch(w, &f);
	}
}

/* ---- users ---- */

static const struct ms_imap_parser_callbacks literal_hooks = {
	.literal_start = mv_on_literal_start,
	.literal_data = mv_on_literal_data,
	.literal_end = mv_on_literal_end,
};

/* A connection of the worker failed: with a command pending, that
 * command's callback has already dealt with it; otherwise it is dealt with
 * here (a source connection dying while the worker waits for the
 * destination's APPEND replies, say). */
static void on_conn_lost(struct ms_imapc *c, void *ctx)
{
	struct worker *w = ctx;
	struct ujob *u = w->u;

	if (u->failed || u->finished || w->state == W_DONE)
		return;
	if (w->state == W_BUSY && w->f != NULL) {
		mv_folder_fail(w, "connection", NULL, c);
		return;
	}
	snprintf(u->conn_error, sizeof(u->conn_error), "%s: %s",
		 c == w->s ? "source" : "destination", ms_imapc_error(c));
	if (u->planned != 1) {
		mv_job_fail(u, "%s", u->conn_error);
		return;
	}
	worker_close(w);
	mv_job_schedule(u);
}

void mv_worker_hooks(struct worker *w)
{
	struct ms_imap_parser_callbacks cb = literal_hooks;

	cb.ctx = w;
	ms_imapc_set_literal_hooks(w->s, &cb);
	ms_imapc_set_drain(w->d, mv_on_dst_drain, w);
	ms_imapc_set_lost(w->s, on_conn_lost, w);
	ms_imapc_set_lost(w->d, on_conn_lost, w);
}

static struct ujob *job_new(struct ms_mover *m, const char *user,
			    const char *src_password, const char *dst_password,
			    ms_mover_done_cb *done, void *ctx)
{
	struct ujob *u = calloc(1, sizeof(*u));

	if (u == NULL)
		return NULL;
	u->m = m;
	u->name = strdup(user);
	u->src_login = ms_server_login_name(&m->src.cfg, user);
	u->dst_login = ms_server_login_name(&m->dst.cfg, user);
	u->src_pw = strdup(src_password != NULL ? src_password :
			   m->src.password != NULL ? m->src.password : "");
	u->dst_pw = strdup(dst_password != NULL ? dst_password :
			   m->dst.password != NULL ? m->dst.password : "");
	u->done = done;
	u->done_ctx = ctx;
	u->start_ms = now_ms();
	u->start_ns = u->ph_last = uv_hrtime();
	u->want_workers = m->src.cfg.max_conns < m->dst.cfg.max_conns ?
		m->src.cfg.max_conns : m->dst.cfg.max_conns;
	if (u->want_workers == 0)
		u->want_workers = 1;
	if (u->name == NULL || u->src_login == NULL || u->dst_login == NULL ||
	    u->src_pw == NULL || u->dst_pw == NULL) {
		job_free(u);
		return NULL;
	}
	return u;
}

static void job_link(struct ujob *u)
{
	struct ms_mover *m = u->m;

	u->next = m->jobs;
	m->jobs = u;
	m->users++;
	/* Without the ticks the phases stay 0; the copy goes on. */
	mv_ph_start(m);
}

/* A job that works on what the store holds of the user (verify only, a
 * rollback): refused like any failure, with u->user_id 0, when the store
 * holds nothing of it (none: why) or the source is not IMAP (pop3: why).
 * 1 when refused. */
static int stored_job_refused(struct ujob *u, int found, const char *none,
			      const char *pop3)
{
	if (!found) {
		mv_job_fail(u, "%s", none);
		return 1;
	}
	if (u->m->src.cfg.proto != MS_PROTO_IMAP) {
		mv_job_fail(u, "%s", pop3);
		return 1;
	}
	return 0;
}

/* ms_mover_add_user() with verify_only (see "verify only"). */
static int vo_add_user(struct ujob *u)
{
	struct ms_mover *m = u->m;
	struct ms_user_info info;
	int found = 0;

	if (ms_store_user_info(m->store, u->name, &info, &found) < 0) {
		job_free(u);
		return -1;
	}
	job_link(u);
	if (stored_job_refused(u, found, "nothing to verify: the store has "
			       "no copy of this user", "source: a POP3 source "
			       "is verified by the copy, not on its own"))
		return 0;
	u->user_id = info.id;
	worker_start(u, 0);
	return 0;
}

int ms_mover_add_user(struct ms_mover *m, const char *user,
		      const char *src_password, const char *dst_password,
		      ms_mover_done_cb *done, void *ctx)
{
	struct ujob *u = job_new(m, user, src_password, dst_password, done,
				 ctx);
	uint64_t t0;

	if (u == NULL)
		return -1;
	if (m->verify_only)
		return vo_add_user(u);
	t0 = uv_hrtime();
	if (ms_store_user_get(m->store, user, &u->user_id) < 0 ||
	    ms_store_user_set_state(m->store, u->user_id,
				    ms_user_state_names[MS_USER_COPYING],
				    NULL) < 0) {
		job_free(u);
		return -1;
	}
	mv_ph_store(u, t0);
	job_link(u);
	if (m->src.cfg.proto == MS_PROTO_POP3) {
		mv_pop3_start(u);
		return 0;
	}
	worker_start(u, 0);
	return 0;
}

int ms_mover_add_rollback(struct ms_mover *m, const char *user,
			  const char *src_password, const char *dst_password,
			  ms_mover_done_cb *done, void *ctx)
{
	struct ujob *u = job_new(m, user, src_password, dst_password, done,
				 ctx);
	struct ms_user_info info;
	struct rows rows = { 0 };
	int found = 0;

	if (u == NULL)
		return -1;
	u->reverse = 1;
	if (ms_store_user_info(m->store, user, &info, &found) < 0 ||
	    (found && ms_store_folder_foreach(m->store, info.id, mv_collect_row,
					      &rows) != 0)) {
		free(rows.v);
		job_free(u);
		return -1;
	}
	free(rows.v);
	/* Refusals are reported like any failure (done() from the loop),
	 * with u->user_id 0: the store is left as it is. */
	job_link(u);
	if (stored_job_refused(u, found && rows.n > 0, "nothing to roll back: "
			       "the store has no copy of this user (never "
			       "migrated to the destination)", "source: a "
			       "rollback needs an IMAP source"))
		return 0;
	for (struct ujob *o = m->jobs; o != NULL; o = o->next) {
		if (o != u && strcmp(o->name, user) == 0 && !o->finished) {
			mv_job_fail(u, "a copy of this user is running");
			return 0;
		}
	}
	u->user_id = info.id;
	worker_start(u, 0);
	return 0;
}

struct ms_mover *ms_mover_new(uv_loop_t *loop, struct ms_store *store,
			      const struct ms_server_cfg *src,
			      const struct ms_server_cfg *dst,
			      const struct ms_mover_opts *opts)
{
	struct ms_mover *m = calloc(1, sizeof(*m));
	size_t n;

	if (m == NULL)
		return NULL;
	m->loop = loop;
	m->store = store;
	m->src.cfg = *src;
	m->dst.cfg = *dst;
	if (m->src.cfg.max_conns == 0)
		m->src.cfg.max_conns = 4;
	if (m->dst.cfg.max_conns == 0)
		m->dst.cfg.max_conns = 4;
	m->src.password = src->password != NULL ? strdup(src->password) : NULL;
	m->dst.password = dst->password != NULL ? strdup(dst->password) : NULL;
	m->src.cfg.password = m->dst.cfg.password = NULL;
	m->batch = opts != NULL && opts->batch != 0 ? opts->batch : 100;
	m->verify_only = opts != NULL && opts->verify_only;
	m->verify_content = opts != NULL && opts->verify_content;
	m->caller_flips = opts != NULL && opts->caller_flips;
	m->names = opts != NULL ? opts->names : MS_NAMES_SOURCE;
	ms_pacer_init(&m->src_pace, opts != NULL ? opts->commands_per_second :
		      0, uv_now(loop));
	m->src.pacer = &m->src_pace;
	if (opts != NULL && opts->doveadm != NULL &&
	    opts->doveadm->key != NULL) {
		m->doveadm = *opts->doveadm;
		m->doveadm_key = strdup(opts->doveadm->key);
		m->doveadm.key = m->doveadm_key;
		m->identity = m->doveadm_key != NULL;
	}
	for (int which = 0; which < 2 && opts != NULL; which++) {
		const char *const *src_pats = which == 0 ? opts->include :
					       opts->exclude;
		char ***dstp = which == 0 ? &m->include : &m->exclude;

		if (src_pats == NULL)
			continue;
		for (n = 0; src_pats[n] != NULL; n++)
			;
		*dstp = calloc(n + 1, sizeof(char *));
		for (size_t i = 0; *dstp != NULL && i < n; i++)
			(*dstp)[i] = strdup(src_pats[i]);
	}
	m->start_ms = now_ms();
	return m;
}

void ms_mover_progress(const struct ms_mover *m, struct ms_progress *p)
{
	p->users = m->users;
	p->users_done = m->users_done;
	p->folders = m->folders;
	p->folders_done = m->folders_done;
	p->msgs_todo = m->msgs_todo;
	p->msgs_done = m->msgs_done;
	p->bytes_done = m->bytes_done;
	p->seconds = (double)(now_ms() - m->start_ms) / 1000.0;
}

void ms_mover_pace(struct ms_mover *m, struct ms_mover_pace *p)
{
	/* The pace recovers with time, commands sent or not. */
	ms_pacer_tick(&m->src_pace, uv_now(m->loop));
	ms_pacer_log(&m->src_pace, m->src.cfg.host, m->src.cfg.port);
	memset(p, 0, sizeof(*p));
	p->connections = m->src.cfg.max_conns;
	p->src_open = m->src.active;
	p->dst_open = m->dst.active;
	for (const struct server *s = &m->src; s != NULL;
	     s = s == &m->src ? &m->dst : NULL)
		for (const struct waiter *wt = s->waiters; wt != NULL;
		     wt = wt->next)
			p->waiting++;
	p->commands_per_second = m->src_pace.rate;
	p->pace = ms_pacer_rate(&m->src_pace);
	p->backing_off = m->src_pace.level > 0;
	p->commands = m->src_pace.commands;
	p->backoffs = m->src_pace.backoffs;
	p->reason = m->src_pace.reason;
}

void ms_mover_set_limits(struct ms_mover *m, unsigned int connections,
			 double commands_per_second)
{
	if (connections > 0) {
		ms_info("mover: connections per server: %u (were %u)",
			connections, m->src.cfg.max_conns);
		m->src.cfg.max_conns = m->dst.cfg.max_conns = connections;
		slot_grant_more(&m->src);
		slot_grant_more(&m->dst);
	}
	if (commands_per_second >= 0) {
		ms_pacer_set_rate(&m->src_pace, commands_per_second,
				  uv_now(m->loop));
		m->src_pace.logged = m->src_pace.changes;
		if (commands_per_second > 0)
			ms_info("mover: commands per second to the source: "
				"%.1f", commands_per_second);
		else
			ms_info("mover: commands per second to the source: "
				"no cap");
	}
}

void ms_mover_free(struct ms_mover **mp)
{
	struct ms_mover *m = *mp;

	if (m == NULL)
		return;
	*mp = NULL;
	while (m->jobs != NULL) {
		struct ujob *u = m->jobs;

		m->jobs = u->next;
		u->failed = 1;
		for (unsigned int i = 0; i < u->nworkers; i++)
			worker_close(&u->workers[i]);
		ms_pop3c_free(&u->pop);
		job_free(u);
	}
	mv_ph_free(m);
	ms_secret_free(&m->src.password);
	ms_secret_free(&m->dst.password);
	ms_secret_free(&m->doveadm_key);
	for (char **p = m->include; p != NULL && *p != NULL; p++)
		free(*p);
	for (char **p = m->exclude; p != NULL && *p != NULL; p++)
		free(*p);
	free(m->include);
	free(m->exclude);
	free(m);
}

void ms_mover_set_fence(struct ms_mover *m, ms_mover_fence_cb *cb, void *ctx)
{
	m->fence = cb;
	m->fence_ctx = ctx;
}

int ms_mover_cancel(struct ms_mover *m, const char *user, const char *why)
{
	for (struct ujob *u = m->jobs; u != NULL; u = u->next) {
		if (strcmp(u->name, user) != 0 || u->finished || u->failed)
			continue;
		/* job_report writes no state for a job without a user id:
		 * the user is another process's now */
		u->user_id = 0;
		mv_job_fail(u, "%s", why);
		return 0;
	}
	return -1;
}
