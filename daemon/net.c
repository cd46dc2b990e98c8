/* TCP connections on libuv, outgoing or accepted, optionally with TLS.
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
 * Reading: the socket is read into one buffer per thread, shared by all the
 * connections of its loop (read callbacks never nest and on_read must be
 * done with the data when it returns), so that an idle connection holds no
 * read buffer: thousands of idle gateway sessions must stay cheap.
 *
 * TLS: one SSL per connection over a BIO of our own (conn_bio) that reads
 * ciphertext straight from the shared buffer and appends what OpenSSL writes
 * to the next write request (wout), with no copy in between. Ciphertext that
 * OpenSSL has not taken when the read callback returns (the caller paused)
 * is copied to `held`, the only per-connection input buffer, freed once
 * consumed. SSL_MODE_RELEASE_BUFFERS frees OpenSSL's own buffers between
 * records. Plaintext written before the connection (or the TLS handshake)
 * is ready waits in plainq and is sent, in order, as soon as it is.
 *
 * Accepted connections (the gateway's listeners) run the same code as the
 * server: `server` changes the SSL's role and the wording of errors.
 *
 * Work that must not run inside an API call (callbacks may never be called
 * synchronously) is deferred to the idle handle: starting a STARTTLS
 * handshake, delivering TLS data buffered while reading was paused, and
 * reporting errors detected inside an API call.
 */
#include "net.h"
#include "util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define READ_BUF_SIZE (64 * 1024)
/* SSL_read output: one record's plaintext at most. */
#define PLAIN_BUF_SIZE SSL3_RT_MAX_PLAIN_LENGTH
/* First allocation of a TLS write request; bulk writes reserve more. */
#define WOUT_MIN (4 * 1024)
/* Ciphertext overhead reserved per record (header, IV, MAC or tag,
 * padding): generous, a short estimate only costs a realloc. */
#define RECORD_OVERHEAD 128
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

struct ms_tls_server {
	SSL_CTX *ctx;
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
	struct sockaddr_storage from;	/* ms_conn_set_source(); family 0:
					   this host's own address */
	uint16_t from_not_port;
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
	unsigned int idle_connect:1;	/* deferred: connect to a numeric
					   address (no resolver needed) */
	unsigned int server:1;		/* accepted: we are the TLS server */
	unsigned int accept_pending:1;	/* deferred: plaintext on_connect */
	unsigned int wipe:1;		/* secrets pass: buffers are wiped */

	size_t high_water, low_water;	/* backpressure (on_drain) */

	int deferred_status;
	char deferred_err[ERR_TEXT_SIZE];

	/* Plaintext not yet sendable (not connected, or TLS handshaking). */
	char *plainq;
	size_t plainq_len;
	size_t plainq_cap;
	size_t inflight;	/* bytes in uv write requests not completed */

	enum tls_state tls;
	SSL *ssl;		/* owns its conn_bio */
	/* Ciphertext for OpenSSL to read: in the shared read buffer while a
	 * read callback runs, else in held (or none). */
	const char *in;
	size_t in_len;
	char *held;
	/* Ciphertext from OpenSSL, not yet handed to uv_write. */
	struct write_req *wout;
	size_t wout_cap;
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
	/* a missing file is errno's "No such file or directory", not
	 * "error:80000002:system library::..." */
	if (ERR_SYSTEM_ERROR(e))
		reason = strerror(ERR_GET_REASON(e));
	else
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

/* ---- the shared read buffer ------------------------------------------- */

/* READ_BUF_SIZE for the socket, then PLAIN_BUF_SIZE for SSL_read: under TLS
 * both are in use at once. One per thread, as a loop runs in one thread;
 * freed when the thread ends. */
static pthread_key_t rbuf_key;
static pthread_once_t rbuf_once = PTHREAD_ONCE_INIT;
static int rbuf_key_ok;

static void rbuf_key_create(void)
{
	rbuf_key_ok = pthread_key_create(&rbuf_key, free) == 0;
}

static char *shared_buf(void)
{
	char *buf;

	pthread_once(&rbuf_once, rbuf_key_create);
	if (!rbuf_key_ok)
		return NULL;
	buf = pthread_getspecific(rbuf_key);
	if (!buf && (buf = malloc(READ_BUF_SIZE + PLAIN_BUF_SIZE)) &&
	    pthread_setspecific(rbuf_key, buf) != 0) {
		free(buf);
		buf = NULL;
	}
	return buf;
}

/* ---- conn_bio: OpenSSL's side of the connection ------------------------ */

static int wout_reserve(struct ms_conn *conn, size_t len);

static int cbio_read(BIO *bio, char *out, size_t len, size_t *got)
{
	struct ms_conn *conn = BIO_get_data(bio);

	BIO_clear_retry_flags(bio);
	*got = 0;
	if (conn->in_len == 0) {
		/* "wait for more", never EOF: the socket's EOF is reported
		 * by us, with the right words */
		BIO_set_retry_read(bio);
		return 0;
	}
	if (len > conn->in_len)
		len = conn->in_len;
	memcpy(out, conn->in, len);
	conn->in += len;
	conn->in_len -= len;
	*got = len;
	return 1;
}

static int cbio_write(BIO *bio, const char *data, size_t len, size_t *put)
{
	struct ms_conn *conn = BIO_get_data(bio);

	BIO_clear_retry_flags(bio);
	*put = 0;
	if (wout_reserve(conn, len) < 0)
		return 0;	/* OpenSSL sees an I/O error */
	memcpy(conn->wout->data + conn->wout->len, data, len);
	conn->wout->len += len;
	*put = len;
	return 1;
}

static long cbio_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
	struct ms_conn *conn = BIO_get_data(bio);

	switch (cmd) {
	case BIO_CTRL_FLUSH:
		/* wout leaves at the end of the callback or call that
		 * filled it (flush_wbio), one write for a whole flight */
		return 1;
	case BIO_CTRL_PENDING:
		return (long)conn->in_len;
	default:
		return 0;
	}
}

static int cbio_create(BIO *bio)
{
	BIO_set_init(bio, 1);
	return 1;
}

static BIO_METHOD *cbio_method;
static pthread_once_t cbio_once = PTHREAD_ONCE_INIT;

static void cbio_method_create(void)
{
	BIO_METHOD *m;
	int type = BIO_get_new_index();

	if (type < 0)
		return;
	m = BIO_meth_new(type | BIO_TYPE_SOURCE_SINK, "mailshift conn");
	if (!m)
		return;
	if (BIO_meth_set_read_ex(m, cbio_read) != 1 ||
	    BIO_meth_set_write_ex(m, cbio_write) != 1 ||
	    BIO_meth_set_ctrl(m, cbio_ctrl) != 1 ||
	    BIO_meth_set_create(m, cbio_create) != 1) {
		BIO_meth_free(m);
		return;
	}
	cbio_method = m;	/* kept for the life of the process */
}

/* ---- lifetime ---------------------------------------------------------- */

static void conn_free(struct ms_conn *conn)
{
	if (conn->ssl)
		SSL_free(conn->ssl);	/* frees its conn_bio too */
	if (conn->ai)
		uv_freeaddrinfo(conn->ai);
	if (conn->wipe && conn->plainq)
		OPENSSL_cleanse(conn->plainq, conn->plainq_cap);
	free(conn->held);
	free(conn->wout);
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

/* Who is at the other end, for error texts. */
static const char *peer_role(const struct ms_conn *conn)
{
	return conn->server ? "client" : "server";
}

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
static void try_next_address(struct ms_conn *conn);

static void schedule_idle(struct ms_conn *conn)
{
	if (!conn->closing)
		uv_idle_start(&conn->idle, on_idle);
}

/* The peer closed its side. */
static void fail_eof(struct ms_conn *conn)
{
	char err[96];

	if (conn->tls == TLS_HANDSHAKE)
		snprintf(err, sizeof(err), "TLS error: connection closed by %s "
			 "during the handshake", peer_role(conn));
	else
		snprintf(err, sizeof(err), "connection closed by %s",
			 peer_role(conn));
	fail(conn, UV_EOF, err);
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
	if (pending(conn) >= conn->high_water)
		conn->over_high = 1;
}

static void on_write(uv_write_t *req, int status)
{
	struct write_req *wr = req->data;
	struct ms_conn *conn = wr->conn;
	char err[ERR_TEXT_SIZE];

	conn->inflight -= wr->len;
	if (conn->wipe)
		OPENSSL_cleanse(wr->data, wr->len);
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
	    pending(conn) <= conn->low_water) {
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

/* Makes room for len more bytes of ciphertext in wout. */
static int wout_reserve(struct ms_conn *conn, size_t len)
{
	struct write_req *wr;
	size_t used = conn->wout ? conn->wout->len : 0;
	size_t cap = conn->wout_cap;

	if (conn->wout && used + len <= cap)
		return 0;
	if (!conn->wout) {
		/* a bulk write reserves its size: exactly that */
		cap = len > WOUT_MIN ? len : WOUT_MIN;
	} else {
		while (cap < used + len)
			cap *= 2;
	}
	wr = realloc(conn->wout, sizeof(*wr) + cap);
	if (!wr)
		return UV_ENOMEM;
	wr->len = used;
	conn->wout = wr;
	conn->wout_cap = cap;
	return 0;
}

/* Sends whatever OpenSSL has produced. */
static int flush_wbio(struct ms_conn *conn)
{
	struct write_req *wr = conn->wout;
	int r;

	if (!wr)
		return 0;
	conn->wout = NULL;
	conn->wout_cap = 0;
	if (wr->len == 0 || !conn->tcp) {
		r = wr->len ? UV_ENOTCONN : 0;
		free(wr);
		return r;
	}
	return submit_write(conn, wr);
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
		if (conn->wipe)
			OPENSSL_cleanse(conn->plainq + conn->plainq_len, n);
	} else {
		/* an idle connection keeps no write buffer */
		if (conn->wipe)
			OPENSSL_cleanse(conn->plainq, conn->plainq_cap);
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

	if (conn->tls == TLS_HANDSHAKE && !conn->server && !conn->insecure) {
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
		snprintf(buf, size, "TLS error: connection closed by %s",
			 peer_role(conn));
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
		/* room for the records at once, not a realloc per record */
		if (wout_reserve(conn, n + (n / PLAIN_BUF_SIZE + 1) *
				 RECORD_OVERHEAD) < 0) {
			r = UV_ENOMEM;
			goto write_error;
		}
		ERR_clear_error();
		r = SSL_write_ex(conn->ssl, conn->plainq + done, n, &wrote);
		if (r != 1) {
			e = SSL_get_error(conn->ssl, r);
			if (e == SSL_ERROR_WANT_READ ||
			    e == SSL_ERROR_WANT_WRITE)
				break;	/* retried after the next read */
			tls_error_text(conn, e, error, size);
			plainq_consume(conn, done);
			return UV_EPROTO;
		}
		done += wrote;
		/* one write request per chunk: inflight shrinks as they go */
		r = flush_wbio(conn);
		if (r < 0)
			goto write_error;
	}
	plainq_consume(conn, done);
	r = flush_wbio(conn);
	if (r < 0)
		snprintf(error, size, "write error: %s", uv_strerror(r));
	return r;
write_error:
	plainq_consume(conn, done);
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

int ms_conn_printf(struct ms_conn *conn, const char *fmt, ...)
{
	char buf[2048], *text;
	va_list ap;
	int n, r;

	/* A reply is never cut (a cut line would be a different line). */
	va_start(ap, fmt);
	n = ms_vformat(buf, sizeof(buf), &text, fmt, ap);
	va_end(ap);
	if (n < 0)
		return n == -2 ? UV_ENOMEM : UV_EINVAL;
	r = ms_conn_write(conn, text, (size_t)n);
	if (text != buf)
		free(text);
	return r;
}

size_t ms_conn_write_pending(const struct ms_conn *conn)
{
	return conn ? pending(conn) : 0;
}

int ms_conn_fd(const struct ms_conn *conn)
{
	uv_os_fd_t fd;

	if (conn == NULL || conn->tcp == NULL ||
	    uv_fileno((const uv_handle_t *)conn->tcp, &fd) != 0)
		return -1;
	return fd;
}

int ms_conn_over_high(const struct ms_conn *conn)
{
	return conn && pending(conn) >= conn->high_water;
}

void ms_conn_set_water(struct ms_conn *conn, size_t high, size_t low)
{
	if (!conn)
		return;
	conn->high_water = high ? high : MS_CONN_HIGH_WATER;
	conn->low_water = low ? low : MS_CONN_LOW_WATER;
	note_pending(conn);
}

void ms_conn_set_wipe(struct ms_conn *conn, int wipe)
{
	if (conn)
		conn->wipe = wipe ? 1 : 0;
}

/* ---- reading ----------------------------------------------------------- */

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
	char *rbuf = shared_buf();

	/* no buffer: libuv reports UV_ENOBUFS to on_tcp_read */
	*buf = uv_buf_init(rbuf, rbuf ? READ_BUF_SIZE : 0);
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
	       !conn->failed && !conn->eof && !conn->accept_pending &&
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

/* Makes data (in the shared read buffer) OpenSSL's next input, after what
 * is still held from earlier reads. */
static int tls_input_add(struct ms_conn *conn, const char *data, size_t len)
{
	char *p;

	if (conn->in_len == 0) {
		free(conn->held);
		conn->held = NULL;
		conn->in = data;
		conn->in_len = len;
		return 0;
	}
	p = malloc(conn->in_len + len);
	if (!p)
		return UV_ENOMEM;
	memcpy(p, conn->in, conn->in_len);
	memcpy(p + conn->in_len, data, len);
	free(conn->held);
	conn->held = p;
	conn->in = p;
	conn->in_len += len;
	return 0;
}

/* Before returning to the loop: input OpenSSL has not taken yet (reading
 * was paused) moves out of the shared buffer, which the next read of any
 * connection overwrites; input all taken is let go. */
static void tls_input_keep(struct ms_conn *conn)
{
	char *p;

	if (conn->in_len > 0 && !conn->closing && !conn->failed) {
		if (conn->held)
			return;		/* in points into held already */
		p = malloc(conn->in_len);
		if (p) {
			memcpy(p, conn->in, conn->in_len);
			conn->held = p;
			conn->in = p;
			return;
		}
		fail(conn, UV_ENOMEM, "read error: out of memory");
	}
	free(conn->held);
	conn->held = NULL;
	conn->in = NULL;
	conn->in_len = 0;
}

/* Delivers decrypted data until OpenSSL needs more input (returns 1), or
 * the caller paused, closed, or the connection failed (returns 0). */
static int tls_read_loop(struct ms_conn *conn)
{
	char *out = shared_buf();
	size_t n;
	int r, e;

	if (!out) {
		fail(conn, UV_ENOMEM, "read error: out of memory");
		return 0;
	}
	out += READ_BUF_SIZE;	/* the ciphertext may be in the first part */
	while (!conn->paused && !conn->closing && !conn->failed) {
		ERR_clear_error();
		r = SSL_read_ex(conn->ssl, out, PLAIN_BUF_SIZE, &n);
		if (r == 1) {
			int wipe = conn->wipe;

			conn->cb.on_read(conn, out, n);
			if (wipe)
				OPENSSL_cleanse(out, n);
			continue;
		}
		e = SSL_get_error(conn->ssl, r);
		if (e == SSL_ERROR_WANT_READ)
			return 1;
		if (e == SSL_ERROR_ZERO_RETURN)
			fail_eof(conn);
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
		fail_eof(conn);
}

/* Acknowledges what was just read, now. A peer that writes a command in
 * two pieces without TCP_NODELAY (Nagle) sends the second only when the
 * first is acknowledged; once the kernel takes our connection for a
 * request-reply one (it answered quickly before: "pingpong" mode) it
 * delays that ACK for up to 40 ms, hoping to carry it on a reply. A relay
 * has no reply to give: the bytes go on to the other side. So every read
 * leaves pingpong mode and sends the pending ACK (TCP_QUICKACK is not
 * sticky: the kernel may enter the mode again, hence after every read).
 * Dovecot does the same after each answer. */
static void ack_now(struct ms_conn *conn)
{
	uv_os_fd_t fd;
	int on = 1;

	if (uv_fileno((uv_handle_t *)conn->tcp, &fd) == 0)
		setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &on, sizeof(on));
}

static void on_tcp_read(uv_stream_t *stream, ssize_t nread,
			const uv_buf_t *buf)
{
	struct ms_conn *conn = stream->data;
	char err[ERR_TEXT_SIZE];

	if (conn->closing || conn->failed || nread == 0)
		return;
	if (nread > 0)
		ack_now(conn);
	if (nread < 0) {
		if (nread != UV_EOF) {
			snprintf(err, sizeof(err), "read error: %s",
				 uv_strerror((int)nread));
			fail(conn, (int)nread, err);
			return;
		}
		conn->eof = 1;
		update_reading(conn);
		if (conn->tls == TLS_ACTIVE) {
			tls_pump(conn);	/* may still hold data; then EOF */
			tls_input_keep(conn);
		} else {
			fail_eof(conn);
		}
		return;
	}
	if (conn->tls == TLS_OFF) {
		int wipe = conn->wipe;

		conn->cb.on_read(conn, buf->base, (size_t)nread);
		if (wipe)
			OPENSSL_cleanse(buf->base, (size_t)nread);
		return;
	}
	if (tls_input_add(conn, buf->base, (size_t)nread) < 0) {
		fail(conn, UV_ENOMEM, "TLS error: out of memory");
		return;
	}
	if (conn->tls == TLS_HANDSHAKE)
		tls_handshake(conn);
	else
		tls_pump(conn);
	tls_input_keep(conn);
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

/* Creates conn->ssl from ctx over a conn_bio. Returns 0, or -1 with the
 * reason in OpenSSL's error queue. */
static int tls_new(struct ms_conn *conn, SSL_CTX *ctx)
{
	BIO *bio = NULL;

	pthread_once(&cbio_once, cbio_method_create);
	conn->ssl = SSL_new(ctx);
	if (cbio_method)
		bio = BIO_new(cbio_method);
	if (!conn->ssl || !bio) {
		BIO_free(bio);
		SSL_free(conn->ssl);
		conn->ssl = NULL;
		return -1;
	}
	BIO_set_data(bio, conn);
	/* one BIO both ways, as for a socket; ssl owns it now */
	SSL_set_bio(conn->ssl, bio, bio);
	return 0;
}

/* Creates the client's SSL object; returns 0 or a negative error with err
 * set. */
static int tls_setup(struct ms_conn *conn, char *err, size_t errlen)
{
	char why[256];
	SSL_CTX *ctx;
	int ip;

	ctx = ctx_get(conn->ca_file, conn->insecure, err, errlen);
	if (!ctx)
		return UV_EINVAL;
	ERR_clear_error();
	if (tls_new(conn, ctx) < 0)
		goto fail;
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
	return UV_EINVAL;
}

/* Creates the server's SSL object; returns 0 or a negative error with err
 * set. */
static int tls_setup_server(struct ms_conn *conn, struct ms_tls_server *srv,
			    char *err, size_t errlen)
{
	char why[256];

	ERR_clear_error();
	if (tls_new(conn, srv->ctx) < 0) {
		ssl_err_text(why, sizeof(why));
		snprintf(err, errlen, "TLS error: cannot set up a session: %s",
			 why);
		return UV_ENOMEM;
	}
	SSL_set_accept_state(conn->ssl);
	return 0;
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
		fail_eof(conn);
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

	if (!conn || !done || conn->server)
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

int ms_conn_fileno(const struct ms_conn *conn)
{
	uv_os_fd_t fd;

	if (conn->tcp == NULL ||
	    uv_fileno((const uv_handle_t *)conn->tcp, &fd) < 0)
		return -1;
	return fd;
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
		goto out;
	}
	if (conn->idle_connect) {
		conn->idle_connect = 0;
		try_next_address(conn);
		goto out;
	}
	if (conn->accept_pending) {
		/* reading starts only now: on_connect comes first */
		conn->accept_pending = 0;
		conn->connect_reported = 1;
		update_reading(conn);
		conn->cb.on_connect(conn, 0, NULL);
		if (conn->closing || conn->failed)
			goto out;
	}
	if (conn->idle_handshake) {
		conn->idle_handshake = 0;
		if (conn->tls == TLS_HANDSHAKE)
			tls_handshake(conn);
		if (conn->closing || conn->failed)
			goto out;
	}
	if (conn->idle_drain) {
		conn->idle_drain = 0;
		if (conn->tls == TLS_ACTIVE && !conn->failed)
			tls_pump(conn);
		if (conn->closing || conn->failed)
			goto out;
	}
	if (conn->idle_flush) {
		char err[ERR_TEXT_SIZE];

		conn->idle_flush = 0;
		if (conn->connected && conn->tls != TLS_HANDSHAKE &&
		    flush_plainq(conn, err, sizeof(err)) < 0)
			fail(conn, UV_EIO, err);
	}
out:
	if (conn->ssl)
		tls_input_keep(conn);	/* lets go of held input all taken */
}

/* ---- connecting -------------------------------------------------------- */

static void connect_error_text(struct ms_conn *conn, int status, char *buf,
			       size_t size)
{
	const char *fmt = strchr(conn->host, ':') ? "connect to [%s]:%u%s: %s" :
						    "connect to %s:%u%s: %s";
	const char *from = "";
	char a[INET6_ADDRSTRLEN + 32];

	if (conn->from.ss_family != 0) {
		const void *ip = conn->from.ss_family == AF_INET ?
			(const void *)&((struct sockaddr_in *)&conn->from)->sin_addr :
			(const void *)&((struct sockaddr_in6 *)&conn->from)->sin6_addr;

		memcpy(a, " from ", 6);
		inet_ntop(conn->from.ss_family, ip, a + 6, sizeof(a) - 6);
		from = a;
	}
	snprintf(buf, size, fmt, conn->host, conn->port, from,
		 uv_strerror(status));
}

static void on_tcp_connect(uv_connect_t *req, int status);

static uint16_t sockaddr_port(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ntohs(((const struct sockaddr_in *)ss)->sin_port);
	return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
}

/* A socket of conn->from's family with IP_TRANSPARENT, bound to that
 * foreign address on a port the kernel picks. Not the client's own port:
 * conntrack on this host already follows the client's connection to the
 * same server address and port, and an upstream with the very same four
 * values would be taken for it. A second socket is bound while the first
 * still holds that port, so it gets another. Returns the descriptor or a
 * negative libuv error. */
static int bind_foreign(struct ms_conn *conn)
{
	int fam = conn->from.ss_family, on = 1, fd, old = -1, e = 0;
	socklen_t len = fam == AF_INET ? sizeof(struct sockaddr_in) :
					 sizeof(struct sockaddr_in6);
	struct sockaddr_storage got;

	for (int tries = 0; tries < 2; tries++) {
		socklen_t glen = sizeof(got);

		fd = socket(fam, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
		if (fd < 0 ||
		    setsockopt(fd, fam == AF_INET ? SOL_IP : SOL_IPV6,
			       fam == AF_INET ? IP_TRANSPARENT :
			       IPV6_TRANSPARENT, &on, sizeof(on)) < 0 ||
		    bind(fd, (struct sockaddr *)&conn->from, len) < 0 ||
		    getsockname(fd, (struct sockaddr *)&got, &glen) < 0) {
			e = -errno;
			if (fd >= 0)
				close(fd);
			fd = -1;
			break;
		}
		if (sockaddr_port(&got) != conn->from_not_port)
			break;
		old = fd;
		fd = -1;
		e = UV_EADDRINUSE;
	}
	if (old >= 0)
		close(old);
	return fd >= 0 ? fd : e;
}

static void free_handle(uv_handle_t *h)
{
	free(h);
}

/* The TCP handle for one attempt (tcp is malloc'ed; freed on failure):
 * from this host's address, or from conn->from when that is of the
 * address's family. */
static int tcp_for(struct ms_conn *conn, uv_tcp_t *tcp, int family)
{
	int r = uv_tcp_init(conn->loop, tcp), fd;

	if (r < 0) {
		free(tcp);
		return r;
	}
	if (conn->from.ss_family != family)
		return 0;
	fd = bind_foreign(conn);
	if (fd < 0)
		r = fd;
	else if ((r = uv_tcp_open(tcp, fd)) < 0)
		close(fd);
	if (r < 0)
		uv_close((uv_handle_t *)tcp, free_handle);
	return r;
}

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
		r = tcp_for(conn, tcp, ai->ai_family);
		if (r < 0) {
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

int ms_conn_set_source(struct ms_conn *conn, const char *addr,
		       uint16_t not_port)
{
	struct sockaddr_in *in = (struct sockaddr_in *)&conn->from;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&conn->from;

	memset(&conn->from, 0, sizeof(conn->from));
	if (inet_pton(AF_INET, addr, &in->sin_addr) == 1) {
		in->sin_family = AF_INET;
	} else if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
	} else {
		memset(&conn->from, 0, sizeof(conn->from));
		return -1;
	}
	conn->from_not_port = not_port;
	return 0;
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
	conn->high_water = MS_CONN_HIGH_WATER;
	conn->low_water = MS_CONN_LOW_WATER;
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
	hints.ai_flags = AI_NUMERICSERV | AI_NUMERICHOST;
	snprintf(service, sizeof(service), "%u", port);
	if (getaddrinfo(host, service, &hints, &conn->ai) == 0) {
		/* A numeric address needs no resolver thread (the gateway
		 * connects to its backends by address, once per login). The
		 * connect starts on the next loop turn: no callback from
		 * inside this call. */
		conn->ai_next = conn->ai;
		conn->last_connect_err = UV_EAI_NONAME;
		conn->connect_req.data = conn;
		uv_idle_init(loop, &conn->idle);
		conn->idle.data = conn;
		/* the caller's and the idle handle's */
		conn->refs = 2;
		conn->idle_connect = 1;
		schedule_idle(conn);
		*conn_r = conn;
		return 0;
	}
	conn->ai = NULL;
	hints.ai_flags = AI_NUMERICSERV;
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

/* The last words of a session (a BYE, the OK to LOGOUT) are written just
 * before the close, in the same loop turn, and would die in plainq: hand
 * them to uv_write, which writes at once when nothing else is queued (the
 * usual case for a session that is talking), and say close_notify under
 * TLS. Best effort: uv_close cancels what the socket did not take. No
 * callback can follow from here (uv_write calls back from the loop, where
 * `closing` is seen). */
static void flush_at_close(struct ms_conn *conn)
{
	char err[ERR_TEXT_SIZE];

	if (!conn->tcp || !conn->connected || conn->failed ||
	    conn->tls == TLS_HANDSHAKE)
		return;
	/* (at most FLUSH_THRESHOLD: more would have been sent already) */
	if (flush_plainq(conn, err, sizeof(err)) < 0)
		return;
	if (conn->tls == TLS_ACTIVE && !conn->eof) {
		ERR_clear_error();
		if (SSL_shutdown(conn->ssl) >= 0)
			flush_wbio(conn);
		ERR_clear_error();
	}
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
	flush_at_close(conn);
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

/* ---- addresses --------------------------------------------------------- */

static int addr_format(const struct sockaddr_storage *ss, char *addr,
		       size_t addrsz, uint16_t *port)
{
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
	const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
	char buf[INET6_ADDRSTRLEN];
	const void *a;
	int family;
	uint16_t p;

	if (ss->ss_family == AF_INET) {
		family = AF_INET;
		a = &sin->sin_addr;
		p = sin->sin_port;
	} else if (ss->ss_family == AF_INET6) {
		p = sin6->sin6_port;
		/* a dual-stack socket's IPv4 client is an IPv4 client */
		if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
			family = AF_INET;
			a = &sin6->sin6_addr.s6_addr[12];
		} else {
			family = AF_INET6;
			a = &sin6->sin6_addr;
		}
	} else {
		return UV_EAFNOSUPPORT;
	}
	if (addr) {
		if (!inet_ntop(family, a, buf, sizeof(buf)))
			return UV_EINVAL;
		if (strlen(buf) >= addrsz)
			return UV_ENOSPC;
		strcpy(addr, buf);
	}
	if (port)
		*port = ntohs(p);
	return 0;
}

static int conn_addr(const struct ms_conn *conn, int peer, char *addr,
		     size_t addrsz, uint16_t *port)
{
	struct sockaddr_storage ss;
	int len = sizeof(ss), r;

	if (!conn)
		return UV_EINVAL;
	if (!conn->tcp)
		return UV_ENOTCONN;
	if (peer)
		r = uv_tcp_getpeername(conn->tcp, (struct sockaddr *)&ss, &len);
	else
		r = uv_tcp_getsockname(conn->tcp, (struct sockaddr *)&ss, &len);
	if (r < 0)
		return r;
	return addr_format(&ss, addr, addrsz, port);
}

int ms_conn_peer_addr(const struct ms_conn *conn, char *addr, size_t addrsz,
		      uint16_t *port)
{
	return conn_addr(conn, 1, addr, addrsz, port);
}

int ms_conn_local_addr(const struct ms_conn *conn, char *addr, size_t addrsz,
		       uint16_t *port)
{
	return conn_addr(conn, 0, addr, addrsz, port);
}

/* ---- serving TLS ------------------------------------------------------- */

static void __attribute__((format(printf, 3, 4)))
set_err(char *err, size_t errsz, const char *fmt, ...)
{
	va_list ap;

	if (!err || errsz == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errsz, fmt, ap);
	va_end(ap);
}

static int no_passphrase(char *buf, int size, int rwflag, void *asked)
{
	*(int *)asked = 1;
	return -1;	/* nobody to ask: an encrypted key is an error */
}

/* Reads the private key from key_file, refusing a file others may read.
 * The mode is checked on the open file, the one that is read. */
static EVP_PKEY *load_key(const char *key_file, char *err, size_t errsz)
{
	char why[256], *buf = NULL;
	EVP_PKEY *key = NULL;
	struct stat st;
	size_t len = 0;
	int fd, asked = 0;
	ssize_t n;
	BIO *bio;

	fd = open(key_file, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		set_err(err, errsz, "cannot open key file %s: %s", key_file,
			strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		set_err(err, errsz, "key file %s is not a regular file",
			key_file);
		goto out;
	}
	if (st.st_mode & 077) {
		set_err(err, errsz, "key file %s has mode %04o: it must be "
			"readable by its owner only (chmod 600)", key_file,
			(unsigned int)(st.st_mode & 07777));
		goto out;
	}
	if (st.st_uid != 0 && st.st_uid != geteuid()) {
		/* Another user could replace it, or has read it. */
		set_err(err, errsz, "key file %s belongs to uid %u: it must "
			"belong to root (or to the user reading it)", key_file,
			(unsigned int)st.st_uid);
		goto out;
	}
	if (st.st_size > 1024 * 1024) {
		set_err(err, errsz, "key file %s is too big", key_file);
		goto out;
	}
	/* read whole into memory we wipe (stdio would leave copies) */
	buf = malloc((size_t)st.st_size + 1);
	if (!buf) {
		set_err(err, errsz, "key file %s: out of memory", key_file);
		goto out;
	}
	while (len < (size_t)st.st_size &&
	       (n = read(fd, buf + len, (size_t)st.st_size - len)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			set_err(err, errsz, "cannot read key file %s: %s",
				key_file, strerror(errno));
			goto out;
		}
		len += (size_t)n;
	}
	ERR_clear_error();
	bio = BIO_new_mem_buf(buf, (int)len);
	if (bio) {
		key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase,
					      &asked);
		BIO_free(bio);
	}
	if (!key) {
		ssl_err_text(why, sizeof(why));
		if (asked)
			set_err(err, errsz, "key file %s is encrypted (a "
				"passphrase cannot be given)", key_file);
		else
			set_err(err, errsz, "cannot load key file %s: no PEM "
				"private key in it (%s)", key_file, why);
	}
out:
	if (buf) {
		OPENSSL_cleanse(buf, len);
		free(buf);
	}
	close(fd);
	return key;
}

int ms_tls_server_new(const char *cert_file, const char *key_file,
		      struct ms_tls_server **srv_r, char *err, size_t errsz)
{
	struct ms_tls_server *srv;
	EVP_PKEY *key;
	SSL_CTX *ctx;
	char why[256];

	if (srv_r)
		*srv_r = NULL;
	if (!cert_file || !key_file || !srv_r) {
		set_err(err, errsz, "TLS: a certificate and a key are needed");
		return -1;
	}
	key = load_key(key_file, err, errsz);
	if (!key)
		return -1;
	ERR_clear_error();
	ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx) {
		ssl_err_text(why, sizeof(why));
		set_err(err, errsz, "TLS error: cannot create context: %s",
			why);
		EVP_PKEY_free(key);
		return -1;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION |
				 SSL_OP_NO_RENEGOTIATION |
				 SSL_OP_CIPHER_SERVER_PREFERENCE);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	/* Resumption works through (stateless) tickets; a server-side
	 * cache would hold up to 20000 sessions for TLS 1.2 clients. */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
		ssl_err_text(why, sizeof(why));
		set_err(err, errsz, "cannot load certificate chain %s: %s",
			cert_file, why);
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey(ctx, key) != 1 ||
	    SSL_CTX_check_private_key(ctx) != 1) {
		ssl_err_text(why, sizeof(why));
		set_err(err, errsz, "key file %s does not go with the "
			"certificate in %s: %s", key_file, cert_file, why);
		goto fail;
	}
	EVP_PKEY_free(key);	/* ctx holds its own reference */
	srv = calloc(1, sizeof(*srv));
	if (!srv) {
		set_err(err, errsz, "TLS error: out of memory");
		SSL_CTX_free(ctx);
		return -1;
	}
	srv->ctx = ctx;
	*srv_r = srv;
	return 0;
fail:
	EVP_PKEY_free(key);
	SSL_CTX_free(ctx);
	return -1;
}

void ms_tls_server_free(struct ms_tls_server **srvp)
{
	if (!srvp || !*srvp)
		return;
	/* each SSL holds a reference to the context: live connections
	 * keep it */
	SSL_CTX_free((*srvp)->ctx);
	free(*srvp);
	*srvp = NULL;
}

/* ---- accepting --------------------------------------------------------- */

static void on_close_free(uv_handle_t *h)
{
	free(h->data);
}

void ms_close_free(uv_handle_t *h, void *mem)
{
	h->data = mem;
	uv_close(h, on_close_free);
}

void ms_drop_connection(uv_stream_t *listener)
{
	uv_tcp_t *tcp = malloc(sizeof(*tcp));

	/* A connection left pending stops libuv from accepting any other;
	 * without memory for a handle, the listener's own error path
	 * (EMFILE-like) is all there is. */
	if (!tcp)
		return;
	if (uv_tcp_init(listener->loop, tcp) < 0) {
		free(tcp);
		return;
	}
	uv_accept(listener, (uv_stream_t *)tcp);
	ms_close_free((uv_handle_t *)tcp, tcp);
}

int ms_conn_accept(uv_stream_t *listener, struct ms_tls_server *tls,
		   const struct ms_conn_callbacks *cb, struct ms_conn **conn_r)
{
	char err[ERR_TEXT_SIZE];
	struct ms_conn *conn;
	uv_tcp_t *tcp;
	int r;

	if (conn_r)
		*conn_r = NULL;
	if (!listener || !cb || !cb->on_connect || !cb->on_read || !conn_r)
		return UV_EINVAL;
	tcp = malloc(sizeof(*tcp));
	if (!tcp) {
		ms_drop_connection(listener);
		return UV_ENOMEM;
	}
	conn = calloc(1, sizeof(*conn));
	if (!conn) {
		free(tcp);
		ms_drop_connection(listener);
		return UV_ENOMEM;
	}
	conn->loop = listener->loop;
	conn->cb = *cb;
	conn->high_water = MS_CONN_HIGH_WATER;
	conn->low_water = MS_CONN_LOW_WATER;
	conn->server = 1;
	r = uv_tcp_init(conn->loop, tcp);
	if (r < 0) {
		free(tcp);
		free(conn);
		return r;
	}
	tcp->data = conn;
	conn->tcp = tcp;
	uv_idle_init(conn->loop, &conn->idle);
	conn->idle.data = conn;
	/* the caller's, the TCP handle's and the idle handle's */
	conn->refs = 3;

	r = uv_accept(listener, (uv_stream_t *)tcp);
	if (r < 0)
		goto fail;
	uv_tcp_nodelay(tcp, 1);
	conn->connected = 1;
	if (tls) {
		r = tls_setup_server(conn, tls, err, sizeof(err));
		if (r < 0)
			goto fail;
		/* the client speaks first: wait for its hello */
		conn->tls = TLS_HANDSHAKE;
		update_reading(conn);
	} else {
		conn->accept_pending = 1;
		schedule_idle(conn);
	}
	*conn_r = conn;
	return 0;
fail:
	ms_conn_close(&conn);	/* closes the client's connection too */
	return r;
}

int ms_conn_starttls_server(struct ms_conn *conn, struct ms_tls_server *tls,
			    void (*done)(struct ms_conn *conn, int status,
					 const char *error))
{
	char err[ERR_TEXT_SIZE];
	int r;

	if (!conn || !tls || !done || !conn->server)
		return UV_EINVAL;
	if (conn->closing || conn->failed || !conn->connected ||
	    conn->accept_pending)
		return UV_ENOTCONN;
	if (conn->tls != TLS_OFF || conn->starttls_done)
		return UV_EALREADY;
	conn->starttls_done = done;
	/* The go-ahead is still in plainq (it leaves at the end of the loop
	 * turn): send it now, in plaintext, before the switch. */
	r = flush_plainq(conn, err, sizeof(err));
	if (r == 0)
		r = tls_setup_server(conn, tls, err, sizeof(err));
	if (r < 0) {
		/* done(conn, -1, err) follows from the loop */
		fail_later(conn, r, err);
		return 0;
	}
	/* Writes wait in plainq again until the handshake is done; the
	 * client's hello comes with the next read. */
	conn->tls = TLS_HANDSHAKE;
	update_reading(conn);
	return 0;
}

/* ---- listening --------------------------------------------------------- */

/* "1.2.3.4:143" or "[::1]:143" (numeric only: a listener's address must not
 * depend on DNS). */
static int parse_addrport(const char *s, struct sockaddr_storage *ss)
{
	const char *host, *end, *port_s;
	char name[128], *e;
	unsigned long port;
	size_t n;

	if (s[0] == '[') {
		host = s + 1;
		end = strchr(host, ']');
		if (!end || end[1] != ':')
			return UV_EINVAL;
		port_s = end + 2;
	} else {
		host = s;
		end = strrchr(s, ':');
		/* an IPv6 address needs its brackets */
		if (!end || memchr(s, ':', (size_t)(end - s)))
			return UV_EINVAL;
		port_s = end + 1;
	}
	n = (size_t)(end - host);
	if (n == 0 || n >= sizeof(name) || *port_s < '0' || *port_s > '9')
		return UV_EINVAL;
	errno = 0;
	port = strtoul(port_s, &e, 10);
	if (*e || errno || port > 65535)
		return UV_EINVAL;
	memcpy(name, host, n);
	name[n] = 0;
	memset(ss, 0, sizeof(*ss));
	if (s[0] == '[')
		return uv_ip6_addr(name, (int)port, (struct sockaddr_in6 *)ss);
	return uv_ip4_addr(name, (int)port, (struct sockaddr_in *)ss);
}

int ms_addrport_parse(const char *s, struct sockaddr_storage *ss)
{
	return parse_addrport(s, ss);
}

int ms_listen_fd(uv_loop_t *loop, uv_tcp_t *tcp, int fd, const char *addrport,
		 uv_connection_cb cb, char *err, size_t errsz)
{
	void *data = tcp->data;
	int r = uv_tcp_init(loop, tcp);

	if (r < 0) {
		close(fd);
		set_err(err, errsz, "listen %s: %s", addrport, uv_strerror(r));
		return r;
	}
	tcp->data = data;
	r = uv_tcp_open(tcp, fd);
	if (r == 0)
		r = uv_listen((uv_stream_t *)tcp, 511, cb);
	if (r < 0) {
		/* libuv refusing a listening socket: not seen in practice;
		 * the handle owns fd and must be closed */
		set_err(err, errsz, "listen %s: %s", addrport, uv_strerror(r));
		uv_close((uv_handle_t *)tcp, NULL);
		return r;
	}
	return 0;
}

int ms_listen(uv_loop_t *loop, uv_tcp_t *tcp, const char *addrport,
	      int transparent, uv_connection_cb cb, char *err, size_t errsz)
{
	struct sockaddr_storage ss;
	const char *what;
	int fd, on = 1, r;
	socklen_t len;

	if (!loop || !tcp || !addrport || !cb) {
		set_err(err, errsz, "listen: invalid arguments");
		return UV_EINVAL;
	}
	if (parse_addrport(addrport, &ss) < 0) {
		set_err(err, errsz, "bad listen address %s (want ADDR:PORT "
			"or [IPV6]:PORT)", addrport);
		return UV_EINVAL;
	}
	/* The socket is made, bound and listening before libuv sees it, so
	 * that a failure leaves no handle to close: the caller may free tcp
	 * at once (a closing handle would need the loop to run first). */
	what = "socket for";
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
		    IPPROTO_TCP);
	if (fd < 0)
		goto sys_fail;
	/* a restart must not wait for TIME_WAIT to pass */
	what = "bind";
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) < 0)
		goto sys_fail;
	/* so that 0.0.0.0:P and [::]:P can both be listed */
	if (ss.ss_family == AF_INET6 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on)) < 0)
		goto sys_fail;
	if (transparent) {
		/* TPROXY hands us connections for addresses not ours */
		what = "IP_TRANSPARENT on";
#if defined(IP_TRANSPARENT) && defined(IPV6_TRANSPARENT)
		if (ss.ss_family == AF_INET6)
			r = setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &on,
				       sizeof(on));
		else
			r = setsockopt(fd, SOL_IP, IP_TRANSPARENT, &on,
				       sizeof(on));
		if (r < 0)
			goto sys_fail;
#else
		errno = ENOTSUP;
		goto sys_fail;
#endif
		what = "bind";
	}
	len = ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) :
					 sizeof(struct sockaddr_in);
	if (bind(fd, (struct sockaddr *)&ss, len) < 0)
		goto sys_fail;
	what = "listen";
	if (listen(fd, 511) < 0)
		goto sys_fail;

	return ms_listen_fd(loop, tcp, fd, addrport, cb, err, errsz);
sys_fail:
	r = uv_translate_sys_error(errno);
	if (fd >= 0)
		close(fd);
	set_err(err, errsz, "%s %s: %s", what, addrport, uv_strerror(r));
	return r;
}
