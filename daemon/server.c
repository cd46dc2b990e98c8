/* Server connection settings: see server.h. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "server.h"

char *ms_server_login_name(const struct ms_server_cfg *srv, const char *user)
{
	const char *tmpl = srv->user_tmpl;
	char buf[1024];
	size_t pos = 0;

	if (tmpl == NULL)
		tmpl = "%u";
	for (; *tmpl != '\0' && pos + 1 < sizeof(buf); tmpl++) {
		if (tmpl[0] == '%' && tmpl[1] == 'u') {
			size_t l = strlen(user);

			if (pos + l >= sizeof(buf))
				break;
			memcpy(buf + pos, user, l);
			pos += l;
			tmpl++;
		} else {
			buf[pos++] = *tmpl;
		}
	}
	buf[pos] = '\0';
	return strdup(buf);
}

struct ms_tls_opts ms_server_tls(const struct ms_server_cfg *srv)
{
	return (struct ms_tls_opts){
		.mode = srv->tls_mode,
		.ca_file = srv->ca_file,
		.insecure = srv->insecure,
		.server_name = srv->server_name,
	};
}

int ms_server_connect(uv_loop_t *loop, const struct ms_server_cfg *srv,
		      const struct ms_conn_callbacks *cb,
		      struct ms_conn **conn_r)
{
	struct ms_tls_opts tls = ms_server_tls(srv);

	return ms_conn_connect(loop, srv->host, srv->port, &tls, cb, conn_r);
}

/* Whether addr (numeric) is one of this host's: a loopback address, or
 * one the kernel's own choice of a source address to reach it is addr
 * itself for (a route of the local table). Asking the routing, not bind(),
 * keeps ip_nonlocal_bind out of it. A name, or an address with no route,
 * is not. */
static int host_addr_is_local(const char *addr)
{
	struct sockaddr_storage ss, got;
	struct sockaddr_in *in = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
	socklen_t len, glen = sizeof(got);
	int fd, local = 0;

	memset(&ss, 0, sizeof(ss));
	if (inet_pton(AF_INET, addr, &in->sin_addr) == 1) {
		in->sin_family = AF_INET;
		in->sin_port = htons(9);
		len = sizeof(*in);
	} else if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(9);
		len = sizeof(*in6);
	} else {
		return 0;
	}
	if (ss.ss_family == AF_INET ?
	    ntohl(in->sin_addr.s_addr) >> 24 == IN_LOOPBACKNET :
	    IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr))
		return 1;	/* 127.0.0.2 is answered from 127.0.0.1 */
	fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	/* A UDP connect sends nothing: it only picks the route. */
	if (connect(fd, (struct sockaddr *)&ss, len) == 0 &&
	    getsockname(fd, (struct sockaddr *)&got, &glen) == 0)
		local = ss.ss_family == AF_INET ?
			((struct sockaddr_in *)&got)->sin_addr.s_addr ==
			in->sin_addr.s_addr :
			!memcmp(&((struct sockaddr_in6 *)&got)->sin6_addr,
				&in6->sin6_addr, sizeof(in6->sin6_addr));
	close(fd);
	return local;
}

/* Logged once per reason, at -v: a session that cannot connect from its
 * client's address is not an error, only worth knowing. */
static void not_transparent(int server, const char *addr)
{
	static int said[2];

	if (said[server])
		return;
	said[server] = 1;
	ms_info("transparent upstream: %s %s is this host's own address: "
		"connecting from this host's address instead (said once)",
		server ? "server" : "client", addr);
}

int ms_server_connect_for(uv_loop_t *loop, const struct ms_server_cfg *srv,
			  const char *client, uint16_t client_port,
			  const struct ms_conn_callbacks *cb,
			  struct ms_conn **conn_r)
{
	int r = ms_server_connect(loop, srv, cb, conn_r);

	if (r < 0 || !srv->transparent || client == NULL || *client == '\0')
		return r;
	if (host_addr_is_local(client))
		not_transparent(0, client);
	else if (host_addr_is_local(srv->host))
		not_transparent(1, srv->host);
	else
		ms_conn_set_source(*conn_r, client, client_port);
	return 0;
}

int ms_server_parse_url(struct ms_server_cfg *cfg, const char *url,
			const char **error_r)
{
	static const struct {
		const char *scheme;
		enum ms_proto proto;
		enum ms_tls_mode tls;
		uint16_t port;
	} schemes[] = {
		{ "imap://", MS_PROTO_IMAP, MS_TLS_NONE, 143 },
		{ "imap+starttls://", MS_PROTO_IMAP, MS_TLS_STARTTLS, 143 },
		{ "imaps://", MS_PROTO_IMAP, MS_TLS_IMPLICIT, 993 },
		{ "pop3://", MS_PROTO_POP3, MS_TLS_NONE, 110 },
		{ "pop3+starttls://", MS_PROTO_POP3, MS_TLS_STARTTLS, 110 },
		{ "pop3s://", MS_PROTO_POP3, MS_TLS_IMPLICIT, 995 },
		{ "smtp://", MS_PROTO_SMTP, MS_TLS_NONE, 25 },
		{ "smtp+starttls://", MS_PROTO_SMTP, MS_TLS_STARTTLS, 25 },
		{ "smtps://", MS_PROTO_SMTP, MS_TLS_IMPLICIT, 465 },
	};
	const char *rest = NULL, *end, *colon;
	size_t i, hostlen;

	for (i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
		size_t l = strlen(schemes[i].scheme);

		if (strncasecmp(url, schemes[i].scheme, l) == 0) {
			rest = url + l;
			break;
		}
	}
	if (rest == NULL) {
		*error_r = "unknown URL scheme (imap://, imaps://, "
			   "imap+starttls://, pop3://, pop3s://, pop3+starttls://)";
		return -1;
	}
	cfg->proto = schemes[i].proto;
	cfg->tls_mode = schemes[i].tls;
	cfg->port = schemes[i].port;
	end = rest + strcspn(rest, "/");
	if (*rest == '[') {
		const char *close = memchr(rest, ']', (size_t)(end - rest));

		if (close == NULL) {
			*error_r = "unterminated [IPv6] address in URL";
			return -1;
		}
		hostlen = (size_t)(close - rest - 1);
		memcpy(cfg->host, rest + 1, hostlen < sizeof(cfg->host) ?
		       hostlen : 0);
		colon = close[1] == ':' ? close + 1 : NULL;
	} else {
		colon = memchr(rest, ':', (size_t)(end - rest));
		hostlen = (size_t)((colon != NULL ? colon : end) - rest);
		if (hostlen < sizeof(cfg->host))
			memcpy(cfg->host, rest, hostlen);
	}
	if (hostlen == 0 || hostlen >= sizeof(cfg->host)) {
		*error_r = "bad host in URL";
		return -1;
	}
	cfg->host[hostlen] = '\0';
	if (colon != NULL) {
		char *e;
		unsigned long p = strtoul(colon + 1, &e, 10);

		if (e == colon + 1 || e != end || p == 0 || p > 65535) {
			*error_r = "bad port in URL";
			return -1;
		}
		cfg->port = (uint16_t)p;
	}
	if (*end != '\0' && strcmp(end, "/") != 0) {
		*error_r = "unexpected path in URL";
		return -1;
	}
	return 0;
}
