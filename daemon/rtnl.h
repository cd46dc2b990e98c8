/* The policy routing TPROXY needs, over rtnetlink with libnl-route-3: a
 * rule "fwmark MARK lookup TABLE" at a priority and a route "local
 * default dev lo" in TABLE, for IPv4 and IPv6. Mailshift's own rules and
 * routes carry routing protocol MS_RTNL_PROTO, which is how they are told
 * apart from the host's. */
#ifndef MS_RTNL_H
#define MS_RTNL_H

#include <stddef.h>

#include <jansson.h>

#include "steer.h"

#define MS_RTNL_PROTO		77	/* "proto 77" in `ip rule`/`ip route` */
#define MS_RTNL_AUTO_TABLE	100	/* where auto starts looking */
#define MS_RTNL_AUTO_PRIO	100

/* Picks the table and priority (the configured ones, the ones mailshift
 * already has on the host, or the first free ones) and checks that the
 * host uses none of them, nor the mark, for something else. */
int ms_rtnl_plan(const struct ms_steer_cfg *s, struct ms_steer_route *rt,
		 char *err, size_t errsz);

/* Adds what is missing of the rule and the route (both families); *added
 * says what was added, for ms_rtnl_undo. */
int ms_rtnl_install(const struct ms_steer_route *rt, unsigned int *added,
		    char *err, size_t errsz);
void ms_rtnl_undo(const struct ms_steer_route *rt, unsigned int added);

/* Deletes mailshift's rules and routes that rt does not use (left by an
 * install with another mark, table or priority). */
int ms_rtnl_prune(const struct ms_steer_route *rt, char *err, size_t errsz);

/* Deletes every rule and route of mailshift's (proto MS_RTNL_PROTO). */
int ms_rtnl_remove(char *err, size_t errsz);

/* Mailshift's rules and routes as JSON: {"rules": [...], "routes": [...]}. */
json_t *ms_rtnl_show(char *err, size_t errsz);

#endif
