/* The mover: copies users' folders from the source server to the
 * destination, exactly once, incrementally, resumably, verified.
 * See ../docs/mover.md for the algorithm and the exactly-once argument. */
#ifndef MS_MOVER_H
#define MS_MOVER_H

#include <stdint.h>
#include <uv.h>

#include "doveadm.h"
#include "imapc.h"
#include "net.h"
#include "server.h"
#include "store.h"

/* Whose folder names a copied folder takes (docs/mover.md, "Folder
 * names"): the source's (every name as the client knew it), or the
 * destination's for special-use folders (the source's "Sent Items" lands in
 * the destination's \Sent folder, whatever it is called). */
enum ms_mover_names {
	MS_NAMES_SOURCE = 0,
	MS_NAMES_DESTINATION,
};

/* "source" or "destination" into *out; -1 for anything else. */
int ms_mover_names_parse(const char *s, enum ms_mover_names *out);

struct ms_mover_opts {
	const char *const *include;	/* NULL-terminated fnmatch patterns */
	const char *const *exclude;
	unsigned int batch;		/* messages per APPEND batch; 0 = 100 */
	/* Compare only (docs/mover.md, "Verify only"): nothing is copied,
	 * mended or written, on either server or in the store; every
	 * difference in what earlier runs copied is reported. */
	int verify_only;
	/* Verification also compares each copied message's bytes (SHA-256 of
	 * BODY[] on both sides), not only its size and flags. */
	int verify_content;
	/* Dovecot's doveadm HTTP API on the destination: with it, each folder
	 * keeps the source's UIDVALIDITY and UIDs where it can
	 * (docs/mover.md, "Identity"). NULL: not tried. The key is copied
	 * (and wiped when the mover is freed). */
	const struct ms_doveadm_cfg *doveadm;
	int caller_flips;		/* a verified job leaves the user's state
					   as it is: the caller's own write is
					   the flip (the gateway) */
	enum ms_mover_names names;	/* default: the source's */
	/* Commands per second to the source, all users and connections
	 * together (docs/mover.md, "Protecting the source"); 0: no cap. */
	double commands_per_second;
};

struct ms_folder_report {
	char source[1024];		/* UTF-8, source separator */
	char destination[1024];		/* UTF-8, destination separator */
	uint64_t copied, flags_updated, expunged;
	uint64_t source_messages, dest_messages;
	uint64_t source_bytes, dest_bytes;
	int verified;
	uint64_t repaired;		/* copies verification found different
					   and mended (flags set again, copied
					   again) */
	char mismatch[400];		/* what verification found, "" if
					   nothing */
	int identity;			/* 1: the destination folder has the
					   source's UIDVALIDITY and UIDs; -1:
					   not (identity_error says why); 0:
					   not tried */
	char identity_error[300];
	char error[400];		/* what made the mover reopen the
					   folder (the last of its bounded
					   retries, docs/mover.md "Failure
					   behaviour"); "" if nothing */
	/* verify_only */
	uint64_t not_copied;		/* source messages no run copied yet */
	uint64_t expunge_pending;	/* expunged on the source, not yet on
					   the destination */
	/* rollback only */
	int created;			/* the folder was created on the source */
	int dst_deleted;		/* gone from the destination: left on the
					   source as it is (not verified) */
	uint64_t source_only;		/* messages on the source that no record
					   claims (arrived there after the copy):
					   kept, not compared */
};

/* Where a user's copy spent its wall time (docs/mover.md, "Phases"). */
enum ms_mover_phase {
	MS_PH_QUEUE,			/* waiting for a connection slot */
	MS_PH_LOGIN,			/* connect, TLS, authenticate */
	MS_PH_PLAN,			/* NAMESPACE, LIST, LSUB, STATUS,
					   CREATE, SUBSCRIBE */
	MS_PH_COPY,			/* folder open, match, FETCH, APPEND */
	MS_PH_FLAGS,			/* flag changes of earlier copies */
	MS_PH_VERIFY,			/* verification, expunges, repair */
	MS_PH_STORE,			/* inside the store's writes */
	MS_PH_N
};

extern const char *const ms_mover_phase_names[MS_PH_N];

struct ms_user_report {
	const char *user;
	int rollback;			/* from ms_mover_add_rollback() */
	int verify_only;		/* ms_mover_opts.verify_only */
	int ok;				/* copied and verified */
	int mismatch;			/* verification found a difference */
	const char *error;		/* NULL when ok */
	uint64_t copied, bytes, flags_updated, expunged, repaired;
	double seconds;
	/* milliseconds of the seconds above per phase, each moment counted
	 * at most once: they add up to no more than seconds */
	uint64_t phase_ms[MS_PH_N];
	struct ms_folder_report *folders;
	unsigned int nfolders;
};

struct ms_progress {
	unsigned int users, users_done;
	unsigned int folders, folders_done;
	uint64_t msgs_todo, msgs_done;	/* messages to copy in this run */
	uint64_t bytes_done;
	double seconds;
};

typedef void ms_mover_done_cb(const struct ms_user_report *report, void *ctx);

struct ms_mover;

struct ms_mover *ms_mover_new(uv_loop_t *loop, struct ms_store *store,
			      const struct ms_server_cfg *src,
			      const struct ms_server_cfg *dst,
			      const struct ms_mover_opts *opts);
/* Starts copying one user. src_password/dst_password override the servers'
 * configured passwords (the gateway passes the user's captured login);
 * NULL = the configured one. The mover keeps wiped-on-free copies only. */
int ms_mover_add_user(struct ms_mover *m, const char *user,
		      const char *src_password, const char *dst_password,
		      ms_mover_done_cb *done, void *ctx);
/* Rolls one user back (docs/mover.md, "Rollback"): copies to the source what
 * changed on the destination since the user's forward copy (messages that
 * arrived or were appended there, folders created there, flag changes,
 * expunges of copied messages), exactly once like the forward copy (an
 * intent is committed before the bytes leave; a killed run resumed later
 * duplicates nothing), then verifies per folder that the source holds what
 * the destination holds. Afterwards a forward copy of the user copies none
 * of the rolled-back messages again: they are recorded done under the
 * source UIDs they got, with their destination UIDs. Folders deleted on the
 * destination are left on the source and reported (dst_deleted).
 *
 * Passwords as for ms_mover_add_user(). done() gets the report
 * (report->rollback set; copied = messages appended to the source); a user
 * the store has no copy of gets a report with an error and nothing is
 * touched. Needs an IMAP source with UIDPLUS. The user's state in the store
 * becomes "source" when the rollback is verified (unless caller_flips: then
 * the caller writes it); on failure it stays what it was (the destination still holds all the mail), with the error as
 * last_error. Returns -1 only when out of memory or the store fails. */
int ms_mover_add_rollback(struct ms_mover *m, const char *user,
			  const char *src_password, const char *dst_password,
			  ms_mover_done_cb *done, void *ctx);
void ms_mover_progress(const struct ms_mover *m, struct ms_progress *p);

/* The caps that protect the source, and how the mover stands with them. */
struct ms_mover_pace {
	unsigned int connections;	/* the cap, per server */
	unsigned int src_open, dst_open;	/* connection slots taken */
	unsigned int waiting;		/* connections waiting for a slot */
	double commands_per_second;	/* the cap; 0: none */
	double pace;			/* in force (the cap, or lower while
					   backing off); 0: none */
	int backing_off;		/* the source said it is busy, or
					   answered slowly: the pace is lower
					   until it recovers */
	uint64_t commands, backoffs;	/* to the source, all told */
	const char *reason;		/* the last back-off's cause, "" */
};

void ms_mover_pace(struct ms_mover *m, struct ms_mover_pace *p);
/* Changes the caps while copies run (connections: 0 = as it is;
 * commands_per_second < 0 = as it is, 0 = none). More connections are
 * used at once; surplus ones are given back as their folder finishes,
 * never in the middle of a command. */
void ms_mover_set_limits(struct ms_mover *m, unsigned int connections,
			 double commands_per_second);
/* Someone else's connection to the source (mailshiftd's survey) under the
 * mover's budget and pace: 1 and *pacer_r (the source's pace, for
 * ms_imapc_settings.pacer) when a slot is free and no copy waits for one;
 * 0 when not. A slot taken goes back with ms_mover_src_slot_put(). */
int ms_mover_src_slot_try(struct ms_mover *m, struct ms_pacer **pacer_r);
void ms_mover_src_slot_put(struct ms_mover *m);
/* Stops the user's running job now (the gateway lost the user's job to
 * another): its report is a failure with why, and the user's state in the
 * store is left as it is; what was committed stays for whoever resumes
 * the copy. -1 when no job of the user runs. */
int ms_mover_cancel(struct ms_mover *m, const char *user, const char *why);
/* Asked before anything a server sent for user's copy is taken: 0 when
 * the copy may no longer act (several gateways: its job's lease not
 * confirmed recently enough to be sure it is still this gateway's); the
 * copy is then cancelled as by ms_mover_cancel(), and nothing of what
 * came is taken (no command follows from it, no record is written). */
typedef int ms_mover_fence_cb(void *ctx, const char *user);
void ms_mover_set_fence(struct ms_mover *m, ms_mover_fence_cb *cb, void *ctx);
void ms_mover_free(struct ms_mover **m);

#endif
