/* test_vram_budget.c - the VRAM budget (userspace/vram_budget.h): precedence of flag, knob and
 * config, "auto", bad values named by their source, explicit budgets past what the card can give
 * refused with the numbers, the automatic budget, and the KV / state sizes of the 80B config. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <string.h>

#include "vram_budget.h"

#define GiB (1ull << 30)
#define MiB (1ull << 20)

static const struct q3_vram_need need24 = {
	.free_vram = 23 * GiB + 500 * MiB, /* a 24 GB card after the CUDA context */
	.kv_bytes = 1 * GiB,
	.state_bytes = 80 * MiB,
	.workspace_bytes = 600 * MiB,
	.reserve_bytes = 256 * MiB,
};

static void test_precedence(void **state)
{
	uint64_t b;
	enum q3_budget_src src;
	q3_err e = {0};

	assert_int_equal(q3_vram_budget_resolve("20GiB", "18G", "10G", &need24, &b, &src, &e), 0);
	assert_true(b == 20 * GiB);
	assert_int_equal(src, Q3_BUDGET_FLAG);
	assert_int_equal(q3_vram_budget_resolve(NULL, "18G", "10G", &need24, &b, &src, &e), 0);
	assert_true(b == 18 * GiB);
	assert_int_equal(src, Q3_BUDGET_KNOB);
	assert_int_equal(q3_vram_budget_resolve("auto", "0", " 10240M", &need24, &b, &src, &e), 0);
	assert_true(b == 10 * GiB);
	assert_int_equal(src, Q3_BUDGET_CONFIG);
	assert_int_equal(q3_vram_budget_resolve("", NULL, "AUTO", &need24, &b, &src, &e), 0);
	assert_int_equal(src, Q3_BUDGET_AUTO);
	assert_true(b == q3_vram_budget_auto(&need24));
	assert_string_equal(q3_budget_src_name(src), "auto");
	assert_int_equal(q3_vram_budget_resolve("1.5G", NULL, NULL, &need24, &b, &src, &e), 0);
	assert_true(b == 3 * GiB / 2);
}

static void test_refusals(void **state)
{
	static const char *const bad[] = {"twenty", "-1G", "20XB", "nan", "inf", "1e400G", "G"};
	uint64_t b = 7;
	enum q3_budget_src src = Q3_BUDGET_AUTO;
	q3_err e = {0};

	for (size_t i = 0; i < Q3_ARRAY_SIZE(bad); i++) {
		if (q3_vram_budget_resolve(bad[i], NULL, NULL, &need24, &b, &src, &e) != -EINVAL)
			fail_msg("'%s' accepted", bad[i]);
		assert_non_null(strstr(e.msg, "--vram-budget"));
	}
	/* a bad knob is named as the knob, even under a good config */
	assert_int_equal(q3_vram_budget_resolve(NULL, "lots", "10G", &need24, &b, &src, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "knob"));
	/* more than the card can give the weights */
	assert_int_equal(q3_vram_budget_resolve("23GiB", NULL, NULL, &need24, &b, &src, &e), -ENOSPC);
	assert_non_null(strstr(e.msg, "at most"));
	assert_true(b == 7);
}

static void test_auto(void **state)
{
	struct q3_vram_need n = need24;
	uint64_t want = n.free_vram - n.kv_bytes - n.state_bytes - n.workspace_bytes - n.reserve_bytes;

	assert_true(q3_vram_budget_auto(&n) == want);
	n.reserve_bytes = 0; /* default reserve: 256 MiB + 2% */
	assert_true(q3_vram_reserve(&n) == 256 * MiB + n.free_vram / 50);
	assert_true(q3_vram_budget_auto(&n) == want + 256 * MiB - q3_vram_reserve(&n));
	n.kv_bytes = 40 * GiB; /* nothing left */
	assert_true(q3_vram_budget_auto(&n) == 0);
}

static void test_sizes(void **state)
{
	/* Qwen3-Next-80B-A3B: 12 full-attention layers, 2 KV heads of 256; 36 DeltaNet layers, 32
	 * value heads of 128 x 128, conv over 8192 channels, kernel 4 */
	struct q3_config c = {.num_layers = 48, .num_full_layers = 12, .num_linear_layers = 36,
			      .num_kv_heads = 2, .head_dim = 256, .lin_num_v_heads = 32,
			      .lin_k_dim = 128, .lin_v_dim = 128, .conv_dim = 8192, .conv_kernel = 4};

	/* 24 KiB of fp16 KV per position (performance.md: 24.6 KB) */
	assert_true(q3_vram_kv_bytes(&c, 1, 1, 2) == 24576);
	assert_true(q3_vram_kv_bytes(&c, 131072, 1, 2) == 3 * GiB);
	/* 72 MiB of fp32 recurrent state + 1.7 MiB of bf16 conv state per session */
	assert_true(q3_vram_state_bytes(&c, 1, 2) == 36ull * (32 * 128 * 128 * 4 + 8192 * 3 * 2));
	assert_true(q3_vram_state_bytes(&c, 4, 2) == 4 * q3_vram_state_bytes(&c, 1, 2));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_precedence),
		cmocka_unit_test(test_refusals),
		cmocka_unit_test(test_auto),
		cmocka_unit_test(test_sizes),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
