/* Logging to stderr, one escaped line per call (log.c). Never pass a
 * password or SASL blob to these. */
#ifndef MS_LOG_H
#define MS_LOG_H

#include <stddef.h>

enum ms_log_level { MS_LOG_ERROR, MS_LOG_WARN, MS_LOG_INFO, MS_LOG_DEBUG };

extern enum ms_log_level ms_log_level;

void ms_log(enum ms_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Copies inlen bytes of in to out (outsz bytes, NUL-terminated, cut at a
 * whole escape) with \\, \r, \n, \t and \xNN for control bytes.
 * Returns the length written. */
size_t ms_log_escape(char *out, size_t outsz, const char *in, size_t inlen);

#define ms_warn(...) ms_log(MS_LOG_WARN, __VA_ARGS__)
#define ms_info(...) ms_log(MS_LOG_INFO, __VA_ARGS__)
#define ms_debug(...) ms_log(MS_LOG_DEBUG, __VA_ARGS__)

#endif
