/* gpu_moe_up.cu - the decode experts' gate and up projections on sm_90 through a ring of
 * bulk-copied tiles (bulk.cuh), as gpu_moe_down.cu does for down.  Opt-in until measured: q3g_moe_up
 * takes this path where QWEN3D_UP_BULK=1 (or q3g_moe_up_bulk is set, as test_ops does), for the
 * fp16 input rows (q3g_moe_up; q3g_moe_up_norm keeps gpu_moe.cu's kernel).
 *
 * A block owns one 16-row output tile of gate or of up, for the pairs of a group of slots, for up
 * to 16 rows of the batch: 2 x 32 tiles x 2 slot groups = 128 blocks at the real shapes.  A pair
 * needs its expert's tile (K = 2048 inputs: 16 KB at int4, with its scales, zero points and the
 * act-order permutation of its inputs); the producer thread bulk-copies each routed pair's into
 * a stage, the shared expert's once.  The block stages its rows of x once (fp16, in input order);
 * a consumer warp gathers a pair's row through the pair's permutation into B-fragment order (aw)
 * and runs the tile's k-steps from shared memory.  Each output element is stored by one lane:
 * deterministic, and the same at any batch size.
 */
#include "gpu_internal.h"
#include "bulk.cuh"

#define UP_CWARPS 16			 /* consumer warps at most */
#define UP_THREADS ((UP_CWARPS + 1) * 32) /* and the producer's warp */
#define UP_ROWS Q3G_MMV_MAX_TOK		 /* batch rows a block */
#define UP_MAX_STAGES 32

bool q3g_moe_up_bulk;

struct up_launch {
	struct q3g_mat mat[4]; /* gate, up, shared gate, shared up */
	struct bulk_tile dt[4];
	const uint16_t *x;
	const int *idx;
	float *gu;
	int k, H, ldgu, R;
	int T;	     /* output tiles of a matrix (the larger of routed and shared) */
	int spg;     /* slots a group */
	int Kp;	     /* staged inputs of a row (whole chunks) */
	int nst;     /* ring stages, a multiple of ncw */
	int ncw;     /* consumer warps taking pairs */
	uint32_t stage, pb; /* bytes of a stage; of a permutation (0: none) */
	uint32_t o_sx, o_x, o_aw, o_sh, o_ring; /* offsets in dynamic shared memory */
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* Row xr (fp16, Kp inputs, zeros from K on) gathered through perm (NULL: in order) into aw in
 * pair_tile's order. */
static __device__ __forceinline__ void gather_row(uint32_t *aw, const uint16_t *xr, const uint16_t *perm, int K, int nch)
{
	const int lane = threadIdx.x & 31, slot = aw_slot(lane);

	for (int c = 0; c < nch; c++) {
		const int kin = c * Q3G_KCHUNK + 2 * lane;
		uint32_t w;

		if (perm) {
			const uint32_t pw = *(const uint32_t *)(perm + kin);
			const int ka = pw & 0xffff, kb = pw >> 16;

			w = (uint32_t)(ka < K ? xr[ka] : 0) | (uint32_t)(kb < K ? xr[kb] : 0) << 16;
		} else {
			w = *(const uint32_t *)(xr + kin);
		}
		aw[c * 32 + slot] = w;
	}
}
#endif

/* FR: the routed experts' weight format, FS: the shared expert's.  Block (which · T + tile, slot
 * group, row group).  Pair q = r·ns + j of the block is row r, slot s0 + j: stage q mod nst,
 * consumer warp q mod ncw.  The shared expert's pairs, the slots the CPU computes (Q3G_SKIP) and
 * tiles past a matrix's rows pass through the ring empty. */
template <int FR, int FS>
__global__ void __launch_bounds__(UP_THREADS, 1) moe_up_bulk_kernel(const __grid_constant__ up_launch L)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	extern __shared__ __align__(128) uint8_t sm[];
	uint64_t *full = (uint64_t *)sm, *empty = full + UP_MAX_STAGES, *shb = empty + UP_MAX_STAGES;
	const int which = blockIdx.x / L.T, tile = blockIdx.x % L.T, k = L.k, S = k + 1;
	const int s0 = blockIdx.y * L.spg, ns = min(S, s0 + L.spg) - s0;
	const int r0 = blockIdx.z * UP_ROWS, nr = min(UP_ROWS, L.R - r0), np = nr * ns;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const bool has_shared = s0 + ns == S && tile < L.mat[2 + which].ntiles;
	int *sx = (int *)(sm + L.o_sx);
	uint16_t *xs = (uint16_t *)(sm + L.o_x);
	uint8_t *shared_tile = sm + L.o_sh, *ring = sm + L.o_ring;

	pdl_trigger();
	if (threadIdx.x == 0)
		ring_init(full, empty, L.nst, shb);
	pdl_wait();
	for (int i = threadIdx.x; i < np; i += blockDim.x)
		sx[i] = L.idx[(size_t)(r0 + i / ns) * S + s0 + i % ns];
	__syncthreads();
	if (warp == UP_CWARPS) { /* the producer: one thread */
		if (lane == 0) {
			const struct q3g_mat &mr = L.mat[which];
			const struct bulk_tile &dr = L.dt[which];

			if (has_shared) {
				const struct q3g_mat &ms = L.mat[2 + which];
				const uint32_t pb = ms.perm ? L.pb : 0;

				bar_expect(shb, L.dt[2 + which].bytes + pb);
				copy_tile(shared_tile, ms, L.dt[2 + which], 0, tile, shb);
				if (pb)
					bulk_copy(shared_tile + L.dt[2 + which].bytes, ms.perm, pb, shb);
			}
			for (int q = 0; q < np; q++) {
				const int st = q % L.nst, ex = sx[q];
				uint8_t *p = ring + (size_t)st * L.stage;

				if (q >= L.nst)
					bar_wait(&empty[st], (q / L.nst - 1) & 1);
				if (s0 + q % ns == k || ex == Q3G_SKIP || tile >= mr.ntiles) {
					bar_arrive(&full[st]);
					continue;
				}
				const uint32_t pb = mr.perm ? L.pb : 0;

				bar_expect(&full[st], dr.bytes + pb);
				copy_tile(p, mr, dr, ex, tile, &full[st]);
				if (pb)
					bulk_copy(p + dr.bytes, mr.perm + (size_t)ex * mr.perm_stride, pb, &full[st]);
			}
		}
		return; /* the bulk copies complete into the barriers: no one waits for this warp */
	}
	/* the rows of x, in input order, zeros from K to Kp (the producer's copies are under way) */
	for (int i = threadIdx.x; i < nr * (L.Kp / 2); i += UP_CWARPS * 32) {
		const int r = i / (L.Kp / 2), c = 2 * (i % (L.Kp / 2));
		const uint16_t *xr = L.x + (size_t)(r0 + r) * L.H;

		((uint32_t *)xs)[i] = (uint32_t)(c < L.H ? xr[c] : 0) | (uint32_t)(c + 1 < L.H ? xr[c + 1] : 0) << 16;
	}
	asm volatile("bar.sync 1, %0;\n" ::"n"(UP_CWARPS * 32) : "memory");
	if (warp >= L.ncw)
		return;
	uint32_t *aw = (uint32_t *)(sm + L.o_aw) + warp * 32 * (L.Kp / Q3G_KCHUNK);

	for (int q = warp; q < np; q += L.ncw) {
		const int r = q / ns, s = s0 + q % ns, ex = sx[q], st = q % L.nst;
		const bool sh = s == k;
		const struct q3g_mat &m = L.mat[2 * sh + which];
		const uint32_t tb = L.dt[2 * sh + which].bytes;
		const uint8_t *t = sh ? shared_tile : ring + (size_t)st * L.stage;
		float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };

		bar_wait(&full[st], (q / L.nst) & 1);
		if (ex != Q3G_SKIP && tile < m.ntiles) {
			if (sh)
				bar_wait(shb, 0);
			gather_row(aw, xs + (size_t)r * L.Kp, m.perm ? (const uint16_t *)(t + tb) : NULL, m.K, m.nchunks);
			__syncwarp();
			if (sh)
				pair_tile<FS>(m, t, (const float *)(t + L.dt[2 * sh + which].wb), aw, 1.0f, acc);
			else
				pair_tile<FR>(m, t, (const float *)(t + L.dt[which].wb), aw, 1.0f, acc);
			if (!(lane & 3)) {
				const int row = tile * Q3G_TILE_N + (lane >> 2);
				float *o = L.gu + ((size_t)(r0 + r) * S + s) * L.ldgu + (size_t)which * (L.ldgu / 2);

				if (row < m.N)
					o[row] = acc[0][0];
				if (row + 8 < m.N)
					o[row + 8] = acc[0][2];
			}
		}
		__syncwarp(); /* every lane is done with the stage and aw */
		if (lane == 0)
			bar_arrive(&empty[st]);
	}
#endif
}

typedef void (*moe_up_bulk_fn)(const up_launch);

static moe_up_bulk_fn up_bulk_kernel_for(int fr, int fs)
{
	static const moe_up_bulk_fn t[3][3] = Q3G_FMT_PAIRS(moe_up_bulk_kernel);

	return t[fr][fs];
}

/* 1 where this path does not apply (the caller runs gpu_moe.cu's kernel), else 0 or -errno. */
int q3g_moe_up_bulk_run(float *gu, const uint16_t *x, const int *idx, const struct q3g_mat *const m[4], int R, int k,
			int H, int ldgu, cudaStream_t st, q3_err *e)
{
	up_launch L;
	const int S = k + 1, rows = Q3_MIN(R, UP_ROWS);
	size_t fixed, avail, per_warp;

	if (!q3g_moe_up_bulk || q3g_dev.cc < 90 || R < 1)
		return 1;
	for (int i = 0; i < 4; i++)
		if (!tiles_copyable(m[i]) || m[i]->K != H || (m[i]->perm && m[i]->nchunks != m[0]->nchunks))
			return 1;
	memset(&L, 0, sizeof(L));
	for (int i = 0; i < 4; i++) {
		L.mat[i] = *m[i];
		L.dt[i] = bulk_tile_of(m[i]);
	}
	L.x = x;
	L.idx = idx;
	L.gu = gu;
	L.k = k;
	L.H = H;
	L.ldgu = ldgu;
	L.R = R;
	L.T = Q3_MAX(m[0]->ntiles, m[2]->ntiles);
	L.Kp = Q3_MAX(m[0]->nchunks, m[2]->nchunks) * Q3G_KCHUNK;
	L.pb = (m[0]->perm || m[2]->perm) ? (uint32_t)L.Kp * 2 : 0;
	/* slot groups from the shapes and the device alone (never from R): about a block an SM */
	const int pg = Q3_MAX(1, Q3_MIN(S, q3g_dev.sms / (2 * L.T)));

	L.spg = cdiv(S, pg);
	L.stage = align128(Q3_MAX(L.dt[0].bytes, L.dt[1].bytes) + L.pb);
	L.o_sx = align128(2 * UP_MAX_STAGES * 8 + 8);
	L.o_x = L.o_sx + align128((size_t)UP_ROWS * S * 4);
	L.o_sh = L.o_x + align128((size_t)rows * L.Kp * 2);
	L.o_aw = L.o_sh + align128(Q3_MAX(L.dt[2].bytes, L.dt[3].bytes) + L.pb);
	fixed = L.o_aw;
	per_warp = (size_t)L.Kp / Q3G_KCHUNK * 128; /* aw */
	avail = q3g_dev.smem_dyn > fixed ? q3g_dev.smem_dyn - fixed : 0;
	/* a stage and an aw area for each consumer warp, then more stages per warp while they fit */
	L.ncw = (int)Q3_MIN((size_t)UP_CWARPS, avail / (per_warp + L.stage));
	if (L.ncw < 1)
		return 1;
	L.nst = L.ncw * (int)Q3_MIN((size_t)(UP_MAX_STAGES / L.ncw), (avail - L.ncw * per_warp) / ((size_t)L.ncw * L.stage));
	L.o_ring = L.o_aw + align128((size_t)L.ncw * per_warp);
	CUDA_CHECK(e, q3g_launch(up_bulk_kernel_for(m[0]->fmt, m[2]->fmt), dim3(2 * L.T, cdiv(S, L.spg), cdiv(R, UP_ROWS)),
				 UP_THREADS, (size_t)L.o_ring + (size_t)L.nst * L.stage, st, L));
	return 0;
}

int q3g_moe_up_bulk_init(q3_err *e)
{
	const char *env = getenv("QWEN3D_UP_BULK");
	int err;

	if (env && !strcmp(env, "1"))
		q3g_moe_up_bulk = true;
	for (int fr = 0; fr < 3; fr++)
		for (int fs = 0; fs < 3; fs++)
			if ((err = q3g_allow_dyn_smem(up_bulk_kernel_for(fr, fs), "moe_up_bulk_kernel", e)))
				return err;
	return 0;
}
