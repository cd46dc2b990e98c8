#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "util.h"

void ms_secret_free(char **s)
{
	if (*s != NULL) {
		OPENSSL_cleanse(*s, strlen(*s));
		free(*s);
		*s = NULL;
	}
}

void ms_secret_buf_free(char **buf, size_t size)
{
	if (*buf != NULL)
		OPENSSL_cleanse(*buf, size);
	free(*buf);
	*buf = NULL;
}

int ms_secret_reserve(char **buf, size_t *cap, size_t used, size_t need,
		      size_t min, size_t max)
{
	size_t n = *cap ? *cap : min;
	char *p;

	if (need > max)
		return -1;
	if (*buf != NULL && need <= *cap)
		return 0;
	while (n < need)
		n *= 2;
	if (n > max)
		n = max;
	if ((p = malloc(n)) == NULL)
		return -1;
	if (*buf != NULL) {
		memcpy(p, *buf, used);
		OPENSSL_cleanse(*buf, *cap);
		free(*buf);
	}
	*buf = p;
	*cap = n;
	return 0;
}

char *ms_sasl_plain(const char *authzid, const char *authcid,
		    const char *password)
{
	size_t zl = strlen(authzid), cl = strlen(authcid), pl = strlen(password);
	size_t rawlen = zl + cl + pl + 2;
	unsigned char *raw = malloc(rawlen);
	char *b64 = malloc(4 * (rawlen / 3 + 1) + 1);

	if (raw == NULL || b64 == NULL) {
		free(raw);
		free(b64);
		return NULL;
	}
	memcpy(raw, authzid, zl + 1);
	memcpy(raw + zl + 1, authcid, cl + 1);
	memcpy(raw + zl + cl + 2, password, pl);
	EVP_EncodeBlock((unsigned char *)b64, raw, (int)rawlen);
	OPENSSL_cleanse(raw, rawlen);
	free(raw);
	return b64;
}

int ms_b64_decode(const char *in, unsigned char **out_r, size_t *len_r)
{
	size_t l = strlen(in), pad = 0;
	unsigned char *o;
	int n;

	if (l == 0 || l % 4 != 0)
		return -1;
	/* Padding only at the end: "x=" or "==", never "=x". */
	for (size_t i = 0; i < l; i++)
		if (!isalnum((unsigned char)in[i]) && in[i] != '+' &&
		    in[i] != '/' && !(in[i] == '=' && (i == l - 1 ||
						       (i == l - 2 &&
							in[l - 1] == '='))))
			return -1;
	o = malloc(l / 4 * 3 + 1);
	if (o == NULL)
		return -1;
	n = EVP_DecodeBlock(o, (const unsigned char *)in, (int)l);
	if (n < 0) {
		free(o);
		return -1;
	}
	if (in[l - 1] == '=')
		pad++;
	if (in[l - 2] == '=')
		pad++;
	*out_r = o;
	*len_r = (size_t)n - pad;
	o[*len_r] = '\0';
	return 0;
}

int ms_sasl_plain_parse(const char *b64, char **authz_r, char **authc_r,
			char **pass_r)
{
	unsigned char *raw;
	size_t len;
	const char *z, *c, *p;

	if (ms_b64_decode(b64, &raw, &len) < 0)
		return -1;
	z = (const char *)raw;
	c = memchr(raw, '\0', len);
	if (c != NULL)
		c++;
	p = c != NULL ? memchr(c, '\0', len - (size_t)(c - z)) : NULL;
	if (p != NULL)
		p++;
	/* A NUL inside the password could not be replayed. */
	if (c == NULL || p == NULL ||
	    memchr(p, '\0', len - (size_t)(p - z)) != NULL) {
		OPENSSL_cleanse(raw, len);
		free(raw);
		return -1;
	}
	*authz_r = strdup(z);
	*authc_r = strdup(c);
	*pass_r = strndup(p, len - (size_t)(p - z));
	OPENSSL_cleanse(raw, len);
	free(raw);
	if (*authz_r == NULL || *authc_r == NULL || *pass_r == NULL) {
		ms_secret_free(authz_r);
		ms_secret_free(authc_r);
		ms_secret_free(pass_r);
		return -1;
	}
	return 0;
}

int ms_vformat(char *buf, size_t size, char **text_r, const char *fmt,
	       va_list ap)
{
	va_list again;
	int n;

	va_copy(again, ap);
	n = vsnprintf(buf, size, fmt, ap);
	*text_r = buf;
	if (n >= 0 && (size_t)n >= size) {
		/* Longer than buf: formatted again, whole. */
		*text_r = malloc((size_t)n + 1);
		if (*text_r == NULL)
			n = -2;
		else
			vsnprintf(*text_r, (size_t)n + 1, fmt, again);
	}
	va_end(again);
	return n;
}

void ms_busy_leave(struct ms_busy *b, void (*free_fn)(void *obj), void *obj)
{
	b->depth--;
	if (b->free_pending && b->depth == 0)
		free_fn(obj);
}

int ms_busy_defer(struct ms_busy *b)
{
	if (b->depth == 0)
		return 0;
	b->free_pending = 1;
	return 1;
}

int ms_u32vec_push(struct ms_u32vec *vec, uint32_t x)
{
	if (MS_ARRAY_ROOM(vec->v, vec->n, vec->cap, 256) < 0)
		return -1;
	vec->v[vec->n++] = x;
	return 0;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

void ms_u32vec_sort(struct ms_u32vec *vec)
{
	if (vec->n > 1)
		qsort(vec->v, vec->n, sizeof(*vec->v), cmp_u32);
}

int ms_u32vec_has(const struct ms_u32vec *vec, uint32_t x)
{
	return vec->n > 0 &&
		bsearch(&x, vec->v, vec->n, sizeof(*vec->v), cmp_u32) != NULL;
}

void ms_u32vec_free(struct ms_u32vec *vec)
{
	free(vec->v);
	vec->v = NULL;
	vec->n = vec->cap = 0;
}

unsigned int ms_str_hash(const char *s)
{
	unsigned int h = 5381;

	while (*s != '\0')
		h = h * 33 + (unsigned char)*s++;
	return h;
}

const char *ms_host_name(void)
{
	static char name[256];

	if (name[0] == '\0' &&
	    (gethostname(name, sizeof(name) - 1) < 0 || name[0] == '\0'))
		snprintf(name, sizeof(name), "mailshift");
	return name;
}

int ms_cidr_parse(const char *s, struct ms_cidr *c)
{
	char buf[64];
	const char *slash = strchr(s, '/');
	size_t n = slash != NULL ? (size_t)(slash - s) : strlen(s);
	unsigned int max;

	if (n == 0 || n >= sizeof(buf))
		return -1;
	memcpy(buf, s, n);
	buf[n] = '\0';
	memset(c, 0, sizeof(*c));
	if (inet_pton(AF_INET, buf, c->addr) == 1) {
		c->family = AF_INET;
		max = 32;
	} else if (inet_pton(AF_INET6, buf, c->addr) == 1) {
		c->family = AF_INET6;
		max = 128;
	} else {
		return -1;
	}
	c->bits = max;
	if (slash != NULL) {
		char *end;
		unsigned long bits;

		if (slash[1] < '0' || slash[1] > '9')
			return -1;
		bits = strtoul(slash + 1, &end, 10);
		if (*end != '\0' || bits > max)
			return -1;
		c->bits = (unsigned int)bits;
	}
	return 0;
}

int ms_cidr_match(const struct ms_cidr *c, const char *addr)
{
	unsigned char a[16];
	unsigned int full = c->bits / 8, rest = c->bits % 8;

	if (inet_pton(c->family, addr, a) != 1)
		return 0;
	if (memcmp(a, c->addr, full) != 0)
		return 0;
	return rest == 0 ||
		((a[full] ^ c->addr[full]) & (0xff00 >> rest) & 0xff) == 0;
}

size_t ms_utf8_len(const unsigned char *s)
{
	size_t n = *s < 0x80 ? 1 : *s >= 0xc2 && *s <= 0xdf ? 2 :
		   *s >= 0xe0 && *s <= 0xef ? 3 : *s >= 0xf0 && *s <= 0xf4 ?
		   4 : 0;
	uint32_t cp = n == 1 ? *s : *s & (0x7f >> n);

	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

const char *ms_user_name_check(const char *name)
{
	for (const unsigned char *p = (const unsigned char *)name; *p != '\0';) {
		size_t n = ms_utf8_len(p);

		if (n == 0)
			return "not UTF-8";
		if (*p < 0x20 || *p == 0x7f)
			return "control characters";
		p += n;
	}
	return NULL;
}
