/* test_synth.c - the synthetic checkpoint generator (tools/synth.c, tools/mkmodel.c): sizes equal
 * the spec's arithmetic, any byte range of any tensor is the same however it is cut, weights have
 * the RMS they were designed for, the routing skew is calibrated, and a written model reads back
 * through the checkpoint reader and binds, with the bytes the description says. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>

#include "checkpoint.h"
#include "cli.h"
#include "dequant.h"
#include "engine.h"
#include "model.h"
#include "../tools/synth.h"
#include "testutil.h"

static struct q3_synth_opts defaults(const char *preset)
{
	return (struct q3_synth_opts){ .preset = preset, .expert_bits = 4, .dense_bits = 16, .group_size = 128,
				       .g_idx = true, .seed = 1, .shard_size = 5000000000ull };
}

static void plan(struct q3_synth_opts o, struct q3_synth *s)
{
	q3_err e;

	if (q3_synth_plan(&o, s, &e))
		fail_msg("%s", e.msg);
}

/* qwen3next.md section 7: the whole model without g_idx under schemes A, B, C, and the routed
 * experts with g_idx. */
static void test_full_size_bytes_match_the_spec(void **state)
{
	static const struct { int dense; uint64_t bytes; } schemes[] = {
		{ 16, 44894615040ull }, { 4, 42398381568ull }, { 8, 43248023040ull },
	};
	struct q3_synth s;
	struct q3_synth_opts o = defaults("80b-a3b");

	for (size_t i = 0; i < Q3_ARRAY_SIZE(schemes); i++) {
		o.g_idx = false;
		o.dense_bits = schemes[i].dense;
		plan(o, &s);
		assert_int_equal(s.tensor_bytes, schemes[i].bytes);
		assert_int_equal(s.expert_bytes, 40164655104ull);
		q3_synth_free(&s);
	}
	o = defaults("80b-a3b");
	plan(o, &s);
	assert_int_equal(s.expert_bytes, 40617639936ull);
	/* 5 GB shards: none above the limit, every one but the last closer to it than the largest
	 * tensor (the embedding, 622,329,856 bytes): the next tensor did not fit */
	for (int i = 0; i < s.nshards; i++) {
		uint64_t tb = s.shards[i].size - s.shards[i].header_len;
		assert_true(tb <= o.shard_size);
		if (i + 1 < s.nshards)
			assert_true(tb + 622329856ull > o.shard_size);
	}
	q3_synth_free(&s);
}

/* Filling a tensor in odd pieces gives the bytes of filling it at once. */
static void test_fill_is_independent_of_the_cuts(void **state)
{
	struct q3_synth s;
	struct q3_synth_opts o = defaults("tiny");
	uint64_t seed = 12345;

	o.zipf = 1.0; /* special columns and rows too */
	o.dense_bits = 8;
	o.act_order = true; /* shuffled g_idx: the cuts must not change the order either */
	plan(o, &s);
	for (size_t i = 0; i < s.ntensors; i++) {
		const struct q3_synth_tensor *t = &s.t[i];
		uint8_t *a = malloc(t->nbytes), *b = malloc(t->nbytes);

		q3_synth_fill(t, 0, t->nbytes, a);
		memset(b, 0xa5, t->nbytes);
		for (uint64_t off = 0; off < t->nbytes;) {
			uint64_t n;
			seed = seed * 6364136223846793005ull + 1442695040888963407ull;
			n = 1 + (seed >> 33) % (i % 3 == 0 ? 13 : 70000);
			n = Q3_MIN(n, t->nbytes - off);
			q3_synth_fill(t, off, n, b + off);
			off += n;
		}
		if (memcmp(a, b, t->nbytes))
			fail_msg("tensor %s: pieces differ from the whole", t->name);
		free(a);
		free(b);
	}
	q3_synth_free(&s);
}

/* The g_idx of Linear `mod` (a module name) in plan s, filled: malloc'ed, K in *K; NULL if none. */
static int32_t *gidx_of(const struct q3_synth *s, const char *mod, int *K)
{
	char name[256];

	snprintf(name, sizeof(name), "%s.g_idx", mod);
	for (size_t i = 0; i < s->ntensors; i++)
		if (!strcmp(s->t[i].name, name)) {
			int32_t *g = malloc(s->t[i].nbytes);

			assert_non_null(g);
			q3_synth_fill(&s->t[i], 0, s->t[i].nbytes, g);
			*K = (int)s->t[i].shape[0];
			return g;
		}
	return NULL;
}

/* --act-order: every g_idx puts exactly group_size inputs in each group, scattered over the row
 * (not the sequential i / group of the default); without it, g_idx stays sequential.  The order
 * is the input's, as GPTQ's desc_act leaves it (sorted by the Hessian of what a Linear reads):
 * one for the Linears that read one input (q, k, v; an expert's gate and up; the shared
 * expert's), another for each other input (another expert's, a down projection's). */
static void test_act_order_g_idx_is_a_shuffled_grouping(void **state)
{
	for (int shuffled = 0; shuffled < 2; shuffled++) {
		struct q3_synth s;
		struct q3_synth_opts o = defaults("tiny");
		int ngidx = 0;

		o.dense_bits = 4;
		o.act_order = shuffled;
		plan(o, &s);
		for (size_t i = 0; i < s.ntensors; i++) {
			const struct q3_synth_tensor *t = &s.t[i];
			const char *dot = strrchr(t->name, '.');

			if (!dot || strcmp(dot, ".g_idx"))
				continue;
			const int K = (int)t->shape[0], G = o.group_size, ng = K / G;
			int32_t *g = malloc(t->nbytes);
			int *count = calloc(ng, sizeof(int)), seq = 0;

			assert_int_equal(t->dtype, Q3_DT_I32);
			q3_synth_fill(t, 0, t->nbytes, g);
			for (int k = 0; k < K; k++) {
				if (g[k] < 0 || g[k] >= ng)
					fail_msg("%s[%d] = %d: outside 0..%d", t->name, k, g[k], ng - 1);
				count[g[k]]++;
				seq += g[k] == k / G;
			}
			for (int j = 0; j < ng; j++)
				if (count[j] != G)
					fail_msg("%s: group %d has %d inputs, not %d", t->name, j, count[j], G);
			/* a random order leaves K / ng in place, give or take sqrt(K); one group has
			 * nothing to shuffle */
			if (shuffled && ng > 1 && seq > K / ng + K / 4)
				fail_msg("%s: %d of %d inputs in their sequential group", t->name, seq, K);
			if (!shuffled && seq != K)
				fail_msg("%s: not sequential without --act-order", t->name);
			ngidx++;
			free(g);
			free(count);
		}
		assert_true(ngidx > 10);
		if (shuffled) {
			/* pairs of one input, then of others, in the tiny preset (layer 3 full attention;
			 * the downs' 128 inputs are one group: nothing to order) */
			static const char *const one[][2] = {
				{ "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj" },
				{ "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj" },
				{ "model.layers.0.mlp.experts.1.gate_proj", "model.layers.0.mlp.experts.1.up_proj" },
				{ "model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj" },
			};
			static const char *const other[][2] = {
				{ "model.layers.0.mlp.experts.1.gate_proj", "model.layers.0.mlp.experts.2.gate_proj" },
				{ "model.layers.0.mlp.experts.1.gate_proj", "model.layers.1.mlp.experts.1.gate_proj" },
				{ "model.layers.0.mlp.experts.1.gate_proj", "model.layers.0.mlp.shared_expert.gate_proj" },
				{ "model.layers.0.linear_attn.in_proj_qkvz", "model.layers.1.linear_attn.in_proj_qkvz" },
			};
			for (int same = 0; same < 2; same++)
				for (size_t p = 0; p < (same ? Q3_ARRAY_SIZE(one) : Q3_ARRAY_SIZE(other)); p++) {
					const char *a = same ? one[p][0] : other[p][0], *b = same ? one[p][1] : other[p][1];
					int Ka = 0, Kb = 0;
					int32_t *ga = gidx_of(&s, a, &Ka), *gb = gidx_of(&s, b, &Kb);

					if (!ga || !gb)
						fail_msg("%s or %s: no g_idx", a, b);
					assert_int_equal(Ka, Kb);
					if (same != !memcmp(ga, gb, sizeof(int32_t) * Ka))
						fail_msg("%s and %s: %s order", a, b, same ? "not one" : "the same");
					free(ga);
					free(gb);
				}
		}
		q3_synth_free(&s);
	}
}

/* Loads a plan's tensors into a fake checkpoint table so that the reference dequant can read them. */
static struct q3_tensor as_tensor(const struct q3_synth_tensor *st)
{
	struct q3_tensor t = { .name = st->name, .dtype = st->dtype, .ndim = st->ndim, .nbytes = st->nbytes };

	memcpy(t.shape, st->shape, sizeof(t.shape));
	t.data = malloc(st->nbytes);
	q3_synth_fill(st, 0, st->nbytes, t.data);
	return t;
}

static const struct q3_synth_tensor *find(const struct q3_synth *s, const char *name)
{
	for (size_t i = 0; i < s->ntensors; i++)
		if (!strcmp(s->t[i].name, name))
			return &s->t[i];
	fail_msg("no tensor %s", name);
	return NULL;
}

/* RMS * sqrt(K) of a Linear's weight: the gain it was made with.  Also checks that the weights
 * have zero mean: a common bias grows, layer after layer, into the same output for every token. */
static double gain_of(const struct q3_synth *s, const char *mod, int K, int N, int bits)
{
	struct q3_linear l = { .K = K, .N = N, .bits = bits, .group_size = 128, .ngroups = K / 128,
			       .zero_offset = 1 };
	struct q3_tensor t[4];
	char name[256];
	float *W = malloc(sizeof(float) * (size_t)K * N);
	double ss = 0, sum = 0;

	if (bits == 16) {
		snprintf(name, sizeof(name), "%s.weight", mod);
		t[0] = as_tensor(find(s, name));
		l.fmt = Q3_W_DENSE;
		l.w = &t[0];
	} else {
		const char *part[3] = { "qweight", "qzeros", "scales" };
		for (int i = 0; i < 3; i++) {
			snprintf(name, sizeof(name), "%s.%s", mod, part[i]);
			t[i] = as_tensor(find(s, name));
		}
		l.fmt = Q3_W_GPTQ;
		l.qweight = &t[0], l.qzeros = &t[1], l.scales = &t[2];
	}
	q3_linear_dequant(&l, W);
	for (size_t i = 0; i < (size_t)K * N; i++) {
		ss += (double)W[i] * W[i];
		sum += W[i];
	}
	if (fabs(sum / ((double)K * N)) > 0.02 * sqrt(ss / ((double)K * N)))
		fail_msg("%s: weights have mean %g against RMS %g", mod, sum / ((double)K * N),
			 sqrt(ss / ((double)K * N)));
	for (int i = 0; i < (bits == 16 ? 1 : 3); i++)
		free(t[i].data);
	free(W);
	return sqrt(ss / ((double)K * N)) * sqrt((double)K);
}

static void test_weights_have_the_designed_rms(void **state)
{
	struct q3_synth s;
	struct q3_synth_opts o = defaults("tiny");
	double g;

	plan(o, &s);
	/* gain 1: gate/up of an expert (4-bit), in_proj_qkvz (BF16) */
	g = gain_of(&s, "model.layers.0.mlp.experts.3.gate_proj", 256, 128, 4);
	assert_true(fabs(g - 1.0) < 0.08);
	g = gain_of(&s, "model.layers.1.linear_attn.in_proj_qkvz", 256, 512, 16);
	assert_true(fabs(g - 1.0) < 0.05);
	/* the output projections are scaled down: each sub-layer adds ~0.15 RMS */
	g = gain_of(&s, "model.layers.0.mlp.experts.3.down_proj", 128, 256, 4);
	assert_true(g > 0.25 && g < 0.6);
	q3_synth_free(&s);
	o.dense_bits = 8;
	plan(o, &s);
	g = gain_of(&s, "model.layers.1.linear_attn.in_proj_qkvz", 256, 512, 8);
	assert_true(fabs(g - 1.0) < 0.08);
	q3_synth_free(&s);
}

/* Capped Zipf law: rate of rank r = min(1, c r^-s), summing to k. */
static double zipf_top1(int E, int k, double s)
{
	double lo = 0, hi = 1e6;

	for (int it = 0; it < 200; it++) {
		double c = (lo + hi) / 2, sum = 0;
		for (int r = 1; r <= E; r++)
			sum += fmin(1.0, c * pow(r, -s));
		*(sum > k ? &hi : &lo) = c;
	}
	return fmin(1.0, lo);
}

static void test_routing_skew_is_calibrated(void **state)
{
	struct q3_synth s;
	struct q3_synth_opts o = defaults("tiny");
	double prev = 0;

	o.experts = 64;
	for (double z = 0.4; z < 1.3; z += 0.4) {
		o.zipf = z;
		plan(o, &s);
		assert_true(fabs(s.zipf_top1 - zipf_top1(64, 4, z)) < 0.05);
		assert_true(s.zipf_top10 > prev); /* steeper law, more of the picks at the top */
		prev = s.zipf_top10;
		/* every layer gets the same biases, permuted: the largest is on the skew channel of
		 * the router rows and differs between layers only by the kappa scaling */
		for (int l = 0; l < s.arch.layers; l++) {
			float mx = -1e30f;
			int who = -1;
			for (int x = 0; x < 64; x++)
				if (s.router_bias[l * 64 + x] > mx)
					mx = s.router_bias[l * 64 + x], who = x;
			assert_true(who >= 0 && mx > 0);
		}
		q3_synth_free(&s);
	}
}

static int run_mkmodel(const char *a0, ...)
{
	char *argv[32];
	int argc = 0;
	va_list ap;

	argv[argc++] = "mkmodel";
	va_start(ap, a0);
	for (const char *a = a0; a && argc < 31; a = va_arg(ap, const char *))
		argv[argc++] = (char *)a;
	va_end(ap);
	argv[argc] = NULL;
	return cmd_mkmodel(argc, argv);
}

static void test_written_model_reads_back(void **state)
{
	char *d = tu_mkdtemp();
	struct q3_synth s;
	struct q3_synth_opts o = defaults("tiny");
	struct q3_ckpt *ck;
	struct q3_model *m;
	q3_err e;

	assert_int_equal(run_mkmodel("--preset", "tiny", "--out", d, "--dense", "q8", "--zipf", "1",
				     "--shard-size", "3MB", "--quiet", NULL), 0);
	if (q3_ckpt_open(d, &ck, &e) || q3_model_bind(ck, &m, &e) || q3_ckpt_map(ck, &e) ||
	    q3_model_check_data(m, &e))
		fail_msg("%s", e.msg);
	o.dense_bits = 8, o.zipf = 1, o.shard_size = 3ull << 20;
	plan(o, &s);
	assert_int_equal(ck->nshards, s.nshards);
	assert_true(ck->nshards > 1);
	assert_int_equal(ck->ntensors, s.ntensors);
	assert_int_equal(ck->total_bytes, s.tensor_bytes);
	for (size_t i = 0; i < s.ntensors; i++) {
		const struct q3_synth_tensor *st = &s.t[i];
		const struct q3_tensor *t = q3_ckpt_find(ck, st->name);
		uint8_t *want = malloc(st->nbytes);

		assert_non_null(t);
		assert_int_equal(t->nbytes, st->nbytes);
		assert_int_equal(t->off, st->off);
		assert_string_equal(ck->shards[t->shard].name, s.shards[st->shard].name);
		q3_synth_fill(st, 0, st->nbytes, want);
		if (memcmp(want, t->data, st->nbytes))
			fail_msg("tensor %s: file bytes differ from the description", st->name);
		free(want);
	}
	/* a second run into the same folder needs --force */
	assert_int_equal(run_mkmodel("--preset", "tiny", "--out", d, "--quiet", NULL), 1);
	assert_int_equal(run_mkmodel("--preset", "tiny", "--out", d, "--quiet", "--force", NULL), 0);
	q3_synth_free(&s);
	q3_model_free(m);
	q3_ckpt_close(ck);
	assert_int_equal(q3_ckpt_open(d, &ck, &e), 0);
	assert_int_equal(ck->nshards, 1); /* the old shards went */
	q3_ckpt_close(ck);
	tu_rm_rf(d);
	free(d);
}

/* A tiny synthetic model runs through the CPU engine: finite logits of the designed size (lm_head
 * gain 2: RMS about 2) that depend on the token (a model whose every position gives the same
 * logits is useless for benchmarks: the failure mode of weights with a common bias); again with
 * every Linear quantized and act-order (--act-order: desc_act in the config, shuffled g_idx). */
static void test_tiny_model_runs_on_the_cpu_engine(void **state)
{
	char *d = tu_mkdtemp();
	struct q3_engine_opts eo = { .model_dir = d, .backend = "cpu", .threads = 2, .max_ctx = 64,
				     .max_batch = 1, .quiet = true };
	struct q3_engine *eng;
	struct q3_session *ses;
	int32_t ids[8] = { 11, 2000, 37, 4000, 5, 1234, 999, 3 };
	const int T = 8;
	float *lg;
	int V;
	q3_err e;

	for (int ao = 0; ao < 2; ao++) { /* g_idx sequential, then shuffled (act-order) */
		assert_int_equal(run_mkmodel("--preset", "tiny", "--out", d, "--zipf", "0.8", "--quiet", "--force", "--dense",
					     ao ? "q4" : "bf16", ao ? "--act-order" : NULL, NULL), 0);
		if (q3_engine_open(&eo, &eng, &e) || q3_session_new(eng, &ses, &e))
			fail_msg("%s", e.msg);
		assert_int_equal(q3_engine_config(eng)->quant.base.desc_act, ao);
		V = q3_engine_config(eng)->vocab_size;
		lg = malloc(sizeof(float) * (size_t)T * V);
		if (q3_session_eval(ses, ids, T, lg, Q3_EVAL_ALL_LOGITS, &e))
			fail_msg("%s", e.msg);
		for (int t = 0; t < T; t++) {
			double ss = 0, dot = 0, s0 = 0;
			for (int v = 0; v < V; v++) {
				float x = lg[(size_t)t * V + v], x0 = lg[v];
				assert_true(isfinite(x));
				ss += (double)x * x, s0 += (double)x0 * x0, dot += (double)x * x0;
			}
			assert_true(sqrt(ss / V) > 0.5 && sqrt(ss / V) < 8);
			if (t) /* not the same direction as position 0 */
				assert_true(dot / sqrt(ss * s0) < 0.9);
		}
		free(lg);
		q3_session_free(ses);
		q3_engine_close(eng);
	}
	tu_rm_rf(d);
	free(d);
}

static void test_bad_options_are_refused(void **state)
{
	struct q3_synth s;
	struct q3_synth_opts o = defaults("tiny");
	q3_err e;

	o.preset = "huge";
	assert_int_equal(q3_synth_plan(&o, &s, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "--preset huge"));
	o = defaults("tiny");
	o.group_size = 96;
	assert_int_equal(q3_synth_plan(&o, &s, &e), -EINVAL);
	o = defaults("tiny");
	o.group_size = 512; /* more than the 256 inputs of the tiny Linears */
	assert_int_equal(q3_synth_plan(&o, &s, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "group size 512"));
	q3_synth_free(&s);
	assert_int_equal(run_mkmodel("--preset", "tiny", NULL), 2); /* no --out */
	assert_int_equal(run_mkmodel("--preset", "tiny", "--out", "/x", "--dense", "q5", NULL), 2);
	assert_int_equal(run_mkmodel("--preset", "tiny", "--out", "/x", "--no-g-idx", "--act-order", NULL), 2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_full_size_bytes_match_the_spec),
		cmocka_unit_test(test_fill_is_independent_of_the_cuts),
		cmocka_unit_test(test_act_order_g_idx_is_a_shuffled_grouping),
		cmocka_unit_test(test_weights_have_the_designed_rms),
		cmocka_unit_test(test_routing_skew_is_calibrated),
		cmocka_unit_test(test_written_model_reads_back),
		cmocka_unit_test(test_tiny_model_runs_on_the_cpu_engine),
		cmocka_unit_test(test_bad_options_are_refused),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
