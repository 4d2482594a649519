/* cpu_expert_avx2.c - the CPU expert kernels with AVX2 + FMA + F16C (built with -mavx2 -mfma
 * -mf16c; cpu_expert.c calls them only where cpuid says so).
 *
 * A ymm register holds 8 code words: 8 output columns, 8 inputs each.  int8: the low and high
 * nibbles (inputs 0,2,4,6 and 1,3,5,7) multiply the broadcast activation quads with maddubs
 * (u8 x s8 -> s16 pairs), 4 rows (one block of 32 inputs) add up in s16 (|sum| <= 4 · 2 · 2 · 15
 * · 127 = 30480), then madd widens to s32 and the block scale is applied in fp32.  fp32: each
 * nibble converted where it lies (word & 0xF << 4j) against a prescaled activation.  Same order
 * of operations as cpu_expert_scalar.c.
 */
#include <immintrin.h>

#include "cpu_expert_impl.h"

#define AI __attribute__((always_inline)) static inline

AI __m256 load_scales(const struct q3_xmat *m, const uint16_t *p)
{
	__m128i h = _mm_loadu_si128((const __m128i *)p);

	if (m->bf16_scales)
		return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
	return _mm256_cvtph_ps(h);
}

AI __m256 load_zeros(const struct q3_xmat *m, const uint32_t *zp)
{
	if (!zp)
		return _mm256_set1_ps((float)m->zconst);
	__m256i z = _mm256_srlv_epi32(_mm256_set1_epi32((int)q3_xld32(zp)),
				      _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
	z = _mm256_add_epi32(z, _mm256_set1_epi32(m->zero_offset));
	return _mm256_cvtepi32_ps(_mm256_and_si256(z, _mm256_set1_epi32(0xF)));
}

#define UNROLL _Pragma("GCC unroll 4")
#define PF_ROWS 16 /* rows of codes prefetched ahead (2 KiB in the packed layout) */

/* One group of int8 activations: acc[t][c] = Σ_b d_b · (Σ q·x over block b), gs[t] = Σ_b bsum_b,
 * for NT tokens (t0 ..) and NC chunks of 8 columns starting at code word cw. */
AI void group_q8(const struct q3_xmat *m, const struct q3_xact *a, const uint32_t *cw, int g,
		 int t0, const int NT, const int NC, __m256 acc[4][4], float gs[4])
{
	const int bpg = m->G / Q3_XBLOCK;
	const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);

	for (int b = g * bpg; b < (g + 1) * bpg; b++) {
		__m256i s[4][4];

		UNROLL for (int t = 0; t < NT; t++)
			UNROLL for (int c = 0; c < NC; c++)
				s[t][c] = _mm256_setzero_si256();
		UNROLL for (int r = 4 * b; r < 4 * b + 4; r++) {
			const uint32_t *w = cw + (size_t)r * m->cd_row;
			__m256i lo[4], hi[4];

			/* the row PF_ROWS ahead: the hardware prefetcher alone leaves the loads waiting */
			_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row), _MM_HINT_T0);
			if (NC * 8 > 16)
				_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row + 16), _MM_HINT_T0);

			UNROLL for (int c = 0; c < NC; c++) {
				__m256i v = _mm256_loadu_si256((const __m256i *)(w + 8 * c));

				lo[c] = _mm256_and_si256(v, m4);
				hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
			}
			UNROLL for (int t = 0; t < NT; t++) {
				const int8_t *xq = q3_xact_q(a, t0 + t) + 8 * r;
				__m256i xe = _mm256_set1_epi32((int)q3_xld32(xq));
				__m256i xo = _mm256_set1_epi32((int)q3_xld32(xq + 4));

				UNROLL for (int c = 0; c < NC; c++)
					s[t][c] = _mm256_add_epi16(
						s[t][c], _mm256_add_epi16(_mm256_maddubs_epi16(lo[c], xe),
									  _mm256_maddubs_epi16(hi[c], xo)));
			}
		}
		UNROLL for (int t = 0; t < NT; t++) {
			__m256 db = _mm256_set1_ps(q3_xact_d(a, t0 + t)[b]);

			gs[t] += q3_xact_bsum(a, t0 + t)[b];
			UNROLL for (int c = 0; c < NC; c++)
				acc[t][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s[t][c], ones)),
							    db, acc[t][c]);
		}
	}
}

/* One group of fp32 activations: acc[t][c] = Σ x·code, gs[t] = Σ x over the group. */
AI void group_f32(const struct q3_xmat *m, const struct q3_xact *a, const uint32_t *cw, int g,
		  int t0, const int NT, const int NC, __m256 acc[4][4], float gs[4])
{
	const int bpg = m->G / Q3_XBLOCK, rpg = m->G / 8;
	__m256 ae[4][4], ao[4][4];

	UNROLL for (int t = 0; t < NT; t++)
		UNROLL for (int c = 0; c < NC; c++)
			ae[t][c] = ao[t][c] = _mm256_setzero_ps();
	for (int r = g * rpg; r < (g + 1) * rpg; r++) {
		const uint32_t *w = cw + (size_t)r * m->cd_row;
		__m256i v[4];

		_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row), _MM_HINT_T0);
		if (NC * 8 > 16)
			_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row + 16), _MM_HINT_T0);

		UNROLL for (int c = 0; c < NC; c++)
			v[c] = _mm256_loadu_si256((const __m256i *)(w + 8 * c));
		UNROLL for (int t = 0; t < NT; t++) {
			const float *xs = q3_xact_xs(a, t0 + t) + 8 * r;

#pragma GCC unroll 8
			for (int j = 0; j < 8; j++) {
				__m256 xb = _mm256_set1_ps(xs[j]);

				UNROLL for (int c = 0; c < NC; c++) {
					__m256i q = j < 7 ? _mm256_and_si256(v[c], _mm256_set1_epi32(0xF << (4 * j)))
							  : _mm256_srli_epi32(v[c], 28);
					__m256 f = _mm256_cvtepi32_ps(q);

					if (j % 2 == 0)
						ae[t][c] = _mm256_fmadd_ps(f, xb, ae[t][c]);
					else
						ao[t][c] = _mm256_fmadd_ps(f, xb, ao[t][c]);
				}
			}
		}
	}
	UNROLL for (int t = 0; t < NT; t++) {
		for (int b = g * bpg; b < (g + 1) * bpg; b++)
			gs[t] += q3_xact_bsum(a, t0 + t)[b];
		UNROLL for (int c = 0; c < NC; c++)
			acc[t][c] = _mm256_add_ps(ae[t][c], ao[t][c]);
	}
}

/* NT tokens (t0 ..) x NC chunks of 8 columns (chunk c0 ..) of one tile, groups [g0, g1):
 * y = Σ_g s · (acc − z · gs) per column, starting from 0 (g0 == 0) or from y (a later group
 * range: the same sums in the same order). */
AI void block(const bool q8, const struct q3_xmat *m, const struct q3_xact *a, int tile, int t0,
	      const int NT, int c0, const int NC, float *y, size_t ldy, int g0, int g1)
{
	const uint32_t *cw = m->codes + (size_t)tile * m->cd_tile + (size_t)c0 * 8;
	const uint16_t *sc = m->scales + (size_t)tile * m->sc_tile + (size_t)c0 * 8;
	const uint32_t *zp = m->zeros ? m->zeros + (size_t)tile * m->zp_tile + (size_t)c0 : NULL;
	__m256 yv[4][4];

	UNROLL for (int t = 0; t < NT; t++)
		UNROLL for (int c = 0; c < NC; c++)
			yv[t][c] = g0 ? _mm256_loadu_ps(y + (size_t)(t0 + t) * ldy + (size_t)tile * Q3_XTILE +
							(size_t)(c0 + c) * 8)
				      : _mm256_setzero_ps();
	for (int g = g0; g < g1; g++) {
		__m256 acc[4][4];
		float gs[4];

		UNROLL for (int t = 0; t < NT; t++) {
			gs[t] = 0.0f;
			UNROLL for (int c = 0; c < NC; c++)
				acc[t][c] = _mm256_setzero_ps();
		}
		if (q8)
			group_q8(m, a, cw, g, t0, NT, NC, acc, gs);
		else
			group_f32(m, a, cw, g, t0, NT, NC, acc, gs);
		UNROLL for (int c = 0; c < NC; c++) {
			__m256 sv = load_scales(m, sc + (size_t)g * m->sc_grp + 8 * c);
			__m256 zv = load_zeros(m, zp ? zp + (size_t)g * m->zp_grp + c : NULL);

			UNROLL for (int t = 0; t < NT; t++)
				yv[t][c] = _mm256_fmadd_ps(
					sv, _mm256_fnmadd_ps(zv, _mm256_set1_ps(gs[t]), acc[t][c]), yv[t][c]);
		}
	}
	UNROLL for (int t = 0; t < NT; t++)
		UNROLL for (int c = 0; c < NC; c++)
			_mm256_storeu_ps(y + (size_t)(t0 + t) * ldy + (size_t)tile * Q3_XTILE +
					 (size_t)(c0 + c) * 8,
					 yv[t][c]);
}

/* One token: the whole tile (4 chunks) at once; pairs of tokens: half a tile at a time.  Tiles
 * outermost when a tile's codes are contiguous (packed); groups outermost when rows are (the
 * GPTQ layout: a group's rows, all tiles, are one contiguous stretch). */
AI void mat(bool q8, const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
	    int tile0, int tile1)
{
	bool rows = q3_xmat_row_major(m);
	int gstep = rows ? 1 : m->ngroups;

	for (int g0 = 0; g0 < m->ngroups; g0 += gstep)
		for (int tile = tile0; tile < tile1; tile++) {
			int t = 0, g1 = g0 + gstep;

			for (; t + 2 <= a->T; t += 2) {
				block(q8, m, a, tile, t, 2, 0, 2, y, ldy, g0, g1);
				block(q8, m, a, tile, t, 2, 2, 2, y, ldy, g0, g1);
			}
			for (; t < a->T; t++)
				block(q8, m, a, tile, t, 1, 0, 4, y, ldy, g0, g1);
		}
}

static void mat_q8(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		   int tile0, int tile1)
{
	mat(true, m, a, y, ldy, tile0, tile1);
}

static void mat_f32(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		    int tile0, int tile1)
{
	mat(false, m, a, y, ldy, tile0, tile1);
}

/* 8 inputs starting at model index k (or perm[k..k+7]). */
AI __m256 load8(const float *x, const uint16_t *perm, int k)
{
	if (!perm)
		return _mm256_loadu_ps(x + k);
	return _mm256_i32gather_ps(x, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(perm + k))),
				   4);
}

AI float hmax(__m256 v)
{
	__m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

	m = _mm_max_ps(m, _mm_movehl_ps(m, m));
	m = _mm_max_ss(m, _mm_movehdup_ps(m));
	return _mm_cvtss_f32(m);
}

AI int hsum_i32(__m256i v)
{
	__m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));

	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
	return _mm_cvtsi128_si32(s);
}

AI float hsum_ps(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* Same codes and scales as the scalar act_set: max |x| is exact, d = max / 127, codes are
 * round-to-nearest-even of x · (1 / d), like lrintf. */
static void act_set(struct q3_xact *a, int t, const float *x, const uint16_t *perm, int b0,
		    int b1)
{
	const int K = a->K, nb = K / Q3_XBLOCK;
	const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
	const __m256i slots = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
	const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
	const __m256 pre = _mm256_setr_ps(1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f,
					  0x1p-24f, 1.0f);

	for (int b = b0; b < b1; b++) {
		__m256 v[4], mx = _mm256_setzero_ps();
		size_t o = (size_t)t * (size_t)nb + (size_t)b;

		for (int i = 0; i < 4; i++) {
			v[i] = load8(x, perm, b * Q3_XBLOCK + 8 * i);
			mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absm));
		}
		if (a->kind == Q3_XACT_F32) {
			float *xs = a->xs + (size_t)t * (size_t)K + (size_t)b * Q3_XBLOCK;

			for (int i = 0; i < 4; i++)
				_mm256_storeu_ps(xs + 8 * i, _mm256_mul_ps(v[i], pre));
			a->bsum[o] = hsum_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]),
							   _mm256_add_ps(v[2], v[3])));
			continue;
		}
		float d = hmax(mx) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
		__m256i r[4];

		for (int i = 0; i < 4; i++) {
			__m256i q = _mm256_cvtps_epi32(
				_mm256_mul_ps(_mm256_permutevar8x32_ps(v[i], slots), _mm256_set1_ps(id)));

			r[i] = _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)),
						_mm256_set1_epi32(-127));
		}
		__m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]),
					       _mm256_packs_epi32(r[2], r[3]));

		_mm256_storeu_si256((__m256i *)(a->q + (size_t)t * (size_t)K + (size_t)b * Q3_XBLOCK),
				    _mm256_permutevar8x32_epi32(p, fix));
		a->d[o] = d;
		a->bsum[o] = d * (float)hsum_i32(_mm256_add_epi32(_mm256_add_epi32(r[0], r[1]),
								 _mm256_add_epi32(r[2], r[3])));
	}
}

const struct q3_xkern q3_xkern_avx2 = {
	.act_set = act_set,
	.mat_q8 = mat_q8,
	.mat_f32 = mat_f32,
};
