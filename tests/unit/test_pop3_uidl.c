/* Unit tests for daemon/pop3_uidl.c: UIDL formats, the translation of a
 * destination UIDL through the store, and the relay's rewriter (fed in
 * every split of its input). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "pop3_uidl.h"

/* ---- formats ---- */

static void expect_format(const char *fmt, uint32_t uid, uint32_t uidv,
			  const char *want)
{
	char buf[128];
	uint32_t back = 0;

	assert_int_equal(ms_uidl_format(fmt, uid, uidv, buf, sizeof(buf)),
			 (int)strlen(want));
	assert_string_equal(buf, want);
	assert_int_equal(ms_uidl_parse(fmt, uidv, want, &back), 0);
	assert_int_equal(back, uid);
}

static void test_format(void **state)
{
	/* what Dovecot 2.3 answers to UIDL with its default format (UID 11,
	 * UIDVALIDITY 1795931482): lower-case hex */
	expect_format(MS_UIDL_FORMAT_DEFAULT, 11, 1795931482,
		      "0000000b6b0bbd5a");
	expect_format("%08Xu%08Xv", 0xffffffffu, 1, "ffffffff00000001");
	expect_format("%u", 42, 7, "42");
	expect_format("%v.%u", 4294967295u, 1234, "1234.4294967295");
	expect_format("%Xu-%Xv", 255, 16, "ff-10");
	expect_format("%{uidvalidity}:%{uid}", 3, 99, "99:3");
	expect_format("%08X{uid}%08X{uidvalidity}", 11, 1795931482,
		      "0000000b6b0bbd5a");
	expect_format("x%%%010uy", 5, 1, "x%0000000005y");
	/* a number with several spellings of different lengths: the one
	 * that gives the UIDL back */
	expect_format("%u%v", 45, 123, "45123");
	expect_format("%u%v", 4, 5123, "45123");
}

static void test_format_errors(void **state)
{
	static const char *const bad[] = {
		"", "%v", "abc", "%m", "%f", "%g", "%8u", "%Lu", "%0u",
		"%021u", "%u %v", "%{user}", "%u%", "%Xx",
		"%u-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
	};
	const char *why;
	char buf[128];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		why = NULL;
		if (ms_uidl_format_check(bad[i], &why) == 0)
			fail_msg("format \"%s\" accepted", bad[i]);
		assert_non_null(why);
	}
	assert_int_equal(ms_uidl_format_check(MS_UIDL_FORMAT_DEFAULT, &why), 0);
	assert_int_equal(ms_uidl_format_check("%u", &why), 0);
	assert_int_equal(ms_uidl_format_check("%{uidvalidity}-%020u", &why), 0);
	assert_int_equal(ms_uidl_format("%m", 1, 1, buf, sizeof(buf)), -1);
	/* too small a buffer */
	assert_int_equal(ms_uidl_format("%08Xu%08Xv", 1, 1, buf, 16), -1);
	assert_int_equal(ms_uidl_format("%08Xu%08Xv", 1, 1, buf, 17), 16);
	/* A format that writes nothing still needs room for the NUL: with
	 * none, nothing is written (fuzz_pop3_uidl found the write). */
	buf[0] = 'x';
	assert_int_equal(ms_uidl_format("", 1, 1, buf, 0), -1);
	assert_int_equal(buf[0], 'x');
	assert_int_equal(ms_uidl_format("", 1, 1, buf, 1), 0);
	assert_int_equal(buf[0], '\0');
}

static void test_parse_refuses(void **state)
{
	uint32_t uid = 77;

	/* another UIDVALIDITY, another format, upper-case hex, noise */
	assert_int_equal(ms_uidl_parse("%08Xu%08Xv", 1795931483,
				       "0000000b6b0bbd5a", &uid), -1);
	assert_int_equal(ms_uidl_parse("%08Xu%08Xv", 1795931482,
				       "0000000B6B0BBD5A", &uid), -1);
	assert_int_equal(ms_uidl_parse("%08Xu%08Xv", 1795931482,
				       "0000000b6b0bbd5ax", &uid), -1);
	assert_int_equal(ms_uidl_parse("%08Xu%08Xv", 1795931482,
				       "000000b6b0bbd5a", &uid), -1);
	assert_int_equal(ms_uidl_parse("%u.%v", 1795931482,
				       "0000000b6b0bbd5a", &uid), -1);
	/* no leading zeros where the format has none; no UID 0 */
	assert_int_equal(ms_uidl_parse("%u.%v", 7, "011.7", &uid), -1);
	assert_int_equal(ms_uidl_parse("%u.%v", 7, "0.7", &uid), -1);
	assert_int_equal(ms_uidl_parse("%u.%v", 7, "4294967296.7", &uid), -1);
	assert_int_equal(ms_uidl_parse("%u.%v", 7, "", &uid), -1);
	assert_int_equal(ms_uidl_parse("%u.%v", 7, ".7", &uid), -1);
	assert_int_equal(ms_uidl_parse("%m", 7, "1", &uid), -1);
	assert_int_equal(uid, 77);
	assert_int_equal(ms_uidl_parse("%u.%v", 7, "4294967295.7", &uid), 0);
	assert_int_equal(uid, 4294967295u);
}

/* ---- the rewriter ---- */

struct sink {
	char *data;
	size_t len, cap;
	int fail_after;			/* out() calls before failing, or -1 */
	unsigned int maps;
};

static int sink_out(void *ctx, const char *data, size_t len)
{
	struct sink *k = ctx;

	assert_true(len > 0);
	if (k->fail_after == 0)
		return -1;
	if (k->fail_after > 0)
		k->fail_after--;
	if (k->len + len > k->cap) {
		k->cap = (k->len + len) * 2;
		k->data = realloc(k->data, k->cap);
		assert_non_null(k->data);
	}
	memcpy(k->data + k->len, data, len);
	k->len += len;
	return 0;
}

/* "dN" -> "src-N"; "dfail" is a store error; anything else stays. */
static int fake_map(void *ctx, const char *uidl, char *out, size_t outsz)
{
	struct sink *k = ctx;

	k->maps++;
	if (strcmp(uidl, "dfail") == 0)
		return -1;
	if (uidl[0] != 'd' || uidl[1] < '0' || uidl[1] > '9')
		return 0;
	snprintf(out, outsz, "src-%s", uidl + 1);
	return 1;
}

/* A session's client bytes and server bytes, and what the client must get
 * (every answer's bytes as they are but the UIDLs of UIDL answers). */
static const char client_cmds[] =
	"UIDL\r\nLIST\r\nRETR 1\r\nUIDL 2\r\nSTAT\r\ntop 1 0\r\nCAPA\r\n"
	"UIDL 9\r\nNOOP\r\nlist 1\r\n\r\nuidl \r\nRETR 2\r\nUIDL 1\r\n"
	"QUIT\r\n";
static const char server_in[] =
	"+OK\r\n1 d1\r\n2 d2\r\n3 new-3\r\n.\r\n"
	"+OK 3 messages:\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n"
	/* a body that looks like UIDL answers, dot-stuffed lines */
	"+OK 100 octets\r\nSubject: x\r\n\r\n1 d1\r\n+OK 2 d2\r\n..\r\n"
	"..1 d1\r\n.\r\n"
	"+OK 2 d2\r\n"
	"+OK 3 600\r\n"
	"+OK\r\nSubject: x\r\n\r\n.\r\n"
	"+OK\r\nCAPA\r\nUIDL\r\n.\r\n"
	"-ERR There's no message 9.\r\n"
	"+OK\r\n"
	"+OK 1 100\r\n"
	"-ERR Unknown command.\r\n"
	"+OK\r\n1 d1\n2 d22  \r\n.\r\n"
	"-ERR no such message\r\n"
	"+OK 1 d1\r\n"
	"+OK Logging out.\r\n";
static const char server_want[] =
	"+OK\r\n1 src-1\r\n2 src-2\r\n3 new-3\r\n.\r\n"
	"+OK 3 messages:\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n"
	"+OK 100 octets\r\nSubject: x\r\n\r\n1 d1\r\n+OK 2 d2\r\n..\r\n"
	"..1 d1\r\n.\r\n"
	"+OK 2 src-2\r\n"
	"+OK 3 600\r\n"
	"+OK\r\nSubject: x\r\n\r\n.\r\n"
	"+OK\r\nCAPA\r\nUIDL\r\n.\r\n"
	"-ERR There's no message 9.\r\n"
	"+OK\r\n"
	"+OK 1 100\r\n"
	"-ERR Unknown command.\r\n"
	"+OK\r\n1 src-1\n2 src-22  \r\n.\r\n"
	"-ERR no such message\r\n"
	"+OK 1 src-1\r\n"
	"+OK Logging out.\r\n";

static void run_split(const char *cin, size_t cinlen, const char *sin,
		      size_t sinlen, size_t csplit, size_t step,
		      const char *want, size_t wantlen, int gave_up)
{
	struct ms_pop3_rw rw;
	struct sink k = { .fail_after = -1 };

	ms_pop3_rw_init(&rw, fake_map, &k);
	/* the client's bytes in two pieces */
	ms_pop3_rw_client(&rw, cin, csplit);
	ms_pop3_rw_client(&rw, cin + csplit, cinlen - csplit);
	/* the server's in pieces of `step` */
	for (size_t i = 0; i < sinlen; i += step)
		assert_int_equal(ms_pop3_rw_server(&rw, sin + i,
						   sinlen - i < step ?
						   sinlen - i : step,
						   sink_out, &k), 0);
	if (k.len != wantlen || memcmp(k.data, want, wantlen) != 0)
		fail_msg("client %zu/%zu, step %zu: got\n%.*s\nwant\n%s",
			 csplit, cinlen, step, (int)k.len, k.data, want);
	assert_int_equal(ms_pop3_rw_gave_up(&rw) != NULL, gave_up);
	if (!gave_up)
		assert_int_equal(ms_pop3_rw_pending(&rw), 0);
	ms_pop3_rw_clear(&rw);
	free(k.data);
}

static void test_rewrite(void **state)
{
	size_t cl = strlen(client_cmds), sl = strlen(server_in);

	for (size_t c = 0; c <= cl; c += 7)
		for (size_t step = 1; step <= sl; step++)
			run_split(client_cmds, cl, server_in, sl, c, step,
				  server_want, strlen(server_want), 0);
	/* every split of the server's bytes in two */
	for (size_t at = 0; at <= sl; at++) {
		struct ms_pop3_rw rw;
		struct sink k = { .fail_after = -1 };

		ms_pop3_rw_init(&rw, fake_map, &k);
		ms_pop3_rw_client(&rw, client_cmds, cl);
		assert_int_equal(ms_pop3_rw_pending(&rw), 15);
		assert_int_equal(ms_pop3_rw_server(&rw, server_in, at,
						   sink_out, &k), 0);
		assert_int_equal(ms_pop3_rw_server(&rw, server_in + at, sl - at,
						   sink_out, &k), 0);
		assert_int_equal(k.len, strlen(server_want));
		assert_memory_equal(k.data, server_want, k.len);
		assert_null(ms_pop3_rw_gave_up(&rw));
		ms_pop3_rw_clear(&rw);
		free(k.data);
	}
}

/* Answers that arrive as the commands are sent, one at a time. */
static void test_interleaved(void **state)
{
	struct ms_pop3_rw rw;
	struct sink k = { .fail_after = -1 };

	ms_pop3_rw_init(&rw, fake_map, &k);
	ms_pop3_rw_client(&rw, "UID", 3);
	ms_pop3_rw_client(&rw, "L 7\r", 4);
	assert_int_equal(ms_pop3_rw_pending(&rw), 0);
	ms_pop3_rw_client(&rw, "\n", 1);
	assert_int_equal(ms_pop3_rw_pending(&rw), 1);
	assert_int_equal(ms_pop3_rw_server(&rw, "+OK 7 d7\r\n", 10, sink_out,
					   &k), 0);
	assert_int_equal(ms_pop3_rw_pending(&rw), 0);
	ms_pop3_rw_client(&rw, "RETR 7\r\n", 8);
	assert_int_equal(ms_pop3_rw_server(&rw, "+OK\r\n7 d7\r\n", 11,
					   sink_out, &k), 0);
	assert_int_equal(ms_pop3_rw_pending(&rw), 1);
	assert_int_equal(ms_pop3_rw_server(&rw, ".\r\n", 3, sink_out, &k), 0);
	assert_int_equal(ms_pop3_rw_pending(&rw), 0);
	assert_int_equal(k.len, 27);
	assert_memory_equal(k.data, "+OK 7 src-7\r\n+OK\r\n7 d7\r\n.\r\n", 27);
	ms_pop3_rw_clear(&rw);
	free(k.data);
}

/* A message body with a line far longer than the bound streams through
 * (only the UIDL answers' lines are held), and a later UIDL is still
 * translated. */
static void test_long_body_line(void **state)
{
	struct ms_pop3_rw rw;
	struct sink k = { .fail_after = -1 };
	size_t n = 200000;
	char *body = malloc(n);

	assert_non_null(body);
	memset(body, 'x', n);
	ms_pop3_rw_init(&rw, fake_map, &k);
	ms_pop3_rw_client(&rw, "RETR 1\r\nUIDL\r\n", 14);
	assert_int_equal(ms_pop3_rw_server(&rw, "+OK\r\n", 5, sink_out, &k), 0);
	for (size_t i = 0; i < n; i += 4096)
		assert_int_equal(ms_pop3_rw_server(&rw, body + i, n - i < 4096 ?
						   n - i : 4096, sink_out,
						   &k), 0);
	assert_int_equal(ms_pop3_rw_server(&rw, "\r\n.\r\n+OK\r\n1 d1\r\n.\r\n",
					   19, sink_out, &k), 0);
	assert_null(ms_pop3_rw_gave_up(&rw));
	assert_int_equal(k.len, 5 + n + 5 + 5 + 9 + 3);
	assert_memory_equal(k.data + 5, body, n);
	assert_memory_equal(k.data + 5 + n, "\r\n.\r\n+OK\r\n1 src-1\r\n.\r\n",
			    22);
	/* nothing is held once the answer is over */
	assert_null(rw.buf);
	ms_pop3_rw_clear(&rw);
	free(k.data);
	free(body);
}

/* A line of a UIDL answer longer than the bound: given up, every byte
 * passed on unchanged, later UIDLs too. */
static void test_give_up_long_line(void **state)
{
	static char in[4096], want[4096];
	int n = 0;

	n += snprintf(in + n, sizeof(in) - n, "+OK\r\n1 d1\r\n2 d");
	for (int i = 0; i < MS_POP3_RW_LINE_MAX; i++)
		in[n++] = '5';
	n += snprintf(in + n, sizeof(in) - n, "\r\n.\r\n+OK 1 d1\r\n");
	snprintf(want, sizeof(want), "+OK\r\n1 src-1\r\n%s", in + 11);
	for (size_t step = 1; step < (size_t)n; step += 37)
		run_split("UIDL\r\nUIDL 1\r\n", 14, in, (size_t)n, 3, step,
			  want, strlen(want), 1);
}

static void test_give_up_out_of_step(void **state)
{
	/* an answer that is neither +OK nor -ERR */
	run_split("NOOP\r\nUIDL 1\r\n", 14,
		  "hello\r\n+OK 1 d1\r\n", 17, 0, 1,
		  "hello\r\n+OK 1 d1\r\n", 17, 1);
	/* the status line of UIDL n itself */
	run_split("UIDL 1\r\nUIDL 1\r\n", 16,
		  "* 1 d1\r\n+OK 1 d1\r\n", 18, 0, 5,
		  "* 1 d1\r\n+OK 1 d1\r\n", 18, 1);
	/* a line no command asked for */
	run_split("", 0, "-ERR Disconnected for inactivity.\r\n", 35, 0, 4,
		  "-ERR Disconnected for inactivity.\r\n", 35, 1);
	/* a multi-line answer the rewriter took for a one-line one:
	 * noticed at its second line */
	run_split("XTND\r\nUIDL\r\n", 12,
		  "+OK\r\nline\r\n.\r\n+OK\r\n1 d1\r\n.\r\n", 29, 0, 3,
		  "+OK\r\nline\r\n.\r\n+OK\r\n1 d1\r\n.\r\n", 29, 1);
}

static void test_pipeline_bound(void **state)
{
	struct ms_pop3_rw rw;
	struct sink k = { .fail_after = -1 };
	size_t n = MS_POP3_RW_PIPELINE_MAX + 1;
	char *cmds = malloc(n * 2);

	assert_non_null(cmds);
	for (size_t i = 0; i < n; i++)
		memcpy(cmds + 2 * i, i % 2 ? "L\n" : "X\n", 2);
	ms_pop3_rw_init(&rw, fake_map, &k);
	ms_pop3_rw_client(&rw, cmds, (n - 1) * 2);
	assert_null(ms_pop3_rw_gave_up(&rw));
	assert_int_equal(ms_pop3_rw_pending(&rw), MS_POP3_RW_PIPELINE_MAX);
	ms_pop3_rw_client(&rw, cmds, 2);
	assert_non_null(ms_pop3_rw_gave_up(&rw));
	/* from then on: unchanged */
	assert_int_equal(ms_pop3_rw_server(&rw, "+OK 1 d1\r\n", 10, sink_out,
					   &k), 0);
	assert_int_equal(k.len, 10);
	assert_memory_equal(k.data, "+OK 1 d1\r\n", 10);
	assert_int_equal(k.maps, 0);
	ms_pop3_rw_clear(&rw);
	free(k.data);
	free(cmds);
}

static void test_failures(void **state)
{
	struct ms_pop3_rw rw;
	struct sink k = { .fail_after = -1 };

	/* map() fails: -1, the line is not passed on */
	ms_pop3_rw_init(&rw, fake_map, &k);
	ms_pop3_rw_client(&rw, "UIDL\r\n", 6);
	assert_int_equal(ms_pop3_rw_server(&rw, "+OK\r\n1 dfail\r\n2 d2\r\n",
					   20, sink_out, &k), -1);
	assert_int_equal(k.len, 5);
	ms_pop3_rw_clear(&rw);
	free(k.data);

	/* out() fails */
	memset(&k, 0, sizeof(k));
	k.fail_after = 1;
	ms_pop3_rw_init(&rw, fake_map, &k);
	ms_pop3_rw_client(&rw, "UIDL\r\n", 6);
	assert_int_equal(ms_pop3_rw_server(&rw, "+OK\r\n1 d1\r\n", 11,
					   sink_out, &k), -1);
	ms_pop3_rw_clear(&rw);
	free(k.data);
}

/* ---- translation through a store ---- */

struct tstore {
	char dir[64], path[128];
	struct ms_store *store;
	struct ms_uidl_map map;
};

static int store_setup(void **state)
{
	struct tstore *t = calloc(1, sizeof(*t));
	struct ms_folder_state fs;
	int64_t user;

	assert_non_null(t);
	snprintf(t->dir, sizeof(t->dir), "/tmp/ms-uidl-test.XXXXXX");
	assert_non_null(mkdtemp(t->dir));
	snprintf(t->path, sizeof(t->path), "%s/store.db", t->dir);
	assert_int_equal(ms_store_open(t->path, &t->store, NULL), 0);
	assert_int_equal(ms_store_user_get(t->store, "alice", &user), 0);
	assert_int_equal(ms_store_folder_get(t->store, user, "INBOX", &fs), 0);
	snprintf(fs.dst_name, sizeof(fs.dst_name), "INBOX");
	fs.src_uidvalidity = 1600000000;
	fs.dst_uidvalidity = 1700000000;
	assert_int_equal(ms_store_folder_update(t->store, &fs), 0);
	t->map.folder_id = fs.id;
	t->map.src_uidvalidity = fs.src_uidvalidity;
	t->map.dst_uidvalidity = fs.dst_uidvalidity;
	t->map.src_format = MS_UIDL_FORMAT_DEFAULT;
	t->map.dst_format = MS_UIDL_FORMAT_DEFAULT;
	*state = t;
	return 0;
}

static int store_teardown(void **state)
{
	struct tstore *t = *state;
	char p[200];

	ms_uidl_map_clear(&t->map);
	ms_store_close(&t->store);
	for (const char *const *sfx = (const char *const[]){ "", "-wal",
	     "-shm", NULL }; *sfx != NULL; sfx++) {
		snprintf(p, sizeof(p), "%s%s", t->path, *sfx);
		unlink(p);
	}
	rmdir(t->dir);
	free(t);
	return 0;
}

static void put(struct tstore *t, uint32_t src_uid, const char *uidl,
		int state, uint32_t dst_uid)
{
	struct ms_msg_rec r;

	memset(&r, 0, sizeof(r));
	r.src_uid = src_uid;
	snprintf(r.uidl, sizeof(r.uidl), "%s", uidl);
	r.state = state;
	r.dst_uid = dst_uid;
	assert_int_equal(ms_store_msg_put(t->store, t->map.folder_id, &r), 0);
}

/* The map as a session reads it at login, from the records put so far. */
static int tr(struct tstore *t, const char *uidl, char *out, size_t outsz)
{
	int oom;

	assert_int_equal(ms_uidl_map_load(&t->map, t->store, &oom), 0);
	return ms_uidl_translate(&t->map, uidl, out, outsz);
}

static int translate(struct tstore *t, uint32_t dst_uid, uint32_t dst_uidv,
		     char *out)
{
	char uidl[64];

	ms_uidl_format(t->map.dst_format, dst_uid, dst_uidv, uidl,
		       sizeof(uidl));
	return tr(t, uidl, out, MS_UIDL_MAX + 3);
}

static void test_translate(void **state)
{
	struct tstore *t = *state;
	char out[MS_UIDL_MAX + 3], want[64];

	put(t, 5, "", MS_MSG_DONE, 1);
	put(t, 9, "", MS_MSG_DONE, 2);
	put(t, 12, "", MS_MSG_INTENT, 0);
	/* copied messages: the source's UIDL */
	assert_int_equal(translate(t, 1, 1700000000, out), 1);
	ms_uidl_format(MS_UIDL_FORMAT_DEFAULT, 5, 1600000000, want,
		       sizeof(want));
	assert_string_equal(out, want);
	assert_int_equal(translate(t, 2, 1700000000, out), 1);
	ms_uidl_format(MS_UIDL_FORMAT_DEFAULT, 9, 1600000000, want,
		       sizeof(want));
	assert_string_equal(out, want);
	/* arrived after the copy: its own */
	assert_int_equal(translate(t, 3, 1700000000, out), 0);
	/* another UIDVALIDITY (a re-created INBOX), another format: never
	 * mapped */
	assert_int_equal(translate(t, 1, 1700000001, out), 0);
	assert_int_equal(tr(t, "1.1700000000", out,
					   sizeof(out)), 0);
	t->map.dst_format = "%u.%v";
	assert_int_equal(tr(t, "1.1700000000", out,
					   sizeof(out)), 1);
	assert_string_equal(out, "000000055f5e1000");
	/* the source's format applies to the source's UIDLs */
	t->map.src_format = "%v-%u";
	assert_int_equal(tr(t, "2.1700000000", out,
					   sizeof(out)), 1);
	assert_string_equal(out, "1600000000-9");
}

/* A new message whose own UIDL is a copied message's source UIDL (equal
 * UIDVALIDITYs): it must not pass for that one. */
static void test_translate_collision(void **state)
{
	struct tstore *t = *state;
	char out[MS_UIDL_MAX + 3], want[64];

	t->map.dst_uidvalidity = t->map.src_uidvalidity;
	put(t, 3, "", MS_MSG_DONE, 1);
	put(t, 4, "", MS_MSG_DONE, 2);
	/* UID 2 is the copy of source UID 4: fine */
	assert_int_equal(translate(t, 2, t->map.src_uidvalidity, out), 1);
	ms_uidl_format(MS_UIDL_FORMAT_DEFAULT, 4, t->map.src_uidvalidity, want,
		       sizeof(want));
	assert_string_equal(out, want);
	/* UID 3 arrived later, and the source's UID 3 has its UIDL */
	assert_int_equal(translate(t, 3, t->map.src_uidvalidity, out), 1);
	ms_uidl_format(MS_UIDL_FORMAT_DEFAULT, 3, t->map.src_uidvalidity, want,
		       sizeof(want));
	strcat(want, "-d");
	assert_string_equal(out, want);
	/* UID 5: no source message had that UIDL */
	assert_int_equal(translate(t, 5, t->map.src_uidvalidity, out), 0);
}

/* Copied from a POP3 source: the record's UIDL is the source's. */
static void test_translate_pop3_source(void **state)
{
	struct tstore *t = *state;
	char out[MS_UIDL_MAX + 3];

	t->map.src_uidvalidity = 0;
	put(t, 0, "Xs8d7f6@pop.example", MS_MSG_DONE, 1);
	put(t, 0, "0000000270000000", MS_MSG_DONE, 2);
	assert_int_equal(translate(t, 1, 1700000000, out), 1);
	assert_string_equal(out, "Xs8d7f6@pop.example");
	/* a later message whose UIDL a source message had */
	assert_int_equal(tr(t, "0000000270000000", out,
					   sizeof(out)), 1);
	assert_string_equal(out, "0000000270000000-d");
	assert_int_equal(translate(t, 3, 1700000000, out), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_format),
		cmocka_unit_test(test_format_errors),
		cmocka_unit_test(test_parse_refuses),
		cmocka_unit_test(test_rewrite),
		cmocka_unit_test(test_interleaved),
		cmocka_unit_test(test_long_body_line),
		cmocka_unit_test(test_give_up_long_line),
		cmocka_unit_test(test_give_up_out_of_step),
		cmocka_unit_test(test_pipeline_bound),
		cmocka_unit_test(test_failures),
		cmocka_unit_test_setup_teardown(test_translate, store_setup,
						store_teardown),
		cmocka_unit_test_setup_teardown(test_translate_collision,
						store_setup, store_teardown),
		cmocka_unit_test_setup_teardown(test_translate_pop3_source,
						store_setup, store_teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
