/* worker.h - the inference worker: one thread that owns the engine, every session, the samplers
 * and the saved-state cache, and runs all admitted generations together.
 *
 * HTTP threads build a job (prompt ids, sampling, limits, stop strings) and submit it.  The
 * worker admits queued jobs into free batch slots (max_batch), restores the longest saved state
 * whose tokens prefix the prompt, and loops:
 *     one prefill chunk (prefill_chunk tokens of the oldest job still reading its prompt)
 *     one decode step   (q3_engine_decode over every job that is generating)
 * so a long prompt delays running generations by at most one chunk per token.  Each sampled
 * token is detokenized (whole UTF-8 characters only) and checked against the eos ids and the stop
 * strings; the text that is certain goes into the job, and the HTTP thread waiting on it wakes.
 *
 * Saved states (snapcache.h): after a prompt's first n-1 tokens (so that the same prompt again,
 * or any extension of it, has a token left to compute), and at the end of a generation (prompt
 * plus the generated tokens the session consumed: the next turn of a chat extends it).  Reuse
 * never changes the output: the sampler's draws depend only on the seed and the step.
 *
 * A job is shared by its submitter and the worker (reference counted).  The submitter may set
 * `cancel` at any time (client gone); the worker then ends the job at its next step.
 */
#pragma once
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "api_request.h"
#include "sampler.h"
#include "util.h"

struct q3_engine;
struct q3_tok;
struct q3_metrics;
struct q3_worker;

enum q3_finish { Q3_FINISH_NONE, Q3_FINISH_STOP, Q3_FINISH_LENGTH, Q3_FINISH_CANCELLED, Q3_FINISH_ERROR };

struct q3_job {
	/* input: set before submit, read-only afterwards */
	int32_t *prompt; /* [nprompt], owned by the job */
	int nprompt;
	struct q3_sampling samp; /* samp.bias points into bias */
	struct q3_logit_bias *bias;
	int max_tokens; /* >= 1 */
	char *stop[Q3_API_MAX_STOP];
	int nstop;

	/* output: under mu; cv is signalled when text grows and when done is set */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	char *text; /* generated text so far (stop strings and eos excluded), NUL-terminated */
	size_t len, cap;
	int ntokens;   /* completion tokens (the eos token included when it ended the job) */
	int cached;    /* prompt tokens restored from a saved state */
	bool done;
	enum q3_finish finish;
	char error[256]; /* Q3_FINISH_ERROR: why */
	double t_queued, t_first, t_done;

	atomic_bool cancel;
	atomic_int refs;
};

/* A job holding a copy of prompt, with one reference (the caller's). */
struct q3_job *q3_job_new(const int32_t *prompt, int nprompt, const struct q3_sampling *samp,
			  int max_tokens, const char *const *stop, int nstop);
/* Drops a reference; the last one frees the job. */
void q3_job_put(struct q3_job *j);
/* Waits until the job's text is longer than `seen` bytes or the job is done, at most timeout_s.
 * Returns true if either holds (the caller then reads the fields under mu). */
bool q3_job_wait(struct q3_job *j, size_t seen, double timeout_s);

struct q3_worker_opts {
	struct q3_engine *eng;
	const struct q3_tok *tok;
	struct q3_metrics *metrics; /* may be NULL */
	int cache_entries;	    /* saved states kept (0: no reuse) */
	int prefill_chunk;	    /* prompt tokens per step (>= 1) */
	int max_queue;		    /* jobs queued or running before submit refuses */
	const int32_t *eos;	    /* ids that end a generation */
	int neos;
};

/* Allocates the slots (sessions, samplers, logits) and starts the thread. */
int q3_worker_start(const struct q3_worker_opts *o, struct q3_worker **out, q3_err *e);
/* Queues j (takes a reference).  -EAGAIN when max_queue jobs are already waiting or running,
 * -ESHUTDOWN once stopping. */
int q3_worker_submit(struct q3_worker *w, struct q3_job *j);
/* Jobs queued and running. */
int q3_worker_load(struct q3_worker *w);
/* Settings that may change while running (SIGHUP). */
void q3_worker_set_limits(struct q3_worker *w, int prefill_chunk, int max_queue);
/* Cancels what is left and joins the thread; later submits get -ESHUTDOWN.  Jobs still held by
 * HTTP threads stay valid (reference counted). */
void q3_worker_stop(struct q3_worker *w);
/* Frees the worker (stopping it first if needed); the engine stays the caller's. */
void q3_worker_free(struct q3_worker *w);
