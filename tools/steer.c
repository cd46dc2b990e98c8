/* mailshiftctl steer: installs, changes, shows and removes the kernel's
 * steering (the nftables table "inet mailshift" and its policy routing)
 * from [steer] of mailshift.conf. Every check is made before the first
 * change; a failed change leaves the kernel as it was. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dconfig.h"
#include "rtnl.h"
#include "steer.h"
#include "subcommands.h"

#define DEFAULT_CONFIG "/etc/mailshift/mailshift.conf"

struct sopts {
	const char *config;
	int json, dry_run;
	int backend;			/* --backend, -1: the configuration's */
	struct ms_dconfig *c;
	json_t *state;			/* ms_steer_read's */
	char err[1200];
};

static void usage(FILE *f)
{
	fprintf(f,
"Usage: %s steer [-c FILE] [--json] [--dry-run] COMMAND\n"
"  install                       the table and policy routing from [steer]\n"
"                                (replaces what is installed, atomically)\n"
"  set ADDR PORT [PREFIX] ACTION one decision of the installed table\n"
"                                (ACTION proxy, source, destination, or\n"
"                                default: the configured one / no override)\n"
"  show                          what is installed, with the counters\n"
"  stats                         the counters: new connections per entry,\n"
"                                packets reset because nothing listened\n"
"  remove                        the table, the rules and the routes\n"
"  hold [--timeout S] [--max N] [--queue Q]\n"
"                                hold new connections to the steered ports\n"
"                                (NFQUEUE) while no mailshiftd listens, until\n"
"                                a new one does (default 30 s, 4096)\n"
"  sessions                      the module's session map per user (backend\n"
"                                kmod): client, server, state, packets, resets\n"
"  -c, --config FILE  mailshift.conf (default " DEFAULT_CONFIG ")\n"
"  --backend nft|kmod where the table lives (default: [steer] backend)\n"
"  --dry-run          print the ruleset and routing it would apply; change\n"
"                     nothing\n", prog);
}

static int fail(struct sopts *o, int rc)
{
	return cli_fail(o->json, "steer", o->err, rc);
}

static int need_net_admin(struct sopts *o)
{
	if (cli_have_net_admin())
		return 0;
	snprintf(o->err, sizeof(o->err), "reading or changing the kernel's "
		 "steering (nftables, rtnetlink) needs CAP_NET_ADMIN (run as "
		 "root); nothing was changed");
	return -1;
}

static int load(struct sopts *o)
{
	static struct ms_dconfig c;

	o->c = &c;
	if (ms_dconfig_load(o->config, &c, o->err, sizeof(o->err)) < 0)
		return -1;
	if (!c.steer.present) {
		snprintf(o->err, sizeof(o->err), "%s: no [steer] section",
			 o->config);
		return -1;
	}
	if (o->backend >= 0)
		c.steer.backend = o->backend;
	return 0;
}

static void print_plan(const char *script, const struct ms_steer_route *rt)
{
	printf("# policy routing (%s, proto %d):\n"
	       "#   rule fwmark 0x%08x lookup %u priority %u\n"
	       "#   route local default dev lo table %u\n%s",
	       rt->families == 3 ? "IPv4 and IPv6" : rt->families == 2 ?
	       "IPv6" : "IPv4", MS_RTNL_PROTO,
	       rt->mark, rt->table, rt->priority, rt->table, script);
}

static int done(struct sopts *o, const char *what,
		const struct ms_steer_route *rt, unsigned int n)
{
	if (o->json) {
		json_t *j = json_pack("{s:b,s:s,s:I}", "ok", 1, "done", what,
				      "entries", (json_int_t)n);

		if (rt != NULL)
			json_object_set_new(j, "route", json_pack(
				"{s:I,s:I,s:I}", "mark", (json_int_t)rt->mark,
				"table", (json_int_t)rt->table, "priority",
				(json_int_t)rt->priority));
		json_dumpf(j, stdout, JSON_INDENT(2));
		putchar('\n');
		json_decref(j);
	} else if (rt != NULL) {
		printf("steer: %s: %u entries; mark 0x%08x, routing table %u, "
		       "rule priority %u\n", what, n, rt->mark, rt->table,
		       rt->priority);
	} else {
		printf("steer: %s\n", what);
	}
	return 0;
}

static int read_state(struct sopts *o)
{
	return ms_steer_read(&o->c->steer, &o->state, o->err, sizeof(o->err));
}

/* Replaces the installed table (its routing stays as it is). */
static int replace(struct sopts *o, const struct ms_steer_entry *e,
		   unsigned int n, const struct ms_steer_route *rt)
{
	int kmod = o->c->steer.backend == MS_STEER_BACKEND_KMOD;
	char *script = kmod ? ms_steer_kmod_text(&o->c->steer, e, n, rt) :
			      ms_steer_ruleset(&o->c->steer, e, n, rt,
				json_object_get(o->state, "counters"));

	if (script == NULL) {
		snprintf(o->err, sizeof(o->err), "out of memory");
		return fail(o, 1);
	}
	if (o->dry_run) {
		print_plan(script, rt);
		free(script);
		return 0;
	}
	if (kmod ? ms_steer_kmod_set(&o->c->steer, e, n, rt, o->err,
				     sizeof(o->err)) < 0 :
		   ms_steer_apply(script, rt, 0, o->err, sizeof(o->err)) < 0) {
		free(script);
		return fail(o, 1);
	}
	free(script);
	return done(o, "changed", rt, n);
}

static int cmd_install(struct sopts *o)
{
	struct ms_steer_route rt;
	char *script = NULL;
	unsigned int n = 0;

	if (load(o) < 0)
		return fail(o, 2);
	if (need_net_admin(o) < 0 ||
	    ms_steer_install(&o->c->steer, o->dry_run, &script, &rt, &n,
			     o->err, sizeof(o->err)) < 0) {
		free(script);
		return fail(o, 1);
	}
	if (o->dry_run)
		print_plan(script, &rt);
	free(script);
	return o->dry_run ? 0 : done(o, "installed", &rt, n);
}

/* The installed table's entries, and where its routing is. */
static int installed(struct sopts *o, struct ms_steer_entry *e,
		     unsigned int *n, struct ms_steer_route *rt)
{
	json_t *r = json_object_get(o->state, "route"), *v;
	size_t i;

	if (!json_is_true(json_object_get(o->state, "installed")) ||
	    r == NULL) {
		snprintf(o->err, sizeof(o->err), "the steering table is not "
			 "installed (mailshiftctl steer install)");
		return -1;
	}
	rt->mark = json_integer_value(json_object_get(r, "mark"));
	rt->table = json_integer_value(json_object_get(r, "table"));
	rt->priority = json_integer_value(json_object_get(r, "priority"));
	*n = 0;
	json_array_foreach(json_object_get(o->state, "entries"), i, v) {
		if (*n == MS_STEER_MAX_EXPANDED ||
		    ms_steer_entry_parse(json_string_value(v), &e[(*n)++],
					 o->err, sizeof(o->err)) < 0) {
			snprintf(o->err, sizeof(o->err), "the installed table "
				 "has an entry mailshift cannot read: \"%s\"",
				 json_string_value(v));
			return -1;
		}
	}
	return 0;
}

static int same_key(const struct ms_steer_entry *a,
		    const struct ms_steer_entry *b)
{
	char x[200], y[200];
	struct ms_steer_entry ka = *a, kb = *b;

	ka.action = kb.action = MS_STEER_PROXY;
	ms_steer_entry_text(&ka, x, sizeof(x));
	ms_steer_entry_text(&kb, y, sizeof(y));
	return !strcmp(x, y);
}

/* The configured action for an entry without a prefix. */
static enum ms_steer_action configured(const struct ms_steer_cfg *s,
				       const struct ms_steer_entry *want)
{
	for (unsigned int i = 0; i < s->nentries; i++)
		if (same_key(&s->entries[i], want))
			return s->entries[i].action;
	return want->port == MS_STEER_OTHER ? s->other : s->action;
}

static int cmd_set(struct sopts *o, int argc, char *argv[])
{
	static struct ms_steer_entry e[MS_STEER_MAX_EXPANDED];
	struct ms_steer_entry want;
	struct ms_steer_route rt = { 0 };
	char line[400] = "";
	unsigned int n, i;
	int dflt;

	if (argc < 4 || argc > 5) {
		usage(stderr);
		return 2;
	}
	/* "default" is resolved below; parse the rest as an entry. */
	dflt = !strcmp(argv[argc - 1], "default");
	for (int k = 1; k < argc; k++)
		snprintf(line + strlen(line), sizeof(line) - strlen(line),
			 "%s%s", k > 1 ? " " : "", k == argc - 1 && dflt ?
			 "proxy" : argv[k]);
	if (load(o) < 0)
		return fail(o, 2);
	if (ms_steer_entry_parse(line, &want, o->err, sizeof(o->err)) < 0)
		return fail(o, 2);
	if (need_net_admin(o) < 0 || read_state(o) < 0 ||
	    installed(o, e, &n, &rt) < 0)
		return fail(o, 1);
	if (rt.mark != o->c->steer.mark) {
		snprintf(o->err, sizeof(o->err), "the installed table uses mark "
			 "0x%08x, the configuration 0x%08x: run steer install "
			 "(nothing was changed)", rt.mark, o->c->steer.mark);
		return fail(o, 2);
	}
	rt.families = ms_steer_families(&o->c->steer);
	if (dflt && !want.prefix.family)
		want.action = configured(&o->c->steer, &want);
	for (i = 0; i < n && !same_key(&e[i], &want); i++)
		;
	if (i == n && !want.prefix.family) {
		snprintf(o->err, sizeof(o->err), "%s port %s is not steered "
			 "([steer] address and port)", want.addr.text,
			 argv[2]);
		return fail(o, 2);
	}
	if (dflt && want.prefix.family) {
		if (i == n) {
			snprintf(o->err, sizeof(o->err), "no entry for %s "
				 "from %s", want.addr.text, want.prefix.text);
			return fail(o, 2);
		}
		e[i] = e[--n];
	} else if (i < n) {
		e[i] = want;
	} else if (n == MS_STEER_MAX_EXPANDED) {
		snprintf(o->err, sizeof(o->err), "too many entries");
		return fail(o, 1);
	} else {
		e[n++] = want;
	}
	if (ms_steer_entries_check(&o->c->steer, e, n, o->err,
				   sizeof(o->err)) < 0)
		return fail(o, 2);
	return replace(o, e, n, &rt);
}

static int cmd_remove(struct sopts *o)
{
	static const char script[] = "table inet " MS_STEER_TABLE "\n"
				     "delete table inet " MS_STEER_TABLE "\n";
	static struct ms_steer_cfg none;
	int kmod;

	if (o->dry_run) {
		printf("# every rule and route of proto %d, and:\n%s",
		       MS_RTNL_PROTO, script);
		return 0;
	}
	if (need_net_admin(o) < 0)
		return fail(o, 1);
	/* backend = kmod: nftables is left alone (the host may not even
	 * have it). */
	kmod = load(o) == 0 && o->c->steer.backend == MS_STEER_BACKEND_KMOD;
	/* The table first: without it nothing is marked, so the routing
	 * can go after it without a packet going astray. */
	if ((!kmod &&
	     (ms_steer_read(&none, &o->state, o->err, sizeof(o->err)) < 0 ||
	      (json_is_true(json_object_get(o->state, "installed")) &&
	       ms_steer_nft_run(script, 0, o->err, sizeof(o->err)) < 0))) ||
	    ms_steer_kmod_remove(o->err, sizeof(o->err)) < 0 ||
	    ms_rtnl_remove(o->err, sizeof(o->err)) < 0)
		return fail(o, 1);
	/* a hold killed before it could clean up: its rules go too */
	steer_hold_clean();
	return done(o, "removed", NULL, 0);
}

/* hold: see steer_hold.c. No steering lock: it changes nothing of the
 * table, and a restart's hold must not keep steer commands waiting. */
static int cmd_hold(struct sopts *o, int argc, char *argv[])
{
	int rc;

	if (need_net_admin(o) < 0)
		return fail(o, 1);
	if (load(o) < 0)
		return fail(o, 2);
	rc = steer_hold(&o->c->steer, argc, argv, o->err, sizeof(o->err));
	return rc == 0 ? 0 : fail(o, rc);
}

/* The module counts connections, packets and bytes (nft's decide rule
 * counts a connection as its first packet): the last row gets them. */
static void kmod_counts(json_t *rows, json_t *c)
{
	json_t *row = json_array_get(rows, json_array_size(rows) - 1);

	if (json_object_get(c, "connections") == NULL)
		return;
	json_object_set(row, "connections", json_object_get(c, "connections"));
	json_object_set(row, "packets", json_object_get(c, "packets"));
	json_object_set(row, "bytes", json_object_get(c, "bytes"));
}

/* {"entries": [{entry, address, port, prefix, action, connections}],
 * "rejected": N}, from the installed table. */
static json_t *stats(struct sopts *o)
{
	json_t *out = json_pack("{s:[]}", "entries"), *v;
	json_t *counters = json_object_get(o->state, "counters");
	struct ms_steer_entry e;
	char name[128], port[8];
	size_t i;

	json_array_foreach(json_object_get(o->state, "entries"), i, v) {
		if (ms_steer_entry_parse(json_string_value(v), &e, o->err,
					 sizeof(o->err)) < 0)
			continue;
		ms_steer_counter_name(&e, name, sizeof(name));
		snprintf(port, sizeof(port), "%u", e.port);
		json_array_append_new(json_object_get(out, "entries"),
			json_pack("{s:O,s:s,s:s,s:s?,s:s,s:O?}", "entry", v,
				  "address", e.addr.text, "port",
				  e.port ? port : "other", "prefix",
				  e.prefix.family ? e.prefix.text : NULL,
				  "action", ms_steer_action_name(e.action),
				  "connections", json_object_get(
					json_object_get(counters, name),
					"packets")));
		kmod_counts(json_object_get(out, "entries"),
			    json_object_get(counters, name));
	}
	v = json_object_get(json_object_get(counters, "rejected"), "packets");
	json_object_set_new(out, "rejected", v ? json_incref(v) :
			    json_integer(0));
	return out;
}

static void print_stats(json_t *st)
{
	json_t *v;
	size_t i;

	printf("%-50s %12s\n", "ENTRY", "CONNECTIONS");
	json_array_foreach(json_object_get(st, "entries"), i, v)
		printf("%-50s %12" JSON_INTEGER_FORMAT "\n",
		       json_string_value(json_object_get(v, "entry")),
		       json_integer_value(json_object_get(v, "connections")));
	printf("%-50s %12" JSON_INTEGER_FORMAT "\n",
	       "rejected (packets reset: nothing listening)",
	       json_integer_value(json_object_get(st, "rejected")));
}

static int cmd_show(struct sopts *o, int counters_only)
{
	static struct ms_steer_cfg none;
	json_t *out, *routing, *r = NULL;

	/* The configuration, when there is one, names the backend. */
	if (o->c == NULL && load(o) < 0)
		o->c = NULL;
	if (need_net_admin(o) < 0 ||
	    ms_steer_read(o->c ? &o->c->steer : &none, &o->state, o->err,
			  sizeof(o->err)) < 0 ||
	    (routing = ms_rtnl_show(o->err, sizeof(o->err))) == NULL)
		return fail(o, 1);
	out = stats(o);
	if (!counters_only) {
		r = json_object_get(o->state, "route");
		json_object_set(out, "installed",
				json_object_get(o->state, "installed"));
		json_object_set(out, "route", r ? r : json_null());
		json_object_set(out, "routing", routing);
	}
	if (o->json) {
		json_dumpf(out, stdout, JSON_INDENT(2));
		putchar('\n');
	} else if (!counters_only) {
		printf("%s%s: %s\n", json_object_get(o->state, "backend") ?
		       "mailshift module table" : "table inet ",
		       json_object_get(o->state, "backend") ? "" :
		       MS_STEER_TABLE,
		       json_is_true(json_object_get(o->state, "installed")) ?
		       "installed" : "not installed");
		if (r != NULL)
			printf("policy routing: mark 0x%08x, table %"
			       JSON_INTEGER_FORMAT ", priority %"
			       JSON_INTEGER_FORMAT "; %zu rule(s), %zu "
			       "route(s) of proto %d\n", (unsigned int)
			       json_integer_value(json_object_get(r, "mark")),
			       json_integer_value(json_object_get(r, "table")),
			       json_integer_value(json_object_get(r,
							"priority")),
			       json_array_size(json_object_get(routing,
							"rules")),
			       json_array_size(json_object_get(routing,
							"routes")),
			       MS_RTNL_PROTO);
		print_stats(out);
	} else {
		print_stats(out);
	}
	json_decref(routing);
	json_decref(out);
	return 0;
}

static void print_sessions(json_t *out)
{
	json_t *u, *v;
	size_t i, j;

	printf("sessions: %" JSON_INTEGER_FORMAT " (at most %"
	       JSON_INTEGER_FORMAT ")\n",
	       json_integer_value(json_object_get(out, "sessions")),
	       json_integer_value(json_object_get(out, "max_sessions")));
	json_array_foreach(json_object_get(out, "users"), i, u) {
		printf("%s (%s): %zu session(s), %" JSON_INTEGER_FORMAT
		       " reset(s)\n",
		       json_string_value(json_object_get(u, "user")),
		       json_string_value(json_object_get(u, "state")),
		       json_array_size(json_object_get(u, "sessions")),
		       json_integer_value(json_object_get(u, "resets")));
		json_array_foreach(json_object_get(u, "sessions"), j, v)
			printf("  %s -> %s  %-11s packets %" JSON_INTEGER_FORMAT
			       "  resets %" JSON_INTEGER_FORMAT "\n",
			       json_string_value(json_object_get(v, "client")),
			       json_string_value(json_object_get(v, "local")),
			       json_string_value(json_object_get(v, "server")),
			       json_integer_value(json_object_get(v, "packets")),
			       json_integer_value(json_object_get(v, "resets")));
	}
}

/* The module's session map; the nft backend has none (exit 2, as a
 * configuration that cannot do what is asked). */
static int cmd_sessions(struct sopts *o)
{
	int backend = o->backend;
	json_t *out;

	if (backend < 0) {
		if (load(o) < 0)
			return fail(o, 2);
		backend = o->c->steer.backend;
	}
	if (backend != MS_STEER_BACKEND_KMOD) {
		snprintf(o->err, sizeof(o->err), "the nft backend keeps no "
			 "session map: steer sessions needs [steer] backend = "
			 "kmod (the mailshift kernel module)");
		return fail(o, 2);
	}
	if (need_net_admin(o) < 0 ||
	    ms_steer_kmod_sessions(&out, o->err, sizeof(o->err)) < 0)
		return fail(o, 1);
	if (o->json) {
		json_dumpf(out, stdout, JSON_INDENT(2));
		putchar('\n');
	} else {
		print_sessions(out);
	}
	json_decref(out);
	return 0;
}

int steer_main(int argc, char *argv[])
{
	struct sopts o = { .config = DEFAULT_CONFIG, .backend = -1 };
	int n = 0, ret;

	for (int i = 1; i < argc; i++) {
		if ((!strcmp(argv[i], "-c") || !strcmp(argv[i], "--config")) &&
		    i + 1 < argc)
			o.config = argv[++i];
		else if (!strcmp(argv[i], "--backend") && i + 1 < argc &&
			 (!strcmp(argv[i + 1], "nft") ||
			  !strcmp(argv[i + 1], "kmod")))
			o.backend = argv[++i][0] == 'k' ?
				    MS_STEER_BACKEND_KMOD : MS_STEER_BACKEND_NFT;
		else if (!strcmp(argv[i], "--json") || !strcmp(argv[i], "-j"))
			o.json = 1;
		else if (!strcmp(argv[i], "--dry-run") || !strcmp(argv[i], "-n"))
			o.dry_run = 1;
		else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else
			argv[n++] = argv[i];
	}
	if (n < 1) {
		usage(stderr);
		return 2;
	}
	/* A read-modify-write (set) or a replace must not interleave with
	 * another; held until exit. */
	if (strcmp(argv[0], "show") != 0 && strcmp(argv[0], "stats") != 0 &&
	    strcmp(argv[0], "hold") != 0 && strcmp(argv[0], "sessions") != 0 &&
	    !o.dry_run && ms_steer_lock(o.err, sizeof(o.err)) < 0)
		return fail(&o, 1);
	if (!strcmp(argv[0], "install") && n == 1)
		ret = cmd_install(&o);
	else if (!strcmp(argv[0], "set"))
		ret = cmd_set(&o, n, argv);
	else if (!strcmp(argv[0], "hold"))
		ret = cmd_hold(&o, n, argv);
	else if (!strcmp(argv[0], "remove") && n == 1)
		ret = cmd_remove(&o);
	else if ((!strcmp(argv[0], "show") || !strcmp(argv[0], "stats")) &&
		 n == 1)
		ret = cmd_show(&o, argv[0][1] == 't');
	else if (!strcmp(argv[0], "sessions") && n == 1)
		ret = cmd_sessions(&o);
	else {
		usage(stderr);
		return 2;
	}
	json_decref(o.state);
	return ret;
}

int steer_all_to_destination(struct ms_dconfig *c, unsigned int *n_r,
			     char *err, size_t errsz)
{
	static struct ms_steer_entry e[MS_STEER_MAX_EXPANDED];
	struct sopts o = { .c = c };
	struct ms_steer_route rt = { 0 };
	struct ms_steer_cfg s;
	char *script = NULL;
	unsigned int n = 0;
	int ret = -1;

	if (need_net_admin(&o) < 0 || read_state(&o) < 0)
		goto out;
	if (!json_is_true(json_object_get(o.state, "installed"))) {
		/* Nothing installed: [steer] with every mail port sent
		 * to the destination. */
		s = c->steer;
		ms_steer_cfg_retired(&s);
		ret = ms_steer_install(&s, 0, &script, &rt, &n, o.err,
				       sizeof(o.err));
		goto out;
	}
	if (installed(&o, e, &n, &rt) < 0)
		goto out;
	rt.families = ms_steer_families(&c->steer);
	ms_steer_entries_retired(e, n);
	if (ms_steer_entries_check(&c->steer, e, n, o.err, sizeof(o.err)) < 0)
		goto out;
	script = ms_steer_ruleset(&c->steer, e, n, &rt,
				  json_object_get(o.state, "counters"));
	if (script == NULL)
		snprintf(o.err, sizeof(o.err), "out of memory");
	else
		ret = ms_steer_apply(script, &rt, 0, o.err, sizeof(o.err));
out:
	if (ret < 0)
		snprintf(err, errsz, "%s", o.err);
	free(script);
	json_decref(o.state);
	*n_r = n;
	return ret;
}
