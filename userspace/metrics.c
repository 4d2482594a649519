/* metrics.c - counters, the tokens-per-second window and the Prometheus text (see metrics.h). */
#include "metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const int codes[Q3_METRICS_CODES - 1] = { 200, 400, 401, 404, 405, 408, 413, 429, 500, 503 };
static const char *const ep_names[Q3_EP_COUNT] = { "/v1/chat/completions", "/v1/completions", "/v1/models",
						   "/health", "/metrics", "other" };

#define RLX memory_order_relaxed

void q3_metrics_request(struct q3_metrics *m, enum q3_endpoint ep, int status)
{
	int c = Q3_METRICS_CODES - 1;
	for (int i = 0; i < Q3_METRICS_CODES - 1; i++)
		if (codes[i] == status)
			c = i;
	atomic_fetch_add_explicit(&m->requests[ep][c], 1, RLX);
}

static int64_t now_sec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec;
}

void q3_metrics_tokens(struct q3_metrics *m, int n)
{
	int64_t sec = now_sec();
	int b = (int)(sec % Q3_METRICS_WINDOW);

	atomic_fetch_add_explicit(&m->completion_tokens, n, RLX);
	/* one writer (the worker) per bucket: a stale bucket is restarted, not raced */
	if (atomic_load_explicit(&m->tok_bucket_sec[b], RLX) != sec) {
		atomic_store_explicit(&m->tok_bucket[b], 0, RLX);
		atomic_store_explicit(&m->tok_bucket_sec[b], sec, RLX);
	}
	atomic_fetch_add_explicit(&m->tok_bucket[b], n, RLX);
}

double q3_metrics_tok_per_s(struct q3_metrics *m)
{
	int64_t sec = now_sec();
	uint64_t sum = 0;

	/* the current second is still filling: count the window before it */
	for (int i = 0; i < Q3_METRICS_WINDOW; i++) {
		int64_t s = atomic_load_explicit(&m->tok_bucket_sec[i], RLX);
		if (s < sec && s >= sec - Q3_METRICS_WINDOW)
			sum += atomic_load_explicit(&m->tok_bucket[i], RLX);
	}
	return (double)sum / Q3_METRICS_WINDOW;
}

#define LOAD(x) ((unsigned long long)atomic_load_explicit(&(x), RLX))

void q3_metrics_experts(struct q3_metrics *m, const struct q3_engine_stats *s)
{
	while (atomic_flag_test_and_set_explicit(&m->xlock, memory_order_acquire))
		;
	m->experts = *s;
	m->have_experts = true;
	atomic_flag_clear_explicit(&m->xlock, memory_order_release);
}

/* Where the routed experts are served from: the hot-expert cache's hit rate, PCIe traffic and
 * the CPU experts' bandwidth (issue 8).  Nothing before the worker published. */
static void render_experts(FILE *f, struct q3_metrics *m)
{
	struct q3_engine_stats s;
	bool have;

	while (atomic_flag_test_and_set_explicit(&m->xlock, memory_order_acquire))
		;
	s = m->experts;
	have = m->have_experts;
	atomic_flag_clear_explicit(&m->xlock, memory_order_release);
	if (!have)
		return;
	uint64_t pairs = s.pairs_vram + s.pairs_cpu + s.pairs_pcie;
	fprintf(f, "# HELP qwen3d_expert_offload Whether some routed experts live in host RAM.\n"
		   "# TYPE qwen3d_expert_offload gauge\nqwen3d_expert_offload %d\n"
		   "# HELP qwen3d_experts_vram Routed experts resident in VRAM.\n"
		   "# TYPE qwen3d_experts_vram gauge\nqwen3d_experts_vram %d\n"
		   "# HELP qwen3d_experts Routed experts of the model (layers x experts; 0: CPU backend).\n"
		   "# TYPE qwen3d_experts gauge\nqwen3d_experts %d\n"
		   "# HELP qwen3d_vram_budget_bytes VRAM the weights may use (dense and experts).\n"
		   "# TYPE qwen3d_vram_budget_bytes gauge\nqwen3d_vram_budget_bytes %llu\n",
		s.offload, s.experts_vram, s.experts_total, (unsigned long long)s.vram_budget);
	fprintf(f, "# HELP qwen3d_expert_pairs_total Routed (token, expert) pairs by where they were served.\n"
		   "# TYPE qwen3d_expert_pairs_total counter\n"
		   "qwen3d_expert_pairs_total{where=\"vram\"} %llu\nqwen3d_expert_pairs_total{where=\"cpu\"} %llu\n"
		   "qwen3d_expert_pairs_total{where=\"pcie\"} %llu\n"
		   "# HELP qwen3d_expert_hit_ratio Share of routed pairs served from VRAM since start.\n"
		   "# TYPE qwen3d_expert_hit_ratio gauge\nqwen3d_expert_hit_ratio %.4f\n",
		(unsigned long long)s.pairs_vram, (unsigned long long)s.pairs_cpu, (unsigned long long)s.pairs_pcie,
		pairs ? (double)s.pairs_vram / (double)pairs : 1.0);
	fprintf(f, "# HELP qwen3d_pcie_bytes_total Offload traffic over PCIe: activations handed to the CPU "
		   "experts and back, experts streamed in for prefill.\n"
		   "# TYPE qwen3d_pcie_bytes_total counter\nqwen3d_pcie_bytes_total %llu\n"
		   "# HELP qwen3d_offload_tokens_total Token rows that went through the offload path.\n"
		   "# TYPE qwen3d_offload_tokens_total counter\nqwen3d_offload_tokens_total %llu\n"
		   "# HELP qwen3d_cpu_expert_bytes_total Expert weight bytes the CPU expert threads read.\n"
		   "# TYPE qwen3d_cpu_expert_bytes_total counter\nqwen3d_cpu_expert_bytes_total %llu\n"
		   "# HELP qwen3d_cpu_expert_busy_seconds_total Busy time of the CPU expert threads.\n"
		   "# TYPE qwen3d_cpu_expert_busy_seconds_total counter\nqwen3d_cpu_expert_busy_seconds_total %.6f\n"
		   "# HELP qwen3d_cpu_expert_gbytes_per_second CPU expert bandwidth while busy (bytes / busy time).\n"
		   "# TYPE qwen3d_cpu_expert_gbytes_per_second gauge\nqwen3d_cpu_expert_gbytes_per_second %.2f\n"
		   "# HELP qwen3d_cpu_expert_info The CPU expert threads: instruction set, NUMA node, count.\n"
		   "# TYPE qwen3d_cpu_expert_info gauge\n"
		   "qwen3d_cpu_expert_info{isa=\"%s\",node=\"%d\",threads=\"%d\"} 1\n",
		(unsigned long long)s.pcie_bytes, (unsigned long long)s.tokens, (unsigned long long)s.cpu_expert_bytes,
		s.cpu_expert_busy_s, s.cpu_expert_busy_s > 0 ? s.cpu_expert_bytes / s.cpu_expert_busy_s / 1e9 : 0.0,
		*s.cpu_isa ? s.cpu_isa : "-", s.cpu_node, s.cpu_threads);
}

char *q3_metrics_render(struct q3_metrics *m)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
	fprintf(f, "# HELP qwen3d_requests_total HTTP requests by endpoint and status.\n"
		   "# TYPE qwen3d_requests_total counter\n");
	for (int ep = 0; ep < Q3_EP_COUNT; ep++)
		for (int c = 0; c < Q3_METRICS_CODES; c++) {
			unsigned long long n = LOAD(m->requests[ep][c]);
			if (!n)
				continue;
			if (c < Q3_METRICS_CODES - 1)
				fprintf(f, "qwen3d_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n",
					ep_names[ep], codes[c], n);
			else
				fprintf(f, "qwen3d_requests_total{endpoint=\"%s\",status=\"other\"} %llu\n",
					ep_names[ep], n);
		}
	static const struct {
		const char *name, *type, *help;
		size_t off;
	} ctr[] = {
#define C(field, name, help) { name, "counter", help, offsetof(struct q3_metrics, field) }
		C(prompt_tokens, "qwen3d_prompt_tokens_total", "Prompt tokens of finished generations."),
		C(cached_tokens, "qwen3d_cached_prompt_tokens_total",
		  "Prompt tokens restored from saved conversation states instead of computed."),
		C(prefill_tokens, "qwen3d_prefill_tokens_total", "Prompt tokens computed."),
		C(completion_tokens, "qwen3d_completion_tokens_total", "Tokens generated."),
		C(decode_steps, "qwen3d_decode_steps_total", "Batched decode steps."),
		C(decode_seqs, "qwen3d_decode_sequences_total",
		  "Sequences over all decode steps (divide by steps for the mean batch)."),
		C(cache_hits, "qwen3d_state_cache_hits_total", "Requests that restored a saved state."),
		C(cache_misses, "qwen3d_state_cache_misses_total", "Requests that found no saved state."),
		C(cache_saves, "qwen3d_state_cache_saves_total", "Conversation states saved."),
		C(cancelled, "qwen3d_generations_cancelled_total",
		  "Generations cancelled (client disconnected or shutdown)."),
#undef C
	};
	for (size_t i = 0; i < sizeof(ctr) / sizeof(ctr[0]); i++)
		fprintf(f, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", ctr[i].name, ctr[i].help,
			ctr[i].name, ctr[i].name,
			LOAD(*(atomic_uint_fast64_t *)((char *)m + ctr[i].off)));
	fprintf(f, "# HELP qwen3d_generation_seconds Time from queueing to the last token.\n"
		   "# TYPE qwen3d_generation_seconds summary\n"
		   "qwen3d_generation_seconds_sum %.6f\nqwen3d_generation_seconds_count %llu\n",
		LOAD(m->gen_seconds_us) * 1e-6, LOAD(m->gen_count));
	fprintf(f, "# HELP qwen3d_tokens_per_second Tokens generated per second, last %d s.\n"
		   "# TYPE qwen3d_tokens_per_second gauge\nqwen3d_tokens_per_second %.2f\n",
		Q3_METRICS_WINDOW, q3_metrics_tok_per_s(m));
	fprintf(f, "# HELP qwen3d_requests_running Generations being computed.\n"
		   "# TYPE qwen3d_requests_running gauge\nqwen3d_requests_running %d\n"
		   "# HELP qwen3d_requests_queued Generations waiting for a batch slot.\n"
		   "# TYPE qwen3d_requests_queued gauge\nqwen3d_requests_queued %d\n"
		   "# HELP qwen3d_state_cache_entries Saved conversation states.\n"
		   "# TYPE qwen3d_state_cache_entries gauge\nqwen3d_state_cache_entries %d\n"
		   "# HELP qwen3d_http_connections Open HTTP connections.\n"
		   "# TYPE qwen3d_http_connections gauge\nqwen3d_http_connections %d\n",
		atomic_load(&m->running), atomic_load(&m->queued), atomic_load(&m->cache_entries),
		atomic_load(&m->connections));
	render_experts(f, m);
	if (fclose(f)) {
		free(buf);
		return NULL;
	}
	return buf;
}
