/* test_dequant.c - GPTQ dequantization of every variant the reader accepts (4/8 bit, v1/v2 zero
 * points, sym/asym, g_idx or not, group sizes 32/64/128/-1, FP16/BF16 scales, unaligned data)
 * against an independent unpacking of the packed words written with arithmetic instead of
 * shifts and masks. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"
#include "half.h"

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng >> 16);
}

struct variant {
	int K, N, bits, group; /* group -1: one group */
	int zero_offset;
	bool gidx, bf16, unaligned;
};

/* Code j of a packed word: (w / base^j) mod base, base = 2^bits. */
static int unpack(uint32_t w, int j, int bits)
{
	uint64_t base = 1ull << bits, v = w;
	for (int i = 0; i < j; i++)
		v /= base;
	return (int)(v % base);
}

static void check_variant(const struct variant *v)
{
	int K = v->K, N = v->N, P = 32 / v->bits, G = v->group < 0 ? K : v->group, ng = K / G;
	int shift = v->unaligned ? 1 : 0;
	size_t qw_n = (size_t)(K / P) * N, qz_n = (size_t)ng * (N / P), sc_n = (size_t)ng * N;
	char *qw = malloc(qw_n * 4 + 1), *qz = malloc(qz_n * 4 + 1), *sc = malloc(sc_n * 2 + 1);
	char *gi = malloc((size_t)K * 4 + 1);
	int32_t *g = malloc(sizeof(int32_t) * K);
	float *W = malloc(sizeof(float) * K * N);
	struct q3_tensor tqw = { .data = qw + shift }, tqz = { .data = qz + shift },
			 tsc = { .data = sc + shift, .dtype = v->bf16 ? Q3_DT_BF16 : Q3_DT_F16 },
			 tgi = { .data = gi + shift };
	struct q3_linear l = { .fmt = Q3_W_GPTQ, .K = K, .N = N, .qweight = &tqw, .qzeros = &tqz,
			       .scales = &tsc, .g_idx = v->gidx ? &tgi : NULL, .bits = v->bits,
			       .group_size = G, .ngroups = ng, .zero_offset = v->zero_offset };

	for (size_t i = 0; i < qw_n; i++) {
		uint32_t w = rnd() ^ (rnd() << 16);
		memcpy(qw + shift + 4 * i, &w, 4);
	}
	for (size_t i = 0; i < qz_n; i++) {
		uint32_t w = rnd() ^ (rnd() << 16);
		memcpy(qz + shift + 4 * i, &w, 4);
	}
	for (size_t i = 0; i < sc_n; i++) {
		float s = ((float)(rnd() % 2000) - 1000.0f) / 8192.0f;
		uint16_t h = v->bf16 ? q3_f32_to_bf16(s) : q3_f32_to_f16(s);
		memcpy(sc + shift + 2 * i, &h, 2);
	}
	for (int k = 0; k < K; k++) {
		g[k] = v->gidx ? (int32_t)(rnd() % (uint32_t)ng) : k / G;
		memcpy(gi + shift + 4 * k, &g[k], 4);
	}
	q3_linear_dequant(&l, W);
	for (int n = 0; n < N; n++) {
		for (int k = 0; k < K; k++) {
			uint32_t w, zw;
			uint16_t sh;
			int q, z;
			float s, want;

			memcpy(&w, qw + shift + 4 * ((size_t)(k / P) * N + n), 4);
			memcpy(&zw, qz + shift + 4 * ((size_t)g[k] * (N / P) + n / P), 4);
			memcpy(&sh, sc + shift + 2 * ((size_t)g[k] * N + n), 2);
			q = unpack(w, k % P, v->bits);
			z = (unpack(zw, n % P, v->bits) + v->zero_offset) % (1 << v->bits);
			s = v->bf16 ? q3_bf16_to_f32(sh) : q3_f16_to_f32(sh);
			want = s * (float)(q - z);
			if (W[(size_t)n * K + k] != want)
				fail_msg("K=%d N=%d bits=%d G=%d off=%d gidx=%d: W[%d][%d] = %g, want %g", K, N,
					 v->bits, v->group, v->zero_offset, v->gidx, n, k, W[(size_t)n * K + k], want);
			assert_true(q3_linear_weight(&l, n, k) == want);
		}
	}
	free(qw), free(qz), free(sc), free(gi), free(g), free(W);
}

static void test_all_gptq_variants(void **state)
{
	static const int groups[] = { 32, 64, 128, -1 };
	int count = 0;

	for (int bits = 4; bits <= 8; bits += 4)
		for (int gi = 0; gi < 4; gi++)
			for (int off = 0; off <= 1; off++)
				for (int gidx = 0; gidx <= 1; gidx++)
					for (int bf = 0; bf <= 1; bf++) {
						struct variant v = { .K = 256, .N = 48, .bits = bits,
								     .group = groups[gi], .zero_offset = off,
								     .gidx = gidx, .bf16 = bf,
								     .unaligned = (count & 1) };
						check_variant(&v);
						count++;
					}
	assert_int_equal(count, 64);
}

static void test_v1_zero_point_wraps_like_autogptq(void **state)
{
	/* v1 stores z - 1; a stored 15 means z = 16, which AutoGPTQ masks back to 0 in 4 bits */
	uint32_t qw = 0x00000003, qz = 0xFFFFFFFF;
	uint16_t s = q3_f32_to_f16(1.0f);
	struct q3_tensor tqw = { .data = &qw }, tqz = { .data = &qz }, tsc = { .data = &s, .dtype = Q3_DT_F16 };
	struct q3_linear l = { .fmt = Q3_W_GPTQ, .K = 8, .N = 1, .qweight = &tqw, .qzeros = &tqz,
			       .scales = &tsc, .bits = 4, .group_size = 8, .ngroups = 1, .zero_offset = 1 };

	/* N = 1 is too narrow for real packing but fine for the formula: code 3 at k = 0 */
	assert_true(q3_linear_weight(&l, 0, 0) == 3.0f);
	l.zero_offset = 0; /* v2: z = 15 */
	assert_true(q3_linear_weight(&l, 0, 0) == -12.0f);
}

static void test_sym_4bit_hand_case(void **state)
{
	/* K = 8 codes 0..7 for output 0, z = 8 (v1 stores 7), scale 0.5: W = 0.5 * (k - 8) */
	uint32_t qw[8], qz = 0x77777777;
	uint16_t s[8];
	struct q3_tensor tqw = { .data = qw }, tqz = { .data = &qz }, tsc = { .data = s, .dtype = Q3_DT_F16 };
	struct q3_linear l = { .fmt = Q3_W_GPTQ, .K = 8, .N = 8, .qweight = &tqw, .qzeros = &tqz,
			       .scales = &tsc, .bits = 4, .group_size = 8, .ngroups = 1, .zero_offset = 1 };

	for (int n = 0; n < 8; n++) {
		qw[n] = 0x76543210u;
		s[n] = q3_f32_to_f16(0.5f);
	}
	for (int k = 0; k < 8; k++)
		assert_true(q3_linear_weight(&l, 3, k) == 0.5f * (float)(k - 8));
}

static void test_dense_dtypes(void **state)
{
	float f[4] = { 1.5f, -2.0f, 3.25f, 0.0f };
	uint16_t h[4], b[4];
	struct q3_tensor tf = { .data = f, .dtype = Q3_DT_F32 }, th = { .data = h, .dtype = Q3_DT_F16 },
			 tb = { .data = b, .dtype = Q3_DT_BF16 };
	struct q3_linear l = { .fmt = Q3_W_DENSE, .K = 2, .N = 2 };

	for (int i = 0; i < 4; i++) {
		h[i] = q3_f32_to_f16(f[i]);
		b[i] = q3_f32_to_bf16(f[i]);
	}
	l.w = &tf;
	assert_true(q3_linear_weight(&l, 1, 0) == 3.25f);
	l.w = &th;
	assert_true(q3_linear_weight(&l, 0, 1) == -2.0f);
	l.w = &tb;
	assert_true(q3_linear_weight(&l, 1, 0) == 3.25f);
}

/* q3_gptq_order: the identity where g_idx is absent or k / G; for an act-order g_idx (every group
 * G inputs, shuffled) a permutation whose positions [gG, (g+1)G) hold group g's inputs in
 * ascending order; -EINVAL naming the first input past its group's G or out of range. */
static void test_gptq_order(void **state)
{
	enum { K = 256, G = 32, NG = K / G };
	int32_t gi[K];
	int order[K], bad, seen[K];
	struct q3_tensor tgi = { .data = gi };
	struct q3_linear l = { .fmt = Q3_W_GPTQ, .K = K, .N = 8, .bits = 4, .group_size = G, .ngroups = NG };

	assert_int_equal(q3_gptq_order(&l, order, &bad), 1);
	for (int k = 0; k < K; k++)
		assert_int_equal(order[k], k);
	l.g_idx = &tgi;
	for (int k = 0; k < K; k++)
		gi[k] = k / G;
	assert_int_equal(q3_gptq_order(&l, order, NULL), 1); /* bad may be NULL */
	for (int round = 0; round < 20; round++) {
		for (int k = 0; k < K; k++) /* a shuffle of k / G */
			gi[k] = k / G;
		for (int k = K - 1; k > 0; k--) {
			int j = (int)(rnd() % (uint32_t)(k + 1)), t = gi[k];

			gi[k] = gi[j], gi[j] = t;
		}
		assert_int_equal(q3_gptq_order(&l, order, &bad), 0);
		memset(seen, 0, sizeof(seen));
		for (int j = 0; j < K; j++) {
			assert_true(order[j] >= 0 && order[j] < K && !seen[order[j]]);
			seen[order[j]] = 1;
			assert_int_equal(gi[order[j]], j / G);
			if (j % G)
				assert_true(order[j] > order[j - 1]);
		}
	}
	/* groups 3 and 0 one input too many (3 first, at k = 200), 6 and 7 one short */
	for (int k = 0; k < K; k++)
		gi[k] = k / G;
	gi[K - 1] = 0;
	gi[100] = 5, gi[170] = 3, gi[200] = 3;
	int over = -1, cnt3 = 0;
	for (int k = 0; k < K && over < 0; k++)
		if (gi[k] == 3 && ++cnt3 > G)
			over = k;
	assert_int_equal(q3_gptq_order(&l, order, &bad), -EINVAL);
	assert_int_equal(bad, over);
	for (int k = 0; k < K; k++)
		gi[k] = (K - 1 - k) / G;
	gi[77] = NG; /* a group past the last */
	assert_int_equal(q3_gptq_order(&l, order, &bad), -EINVAL);
	assert_int_equal(bad, 77);
	gi[77] = (K - 1 - 77) / G;
	l.ngroups = NG - 1; /* K is not ngroups · G */
	assert_int_equal(q3_gptq_order(&l, order, &bad), -EINVAL);
	assert_int_equal(bad, -1);
}

/* q3_gptq_same_groups: absent g_idx and g_idx = k / G alike; a shuffled g_idx against itself, a
 * copy, and another shuffle (which sorts into another order); another K or G never. */
static void test_gptq_same_groups(void **state)
{
	enum { K = 256, G = 32 };
	int32_t ga[K], gb[K];
	int oa[K], ob[K];
	struct q3_tensor ta = { .data = ga }, tb = { .data = gb };
	struct q3_linear a = { .fmt = Q3_W_GPTQ, .K = K, .N = 8, .bits = 4, .group_size = G, .ngroups = K / G };
	struct q3_linear b = a;

	assert_true(q3_gptq_same_groups(&a, &b));
	for (int k = 0; k < K; k++)
		ga[k] = gb[k] = k / G;
	b.g_idx = &tb;
	assert_true(q3_gptq_same_groups(&a, &b) && q3_gptq_same_groups(&b, &a));
	a.g_idx = &ta;
	for (int k = K - 1; k > 0; k--) { /* a shuffle of k / G */
		int j = (int)(rnd() % (uint32_t)(k + 1)), t = ga[k];

		ga[k] = ga[j], ga[j] = t;
	}
	assert_false(q3_gptq_same_groups(&a, &b));
	memcpy(gb, ga, sizeof(gb));
	assert_true(q3_gptq_same_groups(&a, &b));
	assert_int_equal(q3_gptq_order(&a, oa, NULL), 0);
	assert_int_equal(q3_gptq_order(&b, ob, NULL), 0);
	assert_memory_equal(oa, ob, sizeof(oa));
	gb[3] = ga[200], gb[200] = ga[3]; /* two inputs of different groups swapped */
	assert_int_not_equal(ga[3], ga[200]);
	assert_false(q3_gptq_same_groups(&a, &b));
	assert_int_equal(q3_gptq_order(&b, ob, NULL), 0);
	assert_memory_not_equal(oa, ob, sizeof(oa));
	memcpy(gb, ga, sizeof(gb));
	b.K = K - G;
	b.ngroups = K / G - 1;
	assert_false(q3_gptq_same_groups(&a, &b));
	b.K = K;
	b.group_size = G / 2;
	assert_false(q3_gptq_same_groups(&a, &b));
}

static void test_half_conversions_round_trip(void **state)
{
	/* every fp16 and bf16 bit pattern survives f32 and back (NaNs stay NaN) */
	for (uint32_t i = 0; i < 65536; i++) {
		float f = q3_f16_to_f32((uint16_t)i), g = q3_bf16_to_f32((uint16_t)i);
		if (isnan(f))
			assert_true(isnan(q3_f16_to_f32(q3_f32_to_f16(f))));
		else
			assert_int_equal(q3_f32_to_f16(f), i);
		if (isnan(g))
			assert_true(isnan(q3_bf16_to_f32(q3_f32_to_bf16(g))));
		else
			assert_int_equal(q3_f32_to_bf16(g), i);
	}
	/* rounding to nearest even */
	assert_int_equal(q3_f32_to_f16(1.0f + 1.0f / 2048), q3_f32_to_f16(1.0f));
	assert_int_equal(q3_f32_to_f16(1.0f + 3.0f / 2048), q3_f32_to_f16(1.0f + 4.0f / 2048));
	assert_int_equal(q3_f32_to_f16(70000.0f), 0x7c00);
	assert_true(q3_f16_to_f32(q3_f32_to_f16(1e-7f)) == 1.0f / 16777216.0f * 2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_all_gptq_variants),
		cmocka_unit_test(test_v1_zero_point_wraps_like_autogptq),
		cmocka_unit_test(test_sym_4bit_hand_case),
		cmocka_unit_test(test_dense_dtypes),
		cmocka_unit_test(test_gptq_order),
		cmocka_unit_test(test_gptq_same_groups),
		cmocka_unit_test(test_half_conversions_round_trip),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
