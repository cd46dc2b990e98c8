/* The relay's IMAP filter: a session of a moved user whose folders did not
 * keep their identity, or were renamed by the move, sees the source's
 * UIDVALIDITY, UIDs and folder names (imap_view.h, docs/gateway-spec.md
 * "The IMAP view"). Here: when a session gets one, the maps read from the
 * store, and the bytes both ways. Every other session is relayed as it is.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gw_internal.h"
#include "imap_view.h"

struct vfolder {
	struct vfolder *next;
	char *name;			/* the destination's */
	int64_t id;			/* the store's row */
	uint32_t src_next;		/* the source's UIDNEXT, as recorded */
	int translated;			/* else map is unused */
	struct ms_view_map map;
};

struct vname {
	struct vname *next;
	char *old, *dst;		/* the name the client knew, the
					   destination's */
	char sep;			/* the destination's separator */
};

struct imap_view_relay {
	struct ms_view v;
	struct vfolder *folders;	/* the user's, read at the login */
	struct vname *names;		/* folders the move renamed */
	struct ms_vbuf name;		/* renamed()'s answer */
	struct ms_vbuf nsname;		/* ns_name()'s answer */
	int store_failed;
	/* A folder's pairs being read (the store's reader): the bytes of
	 * both sides wait for them. */
	struct vfolder *loading;
	struct ms_vbuf c_held, s_held;
};

static int to_client(void *ctx, const char *data, size_t len);

/* ---- what the store knows ---- */

static int name_is(const char *a, const char *b)
{
	return strcasecmp(a, "INBOX") == 0 ? strcasecmp(b, "INBOX") == 0 :
	       strcmp(a, b) == 0;
}

struct pairs {
	struct ms_view_pair *p;
	size_t n, cap;
	int oom;
};

static int add_pair(void *ctx, const struct ms_msg_rec *rec)
{
	struct pairs *ps = ctx;

	if (rec->dst_uid == 0 || rec->src_uid == 0)
		return 0;
	if (ps->n == ps->cap) {
		size_t cap = ps->cap ? ps->cap * 2 : 256;
		struct ms_view_pair *p = realloc(ps->p, cap * sizeof(*p));

		if (p == NULL) {
			ps->oom = 1;
			return -1;
		}
		ps->p = p;
		ps->cap = cap;
	}
	ps->p[ps->n].src = rec->src_uid;
	ps->p[ps->n++].dst = rec->dst_uid;
	return 0;
}

struct pairs_read {
	struct session *s;
	int64_t folder_id;
	struct pairs ps;
};

/* On the store's reader: the folder's pairs. */
static int pairs_work(struct ms_store *store, void *arg, char *err,
		      size_t errsz)
{
	struct pairs_read *pr = arg;

	if (ms_store_msg_foreach(store, pr->folder_id, MS_MSG_DONE, add_pair,
				 &pr->ps) == 0)
		return 0;
	if (pr->ps.oom)
		snprintf(err, errsz, "out of memory");
	return -1;
}

static void pairs_drop(void *arg)
{
	struct pairs_read *pr = arg;

	free(pr->ps.p);
	free(pr);
}

static void resume(struct session *s);

/* The pairs are in: the folder's map is full, and what waited goes on. */
static void pairs_done(void *arg, const char *error)
{
	struct pairs_read *pr = arg;
	struct session *s = pr->s;
	struct imap_view_relay *iv = s->iv;
	struct vfolder *f = iv->loading;
	int invalid = f->map.invalid;
	uint32_t src_uv = f->map.src_uidvalidity;
	uint32_t dst_uv = f->map.dst_uidvalidity;

	s->rd = NULL;
	iv->loading = NULL;
	if (error == NULL) {
		ms_view_map_clear(&f->map);
		if (ms_view_map_init(&f->map, pr->ps.p, pr->ps.n, src_uv,
				     dst_uv, f->src_next) < 0)
			error = "out of memory";
		else
			pr->ps.p = NULL;
		f->map.full = error == NULL;
		f->map.invalid = invalid;
	}
	if (error != NULL) {
		ms_log(MS_LOG_ERROR, "session %llu: %s: IMAP view of \"%s\": "
		       "%s", (unsigned long long)s->id, s->gu->name, f->name,
		       error);
		iv->store_failed = 1;
		/* what needed the folder is not passed on */
		ms_view_fail(&iv->v, "store failed");
	}
	pairs_drop(pr);
	/* without a reader this ran inside the lookup: nothing waited */
	if (s->gw->reader != NULL)
		resume(s);
}

/* The folder's pairs, read on the store's reader; until they are in, the
 * client's next commands and the server's answers wait (ms_view_wait()).
 * Without a reader they are read at once. */
static void pairs_load(struct session *s, struct vfolder *f)
{
	struct imap_view_relay *iv = s->iv;
	struct pairs_read *pr = calloc(1, sizeof(*pr));

	if (pr == NULL) {
		ms_view_fail(&iv->v, "out of memory");
		return;
	}
	pr->s = s;
	pr->folder_id = f->id;
	iv->loading = f;
	if (gw_read(s, pairs_work, pairs_done, pairs_drop, pr) < 0) {
		iv->loading = NULL;
		ms_view_fail(&iv->v, "out of memory");
	}
	if (iv->loading != NULL)
		ms_view_wait(&iv->v);
}

/* Another folder is being selected: the pairs of folders the view has no
 * more use for go (16 bytes a message); their rows stay (enough for
 * STATUS and for the new mail of APPENDUID and COPYUID). */
static void vfolders_trim(struct imap_view_relay *iv)
{
	for (struct vfolder *f = iv->folders; f != NULL; f = f->next) {
		struct ms_view_map *m = &f->map;

		if (!m->full || ms_view_uses(&iv->v, m))
			continue;
		ms_debug("IMAP view: the pairs of \"%s\" let go (%zu)",
			 f->name, m->n);
		if (m->by_dst != m->by_src)
			free(m->by_dst);
		free(m->by_src);
		m->by_src = m->by_dst = NULL;
		m->n = 0;
		m->full = 0;
		m->monotone = 1;
	}
}

/* The folder the store would name for name: its newest row of that name
 * (compared as the store compares, ASCII case aside). */
static struct vfolder *vfolder_find(struct imap_view_relay *iv,
				    const char *name)
{
	struct vfolder *best = NULL;

	for (struct vfolder *f = iv->folders; f != NULL; f = f->next)
		if (strcasecmp(f->name, name) == 0 &&
		    (best == NULL || f->id > best->id))
			best = f;
	return best;
}

static struct ms_view_map *view_lookup(void *ctx, const char *name, int full)
{
	struct session *s = ctx;
	struct imap_view_relay *iv = s->iv;
	struct vfolder *f;

	if (full)
		vfolders_trim(iv);
	f = vfolder_find(iv, name);
	if (f == NULL || !f->translated)
		return NULL;
	if (full && !f->map.full)
		pairs_load(s, f);
	return &f->map;
}

/* name is from (a folder the move renamed) or below it: how many bytes of
 * name that is, else 0. */
static size_t renamed_part(const struct vname *n, const char *from,
			   const char *name)
{
	size_t len = strlen(from);

	if (name_is(from, name))
		return strlen(name);
	if (n->sep != '\0' && strncmp(name, from, len) == 0 &&
	    name[len] == n->sep)
		return len;
	return 0;
}

/* The destination's name for one the client knows (to_dst), or the old
 * name for a destination's, both without the source's namespace prefix;
 * NULL: the same. A folder below a renamed one is renamed with it, the
 * nearest (longest) one deciding. */
static const char *renamed(struct imap_view_relay *iv, const char *name,
			   int to_dst)
{
	const struct vname *best = NULL;
	size_t best_len = 0;

	for (const struct vname *n = iv->names; n != NULL; n = n->next) {
		size_t len = renamed_part(n, to_dst ? n->old : n->dst, name);

		if (len > best_len) {
			best = n;
			best_len = len;
		}
	}
	if (best == NULL)
		return NULL;
	iv->name.len = 0;
	if (ms_vbuf_add(&iv->name, to_dst ? best->dst : best->old,
			strlen(to_dst ? best->dst : best->old)) < 0 ||
	    ms_vbuf_add(&iv->name, name + best_len,
			strlen(name + best_len)) < 0) {
		ms_view_fail(&iv->v, "out of memory");
		return NULL;
	}
	return iv->name.p;
}

/* name in the other side's namespace (ms_view_ns_name()); NULL: the same
 * (no prefix shown, INBOX, a name outside it). */
static const char *ns_name(struct imap_view_relay *iv, const char *name,
			   int to_dst)
{
	int r;

	if (!iv->v.ns_on)
		return NULL;
	r = ms_view_ns_name(&iv->v.ns, name, to_dst, &iv->nsname);
	if (r < 0)
		ms_view_fail(&iv->v, "out of memory");
	return r > 0 ? iv->nsname.p : NULL;
}

/* The view's names: the source's namespace (a Courier "INBOX." shown) and
 * the old names of renamed folders; NULL: the same. To the destination
 * the prefix goes first, then the rename; back, the other way round. */
static const char *view_name(void *ctx, const char *name, int to_dst)
{
	struct session *s = ctx;
	struct imap_view_relay *iv = s->iv;
	const char *ns, *rn;

	if (to_dst) {
		ns = ns_name(iv, name, 1);
		rn = renamed(iv, ns != NULL ? ns : name, 1);
		return rn != NULL ? rn : ns;
	}
	rn = renamed(iv, name, 0);
	ns = ns_name(iv, rn != NULL ? rn : name, 0);
	return ns != NULL ? ns : rn;
}

/* A LIST pattern with a wildcard may match a renamed folder or one below
 * it by its old name ("Sent*": "Sent Items", now "Sent"): the server is
 * asked for each renamed folder and its subtree too; the view keeps what
 * the client's pattern matches. */
static int view_patterns(void *ctx, const char *pattern, struct ms_vbuf *out)
{
	struct session *s = ctx;
	int n = 0, r = 0;

	if (strpbrk(pattern, "*%") == NULL)
		return 0;
	/* "INBOX*" may match names shown below the source's prefix, which
	 * the destination has without it: all are asked, the view keeps
	 * what the pattern matches (a pattern below the prefix is asked
	 * without it already). */
	if (s->iv->v.ns_on && strcmp(pattern, "*") != 0 &&
	    ms_view_ns_name(&s->iv->v.ns, pattern, 1, &s->iv->nsname) == 0) {
		r |= ms_vbuf_add(out, "*", 2);
		n++;
	}
	for (const struct vname *v = s->iv->names; v != NULL; v = v->next) {
		r |= ms_vbuf_add(out, v->dst, strlen(v->dst) + 1);
		n++;
		if (v->sep == '\0')
			continue;
		r |= ms_vbuf_add(out, v->dst, strlen(v->dst)) |
		     ms_vbuf_add(out, &v->sep, 1) | ms_vbuf_add(out, "*", 2);
		n++;
	}
	return r < 0 ? -1 : n;
}

/* The user's rows a view needs, read on the store's reader at a login to
 * the destination, before the server is asked. */
struct view_read {
	struct gw_login_read lr;	/* first */
	struct ms_store *store;		/* the reader's, while it works */
	struct imap_view_relay *iv;	/* NULL: no view */
	int translate;			/* a folder is not kept */
	struct ms_user_ns ns;
	int ns_found;
};

/* A folder row: which need the view (not kept), and the map of each. */
static int start_folder(void *ctx, const struct ms_folder_state *fs)
{
	struct view_read *vr = ctx;
	struct vfolder *f;
	int id;

	if (fs->dst_name[0] == '\0')
		return 0;		/* not copied */
	if (ms_store_identity_get(vr->store, fs->id, &id) < 0)
		return -1;
	if (fs->dst_uidvalidity != 0 && id != MS_ID_KEPT)
		vr->translate = 1;
	f = calloc(1, sizeof(*f));
	if (f == NULL || (f->name = strdup(fs->dst_name)) == NULL) {
		free(f);
		return -1;
	}
	f->id = fs->id;
	f->next = vr->iv->folders;
	vr->iv->folders = f;
	if (fs->dst_uidvalidity == 0 || fs->src_uidvalidity == 0 ||
	    id == MS_ID_KEPT)
		return 0;
	if (ms_store_src_next_get(vr->store, fs->id, &f->src_next) < 0 ||
	    ms_view_map_init(&f->map, NULL, 0, fs->src_uidvalidity,
			     fs->dst_uidvalidity, f->src_next) < 0)
		return -1;
	f->translated = 1;
	return 0;
}

/* A folder the move renamed (the mover's record, names = destination). */
static int start_rename(void *ctx, const char *old_name, const char *dst_name,
			char sep)
{
	struct imap_view_relay *iv = ctx;
	struct vname *n = calloc(1, sizeof(*n));

	if (n == NULL || (n->old = strdup(old_name)) == NULL ||
	    (n->dst = strdup(dst_name)) == NULL) {
		if (n != NULL)
			free(n->old);
		free(n);
		return -1;
	}
	n->sep = sep;
	n->next = iv->names;
	iv->names = n;
	return 0;
}

static void set_namespace(struct ms_view *v, const struct ms_user_ns *ns)
{
	struct ms_view_ns vns = { .src_sep = ns->src_sep,
				  .dst_sep = ns->dst_sep };

	snprintf(vns.src_prefix, sizeof(vns.src_prefix), "%s", ns->src_prefix);
	snprintf(vns.dst_prefix, sizeof(vns.dst_prefix), "%s", ns->dst_prefix);
	ms_view_set_namespace(v, &vns);
}

static void iv_free(struct imap_view_relay *iv)
{
	ms_view_clear(&iv->v);
	while (iv->folders != NULL) {
		struct vfolder *f = iv->folders;

		iv->folders = f->next;
		ms_view_map_clear(&f->map);
		free(f->name);
		free(f);
	}
	ms_vbuf_free(&iv->name);
	ms_vbuf_free(&iv->nsname);
	ms_vbuf_free(&iv->c_held);
	ms_vbuf_free(&iv->s_held);
	while (iv->names != NULL) {
		struct vname *n = iv->names;

		iv->names = n->next;
		free(n->old);
		free(n->dst);
		free(n);
	}
	free(iv);
}

/* On the store's reader. */
static int view_work(struct ms_store *store, void *arg, char *err,
		     size_t errsz)
{
	struct view_read *vr = arg;
	struct ms_user_info info;
	int found = 0;

	if (ms_store_user_info(store, vr->lr.user, &info, &found) < 0)
		return -1;
	if (!found)
		return 0;
	vr->iv = calloc(1, sizeof(*vr->iv));
	if (vr->iv == NULL) {
		snprintf(err, errsz, "out of memory");
		return -1;
	}
	vr->store = store;
	if (ms_store_folder_foreach(store, info.id, start_folder, vr) != 0 ||
	    ms_store_rename_foreach(store, info.id, start_rename,
				    vr->iv) != 0) {
		snprintf(err, errsz, "cannot read the user's folders");
		return -1;
	}
	return ms_store_namespace_get(store, info.id, &vr->ns, &vr->ns_found);
}

static void view_drop(void *arg)
{
	struct view_read *vr = arg;

	if (vr->iv != NULL)
		iv_free(vr->iv);
	gw_login_read_free(&vr->lr);
}

/* The rows are in: the session's view when it needs one (else none, at
 * no cost), then on to the server. */
static void view_done(void *arg, const char *error)
{
	struct view_read *vr = arg;
	struct session *s = vr->lr.s;
	struct imap_view_relay *iv = vr->iv;

	s->rd = NULL;
	if (error != NULL || iv == NULL) {
		view_drop(vr);
		gw_backend_go(s, error);
		return;
	}
	vr->iv = NULL;
	ms_view_init(&iv->v, view_lookup, view_name, s);
	ms_view_set_reply(&iv->v, to_client, s);
	/* A source prefix ("INBOX.") the destination does not have: shown */
	if (vr->ns_found && vr->ns.src_prefix[0] != '\0' &&
	    (strcmp(vr->ns.src_prefix, vr->ns.dst_prefix) != 0 ||
	     vr->ns.src_sep != vr->ns.dst_sep))
		set_namespace(&iv->v, &vr->ns);
	if (!vr->translate && iv->names == NULL && !iv->v.ns_on) {
		iv_free(iv);		/* identity kept: zero cost */
	} else {
		iv->v.withhold = vr->translate;
		if (iv->names != NULL || iv->v.ns_on) {
			ms_view_set_patterns(&iv->v, view_patterns);
			iv->v.withhold_utf8 = 1;
		}
		s->iv = iv;
	}
	view_drop(vr);
	gw_backend_go(s, NULL);
}

void gw_imap_view_load(struct session *s)
{
	gw_read_login(s, sizeof(struct view_read), view_work, view_done,
		      view_drop);
}

void gw_imap_view_free(struct session *s)
{
	struct imap_view_relay *iv = s->iv;

	if (iv == NULL)
		return;
	if (iv->v.uids > 0 || iv->v.names > 0)
		ms_info("session %llu: %s: IMAP view: %llu UIDs or sets and "
			"%llu folder names shown as the source's",
			(unsigned long long)s->id, s->gu->name,
			(unsigned long long)iv->v.uids,
			(unsigned long long)iv->v.names);
	iv_free(iv);
	s->iv = NULL;
}

/* ---- the bytes ---- */

static int to_client(void *ctx, const char *data, size_t len)
{
	struct session *s = ctx;

	return ms_conn_write(s->c, data, len) < 0 ? -1 : 0;
}

static int to_server(void *ctx, const char *data, size_t len)
{
	struct session *s = ctx;

	return ms_conn_write(s->b, data, len) < 0 ? -1 : 0;
}

/* Translation cannot go on: the session ends rather than show a client
 * the destination's UIDs under the source's UIDVALIDITY; the client is
 * told why where a response may begin (RFC 5530 UNAVAILABLE: try again
 * later). */
static int view_failed(struct session *s)
{
	static const char bye[] = "* BYE [UNAVAILABLE] The gateway cannot "
				  "show this mailbox now, try again later\r\n";

	ms_warn("session %llu: %s: IMAP view: %s; the session ends",
		(unsigned long long)s->id, s->gu->name,
		s->iv->store_failed ? "store failed" :
		ms_view_gave_up(&s->iv->v));
	if (ms_view_client_at_rest(&s->iv->v))
		ms_conn_write(s->c, bye, sizeof(bye) - 1);
	return -1;
}

/* Bytes that came while a folder's pairs are read: kept, in order, and
 * no more read from that side until they are in. */
static int hold(struct session *s, struct ms_conn *conn, int *paused,
		struct ms_vbuf *held, const char *data, size_t len)
{
	ms_pause_set(conn, paused, MS_PAUSE_STORE);
	if (len > 0 && ms_vbuf_add(held, data, len) < 0) {
		ms_view_fail(&s->iv->v, "out of memory");
		return view_failed(s);
	}
	return 0;
}

int gw_imap_view_client(struct session *s, const char *data, size_t len)
{
	struct imap_view_relay *iv = s->iv;
	size_t used = 0;

	if (iv->loading != NULL)
		return hold(s, s->c, &s->c_paused, &iv->c_held, data, len);
	if (ms_view_client_some(&iv->v, data, len, to_server, s, &used) < 0 ||
	    iv->store_failed)
		return view_failed(s);
	if (iv->loading != NULL &&
	    hold(s, s->c, &s->c_paused, &iv->c_held, data + used,
		 len - used) < 0)
		return -1;
	if (ms_view_pending(&iv->v) >= MS_VIEW_PIPELINE_SOFT)
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	ms_relay_pressure(s->b, s->c, &s->c_paused);
	return 0;
}

int gw_imap_view_server(struct session *s, const char *data, size_t len)
{
	struct imap_view_relay *iv = s->iv;

	if (iv->loading != NULL)
		return hold(s, s->b, &s->b_paused, &iv->s_held, data, len);
	if (ms_view_server(&iv->v, data, len, to_client, s) < 0 ||
	    iv->store_failed)
		return view_failed(s);
	if (ms_view_pending(&iv->v) < MS_VIEW_PIPELINE_SOFT / 2)
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	ms_relay_pressure(s->c, s->b, &s->b_paused);
	return 0;
}

/* A folder's pairs came in (or could not): what waited is taken, the
 * server's answers first; the client's may wait for another folder. */
static void resume(struct session *s)
{
	struct imap_view_relay *iv = s->iv;
	struct ms_vbuf sh = iv->s_held, ch = iv->c_held;
	int r = 0;

	memset(&iv->s_held, 0, sizeof(iv->s_held));
	memset(&iv->c_held, 0, sizeof(iv->c_held));
	ms_pause_clear(s->b, &s->b_paused, MS_PAUSE_STORE);
	ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_STORE);
	if (iv->store_failed)
		r = view_failed(s);
	if (r == 0 && sh.len > 0)
		r = gw_imap_view_server(s, sh.p, sh.len);
	if (r == 0 && ch.len > 0)
		r = gw_imap_view_client(s, ch.p, ch.len);
	ms_vbuf_free(&sh);
	ms_vbuf_free(&ch);
	if (r < 0)
		gw_session_close(s);
}
