/* cpu_moe.h - the routed experts of one MoE layer computed on the CPU, split across the expert
 * threads (xpool.h), for one token (decode) or a batch.
 *
 * A call gets the layer's normed hidden states, the router's top-k ids and weights, and the
 * layer's expert table (NULL where the expert is not the CPU's to compute, e.g. resident in
 * VRAM), and writes out[t] = Σ_i w[t][i] · expert_{ids[t][i]}(x[t]) over the experts it
 * computes (zeros for a token with none).  Phases, with a barrier between each:
 *   0. plan (one task): the (token, expert) pairs, grouped by expert in ascending id order;
 *      without act-order permutations, beside it, each token's input quantized once (in block
 *      ranges, one task each), which leaves phase 1 empty and the pool skips its barrier;
 *   1. activations: per expert where g_idx permutes the input;
 *   2. gate and up: runs of (token chunk, tile of intermediate columns), one run a worker
 *      where every chunk costs the same (decode); each writes its silu(gate) ⊙ up columns and
 *      quantizes them for down;
 *   3. down: runs of output columns, one a worker; each loops over the experts in order and
 *      adds w · y, so every output is summed in one fixed order (no atomics, same bits
 *      whatever the thread count).
 * All scratch is allocated at creation for the limits given; a call allocates nothing.
 *
 * For the GPU handoff, q3_cpu_moe_post arms a call before its inputs exist: the request's
 * arrays are read only once the gate word (written by the GPU after it wrote the routing and
 * the activations to pinned memory) opens, and the done word is stored when out is complete.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "cpu_expert.h"
#include "expert_stats.h"
#include "util.h"
#include "xpool.h"

struct q3_cpu_moe;

struct q3_cpu_moe_opts {
	int H, I;	     /* hidden, expert intermediate */
	int num_experts;     /* per layer (size of the expert table) */
	int top_k;	     /* routing entries per token */
	int max_tokens;	     /* tokens per call */
	enum q3_xisa isa;    /* from q3_xisa_best() */
	enum q3_xact_kind act;
	bool perms;	     /* some expert has act-order input permutations */
	double gate_timeout_s; /* q3_cpu_moe_post: give up on a gate after this long (0: 10 s) */
};

struct q3_cpu_moe_req {
	int T;
	const float *x;	     /* [T][ldx]: the normed hidden states (model order) */
	const uint16_t *xh;  /* or the same in fp16, as the CUDA backend's activations (used when x is NULL) */
	size_t ldx;
	const int32_t *ids;  /* [T][ldk]: the first k of each row are routed experts */
	const float *w;	     /* [T][ldk] */
	int k;		     /* <= top_k */
	int ldk;	     /* row stride of ids and w; 0: k */
	const struct q3_xexpert *const *experts; /* [num_experts]; NULL: skip */
	int elsewhere, keep; /* per token with m routed experts in the table, the last
			      * min(elsewhere, m - keep) of them in routing order are computed
			      * elsewhere (the GPU reads them over PCIe): skip them too */
	float *out;	     /* [T][ldo] */
	size_t ldo;
	struct q3_xstats *stats; /* optional: every routed pair is counted here, layer `layer`, */
	int layer;
	int stats_rows;		 /* of the first stats_rows tokens (0: all; the rest are padding) */
};

/* Running totals (q3_cpu_moe_stats); bytes are the weights read, each expert once per call. */
struct q3_cpu_moe_stats {
	uint64_t calls;
	uint64_t pairs;	  /* (token, expert) pairs computed here */
	uint64_t skipped; /* pairs routed to experts not in the table (resident in VRAM) */
	uint64_t elsewhere; /* pairs of the table's experts left to others (req.elsewhere) */
	uint64_t experts, bytes;
	double busy_s; /* from post (or the gate opening) to done */
	/* busy_s by phase: planning and the activations, experts gate / up, experts down */
	double act_s, gateup_s, down_s;
};

int q3_cpu_moe_new(struct q3_xpool *pool, const struct q3_cpu_moe_opts *o, struct q3_cpu_moe **out,
		   q3_err *e);
void q3_cpu_moe_free(struct q3_cpu_moe *m);

/* One call on the pool; returns when out is written.  -EINVAL (with a reason) for an expert id
 * out of range or T / k past the limits. */
int q3_cpu_moe_run(struct q3_cpu_moe *m, const struct q3_cpu_moe_req *r, q3_err *e);

/* Arms a call: *r is copied now, its arrays read after *gate reaches gate_value; *done is set to
 * done_value when out is complete (or the call failed: see q3_cpu_moe_wait). */
int q3_cpu_moe_post(struct q3_cpu_moe *m, const struct q3_cpu_moe_req *r,
		    const volatile uint32_t *gate, uint32_t gate_value, volatile uint32_t *done,
		    uint32_t done_value, q3_err *e);
/* Waits for the posted call: 0, -EINVAL (bad routing), -ETIMEDOUT (gate never opened). */
int q3_cpu_moe_wait(struct q3_cpu_moe *m, q3_err *e);

void q3_cpu_moe_stats(const struct q3_cpu_moe *m, struct q3_cpu_moe_stats *s);
