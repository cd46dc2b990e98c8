/* Least privilege for mailshiftd ([daemon] user, docs/mailshift.conf.5):
 * core dumps off (the process holds passwords), the descriptor limit
 * raised, and, once everything that needs root is open, the switch to an
 * unprivileged user that keeps no capability but CAP_NET_ADMIN and
 * CAP_NET_RAW, and those only for transparent listeners. */
#ifndef MS_PRIV_H
#define MS_PRIV_H

#include <stddef.h>
#include <sys/types.h>

struct ms_priv {
	char user[64], group[64];	/* names, for messages */
	uid_t uid;
	gid_t gid;
	int keep_net;			/* keep CAP_NET_ADMIN and CAP_NET_RAW */
};

/* At the very start: no core file (RLIMIT_CORE 0, not to be raised), not
 * dumpable (nor ptrace-able by the user it will run as), RLIMIT_NOFILE's
 * soft limit raised to the hard one. Returns 0, or -1 with err. */
int ms_priv_start(char *err, size_t errsz);

/* Resolves user (and group, or the user's own group when group is NULL or
 * ""). Refuses root for either. Returns 0, or -1 with err. */
int ms_priv_lookup(const char *user, const char *group, struct ms_priv *p,
		   char *err, size_t errsz);
/* A group's id; 0, or -1 with err. */
int ms_priv_group(const char *group, gid_t *gid_r, char *err, size_t errsz);

/* Something the daemon needs once it runs as the user. */
struct ms_priv_need {
	const char *path;
	int mode;		/* for access(2): R_OK, W_OK | X_OK, ... */
	int fatal;		/* 0: a warning only */
	const char *what;	/* "the store's directory ..." */
};

/* Checks, in a child process that switches to the user exactly as
 * ms_priv_drop() does, that the user may access each path as asked.
 * Warnings are logged; the first fatal failure returns -1 with err. To be
 * called before any thread is started. */
int ms_priv_check(const struct ms_priv *p, const struct ms_priv_need *need,
		  size_t n, char *err, size_t errsz);

/* Before any thread is started (threads inherit it): the capability
 * bounding set down to what is kept, and no new privileges (no set-uid,
 * no file capabilities) for this process and anything it might run. */
int ms_priv_restrict(const struct ms_priv *p, char *err, size_t errsz);

/* For good: no supplementary groups, gid, uid (every thread), the kept
 * capabilities only; then checks that none of it can be undone. Returns 0,
 * or -1 with err (the caller must exit). */
int ms_priv_drop(const struct ms_priv *p, char *err, size_t errsz);

#endif
