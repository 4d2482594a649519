/* cpu_expert_zmm.h - zmm helpers shared by the AVX-512 and AMX expert kernels (included only by
 * cpu_expert_avx512.c and cpu_expert_amx.c, which are built with the AVX-512 flags). */
#pragma once
#include <immintrin.h>

#include "cpu_expert_impl.h"

#define AI __attribute__((always_inline)) static inline

/* 16 scales (fp16 or bf16) to fp32. */
AI __m512 load_scales(const struct q3_xmat *m, const uint16_t *p)
{
	__m256i h = _mm256_loadu_si256((const __m256i *)p);

	if (m->bf16_scales)
		return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
	return _mm512_cvtph_ps(h);
}

/* Zero points of 16 columns: two nibble-packed words. */
AI __m512 load_zeros(const struct q3_xmat *m, const uint32_t *zp)
{
	if (!zp)
		return _mm512_set1_ps((float)m->zconst);
	__m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)q3_xld32(zp))),
				       _mm256_set1_epi32((int)q3_xld32(zp + 1)), 1);
	__m512i z = _mm512_srlv_epi32(w, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12,
							   16, 20, 24, 28));
	z = _mm512_add_epi32(z, _mm512_set1_epi32(m->zero_offset));
	return _mm512_cvtepi32_ps(_mm512_and_si512(z, _mm512_set1_epi32(0xF)));
}
