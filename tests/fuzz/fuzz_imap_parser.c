/* libFuzzer target: the IMAP response parser (daemon/imap_parser.h).
 * Built by `make fuzz-build`, run by `make check` (check-fuzz) and
 * `make fuzz FUZZ=fuzz_imap_parser`; seeds in tests/fuzz/corpus/fuzz_imap_parser/.
 *
 * Input: byte 0 seeds the chunk sizes, byte 1 picks limits and literal
 * policy, the rest is what the "server" sends. The stream is parsed twice,
 * once in a single feed and once in random-sized chunks; besides the
 * sanitizers, the oracle is that both parses produce the same responses,
 * callbacks and error, and that every response obeys the limits.
 */
#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "imap_parser.h"

struct fctx {
	uint64_t hash;			/* FNV-1a over everything observed */
	unsigned int policy;
	unsigned int nlit;
	int in_literal;
	uint64_t lit_size;
	uint64_t lit_got;
	const struct ms_imap_parser_limits *limits;
};

static void mix(struct fctx *f, const void *data, size_t len)
{
	const unsigned char *d = data;
	size_t i;

	for (i = 0; i < len; i++) {
		f->hash ^= d[i];
		f->hash *= 0x100000001b3ULL;
	}
}

static void mix_u64(struct fctx *f, uint64_t v)
{
	mix(f, &v, sizeof(v));
}

/* Walk an arg tree: hash it and check its invariants. Returns the number
 * of args in it. */
static unsigned int walk_arg(struct fctx *f, const struct ms_imap_arg *a,
			     unsigned int depth)
{
	unsigned int i, n = 1;

	mix_u64(f, a->type);
	switch (a->type) {
	case MS_ARG_ATOM:
	case MS_ARG_STRING:
		assert(a->str && strlen(a->str) == a->len);
		assert(a->type != MS_ARG_ATOM || a->len > 0);
		mix(f, a->str, a->len + 1);
		break;
	case MS_ARG_LITERAL:
		assert(a->str && a->len == a->size && a->str[a->len] == '\0');
		assert(a->size <= f->limits->max_buffered_literal);
		mix(f, a->str, a->len);
		break;
	case MS_ARG_STREAMED:
		assert(a->size <= f->limits->max_literal);
		mix_u64(f, a->size);
		break;
	case MS_ARG_NIL:
		assert(!ms_imap_arg_str(a));
		break;
	case MS_ARG_LIST:
		assert(depth < f->limits->max_depth);
		assert(a->list_count == 0 || a->list);
		mix_u64(f, a->list_count);
		for (i = 0; i < a->list_count; i++)
			n += walk_arg(f, &a->list[i], depth + 1);
		break;
	default:
		assert(0);
	}
	return n;
}

static void walk_resp(struct fctx *f, const struct ms_imap_response *r)
{
	unsigned int i, n = 0;

	mix_u64(f, r->kind);
	mix_u64(f, r->status);
	assert((r->kind == MS_RESP_TAGGED) == (r->tag != NULL));
	if (r->tag)
		mix(f, r->tag, strlen(r->tag) + 1);
	if (r->code)
		mix(f, r->code, strlen(r->code) + 1);
	if (r->text)
		mix(f, r->text, strlen(r->text) + 1);
	assert(r->code_argc == 0 || r->code);
	assert(r->status == MS_STATUS_NONE || r->argc == 0);
	for (i = 0; i < r->code_argc; i++)
		n += walk_arg(f, &r->code_args[i], 0);
	for (i = 0; i < r->argc; i++)
		n += walk_arg(f, &r->args[i], 0);
	assert(n <= f->limits->max_args);
}

static int cb_start(void *ctx, const struct ms_imap_response *partial,
		    uint64_t size)
{
	struct fctx *f = ctx;
	unsigned int k = f->nlit++;

	assert(!f->in_literal);
	assert(size <= f->limits->max_literal);
	mix(f, "L", 1);
	mix_u64(f, size);
	walk_resp(f, partial);
	/* The decision may depend on anything but the chunking. */
	switch (f->policy) {
	case 1:
		break;
	case 2:
		goto stream;
	case 3:
		if (size & 1)
			goto stream;
		break;
	default:
		if (k % 5 == 4)
			return -1;
		if (k & 1)
			goto stream;
		break;
	}
	return 0;
stream:
	f->in_literal = 1;
	f->lit_size = size;
	f->lit_got = 0;
	return 1;
}

static int cb_data(void *ctx, const void *data, size_t len)
{
	struct fctx *f = ctx;
	const unsigned char *ff = f->policy == 3 ? memchr(data, 0xff, len) : NULL;

	assert(f->in_literal && len > 0);
	f->lit_got += len;
	assert(f->lit_got <= f->lit_size);
	/* Fail on a byte value, not on a chunk boundary, and hash only up
	 * to it, so the result does not depend on the chunking. */
	if (ff) {
		mix(f, data, (size_t)(ff - (const unsigned char *)data) + 1);
		return -1;
	}
	mix(f, data, len);
	return 0;
}

static void cb_end(void *ctx)
{
	struct fctx *f = ctx;

	assert(f->in_literal && f->lit_got == f->lit_size);
	f->in_literal = 0;
	mix(f, "E", 1);
}

static uint64_t run(const unsigned char *data, size_t len,
		    const struct ms_imap_parser_limits *limits,
		    unsigned int policy, uint32_t seed)
{
	struct fctx f = {
		.hash = 0xcbf29ce484222325ULL,
		.policy = policy,
		.limits = limits,
	};
	struct ms_imap_parser_callbacks cb = {
		.literal_start = policy ? cb_start : NULL,
		.literal_data = cb_data,
		.literal_end = cb_end,
		.ctx = &f,
	};
	struct ms_imap_parser *p = ms_imap_parser_new(limits, &cb);
	size_t pos = 0;

	assert(p);
	while (pos < len) {
		const struct ms_imap_response *r;
		size_t n = len - pos;
		ssize_t got;

		if (seed) {
			/* xorshift32; mostly small chunks, sometimes big. */
			seed ^= seed << 13;
			seed ^= seed >> 17;
			seed ^= seed << 5;
			n = (seed & 0x80) ? 1 + (seed >> 8) % 4096 : 1 + (seed >> 8) % 8;
			if (n > len - pos)
				n = len - pos;
		}
		got = ms_imap_parser_feed(p, (const char *)data + pos, n, &r);
		if (got < 0) {
			const char *e = ms_imap_parser_error(p);

			assert(e && *e);
			mix(&f, e, strlen(e));
			assert(ms_imap_parser_feed(p, "\n", 1, &r) == -1);
			break;
		}
		assert((size_t)got <= n);
		if (r) {
			assert(got > 0 && data[pos + got - 1] == '\n');
			mix(&f, "R", 1);
			walk_resp(&f, r);
		} else {
			assert((size_t)got == n);
		}
		pos += (size_t)got;
	}
	ms_imap_parser_free(&p);
	return f.hash;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct ms_imap_parser_limits limits = ms_imap_parser_default_limits;
	unsigned int policy;
	uint32_t seed;

	if (size < 2)
		return 0;
	seed = data[0] | 0x100;	/* never 0: 0 means "all at once" */
	/* 0: no callback, 1: buffer, 2: stream, 3: stream odd sizes,
	 * 4..7: mixed, with refusals. */
	policy = data[1] & 7;
	if (data[1] & 8) {
		/* Tiny limits, so the fuzzer reaches every limit check. */
		limits.max_line = 24 + (data[1] >> 4);
		limits.max_literal = 40;
		limits.max_buffered_literal = 8;
		limits.max_depth = 3;
		limits.max_args = 12;
	}
	if (run(data + 2, size - 2, &limits, policy, 0) !=
	    run(data + 2, size - 2, &limits, policy, seed))
		__builtin_trap();
	return 0;
}
