/* test_knobs.c - reading the qwen3mm module's sysfs knobs from a directory laid out like
 * /sys/kernel/qwen3mm/knobs: defaults when absent, which knobs were present, both forms of the
 * policy file, and the file named in every refusal. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "knobs.h"
#include "qwen3mm_uapi.h"

static char dir[64];

static void put(const char *name, const char *value)
{
	char path[128];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	assert_non_null(f);
	fputs(value, f);
	fclose(f);
}

static int setup(void **state)
{
	strcpy(dir, "/tmp/q3knobs.XXXXXX");
	return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
	static const char *const names[] = { "read_chunk_kb", "queue_depth", "vram_budget_mb",
					     "expert_cache_policy", "cpu_expert_threads" };
	char path[128];

	for (size_t i = 0; i < Q3_ARRAY_SIZE(names); i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
	}
	return rmdir(dir);
}

static void assert_defaults(const struct q3_knobs *k, unsigned except)
{
	if (!(except & Q3_KNOB_READ_CHUNK_KB))
		assert_int_equal(k->read_chunk_kb, QWEN3MM_KNOB_READ_CHUNK_KB_DEFAULT);
	if (!(except & Q3_KNOB_QUEUE_DEPTH))
		assert_int_equal(k->queue_depth, QWEN3MM_KNOB_QUEUE_DEPTH_DEFAULT);
	if (!(except & Q3_KNOB_VRAM_BUDGET_MB))
		assert_int_equal(k->vram_budget_mb, QWEN3MM_KNOB_VRAM_BUDGET_MB_DEFAULT);
	if (!(except & Q3_KNOB_EXPERT_CACHE_POLICY))
		assert_int_equal(k->expert_cache_policy, Q3_CACHE_LRU);
	if (!(except & Q3_KNOB_CPU_EXPERT_THREADS))
		assert_int_equal(k->cpu_expert_threads, QWEN3MM_KNOB_CPU_EXPERT_THREADS_DEFAULT);
}

static void test_missing_directory_gives_defaults_and_nothing_present(void **state)
{
	struct q3_knobs k;
	q3_err e = { "" };

	assert_int_equal(q3_knobs_read("/nonexistent/qwen3mm/knobs", &k, &e), 0);
	assert_int_equal(k.present, 0);
	assert_defaults(&k, 0);
	assert_int_equal(q3_knobs_read(dir, &k, &e), 0); /* empty directory */
	assert_int_equal(k.present, 0);
}

static void test_all_knobs_read_as_the_module_writes_them(void **state)
{
	struct q3_knobs k;
	q3_err e = { "" };

	put("read_chunk_kb", "16384\n");
	put("queue_depth", "64\n");
	put("vram_budget_mb", "20480\n");
	put("expert_cache_policy", "lru lfu [static]\n");
	put("cpu_expert_threads", "12\n");
	assert_int_equal(q3_knobs_read(dir, &k, &e), 0);
	assert_int_equal(k.present, Q3_KNOB_ALL);
	assert_int_equal(k.read_chunk_kb, 16384);
	assert_int_equal(k.queue_depth, 64);
	assert_int_equal(k.vram_budget_mb, 20480);
	assert_int_equal(k.expert_cache_policy, Q3_CACHE_STATIC);
	assert_int_equal(k.cpu_expert_threads, 12);
}

static void test_present_bits_name_exactly_the_files_found(void **state)
{
	struct q3_knobs k;
	q3_err e = { "" };

	put("queue_depth", "7");
	assert_int_equal(q3_knobs_read(dir, &k, &e), 0);
	assert_int_equal(k.present, Q3_KNOB_QUEUE_DEPTH);
	assert_int_equal(k.queue_depth, 7);
	assert_defaults(&k, Q3_KNOB_QUEUE_DEPTH);
}

static void test_policy_bare_and_bracketed(void **state)
{
	static const struct {
		const char *text;
		enum q3_cache_policy want;
	} cases[] = {
		{ "lfu\n", Q3_CACHE_LFU },
		{ "[lru] lfu static\n", Q3_CACHE_LRU },
		{ "lru [lfu] static", Q3_CACHE_LFU },
		{ "static", Q3_CACHE_STATIC },
	};
	struct q3_knobs k;
	q3_err e = { "" };

	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		put("expert_cache_policy", cases[i].text);
		assert_int_equal(q3_knobs_read(dir, &k, &e), 0);
		assert_int_equal(k.expert_cache_policy, cases[i].want);
		assert_int_equal(k.present, Q3_KNOB_EXPERT_CACHE_POLICY);
	}
	assert_string_equal(q3_cache_policy_name(Q3_CACHE_LRU), "lru");
	assert_string_equal(q3_cache_policy_name(Q3_CACHE_STATIC), "static");
	assert_string_equal(q3_cache_policy_name(Q3_CACHE_NR_POLICIES), "?");
}

static void test_bad_values_are_refused_with_the_file_named(void **state)
{
	static const struct {
		const char *file, *value;
	} cases[] = {
		{ "read_chunk_kb", "1000" },  { "read_chunk_kb", "0" },
		{ "read_chunk_kb", "2" },     { "read_chunk_kb", "2097152" },
		{ "read_chunk_kb", "abc" },   { "read_chunk_kb", "" },
		{ "read_chunk_kb", "-8" },    { "read_chunk_kb", "8192 " },
		{ "queue_depth", "0" },       { "queue_depth", "4097" },
		{ "queue_depth", "99999999999999999999" },
		{ "vram_budget_mb", "16777217" },
		{ "cpu_expert_threads", "4097" },
		{ "cpu_expert_threads", "+3" },
		{ "expert_cache_policy", "fifo" },
		{ "expert_cache_policy", "[lru lfu" },
		{ "expert_cache_policy", "[] lru" },
		{ "expert_cache_policy", "" },
	};
	struct q3_knobs k;

	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		q3_err e = { "" };

		teardown(NULL);
		setup(NULL);
		put(cases[i].file, cases[i].value);
		if (q3_knobs_read(dir, &k, &e) != -EINVAL || !strstr(e.msg, cases[i].file))
			fail_msg("%s = '%s': wanted -EINVAL naming the file, got '%s'", cases[i].file,
				 cases[i].value, e.msg);
	}
}

static void test_limits_themselves_are_accepted(void **state)
{
	struct q3_knobs k;
	q3_err e = { "" };
	char v[32];

	snprintf(v, sizeof(v), "%d", QWEN3MM_KNOB_READ_CHUNK_KB_MAX);
	put("read_chunk_kb", v);
	snprintf(v, sizeof(v), "%d", QWEN3MM_KNOB_QUEUE_DEPTH_MIN);
	put("queue_depth", v);
	snprintf(v, sizeof(v), "%d", QWEN3MM_KNOB_VRAM_BUDGET_MB_MAX);
	put("vram_budget_mb", v);
	assert_int_equal(q3_knobs_read(dir, &k, &e), 0);
	assert_int_equal(k.read_chunk_kb, QWEN3MM_KNOB_READ_CHUNK_KB_MAX);
	assert_int_equal(k.queue_depth, QWEN3MM_KNOB_QUEUE_DEPTH_MIN);
	assert_int_equal(k.vram_budget_mb, QWEN3MM_KNOB_VRAM_BUDGET_MB_MAX);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_missing_directory_gives_defaults_and_nothing_present,
						setup, teardown),
		cmocka_unit_test_setup_teardown(test_all_knobs_read_as_the_module_writes_them, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_present_bits_name_exactly_the_files_found, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_policy_bare_and_bracketed, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bad_values_are_refused_with_the_file_named, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_limits_themselves_are_accepted, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
