/* gpu.h - the CUDA kernels of the Qwen3-Next forward pass, as C functions (C linkage): the GPU
 * twin of cpu_ref.h.  Each op launches on a stream and returns 0 or -EIO with a one-line reason
 * (a launch error; kernels run asynchronously, so their faults surface at the next check).
 *
 * Conventions (all pointers are device pointers unless marked host):
 *  - activations are rows: R tokens of the call, sequence after sequence, row-major; the residual
 *    stream and every Linear output are fp32, the inputs of Linears are fp16 (uint16_t here;
 *    the KV cache and attention queries are bf16);
 *  - norms, softmax, the delta-rule state and all accumulations are fp32;
 *  - per-token and per-sequence facts (ids, positions, which session state a row belongs to)
 *    come from a struct q3g_rows that lives on the device, so that one captured CUDA graph
 *    serves every decode step of a batch size.
 *
 * The op <-> reference pairs (tests/gpu/test_ops.cu walks them):
 *   q3g_add_rmsnorm      q3_ref_rmsnorm             q3g_gated_rmsnorm  q3_ref_rmsnorm_gated
 *   q3g_mmv / q3g_gemm   q3_ref_linear              q3g_conv1d_silu    q3_ref_conv1d_silu
 *   q3g_delta            q3_ref_delta_qk + q3_ref_delta_gates + q3_ref_delta_step / _chunked
 *   q3g_attn_prep        q3_ref_rmsnorm + q3_ref_rope       q3g_attn_*  q3_ref_attention
 *   q3g_router_topk      q3_ref_router_topk          q3g_moe_*          q3_ref_moe
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu_config.h"

#ifdef __cplusplus
extern "C" {
#endif

struct q3_linear;
struct q3_expert;
struct q3_err;
typedef struct CUstream_st *q3g_stream; /* = cudaStream_t */

/* ---- weights: the tile format ------------------------------------------------------------- */

enum q3g_wfmt {
	Q3G_Q4 = 0,   /* GPTQ 4-bit codes, scale per (group, row), optional zero points */
	Q3G_Q8 = 1,   /* GPTQ 8-bit codes */
	Q3G_F16 = 2,  /* dense fp16 (dense checkpoints; GPTQ layouts the fast path does not take) */
};

/* A Linear y = x·Wᵀ (W [N][K]) in tile format on the device: tiles of 16 output rows, chunks of
 * 64 inputs, each chunk laid out so that lane l of a warp reads the mma A fragments of its four
 * k-steps with 16-byte loads (see gpu_weights.cu for the exact bit layout).  Codes are stored as
 * is; the kernels compute s · (q − z) with q − z exact in fp16 and apply s per group in fp32.
 *
 * A stack of E matrices of one shape (the routed experts of a layer) shares one descriptor: matrix
 * e starts at data + e·data_stride bytes, and likewise for scales, zeros and perm. */
struct q3g_mat {
	int fmt;		/* enum q3g_wfmt */
	int N, K;		/* true sizes */
	int ntiles;		/* ceil(N / 16) */
	int nchunks;		/* ceil(K / 64) */
	int gsteps;		/* k-steps of 16 per scale group (group_size / 16); 0 for fp16 */
	int ngroups;		/* scale groups per row, padding included */
	int nmat;		/* matrices in the stack (1 for a plain Linear) */
	const void *data;	/* [nmat][ntiles][nchunks][chunk bytes] */
	const float *scales;	/* [nmat][ntiles][ngroups][16]; NULL for fp16 */
	const float *zeros;	/* [nmat][ntiles][ngroups][16] zero points; NULL: symmetric (8 or 128) */
	const uint16_t *perm;	/* [nmat][nchunks * 64]: position -> input index (act-order), >= K:
				 * padding; NULL: identity, or the inputs arrive sorted (sorted) */
	size_t data_stride, sz_stride, perm_stride; /* per matrix: bytes, floats, entries */
	bool sorted;		/* act-order, the permutation not its own: stored in sorted input order
				 * as always, but the kernels read the inputs in order (perm NULL: the
				 * Linear before wrote them so, q3g_expert_upload) or through another
				 * stack's equal permutation (perm: gate's, for up) */
};

/* Host-side plan of a stack: format and sizes, decided from the stored Linears (all of one
 * shape).  Falls back to fp16 when a GPTQ layout is outside the fast path (group not a multiple
 * of 16, K not a multiple of 16, an act-order g_idx whose sorted groups are not contiguous runs
 * of group_size).  rowmap (host, [N] or NULL): output row n of the tile format is stored row
 * rowmap[n] (used to reorder in_proj_qkvz into [q | k | v | z]). */
struct q3g_mat_plan {
	int fmt, N, K, ntiles, nchunks, gsteps, ngroups, nmat;
	bool zeros, perm;
	bool sorted; /* the caller's, before q3g_mat_bytes: a perm stack that will not keep its
		      * permutation (q3g_mat.sorted; no room for it) */
	size_t data_bytes, sz_floats, perm_entries; /* per matrix */
};

int q3g_mat_plan(const struct q3_linear *const *ls, int nmat, struct q3g_mat_plan *p,
		 struct q3_err *e);
/* Bytes of device memory the stack needs (data, scales, zeros, perm; each 256-aligned). */
size_t q3g_mat_bytes(const struct q3g_mat_plan *p);
/* Points a descriptor into mem (q3g_mat_bytes of device memory) for plan p. */
void q3g_mat_place(struct q3g_mat *m, const struct q3g_mat_plan *p, void *mem);

/* Staging for uploads: a device buffer and a pinned host buffer of the same size. */
struct q3g_stage {
	void *dev;
	void *host;
	size_t bytes;
};

/* Uploads matrix idx of stack m from the stored Linear l (host data) and repacks it into the
 * tile format on the device.  rowmap as in q3g_mat_plan.  Synchronous with respect to the stage
 * (returns when the stage may be reused). */
int q3g_mat_upload(const struct q3g_mat *m, int idx, const struct q3_linear *l, const int *rowmap,
		   struct q3g_stage *stage, q3g_stream st, struct q3_err *e);

/* Expert x (gate, up, down) into matrix idx of three stacks.  When down is sorted (perm NULL),
 * gate's and up's rows are stored in down's act-order input order, so the activations
 * silu(gate)·up come out in the order down reads them: down's input gather (half the speed of
 * experts down at 16 rows) goes, and the sums are the same products in the same order, bit for
 * bit.  Only for stacks whose activations never leave the device (not the experts the offload
 * computes on the CPU). */
int q3g_expert_upload(const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *down, int idx,
		      const struct q3_expert *x, struct q3g_stage *stage, q3g_stream st, struct q3_err *e);

/* The plans of an MLP's stacks (gate, up, down: p[0..2], nmat = n) from experts xs[0 .. n), with
 * what act-order allows.  Up is sorted and takes gate's permutation (q3g_mlp_place) where every
 * expert reads gate's and up's inputs in one order, as GPTQ leaves Linears that share an input
 * (one Hessian, one order): moe_up then stages each row once for both.  Down is sorted where
 * sorted_down (its inputs come from gate and up on the device: q3g_expert_upload). */
int q3g_mlp_plan(const struct q3_expert *xs, int n, bool sorted_down, struct q3g_mat_plan p[3],
		 struct q3_err *e);
/* Points ms[i] into mem[i] (q3g_mat_bytes(&p[i]) bytes) for plans p (q3g_mlp_plan's, or any three
 * of one MLP), up at gate's permutation where up is sorted. */
void q3g_mlp_place(struct q3g_mat *const ms[3], const struct q3g_mat_plan p[3], void *const mem[3]);

/* Repacks matrices idx0 .. idx0 + n - 1 of stack m (n <= Q3G_RAW_BATCH) in one launch from raw
 * GPTQ tensors already copied to the device: matrix idx0 + j's qweight, qzeros and scales (the
 * stored bytes, 4-byte aligned) at base + off[j][0..2], each shaped like l's (same N, K, bits,
 * group size, zero offset and scale type).  Asynchronous on st; the raw bytes must stay until st
 * has run it.  GPTQ tile formats without act-order only (streaming experts in prefill). */
#define Q3G_RAW_BATCH 32
int q3g_mat_repack_raw(const struct q3g_mat *m, int idx0, int n, const struct q3_linear *l, const void *base,
		       const uint64_t (*off)[3], q3g_stream st, struct q3_err *e);

/* W of matrix idx as fp16 row-major [N][K] in the order its inputs arrive: the original order, sorted
 * for a sorted stack (for cuBLAS and tests). */
int q3g_mat_expand(const struct q3g_mat *m, int idx, uint16_t *w, q3g_stream st, struct q3_err *e);
/* The same in fp32. */
int q3g_mat_expand_f32(const struct q3g_mat *m, int idx, float *w, q3g_stream st, struct q3_err *e);

/* ---- per-call rows and sessions ------------------------------------------------------------- */

/* A session's state on the device, one allocation (see q3g_state_layout). */
struct q3g_seq {
	int row0, n, pos, pad;	/* rows [row0, row0 + n) feed positions pos .. pos + n - 1 */
	uint16_t *kv;		/* [n_full][2][max_ctx][kv_dim] bf16: K, V */
	float *conv_rd;		/* [n_lin][W - 1][conv_dim]: the last W-1 conv inputs before this call */
	float *conv_wr;		/* the same after it (the other half of a double buffer) */
	float *rec;		/* [n_lin][Nv][Dv][Dk]: delta-rule states, transposed (S[i][c] at c·Dk + i) */
};

struct q3g_rows {
	const int32_t *ids;	/* [R] token ids */
	const int *row_seq;	/* [R] sequence of each row */
	const int *row_pos;	/* [R] absolute position */
	const struct q3g_seq *seq; /* [nseq] */
};

/* ---- model shape the kernels need ----------------------------------------------------------- */

struct q3g_dims {
	int H, V;		/* hidden, vocab */
	int Hq, Hkv, D, rot;	/* full attention */
	double rope_theta;
	int Nk, Nv, Dk, Dv, W;	/* Gated DeltaNet; W = conv kernel */
	int key_dim, value_dim, conv_dim;
	int E, topk, I, Is;	/* MoE */
	bool norm_topk;
	float eps;
	int max_ctx;
};

/* ---- ops ------------------------------------------------------------------------------------ */

/* Reads the current device's facts and configures the kernels (shared-memory limits).  Call once
 * per process (per device) before any op. */
int q3g_init(struct q3_err *e);

/* h[r] = embed[ids[r]] (embed: bf16 [V][H]). */
int q3g_embed(float *h, const uint16_t *embed, struct q3g_rows rows, int R, int H, q3g_stream st,
	      struct q3_err *e);

/* For each row: h += a (a may be NULL), then y = fp16(h · rsqrt(mean(h²) + eps) · (1 + w)).
 * rows_idx (optional, [R]): normalize only rows rows_idx[i] of h into row i of y. */
int q3g_add_rmsnorm(float *h, const float *a, uint16_t *y, const float *w, const int *rows_idx, int R,
		    int n, float eps, q3g_stream st, struct q3_err *e);

/* x = h · rsqrt(mean(h²) + eps) · (1 + w) per row, fp32. */
int q3g_rmsnorm_f32(float *x, const float *h, const float *w, int R, int n, float eps, q3g_stream st,
		    struct q3_err *e);

/* One Linear application of a matvec launch: y[t][n] (op) x[t]·W[n]ᵀ for t < R. */
enum q3g_epi {
	Q3G_EPI_STORE = 0, /* y = x·Wᵀ (fp32) */
	Q3G_EPI_ADD = 1,   /* y += x·Wᵀ (the residual add) */
};

struct q3g_job {
	struct q3g_mat w;	 /* the descriptor (by value: launches carry it as a parameter) */
	const uint16_t *x;	 /* fp16 [R][ldx] */
	float *y;		 /* fp32 [R][ldy] */
	int ldx, ldy, epi;
	/* q3g_mmv only, instead of x: the residual stream h (fp32 [R][ldx]) and a zero-centred
	 * RMSNorm weight normw [K]: the input is q3g_add_rmsnorm(h)'s output, computed in place */
	const float *xh, *normw;
	float eps;
};

/* Up to Q3G_MMV_MAX_JOBS Linears on R <= Q3G_MMV_MAX_TOK rows, one launch, tensor cores. */
int q3g_mmv(const struct q3g_job *jobs, int njobs, int R, q3g_stream st, struct q3_err *e);

/* The same Linear on R rows of any count (prefill): W expanded to fp16 row-major into wtmp
 * ([N][K]) and multiplied by cuBLAS (cublas: a cublasHandle_t). */
int q3g_gemm(void *cublas, const struct q3g_job *job, int R, uint16_t *wtmp, q3g_stream st,
	     struct q3_err *e);

/* Gated DeltaNet: causal conv1d + SiLU over the rows of every sequence, from the projections
 * qkvz [R][ldq] (columns [0, conv_dim) are the conv inputs q | k | v) into u [R][conv_dim];
 * reads each sequence's conv_rd state and writes conv_wr (layer lin). cw: [conv_dim][W] fp32. */
int q3g_conv1d_silu(float *u, const float *qkvz, int ldq, const float *cw, struct q3g_rows rows,
		    int R, int nseq, int lin, const struct q3g_dims *d, q3g_stream st, struct q3_err *e);

/* The delta rule for every sequence and value head (prefill: a sequence's tokens one after the
 * other): l2norm q, k (q scaled by Dk^-0.5), gates beta = sigmoid(b), g = -exp(A_log)·softplus(a +
 * dt_bias) from ba [R][2 Nv] ([b | a]), then the recurrence on the sequence's state (layer lin),
 * output raw fp32 to o [R][value_dim] (the gated norm: q3g_gated_rmsnorm; fused in
 * q3g_delta_decode). */
int q3g_delta(const float *u, const float *ba, const float *A_log, const float *dt_bias, float *o,
	      struct q3g_rows rows, int nseq, int lin, const struct q3g_dims *d, q3g_stream st,
	      struct q3_err *e);

/* The same for decode (every sequence feeds one token), with the conv1d + SiLU and the gated
 * norm in the same kernel: qkvz [R][ldq] the projections (columns [0, conv_dim) the conv inputs),
 * cw [conv_dim][W]; the sequences' conv states are read and advanced (q3g_conv1d_silu's job); the
 * output goes gated-normed, fp16, to core [R][value_dim] (z [R][ldz] the gate, normw [Dv]). */
int q3g_delta_decode(const float *qkvz, int ldq, const float *cw, const float *ba, const float *A_log,
		     const float *dt_bias, uint16_t *core, const float *z, int ldz, const float *normw,
		     struct q3g_rows rows, int nseq, int lin, const struct q3g_dims *d, q3g_stream st,
		     struct q3_err *e);

/* core[r][j·Dv + c] = fp16(w[c] · o · rsqrt(mean_c(o²) + eps) · silu(z)) per row and value head. */
int q3g_gated_rmsnorm(uint16_t *core, const float *o, const float *z, int ldz, const float *w, int R,
		      int nheads, int Dv, float eps, q3g_stream st, struct q3_err *e);

/* Full attention, before the scores: per row, q_norm + RoPE on the query heads (qg [R][2 q_dim],
 * per head [q | gate]) into q (bf16 [R][Hq][D]); k_norm + RoPE on k and the raw v ([R][kv_dim]
 * each) into the sequence's cache of layer full at the row's position. */
int q3g_attn_prep(uint16_t *q, const float *qg, const float *k, const float *v, const float *qnw,
		  const float *knw, struct q3g_rows rows, int R, int full, const struct q3g_dims *d,
		  q3g_stream st, struct q3_err *e);

/* Decode attention (flash-decoding): each row attends over its cache positions [0, pos] in up to
 * Q3G_ATT_SPLITS splits whose size depends on pos alone (a row's result does not depend on its
 * batch); part: scratch [R][Hq][Q3G_ATT_SPLITS][D + 2] fp32.  Then the splits are combined and
 * multiplied by sigmoid(gate) into att (fp16 [R][q_dim]). */
int q3g_attn_decode(uint16_t *att, const uint16_t *q, const float *qg, float *part, struct q3g_rows rows, int R,
		    int full, const struct q3g_dims *d, q3g_stream st, struct q3_err *e);

/* Prefill attention of one sequence (rows row0 .. row0 + n - 1 at positions pos .. pos + n - 1)
 * through cuBLAS: S = q·Kᵀ (scratch s, fp32, qblk x (pos + n) per head), causal softmax into p
 * (bf16, same shape), O = P·V into o (fp32 [n][Hq][D]), then att = o ⊙ sigmoid(gate).  Host
 * pointers seq (the sequence's device state, host copy). */
int q3g_attn_prefill(void *cublas, uint16_t *att, const uint16_t *q, const float *qg,
		     const struct q3g_seq *seq, int full, float *s, uint16_t *p, float *o, size_t scratch_elems,
		     const struct q3g_dims *d, q3g_stream st, struct q3_err *e);

/* The router and the shared-expert gate in fp32 (routing decisions are sensitive to the inputs'
 * rounding): the post-attention RMSNorm of h [R][H] (weight normw) in fp32, then
 * logits[r] = x·routerᵀ ([R][E]) and sg[r] = x·shared_gateᵀ ([R][1]).  Matrices in tile format,
 * fp16 (dense).  R <= Q3G_MMV_MAX_TOK: a SIMT kernel over the tile format; more rows: the norm
 * into xf ([R][H] fp32 scratch) and fp32 cuBLAS on the weights expanded into wtmp (E·H floats). */
int q3g_router_logits(void *cublas, float *logits, float *sg, const float *h, const float *normw, float eps,
		      const struct q3g_mat *router, const struct q3g_mat *sgate, int R, int H, float *xf,
		      float *wtmp, q3g_stream st, struct q3_err *e);

/* Router: per row, softmax over E logits, the top k (ties: lower index), renormalized when
 * norm; slot k is the shared expert (index -1, weight sigmoid(sg[r])).  idx, w: [R][k + 1]. */
int q3g_router_topk(int *idx, float *w, const float *logits, const float *sg, int R, int E, int k,
		    bool norm, q3g_stream st, struct q3_err *e);

/* q3g_router_logits then q3g_router_topk.  xo (optional, [R][H]): the normalized rows in fp16
 * as well, what q3g_add_rmsnorm would write (the experts' input). */
int q3g_router(void *cublas, float *logits, float *sg, int *idx, float *w, int E, int k, bool norm,
	       const float *h, const float *normw, float eps, const struct q3g_mat *router, const struct q3g_mat *sgate,
	       int R, int H, float *xf, float *wtmp, uint16_t *xo, q3g_stream st, struct q3_err *e);

/* A routed pair whose expert is not computed by this call (offload: the CPU computes it, or
 * another pass has it): moe_up / moe_down / moe_prefill leave it out.  Experts are indices into
 * the stacks (a stack of resident experts when some live in host RAM: see cuda_offload.h). */
#define Q3G_SKIP (-2)

/* Decode MoE (per (row, slot) pair p = r·(k+1) + s, any R):
 *   up:   act[p][0..N) = fp16(silu(x[r]·gateᵀ) ⊙ (x[r]·upᵀ)) (rows of lda >= N halves), with the
 *         pair's expert idx[p] (gate/up: the stacks) or, for slot k, the shared expert (sgate/sup);
 *   down: h[r] += Σ_s w[p] · down_e(act[p]). */
/* The row length lda for experts of I and shared expert of Is outputs: even, for 4-byte loads. */
static inline int q3g_moe_lda(int I, int Is)
{
	return ((I > Is ? I : Is) + 1) & ~1;
}
int q3g_moe_up(uint16_t *act, const uint16_t *x, const int *idx, const struct q3g_mat *gate,
	       const struct q3g_mat *up, const struct q3g_mat *sgate, const struct q3g_mat *sup, int R,
	       int k, int H, int lda, q3g_stream st, struct q3_err *e);
/* The same with the input normalized in place: x = fp16(RMSNorm(h)·(1 + normw)), h [R][H]. */
int q3g_moe_up_norm(uint16_t *act, const float *h, const float *normw, float eps, const int *idx,
		    const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *sgate,
		    const struct q3g_mat *sup, int R, int k, int H, int lda, q3g_stream st,
		    struct q3_err *e);
int q3g_moe_down(float *h, const uint16_t *act, const int *idx, const float *w, const struct q3g_mat *down,
		 const struct q3g_mat *sdown, int R, int k, int H, int lda, q3g_stream st,
		 struct q3_err *e);
/* Tests only: q3g_moe_down runs the kernel it uses before sm_90 on every device. */
extern bool q3g_moe_down_force_regs;

/* Routed experts read straight from host memory (mapped pinned pages, over PCIe) in their raw
 * GPTQ layout, for decode with experts beyond VRAM (gpu_moe_host.cu).  Row r's picks: of the m
 * routed entries idx[r][0..k) whose expert has no VRAM slot (slot_of[x] < 0), the last
 * min(G, m - keep) in routing order (the first ones, at least keep, are left to the CPU);
 * out[r] = Σ w · down(silu(gate(x)) ⊙ up(x)) over them (stored, zeros for a row without),
 * x the fp16 activations xb[r].  tab [E] (device memory): each expert's tensors as the device
 * sees them; ws: scratch of q3g_moe_host_scratch floats; g_now (device, NULL: G): the picks a
 * row in force for this launch, at most G (a captured graph keeps its G, the caller moves g_now). */
#define Q3G_HX_MAX 8 /* picks a row */
struct q3g_hlin {
	const uint32_t *qweight; /* [K·bits/32][N] codes packed along K */
	const uint32_t *qzeros;	 /* [K/group][N·bits/32] */
	const uint16_t *scales;	 /* [K/group][N] fp16 or bf16 */
};
struct q3g_hexpert {
	struct q3g_hlin lin[3]; /* gate, up, down */
};
/* The storage every expert of a table shares (gate and up alike): bits 4 or 8, group a multiple
 * of 32 / bits; H and I multiples of 4, every tensor 4-byte aligned. */
struct q3g_hfmt {
	int bits[2], group[2], zero_off[2]; /* [0] gate and up, [1] down */
	bool bf16[2];
};
size_t q3g_moe_host_scratch(int R, int G, int H, int I);
int q3g_moe_host(float *out, float *ws, const uint16_t *xb, const int *idx, const float *w, int ldk, int k,
		 const int16_t *slot_of, const struct q3g_hexpert *tab, const struct q3g_hfmt *f, int G, int keep,
		 const int *g_now, int R, int H, int I, q3g_stream st, struct q3_err *e);

/* Prefill MoE (any R): pairs grouped by expert, grouped tensor-core GEMMs.  ws: scratch of
 * q3g_moe_prefill_scratch bytes. */
size_t q3g_moe_prefill_scratch(int R, const struct q3g_dims *d);
int q3g_moe_prefill(float *h, const uint16_t *x, const int *idx, const float *w,
		    const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *down,
		    const struct q3g_mat *sgate, const struct q3g_mat *sup, const struct q3g_mat *sdown,
		    int R, const struct q3g_dims *d, void *ws, q3g_stream st, struct q3_err *e);

/* ---- sampling (sampler.h's rules on the device; gpu_sample.cu) ------------------------------- */

struct q3g_sampling {
	float temperature; /* < 1e-5: greedy */
	float top_p;	   /* 1 = off */
	int top_k;	   /* 0 = off */
	float min_p;	   /* 0 = off */
	uint64_t seed, step; /* the draw is uniform number `step` of `seed` (splitmix64) */
};

/* The logit adjustments of a row (sampler.h's q3_logit_adj / q3_sample_row): logits[id] += v for
 * the nbias entries, then for the npen after them; ids distinct within each part. */
struct q3g_adj {
	int32_t id;
	float v;
};
struct q3g_adjust_row {
	const struct q3g_adj *adj; /* [nbias + npen], device-readable (mapped host memory will do) */
	int nbias, npen;
};
int q3g_logits_adjust(float *logits, int V, const struct q3g_adjust_row *rows, int R, q3g_stream st,
		      struct q3_err *e);

/* One id per row of logits [R][V] (penalties already applied), params [R] in device memory (every
 * block reads its row's: mapped host memory would be a read over PCIe for each);
 * out [R], -1 for a row without any finite or +inf logit.  ws: q3g_sample_scratch(R) bytes. */
size_t q3g_sample_scratch(int R);
int q3g_sample(int32_t *out, const float *logits, const struct q3g_sampling *params, int R, int V, void *ws,
	       q3g_stream st, struct q3_err *e);

/* ---- device facts ---------------------------------------------------------------------------- */

/* Measured device-to-device copy bandwidth in GB/s (bytes read + written), or a negative errno. */
double q3g_copy_bandwidth(size_t bytes, int reps, struct q3_err *e);

#ifdef __cplusplus
}
#endif
