/* gpu_mmv.cu - the matvec: up to Q3G_MMV_MAX_JOBS Linears applied to R <= 16 token rows in one
 * launch, on tensor cores, with the weights streamed once from the tile format.
 *
 * A block (8 warps) owns RT row tiles of one Linear; the 8 / RT warps of a tile split its input
 * chunks, and their partial sums meet in shared memory.  The block first stages the R activation
 * rows (fp16, gathered through the act-order permutation) in shared memory in B-fragment order.
 * Each warp then streams its chunks: eight 16-byte loads per lane in flight, the A fragments
 * dequantized in registers, one mma per k-step and token tile.  Every output element is written
 * by exactly one thread, so results are deterministic (no atomics) and the residual add can be
 * fused (Q3G_EPI_ADD).
 */
#include "gpu_internal.h"
#include "mma_frag.cuh"

struct mmv_launch {
	int njobs, R;
	int cta0[Q3G_MMV_MAX_JOBS + 1]; /* job j owns blocks [cta0[j], cta0[j + 1]) */
	int rt[Q3G_MMV_MAX_JOBS];	/* row tiles per block */
	struct q3g_job job[Q3G_MMV_MAX_JOBS];
};

/* NTH threads a block: Q3G_MMV_THREADS, or MMV_WIDE when there are few row tiles (a 2048-row
 * out_proj is 128 tiles: 8 warps a tile left the device latency-bound at 11% occupancy). */
#define MMV_WIDE 512
template <int NT, int NTH, bool W>
__global__ void __launch_bounds__(NTH) mmv_kernel(const __grid_constant__ mmv_launch L)
{
	extern __shared__ uint4 smem[];
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
	float *red = (float *)(xs + (size_t)R * Kp);
	float acc[NT][4];
	const int per = cdiv(m.nchunks, WPT), c0 = kr * per, c1 = min(m.nchunks, c0 + per);

	pdl_trigger();
	pdl_wait();
	if (jb.xh) {
		__shared__ float rs[Q3G_MMV_MAX_TOK];

		stage_x_norm<2>(xs, rs, jb.xh, jb.ldx, R, m.K, Kp, m.perm, jb.normw, jb.eps);
	} else {
		stage_x_f16<NT == 2 ? 8 : 4>(xs, jb.x, jb.ldx, R, m.K, Kp, m.perm);
	}
	__syncthreads();
#pragma unroll
	for (int n = 0; n < NT; n++)
		acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
	if (tile < m.ntiles) {
		const uint8_t *wb = (const uint8_t *)m.data;

		if (m.fmt == Q3G_Q4)
			run_chunks<Q3G_Q4, NT, Q3G_MMV_LOADS, W>(m, wb, 0, tile, c0, c1, (const uint2 *)xs, R, 0, 1.0f, acc);
		else if (m.fmt == Q3G_Q8)
			run_chunks<Q3G_Q8, NT, Q3G_MMV_LOADS, W>(m, wb, 0, tile, c0, c1, (const uint2 *)xs, R, 0, 1.0f, acc);
		else
			run_chunks<Q3G_F16, NT, Q3G_MMV_LOADS, W>(m, wb, 0, tile, c0, c1, (const uint2 *)xs, R, 0, 1.0f, acc);
	}
	reduce_tile_warps<NT>(red, acc, WPT);
	if (kr != 0 || tile >= m.ntiles)
		return;
	const int g = lane >> 2, t = lane & 3;
#pragma unroll
	for (int n = 0; n < NT; n++)
#pragma unroll
		for (int i = 0; i < 4; i++) {
			int row = tile * Q3G_TILE_N + g + 8 * (i >> 1), tok = n * 8 + 2 * t + (i & 1);

			if (row < m.N && tok < R) {
				float *y = jb.y + (size_t)tok * jb.ldy + row;

				*y = jb.epi == Q3G_EPI_ADD ? *y + acc[n][i] : acc[n][i];
			}
		}
}

typedef void (*mmv_fn)(const mmv_launch);

/* [whole groups][MMV_WIDE threads][token tiles - 1] */
static const mmv_fn mmv_kernels[2][2][2] = {
	{ { mmv_kernel<1, Q3G_MMV_THREADS, false>, mmv_kernel<2, Q3G_MMV_THREADS, false> },
	  { mmv_kernel<1, MMV_WIDE, false>, mmv_kernel<2, MMV_WIDE, false> } },
	{ { mmv_kernel<1, Q3G_MMV_THREADS, true>, mmv_kernel<2, Q3G_MMV_THREADS, true> },
	  { mmv_kernel<1, MMV_WIDE, true>, mmv_kernel<2, MMV_WIDE, true> } },
};

/* Row tiles per block: more when many rows would make every block re-read a large staged input,
 * as long as the grid still fills the device; and, where up to four make the grid one wave of
 * three blocks an SM, that many (a 12288-row qkvz in 16-row blocks was two waves, each paying the
 * staging and the weights' first round trip).  A huge matrix (lm_head) streams as it did. */
static int pick_rt(int ntiles, int R)
{
	int rt = 1;

	if (R > 4)
		while (rt < 8 && ntiles / (rt * 2) >= 2 * q3g_dev.sms)
			rt *= 2;
	if (cdiv(ntiles, rt) > 3 * q3g_dev.sms && cdiv(ntiles, 4) <= 3 * q3g_dev.sms)
		while (cdiv(ntiles, rt) > 3 * q3g_dev.sms)
			rt *= 2;
	return rt;
}

static size_t mmv_smem(int R, int Kp, int rt, int nt, int nth)
{
	size_t x = ((size_t)R * Kp * 2 + 15) & ~(size_t)15;

	return x + (rt < nth / 32 ? (size_t)nth * nt * 4 * 4 : 0);
}

extern "C" int q3g_mmv(const struct q3g_job *jobs, int njobs, int R, q3g_stream st, q3_err *e)
{
	mmv_launch L;
	size_t smem = 0;
	int nt = R > 8 ? 2 : 1, tiles = 0, nth;

	if (R < 1 || R > Q3G_MMV_MAX_TOK || njobs < 1 || njobs > Q3G_MMV_MAX_JOBS)
		return q3_errf(e, -EINVAL, "mmv: %d rows, %d jobs", R, njobs);
	memset(&L, 0, sizeof(L));
	L.njobs = njobs;
	L.R = R;
	for (int j = 0; j < njobs; j++)
		tiles += jobs[j].w.ntiles;
	/* from the matrices alone, never from R: a row's sums must not depend on its batch */
	nth = tiles <= 2 * q3g_dev.sms ? MMV_WIDE : Q3G_MMV_THREADS;
	for (int j = 0; j < njobs; j++) {
		const struct q3g_mat *m = &jobs[j].w;

		L.job[j] = jobs[j];
		L.rt[j] = nth == MMV_WIDE ? 1 : pick_rt(m->ntiles, R);
		L.cta0[j + 1] = L.cta0[j] + cdiv(m->ntiles, L.rt[j]);
		smem = Q3_MAX(smem, mmv_smem(R, m->nchunks * Q3G_KCHUNK, L.rt[j], nt, nth));
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
	CUDA_CHECK(e, q3g_launch(mmv_kernels[whole][nth == MMV_WIDE][nt - 1], L.cta0[njobs], nth, smem, (cudaStream_t)st, L));
	return 0;
}

int q3g_mmv_init(q3_err *e)
{
	int err;

	for (int w = 0; w < 2; w++)
		for (int wide = 0; wide < 2; wide++)
			for (int nt = 0; nt < 2; nt++)
				if ((err = q3g_allow_dyn_smem(mmv_kernels[w][wide][nt], "mmv_kernel", e)))
					return err;
	return 0;
}
