/* test_expert_stats.c - expert use statistics (userspace/expert_stats.h): decay, the file (round
 * trip; corrupt, truncated, foreign files refused without touching the counts), and the VRAM
 * cache they drive on synthetic Zipf routing streams of the 80B shape (48 layers, 512 experts,
 * top-10): the planned cache next to an LRU cache of the same size, a workload shift followed by
 * re-balancing, and the re-balance invariants.  Hit rates are printed; only invariants (and the
 * planned cache beating LRU and a stale plan by a wide margin) are asserted. */
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

#include <fcntl.h>
#include <unistd.h>

#include "checkpoint.h"
#include "expert_stats.h"
#include "placement.h"
#include "testutil.h"
#include "../tools/xsynth.h"

#define L 48
#define E 512
#define K 10
#define N (L * E)
#define SLOTS 11344 /* experts a 20 GiB budget holds (test_placement) */

/* ---- routing streams ------------------------------------------------------------------------ */

struct zipf {
	double cdf[L][E];
	int perm[L][E]; /* rank -> expert */
	uint64_t rng;
};

static void zipf_init(struct zipf *z, double s, uint64_t seed)
{
	z->rng = seed;
	for (int l = 0; l < L; l++) {
		double acc = 0;

		for (int x = 0; x < E; x++)
			z->perm[l][x] = x;
		for (int x = E - 1; x > 0; x--) {
			int j = (int)(q3_xrand(&z->rng) % (uint64_t)(x + 1)), t = z->perm[l][x];

			z->perm[l][x] = z->perm[l][j];
			z->perm[l][j] = t;
		}
		for (int r = 0; r < E; r++)
			z->cdf[l][r] = (acc += 1.0 / pow(r + 1, s));
		for (int r = 0; r < E; r++)
			z->cdf[l][r] /= acc;
	}
}

/* k distinct experts of layer l */
static void route(struct zipf *z, int l, int32_t *ids)
{
	for (int i = 0; i < K; i++) {
		int dup;

		do {
			double u = q3_xrandu(&z->rng);
			int lo = 0, hi = E - 1;

			while (lo < hi) {
				int mid = (lo + hi) / 2;

				if (z->cdf[l][mid] < u)
					lo = mid + 1;
				else
					hi = mid;
			}
			ids[i] = z->perm[l][lo];
			dup = 0;
			for (int j = 0; j < i; j++)
				dup |= ids[j] == ids[i];
		} while (dup);
	}
}

/* ---- an LRU cache of (layer, expert) ----------------------------------------------------------- */

struct lru {
	int prev[N], next[N], head, tail, size, cap;
	uint8_t in[N];
};

static void lru_init(struct lru *c, int cap)
{
	memset(c, 0, sizeof(*c));
	c->head = c->tail = -1;
	c->cap = cap;
}

static void lru_unlink(struct lru *c, int i)
{
	if (c->prev[i] >= 0)
		c->next[c->prev[i]] = c->next[i];
	else
		c->head = c->next[i];
	if (c->next[i] >= 0)
		c->prev[c->next[i]] = c->prev[i];
	else
		c->tail = c->prev[i];
}

static void lru_push_front(struct lru *c, int i)
{
	c->prev[i] = -1;
	c->next[i] = c->head;
	if (c->head >= 0)
		c->prev[c->head] = i;
	c->head = i;
	if (c->tail < 0)
		c->tail = i;
}

static bool lru_access(struct lru *c, int i)
{
	if (c->in[i]) {
		lru_unlink(c, i);
		lru_push_front(c, i);
		return true;
	}
	if (c->size == c->cap) {
		int v = c->tail;

		lru_unlink(c, v);
		c->in[v] = 0;
		c->size--;
	}
	lru_push_front(c, i);
	c->in[i] = 1;
	c->size++;
	return false;
}

/* ---- the planned cache ---------------------------------------------------------------------- */

static uint64_t xbytes[N];

static void plan_from_stats(const struct q3_xstats *s, uint8_t *resident)
{
	static double freq[N];
	static const int order[1] = {0};
	static const uint64_t cap[1] = {1ull << 40};
	struct q3_place_plan p;
	q3_err e = {0};

	for (int i = 0; i < N; i++)
		xbytes[i] = 1000;
	q3_xstats_freq(s, freq);
	struct q3_place_in in = {.nlayers = L, .nexperts = E, .expert_bytes = xbytes, .freq = freq,
				 .vram_budget = (uint64_t)SLOTS * 1000, .ram_all = true, .nnodes = 1,
				 .node_order = order, .node_capacity = cap};

	assert_int_equal(q3_place_plan(&in, &p, &e), 0);
	assert_int_equal(p.n_vram, SLOTS);
	memcpy(resident, p.vram, N);
	q3_place_plan_free(&p);
}

static int count_resident(const uint8_t *r)
{
	int n = 0;

	for (int i = 0; i < N; i++)
		n += r[i];
	return n;
}

/* Runs ntok tokens: counts stats, scores the planned cache and the LRU cache. */
static void run_tokens(struct zipf *z, int ntok, struct q3_xstats *s, const uint8_t *resident,
		       struct lru *lru, uint64_t *hits_plan, uint64_t *hits_lru, uint64_t *uses)
{
	int32_t ids[K];

	for (int t = 0; t < ntok; t++) {
		for (int l = 0; l < L; l++) {
			route(z, l, ids);
			if (s)
				q3_xstats_add(s, l, ids, K);
			for (int i = 0; i < K; i++) {
				int idx = l * E + ids[i];

				if (resident)
					*hits_plan += resident[idx];
				if (lru)
					*hits_lru += lru_access(lru, idx);
				(*uses)++;
			}
		}
		if (s)
			q3_xstats_tick(s, 1);
	}
}

static void test_planned_vs_lru(void **state)
{
	static struct zipf z;
	static struct lru lru;
	static uint8_t resident[N];
	struct q3_xstats *s;
	q3_err e = {0};
	double rates[3];
	static const double skew[3] = {0.6, 1.0, 1.2};

	for (int k = 0; k < 3; k++) {
		uint64_t hp = 0, hl = 0, uses = 0, dummy = 0;

		zipf_init(&z, skew[k], 1000 + k);
		lru_init(&lru, SLOTS);
		assert_int_equal(q3_xstats_new(L, E, 0, 1, &s, &e), 0);
		/* warm-up: stats for the plan, and the LRU cache fills */
		run_tokens(&z, 2000, s, NULL, &lru, &dummy, &dummy, &uses);
		plan_from_stats(s, resident);
		uses = 0;
		run_tokens(&z, 3000, NULL, resident, &lru, &hp, &hl, &uses);
		rates[k] = (double)hp / uses;
		printf("# Zipf %.1f, %d of %d experts cached: planned %.1f%%, LRU %.1f%%, uniform %.1f%%\n",
		       skew[k], SLOTS, N, 100.0 * hp / uses, 100.0 * hl / uses, 100.0 * SLOTS / N);
		assert_true(hp > hl);
		assert_true(rates[k] > (double)SLOTS / N);
		q3_xstats_free(s);
	}
	assert_true(rates[0] < rates[1] && rates[1] < rates[2]);
}

/* The workload changes; re-balancing every 250 tokens follows it, a stale plan does not. */
static void test_shift_and_rebalance(void **state)
{
	static struct zipf a, b;
	static uint8_t planned[N], stale[N];
	struct q3_xstats *s;
	q3_err e = {0};
	struct q3_rebalance_opts ro = {.hysteresis = 0.25, .z = 3, .min_tokens = 100,
				       .max_bytes = 2000 * 1000};
	static struct q3_swap swaps[N];
	uint64_t uses = 0, dummy = 0, h_reb = 0, h_stale = 0, u_last = 0;
	int rounds = 0, swaps_first = 0, swaps_last = 0;
	static double freq[N];

	zipf_init(&a, 1.0, 77);
	zipf_init(&b, 1.0, 78); /* other experts are hot */
	assert_int_equal(q3_xstats_new(L, E, 1000, 1, &s, &e), 0);
	run_tokens(&a, 2000, s, NULL, NULL, &dummy, &dummy, &uses);
	plan_from_stats(s, planned);
	memcpy(stale, planned, N);
	for (int round = 0; round < 24; round++) {
		uint64_t hr = 0, u = 0;
		int ns;

		run_tokens(&b, 250, s, planned, NULL, &hr, &dummy, &u);
		ns = q3_xstats_rebalance(s, planned, xbytes, &ro, swaps, N);
		q3_xstats_freq(s, freq);
		for (int i = 0; i < ns; i++) {
			int in = swaps[i].layer_in * E + swaps[i].expert_in;
			int out = swaps[i].layer_out * E + swaps[i].expert_out;

			assert_int_equal(planned[in], 0);
			assert_int_equal(planned[out], 1);
			assert_true(freq[in] > freq[out] * (1 + ro.hysteresis));
			assert_true(freq[in] - freq[out] > 0);
			planned[in] = 1;
			planned[out] = 0;
		}
		assert_int_equal(count_resident(planned), SLOTS); /* capacity never exceeded */
		assert_true((uint64_t)ns * 1000 <= ro.max_bytes);
		if (round < 4)
			swaps_first += ns;
		if (round >= 20) {
			swaps_last += ns;
			/* the last rounds: measure both caches on the new workload */
			uint64_t u2 = 0;

			run_tokens(&b, 200, NULL, planned, NULL, &h_reb, &dummy, &u2);
			run_tokens(&b, 200, NULL, stale, NULL, &h_stale, &dummy, &u_last);
		}
		rounds++;
	}
	printf("# workload shift: re-balanced cache %.1f%%, stale plan %.1f%%; swaps in the first 4 "
	       "rounds %d, in the last 4 %d (cache %d)\n",
	       100.0 * h_reb / u_last, 100.0 * h_stale / u_last, swaps_first, swaps_last, SLOTS);
	assert_true(h_reb > h_stale + u_last / 10);
	assert_true(swaps_last < swaps_first);
	q3_xstats_free(s);
}

/* Stationary routing: once the cache matches, hysteresis keeps it still. */
static void test_no_thrash(void **state)
{
	static struct zipf z;
	static uint8_t planned[N];
	static struct q3_swap swaps[N];
	struct q3_xstats *s;
	q3_err e = {0};
	struct q3_rebalance_opts ro = {.hysteresis = 0.25, .z = 3, .min_tokens = 100};
	uint64_t uses = 0, dummy = 0;
	int total = 0;

	zipf_init(&z, 1.0, 5);
	assert_int_equal(q3_xstats_new(L, E, 4000, 1, &s, &e), 0);
	run_tokens(&z, 3000, s, NULL, NULL, &dummy, &dummy, &uses);
	plan_from_stats(s, planned);
	for (int round = 0; round < 8; round++) {
		int ns;

		run_tokens(&z, 250, s, NULL, NULL, &dummy, &dummy, &uses);
		ns = q3_xstats_rebalance(s, planned, xbytes, &ro, swaps, N);
		for (int i = 0; i < ns; i++) {
			planned[swaps[i].layer_in * E + swaps[i].expert_in] = 1;
			planned[swaps[i].layer_out * E + swaps[i].expert_out] = 0;
		}
		total += ns;
	}
	printf("# stationary Zipf 1.0: %d swaps in 8 rounds of 250 tokens (cache %d)\n", total, SLOTS);
	assert_true(total < SLOTS / 50);
	/* no evidence yet: no change */
	ro.min_tokens = 1e9;
	assert_int_equal(q3_xstats_rebalance(s, planned, xbytes, &ro, swaps, N), 0);
	q3_xstats_free(s);
}

static void test_decay(void **state)
{
	struct q3_xstats *s;
	q3_err e = {0};
	int32_t a = 3, b = 4;
	static double f[N];

	assert_int_equal(q3_xstats_new(L, E, 100, 1, &s, &e), 0);
	for (int t = 0; t < 1000; t++) {
		q3_xstats_add(s, 0, &a, 1);
		q3_xstats_tick(s, 1);
	}
	for (int t = 0; t < 1000; t++) {
		q3_xstats_add(s, 0, &b, 1);
		q3_xstats_tick(s, 1);
	}
	q3_xstats_freq(s, f);
	/* a's last use is 1000 tokens (10 half-lives) older than b's */
	assert_true(fabs(f[3] / f[4] / exp2(-10) - 1) < 0.05);
	assert_true(fabs(f[4] - 1.0) < 0.01); /* b: used by every recent token */
	/* ids out of range and layers out of range are ignored */
	int32_t bad[3] = {-1, E, 5};
	q3_xstats_add(s, L, bad, 3);
	q3_xstats_add(s, 1, bad, 3);
	q3_xstats_freq(s, f);
	assert_true(f[E + 5] > 0);
	/* long runs rescale without overflow */
	for (int i = 0; i < 100; i++)
		q3_xstats_tick(s, 100000);
	q3_xstats_add(s, 2, &a, 1);
	q3_xstats_tick(s, 1);
	q3_xstats_freq(s, f);
	assert_true(isfinite(f[2 * E + 3]) && f[2 * E + 3] > 0.5);
	assert_true(isfinite(q3_xstats_tokens(s)));
	q3_xstats_free(s);
	assert_int_equal(q3_xstats_new(0, E, 1, 1, &s, &e), -EINVAL);
}

static void corrupt_at(const char *path, const char *copy, size_t off, unsigned char x)
{
	size_t n = 0;
	char *b = tu_read_file(path, &n);

	assert_non_null(b);
	if (off < n)
		b[off] ^= (char)x;
	assert_int_equal(tu_write_file(copy, b, n), 0);
	free(b);
}

static void test_file(void **state)
{
	char *dir = tu_mkdtemp(), path[256], bad[256];
	struct q3_xstats *s, *t;
	q3_err e = {0};
	static struct zipf z;
	static double f1[N], f2[N];
	uint64_t d = 0;
	size_t n = 0;

	snprintf(path, sizeof(path), "%s/experts.stats", dir);
	snprintf(bad, sizeof(bad), "%s/bad.stats", dir);
	zipf_init(&z, 1.0, 9);
	assert_int_equal(q3_xstats_new(L, E, 5000, 0xabcdef, &s, &e), 0);
	run_tokens(&z, 300, s, NULL, NULL, &d, &d, &d);
	assert_int_equal(q3_xstats_save(s, path, &e), 0);
	/* round trip */
	assert_int_equal(q3_xstats_new(L, E, 5000, 0xabcdef, &t, &e), 0);
	assert_int_equal(q3_xstats_load(t, path, &e), 0);
	q3_xstats_freq(s, f1);
	q3_xstats_freq(t, f2);
	for (int i = 0; i < N; i++)
		assert_true(fabs(f1[i] - f2[i]) <= 1e-6 * (f1[i] + 1e-3));
	assert_true(fabs(q3_xstats_tokens(s) - q3_xstats_tokens(t)) < 1e-6 * q3_xstats_tokens(s));
	q3_xstats_free(t);

	/* refusals leave the counts alone */
	assert_int_equal(q3_xstats_new(L, E, 5000, 0xabcdef, &t, &e), 0);
	{
		static const size_t offs[] = {0, 9, 13, 25, 40, 48 + 4 * 1000, 48 + 4 * N + 3};

		for (size_t i = 0; i < Q3_ARRAY_SIZE(offs); i++) {
			corrupt_at(path, bad, offs[i], 0x41);
			assert_int_equal(q3_xstats_load(t, bad, &e), -EINVAL);
		}
	}
	printf("# corrupt file: %s\n", e.msg);
	char *b = tu_read_file(path, &n);

	assert_non_null(b);
	assert_int_equal(tu_write_file(bad, b, n - 100), 0); /* truncated */
	assert_int_equal(q3_xstats_load(t, bad, &e), -EINVAL);
	assert_int_equal(tu_write_file(bad, b, 10), 0);
	assert_int_equal(q3_xstats_load(t, bad, &e), -EINVAL);
	free(b);
	assert_int_equal(q3_xstats_load(t, "/nonexistent/experts.stats", &e), -ENOENT);
	assert_true(q3_xstats_tokens(t) == 0);
	q3_xstats_free(t);
	/* another model: fingerprint, shape */
	assert_int_equal(q3_xstats_new(L, E, 5000, 0x123, &t, &e), 0);
	assert_int_equal(q3_xstats_load(t, path, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "another model"));
	q3_xstats_free(t);
	assert_int_equal(q3_xstats_new(L, E / 2, 5000, 0xabcdef, &t, &e), 0);
	assert_int_equal(q3_xstats_load(t, path, &e), -EINVAL);
	q3_xstats_free(t);
	/* saving over an unwritable place fails with the path */
	assert_int_equal(q3_xstats_save(s, "/nonexistent/dir/x.stats", &e), -ENOENT);
	assert_non_null(strstr(e.msg, "/nonexistent/dir/x.stats"));
	q3_xstats_free(s);
	unlink(path);
	unlink(bad);
	rmdir(dir);
	free(dir);
}

/* Per-layer caches (the CUDA backend's stacks): swaps stay within a layer, so every layer keeps
 * its number of resident experts, and the cache still follows a shift. */
static void test_same_layer(void **state)
{
	static struct zipf a, b;
	static uint8_t planned[N];
	static struct q3_swap swaps[N];
	struct q3_xstats *s;
	q3_err e = {0};
	struct q3_rebalance_opts ro = {.hysteresis = 0.25, .z = 3, .min_tokens = 100, .same_layer = true};
	uint64_t uses = 0, dummy = 0, h0 = 0, h1 = 0, u0 = 0, u1 = 0;
	int per_layer[L] = {0}, total = 0;

	zipf_init(&a, 1.0, 31);
	zipf_init(&b, 1.0, 32);
	assert_int_equal(q3_xstats_new(L, E, 1000, 1, &s, &e), 0);
	run_tokens(&a, 1500, s, NULL, NULL, &dummy, &dummy, &uses);
	plan_from_stats(s, planned);
	for (int i = 0; i < N; i++)
		per_layer[i / E] += planned[i];
	run_tokens(&b, 200, NULL, planned, NULL, &h0, &dummy, &u0);
	for (int round = 0; round < 12; round++) {
		int ns;

		run_tokens(&b, 250, s, NULL, NULL, &dummy, &dummy, &uses);
		ns = q3_xstats_rebalance(s, planned, xbytes, &ro, swaps, N);
		for (int i = 0; i < ns; i++) {
			assert_int_equal(swaps[i].layer_in, swaps[i].layer_out);
			planned[swaps[i].layer_in * E + swaps[i].expert_in] = 1;
			planned[swaps[i].layer_out * E + swaps[i].expert_out] = 0;
		}
		total += ns;
	}
	for (int l = 0; l < L; l++) {
		int n = 0;

		for (int x = 0; x < E; x++)
			n += planned[l * E + x];
		assert_int_equal(n, per_layer[l]);
	}
	run_tokens(&b, 200, NULL, planned, NULL, &h1, &dummy, &u1);
	printf("# per-layer re-balance after a shift: %.1f%% -> %.1f%% (%d swaps)\n", 100.0 * h0 / u0,
	       100.0 * h1 / u1, total);
	assert_true(h1 * u0 > h0 * u1);
	q3_xstats_free(s);
}

/* Two checkpoints of the same shapes whose routers differ get different fingerprints (a stats
 * file of one is not taken for the other); the same files, the same fingerprint. */
static void test_fingerprint_sees_the_routers(void **state)
{
	char *d = tu_mkdtemp();
	struct q3_ckpt *ck;
	uint64_t fp1, fp2, fp3;
	q3_err e;

	assert_non_null(d);
	assert_int_equal(tu_copy_dir(FIXTURES "/tiny-sym", d), 0);
	assert_int_equal(q3_ckpt_open(d, &ck, &e), 0);
	assert_int_equal(q3_ckpt_map(ck, &e), 0);
	fp1 = q3_xstats_fingerprint(ck);
	const struct q3_tensor *router = NULL;
	for (size_t i = 0; i < ck->ntensors && !router; i++)
		if (strstr(ck->tensors[i].name, ".mlp.gate.weight"))
			router = &ck->tensors[i];
	assert_non_null(router);
	char path[1024];
	snprintf(path, sizeof(path), "%s", ck->shards[router->shard].path);
	uint64_t off = router->off;
	uint8_t byte = ((const uint8_t *)router->data)[0] ^ 0x40;
	q3_ckpt_close(ck);

	assert_int_equal(q3_ckpt_open(d, &ck, &e), 0);
	assert_int_equal(q3_ckpt_map(ck, &e), 0);
	fp2 = q3_xstats_fingerprint(ck);
	q3_ckpt_close(ck);
	assert_true(fp1 == fp2);

	int fd = open(path, O_WRONLY);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, &byte, 1, (off_t)off), 1);
	close(fd);
	assert_int_equal(q3_ckpt_open(d, &ck, &e), 0);
	assert_int_equal(q3_ckpt_map(ck, &e), 0);
	fp3 = q3_xstats_fingerprint(ck);
	q3_ckpt_close(ck);
	assert_true(fp3 != fp1);
	tu_rm_rf(d);
	free(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_decay),
		cmocka_unit_test(test_file),
		cmocka_unit_test(test_planned_vs_lru),
		cmocka_unit_test(test_shift_and_rebalance),
		cmocka_unit_test(test_no_thrash),
		cmocka_unit_test(test_same_layer),
		cmocka_unit_test(test_fingerprint_sees_the_routers),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
