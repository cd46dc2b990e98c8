/* The gateway's configuration, as the config file gives it: listeners,
 * servers, policies, the sweep, limits. Read by dconfig.c and the
 * gateway's files; holds no state of a running gateway. */
#ifndef MS_GW_CONFIG_H
#define MS_GW_CONFIG_H

#include <stddef.h>

#include "doveadm.h"
#include "server.h"
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
	unsigned int flip_quiet;	/* seconds without a session to the
					   source before a verified user flips */
	struct ms_gw_domain {
		char domain[128];
		enum ms_policy policy;
	} domains[MS_GW_MAX_DOMAINS];
	unsigned int ndomains;
	unsigned int connections;
	/* [source] commands_per_second: the mover's cap on the commands it
	 * sends the source, all users together; 0: none */
	unsigned int src_commands_per_second;
	int mover_names;		/* enum ms_mover_names ([mover] names) */
	/* Admin (master) logins per server, for the sweep and for resuming
	 * copies after a restart; NULL = none (the captured login only). */
	const char *src_admin, *src_admin_pw, *dst_admin, *dst_admin_pw;
	/* [destination] doveadm_url: Dovecot's doveadm HTTP API, for the
	 * mover to keep folders' UIDVALIDITY and UIDs; doveadm.key is read
	 * from doveadm_key_file at start (NULL: not used). */
	struct ms_doveadm_cfg doveadm;
	/* The background sweep of users who never log in. */
	int sweep;
	unsigned int sweep_concurrency;	/* users copied at once */
	unsigned int sweep_interval;	/* seconds between looks */
	unsigned int sweep_rate;	/* users started per hour, 0 = any */
	int sweep_from, sweep_to;	/* window, minutes after midnight
					   (local time); -1 = always */
	int survey_rate;		/* users the survey asks the source
					   about per minute; -1: the default
					   (60 with the sweep on, else 0) */
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
	/* [gateway]: this gateway's name among those sharing one store
	 * (the owner of the jobs it takes), and the lease of a job. */
	char gw_name[128];
	unsigned int job_lease;		/* seconds */
	/* Several gateways on one PostgreSQL store (docs/design.md,
	 * "Several gateways"): the store's URL ("" with SQLite: no
	 * cluster), how often this gateway's heartbeat is written, and how
	 * old a heartbeat may be before its gateway is fenced. */
	char store_url[512];
	unsigned int gw_heartbeat_ms, gw_timeout_ms;
};

#define MS_GW_MAX_CONNS 20000
#define MS_GW_MAX_CONNS_PER_IP 100
/* The longest user name a login may give (a clear error above it). */
#define MS_GW_USER_MAX 255

/* A key of the config file's [listen] section that the gateway parses
 * itself (limits, plaintext_auth, trusted_networks). Returns 0, -1 with
 * err filled, or 1 when the key is not one of these. */
int ms_gw_listen_key(struct ms_gw_config *cfg, const char *key,
		     const char *value, char *err, size_t errsz);

const char *ms_policy_name(enum ms_policy p);
int ms_policy_parse(const char *s, enum ms_policy *p);

#endif
