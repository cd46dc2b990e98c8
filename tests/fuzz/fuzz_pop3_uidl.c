/* libFuzzer target: the POP3 UIDL rewriter and the UIDL formats
 * (daemon/pop3_uidl.h), which see every byte of a relayed POP3 session of a
 * user on the destination.
 *
 * Input: byte 0 picks the mode.
 *
 * Bit 7 clear: a session. Byte 1 seeds a re-chunking; then events, each a
 * header byte (bit 7: 1 = server, 0 = client; bits 0-6: length - 1) and
 * that many bytes. The events go to ms_pop3_rw_client() and
 * ms_pop3_rw_server() in order, twice: as they are, and with every event cut
 * again at pseudo-random points. map() is a fake that rewrites
 * deterministically (bits 0-1 of byte 0: never, always, for UIDLs of even
 * length; bit 2: fail on a UIDL holding '!'). Oracles: both runs write the
 * same bytes, give up for the same reason, fail at the same point; map()
 * only sees UIDLs (1 to 70 printable characters) and only when the client
 * sent a UIDL command; a map() that keeps everything leaves the stream as
 * it was; each rewrite changes the length by exactly what map() changed
 * (all but the start of a UIDL answer's line the stream ends in, which the
 * rewriter holds until its end).
 *
 * Bit 7 set: formats. Bytes 1-8 are a UID and a UIDVALIDITY, byte 9 a
 * buffer size, then "FORMAT NUL UIDL". Oracles: a format that
 * ms_uidl_format_check() accepts writes 1 to 70 printable characters that
 * ms_uidl_parse() maps back to the UID; ms_uidl_format() never writes past
 * its buffer; a UIDL that ms_uidl_parse() accepts is exactly what the
 * format gives for the UID it returns; the UIDL translated through a map
 * of eight copied messages (check_translate()).
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pop3_uidl.h"

struct run {
	unsigned int mode;		/* byte 0 */
	char *out;			/* everything out() got */
	size_t outlen;
	long delta;			/* length changes by map() */
	unsigned int maps;
	int failed;			/* ms_pop3_rw_server() returned -1 */
	size_t held;			/* at the end: the start of a UIDL
					   answer's line, still in the
					   rewriter's buffer */
};

static int fake_map(void *ctx, const char *uidl, char *out, size_t outsz)
{
	struct run *r = ctx;
	size_t len = strlen(uidl);

	assert(len >= 1 && len <= MS_UIDL_MAX);
	for (size_t i = 0; i < len; i++)
		assert(uidl[i] > ' ' && uidl[i] < 0x7f);
	assert(outsz >= MS_UIDL_MAX + 3);
	r->maps++;
	if ((r->mode & 4) && strchr(uidl, '!') != NULL)
		return -1;
	if ((r->mode & 3) == 0 || ((r->mode & 3) == 2 && len % 2 == 1))
		return 0;
	/* "s-" and the UIDL backwards: longer, and as long as a translated
	 * UIDL may be (ms_uidl_translate's "-d" suffix). */
	out[0] = 's';
	out[1] = '-';
	for (size_t i = 0; i < len; i++)
		out[2 + i] = uidl[len - 1 - i];
	out[len + 2] = '\0';
	r->delta += 2;
	return 1;
}

static int collect(void *ctx, const char *data, size_t len)
{
	struct run *r = ctx;

	assert(len > 0);
	r->out = realloc(r->out, r->outlen + len);
	assert(r->out != NULL);
	memcpy(r->out + r->outlen, data, len);
	r->outlen += len;
	return 0;
}

static uint32_t next_rand(uint32_t *seed)
{
	*seed ^= *seed << 13;
	*seed ^= *seed >> 17;
	*seed ^= *seed << 5;
	return *seed;
}

/* The event at *pos: 1 the server's bytes, 0 the client's, -1 none left. */
static int next_event(const uint8_t *d, size_t size, size_t *pos,
		      const char **bytes_r, size_t *len_r)
{
	size_t i = *pos, len;

	if (i >= size)
		return -1;
	len = (size_t)(d[i] & 0x7f) + 1;
	if (len > size - i - 1)
		len = size - i - 1;
	*bytes_r = (const char *)d + i + 1;
	*len_r = len;
	*pos = i + 1 + len;
	return (d[i] & 0x80) != 0;
}

/* Plays the events; seed 0: each event in one call. Returns the reason the
 * rewriter gave up, or NULL. */
static const char *play(struct run *r, const uint8_t *d, size_t size,
			uint32_t seed, size_t *pending_r)
{
	struct ms_pop3_rw rw;
	const char *why, *bytes;
	size_t pos = 0, len;
	int server;

	ms_pop3_rw_init(&rw, fake_map, r);
	while (!r->failed &&
	       (server = next_event(d, size, &pos, &bytes, &len)) >= 0) {
		for (size_t off = 0, n; off < len && !r->failed; off += n) {
			n = seed != 0 ? 1 + next_rand(&seed) % (len - off) :
				len - off;
			if (server)
				r->failed = ms_pop3_rw_server(&rw, bytes + off, n,
							      collect, r) < 0;
			else
				ms_pop3_rw_client(&rw, bytes + off, n);
		}
	}
	why = ms_pop3_rw_gave_up(&rw);
	r->held = rw.buffering ? rw.buflen : 0;
	*pending_r = ms_pop3_rw_pending(&rw);
	ms_pop3_rw_clear(&rw);
	return why;
}

/* Did the client send a line whose keyword is UIDL, as the rewriter reads
 * keywords (CRs ignored, up to the first space)? */
static int client_sent_uidl(const uint8_t *d, size_t size)
{
	const char *bytes;
	char kw[5];
	size_t pos = 0, len, kwlen = 0;
	int server, in_kw = 1;

	while ((server = next_event(d, size, &pos, &bytes, &len)) >= 0) {
		for (size_t k = 0; !server && k < len; k++) {
			if (bytes[k] == '\n') {
				if (kwlen == 4 && strncasecmp(kw, "UIDL", 4) == 0)
					return 1;
				kwlen = 0;
				in_kw = 1;
			} else if (bytes[k] == ' ') {
				in_kw = 0;
			} else if (bytes[k] != '\r' && in_kw && kwlen < sizeof(kw)) {
				kw[kwlen++] = bytes[k];
			}
		}
	}
	return 0;
}

/* All the server's bytes, in order, into all. Returns their length. */
static size_t server_bytes(const uint8_t *d, size_t size, char *all)
{
	const char *bytes;
	size_t pos = 0, len, n = 0;
	int server;

	while ((server = next_event(d, size, &pos, &bytes, &len)) >= 0) {
		if (server) {
			memcpy(all + n, bytes, len);
			n += len;
		}
	}
	return n;
}

/* memcmp() == 0, also for empty (maybe NULL) buffers */
static int same(const char *x, const char *y, size_t n)
{
	return n == 0 || memcmp(x, y, n) == 0;
}

static void check_session(unsigned int mode, const uint8_t *d, size_t size)
{
	struct run a = { .mode = mode }, b = { .mode = mode };
	uint32_t seed = (d[0] | 0x100u) * 2654435761u;
	const char *why_a, *why_b;
	size_t pend_a, pend_b, n;
	char *all = malloc(size + 1);

	why_a = play(&a, d + 1, size - 1, 0, &pend_a);
	why_b = play(&b, d + 1, size - 1, seed, &pend_b);
	assert(a.failed == b.failed);
	assert(a.outlen == b.outlen && same(a.out, b.out, a.outlen));
	assert((why_a == NULL) == (why_b == NULL));
	assert(why_a == NULL || strcmp(why_a, why_b) == 0);
	assert(pend_a == pend_b);
	assert(a.maps == b.maps && a.delta == b.delta && a.held == b.held);
	if (a.maps > 0)
		assert(client_sent_uidl(d + 1, size - 1));
	if (!a.failed) {
		n = server_bytes(d + 1, size - 1, all);
		assert(a.outlen + a.held == n + (size_t)a.delta);
		if (a.delta == 0)
			assert(same(a.out, all, a.outlen));
	}
	free(all);
	free(a.out);
	free(b.out);
}

/* The server's uidl through a map as a session loads it (the INBOX's
 * records, here made by hand): with the format as both sides' and the
 * UIDVALIDITY as the destination's, the copied messages are UIDs 1-8 of
 * the destination, source UIDs 101-108 (src_pop3: the source's UIDLs
 * "s1".."s8" instead). Oracles: 0 or 1, out a string that fits; a
 * copied message's UIDL gives the source's; 0 leaves uidl as it is. */
static void check_translate(const char *fmt, uint32_t uidv, const char *uidl,
			    int src_pop3)
{
	struct ms_uidl_copied copied[8];
	uint32_t src_uids[8];
	size_t uidls[8];
	char pool[8 * 3], out[MS_UIDL_MAX + 3], want[MS_UIDL_MAX + 3];
	struct ms_uidl_map map = {
		.src_uidvalidity = src_pop3 ? 0 : (uidv ^ 1) ? uidv ^ 1 : 2,
		.dst_uidvalidity = uidv, .src_format = fmt, .dst_format = fmt,
		.copied = copied, .ncopied = 8, .src_uids = src_uids,
		.nsrc = src_pop3 ? 0 : 8, .uidls = uidls,
		.nuidls = src_pop3 ? 8 : 0, .pool = pool,
	};
	uint32_t uid;
	int r;

	for (int i = 0; i < 8; i++) {
		snprintf(pool + 3 * i, 3, "s%d", i + 1);
		uidls[i] = (size_t)(3 * i);
		src_uids[i] = (uint32_t)(101 + i);
		copied[i] = (struct ms_uidl_copied){
			(uint32_t)(i + 1), src_pop3 ? 0 : (uint32_t)(101 + i),
			src_pop3 ? (size_t)(3 * i) : SIZE_MAX };
	}
	memset(out, 0x55, sizeof(out));
	r = ms_uidl_translate(&map, uidl, out, sizeof(out));
	assert(r == 0 || r == 1);
	if (r == 1)
		assert(memchr(out, '\0', sizeof(out)) != NULL);
	if (ms_uidl_parse(fmt, uidv, uidl, &uid) == 0 && uid >= 1 &&
	    uid <= 8 && uidv != 0 &&
	    (src_pop3 ? snprintf(want, sizeof(want), "s%u", uid) :
	     ms_uidl_format(fmt, uid + 100, map.src_uidvalidity, want,
			    sizeof(want))) > 0)
		assert(r == 1 && strcmp(out, want) == 0);
}

static void check_format(const uint8_t *d, size_t size)
{
	uint32_t uid, uidv, back;
	size_t bufsz, n;
	char *fmt, *uidl, *buf, full[256];
	const char *why = NULL;
	int len;

	if (size < 10)
		return;
	memcpy(&uid, d + 1, 4);
	memcpy(&uidv, d + 5, 4);
	bufsz = d[9];
	fmt = strndup((const char *)d + 10, size - 10);
	n = strlen(fmt);
	uidl = n < size - 10 ? strndup((const char *)d + 11 + n, size - 11 - n) :
		strdup("");

	/* Never past the buffer: exactly bufsz bytes on the heap. */
	buf = malloc(bufsz);
	len = ms_uidl_format(fmt, uid, uidv, buf, bufsz);
	assert(len < 0 || ((size_t)len < bufsz && buf[len] == '\0' &&
			   strlen(buf) == (size_t)len));
	free(buf);

	if (ms_uidl_format_check(fmt, &why) == 0) {
		len = ms_uidl_format(fmt, uid, uidv, full, sizeof(full));
		assert(len >= 1 && len <= MS_UIDL_MAX);
		for (int i = 0; i < len; i++)
			assert(full[i] > ' ' && full[i] < 0x7f);
		if (uid != 0) {
			assert(ms_uidl_parse(fmt, uidv, full, &back) == 0);
			assert(back == uid);
		}
	} else {
		assert(why != NULL && *why != '\0');
	}

	if (ms_uidl_parse(fmt, uidv, uidl, &back) == 0) {
		len = ms_uidl_format(fmt, back, uidv, full, sizeof(full));
		assert(len >= 0 && strcmp(full, uidl) == 0);
	}
	if (strlen(uidl) <= MS_UIDL_MAX) {
		check_translate(fmt, uidv, uidl, 0);
		check_translate(fmt, uidv, uidl, 1);
	}
	free(fmt);
	free(uidl);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	if (data[0] & 0x80)
		check_format(data, size);
	else
		check_session(data[0], data + 1, size - 1);
	return 0;
}
