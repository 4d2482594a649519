/* cuda_offload.h - routed experts beyond VRAM, for the CUDA backend (issue 8).
 *
 * At open, the backend uploads the dense weights, then asks q3_off_open how many routed experts
 * of each layer fit the VRAM budget (placement.h: most used first from the expert statistics, or
 * spread evenly); it keeps only those in its expert stacks ("slots"), in the slot order
 * q3_off_slot_expert gives.  Every other expert is computed by the CPU expert threads (cpu_moe.h,
 * bound to the cores of the GPU's NUMA node) from a packed copy (cpu_expert.h: measured faster
 * than reading the GPTQ layout in place; QWEN3D_OFFLOAD_CPU_LAYOUT=gptq reads it in place and
 * saves the copy) made at open, in parallel, in memory preferring that node (spilling to the
 * nearest others when it is full).
 *
 * Decode (a layer's rows <= max_rows), around the MoE of layer l, all on the compute stream and
 * capturable in a CUDA graph:
 *   q3_off_publish  one kernel writes the routing (ids, weights) and the normed fp16 activations
 *                   into mapped pinned host memory, turns the ids into stack slots (Q3G_SKIP for
 *                   the CPU's experts, so the GPU's moe_up / moe_down compute the resident experts
 *                   and the shared one), then stores the layer's sequence number into a
 *                   host-mapped gate word: the CPU threads start.  Single-row calls then fork a
 *                   side stream on which the GPU computes up to two of the row's missing experts
 *                   itself (the last in routing order, when the CPU keeps two), reading their raw
 *                   GPTQ bytes from the pinned checkpoint over PCIe (gpu_moe_host.cu); the CPU
 *                   skips them.  How many (0, 1, 2) the calls themselves measure (tune.h);
 *   q3_off_join     joins the side stream; one kernel waits for the host-mapped done word
 *                   (timeout: trap), then adds the CPU's partial output (pinned, read over PCIe)
 *                   and the side stream's to the residual.
 * One synchronization per layer; the GPU computes its experts while the CPU computes the rest.
 * The host side of a call: q3_off_begin, then, after each layer's GPU work is enqueued (or after
 * the whole graph is launched), q3_off_cpu_layer(l) arms the CPU job of layer l (waiting for
 * layer l - 1's first), and q3_off_cpu_end waits for the last.
 *
 * Prefill (more rows): q3_off_prefill computes the resident experts with the grouped GEMM while
 * the missing experts the rows use are copied, 32 at a time, into a ring of raw staging buffers
 * (raw GPTQ bytes) on a second stream, repacked on the device into one of two staging stacks (one
 * launch a matrix kind for the batch) and run through the GEMM again.  Small calls wait for the
 * routing to copy only the experts their rows use; calls with rows x top-k >= 8x the experts
 * (every expert used, but e^-8 of them) copy all missing experts without waiting, and the ring
 * lets the copies of the next layer start while this one computes; the host waits once per layer,
 * at the end, for the routing statistics.  Where the GPU time goes: q3_off_stats' prefill_phase_s.
 *
 * Environment: QWEN3D_OFFLOAD_FRACTION (0 .. 1) keeps that share of the experts in VRAM whatever
 * the budget (tests: force the offload paths on a model that fits); QWEN3D_OFFLOAD_TIMEOUT
 * (seconds) bounds the waits; QWEN3D_EXPERT_STATS names the statistics file; QWEN3D_OFFLOAD_PIN=0
 * leaves the checkpoint's mappings unregistered (they are pinned for DMA by default);
 * QWEN3D_REBALANCE_MIN_TOKENS (default 1000) is the evidence re-balancing waits for;
 * QWEN3D_OFFLOAD_STAGE_RAW (2 .. 16, default 4) sizes the prefill's raw staging ring (each buffer
 * 32 experts of VRAM taken from the expert cache; 2 -> 4 measured 3,539 -> 4,039 tok/s, 8 no
 * better); QWEN3D_OFFLOAD_PCIE_EXPERTS (0 .. 8; unset: 0 to 2, tuned) fixes how many of a decode
 * token's missing experts the GPU reads over PCIe (0: the CPU computes them all).
 *
 * Between requests the backend may re-balance (q3_off_rebalance_plan, then per swap: upload into
 * q3_off_swap_slot, q3_off_swap_commit): experts the decayed statistics show used clearly more
 * than a resident one of their layer take its slot (expert_stats.h: hysteresis, noise test, a
 * byte limit per round so a round costs milliseconds).
 *
 * Statistics (q3_off_stats): routed pairs served from VRAM and by the CPU, bytes over PCIe, the
 * CPU threads' weight bandwidth; the decayed per-expert counts are saved at close (and loaded at
 * open) when a stats path is given.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "gpu.h"

#ifdef __cplusplus
extern "C" {
#endif

struct q3_model;
struct q3_offload;
struct q3_swap;

struct q3_off_opts {
	uint64_t vram_budget;	 /* bytes for weights (dense + experts); 0: automatic */
	uint64_t dense_bytes;	 /* device bytes the non-expert weights took */
	uint64_t free_bytes;	 /* free device memory now, after the dense weights */
	uint64_t reserve_bytes;	 /* what must stay free (scratch, sessions, staging, CUDA) */
	uint64_t expert_bytes;	 /* device bytes of one routed expert in the tile format */
	int max_rows;		 /* rows of a decode call (the handoff buffers) */
	int threads;		 /* CPU expert threads; 0: the GPU node's cores but one */
	const char *gpu_busid;	 /* PCI bus id of the GPU (NUMA locality) */
	const char *stats_path;	 /* expert statistics file; NULL: QWEN3D_EXPERT_STATS, or none */
	int cache;		 /* enum q3_cache_policy (knobs.h): lru, lfu, static */
	bool quiet;
};

struct q3_off_stats {
	bool active;		 /* some routed experts live in host RAM */
	int experts_vram, experts_total;
	uint64_t budget_bytes;	 /* the weights' VRAM budget in force */
	uint64_t pairs_gpu, pairs_cpu; /* routed (token, expert) pairs served by each */
	uint64_t pairs_pcie;	 /* decode pairs the GPU computed reading host memory over PCIe */
	int pcie_experts;	 /* that share: at most this many missing experts a token (0: off) */
	int pcie_experts_now;	 /* ... and in the last single-row call (the tuner's pick) */
	uint64_t pcie_bytes;	 /* handoff copies and prefill expert uploads */
	uint64_t uploads;	 /* experts copied to the device in prefill */
	uint64_t cpu_bytes;	 /* expert weight bytes the CPU threads read */
	double cpu_busy_s;	 /* their busy time (cpu_bytes / cpu_busy_s: CPU expert GB/s) */
	double cpu_phase_s[3];	 /* cpu_busy_s by phase: activations, gate / up, down */
	/* prefill layers with streamed experts, and their GPU time: the resident pass (routing
	 * round trip included), waiting for copies, repacking, the streamed passes; then the copy
	 * engine's busy time (beside the others) */
	uint64_t prefill_layers;
	double prefill_phase_s[5];
	double copy_alone_gbps;	 /* the same copies with nothing beside them, measured at open (0: not) */
	uint64_t tokens;	 /* rows served through the offload path */
	int cpu_threads;
	int cpu_node;		 /* NUMA node of the CPU threads and of the RAM experts (-1 unknown) */
	char isa[16];
};

/* Plans (VRAM budget, placement), prepares the CPU experts and threads.  After it, the caller
 * uploads the experts q3_off_slot_expert lists.  When every expert fits, nothing is offloaded
 * (q3_off_active false) and the calls below are no-ops. */
int q3_off_open(struct q3_offload **out, const struct q3_model *m, const struct q3_off_opts *o,
		struct q3_err *e);
/* Saves the statistics (if a path was given) and frees everything. */
void q3_off_close(struct q3_offload *off);

bool q3_off_active(const struct q3_offload *off);
/* Experts of layer l in VRAM (the size of its expert stacks; at least 1, a spare slot). */
int q3_off_slots(const struct q3_offload *off, int layer);
/* The expert in slot s of layer l (-1: a spare slot, upload nothing). */
int q3_off_slot_expert(const struct q3_offload *off, int layer, int slot);
/* Whether layer l has experts on the CPU (else the layer needs no handoff). */
bool q3_off_layer_cpu(const struct q3_offload *off, int layer);

/* ---- decode, on the compute stream (capturable) ------------------------------------------------- */
/* sidx [R][k + 1]: idx's stack slots (device), for q3g_moe_up / q3g_moe_down */
int q3_off_publish(struct q3_offload *off, int layer, const int *idx, const float *w,
		   const uint16_t *xb, int *sidx, int R, q3g_stream st, struct q3_err *e);
int q3_off_join(struct q3_offload *off, int layer, float *h, int R, q3g_stream st, struct q3_err *e);

/* ---- decode, host side ------------------------------------------------------------------------ */
/* Before a call's GPU work is launched: its sequence numbers; R rows, the first `real` of them
 * real (the rest pad a graph's batch). */
void q3_off_begin(struct q3_offload *off, int R, int real);
/* Arms layer l's CPU job (after waiting for the previous layer's). */
int q3_off_cpu_layer(struct q3_offload *off, int layer, struct q3_err *e);
/* Waits for the last armed job. */
int q3_off_cpu_end(struct q3_offload *off, struct q3_err *e);
/* After a failed call: releases every GPU wait of it and waits for the CPU threads. */
void q3_off_abort(struct q3_offload *off);

/* ---- prefill ---------------------------------------------------------------------------------- */
/* The MoE of layer l for R rows (R > max_rows allowed): the resident experts and the shared one
 * from the stacks (gate/up/down, sgate/sup/sdown), the missing ones streamed; adds into h.
 * sidx: device scratch [R][k + 1]; ws: q3g_moe_prefill's scratch. */
int q3_off_prefill(struct q3_offload *off, int layer, float *h, const uint16_t *xb, const int *idx,
		   const float *w, int *sidx, const struct q3g_mat *gate, const struct q3g_mat *up,
		   const struct q3g_mat *down, const struct q3g_mat *sgate, const struct q3g_mat *sup,
		   const struct q3g_mat *sdown, int R, const struct q3g_dims *d, void *ws, q3g_stream st,
		   struct q3_err *e);

/* ---- re-balancing, between requests (nothing in flight) -------------------------------------- */
/* Swaps the decayed expert statistics call for (within each layer: the stacks keep their size),
 * at most max of them and max_bytes of uploads; 0 when the statistics do not justify any. */
int q3_off_rebalance_plan(struct q3_offload *off, struct q3_swap *swaps, int max, uint64_t max_bytes);
/* The slot expert x_out of layer l occupies (the caller uploads x_in's weights there, then
 * commits); -1 if x_out is not resident or x_in cannot be evicted later (no CPU view). */
int q3_off_swap_slot(const struct q3_offload *off, int layer, int x_in, int x_out);
/* Points the slot map and the CPU table at the swap (x_in now in VRAM, x_out on the CPU). */
int q3_off_swap_commit(struct q3_offload *off, int layer, int x_in, int x_out, struct q3_err *e);

void q3_off_stats(const struct q3_offload *off, struct q3_off_stats *s);

#ifdef __cplusplus
}
#endif
