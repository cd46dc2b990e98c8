/* mailshiftctl: the operator's command line. One file per subcommand. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "subcommands.h"

#ifndef MS_VERSION
#define MS_VERSION "0.1"
#endif

const char *prog;

static const struct {
	const char *name;
	int (*fn)(int argc, char *argv[]);
	const char *description;
} subcommands[] = {
	{ "migrate", migrate_main, "Copies users' mail from the source to the destination" },
	{ "status", status_main, "Shows the migration's progress (from mailshiftd)" },
	{ "user", user_main, "Lists, shows, adds, imports and changes users" },
	{ "sessions", sessions_main, "Shows who is connected where" },
	{ "kick", kick_main, "Ends a user's sessions" },
	{ "policy", policy_main, "Shows the policies, or changes them" },
	{ "rollback", rollback_main, "Sends users on the destination back to the source" },
	{ "steer", steer_main, "Installs, changes, shows and removes the kernel's steering" },
	{ "takeover", takeover_main, "Takes over the old server's address on this host" },
	{ "giveback", giveback_main, "Undoes a takeover: the address and its steering go" },
	{ "retire", retire_main, "Says whether the source can go, switches it off, reports" },
	{ "store", store_main, "Copies a migration's store between SQLite and PostgreSQL" },
};

static void show_usage(FILE *f)
{
	fprintf(f, "Usage: %s <cmd> [<args>]\n\n", prog);
	fprintf(f, "Available subcommands:\n");
	for (size_t i = 0; i < sizeof(subcommands) / sizeof(subcommands[0]); i++)
		fprintf(f, "  %s: %s\n", subcommands[i].name,
			subcommands[i].description);
	fprintf(f, "You may pass `--help' to any of these subcommands to view usage.\n");
}

int main(int argc, char *argv[])
{
	/* A peer that goes away must be an error on that connection, not
	 * the end of the process. */
	signal(SIGPIPE, SIG_IGN);
	prog = argv[0] != NULL ? argv[0] : "mailshiftctl";
	if (strrchr(prog, '/') != NULL)
		prog = strrchr(prog, '/') + 1;
	if (argc < 2) {
		show_usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") ||
	    !strcmp(argv[1], "help")) {
		show_usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "-v") || !strcmp(argv[1], "--version") ||
	    !strcmp(argv[1], "version")) {
		printf("mailshift %s\n", MS_VERSION);
		return 0;
	}
	for (size_t i = 0; i < sizeof(subcommands) / sizeof(subcommands[0]); i++)
		if (!strcmp(argv[1], subcommands[i].name))
			return subcommands[i].fn(argc - 1, argv + 1);
	fprintf(stderr, "%s: invalid subcommand `%s'\n", prog, argv[1]);
	show_usage(stderr);
	return 2;
}
