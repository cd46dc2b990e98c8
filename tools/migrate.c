/* mailshiftctl migrate: copy users' mail now (or, with --rollback, send
 * what changed on the destination back to the source), with a live progress
 * bar and a JSON summary for scripts. See docs/mailshiftctl.8 and
 * docs/cli-spec.md. */
#include <errno.h>
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <termios.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <uv.h>

#include "config.h"
#include "log.h"
#include "mover.h"
#include "store.h"
#include "subcommands.h"
#include "util.h"

#define MAX_PATTERNS 64
#define DEFAULT_STORE "/var/lib/mailshift/mailshift.db"

struct side {
	char *url;
	char *user;
	char *admin;
	char *password_file;
	char *ca_file;
	char *server_name;
	char *auth;
	char *doveadm_url;		/* destination: identity (mover.md) */
	char *doveadm_key_file;
	int insecure;
};

struct opts {
	struct side src, dst;
	char *store;
	const char *include[MAX_PATTERNS + 1];
	const char *exclude[MAX_PATTERNS + 1];
	unsigned int ninclude, nexclude;
	unsigned int connections;
	unsigned int commands_per_second;	/* to the source; 0: no cap */
	unsigned int batch;
	int json;
	int progress;		/* -1 = auto */
	int verbose;
	int rollback;
	int verify_only;
	int verify_content;
	int names;		/* 0 unset, else 1 + enum ms_mover_names */
};

struct run {
	struct opts *o;
	uv_loop_t loop;
	uv_timer_t timer;
	struct ms_mover *mover;
	json_t *results;
	unsigned int users, done;
	int any_error, any_mismatch;
	int progress;
	int bar_shown;
	uint64_t phase_ms[MS_PH_N];	/* summed over the users */
};

static void usage(FILE *f)
{
	fprintf(f,
"Usage: %s migrate [options] USER [USER...]\n"
"       %s migrate --rollback [options] USER [USER...]\n"
"       %s migrate --verify-only [options] USER [USER...]\n"
"\n"
"Copies each USER's folders from the source to the destination: exact,\n"
"incremental, resumable, verified. Passwords are never taken from argv.\n"
"With --rollback, copies back to the source what changed on the\n"
"destination since the copy (new mail, new folders, flags, expunges).\n"
"With --verify-only, compares what earlier runs copied and changes nothing.\n"
"\n"
"  -c, --config FILE             configuration file (INI)\n"
"      --source URL              imap://, imaps://, imap+starttls://, pop3://, pop3s://, pop3+starttls://\n"
"      --dest URL                imap://, imaps://, imap+starttls://\n"
"      --source-user NAME        login name at the source (%%u = USER)\n"
"      --dest-user NAME          login name at the destination\n"
"      --source-admin NAME       log in as admin NAME on behalf of the user (SASL PLAIN authzid)\n"
"      --dest-admin NAME\n"
"      --source-password-file F  password file (mode 0600 or stricter)\n"
"      --dest-password-file F    (else MAILSHIFT_SOURCE_PASSWORD / MAILSHIFT_DEST_PASSWORD,\n"
"                                 else a prompt on the terminal)\n"
"      --source-auth plain|login force a mechanism (default: PLAIN when offered)\n"
"      --dest-auth plain|login\n"
"      --dest-doveadm-url URL    Dovecot's doveadm HTTP API on the destination:\n"
"                                 folders keep the source's UIDVALIDITY and UIDs\n"
"      --dest-doveadm-key-file F its API key (a file of mode 0600 or stricter)\n"
"      --ca-file FILE            CA bundle for both servers' certificates\n"
"      --insecure                do not verify certificates (labs only)\n"
"      --store PATH              SQLite store (default " DEFAULT_STORE "),\n"
"                                 or a postgresql:// URL\n"
"      --include GLOB            only folders matching GLOB ('/' separates levels)\n"
"      --exclude GLOB            skip folders matching GLOB\n"
"      --connections N           connections per server (default 4)\n"
"      --commands-per-second N   at most N commands a second to the source, all\n"
"                                 users together (default: no cap)\n"
"      --batch N                 messages per APPEND batch (default 100)\n"
"      --names source|destination  folder names the copies take: the source's\n"
"                                 (default), or the destination's special-use\n"
"                                 folders (Sent, Trash, ...)\n"
"      --json                    print a JSON summary on stdout\n"
"      --progress, --no-progress live progress bar on stderr (default: on a terminal)\n"
"      --rollback                the other way: bring the source back to what the\n"
"                                 destination holds (users copied before only)\n"
"      --verify-only             only compare both servers (no copy, no repair, no\n"
"                                 write to either server or the store)\n"
"      --verify-content          also compare every copied message's bytes (SHA-256\n"
"                                 of both sides; reads both mailboxes again)\n"
"  -v, --verbose                 log what happens\n"
"\n"
"Exit status: 0 copied and verified, 1 error, 2 usage, 3 verification mismatch\n"
"(the folders that differ are named).\n"
"\n"
"       %s migrate --daemon USER... [-s SOCKET | -c FILE]\n"
"       %s migrate --all [-s SOCKET | -c FILE]\n"
"asks the running mailshiftd to move users now: copy, verify, end their\n"
"sessions, last delta, flip (needs its admin logins).\n",
		prog, prog, prog, prog, prog);
}

static int set_str(char **dst, const char *v)
{
	free(*dst);
	*dst = strdup(v);
	return *dst == NULL ? -1 : 0;
}

static int side_key(struct side *s, const char *key, const char *value,
		    char *err, size_t errsz)
{
	static const struct {
		const char *key;
		size_t off;
	} strs[] = {
		{ "url", offsetof(struct side, url) },
		{ "user", offsetof(struct side, user) },
		{ "admin", offsetof(struct side, admin) },
		{ "password_file", offsetof(struct side, password_file) },
		{ "ca_file", offsetof(struct side, ca_file) },
		{ "server_name", offsetof(struct side, server_name) },
		{ "auth", offsetof(struct side, auth) },
		{ "doveadm_url", offsetof(struct side, doveadm_url) },
		{ "doveadm_key_file", offsetof(struct side, doveadm_key_file) },
	};
	int b;

	for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
		if (!strcmp(key, strs[i].key))
			return set_str((char **)((char *)s + strs[i].off),
				       value);
	if (!strcmp(key, "insecure")) {
		if ((b = ms_parse_bool(value)) < 0) {
			snprintf(err, errsz, "insecure: expected yes or no");
			return -1;
		}
		s->insecure = b;
		return 0;
	}
	if (!strcmp(key, "password")) {
		snprintf(err, errsz, "passwords do not go into the config "
			 "file; use password_file (mode 0600)");
		return -1;
	}
	snprintf(err, errsz, "unknown key \"%s\"", key);
	return -1;
}

static void side_free(struct side *s)
{
	free(s->url);
	free(s->user);
	free(s->admin);
	free(s->password_file);
	free(s->ca_file);
	free(s->server_name);
	free(s->auth);
	free(s->doveadm_url);
	free(s->doveadm_key_file);
}

/* The strings the config file set (a command line's point into argv). */
static void opts_free(struct opts *o)
{
	side_free(&o->src);
	side_free(&o->dst);
	free(o->store);
	for (unsigned int i = 0; i < o->ninclude; i++)
		free((char *)o->include[i]);
	for (unsigned int i = 0; i < o->nexclude; i++)
		free((char *)o->exclude[i]);
}

/* "source" or "destination" into *out as 1 + enum ms_mover_names. */
static int parse_names(const char *value, int *out, char *err, size_t errsz)
{
	enum ms_mover_names n;

	if (ms_mover_names_parse(value, &n) < 0) {
		snprintf(err, errsz, "names: \"%.40s\" is not source or "
			 "destination", value);
		return -1;
	}
	*out = 1 + (int)n;
	return 0;
}

static int on_config(void *ctx, const char *section, const char *key,
		     const char *value, char *err, size_t errsz)
{
	struct opts *o = ctx;

	if (!strcmp(section, "source")) {
		/* the pace that protects the source (docs/mover.md) */
		if (!strcmp(key, "commands_per_second")) {
			if (ms_parse_uint(value, 0, 100000,
					  &o->commands_per_second) == 0)
				return 0;
			snprintf(err, errsz, "commands_per_second: \"%.40s\" "
				 "is not a whole number from 0 to 100000",
				 value);
			return -1;
		}
		return side_key(&o->src, key, value, err, errsz);
	}
	if (!strcmp(section, "destination"))
		return side_key(&o->dst, key, value, err, errsz);
	if (!strcmp(section, "store")) {
		if (!strcmp(key, "path") ||
		    (!strcmp(key, "url") && ms_store_is_url(value)))
			return set_str(&o->store, value);
		if (!strcmp(key, "backend")) {
			if (strcmp(value, "sqlite") != 0) {
				snprintf(err, errsz, "this build supports the "
					 "sqlite store backend only");
				return -1;
			}
			return 0;
		}
	} else if (!strcmp(section, "mover")) {
		/* The command line's ranges (--connections, --batch). */
		if (!strcmp(key, "connections") || !strcmp(key, "batch")) {
			unsigned int max = key[0] == 'c' ? 64 : 10000;

			if (ms_parse_uint(value, 1, max, key[0] == 'c' ?
					  &o->connections : &o->batch) == 0)
				return 0;
			snprintf(err, errsz, "%s: \"%.40s\" is not a whole "
				 "number from 1 to %u", key, value, max);
			return -1;
		}
		if (!strcmp(key, "include") && o->ninclude < MAX_PATTERNS) {
			o->include[o->ninclude++] = strdup(value);
			return 0;
		}
		if (!strcmp(key, "exclude") && o->nexclude < MAX_PATTERNS) {
			o->exclude[o->nexclude++] = strdup(value);
			return 0;
		}
		if (!strcmp(key, "names"))
			return parse_names(value, &o->names, err, errsz);
		if (!strcmp(key, "verify_content")) {
			if ((o->verify_content = ms_parse_bool(value)) < 0) {
				snprintf(err, errsz, "verify_content: expected "
					 "yes or no");
				return -1;
			}
			return 0;
		}
	} else {
		/* Other daemons' sections (gateway, listeners, ...) are not
		 * this command's business. */
		return 0;
	}
	snprintf(err, errsz, "unknown key \"%s\" in [%s]", key, section);
	return -1;
}

/* Reads a password without echo from the controlling terminal. */
static char *prompt_password(const char *what, const char *user)
{
	struct termios old, noecho;
	char buf[1024];
	char *ret = NULL;
	FILE *tty = fopen("/dev/tty", "r+");
	int have_old;

	if (tty == NULL)
		return NULL;
	/* Echo off (and what was typed before flushed) before the prompt:
	 * turned off after it, the flush would drop an answer typed at
	 * once. */
	have_old = tcgetattr(fileno(tty), &old) == 0;
	if (have_old) {
		noecho = old;
		noecho.c_lflag &= ~(tcflag_t)ECHO;
		tcsetattr(fileno(tty), TCSAFLUSH, &noecho);
	}
	fprintf(tty, "%s password for %s: ", what, user);
	fflush(tty);
	if (fgets(buf, sizeof(buf), tty) != NULL) {
		buf[strcspn(buf, "\r\n")] = '\0';
		ret = strdup(buf);
	}
	if (have_old)
		tcsetattr(fileno(tty), TCSANOW, &old);
	fputc('\n', tty);
	fclose(tty);
	OPENSSL_cleanse(buf, sizeof(buf));
	return ret;
}

static char *get_password(const struct side *s, const char *envname,
			  const char *what, const char *user)
{
	char err[512];
	const char *env;
	char *pw;

	if (s->password_file != NULL) {
		pw = ms_read_secret_file(s->password_file, err, sizeof(err));
		if (pw == NULL)
			fprintf(stderr, "%s: %s password: %s\n", prog, what, err);
		return pw;
	}
	env = getenv(envname);
	if (env != NULL) {
		pw = strdup(env);
		/* Out of the environment of anything we might start. */
		unsetenv(envname);
		return pw;
	}
	pw = prompt_password(what, s->admin != NULL ? s->admin : user);
	if (pw == NULL)
		fprintf(stderr, "%s: no %s password: use %s_password_file, "
			"%s, or run on a terminal\n", prog, what,
			!strcmp(what, "source") ? "--source" : "--dest", envname);
	return pw;
}

/* [destination] doveadm_url and doveadm_key_file: both or neither. The
 * key comes from a file only its owner can read, never from argv. */
static int doveadm_setup(const struct side *s, struct ms_doveadm_cfg *cfg,
			 char **key_r)
{
	const char *why;
	char err[512];

	*key_r = NULL;
	if (s->doveadm_url == NULL && s->doveadm_key_file == NULL)
		return 0;
	if (s->doveadm_url == NULL || s->doveadm_key_file == NULL) {
		fprintf(stderr, "%s: doveadm_url and doveadm_key_file go "
			"together\n", prog);
		return -1;
	}
	if (ms_doveadm_parse_url(cfg, s->doveadm_url, &why) < 0) {
		fprintf(stderr, "%s: doveadm_url %s: %s\n", prog,
			s->doveadm_url, why);
		return -1;
	}
	cfg->tls.ca_file = s->ca_file;
	cfg->tls.insecure = s->insecure;
	*key_r = ms_read_secret_file(s->doveadm_key_file, err, sizeof(err));
	if (*key_r == NULL) {
		fprintf(stderr, "%s: doveadm API key: %s\n", prog, err);
		return -1;
	}
	cfg->key = *key_r;
	return 0;
}

static int build_server(struct ms_server_cfg *cfg, const struct side *s,
			const char *what, unsigned int conns)
{
	const char *error;

	memset(cfg, 0, sizeof(*cfg));
	if (s->url == NULL) {
		fprintf(stderr, "%s: no %s server: use --%s URL or the config "
			"file\n", prog, what, !strcmp(what, "source") ?
			"source" : "dest");
		return -1;
	}
	if (ms_server_parse_url(cfg, s->url, &error) < 0) {
		fprintf(stderr, "%s: %s URL \"%s\": %s\n", prog, what, s->url,
			error);
		return -1;
	}
	cfg->ca_file = s->ca_file;
	cfg->server_name = s->server_name;
	cfg->insecure = s->insecure;
	cfg->user_tmpl = s->user;
	cfg->admin = s->admin;
	cfg->max_conns = conns;
	if (s->auth == NULL || !strcasecmp(s->auth, "auto"))
		cfg->mech = MS_AUTH_AUTO;
	else if (!strcasecmp(s->auth, "plain"))
		cfg->mech = MS_AUTH_PLAIN;
	else if (!strcasecmp(s->auth, "login"))
		cfg->mech = MS_AUTH_LOGIN;
	else {
		fprintf(stderr, "%s: %s auth \"%s\": expected plain or login\n",
			prog, what, s->auth);
		return -1;
	}
	return 0;
}

/* ---- progress ---- */

static void human_bytes(char *buf, size_t sz, double b)
{
	const char *units[] = { "B", "KB", "MB", "GB", "TB" };
	unsigned int u = 0;

	while (b >= 1000 && u < 4) {
		b /= 1000;
		u++;
	}
	snprintf(buf, sz, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
}

static void draw_progress(struct run *r, int final)
{
	struct ms_progress p;
	char bar[31], bytes[32], rate[32], eta[32];
	double frac, msgrate;
	unsigned int fill;

	ms_mover_progress(r->mover, &p);
	frac = p.msgs_todo > 0 ? (double)p.msgs_done / (double)p.msgs_todo : 0;
	if (frac > 1)
		frac = 1;
	if (final && p.msgs_todo == p.msgs_done)
		frac = 1;
	fill = (unsigned int)(frac * 30);
	memset(bar, '#', fill);
	memset(bar + fill, '-', 30 - fill);
	bar[30] = '\0';
	human_bytes(bytes, sizeof(bytes), (double)p.bytes_done);
	msgrate = p.seconds > 0 ? (double)p.msgs_done / p.seconds : 0;
	human_bytes(rate, sizeof(rate), p.seconds > 0 ?
		    (double)p.bytes_done / p.seconds : 0);
	if (msgrate > 0 && p.msgs_todo > p.msgs_done)
		snprintf(eta, sizeof(eta), "ETA %.0fs",
			 (double)(p.msgs_todo - p.msgs_done) / msgrate);
	else
		snprintf(eta, sizeof(eta), "%.1fs", p.seconds);
	fprintf(stderr, "\r\033[K[%s] %3.0f%%  folders %u/%u  msgs %llu/%llu  "
		"%s  %.0f msg/s  %s/s  %s", bar, frac * 100, p.folders_done,
		p.folders, (unsigned long long)p.msgs_done,
		(unsigned long long)p.msgs_todo, bytes, msgrate, rate, eta);
	if (final)
		fputc('\n', stderr);
	fflush(stderr);
	r->bar_shown = 1;
}

static void on_tick(uv_timer_t *t)
{
	draw_progress(t->data, 0);
}

/* ---- results ---- */

/* {"queue": ms, "login": ms, ...}: where the wall time went (mover.h). */
static json_t *phases_json(const uint64_t *ms)
{
	json_t *o = json_object();

	for (int p = 0; p < MS_PH_N; p++)
		json_object_set_new(o, ms_mover_phase_names[p],
				    json_integer((json_int_t)ms[p]));
	return o;
}

json_t *migrate_report_json(const struct ms_user_report *rep)
{
	json_t *o = json_object(), *folders = json_array();

	json_object_set_new(o, "user", json_string(rep->user));
	if (rep->rollback)
		json_object_set_new(o, "rollback", json_true());
	if (rep->verify_only)
		json_object_set_new(o, "verify_only", json_true());
	json_object_set_new(o, "ok", json_boolean(rep->ok));
	json_object_set_new(o, "error", rep->error != NULL ?
			    json_string(rep->error) : json_null());
	json_object_set_new(o, "verified", json_boolean(rep->ok));
	json_object_set_new(o, "copied", json_integer((json_int_t)rep->copied));
	json_object_set_new(o, "bytes", json_integer((json_int_t)rep->bytes));
	json_object_set_new(o, "flags_updated",
			    json_integer((json_int_t)rep->flags_updated));
	json_object_set_new(o, "expunged",
			    json_integer((json_int_t)rep->expunged));
	json_object_set_new(o, "repaired",
			    json_integer((json_int_t)rep->repaired));
	json_object_set_new(o, "seconds", json_real(rep->seconds));
	json_object_set_new(o, "phases", phases_json(rep->phase_ms));
	for (unsigned int i = 0; i < rep->nfolders; i++) {
		const struct ms_folder_report *f = &rep->folders[i];
		json_t *fo = json_object();

		json_object_set_new(fo, "source", json_string(f->source));
		json_object_set_new(fo, "destination",
				    json_string(f->destination));
		json_object_set_new(fo, "copied", json_integer((json_int_t)f->copied));
		json_object_set_new(fo, "flags_updated",
				    json_integer((json_int_t)f->flags_updated));
		json_object_set_new(fo, "expunged",
				    json_integer((json_int_t)f->expunged));
		json_object_set_new(fo, "source_messages",
				    json_integer((json_int_t)f->source_messages));
		json_object_set_new(fo, "dest_messages",
				    json_integer((json_int_t)f->dest_messages));
		json_object_set_new(fo, "source_bytes",
				    json_integer((json_int_t)f->source_bytes));
		json_object_set_new(fo, "dest_bytes",
				    json_integer((json_int_t)f->dest_bytes));
		json_object_set_new(fo, "verified", json_boolean(f->verified));
		json_object_set_new(fo, "mismatch", f->mismatch[0] != '\0' ?
				    json_string(f->mismatch) : json_null());
		json_object_set_new(fo, "repaired",
				    json_integer((json_int_t)f->repaired));
		json_object_set_new(fo, "error", f->error[0] != '\0' ?
				    json_string(f->error) : json_null());
		if (f->identity != 0)
			json_object_set_new(fo, "identity", json_string(
				f->identity > 0 ? "kept" : "not kept"));
		if (f->identity < 0)
			json_object_set_new(fo, "identity_error",
					    json_string(f->identity_error));
		if (rep->verify_only) {
			json_object_set_new(fo, "not_copied",
					    json_integer((json_int_t)f->not_copied));
			json_object_set_new(fo, "expunge_pending",
					    json_integer((json_int_t)f->expunge_pending));
		}
		if (rep->rollback) {
			json_object_set_new(fo, "created",
					    json_boolean(f->created));
			json_object_set_new(fo, "destination_deleted",
					    json_boolean(f->dst_deleted));
			json_object_set_new(fo, "source_only",
					    json_integer((json_int_t)f->source_only));
		}
		json_array_append_new(folders, fo);
	}
	json_object_set_new(o, "folders", folders);
	return o;
}

/* The CHECK column of a folder. */
static const char *folder_check(const struct ms_folder_report *f)
{
	if (f->dst_deleted)
		return "kept (deleted on the destination)";
	if (!f->verified)
		return "MISMATCH";
	return f->not_copied > 0 ? "ok (not all copied yet)" : "ok";
}

static void print_table(const struct ms_user_report *rep)
{
	if (rep->verify_only)
		printf("%s: verify only, %s, %.1fs\n", rep->user, rep->ok ?
		       "no difference" : rep->mismatch ? "VERIFICATION FAILED" :
		       "FAILED", rep->seconds);
	else
		printf("%s: %s%s, %llu message(s) %s, %llu flag update(s), "
		       "%llu expunged, %llu repaired, %.1fs\n", rep->user,
		       rep->rollback ? "rollback " : "", rep->ok ? "verified" :
		       rep->mismatch ? "VERIFICATION FAILED" : "FAILED",
		       (unsigned long long)rep->copied,
		       rep->rollback ? "appended to the source" : "copied",
		       (unsigned long long)rep->flags_updated,
		       (unsigned long long)rep->expunged,
		       (unsigned long long)rep->repaired, rep->seconds);
	if (rep->nfolders == 0)
		return;
	printf("  %-28s %-28s %8s %8s %12s %12s  %s\n", "SOURCE", "DESTINATION",
	       "SRC MSGS", "DST MSGS", "SRC BYTES", "DST BYTES", "CHECK");
	for (unsigned int i = 0; i < rep->nfolders; i++) {
		const struct ms_folder_report *f = &rep->folders[i];

		printf("  %-28s %-28s %8llu %8llu %12llu %12llu  %s%s\n",
		       f->source, f->destination,
		       (unsigned long long)f->source_messages,
		       (unsigned long long)f->dest_messages,
		       (unsigned long long)f->source_bytes,
		       (unsigned long long)f->dest_bytes, folder_check(f),
		       f->created ? " (created on the source)" : "");
	}
	/* What each folder that differs differs in (the error line on
	 * standard error names only the first). */
	for (unsigned int i = 0; i < rep->nfolders; i++) {
		const struct ms_folder_report *f = &rep->folders[i];

		if (!f->verified && f->mismatch[0] != '\0')
			printf("  MISMATCH \"%s\" -> \"%s\": %s\n", f->source,
			       f->destination, f->mismatch);
	}
}

static void on_user_done(const struct ms_user_report *rep, void *ctx)
{
	struct run *r = ctx;

	r->done++;
	if (rep->error != NULL) {
		if (r->bar_shown)
			fputc('\n', stderr);
		fprintf(stderr, "%s: %s: %s\n", prog, rep->user, rep->error);
		r->bar_shown = 0;
	}
	for (int p = 0; p < MS_PH_N; p++)
		r->phase_ms[p] += rep->phase_ms[p];
	if (rep->mismatch)
		r->any_mismatch = 1;
	else if (!rep->ok)
		r->any_error = 1;
	if (r->o->json)
		json_array_append_new(r->results, migrate_report_json(rep));
	else
		print_table(rep);
	if (r->done == r->users) {
		if (r->progress) {
			draw_progress(r, 1);
			uv_timer_stop(&r->timer);
		}
		uv_close((uv_handle_t *)&r->timer, NULL);
	}
}

enum {
	OPT_SOURCE = 256, OPT_DEST, OPT_SUSER, OPT_DUSER, OPT_SADMIN, OPT_DADMIN,
	OPT_SPWF, OPT_DPWF, OPT_SAUTH, OPT_DAUTH, OPT_CA, OPT_INSECURE,
	OPT_STORE, OPT_INCLUDE, OPT_EXCLUDE, OPT_CONNS, OPT_BATCH, OPT_JSON,
	OPT_PROGRESS, OPT_NOPROGRESS, OPT_ROLLBACK, OPT_VERIFY_ONLY,
	OPT_VERIFY_CONTENT, OPT_DDOVEADM, OPT_DDOVEADM_KEY,
	OPT_NAMES, OPT_CPS,
};

static const struct option longopts[] = {
	{ "config", required_argument, NULL, 'c' },
	{ "source", required_argument, NULL, OPT_SOURCE },
	{ "dest", required_argument, NULL, OPT_DEST },
	{ "source-user", required_argument, NULL, OPT_SUSER },
	{ "dest-user", required_argument, NULL, OPT_DUSER },
	{ "source-admin", required_argument, NULL, OPT_SADMIN },
	{ "dest-admin", required_argument, NULL, OPT_DADMIN },
	{ "source-password-file", required_argument, NULL, OPT_SPWF },
	{ "dest-password-file", required_argument, NULL, OPT_DPWF },
	{ "source-auth", required_argument, NULL, OPT_SAUTH },
	{ "dest-auth", required_argument, NULL, OPT_DAUTH },
	{ "dest-doveadm-url", required_argument, NULL, OPT_DDOVEADM },
	{ "dest-doveadm-key-file", required_argument, NULL, OPT_DDOVEADM_KEY },
	{ "ca-file", required_argument, NULL, OPT_CA },
	{ "insecure", no_argument, NULL, OPT_INSECURE },
	{ "store", required_argument, NULL, OPT_STORE },
	{ "include", required_argument, NULL, OPT_INCLUDE },
	{ "exclude", required_argument, NULL, OPT_EXCLUDE },
	{ "connections", required_argument, NULL, OPT_CONNS },
	{ "batch", required_argument, NULL, OPT_BATCH },
	{ "names", required_argument, NULL, OPT_NAMES },
	{ "commands-per-second", required_argument, NULL, OPT_CPS },
	{ "json", no_argument, NULL, OPT_JSON },
	{ "progress", no_argument, NULL, OPT_PROGRESS },
	{ "no-progress", no_argument, NULL, OPT_NOPROGRESS },
	{ "rollback", no_argument, NULL, OPT_ROLLBACK },
	{ "verify-only", no_argument, NULL, OPT_VERIFY_ONLY },
	{ "verify-content", no_argument, NULL, OPT_VERIFY_CONTENT },
	{ "verbose", no_argument, NULL, 'v' },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

static int parse_count(const char *s, const char *what, unsigned int max,
		       unsigned int *out)
{
	if (ms_parse_uint(s, 1, max, out) == 0)
		return 0;
	fprintf(stderr, "%s: %s: expected a number from 1 to %u\n", prog, what,
		max);
	return -1;
}

int migrate_main(int argc, char *argv[])
{
	struct opts o = { .progress = -1 };
	struct opts cli = { .progress = -1 };
	struct opts conf;	/* what the config file set (strings to free) */
	struct ms_server_cfg src, dst;
	struct ms_mover_opts mopts = { 0 };
	struct ms_store *store = NULL;
	struct run r = { 0 };
	char *config = NULL, *err = NULL, errbuf[600];
	char *src_pw = NULL, *dst_pw = NULL, *dkey = NULL;
	struct ms_doveadm_cfg dcfg;
	int ch, ret = 2;

	/* "--all" and "--daemon": ask the running mailshiftd instead. */
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--all") && strcmp(argv[i], "--daemon"))
			continue;
		for (int j = 1; j < argc; j++) {
			if (!strcmp(argv[j], "--rollback")) {
				fprintf(stderr, "%s: migrate: --rollback runs "
					"here, not through mailshiftd (no "
					"--daemon or --all); with the gateway "
					"running: %s rollback USER\n", prog,
					prog);
				return 2;
			}
		}
		return migrate_daemon_main(argc, argv);
	}
	/* Options first into `cli`, so that they override the config file
	 * whatever their order. */
	while ((ch = getopt_long(argc, argv, "c:vh", longopts, NULL)) != -1) {
		switch (ch) {
		case 'c': config = optarg; break;
		case OPT_SOURCE: cli.src.url = optarg; break;
		case OPT_DEST: cli.dst.url = optarg; break;
		case OPT_SUSER: cli.src.user = optarg; break;
		case OPT_DUSER: cli.dst.user = optarg; break;
		case OPT_SADMIN: cli.src.admin = optarg; break;
		case OPT_DADMIN: cli.dst.admin = optarg; break;
		case OPT_SPWF: cli.src.password_file = optarg; break;
		case OPT_DPWF: cli.dst.password_file = optarg; break;
		case OPT_SAUTH: cli.src.auth = optarg; break;
		case OPT_DAUTH: cli.dst.auth = optarg; break;
		case OPT_DDOVEADM: cli.dst.doveadm_url = optarg; break;
		case OPT_DDOVEADM_KEY: cli.dst.doveadm_key_file = optarg; break;
		case OPT_CA: cli.src.ca_file = cli.dst.ca_file = optarg; break;
		case OPT_INSECURE: cli.src.insecure = cli.dst.insecure = 1; break;
		case OPT_STORE: cli.store = optarg; break;
		case OPT_INCLUDE:
			if (cli.ninclude < MAX_PATTERNS)
				cli.include[cli.ninclude++] = optarg;
			break;
		case OPT_EXCLUDE:
			if (cli.nexclude < MAX_PATTERNS)
				cli.exclude[cli.nexclude++] = optarg;
			break;
		case OPT_CONNS:
			if (parse_count(optarg, "--connections", 64,
					&cli.connections) < 0)
				return 2;
			break;
		case OPT_CPS:
			if (parse_count(optarg, "--commands-per-second", 100000,
					&cli.commands_per_second) < 0)
				return 2;
			break;
		case OPT_BATCH:
			if (parse_count(optarg, "--batch", 10000, &cli.batch) < 0)
				return 2;
			break;
		case OPT_NAMES:
			if (parse_names(optarg, &cli.names, errbuf,
					sizeof(errbuf)) < 0) {
				fprintf(stderr, "%s: --%s\n", prog, errbuf);
				return 2;
			}
			break;
		case OPT_JSON: cli.json = 1; break;
		case OPT_PROGRESS: cli.progress = 1; break;
		case OPT_NOPROGRESS: cli.progress = 0; break;
		case OPT_ROLLBACK: cli.rollback = 1; break;
		case OPT_VERIFY_ONLY: cli.verify_only = 1; break;
		case OPT_VERIFY_CONTENT: cli.verify_content = 1; break;
		case 'v': cli.verbose = 1; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "%s: migrate: no USER given\n", prog);
		usage(stderr);
		return 2;
	}
	if (config != NULL &&
	    ms_ini_parse(config, on_config, &o, errbuf, sizeof(errbuf)) < 0) {
		fprintf(stderr, "%s: %s\n", prog, errbuf);
		opts_free(&o);
		return 2;
	}
	conf = o;
#define OVERRIDE(field) do { if (cli.field) o.field = cli.field; } while (0)
	OVERRIDE(src.url); OVERRIDE(dst.url);
	OVERRIDE(src.user); OVERRIDE(dst.user);
	OVERRIDE(src.admin); OVERRIDE(dst.admin);
	OVERRIDE(src.password_file); OVERRIDE(dst.password_file);
	OVERRIDE(src.auth); OVERRIDE(dst.auth);
	OVERRIDE(dst.doveadm_url); OVERRIDE(dst.doveadm_key_file);
	OVERRIDE(src.ca_file); OVERRIDE(dst.ca_file);
	OVERRIDE(src.insecure); OVERRIDE(dst.insecure);
	OVERRIDE(store); OVERRIDE(connections); OVERRIDE(batch);
	OVERRIDE(commands_per_second);
	OVERRIDE(json); OVERRIDE(verbose); OVERRIDE(rollback);
	OVERRIDE(verify_only); OVERRIDE(verify_content); OVERRIDE(names);
#undef OVERRIDE
	if (cli.progress >= 0)
		o.progress = cli.progress;
	for (unsigned int i = 0; i < cli.ninclude; i++)
		if (o.ninclude < MAX_PATTERNS)
			o.include[o.ninclude++] = cli.include[i];
	for (unsigned int i = 0; i < cli.nexclude; i++)
		if (o.nexclude < MAX_PATTERNS)
			o.exclude[o.nexclude++] = cli.exclude[i];
	if (o.verbose)
		ms_log_level = MS_LOG_INFO;
	if (o.connections == 0)
		o.connections = 4;
	if (build_server(&src, &o.src, "source", o.connections) < 0 ||
	    build_server(&dst, &o.dst, "destination", o.connections) < 0)
		goto out;
	if (dst.proto != MS_PROTO_IMAP) {
		fprintf(stderr, "%s: the destination must be an IMAP server\n",
			prog);
		goto out;
	}
	if (o.rollback && src.proto != MS_PROTO_IMAP) {
		fprintf(stderr, "%s: --rollback needs an IMAP source (mail "
			"cannot be put back on a POP3 server)\n", prog);
		goto out;
	}
	if ((o.verify_only || o.verify_content) && o.rollback) {
		fprintf(stderr, "%s: --verify-only and --verify-content compare "
			"a forward copy; a rollback verifies as it goes\n", prog);
		goto out;
	}
	if ((o.verify_only || o.verify_content) &&
	    src.proto != MS_PROTO_IMAP) {
		fprintf(stderr, "%s: --verify-only and --verify-content need an "
			"IMAP source (a POP3 copy is checked by count and size "
			"as it is made)\n", prog);
		goto out;
	}
	src_pw = get_password(&o.src, "MAILSHIFT_SOURCE_PASSWORD", "source",
			      argv[optind]);
	if (src_pw == NULL)
		goto out;
	dst_pw = get_password(&o.dst, "MAILSHIFT_DEST_PASSWORD", "destination",
			      argv[optind]);
	if (dst_pw == NULL)
		goto out;
	src.password = src_pw;
	dst.password = dst_pw;

	if (ms_store_open(o.store != NULL ? o.store : DEFAULT_STORE, &store,
			  &err) < 0) {
		fprintf(stderr, "%s: store %s: %s\n", prog,
			o.store != NULL ? o.store : DEFAULT_STORE,
			err != NULL ? err : "cannot open");
		free(err);
		ret = 1;
		goto out;
	}
	o.include[o.ninclude] = NULL;
	o.exclude[o.nexclude] = NULL;
	mopts.include = o.ninclude > 0 ? o.include : NULL;
	mopts.exclude = o.nexclude > 0 ? o.exclude : NULL;
	mopts.batch = o.batch;
	mopts.commands_per_second = o.commands_per_second;
	mopts.verify_only = o.verify_only;
	mopts.verify_content = o.verify_content;
	if (o.names != 0)
		mopts.names = (enum ms_mover_names)(o.names - 1);
	if (doveadm_setup(&o.dst, &dcfg, &dkey) < 0)
		goto out;
	mopts.doveadm = dkey != NULL ? &dcfg : NULL;

	uv_loop_init(&r.loop);
	r.o = &o;
	r.results = json_array();
	r.progress = o.progress >= 0 ? o.progress : isatty(STDERR_FILENO);
	r.mover = ms_mover_new(&r.loop, store, &src, &dst, &mopts);
	/* The mover keeps its own copies; ours go now. */
	OPENSSL_cleanse(src_pw, strlen(src_pw));
	OPENSSL_cleanse(dst_pw, strlen(dst_pw));
	ms_secret_free(&dkey);
	if (r.mover == NULL) {
		fprintf(stderr, "%s: out of memory\n", prog);
		ret = 1;
		goto out;
	}
	uv_timer_init(&r.loop, &r.timer);
	r.timer.data = &r;
	if (r.progress)
		uv_timer_start(&r.timer, on_tick, 200, 200);
	for (int i = optind; i < argc; i++) {
		r.users++;
		if ((o.rollback ? ms_mover_add_rollback : ms_mover_add_user)(
			    r.mover, argv[i], NULL, NULL, on_user_done, &r) < 0) {
			fprintf(stderr, "%s: %s: cannot start: %s\n", prog,
				argv[i], ms_store_error(store));
			r.users--;
			r.any_error = 1;
		}
	}
	if (r.users == 0)
		uv_close((uv_handle_t *)&r.timer, NULL);
	uv_run(&r.loop, UV_RUN_DEFAULT);
	ms_mover_free(&r.mover);
	uv_run(&r.loop, UV_RUN_DEFAULT);
	uv_loop_close(&r.loop);

	if (o.json) {
		json_t *out;

		if (json_array_size(r.results) == 1 && argc - optind == 1) {
			out = json_incref(json_array_get(r.results, 0));
		} else {
			out = json_object();
			json_object_set_new(out, "ok", json_boolean(
				!r.any_error && !r.any_mismatch));
			json_object_set(out, "users", r.results);
			json_object_set_new(out, "phases",
					    phases_json(r.phase_ms));
		}
		json_dumpf(out, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		fputc('\n', stdout);
		json_decref(out);
	}
	json_decref(r.results);
	ret = r.any_error ? 1 : r.any_mismatch ? 3 : 0;
out:
	ms_store_close(&store);
	ms_secret_free(&dkey);
	if (src_pw != NULL) {
		OPENSSL_cleanse(src_pw, strlen(src_pw));
		free(src_pw);
	}
	if (dst_pw != NULL) {
		OPENSSL_cleanse(dst_pw, strlen(dst_pw));
		free(dst_pw);
	}
	opts_free(&conf);
	return ret;
}
