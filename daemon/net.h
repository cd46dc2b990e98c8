/* TCP connections on libuv, optionally with TLS (OpenSSL over a BIO of our
 * own, so all I/O stays on the event loop): outgoing ones for the mover's
 * IMAP and POP3 clients, accepted ones for the gateway's listeners.
 *
 * Outgoing: certificate verification is on by default: the peer's chain is
 * checked against ca_file (or the system's default CA paths when ca_file is
 * NULL) and its name against server_name (SNI is sent too). `insecure` turns
 * both checks off, for labs only.
 *
 * Accepted: the server side of TLS (implicit, or STARTTLS/STLS) with the
 * certificate of a struct ms_tls_server. Once connected, an accepted
 * connection works like an outgoing one.
 *
 * Memory: an idle connection holds no read buffer. Reads go into one buffer
 * per thread (per loop, in practice) shared by all its connections, so the
 * data passed to on_read is only valid until on_read returns.
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

/* A client's owner asked before what a server sent is taken (imapc.h,
 * pop3c.h): 0 when it has stopped. */
typedef int ms_read_gate_cb(void *ctx);

struct ms_conn_callbacks {
	/* TCP connected (and, for MS_TLS_IMPLICIT, TLS handshake done and the
	 * certificate verified). status 0 on success; otherwise error is a
	 * human-readable reason ("connection refused", "certificate verify
	 * failed: ..."), and the connection must be closed by the caller. */
	void (*on_connect)(struct ms_conn *conn, int status, const char *error);
	/* Plaintext bytes from the peer; valid until on_read returns (the
	 * buffer is shared with the loop's other connections). */
	void (*on_read)(struct ms_conn *conn, const char *data, size_t len);
	/* The connection failed or the peer closed it ("connection closed by
	 * server" - "by client" on an accepted connection -, "TLS error: ...",
	 * a read/write error). Called at most once; the caller then closes the
	 * connection. */
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

/* Connects from addr, an address of another host (the client's: a
 * transparent upstream), instead of this host's: the socket gets
 * IP_TRANSPARENT / IPV6_TRANSPARENT (CAP_NET_RAW or CAP_NET_ADMIN) and is
 * bound to addr with a port the kernel picks, never not_port (the client's
 * own). The replies reach the socket only when the host's packet filter
 * marks packets of transparent sockets for local delivery (the steering
 * table's first rule does). Call it right after ms_conn_connect(), before
 * the loop runs again; a resolved address of the other family is
 * connected to from this host's address. Returns 0, or -1 when addr is not
 * a numeric IPv4 or IPv6 address (nothing changed). */
int ms_conn_set_source(struct ms_conn *conn, const char *addr,
		       uint16_t not_port);

/* Queues bytes to send (copied; encrypted first under TLS). Returns 0 or a
 * negative error. Never blocks and never calls a callback synchronously. */
int ms_conn_write(struct ms_conn *conn, const void *data, size_t len);
/* ms_conn_write() of a printf-formatted text, whole (never cut). */
int ms_conn_printf(struct ms_conn *conn, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Bytes queued but not yet handed to the kernel. */
size_t ms_conn_write_pending(const struct ms_conn *conn);
/* Whether the queued bytes reached the connection's high-water mark. */
int ms_conn_over_high(const struct ms_conn *conn);
/* The connection's socket, or -1 (none, or not connected). */
int ms_conn_fd(const struct ms_conn *conn);
/* The connection's own backpressure marks (0: MS_CONN_HIGH_WATER /
 * MS_CONN_LOW_WATER): on_drain is called when the queue, having reached
 * high, drops to low. A pre-login session uses small ones. */
void ms_conn_set_water(struct ms_conn *conn, size_t high, size_t low);
/* Secrets pass through this connection (a login): every buffer holding
 * its bytes, read or written, is wiped before it is freed or reused. */
void ms_conn_set_wipe(struct ms_conn *conn, int wipe);

/* Stops / restarts delivering on_read (backpressure). */
void ms_conn_read_pause(struct ms_conn *conn, int paused);

/* Starts the TLS handshake on a plaintext connection (after the server's
 * STARTTLS/STLS go-ahead). done is called once with status 0, or non-zero
 * and a reason. Bytes the peer sent after the go-ahead are TLS. */
int ms_conn_starttls(struct ms_conn *conn,
		     void (*done)(struct ms_conn *conn, int status,
				  const char *error));
int ms_conn_is_tls(const struct ms_conn *conn);

/* Addresses of the TCP connection: addr gets "192.0.2.1" or "2001:db8::1"
 * (IPv4-mapped IPv6 addresses as IPv4), port the port; either may be NULL.
 * The local address of an accepted connection is the one the client
 * connected to (under TPROXY: the original destination). Returns 0 or a
 * negative libuv error (UV_ENOTCONN while an outgoing connection has no
 * socket; ask early, a reset connection may not have addresses any more). */
int ms_conn_peer_addr(const struct ms_conn *conn, char *addr, size_t addrsz,
		      uint16_t *port);
int ms_conn_local_addr(const struct ms_conn *conn, char *addr, size_t addrsz,
		       uint16_t *port);

/* The socket, for a look at its options (tests); -1 when there is none. */
int ms_conn_fileno(const struct ms_conn *conn);

void *ms_conn_ctx(const struct ms_conn *conn);

/* Closes the connection: no callback is called after this returns, memory
 * is released once libuv has closed the handle. What was written in this
 * loop turn (a BYE, the reply to LOGOUT) is sent first if the socket takes
 * it at once, and a TLS connection says close_notify: best effort, for last
 * words, not for bulk data still queued. Sets *conn to NULL. Accepts NULL
 * and *conn == NULL. */
void ms_conn_close(struct ms_conn **conn);

/* ---- server side ------------------------------------------------------- */

/* A certificate and key to serve TLS with (an SSL_CTX: TLS 1.2 and up, no
 * compression, no renegotiation, session tickets but no server-side session
 * cache). */
struct ms_tls_server;

/* Loads a PEM certificate chain (the server's certificate first) and its
 * private key (unencrypted). The key file must be readable by its owner only
 * (mode & 077 == 0). Returns 0, or -1 with err filled ("key file K has mode
 * 0644: ..."). */
int ms_tls_server_new(const char *cert_file, const char *key_file,
		      struct ms_tls_server **srv_r, char *err, size_t errsz);
/* Connections already using it keep what they need. Sets *srv to NULL;
 * accepts NULL and *srv == NULL. */
void ms_tls_server_free(struct ms_tls_server **srv);

/* Accepts one pending connection on a listening libuv stream (call it from
 * the stream's connection callback). tls == NULL: plaintext, on_connect
 * follows on the next loop turn with status 0 (nothing is read before it);
 * else implicit TLS: the server handshake runs first and on_connect reports
 * its result (a client that does not speak TLS gets "TLS error: ..."; a
 * client that says nothing is the caller's to time out). Afterwards the
 * connection works like an outgoing one. Returns 0 and the connection, or a
 * negative libuv error (no callback; the client's connection, if accepted,
 * is closed). */
int ms_conn_accept(uv_stream_t *listener, struct ms_tls_server *tls,
		   const struct ms_conn_callbacks *cb, struct ms_conn **conn_r);

/* Accepts one pending connection and closes it at once (no memory for a
 * session, or over a limit with nothing to say). */
void ms_drop_connection(uv_stream_t *listener);

/* Closes a libuv handle and, once libuv is done with it, frees mem: the
 * handle itself, or the struct it is a member of. (h->data is reused for
 * that: nothing may call back into the handle after this.) */
void ms_close_free(uv_handle_t *h, void *mem);

/* Server-side STARTTLS/STLS on an accepted plaintext connection: call it
 * right after writing the go-ahead ("OK Begin TLS now"); what was written
 * before goes out in plaintext, ahead of the handshake, and everything
 * written after is sent encrypted once the handshake is done. Bytes the
 * client sent before this call were plaintext (delivered to on_read; a
 * caller defending against STARTTLS command injection drops what followed
 * the command). done as for ms_conn_starttls. */
int ms_conn_starttls_server(struct ms_conn *conn, struct ms_tls_server *tls,
			    void (*done)(struct ms_conn *conn, int status,
					 const char *error));

/* Binds tcp (uninitialized; initialized here) to "ADDR:PORT" or
 * "[IPV6]:PORT", numeric (an IPv6 listener is IPv6-only: list 0.0.0.0 too
 * for IPv4), with SO_REUSEADDR, and listens (backlog 511) with cb.
 * transparent: sets IP_TRANSPARENT / IPV6_TRANSPARENT, for TPROXY (needs
 * CAP_NET_ADMIN). tcp->data is kept. Returns 0, or a negative libuv error
 * with err filled ("bind 127.0.0.1:143: address already in use"); then tcp
 * was not initialized and may be freed at once. (Except if libuv refused
 * the new listening socket, which it does not do in practice: then tcp is
 * being closed, uv_close without callback, and err starts with "listen ".) */
int ms_listen(uv_loop_t *loop, uv_tcp_t *tcp, const char *addrport,
	      int transparent, uv_connection_cb cb, char *err, size_t errsz);

/* ms_listen's second half: tcp (uninitialized) takes fd, a socket that is
 * already bound (and may already listen), and listens with cb. fd is the
 * handle's from then on (closed on failure too). addrport names it in err. */
int ms_listen_fd(uv_loop_t *loop, uv_tcp_t *tcp, int fd, const char *addrport,
		 uv_connection_cb cb, char *err, size_t errsz);

/* "ADDR:PORT" or "[IPV6]:PORT", numeric, into ss: 0, or UV_EINVAL. */
struct sockaddr_storage;
int ms_addrport_parse(const char *s, struct sockaddr_storage *ss);

#endif
