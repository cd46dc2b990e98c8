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
 * messages listed), copy those, verify. See "rollback" below.
 */
#include <ctype.h>
#include <fnmatch.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "imapc.h"
#include "log.h"
#include "mailbox.h"
#include "mover.h"
#include "pop3c.h"
#include "testhook.h"
#include "util.h"

#define MAX_WORKERS 16
#define MAX_APPENDS 4
#define MAX_RETRIES 3		/* per folder, after a lost connection */
#define RETRY_DELAY_MS 1000
#define SETTLE_MS 2000		/* reconcile: the wait for a killed run's
				   APPENDs before sending again (below) */
#define MSGID_MAX 500
#define HDR_MAX (32 * 1024)
#define FLAGS_MAX 1000

struct mover;
struct ujob;

struct waiter {
	struct waiter *next;
	void (*cb)(void *ctx);
	void *ctx;
};

struct server {
	struct ms_server_cfg cfg;
	char *password;
	unsigned int active;
	struct waiter *waiters, *waiters_tail;
};

struct ms_mover {
	uv_loop_t *loop;
	struct ms_store *store;
	struct server src, dst;
	char **include, **exclude;
	unsigned int batch;
	int verify_only, verify_content;
	int caller_flips;		/* ms_mover_opts */
	struct ujob *jobs;
	unsigned int users, users_done;
	unsigned int folders, folders_done;
	uint64_t msgs_todo, msgs_done, bytes_done;
	uint64_t start_ms;
};

struct fjob {
	char src[1024];			/* mUTF-7, source separator */
	char dst[1024];			/* mUTF-7, destination separator */
	char special[16];		/* \Sent ... or "" */
	int subscribed, noselect, selected_by_plan;
	int dst_subscribed;		/* rollback: subscribed on the
					   destination */
	int taken;			/* a worker has it (or had it) */
	int dst_missing;		/* verify-only: not on the destination */
	unsigned int retries;		/* reconnects after a lost connection */
	uint32_t status_msgs;
	struct ms_folder_report rep;
	struct ms_folder_state st;
};

struct dfolder {
	char name[1024];
	char special[16];
	int subscribed;
	int noselect;
	int claimed;			/* rollback: a folder job has it */
};

struct wmsg {
	uint32_t uid, seq;
	uint64_t size;
	int64_t date;
	char datestr[40];
	char flags[FLAGS_MAX];
	char msgid[MSGID_MAX];
	int skip;			/* already done: not copied */
	int streamed;
	uint32_t dst_uid;
};

struct window {
	struct window *next;
	struct worker *w;
	struct wmsg *msgs;
	unsigned int n, cap;
	unsigned int nstreamed;
	uint32_t *order;		/* indexes of msgs in streaming order */
	int appending;			/* an APPEND command was begun */
	int open;			/* an APPEND command is being written */
	int body_done;			/* the BODY[] FETCH was answered */
	unsigned int replies_pending;	/* APPEND commands not answered */
	struct append_cmd *cur_cmd;
	struct append_cmd *acs;		/* all of them: freed with the window
					   (an error reply may leave the
					   open one in use) */
	int finished;			/* done, waiting for older windows */
	uint32_t max_uid;
	uint64_t bytes;
};

/* One APPEND (or MULTIAPPEND) command of a window. */
struct append_cmd {
	struct append_cmd *next;	/* win->acs */
	struct window *win;
	unsigned int first, count;
};

struct fpent {
	uint64_t h;			/* fingerprint */
	uint64_t fhash;			/* flags_hash() of its flags */
	uint32_t uid;
	int used;
};

/* Rollback: a done record, by destination UID. */
struct rrec {
	uint32_t src_uid, dst_uid;
	uint64_t size;
	uint64_t fhash;			/* flags_hash() of the recorded flags */
	int seen;			/* the destination still has it */
	int drop;			/* 1: the record goes; 2: it went */
};

/* Verification: one message of one side. */
#define MD_LEN 32			/* SHA-256 */

struct vmsg {
	uint32_t uid;
	uint8_t has_md;			/* verify_content: its digest is in */
	uint8_t excluded;		/* verify-only: not compared (a copy or
					   an expunge not carried over yet) */
	uint8_t claimed;		/* a done record names it */
	uint64_t size;
	uint64_t fhash;			/* flags_hash() of its flags */
};

/* A side's messages in UID order once sorted; with verify_content, md[i]
 * is v[i]'s SHA-256 (kept apart: 24 bytes a message otherwise). */
struct vlist {
	struct vmsg *v;
	unsigned char (*md)[MD_LEN];
	size_t n, cap;
	int sorted;
};

/* What pairing the two sides' messages through the done records found
 * (per kind: how many, the first one's source UID). */
struct vcount {
	uint64_t n;
	uint32_t first;
};

struct vcheck {
	struct vcount lost;		/* copy missing on the destination */
	struct vcount resized;		/* copy of another size */
	struct vcount altered;		/* same size, other bytes */
	struct vcount flags;		/* copy with other flags */
	uint64_t unclaimed;		/* destination messages no record
					   names */
	uint64_t unknown;		/* records without destination UID */
	uint64_t md_sum[2];		/* verify_content: multiset hashes */
};

struct digest_side {
	struct worker *w;
	int side;
};

/* The reconciliation's wait for a killed run's APPENDs (settle_wait()). */
struct settle_timer {
	uv_timer_t timer;
	struct ujob *u;
	struct worker *w;		/* NULL once the worker was closed */
};

enum wstate { W_CONNECTING, W_IDLE, W_BUSY, W_DONE };

/* A connection pair. s is the side read from and d the side written to:
 * the source and the destination, the other way round in a rollback. */
struct worker {
	struct ujob *u;
	unsigned int idx;
	enum wstate state;
	struct ms_imapc *s, *d;
	int s_ready, d_ready;
	int have_src_slot, have_dst_slot;
	struct fjob *f;

	/* Folder sync state. */
	int phase;
	int pending;			/* outstanding commands of the phase */
	uint32_t s_uidvalidity, s_uidnext, s_exists;
	uint64_t s_modseq;
	int s_nomodseq;
	uint32_t d_uidvalidity, d_uidnext, d_exists;
	uint32_t old_hwm;
	int fresh;			/* the folder had no done record when
					   this copy pass began */
	int multiappend;		/* the destination has MULTIAPPEND */
	uint32_t next_seq;
	uint32_t min_new_seq;

	struct window *meta;		/* metadata being fetched */
	struct window *ready;		/* metadata in, intents committed */
	struct window *body;		/* BODY[] being streamed */
	struct window *appends;		/* APPEND written, reply awaited */
	struct wmsg *cur;
	int s_paused;
	/* The header of the message being streamed, for its Message-ID:
	 * asking the source for it separately costs the source more than
	 * a quarter of the whole copy. */
	char hdr[HDR_MAX];
	size_t hdrlen;
	int hdr_done;

	/* match */
	struct fpent *fps;
	size_t nfps, capfps;
	int match_reconcile;
	uint32_t match_floor;
	int settled;			/* reconcile: waited SETTLE_MS already */
	struct settle_timer *settle;	/* that wait, while it runs */

	/* verify */
	struct ms_u32vec known;		/* match: destination UIDs done */
	struct ms_u32vec src_uids;	/* verify: source UIDs */
	uint64_t v_count[2], v_bytes[2], v_fhash[2];
	uint64_t v_missing;
	uint32_t v_first_missing;
	struct ms_u32vec expunge;	/* destination UIDs to expunge */
	struct ms_u32vec dst_uids;	/* verify: destination UIDs */
	struct ms_u32vec vanished;	/* verify: source UIDs expunged there */
	uint64_t vanished_bytes;	/* their recorded sizes */
	int dedup_done;
	struct vlist vm[2];		/* verify: messages, by side */
	struct vcheck vc;
	uint64_t v_later;		/* source messages above the hwm */
	int v_all_src;			/* verify-only: compare every source
					   message (its UIDVALIDITY changed) */
	int v_norecs;			/* verify-only: the records do not
					   apply (a UIDVALIDITY changed) */
	EVP_MD_CTX *md[2];		/* verify_content: the body hashed */
	unsigned char md_last[2][MD_LEN];
	int md_have[2];
	struct digest_side dg[2];	/* the literal hooks' contexts */
	int repair_done;
	struct ms_u32vec rp_flags;	/* repair: source UIDs, flags wrong */
	struct ms_u32vec rp_flags_dst;	/* their destination UIDs */
	struct ms_u32vec rp_redo;	/* repair: source UIDs to copy again */
	uint64_t rp_bytes;		/* their recorded sizes */

	/* rollback */
	struct rrec *rrecs;		/* the folder's done records */
	size_t nrrecs, caprrecs;
	struct ms_u32vec todo;		/* destination UIDs to append */
	uint64_t v_only[3];		/* verify: count, bytes, flags hash of
					   the source messages no record
					   claims */
};

enum {
	PH_OPEN, PH_MATCH, PH_SEEK, PH_COPY, PH_FLAGS, PH_VERIFY_SRC,
	PH_EXPUNGE, PH_VERIFY_DST, PH_DEDUP, PH_DIGEST, PH_REPAIR,
	PH_RSCAN_SRC, PH_RSCAN_DST, PH_REXPUNGE,	/* rollback */
};

struct ujob {
	struct ujob *next;
	struct ms_mover *m;
	char *name;
	int64_t user_id;
	char *src_login, *dst_login;
	char *src_pw, *dst_pw;
	ms_mover_done_cb *done;
	void *done_ctx;
	int reverse;			/* a rollback */

	struct worker workers[MAX_WORKERS];
	unsigned int nworkers, want_workers;
	struct ms_pop3c *pop;

	struct fjob *folders;
	unsigned int nfolders, capfolders, folders_done;
	unsigned int timers;		/* retry timers pending */
	char conn_error[400];		/* the last lost or failed connection */
	struct dfolder *dfolders;
	unsigned int ndfolders, capdfolders;
	char src_sep, dst_sep;
	int plan_pending;
	int planned;

	int failed, mismatch, finished;
	char error[600];
	uint64_t copied, bytes, flags_updated, expunged, repaired;
	uint64_t start_ms;
};

static void job_fail(struct ujob *u, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void worker_next_folder(struct worker *w);
static void folder_fail(struct worker *w, const char *cmd,
			const struct ms_imap_response *r, struct ms_imapc *c);
static void copy_pump(struct worker *w);
static void start_flags(struct worker *w);
static void start_verify(struct worker *w);
static void job_maybe_finish(struct ujob *u);
static void start_dedup(struct worker *w);
static void pop3_start(struct ujob *u);
static void worker_hooks(struct worker *w);
static void worker_start(struct ujob *u, unsigned int idx);
static void job_schedule(struct ujob *u);
static void rb_plan(struct ujob *u);
static void rb_start_scan(struct worker *w);
static void rb_start_copy(struct worker *w);
static void rb_scan_done(struct worker *w);
static void rb_expunged(struct worker *w);
static void rb_verify_claims(struct worker *w);
static void rb_verify_done(struct worker *w);
static void window_free(struct window *win);
static void verify_free(struct worker *w);

/* ---- small helpers ---- */

/* qsort() that may be given nothing: qsort(NULL, 0, ...) is undefined
 * behaviour (UBSan stops on it). */
static void sort_n(void *base, size_t n, size_t size,
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

static uint64_t fingerprint(uint64_t size, int64_t date, const char *msgid)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	h = fnv1a(h, &size, sizeof(size));
	h = fnv1a(h, &date, sizeof(date));
	return fnv1a(h, msgid, strlen(msgid));
}

static uint64_t flags_hash(const char *flags)
{
	uint64_t h = fnv1a(0xcbf29ce484222325ULL, flags, strlen(flags));

	/* Mix, so that a sum over messages is a good multiset hash. */
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	return h;
}

static void to_utf8(char *out, size_t outsz, const char *mutf7, char sep)
{
	char *u = ms_mutf7_to_utf8(mutf7);

	snprintf(out, outsz, "%s", u != NULL ? u : mutf7);
	free(u);
	(void)sep;
}

/* The connections of a worker by server (struct worker: s is read from, d
 * written to). */
static struct ms_imapc *src_conn(const struct worker *w)
{
	return w->u->reverse ? w->d : w->s;
}

static struct ms_imapc *dst_conn(const struct worker *w)
{
	return w->u->reverse ? w->s : w->d;
}

static const char *side_name(const struct worker *w, const struct ms_imapc *c)
{
	return c == src_conn(w) ? "source" : "destination";
}

/* A record's UID on the side written to. */
static uint32_t rec_wr_uid(const struct ujob *u, const struct ms_msg_rec *rec)
{
	return u->reverse ? rec->src_uid : rec->dst_uid;
}

static int name_eq(const char *a, const char *b)
{
	/* INBOX is INBOX in any case (RFC 3501 5.1) */
	if (strcasecmp(a, "INBOX") == 0)
		return strcasecmp(b, "INBOX") == 0;
	return strcmp(a, b) == 0;
}

static void u32vec_uniq(struct ms_u32vec *vec)
{
	size_t n = 0;

	ms_u32vec_sort(vec);
	for (size_t i = 0; i < vec->n; i++)
		if (n == 0 || vec->v[n - 1] != vec->v[i])
			vec->v[n++] = vec->v[i];
	vec->n = n;
}

/* ---- connection slots per server ---- */

static int slot_acquire(struct server *s, void (*cb)(void *), void *ctx)
{
	struct waiter *wt;

	if (s->active < s->cfg.max_conns) {
		s->active++;
		return 1;
	}
	wt = calloc(1, sizeof(*wt));
	if (wt == NULL)
		return -1;
	wt->cb = cb;
	wt->ctx = ctx;
	if (s->waiters_tail != NULL)
		s->waiters_tail->next = wt;
	else
		s->waiters = wt;
	s->waiters_tail = wt;
	return 0;
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

static void slot_release(struct server *s)
{
	struct waiter *wt = s->waiters;

	if (wt == NULL) {
		s->active--;
		return;
	}
	/* The slot passes straight to the first waiter. */
	s->waiters = wt->next;
	if (s->waiters == NULL)
		s->waiters_tail = NULL;
	wt->cb(wt->ctx);
	free(wt);
}

/* ---- FETCH response parsing ---- */

struct fetch {
	uint32_t seq, uid;
	int has_uid, has_size, has_flags, has_date, has_msgid, has_body;
	uint64_t size;
	char flags[FLAGS_MAX];
	const char *date;
	char msgid[MSGID_MAX];
};

static void extract_msgid(const char *hdr, size_t len, char *out, size_t outsz)
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
static int parse_fetch(const struct ms_imap_response *r, struct fetch *f)
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
				extract_msgid(s, v->len, f->msgid,
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
static long parse_uid_set(const char *s, uint32_t *out, size_t cap)
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
			window_free(win);
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
	verify_free(w);
	w->state = W_DONE;
}

static void job_fail(struct ujob *u, const char *fmt, ...)
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
	job_maybe_finish(u);
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

static void job_report(uv_timer_t *t)
{
	struct ujob *u = t->data;
	struct ms_mover *m = u->m;
	struct ms_user_report rep;
	struct ms_folder_report *fr;

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
	rep.seconds = (double)(now_ms() - u->start_ms) / 1000.0;
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
		ms_store_user_set_state(m->store, u->user_id,
					rep.ok ? "source" : "failed", rep.error);
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

static void job_maybe_finish(struct ujob *u)
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

static void on_retry_timer_close(uv_handle_t *h)
{
	free(h);
}

static void on_retry_timer(uv_timer_t *t)
{
	struct retry_timer *rt = (struct retry_timer *)t;
	struct ujob *u = rt->u;

	u->timers--;
	uv_close((uv_handle_t *)t, on_retry_timer_close);
	if (u->failed || u->finished) {
		job_maybe_finish(u);
		return;
	}
	worker_start(u, rt->idx);
}

/* The connection of a worker went away in the middle of a folder: the
 * store has everything that was committed, so the folder is simply given
 * back and the worker reconnects after a pause. */
static int folder_retry(struct worker *w, const char *error)
{
	struct ujob *u = w->u;
	struct fjob *f = w->f;
	struct retry_timer *rt;

	if (u->failed || f->retries >= MAX_RETRIES || !transient(error) ||
	    u->m->src.cfg.proto != MS_PROTO_IMAP)
		return -1;
	rt = calloc(1, sizeof(*rt));
	if (rt == NULL)
		return -1;
	f->retries++;
	f->taken = 0;
	ms_warn("%s: folder \"%s\": %s; reconnecting (retry %u of %u)",
		u->name, f->rep.source, error, f->retries, MAX_RETRIES);
	worker_close(w);
	w->f = NULL;
	rt->u = u;
	rt->idx = w->idx;
	uv_timer_init(u->m->loop, &rt->timer);
	uv_timer_start(&rt->timer, on_retry_timer, RETRY_DELAY_MS, 0);
	u->timers++;
	snprintf(u->conn_error, sizeof(u->conn_error), "folder \"%s\": %s",
		 f->rep.source, error);
	job_schedule(u);
	return 0;
}

/* Hands folders nobody has to idle workers, retires workers whose
 * connections died while they were idle, and fails the job when folders are
 * left that no worker (nor a pending reconnect) can take. */
static void job_schedule(struct ujob *u)
{
	unsigned int live = u->timers, left = 0;

	if (u->failed || u->finished || u->planned != 1)
		return;
	for (unsigned int i = 0; i < u->nworkers; i++) {
		struct worker *w = &u->workers[i];

		if (w->state == W_IDLE && (ms_imapc_failed(w->s) ||
					   ms_imapc_failed(w->d))) {
			struct ms_imapc *c = ms_imapc_failed(w->s) ? w->s : w->d;

			snprintf(u->conn_error, sizeof(u->conn_error), "%s: %s",
				 side_name(w, c), ms_imapc_error(c));
			worker_close(w);
		}
		if (w->state == W_IDLE)
			worker_next_folder(w);
		if (u->failed)
			return;
		if (w->state != W_DONE)
			live++;
	}
	for (unsigned int i = 0; i < u->nfolders; i++)
		left += u->folders[i].selected_by_plan && !u->folders[i].taken;
	if (left > 0 && live == 0)
		job_fail(u, "%s", u->conn_error[0] != '\0' ? u->conn_error :
			 "no connection left to copy with");
	else
		job_maybe_finish(u);
}

static void folder_fail(struct worker *w, const char *cmd,
			const struct ms_imap_response *r, struct ms_imapc *c)
{
	char buf[400];
	char name[1024];

	if (r == NULL && c != NULL && ms_imapc_failed(c) &&
	    folder_retry(w, ms_imapc_error(c)) == 0)
		return;
	to_utf8(name, sizeof(name), w->f->src, 0);
	if (r == NULL)
		job_fail(w->u, "folder \"%s\": %s", name,
			 c != NULL ? ms_imapc_error(c) : cmd);
	else
		job_fail(w->u, "folder \"%s\": %s: %s", name, cmd,
			 ms_imapc_resp_summary(r, buf, sizeof(buf)));
}

static int store_check(struct worker *w, int ret)
{
	if (ret < 0)
		job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
	return ret;
}

/* ---- untagged responses ---- */

static void on_src_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx);
static void on_dst_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx);

static void select_data(const struct ms_imap_response *r, uint32_t *uidvalidity,
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

/* ---- planning: LIST, STATUS, CREATE, SUBSCRIBE ---- */

static int pattern_match(char *const *pats, const char *name)
{
	for (; pats != NULL && *pats != NULL; pats++)
		if (fnmatch(*pats, name, 0) == 0)
			return 1;
	return 0;
}

static const char *special_of(const struct ms_imap_arg *attrs)
{
	static const char *const uses[] = {
		"\\Sent", "\\Trash", "\\Drafts", "\\Junk", "\\Archive",
		"\\All", "\\Flagged",
	};

	if (attrs->type != MS_ARG_LIST)
		return NULL;
	for (unsigned int i = 0; i < attrs->list_count; i++)
		for (size_t j = 0; j < sizeof(uses) / sizeof(uses[0]); j++)
			if (ms_imap_arg_is(&attrs->list[i], uses[j]))
				return uses[j];
	return NULL;
}

static int has_attr(const struct ms_imap_arg *attrs, const char *a)
{
	if (attrs->type != MS_ARG_LIST)
		return 0;
	for (unsigned int i = 0; i < attrs->list_count; i++)
		if (ms_imap_arg_is(&attrs->list[i], a))
			return 1;
	return 0;
}

static struct fjob *find_folder(struct ujob *u, const char *name)
{
	for (unsigned int i = 0; i < u->nfolders; i++)
		if (strcmp(u->folders[i].src, name) == 0)
			return &u->folders[i];
	return NULL;
}

static struct dfolder *find_dfolder(struct ujob *u, const char *name)
{
	for (unsigned int i = 0; i < u->ndfolders; i++)
		if (strcmp(u->dfolders[i].name, name) == 0)
			return &u->dfolders[i];
	return NULL;
}

/* "* LIST (attrs) sep name" or "* LSUB ..." */
static int parse_list(const struct ms_imap_response *r, const char *verb,
		      const struct ms_imap_arg **attrs_r, char *sep_r,
		      const char **name_r)
{
	const char *s;

	if (r->kind != MS_RESP_UNTAGGED || r->status != MS_STATUS_NONE ||
	    r->argc < 4 || !ms_imap_arg_is(&r->args[0], verb) ||
	    r->args[1].type != MS_ARG_LIST)
		return -1;
	*attrs_r = &r->args[1];
	s = ms_imap_arg_str(&r->args[2]);
	*sep_r = s != NULL ? s[0] : '\0';
	*name_r = ms_imap_arg_str(&r->args[3]);
	return *name_r != NULL && strlen(*name_r) < 1024 ? 0 : -1;
}

static void on_plan_src_untagged(struct ms_imapc *c,
				 const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;
	const struct ms_imap_arg *attrs;
	const char *name;
	char sep;
	struct fjob *f;
	uint64_t n;

	if (parse_list(r, "LIST", &attrs, &sep, &name) == 0) {
		const char *sp;

		if (has_attr(attrs, "\\NonExistent"))
			return;
		f = find_folder(u, name);
		if (f == NULL) {
			if (u->nfolders == u->capfolders) {
				unsigned int cap = u->capfolders * 2 + 16;
				struct fjob *nf = realloc(u->folders,
							  cap * sizeof(*nf));

				if (nf == NULL) {
					job_fail(u, "out of memory");
					return;
				}
				u->folders = nf;
				u->capfolders = cap;
			}
			f = &u->folders[u->nfolders++];
			memset(f, 0, sizeof(*f));
			snprintf(f->src, sizeof(f->src), "%s", name);
		}
		if (has_attr(attrs, "\\Noselect"))
			f->noselect = 1;
		if (has_attr(attrs, "\\Subscribed"))
			f->subscribed = 1;
		sp = special_of(attrs);
		if (sp != NULL)
			snprintf(f->special, sizeof(f->special), "%s", sp);
		if (sep != '\0')
			u->src_sep = sep;
		return;
	}
	if (parse_list(r, "LSUB", &attrs, &sep, &name) == 0) {
		f = find_folder(u, name);
		if (f != NULL)
			f->subscribed = 1;
		return;
	}
	if (r->kind == MS_RESP_UNTAGGED && r->argc >= 3 &&
	    ms_imap_arg_is(&r->args[0], "STATUS") &&
	    r->args[2].type == MS_ARG_LIST) {
		const struct ms_imap_arg *l = &r->args[2];

		name = ms_imap_arg_str(&r->args[1]);
		f = name != NULL ? find_folder(u, name) : NULL;
		for (unsigned int i = 0; f != NULL && i + 1 < l->list_count; i += 2)
			if (ms_imap_arg_is(&l->list[i], "MESSAGES") &&
			    ms_imap_arg_number(&l->list[i + 1], &n) == 0)
				f->status_msgs = (uint32_t)n;
	}
}

static void on_plan_dst_untagged(struct ms_imapc *c,
				 const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;
	const struct ms_imap_arg *attrs;
	const char *name, *sp;
	char sep;
	struct dfolder *d;
	int lsub = 0;

	if (parse_list(r, "LIST", &attrs, &sep, &name) < 0) {
		if (parse_list(r, "LSUB", &attrs, &sep, &name) < 0)
			return;
		lsub = 1;
	}
	d = find_dfolder(u, name);
	if (d == NULL) {
		if (lsub || has_attr(attrs, "\\NonExistent"))
			return;
		if (u->ndfolders == u->capdfolders) {
			unsigned int cap = u->capdfolders * 2 + 16;
			struct dfolder *nd = realloc(u->dfolders, cap * sizeof(*nd));

			if (nd == NULL) {
				job_fail(u, "out of memory");
				return;
			}
			u->dfolders = nd;
			u->capdfolders = cap;
		}
		d = &u->dfolders[u->ndfolders++];
		memset(d, 0, sizeof(*d));
		snprintf(d->name, sizeof(d->name), "%s", name);
	}
	if (lsub || has_attr(attrs, "\\Subscribed"))
		d->subscribed = 1;
	if (!lsub && has_attr(attrs, "\\Noselect"))
		d->noselect = 1;
	if (!lsub && (sp = special_of(attrs)) != NULL)
		snprintf(d->special, sizeof(d->special), "%s", sp);
	if (!lsub && sep != '\0')
		u->dst_sep = sep;
}

static void plan_step(struct ujob *u);

static void on_plan_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct ujob *u = ctx;
	char buf[400];

	if (u->failed)
		return;
	if (r == NULL) {
		job_fail(u, "%s: %s", side_name(&u->workers[0], c),
			 ms_imapc_error(c));
		return;
	}
	if (r->status != MS_STATUS_OK) {
		job_fail(u, "%s: %s", side_name(&u->workers[0], c),
			 ms_imapc_resp_summary(r, buf, sizeof(buf)));
		return;
	}
	if (--u->plan_pending == 0)
		plan_step(u);
}

static void on_create_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx)
{
	struct ujob *u = ctx;
	char buf[400];

	if (u->failed)
		return;
	if (r == NULL) {
		job_fail(u, "%s: %s", side_name(&u->workers[0], c),
			 ms_imapc_error(c));
		return;
	}
	/* A folder that exists already is what we wanted. */
	if (r->status != MS_STATUS_OK &&
	    !(r->code != NULL && strcasecmp(r->code, "ALREADYEXISTS") == 0)) {
		job_fail(u, "%s: CREATE: %s", side_name(&u->workers[0], c),
			 ms_imapc_resp_summary(r, buf, sizeof(buf)));
		return;
	}
	if (r->status == MS_STATUS_OK)
		MS_CRASH_POINT(u->reverse ? "rollback.folder-created" :
			       "copy.folder-created");
	if (--u->plan_pending == 0)
		plan_step(u);
}

static void start_workers(struct ujob *u);

/* 1 when the include/exclude patterns let the source folder src (mUTF-7)
 * through, 0 when not, -1 when out of memory. */
static int folder_wanted(struct ujob *u, const char *src)
{
	struct ms_mover *m = u->m;
	char utf8[1024], *pathname;
	int ret;

	to_utf8(utf8, sizeof(utf8), src, u->src_sep);
	/* Patterns see '/' as the separator, whatever the server's. */
	pathname = strdup(utf8);
	if (pathname == NULL)
		return -1;
	for (char *p = pathname; u->src_sep != '\0' && u->src_sep != '/' &&
	     *p != '\0'; p++)
		if (*p == u->src_sep)
			*p = '/';
	ret = (m->include == NULL || pattern_match(m->include, pathname)) &&
	      !pattern_match(m->exclude, pathname);
	free(pathname);
	return ret;
}

/* The destination name of the source folder src with special use special
 * ("" for none): the destination's folder of the same use, else src by the
 * separator rule. Returns 0, or -1 when out of memory. */
static int map_forward(struct ujob *u, const char *src, const char *special,
		       char *out, size_t outsz)
{
	char *t;

	if (special[0] != '\0') {
		for (unsigned int j = 0; j < u->ndfolders; j++) {
			if (strcasecmp(u->dfolders[j].special, special) == 0) {
				snprintf(out, outsz, "%s", u->dfolders[j].name);
				return 0;
			}
		}
	}
	t = ms_mailbox_translate(src, u->src_sep, u->dst_sep);
	if (t == NULL)
		return -1;
	snprintf(out, outsz, "%s", t);
	free(t);
	return 0;
}

/* Maps every selected source folder to its destination name; fails the job
 * on a collision (two source folders onto one destination folder). */
static int plan_names(struct ujob *u)
{
	for (unsigned int i = 0; i < u->nfolders; i++) {
		struct fjob *f = &u->folders[i];
		int wanted = folder_wanted(u, f->src);

		if (wanted < 0)
			return -1;
		f->selected_by_plan = !f->noselect && wanted;
		if (!f->selected_by_plan)
			continue;
		if (map_forward(u, f->src, f->special, f->dst,
				sizeof(f->dst)) < 0)
			return -1;
		to_utf8(f->rep.source, sizeof(f->rep.source), f->src,
			u->src_sep);
		to_utf8(f->rep.destination, sizeof(f->rep.destination), f->dst,
			u->dst_sep);
	}
	for (unsigned int i = 0; i < u->nfolders; i++) {
		for (unsigned int j = i + 1; j < u->nfolders; j++) {
			struct fjob *a = &u->folders[i], *b = &u->folders[j];

			if (!a->selected_by_plan || !b->selected_by_plan)
				continue;
			if (name_eq(a->dst, b->dst)) {
				job_fail(u, "folders \"%s\" and \"%s\" would both "
					 "become \"%s\" on the destination; "
					 "nothing was merged (rename one, or "
					 "--exclude one)", a->rep.source,
					 b->rep.source, a->rep.destination);
				return -1;
			}
		}
	}
	return 0;
}

static int cmp_folder_size(const void *a, const void *b)
{
	const struct fjob *x = a, *y = b;

	/* Selected ones first, biggest first: the long poles start early. */
	if (x->selected_by_plan != y->selected_by_plan)
		return y->selected_by_plan - x->selected_by_plan;
	return x->status_msgs < y->status_msgs ? 1 :
	       x->status_msgs > y->status_msgs ? -1 : 0;
}

static int vo_plan_folder(struct ujob *u, struct fjob *f);

static void plan_step(struct ujob *u)
{
	struct worker *w0 = &u->workers[0];
	struct ms_imapc *sc = src_conn(w0), *dc = dst_conn(w0);
	struct ms_mover *m = u->m;
	char q[2100];

	switch (u->planned) {
	case 0:
		/* Stage 1: LIST both sides, subscriptions, special-use. */
		u->planned = -1;
		ms_imapc_set_untagged(sc, on_plan_src_untagged, u);
		ms_imapc_set_untagged(dc, on_plan_dst_untagged, u);
		u->plan_pending = 4;
		for (struct ms_imapc *c = sc; c != NULL; c = c == sc ? dc : NULL) {
			if (ms_imapc_has_cap(c, "SPECIAL-USE"))
				ms_imapc_cmd(c, on_plan_reply, u, "LIST \"\" "
					     "\"*\" RETURN (SPECIAL-USE)");
			else
				ms_imapc_cmd(c, on_plan_reply, u,
					     "LIST \"\" \"*\"");
			ms_imapc_cmd(c, on_plan_reply, u, "LSUB \"\" \"*\"");
		}
		return;
	case -1:
		/* Stage 2: names, STATUS of each source folder, CREATE and
		 * SUBSCRIBE what the destination lacks. */
		u->planned = -2;
		if (u->src_sep == '\0')
			u->src_sep = ms_imapc_separator(sc);
		if (u->dst_sep == '\0')
			u->dst_sep = ms_imapc_separator(dc);
		if (u->reverse) {
			rb_plan(u);
			return;
		}
		if (plan_names(u) < 0) {
			if (!u->failed)
				job_fail(u, "out of memory");
			return;
		}
		u->plan_pending = 1;
		for (unsigned int i = 0; i < u->nfolders; i++) {
			struct fjob *f = &u->folders[i];
			struct dfolder *d;

			if (!f->selected_by_plan)
				continue;
			if (ms_imap_quote(q, sizeof(q), f->src) == 0) {
				u->plan_pending++;
				ms_imapc_cmd(w0->s, on_plan_reply, u,
					     "STATUS %s (MESSAGES)", q);
			}
			if (ms_imap_quote(q, sizeof(q), f->dst) < 0) {
				job_fail(u, "folder \"%s\": name cannot be sent",
					 f->rep.source);
				return;
			}
			d = find_dfolder(u, f->dst);
			if (m->verify_only) {
				/* Look, touch nothing. */
				f->dst_missing = d == NULL &&
						 strcasecmp(f->dst, "INBOX") != 0;
				continue;
			}
			if (d == NULL && strcasecmp(f->dst, "INBOX") != 0) {
				u->plan_pending++;
				ms_imapc_cmd(w0->d, on_create_reply, u,
					     "CREATE %s", q);
			}
			if (f->subscribed && (d == NULL || !d->subscribed)) {
				u->plan_pending++;
				ms_imapc_cmd(w0->d, on_plan_reply, u,
					     "SUBSCRIBE %s", q);
			} else if (!f->subscribed && d != NULL && d->subscribed) {
				/* Mirror the source: unsubscribed stays so. */
				u->plan_pending++;
				ms_imapc_cmd(w0->d, on_plan_reply, u,
					     "UNSUBSCRIBE %s", q);
			}
		}
		if (--u->plan_pending == 0)
			plan_step(u);
		return;
	case -2:
		/* Stage 3: go. */
		sort_n(u->folders, u->nfolders, sizeof(*u->folders),
		      cmp_folder_size);
		u->planned = 1;
		for (unsigned int i = 0; i < u->nfolders; i++) {
			struct fjob *f = &u->folders[i];

			if (!f->selected_by_plan) {
				u->folders_done++;
				continue;
			}
			m->folders++;
			if (m->verify_only) {
				if (vo_plan_folder(u, f) < 0)
					return;
				continue;
			}
			if (ms_store_folder_get(m->store, u->user_id, f->src,
						&f->st) < 0) {
				job_fail(u, "store: %s", ms_store_error(m->store));
				return;
			}
			/* (a rollback counts its messages when it has
			 * scanned the folder) */
			if (!u->reverse)
				m->msgs_todo += f->status_msgs > f->st.msgs ?
					f->status_msgs - f->st.msgs : 0;
		}
		ms_imapc_set_untagged(w0->s, on_src_untagged, w0);
		ms_imapc_set_untagged(w0->d, on_dst_untagged, w0);
		w0->state = W_IDLE;
		start_workers(u);
		job_schedule(u);
		return;
	}
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
			 side_name(w, c), error);
		if (u->planned != 1) {
			job_fail(u, "%s", u->conn_error);
			return;
		}
		/* A connection that cannot be made is not fatal while other
		 * workers can carry on; job_schedule() decides. */
		ms_warn("%s: %s: connection failed: %s", u->name,
			side_name(w, c), error);
		worker_close(w);
		job_schedule(u);
		return;
	}
	if (c == w->s)
		w->s_ready = 1;
	else
		w->d_ready = 1;
	if (!w->s_ready || !w->d_ready)
		return;
	worker_hooks(w);
	if (u->planned != 1) {
		plan_step(u);
		return;
	}
	ms_imapc_set_untagged(w->s, on_src_untagged, w);
	ms_imapc_set_untagged(w->d, on_dst_untagged, w);
	w->state = W_IDLE;
	job_schedule(u);
}

/* Connection settings for one of the mover's servers, logging in as login
 * with pw. */
static struct ms_imapc_settings server_settings(const struct server *s,
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
	};
}

static struct ms_imapc *connect_server(struct ujob *u, struct server *s,
				       const char *login, const char *pw,
				       struct worker *w)
{
	struct ms_imapc_settings set = server_settings(s, login, pw);

	return ms_imapc_new(u->m->loop, &set, on_worker_ready, w);
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
		job_fail(u, "out of memory");
}

static void worker_connect_src(void *ctx)
{
	struct worker *w = ctx;
	struct ujob *u = w->u;
	struct ms_imapc **cp = u->reverse ? &w->d : &w->s;
	int r;

	w->have_src_slot = 1;
	*cp = connect_server(u, &u->m->src, u->src_login, u->src_pw, w);
	if (*cp == NULL) {
		job_fail(u, "out of memory");
		return;
	}
	r = slot_acquire(&u->m->dst, worker_connect_dst, w);
	if (r == 1)
		worker_connect_dst(w);
	else if (r < 0)
		job_fail(u, "out of memory");
}

static void worker_start(struct ujob *u, unsigned int idx)
{
	struct worker *w = &u->workers[idx];
	int r;

	memset(w, 0, sizeof(*w));
	w->u = u;
	w->idx = idx;
	w->state = W_CONNECTING;
	u->nworkers = idx + 1 > u->nworkers ? idx + 1 : u->nworkers;
	/* Source slot first, then destination: one order for every job, so
	 * that jobs waiting for slots cannot deadlock. */
	r = slot_acquire(&u->m->src, worker_connect_src, w);
	if (r == 1)
		worker_connect_src(w);
	else if (r < 0)
		job_fail(u, "out of memory");
}

static void start_workers(struct ujob *u)
{
	unsigned int selected = 0;

	for (unsigned int i = 0; i < u->nfolders; i++)
		selected += u->folders[i].selected_by_plan;
	for (unsigned int i = 1; i < u->want_workers && i < selected &&
	     i < MAX_WORKERS && !u->failed; i++)
		worker_start(u, i);
}

/* ---- workers: one folder ---- */

static void folder_done(struct worker *w)
{
	struct ujob *u = w->u;
	struct ms_mover *m = u->m;

	if (!m->verify_only &&
	    store_check(w, ms_store_folder_update(m->store, &w->f->st)) < 0)
		return;
	m->folders_done++;
	u->folders_done++;
	w->f = NULL;
	w->state = W_IDLE;
	job_schedule(u);
}

static void on_open_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx);

static void worker_next_folder(struct worker *w)
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

static void start_match(struct worker *w, int reconcile, uint32_t floor);
static void start_copy(struct worker *w);

/* The copy pass, once open intents are settled. */
static void after_match(struct worker *w)
{
	if (w->u->reverse)
		rb_start_scan(w);
	else
		start_copy(w);
}

static void vo_open(struct worker *w, uint32_t src_uv, uint32_t dst_uv);

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
	uint64_t pending = 0;
	int reset = 0, ret;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, c == w->s ? "EXAMINE" : "SELECT", r, c);
		return;
	}
	if (--w->pending > 0)
		return;
	if (w->s_uidvalidity == 0 || w->d_uidvalidity == 0) {
		job_fail(u, "folder \"%s\": the server sent no UIDVALIDITY",
			 w->f->rep.source);
		return;
	}
	src_uv = u->reverse ? w->d_uidvalidity : w->s_uidvalidity;
	dst_uv = u->reverse ? w->s_uidvalidity : w->d_uidvalidity;
	if (u->m->verify_only) {
		vo_open(w, src_uv, dst_uv);
		return;
	}
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
		if (store_check(w, ms_store_msg_count(store, st->id,
						      MS_MSG_INTENT,
						      &pending)) < 0)
			return;
		if (pending > 0) {
			job_fail(u, "folder \"%s\": an interrupted copy left "
				 "%llu message(s) unfinished; run the copy to "
				 "its end first, then roll back", w->f->rep.source,
				 (unsigned long long)pending);
			return;
		}
		/* A rollback maps messages by their destination UIDs: where
		 * the copy did not learn them (no UIDPLUS), fingerprints. */
		ret = ms_store_msg_foreach(store, st->id, MS_MSG_DONE,
					   unmapped_rec, NULL);
		if (store_check(w, ret) < 0)
			return;
		if (ret > 0) {
			ms_warn("%s: folder \"%s\": destination UIDs of copied "
				"messages unknown (no UIDPLUS); matching "
				"messages by fingerprint", u->name,
				w->f->rep.source);
			reset = 1;
		}
	}
	if (reset && store_check(w, ms_store_folder_reset(store, st->id)) < 0)
		return;
	if (reset) {
		st->src_uidvalidity = st->dst_uidvalidity = 0;
		st->hwm = 0;
		st->modseq = 0;
		st->msgs = st->bytes = 0;
	}
	ret = u->reverse ? ms_store_rintent_count(store, st->id, &pending) :
		ms_store_msg_count(store, st->id, MS_MSG_INTENT, &pending);
	if (store_check(w, ret) < 0)
		return;
	st->src_uidvalidity = src_uv;
	st->dst_uidvalidity = dst_uv;
	snprintf(st->dst_name, sizeof(st->dst_name), "%s", w->f->dst);
	if (store_check(w, ms_store_folder_update(store, st)) < 0)
		return;
	w->old_hwm = st->hwm;
	if (pending > 0) {
		start_match(w, 1, 0);
	} else if (st->msgs == 0 && w->d_exists > 0) {
		/* Mail we have no record of is there already: pair it up
		 * rather than append a second copy. */
		start_match(w, 0, 1);
	} else {
		after_match(w);
	}
}

/* ---- match: pair destination messages with source ones ---- */

static int cmp_fp(const void *a, const void *b)
{
	const struct fpent *x = a, *y = b;

	if (x->h != y->h)
		return x->h < y->h ? -1 : 1;
	return x->uid < y->uid ? -1 : x->uid > y->uid;
}

static struct fpent *fp_take(struct worker *w, uint64_t h)
{
	size_t lo = 0, hi = w->nfps;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (w->fps[mid].h < h)
			lo = mid + 1;
		else
			hi = mid;
	}
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

struct known_ctx {
	struct ms_u32vec uids;
	uint32_t floor;
	int reverse;
};

/* Collects the UIDs done records claim on the side written to. */
static int collect_known(void *ctx, const struct ms_msg_rec *rec)
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

static int min_floor(void *ctx, const struct ms_msg_rec *rec)
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "NOOP", r, c);
		return;
	}
	start_match(w, 1, 0);
}

static void on_settle_timer(uv_timer_t *t)
{
	struct settle_timer *st = (struct settle_timer *)t;
	struct ujob *u = st->u;
	struct worker *w = st->w;

	u->timers--;
	uv_close((uv_handle_t *)t, on_retry_timer_close);
	if (w == NULL || u->failed || u->finished) {
		job_maybe_finish(u);
		return;
	}
	w->settle = NULL;
	/* The NOOP makes the server show what it saved meanwhile. */
	ms_imapc_cmd(w->d, on_settle_noop, w, "NOOP");
}

static int count_missing(void *ctx, const struct ms_msg_rec *rec)
{
	struct reconcile_ctx *rc = ctx;

	if (fp_take(rc->w, fingerprint(rec->size, rec->date,
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
		job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
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
		side_name(w, w->d), SETTLE_MS / 1000);
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

static void on_flag_store_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx);
static void flag_store(struct worker *w, uint32_t src_uid, uint32_t dst_uid,
		       const char *flags);

static int reconcile_one(void *ctx, const struct ms_msg_rec *rec)
{
	struct reconcile_ctx *rc = ctx;
	struct worker *w = rc->w;
	struct ms_store *store = w->u->m->store;
	struct fpent *e = fp_take(w, fingerprint(rec->size, rec->date,
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

	sort_n(w->fps, w->nfps, sizeof(*w->fps), cmp_fp);
	if (settle_wait(w) != 0)
		return;
	if (store_check(w, ms_store_begin(store)) < 0)
		return;
	if (foreach_intent(w, reconcile_one, &rc) != 0 ||
	    ms_store_folder_update(store, &w->f->st) < 0 ||
	    ms_store_commit(store) < 0) {
		ms_store_rollback(store);
		job_fail(w->u, "store: %s", ms_store_error(store));
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
	after_match(w);
}

static void on_match_src_reply(struct ms_imapc *c,
			       const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	if (--w->pending > 0)
		return;
	fps_free(w);
	if (store_check(w, ms_store_folder_update(w->u->m->store,
						  &w->f->st)) < 0)
		return;
	/* hwm stays 0: the copy pass walks the whole folder and skips what
	 * the match recorded as done. */
	after_match(w);
}

static void on_match_dst_reply(struct ms_imapc *c,
			       const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	if (w->match_reconcile) {
		match_finish_reconcile(w);
		return;
	}
	sort_n(w->fps, w->nfps, sizeof(*w->fps), cmp_fp);
	/* Now walk the source and pair each message with an unused
	 * destination one of the same fingerprint. */
	w->phase = PH_MATCH;
	w->pending = 1;
	if (w->s_exists == 0) {
		w->pending = 0;
		w->pending++;
		on_match_src_reply(c, &(struct ms_imap_response){
			.status = MS_STATUS_OK }, w);
		return;
	}
	ms_imapc_cmd(w->s, on_match_src_reply, w,
		     "UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE "
		     "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])");
}

/* Appends an unused entry to w->fps. Returns 0, or -1 when out of
 * memory. */
static int fps_push(struct worker *w, uint64_t h, uint32_t uid, uint64_t fhash)
{
	if (w->nfps == w->capfps) {
		size_t cap = w->capfps * 2 + 256;
		struct fpent *n = realloc(w->fps, cap * sizeof(*n));

		if (n == NULL)
			return -1;
		w->fps = n;
		w->capfps = cap;
	}
	w->fps[w->nfps].h = h;
	w->fps[w->nfps].uid = uid;
	w->fps[w->nfps].used = 0;
	w->fps[w->nfps].fhash = fhash;
	w->nfps++;
	return 0;
}

static void match_dst_fetch(struct worker *w, const struct fetch *f)
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
	if (fps_push(w, fingerprint(f->size, date,
				    w->match_reconcile ? "" : f->msgid),
		     f->uid, flags_hash(f->flags)) < 0)
		job_fail(w->u, "out of memory");
}

static void match_src_fetch(struct worker *w, const struct fetch *f)
{
	struct ms_store *store = w->u->m->store;
	struct ms_msg_rec rec;
	struct fpent *e;
	int64_t date;

	if (!f->has_uid || !f->has_size || !f->has_date ||
	    ms_imap_date_parse(f->date, &date) < 0)
		return;
	e = fp_take(w, fingerprint(f->size, date, f->msgid));
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
	if (e->fhash == flags_hash(f->flags))
		snprintf(rec.flags, sizeof(rec.flags), "%s", f->flags);
	rec.dst_uid = w->u->reverse ? f->uid : e->uid;
	if (store_check(w, ms_store_msg_put(store, w->f->st.id, &rec)) < 0)
		return;
	w->f->st.msgs++;
	w->f->st.bytes += f->size;
	if (e->fhash != flags_hash(f->flags))
		/* Same message, other flags: the read side's win. */
		flag_store(w, rec.src_uid, e->uid, f->flags);
}

static void start_match(struct worker *w, int reconcile, uint32_t floor)
{
	struct ms_store *store = w->u->m->store;
	struct known_ctx k = { 0 };

	w->phase = PH_MATCH;
	w->match_reconcile = reconcile;
	w->nfps = 0;
	k.reverse = w->u->reverse;
	if (reconcile) {
		floor = 0;
		if (foreach_intent(w, min_floor, &floor) != 0) {
			job_fail(w->u, "store: %s", ms_store_error(store));
			return;
		}
		if (floor == 0)
			floor = 1;
	}
	w->match_floor = floor;
	/* Destination messages already accounted for are no candidates. */
	k.floor = floor;
	if (reconcile && ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE,
					      collect_known, &k) != 0) {
		ms_u32vec_free(&k.uids);
		job_fail(w->u, "store: %s", ms_store_error(store));
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

static void window_free(struct window *win)
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	w->next_seq = w->min_new_seq != 0 ? w->min_new_seq : w->s_exists + 1;
	w->phase = PH_COPY;
	copy_pump(w);
}

static void start_copy(struct worker *w)
{
	w->fresh = w->f->st.msgs == 0;
	w->multiappend = ms_imapc_has_cap(w->d, "MULTIAPPEND");
	w->phase = PH_SEEK;
	w->pending = 0;
	w->min_new_seq = 0;
	if (w->s_exists == 0) {
		start_flags(w);
		return;
	}
	if (w->f->st.hwm == 0) {
		w->next_seq = 1;
		w->phase = PH_COPY;
		copy_pump(w);
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

static void on_meta_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct worker *w = ctx;
	struct window *win = w->meta;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "FETCH", r, c);
		return;
	}
	w->meta = NULL;
	if (write_intents(w, win) < 0) {
		window_free(win);
		job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
		return;
	}
	w->ready = win;
	copy_pump(w);
}

static void meta_fetch(struct worker *w, const struct fetch *f)
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
		job_fail(w->u, "folder \"%s\": FETCH: bad INTERNALDATE \"%.40s\"",
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
static void window_finish(struct worker *w, struct window *win)
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
				job_fail(u, "folder \"%s\": APPEND: the source "
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
		window_free(head);
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
	job_fail(u, "store: %s", ms_store_error(store));
}

static void on_append_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx)
{
	struct append_cmd *ac = ctx;
	struct window *win = ac->win;
	struct worker *w = win->w;
	uint32_t *uids = NULL;
	long n = 0;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "APPEND", r, c);
		return;
	}
	if (r->code != NULL && strcasecmp(r->code, "APPENDUID") == 0 &&
	    r->code_argc >= 2 && ms_imap_arg_str(&r->code_args[1]) != NULL) {
		uids = calloc(ac->count + 1, sizeof(*uids));
		if (uids != NULL)
			n = parse_uid_set(ms_imap_arg_str(&r->code_args[1]), uids,
					  ac->count);
		if (n != (long)ac->count) {
			/* Not fatal: the mapping is only needed for flag
			 * updates and expunges, which then warn. */
			ms_warn("%s: folder \"%s\": APPENDUID does not match "
				"the %u messages sent", w->u->name,
				w->f->rep.source, ac->count);
			n = 0;
		}
		for (long i = 0; i < n; i++)
			win->msgs[win->order[ac->first + i]].dst_uid = uids[i];
	}
	free(uids);
	if (--win->replies_pending == 0 && win->body_done)
		window_finish(w, win);
	copy_pump(w);
}

/* Ends the APPEND command being written, if any. */
static int append_close(struct worker *w, struct window *win)
{
	if (!win->open)
		return 0;
	win->open = 0;
	if (ms_imapc_append_end(w->d) < 0) {
		folder_fail(w, "APPEND", NULL, w->d);
		return -1;
	}
	return 0;
}

static void on_body_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			  void *ctx)
{
	struct worker *w = ctx;
	struct window *win = w->body;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	if (w->cur != NULL) {
		job_fail(w->u, "folder \"%s\": UID FETCH: reply before the "
			 "end of a message", w->f->rep.source);
		return;
	}
	w->body = NULL;
	window_queue(w, win);
	if (append_close(w, win) < 0)
		return;
	win->body_done = 1;
	if (win->replies_pending == 0)
		window_finish(w, win);
	copy_pump(w);
}

static size_t uid_list_set(const uint32_t *uids, size_t n, char **set_r);

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
		    uid_list_set(w->todo.v + w->next_seq, n, &set) == 0) {
			window_free(w->meta);
			w->meta = NULL;
			job_fail(w->u, "out of memory");
			return -1;
		}
		ms_imapc_cmd(w->s, on_meta_reply, w, "UID FETCH %s (UID FLAGS "
			     "INTERNALDATE RFC822.SIZE)", set);
		free(set);
		w->next_seq += (uint32_t)n;
		return 0;
	}
	end = w->next_seq + batch - 1;
	if (end > w->s_exists)
		end = w->s_exists;
	w->meta = window_new(w, end - w->next_seq + 1);
	if (w->meta == NULL) {
		job_fail(w->u, "out of memory");
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
static void copy_pump(struct worker *w)
{
	char set[8192];

	if (w->u->failed || w->phase != PH_COPY)
		return;
	/* At most MAX_APPENDS windows sent and not yet answered: bounds the
	 * open intents, and what a killed run can leave in flight. */
	unsigned int inflight = 0;

	for (struct window *a = w->appends; a != NULL; a = a->next)
		inflight++;
	if (w->body == NULL && w->ready != NULL && inflight < MAX_APPENDS) {
		struct window *win = w->ready;
		unsigned int tocopy = 0;

		w->ready = NULL;
		for (unsigned int i = 0; i < win->n; i++)
			tocopy += !win->msgs[i].skip;
		if (tocopy == 0) {
			window_queue(w, win);
			win->body_done = 1;
			window_finish(w, win);
		} else {
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
			start_verify(w);
		else
			start_flags(w);
	}
}

static int on_literal_start(void *ctx, const struct ms_imap_response *partial,
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
		job_fail(w->u, "folder \"%s\": UID FETCH: unexpected message "
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
			job_fail(w->u, "out of memory");
			return -1;
		}
		ac->win = win;
		ac->first = win->nstreamed;
		ac->next = win->acs;
		win->acs = ac;
		if (ms_imapc_append_begin(w->d, on_append_reply, ac,
					  w->u->reverse ? w->f->src :
					  w->f->dst) < 0) {
			folder_fail(w, "APPEND", NULL, w->d);
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
		folder_fail(w, "APPEND", NULL, w->d);
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
		extract_msgid(w->hdr, w->hdrlen, w->cur->msgid,
			      sizeof(w->cur->msgid));
		w->hdr_done = 1;
	}
}

static int on_literal_data(void *ctx, const void *data, size_t len)
{
	struct worker *w = ctx;

	if (w->cur == NULL)
		return -1;
	if (!w->hdr_done)
		header_scan(w, data, len);
	if (ms_imapc_append_data(w->d, data, len) < 0) {
		folder_fail(w, "APPEND", NULL, w->d);
		return -1;
	}
	if (!w->s_paused && ms_imapc_write_pending(w->d) >= MS_CONN_HIGH_WATER) {
		/* The destination is slower: stop reading the source. */
		w->s_paused = 1;
		ms_imapc_read_pause(w->s, 1);
	}
	return 0;
}

static void on_literal_end(void *ctx)
{
	struct worker *w = ctx;

	if (w->cur != NULL && !w->hdr_done)
		extract_msgid(w->hdr, w->hdrlen, w->cur->msgid,
			      sizeof(w->cur->msgid));
	w->cur = NULL;
}

static void on_dst_drain(struct ms_imapc *c, void *ctx)
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

static void repair_expunge(struct worker *w);

static void on_flag_store_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx)
{
	struct flag_store *fs = ctx;
	struct worker *w = fs->w;
	int ret;

	if (r == NULL || r->status != MS_STATUS_OK) {
		free(fs);
		folder_fail(w, "UID STORE", r, c);
		return;
	}
	/* The store learns the new flags only once the destination has
	 * them: a crash in between makes the next run set them again. */
	ret = ms_store_msg_set_flags(w->u->m->store, w->f->st.id, fs->src_uid,
				     fs->flags);
	free(fs);
	if (store_check(w, ret) < 0)
		return;
	w->f->rep.flags_updated++;
	w->u->flags_updated++;
	if (--w->pending == 0) {
		if (w->phase == PH_FLAGS)
			start_verify(w);
		else if (w->phase == PH_MATCH)
			on_match_src_reply(w->s, r, w);
		else if (w->phase == PH_RSCAN_DST)
			rb_scan_done(w);
		else if (w->phase == PH_REPAIR)
			repair_expunge(w);
	}
}

static void flag_store(struct worker *w, uint32_t src_uid, uint32_t dst_uid,
		       const char *flags)
{
	struct flag_store *fs = calloc(1, sizeof(*fs));

	if (fs == NULL) {
		job_fail(w->u, "out of memory");
		return;
	}
	fs->w = w;
	fs->src_uid = src_uid;
	snprintf(fs->flags, sizeof(fs->flags), "%s", flags);
	w->pending++;
	if (ms_imapc_cmd(w->d, on_flag_store_reply, fs,
			 "UID STORE %u FLAGS.SILENT (%s)", dst_uid, flags) < 0) {
		free(fs);
		folder_fail(w, "UID STORE", NULL, w->d);
	}
}

static void flags_fetch(struct worker *w, const struct fetch *f)
{
	struct ms_store *store = w->u->m->store;
	struct ms_msg_rec rec;
	int found = 0;

	if (!f->has_uid || !f->has_flags || f->uid > w->old_hwm)
		return;
	if (store_check(w, ms_store_msg_get(store, w->f->st.id, f->uid, &rec,
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
	flag_store(w, f->uid, rec.dst_uid, f->flags);
}

static void on_flags_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			   void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	if (--w->pending == 0)
		start_verify(w);
}

static void start_flags(struct worker *w)
{
	struct ms_folder_state *st = &w->f->st;

	w->phase = PH_FLAGS;
	w->pending = 1;
	if (w->old_hwm == 0 || w->s_exists == 0) {
		w->pending = 0;
		start_verify(w);
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

/* ---- verify ---- */

static int vlist_push(struct vlist *l, const struct fetch *f)
{
	if (l->n == l->cap) {
		size_t cap = l->cap * 2 + 64;
		struct vmsg *v = realloc(l->v, cap * sizeof(*v));

		if (v == NULL)
			return -1;
		l->v = v;
		l->cap = cap;
	}
	memset(&l->v[l->n], 0, sizeof(l->v[0]));
	l->sorted = 0;
	l->v[l->n].uid = f->uid;
	l->v[l->n].size = f->size;
	l->v[l->n].fhash = flags_hash(f->flags);
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
		sort_n(l->v, l->n, sizeof(*l->v), cmp_vmsg);
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

static void verify_free(struct worker *w)
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
static void verify_fetch(struct worker *w, int side, const struct fetch *f)
{
	int fwd = !w->u->reverse;

	if (!f->has_uid || !f->has_size || !f->has_flags)
		return;
	if (side == 0 && fwd && f->uid > w->f->st.hwm && !w->v_all_src) {
		w->v_later++;	/* arrived after this run's copy */
		return;
	}
	if (fwd && vlist_push(&w->vm[side], f) < 0) {
		job_fail(w->u, "out of memory");
		return;
	}
	if (side == 0) {
		if (ms_u32vec_push(&w->src_uids, f->uid) < 0) {
			job_fail(w->u, "out of memory");
			return;
		}
	} else if (ms_u32vec_push(&w->dst_uids, f->uid) < 0) {
		job_fail(w->u, "out of memory");
		return;
	} else if (w->u->reverse && !ms_u32vec_has(&w->known, f->uid)) {
		/* On the source, claimed by no record: it arrived there
		 * after the copy (w->known: the claimed source UIDs). */
		w->v_only[0]++;
		w->v_only[1] += f->size;
		w->v_only[2] += flags_hash(f->flags);
	}
	w->v_count[side]++;
	w->v_bytes[side] += f->size;
	w->v_fhash[side] += flags_hash(f->flags);
}

/* ---- dedup: copies an interrupted earlier run left behind ----
 *
 * A run killed with complete APPEND commands still in the server's input
 * buffer does not stop the server from saving them; if the next run's
 * reconciliation looked before the server had, those messages were sent
 * again. They are recognisable: destination messages no done record claims,
 * with the fingerprint of one that is claimed. They are expunged (exactly
 * those, UID EXPUNGE) before the verification is repeated. */

static void verify_dst(struct worker *w);
static int drop_vanished(struct worker *w);
static void repair_redo(struct worker *w);

struct claim_ctx {
	struct worker *w;
	struct ms_u32vec uids;
	int unknown;
};

static int collect_claims(void *ctx, const struct ms_msg_rec *rec)
{
	struct claim_ctx *cc = ctx;
	uint32_t uid = rec_wr_uid(cc->w->u, rec);

	if (uid == 0) {
		cc->unknown = 1;
		return 0;
	}
	if (ms_u32vec_push(&cc->uids, uid) < 0)
		return -1;
	return fps_push(cc->w, fingerprint(rec->size, rec->date, rec->msgid),
			uid, 0);
}

static int fp_exists(const struct worker *w, uint64_t h)
{
	size_t lo = 0, hi = w->nfps;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (w->fps[mid].h < h)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < w->nfps && w->fps[lo].h == h;
}

static void dedup_fetch(struct worker *w, const struct fetch *f)
{
	int64_t date;

	/* A record written without the Message-ID (reconciled) matches
	 * on size and date alone. */
	if (!f->has_uid || !f->has_size || !f->has_date ||
	    ms_imap_date_parse(f->date, &date) < 0 ||
	    (!fp_exists(w, fingerprint(f->size, date, f->msgid)) &&
	     !fp_exists(w, fingerprint(f->size, date, ""))))
		return;
	if (ms_u32vec_push(&w->expunge, f->uid) < 0)
		job_fail(w->u, "out of memory");
}

static size_t uid_list_set(const uint32_t *uids, size_t n, char **set_r)
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID EXPUNGE", r, c);
		return;
	}
	if (--w->pending > 0)
		return;
	if (w->phase == PH_REXPUNGE) {
		rb_expunged(w);
		return;
	}
	if (w->phase == PH_REPAIR) {
		repair_redo(w);
		return;
	}
	if (w->phase == PH_EXPUNGE) {
		/* Gone from the destination: now their records go. */
		if (drop_vanished(w) < 0)
			return;
		w->f->rep.expunged += w->expunge.n;
		w->u->expunged += w->expunge.n;
	}
	verify_dst(w);
}

/* Expunges exactly the UIDs in w->expunge on the side written to: \Deleted
 * on them, then UID EXPUNGE (UIDPLUS) of them, which leaves other \Deleted
 * mail be. on_expunge_reply() goes on when both are answered. Returns 0,
 * or -1 when the job failed. */
static int expunge_uids(struct worker *w)
{
	char *set = NULL;

	ms_u32vec_sort(&w->expunge);
	if (uid_list_set(w->expunge.v, w->expunge.n, &set) == 0) {
		job_fail(w->u, "out of memory");
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	fps_free(w);
	if (w->expunge.n == 0) {
		verify_dst(w);
		return;
	}
	ms_warn("%s: folder \"%s\": removing %zu duplicate(s) an interrupted "
		"earlier run left on the %s", w->u->name,
		w->u->reverse ? w->f->rep.source : w->f->rep.destination,
		w->expunge.n, side_name(w, w->d));
	w->f->rep.repaired += w->expunge.n;
	w->u->repaired += w->expunge.n;
	expunge_uids(w);
}

static void start_dedup(struct worker *w)
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
		job_fail(w->u, "store: %s", ms_store_error(w->u->m->store));
		return;
	}
	ms_u32vec_sort(&cc.uids);
	sort_n(w->fps, w->nfps, sizeof(*w->fps), cmp_fp);
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
	sort_n(unclaimed, nun, sizeof(*unclaimed), cmp_u32);
	uid_list_set(unclaimed, nun, &set);
	free(unclaimed);
	if (set == NULL) {
		job_fail(w->u, "out of memory");
		return;
	}
	w->phase = PH_DEDUP;
	ms_imapc_cmd(w->d, on_dedup_reply, w,
		     "UID FETCH %s (UID RFC822.SIZE INTERNALDATE "
		     "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])", set);
	free(set);
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
		job_fail(w->u, "store: %s", ms_store_error(store));
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
	folder_done(w);
}

static void on_verify_dst_reply(struct ms_imapc *c,
				const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	/* More on the side written to than expected: copies a killed run
	 * left there? (In a rollback, source messages no record claims.) */
	if ((w->u->reverse ? w->v_only[0] > 0 : w->v_count[1] > w->v_count[0]) &&
	    !w->dedup_done && !w->u->m->verify_only &&
	    ms_imapc_has_cap(w->d, "UIDPLUS")) {
		start_dedup(w);
		return;
	}
	if (w->u->reverse)
		rb_verify_done(w);
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
		job_fail(w->u, "out of memory");
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
static void digest_fetch(struct worker *w, int side, const struct fetch *f)
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

/* The reply to one of w->pending UID FETCHes: 1 when it was the last one
 * due, 0 while others are (or when it failed the folder). */
static int fetch_reply_last(struct worker *w, struct ms_imapc *c,
			    const struct ms_imap_response *r)
{
	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return 0;
	}
	return --w->pending == 0;
}

static void on_digest_reply(struct ms_imapc *c,
			    const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (!fetch_reply_last(w, c, r))
		return;
	/* The copy's hooks back on the side read from, none on the other. */
	worker_hooks(w);
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
			job_fail(w->u, "out of memory");
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
	if (fetch_reply_last(ctx, c, r))
		repair_expunge(ctx);
}

/* The source's flags of a message whose copy has others: set them. */
static void repair_flags_fetch(struct worker *w, const struct fetch *f)
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
		flag_store(w, f->uid, w->rp_flags_dst.v[lo], f->flags);
}

/* Copies that are to be copied again: records gone, the high-water mark
 * below the first, then the copy pass. */
static void repair_redo(struct worker *w)
{
	struct ujob *u = w->u;
	struct ms_store *store = u->m->store;
	struct ms_folder_state *st = &w->f->st;
	int ret;

	if (w->rp_redo.n == 0) {
		start_verify(w);
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
		job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	u->m->msgs_todo += w->rp_redo.n;
	start_copy(w);
}

static void repair_expunge(struct worker *w)
{
	if (w->expunge.n > 0)
		expunge_uids(w);	/* on_expunge_reply(): repair_redo() */
	else
		repair_redo(w);
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
		repair_expunge(w);
		return;
	}
	if (uid_list_set(w->rp_flags.v, w->rp_flags.n, &set) == 0) {
		job_fail(u, "out of memory");
		return;
	}
	w->pending = 1;
	ms_imapc_cmd(w->s, on_repair_flags_reply, w, "UID FETCH %s (UID FLAGS)",
		     set);
	free(set);
}

static void verify_dst(struct worker *w)
{
	w->phase = PH_VERIFY_DST;
	w->v_count[1] = w->v_bytes[1] = w->v_fhash[1] = 0;
	memset(w->v_only, 0, sizeof(w->v_only));
	w->dst_uids.n = 0;
	w->vm[1].n = 0;
	ms_imapc_cmd(w->d, on_verify_dst_reply, w,
		     "UID FETCH 1:* (UID RFC822.SIZE FLAGS)");
}

/* Walks the store's done records (in UID order) against the source's
 * UIDs: a record whose UID the source no longer has was expunged there.
 * Its source UID goes to w->vanished and its destination UID to
 * w->expunge; the record itself stays until the destination has expunged
 * the message (drop_vanished()). */
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
static int drop_vanished(struct worker *w)
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
		job_fail(w->u, "store: %s", ms_store_error(store));
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	/* Halfway: the side read from is counted, the other not yet. */
	MS_CRASH_POINT(w->u->reverse ? "rollback.verify" : "copy.verify");
	ms_u32vec_sort(&w->src_uids);
	if (w->u->reverse) {
		rb_verify_claims(w);
		return;
	}
	w->v_missing = 0;
	if (w->v_norecs) {
		verify_dst(w);		/* verify-only: no record applies */
		return;
	}
	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, count_present,
				 &mc) != 0) {
		job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	for (; mc.pos < w->src_uids.n; mc.pos++)
		if (w->v_missing++ == 0)
			w->v_first_missing = w->src_uids.v[mc.pos];
	if (w->u->m->verify_only) {
		verify_dst(w);		/* expunges are left as they are */
		return;
	}
	w->expunge.n = w->vanished.n = 0;
	w->vanished_bytes = 0;
	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, find_vanished,
				 w) != 0) {
		job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	if (w->expunge.n == 0 || !ms_imapc_has_cap(w->d, "UIDPLUS")) {
		if (w->expunge.n > 0)
			ms_warn("%s: folder \"%s\": %zu message(s) gone from the "
				"source stay on the destination (no UIDPLUS)",
				w->u->name, w->f->rep.source, w->expunge.n);
		if (w->vanished.n > 0 && drop_vanished(w) < 0)
			return;
		verify_dst(w);
		return;
	}
	/* Expunge exactly those: UID EXPUNGE leaves other \Deleted mail be.
	 * on_expunge_reply() drops their records afterwards. */
	w->phase = PH_EXPUNGE;
	expunge_uids(w);
}

static void start_verify(struct worker *w)
{
	w->phase = PH_VERIFY_SRC;
	w->v_count[0] = w->v_bytes[0] = w->v_fhash[0] = 0;
	w->src_uids.n = 0;
	w->vm[0].n = 0;
	w->v_later = 0;
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
static int vo_plan_folder(struct ujob *u, struct fjob *f)
{
	struct ms_mover *m = u->m;
	struct row_find rf = { f->src, &f->st };
	int ret = ms_store_folder_foreach(m->store, u->user_id, find_row, &rf);

	if (ret < 0) {
		job_fail(u, "store: %s", ms_store_error(m->store));
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

static void vo_open(struct worker *w, uint32_t src_uv, uint32_t dst_uv)
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
	start_verify(w);
}

/* ---- untagged dispatch ---- */

static void rscan_src_fetch(struct worker *w, const struct fetch *f);
static void rscan_dst_fetch(struct worker *w, const struct fetch *f);

static void on_src_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx)
{
	struct worker *w = ctx;
	struct fetch f;
	uint64_t n;

	if (w->f == NULL || w->u->failed)
		return;
	if (w->phase == PH_OPEN) {
		select_data(r, &w->s_uidvalidity, &w->s_uidnext, &w->s_exists,
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
	if (parse_fetch(r, &f) < 0)
		return;
	switch (w->phase) {
	case PH_MATCH:
		match_src_fetch(w, &f);
		break;
	case PH_SEEK:
		if (f.has_uid && f.uid > w->f->st.hwm &&
		    (w->min_new_seq == 0 || f.seq < w->min_new_seq))
			w->min_new_seq = f.seq;
		break;
	case PH_COPY:
		if (f.has_size && !f.has_body)
			meta_fetch(w, &f);
		break;
	case PH_FLAGS:
		flags_fetch(w, &f);
		break;
	case PH_VERIFY_SRC:
		verify_fetch(w, 0, &f);
		break;
	case PH_DIGEST:
		digest_fetch(w, 0, &f);
		break;
	case PH_REPAIR:
		repair_flags_fetch(w, &f);
		break;
	case PH_RSCAN_DST:
		rscan_dst_fetch(w, &f);
		break;
	}
}

static int known_dst(struct worker *w, uint32_t uid)
{
	return ms_u32vec_has(&w->known, uid);
}

static void on_dst_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			    void *ctx)
{
	struct worker *w = ctx;
	struct fetch f;

	if (w->f == NULL || w->u->failed)
		return;
	if (w->phase == PH_OPEN) {
		select_data(r, &w->d_uidvalidity, &w->d_uidnext, &w->d_exists,
			    NULL, NULL);
		return;
	}
	if (parse_fetch(r, &f) < 0)
		return;
	if (w->phase == PH_MATCH) {
		if (w->match_reconcile && known_dst(w, f.uid))
			return;
		match_dst_fetch(w, &f);
	} else if (w->phase == PH_VERIFY_DST) {
		verify_fetch(w, 1, &f);
	} else if (w->phase == PH_DEDUP) {
		dedup_fetch(w, &f);
	} else if (w->phase == PH_DIGEST) {
		digest_fetch(w, 1, &f);
	} else if (w->phase == PH_RSCAN_SRC) {
		rscan_src_fetch(w, &f);
	}
}

/* ---- rollback: the reverse delta ----
 *
 * A rollback job's workers read from the destination (w->s) and write to
 * the source (w->d); open, reconcile, match, copy and verify above serve
 * both directions. What is the rollback's own: the plan (which destination
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

struct rows {
	struct ms_folder_state *v;
	size_t n, cap;
};

/* Collects the folder rows a forward copy opened (only those hold
 * records). */
static int collect_row(void *ctx, const struct ms_folder_state *st)
{
	struct rows *r = ctx;

	if (st->dst_uidvalidity == 0)
		return 0;
	if (r->n == r->cap) {
		size_t cap = r->cap * 2 + 16;
		struct ms_folder_state *n = realloc(r->v, cap * sizeof(*n));

		if (n == NULL)
			return -1;
		r->v = n;
		r->cap = cap;
	}
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
	to_utf8(f->rep.source, sizeof(f->rep.source), f->src, u->src_sep);
	to_utf8(f->rep.destination, sizeof(f->rep.destination), f->dst,
		u->dst_sep);
}

/* The source name for destination folder d, which no record maps: the
 * source's folder of d's special use when no other folder job has it,
 * else the reverse of the separator rule. Returns 0 (out filled), 1 when
 * d has no name on the source that maps back to it, -1 when out of
 * memory. */
static int rb_source_name(struct ujob *u, const struct dfolder *d,
			  const struct fjob *jobs, unsigned int njobs,
			  char *out, size_t outsz)
{
	char back[1024], *t;
	const struct fjob *sf;

	out[0] = '\0';
	for (unsigned int i = 0; d->special[0] != '\0' && i < u->nfolders &&
	     out[0] == '\0'; i++) {
		const struct fjob *s = &u->folders[i];
		unsigned int j;

		if (s->noselect || strcasecmp(s->special, d->special) != 0)
			continue;
		for (j = 0; j < njobs && !name_eq(jobs[j].src, s->src); j++)
			;
		if (j == njobs)
			snprintf(out, outsz, "%s", s->src);
	}
	if (out[0] == '\0') {
		t = reverse_name(d->name, u->src_sep, u->dst_sep);
		if (t == NULL)
			return -1;
		snprintf(out, outsz, "%s", t);
		free(t);
	}
	/* The name must come back as it is, or a later forward copy would
	 * put the folder somewhere else. */
	sf = find_folder(u, out);
	if (map_forward(u, out, sf != NULL ? sf->special : "", back,
			sizeof(back)) < 0)
		return -1;
	return name_eq(back, d->name) ? 0 : 1;
}

/* The folder jobs for the folders a copy made: each goes back where it came
 * from. Returns 0, or -1 when the job failed. */
static int rb_plan_copied(struct ujob *u, const struct rows *rows,
			  struct fjob *jobs, unsigned int *n)
{
	struct ms_store *store = u->m->store;

	for (size_t i = 0; i < rows->n; i++) {
		const struct ms_folder_state *st = &rows->v[i];
		const struct fjob *sf = find_folder(u, st->src_name);
		struct dfolder *d = find_dfolder(u, st->dst_name);
		struct fjob *f;
		int ret = folder_wanted(u, st->src_name);

		if (ret < 0) {
			job_fail(u, "out of memory");
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
				job_fail(u, "store: %s", ms_store_error(store));
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
		to_utf8(dn, sizeof(dn), d->name, u->dst_sep);
		ret = rb_source_name(u, d, jobs, *n, src, sizeof(src));
		if (ret > 0) {
			job_fail(u, "folder \"%s\" on the destination has no "
				 "name on the source that a copy would map back "
				 "to it (a level holds the source's separator "
				 "'%c'?); nothing was rolled back (rename it on "
				 "the destination, or --exclude it)", dn,
				 u->src_sep);
			return -1;
		}
		if (ret == 0)
			ret = folder_wanted(u, src);
		if (ret < 0) {
			job_fail(u, "out of memory");
			return -1;
		}
		if (ret == 0)
			continue;
		for (unsigned int j = 0; j < *n; j++)
			if (name_eq(jobs[j].src, src))
				same = &jobs[j];
		if (same != NULL && !same->rep.dst_deleted) {
			job_fail(u, "folders \"%s\" and \"%s\" on the destination "
				 "would both become \"%s\" on the source; nothing "
				 "was merged (rename one, or --exclude one)",
				 same->rep.destination, dn, same->rep.source);
			return -1;
		}
		/* (A folder deleted on the destination and made again under
		 * a name that maps to it: this folder job is that one.) */
		f = same != NULL ? same : &jobs[(*n)++];
		sf = find_folder(u, src);
		rb_fjob(u, f, src, d->name, sf);
		if (ms_store_folder_get(store, u->user_id, src, &f->st) < 0) {
			job_fail(u, "store: %s", ms_store_error(store));
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
static void rb_plan(struct ujob *u)
{
	struct ms_mover *m = u->m;
	struct ms_imapc *sc = src_conn(&u->workers[0]);
	struct rows rows = { 0 };
	struct fjob *jobs = NULL, *f;
	unsigned int n = 0, cap;
	char q[2100];

	if (!ms_imapc_has_cap(sc, "UIDPLUS")) {
		job_fail(u, "source: the server has no UIDPLUS; a rollback needs "
			 "it to learn the UIDs of the messages it appends");
		return;
	}
	if (ms_store_folder_foreach(m->store, u->user_id, collect_row,
				    &rows) != 0) {
		job_fail(u, "store: %s", ms_store_error(m->store));
		goto out;
	}
	cap = (unsigned int)rows.n + u->ndfolders + 1;
	jobs = calloc(cap, sizeof(*jobs));
	if (jobs == NULL) {
		job_fail(u, "out of memory");
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
			job_fail(u, "folder \"%s\": name cannot be sent",
				 f->rep.source);
			goto out;
		}
		if (f->rep.created && strcasecmp(f->src, "INBOX") != 0) {
			u->plan_pending++;
			ms_imapc_cmd(sc, on_create_reply, u, "CREATE %s", q);
		}
		/* Subscriptions as the destination has them. */
		if (f->dst_subscribed != f->subscribed) {
			u->plan_pending++;
			ms_imapc_cmd(sc, on_plan_reply, u, "%s %s",
				     f->dst_subscribed ? "SUBSCRIBE" :
				     "UNSUBSCRIBE", q);
		}
	}
	if (--u->plan_pending == 0)
		plan_step(u);
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

	if (w->nrrecs == w->caprrecs) {
		size_t cap = w->caprrecs * 2 + 256;
		struct rrec *n = realloc(w->rrecs, cap * sizeof(*n));

		if (n == NULL)
			return -1;
		w->rrecs = n;
		w->caprrecs = cap;
	}
	rr = &w->rrecs[w->nrrecs++];
	memset(rr, 0, sizeof(*rr));
	rr->src_uid = rec->src_uid;
	rr->dst_uid = rec->dst_uid;
	rr->size = rec->size;
	rr->fhash = flags_hash(rec->flags);
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	if (--w->pending == 0)
		rb_scan_done(w);
}

static void on_rscan_src_reply(struct ms_imapc *c,
			       const struct ms_imap_response *r, void *ctx)
{
	struct worker *w = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	if (w->nfps > 1)
		sort_n(w->fps, w->nfps, sizeof(*w->fps), cmp_fp_uid);
	/* The destination's flags are compared as they come; flag STOREs
	 * to the source count in w->pending too. */
	w->phase = PH_RSCAN_DST;
	w->pending = 1;
	ms_imapc_cmd(w->s, on_rscan_dst_reply, w, "UID FETCH 1:* (UID FLAGS)");
}

/* The scan: records first, then the source's UIDs and flags, then the
 * destination's. */
static void rb_start_scan(struct worker *w)
{
	struct ms_store *store = w->u->m->store;

	w->nrrecs = 0;
	w->nfps = 0;
	w->todo.n = 0;
	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE, load_rrec,
				 w) != 0) {
		job_fail(w->u, "store: %s", ms_store_error(store));
		return;
	}
	if (w->nrrecs > 1)
		sort_n(w->rrecs, w->nrrecs, sizeof(*w->rrecs), cmp_rrec);
	w->phase = PH_RSCAN_SRC;
	ms_imapc_cmd(w->d, on_rscan_src_reply, w, "UID FETCH 1:* (UID FLAGS)");
}

static void rscan_src_fetch(struct worker *w, const struct fetch *f)
{
	if (f->has_uid && f->has_flags &&
	    fps_push(w, 0, f->uid, flags_hash(f->flags)) < 0)
		job_fail(w->u, "out of memory");
}

static void rscan_dst_fetch(struct worker *w, const struct fetch *f)
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
			job_fail(w->u, "out of memory");
		return;
	}
	fh = flags_hash(f->flags);
	if (sp->fhash != fh)
		flag_store(w, rr->src_uid, rr->src_uid, f->flags);
	else if (rr->fhash != fh)
		/* The servers agree already (a STORE whose answer a killed
		 * run did not see): the record catches up. */
		store_check(w, ms_store_msg_set_flags(store, w->f->st.id,
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
	job_fail(w->u, "store: %s", ms_store_error(store));
	return -1;
}

static void rb_scan_done(struct worker *w)
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
			job_fail(w->u, "out of memory");
			return;
		}
	}
	if (rb_drop_records(w) < 0)
		return;
	if (w->expunge.n > 0) {
		w->phase = PH_REXPUNGE;
		expunge_uids(w);
		return;
	}
	rb_start_copy(w);
}

static void rb_expunged(struct worker *w)
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

	u32vec_uniq(&w->todo);
	m->msgs_todo += w->todo.n;
	w->multiappend = ms_imapc_has_cap(w->d, "MULTIAPPEND");
	w->next_seq = 0;
	w->phase = PH_COPY;
	copy_pump(w);
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
static void rb_verify_claims(struct worker *w)
{
	struct ms_store *store = w->u->m->store;
	struct rclaims c = { { 0 }, { 0 } };

	if (ms_store_msg_foreach(store, w->f->st.id, MS_MSG_DONE,
				 collect_rclaim, &c) != 0) {
		ms_u32vec_free(&c.src);
		ms_u32vec_free(&c.dst);
		job_fail(w->u, "store: %s", ms_store_error(store));
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
	verify_dst(w);
}

/* Both sides are in: side 0 the destination, side 1 the source, of which
 * v_only are the messages no record claims (kept, not compared). */
static void rb_verify_done(struct worker *w)
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
	folder_done(w);
}

/* ---- users ---- */

static const struct ms_imap_parser_callbacks literal_hooks = {
	.literal_start = on_literal_start,
	.literal_data = on_literal_data,
	.literal_end = on_literal_end,
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
		folder_fail(w, "connection", NULL, c);
		return;
	}
	snprintf(u->conn_error, sizeof(u->conn_error), "%s: %s",
		 c == w->s ? "source" : "destination", ms_imapc_error(c));
	if (u->planned != 1) {
		job_fail(u, "%s", u->conn_error);
		return;
	}
	worker_close(w);
	job_schedule(u);
}

static void worker_hooks(struct worker *w)
{
	struct ms_imap_parser_callbacks cb = literal_hooks;

	cb.ctx = w;
	ms_imapc_set_literal_hooks(w->s, &cb);
	ms_imapc_set_drain(w->d, on_dst_drain, w);
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
	/* Refusals are reported like any failure, with u->user_id 0. */
	job_link(u);
	if (!found) {
		job_fail(u, "nothing to verify: the store has no copy of this "
			 "user");
		return 0;
	}
	if (m->src.cfg.proto != MS_PROTO_IMAP) {
		job_fail(u, "source: a POP3 source is verified by the copy, "
			 "not on its own");
		return 0;
	}
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

	if (u == NULL)
		return -1;
	if (m->verify_only)
		return vo_add_user(u);
	if (ms_store_user_get(m->store, user, &u->user_id) < 0 ||
	    ms_store_user_set_state(m->store, u->user_id, "copying", NULL) < 0) {
		job_free(u);
		return -1;
	}
	job_link(u);
	if (m->src.cfg.proto == MS_PROTO_POP3) {
		pop3_start(u);
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
	    (found && ms_store_folder_foreach(m->store, info.id, collect_row,
					      &rows) != 0)) {
		free(rows.v);
		job_free(u);
		return -1;
	}
	free(rows.v);
	/* Refusals are reported like any failure (done() from the loop),
	 * with u->user_id 0: the store is left as it is. */
	job_link(u);
	if (!found || rows.n == 0) {
		job_fail(u, "nothing to roll back: the store has no copy of "
			 "this user (never migrated to the destination)");
		return 0;
	}
	if (m->src.cfg.proto != MS_PROTO_IMAP) {
		job_fail(u, "source: a rollback needs an IMAP source");
		return 0;
	}
	for (struct ujob *o = m->jobs; o != NULL; o = o->next) {
		if (o != u && strcmp(o->name, user) == 0 && !o->finished) {
			job_fail(u, "a copy of this user is running");
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
	ms_secret_free(&m->src.password);
	ms_secret_free(&m->dst.password);
	for (char **p = m->include; p != NULL && *p != NULL; p++)
		free(*p);
	for (char **p = m->exclude; p != NULL && *p != NULL; p++)
		free(*p);
	free(m->include);
	free(m->exclude);
	free(m);
}

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
	job_fail(u, "source: %s", ms_pop3c_error(u->pop));
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
	if (ps->nmsgs == ps->cap) {
		size_t cap = ps->cap * 2 + 64;
		struct pmsg *nm = realloc(ps->msgs, cap * sizeof(*nm));

		if (nm == NULL)
			return;
		ps->msgs = nm;
		ps->cap = cap;
	}
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

static void on_pop3_reply(struct ms_pop3c *c, int ok, const char *text,
			  void *ctx)
{
	struct ujob *u = ctx;

	if (ok < 0) {
		pop3_fail_conn(u);
		return;
	}
	if (!ok) {
		job_fail(u, "source: -ERR %s", text);
		return;
	}
	if (--pstate(u)->pending == 0)
		pop3_step(u);
}

static void on_pop3_dst_reply(struct ms_imapc *c,
			      const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(&u->workers[0], "SELECT", r, c);
		return;
	}
	if (--pstate(u)->pending == 0)
		pop3_step(u);
}

static void on_pop3_dst_untagged(struct ms_imapc *c,
				 const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct pop3_state *ps = pstate(u);
	struct fetch f;

	if (w->phase == PH_OPEN) {
		select_data(r, &w->d_uidvalidity, &w->d_uidnext, &w->d_exists,
			    NULL, NULL);
		return;
	}
	if (parse_fetch(r, &f) < 0)
		return;
	if (w->phase == PH_MATCH) {
		if (!known_dst(w, f.uid))
			match_dst_fetch(w, &f);
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "APPEND", r, c);
		return;
	}
	if (r->code != NULL && strcasecmp(r->code, "APPENDUID") == 0 &&
	    r->code_argc >= 2) {
		uint64_t n;

		if (ms_imap_arg_number(&r->code_args[1], &n) == 0)
			dst_uid = (uint32_t)n;
	}
	if (ms_store_msg_get_uidl(store, w->f->st.id, pm->uidl, &rec,
				  &found) < 0 || !found) {
		job_fail(u, "store: %s", ms_store_error(store));
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
	job_fail(u, "store: %s", ms_store_error(store));
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
		job_fail(u, "source: RETR %u: -ERR %s", pm->n, text);
		return;
	}
	memset(&rec, 0, sizeof(rec));
	snprintf(rec.uidl, sizeof(rec.uidl), "%s", pm->uidl);
	rec.state = MS_MSG_INTENT;
	rec.size = ps->len;
	end = ps->len > 0 ? memmem(ps->buf, ps->len, "\r\n\r\n", 4) : NULL;
	hdrlen = end != NULL ? (size_t)(end - ps->buf) + 2 : ps->len;
	extract_msgid(ps->buf, hdrlen, rec.msgid, sizeof(rec.msgid));
	rec.dst_floor = w->d_uidnext != 0 ? w->d_uidnext : 1;
	/* The intent is committed before the bytes leave. */
	if (ms_store_msg_put(store, w->f->st.id, &rec) < 0) {
		job_fail(u, "store: %s", ms_store_error(store));
		return;
	}
	if (ms_imapc_append_begin(w->d, on_pop3_append, u, w->f->dst) < 0 ||
	    ms_imapc_append_msg(w->d, "", NULL, ps->len) < 0 ||
	    ms_imapc_append_data(w->d, ps->buf, ps->len) < 0 ||
	    ms_imapc_append_end(w->d) < 0) {
		folder_fail(w, "APPEND", NULL, w->d);
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
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
	job_maybe_finish(u);
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
	if (store_check(w, ms_store_folder_update(u->m->store, &w->f->st)) < 0)
		return;
	ms_imapc_cmd(w->d, on_pop3_verify, u, "UID FETCH 1:* (UID RFC822.SIZE)");
}

static int pop3_reconcile_one(void *ctx, const struct ms_msg_rec *rec)
{
	struct worker *w = ctx;
	struct ms_store *store = w->u->m->store;
	struct fpent *e = fp_take(w, fingerprint(rec->size, 0, rec->msgid));
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

	if (r == NULL || r->status != MS_STATUS_OK) {
		folder_fail(w, "UID FETCH", r, c);
		return;
	}
	/* POP3 has no INTERNALDATE: fingerprints carry date 0. */
	for (size_t i = 0; i < w->nfps; i++)
		w->fps[i].h = w->fps[i].h;
	sort_n(w->fps, w->nfps, sizeof(*w->fps), cmp_fp);
	if (ms_store_begin(store) < 0 ||
	    ms_store_msg_foreach(store, w->f->st.id, MS_MSG_INTENT,
				 pop3_reconcile_one, w) != 0 ||
	    ms_store_folder_update(store, &w->f->st) < 0 ||
	    ms_store_commit(store) < 0) {
		ms_store_rollback(store);
		job_fail(u, "store: %s", ms_store_error(store));
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
			job_fail(u, "store: %s", ms_store_error(store));
			return;
		}
		if (st->dst_uidvalidity != 0 &&
		    st->dst_uidvalidity != w->d_uidvalidity) {
			ms_warn("%s: destination INBOX UIDVALIDITY changed; "
				"starting over by UIDL", u->name);
			if (store_check(w, ms_store_folder_reset(store, st->id)) < 0)
				return;
			st->msgs = st->bytes = 0;
		}
		st->dst_uidvalidity = w->d_uidvalidity;
		snprintf(st->dst_name, sizeof(st->dst_name), "%s", w->f->dst);
		if (store_check(w, ms_store_folder_update(store, st)) < 0 ||
		    store_check(w, ms_store_msg_count(store, st->id,
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
					     min_floor, &floor);
			if (floor == 0)
				floor = 1;
			k.floor = floor;
			ms_store_msg_foreach(store, st->id, MS_MSG_DONE,
					     collect_known, &k);
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
		job_fail(u, "store: %s", ms_store_error(store));
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

static void on_pop3_ready(struct ms_pop3c *c, const char *error, void *ctx)
{
	struct ujob *u = ctx;

	if (error != NULL) {
		job_fail(u, "source: %s", error);
		return;
	}
	u->workers[0].s_ready = 1;
	pop3_maybe_begin(u);
}

static void on_pop3_dst_ready(struct ms_imapc *c, const char *error, void *ctx)
{
	struct ujob *u = ctx;

	if (error != NULL) {
		job_fail(u, "destination: %s", error);
		return;
	}
	u->workers[0].d_ready = 1;
	pop3_maybe_begin(u);
}

static void pop3_connect_dst(void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct server *s = &u->m->dst;
	struct ms_imapc_settings set = server_settings(s, u->dst_login,
							u->dst_pw);

	w->have_dst_slot = 1;
	w->d = ms_imapc_new(u->m->loop, &set, on_pop3_dst_ready, u);
	if (w->d == NULL)
		job_fail(u, "out of memory");
}

static void pop3_connect_src(void *ctx)
{
	struct ujob *u = ctx;
	struct worker *w = &u->workers[0];
	struct server *s = &u->m->src;
	struct ms_imapc_settings set = server_settings(s, u->src_login,
							u->src_pw);
	int r;

	w->have_src_slot = 1;
	u->pop = ms_pop3c_new(u->m->loop, &set, on_pop3_ready, u);
	if (u->pop == NULL) {
		job_fail(u, "source: cannot connect to %s:%u", s->cfg.host,
			 s->cfg.port);
		return;
	}
	r = slot_acquire(&u->m->dst, pop3_connect_dst, u);
	if (r == 1)
		pop3_connect_dst(u);
	else if (r < 0)
		job_fail(u, "out of memory");
}

static void pop3_start(struct ujob *u)
{
	struct worker *w = &u->workers[0];
	struct fjob *f;
	int r;

	u->folders = calloc(1, sizeof(*u->folders));
	u->dfolders = calloc(1, sizeof(struct pop3_state) > sizeof(struct dfolder) ?
			     sizeof(struct pop3_state) : sizeof(struct dfolder));
	if (u->folders == NULL || u->dfolders == NULL) {
		job_fail(u, "out of memory");
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
	r = slot_acquire(&u->m->src, pop3_connect_src, u);
	if (r == 1)
		pop3_connect_src(u);
	else if (r < 0)
		job_fail(u, "out of memory");
}
