/* test_checkpoint.c - the checkpoint reader and role binding on the real fixtures, and on
 * corrupted copies of them that the tests build: each corruption must give its one-line error. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <jansson.h>

#include "checkpoint.h"
#include "model.h"
#include "testutil.h"

/* ---- fixtures read and bound correctly -------------------------------------------------- */

/* Bytes of a GPTQ Linear computed from first principles (qwen3next.md section 7). */
static uint64_t gptq_bytes(int K, int N, int bits, int G, bool gidx)
{
	int groups = K / G;
	return (uint64_t)K * N * bits / 8 + (uint64_t)groups * N * 2 + (uint64_t)groups * N * bits / 8 +
	       (gidx ? 4ull * K : 0);
}

static void open_bind(const char *dir, struct q3_ckpt **ck, struct q3_model **m)
{
	q3_err e;

	if (q3_ckpt_open(dir, ck, &e))
		fail_msg("%s: %s", dir, e.msg);
	if (q3_model_bind(*ck, m, &e))
		fail_msg("%s: %s", dir, e.msg);
}

static void test_tiny_sym_is_read_and_bound(void **state)
{
	struct q3_ckpt *ck;
	struct q3_model *m;
	const struct q3_config *c;
	const struct q3_layer *L;

	open_bind(FIXTURES "/tiny-sym", &ck, &m);
	c = &ck->cfg;
	assert_int_equal(ck->nshards, 2);
	assert_int_equal(ck->ntensors, 892);
	assert_int_equal(c->num_layers, 4);
	assert_int_equal(c->layer_kind[3], Q3_LAYER_FULL);
	assert_int_equal(c->layer_kind[0], Q3_LAYER_LINEAR);
	assert_int_equal(c->num_full_layers, 1);
	assert_int_equal(c->rotary_dim, 16);
	assert_true(c->rope_theta == 1e7);
	assert_int_equal(c->quant.method, Q3_QM_GPTQ);
	assert_int_equal(c->quant.zero_offset, 1);
	L = &m->layers[0];
	assert_int_equal(L->qkvz.fmt, Q3_W_GPTQ);
	assert_int_equal(L->qkvz.N, 2 * 2 * 64 + 2 * 4 * 64);
	assert_int_equal(L->qkvz.bits, 4);
	assert_int_equal(L->qkvz.ngroups, 2);
	assert_non_null(L->qkvz.g_idx);
	assert_int_equal(L->ba.fmt, Q3_W_DENSE);
	assert_int_equal(L->router.fmt, Q3_W_DENSE);
	assert_int_equal(L->shared_gate.N, 1);
	assert_int_equal(L->experts[15].down.K, 128);
	assert_int_equal(L->experts[15].down.ngroups, 1);
	assert_int_equal(m->layers[3].q.N, 2 * 4 * 64);
	assert_null(m->layers[3].qkvz.qweight);
	/* per-expert bytes and the category sums, computed independently */
	uint64_t ex = 2 * gptq_bytes(256, 128, 4, 128, true) + gptq_bytes(128, 256, 4, 128, true);
	assert_int_equal(m->bytes.expert_min, ex);
	assert_int_equal(m->bytes.expert_max, ex);
	assert_int_equal(m->bytes.experts, ex * 16 * 4);
	assert_int_equal(m->bytes.embed, 4096ull * 256 * 2);
	assert_int_equal(m->bytes.lm_head, 4096ull * 256 * 2);
	assert_int_equal(m->bytes.experts + m->bytes.dense + m->bytes.embed + m->bytes.lm_head + m->bytes.other,
			 ck->total_bytes);
	q3_model_free(m);
	q3_ckpt_close(ck);
}

static void test_tiny_actorder_is_asym_with_permuted_gidx(void **state)
{
	struct q3_ckpt *ck;
	struct q3_model *m;
	q3_err e;

	open_bind(FIXTURES "/tiny-actorder", &ck, &m);
	assert_int_equal(ck->nshards, 3);
	assert_int_equal(ck->cfg.num_layers, 8);
	assert_int_equal(ck->cfg.num_full_layers, 2);
	assert_false(ck->cfg.quant.base.sym);
	assert_true(ck->cfg.quant.base.desc_act);
	assert_true(m->layers[0].experts[0].gate.desc_act);
	assert_int_equal(m->layers[0].A_log->dtype, Q3_DT_F32);
	assert_int_equal(m->layers[1].dt_bias->dtype, Q3_DT_F32);
	assert_int_equal(q3_ckpt_map(ck, &e), 0);
	assert_int_equal(q3_model_check_data(m, &e), 0);
	/* act-order: g_idx is a permutation of groups, not k / G */
	const struct q3_linear *l = &m->layers[0].qkvz;
	int seq = 1;
	for (int k = 0; k < l->K; k++) {
		int32_t g;
		memcpy(&g, (char *)l->g_idx->data + 4 * k, 4);
		if (g != k / l->group_size)
			seq = 0;
	}
	assert_int_equal(seq, 0);
	q3_model_free(m);
	q3_ckpt_close(ck);
}

static void test_tiny_mixed_has_per_module_bits_and_groups(void **state)
{
	struct q3_ckpt *ck;
	struct q3_model *m;

	open_bind(FIXTURES "/tiny-mixed", &ck, &m);
	assert_int_equal(ck->cfg.quant.method, Q3_QM_AUTOROUND);
	assert_int_equal(ck->cfg.quant.zero_offset, 1);
	for (int i = 0; i < 4; i++) {
		const struct q3_layer *L = &m->layers[i];
		const struct q3_linear *attn = L->kind == Q3_LAYER_LINEAR ? &L->qkvz : &L->q;

		assert_int_equal(attn->bits, 8);
		assert_int_equal(attn->group_size, 128);
		assert_int_equal(L->shared.down.bits, 8);
		assert_int_equal(L->experts[3].up.bits, 4);
		assert_int_equal(L->experts[3].up.group_size, 32);
		assert_int_equal(L->experts[3].down.ngroups, 128 / 32);
		assert_null(L->experts[3].up.g_idx);
	}
	uint64_t ex = 2 * gptq_bytes(256, 128, 4, 32, false) + gptq_bytes(128, 256, 4, 32, false);
	assert_int_equal(m->bytes.expert_min, ex);
	q3_model_free(m);
	q3_ckpt_close(ck);
}

/* ---- corrupted copies ------------------------------------------------------------------- */

static char *copy_fixture(const char *name)
{
	char *d = tu_mkdtemp(), src[256];

	assert_non_null(d);
	snprintf(src, sizeof(src), FIXTURES "/%s", name);
	assert_int_equal(tu_copy_dir(src, d), 0);
	return d;
}

/* Opens and binds dir; expects failure with a one-line message containing both needles. */
static void expect_fail(const char *dir, const char *needle1, const char *needle2)
{
	struct q3_ckpt *ck = NULL;
	struct q3_model *m = NULL;
	q3_err e = { { 0 } };
	int r = q3_ckpt_open(dir, &ck, &e);

	if (!r) {
		r = q3_model_bind(ck, &m, &e);
		q3_model_free(m);
		q3_ckpt_close(ck);
	}
	if (!r || strchr(e.msg, '\n') || !strstr(e.msg, needle1) || (needle2 && !strstr(e.msg, needle2)))
		fail_msg("got %d \"%s\"; wanted an error with \"%s\" and \"%s\"", r, e.msg, needle1,
			 needle2 ? needle2 : "");
}

/* Rewrites a shard's header through edit(), keeping its data section. */
static void edit_shard_header(const char *path, void (*edit)(json_t *, void *), void *arg)
{
	size_t len = 0, jl, padded;
	unsigned char *b = (unsigned char *)tu_read_file(path, &len);
	uint64_t n = 0;
	json_t *h;
	char *js;
	unsigned char *out;

	assert_non_null(b);
	for (int i = 7; i >= 0; i--)
		n = (n << 8) | b[i];
	h = json_loadb((char *)b + 8, n, 0, NULL);
	assert_non_null(h);
	edit(h, arg);
	js = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
	jl = strlen(js);
	padded = (jl + 7) / 8 * 8;
	out = malloc(8 + padded + len - 8 - n);
	for (int i = 0; i < 8; i++)
		out[i] = (unsigned char)(((uint64_t)padded >> (8 * i)) & 0xff);
	memcpy(out + 8, js, jl);
	memset(out + 8 + jl, ' ', padded - jl);
	memcpy(out + 8 + padded, b + 8 + n, len - 8 - n);
	assert_int_equal(tu_write_file(path, out, 8 + padded + len - 8 - n), 0);
	free(out);
	free(js);
	free(b);
	json_decref(h);
}

static void set_dtype(json_t *h, void *arg)
{
	const char **kv = arg;
	json_object_set_new(json_object_get(h, kv[0]), "dtype", json_string(kv[1]));
}

static void set_shape(json_t *h, void *arg)
{
	const char *name = arg;
	json_object_set_new(json_object_get(h, name), "shape", json_pack("[i,i]", 128, 2));
}

static void shift_offsets(json_t *h, void *arg)
{
	/* make some tensor that does not start the data section start 4 bytes earlier (same
	 * size): it now overlaps the one before it */
	const char *k;
	json_t *v;
	json_object_foreach(h, k, v) {
		json_t *o = json_object_get(v, "data_offsets");
		if (o && json_integer_value(json_array_get(o, 0)) >= 1024) {
			json_int_t b = json_integer_value(json_array_get(o, 0)), e = json_integer_value(json_array_get(o, 1));
			json_object_set_new(v, "data_offsets", json_pack("[I,I]", b - 4, e - 4));
			return;
		}
	}
	fail_msg("no tensor past offset 1024");
}

static void rename_tensor(json_t *h, void *arg)
{
	const char **kv = arg;
	json_t *v = json_object_get(h, kv[0]);

	if (!v)
		return;
	json_incref(v);
	json_object_del(h, kv[0]);
	json_object_set_new(h, kv[1], v);
}

/* Which shard holds a tensor, from the fixture's index. */
static char *shard_of(const char *dir, const char *tensor)
{
	char p[512];
	json_t *idx;
	char *r;

	snprintf(p, sizeof(p), "%s/model.safetensors.index.json", dir);
	idx = json_load_file(p, 0, NULL);
	assert_non_null(idx);
	snprintf(p, sizeof(p), "%s/%s", dir, json_string_value(json_object_get(json_object_get(idx, "weight_map"), tensor)));
	json_decref(idx);
	r = strdup(p);
	return r;
}

static void test_truncated_shard(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];

	snprintf(p, sizeof(p), "%s/model-00002-of-00002.safetensors", d);
	assert_int_equal(truncate(p, 4000000), 0);
	expect_fail(d, "model-00002-of-00002.safetensors", "truncated");
	tu_rm_rf(d);
	free(d);
}

/* A shard that changed after open: the map is refused, leaves nothing mapped, and works once the
 * file is back as it was. */
static void test_map_after_a_shard_changed(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];
	struct q3_ckpt *ck;
	struct stat st;
	q3_err e;

	assert_int_equal(q3_ckpt_open(d, &ck, &e), 0);
	snprintf(p, sizeof(p), "%s/model-00002-of-00002.safetensors", d);
	assert_int_equal(stat(p, &st), 0);
	assert_int_equal(truncate(p, st.st_size + 4096), 0);
	assert_int_not_equal(q3_ckpt_map(ck, &e), 0);
	assert_non_null(strstr(e.msg, "size changed"));
	assert_null(ck->tensors[0].data);
	assert_int_equal(truncate(p, st.st_size), 0);
	assert_int_equal(q3_ckpt_map(ck, &e), 0); /* not "already mapped" with NULL data */
	for (size_t i = 0; i < ck->ntensors; i++)
		assert_non_null(ck->tensors[i].data);
	q3_ckpt_close(ck);
	tu_rm_rf(d);
	free(d);
}

static void test_header_length_past_the_end(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];
	unsigned char big[8] = { 0, 0, 0, 0, 1, 0, 0, 0 };
	FILE *f;

	snprintf(p, sizeof(p), "%s/model-00001-of-00002.safetensors", d);
	f = fopen(p, "r+b");
	fwrite(big, 1, 8, f);
	fclose(f);
	expect_fail(d, "model-00001-of-00002.safetensors", "past the end");
	tu_rm_rf(d);
	free(d);
}

static void test_overlapping_extents(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];

	snprintf(p, sizeof(p), "%s/model-00001-of-00002.safetensors", d);
	edit_shard_header(p, shift_offsets, NULL);
	expect_fail(d, "model-00001-of-00002.safetensors", "overlaps");
	tu_rm_rf(d);
	free(d);
}

static void test_wrong_dtype(void **state)
{
	char *d = copy_fixture("tiny-sym"), *s;
	const char *kv[2] = { "model.layers.1.mlp.experts.4.up_proj.qweight", "F32" };

	s = shard_of(d, kv[0]);
	edit_shard_header(s, set_dtype, kv);
	expect_fail(d, kv[0], "dtype F32, expected I32");
	free(s);
	tu_rm_rf(d);
	free(d);
}

static void test_wrong_shape(void **state)
{
	char *d = copy_fixture("tiny-sym"), *s;
	char *name = "model.layers.2.post_attention_layernorm.weight";

	s = shard_of(d, name);
	edit_shard_header(s, set_shape, name);
	expect_fail(d, name, "shape [128, 2], expected [256]");
	free(s);
	tu_rm_rf(d);
	free(d);
}

static void test_missing_expert(void **state)
{
	char *d = copy_fixture("tiny-mixed"), *s, p[512];
	const char *kv[2] = { "model.layers.1.mlp.experts.7.down_proj.qweight",
			      "model.layers.1.mlp.experts.77.down_proj.qweight" };

	s = shard_of(d, kv[0]);
	edit_shard_header(s, rename_tensor, (void *)kv);
	snprintf(p, sizeof(p), "%s/model.safetensors.index.json", d);
	assert_int_equal(tu_replace_in_file(p, "\"model.layers.1.mlp.experts.7.down_proj.qweight\"",
					    "\"model.layers.1.mlp.experts.77.down_proj.qweight\""), 0);
	expect_fail(d, "missing tensor model.layers.1.mlp.experts.7.down_proj.", "and 1 more problem)");
	free(s);
	tu_rm_rf(d);
	free(d);
}

static void test_tensor_not_in_index(void **state)
{
	char *d = copy_fixture("tiny-mixed"), *s;
	const char *kv[2] = { "model.norm.weight", "model.norm2.weight" };

	s = shard_of(d, kv[0]);
	edit_shard_header(s, rename_tensor, (void *)kv);
	expect_fail(d, "model.norm", "index");
	free(s);
	tu_rm_rf(d);
	free(d);
}

static void test_bad_json_config(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];

	snprintf(p, sizeof(p), "%s/config.json", d);
	assert_int_equal(tu_write_file(p, "{\"model_type\": \"qwen3_next\",", 28), 0);
	expect_fail(d, "config.json", "line 1");
	assert_int_equal(tu_write_file(p, "{\"model_type\": \"llama\"}", 23), 0);
	expect_fail(d, "config.json", "model_type");
	tu_rm_rf(d);
	free(d);
}

static void test_config_disagrees_with_tensors(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];

	snprintf(p, sizeof(p), "%s/config.json", d);
	/* 32 experts in the config but 16 on disk: the router is too small, experts are missing */
	assert_int_equal(tu_replace_in_file(p, "\"num_experts\": 16", "\"num_experts\": 32"), 0);
	expect_fail(d, "model.layers.0.mlp.gate.weight: shape [16, 256], expected [32, 256]", "more problems");
	tu_rm_rf(d);
	free(d);
	/* group 32 in the config but the scales say 128 */
	d = copy_fixture("tiny-sym");
	snprintf(p, sizeof(p), "%s/config.json", d);
	assert_int_equal(tu_replace_in_file(p, "\"group_size\": 128", "\"group_size\": 32"), 0);
	expect_fail(d, ".scales", "group_size 32");
	tu_rm_rf(d);
	free(d);
	/* 8 bits in the config but 4-bit codes on disk */
	d = copy_fixture("tiny-sym");
	snprintf(p, sizeof(p), "%s/config.json", d);
	assert_int_equal(tu_replace_in_file(p, "\"bits\": 4", "\"bits\": 8"), 0);
	expect_fail(d, "4-bit codes", "8 bits");
	tu_rm_rf(d);
	free(d);
}

static void test_index_names_missing_shard(void **state)
{
	char *d = copy_fixture("tiny-sym"), p[512];

	snprintf(p, sizeof(p), "%s/model.safetensors.index.json", d);
	assert_int_equal(tu_replace_in_file(p, "\"model-00002-of-00002.safetensors\"",
					    "\"model-00009-of-00009.safetensors\""), 0);
	expect_fail(d, "model-00009-of-00009.safetensors", "No such file");
	/* and a shard name that escapes the folder */
	assert_int_equal(tu_replace_in_file(p, "\"model-00009-of-00009.safetensors\"", "\"../x.safetensors\""), 0);
	expect_fail(d, "weight_map", "file name");
	tu_rm_rf(d);
	free(d);
}

static void test_missing_folder_and_files(void **state)
{
	char *d = tu_mkdtemp(), p[512];

	expect_fail("/nonexistent/model", "/nonexistent/model", "No such file");
	expect_fail(d, "config.json", "No such file");
	snprintf(p, sizeof(p), "%s/config.json", d);
	{
		size_t n = 0;
		char *cfg = tu_read_file(FIXTURES "/tiny-sym/config.json", &n);
		tu_write_file(p, cfg, n);
		free(cfg);
	}
	expect_fail(d, "no model.safetensors", NULL);
	tu_rm_rf(d);
	free(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_tiny_sym_is_read_and_bound),
		cmocka_unit_test(test_tiny_actorder_is_asym_with_permuted_gidx),
		cmocka_unit_test(test_tiny_mixed_has_per_module_bits_and_groups),
		cmocka_unit_test(test_truncated_shard),
		cmocka_unit_test(test_map_after_a_shard_changed),
		cmocka_unit_test(test_header_length_past_the_end),
		cmocka_unit_test(test_overlapping_extents),
		cmocka_unit_test(test_wrong_dtype),
		cmocka_unit_test(test_wrong_shape),
		cmocka_unit_test(test_missing_expert),
		cmocka_unit_test(test_tensor_not_in_index),
		cmocka_unit_test(test_bad_json_config),
		cmocka_unit_test(test_config_disagrees_with_tensors),
		cmocka_unit_test(test_index_names_missing_shard),
		cmocka_unit_test(test_missing_folder_and_files),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
