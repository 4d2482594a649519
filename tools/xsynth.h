/* xsynth.h - random GPTQ int4 routed experts in memory, bound like the loader binds real ones
 * (struct q3_expert over struct q3_tensor with data), for the CPU expert tests and benchmarks.
 *
 * Codes are uniform in [0, 15]; scales positive, around 0.01 (fp16 or bf16); zero points 8 (sym)
 * or uniform (asym), stored minus zero_offset as GPTQ v1 (offset 1) or v2 (offset 0) do; g_idx
 * sequential, absent, or act-order (a random permutation of the inputs, G per group).
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "util.h"

struct q3_xsynth_opts {
	int H, I;	 /* hidden (gate/up inputs), intermediate */
	int G;		 /* group size */
	bool sym;	 /* every zero point 8 */
	int zero_offset; /* 1: GPTQ v1, 0: v2 */
	bool actorder;	 /* g_idx a permutation */
	bool no_gidx;	 /* no g_idx tensor (AutoRound) */
	bool bf16;	 /* bf16 scales */
	uint64_t seed;
};

struct q3_xsynth_lin {
	struct q3_tensor qweight, qzeros, scales, g_idx;
	char name[64];
};

struct q3_xsynth {
	struct q3_expert ex;
	struct q3_xsynth_lin lin[3]; /* gate, up, down */
};

int q3_xsynth_new(const struct q3_xsynth_opts *o, struct q3_xsynth **out, q3_err *e);
void q3_xsynth_free(struct q3_xsynth *s);

/* A small, fast, seedable generator (splitmix64) shared by tests and benchmarks. */
static inline uint64_t q3_xrand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static inline double q3_xrandu(uint64_t *s)
{
	return (double)(q3_xrand(s) >> 11) * (1.0 / 9007199254740992.0);
}
