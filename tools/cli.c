/* What mailshiftctl's subcommands share about their own run: the report of
 * a failure (text on stderr, JSON on stdout with --json) and the check for
 * the capability the kernel-facing commands need. Nothing of any one
 * subcommand's work. */
#include <stdio.h>

#include <cap-ng.h>
#include <jansson.h>

#include "subcommands.h"

int cli_fail(int json, const char *cmd, const char *err, int rc)
{
	if (json) {
		json_t *j = json_pack("{s:b,s:s}", "ok", 0, "error", err);

		json_dumpf(j, stdout, JSON_INDENT(2));
		putchar('\n');
		json_decref(j);
	}
	fprintf(stderr, "%s %s: %s\n", prog, cmd, err);
	return rc;
}

int cli_have_net_admin(void)
{
	return capng_get_caps_process() == 0 &&
	       capng_have_capability(CAPNG_EFFECTIVE, CAP_NET_ADMIN);
}
