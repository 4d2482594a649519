/* tune.h - picks the fastest of a few settings of a repeated call by timing calls made with each.
 *
 * A trial runs the settings round-robin (so a drift in the machine's speed hits them alike), `per`
 * calls each, and keeps the one with the lowest median time; `recheck` calls later it tries
 * again (the best setting moves with the load: on the H200 test machine the GPU's share of the
 * offloaded experts was worth +20% on one machine and -12% on another).  No allocation; the
 * caller times the calls.
 */
#pragma once
#include <stdint.h>

#define Q3_TUNE_MAX_SETTINGS 9
#define Q3_TUNE_MAX_PER 16

struct q3_tune {
	int n, per;		 /* settings 0 .. n - 1, calls a setting in a trial */
	uint64_t recheck;	 /* calls between trials */
	uint64_t calls;		 /* timed so far */
	uint64_t next_trial;	 /* calls at which the next trial starts */
	int best;		 /* the setting outside trials (0 until the first trial ends) */
	int in_trial;		 /* calls of the current trial so far, -1: none */
	int cur;		 /* the setting q3_tune_next gave */
	float t[Q3_TUNE_MAX_SETTINGS][Q3_TUNE_MAX_PER];
};

/* n settings (1 .. Q3_TUNE_MAX_SETTINGS), per calls each (1 .. Q3_TUNE_MAX_PER); the first trial
 * starts at once. */
void q3_tune_init(struct q3_tune *t, int n, int per, uint64_t recheck);
/* The setting for the next call. */
int q3_tune_next(struct q3_tune *t);
/* That call took `seconds`. */
void q3_tune_done(struct q3_tune *t, double seconds);
