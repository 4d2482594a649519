/* gpu_moe_host.cu - routed experts a decode row reads straight from host memory (zero-copy over
 * PCIe), for experts beyond VRAM (cuda_offload.h).
 *
 * Why: in an offloaded decode step the CPU threads compute a row's missing experts from RAM while
 * the GPU, done with its resident ones, waits for them.  The GPU can read pinned host memory
 * itself: taking a share of the missing experts (the last few of a row in routing order when it
 * has more than `keep`; the CPU side skips the same ones) adds the link's bandwidth to the CPU's.  The experts stay in the
 * checkpoint's raw GPTQ layout (its pages, registered and mapped): qweight [K/P][N] holds P =
 * 32 / bits codes of consecutive k in a word, so a warp reading 128 columns of one word row
 * makes one contiguous 512-byte request.
 *
 * Over PCIe every round trip costs microseconds, so each block issues all of its loads before it
 * uses the first: a block owns 128 columns of one matrix of one pick and 1 / ks of its K (the
 * split spreads the loads over more SMs); its 8 warps split that part of K, each lane loading
 * 16 bytes (4 columns) a word row.  Safetensors packs tensors without padding, so a qweight may
 * start 4, 8 or 12 bytes past a 16-byte boundary: a block's columns then start that many columns
 * early (col0 = 128 · tile − s), keeping every load aligned; the bytes before a tensor or after
 * its end that this reads lie in the same 16-byte line as the tensor's own, so in its mapping.
 * Three kernels:
 *   mv<up>:   gate and up partial sums of every (pick, K split) into scratch;
 *   mv<down>: sums those, silu(gate) ⊙ up, and the down partial sums into scratch;
 *   combine:  out[r] = Σ over the picks, in routing order, of w · Σ over the splits: one fixed
 *             summation order, no atomics, the same bits every run.
 * All of it writes its own buffers only: the offload runs it on a stream of its own beside the
 * resident experts (which add into the residual) and adds out where it adds the CPU's part.
 * Weights dequantize as the reference does: scale · (q − zero) in fp32.
 */
#include "gpu_internal.h"

#define HX_WARPS 8
#define HX_THREADS (HX_WARPS * 32)
#define HX_TILE 128  /* columns a block: 32 lanes x 4 */
#define HX_UNROLL 8  /* word rows a lane loads before using them */
#define HX_KS_MAX 8  /* K splits */

struct hx_args {
	float *out;
	float *gu; /* [R][G][2][ksu][I] gate / up partial sums */
	float *y;  /* [R][G][ksd][H] down partial sums */
	const uint16_t *xb;
	const int *idx;
	const float *w;
	const int16_t *slot_of;
	const struct q3g_hexpert *tab;
	const int *g_now;
	int ldk, k, G, keep, H, I, ksu, ksd;
	struct q3g_hfmt f;
};

/* The routing position of a row's pick p, or -1: of the m routed entries whose expert has no
 * slot, the picks are the last min(G, m - keep). */
static __device__ __forceinline__ int hx_pick(const hx_args &a, const int *idx, int p)
{
	int m = 0;

	for (int i = 0; i < a.k; i++)
		m += idx[i] >= 0 && a.slot_of[idx[i]] < 0;
	const int g = min(a.g_now ? min(a.G, *a.g_now) : a.G, max(0, m - a.keep));

	if (p >= g)
		return -1;
	for (int i = 0, r = 0; i < a.k; i++)
		if (idx[i] >= 0 && a.slot_of[idx[i]] < 0 && r++ == m - g + p)
			return i;
	return -1;
}

/* acc[c] += Σ_k W[col + c][k] · x[k] over the word rows [w0, w1) of a GPTQ matrix with N columns
 * (outputs), col 16-byte aligned in qweight's rows; x in shared memory, indexed by k.  Columns
 * outside [0, N) compute garbage the caller drops (their scales are read at the nearest column). */
template <int BITS>
static __device__ void hx_dot(const struct q3g_hlin &L, int N, int group, int zoff, bool bf16, int col, int w0,
			      int w1, const float *x, float (&acc)[4])
{
	constexpr int P = 32 / BITS;
	constexpr uint32_t MASK = (1u << BITS) - 1;
	const uint32_t *qw = L.qweight + col;
	int gcur = -1, z[4];
	float sc[4];

	for (int wb = w0; wb < w1; wb += HX_UNROLL) {
		uint4 q[HX_UNROLL];

#pragma unroll
		for (int u = 0; u < HX_UNROLL; u++)
			if (wb + u < w1)
				q[u] = *(const uint4 *)(qw + (size_t)(wb + u) * N);
#pragma unroll
		for (int u = 0; u < HX_UNROLL; u++) {
			const int wi = wb + u;

			if (wi >= w1)
				break;
			const int g = wi * P / group;

			if (g != gcur) { /* a new group: its scales and zero points */
				gcur = g;
#pragma unroll
				for (int c = 0; c < 4; c++) {
					const int n = min(max(col + c, 0), N - 1);
					uint32_t zw = L.qzeros[(size_t)g * (N / P) + n / P];
					uint16_t s = L.scales[(size_t)g * N + n];

					z[c] = (int)((((zw >> (BITS * (n % P))) & MASK) + (uint32_t)zoff) & MASK);
					sc[c] = bf16 ? __uint_as_float((uint32_t)s << 16) : h_bits2f(s);
				}
			}
			const uint32_t qc[4] = { q[u].x, q[u].y, q[u].z, q[u].w };

#pragma unroll
			for (int j = 0; j < P; j++) {
				const float xv = x[wi * P + j];

#pragma unroll
				for (int c = 0; c < 4; c++)
					acc[c] = fmaf(sc[c] * (float)((int)((qc[c] >> (BITS * j)) & MASK) - z[c]), xv, acc[c]);
			}
		}
	}
}

/* DOWN 0: blockIdx.z = (row · G + pick) · 2 + matrix (gate, up), input x = xb[row];
 * DOWN 1: blockIdx.z = row · G + pick, input silu(gate) ⊙ up of the pick.
 * blockIdx.x: the column tile, blockIdx.y: the K split.  Shared: x [K], red [HX_WARPS][HX_TILE]. */
template <int BITS, bool DOWN>
__global__ void __launch_bounds__(HX_THREADS) hx_mv_kernel(const __grid_constant__ hx_args a)
{
	extern __shared__ float sm[];
	constexpr int NMAT = DOWN ? 1 : 2;
	const int z = blockIdx.z, mat = z % NMAT, pick = z / NMAT % a.G, row = z / NMAT / a.G;
	const int *idx = a.idx + (size_t)row * a.ldk;
	const int pos = hx_pick(a, idx, pick);

	if (pos < 0)
		return; /* the row has fewer picks */
	const int N = DOWN ? a.H : a.I, K = DOWN ? a.I : a.H, ks = DOWN ? a.ksd : a.ksu;
	const struct q3g_hlin &L = a.tab[idx[pos]].lin[DOWN ? 2 : mat];
	const int col0 = (int)blockIdx.x * HX_TILE - (int)(((uintptr_t)L.qweight >> 2) & 3);

	if (col0 >= N)
		return; /* the spare tile of an aligned tensor */
	float *x = sm, *red = sm + K;

	if (!DOWN) {
		for (int i = threadIdx.x; i < K; i += HX_THREADS)
			x[i] = h_bits2f(a.xb[(size_t)row * a.H + i]);
	} else {
		const float *g = a.gu + ((size_t)row * a.G + pick) * 2 * a.ksu * a.I, *u = g + (size_t)a.ksu * a.I;

		for (int i = threadIdx.x; i < K; i += HX_THREADS) {
			float gs = 0.0f, us = 0.0f;

			for (int j = 0; j < a.ksu; j++) {
				gs += g[(size_t)j * a.I + i];
				us += u[(size_t)j * a.I + i];
			}
			x[i] = dev_silu(gs) * us;
		}
	}
	__syncthreads();
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gw = (int)blockIdx.y * HX_WARPS + warp;
	const int nw = K / (32 / BITS), per = cdiv(nw, ks * HX_WARPS);
	const int w0 = min(nw, gw * per), w1 = min(nw, w0 + per);
	const int fi = DOWN ? 1 : 0;
	float acc[4] = {};

	hx_dot<BITS>(L, N, a.f.group[fi], a.f.zero_off[fi], a.f.bf16[fi], col0 + 4 * lane, w0, w1, x, acc);
#pragma unroll
	for (int c = 0; c < 4; c++)
		red[warp * HX_TILE + 4 * lane + c] = acc[c];
	__syncthreads();
	float *out = DOWN ? a.y + (((size_t)row * a.G + pick) * a.ksd + blockIdx.y) * a.H
			  : a.gu + ((((size_t)row * a.G + pick) * 2 + mat) * a.ksu + blockIdx.y) * a.I;

	for (int t = threadIdx.x; t < HX_TILE; t += HX_THREADS) {
		float s = 0.0f;

		for (int w = 0; w < HX_WARPS; w++)
			s += red[w * HX_TILE + t];
		if (col0 + t >= 0 && col0 + t < N)
			out[col0 + t] = s;
	}
}

/* out[row] = Σ_p w_p · Σ_j y[row][p][j]; blockIdx.y the row */
__global__ void hx_combine_kernel(const __grid_constant__ hx_args a)
{
	__shared__ int pos[Q3G_HX_MAX];
	const int row = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
	const int *idx = a.idx + (size_t)row * a.ldk;

	if (threadIdx.x < a.G)
		pos[threadIdx.x] = hx_pick(a, idx, threadIdx.x);
	__syncthreads();
	if (c >= a.H)
		return;
	float acc = 0.0f;

	for (int p = 0; p < a.G; p++) {
		if (pos[p] < 0)
			continue;
		const float *y = a.y + ((size_t)row * a.G + p) * a.ksd * a.H + c;
		float s = 0.0f;

		for (int j = 0; j < a.ksd; j++)
			s += y[(size_t)j * a.H];
		acc = fmaf(a.w[(size_t)row * a.ldk + pos[p]], s, acc);
	}
	a.out[(size_t)row * a.H + c] = acc;
}

/* K splits: about 8 word rows a warp, at most HX_KS_MAX */
static int hx_splits(int K, int bits)
{
	return Q3_MAX(1, Q3_MIN(HX_KS_MAX, cdiv(K / (32 / bits), HX_WARPS * HX_UNROLL)));
}

extern "C" size_t q3g_moe_host_scratch(int R, int G, int H, int I)
{
	return (size_t)R * G * HX_KS_MAX * (2 * (size_t)I + (size_t)H); /* the splits at their most */
}

template <int B0, int B1>
static int hx_launch(hx_args a, int R, cudaStream_t st, q3_err *e)
{
	size_t red = (size_t)HX_WARPS * HX_TILE * 4;
	const int tu = cdiv(a.I + 3, HX_TILE), td = cdiv(a.H + 3, HX_TILE);

	hx_mv_kernel<B0, false><<<dim3(tu, a.ksu, R * a.G * 2), HX_THREADS, (size_t)a.H * 4 + red, st>>>(a);
	CUDA_CHECK_LAUNCH(e);
	hx_mv_kernel<B1, true><<<dim3(td, a.ksd, R * a.G), HX_THREADS, (size_t)a.I * 4 + red, st>>>(a);
	CUDA_CHECK_LAUNCH(e);
	hx_combine_kernel<<<dim3(cdiv(a.H, 256), R), 256, 0, st>>>(a);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

extern "C" int q3g_moe_host(float *out, float *ws, const uint16_t *xb, const int *idx, const float *w, int ldk, int k,
			    const int16_t *slot_of, const struct q3g_hexpert *tab, const struct q3g_hfmt *f, int G,
			    int keep, const int *g_now, int R, int H, int I, q3g_stream stream, q3_err *e)
{
	hx_args a = { out, ws, NULL, xb, idx, w, slot_of, tab, g_now, ldk, k, G, keep, H, I, 1, 1, *f };
	bool ok = G >= 1 && G <= Q3G_HX_MAX && keep >= 0 && R >= 1 && H % 4 == 0 && I % 4 == 0;

	for (int i = 0; i < 2 && ok; i++) {
		int P = f->bits[i] == 4 || f->bits[i] == 8 ? 32 / f->bits[i] : 0;

		ok = P && f->group[i] > 0 && f->group[i] % P == 0 && (i ? I : H) % P == 0;
	}
	if (!ok)
		return q3_errf(e, -EINVAL, "moe host experts: unsupported storage (bits %d/%d, group %d/%d, H %d, I %d, "
			       "%d picks)", f->bits[0], f->bits[1], f->group[0], f->group[1], H, I, G);
	if (((size_t)Q3_MAX(H, I) + HX_WARPS * HX_TILE) * 4 > 48 * 1024)
		return q3_errf(e, -EINVAL, "moe host experts: H %d past the shared memory", H);
	a.ksu = hx_splits(H, f->bits[0]);
	a.ksd = hx_splits(I, f->bits[1]);
	a.y = ws + (size_t)R * G * 2 * a.ksu * I;
	if (f->bits[0] == 4)
		return f->bits[1] == 4 ? hx_launch<4, 4>(a, R, (cudaStream_t)stream, e)
				       : hx_launch<4, 8>(a, R, (cudaStream_t)stream, e);
	return f->bits[1] == 4 ? hx_launch<8, 4>(a, R, (cudaStream_t)stream, e)
			       : hx_launch<8, 8>(a, R, (cudaStream_t)stream, e);
}
