/* The control socket of mailshiftd (docs/gateway-spec.md). */
#ifndef MS_CONTROL_H
#define MS_CONTROL_H

#include <uv.h>

#include "gateway.h"
#include "store.h"

struct ms_control;

/* Listens on the UNIX socket at path (mode 0600, replacing a stale one). */
int ms_control_new(uv_loop_t *loop, const char *path, struct ms_gateway *gw,
		   struct ms_store *store, struct ms_control **ctl_r,
		   char *err, size_t errsz);
void ms_control_free(struct ms_control **ctl);

#endif
