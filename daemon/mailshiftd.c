/* mailshiftd: the gateway daemon. See docs/gateway-spec.md and
 * docs/mailshift.conf.5. */
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

#include <uv.h>

#include "config.h"
#include "control.h"
#include "dconfig.h"
#include "gateway.h"
#include "log.h"
#include "store.h"

static uv_signal_t sigterm, sigint;

static void on_signal(uv_signal_t *h, int signum)
{
	ms_info("signal %d: stopping", signum);
	uv_stop(h->loop);
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: mailshiftd -c FILE [-f] [-v]\n"
		"  -c FILE  configuration (see mailshift.conf(5))\n"
		"  -f       stay in the foreground (the only mode for now)\n"
		"  -v       log more\n");
}

int main(int argc, char *argv[])
{
	static struct ms_dconfig c;
	struct ms_store *store = NULL;
	struct ms_gateway *gw = NULL;
	struct ms_control *ctl = NULL;
	struct ms_control_access acc = { 0, (gid_t)-1 };
	char err[600];
	char *serr = NULL;
	const char *conf = NULL;
	uv_loop_t *loop;
	int ch, ret = 1;

	while ((ch = getopt(argc, argv, "c:fvh")) != -1) {
		switch (ch) {
		case 'c': conf = optarg; break;
		case 'f': break;
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
	/* Every session holds two sockets: take all the descriptors the
	 * system allows us. */
	{
		struct rlimit rl;

		if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
			rl.rlim_cur = rl.rlim_max;
			setrlimit(RLIMIT_NOFILE, &rl);
		}
	}
	if (ms_dconfig_load(conf, &c, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		return 2;
	}
	/* Admin logins: the password comes from a root-only file. */
	for (int side = 0; side < 2; side++) {
		const char *name = side ? c.dst_admin : c.src_admin;
		const char *pwf = side ? c.dst_admin_pwf : c.src_admin_pwf;
		char *pw;

		if (name[0] == '\0')
			continue;
		if (pwf[0] == '\0') {
			fprintf(stderr, "mailshiftd: %s: [%s] admin needs "
				"admin_password_file\n", conf,
				side ? "destination" : "source");
			return 2;
		}
		pw = ms_read_secret_file(pwf, err, sizeof(err));
		if (pw == NULL) {
			fprintf(stderr, "mailshiftd: %s\n", err);
			return 2;
		}
		if (side) {
			c.gw.dst_admin = c.dst_admin;
			c.gw.dst_admin_pw = pw;
		} else {
			c.gw.src_admin = c.src_admin;
			c.gw.src_admin_pw = pw;
		}
	}
	if (ms_store_open(c.store, &store, &serr) < 0) {
		fprintf(stderr, "mailshiftd: store %s: %s\n", c.store,
			serr != NULL ? serr : "cannot open");
		free(serr);
		return 1;
	}
	loop = uv_default_loop();
	if (ms_gateway_new(loop, &c.gw, store, &gw, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		goto out;
	}
	if (ms_control_new(loop, c.control, &acc, gw, store, &ctl, err,
			   sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		goto out;
	}
	if (c.pid_file[0] != '\0') {
		FILE *f = fopen(c.pid_file, "w");

		if (f == NULL) {
			fprintf(stderr, "mailshiftd: %s: %s\n", c.pid_file,
				strerror(errno));
			goto out;
		}
		fprintf(f, "%ld\n", (long)getpid());
		fclose(f);
	}
	uv_signal_init(loop, &sigterm);
	uv_signal_init(loop, &sigint);
	uv_signal_start(&sigterm, on_signal, SIGTERM);
	uv_signal_start(&sigint, on_signal, SIGINT);
	ms_log(MS_LOG_WARN, "mailshiftd ready (%u listener(s))", c.gw.nlisten);
	uv_run(loop, UV_RUN_DEFAULT);
	uv_close((uv_handle_t *)&sigterm, NULL);
	uv_close((uv_handle_t *)&sigint, NULL);
	ret = 0;
out:
	ms_control_free(&ctl);
	ms_gateway_free(&gw);
	uv_run(loop, UV_RUN_NOWAIT);
	ms_store_close(&store);
	if (c.pid_file[0] != '\0' && ret == 0)
		unlink(c.pid_file);
	return ret;
}
