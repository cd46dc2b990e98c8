/* libFuzzer target: the gateway's IMAP view (daemon/imap_view.h), which
 * sees every byte of a relayed IMAP session of a moved user, both ways.
 *
 * Input: byte 0 picks the mode and the maps.
 *
 * Bit 7 clear: a session. Byte 1 seeds a re-chunking; then events, each a
 * header byte (bit 7: 1 = server, 0 = client; bits 0-6: length - 1) and
 * that many bytes. The events go to ms_view_client() and ms_view_server()
 * in order, twice: as they are, and with every event cut again at
 * pseudo-random points. Maps: "INBOX" and "Sent" get one (bit 0: INBOX's
 * pairs not monotone; bit 1: Sent's without pairs, and CONDSTORE not
 * withheld), every other name none, "Bad" fails as a store would;
 * the client's "Sent Items" is the server's "Sent"; bit 2: LIST patterns
 * rewritten (every wildcard pattern also asks for "Sent" and below it)
 * and the answers filtered, UTF8=ACCEPT withheld; bit 3: a Courier-style
 * source's namespace shown ("INBOX." and '.' for none and '/', names
 * mapped by ms_view_ns_name() after the rename), whose oracle is that
 * every name mapped maps back to itself. Folder names in
 * literals are held, the view answering the client's "+". The cut run's
 * full lookups ask to wait (ms_view_wait(), as while the gateway reads a
 * folder's pairs) and the client's rest is given again. Oracles: both runs
 * write the same bytes each way and fail the same way; lookup() and
 * name() get NUL-terminated names; a literal's bytes come out as they went
 * in (checked by the run's equality and ASan on every copy).
 *
 * Bit 7 set: sets. The rest is a UID set, translated both ways with each
 * map. Oracles: what comes out is again a set (it parses); a set naming
 * UIDs one by one gives, to the destination and back, the UIDs of the
 * messages it names.
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imap_view.h"

struct maps {
	struct ms_view_map inbox, sent;
	unsigned int mode;
	int wait;			/* full lookups ask to wait */
	struct ms_view *v;
	struct ms_vbuf ns;		/* ns_map()'s answer */
};

static void maps_init(struct maps *m, unsigned int mode)
{
	struct ms_view_pair *p = malloc(8 * sizeof(*p));
	static const uint32_t src[] = { 3, 5, 6, 9, 15, 16, 40, 41 };

	assert(p != NULL);
	for (int i = 0; i < 8; i++) {
		p[i].src = src[i];
		p[i].dst = (mode & 1) ? (uint32_t)(8 - i) * 2 : (uint32_t)i + 1;
	}
	assert(ms_view_map_init(&m->inbox, p, 8, 1111, 2222, 50) == 0);
	m->inbox.full = 1;
	if (mode & 2) {
		assert(ms_view_map_init(&m->sent, NULL, 0, 3333, 4444, 7) == 0);
	} else {
		p = malloc(2 * sizeof(*p));
		assert(p != NULL);
		p[0] = (struct ms_view_pair){ 4000000000u, 1 };
		p[1] = (struct ms_view_pair){ 4294967295u, 2 };
		assert(ms_view_map_init(&m->sent, p, 2, 3333, 4444, 0) == 0);
		m->sent.full = 1;
	}
	m->mode = mode;
	m->ns = (struct ms_vbuf){ 0 };
}

static void maps_clear(struct maps *m)
{
	ms_view_map_clear(&m->inbox);
	ms_view_map_clear(&m->sent);
	ms_vbuf_free(&m->ns);
}

static struct ms_view_map *lookup(void *ctx, const char *name, int full)
{
	struct maps *m = ctx;

	assert(strlen(name) < 1u << 24);
	/* the gateway's pairs being read: the client's rest comes again */
	if (full && m->wait)
		ms_view_wait(m->v);
	if (strcmp(name, "INBOX") == 0)
		return &m->inbox;
	if (strcmp(name, "Bad") == 0)	/* the store failing */
		ms_view_fail(m->v, "store failed");
	return strcmp(name, "Sent") == 0 ? &m->sent : NULL;
}

static const char *renames(const char *name, int to_dst)
{
	if (to_dst)
		return strcmp(name, "Sent Items") == 0 ? "Sent" : NULL;
	return strcmp(name, "Sent") == 0 ? "Sent Items" : NULL;
}

static const struct ms_view_ns courier = { "INBOX.", "", '.', '/' };

/* name in the other namespace; NULL: the same. Mapped back, it is name
 * again. */
static const char *ns_map(struct maps *m, const char *name, int to_dst)
{
	struct ms_vbuf back = { 0 };
	int r = ms_view_ns_name(&courier, name, to_dst, &m->ns);

	if (r <= 0)
		return NULL;
	assert(ms_view_ns_name(&courier, m->ns.p, !to_dst, &back) == 1);
	assert(strcmp(back.p, name) == 0);
	ms_vbuf_free(&back);
	return m->ns.p;
}

static const char *names(void *ctx, const char *name, int to_dst)
{
	struct maps *m = ctx;
	const char *ns, *rn;

	if (!(m->mode & 8))
		return renames(name, to_dst);
	/* as the gateway's: the prefix, then the rename; back the other
	 * way round */
	if (to_dst) {
		ns = ns_map(m, name, 1);
		rn = renames(ns != NULL ? ns : name, 1);
		return rn != NULL ? rn : ns;
	}
	rn = renames(name, 0);
	ns = ns_map(m, rn != NULL ? rn : name, 0);
	return ns != NULL ? ns : rn;
}

static int patterns(void *ctx, const char *pattern, struct ms_vbuf *out)
{
	(void)ctx;
	assert(strlen(pattern) <= 1024);
	if (strpbrk(pattern, "*%") == NULL)
		return 0;
	return ms_vbuf_add(out, "Sent\0Sent/*", 12) < 0 ? -1 : 2;
}

struct run {
	struct ms_vbuf out[2];		/* to the server, to the client */
	int failed;
};

static int out_server(void *ctx, const char *data, size_t len)
{
	return ms_vbuf_add(&((struct run *)ctx)->out[0], data, len);
}

static int out_client(void *ctx, const char *data, size_t len)
{
	return ms_vbuf_add(&((struct run *)ctx)->out[1], data, len);
}

/* The client's bytes, given again from where a lookup stopped them. */
static int client_some(struct ms_view *v, const char *data, size_t n,
		       struct run *r)
{
	size_t used;

	while (n > 0) {
		if (ms_view_client_some(v, data, n, out_server, r, &used) < 0)
			return -1;
		assert(used <= n);
		data += used;
		n -= used;
	}
	return 0;
}

static void play(unsigned int mode, uint8_t seed, const uint8_t *data,
		 size_t size, int rechunk, struct run *r)
{
	struct maps m;
	struct ms_view v;
	uint32_t rnd = seed * 2654435761u + 1;

	maps_init(&m, mode);
	ms_view_init(&v, lookup, names, &m);
	ms_view_set_reply(&v, out_client, r);
	if (mode & 4) {
		ms_view_set_patterns(&v, patterns);
		v.withhold_utf8 = 1;
	}
	if (mode & 8)
		ms_view_set_namespace(&v, &courier);
	m.v = &v;
	m.wait = rechunk;
	v.withhold = !(mode & 2);
	while (size > 0 && !r->failed) {
		int server = data[0] & 0x80;
		size_t len = (size_t)(data[0] & 0x7f) + 1, off = 0;

		data++;
		size--;
		if (len > size)
			len = size;
		while (off < len && !r->failed) {
			size_t n = len - off;
			int ret;

			if (rechunk) {
				rnd = rnd * 1103515245u + 12345u;
				n = 1 + (rnd >> 16) % n;
			}
			ret = server ?
			      ms_view_server(&v, (const char *)data + off, n,
					     out_client, r) :
			      client_some(&v, (const char *)data + off, n, r);
			r->failed = ret < 0;
			assert(r->failed == (ms_view_gave_up(&v) != NULL));
			off += n;
		}
		data += len;
		size -= len;
	}
	ms_view_clear(&v);
	maps_clear(&m);
}

static void check_session(unsigned int mode, const uint8_t *data,
			  size_t size)
{
	struct run a = { 0 }, b = { 0 };

	if (size < 1)
		return;
	play(mode, data[0], data + 1, size - 1, 0, &a);
	play(mode, data[0], data + 1, size - 1, 1, &b);
	assert(a.failed == b.failed);
	if (!a.failed) {
		for (int i = 0; i < 2; i++) {
			assert(a.out[i].len == b.out[i].len);
			assert(a.out[i].len == 0 ||
			       memcmp(a.out[i].p, b.out[i].p, a.out[i].len) == 0);
		}
	}
	for (int i = 0; i < 2; i++) {
		ms_vbuf_free(&a.out[i]);
		ms_vbuf_free(&b.out[i]);
	}
}

/* Is out a set? (Translated again with a map holding nothing: 1.) */
static void assert_set(const struct ms_vbuf *out, int star_ok)
{
	struct ms_view_map none;
	struct ms_vbuf again = { 0 };

	assert(ms_view_map_init(&none, NULL, 0, 1, 1, 0) == 0);
	assert(ms_view_set_to_dst(&none, out->p, out->len, &again) == 1);
	if (!star_ok)
		assert(memchr(out->p, '*', out->len) == NULL);
	ms_vbuf_free(&again);
	ms_view_map_clear(&none);
}

static void check_one_set(const struct ms_view_map *map, const char *set,
			  size_t len)
{
	struct ms_vbuf d = { 0 }, v = { 0 };
	int r = ms_view_set_to_dst(map, set, len, &d);

	assert(r >= 0);
	if (r == 1)
		assert_set(&d, 1);
	r = ms_view_set_to_view(map, set, len, &v);
	assert(r >= 0);
	if (r == 1)
		assert_set(&v, 0);
	/* A single destination UID: there and back. */
	if (len <= 10 && memchr(set, ':', len) == NULL &&
	    memchr(set, ',', len) == NULL && memchr(set, '*', len) == NULL &&
	    r == 1) {
		char num[16];
		unsigned long dst;

		memcpy(num, set, len);	/* the input has no NUL */
		num[len] = '\0';
		dst = strtoul(num, NULL, 10);
		struct ms_vbuf back = { 0 };

		assert(ms_view_set_to_dst(map, v.p, v.len, &back) == 1);
		snprintf(num, sizeof(num), "%lu", dst);
		/* An uncopied UID above base may saturate (2^32 - 1). */
		if (ms_view_uid(map, (uint32_t)dst) != UINT32_MAX)
			assert(strcmp(back.p, num) == 0);
		ms_vbuf_free(&back);
	}
	ms_vbuf_free(&d);
	ms_vbuf_free(&v);
}

static void check_sets(unsigned int mode, const uint8_t *data, size_t size)
{
	struct maps m;

	if (size > 4096)
		return;
	maps_init(&m, mode);
	check_one_set(&m.inbox, (const char *)data, size);
	check_one_set(&m.sent, (const char *)data, size);
	maps_clear(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	if (data[0] & 0x80)
		check_sets(data[0] & 3, data + 1, size - 1);
	else
		check_session(data[0] & 15, data + 1, size - 1);
	return 0;
}
