/* INI-style configuration files: "[section]" headers, "key = value" lines,
 * '#' or ';' comments, surrounding white space trimmed. */
#ifndef MS_CONFIG_H
#define MS_CONFIG_H

#include <stddef.h>

/* Called for every key; return 0 to go on, or -1 with an error written to
 * err (the parse then fails with "FILE:LINE: <err>"). */
typedef int ms_ini_cb(void *ctx, const char *section, const char *key,
		      const char *value, char *err, size_t errsz);

/* Returns 0, or -1 with the reason in err ("FILE:LINE: ..."). */
int ms_ini_parse(const char *path, ms_ini_cb *cb, void *ctx, char *err,
		 size_t errsz);

/* "yes"/"no", "true"/"false", "on"/"off", "1"/"0"; -1 when none. */
int ms_parse_bool(const char *s);

/* Reads the first line of a secret file the operator provides. Refused
 * unless the file is a regular file readable by its owner only (mode & 077
 * == 0). Returns a malloc'd string (caller wipes) or NULL with err set. */
char *ms_read_secret_file(const char *path, char *err, size_t errsz);

#endif
