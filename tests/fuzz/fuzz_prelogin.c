/* libFuzzer target: what a client can make the gateway do before it has
 * logged in (IMAP, POP3, inbound SMTP, submission), through the public API
 * of daemon/gateway.h, in this process.
 *
 * Set up once: a libuv loop; a store in a scratch directory under $TMPDIR
 * (tests/fuzz/run gives each target one of its own, emptied every run: a
 * crash leaves it behind);
 * fake IMAP, POP3 and SMTP servers on loopback, served by this same loop,
 * that greet, answer CAPABILITY / CAPA / EHLO, take mail and refuse every
 * login; a gateway whose source and destination are those servers, with
 * listeners on 127.0.0.1 for the four protocols, STARTTLS with a throwaway
 * certificate, and users in each state (unknown = source, "moved" on the
 * destination, "flipping" in cutover, domains with other policies).
 *
 * Per input: byte 0 picks the protocol (bits 0-1: IMAP, POP3, SMTP,
 * submission); byte 1 how the rest is cut into the chunks a client socket
 * sends: 0 all at once, 1 line by line, else at points that byte seeds.
 * Each chunk is followed by loop turns until nothing moves. When the
 * gateway says go ahead to STARTTLS / STLS, the client does a TLS handshake
 * and sends the rest over TLS. At the end the client half-closes and we
 * run the loop until the gateway has closed its side. Each client
 * comes from an address of its own in 127.0.0.0/8, so that the gateway's
 * penalty for failed logins starts from zero every time. Oracles, besides
 * the sanitizers: the gateway closes every session whose client has gone,
 * in a bounded number of loop turns, and keeps no session afterwards.
 */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <uv.h>

#include "gateway.h"
#include "log.h"
#include "store.h"

#define QUIET_TURNS 4		/* loop turns without any I/O: settled */
#define MAX_TURNS 400		/* per chunk, and to see the client out */

/* ---- fake servers: one line-based responder per protocol ---- */

enum { FS_CMD, FS_SASL, FS_DATA, FS_CLOSED };

struct fake {
	uv_tcp_t tcp;
	int proto;			/* MS_GW_IMAP, POP3, SMTP, SUBMISSION */
	int state;
	char tag[64];			/* IMAP: the AUTHENTICATE's tag */
	char line[4096];
	size_t len;
};

struct wreq {
	uv_write_t req;
	char data[];
};

static uv_loop_t *loop;
static unsigned long activity;		/* bytes and connections seen */
static int verbose;			/* FUZZ_VERBOSE=1: show the dialogue */

static const char imap_caps[] = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE "
	"IDLE LITERAL+ AUTH=PLAIN";

static void on_fake_close(uv_handle_t *h)
{
	free(h->data);
}

static void fake_close(struct fake *f)
{
	if (f->state == FS_CLOSED)
		return;
	f->state = FS_CLOSED;
	uv_close((uv_handle_t *)&f->tcp, on_fake_close);
}

static void on_fake_written(uv_write_t *req, int status)
{
	free(req);
}

static void fake_send(struct fake *f, const char *text)
{
	size_t len = strlen(text);
	struct wreq *w;
	uv_buf_t buf;

	if (f->state == FS_CLOSED)
		return;
	if (verbose)
		fprintf(stderr, "  B%d: %s", f->proto, text);
	w = malloc(sizeof(*w) + len);
	assert(w != NULL);
	memcpy(w->data, text, len);
	buf = uv_buf_init(w->data, (unsigned int)len);
	if (uv_write(&w->req, (uv_stream_t *)&f->tcp, &buf, 1,
		     on_fake_written) < 0)
		free(w);
}

/* The reply to LOGOUT / QUIT, then the server hangs up. Also after a
 * refused login (the gateway hangs up then anyway): whoever closes first
 * keeps the connection in TIME_WAIT, and the gateway's side of a thousand
 * logins a second would soon use up the ephemeral ports it connects from. */
static void fake_bye(struct fake *f, const char *text)
{
	fake_send(f, text);
	fake_close(f);
}

static void fake_imap(struct fake *f, char *line)
{
	char reply[256], *cmd, *arg;

	if (f->state == FS_SASL) {
		snprintf(reply, sizeof(reply), "%s NO [AUTHENTICATIONFAILED] "
			 "Authentication failed.\r\n", f->tag);
		fake_bye(f, reply);
		return;
	}
	cmd = strchr(line, ' ');
	if (cmd == NULL) {
		fake_send(f, "* BAD Error in IMAP command.\r\n");
		return;
	}
	*cmd++ = '\0';
	snprintf(f->tag, sizeof(f->tag), "%s", line);
	arg = strchr(cmd, ' ');
	if (arg != NULL)
		*arg++ = '\0';
	if (!strcasecmp(cmd, "CAPABILITY")) {
		snprintf(reply, sizeof(reply), "* CAPABILITY %s\r\n%s OK Done.\r\n",
			 imap_caps, f->tag);
	} else if (!strcasecmp(cmd, "ID")) {
		snprintf(reply, sizeof(reply), "* ID (\"name\" \"fake\")\r\n"
			 "%s OK Done.\r\n", f->tag);
	} else if (!strcasecmp(cmd, "LOGOUT")) {
		snprintf(reply, sizeof(reply), "* BYE Bye.\r\n%s OK Done.\r\n",
			 f->tag);
		fake_bye(f, reply);
		return;
	} else if (!strcasecmp(cmd, "AUTHENTICATE") && arg != NULL &&
		   strchr(arg, ' ') == NULL) {
		f->state = FS_SASL;
		snprintf(reply, sizeof(reply), "+ \r\n");
	} else if (!strcasecmp(cmd, "AUTHENTICATE") || !strcasecmp(cmd, "LOGIN")) {
		snprintf(reply, sizeof(reply), "%s NO [AUTHENTICATIONFAILED] "
			 "Authentication failed.\r\n", f->tag);
		fake_bye(f, reply);
		return;
	} else {
		snprintf(reply, sizeof(reply), "%s BAD Unknown command.\r\n",
			 f->tag);
	}
	fake_send(f, reply);
}

static void fake_pop3(struct fake *f, char *line)
{
	if (f->state == FS_SASL) {
		fake_bye(f, "-ERR [AUTH] Authentication failed.\r\n");
	} else if (!strcasecmp(line, "CAPA")) {
		fake_send(f, "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
			  "PIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN\r\n.\r\n");
	} else if (!strcasecmp(line, "QUIT")) {
		fake_bye(f, "+OK Logging out.\r\n");
	} else if (!strncasecmp(line, "XCLIENT ", 8)) {
		fake_send(f, "+OK\r\n");
	} else if (!strcasecmp(line, "AUTH PLAIN")) {
		f->state = FS_SASL;
		fake_send(f, "+ \r\n");
	} else if (!strncasecmp(line, "AUTH ", 5) || !strncasecmp(line, "PASS ", 5)) {
		fake_bye(f, "-ERR [AUTH] Authentication failed.\r\n");
	} else if (!strncasecmp(line, "USER ", 5)) {
		fake_send(f, "+OK\r\n");
	} else {
		fake_send(f, "-ERR Unknown command.\r\n");
	}
}

static void fake_smtp(struct fake *f, char *line)
{
	if (f->state == FS_DATA) {
		if (!strcmp(line, ".")) {
			f->state = FS_CMD;
			fake_send(f, "250 2.0.0 Ok: queued as FAKE\r\n");
		}
		return;
	}
	if (f->state == FS_SASL) {
		f->state = FS_CMD;
		fake_send(f, "535 5.7.8 Error: authentication failed\r\n");
	} else if (!strncasecmp(line, "EHLO", 4)) {
		fake_send(f, "250-fake.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
			  "250-ETRN\r\n250-AUTH PLAIN LOGIN\r\n"
			  "250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN\r\n"
			  "250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n"
			  "250 SMTPUTF8\r\n");
	} else if (!strncasecmp(line, "HELO", 4)) {
		fake_send(f, "250 fake.test\r\n");
	} else if (!strncasecmp(line, "XCLIENT", 7)) {
		fake_send(f, "220 fake.test ESMTP\r\n");
	} else if (!strncasecmp(line, "MAIL", 4)) {
		fake_send(f, "250 2.1.0 Ok\r\n");
	} else if (!strncasecmp(line, "RCPT", 4)) {
		fake_send(f, strcasestr(line, "nobody") != NULL ?
			  "550 5.1.1 <nobody>: Recipient address rejected\r\n" :
			  "250 2.1.5 Ok\r\n");
	} else if (!strcasecmp(line, "DATA")) {
		f->state = FS_DATA;
		fake_send(f, "354 End data with <CR><LF>.<CR><LF>\r\n");
	} else if (!strcasecmp(line, "AUTH PLAIN")) {
		f->state = FS_SASL;
		fake_send(f, "334 \r\n");
	} else if (!strncasecmp(line, "AUTH", 4)) {
		fake_send(f, "535 5.7.8 Error: authentication failed\r\n");
	} else if (!strcasecmp(line, "RSET") || !strcasecmp(line, "NOOP")) {
		fake_send(f, "250 2.0.0 Ok\r\n");
	} else if (!strcasecmp(line, "QUIT")) {
		fake_bye(f, "221 2.0.0 Bye\r\n");
	} else {
		fake_send(f, "502 5.5.2 Error: command not recognized\r\n");
	}
}

static void fake_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	static char mem[65536];

	*buf = uv_buf_init(mem, sizeof(mem));
}

static void on_fake_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
	struct fake *f = st->data;

	if (n < 0) {
		fake_close(f);
		return;
	}
	activity += (unsigned long)n;
	if (verbose)
		fprintf(stderr, "  G%d: %.*s", f->proto, (int)n, buf->base);
	for (ssize_t i = 0; i < n && f->state != FS_CLOSED; i++) {
		char c = buf->base[i];

		if (c != '\n') {
			if (f->len < sizeof(f->line) - 1)
				f->line[f->len++] = c;
			continue;
		}
		if (f->len > 0 && f->line[f->len - 1] == '\r')
			f->len--;
		f->line[f->len] = '\0';
		f->len = 0;
		if (f->proto == MS_GW_IMAP)
			fake_imap(f, f->line);
		else if (f->proto == MS_GW_POP3)
			fake_pop3(f, f->line);
		else
			fake_smtp(f, f->line);
	}
}

static void on_fake_conn(uv_stream_t *server, int status)
{
	struct fake *f;

	if (status < 0)
		return;
	activity++;
	f = calloc(1, sizeof(*f));
	assert(f != NULL);
	f->proto = (int)(intptr_t)server->data;
	uv_tcp_init(loop, &f->tcp);
	f->tcp.data = f;
	if (uv_accept(server, (uv_stream_t *)&f->tcp) < 0) {
		fake_close(f);
		return;
	}
	/* No Nagle: a reply written right after another would wait for
	 * the gateway's delayed ACK, after we stopped turning the loop. */
	uv_tcp_nodelay(&f->tcp, 1);
	uv_read_start((uv_stream_t *)&f->tcp, fake_alloc, on_fake_read);
	if (f->proto == MS_GW_IMAP) {
		char greeting[256];

		snprintf(greeting, sizeof(greeting), "* OK [CAPABILITY %s] "
			 "Fake ready.\r\n", imap_caps);
		fake_send(f, greeting);
	} else if (f->proto == MS_GW_POP3) {
		fake_send(f, "+OK [XCLIENT] Fake ready.\r\n");
	} else {
		fake_send(f, "220 fake.test ESMTP\r\n");
	}
}

/* A fake server for proto on 127.0.0.1; returns its port. */
static uint16_t fake_listen(int proto)
{
	static uv_tcp_t servers[4];
	uv_tcp_t *t = &servers[proto];
	struct sockaddr_in sin;
	int len = sizeof(sin);

	uv_ip4_addr("127.0.0.1", 0, &sin);
	uv_tcp_init(loop, t);
	t->data = (void *)(intptr_t)proto;
	assert(uv_tcp_bind(t, (const struct sockaddr *)&sin, 0) == 0);
	assert(uv_listen((uv_stream_t *)t, 128, on_fake_conn) == 0);
	assert(uv_tcp_getsockname(t, (struct sockaddr *)&sin, &len) == 0);
	return ntohs(sin.sin_port);
}

/* ---- setup ---- */

static char scratch[256];

static void scratch_path(char *buf, size_t size, const char *name)
{
	snprintf(buf, size, "%s/%s", scratch, name);
}

static void cleanup(void)
{
	static const char *const names[] = {
		"cert.pem", "key.pem", "store.db", "store.db-wal", "store.db-shm",
	};
	char path[512];

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		scratch_path(path, sizeof(path), names[i]);
		unlink(path);
	}
	rmdir(scratch);
}

/* A self-signed P-256 certificate for localhost, for STARTTLS / STLS. */
static void make_cert(const char *cert_file, const char *key_file)
{
	EVP_PKEY *pkey = EVP_EC_gen("P-256");
	X509 *x = X509_new();
	X509_NAME *name = X509_get_subject_name(x);
	FILE *f;
	int fd;

	assert(pkey != NULL && x != NULL);
	ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
	X509_gmtime_adj(X509_getm_notBefore(x), 0);
	X509_gmtime_adj(X509_getm_notAfter(x), 86400L * 365);
	X509_set_pubkey(x, pkey);
	X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
				   (const unsigned char *)"localhost", -1, -1, 0);
	X509_set_issuer_name(x, name);
	assert(X509_sign(x, pkey, EVP_sha256()) > 0);
	fd = open(key_file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	assert(fd >= 0 && (f = fdopen(fd, "w")) != NULL);
	assert(PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL) == 1);
	fclose(f);
	f = fopen(cert_file, "w");
	assert(f != NULL && PEM_write_X509(f, x) == 1);
	fclose(f);
	X509_free(x);
	EVP_PKEY_free(pkey);
}

/* A port nobody listens on now (the gateway binds it right after). */
static uint16_t free_port(void)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert(fd >= 0 && bind(fd, (struct sockaddr *)&sin, sizeof(sin)) == 0);
	assert(getsockname(fd, (struct sockaddr *)&sin, &len) == 0);
	close(fd);
	return ntohs(sin.sin_port);
}

static void backend(struct ms_server_cfg *cfg, const char *scheme,
		    uint16_t port)
{
	char url[64];
	const char *why;

	snprintf(url, sizeof(url), "%s://127.0.0.1:%u", scheme, port);
	assert(ms_server_parse_url(cfg, url, &why) == 0);
}

static void user_in_state(struct ms_store *store, const char *name,
			  const char *state)
{
	int64_t id;

	assert(ms_store_user_get(store, name, &id) == 0);
	assert(ms_store_user_set_state(store, id, state, NULL) == 0);
}

static struct ms_gateway *gw;
static uint16_t gw_port[4];

static void pump(unsigned int turns);

static void setup(void)
{
	static struct ms_gw_config cfg;
	struct ms_store *store;
	char path[512], err[512], *serr = NULL;
	const char *tmp;
	uint16_t fake[4];

	verbose = getenv("FUZZ_VERBOSE") != NULL;
	/* A warning per failed login, unless asked. */
	ms_log_level = verbose ? MS_LOG_INFO : MS_LOG_ERROR;
	tmp = getenv("TMPDIR");
	snprintf(scratch, sizeof(scratch), "%s/fuzz_prelogin.XXXXXX",
		 tmp != NULL && *tmp != '\0' ? tmp : "/tmp");
	assert(mkdtemp(scratch) != NULL);
	atexit(cleanup);
	loop = uv_default_loop();
	for (int p = 0; p < 4; p++)
		fake[p] = fake_listen(p);

	scratch_path(path, sizeof(path), "store.db");
	if (ms_store_open(path, &store, &serr) < 0) {
		fprintf(stderr, "store: %s\n", serr);
		abort();
	}
	for (int p = 0; p < 4; p++) {
		gw_port[p] = free_port();
		cfg.listen[p].proto = (enum ms_gw_proto)p;
		snprintf(cfg.listen[p].addr, sizeof(cfg.listen[p].addr),
			 "127.0.0.1:%u", gw_port[p]);
	}
	cfg.nlisten = 4;
	scratch_path(cfg.cert, sizeof(cfg.cert), "cert.pem");
	scratch_path(cfg.key, sizeof(cfg.key), "key.pem");
	make_cert(cfg.cert, cfg.key);
	backend(&cfg.src_imap, "imap", fake[MS_GW_IMAP]);
	backend(&cfg.dst_imap, "imap", fake[MS_GW_IMAP]);
	backend(&cfg.src_pop3, "pop3", fake[MS_GW_POP3]);
	backend(&cfg.dst_pop3, "pop3", fake[MS_GW_POP3]);
	backend(&cfg.src_smtp, "smtp", fake[MS_GW_SMTP]);
	backend(&cfg.dst_smtp, "smtp", fake[MS_GW_SMTP]);
	backend(&cfg.src_submission, "smtp", fake[MS_GW_SUBMISSION]);
	backend(&cfg.dst_submission, "smtp", fake[MS_GW_SUBMISSION]);
	cfg.policy = MS_POLICY_PASSTHROUGH;
	cfg.hold_max_seconds = 60;
	cfg.connections = 1;
	snprintf(cfg.domains[0].domain, sizeof(cfg.domains[0].domain), "hold.test");
	cfg.domains[0].policy = MS_POLICY_HOLD;
	snprintf(cfg.domains[1].domain, sizeof(cfg.domains[1].domain), "off.test");
	cfg.domains[1].policy = MS_POLICY_OFF;
	cfg.ndomains = 2;
	cfg.sweep_from = cfg.sweep_to = -1;
	cfg.caps_refresh = 86400;	/* asked once, at start */
	if (ms_gateway_new(loop, &cfg, store, &gw, err, sizeof(err)) < 0) {
		fprintf(stderr, "gateway: %s\n", err);
		abort();
	}
	/* Users in each state, set once the gateway is up (at start it
	 * would resume an interrupted copy or cutover). */
	user_in_state(store, "moved", "destination");
	user_in_state(store, "flipping", "cutover");
	user_in_state(store, "copying@hold.test", "copying");
	/* The capability probes of the fake servers. */
	pump(MAX_TURNS);
}

/* ---- the client ---- */

static int client_fd = -1;
static int client_eof;
static SSL_CTX *client_ctx;
static SSL *client_tls;			/* after STARTTLS / STLS, else NULL */
static char heard[4096];		/* what the gateway said since the
					   last chunk went out (its start) */
static size_t heard_len;

static void heard_add(const char *d, size_t n)
{
	if (n > sizeof(heard) - 1 - heard_len)
		n = sizeof(heard) - 1 - heard_len;
	memcpy(heard + heard_len, d, n);
	heard_len += n;
	heard[heard_len] = '\0';
}

/* What SSL_read / SSL_write returned, as for recv / send: > 0 bytes, 0
 * not now (try again after a loop turn), -1 the connection is done. */
static ssize_t tls_result(int n)
{
	if (n > 0)
		return n;
	switch (SSL_get_error(client_tls, n)) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		return 0;
	default:
		ERR_clear_error();
		return -1;
	}
}

/* One read from the gateway: > 0 bytes, 0 nothing now, -1 it has gone. */
static ssize_t client_recv(char *buf, size_t size)
{
	ssize_t n;

	if (client_tls == NULL) {
		n = recv(client_fd, buf, size, MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		return n > 0 ? n : -1;
	}
	return tls_result(SSL_read(client_tls, buf, (int)size));
}

/* Whatever the gateway sent: read, kept in heard, dropped (or shown). */
static void client_drain(void)
{
	char buf[65536];
	ssize_t n;

	while (client_fd >= 0 && !client_eof) {
		n = client_recv(buf, sizeof(buf));
		if (n == 0)
			break;
		if (n < 0) {
			client_eof = 1;
			break;
		}
		activity += (unsigned long)n;
		heard_add(buf, (size_t)n);
		if (verbose)
			fprintf(stderr, "S: %.*s", (int)n, buf);
	}
}

static void count_idle(uv_handle_t *h, void *arg)
{
	if (h->type == UV_IDLE && uv_is_active(h))
		++*(unsigned int *)arg;
}

/* Work the loop will do on its next turn without any I/O: requests in
 * flight (connects, writes), idle handles (net.c starts connects and
 * TLS steps from one). */
static int busy(void)
{
	unsigned int idle = 0;

	uv_walk(loop, count_idle, &idle);
	return idle > 0 || loop->active_reqs.count > 0;
}

/* Loop turns until QUIET_TURNS in a row move nothing and nothing is
 * pending, at most turns. Timers are not waited for (a failed login's
 * penalty, a held login's tick): the client leaves first. */
static void pump(unsigned int turns)
{
	unsigned int quiet = 0;

	for (unsigned int i = 0; i < turns && quiet < QUIET_TURNS; i++) {
		unsigned long before = activity;

		uv_run(loop, UV_RUN_NOWAIT);
		if (client_tls == NULL || SSL_is_init_finished(client_tls))
			client_drain();
		quiet = activity == before && !busy() ? quiet + 1 : 0;
	}
}

/* connect() on a non-blocking socket, waited for: the timer signals of
 * libFuzzer (-timeout) would interrupt a blocking one. */
static int connect_wait(int fd, const struct sockaddr_in *to)
{
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };
	socklen_t len = sizeof(int);
	int err = 0;

	if (connect(fd, (const struct sockaddr *)to, sizeof(*to)) == 0)
		return 0;
	if (errno != EINPROGRESS && errno != EINTR)
		return -1;
	while (poll(&pfd, 1, 5000) < 0)
		if (errno != EINTR)
			return -1;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
		errno = err != 0 ? err : errno;
		return -1;
	}
	return 0;
}

/* A client from 127.a.b.c (a fresh address each time, never .0 or .255).
 * Loopback: the kernel completes the handshake before accept(). A failure
 * is the machine's (ports in TIME_WAIT), not the gateway's: another
 * address, a little later. */
static int client_connect(uint16_t port)
{
	static uint32_t n;
	struct sockaddr_in from = { .sin_family = AF_INET };
	struct sockaddr_in to = { .sin_family = AF_INET };
	int one = 1;

	to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	to.sin_port = htons(port);
	for (int tries = 0; tries < 100; tries++) {
		uint32_t host = ++n % (254u * 254 * 254);
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC |
				SOCK_NONBLOCK, 0);

		assert(fd >= 0);
		host = (1 + host / (254 * 254)) << 16 |
		       (1 + host / 254 % 254) << 8 | (1 + host % 254);
		from.sin_addr.s_addr = htonl(0x7f000000u | host);
		if (bind(fd, (struct sockaddr *)&from, sizeof(from)) == 0 &&
		    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
			       sizeof(one)) == 0 &&
		    connect_wait(fd, &to) == 0)
			return fd;
		fprintf(stderr, "fuzz_prelogin: client %s: %s\n",
			inet_ntoa(from.sin_addr), strerror(errno));
		close(fd);
		usleep(10000);
	}
	abort();
}

/* The gateway said go ahead to STARTTLS / STLS: the client's handshake,
 * turning the loop for the gateway's side. Fails (the gateway hung up,
 * say) are the gateway's business: the client then just leaves. */
static void client_starttls(void)
{
	int r;

	if (client_ctx == NULL) {
		client_ctx = SSL_CTX_new(TLS_client_method());
		assert(client_ctx != NULL);
		SSL_CTX_set_verify(client_ctx, SSL_VERIFY_NONE, NULL);
	}
	client_tls = SSL_new(client_ctx);
	assert(client_tls != NULL);
	SSL_set_fd(client_tls, client_fd);
	SSL_set_mode(client_tls, SSL_MODE_ENABLE_PARTIAL_WRITE |
		     SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	for (unsigned int i = 0; i < MAX_TURNS; i++) {
		r = SSL_connect(client_tls);
		if (r == 1)
			return;
		r = SSL_get_error(client_tls, r);
		if (r != SSL_ERROR_WANT_READ && r != SSL_ERROR_WANT_WRITE)
			break;
		uv_run(loop, UV_RUN_NOWAIT);
	}
	ERR_clear_error();
	client_eof = 1;
}

static ssize_t client_write(const uint8_t *d, size_t len)
{
	ssize_t n;

	if (client_tls == NULL) {
		n = send(client_fd, d, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		return n;
	}
	return tls_result(SSL_write(client_tls, d, (int)len));
}

static void client_send(const uint8_t *d, size_t len)
{
	heard_len = 0;
	while (len > 0 && !client_eof) {
		ssize_t n = client_write(d, len);

		if (n < 0)
			return;		/* the gateway has hung up */
		if (n == 0) {
			pump(MAX_TURNS);	/* its buffers are full */
			continue;
		}
		if (verbose)
			fprintf(stderr, "C%s: %.*s", client_tls ? "(TLS)" : "",
				(int)n, (const char *)d);
		d += n;
		len -= (size_t)n;
		activity++;
	}
}

/* The client has said all it had to say; its close_notify under TLS,
 * then FIN. Returns when the gateway has closed its side. */
static void client_finish(void)
{
	unsigned int turns;

	if (client_tls != NULL && SSL_is_init_finished(client_tls) &&
	    SSL_shutdown(client_tls) < 0)
		ERR_clear_error();
	shutdown(client_fd, SHUT_WR);
	for (turns = 0; !client_eof && turns < 8 * MAX_TURNS; turns++) {
		uv_run(loop, UV_RUN_NOWAIT);
		client_drain();
	}
	/* The client has gone: its session must go too. */
	assert(client_eof);
	SSL_free(client_tls);
	client_tls = NULL;
	close(client_fd);
	client_fd = -1;
	pump(MAX_TURNS);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const enum ms_gw_proto protos[] = {
		MS_GW_IMAP, MS_GW_POP3, MS_GW_SMTP, MS_GW_SUBMISSION,
	};
	uint32_t seed;
	size_t pos = 2;
	json_t *left;

	if (gw == NULL)
		setup();
	if (size < 2)
		return 0;
	seed = data[1] > 1 ? data[1] * 2654435761u : 0;
	client_eof = 0;
	client_fd = client_connect(gw_port[protos[data[0] & 3]]);
	pump(MAX_TURNS);		/* accepted, greeted */
	while (pos < size && !client_eof) {
		size_t n = size - pos;
		const uint8_t *lf;

		if (data[1] == 1 && (lf = memchr(data + pos, '\n', n)) != NULL) {
			n = (size_t)(lf - (data + pos)) + 1;
		} else if (seed != 0) {
			seed ^= seed << 13;
			seed ^= seed >> 17;
			seed ^= seed << 5;
			n = 1 + seed % (n < 64 ? n : 64);
		}
		client_send(data + pos, n);
		pos += n;
		pump(MAX_TURNS);
		/* The go-ahead: the rest of the input goes over TLS. */
		if (client_tls == NULL && !client_eof &&
		    (strstr(heard, " OK Begin TLS negotiation") != NULL ||
		     strstr(heard, "220 2.0.0 Ready to start TLS") != NULL))
			client_starttls();
	}
	client_finish();
	assert(ms_gateway_nsessions(gw) == 0);
	left = ms_gateway_sessions(gw);
	assert(json_array_size(left) == 0);
	json_decref(left);
	return 0;
}
