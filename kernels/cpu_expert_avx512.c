/* cpu_expert_avx512.c - the CPU expert kernels with AVX-512 (F, BW, VL, DQ) and VNNI (built with
 * the -mavx512* flags; cpu_expert.c calls them only where cpuid says so).
 *
 * A zmm register holds 16 code words: 16 output columns, 8 inputs each.  int8: the low and high
 * nibbles go straight into vpdpbusd (u8 x s8, 4 products into each s32 lane) against the
 * broadcast activation quads, one accumulator each for the low and high nibbles (two dependency
 * chains per column chunk); per block of 32 inputs the s32 sums are scaled in fp32.  fp32 as in
 * cpu_expert_avx2.c, 16 columns at a time.  Same order of operations as cpu_expert_scalar.c.
 */
#include <immintrin.h>

#include "cpu_expert_impl.h"
#include "cpu_expert_zmm.h"

#define UNROLL _Pragma("GCC unroll 4")
#define PF_ROWS 16 /* rows of codes prefetched ahead (as in cpu_expert_avx2.c) */

/* One group of int8 activations for NT tokens (t0 ..) and the tile's two chunks of 16 columns:
 * acc[t][c] = Σ_b d_b · (Σ q·x over block b), gs[t] = Σ_b bsum_b. */
AI void group_q8(const struct q3_xmat *m, const struct q3_xact *a, const uint32_t *cw, int g,
		 int t0, const int NT, __m512 acc[4][2], float gs[4])
{
	const int bpg = m->G / Q3_XBLOCK;
	const __m512i m4 = _mm512_set1_epi8(0x0F);

	for (int b = g * bpg; b < (g + 1) * bpg; b++) {
		__m512i sl[4][2], sh[4][2];

		UNROLL for (int t = 0; t < NT; t++)
			UNROLL for (int c = 0; c < 2; c++)
				sl[t][c] = sh[t][c] = _mm512_setzero_si512();
		UNROLL for (int r = 4 * b; r < 4 * b + 4; r++) {
			const uint32_t *w = cw + (size_t)r * m->cd_row;
			__m512i lo[2], hi[2];

			_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row), _MM_HINT_T0);
			_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row + 16), _MM_HINT_T0);

			UNROLL for (int c = 0; c < 2; c++) {
				__m512i v = _mm512_loadu_si512(w + 16 * c);

				lo[c] = _mm512_and_si512(v, m4);
				hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
			}
			UNROLL for (int t = 0; t < NT; t++) {
				const int8_t *xq = q3_xact_q(a, t0 + t) + 8 * r;
				__m512i xe = _mm512_set1_epi32((int)q3_xld32(xq));
				__m512i xo = _mm512_set1_epi32((int)q3_xld32(xq + 4));

				UNROLL for (int c = 0; c < 2; c++) {
					sl[t][c] = _mm512_dpbusd_epi32(sl[t][c], lo[c], xe);
					sh[t][c] = _mm512_dpbusd_epi32(sh[t][c], hi[c], xo);
				}
			}
		}
		UNROLL for (int t = 0; t < NT; t++) {
			__m512 db = _mm512_set1_ps(q3_xact_d(a, t0 + t)[b]);

			gs[t] += q3_xact_bsum(a, t0 + t)[b];
			UNROLL for (int c = 0; c < 2; c++)
				acc[t][c] = _mm512_fmadd_ps(
					_mm512_cvtepi32_ps(_mm512_add_epi32(sl[t][c], sh[t][c])), db, acc[t][c]);
		}
	}
}

/* One group of fp32 activations: acc[t][c] = Σ x·code, gs[t] = Σ x over the group. */
AI void group_f32(const struct q3_xmat *m, const struct q3_xact *a, const uint32_t *cw, int g,
		  int t0, const int NT, __m512 acc[4][2], float gs[4])
{
	const int bpg = m->G / Q3_XBLOCK, rpg = m->G / 8;
	__m512 ae[4][2], ao[4][2];

	UNROLL for (int t = 0; t < NT; t++)
		UNROLL for (int c = 0; c < 2; c++)
			ae[t][c] = ao[t][c] = _mm512_setzero_ps();
	for (int r = g * rpg; r < (g + 1) * rpg; r++) {
		const uint32_t *w = cw + (size_t)r * m->cd_row;
		__m512i v[2];

		_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row), _MM_HINT_T0);
		_mm_prefetch((const char *)(w + PF_ROWS * m->cd_row + 16), _MM_HINT_T0);

		UNROLL for (int c = 0; c < 2; c++)
			v[c] = _mm512_loadu_si512(w + 16 * c);
		UNROLL for (int t = 0; t < NT; t++) {
			const float *xs = q3_xact_xs(a, t0 + t) + 8 * r;

#pragma GCC unroll 8
			for (int j = 0; j < 8; j++) {
				__m512 xb = _mm512_set1_ps(xs[j]);

				UNROLL for (int c = 0; c < 2; c++) {
					__m512i q = j < 7 ? _mm512_and_si512(v[c], _mm512_set1_epi32(0xF << (4 * j)))
							  : _mm512_srli_epi32(v[c], 28);
					__m512 f = _mm512_cvtepi32_ps(q);

					if (j % 2 == 0)
						ae[t][c] = _mm512_fmadd_ps(f, xb, ae[t][c]);
					else
						ao[t][c] = _mm512_fmadd_ps(f, xb, ao[t][c]);
				}
			}
		}
	}
	UNROLL for (int t = 0; t < NT; t++) {
		for (int b = g * bpg; b < (g + 1) * bpg; b++)
			gs[t] += q3_xact_bsum(a, t0 + t)[b];
		UNROLL for (int c = 0; c < 2; c++)
			acc[t][c] = _mm512_add_ps(ae[t][c], ao[t][c]);
	}
}

/* NT tokens (t0 ..) x the tile's 32 columns, groups [g0, g1): y = Σ_g s · (acc − z · gs) per
 * column, from 0 (g0 == 0) or from y. */
AI void block(const bool q8, const struct q3_xmat *m, const struct q3_xact *a, int tile, int t0,
	      const int NT, float *y, size_t ldy, int g0, int g1)
{
	const uint32_t *cw = m->codes + (size_t)tile * m->cd_tile;
	const uint16_t *sc = m->scales + (size_t)tile * m->sc_tile;
	const uint32_t *zp = m->zeros ? m->zeros + (size_t)tile * m->zp_tile : NULL;
	__m512 yv[4][2];

	UNROLL for (int t = 0; t < NT; t++)
		UNROLL for (int c = 0; c < 2; c++)
			yv[t][c] = g0 ? _mm512_loadu_ps(y + (size_t)(t0 + t) * ldy + (size_t)tile * Q3_XTILE +
							(size_t)c * 16)
				      : _mm512_setzero_ps();
	for (int g = g0; g < g1; g++) {
		__m512 acc[4][2];
		float gs[4];

		UNROLL for (int t = 0; t < NT; t++) {
			gs[t] = 0.0f;
			UNROLL for (int c = 0; c < 2; c++)
				acc[t][c] = _mm512_setzero_ps();
		}
		if (q8)
			group_q8(m, a, cw, g, t0, NT, acc, gs);
		else
			group_f32(m, a, cw, g, t0, NT, acc, gs);
		UNROLL for (int c = 0; c < 2; c++) {
			__m512 sv = load_scales(m, sc + (size_t)g * m->sc_grp + 16 * c);
			__m512 zv = load_zeros(m, zp ? zp + (size_t)g * m->zp_grp + 2 * c : NULL);

			UNROLL for (int t = 0; t < NT; t++)
				yv[t][c] = _mm512_fmadd_ps(
					sv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(gs[t]), acc[t][c]), yv[t][c]);
		}
	}
	UNROLL for (int t = 0; t < NT; t++)
		UNROLL for (int c = 0; c < 2; c++)
			_mm512_storeu_ps(y + (size_t)(t0 + t) * ldy + (size_t)tile * Q3_XTILE +
					 (size_t)c * 16,
					 yv[t][c]);
}

/* Tokens four (int8) or two (fp32) at a time, then pairs, then one; tiles or groups outermost
 * as in cpu_expert_avx2.c. */
AI void mat(const bool q8, const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
	    int tile0, int tile1)
{
	int gstep = q3_xmat_row_major(m) ? 1 : m->ngroups;

	for (int g0 = 0; g0 < m->ngroups; g0 += gstep)
		for (int tile = tile0; tile < tile1; tile++) {
			int t = 0, g1 = g0 + gstep;

			for (; q8 && t + 4 <= a->T; t += 4)
				block(q8, m, a, tile, t, 4, y, ldy, g0, g1);
			for (; t + 2 <= a->T; t += 2)
				block(q8, m, a, tile, t, 2, y, ldy, g0, g1);
			for (; t < a->T; t++)
				block(q8, m, a, tile, t, 1, y, ldy, g0, g1);
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

/* 16 inputs starting at model index k (or perm[k..k+15]). */
AI __m512 load16(const float *x, const uint16_t *perm, int k)
{
	if (!perm)
		return _mm512_loadu_ps(x + k);
	return _mm512_i32gather_ps(
		_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(perm + k))), x, 4);
}

/* Same codes and scales as the scalar act_set (see cpu_expert_avx2.c). */
static void act_set(struct q3_xact *a, int t, const float *x, const uint16_t *perm, int b0,
		    int b1)
{
	const int K = a->K, nb = K / Q3_XBLOCK;
	const __m512i slots = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
	const __m512 pre = _mm512_setr_ps(1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f,
					  1.0f, 1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f,
					  0x1p-24f, 1.0f);

	for (int b = b0; b < b1; b++) {
		__m512 v0 = load16(x, perm, b * Q3_XBLOCK), v1 = load16(x, perm, b * Q3_XBLOCK + 16);
		size_t o = (size_t)t * (size_t)nb + (size_t)b;

		if (a->kind == Q3_XACT_F32) {
			float *xs = a->xs + (size_t)t * (size_t)K + (size_t)b * Q3_XBLOCK;

			_mm512_storeu_ps(xs, _mm512_mul_ps(v0, pre));
			_mm512_storeu_ps(xs + 16, _mm512_mul_ps(v1, pre));
			a->bsum[o] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
			continue;
		}
		float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) /
			  127.0f;
		float id = d > 0.0f ? 1.0f / d : 0.0f;
		__m512i q0 = _mm512_cvtps_epi32(
			_mm512_mul_ps(_mm512_permutexvar_ps(slots, v0), _mm512_set1_ps(id)));
		__m512i q1 = _mm512_cvtps_epi32(
			_mm512_mul_ps(_mm512_permutexvar_ps(slots, v1), _mm512_set1_ps(id)));

		q0 = _mm512_max_epi32(_mm512_min_epi32(q0, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
		q1 = _mm512_max_epi32(_mm512_min_epi32(q1, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
		int8_t *qd = a->q + (size_t)t * (size_t)K + (size_t)b * Q3_XBLOCK;

		_mm_storeu_si128((__m128i *)qd, _mm512_cvtsepi32_epi8(q0));
		_mm_storeu_si128((__m128i *)(qd + 16), _mm512_cvtsepi32_epi8(q1));
		a->d[o] = d;
		a->bsum[o] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
	}
}

const struct q3_xkern q3_xkern_avx512 = {
	.act_set = act_set,
	.mat_q8 = mat_q8,
	.mat_f32 = mat_f32,
};
