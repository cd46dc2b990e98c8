/* Installing the steering: the checks against what the host already has,
 * then the policy routing (rtnl.c) and the table (steer.c) in an order
 * that never leaves a marked packet without its route, taking back what
 * was added when a later step fails. Shared by mailshiftctl steer and by
 * mailshiftd ([steer] manage = yes). */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "rtnl.h"
#include "steer.h"

/* An abstract UNIX socket is the lock: it belongs to the network
 * namespace (whose steering it guards), needs no file, and goes away with
 * the process that holds it, however that process ends. */
int ms_steer_lock(char *err, size_t errsz)
{
	static const char name[] = "mailshift-steer";
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timespec pause = { 0, 50 * 1000 * 1000 };
	socklen_t len = offsetof(struct sockaddr_un, sun_path) + 1 +
			sizeof(name) - 1;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		snprintf(err, errsz, "lock: %s", strerror(errno));
		return -1;
	}
	memcpy(sa.sun_path + 1, name, sizeof(name) - 1);
	/* Another change is under way: wait for it, up to 10 s. */
	for (int i = 0; i < 200; i++) {
		if (bind(fd, (struct sockaddr *)&sa, len) == 0)
			return fd;
		if (errno != EADDRINUSE)
			break;
		nanosleep(&pause, NULL);
	}
	snprintf(err, errsz, "another steering change is still running in "
		 "this network namespace (%s); nothing was changed",
		 errno == EADDRINUSE ? "waited 10 s" : strerror(errno));
	close(fd);
	return -1;
}

int ms_steer_apply(const char *script, const struct ms_steer_route *rt,
		   int with_route, char *err, size_t errsz)
{
	unsigned int added = 0;

	if (ms_steer_nft_run(script, 1, err, errsz) < 0)
		return -1;
	if (with_route && ms_rtnl_install(rt, &added, err, errsz) < 0)
		return -1;
	if (ms_steer_nft_run(script, 0, err, errsz) < 0) {
		ms_rtnl_undo(rt, added);
		return -1;
	}
	/* The new table is in: routing an older install used (another
	 * mark, table or priority) can go now. */
	return with_route ? ms_rtnl_prune(rt, err, errsz) : 0;
}

int ms_steer_read(const struct ms_steer_cfg *s, json_t **state, char *err,
		  size_t errsz)
{
	*state = NULL;
	/* Before any nft context: libnftables exits the process when the
	 * kernel has no nf_tables, which the kmod backend does not need. */
	if (s->backend == MS_STEER_BACKEND_KMOD)
		return ms_steer_kmod_read(state, err, errsz);
	return ms_steer_nft_read(s, state, err, errsz);
}

int ms_steer_install(const struct ms_steer_cfg *s, int dry_run,
		     char **script, struct ms_steer_route *rt,
		     unsigned int *n, char *err, size_t errsz)
{
	struct ms_steer_entry *e = calloc(MS_STEER_MAX_EXPANDED,
						sizeof(*e));
	json_t *state = NULL;
	int ret = -1;

	*script = NULL;
	if (s->backend == MS_STEER_BACKEND_KMOD) {
		free(e);
		return ms_steer_kmod_install(s, dry_run, script, rt, n, err,
					     errsz);
	}
	if (e == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	if (ms_steer_read(s, &state, err, errsz) < 0 ||
	    ms_steer_conflict(state, err, errsz) < 0 ||
	    ms_steer_kmod_busy(err, errsz) < 0 ||
	    ms_rtnl_plan(s, rt, err, errsz) < 0)
		goto out;
	*n = ms_steer_expand(s, e);
	/* The installed table's counters carry over. */
	*script = ms_steer_ruleset(s, e, *n, rt, json_object_get(state,
								 "counters"));
	if (*script == NULL) {
		snprintf(err, errsz, "out of memory");
		goto out;
	}
	ret = dry_run ? 0 : ms_steer_apply(*script, rt, 1, err, errsz);
out:
	json_decref(state);
	free(e);
	return ret;
}
