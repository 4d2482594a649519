/* test_placement.c - the VRAM / RAM planner (userspace/placement.h) on the 80B shape (48 layers x
 * 512 experts of 1.67 MB, 2.4 GB of dense weights) with uniform, Zipf and mixed-size experts,
 * budgets from too small to everything, and RAM homes on the 1-, 2- and 4-node machines of
 * tests/fixtures/topology; the plan as loader homes on the fixtures.  Only invariants are
 * asserted (budget respected and filled, most used first, one RAM copy, nearest node first);
 * the expected hit rates are printed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "placement.h"
#include "testutil.h"
#include "../tools/xsynth.h"

#define L 48
#define E 512
#define EXPERT 1671168ull /* 2048x512x3 int4 g128 sym: codes + scales + zeros + g_idx */
#define DENSE (2400ull << 20)
#define GiB (1ull << 30)

static uint64_t bytes[L * E];
static double freq[L * E];

static void uniform_bytes(void)
{
	for (int i = 0; i < L * E; i++)
		bytes[i] = EXPERT;
}

/* Zipf(s) per layer over a random order of the experts. */
static void zipf(double s, uint64_t seed)
{
	uint64_t rng = seed;
	int perm[E];

	for (int l = 0; l < L; l++) {
		for (int x = 0; x < E; x++)
			perm[x] = x;
		for (int x = E - 1; x > 0; x--) {
			int j = (int)(q3_xrand(&rng) % (uint64_t)(x + 1)), t = perm[x];

			perm[x] = perm[j];
			perm[j] = t;
		}
		for (int r = 0; r < E; r++)
			freq[l * E + perm[r]] = 1.0 / pow(r + 1, s);
	}
}

static struct q3_place_in one_node(uint64_t budget, bool ram_all)
{
	static int order[1] = {0};
	static uint64_t cap[1] = {120 * GiB};

	return (struct q3_place_in){.nlayers = L, .nexperts = E, .expert_bytes = bytes,
				    .dense_bytes = DENSE, .vram_budget = budget, .ram_all = ram_all,
				    .nnodes = 1, .node_order = order, .node_capacity = cap};
}

/* Budget respected, and no non-resident expert would still fit. */
static void check_budget(const struct q3_place_in *in, const struct q3_place_plan *p)
{
	uint64_t used = in->dense_bytes, min_out = UINT64_MAX;
	int n = 0;

	for (int i = 0; i < L * E; i++) {
		if (p->vram[i]) {
			used += in->expert_bytes[i];
			n++;
		} else if (in->expert_bytes[i] < min_out)
			min_out = in->expert_bytes[i];
	}
	assert_true(used == p->vram_bytes);
	assert_int_equal(n, p->n_vram);
	assert_true(used <= in->vram_budget);
	if (min_out != UINT64_MAX)
		assert_true(used + min_out > in->vram_budget);
}

/* Every resident expert is used at least as much per byte as every non-resident one. */
static void check_most_used_first(const struct q3_place_in *in, const struct q3_place_plan *p)
{
	double min_in = INFINITY, max_out = 0;

	for (int i = 0; i < L * E; i++) {
		double d = (in->freq ? in->freq[i] : 1.0) / (double)in->expert_bytes[i];

		if (p->vram[i])
			min_in = fmin(min_in, d);
		else
			max_out = fmax(max_out, d);
	}
	if (p->n_vram && p->n_vram < L * E)
		assert_true(min_in >= max_out);
}

/* One RAM home per expert that needs one; nothing duplicated. */
static void check_ram(const struct q3_place_in *in, const struct q3_place_plan *p)
{
	uint64_t sum = 0, per[Q3_PLACE_MAX_NODES] = {0};

	for (int i = 0; i < L * E; i++) {
		bool need = in->ram_all || !p->vram[i];
		int k;

		if (!need) {
			assert_int_equal(p->ram_node[i], -1);
			continue;
		}
		for (k = 0; k < in->nnodes && in->node_order[k] != p->ram_node[i]; k++)
			;
		assert_true(k < in->nnodes);
		per[k] += in->expert_bytes[i];
		sum += in->expert_bytes[i];
	}
	assert_true(sum == p->ram_bytes);
	for (int k = 0; k < in->nnodes; k++) {
		assert_true(per[k] == p->node_bytes[k]);
		assert_true(per[k] <= in->node_capacity[k]);
		/* a farther node holds experts only when the nearer one is full */
		if (k > 0 && per[k] > 0)
			assert_true(per[k - 1] + EXPERT > in->node_capacity[k - 1]);
	}
}

static void test_uniform_budgets(void **state)
{
	static const uint64_t budgets[] = {DENSE, 8 * GiB, 20 * GiB, 22 * GiB, 60 * GiB};

	uniform_bytes();
	for (size_t b = 0; b < Q3_ARRAY_SIZE(budgets); b++) {
		struct q3_place_in in = one_node(budgets[b], true);
		struct q3_place_plan p;
		q3_err e = {0};
		int per_layer[L] = {0}, lo = E, hi = 0;

		assert_int_equal(q3_place_plan(&in, &p, &e), 0);
		check_budget(&in, &p);
		check_ram(&in, &p);
		for (int i = 0; i < L * E; i++)
			per_layer[i / E] += p.vram[i];
		for (int l = 0; l < L; l++) {
			lo = per_layer[l] < lo ? per_layer[l] : lo;
			hi = per_layer[l] > hi ? per_layer[l] : hi;
		}
		/* uniform use: the same share in every layer */
		assert_true(hi - lo <= 1);
		assert_true(fabs(p.hit - (double)p.n_vram / (L * E)) < 1e-9);
		printf("# uniform, budget %5.1f GiB: %5d experts in VRAM (%4.1f%%), %d..%d per layer, "
		       "RAM %.1f GiB\n",
		       (double)budgets[b] / GiB, p.n_vram, 100.0 * p.n_vram / (L * E), lo, hi,
		       (double)p.ram_bytes / GiB);
		q3_place_plan_free(&p);
	}
}

static void test_zipf(void **state)
{
	static const double s[] = {0.5, 1.0, 1.2};

	uniform_bytes();
	for (size_t i = 0; i < Q3_ARRAY_SIZE(s); i++) {
		struct q3_place_in in = one_node(20 * GiB, false);
		struct q3_place_plan p;
		q3_err e = {0};

		zipf(s[i], 7 + i);
		in.freq = freq;
		assert_int_equal(q3_place_plan(&in, &p, &e), 0);
		check_budget(&in, &p);
		check_most_used_first(&in, &p);
		check_ram(&in, &p);
		assert_true(p.hit > (double)p.n_vram / (L * E)); /* skew helps */
		assert_true(p.hit_layer_min <= p.hit);
		printf("# Zipf %.1f, 20 GiB: %d in VRAM, expected hit %.1f%% (worst layer %.1f%%)\n", s[i],
		       p.n_vram, 100 * p.hit, 100 * p.hit_layer_min);
		q3_place_plan_free(&p);
	}
}

/* Mixed sizes (an 8-bit expert recipe in some layers): use per byte decides. */
static void test_mixed_sizes(void **state)
{
	struct q3_place_in in = one_node(12 * GiB, true);
	struct q3_place_plan p;
	q3_err e = {0};

	zipf(1.0, 3);
	for (int i = 0; i < L * E; i++)
		bytes[i] = (i / E) % 3 == 0 ? 2 * EXPERT : EXPERT;
	in.freq = freq;
	assert_int_equal(q3_place_plan(&in, &p, &e), 0);
	check_budget(&in, &p);
	check_most_used_first(&in, &p);
	check_ram(&in, &p);
	q3_place_plan_free(&p);
}

static void test_refusals(void **state)
{
	struct q3_place_in in;
	struct q3_place_plan p;
	q3_err e = {0};

	uniform_bytes();
	in = one_node(DENSE - 1, true);
	assert_int_equal(q3_place_plan(&in, &p, &e), -ENOSPC);
	assert_non_null(strstr(e.msg, "dense"));
	in = one_node(20 * GiB, true);
	in.node_capacity = (uint64_t[]){30 * GiB};
	assert_int_equal(q3_place_plan(&in, &p, &e), -ENOSPC);
	assert_non_null(strstr(e.msg, "RAM homes"));
	printf("# %s\n", e.msg);
	assert_null(p.vram);
	/* without ram_all, the 30 GiB hold the CPU experts */
	in.ram_all = false;
	assert_int_equal(q3_place_plan(&in, &p, &e), 0);
	check_ram(&in, &p);
	q3_place_plan_free(&p);
	in.nlayers = 0;
	assert_int_equal(q3_place_plan(&in, &p, &e), -EINVAL);
	in.nlayers = L;
	in.freq = freq;
	freq[5] = NAN;
	assert_int_equal(q3_place_plan(&in, &p, &e), -EINVAL);
	freq[5] = 1;
	bytes[7] = 0;
	assert_int_equal(q3_place_plan(&in, &p, &e), -EINVAL);
	uniform_bytes();
}

/* RAM homes on the fixture machines, nearest the GPU first. */
/* Experts of different sizes: one that no longer fits the nearest node sends only itself
 * farther; a smaller one after it still takes the room left near the GPU. */
static void test_spill_only_when_full(void **state)
{
	static const uint64_t sizes[3] = {60, 50, 30}, cap[2] = {100, 1000};
	static const double use[3] = {3, 2, 1}; /* placed in this order */
	static const int order[2] = {5, 7};
	struct q3_place_in in = {.nlayers = 1, .nexperts = 3, .expert_bytes = sizes, .freq = use,
				 .dense_bytes = 1000, .vram_budget = 1000, .ram_all = true, .nnodes = 2,
				 .node_order = order, .node_capacity = cap};
	struct q3_place_plan p;
	q3_err e = {0};

	assert_int_equal(q3_place_plan(&in, &p, &e), 0);
	assert_int_equal(p.n_vram, 0);
	assert_int_equal(p.ram_node[0], 5);
	assert_int_equal(p.ram_node[1], 7); /* 60 + 50 > 100 */
	assert_int_equal(p.ram_node[2], 5); /* 60 + 30 <= 100: back to the nearest node */
	assert_true(p.node_bytes[0] == 90 && p.node_bytes[1] == 50);
	q3_place_plan_free(&p);
}

static void test_numa(void **state)
{
	static const struct {
		const char *xml;
		int gpu_node;
		int order[4];
	} m[] = {
		{"1node.xml", 0, {0}},
		{"2node.xml", 1, {1, 0}},
		{"4node.xml", 2, {2, 3, 0, 1}},
	};

	uniform_bytes();
	zipf(1.0, 11);
	for (size_t i = 0; i < Q3_ARRAY_SIZE(m); i++) {
		char path[128];
		struct q3_topo *t;
		struct q3_locality loc;
		struct q3_place_plan p;
		q3_err e = {0};
		int order[4], n, cpus[64], ncpu;
		uint64_t cap[4];

		snprintf(path, sizeof(path), "tests/fixtures/topology/%s", m[i].xml);
		assert_int_equal(q3_topo_load(path, &t, &e), 0);
		assert_int_equal(q3_topo_pci_locality(t, "0000:c1:00.0", &loc, &e), 0);
		assert_int_equal(loc.node, m[i].gpu_node);
		n = q3_topo_node_order(t, loc.node, order, 4);
		assert_memory_equal(order, m[i].order, sizeof(int) * (size_t)n);
		q3_place_capacity_from_topo(t, order, n, 0.25, cap);

		struct q3_place_in in = {.nlayers = L, .nexperts = E, .expert_bytes = bytes,
					 .freq = freq, .dense_bytes = DENSE, .vram_budget = 20 * GiB,
					 .ram_all = true, .nnodes = n, .node_order = order,
					 .node_capacity = cap};

		assert_int_equal(q3_place_plan(&in, &p, &e), 0);
		check_budget(&in, &p);
		check_ram(&in, &p);
		/* the experts the CPU computes sit no farther than the VRAM experts' copies */
		int far_cpu = 0, near_vram = n;

		for (int x = 0; x < L * E; x++)
			for (int k = 0; k < n; k++)
				if (order[k] == p.ram_node[x]) {
					if (!p.vram[x] && k > far_cpu)
						far_cpu = k;
					if (p.vram[x] && k < near_vram)
						near_vram = k;
				}
		assert_true(far_cpu <= near_vram);
		ncpu = q3_place_cpus(t, loc.node, 1, cpus, 64);
		assert_int_equal(ncpu, q3_topo_node_os(t, loc.node)->ncores - 1);
		printf("# %s: GPU on node %d; expert homes:", m[i].xml, loc.node);
		for (int k = 0; k < n; k++)
			printf(" node %d %.1f GiB", order[k], (double)p.node_bytes[k] / GiB);
		printf("; %d expert threads from cpu %d\n", ncpu, cpus[0]);
		if (i == 2) /* node 2 holds 12 GiB: the rest spills to 3, then 0 */
			assert_true(p.node_bytes[0] > 0 && p.node_bytes[1] > 0);
		q3_place_plan_free(&p);
		q3_topo_free(t);
	}
}

/* The plan as loader homes, on a fixture: VRAM tensor bytes are the plan's VRAM bytes. */
static void test_homes(void **state)
{
	struct q3_ckpt *ck;
	struct q3_model *m;
	q3_err e = {0};

	if (q3_ckpt_open("tests/fixtures/models/tiny-sym", &ck, &e) || q3_model_bind(ck, &m, &e))
		fail_msg("%s", e.msg);
	int nl = m->cfg->num_layers, ne = m->cfg->num_experts, order[1] = {0};
	uint64_t *xb = malloc(sizeof(uint64_t) * nl * ne), cap[1] = {1ull << 40}, dense, sum = 0;
	uint8_t *home = malloc(ck->ntensors);
	struct q3_place_plan p;

	for (int l = 0; l < nl; l++)
		for (int x = 0; x < ne; x++)
			xb[l * ne + x] = q3_place_expert_bytes(&m->layers[l].experts[x]);
	dense = q3_place_dense_bytes(m, false);
	assert_true(dense < q3_place_dense_bytes(m, true)); /* untied: the embedding may stay in RAM */

	struct q3_place_in in = {.nlayers = nl, .nexperts = ne, .expert_bytes = xb,
				 .dense_bytes = dense, .vram_budget = dense + 5 * xb[0] + 100,
				 .ram_all = false, .nnodes = 1, .node_order = order, .node_capacity = cap};

	assert_int_equal(q3_place_plan(&in, &p, &e), 0);
	assert_int_equal(p.n_vram, 5);
	q3_place_homes(m, &p, false, home);
	for (size_t i = 0; i < ck->ntensors; i++)
		if (home[i])
			sum += ck->tensors[i].nbytes;
	assert_true(sum == p.vram_bytes);
	q3_place_plan_free(&p);
	/* with RAM copies of everything, the loader puts every expert in RAM */
	in.ram_all = true;
	assert_int_equal(q3_place_plan(&in, &p, &e), 0);
	q3_place_homes(m, &p, false, home);
	sum = 0;
	for (size_t i = 0; i < ck->ntensors; i++)
		if (home[i])
			sum += ck->tensors[i].nbytes;
	assert_true(sum == dense);
	q3_place_plan_free(&p);
	free(xb);
	free(home);
	q3_model_free(m);
	q3_ckpt_close(ck);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_uniform_budgets), cmocka_unit_test(test_zipf),
		cmocka_unit_test(test_mixed_sizes),	cmocka_unit_test(test_refusals),
		cmocka_unit_test(test_spill_only_when_full),
		cmocka_unit_test(test_numa),		cmocka_unit_test(test_homes),
	};

	/* One topology alive for the whole run, so that hwloc loads its plugins once: unloading and
	 * reloading them (the last topology freed, a new one made) trips LeakSanitizer on the
	 * plugins' thread-local storage. */
	struct q3_topo *anchor = NULL;
	q3_err e;
	int rc;

	q3_topo_load_synthetic("numa:1 core:1", &anchor, &e);
	rc = cmocka_run_group_tests(tests, NULL, NULL);
	q3_topo_free(anchor);
	return rc;
}
