/* Unit tests for daemon/mailbox.c: modified UTF-7, separator translation,
 * IMAP date-time parsing, flag normalisation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mailbox.h"

struct vector {
	const char *utf8;
	const char *mutf7;
};

static const struct vector vectors[] = {
	{ "", "" },
	{ "INBOX", "INBOX" },
	{ "Entw\xc3\xbcrfe", "Entw&APw-rfe" },
	{ "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", "&ZeVnLIqe-" },
	{ "~peter/mail/\xe5\x8f\xb0\xe5\x8c\x97/"
	  "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e",
	  "~peter/mail/&U,BTFw-/&ZeVnLIqe-" },
	{ "&", "&-" },
	{ "a&b&&c", "a&-b&-&-c" },
	{ "\xf0\x9f\x98\x80", "&2D3eAA-" },			/* U+1F600 */
	{ "x\xf0\x9f\x98\x80y\xc3\xbc", "x&2D3eAA-y&APw-" },
	/* consecutive non-ASCII characters share one run */
	{ "\xc3\xbc\xc3\xbc", "&APwA,A-" },
	/* a run right before an '&' */
	{ "\xc3\xbc&", "&APw-&-" },
	/* controls and DEL are not printable: they are encoded */
	{ "a\tb", "a&AAk-b" },
	{ "\x7f", "&AH8-" },
	/* U+10FFFF, the last code point */
	{ "\xf4\x8f\xbf\xbf", "&2,,f,w-" },
	{ " ~!\"#$%'()*+,-./:;<=>?@[\\]^_`{|}",
	  " ~!\"#$%'()*+,-./:;<=>?@[\\]^_`{|}" },
};

static void test_mutf7_vectors(void **state)
{
	size_t i;

	for (i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
		char *enc = ms_utf8_to_mutf7(vectors[i].utf8);
		char *dec = ms_mutf7_to_utf8(vectors[i].mutf7);

		assert_non_null(enc);
		assert_non_null(dec);
		assert_string_equal(enc, vectors[i].mutf7);
		assert_string_equal(dec, vectors[i].utf8);
		assert_true(ms_mutf7_is_valid(vectors[i].mutf7));
		free(enc);
		free(dec);
	}
}

static void test_mutf7_invalid(void **state)
{
	static const char *const bad[] = {
		"&",			/* shift at the end */
		"abc&",
		"&AGE",			/* unterminated run */
		"&APw",
		"&APw-&APw-",		/* two adjacent runs: one expected */
		"&AGE-",		/* encoded printable ASCII 'a' */
		"&ACY-",		/* encoded '&' */
		"&ACA-",		/* encoded space */
		"&AH4-",		/* encoded '~' */
		"&AAA-",		/* encoded NUL */
		"&AP-",			/* 12 bits: not one UTF-16 unit */
		"&A-",
		"&APx-",		/* non-zero padding bits */
		"&APwA-",		/* a whole spare base64 character */
		"&AP/-",		/* '/' is not modified base64 */
		"&AP=-",
		"&AP w-",
		"&2D0-",		/* lone high surrogate */
		"&2D3YPQ-",		/* high followed by high */
		"&3gA-",		/* lone low surrogate */
		"&2D0AQQ-",		/* high followed by a BMP character */
		"Entw\xc3\xbcrfe",	/* 8-bit bytes */
		"\x80",
		"a\tb",			/* raw control character */
		"\x7f",
		"&-&",
	};
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *dec = ms_mutf7_to_utf8(bad[i]);

		if (dec != NULL)
			fail_msg("accepted \"%s\" as \"%s\"", bad[i], dec);
		assert_false(ms_mutf7_is_valid(bad[i]));
	}
	assert_null(ms_mutf7_to_utf8(NULL));
	assert_false(ms_mutf7_is_valid(NULL));
}

static void test_utf8_invalid(void **state)
{
	static const char *const bad[] = {
		"\x80",				/* stray continuation */
		"a\xbf",
		"\xc3",				/* truncated */
		"\xe6\x97",
		"\xf0\x9f\x98",
		"\xc3\x28",			/* bad continuation */
		"\xc0\xaf",			/* overlong '/' */
		"\xc1\xbf",
		"\xe0\x80\xaf",
		"\xe0\x9f\xbf",			/* overlong U+07FF */
		"\xf0\x8f\xbf\xbf",		/* overlong U+FFFF */
		"\xed\xa0\x80",			/* U+D800 */
		"\xed\xbf\xbf",			/* U+DFFF */
		"\xed\xa0\xbd\xed\xb8\x80",	/* CESU-8 U+1F600 */
		"\xf4\x90\x80\x80",		/* U+110000 */
		"\xf5\x80\x80\x80",
		"\xfe",
		"\xff",
	};
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *enc = ms_utf8_to_mutf7(bad[i]);

		if (enc != NULL)
			fail_msg("accepted bad UTF-8 #%zu as \"%s\"", i, enc);
	}
	assert_null(ms_utf8_to_mutf7(NULL));
}

/* Every BMP character and a spread of supplementary ones survive the round
 * trip, each alone and between ASCII. */
static void test_mutf7_roundtrip(void **state)
{
	uint32_t cp;

	for (cp = 1; cp <= 0x10ffff; cp += cp < 0x10000 ? 1 : 0x3f1) {
		char utf8[16], *enc, *dec;
		size_t n = 0;

		if (cp >= 0xd800 && cp <= 0xdfff)
			continue;
		utf8[n++] = 'a';
		if (cp < 0x80) {
			utf8[n++] = cp;
		} else if (cp < 0x800) {
			utf8[n++] = 0xc0 | (cp >> 6);
			utf8[n++] = 0x80 | (cp & 0x3f);
		} else if (cp < 0x10000) {
			utf8[n++] = 0xe0 | (cp >> 12);
			utf8[n++] = 0x80 | ((cp >> 6) & 0x3f);
			utf8[n++] = 0x80 | (cp & 0x3f);
		} else {
			utf8[n++] = 0xf0 | (cp >> 18);
			utf8[n++] = 0x80 | ((cp >> 12) & 0x3f);
			utf8[n++] = 0x80 | ((cp >> 6) & 0x3f);
			utf8[n++] = 0x80 | (cp & 0x3f);
		}
		utf8[n++] = 'b';
		utf8[n] = '\0';

		enc = ms_utf8_to_mutf7(utf8);
		assert_non_null(enc);
		dec = ms_mutf7_to_utf8(enc);
		if (dec == NULL || strcmp(dec, utf8) != 0)
			fail_msg("U+%04X: round trip via \"%s\" failed", cp,
				 enc);
		free(enc);
		free(dec);
	}
}

static void check_translate(const char *name, char src, char dst,
			    const char *want)
{
	char *got = ms_mailbox_translate(name, src, dst);

	assert_non_null(got);
	if (strcmp(got, want) != 0)
		fail_msg("translate(\"%s\", '%c', '%c') = \"%s\", want \"%s\"",
			 name, src ? src : '0', dst ? dst : '0', got, want);
	free(got);
}

static void test_translate(void **state)
{
	check_translate("Archive.2020", '.', '/', "Archive/2020");
	/* levels are joined with the destination's separator (the lead's
	 * brief wrote "a/b%2Ec" here, which would lose the hierarchy) */
	check_translate("a/b.c", '/', '.', "a.b%2Ec");
	check_translate("a/b.c/d", '/', '.', "a.b%2Ec.d");
	check_translate("x%y.z", '/', '.', "x%25y%2Ez");
	check_translate("x%y", '/', '.', "x%y");
	check_translate("a.b/c", '.', '/', "a/b%2Fc");
	check_translate("inbox", '.', '/', "INBOX");
	check_translate("InBoX", '/', '/', "INBOX");
	check_translate("INBOX.Sent", '.', '/', "INBOX/Sent");
	check_translate("inbox.Sent", '.', '/', "INBOX/Sent");
	/* only the top level can be the INBOX */
	check_translate("Foo.inbox", '.', '/', "Foo/inbox");
	check_translate("INBOXES.x", '.', '/', "INBOXES/x");
	/* same separators: unchanged */
	check_translate("a.b%c.d", '.', '.', "a.b%c.d");
	check_translate("a/b", '/', '/', "a/b");
	/* flat source: one component */
	check_translate("a/b.c", 0, '/', "a%2Fb.c");
	check_translate("Sent", 0, '.', "Sent");
	check_translate("inbox", 0, '.', "INBOX");
	/* flat destination: nothing to split, nothing to escape */
	check_translate("a.b%c", '.', 0, "a.b%c");
	check_translate("a.b", 0, 0, "a.b");
	/* empty name and empty components pass through */
	check_translate("", '.', '/', "");
	check_translate("a..b", '.', '/', "a//b");
	/* mUTF-7 names are plain bytes here */
	check_translate("Entw&APw-rfe.2020", '.', '/', "Entw&APw-rfe/2020");
	assert_null(ms_mailbox_translate(NULL, '.', '/'));
}

static void check_date(const char *s, int64_t want)
{
	int64_t got = 12345;

	if (ms_imap_date_parse(s, &got) < 0)
		fail_msg("refused \"%s\"", s);
	if (got != want)
		fail_msg("\"%s\" = %lld, want %lld", s, (long long)got,
			 (long long)want);
}

static void test_date(void **state)
{
	static const char *const bad[] = {
		"",
		"garbage",
		"17-Jul-1996 02:44:25",			/* no zone */
		"17-Jul-1996 02:44:25 -0700 ",		/* trailing */
		"\"17-Jul-1996 02:44:25 -0700\"",
		"17-Jul-96 02:44:25 -0700",		/* 2-digit year */
		"17-Jux-1996 02:44:25 -0700",
		"17 Jul 1996 02:44:25 -0700",
		"32-Jul-1996 02:44:25 -0700",
		"00-Jul-1996 02:44:25 -0700",
		"29-Feb-1900 00:00:00 +0000",		/* not a leap year */
		"31-Apr-2001 00:00:00 +0000",
		"17-Jul-1996 24:00:00 -0700",
		"17-Jul-1996 02:60:25 -0700",
		"17-Jul-1996 02:44:61 -0700",
		"17-Jul-1996 2:44:25 -0700",
		"17-Jul-1996 02:44:25 0700",
		"17-Jul-1996 02:44:25 -07:00",
		"17-Jul-1996 02:44:25 -070",
		"17-Jul-1996 02:44:25 +0760",
		"17-Jul-1996 02:44:25 GMT",
		" 17-Jul-1996 02:44:25 -0700",		/* padded 2 digits */
		"  1-Jan-2001 00:00:00 +0000",
		"001-Jan-2001 00:00:00 +0000",
		"1-Jan-2001  00:00:00 +0000",
		"+1-Jan-2001 00:00:00 +0000",
	};
	size_t i;
	int64_t e;

	check_date("17-Jul-1996 02:44:25 -0700", 837596665);
	check_date("17-jul-1996 09:44:25 +0000", 837596665);
	check_date(" 1-Jan-2001 00:00:00 +0000", 978307200);
	check_date("1-Jan-2001 00:00:00 +0000", 978307200);
	check_date("01-Jan-2001 00:00:00 +0000", 978307200);
	check_date("01-Jan-1970 00:00:00 +0000", 0);
	check_date("01-Jan-1970 00:00:00 +0100", -3600);
	check_date("31-Dec-1969 23:59:59 +0000", -1);
	check_date("01-Jan-1960 00:00:00 +0000", -315619200);
	check_date("29-Feb-2000 12:00:00 +0000", 951825600);
	check_date("29-Feb-2024 00:00:00 +0530", 1709145000);
	check_date("31-Dec-9999 23:59:59 +0000", 253402300799);
	check_date("31-Dec-1999 23:59:60 +0000", 946684800);

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (ms_imap_date_parse(bad[i], &e) == 0)
			fail_msg("accepted \"%s\"", bad[i]);
	assert_int_equal(ms_imap_date_parse(NULL, &e), -1);
}

static void check_flags(const char *in, const char *want)
{
	char out[256];

	memset(out, 'x', sizeof(out));
	assert_int_equal(ms_flags_normalize(in, out, sizeof(out)), 0);
	assert_string_equal(out, want);
}

static void test_flags(void **state)
{
	char small[8];

	check_flags("\\Seen  $Forwarded \\Recent \\seen foo",
		    "$Forwarded \\Seen foo");
	check_flags("", "");
	check_flags("   ", "");
	check_flags("\\Recent", "");
	check_flags("\\RECENT \\recent", "");
	check_flags(NULL, "");
	check_flags("\\flagged \\ANSWERED \\deleted \\dRAFT \\SEEN",
		    "\\Answered \\Deleted \\Draft \\Flagged \\Seen");
	/* keywords are kept as they are and compared byte for byte */
	check_flags("foo Foo foo $Junk $junk", "$Junk $junk Foo foo");
	/* unknown system-like flags are kept verbatim */
	check_flags("\\Seen \\X-Custom", "\\Seen \\X-Custom");
	check_flags(" b  a ", "a b");

	/* the buffer holds the NUL too */
	assert_int_equal(ms_flags_normalize("\\Seen", small, 6), 0);
	assert_string_equal(small, "\\Seen");
	assert_int_equal(ms_flags_normalize("\\Seen", small, 5), -1);
	assert_int_equal(ms_flags_normalize("a b c", small, sizeof(small)), 0);
	assert_string_equal(small, "a b c");
	assert_int_equal(ms_flags_normalize("a b c d", small, 8), 0);
	assert_int_equal(ms_flags_normalize("a b c d", small, 7), -1);
	assert_string_equal(small, "");
	assert_int_equal(ms_flags_normalize("", small, 1), 0);
	assert_string_equal(small, "");
	assert_int_equal(ms_flags_normalize("", small, 0), -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_mutf7_vectors),
		cmocka_unit_test(test_mutf7_invalid),
		cmocka_unit_test(test_utf8_invalid),
		cmocka_unit_test(test_mutf7_roundtrip),
		cmocka_unit_test(test_translate),
		cmocka_unit_test(test_date),
		cmocka_unit_test(test_flags),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
