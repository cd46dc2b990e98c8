/* libFuzzer target: the control socket's request handling
 * (ms_control_request(): a request line -> the JSON reply) against a real
 * SQLite store in a temporary directory and no gateway (what needs one
 * answers "no gateway", so nothing starts real work). Each input is split
 * into lines, one request each, as the socket does.
 *
 * Oracles besides the sanitizers: every line gets exactly one reply, a
 * JSON object with a boolean "ok"; a refusal carries a string "error";
 * a request that is not valid JSON, or has a NUL byte, is refused. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "control.h"
#include "store.h"

static struct ms_control *ctl;
static struct ms_store *store;
static char dir[] = "/tmp/fuzz_control.XXXXXX";
static char db[64];

static void cleanup(void)
{
	static const char *const suffix[] = { "", "-wal", "-shm" };
	char p[96];

	ms_control_free(&ctl);
	ms_store_close(&store);
	for (size_t i = 0; i < 3; i++) {
		snprintf(p, sizeof(p), "%s%s", db, suffix[i]);
		unlink(p);
	}
	rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char *err = NULL;

	assert(mkdtemp(dir) != NULL);
	snprintf(db, sizeof(db), "%s/store.db", dir);
	if (ms_store_open(db, &store, &err) < 0) {
		fprintf(stderr, "fuzz_control: store: %s\n", err);
		abort();
	}
	ctl = ms_control_detached(NULL, store);
	assert(ctl != NULL);
	atexit(cleanup);
	return 0;
}

static void check_reply(const char *line, size_t len, json_t *rep)
{
	json_t *ok, *error;
	json_error_t jerr;
	json_t *req;

	assert(rep != NULL && json_is_object(rep));
	ok = json_object_get(rep, "ok");
	error = json_object_get(rep, "error");
	assert(json_is_boolean(ok));
	if (json_is_false(ok))
		assert(json_is_string(error));
	/* What jansson itself refuses, the daemon refuses too. */
	req = memchr(line, '\0', len) == NULL ?
		json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr) : NULL;
	if (req == NULL || !json_is_object(req))
		assert(json_is_false(ok) && json_is_string(error));
	json_decref(req);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *p = (const char *)data, *end = p + size;

	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t len = nl != NULL ? (size_t)(nl - p) : (size_t)(end - p);
		json_t *rep = ms_control_request(ctl, p, len);

		check_reply(p, len, rep);
		json_decref(rep);
		p += len + 1;
	}
	return 0;
}
