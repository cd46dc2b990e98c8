/* Incremental IMAP server-response parser; see imap_parser.h.
 *
 * The parser is a byte-driven state machine, so a response may be split at
 * any byte between calls. Finished tokens are copied into a per-response
 * arena of stable chunks (never realloc'ed), so a pointer handed out stays
 * valid until the next response starts. Arguments are collected in one
 * growable vector per list depth; when a list closes its elements are copied
 * into the arena in one go, which keeps the tree O(n) to build and lets the
 * literal-start callback see the lists that are still open without having
 * to rebuild anything.
 */
#include "imap_parser.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const struct ms_imap_parser_limits ms_imap_parser_default_limits = {
	.max_line = 64 * 1024,
	.max_literal = 1024ULL * 1024 * 1024,
	.max_buffered_literal = 1024 * 1024,
	.max_depth = 16,
	.max_args = 100000,
};

/* Each buffered literal is capped by max_buffered_literal, but a response
 * may carry many of them ({0}\r\n costs only 5 line bytes); without a
 * cap on the sum a hostile server could make us hold max_line / 5 such
 * literals at once. */
#define BUFFERED_TOTAL_FACTOR	8

#define ARENA_MIN_CHUNK		4096
#define ARENA_MAX_GROWTH	(64 * 1024)
/* A response bigger than this does not get its arena kept for the next
 * one: a single 1 MiB literal should not pin 1 MiB for the connection's
 * lifetime. */
#define ARENA_KEEP_MAX		(256 * 1024)

enum state {
	S_START,		/* first byte of a response */
	S_UNTAGGED_SP,		/* after "*" */
	S_TAG,
	S_CONT,			/* after "+" */
	S_FIRST,		/* first token after "* " or "tag " */
	S_STATUS_END,		/* after OK/NO/BAD/BYE/PREAUTH */
	S_STATUS_SP,		/* after "OK ": a code or the text */
	S_CODE_NAME,		/* after "[" */
	S_AFTER_CODE,		/* after "]" */
	S_TEXT,
	S_ARGS,			/* between tokens */
	S_ATOM,
	S_ATOM_BRACKET,		/* inside BODY[...] of an atom */
	S_TILDE,		/* "~": literal8 or an atom */
	S_QUOTED,
	S_QUOTED_ESC,
	S_LIT_SIZE,
	S_LIT_PLUS,
	S_LIT_EOL,		/* after "}": CRLF must follow */
	S_LITERAL,		/* literal payload */
	S_DONE,			/* a response was returned */
	S_ERROR,
};

struct chunk {
	struct chunk *next;
	size_t size;
	size_t used;
	_Alignas(max_align_t) char data[];
};

struct arg_vec {
	struct ms_imap_arg *v;
	unsigned int n;
	unsigned int cap;
};

struct ms_imap_parser {
	struct ms_imap_parser_limits limits;
	struct ms_imap_parser_callbacks cb;

	enum state state;
	char error[128];

	struct ms_imap_response resp;

	/* Per-response arena. */
	struct chunk *head;
	struct chunk *cur;

	/* The token being read (tag, atom, string, text, code name). */
	char *tok;
	size_t tok_len;
	size_t tok_cap;

	/* levels[0] is the top level (or the response code's arguments for
	 * a status response); levels[d] the list open at depth d. */
	struct arg_vec *levels;
	unsigned int nlevels;
	unsigned int depth;
	unsigned int nargs;

	size_t line_len;	/* non-literal bytes of this response */
	unsigned int bracket;	/* '[' nesting inside an atom */
	unsigned char cr;	/* a CR was seen: only LF may follow */
	unsigned char first;	/* the atom being read is the first token */
	unsigned char first_numeric;
	unsigned char in_code;	/* tokenising "[CODE args]" */

	/* Literal in progress. */
	uint64_t lit_size;
	uint64_t lit_left;
	unsigned int lit_digits;
	unsigned char lit_stream;
	char *lit_buf;
	uint64_t buffered_total;
};

/* Character classes, so the hot loops test one table entry per byte. */
#define C_ATOM		0x01	/* atom char, '[' excluded (starts a section) */
#define C_TEXT		0x02	/* anything but NUL, CR, LF */
#define C_QUOTED	0x04	/* C_TEXT minus '"' and '\\' */
#define C_TAG		0x08

#define IS_TEXT(c)	((c) != '\0' && (c) != '\r' && (c) != '\n')
#define IS_QUOTED(c)	(IS_TEXT(c) && (c) != '"' && (c) != '\\')
#define IS_ATOM(c)	((c) > 0x20 && (c) != 0x7f && (c) != '(' && (c) != ')' && \
			 (c) != '{' && (c) != '"' && (c) != ']' && (c) != '[')
/* tag = 1*<ASTRING-CHAR except "+">: 7-bit, no list-wildcards or
 * quoted-specials, but ']' is allowed. */
#define IS_TAG(c)	((c) > 0x20 && (c) < 0x7f && (c) != '(' && (c) != ')' && \
			 (c) != '{' && (c) != '"' && (c) != '%' && (c) != '*' && \
			 (c) != '\\' && (c) != '+')
#define CLS(c)		((IS_ATOM(c) ? C_ATOM : 0) | (IS_TEXT(c) ? C_TEXT : 0) | \
			 (IS_QUOTED(c) ? C_QUOTED : 0) | (IS_TAG(c) ? C_TAG : 0))
#define CLS4(c)		CLS(c), CLS((c) + 1), CLS((c) + 2), CLS((c) + 3)
#define CLS16(c)	CLS4(c), CLS4((c) + 4), CLS4((c) + 8), CLS4((c) + 12)
#define CLS64(c)	CLS16(c), CLS16((c) + 16), CLS16((c) + 32), CLS16((c) + 48)

/* Built at compile time: no init-once race between threads. */
static const unsigned char cclass[256] = {
	CLS64(0), CLS64(64), CLS64(128), CLS64(192)
};

static int fail(struct ms_imap_parser *p, const char *msg)
{
	snprintf(p->error, sizeof(p->error), "%s", msg);
	p->state = S_ERROR;
	return -1;
}

static int unexpected(struct ms_imap_parser *p, unsigned char c, const char *where)
{
	if (c == '\n')
		snprintf(p->error, sizeof(p->error),
			 "unexpected end of line in %s", where);
	else
		snprintf(p->error, sizeof(p->error),
			 "unexpected character 0x%02x in %s", c, where);
	p->state = S_ERROR;
	return -1;
}

/* --- arena ------------------------------------------------------------- */

static struct chunk *chunk_new(size_t size)
{
	struct chunk *c = malloc(sizeof(*c) + size);

	if (!c)
		return NULL;
	c->next = NULL;
	c->size = size;
	c->used = 0;
	return c;
}

static void *arena_alloc(struct ms_imap_parser *p, size_t size, size_t align)
{
	struct chunk *c = p->cur;
	size_t off = (c->used + align - 1) & ~(align - 1);
	size_t want;

	if (off <= c->size && size <= c->size - off) {
		c->used = off + size;
		return c->data + off;
	}
	want = c->size * 2;
	if (want > ARENA_MAX_GROWTH)
		want = ARENA_MAX_GROWTH;
	if (want < size)
		want = size;
	c = chunk_new(want);
	if (!c)
		return NULL;
	p->cur->next = c;
	p->cur = c;
	c->used = size;
	return c->data;
}

static void arena_reset(struct ms_imap_parser *p)
{
	struct chunk *c, *next;
	size_t total = 0;

	if (p->head->next) {
		for (c = p->head; c; c = next) {
			next = c->next;
			total += c->used;
			if (c != p->head)
				free(c);
		}
		p->head->next = NULL;
		/* Steady state should be one chunk and no malloc at all, so
		 * grow the head to what this response needed. */
		if (total > p->head->size && total <= ARENA_KEEP_MAX) {
			c = chunk_new(total);
			if (c) {
				free(p->head);
				p->head = c;
			}
		}
	}
	p->head->used = 0;
	p->cur = p->head;
}

static char *arena_strdup(struct ms_imap_parser *p, const char *s, size_t len)
{
	char *d = arena_alloc(p, len + 1, 1);

	if (!d)
		return NULL;
	memcpy(d, s, len);
	d[len] = '\0';
	return d;
}

/* --- token buffer ------------------------------------------------------ */

static int tok_reserve(struct ms_imap_parser *p, size_t more)
{
	size_t cap;
	char *t;

	if (p->tok_len + more < p->tok_cap)
		return 0;
	cap = p->tok_cap ? p->tok_cap : 256;
	while (cap <= p->tok_len + more)
		cap *= 2;
	t = realloc(p->tok, cap);
	if (!t)
		return fail(p, "out of memory");
	p->tok = t;
	p->tok_cap = cap;
	return 0;
}

static inline int tok_add(struct ms_imap_parser *p, unsigned char c)
{
	if (p->tok_len + 1 >= p->tok_cap && tok_reserve(p, 1) < 0)
		return -1;
	p->tok[p->tok_len++] = (char)c;
	return 0;
}

static char *tok_finish(struct ms_imap_parser *p)
{
	char *s = arena_strdup(p, p->tok ? p->tok : "", p->tok_len);

	if (!s)
		fail(p, "out of memory");
	return s;
}

/* --- argument tree ----------------------------------------------------- */

static int level_ensure(struct ms_imap_parser *p, unsigned int depth)
{
	struct arg_vec *l;
	unsigned int n;

	if (depth < p->nlevels)
		return 0;
	n = p->nlevels ? p->nlevels * 2 : 4;
	while (n <= depth)
		n *= 2;
	l = realloc(p->levels, n * sizeof(*l));
	if (!l)
		return fail(p, "out of memory");
	memset(l + p->nlevels, 0, (n - p->nlevels) * sizeof(*l));
	p->levels = l;
	p->nlevels = n;
	return 0;
}

static struct ms_imap_arg *push_arg(struct ms_imap_parser *p,
				    enum ms_imap_arg_type type)
{
	struct arg_vec *l = &p->levels[p->depth];
	struct ms_imap_arg *a;

	if (p->nargs >= p->limits.max_args) {
		fail(p, "too many arguments");
		return NULL;
	}
	if (l->n == l->cap) {
		unsigned int cap = l->cap ? l->cap * 2 : 16;
		struct ms_imap_arg *v = realloc(l->v, cap * sizeof(*v));

		if (!v) {
			fail(p, "out of memory");
			return NULL;
		}
		l->v = v;
		l->cap = cap;
	}
	p->nargs++;
	a = &l->v[l->n++];
	memset(a, 0, sizeof(*a));
	a->type = type;
	return a;
}

static int open_list(struct ms_imap_parser *p)
{
	if (p->depth >= p->limits.max_depth)
		return fail(p, "lists nested too deeply");
	if (!push_arg(p, MS_ARG_LIST) || level_ensure(p, p->depth + 1) < 0)
		return -1;
	p->depth++;
	p->levels[p->depth].n = 0;
	return 0;
}

static int close_list(struct ms_imap_parser *p)
{
	struct arg_vec *l = &p->levels[p->depth];
	struct arg_vec *up;
	struct ms_imap_arg *copy = NULL;

	if (p->depth == 0)
		return fail(p, "unbalanced ')'");
	if (l->n) {
		copy = arena_alloc(p, l->n * sizeof(*copy), _Alignof(struct ms_imap_arg));
		if (!copy)
			return fail(p, "out of memory");
		memcpy(copy, l->v, l->n * sizeof(*copy));
	}
	up = &p->levels[p->depth - 1];
	up->v[up->n - 1].list = copy;
	up->v[up->n - 1].list_count = l->n;
	p->depth--;
	return 0;
}

/* Point every open list at its elements so far, for the literal-start
 * callback. The pointers go stale as the vectors grow, but close_list()
 * overwrites them with the arena copy anyway. */
static void expose_partial(struct ms_imap_parser *p)
{
	unsigned int d;

	for (d = p->depth; d > 0; d--) {
		struct arg_vec *up = &p->levels[d - 1];

		up->v[up->n - 1].list = p->levels[d].n ? p->levels[d].v : NULL;
		up->v[up->n - 1].list_count = p->levels[d].n;
	}
	p->resp.args = p->levels[0].n ? p->levels[0].v : NULL;
	p->resp.argc = p->levels[0].n;
}

static enum ms_imap_status status_word(const char *s, size_t len)
{
	static const struct {
		const char *word;
		enum ms_imap_status status;
	} words[] = {
		{ "OK", MS_STATUS_OK },
		{ "NO", MS_STATUS_NO },
		{ "BAD", MS_STATUS_BAD },
		{ "BYE", MS_STATUS_BYE },
		{ "PREAUTH", MS_STATUS_PREAUTH },
	};
	size_t i;

	for (i = 0; i < sizeof(words) / sizeof(words[0]); i++)
		if (len == strlen(words[i].word) &&
		    !strncasecmp(s, words[i].word, len))
			return words[i].status;
	return MS_STATUS_NONE;
}

static int all_digits(const char *s, size_t len)
{
	size_t i;

	if (!len)
		return 0;
	for (i = 0; i < len; i++)
		if (s[i] < '0' || s[i] > '9')
			return 0;
	return 1;
}

/* The token ends as an argument of the given type (its text kept, but for
 * NIL), and the next argument may follow. */
static int push_token(struct ms_imap_parser *p, enum ms_imap_arg_type type)
{
	struct ms_imap_arg *a = push_arg(p, type);

	if (!a)
		return -1;
	if (type != MS_ARG_NIL) {
		a->str = tok_finish(p);
		if (!a->str)
			return -1;
		a->len = p->tok_len;
	}
	p->tok_len = 0;
	p->state = S_ARGS;
	return 0;
}

static int finish_atom(struct ms_imap_parser *p)
{
	if (p->first) {
		enum ms_imap_status st = status_word(p->tok, p->tok_len);

		p->first = 0;
		if (st != MS_STATUS_NONE) {
			p->resp.status = st;
			p->tok_len = 0;
			p->state = S_STATUS_END;
			return 0;
		}
		if (p->resp.kind == MS_RESP_TAGGED)
			return fail(p, "tagged response without OK/NO/BAD");
		p->first_numeric = all_digits(p->tok, p->tok_len);
	} else if (p->first_numeric && p->depth == 0 && p->levels[0].n == 1 &&
		   status_word(p->tok, p->tok_len) != MS_STATUS_NONE) {
		/* "* 3 OK": the grammar has no such thing, and a consumer
		 * would take it for message data. */
		return fail(p, "status response with a message number");
	}

	if (p->tok_len == 3 && !strncasecmp(p->tok, "NIL", 3))
		return push_token(p, MS_ARG_NIL);
	return push_token(p, MS_ARG_ATOM);
}

static int finish_string(struct ms_imap_parser *p)
{
	return push_token(p, MS_ARG_STRING);
}

static int literal_finish(struct ms_imap_parser *p)
{
	struct ms_imap_arg *a;

	if (p->lit_stream) {
		if (p->cb.literal_end)
			p->cb.literal_end(p->cb.ctx);
		a = push_arg(p, MS_ARG_STREAMED);
		if (!a)
			return -1;
	} else {
		a = push_arg(p, MS_ARG_LITERAL);
		if (!a)
			return -1;
		a->str = p->lit_buf;
		a->len = (size_t)p->lit_size;
		p->lit_buf = NULL;
	}
	a->size = p->lit_size;
	p->state = S_ARGS;
	return 0;
}

static int literal_begin(struct ms_imap_parser *p)
{
	int r = 0;

	/* Fail before the consumer commits to anything. */
	if (p->nargs >= p->limits.max_args)
		return fail(p, "too many arguments");
	if (p->cb.literal_start) {
		expose_partial(p);
		r = p->cb.literal_start(p->cb.ctx, &p->resp, p->lit_size);
		p->resp.args = NULL;
		p->resp.argc = 0;
		if (r < 0)
			return fail(p, "literal refused");
	}
	p->lit_stream = r > 0;
	if (!p->lit_stream) {
		uint64_t max_one = p->limits.max_buffered_literal;
		uint64_t max_total = max_one > UINT64_MAX / BUFFERED_TOTAL_FACTOR ?
				     UINT64_MAX : max_one * BUFFERED_TOTAL_FACTOR;

		/* SIZE_MAX: the + 1 for the NUL must not wrap. */
		if (p->lit_size > max_one || p->lit_size >= SIZE_MAX ||
		    p->lit_size > max_total - p->buffered_total)
			return fail(p, "literal too large to buffer");
		p->buffered_total += p->lit_size;
		p->lit_buf = arena_alloc(p, (size_t)p->lit_size + 1, 1);
		if (!p->lit_buf)
			return fail(p, "out of memory");
		p->lit_buf[p->lit_size] = '\0';
	}
	p->lit_left = p->lit_size;
	p->state = S_LITERAL;
	if (p->lit_left == 0)
		return literal_finish(p);
	return 0;
}

static int complete(struct ms_imap_parser *p)
{
	struct arg_vec *top = &p->levels[0];

	if (p->resp.status != MS_STATUS_NONE) {
		p->resp.code_args = top->n ? top->v : NULL;
		p->resp.code_argc = top->n;
	} else if (p->resp.kind != MS_RESP_CONTINUATION) {
		p->resp.args = top->n ? top->v : NULL;
		p->resp.argc = top->n;
	}
	p->state = S_DONE;
	return 1;
}

/* The token ends as a word of the response line (its tag, its code): kept,
 * and a new token begins. */
static int take_word(struct ms_imap_parser *p, const char **dst)
{
	*dst = tok_finish(p);
	if (!*dst)
		return -1;
	p->tok_len = 0;
	return 0;
}

static int complete_text(struct ms_imap_parser *p)
{
	p->resp.text = tok_finish(p);
	if (!p->resp.text)
		return -1;
	return complete(p);
}

/* One non-literal byte. Returns 1 when the response is complete, 0 to go
 * on, -1 on error. */
static int step(struct ms_imap_parser *p, unsigned char c)
{
	if (c == '\0')
		return fail(p, "NUL byte in response");
	if (++p->line_len > p->limits.max_line)
		return fail(p, "line too long");
	/* CR is only legal right before LF, in every state; handling it here
	 * lets each state see CRLF and bare LF as the same single '\n'. */
	if (p->cr) {
		if (c != '\n')
			return fail(p, "bare CR in response");
		p->cr = 0;
	} else if (c == '\r') {
		p->cr = 1;
		return 0;
	}

again:
	switch (p->state) {
	case S_START:
		if (c == '*') {
			p->resp.kind = MS_RESP_UNTAGGED;
			p->state = S_UNTAGGED_SP;
		} else if (c == '+') {
			p->resp.kind = MS_RESP_CONTINUATION;
			p->state = S_CONT;
		} else if (c == '\n') {
			return fail(p, "empty line");
		} else if (cclass[c] & C_TAG) {
			p->resp.kind = MS_RESP_TAGGED;
			p->state = S_TAG;
			return tok_add(p, c);
		} else {
			return unexpected(p, c, "tag");
		}
		return 0;

	case S_UNTAGGED_SP:
		if (c != ' ')
			return unexpected(p, c, "untagged response");
		p->state = S_FIRST;
		return 0;

	case S_TAG:
		if (cclass[c] & C_TAG)
			return tok_add(p, c);
		if (c != ' ')
			return unexpected(p, c, "tag");
		if (take_word(p, &p->resp.tag) < 0)
			return -1;
		p->state = S_FIRST;
		return 0;

	case S_CONT:
		/* "+" alone and "+text" happen in the wild; take both. */
	case S_AFTER_CODE:
		p->state = S_TEXT;
		if (c == ' ')
			return 0;
		goto again;

	case S_FIRST:
		if (!(cclass[c] & C_ATOM))
			return unexpected(p, c, "response");
		p->first = 1;
		p->state = S_ATOM;
		goto again;

	case S_STATUS_END:
		if (c == '\n')
			return complete_text(p);
		if (c != ' ')
			return unexpected(p, c, "status response");
		p->state = S_STATUS_SP;
		return 0;

	case S_STATUS_SP:
		if (c == '[') {
			p->state = S_CODE_NAME;
			return 0;
		}
		p->state = S_TEXT;
		goto again;

	case S_CODE_NAME:
		if (cclass[c] & C_ATOM)
			return tok_add(p, c);
		if (c != ']' && c != ' ')
			return unexpected(p, c, "response code");
		if (!p->tok_len)
			return fail(p, "empty response code");
		if (take_word(p, &p->resp.code) < 0)
			return -1;
		if (c == ']') {
			p->state = S_AFTER_CODE;
		} else {
			p->in_code = 1;
			p->state = S_ARGS;
		}
		return 0;

	case S_TEXT:
		if (c == '\n')
			return complete_text(p);
		return tok_add(p, c);

	case S_ARGS:
		switch (c) {
		case ' ':
			return 0;
		case '\n':
			if (p->in_code)
				return fail(p, "unterminated response code");
			if (p->depth)
				return fail(p, "missing ')' at end of line");
			return complete(p);
		case '(':
			return open_list(p);
		case ')':
			return close_list(p);
		case ']':
			if (!p->in_code || p->depth)
				return unexpected(p, c, "arguments");
			p->in_code = 0;
			p->state = S_AFTER_CODE;
			return 0;
		case '"':
			p->tok_len = 0;
			p->state = S_QUOTED;
			return 0;
		case '{':
			if (p->in_code)
				return unexpected(p, c, "response code");
			p->lit_size = 0;
			p->lit_digits = 0;
			p->state = S_LIT_SIZE;
			return 0;
		case '~':
			if (p->in_code)
				break;
			p->tok_len = 0;
			p->state = S_TILDE;
			return 0;
		}
		if (!(cclass[c] & C_ATOM) && c != '[')
			return unexpected(p, c, "arguments");
		p->tok_len = 0;
		p->state = S_ATOM;
		goto again;

	case S_ATOM:
		if (cclass[c] & C_ATOM)
			return tok_add(p, c);
		if (c == '[') {
			p->bracket = 1;
			p->state = S_ATOM_BRACKET;
			return tok_add(p, c);
		}
		if (c == ' ' || c == ')' || c == '\n' || (c == ']' && p->in_code)) {
			if (finish_atom(p) < 0)
				return -1;
			goto again;
		}
		return unexpected(p, c, "atom");

	case S_ATOM_BRACKET:
		/* BODY[HEADER.FIELDS (MESSAGE-ID)]: spaces and parens are
		 * part of the atom up to the matching ']'. */
		if (c == '\n')
			return fail(p, "unterminated '[' in atom");
		if (c < 0x20 || c == 0x7f)
			return unexpected(p, c, "atom");
		if (c == '[')
			p->bracket++;
		else if (c == ']' && --p->bracket == 0)
			p->state = S_ATOM;
		return tok_add(p, c);

	case S_TILDE:
		if (c == '{') {
			p->lit_size = 0;
			p->lit_digits = 0;
			p->state = S_LIT_SIZE;
			return 0;
		}
		/* Just an atom that starts with '~'. */
		if (tok_add(p, '~') < 0)
			return -1;
		p->state = S_ATOM;
		goto again;

	case S_QUOTED:
		if (c == '"')
			return finish_string(p);
		if (c == '\\') {
			p->state = S_QUOTED_ESC;
			return 0;
		}
		if (c == '\n')
			return fail(p, "unterminated quoted string");
		return tok_add(p, c);

	case S_QUOTED_ESC:
		if (c == '\n')
			return fail(p, "unterminated quoted string");
		/* Only \" and \\ are legal; take any other escaped char
		 * literally rather than fail a whole mailbox listing. */
		p->state = S_QUOTED;
		return tok_add(p, c);

	case S_LIT_SIZE:
		if (c >= '0' && c <= '9') {
			unsigned int d = c - '0';

			/* Also catches uint64_t overflow, as max_literal
			 * is itself a uint64_t. */
			if (p->lit_size > (p->limits.max_literal - d) / 10)
				return fail(p, "literal too large");
			p->lit_size = p->lit_size * 10 + d;
			p->lit_digits++;
			return 0;
		}
		if (!p->lit_digits || (c != '+' && c != '}'))
			return fail(p, "bad literal syntax");
		p->state = c == '+' ? S_LIT_PLUS : S_LIT_EOL;
		return 0;

	case S_LIT_PLUS:
		if (c != '}')
			return fail(p, "bad literal syntax");
		p->state = S_LIT_EOL;
		return 0;

	case S_LIT_EOL:
		if (c != '\n')
			return fail(p, "bad literal syntax");
		return literal_begin(p);

	case S_LITERAL:
	case S_DONE:
	case S_ERROR:
		break;
	}
	return fail(p, "internal parser error");
}

/* Vectors bigger than this are freed between responses, so that one huge
 * SEARCH result does not pin megabytes for the connection's lifetime. */
#define LEVEL_KEEP_MAX		1024

static void reset_response(struct ms_imap_parser *p)
{
	unsigned int i;

	for (i = 0; i < p->nlevels; i++) {
		if (p->levels[i].cap > LEVEL_KEEP_MAX) {
			free(p->levels[i].v);
			p->levels[i].v = NULL;
			p->levels[i].cap = 0;
		}
	}
	arena_reset(p);
	memset(&p->resp, 0, sizeof(p->resp));
	p->state = S_START;
	p->tok_len = 0;
	p->depth = 0;
	p->levels[0].n = 0;
	p->nargs = 0;
	p->line_len = 0;
	p->bracket = 0;
	p->cr = 0;
	p->first = 0;
	p->first_numeric = 0;
	p->in_code = 0;
	p->lit_buf = NULL;
	p->buffered_total = 0;
}

struct ms_imap_parser *ms_imap_parser_new(const struct ms_imap_parser_limits *limits,
					  const struct ms_imap_parser_callbacks *cb)
{
	struct ms_imap_parser *p;

	p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->limits = limits ? *limits : ms_imap_parser_default_limits;
	if (cb)
		p->cb = *cb;
	p->head = chunk_new(ARENA_MIN_CHUNK);
	if (!p->head || level_ensure(p, 0) < 0) {
		ms_imap_parser_free(&p);
		return NULL;
	}
	reset_response(p);
	return p;
}

void ms_imap_parser_free(struct ms_imap_parser **parser)
{
	struct ms_imap_parser *p = *parser;
	struct chunk *c, *next;
	unsigned int i;

	if (!p)
		return;
	for (c = p->head; c; c = next) {
		next = c->next;
		free(c);
	}
	for (i = 0; i < p->nlevels; i++)
		free(p->levels[i].v);
	free(p->levels);
	free(p->tok);
	free(p);
	*parser = NULL;
}

/* Length of the run at data[0..len) of bytes in class cls, capped so the
 * line limit is still enforced byte-exactly by step(). */
static size_t run_len(const struct ms_imap_parser *p, const unsigned char *data,
		      size_t len, unsigned char cls)
{
	size_t room = p->limits.max_line - p->line_len;
	size_t n = 0;

	if (p->line_len >= p->limits.max_line)
		return 0;
	if (len > room)
		len = room;
	while (n < len && (cclass[data[n]] & cls))
		n++;
	return n;
}

ssize_t ms_imap_parser_feed(struct ms_imap_parser *p, const char *data,
			    size_t len, const struct ms_imap_response **resp_r)
{
	const unsigned char *d = (const unsigned char *)data;
	size_t i = 0;

	*resp_r = NULL;
	if (p->state == S_ERROR)
		return -1;
	if (p->state == S_DONE)
		reset_response(p);

	while (i < len) {
		unsigned char cls = 0;
		int r;

		switch (p->state) {
		case S_LITERAL: {
			size_t n = len - i;

			if (n > p->lit_left)
				n = (size_t)p->lit_left;
			if (!p->lit_stream) {
				memcpy(p->lit_buf + (p->lit_size - p->lit_left),
				       d + i, n);
			} else if (p->cb.literal_data &&
				   p->cb.literal_data(p->cb.ctx, d + i, n) < 0) {
				return fail(p, "literal data refused");
			}
			i += n;
			p->lit_left -= n;
			if (!p->lit_left && literal_finish(p) < 0)
				return -1;
			continue;
		}
		/* Fast paths for the bulk of a response: copy whole runs of
		 * ordinary bytes instead of stepping through each. */
		case S_ATOM:
			cls = C_ATOM;
			break;
		case S_TEXT:
			cls = C_TEXT;
			break;
		case S_QUOTED:
			cls = C_QUOTED;
			break;
		default:
			break;
		}
		if (cls && !p->cr) {
			size_t n = run_len(p, d + i, len - i, cls);

			if (n) {
				if (tok_reserve(p, n) < 0)
					return -1;
				memcpy(p->tok + p->tok_len, d + i, n);
				p->tok_len += n;
				p->line_len += n;
				i += n;
				continue;
			}
		}

		r = step(p, d[i++]);
		if (r < 0)
			return -1;
		if (r > 0) {
			*resp_r = &p->resp;
			return (ssize_t)i;
		}
	}
	return (ssize_t)len;
}

const char *ms_imap_parser_error(const struct ms_imap_parser *p)
{
	return p->state == S_ERROR ? p->error : NULL;
}

int ms_imap_arg_is(const struct ms_imap_arg *arg, const char *s)
{
	size_t n;

	if (!arg || (arg->type != MS_ARG_ATOM && arg->type != MS_ARG_STRING))
		return 0;
	n = strlen(s);
	return arg->len == n && !strncasecmp(arg->str, s, n);
}

int ms_imap_arg_number(const struct ms_imap_arg *arg, uint64_t *num_r)
{
	uint64_t n = 0;
	size_t i;

	if (!arg || arg->type != MS_ARG_ATOM || !all_digits(arg->str, arg->len))
		return -1;
	for (i = 0; i < arg->len; i++) {
		unsigned int dgt = arg->str[i] - '0';

		if (n > (((uint64_t)1 << 63) - 1 - dgt) / 10)
			return -1;
		n = n * 10 + dgt;
	}
	*num_r = n;
	return 0;
}

const char *ms_imap_arg_str(const struct ms_imap_arg *arg)
{
	if (!arg)
		return NULL;
	switch (arg->type) {
	case MS_ARG_ATOM:
	case MS_ARG_STRING:
	case MS_ARG_LITERAL:
		return arg->str;
	default:
		return NULL;
	}
}
