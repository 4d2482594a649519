/* gpu_moe.cu - the sparse MoE block of decode: router top-k, then the routed and shared experts
 * of every (row, slot) pair without a host round trip (the expert ids stay on the device).
 *
 *   q3g_router_topk  one warp per row: softmax over E logits (fp32), k rounds of warp argmax
 *                    (ties: the lower index), renormalization; slot k = the shared expert.
 *   q3g_moe_up       block (pair, row tiles of gate or up): the pair's expert's gate and up
 *                    projections of the row, fp32 [P][2][Imax].
 *   q3g_moe_down     block (row, output row tiles): loops over the row's k + 1 slots, stages
 *                    silu(gate) ⊙ up of each (fp16, through the down matrix's act-order
 *                    permutation), runs the down projections scaled by the routing weights (the
 *                    shared expert's is sigmoid of its gate) and adds the sum to the residual
 *                    stream.  One block owns each output element: deterministic, no atomics.
 */
#include <cublas_v2.h>

#include "gpu_internal.h"
#include "mma_frag.cuh"

/* ---- router ----------------------------------------------------------------------------------- */

/* Row r's top k by one warp (every lane calls it): the logits are read through L2 (__ldcg), so
 * that the router kernel's last block sees the other blocks' writes. */
static __device__ void topk_row(int *idx, float *w, const float *logits, const float *sg, int r, int E, int k,
				bool norm)
{
	constexpr int PER = Q3G_ROUTER_MAX_E / 32;
	const int lane = threadIdx.x & 31;
	const float *l = logits + (size_t)r * E;
	float v[PER], mx = -INFINITY, sum = 0.0f, wsum = 0.0f;
	float myw = 0.0f;
	int myi = 0;

#pragma unroll
	for (int i = 0; i < PER; i++) {
		int e = lane + 32 * i;

		v[i] = e < E ? __ldcg(l + e) : -INFINITY;
		if (isnan(v[i]))
			v[i] = -INFINITY; /* a NaN logit must still leave k valid expert ids */
		mx = fmaxf(mx, v[i]);
	}
	mx = warp_max(mx);
#pragma unroll
	for (int i = 0; i < PER; i++) {
		v[i] = lane + 32 * i < E ? __expf(v[i] - mx) : -1.0f; /* taken / absent: -1 */
		sum += v[i] > 0.0f ? v[i] : 0.0f;
	}
	sum = warp_sum(sum);
	for (int j = 0; j < k; j++) {
		float best = -2.0f;
		int bi = E; /* beaten by any expert not taken yet (their v >= 0) */

#pragma unroll
		for (int i = 0; i < PER; i++)
			if (v[i] > best) {
				best = v[i];
				bi = lane + 32 * i;
			}
#pragma unroll
		for (int o = 16; o > 0; o >>= 1) {
			float ob = __shfl_xor_sync(0xffffffffu, best, o);
			int oi = __shfl_xor_sync(0xffffffffu, bi, o);

			if (ob > best || (ob == best && oi < bi)) {
				best = ob;
				bi = oi;
			}
		}
		float p = best / sum;

#pragma unroll
		for (int i = 0; i < PER; i++)
			if (lane + 32 * i == bi)
				v[i] = -1.0f;
		wsum += p;
		if (lane == j) {
			myw = p;
			myi = bi;
		}
	}
	if (lane < k) {
		idx[(size_t)r * (k + 1) + lane] = myi < E ? myi : 0;
		w[(size_t)r * (k + 1) + lane] = norm ? myw / wsum : myw;
	}
	if (lane == 0) {
		idx[(size_t)r * (k + 1) + k] = -1;
		w[(size_t)r * (k + 1) + k] = sg ? dev_sigmoid(__ldcg(sg + r)) : 0.0f;
	}
}

__global__ void router_topk_kernel(int *idx, float *w, const float *logits, const float *sg, int R, int E,
				   int k, bool norm)
{
	int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);

	pdl_trigger();
	pdl_wait();
	if (r < R)
		topk_row(idx, w, logits, sg, r, E, k, norm);
}

static int check_topk(int E, int k, q3_err *e)
{
	if (E > Q3G_ROUTER_MAX_E || k > Q3G_ROUTER_MAX_K || k > E || k < 1)
		return q3_errf(e, -EINVAL, "router: %d experts top %d (the kernel takes up to %d, top %d)", E, k,
			       Q3G_ROUTER_MAX_E, Q3G_ROUTER_MAX_K);
	return 0;
}

extern "C" int q3g_router_topk(int *idx, float *w, const float *logits, const float *sg, int R, int E,
			       int k, bool norm, q3g_stream st, q3_err *e)
{
	int err;

	if ((err = check_topk(E, k, e)))
		return err;
	CUDA_CHECK(e, q3g_launch(router_topk_kernel, cdiv(R, 4), 128, 0, (cudaStream_t)st, idx, w, logits, sg, R, E, k, norm));
	return 0;
}

/* ---- router logits in fp32 --------------------------------------------------------------------- */

struct router_launch {
	struct q3g_mat mat[2]; /* router, shared-expert gate (fp16 tile format) */
	float *y[2];
	int ldy[2];
	int tiles0;	       /* blocks of the router; the rest are the gate's */
	const float *h, *normw;
	float eps;
	int R, H;
	/* the top k fused (q3g_router): the last block to finish runs it; done counts finished
	 * blocks and is left at 0 for the next launch */
	unsigned *done;
	int *idx;
	float *w;
	int E, k;
	bool norm;
};

/* Block = one row tile of one matrix; its 16 warps split the chunks (two each at the real
 * shapes: the kernel is latency-bound, and 8 warps of four chunks in a row took 50% longer);
 * lane (g, t) sums rows g and g + 8 over its inputs of each k-step (the same 16-byte loads as the
 * matvec), for every row of x (MAXR at most: one token keeps one row of accumulators); the four
 * lanes of a row group and then the warps add up.  The same shape for every R: a row's logits
 * must not depend on its batch. */
#define ROUTER_THREADS 512
template <int MAXR>
__global__ void __launch_bounds__(ROUTER_THREADS) router_f32_kernel(const __grid_constant__ router_launch L)
{
	extern __shared__ float xsf[]; /* [R][H] normalized x, fp32; then [warps][32][2 MAXR] partials */
	__shared__ float rs[Q3G_MMV_MAX_TOK], nred[Q3G_MMV_MAX_TOK * 32];
	__shared__ bool last;
	pdl_trigger();
	const int j = (int)blockIdx.x >= L.tiles0, tile = j ? blockIdx.x - L.tiles0 : blockIdx.x;
	const struct q3g_mat &m = L.mat[j];
	const int R = L.R, H = L.H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	const int nw = blockDim.x >> 5;
	const int per = cdiv(m.nchunks, nw), c0 = warp * per, c1 = min(m.nchunks, c0 + per);
	float acc[MAXR][2];

	const uint8_t *base = (const uint8_t *)m.data + (size_t)tile * m.nchunks * Q3G_CHUNK_BYTES_F16 + lane * 16;
	/* the weights do not depend on the previous kernel: the warp's first RPRE chunks into
	 * registers while it ends, the rest towards L2 */
	constexpr int RPRE = 2;
	uint4 pre[RPRE][4];

#pragma unroll
	for (int u = 0; u < RPRE; u++)
#pragma unroll
		for (int s = 0; s < 4; s++)
			if (c0 + u < c1)
				pre[u][s] = ldg_stream(base + (size_t)(c0 + u) * Q3G_CHUNK_BYTES_F16 + s * 512);
	if (lane == 0 && c0 + RPRE < c1)
		prefetch_l2((const uint8_t *)m.data + ((size_t)tile * m.nchunks + c0 + RPRE) * Q3G_CHUNK_BYTES_F16,
			    (uint32_t)((c1 - c0 - RPRE) * Q3G_CHUNK_BYTES_F16));
	pdl_wait();

	/* the norm of each row, then x = h · rs · (1 + w) in fp32 */
	for (int r = 0; r < R; r++) {
		float ss = 0.0f;

		for (int k = threadIdx.x; k < H; k += blockDim.x)
			ss += L.h[(size_t)r * H + k] * L.h[(size_t)r * H + k];
		ss = warp_sum(ss);
		if (lane == 0)
			nred[r * 32 + warp] = ss;
	}
	__syncthreads();
	if ((int)threadIdx.x < R) {
		float ss = 0.0f;

		for (int i = 0; i < nw; i++)
			ss += nred[threadIdx.x * 32 + i];
		rs[threadIdx.x] = rsqrtf(ss / (float)H + L.eps);
	}
	__syncthreads();
	for (int i = threadIdx.x; i < R * H; i += blockDim.x) {
		int r = i / H, k = i % H;

		xsf[i] = L.h[(size_t)r * H + k] * rs[r] * (1.0f + L.normw[k]);
	}
	__syncthreads();
#pragma unroll
	for (int r = 0; r < MAXR; r++)
		acc[r][0] = acc[r][1] = 0.0f;
	for (int c = c0; c < c1; c++) {
		uint4 w[4];

		if (c - c0 < RPRE) {
#pragma unroll
			for (int u = 0; u < RPRE; u++)
				if (c - c0 == u)
#pragma unroll
					for (int s = 0; s < 4; s++)
						w[s] = pre[u][s];
		} else {
#pragma unroll
			for (int s = 0; s < 4; s++)
				w[s] = ldg_stream(base + (size_t)c * Q3G_CHUNK_BYTES_F16 + s * 512);
		}
#pragma unroll
		for (int s = 0; s < 4; s++) {
			const uint32_t regs[4] = { w[s].x, w[s].y, w[s].z, w[s].w };
#pragma unroll
			for (int q = 0; q < 4; q++) { /* reg q: row g + 8 (q & 1), inputs 2t + 8 (q >> 1) + {0, 1} */
				float2 wf = __half22float2(*reinterpret_cast<const __half2 *>(&regs[q]));
				int k = c * Q3G_KCHUNK + 16 * s + 2 * t + 8 * (q >> 1);

				if (k >= m.K)
					continue;
#pragma unroll
				for (int r = 0; r < MAXR; r++) {
					if (r >= R)
						break;
					float x0 = xsf[r * H + k], x1 = k + 1 < m.K ? xsf[r * H + k + 1] : 0.0f;

					acc[r][q & 1] += wf.x * x0 + wf.y * x1;
				}
			}
		}
	}
	/* the four lanes of a row group, then the warps */
#pragma unroll
	for (int r = 0; r < MAXR; r++)
#pragma unroll
		for (int q = 0; q < 2; q++) {
			acc[r][q] += __shfl_xor_sync(0xffffffffu, acc[r][q], 1);
			acc[r][q] += __shfl_xor_sync(0xffffffffu, acc[r][q], 2);
		}
	__syncthreads(); /* xsf is reused for the partial sums */
	float *part = xsf;

	if (t == 0)
#pragma unroll
		for (int r = 0; r < MAXR; r++) {
			part[(warp * 32 + g) * 2 * MAXR + 2 * r] = acc[r][0];
			part[(warp * 32 + g) * 2 * MAXR + 2 * r + 1] = acc[r][1];
		}
	__syncthreads();
	for (int i = threadIdx.x; i < 16 * R; i += blockDim.x) {
		int r = i / 16, rr = i % 16, row = tile * Q3G_TILE_N + rr;
		float v = 0.0f;

		for (int ww = 0; ww < nw; ww++)
			v += part[(ww * 32 + (rr & 7)) * 2 * MAXR + 2 * r + (rr >> 3)];
		if (row < m.N)
			L.y[j][(size_t)r * L.ldy[j] + row] = v;
	}
	if (!L.done)
		return;
	/* every block's logits are written: the last block to get here picks the experts */
	__threadfence();
	__syncthreads();
	if (threadIdx.x == 0)
		last = atomicAdd(L.done, 1u) == gridDim.x - 1;
	__syncthreads();
	if (!last)
		return;
	__threadfence();
	for (int r = warp; r < R; r += nw)
		topk_row(L.idx, L.w, L.y[0], L.y[1], r, L.E, L.k, L.norm);
	if (threadIdx.x == 0)
		*L.done = 0;
}

/* fp32 y[R][N] = x[R][K]·Wᵀ with cuBLAS (no TF32: CUBLAS_COMPUTE_32F), W expanded into wtmp. */
static int gemm_f32(cublasHandle_t hb, const struct q3g_mat *m, const float *x, int ldx, float *y, int ldy, int R,
		    float *wtmp, cudaStream_t st, q3_err *e)
{
	const float one = 1.0f, zero = 0.0f;
	cublasStatus_t cs;
	int err;

	if ((err = q3g_mat_expand_f32(m, 0, wtmp, st, e)))
		return err;
	cs = cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, m->N, R, m->K, &one, wtmp, CUDA_R_32F, m->K, x, CUDA_R_32F, ldx,
			  &zero, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
	if (cs != CUBLAS_STATUS_SUCCESS)
		return q3_errf(e, -EIO, "router: fp32 cublasGemmEx [%d x %d x %d]: status %d", R, m->N, m->K, (int)cs);
	return 0;
}

static size_t router_smem(int R, int H)
{
	size_t x = (size_t)R * H * 4, part = (size_t)ROUTER_THREADS * 2 * (R == 1 ? 1 : Q3G_MMV_MAX_TOK) * 4;

	return x > part ? x : part;
}

static int router(void *cublas, float *logits, float *sg, int *idx, float *w, unsigned *done, int E, int k, bool norm,
		  const float *h, const float *normw, float eps, const struct q3g_mat *rm, const struct q3g_mat *sgate,
		  int R, int H, float *xf, float *wtmp, cudaStream_t st, q3_err *e)
{
	int err;

	if (rm->fmt != Q3G_F16 || sgate->fmt != Q3G_F16 || rm->K != H || sgate->K != H)
		return q3_errf(e, -EINVAL, "router: expects dense (fp16) router and shared gate over %d inputs", H);
	if (R <= Q3G_MMV_MAX_TOK && router_smem(R, H) <= q3g_dev.smem_dyn) {
		router_launch L;

		memset(&L, 0, sizeof(L));
		L.mat[0] = *rm;
		L.mat[1] = *sgate;
		L.y[0] = logits;
		L.y[1] = sg;
		L.ldy[0] = rm->N;
		L.ldy[1] = sgate->N;
		L.tiles0 = rm->ntiles;
		L.h = h;
		L.normw = normw;
		L.eps = eps;
		L.R = R;
		L.H = H;
		if (done && rm->N == E && sgate->N == 1) {
			L.done = done;
			L.idx = idx;
			L.w = w;
			L.E = E;
			L.k = k;
			L.norm = norm;
		}
		if (R == 1)
			CUDA_CHECK(e, q3g_launch(router_f32_kernel<1>, rm->ntiles + sgate->ntiles, ROUTER_THREADS,
						 router_smem(R, H), st, L));
		else
			CUDA_CHECK(e, q3g_launch(router_f32_kernel<Q3G_MMV_MAX_TOK>, rm->ntiles + sgate->ntiles,
						 ROUTER_THREADS, router_smem(R, H), st, L));
		if (L.done)
			return 0;
	} else {
		if ((err = q3g_rmsnorm_f32(xf, h, normw, R, H, eps, st, e)))
			return err;
		if (q3g_cublas_stream(cublas, st) != CUBLAS_STATUS_SUCCESS)
			return q3_errf(e, -EIO, "router: cublasSetStream failed");
		if ((err = gemm_f32((cublasHandle_t)cublas, rm, xf, H, logits, rm->N, R, wtmp, st, e)) ||
		    (err = gemm_f32((cublasHandle_t)cublas, sgate, xf, H, sg, sgate->N, R, wtmp, st, e)))
			return err;
	}
	return idx ? q3g_router_topk(idx, w, logits, sg, R, E, k, norm, st, e) : 0;
}

extern "C" int q3g_router_logits(void *cublas, float *logits, float *sg, const float *h, const float *normw, float eps,
				 const struct q3g_mat *rm, const struct q3g_mat *sgate, int R, int H, float *xf,
				 float *wtmp, q3g_stream st, q3_err *e)
{
	return router(cublas, logits, sg, NULL, NULL, NULL, 0, 0, false, h, normw, eps, rm, sgate, R, H, xf, wtmp,
		      (cudaStream_t)st, e);
}

extern "C" int q3g_router(void *cublas, float *logits, float *sg, int *idx, float *w, unsigned *done, int E, int k,
			  bool norm, const float *h, const float *normw, float eps, const struct q3g_mat *rm,
			  const struct q3g_mat *sgate, int R, int H, float *xf, float *wtmp, q3g_stream st, q3_err *e)
{
	int err;

	if ((err = check_topk(E, k, e)))
		return err;
	return router(cublas, logits, sg, idx, w, done, E, k, norm, h, normw, eps, rm, sgate, R, H, xf, wtmp,
		      (cudaStream_t)st, e);
}

/* ---- decode experts ------------------------------------------------------------------------- */

struct moe_up_launch {
	struct q3g_mat mat[4]; /* gate, up, shared gate, shared up */
	const uint16_t *x;
	const float *xh, *normw; /* instead of x: the residual stream, normalized while staging */
	float eps;
	const int *idx;
	float *gu;
	int k, H, ldgu, nb; /* nb: blocks per matrix (row tiles / RT) */
	int rt;
	int pass;	    /* 0: the k routed pairs of each row, 1: the shared one, 2: all k + 1 */
};

/* Block (pair, row tiles of gate or up).  An instance handles one weight format: all pairs when
 * the routed and the shared experts share it, else the routed pairs and the shared ones in two
 * launches, so that each instance keeps one format's registers. */
template <int FMT>
__global__ void __launch_bounds__(Q3G_MMV_THREADS, 3) moe_up_kernel(const __grid_constant__ moe_up_launch L)
{
	extern __shared__ uint4 smem[];
	pdl_trigger();
	pdl_wait(); /* the expert ids come from the router: nothing to prefetch before them */
	const int per_row = L.pass == 0 ? L.k : L.pass == 1 ? 1 : L.k + 1, r = blockIdx.x / per_row;
	const int p = r * (L.k + 1) + (L.pass == 1 ? L.k : blockIdx.x % per_row);
	const bool shared = p % (L.k + 1) == L.k;
	const int which = blockIdx.y / L.nb, b = blockIdx.y % L.nb;
	const int ex = L.idx[p];
	if (ex == Q3G_SKIP)
		return; /* computed elsewhere (the CPU's experts, offload): before any barrier */
	const int mi = shared ? 0 : ex;
	const struct q3g_mat &m = L.mat[2 * shared + which];
	const int WPT = (Q3G_MMV_THREADS / 32) / L.rt, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int tile = b * L.rt + warp / WPT, kr = warp % WPT, Kp = m.nchunks * Q3G_KCHUNK;
	uint16_t *xs = (uint16_t *)smem;
	float *red = (float *)(xs + Kp);
	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };

	if (b * L.rt >= m.ntiles)
		return; /* a narrower matrix: whole block idle, before any barrier */
	const uint16_t *perm = m.perm ? m.perm + (size_t)mi * m.perm_stride : NULL;
	const int per = cdiv(m.nchunks, WPT), c0 = kr * per, c1 = min(m.nchunks, c0 + per);

	/* this warp's weights start towards L2 while the block stages the activations */
	if (lane == 0 && tile < m.ntiles && c0 < c1)
		prefetch_l2((const uint8_t *)m.data + (size_t)mi * m.data_stride +
				    ((size_t)tile * m.nchunks + c0) * fmt_traits<FMT>::CB,
			    (uint32_t)((c1 - c0) * fmt_traits<FMT>::CB));
	/* and the tile's scales (zero points), which run_chunks reads group by group */
	if (FMT != Q3G_F16 && lane == 1 && kr == 0 && tile < m.ntiles) {
		size_t off = (size_t)mi * m.sz_stride + (size_t)tile * m.ngroups * Q3G_TILE_N;

		prefetch_l2(m.scales + off, (uint32_t)(m.ngroups * Q3G_TILE_N * 4));
		if (m.zeros)
			prefetch_l2(m.zeros + off, (uint32_t)(m.ngroups * Q3G_TILE_N * 4));
	}
	if (L.xh) {
		__shared__ float rs[1], nred[32];

		stage_x_norm(xs, rs, nred, L.xh + (size_t)r * L.H, L.H, 1, m.K, Kp, perm, L.normw, L.eps);
	} else {
		stage_x_f16(xs, L.x + (size_t)r * L.H, L.H, 1, m.K, Kp, perm);
	}
	__syncthreads();
	if (tile < m.ntiles) {
		run_chunks<FMT, 1>(m, (const uint8_t *)m.data + (size_t)mi * m.data_stride, (size_t)mi * m.sz_stride, tile,
				   c0, c1, (const uint2 *)xs, 1, 0, 1.0f, acc);
	}
	reduce_tile_warps<1>(red, acc, WPT);
	/* token column 0 lives in lanes t = 0, elements 0 (row g) and 2 (row g + 8) */
	if (kr != 0 || tile >= m.ntiles || (lane & 3))
		return;
	int row = tile * Q3G_TILE_N + (lane >> 2);
	float *o = L.gu + (size_t)p * L.ldgu + (size_t)which * (L.ldgu / 2);

	if (row < m.N)
		o[row] = acc[0][0];
	if (row + 8 < m.N)
		o[row + 8] = acc[0][2];
}

struct moe_down_launch {
	struct q3g_mat mat[2]; /* the routed experts' down stack, the shared expert's down */
	const float *gu;
	const int *idx;
	const float *w;
	float *h;
	int k, H, ldgu, rt;
};

/* One (slot, chunk) item: four k-steps of the slot's matrix against its staged activations at
 * k-step kbase, the partial sums of each scale group scaled by the group's scale times wt (the
 * slot's routing weight) into acc. */
template <int FMT>
static __device__ __forceinline__ void down_item(const struct q3g_mat &m, int mi, int tile, int c, const uint4 *w,
						 const uint2 *xs, int kbase, float wt, float acc[1][4], float s0,
						 float s1)
{
	const int lane = threadIdx.x & 31;
	const size_t szb = (size_t)mi * m.sz_stride;
	float accg[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };
	zconst zc = FMT == Q3G_F16 ? zconst{ 0, 0 } : sym_zconst<FMT>();

	/* the first group's scales came with the weights (s0, s1); zero points (asym) here */
	if (FMT != Q3G_F16 && m.zeros) {
		size_t i = szb + ((size_t)tile * m.ngroups + (c * 4) / m.gsteps) * Q3G_TILE_N + (lane >> 2);

		zc = make_zconst<FMT>(m.zeros[i], m.zeros[i + 8]);
	}
#pragma unroll
	for (int st = 0; st < 4; st++) {
		uint32_t a[4], b[2];

		if (FMT != Q3G_F16 && st > 0 && (c * 4 + st) % m.gsteps == 0) {
			flush_group<1>(acc, accg, s0 * wt, s1 * wt, true);
			group_consts<FMT>(m, szb, tile, (c * 4 + st) / m.gsteps, lane, s0, s1, zc);
		}
		a_frag<FMT>(w, st, zc, a);
		b_frag(xs, kbase + st, 0, 1, lane, b);
		mma_f16(accg[0], a, b);
	}
	flush_group<1>(acc, accg, s0 * wt, s1 * wt, false);
}

/* A warp's items [i0, i1) of the flattened (slot, chunk) list of one row tile: slot s < k owns
 * items [s·ncr, (s+1)·ncr) of the routed stack (expert ix[s]), slot k the shared expert's after
 * them; the staged activations follow the same order, so item i starts at k-step 4i.  The
 * weights of up to UB items are loaded before the first is used (one round trip for a whole
 * row's experts at int4, instead of one per slot). */
template <int FR, int FS>
static __device__ __forceinline__ void down_items(const moe_down_launch &L, const int *ix, const float *wr, int tile,
						  int i0, int i1, int ncr, const uint2 *xs, float acc[1][4])
{
	/* UB items in flight with their scales, within 64 registers (32 warps a block): 4 at int4
	 * (3 are a warp's share of a row at the real shapes), 4 / loads per item otherwise */
	constexpr int LR = fmt_traits<FR>::LPC, LS = fmt_traits<FS>::LPC, LM = LR > LS ? LR : LS;
	constexpr int UB = 4 / LM > 0 ? 4 / LM : 1;
	const int lane = threadIdx.x & 31, k = L.k;

	for (int b0 = i0; b0 < i1; b0 += UB) {
		uint4 w[UB][LM];
		float s0[UB], s1[UB];

		/* the weights of UB items and their first groups' scales, all in flight at once (a
		 * scale loaded when its item starts would cost a round trip per item) */
#pragma unroll
		for (int u = 0; u < UB; u++) {
			int i = b0 + u;

			s0[u] = s1[u] = 1.0f;
			if (i < i1 && ix[i >= k * ncr ? k : i / ncr] != Q3G_SKIP) {
				bool sh = i >= k * ncr;
				int c = sh ? i - k * ncr : i % ncr, mi = sh ? 0 : ix[i / ncr];
				const struct q3g_mat &m = L.mat[sh];
				const uint8_t *p = (const uint8_t *)m.data + (size_t)mi * m.data_stride +
						   ((size_t)tile * m.nchunks + c) * (sh ? fmt_traits<FS>::CB : fmt_traits<FR>::CB) +
						   lane * 16;
#pragma unroll
				for (int q = 0; q < LM; q++)
					if (q < (sh ? LS : LR))
						w[u][q] = ldg_stream(p + q * 512);
				if ((sh ? FS : FR) != Q3G_F16) {
					size_t si = (size_t)mi * m.sz_stride +
						    ((size_t)tile * m.ngroups + (c * 4) / m.gsteps) * Q3G_TILE_N + (lane >> 2);

					s0[u] = m.scales[si];
					s1[u] = m.scales[si + 8];
				}
			}
		}
#pragma unroll
		for (int u = 0; u < UB; u++) {
			int i = b0 + u;

			if (i >= i1)
				break;
			if (ix[i >= k * ncr ? k : i / ncr] == Q3G_SKIP)
				continue; /* the CPU's expert (offload) */
			if (i >= k * ncr)
				down_item<FS>(L.mat[1], 0, tile, i - k * ncr, w[u], xs, 4 * i, wr[k], acc, s0[u], s1[u]);
			else
				down_item<FR>(L.mat[0], ix[i / ncr], tile, i % ncr, w[u], xs, 4 * i, wr[i / ncr], acc, s0[u],
					      s1[u]);
		}
	}
}

/* FR: the routed experts' format, FS: the shared expert's.  32 warps a block, for every R (a
 * row's sums must not depend on its batch): with 8, the 128 blocks of one row left the device
 * latency-bound (a warp issued every 12 cycles, 12% occupancy). */
#define DOWN_THREADS 1024
template <int FR, int FS>
__global__ void __launch_bounds__(DOWN_THREADS) moe_down_kernel(const __grid_constant__ moe_down_launch L)
{
	extern __shared__ uint4 smem[];
	pdl_trigger();
	pdl_wait();
	const int r = blockIdx.x, S = L.k + 1;
	const int WPT = (DOWN_THREADS / 32) / L.rt, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int tile = blockIdx.y * L.rt + warp / WPT, kr = warp % WPT;
	const int *ix = L.idx + (size_t)r * S;
	uint16_t *xs = (uint16_t *)smem;
	const struct q3g_mat &mr = L.mat[0], &ms = L.mat[1];
	const int hr = mr.nchunks * Q3G_KCHUNK / 2, hs = ms.nchunks * Q3G_KCHUNK / 2; /* input pairs per slot */
	const int ksoff = (L.k * mr.nchunks + ms.nchunks) * (Q3G_KCHUNK / Q3G_KSTEP), total = L.k * mr.nchunks + ms.nchunks;
	__shared__ int sx[Q3G_ROUTER_MAX_K + 1];

	/* the slots' experts once; their weights of this block's tile start towards L2 while the
	 * activations are staged (a slot is one contiguous run of the tile's chunks) */
	if ((int)threadIdx.x < S) {
		int s = threadIdx.x, ex = ix[s];
		const struct q3g_mat &m = L.mat[s == L.k];
		const int cb = m.fmt == Q3G_Q4 ? Q3G_CHUNK_BYTES_Q4 : m.fmt == Q3G_Q8 ? Q3G_CHUNK_BYTES_Q8 : Q3G_CHUNK_BYTES_F16;

		sx[s] = ex;
		for (int t = blockIdx.y * L.rt; ex != Q3G_SKIP && t < min(m.ntiles, (int)(blockIdx.y + 1) * L.rt); t++)
			prefetch_l2((const uint8_t *)m.data + (size_t)(ex < 0 ? 0 : ex) * m.data_stride +
					    (size_t)t * m.nchunks * cb, (uint32_t)(m.nchunks * cb));
	}
	__syncthreads();
	/* stage silu(gate) ⊙ up of every slot at once (slot s < k at k-step s·Kp/16, the shared one
	 * after them).  Slots keep their places (down_items indexes items by slot); a slot whose
	 * expert the CPU computes (Q3G_SKIP, offload) is staged as zeros and its items are skipped. */
#pragma unroll 4
	for (int i = threadIdx.x; i < L.k * hr + hs; i += blockDim.x) {
		const bool sh = i >= L.k * hr;
		const int s = sh ? L.k : i / hr, kin = 2 * (sh ? i - L.k * hr : i % hr), ex = sx[s];
		const bool skip = ex == Q3G_SKIP;
		const struct q3g_mat &m = sh ? ms : mr;
		const uint16_t *perm = m.perm && !skip ? m.perm + (size_t)(ex < 0 ? 0 : ex) * m.perm_stride : NULL;
		const float *g = L.gu + ((size_t)r * S + s) * L.ldgu, *u = g + L.ldgu / 2;
		uint16_t *xo = xs + (size_t)s * mr.nchunks * Q3G_KCHUNK;
		float v[2];

		for (int q = 0; q < 2; q++) {
			int kk = perm ? perm[kin + q] : kin + q;

			v[q] = !skip && kk < m.K ? dev_silu(g[kk]) * u[kk] : 0.0f;
		}
		*(uint32_t *)(xo + xs_slot(kin, 0, 1)) = pack_h2(v[0], v[1]);
	}
	float *red = (float *)(xs + (size_t)ksoff * Q3G_KSTEP);
	__syncthreads();

	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };
	if (tile < L.mat[0].ntiles) {
		/* this warp's share of the (slot, chunk) items of its tile */
		int per = cdiv(total, WPT), i0 = kr * per, i1 = min(total, i0 + per);

		down_items<FR, FS>(L, sx, L.w + (size_t)r * S, tile, i0, i1, L.mat[0].nchunks, (const uint2 *)xs, acc);
	}
	reduce_tile_warps<1>(red, acc, WPT);
	if (kr != 0 || tile >= L.mat[0].ntiles || (lane & 3))
		return;
	int row = tile * Q3G_TILE_N + (lane >> 2);
	float *h = L.h + (size_t)r * L.H;

	if (row < L.H)
		h[row] += acc[0][0];
	if (row + 8 < L.H)
		h[row + 8] += acc[0][2];
}

typedef void (*moe_down_fn)(const moe_down_launch);

static moe_down_fn down_kernel_for(int fr, int fs)
{
	static const moe_down_fn t[3][3] = {
		{ moe_down_kernel<Q3G_Q4, Q3G_Q4>, moe_down_kernel<Q3G_Q4, Q3G_Q8>, moe_down_kernel<Q3G_Q4, Q3G_F16> },
		{ moe_down_kernel<Q3G_Q8, Q3G_Q4>, moe_down_kernel<Q3G_Q8, Q3G_Q8>, moe_down_kernel<Q3G_Q8, Q3G_F16> },
		{ moe_down_kernel<Q3G_F16, Q3G_Q4>, moe_down_kernel<Q3G_F16, Q3G_Q8>, moe_down_kernel<Q3G_F16, Q3G_F16> },
	};

	return t[fr][fs];
}

static size_t up_smem(const struct q3g_mat *m, int rt)
{
	return (((size_t)m->nchunks * Q3G_KCHUNK * 2 + 15) & ~(size_t)15) + (rt < 8 ? Q3G_MMV_THREADS * 16 : 0);
}

static int moe_up(float *gu, const uint16_t *x, const float *xh, const float *normw, float eps, const int *idx,
		  const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *sgate,
		  const struct q3g_mat *sup, int R, int k, int H, int ldgu, q3g_stream st, q3_err *e)
{
	moe_up_launch L;
	int tiles = Q3_MAX(gate->ntiles, sgate->ntiles);
	size_t smem;

	if (up->ntiles != gate->ntiles || sup->ntiles != sgate->ntiles || 2 * Q3_MAX(gate->N, sgate->N) > ldgu)
		return q3_errf(e, -EINVAL, "moe up: gate and up shapes differ, or gu rows too short");
	memset(&L, 0, sizeof(L));
	L.mat[0] = *gate;
	L.mat[1] = *up;
	L.mat[2] = *sgate;
	L.mat[3] = *sup;
	L.x = x;
	L.xh = xh;
	L.normw = normw;
	L.eps = eps;
	L.idx = idx;
	L.gu = gu;
	L.k = k;
	L.H = H;
	L.ldgu = ldgu;
	/* two row tiles a block (one staging for both); never chosen by R, so that a row's sums do
	 * not depend on its batch */
	L.rt = tiles > 1 ? 2 : 1;
	L.nb = cdiv(tiles, L.rt);
	smem = Q3_MAX(up_smem(gate, L.rt), up_smem(sgate, L.rt));
	if (smem > q3g_dev.smem_dyn)
		return q3_errf(e, -EINVAL, "moe up: %zu bytes of shared memory exceed the device's %zu", smem,
			       q3g_dev.smem_dyn);
	if (gate->fmt != up->fmt || sgate->fmt != sup->fmt)
		return q3_errf(e, -EINVAL, "moe up: gate and up in different formats");
	/* one launch when the routed and shared experts share a format, else one per format */
	bool same = gate->fmt == sgate->fmt;

	for (int pass = same ? 2 : 0; pass < (same ? 3 : 2); pass++) {
		dim3 grid(pass == 0 ? R * k : pass == 1 ? R : R * (k + 1), 2 * L.nb);
		int f = pass == 1 ? sgate->fmt : gate->fmt;

		L.pass = pass;
		CUDA_CHECK(e, q3g_launch(f == Q3G_Q4 ? moe_up_kernel<Q3G_Q4> : f == Q3G_Q8 ? moe_up_kernel<Q3G_Q8>
										 : moe_up_kernel<Q3G_F16>,
					 grid, Q3G_MMV_THREADS, smem, (cudaStream_t)st, L));
	}
	return 0;
}

extern "C" int q3g_moe_up(float *gu, const uint16_t *x, const int *idx, const struct q3g_mat *gate,
			  const struct q3g_mat *up, const struct q3g_mat *sgate, const struct q3g_mat *sup, int R,
			  int k, int H, int ldgu, q3g_stream st, q3_err *e)
{
	return moe_up(gu, x, NULL, NULL, 0.0f, idx, gate, up, sgate, sup, R, k, H, ldgu, st, e);
}

extern "C" int q3g_moe_up_norm(float *gu, const float *h, const float *normw, float eps, const int *idx,
			       const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *sgate,
			       const struct q3g_mat *sup, int R, int k, int H, int ldgu, q3g_stream st, q3_err *e)
{
	return moe_up(gu, NULL, h, normw, eps, idx, gate, up, sgate, sup, R, k, H, ldgu, st, e);
}

extern "C" int q3g_moe_down(float *h, const float *gu, const int *idx, const float *w,
			    const struct q3g_mat *down, const struct q3g_mat *sdown, int R, int k, int H, int ldgu,
			    q3g_stream st, q3_err *e)
{
	moe_down_launch L;
	size_t kp = (size_t)k * down->nchunks * Q3G_KCHUNK + (size_t)sdown->nchunks * Q3G_KCHUNK;
	size_t smem = ((kp * 2 + 15) & ~(size_t)15) + (size_t)DOWN_THREADS * 16;

	if (k < 1 || k > Q3G_ROUTER_MAX_K)
		return q3_errf(e, -EINVAL, "moe down: %d experts per token (up to %d)", k, Q3G_ROUTER_MAX_K);
	if (down->N != H || sdown->N != H || down->ntiles != sdown->ntiles)
		return q3_errf(e, -EINVAL, "moe down: output rows %d / %d, hidden %d", down->N, sdown->N, H);
	if (smem > q3g_dev.smem_dyn)
		return q3_errf(e, -EINVAL, "moe down: %zu bytes of shared memory exceed the device's %zu", smem,
			       q3g_dev.smem_dyn);
	memset(&L, 0, sizeof(L));
	L.mat[0] = *down;
	L.mat[1] = *sdown;
	L.gu = gu;
	L.idx = idx;
	L.w = w;
	L.h = h;
	L.k = k;
	L.H = H;
	L.ldgu = ldgu;
	L.rt = 1;
	moe_down_fn fn = down_kernel_for(down->fmt, sdown->fmt);
	CUDA_CHECK(e, q3g_launch(fn, dim3(R, down->ntiles), DOWN_THREADS, smem, (cudaStream_t)st, L));
	return 0;
}

int q3g_moe_init(q3_err *e)
{
	int err;

	if ((err = q3g_allow_dyn_smem(router_f32_kernel<1>, "router_f32_kernel<1>", e)) ||
	    (err = q3g_allow_dyn_smem(router_f32_kernel<Q3G_MMV_MAX_TOK>, "router_f32_kernel<16>", e)) ||
	    (err = q3g_allow_dyn_smem(moe_up_kernel<Q3G_Q4>, "moe_up_kernel<Q4>", e)) ||
	    (err = q3g_allow_dyn_smem(moe_up_kernel<Q3G_Q8>, "moe_up_kernel<Q8>", e)) ||
	    (err = q3g_allow_dyn_smem(moe_up_kernel<Q3G_F16>, "moe_up_kernel<F16>", e)))
		return err;
	for (int fr = 0; fr < 3; fr++)
		for (int fs = 0; fs < 3; fs++)
			if ((err = q3g_allow_dyn_smem(down_kernel_for(fr, fs), "moe_down_kernel", e)))
				return err;
	return 0;
}
