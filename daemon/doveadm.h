/* Dovecot's doveadm HTTP API, as the mover uses it to give a destination
 * folder the source's UIDVALIDITY and UIDs (docs/mover.md, "Identity"):
 * one `mailboxUpdate` per request, an HTTP/1.1 POST over net.c (plaintext
 * or TLS), asynchronous on the caller's loop. The API key goes into the
 * Authorization header only: never into an error text or a log line. */
#ifndef MS_DOVEADM_H
#define MS_DOVEADM_H

#include <stdint.h>
#include <uv.h>

#include "net.h"

struct ms_doveadm_cfg {
	char host[256];
	uint16_t port;
	char path[256];			/* "/doveadm/v1" */
	struct ms_tls_opts tls;		/* MS_TLS_NONE (http://) or
					   MS_TLS_IMPLICIT (https://) */
	const char *key;		/* doveadm_api_key; the caller's */
};

/* Parses "http://host[:port]/path" or "https://..." (port 8080 / 443 by
 * default, path "/doveadm/v1" when none). 0, or -1 and *why. */
int ms_doveadm_parse_url(struct ms_doveadm_cfg *cfg, const char *url,
			 const char **why);

/* What a mailboxUpdate changes; 0 = leave it. */
struct ms_doveadm_update {
	uint32_t uid_validity;
	uint32_t min_next_uid;
	uint64_t min_highest_modseq;
};

/* ok 1: the server did it; ok 0: error says why ("doveadm API: HTTP 401
 * (wrong API key?)", "doveadm mailboxUpdate: exit code 68"). */
typedef void ms_doveadm_cb(void *ctx, int ok, const char *error);

struct ms_doveadm_req;

enum {
	MS_DOVEADM_MORE = -1,	/* not all of it yet */
	MS_DOVEADM_OK = 0,	/* the server did it */
	MS_DOVEADM_FAILED = 1,	/* err says why */
};

/* Reads the HTTP reply to a mailboxUpdate, the len bytes at reply (with a
 * NUL after them), as far as it has come; at_close: nothing more comes.
 * The reply ends at its Content-Length, or at the close without one.
 * Returns MS_DOVEADM_MORE, _OK or _FAILED (err, of errsz bytes, says
 * why). */
int ms_doveadm_reply(const char *reply, size_t len, int at_close, char *err,
		     size_t errsz);

/* Sends one mailboxUpdate for user's mailbox (UTF-8, the server's
 * separator). cb is called once, never from inside this call, unless the
 * request is cancelled first. 0 and *req_r, or -1 (no memory, bad host):
 * no callback. */
int ms_doveadm_mailbox_update(uv_loop_t *loop, const struct ms_doveadm_cfg *cfg,
			      const char *user, const char *mailbox,
			      const struct ms_doveadm_update *up,
			      ms_doveadm_cb *cb, void *ctx,
			      struct ms_doveadm_req **req_r);
/* Drops a request: its callback is not called. Sets *req to NULL; accepts
 * NULL and *req == NULL. */
void ms_doveadm_cancel(struct ms_doveadm_req **req);

#endif
