/* mailshiftctl takeover and giveback: this host takes the old server's
 * service address (after the old server was renumbered), announces it,
 * steers its mail ports to mailshiftd and forwards its other ports to the
 * old server's new address; giveback undoes exactly that. Every check is
 * made before the first change, and a step that fails takes back the ones
 * before it. */
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dconfig.h"
#include "rtnl.h"
#include "steer.h"
#include "subcommands.h"
#include "takeover.h"

#define DEFAULT_CONFIG "/etc/mailshift/mailshift.conf"

struct topts {
	const char *cmd, *config;
	const char *vip, *dev, *source;	/* the command line's */
	int json, dry_run, no_masquerade;
	struct ms_dconfig c;
	char err[1200];
};

static void usage(FILE *f, const char *cmd)
{
	if (!strcmp(cmd, "giveback")) {
		fprintf(f,
"Usage: %s giveback [-c FILE] [--json] [--dry-run]\n"
"  Deletes the service address this host took over and the takeover's\n"
"  nftables tables, rules and routes: the host is as it was before the\n"
"  takeover. (The old server then takes its address back.)\n", prog);
		return;
	}
	fprintf(f,
"Usage: %s takeover [-c FILE] [--json] [--dry-run] [--vip ADDR] [--dev DEV]\n"
"                   [--source-addr NEWADDR] [--no-masquerade]\n"
"  Takes over the service address ADDR on device DEV, announces it, steers\n"
"  its mail ports ([steer] port) to mailshiftd and forwards every other\n"
"  port to the old server, renumbered to NEWADDR. Defaults come from\n"
"  [takeover] address, device, source_address and masquerade.\n"
"  -c, --config FILE  mailshift.conf (default " DEFAULT_CONFIG ")\n"
"  --no-masquerade    forwarded connections keep the client's address (the\n"
"                     old server must route its replies through this host)\n"
"  --dry-run          print what it would do; change nothing\n", prog);
}

static int fail(struct topts *o, int rc)
{
	return cli_fail(o->json, o->cmd, o->err, rc);
}

static int need_net_admin(struct topts *o)
{
	if (cli_have_net_admin())
		return 0;
	snprintf(o->err, sizeof(o->err), "%s needs CAP_NET_ADMIN (run as "
		 "root); nothing was changed", o->cmd);
	return -1;
}

/* The configuration, with the command line's values over [takeover]'s. */
static int load(struct topts *o)
{
	struct ms_takeover_cfg *t = &o->c.takeover;

	if (ms_dconfig_load(o->config, &o->c, o->err, sizeof(o->err)) < 0)
		return -1;
	if ((o->vip != NULL && ms_steer_addr_parse(o->vip, 0, &t->vip,
						   o->err, sizeof(o->err)) < 0) ||
	    (o->source != NULL && ms_steer_addr_parse(o->source, 0,
						      &t->source, o->err,
						      sizeof(o->err)) < 0))
		return -1;
	if (o->dev != NULL) {
		if (strlen(o->dev) >= sizeof(t->dev)) {
			snprintf(o->err, sizeof(o->err), "device %.64s does "
				 "not exist (name too long)", o->dev);
			return -1;
		}
		snprintf(t->dev, sizeof(t->dev), "%s", o->dev);
	}
	if (o->no_masquerade)
		t->masquerade = 0;
	if (!o->c.steer.present) {
		snprintf(o->err, sizeof(o->err), "%s: no [steer] section (the "
			 "mail ports and mailshiftd's listeners)", o->config);
		return -1;
	}
	return ms_takeover_check(t, o->err, sizeof(o->err));
}

static int print_json(json_t *j)
{
	json_dumpf(j, stdout, JSON_INDENT(2));
	putchar('\n');
	json_decref(j);
	return 0;
}

/* The steering the takeover replaces, as it was: nothing (steer_before
 * 0), or the table [steer] makes. In one transaction with the takeover
 * table's deletion. */
static int restore_steer(struct topts *o, int steer_before)
{
	static const char drop_tk[] = "table inet " MS_TAKEOVER_TABLE "\n"
		"delete table inet " MS_TAKEOVER_TABLE "\n";
	static const char drop_both[] = "table inet " MS_STEER_TABLE "\n"
		"delete table inet " MS_STEER_TABLE "\n";
	struct ms_steer_route rt;
	char *script = NULL, *all = NULL;
	unsigned int n;
	int ret;

	if (!steer_before) {
		if (asprintf(&all, "%s%s", drop_both, drop_tk) < 0)
			return -1;
		ret = ms_steer_nft_run(all, 0, o->err, sizeof(o->err));
		free(all);
		/* Without the table nothing is marked: the routing can go. */
		return ret < 0 ? -1 : ms_rtnl_remove(o->err, sizeof(o->err));
	}
	if (ms_steer_install(&o->c.steer, 1, &script, &rt, &n, o->err,
			     sizeof(o->err)) < 0 ||
	    asprintf(&all, "%s%s", script, drop_tk) < 0) {
		free(script);
		return -1;
	}
	ret = ms_steer_apply(all, &rt, 1, o->err, sizeof(o->err));
	free(script);
	free(all);
	return ret;
}

static void print_plan(const struct ms_takeover_cfg *t, const char *script,
		       const struct ms_steer_route *rt)
{
	printf("# address %s/%u on %s%s, then announced (%s)\n"
	       "# policy routing (proto %d): rule fwmark 0x%08x lookup %u "
	       "priority %u; route local default dev lo table %u\n%s",
	       t->vip.text, t->vip.family == AF_INET ? 32 : 128, t->dev,
	       t->vip.family == AF_INET6 ? " (nodad)" : "",
	       t->vip.family == AF_INET ? "gratuitous ARP" :
	       "unsolicited neighbour advertisement", MS_RTNL_PROTO, rt->mark,
	       rt->table, rt->priority, rt->table, script);
}

/* The steps in order, each taken back when a later one fails: the tables
 * and routing first (nothing reaches the VIP here yet), then the address,
 * then the news. */
static int apply(struct topts *o, const char *script,
		 const struct ms_steer_route *rt, int ifindex,
		 const unsigned char mac[6], int steer_before)
{
	struct ms_takeover_cfg *t = &o->c.takeover;
	char undo_err[600];

	if (ms_steer_apply(script, rt, 1, o->err, sizeof(o->err)) < 0)
		return -1;
	if (ms_takeover_addr(1, &t->vip, ifindex, o->err,
			     sizeof(o->err)) < 0)
		goto undo_tables;
	if (ms_takeover_announce(&t->vip, ifindex, mac, o->err,
				 sizeof(o->err)) < 0)
		goto undo_addr;
	return 0;
undo_addr:
	ms_takeover_addr(0, &t->vip, ifindex, undo_err, sizeof(undo_err));
undo_tables:
	snprintf(undo_err, sizeof(undo_err), "%s", o->err);
	if (restore_steer(o, steer_before) < 0) {
		char why[600];

		snprintf(why, sizeof(why), "%s", o->err);
		snprintf(o->err, sizeof(o->err), "%s; taking the tables back "
			 "failed too: %s", undo_err, why);
		return -1;
	}
	snprintf(o->err, sizeof(o->err), "%s; everything was taken back",
		 undo_err);
	return -1;
}

static int cmd_takeover(struct topts *o)
{
	struct ms_takeover_cfg *t = &o->c.takeover;
	struct ms_steer_cfg s;
	struct ms_takeover_state st;
	struct ms_steer_route rt;
	unsigned char mac[6];
	char *script = NULL, *tk = NULL, *all = NULL;
	json_t *steer_state = NULL;
	unsigned int n;
	int ifindex, steer_before, ret = 1;

	if (load(o) < 0)
		return fail(o, 2);
	s = o->c.steer;
	if (ms_takeover_steer(t, &s, o->err, sizeof(o->err)) < 0)
		return fail(o, 2);
	if (need_net_admin(o) < 0 ||
	    (!o->dry_run && ms_steer_lock(o->err, sizeof(o->err)) < 0) ||
	    ms_takeover_read(&st, o->err, sizeof(o->err)) < 0)
		return fail(o, 1);
	if (st.installed) {
		snprintf(o->err, sizeof(o->err), "%s is taken over already "
			 "(on %s, the old server at %s): giveback first; "
			 "nothing was changed", st.vip.text, st.dev,
			 st.source.text);
		return fail(o, 2);
	}
	if (ms_takeover_host_check(t, mac, &ifindex, o->err,
				   sizeof(o->err)) < 0)
		return fail(o, 2);
	if (ms_steer_read(&s, &steer_state, o->err, sizeof(o->err)) < 0)
		return fail(o, 1);
	steer_before = json_is_true(json_object_get(steer_state,
						    "installed"));
	json_decref(steer_state);
	if (ms_steer_install(&s, 1, &script, &rt, &n, o->err,
			     sizeof(o->err)) < 0)
		goto out;
	tk = ms_takeover_ruleset(t, s.mark, steer_before);
	if (tk == NULL || asprintf(&all, "%s%s", script, tk) < 0) {
		snprintf(o->err, sizeof(o->err), "out of memory");
		all = NULL;
		goto out;
	}
	if (o->dry_run) {
		print_plan(t, all, &rt);
		ret = 0;
		goto out;
	}
	if (apply(o, all, &rt, ifindex, mac, steer_before) < 0)
		goto out;
	ret = 0;
	if (o->json)
		print_json(json_pack("{s:b,s:s,s:s,s:s,s:s,s:I,s:b,s:b}", "ok",
				     1, "done", "takeover", "vip", t->vip.text,
				     "device", t->dev, "source",
				     t->source.text, "entries", (json_int_t)n,
				     "masquerade", t->masquerade,
				     "announced", 1));
	else
		printf("takeover: %s on %s, announced; mail ports steered (%u "
		       "entries), other ports forwarded to %s%s\n",
		       t->vip.text, t->dev, n, t->source.text,
		       t->masquerade ? " (masquerade)" : "");
out:
	free(script);
	free(tk);
	free(all);
	return ret == 0 ? 0 : fail(o, ret);
}

static int cmd_giveback(struct topts *o)
{
	struct ms_takeover_state st;
	int ifindex;

	if (need_net_admin(o) < 0 ||
	    (!o->dry_run && ms_steer_lock(o->err, sizeof(o->err)) < 0) ||
	    ms_takeover_read(&st, o->err, sizeof(o->err)) < 0)
		return fail(o, 1);
	if (!st.installed) {
		snprintf(o->err, sizeof(o->err), "nothing is taken over (no "
			 "table inet %s); nothing was changed",
			 MS_TAKEOVER_TABLE);
		return fail(o, 2);
	}
	/* Putting the steering back as it was needs [steer]; read before
	 * the first change. */
	if (st.steer_before && ms_dconfig_load(o->config, &o->c, o->err,
					       sizeof(o->err)) < 0)
		return fail(o, 2);
	if (o->dry_run) {
		printf("# delete address %s from %s\n# %s\n", st.vip.text,
		       st.dev, st.steer_before ? "reinstall the steering "
		       "table from [steer], delete table inet "
		       MS_TAKEOVER_TABLE : "delete tables inet " MS_STEER_TABLE
		       " and inet " MS_TAKEOVER_TABLE ", and mailshift's "
		       "rules and routes");
		return 0;
	}
	/* The address first: the host stops answering for it. A device
	 * that went away took the address with it. */
	ifindex = (int)if_nametoindex(st.dev);
	if (ifindex != 0 && ms_takeover_addr(0, &st.vip, ifindex, o->err,
					     sizeof(o->err)) < 0)
		return fail(o, 1);
	if (restore_steer(o, st.steer_before) < 0) {
		char e[600];

		if (ifindex != 0)
			ms_takeover_addr(1, &st.vip, ifindex, e, sizeof(e));
		return fail(o, 1);
	}
	if (o->json)
		return print_json(json_pack("{s:b,s:s,s:s,s:s}", "ok", 1,
					    "done", "giveback", "vip",
					    st.vip.text, "device", st.dev));
	printf("giveback: %s is no longer on %s; the takeover's tables, "
	       "rules and routes are gone\n", st.vip.text, st.dev);
	return 0;
}

static int takeover_common(const char *cmd, int argc, char *argv[])
{
	struct topts o = { .cmd = cmd, .config = DEFAULT_CONFIG };
	int giveback = !strcmp(cmd, "giveback");

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char **val = !strcmp(a, "-c") || !strcmp(a, "--config") ?
			&o.config : giveback ? NULL : !strcmp(a, "--vip") ?
			&o.vip : !strcmp(a, "--dev") ? &o.dev :
			!strcmp(a, "--source-addr") ? &o.source : NULL;

		if (val != NULL && i + 1 < argc)
			*val = argv[++i];
		else if (!strcmp(a, "--json") || !strcmp(a, "-j"))
			o.json = 1;
		else if (!strcmp(a, "--dry-run") || !strcmp(a, "-n"))
			o.dry_run = 1;
		else if (!giveback && !strcmp(a, "--no-masquerade"))
			o.no_masquerade = 1;
		else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout, cmd);
			return 0;
		} else {
			usage(stderr, cmd);
			return 2;
		}
	}
	return giveback ? cmd_giveback(&o) : cmd_takeover(&o);
}

int takeover_main(int argc, char *argv[])
{
	return takeover_common("takeover", argc, argv);
}

int giveback_main(int argc, char *argv[])
{
	return takeover_common("giveback", argc, argv);
}
