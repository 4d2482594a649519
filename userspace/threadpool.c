/* threadpool.c - the CPU backend's pthread pool (see threadpool.h). */
#include "threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Iterations a thread polls before it sleeps: a few microseconds, enough to catch the next op
 * of a forward pass without burning a core between requests. */
#define SPIN 4000

struct helper {
	struct q3_pool *p;
	int worker;
	pthread_t th;
};

struct q3_pool {
	int n;
	struct helper *helpers; /* [n - 1] */
	int started;
	pthread_mutex_t mu;
	pthread_cond_t wake, done;
	/* the current job, written before gen is bumped */
	q3_task_fn fn;
	void *ctx;
	int ntasks;
	atomic_int next;    /* next task index to hand out */
	atomic_int pending; /* helpers that have not finished the current job */
	atomic_uint gen;    /* job generation */
	atomic_bool stop;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static void work(struct q3_pool *p, int worker)
{
	int i;

	while ((i = atomic_fetch_add(&p->next, 1)) < p->ntasks)
		p->fn(p->ctx, i, worker);
}

static void *helper_main(void *arg)
{
	struct helper *h = arg;
	struct q3_pool *p = h->p;
	unsigned seen = 0;

	for (;;) {
		int spin = 0;

		while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop) && spin++ < SPIN)
			cpu_relax();
		if (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) {
			pthread_mutex_lock(&p->mu);
			while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop))
				pthread_cond_wait(&p->wake, &p->mu);
			pthread_mutex_unlock(&p->mu);
		}
		if (atomic_load(&p->stop))
			return NULL;
		seen = atomic_load(&p->gen);
		work(p, h->worker);
		if (atomic_fetch_sub(&p->pending, 1) == 1) {
			pthread_mutex_lock(&p->mu);
			pthread_cond_signal(&p->done);
			pthread_mutex_unlock(&p->mu);
		}
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

void q3_pool_run(struct q3_pool *p, int ntasks, q3_task_fn fn, void *ctx)
{
	int spin = 0;

	if (ntasks <= 0)
		return;
	if (p->n == 1 || ntasks == 1) {
		for (int i = 0; i < ntasks; i++)
			fn(ctx, i, 0);
		return;
	}
	p->fn = fn;
	p->ctx = ctx;
	p->ntasks = ntasks;
	atomic_store(&p->next, 0);
	atomic_store(&p->pending, p->n - 1);
	pthread_mutex_lock(&p->mu);
	atomic_fetch_add(&p->gen, 1);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->mu);

	work(p, 0);

	while (atomic_load(&p->pending) > 0 && spin++ < SPIN)
		cpu_relax();
	if (atomic_load(&p->pending) > 0) {
		pthread_mutex_lock(&p->mu);
		while (atomic_load(&p->pending) > 0)
			pthread_cond_wait(&p->done, &p->mu);
		pthread_mutex_unlock(&p->mu);
	}
}
