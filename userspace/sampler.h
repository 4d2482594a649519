/* sampler.h - turns one row of logits into the next token id: the plain C reference sampler.
 *
 * The steps, in this order (the order of Hugging Face's logits processors and warpers):
 *   0. bias       logit[t] += bias[t] for the request's logit_bias entries;
 *   1. penalties  logit[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t],
 *                 count[t] = how often t occurs in the tokens generated so far by this request
 *                 (OpenAI's definition; the prompt does not count);
 *   2. greedy     temperature < 1e-5 (or top_k == 1): the argmax, lowest id on ties; stop here;
 *   3. temperature z[t] = logit[t] / temperature;
 *   4. top_k      keep the k largest z (ties: lower id first), 0 = off;
 *   5. top_p      softmax over the kept set; keep the smallest prefix, in the order (p desc, id
 *                 asc), whose probability mass reaches top_p (at least one token), 1 = off;
 *   6. min_p      drop tokens with p < min_p * p_max, 0 = off;
 *   7. draw       u in [0,1) from the counter-based generator below; walk the kept tokens in
 *                 ascending id order, accumulating exp(z - z_max) in double, and return the
 *                 first whose running sum exceeds u * (sum of the kept weights).
 *
 * Randomness is counter-based: draw number `step` (0, 1, 2, ... within one request) is
 *   x = seed + (step + 1) * 0x9E3779B97F4A7C15, u = (splitmix64_mix(x) >> 11) * 2^-53,
 * so a request's tokens depend only on its seed and its logits, never on other requests, the
 * batch it ran in, or whether its prompt came from a cached state.  The CUDA sampler mirrors
 * these rules and is tested against this file.
 *
 * NaN logits count as -inf.  Setup allocates (q3_sampler_init); reset and sample never do.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

struct q3_logit_bias {
	int32_t id;
	float bias;
};

struct q3_sampling {
	float temperature;	 /* >= 0; below Q3_SAMPLER_GREEDY_T = greedy */
	float top_p;		 /* (0, 1]; 1 = off */
	int top_k;		 /* >= 0; 0 = off */
	float min_p;		 /* [0, 1]; 0 = off */
	float presence_penalty;	 /* [-2, 2] */
	float frequency_penalty; /* [-2, 2] */
	uint64_t seed;
	const struct q3_logit_bias *bias; /* [nbias], owned by the caller; ids outside the vocabulary
					     are ignored */
	int nbias;
};

#define Q3_SAMPLER_GREEDY_T 1e-5f

/* Defaults: greedy off (temperature 1), every filter off, no penalties, seed 0. */
void q3_sampling_default(struct q3_sampling *p);

struct q3_sampler {
	struct q3_sampling p;
	int vocab;
	uint64_t step;	  /* draws made since the last reset */
	int32_t *count;	  /* [vocab] occurrences of each id among the accepted tokens */
	int32_t *seen;	  /* [vocab] distinct accepted ids, in order of first occurrence */
	int nseen;
	struct q3_cand {
		float z;
		int32_t id;
	} *cand;	  /* [vocab] scratch: candidates of one draw */
};

/* Allocates the scratch for a vocabulary of `vocab` ids. */
int q3_sampler_init(struct q3_sampler *s, int vocab, q3_err *e);
void q3_sampler_free(struct q3_sampler *s);
/* Starts a new request with parameters p: forgets the accepted tokens, step back to 0. */
void q3_sampler_reset(struct q3_sampler *s, const struct q3_sampling *p);
/* Picks the next id from logits[vocab] (modified in place: penalties, temperature).  Returns the
 * id, or -EDOM when no logit is finite. */
int32_t q3_sampler_sample(struct q3_sampler *s, float *logits);
/* Records id as generated (for the penalties).  Ids outside the vocabulary are ignored. */
void q3_sampler_accept(struct q3_sampler *s, int32_t id);

/* A draw made elsewhere (a backend that samples on the device, backend.h): the logit
 * adjustments of steps 0-1 as additions, logits[adj[i].id] += adj[i].v in order (the bias entries
 * first, then the penalties, each part's ids distinct so that a part may run in parallel), and the
 * parameters of steps 2-7 for draw number `step`. */
struct q3_logit_adj {
	int32_t id;
	float v;
};

struct q3_sample_row {
	float temperature, top_p, min_p;
	int top_k;
	uint64_t seed, step;
	const struct q3_logit_adj *adj; /* [nbias + npen] */
	int nbias, npen;
};

/* Plans the next draw of s for a backend: fills r and adj[0 .. cap) and advances s's step as
 * q3_sampler_sample would; the draw is then exactly q3_sampler_sample's on the same logits.
 * -ENOSPC when more than cap adjustments are needed, -EEXIST when two bias entries name the same
 * id (their order matters); s is unchanged then and the caller samples on the host. */
int q3_sampler_plan(struct q3_sampler *s, struct q3_sample_row *r, struct q3_logit_adj *adj, int cap);

/* The uniform draw number `step` for `seed`, in [0, 1) (exposed for the CUDA mirror's tests). */
double q3_sampler_uniform(uint64_t seed, uint64_t step);
