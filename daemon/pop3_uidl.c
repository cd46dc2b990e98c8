/* POP3 UIDLs across a move: formats, translation, the relay's rewriter.
 * See pop3_uidl.h and docs/gateway-spec.md ("POP3 UIDLs"). */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "pop3_uidl.h"

/* ---- formats ---- */

enum { T_END, T_LIT, T_UID, T_UIDV };

struct tok {
	int type;
	char c;				/* T_LIT */
	unsigned int width;		/* zero-padded to this many digits */
	int hex;
};

#define WIDTH_MAX 20
#define EXPAND_MAX 128

/* One token of fmt at *pp. 0, or -1 with *why_r. */
static int next_tok(const char **pp, struct tok *t, const char **why_r)
{
	const char *p = *pp;

	memset(t, 0, sizeof(*t));
	if (*p == '\0')
		return 0;
	if (*p != '%' || p[1] == '%') {
		t->type = T_LIT;
		t->c = *p;
		*pp = p + (*p == '%' ? 2 : 1);
		return 0;
	}
	p++;
	if (*p >= '1' && *p <= '9') {
		/* Dovecot truncates to a width without a leading 0. */
		*why_r = "a width without a leading 0 is not supported";
		return -1;
	}
	if (*p == '0') {
		for (p++; isdigit((unsigned char)*p); p++) {
			t->width = t->width * 10 + (unsigned int)(*p - '0');
			if (t->width > WIDTH_MAX) {
				*why_r = "width too large";
				return -1;
			}
		}
		if (t->width == 0) {
			*why_r = "a 0 width";
			return -1;
		}
	}
	if (*p == 'X') {
		t->hex = 1;
		p++;
	}
	if (*p == 'u' || *p == 'v') {
		t->type = *p == 'u' ? T_UID : T_UIDV;
		p++;
	} else if (strncmp(p, "{uid}", 5) == 0) {
		t->type = T_UID;
		p += 5;
	} else if (strncmp(p, "{uidvalidity}", 13) == 0) {
		t->type = T_UIDV;
		p += 13;
	} else {
		*why_r = "only %u, %v, %{uid}, %{uidvalidity} (with a 0N width "
			 "and X) and %% are supported";
		return -1;
	}
	*pp = p;
	return 0;
}

/* fmt applied to (uid, uidvalidity) into buf; with uid_tok, only up to the
 * first %u, which *uid_tok then describes (type T_END when there is
 * none). Returns the length, or -1. */
static int expand(const char *fmt, uint32_t uid, uint32_t uidvalidity,
		  char *buf, size_t size, struct tok *uid_tok)
{
	const char *why;
	size_t n = 0;
	struct tok t;

	if (uid_tok != NULL)
		memset(uid_tok, 0, sizeof(*uid_tok));
	if (size == 0)
		return -1;	/* not even room for the NUL */
	for (;;) {
		char num[32];
		int len;

		if (next_tok(&fmt, &t, &why) < 0)
			return -1;
		if (t.type == T_END)
			break;
		if (t.type == T_UID && uid_tok != NULL) {
			*uid_tok = t;
			break;
		}
		if (t.type == T_LIT) {
			num[0] = t.c;
			len = 1;
		} else {
			len = snprintf(num, sizeof(num), t.hex ? "%0*x" : "%0*u",
				       (int)t.width, t.type == T_UID ? uid :
				       uidvalidity);
		}
		if (n + (size_t)len >= size)
			return -1;
		memcpy(buf + n, num, (size_t)len);
		n += (size_t)len;
	}
	buf[n] = '\0';
	return (int)n;
}

int ms_uidl_format_check(const char *fmt, const char **why_r)
{
	char buf[EXPAND_MAX];
	const char *p = fmt;
	int uids = 0, len;
	struct tok t;

	do {
		if (next_tok(&p, &t, why_r) < 0)
			return -1;
		if (t.type == T_LIT && (t.c < 0x21 || t.c > 0x7e)) {
			*why_r = "a UIDL is printable ASCII without spaces";
			return -1;
		}
		uids += t.type == T_UID;
	} while (t.type != T_END);
	if (uids == 0) {
		*why_r = "the format must contain %u";
		return -1;
	}
	len = expand(fmt, UINT32_MAX, UINT32_MAX, buf, sizeof(buf), NULL);
	if (len < 0 || len > MS_UIDL_MAX) {
		*why_r = "its UIDLs can be longer than 70 characters";
		return -1;
	}
	return 0;
}

int ms_uidl_format(const char *fmt, uint32_t uid, uint32_t uidvalidity,
		   char *buf, size_t size)
{
	return expand(fmt, uid, uidvalidity, buf, size, NULL);
}

static int digit_value(char c, int hex)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (hex && c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int ms_uidl_parse(const char *fmt, uint32_t uidvalidity, const char *uidl,
		  uint32_t *uid_r)
{
	char prefix[EXPAND_MAX], again[EXPAND_MAX];
	size_t plen, ulen = strlen(uidl), maxd, l;
	struct tok ut;
	int n = expand(fmt, 0, uidvalidity, prefix, sizeof(prefix), &ut);

	if (n < 0 || ut.type != T_UID || ulen >= sizeof(again))
		return -1;
	plen = (size_t)n;
	if (strncmp(uidl, prefix, plen) != 0)
		return -1;
	/* Every length the UID's digits can have there; the one whose UID
	 * gives back exactly uidl wins (a UIDL names one UID at most: each
	 * number has one spelling under a format). */
	maxd = ut.hex ? 8 : 10;
	if (ut.width > maxd)
		maxd = ut.width;
	for (l = ut.width > 0 ? ut.width : 1; l <= maxd && plen + l <= ulen;
	     l++) {
		uint64_t v = 0;
		size_t i;

		for (i = 0; i < l; i++) {
			int d = digit_value(uidl[plen + i], ut.hex);

			if (d < 0)
				return -1;
			v = v * (ut.hex ? 16 : 10) + (uint64_t)d;
			if (v > UINT32_MAX)
				return -1;
		}
		if (v == 0)
			continue;
		n = expand(fmt, (uint32_t)v, uidvalidity, again, sizeof(again),
			   NULL);
		if (n >= 0 && (size_t)n == ulen && memcmp(again, uidl, ulen) == 0) {
			*uid_r = (uint32_t)v;
			return 0;
		}
	}
	return -1;
}

/* ---- translation ---- */

struct loading {
	struct ms_uidl_map *map;
	size_t cap_copied, cap_src, cap_uidls;
	int oom;
};

static int grow(void **p, size_t *cap, size_t n, size_t size)
{
	size_t c = *cap ? *cap * 2 : 64;
	void *q;

	if (n < *cap)
		return 0;
	q = realloc(*p, c * size);
	if (q == NULL)
		return -1;
	*p = q;
	*cap = c;
	return 0;
}

/* The UIDL's text into the pool: its offset, or SIZE_MAX when out of
 * memory. */
static size_t pool_add(struct ms_uidl_map *m, const char *uidl)
{
	size_t len = strlen(uidl) + 1, at = m->pool_len;

	while (m->pool_len + len > m->pool_cap) {
		size_t c = m->pool_cap ? m->pool_cap * 2 : 4096;
		char *p = realloc(m->pool, c);

		if (p == NULL)
			return SIZE_MAX;
		m->pool = p;
		m->pool_cap = c;
	}
	memcpy(m->pool + at, uidl, len);
	m->pool_len += len;
	return at;
}

/* One record: where translate() will look for it (the store's three
 * questions: the done record of a destination UID, a record of a source
 * UID, a record of a POP3 source's UIDL). */
static int load_rec(void *ctx, const struct ms_msg_rec *rec)
{
	struct loading *l = ctx;
	struct ms_uidl_map *m = l->map;
	size_t uidl = SIZE_MAX;

	if (rec->uidl[0] != '\0' && (uidl = pool_add(m, rec->uidl)) == SIZE_MAX)
		goto oom;
	if (rec->state == MS_MSG_DONE && rec->dst_uid != 0) {
		if (grow((void **)&m->copied, &l->cap_copied, m->ncopied,
			 sizeof(*m->copied)) < 0)
			goto oom;
		m->copied[m->ncopied++] = (struct ms_uidl_copied){
			rec->dst_uid, rec->src_uid, uidl };
	}
	if (rec->uidl[0] == '\0') {
		if (grow((void **)&m->src_uids, &l->cap_src, m->nsrc,
			 sizeof(*m->src_uids)) < 0)
			goto oom;
		m->src_uids[m->nsrc++] = rec->src_uid;
	} else if (rec->src_uid == 0) {
		if (grow((void **)&m->uidls, &l->cap_uidls, m->nuidls,
			 sizeof(*m->uidls)) < 0)
			goto oom;
		m->uidls[m->nuidls++] = uidl;
	}
	return 0;
oom:
	l->oom = 1;
	return -1;
}

static int cmp_copied(const void *a, const void *b)
{
	const struct ms_uidl_copied *x = a, *y = b;

	return x->dst_uid < y->dst_uid ? -1 : x->dst_uid > y->dst_uid;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static int cmp_uidl(const void *a, const void *b, void *pool)
{
	return strcmp((const char *)pool + *(const size_t *)a,
		      (const char *)pool + *(const size_t *)b);
}

void ms_uidl_map_clear(struct ms_uidl_map *m)
{
	free(m->copied);
	free(m->src_uids);
	free(m->uidls);
	free(m->pool);
	m->copied = NULL;
	m->src_uids = NULL;
	m->uidls = NULL;
	m->pool = NULL;
	m->ncopied = m->nsrc = m->nuidls = 0;
	m->pool_len = m->pool_cap = 0;
}

int ms_uidl_map_load(struct ms_uidl_map *map, struct ms_store *store,
		     int *oom_r)
{
	struct loading l = { .map = map };

	ms_uidl_map_clear(map);
	*oom_r = 0;
	if (ms_store_msg_foreach(store, map->folder_id, -1, load_rec,
				 &l) != 0) {
		*oom_r = l.oom;
		ms_uidl_map_clear(map);
		return -1;
	}
	/* (an empty array is NULL, which qsort() may not be given) */
	if (map->ncopied > 1)
		qsort(map->copied, map->ncopied, sizeof(*map->copied),
		      cmp_copied);
	if (map->nsrc > 1)
		qsort(map->src_uids, map->nsrc, sizeof(*map->src_uids),
		      cmp_u32);
	if (map->nuidls > 1)
		qsort_r(map->uidls, map->nuidls, sizeof(*map->uidls),
			cmp_uidl, map->pool);
	return 0;
}

static const struct ms_uidl_copied *find_copied(const struct ms_uidl_map *m,
						uint32_t dst_uid)
{
	struct ms_uidl_copied key = { dst_uid, 0, 0 };

	if (m->ncopied == 0)
		return NULL;
	return bsearch(&key, m->copied, m->ncopied, sizeof(*m->copied),
		       cmp_copied);
}

static int has_uidl(const struct ms_uidl_map *m, const char *uidl)
{
	size_t lo = 0, hi = m->nuidls;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(m->pool + m->uidls[mid], uidl);

		if (c == 0)
			return 1;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return 0;
}

int ms_uidl_translate(const struct ms_uidl_map *map, const char *uidl,
		      char *out, size_t outsz)
{
	const struct ms_uidl_copied *c;
	uint32_t uid;
	int found = 0;

	if (map->dst_uidvalidity != 0 &&
	    ms_uidl_parse(map->dst_format, map->dst_uidvalidity, uidl,
			  &uid) == 0 &&
	    (c = find_copied(map, uid)) != NULL) {
		const char *had = c->uidl != SIZE_MAX ? map->pool + c->uidl :
				  NULL;

		if (had != NULL && strlen(had) < outsz) {
			memcpy(out, had, strlen(had) + 1);
			return 1;
		}
		return c->src_uid != 0 && map->src_uidvalidity != 0 &&
		       ms_uidl_format(map->src_format, c->src_uid,
				      map->src_uidvalidity, out, outsz) > 0;
	}
	/* Not a message the mover copied: it keeps its UIDL, unless a copied
	 * message shows that one (equal UIDVALIDITYs, a POP3 source's UIDL
	 * that looks like ours): a client would take it for that message,
	 * which it has, and never fetch it. An IMAP source's row has its
	 * UIDVALIDITY, a POP3 source's none (its records have the UIDLs). */
	if (map->src_uidvalidity != 0)
		found = ms_uidl_parse(map->src_format, map->src_uidvalidity,
				      uidl, &uid) == 0 && map->nsrc > 0 &&
			bsearch(&uid, map->src_uids, map->nsrc,
				sizeof(*map->src_uids), cmp_u32) != NULL;
	else
		found = has_uidl(map, uidl);
	if (!found)
		return 0;
	return snprintf(out, outsz, "%s-d", uidl) < (int)outsz;
}

/* ---- the rewriter ---- */

enum {
	K_SINGLE,		/* a one-line answer */
	K_MULTI,		/* +OK and lines up to "." */
	K_UIDL_ONE,		/* UIDL n: "+OK n uidl" */
	K_UIDL_ALL,		/* UIDL: +OK, "n uidl" lines, "." */
};

enum { C_KW, C_SPACE, C_ARG };

void ms_pop3_rw_init(struct ms_pop3_rw *rw, ms_pop3_rw_map_fn *map,
		     void *ctx)
{
	memset(rw, 0, sizeof(*rw));
	rw->map = map;
	rw->ctx = ctx;
}

void ms_pop3_rw_clear(struct ms_pop3_rw *rw)
{
	free(rw->q);
	free(rw->buf);
	memset(rw, 0, sizeof(*rw));
}

size_t ms_pop3_rw_pending(const struct ms_pop3_rw *rw)
{
	return rw->qlen;
}

const char *ms_pop3_rw_gave_up(const struct ms_pop3_rw *rw)
{
	return rw->gave_up;
}

static void give_up(struct ms_pop3_rw *rw, const char *why)
{
	if (rw->gave_up == NULL)
		rw->gave_up = why;
	rw->buffering = 0;
}

static void push(struct ms_pop3_rw *rw, unsigned char kind)
{
	if (rw->qlen == rw->qcap) {
		size_t cap = rw->qcap ? rw->qcap * 2 : 16;
		unsigned char *q;

		if (rw->qlen >= MS_POP3_RW_PIPELINE_MAX) {
			give_up(rw, "too many commands outstanding");
			return;
		}
		if (cap > MS_POP3_RW_PIPELINE_MAX)
			cap = MS_POP3_RW_PIPELINE_MAX;
		q = malloc(cap);
		if (q == NULL) {
			give_up(rw, "out of memory");
			return;
		}
		/* the ring, unwrapped */
		for (size_t i = 0; i < rw->qlen; i++)
			q[i] = rw->q[(rw->qhead + i) % rw->qcap];
		free(rw->q);
		rw->q = q;
		rw->qcap = cap;
		rw->qhead = 0;
	}
	rw->q[(rw->qhead + rw->qlen) % rw->qcap] = kind;
	rw->qlen++;
}

static unsigned char front(const struct ms_pop3_rw *rw)
{
	return rw->q[rw->qhead];
}

/* The answer at the front of the queue ended. */
static void answer_done(struct ms_pop3_rw *rw)
{
	unsigned char kind = front(rw);

	rw->qhead = (rw->qhead + 1) % rw->qcap;
	rw->qlen--;
	rw->multi = 0;
	if (kind == K_UIDL_ONE || kind == K_UIDL_ALL) {
		free(rw->buf);
		rw->buf = NULL;
	}
}

static unsigned char classify(const struct ms_pop3_rw *rw)
{
	int arg = rw->cstate == C_ARG;

	if (rw->kwlen == 3 && memcmp(rw->kw, "TOP", 3) == 0)
		return K_MULTI;
	if (rw->kwlen != 4)
		return K_SINGLE;
	if (memcmp(rw->kw, "UIDL", 4) == 0)
		return arg ? K_UIDL_ONE : K_UIDL_ALL;
	if (memcmp(rw->kw, "RETR", 4) == 0 || memcmp(rw->kw, "CAPA", 4) == 0)
		return K_MULTI;
	if (memcmp(rw->kw, "LIST", 4) == 0 || memcmp(rw->kw, "LANG", 4) == 0)
		return arg ? K_SINGLE : K_MULTI;
	return K_SINGLE;
}

void ms_pop3_rw_client(struct ms_pop3_rw *rw, const char *data, size_t len)
{
	for (size_t i = 0; i < len && rw->gave_up == NULL; i++) {
		char c = data[i];

		if (c == '\n') {
			/* Dovecot answers every line, an empty one too. */
			push(rw, classify(rw));
			rw->kwlen = 0;
			rw->cstate = C_KW;
			continue;
		}
		if (c == '\r')
			continue;
		if (rw->cstate == C_KW) {
			if (c == ' ')
				rw->cstate = C_SPACE;
			else if (rw->kwlen < sizeof(rw->kw))
				rw->kw[rw->kwlen++] =
					(char)toupper((unsigned char)c);
			else
				rw->kwlen = sizeof(rw->kw) + 1;
		} else if (rw->cstate == C_SPACE && c != ' ') {
			rw->cstate = C_ARG;
		}
	}
}

static int is_dot_line(const char *line, size_t len)
{
	return (len == 3 && memcmp(line, ".\r\n", 3) == 0) ||
	       (len == 2 && memcmp(line, ".\n", 2) == 0);
}

/* "n uidl..." from line + skip: out() with the UIDL mapped, or as it is
 * when it does not parse or map() keeps it. */
static int rewrite(struct ms_pop3_rw *rw, const char *line, size_t len,
		   size_t skip, ms_pop3_rw_out_fn *out, void *octx)
{
	char uidl[MS_UIDL_MAX + 1], to[MS_UIDL_MAX + 8];
	char res[MS_POP3_RW_LINE_MAX + sizeof(to)];
	const char *p = line + skip, *end = line + len, *u;
	size_t ulen, tlen;
	int r;

	while (p < end && isdigit((unsigned char)*p))
		p++;
	if (p == line + skip || p == end || *p != ' ')
		return out(octx, line, len);
	u = ++p;
	while (p < end && *p > ' ' && *p < 0x7f)
		p++;
	ulen = (size_t)(p - u);
	if (ulen == 0 || ulen > MS_UIDL_MAX)
		return out(octx, line, len);
	memcpy(uidl, u, ulen);
	uidl[ulen] = '\0';
	r = rw->map(rw->ctx, uidl, to, sizeof(to));
	if (r <= 0)
		return r < 0 ? -1 : out(octx, line, len);
	tlen = strlen(to);
	memcpy(res, line, (size_t)(u - line));
	memcpy(res + (u - line), to, tlen);
	memcpy(res + (u - line) + tlen, p, (size_t)(end - p));
	return out(octx, res, (size_t)(u - line) + tlen + (size_t)(end - p));
}

/* A whole line of an answer to UIDL in rw->buf. */
static int buffered_line(struct ms_pop3_rw *rw, ms_pop3_rw_out_fn *out,
			 void *octx)
{
	const char *l = rw->buf;
	size_t n = rw->buflen;
	int r;

	if (rw->multi) {
		if (is_dot_line(l, n)) {
			r = out(octx, l, n);
			answer_done(rw);
			return r;
		}
		return rewrite(rw, l, n, 0, out, octx);
	}
	/* the status line of UIDL n */
	if (n >= 4 && memcmp(l, "+OK ", 4) == 0)
		r = rewrite(rw, l, n, 4, out, octx);
	else
		r = out(octx, l, n);
	if ((n < 4 || memcmp(l, "+OK ", 4) != 0) &&
	    (n < 4 || memcmp(l, "-ERR", 4) != 0))
		give_up(rw, "an answer that is neither +OK nor -ERR");
	else
		answer_done(rw);
	return r;
}

/* A line that passed through (its first bytes in rw->head) ended. */
static void line_done(struct ms_pop3_rw *rw)
{
	unsigned char kind;

	if (rw->multi) {
		if (is_dot_line(rw->head, rw->linelen))
			answer_done(rw);
		return;
	}
	if (rw->qlen == 0) {
		give_up(rw, "a line from the server that no command asked for");
		return;
	}
	kind = front(rw);
	if (rw->linelen >= 3 && memcmp(rw->head, "+OK", 3) == 0) {
		if (kind == K_MULTI || kind == K_UIDL_ALL)
			rw->multi = 1;
		else
			answer_done(rw);
	} else if (rw->linelen >= 4 && memcmp(rw->head, "-ERR", 4) == 0) {
		answer_done(rw);
	} else {
		give_up(rw, "an answer that is neither +OK nor -ERR");
	}
}

/* Does the line starting now go into the buffer? */
static int wants_buffer(const struct ms_pop3_rw *rw)
{
	if (rw->qlen == 0)
		return 0;
	return rw->multi ? front(rw) == K_UIDL_ALL : front(rw) == K_UIDL_ONE;
}

int ms_pop3_rw_server(struct ms_pop3_rw *rw, const char *data, size_t len,
		      ms_pop3_rw_out_fn *out, void *octx)
{
	const char *p = data, *end = data + len, *span = data;

	while (p < end && rw->gave_up == NULL) {
		const char *lf;
		size_t n;

		if (rw->linelen == 0 && !rw->buffering && wants_buffer(rw)) {
			if (p > span && out(octx, span, (size_t)(p - span)) < 0)
				return -1;
			span = p;
			if (rw->buf == NULL &&
			    (rw->buf = malloc(MS_POP3_RW_LINE_MAX)) == NULL) {
				give_up(rw, "out of memory");
				break;
			}
			rw->buffering = 1;
			rw->buflen = 0;
		}
		lf = memchr(p, '\n', (size_t)(end - p));
		n = lf != NULL ? (size_t)(lf + 1 - p) : (size_t)(end - p);
		if (rw->buffering) {
			if (rw->buflen + n > MS_POP3_RW_LINE_MAX) {
				/* what was held goes on as it is */
				if (rw->buflen > 0 &&
				    out(octx, rw->buf, rw->buflen) < 0)
					return -1;
				give_up(rw, "a line longer than the bound");
				break;
			}
			memcpy(rw->buf + rw->buflen, p, n);
			rw->buflen += n;
			p += n;
			span = p;
			if (lf != NULL) {
				rw->buffering = 0;
				if (buffered_line(rw, out, octx) < 0)
					return -1;
			}
			continue;
		}
		for (size_t i = 0; rw->linelen + i < sizeof(rw->head) && i < n;
		     i++)
			rw->head[rw->linelen + i] = p[i];
		rw->linelen += n;
		p += n;
		if (lf != NULL) {
			line_done(rw);
			rw->linelen = 0;
		}
	}
	if (end > span && out(octx, span, (size_t)(end - span)) < 0)
		return -1;
	return 0;
}
