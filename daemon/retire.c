/* [retire] and the gateway's record of its use of the source. The record
 * is throttled in memory (a small table of the last write per user and
 * kind) so that a busy source costs the store one write a minute per
 * user, not one per login or message; each row says how late it may be
 * (its slack), and mailshiftctl retire counts that in. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "net.h"
#include "retire.h"

#define SLOTS 1024
#define MAX_DURATION (400u * 86400u)

void ms_retire_defaults(struct ms_retire_cfg *r)
{
	r->quiet_period = 86400;
	r->record_interval = 60;
}

int ms_parse_duration(const char *s, unsigned int *secs_r)
{
	static const struct {
		char unit;
		unsigned int secs;
	} units[] = { { 's', 1 }, { 'm', 60 }, { 'h', 3600 }, { 'd', 86400 } };
	unsigned long long v = 0;
	unsigned int mult = 1;
	const char *p = s;

	if (!isdigit((unsigned char)*p))
		return -1;
	while (isdigit((unsigned char)*p) && v <= MAX_DURATION)
		v = v * 10 + (unsigned int)(*p++ - '0');
	if (*p != '\0') {
		size_t i;

		for (i = 0; i < sizeof(units) / sizeof(units[0]); i++)
			if (*p == units[i].unit)
				break;
		if (i == sizeof(units) / sizeof(units[0]) || p[1] != '\0')
			return -1;
		mult = units[i].secs;
	}
	if (v * mult > MAX_DURATION)
		return -1;
	*secs_r = (unsigned int)(v * mult);
	return 0;
}

int ms_retire_key(struct ms_retire_cfg *r, const char *key, const char *value,
		  char *err, size_t errsz)
{
	unsigned int *dst;

	if (!strcmp(key, "quiet_period"))
		dst = &r->quiet_period;
	else if (!strcmp(key, "record_interval"))
		dst = &r->record_interval;
	else {
		snprintf(err, errsz, "unknown key \"%s\" in [retire]", key);
		return -1;
	}
	if (ms_parse_duration(value, dst) < 0 ||
	    (dst == &r->record_interval && (*dst < 1 || *dst > 3600))) {
		snprintf(err, errsz, "%s: \"%.40s\" is not a duration (a number "
			 "with s, m, h or d%s)", key, value,
			 dst == &r->record_interval ? "; 1s to 1h" : "");
		return -1;
	}
	return 0;
}

/* Uses are written by a timer, all of one second in one transaction: a
 * login waits for no write of the store (a write per user and minute, for
 * a thousand users logging in, cost each login a tenth more CPU). */
#define FLUSH_MS 1000
#define PENDING_MAX 4096	/* more: written at once, in one transaction */

static struct {
	struct ms_store *store;
	unsigned int interval;
	struct slot {
		char key[256];
		char kind[16];
		time_t at;
	} slots[SLOTS];
	uv_timer_t *timer;
	struct ms_source_use *pend;
	size_t npend;
	/* several gateways: written by the cluster's connection, the loop
	 * waiting on nothing; one batch at a time, sent[0..nsent-1] */
	ms_retire_write_cb *write;
	void *write_ctx;
	struct ms_source_use *sent;
	size_t nsent;
	int sending;
	int failed_said;
} rec;

void ms_retire_init(uv_loop_t *loop, struct ms_store *store,
		    const struct ms_retire_cfg *r)
{
	memset(&rec, 0, sizeof(rec));
	rec.store = store;
	rec.interval = r->record_interval;
	if (loop == NULL)
		return;		/* each use written when it happens */
	rec.pend = calloc(PENDING_MAX, sizeof(*rec.pend));
	rec.sent = calloc(PENDING_MAX, sizeof(*rec.sent));
	rec.timer = malloc(sizeof(*rec.timer));
	if (rec.pend == NULL || rec.sent == NULL || rec.timer == NULL) {
		/* Without them each use is written when it happens. */
		free(rec.pend);
		free(rec.sent);
		free(rec.timer);
		rec.pend = NULL;
		rec.sent = NULL;
		rec.timer = NULL;
		return;
	}
	uv_timer_init(loop, rec.timer);
}

static void on_flush(uv_timer_t *t);

static void flush_later(void)
{
	if (rec.timer != NULL && rec.npend > 0 &&
	    !uv_is_active((uv_handle_t *)rec.timer))
		uv_timer_start(rec.timer, on_flush, FLUSH_MS, 0);
}

/* The batch sent to the writer is in, or not: then it waits again, before
 * the uses noted since (newer), the oldest dropped past PENDING_MAX. */
static void on_written(void *ctx, const char *error)
{
	size_t keep;

	(void)ctx;
	rec.sending = 0;
	if (error == NULL) {
		rec.failed_said = 0;
		rec.nsent = 0;
		flush_later();
		return;
	}
	keep = PENDING_MAX - rec.npend;
	if (keep > rec.nsent)
		keep = rec.nsent;
	if (!rec.failed_said || keep < rec.nsent)
		ms_log(MS_LOG_ERROR, "recording %zu use(s) of the source: "
		       "store: %s: written again in a second%s", rec.nsent,
		       error, keep < rec.nsent ? " (the oldest dropped: too "
		       "many waiting)" : "");
	rec.failed_said = 1;
	memmove(rec.pend + keep, rec.pend, rec.npend * sizeof(*rec.pend));
	memcpy(rec.pend, rec.sent + (rec.nsent - keep), keep * sizeof(*rec.pend));
	rec.npend += keep;
	rec.nsent = 0;
	flush_later();
}

/* What waits, in one transaction: handed to the writer when there is
 * one (and it has no batch out), else on the store's connection. */
static void flush(void)
{
	int ok;

	if (rec.npend == 0)
		return;
	if (rec.write != NULL && rec.sending)
		return;		/* sent when the batch out is answered */
	if (rec.write != NULL) {
		struct ms_source_use *t = rec.sent;

		rec.sent = rec.pend;
		rec.nsent = rec.npend;
		rec.pend = t;
		rec.npend = 0;
		rec.sending = 1;
		rec.write(rec.write_ctx, rec.sent, rec.nsent, on_written, NULL);
		return;
	}
	ok = ms_store_begin(rec.store) == 0;
	for (size_t i = 0; ok && i < rec.npend; i++)
		ok = ms_store_source_use_note(rec.store, &rec.pend[i]) == 0;
	if (ok)
		ok = ms_store_commit(rec.store) == 0;
	if (!ok) {
		ms_log(MS_LOG_ERROR, "recording %zu use(s) of the source: "
		       "store: %s", rec.npend, ms_store_error(rec.store));
		ms_store_rollback(rec.store);
	}
	rec.npend = 0;
}

static void on_flush(uv_timer_t *t)
{
	flush();
}

void ms_retire_set_writer(ms_retire_write_cb *cb, void *ctx)
{
	rec.write = cb;
	rec.write_ctx = ctx;
}

void ms_retire_stop(void)
{
	if (rec.store == NULL)
		return;
	/* (the writer is gone by now: its batch out was answered, in or
	 * back in pend) */
	rec.write = NULL;
	flush();
	if (rec.timer != NULL)
		ms_close_free((uv_handle_t *)rec.timer, rec.timer);
	rec.timer = NULL;
	free(rec.pend);
	free(rec.sent);
	rec.pend = NULL;
	rec.sent = NULL;
	rec.store = NULL;
}

/* Kept apart from rec: set by the gateway, whenever it starts. */
static ms_retire_known_cb *known_cb;
static void *known_ctx;

void ms_retire_set_known(ms_retire_known_cb *cb, void *ctx)
{
	known_cb = cb;
	known_ctx = ctx;
}

static int known(const char *name)
{
	struct ms_user_info info;
	int found = 0, r = known_cb != NULL ? known_cb(known_ctx, name) : -1;

	if (r >= 0)
		return r;
	return ms_store_user_info(rec.store, name, &info, &found) == 0 &&
	       found;
}

/* The name without its local part's "+extension" (alice+lists@d ->
 * alice@d), into out; 0 when it has none. */
static int drop_extension(const char *name, char *out, size_t sz)
{
	const char *at = strrchr(name, '@');
	size_t local = at != NULL ? (size_t)(at - name) : strlen(name);
	const char *plus = memchr(name, '+', local);

	if (plus == NULL || plus == name)
		return 0;
	snprintf(out, sz, "%.*s%s", (int)(plus - name), name,
		 at != NULL ? at : "");
	return 1;
}

/* The map's name for what a client gave: a login's as it is (the gateway
 * looks logins up so); a recipient's tried as the gateway looks recipients
 * up (smtp.c, route_rcpt): its domain in lower case, all in lower case,
 * its local part as given and in lower case, each again without a
 * "+extension". "*" when the map knows none of them. */
static void map_name(const char *name, int rcpt, char *key, size_t keysz)
{
	char base[2][256], c[256];
	unsigned int nbase = 1;

	snprintf(key, keysz, "*");
	if (strlen(name) >= sizeof(base[0]))
		return;
	if (!rcpt) {
		if (known(name))
			snprintf(key, keysz, "%s", name);
		return;
	}
	snprintf(base[0], sizeof(base[0]), "%s", name);
	nbase += drop_extension(name, base[1], sizeof(base[1]));
	for (unsigned int b = 0; b < nbase; b++) {
		for (unsigned int i = 0; i < 4; i++) {
			char *at;

			snprintf(c, sizeof(c), "%s", base[b]);
			at = strrchr(c, '@');
			if (i >= 2 && at == NULL)
				break;
			if (i >= 2)
				*at = '\0';
			/* 0: the domain in lower case; 1, 3: all of it */
			for (char *p = i == 0 && at != NULL ? at : c;
			     (i % 2 == 1 || (i == 0 && at != NULL)) &&
			     *p != '\0'; p++)
				*p = (char)tolower((unsigned char)*p);
			if (c[0] != '\0' && known(c)) {
				snprintf(key, keysz, "%s", c);
				return;
			}
		}
	}
}

static unsigned int slot_of(const char *key, const char *kind)
{
	unsigned int h = 2166136261u;

	for (const char *p = key; *p != '\0'; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	for (const char *p = kind; *p != '\0'; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	return h % SLOTS;
}

void ms_retire_note(const char *kind, const char *name)
{
	struct ms_source_use u = { .slack = 0 };
	struct slot *sl;
	time_t now = time(NULL);

	if (rec.store == NULL || name == NULL)
		return;
	map_name(name, !strcmp(kind, "mail"), u.key, sizeof(u.key));
	sl = &rec.slots[slot_of(u.key, kind)];
	/* Written less than an interval ago: the row's slack covers this
	 * use. (Another key in the slot is simply written again.) */
	if (!strcmp(sl->key, u.key) && !strcmp(sl->kind, kind) &&
	    now >= sl->at && now - sl->at < (time_t)rec.interval)
		return;
	snprintf(u.kind, sizeof(u.kind), "%s", kind);
	snprintf(u.name, sizeof(u.name), "%s", name);
	u.at = now;
	/* how late the row may be: the interval (and the flush's second) */
	u.slack = rec.interval + (rec.pend != NULL ? (FLUSH_MS + 999) / 1000 : 0);
	if (rec.pend == NULL) {
		if (ms_store_source_use_note(rec.store, &u) < 0) {
			ms_log(MS_LOG_ERROR, "%s: recording a use of the "
			       "source: store: %s", name,
			       ms_store_error(rec.store));
			return;
		}
	} else {
		if (rec.npend == PENDING_MAX)
			flush();
		if (rec.npend == PENDING_MAX) {
			/* a batch out and as many waiting: these on the
			 * store's connection rather than lost */
			ms_retire_write_cb *w = rec.write;

			rec.write = NULL;
			flush();
			rec.write = w;
		}
		rec.pend[rec.npend++] = u;
		flush_later();
	}
	snprintf(sl->key, sizeof(sl->key), "%s", u.key);
	snprintf(sl->kind, sizeof(sl->kind), "%s", kind);
	sl->at = now;
}
