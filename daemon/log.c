/* The daemon's and the CLI's log: one line per event on stderr.
 *
 * What goes into a line comes partly from outside (user names, servers'
 * replies, addresses), so the whole formatted message is escaped: a CR, an
 * LF or any other control byte becomes \r, \n or \xNN, and a backslash
 * becomes \\. Nothing a client or a server sends can start a line of its
 * own or hide in the terminal. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "log.h"

enum ms_log_level ms_log_level = MS_LOG_WARN;

/* A message longer than this is cut, with "..." at the end. */
#define LOG_LINE_MAX 8192

size_t ms_log_escape(char *out, size_t outsz, const char *in, size_t inlen)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;

	if (outsz == 0)
		return 0;
	for (size_t i = 0; i < inlen; i++) {
		unsigned char c = (unsigned char)in[i];
		char esc[5];
		size_t n = 0;

		if (c == '\\') {
			esc[n++] = '\\';
			esc[n++] = '\\';
		} else if (c == '\r' || c == '\n' || c == '\t') {
			esc[n++] = '\\';
			esc[n++] = c == '\r' ? 'r' : c == '\n' ? 'n' : 't';
		} else if (c < 0x20 || c == 0x7f) {
			esc[n++] = '\\';
			esc[n++] = 'x';
			esc[n++] = hex[c >> 4];
			esc[n++] = hex[c & 15];
		} else {
			esc[n++] = (char)c;
		}
		if (o + n >= outsz)
			break;
		for (size_t k = 0; k < n; k++)
			out[o++] = esc[k];
	}
	out[o] = '\0';
	return o;
}

void ms_log(enum ms_log_level level, const char *fmt, ...)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	char msg[LOG_LINE_MAX], *line;
	char when[32];
	struct tm tm;
	time_t now;
	va_list ap;
	size_t len;
	int n;

	if (level > ms_log_level)
		return;
	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	len = (size_t)n < sizeof(msg) ? (size_t)n : sizeof(msg) - 1;
	/* Escaped, a byte takes at most four. */
	line = malloc(len * 4 + 8);
	now = time(NULL);
	gmtime_r(&now, &tm);
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	if (line == NULL) {
		fprintf(stderr, "%s mailshift %s: (out of memory)\n", when,
			names[level]);
		return;
	}
	ms_log_escape(line, len * 4 + 8, msg, len);
	fprintf(stderr, "%s mailshift %s: %s%s\n", when, names[level], line,
		(size_t)n > len ? "..." : "");
	free(line);
}
