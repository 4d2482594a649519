/* test_settings.c - flag > sysfs knob > config file > default, each value's recorded origin, flag
 * parsing, and the one-line errors for bad config files and values. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "settings.h"

static char cfg_path[64];

static void write_config(const char *text)
{
	snprintf(cfg_path, sizeof(cfg_path), "/tmp/q3_test_settings_%d.json", (int)getpid());
	FILE *f = fopen(cfg_path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

/* knobs from a NULL-terminated name/value list */
static int table_knob(void *ctx, const char *name, char *buf, size_t n, char *origin, size_t on)
{
	const char *const *kv = ctx;
	for (; kv && kv[0]; kv += 2)
		if (!strcmp(kv[0], name)) {
			snprintf(buf, n, "%s", kv[1]);
			snprintf(origin, on, "/sys/test/%s", name);
			return 0;
		}
	return -ENOENT;
}

static int teardown(void **st)
{
	if (*cfg_path)
		unlink(cfg_path);
	return 0;
}

static void test_each_source_overrides_the_weaker_ones(void **st)
{
	struct q3_settings s;
	struct q3_set_flags f = { 0 };
	q3_err e;
	const char *knobs[] = { "queue_depth", "64", "read_chunk_kb", "16MiB", NULL };

	write_config("{\"port\": 9000, \"queue_depth\": 8, \"read_chunk\": \"1MiB\", \"max_batch\": 4,"
		     " \"host\": \"0.0.0.0\"}");
	f.config = cfg_path;
	f.val[Q3_SET_READ_CHUNK] = "2MiB";
	assert_int_equal(q3_settings_load(&s, &f, table_knob, knobs, &e), 0);

	/* flag beats knob and config */
	assert_int_equal(q3_set_num(&s, Q3_SET_READ_CHUNK), 2 << 20);
	assert_int_equal(s.v[Q3_SET_READ_CHUNK].src, Q3_SRC_FLAG);
	assert_string_equal(s.v[Q3_SET_READ_CHUNK].origin, "--read_chunk");
	/* knob beats config */
	assert_int_equal(q3_set_num(&s, Q3_SET_QUEUE_DEPTH), 64);
	assert_int_equal(s.v[Q3_SET_QUEUE_DEPTH].src, Q3_SRC_KNOB);
	assert_string_equal(s.v[Q3_SET_QUEUE_DEPTH].origin, "knob /sys/test/queue_depth");
	/* config beats default */
	assert_int_equal(q3_set_num(&s, Q3_SET_PORT), 9000);
	assert_int_equal(s.v[Q3_SET_PORT].src, Q3_SRC_CONFIG);
	assert_string_equal(q3_set_str(&s, Q3_SET_HOST), "0.0.0.0");
	/* untouched: the default */
	assert_int_equal(q3_set_num(&s, Q3_SET_MAX_CTX), 4096);
	assert_int_equal(s.v[Q3_SET_MAX_CTX].src, Q3_SRC_DEFAULT);
	assert_string_equal(q3_set_str(&s, Q3_SET_BACKEND), "auto");
	q3_settings_free(&s);

	/* a knob is not used for a setting that has none (max_batch), config wins there */
	const char *knobs2[] = { "max_batch", "99", NULL };
	assert_int_equal(q3_settings_load(&s, &f, table_knob, (void *)knobs2, &e), 0);
	assert_int_equal(q3_set_num(&s, Q3_SET_MAX_BATCH), 4);
	q3_settings_free(&s);
}

static void test_flags_take_both_spellings_and_leave_other_arguments(void **st)
{
	struct q3_set_flags f = { 0 };
	char *argv[] = { "start", "--port", "1234", "--max-batch=3", "--foreground", "--config", "x.json",
			 "--api-key" };
	int argc = 8, i = 1;
	q3_err e;

	assert_int_equal(q3_settings_flag(&f, argc, argv, &i, &e), 1);
	assert_int_equal(i, 3);
	assert_string_equal(f.val[Q3_SET_PORT], "1234");
	assert_int_equal(q3_settings_flag(&f, argc, argv, &i, &e), 1);
	assert_string_equal(f.val[Q3_SET_MAX_BATCH], "3");
	assert_int_equal(q3_settings_flag(&f, argc, argv, &i, &e), 0); /* --foreground: not ours */
	assert_int_equal(i, 4);
	i = 5;
	assert_int_equal(q3_settings_flag(&f, argc, argv, &i, &e), 1);
	assert_string_equal(f.config, "x.json");
	assert_int_equal(q3_settings_flag(&f, argc, argv, &i, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "--api-key needs a value"));
}

static void test_bad_values_name_their_source_and_key(void **st)
{
	struct q3_settings s;
	struct q3_set_flags f = { 0 };
	q3_err e;

	f.val[Q3_SET_PORT] = "80x";
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "command line: port: '80x' is not an integer"));

	f.val[Q3_SET_PORT] = "70000";
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), -ERANGE);
	assert_non_null(strstr(e.msg, "port"));

	f.val[Q3_SET_PORT] = NULL;
	const char *knobs[] = { "read_chunk_kb", "lots", NULL };
	assert_int_equal(q3_settings_load(&s, &f, table_knob, knobs, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "knob /sys/test/read_chunk_kb: read_chunk: 'lots' is not a size"));

	write_config("{\"prot\": 80}");
	f.config = cfg_path;
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "unknown key 'prot'"));

	write_config("{\"port\": [80]}");
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "port: expected a string or an integer"));

	write_config("{\"port\": 80,}");
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "line 1"));

	f.config = "/nonexistent/qwen3d.json";
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "/nonexistent/qwen3d.json"));
}

static void test_json_view_hides_the_api_key_and_names_sources(void **st)
{
	struct q3_settings s;
	struct q3_set_flags f = { 0 };
	q3_err e;

	f.val[Q3_SET_API_KEY] = "sekrit";
	assert_int_equal(q3_settings_load(&s, &f, NULL, NULL, &e), 0);
	char *j = q3_settings_json(&s);
	assert_non_null(j);
	assert_null(strstr(j, "sekrit"));
	assert_non_null(strstr(j, "(set)"));
	assert_non_null(strstr(j, "\"source\": \"flag\""));
	assert_non_null(strstr(j, "\"source\": \"default\""));
	free(j);
	assert_int_equal(q3_settings_find("max-batch"), Q3_SET_MAX_BATCH);
	assert_int_equal(q3_settings_find("nope"), -1);
	q3_settings_free(&s);
}

int main(void)
{
	unsetenv("QWEN3D_CONFIG");
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_teardown(test_each_source_overrides_the_weaker_ones, teardown),
		cmocka_unit_test(test_flags_take_both_spellings_and_leave_other_arguments),
		cmocka_unit_test_teardown(test_bad_values_name_their_source_and_key, teardown),
		cmocka_unit_test(test_json_view_hides_the_api_key_and_names_sources),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
