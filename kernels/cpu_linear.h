/* cpu_linear.h - y = x·Wᵀ on the CPU for every stored weight format: the one place the CPU
 * backend multiplies by a weight (optimized AVX2 / AVX-512 kernels will dispatch from here).
 *
 * Weights are read where they lie (the checkpoint's bytes, unaligned loads); preparing a GPTQ
 * Linear only converts its scales and zero points to fp32 [ngroups][N] (one eighth of the codes'
 * size at 4 bits, group 128) and notes whether g_idx is the trivial k / group_size.  Every
 * weight is dequantized exactly as dequant.h defines it (s · (q − z) in fp32), so results match
 * q3_ref_linear up to the order of fp32 additions.
 *
 * Each y[t][n] is summed in a fixed order that depends only on n and K, never on T, the rows
 * asked for or the thread that runs them: a token gets the same bits alone or in a batch.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "model.h"
#include "util.h"

struct q3_cpu_linear {
	const struct q3_linear *l; /* the stored weight; its tensors' data must stay loaded */
	float *scales;		   /* GPTQ: [ngroups][N] */
	float *zeros;		   /* GPTQ: [ngroups][N], stored zero point + offset, masked */
	bool gidx_seq;		   /* GPTQ: the group of input k is k / group_size */
};

/* Output rows per task that callers should split a Linear into (a multiple of the kernels'
 * column tile). */
#define Q3_CPU_LINEAR_ROWS 64

int q3_cpu_linear_prepare(struct q3_cpu_linear *cl, const struct q3_linear *l, q3_err *e);
void q3_cpu_linear_release(struct q3_cpu_linear *cl);

/* y[t·ldy + n] = Σ_k x[t·ldx + k] · W[n][k] for t in [0, T), n in [n0, n1). */
void q3_cpu_linear_rows(const struct q3_cpu_linear *cl, const float *x, size_t ldx, int T, float *y,
			size_t ldy, int n0, int n1);
