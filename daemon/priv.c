/* Least privilege for mailshiftd: core dumps off, the descriptor limit, the
 * switch to [daemon] user with libcap-ng keeping only what transparent
 * listeners need, and the checks that it holds (see priv.h). */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cap-ng.h>

#include "log.h"
#include "priv.h"

#define fail(...) do { snprintf(err, errsz, __VA_ARGS__); return -1; } while (0)

int ms_priv_start(char *err, size_t errsz)
{
	struct rlimit rl = { 0, 0 };

	/* The process holds users' and admin passwords: never a core file,
	 * and a hard limit of 0 so that nothing raises it again. */
	if (setrlimit(RLIMIT_CORE, &rl) < 0)
		fail("RLIMIT_CORE: %s", strerror(errno));
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		fail("PR_SET_DUMPABLE: %s", strerror(errno));
	/* Every session holds two sockets: take all the descriptors the
	 * system allows us. */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
			fail("RLIMIT_NOFILE: %s", strerror(errno));
	}
	return 0;
}

int ms_priv_group(const char *group, gid_t *gid_r, char *err, size_t errsz)
{
	struct group *gr;

	errno = 0;
	gr = getgrnam(group);
	if (gr == NULL)
		fail("group \"%s\": %s", group,
		     errno != 0 ? strerror(errno) : "no such group");
	*gid_r = gr->gr_gid;
	return 0;
}

int ms_priv_lookup(const char *user, const char *group, struct ms_priv *p,
		   char *err, size_t errsz)
{
	struct passwd *pw;

	memset(p, 0, sizeof(*p));
	errno = 0;
	pw = getpwnam(user);
	if (pw == NULL)
		fail("[daemon] user \"%s\": %s", user,
		     errno != 0 ? strerror(errno) : "no such user");
	if (pw->pw_uid == 0)
		fail("[daemon] user \"%s\" is root: give an unprivileged user",
		     user);
	p->uid = pw->pw_uid;
	p->gid = pw->pw_gid;
	snprintf(p->user, sizeof(p->user), "%s", user);
	if (group != NULL && *group != '\0') {
		if (ms_priv_group(group, &p->gid, err, errsz) < 0)
			return -1;
		snprintf(p->group, sizeof(p->group), "%s", group);
	} else {
		struct group *gr = getgrgid(p->gid);

		snprintf(p->group, sizeof(p->group), "%s",
			 gr != NULL ? gr->gr_name : "(the user's group)");
	}
	if (p->gid == 0)
		fail("[daemon] group of \"%s\" is root's (gid 0): give an "
		     "unprivileged group", user);
	return 0;
}

int ms_priv_restrict(const struct ms_priv *p, char *err, size_t errsz)
{
	/* The bounding set and no_new_privs are per thread and inherited:
	 * set here, before libuv starts its thread pool, they hold for
	 * every thread. */
	capng_clear(CAPNG_SELECT_BOTH);
	if (p->keep_net)
		capng_updatev(CAPNG_ADD, CAPNG_BOUNDING_SET, CAP_NET_ADMIN,
			      CAP_NET_RAW, -1);
	if (capng_apply(CAPNG_SELECT_BOUNDS) < 0)
		fail("cannot limit the capability bounding set");
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		fail("PR_CAP_AMBIENT_CLEAR_ALL: %s", strerror(errno));
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		fail("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
	return 0;
}

static int cap_allowed(const struct ms_priv *p, unsigned int cap,
		       capng_type_t type)
{
	return p->keep_net && type != CAPNG_INHERITABLE &&
		type != CAPNG_AMBIENT &&
		(cap == CAP_NET_ADMIN || cap == CAP_NET_RAW);
}

/* What ms_priv_drop() promises, read back from the kernel. */
static int verify(const struct ms_priv *p, char *err, size_t errsz)
{
	static const capng_type_t types[] = {
		CAPNG_EFFECTIVE, CAPNG_PERMITTED, CAPNG_INHERITABLE,
		CAPNG_BOUNDING_SET, CAPNG_AMBIENT,
	};
	uid_t ru, eu, su;
	gid_t rg, eg, sg;

	if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0 ||
	    ru != p->uid || eu != p->uid || su != p->uid || rg != p->gid ||
	    eg != p->gid || sg != p->gid)
		fail("the uid or gid did not change for good");
	if (getgroups(0, NULL) != 0)
		fail("supplementary groups are left");
	/* Must be refused now: the point of the exercise. */
	if (setuid(0) == 0 || setgid(0) == 0 || seteuid(0) == 0)
		fail("the process could become root again");
	if (capng_get_caps_process() < 0)
		fail("cannot read the process's capabilities back");
	for (unsigned int cap = 0; cap <= CAP_LAST_CAP; cap++)
		for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
			if (capng_have_capability(types[i], cap) &&
			    !cap_allowed(p, cap, types[i]))
				fail("capability %s is left",
				     capng_capability_to_name(cap));
	if (prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0)
		fail("the process is dumpable");
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail("no_new_privs is not set");
	return 0;
}

int ms_priv_drop(const struct ms_priv *p, char *err, size_t errsz)
{
	/* glibc applies setgroups, setresgid and setresuid to every thread;
	 * a thread that does not keep its capabilities loses them all with
	 * root. Only this one (the event loop's) keeps the permitted set
	 * across the switch, and then only when something is kept. */
	if (prctl(PR_SET_KEEPCAPS, p->keep_net, 0, 0, 0) < 0)
		fail("PR_SET_KEEPCAPS: %s", strerror(errno));
	if (setgroups(0, NULL) < 0)
		fail("setgroups: %s", strerror(errno));
	if (setresgid(p->gid, p->gid, p->gid) < 0)
		fail("setresgid(%u): %s", (unsigned int)p->gid, strerror(errno));
	if (setresuid(p->uid, p->uid, p->uid) < 0)
		fail("setresuid(%u): %s", (unsigned int)p->uid, strerror(errno));
	capng_clear(CAPNG_SELECT_CAPS);
	if (p->keep_net)
		capng_updatev(CAPNG_ADD, CAPNG_EFFECTIVE | CAPNG_PERMITTED,
			      CAP_NET_ADMIN, CAP_NET_RAW, -1);
	if (capng_apply(CAPNG_SELECT_CAPS) < 0)
		fail("cannot set the capabilities");
	if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0)
		fail("PR_SET_KEEPCAPS: %s", strerror(errno));
	/* A uid change resets it to fs.suid_dumpable. */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		fail("PR_SET_DUMPABLE: %s", strerror(errno));
	return verify(p, err, errsz);
}

/* Reads or writes exactly len bytes over the check's pipe; -1 on an error
 * or an early end. */
static int full_io(int fd, void *buf, size_t len, int writing)
{
	char *p = buf;

	while (len > 0) {
		ssize_t n = writing ? write(fd, p, len) : read(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* The child: becomes the user, then access(2) for each path; writes the
 * drop's error (empty: none) and one errno (0: allowed) per path. */
static void check_child(int fd, const struct ms_priv *p,
			const struct ms_priv_need *need, size_t n)
{
	char derr[256] = "";
	int ok = ms_priv_drop(p, derr, sizeof(derr)) == 0;

	if (full_io(fd, derr, sizeof(derr), 1) < 0 || !ok)
		_exit(1);
	for (size_t i = 0; i < n; i++) {
		int e = access(need[i].path, need[i].mode) == 0 ? 0 : errno;

		if (full_io(fd, &e, sizeof(e), 1) < 0)
			_exit(1);
	}
	_exit(0);
}

static const char *verb(int mode)
{
	if (mode & W_OK)
		return mode & R_OK ? "read and write" : "write in";
	return mode & X_OK ? "search" : "read";
}

static int check_report(const struct ms_priv *p,
			const struct ms_priv_need *need, const int *res,
			size_t n, char *err, size_t errsz)
{
	int ret = 0;

	for (size_t i = 0; i < n; i++) {
		char msg[1024];

		if (res[i] == 0)
			continue;
		snprintf(msg, sizeof(msg), "%s: user %s cannot %s it (%s): %s",
			 need[i].path, p->user, verb(need[i].mode),
			 strerror(res[i]), need[i].what);
		if (need[i].fatal && ret == 0) {
			snprintf(err, errsz, "%s", msg);
			ret = -1;
		} else if (!need[i].fatal) {
			ms_warn("%s", msg);
		}
	}
	return ret;
}

int ms_priv_check(const struct ms_priv *p, const struct ms_priv_need *need,
		  size_t n, char *err, size_t errsz)
{
	char derr[256] = "";
	int fds[2], status, ok, ret;
	int *res = calloc(n + 1, sizeof(*res));
	pid_t pid;

	if (res == NULL)
		fail("out of memory");
	if (pipe2(fds, O_CLOEXEC) < 0 || (pid = fork()) < 0) {
		free(res);
		fail("cannot check what user %s may do: %s", p->user,
		     strerror(errno));
	}
	if (pid == 0) {
		close(fds[0]);
		check_child(fds[1], p, need, n);
	}
	close(fds[1]);
	ok = full_io(fds[0], derr, sizeof(derr), 0) == 0;
	derr[sizeof(derr) - 1] = '\0';
	ok = ok && derr[0] == '\0' &&
		full_io(fds[0], res, n * sizeof(*res), 0) == 0;
	close(fds[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!ok) {
		free(res);
		fail("cannot switch to user %s: %s", p->user,
		     derr[0] != '\0' ? derr : "the check failed");
	}
	ret = check_report(p, need, res, n, err, errsz);
	free(res);
	return ret;
}
