/* test_parity.c - the CPU backend against Hugging Face on every model fixture: the hidden state
 * after every layer (so that a regression names the first layer that drifts), the prefill
 * logits and the decode logits (relative L2 <= 1e-4 and the same argmax at every position). */
#include "testutil.h"

#include "backend.h"
#include "engine.h"

#define TOL 1e-4

struct trace {
	float *h; /* [L1][T][H] */
	int T, H, L1;
	int bad;  /* calls that did not fit */
};

static void on_layer(void *ctx, int layer, const float *h, int ntok, int H)
{
	struct trace *tr = ctx;

	if (layer + 1 >= tr->L1 || ntok != tr->T || H != tr->H) {
		tr->bad++;
		return;
	}
	memcpy(tr->h + (size_t)(layer + 1) * tr->T * H, h, sizeof(float) * (size_t)ntok * H);
}

/* Per-layer hidden states: prints every layer's error, fails at the first over TOL. */
static void check_hidden(const char *name, const struct trace *tr, const struct fixture_ref *r)
{
	int first = -1;

	for (int l = 0; l < r->L1; l++) {
		size_t n = (size_t)r->T * r->H;
		double e = rel_l2(tr->h + l * n, r->hidden + l * n, n);

		if (l)
			printf("  %s layer %d: rel L2 %.3e\n", name, l - 1, e);
		else
			printf("  %s embeddings: rel L2 %.3e\n", name, e);
		if (e > TOL && first < 0)
			first = l;
	}
	if (first >= 0) {
		if (first == 0)
			fail_msg("%s: the embeddings differ from prefill_hidden[0]", name);
		fail_msg("%s: the first layer that drifts is layer %d (prefill_hidden[%d])", name, first - 1,
			 first);
	}
}

static void check_logits(const char *name, const char *what, const float *got, const float *want,
			 int rows, int V)
{
	char label[128];

	snprintf(label, sizeof(label), "%s %s", name, what);
	assert_int_equal(check_close(label, got, want, (size_t)rows * V, TOL), 0);
	for (int i = 0; i < rows; i++) {
		int a = argmax_f(got + (size_t)i * V, V), b = argmax_f(want + (size_t)i * V, V);

		if (a != b)
			fail_msg("%s: argmax at position %d is %d, expected %d", label, i, a, b);
	}
	printf("%s: rel L2 %.3e over %d positions, argmax equal everywhere\n", label,
	       rel_l2(got, want, (size_t)rows * V), rows);
}

static void parity(const char *name)
{
	char dir[256];
	struct fixture_ref r;
	struct q3_engine *eng = NULL;
	struct q3_session *s = NULL;
	struct trace tr = { 0 };
	float *pre, *dec;
	q3_err e = { { 0 } };

	snprintf(dir, sizeof(dir), "%s/%s", FIXTURES, name);
	assert_int_equal(fixture_ref_load(dir, &r), 0);
	struct q3_engine_opts o = { .model_dir = dir, .backend = "cpu", .threads = 2,
				    .max_ctx = r.T + r.G, .max_batch = 1, .quiet = true };
	if (q3_engine_open(&o, &eng, &e) || q3_session_new(eng, &s, &e))
		fail_msg("%s: %s", name, e.msg);
	assert_int_equal(q3_engine_config(eng)->vocab_size, r.V);
	assert_int_equal(q3_engine_config(eng)->num_layers + 1, r.L1);

	tr = (struct trace){ .T = r.T, .H = r.H, .L1 = r.L1 };
	tr.h = calloc((size_t)r.L1 * r.T * r.H, sizeof(float));
	pre = malloc(sizeof(float) * (size_t)r.T * r.V);
	dec = malloc(sizeof(float) * (size_t)r.G * r.V);
	assert_non_null(tr.h);
	assert_non_null(pre);
	assert_non_null(dec);
	assert_int_equal(q3_engine_set_trace(eng, on_layer, &tr), 0);
	if (q3_session_eval(s, r.prompt, r.T, pre, Q3_EVAL_ALL_LOGITS, &e))
		fail_msg("%s: prefill: %s", name, e.msg);
	assert_int_equal(tr.bad, 0);
	q3_engine_set_trace(eng, NULL, NULL);
	check_hidden(name, &tr, &r);
	check_logits(name, "prefill_logits", pre, r.prefill, r.T, r.V);

	for (int i = 0; i < r.G; i++)
		if (q3_engine_decode(eng, &s, &r.gen[i], 1, dec + (size_t)i * r.V, &e))
			fail_msg("%s: decode step %d: %s", name, i, e.msg);
	check_logits(name, "decode_logits", dec, r.decode, r.G, r.V);
	assert_int_equal(q3_session_pos(s), r.T + r.G);

	free(tr.h);
	free(pre);
	free(dec);
	q3_session_free(s);
	q3_engine_close(eng);
	fixture_ref_free(&r);
}

static void test_tiny_sym(void **state)
{
	parity("tiny-sym");
}

static void test_tiny_actorder(void **state)
{
	parity("tiny-actorder");
}

static void test_tiny_mixed(void **state)
{
	parity("tiny-mixed");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_tiny_sym),
		cmocka_unit_test(test_tiny_actorder),
		cmocka_unit_test(test_tiny_mixed),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
