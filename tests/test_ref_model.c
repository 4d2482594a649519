/* test_ref_model.c - the reference ops on the fixtures' real weights:
 *  - every Linear of every fixture (dense, GPTQ 4/8-bit, act-order, asym, no g_idx) through
 *    q3_ref_linear and the CPU backend's q3_cpu_linear_rows, against x·Wᵀ with W from dequant.c;
 *  - each decoder layer composed from the reference ops alone (recurrent delta rule token by
 *    token, q3_ref_attention, q3_ref_moe), fed Hugging Face's input to that layer and compared to
 *    Hugging Face's output of it: the ops are right independently of the CPU backend's schedule. */
#include "testutil.h"

#include "checkpoint.h"
#include "cpu_linear.h"
#include "cpu_ref.h"
#include "dequant.h"
#include "model.h"

/* Tokens of each prompt pushed through the reference layers (enough to cover a few positions
 * of every op; the reference matvec is slow). */
#define REF_TOKENS 12

struct fx {
	struct q3_ckpt *ck;
	struct q3_model *m;
};

static void fx_open(const char *name, struct fx *f)
{
	char dir[256];
	q3_err e = { { 0 } };

	snprintf(dir, sizeof(dir), "%s/%s", FIXTURES, name);
	if (q3_ckpt_open(dir, &f->ck, &e) || q3_model_bind(f->ck, &f->m, &e) || q3_ckpt_map(f->ck, &e) ||
	    q3_model_check_data(f->m, &e))
		fail_msg("%s: %s", name, e.msg);
}

static void fx_close(struct fx *f)
{
	q3_model_free(f->m);
	q3_ckpt_close(f->ck);
}

/* ---- every Linear against dequant.c ------------------------------------------------------- */

static void check_linear(const struct q3_linear *l, int *count)
{
	enum { T = 2 };
	int K = l->K, N = l->N;
	float *W = malloc(sizeof(float) * (size_t)K * N), *x = malloc(sizeof(float) * T * K);
	float *want = malloc(sizeof(float) * (size_t)T * N), *y = malloc(sizeof(float) * (size_t)T * N);
	struct q3_cpu_linear cl;
	char name[256], what[320];
	q3_err e;

	q3_linear_name(l, name, sizeof(name));
	q3_linear_dequant(l, W);
	rng_fill(x, (size_t)T * K, 1);
	for (int t = 0; t < T; t++)
		for (int n = 0; n < N; n++) {
			double s = 0;

			for (int k = 0; k < K; k++)
				s += (double)x[t * K + k] * W[(size_t)n * K + k];
			want[(size_t)t * N + n] = (float)s;
		}
	assert_int_equal(q3_cpu_linear_prepare(&cl, l, &e), 0);
	q3_cpu_linear_rows(&cl, x, (size_t)K, T, y, (size_t)N, 0, N);
	snprintf(what, sizeof(what), "%s: q3_cpu_linear_rows", name);
	assert_int_equal(check_close(what, y, want, (size_t)T * N, 1e-5), 0);
	q3_cpu_linear_release(&cl);
	q3_ref_linear(l, x, T, y);
	snprintf(what, sizeof(what), "%s: q3_ref_linear", name);
	assert_int_equal(check_close(what, y, want, (size_t)T * N, 1e-5), 0);
	(*count)++;
	free(W);
	free(x);
	free(want);
	free(y);
}

static void all_linears(const char *fixture)
{
	struct fx f;
	int count = 0;

	fx_open(fixture, &f);
	rng_seed(42);
	for (int i = 0; i < f.m->cfg->num_layers; i++) {
		const struct q3_layer *L = &f.m->layers[i];

		if (L->kind == Q3_LAYER_LINEAR) {
			check_linear(&L->qkvz, &count);
			check_linear(&L->ba, &count);
			check_linear(&L->lin_out, &count);
		} else {
			check_linear(&L->q, &count);
			check_linear(&L->k, &count);
			check_linear(&L->v, &count);
			check_linear(&L->o, &count);
		}
		check_linear(&L->router, &count);
		check_linear(&L->shared_gate, &count);
		for (int x = 0; x <= f.m->cfg->num_experts; x++) {
			const struct q3_expert *ex = x < f.m->cfg->num_experts ? &L->experts[x] : &L->shared;

			check_linear(&ex->gate, &count);
			check_linear(&ex->up, &count);
			check_linear(&ex->down, &count);
		}
	}
	check_linear(&f.m->lm_head, &count);
	printf("%s: %d Linears agree with dequant.c\n", fixture, count);
	fx_close(&f);
}

static void test_linears_sym(void **state)
{
	all_linears("tiny-sym");
}

static void test_linears_actorder(void **state)
{
	all_linears("tiny-actorder");
}

static void test_linears_mixed(void **state)
{
	all_linears("tiny-mixed");
}

/* ---- decoder layers from the reference ops ------------------------------------------------ */

static float *f32(const struct q3_tensor *t)
{
	float *p = malloc(sizeof(float) * q3_tensor_numel(t));

	q3_tensor_to_f32(t, p);
	return p;
}

/* mixer(x) of a Gated DeltaNet layer for T tokens, one recurrent step at a time. */
static void ref_linear_attn(const struct q3_config *c, const struct q3_layer *L, const float *x, int T,
			    float *out)
{
	int Nk = c->lin_num_k_heads, Nv = c->lin_num_v_heads, Dk = c->lin_k_dim, Dv = c->lin_v_dim;
	int W = c->conv_kernel;
	float *qkvz = malloc(sizeof(float) * c->qkvz_dim), *ba = malloc(sizeof(float) * c->ba_dim);
	float *mixed = malloc(sizeof(float) * c->conv_dim), *u = malloc(sizeof(float) * c->conv_dim);
	float *z = malloc(sizeof(float) * c->lin_value_dim), *core = malloc(sizeof(float) * c->lin_value_dim);
	float *b = malloc(sizeof(float) * Nv), *a = malloc(sizeof(float) * Nv);
	float *beta = malloc(sizeof(float) * Nv), *g = malloc(sizeof(float) * Nv);
	float *qn = malloc(sizeof(float) * c->lin_key_dim), *kn = malloc(sizeof(float) * c->lin_key_dim);
	float *conv_state = calloc((size_t)(W - 1) * c->conv_dim, sizeof(float));
	float *S = calloc((size_t)Nv * Dk * Dv, sizeof(float));
	float *conv_w = f32(L->conv1d), *A_log = f32(L->A_log), *dt = f32(L->dt_bias), *nw = f32(L->lin_norm);

	for (int t = 0; t < T; t++) {
		q3_ref_linear(&L->qkvz, x + (size_t)t * c->hidden_size, 1, qkvz);
		q3_ref_linear(&L->ba, x + (size_t)t * c->hidden_size, 1, ba);
		q3_ref_qkvz_split(qkvz, ba, Nk, Nv, Dk, Dv, mixed, z, b, a);
		q3_ref_delta_gates(beta, g, b, a, A_log, dt, Nv);
		q3_ref_conv1d_silu(u, mixed, 1, c->conv_dim, conv_w, W, conv_state);
		for (int h = 0; h < Nk; h++)
			q3_ref_delta_qk(qn + h * Dk, kn + h * Dk, u + h * Dk, u + c->lin_key_dim + h * Dk, Dk);
		for (int j = 0; j < Nv; j++) {
			int kh = j / (Nv / Nk);

			q3_ref_delta_step(S + (size_t)j * Dk * Dv, qn + kh * Dk, kn + kh * Dk,
					  u + 2 * c->lin_key_dim + j * Dv, g[j], beta[j], core + j * Dv, Dk, Dv);
			q3_ref_rmsnorm_gated(core + j * Dv, core + j * Dv, z + j * Dv, nw, Dv, c->rms_eps);
		}
		q3_ref_linear(&L->lin_out, core, 1, out + (size_t)t * c->hidden_size);
	}
	void *all[] = { qkvz, ba, mixed, u, z, core, b, a, beta, g, qn, kn, conv_state, S, conv_w, A_log, dt, nw };
	for (size_t i = 0; i < Q3_ARRAY_SIZE(all); i++)
		free(all[i]);
}

/* mixer(x) of a gated full-attention layer for T tokens with a growing KV cache. */
static void ref_full_attn(const struct q3_config *c, const struct q3_layer *L, const float *x, int T,
			  float *out)
{
	int D = c->head_dim;
	float *qg = malloc(sizeof(float) * 2 * c->q_dim), *q = malloc(sizeof(float) * c->q_dim);
	float *gate = malloc(sizeof(float) * c->q_dim), *o = malloc(sizeof(float) * c->q_dim);
	float *K = malloc(sizeof(float) * (size_t)T * c->kv_dim), *V = malloc(sizeof(float) * (size_t)T * c->kv_dim);
	float *sc = malloc(sizeof(float) * T), *qw = f32(L->q_norm), *kw = f32(L->k_norm);

	for (int t = 0; t < T; t++) {
		const float *xt = x + (size_t)t * c->hidden_size;
		float *Kt = K + (size_t)t * c->kv_dim;

		q3_ref_linear(&L->q, xt, 1, qg);
		q3_ref_linear(&L->k, xt, 1, Kt);
		q3_ref_linear(&L->v, xt, 1, V + (size_t)t * c->kv_dim);
		for (int h = 0; h < c->num_heads; h++) {
			q3_ref_rmsnorm(q + h * D, qg + 2 * h * D, qw, D, c->rms_eps);
			q3_ref_rope(q + h * D, c->rotary_dim, t, c->rope_theta);
			memcpy(gate + h * D, qg + 2 * h * D + D, sizeof(float) * D);
		}
		for (int j = 0; j < c->num_kv_heads; j++) {
			q3_ref_rmsnorm(Kt + j * D, Kt + j * D, kw, D, c->rms_eps);
			q3_ref_rope(Kt + j * D, c->rotary_dim, t, c->rope_theta);
		}
		q3_ref_attention(o, q, gate, K, V, t + 1, c->num_heads, c->num_kv_heads, D, 1.0f / sqrtf((float)D), sc);
		q3_ref_linear(&L->o, o, 1, out + (size_t)t * c->hidden_size);
	}
	void *all[] = { qg, q, gate, o, K, V, sc, qw, kw };
	for (size_t i = 0; i < Q3_ARRAY_SIZE(all); i++)
		free(all[i]);
}

/* hout = layer(hin) for T tokens (qwen3next.md 4.3). */
static void ref_layer(const struct q3_config *c, const struct q3_layer *L, const float *hin, int T, float *hout)
{
	int H = c->hidden_size;
	float *xn = malloc(sizeof(float) * (size_t)T * H), *mix = malloc(sizeof(float) * (size_t)T * H);
	float *in_w = f32(L->input_norm), *post_w = f32(L->post_norm);
	float *scratch = malloc(sizeof(float) * q3_ref_moe_scratch(c)), *y = malloc(sizeof(float) * H);

	for (int t = 0; t < T; t++)
		q3_ref_rmsnorm(xn + (size_t)t * H, hin + (size_t)t * H, in_w, H, c->rms_eps);
	if (L->kind == Q3_LAYER_LINEAR)
		ref_linear_attn(c, L, xn, T, mix);
	else
		ref_full_attn(c, L, xn, T, mix);
	for (int t = 0; t < T; t++) {
		float *h = hout + (size_t)t * H;

		for (int i = 0; i < H; i++)
			h[i] = hin[(size_t)t * H + i] + mix[(size_t)t * H + i];
		q3_ref_rmsnorm(xn, h, post_w, H, c->rms_eps);
		q3_ref_moe(c, L, xn, y, scratch);
		for (int i = 0; i < H; i++)
			h[i] += y[i];
	}
	void *all[] = { xn, mix, in_w, post_w, scratch, y };
	for (size_t i = 0; i < Q3_ARRAY_SIZE(all); i++)
		free(all[i]);
}

static void ref_layers(const char *fixture)
{
	char dir[256];
	struct fixture_ref r;
	struct fx f;
	int T, H;
	float *h, *in;

	snprintf(dir, sizeof(dir), "%s/%s", FIXTURES, fixture);
	assert_int_equal(fixture_ref_load(dir, &r), 0);
	fx_open(fixture, &f);
	T = Q3_MIN(REF_TOKENS, r.T);
	H = r.H;
	h = malloc(sizeof(float) * (size_t)T * H);
	in = malloc(sizeof(float) * (size_t)T * H);
	for (int l = 0; l < f.m->cfg->num_layers; l++) {
		char what[96];

		/* HF's input to layer l: the first T positions of prefill_hidden[l] */
		for (int t = 0; t < T; t++)
			memcpy(in + (size_t)t * H, r.hidden + ((size_t)l * r.T + t) * H, sizeof(float) * H);
		ref_layer(f.m->cfg, &f.m->layers[l], in, T, h);
		for (int t = 0; t < T; t++)
			memcpy(in + (size_t)t * H, r.hidden + ((size_t)(l + 1) * r.T + t) * H, sizeof(float) * H);
		snprintf(what, sizeof(what), "%s layer %d (%s) from reference ops", fixture, l,
			 q3_layer_kind_name(f.m->layers[l].kind));
		assert_int_equal(check_close(what, h, in, (size_t)T * H, 1e-4), 0);
		printf("%s: rel L2 %.2e\n", what, rel_l2(h, in, (size_t)T * H));
	}
	free(h);
	free(in);
	fx_close(&f);
	fixture_ref_free(&r);
}

static void test_layers_sym(void **state)
{
	ref_layers("tiny-sym");
}

static void test_layers_actorder(void **state)
{
	ref_layers("tiny-actorder");
}

static void test_layers_mixed(void **state)
{
	ref_layers("tiny-mixed");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_linears_sym),
		cmocka_unit_test(test_linears_actorder),
		cmocka_unit_test(test_linears_mixed),
		cmocka_unit_test(test_layers_sym),
		cmocka_unit_test(test_layers_actorder),
		cmocka_unit_test(test_layers_mixed),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
