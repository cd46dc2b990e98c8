/* Incremental IMAP server-response parser (RFC 3501/9051 response grammar).
 *
 * The parser never trusts the server: every line, literal, list depth and
 * argument count is bounded, and any violation is an error with a message,
 * never a crash or an unbounded allocation. It can be fed any number of bytes
 * at a time (one byte at a time in the unit tests) and returns each complete
 * response as soon as its last byte has been fed.
 *
 * Literals ({n}, {n+}) either are buffered into the response (when the
 * literal-start callback asks so and n <= max_buffered_literal) or are
 * streamed to the data callback chunk by chunk, so that a 20 MB BODY[] never
 * has to sit in memory.
 */
#ifndef MS_IMAP_PARSER_H
#define MS_IMAP_PARSER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

enum ms_imap_arg_type {
	MS_ARG_ATOM,		/* atom, number, flag (\Seen), BODY[...]<n> */
	MS_ARG_STRING,		/* quoted string, unescaped */
	MS_ARG_LITERAL,		/* buffered literal: str/len hold the bytes */
	MS_ARG_STREAMED,	/* streamed literal: only size is known */
	MS_ARG_NIL,
	MS_ARG_LIST,		/* parenthesised list: list/list_count */
};

struct ms_imap_arg {
	enum ms_imap_arg_type type;
	const char *str;	/* NUL-terminated copy (ATOM, STRING, LITERAL) */
	size_t len;		/* length of str (literals may contain NULs) */
	uint64_t size;		/* STREAMED and LITERAL: the literal's size */
	struct ms_imap_arg *list;
	unsigned int list_count;
};

enum ms_imap_resp_kind {
	MS_RESP_UNTAGGED,	/* "* ..." */
	MS_RESP_TAGGED,		/* "tag ..." */
	MS_RESP_CONTINUATION,	/* "+ ..." */
};

enum ms_imap_status {
	MS_STATUS_NONE,		/* not a status response (e.g. "* 3 EXISTS") */
	MS_STATUS_OK,
	MS_STATUS_NO,
	MS_STATUS_BAD,
	MS_STATUS_BYE,
	MS_STATUS_PREAUTH,
};

/* One complete response. Everything it points to lives in the parser and
 * stays valid until the next call to ms_imap_parser_feed(). */
struct ms_imap_response {
	enum ms_imap_resp_kind kind;
	const char *tag;		/* TAGGED: the tag; else NULL */
	enum ms_imap_status status;	/* OK/NO/BAD/BYE/PREAUTH, or NONE */

	/* Status responses: the optional response code "[CODE args]" and the
	 * human-readable text after it (raw, may be empty). code is NULL when
	 * there is none. For CONTINUATION, text is the rest of the line. */
	const char *code;
	struct ms_imap_arg *code_args;
	unsigned int code_argc;
	const char *text;

	/* Non-status responses: all tokens after "*" (e.g. "3" "FETCH" (list),
	 * or "CAPABILITY" "IMAP4rev1" ...). For status responses argc is 0. */
	struct ms_imap_arg *args;
	unsigned int argc;
};

struct ms_imap_parser_limits {
	size_t max_line;		/* bytes of non-literal text per response */
	uint64_t max_literal;		/* largest literal accepted at all */
	size_t max_buffered_literal;	/* largest literal kept in memory */
	unsigned int max_depth;		/* nesting of parenthesised lists */
	unsigned int max_args;		/* tokens per response, all levels */
};

/* Sensible defaults: 64 KiB lines, 1 GiB literals, 1 MiB buffered literal,
 * depth 16, 100000 args. */
extern const struct ms_imap_parser_limits ms_imap_parser_default_limits;

struct ms_imap_parser_callbacks {
	/* A literal of `size` bytes starts. `partial` is the response parsed so
	 * far (kind, tag, and the args before the literal: for a FETCH response
	 * args[0] is the sequence number, args[1] "FETCH", and args[2] the list
	 * whose last complete element before the literal is the item name,
	 * e.g. "BODY[]"). Return 1 to stream it, 0 to buffer it, -1 to fail the
	 * parse (error text "literal refused"). NULL callback = always buffer. */
	int (*literal_start)(void *ctx, const struct ms_imap_response *partial,
			     uint64_t size);
	/* Streamed literal bytes, in order. Return <0 to fail the parse. */
	int (*literal_data)(void *ctx, const void *data, size_t len);
	/* The streamed literal is complete. */
	void (*literal_end)(void *ctx);
	void *ctx;
};

struct ms_imap_parser;

struct ms_imap_parser *ms_imap_parser_new(const struct ms_imap_parser_limits *limits,
					  const struct ms_imap_parser_callbacks *cb);
void ms_imap_parser_free(struct ms_imap_parser **parser);

/* Feed up to len bytes. Returns the number of bytes consumed (>= 0) and sets
 * *resp_r to the completed response when one completed (it stops right after
 * that response's final LF, so call again with the rest), else *resp_r =
 * NULL. Returns -1 on a protocol error or a limit hit; the parser is then
 * unusable and ms_imap_parser_error() says why (e.g. "line too long",
 * "literal too large", "lists nested too deeply", "bad literal syntax",
 * "unexpected character 0x.. in ..."). */
ssize_t ms_imap_parser_feed(struct ms_imap_parser *parser, const char *data,
			    size_t len, const struct ms_imap_response **resp_r);
const char *ms_imap_parser_error(const struct ms_imap_parser *parser);

/* Helpers for consumers. */
/* Case-insensitive compare of an ATOM/STRING arg with s. */
int ms_imap_arg_is(const struct ms_imap_arg *arg, const char *s);
/* Parse an ATOM holding a decimal number < 2^63. Returns 0 or -1. */
int ms_imap_arg_number(const struct ms_imap_arg *arg, uint64_t *num_r);
/* ATOM/STRING/LITERAL as string (NULL for NIL/LIST/STREAMED). */
const char *ms_imap_arg_str(const struct ms_imap_arg *arg);

#endif
