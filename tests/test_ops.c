/* test_ops.c - every reference op (kernels/cpu_ref.h) on small hand-checkable cases, the
 * chunked delta rule against the recurrence, and the matvecs (q3_ref_linear and the CPU
 * backend's q3_cpu_linear_rows) on synthetic GPTQ and dense weights packed here independently of
 * dequant.c, checked against both dequant.c and a plain loop over the unpacked codes. */
#include "testutil.h"

#include "cpu_linear.h"
#include "cpu_ref.h"
#include "dequant.h"
#include "half.h"

#define EPS 1e-6f

static void assert_near(float got, double want, double tol)
{
	if (!(fabs(got - want) <= tol * (1.0 + fabs(want))))
		fail_msg("got %.9g, expected %.9g", got, want);
}

/* ---- norms -------------------------------------------------------------------------------- */

static void test_rmsnorm(void **state)
{
	float x[4] = { 1, 2, 3, 4 }, w[4] = { 0, 0.5f, -0.5f, 1 }, z[4] = { 0, 1, -1, 2 }, y[4];
	double r = 1.0 / sqrt(7.5 + 1e-6); /* mean of squares 30 / 4 */

	q3_ref_rmsnorm(y, x, w, 4, EPS);
	assert_near(y[0], 1 * r * 1.0, 1e-6);
	assert_near(y[1], 2 * r * 1.5, 1e-6);
	assert_near(y[2], 3 * r * 0.5, 1e-6);
	assert_near(y[3], 4 * r * 2.0, 1e-6);

	/* gated: plain weight, times silu(z) */
	q3_ref_rmsnorm_gated(y, x, z, w, 4, EPS);
	assert_near(y[0], 0.0, 1e-6);
	assert_near(y[1], 0.5 * 2 * r * (1 / (1 + exp(-1.0))), 1e-6);
	assert_near(y[2], -0.5 * 3 * r * (-1 / (1 + exp(1.0))), 1e-6);
	assert_near(y[3], 1.0 * 4 * r * (2 / (1 + exp(-2.0))), 1e-6);

	/* in place */
	q3_ref_rmsnorm(x, x, w, 4, EPS);
	assert_near(x[3], 4 * r * 2.0, 1e-6);

	float v[2] = { 3, 4 };
	q3_ref_l2norm(v, v, 2, EPS);
	assert_near(v[0], 0.6, 1e-6);
	assert_near(v[1], 0.8, 1e-6);
}

/* ---- rotary ------------------------------------------------------------------------------- */

static void test_rope(void **state)
{
	/* rot 4 of a 6-dim head: pairs (0, 2) at frequency 1 and (1, 3) at theta^-1/2; 4, 5 pass */
	float x[6] = { 1, 1, 0, 2, 5, 6 }, y[6];
	double f1 = 1.0 / sqrt(10000.0);

	memcpy(y, x, sizeof(x));
	q3_ref_rope(y, 4, 0, 10000.0);
	for (int i = 0; i < 6; i++)
		assert_near(y[i], x[i], 0);

	memcpy(y, x, sizeof(x));
	q3_ref_rope(y, 4, 3, 10000.0);
	assert_near(y[0], 1 * cos(3.0) - 0 * sin(3.0), 1e-6);
	assert_near(y[2], 0 * cos(3.0) + 1 * sin(3.0), 1e-6);
	assert_near(y[1], 1 * cos(3 * f1) - 2 * sin(3 * f1), 1e-6);
	assert_near(y[3], 2 * cos(3 * f1) + 1 * sin(3 * f1), 1e-6);
	assert_near(y[4], 5, 0);
	assert_near(y[5], 6, 0);

	/* rotating by p then by q is rotating by p + q (within fp32) */
	float a[8], b[8];
	rng_seed(7);
	rng_fill(a, 8, 1);
	memcpy(b, a, sizeof(a));
	q3_ref_rope(a, 8, 5, 1e7);
	q3_ref_rope(a, 8, 7, 1e7);
	q3_ref_rope(b, 8, 12, 1e7);
	for (int i = 0; i < 8; i++)
		assert_near(a[i], b[i], 1e-5);
}

/* ---- attention ---------------------------------------------------------------------------- */

static void test_attention(void **state)
{
	float q[2] = { 1, 0 }, gate[2] = { 0, 0 }, out[2], sc[2];
	float K[4] = { 1, 0, 0, 1 }, V[4] = { 1, 2, 3, 4 };
	double p0 = exp(1.0) / (exp(1.0) + 1), p1 = 1 / (exp(1.0) + 1);

	q3_ref_attention_head(out, q, gate, K, V, 2, 2, 2, 1.0f, sc);
	assert_near(out[0], 0.5 * (p0 * 1 + p1 * 3), 1e-6);
	assert_near(out[1], 0.5 * (p0 * 2 + p1 * 4), 1e-6);

	/* causal limit: one visible row gives that row's V times the gate */
	gate[0] = 2;
	q3_ref_attention_head(out, q, gate, K, V, 2, 1, 2, 1.0f, sc);
	assert_near(out[0], 1 / (1 + exp(-2.0)), 1e-6);
	assert_near(out[1], 2 * 0.5, 1e-6);

	/* GQA: 4 query heads over 2 kv heads; heads 0-1 read kv head 0, heads 2-3 kv head 1 */
	float q4[8] = { 0 }, g4[8] = { 0 }, o4[8], K1[4] = { 0 }, V1[4] = { 1, 2, 3, 4 };
	q3_ref_attention(o4, q4, g4, K1, V1, 1, 4, 2, 2, 0.5f, sc);
	float want[8] = { 0.5f, 1, 0.5f, 1, 1.5f, 2, 1.5f, 2 };
	for (int i = 0; i < 8; i++)
		assert_near(o4[i], want[i], 1e-6);
}

/* ---- Gated DeltaNet pieces ---------------------------------------------------------------- */

static void test_qkvz_split(void **state)
{
	/* Nk 2, Nv 4 (2 value heads per key head), Dk 2, Dv 3: a group is 2 + 2 + 6 + 6 = 16 */
	float qkvz[32], ba[8], mixed[4 + 4 + 12], z[12], b[4], a[4];
	float wq[4] = { 0, 1, 16, 17 }, wk[4] = { 2, 3, 18, 19 };
	float wv[12] = { 4, 5, 6, 7, 8, 9, 20, 21, 22, 23, 24, 25 };
	float wz[12] = { 10, 11, 12, 13, 14, 15, 26, 27, 28, 29, 30, 31 };
	float wb[4] = { 0, 1, 4, 5 }, wa[4] = { 2, 3, 6, 7 };

	for (int i = 0; i < 32; i++)
		qkvz[i] = (float)i;
	for (int i = 0; i < 8; i++)
		ba[i] = (float)i;
	q3_ref_qkvz_split(qkvz, ba, 2, 4, 2, 3, mixed, z, b, a);
	assert_memory_equal(mixed, wq, sizeof(wq));
	assert_memory_equal(mixed + 4, wk, sizeof(wk));
	assert_memory_equal(mixed + 8, wv, sizeof(wv));
	assert_memory_equal(z, wz, sizeof(wz));
	assert_memory_equal(b, wb, sizeof(wb));
	assert_memory_equal(a, wa, sizeof(wa));
}

static void test_conv(void **state)
{
	/* one channel, width 4: w multiplies [t-3, t-2, t-1, t] */
	float w[4] = { 0.5f, -1, 2, 3 }, x[3] = { 1, 2, 3 }, st[3] = { 0 }, y[3], x4 = 4, y4;

	q3_ref_conv1d_silu(y, x, 3, 1, w, 4, st);
	assert_near(y[0], q3_silu(3 * 1), 1e-6);
	assert_near(y[1], q3_silu(2 * 1 + 3 * 2), 1e-6);
	assert_near(y[2], q3_silu(-1 * 1 + 2 * 2 + 3 * 3), 1e-6);
	assert_near(st[0], 1, 0);
	assert_near(st[1], 2, 0);
	assert_near(st[2], 3, 0);
	q3_ref_conv1d_silu(&y4, &x4, 1, 1, w, 4, st);
	assert_near(y4, q3_silu(0.5f * 1 - 1 * 2 + 2 * 3 + 3 * 4), 1e-6);
	assert_near(st[0], 2, 0);
	assert_near(st[2], 4, 0);

	/* a block of T tokens equals T single steps, bit for bit, state included */
	enum { C = 5, T = 7, W = 4 };
	float xs[T * C], wc[C * W], s1[(W - 1) * C], s2[(W - 1) * C], yb[T * C], ys[T * C];
	rng_seed(11);
	rng_fill(xs, T * C, 1);
	rng_fill(wc, C * W, 1);
	rng_fill(s1, (W - 1) * C, 1);
	memcpy(s2, s1, sizeof(s1));
	q3_ref_conv1d_silu(yb, xs, T, C, wc, W, s1);
	for (int t = 0; t < T; t++)
		q3_ref_conv1d_silu(ys + t * C, xs + t * C, 1, C, wc, W, s2);
	assert_memory_equal(yb, ys, sizeof(yb));
	assert_memory_equal(s1, s2, sizeof(s1));
	/* and a block shorter than the state (T = 2 < W - 1) shifts the state correctly */
	q3_ref_conv1d_silu(yb, xs, 2, C, wc, W, s1);
	q3_ref_conv1d_silu(ys, xs, 1, C, wc, W, s2);
	q3_ref_conv1d_silu(ys + C, xs + C, 1, C, wc, W, s2);
	assert_memory_equal(yb, ys, 2 * C * sizeof(float));
	assert_memory_equal(s1, s2, sizeof(s1));
}

static void test_delta_gates(void **state)
{
	float b[3] = { 0, 2, -1 }, a[3] = { 0, 29, -3 }, A_log[3] = { 0, logf(2), logf(0.5f) };
	float dt[3] = { 0, 1, 1 }, beta[3], g[3];

	q3_ref_delta_gates(beta, g, b, a, A_log, dt, 3);
	assert_near(beta[0], 0.5, 1e-7);
	assert_near(beta[1], 1 / (1 + exp(-2.0)), 1e-7);
	assert_near(g[0], -log(2.0), 1e-6);	    /* -1 · softplus(0) */
	assert_near(g[1], -2 * 30.0, 1e-6);	    /* softplus above 20 is the identity */
	assert_near(g[2], -0.5 * log1p(exp(-2.0)), 1e-6);
}

static void test_delta_step(void **state)
{
	/* 1x1 state: S = 0, k = q = 1, v = 2, beta 0.5, no decay -> S = 1, o = 1 */
	float S = 0, q = 1, k = 1, v = 2, o;

	q3_ref_delta_step(&S, &q, &k, &v, 0, 0.5f, &o, 1, 1);
	assert_near(S, 1, 1e-7);
	assert_near(o, 1, 1e-7);
	/* decay 1/2: S = 0.5, delta = 0.5 (2 - 0.5) = 0.75, S = 1.25, o = 1.25 */
	q3_ref_delta_step(&S, &q, &k, &v, logf(0.5f), 0.5f, &o, 1, 1);
	assert_near(S, 1.25, 1e-6);
	assert_near(o, 1.25, 1e-6);

	/* 2x2 by hand: S = [[1, 2], [3, 4]], k = (1, 0), q = (0, 1), v = (5, 6), beta 1, no decay:
	 * Sᵀk = (1, 2), delta = (4, 4), S = [[5, 6], [3, 4]], o = Sᵀq = (3, 4) */
	float S2[4] = { 1, 2, 3, 4 }, k2[2] = { 1, 0 }, q2[2] = { 0, 1 }, v2[2] = { 5, 6 }, o2[2];
	q3_ref_delta_step(S2, q2, k2, v2, 0, 1, o2, 2, 2);
	assert_near(S2[0], 5, 0);
	assert_near(S2[1], 6, 0);
	assert_near(S2[2], 3, 0);
	assert_near(o2[0], 3, 0);
	assert_near(o2[1], 4, 0);

	/* q and k preparation: l2norm, and q scaled by Dk^-1/2 */
	float qq[4] = { 2, 0, 0, 0 }, kk[4] = { 0, 0, 3, 4 };
	q3_ref_delta_qk(qq, kk, qq, kk, 4);
	assert_near(qq[0], 0.5, 1e-6);
	assert_near(kk[2], 0.6, 1e-6);
	assert_near(kk[3], 0.8, 1e-6);
}

/* The chunked form against T recurrent steps, from a zero and from a random state. */
static void delta_chunk_vs_steps(int T, bool init)
{
	enum { Dk = 16, Dv = 24, LQ = 20, LV = 27, LG = 3 }; /* strides wider than the head */
	float *q = calloc((size_t)T * LQ, sizeof(float)), *k = calloc((size_t)T * LQ, sizeof(float));
	float *v = calloc((size_t)T * LV, sizeof(float)), *g = calloc((size_t)T * LG, sizeof(float));
	float *beta = calloc((size_t)T * LG, sizeof(float));
	float *o1 = calloc((size_t)T * Dv, sizeof(float)), *o2 = calloc((size_t)T * LV, sizeof(float));
	float S1[Dk * Dv], S2[Dk * Dv], o2c[Dv];
	float *scratch = malloc(sizeof(float) * q3_ref_delta_chunked_scratch(Dk, Dv));
	char what[64];

	rng_seed(1000 + T);
	for (int t = 0; t < T; t++) {
		float qr[Dk], kr[Dk];

		rng_fill(qr, Dk, 1);
		rng_fill(kr, Dk, 1);
		q3_ref_delta_qk(q + (size_t)t * LQ, k + (size_t)t * LQ, qr, kr, Dk);
		rng_fill(v + (size_t)t * LV, Dv, 1);
		g[(size_t)t * LG] = -0.3f * (1 + rng_f());		 /* log-decay in (-0.6, 0) */
		beta[(size_t)t * LG] = 0.5f + 0.45f * rng_f();		 /* (0.05, 0.95) */
	}
	for (int i = 0; i < Dk * Dv; i++)
		S1[i] = init ? rng_f() : 0;
	memcpy(S2, S1, sizeof(S1));
	for (int t = 0; t < T; t++)
		q3_ref_delta_step(S1, q + (size_t)t * LQ, k + (size_t)t * LQ, v + (size_t)t * LV,
				  g[(size_t)t * LG], beta[(size_t)t * LG], o1 + (size_t)t * Dv, Dk, Dv);
	q3_ref_delta_chunked(S2, q, k, LQ, v, LV, g, beta, LG, o2, LV, T, Dk, Dv, scratch);
	for (int t = 0; t < T; t++) { /* compact o2's rows for the comparison */
		memcpy(o2c, o2 + (size_t)t * LV, sizeof(o2c));
		memcpy(o2 + (size_t)t * Dv, o2c, sizeof(o2c));
	}
	snprintf(what, sizeof(what), "delta chunked T=%d%s: outputs", T, init ? " (initial state)" : "");
	assert_int_equal(check_close(what, o2, o1, (size_t)T * Dv, 1e-5), 0);
	snprintf(what, sizeof(what), "delta chunked T=%d%s: final state", T, init ? " (initial state)" : "");
	assert_int_equal(check_close(what, S2, S1, Dk * Dv, 1e-5), 0);
	printf("delta chunked vs recurrent, T=%3d%s: rel L2 outputs %.2e, state %.2e\n", T,
	       init ? ", initial state" : "               ", rel_l2(o2, o1, (size_t)T * Dv),
	       rel_l2(S2, S1, Dk * Dv));
	free(q);
	free(k);
	free(v);
	free(g);
	free(beta);
	free(o1);
	free(o2);
	free(scratch);
}

static void test_delta_chunked(void **state)
{
	int lens[] = { 1, 63, 64, 65, 200 };

	for (size_t i = 0; i < Q3_ARRAY_SIZE(lens); i++) {
		delta_chunk_vs_steps(lens[i], false);
		delta_chunk_vs_steps(lens[i], true);
	}
}

/* ---- MoE pieces --------------------------------------------------------------------------- */

static void test_router_topk(void **state)
{
	float lg[5] = { 1, 3, 3, 2, 3 }, w[5];
	int idx[5];
	double den = exp(1.0) + 3 * exp(3.0) + exp(2.0);

	q3_ref_router_topk(lg, 5, 2, false, idx, w); /* three-way tie: lower indices first */
	assert_int_equal(idx[0], 1);
	assert_int_equal(idx[1], 2);
	assert_near(w[0], exp(3.0) / den, 1e-6);
	q3_ref_router_topk(lg, 5, 4, true, idx, w);
	assert_int_equal(idx[2], 4);
	assert_int_equal(idx[3], 3);
	assert_near(w[0], exp(3.0) / (3 * exp(3.0) + exp(2.0)), 1e-6);
	assert_near(w[3], exp(2.0) / (3 * exp(3.0) + exp(2.0)), 1e-6);
	assert_near(w[0] + w[1] + w[2] + w[3], 1, 1e-6);

	float flat[4] = { 0.25f, 0.25f, 0.25f, 0.25f };
	q3_ref_router_topk(flat, 4, 3, true, idx, w);
	assert_int_equal(idx[0], 0);
	assert_int_equal(idx[1], 1);
	assert_int_equal(idx[2], 2);
	assert_near(w[1], 1.0 / 3, 1e-6);
}

static void test_swiglu(void **state)
{
	float g[3] = { 0, 1, -2 }, u[3] = { 5, 2, 3 }, y[3];

	q3_ref_swiglu(y, g, u, 3);
	assert_near(y[0], 0, 0);
	assert_near(y[1], 2 / (1 + exp(-1.0)), 1e-6);
	assert_near(y[2], 3 * -2 / (1 + exp(2.0)), 1e-6);
}

/* ---- matvecs: synthetic GPTQ and dense weights -------------------------------------------- */

struct gptq_case {
	int K, N, bits, group; /* group: input channels per group (K for "-1") */
	bool act_order;	       /* permuted g_idx */
	bool no_gidx;	       /* g_idx absent (AutoRound): group k / group_size */
	bool v2;	       /* zero points stored as is (else minus one) */
	bool asym;	       /* random zero points (else 2^(bits-1)) */
	enum q3_dtype sdt;     /* F16 or BF16 scales */
};

struct fake_linear {
	struct q3_tensor qweight, qzeros, scales, g_idx, w;
	struct q3_linear l;
	int *q, *z, *gk; /* codes [K][N], zero points [G][N], group of each input [K] */
	float *s;	 /* scales as stored, in fp32 [G][N] */
	char *mem[5];
};

/* A tensor whose data starts one byte past an allocation, as packed safetensors data may. */
static void *unaligned(struct fake_linear *f, int slot, size_t bytes)
{
	f->mem[slot] = calloc(1, bytes + 1);
	return f->mem[slot] + 1;
}

static void put_u32(void *base, size_t i, uint32_t v)
{
	memcpy((char *)base + 4 * i, &v, 4);
}

static uint32_t get_u32(const void *base, size_t i)
{
	uint32_t v;

	memcpy(&v, (const char *)base + 4 * i, 4);
	return v;
}

static void make_gptq(struct fake_linear *f, const struct gptq_case *c)
{
	int K = c->K, N = c->N, P = 32 / c->bits, G = K / c->group;
	uint32_t mask = (1u << c->bits) - 1;
	int *perm = malloc(sizeof(int) * (size_t)K);

	memset(f, 0, sizeof(*f));
	f->q = malloc(sizeof(int) * (size_t)K * N);
	f->z = malloc(sizeof(int) * (size_t)G * N);
	f->gk = malloc(sizeof(int) * (size_t)K);
	f->s = malloc(sizeof(float) * (size_t)G * N);
	for (int k = 0; k < K; k++)
		perm[k] = k;
	if (c->act_order)
		for (int k = K - 1; k > 0; k--) {
			int j = (int)(rng_u32() % (uint32_t)(k + 1)), t = perm[k];

			perm[k] = perm[j];
			perm[j] = t;
		}
	for (int i = 0; i < K; i++) /* groups formed in permuted order */
		f->gk[perm[i]] = i / c->group;
	for (size_t i = 0; i < (size_t)K * N; i++)
		f->q[i] = (int)(rng_u32() & mask);
	for (size_t i = 0; i < (size_t)G * N; i++) {
		/* v1 stores z - 1 in the same width: keep z in [1, 2^bits - 1] */
		f->z[i] = c->asym ? 1 + (int)(rng_u32() % mask) : 1 << (c->bits - 1);
		float s = 0.01f + 0.05f * (rng_f() + 1);
		uint16_t h = c->sdt == Q3_DT_F16 ? q3_f32_to_f16(s) : q3_f32_to_bf16(s);

		f->s[i] = c->sdt == Q3_DT_F16 ? q3_f16_to_f32(h) : q3_bf16_to_f32(h);
	}

	f->qweight = (struct q3_tensor){ .name = "x.qweight", .dtype = Q3_DT_I32, .ndim = 2,
					 .shape = { K / P, N } };
	f->qweight.data = unaligned(f, 0, (size_t)K / P * N * 4);
	for (int k = 0; k < K; k++)
		for (int n = 0; n < N; n++) {
			size_t i = (size_t)(k / P) * N + n;

			put_u32(f->qweight.data, i, get_u32(f->qweight.data, i) |
					     (uint32_t)f->q[(size_t)k * N + n] << (c->bits * (k % P)));
		}
	f->qzeros = (struct q3_tensor){ .name = "x.qzeros", .dtype = Q3_DT_I32, .ndim = 2,
					.shape = { G, N / P } };
	f->qzeros.data = unaligned(f, 1, (size_t)G * N / P * 4);
	for (int g = 0; g < G; g++)
		for (int n = 0; n < N; n++) {
			size_t i = (size_t)g * (N / P) + n / P;
			uint32_t stored = (uint32_t)(f->z[(size_t)g * N + n] - (c->v2 ? 0 : 1)) & mask;

			put_u32(f->qzeros.data, i, get_u32(f->qzeros.data, i) | stored << (c->bits * (n % P)));
		}
	f->scales = (struct q3_tensor){ .name = "x.scales", .dtype = c->sdt, .ndim = 2, .shape = { G, N } };
	f->scales.data = unaligned(f, 2, (size_t)G * N * 2);
	for (size_t i = 0; i < (size_t)G * N; i++) {
		uint16_t h = c->sdt == Q3_DT_F16 ? q3_f32_to_f16(f->s[i]) : q3_f32_to_bf16(f->s[i]);

		memcpy((char *)f->scales.data + 2 * i, &h, 2);
	}
	f->g_idx = (struct q3_tensor){ .name = "x.g_idx", .dtype = Q3_DT_I32, .ndim = 1, .shape = { K } };
	f->g_idx.data = unaligned(f, 3, (size_t)K * 4);
	for (int k = 0; k < K; k++)
		put_u32(f->g_idx.data, (size_t)k, (uint32_t)f->gk[k]);

	f->l = (struct q3_linear){ .fmt = Q3_W_GPTQ, .K = K, .N = N, .qweight = &f->qweight,
				   .qzeros = &f->qzeros, .scales = &f->scales,
				   .g_idx = c->no_gidx ? NULL : &f->g_idx, .bits = c->bits,
				   .group_size = c->group, .ngroups = G, .zero_offset = c->v2 ? 0 : 1,
				   .sym = !c->asym, .desc_act = c->act_order };
	free(perm);
}

static void free_fake(struct fake_linear *f)
{
	for (int i = 0; i < 5; i++)
		free(f->mem[i]);
	free(f->q);
	free(f->z);
	free(f->gk);
	free(f->s);
}

/* y = x·Wᵀ three ways against the plain loop `want`, and the CPU kernel on a row sub-range. */
static void check_matvec(const char *what, const struct q3_linear *l, const float *x, int T,
			 const double *want)
{
	int K = l->K, N = l->N;
	float *y = calloc((size_t)T * N, sizeof(float));
	float *wantf = malloc(sizeof(float) * (size_t)T * N);
	struct q3_cpu_linear cl;
	q3_err e;
	char label[160];

	for (size_t i = 0; i < (size_t)T * N; i++)
		wantf[i] = (float)want[i];
	snprintf(label, sizeof(label), "%s: q3_ref_linear", what);
	q3_ref_linear(l, x, T, y);
	assert_int_equal(check_close(label, y, wantf, (size_t)T * N, 1e-6), 0);

	snprintf(label, sizeof(label), "%s: q3_cpu_linear_rows", what);
	assert_int_equal(q3_cpu_linear_prepare(&cl, l, &e), 0);
	memset(y, 0, sizeof(float) * (size_t)T * N);
	q3_cpu_linear_rows(&cl, x, (size_t)K, T, y, (size_t)N, 0, N);
	assert_int_equal(check_close(label, y, wantf, (size_t)T * N, 1e-6), 0);
	/* a sub-range leaves the other rows alone */
	int n0 = N / 3, n1 = N - N / 4;
	for (size_t i = 0; i < (size_t)T * N; i++)
		y[i] = -7.0f;
	q3_cpu_linear_rows(&cl, x, (size_t)K, T, y, (size_t)N, n0, n1);
	for (int t = 0; t < T; t++)
		for (int n = 0; n < N; n++) {
			float v = y[(size_t)t * N + n];

			if (n < n0 || n >= n1)
				assert_true(v == -7.0f);
			else
				assert_near(v, want[(size_t)t * N + n], 1e-5);
		}
	q3_cpu_linear_release(&cl);
	free(y);
	free(wantf);
}

static void gptq_case(const struct gptq_case *c, const char *what)
{
	struct fake_linear f;
	int K = c->K, N = c->N, T = 3;
	float *x = malloc(sizeof(float) * (size_t)T * K), *W = malloc(sizeof(float) * (size_t)K * N);
	double *want = calloc((size_t)T * N, sizeof(double));

	rng_seed(0x5eed + (uint64_t)K * 31 + N);
	make_gptq(&f, c);
	rng_fill(x, (size_t)T * K, 1);
	/* the plain loop over the unpacked codes: W[n][k] = s (q - z) */
	for (int t = 0; t < T; t++)
		for (int n = 0; n < N; n++)
			for (int k = 0; k < K; k++) {
				int g = c->no_gidx ? k / c->group : f.gk[k];
				double w = (double)f.s[(size_t)g * N + n] *
					   (f.q[(size_t)k * N + n] - f.z[(size_t)g * N + n]);

				want[(size_t)t * N + n] += (double)x[(size_t)t * K + k] * w;
			}
	/* dequant.c gives exactly those weights */
	q3_linear_dequant(&f.l, W);
	for (int n = 0; n < N; n++)
		for (int k = 0; k < K; k++) {
			int g = c->no_gidx ? k / c->group : f.gk[k];
			float w = f.s[(size_t)g * N + n] * (float)(f.q[(size_t)k * N + n] - f.z[(size_t)g * N + n]);

			if (W[(size_t)n * K + k] != w)
				fail_msg("%s: dequant W[%d][%d] = %g, expected %g", what, n, k, W[(size_t)n * K + k], w);
		}
	check_matvec(what, &f.l, x, T, want);
	free_fake(&f);
	free(x);
	free(W);
	free(want);
}

static void test_gptq_4bit(void **state)
{
	struct gptq_case cases[] = {
		{ .K = 256, .N = 40, .bits = 4, .group = 128, .sdt = Q3_DT_F16 },
		{ .K = 128, .N = 96, .bits = 4, .group = 32, .asym = true, .sdt = Q3_DT_F16 },
		{ .K = 256, .N = 72, .bits = 4, .group = 64, .act_order = true, .asym = true, .sdt = Q3_DT_F16 },
		{ .K = 64, .N = 8, .bits = 4, .group = 16, .act_order = true, .v2 = true, .asym = true,
		  .sdt = Q3_DT_BF16 },
		{ .K = 96, .N = 32, .bits = 4, .group = 32, .no_gidx = true, .sdt = Q3_DT_F16 },
		{ .K = 64, .N = 24, .bits = 4, .group = 64, .v2 = true, .sdt = Q3_DT_F16 }, /* one group */
	};

	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		char what[64];

		snprintf(what, sizeof(what), "gptq 4-bit case %zu", i);
		gptq_case(&cases[i], what);
	}
}

static void test_gptq_8bit(void **state)
{
	struct gptq_case cases[] = {
		{ .K = 256, .N = 36, .bits = 8, .group = 128, .sdt = Q3_DT_F16 },
		{ .K = 128, .N = 68, .bits = 8, .group = 32, .act_order = true, .asym = true, .sdt = Q3_DT_F16 },
		{ .K = 128, .N = 4, .bits = 8, .group = 64, .v2 = true, .asym = true, .sdt = Q3_DT_BF16 },
		{ .K = 64, .N = 44, .bits = 8, .group = 32, .no_gidx = true, .asym = true, .sdt = Q3_DT_F16 },
	};

	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		char what[64];

		snprintf(what, sizeof(what), "gptq 8-bit case %zu", i);
		gptq_case(&cases[i], what);
	}
}

static void test_dense(void **state)
{
	enum q3_dtype dts[] = { Q3_DT_BF16, Q3_DT_F16, Q3_DT_F32 };
	int K = 300, N = 5, T = 3; /* K spans two conversion blocks and a ragged tail */

	for (size_t d = 0; d < Q3_ARRAY_SIZE(dts); d++) {
		struct fake_linear f = { 0 };
		size_t es = dts[d] == Q3_DT_F32 ? 4 : 2;
		float *x = malloc(sizeof(float) * (size_t)T * K), *wv = malloc(sizeof(float) * (size_t)K * N);
		double *want = calloc((size_t)T * N, sizeof(double));
		char what[64];

		rng_seed(99 + d);
		f.w = (struct q3_tensor){ .name = "x.weight", .dtype = dts[d], .ndim = 2, .shape = { N, K } };
		f.w.data = unaligned(&f, 0, (size_t)K * N * es);
		for (size_t i = 0; i < (size_t)K * N; i++) {
			float v = rng_f();
			uint16_t h;

			if (dts[d] == Q3_DT_F32) {
				memcpy((char *)f.w.data + 4 * i, &v, 4);
			} else {
				h = dts[d] == Q3_DT_F16 ? q3_f32_to_f16(v) : q3_f32_to_bf16(v);
				v = dts[d] == Q3_DT_F16 ? q3_f16_to_f32(h) : q3_bf16_to_f32(h);
				memcpy((char *)f.w.data + 2 * i, &h, 2);
			}
			wv[i] = v;
		}
		rng_fill(x, (size_t)T * K, 1);
		for (int t = 0; t < T; t++)
			for (int n = 0; n < N; n++)
				for (int k = 0; k < K; k++)
					want[(size_t)t * N + n] += (double)x[(size_t)t * K + k] * wv[(size_t)n * K + k];
		f.l = (struct q3_linear){ .fmt = Q3_W_DENSE, .K = K, .N = N, .w = &f.w };
		snprintf(what, sizeof(what), "dense %s", q3_dtype_name(dts[d]));
		check_matvec(what, &f.l, x, T, want);
		free_fake(&f);
		free(x);
		free(wv);
		free(want);
	}
}

/* The CPU matvec gives a token the same bits alone or in a batch (both the one-token path of
 * sequential groups and the general one). */
static void test_linear_batch_invariance(void **state)
{
	struct gptq_case cases[] = {
		{ .K = 128, .N = 72, .bits = 4, .group = 32, .act_order = true, .asym = true, .sdt = Q3_DT_F16 },
		{ .K = 128, .N = 72, .bits = 4, .group = 32, .asym = true, .sdt = Q3_DT_F16 },
		{ .K = 128, .N = 72, .bits = 8, .group = 64, .sdt = Q3_DT_BF16 },
	};

	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		struct fake_linear f;
		struct q3_cpu_linear cl;
		float x[5 * 128], yb[5 * 72], y1[72];
		q3_err e;

		rng_seed(5 + i);
		make_gptq(&f, &cases[i]);
		rng_fill(x, sizeof(x) / sizeof(x[0]), 1);
		assert_int_equal(q3_cpu_linear_prepare(&cl, &f.l, &e), 0);
		q3_cpu_linear_rows(&cl, x, 128, 5, yb, 72, 0, 72);
		for (int t = 0; t < 5; t++) {
			q3_cpu_linear_rows(&cl, x + t * 128, 128, 1, y1, 72, 0, 40);
			q3_cpu_linear_rows(&cl, x + t * 128, 128, 1, y1, 72, 40, 72);
			assert_memory_equal(y1, yb + t * 72, sizeof(y1));
		}
		q3_cpu_linear_release(&cl);
		free_fake(&f);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rmsnorm),
		cmocka_unit_test(test_rope),
		cmocka_unit_test(test_attention),
		cmocka_unit_test(test_qkvz_split),
		cmocka_unit_test(test_conv),
		cmocka_unit_test(test_delta_gates),
		cmocka_unit_test(test_delta_step),
		cmocka_unit_test(test_delta_chunked),
		cmocka_unit_test(test_router_topk),
		cmocka_unit_test(test_swiglu),
		cmocka_unit_test(test_gptq_4bit),
		cmocka_unit_test(test_gptq_8bit),
		cmocka_unit_test(test_dense),
		cmocka_unit_test(test_linear_batch_invariance),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
