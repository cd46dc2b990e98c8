/* mailshiftd's configuration file (docs/mailshift.conf.5): what the daemon
 * reads from it, with defaults, parsed strictly. Kept out of mailshiftd.c
 * so that the fuzz target and the unit tests parse exactly what the daemon
 * does. */
#ifndef MS_DCONFIG_H
#define MS_DCONFIG_H

#include <stddef.h>

#include "gateway.h"
#include "retire.h"
#include "steer.h"
#include "takeover.h"

struct ms_dconfig {
	struct ms_gw_config gw;
	char src_admin[128], dst_admin[128];
	char src_admin_pwf[512], dst_admin_pwf[512];
	char dst_doveadm_keyf[512];	/* [destination] doveadm_key_file */
	char store[512];		/* [store] path, or url */
	unsigned int store_timeout;	/* [store] timeout, seconds */
	unsigned int store_readers;	/* [store] readers: the reader's threads */
	char control[108];		/* a UNIX socket path */
	char control_group[64];		/* [control] group, "" = none */
	char pid_file[512];
	char user[64], group[64];	/* [daemon] user, group; "" = none */
	char src_ca[512], dst_ca[512];
	char src_sn[256], dst_sn[256];	/* server_name: the certificate's */
	int src_insecure, dst_insecure;
	int src_transparent, dst_transparent;	/* connect from the client's
						   address */
	struct ms_steer_cfg steer;	/* [steer] */
	struct ms_takeover_cfg takeover;	/* [takeover] */
	struct ms_retire_cfg retire;	/* [retire] */
	/* [gateway] heartbeat, timeout given: else they follow lease */
	int gw_heartbeat_set, gw_timeout_set;
};

/* Fills c with the defaults, parses path and checks what goes together.
 * Returns 0, or -1 with err ("FILE:LINE: ..." where there is a line). No
 * file other than path is opened (secret files are the caller's). */
int ms_dconfig_load(const char *path, struct ms_dconfig *c, char *err,
		    size_t errsz);

#endif
