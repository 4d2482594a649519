/* dequant.h - stored weights to fp32: float tensors of any dtype, and GPTQ dequantization.
 *
 * These are the reference definitions (qwen3next.md section 5): slow, obvious, exact.  The compute
 * kernels dequantize on the fly inside their matvecs and are tested against these.
 *
 *   q(k, n) = (qweight[k / P][n] >> (bits * (k % P))) & mask        P = 32 / bits codes per word
 *   z(g, n) = ((qzeros[g][n / P] >> (bits * (n % P))) & mask) + zero_offset
 *   W[n][k] = scales[g][n] * (q(k, n) - z(g, n)),   g = g_idx ? g_idx[k] : k / group_size
 *
 * AutoGPTQ masks the zero point after adding the offset (a stored 15 + 1 wraps to 0 in 4 bits);
 * so does this code, to match what those checkpoints mean.
 */
#pragma once
#include <stdint.h>

#include "checkpoint.h"
#include "model.h"

/* Converts a loaded float tensor (F32, F16, BF16) to fp32. */
void q3_tensor_to_f32(const struct q3_tensor *t, float *out);
/* Element i of a loaded float tensor. */
float q3_tensor_f32_at(const struct q3_tensor *t, uint64_t i);
/* 32-bit word i of a loaded I32 tensor (handles unaligned data). */
static inline uint32_t q3_tensor_u32_at(const struct q3_tensor *t, uint64_t i)
{
	uint32_t v;
	__builtin_memcpy(&v, (const char *)t->data + 4 * i, 4);
	return v;
}

/* The act-order input order of a GPTQ Linear: order[j] = the input at position j once the K
 * inputs are sorted by group (g_idx), stable, so that group g owns positions [g·G, (g+1)·G).
 * Returns 1 where that is the identity (no g_idx, or g_idx[k] = k / G), 0 where it is not,
 * -EINVAL where g_idx does not give every group exactly G inputs (*bad, where bad is not NULL:
 * the first input k past its group's G or naming a group >= ngroups; -1 where K is not
 * ngroups · G), -ENOMEM.  One pass
 * over g_idx, not one a group (act-order stacks: every expert's three Linears at load). */
int q3_gptq_order(const struct q3_linear *l, int *order, int *bad);
/* Whether a and b put every input in the same group (g_idx, or k / G where one has none) with the
 * same group size: then q3_gptq_order gives them one order, compared without computing it. */
bool q3_gptq_same_groups(const struct q3_linear *a, const struct q3_linear *b);
/* W[n][k] of a loaded Linear (dense or GPTQ). */
float q3_linear_weight(const struct q3_linear *l, int n, int k);
/* The whole weight as fp32, row-major [N][K]. */
void q3_linear_dequant(const struct q3_linear *l, float *W);
/* Rows [n0, n1) only, into W[(n - n0) * K + k]. */
void q3_linear_dequant_rows(const struct q3_linear *l, int n0, int n1, float *W);
