/* The gateway: IMAP and POP3 listeners that read each user's login, look the
 * user up in the map, replay the login at the server that holds the user's
 * mail and relay the session; and each user's life (copy on first login,
 * flip when verified). See docs/gateway-spec.md. */
#ifndef MS_GATEWAY_H
#define MS_GATEWAY_H

#include <jansson.h>
#include <uv.h>

#include "caps.h"
#include "mover.h"
#include "store.h"
#include "util.h"

enum ms_gw_proto {
	MS_GW_IMAP,
	MS_GW_POP3,
	MS_GW_SMTP,		/* inbound SMTP (25): routed per recipient */
	MS_GW_SUBMISSION,	/* submission (587, 465): routed by AUTH */
};
enum ms_policy { MS_POLICY_PASSTHROUGH, MS_POLICY_HOLD, MS_POLICY_OFF };

#define MS_GW_MAX_LISTEN 16
#define MS_GW_MAX_DOMAINS 64
#define MS_GW_MAX_TRUSTED 32

struct ms_gw_listen {
	char addr[128];			/* "127.0.0.1:143", "[::1]:993" */
	enum ms_gw_proto proto;
	int implicit_tls;
};

struct ms_gw_config {
	struct ms_gw_listen listen[MS_GW_MAX_LISTEN];
	unsigned int nlisten;
	int transparent;		/* IP_TRANSPARENT listeners (TPROXY): the
					   original destination is the local
					   address of each accepted socket */
	char cert[512], key[512];	/* "" = no TLS for clients */
	/* Backends; proto tells IMAP or POP3, host "" = not configured. */
	struct ms_server_cfg src_imap, src_pop3, dst_imap, dst_pop3;
	struct ms_server_cfg src_smtp, dst_smtp;	/* MTAs, inbound */
	struct ms_server_cfg src_submission, dst_submission;
	enum ms_policy policy;
	unsigned int hold_max_seconds;
	struct {
		char domain[128];
		enum ms_policy policy;
	} domains[MS_GW_MAX_DOMAINS];
	unsigned int ndomains;
	unsigned int connections;
	/* Admin (master) logins per server, for the sweep and for resuming
	 * copies after a restart; NULL = none (the captured login only). */
	const char *src_admin, *src_admin_pw, *dst_admin, *dst_admin_pw;
	/* The background sweep of users who never log in. */
	int sweep;
	unsigned int sweep_concurrency;	/* users copied at once */
	unsigned int sweep_interval;	/* seconds between looks */
	unsigned int sweep_rate;	/* users started per hour, 0 = any */
	int sweep_from, sweep_to;	/* window, minutes after midnight
					   (local time); -1 = always */
	char metrics[128];		/* "ADDR:PORT" or "" */
	unsigned int caps_refresh;	/* seconds between asking the servers
					   for their capabilities; 0 = 300 */
	/* Each POP3 server's UIDLs (pop3_uidl.h), "" = Dovecot's default:
	 * a POP3 session of a user on the destination shows the source's
	 * UIDLs for the messages the mover copied. */
	char src_uidl_format[64], dst_uidl_format[64];
	/* Before login ([listen]): connections at once, all together and
	 * from one client address (0 = the defaults below); plaintext
	 * logins from anywhere, or only from the trusted networks (and
	 * over TLS). */
	unsigned int max_conns, max_conns_per_ip;
	int plaintext_auth;
	struct ms_cidr trusted[MS_GW_MAX_TRUSTED];
	unsigned int ntrusted;
	int trusted_set;		/* 0: the default, loopback */
};

#define MS_GW_MAX_CONNS 20000
#define MS_GW_MAX_CONNS_PER_IP 100
/* The longest user name a login may give (a clear error above it). */
#define MS_GW_USER_MAX 255

/* The names a login gives (the login name and the user it is for),
 * checked before anything is done with them, for every protocol: 0, or
 * MS_GW_NAME_TOO_LONG (over MS_GW_USER_MAX bytes: never cut) or
 * MS_GW_NAME_INVALID (not UTF-8, control bytes), logged (escaped) as
 * "SESSION: refused ...". */
#define MS_GW_NAME_TOO_LONG (-1)
#define MS_GW_NAME_INVALID (-2)
int ms_gw_login_names_check(const char *session, const char *user,
			    const char *name);

/* A key of the config file's [listen] section that the gateway parses
 * itself (limits, plaintext_auth, trusted_networks). Returns 0, -1 with
 * err filled, or 1 when the key is not one of these. */
int ms_gw_listen_key(struct ms_gw_config *cfg, const char *key,
		     const char *value, char *err, size_t errsz);

struct ms_gateway;

int ms_gateway_new(uv_loop_t *loop, const struct ms_gw_config *cfg,
		   struct ms_store *store, struct ms_gateway **gw_r,
		   char *err, size_t errsz);
/* Closes the listeners and every session. */
void ms_gateway_free(struct ms_gateway **gw);

/* For the control socket. */
json_t *ms_gateway_sessions(struct ms_gateway *gw);
/* {"default": P, "domains": {D: P}, "hold_max_seconds": N, "set": {S: P}}
 * ("set": what was set at run time; scope "" = the default). */
json_t *ms_gateway_policies(struct ms_gateway *gw);
/* Sets the default policy (domain NULL) or a domain's, kept in the store
 * and applied to logins from now on; policy NULL: back to the config
 * file's. Returns 0, or -1 with err filled. */
int ms_gateway_set_policy(struct ms_gateway *gw, const char *domain,
			  const char *policy, char *err, size_t errsz);
unsigned int ms_gateway_nsessions(struct ms_gateway *gw);
/* What the gateway is doing for the user now: "copying", "last delta",
 * "verified, flips at log-off", or "". */
const char *ms_gateway_user_copy(struct ms_gateway *gw, const char *user);
/* Sends a user on the destination back to the source (docs/mover.md,
 * "Rollback"): logins held, sessions ended, mail deferred, the reverse
 * delta, verified, state source. Needs admin logins. A failed rollback
 * leaves the user on the destination with the error. */
int ms_gateway_rollback(struct ms_gateway *gw, const char *user,
			const char **error_r);
unsigned int ms_gateway_user_sessions(struct ms_gateway *gw, const char *user);
int ms_gateway_kick(struct ms_gateway *gw, const char *user);
/* Moves the user now: copy, verify, end the user's sessions (BYE), last
 * delta, flip. Needs admin logins (or a login of the user since start). */
int ms_gateway_migrate(struct ms_gateway *gw, const char *user,
		       const char **error_r);
void ms_gateway_progress(struct ms_gateway *gw, struct ms_progress *p);

/* ---- for the SMTP side (smtp.c) ---- */

enum ms_route {
	MS_ROUTE_SOURCE,
	MS_ROUTE_DESTINATION,
	MS_ROUTE_DEFER,		/* in cutover: answer 451, the sender retries */
};

/* Where mail for / sessions of this user go now (unknown users: source). */
enum ms_route ms_gateway_route(struct ms_gateway *gw, const char *user);
const struct ms_gw_config *ms_gateway_config(struct ms_gateway *gw);
struct ms_tls_server *ms_gateway_tls(struct ms_gateway *gw);
uv_loop_t *ms_gateway_loop(struct ms_gateway *gw);
/* What to advertise before login (see caps.h). */
const char *ms_gateway_caps(struct ms_gateway *gw, enum ms_caps_kind kind);
json_t *ms_gateway_caps_json(struct ms_gateway *gw);
/* A new client connection from addr: 0 when it may stay (counted until
 * ms_gateway_unadmit), or -1 with the reason for the client ("Too many
 * connections from your address."). */
int ms_gateway_admit(struct ms_gateway *gw, const char *addr,
		     const char **why_r);
void ms_gateway_unadmit(struct ms_gateway *gw, const char *addr);
/* Whether a client at addr may log in with a plaintext password over a
 * connection that is not TLS ([listen] plaintext_auth, trusted_networks). */
int ms_gateway_plaintext_ok(struct ms_gateway *gw, const char *addr);

/* Implemented in smtp.c: takes one pending connection of an SMTP or
 * submission listener. */
void ms_smtp_accept(struct ms_gateway *gw, uv_stream_t *listener,
		    const struct ms_gw_listen *cfg);
/* Implemented in smtp.c: the SMTP sessions, for ms_gateway_sessions(). */
void ms_smtp_sessions(struct ms_gateway *gw, json_t *array);
void ms_smtp_close_all(struct ms_gateway *gw);
/* Implemented in smtp.c: ends the user's submission sessions (mailshiftctl
 * kick). Returns how many. They do not touch the mailbox, so a cutover
 * neither waits for them nor ends them. */
int ms_smtp_kick(struct ms_gateway *gw, const char *user);

/* "ADDR:PORT" ("[V6]:PORT") as a JSON string, for the sessions list. */
json_t *ms_json_addr(const char *addr, unsigned int port);

const char *ms_policy_name(enum ms_policy p);
int ms_policy_parse(const char *s, enum ms_policy *p);

#endif
