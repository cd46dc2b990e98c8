/* The POP3 front end before login: greeting, CAPA, STLS, USER/PASS and
 * AUTH PLAIN, the POP3 side of the login at the server (XCLIENT with the
 * client's address, AUTH PLAIN), and the relay's POP3 filter: a session
 * on the destination shows the source's UIDLs for the messages the mover
 * copied (pop3_uidl.h). A session's life, the relay itself and the
 * routing are not here (gw_session.c, lifecycle.c).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "gw_internal.h"
#include "log.h"
#include "pop3_uidl.h"

struct uidl_relay {
	struct ms_pop3_rw rw;
	struct ms_uidl_map map;
	uint64_t rewritten;		/* UIDLs replaced, for the log */
};

/* ---- POP3 UIDLs (pop3_uidl.h, docs/gateway-spec.md) ---- */

static const char *uidl_format(const char *f)
{
	return f[0] != '\0' ? f : MS_UIDL_FORMAT_DEFAULT;
}

static int uidl_map(void *ctx, const char *uidl, char *out, size_t outsz)
{
	struct session *s = ctx;
	int r = ms_uidl_translate(&s->ur->map, uidl, out, outsz);

	s->ur->rewritten += (uint64_t)r;
	return r;
}

static int uidl_out(void *ctx, const char *data, size_t len)
{
	struct session *s = ctx;

	return ms_conn_write(s->c, data, len) < 0 ? -1 : 0;
}

static void ur_free(struct uidl_relay *ur)
{
	ms_pop3_rw_clear(&ur->rw);
	ms_uidl_map_clear(&ur->map);
	free(ur);
}

/* The INBOX's records, read on the store's reader at a POP3 login to the
 * destination, before the server is asked. */
struct uidl_read {
	struct gw_login_read lr;	/* first */
	struct uidl_relay *ur;		/* NULL: nothing to show */
};

/* When the mover copied the user's INBOX, the session shows the source's
 * UIDLs: its records. Only then is anything allocated. */
static int uidl_work(struct ms_store *store, void *arg, char *err,
		     size_t errsz)
{
	struct uidl_read *rd = arg;
	struct ms_user_info info;
	struct ms_folder_state fs;
	int found = 0, oom;

	if (ms_store_user_info(store, rd->lr.user, &info, &found) < 0 ||
	    (found && ms_store_folder_find_dst(store, info.id, "INBOX", &fs,
					       &found) < 0))
		return -1;
	if (!found || fs.dst_uidvalidity == 0)
		return 0;
	rd->ur = calloc(1, sizeof(*rd->ur));
	if (rd->ur == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	rd->ur->map.folder_id = fs.id;
	rd->ur->map.src_uidvalidity = fs.src_uidvalidity;
	rd->ur->map.dst_uidvalidity = fs.dst_uidvalidity;
	if (ms_uidl_map_load(&rd->ur->map, store, &oom) < 0) {
		if (oom)
			snprintf(err, errsz, "out of memory");
		return -1;
	}
	return 0;
}

static void uidl_drop(void *arg)
{
	struct uidl_read *rd = arg;

	if (rd->ur != NULL)
		ur_free(rd->ur);
	gw_login_read_free(&rd->lr);
}

static void uidl_done(void *arg, const char *error)
{
	struct uidl_read *rd = arg;
	struct session *s = rd->lr.s;
	struct ms_gateway *gw = s->gw;

	s->rd = NULL;
	if (error == NULL && rd->ur != NULL) {
		/* Which UIDLs to show is known; else (error) better no
		 * session than a mailbox downloaded again. */
		s->ur = rd->ur;
		rd->ur = NULL;
		ms_pop3_rw_init(&s->ur->rw, uidl_map, s);
		s->ur->map.src_format = uidl_format(gw->cfg.src_uidl_format);
		s->ur->map.dst_format = uidl_format(gw->cfg.dst_uidl_format);
	}
	uidl_drop(rd);
	gw_backend_go(s, error);
}

static void uidl_relay_load(struct session *s)
{
	gw_read_login(s, sizeof(struct uidl_read), uidl_work, uidl_done,
		      uidl_drop);
}

static void uidl_relay_free(struct session *s)
{
	if (s->ur == NULL)
		return;
	if (s->ur->rewritten > 0)
		ms_info("session %llu: %s: %llu POP3 UIDLs shown as the "
			"source's", (unsigned long long)s->id, s->gu->name,
			(unsigned long long)s->ur->rewritten);
	ur_free(s->ur);
	s->ur = NULL;
}

/* The rewriter lost track: the session is relayed as it is from now on. */
static void uidl_relay_check(struct session *s)
{
	const char *why = ms_pop3_rw_gave_up(&s->ur->rw);

	if (why == NULL)
		return;
	ms_warn("session %llu: %s: POP3 UIDLs passed on unchanged from now on: "
		"%s", (unsigned long long)s->id, s->gu->name, why);
	uidl_relay_free(s);
	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
}

/* The client's commands (which pass on unchanged): the answers to expect. */
static void uidl_relay_client(struct session *s, const char *data, size_t len)
{
	ms_pop3_rw_client(&s->ur->rw, data, len);
	if (ms_pop3_rw_pending(&s->ur->rw) >= MS_POP3_RW_PIPELINE_SOFT)
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	uidl_relay_check(s);
}

/* The server's answers, to the client with the UIDLs translated. -1 when
 * the session must end (the client is gone, the store failed). */
static int uidl_relay_server(struct session *s, const char *data, size_t len)
{
	if (ms_pop3_rw_server(&s->ur->rw, data, len, uidl_out, s) < 0)
		return -1;
	if (ms_pop3_rw_pending(&s->ur->rw) < MS_POP3_RW_PIPELINE_SOFT / 2)
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	uidl_relay_check(s);
	ms_relay_pressure(s->c, s->b, &s->b_paused);
	return 0;
}

/* ---- the login at the server ---- */

static int pop3_send_login(struct session *s)
{
	char line[256];

	/* The client's address, when the server's greeting offered us
	 * XCLIENT (Dovecot: to login_trusted_networks), ahead of the login
	 * in the same write; its answer is skipped. */
	if (s->b_xclient) {
		snprintf(line, sizeof(line), "XCLIENT ADDR=%s PORT=%u\r\n",
			 s->peer, s->peer_port);
		ms_conn_write(s->b, line, strlen(line));
	}
	return ms_login_send_plain(s->b, "AUTH PLAIN ", &s->login);
}

static int pop3_backend_line(struct session *s, char *line)
{
	int ok = strncmp(line, "+OK", 3) == 0;

	if (!ok && strncmp(line, "-ERR", 4) != 0) {
		gw_backend_fail(s, "unexpected reply from the server");
		return 1;
	}
	switch (s->bst) {
	case BS_GREETING:
		if (!ok) {
			gw_backend_fail(s, "the server refused us");
			return 1;
		}
		s->b_xclient = strstr(line, "[XCLIENT]") != NULL;
		gw_backend_greeted(s, "STLS\r\n");
		return 0;
	case BS_STARTTLS:
		if (!ok || ms_conn_starttls(s->b, gw_backend_on_tls) < 0) {
			gw_backend_fail(s, "STLS refused");
			return 1;
		}
		return GW_TLS_STARTED;
	default:
		break;
	}
	if (s->b_xclient) {
		s->b_xclient = 0;
		if (!ok)
			ms_info("session %llu: XCLIENT refused: %s",
				(unsigned long long)s->id, line);
		return 0;
	}
	if (!ok) {
		gw_login_failed(s, line);
		return 1;
	}
	if (s->verify_only)
		return -1;
	out(s, "%s\r\n", line);
	return 2;
}

/* ---- POP3 before login ---- */

/* CAPA: the servers' common capabilities; USER and SASL PLAIN only where
 * a plaintext password is welcome. */
static void pop3_capa(struct session *s)
{
	const char *caps = ms_caps_get(s->gw->caps, MS_CAPS_POP3);
	int auth = s->tls || ms_gw_plaintext_ok(s->gw, s->peer);

	out(s, "+OK\r\n");
	while (*caps != '\0') {
		const char *eol = strstr(caps, "\r\n");
		size_t n = eol != NULL ? (size_t)(eol - caps) : strlen(caps);

		if (auth || !((n == 4 && !strncasecmp(caps, "USER", 4)) ||
			      (n >= 5 && !strncasecmp(caps, "SASL ", 5))))
			out(s, "%.*s\r\n", (int)n, caps);
		caps += n;
		if (eol != NULL)
			caps += 2;
	}
	out(s, "%s.\r\n", s->gw->tls != NULL && !s->tls ? "STLS\r\n" : "");
}

static void pop3_command(struct session *s, char *line)
{
	char *arg = strchr(line, ' ');

	if (arg != NULL)
		*arg++ = '\0';
	if (!strcasecmp(line, "CAPA")) {
		pop3_capa(s);
	} else if (!strcasecmp(line, "NOOP")) {
		out(s, "+OK\r\n");
	} else if (!strcasecmp(line, "QUIT")) {
		out(s, "+OK Logging out\r\n");
		gw_session_close(s);
	} else if (!strcasecmp(line, "STLS")) {
		if (s->gw->tls == NULL || s->tls) {
			out(s, "-ERR TLS is not available.\r\n");
			return;
		}
		out(s, "+OK Begin TLS negotiation now.\r\n");
		s->inlen = 0;
		s->st = SS_STARTTLS;
		if (ms_conn_starttls_server(s->c, s->gw->tls,
					    gw_client_on_tls) < 0)
			gw_session_close(s);
	} else if (!strcasecmp(line, "USER") && arg != NULL) {
		s->mech = "pop3-user";
		if (gw_plaintext_refused(s))
			return;
		ms_login_wipe(&s->login);
		s->login.user = strdup(arg);
		out(s, "+OK\r\n");
	} else if (!strcasecmp(line, "PASS") && arg != NULL &&
		   s->login.user != NULL) {
		s->login.pass = strdup(arg);
		gw_login_start(s);
	} else if (!strcasecmp(line, "AUTH") && arg != NULL) {
		char *ir = strchr(arg, ' ');

		if (ir != NULL)
			*ir++ = '\0';
		if (strcasecmp(arg, "PLAIN") != 0) {
			out(s, "-ERR Unsupported authentication mechanism.\r\n");
			return;
		}
		s->mech = "sasl-plain";
		if (gw_plaintext_refused(s))
			return;
		if (ir == NULL) {
			s->st = SS_AUTH_PLAIN;
			out(s, "+ \r\n");
			return;
		}
		if (ms_login_take_plain(&s->login, ir) < 0) {
			out(s, "-ERR Invalid base64 data.\r\n");
			return;
		}
		gw_login_start(s);
	} else {
		out(s, "-ERR Unknown command.\r\n");
		if (++s->bad >= GW_BAD_MAX)
			gw_session_close(s);
	}
}

static void pop3_process(struct session *s)
{
	while (s->inlen > 0 && (s->st == SS_PRELOGIN || s->st == SS_AUTH_PLAIN) &&
	       !ms_conn_over_high(s->c)) {
		char line[GW_INBUF_MAX];
		long linelen = gw_input_line(s);

		if (linelen < 0)
			return;
		memcpy(line, s->in, (size_t)linelen + 1);
		gw_input_drop(s, linelen);
		if (gw_too_many_commands(s)) {
			OPENSSL_cleanse(line, linelen);
			return;
		}
		if (s->st == SS_AUTH_PLAIN) {
			s->st = SS_PRELOGIN;
			if (!strcmp(line, "*")) {
				out(s, "-ERR Authentication aborted.\r\n");
			} else if (ms_login_take_plain(&s->login, line) < 0) {
				out(s, "-ERR Invalid base64 data.\r\n");
			} else {
				gw_login_start(s);
			}
		} else {
			pop3_command(s, line);
		}
		OPENSSL_cleanse(line, linelen);
		if (s->st == SS_CLOSING)
			return;
	}
}

/* ---- the front end ---- */

static void pop3_greet(struct session *s)
{
	out(s, "+OK mailshift ready.\r\n");
}

static const struct gw_proto pop3_proto = {
	.greet = pop3_greet,
	.process = pop3_process,
	.send_login = pop3_send_login,
	.backend_line = pop3_backend_line,
	.relay_client = uidl_relay_client,
	.relay_server = uidl_relay_server,
	.relay_free = uidl_relay_free,
	.relay_load = uidl_relay_load,
};

/* Its sessions are the mailbox sessions' (gw_session.c). */
const struct ms_gw_frontend ms_gw_pop3_frontend = {
	.name = "pop3",
	.protos = 1 << MS_GW_POP3,
	.accept = gw_session_accept,
	.arg = &pop3_proto,
};
