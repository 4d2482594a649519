/* dequant.c - reference conversions of stored weights to fp32 (see dequant.h). */
#include "dequant.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"

float q3_tensor_f32_at(const struct q3_tensor *t, uint64_t i)
{
	const char *p = t->data;
	uint16_t h;
	float f;

	switch (t->dtype) {
	case Q3_DT_F32:
		memcpy(&f, p + 4 * i, 4);
		return f;
	case Q3_DT_F16:
		memcpy(&h, p + 2 * i, 2);
		return q3_f16_to_f32(h);
	case Q3_DT_BF16:
		memcpy(&h, p + 2 * i, 2);
		return q3_bf16_to_f32(h);
	default:
		return 0.0f; /* model.c only binds float dtypes here */
	}
}

void q3_tensor_to_f32(const struct q3_tensor *t, float *out)
{
	uint64_t n = q3_tensor_numel(t);

	for (uint64_t i = 0; i < n; i++)
		out[i] = q3_tensor_f32_at(t, i);
}

static inline int gptq_group(const struct q3_linear *l, int k)
{
	return l->g_idx ? (int)q3_tensor_u32_at(l->g_idx, (uint64_t)k) : k / l->group_size;
}

int q3_gptq_order(const struct q3_linear *l, int *order, int *bad)
{
	int K = l->K, G = l->group_size, ng = l->ngroups, *fill, unused;
	bool ident = true;

	bad = bad ? bad : &unused;
	*bad = -1;
	for (int k = 0; k < K; k++) {
		order[k] = k;
		ident = ident && gptq_group(l, k) == k / G;
	}
	if (ident)
		return 1;
	if (K != ng * G)
		return -EINVAL;
	if (!(fill = calloc((size_t)ng, sizeof(int))))
		return -ENOMEM;
	for (int k = 0; k < K; k++) {
		uint32_t g = q3_tensor_u32_at(l->g_idx, (uint64_t)k);

		if (g >= (uint32_t)ng || fill[g] == G) {
			free(fill);
			*bad = k;
			return -EINVAL;
		}
		order[(size_t)g * G + fill[g]++] = k;
	}
	free(fill);
	return 0;
}

bool q3_gptq_same_groups(const struct q3_linear *a, const struct q3_linear *b)
{
	if (a->K != b->K || a->group_size != b->group_size)
		return false;
	for (int k = 0; k < a->K; k++)
		if (gptq_group(a, k) != gptq_group(b, k))
			return false;
	return true;
}

float q3_linear_weight(const struct q3_linear *l, int n, int k)
{
	unsigned P, mask, q, z;
	int g;

	if (l->fmt == Q3_W_DENSE)
		return q3_tensor_f32_at(l->w, (uint64_t)n * (uint64_t)l->K + (uint64_t)k);
	P = 32u / (unsigned)l->bits;
	mask = (1u << l->bits) - 1;
	g = gptq_group(l, k);
	q = (q3_tensor_u32_at(l->qweight, (uint64_t)(k / (int)P) * (uint64_t)l->N + (uint64_t)n) >>
	     (l->bits * (k % (int)P))) & mask;
	z = (q3_tensor_u32_at(l->qzeros, (uint64_t)g * (uint64_t)(l->N / (int)P) + (uint64_t)(n / (int)P)) >>
	     (l->bits * (n % (int)P))) & mask;
	z = (z + (unsigned)l->zero_offset) & mask;
	return q3_tensor_f32_at(l->scales, (uint64_t)g * (uint64_t)l->N + (uint64_t)n) *
	       (float)((int)q - (int)z);
}

void q3_linear_dequant_rows(const struct q3_linear *l, int n0, int n1, float *W)
{
	for (int n = n0; n < n1; n++)
		for (int k = 0; k < l->K; k++)
			W[(size_t)(n - n0) * (size_t)l->K + (size_t)k] = q3_linear_weight(l, n, k);
}

void q3_linear_dequant(const struct q3_linear *l, float *W)
{
	q3_linear_dequant_rows(l, 0, l->N, W);
}
