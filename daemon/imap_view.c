/* The IMAP view of a moved user: a folder's UID map and the relay's
 * rewriter, both ways (imap_view.h, docs/gateway-spec.md "The IMAP view").
 *
 * The rewriter reads each direction as fragments: a line up to its CRLF,
 * where a line ending in a literal's {n} goes on after the literal's n
 * bytes, which pass through untouched. Only fragments are rewritten, token
 * by token; what it does not know passes on as it came.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imap_view.h"

/* ---- buffers ---- */

int ms_vbuf_add(struct ms_vbuf *b, const char *data, size_t len)
{
	if (b->len + len + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		char *p;

		while (cap < b->len + len + 1)
			cap *= 2;
		p = realloc(b->p, cap);
		if (p == NULL)
			return -1;
		b->p = p;
		b->cap = cap;
	}
	if (len > 0)
		memcpy(b->p + b->len, data, len);
	b->len += len;
	b->p[b->len] = '\0';
	return 0;
}

static int vbuf_str(struct ms_vbuf *b, const char *s)
{
	return ms_vbuf_add(b, s, strlen(s));
}

static int vbuf_u32(struct ms_vbuf *b, uint32_t n)
{
	char num[16];

	snprintf(num, sizeof(num), "%u", n);
	return vbuf_str(b, num);
}

void ms_vbuf_free(struct ms_vbuf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

/* ---- a folder's map ---- */

static int by_src_cmp(const void *a, const void *b)
{
	const struct ms_view_pair *x = a, *y = b;

	return x->src < y->src ? -1 : x->src > y->src;
}

static int by_dst_cmp(const void *a, const void *b)
{
	const struct ms_view_pair *x = a, *y = b;

	return x->dst < y->dst ? -1 : x->dst > y->dst;
}

int ms_view_map_init(struct ms_view_map *map, struct ms_view_pair *pairs,
		     size_t n, uint32_t src_uidvalidity,
		     uint32_t dst_uidvalidity, uint32_t src_uidnext)
{
	memset(map, 0, sizeof(*map));
	map->src_uidvalidity = src_uidvalidity;
	map->dst_uidvalidity = dst_uidvalidity;
	map->by_src = map->by_dst = pairs;
	map->n = n;
	map->monotone = 1;
	if (n > 0)
		qsort(pairs, n, sizeof(*pairs), by_src_cmp);
	for (size_t i = 0; i < n; i++) {
		if (pairs[i].dst > map->max_dst)
			map->max_dst = pairs[i].dst;
		if (i > 0 && pairs[i].dst <= pairs[i - 1].dst)
			map->monotone = 0;
	}
	map->base = n > 0 ? pairs[n - 1].src : 0;
	if (src_uidnext > 0 && src_uidnext - 1 > map->base)
		map->base = src_uidnext - 1;
	if (!map->monotone) {
		/* Not what the mover writes; kept exact, at a cost. */
		map->by_dst = malloc(n * sizeof(*pairs));
		if (map->by_dst == NULL)
			return -1;
		memcpy(map->by_dst, pairs, n * sizeof(*pairs));
		qsort(map->by_dst, n, sizeof(*pairs), by_dst_cmp);
	}
	return 0;
}

void ms_view_map_clear(struct ms_view_map *map)
{
	if (map->by_dst != map->by_src)
		free(map->by_dst);
	free(map->by_src);
	memset(map, 0, sizeof(*map));
}

/* The first index of a whose key is >= k (key: src or dst). */
static size_t lower(const struct ms_view_pair *a, size_t n, uint32_t k,
		    int dst)
{
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if ((dst ? a[mid].dst : a[mid].src) < k)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static uint32_t above(const struct ms_view_map *map, uint64_t d)
{
	uint64_t v = (uint64_t)map->base + d;

	return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

uint32_t ms_view_uid(const struct ms_view_map *map, uint32_t d)
{
	size_t i;

	if (d == 0)
		return 0;
	i = lower(map->by_dst, map->n, d, 1);
	if (i < map->n && map->by_dst[i].dst == d)
		return map->by_dst[i].src;
	return above(map, d);
}

uint32_t ms_view_uidnext(const struct ms_view_map *map, uint32_t dst_next)
{
	return above(map, dst_next > map->max_dst ? dst_next :
		     map->max_dst + 1);
}

/* ---- sets ---- */

struct set_out {
	struct ms_vbuf *b;
	int any;
	uint32_t run_lo, run_hi;	/* values written one by one: a run */
	int in_run;
};

static int set_flush(struct set_out *o)
{
	int r = 0;

	if (!o->in_run)
		return 0;
	o->in_run = 0;
	if (o->any)
		r |= ms_vbuf_add(o->b, ",", 1);
	o->any = 1;
	r |= vbuf_u32(o->b, o->run_lo);
	if (o->run_hi != o->run_lo)
		r |= ms_vbuf_add(o->b, ":", 1) | vbuf_u32(o->b, o->run_hi);
	return r;
}

/* One value, merged into the run when it follows it. */
static int set_one(struct set_out *o, uint32_t v)
{
	if (o->in_run && o->run_hi != UINT32_MAX && v == o->run_hi + 1) {
		o->run_hi = v;
		return 0;
	}
	if (set_flush(o) < 0)
		return -1;
	o->in_run = 1;
	o->run_lo = o->run_hi = v;
	return 0;
}

/* A range lo:hi (hi may be "*": star). */
static int set_range(struct set_out *o, uint32_t lo, uint32_t hi, int star)
{
	int r;

	if (!star && lo == hi)
		return set_one(o, lo);
	if (set_flush(o) < 0)
		return -1;
	r = o->any ? ms_vbuf_add(o->b, ",", 1) : 0;
	o->any = 1;
	if (star && lo == 0)		/* "*" alone */
		return r | ms_vbuf_add(o->b, "*", 1);
	r |= vbuf_u32(o->b, lo) | ms_vbuf_add(o->b, ":", 1);
	return r | (star ? ms_vbuf_add(o->b, "*", 1) : vbuf_u32(o->b, hi));
}

/* Reads one number or "*" (UINT32_MAX + 1 as *star). */
static int set_num(const char **p, const char *end, uint32_t *n, int *star)
{
	uint64_t v = 0;

	*star = 0;
	if (*p < end && **p == '*') {
		(*p)++;
		*star = 1;
		return 0;
	}
	if (*p >= end || **p < '1' || **p > '9')
		return -1;
	while (*p < end && **p >= '0' && **p <= '9') {
		v = v * 10 + (uint64_t)(**p - '0');
		if (v > UINT32_MAX)
			return -1;
		(*p)++;
	}
	*n = (uint32_t)v;
	return 0;
}

/* Parses a sequence set into its ranges (a lone number: lo == hi; "*":
 * the star flags); -1 when it is none. */
struct range { uint32_t lo, hi; int lo_star, hi_star; };

static int set_parse(const char *set, size_t len, struct range **r_out,
		     size_t *n_out)
{
	const char *p = set, *end = set + len;
	struct range *r = NULL;
	size_t n = 0, cap = 0;

	if (len == 0)
		return -1;
	while (p < end) {
		struct range x = { 0 };

		if (set_num(&p, end, &x.lo, &x.lo_star) < 0)
			goto bad;
		x.hi = x.lo;
		x.hi_star = x.lo_star;
		if (p < end && *p == ':') {
			p++;
			if (set_num(&p, end, &x.hi, &x.hi_star) < 0)
				goto bad;
		}
		if (p < end && *p++ != ',')
			goto bad;
		if (p == end && p[-1] == ',')
			goto bad;
		if (n == cap) {
			struct range *nr;

			cap = cap ? cap * 2 : 8;
			nr = realloc(r, cap * sizeof(*r));
			if (nr == NULL)
				goto bad;
			r = nr;
		}
		r[n++] = x;
	}
	*r_out = r;
	*n_out = n;
	return 0;
bad:
	free(r);
	return -1;
}

/* View UID v to the destination's: 0 when no message has it. */
static uint32_t view_to_dst(const struct ms_view_map *map, uint32_t v)
{
	size_t i;

	if (v <= map->base) {
		i = lower(map->by_src, map->n, v, 0);
		return i < map->n && map->by_src[i].src == v ?
		       map->by_src[i].dst : 0;
	}
	v -= map->base;
	i = lower(map->by_dst, map->n, v, 1);
	return i < map->n && map->by_dst[i].dst == v ? 0 : v;
}

/* The copied messages whose source UIDs are lo..hi. */
static int low_part(const struct ms_view_map *map, uint32_t lo, uint32_t hi,
		    struct set_out *o)
{
	size_t i = lower(map->by_src, map->n, lo, 0), j;

	for (j = i; j < map->n && map->by_src[j].src <= hi; j++)
		if (!map->monotone && set_one(o, map->by_src[j].dst) < 0)
			return -1;
	if (!map->monotone || j == i)
		return 0;
	/* Monotone: their destination UIDs are one range. */
	return set_range(o, map->by_src[i].dst, map->by_src[j - 1].dst, 0);
}

/* The view range lo:hi (hi_star: lo:*). */
static int range_to_dst(const struct ms_view_map *map, uint32_t lo,
			uint32_t hi, int hi_star, struct set_out *o)
{
	uint64_t first;

	if (!hi_star) {
		if (lo > hi) {
			uint32_t t = lo;

			lo = hi;
			hi = t;
		}
		if (lo <= map->base &&
		    low_part(map, lo, hi < map->base ? hi : map->base, o) < 0)
			return -1;
		if (hi <= map->base)
			return 0;
		first = lo > map->base ? (uint64_t)lo - map->base : 1;
		if (first <= map->max_dst)
			first = (uint64_t)map->max_dst + 1;
		if (first > (uint64_t)hi - map->base)
			return 0;
		return set_range(o, (uint32_t)first, hi - map->base, 0);
	}
	/* lo:* : from lo's place on. */
	if (lo <= map->base) {
		size_t i = lower(map->by_src, map->n, lo, 0);

		if (i < map->n && map->monotone)
			return set_range(o, map->by_src[i].dst, 0, 1);
		if (i < map->n && low_part(map, lo, map->base, o) < 0)
			return -1;
		first = (uint64_t)map->max_dst + 1;
	} else {
		first = (uint64_t)lo - map->base;
		if (first <= map->max_dst)
			first = (uint64_t)map->max_dst + 1;
	}
	if (first > UINT32_MAX)
		first = UINT32_MAX;
	return set_range(o, (uint32_t)first, 0, 1);
}

/* One view range to the destination's. */
static int range_dst(const struct ms_view_map *map, const struct range *x,
		     struct set_out *o)
{
	uint32_t d;

	if (x->lo_star && x->hi_star)
		return set_range(o, 0, 0, 1);
	if (x->lo_star || x->hi_star)
		return range_to_dst(map, x->lo_star ? x->hi : x->lo, 0, 1, o);
	if (x->lo != x->hi)
		return range_to_dst(map, x->lo, x->hi, 0, o);
	d = view_to_dst(map, x->lo);
	return d != 0 ? set_one(o, d) : 0;
}

/* One destination range to the view's: the copied messages as their
 * source UIDs, the stretches between them above base. 1: a "*", which is
 * not in what a server sends. */
static int range_view(const struct ms_view_map *map, const struct range *x,
		      struct set_out *o)
{
	uint32_t lo = x->lo < x->hi ? x->lo : x->hi;
	uint32_t hi = x->lo < x->hi ? x->hi : x->lo;
	size_t j = lower(map->by_dst, map->n, lo, 1);

	if (x->lo_star || x->hi_star)
		return 1;
	for (;;) {
		uint32_t end;
		int r;

		if (j < map->n && map->by_dst[j].dst == lo) {
			r = set_one(o, map->by_dst[j++].src);
			end = lo;
		} else {
			end = j < map->n && map->by_dst[j].dst <= hi ?
			      map->by_dst[j].dst - 1 : hi;
			r = end == lo ? set_one(o, above(map, lo)) :
			    set_range(o, above(map, lo), above(map, end), 0);
		}
		if (r < 0 || end == hi)
			return r;
		lo = end + 1;
	}
}

/* Each range of the set through fn: 1, 0 when it is not a set, -1. */
static int set_walk(const struct ms_view_map *map, const char *set,
		    size_t len, struct ms_vbuf *out,
		    int (*fn)(const struct ms_view_map *, const struct range *,
			      struct set_out *))
{
	struct set_out o = { .b = out };
	size_t n, start = out->len;
	struct range *r;
	int ret = 0;

	if (set_parse(set, len, &r, &n) < 0)
		return 0;
	for (size_t i = 0; i < n && ret == 0; i++)
		ret = fn(map, &r[i], &o);
	free(r);
	if (ret == 0)
		ret = set_flush(&o);
	if (ret > 0) {
		out->len = start;
		return 0;
	}
	if (ret == 0 && !o.any)
		/* Nothing: a UID no folder holds (RFC 3501: 2^32 - 1 is the
		 * largest, and UIDNEXT never gets there). */
		ret = vbuf_u32(out, UINT32_MAX);
	return ret < 0 ? -1 : 1;
}

int ms_view_set_to_dst(const struct ms_view_map *map, const char *set,
		       size_t len, struct ms_vbuf *out)
{
	return set_walk(map, set, len, out, range_dst);
}

int ms_view_set_to_view(const struct ms_view_map *map, const char *set,
			size_t len, struct ms_vbuf *out)
{
	return set_walk(map, set, len, out, range_view);
}

/* ---- tokens of a fragment ---- */

enum { T_END, T_ATOM, T_QUOTED, T_LPAR, T_RPAR, T_LIT };

struct tok {
	int t;
	size_t s, e;
};

/* A literal's "{n}" or "{n+}" (or "~{n}") at p, ending the fragment:
 * its size, or -1. */
static int64_t literal_at(const char *f, size_t len, size_t p)
{
	uint64_t n = 0;
	size_t q;

	if (p < len && f[p] == '~')
		p++;
	if (p >= len || f[p] != '{')
		return -1;
	for (q = p + 1; q < len && f[q] >= '0' && f[q] <= '9'; q++) {
		n = n * 10 + (uint64_t)(f[q] - '0');
		if (n > (1ull << 40))
			return -1;
	}
	if (q == p + 1)
		return -1;
	if (q < len && f[q] == '+')
		q++;
	if (q >= len || f[q] != '}')
		return -1;
	q++;
	if (q < len && f[q] == '\r')
		q++;
	return q < len && f[q] == '\n' && q + 1 == len ? (int64_t)n : -1;
}

static void next_tok(const char *f, size_t len, size_t *pos, struct tok *t)
{
	size_t p = *pos;
	int br = 0;

	while (p < len && f[p] == ' ')
		p++;
	t->s = p;
	if (p >= len || f[p] == '\r' || f[p] == '\n') {
		t->t = T_END;
	} else if (f[p] == '(' || f[p] == ')') {
		t->t = f[p++] == '(' ? T_LPAR : T_RPAR;
	} else if (f[p] == '"') {
		t->t = T_QUOTED;
		for (p++; p < len && f[p] != '"' && f[p] != '\n'; p++)
			if (f[p] == '\\' && p + 1 < len)
				p++;
		if (p < len && f[p] == '"')
			p++;
	} else if (literal_at(f, len, p) >= 0) {
		t->t = T_LIT;
		p = len;
	} else {
		t->t = T_ATOM;
		for (; p < len; p++) {
			char c = f[p];

			if (c == '\r' || c == '\n' ||
			    (br == 0 && (c == ' ' || c == '(' || c == ')')))
				break;
			if (c == '[')
				br++;
			else if (c == ']' && br > 0)
				br--;
		}
	}
	t->e = p;
	*pos = p;
}

static int tok_is(const char *f, const struct tok *t, const char *s)
{
	size_t n = strlen(s);

	return t->t == T_ATOM && t->e - t->s == n &&
	       strncasecmp(f + t->s, s, n) == 0;
}

static int tok_num(const char *f, const struct tok *t, uint32_t *n)
{
	uint64_t v = 0;

	if (t->t != T_ATOM || t->e == t->s || t->e - t->s > 10)
		return -1;
	for (size_t i = t->s; i < t->e; i++) {
		if (f[i] < '0' || f[i] > '9')
			return -1;
		v = v * 10 + (uint64_t)(f[i] - '0');
	}
	if (v > UINT32_MAX)
		return -1;
	*n = (uint32_t)v;
	return 0;
}

/* An atom's or quoted string's text into b (NUL-terminated); -1 for any
 * other token or out of memory. */
static int tok_text(const char *f, const struct tok *t, struct ms_vbuf *b)
{
	b->len = 0;
	if (t->t == T_ATOM)
		return ms_vbuf_add(b, f + t->s, t->e - t->s);
	if (t->t != T_QUOTED)
		return -1;
	if (ms_vbuf_add(b, "", 0) < 0)
		return -1;
	for (size_t i = t->s + 1; i < t->e; i++) {
		if (f[i] == '"' && i + 1 == t->e)
			break;
		if (f[i] == '\\' && i + 1 < t->e)
			i++;
		if (ms_vbuf_add(b, f + i, 1) < 0)
			return -1;
	}
	return 0;
}

/* ---- the rewritten fragment ---- */

struct ed {
	const char *f;
	size_t last;			/* f is copied up to here */
	struct ms_vbuf *o;
	int err;
};

static void ed_to(struct ed *e, size_t pos)
{
	if (pos > e->last && ms_vbuf_add(e->o, e->f + e->last,
					 pos - e->last) < 0)
		e->err = 1;
	if (pos > e->last)
		e->last = pos;
}

static void ed_put(struct ed *e, const struct tok *t, const char *s,
		   size_t len)
{
	if (t->s < e->last)
		return;		/* edits go left to right: never here */
	ed_to(e, t->s);
	if (ms_vbuf_add(e->o, s, len) < 0)
		e->err = 1;
	e->last = t->e;
}

static void ed_u32(struct ed *e, const struct tok *t, uint32_t n)
{
	char num[16];

	ed_put(e, t, num, (size_t)snprintf(num, sizeof(num), "%u", n));
}

/* Whether a name can go as a quoted string: 7-bit, no CR, LF or NUL
 * (RFC 3501 QUOTED-CHAR). */
static int quotable(const char *name, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (name[i] == '\0' || name[i] == '\r' || name[i] == '\n' ||
		    (unsigned char)name[i] > 0x7f)
			return 0;
	return 1;
}

/* A name in place of token t: quoted, or where it cannot be, a literal
 * (non-synchronizing towards the server: the client had its "+"). */
static void ed_name(struct ed *e, const struct tok *t, const char *name,
		    size_t len, int to_server)
{
	struct ms_vbuf q = { 0 };
	char head[32];
	int r = 0;

	if (!quotable(name, len)) {
		r |= ms_vbuf_add(&q, head, (size_t)snprintf(head,
				 sizeof(head), to_server ? "{%zu+}\r\n" :
				 "{%zu}\r\n", len));
		r |= ms_vbuf_add(&q, name, len);
	} else {
		r |= ms_vbuf_add(&q, "\"", 1);
		for (size_t i = 0; i < len; i++) {
			if (name[i] == '"' || name[i] == '\\')
				r |= ms_vbuf_add(&q, "\\", 1);
			r |= ms_vbuf_add(&q, name + i, 1);
		}
		r |= ms_vbuf_add(&q, "\"", 1);
	}
	if (r < 0)
		e->err = 1;
	else
		ed_put(e, t, q.p, q.len);
	ms_vbuf_free(&q);
}

/* A folder name sent as a literal (token t, ending the fragment), to be
 * held (struct ms_view_side): 1 when it is, 0 when it goes on as it is
 * (over 1024 bytes, a literal8, or a synchronizing literal from a client
 * the view cannot answer "+" itself). */
static int name_hold(struct ms_view *v, struct ms_view_side *sd,
		     struct ed *e, const struct tok *t, int client)
{
	int64_t n = literal_at(e->f, t->e, t->s);
	const char *close = memchr(e->f + t->s, '}', t->e - t->s);
	int sync = close != NULL && close[-1] != '+';

	if (n < 0 || n > 1024 || e->f[t->s] == '~' ||
	    (client && sync && v->reply == NULL))
		return 0;
	ed_to(e, t->s);
	e->last = t->e;
	sd->hold = 1;
	sd->name.len = 0;
	if (ms_vbuf_add(&sd->name, "", 0) < 0)
		e->err = 1;
	sd->plus_due = client && sync;
	return 1;
}

/* A UID set token, translated by map either way. */
static int ed_set(struct ms_view *v, struct ed *e, const struct tok *t,
		  const struct ms_view_map *map, int to_dst)
{
	struct ms_vbuf b = { 0 };
	int r;

	if (map == NULL || map->invalid || t->t != T_ATOM)
		return 0;
	r = to_dst ? ms_view_set_to_dst(map, e->f + t->s, t->e - t->s, &b) :
		     ms_view_set_to_view(map, e->f + t->s, t->e - t->s, &b);
	if (r < 0)
		e->err = 1;
	if (r > 0) {
		ed_put(e, t, b.p, b.len);
		v->uids++;
	}
	ms_vbuf_free(&b);
	return r;
}

/* One UID from the destination, shown in the view. */
static void ed_uid(struct ms_view *v, struct ed *e, const struct tok *t,
		   const struct ms_view_map *map)
{
	uint32_t n;

	if (map == NULL || map->invalid || tok_num(e->f, t, &n) < 0)
		return;
	ed_u32(e, t, ms_view_uid(map, n));
	v->uids++;
}

int ms_view_cap_withheld(const char *cap, size_t len)
{
	static const char *const withheld[] = {
		"CONDSTORE", "QRESYNC", "UIDONLY", "MULTISEARCH",
		"CONTEXT=SEARCH", "CONTEXT=SORT",
	};

	for (size_t i = 0; i < sizeof(withheld) / sizeof(*withheld); i++)
		if (strlen(withheld[i]) == len &&
		    strncasecmp(cap, withheld[i], len) == 0)
			return 1;
	return 0;
}

/* Whether the session withholds cap: CONDSTORE and the like where UIDs
 * are translated; UTF8=ACCEPT where names are (the old names are recorded
 * in modified UTF-7, and a session that enabled it names folders in
 * UTF-8: RFC 6855). */
static int cap_dropped(const struct ms_view *v, const char *cap, size_t len)
{
	if (v->withhold && ms_view_cap_withheld(cap, len))
		return 1;
	return v->withhold_utf8 &&
	       ((len == 11 && strncasecmp(cap, "UTF8=ACCEPT", len) == 0) ||
		(len == 9 && strncasecmp(cap, "UTF8=ONLY", len) == 0));
}

/* Drops the withheld capabilities from the atoms from *pos up to end. */
static void ed_caps(struct ms_view *v, struct ed *e, size_t *pos, size_t end)
{
	struct tok t;
	size_t prev = *pos;

	if (!v->withhold && !v->withhold_utf8)
		return;
	for (;;) {
		next_tok(e->f, end, pos, &t);
		if (t.t == T_END)
			break;
		if (t.t == T_ATOM && cap_dropped(v, e->f + t.s, t.e - t.s)) {
			ed_to(e, prev);
			e->last = t.e;
		}
		prev = t.e;
	}
}

/* ---- commands ---- */

enum {
	K_OTHER, K_UIDSET, K_UIDCOPY, K_COPY, K_SELECT, K_STATUS, K_APPEND,
	K_MBOX, K_RENAME, K_LIST, K_ENABLE, K_CLOSE,
	/* the search family: results are UIDs in the U kinds */
	K_SEARCH, K_USEARCH, K_SORT, K_USORT, K_THREAD, K_UTHREAD,
};

#define IS_SEARCH(k) ((k) >= K_SEARCH)
#define IS_USEARCH(k) ((k) == K_USEARCH || (k) == K_USORT || \
		       (k) == K_UTHREAD)

struct ms_view_cmd {
	char *tag;
	int kind;
	int done;
	struct ms_view_map *map;	/* SELECT's folder; the target of
					   APPEND, COPY, MOVE */
	struct ms_vbuf pats;		/* LIST, LSUB: the client's patterns
					   (NUL-terminated), answers
					   filtered by them */
	size_t npats;
};

static const struct {
	const char *name;
	int kind, uid_kind;
} commands[] = {
	{ "FETCH", K_OTHER, K_UIDSET },
	{ "STORE", K_OTHER, K_UIDSET },
	{ "EXPUNGE", K_OTHER, K_UIDSET },
	{ "COPY", K_COPY, K_UIDCOPY },
	{ "MOVE", K_COPY, K_UIDCOPY },
	{ "SEARCH", K_SEARCH, K_USEARCH },
	{ "SORT", K_SORT, K_USORT },
	{ "THREAD", K_THREAD, K_UTHREAD },
	{ "SELECT", K_SELECT, K_OTHER },
	{ "EXAMINE", K_SELECT, K_OTHER },
	{ "STATUS", K_STATUS, K_OTHER },
	{ "APPEND", K_APPEND, K_OTHER },
	{ "CREATE", K_MBOX, K_OTHER },
	{ "DELETE", K_MBOX, K_OTHER },
	{ "SUBSCRIBE", K_MBOX, K_OTHER },
	{ "UNSUBSCRIBE", K_MBOX, K_OTHER },
	{ "GETQUOTAROOT", K_MBOX, K_OTHER },
	{ "RENAME", K_RENAME, K_OTHER },
	{ "LIST", K_LIST, K_OTHER },
	{ "LSUB", K_LIST, K_OTHER },
	{ "ENABLE", K_ENABLE, K_OTHER },
	{ "CLOSE", K_CLOSE, K_OTHER },
	{ "UNSELECT", K_CLOSE, K_OTHER },
};

static int cmd_kind(const char *f, const struct tok *t, int uid)
{
	for (size_t i = 0; i < sizeof(commands) / sizeof(*commands); i++)
		if (tok_is(f, t, commands[i].name))
			return uid ? commands[i].uid_kind : commands[i].kind;
	return K_OTHER;
}

static struct ms_view_cmd *q_at(struct ms_view *v, size_t i)
{
	return &v->q[(v->qhead + i) % v->qcap];
}

static struct ms_view_cmd *q_push(struct ms_view *v, const char *tag,
				  size_t len, int kind)
{
	struct ms_view_cmd *c;

	if (v->qlen == v->qcap) {
		size_t cap = v->qcap ? v->qcap * 2 : 16;
		struct ms_view_cmd *q;

		if (v->qlen >= MS_VIEW_PIPELINE_MAX)
			return NULL;
		q = malloc(cap * sizeof(*q));
		if (q == NULL)
			return NULL;
		for (size_t i = 0; i < v->qlen; i++)
			q[i] = *q_at(v, i);
		free(v->q);
		v->q = q;
		v->qcap = cap;
		v->qhead = 0;
	}
	c = &v->q[(v->qhead + v->qlen) % v->qcap];
	memset(c, 0, sizeof(*c));
	c->tag = strndup(tag, len);
	if (c->tag == NULL)
		return NULL;
	c->kind = kind;
	v->qlen++;
	return c;
}

static void q_pop_done(struct ms_view *v)
{
	while (v->qlen > 0 && q_at(v, 0)->done) {
		free(q_at(v, 0)->tag);
		ms_vbuf_free(&q_at(v, 0)->pats);
		v->qhead = (v->qhead + 1) % v->qcap;
		v->qlen--;
	}
}

/* The oldest command not answered whose kind passes want(). */
static struct ms_view_cmd *q_first(struct ms_view *v, int (*want)(int))
{
	for (size_t i = 0; i < v->qlen; i++) {
		struct ms_view_cmd *c = q_at(v, i);

		if (!c->done && want(c->kind))
			return c;
	}
	return NULL;
}

static int want_select(int k) { return k == K_SELECT; }
static int want_search(int k) { return IS_SEARCH(k); }
static int want_copy(int k) { return k == K_COPY || k == K_UIDCOPY; }
static int want_list(int k) { return k == K_LIST; }

/* The newest command (the one being read). */
static struct ms_view_cmd *q_last(struct ms_view *v)
{
	return v->qlen > 0 ? q_at(v, v->qlen - 1) : NULL;
}

/* The map the command needs of the folder it names (the destination's
 * name): SELECT's, the target of APPEND, COPY, MOVE. */
static void c_target(struct ms_view *v, struct ms_view_cmd *cmd,
		     const char *name)
{
	if (cmd == NULL)
		return;
	if (cmd->kind == K_SELECT) {
		cmd->map = v->lookup(v->ctx, name, 1);
		v->csel = cmd->map;
	} else if (cmd->kind == K_APPEND || want_copy(cmd->kind)) {
		cmd->map = v->lookup(v->ctx, name, 0);
	}
}

/* A folder name the client gave, its text name (len bytes) from token t
 * (a held literal: an empty token at the fragment's start): the
 * destination's in its place, and the map the command needs. A name with
 * a NUL, CR or LF is no folder's: passed on, nothing looked up. */
static void c_name(struct ms_view *v, struct ed *e, const struct tok *t,
		   const char *name, size_t len, int held)
{
	const char *dst = NULL;

	if (memchr(name, '\0', len) != NULL || memchr(name, '\n', len) ||
	    memchr(name, '\r', len)) {
		if (held)
			ed_name(e, t, name, len, 1);
		return;
	}
	if (v->name != NULL)
		dst = v->name(v->ctx, name, 1);
	if (dst != NULL) {
		ed_name(e, t, dst, strlen(dst), 1);
		v->names++;
	} else if (held) {
		ed_name(e, t, name, len, 1);
	}
	c_target(v, q_last(v), dst ? dst : name);
}

/* A folder name argument (token t). */
static void c_mailbox(struct ms_view *v, struct ed *e, const struct tok *t)
{
	struct ms_view_cmd *cmd = q_last(v);
	struct ms_vbuf name = { 0 };

	/* A folder not told (yet): nothing of the last one applies. */
	if (cmd != NULL && cmd->kind == K_SELECT)
		v->csel = NULL;
	if (t->t == T_LIT) {
		/* Its bytes come next (c_held), or it goes on unlooked at. */
		name_hold(v, &v->c, e, t, 1);
		return;
	}
	if (tok_text(e->f, t, &name) == 0)
		c_name(v, e, t, name.p, name.len, 0);
	ms_vbuf_free(&name);
}

/* The held literal name, read whole: at the start of the fragment after
 * it. */
static void c_held(struct ms_view *v, struct ed *e)
{
	struct tok at = { T_ATOM, 0, 0 };

	v->c.hold = 0;
	c_name(v, e, &at, v->c.name.p, v->c.name.len, 1);
}

/* Search keys and how many arguments each takes (UID: a set, see
 * c_search). */
static int key_args(const char *f, const struct tok *t)
{
	static const char *const one[] = {
		"BCC", "BEFORE", "BODY", "CC", "FROM", "KEYWORD", "LARGER",
		"ON", "SENTBEFORE", "SENTON", "SENTSINCE", "SINCE", "SMALLER",
		"SUBJECT", "TEXT", "TO", "UNKEYWORD", "OLDER", "YOUNGER",
		"CHARSET", "RETURN", "FILTER", "EMAILID", "THREADID",
		"SAVEDBEFORE", "SAVEDON", "SAVEDSINCE", "X-GM-RAW",
		"X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS", "MODSEQ",
	};

	if (tok_is(f, t, "HEADER"))
		return 2;
	if (tok_is(f, t, "ANNOTATION"))
		return 3;
	for (size_t i = 0; i < sizeof(one) / sizeof(*one); i++)
		if (tok_is(f, t, one[i]))
			return 1;
	return 0;
}

/* Search keys (state kept in v->c across literals): the set after each
 * UID key is the view's. */
static void c_search(struct ms_view *v, struct ed *e, size_t pos,
		     size_t len)
{
	struct ms_view_side *c = &v->c;
	struct tok t;

	for (;;) {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			return;
		if (c->skip_depth > 0) {
			c->skip_depth += t.t == T_LPAR ? 1 :
					 t.t == T_RPAR ? -1 : 0;
			if (c->skip_depth == 0)
				c->skip--;
			continue;
		}
		if (c->want) {
			c->want = 0;
			ed_set(v, e, &t, v->csel, 1);
			continue;
		}
		if (c->skip > 0) {
			if (tok_is(e->f, &t, "RETURN")) {
				c->skip++;	/* its options, then on */
				continue;
			}
			if (t.t == T_LPAR) {
				c->skip_depth = 1;
				continue;
			}
			if (c->modseq && t.t == T_QUOTED)
				c->skip += 2;	/* entry name, type */
			c->modseq = 0;
			c->skip--;
			continue;
		}
		if (t.t != T_ATOM)
			continue;
		if (tok_is(e->f, &t, "UID")) {
			c->want = 1;
			continue;
		}
		c->modseq = tok_is(e->f, &t, "MODSEQ");
		c->skip += key_args(e->f, &t);
	}
}

/* ENABLE without what is withheld; with nothing left, a NOOP. */
static void c_enable(struct ms_view *v, struct ed *e, const struct tok *cmd,
		     size_t pos, size_t len)
{
	size_t p = pos;
	struct tok t;
	int kept = 0;

	if (!v->withhold && !v->withhold_utf8)
		return;
	for (;;) {
		next_tok(e->f, len, &p, &t);
		if (t.t == T_END)
			break;
		kept |= !(t.t == T_ATOM && cap_dropped(v, e->f + t.s,
						       t.e - t.s));
	}
	if (kept) {
		ed_caps(v, e, &pos, len);
		return;
	}
	{
		struct tok all = { T_ATOM, cmd->s, t.s };

		ed_put(e, &all, "NOOP", 4);
	}
}

/* The arguments of a command by its plan (c->args), across literals:
 * its UID set and its folder names. */
static void c_args(struct ms_view *v, struct ed *e, size_t pos, size_t len)
{
	struct ms_view_side *c = &v->c;
	struct tok t;

	while (c->args != NULL && *c->args != '\0') {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			return;
		if (c->depth > 0) {	/* in an optional group */
			c->depth += t.t == T_LPAR ? 1 : t.t == T_RPAR ? -1 : 0;
			continue;
		}
		if (*c->args == 'O') {
			c->args++;
			if (t.t == T_LPAR) {
				c->depth = 1;
				continue;
			}
		}
		switch (*c->args++) {
		case 'U':
			ed_set(v, e, &t, v->csel, 1);
			break;
		case 'N':
			if (t.t == T_ATOM || t.t == T_QUOTED ||
			    t.t == T_LIT)
				c_mailbox(v, e, &t);
			else
				c->args = "";	/* not a name: no more */
			break;
		default:		/* 'S' */
			break;
		}
	}
}

/* ---- LIST patterns where folders were renamed ---- */

static int64_t frag_literal(const char *f, size_t len);

/* RFC 3501: "*" matches anything, "%" anything but the separator. One row
 * of the table of which pattern prefixes match which name prefixes. */
static int pattern_match(const char *pat, size_t np, const char *name,
			 size_t nn, char delim)
{
	unsigned char *row = calloc(nn + 1, 1);
	int r;

	if (row == NULL)
		return 1;		/* shown rather than lost */
	row[0] = 1;
	for (size_t i = 0; i < np; i++) {
		char c = pat[i];
		unsigned char diag = row[0], left;

		if (c != '*' && c != '%')
			row[0] = 0;
		left = row[0];
		for (size_t j = 1; j <= nn; j++) {
			unsigned char up = row[j], m;

			if (c == '*')
				m = up || left;
			else if (c == '%')
				m = up || (left && (delim == '\0' ||
						    name[j - 1] != delim));
			else
				m = diag && name[j - 1] == c;
			diag = up;
			row[j] = left = m;
		}
	}
	r = row[nn];
	free(row);
	return r;
}

/* "INBOX" or below it, in any case: its length (5), else 0. */
static size_t inbox_part(const char *s, char delim)
{
	return strncasecmp(s, "INBOX", 5) == 0 &&
	       (s[5] == '\0' || (delim != '\0' && s[5] == delim)) ? 5 : 0;
}

int ms_view_pattern_match(const char *pattern, const char *name, char delim)
{
	size_t np = strlen(pattern), nn = strlen(name);
	size_t ip = inbox_part(pattern, delim), in = inbox_part(name, delim);

	if (np > 4096 || nn > 4096)
		return 1;		/* no folder's: not looked at */
	if (ip > 0 && in > 0)		/* INBOX is INBOX in any case */
		return pattern_match(pattern + 5, np - 5, name + 5, nn - 5,
				     delim);
	return pattern_match(pattern, np, name, nn, delim);
}

/* A pattern as a quoted string into b; -1 when it cannot be one. */
static int put_quoted(struct ms_vbuf *b, const char *s, size_t len)
{
	int r = 0;

	if (!quotable(s, len))
		return -1;
	r |= ms_vbuf_add(b, " \"", 2);
	for (size_t i = 0; i < len; i++) {
		if (s[i] == '"' || s[i] == '\\')
			r |= ms_vbuf_add(b, "\\", 1);
		r |= ms_vbuf_add(b, s + i, 1);
	}
	return r | ms_vbuf_add(b, "\"", 1);
}

#define LIST_PATTERNS_MAX 32

/* One pattern of the client's (the reference before it): kept for the
 * answers, and asked as the destination's, with the new names it may
 * match under old ones. 0, or -1 when the command is left as it is. */
static int c_list_pattern(struct ms_view *v, struct ms_view_cmd *cmd,
			  const char *full, size_t len, struct ms_vbuf *ask,
			  size_t *nask)
{
	struct ms_vbuf extra = { 0 };
	const char *dst;
	int n, r = 0;

	if (len > 1024 || memchr(full, '\0', len) != NULL ||
	    !quotable(full, len) || cmd->npats >= LIST_PATTERNS_MAX ||
	    ms_vbuf_add(&cmd->pats, full, len + 1) < 0)
		return -1;
	cmd->npats++;
	dst = v->name(v->ctx, full, 1);
	if (dst != NULL)
		v->names++;
	r |= put_quoted(ask, dst != NULL ? dst : full,
			dst != NULL ? strlen(dst) : len);
	(*nask)++;
	n = v->patterns(v->ctx, full, &extra);
	if (n < 0)
		r = -1;
	for (size_t off = 0; r == 0 && n-- > 0; (*nask)++) {
		size_t l = strlen(extra.p + off);

		r |= put_quoted(ask, extra.p + off, l);
		off += l + 1;
	}
	ms_vbuf_free(&extra);
	return r;
}

/* A LIST or LSUB whole in one line, where folders were renamed: the
 * client's patterns (each with the reference before it, as RFC 3501
 * reads them) kept for filtering the answers, and the server asked with
 * the reference "" for them as the destination names them, and for the
 * renamed folders they may match under their old names ("Sent*" may be
 * "Sent Items", now "Sent"): several patterns as RFC 5258 lists them,
 * LSUB for all ("*"). 1 when done, 0 when the command goes on as it is
 * (a literal in it: names renamed one by one, not filtered). */
static int c_list(struct ms_view *v, struct ed *e, struct ms_view_cmd *cmd,
		  const struct tok *word, size_t pos, size_t len)
{
	struct ms_vbuf ref = { 0 }, pat = { 0 }, full = { 0 }, ask = { 0 };
	struct ms_vbuf line = { 0 };
	int lsub = tok_is(e->f, word, "LSUB"), multi = 0, r = 0;
	size_t nask = 0, opts = 0, opts_end = 0, end = len, after;
	struct tok t;

	if (frag_literal(e->f, len) >= 0)
		return 0;
	while (end > 0 && (e->f[end - 1] == '\n' || e->f[end - 1] == '\r'))
		end--;
	next_tok(e->f, len, &pos, &t);
	if (!lsub && t.t == T_LPAR) {	/* selection options */
		int depth = 1;

		opts = t.s;
		while (depth > 0) {
			next_tok(e->f, len, &pos, &t);
			if (t.t == T_END)
				goto out;
			depth += t.t == T_LPAR ? 1 : t.t == T_RPAR ? -1 : 0;
		}
		opts_end = t.e;
		next_tok(e->f, len, &pos, &t);
	}
	if (tok_text(e->f, &t, &ref) < 0)
		goto out;
	next_tok(e->f, len, &pos, &t);
	if (!lsub && t.t == T_LPAR) {
		multi = 1;
		next_tok(e->f, len, &pos, &t);
	}
	do {
		after = t.e;
		if (multi && t.t == T_RPAR)
			break;
		full.len = 0;
		if (tok_text(e->f, &t, &pat) < 0 ||
		    ms_vbuf_add(&full, ref.p, ref.len) < 0 ||
		    ms_vbuf_add(&full, pat.p, pat.len) < 0 ||
		    c_list_pattern(v, cmd, full.p, full.len, &ask, &nask) < 0)
			goto out;
		next_tok(e->f, len, &pos, &t);
	} while (multi);
	if (cmd->npats == 0)
		goto out;
	r |= ms_vbuf_add(&line, e->f + word->s, word->e - word->s);
	if (opts_end > opts)
		r |= ms_vbuf_add(&line, " ", 1) |
		     ms_vbuf_add(&line, e->f + opts, opts_end - opts);
	r |= ms_vbuf_add(&line, " \"\"", 3);
	if (nask == 1)
		r |= ms_vbuf_add(&line, ask.p, ask.len);
	else if (lsub)
		r |= ms_vbuf_add(&line, " \"*\"", 4);
	else
		r |= ms_vbuf_add(&line, " (", 2) |
		     ms_vbuf_add(&line, ask.p + 1, ask.len - 1) |
		     ms_vbuf_add(&line, ")", 1);
	/* RETURN (...) and the like */
	r |= ms_vbuf_add(&line, e->f + after, end > after ? end - after : 0);
	if (r < 0) {
		e->err = 1;
	} else {
		struct tok all = { T_ATOM, word->s, end };

		ed_put(e, &all, line.p, line.len);
	}
	r = 1;
out:
	if (r == 0) {
		cmd->pats.len = 0;
		cmd->npats = 0;
	}
	ms_vbuf_free(&ref);
	ms_vbuf_free(&pat);
	ms_vbuf_free(&full);
	ms_vbuf_free(&ask);
	ms_vbuf_free(&line);
	return r;
}

/* The first fragment of a command. */
static void c_command(struct ms_view *v, struct ed *e, size_t len)
{
	struct ms_view_side *c = &v->c;
	struct ms_view_cmd *cmd;
	struct tok tag, t, u;
	size_t pos = 0;
	int kind;

	next_tok(e->f, len, &pos, &tag);
	next_tok(e->f, len, &pos, &t);
	if (tag.t != T_ATOM || t.t != T_ATOM)
		return;		/* IDLE's DONE, an empty line */
	if (tok_is(e->f, &t, "UID")) {
		next_tok(e->f, len, &pos, &u);
		kind = cmd_kind(e->f, &u, 1);
	} else {
		kind = cmd_kind(e->f, &t, 0);
	}
	cmd = q_push(v, e->f + tag.s, tag.e - tag.s, kind);
	if (cmd == NULL) {
		if (v->qlen >= MS_VIEW_PIPELINE_MAX)
			v->gave_up = "too many commands at once";
		e->err = 1;
		return;
	}
	c->kind = kind;
	switch (kind) {
	case K_UIDSET:
		c->args = "U";
		break;
	case K_UIDCOPY:
		c->args = "UN";
		break;
	case K_COPY:
		c->args = "SN";	/* the set is of sequence numbers */
		break;
	case K_SELECT:
	case K_STATUS:
	case K_APPEND:
	case K_MBOX:
		c->args = "N";
		break;
	case K_RENAME:
		c->args = "NN";
		break;
	case K_LIST:
		if (v->patterns != NULL && v->name != NULL &&
		    c_list(v, e, cmd, &t, pos, len))
			return;
		c->args = "OSN";	/* (options) reference pattern */
		break;
	case K_ENABLE:
		c_enable(v, e, &t, pos, len);
		return;
	case K_CLOSE:
		v->csel = NULL;
		return;
	case K_SORT:
	case K_USORT:
	case K_THREAD:
	case K_UTHREAD:
		c->skip = 2;	/* criteria or algorithm, charset */
		/* fall through */
	case K_SEARCH:
	case K_USEARCH:
		c_search(v, e, pos, len);
		return;
	default:
		return;
	}
	c_args(v, e, pos, len);
}

static void c_frag(struct ms_view *v, struct ed *e, size_t len)
{
	struct ms_view_side *c = &v->c;

	if (!c->cont) {
		c->kind = K_OTHER;
		c->depth = c->skip = c->skip_depth = c->want = c->modseq = 0;
		c->args = "";
		c_command(v, e, len);
		return;
	}
	if (c->hold)
		c_held(v, e);
	if (IS_SEARCH(c->kind))
		c_search(v, e, 0, len);
	else
		c_args(v, e, 0, len);
}

/* ---- responses ---- */

/* R_LISTNAME: a LIST answer's name being read (then R_PASS, or R_LIST
 * when it is a literal) */
enum { R_PASS, R_FETCH, R_NUMS, R_LIST, R_STATUS, R_LISTNAME };

/* A response code "[CODE args]" at pos (after the status word): the
 * untagged ones go by the oldest command they may answer, the tagged by
 * cmd. */
static void s_code(struct ms_view *v, struct ed *e, size_t pos, size_t len,
		   struct ms_view_cmd *cmd)
{
	const char *close;
	struct ms_view_cmd *owner;
	struct ms_view_map *map;
	struct tok code, t, a, b;
	uint32_t n;

	while (pos < len && e->f[pos] == ' ')
		pos++;
	if (pos >= len || e->f[pos] != '[')
		return;
	close = memchr(e->f + pos, ']', len - pos);
	if (close == NULL)
		return;
	len = (size_t)(close - e->f);
	pos++;
	next_tok(e->f, len, &pos, &code);
	if (tok_is(e->f, &code, "CAPABILITY")) {
		ed_caps(v, e, &pos, len);
		return;
	}
	if (tok_is(e->f, &code, "UIDVALIDITY") ||
	    tok_is(e->f, &code, "UIDNEXT")) {
		owner = q_first(v, want_select);
		map = owner != NULL ? owner->map : v->ssel;
		next_tok(e->f, len, &pos, &t);
		if (map == NULL || map->invalid || tok_num(e->f, &t, &n) < 0)
			return;
		if (tok_is(e->f, &code, "UIDNEXT")) {
			ed_u32(e, &t, ms_view_uidnext(map, n));
		} else if (n == map->dst_uidvalidity) {
			ed_u32(e, &t, map->src_uidvalidity);
		} else {
			/* Not the folder the mover filled: as it is. */
			map->invalid = 1;
		}
		return;
	}
	if (tok_is(e->f, &code, "APPENDUID"))
		owner = cmd;
	else if (tok_is(e->f, &code, "COPYUID"))
		owner = cmd != NULL ? cmd : q_first(v, want_copy);
	else
		return;
	map = owner != NULL ? owner->map : NULL;
	next_tok(e->f, len, &pos, &t);
	next_tok(e->f, len, &pos, &a);
	/* the target's UIDVALIDITY: not the mover's, nothing of it */
	if (map != NULL && (map->invalid || tok_num(e->f, &t, &n) < 0 ||
			    n != map->dst_uidvalidity))
		map = NULL;
	if (map != NULL)
		ed_u32(e, &t, map->src_uidvalidity);
	if (tok_is(e->f, &code, "COPYUID")) {
		next_tok(e->f, len, &pos, &b);
		ed_set(v, e, &a, v->ssel, 0);
		a = b;
	}
	ed_set(v, e, &a, map, 0);
}

/* FETCH data (state in v->s across literals): the value of UID at the
 * outer level. s->skip: 0 an item's name is next, 1 its value. */
static void s_fetch(struct ms_view *v, struct ed *e, size_t pos, size_t len)
{
	struct ms_view_side *s = &v->s;
	struct tok t;

	for (;;) {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			return;
		if (t.t == T_LPAR) {
			s->depth++;
			continue;
		}
		if (t.t == T_RPAR) {
			if (s->depth > 0 && --s->depth == 1)
				s->skip = 0;
			continue;
		}
		if (s->depth != 1)
			continue;
		if (s->skip == 0) {
			s->want = tok_is(e->f, &t, "UID");
			s->skip = 1;
			continue;
		}
		if (s->want)
			ed_uid(v, e, &t, v->ssel);
		s->want = s->skip = 0;
	}
}

/* SEARCH, SORT, THREAD results of a UID command: every number. */
static void s_nums(struct ms_view *v, struct ed *e, size_t pos, size_t len)
{
	struct tok t;

	for (;;) {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			return;
		if (t.t == T_LPAR)
			v->s.depth++;
		else if (t.t == T_RPAR && v->s.depth > 0)
			v->s.depth--;
		else if (v->s.skip || v->s.depth == 0)
			ed_uid(v, e, &t, v->ssel);	/* not (MODSEQ n) */
	}
}

/* ESEARCH: with UID, MIN, MAX and ALL are the view's. */
static void s_esearch(struct ms_view *v, struct ed *e, size_t pos,
		      size_t len)
{
	struct tok t;
	int uid = 0, depth = 0;

	for (;;) {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			return;
		if (t.t == T_LPAR || t.t == T_RPAR) {
			depth += t.t == T_LPAR ? 1 : -1;
			continue;
		}
		if (depth > 0)
			continue;
		if (tok_is(e->f, &t, "UID")) {
			uid = 1;
			continue;
		}
		if (!uid)
			continue;
		if (tok_is(e->f, &t, "MIN") || tok_is(e->f, &t, "MAX")) {
			next_tok(e->f, len, &pos, &t);
			ed_uid(v, e, &t, v->ssel);
		} else if (tok_is(e->f, &t, "ALL")) {
			next_tok(e->f, len, &pos, &t);
			ed_set(v, e, &t, v->ssel, 0);
		}
	}
}

/* A LIST answer (the server's name, old the name shown when it is not
 * that) to a command whose answers are filtered: dropped when none of
 * the client's patterns match what the client sees, or when the server's
 * name is itself an old name (the client reaches another folder by it,
 * so it is hidden). */
static void s_list_filter(struct ms_view *v, struct ed *e, const char *name,
			  size_t len, const char *old)
{
	struct ms_view_cmd *cmd = q_first(v, want_list);
	struct ms_vbuf shown = { 0 };
	const char *p;
	int keep = 0;

	v->s.list_dropped = 0;
	if (cmd == NULL || cmd->npats == 0 || memchr(name, '\0', len))
		return;
	if (ms_vbuf_add(&shown, old != NULL ? old : name,
			old != NULL ? strlen(old) : len) < 0) {
		e->err = 1;
		return;
	}
	if (v->name(v->ctx, name, 1) == NULL)
		for (p = cmd->pats.p; !keep && p < cmd->pats.p + cmd->pats.len;
		     p += strlen(p) + 1)
			keep = ms_view_pattern_match(p, shown.p, v->s.delim);
	ms_vbuf_free(&shown);
	v->s.drop = v->s.list_dropped = !keep;
}

/* A folder name the server sent (token t; a held literal: an empty token
 * at the fragment's start, name its text): the old one where the move
 * renamed it. */
static void s_rename(struct ms_view *v, struct ed *e, const struct tok *t,
		     const struct ms_vbuf *name, int held)
{
	const char *old = NULL;

	if (v->name != NULL && memchr(name->p, '\0', name->len) == NULL)
		old = v->name(v->ctx, name->p, 0);
	if (old != NULL) {
		ed_name(e, t, old, strlen(old), 0);
		v->names++;
	} else if (held) {
		ed_name(e, t, name->p, name->len, 0);
	}
	if (v->s.kind == R_LIST || v->s.kind == R_LISTNAME)
		s_list_filter(v, e, name->p, name->len, old);
}

/* A name token: renamed now (1, its text in name), or held when it is a
 * literal (0), or none (-1). */
static int s_name(struct ms_view *v, struct ed *e, const struct tok *t,
		  struct ms_vbuf *name)
{
	if (t->t == T_LIT)
		return name_hold(v, &v->s, e, t, 0) ? 0 : -1;
	if (tok_text(e->f, t, name) < 0)
		return -1;
	s_rename(v, e, t, name, 0);
	return 1;
}

/* STATUS after the name: UIDVALIDITY and UIDNEXT of the folder named. */
static void s_status_items(struct ms_view *v, struct ed *e, size_t pos,
			   size_t len, const struct ms_vbuf *name)
{
	struct ms_view_map *map = NULL;
	struct tok t, val;
	size_t items;
	uint32_t n;

	if (memchr(name->p, '\0', name->len) == NULL)
		map = v->lookup(v->ctx, name->p, 0);
	if (map == NULL || map->invalid)
		return;
	/* A UIDVALIDITY not the mover's: nothing is translated. */
	for (items = pos;;) {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			break;
		if (tok_is(e->f, &t, "UIDVALIDITY")) {
			next_tok(e->f, len, &pos, &val);
			if (tok_num(e->f, &val, &n) < 0 ||
			    n != map->dst_uidvalidity)
				return;
		}
	}
	for (pos = items;;) {
		next_tok(e->f, len, &pos, &t);
		if (t.t == T_END)
			return;
		if (tok_is(e->f, &t, "UIDVALIDITY")) {
			next_tok(e->f, len, &pos, &val);
			ed_u32(e, &val, map->src_uidvalidity);
		} else if (tok_is(e->f, &t, "UIDNEXT")) {
			next_tok(e->f, len, &pos, &val);
			if (tok_num(e->f, &val, &n) == 0)
				ed_u32(e, &val, ms_view_uidnext(map, n));
		}
	}
}

static void s_status(struct ms_view *v, struct ed *e, size_t pos,
		     size_t len)
{
	struct ms_vbuf name = { 0 };
	struct ms_view_cmd *list = q_first(v, want_list);
	struct tok t;
	int r;

	/* LIST-STATUS: the STATUS of a LIST answer dropped goes with it */
	if (list != NULL && list->npats > 0 && v->s.list_dropped)
		v->s.drop = 1;
	next_tok(e->f, len, &pos, &t);
	r = s_name(v, e, &t, &name);
	if (r == 0)
		v->s.kind = R_STATUS;
	else if (r > 0)
		s_status_items(v, e, pos, len, &name);
	ms_vbuf_free(&name);
}

/* The source's separator in place of the server's (ms_view_set_namespace):
 * the names are shown with it, and matched with it against the client's
 * patterns. */
static void s_list_delim(struct ms_view *v, struct ed *e, const struct tok *t)
{
	char q[5];
	char sep = v->ns.src_sep;

	v->s.delim = sep;
	if (sep == '\0')
		ed_put(e, t, "NIL", 3);
	else
		ed_put(e, t, q, (size_t)snprintf(q, sizeof(q), "\"%s%c\"",
						 sep == '"' || sep == '\\' ?
						 "\\" : "", sep));
}

/* NAMESPACE (RFC 2342): the source's personal namespace alone, as the
 * client knew it before the move (the destination's names are shown in
 * it). */
static void s_namespace(struct ms_view *v, struct ed *e,
			const struct tok *word, size_t len)
{
	struct ms_vbuf line = { 0 };
	char sep = v->ns.src_sep;
	size_t end = len;
	int r;

	if (!v->ns_on || frag_literal(e->f, len) >= 0 ||
	    !quotable(v->ns.src_prefix, strlen(v->ns.src_prefix)))
		return;		/* passed on as it is */
	while (end > word->e && (e->f[end - 1] == '\n' ||
				 e->f[end - 1] == '\r'))
		end--;
	/* put_quoted() puts a space first: "NAMESPACE ((" takes its place */
	r = ms_vbuf_add(&line, "NAMESPACE (", 11) |
	    put_quoted(&line, v->ns.src_prefix, strlen(v->ns.src_prefix));
	if (r == 0)
		line.p[11] = '(';
	if (sep == '\0')
		r |= ms_vbuf_add(&line, " NIL", 4);
	else
		r |= put_quoted(&line, &sep, 1);
	r |= ms_vbuf_add(&line, ")) NIL NIL", 10);
	if (r < 0) {
		e->err = 1;
	} else {
		struct tok all = { T_ATOM, word->s, end };

		ed_put(e, &all, line.p, line.len);
	}
	ms_vbuf_free(&line);
}

/* LIST, LSUB: (attributes) delimiter name. */
static void s_list(struct ms_view *v, struct ed *e, size_t pos, size_t len)
{
	struct ms_vbuf name = { 0 };
	struct tok t;

	next_tok(e->f, len, &pos, &t);
	while (t.t != T_END && t.t != T_RPAR)
		next_tok(e->f, len, &pos, &t);
	next_tok(e->f, len, &pos, &t);	/* the delimiter */
	v->s.delim = '\0';
	if (t.t == T_QUOTED && tok_text(e->f, &t, &name) == 0)
		v->s.delim = name.p[0];
	if (v->ns_on && (t.t == T_QUOTED || tok_is(e->f, &t, "NIL")))
		s_list_delim(v, e, &t);
	next_tok(e->f, len, &pos, &t);
	v->s.kind = R_LISTNAME;
	if ((t.t == T_ATOM || t.t == T_QUOTED || t.t == T_LIT) &&
	    s_name(v, e, &t, &name) == 0)
		v->s.kind = R_LIST;
	else
		v->s.kind = R_PASS;
	ms_vbuf_free(&name);
}

/* The fragment after a held name (LIST, STATUS). */
static void s_held(struct ms_view *v, struct ed *e, size_t len)
{
	struct tok at = { T_ATOM, 0, 0 };

	v->s.hold = 0;
	s_rename(v, e, &at, &v->s.name, 1);
	if (v->s.kind == R_STATUS)
		s_status_items(v, e, 0, len, &v->s.name);
}

/* A tagged completion: the command is answered. */
static void s_tagged(struct ms_view *v, struct ed *e, const struct tok *tag,
		     const struct tok *st, size_t pos, size_t len)
{
	struct ms_view_cmd *cmd = NULL;
	int ok = tok_is(e->f, st, "OK");

	for (size_t i = 0; i < v->qlen; i++) {
		struct ms_view_cmd *c = q_at(v, i);

		if (!c->done && strlen(c->tag) == tag->e - tag->s &&
		    memcmp(c->tag, e->f + tag->s, tag->e - tag->s) == 0) {
			cmd = c;
			break;
		}
	}
	s_code(v, e, pos, len, cmd);
	if (cmd == NULL)
		return;
	cmd->done = 1;
	if (cmd->kind == K_SELECT) {
		v->ssel = ok ? cmd->map : NULL;
		if (!ok && v->csel == cmd->map && q_first(v, want_select) ==
		    NULL)
			v->csel = NULL;
	} else if (cmd->kind == K_CLOSE && ok) {
		v->ssel = NULL;
	}
	q_pop_done(v);
}

static void s_untagged(struct ms_view *v, struct ed *e, size_t pos,
		       size_t len)
{
	struct ms_view_side *s = &v->s;
	struct ms_view_cmd *owner;
	struct tok t;
	uint32_t n;

	next_tok(e->f, len, &pos, &t);
	if (tok_num(e->f, &t, &n) == 0) {
		next_tok(e->f, len, &pos, &t);
		if (!tok_is(e->f, &t, "FETCH"))
			return;
		s->kind = R_FETCH;
		s_fetch(v, e, pos, len);
	} else if (tok_is(e->f, &t, "OK") || tok_is(e->f, &t, "NO") ||
		   tok_is(e->f, &t, "BAD") || tok_is(e->f, &t, "BYE") ||
		   tok_is(e->f, &t, "PREAUTH")) {
		s_code(v, e, pos, len, NULL);
	} else if (tok_is(e->f, &t, "CAPABILITY") ||
		   tok_is(e->f, &t, "ENABLED")) {
		ed_caps(v, e, &pos, len);
	} else if (tok_is(e->f, &t, "SEARCH") || tok_is(e->f, &t, "SORT") ||
		   tok_is(e->f, &t, "THREAD")) {
		owner = q_first(v, want_search);
		if (owner == NULL || !IS_USEARCH(owner->kind))
			return;
		s->kind = R_NUMS;
		/* SEARCH and SORT: (MODSEQ n) is no UID; THREAD: all are */
		s->skip = tok_is(e->f, &t, "THREAD");
		s_nums(v, e, pos, len);
	} else if (tok_is(e->f, &t, "ESEARCH")) {
		s_esearch(v, e, pos, len);
	} else if (tok_is(e->f, &t, "STATUS")) {
		s_status(v, e, pos, len);
	} else if (tok_is(e->f, &t, "LIST") || tok_is(e->f, &t, "LSUB")) {
		s_list(v, e, pos, len);
	} else if (tok_is(e->f, &t, "NAMESPACE")) {
		s_namespace(v, e, &t, len);
	}
}

static void s_frag(struct ms_view *v, struct ed *e, size_t len)
{
	struct ms_view_side *s = &v->s;
	struct tok tag, st;
	size_t pos = 0;

	if (s->cont) {
		if (s->hold)
			s_held(v, e, len);
		else if (s->kind == R_FETCH)
			s_fetch(v, e, 0, len);
		else if (s->kind == R_NUMS)
			s_nums(v, e, 0, len);
		return;
	}
	s->kind = R_PASS;
	s->depth = s->skip = s->want = s->drop = 0;
	next_tok(e->f, len, &pos, &tag);
	if (tag.t != T_ATOM || tok_is(e->f, &tag, "+"))
		return;
	if (tok_is(e->f, &tag, "*")) {
		s_untagged(v, e, pos, len);
		return;
	}
	next_tok(e->f, len, &pos, &st);
	s_tagged(v, e, &tag, &st, pos, len);
}

/* ---- the two streams ---- */

static int fail(struct ms_view *v, const char *why)
{
	if (v->gave_up == NULL)
		v->gave_up = why;
	return -1;
}

/* The size of the literal that ends the fragment, or -1. */
static int64_t frag_literal(const char *f, size_t len)
{
	size_t p = len, b;

	while (p > 0 && (f[p - 1] == '\n' || f[p - 1] == '\r'))
		p--;
	if (p == 0 || f[p - 1] != '}')
		return -1;
	for (b = p - 1; b > 0 && f[b - 1] != '{'; b--)
		if (p - b > 24)
			return -1;
	if (b == 0)
		return -1;
	b--;
	if (b > 0 && f[b - 1] == '~')
		b--;
	return literal_at(f, len, b);
}

int ms_view_client_at_rest(const struct ms_view *v)
{
	return !v->s.cont && !v->s.hold;
}

/* The "+" the client waits for before it sends a held literal, once the
 * server's responses are between two. */
static int give_plus(struct ms_view *v)
{
	static const char plus[] = "+ OK\r\n";

	if (!v->c.plus_due || !ms_view_client_at_rest(v))
		return 0;
	v->c.plus_due = 0;
	return v->reply(v->reply_ctx, plus, sizeof(plus) - 1);
}

/* A fragment read (o): on, or held with the fragments before it. */
static int frag_out(struct ms_view *v, struct ms_view_side *sd,
		    const struct ms_vbuf *o, ms_view_out_fn *out, void *octx)
{
	if (sd->hold) {
		if (ms_vbuf_add(&sd->held, o->p, o->len) < 0)
			return fail(v, "out of memory");
		return give_plus(v) < 0 ? fail(v, "cannot write") : 0;
	}
	if (sd->drop) {			/* not for the client */
		sd->held.len = 0;
		return give_plus(v) < 0 ? fail(v, "cannot write") : 0;
	}
	if (sd->held.len > 0) {
		if (out(octx, sd->held.p, sd->held.len) < 0)
			return fail(v, "cannot write");
		sd->held.len = 0;
	}
	if (out(octx, o->p, o->len) < 0)
		return fail(v, "cannot write");
	return give_plus(v) < 0 ? fail(v, "cannot write") : 0;
}

static int feed(struct ms_view *v, struct ms_view_side *sd, int client,
		const char *data, size_t len, ms_view_out_fn *out, void *octx,
		size_t *used_r)
{
	struct ms_vbuf o = { 0 };
	size_t all = len;
	int64_t lit;
	int r = 0;

	if (v->gave_up != NULL)
		return -1;
	while (len > 0 && r == 0) {
		const char *lf;
		size_t n;
		struct ed e;

		if (sd->lit > 0) {
			n = len < sd->lit ? len : (size_t)sd->lit;
			/* a held name: 1024 bytes at most (name_hold) */
			if (sd->hold && ms_vbuf_add(&sd->name, data, n) < 0)
				return fail(v, "out of memory");
			if (!sd->hold && !sd->drop && out(octx, data, n) < 0)
				return fail(v, "cannot write");
			sd->lit -= n;
			data += n;
			len -= n;
			continue;
		}
		lf = memchr(data, '\n', len);
		n = lf != NULL ? (size_t)(lf - data) + 1 : len;
		if (sd->line.len + n > MS_VIEW_LINE_MAX)
			return fail(v, "line too long");
		if (ms_vbuf_add(&sd->line, data, n) < 0)
			return fail(v, "out of memory");
		data += n;
		len -= n;
		if (lf == NULL)
			break;
		/* A whole fragment. */
		e = (struct ed){ sd->line.p, 0, &o, 0 };
		o.len = 0;
		if (client)
			c_frag(v, &e, sd->line.len);
		else
			s_frag(v, &e, sd->line.len);
		ed_to(&e, sd->line.len);
		if (e.err)
			r = fail(v, "out of memory");
		if (v->gave_up != NULL) {
			/* ms_view_fail(): this fragment does not go on, and
			 * what went before is where the stream stays */
			r = -1;
			break;
		}
		lit = frag_literal(sd->line.p, sd->line.len);
		sd->cont = lit >= 0;
		sd->lit = lit > 0 ? (uint64_t)lit : 0;
		sd->line.len = 0;
		r = frag_out(v, sd, &o, out, octx);
		if (client && v->wait) {
			/* a map is being read: the rest waits for it */
			v->wait = 0;
			break;
		}
	}
	ms_vbuf_free(&o);
	*used_r = all - len;
	return r;
}

void ms_view_init(struct ms_view *v, ms_view_lookup_fn *lookup,
		  ms_view_name_fn *name, void *ctx)
{
	memset(v, 0, sizeof(*v));
	v->lookup = lookup;
	v->name = name;
	v->ctx = ctx;
}

void ms_view_clear(struct ms_view *v)
{
	ms_vbuf_free(&v->c.line);
	ms_vbuf_free(&v->s.line);
	ms_vbuf_free(&v->c.name);
	ms_vbuf_free(&v->s.name);
	ms_vbuf_free(&v->c.held);
	ms_vbuf_free(&v->s.held);
	for (size_t i = 0; i < v->qlen; i++) {
		free(q_at(v, i)->tag);
		ms_vbuf_free(&q_at(v, i)->pats);
	}
	free(v->q);
	memset(v, 0, sizeof(*v));
}

void ms_view_set_reply(struct ms_view *v, ms_view_out_fn *reply, void *ctx)
{
	v->reply = reply;
	v->reply_ctx = ctx;
}

void ms_view_set_namespace(struct ms_view *v, const struct ms_view_ns *ns)
{
	v->ns = *ns;
	v->ns_on = 1;
}

int ms_view_ns_name(const struct ms_view_ns *ns, const char *name,
		    int to_dst, struct ms_vbuf *out)
{
	const char *from = to_dst ? ns->src_prefix : ns->dst_prefix;
	const char *to = to_dst ? ns->dst_prefix : ns->src_prefix;
	char a = to_dst ? ns->src_sep : ns->dst_sep;
	char b = to_dst ? ns->dst_sep : ns->src_sep;
	size_t n = strlen(from);
	int r;

	if (strcasecmp(name, "INBOX") == 0 || strncmp(name, from, n) != 0 ||
	    name[n] == '\0')
		return 0;
	out->len = 0;
	r = ms_vbuf_add(out, to, strlen(to));
	for (const char *p = name + n; r == 0 && *p != '\0'; p++) {
		char ch = *p;

		if (a != '\0' && b != '\0' && a != b)
			ch = ch == a ? b : ch == b ? a : ch;
		r = ms_vbuf_add(out, &ch, 1);
	}
	if (r < 0 || ms_vbuf_add(out, "", 1) < 0)
		return -1;
	/* "INBOX.inbox" is no way to INBOX: a folder of its own */
	return strcasecmp(out->p, "INBOX") == 0 ? 0 : 1;
}

void ms_view_set_patterns(struct ms_view *v, ms_view_patterns_fn *patterns)
{
	v->patterns = patterns;
}

void ms_view_fail(struct ms_view *v, const char *why)
{
	fail(v, why);
}

int ms_view_client_some(struct ms_view *v, const char *data, size_t len,
			ms_view_out_fn *out, void *octx, size_t *used_r)
{
	return feed(v, &v->c, 1, data, len, out, octx, used_r);
}

void ms_view_wait(struct ms_view *v)
{
	v->wait = 1;
}

/* Without a wait: every byte is taken (what a lookup that waited leaves
 * is fed again, the same way). */
int ms_view_client(struct ms_view *v, const char *data, size_t len,
		   ms_view_out_fn *out, void *octx)
{
	size_t used;

	while (len > 0) {
		if (feed(v, &v->c, 1, data, len, out, octx, &used) < 0)
			return -1;
		data += used;
		len -= used;
	}
	return 0;
}

int ms_view_server(struct ms_view *v, const char *data, size_t len,
		   ms_view_out_fn *out, void *octx)
{
	size_t used;

	return feed(v, &v->s, 0, data, len, out, octx, &used);
}

size_t ms_view_pending(const struct ms_view *v)
{
	return v->qlen;
}

int ms_view_uses(const struct ms_view *v, const struct ms_view_map *map)
{
	if (map == v->csel || map == v->ssel)
		return 1;
	for (size_t i = 0; i < v->qlen; i++)
		if (v->q[(v->qhead + i) % v->qcap].map == map)
			return 1;
	return 0;
}

const char *ms_view_gave_up(const struct ms_view *v)
{
	return v->gave_up;
}
