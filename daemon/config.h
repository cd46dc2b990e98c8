/* INI-style configuration files: "[section]" headers, "key = value" lines,
 * '#' or ';' comments, surrounding white space trimmed; strict numbers;
 * secret files. */
#ifndef MS_CONFIG_H
#define MS_CONFIG_H

#include <stddef.h>
#include <sys/types.h>

#define MS_INI_MAX_LINE 4096

/* Called for every key; return 0 to go on, or -1 with an error written to
 * err (the parse then fails with "FILE:LINE: <err>"). */
typedef int ms_ini_cb(void *ctx, const char *section, const char *key,
		      const char *value, char *err, size_t errsz);

/* Returns 0, or -1 with the reason in err ("FILE:LINE: ..."). Refused: a
 * file over 1 MiB, a line over MS_INI_MAX_LINE bytes, a NUL byte or another
 * control character (but tab, and CR before the line end), a line that is
 * neither a comment, a "[section]" nor "key = value", an empty key, a key
 * before the first section. */
int ms_ini_parse(const char *path, ms_ini_cb *cb, void *ctx, char *err,
		 size_t errsz);

/* "yes"/"no", "true"/"false", "on"/"off", "1"/"0"; -1 when none. */
int ms_parse_bool(const char *s);
/* A config key's yes or no into *dst: 0, or -1 with "KEY: yes or no" in
 * err (*dst untouched). */
int ms_config_bool(int *dst, const char *key, const char *v, char *err,
		   size_t errsz);

/* A decimal number from min to max: digits only (no sign, no blanks, no
 * suffix). Returns 0, or -1 (and *v_r untouched). */
int ms_parse_uint(const char *s, unsigned int min, unsigned int max,
		  unsigned int *v_r);

/* Reads the first line of a secret file the operator provides. Refused
 * unless the file is a regular file (not a symbolic link), owned by root or
 * by owner, readable by its owner only (mode & 077 == 0), with a first line
 * of 1 to 1022 bytes and no NUL. Returns a malloc'd string (the caller
 * wipes it) or NULL with err set. */
char *ms_read_secret_file_owned(const char *path, uid_t owner, char *err,
				size_t errsz);
/* The same, owner = the effective uid of the caller. */
char *ms_read_secret_file(const char *path, char *err, size_t errsz);

#endif
