/* metrics.h - the daemon's counters and gauges, rendered as Prometheus text for GET /metrics.
 *
 * Updated lock-free (relaxed atomics) by the HTTP threads and the inference worker; read by
 * q3_metrics_render.  Names follow Prometheus conventions: *_total counters, *_seconds units.
 * A zero-initialized struct is ready to use.
 */
#pragma once
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"

enum q3_endpoint {
	Q3_EP_CHAT,
	Q3_EP_COMPLETIONS,
	Q3_EP_MODELS,
	Q3_EP_HEALTH,
	Q3_EP_METRICS,
	Q3_EP_OTHER,
	Q3_EP_COUNT
};

#define Q3_METRICS_CODES 11 /* 200 400 401 404 405 408 413 429 500 503 other */
#define Q3_METRICS_WINDOW 10 /* seconds of the tokens-per-second gauge */

struct q3_metrics {
	atomic_uint_fast64_t requests[Q3_EP_COUNT][Q3_METRICS_CODES];
	atomic_uint_fast64_t prompt_tokens;	/* prompt tokens of finished generations */
	atomic_uint_fast64_t cached_tokens;	/* of which restored from saved states */
	atomic_uint_fast64_t completion_tokens;
	atomic_uint_fast64_t prefill_tokens;	/* prompt tokens computed */
	atomic_uint_fast64_t decode_steps;	/* q3_engine_decode calls */
	atomic_uint_fast64_t decode_seqs;	/* sessions over all decode steps (mean batch = /steps) */
	atomic_uint_fast64_t cache_hits, cache_misses, cache_saves;
	atomic_uint_fast64_t cancelled;		/* generations cancelled (client gone, stop, shutdown) */
	atomic_uint_fast64_t gen_seconds_us;	/* sum of generation durations, microseconds */
	atomic_uint_fast64_t gen_count;
	atomic_int running, queued, cache_entries, connections;
	/* tokens generated per second: one bucket per second, the last Q3_METRICS_WINDOW seconds */
	atomic_uint_fast64_t tok_bucket[Q3_METRICS_WINDOW];
	atomic_int_fast64_t tok_bucket_sec[Q3_METRICS_WINDOW];
	/* the engine's expert cache and CPU experts (q3_engine_stats), published by the worker;
	 * xlock guards the copy (a spin: both sides only copy the struct) */
	atomic_flag xlock;
	bool have_experts;
	struct q3_engine_stats experts;
};

void q3_metrics_request(struct q3_metrics *m, enum q3_endpoint ep, int status);
/* n tokens generated now (feeds the tokens-per-second gauge and completion_tokens). */
void q3_metrics_tokens(struct q3_metrics *m, int n);
/* Tokens generated per second over the last full window. */
double q3_metrics_tok_per_s(struct q3_metrics *m);
/* The worker's latest q3_engine_stats (rendered as the qwen3d_expert_* families). */
void q3_metrics_experts(struct q3_metrics *m, const struct q3_engine_stats *s);
/* Prometheus text exposition (version 0.0.4), malloc'ed; NULL on ENOMEM. */
char *q3_metrics_render(struct q3_metrics *m);
