/* bench_run.c - `qwen3d bench decode` and `qwen3d bench prefill`: the model's speed through the
 * engine (so through whichever backend runs it), with the bytes a step must read and, on the CUDA
 * backend, the device's measured copy bandwidth beside them.
 *
 *   qwen3d bench decode  --model DIR [--backend cpu|cuda|auto] [--batch N] [--ctx N] [--tokens N]
 *                        [--warmup N] [--temperature T] [--top-p P] [--logits] [--same-prompt]
 *                        [--csv F]
 *       B sessions, each at position ctx (a prompt of ctx random ids of its own, as a server's
 *       batch of requests; --same-prompt: one, copied to the others, the benchmark before
 *       2026-11-30), then `tokens` decode steps of all B together, each session fed the token
 *       drawn for it (q3_engine_decode_sample: on the device where the backend samples, as the
 *       server does; greedy unless --temperature / --top-p); --logits: every step's logits to
 *       the host instead, random ids fed.
 *       Prints tok/s (B · tokens / time), ms per step, and the bytes one step reads over its time
 *       (GB/s).
 *   qwen3d bench prefill --model DIR [--backend ...] [--tokens N] [--reps N] [--csv F]
 *       a fresh session fed a prompt of `tokens` random ids, `reps` times; prints tok/s (best
 *       and median).
 *   qwen3d bench suite --model DIR [...]
 *       one engine (one load of the weights): decode at batch 1 and 16 at ctx 1024, prefill of
 *       512 and 4096 tokens.
 *
 * Bytes per decode step (an estimate from the checkpoint's sizes): every non-expert Linear and
 * the lm_head once, each layer's routed experts as many times as distinct experts the batch is
 * expected to touch (E · (1 − (1 − k/E)^B) for uniform routing), the shared expert once, the
 * recurrent states read and written, the KV cache up to ctx.  The peak beside it is a measured
 * device-to-device copy (bytes read + written), the practical ceiling.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "engine.h"
#include "model.h"
#include "sampler.h"

/* The CUDA backend's copy-bandwidth probe (kernels/cuda_backend.cu), where it is linked in. */
double q3_cuda_copy_gbs(void) __attribute__((weak));

struct bench_opts {
	const char *model, *backend, *csv;
	int batch, ctx, tokens, warmup, reps;
	int logits; /* --logits: decode steps return logits, nothing is drawn */
	int same;   /* --same-prompt: one prompt copied to every session */
	float temperature, top_p; /* the draws' (decode) */
};

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static int32_t rand_id(int V)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return (int32_t)((rng * 0x2545F4914F6CDD1Dull >> 33) % (uint64_t)V);
}

static int parse(int argc, char **argv, struct bench_opts *o, const char *usage)
{
	static const struct option lo[] = {
		{ "model", required_argument, NULL, 'm' },   { "backend", required_argument, NULL, 'b' },
		{ "batch", required_argument, NULL, 'B' },   { "ctx", required_argument, NULL, 'c' },
		{ "tokens", required_argument, NULL, 't' },  { "warmup", required_argument, NULL, 'w' },
		{ "reps", required_argument, NULL, 'r' },    { "csv", required_argument, NULL, 'o' },
		{ "logits", no_argument, NULL, 'L' },	     { "help", no_argument, NULL, 'h' },
		{ "same-prompt", no_argument, NULL, 'S' },
		{ "temperature", required_argument, NULL, 'T' }, { "top-p", required_argument, NULL, 'P' },
		{ 0 },
	};
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		char *end = NULL;
		long v = optarg ? strtol(optarg, &end, 10) : 0;
		bool num = optarg && *optarg && !*end && v >= 0 && v < (1 << 30);

		switch (c) {
		case 'm': o->model = optarg; break;
		case 'b': o->backend = optarg; break;
		case 'o': o->csv = optarg; break;
		case 'L': o->logits = 1; break;
		case 'S': o->same = 1; break;
		case 'T': case 'P': {
			float f = optarg ? strtof(optarg, &end) : -1.0f;

			if (!optarg || !*optarg || *end || !(f >= 0.0f) || (c == 'P' && !(f > 0.0f && f <= 1.0f)) || f > 100.0f) {
				fprintf(stderr, "qwen3d bench %s: --%s: '%s' is not %s\n", argv[0],
					c == 'T' ? "temperature" : "top-p", optarg ? optarg : "",
					c == 'T' ? "a temperature in [0, 100]" : "a probability in (0, 1]");
				return 2;
			}
			*(c == 'T' ? &o->temperature : &o->top_p) = f;
			break;
		}
		case 'B': case 'c': case 't': case 'w': case 'r':
			if (!num) {
				fprintf(stderr, "qwen3d bench %s: --%s: '%s' is not a count\n", argv[0],
					c == 'B' ? "batch" : c == 'c' ? "ctx" : c == 't' ? "tokens" : c == 'w' ? "warmup" : "reps",
					optarg);
				return 2;
			}
			*(c == 'B' ? &o->batch : c == 'c' ? &o->ctx : c == 't' ? &o->tokens : c == 'w' ? &o->warmup : &o->reps) = (int)v;
			break;
		case 'h': fputs(usage, stdout); return 1;
		default: fprintf(stderr, "qwen3d bench %s: unknown option\n%s", argv[0], usage); return 2;
		}
	}
	if (!o->model || optind < argc) {
		fprintf(stderr, "%s", usage);
		return 2;
	}
	if (o->batch < 1 || o->tokens < 1) {
		fprintf(stderr, "qwen3d bench %s: --batch and --tokens must be >= 1\n", argv[0]);
		return 2;
	}
	return 0;
}

static int open_engine(const struct bench_opts *o, int ctx, int batch, struct q3_engine **eng)
{
	struct q3_engine_opts eo = { .model_dir = o->model, .backend = o->backend, .max_ctx = ctx, .max_batch = batch };
	q3_err e;

	if (q3_engine_open(&eo, eng, &e)) {
		fprintf(stderr, "qwen3d bench: %s\n", e.msg);
		return -1;
	}
	return 0;
}

static double peak_gbs(const struct q3_engine *eng)
{
	return strcmp(q3_engine_backend(eng), "cuda") || !q3_cuda_copy_gbs ? 0.0 : q3_cuda_copy_gbs();
}

/* Bytes one decode step of B sequences at context ctx reads (see the file comment). */
static double step_bytes(const struct q3_model *m, int B, int ctx)
{
	const struct q3_config *c = m->cfg;
	double E = c->num_experts, k = c->top_k;
	double distinct = E * (1.0 - pow(1.0 - k / E, B));
	double per_expert = (double)(m->bytes.expert_min + m->bytes.expert_max) / 2;
	double state = 2.0 * c->num_linear_layers * c->lin_num_v_heads * c->lin_k_dim * c->lin_v_dim * 4.0;
	double kv = (double)c->num_full_layers * 2 * c->kv_dim * 2.0 * ctx;

	return (double)m->bytes.dense + (double)(c->tie_word_embeddings ? m->bytes.embed : m->bytes.lm_head) +
	       c->num_layers * distinct * per_expert + B * (state + kv);
}

#define CSV_HEADER "bench,backend,batch,ctx,tokens,tok_s,ms_per_step,gb_per_step,gb_s,peak_gb_s"

static void csv_row(const char *path, const char *header, const char *row)
{
	FILE *f;
	bool fresh;

	if (!path)
		return;
	f = fopen(path, "r");
	fresh = !f;
	if (f)
		fclose(f);
	if (!(f = fopen(path, "a"))) {
		fprintf(stderr, "qwen3d bench: %s: %s\n", path, strerror(errno));
		return;
	}
	if (fresh)
		fprintf(f, "%s\n", header);
	fprintf(f, "%s\n", row);
	fclose(f);
}

/* B sessions at position ctx, then `tokens` timed decode steps of all of them together. */
static int run_decode(struct q3_engine *eng, const struct bench_opts *o, int B, int tokens)
{
	const int ctx = o->ctx, warmup = o->warmup;
	const bool same = o->same, want_logits = o->logits;
	const float temperature = o->temperature, top_p = o->top_p;
	const char *csv = o->csv;
	const struct q3_config *c = q3_engine_config(eng);
	int V = c->vocab_size, rc = 1;
	struct q3_session **ss = calloc(B, sizeof(*ss));
	int32_t *ids = malloc(sizeof(int32_t) * (size_t)Q3_MAX(ctx, B)), *drawn = calloc(B, sizeof(int32_t));
	float *logits = want_logits ? malloc(sizeof(float) * (size_t)B * V) : NULL;
	struct q3_sampler *smp = calloc(B, sizeof(*smp)), **sp = calloc(B, sizeof(*sp));
	struct q3_sampling draw;
	q3_err e;

	if (!ss || !ids || !drawn || (want_logits && !logits) || !smp || !sp) {
		fprintf(stderr, "qwen3d bench: out of memory\n");
		goto out;
	}
	q3_sampling_default(&draw);
	draw.temperature = temperature;
	draw.top_p = top_p;
	for (int i = 0; i < B; i++) {
		if (q3_session_new(eng, &ss[i], &e) || q3_sampler_init(&smp[i], V, &e)) {
			fprintf(stderr, "qwen3d bench: session %d: %s\n", i, e.msg);
			goto out;
		}
		draw.seed = (uint64_t)i + 1;
		q3_sampler_reset(&smp[i], &draw);
		sp[i] = &smp[i];
	}
	for (int i = 0; i < B && ctx > 0; i++) {
		if (same && i > 0) {
			if (q3_session_copy(ss[i], ss[0], &e)) {
				fprintf(stderr, "qwen3d bench: copy: %s\n", e.msg);
				goto out;
			}
			continue;
		}
		for (int j = 0; j < ctx; j++)
			ids[j] = rand_id(V);
		if (q3_session_eval(ss[i], ids, ctx, NULL, 0, &e)) {
			fprintf(stderr, "qwen3d bench: prompt %d: %s\n", i, e.msg);
			goto out;
		}
	}
	double t0 = 0;

	for (int step = 0; step < warmup + tokens; step++) {
		if (step == warmup)
			t0 = q3_now();
		for (int i = 0; i < B; i++) /* each session's last draw; random ids at first or with --logits */
			ids[i] = step > 0 && !want_logits && drawn[i] >= 0 ? drawn[i] : rand_id(V);
		if (want_logits ? q3_engine_decode(eng, ss, ids, B, logits, &e)
				: q3_engine_decode_sample(eng, ss, ids, B, sp, drawn, &e)) {
			fprintf(stderr, "qwen3d bench: decode step %d: %s\n", step, e.msg);
			goto out;
		}
	}
	double dt = q3_now() - t0, per = dt / tokens;
	double bytes = step_bytes(q3_engine_model(eng), B, ctx + warmup + tokens / 2);
	double gbs = bytes / per / 1e9, peak = peak_gbs(eng);
	char row[512];

	char how[96];

	if (want_logits)
		snprintf(how, sizeof(how), "logits to the host");
	else if (temperature < Q3_SAMPLER_GREEDY_T)
		snprintf(how, sizeof(how), "greedy draws by the engine");
	else
		snprintf(how, sizeof(how), "draws by the engine, temperature %g, top_p %g", temperature, top_p);
	printf("decode  backend %s  batch %d  ctx %d  steps %d  (%s)\n", q3_engine_backend(eng), B, ctx, tokens, how);
	printf("  %.1f tok/s  (%.2f ms per step, %.1f tok/s per sequence)\n", B * tokens / dt, per * 1e3, tokens / dt);
	printf("  %.3f GB read per step -> %.0f GB/s", bytes / 1e9, gbs);
	if (peak > 0)
		printf("  (measured copy peak %.0f GB/s: %.0f%%)", peak, 100 * gbs / peak);
	printf("\n");
	fflush(stdout);
	snprintf(row, sizeof(row), "decode,%s,%d,%d,%d,%.2f,%.4f,%.3f,%.1f,%.1f", q3_engine_backend(eng), B, ctx, tokens,
		 B * tokens / dt, per * 1e3, bytes / 1e9, gbs, peak);
	csv_row(csv, CSV_HEADER, row);
	rc = 0;
out:
	if (ss)
		for (int i = 0; i < B; i++)
			q3_session_free(ss[i]);
	for (int i = 0; smp && i < B; i++)
		q3_sampler_free(&smp[i]);
	free(smp);
	free(sp);
	free(drawn);
	free(ss);
	free(ids);
	free(logits);
	return rc;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* A fresh session fed `tokens` random ids, once untimed, then `reps` timed. */
static int run_prefill(struct q3_engine *eng, int tokens, int reps, const char *csv)
{
	const struct q3_config *c = q3_engine_config(eng);
	struct q3_session *s = NULL;
	int32_t *ids = malloc(sizeof(int32_t) * tokens);
	float *logits = malloc(sizeof(float) * c->vocab_size);
	double *t = malloc(sizeof(double) * (reps + 1));
	q3_err e;
	int rc = 1;

	if (!ids || !logits || !t || q3_session_new(eng, &s, &e)) {
		fprintf(stderr, "qwen3d bench: out of memory or session\n");
		goto out;
	}
	for (int rep = 0; rep <= reps; rep++) {
		for (int i = 0; i < tokens; i++)
			ids[i] = rand_id(c->vocab_size);
		q3_session_reset(s);
		double t0 = q3_now();

		if (q3_session_eval(s, ids, tokens, logits, 0, &e)) {
			fprintf(stderr, "qwen3d bench: prefill: %s\n", e.msg);
			goto out;
		}
		t[rep] = q3_now() - t0;
	}
	qsort(t + 1, reps, sizeof(double), cmp_double);
	double best = t[1], med = t[1 + reps / 2];
	char row[512];

	printf("prefill  backend %s  tokens %d  reps %d\n", q3_engine_backend(eng), tokens, reps);
	printf("  %.1f tok/s best (%.3f s), %.1f tok/s median (%.3f s); first pass %.3f s\n", tokens / best, best,
	       tokens / med, med, t[0]);
	fflush(stdout);
	snprintf(row, sizeof(row), "prefill,%s,1,0,%d,%.2f,%.4f,,,", q3_engine_backend(eng), tokens, tokens / best,
		 best * 1e3);
	csv_row(csv, CSV_HEADER, row);
	rc = 0;
out:
	q3_session_free(s);
	free(ids);
	free(logits);
	free(t);
	return rc;
}

static const char decode_usage[] =
	"usage: qwen3d bench decode --model DIR [--backend cpu|cuda|auto] [--batch N] [--ctx N] [--tokens N]\n"
	"                           [--warmup N] [--temperature T] [--top-p P] [--logits] [--same-prompt]\n"
	"                           [--csv F]\n"
	"  each session gets its own prompt of --ctx random ids (--same-prompt: one, copied); each step\n"
	"  draws every session's next token (greedy unless --temperature / --top-p; on the device where\n"
	"  the backend samples); --logits: each step returns the logits to the host instead\n";

int q3_bench_decode(int argc, char **argv)
{
	struct bench_opts o = { .batch = 1, .ctx = 1024, .tokens = 64, .warmup = 4, .top_p = 1.0f };
	struct q3_engine *eng = NULL;
	int r;

	if ((r = parse(argc, argv, &o, decode_usage)))
		return r == 1 ? 0 : r;
	if (open_engine(&o, o.ctx + o.warmup + o.tokens + 8, o.batch, &eng))
		return 1;
	r = run_decode(eng, &o, o.batch, o.tokens);
	q3_engine_close(eng);
	return r;
}

static const char prefill_usage[] =
	"usage: qwen3d bench prefill --model DIR [--backend cpu|cuda|auto] [--tokens N] [--reps N] [--csv F]\n";

int q3_bench_prefill(int argc, char **argv)
{
	struct bench_opts o = { .batch = 1, .tokens = 512, .reps = 3 };
	struct q3_engine *eng = NULL;
	int r;

	if ((r = parse(argc, argv, &o, prefill_usage)))
		return r == 1 ? 0 : r;
	if (open_engine(&o, o.tokens + 8, 1, &eng))
		return 1;
	r = run_prefill(eng, o.tokens, Q3_MAX(o.reps, 1), o.csv);
	q3_engine_close(eng);
	return r;
}

static const char suite_usage[] =
	"usage: qwen3d bench suite --model DIR [--backend cpu|cuda|auto] [--batch N] [--ctx N] [--tokens N]\n"
	"                          [--reps N] [--temperature T] [--top-p P] [--logits] [--same-prompt]\n"
	"                          [--csv F]\n"
	"  one engine: decode at batch 1 and at --batch (default 16) at --ctx (default 1024), --tokens steps\n"
	"  (default 64), then prefill of 512 and 4096 tokens, --reps times (default 2)\n";

int q3_bench_suite(int argc, char **argv)
{
	struct bench_opts o = { .batch = 16, .ctx = 1024, .tokens = 64, .warmup = 4, .reps = 2, .top_p = 1.0f };
	struct q3_engine *eng = NULL;
	int r, fails = 0;

	if ((r = parse(argc, argv, &o, suite_usage)))
		return r == 1 ? 0 : r;
	if (open_engine(&o, Q3_MAX(o.ctx + o.warmup + o.tokens + 8, 4096 + 8), o.batch, &eng))
		return 1;
	fails += run_decode(eng, &o, 1, o.tokens) != 0;
	if (o.batch > 1)
		fails += run_decode(eng, &o, o.batch, Q3_MAX(o.tokens / 2, 1)) != 0;
	fails += run_prefill(eng, 512, Q3_MAX(o.reps, 1), o.csv) != 0;
	fails += run_prefill(eng, 4096, Q3_MAX(o.reps, 1), o.csv) != 0;
	q3_engine_close(eng);
	return fails ? 1 : 0;
}
