/* POP3 client connection (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034
 * AUTH PLAIN) for a POP3 source: commands are pipelined and answered in
 * order; multi-line replies are dot-unstuffed and handed over line by line. */
#ifndef MS_POP3C_H
#define MS_POP3C_H

#include <stddef.h>
#include "imapc.h"

struct ms_pop3c;

typedef void ms_pop3c_ready_cb(struct ms_pop3c *c, const char *error, void *ctx);
/* ok: +OK / -ERR; text: the rest of the status line. For a failed
 * connection ok = -1 and text is the error. */
typedef void ms_pop3c_reply_cb(struct ms_pop3c *c, int ok, const char *text,
			       void *ctx);
/* One line of a multi-line reply, unstuffed, with its CRLF. */
typedef void ms_pop3c_line_cb(struct ms_pop3c *c, const char *line,
			      size_t len, void *ctx);

struct ms_pop3c *ms_pop3c_new(uv_loop_t *loop,
			      const struct ms_imapc_settings *set,
			      ms_pop3c_ready_cb *ready, void *ctx);
void ms_pop3c_free(struct ms_pop3c **c);
const char *ms_pop3c_error(const struct ms_pop3c *c);
/* As ms_imapc_set_gate(). */
void ms_pop3c_set_gate(struct ms_pop3c *c, ms_read_gate_cb *gate, void *ctx);

/* Sends a command. multiline: the +OK reply is followed by lines until
 * ".", each given to line_cb; reply_cb comes after the last line (or at
 * once for -ERR). */
int ms_pop3c_cmd(struct ms_pop3c *c, int multiline, ms_pop3c_reply_cb *reply,
		 ms_pop3c_line_cb *line, void *ctx, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

#endif
