/* SMTP side of the gateway: inbound SMTP routed per recipient, submission
 * routed by AUTH. Placeholder until the SMTP sessions land: SMTP listeners
 * answer 421 and close. */
#include <stdio.h>
#include <stdlib.h>

#include "gateway.h"
#include "net.h"

static void on_connect(struct ms_conn *conn, int status, const char *error)
{
	struct ms_conn *c = conn;

	if (status == 0)
		ms_conn_write(c, "421 4.3.2 Service not available\r\n", 34);
	ms_conn_close(&c);
}

static void on_read(struct ms_conn *conn, const char *data, size_t len)
{
}

void ms_smtp_accept(struct ms_gateway *gw, uv_stream_t *listener,
		    const struct ms_gw_listen *cfg)
{
	struct ms_conn_callbacks cb = {
		.on_connect = on_connect,
		.on_read = on_read,
	};
	struct ms_conn *c;

	ms_conn_accept(listener, cfg->implicit_tls ? ms_gateway_tls(gw) : NULL,
		       &cb, &c);
}

void ms_smtp_sessions(struct ms_gateway *gw, json_t *array)
{
}

void ms_smtp_close_all(struct ms_gateway *gw)
{
}
