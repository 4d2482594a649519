/* gpu_attn.cu - gated full attention on the GPU.
 *
 *   q3g_attn_prep     q_norm / k_norm (zero-centred RMSNorm over each head) and partial RoPE
 *                     (NeoX rotate-half on the first rot dims), q to bf16, k and v into the
 *                     session's cache (bf16) at the row's position.
 *   q3g_attn_decode   flash-decoding on tensor cores: a warp per (row, kv head, split of the
 *                     cached positions), the GQA group's query heads the rows of the products
 *                     (each K/V row read once for them), fp32 online softmax; then a combine
 *                     kernel merges the splits by their log-sum-exp and applies sigmoid(gate).
 *   q3g_attn_prefill  a sequence's many queries: S = Q·Kᵀ and O = P·V through cuBLAS (batched
 *                     over the query heads of a kv head), the causal softmax in between.
 */
#include <cublas_v2.h>

#include "gpu_internal.h"

/* ---- prep ------------------------------------------------------------------------------------ */

/* Block (row, head) with D threads; heads [0, Hq) are queries, [Hq, Hq + Hkv) keys (and values). */
__global__ void attn_prep_kernel(uint16_t *qout, const float *qg, const float *k, const float *v,
				 const float *qnw, const float *knw, struct q3g_rows rows, int full,
				 struct q3g_dims d)
{
	__shared__ float red[32];
	__shared__ float xs[Q3G_MAX_HEAD_DIM];
	pdl_trigger();
	pdl_wait();
	const int r = blockIdx.x, hd = blockIdx.y, i = threadIdx.x, D = d.D;
	const bool isq = hd < d.Hq;
	const int pos = rows.row_pos[r];
	const float *src = isq ? qg + (size_t)r * 2 * d.Hq * D + (size_t)hd * 2 * D
			       : k + (size_t)r * d.Hkv * D + (size_t)(hd - d.Hq) * D;
	const float x = src[i];
	const float rs = rsqrtf(block_sum(x * x, red) / (float)D + d.eps);
	float y = x * rs * (1.0f + (isq ? qnw : knw)[i]);
	const int half = d.rot / 2;

	xs[i] = y;
	__syncthreads();
	if (i < d.rot) {
		int fi = i < half ? i : i - half;
		float inv = 1.0f / powf((float)d.rope_theta, (float)(2 * fi) / (float)d.rot);
		float sn, cs;

		sincosf((float)pos * inv, &sn, &cs);
		y = i < half ? xs[i] * cs - xs[i + half] * sn : xs[i] * cs + xs[i - half] * sn;
	}
	if (isq) {
		qout[((size_t)r * d.Hq + hd) * D + i] = __bfloat16_as_ushort(f2bf(y));
		return;
	}
	const struct q3g_seq sq = rows.seq[rows.row_seq[r]];
	const int kvd = d.Hkv * D, kh = hd - d.Hq;
	uint16_t *K = sq.kv + ((size_t)full * 2 * d.max_ctx + pos) * kvd + (size_t)kh * D;
	uint16_t *V = K + (size_t)d.max_ctx * kvd;

	K[i] = __bfloat16_as_ushort(f2bf(y));
	V[i] = __bfloat16_as_ushort(f2bf(v[(size_t)r * kvd + (size_t)kh * D + i]));
}

extern "C" int q3g_attn_prep(uint16_t *q, const float *qg, const float *k, const float *v, const float *qnw,
			     const float *knw, struct q3g_rows rows, int R, int full, const struct q3g_dims *d,
			     q3g_stream st, q3_err *e)
{
	if (d->D % 32 || d->D > Q3G_MAX_HEAD_DIM || d->rot > d->D || d->rot % 2)
		return q3_errf(e, -EINVAL, "attention: head_dim %d / rotary %d not supported", d->D, d->rot);
	CUDA_CHECK(e, q3g_launch(attn_prep_kernel, dim3(R, d->Hq + d->Hkv), d->D, 0, (cudaStream_t)st, q, qg, k, v, qnw,
				 knw, rows, full, *d));
	return 0;
}

/* ---- decode ----------------------------------------------------------------------------------
 * Flash-decoding on tensor cores.  A row's cached positions [0, pos] are cut into splits of
 * att_chunk(pos + 1) positions, a function of the position alone, so that a row's result does not
 * depend on its batch (nor on the GPU: the splits' warps never meet).  A warp computes a split:
 * tiles of 16 positions, each tile's K and V rows (bf16) staged in the warp's shared memory by
 * asynchronous copies, the next tile in flight while this one is used.  With the GQA group's query
 * heads as the rows of an m16n8k16 product (up to 8 of its 16 rows):
 *   S = Q·Kᵀ      A: q (registers), B: K through ldmatrix; S's accumulators are in the layout of
 *                 the next product's B, so P needs no exchange: lane (g, t) holds head g's
 *                 positions 2t, 2t+1, 2t+8, 2t+9 of the tile;
 *   Oᵀ += Vᵀ·Pᵀ   A: V through ldmatrix.trans, B: P (bf16, as the prefill's P·V), rows the head
 *                 dims, so Oᵀ takes D/16 x 4 registers a lane, none of them padding.
 * The online softmax in fp32, the scores in log2 units (a head's max over a tile: two shuffles;
 * its sum kept per lane and added up at the end).  The split's unnormalized output, max and sum go
 * to part; the combine kernel merges a row's splits and applies the gate.  The scalar kernel this
 * replaces (a warp a position, lanes over the head dims: ~370 instructions a position, one in
 * flight a warp) took 40 us at 16 rows of 1K context, for 32 MB of cache. */
#define ATT_TILE 16
#define ATT_MIN_CHUNK 64 /* positions a split takes at least: four tiles */

/* positions a split of a row with nk cached positions takes: at most Q3G_ATT_SPLITS splits */
static __host__ __device__ __forceinline__ int att_chunk(int nk)
{
	const int c = (nk + Q3G_ATT_SPLITS - 1) / Q3G_ATT_SPLITS;

	return c <= ATT_MIN_CHUNK ? ATT_MIN_CHUNK : (c + ATT_TILE - 1) / ATT_TILE * ATT_TILE;
}

/* halves of a staged K or V row: the head dims and 16 bytes of padding, so that the eight rows of
 * an ldmatrix fall in different banks */
static __host__ __device__ constexpr int att_row(int D)
{
	return D + 8;
}

/* bytes a warp stages: two tiles of K and V */
static size_t att_warp_smem(int D)
{
	return (size_t)2 * 2 * ATT_TILE * att_row(D) * 2;
}

/* Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8 (TRANS: each
 * lane receives a column pair, not a row pair). */
template <bool TRANS> static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *p)
{
	const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);

	if constexpr (TRANS)
		asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
			     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
	else
		asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
			     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
	const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);

	return *(const uint32_t *)&v;
}

/* part: [R][Hq][Q3G_ATT_SPLITS][D + 2]: a split's unnormalized output, then its max (of the scores
 * in log2 units) and sum.  Block (kv head, row, group of nw splits), a warp a split. */
template <int D>
__global__ void __launch_bounds__(4 * 32) attn_decode_kernel(const uint16_t *q, float *part, struct q3g_rows rows,
							      int full, struct q3g_dims d)
{
	constexpr int KS = D / 16, RW = att_row(D);
	extern __shared__ uint4 att_smem[];
	pdl_trigger();
	pdl_wait();
	const int kh = blockIdx.x, r = blockIdx.y, GQ = d.Hq / d.Hkv;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	const int kvd = d.Hkv * D, nk = rows.row_pos[r] + 1, chunk = att_chunk(nk);
	const int sp = blockIdx.z * (blockDim.x >> 5) + warp, j0 = sp * chunk, j1 = min(nk, j0 + chunk);

	if (j0 >= nk)
		return; /* past the row's splits */
	const struct q3g_seq sq = rows.seq[rows.row_seq[r]];
	const uint16_t *K = sq.kv + (size_t)full * 2 * d.max_ctx * kvd + (size_t)kh * D;
	const uint16_t *V = K + (size_t)d.max_ctx * kvd;
	uint16_t *ks = (uint16_t *)att_smem + (size_t)warp * 2 * 2 * ATT_TILE * RW; /* [stage][K, V][16][RW] */
	const float scale = rsqrtf((float)D) * 1.4426950408889634f;		    /* log2 units */
	/* q as A fragments: row g = head g of the group (rows past it, and 8-15: zero) */
	const uint16_t *qh = q + ((size_t)r * d.Hq + kh * GQ + g) * D + 2 * t;
	uint32_t qa[KS][2];

#pragma unroll
	for (int s = 0; s < KS; s++) {
		qa[s][0] = g < GQ ? *(const uint32_t *)(qh + 16 * s) : 0u;
		qa[s][1] = g < GQ ? *(const uint32_t *)(qh + 16 * s + 8) : 0u;
	}
	/* tile i: positions j0 + 16 i .. + 15 into stage buf, those past j1 zeros */
	auto stage = [&](int i, int buf) {
		uint16_t *dst = ks + (size_t)buf * 2 * ATT_TILE * RW;

#pragma unroll
		for (int u = 0; u < 2 * ATT_TILE * D / 8 / 32; u++) {
			const int c = lane + 32 * u, kv = c / (ATT_TILE * D / 8), key = c / (D / 8) % ATT_TILE;
			const int part8 = c % (D / 8), j = j0 + ATT_TILE * i + key;
			const uint16_t *src = (kv ? V : K) + (size_t)min(j, j1 - 1) * kvd + part8 * 8;

			cp_async16_or0(dst + ((size_t)kv * ATT_TILE + key) * RW + part8 * 8, src, j < j1);
		}
	};
	const int ntile = cdiv(j1 - j0, ATT_TILE);
	/* the ldmatrix rows of this lane: position (l / 16) 8 + l % 8, dims + 8 ((l / 8) & 1) */
	const int lr = (lane >> 4) * 8 + (lane & 7), lc = ((lane >> 3) & 1) * 8;
	float o[KS][4], m = -INFINITY, l = 0.0f;

#pragma unroll
	for (int s = 0; s < KS; s++)
		o[s][0] = o[s][1] = o[s][2] = o[s][3] = 0.0f;
	stage(0, 0);
	cp_async_commit();
	for (int i = 0; i < ntile; i++) {
		if (i + 1 < ntile)
			stage(i + 1, (i + 1) & 1);
		cp_async_commit(); /* (empty after the last: the wait below counts groups) */
		cp_async_wait<1>();
		__syncwarp();
		const uint16_t *kt = ks + (size_t)(i & 1) * 2 * ATT_TILE * RW, *vt = kt + ATT_TILE * RW;
		float s0[4] = { 0.0f, 0.0f, 0.0f, 0.0f }, s1[4] = { 0.0f, 0.0f, 0.0f, 0.0f };

#pragma unroll
		for (int s = 0; s < KS; s++) {
			uint32_t b[4];
			const uint32_t a[4] = { qa[s][0], 0u, qa[s][1], 0u };

			ldsm_x4<false>(b, kt + lr * RW + 16 * s + lc);
			mma_bf16(s0, a, b);	/* positions 0-7 */
			mma_bf16(s1, a, b + 2); /* positions 8-15 */
		}
		float x[4] = { s0[0], s0[1], s1[0], s1[1] }, mx = -INFINITY, p[4];

#pragma unroll
		for (int e = 0; e < 4; e++) {
			const int j = j0 + ATT_TILE * i + 2 * t + (e & 1) + 8 * (e >> 1);

			x[e] = j < j1 ? x[e] * scale : -INFINITY;
			mx = fmaxf(mx, x[e]);
		}
		mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
		mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
		const float mn = fmaxf(m, mx), corr = exp2f(m - mn); /* a tile's first position is valid */

#pragma unroll
		for (int e = 0; e < 4; e++)
			p[e] = exp2f(x[e] - mn);
		l = l * corr + ((p[0] + p[1]) + (p[2] + p[3]));
		m = mn;
		/* Oᵀ's columns are heads 2t, 2t + 1: their corrections from lanes 8t and 8t + 4 */
		const float ca = __shfl_sync(0xffffffffu, corr, 8 * t), cb = __shfl_sync(0xffffffffu, corr, 8 * t + 4);
		const uint32_t pb[2] = { pack_bf16(p[0], p[1]), pack_bf16(p[2], p[3]) };

#pragma unroll
		for (int s = 0; s < KS; s++) {
			uint32_t a[4];

			o[s][0] *= ca;
			o[s][1] *= cb;
			o[s][2] *= ca;
			o[s][3] *= cb;
			ldsm_x4<true>(a, vt + lr * RW + 16 * s + lc);
			mma_bf16(o[s], a, pb);
		}
		__syncwarp(); /* this stage is staged into again two tiles on */
	}
	l += __shfl_xor_sync(0xffffffffu, l, 1);
	l += __shfl_xor_sync(0xffffffffu, l, 2);
	/* heads 2t, 2t + 1 of dims 16 s + g (+ 8); head g's max and sum from lane (g, 0) */
	float *pp = part + (((size_t)r * d.Hq + kh * GQ) * Q3G_ATT_SPLITS + sp) * (D + 2);
	const size_t hs = (size_t)Q3G_ATT_SPLITS * (D + 2); /* a head's stride */

	if (t == 0 && g < GQ) {
		pp[g * hs + D] = m;
		pp[g * hs + D + 1] = l;
	}
#pragma unroll
	for (int s = 0; s < KS; s++)
#pragma unroll
		for (int e = 0; e < 4; e++) {
			const int h = 2 * t + (e & 1), dd = 16 * s + g + 8 * (e >> 1);

			if (h < GQ)
				pp[h * hs + dd] = o[s][e];
		}
}

/* Block (row, query head), D threads: merge the row's splits, normalize, gate.  Every load is
 * issued before the first is used (the splits' values of a dim into registers, clamped to the last
 * split rather than under a branch; the splits' max and sum through shared memory): a loop of
 * loads each used at once took a round trip to L2 per split. */
static_assert(Q3G_ATT_SPLITS <= 64, "the combine's threads (a dim each, 64 at least) load the splits' max and sum");
__global__ void __launch_bounds__(Q3G_MAX_HEAD_DIM) attn_combine_kernel(uint16_t *att, const float *part,
									 const float *qg, struct q3g_rows rows, int Hq,
									 int D)
{
	__shared__ float ms[Q3G_ATT_SPLITS], ls[Q3G_ATT_SPLITS];
	pdl_trigger();
	pdl_wait();
	const int r = blockIdx.x, h = blockIdx.y, dd = threadIdx.x;
	const int nk = rows.row_pos[r] + 1, ns = cdiv(nk, att_chunk(nk));
	const float *pp = part + ((size_t)r * Hq + h) * Q3G_ATT_SPLITS * (D + 2);
	const float g = qg[(size_t)r * 2 * Hq * D + (size_t)h * 2 * D + D + dd];
	float a[Q3G_ATT_SPLITS], M = -INFINITY, L = 0.0f, A = 0.0f;

#pragma unroll
	for (int s = 0; s < Q3G_ATT_SPLITS; s++)
		a[s] = pp[min(s, ns - 1) * (D + 2) + dd];
	if (dd < ns) {
		ms[dd] = pp[dd * (D + 2) + D];
		ls[dd] = pp[dd * (D + 2) + D + 1];
	}
	__syncthreads();
	for (int s = 0; s < ns; s++)
		M = fmaxf(M, ms[s]);
#pragma unroll
	for (int s = 0; s < Q3G_ATT_SPLITS; s++) {
		if (s >= ns)
			break;
		const float f = exp2f(ms[s] - M); /* log2 units; every split has a position */

		L += ls[s] * f;
		A += a[s] * f;
	}
	att[((size_t)r * Hq + h) * D + dd] = f2h_bits(A / L * dev_sigmoid(g));
}

/* warps a decode block: two tiles of K and V each (4 on the H200, 2 in the 99 KB of sm_86/89) */
static int att_warps(int D)
{
	return (int)Q3_MAX(1, Q3_MIN(4, q3g_dev.smem_dyn / att_warp_smem(D)));
}

static void (*att_kernel_for(int D))(const uint16_t *, float *, struct q3g_rows, int, struct q3g_dims)
{
	return D == 64 ? attn_decode_kernel<64> : D == 128 ? attn_decode_kernel<128> : D == 256 ? attn_decode_kernel<256>
											       : NULL;
}

int q3g_attn_init(q3_err *e)
{
	int err;

	for (int D = 64; D <= 256; D *= 2)
		if ((err = q3g_allow_dyn_smem(att_kernel_for(D), "attn_decode_kernel", e)))
			return err;
	return 0;
}

extern "C" int q3g_attn_decode(uint16_t *att, const uint16_t *q, const float *qg, float *part, struct q3g_rows rows,
			       int R, int full, const struct q3g_dims *d, q3g_stream st, q3_err *e)
{
	cudaStream_t s = (cudaStream_t)st;
	void (*k)(const uint16_t *, float *, struct q3g_rows, int, struct q3g_dims) = att_kernel_for(d->D);

	if (!k)
		return q3_errf(e, -EINVAL, "attention: head_dim %d not supported (64, 128, 256)", d->D);
	if (d->Hkv < 1 || d->Hq % d->Hkv || d->Hq / d->Hkv > 8)
		return q3_errf(e, -EINVAL, "attention: %d query heads over %d kv heads (up to 8 a kv head)", d->Hq, d->Hkv);
	/* the split groups slowest: the blocks with work (the first few groups at short contexts)
	 * start first, those past every row's splits after them, and leave at once */
	const int nw = att_warps(d->D);

	CUDA_CHECK(e, q3g_launch(k, dim3(d->Hkv, R, cdiv(Q3G_ATT_SPLITS, nw)), nw * 32, nw * att_warp_smem(d->D), s, q,
				 part, rows, full, *d));
	CUDA_CHECK(e, q3g_launch(attn_combine_kernel, dim3(R, d->Hq), d->D, 0, s, att, part, qg, rows, d->Hq, d->D));
	return 0;
}

/* ---- prefill --------------------------------------------------------------------------------- */

/* Block per (head of the batch, query row): row i of S ([nq][Tk] per head) sees keys <= p0 + i;
 * P = softmax, zero beyond.  S was computed with the 1/sqrt(D) scale. */
__global__ void causal_softmax_kernel(uint16_t *p, const float *s, int nq, int Tk, int p0)
{
	__shared__ float red[32];
	const int i = blockIdx.x, h = blockIdx.y;
	const float *sr = s + ((size_t)h * nq + i) * Tk;
	uint16_t *pr = p + ((size_t)h * nq + i) * Tk;
	const int lim = p0 + i + 1;
	float mx = -INFINITY, sum = 0.0f;

	for (int j = threadIdx.x; j < lim; j += blockDim.x)
		mx = fmaxf(mx, sr[j]);
	mx = block_max(mx, red); /* every warp needs the row's max, not only warp 0 */
	for (int j = threadIdx.x; j < lim; j += blockDim.x)
		sum += __expf(sr[j] - mx);
	sum = block_sum(sum, red);
	float inv = 1.0f / sum;

	for (int j = threadIdx.x; j < Tk; j += blockDim.x)
		pr[j] = __bfloat16_as_ushort(f2bf(j < lim ? __expf(sr[j] - mx) * inv : 0.0f));
}

/* att[i][h·D + d] = fp16(o[i][h][d] · sigmoid(gate)) */
__global__ void attn_gate_kernel(uint16_t *att, const float *o, const float *qg, int n, int Hq, int D)
{
	size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x, qd = (size_t)Hq * D;

	if (id >= (size_t)n * qd)
		return;
	size_t i = id / qd, x = id % qd, h = x / D, dd = x % D;
	float g = qg[i * 2 * qd + h * 2 * D + D + dd];

	att[id] = f2h_bits(o[id] * dev_sigmoid(g));
}

#define CUBLAS_CHECK(e, stmt)                                                                      \
	do {                                                                                       \
		cublasStatus_t cs_ = (stmt);                                                       \
		if (cs_ != CUBLAS_STATUS_SUCCESS)                                                  \
			return q3_errf(e, -EIO, "%s:%d %s: %s: cuBLAS status %d", __FILE__, __LINE__,     \
				       __func__, #stmt, (int)cs_);                                  \
	} while (0)

extern "C" int q3g_attn_prefill(void *cublas, uint16_t *att, const uint16_t *q, const float *qg,
				const struct q3g_seq *seq, int full, float *s, uint16_t *p, float *o,
				size_t scratch_elems, const struct q3g_dims *d, q3g_stream st, q3_err *e)
{
	cublasHandle_t hb = (cublasHandle_t)cublas;
	cudaStream_t cs = (cudaStream_t)st;
	const int D = d->D, GQ = d->Hq / d->Hkv, kvd = d->Hkv * D, n = seq->n, p0 = seq->pos;
	const int Tk = p0 + n;
	const float one = 1.0f, zero = 0.0f, scale = 1.0f / sqrtf((float)D);
	size_t per_row = (size_t)GQ * Tk;
	int qb = (int)Q3_MIN((size_t)n, scratch_elems / per_row);

	if (qb < 1)
		return q3_errf(e, -ENOMEM, "attention prefill: scratch of %zu elements < one query row (%zu)",
			       scratch_elems, per_row);
	CUBLAS_CHECK(e, (cublasStatus_t)q3g_cublas_stream(hb, cs));
	for (int i0 = 0; i0 < n; i0 += qb) {
		int nq = Q3_MIN(qb, n - i0);

		for (int kh = 0; kh < d->Hkv; kh++) {
			const uint16_t *K = seq->kv + (size_t)full * 2 * d->max_ctx * kvd + (size_t)kh * D;
			const uint16_t *V = K + (size_t)d->max_ctx * kvd;
			const uint16_t *Q = q + ((size_t)(seq->row0 + i0) * d->Hq + kh * GQ) * D;
			float *O = o + ((size_t)i0 * d->Hq + kh * GQ) * D;

			/* S_h (col-major [Tk][nq]) = K (T: [Tk][D]) · Q_h ([D][nq]) */
			CUBLAS_CHECK(e, cublasGemmStridedBatchedEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, Tk, nq, D, &scale, K,
								   CUDA_R_16BF, kvd, 0, Q, CUDA_R_16BF, d->Hq * D, D,
								   &zero, s, CUDA_R_32F, Tk, (long long)nq * Tk, GQ,
								   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
			causal_softmax_kernel<<<dim3(nq, GQ), 256, 0, cs>>>(p, s, nq, Tk, p0 + i0);
			CUDA_CHECK_LAUNCH(e);
			/* O_h (col-major [D][nq], ld Hq·D) = V ([D][Tk]) · P_h ([Tk][nq]) */
			CUBLAS_CHECK(e, cublasGemmStridedBatchedEx(hb, CUBLAS_OP_N, CUBLAS_OP_N, D, nq, Tk, &one, V,
								   CUDA_R_16BF, kvd, 0, p, CUDA_R_16BF, Tk,
								   (long long)nq * Tk, &zero, O, CUDA_R_32F, d->Hq * D, D,
								   GQ, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
		}
	}
	size_t tot = (size_t)n * d->Hq * D;

	attn_gate_kernel<<<(unsigned)((tot + 255) / 256), 256, 0, cs>>>(att + (size_t)seq->row0 * d->Hq * D, o,
									 qg + (size_t)seq->row0 * 2 * d->Hq * D, n,
									 d->Hq, D);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}
