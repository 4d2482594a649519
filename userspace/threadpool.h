/* threadpool.h - a small pthread pool for the CPU backend: run one function over N tasks on all
 * threads and wait.
 *
 * The calling thread is worker 0 and works too; nthreads - 1 helper threads sleep between jobs
 * (a short spin first, then a condition variable), so an idle pool costs nothing.  Tasks are
 * handed out one at a time from an atomic counter: any task may run on any worker, so a task
 * must depend only on its index (use the worker index only to pick per-thread scratch).
 *
 * One thread submits at a time (the engine's owner); q3_pool_run is not reentrant.
 */
#pragma once

#include "util.h"

struct q3_pool;

typedef void (*q3_task_fn)(void *ctx, int task, int worker);

/* nthreads >= 1 workers in all, the caller included. */
int q3_pool_new(int nthreads, struct q3_pool **out, q3_err *e);
void q3_pool_free(struct q3_pool *p);
int q3_pool_size(const struct q3_pool *p);

/* Runs fn(ctx, i, worker) for every i in [0, ntasks) and returns when all have finished. */
void q3_pool_run(struct q3_pool *p, int ntasks, q3_task_fn fn, void *ctx);
