/* test_api_request.c - request parsing and validation: every parameter's type and range, the
 * OpenAI error shape, chat normalisation (content parts, developer role, tools and tool_choice),
 * completion prompts as text or ids, and defaults from generation_config. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "api_request.h"

static struct q3_sampling defaults = { .temperature = 0.7f, .top_p = 0.8f, .top_k = 20 };

static int parse(enum q3_api_kind kind, const char *body, struct q3_api_req *r, struct q3_api_error *err)
{
	memset(err, 0, sizeof(*err));
	return q3_api_parse(kind, body, strlen(body), &defaults, 1000, r, err);
}

/* expects a 400 whose param and message contain the given texts */
static void expect_error(enum q3_api_kind kind, const char *body, const char *param, const char *msg_part)
{
	struct q3_api_req r;
	struct q3_api_error err;
	if (parse(kind, body, &r, &err) != -EINVAL)
		fail_msg("accepted: %s", body);
	assert_int_equal(err.status, 400);
	assert_string_equal(err.type, "invalid_request_error");
	if (strcmp(err.param, param))
		fail_msg("%s: param '%s', expected '%s' (%s)", body, err.param, param, err.message);
	if (!strstr(err.message, msg_part))
		fail_msg("%s: message '%s' lacks '%s'", body, err.message, msg_part);
}

static void test_a_full_chat_request_is_read_with_every_parameter(void **st)
{
	struct q3_api_req r;
	struct q3_api_error err;
	const char *body = "{\"model\":\"m\",\"messages\":[{\"role\":\"developer\",\"content\":\"be brief\"},"
			   "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hel\"},"
			   "{\"type\":\"text\",\"text\":\"lo\"}]}],"
			   "\"temperature\":0.5,\"top_p\":0.9,\"top_k\":-1,\"min_p\":0.1,\"presence_penalty\":1,"
			   "\"frequency_penalty\":-0.5,\"max_completion_tokens\":33,\"stop\":[\"a\",\"bc\"],"
			   "\"seed\":-7,\"stream\":true,\"stream_options\":{\"include_usage\":true},\"n\":1,"
			   "\"user\":\"u\",\"logprobs\":false,\"unknown_key\":[1],\"logit_bias\":{\"7\":-100,\"9\":2.5}}";
	assert_int_equal(parse(Q3_API_CHAT, body, &r, &err), 0);
	assert_string_equal(r.model, "m");
	assert_true(r.stream && r.include_usage);
	assert_float_equal(r.samp.temperature, 0.5, 1e-6);
	assert_float_equal(r.samp.top_p, 0.9, 1e-6);
	assert_int_equal(r.samp.top_k, 0);
	assert_float_equal(r.samp.min_p, 0.1, 1e-6);
	assert_float_equal(r.samp.presence_penalty, 1, 1e-6);
	assert_float_equal(r.samp.frequency_penalty, -0.5, 1e-6);
	assert_true(r.has_seed);
	assert_int_equal((int64_t)r.samp.seed, -7);
	assert_int_equal(r.max_tokens, 33);
	assert_int_equal(r.nstop, 2);
	assert_int_equal(r.samp.nbias, 2);
	assert_int_equal(r.samp.bias[1].id, 9);
	assert_float_equal(r.samp.bias[1].bias, 2.5, 1e-6);
	assert_string_equal(r.stop[1], "bc");
	assert_false(r.tools);
	char *chat = json_dumps(r.chat, JSON_COMPACT);
	assert_string_equal(chat, "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},"
				  "{\"role\":\"user\",\"content\":\"hello\"}],\"add_generation_prompt\":true}");
	free(chat);
	q3_api_req_free(&r);
}

static void test_absent_parameters_take_the_model_defaults(void **st)
{
	struct q3_api_req r;
	struct q3_api_error err;
	assert_int_equal(parse(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
					    "\"temperature\":null}", &r, &err), 0);
	assert_float_equal(r.samp.temperature, 0.7, 1e-6);
	assert_float_equal(r.samp.top_p, 0.8, 1e-6);
	assert_int_equal(r.samp.top_k, 20);
	assert_false(r.has_seed);
	assert_int_equal(r.max_tokens, 0);
	assert_false(r.stream);
	q3_api_req_free(&r);
}

static void test_wrong_types_and_ranges_name_the_parameter(void **st)
{
	const char *m = "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]";
	char body[512];
	static const struct {
		const char *extra, *param, *msg;
	} cases[] = {
		{ "\"temperature\":\"hot\"", "temperature", "expected a number, but got a string" },
		{ "\"temperature\":2.5", "temperature", "outside [0, 2]" },
		{ "\"top_p\":0", "top_p", "greater than 0" },
		{ "\"top_k\":1.5", "top_k", "expected an integer" },
		{ "\"max_tokens\":0", "max_tokens", "outside" },
		{ "\"max_tokens\":true", "max_tokens", "expected an integer, but got a boolean" },
		{ "\"n\":2", "n", "not supported" },
		{ "\"stream\":\"yes\"", "stream", "expected a boolean" },
		{ "\"stream_options\":{\"include_usage\":true}", "stream_options", "only allowed" },
		{ "\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]", "stop", "at most 4" },
		{ "\"stop\":[\"\"]", "stop", "1 to 256 bytes" },
		{ "\"stop\":5", "stop", "a string or an array" },
		{ "\"seed\":\"1\"", "seed", "expected an integer" },
		{ "\"presence_penalty\":-3", "presence_penalty", "outside" },
		{ "\"logprobs\":true", "logprobs", "not supported" },
		{ "\"logit_bias\":[1]", "logit_bias", "expected an object" },
		{ "\"logit_bias\":{\"x\":1}", "logit_bias", "not a token id" },
		{ "\"logit_bias\":{\"1000\":1}", "logit_bias", "not a token id" },
		{ "\"logit_bias\":{\"5\":101}", "logit_bias", "[-100, 100]" },
		{ "\"model\":5", "model", "expected a string" },
		{ "\"response_format\":{\"type\":\"json_object\"}", "response_format", "not supported" },
		{ "\"tool_choice\":\"auto\"", "tool_choice", "only allowed when 'tools'" },
		{ "\"tools\":{}", "tools", "expected an array" },
		{ "\"tools\":[{\"type\":\"function\",\"function\":{}}]", "tools[0]", "function.name" },
		{ "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
		  "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"g\"}}",
		  "tool_choice", "no tool named 'g'" },
		{ "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],\"tool_choice\":\"any\"",
		  "tool_choice", "Supported values" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		snprintf(body, sizeof(body), "{%s,%s}", m, cases[i].extra);
		expect_error(Q3_API_CHAT, body, cases[i].param, cases[i].msg);
	}
}

static void test_bad_messages_are_refused_with_their_index(void **st)
{
	expect_error(Q3_API_CHAT, "{}", "messages", "Missing required parameter");
	expect_error(Q3_API_CHAT, "{\"messages\":[]}", "messages", "empty array");
	expect_error(Q3_API_CHAT, "{\"messages\":\"hi\"}", "messages", "expected an array");
	expect_error(Q3_API_CHAT, "{\"messages\":[5]}", "messages[0]", "expected an object");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages[0].role", "Missing");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"bot\","
				  "\"content\":\"x\"}]}", "messages[1].role", "'bot'");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\"}]}", "messages[0].content", "Missing");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":7}]}", "messages[0].content",
		     "expected a string or an array of content parts");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
		     "messages[0].content", "'image_url' are not supported");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"tool_calls\":[]}]}",
		     "messages[0].tool_calls", "only allowed in assistant");
	expect_error(Q3_API_CHAT, "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"function\","
				  "\"function\":{\"name\":\"f\",\"arguments\":3}}]}]}",
		     "messages[0].tool_calls", "arguments");
}

static void test_malformed_json_and_non_objects_are_invalid_json(void **st)
{
	struct q3_api_req r;
	struct q3_api_error err;
	assert_int_equal(parse(Q3_API_CHAT, "{\"messages\": [", &r, &err), -EINVAL);
	assert_string_equal(err.code, "invalid_json");
	assert_non_null(strstr(err.message, "could not parse the JSON body"));
	assert_int_equal(parse(Q3_API_CHAT, "[1,2]", &r, &err), -EINVAL);
	assert_non_null(strstr(err.message, "must be a JSON object"));
	assert_int_equal(parse(Q3_API_CHAT, "{\"a\":1,\"a\":2}", &r, &err), -EINVAL);
	/* invalid UTF-8 */
	assert_int_equal(parse(Q3_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}", &r, &err),
			 -EINVAL);
	assert_string_equal(err.code, "invalid_json");
}

static void test_tools_follow_tool_choice(void **st)
{
	struct q3_api_req r;
	struct q3_api_error err;
	const char *tools = "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
			    "\"parameters\":{\"type\":\"object\"}}}]";
	char body[512];

	snprintf(body, sizeof(body), "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s}", tools);
	assert_int_equal(parse(Q3_API_CHAT, body, &r, &err), 0);
	assert_int_equal(r.tool_choice, Q3_TOOLS_AUTO);
	assert_true(r.tools);
	assert_non_null(json_object_get(r.chat, "tools"));
	q3_api_req_free(&r);

	snprintf(body, sizeof(body), "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s,"
				     "\"tool_choice\":\"none\"}", tools);
	assert_int_equal(parse(Q3_API_CHAT, body, &r, &err), 0);
	assert_false(r.tools);
	assert_null(json_object_get(r.chat, "tools"));
	q3_api_req_free(&r);

	snprintf(body, sizeof(body), "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\","
				     "\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\",\"function\":"
				     "{\"name\":\"get_weather\",\"arguments\":\"{}\"}}]},{\"role\":\"tool\","
				     "\"tool_call_id\":\"c1\",\"content\":\"sunny\"}],%s,\"tool_choice\":{\"type\":"
				     "\"function\",\"function\":{\"name\":\"get_weather\"}}}", tools);
	assert_int_equal(parse(Q3_API_CHAT, body, &r, &err), 0);
	assert_int_equal(r.tool_choice, Q3_TOOLS_NAMED);
	assert_string_equal(r.tool_name, "get_weather");
	json_t *msgs = json_object_get(r.chat, "messages");
	assert_int_equal(json_array_size(msgs), 3);
	assert_non_null(json_object_get(json_array_get(msgs, 1), "tool_calls"));
	assert_true(json_is_null(json_object_get(json_array_get(msgs, 1), "content")));
	q3_api_req_free(&r);
}

static void test_completion_prompts_as_text_or_ids(void **st)
{
	struct q3_api_req r;
	struct q3_api_error err;
	assert_int_equal(parse(Q3_API_COMPLETION, "{\"prompt\":\"Once upon\"}", &r, &err), 0);
	assert_string_equal(r.prompt, "Once upon");
	assert_int_equal(r.prompt_len, 9);
	q3_api_req_free(&r);
	assert_int_equal(parse(Q3_API_COMPLETION, "{\"prompt\":[\"one\"]}", &r, &err), 0);
	assert_string_equal(r.prompt, "one");
	q3_api_req_free(&r);
	assert_int_equal(parse(Q3_API_COMPLETION, "{\"prompt\":[[1,2,999]]}", &r, &err), 0);
	assert_int_equal(r.nprompt_ids, 3);
	assert_int_equal(r.prompt_ids[2], 999);
	q3_api_req_free(&r);

	expect_error(Q3_API_COMPLETION, "{}", "prompt", "Missing");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":\"\"}", "prompt", "empty");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":[1,1000]}", "prompt", "outside the vocabulary");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":[1,\"a\"]}", "prompt", "expected a string or an array");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":[\"a\",\"b\"]}", "prompt", "more than one prompt");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":\"a\",\"echo\":true}", "echo", "not supported");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":\"a\",\"best_of\":3}", "best_of", "not supported");
	expect_error(Q3_API_COMPLETION, "{\"prompt\":{}}", "prompt", "expected a string");
}

static void test_error_json_has_the_openai_shape(void **st)
{
	struct q3_api_error err;
	q3_api_errorf(&err, 400, "invalid_request_error", "temperature", "invalid_type", "Bad \"t\".");
	char *s = q3_api_error_json(&err);
	assert_string_equal(s, "{\"error\":{\"message\":\"Bad \\\"t\\\".\",\"type\":\"invalid_request_error\","
			       "\"param\":\"temperature\",\"code\":\"invalid_type\"}}");
	free(s);
	q3_api_errorf(&err, 401, "authentication_error", NULL, NULL, "No key.");
	s = q3_api_error_json(&err);
	assert_string_equal(s, "{\"error\":{\"message\":\"No key.\",\"type\":\"authentication_error\","
			       "\"param\":null,\"code\":null}}");
	free(s);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_a_full_chat_request_is_read_with_every_parameter),
		cmocka_unit_test(test_absent_parameters_take_the_model_defaults),
		cmocka_unit_test(test_wrong_types_and_ranges_name_the_parameter),
		cmocka_unit_test(test_bad_messages_are_refused_with_their_index),
		cmocka_unit_test(test_malformed_json_and_non_objects_are_invalid_json),
		cmocka_unit_test(test_tools_follow_tool_choice),
		cmocka_unit_test(test_completion_prompts_as_text_or_ids),
		cmocka_unit_test(test_error_json_has_the_openai_shape),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
