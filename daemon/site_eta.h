/* The site's ETA (mailshiftctl status): how long the users still to move
 * will take, from the throughput measured on recent copies (a per-user
 * overhead, seconds per message and per byte, how many copies ran at
 * once) and the remaining users' sizes (the survey's, daemon/survey.c,
 * or estimated from those known). Only arithmetic: the gateway feeds it
 * (lifecycle.c). See docs/mover.md, "The site's ETA". */
#ifndef MS_SITE_ETA_H
#define MS_SITE_ETA_H

#include <stdint.h>

#include <jansson.h>

#include "store.h"

#define MS_ETA_SAMPLES 256		/* the most recent copies kept */

struct ms_eta_sample {
	uint64_t end_ms;		/* when it ended (a monotonic clock) */
	double seconds;			/* its own time, the queue left out */
	uint64_t msgs, bytes;
};

/* The recent copies, a ring. Zeroed: empty. */
struct ms_eta {
	struct ms_eta_sample s[MS_ETA_SAMPLES];
	unsigned int n, next;
};

/* A user's verified copy ended at now_ms, having worked seconds on msgs
 * messages, bytes bytes. */
void ms_eta_note(struct ms_eta *e, uint64_t now_ms, double seconds,
		 uint64_t msgs, uint64_t bytes);

/* What a user counts for (ms_eta_count). */
enum ms_eta_kind {
	MS_ETA_LEFT,			/* still to move */
	MS_ETA_MOVED,			/* on the destination */
	MS_ETA_FAILED,			/* failed: waits for the operator */
	MS_ETA_OFF,			/* policy off: not moved */
};

/* The users' sizes, summed by ms_eta_count(). Zeroed: none. */
struct ms_eta_sizes {
	uint64_t users, left, moved, failed, off;
	/* left users whose size the survey knows (messages and bytes) */
	uint64_t known, known_msgs, known_bytes;
	/* left users the survey knows the messages of only */
	uint64_t msgs_only, msgs_only_msgs, msgs_only_copied;
	/* left users of unknown size; what was copied of them already */
	uint64_t unknown, unknown_copied_msgs, unknown_copied_bytes;
	/* whole mailboxes of known size (surveyed, or moved): the mean
	 * mailbox for the unknown ones */
	uint64_t ref_users, ref_msgs, ref_bytes;
	/* every copy so far: the mean message size */
	uint64_t copied_msgs, copied_bytes;
};

/* Adds one user: kind, its copied totals, and the survey's row (how ""
 * when none). */
void ms_eta_count(struct ms_eta_sizes *t, enum ms_eta_kind kind,
		  const struct ms_user_info *u, const struct ms_user_size *sz);

/* The estimate as status's "site" object: remaining users, messages and
 * bytes, sizes known and estimated, the measured throughput (null before
 * any copy) and eta_seconds (null when unknown, with "unknown" saying
 * why). */
json_t *ms_eta_json(const struct ms_eta *e, const struct ms_eta_sizes *t);

#endif
