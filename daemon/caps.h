/* What the gateway advertises before login: CAPABILITY (IMAP), CAPA (POP3)
 * and EHLO (SMTP, submission) list only what both the source and the
 * destination can serve, so that a client never relies on something that
 * goes away when its user is flipped. The gateway asks each server at start
 * and every few minutes (a short connection: greeting, CAPABILITY / CAPA /
 * EHLO, LOGOUT / QUIT); until a server has answered, a built-in list stands
 * in for it (what Dovecot and Postfix offer).
 *
 * After login an IMAP or POP3 session is the server's: its post-login
 * CAPABILITY is the server's own, which is the truth for that session.
 * See docs/gateway-spec.md ("Capabilities"). */
#ifndef MS_CAPS_H
#define MS_CAPS_H

#include <jansson.h>
#include <uv.h>

#include "server.h"

enum ms_caps_kind {
	MS_CAPS_IMAP,
	MS_CAPS_POP3,
	MS_CAPS_SMTP,		/* inbound, port 25 */
	MS_CAPS_SUBMISSION,
	MS_CAPS_N,
};

/* What the gateway advertises, from the two servers' lists (a or b NULL:
 * that server is not configured; both NULL: the built-in list).
 *
 * Lists as the servers give them: IMAP, the capability atoms separated by
 * spaces; POP3, the CAPA lines and SMTP the EHLO keyword lines (without
 * the greeting line), separated by '\n'.
 *
 * Result (malloc'ed): IMAP, the atoms separated by spaces, with SASL-IR
 * (the gateway takes an initial response itself) and without STARTTLS and
 * AUTH= (the caller adds its own); POP3, the CAPA lines each ending in
 * CRLF, with USER and SASL PLAIN and without STLS (the caller's); SMTP and
 * submission, "250-KEYWORD[ ARGS]\r\n" lines without STARTTLS and AUTH (the
 * caller's) and without ENHANCEDSTATUSCODES (the caller ends with it: the
 * gateway's own replies carry enhanced codes). SIZE is the smaller limit.
 * Inbound SMTP keeps only what the gateway relays (SIZE, 8BITMIME,
 * PIPELINING, DSN); a submission session is relayed byte for byte after
 * AUTH, so any keyword both offer is kept there. */
char *ms_caps_merge(enum ms_caps_kind kind, const char *a, const char *b);

struct ms_caps;

/* servers[kind][0] the source's, [1] the destination's; host "" = not
 * configured. The configurations must outlive the object. refresh_s:
 * seconds between asks (0: 300). */
int ms_caps_new(uv_loop_t *loop,
		const struct ms_server_cfg *servers[MS_CAPS_N][2],
		unsigned int refresh_s, struct ms_caps **caps_r);
void ms_caps_free(struct ms_caps **caps);

/* The advertised list (as ms_caps_merge gives it); valid until the next
 * loop turn. */
const char *ms_caps_get(struct ms_caps *caps, enum ms_caps_kind kind);

/* {"imap": {"advertised": "...", "source": "..."|null, "destination":
 * ...}, "pop3": ..., "smtp": ..., "submission": ...}: only the configured
 * protocols and servers; null until the server has answered. */
json_t *ms_caps_json(struct ms_caps *caps);

#endif
