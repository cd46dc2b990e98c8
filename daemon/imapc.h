/* IMAP client connection: a tagged-command client with per-command reply
 * callbacks (in the manner of Dovecot's lib-imapc), on top of ms_conn and
 * the incremental response parser.
 *
 * Commands are pipelined: ms_imapc_cmd() queues and sends at once, replies
 * come back through each command's callback in order. Untagged responses go
 * to one handler per connection. Streamed literals (FETCH BODY[]) go to the
 * literal hooks without being buffered.
 */
#ifndef MS_IMAPC_H
#define MS_IMAPC_H

#include <stdarg.h>
#include <stdint.h>
#include "imap_parser.h"
#include "net.h"
#include "pacer.h"

struct ms_imapc;

enum ms_auth_mech {
	MS_AUTH_AUTO,		/* AUTHENTICATE PLAIN when offered, else LOGIN */
	MS_AUTH_PLAIN,
	MS_AUTH_LOGIN,
};

struct ms_imapc_settings {
	const char *host;
	uint16_t port;
	struct ms_tls_opts tls;
	const char *user;	/* login name (authzid when admin is set) */
	const char *admin;	/* NULL, or authcid for an admin login */
	const char *password;	/* user's, or admin's when admin is set */
	enum ms_auth_mech mech;
	unsigned int timeout_secs; /* no reply for this long: error; 0 = 300 */
	/* The pace of the commands sent (pacer.h), shared with the other
	 * connections to the server; NULL: none. A command it holds back is
	 * sent later, in order; one the server refuses as busy is sent again
	 * after a back-off when nothing else was in flight. */
	struct ms_pacer *pacer;
};

/* Called once when the connection is logged in (error == NULL) or failed
 * (error says why: "connect: ...", "login failed: [AUTHENTICATIONFAILED]
 * ...", "STARTTLS: ..."). On failure the caller must ms_imapc_free(). */
typedef void ms_imapc_ready_cb(struct ms_imapc *c, const char *error,
			       void *ctx);
/* A tagged reply, or resp == NULL when the connection failed before it came
 * (ms_imapc_error() then says why). */
typedef void ms_imapc_cmd_cb(struct ms_imapc *c,
			     const struct ms_imap_response *resp, void *ctx);
typedef void ms_imapc_untagged_cb(struct ms_imapc *c,
				  const struct ms_imap_response *resp,
				  void *ctx);

/* Starts connecting. The settings are copied; the password copy is wiped
 * as soon as the login is done. Returns NULL only on allocation failure. */
struct ms_imapc *ms_imapc_new(uv_loop_t *loop,
			      const struct ms_imapc_settings *set,
			      ms_imapc_ready_cb *ready, void *ctx);
void ms_imapc_free(struct ms_imapc **c);

void ms_imapc_set_untagged(struct ms_imapc *c, ms_imapc_untagged_cb *cb,
			   void *ctx);
/* Asked before each read from the server is taken; 0: nothing of it is
 * (the owner has stopped and frees the connection). */
void ms_imapc_set_gate(struct ms_imapc *c, ms_read_gate_cb *gate, void *ctx);
/* Literal hooks for streamed literals, see imap_parser.h. */
void ms_imapc_set_literal_hooks(struct ms_imapc *c,
				const struct ms_imap_parser_callbacks *cb);
/* Called when the write queue drains below the low-water mark. */
void ms_imapc_set_drain(struct ms_imapc *c, void (*cb)(struct ms_imapc *c,
						       void *ctx), void *ctx);

/* Called when the logged-in connection fails, after the callbacks of the
 * commands it had pending (so also when none was pending). */
void ms_imapc_set_lost(struct ms_imapc *c,
		       void (*cb)(struct ms_imapc *c, void *ctx), void *ctx);

int ms_imapc_has_cap(const struct ms_imapc *c, const char *cap);
char ms_imapc_separator(const struct ms_imapc *c);
const char *ms_imapc_error(const struct ms_imapc *c);
int ms_imapc_failed(const struct ms_imapc *c);
/* 1 when the login failed because the server was busy (a temporary
 * refusal: [UNAVAILABLE], [LIMIT], [INUSE], throttling text): worth trying
 * again later. */
int ms_imapc_busy_refused(const struct ms_imapc *c);

/* Sends "TAG <printf-formatted command>\r\n". Returns 0 or -1 (failed
 * connection: the callback is not called). */
int ms_imapc_cmd(struct ms_imapc *c, ms_imapc_cmd_cb *cb, void *ctx,
		 const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Appends an IMAP quoted string for s to buf (size bufsz, NUL-terminated).
 * Returns 0, or -1 when s cannot be quoted (CR, LF, NUL, 8-bit) or buf is
 * too small. */
int ms_imap_quote(char *buf, size_t bufsz, const char *s);

/* Streaming APPEND / MULTIAPPEND. begin writes "TAG APPEND mailbox"; each
 * msg writes " (flags) \"date\" {size+}\r\n" (or a synchronising literal
 * when the server has no LITERAL+, whose data is then held until the
 * server's continuation); data writes literal bytes; end writes "\r\n"
 * and the command's callback follows. Only one APPEND may be open at a
 * time on a connection, and no other command may be sent while it is. */
int ms_imapc_append_begin(struct ms_imapc *c, ms_imapc_cmd_cb *cb, void *ctx,
			  const char *mailbox);
int ms_imapc_append_msg(struct ms_imapc *c, const char *flags,
			const char *date, uint64_t size);
int ms_imapc_append_data(struct ms_imapc *c, const void *data, size_t len);
int ms_imapc_append_end(struct ms_imapc *c);
/* Bytes written but not yet sent (held or in the socket queue). */
size_t ms_imapc_write_pending(const struct ms_imapc *c);
void ms_imapc_read_pause(struct ms_imapc *c, int paused);

/* Response helpers. */
/* The tagged reply as "NO [CODE] text" for error messages. */
const char *ms_imapc_resp_summary(const struct ms_imap_response *resp,
				  char *buf, size_t bufsz);

#endif
