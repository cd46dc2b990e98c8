/* libFuzzer target: the login mechanics the gateway's front ends share
 * (daemon/gw_login.h: what every AUTHENTICATE PLAIN / LOGIN, AUTH PLAIN /
 * LOGIN a client sends goes through before login, IMAP, POP3 and
 * submission alike) and the base64 and SASL PLAIN codec under them
 * (daemon/util.h).
 *
 * Input: byte 0 picks the direction.
 * - Even: the rest, up to a NUL, is a client's base64. ms_b64_decode() must
 *   agree with a strict RFC 4648 decoder written here (the same inputs
 *   refused, the same bytes out); ms_sasl_plain_parse() and
 *   ms_login_take_plain() must accept exactly the decodings with two NULs
 *   and split them there; ms_login_decode_step() (a SASL LOGIN response)
 *   exactly the decodings without a NUL, giving those bytes; and the triple,
 *   encoded again with ms_sasl_plain(), must parse back to itself (and be
 *   the input itself when that was canonical base64).
 * - Odd: the rest is "authzid NUL authcid NUL password" (missing parts
 *   empty, a third NUL ends the password): ms_sasl_plain() must give the
 *   canonical base64 of exactly those bytes, and parse back to them; the
 *   login replayed with ms_login_sasl_plain() must be taken back by
 *   ms_login_take_plain() as a login for the same user, with the same
 *   name and password.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gw_login.h"
#include "util.h"

static const char alphabet[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int sextet(char c)
{
	const char *p = c != '\0' ? strchr(alphabet, c) : NULL;

	return p != NULL ? (int)(p - alphabet) : -1;
}

/* RFC 4648 base64: groups of four from the alphabet, "=" only as the last
 * one or two characters. (Stray bits under the padding are let through, as
 * RFC 4648 3.5 allows.) Returns the length, or -1. */
static long ref_decode(const char *in, unsigned char *out)
{
	size_t l = strlen(in), pad = 0, n = 0;

	if (l == 0 || l % 4 != 0)
		return -1;
	while (pad < l && in[l - 1 - pad] == '=')
		pad++;
	if (pad > 2)
		return -1;
	for (size_t i = 0; i < l; i += 4) {
		uint32_t v = 0;

		for (size_t k = 0; k < 4; k++) {
			int s = i + k >= l - pad ? 0 : sextet(in[i + k]);

			if (s < 0)
				return -1;
			v = v << 6 | (uint32_t)s;
		}
		out[n++] = (unsigned char)(v >> 16);
		out[n++] = (unsigned char)(v >> 8);
		out[n++] = (unsigned char)v;
	}
	return (long)(n - pad);
}

static void ref_encode(const unsigned char *in, size_t len, char *out)
{
	size_t n = 0;

	for (size_t i = 0; i < len; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16;

		if (i + 1 < len)
			v |= (uint32_t)in[i + 1] << 8;
		if (i + 2 < len)
			v |= in[i + 2];
		out[n++] = alphabet[v >> 18 & 63];
		out[n++] = alphabet[v >> 12 & 63];
		out[n++] = i + 1 < len ? alphabet[v >> 6 & 63] : '=';
		out[n++] = i + 2 < len ? alphabet[v & 63] : '=';
	}
	out[n] = '\0';
}

/* ms_sasl_plain(z, c, p) parses back to (z, c, p); returns the encoding. */
static char *round_trip(const char *z, const char *c, const char *p)
{
	char *b64 = ms_sasl_plain(z, c, p), *z2, *c2, *p2;

	assert(b64 != NULL);
	assert(ms_sasl_plain_parse(b64, &z2, &c2, &p2) == 0);
	assert(strcmp(z, z2) == 0 && strcmp(c, c2) == 0 && strcmp(p, p2) == 0);
	ms_secret_free(&z2);
	ms_secret_free(&c2);
	ms_secret_free(&p2);
	return b64;
}

/* The login (z, c, p) replayed to a server and taken back as a client's:
 * a login for the same user, with the same name and password. */
static void login_round_trip(const char *z, const char *c, const char *p)
{
	struct ms_login l = { strdup(c), strdup(z), strdup(p) }, back = { 0 };
	char *b64 = ms_login_sasl_plain(&l);

	assert(b64 != NULL);
	assert(ms_login_take_plain(&back, b64) == 0);
	assert(strcmp(back.user, c) == 0 && strcmp(back.pass, p) == 0);
	assert(strcmp(ms_login_name(&back), ms_login_name(&l)) == 0);
	/* the authorization identity only when it is another user */
	assert(strcmp(back.authz, z[0] != '\0' && strcmp(z, c) != 0 ?
		      z : "") == 0);
	ms_secret_free(&b64);
	ms_login_wipe(&l);
	ms_login_wipe(&back);
}

static void check_decode(const char *in)
{
	size_t l = strlen(in), len, nuls = 0;
	unsigned char *ref = malloc(l / 4 * 3 + 3), *out;
	char *z, *c, *p, *step = NULL;
	struct ms_login login = { 0 };
	long rlen = ref_decode(in, ref);
	int ok = ms_b64_decode(in, &out, &len) == 0, r;

	assert(ok == (rlen >= 0));
	if (ok) {
		assert(len == (size_t)rlen && memcmp(out, ref, len) == 0);
		assert(out[len] == '\0');
		free(out);
	}
	for (long i = 0; i < rlen; i++)
		nuls += ref[i] == '\0';
	/* SASL LOGIN: one name or password, never cut at a NUL */
	r = ms_login_decode_step(in, &step);
	assert(r == (rlen < 0 ? MS_LOGIN_BAD_BASE64 : nuls > 0 ? MS_LOGIN_NUL :
		     0));
	if (r == 0) {
		assert(strlen(step) == (size_t)rlen &&
		       memcmp(step, ref, (size_t)rlen) == 0);
		ms_secret_free(&step);
	}
	assert(step == NULL);
	/* SASL PLAIN as the front ends take it: the same as the codec's */
	ok = ms_login_take_plain(&login, in) == 0;
	assert(ok == (rlen >= 0 && nuls == 2));
	ok = ms_sasl_plain_parse(in, &z, &c, &p) == 0;
	assert(ok == (rlen >= 0 && nuls == 2));
	if (ok) {
		size_t zl = strlen(z), cl = strlen(c);
		char *canon = malloc(l + 1), *again;

		assert(strcmp(login.authz, z) == 0 &&
		       strcmp(login.user, c) == 0 &&
		       strcmp(login.pass, p) == 0);
		ms_login_wipe(&login);
		/* authzid NUL authcid NUL password, nothing lost or added */
		assert(zl + cl + strlen(p) + 2 == (size_t)rlen);
		assert(memcmp(z, ref, zl) == 0 && memcmp(c, ref + zl + 1, cl) == 0 &&
		       memcmp(p, ref + zl + cl + 2, (size_t)rlen - zl - cl - 2) == 0);
		again = round_trip(z, c, p);
		ref_encode(ref, (size_t)rlen, canon);
		assert(strcmp(again, canon) == 0);
		ms_secret_free(&again);
		free(canon);
		ms_secret_free(&z);
		ms_secret_free(&c);
		ms_secret_free(&p);
	}
	free(ref);
}

static void check_encode(const uint8_t *d, size_t size)
{
	/* Three NULs after the input: the parts always end inside buf, one
	 * after the other, so buf's first rawlen bytes are what goes out. */
	char *buf = calloc(1, size + 3), *z = buf, *c, *p, *b64, *canon;
	size_t rawlen;

	memcpy(buf, d, size);
	c = z + strlen(z) + 1;
	p = c + strlen(c) + 1;
	rawlen = (size_t)(p - buf) + strlen(p);
	b64 = round_trip(z, c, p);
	login_round_trip(z, c, p);
	canon = malloc(4 * (rawlen / 3 + 1) + 1);
	ref_encode((const unsigned char *)buf, rawlen, canon);
	assert(strcmp(b64, canon) == 0);
	free(canon);
	ms_secret_free(&b64);
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *s;

	if (size < 1)
		return 0;
	if (data[0] & 1) {
		check_encode(data + 1, size - 1);
		return 0;
	}
	s = strndup((const char *)data + 1, size - 1);
	check_decode(s);
	free(s);
	return 0;
}
