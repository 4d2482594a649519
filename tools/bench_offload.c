/* bench_offload.c - `qwen3d bench offload`: decode and prefill speed with routed experts beyond
 * VRAM, and where the experts were served from (issue 8).
 *
 *   qwen3d bench offload --model DIR [--vram-budget SIZE] [--backend cuda|cpu|auto]
 *                        [--batch B] [--ctx N] [--tokens N] [--prefill N] [--csv FILE]
 *
 * Rows: prefill of a fresh session fed --prefill random ids (default 4096; 0: none); decode of B
 * sessions at position --ctx (default 256), --tokens steps (default 64) after 4 warm-up steps.
 * For each: tok/s, ms per step and per layer, the share of routed (token, expert) pairs served
 * from VRAM (the hit rate), the offload's PCIe bytes per token, the CPU expert threads' weight
 * bandwidth and their busy time per layer (from q3_engine_stats, differences over the row).
 * --vram-budget takes a size ("20GiB"; "auto" or 0: what the card has free).
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "engine.h"
#include "vram_budget.h"

struct bo {
	const char *model, *backend, *csv;
	uint64_t budget;
	int batch, ctx, tokens, prefill, threads; /* threads: CPU expert threads, 0: the default */
};

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static int32_t rid(int V)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (int32_t)(rng % (uint64_t)V);
}

/* One row: the stats differences over it. */
static void report(FILE *csv, const char *what, const struct q3_engine_stats *a,
		   const struct q3_engine_stats *b, int tokens, double secs, int steps, int L)
{
	double pcie_pairs = (double)(b->pairs_pcie - a->pairs_pcie);
	double pairs = (double)(b->pairs_vram - a->pairs_vram) + (double)(b->pairs_cpu - a->pairs_cpu) + pcie_pairs;
	double hit = pairs > 0 ? (double)(b->pairs_vram - a->pairs_vram) / pairs : 1.0;
	double busy = b->cpu_expert_busy_s - a->cpu_expert_busy_s;
	double cpugbs = busy > 0 ? (double)(b->cpu_expert_bytes - a->cpu_expert_bytes) / busy / 1e9 : 0;
	double pcie = tokens ? (double)(b->pcie_bytes - a->pcie_bytes) / tokens : 0;

	double ph[3];

	for (int i = 0; i < 3; i++) /* ms a layer */
		ph[i] = steps ? (b->cpu_expert_phase_s[i] - a->cpu_expert_phase_s[i]) / steps / L * 1e3 : 0.0;
	printf("%-10s %8.1f tok/s %8.2f ms/step %7.3f ms/layer  hit %5.1f%%  PCIe %8.0f KB/tok  CPU %6.2f GB/s, "
	       "%6.3f ms/layer busy (activations %.3f, gate/up %.3f, down %.3f)\n",
	       what, tokens / secs, secs / steps * 1e3, secs / steps / L * 1e3, 100 * hit, pcie / 1e3, cpugbs,
	       steps ? busy / steps / L * 1e3 : 0.0, ph[0], ph[1], ph[2]);
	uint64_t nl = b->prefill_layers - a->prefill_layers;

	if (pcie_pairs > 0) /* the GPU's share of the missing experts, read from host memory */
		printf("%-10s the GPU read %.1f%% of the routed experts over PCIe (%.2f a token a layer; up to %d, "
		       "%d at the end), the CPU computed %.1f%%\n",
		       "", 100 * pcie_pairs / pairs, pcie_pairs / tokens / L, b->pcie_experts, b->pcie_experts_now,
		       100 * (double)(b->pairs_cpu - a->pairs_cpu) / pairs);
	if (nl) { /* where a streamed prefill layer's GPU time goes */
		double ms[5];

		for (int i = 0; i < 5; i++)
			ms[i] = (b->prefill_phase_s[i] - a->prefill_phase_s[i]) / nl * 1e3;
		printf("%-10s %d streamed layer calls, ms each: resident pass %.3f, waiting for copies %.3f, "
		       "repacking %.3f, streamed passes %.3f; copy engine busy %.3f (%.1f GB/s; alone %.1f GB/s)\n",
		       "", (int)nl, ms[0], ms[1], ms[2], ms[3], ms[4],
		       ms[4] > 0 ? pcie * tokens / nl / ms[4] / 1e6 : 0.0, b->prefill_copy_alone_gbps);
	}
	if (csv)
		fprintf(csv, "offload,%s,%d,%.3f,%.4f,%.4f,%.5f,%.1f,%.3f,%.5f\n", what, tokens, tokens / secs,
			secs / steps * 1e3, secs / steps / L * 1e3, hit, pcie, cpugbs,
			steps ? busy / steps / L * 1e3 : 0.0);
}

static int run(const struct bo *o)
{
	struct q3_engine_opts eo = {.model_dir = o->model, .backend = o->backend,
				    .max_ctx = Q3_MAX(o->ctx + o->tokens + 8, o->prefill + 1),
				    .max_batch = o->batch, .vram_budget = o->budget, .expert_threads = o->threads};
	struct q3_engine *eng;
	struct q3_session **ss = NULL;
	struct q3_engine_stats s0, s1;
	q3_err e;
	int V, L, err = 1;
	int32_t *ids = NULL;
	FILE *csv = NULL;

	if (q3_engine_open(&eo, &eng, &e)) {
		fprintf(stderr, "qwen3d bench offload: %s\n", e.msg);
		return 1;
	}
	V = q3_engine_config(eng)->vocab_size;
	L = q3_engine_config(eng)->num_layers;
	q3_engine_stats(eng, &s0);
	printf("# backend %s; offload %s: %d of %d routed experts in VRAM, budget %.2f GiB; %d CPU expert "
	       "threads (%s) on node %d\n",
	       q3_engine_backend(eng), s0.offload ? "on" : "off", s0.experts_vram, s0.experts_total,
	       (double)s0.vram_budget / (1 << 30), s0.cpu_threads, s0.cpu_isa[0] ? s0.cpu_isa : "-",
	       s0.cpu_node);
	if (o->csv && !(csv = fopen(o->csv, "a"))) {
		fprintf(stderr, "qwen3d bench offload: %s: %s\n", o->csv, strerror(errno));
		goto out;
	}
	ids = malloc(sizeof(int32_t) * (size_t)Q3_MAX(Q3_MAX(o->prefill, o->ctx), o->batch) + 4);
	ss = calloc((size_t)o->batch, sizeof(*ss));
	if (!ids || !ss)
		goto out;
	for (int i = 0; i < o->batch; i++)
		if (q3_session_new(eng, &ss[i], &e)) {
			fprintf(stderr, "qwen3d bench offload: %s\n", e.msg);
			goto out;
		}
	if (o->prefill > 0) {
		for (int i = 0; i < o->prefill; i++)
			ids[i] = rid(V);
		/* warm: a short prompt, so that first-use costs stay out of the row */
		if (q3_session_eval(ss[0], ids, Q3_MIN(o->prefill, 64), NULL, 0, &e))
			goto fail;
		q3_session_reset(ss[0]);
		q3_engine_stats(eng, &s0);
		double t0 = q3_now();

		if (q3_session_eval(ss[0], ids, o->prefill, NULL, 0, &e))
			goto fail;
		double dt = q3_now() - t0;

		q3_engine_stats(eng, &s1);
		char what[32];

		snprintf(what, sizeof(what), "prefill%d", o->prefill);
		report(csv, what, &s0, &s1, o->prefill, dt, 1, L);
		q3_session_reset(ss[0]);
	}
	if (o->tokens > 0) {
		for (int i = 0; i < o->ctx; i++)
			ids[i] = rid(V);
		for (int b = 0; b < o->batch; b++)
			if (o->ctx && q3_session_eval(ss[b], ids, o->ctx, NULL, 0, &e))
				goto fail;
		for (int step = 0; step < o->tokens + 4; step++) {
			if (step == 4) {
				q3_engine_stats(eng, &s0);
				s0.tokens = (uint64_t)(q3_now() * 1e6); /* start time, us */
			}
			for (int b = 0; b < o->batch; b++)
				ids[b] = rid(V);
			if (q3_engine_decode(eng, ss, ids, o->batch, NULL, &e))
				goto fail;
		}
		double dt = q3_now() - (double)s0.tokens / 1e6;

		q3_engine_stats(eng, &s1);
		char what[32];

		snprintf(what, sizeof(what), "decode-b%d", o->batch);
		report(csv, what, &s0, &s1, o->tokens * o->batch, dt, o->tokens, L);
	}
	err = 0;
	goto out;
fail:
	fprintf(stderr, "qwen3d bench offload: %s\n", e.msg);
out:
	if (ss)
		for (int i = 0; i < o->batch; i++)
			q3_session_free(ss[i]);
	free(ss);
	free(ids);
	if (csv)
		fclose(csv);
	q3_engine_close(eng);
	return err;
}

int cmd_bench_offload(int argc, char **argv)
{
	static const struct option lo[] = {
		{"model", 1, 0, 'm'},  {"backend", 1, 0, 'b'}, {"vram-budget", 1, 0, 'v'},
		{"batch", 1, 0, 'B'},  {"ctx", 1, 0, 'c'},     {"tokens", 1, 0, 't'},
		{"prefill", 1, 0, 'p'}, {"csv", 1, 0, 'o'},    {"help", 0, 0, 'h'},
		{"expert-threads", 1, 0, 'x'},
		{0, 0, 0, 0},
	};
	static const char usage[] =
		"usage: qwen3d bench offload --model DIR [--vram-budget SIZE] [--backend cuda|cpu|auto]\n"
		"         [--batch B] [--ctx N] [--tokens N] [--prefill N] [--expert-threads N] [--csv FILE]\n";
	struct bo o = {.backend = "auto", .batch = 1, .ctx = 256, .tokens = 64, .prefill = 4096};
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		char *end = NULL;
		long v = optarg ? strtol(optarg, &end, 10) : 0;
		bool num = optarg && *optarg && !*end && v >= 0 && v < (1 << 24);

		switch (c) {
		case 'm':
			o.model = optarg;
			break;
		case 'b':
			o.backend = optarg;
			break;
		case 'o':
			o.csv = optarg;
			break;
		case 'v':
			if (q3_vram_budget_parse(optarg, &o.budget) < 0) {
				fprintf(stderr, "qwen3d bench offload: --vram-budget: '%s' is not a size\n", optarg);
				return 2;
			}
			break;
		case 'x':
			if (!num || v < 1) {
				fprintf(stderr, "qwen3d bench offload: --expert-threads: '%s' is not a count\n", optarg);
				return 2;
			}
			o.threads = (int)v;
			break;
		case 'B':
		case 'c':
		case 't':
		case 'p':
			if (!num) {
				fprintf(stderr, "qwen3d bench offload: '%s' is not a count\n", optarg);
				return 2;
			}
			*(c == 'B' ? &o.batch : c == 'c' ? &o.ctx : c == 't' ? &o.tokens : &o.prefill) = (int)v;
			break;
		case 'h':
			fputs(usage, stdout);
			return 0;
		default:
			fputs(usage, stderr);
			return 2;
		}
	}
	if (!o.model || optind < argc || o.batch < 1) {
		fputs(usage, stderr);
		return 2;
	}
	return run(&o);
}
