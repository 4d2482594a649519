/* gpu_gdn.cu - Gated DeltaNet on the GPU: the causal depthwise conv1d + SiLU with its state, and
 * the gated delta rule (l2norm of q and k, the gates, the recurrence, optionally the gated norm).
 *
 * The recurrence runs token after token, in fp32, with the state in registers: a block per
 * (sequence, value head), a warp per Q3G_DELTA_CPW value columns, each lane holding Dk / 32 keys of
 * those columns.  Per token the two products Sᵀk and Sᵀq come from the state before the update
 * (o = α·S_oldᵀq + δ·(k·q), with δ = β(v − α·S_oldᵀk), then S = α·S + k δᵀ), so one round of warp
 * reductions per token serves both.  The same kernel does decode (one token) and prefill (the
 * sequence's tokens of the call, one after the other); the state is stored transposed
 * ([Dv][Dk]) so that a warp reads its columns' keys with coalesced loads.
 */
#include "gpu_internal.h"

/* ---- conv1d ----------------------------------------------------------------------------------- */

/* One thread per (row, channel).  The window of row r at position p is the inputs at p-W+1 .. p:
 * rows of the same call for positions >= the sequence's first, the read state before that, and
 * zeros before position 0.  Rows among the last W-1 of their sequence write the new state; the
 * first row also carries old state entries when the call is shorter than W-1. */
__global__ void conv1d_silu_kernel(float *u, const float *qkvz, int ldq, const float *cw, struct q3g_rows rows,
				   int R, int C, int W, int lin)
{
	int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;

	if (c >= C)
		return;
	const struct q3g_seq sq = rows.seq[rows.row_seq[r]];
	const int p = rows.row_pos[r], p0 = sq.pos, pe = sq.pos + sq.n, S = W - 1;
	const float *rd = sq.conv_rd + (size_t)lin * S * C;
	float *wr = sq.conv_wr + (size_t)lin * S * C;
	float acc = 0.0f;

	for (int m = 0; m < W; m++) {
		int pp = p - S + m;
		float in = 0.0f;

		if (pp >= p0)
			in = qkvz[(size_t)(sq.row0 + pp - p0) * ldq + c];
		else if (pp >= 0)
			in = rd[(size_t)(S - p0 + pp) * C + c];
		acc += cw[(size_t)c * W + m] * in;
	}
	u[(size_t)r * C + c] = dev_silu(acc);
	/* new state slot j holds the input at pe - S + j */
	int j = p - pe + S;
	if (j >= 0)
		wr[(size_t)j * C + c] = qkvz[(size_t)r * ldq + c];
	if (p == p0)
		for (j = 0; j < S && pe - S + j < p0; j++) {
			int pp = pe - S + j;

			wr[(size_t)j * C + c] = pp >= 0 ? rd[(size_t)(S - p0 + pp) * C + c] : 0.0f;
		}
}

extern "C" int q3g_conv1d_silu(float *u, const float *qkvz, int ldq, const float *cw, struct q3g_rows rows,
			       int R, int nseq, int lin, const struct q3g_dims *d, q3g_stream st, q3_err *e)
{
	dim3 grid(R, cdiv(d->conv_dim, 256));

	conv1d_silu_kernel<<<grid, 256, 0, (cudaStream_t)st>>>(u, qkvz, ldq, cw, rows, R, d->conv_dim, d->W, lin);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

/* ---- delta rule ------------------------------------------------------------------------------- */

struct delta_args {
	const float *u;	     /* [R][conv_dim]: q | k | v after the conv */
	const float *ba;     /* [R][2 Nv]: b | a */
	const float *A_log, *dt_bias, *normw;
	float *o;	     /* [R][value_dim] */
	uint16_t *core;	     /* [R][value_dim] (fused norm) */
	const float *z;
	int ldz;
	struct q3g_rows rows;
	int lin, Nk, Nv, Dk, Dv, conv_dim, key_dim;
	float eps;
};

template <int KPL, bool FUSE>
__global__ void __launch_bounds__(1024) delta_kernel(const __grid_constant__ delta_args A)
{
	constexpr int CPW = Q3G_DELTA_CPW;
	__shared__ float red[32];
	const int s = blockIdx.x, j = blockIdx.y, kh = j / (A.Nv / A.Nk);
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c0 = warp * CPW, i0 = lane * KPL;
	const struct q3g_seq sq = A.rows.seq[s];
	float *Sg = sq.rec + ((size_t)A.lin * A.Nv + j) * A.Dv * A.Dk;
	const float qscale = rsqrtf((float)A.Dk);
	const float negA = -expf(A.A_log[j]), dtb = A.dt_bias[j];
	float S[CPW][KPL];

#pragma unroll
	for (int c = 0; c < CPW; c++)
#pragma unroll
		for (int i = 0; i < KPL; i++)
			S[c][i] = sq.pos > 0 ? Sg[(size_t)(c0 + c) * A.Dk + i0 + i] : 0.0f;

	for (int t = 0; t < sq.n; t++) {
		const int row = sq.row0 + t;
		const float *ur = A.u + (size_t)row * A.conv_dim;
		float q[KPL], k[KPL], v[CPW];
		float sqq = 0.0f, skk = 0.0f, sqk = 0.0f;

#pragma unroll
		for (int i = 0; i < KPL; i++) {
			q[i] = ur[kh * A.Dk + i0 + i];
			k[i] = ur[A.key_dim + kh * A.Dk + i0 + i];
			sqq += q[i] * q[i];
			skk += k[i] * k[i];
			sqk += q[i] * k[i];
		}
#pragma unroll
		for (int c = 0; c < CPW; c++)
			v[c] = ur[2 * A.key_dim + j * A.Dv + c0 + c];
		float b = A.ba[(size_t)row * 2 * A.Nv + j], a = A.ba[(size_t)row * 2 * A.Nv + A.Nv + j];
		float pk[CPW], pq[CPW];

#pragma unroll
		for (int c = 0; c < CPW; c++) {
			pk[c] = pq[c] = 0.0f;
#pragma unroll
			for (int i = 0; i < KPL; i++) {
				pk[c] += S[c][i] * k[i];
				pq[c] += S[c][i] * q[i];
			}
		}
		/* one round of reductions: the norms, q·k, and the state products */
#pragma unroll
		for (int off = 16; off > 0; off >>= 1) {
			sqq += __shfl_xor_sync(0xffffffffu, sqq, off);
			skk += __shfl_xor_sync(0xffffffffu, skk, off);
			sqk += __shfl_xor_sync(0xffffffffu, sqk, off);
#pragma unroll
			for (int c = 0; c < CPW; c++) {
				pk[c] += __shfl_xor_sync(0xffffffffu, pk[c], off);
				pq[c] += __shfl_xor_sync(0xffffffffu, pq[c], off);
			}
		}
		const float rq = rsqrtf(sqq + 1e-6f) * qscale, rk = rsqrtf(skk + 1e-6f);
		const float beta = 1.0f / (1.0f + expf(-b));
		const float x = a + dtb, sp = x > 20.0f ? x : log1pf(expf(x));
		const float alpha = expf(negA * sp), qk = sqk * rq * rk;
		float o[CPW];

#pragma unroll
		for (int c = 0; c < CPW; c++) {
			/* products with the normalized q and k: scale the raw ones */
			float kv = pk[c] * rk, qs = pq[c] * rq;
			float delta = beta * (v[c] - alpha * kv);

			o[c] = alpha * qs + delta * qk;
#pragma unroll
			for (int i = 0; i < KPL; i++)
				S[c][i] = alpha * S[c][i] + (k[i] * rk) * delta;
		}
		if (!FUSE) {
			float *orow = A.o + (size_t)row * A.Nv * A.Dv + (size_t)j * A.Dv + c0;
#pragma unroll
			for (int c = 0; c < CPW; c++)
				if (lane == c)
					orow[c] = o[c];
		} else {
			float ss = 0.0f;
#pragma unroll
			for (int c = 0; c < CPW; c++)
				ss += o[c] * o[c];
			__syncthreads();
			if (lane == 0)
				red[warp] = ss;
			__syncthreads();
			ss = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f;
			ss = warp_sum(ss);
			const float rs = rsqrtf(ss / (float)A.Dv + A.eps);
			const float *zr = A.z + (size_t)row * A.ldz + (size_t)j * A.Dv + c0;
			uint16_t *out = A.core + (size_t)row * A.Nv * A.Dv + (size_t)j * A.Dv + c0;
#pragma unroll
			for (int c = 0; c < CPW; c++)
				if (lane == c)
					out[c] = __bfloat16_as_ushort(f2bf(A.normw[c0 + c] * (o[c] * rs) * dev_silu(zr[c])));
		}
	}
#pragma unroll
	for (int c = 0; c < CPW; c++)
#pragma unroll
		for (int i = 0; i < KPL; i++)
			Sg[(size_t)(c0 + c) * A.Dk + i0 + i] = S[c][i];
}

template <bool FUSE> static int launch_delta(const delta_args &A, int nseq, cudaStream_t st, q3_err *e)
{
	dim3 grid(nseq, A.Nv), block(32 * A.Dv / Q3G_DELTA_CPW);

	switch (A.Dk / 32) {
	case 1: delta_kernel<1, FUSE><<<grid, block, 0, st>>>(A); break;
	case 2: delta_kernel<2, FUSE><<<grid, block, 0, st>>>(A); break;
	case 4: delta_kernel<4, FUSE><<<grid, block, 0, st>>>(A); break;
	case 8: delta_kernel<8, FUSE><<<grid, block, 0, st>>>(A); break;
	}
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

extern "C" int q3g_delta(const float *u, const float *ba, const float *A_log, const float *dt_bias, float *o,
			 uint16_t *core, const float *z, int ldz, const float *normw, bool fuse_norm,
			 struct q3g_rows rows, int nseq, int lin, const struct q3g_dims *d, q3g_stream st, q3_err *e)
{
	delta_args A;
	int kpl = d->Dk / 32;

	if (d->Dk % 32 || (kpl != 1 && kpl != 2 && kpl != 4 && kpl != 8) || d->Dv % Q3G_DELTA_CPW ||
	    32 * d->Dv / Q3G_DELTA_CPW > 1024 || d->Nv % d->Nk)
		return q3_errf(e, -EINVAL, "delta rule: key head %d / value head %d not supported (key 32..256 by "
			       "powers of 2, value a multiple of %d up to %d)", d->Dk, d->Dv, Q3G_DELTA_CPW,
			       1024 * Q3G_DELTA_CPW / 32);
	memset(&A, 0, sizeof(A));
	A.u = u;
	A.ba = ba;
	A.A_log = A_log;
	A.dt_bias = dt_bias;
	A.normw = normw;
	A.o = o;
	A.core = core;
	A.z = z;
	A.ldz = ldz;
	A.rows = rows;
	A.lin = lin;
	A.Nk = d->Nk;
	A.Nv = d->Nv;
	A.Dk = d->Dk;
	A.Dv = d->Dv;
	A.conv_dim = d->conv_dim;
	A.key_dim = d->key_dim;
	A.eps = d->eps;
	return fuse_norm ? launch_delta<true>(A, nseq, (cudaStream_t)st, e)
			 : launch_delta<false>(A, nseq, (cudaStream_t)st, e);
}
