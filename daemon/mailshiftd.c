/* mailshiftd: the gateway daemon. See docs/gateway-spec.md and
 * docs/mailshift.conf.5. Opens what needs root (listeners, the control
 * socket, the store, TLS keys, admin password files, the pid file), then
 * runs as [daemon] user. */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "activation.h"
#include "config.h"
#include "control.h"
#include "dconfig.h"
#include "gateway.h"
#include "log.h"
#include "priv.h"
#include "reader.h"
#include "retire.h"
#include "steer.h"
#include "store.h"
#include "util.h"

static uv_signal_t sigterm, sigint;
static uv_timer_t stopping;

static void on_stopping(uv_timer_t *t)
{
	uv_stop(t->loop);
}

/* Listeners first, the loop one turn later: a connection accepted just
 * before the signal is greeted (on that turn) before sessions are closed,
 * not closed unanswered. */
static void on_signal(uv_signal_t *h, int signum)
{
	struct ms_gateway *gw = h->data;

	ms_info("signal %d: stopping", signum);
	if (gw != NULL)
		ms_gateway_stop_listening(gw);
	uv_timer_start(&stopping, on_stopping, 0, 0);
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: mailshiftd -c FILE [-f] [-t] [-v]\n"
		"  -c FILE  configuration (see mailshift.conf(5))\n"
		"  -f       stay in the foreground (the only mode for now)\n"
		"  -t       check the configuration and the files it names, "
		"then exit\n"
		"  -v       log more\n");
}

/* The directory a path is in. */
static void parent_dir(const char *path, char *out, size_t outsz)
{
	const char *slash = strrchr(path, '/');

	if (slash == NULL)
		snprintf(out, outsz, ".");
	else if (slash == path)
		snprintf(out, outsz, "/");
	else
		snprintf(out, outsz, "%.*s", (int)(slash - path), path);
}

/* What the daemon needs once it runs as the user, checked before anything
 * is opened: a wrong owner is a clear error at start, not a failed write
 * hours later. */
static int check_user_access(const struct ms_dconfig *c,
			     const struct ms_priv *p, char *err, size_t errsz)
{
	static const char *const suffix[] = { "", "-wal", "-shm" };
	char dirs[3][512], files[3][530];
	struct ms_priv_need need[10];
	size_t n = 0;

	if (ms_store_is_url(c->store))
		goto no_file;
	parent_dir(c->store, dirs[0], sizeof(dirs[0]));
	need[n++] = (struct ms_priv_need){ dirs[0], W_OK | X_OK, 1,
		"the store's directory must be writable by [daemon] user "
		"(SQLite makes and removes the store's -wal and -shm files "
		"there): chown it to that user" };
	for (size_t i = 0; i < 3; i++) {
		snprintf(files[i], sizeof(files[i]), "%s%s", c->store,
			 suffix[i]);
		if (access(files[i], F_OK) == 0)
			need[n++] = (struct ms_priv_need){ files[i],
				R_OK | W_OK, 1, "the store's files must "
				"belong to [daemon] user: chown them" };
	}
no_file:
	if (c->src_ca[0] != '\0')
		need[n++] = (struct ms_priv_need){ c->src_ca, R_OK, 1,
			"[source] ca_file is read at each TLS connection, as "
			"[daemon] user" };
	if (c->dst_ca[0] != '\0')
		need[n++] = (struct ms_priv_need){ c->dst_ca, R_OK, 1,
			"[destination] ca_file is read at each TLS connection, "
			"as [daemon] user" };
	if (c->pid_file[0] != '\0') {
		parent_dir(c->pid_file, dirs[1], sizeof(dirs[1]));
		need[n++] = (struct ms_priv_need){ dirs[1], W_OK | X_OK, 0,
			"the pid file will be left behind at exit" };
	}
	parent_dir(c->control, dirs[2], sizeof(dirs[2]));
	need[n++] = (struct ms_priv_need){ dirs[2], W_OK | X_OK, 0,
		"the control socket will be left behind at exit (the next "
		"start replaces it)" };
	return ms_priv_check(p, need, n, err, errsz);
}

/* [daemon] user and group, [control] group. *drop: switch after opening. */
static int setup_user(const struct ms_dconfig *c, struct ms_priv *p,
		      struct ms_control_access *acc, int *drop, char *err,
		      size_t errsz)
{
	acc->owner = 0;
	acc->group = (gid_t)-1;
	*drop = 0;
	if (c->control_group[0] != '\0' &&
	    ms_priv_group(c->control_group, &acc->group, err, errsz) < 0)
		return -1;
	if (c->user[0] == '\0') {
		if (geteuid() == 0)
			ms_warn("running as root: set [daemon] user (an "
				"unprivileged user mailshiftd switches to "
				"once its listeners and files are open; see "
				"mailshift.conf(5))");
		return 0;
	}
	if (ms_priv_lookup(c->user, c->group, p, err, errsz) < 0)
		return -1;
	/* backend = kmod: the session map is written for the daemon's life. */
	p->keep_net = c->gw.transparent || c->src_transparent ||
		      c->dst_transparent || (c->steer.present &&
		      c->steer.backend == MS_STEER_BACKEND_KMOD);
	acc->owner = p->uid;
	if (geteuid() == p->uid && getegid() == p->gid)
		return 0;	/* started as that user already */
	if (geteuid() != 0) {
		snprintf(err, errsz, "[daemon] user %s: mailshiftd must be "
			 "started as root to switch to it (it runs as uid %u)",
			 c->user, (unsigned int)geteuid());
		return -1;
	}
	*drop = 1;
	/* Before any thread exists: the restrictions are inherited. */
	if (ms_priv_restrict(p, err, errsz) < 0)
		return -1;
	return check_user_access(c, p, err, errsz);
}

/* A new store is made the user's: SQLite run by root (mailshiftd before the
 * switch, mailshiftctl) then gives its -wal and -shm files that owner. */
static int store_create(const char *path, const struct ms_priv *p, char *err,
			size_t errsz)
{
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
		      0600);

	if (fd < 0) {
		if (errno == EEXIST)
			return 0;
		snprintf(err, errsz, "store %s: %s", path, strerror(errno));
		return -1;
	}
	if (fchown(fd, p->uid, p->gid) < 0 || fchmod(fd, 0600) < 0) {
		snprintf(err, errsz, "store %s: %s", path, strerror(errno));
		close(fd);
		unlink(path);
		return -1;
	}
	close(fd);
	return 0;
}

/* A database server may be shared by mistake: the store then belongs to
 * this source and destination, recorded at first and compared at each
 * start. A SQLite file is the migration's own and opens as it always did. */
static int open_store(const struct ms_dconfig *c, const char *app,
		      struct ms_store **store_r, char **err_r)
{
	const struct ms_gw_config *g = &c->gw;
	const struct ms_server_cfg *s = g->src_imap.host[0] ? &g->src_imap :
					&g->src_pop3;
	const struct ms_server_cfg *d = g->dst_imap.host[0] ? &g->dst_imap :
					&g->dst_pop3;
	char pair[600];

	if (!ms_store_is_url(c->store))
		return ms_store_open(c->store, store_r, err_r);
	ms_store_pg_timeout_ms = c->store_timeout * 1000;
	snprintf(pair, sizeof(pair), "source %s:%u, destination %s:%u",
		 s->host, s->port, d->host, d->port);
	return ms_store_open_as(c->store, pair, app, store_r, err_r);
}

/* The store's reader (reader.h): [store] readers threads, each with a
 * connection of its own, opened as the store was (before privileges are
 * dropped). */
static int start_reader(uv_loop_t *loop, const struct ms_dconfig *c,
			struct ms_reader **r_out, char *err, size_t errsz)
{
	struct ms_store *stores[MS_READERS_MAX] = { NULL };
	unsigned int n = c->store_readers;
	char *serr = NULL;

	for (unsigned int i = 0; i < n; i++) {
		if (open_store(c, "mailshift-reader", &stores[i], &serr) < 0) {
			snprintf(err, errsz, "store's reader: %s",
				 serr != NULL ? serr : "cannot open");
			free(serr);
			while (i > 0)
				ms_store_close(&stores[--i]);
			return -1;
		}
	}
	return ms_reader_new(loop, stores, n, r_out, err, errsz);
}

/* Admin logins: the password comes from a root-only file (or one of the
 * daemon's user). */
static int read_admin_passwords(struct ms_dconfig *c, uid_t owner, char *err,
				size_t errsz)
{
	for (int side = 0; side < 2; side++) {
		const char *name = side ? c->dst_admin : c->src_admin;
		const char *pwf = side ? c->dst_admin_pwf : c->src_admin_pwf;
		char *pw;

		if (name[0] == '\0')
			continue;
		pw = ms_read_secret_file_owned(pwf, owner, err, errsz);
		if (pw == NULL)
			return -1;
		if (side) {
			c->gw.dst_admin = c->dst_admin;
			c->gw.dst_admin_pw = pw;
		} else {
			c->gw.src_admin = c->src_admin;
			c->gw.src_admin_pw = pw;
		}
	}
	/* The doveadm API key: as secret as the admin passwords. */
	if (c->dst_doveadm_keyf[0] != '\0') {
		c->gw.doveadm.key = ms_read_secret_file_owned(
			c->dst_doveadm_keyf, owner, err, errsz);
		if (c->gw.doveadm.key == NULL)
			return -1;
	}
	return 0;
}

static int write_pid_file(const char *path, char *err, size_t errsz)
{
	char text[32];
	int len = snprintf(text, sizeof(text), "%ld\n", (long)getpid());
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW |
		      O_CLOEXEC, 0644);

	if (fd < 0 || write(fd, text, (size_t)len) != len) {
		snprintf(err, errsz, "%s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

/* The TLS certificate and key as the listeners will load them: a bad pair
 * (a key of another user's, readable by others) is a configuration error,
 * exit 2, at start as with -t. */
static int check_tls(const struct ms_dconfig *c, char *err, size_t errsz)
{
	struct ms_tls_server *tls = NULL;

	if (c->gw.cert[0] == '\0' && c->gw.key[0] == '\0')
		return 0;
	if (ms_tls_server_new(c->gw.cert, c->gw.key, &tls, err, errsz) < 0)
		return -1;
	ms_tls_server_free(&tls);
	return 0;
}

/* -t: what a start would refuse at once (the file, the user, the admin
 * password files), without opening a listener or the store, and without
 * giving up any privilege: a check an operator or a package's
 * post-install step can run next to a live daemon. */
static int check_config(const char *conf)
{
	static struct ms_dconfig c;
	struct ms_priv p = { 0 };
	uid_t owner = 0;
	char err[1200];
	int ret = 0;

	if (ms_dconfig_load(conf, &c, err, sizeof(err)) < 0)
		ret = 2;
	else if (c.user[0] != '\0' &&
		 ms_priv_lookup(c.user, c.group, &p, err, sizeof(err)) < 0)
		ret = 2;
	if (ret == 0 && c.user[0] != '\0')
		owner = p.uid;
	if (ret == 0 && read_admin_passwords(&c, owner, err, sizeof(err)) < 0)
		ret = 2;
	if (ret == 0 && check_tls(&c, err, sizeof(err)) < 0)
		ret = 2;
	ms_secret_free((char **)&c.gw.src_admin_pw);
	ms_secret_free((char **)&c.gw.dst_admin_pw);
	ms_secret_free((char **)&c.gw.doveadm.key);
	if (ret != 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		return ret;
	}
	printf("mailshiftd: %s: configuration ok\n", conf);
	return 0;
}

/* [steer] manage = yes: the steering table is installed (or replaced) once
 * the listeners are open, while mailshiftd still has CAP_NET_ADMIN. It is
 * left in place at exit: with nothing listening, proxied ports refuse
 * connections (fail closed) until mailshiftd is back. A migration the
 * store says is retired (mailshiftctl retire --apply) keeps its mail ports
 * going straight to the destination: a restart never puts the gateway,
 * or the retired source, back in the path. */
static int manage_steering(const struct ms_steer_cfg *cfg,
			   struct ms_store *store, char *err, size_t errsz)
{
	struct ms_steer_cfg s = *cfg;
	struct ms_retirement ret = { 0 };
	struct ms_steer_route rt;
	char *script = NULL;
	unsigned int n = 0;
	int r, lock, retired = 0;

	if (ms_store_retirement_get(store, &ret, &retired) < 0) {
		snprintf(err, errsz, "store: %s", ms_store_error(store));
		return -1;
	}
	free(ret.record);
	if (retired)
		ms_steer_cfg_retired(&s);
	lock = ms_steer_lock(err, errsz);
	if (lock < 0)
		return -1;
	r = ms_steer_install(&s, 0, &script, &rt, &n, err, errsz);
	close(lock);
	free(script);
	if (r == 0 && retired)
		ms_log(MS_LOG_WARN, "steering installed for a retired "
		       "migration: %u entries, every mail port straight to "
		       "the destination (retire --apply, %lld)", n,
		       (long long)ret.at);
	else if (r == 0)
		ms_log(MS_LOG_WARN, "steering installed: %u entries, mark "
		       "0x%08x, routing table %u, rule priority %u", n,
		       rt.mark, rt.table, rt.priority);
	return r;
}

int main(int argc, char *argv[])
{
	static struct ms_dconfig c;
	struct ms_priv priv = { 0 };
	struct ms_control_access acc;
	struct ms_store *store = NULL;
	struct ms_gateway *gw = NULL;
	struct ms_reader *reader = NULL;
	struct ms_control *ctl = NULL;
	char err[1200];
	char *serr = NULL;
	const char *conf = NULL;
	uv_loop_t *loop = NULL;
	int ch, drop, pid_written = 0, test_only = 0, ret = 1, inherited;

	while ((ch = getopt(argc, argv, "c:ftvh")) != -1) {
		switch (ch) {
		case 'c': conf = optarg; break;
		case 'f': break;
		case 't': test_only = 1; break;
		case 'v': ms_log_level = MS_LOG_INFO; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (conf == NULL) {
		usage(stderr);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	/* The relay frees and allocates write buffers of up to 1 MB all the
	 * time: with glibc's defaults each one is a fresh mmap or a heap
	 * that shrinks and regrows, i.e. page faults on every chunk. Keep
	 * them on a heap that is not trimmed under 64 MB. */
	mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
	if (test_only)
		return check_config(conf);
	if (ms_priv_start(err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		return 1;
	}
	/* before anything opens a file: the inherited fds are 3 and up */
	inherited = ms_activation_init(err, sizeof(err));
	if (inherited < 0) {
		fprintf(stderr, "mailshiftd: socket activation: %s\n", err);
		return 1;
	}
	if (ms_dconfig_load(conf, &c, err, sizeof(err)) < 0 ||
	    setup_user(&c, &priv, &acc, &drop, err, sizeof(err)) < 0 ||
	    read_admin_passwords(&c, acc.owner, err, sizeof(err)) < 0 ||
	    check_tls(&c, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		ms_secret_free((char **)&c.gw.src_admin_pw);
		ms_secret_free((char **)&c.gw.dst_admin_pw);
		ms_secret_free((char **)&c.gw.doveadm.key);
		return 2;
	}
	if (drop && !ms_store_is_url(c.store) &&
	    store_create(c.store, &priv, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		return 1;
	}
	if (open_store(&c, "mailshift", &store, &serr) < 0) {
		/* not the URL: one refused for its password holds it */
		fprintf(stderr, "mailshiftd: store %s: %s\n",
			ms_store_is_url(c.store) ? "[store] url" : c.store,
			serr != NULL ? serr : "cannot open");
		free(serr);
		return 1;
	}
	loop = uv_default_loop();
	ms_retire_init(loop, store, &c.retire);
	if (c.steer.present)
		ms_steer_sessions_use(c.steer.backend);
	/* the reader first: the gateway listens from its start on */
	if (start_reader(loop, &c, &reader, err, sizeof(err)) < 0 ||
	    ms_gateway_new(loop, &c.gw, store, &gw, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		goto out;
	}
	ms_gateway_set_reader(gw, reader);
	if (ms_control_new(loop, c.control, &acc, gw, store, &ctl, err,
			   sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		goto out;
	}
	if (c.steer.manage &&
	    manage_steering(&c.steer, store, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: [steer] manage: %s\n", err);
		goto out;
	}
	if (c.pid_file[0] != '\0') {
		if (write_pid_file(c.pid_file, err, sizeof(err)) < 0) {
			fprintf(stderr, "mailshiftd: %s\n", err);
			goto out;
		}
		pid_written = 1;
	}
	if (drop && ms_priv_drop(&priv, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: cannot switch to user %s: %s\n",
			priv.user, err);
		goto out;
	}
	uv_signal_init(loop, &sigterm);
	uv_signal_init(loop, &sigint);
	uv_timer_init(loop, &stopping);
	sigterm.data = sigint.data = gw;
	uv_signal_start(&sigterm, on_signal, SIGTERM);
	uv_signal_start(&sigint, on_signal, SIGINT);
	/* Not a warning: the line an operator looks for at start (-v). */
	ms_info("mailshiftd ready (%u listener(s)%s), running as uid %u gid "
		"%u%s", c.gw.nlisten, inherited ? ", inherited" : "",
		(unsigned int)geteuid(), (unsigned int)getegid(),
		priv.keep_net && drop ? " with CAP_NET_ADMIN, CAP_NET_RAW" : "");
	uv_run(loop, UV_RUN_DEFAULT);
	uv_close((uv_handle_t *)&sigterm, NULL);
	uv_close((uv_handle_t *)&sigint, NULL);
	uv_close((uv_handle_t *)&stopping, NULL);
	if (c.steer.manage)
		ms_log(MS_LOG_WARN, "steering left installed: proxied ports "
		       "refuse connections until mailshiftd is back");
	ret = 0;
out:
	ms_control_free(&ctl);
	ms_gateway_free(&gw);
	/* after the sessions, which cancelled what they had asked */
	ms_reader_free(reader);
	ms_retire_stop();
	if (loop != NULL)
		uv_run(loop, UV_RUN_NOWAIT);
	ms_store_close(&store);
	if (pid_written)
		unlink(c.pid_file);
	ms_secret_free((char **)&c.gw.src_admin_pw);
	ms_secret_free((char **)&c.gw.dst_admin_pw);
	ms_secret_free((char **)&c.gw.doveadm.key);
	return ret;
}
