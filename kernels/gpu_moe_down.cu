/* gpu_moe_down.cu - the decode experts' down projection on sm_90: for each of R <= 16 token rows,
 * the weighted sum of its k routed experts' and the shared expert's down projections of
 * silu(gate) ⊙ up, added to the residual stream h.  (Before sm_90: gpu_moe_down_regs.cu.)
 *
 * A block owns one 16-row tile of the output for up to 16 rows of the batch.  Every routed (row,
 * slot) pair then needs one contiguous piece of its expert's down matrix: the tile (nchunks chunks)
 * with its scales and zero points beside it.  Up to sixteen warps take the pairs in turn; each
 * copies its own next pairs' pieces into its stages of a ring in shared memory with bulk copies
 * (cp.async.bulk: the SM's copy engine moves the bytes and counts them into the stage's
 * mbarrier), stages a pair's activations (moe_up's fp16 silu(gate) ⊙ up, from L2, loaded into
 * registers during the warp's previous pair) for its B fragments while its tile arrives, waits
 * for the stage, and runs the tile's k-steps from shared memory in a rolled loop.
 *
 * The design before loaded the weights into registers, three chunks a warp at a time: 90 us at
 * R = 16 (H200, int4, ~90 MB), a round trip for every three chunks and an unrolled body that
 * missed the instruction cache.  Here a block has up to 32 pairs in flight and nothing waits in
 * registers; the same ring fed by 16-byte cp.async from a producer warp ran 110 us (the loads
 * through L1 are limited in flight), by a producer thread's bulk copies 66.  Copying the activations into the stages
 * too (bulk, from L2) ran slower: 11.2 us at R = 1 and 100 at R = 16, against 7.6 and 66.
 *
 * The shared expert's tile is the same for every row: it is copied once, and one warp computes
 * it for eight rows at once, their activations (staged by the block at the start) the mma's token
 * columns.  A pair's partial sum (its routing weight applied) is computed by one warp in a fixed
 * order, a column of the mma depends on its own inputs alone, and a row's pairs are added in slot
 * order: results do not depend on the batch (test_ops checks row 0 at R = 1, 7, 16).
 */
#include "gpu_internal.h"
#include "bulk.cuh"

#define DN_CWARPS 16			/* consumer warps */
#define DN_THREADS (DN_CWARPS * 32)
#define DN_ROWS Q3G_MMV_MAX_TOK		/* batch rows a block */
#define DN_MAX_STAGES 32
#define DN_SH_ROWS 8			/* rows a warp takes of the shared expert: an mma's token tile */
#define DN_PF 2				/* 16-byte units a lane of a pair's activations loaded ahead (512 inputs) */

struct down_launch {
	struct q3g_down_args a;
	struct bulk_tile dt[2];
	int nst;	 /* ring stages, a multiple of ncw */
	int ncw;	 /* consumer warps taking pairs (<= DN_CWARPS) */
	uint32_t stage;	 /* bytes of a ring stage */
	uint32_t o_sx, o_red, o_aw, o_xsh, o_sh, o_ring; /* offsets in dynamic shared memory */
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* The word of aw where unit u of a pair's activations (inputs 8u .. 8u + 7) starts, in pair_tile's
 * order: chunk u / 8, k-step (u & 7) / 2, half u & 1, its four words every other word. */
static __device__ __forceinline__ int act_slot(int u)
{
	return (u >> 3) * 32 + (u & 6) * 4 + (u & 1);
}

/* The word of aw that lane `lane` fills for its inputs 2·lane, 2·lane + 1 of a chunk: unit
 * lane / 4's words, every other word, from its slot. */
static __device__ __forceinline__ int aw_slot(int lane)
{
	return act_slot(lane >> 2) + 2 * (lane & 3);
}

/* Lane l's units l, l + 32, .. (N of them) of a pair's fp16 activations from its row a, those with
 * a slot (slot[j] >= 0: the units below the row's count). */
template <int N>
static __device__ __forceinline__ void act_load(uint4 (&v)[N], const uint16_t *a, const int (&slot)[N])
{
	const int lane = threadIdx.x & 31;

#pragma unroll
	for (int j = 0; j < N; j++)
		if (slot[j] >= 0)
			v[j] = *(const uint4 *)(a + 8 * (j * 32 + lane));
}

/* ... into aw at their slots */
template <int N>
static __device__ __forceinline__ void act_store(uint32_t *aw, const uint4 (&v)[N], const int (&slot)[N])
{
#pragma unroll
	for (int j = 0; j < N; j++) {
		if (slot[j] >= 0) {
			uint32_t *d = aw + slot[j];

			d[0] = v[j].x;
			d[2] = v[j].y;
			d[4] = v[j].z;
			d[6] = v[j].w;
		}
	}
}

/* the slots of lane l's units l + 32 j of units [u0, nu) (-1: none), relative to unit u0's chunk */
template <int N>
static __device__ __forceinline__ void act_slots(int (&slot)[N], int u0, int nu)
{
	const int lane = threadIdx.x & 31;

#pragma unroll
	for (int j = 0; j < N; j++)
		slot[j] = u0 + j * 32 + lane < nu ? act_slot(j * 32 + lane) : -1;
}

/* The pair's activations (moe_up's fp16 silu(gate) ⊙ up) as the B fragments want them: word
 * (c, st, t, half) of aw holds the inputs 16st + 2t + 8·half (+1) of chunk c, so that a lane of
 * column t reads its two words of a k-step as one uint2.  Inputs through the act-order
 * permutation (positions >= K: 0); lane l reads inputs 2l, 2l + 1 of every chunk, eight chunks'
 * loads at once (from L2: moe_up wrote them just before). */
static __device__ __forceinline__ void stage_act(uint32_t *aw, const uint16_t *act, const uint16_t *perm, int K, int nch)
{
	const int lane = threadIdx.x & 31, slot = aw_slot(lane);

	if (!perm && K >= nch * Q3G_KCHUNK && !((uintptr_t)act & 15)) {
		/* the usual case (no permutation, whole chunks, a 16-byte aligned row): 16-byte loads
		 * of eight inputs each.  The word-by-word path below was ~400 of the ~1000 instructions
		 * a pair (ncu, R = 16); with the pairs' stage and parity counted, not divided (the
		 * kernel's loop), experts down went 40.6 -> 36.0 us at R = 16 and 6.33 -> 6.00 at R = 1
		 * (H200, bench_kernels --gdn). */
		const int nu = nch * (Q3G_KCHUNK / 8);

		for (int u0 = 0; u0 < nu; u0 += 4 * 32) {
			uint4 v[4];
			int slot[4];

			act_slots<4>(slot, u0, nu);
			act_load<4>(v, act + 8 * u0, slot);
			act_store<4>(aw + (u0 >> 3) * 32, v, slot);
		}
		return;
	}
	for (int c0 = 0; c0 < nch; c0 += 8) {
		uint32_t v[8];

#pragma unroll
		for (int i = 0; i < 8; i++)
			v[i] = c0 + i < nch ? act_pair(act, perm, K, (c0 + i) * Q3G_KCHUNK + 2 * lane) : 0u;
#pragma unroll
		for (int i = 0; i < 8; i++)
			if (c0 + i < nch)
				aw[(c0 + i) * 32 + slot] = v[i];
	}
}

#endif

/* FR: the routed experts' weight format, FS: the shared expert's; W: groups of whole chunks
 * (q3g_whole_groups).  Pair (row r, slot s) is pair q = r·S + s of the block, the i-th pair of
 * consumer warp q mod ncw, in that warp's stage i mod spw.  Each warp fills its own stages: lane
 * 0 copies the tiles of its first spw pairs at the start, and of pair i + spw as soon as it is
 * done with pair i.  (One producer thread for the block copied the pairs in order, each after
 * its stage's previous pair was done: one slow warp held back every other warp's copies, and the
 * consumers' waits for their tiles were 37% of the stall samples at R = 16, ncu.)  The shared
 * expert's pairs (its tile is copied once; the pair of every eighth row computes its rows' eight,
 * the others nothing) and the slots the CPU computes (Q3G_SKIP, offload) pass through their stage
 * empty (an arrival completes the phase). */
template <int FR, int FS, bool W>
__global__ void __launch_bounds__(DN_THREADS, 1) moe_down_kernel(const __grid_constant__ down_launch L)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	extern __shared__ __align__(128) uint8_t sm[];
	uint64_t *full = (uint64_t *)sm, *shb = full + DN_MAX_STAGES;
	const int tile = blockIdx.x, r0 = blockIdx.y * DN_ROWS, nr = min(DN_ROWS, L.a.R - r0), k = L.a.k, S = k + 1;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, np = nr * S, spw = L.nst / L.ncw;
	int *sx = (int *)(sm + L.o_sx);
	float *sw = (float *)(sx + DN_ROWS * S), *red = (float *)(sm + L.o_red);
	uint8_t *shs = (uint8_t *)(sw + DN_ROWS * S); /* pair q is the shared expert's: q mod S = k, divided once */
	uint8_t *shared_tile = sm + L.o_sh, *ring = sm + L.o_ring;
	const struct q3g_mat &ms = L.a.mat[1];
	const uint2 *xsh = (const uint2 *)(sm + L.o_xsh);

	pdl_trigger();
	if (threadIdx.x == 0)
		ring_init(full, L.nst, shb);
	/* a warp's next routed pair's activations in registers during the pair before (nx, when pf),
	 * where a pair takes the 16-byte path and DN_PF units a lane hold it: 36.0 -> 33.5 us at
	 * R = 16, decode 1740 -> 1756 tok/s at batch 16 (H200).  (Word by word, eight registers a
	 * chunk, it had run slower: 48.7 against 46.6 us.)  The warp's first pair's and those after
	 * a shared-expert pair's too: loaded while the tile came, their round trips were 6% of the
	 * stall samples at 16 rows (ncu); 33.5-33.9 -> 31.3-31.4 us at R = 16, 6.7 at R = 1 as before,
	 * decode 2019-2033 -> 2031-2047 tok/s at batch 16 (H200, two calls). */
	const struct q3g_mat &mr = L.a.mat[0];
	const int nu = mr.nchunks * (Q3G_KCHUNK / 8);
	const bool fast = !mr.perm && mr.K >= nu * 8 && nu <= 32 * DN_PF && !(L.a.lda & 7) && !((uintptr_t)L.a.act & 15);
	const size_t astep = (size_t)L.ncw * L.a.lda; /* from a warp's pair's row to its next pair's */
	const uint16_t *an = L.a.act + ((size_t)r0 * S + warp) * L.a.lda; /* pair q's row, then qn's */
	int slot[DN_PF];
	uint4 nx[DN_PF];

	act_slots<DN_PF>(slot, 0, nu);
	pdl_wait();
	/* the first pair's (a slot the CPU computes loads a row nobody reads: harmless) */
	bool pf = fast && warp < L.ncw && warp < np && warp % S != k;

	if (pf)
		act_load<DN_PF>(nx, an, slot);
	for (int i = threadIdx.x; i < np; i += blockDim.x) {
		sx[i] = L.a.idx[(size_t)r0 * S + i];
		sw[i] = L.a.w[(size_t)r0 * S + i];
		shs[i] = i % S == k;
	}
	/* the rows' shared-expert activations, in the matvec's B-fragment order */
	stage_x_f16<1>((uint16_t *)(sm + L.o_xsh), L.a.act + ((size_t)r0 * S + k) * L.a.lda, S * L.a.lda, nr, ms.K,
		       ms.nchunks * Q3G_KCHUNK, ms.perm);
	__syncthreads();
	const struct tile_src rsrc = tile_src_of(mr, L.dt[0], tile);
	/* lane 0 of a consumer warp: its i-th pair's tile into its stage st (or the stage's phase
	 * completed at once, for a pair with nothing to copy) */
	auto fill = [&](int i, int st) {
		const int q = warp + i * L.ncw;

		if (q >= np)
			return;
		if (shs[q] || sx[q] == Q3G_SKIP)
			bar_arrive(&full[st]);
		else {
			bar_expect(&full[st], L.dt[0].bytes);
			copy_tile(ring + (size_t)st * L.stage, rsrc, L.dt[0], sx[q], &full[st]);
		}
	};
	if (lane == 0 && warp < L.ncw) {
		if (warp == 0) {
			bar_expect(shb, L.dt[1].bytes);
			copy_tile(shared_tile, tile_src_of(ms, L.dt[1], tile), L.dt[1], 0, shb);
		}
		for (int i = 0; i < spw; i++)
			fill(i, warp * spw + i);
	}
	uint32_t *aw = (uint32_t *)(sm + L.o_aw) + warp * 32 * max(L.a.mat[0].nchunks, L.a.mat[1].nchunks);

	/* pair i of the warp: stage st = warp·spw + i mod spw, the parity of phase i / spw (counted,
	 * not divided: a division by a value known only at run time is ~30 instructions) */
	int i = 0, st = warp * spw, parity = 0;
	/* the warp is done with pair i's stage (and aw): refill the stage for pair i + spw, go on */
	auto next_stage = [&]() {
		__syncwarp();
		if (lane == 0)
			fill(i + spw, st);
		if (++st == (warp + 1) * spw)
			st = warp * spw, parity ^= 1;
	};
	/* pair q's activations were in nx (or none were loaded): the next pair's into nx, where it
	 * takes the 16-byte path; an moves on to its row */
	auto ahead = [&](int q) {
		const int qn = q + L.ncw;

		an += astep;
		pf = fast && qn < np && !shs[qn] && sx[qn] != Q3G_SKIP;
		if (pf)
			act_load<DN_PF>(nx, an, slot);
	};

	for (int q = warp; q < np && warp < L.ncw; i++, q += L.ncw) {
		const int ex = sx[q];
		float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };

		if (shs[q]) { /* the shared expert: rows r .. r + 7 where r is a multiple of 8 */
			const int r = q / S;

			ahead(q);
			bar_wait(&full[st], parity);
			if (r % DN_SH_ROWS == 0) {
				bar_wait(shb, 0);
				pair_tile<FS, W>(
					ms, shared_tile, (const float *)(shared_tile + L.dt[1].wb),
					[&](int c, int kst, uint32_t b[2]) { b_frag(xsh, c * 4 + kst, r / DN_SH_ROWS, nr, lane, b); }, 1.0f,
					acc);
				/* token column 2t + (e & 1) of lane t = lane & 3: row r + that, with its weight */
#pragma unroll
				for (int e = 0; e < 4; e++) {
					const int rr = r + 2 * (lane & 3) + (e & 1);

					if (rr < nr)
						red[(rr * S + k) * Q3G_TILE_N + (lane >> 2) + 8 * (e >> 1)] =
							sx[rr * S + k] == Q3G_SKIP ? 0.0f : acc[0][e] * sw[rr * S + k];
				}
			}
			next_stage();
			continue;
		}
		uint8_t *p = ring + (size_t)st * L.stage;

		if (ex != Q3G_SKIP) {
			const struct q3g_mat &m = L.a.mat[0];

			/* the activations' loads before the wait: they overlap the tile's copy */
			if (pf)
				act_store<DN_PF>(aw, nx, slot);
			else
				stage_act(aw, an, m.perm ? m.perm + (size_t)ex * m.perm_stride : NULL, m.K, m.nchunks);
			ahead(q);
			__syncwarp();
			bar_wait(&full[st], parity);
			/* every token column reads column 0's words: only column 0 is kept */
			pair_tile<FR, W>(
				m, p, (const float *)(p + L.dt[0].wb),
				[&](int c, int kst, uint32_t b[2]) {
					const uint2 bv = *(const uint2 *)(aw + c * 32 + kst * 8 + (lane & 3) * 2);

					b[0] = bv.x;
					b[1] = bv.y;
				},
				sw[q], acc);
		} else {
			ahead(q);
			bar_wait(&full[st], parity);
		}
		next_stage();
		if (!(lane & 3)) {
			red[q * Q3G_TILE_N + (lane >> 2)] = acc[0][0];
			red[q * Q3G_TILE_N + (lane >> 2) + 8] = acc[0][2];
		}
	}
	if (threadIdx.x == 0)
		bar_wait(shb, 0); /* no copy may land in the shared memory of a block that has left */
	__syncthreads();
	for (int i = threadIdx.x; i < nr * Q3G_TILE_N; i += blockDim.x) {
		const int r = i / Q3G_TILE_N, row = tile * Q3G_TILE_N + i % Q3G_TILE_N;
		float v = 0.0f;

		for (int s = 0; s < S; s++) /* slot order: the same sum at any batch size */
			v += red[(r * S + s) * Q3G_TILE_N + i % Q3G_TILE_N];
		if (row < L.a.H)
			L.a.h[(size_t)(r0 + r) * L.a.H + row] += v;
	}
#endif
}

typedef void (*moe_down_fn)(const down_launch);

static moe_down_fn down_kernel_for(int fr, int fs, bool whole)
{
	static const moe_down_fn t[2][3][3] = { Q3G_FMT_PAIRS(moe_down_kernel, false),
						Q3G_FMT_PAIRS(moe_down_kernel, true) };

	return t[whole][fr][fs];
}

bool q3g_moe_down_force_regs;

extern "C" int q3g_moe_down(float *h, const uint16_t *act, const int *idx, const float *w,
			    const struct q3g_mat *down, const struct q3g_mat *sdown, int R, int k, int H, int lda,
			    q3g_stream st, q3_err *e)
{
	down_launch L;
	size_t fixed;

	if (k < 1 || k > Q3G_ROUTER_MAX_K)
		return q3_errf(e, -EINVAL, "moe down: %d experts per token (up to %d)", k, Q3G_ROUTER_MAX_K);
	if (down->N != H || sdown->N != H || down->ntiles != sdown->ntiles)
		return q3_errf(e, -EINVAL, "moe down: output rows %d / %d, hidden %d", down->N, sdown->N, H);
	if (Q3_MAX(down->K, sdown->K) > lda || (lda & 1))
		return q3_errf(e, -EINVAL, "moe down: activations of %d / %d inputs in rows of %d halves (an even count)",
			       down->K, sdown->K, lda);
	if (R < 1)
		return 0;
	const struct q3g_down_args a = { { *down, *sdown }, act, idx, w, h, k, H, lda, R };

	if (q3g_dev.cc < 90 || q3g_moe_down_force_regs || !tiles_copyable(down) || !tiles_copyable(sdown))
		return q3g_moe_down_regs(&a, (cudaStream_t)st, e);
	memset(&L, 0, sizeof(L));
	L.a = a;
	L.dt[0] = bulk_tile_of(down);
	L.dt[1] = bulk_tile_of(sdown);
	const int S = k + 1, nch = Q3_MAX(down->nchunks, sdown->nchunks);

	L.stage = align128(L.dt[0].bytes);
	L.o_sx = align128(DN_MAX_STAGES * 8 + 8);
	L.o_red = L.o_sx + align128((size_t)DN_ROWS * S * 9); /* sx, sw, shs */
	L.o_aw = L.o_red + align128((size_t)DN_ROWS * S * Q3G_TILE_N * 4);
	L.o_xsh = L.o_aw + align128((size_t)DN_CWARPS * nch * 32 * 4);
	L.o_sh = L.o_xsh + align128((size_t)DN_ROWS * sdown->nchunks * Q3G_KCHUNK * 2);
	L.o_ring = L.o_sh + align128(L.dt[1].bytes);
	fixed = L.o_ring;
	L.nst = fixed + 2 * (size_t)L.stage <= q3g_dev.smem_dyn
			? (int)Q3_MIN((size_t)DN_MAX_STAGES, (q3g_dev.smem_dyn - fixed) / L.stage)
			: 0;
	L.ncw = Q3_MIN(DN_CWARPS, L.nst);
	if (L.ncw)
		L.nst -= L.nst % L.ncw;
	if (L.nst < 2) /* tiles too large for two stages: the kernel without them */
		return q3g_moe_down_regs(&a, (cudaStream_t)st, e);
	const bool whole = q3g_whole_groups(down) && q3g_whole_groups(sdown);

	CUDA_CHECK(e, q3g_launch(down_kernel_for(down->fmt, sdown->fmt, whole), dim3(down->ntiles, cdiv(R, DN_ROWS)), DN_THREADS,
				 fixed + (size_t)L.nst * L.stage, (cudaStream_t)st, L));
	return 0;
}

int q3g_moe_down_init(q3_err *e)
{
	int err;

	for (int w = 0; w < 2; w++)
		for (int fr = 0; fr < 3; fr++)
			for (int fs = 0; fs < 3; fs++)
				if ((err = q3g_allow_dyn_smem(down_kernel_for(fr, fs, w), "moe_down_kernel", e)))
					return err;
	return q3g_moe_down_regs_init(e);
}
