/* The login mechanics the gateway's front ends share: see gw_login.h. It
 * holds no protocol's syntax or replies and calls nothing of the gateway. */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "gw_login.h"
#include "util.h"

void ms_login_wipe(struct ms_login *l)
{
	ms_secret_free(&l->pass);
	ms_secret_free(&l->user);
	ms_secret_free(&l->authz);
}

const char *ms_login_name(const struct ms_login *l)
{
	return l->authz != NULL && l->authz[0] != '\0' ? l->authz : l->user;
}

/* "authzid NUL authcid NUL password" */
int ms_login_take_plain(struct ms_login *l, const char *b64)
{
	char *z, *c, *p;

	if (ms_sasl_plain_parse(b64, &z, &c, &p) < 0)
		return -1;
	ms_login_wipe(l);
	l->authz = z;
	l->user = c;
	l->pass = p;
	return 0;
}

int ms_login_decode_step(const char *b64, char **out_r)
{
	unsigned char *raw;
	size_t len;

	if (ms_b64_decode(b64, &raw, &len) < 0)
		return MS_LOGIN_BAD_BASE64;
	if (memchr(raw, '\0', len) != NULL) {
		/* The name or password would end early: refused, never
		 * cut. */
		OPENSSL_cleanse(raw, len);
		free(raw);
		return MS_LOGIN_NUL;
	}
	*out_r = (char *)raw;
	return 0;
}

char *ms_login_sasl_plain(const struct ms_login *l)
{
	return l->authz != NULL && l->authz[0] != '\0' &&
		strcmp(l->authz, l->user) != 0 ?
		ms_sasl_plain(l->authz, l->user, l->pass) :
		ms_sasl_plain("", l->user, l->pass);
}

int ms_login_send_plain(struct ms_conn *server, const char *prefix,
			const struct ms_login *l)
{
	char *b64 = ms_login_sasl_plain(l);

	if (b64 == NULL)
		return -1;
	ms_conn_write(server, prefix, strlen(prefix));
	ms_conn_write(server, b64, strlen(b64));
	ms_conn_write(server, "\r\n", 2);
	ms_secret_free(&b64);
	return 0;
}

/* ---- the server's replies to the login ---- */

long ms_line_take(char **buf, size_t *used, size_t max, const char *data,
		  size_t len)
{
	const char *lf = memchr(data, '\n', len);
	size_t n = lf != NULL ? (size_t)(lf - data) + 1 : len;

	if (*buf == NULL)
		*buf = malloc(max + 1);
	if (*buf == NULL || *used + n > max)
		return -1;
	memcpy(*buf + *used, data, n);
	*used += n;
	return (long)n;
}

/* ---- the relay ---- */

void ms_pause_set(struct ms_conn *conn, int *paused, int why)
{
	if (*paused == 0)
		ms_conn_read_pause(conn, 1);
	*paused |= why;
}

void ms_pause_clear(struct ms_conn *conn, int *paused, int why)
{
	if (conn == NULL || !(*paused & why))
		return;
	*paused &= ~why;
	if (*paused == 0)
		ms_conn_read_pause(conn, 0);
}

void ms_relay_pressure(struct ms_conn *to, struct ms_conn *from, int *paused)
{
	if (!(*paused & MS_PAUSE_WRITE) && ms_conn_over_high(to))
		ms_pause_set(from, paused, MS_PAUSE_WRITE);
}

int ms_relay(struct ms_conn *to, struct ms_conn *from, int *paused,
	     const char *data, size_t len)
{
	if (ms_conn_write(to, data, len) < 0)
		return -1;
	ms_relay_pressure(to, from, paused);
	return 0;
}
