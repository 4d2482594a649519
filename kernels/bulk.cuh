/* bulk.cuh - streaming weight tiles into shared memory on sm_90: mbarriers, bulk copies
 * (cp.async.bulk: the SM's copy engine moves the bytes and counts them into an mbarrier), and the
 * k-steps of one 16-row tile in shared memory against one token's activations.  Used by the
 * decode experts' down projection (gpu_moe_down.cu).
 *
 * A ring's stage has a barrier whose phase completes with the copier's arrive.expect_tx and its
 * copies' bytes.  A parity wait cannot tell phase n from phase n - 2, so a stage belongs to one
 * consumer warp, which copies into it again only after it consumed it.
 */
#pragma once
#include "mma_frag.cuh"

/* A tile of a matrix as a producer copies it: its weights, then its scales and zero points. */
struct bulk_tile {
	uint32_t wb, sb; /* weight bytes, scale bytes (zero points: as many again) */
	uint32_t bytes;	 /* all of it */
};

static inline uint32_t chunk_bytes(int fmt)
{
	return fmt == Q3G_Q4 ? Q3G_CHUNK_BYTES_Q4 : fmt == Q3G_Q8 ? Q3G_CHUNK_BYTES_Q8 : Q3G_CHUNK_BYTES_F16;
}

static inline uint32_t align128(size_t n)
{
	return (uint32_t)((n + 127) & ~(size_t)127);
}

static inline bool aligned16(const void *p)
{
	return !((uintptr_t)p & 15);
}

/* Whether the producer can bulk-copy m's tiles (16-byte pieces, 16-byte aligned). */
static inline bool tiles_copyable(const struct q3g_mat *m)
{
	return aligned16(m->data) && !(m->data_stride & 15) &&
	       (m->fmt == Q3G_F16 || (aligned16(m->scales) && aligned16(m->zeros) && !(m->sz_stride & 3))) &&
	       (!m->perm || (aligned16(m->perm) && !(m->perm_stride & 7)));
}

static inline struct bulk_tile bulk_tile_of(const struct q3g_mat *m)
{
	struct bulk_tile d;

	d.wb = (uint32_t)m->nchunks * chunk_bytes(m->fmt);
	d.sb = m->fmt == Q3G_F16 ? 0 : (uint32_t)m->ngroups * Q3G_TILE_N * 4;
	d.bytes = d.wb + (m->zeros ? 2 : 1) * d.sb;
	return d;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* n bytes (a multiple of 16, both ends 16-byte aligned) from g to s, counted into bar. */
static __device__ __forceinline__ void bulk_copy(void *s, const void *g, uint32_t n, uint64_t *bar)
{
	asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
			     smem_u32(s)),
		     "l"(g), "r"(n), "r"(smem_u32(bar))
		     : "memory");
}

/* ... into the same offset of s in every block of the cluster in mask (bit b: rank b), each
 * counting them into its own counterpart of bar. */
static __device__ __forceinline__ void bulk_copy_mc(void *s, const void *g, uint32_t n, uint64_t *bar, uint16_t mask)
{
	asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;\n" ::"r"(
			     smem_u32(s)),
		     "l"(g), "r"(n), "r"(smem_u32(bar)), "h"(mask)
		     : "memory");
}

/* A ring of nst stages (a barrier each, one arrival) and the one-off barrier one; a single
 * thread calls it, a barrier of the block follows before any use. */
static __device__ __forceinline__ void ring_init(uint64_t *full, int nst, uint64_t *one)
{
	for (int i = 0; i < nst; i++)
		bar_init(&full[i], 1);
	bar_init(one, 1);
	bar_init_fence();
}

/* Where a block's tile `tile` of a stack lies for expert 0 (weights, scales, zero points), and
 * how far apart the experts' are: worked out once a block, a pair's copies then an expert's
 * offsets from it.  (Experts down's copies of a routed pair: 75 instructions before, 70 with it,
 * ncu; most of the rest moves each copy's operands to uniform registers, as cp.async.bulk wants.) */
struct tile_src {
	const uint8_t *w;
	const float *s, *z;
	size_t ws, ss; /* bytes, floats an expert */
};

static __device__ __forceinline__ struct tile_src tile_src_of(const struct q3g_mat &m, const struct bulk_tile &d,
							      int tile)
{
	const size_t so = (size_t)tile * m.ngroups * Q3G_TILE_N;

	return { (const uint8_t *)m.data + (size_t)tile * d.wb, m.scales ? m.scales + so : nullptr,
		 m.zeros ? m.zeros + so : nullptr, m.data_stride, m.sz_stride };
}

/* Expert mi's tile of src (weights, scales, zero points) into dst, counted into bar (the
 * caller's bar_expect covers d.bytes). */
static __device__ __forceinline__ void copy_tile(uint8_t *dst, const struct tile_src &src, const struct bulk_tile &d,
						 int mi, uint64_t *bar)
{
	bulk_copy(dst, src.w + (size_t)mi * src.ws, d.wb, bar);
	if (d.sb) {
		bulk_copy(dst + d.wb, src.s + (size_t)mi * src.ss, d.sb, bar);
		if (src.z)
			bulk_copy(dst + d.wb + d.sb, src.z + (size_t)mi * src.ss, d.sb, bar);
	}
}

/* One tile (weights at t, scales and zeros at sc) against B fragments from bfrag(c, st, b): the
 * activations of chunk c's k-step st; every group's partial sum times its scale times wt into
 * acc.  A routed pair: token column 0 (lanes t = 0 hold rows g and g + 8 in acc[0] and acc[2]);
 * the shared expert: up to 8 rows' columns.  WHOLE: groups of whole chunks, their end tested
 * once a chunk (as run_chunks), or known where a group is two chunks. */
template <int FMT, bool WHOLE, class BF>
static __device__ __forceinline__ void pair_tile(const struct q3g_mat &m, const uint8_t *t, const float *sc,
						 BF bfrag, float wt, float acc[1][4])
{
	constexpr int LPC = fmt_traits<FMT>::LPC, CB = fmt_traits<FMT>::CB;
	const int lane = threadIdx.x & 31, g = lane >> 2, zo = m.ngroups * Q3G_TILE_N;
	float accg[1][4] = { { 0.0f, 0.0f, 0.0f, 0.0f } };
	float s0 = 1.0f, s1 = 1.0f;
	zconst zc = FMT == Q3G_F16 ? zconst{ 0, 0 } : sym_zconst<FMT>();
	const int gunit = WHOLE ? m.gsteps >> 2 : m.gsteps;
	int grp = 0, gleft = gunit;

	if (FMT != Q3G_F16) {
		s0 = sc[g], s1 = sc[g + 8];
		if (m.zeros)
			zc = make_zconst<FMT>(sc[zo + g], sc[zo + g + 8]);
	}
	auto next_group = [&]() {
		flush_group<1>(acc, accg, s0 * wt, s1 * wt, true);
		gleft = gunit;
		if (++grp < m.ngroups) {
			const int i = grp * Q3G_TILE_N + g;

			s0 = sc[i], s1 = sc[i + 8];
			if (m.zeros)
				zc = make_zconst<FMT>(sc[zo + i], sc[zo + i + 8]);
		}
	};
	auto chunk = [&](int c) {
		uint4 w[LPC];

#pragma unroll
		for (int q = 0; q < LPC; q++)
			w[q] = *(const uint4 *)(t + c * CB + q * 512 + lane * 16);
#pragma unroll
		for (int st = 0; st < 4; st++) {
			uint32_t a[4], b[2];

			bfrag(c, st, b);
			a_frag<FMT>(w, st, zc, a);
			mma_f16(accg[0], a, b);
			if (FMT != Q3G_F16 && !WHOLE && --gleft == 0)
				next_group();
		}
	};
	if (FMT != Q3G_F16 && WHOLE && gunit == 2 && !(m.nchunks & 1)) {
		/* groups of two chunks (group size 128, the checkpoints' usual): the two unrolled and the
		 * group's end known, not counted a chunk (123 instructions a group, 90 of them the
		 * k-steps', ncu): experts down 35.5 -> 33.0 us at 16 rows, 6.77 -> 6.53 at one (H200) */
		for (int c = 0; c < m.nchunks; c += 2) {
			chunk(c);
			chunk(c + 1);
			next_group();
		}
	} else {
		for (int c = 0; c < m.nchunks; c++) {
			chunk(c);
			if (FMT != Q3G_F16 && WHOLE && --gleft == 0)
				next_group();
		}
	}
	flush_group<1>(acc, accg, s0 * wt, s1 * wt, false);
}

#endif
