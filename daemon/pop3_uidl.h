/* POP3 UIDLs across a move (docs/gateway-spec.md, "POP3 UIDLs").
 *
 * A POP3 client that leaves mail on the server remembers each message's
 * UIDL. The destination gives every copied message a new one (Dovecot:
 * pop3_uidl_format, by default the IMAP UID and UIDVALIDITY in hex), so the
 * gateway, relaying a POP3 session of a user on the destination, puts back
 * the UIDL the source gave the same message.
 *
 * Three pieces: the UIDL formats (Dovecot's pop3_uidl_format, a subset),
 * the translation of one destination UIDL through the store, and the
 * rewriter that finds the UIDLs in a relayed POP3 session's byte stream.
 */
#ifndef MS_POP3_UIDL_H
#define MS_POP3_UIDL_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

/* Dovecot's default pop3_uidl_format. */
#define MS_UIDL_FORMAT_DEFAULT "%08Xu%08Xv"
/* RFC 1939: a UIDL is 1 to 70 characters 0x21-0x7E. */
#define MS_UIDL_MAX 70

/* ---- formats ----
 *
 * Literal text, "%%", and the variables %u (the IMAP UID) and %v (the
 * folder's UIDVALIDITY), also written %{uid} and %{uidvalidity}, each
 * optionally with a zero-padded width ("%08u") and X (hexadecimal, in
 * lower-case digits: what Dovecot's X modifier writes), e.g. %08Xu. */

/* 0 when fmt is a format these functions support and that names %u (and
 * writes UIDLs of at most MS_UIDL_MAX printable characters); else -1 and
 * *why_r says why. */
int ms_uidl_format_check(const char *fmt, const char **why_r);
/* The UIDL of (uid, uidvalidity) in buf. Returns its length, or -1 when
 * fmt is not valid or buf too small. */
int ms_uidl_format(const char *fmt, uint32_t uid, uint32_t uidvalidity,
		   char *buf, size_t size);
/* The UID whose UIDL under fmt and uidvalidity is exactly uidl: 0 and
 * *uid_r, or -1 when there is none (another format, another UIDVALIDITY:
 * such a UIDL is never mistaken for one of ours). */
int ms_uidl_parse(const char *fmt, uint32_t uidvalidity, const char *uidl,
		  uint32_t *uid_r);

/* ---- translation of a destination UIDL ---- */

/* A copied message whose destination UID a UIDL may name. */
struct ms_uidl_copied {
	uint32_t dst_uid, src_uid;
	size_t uidl;			/* offset in pool; SIZE_MAX: none */
};

struct ms_uidl_map {
	int64_t folder_id;		/* the user's row whose destination
					   folder is INBOX */
	uint32_t src_uidvalidity, dst_uidvalidity;	/* from that row;
					   src 0: a POP3 source, whose records
					   carry its UIDLs */
	const char *src_format, *dst_format;
	/* The folder's records, read once (ms_uidl_map_load()): */
	struct ms_uidl_copied *copied;	/* done, with a destination UID; by
					   dst_uid */
	size_t ncopied;
	uint32_t *src_uids;		/* an IMAP source's records; sorted */
	size_t nsrc;
	size_t *uidls;			/* a POP3 source's; sorted by text */
	size_t nuidls;
	char *pool;			/* the UIDLs' text */
	size_t pool_len, pool_cap;
};

/* Reads the records of map->folder_id from the store into the map (the
 * rest of it set by the caller). 0, or -1 with ms_store_error() or out of
 * memory (*oom_r set); the map then holds none. A map loaded is cleared
 * by ms_uidl_map_clear(). */
int ms_uidl_map_load(struct ms_uidl_map *map, struct ms_store *store,
		     int *oom_r);
void ms_uidl_map_clear(struct ms_uidl_map *map);

/* The UIDL a client should see for the destination's `uidl`:
 * - a message the mover copied (a done record whose destination UID is
 *   the one uidl names under dst_format and dst_uidvalidity): the source's
 *   UIDL (the record's for a POP3 source, else src_format applied to the
 *   source UID and src_uidvalidity); returns 1;
 * - any other message keeps its UIDL (returns 0), unless that is the
 *   source UIDL of a copied message: then uidl with "-d" appended
 *   (returns 1), so that a new message is never taken for one the client
 *   has already.
 * out: at least MS_UIDL_MAX + 3 bytes. The store is not asked: the map
 * holds what was loaded. */
int ms_uidl_translate(const struct ms_uidl_map *map, const char *uidl,
		      char *out, size_t outsz);

/* ---- the rewriter ----
 *
 * Watches a relayed POP3 session in TRANSACTION state: the client's
 * commands (ms_pop3_rw_client, bytes pass on unchanged) and the server's
 * answers (ms_pop3_rw_server), which come strictly in order, one per
 * command, also pipelined. Every byte of the answers goes to out()
 * unchanged except the UIDLs of the answers to UIDL and UIDL n, which
 * map() may replace. Only those answers' lines are buffered (at most
 * MS_POP3_RW_LINE_MAX bytes); everything else, message bodies included,
 * passes on in the pieces it came in.
 *
 * When it loses track (a line longer than the bound, an answer that is
 * neither +OK nor -ERR where one was due, more commands outstanding than
 * MS_POP3_RW_PIPELINE_MAX) it gives up for good: from then on every byte
 * passes unchanged and ms_pop3_rw_gave_up() says why. */

#define MS_POP3_RW_LINE_MAX 1024
/* Outstanding commands above which the caller should stop reading the
 * client until the server has caught up. */
#define MS_POP3_RW_PIPELINE_SOFT 1024
#define MS_POP3_RW_PIPELINE_MAX (64 * 1024 + MS_POP3_RW_PIPELINE_SOFT)

/* As ms_uidl_translate: 1 and out set, 0 keep, -1 fatal. */
typedef int ms_pop3_rw_map_fn(void *ctx, const char *uidl, char *out,
			      size_t outsz);
/* 0, or < 0 when the bytes cannot be passed on. */
typedef int ms_pop3_rw_out_fn(void *ctx, const char *data, size_t len);

/* The fields are the rewriter's own. */
struct ms_pop3_rw {
	ms_pop3_rw_map_fn *map;
	void *ctx;
	const char *gave_up;
	/* commands sent, answers not complete: a ring of kinds */
	unsigned char *q;
	size_t qcap, qhead, qlen;
	/* the client's command line being read */
	char kw[4];
	unsigned char kwlen;		/* 5: longer than any we know */
	unsigned char cstate;
	/* the server's line being read */
	unsigned char multi;		/* in a multi-line answer's lines */
	unsigned char buffering;	/* this line goes into buf */
	char head[4];			/* its first bytes */
	size_t linelen;
	char *buf;			/* MS_POP3_RW_LINE_MAX, while needed */
	size_t buflen;
};

void ms_pop3_rw_init(struct ms_pop3_rw *rw, ms_pop3_rw_map_fn *map,
		     void *ctx);
void ms_pop3_rw_clear(struct ms_pop3_rw *rw);
/* Bytes the client sent (to the server, unchanged). */
void ms_pop3_rw_client(struct ms_pop3_rw *rw, const char *data, size_t len);
/* Bytes the server sent: passed to out(), rewritten where they should be.
 * 0, or -1 when out() or map() failed (nothing more is written). */
int ms_pop3_rw_server(struct ms_pop3_rw *rw, const char *data, size_t len,
		      ms_pop3_rw_out_fn *out, void *octx);
/* Commands whose answers have not ended yet. */
size_t ms_pop3_rw_pending(const struct ms_pop3_rw *rw);
/* NULL while rewriting, else why not any more. */
const char *ms_pop3_rw_gave_up(const struct ms_pop3_rw *rw);

#endif
