/* The login mechanics every protocol front end of the gateway shares (IMAP,
 * POP3, submission): the login a client gives, captured and wiped; the SASL
 * PLAIN and LOGIN responses decoded with one set of rules; the login
 * replayed to the server as SASL PLAIN; and, once the server has taken it,
 * the relay with backpressure. Nothing here knows a protocol's syntax or
 * replies, nor the gateway: it sits below the front ends.
 *
 * The rules: base64 is strict (util.h); a name or password never holds a
 * NUL byte (it could not be replayed whole: refused, never cut); whatever a
 * refused or finished login held is wiped.
 */
#ifndef MS_GW_LOGIN_H
#define MS_GW_LOGIN_H

#include <stddef.h>

#include "net.h"

/* A captured login: malloc'd strings, NULL when not given yet. */
struct ms_login {
	char *user;			/* the login name (authcid) */
	char *authz;			/* SASL authorization identity, or NULL */
	char *pass;
};

/* Wipes and frees what l holds. */
void ms_login_wipe(struct ms_login *l);

/* The name the login is for: the authorization identity when one is
 * given, else the login name (NULL when neither is). */
const char *ms_login_name(const struct ms_login *l);

/* A SASL PLAIN response, base64 of "authzid NUL authcid NUL password"
 * (RFC 4616), taken into l in place of what it held. 0, or -1 when it is
 * not one (bad base64, not two NULs, a NUL in the password): l unchanged. */
int ms_login_take_plain(struct ms_login *l, const char *b64);

/* One response of the SASL LOGIN exchange (the name, then the password),
 * base64, decoded into a malloc'd string for ms_secret_free(). 0, or
 * MS_LOGIN_BAD_BASE64, or MS_LOGIN_NUL when the decoded bytes hold a NUL
 * (nothing returned). A protocol's own syntax for an empty response (SMTP
 * "=") is the caller's. */
#define MS_LOGIN_BAD_BASE64 (-1)
#define MS_LOGIN_NUL (-2)
int ms_login_decode_step(const char *b64, char **out_r);

/* The login as a SASL PLAIN initial response for the server; the
 * authorization identity is passed on only when it names another user
 * than the login name. For ms_secret_free(); NULL when out of memory. */
char *ms_login_sasl_plain(const struct ms_login *l);
/* Sends "PREFIX" + ms_login_sasl_plain() + CRLF to the server: prefix is
 * the protocol's command ("AUTH PLAIN "), or "" to answer a continuation.
 * -1 when out of memory (nothing sent). */
int ms_login_send_plain(struct ms_conn *server, const char *prefix,
			const struct ms_login *l);

/* ---- the server's replies to the login ---- */

/* Takes data up to and with its first LF (all of it when it has none) into
 * the line being read from the server: *buf, allocated max + 1 bytes when
 * first used, holds *used bytes of it. Returns how many bytes were taken
 * (the line is whole when the last of them is the LF), or -1 when the line
 * would be longer than max (or no memory). */
long ms_line_take(char **buf, size_t *used, size_t max, const char *data,
		  size_t len);

/* ---- the relay, with backpressure ---- */

/* Why a side's reading is paused: bits of the int each side keeps. */
#define MS_PAUSE_WRITE 1	/* the other side's write queue is full */
#define MS_PAUSE_PIPELINE 2	/* too many POP3 commands outstanding */
#define MS_PAUSE_INPUT 4	/* our input buffer is full */
#define MS_PAUSE_OUTPUT 8	/* our answers are not being read */
#define MS_PAUSE_STORE 16	/* the store's reader is asked first */

/* Stops reading conn for one more reason (reading stops at the first). */
void ms_pause_set(struct ms_conn *conn, int *paused, int why);
/* Drops one reason; reading goes on when none is left. A closed side
 * (conn NULL) keeps its bits. */
void ms_pause_clear(struct ms_conn *conn, int *paused, int why);
/* Stops reading `from` while `to` has too much to send (its on_drain
 * clears MS_PAUSE_WRITE). */
void ms_relay_pressure(struct ms_conn *to, struct ms_conn *from,
		       int *paused);
/* Passes bytes read from `from` on to `to`, then ms_relay_pressure().
 * -1 when the write failed: the caller ends the session. */
int ms_relay(struct ms_conn *to, struct ms_conn *from, int *paused,
	     const char *data, size_t len);

#endif
