/* test_cpu_moe.c - the threaded CPU share of a MoE layer (userspace/cpu_moe.h) against the same
 * experts run one by one on one thread (q3_xexpert_ffn, itself tested against the reference in
 * test_cpu_expert): every routing shape (decode, small and large batches, experts absent from
 * the table, a token with no CPU expert, repeated ids), sym and act-order experts, every thread
 * count giving the same bits, the gate/done handoff, and bad routing refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_moe.h"
#include "half.h"
#include "../tools/xsynth.h"

#define E 12
#define K 4

struct fixture {
	struct q3_xsynth *syn[E];
	void *blob[E];
	struct q3_xexpert x[E];
	const struct q3_xexpert *table[E];
	int H, I;
};

static void make_fixture(struct fixture *f, bool actorder, int H, int I)
{
	q3_err e = {0};

	memset(f, 0, sizeof(*f));
	f->H = H;
	f->I = I;
	for (int i = 0; i < E; i++) {
		struct q3_xsynth_opts o = {.H = H, .I = I, .G = i % 3 ? 128 : 32, .sym = i % 2 == 0,
					   .zero_offset = 1, .actorder = actorder && i % 4 != 1,
					   .seed = (uint64_t)(100 + i)};
		size_t sz;

		assert_int_equal(q3_xsynth_new(&o, &f->syn[i], &e), 0);
		sz = q3_xexpert_packed_size(&f->syn[i]->ex);
		f->blob[i] = aligned_alloc(64, sz);
		assert_int_equal(q3_xexpert_pack(&f->syn[i]->ex, f->blob[i], sz, &e), 0);
		assert_int_equal(q3_xexpert_view(&f->x[i], f->blob[i], sz, &e), 0);
		f->table[i] = i % 5 == 3 ? NULL : &f->x[i]; /* 3, 8: "in VRAM" */
	}
}

static void free_fixture(struct fixture *f)
{
	for (int i = 0; i < E; i++) {
		q3_xsynth_free(f->syn[i]);
		free(f->blob[i]);
	}
}

/* out[t] = Σ over the token's CPU experts, ascending id, of w · ffn(x[t]) */
static void reference(const struct fixture *f, enum q3_xisa isa, enum q3_xact_kind kind, int T,
		      const float *x, const int32_t *ids, const float *w, float *out)
{
	int H = f->H;
	float *y = malloc(sizeof(float) * (size_t)H);
	void *scr = aligned_alloc(64, Q3_ALIGN_UP(q3_xexpert_ffn_scratch(&f->x[0], 1, kind), 64));

	for (int t = 0; t < T; t++) {
		float *o = out + (size_t)t * H;

		memset(o, 0, sizeof(float) * (size_t)H);
		for (int id = 0; id < E; id++)
			for (int i = 0; i < K; i++) {
				if (ids[t * K + i] != id || !f->table[id])
					continue;
				q3_xexpert_ffn(isa, kind, f->table[id], x + (size_t)t * H, (size_t)H, 1, y,
					       (size_t)H, scr);
				for (int c = 0; c < H; c++)
					o[c] += w[t * K + i] * y[c];
			}
	}
	free(y);
	free(scr);
}

static void routing(int T, uint64_t *rng, int32_t *ids, float *w)
{
	for (int t = 0; t < T; t++)
		for (int i = 0; i < K; i++) {
			ids[t * K + i] = (int32_t)(q3_xrand(rng) % E);
			w[t * K + i] = (float)q3_xrandu(rng);
		}
	if (T > 2) { /* token 1: only VRAM experts */
		for (int i = 0; i < K; i++)
			ids[K + i] = i % 2 ? 3 : 8;
	}
}

static void check_calls(struct fixture *f, bool perms)
{
	static const int Ts[] = {1, 2, 5, 19, 40};
	enum q3_xisa isa = q3_xisa_best();
	uint64_t rng = 5;
	int H = f->H;

	for (int kind = 0; kind < 2; kind++)
		for (size_t ti = 0; ti < Q3_ARRAY_SIZE(Ts); ti++) {
			int T = Ts[ti];
			float *x = malloc(sizeof(float) * (size_t)T * H), *w = malloc(sizeof(float) * T * K);
			float *ref = malloc(sizeof(float) * (size_t)T * H), *first = NULL;
			int32_t *ids = malloc(sizeof(int32_t) * T * K);

			for (int i = 0; i < T * H; i++)
				x[i] = (float)(q3_xrandu(&rng) * 2 - 1);
			routing(T, &rng, ids, w);
			reference(f, isa, kind, T, x, ids, w, ref);
			for (int nw = 1; nw <= 3; nw++) {
				struct q3_xpool_opts po = {.nthreads = nw};
				struct q3_cpu_moe_opts mo = {.H = H, .I = f->I, .num_experts = E,
							     .top_k = K, .max_tokens = T, .isa = isa,
							     .act = kind, .perms = perms};
				struct q3_xpool *p;
				struct q3_cpu_moe *m;
				struct q3_cpu_moe_req r = {.T = T, .x = x, .ldx = (size_t)H, .ids = ids,
							   .w = w, .k = K, .experts = f->table,
							   .ldo = (size_t)H};
				q3_err e = {0};
				double err = 0, mag = 0;

				r.out = malloc(sizeof(float) * (size_t)T * H);
				memset(r.out, 0x7f, sizeof(float) * (size_t)T * H); /* garbage: overwritten */
				assert_int_equal(q3_xpool_new(&po, &p, &e), 0);
				assert_int_equal(q3_cpu_moe_new(p, &mo, &m, &e), 0);
				if (q3_cpu_moe_run(m, &r, &e))
					fail_msg("run: %s", e.msg);
				for (int i = 0; i < T * H; i++) {
					err = fmax(err, fabs(r.out[i] - ref[i]));
					mag = fmax(mag, fabs(ref[i]));
				}
				/* the same kernels in the same order as the one-expert path */
				if (!(err <= 1e-6 * mag))
					fail_msg("T=%d %d threads %s: max |out - ref| %.3g (|ref| %.3g)", T, nw,
						 kind ? "fp32" : "int8", err, mag);
				if (T > 2)
					for (int c = 0; c < H; c++)
						assert_true(r.out[H + c] == 0.0f);
				/* and the same bits whatever the thread count */
				if (!first)
					first = r.out;
				else {
					assert_memory_equal(first, r.out, sizeof(float) * (size_t)T * H);
					free(r.out);
				}
				q3_cpu_moe_free(m);
				q3_xpool_free(p);
			}
			free(first);
			free(x);
			free(w);
			free(ref);
			free(ids);
		}
}

static void test_sym_small(void **state)
{
	struct fixture f;

	make_fixture(&f, false, 256, 128);
	check_calls(&f, false);
	free_fixture(&f);
}

static void test_actorder(void **state)
{
	struct fixture f;

	make_fixture(&f, true, 256, 128);
	check_calls(&f, true);
	free_fixture(&f);
}

struct gpu_side {
	volatile uint32_t gate, done;
	float *x, *xsrc;
	int32_t *ids, *idsrc;
	float *w, *wsrc;
	int T, H;
};

static void *gpu_main(void *arg)
{
	struct gpu_side *g = arg;

	memcpy(g->x, g->xsrc, sizeof(float) * (size_t)g->T * g->H);
	memcpy(g->ids, g->idsrc, sizeof(int32_t) * g->T * K);
	memcpy(g->w, g->wsrc, sizeof(float) * g->T * K);
	__atomic_store_n(&g->gate, 42, __ATOMIC_RELEASE);
	while (__atomic_load_n(&g->done, __ATOMIC_ACQUIRE) != 43)
		;
	return NULL;
}

/* Armed before the routing exists; the "GPU" fills it and opens the gate. */
static void test_handoff(void **state)
{
	struct fixture f;
	enum { T = 3 };
	struct gpu_side g = {.T = T};
	struct q3_xpool_opts po = {.nthreads = 2};
	struct q3_cpu_moe_opts mo = {.I = 128, .num_experts = E, .top_k = K, .max_tokens = T,
				     .isa = q3_xisa_best(), .gate_timeout_s = 0.05};
	struct q3_xpool *p;
	struct q3_cpu_moe *m;
	struct q3_cpu_moe_stats st;
	q3_err e = {0};
	uint64_t rng = 9;
	pthread_t th;

	make_fixture(&f, false, 256, 128);
	g.H = mo.H = f.H;
	g.x = calloc((size_t)T * f.H, sizeof(float));
	g.xsrc = malloc(sizeof(float) * (size_t)T * f.H);
	g.ids = calloc(T * K, sizeof(int32_t));
	g.idsrc = malloc(sizeof(int32_t) * T * K);
	g.w = calloc(T * K, sizeof(float));
	g.wsrc = malloc(sizeof(float) * T * K);
	for (int i = 0; i < T * f.H; i++)
		g.xsrc[i] = (float)(q3_xrandu(&rng) - 0.5);
	routing(T, &rng, g.idsrc, g.wsrc);

	float *ref = malloc(sizeof(float) * (size_t)T * f.H), *out = malloc(sizeof(float) * T * f.H);
	struct q3_cpu_moe_req r = {.T = T, .x = g.x, .ldx = (size_t)f.H, .ids = g.ids, .w = g.w,
				   .k = K, .experts = f.table, .out = out, .ldo = (size_t)f.H};

	reference(&f, mo.isa, Q3_XACT_INT8, T, g.xsrc, g.idsrc, g.wsrc, ref);
	assert_int_equal(q3_xpool_new(&po, &p, &e), 0);
	assert_int_equal(q3_cpu_moe_new(p, &mo, &m, &e), 0);
	assert_int_equal(q3_cpu_moe_post(m, &r, &g.gate, 42, &g.done, 43, &e), 0);
	assert_int_equal(q3_cpu_moe_post(m, &r, &g.gate, 42, &g.done, 43, &e), -EBUSY);
	assert_int_equal(pthread_create(&th, NULL, gpu_main, &g), 0);
	assert_int_equal(q3_cpu_moe_wait(m, &e), 0);
	pthread_join(th, NULL);
	for (int i = 0; i < T * f.H; i++)
		assert_true(fabsf(out[i] - ref[i]) <= 1e-6f * (1.0f + fabsf(ref[i])));
	q3_cpu_moe_stats(m, &st);
	assert_int_equal(st.calls, 1);
	assert_true(st.bytes > 0 && st.experts > 0 && st.pairs >= st.experts);
	/* the phases split the busy time (each of them ran: activations, gate / up and down tasks) */
	assert_true(st.act_s > 0 && st.gateup_s > 0 && st.down_s > 0);
	assert_true(fabs(st.act_s + st.gateup_s + st.down_s - st.busy_s) <= 1e-9 + 1e-6 * st.busy_s);

	/* a gate that never opens */
	assert_int_equal(q3_cpu_moe_post(m, &r, &g.gate, 1000, &g.done, 44, &e), 0);
	assert_int_equal(q3_cpu_moe_wait(m, &e), -ETIMEDOUT);
	assert_int_equal(g.done, 44);
	/* bad routing, too many tokens */
	g.ids[5] = E;
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "out of range"));
	g.ids[5] = 0;
	r.T = T + 1;
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), -EINVAL);
	r.T = T;
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), 0);
	q3_cpu_moe_free(m);

	/* act-order experts on an executor made without perms */
	free_fixture(&f);
	make_fixture(&f, true, 256, 128);
	r.experts = f.table;
	assert_int_equal(q3_cpu_moe_new(p, &mo, &m, &e), 0);
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "act-order"));
	q3_cpu_moe_free(m);
	mo.isa = Q3_XISA_COUNT;
	assert_int_equal(q3_cpu_moe_new(p, &mo, &m, &e), -EINVAL);
	q3_xpool_free(p);
	free_fixture(&f);
	free(g.x);
	free(g.xsrc);
	free(g.ids);
	free(g.idsrc);
	free(g.w);
	free(g.wsrc);
	free(ref);
	free(out);
}

/* The GPU's layout: fp16 inputs, routing rows of k + 1 with the shared expert's -1 last; every
 * routed pair counted in the statistics. */
static void test_fp16_rows(void **state)
{
	enum { T = 4, LDK = K + 1 };
	struct fixture f;
	struct q3_xpool_opts po = {.nthreads = 2};
	struct q3_cpu_moe_opts mo = {.I = 128, .num_experts = E, .top_k = K, .max_tokens = T,
				     .isa = q3_xisa_best()};
	struct q3_xpool *p;
	struct q3_cpu_moe *m;
	struct q3_xstats *xs;
	q3_err e = {0};
	uint64_t rng = 21;
	int32_t ids[T * K], ids2[T * LDK];
	float w[T * K], w2[T * LDK];
	static double freq[3 * E];

	make_fixture(&f, false, 256, 128);
	mo.H = f.H;
	float *x = malloc(sizeof(float) * T * f.H), *ref = malloc(sizeof(float) * T * f.H);
	float *out = malloc(sizeof(float) * T * f.H);
	uint16_t *xh = malloc(sizeof(uint16_t) * T * f.H);

	/* fp16 rows, as the CUDA backend hands them over */
	for (int i = 0; i < T * f.H; i++) {
		xh[i] = q3_f32_to_f16((float)(q3_xrandu(&rng) - 0.5));
		x[i] = q3_f16_to_f32(xh[i]);
	}
	routing(T, &rng, ids, w);
	for (int t = 0; t < T; t++) {
		for (int i = 0; i < K; i++) {
			ids2[t * LDK + i] = ids[t * K + i];
			w2[t * LDK + i] = w[t * K + i];
		}
		ids2[t * LDK + K] = -1; /* the shared expert: not a routed pair */
		w2[t * LDK + K] = 0.5f;
	}
	reference(&f, mo.isa, Q3_XACT_INT8, T, x, ids, w, ref);
	assert_int_equal(q3_xstats_new(3, E, 0, 1, &xs, &e), 0);
	assert_int_equal(q3_xpool_new(&po, &p, &e), 0);
	assert_int_equal(q3_cpu_moe_new(p, &mo, &m, &e), 0);
	struct q3_cpu_moe_req r = {.T = T, .xh = xh, .ldx = (size_t)f.H, .ids = ids2, .w = w2, .k = K,
				   .ldk = LDK, .experts = f.table, .out = out, .ldo = (size_t)f.H,
				   .stats = xs, .layer = 2};

	assert_int_equal(q3_cpu_moe_run(m, &r, &e), 0);
	assert_memory_equal(out, ref, sizeof(float) * T * f.H);
	q3_xstats_tick(xs, T);
	q3_xstats_freq(xs, freq);
	for (int x2 = 0; x2 < E; x2++) {
		int n = 0;

		for (int i = 0; i < T * K; i++)
			n += ids[i] == x2;
		assert_true(fabs(freq[2 * E + x2] - (double)n / T) < 1e-9);
		assert_true(freq[x2] == 0);
	}
	struct q3_cpu_moe_stats st;

	q3_cpu_moe_stats(m, &st);
	assert_int_equal(st.pairs + st.skipped, T * K);
	/* graph padding: only the first stats_rows rows are counted */
	struct q3_xstats *xs2;

	assert_int_equal(q3_xstats_new(3, E, 0, 1, &xs2, &e), 0);
	r.stats = xs2;
	r.stats_rows = 1;
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), 0);
	q3_xstats_tick(xs2, 1);
	q3_xstats_freq(xs2, freq);
	for (int x2 = 0; x2 < E; x2++) {
		int n = 0;

		for (int i = 0; i < K; i++)
			n += ids[i] == x2;
		assert_true(fabs(freq[2 * E + x2] - n) < 1e-9);
	}
	q3_xstats_free(xs2);
	r.stats = xs;
	r.stats_rows = 0;
	/* out is rewritten by every call: a call whose rows route only to experts the CPU does not
	 * hold leaves zeros, not the previous call's sums */
	for (int t = 0; t < T; t++)
		for (int i = 0; i < K; i++)
			ids2[t * LDK + i] = i % 2 ? 3 : 8;
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), 0);
	for (int i = 0; i < T * f.H; i++)
		assert_true(out[i] == 0.0f);
	r.ldk = K - 1; /* rows shorter than k */
	assert_int_equal(q3_cpu_moe_run(m, &r, &e), -EINVAL);
	q3_cpu_moe_free(m);
	q3_xpool_free(p);
	q3_xstats_free(xs);
	free_fixture(&f);
	free(x);
	free(ref);
	free(out);
	free(xh);
}

/* req.elsewhere / keep: of a token's m routed experts in the table, the last min(n, m - keep) are
 * left to the GPU (it reads them over PCIe); the output is the reference over the rest, the
 * counts add up. */
static void test_elsewhere(void **state)
{
	enum { T = 6 };
	struct fixture f;
	struct q3_xpool_opts po = {.nthreads = 3};
	struct q3_cpu_moe_opts mo = {.I = 128, .num_experts = E, .top_k = K, .max_tokens = T,
				     .isa = q3_xisa_best()};
	struct q3_xpool *p;
	struct q3_cpu_moe *m;
	q3_err e = {0};
	uint64_t rng = 77;
	int32_t ids[T * K], kept[T * K];
	float w[T * K];

	(void)state;
	make_fixture(&f, false, 256, 128);
	mo.H = f.H;
	float *x = malloc(sizeof(float) * T * f.H), *ref = malloc(sizeof(float) * T * f.H);
	float *out = malloc(sizeof(float) * T * f.H);

	for (int i = 0; i < T * f.H; i++)
		x[i] = (float)(q3_xrandu(&rng) - 0.5);
	routing(T, &rng, ids, w);
	assert_int_equal(q3_xpool_new(&po, &p, &e), 0);
	assert_int_equal(q3_cpu_moe_new(p, &mo, &m, &e), 0);
	uint64_t left_total = 0;

	for (int call = 0; call < 2 * (K + 1); call++) {
		int n = call % (K + 1), keep = call / (K + 1) ? 2 : 0;
		struct q3_cpu_moe_req r = {.T = T, .x = x, .ldx = (size_t)f.H, .ids = ids, .w = w, .k = K,
					   .experts = f.table, .out = out, .ldo = (size_t)f.H, .elsewhere = n,
					   .keep = keep};
		struct q3_cpu_moe_stats st;
		int left = 0;

		/* the reference without the left ones: they become a VRAM expert (3), which it skips */
		for (int t = 0; t < T; t++) {
			int miss = 0;

			for (int i = 0; i < K; i++)
				miss += f.table[ids[t * K + i]] != NULL;
			int g = Q3_MIN(n, Q3_MAX(0, miss - keep));

			for (int i = 0, c = 0; i < K; i++) {
				int id = ids[t * K + i];

				kept[t * K + i] = id;
				if (f.table[id] && c++ >= miss - g) {
					kept[t * K + i] = 3;
					left++;
				}
			}
		}
		reference(&f, mo.isa, Q3_XACT_INT8, T, x, kept, w, ref);
		assert_int_equal(q3_cpu_moe_run(m, &r, &e), 0);
		for (int i = 0; i < T * f.H; i++)
			if (!(fabs(out[i] - ref[i]) <= 1e-6 * (1 + fabs(ref[i]))))
				fail_msg("elsewhere %d keep %d: out[%d] %g, reference %g", n, keep, i, out[i], ref[i]);
		left_total += (uint64_t)left;
		q3_cpu_moe_stats(m, &st);
		assert_int_equal(st.elsewhere, left_total);
		assert_int_equal(st.pairs + st.skipped + st.elsewhere, (uint64_t)(call + 1) * T * K);
		if (n == K && keep == 0) /* nothing left for the CPU */
			for (int i = 0; i < T * f.H; i++)
				assert_true(out[i] == 0.0f);
	}
	q3_cpu_moe_free(m);
	q3_xpool_free(p);
	free_fixture(&f);
	free(x);
	free(ref);
	free(out);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sym_small),
		cmocka_unit_test(test_actorder),
		cmocka_unit_test(test_handoff),
		cmocka_unit_test(test_fp16_rows),
		cmocka_unit_test(test_elsewhere),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
