/* gpu_gdn.cu - Gated DeltaNet on the GPU: the causal depthwise conv1d + SiLU with its state, and
 * the gated delta rule (l2norm of q and k, the gates, the recurrence, optionally the gated norm).
 *
 * The recurrence runs token after token, in fp32, with the state in registers: a warp per
 * Q3G_DELTA_CPW value columns of a value head (decode batches: two or four such groups), each lane
 * holding Dk / 32 keys of those columns.
 * Per token the two products Sᵀk and Sᵀq come from the state before the update
 * (o = α·S_oldᵀq + δ·(k·q), with δ = β(v − α·S_oldᵀk), then S = α·S + k δᵀ), so one round of warp
 * reductions per token serves both.  Decode (one token a sequence) runs the conv step, the
 * recurrence and the gated norm in one kernel; prefill (a sequence's tokens of the call, one after
 * the other) stages its inputs by chunks of tokens (see "delta rule, prefill").  The state is
 * stored transposed ([Dv][Dk]) so that a warp reads its columns' keys with coalesced loads.
 */
#include "gpu_internal.h"

/* ---- conv1d ----------------------------------------------------------------------------------- */

/* One thread per (row, channel).  The window of row r at position p is the inputs at p-W+1 .. p:
 * rows of the same call for positions >= the sequence's first, the read state before that, and
 * zeros before position 0.  Rows among the last W-1 of their sequence write the new state; the
 * first row also carries old state entries when the call is shorter than W-1. */
__global__ void conv1d_silu_kernel(float *u, const float *qkvz, int ldq, const float *cw, struct q3g_rows rows,
				   int R, int C, int W, int lin)
{
	int r = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;

	if (c >= C)
		return;
	const struct q3g_seq sq = rows.seq[rows.row_seq[r]];
	const int p = rows.row_pos[r], p0 = sq.pos, pe = sq.pos + sq.n, S = W - 1;
	const float *rd = sq.conv_rd + (size_t)lin * S * C;
	float *wr = sq.conv_wr + (size_t)lin * S * C;
	float acc = 0.0f;

	for (int m = 0; m < W; m++) {
		int pp = p - S + m;
		float in = 0.0f;

		if (pp >= p0)
			in = qkvz[(size_t)(sq.row0 + pp - p0) * ldq + c];
		else if (pp >= 0)
			in = rd[(size_t)(S - p0 + pp) * C + c];
		acc += cw[(size_t)c * W + m] * in;
	}
	u[(size_t)r * C + c] = dev_silu(acc);
	/* new state slot j holds the input at pe - S + j */
	int j = p - pe + S;
	if (j >= 0)
		wr[(size_t)j * C + c] = qkvz[(size_t)r * ldq + c];
	if (p == p0)
		for (j = 0; j < S && pe - S + j < p0; j++) {
			int pp = pe - S + j;

			wr[(size_t)j * C + c] = pp >= 0 ? rd[(size_t)(S - p0 + pp) * C + c] : 0.0f;
		}
}

extern "C" int q3g_conv1d_silu(float *u, const float *qkvz, int ldq, const float *cw, struct q3g_rows rows,
			       int R, int nseq, int lin, const struct q3g_dims *d, q3g_stream st, q3_err *e)
{
	dim3 grid(R, cdiv(d->conv_dim, 256));

	conv1d_silu_kernel<<<grid, 256, 0, (cudaStream_t)st>>>(u, qkvz, ldq, cw, rows, R, d->conv_dim, d->W, lin);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

/* ---- delta rule ------------------------------------------------------------------------------- */

struct delta_args {
	const float *u;	     /* [R][conv_dim]: q | k | v after the conv (prefill) */
	const float *qkvz;   /* [R][ldq]: the conv inputs (decode: the conv is done here) */
	const float *cw;     /* [conv_dim][W] */
	int ldq, W;
	const float *ba;     /* [R][2 Nv]: b | a */
	const float *A_log, *dt_bias, *normw;
	float *o;	     /* [R][value_dim] */
	uint16_t *core;	     /* [R][value_dim] (fused norm) */
	const float *z;
	int ldz;
	struct q3g_rows rows;
	int lin, Nk, Nv, Dk, Dv, conv_dim, key_dim;
	float eps;
};

/* Decode's conv of channel ch (one token at position pos): its weights, the read state (slot m
 * holds the input at pos - (W-1) + m; zeros before position 0) and the new input, all loaded
 * before any is used.  (Two channels a thread in flight, for the 32 threads that have two at
 * Dk = 128, spilled at 64 registers and took the delta rule from 23.6 to 29.0 us at 16 rows.) */
struct conv_in {
	float w[Q3G_MAX_CONV - 1], s[Q3G_MAX_CONV - 1]; /* the slots' weights and values */
	float wx, x;					/* the new input's */
};

static __device__ __forceinline__ conv_in conv_load(const delta_args &A, const float *xr, const float *rd, int pos,
						    int ch)
{
	const int S = A.W - 1;
	conv_in c;

#pragma unroll
	for (int m = 0; m < Q3G_MAX_CONV - 1; m++) {
		c.w[m] = m < S ? A.cw[(size_t)ch * A.W + m] : 0.0f;
		c.s[m] = m < S && pos - S + m >= 0 ? rd[(size_t)m * A.conv_dim + ch] : 0.0f;
	}
	c.wx = A.cw[(size_t)ch * A.W + S];
	c.x = xr[ch];
	return c;
}

/* conv1d + SiLU (the sum in the order of conv1d_silu_kernel's: the new input first) */
static __device__ __forceinline__ float conv_out(const delta_args &A, const conv_in &c, int pos)
{
	const int S = A.W - 1;
	float acc = c.wx * c.x;

#pragma unroll
	for (int m = 0; m < Q3G_MAX_CONV - 1; m++)
		if (m < S && pos - S + m >= 0)
			acc += c.w[m] * c.s[m];
	return dev_silu(acc);
}

/* ... and the channel's state after the token: slot m := slot m + 1, the last slot := the input. */
static __device__ __forceinline__ void conv_shift(const delta_args &A, const conv_in &c, float *wr, int ch)
{
	const int S = A.W - 1;

#pragma unroll
	for (int m = 0; m < Q3G_MAX_CONV - 1; m++)
		if (m + 1 < S)
			wr[(size_t)m * A.conv_dim + ch] = c.s[m + 1];
	wr[(size_t)(S - 1) * A.conv_dim + ch] = c.x;
}

/* The gates of value head j for one token: alpha = exp(g), g = -exp(A_log)·softplus(a + dt_bias)
 * (negA = -exp(A_log)), and beta = sigmoid(b). */
static __device__ __forceinline__ void delta_gates(float *alpha, float *beta, float b, float a, float negA, float dtb)
{
	const float x = a + dtb, sp = x > 20.0f ? x : log1pf(expf(x));

	*beta = 1.0f / (1.0f + expf(-b));
	*alpha = expf(negA * sp);
}

/* A warp's eight state products of one token, x = Sᵀk of its four columns | Sᵀq of them (each
 * lane's part over its KPL inputs), summed over the warp by a reduce-scatter: 4 + 2 + 1 shuffles
 * leave each group of four lanes one product summed over eight lanes, 2 more finish it, one
 * more fetches the other half: 10, not the 40 of a butterfly per product.  Lane l ends with
 * column (l >> 2) & 3's (Sᵀk, Sᵀq).  The same order in decode and prefill. */
static __device__ __forceinline__ float2 delta_state_sums(const float x[8], int lane)
{
	const bool hi = lane & 16; /* lanes with bit 4 keep the Sᵀq half, bit 3 a pair of it, bit 2 one */
	float y[4], z[2], w;

#pragma unroll
	for (int i = 0; i < 4; i++)
		y[i] = (hi ? x[4 + i] : x[i]) + __shfl_xor_sync(0xffffffffu, hi ? x[i] : x[4 + i], 16);
#pragma unroll
	for (int i = 0; i < 2; i++)
		z[i] = (lane & 8 ? y[2 + i] : y[i]) + __shfl_xor_sync(0xffffffffu, lane & 8 ? y[i] : y[2 + i], 8);
	w = (lane & 4 ? z[1] : z[0]) + __shfl_xor_sync(0xffffffffu, lane & 4 ? z[0] : z[1], 4);
	w += __shfl_xor_sync(0xffffffffu, w, 2);
	w += __shfl_xor_sync(0xffffffffu, w, 1);
	const float other = __shfl_xor_sync(0xffffffffu, w, 16);

	return hi ? make_float2(other, w) : make_float2(w, other);
}

/* A lane's KPL keys of a column: 16-byte accesses where KPL allows (the lane's keys start at a
 * multiple of KPL, the column's at a multiple of Dk), streaming (read and written once a step:
 * evict-first, so that they do not push the weights out of L2). */
template <int KPL> static __device__ __forceinline__ void state_load(float *s, const float *p)
{
	if constexpr (KPL % 4 == 0) {
#pragma unroll
		for (int v = 0; v < KPL / 4; v++) {
			const float4 t = __ldcs((const float4 *)p + v);

			s[4 * v] = t.x, s[4 * v + 1] = t.y, s[4 * v + 2] = t.z, s[4 * v + 3] = t.w;
		}
	} else {
#pragma unroll
		for (int i = 0; i < KPL; i++)
			s[i] = __ldcs(p + i);
	}
}

template <int KPL> static __device__ __forceinline__ void state_store(float *p, const float *s)
{
	if constexpr (KPL % 4 == 0) {
#pragma unroll
		for (int v = 0; v < KPL / 4; v++)
			__stcs((float4 *)p + v, make_float4(s[4 * v], s[4 * v + 1], s[4 * v + 2], s[4 * v + 3]));
	} else {
#pragma unroll
		for (int i = 0; i < KPL; i++)
			__stcs(p + i, s[i]);
	}
}

/* Decode: every sequence feeds one token (the host's tables give decode one row a sequence); the
 * conv is computed here from the projections (and the conv state advanced), and the output is
 * gated-normed into core.  CL > 1 (sm_90): a head's columns are split over a cluster of CL blocks,
 * which add up the gated norm's sum of squares through distributed shared memory (32 blocks, one
 * per head, left 100 of 132 SMs idle).  G: column groups of CPW a warp.  Each group is summed as
 * a warp of G = 1 sums its columns, and the norm's sum goes by the G = 1 kernel's tree (groups of
 * four columns, a block's warps' groups to a part, the parts in order), so that G over a cluster
 * of CL blocks gives the bits of G = 1 over G·CL blocks of as many warps: a sequence's output does
 * not depend on its batch, whose size picks G (delta_groups below). */
template <int KPL, int CL, int G>
__global__ void __launch_bounds__(G == 1 ? 1024 : 256, G == 1 ? 1 : G == 2 ? 3 : 2)
	delta_decode_kernel(const __grid_constant__ delta_args A)
{
	static_assert(Q3G_DELTA_CPW == 4, "the reduce-scatter hands 8 sums to 8 groups of 4 lanes");
	constexpr int CPW = Q3G_DELTA_CPW;
	__shared__ float red[32 * G];
	__shared__ float cqkv[2 * Q3G_MAX_DK + 32 * CPW]; /* q | k | v after the conv */
	__shared__ cluster_sum<CL, G> cs;		  /* the head's sum of squares, G parts a block */
	cs.init();
	pdl_trigger();
	pdl_wait();
	/* block (sequence, value head, column slice): the whole head (its gated norm spans it) or,
	 * with CL > 1, a slice of a cluster that shares the norm's sum */
	const int s = blockIdx.x, j = blockIdx.y, kh = j / (A.Nv / A.Nk), nw = blockDim.x / 32;
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, i0 = lane * KPL;
	const int c0 = (blockIdx.z * nw + warp) * G * CPW; /* group g: columns c0 + g·CPW .. */
	const int col = (lane >> 2) & 3; /* the column of a group whose state products this lane ends with */
	const struct q3g_seq sq = A.rows.seq[s];
	const int row = sq.row0, pos = sq.pos;
	float *Sg = sq.rec + ((size_t)A.lin * A.Nv + j) * A.Dv * A.Dk + (size_t)c0 * A.Dk + i0;
	const float qscale = rsqrtf((float)A.Dk);
	const float negA = -expf(A.A_log[j]), dtb = A.dt_bias[j];
	float S[G][CPW][KPL];

#pragma unroll
	for (int g = 0; g < G; g++)
#pragma unroll
		for (int c = 0; c < CPW; c++) {
			if (pos > 0) {
				state_load<KPL>(S[g][c], Sg + (size_t)(g * CPW + c) * A.Dk);
			} else {
#pragma unroll
				for (int i = 0; i < KPL; i++)
					S[g][c][i] = 0.0f;
			}
		}
	/* what the end of the step needs, in flight with the conv's loads: the gates' inputs, and
	 * column col's output gate z and norm weight (lanes 0, 4, 8, 12 use them) */
	const float b = A.ba[(size_t)row * 2 * A.Nv + j], a = A.ba[(size_t)row * 2 * A.Nv + A.Nv + j];
	float zc[G], nwc[G];

#pragma unroll
	for (int g = 0; g < G; g++) {
		zc[g] = A.z[(size_t)row * A.ldz + (size_t)j * A.Dv + c0 + g * CPW + col];
		nwc[g] = A.normw[c0 + g * CPW + col];
	}
	float q[KPL], k[KPL];
	float sqq = 0.0f, skk = 0.0f, sqk = 0.0f;

	/* the conv of the head's q, k and v channels, once per channel (not once per warp: the warps
	 * of a key head all need its q and k), through shared memory; q and k whole, v of this
	 * block's columns [vbase, vbase + vs); the new state of q and k by the key head's first block */
	const float *xr = A.qkvz + (size_t)row * A.ldq;
	const float *rd = sq.conv_rd + (size_t)A.lin * (A.W - 1) * A.conv_dim;
	float *wr = sq.conv_wr + (size_t)A.lin * (A.W - 1) * A.conv_dim;
	const int vs = A.Dv / CL, vbase = blockIdx.z * vs, nch = 2 * A.Dk + vs;
	const bool qk_state = j % (A.Nv / A.Nk) == 0 && blockIdx.z == 0;

	for (int c = threadIdx.x; c < nch; c += blockDim.x) {
		const int ch = c < A.Dk ? kh * A.Dk + c : c < 2 * A.Dk ? A.key_dim + kh * A.Dk + c - A.Dk
			       : 2 * A.key_dim + j * A.Dv + vbase + c - 2 * A.Dk;
		const conv_in ci = conv_load(A, xr, rd, pos, ch);

		cqkv[c < 2 * A.Dk ? c : c + vbase] = conv_out(A, ci, pos);
		if (c >= 2 * A.Dk || qk_state)
			conv_shift(A, ci, wr, ch);
	}
	__syncthreads();
#pragma unroll
	for (int i = 0; i < KPL; i++) {
		q[i] = cqkv[i0 + i];
		k[i] = cqkv[A.Dk + i0 + i];
	}
#pragma unroll
	for (int i = 0; i < KPL; i++) {
		sqq += q[i] * q[i];
		skk += k[i] * k[i];
		sqk += q[i] * k[i];
	}
	float2 kq[G];

#pragma unroll
	for (int g = 0; g < G; g++) {
		float x[2 * CPW];

#pragma unroll
		for (int cc = 0; cc < CPW; cc++) {
			x[cc] = x[CPW + cc] = 0.0f;
#pragma unroll
			for (int i = 0; i < KPL; i++) {
				x[cc] += S[g][cc][i] * k[i];
				x[CPW + cc] += S[g][cc][i] * q[i];
			}
		}
		kq[g] = delta_state_sums(x, lane);
	}
	sqq = warp_sum(sqq);
	skk = warp_sum(skk);
	sqk = warp_sum(sqk);
	const float rq = rsqrtf(sqq + 1e-6f) * qscale, rk = rsqrtf(skk + 1e-6f);
	const float qk = sqk * rq * rk;
	float alpha, beta, oc[G];

	delta_gates(&alpha, &beta, b, a, negA, dtb);
#pragma unroll
	for (int g = 0; g < G; g++) {
		/* products with the normalized q and k: scale the raw ones (column c's, in this lane) */
		const float vc = cqkv[2 * A.Dk + c0 + g * CPW + col];
		const float delta = beta * (vc - alpha * (kq[g].x * rk));
		float d[CPW];

		oc[g] = alpha * (kq[g].y * rq) + delta * qk;
#pragma unroll
		for (int cc = 0; cc < CPW; cc++)
			d[cc] = __shfl_sync(0xffffffffu, delta, 4 * cc);
#pragma unroll
		for (int cc = 0; cc < CPW; cc++) {
#pragma unroll
			for (int i = 0; i < KPL; i++)
				S[g][cc][i] = alpha * S[g][cc][i] + (k[i] * rk) * d[cc];
			state_store<KPL>(Sg + (size_t)(g * CPW + cc) * A.Dk, S[g][cc]);
		}
		/* the group's four columns' squares, in lane 0 (from lanes 0, 4, 8, 12) */
		float ss = oc[g] * oc[g];

		ss += __shfl_xor_sync(0xffffffffu, ss, 4);
		ss += __shfl_xor_sync(0xffffffffu, ss, 8);
		if (lane == 0)
			red[warp * G + g] = ss;
	}
	__syncthreads();
	/* the head's sum: parts of nw groups each (a block of the G = 1 kernel), the parts in rank
	 * order over the cluster (deterministic) */
	float part[G];

#pragma unroll
	for (int g = 0; g < G; g++)
		part[g] = warp_sum(lane < nw ? red[g * nw + lane] : 0.0f);
	const float rs = rsqrtf(cs.sum_all(part) / (float)A.Dv + A.eps);

	if ((lane & 19) == 0) /* lanes 0, 4, 8, 12: columns 0-3 of each group */
#pragma unroll
		for (int g = 0; g < G; g++)
			A.core[(size_t)row * A.Nv * A.Dv + (size_t)j * A.Dv + c0 + g * CPW + col] =
				f2h_bits(nwc[g] * (oc[g] * rs) * dev_silu(zc[g]));
}

/* ---- delta rule, prefill ----------------------------------------------------------------------
 * The recurrence is sequential in the tokens, so a prompt's time is its length times one token's
 * step in a warp.  That step was 0.95 us (3.9 ms a Gated DeltaNet layer for 4096 tokens, a block
 * of 16 warps per head and half): each warp reduced 11 sums over its lanes (55 shuffles, and an
 * SM issues one a cycle) and waited for the next token's loads from DRAM.  Here:
 *  - the inputs (q, k, the block's v columns, b, a) are staged in shared memory by chunks of tc
 *    tokens with cp.async, the next chunk in flight while this one runs;
 *  - a chunk's norms of q and k, q·k and gates are computed first, a warp a token, not by every
 *    warp for every token;
 *  - a token's eight state products (Sᵀk and Sᵀq of the warp's four columns) are summed over the
 *    warp by a reduce-scatter (4 + 2 + 1 shuffles leave each group of four lanes one product
 *    summed over eight lanes, 2 more finish it), and 5 shuffles hand the results on: 14, not 55;
 *  - blocks of 8 warps (four per head at Dv 128): 128 of the device's SMs for one sequence.
 * The sums are the same for every row of the chunk and every chunk size: a fixed order. */
#define DELTA_PF_WARPS 8
#define DELTA_TC 32

/* Floats of one staged token: q [Dk] | k [Dk] | v [VS] | b | a, padded to 16 bytes. */
static __host__ __device__ __forceinline__ int delta_tok_floats(int Dk, int VS)
{
	return 2 * Dk + VS + 4;
}

static size_t delta_pf_smem(int Dk, int VS, int tc)
{
	return ((size_t)2 * tc * delta_tok_floats(Dk, VS) + (size_t)tc * 5) * sizeof(float);
}

/* Starts copying the inputs of n tokens from row row0 into buf (one commit group by the caller). */
static __device__ void delta_stage(float *buf, const delta_args &A, int row0, int n, int kh, int j, int vb, int VS)
{
	const int Dk = A.Dk, per = delta_tok_floats(Dk, VS), q4 = Dk / 4, n4 = 2 * q4 + VS / 4;

	for (int i = threadIdx.x; i < n * n4; i += blockDim.x) {
		const int t = i / n4, o = i % n4;
		const float *ur = A.u + (size_t)(row0 + t) * A.conv_dim;
		const float *src = o < q4 ? ur + kh * Dk + 4 * o
				 : o < 2 * q4 ? ur + A.key_dim + kh * Dk + 4 * (o - q4)
					      : ur + 2 * A.key_dim + j * A.Dv + vb + 4 * (o - 2 * q4);

		cp_async16(buf + (size_t)t * per + 4 * o, src);
	}
	for (int i = threadIdx.x; i < 2 * n; i += blockDim.x)
		cp_async4(buf + (size_t)(i >> 1) * per + 2 * Dk + VS + (i & 1),
			  A.ba + (size_t)(row0 + (i >> 1)) * 2 * A.Nv + (i & 1) * A.Nv + j);
}

template <int KPL>
__global__ void __launch_bounds__(32 * DELTA_PF_WARPS) delta_prefill_kernel(const __grid_constant__ delta_args A,
									    int tc)
{
	static_assert(Q3G_DELTA_CPW == 4, "the reduce-scatter hands 8 sums to 8 groups of 4 lanes");
	constexpr int CPW = Q3G_DELTA_CPW;
	extern __shared__ float4 dsm4[];
	float *dsm = (float *)dsm4;
	pdl_trigger();
	pdl_wait();
	const int s = blockIdx.x, j = blockIdx.y, kh = j / (A.Nv / A.Nk), Dk = A.Dk;
	const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, i0 = lane * KPL;
	const int VS = nw * CPW, vb = blockIdx.z * VS, c0 = vb + warp * CPW;
	const int per = delta_tok_floats(Dk, VS), bufsz = tc * per;
	float *gt = dsm + 2 * bufsz; /* [tc][5]: rq (with Dk^-1/2), rk, q̂·k̂, alpha, beta */
	const struct q3g_seq sq = A.rows.seq[s];
	float *Sg = sq.rec + ((size_t)A.lin * A.Nv + j) * A.Dv * Dk;
	const float qscale = rsqrtf((float)Dk), negA = -expf(A.A_log[j]), dtb = A.dt_bias[j];
	const int nch = cdiv(sq.n, tc), c = (lane >> 2) & 3; /* the column whose sums this lane ends with */
	float S[CPW][KPL];

#pragma unroll
	for (int cc = 0; cc < CPW; cc++)
#pragma unroll
		for (int i = 0; i < KPL; i++)
			S[cc][i] = sq.pos > 0 ? Sg[(size_t)(c0 + cc) * Dk + i0 + i] : 0.0f;
	if (nch > 0)
		delta_stage(dsm, A, sq.row0, min(tc, sq.n), kh, j, vb, VS);
	cp_async_commit();
	for (int ch = 0; ch < nch; ch++) {
		const float *buf = dsm + (ch & 1) * bufsz;
		const int r0 = sq.row0 + ch * tc, n = min(tc, sq.n - ch * tc);

		if (ch + 1 < nch)
			delta_stage(dsm + ((ch + 1) & 1) * bufsz, A, r0 + tc, min(tc, sq.n - (ch + 1) * tc), kh, j, vb, VS);
		cp_async_commit();
		cp_async_wait<1>(); /* this chunk's group has landed (the next one may still fly) */
		__syncthreads();
		/* the chunk's norms, q·k and gates: a warp a token */
		for (int t = warp; t < n; t += nw) {
			const float *bt = buf + (size_t)t * per;
			float sqq = 0.0f, skk = 0.0f, sqk = 0.0f;

#pragma unroll
			for (int i = 0; i < KPL; i++) {
				const float q = bt[i0 + i], k = bt[Dk + i0 + i];

				sqq += q * q;
				skk += k * k;
				sqk += q * k;
			}
			sqq = warp_sum(sqq);
			skk = warp_sum(skk);
			sqk = warp_sum(sqk);
			if (lane == 0) {
				const float rq = rsqrtf(sqq + 1e-6f) * qscale, rk = rsqrtf(skk + 1e-6f);
				float alpha, beta;

				delta_gates(&alpha, &beta, bt[2 * Dk + VS], bt[2 * Dk + VS + 1], negA, dtb);
				gt[t * 5 + 0] = rq;
				gt[t * 5 + 1] = rk;
				gt[t * 5 + 2] = sqk * rq * rk;
				gt[t * 5 + 3] = alpha;
				gt[t * 5 + 4] = beta;
			}
		}
		__syncthreads();
		for (int t = 0; t < n; t++) {
			const float *bt = buf + (size_t)t * per;
			const float rq = gt[t * 5], rk = gt[t * 5 + 1], qk = gt[t * 5 + 2], alpha = gt[t * 5 + 3],
				    beta = gt[t * 5 + 4];
			float q[KPL], k[KPL], x[2 * CPW];

#pragma unroll
			for (int i = 0; i < KPL; i++) {
				q[i] = bt[i0 + i];
				k[i] = bt[Dk + i0 + i];
			}
#pragma unroll
			for (int cc = 0; cc < CPW; cc++) {
				x[cc] = x[CPW + cc] = 0.0f;
#pragma unroll
				for (int i = 0; i < KPL; i++) {
					x[cc] += S[cc][i] * k[i];
					x[CPW + cc] += S[cc][i] * q[i];
				}
			}
			const float2 kq = delta_state_sums(x, lane);
			const float kv = kq.x * rk, qs = kq.y * rq;
			const float delta = beta * (bt[2 * Dk + warp * CPW + c] - alpha * kv);
			float d[CPW];

			if ((lane & 19) == 0) /* lanes 0, 4, 8, 12: columns 0-3 */
				A.o[(size_t)(r0 + t) * A.Nv * A.Dv + (size_t)j * A.Dv + c0 + c] = alpha * qs + delta * qk;
#pragma unroll
			for (int cc = 0; cc < CPW; cc++)
				d[cc] = __shfl_sync(0xffffffffu, delta, 4 * cc);
#pragma unroll
			for (int cc = 0; cc < CPW; cc++)
#pragma unroll
				for (int i = 0; i < KPL; i++)
					S[cc][i] = alpha * S[cc][i] + (k[i] * rk) * d[cc];
		}
		__syncthreads(); /* the buffer is staged into again two chunks on */
	}
#pragma unroll
	for (int cc = 0; cc < CPW; cc++)
#pragma unroll
		for (int i = 0; i < KPL; i++)
			Sg[(size_t)(c0 + cc) * Dk + i0 + i] = S[cc][i];
}

template <int CL, int G> static void (*delta_decode_for(int Dk))(const delta_args)
{
	if constexpr (G == 1) /* keys of 256 stay at G = 1 (delta_groups): no other instance */
		if (Dk == 256)
			return delta_decode_kernel<8, CL, 1>;
	return Dk == 32 ? delta_decode_kernel<1, CL, G> : Dk == 64 ? delta_decode_kernel<2, CL, G>
	       : Dk == 128 ? delta_decode_kernel<4, CL, G> : nullptr;
}

static void (*delta_prefill_for(int Dk))(const delta_args, int)
{
	return Dk == 32 ? delta_prefill_kernel<1> : Dk == 64 ? delta_prefill_kernel<2>
	       : Dk == 128 ? delta_prefill_kernel<4> : delta_prefill_kernel<8>;
}

int q3g_delta_init(q3_err *e)
{
	int err;

	for (int dk = 32; dk <= 256; dk *= 2)
		if ((err = q3g_allow_dyn_smem(delta_prefill_for(dk), "delta_prefill_kernel", e)))
			return err;
	return 0;
}

/* Decode heads split over a cluster of this many blocks (sm_90, whole warps each). */
#define DELTA_CLUSTER 4
/* Column groups a decode warp takes (G) for a batch of nseq sequences: more groups a warp, fewer
 * warps, each with the others' share of the conv, the loads' addresses and the gates; G = 4 is a
 * block a head, no cluster.  H200, bench_kernels --gdn R, the delta rule at 2 / 4 / 8 / 16 rows,
 * G = 1 5.29 / 8.27 / 12.98 / 24.7 us, G = 2 4.78 / 6.71 / 11.7 / 20.9, G = 4 - / 6.20 / 9.4 /
 * 18.85; at one row G = 1's 128 blocks (4.4 us) keep more SMs busy.  Keys of 256 stay at G = 1:
 * a lane's state would be 8·G floats a column, and G = 2 spills 152 bytes, G = 4 320 (ptxas). */
static int delta_groups(int nseq, int Dk)
{
	if (Dk > 128)
		return 1;
	return nseq >= 4 ? 4 : nseq >= 2 ? 2 : 1;
}

static int launch_decode(const delta_args &A, int nseq, cudaStream_t st, q3_err *e)
{
	const int warps = A.Dv / Q3G_DELTA_CPW;
	const dim3 block(32 * warps / DELTA_CLUSTER);

	if (q3g_dev.clusters && warps % DELTA_CLUSTER == 0) {
		/* the same warps a block for every G, so that a head's norm sums by the same tree */
		static_assert(DELTA_CLUSTER == 4, "G = 1, 2, 4 split a head over 4, 2, 1 blocks");
		const int G = delta_groups(nseq, A.Dk), CL = DELTA_CLUSTER / G;
		void (*k)(const delta_args) = G == 4 ? delta_decode_for<1, 4>(A.Dk)
					      : G == 2 ? delta_decode_for<2, 2>(A.Dk) : delta_decode_for<4, 1>(A.Dk);

		CUDA_CHECK(e, q3g_launch_cluster(k, dim3(nseq, A.Nv, CL), block, 0, st, dim3(1, 1, CL), A));
		return 0;
	}
	CUDA_CHECK(e, q3g_launch(delta_decode_for<1, 1>(A.Dk), dim3(nseq, A.Nv), dim3(32 * warps), 0, st, A));
	return 0;
}

static int launch_prefill(const delta_args &A, int nseq, cudaStream_t st, q3_err *e)
{
	const int warps = A.Dv / Q3G_DELTA_CPW;
	int nw = DELTA_PF_WARPS, tc = DELTA_TC;

	while (warps % nw) /* the largest divisor of the head's warps up to 8 */
		nw--;
	while (tc > 1 && delta_pf_smem(A.Dk, nw * Q3G_DELTA_CPW, tc) > q3g_dev.smem_dyn)
		tc /= 2;
	CUDA_CHECK(e, q3g_launch(delta_prefill_for(A.Dk), dim3(nseq, A.Nv, warps / nw), dim3(32 * nw),
				 delta_pf_smem(A.Dk, nw * Q3G_DELTA_CPW, tc), st, A, tc));
	return 0;
}

/* Both entry points: decode (cw given: the conv and the gated norm fused, into core) or prefill
 * (cw NULL: into o). */
static int delta(const float *u, int ldq, const float *cw, const float *ba, const float *A_log, const float *dt_bias,
		 float *o, uint16_t *core, const float *z, int ldz, const float *normw, struct q3g_rows rows, int nseq,
		 int lin, const struct q3g_dims *d, cudaStream_t st, q3_err *e)
{
	delta_args A;
	int kpl = d->Dk / 32;

	if (d->Dk % 32 || (kpl != 1 && kpl != 2 && kpl != 4 && kpl != 8) || d->Dv % Q3G_DELTA_CPW ||
	    32 * d->Dv / Q3G_DELTA_CPW > 1024 || d->Nv % d->Nk)
		return q3_errf(e, -EINVAL, "delta rule: key head %d / value head %d not supported (key 32..256 by "
			       "powers of 2, value a multiple of %d up to %d)", d->Dk, d->Dv, Q3G_DELTA_CPW,
			       1024 * Q3G_DELTA_CPW / 32);
	if (cw && (d->W < 2 || d->W > Q3G_MAX_CONV))
		return q3_errf(e, -EINVAL, "delta rule: decode takes a conv kernel of 2 to %d, not %d", Q3G_MAX_CONV, d->W);
	if (cw ? !core || !z || !normw : !o)
		return q3_errf(e, -EINVAL, "delta rule: %s", cw ? "decode needs its output core, the gate z and the norm's "
			       "weights" : "prefill needs its output o");
	memset(&A, 0, sizeof(A));
	if (cw) {
		A.qkvz = u;
		A.cw = cw;
		A.ldq = ldq;
	} else {
		A.u = u;
	}
	A.W = d->W;
	A.ba = ba;
	A.A_log = A_log;
	A.dt_bias = dt_bias;
	A.normw = normw;
	A.o = o;
	A.core = core;
	A.z = z;
	A.ldz = ldz;
	A.rows = rows;
	A.lin = lin;
	A.Nk = d->Nk;
	A.Nv = d->Nv;
	A.Dk = d->Dk;
	A.Dv = d->Dv;
	A.conv_dim = d->conv_dim;
	A.key_dim = d->key_dim;
	A.eps = d->eps;
	return cw ? launch_decode(A, nseq, st, e) : launch_prefill(A, nseq, st, e);
}

extern "C" int q3g_delta(const float *u, const float *ba, const float *A_log, const float *dt_bias, float *o,
			 struct q3g_rows rows, int nseq, int lin, const struct q3g_dims *d, q3g_stream st, q3_err *e)
{
	return delta(u, 0, NULL, ba, A_log, dt_bias, o, NULL, NULL, 0, NULL, rows, nseq, lin, d, (cudaStream_t)st, e);
}

extern "C" int q3g_delta_decode(const float *qkvz, int ldq, const float *cw, const float *ba, const float *A_log,
				const float *dt_bias, uint16_t *core, const float *z, int ldz, const float *normw,
				struct q3g_rows rows, int nseq, int lin, const struct q3g_dims *d, q3g_stream st,
				q3_err *e)
{
	if (!cw)
		return q3_errf(e, -EINVAL, "delta rule: decode needs the conv weights");
	return delta(qkvz, ldq, cw, ba, A_log, dt_bias, NULL, core, z, ldz, normw, rows, nseq, lin, d,
		     (cudaStream_t)st, e);
}
