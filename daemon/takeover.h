/* Address takeover: this host takes the old server's service address (the
 * "VIP") after the old server was renumbered, announces it, steers its mail
 * ports with the steering table and forwards its other ports to the old
 * server's new address; giveback undoes it. The [takeover] section of
 * mailshift.conf, the kernel steps (libnl-route-3, AF_PACKET, raw ICMPv6)
 * and the table "inet mailshift_takeover" that records what was done. See
 * docs/design.md, "Steering", and mailshiftctl(8). */
#ifndef MS_TAKEOVER_H
#define MS_TAKEOVER_H

#include <net/if.h>
#include <stddef.h>

#include "steer.h"

#define MS_TAKEOVER_TABLE	"mailshift_takeover"

struct ms_takeover_cfg {
	int present;			/* the file has a [takeover] section */
	struct ms_steer_addr vip;	/* the service address taken over */
	char dev[IFNAMSIZ];		/* the device it goes on */
	struct ms_steer_addr source;	/* the old server's new address */
	int masquerade;			/* forwarded flows leave from us */
};

/* What "inet mailshift_takeover" records (read back by giveback). */
struct ms_takeover_state {
	int installed;
	struct ms_steer_addr vip, source;
	char dev[IFNAMSIZ];
	int steer_before;		/* the steering table was there */
};

void ms_takeover_defaults(struct ms_takeover_cfg *t);
/* One key of [takeover]; 0 or -1 with err. */
int ms_takeover_key(struct ms_takeover_cfg *t, const char *key,
		    const char *value, char *err, size_t errsz);

/* The checks that need no kernel: the addresses go together. */
int ms_takeover_check(const struct ms_takeover_cfg *t, char *err,
		      size_t errsz);

/* The steering configuration with the takeover in it: the VIP a service
 * address, the old server's new address its family's source. Refuses a
 * [steer] source that names another server. */
int ms_takeover_steer(const struct ms_takeover_cfg *t,
		      struct ms_steer_cfg *s, char *err, size_t errsz);

/* The checks against the host, before anything changes: the device
 * exists, is up and has an Ethernet address (*mac), the VIP is on no
 * device, the source address is not local, forwarding is on. */
int ms_takeover_host_check(const struct ms_takeover_cfg *t,
			   unsigned char mac[6], int *ifindex, char *err,
			   size_t errsz);

/* The table that forwards replies back (masquerade) and records the
 * takeover; a malloc'd nft script. */
char *ms_takeover_ruleset(const struct ms_takeover_cfg *t, uint32_t mark,
			  int steer_before);
int ms_takeover_read(struct ms_takeover_state *st, char *err, size_t errsz);

/* The VIP as a host address (/32, /128, no DAD) on ifindex, or taken away
 * again (already gone is no error). */
int ms_takeover_addr(int add, const struct ms_steer_addr *vip, int ifindex,
		     char *err, size_t errsz);

/* Gratuitous ARP (IPv4) or an unsolicited neighbour advertisement with
 * the override flag (IPv6): the neighbours' entries for the VIP change
 * to mac. Sent three times, 100 ms apart. */
int ms_takeover_announce(const struct ms_steer_addr *vip, int ifindex,
			 const unsigned char mac[6], char *err, size_t errsz);

#endif
