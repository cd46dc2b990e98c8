/* Unit tests for daemon/config.c (the INI parser, strict numbers, secret
 * files) and daemon/dconfig.c (mailshiftd's keys): what an operator's
 * mistake, or worse, in a configuration file gets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "dconfig.h"
#include "expect.h"
#include "must_run.h"

static char dir[] = "/tmp/ms-config-test.XXXXXX";

static const char *put(const char *name, const void *data, size_t len)
{
	static char path[128];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, len, f), len);
	fclose(f);
	return path;
}

static const char *puts_(const char *name, const char *text)
{
	return put(name, text, strlen(text));
}

static int count_keys(void *ctx, const char *section, const char *key,
		      const char *value, char *err, size_t errsz)
{
	(*(int *)ctx)++;
	return 0;
}

/* Parses data; expects failure with want in the error (or success when
 * want is NULL). */
static void expect_ini(const void *data, size_t len, const char *want)
{
	const char *path = put("t.ini", data, len);
	char err[512] = "";
	int n = 0, r = ms_ini_parse(path, count_keys, &n, err, sizeof(err));

	expect_error(r, err, want);
}

static void parse_uint_strict(void **state)
{
	unsigned int v = 12345;

	assert_int_equal(ms_parse_uint("0", 0, 10, &v), 0);
	assert_int_equal(v, 0);
	assert_int_equal(ms_parse_uint("007", 0, 10, &v), 0);
	assert_int_equal(v, 7);
	assert_int_equal(ms_parse_uint("4294967295", 0, 4294967295u, &v), 0);
	assert_int_equal(v, 4294967295u);
	v = 99;
	/* strtoul takes all of these */
	assert_int_equal(ms_parse_uint("", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint("-1", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint("+5", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint(" 5", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint("5 ", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint("5x", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint("0x5", 0, 10, &v), -1);
	assert_int_equal(ms_parse_uint("4294967296", 0, 4294967295u, &v), -1);
	assert_int_equal(ms_parse_uint("99999999999999999999999", 0,
					4294967295u, &v), -1);
	/* the range */
	assert_int_equal(ms_parse_uint("0", 1, 10, &v), -1);
	assert_int_equal(ms_parse_uint("11", 1, 10, &v), -1);
	assert_int_equal(v, 99);
}

static void ini_refuses(void **state)
{
	char big[5000];

	expect_ini("[a]\nk = v\n", 9, NULL);
	expect_ini("[a]\r\nk = v\r\n", 12, NULL);		/* CRLF */
	expect_ini("[a]\nk = v", 9, NULL);			/* no final LF */
	expect_ini("[a]\nk = v\0rest\n", 15, ":2: NUL byte");
	expect_ini("[a]\nk = v\x01\n", 11, ":2: control character 0x01");
	expect_ini("[a]\nk = v\rw = x\n", 16, ":2: control character 0x0d");
	expect_ini("[a]\nkey value\n", 14, ":2: expected \"key = value\"");
	expect_ini("[a]\n= value\n", 12, ":2: no key");
	expect_ini("k = v\n", 6, ":1: \"k\" outside any [section]");
	expect_ini("[a\n", 3, ":1: bad section header");
	expect_ini("[a] x\n", 6, ":1: bad section header");
	expect_ini("[ ]\n", 4, ":1: bad section name");
	memset(big, 'a', sizeof(big));
	memcpy(big, "[a]\nk = ", 8);
	expect_ini(big, sizeof(big), ":2: line too long");
}

static void ini_whole_file(void **state)
{
	char err[512], path[128];
	int n = 0;
	size_t len = 1024 * 1024 + 10;
	char *huge = malloc(len);

	assert_int_equal(ms_ini_parse(dir, count_keys, &n, err, sizeof(err)),
			 -1);
	assert_non_null(strstr(err, "Is a directory"));
	assert_non_null(huge);
	memset(huge, '#', len);
	put("huge.ini", huge, len);
	free(huge);
	snprintf(path, sizeof(path), "%s/huge.ini", dir);
	assert_int_equal(ms_ini_parse(path, count_keys, &n, err, sizeof(err)),
			 -1);
	assert_non_null(strstr(err, "too big"));
}

#define LISTEN "[listen]\nimap = 127.0.0.1:143\n"

/* mailshiftd's configuration text: expects failure with want in the error
 * ("FILE:LINE: ..."), or success when want is NULL. */
static void expect_conf(const char *text, const char *want,
			struct ms_dconfig *c)
{
	static struct ms_dconfig scratch;
	const char *path = puts_("d.conf", text);
	char err[1200] = "";
	int r = ms_dconfig_load(path, c != NULL ? c : &scratch, err,
				sizeof(err));

	expect_error(r, err, want);
	if (want != NULL && strncmp(err, path, strlen(path)) != 0)
		fail_msg("error \"%s\" does not begin with \"%s\"", err, path);
}

static void dconfig_numbers(void **state)
{
	static struct ms_dconfig c;

	expect_conf(LISTEN, NULL, &c);
	assert_int_equal(c.gw.hold_max_seconds, 60);
	assert_int_equal(c.gw.connections, 4);
	expect_conf(LISTEN "[policy]\nhold_max_seconds = 0\nconnections = 64\n"
		    "[sweep]\nrate = 0\ninterval = 86400\nconcurrency = 1000\n"
		    "[daemon]\ncapability_refresh = 1\n", NULL, &c);
	assert_int_equal(c.gw.hold_max_seconds, 0);
	assert_int_equal(c.gw.connections, 64);
	assert_int_equal(c.gw.sweep_interval, 86400);
	/* [source] commands_per_second: none by default, 0 to 100000 */
	assert_int_equal(c.gw.src_commands_per_second, 0);
	expect_conf(LISTEN "[source]\ncommands_per_second = 100000\n", NULL, &c);
	assert_int_equal(c.gw.src_commands_per_second, 100000);
	expect_conf(LISTEN "[source]\ncommands_per_second = 100001\n",
		    ":4: commands_per_second", NULL);
	expect_conf(LISTEN "[destination]\ncommands_per_second = 5\n",
		    ":4: unknown key \"commands_per_second\" in [destination]",
		    NULL);
	expect_conf(LISTEN "[policy]\nhold_max_seconds = -1\n",
		    ":4: hold_max_seconds: \"-1\" is not a whole number from 0 "
		    "to 86400", NULL);
	expect_conf(LISTEN "[policy]\nhold_max_seconds = 86401\n",
		    ":4: hold_max_seconds", NULL);
	assert_int_equal(c.gw.flip_quiet, 5);
	expect_conf(LISTEN "[policy]\nflip_quiet = 0\n", NULL, &c);
	assert_int_equal(c.gw.flip_quiet, 0);
	expect_conf(LISTEN "[policy]\nflip_quiet = 1h\n", NULL, &c);
	assert_int_equal(c.gw.flip_quiet, 3600);
	expect_conf(LISTEN "[policy]\nflip_quiet = 30s\n", NULL, &c);
	assert_int_equal(c.gw.flip_quiet, 30);
	expect_conf(LISTEN "[policy]\nflip_quiet = 61m\n",
		    ":4: flip_quiet: \"61m\" is not a duration from 0s to 1h",
		    NULL);
	expect_conf(LISTEN "[policy]\nflip_quiet = 5 s\n", ":4: flip_quiet",
		    NULL);
	expect_conf(LISTEN "[policy]\nflip_quiet = -1\n", ":4: flip_quiet",
		    NULL);
	expect_conf(LISTEN "[policy]\nconnections = 0\n", ":4: connections",
		    NULL);
	expect_conf(LISTEN "[policy]\nconnections = 4 connections\n",
		    ":4: connections", NULL);
	expect_conf(LISTEN "[sweep]\nrate = 1e3\n", ":4: rate", NULL);
	expect_conf(LISTEN "[sweep]\ninterval = 0\n", ":4: interval", NULL);
	expect_conf(LISTEN "[sweep]\nconcurrency = 4294967297\n",
		    ":4: concurrency", NULL);
	expect_conf(LISTEN "[daemon]\ncapability_refresh = 0\n",
		    ":4: capability_refresh", NULL);
}

static void dconfig_window(void **state)
{
	static struct ms_dconfig c;

	expect_conf(LISTEN "[sweep]\nwindow = 22:00-06:30\n", NULL, &c);
	assert_int_equal(c.gw.sweep_from, 22 * 60);
	assert_int_equal(c.gw.sweep_to, 6 * 60 + 30);
	expect_conf(LISTEN "[sweep]\nwindow = 9:05-24:00\n", NULL, &c);
	assert_int_equal(c.gw.sweep_from, 9 * 60 + 5);
	assert_int_equal(c.gw.sweep_to, 24 * 60);
	expect_conf(LISTEN "[sweep]\nwindow = 1:2-3:4\n", ":4: window", NULL);
	expect_conf(LISTEN "[sweep]\nwindow = 24:00-01:00\n", ":4: window",
		    NULL);
	expect_conf(LISTEN "[sweep]\nwindow = 22:00-24:01\n", ":4: window",
		    NULL);
	expect_conf(LISTEN "[sweep]\nwindow = 22:60-23:00\n", ":4: window",
		    NULL);
	expect_conf(LISTEN "[sweep]\nwindow = 22:00-06:30x\n", ":4: window",
		    NULL);
	expect_conf(LISTEN "[sweep]\nwindow = -1:00-02:00\n", ":4: window",
		    NULL);
}

/* [retire]: durations with a unit, the defaults, the bounds. */
static void dconfig_retire(void **state)
{
	static struct ms_dconfig c;

	expect_conf(LISTEN, NULL, &c);
	assert_int_equal(c.retire.quiet_period, 86400);
	assert_int_equal(c.retire.record_interval, 60);
	expect_conf(LISTEN "[retire]\nquiet_period = 7d\nrecord_interval = 1s\n",
		    NULL, &c);
	assert_int_equal(c.retire.quiet_period, 7 * 86400);
	assert_int_equal(c.retire.record_interval, 1);
	expect_conf(LISTEN "[retire]\nquiet_period = 90\n", NULL, &c);
	assert_int_equal(c.retire.quiet_period, 90);
	expect_conf(LISTEN "[retire]\nquiet_period = 2w\n", ":4: quiet_period",
		    NULL);
	expect_conf(LISTEN "[retire]\nquiet_period = h\n", ":4: quiet_period",
		    NULL);
	expect_conf(LISTEN "[retire]\nquiet_period = 99999999999d\n",
		    ":4: quiet_period", NULL);
	expect_conf(LISTEN "[retire]\nrecord_interval = 0\n",
		    ":4: record_interval", NULL);
	expect_conf(LISTEN "[retire]\nrecord_interval = 2h\n",
		    ":4: record_interval", NULL);
	expect_conf(LISTEN "[retire]\nbogus = 1\n",
		    ":4: unknown key \"bogus\" in [retire]", NULL);
}

static void dconfig_keys(void **state)
{
	static struct ms_dconfig c;
	char longpath[300];

	expect_conf(LISTEN "[bogus]\nkey = v\n", ":4: unknown section [bogus]",
		    NULL);
	expect_conf(LISTEN "[daemon]\nbogus = v\n",
		    ":4: unknown key \"bogus\" in [daemon]", NULL);
	expect_conf(LISTEN "[policy]\nfoo = bar\n", ":4: unknown key", NULL);
	expect_conf(LISTEN "[policy]\non_first_login = sometimes\n",
		    ":4: on_first_login: policy", NULL);
	expect_conf(LISTEN "[policy]\ndomain. = off\n", ":4: domain.", NULL);
	expect_conf(LISTEN "[policy]\ndomain.a@b = off\n", ":4: domain.", NULL);
	expect_conf(LISTEN "[store]\nbackend = mysql\n", ":4: backend", NULL);
	expect_conf(LISTEN "[store]\ntimeout = 0\n", ":4: timeout", NULL);
	expect_conf(LISTEN "[store]\ntimeout = 11m\n", ":4: timeout", NULL);
	expect_conf(LISTEN "[store]\ntimeout = soon\n", ":4: timeout", NULL);
	expect_conf(LISTEN "[store]\nreaders = 0\n", ":4: readers", NULL);
	expect_conf(LISTEN "[store]\nreaders = 17\n", ":4: readers", NULL);
	expect_conf(LISTEN "[store]\nreaders = two\n", ":4: readers", NULL);
	expect_conf(LISTEN "[listen]\ntransparent = maybe\n",
		    ":4: transparent: yes or no", NULL);
	expect_conf(LISTEN "[destination]\ntransparent = maybe\n",
		    ":4: transparent: yes or no", NULL);
	expect_conf(LISTEN "[source]\ntransparent = yes\n"
		    "[destination]\nimap = imap://192.0.2.20\n"
		    "[source]\nimap = imap://192.0.2.10\n", NULL, &c);
	assert_int_equal(c.gw.src_imap.transparent, 1);
	assert_int_equal(c.gw.src_smtp.transparent, 1);
	assert_int_equal(c.gw.dst_imap.transparent, 0);
	expect_conf(LISTEN "[daemon]\ngroup = mail\n", "group needs user",
		    NULL);
	expect_conf("[daemon]\nuser = nobody\n", "no [listen] address", NULL);
	expect_conf(LISTEN "[source]\nadmin = master\n",
		    "[source] admin needs admin_password_file", NULL);
	memset(longpath, 'a', sizeof(longpath));
	memcpy(longpath, LISTEN "[control]\nsocket = /",
	       strlen(LISTEN "[control]\nsocket = /"));
	longpath[sizeof(longpath) - 2] = '\n';
	longpath[sizeof(longpath) - 1] = '\0';
	expect_conf(longpath, ":4: socket: value too long (at most 107", NULL);
	expect_conf(LISTEN "[daemon]\nuser = mailshift\ngroup = mailshift\n"
		    "[control]\ngroup = ops\n", NULL, &c);
	assert_string_equal(c.user, "mailshift");
	assert_string_equal(c.group, "mailshift");
	assert_string_equal(c.control_group, "ops");
}

/* mailshift.conf(5): comments start with # or ;, yes/no keys take eight
 * words, a key given twice in [listen] adds a listener and elsewhere the
 * last one wins. */
static void ini_promises(void **state)
{
	static const char *const yes[] = { "yes", "true", "on", "1" };
	static const char *const no[] = { "no", "false", "off", "0" };
	static struct ms_dconfig c;
	int n = 0;
	char err[512] = "";
	const char *path = puts_("c.ini", "# a comment\n; another\n[a]\n"
				 "# k = v\n; k = v\nk = v\n");

	assert_int_equal(ms_ini_parse(path, count_keys, &n, err, sizeof(err)),
			 0);
	assert_int_equal(n, 1);
	for (size_t i = 0; i < 4; i++) {
		assert_int_equal(ms_parse_bool(yes[i]), 1);
		assert_int_equal(ms_parse_bool(no[i]), 0);
	}
	assert_int_equal(ms_parse_bool("maybe"), -1);
	assert_int_equal(ms_parse_bool(""), -1);
	expect_conf(LISTEN "imap = 127.0.0.1:144\npop3 = 127.0.0.1:110\n"
		    "[policy]\nhold_max_seconds = 5\nhold_max_seconds = 7\n"
		    "on_first_login = hold\non_first_login = off\n", NULL, &c);
	assert_int_equal(c.gw.nlisten, 3);
	assert_string_equal(c.gw.listen[0].addr, "127.0.0.1:143");
	assert_string_equal(c.gw.listen[1].addr, "127.0.0.1:144");
	assert_int_equal(c.gw.hold_max_seconds, 7);
	assert_int_equal(c.gw.policy, MS_POLICY_OFF);
	/* a section named twice: one section (the store's timeout beside
	 * the path given before) */
	expect_conf(LISTEN "[store]\npath = /x.db\n[policy]\n"
		    "hold_max_seconds = 5\n[store]\ntimeout = 4s\n"
		    "readers = 16\n", NULL, &c);
	assert_string_equal(c.store, "/x.db");
	assert_int_equal(c.store_timeout, 4);
	assert_int_equal(c.store_readers, 16);
}

/* The defaults mailshift.conf(5) gives, as the daemon reads them (0 is
 * "the gateway's default": see test_gateway_limits for those). */
static void dconfig_defaults(void **state)
{
	static struct ms_dconfig c;

	expect_conf(LISTEN, NULL, &c);
	assert_string_equal(c.store, "/var/lib/mailshift/mailshift.db");
	assert_int_equal(c.store_timeout, 30);
	assert_int_equal(c.store_readers, 2);
	assert_string_equal(c.control, "/run/mailshift/control.sock");
	assert_int_equal(c.gw.policy, MS_POLICY_PASSTHROUGH);
	assert_int_equal(c.gw.sweep, 0);
	assert_int_equal(c.gw.sweep_from, -1);	/* no window: always */
	assert_int_equal(c.gw.sweep_rate, 0);	/* no limit */
	assert_int_equal(c.gw.survey_rate, -1);	/* 60 with the sweep, else 0 */
	assert_int_equal(c.gw.plaintext_auth, 0);
	assert_int_equal(c.gw.trusted_set, 0);	/* loopback */
	assert_int_equal(c.gw.transparent, 0);
	assert_string_equal(c.pid_file, "");
	assert_string_equal(c.user, "");
	expect_conf(LISTEN "[listen]\ntrusted_networks =\n", NULL, &c);
	assert_int_equal(c.gw.trusted_set, 1);	/* an empty value: none */
	assert_int_equal(c.gw.ntrusted, 0);
	expect_conf(LISTEN "[listen]\ntrusted_networks = 10.0.0.0/8, ::1 "
		    "192.0.2.1\n", NULL, &c);
	assert_int_equal(c.gw.ntrusted, 3);
}

/* Each key's range, at both ends (mailshift.conf(5)). */
static void dconfig_ranges(void **state)
{
	static const struct {
		const char *text, *err;
	} bad[] = {
		{ "[policy]\nconnections = 65\n", ":4: connections" },
		{ "[sweep]\nconcurrency = 0\n", ":4: concurrency" },
		{ "[sweep]\nconcurrency = 1001\n", ":4: concurrency" },
		{ "[sweep]\nrate = 1000001\n", ":4: rate" },
		{ "[sweep]\ninterval = 86401\n", ":4: interval" },
		{ "[sweep]\nsurvey = 6001\n", ":4: survey" },
		{ "[sweep]\nsurvey = -1\n", ":4: survey" },
		{ "[daemon]\ncapability_refresh = 86401\n",
		  ":4: capability_refresh" },
		{ "[listen]\nmax_connections = 0\n", ":4: max_connections" },
		{ "[listen]\nmax_connections = 1000001\n",
		  ":4: max_connections" },
		{ "[listen]\nmax_connections = 1 000\n", ":4: max_connections" },
		{ "[listen]\nmax_connections_per_ip = -5\n",
		  ":4: max_connections_per_ip" },
		{ "[listen]\nmax_connections_per_ip = 10k\n",
		  ":4: max_connections_per_ip" },
		{ "[listen]\nplaintext_auth = sometimes\n", ":4: plaintext_auth" },
		{ "[listen]\ntrusted_networks = 10.0.0.0/33\n",
		  ":4: trusted_networks" },
		{ "[sweep]\nenabled = maybe\n", ":4: enabled: yes or no" },
		{ "[source]\ninsecure = 2\n", ":4: insecure: yes or no" },
		{ "[gateway]\nlease = 1s\n", ":4: lease" },
		{ "[gateway]\nlease = 2h\n", ":4: lease" },
		{ "[gateway]\nname = \n", ":4: name" },
		{ "[gateway]\nbogus = 1\n", ":4: unknown key" },
		{ "[gateway]\nheartbeat = 2x\n", ":4: heartbeat" },
		{ "[gateway]\ntimeout = soon\n", ":4: timeout" },
		{ "[gateway]\nheartbeat = 1s\ntimeout = 2s\n",
		  "[gateway] timeout: at least three heartbeats" },
		{ "[gateway]\nheartbeat = 50ms\n", "[gateway] heartbeat" },
		{ "[gateway]\nlease = 5s\ntimeout = 5s\n",
		  "[gateway] timeout must be shorter than lease" },
	};
	static struct ms_dconfig c;
	char text[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(text, sizeof(text), LISTEN "%s", bad[i].text);
		expect_conf(text, bad[i].err, NULL);
	}
	expect_conf(LISTEN "[sweep]\nrate = 1000000\nconcurrency = 1\n"
		    "interval = 1\n[daemon]\ncapability_refresh = 86400\n"
		    "[listen]\nmax_connections = 1000000\n"
		    "max_connections_per_ip = 1\n", NULL, &c);
	assert_int_equal(c.gw.sweep_rate, 1000000);
	assert_int_equal(c.gw.caps_refresh, 86400);
	assert_int_equal(c.gw.max_conns, 1000000);
	assert_int_equal(c.gw.max_conns_per_ip, 1);
	expect_conf(LISTEN "[sweep]\nsurvey = 6000\n", NULL, &c);
	assert_int_equal(c.gw.survey_rate, 6000);
	expect_conf(LISTEN "[sweep]\nsurvey = 0\n", NULL, &c);
	assert_int_equal(c.gw.survey_rate, 0);
	/* [gateway]: the host's name and a lease of 60 s by default */
	assert_string_equal(c.gw.gw_name, ms_host_name());
	assert_int_equal(c.gw.job_lease, 60);
	expect_conf(LISTEN "[gateway]\nname = gw-a\nlease = 2m\n", NULL, &c);
	assert_string_equal(c.gw.gw_name, "gw-a");
	assert_int_equal(c.gw.job_lease, 120);
	/* heartbeat and timeout: 2 s and 10 s, or given, or (unset) half
	 * a short lease and a fifth of that */
	assert_int_equal(c.gw.gw_heartbeat_ms, 2000);
	assert_int_equal(c.gw.gw_timeout_ms, 10000);
	expect_conf(LISTEN "[gateway]\nheartbeat = 250ms\ntimeout = 1500ms\n",
		    NULL, &c);
	assert_int_equal(c.gw.gw_heartbeat_ms, 250);
	assert_int_equal(c.gw.gw_timeout_ms, 1500);
	expect_conf(LISTEN "[gateway]\nlease = 3s\n", NULL, &c);
	assert_int_equal(c.gw.gw_timeout_ms, 1500);
	assert_int_equal(c.gw.gw_heartbeat_ms, 300);
}

/* Writes a secret file with mode and owner; returns its path. */
static const char *secret(const char *text, size_t len, mode_t mode,
			  uid_t uid)
{
	const char *path = put("secret", text, len);

	assert_int_equal(chmod(path, mode), 0);
	if (uid != (uid_t)-1)
		assert_int_equal(chown(path, uid, (gid_t)-1), 0);
	return path;
}

static void expect_secret(const char *path, uid_t owner, const char *want,
			  const char *want_err)
{
	char err[512] = "";
	char *pw = ms_read_secret_file_owned(path, owner, err, sizeof(err));

	if (want != NULL) {
		if (pw == NULL)
			fail_msg("unexpected error: %s", err);
		assert_string_equal(pw, want);
		free(pw);
		return;
	}
	assert_null(pw);
	if (strstr(err, want_err) == NULL)
		fail_msg("error \"%s\" lacks \"%s\"", err, want_err);
}

static void secret_files(void **state)
{
	char big[2000], link[160];
	const char *p;

	if (geteuid() != 0)	/* the owners need chown */
		skip_or_fail("not root (uid %u): cannot chown the secret "
			     "files", (unsigned int)geteuid());
	p = secret("pw\r\nsecond line\n", 17, 0600, 0);
	expect_secret(p, 0, "pw", NULL);
	expect_secret(p, 4242, "pw", NULL);	/* root's is fine */
	p = secret("pw\n", 3, 0640, 0);
	expect_secret(p, 0, NULL, "readable by others");
	p = secret("pw\n", 3, 0600, 4242);
	expect_secret(p, 0, NULL, "owned by uid 4242");
	expect_secret(p, 4242, "pw", NULL);	/* the daemon's user's */
	expect_secret(p, 4343, NULL, "owned by uid 4242");
	p = secret("p\0w\n", 4, 0600, 0);
	expect_secret(p, 0, NULL, "NUL byte");
	p = secret("\nsecond\n", 8, 0600, 0);
	expect_secret(p, 0, NULL, "empty");
	memset(big, 'x', sizeof(big));
	p = secret(big, sizeof(big), 0600, 0);
	expect_secret(p, 0, NULL, "too long");
	snprintf(link, sizeof(link), "%s/link", dir);
	unlink(link);
	assert_int_equal(symlink(p, link), 0);
	expect_secret(link, 0, NULL, "symbolic link");
	unlink(link);
}

static int setup(void **state)
{
	return mkdtemp(dir) != NULL ? 0 : -1;
}

static int teardown(void **state)
{
	static const char *const names[] = { "t.ini", "huge.ini", "d.conf",
					     "secret", "c.ini" };

	return remove_dir(dir, names, sizeof(names) / sizeof(names[0]));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(parse_uint_strict),
		cmocka_unit_test(ini_refuses),
		cmocka_unit_test(ini_whole_file),
		cmocka_unit_test(dconfig_numbers),
		cmocka_unit_test(dconfig_window),
		cmocka_unit_test(dconfig_keys),
		cmocka_unit_test(ini_promises),
		cmocka_unit_test(dconfig_defaults),
		cmocka_unit_test(dconfig_ranges),
		cmocka_unit_test(dconfig_retire),
		cmocka_unit_test(secret_files),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
