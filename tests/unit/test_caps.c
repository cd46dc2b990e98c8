/* Unit tests for ms_caps_merge() (daemon/caps.c): what the gateway
 * advertises before login, from what the source and destination list. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "caps.h"

static void expect_merge(enum ms_caps_kind kind, const char *a,
			 const char *b, const char *want)
{
	char *got = ms_caps_merge(kind, a, b);

	assert_non_null(got);
	assert_string_equal(got, want);
	free(got);
}

static void imap_intersection(void **state)
{
	/* What both list, in the source's order; the gateway's own
	 * (STARTTLS, AUTH=, LOGINDISABLED) dropped, SASL-IR its own. */
	expect_merge(MS_CAPS_IMAP,
		     "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE "
		     "LITERAL+ STARTTLS AUTH=PLAIN XONLYSRC",
		     "IMAP4rev1 ID IDLE ENABLE STARTTLS LOGINDISABLED "
		     "AUTH=SCRAM-SHA-256 XONLYDST",
		     "IMAP4rev1 ID ENABLE IDLE SASL-IR");
	/* case-insensitive atoms; blanks folded */
	expect_merge(MS_CAPS_IMAP, "imap4rev1  literal+\tid",
		     "IMAP4REV1 LITERAL+ ID", "imap4rev1 literal+ id SASL-IR");
	/* LITERAL+ and LITERAL- are different things */
	expect_merge(MS_CAPS_IMAP, "IMAP4rev1 LITERAL+", "IMAP4rev1 LITERAL-",
		     "IMAP4rev1 SASL-IR");
	/* IMAP4rev2 only where both speak it */
	expect_merge(MS_CAPS_IMAP, "IMAP4rev1 IMAP4rev2", "IMAP4rev1",
		     "IMAP4rev1 SASL-IR");
}

static void one_side_and_none(void **state)
{
	/* Only one server configured: its list (minus the gateway's own). */
	expect_merge(MS_CAPS_IMAP, NULL, "IMAP4rev1 IDLE STARTTLS",
		     "IMAP4rev1 IDLE SASL-IR");
	expect_merge(MS_CAPS_IMAP, "IMAP4rev1 IDLE AUTH=PLAIN", NULL,
		     "IMAP4rev1 IDLE SASL-IR");
	/* Neither: the built-in list (Dovecot's). */
	expect_merge(MS_CAPS_IMAP, NULL, NULL,
		     "IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
		     "SASL-IR");
	expect_merge(MS_CAPS_POP3, NULL, NULL,
		     "CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
		     "AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN\r\n");
	/* An empty list is a list: nothing in common. */
	expect_merge(MS_CAPS_IMAP, "IMAP4rev1 IDLE", "", "SASL-IR");
}

static void pop3_lines(void **state)
{
	expect_merge(MS_CAPS_POP3,
		     "CAPA\nTOP\nUIDL\nRESP-CODES\nPIPELINING\nAUTH-RESP-CODE\n"
		     "STLS\nUSER\nSASL PLAIN LOGIN\nIMPLEMENTATION Dovecot\n"
		     "EXPIRE NEVER\nLOGIN-DELAY 0",
		     "CAPA\r\nUIDL\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\n"
		     "IMPLEMENTATION Other\r\nEXPIRE 30\r\nLOGIN-DELAY 0\r\n",
		     "CAPA\r\nUIDL\r\nPIPELINING\r\nLOGIN-DELAY 0\r\n"
		     "USER\r\nSASL PLAIN\r\n");
}

static void smtp_inbound(void **state)
{
	/* Inbound: only what the gateway relays; SIZE the smaller limit;
	 * ENHANCEDSTATUSCODES, STARTTLS, AUTH are the caller's. */
	expect_merge(MS_CAPS_SMTP,
		     "PIPELINING\nSIZE 10240000\nVRFY\nETRN\nSTARTTLS\n"
		     "AUTH PLAIN LOGIN\nENHANCEDSTATUSCODES\n8BITMIME\nDSN\n"
		     "SMTPUTF8\nCHUNKING\nXCLIENT NAME ADDR",
		     "SIZE 52428800\nPIPELINING\n8BITMIME\nSMTPUTF8\nCHUNKING\n"
		     "ENHANCEDSTATUSCODES",
		     "250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n");
	/* SIZE without a number is "no fixed limit": the other's wins. */
	expect_merge(MS_CAPS_SMTP, "SIZE\n8BITMIME", "SIZE 1000\n8BITMIME",
		     "250-SIZE 1000\r\n250-8BITMIME\r\n");
	expect_merge(MS_CAPS_SMTP, "SIZE", "SIZE", "250-SIZE\r\n");
	/* SIZE only where both take the parameter */
	expect_merge(MS_CAPS_SMTP, "SIZE 1000\n8BITMIME", "8BITMIME",
		     "250-8BITMIME\r\n");
}

static void smtp_submission(void **state)
{
	/* Relayed byte for byte after AUTH: whatever both offer, except
	 * the gateway's own and what only an MTA peer may use. */
	expect_merge(MS_CAPS_SUBMISSION,
		     "PIPELINING\nSIZE 10240000\nETRN\nAUTH=PLAIN\n8BITMIME\n"
		     "DSN\nSMTPUTF8\nCHUNKING\nDELIVERBY 60\nXFORWARD NAME",
		     "SIZE\nPIPELINING\n8BITMIME\nSMTPUTF8\nCHUNKING\n"
		     "DELIVERBY 120\nXFORWARD NAME",
		     "250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
		     "250-SMTPUTF8\r\n250-CHUNKING\r\n");
}

static void bounded(void **state)
{
	/* A server listing thousands of atoms gets a bounded reply. */
	size_t n = 20000;
	char *big = malloc(n + 1);
	char *got;

	assert_non_null(big);
	for (size_t i = 0; i < n; i++)
		big[i] = i % 5 == 4 ? ' ' : 'X';
	big[n] = '\0';
	got = ms_caps_merge(MS_CAPS_IMAP, big, big);
	assert_non_null(got);
	assert_true(strlen(got) <= 1500);
	free(got);
	free(big);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(imap_intersection),
		cmocka_unit_test(one_side_and_none),
		cmocka_unit_test(pop3_lines),
		cmocka_unit_test(smtp_inbound),
		cmocka_unit_test(smtp_submission),
		cmocka_unit_test(bounded),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
