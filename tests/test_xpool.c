/* test_xpool.c - the expert thread pool: phases run in order with every task exactly once,
 * per-worker runs, busy refusal, the gate/done handoff (and its timeout), many jobs in a row,
 * sleeping and waking, CPU binding. */
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "xpool.h"

#define NPH 5
#define MAXT 300

struct ctx {
	int ntask[NPH];
	atomic_int hits[NPH][MAXT];
	atomic_int done_in[NPH]; /* tasks finished per phase */
	atomic_int order_bad;
	atomic_int workers_seen[64];
	int nw;
};

static int ntasks(void *c, int ph)
{
	return ((struct ctx *)c)->ntask[ph];
}

static void task(void *c_, int ph, int i, int w)
{
	struct ctx *c = c_;

	/* every task of the earlier phases has finished before any of this one starts (also across
	 * an empty phase, whose barrier the pool leaves out) */
	for (int q = 0; q < ph; q++)
		if (atomic_load(&c->done_in[q]) != c->ntask[q])
			atomic_fetch_add(&c->order_bad, 1);
	atomic_fetch_add(&c->hits[ph][i], 1);
	atomic_fetch_add(&c->workers_seen[w], 1);
	if (i % 7 == 0)
		usleep(50);
	atomic_fetch_add(&c->done_in[ph], 1);
}

static void check_job(struct q3_xpool *p, int nw)
{
	struct ctx *c = calloc(1, sizeof(*c));
	struct q3_xjob job = {.nphases = NPH, .ntasks = ntasks, .task = task, .ctx = c};
	static const int counts[NPH] = {1, 0, 17, MAXT, 3};

	memcpy(c->ntask, counts, sizeof(counts));
	assert_int_equal(q3_xpool_run(p, &job), 0);
	assert_int_equal(atomic_load(&c->order_bad), 0);
	for (int ph = 0; ph < NPH; ph++)
		for (int i = 0; i < MAXT; i++)
			assert_int_equal(atomic_load(&c->hits[ph][i]), i < counts[ph] ? 1 : 0);
	for (int w = nw; w < 64; w++)
		assert_int_equal(atomic_load(&c->workers_seen[w]), 0);
	free(c);
}

static void test_phases(void **state)
{
	for (int nw = 1; nw <= 4; nw++) {
		struct q3_xpool_opts o = {.nthreads = nw};
		struct q3_xpool *p;
		q3_err e = {0};

		assert_int_equal(q3_xpool_new(&o, &p, &e), 0);
		assert_int_equal(q3_xpool_size(p), nw);
		for (int rep = 0; rep < 3; rep++)
			check_job(p, nw);
		q3_xpool_free(p);
	}
}

static void each_fn(void *c, int w)
{
	atomic_fetch_add(&((atomic_int *)c)[w], 1);
}

static void test_each_and_busy(void **state)
{
	struct q3_xpool_opts o = {.nthreads = 3};
	struct q3_xpool *p;
	q3_err e = {0};
	atomic_int seen[3] = {0};
	volatile uint32_t gate = 0;
	struct ctx *c = calloc(1, sizeof(*c));
	struct q3_xjob job = {.nphases = 1, .ntasks = ntasks, .task = task, .ctx = c,
			      .gate = &gate, .gate_value = 1};

	assert_int_equal(q3_xpool_new(&o, &p, &e), 0);
	assert_int_equal(q3_xpool_each(p, each_fn, seen), 0);
	for (int w = 0; w < 3; w++)
		assert_int_equal(atomic_load(&seen[w]), 1);
	/* a job waiting on its gate keeps the pool busy */
	c->ntask[0] = 5;
	assert_int_equal(q3_xpool_post(p, &job), 0);
	assert_false(q3_xpool_idle(p));
	assert_int_equal(q3_xpool_post(p, &job), -EBUSY);
	assert_int_equal(q3_xpool_each(p, each_fn, seen), -EBUSY);
	usleep(2000);
	assert_int_equal(atomic_load(&c->done_in[0]), 0);
	__atomic_store_n(&gate, 1, __ATOMIC_RELEASE);
	assert_int_equal(q3_xpool_wait(p), 0);
	assert_int_equal(atomic_load(&c->done_in[0]), 5);
	assert_true(q3_xpool_idle(p));
	assert_int_equal(q3_xpool_wait(p), 0); /* nothing in flight */
	/* bad phase counts */
	job.nphases = 0;
	assert_int_equal(q3_xpool_post(p, &job), -EINVAL);
	job.nphases = Q3_XPOOL_MAX_PHASES + 1;
	assert_int_equal(q3_xpool_post(p, &job), -EINVAL);
	q3_xpool_free(p);
	free(c);
}

/* The GPU side of the handoff, played by a thread: writes the input, opens the gate, waits on
 * the done word, checks the output. */
struct handoff {
	volatile uint32_t gate, done;
	int input[64], output[64];
	int rounds, bad;
};

static int h_ntasks(void *c, int ph)
{
	return 64;
}

static void h_task(void *c, int ph, int i, int w)
{
	struct handoff *h = c;

	h->output[i] = h->input[i] * 3;
}

static void *gpu_thread(void *arg)
{
	struct handoff *h = arg;

	for (uint32_t seq = 1; seq <= (uint32_t)h->rounds; seq++) {
		for (int i = 0; i < 64; i++)
			h->input[i] = (int)seq * 100 + i;
		__atomic_store_n(&h->gate, seq, __ATOMIC_RELEASE);
		while ((int32_t)(__atomic_load_n(&h->done, __ATOMIC_ACQUIRE) - seq) < 0)
			;
		for (int i = 0; i < 64; i++)
			if (h->output[i] != ((int)seq * 100 + i) * 3)
				h->bad++;
	}
	return NULL;
}

static void test_handoff(void **state)
{
	struct q3_xpool_opts o = {.nthreads = 2, .spin_us = 50};
	struct q3_xpool *p;
	q3_err e = {0};
	struct handoff *h = calloc(1, sizeof(*h));
	pthread_t th;

	h->rounds = 200;
	assert_int_equal(q3_xpool_new(&o, &p, &e), 0);
	assert_int_equal(pthread_create(&th, NULL, gpu_thread, h), 0);
	for (uint32_t seq = 1; seq <= (uint32_t)h->rounds; seq++) {
		struct q3_xjob job = {.nphases = 1, .ntasks = h_ntasks, .task = h_task, .ctx = h,
				      .gate = &h->gate, .gate_value = seq,
				      .done = &h->done, .done_value = seq};

		assert_int_equal(q3_xpool_post(p, &job), 0);
		assert_int_equal(q3_xpool_wait(p), 0);
	}
	pthread_join(th, NULL);
	assert_int_equal(h->bad, 0);

	/* a gate that never opens: the job gives up, still stores done, and says why */
	struct q3_xjob job = {.nphases = 1, .ntasks = h_ntasks, .task = h_task, .ctx = h,
			      .gate = &h->gate, .gate_value = 100000, .gate_timeout_s = 0.05,
			      .done = &h->done, .done_value = 7777};

	memset(h->output, 0, sizeof(h->output));
	assert_int_equal(q3_xpool_run(p, &job), -ETIMEDOUT);
	assert_int_equal(h->done, 7777);
	assert_int_equal(h->output[5], 0);
	/* and the pool works afterwards; the gate compares as a wrapping sequence number */
	h->gate = 0xfffffff0u;
	job.gate_value = 0xffffffe0u;
	assert_int_equal(q3_xpool_run(p, &job), 0);
	assert_int_equal(h->output[5], h->input[5] * 3);
	q3_xpool_free(p);
	free(h);
}

/* Idle long enough to sleep, then wake for many short jobs. */
static void test_sleep_wake(void **state)
{
	struct q3_xpool_opts o = {.nthreads = 3, .spin_us = 10};
	struct q3_xpool *p;
	q3_err e = {0};

	assert_int_equal(q3_xpool_new(&o, &p, &e), 0);
	for (int i = 0; i < 300; i++) {
		if (i % 50 == 0)
			usleep(5000);
		check_job(p, 3);
	}
	q3_xpool_free(p);
}

static void test_binding(void **state)
{
	int cpus[2] = {0, 1 % (int)sysconf(_SC_NPROCESSORS_ONLN)};
	struct q3_xpool_opts o = {.nthreads = 2, .cpus = cpus, .ncpus = 2};
	struct q3_xpool *p;
	q3_err e = {0};

	assert_int_equal(q3_xpool_new(&o, &p, &e), 0);
	/* every worker whose CPU the affinity mask allows is bound; the others are not */
	cpu_set_t allowed;
	assert_int_equal(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
	assert_int_equal(q3_xpool_bound(p), !!CPU_ISSET(cpus[0], &allowed) + !!CPU_ISSET(cpus[1], &allowed));
	check_job(p, 2);
	q3_xpool_free(p);
	o.nthreads = 3; /* more threads than CPUs given */
	assert_int_equal(q3_xpool_new(&o, &p, &e), -EINVAL);
	o.nthreads = 0;
	assert_int_equal(q3_xpool_new(&o, &p, &e), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_phases),	    cmocka_unit_test(test_each_and_busy),
		cmocka_unit_test(test_handoff),	    cmocka_unit_test(test_sleep_wake),
		cmocka_unit_test(test_binding),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
