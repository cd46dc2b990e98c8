/* Outgoing TCP connections on libuv, optionally with TLS over memory BIOs.
 *
 * Lifetime: a connection is reference counted. The caller holds one
 * reference (dropped by ms_conn_close), and so does every libuv object that
 * may still call back into it: the TCP handle (until its close callback),
 * the idle handle, the getaddrinfo and connect requests and every write
 * request. Memory is released when the last of them is gone, so libuv
 * callbacks arriving after ms_conn_close (cancelled writes, a cancelled
 * connect, a getaddrinfo that could not be cancelled) always find valid
 * memory and, seeing `closing`, only drop their reference.
 *
 * TLS: one SSL per connection over two memory BIOs. Ciphertext read from the
 * socket is written into rbio; whatever OpenSSL puts into wbio is handed to
 * uv_write. Plaintext written before the connection (or the TLS handshake)
 * is ready waits in plainq and is sent, in order, as soon as it is.
 *
 * Work that must not run inside an API call (callbacks may never be called
 * synchronously) is deferred to the idle handle: starting a STARTTLS
 * handshake, delivering TLS data buffered while reading was paused, and
 * reporting errors detected inside an API call.
 */
#include "net.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define READ_BUF_SIZE (64 * 1024)
/* Largest chunk handed to one uv_write / SSL_write call. */
#define WRITE_CHUNK (1024 * 1024)
#define ERR_TEXT_SIZE 512
/* Queued output beyond this is sent at once rather than at the end of the
 * loop turn. */
#define FLUSH_THRESHOLD (64 * 1024)

enum tls_state {
	TLS_OFF,		/* plaintext */
	TLS_HANDSHAKE,		/* handshake in progress */
	TLS_ACTIVE,		/* handshake done, data flows encrypted */
};

struct write_req {
	uv_write_t req;
	struct ms_conn *conn;
	size_t len;
	char data[];
};

struct ms_conn {
	uv_loop_t *loop;
	struct ms_conn_callbacks cb;
	unsigned int refs;

	char *host;
	char *name;		/* SNI and checked name: server_name or host */
	char *ca_file;
	uint16_t port;
	enum ms_tls_mode mode;
	int insecure;

	uv_getaddrinfo_t gai;
	struct addrinfo *ai;	/* resolved list, freed once connected */
	struct addrinfo *ai_next; /* next address to try */
	int last_connect_err;
	uv_connect_t connect_req;
	uv_tcp_t *tcp;		/* current socket, NULL between attempts */
	uv_idle_t idle;

	unsigned int resolving:1;
	unsigned int connected:1;	/* TCP connected */
	unsigned int connect_reported:1; /* on_connect has been called */
	unsigned int reading:1;		/* uv_read_start is in effect */
	unsigned int paused:1;		/* the caller paused on_read */
	unsigned int eof:1;		/* the peer closed its side */
	unsigned int failed:1;		/* an error has been reported */
	unsigned int closing:1;		/* ms_conn_close was called */
	unsigned int over_high:1;	/* pending reached MS_CONN_HIGH_WATER */
	unsigned int idle_handshake:1;	/* deferred: start STARTTLS handshake */
	unsigned int idle_drain:1;	/* deferred: deliver held TLS data */
	unsigned int idle_fail:1;	/* deferred: report deferred_err */
	unsigned int idle_flush:1;	/* deferred: send plainq */

	int deferred_status;
	char deferred_err[ERR_TEXT_SIZE];

	char *rbuf;		/* READ_BUF_SIZE, reused for every read */

	/* Plaintext not yet sendable (not connected, or TLS handshaking). */
	char *plainq;
	size_t plainq_len;
	size_t plainq_cap;
	size_t inflight;	/* bytes in uv write requests not completed */

	enum tls_state tls;
	SSL *ssl;
	BIO *rbio;		/* network -> SSL (owned by ssl) */
	BIO *wbio;		/* SSL -> network (owned by ssl) */
	void (*starttls_done)(struct ms_conn *conn, int status,
			      const char *error);
};

/* ---- SSL_CTX cache ---------------------------------------------------- */

struct ctx_entry {
	struct ctx_entry *next;
	char *ca_file;		/* NULL: default paths */
	int insecure;
	SSL_CTX *ctx;
};

static pthread_mutex_t ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ctx_entry *ctx_cache;

static void ssl_err_text(char *buf, size_t size)
{
	unsigned long e = ERR_get_error();
	const char *reason;

	if (e == 0) {
		snprintf(buf, size, "unknown error");
		return;
	}
	reason = ERR_reason_error_string(e);
	if (reason)
		snprintf(buf, size, "%s", reason);
	else
		ERR_error_string_n(e, buf, size);
	ERR_clear_error();
}

static SSL_CTX *ctx_create(const char *ca_file, int insecure, char *err,
			   size_t errlen)
{
	char why[256];
	SSL_CTX *ctx;

	ERR_clear_error();
	ctx = SSL_CTX_new(TLS_client_method());
	if (!ctx) {
		ssl_err_text(why, sizeof(why));
		snprintf(err, errlen, "TLS error: cannot create context: %s",
			 why);
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION |
				 SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	if (insecure) {
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
		return ctx;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	if (ca_file) {
		if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
			ssl_err_text(why, sizeof(why));
			snprintf(err, errlen,
				 "TLS error: cannot load CA file %s: %s",
				 ca_file, why);
			SSL_CTX_free(ctx);
			return NULL;
		}
	} else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
		ssl_err_text(why, sizeof(why));
		snprintf(err, errlen,
			 "TLS error: cannot load the default CA paths: %s",
			 why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

/* Returns the shared context for (ca_file, insecure); the cache keeps it
 * for the life of the process (each SSL holds its own reference too).
 * Failures are not cached, so a CA file fixed later is picked up. */
static SSL_CTX *ctx_get(const char *ca_file, int insecure, char *err,
			size_t errlen)
{
	struct ctx_entry *e;
	SSL_CTX *ctx = NULL;

	if (insecure)
		ca_file = NULL;	/* nothing is verified: no CA to load */

	pthread_mutex_lock(&ctx_lock);
	for (e = ctx_cache; e; e = e->next) {
		if (e->insecure != insecure)
			continue;
		if ((!e->ca_file && !ca_file) ||
		    (e->ca_file && ca_file && !strcmp(e->ca_file, ca_file))) {
			ctx = e->ctx;
			break;
		}
	}
	if (!ctx && (ctx = ctx_create(ca_file, insecure, err, errlen))) {
		e = calloc(1, sizeof(*e));
		if (e && (!ca_file || (e->ca_file = strdup(ca_file)))) {
			e->insecure = insecure;
			e->ctx = ctx;
			e->next = ctx_cache;
			ctx_cache = e;
		} else {
			free(e);
			SSL_CTX_free(ctx);
			ctx = NULL;
			snprintf(err, errlen, "TLS error: out of memory");
		}
	}
	pthread_mutex_unlock(&ctx_lock);
	return ctx;
}

/* ---- lifetime ---------------------------------------------------------- */

static void conn_free(struct ms_conn *conn)
{
	if (conn->ssl)
		SSL_free(conn->ssl);	/* frees rbio and wbio too */
	if (conn->ai)
		uv_freeaddrinfo(conn->ai);
	free(conn->rbuf);
	free(conn->plainq);
	if (conn->name != conn->host)
		free(conn->name);
	free(conn->host);
	free(conn->ca_file);
	free(conn);
}

static void conn_unref(struct ms_conn *conn)
{
	if (--conn->refs == 0)
		conn_free(conn);
}

static void on_tcp_close(uv_handle_t *handle)
{
	struct ms_conn *conn = handle->data;

	free(handle);
	conn_unref(conn);
}

static void on_idle_close(uv_handle_t *handle)
{
	conn_unref(handle->data);
}

static void close_tcp(struct ms_conn *conn)
{
	if (!conn->tcp)
		return;
	if (conn->reading)
		uv_read_stop((uv_stream_t *)conn->tcp);
	conn->reading = 0;
	uv_close((uv_handle_t *)conn->tcp, on_tcp_close);
	conn->tcp = NULL;
}

/* ---- error reporting --------------------------------------------------- */

/* Reports the first failure of the connection to whoever waits: on_connect
 * while connecting, the STARTTLS done callback during that handshake,
 * on_error otherwise. Only called from libuv callbacks. */
static void fail(struct ms_conn *conn, int status, const char *error)
{
	void (*done)(struct ms_conn *, int, const char *);

	if (conn->closing || conn->failed)
		return;
	conn->failed = 1;
	if (conn->reading) {
		uv_read_stop((uv_stream_t *)conn->tcp);
		conn->reading = 0;
	}
	if (status >= 0)
		status = UV_EPROTO;
	if (!conn->connect_reported) {
		conn->connect_reported = 1;
		conn->cb.on_connect(conn, status, error);
	} else if (conn->starttls_done) {
		done = conn->starttls_done;
		conn->starttls_done = NULL;
		done(conn, status, error);
	} else if (conn->cb.on_error) {
		conn->cb.on_error(conn, error);
	}
}

static void on_idle(uv_idle_t *idle);

static void schedule_idle(struct ms_conn *conn)
{
	if (!conn->closing)
		uv_idle_start(&conn->idle, on_idle);
}

/* The same failure, reported from the loop (for errors found inside an API
 * call, which must not call back synchronously). */
static void fail_later(struct ms_conn *conn, int status, const char *error)
{
	if (conn->closing || conn->failed || conn->idle_fail)
		return;
	conn->idle_fail = 1;
	conn->deferred_status = status;
	snprintf(conn->deferred_err, sizeof(conn->deferred_err), "%s", error);
	schedule_idle(conn);
}

/* ---- writing ----------------------------------------------------------- */

static void check_drain(struct ms_conn *conn);

static size_t pending(const struct ms_conn *conn)
{
	return conn->inflight + conn->plainq_len;
}

static void note_pending(struct ms_conn *conn)
{
	if (pending(conn) >= MS_CONN_HIGH_WATER)
		conn->over_high = 1;
}

static void on_write(uv_write_t *req, int status)
{
	struct write_req *wr = req->data;
	struct ms_conn *conn = wr->conn;
	char err[ERR_TEXT_SIZE];

	conn->inflight -= wr->len;
	free(wr);
	if (!conn->closing) {
		if (status < 0) {
			snprintf(err, sizeof(err), "write error: %s",
				 uv_strerror(status));
			fail(conn, status, err);
		} else {
			check_drain(conn);
		}
	}
	conn_unref(conn);
}

static void check_drain(struct ms_conn *conn)
{
	if (conn->over_high && !conn->failed &&
	    pending(conn) <= MS_CONN_LOW_WATER) {
		conn->over_high = 0;
		if (conn->cb.on_drain)
			conn->cb.on_drain(conn);
	}
}

/* Hands wr (len bytes filled in) to uv_write; takes ownership of wr. */
static int submit_write(struct ms_conn *conn, struct write_req *wr)
{
	uv_buf_t buf = uv_buf_init(wr->data, (unsigned int)wr->len);
	int r;

	wr->conn = conn;
	wr->req.data = wr;
	r = uv_write(&wr->req, (uv_stream_t *)conn->tcp, &buf, 1, on_write);
	if (r < 0) {
		free(wr);
		return r;
	}
	conn->refs++;
	conn->inflight += wr->len;
	note_pending(conn);
	return 0;
}

static int write_raw(struct ms_conn *conn, const char *data, size_t len)
{
	struct write_req *wr;
	size_t n;
	int r;

	while (len > 0) {
		n = len < WRITE_CHUNK ? len : WRITE_CHUNK;
		wr = malloc(sizeof(*wr) + n);
		if (!wr)
			return UV_ENOMEM;
		memcpy(wr->data, data, n);
		wr->len = n;
		r = submit_write(conn, wr);
		if (r < 0)
			return r;
		data += n;
		len -= n;
	}
	return 0;
}

/* Sends whatever OpenSSL has produced. */
static int flush_wbio(struct ms_conn *conn)
{
	struct write_req *wr;
	size_t n, got;
	int r;

	while ((n = BIO_ctrl_pending(conn->wbio)) > 0) {
		if (n > WRITE_CHUNK)
			n = WRITE_CHUNK;
		wr = malloc(sizeof(*wr) + n);
		if (!wr)
			return UV_ENOMEM;
		if (BIO_read_ex(conn->wbio, wr->data, n, &got) != 1 ||
		    got == 0) {
			free(wr);
			return UV_EIO;
		}
		wr->len = got;
		r = submit_write(conn, wr);
		if (r < 0)
			return r;
	}
	return 0;
}

static int plainq_append(struct ms_conn *conn, const char *data, size_t len)
{
	size_t cap;
	char *p;

	if (conn->plainq_len + len > conn->plainq_cap) {
		cap = conn->plainq_cap ? conn->plainq_cap : 4096;
		while (cap < conn->plainq_len + len)
			cap *= 2;
		p = realloc(conn->plainq, cap);
		if (!p)
			return UV_ENOMEM;
		conn->plainq = p;
		conn->plainq_cap = cap;
	}
	memcpy(conn->plainq + conn->plainq_len, data, len);
	conn->plainq_len += len;
	return 0;
}

static void plainq_consume(struct ms_conn *conn, size_t n)
{
	conn->plainq_len -= n;
	if (conn->plainq_len > 0) {
		memmove(conn->plainq, conn->plainq + n, conn->plainq_len);
	} else if (conn->plainq_cap > READ_BUF_SIZE) {
		/* don't keep a big burst's buffer around */
		free(conn->plainq);
		conn->plainq = NULL;
		conn->plainq_cap = 0;
	}
}

static void tls_error_text(struct ms_conn *conn, int ssl_err, char *buf,
			   size_t size)
{
	char why[256];
	long vr;

	if (conn->tls == TLS_HANDSHAKE && !conn->insecure) {
		vr = SSL_get_verify_result(conn->ssl);
		if (vr != X509_V_OK) {
			snprintf(buf, size, "certificate verify failed: %s",
				 X509_verify_cert_error_string(vr));
			ERR_clear_error();
			return;
		}
	}
	if (ERR_peek_error()) {
		ssl_err_text(why, sizeof(why));
		snprintf(buf, size, "TLS error: %s", why);
	} else if (ssl_err == SSL_ERROR_ZERO_RETURN) {
		snprintf(buf, size, "TLS error: connection closed by server");
	} else {
		snprintf(buf, size, "TLS error: %s (SSL error %d)",
			 ssl_err == SSL_ERROR_SYSCALL ? "I/O error" :
			 "protocol error", ssl_err);
	}
}

/* Encrypts as much of plainq as OpenSSL takes. Returns 0, or a negative
 * error with *error filled in. */
static int tls_write_plainq(struct ms_conn *conn, char *error, size_t size)
{
	size_t n, done = 0, wrote;
	int r, e;

	while (done < conn->plainq_len) {
		n = conn->plainq_len - done;
		if (n > WRITE_CHUNK)
			n = WRITE_CHUNK;
		ERR_clear_error();
		r = SSL_write_ex(conn->ssl, conn->plainq + done, n, &wrote);
		if (r == 1) {
			done += wrote;
			continue;
		}
		e = SSL_get_error(conn->ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
			break;	/* retried after the next read */
		tls_error_text(conn, e, error, size);
		plainq_consume(conn, done);
		return UV_EPROTO;
	}
	plainq_consume(conn, done);
	r = flush_wbio(conn);
	if (r < 0)
		snprintf(error, size, "write error: %s", uv_strerror(r));
	return r;
}

/* Sends plainq now that the connection (and TLS, if any) is ready. */
static int flush_plainq(struct ms_conn *conn, char *error, size_t size)
{
	int r;

	if (conn->tls == TLS_ACTIVE)
		return tls_write_plainq(conn, error, size);
	if (conn->plainq_len == 0)
		return 0;
	r = write_raw(conn, conn->plainq, conn->plainq_len);
	plainq_consume(conn, conn->plainq_len);
	if (r < 0)
		snprintf(error, size, "write error: %s", uv_strerror(r));
	return r;
}

int ms_conn_write(struct ms_conn *conn, const void *data, size_t len)
{
	char err[ERR_TEXT_SIZE];
	int r;

	if (!conn || (!data && len))
		return UV_EINVAL;
	if (conn->closing || conn->failed)
		return UV_ENOTCONN;
	if (len == 0)
		return 0;
	/* Everything goes through plainq: writes made in one turn of the
	 * loop leave in one uv_write (or one run of TLS records) when the
	 * turn ends, not one system call per command piece. Under TLS this
	 * also keeps plaintext held back by OpenSSL in order. */
	r = plainq_append(conn, data, len);
	if (r < 0)
		return r;
	if (conn->connected && conn->tls != TLS_HANDSHAKE) {
		if (conn->plainq_len >= FLUSH_THRESHOLD) {
			r = flush_plainq(conn, err, sizeof(err));
			if (r < 0) {
				fail_later(conn, r, err);
				return r;
			}
		} else if (!conn->idle_flush) {
			conn->idle_flush = 1;
			schedule_idle(conn);
		}
	}
	note_pending(conn);
	return 0;
}

size_t ms_conn_write_pending(const struct ms_conn *conn)
{
	return conn ? pending(conn) : 0;
}

/* ---- reading ----------------------------------------------------------- */

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
	struct ms_conn *conn = handle->data;

	if (!conn->rbuf)
		conn->rbuf = malloc(READ_BUF_SIZE);
	*buf = uv_buf_init(conn->rbuf, conn->rbuf ? READ_BUF_SIZE : 0);
}

static void on_tcp_read(uv_stream_t *stream, ssize_t nread,
			const uv_buf_t *buf);

/* Reads from the socket when the caller wants data, or while a TLS
 * handshake needs the peer's bytes (no on_read happens during it). */
static void update_reading(struct ms_conn *conn)
{
	char err[ERR_TEXT_SIZE];
	int want, r;

	want = conn->tcp && conn->connected && !conn->closing &&
	       !conn->failed && !conn->eof &&
	       (!conn->paused || conn->tls == TLS_HANDSHAKE);
	if (want && !conn->reading) {
		r = uv_read_start((uv_stream_t *)conn->tcp, on_alloc,
				  on_tcp_read);
		if (r < 0) {
			snprintf(err, sizeof(err), "read error: %s",
				 uv_strerror(r));
			fail_later(conn, r, err);
			return;
		}
		conn->reading = 1;
	} else if (!want && conn->reading) {
		uv_read_stop((uv_stream_t *)conn->tcp);
		conn->reading = 0;
	}
}

static void tls_handshake(struct ms_conn *conn);

static void tls_fail(struct ms_conn *conn, int ssl_err)
{
	char err[ERR_TEXT_SIZE];

	tls_error_text(conn, ssl_err, err, sizeof(err));
	/* best effort: let the alert OpenSSL queued reach the peer */
	flush_wbio(conn);
	fail(conn, UV_EPROTO, err);
}

/* Delivers decrypted data until OpenSSL needs more input (returns 1), or
 * the caller paused, closed, or the connection failed (returns 0). */
static int tls_read_loop(struct ms_conn *conn)
{
	size_t n;
	int r, e;

	while (!conn->paused && !conn->closing && !conn->failed) {
		if (!conn->rbuf && !(conn->rbuf = malloc(READ_BUF_SIZE))) {
			fail(conn, UV_ENOMEM, "read error: out of memory");
			return 0;
		}
		ERR_clear_error();
		r = SSL_read_ex(conn->ssl, conn->rbuf, READ_BUF_SIZE, &n);
		if (r == 1) {
			conn->cb.on_read(conn, conn->rbuf, n);
			continue;
		}
		e = SSL_get_error(conn->ssl, r);
		if (e == SSL_ERROR_WANT_READ)
			return 1;
		if (e == SSL_ERROR_ZERO_RETURN)
			fail(conn, UV_EOF, "connection closed by server");
		else
			tls_fail(conn, e);
		return 0;
	}
	return 0;
}

/* After new ciphertext arrived (or reading resumed): deliver plaintext,
 * send what OpenSSL wants sent, retry plaintext it held back, notice EOF. */
static void tls_pump(struct ms_conn *conn)
{
	char err[ERR_TEXT_SIZE];
	int drained, r;

	drained = tls_read_loop(conn);
	if (conn->closing || conn->failed)
		return;
	r = tls_write_plainq(conn, err, sizeof(err));
	if (r < 0) {
		fail(conn, r, err);
		return;
	}
	if (drained && conn->eof)
		fail(conn, UV_EOF, "connection closed by server");
}

static void on_tcp_read(uv_stream_t *stream, ssize_t nread,
			const uv_buf_t *buf)
{
	struct ms_conn *conn = stream->data;
	char err[ERR_TEXT_SIZE];
	size_t w;

	if (conn->closing || conn->failed || nread == 0)
		return;
	if (nread < 0) {
		if (nread != UV_EOF) {
			snprintf(err, sizeof(err), "read error: %s",
				 uv_strerror((int)nread));
			fail(conn, (int)nread, err);
			return;
		}
		conn->eof = 1;
		update_reading(conn);
		if (conn->tls == TLS_HANDSHAKE)
			fail(conn, UV_EOF, "TLS error: connection closed by "
			     "server during the handshake");
		else if (conn->tls == TLS_ACTIVE)
			tls_pump(conn);	/* may still hold data; then EOF */
		else
			fail(conn, UV_EOF, "connection closed by server");
		return;
	}
	if (conn->tls == TLS_OFF) {
		conn->cb.on_read(conn, buf->base, (size_t)nread);
		return;
	}
	if (BIO_write_ex(conn->rbio, buf->base, (size_t)nread, &w) != 1 ||
	    w != (size_t)nread) {
		fail(conn, UV_ENOMEM, "TLS error: out of memory");
		return;
	}
	if (conn->tls == TLS_HANDSHAKE)
		tls_handshake(conn);
	else
		tls_pump(conn);
}

void ms_conn_read_pause(struct ms_conn *conn, int paused)
{
	if (!conn || conn->closing)
		return;
	conn->paused = paused ? 1 : 0;
	update_reading(conn);
	if (!paused && conn->tls == TLS_ACTIVE && !conn->failed) {
		/* OpenSSL may hold decrypted data (or the EOF) that arrived
		 * while paused: deliver it from the loop, not from here */
		conn->idle_drain = 1;
		schedule_idle(conn);
	}
}

/* ---- TLS --------------------------------------------------------------- */

static int is_ip_literal(const char *name)
{
	unsigned char addr[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, name, addr) == 1 ||
	       inet_pton(AF_INET6, name, addr) == 1;
}

/* Creates the SSL object; returns 0 or a negative error with err set. */
static int tls_setup(struct ms_conn *conn, char *err, size_t errlen)
{
	char why[256];
	SSL_CTX *ctx;
	BIO *rbio, *wbio;
	int ip;

	ctx = ctx_get(conn->ca_file, conn->insecure, err, errlen);
	if (!ctx)
		return UV_EINVAL;
	ERR_clear_error();
	conn->ssl = SSL_new(ctx);
	rbio = BIO_new(BIO_s_mem());
	wbio = BIO_new(BIO_s_mem());
	if (!conn->ssl || !rbio || !wbio) {
		BIO_free(rbio);
		BIO_free(wbio);
		goto fail;
	}
	/* an empty rbio means "wait for more", not EOF */
	BIO_set_mem_eof_return(rbio, -1);
	SSL_set_bio(conn->ssl, rbio, wbio);	/* ssl owns both now */
	conn->rbio = rbio;
	conn->wbio = wbio;
	SSL_set_connect_state(conn->ssl);

	ip = is_ip_literal(conn->name);
	/* RFC 6066: no IP literals in SNI */
	if (!ip && SSL_set_tlsext_host_name(conn->ssl, conn->name) != 1)
		goto fail;
	if (!conn->insecure) {
		if (ip) {
			if (X509_VERIFY_PARAM_set1_ip_asc(
				    SSL_get0_param(conn->ssl), conn->name) != 1)
				goto fail;
		} else {
			SSL_set_hostflags(conn->ssl,
					  X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
			if (SSL_set1_host(conn->ssl, conn->name) != 1)
				goto fail;
		}
	}
	return 0;
fail:
	ssl_err_text(why, sizeof(why));
	snprintf(err, errlen, "TLS error: cannot set up a session for %s: %s",
		 conn->name, why);
	SSL_free(conn->ssl);
	conn->ssl = NULL;
	conn->rbio = conn->wbio = NULL;
	return UV_EINVAL;
}

static void tls_handshake_done(struct ms_conn *conn)
{
	void (*done)(struct ms_conn *, int, const char *);
	char err[ERR_TEXT_SIZE];
	int r;

	conn->tls = TLS_ACTIVE;
	update_reading(conn);
	r = tls_write_plainq(conn, err, sizeof(err));
	if (r < 0) {
		fail(conn, r, err);
		return;
	}
	if (!conn->connect_reported) {
		conn->connect_reported = 1;
		conn->cb.on_connect(conn, 0, NULL);
	} else if (conn->starttls_done) {
		done = conn->starttls_done;
		conn->starttls_done = NULL;
		done(conn, 0, NULL);
	}
	if (conn->closing || conn->failed)
		return;
	/* application data may have come in with the last handshake flight */
	tls_pump(conn);
}

static void tls_handshake(struct ms_conn *conn)
{
	char err[ERR_TEXT_SIZE];
	int r, e, fr;

	ERR_clear_error();
	r = SSL_do_handshake(conn->ssl);
	e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(conn->ssl, r);
	if (r != 1 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
		tls_fail(conn, e);
		return;
	}
	fr = flush_wbio(conn);
	if (fr < 0) {
		snprintf(err, sizeof(err), "write error: %s", uv_strerror(fr));
		fail(conn, fr, err);
		return;
	}
	if (r == 1)
		tls_handshake_done(conn);
	else if (conn->eof)
		fail(conn, UV_EOF, "TLS error: connection closed by server "
		     "during the handshake");
}

/* Starts TLS on the connected socket (implicit TLS). */
static void tls_start(struct ms_conn *conn)
{
	char err[ERR_TEXT_SIZE];
	int r;

	r = tls_setup(conn, err, sizeof(err));
	if (r < 0) {
		fail(conn, r, err);
		return;
	}
	conn->tls = TLS_HANDSHAKE;
	update_reading(conn);
	tls_handshake(conn);
}

int ms_conn_starttls(struct ms_conn *conn,
		     void (*done)(struct ms_conn *conn, int status,
				  const char *error))
{
	char err[ERR_TEXT_SIZE];
	int r;

	if (!conn || !done)
		return UV_EINVAL;
	if (conn->closing || conn->failed || !conn->connected)
		return UV_ENOTCONN;
	if (conn->tls != TLS_OFF || conn->starttls_done)
		return UV_EALREADY;
	conn->starttls_done = done;
	r = tls_setup(conn, err, sizeof(err));
	if (r < 0) {
		/* done(conn, -1, err) follows from the loop */
		fail_later(conn, r, err);
		return 0;
	}
	/* From now on writes wait in plainq until the handshake is done and
	 * incoming bytes feed the handshake. The ClientHello is sent from the
	 * loop, so that no failure can call done synchronously. */
	conn->tls = TLS_HANDSHAKE;
	update_reading(conn);
	conn->idle_handshake = 1;
	schedule_idle(conn);
	return 0;
}

int ms_conn_is_tls(const struct ms_conn *conn)
{
	return conn && conn->tls != TLS_OFF;
}

void *ms_conn_ctx(const struct ms_conn *conn)
{
	return conn ? conn->cb.ctx : NULL;
}

/* ---- deferred work ----------------------------------------------------- */

static void on_idle(uv_idle_t *idle)
{
	struct ms_conn *conn = idle->data;

	uv_idle_stop(idle);
	if (conn->closing)
		return;
	if (conn->idle_fail) {
		conn->idle_fail = 0;
		fail(conn, conn->deferred_status, conn->deferred_err);
		return;
	}
	if (conn->idle_handshake) {
		conn->idle_handshake = 0;
		if (conn->tls == TLS_HANDSHAKE)
			tls_handshake(conn);
		if (conn->closing || conn->failed)
			return;
	}
	if (conn->idle_drain) {
		conn->idle_drain = 0;
		if (conn->tls == TLS_ACTIVE && !conn->failed)
			tls_pump(conn);
		if (conn->closing || conn->failed)
			return;
	}
	if (conn->idle_flush) {
		char err[ERR_TEXT_SIZE];

		conn->idle_flush = 0;
		if (conn->connected && conn->tls != TLS_HANDSHAKE &&
		    flush_plainq(conn, err, sizeof(err)) < 0)
			fail(conn, UV_EIO, err);
	}
}

/* ---- connecting -------------------------------------------------------- */

static void connect_error_text(struct ms_conn *conn, int status, char *buf,
			       size_t size)
{
	const char *fmt = strchr(conn->host, ':') ? "connect to [%s]:%u: %s" :
						    "connect to %s:%u: %s";

	snprintf(buf, size, fmt, conn->host, conn->port, uv_strerror(status));
}

static void on_tcp_connect(uv_connect_t *req, int status);

/* Tries the remaining resolved addresses, one socket per attempt. */
static void try_next_address(struct ms_conn *conn)
{
	char err[ERR_TEXT_SIZE];
	struct addrinfo *ai;
	uv_tcp_t *tcp;
	int r;

	while ((ai = conn->ai_next)) {
		conn->ai_next = ai->ai_next;
		if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
			continue;
		tcp = malloc(sizeof(*tcp));
		if (!tcp) {
			conn->last_connect_err = UV_ENOMEM;
			break;
		}
		r = uv_tcp_init(conn->loop, tcp);
		if (r < 0) {
			free(tcp);
			conn->last_connect_err = r;
			continue;
		}
		tcp->data = conn;
		conn->tcp = tcp;
		conn->refs++;
		uv_tcp_nodelay(tcp, 1);
		r = uv_tcp_connect(&conn->connect_req, tcp, ai->ai_addr,
				   on_tcp_connect);
		if (r < 0) {
			conn->last_connect_err = r;
			close_tcp(conn);
			continue;
		}
		conn->refs++;
		return;
	}
	connect_error_text(conn, conn->last_connect_err, err, sizeof(err));
	fail(conn, conn->last_connect_err, err);
}

static void on_tcp_connect(uv_connect_t *req, int status)
{
	struct ms_conn *conn = req->data;
	char err[ERR_TEXT_SIZE];
	int r;

	if (conn->closing)
		goto out;
	if (status < 0) {
		conn->last_connect_err = status;
		close_tcp(conn);
		try_next_address(conn);
		goto out;
	}
	uv_freeaddrinfo(conn->ai);
	conn->ai = conn->ai_next = NULL;
	uv_tcp_nodelay(conn->tcp, 1);
	conn->connected = 1;
	if (conn->mode == MS_TLS_IMPLICIT) {
		tls_start(conn);
		goto out;
	}
	r = flush_plainq(conn, err, sizeof(err));
	if (r < 0) {
		fail(conn, r, err);
		goto out;
	}
	update_reading(conn);
	conn->connect_reported = 1;
	conn->cb.on_connect(conn, 0, NULL);
out:
	conn_unref(conn);
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
			struct addrinfo *res)
{
	struct ms_conn *conn = req->data;
	char err[ERR_TEXT_SIZE];

	conn->resolving = 0;
	if (conn->closing) {
		if (res)
			uv_freeaddrinfo(res);
		goto out;
	}
	if (status < 0) {
		connect_error_text(conn, status, err, sizeof(err));
		fail(conn, status, err);
		goto out;
	}
	conn->ai = conn->ai_next = res;
	conn->last_connect_err = UV_EAI_NONAME;	/* if no usable address */
	try_next_address(conn);
out:
	conn_unref(conn);
}

int ms_conn_connect(uv_loop_t *loop, const char *host, uint16_t port,
		    const struct ms_tls_opts *tls,
		    const struct ms_conn_callbacks *cb, struct ms_conn **conn_r)
{
	struct addrinfo hints;
	struct ms_conn *conn;
	char service[8];
	int r;

	if (conn_r)
		*conn_r = NULL;
	if (!loop || !host || !*host || !cb || !cb->on_connect ||
	    !cb->on_read || !conn_r)
		return UV_EINVAL;

	conn = calloc(1, sizeof(*conn));
	if (!conn)
		return UV_ENOMEM;
	conn->loop = loop;
	conn->cb = *cb;
	conn->port = port;
	conn->host = strdup(host);
	if (!conn->host)
		goto nomem;
	conn->name = conn->host;
	if (tls) {
		conn->mode = tls->mode;
		conn->insecure = tls->insecure ? 1 : 0;
		if (tls->server_name && *tls->server_name &&
		    !(conn->name = strdup(tls->server_name)))
			goto nomem;
		if (tls->ca_file && !(conn->ca_file = strdup(tls->ca_file)))
			goto nomem;
	}

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_protocol = IPPROTO_TCP;
	hints.ai_flags = AI_NUMERICSERV;
	snprintf(service, sizeof(service), "%u", port);
	conn->gai.data = conn;
	r = uv_getaddrinfo(loop, &conn->gai, on_resolved, host, service,
			   &hints);
	if (r < 0) {
		conn_free(conn);
		return r;
	}
	conn->resolving = 1;
	conn->connect_req.data = conn;
	uv_idle_init(loop, &conn->idle);
	conn->idle.data = conn;
	/* the caller's, the getaddrinfo request's and the idle handle's */
	conn->refs = 3;
	*conn_r = conn;
	return 0;
nomem:
	conn_free(conn);
	return UV_ENOMEM;
}

void ms_conn_close(struct ms_conn **connp)
{
	struct ms_conn *conn;

	if (!connp || !*connp)
		return;
	conn = *connp;
	*connp = NULL;
	if (conn->closing)
		return;
	conn->closing = 1;
	/* A getaddrinfo that cannot be cancelled any more still calls back;
	 * on_resolved then frees the result and its reference. */
	if (conn->resolving)
		uv_cancel((uv_req_t *)&conn->gai);
	/* Closing the socket cancels an in-flight connect and every queued
	 * write: their callbacks see `closing` and release their references
	 * before (or after) on_tcp_close, in any order. */
	close_tcp(conn);
	uv_close((uv_handle_t *)&conn->idle, on_idle_close);
	conn_unref(conn);
}
