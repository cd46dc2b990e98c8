/* The fence's watchdog: a thread that ends the relayed sessions at the
 * cluster's deadline when the event loop cannot (docs/design.md, "Several
 * gateways", "What it assumes").
 *
 * A gateway that has taken no heartbeat for its timeout less one heartbeat
 * ends every session it relays before the others may fence it (cluster.c,
 * out_of_time). That is the loop's own timer, and a loop held in a
 * blocking call (a store call to a database that stopped answering) runs
 * no timer: then this thread shuts down the relays' sockets itself, half
 * a heartbeat after that deadline and as long before the others may fence
 * this gateway, so nothing a client writes through it can reach a server
 * after the others flipped its user. The loop still ends the sessions
 * when it runs again; a loop that runs ends them first, with their BYE.
 *
 * Loop side: ms_watchdog_arm() with each new instant (uv_now()'s clock,
 * CLOCK_MONOTONIC), ms_watchdog_add() when a session starts relaying and
 * ms_watchdog_remove() before its sockets close. A slot of 0 is a session
 * not registered.
 */
#ifndef MS_WATCHDOG_H
#define MS_WATCHDOG_H

#include <stdint.h>

struct ms_watchdog;

int ms_watchdog_new(struct ms_watchdog **wd_r);
void ms_watchdog_free(struct ms_watchdog *wd);

/* due: milliseconds of CLOCK_MONOTONIC (uv_now()); 0: none. */
void ms_watchdog_arm(struct ms_watchdog *wd, uint64_t due);
/* The relays it shut down since it was last armed (0: it did not fire). */
unsigned int ms_watchdog_fired(struct ms_watchdog *wd);

/* A session's two sockets (-1: none); *slot is the watchdog's, 0 when out.
 * Added after the deadline passed, they are shut down at once. */
void ms_watchdog_add(struct ms_watchdog *wd, unsigned int *slot, int fd1,
		     int fd2);
void ms_watchdog_remove(struct ms_watchdog *wd, unsigned int *slot);

#endif
