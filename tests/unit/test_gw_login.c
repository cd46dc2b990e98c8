/* Unit tests for the login mechanics every front end of the gateway shares
 * (daemon/gw_login.c): the SASL PLAIN and LOGIN responses a client sends
 * before login, decoded with one set of rules (strict base64, never a NUL
 * in a name or password), and the login replayed to the server. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gw_login.h"
#include "util.h"

/* PLAIN with and without an authorization identity, with the empty
 * password RFC 4616 allows. */
static void plain_forms(void **state)
{
	struct ms_login l = { 0 };

	/* "\0alice\0secret" */
	assert_int_equal(ms_login_take_plain(&l, "AGFsaWNlAHNlY3JldA=="), 0);
	assert_string_equal(l.authz, "");
	assert_string_equal(l.user, "alice");
	assert_string_equal(l.pass, "secret");
	assert_string_equal(ms_login_name(&l), "alice");

	/* "bob\0admin\0pw": the login is for bob */
	assert_int_equal(ms_login_take_plain(&l, "Ym9iAGFkbWluAHB3"), 0);
	assert_string_equal(l.authz, "bob");
	assert_string_equal(l.user, "admin");
	assert_string_equal(l.pass, "pw");
	assert_string_equal(ms_login_name(&l), "bob");

	/* "\0carol\0": an empty password is a password */
	assert_int_equal(ms_login_take_plain(&l, "AGNhcm9sAA=="), 0);
	assert_string_equal(l.user, "carol");
	assert_string_equal(l.pass, "");

	ms_login_wipe(&l);
	assert_null(l.user);
	assert_null(l.authz);
	assert_null(l.pass);
}

/* What is not a PLAIN response is refused, and what the login held stays. */
static void plain_refused(void **state)
{
	static const char *const bad[] = {
		"",			/* nothing */
		"YWxpY2U=",		/* "alice": no NUL */
		"AGFsaWNl",		/* "\0alice": one NUL */
		"AGEAYgBj",		/* "\0a\0b\0c": a NUL in the password */
		"AGFsaWNlAHNlY3JldA",	/* unpadded */
		"AGFsaWNlAHNlY3JldA=",	/* wrongly padded */
		"AGFsaW=lAHNlY3JldA==",	/* padding inside */
		"AGFsaWNlAHNlY3Jld*==",	/* not the alphabet */
		"AGFsaWNl AHNlY3JldA==",	/* a space */
	};
	struct ms_login l = { 0 };

	assert_int_equal(ms_login_take_plain(&l, "AGFsaWNlAHNlY3JldA=="), 0);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(ms_login_take_plain(&l, bad[i]), -1);
		assert_string_equal(l.user, "alice");
		assert_string_equal(l.pass, "secret");
	}
	ms_login_wipe(&l);
}

/* A LOGIN step: the name or the password, never with a NUL in it. */
static void login_steps(void **state)
{
	char *out = NULL;

	assert_int_equal(ms_login_decode_step("YWxpY2U=", &out), 0);
	assert_string_equal(out, "alice");
	ms_secret_free(&out);

	/* "ali\0ce" and "alice\0": would be cut at the NUL */
	assert_int_equal(ms_login_decode_step("YWxpAGNl", &out),
			 MS_LOGIN_NUL);
	assert_null(out);
	assert_int_equal(ms_login_decode_step("YWxpY2UA", &out),
			 MS_LOGIN_NUL);
	assert_int_equal(ms_login_decode_step("AA==", &out), MS_LOGIN_NUL);
	assert_null(out);

	/* not base64; "=" (SMTP's empty response) is the caller's */
	assert_int_equal(ms_login_decode_step("YWxpY2U", &out),
			 MS_LOGIN_BAD_BASE64);
	assert_int_equal(ms_login_decode_step("", &out), MS_LOGIN_BAD_BASE64);
	assert_int_equal(ms_login_decode_step("=", &out), MS_LOGIN_BAD_BASE64);
	assert_int_equal(ms_login_decode_step("YW*pY2U=", &out),
			 MS_LOGIN_BAD_BASE64);
	assert_int_equal(ms_login_decode_step("*", &out),
			 MS_LOGIN_BAD_BASE64);
	assert_null(out);
}

/* The replay to the server: the authorization identity only when it names
 * another user; what it encodes parses back to the same login. */
static void replay(void **state)
{
	struct ms_login l = { 0 };
	char *b64, *z, *c, *p;

	l.user = strdup("alice");
	l.pass = strdup("secret");
	b64 = ms_login_sasl_plain(&l);
	assert_string_equal(b64, "AGFsaWNlAHNlY3JldA==");
	ms_secret_free(&b64);

	l.authz = strdup("alice");	/* the same user: not passed on */
	b64 = ms_login_sasl_plain(&l);
	assert_string_equal(b64, "AGFsaWNlAHNlY3JldA==");
	ms_secret_free(&b64);

	ms_secret_free(&l.authz);
	l.authz = strdup("bob");
	b64 = ms_login_sasl_plain(&l);
	assert_int_equal(ms_sasl_plain_parse(b64, &z, &c, &p), 0);
	assert_string_equal(z, "bob");
	assert_string_equal(c, "alice");
	assert_string_equal(p, "secret");
	ms_secret_free(&z);
	ms_secret_free(&c);
	ms_secret_free(&p);
	ms_secret_free(&b64);
	ms_login_wipe(&l);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(plain_forms),
		cmocka_unit_test(plain_refused),
		cmocka_unit_test(login_steps),
		cmocka_unit_test(replay),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
