/* placement.h - which weights live in VRAM and where the rest lives in RAM.
 *
 * Dense weights (attention, linear attention, norms, shared experts, routers, lm_head, and the
 * embedding unless the caller keeps it in RAM) are always in VRAM: they are read for every
 * token.  Routed experts fill the rest of the VRAM budget by expected use (per-expert routing
 * frequency, decayed counts from expert_stats.h, or uniform on a first start), the most used
 * first; equal frequencies are spread round-robin over the layers so that every layer gets the
 * same share of hits (the CPU's work per layer, and so the GPU's wait, stays even).
 *
 * RAM: every routed expert has one home in pinned RAM (ram_all: VRAM is then a cache over RAM,
 * so that re-balancing only copies host to device), or only the experts not in VRAM.  Homes go
 * to the NUMA node nearest the GPU, spilling to the next-nearest node only when a node is full;
 * experts the CPU will compute (not in VRAM) go first, most used first, so the hottest CPU
 * experts are local to the CPU expert threads, which run on the GPU node's cores.  One copy of
 * each expert, never one per node.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "topology.h"
#include "util.h"

#define Q3_PLACE_MAX_NODES 64

struct q3_place_in {
	int nlayers, nexperts;
	const uint64_t *expert_bytes; /* [L][E] bytes of each routed expert */
	const double *freq;	      /* [L][E] expected use, any scale, >= 0; NULL: uniform */
	uint64_t dense_bytes;	      /* weights that must be in VRAM */
	uint64_t vram_budget;	      /* bytes of VRAM for weights (dense + resident experts) */
	bool ram_all;		      /* every expert keeps a RAM home (see above) */
	/* RAM: nodes nearest the GPU first, each with the bytes it may give to expert homes */
	int nnodes;
	const int *node_order;	      /* [nnodes] os indices */
	const uint64_t *node_capacity; /* [nnodes] bytes, same order */
};

struct q3_place_plan {
	int nlayers, nexperts;
	uint8_t *vram;	   /* [L][E] 1: resident in VRAM */
	int16_t *ram_node; /* [L][E] os index of the RAM home, -1: none */
	int n_vram;	   /* resident experts */
	uint64_t vram_bytes;	 /* dense + resident experts */
	uint64_t ram_bytes;	 /* expert homes, all nodes */
	int nnodes;
	int node_os[Q3_PLACE_MAX_NODES];
	uint64_t node_bytes[Q3_PLACE_MAX_NODES]; /* expert homes per node (node_os order) */
	double hit;		 /* expected share of routed expert uses served from VRAM */
	double hit_layer_min;	 /* the same, for the worst layer */
};

/* Plans.  -ENOSPC (with the numbers) when the dense weights alone exceed the budget or the RAM
 * homes exceed every node's capacity together; -EINVAL for bad input. */
int q3_place_plan(const struct q3_place_in *in, struct q3_place_plan *out, q3_err *e);
void q3_place_plan_free(struct q3_place_plan *p);

/* Bytes of one routed expert (gate + up + down as stored). */
uint64_t q3_place_expert_bytes(const struct q3_expert *x);
/* Bytes that must be in VRAM: everything bound except routed experts and mtp.* (the embedding
 * only when embed_in_vram or tied to lm_head). */
uint64_t q3_place_dense_bytes(const struct q3_model *m, bool embed_in_vram);

/* The plan as a home per tensor of the checkpoint, for the loader (0: RAM, 1: VRAM, its enum
 * q3_home): routed expert tensors as planned (VRAM-resident experts also keep their RAM home
 * when the plan has ram_all: the loader loads them to RAM and the backend copies), the rest
 * VRAM, except the embedding unless embed_in_vram, and mtp.* (RAM, unused).  home has
 * m->ck->ntensors entries. */
void q3_place_homes(const struct q3_model *m, const struct q3_place_plan *p, bool embed_in_vram,
		    uint8_t *home);

/* RAM capacity per node from the topology: each node's memory minus reserve_frac of it (the OS,
 * page cache, the rest of the process), in node_order.  For tests and as a default where the
 * memory provider has not said what it can pin. */
void q3_place_capacity_from_topo(const struct q3_topo *t, const int *node_order, int nnodes,
				 double reserve_frac, uint64_t *capacity);

/* The CPU expert threads: the cores of node (nearest the GPU), leaving `reserve` of them (the
 * first ones) to the threads that drive the GPU and serve requests; at least one.  Returns the
 * count written to cpus. */
int q3_place_cpus(const struct q3_topo *t, int node, int reserve, int *cpus, int max);
