/* test_chat.c - the chat template against transformers' renderings (chat.jsonl: text and ids;
 * chat_extra.jsonl: edge cases rendered by jinja2 with transformers' settings), tojson against
 * Python's json.dumps (json_py.jsonl), request errors, and the template check of a folder. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "chat.h"
#include "json_py.h"
#include "tok_fixtures.h"
#include "tokenizer.h"

static struct q3_tok *tok;

static int setup(void **state)
{
	q3_err e;
	if (q3_tok_load(TOK_FIXTURES, &tok, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return -1;
	}
	return 0;
}

static int teardown(void **state)
{
	q3_tok_free(tok);
	return 0;
}

static void check_text(const char *got, size_t len, const char *want, size_t wlen, const char *file, int line)
{
	size_t i = 0;
	while (i < len && i < wlen && got[i] == want[i])
		i++;
	if (i == len && i == wlen)
		return;
	fail_msg("%s:%d: rendering differs at byte %zu: got \"%.40s\", want \"%.40s\"", file, line, i, got + i,
		 want + i);
}

static void check_chat(json_t *rec, int line, void *ctx)
{
	json_t *want = json_object_get(rec, "text");
	char *text;
	size_t len, n, nw;
	int32_t *ids, *wids;
	q3_err e;

	if (q3_chat_render(rec, &text, &len, &e))
		fail_msg("chat.jsonl:%d: %s", line, e.msg);
	check_text(text, len, json_string_value(want), json_string_length(want), "chat.jsonl", line);
	assert_int_equal(q3_tok_encode(tok, text, len, &ids, &n, &e), 0);
	wids = json_ids(json_object_get(rec, "ids"), &nw);
	assert_int_equal(n, nw);
	assert_memory_equal(ids, wids, n * sizeof(*ids));
	(*(int *)ctx)++;
	free(ids);
	free(wids);
	free(text);
}

static void test_chat_vectors(void **state)
{
	int n = 0;
	for_each_jsonl("chat.jsonl", check_chat, &n);
	assert_int_equal(n, 16);
}

static void check_extra(json_t *rec, int line, void *ctx)
{
	json_t *req = json_object_get(rec, "request"), *want = json_object_get(rec, "text");
	char *text;
	size_t len;
	q3_err e;
	int rc = q3_chat_render(req, &text, &len, &e);

	if (json_object_get(rec, "error")) { /* transformers raises: so must we, naming the part */
		assert_int_equal(rc, -EINVAL);
		assert_non_null(strstr(e.msg, "messages[0].content"));
		return;
	}
	if (rc)
		fail_msg("chat_extra.jsonl:%d: %s", line, e.msg);
	check_text(text, len, json_string_value(want), json_string_length(want), "chat_extra.jsonl", line);
	(*(int *)ctx)++;
	free(text);
}

static void test_chat_extra(void **state)
{
	int n = 0;
	assert_int_equal(for_each_jsonl("chat_extra.jsonl", check_extra, &n), 32);
	assert_int_equal(n, 28);
}

static void check_json_py(json_t *rec, int line, void *ctx)
{
	json_t *in = json_object_get(rec, "json"), *want = json_object_get(rec, "python");
	json_error_t je;
	json_t *x = json_loadb(json_string_value(in), json_string_length(in), JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
	if (!x)
		fail_msg("json_py.jsonl:%d: %s", line, je.text);
	char *got = q3_json_py_str(x);
	assert_non_null(got);
	if (strlen(got) != json_string_length(want) || memcmp(got, json_string_value(want), strlen(got)))
		fail_msg("json_py.jsonl:%d: %s -> %s, Python gives %s", line, json_string_value(in), got,
			 json_string_value(want));
	free(got);
	json_decref(x);
}

static void test_json_py(void **state)
{
	assert_int_equal(for_each_jsonl("json_py.jsonl", check_json_py, NULL), 55);
}

/* What the template renders without add_generation_prompt: the OpenAI default, true. */
static void test_defaults(void **state)
{
	json_t *req = json_pack("{s:[{s:s,s:s}]}", "messages", "role", "user", "content", "hi");
	char *text;
	size_t len;
	q3_err e;

	assert_int_equal(q3_chat_render(req, &text, &len, &e), 0);
	assert_string_equal(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
	assert_int_equal(len, strlen(text));
	free(text);
	json_object_set_new(req, "add_generation_prompt", json_false());
	json_object_set_new(req, "tools", json_null());
	json_object_set_new(req, "model", json_string("ignored"));
	assert_int_equal(q3_chat_render(req, &text, &len, &e), 0);
	assert_string_equal(text, "<|im_start|>user\nhi<|im_end|>\n");
	free(text);
	json_decref(req);
}

static void test_errors(void **state)
{
	static const struct {
		const char *req, *want;
	} cases[] = {
		{ "[]", "request: expected a JSON object" },
		{ "{}", "messages: expected a non-empty array" },
		{ "{\"messages\": []}", "messages: expected a non-empty array" },
		{ "{\"messages\": [\"hi\"]}", "messages[0]: expected an object" },
		{ "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"content\": \"b\"}]}",
		  "messages[1].role: expected a string" },
		{ "{\"messages\": [{\"role\": \"user\"}, {\"role\": \"user\"}, {\"role\": 3}]}",
		  "messages[2].role: expected a string" },
		{ "{\"messages\": [{\"role\": \"developer\", \"content\": \"x\"}]}",
		  "messages[0].role: unknown role \"developer\"" },
		{ "{\"messages\": [{\"role\": \"user\"}], \"tools\": {}}", "tools: expected an array or null" },
		{ "{\"messages\": [{\"role\": \"user\"}], \"add_generation_prompt\": 1}",
		  "add_generation_prompt: expected true or false" },
		{ "{\"messages\": [{\"role\": \"system\", \"content\": null}]}", "messages[0].content: expected a string" },
		{ "{\"messages\": [{\"role\": \"user\"}, {\"role\": \"assistant\", \"tool_calls\": {}}]}",
		  "messages[1].tool_calls: expected an array or null" },
		{ "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [1]}]}",
		  "messages[0].tool_calls[0]: expected an object" },
		{ "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [{\"function\": \"f\"}]}]}",
		  "messages[0].tool_calls[0].function: expected an object" },
		{ "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [{\"function\": {\"arguments\": {}}}]}]}",
		  "messages[0].tool_calls[0].function.name: expected a string" },
		{ "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [{\"function\": {}}]}]}",
		  "messages[0].tool_calls[0].name: expected a string" },
		{ "{\"messages\": [{\"role\": \"assistant\", \"tool_calls\": [{\"type\": \"function\", \"function\": "
		  "{\"name\": \"f\"}}]}]}", "messages[0].tool_calls[0].function.arguments: missing" },
	};
	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		json_error_t je;
		json_t *req = json_loads(cases[i].req, 0, &je);
		char *text = (char *)1;
		size_t len;
		q3_err e;
		assert_non_null(req);
		assert_int_equal(q3_chat_render(req, &text, &len, &e), -EINVAL);
		assert_null(text);
		if (!strstr(e.msg, cases[i].want))
			fail_msg("case %zu: \"%s\" lacks \"%s\"", i, e.msg, cases[i].want);
		json_decref(req);
	}
}

static void write_file(const char *dir, const char *name, const char *data)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(data, f);
	assert_int_equal(fclose(f), 0);
}

static void test_check_template(void **state)
{
	char dir[] = "/tmp/q3chatXXXXXX", path[512], *file;
	size_t len;
	q3_err e;

	/* the embedded copy is the fixture's chat_template.jinja, byte for byte */
	assert_int_equal(q3_read_file(TOK_FIXTURES "/chat_template.jinja", 1 << 20, &file, &len, &e), 0);
	assert_string_equal(file, q3_chat_template_text);
	free(file);
	assert_int_equal(q3_chat_check_template(TOK_FIXTURES, &e), 0);

	assert_non_null(mkdtemp(dir));
	assert_int_equal(q3_chat_check_template(dir, &e), -ENOENT);
	write_file(dir, "tokenizer_config.json", "{\"chat_template\": \"{{ messages }}\"}");
	assert_int_equal(q3_chat_check_template(dir, &e), 1);
	assert_non_null(strstr(e.msg, "differs"));
	write_file(dir, "tokenizer_config.json", "{}");
	assert_int_equal(q3_chat_check_template(dir, &e), 1);
	assert_non_null(strstr(e.msg, "no chat_template"));
	json_t *cfg = json_pack("{s:[{s:s,s:s},{s:s,s:s}]}", "chat_template", "name", "tool_use", "template", "x",
				"name", "default", "template", q3_chat_template_text);
	char *s = json_dumps(cfg, 0);
	write_file(dir, "tokenizer_config.json", s);
	free(s);
	json_decref(cfg);
	assert_int_equal(q3_chat_check_template(dir, &e), 0);
	write_file(dir, "tokenizer_config.json", "{nope");
	assert_int_equal(q3_chat_check_template(dir, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "tokenizer_config.json: line 1"));
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	unlink(path);
	rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_chat_vectors),
		cmocka_unit_test(test_chat_extra),
		cmocka_unit_test(test_json_py),
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_check_template),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
