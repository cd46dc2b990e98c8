/* The survey: mailshiftd asks the source how big each not-yet-moved
 * user's mailbox is, one user at a time at a low rate, logging in with the
 * sweep's admin login, and keeps the answer in the store (user_sizes) for
 * the site's ETA (site_eta.h). See docs/mover.md, "The site's ETA". */
#ifndef MS_SURVEY_H
#define MS_SURVEY_H

#include <uv.h>

#include "server.h"
#include "mover.h"
#include "store.h"

struct ms_survey;

/* Starts surveying: one user each 60 / per_minute seconds. src is the
 * source's IMAP server with its admin login (admin and password set);
 * its strings must outlive the survey. mover, when not NULL, lends its
 * connection to the source (a slot of its budget, taken only when no copy
 * waits for one) and its pace; it must outlive the survey. NULL when out
 * of memory. */
struct ms_survey *ms_survey_new(uv_loop_t *loop, struct ms_store *store,
				const struct ms_server_cfg *src,
				unsigned int per_minute, struct ms_mover *mover);
void ms_survey_free(struct ms_survey **sv);
/* PostgreSQL: the next user is looked for on the cluster's connection
 * (cluster.c), not the store's blocking one; c outlives sv. */
struct ms_cluster;
void ms_survey_set_cluster(struct ms_survey *sv, struct ms_cluster *c);

#endif
