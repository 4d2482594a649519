/* cpu_expert_scalar.c - the CPU expert kernels in plain C: the fallback for CPUs without AVX2 and
 * the statement of the exact order of operations every SIMD variant follows (cpu_expert.h).
 *
 * Per output column j and token t, with a group's code words in rows r (8 inputs each):
 *   int8: per block b of 32 inputs, isum = Σ q·x exactly in integers; af = fma(isum, d_b, af);
 *         gz += bsum_b; per group y = fma(s, fma(-z, gz, af), y).
 *   fp32: per row, inputs j = 0, 2, 4, 6 into ae and 1, 3, 5, 7 into ao (fma, code left in
 *         place, input prescaled); per group y = fma(s, fma(-z, Σ_b bsum_b, ae + ao), y).
 */
#include <math.h>

#include "cpu_expert_impl.h"
#include "half.h"

static inline float scale_at(const struct q3_xmat *m, size_t i)
{
	uint16_t h;

	memcpy(&h, m->scales + i, 2);
	return m->bf16_scales ? q3_bf16_to_f32(h) : q3_f16_to_f32(h);
}

static inline int zero_at(const struct q3_xmat *m, int tile, int g, int c)
{
	uint32_t w;

	if (!m->zeros)
		return m->zconst;
	w = q3_xld32(m->zeros + (size_t)tile * m->zp_tile + (size_t)g * m->zp_grp + (size_t)(c / 8));
	return q3_xzero(w, c % 8, m->zero_offset);
}

static void col_q8(const struct q3_xmat *m, const struct q3_xact *a, int t, int tile, int c,
		   float *y)
{
	const uint32_t *cw = m->codes + (size_t)tile * m->cd_tile + (size_t)c;
	const int8_t *xq = q3_xact_q(a, t);
	const float *d = q3_xact_d(a, t), *bs = q3_xact_bsum(a, t);
	int bpg = m->G / Q3_XBLOCK;
	float acc = 0.0f;

	for (int g = 0; g < m->ngroups; g++) {
		float af = 0.0f, gz = 0.0f;

		for (int b = g * bpg; b < (g + 1) * bpg; b++) {
			int32_t isum = 0;

			for (int r = b * 4; r < b * 4 + 4; r++) {
				uint32_t w = q3_xld32(cw + (size_t)r * m->cd_row);
				const int8_t *xr = xq + 8 * r;

				for (int i = 0; i < 4; i++) {
					isum += (int32_t)((w >> (8 * i)) & 0xF) * xr[i];
					isum += (int32_t)((w >> (8 * i + 4)) & 0xF) * xr[4 + i];
				}
			}
			af = fmaf((float)isum, d[b], af);
			gz += bs[b];
		}
		float s = scale_at(m, (size_t)tile * m->sc_tile + (size_t)g * m->sc_grp + (size_t)c);
		float z = (float)zero_at(m, tile, g, c);
		acc = fmaf(s, fmaf(-z, gz, af), acc);
	}
	*y = acc;
}

static void col_f32(const struct q3_xmat *m, const struct q3_xact *a, int t, int tile, int c,
		    float *y)
{
	const uint32_t *cw = m->codes + (size_t)tile * m->cd_tile + (size_t)c;
	const float *xs = q3_xact_xs(a, t), *bs = q3_xact_bsum(a, t);
	int rpg = m->G / 8, bpg = m->G / Q3_XBLOCK;
	float acc = 0.0f;

	for (int g = 0; g < m->ngroups; g++) {
		float ae = 0.0f, ao = 0.0f, gx = 0.0f;

		for (int r = g * rpg; r < (g + 1) * rpg; r++) {
			uint32_t w = q3_xld32(cw + (size_t)r * m->cd_row);
			const float *xr = xs + 8 * r;

			for (int j = 0; j < 7; j++) {
				float v = (float)(int32_t)(w & (0xFu << (4 * j)));

				if (j % 2 == 0)
					ae = fmaf(v, xr[j], ae);
				else
					ao = fmaf(v, xr[j], ao);
			}
			ao = fmaf((float)(int32_t)(w >> 28), xr[7], ao);
		}
		for (int b = g * bpg; b < (g + 1) * bpg; b++)
			gx += bs[b];
		float s = scale_at(m, (size_t)tile * m->sc_tile + (size_t)g * m->sc_grp + (size_t)c);
		float z = (float)zero_at(m, tile, g, c);
		acc = fmaf(s, fmaf(-z, gx, ae + ao), acc);
	}
	*y = acc;
}

static void mat_q8(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		   int tile0, int tile1)
{
	for (int tile = tile0; tile < tile1; tile++)
		for (int t = 0; t < a->T; t++)
			for (int c = 0; c < Q3_XTILE; c++)
				col_q8(m, a, t, tile, c, y + (size_t)t * ldy + (size_t)tile * Q3_XTILE + c);
}

static void mat_f32(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		    int tile0, int tile1)
{
	for (int tile = tile0; tile < tile1; tile++)
		for (int t = 0; t < a->T; t++)
			for (int c = 0; c < Q3_XTILE; c++)
				col_f32(m, a, t, tile, c, y + (size_t)t * ldy + (size_t)tile * Q3_XTILE + c);
}

static void act_set(struct q3_xact *a, int t, const float *x, const uint16_t *perm, int b0,
		    int b1)
{
	int K = a->K, nb = K / Q3_XBLOCK;
	float v[Q3_XBLOCK];

	for (int b = b0; b < b1; b++) {
		float amax = 0.0f, sum = 0.0f;

		for (int i = 0; i < Q3_XBLOCK; i++) {
			int k = b * Q3_XBLOCK + i;

			v[i] = x[perm ? perm[k] : k];
			amax = fmaxf(amax, fabsf(v[i]));
			sum += v[i];
		}
		if (a->kind == Q3_XACT_F32) {
			float *xs = a->xs + (size_t)t * (size_t)K + (size_t)b * Q3_XBLOCK;

			for (int i = 0; i < Q3_XBLOCK; i++)
				xs[i] = v[i] * q3_xprescale(i % 8);
			a->bsum[(size_t)t * (size_t)nb + (size_t)b] = sum;
			continue;
		}
		float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
		int8_t *q = a->q + (size_t)t * (size_t)K + (size_t)b * Q3_XBLOCK;
		int32_t qs = 0;

		for (int i = 0; i < Q3_XBLOCK; i++) {
			int qi = (int)lrintf(v[i] * id);

			qi = qi > 127 ? 127 : qi < -127 ? -127 : qi;
			q[(i & ~7) + q3_xslot(i % 8)] = (int8_t)qi;
			qs += qi;
		}
		a->d[(size_t)t * (size_t)nb + (size_t)b] = d;
		a->bsum[(size_t)t * (size_t)nb + (size_t)b] = d * (float)qs;
	}
}

const struct q3_xkern q3_xkern_scalar = {
	.act_set = act_set,
	.mat_q8 = mat_q8,
	.mat_f32 = mat_f32,
};
