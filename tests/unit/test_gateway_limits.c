/* Unit tests for the gateway's admission and plaintext-login decisions with
 * the defaults of mailshift.conf(5) [listen]: 20000 connections at once,
 * 100 from one address, the loopback trusted (only the overall limit, and
 * plaintext logins), an empty trusted_networks trusting none. The config
 * is read by the daemon's own reader; no listener is opened. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "dconfig.h"
#include "expect.h"
#include "gateway.h"
#include "gw_route.h"
#include "store.h"

static char dir[] = "/tmp/ms-limits-test.XXXXXX";
static char conf_path[128], store_path[128];

struct gw {
	uv_loop_t loop;
	struct ms_store *store;
	struct ms_gateway *gw;
};

/* A gateway from config text ([listen] keys after "[listen]\n"), without
 * its listeners. */
static void gw_new(struct gw *g, const char *listen_keys)
{
	static struct ms_dconfig c;
	char err[1200] = "", *serr = NULL;
	FILE *f = fopen(conf_path, "w");

	assert_non_null(f);
	fprintf(f, "[listen]\nimap = 127.0.0.1:143\n%s", listen_keys);
	fclose(f);
	if (ms_dconfig_load(conf_path, &c, err, sizeof(err)) < 0)
		fail_msg("config: %s", err);
	c.gw.nlisten = 0;
	assert_int_equal(uv_loop_init(&g->loop), 0);
	if (ms_store_open(store_path, &g->store, &serr) < 0)
		fail_msg("store: %s", serr);
	if (ms_gateway_new(&g->loop, &c.gw, g->store, &g->gw, err,
			   sizeof(err)) < 0)
		fail_msg("gateway: %s", err);
}

static void gw_free(struct gw *g)
{
	ms_gateway_free(&g->gw);
	uv_run(&g->loop, UV_RUN_NOWAIT);
	assert_int_equal(uv_loop_close(&g->loop), 0);
	ms_store_close(&g->store);
}

/* Admits n connections from addr; all must be taken. */
static void admit_n(struct gw *g, const char *addr, unsigned int n)
{
	const char *why = NULL;

	for (unsigned int i = 0; i < n; i++)
		if (ms_gw_admit(g->gw, addr, &why) < 0)
			fail_msg("connection %u from %s refused: %s", i + 1,
				 addr, why);
}

static void refused(struct gw *g, const char *addr, const char *want)
{
	const char *why = NULL;

	assert_int_equal(ms_gw_admit(g->gw, addr, &why), -1);
	assert_non_null(why);
	assert_string_equal(why, want);
}

static void default_limits(void **state)
{
	struct gw g;
	char addr[32];

	gw_new(&g, "");
	/* 100 from one address, the 101st refused; others still welcome. */
	admit_n(&g, "192.0.2.1", 100);
	refused(&g, "192.0.2.1", "Too many connections from your address.");
	admit_n(&g, "192.0.2.2", 1);
	/* One place freed: that address is welcome again. */
	ms_gw_unadmit(g.gw, "192.0.2.1");
	admit_n(&g, "192.0.2.1", 1);
	/* The loopback is trusted: past 100 from one address. */
	admit_n(&g, "127.0.0.1", 150);
	admit_n(&g, "::1", 150);
	/* 20000 in all: 401 so far. */
	for (unsigned int i = 0; i < 195; i++) {
		snprintf(addr, sizeof(addr), "198.51.%u.%u", i / 200, i % 200);
		admit_n(&g, addr, 100);
	}
	admit_n(&g, "203.0.113.1", 20000 - 401 - 19500);
	refused(&g, "203.0.113.2", "Too many connections.");
	refused(&g, "127.0.0.1", "Too many connections.");
	gw_free(&g);
}

static void configured_limits(void **state)
{
	struct gw g;

	gw_new(&g, "max_connections = 10\nmax_connections_per_ip = 3\n"
	       "trusted_networks = 192.0.2.0/24\n");
	admit_n(&g, "127.0.0.1", 3);	/* loopback no longer trusted */
	refused(&g, "127.0.0.1", "Too many connections from your address.");
	admit_n(&g, "192.0.2.7", 7);	/* trusted: the overall limit only */
	refused(&g, "192.0.2.8", "Too many connections.");
	gw_free(&g);

	/* An empty value trusts none. */
	gw_new(&g, "trusted_networks =\n");
	admit_n(&g, "::1", 100);
	refused(&g, "::1", "Too many connections from your address.");
	gw_free(&g);
}

static void plaintext_logins(void **state)
{
	struct gw g;

	gw_new(&g, "");
	assert_true(ms_gw_plaintext_ok(g.gw, "127.0.0.1"));
	assert_true(ms_gw_plaintext_ok(g.gw, "127.3.4.5"));
	assert_true(ms_gw_plaintext_ok(g.gw, "::1"));
	assert_false(ms_gw_plaintext_ok(g.gw, "192.0.2.1"));
	assert_false(ms_gw_plaintext_ok(g.gw, "2001:db8::1"));
	gw_free(&g);

	gw_new(&g, "trusted_networks =\n");
	assert_false(ms_gw_plaintext_ok(g.gw, "127.0.0.1"));
	assert_false(ms_gw_plaintext_ok(g.gw, "::1"));
	gw_free(&g);

	gw_new(&g, "trusted_networks = 192.0.2.0/24\nplaintext_auth = yes\n");
	assert_true(ms_gw_plaintext_ok(g.gw, "198.51.100.1"));
	assert_true(ms_gw_plaintext_ok(g.gw, "127.0.0.1"));
	gw_free(&g);

	gw_new(&g, "trusted_networks = 192.0.2.0/24\n");
	assert_true(ms_gw_plaintext_ok(g.gw, "192.0.2.200"));
	assert_false(ms_gw_plaintext_ok(g.gw, "192.0.3.1"));
	assert_false(ms_gw_plaintext_ok(g.gw, "127.0.0.1"));
	gw_free(&g);
}

static int setup(void **state)
{
	if (mkdtemp(dir) == NULL)
		return -1;
	snprintf(conf_path, sizeof(conf_path), "%s/mailshift.conf", dir);
	snprintf(store_path, sizeof(store_path), "%s/store.db", dir);
	return 0;
}

static int teardown(void **state)
{
	static const char *const names[] = { "mailshift.conf", "store.db",
					     "store.db-wal", "store.db-shm" };

	return remove_dir(dir, names, sizeof(names) / sizeof(names[0]));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(default_limits),
		cmocka_unit_test(configured_limits),
		cmocka_unit_test(plaintext_logins),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
