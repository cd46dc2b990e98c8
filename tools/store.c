/* mailshiftctl store copy: a migration's state (every table of the store)
 * from one store to another, SQLite file or postgresql:// URL either way,
 * in one transaction on the target (store.h, ms_store_copy). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store.h"
#include "subcommands.h"

static void usage(FILE *f)
{
	fprintf(f,
"Usage: %s store copy [--replace] FROM TO\n"
"\n"
"Copies every table of the store FROM into the store TO, each a SQLite file\n"
"path or a postgresql:// URL (the password from a password file: ~/.pgpass\n"
"or PGPASSFILE). FROM is read at one instant, so it may belong to a running\n"
"mailshiftd; TO is written in one transaction and must not be in use. A TO\n"
"holding any row is refused unless --replace, which empties it first.\n",
		prog);
}

static void on_table(void *ctx, const char *table, uint64_t rows)
{
	printf("%s %llu\n", table, (unsigned long long)rows);
}

/* A SQLite path that is not there would open as a new, empty store: as a
 * source that reads as "nothing to copy". */
static int open_store(const char *target, int must_exist,
		      struct ms_store **s_r, char *err, size_t errsz)
{
	char *serr = NULL;
	/* not a URL: one refused for its password holds it */
	const char *name = ms_store_is_url(target) ? must_exist ? "FROM" :
			   "TO" : target;

	if (must_exist && !ms_store_is_url(target) &&
	    access(target, F_OK) < 0) {
		snprintf(err, errsz, "%s: %s", target, strerror(errno));
		return -1;
	}
	if (ms_store_open(target, s_r, &serr) < 0) {
		snprintf(err, errsz, "%s: %s", name,
			 serr != NULL ? serr : "cannot open");
		free(serr);
		return -1;
	}
	return 0;
}

static int store_copy(int argc, char *argv[])
{
	struct ms_store *from = NULL, *to = NULL;
	const char *args[2];
	char err[1200];
	int i, n = 0, replace = 0, ret = 1;

	for (i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--replace")) {
			replace = 1;
		} else if (!strcmp(argv[i], "-h") ||
			   !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else if (argv[i][0] == '-' || n == 2) {
			usage(stderr);
			return 2;
		} else {
			args[n++] = argv[i];
		}
	}
	if (n != 2) {
		usage(stderr);
		return 2;
	}
	if (open_store(args[0], 1, &from, err, sizeof(err)) < 0 ||
	    open_store(args[1], 0, &to, err, sizeof(err)) < 0)
		goto out;
	if (ms_store_copy(from, to, replace, on_table, NULL) < 0) {
		snprintf(err, sizeof(err), "%s", ms_store_error(to));
		goto out;
	}
	ret = 0;
out:
	ms_store_close(&from);
	ms_store_close(&to);
	return ret == 0 ? 0 : cli_fail(0, "store copy", err, 1);
}

int store_main(int argc, char *argv[])
{
	if (argc >= 2 && !strcmp(argv[1], "copy"))
		return store_copy(argc, argv);
	if (argc >= 2 && (!strcmp(argv[1], "-h") ||
			  !strcmp(argv[1], "--help"))) {
		usage(stdout);
		return 0;
	}
	usage(stderr);
	return 2;
}
