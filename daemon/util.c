#include <stdlib.h>
#include <string.h>

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

int ms_u32vec_push(struct ms_u32vec *vec, uint32_t x)
{
	if (vec->n == vec->cap) {
		size_t cap = vec->cap * 2 + 256;
		uint32_t *v = realloc(vec->v, cap * sizeof(*v));

		if (v == NULL)
			return -1;
		vec->v = v;
		vec->cap = cap;
	}
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
