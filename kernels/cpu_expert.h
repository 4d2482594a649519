/* cpu_expert.h - the routed experts on the CPU: the SwiGLU FFN y = down(silu(gate·x) ⊙ up·x) on
 * GPTQ int4 weights, for one token (decode) or a few (batch), with int8 or fp32 activations, on
 * whichever SIMD the CPU has (AVX2, AVX-512 VNNI, AMX; a scalar fallback), chosen at run time.
 *
 * Weights.  A matrix (struct q3_xmat) is a view of int4 codes, scales and zero points with
 * strides, so the same kernels run on two layouts:
 *   - packed (q3_xexpert_pack): the expert's three matrices repacked once, at load, into one blob
 *     in a CPU-friendly order: output columns in tiles of Q3_XTILE, each tile's codes contiguous
 *     (one sequential stream per tile), act-order (g_idx) folded into an input permutation with
 *     groups contiguous, zero points dropped when they are all equal (sym), and gate/up's output
 *     columns permuted into the order down reads them.  Any GPTQ expert packs.
 *   - gptq (q3_xexpert_gptq): the checkpoint's tensors as they lie (qweight [K/8][N], codes
 *     packed along K); only for experts whose g_idx is absent or k / group_size.
 * A code word holds 8 consecutive (kernel-order) inputs of one output column, LSB first, as in
 * GPTQ; both layouts keep that, so only the strides differ.
 *
 * Activations.  int8 (llama.cpp's q8_0 recipe): each token's input is quantized per block of 32
 * to int8 with one fp32 scale (max |x| / 127), dot products run in integers (maddubs / VNNI /
 * AMX) and are scaled per block and per group.  fp32: exact dequantization, fp32 FMAs.  Both
 * sum in a fixed order that depends only on the shapes, never on the thread or the tile split.
 *
 * Nothing here allocates after setup or takes a lock; q3_xmat_run may run on any thread.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "util.h"

/* Output columns per tile: the unit of work and of the packed layout. */
#define Q3_XTILE 32
/* Inputs per int8 activation block (one fp32 scale each). */
#define Q3_XBLOCK 32
/* Most tokens one kernel call handles (callers loop over larger batches). */
#define Q3_XT_MAX 16

enum q3_xisa {
	Q3_XISA_SCALAR,
	Q3_XISA_AVX2,	/* AVX2 + FMA + F16C */
	Q3_XISA_AVX512, /* AVX-512 F/BW/VL/DQ + VNNI */
	Q3_XISA_AMX,	/* AVX-512 VNNI for one token, AMX-INT8 tiles for batches */
	Q3_XISA_COUNT
};

enum q3_xact_kind {
	Q3_XACT_INT8, /* activations quantized per block of 32 (default) */
	Q3_XACT_F32,  /* exact fp32 activations */
};

/* One GPTQ int4 matrix, W [N][K], as the kernels read it.  Kernel input k' is the model's input
 * perm[k'] (perm NULL: the identity); groups are contiguous in k' (group of k' = k' / G). */
struct q3_xmat {
	int K, N, G, ngroups;
	const uint32_t *codes; /* word (row r, column n): codes of k' = 8r .. 8r+7 */
	size_t cd_row, cd_tile; /* word strides: next row, next tile of Q3_XTILE columns */
	const uint16_t *scales; /* (group g, column n): fp16, or bf16 when bf16_scales */
	size_t sc_grp, sc_tile;
	const uint32_t *zeros;	/* (g, columns 8j..8j+7) nibble-packed; NULL: every zero is zconst */
	size_t zp_grp, zp_tile; /* in words; a tile holds Q3_XTILE / 8 words */
	int zero_offset;	/* added to a stored zero point, then masked to 4 bits */
	int zconst;		/* the zero point when zeros is NULL */
	bool bf16_scales;
	const uint16_t *perm; /* [K] or NULL */
};

/* A routed expert ready for the CPU. */
struct q3_xexpert {
	struct q3_xmat gate, up, down; /* gate, up: [I][H]; down: [H][I] */
	int H, I;
	/* Output column j of gate and up is the model's intermediate channel down's perm[j], so
	 * silu(gate) ⊙ up comes out in the order down reads it. */
};

/* ---- preparing weights ---------------------------------------------------------------------- */

/* Checks that ex can run on these kernels (4-bit GPTQ, shapes multiples of Q3_XTILE, groups
 * multiples of Q3_XBLOCK, g_idx giving every group exactly G inputs).  0 or -ENOTSUP / -EINVAL
 * with the tensor at fault.  Reads g_idx data when present. */
int q3_xexpert_check(const struct q3_expert *ex, q3_err *e);

/* Bytes of the packed blob of ex (64-byte aligned sections, a small header). */
size_t q3_xexpert_packed_size(const struct q3_expert *ex);

/* Repacks ex (its tensors' data loaded) into dst (q3_xexpert_packed_size bytes, 64-byte
 * aligned), e.g. the expert's home in pinned RAM.  dst must not overlap the tensors. */
int q3_xexpert_pack(const struct q3_expert *ex, void *dst, size_t size, q3_err *e);

/* Points x at a packed blob (validated: header, sizes).  The blob must outlive x. */
int q3_xexpert_view(struct q3_xexpert *x, const void *blob, size_t size, q3_err *e);

/* Points x at ex's tensors as stored (no copy); -ENOTSUP when g_idx is a permutation. */
int q3_xexpert_gptq(struct q3_xexpert *x, const struct q3_expert *ex, q3_err *e);

/* The weight of a prepared matrix at output column j and kernel input k' (both kernel order:
 * model input perm[k'], and for gate and up model channel down.perm[j]), dequantized exactly
 * as dequant.h does.  For tests, and for unpacking a blob back to GPTQ. */
float q3_xmat_weight(const struct q3_xmat *m, int j, int kk);

/* ---- activations ------------------------------------------------------------------------------ */

/* One matrix input for T tokens in kernel order.  int8: q [rows][K] (each row of 8 inputs stored
 * as inputs 0,2,4,6 then 1,3,5,7, the order the low and high nibbles of a code word hold them),
 * d [rows][K/32] block scales, bsum [rows][K/32] = d · Σ q over the block.  fp32: xs [rows][K],
 * input k scaled by 2^(-4·(k mod 8)) (the kernels convert a code in place, code << 4j, without a
 * shift), bsum = Σ x over the block.  Token t of a kernel call is storage row rows[t] (rows NULL:
 * row t), so a kernel can run on a subset of the tokens without copying. */
struct q3_xact {
	int T, K;
	enum q3_xact_kind kind;
	int8_t *q;
	float *d;
	float *xs;
	float *bsum;
	const int16_t *rows; /* [T] or NULL */
};

static inline size_t q3_xact_row(const struct q3_xact *a, int t)
{
	return (size_t)(a->rows ? a->rows[t] : t);
}
static inline const int8_t *q3_xact_q(const struct q3_xact *a, int t)
{
	return a->q + q3_xact_row(a, t) * (size_t)a->K;
}
static inline const float *q3_xact_xs(const struct q3_xact *a, int t)
{
	return a->xs + q3_xact_row(a, t) * (size_t)a->K;
}
static inline const float *q3_xact_d(const struct q3_xact *a, int t)
{
	return a->d + q3_xact_row(a, t) * (size_t)(a->K / Q3_XBLOCK);
}
static inline const float *q3_xact_bsum(const struct q3_xact *a, int t)
{
	return a->bsum + q3_xact_row(a, t) * (size_t)(a->K / Q3_XBLOCK);
}

/* Bytes of scratch an activation of T rows and K inputs needs (all arrays, 64-byte aligned). */
size_t q3_xact_size(int T, int K, enum q3_xact_kind kind);
/* Lays out a's arrays in mem (q3_xact_size bytes), T rows, rows NULL. */
void q3_xact_init(struct q3_xact *a, void *mem, int T, int K, enum q3_xact_kind kind);
/* Fills storage row t of a from x (model order, [K]) through perm (NULL: identity), with the
 * best ISA; q3_xact_set_isa with a given one (all give the same int8 codes and scales). */
void q3_xact_set(struct q3_xact *a, int t, const float *x, const uint16_t *perm);
void q3_xact_set_isa(enum q3_xisa isa, struct q3_xact *a, int t, const float *x,
		     const uint16_t *perm);
/* Only blocks [b0, b1) of row t (kernel inputs 32·b0 .. 32·b1 - 1; x is still the whole vector):
 * one thread can quantize the part of a vector it computed. */
void q3_xact_set_blocks(enum q3_xisa isa, struct q3_xact *a, int t, const float *x,
			const uint16_t *perm, int b0, int b1);

/* ---- kernels ---------------------------------------------------------------------------------- */

/* y[t·ldy + j] = Σ_k W[j][k] · x_t[k] for the columns j of tiles [tile0, tile1) and t < a->T
 * (a->T <= Q3_XT_MAX), with the given ISA (which must be available: q3_xisa_available). */
void q3_xmat_run(enum q3_xisa isa, const struct q3_xmat *m, const struct q3_xact *a, float *y,
		 size_t ldy, int tile0, int tile1);

/* True when this CPU (and OS) can run isa. */
bool q3_xisa_available(enum q3_xisa isa);
/* The best available ISA, or the one QWEN3D_XISA names (scalar|avx2|avx512|amx) if available. */
enum q3_xisa q3_xisa_best(void);
const char *q3_xisa_name(enum q3_xisa isa);
/* Parses a name; -EINVAL if unknown. */
int q3_xisa_parse(const char *s, enum q3_xisa *out);

/* ---- whole expert, one thread ----------------------------------------------------------------- */

/* Scratch bytes q3_xexpert_ffn needs for T tokens. */
size_t q3_xexpert_ffn_scratch(const struct q3_xexpert *x, int T, enum q3_xact_kind kind);
/* y[t][H] = down(silu(gate·x_t) ⊙ up·x_t) for T <= Q3_XT_MAX tokens x [t·ldx], on this thread.
 * The composition the threaded executor (cpu_moe.h) splits across threads; for tests. */
void q3_xexpert_ffn(enum q3_xisa isa, enum q3_xact_kind kind, const struct q3_xexpert *x,
		    const float *xin, size_t ldx, int T, float *y, size_t ldy, void *scratch);

/* Bytes of weights one pass over the expert reads (codes, scales, zeros, perms). */
uint64_t q3_xexpert_bytes(const struct q3_xexpert *x);
