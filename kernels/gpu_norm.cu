/* gpu_norm.cu - the row-wise ops: embedding lookup, the residual add fused with the zero-centred
 * RMSNorm that feeds the next Linears, and the gated RMSNorm of linear attention.  fp32 math,
 * fp16 outputs where they feed a Linear. */
#include "gpu_internal.h"

__global__ void embed_kernel(float *h, const uint16_t *embed, const int32_t *ids, int H)
{
	pdl_trigger();
	pdl_wait();
	const uint16_t *src = embed + (size_t)ids[blockIdx.x] * H;
	float *dst = h + (size_t)blockIdx.x * H;

	for (int i = threadIdx.x; i < H; i += blockDim.x)
		dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

extern "C" int q3g_embed(float *h, const uint16_t *embed, struct q3g_rows rows, int R, int H, q3g_stream st,
			 q3_err *e)
{
	/* a plain launch: it follows the copy of the call table, not a kernel */
	embed_kernel<<<R, 256, 0, (cudaStream_t)st>>>(h, embed, rows.ids, H);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

/* One block per row; h stays fp32 (the residual stream).  The row's scale comes from row_rsqrt,
 * as where the matvec and the experts normalize while staging (stage_x_norm): a row gets the same
 * fp16 inputs either way, so the engine may fold the norm in for small batches only. */
__global__ void add_rmsnorm_kernel(float *h, const float *a, uint16_t *y, const float *w, const int *rows_idx,
				   int n, float eps)
{
	__shared__ float rs;
	pdl_trigger();
	pdl_wait();
	int r = rows_idx ? rows_idx[blockIdx.x] : blockIdx.x;
	float *hr = h + (size_t)r * n;
	const float *ar = a ? a + (size_t)r * n : NULL;
	uint16_t *yr = y + (size_t)blockIdx.x * n;

	if (ar) {
		for (int i = threadIdx.x; i < n; i += blockDim.x)
			hr[i] += ar[i];
		__syncthreads();
	}
	row_rsqrt(&rs, hr, n, 1, n, eps);
	__syncthreads();
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		yr[i] = f2h_bits(hr[i] * rs * (1.0f + w[i]));
}

extern "C" int q3g_add_rmsnorm(float *h, const float *a, uint16_t *y, const float *w, const int *rows_idx,
			       int R, int n, float eps, q3g_stream st, q3_err *e)
{
	if (R < 1)
		return 0;
	CUDA_CHECK(e, q3g_launch(add_rmsnorm_kernel, R, 256, 0, (cudaStream_t)st, h, a, y, w, rows_idx, n, eps));
	return 0;
}

/* x[r] = h[r] · rsqrt(mean(h[r]²) + eps) · (1 + w), fp32 (the router's input in prefill). */
__global__ void rmsnorm_f32_kernel(float *x, const float *h, const float *w, int n, float eps)
{
	__shared__ float red[32];
	pdl_trigger();
	pdl_wait();
	const float *hr = h + (size_t)blockIdx.x * n;
	float *xr = x + (size_t)blockIdx.x * n, ss = 0.0f;

	for (int i = threadIdx.x; i < n; i += blockDim.x)
		ss += hr[i] * hr[i];
	ss = block_sum(ss, red);
	float rs = rsqrtf(ss / (float)n + eps);

	for (int i = threadIdx.x; i < n; i += blockDim.x)
		xr[i] = hr[i] * rs * (1.0f + w[i]);
}

extern "C" int q3g_rmsnorm_f32(float *x, const float *h, const float *w, int R, int n, float eps, q3g_stream st,
			       q3_err *e)
{
	if (R < 1)
		return 0;
	CUDA_CHECK(e, q3g_launch(rmsnorm_f32_kernel, R, 256, 0, (cudaStream_t)st, x, h, w, n, eps));
	return 0;
}

/* One warp per (row, head) of Dv values. */
__global__ void gated_rmsnorm_kernel(uint16_t *core, const float *o, const float *z, int ldz, const float *w,
				     int R, int nheads, int Dv, float eps)
{
	int id = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;

	if (id >= R * nheads)
		return;
	int r = id / nheads, hd = id % nheads;
	const float *orow = o + (size_t)r * nheads * Dv + (size_t)hd * Dv;
	const float *zrow = z + (size_t)r * ldz + (size_t)hd * Dv;
	uint16_t *out = core + (size_t)r * nheads * Dv + (size_t)hd * Dv;
	float ss = 0.0f;

	for (int c = lane; c < Dv; c += 32)
		ss += orow[c] * orow[c];
	ss = warp_sum(ss);
	float rs = rsqrtf(ss / (float)Dv + eps);

	for (int c = lane; c < Dv; c += 32)
		out[c] = f2h_bits(w[c] * (orow[c] * rs) * dev_silu(zrow[c]));
}

extern "C" int q3g_gated_rmsnorm(uint16_t *core, const float *o, const float *z, int ldz, const float *w, int R,
				 int nheads, int Dv, float eps, q3g_stream st, q3_err *e)
{
	int n = R * nheads;

	gated_rmsnorm_kernel<<<cdiv(n, 8), 256, 0, (cudaStream_t)st>>>(core, o, z, ldz, w, R, nheads, Dv, eps);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}
