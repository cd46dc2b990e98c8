/* Unit tests of daemon/net.c: real I/O on 127.0.0.1 only.
 *
 * Plaintext tests use libuv servers running on the test's own loop. TLS
 * tests use a small blocking OpenSSL server in a thread of this process,
 * with a throwaway CA and server certificate made by the `openssl` command
 * in a temporary directory (removed at the end). No process is left behind:
 * the only children are the openssl invocations, each waited for.
 *
 * The server side (ms_listen, ms_conn_accept) is tested against our own
 * outgoing connections on the same loop, and against raw sockets and raw
 * OpenSSL clients where the client must not be ours (garbage instead of a
 * ClientHello, the memory an idle accepted session costs).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "must_run.h"
#include "net.h"

extern char **environ;

static uv_loop_t loop;
static uv_timer_t guard;
static int timed_out;

static char tmpdir[64] = "";
static char ca_pem[128], other_pem[128], srv_pem[128], srv_key[128];
static char other_key[128];
/* the server's certificate, for accepted connections */
static struct ms_tls_server *server_tls;

/* ---- helpers ----------------------------------------------------------- */

static unsigned char pat(uint64_t i)
{
	return (unsigned char)((i * 2654435761u) >> 11);
}

static void fill_pat(unsigned char *buf, uint64_t off, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		buf[i] = pat(off + i);
}

static size_t count_bad(const unsigned char *buf, uint64_t off, size_t len)
{
	size_t i, bad = 0;

	for (i = 0; i < len; i++)
		bad += buf[i] != pat(off + i);
	return bad;
}

static void on_guard(uv_timer_t *t)
{
	timed_out = 1;
	uv_stop(&loop);
}

/* Runs the loop until a test callback calls uv_stop (or 5 s pass). */
static void run_loop(void)
{
	timed_out = 0;
	uv_timer_start(&guard, on_guard, 5000, 0);
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_timer_stop(&guard);
	assert_false(timed_out);
}

static void on_close_free(uv_handle_t *h)
{
	free(h);
}

static void noop_close(uv_handle_t *h)
{
}

/* ---- client recording callbacks ---------------------------------------- */

struct client {
	struct ms_conn *conn;
	int closed;		/* ms_conn_close was called */
	int late;		/* callbacks after close: must stay 0 */

	int connects;
	int connect_status;
	char connect_err[256];
	int errors;
	char error[256];
	size_t rx_at_error;
	int drains;
	size_t drain_pending_bad;

	/* pattern traffic */
	uint64_t total;
	uint64_t tx;
	uint64_t rx;
	size_t rx_bad;
	unsigned char *chunk;

	/* text traffic */
	char text[4096];
	size_t text_len;

	int paused;
	int read_while_paused;
	uint64_t next_pause;
	int pauses;
	uv_timer_t timer;
	uint64_t tx_at_resume;
	size_t pending_at_resume;

	/* STARTTLS */
	int starttls_state;
	int tls_done;
	int tls_done_status;
	char tls_done_err[256];

	void (*connected)(struct client *c);
	void (*got_data)(struct client *c, const char *data, size_t len);
};

static void client_init(struct client *c)
{
	memset(c, 0, sizeof(*c));
	uv_timer_init(&loop, &c->timer);
	c->timer.data = c;
}

static void client_fini(struct client *c)
{
	ms_conn_close(&c->conn);
	c->closed = 1;
	uv_close((uv_handle_t *)&c->timer, noop_close);
	free(c->chunk);
}

static void cl_on_connect(struct ms_conn *conn, int status, const char *error)
{
	struct client *c = ms_conn_ctx(conn);

	if (c->closed)
		c->late++;
	c->connects++;
	c->connect_status = status;
	snprintf(c->connect_err, sizeof(c->connect_err), "%s",
		 error ? error : "");
	if (status < 0)
		uv_stop(&loop);
	else if (c->connected)
		c->connected(c);
}

static void cl_on_read(struct ms_conn *conn, const char *data, size_t len)
{
	struct client *c = ms_conn_ctx(conn);

	if (c->closed)
		c->late++;
	if (c->paused)
		c->read_while_paused++;
	if (c->got_data) {
		c->got_data(c, data, len);
		return;
	}
	if (c->text_len + len < sizeof(c->text)) {
		memcpy(c->text + c->text_len, data, len);
		c->text_len += len;
		c->text[c->text_len] = 0;
	}
}

static void cl_on_error(struct ms_conn *conn, const char *error)
{
	struct client *c = ms_conn_ctx(conn);

	if (c->closed)
		c->late++;
	c->errors++;
	c->rx_at_error = c->rx;
	snprintf(c->error, sizeof(c->error), "%s", error);
	uv_stop(&loop);
}

static void cl_on_drain(struct ms_conn *conn)
{
	struct client *c = ms_conn_ctx(conn);

	if (c->closed)
		c->late++;
	c->drains++;
	if (ms_conn_write_pending(conn) > MS_CONN_LOW_WATER)
		c->drain_pending_bad++;
	if (c->connected)
		c->connected(c);	/* the producer goes on */
}

static int client_connect(struct client *c, const char *host, uint16_t port,
			  const struct ms_tls_opts *tls)
{
	struct ms_conn_callbacks cb = {
		.on_connect = cl_on_connect,
		.on_read = cl_on_read,
		.on_error = cl_on_error,
		.on_drain = cl_on_drain,
		.ctx = c,
	};

	return ms_conn_connect(&loop, host, port, tls, &cb, &c->conn);
}

/* Writes pattern bytes while the write queue is below the high water mark;
 * on_drain calls it again. */
static void produce(struct client *c)
{
	size_t n;

	if (!c->chunk)
		c->chunk = malloc(64 * 1024);
	while (c->tx < c->total &&
	       ms_conn_write_pending(c->conn) < MS_CONN_HIGH_WATER) {
		n = c->total - c->tx < 64 * 1024 ? c->total - c->tx : 64 * 1024;
		fill_pat(c->chunk, c->tx, n);
		assert_int_equal(ms_conn_write(c->conn, c->chunk, n), 0);
		c->tx += n;
	}
}

static void check_pattern(struct client *c, const char *data, size_t len)
{
	c->rx_bad += count_bad((const unsigned char *)data, c->rx, len);
	c->rx += len;
	if (c->total && c->rx >= c->total)
		uv_stop(&loop);
}

/* ---- libuv plaintext servers on the test loop ------------------------- */

enum { SRV_ECHO, SRV_BYE, SRV_RESET };

struct plain_srv {
	uv_tcp_t tcp;
	uint16_t port;
	int mode;
	int accepted;
};

struct peer {
	uv_tcp_t tcp;
	size_t queued;
	int stopped;
};

struct peer_wr {
	uv_write_t req;
	struct peer *p;
	size_t len;
	char data[];
};

static void peer_close(struct peer *p)
{
	if (!uv_is_closing((uv_handle_t *)&p->tcp))
		uv_close((uv_handle_t *)&p->tcp, on_close_free);
}

static void peer_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf)
{
	static char b[64 * 1024];

	*buf = uv_buf_init(b, sizeof(b));
}

static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

static void peer_wrote(uv_write_t *req, int status)
{
	struct peer_wr *w = req->data;
	struct peer *p = w->p;
	size_t len = w->len;

	free(w);
	if (status < 0)
		return;		/* closing; p is freed after this */
	p->queued -= len;
	if (p->stopped && p->queued < 256 * 1024) {
		p->stopped = 0;
		uv_read_start((uv_stream_t *)&p->tcp, peer_alloc, peer_read);
	}
}

static void peer_write(struct peer *p, const char *data, size_t len,
		       uv_write_cb cb)
{
	struct peer_wr *w = malloc(sizeof(*w) + len);
	uv_buf_t b;

	memcpy(w->data, data, len);
	w->len = len;
	w->p = p;
	w->req.data = w;
	b = uv_buf_init(w->data, len);
	uv_write(&w->req, (uv_stream_t *)&p->tcp, &b, 1, cb);
	p->queued += len;
}

/* Echo with its own backpressure: it stops reading while more than 1 MiB
 * waits to be sent back. */
static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	struct peer *p = s->data;

	if (n < 0) {
		peer_close(p);
		return;
	}
	if (n == 0)
		return;
	peer_write(p, buf->base, n, peer_wrote);
	if (p->queued > 1024 * 1024) {
		p->stopped = 1;
		uv_read_stop(s);
	}
}

static void bye_shut(uv_shutdown_t *req, int status)
{
	struct peer *p = req->data;

	free(req);
	peer_close(p);
}

static void bye_wrote(uv_write_t *req, int status)
{
	struct peer_wr *w = req->data;
	struct peer *p = w->p;
	uv_shutdown_t *sh;

	free(w);
	if (status < 0)
		return;
	sh = malloc(sizeof(*sh));
	sh->data = p;
	uv_shutdown(sh, (uv_stream_t *)&p->tcp, bye_shut);
}

/* Resets the connection once the client said something. */
static void reset_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	struct peer *p = s->data;

	if (n == 0)
		return;
	uv_read_stop(s);
	if (n < 0)
		peer_close(p);
	else
		uv_tcp_close_reset(&p->tcp, on_close_free);
}

static void on_plain_conn(uv_stream_t *server, int status)
{
	struct plain_srv *srv = server->data;
	struct peer *p;
	int small = 64 * 1024;

	if (status < 0)
		return;
	p = calloc(1, sizeof(*p));
	uv_tcp_init(&loop, &p->tcp);
	p->tcp.data = p;
	if (uv_accept(server, (uv_stream_t *)&p->tcp) < 0) {
		peer_close(p);
		return;
	}
	srv->accepted++;
	/* small kernel buffers, so that backpressure shows up quickly */
	uv_send_buffer_size((uv_handle_t *)&p->tcp, &small);
	small = 64 * 1024;
	uv_recv_buffer_size((uv_handle_t *)&p->tcp, &small);
	if (srv->mode == SRV_RESET)
		uv_read_start((uv_stream_t *)&p->tcp, peer_alloc, reset_read);
	else if (srv->mode == SRV_BYE)
		peer_write(p, "bye\r\n", 5, bye_wrote);
	else
		uv_read_start((uv_stream_t *)&p->tcp, peer_alloc, peer_read);
}

static void plain_srv_start(struct plain_srv *srv, int mode)
{
	struct sockaddr_in sin;
	struct sockaddr_storage ss;
	int len = sizeof(ss);

	memset(srv, 0, sizeof(*srv));
	srv->mode = mode;
	assert_int_equal(uv_tcp_init(&loop, &srv->tcp), 0);
	srv->tcp.data = srv;
	uv_ip4_addr("127.0.0.1", 0, &sin);
	assert_int_equal(uv_tcp_bind(&srv->tcp, (struct sockaddr *)&sin, 0),
			 0);
	assert_int_equal(uv_listen((uv_stream_t *)&srv->tcp, 16,
				   on_plain_conn), 0);
	assert_int_equal(uv_tcp_getsockname(&srv->tcp, (struct sockaddr *)&ss,
					    &len), 0);
	srv->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
	/* the listener alone doesn't keep the loop running */
	uv_unref((uv_handle_t *)&srv->tcp);
}

static void plain_srv_stop(struct plain_srv *srv)
{
	uv_close((uv_handle_t *)&srv->tcp, noop_close);
}

/* ---- threaded OpenSSL server ------------------------------------------- */

enum { TLS_ECHO, TLS_SEND, TLS_STARTTLS };

struct tls_srv {
	int lfd;
	uint16_t port;
	int mode;
	size_t send_total;
	SSL_CTX *ctx;
	pthread_t thread;
	atomic_int stop;
	atomic_int handshakes;
	atomic_int handshake_failures;
	atomic_int sni_seen;		/* 1: some SNI, 2: none */
	char sni[256];
};

static int read_line(int fd, char *buf, size_t size)
{
	size_t n = 0;
	char ch;

	while (n + 1 < size) {
		if (read(fd, &ch, 1) != 1)
			return -1;
		buf[n++] = ch;
		if (ch == '\n')
			break;
	}
	buf[n] = 0;
	return (int)n;
}

static int ssl_write_all(SSL *ssl, const void *data, size_t len)
{
	size_t w;

	while (len > 0) {
		if (SSL_write_ex(ssl, data, len, &w) != 1)
			return -1;
		data = (const char *)data + w;
		len -= w;
	}
	return 0;
}

static void tls_srv_handle(struct tls_srv *s, int fd)
{
	struct timeval tv = { .tv_sec = 3 };
	const char *sni;
	unsigned char buf[16384];
	char line[256];
	SSL *ssl = NULL;
	size_t off, n;
	int r;

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (s->mode == TLS_STARTTLS) {
		const char *greet = "* OK test server ready\r\n";
		const char *go = "OK begin TLS now\r\n";

		if (write(fd, greet, strlen(greet)) < 0 ||
		    read_line(fd, line, sizeof(line)) < 0 ||
		    strcmp(line, "STARTTLS\r\n") != 0 ||
		    write(fd, go, strlen(go)) < 0)
			goto out;
	}
	ssl = SSL_new(s->ctx);
	SSL_set_fd(ssl, fd);
	if (SSL_accept(ssl) != 1) {
		s->handshake_failures++;
		goto out;
	}
	sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
	if (sni)
		snprintf(s->sni, sizeof(s->sni), "%s", sni);
	s->sni_seen = sni ? 1 : 2;
	s->handshakes++;
	if (s->mode == TLS_SEND) {
		for (off = 0; off < s->send_total; off += n) {
			n = s->send_total - off;
			if (n > sizeof(buf))
				n = sizeof(buf);
			fill_pat(buf, off, n);
			if (ssl_write_all(ssl, buf, n) < 0)
				goto out;
		}
		SSL_shutdown(ssl);
		shutdown(fd, SHUT_WR);
		/* wait for the client to close (avoids a reset) */
		while (SSL_read(ssl, buf, sizeof(buf)) > 0)
			;
		goto out;
	}
	while ((r = SSL_read(ssl, buf, sizeof(buf))) > 0) {
		if (ssl_write_all(ssl, buf, (size_t)r) < 0)
			break;
	}
out:
	ERR_clear_error();
	SSL_free(ssl);
	close(fd);
}

static void *tls_srv_main(void *arg)
{
	struct tls_srv *s = arg;
	struct pollfd pfd = { .fd = s->lfd, .events = POLLIN };
	int fd;

	while (!s->stop) {
		if (poll(&pfd, 1, 20) <= 0)
			continue;
		fd = accept(s->lfd, NULL, NULL);
		if (fd >= 0)
			tls_srv_handle(s, fd);
	}
	return NULL;
}

static void tls_srv_start(struct tls_srv *s, int mode)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t len = sizeof(sin);

	memset(s, 0, sizeof(*s));
	s->mode = mode;
	s->ctx = SSL_CTX_new(TLS_server_method());
	assert_non_null(s->ctx);
	assert_int_equal(SSL_CTX_use_certificate_chain_file(s->ctx, srv_pem),
			 1);
	assert_int_equal(SSL_CTX_use_PrivateKey_file(s->ctx, srv_key,
						     SSL_FILETYPE_PEM), 1);
	s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(s->lfd >= 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(s->lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	assert_int_equal(listen(s->lfd, 16), 0);
	assert_int_equal(getsockname(s->lfd, (struct sockaddr *)&sin, &len), 0);
	s->port = ntohs(sin.sin_port);
	assert_int_equal(pthread_create(&s->thread, NULL, tls_srv_main, s), 0);
}

static void tls_srv_stop(struct tls_srv *s)
{
	s->stop = 1;
	pthread_join(s->thread, NULL);
	close(s->lfd);
	SSL_CTX_free(s->ctx);
}

/* ---- certificates ------------------------------------------------------ */

static int run_openssl(const char *const *args)
{
	posix_spawn_file_actions_t fa;
	char log[128], *argv[32];
	pid_t pid;
	int i, status;

	snprintf(log, sizeof(log), "%s/openssl.log", tmpdir);
	argv[0] = "openssl";
	for (i = 0; args[i]; i++)
		argv[i + 1] = (char *)args[i];
	argv[i + 1] = NULL;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT |
					 O_APPEND, 0600);
	posix_spawn_file_actions_adddup2(&fa, 1, 2);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	if (posix_spawnp(&pid, "openssl", &fa, NULL, argv, environ) != 0) {
		posix_spawn_file_actions_destroy(&fa);
		return -1;
	}
	posix_spawn_file_actions_destroy(&fa);
	if (waitpid(pid, &status, 0) != pid)
		return -1;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "openssl %s failed, see %s\n", args[0], log);
		return -1;
	}
	return 0;
}

static const char cnf_text[] =
	"[req]\n"
	"distinguished_name = dn\n"
	"prompt = no\n"
	"[dn]\n"
	"CN = mailshift test\n"
	"[v3_ca]\n"
	"basicConstraints = critical,CA:TRUE\n"
	"keyUsage = critical,keyCertSign,cRLSign\n"
	"subjectKeyIdentifier = hash\n"
	"[v3_srv]\n"
	"basicConstraints = CA:FALSE\n"
	"keyUsage = critical,digitalSignature,keyEncipherment\n"
	"extendedKeyUsage = serverAuth\n"
	"subjectAltName = DNS:localhost,IP:127.0.0.1\n"
	"subjectKeyIdentifier = hash\n"
	"authorityKeyIdentifier = keyid\n";

static void rm_tmpdir(void)
{
	char path[512];
	struct dirent *de;
	DIR *d;

	if (!tmpdir[0])
		return;
	d = opendir(tmpdir);
	if (d) {
		while ((de = readdir(d))) {
			if (!strcmp(de->d_name, ".") ||
			    !strcmp(de->d_name, ".."))
				continue;
			snprintf(path, sizeof(path), "%s/%s", tmpdir,
				 de->d_name);
			unlink(path);
		}
		closedir(d);
	}
	rmdir(tmpdir);
	tmpdir[0] = 0;
}

static int make_certs(void **state)
{
	char cnf[128], ca_key[128], csr[128], err[256];
	FILE *f;

	strcpy(tmpdir, "/tmp/ms-test-net-XXXXXX");
	if (!mkdtemp(tmpdir)) {
		tmpdir[0] = 0;
		return -1;
	}
	snprintf(cnf, sizeof(cnf), "%s/openssl.cnf", tmpdir);
	snprintf(ca_key, sizeof(ca_key), "%s/ca.key", tmpdir);
	snprintf(ca_pem, sizeof(ca_pem), "%s/ca.pem", tmpdir);
	snprintf(other_key, sizeof(other_key), "%s/other.key", tmpdir);
	snprintf(other_pem, sizeof(other_pem), "%s/other.pem", tmpdir);
	snprintf(srv_key, sizeof(srv_key), "%s/srv.key", tmpdir);
	snprintf(srv_pem, sizeof(srv_pem), "%s/srv.pem", tmpdir);
	snprintf(csr, sizeof(csr), "%s/srv.csr", tmpdir);
	f = fopen(cnf, "w");
	if (!f)
		goto fail;
	fputs(cnf_text, f);
	fclose(f);

	{
		const char *ca[] = { "req", "-x509", "-config", cnf,
			"-extensions", "v3_ca", "-newkey", "ec", "-pkeyopt",
			"ec_paramgen_curve:P-256", "-nodes", "-keyout", ca_key,
			"-out", ca_pem, "-days", "2", "-subj",
			"/CN=mailshift test CA", NULL };
		const char *other[] = { "req", "-x509", "-config", cnf,
			"-extensions", "v3_ca", "-newkey", "ec", "-pkeyopt",
			"ec_paramgen_curve:P-256", "-nodes", "-keyout",
			other_key, "-out", other_pem, "-days", "2", "-subj",
			"/CN=mailshift other CA", NULL };
		const char *req[] = { "req", "-new", "-config", cnf,
			"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
			"-nodes", "-keyout", srv_key, "-out", csr, "-subj",
			"/CN=localhost", NULL };
		const char *sign[] = { "x509", "-req", "-in", csr, "-CA",
			ca_pem, "-CAkey", ca_key, "-set_serial", "2", "-days",
			"2", "-extfile", cnf, "-extensions", "v3_srv", "-out",
			srv_pem, NULL };

		if (run_openssl(ca) < 0 || run_openssl(other) < 0 ||
		    run_openssl(req) < 0 || run_openssl(sign) < 0)
			goto fail;
	}
	/* ms_tls_server_new wants the key private */
	if (chmod(srv_key, 0600) < 0 || chmod(other_key, 0600) < 0)
		goto fail;
	if (ms_tls_server_new(srv_pem, srv_key, &server_tls, err,
			      sizeof(err)) < 0) {
		fprintf(stderr, "ms_tls_server_new: %s\n", err);
		goto fail;
	}
	return 0;
fail:
	rm_tmpdir();
	return -1;
}

static int remove_certs(void **state)
{
	ms_tls_server_free(&server_tls);
	rm_tmpdir();
	return 0;
}

/* ---- per-test loop ----------------------------------------------------- */

static int setup(void **state)
{
	if (uv_loop_init(&loop) != 0)
		return -1;
	uv_timer_init(&loop, &guard);
	return 0;
}

static void close_any(uv_handle_t *h, void *arg)
{
	if (!uv_is_closing(h))
		uv_close(h, NULL);
}

static void settle(int ms)
{
	int i;

	for (i = 0; i < ms && uv_loop_alive(&loop); i++) {
		uv_run(&loop, UV_RUN_NOWAIT);
		if (uv_loop_alive(&loop))
			usleep(1000);
	}
}

static int teardown(void **state)
{
	uv_close((uv_handle_t *)&guard, noop_close);
	/* let every close, cancelled request and peer shutdown finish */
	settle(2000);
	if (uv_loop_close(&loop) == 0)
		return 0;
	fprintf(stderr, "handles left on the loop:\n");
	uv_print_all_handles(&loop, stderr);
	/* a failed test: close what it left (leaking), so the next can run */
	uv_walk(&loop, close_any, NULL);
	settle(2000);
	uv_loop_close(&loop);
	return -1;
}

/* Runs the loop until nothing is left but unreferenced handles. */
static void drain_loop(void)
{
	int i;

	for (i = 0; i < 2000 && uv_loop_alive(&loop); i++) {
		uv_run(&loop, UV_RUN_NOWAIT);
		if (uv_loop_alive(&loop))
			usleep(500);
	}
	assert_false(uv_loop_alive(&loop));
}

/* ---- plaintext tests --------------------------------------------------- */

static void bp_resume(uv_timer_t *t)
{
	struct client *c = t->data;

	c->tx_at_resume = c->tx;
	c->pending_at_resume = ms_conn_write_pending(c->conn);
	c->paused = 0;
	ms_conn_read_pause(c->conn, 0);
}

static void bp_connected(struct client *c)
{
	if (c->connects == 1 && c->drains == 0 && c->tx == 0) {
		uv_update_time(&loop);
		uv_timer_start(&c->timer, bp_resume, 200, 0);
	}
	produce(c);
}

static void test_plain_echo_backpressure(void **state)
{
	static struct plain_srv srv;
	static struct client c;

	plain_srv_start(&srv, SRV_ECHO);
	client_init(&c);
	c.total = 16 * 1024 * 1024;
	c.connected = bp_connected;
	c.got_data = check_pattern;
	assert_int_equal(client_connect(&c, "127.0.0.1", srv.port, NULL), 0);
	/* Nothing is read back for 200 ms: the echo server stops reading,
	 * our writes pile up, and the producer has to wait for on_drain. */
	c.paused = 1;
	ms_conn_read_pause(c.conn, 1);
	run_loop();

	assert_int_equal(c.connects, 1);
	assert_int_equal(c.connect_status, 0);
	assert_int_equal(c.errors, 0);
	assert_int_equal(c.read_while_paused, 0);
	assert_true(c.tx_at_resume < c.total);	/* writes really stalled */
	assert_true(c.pending_at_resume > MS_CONN_LOW_WATER);
	assert_true(c.drains >= 1);
	assert_int_equal(c.drain_pending_bad, 0);
	assert_int_equal(c.tx, c.total);
	assert_int_equal(c.rx, c.total);
	assert_int_equal(c.rx_bad, 0);
	assert_int_equal(ms_conn_write_pending(c.conn), 0);
	assert_int_equal(srv.accepted, 1);
	assert_int_equal(ms_conn_is_tls(c.conn), 0);

	client_fini(&c);
	plain_srv_stop(&srv);
	drain_loop();
	assert_int_equal(c.late, 0);
}

/* ms_conn_printf: a text longer than its stack buffer goes out whole, never
 * cut (a cut reply would be another reply). */
static void test_printf_whole(void **state)
{
	static struct plain_srv srv;
	static struct client c;
	static char big[5001];

	memset(big, 'x', sizeof(big) - 1);
	plain_srv_start(&srv, SRV_ECHO);
	client_init(&c);
	assert_int_equal(client_connect(&c, "127.0.0.1", srv.port, NULL), 0);
	/* queued until the loop runs: all of it, and the CRLF */
	assert_int_equal(ms_conn_printf(c.conn, "%s\r\n", big), 0);
	assert_int_equal(ms_conn_write_pending(c.conn), sizeof(big) + 1);
	assert_int_equal(ms_conn_printf(c.conn, "%d", 7), 0);
	assert_int_equal(ms_conn_write_pending(c.conn), sizeof(big) + 2);
	client_fini(&c);
	plain_srv_stop(&srv);
	drain_loop();
}

static void test_plain_refused(void **state)
{
	struct sockaddr_in sin;
	struct sockaddr_storage ss;
	int len = sizeof(ss);
	char want[128];
	static uv_tcp_t tmp;
	static struct client c;
	uint16_t port;

	/* a port that was just free: bind, look, close */
	uv_tcp_init(&loop, &tmp);
	uv_ip4_addr("127.0.0.1", 0, &sin);
	assert_int_equal(uv_tcp_bind(&tmp, (struct sockaddr *)&sin, 0), 0);
	assert_int_equal(uv_tcp_getsockname(&tmp, (struct sockaddr *)&ss, &len),
			 0);
	port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
	uv_close((uv_handle_t *)&tmp, noop_close);
	drain_loop();

	client_init(&c);
	assert_int_equal(client_connect(&c, "127.0.0.1", port, NULL), 0);
	/* written before the connection exists: dropped with it */
	assert_int_equal(ms_conn_write(c.conn, "x", 1), 0);
	run_loop();
	assert_int_equal(c.connects, 1);
	assert_int_equal(c.connect_status, UV_ECONNREFUSED);
	snprintf(want, sizeof(want),
		 "connect to 127.0.0.1:%u: connection refused", port);
	assert_string_equal(c.connect_err, want);
	assert_int_equal(c.errors, 0);
	assert_true(ms_conn_write(c.conn, "x", 1) < 0);
	client_fini(&c);
	drain_loop();
	assert_int_equal(c.late, 0);
}

static void test_plain_eof(void **state)
{
	static struct plain_srv srv;
	static struct client c;

	plain_srv_start(&srv, SRV_BYE);
	client_init(&c);
	/* by name: resolution, and any address that refuses is skipped */
	assert_int_equal(client_connect(&c, "localhost", srv.port, NULL), 0);
	run_loop();
	assert_int_equal(c.connects, 1);
	assert_int_equal(c.connect_status, 0);
	assert_string_equal(c.text, "bye\r\n");
	assert_int_equal(c.errors, 1);
	assert_string_equal(c.error, "connection closed by server");
	assert_true(ms_conn_write(c.conn, "x", 1) < 0);
	/* more loop turns: still only one error */
	uv_run(&loop, UV_RUN_NOWAIT);
	assert_int_equal(c.errors, 1);
	client_fini(&c);
	plain_srv_stop(&srv);
	drain_loop();
	assert_int_equal(c.late, 0);
}

static void test_plain_reset(void **state)
{
	static struct plain_srv srv;
	static struct client c;

	plain_srv_start(&srv, SRV_RESET);
	client_init(&c);
	assert_int_equal(client_connect(&c, "127.0.0.1", srv.port, NULL), 0);
	assert_int_equal(ms_conn_write(c.conn, "hi\r\n", 4), 0);
	run_loop();
	assert_int_equal(c.connect_status, 0);
	assert_int_equal(c.errors, 1);
	assert_string_equal(c.error, "read error: connection reset by peer");
	client_fini(&c);
	plain_srv_stop(&srv);
	drain_loop();
	assert_int_equal(c.late, 0);
}

static void test_bad_args(void **state)
{
	struct ms_conn_callbacks cb = {
		.on_connect = cl_on_connect,
		.on_read = cl_on_read,
	};
	struct ms_conn *conn = (struct ms_conn *)&cb;

	assert_int_equal(ms_conn_connect(&loop, NULL, 1, NULL, &cb, &conn),
			 UV_EINVAL);
	assert_null(conn);
	cb.on_connect = NULL;
	assert_int_equal(ms_conn_connect(&loop, "127.0.0.1", 1, NULL, &cb,
					 &conn), UV_EINVAL);
	ms_conn_close(NULL);
	ms_conn_close(&conn);
	assert_int_equal(ms_conn_write_pending(NULL), 0);
}

/* Closes a connection at every early stage (resolving, connecting, just
 * connected, handshaking, with writes in flight): no callback may follow,
 * and everything must be released (the teardown checks the loop is empty,
 * valgrind checks the memory). */
static void close_at_stages(uint16_t port, const struct ms_tls_opts *tls)
{
	static char big[2 * 1024 * 1024];
	static struct client c;
	int stage, i;

	for (stage = 0; stage < 24; stage++) {
		client_init(&c);
		assert_int_equal(client_connect(&c, "127.0.0.1", port, tls),
				 0);
		assert_int_equal(ms_conn_write(c.conn, "hello\n", 6), 0);
		if (stage & 1)
			assert_int_equal(ms_conn_write(c.conn, big,
						       sizeof(big)), 0);
		for (i = 0; i < stage / 2; i++) {
			usleep(300);
			uv_run(&loop, UV_RUN_NOWAIT);
		}
		client_fini(&c);
		drain_loop();
		assert_int_equal(c.late, 0);
		assert_true(c.connects <= 1);
		assert_int_equal(c.errors, 0);
	}
}

static void test_plain_close_anytime(void **state)
{
	static struct plain_srv srv;

	plain_srv_start(&srv, SRV_ECHO);
	close_at_stages(srv.port, NULL);
	plain_srv_stop(&srv);
}

/* ---- TLS tests --------------------------------------------------------- */

static void echo_connected(struct client *c)
{
	produce(c);
}

static void test_tls_implicit_echo(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem };
	static struct tls_srv srv;
	static struct client c;

	tls_srv_start(&srv, TLS_ECHO);
	client_init(&c);
	c.total = 3 * 1024 * 1024;
	c.got_data = check_pattern;
	c.connected = echo_connected;
	assert_int_equal(client_connect(&c, "127.0.0.1", srv.port, &tls), 0);
	/* written before the handshake: kept as plaintext until it's done */
	assert_int_equal(ms_conn_write(c.conn, "", 0), 0);
	produce(&c);
	assert_true(ms_conn_write_pending(c.conn) >= MS_CONN_HIGH_WATER);
	run_loop();

	assert_int_equal(c.connect_status, 0);
	assert_string_equal(c.connect_err, "");
	assert_int_equal(c.errors, 0);
	assert_int_equal(ms_conn_is_tls(c.conn), 1);
	assert_int_equal(c.rx, c.total);
	assert_int_equal(c.rx_bad, 0);
	assert_true(c.drains >= 1);
	client_fini(&c);
	drain_loop();
	tls_srv_stop(&srv);
	assert_int_equal(srv.handshakes, 1);
	assert_int_equal(srv.sni_seen, 2);	/* no SNI for an IP address */
	assert_int_equal(c.late, 0);
}

static void ping_connected(struct client *c)
{
	assert_int_equal(ms_conn_write(c->conn, "ping\n", 5), 0);
}

static void ping_data(struct client *c, const char *data, size_t len)
{
	if (c->text_len + len < sizeof(c->text)) {
		memcpy(c->text + c->text_len, data, len);
		c->text_len += len;
		c->text[c->text_len] = 0;
	}
	if (strchr(c->text, '\n'))
		uv_stop(&loop);
}

/* Connects with tls, sends a line, expects it echoed (when ok), or the
 * connect error (when not). */
static void tls_ping(const struct ms_tls_opts *tls, struct tls_srv *srv,
		     struct client *c)
{
	tls_srv_start(srv, TLS_ECHO);
	client_init(c);
	c->connected = ping_connected;
	c->got_data = ping_data;
	assert_int_equal(client_connect(c, "127.0.0.1", srv->port, tls), 0);
	run_loop();
	client_fini(c);
	drain_loop();
	tls_srv_stop(srv);
	assert_int_equal(c->late, 0);
	assert_int_equal(c->connects, 1);
	assert_int_equal(c->errors, 0);
}

static void test_tls_server_name(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem,
				   .server_name = "localhost" };
	static struct tls_srv srv;
	static struct client c;

	tls_ping(&tls, &srv, &c);
	assert_int_equal(c.connect_status, 0);
	assert_string_equal(c.text, "ping\n");
	assert_int_equal(srv.sni_seen, 1);
	assert_string_equal(srv.sni, "localhost");
}

static void test_tls_wrong_ca(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT,
				   .ca_file = other_pem };
	static struct tls_srv srv;
	static struct client c;

	tls_ping(&tls, &srv, &c);
	assert_true(c.connect_status < 0);
	assert_string_equal(c.connect_err, "certificate verify failed: "
			    "unable to get local issuer certificate");
	assert_int_equal(srv.handshakes, 0);
}

static void test_tls_insecure(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT,
				   .ca_file = other_pem, .insecure = 1,
				   .server_name = "wrong.example.org" };
	static struct tls_srv srv;
	static struct client c;

	tls_ping(&tls, &srv, &c);
	assert_int_equal(c.connect_status, 0);
	assert_string_equal(c.text, "ping\n");
}

static void test_tls_name_mismatch(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem,
				   .server_name = "imap.example.org" };
	static struct tls_srv srv;
	static struct client c;

	tls_ping(&tls, &srv, &c);
	assert_true(c.connect_status < 0);
	assert_string_equal(c.connect_err,
			    "certificate verify failed: hostname mismatch");
}

static void test_tls_ip_mismatch(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem,
				   .server_name = "127.0.0.2" };
	static struct tls_srv srv;
	static struct client c;

	tls_ping(&tls, &srv, &c);
	assert_true(c.connect_status < 0);
	assert_string_equal(c.connect_err,
			    "certificate verify failed: IP address mismatch");
}

static void test_tls_bad_ca_file(void **state)
{
	char missing[256];
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT,
				   .ca_file = missing };
	static struct tls_srv srv;
	static struct client c;

	snprintf(missing, sizeof(missing), "%s/missing.pem", tmpdir);
	tls_ping(&tls, &srv, &c);
	assert_true(c.connect_status < 0);
	assert_non_null(strstr(c.connect_err,
			       "TLS error: cannot load CA file"));
	assert_non_null(strstr(c.connect_err, missing));
}

/* The server sends 2 MB and closes; the reader pauses every 256 KiB for
 * 20 ms. Decrypted data OpenSSL already holds must wait too, and the EOF
 * must only be reported after the last byte. */
static void tp_resume(uv_timer_t *t)
{
	struct client *c = t->data;

	c->paused = 0;
	ms_conn_read_pause(c->conn, 0);
}

static void tp_data(struct client *c, const char *data, size_t len)
{
	c->rx_bad += count_bad((const unsigned char *)data, c->rx, len);
	c->rx += len;
	if (c->rx >= c->next_pause) {
		c->next_pause += 256 * 1024;
		c->pauses++;
		c->paused = 1;
		ms_conn_read_pause(c->conn, 1);
		uv_timer_start(&c->timer, tp_resume, 20, 0);
	}
}

static void test_tls_pause_buffered(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem,
				   .server_name = "localhost" };
	static struct tls_srv srv;
	static struct client c;

	tls_srv_start(&srv, TLS_SEND);
	srv.send_total = 2 * 1024 * 1024;
	client_init(&c);
	c.got_data = tp_data;
	c.next_pause = 256 * 1024;
	assert_int_equal(client_connect(&c, "127.0.0.1", srv.port, &tls), 0);
	run_loop();
	assert_int_equal(c.connect_status, 0);
	assert_int_equal(c.errors, 1);
	assert_string_equal(c.error, "connection closed by server");
	assert_int_equal(c.rx_at_error, srv.send_total);
	assert_int_equal(c.rx_bad, 0);
	assert_int_equal(c.read_while_paused, 0);
	assert_true(c.pauses >= 7);
	client_fini(&c);
	drain_loop();
	tls_srv_stop(&srv);
	assert_int_equal(c.late, 0);
}

static void test_tls_close_anytime(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem };
	static struct tls_srv srv;

	tls_srv_start(&srv, TLS_ECHO);
	close_at_stages(srv.port, &tls);
	tls_srv_stop(&srv);
}

/* ---- STARTTLS ---------------------------------------------------------- */

static void st_done(struct ms_conn *conn, int status, const char *error)
{
	struct client *c = ms_conn_ctx(conn);

	if (c->closed)
		c->late++;
	c->tls_done++;
	c->tls_done_status = status;
	snprintf(c->tls_done_err, sizeof(c->tls_done_err), "%s",
		 error ? error : "");
	if (status < 0)
		uv_stop(&loop);
}

static void st_data(struct client *c, const char *data, size_t len)
{
	if (c->text_len + len < sizeof(c->text)) {
		memcpy(c->text + c->text_len, data, len);
		c->text_len += len;
		c->text[c->text_len] = 0;
	}
	if (!strchr(c->text, '\n'))
		return;
	switch (c->starttls_state) {
	case 0:
		assert_string_equal(c->text, "* OK test server ready\r\n");
		assert_int_equal(ms_conn_is_tls(c->conn), 0);
		assert_int_equal(ms_conn_write(c->conn, "STARTTLS\r\n", 10),
				 0);
		break;
	case 1:
		assert_string_equal(c->text, "OK begin TLS now\r\n");
		assert_int_equal(ms_conn_starttls(c->conn, st_done), 0);
		assert_int_equal(ms_conn_starttls(c->conn, st_done),
				 UV_EALREADY);
		assert_int_equal(c->tls_done, 0);	/* never synchronous */
		/* sent once the handshake is done, encrypted */
		assert_int_equal(ms_conn_write(c->conn, "secret\n", 7), 0);
		assert_int_equal(ms_conn_is_tls(c->conn), 1);
		break;
	default:
		assert_string_equal(c->text, "secret\n");
		uv_stop(&loop);
		break;
	}
	c->starttls_state++;
	c->text_len = 0;
	c->text[0] = 0;
}

static void starttls_run(const char *ca, struct client *c,
			 struct tls_srv *srv)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_STARTTLS, .ca_file = ca };

	tls_srv_start(srv, TLS_STARTTLS);
	client_init(c);
	c->got_data = st_data;
	assert_int_equal(client_connect(c, "127.0.0.1", srv->port, &tls), 0);
	run_loop();
	client_fini(c);
	drain_loop();
	tls_srv_stop(srv);
	assert_int_equal(c->late, 0);
	assert_int_equal(c->connect_status, 0);
	assert_int_equal(c->errors, 0);
	assert_int_equal(c->tls_done, 1);
}

static void test_starttls(void **state)
{
	static struct tls_srv srv;
	static struct client c;

	starttls_run(ca_pem, &c, &srv);
	assert_int_equal(c.tls_done_status, 0);
	assert_int_equal(c.starttls_state, 3);
	assert_int_equal(srv.handshakes, 1);
}

static void test_starttls_wrong_ca(void **state)
{
	static struct tls_srv srv;
	static struct client c;

	starttls_run(other_pem, &c, &srv);
	assert_true(c.tls_done_status < 0);
	assert_string_equal(c.tls_done_err, "certificate verify failed: "
			    "unable to get local issuer certificate");
	assert_int_equal(c.starttls_state, 2);
}

/* STARTTLS, but the server hangs up instead of negotiating. */
static void sb_data(struct client *c, const char *data, size_t len)
{
	assert_int_equal(ms_conn_starttls(c->conn, st_done), 0);
}

static void test_starttls_server_hangs_up(void **state)
{
	struct ms_tls_opts tls = { .mode = MS_TLS_STARTTLS, .ca_file = ca_pem };
	static struct plain_srv srv;
	static struct client c;

	plain_srv_start(&srv, SRV_BYE);
	client_init(&c);
	c.got_data = sb_data;
	assert_int_equal(client_connect(&c, "127.0.0.1", srv.port, &tls), 0);
	run_loop();
	assert_int_equal(c.tls_done, 1);
	assert_true(c.tls_done_status < 0);
	/* the EOF, or the ClientHello hitting the closed socket */
	assert_true(strncmp(c.tls_done_err, "TLS error: ", 11) == 0 ||
		    strncmp(c.tls_done_err, "write error: ", 13) == 0 ||
		    strncmp(c.tls_done_err, "read error: ", 12) == 0);
	assert_int_equal(c.errors, 0);
	client_fini(&c);
	plain_srv_stop(&srv);
	drain_loop();
	assert_int_equal(c.late, 0);
}

/* ---- server side: helpers ---------------------------------------------- */

/* A listener made by ms_listen; each accepted connection goes to `sess`, a
 * struct client recording its callbacks like an outgoing one. */
struct listener {
	uv_tcp_t tcp;
	uint16_t port;
	struct ms_tls_server *tls;
	struct client *sess;
	int accepts;
	int accept_status;
	int connects_at_accept;	/* on_connect calls inside accept: 0 */
	int close_at_accept;
};

static const struct ms_conn_callbacks sess_cb = {
	.on_connect = cl_on_connect,
	.on_read = cl_on_read,
	.on_error = cl_on_error,
	.on_drain = cl_on_drain,
};

static void on_listen_conn(uv_stream_t *server, int status)
{
	struct listener *l = server->data;
	struct ms_conn_callbacks cb = sess_cb;
	struct client *s = l->sess;

	assert_int_equal(status, 0);
	assert_non_null(s);
	assert_null(s->conn);
	cb.ctx = s;
	l->accepts++;
	l->accept_status = ms_conn_accept(server, l->tls, &cb, &s->conn);
	l->connects_at_accept = s->connects;
	if (l->close_at_accept)
		client_fini(s);
}

static uint16_t handle_port(uv_tcp_t *tcp, int peer)
{
	struct sockaddr_storage ss;
	int len = sizeof(ss);

	if (peer)
		assert_int_equal(uv_tcp_getpeername(tcp, (struct sockaddr *)&ss,
						    &len), 0);
	else
		assert_int_equal(uv_tcp_getsockname(tcp, (struct sockaddr *)&ss,
						    &len), 0);
	/* sin_port and sin6_port are at the same place */
	return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void listener_start(struct listener *l, const char *addr,
			   struct ms_tls_server *tls, uv_connection_cb cb)
{
	char err[256];

	memset(l, 0, sizeof(*l));
	l->tls = tls;
	l->tcp.data = l;
	assert_int_equal(ms_listen(&loop, &l->tcp, addr, 0,
				   cb ? cb : on_listen_conn, err, sizeof(err)),
			 0);
	assert_ptr_equal(l->tcp.data, l);	/* kept */
	l->port = handle_port(&l->tcp, 0);
	/* the listener alone doesn't keep the loop running */
	uv_unref((uv_handle_t *)&l->tcp);
}

static void listener_stop(struct listener *l)
{
	uv_close((uv_handle_t *)&l->tcp, noop_close);
}

/* Echo on an accepted connection, with backpressure: reading pauses while
 * more than MS_CONN_HIGH_WATER waits to be sent, on_drain resumes it. */
static void echo_data(struct client *s, const char *data, size_t len)
{
	assert_int_equal(ms_conn_write(s->conn, data, len), 0);
	s->rx += len;
	if (ms_conn_write_pending(s->conn) >= MS_CONN_HIGH_WATER) {
		s->paused = 1;
		s->pauses++;
		ms_conn_read_pause(s->conn, 1);
	}
}

static void echo_resume(struct client *s)
{
	if (s->paused) {
		s->paused = 0;
		ms_conn_read_pause(s->conn, 0);
	}
}

static void sess_init_echo(struct client *s)
{
	client_init(s);
	s->got_data = echo_data;
	s->connected = echo_resume;	/* on_connect and on_drain */
}

static void check_addr(const struct ms_conn *conn, int peer,
		       const char *want, uint16_t want_port)
{
	char addr[INET6_ADDRSTRLEN];
	uint16_t port = 0;

	if (peer)
		assert_int_equal(ms_conn_peer_addr(conn, addr, sizeof(addr),
						   &port), 0);
	else
		assert_int_equal(ms_conn_local_addr(conn, addr, sizeof(addr),
						    &port), 0);
	assert_string_equal(addr, want);
	assert_int_equal(port, want_port);
}

/* Pattern through an accepted connection that echoes it, then the client
 * hangs up: the session sees "connection closed by client". The client
 * reads nothing for the first 200 ms (bp_connected), so the session's
 * writes pile up and it has to pause reading with input unread (under TLS:
 * ciphertext OpenSSL has not taken, which must leave the shared buffer). */
static void accept_echo_run(struct ms_tls_server *tls,
			    const struct ms_tls_opts *opts, uint64_t total)
{
	static struct listener l;
	static struct client c, s;
	char addr[INET6_ADDRSTRLEN];
	uint16_t cport, port;

	listener_start(&l, "127.0.0.1:0", tls, NULL);
	sess_init_echo(&s);
	l.sess = &s;
	client_init(&c);
	c.total = total;
	c.got_data = check_pattern;
	c.connected = bp_connected;
	assert_int_equal(client_connect(&c, "127.0.0.1", l.port, opts), 0);
	c.paused = 1;
	ms_conn_read_pause(c.conn, 1);
	run_loop();

	assert_int_equal(l.accepts, 1);
	assert_int_equal(l.accept_status, 0);
	assert_int_equal(l.connects_at_accept, 0);	/* never synchronous */
	assert_int_equal(s.connects, 1);
	assert_int_equal(s.connect_status, 0);
	assert_int_equal(s.errors, 0);
	assert_int_equal(s.read_while_paused, 0);
	assert_true(s.pauses >= 1);
	assert_true(s.drains >= 1);
	assert_int_equal(s.rx, total);
	assert_int_equal(ms_conn_is_tls(s.conn), tls != NULL);
	assert_int_equal(c.connect_status, 0);
	assert_int_equal(c.errors, 0);
	assert_int_equal(c.rx, total);
	assert_int_equal(c.rx_bad, 0);
	assert_int_equal(c.read_while_paused, 0);
	assert_int_equal(ms_conn_is_tls(c.conn), tls != NULL);
	print_message("session paused %d times\n", s.pauses);

	/* addresses, both ends */
	assert_int_equal(ms_conn_local_addr(c.conn, addr, sizeof(addr),
					    &cport), 0);
	assert_string_equal(addr, "127.0.0.1");
	check_addr(s.conn, 0, "127.0.0.1", l.port);
	check_addr(s.conn, 1, "127.0.0.1", cport);
	check_addr(c.conn, 1, "127.0.0.1", l.port);
	assert_int_equal(ms_conn_peer_addr(s.conn, addr, 4, NULL), UV_ENOSPC);
	assert_int_equal(ms_conn_peer_addr(s.conn, NULL, 0, &port), 0);
	assert_int_equal(port, cport);

	/* the client leaves */
	client_fini(&c);
	run_loop();
	assert_int_equal(s.errors, 1);
	assert_string_equal(s.error, "connection closed by client");
	client_fini(&s);
	listener_stop(&l);
	drain_loop();
	assert_int_equal(c.late, 0);
	assert_int_equal(s.late, 0);
}

/* ---- server side: tests ------------------------------------------------ */

static void test_accept_plain_echo(void **state)
{
	accept_echo_run(NULL, NULL, 8 * 1024 * 1024);
}

static void test_accept_tls_echo(void **state)
{
	struct ms_tls_opts opts = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem,
				    .server_name = "localhost" };

	accept_echo_run(server_tls, &opts, 3 * 1024 * 1024);
}

/* The server side of STARTTLS, talking to our STARTTLS client (st_data). */
static void srv_greet(struct client *s)
{
	const char *greet = "* OK test server ready\r\n";

	assert_int_equal(ms_conn_write(s->conn, greet, strlen(greet)), 0);
}

static void srv_st_data(struct client *s, const char *data, size_t len)
{
	const char *go = "OK begin TLS now\r\n";

	assert_true(s->text_len + len < sizeof(s->text));
	memcpy(s->text + s->text_len, data, len);
	s->text_len += len;
	s->text[s->text_len] = 0;
	if (!strchr(s->text, '\n'))
		return;
	if (s->starttls_state == 0) {
		assert_string_equal(s->text, "STARTTLS\r\n");
		assert_int_equal(ms_conn_is_tls(s->conn), 0);
		assert_int_equal(ms_conn_write(s->conn, go, strlen(go)), 0);
		assert_int_equal(ms_conn_starttls_server(s->conn, server_tls,
							 st_done), 0);
		assert_int_equal(ms_conn_starttls_server(s->conn, server_tls,
							 st_done),
				 UV_EALREADY);
		assert_int_equal(ms_conn_starttls(s->conn, st_done),
				 UV_EINVAL);	/* not the client's */
		assert_int_equal(s->tls_done, 0);	/* never synchronous */
		assert_int_equal(ms_conn_is_tls(s->conn), 1);
	} else {
		assert_string_equal(s->text, "secret\n");
		assert_int_equal(s->tls_done, 1);
		assert_int_equal(s->tls_done_status, 0);
		assert_int_equal(ms_conn_write(s->conn, s->text, s->text_len),
				 0);
	}
	s->starttls_state++;
	s->text_len = 0;
	s->text[0] = 0;
}

static void test_starttls_server(void **state)
{
	struct ms_tls_opts opts = { .mode = MS_TLS_STARTTLS, .ca_file = ca_pem,
				    .server_name = "localhost" };
	static struct listener l;
	static struct client c, s;

	listener_start(&l, "127.0.0.1:0", NULL, NULL);
	client_init(&s);
	s.connected = srv_greet;
	s.got_data = srv_st_data;
	l.sess = &s;
	client_init(&c);
	c.got_data = st_data;
	assert_int_equal(client_connect(&c, "127.0.0.1", l.port, &opts), 0);
	run_loop();

	assert_int_equal(c.connect_status, 0);
	assert_int_equal(c.errors, 0);
	assert_int_equal(c.tls_done, 1);
	assert_int_equal(c.tls_done_status, 0);
	assert_int_equal(c.starttls_state, 3);	/* "secret" came back */
	assert_int_equal(s.connects, 1);
	assert_int_equal(s.connect_status, 0);
	assert_int_equal(s.errors, 0);
	assert_int_equal(s.tls_done, 1);
	assert_int_equal(s.tls_done_status, 0);
	assert_int_equal(s.starttls_state, 2);
	client_fini(&c);
	client_fini(&s);
	listener_stop(&l);
	drain_loop();
	assert_int_equal(c.late, 0);
	assert_int_equal(s.late, 0);
}

/* A TLS port that gets no ClientHello: on_connect must report a TLS error
 * at once, once, and the client must see the connection closed after the
 * session's close. "At once" is an order, not a time: net.c has no timer,
 * so a late error can only be one that waited for bytes that never come
 * (the 5 s loop guard fails that); the error must come on the bytes sent,
 * with the client still connected and silent (or on its hang-up). */
static const char *garbage_bytes;
static size_t garbage_len;

static void garbage_connected(struct client *c)
{
	if (garbage_bytes)
		assert_int_equal(ms_conn_write(c->conn, garbage_bytes,
					       garbage_len), 0);
	else
		client_fini(c);		/* says nothing, hangs up */
}

static void test_accept_tls_garbage(void **state)
{
	static unsigned char binary[4096];
	static const struct {
		const char *data;
		size_t len;
	} cases[] = {
		{ "hello\r\n", 7 },
		{ "a001 CAPABILITY\r\n", 17 },
		{ "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27 },
		/* a handshake record holding an unknown message */
		{ "\x16\x03\x01\x00\x04\x63\x63\x63\x63", 9 },
		/* a record header announcing 64 KiB */
		{ "\x16\x03\x01\xff\xff....", 9 },
		{ (const char *)binary, sizeof(binary) },
		{ NULL, 0 },
	};
	static struct listener l;
	static struct client c, s;
	uint64_t t0, ms;
	size_t i;

	fill_pat(binary, 0, sizeof(binary));
	listener_start(&l, "127.0.0.1:0", server_tls, NULL);
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		garbage_bytes = cases[i].data;
		garbage_len = cases[i].len;
		client_init(&s);
		l.sess = &s;
		client_init(&c);
		c.connected = garbage_connected;
		t0 = uv_hrtime();
		assert_int_equal(client_connect(&c, "127.0.0.1", l.port, NULL),
				 0);
		run_loop();	/* cl_on_connect stops it on the error */
		ms = (uv_hrtime() - t0) / 1000000;
		print_message("garbage case %zu: \"%s\" after %llu ms\n", i,
			      s.connect_err, (unsigned long long)ms);
		if (cases[i].data) {
			/* on the bytes alone: no hang-up, no error yet */
			assert_int_equal(c.closed, 0);
			assert_int_equal(c.errors, 0);
			assert_null(strstr(s.connect_err, "closed by client"));
		}
		assert_int_equal(s.connects, 1);
		assert_true(s.connect_status < 0);
		assert_int_equal(strncmp(s.connect_err, "TLS error: ", 11), 0);
		if (!cases[i].data)
			assert_string_equal(s.connect_err, "TLS error: "
					    "connection closed by client "
					    "during the handshake");
		assert_int_equal(s.errors, 0);
		assert_int_equal(ms_conn_is_tls(s.conn), 1);
		/* the caller closes; the client hears of it */
		client_fini(&s);
		if (!c.closed) {
			run_loop();
			assert_int_equal(c.errors, 1);
			client_fini(&c);
		}
		drain_loop();
		assert_int_equal(s.late, 0);
		assert_int_equal(c.late, 0);
		assert_int_equal(l.accepts, (int)i + 1);
	}
	listener_stop(&l);
}

static void test_tls_server_files(void **state)
{
	struct ms_tls_server *srv = (struct ms_tls_server *)&srv;
	char key[256], missing[256], err[512];
	char buf[4096];
	ssize_t n;
	int in, out;

	/* a copy of the key with mode 0644 */
	snprintf(key, sizeof(key), "%s/srv-0644.key", tmpdir);
	in = open(srv_key, O_RDONLY);
	out = open(key, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	assert_true(in >= 0 && out >= 0);
	while ((n = read(in, buf, sizeof(buf))) > 0)
		assert_int_equal(write(out, buf, (size_t)n), n);
	close(in);
	close(out);
	assert_int_equal(chmod(key, 0644), 0);
	assert_int_equal(ms_tls_server_new(srv_pem, key, &srv, err,
					   sizeof(err)), -1);
	assert_null(srv);
	print_message("%s\n", err);
	assert_non_null(strstr(err, key));
	assert_non_null(strstr(err, "mode 0644"));
	assert_non_null(strstr(err, "readable by its owner only"));
	assert_int_equal(chmod(key, 0640), 0);
	assert_int_equal(ms_tls_server_new(srv_pem, key, &srv, err,
					   sizeof(err)), -1);
	assert_non_null(strstr(err, "mode 0640"));
	/* 0400 is fine */
	assert_int_equal(chmod(key, 0400), 0);
	assert_int_equal(ms_tls_server_new(srv_pem, key, &srv, err,
					   sizeof(err)), 0);
	assert_non_null(srv);
	ms_tls_server_free(&srv);
	assert_null(srv);
	ms_tls_server_free(&srv);
	ms_tls_server_free(NULL);

	/* the wrong key for the certificate */
	assert_int_equal(ms_tls_server_new(srv_pem, other_key, &srv, err,
					   sizeof(err)), -1);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "does not go with the certificate"));
	/* no such files */
	snprintf(missing, sizeof(missing), "%s/missing.pem", tmpdir);
	assert_int_equal(ms_tls_server_new(srv_pem, missing, &srv, err,
					   sizeof(err)), -1);
	assert_non_null(strstr(err, "cannot open key file"));
	assert_int_equal(ms_tls_server_new(missing, srv_key, &srv, err,
					   sizeof(err)), -1);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "cannot load certificate chain"));
	/* a certificate is not a key */
	assert_int_equal(chmod(ca_pem, 0600), 0);
	assert_int_equal(ms_tls_server_new(srv_pem, ca_pem, &srv, err,
					   sizeof(err)), -1);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "cannot load key file"));
	assert_int_equal(chmod(ca_pem, 0644), 0);
	assert_null(srv);
}

static void test_listen_errors(void **state)
{
	static const char *bad[] = {
		"127.0.0.1", "localhost:143", "::1:143", "[::1]143",
		"127.0.0.1:65536", "127.0.0.1:", "127.0.0.1:14x", ":143",
		"[::1:143", "300.1.1.1:143",
	};
	static struct listener l;
	char addr[64], want[128], err[256];
	uv_tcp_t *t;
	size_t i;
	int r;

	/* a failed ms_listen leaves nothing to close: the handle is freed
	 * at once (valgrind would see a later use) */
	listener_start(&l, "127.0.0.1:0", NULL, NULL);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", l.port);
	t = malloc(sizeof(*t));
	assert_int_equal(ms_listen(&loop, t, addr, 0, on_listen_conn, err,
				   sizeof(err)), UV_EADDRINUSE);
	free(t);
	snprintf(want, sizeof(want), "bind %s: address already in use",
		 addr);
	assert_string_equal(err, want);
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = 0;
		t = malloc(sizeof(*t));
		assert_int_equal(ms_listen(&loop, t, bad[i], 0,
					   on_listen_conn, err, sizeof(err)),
				 UV_EINVAL);
		free(t);
		assert_non_null(strstr(err, "bad listen address"));
		assert_non_null(strstr(err, bad[i]));
	}
	/* not an address of this host */
	t = malloc(sizeof(*t));
	assert_int_equal(ms_listen(&loop, t, "192.0.2.1:0", 0, on_listen_conn,
				   err, sizeof(err)), UV_EADDRNOTAVAIL);
	free(t);
	assert_string_equal(err, "bind 192.0.2.1:0: address not available");
	/* IP_TRANSPARENT needs CAP_NET_ADMIN: either works (and so does a
	 * foreign address) or says why */
	t = malloc(sizeof(*t));
	r = ms_listen(&loop, t, "192.0.2.1:0", 1, on_listen_conn, err,
		      sizeof(err));
	if (r == 0) {
		uv_close((uv_handle_t *)t, on_close_free);
	} else {
		free(t);
		print_message("%s\n", err);
		assert_non_null(strstr(err, "IP_TRANSPARENT on 192.0.2.1:0"));
	}
	assert_false(uv_loop_alive(&loop) && r != 0);
	listener_stop(&l);
	drain_loop();
}

static void v6_connected(struct client *c)
{
	uv_stop(&loop);
}

static void test_accept_ipv6(void **state)
{
	static struct listener l;
	static struct client c, s;
	static uv_tcp_t probe;
	char err[256];
	uint16_t cport;
	int r;

	/* No IPv6 on this host (a container): the test cannot run. */
	r = ms_listen(&loop, &probe, "[::1]:0", 0, on_listen_conn, err,
		      sizeof(err));
	if (r < 0) {
		drain_loop();
		skip_or_fail("no IPv6 loopback here (%s)", err);
	}
	uv_close((uv_handle_t *)&probe, noop_close);
	listener_start(&l, "[::1]:0", NULL, NULL);
	client_init(&s);
	s.connected = v6_connected;
	l.sess = &s;
	client_init(&c);
	assert_int_equal(client_connect(&c, "::1", l.port, NULL), 0);
	run_loop();
	assert_int_equal(s.connect_status, 0);
	check_addr(s.conn, 0, "::1", l.port);
	assert_int_equal(ms_conn_local_addr(c.conn, NULL, 0, &cport), 0);
	check_addr(s.conn, 1, "::1", cport);
	check_addr(c.conn, 1, "::1", l.port);
	client_fini(&c);
	client_fini(&s);
	listener_stop(&l);
	drain_loop();
}

/* Whether this process may set IP_TRANSPARENT (CAP_NET_RAW or
 * CAP_NET_ADMIN). */
static int may_be_transparent(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0), on = 1, r;

	assert_true(fd >= 0);
	r = setsockopt(fd, SOL_IP, IP_TRANSPARENT, &on, sizeof(on));
	close(fd);
	return r == 0;
}

/* A connection from 127.0.0.9 to port, refused (nothing listens) or not
 * permitted; the error says both ends and why. */
static void connect_from_fails(uint16_t port, const char *why)
{
	static struct client c;
	char want[160];

	client_init(&c);
	assert_int_equal(client_connect(&c, "127.0.0.1", port, NULL), 0);
	assert_int_equal(ms_conn_set_source(c.conn, "127.0.0.9", 0), 0);
	run_loop();
	assert_int_equal(c.connects, 1);
	snprintf(want, sizeof(want), "connect to 127.0.0.1:%u from 127.0.0.9: "
		 "%s", port, why);
	assert_string_equal(c.connect_err, want);
	client_fini(&c);
	drain_loop();
	assert_int_equal(c.late, 0);
}

/* ms_conn_set_source(): the connection leaves from the given address (here
 * a loopback one other than 127.0.0.1, which the kernel would pick), on a
 * port the kernel picks; of the other family it is ignored; a name is
 * refused; a failed attempt says where from. Without CAP_NET_RAW the
 * connection fails, saying so, and leaves nothing behind. */
static void test_connect_from_source(void **state)
{
	static struct listener l;
	static struct client c, s;
	uint16_t cport, port;

	listener_start(&l, "127.0.0.1:0", NULL, NULL);
	port = l.port;
	for (int other = 0; other < 2 && may_be_transparent(); other++) {
		const char *want = other ? "127.0.0.1" : "127.0.0.9";

		client_init(&s);
		s.connected = v6_connected;
		l.sess = &s;
		client_init(&c);
		assert_int_equal(client_connect(&c, "127.0.0.1", port, NULL),
				 0);
		assert_int_equal(ms_conn_set_source(c.conn, "localhost", 0),
				 -1);
		assert_int_equal(ms_conn_set_source(c.conn, other ? "::1" :
						    "127.0.0.9", 0), 0);
		run_loop();
		assert_int_equal(s.connect_status, 0);
		assert_int_equal(ms_conn_local_addr(c.conn, NULL, 0, &cport),
				 0);
		assert_true(cport != 0);
		check_addr(s.conn, 1, want, cport);
		check_addr(c.conn, 0, want, cport);
		client_fini(&c);
		client_fini(&s);
		settle(100);	/* their handles closed before reuse */
	}
	if (!may_be_transparent()) {
		connect_from_fails(port, "operation not permitted");
		listener_stop(&l);
		drain_loop();
		return;
	}
	listener_stop(&l);
	drain_loop();
	connect_from_fails(port, "connection refused");
}

/* ---- acknowledgements: a relay must not stall a client's Nagle ---- */

#define ACK_ROUNDS 6

static int ack_rounds, ack_delayed;

/* 1 when the socket ACKs at once (not in the kernel's delayed-ACK
 * "pingpong" mode): what TCP_QUICKACK reads back. */
static int acks_at_once(struct ms_conn *conn)
{
	int fd = ms_conn_fileno(conn), v = -1;
	socklen_t len = sizeof(v);

	assert_true(fd >= 0);
	assert_int_equal(getsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &v, &len),
			 0);
	return v;
}

/* Both ends answer at once what they read (so the kernel takes them for
 * request-reply sockets and would delay its ACKs); each read must leave
 * the socket acknowledging at once again. */
static void ack_pingpong(struct client *c, const char *data, size_t len)
{
	if (!acks_at_once(c->conn))
		ack_delayed++;
	if (++ack_rounds >= 2 * ACK_ROUNDS) {
		uv_stop(&loop);
		return;
	}
	assert_int_equal(ms_conn_write(c->conn, "x", 1), 0);
}

static void ack_start(struct client *c)
{
	assert_int_equal(ms_conn_write(c->conn, "x", 1), 0);
}

static void ack_run(const char *listen_addr, const char *host)
{
	static struct listener l;
	static struct client c, s;

	ack_rounds = ack_delayed = 0;
	listener_start(&l, listen_addr, NULL, NULL);
	client_init(&s);
	s.got_data = ack_pingpong;
	l.sess = &s;
	client_init(&c);
	c.connected = ack_start;
	c.got_data = ack_pingpong;
	assert_int_equal(client_connect(&c, host, l.port, NULL), 0);
	run_loop();
	assert_int_equal(ack_rounds, 2 * ACK_ROUNDS);
	assert_int_equal(ack_delayed, 0);
	client_fini(&c);
	client_fini(&s);
	listener_stop(&l);
	drain_loop();
}

/* Every read, on accepted and outgoing connections, IPv4 and IPv6, leaves
 * the socket acknowledging at once (TCP_QUICKACK): a client that writes a
 * command in two pieces without TCP_NODELAY would otherwise wait ~40 ms
 * for the gateway's delayed ACK before sending the second. */
static void test_reads_acked_at_once(void **state)
{
	static uv_tcp_t probe;
	char err[256];

	ack_run("127.0.0.1:0", "127.0.0.1");
	if (ms_listen(&loop, &probe, "[::1]:0", 0, on_listen_conn, err,
		      sizeof(err)) < 0) {
		drain_loop();
		return;		/* no IPv6 loopback here */
	}
	uv_close((uv_handle_t *)&probe, noop_close);
	drain_loop();
	ack_run("[::1]:0", "::1");
}

/* Closes accepted connections at every early stage (in the accept callback,
 * before the deferred on_connect, during the handshake, with the client's
 * first bytes in flight): no callback may follow, everything must be
 * released (teardown checks the loop, valgrind the memory). */
static void accept_close_at_stages(struct ms_tls_server *tls,
				   const struct ms_tls_opts *opts)
{
	static char big[256 * 1024];
	static struct listener l;
	static struct client c, s;
	int stage, i;

	listener_start(&l, "127.0.0.1:0", tls, NULL);
	for (stage = 0; stage < 20; stage++) {
		client_init(&s);
		l.sess = &s;
		l.close_at_accept = stage == 0;
		client_init(&c);
		assert_int_equal(client_connect(&c, "127.0.0.1", l.port,
						 opts), 0);
		assert_int_equal(ms_conn_write(c.conn, "hello\n", 6), 0);
		if (stage & 1)
			assert_int_equal(ms_conn_write(c.conn, big,
						       sizeof(big)), 0);
		for (i = 0; i < 4000 && l.accepts == stage; i++) {
			uv_run(&loop, UV_RUN_NOWAIT);
			usleep(50);
		}
		assert_int_equal(l.accepts, stage + 1);
		assert_int_equal(l.accept_status, 0);
		for (i = 0; i < stage / 2; i++) {
			usleep(300);
			uv_run(&loop, UV_RUN_NOWAIT);
		}
		if (!s.closed)
			client_fini(&s);
		/* the client hears of it, or not yet */
		uv_run(&loop, UV_RUN_NOWAIT);
		client_fini(&c);
		drain_loop();
		assert_int_equal(s.late, 0);
		assert_int_equal(c.late, 0);
		assert_true(s.connects <= 1);
		assert_int_equal(s.errors, 0);
		assert_int_equal(s.tls_done, 0);
	}
	listener_stop(&l);
	drain_loop();	/* l is used again */
}

static void test_accept_close_anytime(void **state)
{
	struct ms_tls_opts opts = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem };

	accept_close_at_stages(NULL, NULL);
	accept_close_at_stages(server_tls, &opts);
}

/* The server side of STARTTLS, closed while the handshake runs. */
static void srv_st_close(struct client *s, const char *data, size_t len)
{
	assert_int_equal(ms_conn_write(s->conn, "OK\r\n", 4), 0);
	assert_int_equal(ms_conn_starttls_server(s->conn, server_tls,
						 st_done), 0);
	client_fini(s);		/* done must never come */
	uv_stop(&loop);
}

static void test_starttls_server_close(void **state)
{
	static struct listener l;
	static struct client c, s;

	listener_start(&l, "127.0.0.1:0", NULL, NULL);
	client_init(&s);
	s.got_data = srv_st_close;
	l.sess = &s;
	client_init(&c);
	assert_int_equal(client_connect(&c, "127.0.0.1", l.port, NULL), 0);
	assert_int_equal(ms_conn_write(c.conn, "STARTTLS\r\n", 10), 0);
	run_loop();
	assert_int_equal(s.closed, 1);
	client_fini(&c);
	listener_stop(&l);
	drain_loop();
	assert_int_equal(s.late, 0);
	assert_int_equal(s.tls_done, 0);
	assert_int_equal(c.late, 0);
}

/* Last words: a BYE written just before ms_conn_close, in the same turn,
 * still reaches the peer (then the end of the connection, under TLS with
 * close_notify), whichever side closes. */
static void bye_and_close(struct client *x)
{
	assert_int_equal(ms_conn_write(x->conn, "* BYE bye\r\n", 11), 0);
	client_fini(x);
}

static void last_words_run(struct ms_tls_server *tls,
			   const struct ms_tls_opts *opts, int server_closes)
{
	static struct listener l;
	static struct client c, s;
	struct client *talker = server_closes ? &s : &c;
	struct client *hearer = server_closes ? &c : &s;

	listener_start(&l, "127.0.0.1:0", tls, NULL);
	client_init(&s);
	l.sess = &s;
	client_init(&c);
	talker->connected = bye_and_close;
	assert_int_equal(client_connect(&c, "127.0.0.1", l.port, opts), 0);
	run_loop();	/* until the hearer's on_error */
	assert_string_equal(hearer->text, "* BYE bye\r\n");
	assert_int_equal(hearer->errors, 1);
	assert_string_equal(hearer->error, server_closes ?
			    "connection closed by server" :
			    "connection closed by client");
	client_fini(hearer);
	listener_stop(&l);
	drain_loop();
	assert_int_equal(c.late, 0);
	assert_int_equal(s.late, 0);
}

static void test_close_sends_last_words(void **state)
{
	struct ms_tls_opts opts = { .mode = MS_TLS_IMPLICIT, .ca_file = ca_pem };

	last_words_run(NULL, NULL, 1);
	last_words_run(NULL, NULL, 0);
	last_words_run(server_tls, &opts, 1);
	last_words_run(server_tls, &opts, 0);
}

/* ---- memory per idle accepted session ---------------------------------- */

#define MEM_SESSIONS 200

static struct client mem_sess[MEM_SESSIONS];
static int mem_accepted;

static void mem_on_conn(uv_stream_t *server, int status)
{
	struct listener *l = server->data;
	struct ms_conn_callbacks cb = sess_cb;
	struct client *s;

	assert_int_equal(status, 0);
	assert_true(mem_accepted < MEM_SESSIONS);
	s = &mem_sess[mem_accepted++];
	client_init(s);
	s->connected = srv_greet;
	cb.ctx = s;
	assert_int_equal(ms_conn_accept(server, l->tls, &cb, &s->conn), 0);
}

static int raw_connect(uint16_t port)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	int fd;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	assert_true(fd >= 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons(port);
	assert_true(connect(fd, (struct sockaddr *)&sin, sizeof(sin)) == 0 ||
		    errno == EINPROGRESS);
	return fd;
}

/* n sessions, each greeted by the server and sent one command by its raw
 * client (through OpenSSL when tls), then left idle: returns the bytes
 * malloc'ed per session, with the clients' memory freed again. */
static long idle_sessions(struct listener *l, int n, int *fds)
{
	static const char cmd[] = "a1 NOOP\r\n";
	struct mallinfo2 before, after;
	SSL_CTX *cctx = NULL;
	SSL *ssl[MEM_SESSIONS];
	int i, done, r, turns;

	before = mallinfo2();
	mem_accepted = 0;
	/* raw clients are nothing to libuv: the loop must poll for them */
	uv_ref((uv_handle_t *)&l->tcp);
	if (l->tls) {
		cctx = SSL_CTX_new(TLS_client_method());
		assert_non_null(cctx);
	}
	for (i = 0; i < n; i++) {
		fds[i] = raw_connect(l->port);
		if (cctx) {
			ssl[i] = SSL_new(cctx);
			SSL_set_fd(ssl[i], fds[i]);
			SSL_set_connect_state(ssl[i]);
		}
	}
	/* handshakes (both ends on this thread), then the command */
	for (turns = 0, done = 0; done < n && turns < 20000; turns++) {
		uv_run(&loop, UV_RUN_NOWAIT);
		for (done = 0, i = 0; i < n; i++) {
			if (cctx && !SSL_is_init_finished(ssl[i])) {
				r = SSL_do_handshake(ssl[i]);
				if (r != 1)
					continue;
				assert_int_equal(SSL_write(ssl[i], cmd,
							   sizeof(cmd) - 1),
						 sizeof(cmd) - 1);
			} else if (!cctx && i >= mem_accepted) {
				continue;
			} else if (!cctx && mem_sess[i].text_len == 0 &&
				   !mem_sess[i].tx) {
				assert_int_equal(send(fds[i], cmd,
						      sizeof(cmd) - 1, 0),
						 sizeof(cmd) - 1);
				mem_sess[i].tx = 1;
			}
			done++;
		}
		usleep(100);
	}
	assert_int_equal(done, n);
	/* every session connected and got its command */
	for (turns = 0; turns < 20000; turns++) {
		for (done = 0, i = 0; i < mem_accepted; i++)
			done += mem_sess[i].connects == 1 &&
				strchr(mem_sess[i].text, '\n') != NULL;
		if (done == n)
			break;
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(100);
	}
	assert_int_equal(mem_accepted, n);
	assert_int_equal(done, n);
	for (i = 0; i < n; i++) {
		assert_int_equal(mem_sess[i].connect_status, 0);
		assert_string_equal(mem_sess[i].text, cmd);
		assert_int_equal(ms_conn_write_pending(mem_sess[i].conn), 0);
		if (cctx)
			SSL_free(ssl[i]);	/* the socket stays open */
	}
	SSL_CTX_free(cctx);
	uv_unref((uv_handle_t *)&l->tcp);
	settle(20);
	after = mallinfo2();
	return ((long)after.uordblks - (long)before.uordblks) / n;
}

static void idle_sessions_end(int n, int *fds)
{
	int i;

	for (i = 0; i < n; i++) {
		close(fds[i]);
		assert_int_equal(mem_sess[i].errors, 0);
		client_fini(&mem_sess[i]);
		assert_int_equal(mem_sess[i].late, 0);
	}
	drain_loop();
}

static void test_idle_memory(void **state)
{
	static struct listener plain, tls;
	static int fds[MEM_SESSIONS];
	long per_plain, per_tls;

	listener_start(&plain, "127.0.0.1:0", NULL, mem_on_conn);
	listener_start(&tls, "127.0.0.1:0", server_tls, mem_on_conn);
	/* once first: the shared read buffer, OpenSSL's lazy set-up */
	idle_sessions(&plain, 1, fds);
	idle_sessions_end(1, fds);
	idle_sessions(&tls, 1, fds);
	idle_sessions_end(1, fds);

	per_plain = idle_sessions(&plain, MEM_SESSIONS, fds);
	idle_sessions_end(MEM_SESSIONS, fds);
	per_tls = idle_sessions(&tls, MEM_SESSIONS, fds);
	idle_sessions_end(MEM_SESSIONS, fds);
	print_message("idle accepted session: %ld bytes plaintext, %ld bytes "
		      "TLS (malloc'ed, %d sessions)\n", per_plain, per_tls,
		      MEM_SESSIONS);
	/* 0 under valgrind, whose malloc mallinfo2 doesn't see */
	assert_true(per_plain <= 8 * 1024);
	assert_true(per_tls <= 40 * 1024);
	listener_stop(&plain);
	listener_stop(&tls);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_bad_args, setup, teardown),
		cmocka_unit_test_setup_teardown(test_plain_echo_backpressure,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_printf_whole, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_plain_refused, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_plain_eof, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_plain_reset, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_plain_close_anytime, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_implicit_echo, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_server_name, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_wrong_ca, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_insecure, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_name_mismatch, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_ip_mismatch, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_bad_ca_file, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_pause_buffered, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_close_anytime, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_starttls, setup, teardown),
		cmocka_unit_test_setup_teardown(test_starttls_wrong_ca, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_starttls_server_hangs_up,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_accept_plain_echo, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_accept_tls_echo, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_starttls_server, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_accept_tls_garbage, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_tls_server_files, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_listen_errors, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_accept_ipv6, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_connect_from_source,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_accept_close_anytime,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_starttls_server_close,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_close_sends_last_words,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_idle_memory, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_reads_acked_at_once, setup,
						teardown),
	};

	/* a peer that hangs up must not kill the test with SIGPIPE */
	signal(SIGPIPE, SIG_IGN);
	if (getenv("TEST_FILTER"))
		cmocka_set_test_filter(getenv("TEST_FILTER"));
	return cmocka_run_group_tests(tests, make_certs, remove_certs);
}
