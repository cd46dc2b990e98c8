/* Unit tests for the IMAP response parser (daemon/imap_parser.c).
 *
 * Every case is parsed three times: the whole input in one call, one byte per
 * call, and in 7-byte chunks. The parser's output (responses, literal
 * callbacks, errors) is rendered into a text dump, the three dumps must be
 * identical, and the test compares that dump with the expected one. That
 * way a state carried wrongly across a chunk boundary shows up in any case.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "imap_parser.h"

/* --- a growable text buffer ------------------------------------------- */

struct out {
	char *buf;
	size_t len;
	size_t cap;
};

static void out_add(struct out *o, const void *data, size_t n)
{
	if (o->len + n + 1 > o->cap) {
		size_t cap = o->cap ? o->cap : 256;

		while (cap < o->len + n + 1)
			cap *= 2;
		o->buf = realloc(o->buf, cap);
		assert_non_null(o->buf);
		o->cap = cap;
	}
	memcpy(o->buf + o->len, data, n);
	o->len += n;
	o->buf[o->len] = '\0';
}

static void out_str(struct out *o, const char *s)
{
	out_add(o, s, strlen(s));
}

static void __attribute__((format(printf, 2, 3)))
out_printf(struct out *o, const char *fmt, ...)
{
	char tmp[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	assert_true(n >= 0 && (size_t)n < sizeof(tmp));
	out_add(o, tmp, (size_t)n);
}

/* Non-printable bytes as \xNN so dumps stay one line per response. */
static void out_escaped(struct out *o, const char *s, size_t len, int quotes)
{
	size_t i;

	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c < 0x20 || c >= 0x7f)
			out_printf(o, "\\x%02x", c);
		else if (quotes && (c == '"' || c == '\\'))
			out_printf(o, "\\%c", c);
		else
			out_add(o, &c, 1);
	}
}

/* --- rendering parser output ------------------------------------------ */

static void dump_arg(struct out *o, const struct ms_imap_arg *a)
{
	unsigned int i;

	switch (a->type) {
	case MS_ARG_ATOM:
		assert_non_null(a->str);
		assert_int_equal(strlen(a->str), a->len);
		assert_null(a->list);
		out_escaped(o, a->str, a->len, 0);
		break;
	case MS_ARG_STRING:
		assert_non_null(a->str);
		assert_int_equal(strlen(a->str), a->len);
		out_str(o, "\"");
		out_escaped(o, a->str, a->len, 1);
		out_str(o, "\"");
		break;
	case MS_ARG_LITERAL:
		assert_non_null(a->str);
		assert_int_equal(a->size, a->len);
		assert_int_equal(a->str[a->len], '\0');
		out_printf(o, "{%zu}\"", a->len);
		out_escaped(o, a->str, a->len, 1);
		out_str(o, "\"");
		break;
	case MS_ARG_STREAMED:
		out_printf(o, "{%llu}STREAMED", (unsigned long long)a->size);
		break;
	case MS_ARG_NIL:
		assert_null(ms_imap_arg_str(a));
		out_str(o, "NIL");
		break;
	case MS_ARG_LIST:
		assert_true(a->list_count == 0 || a->list != NULL);
		out_str(o, "(");
		for (i = 0; i < a->list_count; i++) {
			if (i)
				out_str(o, " ");
			dump_arg(o, &a->list[i]);
		}
		out_str(o, ")");
		break;
	default:
		fail_msg("bad arg type %d", a->type);
	}
}

static const char *status_name(enum ms_imap_status st)
{
	switch (st) {
	case MS_STATUS_OK: return "OK";
	case MS_STATUS_NO: return "NO";
	case MS_STATUS_BAD: return "BAD";
	case MS_STATUS_BYE: return "BYE";
	case MS_STATUS_PREAUTH: return "PREAUTH";
	default: return "?";
	}
}

static void dump_resp(struct out *o, const struct ms_imap_response *r)
{
	unsigned int i;

	switch (r->kind) {
	case MS_RESP_UNTAGGED:
		assert_null(r->tag);
		out_str(o, "*");
		break;
	case MS_RESP_TAGGED:
		assert_non_null(r->tag);
		out_str(o, r->tag);
		break;
	case MS_RESP_CONTINUATION:
		assert_null(r->tag);
		out_str(o, "+");
		break;
	}

	if (r->kind == MS_RESP_CONTINUATION) {
		assert_int_equal(r->status, MS_STATUS_NONE);
		assert_int_equal(r->argc, 0);
		assert_non_null(r->text);
		out_str(o, " '");
		out_escaped(o, r->text, strlen(r->text), 0);
		out_str(o, "'");
	} else if (r->status != MS_STATUS_NONE) {
		assert_int_equal(r->argc, 0);
		assert_null(r->args);
		out_printf(o, " %s", status_name(r->status));
		if (r->code) {
			out_printf(o, " [%s", r->code);
			for (i = 0; i < r->code_argc; i++) {
				out_str(o, " ");
				dump_arg(o, &r->code_args[i]);
			}
			out_str(o, "]");
		} else {
			assert_int_equal(r->code_argc, 0);
		}
		assert_non_null(r->text);
		out_str(o, " '");
		out_escaped(o, r->text, strlen(r->text), 0);
		out_str(o, "'");
	} else {
		assert_null(r->code);
		assert_int_equal(r->code_argc, 0);
		for (i = 0; i < r->argc; i++) {
			out_str(o, " ");
			dump_arg(o, &r->args[i]);
		}
	}
}

enum lit_mode {
	LIT_NULL_CB,		/* no literal_start callback: always buffer */
	LIT_BUFFER,
	LIT_STREAM,
	LIT_REFUSE,
	LIT_STREAM_FAIL,	/* literal_data fails */
};

struct tctx {
	struct out *o;
	enum lit_mode mode;
	struct out stream;
	int in_literal;
};

static int cb_start(void *ctx, const struct ms_imap_response *partial,
		    uint64_t size)
{
	struct tctx *t = ctx;

	assert_false(t->in_literal);
	assert_int_equal(partial->status, MS_STATUS_NONE);
	out_printf(t->o, "LIT %llu ", (unsigned long long)size);
	dump_resp(t->o, partial);
	out_str(t->o, "\n");
	switch (t->mode) {
	case LIT_STREAM:
	case LIT_STREAM_FAIL:
		t->in_literal = 1;
		t->stream.len = 0;
		return 1;
	case LIT_REFUSE:
		return -1;
	default:
		return 0;
	}
}

static int cb_data(void *ctx, const void *data, size_t len)
{
	struct tctx *t = ctx;

	assert_true(t->in_literal);
	assert_true(len > 0);
	if (t->mode == LIT_STREAM_FAIL)
		return -1;
	out_add(&t->stream, data, len);
	return 0;
}

static void cb_end(void *ctx)
{
	struct tctx *t = ctx;

	assert_true(t->in_literal);
	t->in_literal = 0;
	out_printf(t->o, "END %zu '", t->stream.len);
	out_escaped(t->o, t->stream.buf ? t->stream.buf : "", t->stream.len, 0);
	out_str(t->o, "'\n");
}

/* Parse in chunks of `chunk` bytes (0 = everything at once) and render. */
static char *parse_dump(const char *in, size_t len,
			const struct ms_imap_parser_limits *limits,
			enum lit_mode mode, size_t chunk)
{
	struct out o = { 0 };
	struct tctx t = { .o = &o, .mode = mode };
	struct ms_imap_parser_callbacks cb = {
		.literal_start = mode == LIT_NULL_CB ? NULL : cb_start,
		.literal_data = cb_data,
		.literal_end = cb_end,
		.ctx = &t,
	};
	struct ms_imap_parser *p = ms_imap_parser_new(limits, &cb);
	size_t pos = 0;
	int pending = 0;

	assert_non_null(p);
	out_str(&o, "");
	while (pos < len) {
		const struct ms_imap_response *resp;
		size_t n = chunk && chunk < len - pos ? chunk : len - pos;
		ssize_t r = ms_imap_parser_feed(p, in + pos, n, &resp);

		if (r < 0) {
			assert_non_null(ms_imap_parser_error(p));
			out_printf(&o, "ERROR %s\n", ms_imap_parser_error(p));
			/* An error is final. */
			assert_int_equal(ms_imap_parser_feed(p, "x", 1, &resp), -1);
			pending = 0;
			break;
		}
		assert_true((size_t)r <= n);
		assert_null(ms_imap_parser_error(p));
		if (resp) {
			/* It must stop right after the response's LF. */
			assert_true(r > 0);
			assert_int_equal(in[pos + r - 1], '\n');
			dump_resp(&o, resp);
			out_str(&o, "\n");
			pending = 0;
		} else {
			/* Without a response, everything must be taken. */
			assert_int_equal((size_t)r, n);
			pending = 1;
		}
		pos += (size_t)r;
	}
	if (pending)
		out_str(&o, "PENDING\n");
	ms_imap_parser_free(&p);
	assert_null(p);
	free(t.stream.buf);
	return o.buf;
}

/* Parse whole, byte by byte and in 7-byte chunks; all must agree. */
static char *parse_all_ways(const char *in, size_t len,
			    const struct ms_imap_parser_limits *limits,
			    enum lit_mode mode)
{
	char *whole = parse_dump(in, len, limits, mode, 0);
	char *bytes = parse_dump(in, len, limits, mode, 1);
	char *seven = parse_dump(in, len, limits, mode, 7);

	assert_string_equal(whole, bytes);
	assert_string_equal(whole, seven);
	free(bytes);
	free(seven);
	return whole;
}

static void check_mode(const char *in, size_t len,
		       const struct ms_imap_parser_limits *limits,
		       enum lit_mode mode, const char *expected)
{
	char *got = parse_all_ways(in, len, limits, mode);

	assert_string_equal(got, expected);
	free(got);
}

#define CHECK(in, expected) \
	check_mode(in, strlen(in), NULL, LIT_BUFFER, expected)
#define CHECK_LIM(in, lim, expected) \
	check_mode(in, strlen(in), lim, LIT_BUFFER, expected)
/* For string literals with NULs in them. */
#define CHECK_BIN(in, lim, mode, expected) \
	check_mode(in, sizeof(in) - 1, lim, mode, expected)

/* --- status responses ------------------------------------------------- */

static void test_greeting_capability(void **state)
{
	const char *in = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID "
			 "ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";
	struct ms_imap_parser *p = ms_imap_parser_new(NULL, NULL);
	const struct ms_imap_response *r;

	CHECK(in, "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID "
		  "ENABLE IDLE LITERAL+ AUTH=PLAIN] 'Dovecot ready.'\n");

	/* The same through the struct, as a consumer sees it. */
	assert_int_equal(ms_imap_parser_feed(p, in, strlen(in), &r), strlen(in));
	assert_non_null(r);
	assert_int_equal(r->kind, MS_RESP_UNTAGGED);
	assert_int_equal(r->status, MS_STATUS_OK);
	assert_string_equal(r->code, "CAPABILITY");
	assert_int_equal(r->code_argc, 8);
	assert_true(ms_imap_arg_is(&r->code_args[0], "imap4rev1"));
	assert_true(ms_imap_arg_is(&r->code_args[6], "LITERAL+"));
	assert_string_equal(r->text, "Dovecot ready.");
	assert_int_equal(r->argc, 0);
	ms_imap_parser_free(&p);

	CHECK("* PREAUTH [CAPABILITY IMAP4rev2] Logged in as x\r\n",
	      "* PREAUTH [CAPABILITY IMAP4rev2] 'Logged in as x'\n");
	CHECK("* BYE Autologout; idle for too long\r\n",
	      "* BYE 'Autologout; idle for too long'\n");
	CHECK("* bye\r\n", "* BYE ''\n");
}

static void test_tagged_status(void **state)
{
	CHECK("a1 OK [READ-WRITE] SELECT completed\r\n",
	      "a1 OK [READ-WRITE] 'SELECT completed'\n");
	CHECK("a2 NO [TRYCREATE] Mailbox doesn't exist: Foo\r\n",
	      "a2 NO [TRYCREATE] 'Mailbox doesn't exist: Foo'\n");
	/* Text is raw: brackets, quotes and parens are just text. */
	CHECK("A003 BAD Error in IMAP command: [x] \"y\" (z\r\n",
	      "A003 BAD 'Error in IMAP command: [x] \"y\" (z'\n");
	CHECK("a4 ok [APPENDUID 38505 3955:3960] Append completed.\r\n",
	      "a4 OK [APPENDUID 38505 3955:3960] 'Append completed.'\n");
	CHECK("a5 OK\r\n", "a5 OK ''\n");
	CHECK("a5 Ok \r\n", "a5 OK ''\n");
	CHECK("TAG NO [X] text\r\n", "TAG NO [X] 'text'\n");
	CHECK("x.y] BAD [ALERT]\r\n", "x.y] BAD [ALERT] ''\n");
	CHECK("* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen "
	      "\\Draft \\*)] Flags permitted.\r\n",
	      "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen "
	      "\\Draft \\*)] 'Flags permitted.'\n");
	CHECK("* OK [PERMANENTFLAGS ()] No permanent flags permitted\r\n",
	      "* OK [PERMANENTFLAGS ()] 'No permanent flags permitted'\n");
	CHECK("* OK [UIDVALIDITY 3857529045] UIDs valid\r\n",
	      "* OK [UIDVALIDITY 3857529045] 'UIDs valid'\n");
	CHECK("* OK [UIDNEXT 4] Predicted next UID\r\n",
	      "* OK [UIDNEXT 4] 'Predicted next UID'\n");
	CHECK("* NO [ALERT]\r\n", "* NO [ALERT] ''\n");
	CHECK("* OK [ALERT]   spaced\r\n", "* OK [ALERT] '  spaced'\n");
	CHECK("* OK [BADCHARSET (UTF-8 \"US-ASCII\")] x\r\n",
	      "* OK [BADCHARSET (UTF-8 \"US-ASCII\")] 'x'\n");
	CHECK("* OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n",
	      "* OK [COPYUID 38505 304,319:320 3956:3958] 'Done'\n");
	CHECK("* OK [HIGHESTMODSEQ 715194045007]\r\n",
	      "* OK [HIGHESTMODSEQ 715194045007] ''\n");
	/* Status words are whole atoms only. */
	CHECK("* OKAY 1\r\n", "* OKAY 1\n");
	/* Bare LF ends a line too; 8-bit text is kept. */
	CHECK("* OK caf\xc3\xa9\n", "* OK 'caf\\xc3\\xa9'\n");
}

static void test_status_errors(void **state)
{
	CHECK("* 3 OK\r\n",
	      "ERROR status response with a message number\n");
	CHECK("* 3 bye x\r\n",
	      "ERROR status response with a message number\n");
	CHECK("a1 FOO bar\r\n", "ERROR tagged response without OK/NO/BAD\n");
	CHECK("a1\r\n", "ERROR unexpected end of line in tag\n");
	CHECK("a1 \r\n", "ERROR unexpected end of line in response\n");
	CHECK("*\r\n", "ERROR unexpected end of line in untagged response\n");
	CHECK("* \r\n", "ERROR unexpected end of line in response\n");
	CHECK("*OK\r\n", "ERROR unexpected character 0x4f in untagged response\n");
	CHECK("* (a)\r\n", "ERROR unexpected character 0x28 in response\n");
	CHECK("* OK [ALERT foo\r\n", "ERROR unterminated response code\n");
	CHECK("* OK []\r\n", "ERROR empty response code\n");
	CHECK("* OK [X {3}\r\nabc]\r\n",
	      "ERROR unexpected character 0x7b in response code\n");
	CHECK("* OK [X (a] b\r\n", "ERROR unexpected character 0x5d in arguments\n");
	/* Empty tag, invalid tag characters. */
	CHECK(" OK hi\r\n", "ERROR unexpected character 0x20 in tag\n");
	CHECK("a*1 OK hi\r\n", "ERROR unexpected character 0x2a in tag\n");
	CHECK("a\"1 OK hi\r\n", "ERROR unexpected character 0x22 in tag\n");
	CHECK("\xc3\xa9 OK hi\r\n", "ERROR unexpected character 0xc3 in tag\n");
}

static void test_continuation(void **state)
{
	CHECK("+ Ready for literal data\r\n", "+ 'Ready for literal data'\n");
	CHECK("+\r\n", "+ ''\n");
	CHECK("+ \r\n", "+ ''\n");
	CHECK("+ [not parsed] \"x\r\n", "+ '[not parsed] \"x'\n");
	CHECK("+ YGgGCSqGSIb3EgECAgIAb1kwV6ADAgEFoQMCAQ+iSzBJoAMCAQGiQgRAtHTEuOP2\r\n",
	      "+ 'YGgGCSqGSIb3EgECAgIAb1kwV6ADAgEFoQMCAQ+iSzBJoAMCAQGiQgRAtHTEuOP2'\n");
	CHECK("+idling\n", "+ 'idling'\n");
}

/* --- data responses ---------------------------------------------------- */

static void test_untagged_data(void **state)
{
	CHECK("* 3 EXISTS\r\n", "* 3 EXISTS\n");
	CHECK("* 1 EXPUNGE\r\n", "* 1 EXPUNGE\n");
	CHECK("* 0 RECENT\r\n", "* 0 RECENT\n");
	CHECK("* CAPABILITY IMAP4rev1 STARTTLS AUTH=GSSAPI LOGINDISABLED\r\n",
	      "* CAPABILITY IMAP4rev1 STARTTLS AUTH=GSSAPI LOGINDISABLED\n");
	CHECK("* SEARCH 1 2 3\r\n", "* SEARCH 1 2 3\n");
	CHECK("* SEARCH\r\n", "* SEARCH\n");
	/* Some servers leave a space before CRLF. */
	CHECK("* SEARCH 2 \r\n", "* SEARCH 2\n");
	CHECK("* ESEARCH (TAG \"a\") UID ALL 1:3\r\n",
	      "* ESEARCH (TAG \"a\") UID ALL 1:3\n");
	CHECK("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)\r\n",
	      "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)\n");
	CHECK("* STATUS \"x\" (MESSAGES 2 UIDNEXT 44292)\r\n",
	      "* STATUS \"x\" (MESSAGES 2 UIDNEXT 44292)\n");
	CHECK("* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\r\n",
	      "* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\n");
	CHECK("* ENABLED CONDSTORE QRESYNC\r\n", "* ENABLED CONDSTORE QRESYNC\n");
	CHECK("* VANISHED (EARLIER) 41,43:116,118,120:211,214:540\r\n",
	      "* VANISHED (EARLIER) 41,43:116,118,120:211,214:540\n");
	CHECK("* 5 FETCH (UID 1:* MODSEQ (12121231000))\r\n",
	      "* 5 FETCH (UID 1:* MODSEQ (12121231000))\n");
	/* "~" not followed by "{" is an ordinary atom character. */
	CHECK("* X ~a b~ ~\r\n", "* X ~a b~ ~\n");
}

static void test_fetch_buffered(void **state)
{
	static const char hdr[] = "Message-ID: <1234@local.machine.example>\r\n\r\n";
	char in[1024], exp[1024];
	const struct ms_imap_response *r;
	struct ms_imap_parser *p;
	uint64_t num;

	snprintf(in, sizeof(in),
		 "* 12 FETCH (FLAGS (\\Seen \\Answered) INTERNALDATE "
		 "\"17-Jul-1996 02:44:25 -0700\" RFC822.SIZE 4286 UID 7 "
		 "BODY[HEADER.FIELDS (MESSAGE-ID)] {%zu}\r\n%s)\r\n",
		 strlen(hdr), hdr);
	snprintf(exp, sizeof(exp),
		 "LIT %zu * 12 FETCH (FLAGS (\\Seen \\Answered) INTERNALDATE "
		 "\"17-Jul-1996 02:44:25 -0700\" RFC822.SIZE 4286 UID 7 "
		 "BODY[HEADER.FIELDS (MESSAGE-ID)])\n"
		 "* 12 FETCH (FLAGS (\\Seen \\Answered) INTERNALDATE "
		 "\"17-Jul-1996 02:44:25 -0700\" RFC822.SIZE 4286 UID 7 "
		 "BODY[HEADER.FIELDS (MESSAGE-ID)] {%zu}\"Message-ID: "
		 "<1234@local.machine.example>\\x0d\\x0a\\x0d\\x0a\")\n",
		 strlen(hdr), strlen(hdr));
	check_mode(in, strlen(in), NULL, LIT_BUFFER, exp);
	/* Same result without a literal_start callback (minus the LIT). */
	check_mode(in, strlen(in), NULL, LIT_NULL_CB, strchr(exp, '\n') + 1);

	/* Walk the struct the way the mover will. */
	p = ms_imap_parser_new(NULL, NULL);
	assert_int_equal(ms_imap_parser_feed(p, in, strlen(in), &r), strlen(in));
	assert_non_null(r);
	assert_int_equal(r->argc, 3);
	assert_int_equal(ms_imap_arg_number(&r->args[0], &num), 0);
	assert_int_equal(num, 12);
	assert_true(ms_imap_arg_is(&r->args[1], "fetch"));
	assert_int_equal(r->args[2].type, MS_ARG_LIST);
	assert_int_equal(r->args[2].list_count, 10);
	assert_int_equal(r->args[2].list[1].list_count, 2);
	assert_true(ms_imap_arg_is(&r->args[2].list[1].list[0], "\\seen"));
	assert_int_equal(r->args[2].list[3].type, MS_ARG_STRING);
	assert_int_equal(ms_imap_arg_number(&r->args[2].list[5], &num), 0);
	assert_int_equal(num, 4286);
	assert_string_equal(ms_imap_arg_str(&r->args[2].list[8]),
			    "BODY[HEADER.FIELDS (MESSAGE-ID)]");
	assert_int_equal(r->args[2].list[9].type, MS_ARG_LITERAL);
	assert_int_equal(r->args[2].list[9].len, strlen(hdr));
	assert_memory_equal(r->args[2].list[9].str, hdr, strlen(hdr));
	ms_imap_parser_free(&p);
}

static void test_fetch_streamed(void **state)
{
	enum { N = 1234 };
	char body[N + 1], *in, *exp;
	size_t i;

	for (i = 0; i < N; i++)
		body[i] = "abcdefghijklmnopqrstuvwxyz0123456789 .,-"[i % 40];
	body[N] = '\0';
	in = malloc(N + 128);
	exp = malloc(N + 256);
	assert_non_null(in);
	assert_non_null(exp);
	snprintf(in, N + 128, "* 12 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\n", N, body);
	snprintf(exp, N + 256,
		 "LIT %d * 12 FETCH (UID 7 BODY[])\n"
		 "END %d '%s'\n"
		 "* 12 FETCH (UID 7 BODY[] {%d}STREAMED)\n", N, N, body, N);
	check_mode(in, strlen(in), NULL, LIT_STREAM, exp);
	free(in);
	free(exp);

	/* Several literals in one response, streamed and then more items:
	 * the second callback sees the first literal as an element. */
	CHECK_BIN("* 1 FETCH (BODY[1] {3}\r\nabc BODY[2]<0> {2}\r\nxy UID 5)\r\n",
		  NULL, LIT_STREAM,
		  "LIT 3 * 1 FETCH (BODY[1])\n"
		  "END 3 'abc'\n"
		  "LIT 2 * 1 FETCH (BODY[1] {3}STREAMED BODY[2]<0>)\n"
		  "END 2 'xy'\n"
		  "* 1 FETCH (BODY[1] {3}STREAMED BODY[2]<0> {2}STREAMED UID 5)\n");
	/* Deeper open lists are exposed too. */
	CHECK("* 2 FETCH (X (a (b {1}\r\nc) d))\r\n",
	      "LIT 1 * 2 FETCH (X (a (b)))\n"
	      "* 2 FETCH (X (a (b {1}\"c\") d))\n");
	/* literal8 (RFC 3516) and BINARY[1]. */
	CHECK_BIN("* 3 FETCH (BINARY[1] ~{4}\r\n\x00\x01\r\n)\r\n", NULL,
		  LIT_BUFFER,
		  "LIT 4 * 3 FETCH (BINARY[1])\n"
		  "* 3 FETCH (BINARY[1] {4}\"\\x00\\x01\\x0d\\x0a\")\n");
	/* A refused literal, and a consumer that fails mid-stream. */
	CHECK_BIN("* 4 FETCH (BODY[] {3}\r\nabc)\r\n", NULL, LIT_REFUSE,
		  "LIT 3 * 4 FETCH (BODY[])\nERROR literal refused\n");
	CHECK_BIN("* 4 FETCH (BODY[] {3}\r\nabc)\r\n", NULL, LIT_STREAM_FAIL,
		  "LIT 3 * 4 FETCH (BODY[])\nERROR literal data refused\n");
}

static void test_literal_edge_sizes(void **state)
{
	/* Size 0, buffered and streamed. */
	CHECK("* 1 FETCH (BODY[] {0}\r\n)\r\n",
	      "LIT 0 * 1 FETCH (BODY[])\n* 1 FETCH (BODY[] {0}\"\")\n");
	CHECK_BIN("* 1 FETCH (BODY[] {0}\r\n)\r\n", NULL, LIT_STREAM,
		  "LIT 0 * 1 FETCH (BODY[])\nEND 0 ''\n"
		  "* 1 FETCH (BODY[] {0}STREAMED)\n");
	/* {n+} from a server, and a bare LF after '}'. */
	CHECK("* 1 FETCH (BODY[] {3+}\r\nabc)\r\n",
	      "LIT 3 * 1 FETCH (BODY[])\n* 1 FETCH (BODY[] {3}\"abc\")\n");
	CHECK("* 1 FETCH (BODY[] {003}\nabc)\n",
	      "LIT 3 * 1 FETCH (BODY[])\n* 1 FETCH (BODY[] {3}\"abc\")\n");
	/* A literal as a mailbox name, at top level, with its CRLF inside. */
	CHECK("* LIST () \"/\" {5}\r\na\r\nbc\r\n",
	      "LIT 5 * LIST () \"/\"\n* LIST () \"/\" {5}\"a\\x0d\\x0abc\"\n");
	/* Literal bytes don't count against max_line; NULs are fine there. */
	{
		struct ms_imap_parser_limits lim = ms_imap_parser_default_limits;

		lim.max_line = 40;
		CHECK_BIN("* 1 FETCH (BODY[] {50}\r\n"
			  "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
			  "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
			  ")\r\n", &lim, LIT_STREAM,
			  "LIT 50 * 1 FETCH (BODY[])\n"
			  "END 50 '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
			  "\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
			  "\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
			  "\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
			  "\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\n"
			  "* 1 FETCH (BODY[] {50}STREAMED)\n");
	}
}

static void test_quoted_and_nil(void **state)
{
	CHECK("* LIST (\\Noselect) \"/\" \"a \\\"quoted\\\" \\\\ name\"\r\n",
	      "* LIST (\\Noselect) \"/\" \"a \\\"quoted\\\" \\\\ name\"\n");
	/* The unescaped value, directly. */
	{
		static const char in[] = "* LIST () \"/\" \"x\\\"y\\\\z\"\r\n";
		struct ms_imap_parser *p = ms_imap_parser_new(NULL, NULL);
		const struct ms_imap_response *r;

		assert_int_equal(ms_imap_parser_feed(p, in, sizeof(in) - 1, &r),
				 sizeof(in) - 1);
		assert_non_null(r);
		assert_string_equal(ms_imap_arg_str(&r->args[3]), "x\"y\\z");
		assert_int_equal(r->args[3].len, 5);
		ms_imap_parser_free(&p);
	}
	CHECK("* LIST () \"\" \"\"\r\n", "* LIST () \"\" \"\"\n");
	/* UTF-8 in quoted strings (servers with UTF8=ACCEPT). */
	CHECK("* LIST () \"/\" \"Entw\xc3\xbcrfe\"\r\n",
	      "* LIST () \"/\" \"Entw\\xc3\\xbcrfe\"\n");
	/* Brackets, parens and braces inside quotes are plain bytes. */
	CHECK("* STATUS \"a ) ( ] [ {3}\" (MESSAGES 0)\r\n",
	      "* STATUS \"a ) ( ] [ {3}\" (MESSAGES 0)\n");
	/* NIL, case-insensitive, only as a whole atom; "NIL" quoted is a string. */
	CHECK("* X NIL nil Nil NILS \"NIL\" (NIL)\r\n",
	      "* X NIL NIL NIL NILS \"NIL\" (NIL)\n");
}

static void test_lists(void **state)
{
	CHECK("* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent Items\"\r\n",
	      "* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent Items\"\n");
	CHECK("* LIST () NIL INBOX\r\n", "* LIST () NIL INBOX\n");
	CHECK("* LIST (\\Noselect) NIL \"\"\r\n", "* LIST (\\Noselect) NIL \"\"\n");
	CHECK("* LSUB () \".\" #news.comp.mail.misc\r\n",
	      "* LSUB () \".\" #news.comp.mail.misc\n");
	/* BODYSTRUCTURE: nesting, NILs, adjacent lists ")(". */
	CHECK("* 1 FETCH (BODYSTRUCTURE ((\"TEXT\" \"PLAIN\" (\"CHARSET\" "
	      "\"US-ASCII\") NIL NIL \"7BIT\" 1152 23)(\"TEXT\" \"HTML\" NIL NIL "
	      "NIL \"QUOTED-PRINTABLE\" 4539 44) \"ALTERNATIVE\"))\r\n",
	      "* 1 FETCH (BODYSTRUCTURE ((\"TEXT\" \"PLAIN\" (\"CHARSET\" "
	      "\"US-ASCII\") NIL NIL \"7BIT\" 1152 23) (\"TEXT\" \"HTML\" NIL NIL "
	      "NIL \"QUOTED-PRINTABLE\" 4539 44) \"ALTERNATIVE\"))\n");
	CHECK("* 2 FETCH (ENVELOPE (\"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\" "
	      "\"IMAP4rev1 WG mtg summary\" ((\"Terry Gray\" NIL \"gray\" "
	      "\"cac.washington.edu\")) NIL NIL NIL \"<B27397-0100000@cac>\"))\r\n",
	      "* 2 FETCH (ENVELOPE (\"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\" "
	      "\"IMAP4rev1 WG mtg summary\" ((\"Terry Gray\" NIL \"gray\" "
	      "\"cac.washington.edu\")) NIL NIL NIL \"<B27397-0100000@cac>\"))\n");
	CHECK("* X (((())))\r\n", "* X (((())))\n");
	/* Bracket sections in atoms hold spaces, parens and nested []. */
	CHECK("* 1 FETCH (BODY[HEADER.FIELDS.NOT (A B)]<0.100> NIL "
	      "BODY[1.2.MIME] NIL X[a[b]c]d NIL)\r\n",
	      "* 1 FETCH (BODY[HEADER.FIELDS.NOT (A B)]<0.100> NIL "
	      "BODY[1.2.MIME] NIL X[a[b]c]d NIL)\n");
}

static void test_two_responses_one_buffer(void **state)
{
	static const char in[] = "* 2 EXISTS\r\n* 1 FETCH (UID 9)\r\na1 OK done\r\n";
	struct ms_imap_parser *p = ms_imap_parser_new(NULL, NULL);
	const struct ms_imap_response *r;
	size_t pos = 0;
	ssize_t n;

	CHECK(in, "* 2 EXISTS\n* 1 FETCH (UID 9)\na1 OK 'done'\n");

	n = ms_imap_parser_feed(p, in, sizeof(in) - 1, &r);
	assert_int_equal(n, 12);
	assert_non_null(r);
	assert_true(ms_imap_arg_is(&r->args[1], "EXISTS"));
	pos += (size_t)n;
	n = ms_imap_parser_feed(p, in + pos, sizeof(in) - 1 - pos, &r);
	assert_int_equal(n, 19);
	assert_non_null(r);
	assert_true(ms_imap_arg_is(&r->args[1], "FETCH"));
	pos += (size_t)n;
	n = ms_imap_parser_feed(p, in + pos, sizeof(in) - 1 - pos, &r);
	assert_int_equal(pos + (size_t)n, sizeof(in) - 1);
	assert_non_null(r);
	assert_string_equal(r->tag, "a1");
	/* Nothing left: nothing consumed, no response. */
	assert_int_equal(ms_imap_parser_feed(p, "", 0, &r), 0);
	assert_null(r);
	/* A partial response is kept until the rest arrives. */
	CHECK("* 1 FETCH (UID", "PENDING\n");
	CHECK("* OK done\r\n* 2 EXI", "* OK 'done'\nPENDING\n");
	ms_imap_parser_free(&p);
}

/* Many args and long lists: vectors and arena chunks get reallocated while
 * the response is built; every pointer must survive that. */
static void test_big_response(void **state)
{
	struct out in = { 0 }, exp = { 0 };
	int i;

	out_str(&in, "* 1 FETCH (X (");
	out_str(&exp, "* 1 FETCH (X (");
	for (i = 0; i < 3000; i++) {
		out_printf(&in, "%s(a%d \"s%d\" {2}\r\n%02d)", i ? " " : "", i, i, i % 100);
		out_printf(&exp, "%s(a%d \"s%d\" {2}\"%02d\")", i ? " " : "", i, i, i % 100);
	}
	out_str(&in, "))\r\n");
	out_str(&exp, "))\n");
	check_mode(in.buf, in.len, NULL, LIT_NULL_CB, exp.buf);
	free(in.buf);
	free(exp.buf);
}

/* --- hostile input ------------------------------------------------------ */

static void test_line_too_long(void **state)
{
	size_t n = 100 * 1024;
	char *in = malloc(n + 1);
	struct ms_imap_parser_limits lim = ms_imap_parser_default_limits;

	assert_non_null(in);
	memcpy(in, "* OK ", 5);
	memset(in + 5, 'x', n - 7);
	memcpy(in + n - 2, "\r\n", 2);
	in[n] = '\0';
	CHECK(in, "ERROR line too long\n");
	/* Long atoms, quoted strings and bracket sections alike. */
	memcpy(in, "* X \"", 5);
	CHECK(in, "ERROR line too long\n");
	memcpy(in, "* X[ ", 5);
	CHECK(in, "ERROR line too long\n");
	memcpy(in, "* X x", 5);
	CHECK(in, "ERROR line too long\n");
	memset(in, 'a', n - 2);
	CHECK(in, "ERROR line too long\n");
	free(in);

	/* The limit is exact, CRLF included. */
	lim.max_line = 12;
	CHECK_LIM("* 3 EXISTS\r\n", &lim, "* 3 EXISTS\n");
	CHECK_LIM("* 33 EXISTS\r\n", &lim, "ERROR line too long\n");
	/* And counts the whole response, across literals. */
	CHECK_LIM("* 1 X {1}\r\na 12345\r\n", &lim,
		  "LIT 1 * 1 X\nERROR line too long\n");
}

static void test_bad_literals(void **state)
{
	struct ms_imap_parser_limits lim = ms_imap_parser_default_limits;

	CHECK("* 1 FETCH (BODY[] {99999999999999999999}\r\n",
	      "ERROR literal too large\n");
	CHECK("* 1 FETCH (BODY[] {1073741825}\r\n", "ERROR literal too large\n");
	/* Even with no limit at all, the size must fit 64 bits. */
	lim.max_literal = UINT64_MAX;
	CHECK_LIM("* 1 FETCH (BODY[] {18446744073709551615}\r\n", &lim,
		  "LIT 18446744073709551615 * 1 FETCH (BODY[])\n"
		  "ERROR literal too large to buffer\n");
	CHECK_LIM("* 1 FETCH (BODY[] {18446744073709551616}\r\n", &lim,
		  "ERROR literal too large\n");
	CHECK_LIM("* 1 FETCH (BODY[] {99999999999999999999}\r\n", &lim,
		  "ERROR literal too large\n");

	CHECK("* 1 FETCH (BODY[] {12\r\nabcdefghijkl)\r\n",
	      "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {}\r\n)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {+}\r\n)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {-1}\r\n)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {1x}\r\n)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {3}abc)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {3} \r\nabc)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[] {3}\rabc)\r\n", "ERROR bare CR in response\n");
	CHECK("* 1 FETCH (BODY[] {3++}\r\nabc)\r\n", "ERROR bad literal syntax\n");
	CHECK("* 1 FETCH (BODY[]{3}\r\nabc)\r\n",
	      "ERROR unexpected character 0x7b in atom\n");

	/* Buffering limits, per literal and per response. */
	lim = ms_imap_parser_default_limits;
	lim.max_buffered_literal = 4;
	CHECK_LIM("* 1 X {4}\r\nabcd {5}\r\nabcde\r\n", &lim,
		  "LIT 4 * 1 X\nLIT 5 * 1 X {4}\"abcd\"\n"
		  "ERROR literal too large to buffer\n");
	CHECK_BIN("* 1 X {5}\r\nabcde\r\n", &lim, LIT_NULL_CB,
		  "ERROR literal too large to buffer\n");
	CHECK_BIN("* 1 X {5}\r\nabcde\r\n", &lim, LIT_STREAM,
		  "LIT 5 * 1 X\nEND 5 'abcde'\n* 1 X {5}STREAMED\n");
	lim.max_buffered_literal = 2;
	CHECK_LIM("* 1 X {2}\r\nab {2}\r\nab {2}\r\nab {2}\r\nab {2}\r\nab {2}\r\nab "
		  "{2}\r\nab {2}\r\nab {1}\r\na\r\n", &lim,
		  "LIT 2 * 1 X\n"
		  "LIT 2 * 1 X {2}\"ab\"\n"
		  "LIT 2 * 1 X {2}\"ab\" {2}\"ab\"\n"
		  "LIT 2 * 1 X {2}\"ab\" {2}\"ab\" {2}\"ab\"\n"
		  "LIT 2 * 1 X {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\"\n"
		  "LIT 2 * 1 X {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\"\n"
		  "LIT 2 * 1 X {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\"\n"
		  "LIT 2 * 1 X {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\"\n"
		  "LIT 1 * 1 X {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\" {2}\"ab\"\n"
		  "ERROR literal too large to buffer\n");
	/* A literal where no token may start. */
	CHECK("* {3}\r\nabc\r\n", "ERROR unexpected character 0x7b in response\n");
	CHECK("{3}\r\nabc\r\n", "ERROR unexpected character 0x7b in tag\n");
}

static void test_depth_and_args(void **state)
{
	struct ms_imap_parser_limits lim = ms_imap_parser_default_limits;
	struct out in = { 0 };
	int i;

	out_str(&in, "* X ");
	for (i = 0; i < 100; i++)
		out_str(&in, "(");
	for (i = 0; i < 100; i++)
		out_str(&in, ")");
	out_str(&in, "\r\n");
	CHECK(in.buf, "ERROR lists nested too deeply\n");
	free(in.buf);

	/* Exactly max_depth is fine. */
	lim.max_depth = 3;
	CHECK_LIM("* X (((a)))\r\n", &lim, "* X (((a)))\n");
	CHECK_LIM("* X ((((a))))\r\n", &lim, "ERROR lists nested too deeply\n");
	lim.max_depth = 0;
	CHECK_LIM("* X ()\r\n", &lim, "ERROR lists nested too deeply\n");

	/* max_args counts tokens at all levels, lists included. */
	lim = ms_imap_parser_default_limits;
	lim.max_args = 5;
	CHECK_LIM("* SEARCH 1 2 3 4\r\n", &lim, "* SEARCH 1 2 3 4\n");
	CHECK_LIM("* SEARCH 1 2 3 4 5\r\n", &lim, "ERROR too many arguments\n");
	CHECK_LIM("* 1 FETCH (UID 2)\r\n", &lim, "* 1 FETCH (UID 2)\n");
	CHECK_LIM("* 1 FETCH (UID (2))\r\n", &lim, "ERROR too many arguments\n");
	CHECK_LIM("* 1 FETCH (A {1}\r\nb)\r\n", &lim,
		  "LIT 1 * 1 FETCH (A)\n* 1 FETCH (A {1}\"b\")\n");
	CHECK_LIM("* 1 FETCH (A B {1}\r\nb)\r\n", &lim, "ERROR too many arguments\n");
	CHECK_LIM("* OK [X a b c d e f] t\r\n", &lim, "ERROR too many arguments\n");
	lim.max_args = 100000;
	/* 100001 args on one line: needs a line limit to match. */
	lim.max_line = 1024 * 1024;
	in = (struct out){ 0 };
	out_str(&in, "* SEARCH");
	for (i = 0; i < 100000; i++)
		out_str(&in, " 1");
	out_str(&in, "\r\n");
	check_mode(in.buf, in.len, &lim, LIT_BUFFER, "ERROR too many arguments\n");
	free(in.buf);
}

static void test_bad_bytes(void **state)
{
	static const char tls[] = {
		0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
		0x00, 0x01, 0x02, 0x03, '\r', '\n',
	};
	static const char srv_hello[] = {
		0x16, 0x03, 0x03, 0x00, 0x31, 0x02, 0x00, 0x00, 0x2d, 0x03, 0x03,
	};

	/* NUL anywhere in the line. */
	CHECK_BIN("* OK a\0b\r\n", NULL, LIT_BUFFER,
		  "ERROR NUL byte in response\n");
	CHECK_BIN("* X \"a\0b\"\r\n", NULL, LIT_BUFFER,
		  "ERROR NUL byte in response\n");
	CHECK_BIN("\0", NULL, LIT_BUFFER, "ERROR NUL byte in response\n");
	/* Quoted strings may not span lines. */
	CHECK("* LIST () \"/\" \"abc\r\ndef\"\r\n",
	      "ERROR unterminated quoted string\n");
	CHECK("* LIST () \"/\" \"abc\\\r\ndef\"\r\n",
	      "ERROR unterminated quoted string\n");
	CHECK("* LIST () \"/\" \"abc\rdef\"\r\n", "ERROR bare CR in response\n");
	/* Bare CR, anywhere. */
	CHECK("* OK foo\rbar\r\n", "ERROR bare CR in response\n");
	CHECK("* 1 FETCH (UID 1)\r\r\n", "ERROR bare CR in response\n");
	CHECK("a1\r OK\r\n", "ERROR bare CR in response\n");
	/* Unbalanced parens. */
	CHECK("* 1 FETCH (UID 1))\r\n", "ERROR unbalanced ')'\n");
	CHECK("* X )\r\n", "ERROR unbalanced ')'\n");
	CHECK("* 1 FETCH (UID 1\r\n", "ERROR missing ')' at end of line\n");
	CHECK("* 1 FETCH (FLAGS (\\Seen)\r\n", "ERROR missing ')' at end of line\n");
	CHECK("* 1 FETCH (UID 1]\r\n", "ERROR unexpected character 0x5d in atom\n");
	CHECK("* 1 FETCH (BODY[1 {3}\r\nabc)\r\n",
	      "ERROR unterminated '[' in atom\n");
	CHECK("* X a\tb\r\n", "ERROR unexpected character 0x09 in atom\n");
	CHECK("* X \x7f\r\n", "ERROR unexpected character 0x7f in arguments\n");
	/* TLS records where IMAP was expected. */
	check_mode(tls, sizeof(tls), NULL, LIT_BUFFER,
		   "ERROR unexpected character 0x16 in tag\n");
	check_mode(srv_hello, sizeof(srv_hello), NULL, LIT_BUFFER,
		   "ERROR unexpected character 0x16 in tag\n");
	/* Empty lines. */
	CHECK("\r\n", "ERROR empty line\n");
	CHECK("\n", "ERROR empty line\n");
	CHECK("* 1 EXISTS\r\n\r\n", "* 1 EXISTS\nERROR empty line\n");
}

/* --- helpers ----------------------------------------------------------- */

static void test_arg_helpers(void **state)
{
	struct ms_imap_arg atom = { .type = MS_ARG_ATOM, .str = "Seen", .len = 4 };
	struct ms_imap_arg str = { .type = MS_ARG_STRING, .str = "12", .len = 2 };
	struct ms_imap_arg lit = { .type = MS_ARG_LITERAL, .str = "a\0b", .len = 3 };
	struct ms_imap_arg nil = { .type = MS_ARG_NIL };
	struct ms_imap_arg list = { .type = MS_ARG_LIST };
	struct ms_imap_arg big = { .type = MS_ARG_ATOM };
	uint64_t n = 42;

	assert_true(ms_imap_arg_is(&atom, "seen"));
	assert_true(ms_imap_arg_is(&atom, "SEEN"));
	assert_false(ms_imap_arg_is(&atom, "See"));
	assert_false(ms_imap_arg_is(&atom, "Seenx"));
	assert_true(ms_imap_arg_is(&str, "12"));
	assert_false(ms_imap_arg_is(&nil, "NIL"));
	assert_false(ms_imap_arg_is(&lit, "a"));
	assert_false(ms_imap_arg_is(NULL, "x"));

	assert_int_equal(ms_imap_arg_number(&str, &n), -1);
	assert_int_equal(ms_imap_arg_number(&atom, &n), -1);
	assert_int_equal(ms_imap_arg_number(&nil, &n), -1);
	assert_int_equal(n, 42);
	big.str = "9223372036854775807";
	big.len = strlen(big.str);
	assert_int_equal(ms_imap_arg_number(&big, &n), 0);
	assert_int_equal(n, 9223372036854775807ULL);
	big.str = "9223372036854775808";
	assert_int_equal(ms_imap_arg_number(&big, &n), -1);
	big.str = "99999999999999999999";
	big.len = strlen(big.str);
	assert_int_equal(ms_imap_arg_number(&big, &n), -1);
	big.str = "007";
	big.len = 3;
	assert_int_equal(ms_imap_arg_number(&big, &n), 0);
	assert_int_equal(n, 7);
	big.str = "";
	big.len = 0;
	assert_int_equal(ms_imap_arg_number(&big, &n), -1);
	big.str = "1:3";
	big.len = 3;
	assert_int_equal(ms_imap_arg_number(&big, &n), -1);

	assert_string_equal(ms_imap_arg_str(&atom), "Seen");
	assert_string_equal(ms_imap_arg_str(&str), "12");
	assert_ptr_equal(ms_imap_arg_str(&lit), lit.str);
	assert_null(ms_imap_arg_str(&nil));
	assert_null(ms_imap_arg_str(&list));

	assert_int_equal(ms_imap_parser_default_limits.max_line, 64 * 1024);
	assert_int_equal(ms_imap_parser_default_limits.max_literal, 1ULL << 30);
	assert_int_equal(ms_imap_parser_default_limits.max_buffered_literal, 1 << 20);
	assert_int_equal(ms_imap_parser_default_limits.max_depth, 16);
	assert_int_equal(ms_imap_parser_default_limits.max_args, 100000);
}

/* The response must stay intact until the next feed, and the parser must
 * recycle its memory across many responses. */
static void test_many_responses(void **state)
{
	static const char in[] = "* 7 FETCH (UID 1007 FLAGS (\\Seen) RFC822.SIZE 5 "
				 "BODY[] {5}\r\nhello)\r\n";
	struct ms_imap_parser *p = ms_imap_parser_new(NULL, NULL);
	const struct ms_imap_response *r;
	int i;

	for (i = 0; i < 20000; i++) {
		ssize_t n = ms_imap_parser_feed(p, in, sizeof(in) - 1, &r);

		assert_int_equal(n, sizeof(in) - 1);
		assert_non_null(r);
		assert_int_equal(r->argc, 3);
		assert_string_equal(r->args[2].list[7].str, "hello");
	}
	ms_imap_parser_free(&p);
	ms_imap_parser_free(&p);	/* NULL-safe */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_greeting_capability),
		cmocka_unit_test(test_tagged_status),
		cmocka_unit_test(test_status_errors),
		cmocka_unit_test(test_continuation),
		cmocka_unit_test(test_untagged_data),
		cmocka_unit_test(test_fetch_buffered),
		cmocka_unit_test(test_fetch_streamed),
		cmocka_unit_test(test_literal_edge_sizes),
		cmocka_unit_test(test_quoted_and_nil),
		cmocka_unit_test(test_lists),
		cmocka_unit_test(test_two_responses_one_buffer),
		cmocka_unit_test(test_big_response),
		cmocka_unit_test(test_line_too_long),
		cmocka_unit_test(test_bad_literals),
		cmocka_unit_test(test_depth_and_args),
		cmocka_unit_test(test_bad_bytes),
		cmocka_unit_test(test_arg_helpers),
		cmocka_unit_test(test_many_responses),
	};

	return cmocka_run_group_tests_name("imap_parser", tests, NULL, NULL);
}
