/* mailshiftctl status | user | sessions | kick: requests to mailshiftd's
 * control socket (one JSON object per line each way). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "config.h"
#include "subcommands.h"

#define DEFAULT_SOCKET "/run/mailshift/control.sock"

struct copts {
	const char *socket;
	int json;
};

static int on_conf(void *ctx, const char *section, const char *key,
		   const char *value, char *err, size_t errsz)
{
	char **sock = ctx;

	if (!strcmp(section, "control") && !strcmp(key, "socket")) {
		free(*sock);
		*sock = strdup(value);
	}
	return 0;
}

/* Common options: -s PATH, -c CONFIG, --json. Removes them from argv. */
static int common_opts(int *argc, char *argv[], struct copts *o)
{
	static char *from_conf;
	int n = 0;

	o->socket = getenv("MAILSHIFT_CONTROL");
	for (int i = 0; i < *argc; i++) {
		if ((!strcmp(argv[i], "-s") || !strcmp(argv[i], "--socket")) &&
		    i + 1 < *argc) {
			o->socket = argv[++i];
		} else if ((!strcmp(argv[i], "-c") ||
			    !strcmp(argv[i], "--config")) && i + 1 < *argc) {
			char err[600];

			if (ms_ini_parse(argv[++i], on_conf, &from_conf, err,
					 sizeof(err)) < 0) {
				fprintf(stderr, "%s: %s\n", prog, err);
				return -1;
			}
			if (from_conf != NULL)
				o->socket = from_conf;
		} else if (!strcmp(argv[i], "--json") || !strcmp(argv[i], "-j")) {
			o->json = 1;
		} else {
			argv[n++] = argv[i];
		}
	}
	*argc = n;
	if (o->socket == NULL)
		o->socket = DEFAULT_SOCKET;
	return 0;
}

/* Sends one request and returns the reply (NULL after printing why). */
static json_t *request(const struct copts *o, json_t *req)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char *text = json_dumps(req, JSON_COMPACT);
	json_t *rep = NULL;
	json_error_t jerr;
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int fd = -1;

	json_decref(req);
	if (text == NULL)
		return NULL;
	if (strlen(o->socket) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "%s: socket path too long\n", prog);
		goto out;
	}
	strcpy(sa.sun_path, o->socket);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		fprintf(stderr, "%s: cannot reach mailshiftd at %s: %s\n", prog,
			o->socket, strerror(errno));
		goto out;
	}
	if ((write(fd, text, strlen(text)) < 0 || write(fd, "\n", 1) < 0) &&
	    errno != EPIPE && errno != ECONNRESET) {
		/* (A daemon that refuses us closes before reading: its reason
		 * is there to be read.) */
		fprintf(stderr, "%s: %s: %s\n", prog, o->socket, strerror(errno));
		goto out;
	}
	for (;;) {
		ssize_t n;

		if (len + 4096 > cap) {
			char *nb;

			cap = cap * 2 + 8192;
			nb = realloc(buf, cap);
			if (nb == NULL)
				goto out;
			buf = nb;
		}
		n = read(fd, buf + len, cap - len - 1);
		if (n <= 0)
			break;
		len += (size_t)n;
		if (memchr(buf, '\n', len) != NULL)
			break;
	}
	if (buf == NULL || len == 0) {
		fprintf(stderr, "%s: no reply from mailshiftd\n", prog);
		goto out;
	}
	buf[len] = '\0';
	rep = json_loads(buf, JSON_DISABLE_EOF_CHECK, &jerr);
	if (rep == NULL)
		fprintf(stderr, "%s: bad reply from mailshiftd: %s\n", prog,
			jerr.text);
out:
	if (fd >= 0)
		close(fd);
	free(text);
	free(buf);
	return rep;
}

json_t *ctl_request(const char *socket, json_t *req)
{
	struct copts o = { .socket = socket };

	return request(&o, req);
}

/* Prints the reply; returns the exit status. */
static int finish(const struct copts *o, json_t *rep,
		  void (*human)(json_t *rep))
{
	int ok;

	if (rep == NULL)
		return 1;
	ok = json_is_true(json_object_get(rep, "ok"));
	if (!ok) {
		fprintf(stderr, "%s: %s\n", prog,
			json_string_value(json_object_get(rep, "error")) ?
			json_string_value(json_object_get(rep, "error")) : "failed");
	} else if (o->json) {
		json_dumpf(rep, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		putchar('\n');
	} else if (human != NULL) {
		human(rep);
	}
	json_decref(rep);
	return ok ? 0 : 1;
}

static const char *jstr(json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));

	return s != NULL ? s : "-";
}

static long long jint(json_t *o, const char *k)
{
	return (long long)json_integer_value(json_object_get(o, k));
}

/* 1234567 as "1,234,567" into buf. */
static const char *grouped(char *buf, size_t sz, long long n)
{
	char raw[32];
	size_t len, o = 0;

	len = (size_t)snprintf(raw, sizeof(raw), "%lld", n < 0 ? 0 : n);
	for (size_t i = 0; i < len && o + 2 < sz; i++) {
		if (i > 0 && (len - i) % 3 == 0)
			buf[o++] = ',';
		buf[o++] = raw[i];
	}
	buf[o] = '\0';
	return buf;
}

/* Bytes as "45 GB", "3.2 MB" (powers of 1000, as "moved:" says). */
static const char *bytes_h(char *buf, size_t sz, double b)
{
	static const char *const unit[] = { "bytes", "kB", "MB", "GB", "TB",
					    "PB" };
	unsigned int u = 0;

	while (b >= 1000 && u + 1 < sizeof(unit) / sizeof(unit[0])) {
		b /= 1000;
		u++;
	}
	snprintf(buf, sz, b < 10 && u > 0 ? "%.1f %s" : "%.0f %s", b, unit[u]);
	return buf;
}

/* Seconds as "3 h 20 min", "12 min", "40 s", "2 d 5 h". */
static const char *duration_h(char *buf, size_t sz, long long s)
{
	if (s >= 86400)
		snprintf(buf, sz, "%lld d %lld h", s / 86400, s % 86400 / 3600);
	else if (s >= 3600)
		snprintf(buf, sz, "%lld h %lld min", s / 3600, s % 3600 / 60);
	else if (s >= 60)
		snprintf(buf, sz, "%lld min", (s + 30) / 60);
	else
		snprintf(buf, sz, "%lld s", s);
	return buf;
}

/* The site's ETA: one line, and how sure on the next. */
static void print_site(json_t *site)
{
	json_t *tp = json_object_get(site, "throughput");
	json_t *eta = json_object_get(site, "eta_seconds");
	json_t *rb = json_object_get(site, "remaining_bytes");
	char a[32], b[32], c[32], d[32];

	if (!json_is_object(site))
		return;
	if (jint(site, "remaining_users") == 0) {
		printf("site done: no user left to move");
		if (jint(site, "failed_users") > 0)
			printf(" (%lld failed)", jint(site, "failed_users"));
		putchar('\n');
		return;
	}
	if (json_is_integer(eta))
		printf("site done in about %s", duration_h(a, sizeof(a),
		       (long long)json_integer_value(eta)));
	else
		printf("site done in: unknown, %s", jstr(site, "unknown"));
	printf(" (%s of %s users left", grouped(b, sizeof(b),
	       jint(site, "remaining_users")),
	       grouped(c, sizeof(c), jint(site, "users")));
	if (json_is_integer(rb))
		printf(", %s", bytes_h(d, sizeof(d),
				       (double)json_integer_value(rb)));
	if (json_is_object(tp))
		printf("; measured %s/s", bytes_h(a, sizeof(a),
		       json_real_value(json_object_get(tp,
						       "bytes_per_second"))));
	printf(")\n");
	printf("  sizes: %s from the source, %s estimated", grouped(a,
	       sizeof(a), jint(site, "sizes_known")), grouped(b, sizeof(b),
	       jint(site, "sizes_estimated")));
	if (json_is_object(tp))
		printf("; copies measured: %lld, %.1f at once, %.1f s per "
		       "user besides its mail", jint(tp, "copies"),
		       json_real_value(json_object_get(tp, "parallel")),
		       json_real_value(json_object_get(tp,
						       "user_overhead_seconds")));
	if (jint(site, "failed_users") > 0)
		printf("; %lld failed, not counted", jint(site, "failed_users"));
	putchar('\n');
}

/* The mover's caps and the back-off (ms_gateway_mover_json()). */
static void print_mover(json_t *rep)
{
	json_t *m = json_object_get(rep, "mover");
	json_t *open = json_object_get(m, "connections_open");
	double cap = json_real_value(json_object_get(m, "commands_per_second"));
	double pace = json_real_value(json_object_get(m, "pace"));

	if (!json_is_object(m))
		return;
	printf("mover: %lld connections per server (open: source %lld, "
	       "destination %lld; %lld waiting)\n", jint(m, "connections"),
	       jint(open, "source"), jint(open, "destination"),
	       jint(m, "connections_waiting"));
	if (cap > 0)
		printf("  commands per second to the source: %.1f", cap);
	else
		printf("  commands per second to the source: no cap");
	if (json_is_true(json_object_get(m, "backing_off")))
		printf("; backing off: %.1f now (%s)", pace,
		       jstr(m, "backoff_reason"));
	printf("\n  commands sent to the source: %lld, back-offs: %lld\n",
	       jint(m, "source_commands"), jint(m, "backoffs"));
}

/* Several gateways on one store: each one's row (none with SQLite). */
static void print_gateways(json_t *rep)
{
	json_t *gws = json_object_get(rep, "gateways"), *g;
	size_t i;

	if (json_array_size(gws) == 0)
		return;
	printf("%-24s %-8s %14s %8s %6s\n", "GATEWAY", "STATE", "HEARTBEAT",
	       "SESSIONS", "COPIES");
	json_array_foreach(gws, i, g) {
		char age[32];

		snprintf(age, sizeof(age), "%.1f s ago",
			 (double)jint(g, "heartbeat_age_ms") / 1000);
		printf("%-24s %-8s %14s %8lld %6lld%s\n", jstr(g, "name"),
		       json_is_true(json_object_get(g, "live")) ? "live" :
		       "fenced", age, jint(g, "sessions"), jint(g, "copies"),
		       json_is_true(json_object_get(g, "this")) ?
		       "  (this one)" : "");
	}
}

static void print_status(json_t *rep)
{
	json_t *st = json_object_get(rep, "states");
	const char *k;
	json_t *v;
	long long total = 0, across = jint(st, "destination");
	long long done = jint(rep, "copy_messages_done");
	long long todo = jint(rep, "copy_messages_todo");
	double secs = json_real_value(json_object_get(rep, "copy_seconds"));
	double rate = secs > 0 ? (double)done / secs : 0;
	char bar[31];
	unsigned int fill;

	json_object_foreach(st, k, v)
		total += json_integer_value(v);
	printf("users: %lld\n", total);
	json_object_foreach(st, k, v)
		printf("  %-12s %lld\n", k, (long long)json_integer_value(v));
	printf("moved: %lld messages, %.1f MB\n", jint(rep, "messages"),
	       (double)jint(rep, "bytes") / 1e6);
	if (todo > 0) {
		printf("copying now: %lld of %lld messages, %.0f msg/s", done, todo,
		       rate);
		if (rate > 0 && todo > done)
			printf(", ETA %.0f s", (double)(todo - done) / rate);
		putchar('\n');
	}
	printf("sessions: %lld\n", jint(rep, "sessions"));
	if (jint(rep, "identity_not_kept_users") > 0)
		printf("identity not kept: %lld users (%lld folders) with "
		       "new UIDVALIDITY/UIDs on the destination: the gateway "
		       "translates them (IMAP view); their clients need it\n",
		       jint(rep, "identity_not_kept_users"),
		       jint(rep, "identity_not_kept_folders"));
	if (jint(rep, "renamed_folders") > 0)
		printf("renamed: %lld folders (names = destination): the "
		       "gateway answers their old names (IMAP view)\n",
		       jint(rep, "renamed_folders"));
	if (jint(rep, "view_users") > 0)
		printf("IMAP view: %lld users' clients need the gateway\n",
		       jint(rep, "view_users"));
	fill = total > 0 ? (unsigned int)(30 * across / total) : 0;
	memset(bar, '#', fill);
	memset(bar + fill, '-', 30 - fill);
	bar[30] = '\0';
	printf("[%s] %lld of %lld users on the destination\n", bar, across,
	       total);
	print_site(json_object_get(rep, "site"));
	if (json_is_object(json_object_get(rep, "retired"))) {
		json_t *r = json_object_get(rep, "retired");
		time_t t = (time_t)jint(r, "at");
		char at[40];
		struct tm tm;

		gmtime_r(&t, &tm);
		strftime(at, sizeof(at), "%Y-%m-%d %H:%M:%S UTC", &tm);
		printf("source retired: %s by uid %lld%s\n", at, jint(r, "uid"),
		       json_is_true(json_object_get(r, "forced")) ?
		       " (forced over a failed check)" : "");
	}
	print_mover(rep);
	print_gateways(rep);
}

static void print_user_row(json_t *u)
{
	printf("%-32s %-12s %-12s %8lld %10lld\n", jstr(u, "user"),
	       jstr(u, "state"), jstr(u, "policy"), jint(u, "sessions"),
	       jint(u, "messages"));
}

static void print_users(json_t *rep)
{
	json_t *u;
	size_t i;

	printf("%-32s %-12s %-12s %8s %10s\n", "USER", "STATE", "POLICY",
	       "SESSIONS", "MESSAGES");
	json_array_foreach(json_object_get(rep, "users"), i, u)
		print_user_row(u);
}

static void print_user(json_t *rep)
{
	json_t *u = json_object_get(rep, "user");

	printf("user:     %s\nstate:    %s\npolicy:   %s\nsessions: %lld\n"
	       "moved:    %lld messages, %lld bytes\n", jstr(u, "user"),
	       jstr(u, "state"), jstr(u, "policy"), jint(u, "sessions"),
	       jint(u, "messages"), jint(u, "bytes"));
	if (jstr(u, "copy")[0] != '\0' && strcmp(jstr(u, "copy"), "-") != 0)
		printf("copy:     %s\n", jstr(u, "copy"));
	if (json_string_value(json_object_get(u, "error")) != NULL)
		printf("error:    %s\n", jstr(u, "error"));
}

static void print_sessions(json_t *rep)
{
	json_t *s;
	size_t i;

	print_gateways(rep);
	printf("%-8s %-24s %-10s %-16s %-21s %-12s %-9s %s\n", "ID", "USER",
	       "PROTO", "CLIENT", "CONNECTED TO", "SERVER", "STATE", "SINCE");
	json_array_foreach(json_object_get(rep, "sessions"), i, s) {
		char when[32];
		time_t t = (time_t)jint(s, "since");
		struct tm tm;

		localtime_r(&t, &tm);
		strftime(when, sizeof(when), "%H:%M:%S", &tm);
		printf("%-8lld %-24s %-10s %-16s %-21s %-12s %-9s %s\n",
		       jint(s, "id"), jstr(s, "user"), jstr(s, "proto"),
		       jstr(s, "client"), jstr(s, "local"), jstr(s, "server"),
		       jstr(s, "state"), when);
	}
}

int status_main(int argc, char *argv[])
{
	struct copts o = { 0 };
	int watch = 0;

	if (common_opts(&argc, argv, &o) < 0)
		return 2;
	if (argc == 2 && !strcmp(argv[1], "--watch"))
		watch = 1;
	else if (argc != 1) {
		fprintf(stderr, "Usage: %s status [--json | --watch] [-s SOCKET]\n",
			prog);
		return 2;
	}
	if (!watch || o.json)
		return finish(&o, request(&o, json_pack("{s:s}", "cmd",
							"status")),
			      print_status);
	/* A live view on a terminal: redrawn every second until ^C. */
	for (;;) {
		json_t *rep = request(&o, json_pack("{s:s}", "cmd", "status"));

		if (rep == NULL)
			return 1;
		if (isatty(STDOUT_FILENO))
			printf("\033[H\033[2J");
		finish(&o, rep, print_status);
		fflush(stdout);
		sleep(1);
	}
}

/* A subcommand's options, then exactly n words (the subcommand's name
 * the first): 0, or -1 when they are not that (its usage said). */
static int fixed_args(int *argc, char *argv[], struct copts *o, int n,
		      const char *usage)
{
	if (common_opts(argc, argv, o) < 0)
		return -1;
	if (*argc == n)
		return 0;
	fprintf(stderr, "Usage: %s %s\n", prog, usage);
	return -1;
}

int sessions_main(int argc, char *argv[])
{
	struct copts o = { 0 };

	if (fixed_args(&argc, argv, &o, 1, "sessions [--json] [-s SOCKET]") < 0)
		return 2;
	return finish(&o, request(&o, json_pack("{s:s}", "cmd", "sessions")),
		      print_sessions);
}

/* mailshiftctl migrate --daemon USER... | migrate --all: asks mailshiftd
 * to move users now (copy, verify, end their sessions, last delta, flip). */
/* Sends {"cmd": CMD, "user": U} for each user; with want_state, waits for
 * each user's copy to end and checks the state it ended in. */
static int per_user(const struct copts *o, const char *cmd, char *users[],
		    int n, const char *doing, const char *want_state)
{
	int ret = 0;

	for (int i = 0; i < n; i++) {
		json_t *rep = request(o, json_pack("{s:s, s:s}", "cmd", cmd,
						   "user", users[i]));

		if (rep == NULL || !json_is_true(json_object_get(rep, "ok"))) {
			fprintf(stderr, "%s: %s: %s\n", prog, users[i],
				rep != NULL ? jstr(rep, "error") : "no reply");
			ret = 1;
		} else if (!o->json) {
			printf("%s: %s\n", users[i], doing);
		}
		json_decref(rep);
	}
	for (int i = 0; want_state != NULL && ret == 0 && i < n; i++) {
		json_t *rep, *u;

		for (;;) {
			rep = request(o, json_pack("{s:s, s:s}", "cmd",
						   "user.show", "user",
						   users[i]));
			u = json_object_get(rep, "user");
			if (u == NULL || (strcmp(jstr(u, "state"), "cutover") &&
					  jstr(u, "copy")[0] == '\0'))
				break;
			json_decref(rep);
			usleep(200 * 1000);
		}
		if (u == NULL || strcmp(jstr(u, "state"), want_state) != 0) {
			fprintf(stderr, "%s: %s: %s%s%s\n", prog, users[i],
				u != NULL ? jstr(u, "state") : "no reply",
				u != NULL && json_object_get(u, "error") ?
				": " : "", u != NULL && json_object_get(u,
				"error") ? jstr(u, "error") : "");
			ret = 1;
		} else if (!o->json) {
			printf("%s: %s\n", users[i], want_state);
		}
		json_decref(rep);
	}
	return ret;
}

int migrate_daemon_main(int argc, char *argv[])
{
	struct copts o = { 0 };
	int all = 0, n = 0;

	if (common_opts(&argc, argv, &o) < 0)
		return 2;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--all"))
			all = 1;
		else if (strcmp(argv[i], "--daemon") != 0)
			argv[1 + n++] = argv[i];
	}
	if ((all && n > 0) || (!all && n == 0)) {
		fprintf(stderr, "Usage: %s migrate --daemon USER... | migrate "
			"--all [-s SOCKET]\n", prog);
		return 2;
	}
	if (all)
		return finish(&o, request(&o, json_pack("{s:s}", "cmd",
							"migrate.all")), NULL);
	return per_user(&o, "migrate", argv + 1, n, "moving", NULL);
}

/* mailshiftctl rollback USER... [--wait]: sends users on the destination
 * back to the source (the destination's changes copied back first). */
int rollback_main(int argc, char *argv[])
{
	struct copts o = { 0 };
	int wait = 0, n = 0;

	if (common_opts(&argc, argv, &o) < 0)
		return 2;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--wait"))
			wait = 1;
		else
			argv[1 + n++] = argv[i];
	}
	if (n == 0) {
		fprintf(stderr, "Usage: %s rollback USER... [--wait] "
			"[-s SOCKET]\n", prog);
		return 2;
	}
	return per_user(&o, "rollback", argv + 1, n, "rolling back",
			wait ? "source" : NULL);
}

static void print_policy(json_t *rep)
{
	json_t *p = json_object_get(rep, "policy"), *v;
	json_t *set = json_object_get(p, "set");
	const char *k;

	printf("default: %s (hold at most %lld s)%s\n", jstr(p, "default"),
	       jint(p, "hold_max_seconds"), json_object_get(set, "") != NULL ?
	       "  [set with mailshiftctl]" : "");
	json_object_foreach(json_object_get(p, "domains"), k, v)
		printf("@%s: %s%s\n", k, json_string_value(v),
		       json_object_get(set, k) != NULL ?
		       "  [set with mailshiftctl]" : "");
}

/* policy --connections N and/or --commands-per-second N: the mover's
 * caps, changed while it runs. 2 when the words are not that. */
static int policy_limits(struct copts *o, int argc, char *argv[])
{
	json_t *req = json_pack("{s:s}", "cmd", "policy.limits");

	for (int i = 1; i < argc; i += 2) {
		const char *key = !strcmp(argv[i], "--connections") ?
			"connections" : !strcmp(argv[i], "--commands-per-second") ?
			"commands_per_second" : NULL;
		char *end;
		long long n;

		if (key == NULL || i + 1 >= argc) {
			json_decref(req);
			return 2;
		}
		n = strtoll(argv[i + 1], &end, 10);
		if (end == argv[i + 1] || *end != '\0') {
			fprintf(stderr, "%s: %s: \"%s\" is not a number\n", prog,
				argv[i], argv[i + 1]);
			json_decref(req);
			return 1;
		}
		json_object_set_new(req, key, json_integer(n));
	}
	return finish(o, request(o, req), print_mover);
}

/* mailshiftctl policy: shows the default and per-domain policies;
 * policy --default P and policy --domain D P change them at run time (kept
 * in the store; "config": back to the config file's); policy USER P sets
 * one user's ("default": back to the domain's or the global one). */
int policy_main(int argc, char *argv[])
{
	struct copts o = { 0 };

	if (common_opts(&argc, argv, &o) < 0)
		return 2;
	if (argc == 1)
		return finish(&o, request(&o, json_pack("{s:s}", "cmd", "policy")),
			      print_policy);
	if (argc == 3 && !strcmp(argv[1], "--default"))
		return finish(&o, request(&o, json_pack("{s:s, s:s}", "cmd",
							"policy.set", "policy",
							argv[2])),
			      print_policy);
	if (argc == 4 && !strcmp(argv[1], "--domain"))
		return finish(&o, request(&o, json_pack("{s:s, s:s, s:s}", "cmd",
							"policy.set", "domain",
							argv[2][0] == '@' ?
							argv[2] + 1 : argv[2],
							"policy", argv[3])),
			      print_policy);
	if (argc >= 3 && (!strcmp(argv[1], "--connections") ||
			  !strcmp(argv[1], "--commands-per-second"))) {
		int r = policy_limits(&o, argc, argv);

		if (r != 2)
			return r;
	} else if (argc == 3 && argv[1][0] != '-')
		/* A user not in the map yet is added with that policy. */
		return finish(&o, request(&o, json_pack("{s:s, s:s, s:s}", "cmd",
							"user.add", "user",
							argv[1], "policy",
							argv[2])),
			      print_user);
	fprintf(stderr, "Usage: %s policy [--json]\n"
		"       %s policy --default passthrough|hold|off|config\n"
		"       %s policy --domain DOMAIN passthrough|hold|off|config\n"
		"       %s policy USER passthrough|hold|off|default\n"
		"       %s policy [--connections N] [--commands-per-second N]\n",
		prog, prog, prog, prog, prog);
	return 2;
}

int kick_main(int argc, char *argv[])
{
	struct copts o = { 0 };

	if (fixed_args(&argc, argv, &o, 2, "kick USER [-s SOCKET]") < 0)
		return 2;
	return finish(&o, request(&o, json_pack("{s:s, s:s}", "cmd", "kick",
						"user", argv[1])), NULL);
}

static void user_usage(void)
{
	fprintf(stderr,
		"Usage: %s user list [--json]\n"
		"       %s user show USER [--json]\n"
		"       %s user add USER [state STATE] [policy POLICY]\n"
		"       %s user set USER {state STATE | policy POLICY}... [--force]\n"
		"       %s user import FILE.csv   (user[,state[,policy]] per line)\n",
		prog, prog, prog, prog, prog);
}

static json_t *user_change(const char *cmd, const char *user, int argc,
			   char *argv[])
{
	json_t *req = json_pack("{s:s, s:s}", "cmd", cmd, "user", user);

	for (int i = 0; i < argc; i += 2) {
		if (!strcmp(argv[i], "--force")) {
			json_object_set_new(req, "force", json_true());
			i--;
			continue;
		}
		if (i + 1 >= argc || (strcmp(argv[i], "state") &&
				      strcmp(argv[i], "policy"))) {
			json_decref(req);
			return NULL;
		}
		json_object_set_new(req, argv[i], json_string(argv[i + 1]));
	}
	return req;
}

static int user_import(const struct copts *o, const char *file)
{
	char line[1024];
	unsigned int n = 0, lineno = 0;
	FILE *f = fopen(file, "r");

	if (f == NULL) {
		fprintf(stderr, "%s: %s: %s\n", prog, file, strerror(errno));
		return 1;
	}
	while (fgets(line, sizeof(line), f) != NULL) {
		char *fields[3] = { NULL, NULL, NULL }, *p = line;
		json_t *req, *rep;
		int i = 0;

		lineno++;
		line[strcspn(line, "\r\n")] = '\0';
		if (line[0] == '\0' || line[0] == '#')
			continue;
		/* strsep, not strtok: "erin,,off" has an empty state. */
		while (p != NULL && i < 3)
			fields[i++] = strsep(&p, ",");
		if (lineno == 1 && !strcmp(fields[0], "user"))
			continue;	/* a header line */
		req = json_pack("{s:s, s:s}", "cmd", "user.add", "user", fields[0]);
		if (fields[1] != NULL && fields[1][0] != '\0')
			json_object_set_new(req, "state", json_string(fields[1]));
		if (fields[2] != NULL && fields[2][0] != '\0')
			json_object_set_new(req, "policy", json_string(fields[2]));
		rep = request(o, req);
		if (rep == NULL || !json_is_true(json_object_get(rep, "ok"))) {
			fprintf(stderr, "%s: %s:%u: %s\n", prog, file, lineno,
				rep != NULL ? jstr(rep, "error") : "no reply");
			json_decref(rep);
			fclose(f);
			return 1;
		}
		json_decref(rep);
		n++;
	}
	fclose(f);
	printf("%u user(s) imported\n", n);
	return 0;
}

int user_main(int argc, char *argv[])
{
	struct copts o = { 0 };
	json_t *req;

	if (common_opts(&argc, argv, &o) < 0)
		return 2;
	if (argc < 2) {
		user_usage();
		return 2;
	}
	if (!strcmp(argv[1], "list") && argc == 2)
		return finish(&o, request(&o, json_pack("{s:s}", "cmd",
							"user.list")),
			      print_users);
	if (!strcmp(argv[1], "show") && argc == 3)
		return finish(&o, request(&o, json_pack("{s:s, s:s}", "cmd",
							"user.show", "user",
							argv[2])),
			      print_user);
	if (!strcmp(argv[1], "import") && argc == 3)
		return user_import(&o, argv[2]);
	if ((!strcmp(argv[1], "add") || !strcmp(argv[1], "set")) && argc >= 3) {
		req = user_change(!strcmp(argv[1], "add") ? "user.add" :
				  "user.set", argv[2], argc - 3, argv + 3);
		if (req == NULL || (!strcmp(argv[1], "set") && argc == 3)) {
			json_decref(req);
			user_usage();
			return 2;
		}
		return finish(&o, request(&o, req), print_user);
	}
	user_usage();
	return 2;
}
