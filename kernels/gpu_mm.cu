/* gpu_mm.cu - the MoE block of prefill: (row, slot) pairs grouped by expert, then grouped
 * tensor-core GEMMs that read each active expert's int4 weights once per 64 of its tokens.
 *
 *   sort      count the pairs of each expert (the shared expert is group E), exclusive scan,
 *             a work list of (group, first sorted pair, count <= 64) tiles, scatter the pairs;
 *   up        block (tile, 128 rows of gate or up): gu[pair] = x[row]·Wᵀ, fp32;
 *   down      block (tile, 128 output rows): y[pair] = w[pair] · (silu(gate) ⊙ up)·W_downᵀ;
 *   combine   h[row] += Σ_slots y[row·(k+1) + slot], in slot order (deterministic).
 * The GEMM blocks stage Q3G_MM_TOK token rows x Q3G_MM_KTILE inputs in shared memory (B fragments,
 * gathered through the matrix's act-order permutation) and run the same chunk loop as the
 * matvec (mma_frag.cuh) over that window, with 8 token tiles per A fragment.
 */
#include "gpu_internal.h"
#include "mma_frag.cuh"

#define MM_KT 256 /* inputs per staged window */

struct mm_ws {
	int *count, *offset, *fill, *ntiles, *sorted;
	int4 *tiles;
	float *gu, *y;
	int maxtiles;
};

static size_t a256(size_t x)
{
	return (x + 255) & ~(size_t)255;
}

static void ws_layout(void *base, int R, const struct q3g_dims *d, struct mm_ws *w, size_t *total)
{
	int G = d->E + 1, P = R * (d->topk + 1), Imax = Q3_MAX(d->I, d->Is);
	char *c = (char *)base;
	size_t off = 0;

	w->maxtiles = P / Q3G_MM_TOK + G + 1;
#define TAKE(field, type, n)                            \
	do {                                            \
		w->field = (type)(c ? c + off : NULL); \
		off += a256(n);                         \
	} while (0)
	TAKE(count, int *, sizeof(int) * (G + 1));
	TAKE(offset, int *, sizeof(int) * (G + 1));
	TAKE(fill, int *, sizeof(int) * (G + 1));
	TAKE(ntiles, int *, sizeof(int));
	TAKE(sorted, int *, sizeof(int) * P);
	TAKE(tiles, int4 *, sizeof(int4) * w->maxtiles);
	TAKE(gu, float *, sizeof(float) * (size_t)P * 2 * Imax);
	TAKE(y, float *, sizeof(float) * (size_t)P * d->H);
#undef TAKE
	*total = off;
}

extern "C" size_t q3g_moe_prefill_scratch(int R, const struct q3g_dims *d)
{
	struct mm_ws w;
	size_t total;

	ws_layout(NULL, R, d, &w, &total);
	return total;
}

/* ---- sort ------------------------------------------------------------------------------------ */

__global__ void mm_count_kernel(int *count, const int *idx, int P, int E)
{
	int p = blockIdx.x * blockDim.x + threadIdx.x;

	if (p < P) {
		int ex = idx[p];

		if (ex != Q3G_SKIP)
			atomicAdd(&count[ex < 0 ? E : ex], 1);
	}
}

/* One block: exclusive scan of G counts (G <= blockDim.x), the tile list, fill = offset. */
__global__ void mm_scan_kernel(const int *count, int *offset, int *fill, int4 *tiles, int *ntiles, int G)
{
	__shared__ int s[1024 + 1];
	__shared__ int t[1024 + 1];
	int g = threadIdx.x;
	int c = g < G ? count[g] : 0, nt = (c + Q3G_MM_TOK - 1) / Q3G_MM_TOK;

	s[g] = c;
	t[g] = nt;
	__syncthreads();
	/* Hillis-Steele inclusive scans of counts and tile counts */
	for (int o = 1; o < blockDim.x; o <<= 1) {
		int a = g >= o ? s[g - o] : 0, b = g >= o ? t[g - o] : 0;

		__syncthreads();
		s[g] += a;
		t[g] += b;
		__syncthreads();
	}
	int off = s[g] - c, toff = t[g] - nt;

	if (g < G) {
		offset[g] = off;
		fill[g] = off;
		for (int i = 0; i < nt; i++)
			tiles[toff + i] = make_int4(g, off + i * Q3G_MM_TOK, min(Q3G_MM_TOK, c - i * Q3G_MM_TOK), 0);
	}
	if (g == blockDim.x - 1)
		*ntiles = t[g];
}

__global__ void mm_scatter_kernel(int *sorted, int *fill, const int *idx, int P, int E)
{
	int p = blockIdx.x * blockDim.x + threadIdx.x;

	if (p < P) {
		int ex = idx[p];

		if (ex != Q3G_SKIP)
			sorted[atomicAdd(&fill[ex < 0 ? E : ex], 1)] = p;
	}
}

/* ---- grouped GEMM ----------------------------------------------------------------------------- */

struct mm_launch {
	struct q3g_mat mat[4];	/* [shared][which]: the experts' stacks and the shared expert's
				 * matrices; which = 1 (up mode, blocks.y >= nb) are the up ones */
	const int4 *tiles;
	const int *ntiles, *sorted;
	const uint16_t *x;	/* up: fp16 [R][H] */
	const uint16_t *xp;	/* up, or NULL: the pairs' rows in act-order, [sorted position][ldxp]
				 * (mm_permute_kernel), instead of x gathered through the permutation */
	int ldxp;
	const float *gu;	/* down: [P][ldgu] */
	const float *wt;	/* down: routing weight per pair */
	float *out;		/* up: gu; down: y */
	int E, S, H, ldgu, ldout, nb; /* S = k + 1; nb: row blocks per matrix */
	bool down;
	bool shared;		/* this launch takes the shared expert's tiles (group E), else the routed ones */
};

/* One launch per weight format: the routed experts' tiles, or the shared expert's (its format
 * may differ), so that each instance holds one format's registers. */
template <int FMT>
__global__ void __launch_bounds__(Q3G_MMV_THREADS, 2) mm_grouped_kernel(const __grid_constant__ mm_launch L)
{
	extern __shared__ uint4 smem[];
	__shared__ int prow[Q3G_MM_TOK];
	const int ti = blockIdx.x;

	if (ti >= *L.ntiles)
		return;
	const int4 tl = L.tiles[ti];
	const int grp = tl.x, start = tl.y, cnt = tl.z;

	if ((grp == L.E) != L.shared)
		return;
	const int which = L.down ? 0 : (int)blockIdx.y / L.nb, nblk = (int)blockIdx.y % L.nb;
	const struct q3g_mat &m = L.mat[2 * L.shared + which];
	const int mi = L.shared ? 0 : grp;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	const int tile = nblk * (Q3G_MM_ROWS / Q3G_TILE_N) + warp;

	if (nblk * (Q3G_MM_ROWS / Q3G_TILE_N) >= m.ntiles)
		return; /* a narrower matrix: the whole block idles */
	uint16_t *xs = (uint16_t *)smem;
	const uint16_t *perm = m.perm ? m.perm + (size_t)mi * m.perm_stride : NULL;
	const uint8_t *wb = (const uint8_t *)m.data + (size_t)mi * m.data_stride;
	float acc[8][4];

	if (threadIdx.x < Q3G_MM_TOK)
		prow[threadIdx.x] = threadIdx.x < cnt ? L.sorted[start + threadIdx.x] : -1;
#pragma unroll
	for (int n = 0; n < 8; n++)
		acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
	for (int k0 = 0; k0 < m.nchunks * Q3G_KCHUNK; k0 += MM_KT) {
		const int kw = min(MM_KT, m.nchunks * Q3G_KCHUNK - k0);

		__syncthreads(); /* the previous window is consumed (and prow is visible) */
		/* a unit: 16 inputs (one mma k-step) of one token row, stored as its four B-fragment
		 * uint2s (32 contiguous bytes); consecutive threads take consecutive rows */
		for (int u = threadIdx.x; u < Q3G_MM_TOK * (kw / 16); u += blockDim.x) {
			const int r = u % Q3G_MM_TOK, ks = u / Q3G_MM_TOK, kb = k0 + 16 * ks, p = prow[r];
			uint32_t pr[8] = { 0, 0, 0, 0, 0, 0, 0, 0 }; /* pr[i]: inputs 2i, 2i + 1 */

			if (p >= 0 && L.down) {
				const float *g = L.gu + (size_t)p * L.ldgu, *up = g + L.ldgu / 2;

				if (!perm && kb + 16 <= m.K && L.ldgu % 8 == 0) {
#pragma unroll
					for (int q = 0; q < 4; q++) {
						float4 a = *(const float4 *)(g + kb + 4 * q), b = *(const float4 *)(up + kb + 4 * q);

						pr[2 * q] = pack_h2(dev_silu(a.x) * b.x, dev_silu(a.y) * b.y);
						pr[2 * q + 1] = pack_h2(dev_silu(a.z) * b.z, dev_silu(a.w) * b.w);
					}
				} else {
					uint16_t pk[16];

					perm_unit(pk, perm, kb);
					perm_unit(pk + 8, perm, kb + 8);
#pragma unroll
					for (int i = 0; i < 8; i++) {
						float v[2];
#pragma unroll
						for (int q = 0; q < 2; q++) {
							const int kk = pk[2 * i + q];

							v[q] = kk < m.K ? dev_silu(g[kk]) * up[kk] : 0.0f;
						}
						pr[i] = pack_h2(v[0], v[1]);
					}
				}
			} else if (p >= 0 && L.xp) {
				const uint16_t *xr = L.xp + (size_t)(start + r) * L.ldxp;
				const uint4 a = *(const uint4 *)(xr + kb), b = *(const uint4 *)(xr + kb + 8);

				pr[0] = a.x, pr[1] = a.y, pr[2] = a.z, pr[3] = a.w;
				pr[4] = b.x, pr[5] = b.y, pr[6] = b.z, pr[7] = b.w;
			} else if (p >= 0) {
				const uint16_t *xr = L.x + (size_t)(p / L.S) * L.H;

				if (!perm && kb + 16 <= m.K && L.H % 8 == 0) {
					uint4 a = *(const uint4 *)(xr + kb), b = *(const uint4 *)(xr + kb + 8);

					pr[0] = a.x, pr[1] = a.y, pr[2] = a.z, pr[3] = a.w;
					pr[4] = b.x, pr[5] = b.y, pr[6] = b.z, pr[7] = b.w;
				} else {
					uint16_t pk[16];

					perm_unit(pk, perm, kb);
					perm_unit(pk + 8, perm, kb + 8);
#pragma unroll
					for (int i = 0; i < 8; i++) {
						const uint32_t lo = pk[2 * i] < m.K ? xr[pk[2 * i]] : 0,
							       hi = pk[2 * i + 1] < m.K ? xr[pk[2 * i + 1]] : 0;

						pr[i] = lo | hi << 16;
					}
				}
			}
			/* lane t's uint2: inputs {2t, 2t + 1} and {8 + 2t, 9 + 2t} */
			uint4 *dst = (uint4 *)(xs + xs_index(ks, r, Q3G_MM_TOK, 0) * 4);

			dst[0] = make_uint4(pr[0], pr[4], pr[1], pr[5]);
			dst[1] = make_uint4(pr[2], pr[6], pr[3], pr[7]);
		}
		__syncthreads();
		if (tile < m.ntiles) {
			int c0 = k0 / Q3G_KCHUNK, c1 = c0 + kw / Q3G_KCHUNK;

			run_chunks<FMT, 8>(m, wb, (size_t)mi * m.sz_stride, tile, c0, c1, (const uint2 *)xs, Q3G_MM_TOK,
					   -c0 * 4, 1.0f, acc);
		}
	}
	if (tile >= m.ntiles)
		return;
	const int g = lane >> 2, t = lane & 3;
#pragma unroll
	for (int n = 0; n < 8; n++)
#pragma unroll
		for (int i = 0; i < 4; i++) {
			int row = tile * Q3G_TILE_N + g + 8 * (i >> 1), tok = n * 8 + 2 * t + (i & 1);
			int p = tok < cnt ? prow[tok] : -1;

			if (p < 0 || row >= m.N)
				continue;
			if (L.down)
				L.out[(size_t)p * L.ldout + row] = acc[n][i] * L.wt[p];
			else
				L.out[(size_t)p * L.ldout + (size_t)which * (L.ldout / 2) + row] = acc[n][i];
		}
}

/* Act-order with gate's and up's permutations one (q3g_mlp_plan): the token row of the
 * pair at sorted position j (block j) through its expert's permutation (the shared expert's for
 * slot k) into xp[j][0 .. Kp), once, where the GEMM gathered it in each of the 2·nb blocks that
 * read its tile.  Rows past the pairs routed this call (skipped ones are not sorted) are left. */
__global__ void mm_permute_kernel(uint16_t *xp, int ldxp, const uint16_t *x, const int *sorted, const int *idx,
				  const int *offset, const int *count, const uint16_t *gperm, size_t gstride,
				  const uint16_t *sperm, int S, int H, int E)
{
	const int j = blockIdx.x;

	if (j >= offset[E] + count[E])
		return;
	const int p = sorted[j], ex = idx[p];
	const uint16_t *perm = ex < 0 ? sperm : gperm ? gperm + (size_t)ex * gstride : NULL;
	const uint16_t *xr = x + (size_t)(p / S) * H;

	for (int u = threadIdx.x; u < ldxp / 8; u += blockDim.x) {
		uint16_t pk[8];
		uint32_t w[4];

		perm_unit(pk, perm, 8 * u);
#pragma unroll
		for (int q = 0; q < 4; q++)
			w[q] = (uint32_t)(pk[2 * q] < H ? xr[pk[2 * q]] : 0) |
			       (uint32_t)(pk[2 * q + 1] < H ? xr[pk[2 * q + 1]] : 0) << 16;
		*(uint4 *)(xp + (size_t)j * ldxp + 8 * u) = make_uint4(w[0], w[1], w[2], w[3]);
	}
}

/* h[r][i] += Σ_s y[r·S + s][i] over the pairs not skipped */
__global__ void mm_combine_kernel(float *h, const float *y, const int *idx, int R, int S, int H)
{
	size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (id >= (size_t)R * H)
		return;
	size_t r = id / H, i = id % H;
	float acc = 0.0f;

	for (int s = 0; s < S; s++)
		if (idx[r * S + s] != Q3G_SKIP)
			acc += y[(r * S + s) * H + i];
	h[id] += acc;
}

static size_t mm_smem(void)
{
	return (size_t)Q3G_MM_TOK * MM_KT * 2;
}

/* The routed tiles with the stacks' format, then the shared expert's with its own. */
static int mm_launch2(mm_launch &L, int fmt_routed, int fmt_shared, dim3 grid, cudaStream_t st, q3_err *e)
{
	for (int sh = 0; sh < 2; sh++) {
		int f = sh ? fmt_shared : fmt_routed;

		L.shared = sh;
		if (f == Q3G_Q4)
			mm_grouped_kernel<Q3G_Q4><<<grid, Q3G_MMV_THREADS, mm_smem(), st>>>(L);
		else if (f == Q3G_Q8)
			mm_grouped_kernel<Q3G_Q8><<<grid, Q3G_MMV_THREADS, mm_smem(), st>>>(L);
		else
			mm_grouped_kernel<Q3G_F16><<<grid, Q3G_MMV_THREADS, mm_smem(), st>>>(L);
		CUDA_CHECK_LAUNCH(e);
	}
	return 0;
}

extern "C" int q3g_moe_prefill(float *h, const uint16_t *x, const int *idx, const float *w,
			       const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *down,
			       const struct q3g_mat *sgate, const struct q3g_mat *sup, const struct q3g_mat *sdown,
			       int R, const struct q3g_dims *d, void *wsp, q3g_stream stream, q3_err *e)
{
	cudaStream_t st = (cudaStream_t)stream;
	struct mm_ws ws;
	size_t total;
	int S = d->topk + 1, P = R * S, G = d->E + 1, Imax = Q3_MAX(d->I, d->Is), err;
	mm_launch L;

	if (G > 1024)
		return q3_errf(e, -EINVAL, "moe prefill: %d experts (the sort takes up to 1023)", d->E);
	ws_layout(wsp, R, d, &ws, &total);
	CUDA_CHECK(e, cudaMemsetAsync(ws.count, 0, sizeof(int) * (G + 1), st));
	mm_count_kernel<<<cdiv(P, 256), 256, 0, st>>>(ws.count, idx, P, d->E);
	CUDA_CHECK_LAUNCH(e);
	mm_scan_kernel<<<1, 1024, 0, st>>>(ws.count, ws.offset, ws.fill, ws.tiles, ws.ntiles, G);
	CUDA_CHECK_LAUNCH(e);
	mm_scatter_kernel<<<cdiv(P, 256), 256, 0, st>>>(ws.sorted, ws.fill, idx, P, d->E);
	CUDA_CHECK_LAUNCH(e);

	memset(&L, 0, sizeof(L));
	L.tiles = ws.tiles;
	L.ntiles = ws.ntiles;
	L.sorted = ws.sorted;
	L.E = d->E;
	L.S = S;
	L.H = d->H;
	L.ldgu = 2 * Imax;
	/* up: gate rows then up rows, row blocks of Q3G_MM_ROWS */
	L.mat[0] = *gate;
	L.mat[1] = *up;
	L.mat[2] = *sgate;
	L.mat[3] = *sup;
	L.x = x;
	L.out = ws.gu;
	L.ldout = 2 * Imax;
	L.nb = cdiv(Q3_MAX(gate->ntiles, sgate->ntiles), Q3G_MM_ROWS / Q3G_TILE_N);
	L.down = false;
	if (gate->fmt != up->fmt || sgate->fmt != sup->fmt)
		return q3_errf(e, -EINVAL, "moe prefill: gate and up in different formats");
	/* act-order, one permutation for gate and up: the rows permuted once, in y's room (down
	 * writes y after this launch has read them; Kp halves a row <= H floats) */
	if (gate->perm == up->perm && sgate->perm == sup->perm && (gate->perm || sgate->perm) &&
	    gate->nchunks == sgate->nchunks && gate->nchunks * Q3G_KCHUNK <= 2 * d->H) {
		L.xp = (const uint16_t *)ws.y;
		L.ldxp = gate->nchunks * Q3G_KCHUNK;
		mm_permute_kernel<<<P, 256, 0, st>>>((uint16_t *)ws.y, L.ldxp, x, ws.sorted, idx, ws.offset, ws.count,
						     gate->perm, gate->perm_stride, sgate->perm, S, d->H, d->E);
		CUDA_CHECK_LAUNCH(e);
	}
	if ((err = mm_launch2(L, gate->fmt, sgate->fmt, dim3(ws.maxtiles, 2 * L.nb), st, e)))
		return err;
	/* down */
	L.xp = NULL;
	L.mat[0] = *down;
	L.mat[2] = *sdown;
	L.gu = ws.gu;
	L.wt = w;
	L.out = ws.y;
	L.ldout = d->H;
	L.nb = cdiv(down->ntiles, Q3G_MM_ROWS / Q3G_TILE_N);
	L.down = true;
	if ((err = mm_launch2(L, down->fmt, sdown->fmt, dim3(ws.maxtiles, L.nb), st, e)))
		return err;
	mm_combine_kernel<<<(unsigned)cdiv(R * d->H, 256), 256, 0, st>>>(h, ws.y, idx, R, S, d->H);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

int q3g_mm_init(q3_err *e)
{
	int err;

	if (mm_smem() > q3g_dev.smem_dyn)
		return q3_errf(e, -EINVAL, "grouped GEMM: %zu bytes of shared memory exceed the device's %zu",
			       (size_t)mm_smem(), q3g_dev.smem_dyn);
	if ((err = q3g_allow_dyn_smem(mm_grouped_kernel<Q3G_Q4>, "mm_grouped_kernel<Q4>", e)) ||
	    (err = q3g_allow_dyn_smem(mm_grouped_kernel<Q3G_Q8>, "mm_grouped_kernel<Q8>", e)) ||
	    (err = q3g_allow_dyn_smem(mm_grouped_kernel<Q3G_F16>, "mm_grouped_kernel<F16>", e)))
		return err;
	return 0;
}
