/* The control socket of mailshiftd (docs/gateway-spec.md). */
#ifndef MS_CONTROL_H
#define MS_CONTROL_H

#include <sys/types.h>

#include <jansson.h>
#include <uv.h>

#include "gateway.h"
#include "store.h"

struct ms_control;

/* Who may talk: root always; owner (the daemon's user once it has dropped
 * root; 0 when it runs as root); members of group ((gid_t)-1: none). */
struct ms_control_access {
	uid_t owner;
	gid_t group;
};

/* Listens on the UNIX socket at path: owned by acc->owner, mode 0600, or
 * 0660 and group acc->group. A stale socket is replaced; any other file
 * there, or a socket someone listens on, is an error (nothing removed). */
int ms_control_new(uv_loop_t *loop, const char *path,
		   const struct ms_control_access *acc, struct ms_gateway *gw,
		   struct ms_store *store, struct ms_control **ctl_r,
		   char *err, size_t errsz);
/* The request handling alone, without a socket (tests, fuzzing); gw may be
 * NULL (what needs it then answers "no gateway"). */
struct ms_control *ms_control_detached(struct ms_gateway *gw,
				       struct ms_store *store);
/* One request line (without its '\n') -> the reply object (the caller
 * owns it; NULL only when out of memory). */
json_t *ms_control_request(struct ms_control *ctl, const char *line,
			   size_t len);
void ms_control_free(struct ms_control **ctl);

#endif
