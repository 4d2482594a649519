/* gpu_attn.cu - gated full attention on the GPU.
 *
 *   q3g_attn_prep     q_norm / k_norm (zero-centred RMSNorm over each head) and partial RoPE
 *                     (NeoX rotate-half on the first rot dims), q to bf16, k and v into the
 *                     session's cache (bf16) at the row's position.
 *   q3g_attn_decode   flash-decoding: a block per (row, kv head, split of the cached positions);
 *                     the GQA group's query heads share each K/V row read (one warp per key,
 *                     lanes over the head dims, fp32 online softmax); then a combine kernel
 *                     merges the splits by their log-sum-exp and applies sigmoid(gate).
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

/* ---- decode ---------------------------------------------------------------------------------- */

static __device__ __forceinline__ void load_bf16(const uint16_t *p, float *out, int n)
{
	/* n = 2, 4 or 8 consecutive bf16 */
	if (n == 8) {
		uint4 v = *(const uint4 *)p;
		uint32_t w[4] = { v.x, v.y, v.z, v.w };
#pragma unroll
		for (int i = 0; i < 4; i++) {
			out[2 * i] = __uint_as_float(w[i] << 16);
			out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
		}
	} else if (n == 4) {
		uint2 v = *(const uint2 *)p;
		uint32_t w[2] = { v.x, v.y };
#pragma unroll
		for (int i = 0; i < 2; i++) {
			out[2 * i] = __uint_as_float(w[i] << 16);
			out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
		}
	} else {
		uint32_t w = *(const uint32_t *)p;

		out[0] = __uint_as_float(w << 16);
		out[1] = __uint_as_float(w & 0xffff0000u);
	}
}

/* part: [R][Hq][nsplit][D + 2]: unnormalized output, then max and sum of the split. */
template <int DPL, int GQ>
__global__ void __launch_bounds__(Q3G_ATT_WARPS * 32) attn_decode_kernel(const uint16_t *q, float *part, int nsplit,
									   struct q3g_rows rows, int full, struct q3g_dims d)
{
	__shared__ float sm[Q3G_ATT_WARPS][GQ][2];
	__shared__ float sacc[Q3G_ATT_WARPS][DPL * 32];
	pdl_trigger();
	pdl_wait();
	const int kh = blockIdx.x, split = blockIdx.y, r = blockIdx.z;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, D = DPL * 32, kvd = d.Hkv * D;
	const int pos = rows.row_pos[r], nk = pos + 1, chunk = cdiv(nk, nsplit);
	const int j0 = split * chunk, j1 = min(nk, j0 + chunk);
	const struct q3g_seq sq = rows.seq[rows.row_seq[r]];
	const uint16_t *K = sq.kv + (size_t)full * 2 * d.max_ctx * kvd + (size_t)kh * D + lane * DPL;
	const uint16_t *V = K + (size_t)d.max_ctx * kvd;
	const float scale = rsqrtf((float)D);
	float qf[GQ][DPL], acc[GQ][DPL], m[GQ], l[GQ];

#pragma unroll
	for (int h = 0; h < GQ; h++) {
		load_bf16(q + ((size_t)r * d.Hq + kh * GQ + h) * D + lane * DPL, qf[h], DPL);
		m[h] = -INFINITY;
		l[h] = 0.0f;
#pragma unroll
		for (int i = 0; i < DPL; i++)
			acc[h][i] = 0.0f;
	}
	/* the warp's next key and value are loaded before the current ones are used (the last
	 * position again at the end rather than a load under a branch) */
	float kf[DPL], vf[DPL];

	if (j0 + warp < j1) {
		load_bf16(K + (size_t)(j0 + warp) * kvd, kf, DPL);
		load_bf16(V + (size_t)(j0 + warp) * kvd, vf, DPL);
	}
	for (int jj = j0 + warp; jj < j1; jj += Q3G_ATT_WARPS) {
		const int jn = jj + Q3G_ATT_WARPS < j1 ? jj + Q3G_ATT_WARPS : jj;
		float kn[DPL], vn[DPL], s[GQ];

		load_bf16(K + (size_t)jn * kvd, kn, DPL);
		load_bf16(V + (size_t)jn * kvd, vn, DPL);
#pragma unroll
		for (int h = 0; h < GQ; h++) {
			s[h] = 0.0f;
#pragma unroll
			for (int i = 0; i < DPL; i++)
				s[h] += qf[h][i] * kf[i];
		}
#pragma unroll
		for (int off = 16; off > 0; off >>= 1)
#pragma unroll
			for (int h = 0; h < GQ; h++)
				s[h] += __shfl_xor_sync(0xffffffffu, s[h], off);
#pragma unroll
		for (int h = 0; h < GQ; h++) {
			float sc = s[h] * scale, mn = fmaxf(m[h], sc);
			float corr = __expf(m[h] - mn), p = __expf(sc - mn);

			l[h] = l[h] * corr + p;
#pragma unroll
			for (int i = 0; i < DPL; i++)
				acc[h][i] = acc[h][i] * corr + p * vf[i];
			m[h] = mn;
		}
#pragma unroll
		for (int i = 0; i < DPL; i++) {
			kf[i] = kn[i];
			vf[i] = vn[i];
		}
	}
	/* merge the warps, one query head at a time */
#pragma unroll
	for (int h = 0; h < GQ; h++)
		if (lane == 0) {
			sm[warp][h][0] = m[h];
			sm[warp][h][1] = l[h];
		}
#pragma unroll
	for (int h = 0; h < GQ; h++) {
		__syncthreads();
#pragma unroll
		for (int i = 0; i < DPL; i++)
			sacc[warp][lane * DPL + i] = acc[h][i];
		__syncthreads();
		for (int dd = threadIdx.x; dd < D; dd += blockDim.x) {
			float M = -INFINITY, L = 0.0f, A = 0.0f;

			for (int w = 0; w < Q3G_ATT_WARPS; w++)
				M = fmaxf(M, sm[w][h][0]);
			for (int w = 0; w < Q3G_ATT_WARPS; w++) {
				float f = sm[w][h][0] == -INFINITY ? 0.0f : __expf(sm[w][h][0] - M);

				L += sm[w][h][1] * f;
				A += sacc[w][dd] * f;
			}
			float *pp = part + (((size_t)r * d.Hq + kh * GQ + h) * nsplit + split) * (D + 2);

			pp[dd] = A;
			if (dd == 0) {
				pp[D] = M;
				pp[D + 1] = L;
			}
		}
	}
}

/* Block (row, query head), D threads: merge the splits, normalize, gate.  Every load is issued
 * before the first is used (the splits' values of a dim into registers, clamped to the last
 * split rather than under a branch; the splits' max and sum through shared memory): a loop of
 * loads each used at once took a round trip to L2 per split. */
static_assert(Q3G_ATT_SPLITS <= 64, "the combine's threads (a dim each, 64 at least) load the splits' max and sum");
__global__ void __launch_bounds__(Q3G_MAX_HEAD_DIM) attn_combine_kernel(uint16_t *att, const float *part,
									 const float *qg, int nsplit, int Hq, int D)
{
	__shared__ float ms[Q3G_ATT_SPLITS], ls[Q3G_ATT_SPLITS];
	pdl_trigger();
	pdl_wait();
	const int r = blockIdx.x, h = blockIdx.y, dd = threadIdx.x;
	const float *pp = part + ((size_t)r * Hq + h) * nsplit * (D + 2);
	const float g = qg[(size_t)r * 2 * Hq * D + (size_t)h * 2 * D + D + dd];
	float a[Q3G_ATT_SPLITS], M = -INFINITY, L = 0.0f, A = 0.0f;

#pragma unroll
	for (int s = 0; s < Q3G_ATT_SPLITS; s++)
		a[s] = pp[min(s, nsplit - 1) * (D + 2) + dd];
	if (dd < nsplit) {
		ms[dd] = pp[dd * (D + 2) + D];
		ls[dd] = pp[dd * (D + 2) + D + 1];
	}
	__syncthreads();
	for (int s = 0; s < nsplit; s++)
		M = fmaxf(M, ms[s]);
#pragma unroll
	for (int s = 0; s < Q3G_ATT_SPLITS; s++) {
		if (s >= nsplit)
			break;
		const float f = ms[s] == -INFINITY ? 0.0f : __expf(ms[s] - M);

		L += ls[s] * f;
		A += a[s] * f;
	}
	att[((size_t)r * Hq + h) * D + dd] = f2h_bits(A / L * dev_sigmoid(g));
}

template <int DPL>
static int launch_decode_gq(const uint16_t *q, float *part, int nsplit, struct q3g_rows rows, int R, int full,
			    const struct q3g_dims *d, cudaStream_t st, q3_err *e)
{
	dim3 grid(d->Hkv, nsplit, R);
	int gq = d->Hq / d->Hkv;

	void (*k)(const uint16_t *, float *, int, struct q3g_rows, int, struct q3g_dims) =
		gq == 1 ? attn_decode_kernel<DPL, 1> : gq == 2 ? attn_decode_kernel<DPL, 2>
		: gq == 4 ? attn_decode_kernel<DPL, 4> : gq == 8 ? attn_decode_kernel<DPL, 8> : NULL;

	if (!k)
		return q3_errf(e, -EINVAL, "attention: %d query heads per kv head not supported", gq);
	CUDA_CHECK(e, q3g_launch(k, grid, Q3G_ATT_WARPS * 32, 0, st, q, part, nsplit, rows, full, *d));
	return 0;
}

extern "C" int q3g_attn_splits(int R, int Hkv)
{
	const int n = 2 * q3g_dev.sms / max(1, Hkv * R);

	return max(1, min(Q3G_ATT_SPLITS, n));
}

extern "C" int q3g_attn_decode(uint16_t *att, const uint16_t *q, const float *qg, float *part, int nsplit,
			       struct q3g_rows rows, int R, int full, const struct q3g_dims *d, q3g_stream st,
			       q3_err *e)
{
	cudaStream_t s = (cudaStream_t)st;
	int err;

	if (d->Hq % d->Hkv || nsplit < 1 || nsplit > Q3G_ATT_SPLITS)
		return q3_errf(e, -EINVAL, "attention: %d query heads over %d kv heads, %d splits", d->Hq, d->Hkv, nsplit);
	switch (d->D) {
	case 64: err = launch_decode_gq<2>(q, part, nsplit, rows, R, full, d, s, e); break;
	case 128: err = launch_decode_gq<4>(q, part, nsplit, rows, R, full, d, s, e); break;
	case 256: err = launch_decode_gq<8>(q, part, nsplit, rows, R, full, d, s, e); break;
	default: return q3_errf(e, -EINVAL, "attention: head_dim %d not supported (64, 128, 256)", d->D);
	}
	if (err)
		return err;
	CUDA_CHECK(e, q3g_launch(attn_combine_kernel, dim3(R, d->Hq), d->D, 0, s, att, part, qg, nsplit, d->Hq, d->D));
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
