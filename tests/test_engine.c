/* test_engine.c - engine and session behaviour on the CPU backend: a prompt split into several
 * evals equals one eval, long prompts, session copy and reset, batched decode equals decoding
 * each session alone, thread count does not change results, and every request error leaves the
 * session as it was. */
#include "testutil.h"

#include <errno.h>
#include <jansson.h>

#include "backend.h"
#include "engine.h"
#include "sampler.h"

static struct q3_engine *open_fixture(const char *name, int threads, int max_ctx, int max_batch)
{
	char dir[256];
	struct q3_engine *eng = NULL;
	q3_err e = { { 0 } };
	struct q3_engine_opts o = { .model_dir = dir, .backend = "cpu", .threads = threads,
				    .max_ctx = max_ctx, .max_batch = max_batch, .quiet = true };

	snprintf(dir, sizeof(dir), "%s/%s", FIXTURES, name);
	if (q3_engine_open(&o, &eng, &e))
		fail_msg("%s: %s", name, e.msg);
	return eng;
}

static struct q3_session *new_session(struct q3_engine *eng)
{
	struct q3_session *s = NULL;
	q3_err e = { { 0 } };

	if (q3_session_new(eng, &s, &e))
		fail_msg("%s", e.msg);
	return s;
}

static void eval_ok(struct q3_session *s, const int32_t *ids, int n, float *logits, unsigned flags)
{
	q3_err e = { { 0 } };

	if (q3_session_eval(s, ids, n, logits, flags, &e))
		fail_msg("eval of %d tokens at %d: %s", n, q3_session_pos(s), e.msg);
}

static void decode_ok(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n,
		      float *logits)
{
	q3_err e = { { 0 } };

	if (q3_engine_decode(eng, ss, ids, n, logits, &e))
		fail_msg("decode of %d sessions: %s", n, e.msg);
}

/* Prefill split into pieces against one prefill of the whole prompt (every position's logits). */
static void test_prefill_split(void **state)
{
	struct fixture_ref r;
	struct q3_engine *eng;
	struct q3_session *s;
	float *one, *parts;
	int splits[][4] = { { 1, 79 }, { 7, 17 }, { 64, 16 }, { 30, 1, 49 }, { 63, 2, 15 } };

	assert_int_equal(fixture_ref_load(FIXTURES "/tiny-actorder", &r), 0);
	assert_int_equal(r.T, 80);
	eng = open_fixture("tiny-actorder", 2, r.T, 1);
	s = new_session(eng);
	one = malloc(sizeof(float) * (size_t)r.T * r.V);
	parts = malloc(sizeof(float) * (size_t)r.T * r.V);
	eval_ok(s, r.prompt, r.T, one, Q3_EVAL_ALL_LOGITS);
	for (size_t i = 0; i < Q3_ARRAY_SIZE(splits); i++) {
		int done = 0;
		char what[64];

		q3_session_reset(s);
		for (int j = 0; j < 4 && splits[i][j]; j++) {
			eval_ok(s, r.prompt + done, splits[i][j], parts + (size_t)done * r.V, Q3_EVAL_ALL_LOGITS);
			done += splits[i][j];
		}
		assert_int_equal(q3_session_pos(s), done);
		snprintf(what, sizeof(what), "prefill split %d+%d%s%s", splits[i][0], splits[i][1],
			 splits[i][2] ? "+..." : "", "");
		assert_int_equal(check_close(what, parts, one, (size_t)done * r.V, 1e-5), 0);
		printf("%s: rel L2 %.2e against one prefill\n", what, rel_l2(parts, one, (size_t)done * r.V));
	}
	free(one);
	free(parts);
	q3_session_free(s);
	q3_engine_close(eng);
	fixture_ref_free(&r);
}

/* Prompts longer than one backend call (the engine feeds them in pieces). */
static void test_long_prompt(void **state)
{
	enum { T = 600 };
	struct q3_engine *eng = open_fixture("tiny-sym", 2, T, 1);
	struct q3_session *s = new_session(eng);
	int V = q3_engine_config(eng)->vocab_size;
	int32_t ids[T];
	float *one = malloc(sizeof(float) * (size_t)T * V), *parts = malloc(sizeof(float) * (size_t)T * V);
	float last[4096];

	rng_seed(3);
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t)(rng_u32() % (uint32_t)V);
	eval_ok(s, ids, T, one, Q3_EVAL_ALL_LOGITS);
	q3_session_reset(s);
	eval_ok(s, ids, 250, parts, Q3_EVAL_ALL_LOGITS);
	eval_ok(s, ids + 250, T - 250, parts + (size_t)250 * V, Q3_EVAL_ALL_LOGITS);
	assert_int_equal(check_close("600-token prompt, 250 + 350 against one eval", parts, one,
				     (size_t)T * V, 1e-5),
			 0);
	/* only the last position's logits */
	assert_true(V <= 4096);
	q3_session_reset(s);
	eval_ok(s, ids, T, last, 0);
	assert_memory_equal(last, one + (size_t)(T - 1) * V, sizeof(float) * V);
	free(one);
	free(parts);
	q3_session_free(s);
	q3_engine_close(eng);
}

static void test_session_copy_reset(void **state)
{
	struct fixture_ref r;
	struct q3_engine *eng;
	struct q3_session *a, *b, *c;
	float *la, *lb, *lc, *first;
	int32_t other = 5;

	assert_int_equal(fixture_ref_load(FIXTURES "/tiny-sym", &r), 0);
	eng = open_fixture("tiny-sym", 2, 64, 4);
	a = new_session(eng);
	b = new_session(eng);
	c = new_session(eng);
	la = malloc(sizeof(float) * r.V);
	lb = malloc(sizeof(float) * r.V);
	lc = malloc(sizeof(float) * r.V);
	first = malloc(sizeof(float) * r.V);

	eval_ok(a, r.prompt, r.T, first, 0);
	assert_int_equal(q3_session_copy(b, a, NULL), 0);
	assert_int_equal(q3_session_pos(b), r.T);
	/* a moves on with another token; b continues as a would have */
	decode_ok(eng, &a, &other, 1, la);
	eval_ok(c, r.prompt, r.T, NULL, 0);
	for (int i = 0; i < 4; i++) {
		decode_ok(eng, &b, &r.gen[i], 1, lb);
		decode_ok(eng, &c, &r.gen[i], 1, lc);
		assert_memory_equal(lb, lc, sizeof(float) * r.V);
	}
	/* a continued prefill on a copy */
	assert_int_equal(q3_session_copy(b, c, NULL), 0);
	eval_ok(b, r.gen + 4, 3, lb, 0);
	eval_ok(c, r.gen + 4, 3, lc, 0);
	assert_memory_equal(lb, lc, sizeof(float) * r.V);

	/* reset: the same prompt gives the same logits as the first time */
	q3_session_reset(a);
	assert_int_equal(q3_session_pos(a), 0);
	eval_ok(a, r.prompt, r.T, la, 0);
	assert_memory_equal(la, first, sizeof(float) * r.V);

	free(la);
	free(lb);
	free(lc);
	free(first);
	q3_session_free(a);
	q3_session_free(b);
	q3_session_free(c);
	q3_engine_close(eng);
	fixture_ref_free(&r);
}

/* Batched decode of sessions at different positions (one of them empty) against each alone. */
static void test_batch_decode(void **state)
{
	enum { NS = 4, STEPS = 4 };
	struct fixture_ref r;
	struct q3_engine *eng;
	struct q3_session *bs[NS], *one[NS];
	int lens[NS] = { 5, 9, 13, 0 };
	float *lb, *l1;

	assert_int_equal(fixture_ref_load(FIXTURES "/tiny-mixed", &r), 0);
	eng = open_fixture("tiny-mixed", 2, 32, NS);
	lb = malloc(sizeof(float) * NS * r.V);
	l1 = malloc(sizeof(float) * r.V);
	for (int i = 0; i < NS; i++) {
		bs[i] = new_session(eng);
		one[i] = new_session(eng);
		if (lens[i]) {
			eval_ok(bs[i], r.prompt + i, lens[i], NULL, 0);
			eval_ok(one[i], r.prompt + i, lens[i], NULL, 0);
		}
	}
	for (int step = 0; step < STEPS; step++) {
		int32_t ids[NS];

		for (int i = 0; i < NS; i++)
			ids[i] = r.gen[(step + 2 * i) % r.G];
		decode_ok(eng, bs, ids, NS, lb);
		for (int i = 0; i < NS; i++) {
			decode_ok(eng, &one[i], &ids[i], 1, l1);
			if (memcmp(l1, lb + (size_t)i * r.V, sizeof(float) * r.V)) {
				check_close("batched decode", lb + (size_t)i * r.V, l1, (size_t)r.V, 0);
				fail_msg("step %d: session %d's logits differ batched and alone", step, i);
			}
			assert_int_equal(q3_session_pos(bs[i]), lens[i] + step + 1);
		}
	}
	for (int i = 0; i < NS; i++) {
		q3_session_free(bs[i]);
		q3_session_free(one[i]);
	}
	free(lb);
	free(l1);
	q3_engine_close(eng);
	fixture_ref_free(&r);
}

/* q3_engine_decode_sample draws what q3_sampler_sample draws from q3_engine_decode's logits, for
 * every session of a batch and every step (sampling, penalties and a bias in play), and the
 * samplers advance alike.  The CPU backend draws on the host; test_model repeats this on CUDA,
 * where the draws happen on the device. */
static void test_decode_sample(void **state)
{
	enum { NS = 3, STEPS = 6 };
	struct fixture_ref r;
	struct q3_engine *eng;
	struct q3_session *a[NS], *b[NS];
	struct q3_sampler sa[NS], sb[NS], *pa[NS];
	struct q3_logit_bias bias[] = { { 3, 1.5f }, { 7, -2.0f } };
	q3_err e = { { 0 } };
	float *lb;

	assert_int_equal(fixture_ref_load(FIXTURES "/tiny-mixed", &r), 0);
	eng = open_fixture("tiny-mixed", 2, 32, NS);
	lb = malloc(sizeof(float) * NS * r.V);
	for (int i = 0; i < NS; i++) {
		struct q3_sampling p;

		q3_sampling_default(&p);
		p.temperature = i == 0 ? 0.0f : 0.7f + 0.3f * i;
		p.top_p = 0.9f;
		p.presence_penalty = 0.5f;
		p.frequency_penalty = 0.25f;
		p.seed = 11 + i;
		p.bias = bias;
		p.nbias = 2;
		a[i] = new_session(eng);
		b[i] = new_session(eng);
		eval_ok(a[i], r.prompt + i, 4 + i, NULL, 0);
		eval_ok(b[i], r.prompt + i, 4 + i, NULL, 0);
		assert_int_equal(q3_sampler_init(&sa[i], r.V, &e), 0);
		assert_int_equal(q3_sampler_init(&sb[i], r.V, &e), 0);
		q3_sampler_reset(&sa[i], &p);
		q3_sampler_reset(&sb[i], &p);
		pa[i] = &sa[i];
	}
	int32_t ids[NS] = { 1, 2, 3 }, got[NS];

	for (int step = 0; step < STEPS; step++) {
		if (q3_engine_decode_sample(eng, a, ids, NS, pa, got, &e))
			fail_msg("decode_sample step %d: %s", step, e.msg);
		decode_ok(eng, b, ids, NS, lb);
		for (int i = 0; i < NS; i++) {
			int32_t want = q3_sampler_sample(&sb[i], lb + (size_t)i * r.V);

			if (got[i] != want)
				fail_msg("step %d, session %d: drew %d, the host sampler %d", step, i, got[i], want);
			assert_true(sa[i].step == sb[i].step);
			q3_sampler_accept(&sa[i], got[i]);
			q3_sampler_accept(&sb[i], want);
			ids[i] = got[i];
		}
	}
	struct q3_engine_stats st;

	q3_engine_stats(eng, &st); /* the CPU backend does not sample: every draw on the host */
	assert_true(st.draws_host == NS * STEPS && st.draws_backend == 0);
	for (int i = 0; i < NS; i++) {
		q3_session_free(a[i]);
		q3_session_free(b[i]);
		q3_sampler_free(&sa[i]);
		q3_sampler_free(&sb[i]);
	}
	free(lb);
	q3_engine_close(eng);
	fixture_ref_free(&r);
}

/* One thread and two give the same bits. */
static void test_threads(void **state)
{
	struct fixture_ref r;
	float *l1, *l2;

	assert_int_equal(fixture_ref_load(FIXTURES "/tiny-actorder", &r), 0);
	l1 = malloc(sizeof(float) * (size_t)r.T * r.V);
	l2 = malloc(sizeof(float) * (size_t)r.T * r.V);
	for (int t = 1; t <= 2; t++) {
		struct q3_engine *eng = open_fixture("tiny-actorder", t == 1 ? 1 : 3, r.T, 1);
		struct q3_session *s = new_session(eng);

		eval_ok(s, r.prompt, r.T, t == 1 ? l1 : l2, Q3_EVAL_ALL_LOGITS);
		q3_session_free(s);
		q3_engine_close(eng);
	}
	assert_memory_equal(l1, l2, sizeof(float) * (size_t)r.T * r.V);
	free(l1);
	free(l2);
	fixture_ref_free(&r);
}

static void test_request_errors(void **state)
{
	struct q3_engine *eng = open_fixture("tiny-sym", 2, 8, 2);
	struct q3_session *s = new_session(eng), *t = new_session(eng), *ss[3];
	int V = q3_engine_config(eng)->vocab_size;
	int32_t ids[9] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, bad[2] = { 1, V }, neg = -1;
	float *want = malloc(sizeof(float) * V), *got = malloc(sizeof(float) * V);
	q3_err e = { { 0 } };

	assert_int_equal(q3_engine_max_ctx(eng), 8);
	assert_int_equal(q3_engine_max_batch(eng), 2);
	assert_string_equal(q3_engine_backend(eng), "cpu");
	eval_ok(s, ids, 3, NULL, 0);
	assert_int_equal(q3_session_eval(s, bad, 2, got, 0, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "outside the vocabulary"));
	assert_int_equal(q3_session_eval(s, &neg, 1, got, 0, &e), -EINVAL);
	assert_int_equal(q3_session_eval(s, ids, 0, got, 0, &e), -EINVAL);
	assert_int_equal(q3_session_eval(s, ids, 6, got, 0, &e), -ENOSPC);
	assert_int_equal(q3_session_pos(s), 3);
	ss[0] = s, ss[1] = s;
	assert_int_equal(q3_engine_decode(eng, ss, ids, 2, got, &e), -EINVAL); /* twice the same */
	ss[1] = t, ss[2] = t;
	assert_int_equal(q3_engine_decode(eng, ss, ids, 3, got, &e), -EINVAL); /* > max_batch */
	assert_int_equal(q3_engine_decode(eng, ss, bad, 2, got, &e), -EINVAL);
	assert_int_equal(q3_session_pos(s), 3);
	assert_int_equal(q3_session_pos(t), 0);
	/* after the failures s continues exactly as a session that never saw them */
	eval_ok(s, ids + 3, 2, got, 0);
	eval_ok(t, ids, 3, NULL, 0);
	eval_ok(t, ids + 3, 2, want, 0);
	assert_memory_equal(got, want, sizeof(float) * V);
	/* the context limit */
	eval_ok(s, ids, 3, NULL, 0);
	assert_int_equal(q3_session_pos(s), 8);
	assert_int_equal(q3_engine_decode(eng, &s, ids, 1, got, &e), -ENOSPC);
	assert_int_equal(q3_session_pos(s), 8);
	free(want);
	free(got);
	q3_session_free(s);
	q3_session_free(t);
	q3_engine_close(eng);
}

static void test_open_errors(void **state)
{
	struct q3_engine *eng = NULL;
	q3_err e = { { 0 } };
	struct q3_engine_opts o = { .model_dir = FIXTURES "/tiny-sym", .backend = "bogus", .quiet = true };

	assert_int_equal(q3_engine_open(&o, &eng, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "bogus"));
	assert_null(eng);
	o.backend = "cuda";
	if (!q3_cuda_backend_ops()) {
		assert_int_equal(q3_engine_open(&o, &eng, &e), -ENOTSUP);
		assert_non_null(strstr(e.msg, "backend cuda")); /* no CUDA backend built, or no device */
	}
	o.backend = "cpu";
	o.model_dir = FIXTURES "/no-such-model";
	assert_true(q3_engine_open(&o, &eng, &e) < 0);
	assert_non_null(strstr(e.msg, "no-such-model"));
	o.model_dir = FIXTURES "/tiny-sym";
	o.max_ctx = 1 << 30;
	assert_int_equal(q3_engine_open(&o, &eng, &e), -EINVAL);
	o.max_ctx = 0;
	o.threads = -1;
	assert_int_equal(q3_engine_open(&o, &eng, &e), -EINVAL);
	/* auto picks a backend that works here */
	o.threads = 1;
	o.max_ctx = 16;
	o.backend = NULL;
	assert_int_equal(q3_engine_open(&o, &eng, &e), 0);
	q3_engine_close(eng);
}

/* No max_ctx asked: 4096, or the model's own limit when that is smaller (the default never
 * refuses a valid model); asked past the limit: refused. */
static void test_default_context(void **state)
{
	char *d = tu_mkdtemp(), path[512];
	struct q3_engine *eng = NULL;
	q3_err e = { { 0 } };

	assert_non_null(d);
	assert_int_equal(tu_copy_dir(FIXTURES "/tiny-sym", d), 0);
	snprintf(path, sizeof(path), "%s/config.json", d);
	json_t *cfg = json_load_file(path, 0, NULL);
	assert_non_null(cfg);
	json_object_set_new(cfg, "max_position_embeddings", json_integer(2048));
	assert_int_equal(json_dump_file(cfg, path, 0), 0);
	json_decref(cfg);

	struct q3_engine_opts o = { .model_dir = d, .backend = "cpu", .threads = 1, .quiet = true };
	if (q3_engine_open(&o, &eng, &e))
		fail_msg("%s", e.msg);
	assert_int_equal(q3_engine_max_ctx(eng), 2048);
	q3_engine_close(eng);
	o.max_ctx = 4096;
	assert_int_equal(q3_engine_open(&o, &eng, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "max_position_embeddings 2048"));
	tu_rm_rf(d);
	free(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_prefill_split),
		cmocka_unit_test(test_long_prompt),
		cmocka_unit_test(test_session_copy_reset),
		cmocka_unit_test(test_batch_decode),
		cmocka_unit_test(test_decode_sample),
		cmocka_unit_test(test_threads),
		cmocka_unit_test(test_request_errors),
		cmocka_unit_test(test_open_errors),
		cmocka_unit_test(test_default_context),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
