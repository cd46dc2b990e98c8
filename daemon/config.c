/* INI-style configuration files, strict numbers and secret files: what
 * mailshiftd and mailshiftctl read from the operator. Everything here
 * refuses what it does not understand, with the file and line. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "config.h"

#define INI_MAX_FILE (1024 * 1024)

static char *trim(char *s)
{
	char *e;

	while (isspace((unsigned char)*s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

/* The whole file (a configuration is small; a huge one is a mistake). */
static char *read_all(const char *path, size_t *len_r, char *err,
		      size_t errsz)
{
	size_t len = 0, cap = 8192;
	char *buf = malloc(cap);
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);

	if (fd < 0 || buf == NULL) {
		snprintf(err, errsz, "%s: %s", path,
			 fd < 0 ? strerror(errno) : "out of memory");
		goto fail;
	}
	for (;;) {
		ssize_t n;

		if (len == cap) {
			char *nb = cap < INI_MAX_FILE ? realloc(buf, cap * 2) :
				   NULL;

			if (nb == NULL) {
				snprintf(err, errsz, "%s: %s", path,
					 cap < INI_MAX_FILE ? "out of memory" :
					 "too big (over 1 MiB)");
				goto fail;
			}
			buf = nb;
			cap *= 2;
		}
		n = read(fd, buf + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			snprintf(err, errsz, "%s: %s", path, strerror(errno));
			goto fail;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	*len_r = len;
	return buf;
fail:
	if (fd >= 0)
		close(fd);
	free(buf);
	return NULL;
}

/* Checks one raw line (without its '\n') before it is parsed: the parser
 * works on C strings, so a NUL would silently cut the line short. */
static const char *line_problem(const char *p, size_t len)
{
	static char why[64];

	if (len > MS_INI_MAX_LINE)
		return "line too long (more than 4096 bytes)";
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)p[i];

		if (ch == '\0')
			return "NUL byte in the line";
		if (ch == '\r' && i == len - 1)
			continue;	/* a CRLF line end */
		if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
			snprintf(why, sizeof(why), "control character 0x%02x "
				 "in the line", ch);
			return why;
		}
	}
	return NULL;
}

static int parse_line(char *s, char *section, size_t secsz,
		      ms_ini_cb *cb, void *ctx, char *msg, size_t msgsz)
{
	char *eq, *key;

	s = trim(s);
	if (*s == '\0' || *s == '#' || *s == ';')
		return 0;
	if (*s == '[') {
		char *close = strchr(s, ']'), *name;

		if (close == NULL || close[1] != '\0') {
			snprintf(msg, msgsz, "bad section header (want "
				 "\"[name]\")");
			return -1;
		}
		*close = '\0';
		name = trim(s + 1);
		if (*name == '\0' || strchr(name, '[') != NULL ||
		    strlen(name) >= secsz) {
			snprintf(msg, msgsz, "bad section name");
			return -1;
		}
		snprintf(section, secsz, "%s", name);
		return 0;
	}
	eq = strchr(s, '=');
	if (eq == NULL) {
		snprintf(msg, msgsz, "expected \"key = value\"");
		return -1;
	}
	*eq = '\0';
	key = trim(s);
	if (*key == '\0') {
		snprintf(msg, msgsz, "no key before '='");
		return -1;
	}
	if (*section == '\0') {
		snprintf(msg, msgsz, "\"%s\" outside any [section]", key);
		return -1;
	}
	return cb(ctx, section, key, trim(eq + 1), msg, msgsz);
}

int ms_ini_parse(const char *path, ms_ini_cb *cb, void *ctx, char *err,
		 size_t errsz)
{
	char line[MS_INI_MAX_LINE + 1], section[128] = "", msg[256];
	unsigned int lineno = 0;
	size_t len, off = 0;
	char *text = read_all(path, &len, err, errsz);

	if (text == NULL)
		return -1;
	while (off < len) {
		const char *p = text + off, *nl = memchr(p, '\n', len - off);
		size_t linelen = nl != NULL ? (size_t)(nl - p) : len - off;
		const char *why = line_problem(p, linelen);

		lineno++;
		off += linelen + (nl != NULL);
		msg[0] = '\0';
		if (why == NULL) {
			memcpy(line, p, linelen);
			line[linelen] = '\0';
			if (parse_line(line, section, sizeof(section), cb, ctx,
				       msg, sizeof(msg)) == 0)
				continue;
			why = msg[0] != '\0' ? msg : "invalid";
		}
		snprintf(err, errsz, "%s:%u: %s", path, lineno, why);
		free(text);
		return -1;
	}
	free(text);
	return 0;
}

int ms_parse_bool(const char *s)
{
	if (strcasecmp(s, "yes") == 0 || strcasecmp(s, "true") == 0 ||
	    strcasecmp(s, "on") == 0 || strcmp(s, "1") == 0)
		return 1;
	if (strcasecmp(s, "no") == 0 || strcasecmp(s, "false") == 0 ||
	    strcasecmp(s, "off") == 0 || strcmp(s, "0") == 0)
		return 0;
	return -1;
}

int ms_config_bool(int *dst, const char *key, const char *v, char *err,
		   size_t errsz)
{
	int b = ms_parse_bool(v);

	if (b < 0) {
		snprintf(err, errsz, "%s: yes or no", key);
		return -1;
	}
	*dst = b;
	return 0;
}

int ms_parse_uint(const char *s, unsigned int min, unsigned int max,
		  unsigned int *v_r)
{
	unsigned long long v = 0;

	if (*s == '\0')
		return -1;
	/* Digits only: strtoul would take "-1" (a huge number), " 5",
	 * "+5", "5x" and overflow without a word. */
	for (; *s != '\0'; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (unsigned int)(*s - '0');
		if (v > UINT_MAX)
			return -1;
	}
	if (v < min || v > max)
		return -1;
	*v_r = (unsigned int)v;
	return 0;
}

/* Reads the file's first line into buf; 0, or -1 with err set. */
static int secret_line(int fd, const char *path, char *buf, size_t bufsz,
		       char *err, size_t errsz)
{
	size_t len = 0, line;
	ssize_t n;

	while (len < bufsz - 1 &&
	       (n = read(fd, buf + len, bufsz - 1 - len)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			snprintf(err, errsz, "%s: %s", path, strerror(errno));
			return -1;
		}
		len += (size_t)n;
	}
	buf[len] = '\0';
	for (line = 0; line < len && buf[line] != '\r' && buf[line] != '\n';)
		line++;
	if (line == len && len == bufsz - 1) {
		snprintf(err, errsz, "%s: first line too long (a password "
			 "of at most %zu bytes)", path, bufsz - 2);
		return -1;
	}
	if (memchr(buf, '\0', line) != NULL) {
		snprintf(err, errsz, "%s: NUL byte in the password", path);
		return -1;
	}
	buf[line] = '\0';
	if (line == 0) {
		snprintf(err, errsz, "%s: empty", path);
		return -1;
	}
	return 0;
}

char *ms_read_secret_file_owned(const char *path, uid_t owner, char *err,
				size_t errsz)
{
	char buf[1024];
	struct stat st;
	char *ret = NULL;
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);

	if (fd < 0) {
		snprintf(err, errsz, "%s: %s", path, errno == ELOOP ?
			 "a symbolic link (give the file itself)" :
			 strerror(errno));
		return NULL;
	}
	/* Checked on the open file: the one that is read. */
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		snprintf(err, errsz, "%s: not a regular file", path);
		goto out;
	}
	if (st.st_uid != 0 && st.st_uid != owner) {
		snprintf(err, errsz, "%s: owned by uid %u; a secret file must "
			 "belong to root%s (chown root)", path,
			 (unsigned int)st.st_uid, owner != 0 ?
			 " or to the user that reads it" : "");
		goto out;
	}
	if ((st.st_mode & 077) != 0) {
		snprintf(err, errsz, "%s: readable by others (mode %04o); a "
			 "secret file must be readable by its owner only "
			 "(chmod 600)", path, (unsigned int)(st.st_mode & 07777));
		goto out;
	}
	if (secret_line(fd, path, buf, sizeof(buf), err, errsz) == 0 &&
	    (ret = strdup(buf)) == NULL)
		snprintf(err, errsz, "%s: out of memory", path);
	OPENSSL_cleanse(buf, sizeof(buf));
out:
	close(fd);
	return ret;
}

char *ms_read_secret_file(const char *path, char *err, size_t errsz)
{
	return ms_read_secret_file_owned(path, geteuid(), err, errsz);
}
