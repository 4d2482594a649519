/* test_worker.c - the inference worker's scheduling against a fake engine (defined here, in place
 * of engine.c): decode steps batch every generating job, prompts are fed in chunks of at most
 * prefill_chunk tokens between decode steps, a restored saved state gives the same tokens as a
 * fresh run, cancel and the queue limit work, eos and max_tokens end jobs, the engine's idle
 * work (the expert cache's re-balancing) runs only between requests and its stats reach /metrics.
 *
 * The fake session's state is a hash of every token it consumed, and its logits are a function
 * of that hash: restoring the wrong state, or feeding a token twice, changes the output. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine.h"
#include "metrics.h"
#include "sampler.h"
#include "tokenizer.h"
#include "worker.h"

/* ---- the fake engine --------------------------------------------------------------------- */

#define V 151936
#define MAX_CTX 2048
#define MAX_BATCH 8

struct q3_engine {
	struct q3_config cfg;
	pthread_mutex_t gate; /* held by a test to pause the engine */
	int decode_calls, max_decode_n, max_eval_n;
	int sessions;
	int idle_left;	 /* idle rounds with work left ("I" in the log); reset by every forward */
	int idle_calls;	 /* all q3_engine_idle calls */
	uint64_t tokens; /* tokens computed (the fake's expert pairs) */
	char log[4096]; /* "P<n>" per eval, "D<n>" per decode */
};

struct q3_session {
	struct q3_engine *eng;
	uint64_t h;
	int pos;
};

static struct q3_engine fake;

static uint64_t mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static void fake_logits(uint64_t h, float *out)
{
	for (int i = 0; i < V; i++)
		out[i] = (float)(mix(h + (uint64_t)i * 0x9E3779B97F4A7C15ull) >> 40) / (float)(1 << 24) * 8.0f;
}

static void logf_(const char *kind, int n)
{
	size_t len = strlen(fake.log);
	if (len + 16 < sizeof(fake.log))
		snprintf(fake.log + len, sizeof(fake.log) - len, "%s%d ", kind, n);
}

const struct q3_config *q3_engine_config(const struct q3_engine *eng) { return &eng->cfg; }
int q3_engine_max_ctx(const struct q3_engine *eng) { return MAX_CTX; }
int q3_engine_max_batch(const struct q3_engine *eng) { return MAX_BATCH; }

int q3_session_new(struct q3_engine *eng, struct q3_session **out, q3_err *e)
{
	*out = calloc(1, sizeof(**out));
	(*out)->eng = eng;
	eng->sessions++;
	return 0;
}

void q3_session_free(struct q3_session *s)
{
	s->eng->sessions--;
	free(s);
}

void q3_session_reset(struct q3_session *s)
{
	s->h = 0;
	s->pos = 0;
}

int q3_session_copy(struct q3_session *dst, const struct q3_session *src, q3_err *e)
{
	dst->h = src->h;
	dst->pos = src->pos;
	return 0;
}

/* The fake's expert facts: every computed token is one pair served from VRAM. */
void q3_engine_stats(const struct q3_engine *eng, struct q3_engine_stats *s)
{
	memset(s, 0, sizeof(*s));
	pthread_mutex_lock(&fake.gate);
	s->experts_total = 48;
	s->experts_vram = 48;
	s->pairs_vram = fake.tokens;
	pthread_mutex_unlock(&fake.gate);
}

/* Two rounds of work after any forward, then nothing. */
int q3_engine_idle(struct q3_engine *eng, q3_err *e)
{
	pthread_mutex_lock(&fake.gate);
	int r = fake.idle_left > 0;
	fake.idle_calls++;
	if (r) {
		fake.idle_left--;
		logf_("I", 1);
	}
	pthread_mutex_unlock(&fake.gate);
	return r;
}

static int feed(struct q3_session *s, const int32_t *ids, int n, q3_err *e)
{
	if (s->pos + n > MAX_CTX)
		return q3_errf(e, -ENOSPC, "fake: past max_ctx");
	for (int i = 0; i < n; i++) {
		if (ids[i] < 0 || ids[i] >= V)
			return q3_errf(e, -EINVAL, "fake: id %d", ids[i]);
		s->h = mix(s->h ^ ((uint64_t)ids[i] << 20 | (uint64_t)(s->pos + i)));
	}
	s->pos += n;
	fake.tokens += (uint64_t)n;
	fake.idle_left = 2;
	return 0;
}

int q3_session_eval(struct q3_session *s, const int32_t *ids, int n, float *logits, unsigned flags, q3_err *e)
{
	pthread_mutex_lock(&fake.gate);
	int rc = feed(s, ids, n, e);
	fake.max_eval_n = Q3_MAX(fake.max_eval_n, n);
	logf_("P", n);
	pthread_mutex_unlock(&fake.gate);
	if (!rc && logits)
		fake_logits(s->h, logits);
	return rc;
}

int q3_engine_decode(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n, float *logits,
		     q3_err *e)
{
	pthread_mutex_lock(&fake.gate);
	fake.decode_calls++;
	fake.max_decode_n = Q3_MAX(fake.max_decode_n, n);
	logf_("D", n);
	for (int i = 0; i < n; i++) { /* feed counts into fake: under the gate, as in eval */
		int rc = feed(ss[i], ids + i, 1, e);
		if (rc) {
			pthread_mutex_unlock(&fake.gate);
			return rc;
		}
	}
	pthread_mutex_unlock(&fake.gate);
	for (int i = 0; i < n && logits; i++)
		fake_logits(ss[i]->h, logits + (size_t)i * V);
	return 0;
}

/* As the engine on a backend that does not sample: the logits, then the host sampler. */
int q3_engine_decode_sample(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n,
			    struct q3_sampler **smp, int32_t *out, q3_err *e)
{
	float *lg = malloc(sizeof(float) * (size_t)n * V);
	int rc;

	if (!lg)
		return q3_errf(e, -ENOMEM, "fake: out of memory");
	if (!(rc = q3_engine_decode(eng, ss, ids, n, lg, e)))
		for (int i = 0; i < n; i++)
			out[i] = q3_sampler_sample(smp[i], lg + (size_t)i * V);
	free(lg);
	return rc;
}

/* ---- helpers ------------------------------------------------------------------------------ */

static struct q3_tok *tok;
static struct q3_metrics metrics;
static int32_t eos[2];

static struct q3_worker *start(int cache, int chunk, int max_queue)
{
	struct q3_worker_opts o = { .eng = &fake, .tok = tok, .metrics = &metrics, .cache_entries = cache,
				    .prefill_chunk = chunk, .max_queue = max_queue, .eos = eos, .neos = 2 };
	struct q3_worker *w;
	q3_err e;
	assert_int_equal(q3_worker_start(&o, &w, &e), 0);
	return w;
}

static struct q3_job *job(int nprompt, uint64_t seed, int max_tokens)
{
	int32_t ids[1200];
	struct q3_sampling p;
	assert_true(nprompt <= 1200);
	for (int i = 0; i < nprompt; i++)
		ids[i] = 1000 + (i * 7919) % 50000;
	q3_sampling_default(&p);
	p.seed = seed;
	p.top_k = 40;
	return q3_job_new(ids, nprompt, &p, max_tokens, NULL, 0);
}

static void wait_done(struct q3_job *j)
{
	for (;;) {
		pthread_mutex_lock(&j->mu);
		bool done = j->done;
		size_t len = j->len;
		pthread_mutex_unlock(&j->mu);
		if (done)
			return;
		q3_job_wait(j, len, 1.0);
	}
}

static int setup(void **st)
{
	q3_err e;
	memset(&fake, 0, sizeof(fake));
	fake.cfg.vocab_size = V;
	pthread_mutex_init(&fake.gate, NULL);
	if (!tok && q3_tok_load("tests/fixtures/tokenizer", &tok, &e))
		fail_msg("%s", e.msg);
	eos[0] = q3_tok_id(tok, "<|im_end|>");
	eos[1] = q3_tok_id(tok, "<|endoftext|>");
	return 0;
}

/* ---- tests -------------------------------------------------------------------------------- */

/* Idle rounds happen after the work, never between the steps of a running request, and stop
 * when the engine has nothing left; /metrics then shows the engine's stats. */
static void test_idle_work_runs_between_requests_and_stats_reach_metrics(void **st)
{
	struct q3_worker *w = start(0, 16, 64);
	struct q3_job *a = job(40, 3, 6);
	char *text, line[128], *first_idle = NULL;
	int calls;

	assert_int_equal(q3_worker_submit(w, a), 0);
	wait_done(a);
	for (int i = 0; i < 500; i++) { /* until the worker went idle */
		pthread_mutex_lock(&fake.gate);
		bool idle = strstr(fake.log, "I1 I1 ") != NULL;
		pthread_mutex_unlock(&fake.gate);
		if (idle)
			break;
		usleep(10000);
	}
	pthread_mutex_lock(&fake.gate);
	first_idle = strstr(fake.log, "I1");
	assert_non_null(first_idle);
	assert_non_null(strstr(fake.log, "D1 ")); /* the request ran before */
	assert_string_equal(first_idle, "I1 I1 "); /* no step after the idle work began */
	calls = fake.idle_calls;
	pthread_mutex_unlock(&fake.gate);
	usleep(100000);
	pthread_mutex_lock(&fake.gate);
	assert_int_equal(fake.idle_calls, calls); /* nothing left: the worker sleeps */
	pthread_mutex_unlock(&fake.gate);

	text = q3_metrics_render(&metrics);
	assert_non_null(text);
	snprintf(line, sizeof(line), "\nqwen3d_expert_pairs_total{where=\"vram\"} %llu\n",
		 (unsigned long long)fake.tokens);
	assert_non_null(strstr(text, line));
	assert_non_null(strstr(text, "\nqwen3d_experts_vram 48\n"));
	assert_non_null(strstr(text, "\nqwen3d_expert_hit_ratio 1.0000\n"));
	free(text);
	q3_job_put(a);
	q3_worker_free(w);
}

static void test_decode_steps_batch_every_generating_job(void **st)
{
	struct q3_worker *w;
	struct q3_job *j[6];

	pthread_mutex_lock(&fake.gate); /* all six are queued before the engine runs */
	w = start(0, 256, 64);
	for (int i = 0; i < 6; i++) {
		j[i] = job(10 + i, i, 12);
		assert_int_equal(q3_worker_submit(w, j[i]), 0);
	}
	pthread_mutex_unlock(&fake.gate);
	for (int i = 0; i < 6; i++) {
		wait_done(j[i]);
		assert_int_equal(j[i]->finish == Q3_FINISH_LENGTH || j[i]->finish == Q3_FINISH_STOP, 1);
		assert_true(j[i]->ntokens >= 1 && j[i]->ntokens <= 12);
		q3_job_put(j[i]);
	}
	assert_int_equal(fake.max_decode_n, 6);
	q3_worker_free(w);
	assert_int_equal(fake.sessions, 0);
}

static void test_long_prompts_are_fed_in_chunks_between_decode_steps(void **st)
{
	struct q3_worker *w = start(0, 100, 64);
	struct q3_job *a = job(5, 1, 400), *b = job(1000, 2, 3);

	assert_int_equal(q3_worker_submit(w, a), 0);
	for (int calls = 0; !calls; q3_job_wait(a, 0, 0.01)) { /* until a is generating */
		pthread_mutex_lock(&fake.gate);
		calls = fake.decode_calls;
		pthread_mutex_unlock(&fake.gate);
	}
	assert_int_equal(q3_worker_submit(w, b), 0);
	wait_done(b);
	atomic_store(&a->cancel, true);
	wait_done(a);
	assert_true(fake.max_eval_n <= 100);
	/* between two 100-token pieces of b's prompt, a decoded */
	assert_non_null(strstr(fake.log, "P100 D1 P100 D1 "));
	q3_job_put(a);
	q3_job_put(b);
	q3_worker_free(w);
}

static void test_a_restored_state_gives_the_same_tokens_as_a_fresh_run(void **st)
{
	struct q3_worker *w = start(8, 64, 64), *fresh;
	struct q3_job *a = job(300, 5, 4), *b, *c;

	assert_int_equal(q3_worker_submit(w, a), 0);
	wait_done(a);
	/* b extends a's prompt (its first 300 tokens are a's) */
	b = job(600, 9, 10);
	assert_int_equal(q3_worker_submit(w, b), 0);
	wait_done(b);
	assert_int_equal(b->cached, 299); /* a's prompt state, saved at n - 1 */
	fresh = start(0, 64, 64);
	c = job(600, 9, 10);
	assert_int_equal(q3_worker_submit(fresh, c), 0);
	wait_done(c);
	assert_int_equal(c->cached, 0);
	assert_int_equal(b->ntokens, c->ntokens);
	assert_string_equal(b->text, c->text);
	/* the same prompt again: all but its last token come from the saved state */
	struct q3_job *d = job(600, 9, 10);
	assert_int_equal(q3_worker_submit(w, d), 0);
	wait_done(d);
	assert_int_equal(d->cached, 599);
	assert_string_equal(d->text, c->text);
	q3_job_put(a);
	q3_job_put(b);
	q3_job_put(c);
	q3_job_put(d);
	q3_worker_free(w);
	q3_worker_free(fresh);
	assert_int_equal(fake.sessions, 0);
}

static void test_cancel_ends_a_job_and_the_queue_limit_refuses(void **st)
{
	struct q3_worker *w;
	struct q3_job *a = job(5, 1, 2000), *b = job(5, 2, 2000), *c = job(5, 3, 2000);

	pthread_mutex_lock(&fake.gate);
	w = start(0, 64, 2);
	assert_int_equal(q3_worker_submit(w, a), 0);
	assert_int_equal(q3_worker_submit(w, b), 0);
	assert_int_equal(q3_worker_submit(w, c), -EAGAIN);
	atomic_store(&a->cancel, true);
	atomic_store(&b->cancel, true);
	pthread_mutex_unlock(&fake.gate);
	wait_done(a);
	wait_done(b);
	assert_int_equal(a->finish, Q3_FINISH_CANCELLED);
	assert_int_equal(b->finish, Q3_FINISH_CANCELLED);
	while (q3_worker_load(w))
		q3_job_wait(a, a->len, 0.01);
	assert_int_equal(q3_worker_submit(w, c), 0); /* room again */
	q3_worker_stop(w);			     /* shutdown cancels what runs */
	wait_done(c);
	assert_int_equal(c->finish, Q3_FINISH_CANCELLED);
	assert_int_equal(q3_worker_submit(w, a), -ESHUTDOWN);
	q3_job_put(a);
	q3_job_put(b);
	q3_job_put(c);
	q3_worker_free(w);
}

/* With every batch slot generating, a queued job whose client left ends at once and gives its
 * queue place back (it used to wait for a free slot). */
static void test_a_cancelled_queued_job_leaves_the_queue_at_once(void **st)
{
	struct q3_worker *w;
	struct q3_job *run[MAX_BATCH], *q1 = job(5, 100, 4), *q2 = job(5, 101, 4);

	pthread_mutex_lock(&fake.gate);
	w = start(0, 64, MAX_BATCH + 2);
	for (int i = 0; i < MAX_BATCH; i++) {
		run[i] = job(5, (uint64_t)i, 100000); /* far more steps than this test waits */
		assert_int_equal(q3_worker_submit(w, run[i]), 0);
	}
	assert_int_equal(q3_worker_submit(w, q1), 0);
	assert_int_equal(q3_worker_submit(w, q2), 0);
	assert_int_equal(q3_worker_load(w), MAX_BATCH + 2);
	atomic_store(&q1->cancel, true);
	pthread_mutex_unlock(&fake.gate);
	wait_done(q1);
	assert_int_equal(q1->finish, Q3_FINISH_CANCELLED);
	assert_int_equal(q1->ntokens, 0);
	for (int i = 0; i < MAX_BATCH; i++) { /* nobody left a slot */
		pthread_mutex_lock(&run[i]->mu);
		assert_false(run[i]->done);
		pthread_mutex_unlock(&run[i]->mu);
	}
	pthread_mutex_lock(&q2->mu);
	assert_false(q2->done); /* still queued, still waiting */
	pthread_mutex_unlock(&q2->mu);
	while (q3_worker_load(w) != MAX_BATCH + 1)
		q3_job_wait(q1, q1->len, 0.01);
	q3_worker_stop(w);
	for (int i = 0; i < MAX_BATCH; i++)
		q3_job_put(run[i]);
	q3_job_put(q1);
	q3_job_put(q2);
	q3_worker_free(w);
}

static void test_eos_ends_a_job_and_counts_as_a_token(void **st)
{
	struct q3_worker *w = start(0, 64, 8);
	struct q3_logit_bias bias = { eos[0], 100.0f };
	struct q3_sampling p;
	int32_t ids[3] = { 100, 200, 300 };

	q3_sampling_default(&p);
	p.bias = &bias;
	p.nbias = 1;
	struct q3_job *j = q3_job_new(ids, 3, &p, 50, NULL, 0);
	assert_int_equal(q3_worker_submit(w, j), 0);
	wait_done(j);
	assert_int_equal(j->finish, Q3_FINISH_STOP);
	assert_int_equal(j->ntokens, 1);
	assert_int_equal(j->len, 0);
	q3_job_put(j);
	q3_worker_free(w);
}

/* A token that completes a stop string and ends in an incomplete UTF-8 character: nothing of it
 * reaches the text, not even the U+FFFD its held-back bytes would flush to. */
static void test_nothing_follows_a_stop_string(void **st)
{
	struct q3_worker *w = start(0, 64, 8);
	int32_t id;
	struct q3_sampling p;
	int32_t ids[3] = { 100, 200, 300 };
	char *stop[1] = { "\xe3\x83\xbc" }; /* U+30FC */
	size_t n;
	const uint8_t *b;

	/* the first id whose bytes are U+30FC then the first two bytes of another character */
	for (id = 0; id < q3_tok_vocab_size(tok); id++)
		if ((b = q3_tok_bytes(tok, id, &n)) && n == 5 && !memcmp(b, "\xe3\x83\xbc\xe3", 4))
			break;
	assert_true(id < q3_tok_vocab_size(tok));
	struct q3_logit_bias bias = { id, 100.0f };
	q3_sampling_default(&p);
	p.temperature = 0;
	p.bias = &bias;
	p.nbias = 1;
	struct q3_job *j = q3_job_new(ids, 3, &p, 5, (const char *const *)stop, 1);
	assert_int_equal(q3_worker_submit(w, j), 0);
	wait_done(j);
	assert_int_equal(j->finish, Q3_FINISH_STOP);
	assert_int_equal(j->len, 0);
	q3_job_put(j);
	q3_worker_free(w);
}

static void test_a_prompt_that_fills_the_context_is_an_error(void **st)
{
	struct q3_worker *w = start(0, 64, 8);
	int32_t *ids = calloc(MAX_CTX, sizeof(*ids));
	struct q3_sampling p;
	q3_sampling_default(&p);
	struct q3_job *j = q3_job_new(ids, MAX_CTX, &p, 5, NULL, 0);
	assert_int_equal(q3_worker_submit(w, j), 0);
	wait_done(j);
	assert_int_equal(j->finish, Q3_FINISH_ERROR);
	assert_non_null(strstr(j->error, "does not fit"));
	q3_job_put(j);
	free(ids);
	q3_worker_free(w);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_decode_steps_batch_every_generating_job, setup),
		cmocka_unit_test_setup(test_idle_work_runs_between_requests_and_stats_reach_metrics, setup),
		cmocka_unit_test_setup(test_long_prompts_are_fed_in_chunks_between_decode_steps, setup),
		cmocka_unit_test_setup(test_a_restored_state_gives_the_same_tokens_as_a_fresh_run, setup),
		cmocka_unit_test_setup(test_cancel_ends_a_job_and_the_queue_limit_refuses, setup),
		cmocka_unit_test_setup(test_a_cancelled_queued_job_leaves_the_queue_at_once, setup),
		cmocka_unit_test_setup(test_eos_ends_a_job_and_counts_as_a_token, setup),
		cmocka_unit_test_setup(test_a_prompt_that_fills_the_context_is_an_error, setup),
		cmocka_unit_test_setup(test_nothing_follows_a_stop_string, setup),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	q3_tok_free(tok);
	return rc;
}
