/* gpu_config.h - tile constants of the CUDA kernels, in one place, with the assumptions they
 * rest on checked at compile time.  (Named gpu_config.h, not config.h: kernels/cpu_ref.h includes
 * userspace's "config.h", and a kernels/config.h would shadow it for every file in this folder.)
 *
 * The weight "tile format" (gpu_weights.cu) is built around the tensor-core instruction
 * mma.sync.m16n8k16 (fp16 in, fp32 accumulate): a tile is 16 output rows by 64 inputs
 * (Q3G_KCHUNK), stored so that each lane of a warp fetches the A fragments of four k-steps of
 * 16 with 16-byte loads in the order the instruction consumes them.
 */
#pragma once

#define Q3G_WARP 32
#define Q3G_TILE_N 16		/* output rows per tile: the mma M dimension */
#define Q3G_KSTEP 16		/* inputs per mma: the mma K dimension */
#define Q3G_KCHUNK 64		/* inputs per tile chunk: 4 k-steps, one 16-byte load per lane at int4 */
#define Q3G_NTOK 8		/* tokens per mma: the mma N dimension */
#define Q3G_MMV_THREADS 256	/* threads of a matvec block (8 warps) */
#define Q3G_MMV_MAX_TOK 16	/* the matvec kernels take up to this many token rows */
#define Q3G_MMV_MAX_JOBS 4	/* Linears one matvec launch can run side by side */
#define Q3G_MMV_UNROLL 4	/* k-chunks whose weights a warp loads before using the first */
#define Q3G_MM_TOK 64		/* tokens per block of the grouped (prefill) GEMM */
#define Q3G_MM_ROWS 128		/* output rows per block of the grouped GEMM (8 warps x 16) */
#define Q3G_MM_KTILE 128	/* inputs staged in shared memory per step of the grouped GEMM */
#define Q3G_ATT_SPLITS 32	/* max KV splits of decode attention (flash-decoding) */
#define Q3G_ROUTER_MAX_E 1024	/* routed experts the top-k kernel handles (one warp per row) */
#define Q3G_ROUTER_MAX_K 32	/* experts per token it handles */
#define Q3G_DELTA_CPW 4		/* value columns per warp of the delta-rule kernel */
#define Q3G_MAX_HEAD_DIM 256	/* largest attention head the kernels take */
#define Q3G_MAX_DK 256		/* largest delta-rule key head */
#define Q3G_MAX_CONV 4		/* largest conv1d kernel of the delta rule's decode */

/* Bytes of one tile chunk (16 rows x 64 inputs) by format. */
#define Q3G_CHUNK_BYTES_Q4 512
#define Q3G_CHUNK_BYTES_Q8 1024
#define Q3G_CHUNK_BYTES_F16 2048

#if defined(__cplusplus)
#define Q3G_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define Q3G_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

Q3G_STATIC_ASSERT(Q3G_KCHUNK == 4 * Q3G_KSTEP, "a chunk is four k-steps (one uint4 of nibbles per lane)");
Q3G_STATIC_ASSERT(Q3G_CHUNK_BYTES_Q4 == Q3G_TILE_N * Q3G_KCHUNK / 2, "int4 chunk = 16 x 64 nibbles");
Q3G_STATIC_ASSERT(Q3G_CHUNK_BYTES_Q4 == Q3G_WARP * 16, "int4 chunk = one 16-byte load per lane");
Q3G_STATIC_ASSERT(Q3G_CHUNK_BYTES_Q8 == 2 * Q3G_CHUNK_BYTES_Q4, "int8 chunk = two loads per lane");
Q3G_STATIC_ASSERT(Q3G_CHUNK_BYTES_F16 == 4 * Q3G_CHUNK_BYTES_Q4, "fp16 chunk = four loads per lane");
Q3G_STATIC_ASSERT(Q3G_MMV_THREADS % Q3G_WARP == 0 && Q3G_MMV_THREADS / Q3G_WARP == 8,
		  "the matvec splits its 8 warps over row tiles x k ranges");
Q3G_STATIC_ASSERT(Q3G_MMV_MAX_TOK == 2 * Q3G_NTOK, "the matvec keeps at most two mma token tiles");
Q3G_STATIC_ASSERT(Q3G_MM_ROWS == (Q3G_MMV_THREADS / Q3G_WARP) * Q3G_TILE_N, "grouped GEMM: a warp per 16 rows");
Q3G_STATIC_ASSERT(Q3G_MM_TOK % Q3G_NTOK == 0 && Q3G_MM_TOK <= 64, "grouped GEMM token tile: <= 8 mma tiles");
Q3G_STATIC_ASSERT(Q3G_MM_KTILE % Q3G_KCHUNK == 0, "grouped GEMM stages whole chunks");
Q3G_STATIC_ASSERT(Q3G_ROUTER_MAX_E % Q3G_WARP == 0, "router: experts spread evenly over a warp");
Q3G_STATIC_ASSERT(Q3G_MAX_HEAD_DIM % Q3G_WARP == 0 && Q3G_MAX_DK % Q3G_WARP == 0,
		  "head dims are spread over a warp's lanes");
