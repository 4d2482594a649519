/* threadpool.c - the CPU backend's pthread pool (see threadpool.h). */
#include "threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* How long a thread polls before it sleeps: enough to catch the next op of a forward pass
 * (the serial work between two ops is short), short enough not to burn a core between requests. */
#define SPIN_SECONDS 200e-6

struct helper {
	struct q3_pool *p;
	int worker;
	pthread_t th;
};

/* The job word packs the generation, the task count and the next task to hand out, so that a
 * helper can claim a task of the current job with one compare-and-swap and can never claim one
 * of a job that is over or not yet published.  The caller waits for tasks to finish, not for
 * helpers to check in: a helper that sleeps through a short job costs nothing. */
#define NEXT_BITS 20
#define COUNT_BITS 20
#define TASK_MAX ((1u << NEXT_BITS) - 1)
#define W_NEXT(w) ((uint32_t)((w) & TASK_MAX))
#define W_COUNT(w) ((uint32_t)(((w) >> NEXT_BITS) & TASK_MAX))
#define W_GEN(w) ((w) >> (NEXT_BITS + COUNT_BITS))
#define W_MAKE(gen, count, next) \
	(((uint64_t)(gen) << (NEXT_BITS + COUNT_BITS)) | ((uint64_t)(count) << NEXT_BITS) | (uint64_t)(next))

struct q3_pool {
	int n;
	struct helper *helpers; /* [n - 1] */
	int started;
	pthread_mutex_t mu;
	pthread_cond_t wake, done;
	/* the current job: fn and ctx are written before the job word publishes them */
	q3_task_fn fn;
	void *ctx;
	_Atomic uint64_t job;
	atomic_int finished; /* tasks of the current job that have returned */
	atomic_int sleepers; /* helpers blocked on wake */
	atomic_bool waiting; /* the caller is blocked on done */
	atomic_bool stop;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* Polls cond(p) for up to SPIN_SECONDS; returns its last value. */
static bool spin_until(bool (*cond)(struct q3_pool *p, uint64_t arg), struct q3_pool *p, uint64_t arg)
{
	double end = 0;

	for (unsigned i = 0;; i++) {
		if (cond(p, arg))
			return true;
		if ((i & 63) == 0) {
			double now = q3_now();

			if (!end)
				end = now + SPIN_SECONDS;
			else if (now > end)
				return false;
		}
		cpu_relax();
	}
}

static bool new_job_or_stop(struct q3_pool *p, uint64_t seen)
{
	return W_GEN(atomic_load(&p->job)) != seen || atomic_load(&p->stop);
}

static bool all_finished(struct q3_pool *p, uint64_t ntasks)
{
	return atomic_load(&p->finished) >= (int)ntasks;
}

/* Claims a task of job generation gen: its index, or -1 when none is left. */
static int claim(struct q3_pool *p, uint64_t gen)
{
	uint64_t w = atomic_load(&p->job);

	while (W_GEN(w) == gen && W_NEXT(w) < W_COUNT(w))
		if (atomic_compare_exchange_weak(&p->job, &w, w + 1))
			return (int)W_NEXT(w);
	return -1;
}

static void work(struct q3_pool *p, uint64_t gen, int worker)
{
	int i;

	while ((i = claim(p, gen)) >= 0) {
		p->fn(p->ctx, i, worker);
		if (atomic_fetch_add(&p->finished, 1) + 1 == (int)W_COUNT(atomic_load(&p->job)) &&
		    atomic_load(&p->waiting)) {
			pthread_mutex_lock(&p->mu);
			pthread_cond_signal(&p->done);
			pthread_mutex_unlock(&p->mu);
		}
	}
}

static void *helper_main(void *arg)
{
	struct helper *h = arg;
	struct q3_pool *p = h->p;
	uint64_t seen = 0;

	for (;;) {
		if (!spin_until(new_job_or_stop, p, seen)) {
			pthread_mutex_lock(&p->mu);
			atomic_fetch_add(&p->sleepers, 1);
			while (W_GEN(atomic_load(&p->job)) == seen && !atomic_load(&p->stop))
				pthread_cond_wait(&p->wake, &p->mu);
			atomic_fetch_sub(&p->sleepers, 1);
			pthread_mutex_unlock(&p->mu);
		}
		if (atomic_load(&p->stop))
			return NULL;
		seen = W_GEN(atomic_load(&p->job));
		work(p, seen, h->worker);
	}
}

int q3_pool_new(int nthreads, struct q3_pool **out, q3_err *e)
{
	struct q3_pool *p;
	int err;

	*out = NULL;
	if (nthreads < 1)
		return q3_errf(e, -EINVAL, "thread pool: %d threads", nthreads);
	p = calloc(1, sizeof(*p));
	if (!p)
		return q3_errf(e, -ENOMEM, "out of memory");
	p->n = nthreads;
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->wake, NULL);
	pthread_cond_init(&p->done, NULL);
	p->helpers = calloc((size_t)nthreads, sizeof(*p->helpers));
	if (!p->helpers) {
		q3_pool_free(p);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	for (int i = 0; i < nthreads - 1; i++) {
		p->helpers[i].p = p;
		p->helpers[i].worker = i + 1;
		err = pthread_create(&p->helpers[i].th, NULL, helper_main, &p->helpers[i]);
		if (err) {
			q3_pool_free(p);
			return q3_errf(e, -err, "thread pool: pthread_create: %s", strerror(err));
		}
		p->started++;
	}
	*out = p;
	return 0;
}

void q3_pool_free(struct q3_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->stop, true);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->mu);
	for (int i = 0; i < p->started; i++)
		pthread_join(p->helpers[i].th, NULL);
	pthread_cond_destroy(&p->wake);
	pthread_cond_destroy(&p->done);
	pthread_mutex_destroy(&p->mu);
	free(p->helpers);
	free(p);
}

int q3_pool_size(const struct q3_pool *p)
{
	return p->n;
}

struct offset_job {
	q3_task_fn fn;
	void *ctx;
	int off;
};

static void offset_task(void *ctx, int task, int worker)
{
	struct offset_job *o = ctx;

	o->fn(o->ctx, o->off + task, worker);
}

void q3_pool_run(struct q3_pool *p, int ntasks, q3_task_fn fn, void *ctx)
{
	uint64_t gen;

	if (ntasks <= 0)
		return;
	if (p->n == 1 || ntasks == 1) {
		for (int i = 0; i < ntasks; i++)
			fn(ctx, i, 0);
		return;
	}
	if (ntasks > (int)TASK_MAX) { /* more than one job word holds: several jobs */
		struct offset_job o = { fn, ctx, 0 };

		for (; o.off < ntasks; o.off += (int)TASK_MAX)
			q3_pool_run(p, Q3_MIN((int)TASK_MAX, ntasks - o.off), offset_task, &o);
		return;
	}
	p->fn = fn;
	p->ctx = ctx;
	atomic_store(&p->finished, 0);
	gen = W_GEN(atomic_load(&p->job)) + 1;
	atomic_store(&p->job, W_MAKE(gen, ntasks, 0));
	if (atomic_load(&p->sleepers)) {
		pthread_mutex_lock(&p->mu);
		pthread_cond_broadcast(&p->wake);
		pthread_mutex_unlock(&p->mu);
	}

	work(p, gen, 0);

	if (!spin_until(all_finished, p, (uint64_t)ntasks)) {
		pthread_mutex_lock(&p->mu);
		atomic_store(&p->waiting, true);
		while (atomic_load(&p->finished) < ntasks)
			pthread_cond_wait(&p->done, &p->mu);
		atomic_store(&p->waiting, false);
		pthread_mutex_unlock(&p->mu);
	}
}
