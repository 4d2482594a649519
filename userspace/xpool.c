/* xpool.c - the CPU expert threads (see xpool.h).
 *
 * Job lifecycle: the poster resets the per-job counters, copies the job and bumps gen (waking
 * sleepers).  Each worker runs the phases; worker 0 alone watches the gate and publishes the
 * outcome (gate_ok, then gate_gen = gen) to the others.  Every worker leaving the job
 * increments `left`; the one that makes it n is the last to touch the job, so it completes it:
 * stores the done word, publishes `finished = gen` and wakes a sleeping waiter.  Only then may
 * the next job be posted, so the counters are never reset under a running worker.
 */
#include "xpool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct worker {
	struct q3_xpool *p;
	int idx, cpu;
	pthread_t th;
};

struct q3_xpool {
	int n, nstarted;
	struct worker *w;
	double spin_s, wait_spin_s;
	pthread_mutex_t mu;
	pthread_cond_t wake, done;
	int sleepers;	/* workers waiting on wake (under mu) */
	bool waiter;	/* the poster waits on done (under mu) */
	atomic_uint gen;	/* jobs posted */
	atomic_uint finished;	/* gen of the last completed job */
	atomic_uint gate_gen;	/* the job worker 0 has judged the gate of ... */
	atomic_bool gate_ok;	/* ... and its verdict (written first) */
	atomic_int bound, alive;
	atomic_bool stop;
	int result;		/* of the last completed job */
	/* the current job */
	struct q3_xjob job;
	void (*each)(void *ctx, int worker);
	atomic_int next[Q3_XPOOL_MAX_PHASES], arrived[Q3_XPOOL_MAX_PHASES];
	atomic_int left;
};

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* A wait inside a job: poll, and past a few thousand polls let the CPU go, in case the thread
 * waited for shares this core (more workers than free cores). */
static inline void relax_n(unsigned *n)
{
	if (++*n < 4096)
		relax();
	else
		sched_yield();
}

/* Spins until pred holds, checking the clock every 256 polls; false on timeout. */
#define SPIN_UNTIL(pred, timeout_s)                                                              \
	({                                                                                       \
		double _end = -1;                                                                \
		bool _ok = true;                                                                 \
		for (unsigned _i = 1; !(pred); _i++) {                                           \
			relax();                                                                 \
			if (_i % 256 == 0) {                                                     \
				double _t = q3_now();                                            \
				if (_end < 0)                                                    \
					_end = _t + (timeout_s);                                 \
				else if (_t > _end) {                                            \
					_ok = false;                                             \
					break;                                                   \
				}                                                                \
			}                                                                        \
		}                                                                                \
		_ok;                                                                             \
	})

static bool gate_open(const struct q3_xjob *j)
{
	uint32_t v = __atomic_load_n(j->gate, __ATOMIC_ACQUIRE);

	return (int32_t)(v - j->gate_value) >= 0;
}

/* Worker 0 decides whether the gate opened; the others follow its verdict. */
static bool pass_gate(struct q3_xpool *p, int w, unsigned gen)
{
	const struct q3_xjob *j = &p->job;

	if (!j->gate)
		return true;
	if (w == 0) {
		double t = j->gate_timeout_s > 0 ? j->gate_timeout_s : 10.0;
		bool ok = SPIN_UNTIL(gate_open(j), t);

		atomic_store(&p->gate_ok, ok);
		atomic_store(&p->gate_gen, gen);
		return ok;
	}
	unsigned n = 0;

	while (atomic_load(&p->gate_gen) != gen)
		relax_n(&n);
	return atomic_load(&p->gate_ok);
}

static void complete(struct q3_xpool *p, unsigned gen, int result)
{
	p->result = result;
	if (p->job.done)
		__atomic_store_n(p->job.done, p->job.done_value, __ATOMIC_RELEASE);
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->finished, gen);
	if (p->waiter)
		pthread_cond_signal(&p->done);
	pthread_mutex_unlock(&p->mu);
}

static void run_job(struct q3_xpool *p, int w, unsigned gen)
{
	const struct q3_xjob *j = &p->job;
	int result = 0;

	if (p->each) {
		p->each(j->ctx, w);
	} else if (!pass_gate(p, w, gen)) {
		result = -ETIMEDOUT;
	} else {
		for (int ph = 0; ph < j->nphases; ph++) {
			int n = j->ntasks(j->ctx, ph), i;

			while ((i = atomic_fetch_add(&p->next[ph], 1)) < n)
				j->task(j->ctx, ph, i, w);
			if (ph + 1 == j->nphases)
				break; /* the last barrier is `left` */
			if (n == 0)
				continue; /* an empty phase: the barrier before it holds (every worker saw 0) */
			unsigned spins = 0;

			atomic_fetch_add(&p->arrived[ph], 1);
			while (atomic_load(&p->arrived[ph]) < p->n)
				relax_n(&spins);
		}
	}
	if (atomic_fetch_add(&p->left, 1) + 1 == p->n)
		complete(p, gen, result);
}

static void *worker_main(void *arg)
{
	struct worker *wk = arg;
	struct q3_xpool *p = wk->p;
	unsigned seen = 0;

	if (wk->cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(wk->cpu, &set);
		if (!pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
			atomic_fetch_add(&p->bound, 1);
	}
	atomic_fetch_add(&p->alive, 1);
	for (;;) {
		if (!SPIN_UNTIL(atomic_load(&p->gen) != seen || atomic_load(&p->stop), p->spin_s)) {
			pthread_mutex_lock(&p->mu);
			p->sleepers++;
			while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop))
				pthread_cond_wait(&p->wake, &p->mu);
			p->sleepers--;
			pthread_mutex_unlock(&p->mu);
		}
		if (atomic_load(&p->stop))
			return NULL;
		seen = atomic_load(&p->gen);
		run_job(p, wk->idx, seen);
	}
}

int q3_xpool_new(const struct q3_xpool_opts *o, struct q3_xpool **out, q3_err *e)
{
	struct q3_xpool *p;
	int err;

	*out = NULL;
	if (o->nthreads < 1 || (o->cpus && o->nthreads > o->ncpus))
		return q3_errf(e, -EINVAL, "expert pool: %d threads for %d cpus", o->nthreads,
			       o->cpus ? o->ncpus : 0);
	p = calloc(1, sizeof(*p));
	if (!p)
		return q3_errf(e, -ENOMEM, "out of memory");
	p->n = o->nthreads;
	p->spin_s = (o->spin_us > 0 ? o->spin_us : 200) * 1e-6;
	p->wait_spin_s = o->wait_spin_us < 0 ? 0 : o->wait_spin_us ? o->wait_spin_us * 1e-6 : p->spin_s;
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->wake, NULL);
	pthread_cond_init(&p->done, NULL);
	p->w = calloc((size_t)p->n, sizeof(*p->w));
	if (!p->w) {
		q3_xpool_free(p);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	for (int i = 0; i < p->n; i++) {
		p->w[i].p = p;
		p->w[i].idx = i;
		p->w[i].cpu = o->cpus ? o->cpus[i] : -1;
		err = pthread_create(&p->w[i].th, NULL, worker_main, &p->w[i]);
		if (err) {
			q3_xpool_free(p);
			return q3_errf(e, -err, "expert pool: pthread_create: %s", strerror(err));
		}
		p->nstarted++;
	}
	while (atomic_load(&p->alive) < p->n)
		sched_yield();
	*out = p;
	return 0;
}

void q3_xpool_free(struct q3_xpool *p)
{
	if (!p)
		return;
	q3_xpool_wait(p);
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->stop, true);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->mu);
	for (int i = 0; i < p->nstarted; i++)
		pthread_join(p->w[i].th, NULL);
	pthread_cond_destroy(&p->wake);
	pthread_cond_destroy(&p->done);
	pthread_mutex_destroy(&p->mu);
	free(p->w);
	free(p);
}

int q3_xpool_size(const struct q3_xpool *p)
{
	return p->n;
}

int q3_xpool_bound(const struct q3_xpool *p)
{
	return atomic_load(&((struct q3_xpool *)p)->bound);
}

bool q3_xpool_idle(struct q3_xpool *p)
{
	return atomic_load(&p->finished) == atomic_load(&p->gen);
}

static int post(struct q3_xpool *p, const struct q3_xjob *job, void (*each)(void *, int))
{
	if (!q3_xpool_idle(p))
		return -EBUSY;
	if (!each && (job->nphases < 1 || job->nphases > Q3_XPOOL_MAX_PHASES))
		return -EINVAL;
	p->job = *job;
	p->each = each;
	for (int i = 0; i < Q3_XPOOL_MAX_PHASES; i++) {
		atomic_store(&p->next[i], 0);
		atomic_store(&p->arrived[i], 0);
	}
	atomic_store(&p->left, 0);
	pthread_mutex_lock(&p->mu);
	atomic_fetch_add(&p->gen, 1);
	if (p->sleepers)
		pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->mu);
	return 0;
}

int q3_xpool_post(struct q3_xpool *p, const struct q3_xjob *job)
{
	return post(p, job, NULL);
}

int q3_xpool_wait(struct q3_xpool *p)
{
	if (p->wait_spin_s <= 0 ? !q3_xpool_idle(p) : !SPIN_UNTIL(q3_xpool_idle(p), p->wait_spin_s)) {
		pthread_mutex_lock(&p->mu);
		p->waiter = true;
		while (!q3_xpool_idle(p))
			pthread_cond_wait(&p->done, &p->mu);
		p->waiter = false;
		pthread_mutex_unlock(&p->mu);
	}
	return p->result;
}

int q3_xpool_run(struct q3_xpool *p, const struct q3_xjob *job)
{
	int err = q3_xpool_post(p, job);

	return err ? err : q3_xpool_wait(p);
}

int q3_xpool_each(struct q3_xpool *p, void (*fn)(void *ctx, int worker), void *ctx)
{
	struct q3_xjob job = {.ctx = ctx};
	int err = post(p, &job, fn);

	return err ? err : q3_xpool_wait(p);
}
