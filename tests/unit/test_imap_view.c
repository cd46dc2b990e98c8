/* Unit tests for daemon/imap_view.c: a folder's UID map, the translation
 * of UID sets both ways, and the rewriter of a relayed IMAP session (fed
 * whole and one byte at a time). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "imap_view.h"

/* INBOX: source UIDs 3 5 6 9 15 (UIDNEXT 20) copied to 1..5. */
static void inbox_map(struct ms_view_map *m)
{
	static const uint32_t src[] = { 9, 3, 15, 5, 6 };
	struct ms_view_pair *p = calloc(5, sizeof(*p));

	assert_non_null(p);
	for (int i = 0; i < 5; i++) {
		p[i].src = src[i];
		p[i].dst = src[i] == 3 ? 1 : src[i] == 5 ? 2 :
			   src[i] == 6 ? 3 : src[i] == 9 ? 4 : 5;
	}
	assert_int_equal(ms_view_map_init(m, p, 5, 1111, 2222, 20), 0);
	m->full = 1;
}

static void expect_set(const struct ms_view_map *m, int to_dst,
		       const char *set, const char *want)
{
	struct ms_vbuf b = { 0 };
	int r = to_dst ? ms_view_set_to_dst(m, set, strlen(set), &b) :
			 ms_view_set_to_view(m, set, strlen(set), &b);

	if (want == NULL) {
		assert_int_equal(r, 0);
		assert_int_equal(b.len, 0);
	} else {
		assert_int_equal(r, 1);
		assert_string_equal(b.p, want);
	}
	ms_vbuf_free(&b);
}

static void test_map(void **state)
{
	struct ms_view_map m;

	(void)state;
	inbox_map(&m);
	assert_int_equal(m.base, 19);
	assert_int_equal(m.max_dst, 5);
	assert_true(m.monotone);
	assert_int_equal(ms_view_uid(&m, 2), 5);
	assert_int_equal(ms_view_uid(&m, 5), 15);
	assert_int_equal(ms_view_uid(&m, 6), 25);	/* new mail */
	assert_int_equal(ms_view_uidnext(&m, 6), 25);
	assert_int_equal(ms_view_uidnext(&m, 9), 28);
	ms_view_map_clear(&m);
}

static void test_set_to_dst(void **state)
{
	struct ms_view_map m;

	(void)state;
	inbox_map(&m);
	expect_set(&m, 1, "5:9", "2:4");
	expect_set(&m, 1, "9:5", "2:4");
	expect_set(&m, 1, "1:4", "1");
	expect_set(&m, 1, "4", "4294967295");	/* expunged before the move */
	expect_set(&m, 1, "16:*", "6:*");
	expect_set(&m, 1, "20:*", "6:*");	/* new since the source's
						   UIDNEXT: not the old ones */
	expect_set(&m, 1, "1:*", "1:*");
	expect_set(&m, 1, "6:*", "3:*");
	expect_set(&m, 1, "*", "*");
	expect_set(&m, 1, "*:7", "4:*");
	expect_set(&m, 1, "3,5,25", "1:2,6");
	expect_set(&m, 1, "21:30", "6:11");
	expect_set(&m, 1, "9:22", "4:5");
	expect_set(&m, 1, "3,6,9", "1,3:4");
	expect_set(&m, 1, "$", NULL);
	expect_set(&m, 1, "1,", NULL);
	expect_set(&m, 1, "0", NULL);
	expect_set(&m, 1, "4294967296", NULL);
	ms_view_map_clear(&m);
}

static void test_set_to_view(void **state)
{
	struct ms_view_map m;

	(void)state;
	inbox_map(&m);
	expect_set(&m, 0, "1:5", "3,5:6,9,15");
	expect_set(&m, 0, "1:7", "3,5:6,9,15,25:26");
	expect_set(&m, 0, "7,2", "26,5");	/* order kept (COPYUID) */
	expect_set(&m, 0, "4294967295", "4294967295");	/* saturates */
	expect_set(&m, 0, "1:*", NULL);
	ms_view_map_clear(&m);
}

/* Source UIDs not in the destination's order: still exact. */
static void test_not_monotone(void **state)
{
	struct ms_view_pair *p = calloc(3, sizeof(*p));
	struct ms_view_map m;

	(void)state;
	assert_non_null(p);
	p[0] = (struct ms_view_pair){ 10, 3 };
	p[1] = (struct ms_view_pair){ 20, 1 };
	p[2] = (struct ms_view_pair){ 30, 2 };
	assert_int_equal(ms_view_map_init(&m, p, 3, 1, 2, 0), 0);
	assert_false(m.monotone);
	assert_int_equal(ms_view_uid(&m, 1), 20);
	expect_set(&m, 1, "10:20", "3,1");
	expect_set(&m, 1, "20:*", "1:2,4:*");
	expect_set(&m, 0, "1:3", "20,30,10");
	ms_view_map_clear(&m);
}

/* ---- the rewriter ---- */

struct fix {
	struct ms_view_map inbox, sent;
	struct ms_vbuf out;
	struct ms_view *v;		/* for a lookup that fails */
};

static struct ms_view_map *lookup(void *ctx, const char *name, int full)
{
	struct fix *f = ctx;

	(void)full;
	if (strcmp(name, "INBOX") == 0)
		return &f->inbox;
	if (strcmp(name, "Sent") == 0)
		return &f->sent;
	if (strcmp(name, "Broken") == 0 && f->v != NULL)
		ms_view_fail(f->v, "store failed");	/* as the gateway's */
	return NULL;
}

static const char *names(void *ctx, const char *name, int to_dst)
{
	(void)ctx;
	/* Sent Items -> Sent; a name with the quoted string's specials */
	static const char *const pairs[][2] = {
		{ "Sent Items", "Sent" }, { "Odd \"Q\" \\ B", "Odd\\New" },
	};

	for (size_t i = 0; i < sizeof(pairs) / sizeof(*pairs); i++)
		if (strcmp(name, pairs[i][!to_dst]) == 0)
			return pairs[i][to_dst];
	return NULL;
}

/* Where patterns are rewritten: every wildcard pattern also asks for the
 * renamed "Sent" and below it. */
static int with_patterns;

/* Where the source's namespace is shown: a Courier-style "INBOX." with
 * '.' on the client's side, none and '/' on the server's. */
static int with_ns;
static const struct ms_view_ns courier = { "INBOX.", "", '.', '/' };

static const char *ns_names(void *ctx, const char *name, int to_dst)
{
	static struct ms_vbuf b;
	int r;

	(void)ctx;
	if (name == NULL) {		/* the end of the test */
		ms_vbuf_free(&b);
		return NULL;
	}
	r = ms_view_ns_name(&courier, name, to_dst, &b);
	assert_int_not_equal(r, -1);
	return r > 0 ? b.p : NULL;
}

static int ns_patterns(void *ctx, const char *pattern, struct ms_vbuf *out)
{
	(void)ctx;
	if (strpbrk(pattern, "*%") == NULL || strcmp(pattern, "*") == 0 ||
	    strncmp(pattern, "INBOX.", 6) == 0)
		return 0;
	return ms_vbuf_add(out, "*", 2) < 0 ? -1 : 1;
}

static int patterns(void *ctx, const char *pattern, struct ms_vbuf *out)
{
	(void)ctx;
	if (strpbrk(pattern, "*%") == NULL)
		return 0;
	return ms_vbuf_add(out, "Sent\0Sent/*", 12) < 0 ? -1 : 2;
}

static int out(void *ctx, const char *data, size_t len)
{
	return ms_vbuf_add(ctx, data, len);
}

static void fix_init(struct fix *f)
{
	memset(f, 0, sizeof(*f));
	inbox_map(&f->inbox);
	/* Sent: nothing copied, the source's UIDNEXT was 101 */
	assert_int_equal(ms_view_map_init(&f->sent, NULL, 0, 4444, 3333, 101),
			 0);
}

static void fix_clear(struct fix *f)
{
	ms_view_map_clear(&f->inbox);
	ms_view_map_clear(&f->sent);
	ms_vbuf_free(&f->out);
}

/* A session: lines "C text" (client) and "S text" (server), each ending
 * in "\n" (written as CRLF); the view's output, both ways, against want,
 * fed whole and then one byte at a time. */
static void run(const char *const *events, size_t n, const char *want)
{
	for (int bytewise = 0; bytewise < 2; bytewise++) {
		struct fix f;
		struct ms_view v;

		fix_init(&f);
		ms_view_init(&v, lookup, with_ns ? ns_names : names, &f);
		ms_view_set_reply(&v, out, &f.out);
		if (with_ns) {
			ms_view_set_namespace(&v, &courier);
			ms_view_set_patterns(&v, ns_patterns);
		}
		if (with_patterns) {
			ms_view_set_patterns(&v, patterns);
			v.withhold_utf8 = 1;
		}
		v.withhold = 1;
		for (size_t i = 0; i < n; i++) {
			const char *t = events[i] + 2;
			char buf[4096];
			size_t len = 0;

			for (; *t != '\0'; t++) {
				if (*t == '\n')
					buf[len++] = '\r';
				buf[len++] = *t;
			}
			for (size_t j = 0; j < len;) {
				size_t k = bytewise ? 1 : len;

				assert_int_equal(events[i][0] == 'C' ?
					ms_view_client(&v, buf + j, k, out,
						       &f.out) :
					ms_view_server(&v, buf + j, k, out,
						       &f.out), 0);
				j += k;
			}
		}
		{
			struct ms_vbuf w = { 0 };

			for (const char *t = want; *t != '\0'; t++) {
				if (*t == '\n')
					assert_int_equal(ms_vbuf_add(&w, "\r",
								     1), 0);
				assert_int_equal(ms_vbuf_add(&w, t, 1), 0);
			}
			assert_string_equal(f.out.p, w.p);
			ms_vbuf_free(&w);
		}
		assert_null(ms_view_gave_up(&v));
		ms_view_clear(&v);
		fix_clear(&f);
	}
}

#define RUN(want, ...) do { \
		static const char *const ev[] = { __VA_ARGS__ }; \
		run(ev, sizeof(ev) / sizeof(*ev), want); \
	} while (0)

static void test_select_fetch(void **state)
{
	(void)state;
	RUN("a SELECT INBOX\n"
	    "* 5 EXISTS\n"
	    "* OK [UIDVALIDITY 1111] UIDs valid\n"
	    "* OK [UIDNEXT 25] Predicted next UID\n"
	    "a OK [READ-WRITE] Select completed.\n"
	    "b UID FETCH 2:4 (UID FLAGS)\n"
	    "* 2 FETCH (UID 5 FLAGS (\\Seen))\n"
	    "* 4 FETCH (FLAGS () UID 9)\n"
	    "b OK Fetch completed.\n"
	    "c FETCH 1 (BODY[] UID)\n"
	    "* 1 FETCH (BODY[HEADER.FIELDS (UID)] {7}\nUID 1 1 UID 3)\n"
	    "c OK done\n"
	    "d UID STORE 6:* +FLAGS (\\Flagged)\n"
	    "* 6 FETCH (FLAGS (\\Flagged) UID 25)\n"
	    "d OK done\n",
	    "C a SELECT INBOX\n",
	    "S * 5 EXISTS\n* OK [UIDVALIDITY 2222] UIDs valid\n",
	    "S * OK [UIDNEXT 6] Predicted next UID\n",
	    "S a OK [READ-WRITE] Select completed.\n",
	    "C b UID FETCH 5:9 (UID FLAGS)\n",
	    "S * 2 FETCH (UID 2 FLAGS (\\Seen))\n",
	    "S * 4 FETCH (FLAGS () UID 4)\nb OK Fetch completed.\n",
	    "C c FETCH 1 (BODY[] UID)\n",
	    "S * 1 FETCH (BODY[HEADER.FIELDS (UID)] {7}\nUID 1 1 UID 1)\n",
	    "S c OK done\n",
	    "C d UID STORE 20:* +FLAGS (\\Flagged)\n",
	    "S * 6 FETCH (FLAGS (\\Flagged) UID 6)\nd OK done\n");
}

static void test_search(void **state)
{
	(void)state;
	RUN("a EXAMINE INBOX\n"
	    "a OK done\n"
	    "b UID SEARCH SUBJECT UID HEADER X UID UID 2:4 NOT UID 1\n"
	    "* SEARCH 5 9\n"
	    "b OK done\n"
	    "c SEARCH UID 2\n"
	    "* SEARCH 2\n"
	    "c OK done\n"
	    "d UID SEARCH RETURN (MIN MAX ALL) TEXT {3}\nUID UID 1:*\n"
	    "* ESEARCH (TAG \"d\") UID MIN 3 MAX 25 ALL 3,5:6,9,15,25\n"
	    "d OK done\n"
	    "e UID SORT (DATE) UTF-8 ALL\n"
	    "* SORT 15 3\n"
	    "e OK done\n",
	    "C a EXAMINE INBOX\n", "S a OK done\n",
	    "C b UID SEARCH SUBJECT UID HEADER X UID UID 5:9 NOT UID 1:4\n",
	    "S * SEARCH 2 4\nb OK done\n",
	    "C c SEARCH UID 5\n", "S * SEARCH 2\nc OK done\n",
	    "C d UID SEARCH RETURN (MIN MAX ALL) TEXT {3}\nUID UID 1:*\n",
	    "S * ESEARCH (TAG \"d\") UID MIN 1 MAX 6 ALL 1:6\nd OK done\n",
	    "C e UID SORT (DATE) UTF-8 ALL\n", "S * SORT 5 1\ne OK done\n");
}

static void test_append_copy_status(void **state)
{
	(void)state;
	RUN("a SELECT INBOX\n"
	    "a OK done\n"
	    "b APPEND Sent (\\Seen) {3}\nabc\n"
	    "b OK [APPENDUID 4444 102] done\n"
	    "c UID COPY 2:3 Sent\n"
	    "c OK [COPYUID 4444 5:6 103:104] done\n"
	    "d UID MOVE 4 INBOX\n"
	    "* OK [COPYUID 1111 9 26] moved\n"
	    "* 4 EXPUNGE\n"
	    "d OK done\n"
	    "* STATUS INBOX (MESSAGES 5 UIDNEXT 25 UIDVALIDITY 1111)\n"
	    "* STATUS Other (UIDNEXT 6 UIDVALIDITY 2222)\n"
	    "* STATUS \"Sent Items\" (UIDVALIDITY 4444 UIDNEXT 105)\n"
	    "* STATUS INBOX (UIDNEXT 6 UIDVALIDITY 7)\n",
	    "C a SELECT INBOX\n", "S a OK done\n",
	    "C b APPEND Sent (\\Seen) {3}\n", "C abc\n",
	    "S b OK [APPENDUID 3333 2] done\n",
	    "C c UID COPY 5:6 Sent\n",
	    "S c OK [COPYUID 3333 2:3 3:4] done\n",
	    "C d UID MOVE 9 INBOX\n",
	    "S * OK [COPYUID 2222 4 7] moved\n* 4 EXPUNGE\nd OK done\n",
	    "S * STATUS INBOX (MESSAGES 5 UIDNEXT 6 UIDVALIDITY 2222)\n",
	    "S * STATUS Other (UIDNEXT 6 UIDVALIDITY 2222)\n",
	    "S * STATUS Sent (UIDVALIDITY 3333 UIDNEXT 5)\n",
	    /* another UIDVALIDITY: not the folder the mover filled */
	    "S * STATUS INBOX (UIDNEXT 6 UIDVALIDITY 7)\n");
}

static void test_names_caps(void **state)
{
	(void)state;
	RUN("* CAPABILITY IMAP4rev1 IDLE UIDPLUS\n"
	    "a OK [CAPABILITY IMAP4rev1 ENABLE] Logged in\n"
	    "b NOOP\n"
	    "b OK done\n"
	    "c ENABLE UTF8=ACCEPT\n"
	    "d LIST \"\" *\n"
	    "* LIST (\\HasNoChildren) \"/\" INBOX\n"
	    "* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent Items\"\n"
	    "d OK done\n"
	    "e SELECT \"Sent\"\n"
	    "e OK done\n"
	    "f CREATE \"Sent Items/x\"\n"
	    "g LIST \"\" \"Sent\"\n",
	    "S * CAPABILITY IMAP4rev1 CONDSTORE IDLE QRESYNC UIDPLUS\n",
	    "S a OK [CAPABILITY IMAP4rev1 ENABLE CONDSTORE] Logged in\n",
	    "C b ENABLE CONDSTORE QRESYNC\n", "S b OK done\n",
	    "C c ENABLE UTF8=ACCEPT CONDSTORE\n",
	    "C d LIST \"\" *\n",
	    "S * LIST (\\HasNoChildren) \"/\" INBOX\n",
	    "S * LIST (\\HasNoChildren \\Sent) \"/\" Sent\nd OK done\n",
	    "C e SELECT \"Sent Items\"\n", "S e OK done\n",
	    "C f CREATE \"Sent Items/x\"\n",
	    "C g LIST \"\" \"Sent Items\"\n");
}

/* LIST patterns that span the renamed part: asked for the new name too,
 * the answers kept where the client's pattern matches what it sees;
 * several patterns (RFC 5258), LIST-STATUS, LSUB, a name as a literal,
 * the destination's own folder of an old name hidden. */
static void test_list_patterns(void **state)
{
	(void)state;
	with_patterns = 1;
	RUN("a LIST \"\" (\"Sent I*\" \"Sent\" \"Sent/*\")\n"
	    "* LIST (\\Sent) \"/\" \"Sent Items\"\n"
	    "a OK done\n"
	    "b LIST \"\" (\"%\" \"Sent\" \"Sent/*\") RETURN (STATUS (MESSAGES))\n"
	    "* LIST () \"/\" INBOX\n"
	    "* STATUS INBOX (MESSAGES 3)\n"
	    "* LIST () \"/\" \"Sent Items\"\n"
	    "* STATUS \"Sent Items\" (MESSAGES 1)\n"
	    "b OK done\n"
	    "c LIST (SUBSCRIBED) \"\" (\"INBOX\" \"Sent\")\n"
	    "* LIST (\\Subscribed) \"/\" \"Sent Items\"\n"
	    "c OK done\n"
	    "d LSUB \"\" \"*\"\n"
	    "* LSUB () \"/\" \"Sent Items\"\n"
	    "d OK done\n"
	    "e LIST \"\" \"inbox\"\n"
	    "* LIST () \"/\" INBOX\n"
	    "e OK done\n"
	    "f LIST \"\" \"Sent\"\n"
	    "f OK done\n"
	    "g LIST \"Sent \" ({4+}\nIt*\n)\n"
	    "* CAPABILITY IMAP4rev1 ENABLE\n"
	    "h NOOP\n"
	    "i ENABLE X-FOO\n",
	    "C a LIST \"\" \"Sent I*\"\n",
	    "S * LIST (\\Sent) \"/\" Sent\n",
	    "S * LIST () \"/\" \"Sent/2019\"\n", "S a OK done\n",
	    "C b LIST \"\" % RETURN (STATUS (MESSAGES))\n",
	    "S * LIST () \"/\" INBOX\n", "S * STATUS INBOX (MESSAGES 3)\n",
	    "S * LIST () \"/\" \"Sent Items\"\n",
	    "S * STATUS \"Sent Items\" (MESSAGES 2)\n",
	    "S * LIST () \"/\" Sent\n", "S * STATUS Sent (MESSAGES 1)\n",
	    "S * LIST () \"/\" {9}\nSent/2019\n",
	    "S * STATUS {9}\nSent/2019 (MESSAGES 0)\n",
	    "S b OK done\n",
	    "C c LIST (SUBSCRIBED) \"\" (INBOX \"Sent Items\")\n",
	    "S * LIST (\\Subscribed) \"/\" Sent\n", "S c OK done\n",
	    "C d LSUB \"\" \"Sent*\"\n", "S * LSUB () \"/\" INBOX\n",
	    "S * LSUB () \"/\" Sent\n", "S d OK done\n",
	    "C e LIST \"\" \"inbox\"\n", "S * LIST () \"/\" INBOX\n",
	    "S e OK done\n",
	    /* the destination's "Sent" is shown as "Sent Items" */
	    "C f LIST \"\" \"Sent\"\n", "S * LIST () \"/\" Sent\n",
	    "S f OK done\n",
	    /* a literal in it: left as it is */
	    "C g LIST \"Sent \" ({4+}\nIt*\n)\n",
	    /* names renamed: no UTF-8 names (RFC 6855) */
	    "S * CAPABILITY IMAP4rev1 UTF8=ACCEPT ENABLE\n",
	    "C h ENABLE UTF8=ACCEPT\n", "C i ENABLE utf8=accept X-FOO\n");
	with_patterns = 0;
}

/* A Courier-style source's namespace shown: NAMESPACE with its prefix and
 * separator, LIST answers with both, every name the client sends mapped
 * back, INBOX as it is, the server's own "INBOX.x" hidden (the client's
 * "INBOX.x" is the server's "x"). */
static void test_namespace(void **state)
{
	(void)state;
	with_ns = 1;
	RUN("a NAMESPACE\n"
	    "* NAMESPACE ((\"INBOX.\" \".\")) NIL NIL\n"
	    "a OK done\n"
	    "b LIST \"\" \"*\"\n"
	    "* LIST (\\HasChildren) \".\" INBOX\n"
	    "* LIST () \".\" \"INBOX.Work\"\n"
	    "* LIST () \".\" \"INBOX.a/b.c\"\n"
	    "b OK done\n"
	    "c SELECT \"a.b\"\n"
	    "d SELECT INBOX\n"
	    "e LSUB \"\" \"*\"\n"
	    "* LSUB () \".\" \"INBOX.Work\"\n"
	    "e OK done\n"
	    "f CREATE \"New/Sub\"\n"
	    "g STATUS \"INBOX.inbox\" (MESSAGES)\n"
	    "* STATUS \"INBOX.Work\" (MESSAGES 2)\n",
	    "C a NAMESPACE\n",
	    "S * NAMESPACE ((\"\" \"/\")) NIL NIL\n", "S a OK done\n",
	    "C b LIST \"\" *\n",
	    "S * LIST (\\HasChildren) \"/\" INBOX\n",
	    "S * LIST () \"/\" Work\n",
	    "S * LIST () \"/\" \"INBOX.x\"\n",
	    "S * LIST () \"/\" \"a.b/c\"\n", "S b OK done\n",
	    "C c SELECT \"INBOX.a/b\"\n", "C d SELECT INBOX\n",
	    "C e LSUB \"\" \"INBOX*\"\n",
	    "S * LSUB () \"/\" Work\n", "S e OK done\n",
	    "C f CREATE INBOX.New.Sub\n",
	    "C g STATUS \"INBOX.inbox\" (MESSAGES)\n",
	    "S * STATUS Work (MESSAGES 2)\n");
	with_ns = 0;
	ns_names(NULL, NULL, 0);
}

static void test_ns_name(void **state)
{
	static const char *const pairs[][2] = {
		{ "INBOX.Work", "Work" }, { "INBOX.a.b", "a/b" },
		{ "INBOX.a/b", "a.b" }, { "INBOX.INBOX", "INBOX.INBOX" },
	};
	struct ms_vbuf b = { 0 };

	(void)state;
	for (size_t i = 0; i < sizeof(pairs) / sizeof(*pairs); i++) {
		if (i < 3) {
			assert_int_equal(ms_view_ns_name(&courier, pairs[i][0],
							 1, &b), 1);
			assert_string_equal(b.p, pairs[i][1]);
		}
		assert_int_equal(ms_view_ns_name(&courier, pairs[i][1], 0,
						 &b), 1);
		assert_true(i == 3 || strcmp(b.p, pairs[i][0]) == 0);
	}
	/* the same on both sides: INBOX, a name outside the prefix, the
	 * prefix alone, a name that would be INBOX */
	assert_int_equal(ms_view_ns_name(&courier, "INBOX", 1, &b), 0);
	assert_int_equal(ms_view_ns_name(&courier, "inbox", 0, &b), 0);
	assert_int_equal(ms_view_ns_name(&courier, "Work", 1, &b), 0);
	assert_int_equal(ms_view_ns_name(&courier, "INBOX.", 1, &b), 0);
	assert_int_equal(ms_view_ns_name(&courier, "INBOX.Inbox", 1, &b), 0);
	assert_int_equal(ms_view_ns_name(&courier, "", 0, &b), 0);
	ms_vbuf_free(&b);
}

static void test_pattern_match(void **state)
{
	(void)state;
	assert_true(ms_view_pattern_match("*", "a/b/c", '/'));
	assert_true(ms_view_pattern_match("%", "a", '/'));
	assert_false(ms_view_pattern_match("%", "a/b", '/'));
	assert_true(ms_view_pattern_match("%", "a/b", '\0'));
	assert_true(ms_view_pattern_match("a/%", "a/b", '/'));
	assert_false(ms_view_pattern_match("a/%", "a/b/c", '/'));
	assert_true(ms_view_pattern_match("Sent I*", "Sent Items/2019", '/'));
	assert_false(ms_view_pattern_match("Sent I%", "Sent Items/2019", '/'));
	assert_true(ms_view_pattern_match("*%*s", "Items", '/'));
	assert_false(ms_view_pattern_match("Sent", "sent", '/'));
	assert_true(ms_view_pattern_match("inbox", "INBOX", '/'));
	assert_true(ms_view_pattern_match("Inbox/%", "INBOX/x", '/'));
	assert_false(ms_view_pattern_match("inboxy", "INBOXY", '/'));
	assert_true(ms_view_pattern_match("", "", '/'));
	assert_false(ms_view_pattern_match("", "a", '/'));
	assert_false(ms_view_pattern_match("a", "", '/'));
}

/* A folder named by a literal: the view answers the client's "+" itself,
 * reads the name, finds its map and sends it on quoted. */
static void test_literal_name(void **state)
{
	(void)state;
	RUN("+ OK\n"
	    "a SELECT \"INBOX\"\n"
	    "* OK [UIDVALIDITY 1111] x\n"
	    "a OK done\n"
	    "b UID FETCH 5 UID\n",
	    "C a SELECT {5}\n", "C INBOX\n",
	    "S * OK [UIDVALIDITY 2222] x\na OK done\n",
	    "C b UID FETCH 15 UID\n");
}

/* Names as literals, both ways, renamed; quoted strings with escapes. */
static void test_literal_names_renamed(void **state)
{
	(void)state;
	RUN("+ OK\n"
	    /* two names in literals, one synchronizing */
	    "+ OK\n"
	    "a RENAME \"Sent\" \"Sent\"\n"
	    "b STATUS \"Sent\" (UIDNEXT)\n"
	    "c APPEND \"Sent\" {3}\nabc\n"
	    "* STATUS \"Sent Items\" (UIDVALIDITY 4444 UIDNEXT 105)\n"
	    "* LIST () \"/\" \"Sent Items\"\n"
	    "* LIST () \"/\" {3}\n\xc3\xa9x\n"
	    /* the reference is no name: the server's "+" for it, ours for
	     * the pattern */
	    "d LIST {0}\n+ OK\n \"Sent\"\n"
	    /* a name no quoted string can hold: a literal, LITERAL+ */
	    "+ OK\ne SELECT {3+}\n\xc3\xa9x\n"
	    "f SELECT \"Odd\\\\New\"\n"
	    "* LIST () \"/\" \"Odd \\\"Q\\\" \\\\ B\"\n",
	    "C a RENAME {10}\n", "C Sent Items {10}\n", "C Sent Items\n",
	    "C b STATUS {10+}\nSent Items (UIDNEXT)\n",
	    "C c APPEND {10+}\nSent Items {3}\n", "C abc\n",
	    "S * STATUS {4}\nSent (UIDVALIDITY 3333 UIDNEXT 5)\n",
	    "S * LIST () \"/\" {4}\nSent\n",
	    "S * LIST () \"/\" {3}\n\xc3\xa9x\n",
	    "C d LIST {0}\n", "C  {10}\n", "C Sent Items\n",
	    "C e SELECT {3}\n", "C \xc3\xa9x\n",
	    "C f SELECT \"Odd \\\"Q\\\" \\\\ B\"\n",
	    "S * LIST () \"/\" \"Odd\\\\New\"\n");
}

/* A client's synchronizing literal while the server is in the middle of a
 * response: the "+" waits for the response's end. */
static void test_literal_plus_waits(void **state)
{
	(void)state;
	RUN("* 1 FETCH (BODY[] {3}\nabc)\n"
	    "+ OK\n"
	    "b SELECT \"Sent\"\n",
	    "S * 1 FETCH (BODY[] {3}\n", "S abc",
	    "C b SELECT {10}\n",
	    "S )\n",
	    "C Sent Items\n");
}

/* The store fails in the middle of a session: the line that needed it is
 * not passed on, and the view ends. */
static void test_store_failure(void **state)
{
	struct fix f;
	struct ms_view v;
	static const char st[] = "* STATUS Broken (UIDVALIDITY 9 UIDNEXT 4)\r\n";

	(void)state;
	for (int client = 0; client < 2; client++) {
		fix_init(&f);
		ms_view_init(&v, lookup, names, &f);
		f.v = &v;
		assert_int_equal(ms_view_client(&v, "a NOOP\r\n", 8, out,
						&f.out), 0);
		if (client)
			assert_int_equal(ms_view_client(&v, "b SELECT Broken\r\n",
							17, out, &f.out), -1);
		else
			assert_int_equal(ms_view_server(&v, st, sizeof(st) - 1,
							out, &f.out), -1);
		assert_string_equal(ms_view_gave_up(&v), "store failed");
		assert_string_equal(f.out.p, "a NOOP\r\n");
		assert_true(ms_view_client_at_rest(&v));
		assert_int_equal(ms_view_server(&v, "a OK\r\n", 6, out,
						&f.out), -1);
		ms_view_clear(&v);
		fix_clear(&f);
	}
}

/* A folder name too long to look at, or none: the UIDs that follow are
 * the server's, not the last folder's view. */
static void test_unknown_folder(void **state)
{
	char sel[1200 + 64], lit[1200 + 8], want[4096];

	(void)state;
	memset(lit, 'x', 1200);
	strcpy(lit + 1200, "\n");
	snprintf(sel, sizeof(sel), "C b SELECT {1200}\n");
	snprintf(want, sizeof(want), "a SELECT INBOX\na OK done\n"
		 "b SELECT {1200}\n%sc UID FETCH 15 UID\n"
		 "d SELECT (\n", lit);
	{
		const char *ev[] = {
			"C a SELECT INBOX\n", "S a OK done\n", sel, NULL,
			"C c UID FETCH 15 UID\n", "C d SELECT (\n",
		};
		char l[1200 + 8] = "C ";

		memcpy(l + 2, lit, strlen(lit) + 1);
		ev[3] = l;
		run(ev, sizeof(ev) / sizeof(*ev), want);
	}
}

/* The server shows another UIDVALIDITY (the folder was made anew): the
 * folder is passed on as the server numbers it. */
static void test_other_uidvalidity(void **state)
{
	(void)state;
	RUN("a SELECT INBOX\n"
	    "* OK [UIDVALIDITY 7] x\n"
	    "* OK [UIDNEXT 6] y\n"
	    "a OK done\n"
	    "b UID FETCH 2 UID\n"
	    "* 2 FETCH (UID 2)\n",
	    "C a SELECT INBOX\n",
	    "S * OK [UIDVALIDITY 7] x\n* OK [UIDNEXT 6] y\na OK done\n",
	    "C b UID FETCH 2 UID\n", "S * 2 FETCH (UID 2)\n");
}

/* A line past the bound ends the view (and the session). */
static void test_line_too_long(void **state)
{
	struct ms_vbuf o = { 0 };
	struct ms_view v;
	char *big = malloc(MS_VIEW_LINE_MAX + 1);

	(void)state;
	assert_non_null(big);
	memset(big, 'a', MS_VIEW_LINE_MAX + 1);
	ms_view_init(&v, lookup, names, NULL);
	assert_int_equal(ms_view_client(&v, big, MS_VIEW_LINE_MAX + 1, out,
					&o), -1);
	assert_string_equal(ms_view_gave_up(&v), "line too long");
	ms_view_clear(&v);
	ms_vbuf_free(&o);
	free(big);
}

/* Commands never answered: bounded, then the view ends. */
static void test_pipeline_bound(void **state)
{
	struct ms_vbuf o = { 0 };
	struct ms_view v;
	size_t i;
	int r = 0;

	(void)state;
	ms_view_init(&v, lookup, names, NULL);
	for (i = 0; i <= MS_VIEW_PIPELINE_MAX && r == 0; i++) {
		r = ms_view_client(&v, "a NOOP\r\n", 8, out, &o);
		o.len = 0;
	}
	assert_int_equal(r, -1);
	assert_int_equal(i, MS_VIEW_PIPELINE_MAX + 1);
	assert_string_equal(ms_view_gave_up(&v), "too many commands at once");
	ms_view_clear(&v);
	ms_vbuf_free(&o);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_map),
		cmocka_unit_test(test_set_to_dst),
		cmocka_unit_test(test_set_to_view),
		cmocka_unit_test(test_not_monotone),
		cmocka_unit_test(test_select_fetch),
		cmocka_unit_test(test_search),
		cmocka_unit_test(test_append_copy_status),
		cmocka_unit_test(test_names_caps),
		cmocka_unit_test(test_literal_name),
		cmocka_unit_test(test_list_patterns),
		cmocka_unit_test(test_pattern_match),
		cmocka_unit_test(test_literal_names_renamed),
		cmocka_unit_test(test_literal_plus_waits),
		cmocka_unit_test(test_store_failure),
		cmocka_unit_test(test_other_uidvalidity),
		cmocka_unit_test(test_unknown_folder),
		cmocka_unit_test(test_line_too_long),
		cmocka_unit_test(test_pipeline_bound),
		cmocka_unit_test(test_namespace),
		cmocka_unit_test(test_ns_name),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
