/* progress.h - a byte-count progress line for long operations (model loading, model writing).
 *
 * On a terminal it redraws one line on stderr at most every 200 ms:
 *   "load  12.3 / 45.1 GB  [#######.............]  27%  1.25 GB/s  ETA 26 s"
 * and q3_progress_end erases it, so that the caller prints its own one-line summary.  When stderr
 * is not a terminal it prints nothing (logs and CI output stay one line per operation).
 * Updates may come from any thread: the byte counter is atomic, and only the thread that wins the
 * redraw slot writes.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

struct q3_progress {
	const char *what;	/* short label: "load", "mkmodel" */
	uint64_t total;		/* bytes expected */
	uint64_t done;		/* bytes so far (atomic) */
	double t0;		/* q3_now() at start */
	double next_draw;	/* (atomic, as bits) time of the next redraw */
	bool tty;		/* stderr is a terminal and drawing is on */
	char extra[64];		/* optional suffix ("shard 3/9"), set by the caller */
};

/* Starts a progress line; enabled says whether the caller wants one at all (e.g. not --quiet). */
void q3_progress_begin(struct q3_progress *p, const char *what, uint64_t total, bool enabled);
/* Adds n bytes and redraws when due. */
void q3_progress_add(struct q3_progress *p, uint64_t n);
/* Sets the byte count (for callers that track it themselves) and redraws when due. */
void q3_progress_set(struct q3_progress *p, uint64_t done);
/* Erases the line (terminal only). */
void q3_progress_end(struct q3_progress *p);
