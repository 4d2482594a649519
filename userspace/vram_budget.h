/* vram_budget.h - how many bytes of VRAM the weights may use (the input of placement.h).
 *
 * Set by, in order of precedence: the --vram-budget flag, the qwen3mm sysfs knob, the config
 * file; each as a size ("20GiB", "512M", bytes), with "auto" (or 0 / empty) meaning "not set
 * here".  Unset everywhere, the budget is automatic: what the card has free before loading,
 * minus the KV cache and the Gated DeltaNet states of every session, minus the workspace
 * (activations, scratch, graphs), minus a reserve for what CUDA allocates on its own.  The CUDA
 * backend measures the free VRAM (cudaMemGetInfo) and its workspace; everything here is
 * arithmetic, so it is tested without a GPU.
 */
#pragma once
#include <stdint.h>

#include "config.h"
#include "util.h"

struct q3_vram_need {
	uint64_t free_vram;	  /* free on the card before the weights are loaded */
	uint64_t kv_bytes;	  /* q3_vram_kv_bytes */
	uint64_t state_bytes;	  /* q3_vram_state_bytes */
	uint64_t workspace_bytes; /* activations, scratch, cuBLAS workspace, graphs */
	uint64_t reserve_bytes;	  /* margin; 0: 256 MiB + 2% of free_vram */
};

/* The reserve that applies (reserve_bytes, or the default). */
uint64_t q3_vram_reserve(const struct q3_vram_need *n);
/* free - KV - states - workspace - reserve; 0 when that is negative. */
uint64_t q3_vram_budget_auto(const struct q3_vram_need *n);

/* KV cache of the full-attention layers: layers x (K and V) x kv heads x head dim x positions
 * x sessions x bytes per element. */
uint64_t q3_vram_kv_bytes(const struct q3_config *c, int max_ctx, int sessions, int elem_bytes);
/* Gated DeltaNet states of the linear-attention layers per session: the fp32 recurrent state
 * (v heads x key dim x value dim) and the conv state (conv channels x (kernel - 1) x
 * conv_elem_bytes), times sessions. */
uint64_t q3_vram_state_bytes(const struct q3_config *c, int sessions, int conv_elem_bytes);

enum q3_budget_src { Q3_BUDGET_FLAG, Q3_BUDGET_KNOB, Q3_BUDGET_CONFIG, Q3_BUDGET_AUTO };
const char *q3_budget_src_name(enum q3_budget_src s);

/* Parses one setting: 0 and *out set, 1 when it is unset ("", NULL, "auto", "0"), -EINVAL. */
int q3_vram_budget_parse(const char *s, uint64_t *out);

/* The budget from the three settings (any may be NULL) and the need.  -EINVAL names the
 * setting that does not parse; -ENOSPC when the chosen explicit budget is more than the card
 * can give the weights (free minus KV, states, workspace and reserve), with the numbers. */
int q3_vram_budget_resolve(const char *flag, const char *knob, const char *config,
			   const struct q3_vram_need *n, uint64_t *budget, enum q3_budget_src *src,
			   q3_err *e);
