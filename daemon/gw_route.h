/* The narrow interface between the gateway and its protocol front ends
 * (IMAP and POP3 in gw_imap.c, gw_pop3.c; inbound SMTP and submission in
 * smtp.c).
 *
 * Downwards, what a front end may ask of the gateway: where a user's
 * sessions and mail go now, whether a connection and a plaintext login are
 * let in, the TLS context, the capabilities to advertise, the config. A
 * front end includes this header and gw_login.h, never gateway.h nor
 * gw_internal.h: it calls nothing of the listeners or the control socket.
 *
 * Upwards, what a front end is to the gateway: a struct ms_gw_frontend,
 * which the gateway's table of front ends (gateway.c) names; the gateway
 * reaches the front end through it only (accept, list, kick, close all).
 */
#ifndef MS_GW_ROUTE_H
#define MS_GW_ROUTE_H

#include <stdint.h>
#include <time.h>

#include <jansson.h>
#include <uv.h>

#include "caps.h"
#include "gw_config.h"
#include "net.h"

struct ms_gateway;

/* ---- what a front end asks ---- */

enum ms_route {
	MS_ROUTE_SOURCE,
	MS_ROUTE_DESTINATION,
	MS_ROUTE_DEFER,		/* in cutover: answer 451, the sender retries */
};

/* Where mail for / sessions of this user go now (unknown users: source).
 * (The IMAP and POP3 logins, which can be held, are routed by the session
 * code, gw_session.c.) */
enum ms_route ms_gw_route(struct ms_gateway *gw, const char *user);

const struct ms_gw_config *ms_gw_config(struct ms_gateway *gw);
uv_loop_t *ms_gw_loop(struct ms_gateway *gw);
/* NULL when the gateway has no certificate. */
struct ms_tls_server *ms_gw_tls(struct ms_gateway *gw);
/* What to advertise before login (see caps.h). */
const char *ms_gw_caps(struct ms_gateway *gw, enum ms_caps_kind kind);

/* A new client connection from addr: 0 when it may stay (counted until
 * ms_gw_unadmit), or -1 with the reason for the client ("Too many
 * connections from your address."). */
int ms_gw_admit(struct ms_gateway *gw, const char *addr, const char **why_r);
void ms_gw_unadmit(struct ms_gateway *gw, const char *addr);
/* Whether a client at addr may log in with a plaintext password over a
 * connection that is not TLS ([listen] plaintext_auth, trusted_networks). */
int ms_gw_plaintext_ok(struct ms_gateway *gw, const char *addr);

/* The names a login gives (the login name and the user it is for),
 * checked before anything is done with them, for every protocol: 0, or
 * MS_GW_NAME_TOO_LONG (over MS_GW_USER_MAX bytes: never cut) or
 * MS_GW_NAME_INVALID (not UTF-8, control bytes), logged (escaped) as
 * "SESSION: refused ...". */
#define MS_GW_NAME_TOO_LONG (-1)
#define MS_GW_NAME_INVALID (-2)
int ms_gw_login_names_check(const char *session, const char *user,
			    const char *name);

/* One row of the sessions list (docs/gateway-spec.md, "sessions"). */
struct ms_gw_session_row {
	uint64_t id;
	const char *user;		/* NULL: not logged in */
	const char *proto;		/* "imap", "pop3", "smtp", "submission" */
	const char *client;		/* the client's address */
	const char *local;		/* the address it connected to */
	unsigned int local_port;
	const char *server;		/* "source", "destination" or "-" */
	const char *state;
	int tls;
	time_t since;
};
json_t *ms_gw_session_json(const struct ms_gw_session_row *row);
/* "ADDR:PORT" ("[V6]:PORT") as a JSON string. */
json_t *ms_json_addr(const char *addr, unsigned int port);

/* ---- what a front end is ---- */

struct ms_gw_frontend {
	const char *name;
	/* The listeners it takes: bits 1 << enum ms_gw_proto. */
	unsigned int protos;
	/* Takes one pending connection of a listener of its protocols;
	 * arg is the front end's own, below. */
	void (*accept)(struct ms_gateway *gw, uv_stream_t *listener,
		       const struct ms_gw_listen *cfg, const void *arg);
	const void *arg;
	/* Appends its sessions' rows (ms_gw_session_json) to array. */
	void (*sessions)(struct ms_gateway *gw, json_t *array);
	/* Ends the user's sessions; returns how many. */
	int (*kick)(struct ms_gateway *gw, const char *user);
	/* Ends every session (shutdown). */
	void (*close_all)(struct ms_gateway *gw);
	/* Any of these may be NULL: nothing to do. */
};

/* The front ends (each defined in its own file). IMAP and POP3 only
 * accept: their sessions are one list, gw_session.c's, which the gateway
 * lists, kicks and closes as ms_gw_mailbox_sessions. */
extern const struct ms_gw_frontend ms_gw_imap_frontend;
extern const struct ms_gw_frontend ms_gw_pop3_frontend;
extern const struct ms_gw_frontend ms_gw_mailbox_sessions;
extern const struct ms_gw_frontend ms_gw_smtp_frontend;

#endif
