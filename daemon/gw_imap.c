/* The IMAP front end before login: greeting and capabilities, the
 * pre-login commands (CAPABILITY, NOOP, ID, STARTTLS, LOGOUT, LOGIN,
 * AUTHENTICATE PLAIN and LOGIN), literals, and the IMAP side of the login
 * at the server (ID with the client's address, AUTHENTICATE PLAIN, the
 * tagged answer given the client's tag). A session's life, the relay and
 * the routing are not here (gw_session.c, lifecycle.c); the login's
 * decoding is gw_login.c's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "gw_internal.h"

/* ---- the login at the server ---- */

static int imap_send_login(struct session *s)
{
	char line[256];

	/* The client's address, for servers that trust us with it
	 * (Dovecot: login_trusted_networks). */
	snprintf(line, sizeof(line), "ms1 ID (\"x-originating-ip\" \"%s\" "
		 "\"x-originating-port\" \"%u\" \"x-connected-ip\" "
		 "\"%s\")\r\n", s->peer, s->peer_port, s->local);
	ms_conn_write(s->b, line, strlen(line));
	if (s->b_sasl_ir)
		return ms_login_send_plain(s->b, "ms2 AUTHENTICATE PLAIN ",
					   &s->login);
	ms_conn_write(s->b, "ms2 AUTHENTICATE PLAIN\r\n", 24);
	s->bst = BS_LOGIN_CONT;
	return 0;
}

/* The server took the login: its answer under the client's tag, through
 * the IMAP view when the session has one (the capabilities it withholds).
 * Returns as imap_backend_line(). */
static int imap_login_ok(struct session *s, const char *answer)
{
	char reply[GW_INBUF_MAX + 300];
	int n;

	n = snprintf(reply, sizeof(reply), "%s %s\r\n", s->tag, answer);
	if (s->iv == NULL) {
		out(s, "%s", reply);
		return 2;
	}
	if (n < 0 || (size_t)n >= sizeof(reply) ||
	    gw_imap_view_server(s, reply, (size_t)n) < 0) {
		gw_backend_fail(s, "IMAP view: login answer");
		return 1;
	}
	return 2;
}

static int imap_backend_line(struct session *s, char *line)
{
	if (s->bst == BS_GREETING) {
		if (strncmp(line, "* OK", 4) != 0) {
			gw_backend_fail(s, "bad greeting from the server");
			return 1;
		}
		s->b_sasl_ir = strcasestr(line, " SASL-IR") != NULL;
		gw_backend_greeted(s, "ms0 STARTTLS\r\n");
		return 0;
	}
	if (s->bst == BS_STARTTLS) {
		if (line[0] == '*')
			return 0;
		if (strncasecmp(line, "ms0 OK", 6) != 0 ||
		    ms_conn_starttls(s->b, gw_backend_on_tls) < 0) {
			gw_backend_fail(s, "STARTTLS refused by the server");
			return 1;
		}
		return GW_TLS_STARTED;
	}
	if (s->bst == BS_LOGIN_CONT && line[0] == '+') {
		ms_login_send_plain(s->b, "", &s->login);
		s->bst = BS_LOGIN;
		return 0;
	}
	if (strncmp(line, "ms2 ", 4) != 0)
		return 0;	/* untagged, or the ID's reply */
	if (strncasecmp(line + 4, "OK", 2) != 0) {
		/* The server's own words: the client may try again. */
		char reply[GW_INBUF_MAX + 80];

		snprintf(reply, sizeof(reply), "%s %s", s->tag, line + 4);
		gw_login_failed(s, reply);
		return 1;
	}
	if (s->verify_only)
		return -1;
	return imap_login_ok(s, line + 4);
}

/* ---- IMAP before login ---- */

/* The capabilities before login: the servers' common ones, then ours. */
static void imap_capability(struct session *s, const char *fmt)
{
	int starttls = s->gw->tls != NULL && !s->tls;
	char caps[4096];

	snprintf(caps, sizeof(caps), "%s%s%s",
		 ms_caps_get(s->gw->caps, MS_CAPS_IMAP),
		 starttls ? " STARTTLS" : "",
		 s->tls || ms_gw_plaintext_ok(s->gw, s->peer) ?
		 " AUTH=PLAIN AUTH=LOGIN" : " LOGINDISABLED");
	out(s, fmt, caps);
}

static void imap_bad(struct session *s, const char *tag, const char *text)
{
	out(s, "%s BAD %s\r\n", tag, text);
	if (++s->bad >= GW_BAD_MAX) {
		out(s, "* BYE Too many invalid commands.\r\n");
		gw_session_close(s);
	}
}

static void imap_command(struct session *s)
{
	const char *tag, *cmd;

	if (s->argc == 0)
		return;
	tag = s->argv[0];
	if (strlen(tag) >= sizeof(s->tag)) {
		/* Answered with a cut tag, the client would wait forever. */
		imap_bad(s, "*", "Tag too long.");
		return;
	}
	snprintf(s->tag, sizeof(s->tag), "%s", tag);
	if (s->argc < 2) {
		imap_bad(s, "*", "Error in IMAP command received by server.");
		return;
	}
	cmd = s->argv[1];
	if (!strcasecmp(cmd, "CAPABILITY")) {
		imap_capability(s, "* CAPABILITY %s\r\n");
		out(s, "%s OK Pre-login capabilities listed.\r\n", tag);
	} else if (!strcasecmp(cmd, "NOOP")) {
		out(s, "%s OK NOOP completed.\r\n", tag);
	} else if (!strcasecmp(cmd, "ID")) {
		out(s, "* ID (\"name\" \"mailshift\")\r\n%s OK ID completed.\r\n",
		    tag);
	} else if (!strcasecmp(cmd, "LOGOUT")) {
		out(s, "* BYE Logging out\r\n%s OK Logout completed.\r\n", tag);
		gw_session_close(s);
	} else if (!strcasecmp(cmd, "STARTTLS")) {
		if (s->gw->tls == NULL || s->tls) {
			imap_bad(s, tag, "TLS is not available.");
			return;
		}
		out(s, "%s OK Begin TLS negotiation now.\r\n", tag);
		/* Nothing the client sent after STARTTLS in the clear may
		 * count (command injection, RFC 3501 11.1). */
		s->inlen = 0;
		s->st = SS_STARTTLS;
		if (ms_conn_starttls_server(s->c, s->gw->tls,
					    gw_client_on_tls) < 0)
			gw_session_close(s);
	} else if (!strcasecmp(cmd, "LOGIN")) {
		if (s->argc != 4) {
			imap_bad(s, tag, "Invalid arguments.");
			return;
		}
		ms_login_wipe(&s->login);
		s->login.user = strdup(s->argv[2]);
		s->login.pass = strdup(s->argv[3]);
		s->mech = "imap-login";
		gw_login_start(s);
	} else if (!strcasecmp(cmd, "AUTHENTICATE")) {
		if (s->argc < 3 || s->argc > 4) {
			imap_bad(s, tag, "Invalid arguments.");
			return;
		}
		s->mech = !strcasecmp(s->argv[2], "PLAIN") ? "sasl-plain" :
			  !strcasecmp(s->argv[2], "LOGIN") ? "sasl-login" : NULL;
		if (gw_plaintext_refused(s))
			return;
		if (!strcasecmp(s->argv[2], "PLAIN")) {
			if (s->argc == 4) {
				if (ms_login_take_plain(&s->login, s->argv[3]) < 0) {
					imap_bad(s, tag, "Invalid base64 data.");
					return;
				}
				gw_login_start(s);
				return;
			}
			s->st = SS_AUTH_PLAIN;
			out(s, "+ \r\n");
		} else if (!strcasecmp(s->argv[2], "LOGIN")) {
			s->st = SS_AUTH_USER;
			out(s, "+ VXNlcm5hbWU6\r\n");
		} else {
			out(s, "%s NO Unsupported authentication mechanism.\r\n",
			    tag);
		}
	} else {
		imap_bad(s, tag, "Please log in first.");
	}
}

/* A line of an AUTHENTICATE exchange (base64, or "*" to cancel). */
static void imap_auth_line(struct session *s, char *line)
{
	char *step;
	int r;

	if (!strcmp(line, "*")) {
		s->st = SS_PRELOGIN;
		out(s, "%s BAD Authentication aborted by client.\r\n", s->tag);
		ms_login_wipe(&s->login);
		return;
	}
	if (s->st == SS_AUTH_PLAIN) {
		s->st = SS_PRELOGIN;
		if (ms_login_take_plain(&s->login, line) < 0) {
			imap_bad(s, s->tag, "Invalid base64 data.");
			return;
		}
		gw_login_start(s);
		return;
	}
	r = ms_login_decode_step(line, &step);
	if (r < 0) {
		ms_login_wipe(&s->login);
		s->st = SS_PRELOGIN;
		imap_bad(s, s->tag, r == MS_LOGIN_NUL ?
			 "Invalid characters in the login." :
			 "Invalid base64 data.");
		return;
	}
	if (s->st == SS_AUTH_USER) {
		ms_login_wipe(&s->login);
		s->login.user = step;
		s->st = SS_AUTH_PASS;
		out(s, "+ UGFzc3dvcmQ6\r\n");
		return;
	}
	s->login.pass = step;
	s->st = SS_PRELOGIN;
	gw_login_start(s);
}

/* RFC 3501: tag = 1*<any ASTRING-CHAR except "+">. A tag is sent back in
 * every answer, and quoted in INPROGRESS: a quoted string, a literal or
 * one with '"', '\\' or a control byte is refused, never echoed. */
static int imap_tag_ok(const char *t, size_t n)
{
	if (n == 0)
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)t[i];

		if (c <= 0x20 || c >= 0x7f || strchr("(){%*\"\\+", c) != NULL)
			return 0;
	}
	return 1;
}

/* Whether the command line starting at in is "TAG ID ...": an ID's line
 * may be as long as RFC 2971 lets it be (GW_ID_LINE_MAX). */
static int imap_is_id(const char *in, size_t len)
{
	const char *sp = memchr(in, ' ', len);

	if (sp == NULL || sp == in || memchr(in, '\n', sp - in) != NULL)
		return 0;
	len -= (size_t)(sp + 1 - in);
	return len >= 3 && strncasecmp(sp + 1, "ID ", 3) == 0;
}

/* Splits one command line into s->argv (atoms and quoted strings); a
 * trailing {N} or {N+} starts a literal. Returns 1 when the command is
 * complete, 0 when a literal follows, -1 on a syntax error. */
static int imap_tokenize(struct session *s, const char *p)
{
	while (*p != '\0') {
		char tok[GW_LITERAL_MAX + 1];
		size_t n = 0;

		while (*p == ' ')
			p++;
		if (*p == '\0')
			break;
		/* An ID's parameters are not looked at (we answer with our
		 * own): one slot is reused for each, literals included. */
		if (s->id_line && s->argc > 2)
			ms_secret_free(&s->argv[--s->argc]);
		if (s->argc == GW_ARG_MAX)
			return -1;
		if (s->argc == 0 && (*p == '"' || *p == '{'))
			return -1;	/* a tag is an atom */
		if (*p == '"') {
			for (p++; *p != '"'; p++) {
				if (*p == '\0' || n == GW_LITERAL_MAX)
					return -1;
				if (*p == '\\' && (p[1] == '"' || p[1] == '\\'))
					p++;
				tok[n++] = *p;
			}
			p++;
		} else if (*p == '{') {
			char *e;
			unsigned long len = strtoul(p + 1, &e, 10);
			int plus = *e == '+';

			if (e == p + 1 || (plus && e[1] != '}') ||
			    (!plus && *e != '}') || e[plus + 1] != '\0' ||
			    len > GW_LITERAL_MAX)
				return -1;
			s->lit_need = len;
			s->argv[s->argc] = calloc(1, len + 1);
			if (s->argv[s->argc] == NULL)
				return -1;
			s->argc++;
			if (!plus)
				out(s, "+ OK\r\n");
			return 0;
		} else {
			while (*p != '\0' && *p != ' ' && n < GW_LITERAL_MAX)
				tok[n++] = *p++;
			/* Longer: an error, never two arguments. */
			if (*p != '\0' && *p != ' ')
				return -1;
		}
		if (s->argc == 0 && !imap_tag_ok(tok, n))
			return -1;	/* answered untagged */
		tok[n] = '\0';
		s->argv[s->argc++] = strdup(tok);
		OPENSSL_cleanse(tok, n);
	}
	return 1;
}

static void imap_process(struct session *s)
{
	while (s->inlen > 0 && gw_prelogin_reading(s) &&
	       !ms_conn_over_high(s->c)) {
		char *line;
		long linelen;
		int r;

		if (s->lit_need > 0) {
			char *arg = s->argv[s->argc - 1];
			size_t have = strlen(arg);
			size_t n = s->inlen < s->lit_need ? s->inlen : s->lit_need;

			/* A NUL inside a login literal cannot be replayed. */
			if (memchr(s->in, '\0', n) != NULL) {
				gw_clear_args(s);
				s->inlen = 0;
				imap_bad(s, "*", "Invalid literal.");
				return;
			}
			memcpy(arg + have, s->in, n);
			arg[have + n] = '\0';
			memmove(s->in, s->in + n, s->inlen - n);
			s->inlen -= n;
			s->lit_need -= n;
			continue;
		}
		if (s->argc == 0)
			s->id_line = s->st == SS_PRELOGIN &&
				     imap_is_id(s->in, s->inlen);
		linelen = gw_input_line(s);
		if (linelen < 0)
			return;
		line = s->in;
		if (memchr(line, '\0', linelen > 0 ? linelen - 1 : 0) != NULL &&
		    strlen(line) + 1 < (size_t)linelen) {
			/* A NUL byte inside the line: never valid. */
			gw_input_drop(s, linelen);
			gw_clear_args(s);
			imap_bad(s, "*", "Invalid characters in command.");
			if (s->st == SS_CLOSING)
				return;
			continue;
		}
		if (s->st != SS_PRELOGIN) {
			char copy[GW_INBUF_MAX];

			snprintf(copy, sizeof(copy), "%s", line);
			gw_input_drop(s, linelen);
			imap_auth_line(s, copy);
			OPENSSL_cleanse(copy, sizeof(copy));
			continue;
		}
		r = imap_tokenize(s, line);
		gw_input_drop(s, linelen);
		if (r < 0) {
			char tag[sizeof(s->tag)];

			snprintf(tag, sizeof(tag), "%s", s->argc > 0 &&
				 strlen(s->argv[0]) < sizeof(tag) ?
				 s->argv[0] : "*");
			gw_clear_args(s);
			imap_bad(s, tag, "Error in IMAP command received by "
				 "server.");
			if (s->st == SS_CLOSING)
				return;
			continue;
		}
		if (r == 0)
			continue;	/* a literal follows */
		if (gw_too_many_commands(s))
			return;
		imap_command(s);
		if (s->st == SS_CLOSING)
			return;
		gw_clear_args(s);
	}
}

/* ---- the front end ---- */

static void imap_greet(struct session *s)
{
	imap_capability(s, "* OK [CAPABILITY %s] mailshift ready.\r\n");
}

static const struct gw_proto imap_proto = {
	.greet = imap_greet,
	.process = imap_process,
	.send_login = imap_send_login,
	.backend_line = imap_backend_line,
	.relay_client_out = gw_imap_view_client,
	.relay_server = gw_imap_view_server,
	.relay_free = gw_imap_view_free,
	.relay_load = gw_imap_view_load,
};

/* Its sessions are the mailbox sessions' (gw_session.c). */
const struct ms_gw_frontend ms_gw_imap_frontend = {
	.name = "imap",
	.protos = 1 << MS_GW_IMAP,
	.accept = gw_session_accept,
	.arg = &imap_proto,
};
