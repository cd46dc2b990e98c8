/* libFuzzer target: the reply of Dovecot's doveadm HTTP API as the mover
 * reads it from the destination (ms_doveadm_reply() in daemon/doveadm.c:
 * the status line, the header's end and Content-Length, the JSON body).
 *
 * Input: the reply's bytes. Oracles: the verdict is MORE, OK or FAILED;
 * OK comes with no error text, FAILED with one that ends inside its buffer
 * and holds no control character (it goes into a log line and the JSON
 * report); and a reply read as it arrives gives what the whole of it gives:
 * when a part of it cut at one of a few points (taken from the input) has a
 * verdict, the whole, read with the connection still open, has the same
 * one with the same text. At the close nothing more comes: a reply with a
 * header's end and no Content-Length has a verdict then.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "doveadm.h"

static int read_reply(const uint8_t *data, size_t len, int at_close,
		      char *err, size_t errsz)
{
	char *buf = malloc(len + 1);
	int r;

	assert(buf != NULL);
	memcpy(buf, data, len);
	buf[len] = '\0';
	memset(err, 'x', errsz);
	r = ms_doveadm_reply(buf, len, at_close, err, errsz);
	free(buf);
	assert(r == MS_DOVEADM_MORE || r == MS_DOVEADM_OK ||
	       r == MS_DOVEADM_FAILED);
	assert(memchr(err, '\0', errsz) != NULL);
	if (r == MS_DOVEADM_OK)
		assert(err[0] == '\0');
	if (r == MS_DOVEADM_FAILED) {
		assert(err[0] != '\0');
		for (const char *p = err; *p != '\0'; p++)
			assert((unsigned char)*p >= 0x20 && *p != 0x7f);
	}
	return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char whole[200], part[200], closed[200];
	int r = read_reply(data, size, 0, whole, sizeof(whole));
	int rc = read_reply(data, size, 1, closed, sizeof(closed));
	const char *hend, *cl;
	char *s;

	/* Cut points: the first bytes of the input say where. */
	for (size_t i = 0; i < 4 && i < size; i++) {
		size_t cut = size > 0 ? data[i] * size / 256 : 0;
		int rp = read_reply(data, cut, 0, part, sizeof(part));

		if (rp != MS_DOVEADM_MORE) {
			assert(rp == r);
			assert(strcmp(part, whole) == 0);
		}
	}
	if (r != MS_DOVEADM_MORE) {
		assert(rc == r);
		assert(strcmp(closed, whole) == 0);
	}
	s = malloc(size + 1);
	assert(s != NULL);
	memcpy(s, data, size);
	s[size] = '\0';
	hend = strstr(s, "\r\n\r\n");
	cl = strcasestr(s, "\r\nContent-Length:");
	if (hend != NULL && (cl == NULL || cl > hend))
		assert(rc != MS_DOVEADM_MORE);
	free(s);
	return 0;
}
