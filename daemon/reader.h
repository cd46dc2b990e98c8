/* The store's reader: threads, each with a store connection of its own,
 * for the reads a session makes on the way to the destination (the
 * user's folders for the IMAP view, the INBOX's records for POP3 UIDLs,
 * the pairs of a folder being selected), so that the event loop never
 * waits on the database for them (docs/design.md, "The store's reader").
 *
 * The loop hands in a read: work() runs on one of the reader's threads
 * with that thread's store and fills its argument; done() then runs on
 * the loop. Reads start in the order given, each on the first thread
 * free; each is answered when it is done, so a slow read holds up only
 * its own thread (with one thread, reads are answered in the order
 * given). A read whose asker went away is cancelled: its work may still
 * run, then drop() frees the argument and done() is not called.
 *
 * Only its thread touches a store after ms_reader_new(); the argument
 * belongs to work() until done() or drop() is called.
 */
#ifndef MS_READER_H
#define MS_READER_H

#include <stddef.h>

#include <uv.h>

struct ms_store;
struct ms_reader;
struct ms_read;

/* On the reader's thread: 0, or -1 with err set. */
typedef int ms_read_work_fn(struct ms_store *store, void *arg, char *err,
			    size_t errsz);
/* On the loop: error NULL when work() returned 0. */
typedef void ms_read_done_fn(void *arg, const char *error);
typedef void ms_read_drop_fn(void *arg);

/* work() run here and now with store (the reader's thread runs each read
 * so; a caller without a reader too): its return, err set on failure (the
 * store's error when work() said nothing). */
int ms_read_now(struct ms_store *store, ms_read_work_fn *work, void *arg,
		char *err, size_t errsz);

#define MS_READERS_MAX	16

/* Takes the n stores (closed by ms_reader_free(), or here on failure; the
 * array's slots are set to NULL) and starts a thread for each: n from 1
 * to MS_READERS_MAX. */
int ms_reader_new(uv_loop_t *loop, struct ms_store **stores, unsigned int n,
		  struct ms_reader **r_out, char *err, size_t errsz);
/* Stops the threads (after the reads they run) and drops every read not
 * done; the loop must run once more to close the reader's handle. */
void ms_reader_free(struct ms_reader *r);

/* NULL when out of memory (nothing was called). */
struct ms_read *ms_read_start(struct ms_reader *r, ms_read_work_fn *work,
			      ms_read_done_fn *done, ms_read_drop_fn *drop,
			      void *arg);
void ms_read_cancel(struct ms_read *rd);

/* Reads given and not yet done (for tests and status). */
unsigned int ms_reader_pending(const struct ms_reader *r);

#endif
