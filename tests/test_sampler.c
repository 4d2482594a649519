/* test_sampler.c - the reference sampler against a naive re-statement of its rules (full sorts,
 * no partial selection), plus the properties each filter promises. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "sampler.h"

static struct q3_sampler S;

static void init(int vocab)
{
	q3_err e;
	assert_int_equal(q3_sampler_init(&S, vocab, &e), 0);
}

/* deterministic pseudo-random logits in [-scale, scale] */
static void fill(float *x, int n, unsigned seed, float scale)
{
	for (int i = 0; i < n; i++)
		x[i] = (float)((q3_sampler_uniform(seed, i) * 2 - 1) * scale);
}

static int sample_with(const float *logits, int n, const struct q3_sampling *p, uint64_t step)
{
	float *tmp = malloc(n * sizeof(float));
	memcpy(tmp, logits, n * sizeof(float));
	q3_sampler_reset(&S, p);
	S.step = step;
	int id = q3_sampler_sample(&S, tmp);
	free(tmp);
	return id;
}

/* ---- naive reference: the rules of sampler.h with full sorts ------------------------------- */

struct ref {
	float z;
	int id;
};

static int ref_better(const void *a, const void *b)
{
	const struct ref *x = a, *y = b;
	if (x->z != y->z)
		return x->z > y->z ? -1 : 1;
	return x->id - y->id;
}

static int ref_by_id(const void *a, const void *b)
{
	return ((const struct ref *)a)->id - ((const struct ref *)b)->id;
}

static int ref_sample(const float *logits, int V, const struct q3_sampling *p, uint64_t step)
{
	struct ref *c = malloc(V * sizeof(*c));
	int n = 0;
	for (int i = 0; i < V; i++)
		if (logits[i] / p->temperature > -INFINITY)
			c[n++] = (struct ref){ logits[i] / p->temperature, i };
	qsort(c, n, sizeof(*c), ref_better);
	float zmax = c[0].z;
	if (p->top_k > 0 && p->top_k < n)
		n = p->top_k;
	if (p->top_p < 1) {
		double total = 0, cum = 0;
		for (int i = 0; i < n; i++)
			total += expf(c[i].z - zmax);
		for (int i = 0; i < n; i++) {
			cum += expf(c[i].z - zmax);
			if (cum >= p->top_p * total) {
				n = i + 1;
				break;
			}
		}
	}
	int m = 0;
	for (int i = 0; i < n; i++)
		if (p->min_p <= 0 || expf(c[i].z - zmax) >= p->min_p)
			c[m++] = c[i];
	qsort(c, m, sizeof(*c), ref_by_id);
	double total = 0, cum = 0;
	for (int i = 0; i < m; i++)
		total += expf(c[i].z - zmax);
	double r = q3_sampler_uniform(p->seed, step) * total;
	int id = c[m - 1].id;
	for (int i = 0; i < m; i++) {
		cum += expf(c[i].z - zmax);
		if (cum > r) {
			id = c[i].id;
			break;
		}
	}
	free(c);
	return id;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_uniform_is_in_range_and_depends_on_seed_and_step(void **st)
{
	double a = q3_sampler_uniform(1, 0), b = q3_sampler_uniform(1, 1), c = q3_sampler_uniform(2, 0);
	assert_true(a >= 0 && a < 1 && b >= 0 && b < 1 && c >= 0 && c < 1);
	assert_true(a != b && a != c);
	assert_true(a == q3_sampler_uniform(1, 0));
	double sum = 0;
	for (int i = 0; i < 10000; i++)
		sum += q3_sampler_uniform(42, i);
	assert_true(fabs(sum / 10000 - 0.5) < 0.02); /* mean of 10k uniforms: sigma 0.003 */
}

static void test_greedy_takes_the_argmax_lowest_id_on_ties_and_skips_nan(void **st)
{
	float x[6] = { 1, 3, NAN, 3, -INFINITY, 2 };
	struct q3_sampling p;
	init(6);
	q3_sampling_default(&p);
	p.temperature = 0;
	assert_int_equal(sample_with(x, 6, &p, 0), 1);
	p.temperature = 0.7f;
	p.top_k = 1; /* top_k 1 is greedy too */
	assert_int_equal(sample_with(x, 6, &p, 5), 1);
	x[0] = NAN;
	x[1] = x[3] = x[5] = -INFINITY;
	assert_int_equal(sample_with(x, 6, &p, 0), -EDOM);
	p.top_k = 0;
	assert_int_equal(sample_with(x, 6, &p, 0), -EDOM);
	/* a temperature so small that logit / T overflows is greedy, not a uniform draw over the
	 * overflowed logits */
	float w[6] = { 5, 4, 3, -INFINITY, 1, 2 };
	p.top_k = 0;
	p.temperature = 1e-38f;
	for (int seed = 0; seed < 50; seed++)
		assert_int_equal(sample_with(w, 6, &p, (uint64_t)seed), 0);
	p.temperature = 0.7f;
	/* min_p above 1 (outside its range) keeps nothing: no token, not one read before the array */
	float y[6] = { 1, 3, 0, 3, -1, 2 };
	p.min_p = 1.5f;
	assert_int_equal(sample_with(y, 6, &p, 0), -EDOM);
	q3_sampler_free(&S);
}

static void test_matches_the_naive_reference_across_parameters(void **st)
{
	enum { V = 5000 };
	static float x[V];
	static const float temps[] = { 0.3f, 0.7f, 1.0f, 1.5f };
	static const int ks[] = { 0, 2, 20, 64, 65, 300, V - 1, V };
	static const float ps[] = { 1.0f, 0.95f, 0.8f, 0.3f, 0.01f };
	static const float mps[] = { 0.0f, 0.05f, 0.5f };
	int checked = 0;

	init(V);
	for (int t = 0; t < 4; t++)
		for (int k = 0; k < 8; k++)
			for (int pi = 0; pi < 5; pi++)
				for (int mi = 0; mi < 3; mi++) {
					struct q3_sampling p;
					q3_sampling_default(&p);
					p.temperature = temps[t];
					p.top_k = ks[k];
					p.top_p = ps[pi];
					p.min_p = mps[mi];
					p.seed = 1000u + t * 97 + k * 13 + pi * 5 + mi;
					fill(x, V, (unsigned)p.seed, 8.0f);
					for (int step = 0; step < 3; step++) {
						int got = sample_with(x, V, &p, step);
						int want = ref_sample(x, V, &p, step);
						if (got != want)
							fail_msg("T=%g k=%d p=%g min_p=%g step %d: %d, reference %d",
								 p.temperature, p.top_k, p.top_p, p.min_p, step, got, want);
						checked++;
					}
				}
	assert_int_equal(checked, 4 * 8 * 5 * 3 * 3);
	q3_sampler_free(&S);
}

static void test_ties_and_repeated_values_select_the_right_top_k(void **st)
{
	enum { V = 1000 };
	static float x[V];
	init(V);
	for (int i = 0; i < V; i++)
		x[i] = (float)(i % 7); /* many equal values: ties are broken by id */
	for (int k = 1; k < 300; k += 37) {
		struct q3_sampling p;
		q3_sampling_default(&p);
		p.top_k = k;
		p.seed = k;
		for (int step = 0; step < 5; step++)
			assert_int_equal(sample_with(x, V, &p, step), ref_sample(x, V, &p, step));
	}
	q3_sampler_free(&S);
}

static void test_filters_keep_only_what_they_promise(void **st)
{
	/* probabilities 0.5, 0.3, 0.15, 0.05 */
	float x[4] = { logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f) };
	int hits[4];
	struct q3_sampling p;
	init(4);

	q3_sampling_default(&p);
	p.top_p = 0.75f; /* 0.5 < 0.75 <= 0.8: ids 0 and 1 */
	memset(hits, 0, sizeof(hits));
	for (int s = 0; s < 2000; s++)
		hits[sample_with(x, 4, &p, s)]++;
	assert_true(hits[0] > 0 && hits[1] > 0 && hits[2] == 0 && hits[3] == 0);
	/* renormalised: 0.625 / 0.375; 2000 draws: sigma ~ 11 */
	assert_true(abs(hits[0] - 1250) < 80);

	q3_sampling_default(&p);
	p.min_p = 0.25f; /* p >= 0.125: ids 0, 1, 2 */
	memset(hits, 0, sizeof(hits));
	for (int s = 0; s < 2000; s++)
		hits[sample_with(x, 4, &p, s)]++;
	assert_true(hits[0] && hits[1] && hits[2] && hits[3] == 0);

	q3_sampling_default(&p);
	p.top_k = 3;
	p.top_p = 0.5f; /* the first token alone reaches 0.5 of the top-3 mass (0.5/0.95) */
	for (int s = 0; s < 200; s++)
		assert_int_equal(sample_with(x, 4, &p, s), 0);

	q3_sampling_default(&p); /* no filter: every id appears, in proportion */
	memset(hits, 0, sizeof(hits));
	for (int s = 0; s < 20000; s++)
		hits[sample_with(x, 4, &p, s)]++;
	assert_true(abs(hits[0] - 10000) < 400 && abs(hits[1] - 6000) < 400);
	assert_true(abs(hits[2] - 3000) < 300 && abs(hits[3] - 1000) < 200);
	q3_sampler_free(&S);
}

static void test_temperature_sharpens_and_flattens(void **st)
{
	float x[2] = { 1.0f, 0.0f };
	struct q3_sampling p;
	int cold = 0, hot = 0;
	init(2);
	q3_sampling_default(&p);
	p.temperature = 0.1f; /* p0 = 1/(1+e^-10) */
	for (int s = 0; s < 2000; s++)
		cold += sample_with(x, 2, &p, s) == 0;
	p.temperature = 100.0f; /* p0 ~ 0.5025 */
	for (int s = 0; s < 2000; s++)
		hot += sample_with(x, 2, &p, s) == 0;
	assert_true(cold > 1990);
	assert_true(abs(hot - 1005) < 100);
	q3_sampler_free(&S);
}

static void test_penalties_count_only_accepted_tokens(void **st)
{
	float x[3], y[3];
	struct q3_sampling p;
	init(3);
	q3_sampling_default(&p);
	p.temperature = 0;
	p.presence_penalty = 0.5f;
	p.frequency_penalty = 0.25f;
	q3_sampler_reset(&S, &p);
	q3_sampler_accept(&S, 0);
	q3_sampler_accept(&S, 0);
	q3_sampler_accept(&S, 2);
	q3_sampler_accept(&S, 7); /* outside the vocabulary: ignored */
	x[0] = 2.0f, x[1] = 1.1f, x[2] = 1.0f;
	/* 0: 2 - 0.5 - 0.5 = 1.0; 1: 1.1; 2: 1 - 0.5 - 0.25 = 0.25 */
	assert_int_equal(q3_sampler_sample(&S, x), 1);
	assert_float_equal(x[0], 1.0f, 1e-6);
	assert_float_equal(x[1], 1.1f, 1e-6);
	assert_float_equal(x[2], 0.25f, 1e-6);

	q3_sampler_reset(&S, &p); /* a new request forgets the counts */
	y[0] = 2.0f, y[1] = 1.1f, y[2] = 1.0f;
	assert_int_equal(q3_sampler_sample(&S, y), 0);
	assert_float_equal(y[0], 2.0f, 0);
	q3_sampler_free(&S);
}

static void test_logit_bias_is_added_before_everything(void **st)
{
	float x[4] = { 1, 2, 3, 4 };
	struct q3_logit_bias b[] = { { 0, 10.0f }, { 3, -100.0f }, { 9, 50.0f } }; /* 9: ignored */
	struct q3_sampling p;
	init(4);
	q3_sampling_default(&p);
	p.temperature = 0;
	p.bias = b;
	p.nbias = 3;
	assert_int_equal(sample_with(x, 4, &p, 0), 0);
	p.nbias = 2;
	p.bias = b + 1; /* only the -100 on id 3 */
	assert_int_equal(sample_with(x, 4, &p, 0), 2);
	q3_sampler_free(&S);
}

static void test_same_seed_same_tokens_other_seed_other_tokens(void **st)
{
	enum { V = 2000, N = 32 };
	static float x[V];
	int a[N], b[N], c[N];
	struct q3_sampling p;
	init(V);
	fill(x, V, 7, 3.0f);
	q3_sampling_default(&p);
	p.seed = 1234;
	for (int i = 0; i < N; i++)
		a[i] = sample_with(x, V, &p, i);
	for (int i = 0; i < N; i++)
		b[i] = sample_with(x, V, &p, i);
	p.seed = 1235;
	for (int i = 0; i < N; i++)
		c[i] = sample_with(x, V, &p, i);
	assert_memory_equal(a, b, sizeof(a));
	assert_memory_not_equal(a, c, sizeof(a));
	q3_sampler_free(&S);
}

/* q3_sampler_plan: the plan's adjustments applied in order, then a plain draw with its parameters
 * at its step, picks what q3_sampler_sample picks on the original logits, over many random
 * settings (bias ids repeated across the parts and outside the vocabulary, penalties, filters),
 * and both samplers advance alike. */
static void test_plan_applied_elsewhere_draws_what_the_sampler_draws(void **st)
{
	enum { V = 3000, CAP = 4096 };
	static float x[V], y[V];
	static struct q3_logit_adj adj[CAP];
	struct q3_logit_bias b[6];
	struct q3_sampler A, B, C;
	q3_err e;

	assert_int_equal(q3_sampler_init(&A, V, &e), 0);
	assert_int_equal(q3_sampler_init(&B, V, &e), 0);
	assert_int_equal(q3_sampler_init(&C, V, &e), 0);
	for (unsigned it = 0; it < 300; it++) {
		struct q3_sampling p, plain;
		struct q3_sample_row r;

		q3_sampling_default(&p);
		p.temperature = it % 5 == 0 ? 0.0f : 0.3f + (float)(it % 7) * 0.2f;
		p.top_k = it % 3 == 0 ? 0 : (int)(it % 50) + 1;
		p.top_p = it % 4 == 0 ? 1.0f : 0.5f + (float)(it % 5) * 0.1f;
		p.min_p = it % 6 == 0 ? 0.05f : 0.0f;
		p.presence_penalty = it % 2 ? 0.0f : 0.7f;
		p.frequency_penalty = it % 3 ? 0.3f : 0.0f;
		p.seed = it * 7919u;
		for (int i = 0; i < 6; i++) /* ids 0-39: some are also generated (penalised) ones */
			b[i] = (struct q3_logit_bias){ i == 5 ? V + 3 : (int32_t)((it * 13 + i * 7) % 40), 2.0f - i };
		p.bias = b;
		p.nbias = 6;
		q3_sampler_reset(&A, &p);
		q3_sampler_reset(&B, &p);
		for (int i = 0; i < (int)(it % 30); i++) {
			int32_t t = (int32_t)((it + i * i) % 60);

			q3_sampler_accept(&A, t);
			q3_sampler_accept(&B, t);
		}
		A.step = B.step = it % 11;
		fill(x, V, it, 6.0f);
		memcpy(y, x, sizeof(x));
		assert_int_equal(q3_sampler_plan(&B, &r, adj, CAP), 0);
		assert_int_equal(r.nbias, 5); /* the id outside the vocabulary is dropped */
		assert_int_equal(r.npen, p.presence_penalty != 0 || p.frequency_penalty != 0 ? B.nseen : 0);
		for (int i = 0; i < r.nbias + r.npen; i++)
			y[r.adj[i].id] += r.adj[i].v;
		q3_sampling_default(&plain);
		plain.temperature = r.temperature;
		plain.top_k = r.top_k;
		plain.top_p = r.top_p;
		plain.min_p = r.min_p;
		plain.seed = r.seed;
		q3_sampler_reset(&C, &plain);
		C.step = r.step;
		assert_int_equal(q3_sampler_sample(&C, y), q3_sampler_sample(&A, x));
		assert_true(A.step == B.step);
	}
	q3_sampler_free(&A);
	q3_sampler_free(&B);
	q3_sampler_free(&C);
}

/* A plan that cannot be made (two bias entries on one id: their order matters; too many
 * entries) leaves the sampler as it was: same step, same counts. */
static void test_plan_refuses_repeated_bias_ids_and_overflow_without_side_effects(void **st)
{
	struct q3_logit_bias b[3] = { { 4, 1.0f }, { 2, 1.0f }, { 4, -1.0f } };
	struct q3_logit_adj adj[8];
	struct q3_sample_row r;
	struct q3_sampling p;

	init(10);
	q3_sampling_default(&p);
	p.presence_penalty = 1.0f;
	p.bias = b;
	p.nbias = 3;
	q3_sampler_reset(&S, &p);
	q3_sampler_accept(&S, 4);
	q3_sampler_accept(&S, 5);
	assert_int_equal(q3_sampler_plan(&S, &r, adj, 8), -EEXIST);
	assert_int_equal(S.step, 0);
	assert_int_equal(S.count[4], 1);
	assert_int_equal(S.count[2], 0);
	p.nbias = 2; /* ids 4 and 2, plus penalties on 4 and 5: four entries */
	q3_sampler_reset(&S, &p);
	q3_sampler_accept(&S, 4);
	q3_sampler_accept(&S, 5);
	assert_int_equal(q3_sampler_plan(&S, &r, adj, 3), -ENOSPC);
	assert_int_equal(q3_sampler_plan(&S, &r, adj, 1), -ENOSPC);
	assert_int_equal(S.step, 0);
	assert_int_equal(S.count[4], 1);
	assert_int_equal(S.count[5], 1);
	assert_int_equal(q3_sampler_plan(&S, &r, adj, 4), 0);
	assert_int_equal(S.step, 1);
	assert_int_equal(r.step, 0);
	assert_int_equal(r.nbias, 2);
	assert_int_equal(r.npen, 2);
	assert_int_equal(r.adj[2].id, 4);
	assert_float_equal(r.adj[2].v, -1.0f, 0);
	q3_sampler_free(&S);
}

static void test_init_rejects_an_empty_vocabulary(void **st)
{
	q3_err e;
	struct q3_sampler s;
	assert_int_equal(q3_sampler_init(&s, 0, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "vocabulary"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_uniform_is_in_range_and_depends_on_seed_and_step),
		cmocka_unit_test(test_greedy_takes_the_argmax_lowest_id_on_ties_and_skips_nan),
		cmocka_unit_test(test_matches_the_naive_reference_across_parameters),
		cmocka_unit_test(test_ties_and_repeated_values_select_the_right_top_k),
		cmocka_unit_test(test_filters_keep_only_what_they_promise),
		cmocka_unit_test(test_temperature_sharpens_and_flattens),
		cmocka_unit_test(test_penalties_count_only_accepted_tokens),
		cmocka_unit_test(test_logit_bias_is_added_before_everything),
		cmocka_unit_test(test_same_seed_same_tokens_other_seed_other_tokens),
		cmocka_unit_test(test_plan_applied_elsewhere_draws_what_the_sampler_draws),
		cmocka_unit_test(test_plan_refuses_repeated_bias_ids_and_overflow_without_side_effects),
		cmocka_unit_test(test_init_rejects_an_empty_vocabulary),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
