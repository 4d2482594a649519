/* gpu_mmv.cu - the matvec: up to Q3G_MMV_MAX_JOBS Linears applied to R <= 16 token rows in one
 * launch, on tensor cores, with the weights streamed once from the tile format.
 *
 * A block (8 warps) owns RT row tiles of one Linear; the 8 / RT warps of a tile split its input
 * chunks, and their partial sums meet in shared memory.  Above four rows a matrix of a few hundred
 * row tiles (qkvz, q_proj) takes more tiles a block (every block stages all the rows: qkvz's 384
 * blocks of 16 rows took 34.8 us, 96 took 22.2); its input slices stay those of one row, a warp
 * running several in turn (SL), so that a row's sums never depend on its batch.  The block first
 * stages the R activation rows (fp16, gathered through the act-order permutation) in shared memory
 * in B-fragment order; on sm_90 the sliced blocks do it in clusters of MMV_CL, each block loading
 * and converting a share of the units and storing it into every block of its cluster (bf16 qkvz+ba
 * at 16 rows 23.9 -> 20.3 us, H200), and the wide blocks' rows as they are (RM) are multicast.
 * Each warp then streams its chunks: eight 16-byte loads per lane in flight, the A fragments
 * dequantized in registers, one mma per k-step and token tile.  Every output element is written
 * by exactly one thread, so results are deterministic (no atomics) and the residual add can be
 * fused (Q3G_EPI_ADD).
 */
#include "gpu_internal.h"
#include "bulk.cuh"

struct mmv_launch {
	int njobs, R;
	int cta0[Q3G_MMV_MAX_JOBS + 1]; /* job j owns blocks [cta0[j], cta0[j + 1]) */
	int rt[Q3G_MMV_MAX_JOBS];	/* row tiles per block */
	int ks[Q3G_MMV_MAX_JOBS];	/* input slices per row tile (SL: a multiple of 8 / rt) */
	struct q3g_job job[Q3G_MMV_MAX_JOBS];
};

/* NTH threads a block: Q3G_MMV_THREADS, or MMV_WIDE when there are few row tiles (a 2048-row
 * out_proj is 128 tiles: 8 warps a tile left the device latency-bound at 11% occupancy). */
#define MMV_WIDE 512
/* The warp's slices kr·QPW .. kr·QPW + QPW - 1 of tile `tile`, each from zero, into part[qi] (a
 * float4 a lane per token tile). */
template <int FMT, int NT, bool W>
static __device__ __forceinline__ void run_slices(const struct q3g_mat &m, int tile, int kr, int QPW, int per,
						  const uint2 *xs, int R, float4 *part, const uint4 *pre)
{
	auto slice = [&](int u, bool first) {
		const int qi = kr * QPW + u, c0 = qi * per, c1 = min(m.nchunks, c0 + per);
		float acc[NT][4];

#pragma unroll
		for (int n = 0; n < NT; n++)
			acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
		if (tile < m.ntiles)
			run_chunks<FMT, NT, Q3G_MMV_LOADS, W>(m, (const uint8_t *)m.data, 0, tile, c0, c1, xs, R, 0, 1.0f, acc,
							      first ? pre : nullptr, first);
#pragma unroll
		for (int n = 0; n < NT; n++)
			part[(qi * NT + n) * 32] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
	};
	int u = 0;

	if (pre) /* the first slice from the preloaded batch, apart: pre is dead after it */
		slice(u++, true);
	for (; u < QPW; u++)
		slice(u, false);
}

/* The launch's R rows of job jb into xs: as they are, each row padded to ld words (RM: bulk copies,
 * multicast over the cluster where CL > 1), or in B-fragment order through the act-order
 * permutation (the norm folded in where jb.xh is set), the rows' norms and the units split over
 * the cluster's ranks where CL > 1; BN / BF units a thread in flight (normalized / fp16 rows).
 * Where CL > 1 the kernel has set xbar up already, before pdl_wait (every rank's must be ready
 * before any rank stores into it); alone, the bulk copies' set it up here.  The caller's
 * barrier follows. */
template <bool RM, int CL, int BN, int BF>
static __device__ __forceinline__ void stage_rows(uint16_t *xs, float *rs, cluster_sum<CL, Q3G_MMV_MAX_TOK> &cs,
						  uint64_t *xbar, xs_push<CL> &push, const struct q3g_job &jb, int R,
						  int Kp, int ld)
{
	const struct q3g_mat &m = jb.w;

	if constexpr (RM) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		uint32_t *xw = (uint32_t *)xs;

		if constexpr (CL > 1) {
			/* rank c copies rows c, c + CL, .. into every block of the cluster: each block
			 * reads 1 / CL of the rows from L2 (out_proj at 16 rows: 128 KB a block) */
			cluster_ready<CL>();
			if (threadIdx.x == 0)
				for (int r = push.rank; r < R; r += CL)
					bulk_copy_mc(xw + (size_t)r * ld, jb.x + (size_t)r * jb.ldx, m.K * 2, xbar,
						     (uint16_t)((1u << CL) - 1));
		} else if (threadIdx.x == 0) {
			bar_init(xbar, 1);
			bar_init_fence();
			bar_expect(xbar, (uint32_t)R * m.K * 2);
			for (int r = 0; r < R; r++)
				bulk_copy(xw + (size_t)r * ld, jb.x + (size_t)r * jb.ldx, m.K * 2, xbar);
		}
		/* the pad past K reads as zeros, as staged rows' (K % 8 == 0: whole words) */
		for (int i = threadIdx.x; i < R * (Kp - m.K) / 2; i += blockDim.x) {
			const int r = i / ((Kp - m.K) / 2), w = i % ((Kp - m.K) / 2);

			xw[(size_t)r * ld + m.K / 2 + w] = 0u;
		}
		__syncthreads(); /* xbar initialized before any thread waits on it */
		bar_wait(xbar, 0);
#endif
	} else if (CL > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		/* a cluster's blocks stage the same rows (the host checks): the ranks split the rows'
		 * norms (cluster_row_rsqrt), and each stages 1 / CL of the units into every block
		 * (xs_push), where each block read the whole rows twice (bf16 qkvz at 16 rows: 196
		 * blocks of 128 KB of fp32 rows) */
		if (jb.xh) {
			cluster_row_rsqrt<8>(rs, cs, jb.xh, jb.ldx, R, m.K, jb.eps, push.rank);
			__syncthreads();
			stage_normed<BN, CL>(xs, rs, jb.xh, jb.ldx, R, m.K, Kp, m.perm, jb.normw, nullptr, push);
		} else {
			cluster_ready<CL>(); /* every block's xbar is set up */
			stage_x_f16<BF, CL>(xs, jb.x, jb.ldx, R, m.K, Kp, m.perm, nullptr, push);
		}
		bar_wait(xbar, 0);
#endif
	} else if (jb.xh) {
		/* four units a thread a round trip at two token tiles (16 rows of 2048: four round trips
		 * to L2, not eight; qkvz 25.2 -> 24.8 us, decode 1570 -> 1580 tok/s at batch 16); two where
		 * the one-row instance must stay at 80 registers (three blocks an SM) */
		stage_x_norm<BN>(xs, rs, jb.xh, jb.ldx, R, m.K, Kp, m.perm, jb.normw, jb.eps);
	} else {
		stage_x_f16<BF>(xs, jb.x, jb.ldx, R, m.K, Kp, m.perm);
	}
}

/* RM (sm_90, the wide blocks, one job of fp16 rows without a permutation): the rows are staged as
 * they are, one bulk copy a row issued by one thread (cp.async.bulk: no registers, every row in
 * flight at once), rather than through registers in B-fragment order in round trips of four units
 * a thread (out_proj at 16 rows: 128 KB a block in four round trips, 30% of its stall samples on
 * the staging, ncu).  The B fragments then come from the padded rows (rm_bsrc): the same values,
 * the same sums. */
template <int NT, int NTH, bool W, bool SL, bool RM = false, int CL = 1>
__global__ void __launch_bounds__(NTH) mmv_kernel(const __grid_constant__ mmv_launch L)
{
	extern __shared__ uint4 smem[];
	__shared__ float rs[Q3G_MMV_MAX_TOK];
	__shared__ cluster_sum<CL, Q3G_MMV_MAX_TOK> cs; /* CL > 1: the rows' norms over the cluster */
	__shared__ uint64_t xbar;			 /* CL > 1: the other ranks' staged units */
	int j = 0;

	while (j + 1 < L.njobs && (int)blockIdx.x >= L.cta0[j + 1])
		j++;
	const struct q3g_job &jb = L.job[j];
	const struct q3g_mat &m = jb.w;
	const int R = L.R, RT = L.rt[j], WPT = (NTH / 32) / RT;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int tile = ((int)blockIdx.x - L.cta0[j]) * RT + warp / WPT, kr = warp % WPT;
	const int Kp = m.nchunks * Q3G_KCHUNK;
	uint16_t *xs = (uint16_t *)smem;
	const int ld = Kp / 2 + 4; /* RM: a row's words, padded (rm_bsrc) */
	float *red = (float *)(xs + (RM ? (size_t)R * ld * 2 : (size_t)R * Kp));
	float acc[NT][4];
	const int KS = SL ? L.ks[j] : WPT, per = cdiv(m.nchunks, KS), c0 = kr * per, c1 = min(m.nchunks, c0 + per);

	/* above eight rows, in the wide blocks (out_proj, o_proj: a tile a block, 16 row tiles of
	 * 16 rows staged), the warp's first batch of weights (they do not depend on the previous
	 * kernel) is in flight through its end and the staging: 14.5 -> 14.1 us for out_proj at 16
	 * rows.  In the 256-thread blocks (qkvz, q/k/v: norm folded) it took the staging's batches
	 * down to fit 128 registers and lost (25.0 -> 25.5 us). */
	constexpr bool PRE = NT > 1 && NTH == MMV_WIDE;
	/* the staging's units a thread in flight (normalized, fp16 rows) */
	constexpr int BN = NT == 2 && !PRE ? 4 : 2, BF = NT == 2 && !PRE ? 8 : 4;
	uint4 pre[Q3G_MMV_LOADS];
	xs_push<CL> push{ &xbar, 0 };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	if constexpr (CL > 1)
		push.rank = (int)cooperative_groups::this_cluster().block_rank();
	if constexpr (CL > 1 && RM) {
		/* the rows multicast over the cluster: every block's xbar set up (its one arrival and
		 * all the rows' bytes) before any rank copies; the cluster's wait after pdl_wait */
		if (threadIdx.x == 0) {
			bar_init(&xbar, 1);
			bar_expect(&xbar, (uint32_t)R * m.K * 2);
			bar_init_fence();
		}
		asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
	} else if constexpr (CL > 1) {
		if (threadIdx.x == 0) {
			const int n = R * (Kp >> 3);

			bar_init(&xbar, 1);
			bar_expect(&xbar, 16u * (uint32_t)(n - stage_units(n, (jb.xh ? BN : BF) * NTH, CL, push.rank)));
		}
		cs.init(); /* its fence and arrival publish xbar too */
	}
#endif
	pdl_trigger();
	if (PRE && tile < m.ntiles) {
		const int f0 = SL ? kr * (KS / WPT) * per : c0;

		first_batch<Q3G_MMV_LOADS>(m, (const uint8_t *)m.data, tile, f0, min(m.nchunks, f0 + per), pre);
	}
	pdl_wait();
	/* above eight rows, the residual the epilogue adds, in flight with the staging (a round
	 * trip at the end was 15% of out_proj's stall samples at 16 rows; at one row the registers
	 * held through the k-steps cost a block an SM) */
	const int g = lane >> 2, t = lane & 3;
	float yold[NT][4];

#pragma unroll
	for (int n = 0; n < NT; n++)
#pragma unroll
		for (int i = 0; i < 4; i++) {
			const int row = tile * Q3G_TILE_N + g + 8 * (i >> 1), tok = n * 8 + 2 * t + (i & 1);

			yold[n][i] = NT > 1 && jb.epi == Q3G_EPI_ADD && kr == 0 && tile < m.ntiles && row < m.N && tok < R
					     ? jb.y[(size_t)tok * jb.ldy + row]
					     : 0.0f;
		}
	stage_rows<RM, CL, BN, BF>(xs, rs, cs, &xbar, push, jb, R, Kp, ld);
	__syncthreads();
	if constexpr (SL) {
		/* red: [tile of the block][slice][token tile] float4 a lane; the slices added in order,
		 * from the first, as reduce_tile_warps adds the warps' */
		float4 *part = (float4 *)red + (size_t)(warp / WPT) * KS * NT * 32 + lane;
		const int QPW = KS / WPT;

		if (m.fmt == Q3G_Q4)
			run_slices<Q3G_Q4, NT, W>(m, tile, kr, QPW, per, (const uint2 *)xs, R, part, PRE ? pre : nullptr);
		else if (m.fmt == Q3G_Q8)
			run_slices<Q3G_Q8, NT, W>(m, tile, kr, QPW, per, (const uint2 *)xs, R, part, PRE ? pre : nullptr);
		else
			run_slices<Q3G_F16, NT, W>(m, tile, kr, QPW, per, (const uint2 *)xs, R, part, PRE ? pre : nullptr);
		__syncthreads();
		if (kr != 0 || tile >= m.ntiles)
			return;
#pragma unroll
		for (int n = 0; n < NT; n++) {
			float4 v = part[n * 32];

			acc[n][0] = v.x, acc[n][1] = v.y, acc[n][2] = v.z, acc[n][3] = v.w;
			for (int q = 1; q < KS; q++) {
				v = part[(q * NT + n) * 32];
				acc[n][0] += v.x;
				acc[n][1] += v.y;
				acc[n][2] += v.z;
				acc[n][3] += v.w;
			}
		}
	} else {
#pragma unroll
		for (int n = 0; n < NT; n++)
			acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
		if (tile < m.ntiles) {
			const uint8_t *wb = (const uint8_t *)m.data;

			auto run = [&](const auto &bs) {
				if (m.fmt == Q3G_Q4)
					run_chunks_b<Q3G_Q4, NT, Q3G_MMV_LOADS, W>(m, wb, 0, tile, c0, c1, bs, 1.0f, acc,
										     PRE ? pre : nullptr, true);
				else if (m.fmt == Q3G_Q8)
					run_chunks_b<Q3G_Q8, NT, Q3G_MMV_LOADS, W>(m, wb, 0, tile, c0, c1, bs, 1.0f, acc,
										     PRE ? pre : nullptr, true);
				else
					run_chunks_b<Q3G_F16, NT, Q3G_MMV_LOADS, W>(m, wb, 0, tile, c0, c1, bs, 1.0f, acc,
										      PRE ? pre : nullptr, true);
			};
			if constexpr (RM)
				run(rm_bsrc{ (const uint32_t *)xs, ld, R });
			else
				run(xs_bsrc{ (const uint2 *)xs, R, 0 });
		}
		reduce_tile_warps<NT>(red, acc, WPT);
		if (kr != 0 || tile >= m.ntiles)
			return;
	}
#pragma unroll
	for (int n = 0; n < NT; n++)
#pragma unroll
		for (int i = 0; i < 4; i++) {
			int row = tile * Q3G_TILE_N + g + 8 * (i >> 1), tok = n * 8 + 2 * t + (i & 1);

			if (row < m.N && tok < R) {
				float *y = jb.y + (size_t)tok * jb.ldy + row;

				*y = jb.epi == Q3G_EPI_ADD ? (NT > 1 ? yold[n][i] : *y) + acc[n][i] : acc[n][i];
			}
		}
}

typedef void (*mmv_fn)(const mmv_launch);

/* Blocks a cluster (sm_90) of the sliced instance, which stage their rows together, and of the
 * wide one with rows as they are, which multicast them: out_proj at 16 rows 10.9 -> 9.7 us in
 * pairs, 12.8 in fours (H200; one block an SM, and four SMs of a GPC free at once are fewer) */
#define MMV_CL 4
#define MMV_WIDE_CL 2

/* [whole groups][Q3G_MMV_THREADS, MMV_WIDE threads, sliced, MMV_WIDE with rows as they are (RM),
 * sliced in clusters of MMV_CL, RM in clusters of MMV_WIDE_CL][token tiles - 1] */
static const mmv_fn mmv_kernels[2][6][2] = {
	{ { mmv_kernel<1, Q3G_MMV_THREADS, false, false>, mmv_kernel<2, Q3G_MMV_THREADS, false, false> },
	  { mmv_kernel<1, MMV_WIDE, false, false>, mmv_kernel<2, MMV_WIDE, false, false> },
	  { mmv_kernel<1, Q3G_MMV_THREADS, false, true>, mmv_kernel<2, Q3G_MMV_THREADS, false, true> },
	  { mmv_kernel<1, MMV_WIDE, false, false, true>, mmv_kernel<2, MMV_WIDE, false, false, true> },
	  { mmv_kernel<1, Q3G_MMV_THREADS, false, true, false, MMV_CL>,
	    mmv_kernel<2, Q3G_MMV_THREADS, false, true, false, MMV_CL> },
	  { mmv_kernel<1, MMV_WIDE, false, false, true, MMV_WIDE_CL>,
	    mmv_kernel<2, MMV_WIDE, false, false, true, MMV_WIDE_CL> } },
	{ { mmv_kernel<1, Q3G_MMV_THREADS, true, false>, mmv_kernel<2, Q3G_MMV_THREADS, true, false> },
	  { mmv_kernel<1, MMV_WIDE, true, false>, mmv_kernel<2, MMV_WIDE, true, false> },
	  { mmv_kernel<1, Q3G_MMV_THREADS, true, true>, mmv_kernel<2, Q3G_MMV_THREADS, true, true> },
	  { mmv_kernel<1, MMV_WIDE, true, false, true>, mmv_kernel<2, MMV_WIDE, true, false, true> },
	  { mmv_kernel<1, Q3G_MMV_THREADS, true, true, false, MMV_CL>,
	    mmv_kernel<2, Q3G_MMV_THREADS, true, true, false, MMV_CL> },
	  { mmv_kernel<1, MMV_WIDE, true, false, true, MMV_WIDE_CL>,
	    mmv_kernel<2, MMV_WIDE, true, false, true, MMV_WIDE_CL> } },
};

/* Above this many rows the wide blocks take fp16 rows as they are (RM in mmv_kernel) */
#define MMV_RM_ROWS 4

/* Whether the wide blocks can bulk-copy job j's rows as they are: sm_90, fp16 rows without a
 * permutation, 16-byte pieces (cp.async.bulk's sizes and alignments). */
static bool rows_copyable(const struct q3g_job *jb)
{
	return q3g_dev.cc >= 90 && jb->x && !jb->xh && !jb->w.perm && !((uintptr_t)jb->x & 15) && !(jb->ldx & 7) &&
	       !(jb->w.K & 7);
}

/* Row tiles per block and input slices per tile (*ks: 8 / rt where nothing is sliced).  Where up
 * to four tiles a block make the grid one wave of three blocks an SM, that many (a 12288-row qkvz
 * in 16-row blocks was two waves, each paying the staging and the weights' first round trip);
 * the slices follow from that, the matrix alone.  Above four rows such a matrix takes up to eight
 * tiles a block while the grid keeps a block an SM, its warps running several slices (qkvz at 16
 * rows: 34.8 us in 384 blocks, 22.2 in 96; at one row the staging is small and 96 blocks took
 * 12.8 us against 9.8), a bf16 one up to four (its tiles four times the bytes of int4's, against
 * which the staging weighs less: bf16 qkvz at 16 rows 26.8 us in 96 blocks, 25.2 in 192; decode
 * 1540.9 -> 1552.8 tok/s at batch 16); and a huge one (lm_head) streams whole rows a warp, as it
 * did (its sums above four rows differ from one row's in the last bits; sliced it took 194 us, not
 * 166). */
static int pick_rt(int ntiles, int R, int fmt, int *ks)
{
	int rt = 1, rtmax = fmt == Q3G_F16 ? 4 : 8;

	if (cdiv(ntiles, rt) > 3 * q3g_dev.sms && cdiv(ntiles, 4) <= 3 * q3g_dev.sms)
		while (cdiv(ntiles, rt) > 3 * q3g_dev.sms)
			rt *= 2;
	*ks = Q3G_MMV_THREADS / 32 / rt;
	if (R > 4 && rt > 1) {
		while (rt < rtmax && cdiv(ntiles, rt) > q3g_dev.sms)
			rt *= 2;
	} else if (R > 4) {
		while (rt < 8 && ntiles / (rt * 2) >= 2 * q3g_dev.sms)
			rt *= 2;
		*ks = Q3G_MMV_THREADS / 32 / rt;
	}
	return rt;
}

/* Whether every job of a launch stages the same rows (a cluster's blocks may belong to two jobs:
 * qkvz and ba) */
static bool same_rows(const struct q3g_job *jobs, int njobs)
{
	for (int j = 1; j < njobs; j++) {
		const struct q3g_job *a = &jobs[0], *b = &jobs[j];

		if (a->x != b->x || a->xh != b->xh || a->ldx != b->ldx || a->normw != b->normw || a->eps != b->eps ||
		    a->w.perm != b->w.perm || a->w.K != b->w.K || a->w.nchunks != b->w.nchunks)
			return false;
	}
	return true;
}

/* the staged rows (RM: padded by 16 bytes), then the partial sums: ks slices of rt tiles (a warp
 * each where not sliced) */
static size_t mmv_smem(int R, int Kp, int rt, int ks, int nt, int nth, bool rm)
{
	size_t x = ((size_t)R * (Kp * 2 + (rm ? 16 : 0)) + 15) & ~(size_t)15;

	return x + (ks > 1 ? (size_t)Q3_MAX(nth / 32, rt * ks) * nt * 32 * 16 : 0);
}

extern "C" int q3g_mmv(const struct q3g_job *jobs, int njobs, int R, q3g_stream st, q3_err *e)
{
	mmv_launch L;
	size_t smem = 0;
	int nt = R > 8 ? 2 : 1, tiles = 0, nth;
	bool sliced = false, rm;

	if (R < 1 || R > Q3G_MMV_MAX_TOK || njobs < 1 || njobs > Q3G_MMV_MAX_JOBS)
		return q3_errf(e, -EINVAL, "mmv: %d rows, %d jobs", R, njobs);
	memset(&L, 0, sizeof(L));
	L.njobs = njobs;
	L.R = R;
	for (int j = 0; j < njobs; j++)
		tiles += jobs[j].w.ntiles;
	/* from the matrices alone, never from R: a row's sums must not depend on its batch */
	nth = tiles <= 2 * q3g_dev.sms ? MMV_WIDE : Q3G_MMV_THREADS;
	rm = nth == MMV_WIDE && njobs == 1 && R > MMV_RM_ROWS && rows_copyable(&jobs[0]);
	for (int j = 0; j < njobs; j++) {
		const struct q3g_mat *m = &jobs[j].w;

		L.job[j] = jobs[j];
		if (nth == MMV_WIDE) {
			L.rt[j] = 1;
			L.ks[j] = MMV_WIDE / 32;
		} else {
			L.rt[j] = pick_rt(m->ntiles, R, m->fmt, &L.ks[j]);
		}
		sliced |= L.rt[j] * L.ks[j] > nth / 32;
		L.cta0[j + 1] = L.cta0[j] + cdiv(m->ntiles, L.rt[j]);
		smem = Q3_MAX(smem, mmv_smem(R, m->nchunks * Q3G_KCHUNK, L.rt[j], L.ks[j], nt, nth, rm));
	}
	if (smem > q3g_dev.smem_dyn) {
		/* too many rows for the staging area of this device: two launches of half the rows */
		struct q3g_job half[Q3G_MMV_MAX_JOBS];
		int r1 = R / 2, err;

		if (R == 1)
			return q3_errf(e, -EINVAL, "mmv: one row of %zu bytes exceeds shared memory", smem);
		if ((err = q3g_mmv(jobs, njobs, r1, st, e)))
			return err;
		for (int j = 0; j < njobs; j++) {
			half[j] = jobs[j];
			if (half[j].xh)
				half[j].xh += (size_t)r1 * jobs[j].ldx;
			else
				half[j].x += (size_t)r1 * jobs[j].ldx;
			half[j].y += (size_t)r1 * jobs[j].ldy;
		}
		return q3g_mmv(half, njobs, R - r1, st, e);
	}
	bool whole = true; /* every job's groups whole chunks (run_chunks) */

	for (int j = 0; j < njobs; j++)
		whole &= q3g_whole_groups(&jobs[j].w);
	/* the instance and its cluster (the grid a whole number of them): the sliced blocks stage
	 * their rows together where every job stages the same; the wide ones with rows as they are
	 * multicast them on sm_90 alone (ptxas advises against it for later GPUs) */
	int inst = sliced ? 2 : rm ? 3 : nth == MMV_WIDE, cl = 1;

	if (sliced && q3g_dev.clusters && same_rows(jobs, njobs))
		inst = 4, cl = MMV_CL;
	else if (rm && q3g_dev.clusters && q3g_dev.cc == 90)
		inst = 5, cl = MMV_WIDE_CL;
	CUDA_CHECK(e, q3g_launch_cluster(mmv_kernels[whole][inst][nt - 1], cdiv(L.cta0[njobs], cl) * cl, nth, smem,
					 (cudaStream_t)st, dim3(cl, 1, 1), L));
	return 0;
}

int q3g_mmv_init(q3_err *e)
{
	int err;

	for (int w = 0; w < 2; w++)
		for (int wide = 0; wide < 6; wide++)
			for (int nt = 0; nt < 2; nt++)
				if ((err = q3g_allow_dyn_smem(mmv_kernels[w][wide][nt], "mmv_kernel", e)))
					return err;
	return 0;
}
