/* gpu_moe_down_regs.cu - the decode experts' down projection before sm_90 (no bulk copies; also
 * where a tile does not fit two stages of gpu_moe_down.cu's ring): the weights go through
 * registers, a few chunks a warp in flight at a time.  Same contract as q3g_moe_down (gpu.h);
 * test_ops runs it on sm_90 too (q3g_moe_down_force_regs).
 */
#include "gpu_internal.h"
#include "mma_frag.cuh"

struct moe_down_launch {
	struct q3g_down_args a;
	int per;    /* (slot, chunk) items of a row each warp takes */
	int gcs[2]; /* chunk_group_shift of each matrix */
};

/* 16 warps a block, for every R (a row's sums must not depend on its batch): a warp runs its
 * items in batches whose loads are in flight together (32 warps of 64 registers spilled).  A
 * block owns one output row tile for DOWN_ROWS rows of the batch; each warp runs the same share
 * of every row's (slot, chunk) items, row after row. */
#define DOWN_THREADS 512
#define DOWN_WARPS (DOWN_THREADS / 32)
#define DOWN_ROWS Q3G_MMV_MAX_TOK

/* The scale group of chunk c: by a shift where groups are whole chunks of a power-of-two count
 * (gcs = log2(chunks a group), every GPTQ group of 64 inputs or more), else by a division. */
static __device__ __forceinline__ int chunk_group(const struct q3g_mat &m, int gcs, int c)
{
	return gcs >= 0 ? c >> gcs : (c * 4) / m.gsteps;
}

/* gcs of chunk_group for m (host), -1 where a group is not a power-of-two run of whole chunks. */
static int chunk_group_shift(const struct q3g_mat *m)
{
	int cpg = m->gsteps / 4, sh = 0;

	if (m->fmt == Q3G_F16 || m->gsteps % 4 || (cpg & (cpg - 1)))
		return -1;
	while ((1 << sh) < cpg)
		sh++;
	return sh;
}

/* k-step st of an item: the B fragment (token column 0) from lanes 8st + t and 8st + 4 + t. */
template <int FMT>
static __device__ __forceinline__ void down_step(const uint4 *w, int st, const zconst &zc, uint32_t P, float accg[1][4])
{
	const int lane = threadIdx.x & 31, t = lane & 3;
	uint32_t a[4], b[2];

	a_frag<FMT>(w, st, zc, a);
	b[0] = __shfl_sync(0xffffffffu, P, 8 * st + t);
	b[1] = __shfl_sync(0xffffffffu, P, 8 * st + 4 + t);
	if (lane >= 4)
		b[0] = b[1] = 0; /* token columns 1-7: no row */
	mma_f16(accg[0], a, b);
}

/* One (slot, chunk) item: the chunk's four k-steps of the slot's matrix against the lane pairs P
 * (act_pair), the partial sums of each scale group scaled by the group's scale times wt (the
 * slot's routing weight) into acc; token column 0 only (lanes 0-3 carry the B fragment). */
template <int FMT>
static __device__ __forceinline__ void down_item(const struct q3g_mat &m, int gcs, const float *zr, int mi, int tile,
						 int c, const uint4 *w, uint32_t P, float wt, float acc[1][4], float s0,
						 float s1)
{
	const int lane = threadIdx.x & 31;
	const size_t szb = (size_t)mi * m.sz_stride;
	float accg[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };
	zconst zc = FMT == Q3G_F16 ? zconst{ 0, 0 } : sym_zconst<FMT>();

	/* the first group's scales came with the weights (s0, s1); zero points (asym, zr: the
	 * lane's rows of the tile) here */
	if (FMT != Q3G_F16 && zr) {
		const int grp = chunk_group(m, gcs, c);

		zc = make_zconst<FMT>(zr[grp * Q3G_TILE_N], zr[grp * Q3G_TILE_N + 8]);
	}
	if (FMT != Q3G_F16 && gcs < 0) { /* groups that end inside a chunk */
#pragma unroll
		for (int st = 0; st < 4; st++) {
			if (st > 0 && (c * 4 + st) % m.gsteps == 0) {
				flush_group<1>(acc, accg, s0 * wt, s1 * wt, true);
				group_consts<FMT>(m, szb, tile, (c * 4 + st) / m.gsteps, lane, s0, s1, zc);
			}
			down_step<FMT>(w, st, zc, P, accg);
		}
	} else { /* one group for the whole chunk: no test per k-step */
#pragma unroll
		for (int st = 0; st < 4; st++)
			down_step<FMT>(w, st, zc, P, accg);
	}
	flush_group<1>(acc, accg, s0 * wt, s1 * wt, false);
}

/* This warp's sums of rows g and g + 8 of the tile (token column 0: lanes t = 0) for row rr. */
static __device__ __forceinline__ void down_flush(float *red, int rr, const float acc[1][4])
{
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

	if (!(lane & 3)) {
		red[(rr * DOWN_WARPS + warp) * 16 + (lane >> 2)] = acc[0][0];
		red[(rr * DOWN_WARPS + warp) * 16 + (lane >> 2) + 8] = acc[0][2];
	}
}

/* FR: the routed experts' format, FS: the shared expert's.  Slot s < k of a row owns items
 * [s·ncr, (s+1)·ncr) (chunks of the routed stack's expert), slot k the shared expert's after them;
 * a slot the CPU computes (Q3G_SKIP, offload) is left out.  Each warp takes the same items of
 * every row (L.per of them), row after row, flattened into batches of UB items that may span rows
 * (a batch of one row's items alone ran 20% slower at R = 16). */
template <int FR, int FS>
__global__ void __launch_bounds__(DOWN_THREADS, 1) moe_down_regs_kernel(const __grid_constant__ moe_down_launch L)
{
	/* UB items in flight with their scales and activations: 3 at int4, 8 / loads per item
	 * otherwise.  The kernel is bound by instructions fetched and issued, not bytes in flight
	 * (ncu: 1,800 instructions a warp, waits for instructions the first stall): six items a batch
	 * (128 registers) ran 100.2 us at R = 16 and 8.56 at R = 1, three 90.1 and 8.30, two 92.6
	 * and 8.52 (H200, int4 routed and shared experts) */
	constexpr int LR = fmt_traits<FR>::LPC, LS = fmt_traits<FS>::LPC, LM = LR > LS ? LR : LS;
	constexpr int UB = LM == 1 ? 3 : 8 / LM;
	extern __shared__ float red[]; /* [DOWN_ROWS][DOWN_WARPS][16] each warp's sums; then ids, weights */
	pdl_trigger();
	pdl_wait();
	const int tile = blockIdx.x, r0 = blockIdx.y * DOWN_ROWS, nr = min(DOWN_ROWS, L.a.R - r0), S = L.a.k + 1, k = L.a.k;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const struct q3g_mat &mr = L.a.mat[0], &ms = L.a.mat[1];
	const int ncr = mr.nchunks, total = k * ncr + ms.nchunks;
	const int i0 = min(total, warp * L.per), cnt = min(total, i0 + L.per) - i0, n = nr * cnt;
	int *sx = (int *)(red + DOWN_ROWS * DOWN_WARPS * 16);
	float *sw = (float *)(sx + DOWN_ROWS * S);

	for (int i = threadIdx.x; i < nr * S; i += blockDim.x) {
		sx[i] = L.a.idx[(size_t)r0 * S + i];
		sw[i] = L.a.w[(size_t)r0 * S + i];
	}
	__syncthreads();
	float acc[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };
	int cur = 0;
	/* the next item to load, counted forward (a division per item costs more than its mma):
	 * row nrw, slot ns, chunk nc, the warp's nj-th item of the row; the warp's first item is
	 * slot sf, chunk cf */
	const int sf = i0 >= k * ncr ? k : i0 / ncr, cf = i0 >= k * ncr ? i0 - k * ncr : i0 % ncr;
	int nrw = 0, ns = sf, nc = cf, nj = 0;

	for (int q0 = 0; q0 < n; q0 += UB) {
		uint4 w[UB][LM];
		float s0[UB], s1[UB];
		uint32_t x[UB]; /* the items' activations, fp16x2 */
		int dsc[UB]; /* chunk | slot << 12 | row << 20; row nr: past the end */

#pragma unroll
		for (int u = 0; u < UB; u++) {
			dsc[u] = nc | ns << 12 | nrw << 20;
			if (++nj == cnt) {
				nj = 0, nrw++, ns = sf, nc = cf;
			} else if (++nc == ncr && ns < k) {
				ns++, nc = 0;
			}
		}
		/* the weights of UB items, their first groups' scales and their activations, all in
		 * flight at once (a scale loaded when its item starts would cost a round trip per item) */
#pragma unroll
		for (int u = 0; u < UB; u++) {
			const int rr = dsc[u] >> 20, s = (dsc[u] >> 12) & 255, c = dsc[u] & 4095;
			const bool sh = s == k;

			s0[u] = s1[u] = 1.0f;
			if (rr < nr && sx[rr * S + s] != Q3G_SKIP) {
				const int mi = sh ? 0 : sx[rr * S + s];
				const struct q3g_mat &m = L.a.mat[sh];
				const uint8_t *p = (const uint8_t *)m.data + (size_t)mi * m.data_stride +
						   ((size_t)tile * m.nchunks + c) * (sh ? fmt_traits<FS>::CB : fmt_traits<FR>::CB) +
						   lane * 16;
#pragma unroll
				for (int qq = 0; qq < LM; qq++)
					if (qq < (sh ? LS : LR))
						w[u][qq] = ldg_stream(p + qq * 512);
				if ((sh ? FS : FR) != Q3G_F16) {
					size_t si = (size_t)mi * m.sz_stride +
						    ((size_t)tile * m.ngroups + chunk_group(m, L.gcs[sh], c)) * Q3G_TILE_N +
						    (lane >> 2);

					s0[u] = m.scales[si];
					s1[u] = m.scales[si + 8];
				}
				/* lane l: inputs 64c + 2l, + 1; k-step st's B fragment is then lanes 8st + t and
				 * 8st + 4 + t of the warp */
				x[u] = act_pair(L.a.act + ((size_t)(r0 + rr) * S + s) * L.a.lda,
						m.perm ? m.perm + (size_t)mi * m.perm_stride : NULL, m.K, c * Q3G_KCHUNK + 2 * lane);
			}
		}
#pragma unroll
		for (int u = 0; u < UB; u++) {
			const int rr = dsc[u] >> 20, s = (dsc[u] >> 12) & 255, c = dsc[u] & 4095;

			if (rr >= nr)
				break;
			if (rr != cur) { /* the warp's share of row cur is done */
				down_flush(red, cur, acc);
				acc[0][0] = acc[0][1] = acc[0][2] = acc[0][3] = 0.0f;
				cur = rr;
			}
			if (sx[rr * S + s] == Q3G_SKIP)
				continue; /* the CPU's expert (offload) */
			const uint32_t P = x[u];
			const int mi = s == k ? 0 : sx[rr * S + s];
			const struct q3g_mat &m = L.a.mat[s == k];
			const float *zr = m.zeros ? m.zeros + (size_t)mi * m.sz_stride + (size_t)tile * m.ngroups * Q3G_TILE_N +
							    (lane >> 2)
						  : NULL;

			if (s == k)
				down_item<FS>(ms, L.gcs[1], zr, 0, tile, c, w[u], P, sw[rr * S + k], acc, s0[u], s1[u]);
			else
				down_item<FR>(mr, L.gcs[0], zr, mi, tile, c, w[u], P, sw[rr * S + s], acc, s0[u], s1[u]);
		}
	}
	if (cnt > 0)
		down_flush(red, cur, acc);
	__syncthreads();
	/* each output element by one thread, the warps' sums in a fixed order: deterministic */
	for (int i = threadIdx.x; i < nr * 16; i += blockDim.x) {
		const int rr = i >> 4, row = tile * Q3G_TILE_N + (i & 15);
		float v = 0.0f;

		for (int ww = 0; ww < DOWN_WARPS && ww * L.per < total; ww++)
			v += red[(rr * DOWN_WARPS + ww) * 16 + (i & 15)];
		if (row < L.a.H)
			L.a.h[(size_t)(r0 + rr) * L.a.H + row] += v;
	}
}

typedef void (*moe_down_fn)(const moe_down_launch);

static moe_down_fn down_kernel_for(int fr, int fs)
{
	static const moe_down_fn t[3][3] = Q3G_FMT_PAIRS(moe_down_regs_kernel);

	return t[fr][fs];
}

static size_t down_smem(int k)
{
	return (size_t)DOWN_ROWS * DOWN_WARPS * 16 * 4 + (size_t)DOWN_ROWS * (k + 1) * 8;
}

int q3g_moe_down_regs(const struct q3g_down_args *a, cudaStream_t st, q3_err *e)
{
	const struct q3g_mat *down = &a->mat[0], *sdown = &a->mat[1];
	const int k = a->k;
	moe_down_launch L;

	/* the arguments were checked by q3g_moe_down; this kernel's own limit: */
	if (Q3_MAX(down->nchunks, sdown->nchunks) > 4095)
		return q3_errf(e, -EINVAL, "moe down: %d inputs (the kernel takes up to %d)", Q3_MAX(down->K, sdown->K),
			       4095 * Q3G_KCHUNK);
	memset(&L, 0, sizeof(L));
	L.a = *a;
	L.gcs[0] = chunk_group_shift(down);
	L.gcs[1] = chunk_group_shift(sdown);
	L.per = cdiv(k * down->nchunks + sdown->nchunks, DOWN_WARPS);
	moe_down_fn fn = down_kernel_for(down->fmt, sdown->fmt);
	/* DOWN_ROWS 16: with 8, 4, 2, 1 rows a block (more blocks) 97, 100, 105, 115 us at R = 16 */
	CUDA_CHECK(e, q3g_launch(fn, dim3(down->ntiles, cdiv(a->R, DOWN_ROWS)), DOWN_THREADS, down_smem(k),
				 st, L));
	return 0;
}

int q3g_moe_down_regs_init(q3_err *e)
{
	int err;

	for (int fr = 0; fr < 3; fr++)
		for (int fs = 0; fs < 3; fs++)
			if ((err = q3g_allow_dyn_smem(down_kernel_for(fr, fs), "moe_down_regs_kernel", e)))
				return err;
	return 0;
}
