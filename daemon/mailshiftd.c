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
#include "gateway.h"
#include "log.h"
#include "pop3_uidl.h"
#include "store.h"

struct dconfig {
	struct ms_gw_config gw;
	char src_admin[128], dst_admin[128];
	char src_admin_pwf[512], dst_admin_pwf[512];
	char store[512];
	char control[512];
	char pid_file[512];
	char src_ca[512], dst_ca[512];
	int src_insecure, dst_insecure;
};

static int set_buf(char *dst, size_t sz, const char *v, char *err,
		   size_t errsz)
{
	if (strlen(v) >= sz) {
		snprintf(err, errsz, "value too long");
		return -1;
	}
	snprintf(dst, sz, "%s", v);
	return 0;
}

static int backend_key(struct dconfig *c, int dst, const char *key,
		       const char *value, char *err, size_t errsz)
{
	struct ms_server_cfg *imap = dst ? &c->gw.dst_imap : &c->gw.src_imap;
	struct ms_server_cfg *pop3 = dst ? &c->gw.dst_pop3 : &c->gw.src_pop3;
	struct ms_server_cfg *smtp = dst ? &c->gw.dst_smtp : &c->gw.src_smtp;
	struct ms_server_cfg *sub = dst ? &c->gw.dst_submission :
				    &c->gw.src_submission;
	const char *why;
	int b;

	if (!strcmp(key, "imap") || !strcmp(key, "url")) {
		if (ms_server_parse_url(imap, value, &why) < 0 ||
		    imap->proto != MS_PROTO_IMAP) {
			snprintf(err, errsz, "%s: %s", value,
				 imap->proto != MS_PROTO_IMAP ? "not an IMAP URL" :
				 why);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "pop3")) {
		if (ms_server_parse_url(pop3, value, &why) < 0 ||
		    pop3->proto != MS_PROTO_POP3) {
			snprintf(err, errsz, "%s: %s", value,
				 pop3->proto != MS_PROTO_POP3 ? "not a POP3 URL" :
				 why);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "smtp") || !strcmp(key, "submission")) {
		struct ms_server_cfg *t = !strcmp(key, "smtp") ? smtp : sub;

		if (ms_server_parse_url(t, value, &why) < 0 ||
		    t->proto != MS_PROTO_SMTP) {
			snprintf(err, errsz, "%s: %s", value,
				 t->proto != MS_PROTO_SMTP ? "not an SMTP URL" :
				 why);
			return -1;
		}
		return 0;
	}
	if (!strcmp(key, "pop3_uidl_format")) {
		if (ms_uidl_format_check(value, &why) < 0) {
			snprintf(err, errsz, "pop3_uidl_format \"%s\": %s", value,
				 why);
			return -1;
		}
		return set_buf(dst ? c->gw.dst_uidl_format :
			       c->gw.src_uidl_format,
			       sizeof(c->gw.src_uidl_format), value, err, errsz);
	}
	if (!strcmp(key, "admin"))
		return set_buf(dst ? c->dst_admin : c->src_admin,
			       sizeof(c->src_admin), value, err, errsz);
	if (!strcmp(key, "admin_password_file"))
		return set_buf(dst ? c->dst_admin_pwf : c->src_admin_pwf,
			       sizeof(c->src_admin_pwf), value, err, errsz);
	if (!strcmp(key, "ca_file"))
		return set_buf(dst ? c->dst_ca : c->src_ca, sizeof(c->src_ca),
			       value, err, errsz);
	if (!strcmp(key, "insecure")) {
		if ((b = ms_parse_bool(value)) < 0) {
			snprintf(err, errsz, "insecure: yes or no");
			return -1;
		}
		*(dst ? &c->dst_insecure : &c->src_insecure) = b;
		return 0;
	}
	snprintf(err, errsz, "unknown key \"%s\"", key);
	return -1;
}

static int on_key(void *ctx, const char *section, const char *key,
		  const char *value, char *err, size_t errsz)
{
	struct dconfig *c = ctx;
	struct ms_gw_config *g = &c->gw;
	enum ms_policy p;

	if (!strcmp(section, "listen") && !strcmp(key, "transparent")) {
		if ((g->transparent = ms_parse_bool(value)) < 0) {
			snprintf(err, errsz, "transparent: yes or no");
			return -1;
		}
		return 0;
	}
	if (!strcmp(section, "listen")) {
		static const struct {
			const char *key;
			enum ms_gw_proto proto;
			int tls;
		} kinds[] = {
			{ "imap", MS_GW_IMAP, 0 }, { "imaps", MS_GW_IMAP, 1 },
			{ "pop3", MS_GW_POP3, 0 }, { "pop3s", MS_GW_POP3, 1 },
			{ "smtp", MS_GW_SMTP, 0 },
			{ "submission", MS_GW_SUBMISSION, 0 },
			{ "submissions", MS_GW_SUBMISSION, 1 },
		};

		for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
			if (strcmp(key, kinds[i].key) != 0)
				continue;
			if (g->nlisten == MS_GW_MAX_LISTEN) {
				snprintf(err, errsz, "too many listeners");
				return -1;
			}
			g->listen[g->nlisten].proto = kinds[i].proto;
			g->listen[g->nlisten].implicit_tls = kinds[i].tls;
			return set_buf(g->listen[g->nlisten++].addr,
				       sizeof(g->listen[0].addr), value, err,
				       errsz);
		}
		snprintf(err, errsz, "unknown listener \"%s\" (imap, imaps, "
			 "pop3, pop3s, smtp, submission, submissions)", key);
		return -1;
	}
	if (!strcmp(section, "tls")) {
		if (!strcmp(key, "cert"))
			return set_buf(g->cert, sizeof(g->cert), value, err, errsz);
		if (!strcmp(key, "key"))
			return set_buf(g->key, sizeof(g->key), value, err, errsz);
	} else if (!strcmp(section, "source")) {
		return backend_key(c, 0, key, value, err, errsz);
	} else if (!strcmp(section, "destination")) {
		return backend_key(c, 1, key, value, err, errsz);
	} else if (!strcmp(section, "store")) {
		if (!strcmp(key, "path"))
			return set_buf(c->store, sizeof(c->store), value, err,
				       errsz);
		if (!strcmp(key, "backend") && !strcmp(value, "sqlite"))
			return 0;
	} else if (!strcmp(section, "control")) {
		if (!strcmp(key, "socket"))
			return set_buf(c->control, sizeof(c->control), value, err,
				       errsz);
	} else if (!strcmp(section, "daemon")) {
		if (!strcmp(key, "pid_file"))
			return set_buf(c->pid_file, sizeof(c->pid_file), value,
				       err, errsz);
		if (!strcmp(key, "capability_refresh")) {
			char *end;
			unsigned long v = strtoul(value, &end, 10);

			if (*value == '\0' || *end != '\0' || v == 0 ||
			    v > 86400) {
				snprintf(err, errsz, "capability_refresh: "
					 "seconds, 1 to 86400");
				return -1;
			}
			g->caps_refresh = (unsigned int)v;
			return 0;
		}
	} else if (!strcmp(section, "policy")) {
		if (!strcmp(key, "hold_max_seconds")) {
			g->hold_max_seconds = (unsigned int)strtoul(value, NULL, 10);
			return 0;
		}
		if (!strcmp(key, "connections")) {
			g->connections = (unsigned int)strtoul(value, NULL, 10);
			return 0;
		}
		if (ms_policy_parse(value, &p) < 0) {
			snprintf(err, errsz, "%s: policy \"%s\" (passthrough, hold "
				 "or off)", key, value);
			return -1;
		}
		if (!strcmp(key, "on_first_login")) {
			g->policy = p;
			return 0;
		}
		if (!strncmp(key, "domain.", 7) && g->ndomains < MS_GW_MAX_DOMAINS) {
			snprintf(g->domains[g->ndomains].domain,
				 sizeof(g->domains[0].domain), "%s", key + 7);
			g->domains[g->ndomains++].policy = p;
			return 0;
		}
	} else if (!strcmp(section, "mover")) {
		return 0;	/* mailshiftctl migrate's */
	} else if (!strcmp(section, "metrics")) {
		if (!strcmp(key, "listen"))
			return set_buf(g->metrics, sizeof(g->metrics), value, err,
				       errsz);
	} else if (!strcmp(section, "sweep")) {
		int b, h1, m1, h2, m2;

		if (!strcmp(key, "enabled")) {
			if ((b = ms_parse_bool(value)) < 0) {
				snprintf(err, errsz, "enabled: yes or no");
				return -1;
			}
			g->sweep = b;
			return 0;
		}
		if (!strcmp(key, "concurrency")) {
			g->sweep_concurrency = (unsigned int)strtoul(value, NULL, 10);
			return 0;
		}
		if (!strcmp(key, "rate")) {
			g->sweep_rate = (unsigned int)strtoul(value, NULL, 10);
			return 0;
		}
		if (!strcmp(key, "interval")) {
			g->sweep_interval = (unsigned int)strtoul(value, NULL, 10);
			return 0;
		}
		if (!strcmp(key, "window")) {
			if (sscanf(value, "%d:%d-%d:%d", &h1, &m1, &h2, &m2) != 4 ||
			    h1 < 0 || h1 > 23 || h2 < 0 || h2 > 24 || m1 < 0 ||
			    m1 > 59 || m2 < 0 || m2 > 59) {
				snprintf(err, errsz, "window: HH:MM-HH:MM");
				return -1;
			}
			g->sweep_from = h1 * 60 + m1;
			g->sweep_to = h2 * 60 + m2;
			return 0;
		}
	}
	snprintf(err, errsz, "unknown key \"%s\" in [%s]", key, section);
	return -1;
}

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
	static struct dconfig c;
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
	c.gw.policy = MS_POLICY_PASSTHROUGH;
	c.gw.sweep_from = c.gw.sweep_to = -1;
	c.gw.hold_max_seconds = 60;
	c.gw.connections = 4;
	snprintf(c.store, sizeof(c.store), "/var/lib/mailshift/mailshift.db");
	snprintf(c.control, sizeof(c.control), "/run/mailshift/control.sock");
	if (ms_ini_parse(conf, on_key, &c, err, sizeof(err)) < 0) {
		fprintf(stderr, "mailshiftd: %s\n", err);
		return 2;
	}
	if (c.gw.nlisten == 0) {
		fprintf(stderr, "mailshiftd: %s: no [listen] address\n", conf);
		return 2;
	}
	if ((c.gw.cert[0] != '\0') != (c.gw.key[0] != '\0')) {
		fprintf(stderr, "mailshiftd: %s: [tls] needs both cert and key\n",
			conf);
		return 2;
	}
	c.gw.src_imap.ca_file = c.gw.src_pop3.ca_file =
		c.src_ca[0] != '\0' ? c.src_ca : NULL;
	c.gw.dst_imap.ca_file = c.gw.dst_pop3.ca_file =
		c.dst_ca[0] != '\0' ? c.dst_ca : NULL;
	c.gw.src_imap.insecure = c.gw.src_pop3.insecure = c.src_insecure;
	c.gw.dst_imap.insecure = c.gw.dst_pop3.insecure = c.dst_insecure;
	c.gw.src_smtp.ca_file = c.gw.src_submission.ca_file = c.gw.src_imap.ca_file;
	c.gw.dst_smtp.ca_file = c.gw.dst_submission.ca_file = c.gw.dst_imap.ca_file;
	c.gw.src_smtp.insecure = c.gw.src_submission.insecure = c.src_insecure;
	c.gw.dst_smtp.insecure = c.gw.dst_submission.insecure = c.dst_insecure;

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
