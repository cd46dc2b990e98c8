/* The mover: copies users' folders from the source server to the
 * destination, exactly once, incrementally, resumably, verified.
 * See ../docs/mover.md for the algorithm and the exactly-once argument. */
#ifndef MS_MOVER_H
#define MS_MOVER_H

#include <stdint.h>
#include <uv.h>

#include "imapc.h"
#include "net.h"
#include "store.h"

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

struct ms_mover_opts {
	const char *const *include;	/* NULL-terminated fnmatch patterns */
	const char *const *exclude;
	unsigned int batch;		/* messages per APPEND batch; 0 = 100 */
	int caller_flips;		/* a verified job leaves the user's state
					   as it is: the caller's own write is
					   the flip (the gateway) */
};

struct ms_folder_report {
	char source[1024];		/* UTF-8, source separator */
	char destination[1024];		/* UTF-8, destination separator */
	uint64_t copied, flags_updated, expunged;
	uint64_t source_messages, dest_messages;
	uint64_t source_bytes, dest_bytes;
	int verified;
	/* rollback only */
	int created;			/* the folder was created on the source */
	int dst_deleted;		/* gone from the destination: left on the
					   source as it is (not verified) */
	uint64_t source_only;		/* messages on the source that no record
					   claims (arrived there after the copy):
					   kept, not compared */
};

struct ms_user_report {
	const char *user;
	int rollback;			/* from ms_mover_add_rollback() */
	int ok;				/* copied and verified */
	int mismatch;			/* verification found a difference */
	const char *error;		/* NULL when ok */
	uint64_t copied, bytes, flags_updated, expunged;
	double seconds;
	struct ms_folder_report *folders;
	unsigned int nfolders;
};

struct ms_progress {
	unsigned int users, users_done;
	unsigned int folders, folders_done;
	uint64_t msgs_todo, msgs_done;	/* messages to copy in this run */
	uint64_t bytes_done;
	double seconds;
};

typedef void ms_mover_done_cb(const struct ms_user_report *report, void *ctx);

struct ms_mover;

struct ms_mover *ms_mover_new(uv_loop_t *loop, struct ms_store *store,
			      const struct ms_server_cfg *src,
			      const struct ms_server_cfg *dst,
			      const struct ms_mover_opts *opts);
/* Starts copying one user. src_password/dst_password override the servers'
 * configured passwords (the gateway passes the user's captured login);
 * NULL = the configured one. The mover keeps wiped-on-free copies only. */
int ms_mover_add_user(struct ms_mover *m, const char *user,
		      const char *src_password, const char *dst_password,
		      ms_mover_done_cb *done, void *ctx);
/* Rolls one user back (docs/mover.md, "Rollback"): copies to the source what
 * changed on the destination since the user's forward copy (messages that
 * arrived or were appended there, folders created there, flag changes,
 * expunges of copied messages), exactly once like the forward copy (an
 * intent is committed before the bytes leave; a killed run resumed later
 * duplicates nothing), then verifies per folder that the source holds what
 * the destination holds. Afterwards a forward copy of the user copies none
 * of the rolled-back messages again: they are recorded done under the
 * source UIDs they got, with their destination UIDs. Folders deleted on the
 * destination are left on the source and reported (dst_deleted).
 *
 * Passwords as for ms_mover_add_user(). done() gets the report
 * (report->rollback set; copied = messages appended to the source); a user
 * the store has no copy of gets a report with an error and nothing is
 * touched. Needs an IMAP source with UIDPLUS. The user's state in the store
 * becomes "source" when the rollback is verified (unless caller_flips: then
 * the caller writes it); on failure it stays what it was (the destination still holds all the mail), with the error as
 * last_error. Returns -1 only when out of memory or the store fails. */
int ms_mover_add_rollback(struct ms_mover *m, const char *user,
			  const char *src_password, const char *dst_password,
			  ms_mover_done_cb *done, void *ctx);
void ms_mover_progress(const struct ms_mover *m, struct ms_progress *p);
void ms_mover_free(struct ms_mover **m);

#endif
