/* Mailbox names (modified UTF-7, hierarchy separators), IMAP date-time
 * parsing and flag list normalisation. See mailbox.h for the contracts. */
#include "mailbox.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>

/* RFC 3501 5.1.3: RFC 2045 base64 with ',' in place of '/'. */
static const char mb64_chars[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

static int mb64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == ',')
		return 63;
	return -1;
}

/* Only these octets may stand for themselves in mUTF-7; everything else
 * (controls, DEL, non-ASCII) has to go through base64. */
static bool is_direct(uint32_t c)
{
	return c >= 0x20 && c <= 0x7e;
}

static size_t put_utf8(char *dst, uint32_t cp)
{
	unsigned char *d = (unsigned char *)dst;

	if (cp < 0x80) {
		d[0] = cp;
		return 1;
	}
	if (cp < 0x800) {
		d[0] = 0xc0 | (cp >> 6);
		d[1] = 0x80 | (cp & 0x3f);
		return 2;
	}
	if (cp < 0x10000) {
		d[0] = 0xe0 | (cp >> 12);
		d[1] = 0x80 | ((cp >> 6) & 0x3f);
		d[2] = 0x80 | (cp & 0x3f);
		return 3;
	}
	d[0] = 0xf0 | (cp >> 18);
	d[1] = 0x80 | ((cp >> 12) & 0x3f);
	d[2] = 0x80 | ((cp >> 6) & 0x3f);
	d[3] = 0x80 | (cp & 0x3f);
	return 4;
}

/*
 * Decodes (or, with dst == NULL, only validates) mUTF-7. Returns the UTF-8
 * length written, or -1. Anything that has a second spelling is refused, so
 * that a name we accept maps to exactly one UTF-8 string and back: two
 * folders that differ only in their encoding would otherwise collide at the
 * destination.
 */
static ssize_t mutf7_decode(const char *src, char *dst)
{
	const unsigned char *p = (const unsigned char *)src;
	size_t n = 0;

	while (*p != '\0') {
		uint32_t bits = 0, high = 0;
		int nbits = 0;

		if (*p != '&') {
			if (!is_direct(*p))
				return -1;
			if (dst)
				dst[n] = *p;
			n++;
			p++;
			continue;
		}
		p++;
		if (*p == '-') {
			if (dst)
				dst[n] = '&';
			n++;
			p++;
			continue;
		}

		/* A base64 run of UTF-16BE units, up to the mandatory '-'. The
		 * terminating NUL is not a base64 character, so an unterminated
		 * run fails here too. */
		while (*p != '-') {
			int v = mb64_value(*p);
			uint32_t u, cp;

			if (v < 0)
				return -1;
			p++;
			bits = (bits << 6) | (uint32_t)v;
			nbits += 6;
			if (nbits < 16)
				continue;
			nbits -= 16;
			u = (bits >> nbits) & 0xffff;
			bits &= (1u << nbits) - 1;

			if (high != 0) {
				if (u < 0xdc00 || u > 0xdfff)
					return -1;
				cp = 0x10000 + ((high - 0xd800) << 10) +
				     (u - 0xdc00);
				high = 0;
			} else if (u >= 0xd800 && u <= 0xdbff) {
				high = u;
				continue;
			} else if (u >= 0xdc00 && u <= 0xdfff) {
				return -1;
			} else if (is_direct(u) || u == 0) {
				/* printable ASCII must be written as itself;
				 * NUL cannot be a C string's content */
				return -1;
			} else {
				cp = u;
			}
			if (dst)
				n += put_utf8(dst + n, cp);
			else
				n += cp < 0x80 ? 1 : cp < 0x800 ? 2 :
				     cp < 0x10000 ? 3 : 4;
		}
		p++;
		/* A dangling high surrogate, a whole spare base64 character or
		 * non-zero padding bits all mean a non-canonical encoding. */
		if (high != 0 || nbits >= 6 || bits != 0)
			return -1;
		/* "&AGE-&AGE-" must have been one run; "&...-&-" is fine. */
		if (p[0] == '&' && p[1] != '-')
			return -1;
	}
	if (dst)
		dst[n] = '\0';
	return n;
}

char *ms_mutf7_to_utf8(const char *mutf7)
{
	ssize_t len;
	char *out;

	if (mutf7 == NULL)
		return NULL;
	len = mutf7_decode(mutf7, NULL);
	if (len < 0)
		return NULL;
	out = malloc(len + 1);
	if (out == NULL)
		return NULL;
	mutf7_decode(mutf7, out);
	return out;
}

int ms_mutf7_is_valid(const char *mutf7)
{
	return mutf7 != NULL && mutf7_decode(mutf7, NULL) >= 0;
}

/* Strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF, no
 * stray or missing continuation bytes. Advances *pp; returns -1 on error. */
static int utf8_next(const unsigned char **pp, uint32_t *cp_r)
{
	const unsigned char *p = *pp;
	uint32_t cp, min;
	int more, i;

	if (p[0] < 0x80) {
		*cp_r = p[0];
		*pp = p + 1;
		return 0;
	} else if (p[0] >= 0xc2 && p[0] <= 0xdf) {
		cp = p[0] & 0x1f;
		more = 1;
		min = 0x80;
	} else if (p[0] >= 0xe0 && p[0] <= 0xef) {
		cp = p[0] & 0x0f;
		more = 2;
		min = 0x800;
	} else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
		cp = p[0] & 0x07;
		more = 3;
		min = 0x10000;
	} else {
		return -1;
	}
	for (i = 1; i <= more; i++) {
		/* also stops at the NUL of a truncated sequence */
		if ((p[i] & 0xc0) != 0x80)
			return -1;
		cp = (cp << 6) | (p[i] & 0x3f);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return -1;
	*cp_r = cp;
	*pp = p + 1 + more;
	return 0;
}

struct mb64_enc {
	char *out;
	size_t n;
	uint32_t bits;
	int nbits;
};

static void mb64_put16(struct mb64_enc *e, uint32_t u)
{
	e->bits = (e->bits << 16) | u;
	e->nbits += 16;
	while (e->nbits >= 6) {
		e->nbits -= 6;
		e->out[e->n++] = mb64_chars[(e->bits >> e->nbits) & 0x3f];
	}
	e->bits &= (1u << e->nbits) - 1;
}

static void mb64_close(struct mb64_enc *e)
{
	if (e->nbits > 0)
		e->out[e->n++] = mb64_chars[(e->bits << (6 - e->nbits)) & 0x3f];
	e->bits = 0;
	e->nbits = 0;
	e->out[e->n++] = '-';
}

char *ms_utf8_to_mutf7(const char *utf8)
{
	const unsigned char *p = (const unsigned char *)utf8;
	struct mb64_enc e = { 0 };
	bool in_run = false;
	size_t len;

	if (utf8 == NULL)
		return NULL;
	len = strlen(utf8);
	/* Worst case is a lone control character between printable ones:
	 * 1 byte in, "&AAE-" (5 bytes) out. */
	if (len > (SIZE_MAX - 1) / 5)
		return NULL;
	e.out = malloc(len * 5 + 1);
	if (e.out == NULL)
		return NULL;

	while (*p != '\0') {
		uint32_t cp;

		if (utf8_next(&p, &cp) < 0) {
			free(e.out);
			return NULL;
		}
		if (is_direct(cp)) {
			if (in_run) {
				mb64_close(&e);
				in_run = false;
			}
			e.out[e.n++] = cp;
			if (cp == '&')
				e.out[e.n++] = '-';
			continue;
		}
		/* Consecutive non-direct characters share one run: the
		 * decoder refuses two adjacent runs as non-canonical. */
		if (!in_run) {
			e.out[e.n++] = '&';
			in_run = true;
		}
		if (cp >= 0x10000) {
			cp -= 0x10000;
			mb64_put16(&e, 0xd800 | (cp >> 10));
			mb64_put16(&e, 0xdc00 | (cp & 0x3ff));
		} else {
			mb64_put16(&e, cp);
		}
	}
	if (in_run)
		mb64_close(&e);
	e.out[e.n] = '\0';
	return e.out;
}

char *ms_mailbox_translate(const char *name, char src_sep, char dst_sep)
{
	static const char hex[] = "0123456789ABCDEF";
	const char *p = name;
	bool first = true;
	size_t len, n = 0;
	char *out;

	if (name == NULL)
		return NULL;
	len = strlen(name);
	/* worst case: every byte escaped to "%XX" */
	if (len > (SIZE_MAX - 1) / 3)
		return NULL;
	out = malloc(len * 3 + 1);
	if (out == NULL)
		return NULL;

	for (;;) {
		const char *end = src_sep ? strchr(p, src_sep) : NULL;
		size_t clen;

		if (end == NULL)
			end = p + strlen(p);
		clen = end - p;

		if (!first)
			/* a flat destination has no level breaks to write,
			 * so the name keeps its own separators */
			out[n++] = dst_sep ? dst_sep : src_sep;

		if (first && clen == 5 && strncasecmp(p, "INBOX", 5) == 0) {
			/* INBOX is case-insensitive (RFC 3501 5.1), and so
			 * is it as the parent of "INBOX.Sent"; servers only
			 * agree on the upper-case spelling. */
			memcpy(out + n, "INBOX", 5);
			n += 5;
		} else if (dst_sep && memchr(p, dst_sep, clen)) {
			/* The component would read as several levels at the
			 * destination: escape it. '%' is escaped too so the
			 * mapping stays reversible. */
			const char *q;

			for (q = p; q < end; q++) {
				if (*q == dst_sep || *q == '%') {
					unsigned char c = *q;

					out[n++] = '%';
					out[n++] = hex[c >> 4];
					out[n++] = hex[c & 0xf];
				} else {
					out[n++] = *q;
				}
			}
		} else {
			memcpy(out + n, p, clen);
			n += clen;
		}
		if (*end == '\0')
			break;
		p = end + 1;
		first = false;
	}
	out[n] = '\0';
	return out;
}

/* Reads exactly ndigits ASCII digits (not isdigit(): locale-independent). */
static int read_digits(const char **pp, int ndigits, int *v_r)
{
	const char *p = *pp;
	int i, v = 0;

	for (i = 0; i < ndigits; i++) {
		if (p[i] < '0' || p[i] > '9')
			return -1;
		v = v * 10 + (p[i] - '0');
	}
	*pp = p + ndigits;
	*v_r = v;
	return 0;
}

static bool is_leap(int y)
{
	return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
 * days_from_civil): no mktime(), so no dependency on TZ or on time_t's
 * range below 1970. */
static int64_t days_from_civil(int64_t y, int m, int d)
{
	int64_t era, yoe, doy, doe;

	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = y - era * 400;
	doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

int ms_imap_date_parse(const char *s, int64_t *epoch_r)
{
	static const char months[12][4] = {
		"Jan", "Feb", "Mar", "Apr", "May", "Jun",
		"Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
	};
	static const int mdays[12] = {
		31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31,
	};
	int day, mon, year, hh, mm, ss, zh, zm, sign, maxday;
	const char *p = s;

	if (s == NULL)
		return -1;
	/* date-day-fixed is " 1" or "01"; a bare "1" is accepted too since
	 * some servers trim the padding. */
	if (p[0] == ' ')
		p++;
	if (read_digits(&p, 1, &day) < 0)
		return -1;
	if (*p >= '0' && *p <= '9') {
		if (s[0] == ' ')
			return -1;
		day = day * 10 + (*p++ - '0');
	}
	if (*p++ != '-')
		return -1;
	for (mon = 0; mon < 12; mon++) {
		/* ABNF literals are case-insensitive */
		if (strncasecmp(p, months[mon], 3) == 0)
			break;
	}
	if (mon == 12)
		return -1;
	p += 3;
	if (*p++ != '-' || read_digits(&p, 4, &year) < 0 || *p++ != ' ')
		return -1;
	if (read_digits(&p, 2, &hh) < 0 || *p++ != ':' ||
	    read_digits(&p, 2, &mm) < 0 || *p++ != ':' ||
	    read_digits(&p, 2, &ss) < 0 || *p++ != ' ')
		return -1;
	if (*p == '+')
		sign = 1;
	else if (*p == '-')
		sign = -1;
	else
		return -1;
	p++;
	if (read_digits(&p, 2, &zh) < 0 || read_digits(&p, 2, &zm) < 0 ||
	    *p != '\0')
		return -1;

	maxday = mdays[mon] + (mon == 1 && is_leap(year));
	/* ss == 60 is a leap second; it simply counts as the next minute */
	if (day < 1 || day > maxday || hh > 23 || mm > 59 || ss > 60 ||
	    zh > 23 || zm > 59)
		return -1;

	*epoch_r = days_from_civil(year, mon + 1, day) * 86400 +
		   hh * 3600 + mm * 60 + ss -
		   sign * (zh * 3600 + zm * 60);
	return 0;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int ms_flags_normalize(const char *flags, char *out, size_t outsz)
{
	static const char *const sysflags[] = {
		"\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen",
	};
	char *copy, *tok, *save = NULL, **v;
	size_t i, j, ntok = 0, n = 0, len;
	int ret = 0;

	if (flags == NULL)
		flags = "";
	if (outsz == 0)
		return -1;
	len = strlen(flags);
	copy = strdup(flags);
	/* at most one flag per two bytes ("a b c") */
	v = malloc((len / 2 + 1) * sizeof(*v));
	if (copy == NULL || v == NULL) {
		free(copy);
		free(v);
		return -1;
	}

	for (tok = strtok_r(copy, " ", &save); tok != NULL;
	     tok = strtok_r(NULL, " ", &save)) {
		if (strcasecmp(tok, "\\Recent") == 0)
			continue;
		/* one spelling per system flag, so that duplicates compare
		 * equal and the list compares byte for byte across servers */
		for (i = 0; i < sizeof(sysflags) / sizeof(sysflags[0]); i++) {
			if (strcasecmp(tok, sysflags[i]) == 0) {
				memcpy(tok, sysflags[i], strlen(tok));
				break;
			}
		}
		v[ntok++] = tok;
	}
	qsort(v, ntok, sizeof(*v), cmp_str);

	for (i = 0; i < ntok; i++) {
		if (i > 0 && strcmp(v[i], v[i - 1]) == 0)
			continue;
		len = strlen(v[i]);
		j = n > 0 ? 1 : 0;
		if (n + j + len + 1 > outsz) {
			ret = -1;
			break;
		}
		if (j)
			out[n++] = ' ';
		memcpy(out + n, v[i], len);
		n += len;
	}
	out[ret < 0 ? 0 : n] = '\0';
	free(copy);
	free(v);
	return ret;
}
