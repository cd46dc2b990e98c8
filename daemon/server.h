/* A mail server as mailshift reaches it: the URL (protocol, host, port, TLS
 * mode), the TLS checks, the login names, and the connection. Used by the
 * mover, the gateway's front ends and the capability probe alike; it knows
 * nothing of any of them. */
#ifndef MS_SERVER_H
#define MS_SERVER_H

#include <stdint.h>
#include <uv.h>

#include "imapc.h"
#include "net.h"

enum ms_proto { MS_PROTO_IMAP, MS_PROTO_POP3, MS_PROTO_SMTP };

struct ms_server_cfg {
	enum ms_proto proto;
	char host[256];
	uint16_t port;
	enum ms_tls_mode tls_mode;
	const char *ca_file;
	int insecure;
	const char *server_name;	/* the certificate's name; NULL = host */
	const char *user_tmpl;	/* login name, "%u" = the user; NULL = "%u" */
	const char *admin;	/* admin (authcid) login, or NULL */
	const char *password;	/* the user's or the admin's; not copied
				   beyond the mover's own wiped copies */
	enum ms_auth_mech mech;
	unsigned int max_conns;	/* per server, all users together */
	int transparent;	/* a client's sessions connect from the
				   client's address (ms_server_connect_for) */
};

/* Parses "imap://host:port", "imaps://", "imap+starttls://", "pop3://",
 * "pop3s://", "pop3+starttls://", "smtp://" (port 25), "smtp+starttls://",
 * "smtps://" (465) (port optional; [v6] hosts accepted). */
int ms_server_parse_url(struct ms_server_cfg *cfg, const char *url,
			const char **error_r);
/* The TLS options a server's configuration asks for (mode, CA file,
 * insecure). */
struct ms_tls_opts ms_server_tls(const struct ms_server_cfg *srv);
/* ms_conn_connect() to the server with those options. */
int ms_server_connect(uv_loop_t *loop, const struct ms_server_cfg *srv,
		      const struct ms_conn_callbacks *cb,
		      struct ms_conn **conn_r);
/* ms_server_connect() for a client's session, from client's own address
 * (port 0; never client_port) when the server is `transparent`. That needs
 * a client elsewhere: a client address of this host (loopback, a local
 * client) or a server address of this host would have the server's
 * replies go to the client's host, not to the socket, so those connect
 * from this host's address as ever (said once at -v). */
int ms_server_connect_for(uv_loop_t *loop, const struct ms_server_cfg *srv,
			  const char *client, uint16_t client_port,
			  const struct ms_conn_callbacks *cb,
			  struct ms_conn **conn_r);
/* The name to log in as: the template with "%u" replaced by the user
 * (malloc'ed; NULL when out of memory). */
char *ms_server_login_name(const struct ms_server_cfg *srv, const char *user);

#endif
