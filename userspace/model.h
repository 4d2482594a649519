/* model.h - the Qwen3-Next weights bound by role, with shapes derived from config.json.
 *
 * q3_model_bind walks the architecture (embedding, 48 layers of Gated DeltaNet or gated full
 * attention each followed by a 512-expert MoE, final norm, lm_head) and claims every tensor it
 * needs from the checkpoint's table, checking dtype and shape; each Linear is dense or GPTQ
 * according to what is on disk (.qweight present => GPTQ; a float .weight => dense), with bits and
 * group size checked against quantization_config.  Anything missing, misshapen or unknown is an
 * error (mtp.* tensors are known: kept for a later multi-token-prediction head).  Engines use the
 * semantic fields (layer->qkvz, layer->experts[e].down), never names.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "checkpoint.h"
#include "config.h"

enum q3_wfmt {
	Q3_W_DENSE, /* w: [N, K] BF16, F16 or F32 */
	Q3_W_GPTQ,  /* qweight / qzeros / scales (/ g_idx), qwen3next.md section 5 */
};

/* A Linear y = x·Wᵀ, W [N out][K in]. */
struct q3_linear {
	enum q3_wfmt fmt;
	int K, N;
	struct q3_tensor *w;	   /* dense weight [N, K] */
	struct q3_tensor *qweight; /* I32 [K * bits / 32, N]: codes packed along K, LSB first */
	struct q3_tensor *qzeros;  /* I32 [ngroups, N * bits / 32]: zero points packed along N */
	struct q3_tensor *scales;  /* F16 or BF16 [ngroups, N] */
	struct q3_tensor *g_idx;   /* I32 [K]: group of input channel k; NULL => k / group_size */
	int bits;		   /* 4 or 8 */
	int group_size;		   /* input channels per group (K when the config says -1) */
	int ngroups;		   /* K / group_size */
	int zero_offset;	   /* add to a stored zero point: 1 for gptq v1 / auto_gptq, 0 for v2 */
	bool sym, desc_act;	   /* as the config says (the kernels use qzeros and g_idx anyway) */
};

struct q3_expert {
	struct q3_linear gate; /* [I, H] */
	struct q3_linear up;   /* [I, H] */
	struct q3_linear down; /* [H, I] */
};

struct q3_layer {
	int idx;
	enum q3_layer_kind kind;
	struct q3_tensor *input_norm; /* [H] zero-centred RMSNorm weight (use 1 + w) */
	struct q3_tensor *post_norm;  /* [H] zero-centred */

	/* Gated DeltaNet (kind == Q3_LAYER_LINEAR) */
	struct q3_linear qkvz;	    /* [qkvz_dim, H], rows grouped by key head (qwen3next.md 4.5.1) */
	struct q3_linear ba;	    /* [2 * Nv, H], grouped by key head */
	struct q3_tensor *conv1d;   /* [conv_dim, 1, conv_kernel] depthwise, no bias */
	struct q3_tensor *dt_bias;  /* [Nv] */
	struct q3_tensor *A_log;    /* [Nv]: decay rate is -exp(A_log) */
	struct q3_tensor *lin_norm; /* [Dv] gated RMSNorm weight, plain (not 1 + w) */
	struct q3_linear lin_out;   /* [H, Nv * Dv] */

	/* gated full attention (kind == Q3_LAYER_FULL) */
	struct q3_linear q;	  /* [2 * Hq * D, H]: per head [query D | gate D] */
	struct q3_linear k, v;	  /* [Hkv * D, H] */
	struct q3_linear o;	  /* [H, Hq * D] */
	struct q3_tensor *q_norm; /* [D] zero-centred, shared by heads */
	struct q3_tensor *k_norm; /* [D] */

	/* sparse MoE (every layer) */
	struct q3_linear router;      /* [E, H] */
	struct q3_expert *experts;    /* [E] */
	struct q3_expert shared;      /* intermediate shared_inter */
	struct q3_linear shared_gate; /* [1, H]: scalar sigmoid gate of the shared expert */
};

/* Bytes on disk by category. */
struct q3_model_bytes {
	uint64_t experts;	 /* routed experts */
	uint64_t dense;		 /* everything else in the layers: attention, DeltaNet, norms,
				  * router, shared expert */
	uint64_t embed;
	uint64_t lm_head;	 /* 0 when tied to the embedding */
	uint64_t mtp;		 /* mtp.* tensors (not used yet) */
	uint64_t other;		 /* final norm */
	uint64_t expert_min, expert_max; /* one routed expert (gate + up + down) */
};

struct q3_model {
	struct q3_ckpt *ck;	      /* not owned */
	const struct q3_config *cfg;  /* = &ck->cfg */
	struct q3_tensor *embed;      /* [V, H] */
	struct q3_tensor *final_norm; /* [H] zero-centred */
	struct q3_linear lm_head;     /* [V, H]; the embedding when tie_word_embeddings */
	struct q3_layer *layers;      /* [num_layers] */
	size_t n_mtp;		      /* mtp.* tensors seen */
	struct q3_model_bytes bytes;
};

/* Binds every tensor of ck by role.  Returns 0, or -EINVAL with the first problem (and how many
 * more there are) as one line naming the tensor. */
int q3_model_bind(struct q3_ckpt *ck, struct q3_model **out, q3_err *e);
void q3_model_free(struct q3_model *m);

/* Checks what can only be checked once the bytes are loaded (tensor->data set): every g_idx
 * entry is a valid group.  Engines call it before computing: a bad g_idx would index scales out
 * of bounds. */
int q3_model_check_data(const struct q3_model *m, q3_err *e);

/* Total bytes of a Linear's tensors. */
uint64_t q3_linear_bytes(const struct q3_linear *l);
/* The module name of a Linear ("model.layers.0.linear_attn.in_proj_qkvz"), from its tensors. */
const char *q3_linear_name(const struct q3_linear *l, char *buf, size_t len);
