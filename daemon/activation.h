/* Socket activation: the listening sockets mailshiftd inherits from systemd
 * (or any manager speaking its LISTEN_FDS protocol, sd_listen_fds(3)), so
 * that they outlive the process and a restart refuses no connection. Each
 * inherited socket is matched to a [listen] address by what it is bound to
 * (getsockname), never by its position or name: a unit and a config that
 * disagree are an error at start, not a listener silently missing. */
#ifndef MS_ACTIVATION_H
#define MS_ACTIVATION_H

#include <stddef.h>
#include <uv.h>

/* Reads LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES (once; they are removed
 * from the environment). Returns the number of inherited sockets, 0 when
 * the process was not activated, or -1 with err. */
int ms_activation_init(char *err, size_t errsz);

/* Like ms_listen, but when sockets were inherited, tcp takes the one bound
 * to addrport instead of binding a new one: an error when none is, or when
 * it differs from what the config asks (transparent or not, IPv6-only or
 * not, not a listening TCP socket). */
int ms_activation_listen(uv_loop_t *loop, uv_tcp_t *tcp, const char *addrport,
			 int transparent, uv_connection_cb cb, char *err,
			 size_t errsz);

/* After every listener is open: an error naming an inherited socket that no
 * [listen] address took (the unit listens where the config does not). */
int ms_activation_check_all_taken(char *err, size_t errsz);

#endif
