/* test_gpu_plan.c - the host side of the CUDA backend's weight format, which needs no GPU: for
 * every Linear of every fixture, q3g_mat_plan picks the layout the checkpoint calls for (int4 or
 * int8 tiles for GPTQ on the fast path, fp16 for dense weights and for GPTQ layouts outside it),
 * notices act-order (a permutation) and asymmetric zero points, and sizes the buffers exactly.
 * Skipped (77) in builds without the CUDA library. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "testutil.h"

#include "checkpoint.h"
#include "gpu.h"
#include "model.h"

/* q3g_mat_plan lives in the CUDA library: weak, so that this test links (and skips) without it. */
int q3g_mat_plan(const struct q3_linear *const *ls, int nmat, struct q3g_mat_plan *p, struct q3_err *e)
	__attribute__((weak));
size_t q3g_mat_bytes(const struct q3g_mat_plan *p) __attribute__((weak));

struct counts {
	int q4, q8, f16, perm, zeros, fallback;
	int multi; /* GPTQ Linears on the fast path with more than one group */
};

static void plan_one(const struct q3_linear *l, struct counts *n)
{
	struct q3g_mat_plan p;
	q3_err e;
	int P, chunk;

	assert_int_equal(q3g_mat_plan(&l, 1, &p, &e), 0);
	assert_int_equal(p.N, l->N);
	assert_int_equal(p.K, l->K);
	assert_int_equal(p.ntiles, (l->N + 15) / 16);
	assert_int_equal(p.nchunks, (l->K + 63) / 64);
	if (l->fmt == Q3_W_DENSE) {
		assert_int_equal(p.fmt, Q3G_F16);
	} else if (p.fmt == Q3G_F16) {
		n->fallback++;
	} else {
		/* GPTQ on the fast path: the stored bits, whole groups of k-steps */
		assert_int_equal(p.fmt, l->bits == 4 ? Q3G_Q4 : Q3G_Q8);
		assert_int_equal(p.gsteps * 16, l->group_size);
		assert_int_equal(p.ngroups, (p.nchunks * 64 + l->group_size - 1) / l->group_size);
		assert_int_equal(p.sz_floats, (size_t)p.ntiles * p.ngroups * 16);
		assert_int_equal(p.perm_entries, p.perm ? (size_t)p.nchunks * 64 : 0);
		n->perm += p.perm;
		n->zeros += p.zeros;
		n->multi += l->ngroups > 1;
	}
	P = p.fmt == Q3G_Q4 ? 1 : p.fmt == Q3G_Q8 ? 2 : 4;
	chunk = 512 * P;
	assert_int_equal(p.data_bytes, (size_t)p.ntiles * p.nchunks * chunk);
	assert_true(q3g_mat_bytes(&p) >= p.data_bytes + p.sz_floats * 4 * (p.zeros ? 2 : 1) + p.perm_entries * 2);
	n->q4 += p.fmt == Q3G_Q4;
	n->q8 += p.fmt == Q3G_Q8;
	n->f16 += p.fmt == Q3G_F16;
}

static struct counts plan_model(const char *name)
{
	char dir[512];
	struct q3_ckpt *ck = NULL;
	struct q3_model *m = NULL;
	struct counts n = { 0 };
	q3_err e;

	snprintf(dir, sizeof(dir), "%s/%s", FIXTURES, name);
	assert_int_equal(q3_ckpt_open(dir, &ck, &e), 0);
	assert_int_equal(q3_model_bind(ck, &m, &e), 0);
	assert_int_equal(q3_ckpt_map(ck, &e), 0);
	for (int i = 0; i < m->cfg->num_layers; i++) {
		const struct q3_layer *L = &m->layers[i];
		const struct q3_linear *ls[] = { &L->qkvz, &L->ba, &L->lin_out, &L->q, &L->k, &L->v, &L->o,
						 &L->router, &L->shared_gate, &L->shared.gate, &L->shared.up,
						 &L->shared.down };

		for (size_t j = 0; j < sizeof(ls) / sizeof(ls[0]); j++)
			if (ls[j]->N)
				plan_one(ls[j], &n);
		for (int x = 0; x < m->cfg->num_experts; x++) {
			plan_one(&L->experts[x].gate, &n);
			plan_one(&L->experts[x].up, &n);
			plan_one(&L->experts[x].down, &n);
		}
	}
	plan_one(&m->lm_head, &n);
	q3_model_free(m);
	q3_ckpt_close(ck);
	return n;
}

static void test_sym(void **state)
{
	struct counts n = plan_model("tiny-sym");

	assert_true(n.q4 > 0);
	assert_int_equal(n.q8, 0);
	assert_int_equal(n.perm, 0);
	assert_int_equal(n.zeros, 0);
	assert_int_equal(n.fallback, 0);
}

static void test_actorder(void **state)
{
	struct counts n = plan_model("tiny-actorder");

	assert_true(n.q4 > 0);
	/* act-order: a permutation wherever there is more than one group (one group: nothing moves) */
	assert_true(n.multi > 0);
	assert_int_equal(n.perm, n.multi);
	assert_true(n.zeros > 0);
	assert_int_equal(n.fallback, 0);
}

static void test_mixed(void **state)
{
	struct counts n = plan_model("tiny-mixed");

	assert_true(n.q4 > 0); /* experts, group 32 */
	assert_true(n.q8 > 0); /* the other projections, 8-bit */
	assert_int_equal(n.perm, 0);
	assert_int_equal(n.fallback, 0);
}

/* A stack whose members disagree in layout is planned as the most general member needs. */
static void test_stack(void **state)
{
	char dir[512];
	struct q3_ckpt *ck = NULL;
	struct q3_model *m = NULL;
	struct q3g_mat_plan p;
	q3_err e;

	snprintf(dir, sizeof(dir), "%s/tiny-mixed", FIXTURES);
	assert_int_equal(q3_ckpt_open(dir, &ck, &e), 0);
	assert_int_equal(q3_model_bind(ck, &m, &e), 0);
	assert_int_equal(q3_ckpt_map(ck, &e), 0);
	const struct q3_linear *same[2] = { &m->layers[0].experts[0].gate, &m->layers[0].experts[1].gate };
	const struct q3_linear *mixed[2] = { &m->layers[0].experts[0].gate, &m->layers[0].shared.gate };
	const struct q3_linear *shapes[2] = { &m->layers[0].experts[0].gate, &m->layers[0].experts[0].down };

	assert_int_equal(q3g_mat_plan(same, 2, &p, &e), 0);
	assert_int_equal(p.fmt, Q3G_Q4);
	assert_int_equal(p.nmat, 2);
	/* 4-bit group 32 with 8-bit group 128: one format cannot hold both, so fp16 */
	assert_int_equal(q3g_mat_plan(mixed, 2, &p, &e), 0);
	assert_int_equal(p.fmt, Q3G_F16);
	assert_int_equal(q3g_mat_plan(shapes, 2, &p, &e), -EINVAL);
	q3_model_free(m);
	q3_ckpt_close(ck);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sym),
		cmocka_unit_test(test_actorder),
		cmocka_unit_test(test_mixed),
		cmocka_unit_test(test_stack),
	};

	if (!q3g_mat_plan) {
		printf("no CUDA library in this build: skipped\n");
		return 77;
	}
	return cmocka_run_group_tests(tests, NULL, NULL);
}
