/* mma_frag.cuh - reading the tile format (gpu_weights.cu) into mma.m16n8k16 A fragments, and
 * staging activations in shared memory in the order the B fragments need.  Shared by the matvec
 * (gpu_mmv.cu), the decode MoE (gpu_moe.cu) and the grouped GEMM (gpu_mm.cu).
 *
 * Dequantization is exact: a code q and its zero point z become q − z in fp16 (|q − z| <= 255
 * fits fp16's 11 significant bits), the mma multiplies by the activation in fp16 and accumulates
 * in fp32, and the group's scale is applied to the fp32 partial sum of the group.
 *  - int4: w & 0x000F000F | 0x64006400 is the fp16 pair (1024 + q0, 1024 + q1); subtracting
 *    the pair (1024 + z, 1024 + z) leaves q − z.  The next nibbles, w & 0x00F000F0 | 0x64006400,
 *    are 1024 + 16q: times 1/16 less (64 + z), one fused fp16x2 operation, is q − z again.  So a
 *    word's four pairs take one shift (w >> 8), four lop3 and four fp16x2 operations (a shift for
 *    every nibble cost three more: 11 of a k-step's ~21 instructions in the experts' up
 *    projections were dequantization, ncu).
 *  - int8: a byte b placed in the mantissa of 2^23 (0x4B0000bb) is 2^23 + b exactly; minus
 *    (2^23 + z) is b − z in fp32, packed to fp16x2 (exact).
 */
#pragma once
#include "common.cuh"
#include "gpu.h"

/* Loads of 16 bytes per lane per 64-input chunk, by format. */
template <int FMT> struct fmt_traits;
template <> struct fmt_traits<Q3G_Q4> {
	static constexpr int LPC = 1, CB = Q3G_CHUNK_BYTES_Q4;
};
template <> struct fmt_traits<Q3G_Q8> {
	static constexpr int LPC = 2, CB = Q3G_CHUNK_BYTES_Q8;
};
template <> struct fmt_traits<Q3G_F16> {
	static constexpr int LPC = 4, CB = Q3G_CHUNK_BYTES_F16;
};

/* A kernel template's instances by (routed, shared) weight format, as a 3 x 3 initializer
 * indexed [routed][shared] (the decode MoE kernels): K<fr, fs> or, with more arguments,
 * K<fr, fs, ...>. */
#define Q3G_FMT_PAIRS(K, ...)                                                                        \
	{                                                                                            \
		{ K<Q3G_Q4, Q3G_Q4, ##__VA_ARGS__>, K<Q3G_Q4, Q3G_Q8, ##__VA_ARGS__>,                  \
		  K<Q3G_Q4, Q3G_F16, ##__VA_ARGS__> },                                               \
		{ K<Q3G_Q8, Q3G_Q4, ##__VA_ARGS__>, K<Q3G_Q8, Q3G_Q8, ##__VA_ARGS__>,                  \
		  K<Q3G_Q8, Q3G_F16, ##__VA_ARGS__> },                                               \
		{ K<Q3G_F16, Q3G_Q4, ##__VA_ARGS__>, K<Q3G_F16, Q3G_Q8, ##__VA_ARGS__>,                \
		  K<Q3G_F16, Q3G_F16, ##__VA_ARGS__> },                                              \
	}

/* Per-lane dequantization constants of the current group (rows g and g + 8). */
struct zconst {
	uint32_t z0, z1; /* int4: fp16 pairs (1024 + z0) and (-64 - z1); int8: float bits of 2^23 + z */
};

template <int FMT> static __device__ __forceinline__ zconst make_zconst(float z0, float z1)
{
	zconst c;

	if (FMT == Q3G_Q4) { /* a 4-bit code's zero point: exact in fp16, no saturation (pack_h2's
			      * cost six instructions a group) */
		const __half2 h0 = __float2half2_rn(1024.0f + z0), h1 = __float2half2_rn(-64.0f - z1);

		c.z0 = *reinterpret_cast<const uint32_t *>(&h0);
		c.z1 = *reinterpret_cast<const uint32_t *>(&h1);
	} else {
		c.z0 = __float_as_uint(8388608.0f + z0);
		c.z1 = __float_as_uint(8388608.0f + z1);
	}
	return c;
}

template <int FMT> static __device__ __forceinline__ zconst sym_zconst()
{
	return FMT == Q3G_Q4 ? make_zconst<FMT>(8.0f, 8.0f) : make_zconst<FMT>(128.0f, 128.0f);
}

static __device__ __forceinline__ uint32_t q8_pair(uint32_t w, int b, uint32_t zbits)
{
	float zf = __uint_as_float(zbits);
	float v0 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u + b)) - zf;
	float v1 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u + b + 1)) - zf;

	return pack_h2(v0, v1);
}

static __device__ __forceinline__ uint32_t u4_word(const uint4 &v, int i)
{
	return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/* The A fragment of k-step s (0..3) of a chunk whose 16-byte loads are w[0 .. LPC). */
template <int FMT>
static __device__ __forceinline__ void a_frag(const uint4 *w, int s, const zconst &zc, uint32_t a[4])
{
	if (FMT == Q3G_Q4) {
		const uint32_t q = u4_word(w[0], s), q8 = q >> 8, sixteenth = 0x2C002C00u; /* (1/16, 1/16) */

		a[0] = h2_sub(and_or(q, 0x000F000Fu, 0x64006400u), zc.z0);
		a[1] = h2_fma(and_or(q, 0x00F000F0u, 0x64006400u), sixteenth, zc.z1);
		a[2] = h2_sub(and_or(q8, 0x000F000Fu, 0x64006400u), zc.z0);
		a[3] = h2_fma(and_or(q8, 0x00F000F0u, 0x64006400u), sixteenth, zc.z1);
	} else if (FMT == Q3G_Q8) {
		const uint4 &v = w[s >> 1];
		uint32_t lo = u4_word(v, 2 * (s & 1)), hi = u4_word(v, 2 * (s & 1) + 1);

		a[0] = q8_pair(lo, 0, zc.z0);
		a[1] = q8_pair(lo, 2, zc.z1);
		a[2] = q8_pair(hi, 0, zc.z0);
		a[3] = q8_pair(hi, 2, zc.z1);
	} else {
		const uint4 &v = w[s];

		a[0] = v.x;
		a[1] = v.y;
		a[2] = v.z;
		a[3] = v.w;
	}
}

/* Shared-memory layout of staged activations for B fragments: rows r < R of positions [0, Kp),
 * as uint2 words xs[(ks·R + r)·4 + t] = { pair (2t, 2t+1), pair (2t+8, 2t+9) } of k-step ks.
 * A warp's B fragment of token tile nt at k-step ks is then 32 consecutive uint2 (R >= 8). */
static __device__ __forceinline__ size_t xs_index(int ks, int r, int R, int t)
{
	return ((size_t)ks * R + r) * 4 + t;
}

/* B fragment of token tile nt at k-step ks for this lane.  A lane of a row >= R reads row R - 1
 * instead of zeros: column n of the mma's result depends on column n of B alone, and no caller
 * stores the columns of rows >= R (the matvec writes rows < R, the experts' up projections
 * column 0, the grouped GEMM stages whole tiles).  The test for zeros was a divergent branch at
 * every k-step of a batch-1 warp (lanes 0-3 take it): taking it out of a build of the staged
 * matvec moved decode at batch 1 from 288 to 296 tok/s (H200, 80b-a3b synthetic, one call). */
static __device__ __forceinline__ void b_frag(const uint2 *xs, int ks, int nt, int R, int lane, uint32_t b[2])
{
	uint2 v = xs[xs_index(ks, min(nt * 8 + (lane >> 2), R - 1), R, lane & 3)];

	b[0] = v.x;
	b[1] = v.y;
}

/* Where run_chunks_b takes its B fragments: rows staged in B-fragment order (stage_x_f16,
 * stage_x_norm; k-steps offset by ksoff) ... */
struct xs_bsrc {
	const uint2 *xs;
	int R, ksoff;

	__device__ __forceinline__ void operator()(int ks, int nt, int lane, uint32_t b[2]) const
	{
		b_frag(xs, ks + ksoff, nt, R, lane, b);
	}
};

/* ... or rows as they are in memory, row r at x + r·ld words (fp16 pairs), ld = Kp / 2 + 4: the
 * 16-byte pad puts the eight rows a k-step's lanes read four banks apart (lane (g, t) reads words
 * 8·ks + t and + 4 of row g: 32 banks, no conflict).  The values of xs_bsrc's, so the same sums. */
struct rm_bsrc {
	const uint32_t *x;
	int ld, R;

	__device__ __forceinline__ void operator()(int ks, int nt, int lane, uint32_t b[2]) const
	{
		const uint32_t *p = x + (size_t)min(nt * 8 + (lane >> 2), R - 1) * ld + ks * 8 + (lane & 3);

		b[0] = p[0];
		b[1] = p[4];
	}
};

/* Inputs kin, kin + 1 (kin even) of a pair's fp16 activations (q3g_moe_up's act) through the
 * act-order permutation perm (NULL: none), as one fp16x2 word (zeros past K): what the decode
 * down projections put in their B fragments. */
static __device__ __forceinline__ uint32_t act_pair(const uint16_t *act, const uint16_t *perm, int K, int kin)
{
	if (!perm && kin + 1 < K && !((uintptr_t)act & 3))
		return *(const uint32_t *)(act + kin);
	const int ka = perm ? perm[kin] : kin, kb = perm ? perm[kin + 1] : kin + 1;

	return (ka < K ? (uint32_t)act[ka] : 0u) | (kb < K ? (uint32_t)act[kb] : 0u) << 16;
}

/* Staging unit i of R rows: eight positions of one row.  Units 2j and 2j + 1 are the two halves
 * (positions 0-7, 8-15) of k-step j / R of row j % R, so that a warp's units fill consecutive
 * 16-byte words of xs, rows fastest: the position-major order put the words of R = 16 rows 512
 * bytes apart, 15-way bank conflicts on every store (ncu: 3 of the matvec's 3.2 million shared
 * store wavefronts at batch 16). */
static __device__ __forceinline__ void xs_unit(int i, const small_div &R, int &r, int &k0)
{
	const int j = i >> 1, q = R.div(j);

	r = R.mod(j, q);
	k0 = 16 * q + 8 * (i & 1);
}

/* Where a cluster's blocks stage rows together (CL > 1): the unit's 16 bytes into this block's xs
 * and, by st.async counted into their mbarrier xbar, into every other block's: each block loads
 * and converts 1 / CL of the rows' units (stage_units), not all of them. */
template <int CL> struct xs_push {
	uint64_t *xbar; /* the receivers' counterpart: their bytes from the other ranks */
	int rank;

	__device__ __forceinline__ void put(uint16_t *xs, int i, const uint4 &v) const
	{
		((uint4 *)xs)[i] = v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		if constexpr (CL > 1) {
#pragma unroll
			for (int d = 1; d < CL; d++)
				st_async_v4_at((uint32_t)((rank + d) % CL), (uint4 *)xs + i, xbar, v);
		}
#endif
	}
};

/* The units [0, n) a rank of CL stages in batches of S = B · blockDim (rank c: batches c, c + CL,
 * ..): what its pushes count into each other block's xbar. */
static __device__ __forceinline__ int stage_units(int n, int S, int CL, int c)
{
	int u = 0;

	for (int q0 = c * S; q0 < n; q0 += CL * S)
		u += min(n - q0, S);
	return u;
}

/* Unit i's eight fp16 values as four fp16x2 words (lo = the lower position) into xs, where word
 * 2t + h of a k-step holds half h's pair t.  SWAP: the two lanes of a unit pair (lane ^ 1) swap
 * halves, then each stores four words at once; every lane of the warp calls it.  Without: word
 * by word (moe_up's one-row staging, which spilled with the exchange).  CL > 1 (SWAP only): into
 * every block of the cluster (xs_push). */
template <bool SWAP, int CL = 1>
static __device__ __forceinline__ void xs_store_unit(uint16_t *xs, int i, const uint32_t p[4], bool valid,
						     const xs_push<CL> &push = xs_push<CL>{})
{
	static_assert(SWAP || CL == 1, "a cluster's staging stores whole units");
	if constexpr (!SWAP) {
		if (valid)
#pragma unroll
			for (int t = 0; t < 4; t++)
				((uint32_t *)xs)[8 * (i >> 1) + 2 * t + (i & 1)] = p[t];
	} else {
		uint32_t o[4];

#pragma unroll
		for (int q = 0; q < 4; q++)
			o[q] = __shfl_xor_sync(0xffffffffu, p[q], 1);
		const uint4 v = (i & 1) ? make_uint4(o[2], p[2], o[3], p[3]) : make_uint4(p[0], o[0], p[1], o[1]);

		if (valid) /* words 8 (i / 2) + 4 (i & 1): xs_index(k-step, r, R, 2 (i & 1)) * 2 */
			push.put(xs, i, v);
	}
}

/* Staging loads B (template argument) 8-position units per thread before storing any: a
 * block's staging is a few round trips to L2, not one per element.  1 where a block stages one
 * row (a unit a thread at the real shapes) and registers are scarce (moe_up). */

/* The inputs of the 8 positions [k0, k0 + 8) through perm (NULL: identity; >= K: padding): one
 * 16-byte load of the permutation (each matrix's starts 16-byte aligned, k0 % 8 == 0), not eight
 * dependent 2-byte ones before the gathers can start. */
static __device__ __forceinline__ void perm_unit(uint16_t pk[8], const uint16_t *perm, int k0)
{
	if (perm) {
		const uint4 v = __ldg((const uint4 *)(perm + k0));
		const uint32_t u[4] = { v.x, v.y, v.z, v.w };

#pragma unroll
		for (int q = 0; q < 4; q++) {
			pk[2 * q] = (uint16_t)(u[q] & 0xffff);
			pk[2 * q + 1] = (uint16_t)(u[q] >> 16);
		}
	} else {
#pragma unroll
		for (int q = 0; q < 8; q++)
			pk[q] = (uint16_t)(k0 + q);
	}
}

/* Stages x rows [0, R) (fp16, row stride ldx, K inputs; rows, where given: row r is x's row
 * rows[r]) gathered through perm (NULL: identity) into xs for positions [0, Kp) (Kp % 16 == 0);
 * all threads of the block take part (no barrier inside; a warp runs its loop whole, for the
 * pairs' exchange).  Without a permutation a unit is one 16-byte load. */
template <int B, int CL = 1>
static __device__ __forceinline__ void stage_x_f16(uint16_t *xs, const uint16_t *x, int ldx, int R, int K,
						    int Kp, const uint16_t *perm, const int *rows = nullptr,
						    const xs_push<CL> &push = xs_push<CL>{})
{
	/* with the pairs' exchange (B > 1) a warp runs the loop whole: its lanes past n store nothing */
	const int n = R * (Kp >> 3), wl = B > 1 ? threadIdx.x & 31 : 0;
	const bool vec = !perm && (ldx & 7) == 0 && ((uintptr_t)x & 15) == 0;
	const small_div Rd(R);

	for (int w0 = threadIdx.x - wl + push.rank * B * blockDim.x; w0 < n; w0 += CL * B * blockDim.x) {
		uint32_t p[B][4];

#pragma unroll
		for (int b = 0; b < B; b++) {
			const int i = w0 + wl + b * blockDim.x;
			int r, k0;

			if (i >= n)
				break;
			xs_unit(i, Rd, r, k0);
			const uint16_t *xr = x + (size_t)(rows ? rows[r] : r) * ldx;

			if (vec && k0 + 8 <= K) {
				uint4 v = *(const uint4 *)(xr + k0);

				p[b][0] = v.x;
				p[b][1] = v.y;
				p[b][2] = v.z;
				p[b][3] = v.w;
			} else {
				uint16_t pk[8];

				perm_unit(pk, perm, k0);
#pragma unroll
				for (int q = 0; q < 4; q++) {
					uint32_t lo = pk[2 * q] < K ? xr[pk[2 * q]] : 0, hi = pk[2 * q + 1] < K ? xr[pk[2 * q + 1]] : 0;

					p[b][q] = lo | hi << 16;
				}
			}
		}
#pragma unroll
		for (int b = 0; b < B; b++) {
			const int i = w0 + wl + b * blockDim.x;

			if (w0 + b * (int)blockDim.x >= n) /* warp-uniform */
				break;
			xs_store_unit<(B > 1), CL>(xs, i, p[b], i < n, push);
		}
	}
}

/* The zero-centred RMSNorm folded into staging: the same staging as stage_x_f16 of the values
 * fp16(h · rs · (1 + w)), the expression q3g_add_rmsnorm uses (rows as stage_x_f16's), with the
 * rows' rs[r] (row_rsqrt's) already in shared memory. */
template <int B, int CL = 1>
static __device__ __forceinline__ void stage_normed(uint16_t *xs, const float *rs, const float *h, int ldh, int R,
						    int K, int Kp, const uint16_t *perm, const float *w,
						    const int *rows = nullptr, const xs_push<CL> &push = xs_push<CL>{})
{
	/* with the pairs' exchange (B > 1) a warp runs the loop whole: its lanes past n store nothing */
	const int n = R * (Kp >> 3), wl = B > 1 ? threadIdx.x & 31 : 0;
	const bool vec = !perm && (ldh & 3) == 0 && ((uintptr_t)h & 15) == 0 && ((uintptr_t)w & 15) == 0;
	const small_div Rd(R);

	for (int w0 = threadIdx.x - wl + push.rank * B * blockDim.x; w0 < n; w0 += CL * B * blockDim.x) {
		float v[B][8], f[B][8];

#pragma unroll
		for (int b = 0; b < B; b++) {
			const int i = w0 + wl + b * blockDim.x;
			int r, k0;

			if (i >= n)
				break;
			xs_unit(i, Rd, r, k0);
			const float *hr = h + (size_t)(rows ? rows[r] : r) * ldh;
			if (vec && k0 + 8 <= K) {
				float4 a = *(const float4 *)(hr + k0), c = *(const float4 *)(hr + k0 + 4);
				float4 wa = *(const float4 *)(w + k0), wc = *(const float4 *)(w + k0 + 4);

				v[b][0] = a.x, v[b][1] = a.y, v[b][2] = a.z, v[b][3] = a.w;
				v[b][4] = c.x, v[b][5] = c.y, v[b][6] = c.z, v[b][7] = c.w;
				f[b][0] = wa.x, f[b][1] = wa.y, f[b][2] = wa.z, f[b][3] = wa.w;
				f[b][4] = wc.x, f[b][5] = wc.y, f[b][6] = wc.z, f[b][7] = wc.w;
			} else {
				uint16_t pk[8];

				perm_unit(pk, perm, k0);
#pragma unroll
				for (int q = 0; q < 8; q++) {
					v[b][q] = pk[q] < K ? hr[pk[q]] : 0.0f;
					f[b][q] = pk[q] < K ? w[pk[q]] : 0.0f;
				}
			}
		}
#pragma unroll
		for (int b = 0; b < B; b++) {
			const int i = w0 + wl + b * blockDim.x;
			uint32_t p[4];
			int r, k0;

			if (w0 + b * (int)blockDim.x >= n) /* warp-uniform */
				break;
			xs_unit(i, Rd, r, k0);
#pragma unroll
			for (int q = 0; q < 4; q++)
				p[q] = pack_h2(v[b][2 * q] * rs[r] * (1.0f + f[b][2 * q]),
					       v[b][2 * q + 1] * rs[r] * (1.0f + f[b][2 * q + 1]));
			xs_store_unit<(B > 1), CL>(xs, i, p, i < n, push);
		}
	}
}

/* ... with rs (R floats of shared memory) computed first.  Contains a barrier: call from every
 * thread. */
template <int B>
static __device__ __forceinline__ void stage_x_norm(uint16_t *xs, float *rs, const float *h, int ldh, int R, int K,
						    int Kp, const uint16_t *perm, const float *w, float eps,
						    const int *rows = nullptr)
{
	row_rsqrt(rs, h, ldh, R, K, eps, rows);
	__syncthreads();
	stage_normed<B>(xs, rs, h, ldh, R, K, Kp, perm, w, rows);
}

/* A lane's group constants at index i of its scales sc (rows g, g + 8: sc[i], sc[i + 8]) and
 * zero points zr (NULL: symmetric). */
template <int FMT, class I>
static __device__ __forceinline__ void group_consts_at(const float *sc, const float *zr, I i, float &s0, float &s1,
						       zconst &zc)
{
	s0 = sc[i];
	s1 = sc[i + 8];
	zc = zr ? make_zconst<FMT>(zr[i], zr[i + 8]) : sym_zconst<FMT>();
}

/* Where this lane's constants of group grp of a tile lie in m.scales (and m.zeros). */
static __device__ __forceinline__ size_t group_index(const struct q3g_mat &m, size_t sz_base, int tile, int grp,
						     int lane)
{
	return sz_base + ((size_t)tile * m.ngroups + grp) * Q3G_TILE_N + (lane >> 2);
}

/* The scale and zero-point constants of group grp for this lane's rows of a tile. */
template <int FMT>
static __device__ __forceinline__ void group_consts(const struct q3g_mat &m, size_t sz_base, int tile, int grp,
						    int lane, float &s0, float &s1, zconst &zc)
{
	group_consts_at<FMT>(m.scales, m.zeros, group_index(m, sz_base, tile, grp, lane), s0, s1, zc);
}

/* acc += (row scales f0 | f1) · accg, and accg = 0 when clear. */
template <int NT>
static __device__ __forceinline__ void flush_group(float acc[NT][4], float accg[NT][4], float f0, float f1, bool clear)
{
#pragma unroll
	for (int n = 0; n < NT; n++) {
		acc[n][0] += f0 * accg[n][0];
		acc[n][1] += f0 * accg[n][1];
		acc[n][2] += f1 * accg[n][2];
		acc[n][3] += f1 * accg[n][3];
		if (clear)
			accg[n][0] = accg[n][1] = accg[n][2] = accg[n][3] = 0.0f;
	}
}

/* The warps kr = 0 .. WPT-1 of a row tile (consecutive warps) add their accumulators into the
 * first one's, through red (Q3G_MMV_THREADS · NT float4 of shared memory).  Every thread of the
 * block must call it (it has a barrier). */
template <int NT>
static __device__ __forceinline__ void reduce_tile_warps(float *red, float acc[NT][4], int WPT)
{
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kr = warp & (WPT - 1); /* WPT: a power of two */

	if (WPT == 1)
		return;
#pragma unroll
	for (int n = 0; n < NT; n++)
		*(float4 *)(red + ((warp * NT + n) * 32 + lane) * 4) = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
	__syncthreads();
	if (kr == 0)
		for (int w = warp + 1; w < warp + WPT; w++)
#pragma unroll
			for (int n = 0; n < NT; n++) {
				float4 v = *(const float4 *)(red + ((w * NT + n) * 32 + lane) * 4);

				acc[n][0] += v.x;
				acc[n][1] += v.y;
				acc[n][2] += v.z;
				acc[n][3] += v.w;
			}
}

/* The first batch of run_chunks<FMT, NT, LOADS> over chunks [c0, c1) of a tile, for any format:
 * LOADS 16-byte words 512 bytes apart from chunk c0's (a batch is LOADS / LPC whole chunks of
 * LPC words each), loaded before the caller stages its activations and handed to run_chunks as
 * `pre`.  Words past c1 are left unset (run_chunks never reads them). */
template <int LOADS>
static __device__ __forceinline__ void first_batch(const struct q3g_mat &m, const uint8_t *wbase, int tile, int c0,
						   int c1, uint4 pre[LOADS])
{
	const int lpc = m.fmt == Q3G_Q4 ? 1 : m.fmt == Q3G_Q8 ? 2 : 4, n = (c1 - c0) * lpc;
	const uint8_t *p = wbase + ((size_t)tile * m.nchunks + c0) * lpc * 512 + (threadIdx.x & 31) * 16;

#pragma unroll
	for (int i = 0; i < LOADS; i++)
		if (i < n)
			pre[i] = ldg_stream(p + (size_t)i * 512);
}

/* Runs the k-chunks [c0, c1) of row tile `tile` of matrix base (bytes) against staged xs,
 * accumulating into acc[NT][4] (fp32, scales applied).  wscale multiplies every group's partial
 * sum (a routing weight; 1 otherwise).  The warp loads LOADS (default Q3G_MMV_LOADS) 16-byte
 * words per lane before using the first.  WHOLE (the caller's kernel instance, chosen on the
 * host by q3g_whole_groups): every scale group is whole chunks, so the group's end is tested once
 * a chunk, not at every k-step (the test and its branch were 6 of the 26 instructions of a
 * k-step of the experts' up projections, ncu); both loops in one kernel spilled.  GPTR: the
 * lane's scale and zero addresses computed once, not at every group (experts up 58.8 -> 53.1 us
 * at R = 16 with make_zconst's unsaturated constants, H200); the matvec, whose one kernel holds
 * every format, went 15.8 -> 17.9 us at R = 1 with them (96-118 registers, not 80-106).  pre
 * (where use_pre): the first batch, loaded by the caller with first_batch before its staging;
 * use_pre is the caller's runtime condition, so that pre itself stays a register array indexed
 * by constants rather than a pointer chosen at run time. */
#define Q3G_MMV_LOADS 8
template <int FMT, int NT, int LOADS = Q3G_MMV_LOADS, bool WHOLE = false, bool GPTR = false, class BS>
static __device__ __forceinline__ void run_chunks_b(const struct q3g_mat &m, const uint8_t *wbase, size_t sz_base,
						    int tile, int c0, int c1, const BS &bsrc, float wscale, float acc[NT][4],
						    const uint4 *pre = nullptr, bool use_pre = false)
{
	/* chunks loaded ahead: eight 16-byte loads per lane for a matvec; with many token tiles
	 * (the grouped GEMM) the mma work per chunk hides latency and registers are scarce */
	constexpr int LPC = fmt_traits<FMT>::LPC, CB = fmt_traits<FMT>::CB;
	constexpr int U0 = LOADS / LPC / (NT >= 4 ? 4 : 1), U = U0 > 0 ? U0 : 1;
	const int lane = threadIdx.x & 31;
	const uint8_t *tbase = wbase + (size_t)tile * m.nchunks * CB + lane * 16;
	float accg[NT][4];
	float s0 = 1.0f, s1 = 1.0f;
	zconst zc = FMT == Q3G_F16 ? zconst{ 0, 0 } : sym_zconst<FMT>();
	/* gleft: k-steps (chunks where WHOLE) left in the current group */
	const int gunit = WHOLE ? m.gsteps >> 2 : m.gsteps, pos = WHOLE ? c0 : c0 * 4;
	int gleft = 1 << 30, grp = 0;

	if (c0 >= c1)
		return;
	if (FMT != Q3G_F16) {
		if (!(gunit & (gunit - 1))) { /* GPTQ's groups: a shift, not a division */
			grp = pos >> (__ffs(gunit) - 1);
			gleft = gunit - (pos & (gunit - 1));
		} else {
			grp = pos / gunit;
			gleft = gunit - pos % gunit;
		}
		group_consts<FMT>(m, sz_base, tile, grp, lane, s0, s1, zc);
	}
	/* the group's partial sum times its row scales into acc; the next group's constants (with
	 * GPTR this lane's scales and zeros a group apart from gsc and gzr) */
	const size_t gi0 = group_index(m, sz_base, tile, grp, lane);
	const float *gsc = !GPTR || FMT == Q3G_F16 ? NULL : m.scales + gi0;
	const float *gzr = GPTR && FMT != Q3G_F16 && m.zeros ? m.zeros + gi0 : NULL;
	const int glast = m.ngroups - 1 - grp;
	int gi = 0;
	auto next_group = [&]() {
		flush_group<NT>(acc, accg, s0 * wscale, s1 * wscale, true);
		gleft = gunit;
		if (!GPTR) {
			if (++grp < m.ngroups)
				group_consts<FMT>(m, sz_base, tile, grp, lane, s0, s1, zc);
		} else if (++gi <= glast) {
			group_consts_at<FMT>(gsc, gzr, gi * Q3G_TILE_N, s0, s1, zc);
		}
	};
#pragma unroll
	for (int n = 0; n < NT; n++)
		accg[n][0] = accg[n][1] = accg[n][2] = accg[n][3] = 0.0f;
	/* GPTR (experts up) with groups of two chunks (group size 128) and the warp's chunks whole
	 * batches from an even one: a group ends after every odd chunk of a batch, known rather than
	 * counted, and no batch is short: experts up 50.4 -> 44.9 us at 16 rows, 8.85 -> 8.09 at one
	 * (H200; experts down's pair_tile likewise).  Not in the matvec: a second loop in its one
	 * kernel of every format. */
	const bool two = GPTR && FMT != Q3G_F16 && WHOLE && !(U & 1) && gunit == 2 && !(c0 & 1) && (c1 - c0) % U == 0;
	/* batch c's k-steps from its loaded words w (TWO: a constant at both calls below, which the
	 * inlining folds) */
	auto batch = [&](int c, const uint4 (&w)[U][LPC], const bool TWO) {
#pragma unroll
		for (int u = 0; u < U; u++) {
			if (!TWO && c + u >= c1)
				break;
#pragma unroll
			for (int s = 0; s < 4; s++) {
				uint32_t a[4];
				int ks = (c + u) * 4 + s;

				a_frag<FMT>(w[u], s, zc, a);
#pragma unroll
				for (int n = 0; n < NT; n++) {
					uint32_t b[2];

					bsrc(ks, n, lane, b);
					mma_f16(accg[n], a, b);
				}
				if (FMT != Q3G_F16 && !WHOLE && --gleft == 0)
					next_group();
			}
			if (FMT != Q3G_F16 && WHOLE && (TWO ? (u & 1) != 0 : --gleft == 0))
				next_group();
		}
	};
	auto chunks = [&](const bool TWO) {
		int c = c0;

		if (pre && use_pre) { /* the first batch loaded by the caller (first_batch): peeled, so
				       * that pre is not live through the loop */
			uint4 w[U][LPC];

#pragma unroll
			for (int u = 0; u < U; u++)
#pragma unroll
				for (int p = 0; p < LPC; p++)
					w[u][p] = pre[u * LPC + p];
			batch(c, w, TWO);
			c += U;
		}
		for (; c < c1; c += U) {
			uint4 w[U][LPC];

#pragma unroll
			for (int u = 0; u < U; u++)
#pragma unroll
				for (int p = 0; p < LPC; p++)
					if (TWO || c + u < c1)
						w[u][p] = ldg_stream(tbase + (size_t)(c + u) * CB + p * 512);
			batch(c, w, TWO);
		}
	};
	if (two)
		chunks(true);
	else
		chunks(false);
	/* the last (or only, for fp16: s = 1) group */
	flush_group<NT>(acc, accg, s0 * wscale, s1 * wscale, false);
}

/* run_chunks_b from rows staged in B-fragment order */
template <int FMT, int NT, int LOADS = Q3G_MMV_LOADS, bool WHOLE = false, bool GPTR = false>
static __device__ __forceinline__ void run_chunks(const struct q3g_mat &m, const uint8_t *wbase, size_t sz_base,
						  int tile, int c0, int c1, const uint2 *xs, int R, int ksoff,
						  float wscale, float acc[NT][4], const uint4 *pre = nullptr,
						  bool use_pre = false)
{
	run_chunks_b<FMT, NT, LOADS, WHOLE, GPTR>(m, wbase, sz_base, tile, c0, c1, xs_bsrc{ xs, R, ksoff }, wscale, acc, pre,
						  use_pre);
}
