/* The mover's planning of a user's folders: LIST and STATUS on both
 * sides, the mapping of source names to destination names (include and
 * exclude patterns, separators, special-use folders), CREATE and SUBSCRIBE
 * on the destination, and the order the folders are handed to workers in.
 * No message is read or written here; a rollback plans in
 * mover_rollback.c. */
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "testhook.h"
#include "mover_internal.h"

/* ---- planning: LIST, STATUS, CREATE, SUBSCRIBE ---- */

static int pattern_match(char *const *pats, const char *name)
{
	for (; pats != NULL && *pats != NULL; pats++)
		if (fnmatch(*pats, name, 0) == 0)
			return 1;
	return 0;
}

static const char *special_of(const struct ms_imap_arg *attrs)
{
	static const char *const uses[] = {
		"\\Sent", "\\Trash", "\\Drafts", "\\Junk", "\\Archive",
		"\\All", "\\Flagged",
	};

	if (attrs->type != MS_ARG_LIST)
		return NULL;
	for (unsigned int i = 0; i < attrs->list_count; i++)
		for (size_t j = 0; j < sizeof(uses) / sizeof(uses[0]); j++)
			if (ms_imap_arg_is(&attrs->list[i], uses[j]))
				return uses[j];
	return NULL;
}

/* The special use of a top-level folder by its name alone, for servers
 * without SPECIAL-USE: the names mail clients and servers have used for
 * these folders. docs/mover.md prints this table; keep the two alike. */
static const char *usual_special(const char *name)
{
	static const struct {
		const char *name, *use;
	} usual[] = {
		{ "Sent", "\\Sent" }, { "Sent Items", "\\Sent" },
		{ "Sent Messages", "\\Sent" }, { "Sent Mail", "\\Sent" },
		{ "Drafts", "\\Drafts" }, { "Draft", "\\Drafts" },
		{ "Trash", "\\Trash" }, { "Deleted Items", "\\Trash" },
		{ "Deleted Messages", "\\Trash" }, { "Bin", "\\Trash" },
		{ "Junk", "\\Junk" }, { "Junk E-mail", "\\Junk" },
		{ "Junk Email", "\\Junk" }, { "Spam", "\\Junk" },
		{ "Bulk Mail", "\\Junk" },
		{ "Archive", "\\Archive" }, { "Archives", "\\Archive" },
	};

	for (size_t i = 0; i < sizeof(usual) / sizeof(usual[0]); i++)
		if (strcasecmp(name, usual[i].name) == 0)
			return usual[i].use;
	return NULL;
}

/* name without the namespace prefix, when it has it and is more than it. */
const char *mv_unprefixed(const char *name, const char *prefix)
{
	size_t n = strlen(prefix);

	if (n > 0 && strncmp(name, prefix, n) == 0 && name[n] != '\0')
		return name + n;
	return name;
}

/* A folder's special use: the server's LIST attribute, or, from a server
 * without SPECIAL-USE, the usual name of a top-level folder. */
static const char *folder_special(struct ms_imapc *c,
				  const struct ms_imap_arg *attrs,
				  const char *name, const char *prefix, char sep)
{
	const char *sp = special_of(attrs);

	if (sp != NULL || ms_imapc_has_cap(c, "SPECIAL-USE"))
		return sp;
	name = mv_unprefixed(name, prefix);
	if (sep != '\0' && strchr(name, sep) != NULL)
		return NULL;
	return usual_special(name);
}

/* "* NAMESPACE ((prefix sep) ...) other shared": the first personal
 * namespace's prefix into out; 0, or -1 when r is something else. */
static int parse_namespace(const struct ms_imap_response *r, char *out,
			   size_t outsz)
{
	const struct ms_imap_arg *personal, *first;
	const char *p;

	if (r->kind != MS_RESP_UNTAGGED || r->argc < 2 ||
	    !ms_imap_arg_is(&r->args[0], "NAMESPACE"))
		return -1;
	personal = &r->args[1];
	if (personal->type != MS_ARG_LIST || personal->list_count == 0)
		return 0;	/* NIL: no personal namespace to speak of */
	first = &personal->list[0];
	if (first->type != MS_ARG_LIST || first->list_count < 1 ||
	    (p = ms_imap_arg_str(&first->list[0])) == NULL ||
	    strlen(p) >= outsz)
		return 0;
	snprintf(out, outsz, "%s", p);
	return 0;
}

int ms_mover_names_parse(const char *s, enum ms_mover_names *out)
{
	if (strcmp(s, "source") == 0)
		*out = MS_NAMES_SOURCE;
	else if (strcmp(s, "destination") == 0)
		*out = MS_NAMES_DESTINATION;
	else
		return -1;
	return 0;
}

static int has_attr(const struct ms_imap_arg *attrs, const char *a)
{
	if (attrs->type != MS_ARG_LIST)
		return 0;
	for (unsigned int i = 0; i < attrs->list_count; i++)
		if (ms_imap_arg_is(&attrs->list[i], a))
			return 1;
	return 0;
}

struct fjob *mv_find_folder(struct ujob *u, const char *name)
{
	for (unsigned int i = 0; i < u->nfolders; i++)
		if (strcmp(u->folders[i].src, name) == 0)
			return &u->folders[i];
	return NULL;
}

struct dfolder *mv_find_dfolder(struct ujob *u, const char *name)
{
	for (unsigned int i = 0; i < u->ndfolders; i++)
		if (strcmp(u->dfolders[i].name, name) == 0)
			return &u->dfolders[i];
	return NULL;
}

/* "* LIST (attrs) sep name" or "* LSUB ..." */
static int parse_list(const struct ms_imap_response *r, const char *verb,
		      const struct ms_imap_arg **attrs_r, char *sep_r,
		      const char **name_r)
{
	const char *s;

	if (r->kind != MS_RESP_UNTAGGED || r->status != MS_STATUS_NONE ||
	    r->argc < 4 || !ms_imap_arg_is(&r->args[0], verb) ||
	    r->args[1].type != MS_ARG_LIST)
		return -1;
	*attrs_r = &r->args[1];
	s = ms_imap_arg_str(&r->args[2]);
	*sep_r = s != NULL ? s[0] : '\0';
	*name_r = ms_imap_arg_str(&r->args[3]);
	return *name_r != NULL && strlen(*name_r) < 1024 ? 0 : -1;
}

static void on_plan_src_untagged(struct ms_imapc *c,
				 const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;
	const struct ms_imap_arg *attrs;
	const char *name;
	char sep;
	struct fjob *f;
	uint64_t n;

	if (parse_list(r, "LIST", &attrs, &sep, &name) == 0) {
		const char *sp;

		if (has_attr(attrs, "\\NonExistent"))
			return;
		f = mv_find_folder(u, name);
		if (f == NULL) {
			if (MS_ARRAY_ROOM(u->folders, u->nfolders,
					  u->capfolders, 16) < 0) {
				mv_job_fail(u, "out of memory");
				return;
			}
			f = &u->folders[u->nfolders++];
			memset(f, 0, sizeof(*f));
			snprintf(f->src, sizeof(f->src), "%s", name);
		}
		if (has_attr(attrs, "\\Noselect"))
			f->noselect = 1;
		if (has_attr(attrs, "\\Subscribed"))
			f->subscribed = 1;
		if (sep != '\0')
			u->src_sep = sep;
		sp = folder_special(c, attrs, name, u->src_prefix, u->src_sep);
		if (sp != NULL)
			snprintf(f->special, sizeof(f->special), "%s", sp);
		return;
	}
	if (parse_namespace(r, u->src_prefix, sizeof(u->src_prefix)) == 0)
		return;
	if (parse_list(r, "LSUB", &attrs, &sep, &name) == 0) {
		f = mv_find_folder(u, name);
		if (f != NULL)
			f->subscribed = 1;
		return;
	}
	if (r->kind == MS_RESP_UNTAGGED && r->argc >= 3 &&
	    ms_imap_arg_is(&r->args[0], "STATUS") &&
	    r->args[2].type == MS_ARG_LIST) {
		const struct ms_imap_arg *l = &r->args[2];

		name = ms_imap_arg_str(&r->args[1]);
		f = name != NULL ? mv_find_folder(u, name) : NULL;
		for (unsigned int i = 0; f != NULL && i + 1 < l->list_count; i += 2)
			if (ms_imap_arg_is(&l->list[i], "MESSAGES") &&
			    ms_imap_arg_number(&l->list[i + 1], &n) == 0)
				f->status_msgs = (uint32_t)n;
	}
}

static void on_plan_dst_untagged(struct ms_imapc *c,
				 const struct ms_imap_response *r, void *ctx)
{
	struct ujob *u = ctx;
	const struct ms_imap_arg *attrs;
	const char *name, *sp;
	char sep;
	struct dfolder *d;
	int lsub = 0;

	if (parse_namespace(r, u->dst_prefix, sizeof(u->dst_prefix)) == 0)
		return;
	if (parse_list(r, "LIST", &attrs, &sep, &name) < 0) {
		if (parse_list(r, "LSUB", &attrs, &sep, &name) < 0)
			return;
		lsub = 1;
	}
	d = mv_find_dfolder(u, name);
	if (d == NULL) {
		if (lsub || has_attr(attrs, "\\NonExistent"))
			return;
		if (MS_ARRAY_ROOM(u->dfolders, u->ndfolders, u->capdfolders,
				  16) < 0) {
			mv_job_fail(u, "out of memory");
			return;
		}
		d = &u->dfolders[u->ndfolders++];
		memset(d, 0, sizeof(*d));
		snprintf(d->name, sizeof(d->name), "%s", name);
	}
	if (lsub || has_attr(attrs, "\\Subscribed"))
		d->subscribed = 1;
	if (!lsub && has_attr(attrs, "\\Noselect"))
		d->noselect = 1;
	if (!lsub && sep != '\0')
		u->dst_sep = sep;
	if (!lsub && (sp = folder_special(c, attrs, name, u->dst_prefix,
					  u->dst_sep)) != NULL)
		snprintf(d->special, sizeof(d->special), "%s", sp);
}

/* A planning command's reply: 1 when the plan goes on, 0 when the job
 * failed (now, or before). A refusal with the response code ok_code (not
 * NULL) is as good as OK; cmd prefixes the message of another. */
static int plan_reply_ok(struct ujob *u, struct ms_imapc *c,
			 const struct ms_imap_response *r, const char *cmd,
			 const char *ok_code)
{
	char buf[400];

	if (u->failed)
		return 0;
	if (r == NULL) {
		mv_job_fail(u, "%s: %s", mv_side_name(&u->workers[0], c),
			    ms_imapc_error(c));
		return 0;
	}
	if (r->status != MS_STATUS_OK &&
	    !(ok_code != NULL && r->code != NULL &&
	      strcasecmp(r->code, ok_code) == 0)) {
		mv_job_fail(u, "%s: %s%s", mv_side_name(&u->workers[0], c),
			    cmd, ms_imapc_resp_summary(r, buf, sizeof(buf)));
		return 0;
	}
	return 1;
}

void mv_on_plan_reply(struct ms_imapc *c, const struct ms_imap_response *r,
		      void *ctx)
{
	struct ujob *u = ctx;

	if (plan_reply_ok(u, c, r, "", NULL) && --u->plan_pending == 0)
		mv_plan_step(u);
}

void mv_on_create_reply(struct ms_imapc *c, const struct ms_imap_response *r,
			void *ctx)
{
	struct ujob *u = ctx;

	/* A folder that exists already is what we wanted. */
	if (!plan_reply_ok(u, c, r, "CREATE: ", "ALREADYEXISTS"))
		return;
	if (r->status == MS_STATUS_OK)
		MS_CRASH_POINT(u->reverse ? "rollback.folder-created" :
			       "copy.folder-created");
	if (--u->plan_pending == 0)
		mv_plan_step(u);
}

/* 1 when the include/exclude patterns let the source folder src (mUTF-7)
 * through, 0 when not, -1 when out of memory. */
int mv_folder_wanted(struct ujob *u, const char *src)
{
	struct ms_mover *m = u->m;
	char utf8[1024], *pathname;
	int ret;

	/* Patterns name folders as the user sees them: no namespace prefix. */
	mv_to_utf8(utf8, sizeof(utf8), mv_unprefixed(src, u->src_prefix),
		   u->src_sep);
	/* Patterns see '/' as the separator, whatever the server's. */
	pathname = strdup(utf8);
	if (pathname == NULL)
		return -1;
	for (char *p = pathname; u->src_sep != '\0' && u->src_sep != '/' &&
	     *p != '\0'; p++)
		if (*p == u->src_sep)
			*p = '/';
	ret = (m->include == NULL || pattern_match(m->include, pathname)) &&
	      !pattern_match(m->exclude, pathname);
	free(pathname);
	return ret;
}

/* The destination's folder of special use special, or NULL. */
static const char *special_dst(struct ujob *u, const char *special)
{
	for (unsigned int j = 0; special[0] != '\0' && j < u->ndfolders; j++)
		if (strcasecmp(u->dfolders[j].special, special) == 0)
			return u->dfolders[j].name;
	return NULL;
}

/* The name src keeps on the destination (names = source): without the
 * source's namespace prefix, by the separator rule, with the
 * destination's prefix. 0, or -1 when out of memory. */
static int map_kept(struct ujob *u, const char *src, char *out, size_t outsz)
{
	char *t;

	if (strcasecmp(src, "INBOX") == 0) {
		snprintf(out, outsz, "INBOX");
		return 0;
	}
	t = ms_mailbox_translate(mv_unprefixed(src, u->src_prefix), u->src_sep,
				 u->dst_sep);
	if (t == NULL)
		return -1;
	snprintf(out, outsz, "%s%s", u->dst_prefix, t);
	free(t);
	return 0;
}

/* With names = destination, the special-use folder of the source that src
 * is below (the nearest one the destination has a folder of that use for),
 * or NULL. */
static const struct fjob *renamed_parent(struct ujob *u, const char *src)
{
	const struct fjob *best = NULL;
	size_t best_len = 0;

	if (u->src_sep == '\0' || u->dst_sep == '\0')
		return NULL;
	for (unsigned int i = 0; i < u->nfolders; i++) {
		const struct fjob *a = &u->folders[i];
		size_t n = strlen(a->src);

		if (n > best_len && strncmp(src, a->src, n) == 0 &&
		    src[n] == u->src_sep && special_dst(u, a->special)) {
			best = a;
			best_len = n;
		}
	}
	return best;
}

/* The destination name of the source folder src with special use special
 * ("" for none): with names = destination, the destination's folder of the
 * same use, and a folder below such a folder below its new name (the
 * source's "Sent/2019" the destination's "Sent Items/2019"); else the
 * name kept (map_kept). Returns 0, or -1 when out of memory. */
int mv_map_forward(struct ujob *u, const char *src, const char *special,
		   char *out, size_t outsz)
{
	const struct fjob *parent;
	const char *d;
	char *t;

	if (u->m->names != MS_NAMES_DESTINATION)
		return map_kept(u, src, out, outsz);
	if ((d = special_dst(u, special)) != NULL) {
		snprintf(out, outsz, "%s", d);
		return 0;
	}
	if ((parent = renamed_parent(u, src)) == NULL)
		return map_kept(u, src, out, outsz);
	t = ms_mailbox_translate(src + strlen(parent->src) + 1, u->src_sep,
				 u->dst_sep);
	if (t == NULL)
		return -1;
	snprintf(out, outsz, "%s%c%s", special_dst(u, parent->special),
		 u->dst_sep, t);
	free(t);
	return 0;
}

/* With names = destination, the name a folder had for the user's clients
 * when the move renamed it (map_kept), else "" (f->old). */
static int plan_old_name(struct ujob *u, struct fjob *f)
{
	f->old[0] = '\0';
	if (u->m->names != MS_NAMES_DESTINATION)
		return 0;
	if (map_kept(u, f->src, f->old, sizeof(f->old)) < 0)
		return -1;
	if (mv_name_eq(f->old, f->dst))
		f->old[0] = '\0';
	return 0;
}

/* Maps every selected source folder to its destination name; fails the job
 * on a collision (two source folders onto one destination folder). */
static int plan_names(struct ujob *u)
{
	for (unsigned int i = 0; i < u->nfolders; i++) {
		struct fjob *f = &u->folders[i];
		int wanted = mv_folder_wanted(u, f->src);

		if (wanted < 0)
			return -1;
		f->selected_by_plan = !f->noselect && wanted;
		if (!f->selected_by_plan)
			continue;
		if (mv_map_forward(u, f->src, f->special, f->dst,
				   sizeof(f->dst)) < 0 || plan_old_name(u, f) < 0)
			return -1;
		mv_to_utf8(f->rep.source, sizeof(f->rep.source), f->src,
			   u->src_sep);
		mv_to_utf8(f->rep.destination, sizeof(f->rep.destination), f->dst,
			   u->dst_sep);
	}
	for (unsigned int i = 0; i < u->nfolders; i++) {
		for (unsigned int j = i + 1; j < u->nfolders; j++) {
			struct fjob *a = &u->folders[i], *b = &u->folders[j];

			if (!a->selected_by_plan || !b->selected_by_plan)
				continue;
			if (mv_name_eq(a->dst, b->dst)) {
				mv_job_fail(u, "folders \"%s\" and \"%s\" would both "
					    "become \"%s\" on the destination; "
					 "nothing was merged (rename one, or "
					 "--exclude one)", a->rep.source,
					 b->rep.source, a->rep.destination);
				return -1;
			}
		}
	}
	return 0;
}

static int cmp_folder_size(const void *a, const void *b)
{
	const struct fjob *x = a, *y = b;

	/* Selected ones first, biggest first: the long poles start early. */
	if (x->selected_by_plan != y->selected_by_plan)
		return y->selected_by_plan - x->selected_by_plan;
	return x->status_msgs < y->status_msgs ? 1 :
	       x->status_msgs > y->status_msgs ? -1 : 0;
}

/* Both sides' namespaces into the store: the gateway shows the source's
 * prefix and separator to the user's clients after the move (those that
 * ignore NAMESPACE, offlineimap3, keep the names they knew). */
static int record_namespaces(struct ujob *u)
{
	struct ms_user_ns ns = { .src_sep = u->src_sep, .dst_sep = u->dst_sep };

	snprintf(ns.src_prefix, sizeof(ns.src_prefix), "%s", u->src_prefix);
	snprintf(ns.dst_prefix, sizeof(ns.dst_prefix), "%s", u->dst_prefix);
	return mv_store_check(u->workers, ms_store_namespace_set(u->m->store,
							   u->user_id, &ns));
}

void mv_plan_step(struct ujob *u)
{
	struct worker *w0 = &u->workers[0];
	struct ms_imapc *sc = mv_src_conn(w0), *dc = mv_dst_conn(w0);
	struct ms_mover *m = u->m;
	char q[2100];

	switch (u->planned) {
	case 0:
		/* Stage 1: LIST both sides, subscriptions, special-use. */
		u->planned = -1;
		ms_imapc_set_untagged(sc, on_plan_src_untagged, u);
		ms_imapc_set_untagged(dc, on_plan_dst_untagged, u);
		u->plan_pending = 4;
		for (struct ms_imapc *c = sc; c != NULL; c = c == sc ? dc : NULL) {
			/* The prefix first: LIST's answers are read with it. */
			if (ms_imapc_has_cap(c, "NAMESPACE")) {
				u->plan_pending++;
				ms_imapc_cmd(c, mv_on_plan_reply, u, "NAMESPACE");
			}
			if (ms_imapc_has_cap(c, "SPECIAL-USE"))
				ms_imapc_cmd(c, mv_on_plan_reply, u, "LIST \"\" "
					     "\"*\" RETURN (SPECIAL-USE)");
			else
				ms_imapc_cmd(c, mv_on_plan_reply, u,
					     "LIST \"\" \"*\"");
			ms_imapc_cmd(c, mv_on_plan_reply, u, "LSUB \"\" \"*\"");
		}
		return;
	case -1:
		/* Stage 2: names, STATUS of each source folder, CREATE and
		 * SUBSCRIBE what the destination lacks. */
		u->planned = -2;
		if (u->src_sep == '\0')
			u->src_sep = ms_imapc_separator(sc);
		if (u->dst_sep == '\0')
			u->dst_sep = ms_imapc_separator(dc);
		if (u->reverse) {
			mv_rb_plan(u);
			return;
		}
		if (plan_names(u) < 0) {
			if (!u->failed)
				mv_job_fail(u, "out of memory");
			return;
		}
		if (!m->verify_only && record_namespaces(u) < 0)
			return;
		u->plan_pending = 1;
		for (unsigned int i = 0; i < u->nfolders; i++) {
			struct fjob *f = &u->folders[i];
			struct dfolder *d;

			if (!f->selected_by_plan)
				continue;
			if (ms_imap_quote(q, sizeof(q), f->src) == 0) {
				u->plan_pending++;
				ms_imapc_cmd(w0->s, mv_on_plan_reply, u,
					     "STATUS %s (MESSAGES)", q);
			}
			if (ms_imap_quote(q, sizeof(q), f->dst) < 0) {
				mv_job_fail(u, "folder \"%s\": name cannot be sent",
					    f->rep.source);
				return;
			}
			d = mv_find_dfolder(u, f->dst);
			if (m->verify_only) {
				/* Look, touch nothing. */
				f->dst_missing = d == NULL &&
						 strcasecmp(f->dst, "INBOX") != 0;
				continue;
			}
			if (d == NULL && strcasecmp(f->dst, "INBOX") != 0) {
				u->plan_pending++;
				ms_imapc_cmd(w0->d, mv_on_create_reply, u,
					     "CREATE %s", q);
			}
			if (f->subscribed && (d == NULL || !d->subscribed)) {
				u->plan_pending++;
				ms_imapc_cmd(w0->d, mv_on_plan_reply, u,
					     "SUBSCRIBE %s", q);
			} else if (!f->subscribed && d != NULL && d->subscribed) {
				/* Mirror the source: unsubscribed stays so. */
				u->plan_pending++;
				ms_imapc_cmd(w0->d, mv_on_plan_reply, u,
					     "UNSUBSCRIBE %s", q);
			}
		}
		if (--u->plan_pending == 0)
			mv_plan_step(u);
		return;
	case -2:
		/* Stage 3: go. */
		mv_sort_n(u->folders, u->nfolders, sizeof(*u->folders),
		      cmp_folder_size);
		u->planned = 1;
		for (unsigned int i = 0; i < u->nfolders; i++) {
			struct fjob *f = &u->folders[i];

			if (!f->selected_by_plan) {
				u->folders_done++;
				continue;
			}
			m->folders++;
			if (m->verify_only) {
				if (mv_vo_plan_folder(u, f) < 0)
					return;
				continue;
			}
			if (ms_store_folder_get(m->store, u->user_id, f->src,
						&f->st) < 0) {
				mv_job_fail(u, "store: %s", ms_store_error(m->store));
				return;
			}
			/* (a rollback counts its messages when it has
			 * scanned the folder) */
			if (!u->reverse)
				m->msgs_todo += f->status_msgs > f->st.msgs ?
					f->status_msgs - f->st.msgs : 0;
		}
		ms_imapc_set_untagged(w0->s, mv_on_src_untagged, w0);
		ms_imapc_set_untagged(w0->d, mv_on_dst_untagged, w0);
		w0->state = W_IDLE;
		mv_start_workers(u);
		mv_job_schedule(u);
		return;
	}
}
