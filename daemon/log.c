#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "log.h"

enum ms_log_level ms_log_level = MS_LOG_WARN;

void ms_log(enum ms_log_level level, const char *fmt, ...)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	char when[32];
	struct tm tm;
	time_t now;
	va_list ap;

	if (level > ms_log_level)
		return;
	now = time(NULL);
	gmtime_r(&now, &tm);
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	fprintf(stderr, "%s mailshift %s: ", when, names[level]);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}
