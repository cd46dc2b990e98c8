/* Outgoing TCP connections on libuv, optionally with TLS (OpenSSL over a pair
 * of memory BIOs, so all I/O stays on the event loop), for the mover's IMAP
 * and POP3 clients.
 *
 * Certificate verification is on by default: the peer's chain is checked
 * against ca_file (or the system's default CA paths when ca_file is NULL) and
 * its name against server_name (SNI is sent too). `insecure` turns both
 * checks off, for labs only.
 */
#ifndef MS_NET_H
#define MS_NET_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

enum ms_tls_mode {
	MS_TLS_NONE,		/* plaintext */
	MS_TLS_STARTTLS,	/* plaintext; caller upgrades via ms_conn_starttls */
	MS_TLS_IMPLICIT,	/* TLS from the first byte (993, 995) */
};

struct ms_tls_opts {
	enum ms_tls_mode mode;
	const char *ca_file;	/* NULL: system default CA paths */
	int insecure;		/* 1: no chain or name verification */
	const char *server_name; /* for SNI and name check; NULL: host */
};

struct ms_conn;

struct ms_conn_callbacks {
	/* TCP connected (and, for MS_TLS_IMPLICIT, TLS handshake done and the
	 * certificate verified). status 0 on success; otherwise error is a
	 * human-readable reason ("connection refused", "certificate verify
	 * failed: ..."), and the connection must be closed by the caller. */
	void (*on_connect)(struct ms_conn *conn, int status, const char *error);
	/* Plaintext bytes from the peer. */
	void (*on_read)(struct ms_conn *conn, const char *data, size_t len);
	/* The connection failed or the peer closed it ("connection closed by
	 * server", "TLS error: ...", a read/write error). Called at most once;
	 * the caller then closes the connection. */
	void (*on_error)(struct ms_conn *conn, const char *error);
	/* The write queue dropped from above MS_CONN_HIGH_WATER to below
	 * MS_CONN_LOW_WATER (backpressure release). May be NULL. */
	void (*on_drain)(struct ms_conn *conn);
	void *ctx;
};

#define MS_CONN_HIGH_WATER (1024 * 1024)
#define MS_CONN_LOW_WATER (256 * 1024)

/* Resolves host (uv_getaddrinfo), connects, and for implicit TLS runs the
 * handshake. Returns 0 and the connection (callbacks follow), or a negative
 * libuv error code (no callback will be called). */
int ms_conn_connect(uv_loop_t *loop, const char *host, uint16_t port,
		    const struct ms_tls_opts *tls,
		    const struct ms_conn_callbacks *cb, struct ms_conn **conn_r);

/* Queues bytes to send (copied; encrypted first under TLS). Returns 0 or a
 * negative error. Never blocks and never calls a callback synchronously. */
int ms_conn_write(struct ms_conn *conn, const void *data, size_t len);
/* Bytes queued but not yet handed to the kernel. */
size_t ms_conn_write_pending(const struct ms_conn *conn);

/* Stops / restarts delivering on_read (backpressure). */
void ms_conn_read_pause(struct ms_conn *conn, int paused);

/* Starts the TLS handshake on a plaintext connection (after the server's
 * STARTTLS/STLS go-ahead). done is called once with status 0, or non-zero
 * and a reason. Bytes the peer sent after the go-ahead are TLS. */
int ms_conn_starttls(struct ms_conn *conn,
		     void (*done)(struct ms_conn *conn, int status,
				  const char *error));
int ms_conn_is_tls(const struct ms_conn *conn);

void *ms_conn_ctx(const struct ms_conn *conn);

/* Closes the connection: no callback is called after this returns, memory
 * is released once libuv has closed the handle. Sets *conn to NULL. Accepts
 * NULL and *conn == NULL. */
void ms_conn_close(struct ms_conn **conn);

#endif
