#ifndef MS_SUBCOMMANDS_H
#define MS_SUBCOMMANDS_H

#include <stddef.h>

#include <jansson.h>

extern const char *prog;

int migrate_main(int argc, char *argv[]);
int status_main(int argc, char *argv[]);
int user_main(int argc, char *argv[]);
int sessions_main(int argc, char *argv[]);
int kick_main(int argc, char *argv[]);
int policy_main(int argc, char *argv[]);
int migrate_daemon_main(int argc, char *argv[]);
int rollback_main(int argc, char *argv[]);
int steer_main(int argc, char *argv[]);
int takeover_main(int argc, char *argv[]);
int giveback_main(int argc, char *argv[]);
int retire_main(int argc, char *argv[]);
int store_main(int argc, char *argv[]);

/* From cli.c: a subcommand's failure reported (on stderr as "PROG CMD:
 * ERR"; with json, {"ok": false, "error": ERR} on stdout too); returns
 * rc, the exit status. */
int cli_fail(int json, const char *cmd, const char *err, int rc);
/* Whether this process may read and change the kernel's networking
 * (CAP_NET_ADMIN, effective). */
int cli_have_net_admin(void);

/* For retire (from migrate.c, control.c, steer.c). */
struct ms_user_report;
struct ms_dconfig;
/* A mover's report as migrate --json prints it. */
json_t *migrate_report_json(const struct ms_user_report *rep);
/* One request to mailshiftd's control socket: the reply, or NULL after
 * saying why on stderr. */
json_t *ctl_request(const char *socket, json_t *req);
/* Every mail-port decision of the steering table (the installed one, or
 * [steer]'s when none is) becomes "destination", in one transaction (the
 * caller holds ms_steer_lock); *n_r: the entries. 0, or -1 with err and
 * the kernel as it was. */
int steer_all_to_destination(struct ms_dconfig *c, unsigned int *n_r,
			     char *err, size_t errsz);

/* mailshiftctl steer hold (steer_hold.c): 0, 1 or 2 with err. */
struct ms_steer_cfg;
int steer_hold(const struct ms_steer_cfg *s, int argc, char *argv[],
	       char *err, size_t errsz);
/* Removes the rules a hold left (killed before it could), and a raw
 * table they leave empty (steer_hold.c). */
void steer_hold_clean(void);

#endif
