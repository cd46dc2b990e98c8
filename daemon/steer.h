/* Steering: the [steer] section of mailshift.conf and the nftables table
 * mailshift owns ("inet mailshift"), built from it as one ruleset text and
 * applied with libnftables in one transaction. See docs/design.md,
 * "Steering", and mailshift.conf(5). */
#ifndef MS_STEER_H
#define MS_STEER_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define MS_STEER_TABLE		"mailshift"
#define MS_STEER_MAX_ADDRS	16
#define MS_STEER_MAX_PORTS	16
#define MS_STEER_MAX_ENTRIES	512
#define MS_STEER_OTHER		0	/* an entry's port: the other ports */
/* Decisions at most: every address's ports and other ports, the entries. */
#define MS_STEER_MAX_EXPANDED	(MS_STEER_MAX_ADDRS * (MS_STEER_MAX_PORTS + 1) \
				 + MS_STEER_MAX_ENTRIES)

enum ms_steer_action {
	MS_STEER_NONE = 0,
	MS_STEER_PROXY = 1,		/* TPROXY to mailshiftd */
	MS_STEER_SOURCE = 2,		/* straight to the source server */
	MS_STEER_DESTINATION = 3,	/* DNAT straight to the destination */
};

/* An address or a prefix (len = 32/128 for an address), in binary and as
 * canonical text. */
struct ms_steer_addr {
	int family;			/* AF_INET, AF_INET6; 0 = none */
	unsigned char a[16];
	unsigned int len;
	char text[64];			/* "10.0.0.0/24", "2001:db8::1" */
};

/* One decision: connections to addr:port (port MS_STEER_OTHER: the
 * address's ports that are not mail ports), from prefix when it is given,
 * get action. */
struct ms_steer_entry {
	struct ms_steer_addr addr;
	unsigned int port;
	struct ms_steer_addr prefix;	/* family 0: every client */
	enum ms_steer_action action;
};

/* Where the table lives: an nftables table, or the mailshift kernel
 * module's (kmod/, through generic netlink: steer_kmod.c). */
enum ms_steer_backend {
	MS_STEER_BACKEND_NFT = 0,
	MS_STEER_BACKEND_KMOD = 1,
};

struct ms_steer_cfg {
	int present;			/* the file has a [steer] section */
	enum ms_steer_backend backend;	/* backend = nft | kmod */
	int manage;			/* mailshiftd installs it at start */
	unsigned int naddrs, nports, nentries;
	struct ms_steer_addr addrs[MS_STEER_MAX_ADDRS];
	struct {
		unsigned int port;	/* the mail port clients connect to */
		unsigned int listener;	/* mailshiftd's transparent port */
	} ports[MS_STEER_MAX_PORTS];
	struct ms_steer_addr src[2], dst[2];	/* [0] IPv4, [1] IPv6 */
	enum ms_steer_action action, other;
	struct ms_steer_entry entries[MS_STEER_MAX_ENTRIES];	/* given */
	uint32_t mark;			/* packet and conntrack mark base */
	uint32_t table;			/* policy routing table, 0 = auto */
	uint32_t priority;		/* its rule's priority, 0 = auto */
};

/* Where the policy routing is: chosen at install, kept in the table's
 * comment so that remove and set find it again. */
struct ms_steer_route {
	uint32_t mark, table, priority;
	unsigned int families;		/* bit 0 IPv4, bit 1 IPv6 */
};

/* The families of the service addresses (bits as in families above). */
unsigned int ms_steer_families(const struct ms_steer_cfg *s);
/* A retired migration's steering: every mail port of the n entries sent
 * straight to the destination; the addresses' other ports as they were. */
void ms_steer_entries_retired(struct ms_steer_entry *e, unsigned int n);
/* The same for a whole [steer] (its given entries and its default). */
void ms_steer_cfg_retired(struct ms_steer_cfg *s);

const char *ms_steer_action_name(enum ms_steer_action a);
int ms_steer_action_parse(const char *s, enum ms_steer_action *a);
int ms_steer_addr_parse(const char *s, int prefix_ok,
			struct ms_steer_addr *a, char *err, size_t errsz);

void ms_steer_defaults(struct ms_steer_cfg *s);
/* One key of [steer]; 0 or -1 with err. */
int ms_steer_key(struct ms_steer_cfg *s, const char *key, const char *value,
		 char *err, size_t errsz);
/* What the keys together must say (at the end of the file). */
int ms_steer_check(const struct ms_steer_cfg *s, char *err, size_t errsz);
/* "ADDR PORT [PREFIX] ACTION" (PORT a number or "other") into e. */
int ms_steer_entry_parse(const char *s, struct ms_steer_entry *e, char *err,
			 size_t errsz);
void ms_steer_entry_text(const struct ms_steer_entry *e, char *buf,
			 size_t sz);
/* The name of the entry's counter in the table. */
void ms_steer_counter_name(const struct ms_steer_entry *e, char *buf,
			   size_t sz);

/* Every decision the table makes, from the configuration: one entry per
 * address and mail port, one per address for its other ports, and the
 * client-prefix overrides. Returns the count, entries in *out. */
unsigned int ms_steer_expand(const struct ms_steer_cfg *s,
			     struct ms_steer_entry *out);
/* Checks a full entry list against the configuration (set uses it on the
 * list read back from the kernel plus the change). */
int ms_steer_entries_check(const struct ms_steer_cfg *s,
			   const struct ms_steer_entry *e, unsigned int n,
			   char *err, size_t errsz);

/* The ruleset that replaces the table: a malloc'd nft script. counters:
 * the installed table's "counters" (from ms_steer_read), carried over, or
 * NULL. */
char *ms_steer_ruleset(const struct ms_steer_cfg *s,
		       const struct ms_steer_entry *e, unsigned int n,
		       const struct ms_steer_route *rt, json_t *counters);

/* What the kernel holds, read with libnftables: *state gets
 * {"installed": bool, "route": {mark, table, priority}, "entries":
 * [{"entry": TEXT, "counter": NAME}...], "counters": {NAME: {packets,
 * bytes}}, "conflicts": ["table ...: rule ..."]}. addrs/ports (may be
 * NULL) say what to look for in other tables. */
int ms_steer_nft_read(const struct ms_steer_cfg *s, json_t **state,
		      char *err, size_t errsz);
/* The same from [steer]'s backend: ms_steer_nft_read(), or
 * ms_steer_kmod_read() (steer_apply.c, above both backends). */
int ms_steer_read(const struct ms_steer_cfg *s, json_t **state, char *err,
		  size_t errsz);

/* Runs an nft script in one transaction (check_only: the kernel checks
 * it and nothing changes). 0, or -1 with nft's error in err. */
int ms_steer_nft_run(const char *script, int check_only, char *err,
		     size_t errsz);

/* Serializes changes to the steering of this network namespace (steer
 * commands, mailshiftd's manage): a descriptor to close when done, or -1
 * with err after waiting 10 s for another change to finish. */
int ms_steer_lock(char *err, size_t errsz);

/* Another table's rule in ms_steer_read's *state that already diverts one
 * of our addresses and ports: -1 with err naming it. */
int ms_steer_conflict(json_t *state, char *err, size_t errsz);

/* Checks the script with the kernel, then applies it; with_route: the
 * policy routing is installed first and taken back when the table cannot
 * be (steer_apply.c). */
int ms_steer_apply(const char *script, const struct ms_steer_route *rt,
		   int with_route, char *err, size_t errsz);

/* All of an install: another table diverting a steered port, the routing
 * plan (rtnl.c), the script (in *script, malloc'd, also on dry_run, when
 * nothing is changed), *rt and the number of entries *n. 0, or -1 with err
 * and the kernel as it was. */
int ms_steer_install(const struct ms_steer_cfg *s, int dry_run,
		     char **script, struct ms_steer_route *rt,
		     unsigned int *n, char *err, size_t errsz);

/* The kmod backend (steer_kmod.c), the same table in the mailshift
 * module. ms_steer_kmod_read fills *state as ms_steer_read does, its
 * counters {connections, packets, bytes} per entry; set replaces the
 * module's table atomically; remove takes it away (0 when the module is
 * not loaded: nothing to remove). */
int ms_steer_kmod_read(json_t **state, char *err, size_t errsz);
int ms_steer_kmod_set(const struct ms_steer_cfg *s,
		      const struct ms_steer_entry *e, unsigned int n,
		      const struct ms_steer_route *rt, char *err, size_t errsz);
int ms_steer_kmod_remove(char *err, size_t errsz);
/* -1 with err when the module is loaded and holds a table: the nft
 * backend must not steer the same connections too. */
int ms_steer_kmod_busy(char *err, size_t errsz);
/* ms_steer_install for the kmod backend; *script is a text form of the
 * table for --dry-run. */
int ms_steer_kmod_install(const struct ms_steer_cfg *s, int dry_run,
			  char **script, struct ms_steer_route *rt,
			  unsigned int *n, char *err, size_t errsz);
/* The table as text: one "entry" line per decision, for --dry-run. */
char *ms_steer_kmod_text(const struct ms_steer_cfg *s,
			 const struct ms_steer_entry *e, unsigned int n,
			 const struct ms_steer_route *rt);

/* The module's session map (backend kmod; docs/kmod.md). mailshiftd says
 * which backend [steer] names once; with nft the calls below do nothing.
 * Each routed IMAP or POP3 session is written at its route (the client's
 * and the local address and port as the session sees them, the user, the
 * server), removed at its end; a user's state (enum ms_user_state) goes
 * with every change of it. Failures are logged, never the session's. */
void ms_steer_sessions_use(enum ms_steer_backend backend);
void ms_steer_session_add(const char *user, const char *client,
			  unsigned int cport, const char *local,
			  unsigned int lport, int to_dst);
void ms_steer_session_end(const char *client, unsigned int cport,
			  const char *local, unsigned int lport);
void ms_steer_user_state(const char *user, int state);
/* The map, for steer sessions: {"backend": "kmod", "sessions": N,
 * "max_sessions": N, "users": [{user, state, resets, sessions: [{client,
 * local, server, packets, resets}]}]}. */
int ms_steer_kmod_sessions(json_t **out, char *err, size_t errsz);

#endif
