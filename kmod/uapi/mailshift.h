/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * The mailshift module's generic netlink interface: the steering table of
 * one network namespace, replaced as a whole and read back with counters.
 *
 * Family "mailshift", version MAILSHIFT_GENL_VERSION. Every command acts on
 * the network namespace of the socket that sends it. Changes need
 * CAP_NET_ADMIN over that namespace.
 *
 * MAILSHIFT_CMD_SET_TABLE (do): replaces the table in one step; a refused
 * request leaves the table as it was. Attributes:
 *	MAILSHIFT_A_MARK: u32, the conntrack mark base (low 8 bits zero); a
 *		connection's decision is kept as base | action in its ct mark
 *	MAILSHIFT_A_ROUTE_MARK: u32, the packet mark of diverted packets (the
 *		policy routing delivers marked packets locally)
 *	MAILSHIFT_A_ROUTE_TABLE, MAILSHIFT_A_ROUTE_PRIORITY: u32, optional:
 *		where that policy routing is (its table, its rule's
 *		priority); kept for userspace and dumped, not used here
 *	MAILSHIFT_A_PORTS: nested, at most MAILSHIFT_MAX_PORTS of
 *		[any type]: nested
 *			MAILSHIFT_P_PORT: u16, a mail port (1 to 65535)
 *			MAILSHIFT_P_LISTENER: u16, the transparent listener's
 *				port for it, 0 = none
 *	MAILSHIFT_A_SOURCE4, MAILSHIFT_A_DEST4: 4 bytes, IPv4 address
 *	MAILSHIFT_A_SOURCE6, MAILSHIFT_A_DEST6: 16 bytes, IPv6 address
 *		(each optional: where "source" and "destination" translate to)
 *	MAILSHIFT_A_ENTRIES: nested, at most MAILSHIFT_MAX_ENTRIES of
 *		[any type]: nested
 *			MAILSHIFT_E_FAMILY: u8, AF_INET or AF_INET6
 *			MAILSHIFT_E_ADDR: 4 or 16 bytes, the service address
 *			MAILSHIFT_E_PORT: u16, a mail port; 0 = the
 *				address's other TCP and UDP ports
 *			MAILSHIFT_E_PREFIX: 4 or 16 bytes, client prefix
 *				(optional, with MAILSHIFT_E_PREFIX_LEN: u8)
 *			MAILSHIFT_E_ACTION: u8, enum mailshift_action
 *
 * MAILSHIFT_CMD_GET_TABLE (dump): one message with MAILSHIFT_A_INSTALLED
 * (u8), MAILSHIFT_A_GENERATION (u32), MAILSHIFT_A_REJECTED (u64, packets
 * reset because no transparent socket listened) and, when installed, the
 * attributes given to SET except the entries; then one message per entry:
 *	MAILSHIFT_A_ENTRIES: nested
 *		[index]: nested, as in SET, plus
 *			MAILSHIFT_E_CONNECTIONS, MAILSHIFT_E_PACKETS,
 *			MAILSHIFT_E_BYTES: u64
 * A dump that a SET or DEL interrupts ends with NLM_F_DUMP_INTR.
 *
 * MAILSHIFT_CMD_DEL_TABLE (do): removes the table and the hooks, and
 * empties the session map; the counters stay for a later SET of the same
 * entries.
 *
 * The session map: the gateway's routed sessions, each a client's TCP
 * connection as conntrack has it in the original direction (the client's
 * address and port, the address and port it connected to), with its user
 * and the server the gateway chose. A packet of a session whose user is
 * in MAILSHIFT_USER_CUTOVER, or MAILSHIFT_USER_MOVED while the session
 * goes to the source, is answered with a TCP reset and dropped (counted in
 * the session's and the user's resets). A user is kept while it has
 * sessions. At most max_sessions (a module parameter) per namespace; an
 * entry goes with MAILSHIFT_CMD_SESSION_DEL, when its connection is over
 * (a collection every gc_interval seconds, another module parameter), or
 * with the table. Each command takes exactly the attributes it names:
 *
 * MAILSHIFT_CMD_SESSION_ADD (do), with a table installed:
 *	MAILSHIFT_A_USER: string, 1 to MAILSHIFT_USER_MAX bytes
 *	MAILSHIFT_A_SERVER: u8, MAILSHIFT_SOURCE or MAILSHIFT_DESTINATION
 *	MAILSHIFT_A_CLIENT: 4 or 16 bytes, MAILSHIFT_A_CLIENT_PORT: u16
 *	MAILSHIFT_A_LOCAL: as long as CLIENT, MAILSHIFT_A_LOCAL_PORT: u16
 *	MAILSHIFT_A_USER_STATE: u8, optional: the user's state from now on
 *		(a new user's is MAILSHIFT_USER_ROUTED)
 *	A session of the same four is refused (EEXIST); a full map ENOSPC.
 *
 * MAILSHIFT_CMD_SESSION_DEL (do): MAILSHIFT_A_CLIENT, _CLIENT_PORT,
 *	_LOCAL, _LOCAL_PORT; ENOENT when there is no such session.
 *
 * MAILSHIFT_CMD_USER_STATE (do): MAILSHIFT_A_USER, MAILSHIFT_A_USER_STATE;
 *	a user without sessions is not kept (nothing to do, no error).
 *
 * MAILSHIFT_CMD_SESSION_GET (dump), no attributes: one message with
 * MAILSHIFT_A_SESSIONS (u32, how many), MAILSHIFT_A_MAX_SESSIONS (u32) and
 * MAILSHIFT_A_GENERATION (u32, the map's), then one per session with the
 * attributes of SESSION_ADD (MAILSHIFT_A_USER_STATE always) and
 * MAILSHIFT_A_PACKETS, MAILSHIFT_A_RESETS (u64, the session's),
 * MAILSHIFT_A_USER_RESETS (u64, the user's). A dump that a change of the
 * map interrupts ends with NLM_F_DUMP_INTR.
 */
#ifndef _UAPI_MAILSHIFT_H
#define _UAPI_MAILSHIFT_H

#define MAILSHIFT_GENL_NAME "mailshift"
#define MAILSHIFT_GENL_VERSION 2

#define MAILSHIFT_MAX_PORTS 16
#define MAILSHIFT_MAX_ENTRIES 1024
#define MAILSHIFT_USER_MAX 255
#define MAILSHIFT_DEFAULT_SESSIONS 65536
#define MAILSHIFT_MAX_SESSIONS 1048576

enum mailshift_action {
	MAILSHIFT_NONE,
	MAILSHIFT_PROXY,
	MAILSHIFT_SOURCE,
	MAILSHIFT_DESTINATION,
	__MAILSHIFT_ACTION_MAX
};

enum mailshift_user_state {
	MAILSHIFT_USER_ROUTED,		/* nothing enforced */
	MAILSHIFT_USER_CUTOVER,		/* every session is reset */
	MAILSHIFT_USER_MOVED,		/* sessions to the source are reset */
	__MAILSHIFT_USER_STATE_MAX
};

enum mailshift_cmd {
	MAILSHIFT_CMD_UNSPEC,
	MAILSHIFT_CMD_SET_TABLE,
	MAILSHIFT_CMD_GET_TABLE,
	MAILSHIFT_CMD_DEL_TABLE,
	MAILSHIFT_CMD_SESSION_ADD,
	MAILSHIFT_CMD_SESSION_DEL,
	MAILSHIFT_CMD_SESSION_GET,
	MAILSHIFT_CMD_USER_STATE,
	__MAILSHIFT_CMD_MAX
};

#define MAILSHIFT_CMD_MAX (__MAILSHIFT_CMD_MAX - 1)

enum mailshift_attr {
	MAILSHIFT_A_UNSPEC,
	MAILSHIFT_A_PAD,
	MAILSHIFT_A_MARK,
	MAILSHIFT_A_ROUTE_MARK,
	MAILSHIFT_A_PORTS,
	MAILSHIFT_A_SOURCE4,
	MAILSHIFT_A_SOURCE6,
	MAILSHIFT_A_DEST4,
	MAILSHIFT_A_DEST6,
	MAILSHIFT_A_ENTRIES,
	MAILSHIFT_A_INSTALLED,
	MAILSHIFT_A_GENERATION,
	MAILSHIFT_A_REJECTED,
	MAILSHIFT_A_ROUTE_TABLE,
	MAILSHIFT_A_ROUTE_PRIORITY,
	MAILSHIFT_A_USER,
	MAILSHIFT_A_USER_STATE,
	MAILSHIFT_A_SERVER,
	MAILSHIFT_A_CLIENT,
	MAILSHIFT_A_CLIENT_PORT,
	MAILSHIFT_A_LOCAL,
	MAILSHIFT_A_LOCAL_PORT,
	MAILSHIFT_A_PACKETS,
	MAILSHIFT_A_RESETS,
	MAILSHIFT_A_USER_RESETS,
	MAILSHIFT_A_SESSIONS,
	MAILSHIFT_A_MAX_SESSIONS,
	__MAILSHIFT_A_MAX
};

#define MAILSHIFT_A_MAX (__MAILSHIFT_A_MAX - 1)

enum mailshift_port_attr {
	MAILSHIFT_P_UNSPEC,
	MAILSHIFT_P_PORT,
	MAILSHIFT_P_LISTENER,
	__MAILSHIFT_P_MAX
};

#define MAILSHIFT_P_MAX (__MAILSHIFT_P_MAX - 1)

enum mailshift_entry_attr {
	MAILSHIFT_E_UNSPEC,
	MAILSHIFT_E_PAD,
	MAILSHIFT_E_FAMILY,
	MAILSHIFT_E_ADDR,
	MAILSHIFT_E_PORT,
	MAILSHIFT_E_PREFIX,
	MAILSHIFT_E_PREFIX_LEN,
	MAILSHIFT_E_ACTION,
	MAILSHIFT_E_CONNECTIONS,
	MAILSHIFT_E_PACKETS,
	MAILSHIFT_E_BYTES,
	__MAILSHIFT_E_MAX
};

#define MAILSHIFT_E_MAX (__MAILSHIFT_E_MAX - 1)

#endif /* _UAPI_MAILSHIFT_H */
