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
	int64_t user_id;
	struct vfolder *folders;	/* looked up so far */
	struct vname *names;		/* folders the move renamed */
	struct ms_vbuf name;		/* renamed()'s answer */
	struct ms_vbuf nsname;		/* ns_name()'s answer */
	int store_failed;
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
};

static int add_pair(void *ctx, const struct ms_msg_rec *rec)
{
	struct pairs *ps = ctx;

	if (rec->dst_uid == 0 || rec->src_uid == 0)
		return 0;
	if (ps->n == ps->cap) {
		size_t cap = ps->cap ? ps->cap * 2 : 256;
		struct ms_view_pair *p = realloc(ps->p, cap * sizeof(*p));

		if (p == NULL)
			return -1;
		ps->p = p;
		ps->cap = cap;
	}
	ps->p[ps->n].src = rec->src_uid;
	ps->p[ps->n++].dst = rec->dst_uid;
	return 0;
}

/* The folder's map, with its pairs when full. -1: the store failed or out
 * of memory. */
static int vfolder_load(struct session *s, struct vfolder *f, int full)
{
	struct imap_view_relay *iv = s->iv;
	struct ms_store *store = s->gw->store;
	struct ms_folder_state fs;
	struct pairs ps = { 0 };
	uint32_t next;
	int found = 0, id, invalid = f->map.invalid;

	if (ms_store_folder_find_dst(store, iv->user_id, f->name, &fs,
				     &found) < 0)
		return -1;
	if (!found || fs.dst_uidvalidity == 0 || fs.src_uidvalidity == 0)
		return 0;
	if (ms_store_identity_get(store, fs.id, &id) < 0 ||
	    ms_store_src_next_get(store, fs.id, &next) < 0)
		return -1;
	if (id == MS_ID_KEPT)
		return 0;
	if (full && ms_store_msg_foreach(store, fs.id, MS_MSG_DONE, add_pair,
					 &ps) != 0) {
		free(ps.p);
		return -1;
	}
	ms_view_map_clear(&f->map);
	if (ms_view_map_init(&f->map, ps.p, ps.n, fs.src_uidvalidity,
			     fs.dst_uidvalidity, next) < 0)
		return -1;
	f->map.full = full;
	f->map.invalid = invalid;
	f->translated = 1;
	return 0;
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

static struct ms_view_map *view_lookup(void *ctx, const char *name, int full)
{
	struct session *s = ctx;
	struct imap_view_relay *iv = s->iv;
	struct vfolder *f;

	if (full)
		vfolders_trim(iv);
	for (f = iv->folders; f != NULL; f = f->next)
		if (name_is(f->name, name))
			break;
	if (f == NULL) {
		f = calloc(1, sizeof(*f));
		if (f == NULL || (f->name = strdup(name)) == NULL) {
			free(f);
			ms_view_fail(&iv->v, "out of memory");
			return NULL;
		}
		f->next = iv->folders;
		iv->folders = f;
	} else if (!f->translated || f->map.full || !full) {
		return f->translated ? &f->map : NULL;
	}
	if (vfolder_load(s, f, full) < 0) {
		ms_log(MS_LOG_ERROR, "session %llu: %s: IMAP view of \"%s\": "
		       "%s", (unsigned long long)s->id, s->gu->name, name,
		       ms_store_error(s->gw->store));
		iv->store_failed = 1;
		/* what needed the folder is not passed on */
		ms_view_fail(&iv->v, "store failed");
	}
	return f->translated ? &f->map : NULL;
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

struct start_ctx {
	struct session *s;
	int translate;			/* a folder is not kept */
};

/* Which folders need the view: not kept. */
static int start_folder(void *ctx, const struct ms_folder_state *fs)
{
	struct start_ctx *sc = ctx;
	int id;

	if (fs->dst_uidvalidity == 0 || fs->dst_name[0] == '\0')
		return 0;		/* not copied */
	if (ms_store_identity_get(sc->s->gw->store, fs->id, &id) < 0)
		return -1;
	if (id != MS_ID_KEPT)
		sc->translate = 1;
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

const char *gw_imap_view_start(struct session *s)
{
	struct ms_gateway *gw = s->gw;
	struct ms_user_info info;
	struct start_ctx sc = { s, 0 };
	struct ms_user_ns ns;
	int found = 0;

	if (s->proto != MS_GW_IMAP || !s->to_dst)
		return NULL;
	if (ms_store_user_info(gw->store, ms_login_name(&s->login), &info,
			       &found) < 0)
		return ms_store_error(gw->store);
	if (!found)
		return NULL;
	s->iv = calloc(1, sizeof(*s->iv));
	if (s->iv == NULL)
		return "out of memory";
	s->iv->user_id = info.id;
	ms_view_init(&s->iv->v, view_lookup, view_name, s);
	ms_view_set_reply(&s->iv->v, to_client, s);
	if (ms_store_folder_foreach(gw->store, info.id, start_folder,
				    &sc) != 0 ||
	    ms_store_rename_foreach(gw->store, info.id, start_rename,
				    s->iv) != 0) {
		gw_imap_view_free(s);
		return "cannot read the user's folders";
	}
	if (ms_store_namespace_get(gw->store, info.id, &ns, &found) < 0) {
		gw_imap_view_free(s);
		return ms_store_error(gw->store);
	}
	/* A source prefix ("INBOX.") the destination does not have: shown */
	if (found && ns.src_prefix[0] != '\0' &&
	    (strcmp(ns.src_prefix, ns.dst_prefix) != 0 ||
	     ns.src_sep != ns.dst_sep))
		set_namespace(&s->iv->v, &ns);
	if (!sc.translate && s->iv->names == NULL && !s->iv->v.ns_on) {
		gw_imap_view_free(s);	/* identity kept: zero cost */
		return NULL;
	}
	s->iv->v.withhold = sc.translate;
	if (s->iv->names != NULL || s->iv->v.ns_on) {
		ms_view_set_patterns(&s->iv->v, view_patterns);
		s->iv->v.withhold_utf8 = 1;
	}
	return NULL;
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
	while (iv->names != NULL) {
		struct vname *n = iv->names;

		iv->names = n->next;
		free(n->old);
		free(n->dst);
		free(n);
	}
	free(iv);
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

int gw_imap_view_client(struct session *s, const char *data, size_t len)
{
	if (ms_view_client(&s->iv->v, data, len, to_server, s) < 0 ||
	    s->iv->store_failed)
		return view_failed(s);
	if (ms_view_pending(&s->iv->v) >= MS_VIEW_PIPELINE_SOFT)
		ms_pause_set(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	ms_relay_pressure(s->b, s->c, &s->c_paused);
	return 0;
}

int gw_imap_view_server(struct session *s, const char *data, size_t len)
{
	if (ms_view_server(&s->iv->v, data, len, to_client, s) < 0 ||
	    s->iv->store_failed)
		return view_failed(s);
	if (ms_view_pending(&s->iv->v) < MS_VIEW_PIPELINE_SOFT / 2)
		ms_pause_clear(s->c, &s->c_paused, MS_PAUSE_PIPELINE);
	ms_relay_pressure(s->c, s->b, &s->b_paused);
	return 0;
}
