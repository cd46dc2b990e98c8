/* The control socket: a root-only UNIX socket, one JSON object per line each
 * way (docs/gateway-spec.md). Requests are bounded in size; a bad request
 * gets {"ok": false, "error": ...} and the connection stays usable. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "control.h"
#include "log.h"

#define REQ_MAX (64 * 1024)

struct ms_control {
	uv_loop_t *loop;
	uv_pipe_t pipe;
	struct ms_gateway *gw;
	struct ms_store *store;
	char *path;
};

struct cclient {
	uv_pipe_t pipe;
	struct ms_control *ctl;
	char *buf;
	size_t len;
	int closing;
};

static const char *const states[] = {
	"source", "copying", "cutover", "destination", "failed",
};

static void on_client_close(uv_handle_t *h)
{
	struct cclient *cc = h->data;

	free(cc->buf);
	free(cc);
}

static void on_write_done(uv_write_t *req, int status)
{
	free(req->data);
	free(req);
}

static void reply(struct cclient *cc, json_t *o)
{
	char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
	size_t len;
	uv_write_t *req;
	uv_buf_t buf;

	json_decref(o);
	if (text == NULL || cc->closing)
		goto out;
	len = strlen(text);
	text[len] = '\n';	/* json_dumps' NUL becomes the line end */
	req = malloc(sizeof(*req));
	if (req == NULL)
		goto out;
	req->data = text;
	buf = uv_buf_init(text, (unsigned int)len + 1);
	if (uv_write(req, (uv_stream_t *)&cc->pipe, &buf, 1, on_write_done) < 0) {
		free(req);
		goto out;
	}
	return;
out:
	free(text);
}

static json_t *error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static json_t *error(const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return json_pack("{s:b, s:s}", "ok", 0, "error", msg);
}

static json_t *user_json(struct ms_control *ctl, const struct ms_user_info *u)
{
	return json_pack("{s:s, s:s, s:s, s:s, s:s?, s:I, s:I, s:I, s:I}",
			 "user", u->name, "state", u->state,
			 "copy", ctl->gw != NULL ?
				ms_gateway_user_copy(ctl->gw, u->name) : "",
			 "policy", u->policy[0] != '\0' ? u->policy : "default",
			 "error", u->last_error[0] != '\0' ? u->last_error : NULL,
			 "messages", (json_int_t)u->msgs,
			 "bytes", (json_int_t)u->bytes,
			 "sessions", (json_int_t)(ctl->gw != NULL ?
				ms_gateway_user_sessions(ctl->gw, u->name) : 0),
			 "updated", (json_int_t)u->updated_at);
}

struct list_ctx {
	struct ms_control *ctl;
	json_t *users;
	json_int_t counts[5];
	json_int_t msgs, bytes;
};

static int on_user(void *ctx, const struct ms_user_info *u)
{
	struct list_ctx *lc = ctx;

	if (lc->users != NULL)
		json_array_append_new(lc->users, user_json(lc->ctl, u));
	for (size_t i = 0; i < 5; i++)
		if (!strcmp(u->state, states[i]))
			lc->counts[i]++;
	lc->msgs += (json_int_t)u->msgs;
	lc->bytes += (json_int_t)u->bytes;
	return 0;
}

static int valid_state(const char *s)
{
	for (size_t i = 0; i < 5; i++)
		if (!strcmp(s, states[i]))
			return 1;
	return 0;
}

static json_t *user_update(struct ms_control *ctl, json_t *req, int create)
{
	const char *user = json_string_value(json_object_get(req, "user"));
	const char *state = json_string_value(json_object_get(req, "state"));
	const char *policy = json_string_value(json_object_get(req, "policy"));
	struct ms_user_info info;
	int64_t id;
	int found;

	if (user == NULL || *user == '\0' || strlen(user) >= sizeof(info.name))
		return error("%s", "a user name is needed");
	if (state != NULL && !valid_state(state))
		return error("invalid state \"%s\" (source, copying, cutover, "
			     "destination, failed)", state);
	if (ms_store_user_info(ctl->store, user, &info, &found) < 0)
		return error("store: %s", ms_store_error(ctl->store));
	if (!found && !create)
		return error("no such user \"%s\"", user);
	if (found && state != NULL && strcmp(state, info.state) != 0) {
		/* The map is what the gateway acts on: a wrong word here
		 * strands mail. Refuse what cannot be right by hand. */
		if (ctl->gw != NULL && ms_gateway_user_copy(ctl->gw, user)[0] !=
		    '\0')
			return error("a copy runs for %s (%s): wait for it, or "
				     "end it with mailshiftctl kick", user,
				     ms_gateway_user_copy(ctl->gw, user));
		if (!strcmp(info.state, "destination") &&
		    !json_is_true(json_object_get(req, "force")))
			return error("%s is on the destination: mail that "
				     "arrived there since would be left "
				     "behind; mailshiftctl rollback %s brings "
				     "it back (--force to set the state "
				     "anyway)", user, user);
	}
	if (ms_store_user_get(ctl->store, user, &id) < 0 ||
	    (state != NULL && ms_store_user_set_state(ctl->store, id, state,
						      NULL) < 0) ||
	    (policy != NULL && ms_store_user_set_policy(ctl->store, id,
							!strcmp(policy, "default") ?
							NULL : policy) < 0))
		return error("%s", ms_store_error(ctl->store));
	if (ms_store_user_info(ctl->store, user, &info, &found) < 0 || !found)
		return error("store: %s", ms_store_error(ctl->store));
	return json_pack("{s:b, s:o}", "ok", 1, "user", user_json(ctl, &info));
}

struct migrate_all {
	struct ms_control *ctl;
	int started;
	const char *error;
};

static int migrate_one(void *ctx, const struct ms_user_info *u)
{
	struct migrate_all *ma = ctx;
	const char *why = NULL;

	if (!strcmp(u->state, "destination") || !strcmp(u->policy, "off"))
		return 0;
	if (ma->ctl->gw == NULL ||
	    ms_gateway_migrate(ma->ctl->gw, u->name, &why) < 0) {
		ma->error = why != NULL ? why : "no gateway";
		return 1;
	}
	ma->started++;
	return 0;
}

static json_t *dispatch(struct ms_control *ctl, json_t *req)
{
	const char *cmd = json_string_value(json_object_get(req, "cmd"));
	struct list_ctx lc = { .ctl = ctl };

	if (cmd == NULL)
		return error("%s", "no \"cmd\"");
	if (!strcmp(cmd, "status")) {
		struct ms_progress p = { 0 };
		json_t *by_state = json_object();

		if (ms_store_user_foreach(ctl->store, on_user, &lc) != 0)
			return error("store: %s", ms_store_error(ctl->store));
		for (size_t i = 0; i < 5; i++)
			json_object_set_new(by_state, states[i],
					    json_integer(lc.counts[i]));
		if (ctl->gw != NULL)
			ms_gateway_progress(ctl->gw, &p);
		return json_pack("{s:b, s:o, s:I, s:I, s:I, s:I, s:I, s:f, "
				 "s:o}", "ok", 1, "states", by_state,
				 "messages", lc.msgs, "bytes", lc.bytes,
				 "sessions", (json_int_t)(ctl->gw != NULL ?
				 ms_gateway_nsessions(ctl->gw) : 0),
				 "copy_messages_done", (json_int_t)p.msgs_done,
				 "copy_messages_todo", (json_int_t)p.msgs_todo,
				 "copy_seconds", p.seconds, "capabilities",
				 ctl->gw != NULL ?
				 ms_gateway_caps_json(ctl->gw) : json_object());
	}
	if (!strcmp(cmd, "user.list")) {
		lc.users = json_array();
		if (ms_store_user_foreach(ctl->store, on_user, &lc) != 0) {
			json_decref(lc.users);
			return error("store: %s", ms_store_error(ctl->store));
		}
		return json_pack("{s:b, s:o}", "ok", 1, "users", lc.users);
	}
	if (!strcmp(cmd, "user.show")) {
		const char *user = json_string_value(json_object_get(req, "user"));
		struct ms_user_info info;
		int found = 0;

		if (user == NULL)
			return error("%s", "a user name is needed");
		if (ms_store_user_info(ctl->store, user, &info, &found) < 0)
			return error("store: %s", ms_store_error(ctl->store));
		if (!found)
			return error("no such user \"%s\"", user);
		return json_pack("{s:b, s:o}", "ok", 1, "user",
				 user_json(ctl, &info));
	}
	if (!strcmp(cmd, "user.add"))
		return user_update(ctl, req, 1);
	if (!strcmp(cmd, "user.set"))
		return user_update(ctl, req, 0);
	if (!strcmp(cmd, "policy.set")) {
		const char *dom = json_string_value(json_object_get(req,
								    "domain"));
		const char *pol = json_string_value(json_object_get(req,
								    "policy"));
		char err[256];

		if (ctl->gw == NULL)
			return error("%s", "no gateway");
		if (pol == NULL)
			return error("%s", "a policy is needed (passthrough, "
				     "hold, off or config)");
		if (ms_gateway_set_policy(ctl->gw, dom, strcmp(pol, "config") ?
					  pol : NULL, err, sizeof(err)) < 0)
			return error("%s", err);
		return json_pack("{s:b, s:o}", "ok", 1, "policy",
				 ms_gateway_policies(ctl->gw));
	}
	if (!strcmp(cmd, "policy")) {
		if (ctl->gw == NULL)
			return error("%s", "no gateway");
		return json_pack("{s:b, s:o}", "ok", 1, "policy",
				 ms_gateway_policies(ctl->gw));
	}
	if (!strcmp(cmd, "sessions"))
		return json_pack("{s:b, s:o}", "ok", 1, "sessions",
				 ctl->gw != NULL ? ms_gateway_sessions(ctl->gw) :
				 json_array());
	if (!strcmp(cmd, "migrate")) {
		const char *user = json_string_value(json_object_get(req, "user"));
		const char *why = NULL;

		if (user == NULL)
			return error("%s", "a user name is needed");
		if (ctl->gw == NULL || ms_gateway_migrate(ctl->gw, user, &why) < 0)
			return error("%s", why != NULL ? why : "no gateway");
		return json_pack("{s:b, s:s}", "ok", 1, "user", user);
	}
	if (!strcmp(cmd, "migrate.all")) {
		struct migrate_all ma = { .ctl = ctl };

		if (ms_store_user_foreach(ctl->store, migrate_one, &ma) < 0)
			return error("store: %s", ms_store_error(ctl->store));
		return json_pack("{s:b, s:i, s:s?}", "ok", ma.error == NULL,
				 "started", ma.started, "error", ma.error);
	}
	if (!strcmp(cmd, "rollback")) {
		const char *user = json_string_value(json_object_get(req, "user"));
		const char *why = NULL;

		if (user == NULL)
			return error("%s", "a user name is needed");
		if (ctl->gw == NULL)
			return error("%s", "no gateway");
		if (ms_gateway_rollback(ctl->gw, user, &why) < 0)
			return error("%s: %s", user, why);
		return json_pack("{s:b}", "ok", 1);
	}
	if (!strcmp(cmd, "kick")) {
		const char *user = json_string_value(json_object_get(req, "user"));

		if (user == NULL)
			return error("%s", "a user name is needed");
		return json_pack("{s:b, s:i}", "ok", 1, "kicked",
				 ctl->gw != NULL ? ms_gateway_kick(ctl->gw, user) +
				 ms_smtp_kick(ctl->gw, user) : 0);
	}
	return error("unknown command \"%s\"", cmd);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	static char slab[16384];

	*buf = uv_buf_init(slab, sizeof(slab));
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
	struct cclient *cc = stream->data;
	char *lf;

	if (nread < 0) {
		cc->closing = 1;
		uv_close((uv_handle_t *)stream, on_client_close);
		return;
	}
	if (cc->len + (size_t)nread > REQ_MAX) {
		reply(cc, error("%s", "request too long"));
		cc->closing = 1;
		uv_close((uv_handle_t *)stream, on_client_close);
		return;
	}
	if (cc->buf == NULL)
		cc->buf = malloc(REQ_MAX + 1);
	if (cc->buf == NULL)
		return;
	memcpy(cc->buf + cc->len, buf->base, (size_t)nread);
	cc->len += (size_t)nread;
	while ((lf = memchr(cc->buf, '\n', cc->len)) != NULL) {
		size_t linelen = (size_t)(lf - cc->buf);
		json_error_t jerr;
		json_t *req;

		*lf = '\0';
		req = json_loads(cc->buf, 0, &jerr);
		if (req == NULL || !json_is_object(req))
			reply(cc, error("bad JSON: %s", req == NULL ? jerr.text :
					"not an object"));
		else
			reply(cc, dispatch(cc->ctl, req));
		json_decref(req);
		memmove(cc->buf, lf + 1, cc->len - linelen - 1);
		cc->len -= linelen + 1;
	}
}

static void on_connection(uv_stream_t *server, int status)
{
	struct ms_control *ctl = server->data;
	struct cclient *cc;

	if (status < 0)
		return;
	cc = calloc(1, sizeof(*cc));
	if (cc == NULL)
		return;
	cc->ctl = ctl;
	uv_pipe_init(ctl->loop, &cc->pipe, 0);
	cc->pipe.data = cc;
	if (uv_accept(server, (uv_stream_t *)&cc->pipe) < 0 ||
	    uv_read_start((uv_stream_t *)&cc->pipe, on_alloc, on_read) < 0)
		uv_close((uv_handle_t *)&cc->pipe, on_client_close);
}

int ms_control_new(uv_loop_t *loop, const char *path, struct ms_gateway *gw,
		   struct ms_store *store, struct ms_control **ctl_r,
		   char *err, size_t errsz)
{
	struct ms_control *ctl = calloc(1, sizeof(*ctl));
	mode_t old;
	int r;

	if (ctl == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	ctl->loop = loop;
	ctl->gw = gw;
	ctl->store = store;
	ctl->path = strdup(path);
	uv_pipe_init(loop, &ctl->pipe, 0);
	ctl->pipe.data = ctl;
	unlink(path);
	/* Root-only from the first instant: no window with a wider mode. */
	old = umask(0177);
	r = uv_pipe_bind(&ctl->pipe, path);
	umask(old);
	if (r == 0)
		r = uv_listen((uv_stream_t *)&ctl->pipe, 16, on_connection);
	if (r < 0) {
		snprintf(err, errsz, "control socket %s: %s", path,
			 uv_strerror(r));
		uv_close((uv_handle_t *)&ctl->pipe, NULL);
		free(ctl->path);
		ctl->path = NULL;
		/* The handle is closed on the next loop turn; ctl must live
		 * until then: leak this small struct rather than race. */
		return -1;
	}
	*ctl_r = ctl;
	return 0;
}

static void on_ctl_close(uv_handle_t *h)
{
	struct ms_control *ctl = h->data;

	free(ctl->path);
	free(ctl);
}

void ms_control_free(struct ms_control **ctlp)
{
	struct ms_control *ctl = *ctlp;

	if (ctl == NULL)
		return;
	*ctlp = NULL;
	if (ctl->path != NULL)
		unlink(ctl->path);
	uv_close((uv_handle_t *)&ctl->pipe, on_ctl_close);
}
