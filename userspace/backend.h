/* backend.h - what a compute backend implements for the engine: the contract between engine.c
 * (which owns the model files, sessions and bookkeeping) and the code that computes (the CPU
 * backend, cpu_backend.c; the CUDA backend later).  Only engine.c and tests include this.
 *
 * A backend is chosen once, at engine open.  It prepares the weights its own way (repacks,
 * copies to the device), allocates every session buffer when a session state is created, and
 * never allocates in forward().
 *
 * forward() runs one step of several sequences at once: sequence i feeds seqs[i].n tokens on top
 * of its state, at positions pos .. pos + n - 1.  A sequence at pos 0 starts from an empty
 * state, whatever its buffers hold (so resetting a session is only setting pos to 0).  The
 * engine guarantees: 1 <= nseq <= max_batch, Σ n <= max_tokens, pos + n <= max_ctx, every id in
 * [0, vocab), distinct states.  Results must not depend on how sequences are grouped into calls
 * or how a prompt is split across calls, beyond fp32 rounding.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "sampler.h"

struct q3_engine_stats;
#include "util.h"

struct q3_backend_opts {
	int threads;	      /* CPU threads (>= 1) */
	int max_ctx;	      /* positions per session */
	int max_batch;	      /* sequences per forward */
	int max_tokens;	      /* tokens per forward, all sequences together (>= max_batch) */
	uint64_t vram_budget; /* bytes; 0 = automatic */
	int expert_threads;	   /* q3_engine_opts's */
	int expert_cache;	   /* enum q3_cache_policy (knobs.h) */
	const char *expert_stats;
	bool quiet;
};

/* Logit adjustments (q3_sample_row's, all rows together) one decode step may send. */
#define Q3_SAMPLE_ADJ_MAX (1 << 16)

/* One sequence of a forward call. */
struct q3_fwd_seq {
	void *state;	    /* from state_new */
	int pos;	    /* tokens already in the state */
	int n;		    /* tokens to feed, >= 1 */
	const int32_t *ids; /* [n] */
	float *logits;	    /* [n][V] when all_logits, else [V] for the last token; NULL: none */
	bool all_logits;
	/* With ops->samples, for a decode step (n == 1, logits NULL): draw the next token on the
	 * backend (sampler.h's rules, the adjustments applied to its logits) into *token, -1 where
	 * no logit is a candidate.  NULL otherwise. */
	const struct q3_sample_row *sample;
	int32_t *token;
};

/* Debug hook: called after the embedding (layer -1) and after each decoder layer i (layer i)
 * with the residual stream of every token of the call, h [ntok][H], sequences back to back in
 * call order. */
typedef void (*q3_trace_fn)(void *ctx, int layer, const float *h, int ntok, int H);

struct q3_backend_ops {
	const char *name;
	/* Prepares the weights of m (whose tensors' data is loaded and stays valid until close).  On
	 * failure *bk is NULL and nothing is held (under "auto" the engine then tries the CPU). */
	int (*open)(const struct q3_model *m, const struct q3_backend_opts *o, void **bk, q3_err *e);
	void (*close)(void *bk);
	/* A session's buffers: KV cache for max_ctx positions, conv and recurrent states. */
	int (*state_new)(void *bk, void **st, q3_err *e);
	void (*state_free)(void *bk, void *st);
	/* dst := src's first pos positions and its states.  0 or -errno (dst's state then unknown). */
	int (*state_copy)(void *bk, void *dst, const void *src, int pos, q3_err *e);
	int (*forward)(void *bk, const struct q3_fwd_seq *seqs, int nseq, q3_err *e);
	/* Optional (may be NULL): install or clear (fn NULL) the trace hook. */
	void (*set_trace)(void *bk, q3_trace_fn fn, void *ctx);
	/* Tokens per forward call the backend wants (prefill chunk); 0: the engine's default. */
	int max_tokens;
	/* Optional (may be NULL): q3_engine_stats's facts (s is zeroed before). */
	void (*stats)(void *bk, struct q3_engine_stats *s);
	/* Optional (may be NULL): q3_engine_idle (nothing in flight; a few milliseconds of work;
	 * 1 did some, 0 nothing to do, -errno). */
	int (*idle)(void *bk, q3_err *e);
	/* Whether forward() takes q3_fwd_seq.sample (a decode step's draw on the backend, so that
	 * only token ids come back). */
	bool samples;
};

extern const struct q3_backend_ops q3_backend_cpu;

/* The CUDA backend (kernels/cuda_backend.cu), in programs linked with libqwen3d_cuda.a (the
 * qwen3d binary and the GPU tests, where nvcc built it).  A weak reference: in programs without
 * it the address is NULL, so use q3_cuda_backend_ops().  The function itself returns NULL when
 * no CUDA device is usable. */
const struct q3_backend_ops *q3_backend_cuda(void) __attribute__((weak));

static inline const struct q3_backend_ops *q3_cuda_backend_ops(void)
{
	return q3_backend_cuda ? q3_backend_cuda() : NULL;
}

/* Debug access for tests: the trace hook of an open engine's backend.  Returns -ENOTSUP when the
 * backend has none. */
struct q3_engine;
int q3_engine_set_trace(struct q3_engine *eng, q3_trace_fn fn, void *ctx);
/* The bound model of an open engine (tests compare ops against it). */
const struct q3_model *q3_engine_model(const struct q3_engine *eng);
