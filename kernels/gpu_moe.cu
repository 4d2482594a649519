/* gpu_moe.cu - the sparse MoE block of decode: router top-k, then the routed and shared experts
 * of every (row, slot) pair without a host round trip (the expert ids stay on the device).
 *
 *   q3g_router_topk  one warp per row: softmax over E logits (fp32), k rounds of warp argmax
 *                    (ties: the lower index), renormalization; slot k = the shared expert.
 *   q3g_moe_up       block (pair, row tiles of gate or up): the pair's expert's gate and up
 *                    projections of the row, fp32 [P][2][Imax].
 *   q3g_moe_down     block (row, output row tiles): loops over the row's k + 1 slots, stages
 *                    silu(gate) ⊙ up of each (bf16, through the down matrix's act-order
 *                    permutation), runs the down projections scaled by the routing weights (the
 *                    shared expert's is sigmoid of its gate) and adds the sum to the residual
 *                    stream.  One block owns each output element: deterministic, no atomics.
 */
#include "gpu_internal.h"
#include "mma_frag.cuh"

/* ---- router ----------------------------------------------------------------------------------- */

__global__ void router_topk_kernel(int *idx, float *w, const float *logits, const float *sg, int R, int E,
				   int k, bool norm)
{
	constexpr int PER = Q3G_ROUTER_MAX_E / 32;
	int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;

	if (r >= R)
		return;
	const float *l = logits + (size_t)r * E;
	float v[PER], mx = -INFINITY, sum = 0.0f, wsum = 0.0f;
	float myw = 0.0f;
	int myi = 0;

#pragma unroll
	for (int i = 0; i < PER; i++) {
		int e = lane + 32 * i;

		v[i] = e < E ? l[e] : -INFINITY;
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
		int bi = 0x7fffffff;

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
		idx[(size_t)r * (k + 1) + lane] = myi;
		w[(size_t)r * (k + 1) + lane] = norm ? myw / wsum : myw;
	}
	if (lane == 0) {
		idx[(size_t)r * (k + 1) + k] = -1;
		w[(size_t)r * (k + 1) + k] = sg ? dev_sigmoid(sg[r]) : 0.0f;
	}
}

extern "C" int q3g_router_topk(int *idx, float *w, const float *logits, const float *sg, int R, int E,
			       int k, bool norm, q3g_stream st, q3_err *e)
{
	if (E > Q3G_ROUTER_MAX_E || k > Q3G_ROUTER_MAX_K || k > E || k < 1)
		return q3_errf(e, -EINVAL, "router: %d experts top %d (the kernel takes up to %d, top %d)", E, k,
			       Q3G_ROUTER_MAX_E, Q3G_ROUTER_MAX_K);
	router_topk_kernel<<<cdiv(R, 4), 128, 0, (cudaStream_t)st>>>(idx, w, logits, sg, R, E, k, norm);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

/* ---- decode experts ------------------------------------------------------------------------- */

struct moe_up_launch {
	struct q3g_mat gate, up, sgate, sup;
	const uint16_t *x;
	const int *idx;
	float *gu;
	int k, H, ldgu, nb; /* nb: blocks per matrix (row tiles / RT) */
	int rt;
};

/* The matrix of slot expert ex (-1: shared) and which (0 gate, 1 up). */
static __device__ __forceinline__ const struct q3g_mat &pick(const moe_up_launch &L, int ex, int which)
{
	return ex < 0 ? (which ? L.sup : L.sgate) : (which ? L.up : L.gate);
}

__global__ void __launch_bounds__(Q3G_MMV_THREADS) moe_up_kernel(const __grid_constant__ moe_up_launch L)
{
	extern __shared__ uint4 smem[];
	const int p = blockIdx.x, r = p / (L.k + 1);
	const int which = blockIdx.y / L.nb, b = blockIdx.y % L.nb;
	const int ex = L.idx[p];
	if (ex == Q3G_SKIP)
		return; /* computed elsewhere; before any barrier */
	const struct q3g_mat &m = pick(L, ex, which);
	const int mi = ex < 0 ? 0 : ex;
	const int WPT = (Q3G_MMV_THREADS / 32) / L.rt, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int tile = b * L.rt + warp / WPT, kr = warp % WPT, Kp = m.nchunks * Q3G_KCHUNK;
	uint16_t *xs = (uint16_t *)smem;
	float *red = (float *)(xs + Kp);
	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };

	if (b * L.rt >= m.ntiles)
		return; /* the shared expert may be narrower: whole block idle, before any barrier */
	stage_x_bf16(xs, L.x + (size_t)r * L.H, L.H, 1, m.K, Kp, m.perm ? m.perm + (size_t)mi * m.perm_stride : NULL);
	__syncthreads();
	if (tile < m.ntiles) {
		int per = cdiv(m.nchunks, WPT), c0 = kr * per, c1 = min(m.nchunks, c0 + per);
		const uint8_t *wb = (const uint8_t *)m.data + (size_t)mi * m.data_stride;
		size_t szb = (size_t)mi * m.sz_stride;

		if (m.fmt == Q3G_Q4)
			run_chunks<Q3G_Q4, 1>(m, wb, szb, tile, c0, c1, (const uint2 *)xs, 1, 0, 1.0f, acc);
		else if (m.fmt == Q3G_Q8)
			run_chunks<Q3G_Q8, 1>(m, wb, szb, tile, c0, c1, (const uint2 *)xs, 1, 0, 1.0f, acc);
		else
			run_chunks<Q3G_BF16, 1>(m, wb, szb, tile, c0, c1, (const uint2 *)xs, 1, 0, 1.0f, acc);
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
	struct q3g_mat down, sdown;
	const float *gu;
	const int *idx;
	const float *w;
	float *h;
	int k, H, ldgu, rt;
};

static __device__ __forceinline__ const struct q3g_mat &pick_down(const moe_down_launch &L, int ex)
{
	return ex < 0 ? L.sdown : L.down;
}

template <int FMT>
static __device__ __forceinline__ void down_slot(const struct q3g_mat &m, int mi, int tile, int c0, int c1,
						 const uint2 *xs, int ksoff, float wt, float acc[1][4])
{
	run_chunks<FMT, 1>(m, (const uint8_t *)m.data + (size_t)mi * m.data_stride, (size_t)mi * m.sz_stride, tile,
			   c0, c1, xs, 1, ksoff, wt, acc);
}

__global__ void __launch_bounds__(Q3G_MMV_THREADS) moe_down_kernel(const __grid_constant__ moe_down_launch L)
{
	extern __shared__ uint4 smem[];
	const int r = blockIdx.x, S = L.k + 1;
	const int WPT = (Q3G_MMV_THREADS / 32) / L.rt, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int tile = blockIdx.y * L.rt + warp / WPT, kr = warp % WPT;
	const int *ix = L.idx + (size_t)r * S;
	uint16_t *xs = (uint16_t *)smem;
	int ksoff = 0, total = 0;

	/* stage silu(gate) ⊙ up of every slot, one after the other (k-step offsets add up) */
	for (int s = 0; s < S; s++) {
		int ex = ix[s], mi = ex < 0 ? 0 : ex;
		if (ex == Q3G_SKIP)
			continue;
		const struct q3g_mat &m = pick_down(L, ex);
		const uint16_t *perm = m.perm ? m.perm + (size_t)mi * m.perm_stride : NULL;
		const float *g = L.gu + ((size_t)r * S + s) * L.ldgu, *u = g + L.ldgu / 2;
		int Kp = m.nchunks * Q3G_KCHUNK;
		uint16_t *xo = xs + (size_t)ksoff * Q3G_KSTEP;

		for (int i = threadIdx.x; i < Kp / 2; i += blockDim.x) {
			int kin = 2 * i;
			float v[2];

			for (int q = 0; q < 2; q++) {
				int kk = perm ? perm[kin + q] : kin + q;

				v[q] = kk < m.K ? dev_silu(g[kk]) * u[kk] : 0.0f;
			}
			*(uint32_t *)(xo + xs_slot(kin, 0, 1)) = pack_bf2(v[0], v[1]);
		}
		ksoff += Kp / Q3G_KSTEP;
		total += m.nchunks;
	}
	float *red = (float *)(xs + (size_t)ksoff * Q3G_KSTEP);
	__syncthreads();

	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };
	if (tile < L.down.ntiles) {
		/* this warp's share of the (slot, chunk) items of its tile */
		int per = cdiv(total, WPT), i0 = kr * per, i1 = min(total, i0 + per), base = 0;

		ksoff = 0;
		for (int s = 0; s < S && base < i1; s++) {
			int ex = ix[s], mi = ex < 0 ? 0 : ex;
			if (ex == Q3G_SKIP)
				continue;
			const struct q3g_mat &m = pick_down(L, ex);
			int c0 = max(i0 - base, 0), c1 = min(i1 - base, m.nchunks);
			float wt = L.w[(size_t)r * S + s];

			if (c0 < c1) {
				if (m.fmt == Q3G_Q4)
					down_slot<Q3G_Q4>(m, mi, tile, c0, c1, (const uint2 *)xs, ksoff, wt, acc);
				else if (m.fmt == Q3G_Q8)
					down_slot<Q3G_Q8>(m, mi, tile, c0, c1, (const uint2 *)xs, ksoff, wt, acc);
				else
					down_slot<Q3G_BF16>(m, mi, tile, c0, c1, (const uint2 *)xs, ksoff, wt, acc);
			}
			base += m.nchunks;
			ksoff += m.nchunks * (Q3G_KCHUNK / Q3G_KSTEP);
		}
	}
	reduce_tile_warps<1>(red, acc, WPT);
	if (kr != 0 || tile >= L.down.ntiles || (lane & 3))
		return;
	int row = tile * Q3G_TILE_N + (lane >> 2);
	float *h = L.h + (size_t)r * L.H;

	if (row < L.H)
		h[row] += acc[0][0];
	if (row + 8 < L.H)
		h[row + 8] += acc[0][2];
}

static size_t up_smem(const struct q3g_mat *m, int rt)
{
	return (((size_t)m->nchunks * Q3G_KCHUNK * 2 + 15) & ~(size_t)15) + (rt < 8 ? Q3G_MMV_THREADS * 16 : 0);
}

extern "C" int q3g_moe_up(float *gu, const uint16_t *x, const int *idx, const struct q3g_mat *gate,
			  const struct q3g_mat *up, const struct q3g_mat *sgate, const struct q3g_mat *sup, int R,
			  int k, int H, int ldgu, q3g_stream st, q3_err *e)
{
	moe_up_launch L;
	int tiles = Q3_MAX(gate->ntiles, sgate->ntiles);
	size_t smem = Q3_MAX(up_smem(gate, 1), up_smem(sgate, 1));

	if (up->ntiles != gate->ntiles || sup->ntiles != sgate->ntiles || 2 * Q3_MAX(gate->N, sgate->N) > ldgu)
		return q3_errf(e, -EINVAL, "moe up: gate and up shapes differ, or gu rows too short");
	memset(&L, 0, sizeof(L));
	L.gate = *gate;
	L.up = *up;
	L.sgate = *sgate;
	L.sup = *sup;
	L.x = x;
	L.idx = idx;
	L.gu = gu;
	L.k = k;
	L.H = H;
	L.ldgu = ldgu;
	L.rt = 1;
	L.nb = tiles;
	if (smem > q3g_dev.smem_optin)
		return q3_errf(e, -EINVAL, "moe up: %zu bytes of shared memory exceed the device's %zu", smem,
			       q3g_dev.smem_optin);
	moe_up_kernel<<<dim3(R * (k + 1), 2 * L.nb), Q3G_MMV_THREADS, smem, (cudaStream_t)st>>>(L);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

extern "C" int q3g_moe_down(float *h, const float *gu, const int *idx, const float *w,
			    const struct q3g_mat *down, const struct q3g_mat *sdown, int R, int k, int H, int ldgu,
			    q3g_stream st, q3_err *e)
{
	moe_down_launch L;
	size_t kp = (size_t)k * down->nchunks * Q3G_KCHUNK + (size_t)sdown->nchunks * Q3G_KCHUNK;
	size_t smem = ((kp * 2 + 15) & ~(size_t)15) + Q3G_MMV_THREADS * 16;

	if (down->N != H || sdown->N != H || down->ntiles != sdown->ntiles)
		return q3_errf(e, -EINVAL, "moe down: output rows %d / %d, hidden %d", down->N, sdown->N, H);
	if (smem > q3g_dev.smem_optin)
		return q3_errf(e, -EINVAL, "moe down: %zu bytes of shared memory exceed the device's %zu", smem,
			       q3g_dev.smem_optin);
	memset(&L, 0, sizeof(L));
	L.down = *down;
	L.sdown = *sdown;
	L.gu = gu;
	L.idx = idx;
	L.w = w;
	L.h = h;
	L.k = k;
	L.H = H;
	L.ldgu = ldgu;
	L.rt = 1;
	moe_down_kernel<<<dim3(R, down->ntiles), Q3G_MMV_THREADS, smem, (cudaStream_t)st>>>(L);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

int q3g_moe_init(q3_err *e)
{
	CUDA_CHECK(e, cudaFuncSetAttribute(moe_up_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
					   (int)q3g_dev.smem_optin));
	CUDA_CHECK(e, cudaFuncSetAttribute(moe_down_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
					   (int)q3g_dev.smem_optin));
	return 0;
}
