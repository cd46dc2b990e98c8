/* Small shared pieces: secrets, SASL PLAIN, growable UID arrays. */
#ifndef MS_UTIL_H
#define MS_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* A macro's value as a string literal: MS_STR(255) is "255". */
#define MS_XSTR(x) #x
#define MS_STR(x) MS_XSTR(x)

/* Wipes and frees a NUL-terminated secret; sets *s to NULL. */
void ms_secret_free(char **s);
/* Wipes the size bytes of *buf (a buffer that may hold a password), frees
 * it, sets *buf to NULL. Accepts *buf == NULL. */
void ms_secret_buf_free(char **buf, size_t size);

/* Makes *buf (of *cap bytes, the first used of them in use) hold at least
 * need bytes, at most max: grown by doubling from min; the old buffer is
 * wiped before it is freed (it may hold a password). 0, or -1 (over max,
 * or no memory: *buf unchanged). */
int ms_secret_reserve(char **buf, size_t *cap, size_t used, size_t need,
		      size_t min, size_t max);

/* Formats into buf (size bytes) when the text fits, else into a malloc'd
 * buffer, never cut: *text_r is buf or that buffer (the caller frees it
 * when it is not buf). Returns the text's length, or -1 for a format
 * vsnprintf refuses, -2 when out of memory. */
int ms_vformat(char *buf, size_t size, char **text_r, const char *fmt,
	       va_list ap);

/* The SASL PLAIN (RFC 4616) initial response, base64 of
 * "authzid NUL authcid NUL password". Returns a malloc'd string the caller
 * releases with ms_secret_free(), or NULL when out of memory. */
char *ms_sasl_plain(const char *authzid, const char *authcid,
		    const char *password);

/* Decodes base64 (strict alphabet, padded) into a malloc'd, NUL-terminated
 * buffer. Returns 0, or -1 for bad input or no memory. */
int ms_b64_decode(const char *in, unsigned char **out_r, size_t *len_r);

/* Splits a SASL PLAIN response (base64 of "authzid NUL authcid NUL
 * password", RFC 4616) into three malloc'd strings the caller releases with
 * ms_secret_free(). Returns 0, or -1 when malformed. */
int ms_sasl_plain_parse(const char *b64, char **authz_r, char **authc_r,
			char **pass_r);

/* Makes room for one more element in the array v of cap elements, n of
 * them in use: when it is full, grows it to cap * 2 + min elements. 0, or
 * -1 when out of memory (v and cap unchanged). v and cap are lvalues,
 * evaluated more than once. */
#define MS_ARRAY_ROOM(v, n, cap, min) ({				\
	int ret__ = 0;							\
	if ((n) >= (cap)) {						\
		__typeof__(cap) c__ = (cap) * 2 + (min);		\
		__typeof__(v) v__ = realloc((v), c__ * sizeof(*(v)));	\
									\
		if (v__ != NULL) {					\
			(v) = v__;					\
			(cap) = c__;					\
		} else {						\
			ret__ = -1;					\
		}							\
	}								\
	ret__;								\
})

/* An object its owner may free from inside the object's own callbacks
 * (imapc.c, pop3c.c): the free waits until the outermost of them has
 * returned. */
struct ms_busy {
	int depth;		/* inside this many of its callbacks */
	int free_pending;	/* its owner freed it meanwhile */
};

/* Into one of the object's callbacks. */
static inline void ms_busy_enter(struct ms_busy *b)
{
	b->depth++;
}

/* Out of it again: free_fn(obj) now when the owner freed the object from
 * inside and this was the outermost. */
void ms_busy_leave(struct ms_busy *b, void (*free_fn)(void *obj), void *obj);
/* The owner frees the object: 1 when the free must wait for
 * ms_busy_leave(), 0 when it may be freed now. */
int ms_busy_defer(struct ms_busy *b);

/* Appends node to the singly linked list (through ->next) from head to
 * tail. */
#define MS_LIST_APPEND(head, tail, node)			\
	do {							\
		if ((tail) != NULL)				\
			(tail)->next = (node);			\
		else						\
			(head) = (node);			\
		(tail) = (node);				\
	} while (0)

struct ms_u32vec {
	uint32_t *v;
	size_t n, cap;
};

int ms_u32vec_push(struct ms_u32vec *vec, uint32_t x);	/* 0 or -1 */
void ms_u32vec_sort(struct ms_u32vec *vec);
/* 1 when x is in the (sorted) vector. */
int ms_u32vec_has(const struct ms_u32vec *vec, uint32_t x);
void ms_u32vec_free(struct ms_u32vec *vec);

/* An address range, "192.0.2.0/24" or "2001:db8::/32" (a bare address is
 * a /32 or /128). */
struct ms_cidr {
	int family;			/* AF_INET or AF_INET6 */
	unsigned char addr[16];
	unsigned int bits;
};

/* Parses one range. Returns 0, or -1 when it is not one. */
int ms_cidr_parse(const char *s, struct ms_cidr *c);
/* 1 when the numeric address addr ("192.0.2.7", "::1") is in c. */
int ms_cidr_match(const struct ms_cidr *c, const char *addr);

/* Length of the valid UTF-8 sequence at s (strict, as jansson checks it:
 * no overlong form, no surrogate, nothing above U+10FFFF), 0 when it is
 * not one. */
size_t ms_utf8_len(const unsigned char *s);

/* Whether a login name may be passed on: valid UTF-8 and no control
 * bytes (they could only be an attack on logs and servers). NULL, or
 * why not. */
const char *ms_user_name_check(const char *name);

/* This machine's name (gethostname), "mailshift" when it has none. */
const char *ms_host_name(void);

/* The hash of a string for the daemon's tables (djb2: h * 33 + c). */
unsigned int ms_str_hash(const char *s);

#endif
