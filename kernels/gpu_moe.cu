/* gpu_moe.cu - the sparse MoE block of decode: router top-k, then the routed and shared experts
 * of every (row, slot) pair without a host round trip (the expert ids stay on the device).
 *
 *   q3g_router       the router and shared gate in fp32 from the residual stream (norm fused;
 *                    on sm_90 a tile's inputs split over a cluster of blocks), optionally the
 *                    normalized rows in fp16 for the experts; then q3g_router_topk.
 *   q3g_router_topk  one warp per row: softmax over E logits (fp32), the top k ranked among the
 *                    few candidates at or above a bound (ties: the lower index; rounds of warp
 *                    argmax where they are too many), renormalization; slot k = the shared expert.
 *   q3g_moe_up       block (pairs of one row, two row tiles of gate and of up): each pair's
 *                    expert's silu(gate) ⊙ up of the row in fp16 [P][lda]; the row staged once.  The
 *                    shared expert's blocks take up to 16 rows at once (the mma's columns).
 *   q3g_moe_down     gpu_moe_down.cu (sm_90: expert tiles bulk-copied into a shared-memory
 *                    ring), gpu_moe_down_regs.cu (before sm_90: through registers).
 */
#include <cublas_v2.h>

#include "gpu_internal.h"
#include "mma_frag.cuh"

/* ---- router ----------------------------------------------------------------------------------- */

/* Lane l's values of a row: i = 0 .. PER-1 in ascending expert ids.  Rows of a multiple of
 * four logits (16-byte aligned) are read four at a time: expert 128 (i / 4) + 4 l + i % 4;
 * otherwise expert l + 32 i. */
static __device__ __forceinline__ int topk_id(int i, int lane, bool vec)
{
	return vec ? 128 * (i >> 2) + 4 * lane + (i & 3) : lane + 32 * i;
}

/* The best (largest v, then the lowest id) of a lane's values by a tree (taken or absent: -1,
 * never best; the higher half wins only when larger). */
template <int PER>
static __device__ __forceinline__ void lane_best(const float v[PER], bool vec, float &best, int &bi)
{
	float bv[PER];
	int bx[PER];

#pragma unroll
	for (int i = 0; i < PER; i++) {
		bv[i] = v[i];
		bx[i] = i;
	}
#pragma unroll
	for (int w = 1; w < PER; w <<= 1)
#pragma unroll
		for (int i = 0; i + w < PER; i += 2 * w)
			if (bv[i + w] > bv[i]) {
				bv[i] = bv[i + w];
				bx[i] = bx[i + w];
			}
	best = bv[0];
	bi = topk_id(bx[0], threadIdx.x & 31, vec);
}

/* A probability's key: p >= 0 orders as its bits, + 1 keeps 0 for taken, absent or NaN. */
static __device__ __forceinline__ unsigned topk_key(float p)
{
	return p >= 0.0f ? __float_as_uint(p) + 1u : 0u;
}

/* (key, id) a before b in the order of the top k: larger probability, then the lower id. */
static __device__ __forceinline__ bool topk_before(unsigned ka, int ia, unsigned kb, int ib)
{
	return ka > kb || (ka == kb && ia < ib);
}

/* Row r's top k by one warp (every lane calls it; cand: the warp's 32 uint2 of shared memory).
 * The logits (the previous kernel's) are read through L2 (__ldcg), every load issued before the
 * first is used; probabilities compare by topk_key.
 *
 * The k-th best of the 32 lanes' own bests bounds the answer: the k lanes at or above it hold k
 * distinct experts, so the top k are all at or above it too.  The experts at or above it (the
 * candidates, usually k to 2k) are gathered into cand and each ranked against the others at
 * once.  Where they are fewer than k (NaN) or more than 32 (ties), rounds pick the largest one
 * at a time (two redux instructions a round: the largest key, then the lowest id holding it; the
 * winning lane looks for its next best).  Ten such rounds took the router ~6 us at batch 1. */
static __device__ void topk_row(int *idx, float *w, const float *logits, const float *sg, int r, int E, int k,
				bool norm, uint2 *cand)
{
	constexpr int PER = Q3G_ROUTER_MAX_E / 32;
	const int lane = threadIdx.x & 31;
	const float *l = logits + (size_t)r * E;
	const bool vec = (E & 3) == 0 && ((uintptr_t)logits & 15) == 0;
	const float sgr = sg ? __ldcg(sg + r) : 0.0f; /* with the logits, not after the choice */
	float v[PER], mx = -INFINITY, sum = 0.0f, best, myw = 0.0f;
	int bi, myi = 0;

	if (vec) { /* out of range: a load of the row's start, dropped */
#pragma unroll
		for (int u = 0; u < PER / 4; u++) {
			const int e = topk_id(4 * u, lane, true);
			const float4 x = __ldcg((const float4 *)(l + (e < E ? e : 0)));

			v[4 * u] = x.x, v[4 * u + 1] = x.y, v[4 * u + 2] = x.z, v[4 * u + 3] = x.w;
		}
	} else {
#pragma unroll
		for (int i = 0; i < PER; i++) {
			const int e = topk_id(i, lane, false);

			v[i] = __ldcg(l + (e < E ? e : 0));
		}
	}
#pragma unroll
	for (int i = 0; i < PER; i++) {
		if (topk_id(i, lane, vec) >= E || isnan(v[i]))
			v[i] = -INFINITY; /* a NaN logit must still leave k valid expert ids */
		mx = fmaxf(mx, v[i]);
	}
	mx = warp_max(mx);
	/* probabilities >= 0 (unnormalized); absent: -1.  All logits -inf: every p is NaN, which
	 * nothing picks, and the rounds fall back to expert 0 with weight 0. */
#pragma unroll
	for (int i = 0; i < PER; i++) {
		v[i] = topk_id(i, lane, vec) < E ? __expf(v[i] - mx) : -1.0f;
		sum += v[i] > 0.0f ? v[i] : 0.0f;
	}
	lane_best<PER>(v, vec, best, bi);
	sum = warp_sum(sum);

	/* the bound: the lane best ranked k - 1 among the lanes' bests */
	const unsigned bkey = topk_key(best);
	int brank = 0;

	if (!bkey)
		bi = E;
	/* unrolled 4 and 8, not fully: this warp runs once a launch, and its straight-line code waited
	 * on instruction fetch (with moe_up's 4 loads a batch, decode at batch 1 299.0 -> 305.3 tok/s,
	 * H200, one call) */
#pragma unroll 4
	for (int o = 1; o < 32; o++) {
		const unsigned ok = __shfl_sync(0xffffffffu, bkey, (lane + o) & 31);
		const int oi = __shfl_sync(0xffffffffu, bi, (lane + o) & 31);

		brank += topk_before(ok, oi, bkey, bi);
	}
	const unsigned at = __ballot_sync(0xffffffffu, bkey && brank == k - 1);
	const unsigned tk = at ? __shfl_sync(0xffffffffu, bkey, __ffs(at) - 1) : 1u; /* fewer valid lanes: all */
	const int ti = at ? __shfl_sync(0xffffffffu, bi, __ffs(at) - 1) : E;
	unsigned mask = 0;

#pragma unroll
	for (int i = 0; i < PER; i++) {
		const unsigned key = topk_key(v[i]);
		const int id = topk_id(i, lane, vec);

		if (key && !topk_before(tk, ti, key, id))
			mask |= 1u << i;
	}
	const int c = __popc(mask);
	int off = c; /* inclusive scan of the lanes' counts */

#pragma unroll
	for (int o = 1; o < 32; o <<= 1) {
		const int t = __shfl_up_sync(0xffffffffu, off, o);

		if (lane >= o)
			off += t;
	}
	const int C = __shfl_sync(0xffffffffu, off, 31);

	off -= c;
	if (C >= k && C <= 32) {
		float wsel;

#pragma unroll
		for (int i = 0; i < PER; i++)
			if (mask >> i & 1)
				cand[off + __popc(mask & ((1u << i) - 1))] =
					make_uint2(topk_key(v[i]), (unsigned)topk_id(i, lane, vec));
		__syncwarp();
		const uint2 me = lane < C ? cand[lane] : make_uint2(0u, (unsigned)E);
		int rank = 0;

#pragma unroll 8
		for (int j = 0; j < 32; j++) { /* every entry read (a loop to C waited on each) */
			const uint2 o = cand[j];

			rank += j < C && topk_before(o.x, (int)o.y, me.x, (int)me.y);
		}
		__syncwarp(); /* cand may be reused by this warp's next row */
		const bool sel = lane < C && rank < k;
		const float p = sel ? __uint_as_float(me.x - 1u) / sum : 0.0f;

		wsel = warp_sum(p);
		if (sel) {
			idx[(size_t)r * (k + 1) + rank] = (int)me.y;
			w[(size_t)r * (k + 1) + rank] = norm && wsel > 0.0f ? p / wsel : p;
		}
	} else {
		float wsum = 0.0f;

		if (!(best >= 0.0f))
			bi = E; /* only NaN and -1 here: nothing to take */
		for (int j = 0; j < k; j++) {
			const unsigned key = topk_key(best);
			const unsigned top = __reduce_max_sync(0xffffffffu, key);
			const int win = __reduce_min_sync(0xffffffffu, key == top ? bi : E);
			const float p = top ? __uint_as_float(top - 1u) / sum : 0.0f;

			if (top && lane == (vec ? (win & 127) >> 2 : win & 31)) {
#pragma unroll
				for (int i = 0; i < PER; i++) /* the winner drops it and finds its next best */
					if (topk_id(i, lane, vec) == win)
						v[i] = -1.0f;
				lane_best<PER>(v, vec, best, bi);
			}
			wsum += p;
			if (lane == j) {
				myw = p;
				myi = top ? win : 0;
			}
		}
		if (lane < k) {
			idx[(size_t)r * (k + 1) + lane] = myi;
			w[(size_t)r * (k + 1) + lane] = norm && wsum > 0.0f ? myw / wsum : myw;
		}
	}
	if (lane == 0) {
		idx[(size_t)r * (k + 1) + k] = -1;
		w[(size_t)r * (k + 1) + k] = sg ? dev_sigmoid(sgr) : 0.0f;
	}
}

#define TOPK_WARPS 4 /* rows a block of router_topk_kernel */
__global__ void router_topk_kernel(int *idx, float *w, const float *logits, const float *sg, int R, int E,
				   int k, bool norm)
{
	__shared__ uint2 cand[TOPK_WARPS][32];
	int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);

	pdl_trigger();
	pdl_wait();
	if (r < R)
		topk_row(idx, w, logits, sg, r, E, k, norm, cand[threadIdx.x >> 5]);
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
	CUDA_CHECK(e, q3g_launch(router_topk_kernel, cdiv(R, TOPK_WARPS), TOPK_WARPS * 32, 0, (cudaStream_t)st, idx, w, logits, sg, R, E, k, norm));
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
	uint16_t *xo; /* optional: the normalized rows in fp16 [R][H] */
};

/* A block is one k-slice of one row tile of one matrix: on sm_90 the ROUTER_KS slices of a tile
 * are a cluster of ROUTER_KS blocks, which add up their partial sums through distributed shared
 * memory in rank order (33 blocks of one tile each left 99 SMs idle: 31 us at R = 16, issue-bound
 * on the 33); before sm_90 a block owns a whole tile.  The block's warps split its k-steps; lane
 * (g, t) sums rows g and g + 8 over its inputs of each k-step (the same 16-byte loads as the
 * matvec), for MAXR rows of x (R rounded up to 1, 8 or 16: the rows past R sum unset values and
 * are never stored, so the loop has no branch); the four lanes of a row group, then the warps,
 * then the slices add up.  The same order for every R: a row's logits must not depend on its
 * batch.  The rows' norms come from row_rsqrt (as q3g_add_rmsnorm's: the same fp16 rows for the
 * experts either way), a cluster's ranks taking a quarter of the rows each above one row; each
 * block keeps its slice of x = h · rs · (1 + w) in shared memory, input-major, so that one
 * 16-byte load brings an input of four rows. */
#define ROUTER_KS 4
static __host__ __device__ constexpr int router_threads(int ks)
{
	return ks > 1 ? 256 : 512; /* with clusters: two blocks an SM, so that 33 clusters of 4 fit */
}

/* floats an input of the staged slice takes: its MAXR rows, padded so that the four inputs a
 * warp's lanes t = 0..3 read at once (2 t apart) fall in different banks */
static __host__ __device__ constexpr int router_xs(int maxr)
{
	return maxr >= 4 ? maxr + 4 : maxr;
}

template <int MAXR, int KS>
__global__ void __launch_bounds__(router_threads(KS), KS > 1 ? 2 : 1) router_f32_kernel(const __grid_constant__ router_launch L)
{
	/* the slice of x input-major, [kn][XS] (rows R .. MAXR - 1 of an input unset: their sums are
	 * never stored); then [warps][MAXR][16] partials */
	extern __shared__ float xsf[];
	constexpr int XS = router_xs(MAXR);
	__shared__ __align__(16) float rs[Q3G_MMV_MAX_TOK]; /* 16-byte loads of four rows' */
	__shared__ cluster_sum<KS, MAXR> cs;			 /* the rows' norms gathered over the cluster */
	__shared__ cluster_gather<KS, MAXR * Q3G_TILE_N> sums; /* the slices' sums [r][row] at rank 0 */

	sums.init(L.R * Q3G_TILE_N);
	cs.init();
	pdl_trigger();
	const int ks = (int)blockIdx.x % KS, bt = (int)blockIdx.x / KS, ntb = (int)gridDim.x / KS;
	const int j = bt >= L.tiles0, tile = j ? bt - L.tiles0 : bt;
	const struct q3g_mat &m = L.mat[j];
	const int R = L.R, H = L.H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	const int nw = blockDim.x >> 5;
	/* the slice: k-steps [s0, s1) of the tile (16 inputs each), inputs [k0, k0 + kn) */
	const int steps = 4 * m.nchunks, sper = cdiv(steps, KS), s0 = min(steps, ks * sper), s1 = min(steps, s0 + sper);
	const int k0 = 16 * s0, kn = max(0, min(H, 16 * s1) - k0);
	const int wper = cdiv(s1 - s0, nw), w0 = min(s1, s0 + warp * wper), w1 = min(s1, w0 + wper);
	float acc[MAXR][2];

	const uint8_t *base = (const uint8_t *)m.data + (size_t)tile * m.nchunks * Q3G_CHUNK_BYTES_F16 + lane * 16;
	/* k-step st's 16 bytes of this lane: chunk st / 4, 512 bytes a step within it */
	auto wload = [&](int st) {
		return ldg_stream(base + (size_t)(st >> 2) * Q3G_CHUNK_BYTES_F16 + (st & 3) * 512);
	};
	/* the weights do not depend on the previous kernel: the warp's first two k-steps into
	 * registers (while it ends, with programmatic dependent launch), then each step loads the
	 * one two ahead (a batch of steps unrolled let the compiler hoist a batch's activations
	 * too: spills at 16 rows) */
	uint4 wcur = make_uint4(0, 0, 0, 0), wnext = wcur;

	if (w0 < w1)
		wcur = wload(w0);
	if (w0 + 1 < w1)
		wnext = wload(w0 + 1);
	pdl_wait();

	if constexpr (KS > 1 && MAXR > 1) {
		cluster_row_rsqrt<16>(rs, cs, L.h, H, R, H, L.eps, ks); /* the rows' norms split over the cluster */
	} else {
		cluster_ready<KS>();
		row_rsqrt<16>(rs, L.h, H, R, H, L.eps); /* the whole rows, from global memory (L2) */
	}
	__syncthreads();
	const bool vec = (H & 3) == 0 && (kn & 3) == 0 && ((uintptr_t)L.h & 15) == 0 && ((uintptr_t)L.normw & 15) == 0;

	/* the slice, x = h · rs · (1 + w) in the order q3g_add_rmsnorm computes it (the fp16 rows
	 * below must be its bits) */
	if (vec) {
		if constexpr (MAXR >= 4) {
			/* a thread a unit of four inputs and four rows: the unit's norm weights loaded
			 * once for the four rows, no division, and an input's four rows one 16-byte
			 * store (a quarter warp's eight stores fill the 32 banks at 16 rows).  A unit of
			 * one row a thread (a division by R each, the weights loaded for every row) was
			 * a large part of the ~870 instructions of a warp's setup at 16 rows (ncu); this
			 * is 174 PTX instructions fewer, router logits 10.0 -> 8.3 us (H200).  Rows
			 * R .. MAXR - 1 are not loaded (their sums are never stored). */
			constexpr int NG = MAXR / 4, TB = 2;
			const int n = NG * (kn >> 2);

			for (int i0 = threadIdx.x; i0 < n; i0 += TB * blockDim.x) {
				float4 hv[TB][4], wv[TB];

#pragma unroll
				for (int b = 0; b < TB; b++) {
					const int i = i0 + b * blockDim.x, r0 = 4 * (i % NG), c = 4 * (i / NG);

					if (i < n) {
						wv[b] = *(const float4 *)(L.normw + k0 + c);
#pragma unroll
						for (int q = 0; q < 4; q++)
							hv[b][q] = r0 + q < R
									   ? *(const float4 *)(L.h + (size_t)(r0 + q) * H + k0 + c)
									   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
					}
				}
#pragma unroll
				for (int b = 0; b < TB; b++) {
					const int i = i0 + b * blockDim.x, r0 = 4 * (i % NG), c = 4 * (i / NG);

					if (i >= n)
						break;
					const float4 sv = *(const float4 *)(rs + r0), w = wv[b];
					const float s[4] = { sv.x, sv.y, sv.z, sv.w };
					float x[4][4]; /* [input][row] */

#pragma unroll
					for (int q = 0; q < 4; q++) {
						x[0][q] = hv[b][q].x * s[q] * (1.0f + w.x);
						x[1][q] = hv[b][q].y * s[q] * (1.0f + w.y);
						x[2][q] = hv[b][q].z * s[q] * (1.0f + w.z);
						x[3][q] = hv[b][q].w * s[q] * (1.0f + w.w);
					}
#pragma unroll
					for (int e = 0; e < 4; e++) {
						float4 *d = (float4 *)(xsf + (c + e) * XS + r0);

						*d = make_float4(x[e][0], x[e][1], x[e][2], x[e][3]);
					}
				}
			}
		} else {
			/* one row (MAXR 1: XS 1, the slice as it is): a unit of four inputs a thread */
			for (int i = threadIdx.x; i < (kn >> 2); i += blockDim.x) {
				const float4 hv = *(const float4 *)(L.h + k0 + 4 * i);
				const float4 w = *(const float4 *)(L.normw + k0 + 4 * i);
				const float s = rs[0];

				*(float4 *)(xsf + 4 * i) = make_float4(hv.x * s * (1.0f + w.x), hv.y * s * (1.0f + w.y),
								       hv.z * s * (1.0f + w.z),
								       hv.w * s * (1.0f + w.w));
			}
		}
	} else {
		const small_div Rd(R);

		for (int i = threadIdx.x; i < R * kn; i += blockDim.x) {
			const int c = Rd.div(i), r = Rd.mod(i, c);

			xsf[c * XS + r] = L.h[(size_t)r * H + k0 + c] * rs[r] * (1.0f + L.normw[k0 + c]);
		}
	}
	__syncthreads();
	/* this block's share of its slice's columns as fp16 for the experts (moe_up stages them as
	 * they are): the slice's columns split over the ntb blocks of the same slice */
	if (L.xo) {
		const int cw = cdiv(kn, ntb), c0 = min(kn, bt * cw), c1 = min(kn, c0 + cw);
		const small_div nc(max(1, c1 - c0));

		for (int i = threadIdx.x; i < R * (c1 - c0); i += blockDim.x) {
			const int r = nc.div(i), c = c0 + nc.mod(i, r);

			L.xo[(size_t)r * H + k0 + c] = f2h_bits(xsf[c * XS + r]);
		}
	}
#pragma unroll
	for (int r = 0; r < MAXR; r++)
		acc[r][0] = acc[r][1] = 0.0f;
	for (int st = w0; st < w1; st++) {
		const uint32_t regs[4] = { wcur.x, wcur.y, wcur.z, wcur.w };

		wcur = wnext;
		if (st + 2 < w1)
			wnext = wload(st + 2);
		const int kb = 16 * st + 2 * t; /* reg q: row g + 8 (q & 1), inputs kb + 8 (q >> 1) + {0, 1} */
		float2 wf[4];

#pragma unroll
		for (int q = 0; q < 4; q++)
			wf[q] = __half22float2(*reinterpret_cast<const __half2 *>(&regs[q]));
		if (16 * (st + 1) <= m.K) {
			/* the whole k-step: no test per input or row (the tests were 40% of the
			 * instructions at R = 16, ncu); inputs kb, kb + 1, kb + 8, kb + 9 of four
			 * rows a 16-byte load */
			const float *xk = xsf + (kb - k0) * XS;

#pragma unroll
			for (int r4 = 0; r4 < MAXR; r4 += 4) {
				float x[4][4]; /* [input][row] */

#pragma unroll
				for (int i = 0; i < 4; i++) {
					const float *p = xk + ((i & 1) + 8 * (i >> 1)) * XS + r4;

					if constexpr (MAXR >= 4) {
						const float4 v = *(const float4 *)p;

						x[i][0] = v.x, x[i][1] = v.y, x[i][2] = v.z, x[i][3] = v.w;
					} else if (!(i & 1)) { /* MAXR 1: inputs i, i + 1 adjacent */
						const float2 v = *(const float2 *)p;

						x[i][0] = v.x, x[i + 1][0] = v.y;
					}
				}
#pragma unroll
				for (int rr = 0; rr < 4 && r4 + rr < MAXR; rr++) {
					float *a = acc[r4 + rr];

					a[0] = fmaf(wf[0].y, x[1][rr], fmaf(wf[0].x, x[0][rr], a[0]));
					a[1] = fmaf(wf[1].y, x[1][rr], fmaf(wf[1].x, x[0][rr], a[1]));
					a[0] = fmaf(wf[2].y, x[3][rr], fmaf(wf[2].x, x[2][rr], a[0]));
					a[1] = fmaf(wf[3].y, x[3][rr], fmaf(wf[3].x, x[2][rr], a[1]));
				}
			}
			continue;
		}
#pragma unroll
		for (int q = 0; q < 4; q++) { /* the matrix's last, partial k-step: the same order */
			const int k = kb + 8 * (q >> 1), kx = k - k0;

			if (k >= m.K)
				continue;
#pragma unroll
			for (int r = 0; r < MAXR; r++) {
				const float x0 = xsf[kx * XS + r];
				const float x1 = k + 1 < m.K ? xsf[(kx + 1) * XS + r] : 0.0f;

				acc[r][q & 1] = fmaf(wf[q].y, x1, fmaf(wf[q].x, x0, acc[r][q & 1]));
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
			part[(warp * MAXR + r) * Q3G_TILE_N + g] = acc[r][0];
			part[(warp * MAXR + r) * Q3G_TILE_N + g + 8] = acc[r][1];
		}
	__syncthreads();
	/* the block's sum [r][row] i, a thread each (MAXR · 16 <= the block's threads): the warps in
	 * order, then the slices in rank order at rank 0 */
	static_assert(MAXR * Q3G_TILE_N <= router_threads(KS), "router: a sum a thread");
	const int i = threadIdx.x, r = i / Q3G_TILE_N, row = tile * Q3G_TILE_N + i % Q3G_TILE_N;
	float v = 0.0f;

	if (i < Q3G_TILE_N * R)
		for (int ww = 0; ww < nw; ww++)
			v += part[(ww * MAXR + r) * Q3G_TILE_N + i % Q3G_TILE_N];
	if (ks != 0) {
		if (i < Q3G_TILE_N * R)
			sums.send(ks, i, v);
		return;
	}
	sums.wait();
	if (i < Q3G_TILE_N * R && row < m.N)
		L.y[j][(size_t)r * L.ldy[j] + row] = sums.total(i, v);
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

/* [clusters][rows 1, 2-8, 9-16]: a launch's loop computes MAXR rows without a branch */
static void (*const router_kernels[2][3])(const router_launch) = {
	{ router_f32_kernel<1, 1>, router_f32_kernel<8, 1>, router_f32_kernel<Q3G_MMV_MAX_TOK, 1> },
	{ router_f32_kernel<1, ROUTER_KS>, router_f32_kernel<8, ROUTER_KS>, router_f32_kernel<Q3G_MMV_MAX_TOK, ROUTER_KS> },
};

/* k-slices of a router tile: ROUTER_KS with clusters, else 1 */
static int router_ks(void)
{
	return q3g_dev.clusters ? ROUTER_KS : 1;
}

/* the rows a launch's loop computes for R rows (router_kernels' second index) */
static int router_maxr(int R)
{
	return R == 1 ? 1 : R <= 8 ? 8 : Q3G_MMV_MAX_TOK;
}

/* the larger of: the slice of x (MAXR rows an input), the warps' partial sums */
static size_t router_smem(int R, int H, int ks)
{
	const int mx = router_maxr(R);
	const size_t nw = router_threads(ks) / 32, kn = (size_t)16 * cdiv(4 * cdiv(H, Q3G_KCHUNK), ks);
	const size_t x = Q3_MIN(kn, (size_t)H) * router_xs(mx) * 4;
	const size_t part = nw * mx * Q3G_TILE_N * 4;

	return Q3_MAX(x, part);
}

static int router(void *cublas, float *logits, float *sg, int *idx, float *w, int E, int k, bool norm,
		  const float *h, const float *normw, float eps, const struct q3g_mat *rm, const struct q3g_mat *sgate,
		  int R, int H, float *xf, float *wtmp, uint16_t *xo, cudaStream_t st, q3_err *e)
{
	int err;

	if (rm->fmt != Q3G_F16 || sgate->fmt != Q3G_F16 || rm->K != H || sgate->K != H)
		return q3_errf(e, -EINVAL, "router: expects dense (fp16) router and shared gate over %d inputs", H);
	const int ks = router_ks();

	if (R <= Q3G_MMV_MAX_TOK && router_smem(R, H, ks) <= q3g_dev.smem_dyn) {
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
		L.xo = xo;
		const int mx = router_maxr(R);
		void (*kern)(const router_launch) = router_kernels[ks > 1][mx == 1 ? 0 : mx == 8 ? 1 : 2];

		CUDA_CHECK(e, q3g_launch_cluster(kern, (rm->ntiles + sgate->ntiles) * ks, router_threads(ks),
						 router_smem(R, H, ks), st, dim3(ks, 1, 1), L));
	} else {
		if ((err = q3g_rmsnorm_f32(xf, h, normw, R, H, eps, st, e)) ||
		    /* no residual to add (a = NULL): h is only read */
		    (xo && (err = q3g_add_rmsnorm((float *)h, NULL, xo, normw, NULL, R, H, eps, st, e))))
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
	return router(cublas, logits, sg, NULL, NULL, 0, 0, false, h, normw, eps, rm, sgate, R, H, xf, wtmp, NULL,
		      (cudaStream_t)st, e);
}

extern "C" int q3g_router(void *cublas, float *logits, float *sg, int *idx, float *w, int E, int k,
			  bool norm, const float *h, const float *normw, float eps, const struct q3g_mat *rm,
			  const struct q3g_mat *sgate, int R, int H, float *xf, float *wtmp, uint16_t *xo, q3g_stream st,
			  q3_err *e)
{
	int err;

	if ((err = check_topk(E, k, e)))
		return err;
	return router(cublas, logits, sg, idx, w, E, k, norm, h, normw, eps, rm, sgate, R, H, xf, wtmp, xo,
		      (cudaStream_t)st, e);
}

/* ---- decode experts ------------------------------------------------------------------------- */

/* up_pair, up_expert: row tiles a routed block takes, and its warps a tile's gate (and as many its up) */
#define UP_TPB 2
#define UP_WPT (Q3G_MMV_THREADS / 32 / 2 / UP_TPB)
#define UP_JCOLS 4 /* up_expert's columns at most (rows staged in one round trip, B = 4 units a thread) */

struct moe_up_launch {
	struct q3g_mat mat[4]; /* gate, up, shared gate, shared up */
	const uint16_t *x;
	const float *xh, *normw; /* instead of x: the residual stream, normalized while staging */
	float eps;
	const int *idx;
	uint16_t *act;
	int R, k, H, lda, nb; /* nb: routed blocks a pair (UP_TPB row tiles of gate, each with up's) */
	int nbs;	      /* blocks of a shared-expert row group (a row tile each) */
	int jcols;	      /* an expert's rows staged at once by up_expert (its mma's token columns) */
	int xsh;	      /* halves of a routed block's staged rows (where its partial sums start) */
	int srows;	      /* rows a shared-expert block takes at once */
	int nsb;	      /* shared-expert blocks, the grid's first: cdiv(R, srows) · nbs */
	int cpw[2];	      /* chunks a warp takes of a routed / the shared expert's matrix */
};

/* Rows [r, r + nr) (rows, where given: rows[0 .. nr) of the batch) staged into xs for positions
 * [0, Kp) through gate's permutation pg, and again after them through up's pu where the two
 * differ; the norm folded in where L.xh is set; B units a thread a round trip (fp16 rows: the
 * norm's eight fp32 values and weights a unit spill at B > 1 in 64 registers). */
template <int B = 1>
static __device__ __forceinline__ void stage_gate_up(const moe_up_launch &L, uint16_t *xs, float *rs, int r, int nr,
						     int K, int Kp, const uint16_t *pg, const uint16_t *pu,
						     const int *rows = nullptr)
{
	for (int h = 0; h < 1 + (pu != pg); h++) {
		const uint16_t *perm = h ? pu : pg;

		if (h)
			__syncthreads(); /* stage_x_norm's rs is read until every thread is done */
		if (L.xh)
			stage_x_norm<1>(xs + (size_t)h * nr * Kp, rs, L.xh + (size_t)r * L.H, L.H, nr, K, Kp, perm, L.normw,
					L.eps, rows);
		else
			stage_x_f16<B>(xs + (size_t)h * nr * Kp, L.x + (size_t)r * L.H, L.H, nr, K, Kp, perm, rows);
	}
}

/* fp16(silu(gate) · up) of one output: the WPT warps' partial sums pg[w · stride] and
 * pu[w · stride] added in warp order (reduce_tile_warps' order) */
template <int WPT>
static __device__ __forceinline__ uint16_t gate_up_out(const float *pg, const float *pu, int stride)
{
	float gs = pg[0], us = pu[0];

#pragma unroll
	for (int w = 1; w < WPT; w++) {
		gs += pg[w * stride];
		us += pu[w * stride];
	}
	return f2h_bits(silu_fast(gs) * us);
}

/* Block (routed pair (r, s), row tiles UP_TPB·bt .. UP_TPB·bt + UP_TPB - 1 of gate and of up) of
 * the one-row instance.  Warp w takes tile w / 4, of the gate (w / 2 even) or the up, half of
 * its k-chunks (w % 2), and leaves its partial sums in shared memory; the block adds them up in
 * warp order and writes silu(gate) ⊙ up in fp16, the down projection's input.  Two warps a tile,
 * not four (one tile a block), halve what a pair costs outside its k-steps: experts up 66.2 ->
 * 53.0 us at R = 16 with the group constants below (H200, bench_kernels --gdn 16 --dense bf16),
 * 7.70 -> 8.27 at R = 1 (fewer warps in flight; this instance's eight loads a batch won back 9.62
 * -> 8.27).  A tile's sums are those up_expert computes for the pair's column. */
template <int FMT, bool W, int LOADS>
static __device__ __forceinline__ void up_pair(const moe_up_launch &L, int bt, int r, int s)
{
	extern __shared__ uint4 smem[];
	__shared__ float rs[1];
	constexpr int WPT = UP_WPT;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int ti = warp / (2 * WPT), which = warp / WPT % 2, kr = warp % WPT; /* 0: gate, 1: up */
	const int tile = bt * UP_TPB + ti;
	const struct q3g_mat &mg = L.mat[0], &mu = L.mat[1], &m = which ? mu : mg;
	const int Kp = mg.nchunks * Q3G_KCHUNK, c0 = kr * L.cpw[0], c1 = min(m.nchunks, c0 + L.cpw[0]);
	const int ex = L.idx[r * (L.k + 1) + s];
	uint16_t *xs = (uint16_t *)smem;
	/* the warps' partial sums [tile][gate, up][kr][16 rows], after the staged rows */
	float *part = (float *)(xs + L.xsh);
	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };

	if (ex == Q3G_SKIP)
		return; /* the CPU's expert (offload) */
	/* the first batch of weights in flight while the row is staged (128 registers): 8.22 ->
	 * 7.94 us at one row (H200).  The 64-register instance held it through the staging with
	 * twice the spills and lost, 53.0 -> 56.9 us at 16 rows. */
	constexpr bool PRE = LOADS >= 8;
	uint4 pre[LOADS];

	if (PRE && tile < mg.ntiles)
		first_batch<LOADS>(m, (const uint8_t *)m.data + (size_t)ex * m.data_stride, tile, c0, c1, pre);
	const uint16_t *pg = mg.perm ? mg.perm + (size_t)ex * mg.perm_stride : NULL;
	const uint16_t *pu = mu.perm ? mu.perm + (size_t)ex * mu.perm_stride : NULL;

	stage_gate_up(L, xs, rs, r, 1, mg.K, Kp, pg, pu);
	__syncthreads();
	if (tile < mg.ntiles)
		run_chunks<FMT, 1, LOADS, W, true>(m, (const uint8_t *)m.data + (size_t)ex * m.data_stride,
						   (size_t)ex * m.sz_stride, tile, c0, c1,
						   (const uint2 *)(which && pu != pg ? xs + Kp : xs), 1, 0, 1.0f, acc,
						   PRE ? pre : nullptr, PRE);
	/* token column 0 lives in lanes t = 0, elements 0 (row g) and 2 (row g + 8) */
	if (!(lane & 3)) {
		float *pp = part + ((ti * 2 + which) * WPT + kr) * Q3G_TILE_N;

		pp[lane >> 2] = acc[0][0];
		pp[(lane >> 2) + 8] = acc[0][2];
	}
	__syncthreads();
	if ((int)threadIdx.x < UP_TPB * Q3G_TILE_N) {
		const int tt = threadIdx.x / Q3G_TILE_N, ri = threadIdx.x % Q3G_TILE_N;
		const int row = (bt * UP_TPB + tt) * Q3G_TILE_N + ri;
		const float *pgs = part + tt * 2 * WPT * Q3G_TILE_N + ri, *pus = pgs + WPT * Q3G_TILE_N;

		if (row < mg.N)
			L.act[(size_t)(r * (L.k + 1) + s) * L.lda + row] = gate_up_out<WPT>(pgs, pus, Q3G_TILE_N);
	}
}

/* Block (routed pair p = r·k + s of the batch, row tiles as up_pair's), above one row: an expert
 * that several rows picked is read once for up to jcols of them, their rows the mma's token
 * columns.  Its pairs in pair order are cut into groups of jcols: the block of a group's first
 * pair takes the group, the others leave.  At 16 rows of uniform routing 160 pairs touch ~138
 * experts, and routing that is not uniform shares more.  A column of an mma depends on its own
 * inputs alone and the k-chunks a warp takes are a pair's, so a pair's sums are up_pair's: bit
 * for bit the same whatever shares its expert. */
template <int FMT, bool W, int LOADS>
static __device__ __forceinline__ void up_expert(const moe_up_launch &L, int bt, int p)
{
	extern __shared__ uint4 smem[];
	__shared__ float rs[UP_JCOLS];
	__shared__ int jq[UP_JCOLS], jr[UP_JCOLS], wcnt[Q3G_MMV_THREADS / 32];
	constexpr int WPT = UP_WPT, NW = Q3G_MMV_THREADS / 32;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int ti = warp / (2 * WPT), which = warp / WPT % 2, kr = warp % WPT; /* 0: gate, 1: up */
	const int tile = bt * UP_TPB + ti, k = L.k, P = L.R * k, G = L.jcols;
	const struct q3g_mat &mg = L.mat[0], &mu = L.mat[1], &m = which ? mu : mg;
	const int Kp = mg.nchunks * Q3G_KCHUNK, c0 = kr * L.cpw[0], c1 = min(m.nchunks, c0 + L.cpw[0]);
	const small_div kd(k); /* pair q is row q / k's slot q mod k: idx[q / k · S + q mod k] = idx[q + q / k] */
	const int ex = L.idx[p + kd.div(p)];
	uint16_t *xs = (uint16_t *)smem;
	/* the warps' partial sums [tile][gate, up][kr][column][16 rows], after the staged rows */
	float *part = (float *)(xs + L.xsh);
	int rank = 0, after = 0; /* the expert's pairs before p; those after it found so far */

	if (ex == Q3G_SKIP)
		return; /* the CPU's expert (offload) */
	/* p's rank among its expert's pairs, and the next G - 1 of them after p, in pair order */
	for (int q0 = 0; q0 < P && after < G - 1; q0 += blockDim.x) {
		const int q = q0 + threadIdx.x;
		const bool same = q < P && L.idx[q + kd.div(q)] == ex;
		const unsigned b = __ballot_sync(0xffffffffu, same && q > p);
		int pos = after + __popc(b & ((1u << lane) - 1));

		rank += __syncthreads_count(same && q < p);
		if (lane == 0)
			wcnt[warp] = __popc(b);
		__syncthreads();
#pragma unroll
		for (int w = 0; w < NW; w++) {
			pos += w < warp ? wcnt[w] : 0;
			after += wcnt[w];
		}
		if (same && q > p && pos < G - 1)
			jq[1 + pos] = q;
		__syncthreads(); /* wcnt */
	}
	if (rank & (G - 1))
		return; /* an earlier pair's block computes this one (G: a power of two) */
	const int nc = min(G, 1 + after);

	if (threadIdx.x < nc) { /* column c: pair jq[c] (from here its row of act) of row jr[c] */
		const int q = threadIdx.x ? jq[threadIdx.x] : p, r = kd.div(q);

		jq[threadIdx.x] = q + r;
		jr[threadIdx.x] = r;
	}
	__syncthreads();
	const uint16_t *pg = mg.perm ? mg.perm + (size_t)ex * mg.perm_stride : NULL;
	const uint16_t *pu = mu.perm ? mu.perm + (size_t)ex * mu.perm_stride : NULL;
	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };

	stage_gate_up<UP_JCOLS>(L, xs, rs, 0, nc, mg.K, Kp, pg, pu, jr);
	__syncthreads();
	if (tile < mg.ntiles)
		run_chunks<FMT, 1, LOADS, W, true>(m, (const uint8_t *)m.data + (size_t)ex * m.data_stride,
						   (size_t)ex * m.sz_stride, tile, c0, c1,
						   (const uint2 *)(which && pu != pg ? xs + (size_t)nc * Kp : xs), nc, 0, 1.0f,
						   acc);
	/* lane (g, t): rows g, g + 8 of columns 2t, 2t + 1 */
	const int g = lane >> 2, t = lane & 3;
	float *pp = part + ((ti * 2 + which) * WPT + kr) * G * Q3G_TILE_N;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		const int col = 2 * t + (i & 1);

		if (col < nc)
			pp[col * Q3G_TILE_N + g + 8 * (i >> 1)] = acc[0][i];
	}
	__syncthreads();
	for (int i = threadIdx.x; i < nc * UP_TPB * Q3G_TILE_N; i += blockDim.x) {
		const int col = i / (UP_TPB * Q3G_TILE_N), tt = i / Q3G_TILE_N % UP_TPB, ri = i % Q3G_TILE_N;
		const int row = (bt * UP_TPB + tt) * Q3G_TILE_N + ri;
		const float *pgs = part + (tt * 2 * WPT * G + col) * Q3G_TILE_N + ri;

		if (row < mg.N)
			L.act[(size_t)jq[col] * L.lda + row] =
				gate_up_out<WPT>(pgs, pgs + WPT * G * Q3G_TILE_N, G * Q3G_TILE_N);
	}
}

/* Block (rows [r0, r0 + nr) of the batch, row tile `tile` of the shared expert's gate and up):
 * the shared expert is every row's, so a block takes up to 16 rows at once, their staged
 * activations the mma's token columns (NT token tiles), and reads and dequantizes the tile once,
 * not once a row (a pair a row at R = 16 read the bf16 shared expert's 4 MB from L2 sixteen
 * times).  A block a tile, four warps of it the gate's, four the up's (k-chunks split four
 * ways), and a column of the mma depends on its own inputs alone, so a row gets the bits it gets alone. */
template <int FMT, int NT, bool W, int LOADS>
static __device__ __forceinline__ void up_shared(const moe_up_launch &L, int tile, int r0, int nr)
{
	extern __shared__ uint4 smem[];
	__shared__ float rs[Q3G_MMV_MAX_TOK];
	__shared__ bool skip[Q3G_MMV_MAX_TOK];
	constexpr int WPT = Q3G_MMV_THREADS / 32 / 2;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int which = warp / WPT, kr = warp % WPT; /* 0: gate, 1: up */
	const struct q3g_mat &mg = L.mat[2], &mu = L.mat[3], &m = which ? mu : mg;
	const int Kp = mg.nchunks * Q3G_KCHUNK, two = mu.perm != mg.perm;
	const int c0 = kr * L.cpw[1], c1 = min(m.nchunks, c0 + L.cpw[1]);
	uint16_t *xs = (uint16_t *)smem;
	/* the warps' partial sums [gate, up][kr][row][16 outputs], after the staged rows */
	float *part = (float *)(xs + (size_t)(1 + two) * nr * Kp);
	float acc[NT][4];

	if ((int)threadIdx.x < nr)
		skip[threadIdx.x] = L.idx[(size_t)(r0 + threadIdx.x) * (L.k + 1) + L.k] == Q3G_SKIP;
	stage_gate_up(L, xs, rs, r0, nr, mg.K, Kp, mg.perm, mu.perm);
	__syncthreads();
#pragma unroll
	for (int n = 0; n < NT; n++)
		acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
	run_chunks<FMT, NT, NT == 2 ? 2 : LOADS, W, true>(m, (const uint8_t *)m.data, 0, tile, c0, c1,
				  (const uint2 *)(which && two ? xs + (size_t)nr * Kp : xs), nr, 0, 1.0f, acc);
	const int g = lane >> 2, t = lane & 3;

#pragma unroll
	for (int n = 0; n < NT; n++)
#pragma unroll
		for (int i = 0; i < 4; i++) {
			const int tok = n * 8 + 2 * t + (i & 1);

			if (tok < nr)
				part[(((which * WPT + kr) * Q3G_MMV_MAX_TOK) + tok) * Q3G_TILE_N + g + 8 * (i >> 1)] = acc[n][i];
		}
	__syncthreads();
	for (int i = threadIdx.x; i < nr * Q3G_TILE_N; i += blockDim.x) {
		const int tok = i / Q3G_TILE_N, ri = i % Q3G_TILE_N, row = tile * Q3G_TILE_N + ri;
		const float *pg = part + tok * Q3G_TILE_N + ri, *pu = pg + WPT * Q3G_MMV_MAX_TOK * Q3G_TILE_N;

		if (!skip[tok] && row < mg.N)
			L.act[((size_t)(r0 + tok) * (L.k + 1) + L.k) * L.lda + row] =
				gate_up_out<WPT>(pg, pu, Q3G_MMV_MAX_TOK * Q3G_TILE_N);
	}
}

/* FR is the routed experts' weight format, FS the shared expert's: one launch for all k + 1 pairs
 * of a row even where they differ (a bf16 shared expert beside int4 routed ones took a second
 * launch, 7 us of a layer's ~80 at batch 1).  The grid's first nsb blocks take the shared expert
 * (a tile of it for up to srows rows each; first, because each has up to 16 rows' work), the
 * others a routed pair each (up_expert: an expert's pairs by the block of its first), the row
 * tile slowest.  Four blocks an SM (64
 * registers, some tens of bytes spilled; the shared expert's blocks at most as many rows as leave
 * four in shared memory): ncu counted the schedulers issuing in 63% of cycles at three, waiting
 * on latency with 5.6 warps each, and decode went 1578.1 / 1581.7 -> 1595.8 / 1601.1 tok/s at
 * batch 16 (H200, 80b-a3b synthetic, one call; the launch alone 66.9 -> 66.5 us at 16 rows,
 * 7.46 -> 7.68 at one).  SMALL: a grid that fits at two blocks an SM (one row; up_pair, as no
 * two pairs share an expert): 128 registers, eight loads a batch, for the bytes in flight that
 * fewer warps lose; a load batch's size changes no sum, so a row's bits stay those of any batch. */
template <int FR, int FS, bool W, bool SMALL>
__global__ void __launch_bounds__(Q3G_MMV_THREADS, SMALL ? 2 : 4) moe_up_kernel(const __grid_constant__ moe_up_launch L)
{
	pdl_trigger();
	pdl_wait(); /* the expert ids come from the router: nothing to prefetch before them */
	const int b = blockIdx.x;

	if (b < L.nsb) {
		const small_div nbs(L.nbs);
		const int g = nbs.div(b), r0 = g * L.srows, nr = min(L.srows, L.R - r0);

		if (nr > 8)
			up_shared<FS, 2, W, 4>(L, nbs.mod(b, g), r0, nr);
		else
			up_shared<FS, 1, W, SMALL ? 8 : 4>(L, nbs.mod(b, g), r0, nr);
	} else { /* a block a routed pair and UP_TPB row tiles, the tiles slowest */
		const small_div P(L.R * L.k);
		const int i = b - L.nsb, bt = P.div(i), p = P.mod(i, bt);

		if constexpr (SMALL) {
			const small_div kd(L.k);
			const int r = kd.div(p);

			up_pair<FR, W, 8>(L, bt, r, kd.mod(p, r));
		} else {
			up_expert<FR, W, 4>(L, bt, p);
		}
	}
}

typedef void (*moe_up_fn)(const moe_up_launch);

/* The instance for routed format fr and shared format fs, whole: groups of whole chunks in both
 * (q3g_whole_groups). */
static moe_up_fn up_kernel_for(int fr, int fs, bool whole, bool small)
{
	static const moe_up_fn t[2][2][3][3] = {
		{ Q3G_FMT_PAIRS(moe_up_kernel, false, false), Q3G_FMT_PAIRS(moe_up_kernel, true, false) },
		{ Q3G_FMT_PAIRS(moe_up_kernel, false, true), Q3G_FMT_PAIRS(moe_up_kernel, true, true) },
	};

	return t[small][whole][fr][fs];
}

/* A routed block's: ncol rows staged, twice where gate and up read them in different orders
 * (one permutation: q3g_mlp_plan), then the warps' partial sums of ncol columns. */
static size_t up_smem(const struct q3g_mat *g, const struct q3g_mat *u, int ncol)
{
	return (size_t)(1 + (g->perm != u->perm)) * ncol * g->nchunks * Q3G_KCHUNK * 2 +
	       (size_t)ncol * (Q3G_MMV_THREADS / 32) * Q3G_TILE_N * 4;
}

/* A shared-expert block's: nr rows staged once or twice, then the warps' partial sums. */
static size_t up_shared_smem(const struct q3g_mat *sg, const struct q3g_mat *su, int nr)
{
	return (size_t)(1 + (su->perm != sg->perm)) * nr * sg->nchunks * Q3G_KCHUNK * 2 +
	       (size_t)(Q3G_MMV_THREADS / 32) * Q3G_MMV_MAX_TOK * Q3G_TILE_N * 4;
}

static int moe_up(uint16_t *act, const uint16_t *x, const float *xh, const float *normw, float eps, const int *idx,
		  const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *sgate,
		  const struct q3g_mat *sup, int R, int k, int H, int lda, q3g_stream st, q3_err *e)
{
	moe_up_launch L;
	size_t smem;

	if (up->N != gate->N || up->ntiles != gate->ntiles || up->nchunks != gate->nchunks || sup->N != sgate->N ||
	    sup->ntiles != sgate->ntiles || sup->nchunks != sgate->nchunks)
		return q3_errf(e, -EINVAL, "moe up: gate and up shapes differ (%d / %d and %d / %d outputs)", gate->N,
			       up->N, sgate->N, sup->N);
	if (Q3_MAX(gate->N, sgate->N) > lda)
		return q3_errf(e, -EINVAL, "moe up: activations of %d / %d outputs in rows of %d halves", gate->N,
			       sgate->N, lda);
	if (gate->K != H || up->K != H || sgate->K != H || sup->K != H)
		return q3_errf(e, -EINVAL, "moe up: experts take %d / %d inputs, the rows have %d", gate->K, sgate->K, H);
	if (gate->fmt != up->fmt || sgate->fmt != sup->fmt)
		return q3_errf(e, -EINVAL, "moe up: gate and up in different formats");
	if (R < 1)
		return 0;
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
	L.act = act;
	L.R = R;
	L.k = k;
	L.H = H;
	L.lda = lda;
	/* a routed block UP_TPB row tiles of gate with up's, a shared-expert block one (neither
	 * chosen by R, so that a row's sums do not depend on its batch) */
	L.nb = cdiv(gate->ntiles, UP_TPB);
	L.nbs = sgate->ntiles;
	L.cpw[0] = cdiv(gate->nchunks, UP_WPT);
	L.cpw[1] = cdiv(sgate->nchunks, Q3G_MMV_THREADS / 32 / 2);
	/* rows a shared-expert block: up to 16 while four blocks still fit an SM (its staged rows
	 * set the launch's shared memory, every block's): 8 on the H200, 4 on a 100 KB sm_89 */
	L.srows = Q3G_MMV_MAX_TOK;
	while (L.srows > 1 && (up_shared_smem(sgate, sup, L.srows) > q3g_dev.smem_dyn ||
			       4 * (up_shared_smem(sgate, sup, L.srows) + 1024) > q3g_dev.smem_sm))
		L.srows /= 2;
	L.srows = Q3_MIN(L.srows, R);
	L.nsb = cdiv(R, L.srows) * L.nbs;
	const int grid = L.nsb + R * k * L.nb;
	const bool whole = q3g_whole_groups(gate) && q3g_whole_groups(sgate);
	const bool small = grid <= 2 * q3g_dev.sms;

	/* up_expert's columns: UP_JCOLS while four blocks fit an SM */
	L.jcols = UP_JCOLS;
	while (L.jcols > 1 && (up_smem(gate, up, L.jcols) > q3g_dev.smem_dyn ||
			       4 * (up_smem(gate, up, L.jcols) + 1024) > q3g_dev.smem_sm))
		L.jcols /= 2;
	L.xsh = (1 + (gate->perm != up->perm)) * (small ? 1 : L.jcols) * gate->nchunks * Q3G_KCHUNK;
	smem = Q3_MAX(up_smem(gate, up, small ? 1 : L.jcols), up_shared_smem(sgate, sup, L.srows));
	if (smem > q3g_dev.smem_dyn)
		return q3_errf(e, -EINVAL, "moe up: %zu bytes of shared memory exceed the device's %zu", smem,
			       q3g_dev.smem_dyn);

	CUDA_CHECK(e, q3g_launch(up_kernel_for(gate->fmt, sgate->fmt, whole, small), grid, Q3G_MMV_THREADS, smem,
				 (cudaStream_t)st, L));
	return 0;
}

extern "C" int q3g_moe_up(uint16_t *act, const uint16_t *x, const int *idx, const struct q3g_mat *gate,
			  const struct q3g_mat *up, const struct q3g_mat *sgate, const struct q3g_mat *sup, int R,
			  int k, int H, int lda, q3g_stream st, q3_err *e)
{
	return moe_up(act, x, NULL, NULL, 0.0f, idx, gate, up, sgate, sup, R, k, H, lda, st, e);
}

extern "C" int q3g_moe_up_norm(uint16_t *act, const float *h, const float *normw, float eps, const int *idx,
			       const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *sgate,
			       const struct q3g_mat *sup, int R, int k, int H, int lda, q3g_stream st, q3_err *e)
{
	return moe_up(act, NULL, h, normw, eps, idx, gate, up, sgate, sup, R, k, H, lda, st, e);
}

int q3g_moe_init(q3_err *e)
{
	int err;

	for (int c = 0; c < 2; c++)
		for (int i = 0; i < 3; i++)
			if ((err = q3g_allow_dyn_smem(router_kernels[c][i], "router_f32_kernel", e)))
				return err;
	for (int w = 0; w < 2; w++)
		for (int fr = 0; fr < 3; fr++)
			for (int fs = 0; fs < 3; fs++)
				for (int sm = 0; sm < 2; sm++)
					if ((err = q3g_allow_dyn_smem(up_kernel_for(fr, fs, w, sm), "moe_up_kernel", e)))
						return err;
	return q3g_moe_down_init(e);
}
