/* cpu_linear.c - the CPU backend's matvec for dense and GPTQ weights (see cpu_linear.h).
 *
 * Plain C written so that the compiler vectorizes the inner loops: fixed-width column tiles
 * (GPTQ) and eight partial sums (dense).
 */
#include "cpu_linear.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"
#include "half.h"

#define NT 32	 /* GPTQ column tile */
#define KB 256	 /* dense: weights converted per block */

static inline uint32_t u32_at(const void *base, size_t i)
{
	uint32_t v;

	memcpy(&v, (const char *)base + 4 * i, 4);
	return v;
}

int q3_cpu_linear_prepare(struct q3_cpu_linear *cl, const struct q3_linear *l, q3_err *e)
{
	int per, G, N;
	uint32_t mask;

	memset(cl, 0, sizeof(*cl));
	cl->l = l;
	if (l->fmt == Q3_W_DENSE)
		return 0;
	if (l->bits != 4 && l->bits != 8)
		return q3_errf(e, -EINVAL, "%s: %d-bit GPTQ weights are not supported (4 or 8)",
			       l->qweight->name, l->bits);
	per = 32 / l->bits;
	mask = (1u << l->bits) - 1;
	G = l->ngroups;
	N = l->N;
	cl->scales = malloc(sizeof(float) * (size_t)G * N);
	cl->zeros = malloc(sizeof(float) * (size_t)G * N);
	if (!cl->scales || !cl->zeros) {
		q3_cpu_linear_release(cl);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	for (int g = 0; g < G; g++)
		for (int n = 0; n < N; n++) {
			uint32_t w = u32_at(l->qzeros->data, (size_t)g * (N / per) + n / per);
			uint32_t z = (((w >> (l->bits * (n % per))) & mask) + (uint32_t)l->zero_offset) & mask;

			cl->scales[(size_t)g * N + n] = q3_tensor_f32_at(l->scales, (size_t)g * N + n);
			cl->zeros[(size_t)g * N + n] = (float)z;
		}
	cl->gidx_seq = true;
	if (l->g_idx)
		for (int k = 0; k < l->K && cl->gidx_seq; k++)
			cl->gidx_seq = u32_at(l->g_idx->data, (size_t)k) == (uint32_t)(k / l->group_size);
	return 0;
}

void q3_cpu_linear_release(struct q3_cpu_linear *cl)
{
	free(cl->scales);
	free(cl->zeros);
	cl->scales = cl->zeros = NULL;
}

/* Columns [n, n + nt) of a GPTQ Linear, nt <= NT.  Inlined with a constant nt for full tiles so
 * that the column loops have a fixed trip count. */
static inline __attribute__((always_inline)) void
gptq_tile(const struct q3_cpu_linear *cl, const float *x, size_t ldx, int T, float *y, size_t ldy,
	  int n, const int nt)
{
	const struct q3_linear *l = cl->l;
	const int bits = l->bits, per = 32 / bits, N = l->N;
	const uint32_t mask = (1u << bits) - 1;
	const char *qw = l->qweight->data;
	uint32_t words[NT];
	float wt[8][NT];

	for (int t = 0; t < T; t++)
		for (int c = 0; c < nt; c++)
			y[(size_t)t * ldy + n + c] = 0.0f;
	for (int kw = 0; kw < l->K / per; kw++) {
		memcpy(words, qw + 4 * ((size_t)kw * N + n), 4 * (size_t)nt);
		for (int j = 0; j < per; j++) {
			int k = kw * per + j;
			int g = cl->gidx_seq ? k / l->group_size : (int)u32_at(l->g_idx->data, (size_t)k);
			const float *s = cl->scales + (size_t)g * N + n, *z = cl->zeros + (size_t)g * N + n;

			for (int c = 0; c < nt; c++)
				wt[j][c] = s[c] * ((float)(int)((words[c] >> (bits * j)) & mask) - z[c]);
		}
		for (int t = 0; t < T; t++) {
			const float *xt = x + (size_t)t * ldx + (size_t)kw * per;
			float *yt = y + (size_t)t * ldy + n;

			for (int j = 0; j < per; j++) {
				float xv = xt[j];

				for (int c = 0; c < nt; c++)
					yt[c] += xv * wt[j][c];
			}
		}
	}
}

/* One token, columns [n, n + NT), groups constant over each word (g_idx trivial, group size a
 * multiple of the codes per word): the tile's sums stay in registers.  Same operations in the
 * same order as gptq_tile. */
static void gptq_tile_1(const struct q3_cpu_linear *cl, const float *x, float *y, int n)
{
	const struct q3_linear *l = cl->l;
	const int bits = l->bits, per = 32 / bits, N = l->N;
	const uint32_t mask = (1u << bits) - 1;
	const char *qw = l->qweight->data;
	uint32_t words[NT];
	float acc[NT] = { 0 };

	for (int kw = 0; kw < l->K / per; kw++) {
		int g = kw * per / l->group_size;
		const float *s = cl->scales + (size_t)g * N + n, *z = cl->zeros + (size_t)g * N + n;
		const float *xk = x + (size_t)kw * per;

		memcpy(words, qw + 4 * ((size_t)kw * N + n), sizeof(words));
		for (int j = 0; j < per; j++)
			for (int c = 0; c < NT; c++)
				acc[c] += xk[j] * (s[c] * ((float)(int)((words[c] >> (bits * j)) & mask) - z[c]));
	}
	memcpy(y + n, acc, sizeof(acc));
}

static void gptq_rows(const struct q3_cpu_linear *cl, const float *x, size_t ldx, int T, float *y,
		      size_t ldy, int n0, int n1)
{
	bool one = T == 1 && cl->gidx_seq && cl->l->group_size % (32 / cl->l->bits) == 0;
	int n = n0;

	for (; n + NT <= n1; n += NT)
		if (one)
			gptq_tile_1(cl, x, y, n);
		else
			gptq_tile(cl, x, ldx, T, y, ldy, n, NT);
	if (n < n1)
		gptq_tile(cl, x, ldx, T, y, ldy, n, n1 - n);
}

/* Σ x[k] w[k] over len <= KB with eight partial sums, added pairwise. */
static float dot8(const float *x, const float *w, int len)
{
	float acc[8] = { 0 };
	int k = 0;

	for (; k + 8 <= len; k += 8)
		for (int j = 0; j < 8; j++)
			acc[j] += x[k + j] * w[k + j];
	for (int j = 0; k < len; k++, j++)
		acc[j] += x[k] * w[k];
	return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* wf[0, len) = fp32 of len weights at element `at` of a dense tensor.  Full blocks take the
 * fixed-length loops, which the compiler vectorizes. */
static void to_f32_block(float *wf, const struct q3_tensor *w, size_t at, int len)
{
	uint16_t h[KB];

	if (w->dtype == Q3_DT_F32) {
		memcpy(wf, (const char *)w->data + 4 * at, 4 * (size_t)len);
		return;
	}
	memcpy(h, (const char *)w->data + 2 * at, 2 * (size_t)len);
	if (w->dtype == Q3_DT_BF16 && len == KB)
		for (int i = 0; i < KB; i++)
			wf[i] = q3_bf16_to_f32(h[i]);
	else if (w->dtype == Q3_DT_BF16)
		for (int i = 0; i < len; i++)
			wf[i] = q3_bf16_to_f32(h[i]);
	else
		for (int i = 0; i < len; i++)
			wf[i] = q3_f16_to_f32(h[i]);
}

/* Dense rows: each row is converted to fp32 KB weights at a time and dotted with every token;
 * y[t][n] accumulates the blocks in order. */
static void dense_rows(const struct q3_cpu_linear *cl, const float *x, size_t ldx, int T, float *y,
		       size_t ldy, int n0, int n1)
{
	const struct q3_tensor *w = cl->l->w;
	const int K = cl->l->K;
	float wf[KB];

	for (int n = n0; n < n1; n++) {
		for (int k0 = 0; k0 < K; k0 += KB) {
			int len = Q3_MIN(KB, K - k0);

			to_f32_block(wf, w, (size_t)n * K + k0, len);
			for (int t = 0; t < T; t++) {
				float d = dot8(x + (size_t)t * ldx + k0, wf, len);
				float *yt = y + (size_t)t * ldy + n;

				*yt = k0 ? *yt + d : d;
			}
		}
	}
}

void q3_cpu_linear_rows(const struct q3_cpu_linear *cl, const float *x, size_t ldx, int T, float *y,
			size_t ldy, int n0, int n1)
{
	if (cl->l->fmt == Q3_W_DENSE)
		dense_rows(cl, x, ldx, T, y, ldy, n0, n1);
	else
		gptq_rows(cl, x, ldx, T, y, ldy, n0, n1);
}
