/* config.h - a Qwen3-Next config.json and its quantization_config, parsed and validated.
 *
 * Both the hub's keys (rope_theta and partial_rotary_factor at top level, full_attention_interval)
 * and the newer forms (rope_parameters, layer_types) are read.  Architecture keys are required;
 * keys with a fixed meaning in this architecture default to Hugging Face's defaults.  Anything
 * this engine does not implement (rope scaling, dense MLP layers, biases) is refused by name.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

enum q3_layer_kind {
	Q3_LAYER_LINEAR, /* Gated DeltaNet */
	Q3_LAYER_FULL,	 /* gated full attention */
};

enum q3_qmethod {
	Q3_QM_NONE,
	Q3_QM_GPTQ,	 /* quant_method "gptq" (AutoGPTQ / GPTQModel) */
	Q3_QM_AUTOROUND, /* quant_method "auto-round", packing_format "auto_round:auto_gptq" */
};

/* How one Linear is quantized according to the config (the files on disk must agree). */
struct q3_qscheme {
	int bits;	/* 4 or 8; 16 means the config says "not quantized" */
	int group_size; /* > 0, or -1 for one group spanning all input channels */
	bool sym;
	bool desc_act;
};

/* A per-module override: GPTQModel "dynamic" ("+:regex" / "-:regex" / "regex") or an AutoRound
 * "extra_config" entry (a module name, or a regex). Fields equal to Q3_INHERIT keep the base
 * scheme's value. */
#define Q3_INHERIT (-999)
struct q3_qrule {
	char *pattern;
	bool skip;    /* "-:" rule: the module is not quantized */
	void *re;     /* pcre2_code *, NULL for an exact module name */
	int bits, group_size, sym, desc_act;
};

struct q3_quant {
	enum q3_qmethod method;
	/* GPTQ v1 and auto_round:auto_gptq store zero points minus one; gptq_v2 stores them as is. */
	int zero_offset; /* 1 for v1 layouts, 0 for gptq_v2 */
	struct q3_qscheme base;
	bool lm_head;
	const char *format; /* "gptq", "gptq_v2" or "auto_round:auto_gptq" (static string) */
	size_t nrules;
	struct q3_qrule *rules;
};

#define Q3_MAX_EOS 8

struct q3_config {
	int vocab_size;		/* embedding rows (151936) */
	int hidden_size;	/* 2048 */
	int num_layers;		/* 48 */
	int num_heads;		/* full attention query heads (16) */
	int num_kv_heads;	/* full attention key/value heads (2) */
	int head_dim;		/* full attention head size (256) */
	int lin_num_k_heads;	/* Gated DeltaNet query/key heads (16) */
	int lin_num_v_heads;	/* Gated DeltaNet value heads (32) */
	int lin_k_dim;		/* per query/key head (128) */
	int lin_v_dim;		/* per value head (128) */
	int conv_kernel;	/* causal depthwise conv width (4) */
	int num_experts;	/* routed experts per layer (512) */
	int top_k;		/* experts per token (10) */
	int moe_inter;		/* routed expert intermediate size (512) */
	int shared_inter;	/* shared expert intermediate size (512) */
	bool norm_topk_prob;	/* renormalise the top-k weights to sum 1 */
	bool tie_word_embeddings;
	float rms_eps;		/* every norm's epsilon (1e-6) */
	double rope_theta;	/* 1e7 */
	float partial_rotary;	/* fraction of head_dim rotated (0.25) */
	int rotary_dim;		/* head_dim * partial_rotary (64) */
	int full_attention_interval;
	int max_position_embeddings;
	int bos_id;		/* -1 if none */
	int n_eos;
	int eos_ids[Q3_MAX_EOS];
	enum q3_layer_kind *layer_kind; /* [num_layers] */
	int num_full_layers, num_linear_layers;

	/* derived sizes */
	int q_dim;	   /* num_heads * head_dim */
	int kv_dim;	   /* num_kv_heads * head_dim */
	int lin_key_dim;   /* lin_num_k_heads * lin_k_dim */
	int lin_value_dim; /* lin_num_v_heads * lin_v_dim */
	int conv_dim;	   /* 2 * lin_key_dim + lin_value_dim: the convolved q, k, v channels */
	int qkvz_dim;	   /* in_proj_qkvz rows: 2 * lin_key_dim + 2 * lin_value_dim */
	int ba_dim;	   /* in_proj_ba rows: 2 * lin_num_v_heads */

	struct q3_quant quant; /* method Q3_QM_NONE when the checkpoint is not quantized */
};

/* Parses config.json text.  fname names the file in errors ("config.json: num_experts: ...").
 * The quantization_config inside it, if any, is parsed too. */
int q3_config_parse(const char *json, size_t len, const char *fname, struct q3_config *c, q3_err *e);

/* Parses a standalone quantize_config.json (used when config.json has no quantization_config). */
int q3_quant_parse_text(const char *json, size_t len, const char *fname, struct q3_quant *q,
			q3_err *e);

void q3_config_free(struct q3_config *c);
void q3_quant_free(struct q3_quant *q);

/* The scheme the config gives a module, e.g. "model.layers.3.mlp.experts.7.up_proj".  Rules are
 * tried in order; the first that matches decides (GPTQModel semantics).  bits == 16 means the
 * config says the module is not quantized. */
void q3_quant_scheme(const struct q3_quant *q, const char *module, struct q3_qscheme *s);

const char *q3_layer_kind_name(enum q3_layer_kind k);
