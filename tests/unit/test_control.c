/* Unit tests for the control socket's request handling (daemon/control.c,
 * ms_control_request()) against a real store and no gateway: what a local
 * client sending wrong types, missing fields, NUL bytes or broken text
 * gets, and that a refused request changes nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "control.h"
#include "store.h"

struct fixture {
	char dir[64];
	char path[128];
	struct ms_store *store;
	struct ms_control *ctl;
};

static json_t *request(struct fixture *f, const char *line, size_t len)
{
	json_t *rep = ms_control_request(f->ctl, line, len);
	char *text;

	assert_non_null(rep);
	/* Whatever it says, it must go out as one line of JSON. */
	text = json_dumps(rep, JSON_COMPACT);
	assert_non_null(text);
	assert_null(strchr(text, '\n'));
	free(text);
	return rep;
}

/* The request must be refused with want in the error. */
static void refused(struct fixture *f, const char *line, size_t len,
		    const char *want)
{
	json_t *rep = request(f, line, len);
	const char *err = json_string_value(json_object_get(rep, "error"));

	if (!json_is_false(json_object_get(rep, "ok")) || err == NULL ||
	    strstr(err, want) == NULL)
		fail_msg("%.*s: got %s, want an error with \"%s\"", (int)len,
			 line, json_dumps(rep, JSON_COMPACT), want);
	json_decref(rep);
}

#define REFUSED(f, s, want) refused(f, s, strlen(s), want)

/* The request must succeed; returns the reply. */
static json_t *ok(struct fixture *f, const char *line)
{
	json_t *rep = request(f, line, strlen(line));

	if (!json_is_true(json_object_get(rep, "ok")))
		fail_msg("%s: %s", line, json_dumps(rep, JSON_COMPACT));
	return rep;
}

static const char *user_field(struct fixture *f, const char *user,
			      const char *field)
{
	static char value[64];
	char line[300];
	json_t *rep;

	snprintf(line, sizeof(line), "{\"cmd\":\"user.show\",\"user\":\"%s\"}",
		 user);
	rep = request(f, line, strlen(line));
	snprintf(value, sizeof(value), "%s", json_string_value(
		json_object_get(json_object_get(rep, "user"), field)) ?: "-");
	json_decref(rep);
	return value;
}

struct case_ {
	const char *line;
	const char *want;	/* in the error */
};

static void refused_all(struct fixture *f, const struct case_ *c, size_t n)
{
	for (size_t i = 0; i < n; i++)
		REFUSED(f, c[i].line, c[i].want);
}

static void not_json(void **state)
{
	static const struct case_ cases[] = {
		{ "", "bad JSON" },
		{ "{\"cmd\":\"status\"} trailing", "bad JSON" },
		{ "[\"status\"]", "a request is a JSON object" },
		{ "\"status\"", "bad JSON" },
		{ "{\"cmd\":\"status\",\"cmd\":\"user.list\"}", "duplicate" },
		{ "{\"cmd\":\"status\",\"x\":1e999}", "bad JSON" },
		{ "{\"cmd\":\"status\",\"x\":99999999999999999999999}",
		  "bad JSON" },
		{ "{\"cmd\":\"a\\u0000b\"}", "bad JSON" },
		/* Bytes JSON cannot carry, quoted back by the parser. */
		{ "{\"cmd\":\"x\\u161\xcb\x86\xdd\"}", "bad JSON" },
		{ "{\"cmd\":\"\xff\xfe\"}", "bad JSON" },
	};
	struct fixture *f = *state;

	refused(f, "{\"cmd\":\"status\"}\0junk", 22, "NUL byte");
	refused(f, "{\"cmd\":\"sta\0tus\"}", 17, "NUL byte");
	refused_all(f, cases, sizeof(cases) / sizeof(cases[0]));
}

static void wrong_types(void **state)
{
	static const struct case_ cases[] = {
		{ "{}", "no \"cmd\"" },
		{ "{\"cmd\":5}", "\"cmd\" must be a string" },
		{ "{\"cmd\":[\"status\"]}", "\"cmd\" must be a string" },
		{ "{\"cmd\":\"shutdown\"}", "unknown command" },
		{ "{\"cmd\":\"user.show\"}", "a user name is needed" },
		{ "{\"cmd\":\"user.show\",\"user\":7}",
		  "\"user\" must be a string" },
		{ "{\"cmd\":\"user.show\",\"user\":\"\"}",
		  "a user name is needed" },
		{ "{\"cmd\":\"kick\",\"user\":{}}", "\"user\" must be a string" },
		{ "{\"cmd\":\"migrate\",\"user\":true}",
		  "\"user\" must be a string" },
		{ "{\"cmd\":\"rollback\"}", "a user name is needed" },
		/* Once meant the default policy: every user's. */
		{ "{\"cmd\":\"policy.set\",\"domain\":5,\"policy\":\"off\"}",
		  "\"domain\" must be a string" },
		{ "{\"cmd\":\"policy.set\",\"policy\":1}",
		  "\"policy\" must be a string" },
		{ "{\"cmd\":\"policy.set\"}", "a policy is needed" },
		/* No gateway here: what needs one says so, nothing starts. */
		{ "{\"cmd\":\"migrate\",\"user\":\"bob\"}", "no gateway" },
		{ "{\"cmd\":\"policy.set\",\"policy\":\"off\"}", "no gateway" },
	};
	struct fixture *f = *state;

	refused_all(f, cases, sizeof(cases) / sizeof(cases[0]));
	json_decref(ok(f, "{\"cmd\":\"kick\",\"user\":\"bob\"}"));
	json_decref(ok(f, "{\"cmd\":\"status\"}"));
}

static void user_names(void **state)
{
	struct fixture *f = *state;
	char name[256], line[400];

	REFUSED(f, "{\"cmd\":\"user.add\",\"user\":\"a\\u0001b\"}",
		"control character");
	REFUSED(f, "{\"cmd\":\"user.add\",\"user\":\"a\\nb\"}",
		"control character");
	REFUSED(f, "{\"cmd\":\"user.add\",\"user\":\"a\\u007fb\"}",
		"control character");
	memset(name, 'n', sizeof(name));
	name[255] = '\0';			/* 255 bytes: the longest */
	snprintf(line, sizeof(line), "{\"cmd\":\"user.add\",\"user\":\"%s\"}",
		 name);
	json_decref(ok(f, line));
	snprintf(line, sizeof(line), "{\"cmd\":\"user.add\",\"user\":\"%sn\"}",
		 name);
	REFUSED(f, line, "user name too long");
	json_decref(ok(f, "{\"cmd\":\"user.add\",\"user\":\"m\xc3\xbcller\"}"));
	/* users to move, and no gateway to start them: nothing starts */
	REFUSED(f, "{\"cmd\":\"migrate.all\"}", "no gateway");
}

/* A refused user.add or user.set leaves the store as it was. */
static void refused_changes_nothing(void **state)
{
	struct fixture *f = *state;

	REFUSED(f, "{\"cmd\":\"user.add\",\"user\":\"carol\",\"policy\":"
		"\"bogus\"}", "invalid policy");
	REFUSED(f, "{\"cmd\":\"user.add\",\"user\":\"carol\",\"state\":5}",
		"\"state\" must be a string");
	REFUSED(f, "{\"cmd\":\"user.add\",\"user\":\"carol\",\"state\":"
		"\"gone\"}", "invalid state");
	REFUSED(f, "{\"cmd\":\"user.show\",\"user\":\"carol\"}",
		"no such user");

	json_decref(ok(f, "{\"cmd\":\"user.add\",\"user\":\"dave\",\"policy\":"
		       "\"hold\"}"));
	REFUSED(f, "{\"cmd\":\"user.set\",\"user\":\"dave\",\"state\":"
		"\"copying\",\"policy\":\"sometimes\"}", "invalid policy");
	REFUSED(f, "{\"cmd\":\"user.set\",\"user\":\"dave\",\"state\":"
		"\"copying\",\"force\":\"yes\"}", "\"force\" must be true");
	REFUSED(f, "{\"cmd\":\"user.set\",\"user\":\"dave\"}", "nothing to set");
	REFUSED(f, "{\"cmd\":\"user.set\",\"user\":\"nobody-here\",\"state\":"
		"\"source\"}", "no such user");
	assert_string_equal(user_field(f, "dave", "state"), "source");
	assert_string_equal(user_field(f, "dave", "policy"), "hold");
	REFUSED(f, "{\"cmd\":\"user.show\",\"user\":\"nobody-here\"}",
		"no such user");

	json_decref(ok(f, "{\"cmd\":\"user.set\",\"user\":\"dave\",\"state\":"
		       "\"destination\",\"policy\":\"default\"}"));
	assert_string_equal(user_field(f, "dave", "state"), "destination");
	assert_string_equal(user_field(f, "dave", "policy"), "default");
	REFUSED(f, "{\"cmd\":\"user.set\",\"user\":\"dave\",\"state\":"
		"\"source\"}", "on the destination");
	json_decref(ok(f, "{\"cmd\":\"user.set\",\"user\":\"dave\",\"state\":"
		       "\"source\",\"force\":true}"));
	assert_string_equal(user_field(f, "dave", "state"), "source");
}

/* A server's reply kept as the user's last error may be any bytes: the
 * user is still listed and shown. */
static void foreign_text(void **state)
{
	struct fixture *f = *state;
	json_t *rep, *users;
	int64_t id;

	assert_int_equal(ms_store_user_get(f->store, "erin", &id), 0);
	assert_int_equal(ms_store_user_set_state(f->store, id, "failed",
						 "NO [AUTH] caf\xe9 \xff"), 0);
	assert_string_equal(user_field(f, "erin", "error"), "NO [AUTH] caf? ?");
	rep = ok(f, "{\"cmd\":\"user.list\"}");
	users = json_object_get(rep, "users");
	assert_int_equal(json_array_size(users), 1);
	json_decref(rep);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	char *error = NULL;

	if (f == NULL)
		return -1;
	snprintf(f->dir, sizeof(f->dir), "/tmp/ms-control-test.XXXXXX");
	if (mkdtemp(f->dir) == NULL)
		return -1;
	snprintf(f->path, sizeof(f->path), "%s/store.db", f->dir);
	if (ms_store_open(f->path, &f->store, &error) < 0) {
		fprintf(stderr, "ms_store_open: %s\n", error);
		return -1;
	}
	f->ctl = ms_control_detached(NULL, f->store);
	*state = f;
	return f->ctl != NULL ? 0 : -1;
}

static int teardown(void **state)
{
	static const char *const suffix[] = { "", "-wal", "-shm" };
	struct fixture *f = *state;
	char path[160];

	ms_control_free(&f->ctl);
	ms_store_close(&f->store);
	for (size_t i = 0; i < 3; i++) {
		snprintf(path, sizeof(path), "%s%s", f->path, suffix[i]);
		unlink(path);
	}
	rmdir(f->dir);
	free(f);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(not_json, setup, teardown),
		cmocka_unit_test_setup_teardown(wrong_types, setup, teardown),
		cmocka_unit_test_setup_teardown(user_names, setup, teardown),
		cmocka_unit_test_setup_teardown(refused_changes_nothing, setup,
						teardown),
		cmocka_unit_test_setup_teardown(foreign_text, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
