#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "config.h"

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

int ms_ini_parse(const char *path, ms_ini_cb *cb, void *ctx, char *err,
		 size_t errsz)
{
	char line[4096], section[128] = "", msg[256];
	unsigned int lineno = 0;
	FILE *f = fopen(path, "r");

	if (f == NULL) {
		snprintf(err, errsz, "%s: %s", path, strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f) != NULL) {
		char *s, *eq;

		lineno++;
		if (strchr(line, '\n') == NULL && !feof(f)) {
			snprintf(err, errsz, "%s:%u: line too long", path, lineno);
			goto fail;
		}
		s = trim(line);
		if (*s == '\0' || *s == '#' || *s == ';')
			continue;
		if (*s == '[') {
			char *close = strchr(s, ']');

			if (close == NULL || close[1] != '\0' ||
			    (size_t)(close - s) >= sizeof(section)) {
				snprintf(err, errsz, "%s:%u: bad section header",
					 path, lineno);
				goto fail;
			}
			*close = '\0';
			snprintf(section, sizeof(section), "%s", trim(s + 1));
			continue;
		}
		eq = strchr(s, '=');
		if (eq == NULL) {
			snprintf(err, errsz, "%s:%u: expected \"key = value\"",
				 path, lineno);
			goto fail;
		}
		*eq = '\0';
		msg[0] = '\0';
		if (cb(ctx, section, trim(s), trim(eq + 1), msg, sizeof(msg)) < 0) {
			snprintf(err, errsz, "%s:%u: %s", path, lineno, msg);
			goto fail;
		}
	}
	fclose(f);
	return 0;
fail:
	fclose(f);
	return -1;
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

char *ms_read_secret_file(const char *path, char *err, size_t errsz)
{
	char buf[1024];
	struct stat st;
	ssize_t n;
	size_t len;
	char *ret;
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0) {
		snprintf(err, errsz, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		snprintf(err, errsz, "%s: not a regular file", path);
		close(fd);
		return NULL;
	}
	if ((st.st_mode & 077) != 0) {
		snprintf(err, errsz, "%s: readable by others (mode %04o); a "
			 "secret file must be readable by its owner only "
			 "(chmod 600)", path, (unsigned int)(st.st_mode & 07777));
		close(fd);
		return NULL;
	}
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0) {
		snprintf(err, errsz, "%s: %s", path, strerror(errno));
		return NULL;
	}
	buf[n] = '\0';
	len = strcspn(buf, "\r\n");
	buf[len] = '\0';
	if (len == 0) {
		snprintf(err, errsz, "%s: empty", path);
		return NULL;
	}
	ret = strdup(buf);
	OPENSSL_cleanse(buf, sizeof(buf));
	return ret;
}
