/* cpu_expert_impl.h - the one dispatch point of the CPU expert kernels: each ISA variant
 * (cpu_expert_scalar.c, _avx2.c, _avx512.c, _amx.c) fills one table; cpu_expert.c picks the
 * table at run time from cpuid.  Every variant computes the same sums in the same order
 * (cpu_expert.h); they differ only in how many columns and tokens one instruction covers.
 * Only cpu_expert*.c include this.
 */
#pragma once
#include <string.h>

#include "cpu_expert.h"

struct q3_xkern {
	/* q3_xact_set_blocks */
	void (*act_set)(struct q3_xact *a, int t, const float *x, const uint16_t *perm, int b0,
			int b1);
	/* y[t·ldy + j] for the columns of tiles [tile0, tile1), every token of a (T <= Q3_XT_MAX) */
	void (*mat_q8)(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
		       int tile0, int tile1);
	void (*mat_f32)(const struct q3_xmat *m, const struct q3_xact *a, float *y, size_t ldy,
			int tile0, int tile1);
};

extern const struct q3_xkern q3_xkern_scalar;
extern const struct q3_xkern q3_xkern_avx2;
extern const struct q3_xkern q3_xkern_avx512;
extern const struct q3_xkern q3_xkern_amx;

/* Sets up AMX for the calling thread's process (Linux asks for permission once); false when the
 * kernel refuses.  In cpu_expert_amx.c. */
bool q3_xamx_enable(void);

/* Whether a matrix's code rows are contiguous across tiles (the GPTQ layout), so that the kernels
 * walk it group by group over every tile rather than tile by tile. */
static inline bool q3_xmat_row_major(const struct q3_xmat *m)
{
	return m->cd_row > m->cd_tile;
}

/* Unaligned 32-bit load (code words and activation quads may sit anywhere). */
static inline uint32_t q3_xld32(const void *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

/* Zero point of column c (0..7) of a zeros word, offset applied and masked. */
static inline int q3_xzero(uint32_t w, int c, int off)
{
	return (int)(((w >> (4 * c)) + (unsigned)off) & 0xF);
}

/* Where input i (0..7) of a group of 8 sits in the int8 activation: 0,2,4,6 then 1,3,5,7. */
static inline int q3_xslot(int i)
{
	return i % 2 ? 4 + i / 2 : i / 2;
}

/* The prescale of fp32 activations: input k' sits at bits 4j (j = k' mod 8) of its word; the
 * kernels convert (word & 0xF << 4j) to float, a value 2^(4j) too large, except j = 7, which is
 * shifted down (word >> 28) to stay positive. */
static inline float q3_xprescale(int j)
{
	return j == 7 ? 1.0f : 1.0f / (float)(1u << (4 * j));
}
