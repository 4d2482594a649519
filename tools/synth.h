/* synth.h - a synthetic Qwen3-Next checkpoint, described before a byte is written.
 *
 * q3_synth_plan turns a preset (tiny, 80b-a3b) and the quantization choices into the full hub
 * layout: the config and quantization_config, every tensor (name, dtype, shape, how its values
 * are made), the shards (state-dict order, split at --shard-size like huggingface_hub) and, inside
 * each shard, the order the safetensors writer uses (dtype descending, then name) with absolute
 * file offsets.  q3_synth_fill then produces any byte range of any tensor, deterministically from
 * the seed and independently of how the range is cut (values are a hash of the element index), so
 * that any number of threads can write any chunks of the files in any order.
 *
 * Values are random but sane for a 48-layer forward pass (qwen3next.md sections 4 and 5): every
 * Linear y = x·Wᵀ is scaled by 1/sqrt(in features) with a gain chosen so that each sub-layer adds
 * about 0.15 RMS to a residual stream of RMS 1; GPTQ codes are random and symmetric around the
 * symmetric zero point (zero-mean weights, see Q3_GEN_CODES) with scales that give the same weight
 * RMS; every weight's sign is random; norms sit near their identity; A_log / dt_bias give per-head
 * decays in (0, 1).
 *
 * Routing skew (zipf > 0): every embedding row carries a constant C on one hidden channel, no
 * sub-layer writes that channel (its output rows are zero), so after the post-attention norm it
 * holds about kappa_l = C / rms(h_l); each router row e gets bias_e / kappa_l there.  The biases
 * are calibrated on a router-only model (logits = bias + N(0, 1), top-k) so that the frequency at
 * which the expert of popularity rank r is selected follows r^-zipf (capped at 1: the top experts
 * of a steep law are picked by every token).  Ranks are a random permutation per layer.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"
#include "util.h"

struct q3_synth_arch {
	const char *name;
	int vocab, hidden, layers, full_interval;
	int heads, kv_heads, head_dim;
	int lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim, conv_kernel;
	int experts, top_k, moe_inter, shared_inter, intermediate;
};

struct q3_synth_opts {
	const char *preset;	/* "tiny", "80b-a3b" */
	int layers;		/* 0 = the preset's */
	int experts;		/* 0 = the preset's */
	int vocab;		/* 0 = the preset's (151936: the real tokenizer's ids all fit) */
	int expert_bits;	/* 4 or 8 */
	int dense_bits;		/* 4, 8, or 16 (BF16) for the other quantizable Linears */
	int group_size;		/* GPTQ group size (input channels) */
	bool g_idx;		/* write g_idx tensors (GPTQModel does) */
	bool act_order;		/* g_idx of a shuffled input order (desc_act): the engine permutes */
	double zipf;		/* expert popularity exponent; 0 = no skew */
	uint64_t seed;
	uint64_t shard_size;	/* bytes of tensors per shard (huggingface_hub: max_shard_size) */
};

/* How a tensor's values are made (element i of the flattened tensor). */
enum q3_gen_kind {
	Q3_GEN_CODES,	/* GPTQ codes of `group` bits (4 or 8), symmetric around the zero point 2^(bits-1):
			 * uniform random, with the one code that has no mirror (0) moved to the zero
			 * point.  Zero-mean weights matter: a mean of -0.5 code per weight makes every
			 * Linear add a common (all-ones) component, which the next one amplifies by
			 * ~sqrt(K), until 48 layers give the same output for every token. */
	Q3_GEN_CONST32, /* every 32-bit word = cval: symmetric GPTQ zero points */
	Q3_GEN_GIDX,	/* i / group: sequential g_idx; shuffled: σ(i) / group, σ a permutation */
	Q3_GEN_UNIFORM, /* mean + std * sqrt(3) * U(-1, 1), in the tensor's float dtype */
	Q3_GEN_LOGU,	/* log(U(lo, hi)) with lo = mean, hi = std: A_log */
	Q3_GEN_OCTAVE,	/* (random sign) m * 2^E or m * 2^(E+1), m uniform in [1, 2), RMS = std:
			 * made from random bits without float math (BF16/F16 bulk: weights, scales) */
};

struct q3_gen {
	enum q3_gen_kind kind;
	float mean, std;
	bool positive;	      /* OCTAVE: no sign bit */
	bool shuffled;	      /* GIDX: act-order (gidx_order) */
	uint32_t cval;
	int group;
	int64_t cols;	      /* row length of the 2-D view (last dim, or the product of the rest) */
	int64_t zero_col;     /* element column forced to 0 (scales of an output channel), -1 none */
	int64_t zero_row;     /* row forced to 0 (dense output projections), -1 none */
	int64_t fix_col;      /* column set to colval (or colvals[row]), -1 none */
	float colval;
	const float *colvals; /* [rows], or NULL */
	uint64_t seed;
	uint64_t order;	      /* GIDX shuffled: the key of the input order, shared by the Linears that
			       * read one input (GPTQ's desc_act orders by that input's Hessian); 0:
			       * the tensor's own seed */
};

struct q3_synth_tensor {
	char *name;
	enum q3_dtype dtype;
	int ndim;
	int64_t shape[Q3_MAX_DIMS];
	uint64_t nbytes;
	int shard;
	uint64_t off; /* absolute offset in the shard file */
	bool expert;  /* a routed expert's tensor */
	struct q3_gen gen;
};

struct q3_synth_shard {
	char name[64];	   /* model-0000i-of-0000n.safetensors */
	char *header;	   /* 8-byte length + JSON, padded */
	size_t header_len;
	uint64_t size;	   /* file size */
	size_t first, n;   /* tensors [first, first + n) of the layout order */
};

struct q3_synth {
	struct q3_synth_arch arch;
	struct q3_synth_opts opt;
	size_t ntensors;
	struct q3_synth_tensor *t; /* layout order: shard by shard, by offset */
	int nshards;
	struct q3_synth_shard *shards;
	uint64_t tensor_bytes;	   /* sum of tensor bytes (index metadata.total_size) */
	uint64_t file_bytes;	   /* sum of file sizes */
	uint64_t expert_bytes;	   /* routed experts only */
	float *router_bias;	   /* [layers][experts] bias_e / kappa_l (zipf), or NULL */
	double zipf_top1, zipf_top10; /* calibrated: selection rate of the top expert, share of the top 10 */
	double embed_const;	   /* C on the skew channel (zipf) */
	int skew_channel;
};

/* The presets' names, NULL-terminated. */
extern const char *const q3_synth_presets[];

/* Builds the whole description (no I/O).  Returns 0 or -EINVAL with a reason naming the option. */
int q3_synth_plan(const struct q3_synth_opts *o, struct q3_synth *s, q3_err *e);
void q3_synth_free(struct q3_synth *s);

/* Writes bytes [begin, begin + len) of tensor t into dst. */
void q3_synth_fill(const struct q3_synth_tensor *t, uint64_t begin, uint64_t len, void *dst);

/* The JSON files of the folder, malloc'ed text: config.json (with quantization_config),
 * quantize_config.json, generation_config.json, model.safetensors.index.json. */
int q3_synth_json(const struct q3_synth *s, const char *which, char **out, q3_err *e);
