/* xpool.h - the CPU expert threads: a pool of workers, each bound to one core of the chosen NUMA
 * node, running phased jobs.
 *
 * A job is a few phases; in each, the workers take task indices from a shared counter, and the
 * next phase starts when every worker has finished the previous one (a spinning barrier: the
 * workers own their cores while serving, and a phase lasts tens of microseconds; a phase with no
 * tasks has no barrier after it).  Between jobs a
 * worker spins for a while (spin_us), then sleeps on a condition variable, so an idle server
 * costs nothing.
 *
 * The caller does not compute: it posts a job and either waits (q3_xpool_run) or goes on with
 * other work (the GPU thread) and waits later.  For the GPU handoff a job can be armed ahead of
 * its data: the workers wait until a gate word (host memory the GPU writes) reaches a value,
 * and when the job is done they store a value into a done word (host-mapped memory the GPU
 * waits on with cuStreamWaitValue32).  Gate and done values compare as wrapping sequence
 * numbers (gate open when (int32_t)(*gate - value) >= 0).
 *
 * One thread posts (the engine's owner); at most one job is in flight.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

struct q3_xpool;

#define Q3_XPOOL_MAX_PHASES 8

struct q3_xjob {
	int nphases;
	/* Tasks of phase p; every worker calls it at the start of the phase, after the barrier, so
	 * it may depend on what earlier phases wrote (it must give every worker the same count). */
	int (*ntasks)(void *ctx, int phase);
	void (*task)(void *ctx, int phase, int task, int worker);
	void *ctx;
	/* optional: start when the gate opens; give up after gate_timeout_s seconds (0: 10 s) */
	const volatile uint32_t *gate;
	uint32_t gate_value;
	double gate_timeout_s;
	/* optional: stored (release) when every phase has finished, even after a gate timeout */
	volatile uint32_t *done;
	uint32_t done_value;
};

struct q3_xpool_opts {
	int nthreads;	 /* workers (>= 1); with cpus, at most ncpus */
	const int *cpus; /* OS CPU numbers to bind worker i to cpus[i]; NULL: unbound */
	int ncpus;
	int spin_us;	 /* how long an idle worker polls before sleeping (0: 200 us) */
	int wait_spin_us; /* how long q3_xpool_wait polls before sleeping (0: spin_us; -1: not at
			   * all, for a caller that shares a core with a worker) */
};

/* Starts the workers.  A CPU that cannot be bound (outside the allowed set) is reported by
 * q3_xpool_bound, not an error. */
int q3_xpool_new(const struct q3_xpool_opts *o, struct q3_xpool **out, q3_err *e);
void q3_xpool_free(struct q3_xpool *p);

int q3_xpool_size(const struct q3_xpool *p);
/* Workers actually bound to their CPU. */
int q3_xpool_bound(const struct q3_xpool *p);

/* Posts a job (-EBUSY while one is in flight).  The job struct is copied; ctx must stay valid
 * until the job is done. */
int q3_xpool_post(struct q3_xpool *p, const struct q3_xjob *job);
/* Waits for the posted job: 0, -ETIMEDOUT if its gate never opened (its phases did not run),
 * or 0 at once when nothing is in flight. */
int q3_xpool_wait(struct q3_xpool *p);
/* True when no job is in flight (the posted one has finished). */
bool q3_xpool_idle(struct q3_xpool *p);
/* post + wait. */
int q3_xpool_run(struct q3_xpool *p, const struct q3_xjob *job);

/* Runs fn(ctx, worker) once on every worker (e.g. to first-touch per-worker memory on its node). */
int q3_xpool_each(struct q3_xpool *p, void (*fn)(void *ctx, int worker), void *ctx);
