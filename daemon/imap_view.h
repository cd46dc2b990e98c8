/* The IMAP view of a moved user (docs/gateway-spec.md, "The IMAP view").
 *
 * When the destination could not keep a folder's identity (UIDVALIDITY and
 * UIDs: no doveadm, or doveadm refused), the gateway, relaying an IMAP
 * session of a user on the destination, shows the source's UIDVALIDITY and
 * UIDs for the messages the mover copied, and numbers new mail above the
 * source's UIDNEXT. It also answers folders the move renamed (a source's
 * "Sent Items" that became the destination's "Sent") under their old names.
 *
 * Two pieces: a folder's map (view UID <-> destination UID), and the
 * rewriter that finds UIDs, UID sets and folder names in the relayed byte
 * stream, both ways. Neither touches the store or the network: the caller
 * hands in maps (lookup()) and takes the bytes (out()).
 */
#ifndef MS_IMAP_VIEW_H
#define MS_IMAP_VIEW_H

#include <stddef.h>
#include <stdint.h>

/* ---- a folder's map ----
 *
 * A copied message shows its source UID; any other destination message d
 * shows base + d, base being the highest source UID the client could have
 * seen (the source's UIDNEXT - 1, or the highest copied source UID). The
 * copy keeps the source's order, so the view is monotone: sequence numbers
 * and view UIDs go up together. */

struct ms_view_pair {
	uint32_t src, dst;
};

struct ms_view_map {
	uint32_t src_uidvalidity, dst_uidvalidity;
	uint32_t base;			/* view of an uncopied d: base + d */
	uint32_t max_dst;		/* highest copied destination UID */
	struct ms_view_pair *by_src;	/* n pairs, by source UID */
	struct ms_view_pair *by_dst;	/* the same, by destination UID */
	size_t n;
	int monotone;			/* by_src is by_dst */
	int full;			/* pairs loaded (else only the above:
					   enough for STATUS, APPENDUID) */
	int invalid;			/* the server showed another
					   UIDVALIDITY: passed on as it is */
};

/* Builds map from n pairs (taken over: malloc'd, freed by
 * ms_view_map_clear), src_uidnext the source's UIDNEXT when known (0: not
 * recorded). 0, or -1 when out of memory. */
int ms_view_map_init(struct ms_view_map *map, struct ms_view_pair *pairs,
		     size_t n, uint32_t src_uidvalidity,
		     uint32_t dst_uidvalidity, uint32_t src_uidnext);
void ms_view_map_clear(struct ms_view_map *map);
/* The view UID of destination UID d (0 stays 0). */
uint32_t ms_view_uid(const struct ms_view_map *map, uint32_t d);
/* The view's UIDNEXT for the destination's. */
uint32_t ms_view_uidnext(const struct ms_view_map *map, uint32_t dst_next);

/* A growing buffer. */
struct ms_vbuf {
	char *p;
	size_t len, cap;
};
int ms_vbuf_add(struct ms_vbuf *b, const char *data, size_t len);
void ms_vbuf_free(struct ms_vbuf *b);

/* The destination set for a view UID set (sequence-set syntax, "*" kept),
 * appended to out: 1 done, 0 the text is not a UID set (out untouched),
 * -1 out of memory. A set naming no message becomes one UID no folder
 * has. */
int ms_view_set_to_dst(const struct ms_view_map *map, const char *set,
		       size_t len, struct ms_vbuf *out);
/* The view set for a destination UID set (no "*"), the same way. */
int ms_view_set_to_view(const struct ms_view_map *map, const char *set,
			size_t len, struct ms_vbuf *out);

/* ---- the rewriter ----
 *
 * Sees every byte of a relayed IMAP session after login: the client's
 * commands (ms_view_client) and the server's responses (ms_view_server),
 * each cut anywhere. Lines are held until their CRLF (at most
 * MS_VIEW_LINE_MAX bytes); literals pass on in the pieces they came in and
 * are never looked into. */

#define MS_VIEW_LINE_MAX (1024 * 1024)
/* Commands not answered yet above which the caller should stop reading
 * the client. */
#define MS_VIEW_PIPELINE_SOFT 1024
#define MS_VIEW_PIPELINE_MAX (64 * 1024)

/* The map of a folder named `name` (as the destination names it), with its
 * pairs when full; NULL when the folder is not translated (identity kept,
 * not moved, unknown). The map belongs to the caller and lives as long as
 * the rewriter. */
typedef struct ms_view_map *ms_view_lookup_fn(void *ctx, const char *name,
					      int full);
/* The destination's name for a name the client knows (NULL: the same), and
 * back: the name to show for a destination name (NULL: the same). */
typedef const char *ms_view_name_fn(void *ctx, const char *name, int to_dst);
/* For a LIST or LSUB pattern of the client's (in the view's names, the
 * reference put before it), the destination's patterns that also have to
 * be asked for what it may match under old names: each appended to out
 * NUL-terminated. Their number, or -1 when out of memory. */
typedef int ms_view_patterns_fn(void *ctx, const char *pattern,
				struct ms_vbuf *out);
/* 0, or < 0 when the bytes cannot be passed on. */
typedef int ms_view_out_fn(void *ctx, const char *data, size_t len);

struct ms_view_side {
	struct ms_vbuf line;		/* the fragment being read */
	uint64_t lit;			/* literal bytes still to pass */
	int cont;			/* the next fragment goes on after a
					   literal */
	/* what a fragment after a literal goes on with */
	int kind;			/* the command or response */
	int depth;			/* parentheses open */
	int skip;			/* items still to skip (SEARCH keys) */
	int skip_depth;			/* inside a skipped group */
	int want;			/* the next item is a UID/UID set */
	int modseq;			/* MODSEQ's first argument was quoted */
	const char *args;		/* the command's arguments still to
					   come: 'N' a folder name, 'U' a UID
					   set, 'S' one to skip, 'O' an
					   optional (group) */
	/* A folder name sent as a literal: the fragment before it is held,
	 * its bytes read into name, and both go on, the name (renamed) as
	 * a quoted string, with the fragment after it. */
	int hold;
	struct ms_vbuf held;		/* output held */
	struct ms_vbuf name;		/* the literal read so far */
	int plus_due;			/* (client) a continuation owed to
					   the client for the held literal */
	/* (server) a response not for the client: a LIST answer its
	 * patterns do not match, and the STATUS that goes with it */
	int drop;
	char delim;			/* the last LIST answer's delimiter */
	int list_dropped;		/* the last LIST answer was dropped */
};

struct ms_view_cmd;

/* A source's personal namespace shown in place of the destination's
 * (docs/gateway-spec.md, "A source with a namespace prefix"): prefix ("" for
 * none) and separator ('\0' for none) of each side. */
struct ms_view_ns {
	char src_prefix[64], dst_prefix[64];
	char src_sep, dst_sep;
};

/* A name as the other side has it, into out (NUL-terminated): to_dst the
 * destination's for a name the client gave in the source's namespace, else
 * the client's for a destination's: the one prefix for the other, each
 * separator for the other (so that a name with the other side's separator
 * in it goes back and forth unchanged). 1 when out holds it, 0 when the
 * name is the same on both sides (INBOX, a name outside the prefix), -1
 * when out of memory. */
int ms_view_ns_name(const struct ms_view_ns *ns, const char *name,
		    int to_dst, struct ms_vbuf *out);

struct ms_view {
	ms_view_lookup_fn *lookup;
	ms_view_name_fn *name;
	ms_view_patterns_fn *patterns;	/* set: LIST patterns rewritten and
					   the answers filtered */
	void *ctx;
	ms_view_out_fn *reply;		/* to the client, for continuations
					   the view gives itself */
	void *reply_ctx;
	const char *gave_up;
	struct ms_view_side c, s;
	/* commands sent, not answered yet, oldest first */
	struct ms_view_cmd *q;
	size_t qhead, qlen, qcap;
	struct ms_view_map *csel;	/* selected, as the commands sent
					   leave it */
	struct ms_view_map *ssel;	/* selected, as the answers say */
	int withhold;			/* CONDSTORE, QRESYNC withheld (set
					   when a folder is translated) */
	int withhold_utf8;		/* UTF8=ACCEPT withheld (set when
					   folders were renamed) */
	int ns_on;			/* NAMESPACE and LIST's separator
					   show ns's source side */
	struct ms_view_ns ns;
	uint64_t uids;			/* UIDs shown as the source's */
	uint64_t names;			/* names shown or taken as the old */
	int wait;			/* ms_view_wait(): stop after the
					   client's fragment being read */
};

void ms_view_init(struct ms_view *v, ms_view_lookup_fn *lookup,
		  ms_view_name_fn *name, void *ctx);
void ms_view_clear(struct ms_view *v);
/* Where the view may write to the client on its own: the "+" a client
 * waits for before it sends a folder name as a synchronizing literal.
 * Without it such names go on as they are, unrenamed and not looked up. */
void ms_view_set_reply(struct ms_view *v, ms_view_out_fn *reply, void *ctx);
/* Where folders were renamed: a LIST or LSUB whose pattern may match an
 * old name ("Sent*" for "Sent Items", now "Sent") asks the server for the
 * new names too (patterns()), and only answers whose names as shown match
 * the client's patterns go to it (RFC 3501 wildcards). */
void ms_view_set_patterns(struct ms_view *v, ms_view_patterns_fn *patterns);
/* The source's namespace shown: NAMESPACE answered with its prefix and
 * separator, LIST and LSUB answers with its separator (the names are the
 * name() callback's: it maps them, ms_view_ns_name()). */
void ms_view_set_namespace(struct ms_view *v, const struct ms_view_ns *ns);
/* Whether an IMAP LIST pattern (list-wildcards "*" and "%", delim the
 * hierarchy separator, 0 for none) matches name; INBOX in any case. */
int ms_view_pattern_match(const char *pattern, const char *name, char delim);
/* The view cannot go on (the store failed in lookup()): the fragment being
 * read is not passed on, and every call from now returns -1. */
void ms_view_fail(struct ms_view *v, const char *why);
/* Whether what went to the client so far ends between two responses (a
 * BYE may follow). */
int ms_view_client_at_rest(const struct ms_view *v);
/* The client's bytes: to out(), rewritten. 0, or -1 (out() failed, a line
 * too long, out of memory: the session must end, ms_view_gave_up() says
 * why). */
int ms_view_client(struct ms_view *v, const char *data, size_t len,
		   ms_view_out_fn *out, void *octx);
/* As ms_view_client, and the client's bytes stop being read after the
 * fragment during which lookup() called ms_view_wait(): *used_r says how
 * many were taken; the caller gives the rest again when the map is in. */
int ms_view_client_some(struct ms_view *v, const char *data, size_t len,
			ms_view_out_fn *out, void *octx, size_t *used_r);
/* From lookup(): the map returned is not full yet (its pairs are being
 * read); the client's next command must wait for them. */
void ms_view_wait(struct ms_view *v);
/* The server's bytes, the same way. */
int ms_view_server(struct ms_view *v, const char *data, size_t len,
		   ms_view_out_fn *out, void *octx);
/* Commands not answered yet. */
size_t ms_view_pending(const struct ms_view *v);
/* Whether the view may still translate with map's pairs: the folder is
 * selected, as the commands or the answers have it, or a command not
 * answered names it. */
int ms_view_uses(const struct ms_view *v, const struct ms_view_map *map);
const char *ms_view_gave_up(const struct ms_view *v);
/* Whether a capability is withheld from the view's sessions (CONDSTORE,
 * QRESYNC: their MODSEQs and VANISHED would need translating too). */
int ms_view_cap_withheld(const char *cap, size_t len);

#endif
