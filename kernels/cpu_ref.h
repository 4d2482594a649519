/* cpu_ref.h - the plain-C fp32 reference of every op of the Qwen3-Next forward pass.
 *
 * One function per op, obvious code, fp32 throughout (fp32 recurrent state), following
 * docs/qwen3next.md section 4 formula by formula.  These are the oracle: the CPU backend runs
 * them (all but the matvec, which has a faster twin in cpu_linear.h), and every other backend's
 * kernels are tested against them on the same inputs.  Arguments are plain float arrays and the
 * model's descriptors (struct q3_linear, struct q3_layer); nothing here allocates, locks or
 * keeps state, and every function may be called from any thread.
 *
 * Shapes are written [rows][cols], row-major; "ld" arguments are row strides in floats.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "model.h"

/* Delta-rule chunk length of the chunked (prefill) form (HF torch_chunk_gated_delta_rule). */
#define Q3_DELTA_CHUNK 64

static inline float q3_sigmoid(float x)
{
	return 1.0f / (1.0f + __builtin_expf(-x));
}

static inline float q3_silu(float x)
{
	return x / (1.0f + __builtin_expf(-x));
}

/* torch.nn.functional.softplus (beta 1, threshold 20). */
static inline float q3_softplus(float x)
{
	return x > 20.0f ? x : __builtin_log1pf(__builtin_expf(x));
}

/* Zero-centred RMSNorm: y = (x · rsqrt(mean(x²) + eps)) · (1 + w).  x, y, w: [n]; y may be x. */
void q3_ref_rmsnorm(float *y, const float *x, const float *w, int n, float eps);

/* Gated RMSNorm of linear attention: y = (w · x · rsqrt(mean(x²) + eps)) · silu(z), plain w (not
 * 1 + w).  All [n]; y may be x. */
void q3_ref_rmsnorm_gated(float *y, const float *x, const float *z, const float *w, int n, float eps);

/* l2norm: y = x · rsqrt(Σ x² + eps).  [n]; y may be x. */
void q3_ref_l2norm(float *y, const float *x, int n, float eps);

/* Partial rotary embedding, NeoX rotate-half style, in place on one head vector x[head_dim]:
 * dims [0, rot) rotate at absolute position pos, the rest pass through.  For i < rot/2,
 * θ = pos · theta^(-2i/rot) (fp32, as HF computes it):
 *   x[i]         = x[i] cos θ − x[i + rot/2] sin θ
 *   x[i + rot/2] = x[i + rot/2] cos θ + x[i] sin θ */
void q3_ref_rope(float *x, int rot, int pos, double theta);

/* Gated attention of one query head over n cached positions (causality is the caller's choice
 * of n: the query at position p sees rows 0..p).
 *   q [D] (q_norm and RoPE applied), gate [D] (pre-sigmoid), K, V: row j at K + j·ldkv ([D],
 *   k_norm and RoPE applied), out [D] = (Σ_j softmax_j(q·K_j · scale) V_j) ⊙ sigmoid(gate).
 * Softmax in fp32 with the max subtracted.  scores: scratch [n]. */
void q3_ref_attention_head(float *out, const float *q, const float *gate, const float *K,
			   const float *V, size_t ldkv, int n, int D, float scale, float *scores);

/* The same for all Hq query heads of one token (GQA: head h reads kv head h / (Hq / Hkv)).
 *   q, gate, out: [Hq][D]; K, V: [n][Hkv][D] (kv head j of row p at K + p·Hkv·D + j·D). */
void q3_ref_attention(float *out, const float *q, const float *gate, const float *K, const float *V,
		      int n, int Hq, int Hkv, int D, float scale, float *scores);

/* Un-interleaves the Gated DeltaNet projections of one token, grouped by key head g
 * (qwen3next.md 4.5.1):
 *   qkvz [Nk][Dk + Dk + r·Dv + r·Dv]  per g: q_g | k_g | v_{rg..rg+r-1} | z_{rg..rg+r-1}
 *   ba   [Nk][2r]                     per g: b_{rg..} | a_{rg..}          (r = Nv / Nk)
 * into mixed [2·Nk·Dk + Nv·Dv] = q (head-major) | k | v (value heads 0..Nv-1), z [Nv][Dv],
 * b [Nv], a [Nv]. */
void q3_ref_qkvz_split(const float *qkvz, const float *ba, int Nk, int Nv, int Dk, int Dv,
		       float *mixed, float *z, float *b, float *a);

/* Causal depthwise conv1d (width W, no bias) followed by SiLU, over T >= 1 tokens of C channels:
 *   y[t][c] = silu(Σ_{m<W} w[c][m] · in[t − (W−1) + m][c])
 * where in[] is x [T][C] preceded by state [W−1][C] (the previous W−1 inputs, oldest first;
 * zeros at sequence start).  state is updated to the last W−1 inputs.  T = 1 is the decode step.
 * y must not alias x. */
void q3_ref_conv1d_silu(float *y, const float *x, int T, int C, const float *w, int W, float *state);

/* Gated DeltaNet gates for Nv value heads of one token:
 *   beta[j] = sigmoid(b[j]),  g[j] = −exp(A_log[j]) · softplus(a[j] + dt_bias[j])
 * (g is the log of the per-head decay alpha = exp(g)). */
void q3_ref_delta_gates(float *beta, float *g, const float *b, const float *a, const float *A_log,
			const float *dt_bias, int Nv);

/* q and k of one key head made ready for the delta rule: qn = l2norm(q) · Dk^-0.5,
 * kn = l2norm(k) (eps 1e-6).  [Dk]; outputs may alias inputs. */
void q3_ref_delta_qk(float *qn, float *kn, const float *q, const float *k, int Dk);

/* One recurrent step of the gated delta rule for one value head (qwen3next.md 4.5.4):
 *   S = exp(g)·S;  delta = beta·(v − Sᵀk);  S += k ⊗ delta;  o = Sᵀq   (read after the update)
 * S [Dk][Dv] fp32 (S[i][c]: key i, value c), updated in place; q, k [Dk] from q3_ref_delta_qk;
 * v, o [Dv]. */
void q3_ref_delta_step(float *S, const float *q, const float *k, const float *v, float g, float beta,
		       float *o, int Dk, int Dv);

/* Floats of scratch q3_ref_delta_chunked needs. */
size_t q3_ref_delta_chunked_scratch(int Dk, int Dv);

/* The chunked form of the same recurrence over T >= 1 tokens of one value head (chunks of
 * Q3_DELTA_CHUNK, the HF recipe of qwen3next.md 4.5.4), starting from S and leaving the final
 * state in S.  Token t: q + t·ldqk, k + t·ldqk [Dk]; v + t·ldv [Dv]; g[t·ldg], beta[t·ldg];
 * o + t·ldo [Dv].  Equals T calls of q3_ref_delta_step up to fp32 rounding. */
void q3_ref_delta_chunked(float *S, const float *q, const float *k, size_t ldqk, const float *v,
			  size_t ldv, const float *g, const float *beta, size_t ldg, float *o, size_t ldo,
			  int T, int Dk, int Dv, float *scratch);

/* MoE router: softmax over E logits (fp32), the k largest probabilities (ties: the lower expert
 * index first), renormalised to sum 1 when norm.  idx[k], w[k] in order of decreasing
 * probability. */
void q3_ref_router_topk(const float *logits, int E, int k, bool norm, int *idx, float *w);

/* SwiGLU activation: y = silu(g) ⊙ u.  [n]; y may alias g or u. */
void q3_ref_swiglu(float *y, const float *g, const float *u, int n);

/* y = x·Wᵀ for a Linear as stored (dense BF16/F16/F32, or GPTQ 4/8-bit with or without g_idx,
 * v1 or v2 zero points), dequantized on the fly: W[n][k] = s[g][n] · (q(k,n) − z(g,n)) with
 * g = g_idx[k] (or k / group_size).  Sums over k in order, one fp32 accumulator.
 * x [T][K], y [T][N]; the tensors' data must be loaded. */
void q3_ref_linear(const struct q3_linear *l, const float *x, int T, float *y);

/* Floats of scratch q3_ref_moe needs. */
size_t q3_ref_moe_scratch(const struct q3_config *c);

/* The sparse MoE block of one token: y = Σ_k w_k · expert_{i_k}(x) + sigmoid(x·w_sg) · shared(x),
 * expert(x) = down(silu(gate(x)) ⊙ up(x)), routed as q3_ref_router_topk.  x, y [H]. */
void q3_ref_moe(const struct q3_config *c, const struct q3_layer *L, const float *x, float *y,
		float *scratch);
