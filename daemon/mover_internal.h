/* What the mover's files (mover.c, mover_plan.c, mover_copy.c,
 * mover_verify.c, mover_intent.c, mover_rollback.c, mover_pop3.c,
 * mover_phase.c) share:
 * the job, worker and folder structures and the mv_ functions one file
 * calls in another. Nothing outside the mover includes it: the mover's
 * interface is mover.h. */
#ifndef MS_MOVER_INTERNAL_H
#define MS_MOVER_INTERNAL_H

#include <stdint.h>

#include <openssl/evp.h>

#include "doveadm.h"
#include "imapc.h"
#include "mailbox.h"
#include "mover.h"
#include "pop3c.h"
#include "util.h"

#define MAX_WORKERS 16
#define MAX_APPENDS 4
#define MAX_RETRIES 3		/* per folder, after a lost connection */
#define RETRY_DELAY_MS 1000
#define SETTLE_MS 2000		/* reconcile: the wait for a killed run's
				   APPENDs before sending again
				   (mover_intent.c) */
#define MSGID_MAX 500
#define HDR_MAX (32 * 1024)
#define FLAGS_MAX 1000

struct mover;
struct ujob;

struct waiter {
	struct waiter *next;
	struct ujob *u;			/* whose */
	void (*cb)(void *ctx);
	void *ctx;
};

struct server {
	struct ms_server_cfg cfg;	/* cfg.max_conns: the slots, changed
					   by ms_mover_set_limits() */
	char *password;
	unsigned int active;
	struct waiter *waiters, *waiters_tail;
	struct ms_pacer *pacer;		/* the source's pace; NULL: none */
};

struct ms_mover {
	uv_loop_t *loop;
	struct ms_store *store;
	struct server src, dst;
	char **include, **exclude;
	unsigned int batch;
	int verify_only, verify_content;
	int caller_flips;		/* ms_mover_opts */
	enum ms_mover_names names;
	int identity;			/* a doveadm API to keep folders'
					   UIDVALIDITY and UIDs with */
	struct ms_doveadm_cfg doveadm;	/* its key: doveadm_key */
	struct ms_pacer src_pace;	/* commands to the source (pacer.h) */
	char *doveadm_key;
	struct ujob *jobs;
	unsigned int users, users_done;
	unsigned int folders, folders_done;
	uint64_t msgs_todo, msgs_done, bytes_done;
	uint64_t start_ms;
	uv_prepare_t *ph_tick;		/* mover_phase.c */
	ms_mover_fence_cb *fence;	/* ms_mover_set_fence() */
	void *fence_ctx;
};

struct fjob {
	char src[1024];			/* mUTF-7, source separator */
	char dst[1024];			/* mUTF-7, destination separator */
	char old[1024];			/* names = destination: the name
					   kept, where dst is another (the
					   gateway answers it); else "" */
	char special[16];		/* \Sent ... or "" */
	int subscribed, noselect, selected_by_plan;
	int dst_subscribed;		/* rollback: subscribed on the
					   destination */
	int taken;			/* a worker has it (or had it) */
	int dst_missing;		/* verify-only: not on the destination */
	unsigned int retries;		/* reconnects after a lost connection */
	uint32_t run_src_uv;		/* the source's UIDVALIDITY at this
					   run's first open of the folder */
	uint32_t moved_src_uv;		/* a reopen found another: the source
					   folder was made anew mid-pass */
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
	uint64_t open_pending;		/* open intents found at open */

	/* identity (mover_identity.c) */
	int identity;			/* keeping this folder's UIDVALIDITY
					   and UIDs */
	int id_final;			/* UIDNEXT/HIGHESTMODSEQ raised */
	uint32_t id_next;		/* the UID the destination gives the
					   next message appended */
	uint32_t id_want;		/* min-next-uid asked for */
	unsigned int id_tries;		/* reopens after the UIDVALIDITY */
	struct ms_doveadm_req *id_req;	/* the doveadm request in flight */

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
	/* The destination's verify FETCH sent with the source's (a forward
	 * copy): mover_verify.c's V_EARLY_* */
	int v_early;
	/* The source's verify FETCH sent during the copy, once its last
	 * BODY[] FETCH is answered (mover_verify.c's V_PRE_*) */
	int v_pre;
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
	int fenced;			/* the fence said no: nothing more of
					   its servers' answers is taken */
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
	unsigned int login_tries;	/* logins tried again after the server
					   refused them as busy */
	char conn_error[400];		/* the last lost or failed connection */
	struct dfolder *dfolders;
	unsigned int ndfolders, capdfolders;
	char src_sep, dst_sep;
	/* Each side's personal namespace prefix (NAMESPACE, RFC 2342):
	 * "INBOX." on Courier and older Cyrus, "" on most others. A name
	 * crosses without the source's and gets the destination's. */
	char src_prefix[64], dst_prefix[64];
	int plan_pending;
	int planned;

	int failed, mismatch, finished;
	char error[600];
	uint64_t copied, bytes, flags_updated, expunged, repaired;
	uint64_t start_ms;

	/* where the wall time goes (mover_phase.c), uv_hrtime() ns */
	uint64_t start_ns, ph_last, ph_store_ns;
	uint64_t ph_ns[MS_PH_N];
	unsigned char ph_in[MS_PH_N];	/* pairs in each phase, last tick */
};

struct fetch {
	uint32_t seq, uid;
	int has_uid, has_size, has_flags, has_date, has_msgid, has_body;
	uint64_t size;
	char flags[FLAGS_MAX];
	const char *date;
	char msgid[MSGID_MAX];
};

struct known_ctx {
	struct ms_u32vec uids;
	uint32_t floor;
	int reverse;
};

struct rows {
	struct ms_folder_state *v;
	size_t n, cap;
};

/* mover.c: jobs, workers, slots, FETCH parsing, helpers */
void mv_sort_n(void *base, size_t n, size_t size,
	       int (*cmp)(const void *, const void *));
uint64_t mv_fingerprint(uint64_t size, int64_t date, const char *msgid);
uint64_t mv_flags_hash(const char *flags);
void mv_to_utf8(char *out, size_t outsz, const char *mutf7, char sep);
struct ms_imapc *mv_src_conn(const struct worker *w);
struct ms_imapc *mv_dst_conn(const struct worker *w);
const char *mv_side_name(const struct worker *w, const struct ms_imapc *c);
uint32_t mv_rec_wr_uid(const struct ujob *u, const struct ms_msg_rec *rec);
int mv_name_eq(const char *a, const char *b);
void mv_u32vec_uniq(struct ms_u32vec *vec);
void mv_slot_wait(struct ujob *u, struct server *s, void (*cb)(void *),
		  void *ctx);
void mv_extract_msgid(const char *hdr, size_t len, char *out, size_t outsz);
int mv_parse_fetch(const struct ms_imap_response *r, struct fetch *f);
int mv_dst_fetch(struct worker *w, const struct ms_imap_response *r,
		 struct fetch *f);
long mv_parse_uid_set(const char *s, uint32_t *out, size_t cap);
void mv_job_fail(struct ujob *u, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void mv_job_maybe_finish(struct ujob *u);
void mv_job_schedule(struct ujob *u);
void mv_folder_fail(struct worker *w, const char *cmd,
		    const struct ms_imap_response *r, struct ms_imapc *c);
int mv_reply_failed(struct worker *w, const char *cmd,
		    const struct ms_imap_response *r, struct ms_imapc *c);
int mv_reply_last(struct worker *w, const char *cmd,
		  const struct ms_imap_response *r, struct ms_imapc *c);
int mv_store_check(struct worker *w, int ret);
void mv_select_data(const struct ms_imap_response *r, uint32_t *uidvalidity,
		    uint32_t *uidnext, uint32_t *exists, uint64_t *modseq,
		    int *nomodseq);
/* Set on each connection of a copy (ms_mover_set_fence). */
int mv_gate(void *ctx);
struct ms_imapc_settings mv_server_settings(const struct server *s,
					    const char *login,
					    const char *pw);
void mv_start_workers(struct ujob *u);
void mv_on_src_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx);
int mv_known_dst(struct worker *w, uint32_t uid);
void mv_on_dst_untagged(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx);
void mv_worker_hooks(struct worker *w);

/* mover_plan.c */
struct fjob *mv_find_folder(struct ujob *u, const char *name);
struct dfolder *mv_find_dfolder(struct ujob *u, const char *name);
void mv_on_plan_reply(struct ms_imapc *c, const struct ms_imap_response *r,
		      void *ctx);
void mv_on_create_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx);
int mv_folder_wanted(struct ujob *u, const char *src);
const char *mv_unprefixed(const char *name, const char *prefix);
int mv_map_forward(struct ujob *u, const char *src, const char *special,
		   char *out, size_t outsz);
void mv_plan_step(struct ujob *u);

/* mover_copy.c */
void mv_folder_done(struct worker *w);
void mv_worker_next_folder(struct worker *w);
void mv_after_match(struct worker *w);
void mv_window_free(struct window *win);
void mv_start_copy(struct worker *w);
void mv_meta_fetch(struct worker *w, const struct fetch *f);
void mv_copy_pump(struct worker *w);
int mv_on_literal_start(void *ctx, const struct ms_imap_response *partial,
			uint64_t size);
int mv_on_literal_data(void *ctx, const void *data, size_t len);
void mv_on_literal_end(void *ctx);
void mv_on_dst_drain(struct ms_imapc *c, void *ctx);
void mv_flag_store(struct worker *w, uint32_t src_uid, uint32_t dst_uid,
		   const char *flags);
void mv_flags_fetch(struct worker *w, const struct fetch *f);

void mv_open_continue(struct worker *w);
void mv_start_flags(struct worker *w);

/* mover_identity.c */
void mv_id_open(struct worker *w, int reset);
int mv_id_gate(struct worker *w, const struct window *win);
void mv_id_sent(struct worker *w, const struct window *win);
void mv_id_appended(struct worker *w, uint32_t src_uid, uint32_t dst_uid);
void mv_id_finish(struct worker *w);
void mv_id_cancel(struct worker *w);

/* mover_intent.c */
int mv_cmp_fp(const void *a, const void *b);
struct fpent *mv_fp_take(struct worker *w, uint64_t h);
int mv_collect_known(void *ctx, const struct ms_msg_rec *rec);
int mv_min_floor(void *ctx, const struct ms_msg_rec *rec);
void mv_on_match_src_reply(struct ms_imapc *c,
			   const struct ms_imap_response *r, void *ctx);
int mv_fps_push(struct worker *w, uint64_t h, uint32_t uid, uint64_t fhash);
void mv_match_dst_fetch(struct worker *w, const struct fetch *f);
void mv_match_src_fetch(struct worker *w, const struct fetch *f);
void mv_start_match(struct worker *w, int reconcile, uint32_t floor);
void mv_dedup_fetch(struct worker *w, const struct fetch *f);
size_t mv_uid_list_set(const uint32_t *uids, size_t n, char **set_r);
int mv_expunge_uids(struct worker *w);
void mv_start_dedup(struct worker *w);

/* mover_verify.c */
void mv_verify_free(struct worker *w);
void mv_verify_fetch(struct worker *w, int side, const struct fetch *f);
void mv_digest_fetch(struct worker *w, int side, const struct fetch *f);
void mv_repair_flags_fetch(struct worker *w, const struct fetch *f);
void mv_repair_redo(struct worker *w);
void mv_repair_expunge(struct worker *w);
void mv_verify_dst(struct worker *w);
int mv_drop_vanished(struct worker *w);
void mv_start_verify(struct worker *w);
int mv_verify_prefetch_src(struct worker *w);
int mv_verify_prefetch_drop(struct worker *w);
int mv_vo_plan_folder(struct ujob *u, struct fjob *f);
void mv_vo_open(struct worker *w, uint32_t src_uv, uint32_t dst_uv);

/* mover_rollback.c */
int mv_collect_row(void *ctx, const struct ms_folder_state *st);
void mv_rb_plan(struct ujob *u);
void mv_rb_start_scan(struct worker *w);
void mv_rscan_src_fetch(struct worker *w, const struct fetch *f);
void mv_rscan_dst_fetch(struct worker *w, const struct fetch *f);
void mv_rb_scan_done(struct worker *w);
void mv_rb_expunged(struct worker *w);
void mv_rb_verify_claims(struct worker *w);
void mv_rb_verify_done(struct worker *w);

/* mover_phase.c */
void mv_ph_charge(struct ujob *u, uint64_t now);
void mv_ph_store(struct ujob *u, uint64_t t0);
int mv_ph_start(struct ms_mover *m);
void mv_ph_free(struct ms_mover *m);

/* mover_pop3.c */
void mv_pop3_start(struct ujob *u);

#endif
