/* expert_stats.h - how often each routed expert is used, kept while serving, saved across
 * restarts, and the re-balance decision of the VRAM expert cache.
 *
 * Counts per (layer, expert) decay exponentially with the tokens served (half-life in tokens),
 * so the plan follows a workload that changes; the decay is applied lazily (a common scale
 * grows with time, renormalized now and then), so counting a routing is a few additions.
 *
 * The file (small, binary, little-endian) holds the counts as of the time it was written, the
 * half-life, a fingerprint of the model (layers, experts, sizes and tensor bytes: counts of
 * another checkpoint are meaningless) and a CRC-32; q3_xstats_load refuses anything that does
 * not match with one line saying why, and the caller starts afresh with a warning.  Saving
 * writes a temporary file and renames it, so a crash leaves the old file whole.
 *
 * Re-balance (between requests): experts not in VRAM whose decayed use exceeds a resident's by
 * the hysteresis factor, and by more than counting noise explains, swap places with it, most used
 * first, up to a byte limit per round (one round copies at most that much over PCIe), so that
 * the cache follows the workload without thrashing on noise.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "checkpoint.h"
#include "util.h"

struct q3_xstats;

int q3_xstats_new(int nlayers, int nexperts, double half_life_tokens, uint64_t fingerprint,
		  struct q3_xstats **out, q3_err *e);
void q3_xstats_free(struct q3_xstats *s);

/* One token's routing in one layer: n expert ids (out-of-range ids are ignored). */
void q3_xstats_add(struct q3_xstats *s, int layer, const int32_t *ids, int n);
/* Counts of many tokens at once (a histogram the GPU kept for a request): counts [L][E]. */
void q3_xstats_add_hist(struct q3_xstats *s, const uint32_t *counts);
/* ntokens more tokens have passed: older counts decay. */
void q3_xstats_tick(struct q3_xstats *s, uint64_t ntokens);

/* Decayed use of every expert now, freq [L][E] (uses per token, comparable across layers). */
void q3_xstats_freq(const struct q3_xstats *s, double *freq);
/* Decayed token count (the weight of the evidence). */
double q3_xstats_tokens(const struct q3_xstats *s);

/* A fingerprint of a checkpoint for the stats file: config shape and tensor table. */
uint64_t q3_xstats_fingerprint(const struct q3_ckpt *ck);

int q3_xstats_save(const struct q3_xstats *s, const char *path, q3_err *e);
/* Replaces s's counts with the file's.  -ENOENT when there is no file; -EINVAL (one line) when
 * it is corrupt, truncated, of another model or shape; s is unchanged on failure. */
int q3_xstats_load(struct q3_xstats *s, const char *path, q3_err *e);
/* The same from bytes in memory; name is for messages. */
int q3_xstats_load_buf(struct q3_xstats *s, const void *buf, size_t len, const char *name,
		       q3_err *e);
/* The checksum the file ends with, over its first len - 8 bytes (for tests and fuzzing). */
uint64_t q3_xstats_checksum(const void *buf, size_t len);

struct q3_rebalance_opts {
	double hysteresis;	/* admit only if use > evictee's use · (1 + hysteresis); e.g. 0.25 */
	double z;		/* and only if the difference of the decayed counts is z standard
				 * deviations of counting noise, z · sqrt(a + b) (Poisson); e.g. 3 */
	double min_tokens;	/* no change before this much (decayed) evidence */
	uint64_t max_bytes;	/* bytes admitted per round (PCIe copies); 0: no limit */
	bool same_layer;	/* swap only within a layer (per-layer caches of fixed size) */
};

struct q3_swap {
	int layer_in, expert_in;   /* goes to VRAM */
	int layer_out, expert_out; /* leaves VRAM (its RAM home stays) */
};

/* Swaps for one round, given resident [L][E] (1: in VRAM) and the experts' bytes [L][E]
 * (a swap needs the evictee to be at least as large).  Writes at most max swaps, returns the
 * count.  Does not change resident: the caller applies the swaps once their copies are done. */
int q3_xstats_rebalance(const struct q3_xstats *s, const uint8_t *resident, const uint64_t *bytes,
			const struct q3_rebalance_opts *o, struct q3_swap *swaps, int max);
