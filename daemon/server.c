/* Server connection settings: see server.h. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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
