/* api_request.c - parsing and validation of OpenAI chat/completion request bodies (see
 * api_request.h). */
#include "api_request.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BAD 400
#define INVALID "invalid_request_error"

int q3_api_errorf(struct q3_api_error *err, int status, const char *type, const char *param,
		  const char *code, const char *fmt, ...)
{
	va_list ap;

	err->status = status;
	err->type = type;
	err->code = code;
	snprintf(err->param, sizeof(err->param), "%s", param ? param : "");
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return -EINVAL;
}

char *q3_api_error_json(const struct q3_api_error *err)
{
	json_t *o = json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", err->message, "type",
			      err->type ? err->type : INVALID, "param",
			      *err->param ? json_string(err->param) : json_null(), "code",
			      err->code ? json_string(err->code) : json_null());
	char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
	json_decref(o);
	return s;
}

static const char *type_name(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT: return "an object";
	case JSON_ARRAY: return "an array";
	case JSON_STRING: return "a string";
	case JSON_INTEGER: return "an integer";
	case JSON_REAL: return "a number";
	case JSON_TRUE:
	case JSON_FALSE: return "a boolean";
	default: return "null";
	}
}

static int wrong_type(struct q3_api_error *err, const char *param, const char *want, const json_t *v)
{
	return q3_api_errorf(err, BAD, INVALID, param, "invalid_type",
			     "Invalid type for '%s': expected %s, but got %s instead.", param, want,
			     type_name(v));
}

/* The value of key, NULL if absent or null. */
static json_t *opt(const json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);
	return json_is_null(v) ? NULL : v;
}

/* A number in [lo, hi] into *out (unchanged when absent). */
static int get_num(const json_t *o, const char *key, double lo, double hi, float *out,
		   struct q3_api_error *err)
{
	json_t *v = opt(o, key);
	if (!v)
		return 0;
	if (!json_is_number(v))
		return wrong_type(err, key, "a number", v);
	double x = json_number_value(v);
	if (!(x >= lo && x <= hi))
		return q3_api_errorf(err, BAD, INVALID, key, "invalid_value",
				     "Invalid '%s': %g is outside [%g, %g].", key, x, lo, hi);
	*out = (float)x;
	return 0;
}

static int get_int(const json_t *o, const char *key, json_int_t lo, json_int_t hi, json_int_t *out,
		   bool *given, struct q3_api_error *err)
{
	json_t *v = opt(o, key);
	if (given)
		*given = v != NULL;
	if (!v)
		return 0;
	if (!json_is_integer(v))
		return wrong_type(err, key, "an integer", v);
	json_int_t x = json_integer_value(v);
	if (x < lo || x > hi)
		return q3_api_errorf(err, BAD, INVALID, key, "invalid_value",
				     "Invalid '%s': %" JSON_INTEGER_FORMAT " is outside [%" JSON_INTEGER_FORMAT
				     ", %" JSON_INTEGER_FORMAT "].",
				     key, x, lo, hi);
	*out = x;
	return 0;
}

static int get_bool(const json_t *o, const char *key, bool *out, struct q3_api_error *err)
{
	json_t *v = opt(o, key);
	if (!v)
		return 0;
	if (!json_is_boolean(v))
		return wrong_type(err, key, "a boolean", v);
	*out = json_is_true(v);
	return 0;
}

static int unsupported(struct q3_api_error *err, const char *param, const char *what)
{
	return q3_api_errorf(err, BAD, INVALID, param, "unsupported_value", "'%s': %s is not supported.",
			     param, what);
}

/* ---- sampling, limits and stop strings: the keys both endpoints share ---------------------- */

/* "logit_bias": {"token id": bias in [-100, 100], ...} */
static int parse_bias(json_t *root, int vocab, struct q3_api_req *r, struct q3_api_error *err)
{
	json_t *v = opt(root, "logit_bias"), *b;
	const char *key;

	if (!v)
		return 0;
	if (!json_is_object(v))
		return wrong_type(err, "logit_bias", "an object", v);
	if (json_object_size(v) > Q3_API_MAX_BIAS)
		return q3_api_errorf(err, BAD, INVALID, "logit_bias", "invalid_value",
				     "Invalid 'logit_bias': at most %d entries.", Q3_API_MAX_BIAS);
	if (!(r->bias = malloc(Q3_MAX(json_object_size(v), 1) * sizeof(*r->bias))))
		return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
	json_object_foreach(v, key, b) {
		char *end;
		long id = strtol(key, &end, 10);
		if (!*key || *end || id < 0 || id >= vocab)
			return q3_api_errorf(err, BAD, INVALID, "logit_bias", "invalid_value",
					     "Invalid 'logit_bias': key '%.32s' is not a token id in [0, %d).", key,
					     vocab);
		if (!json_is_number(b) || json_number_value(b) < -100 || json_number_value(b) > 100)
			return q3_api_errorf(err, BAD, INVALID, "logit_bias", "invalid_value",
					     "Invalid 'logit_bias': the bias of '%.32s' must be a number in [-100, 100].",
					     key);
		r->bias[r->samp.nbias++] = (struct q3_logit_bias){ (int32_t)id, (float)json_number_value(b) };
	}
	r->samp.bias = r->bias;
	return 0;
}

static int parse_common(json_t *root, int vocab, struct q3_api_req *r, struct q3_api_error *err)
{
	json_int_t x;
	bool given;
	json_t *v;
	int rc;

	if ((v = opt(root, "model")) && !json_is_string(v))
		return wrong_type(err, "model", "a string", v);
	r->model = v ? json_string_value(v) : NULL;
	if ((rc = get_bool(root, "stream", &r->stream, err)))
		return rc;
	if ((v = opt(root, "stream_options"))) {
		if (!json_is_object(v))
			return wrong_type(err, "stream_options", "an object", v);
		if (!r->stream)
			return q3_api_errorf(err, BAD, INVALID, "stream_options", "invalid_value",
					     "'stream_options' is only allowed when 'stream' is true.");
		if ((rc = get_bool(v, "include_usage", &r->include_usage, err)))
			return rc;
	}
	if ((rc = get_num(root, "temperature", 0, 2, &r->samp.temperature, err)) ||
	    (rc = get_num(root, "top_p", 0, 1, &r->samp.top_p, err)) ||
	    (rc = get_num(root, "min_p", 0, 1, &r->samp.min_p, err)) ||
	    (rc = get_num(root, "presence_penalty", -2, 2, &r->samp.presence_penalty, err)) ||
	    (rc = get_num(root, "frequency_penalty", -2, 2, &r->samp.frequency_penalty, err)))
		return rc;
	if ((rc = parse_bias(root, vocab, r, err)))
		return rc;
	if (r->samp.top_p <= 0)
		return q3_api_errorf(err, BAD, INVALID, "top_p", "invalid_value",
				     "Invalid 'top_p': must be greater than 0.");
	x = r->samp.top_k;
	if ((rc = get_int(root, "top_k", -1, 1 << 30, &x, NULL, err)))
		return rc;
	r->samp.top_k = x < 0 ? 0 : (int)x; /* -1 means off, as in vLLM */
	x = 0;
	if ((rc = get_int(root, "seed", INT64_MIN, INT64_MAX, &x, &r->has_seed, err)))
		return rc;
	r->samp.seed = (uint64_t)x;
	x = 0;
	if ((rc = get_int(root, "max_tokens", 1, 1 << 30, &x, &given, err)))
		return rc;
	if ((rc = get_int(root, "max_completion_tokens", 1, 1 << 30, &x, &given, err)))
		return rc;
	r->max_tokens = (int)x;
	x = 1;
	if ((rc = get_int(root, "n", 1, 1 << 30, &x, NULL, err)))
		return rc;
	if (x != 1)
		return unsupported(err, "n", "more than one choice");
	if ((v = opt(root, "logprobs")) && !json_is_false(v)) {
		if (!json_is_boolean(v) && !json_is_integer(v))
			return wrong_type(err, "logprobs", "a boolean", v);
		if (!(json_is_integer(v) && json_integer_value(v) == 0))
			return unsupported(err, "logprobs", "returning log probabilities");
	}
	if (opt(root, "top_logprobs"))
		return unsupported(err, "top_logprobs", "returning log probabilities");
	if ((v = opt(root, "stop"))) {
		json_t *one[1] = { v };
		json_t **items = one;
		size_t n = 1;
		if (json_is_array(v)) {
			n = json_array_size(v);
			if (n > Q3_API_MAX_STOP)
				return q3_api_errorf(err, BAD, INVALID, "stop", "invalid_value",
						     "Invalid 'stop': at most %d sequences, got %zu.",
						     Q3_API_MAX_STOP, n);
			items = NULL;
		} else if (!json_is_string(v)) {
			return wrong_type(err, "stop", "a string or an array of strings", v);
		}
		for (size_t i = 0; i < n; i++) {
			json_t *s = items ? items[i] : json_array_get(v, i);
			if (!json_is_string(s))
				return wrong_type(err, "stop", "a string or an array of strings", s);
			size_t len = json_string_length(s);
			if (len == 0 || len > Q3_API_MAX_STOP_LEN || strlen(json_string_value(s)) != len)
				return q3_api_errorf(err, BAD, INVALID, "stop", "invalid_value",
						     "Invalid 'stop': each sequence must have 1 to %d bytes"
						     " and no NUL.",
						     Q3_API_MAX_STOP_LEN);
			r->stop[r->nstop++] = json_string_value(s);
		}
	}
	return 0;
}

/* ---- chat ---------------------------------------------------------------------------------- */

/* content: a string, null, or an array of {"type": "text", "text": ...} parts, joined. */
static int content_text(json_t *content, const char *param, json_t **out, struct q3_api_error *err)
{
	if (!content || json_is_null(content) || json_is_string(content)) {
		*out = content ? json_incref(content) : json_null();
		return 0;
	}
	if (!json_is_array(content))
		return wrong_type(err, param, "a string or an array of content parts", content);
	size_t total = 0, i;
	json_t *part;
	json_array_foreach(content, i, part) {
		json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
		if (!json_is_object(part) || !json_is_string(type))
			return wrong_type(err, param, "an array of content parts with a 'type'", part);
		if (strcmp(json_string_value(type), "text"))
			return q3_api_errorf(err, BAD, INVALID, param, "unsupported_value",
					     "'%s': content parts of type '%s' are not supported (text only).",
					     param, json_string_value(type));
		if (!json_is_string(text))
			return wrong_type(err, param, "text parts with a string 'text'", text ? text : part);
		total += json_string_length(text);
	}
	char *buf = malloc(total + 1), *p = buf;
	if (!buf)
		return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
	json_array_foreach(content, i, part) {
		json_t *text = json_object_get(part, "text");
		memcpy(p, json_string_value(text), json_string_length(text));
		p += json_string_length(text);
	}
	*out = json_stringn_nocheck(buf, total);
	free(buf);
	return *out ? 0 : q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
}

static int check_tool_calls(json_t *calls, const char *param, struct q3_api_error *err)
{
	size_t i;
	json_t *c;

	if (!json_is_array(calls))
		return wrong_type(err, param, "an array", calls);
	json_array_foreach(calls, i, c) {
		json_t *fn = json_object_get(c, "function");
		if (!json_is_object(c) || !json_is_object(fn))
			return wrong_type(err, param, "an array of {\"type\": \"function\", \"function\": {...}}",
					  c);
		if (!json_is_string(json_object_get(fn, "name")))
			return q3_api_errorf(err, BAD, INVALID, param, "invalid_value",
					     "'%s[%zu].function.name' must be a string.", param, i);
		json_t *args = json_object_get(fn, "arguments");
		if (!json_is_string(args) && !json_is_object(args))
			return q3_api_errorf(err, BAD, INVALID, param, "invalid_value",
					     "'%s[%zu].function.arguments' must be a JSON string.", param, i);
	}
	return 0;
}

static int parse_messages(json_t *root, json_t *out, struct q3_api_error *err)
{
	json_t *msgs = json_object_get(root, "messages"), *m;
	size_t i;

	if (!msgs || json_is_null(msgs))
		return q3_api_errorf(err, BAD, INVALID, "messages", "missing_required_parameter",
				     "Missing required parameter: 'messages'.");
	if (!json_is_array(msgs))
		return wrong_type(err, "messages", "an array", msgs);
	if (json_array_size(msgs) == 0)
		return q3_api_errorf(err, BAD, INVALID, "messages", "invalid_value",
				     "Invalid 'messages': empty array. Expected at least one message.");
	json_array_foreach(msgs, i, m) {
		char param[48];
		snprintf(param, sizeof(param), "messages[%zu]", i);
		if (!json_is_object(m))
			return wrong_type(err, param, "an object", m);
		json_t *role = json_object_get(m, "role"), *calls = opt(m, "tool_calls"), *content;
		snprintf(param, sizeof(param), "messages[%zu].role", i);
		if (!json_is_string(role))
			return role ? wrong_type(err, param, "a string", role)
				    : q3_api_errorf(err, BAD, INVALID, param, "missing_required_parameter",
						    "Missing required parameter: '%s'.", param);
		const char *rs = json_string_value(role);
		if (!strcmp(rs, "developer"))
			rs = "system";
		if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") && strcmp(rs, "tool"))
			return q3_api_errorf(err, BAD, INVALID, param, "invalid_value",
					     "Invalid value: '%.32s'. Supported values are: 'system', 'developer',"
					     " 'user', 'assistant' and 'tool'.",
					     json_string_value(role));
		snprintf(param, sizeof(param), "messages[%zu].content", i);
		json_t *c = json_object_get(m, "content");
		if (strcmp(rs, "assistant") && (!c || json_is_null(c)))
			return q3_api_errorf(err, BAD, INVALID, param, "missing_required_parameter",
					     "Missing required parameter: '%s'.", param);
		int rc = content_text(c, param, &content, err);
		if (rc)
			return rc;
		json_t *nm = json_pack("{s:s, s:o}", "role", rs, "content", content);
		if (calls) {
			snprintf(param, sizeof(param), "messages[%zu].tool_calls", i);
			if (strcmp(rs, "assistant")) {
				json_decref(nm);
				return q3_api_errorf(err, BAD, INVALID, param, "invalid_value",
						     "'%s' is only allowed in assistant messages.", param);
			}
			if ((rc = check_tool_calls(calls, param, err))) {
				json_decref(nm);
				return rc;
			}
			json_object_set(nm, "tool_calls", calls);
		}
		if (!nm || json_array_append_new(out, nm))
			return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
	}
	return 0;
}

static bool tool_named(const json_t *tools, const char *name)
{
	size_t i;
	json_t *t;
	json_array_foreach(tools, i, t) {
		const char *n = json_string_value(json_object_get(json_object_get(t, "function"), "name"));
		if (n && !strcmp(n, name))
			return true;
	}
	return false;
}

static int parse_tools(json_t *root, struct q3_api_req *r, struct q3_api_error *err)
{
	json_t *tools = opt(root, "tools"), *choice = opt(root, "tool_choice"), *t;
	size_t i;

	if (tools) {
		if (!json_is_array(tools))
			return wrong_type(err, "tools", "an array", tools);
		json_array_foreach(tools, i, t) {
			json_t *fn = json_object_get(t, "function"), *type = json_object_get(t, "type");
			char param[32];
			snprintf(param, sizeof(param), "tools[%zu]", i);
			if (!json_is_object(t) || !json_is_object(fn))
				return wrong_type(err, param, "a {\"type\": \"function\", \"function\": {...}} object",
						  t);
			if (!json_is_string(type) || strcmp(json_string_value(type), "function"))
				return q3_api_errorf(err, BAD, INVALID, param, "invalid_value",
						     "'%s.type' must be 'function'.", param);
			if (!json_is_string(json_object_get(fn, "name")))
				return q3_api_errorf(err, BAD, INVALID, param, "missing_required_parameter",
						     "Missing required parameter: '%s.function.name'.", param);
			json_t *params = opt(fn, "parameters");
			if (params && !json_is_object(params))
				return wrong_type(err, param, "'function.parameters' as an object", params);
		}
	}
	bool have = tools && json_array_size(tools) > 0;
	r->tool_choice = have ? Q3_TOOLS_AUTO : Q3_TOOLS_NONE;
	if (choice) {
		const char *s = json_string_value(choice);
		if (json_is_string(choice) && !strcmp(s, "none")) {
			r->tool_choice = Q3_TOOLS_NONE;
		} else if (json_is_string(choice) && (!strcmp(s, "auto") || !strcmp(s, "required"))) {
			r->tool_choice = !strcmp(s, "auto") ? Q3_TOOLS_AUTO : Q3_TOOLS_REQUIRED;
		} else if (json_is_object(choice)) {
			const char *name =
				json_string_value(json_object_get(json_object_get(choice, "function"), "name"));
			if (!name)
				return q3_api_errorf(err, BAD, INVALID, "tool_choice", "invalid_value",
						     "Invalid 'tool_choice': expected {\"type\": \"function\", "
						     "\"function\": {\"name\": ...}}.");
			r->tool_choice = Q3_TOOLS_NAMED;
			r->tool_name = name;
		} else if (json_is_string(choice)) {
			return q3_api_errorf(err, BAD, INVALID, "tool_choice", "invalid_value",
					     "Invalid 'tool_choice': '%.32s'. Supported values are: 'none', 'auto',"
					     " 'required' or a named function.",
					     s);
		} else {
			return wrong_type(err, "tool_choice", "a string or an object", choice);
		}
		if (r->tool_choice != Q3_TOOLS_NONE && !have)
			return q3_api_errorf(err, BAD, INVALID, "tool_choice", "invalid_value",
					     "'tool_choice' is only allowed when 'tools' are given.");
		if (r->tool_choice == Q3_TOOLS_NAMED && !tool_named(tools, r->tool_name))
			return q3_api_errorf(err, BAD, INVALID, "tool_choice", "invalid_value",
					     "Invalid 'tool_choice': no tool named '%.64s' in 'tools'.",
					     r->tool_name);
	}
	r->tools = r->tool_choice != Q3_TOOLS_NONE;
	if (r->tools && json_object_set(r->chat, "tools", tools))
		return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
	return 0;
}

static int parse_chat(json_t *root, struct q3_api_req *r, struct q3_api_error *err)
{
	json_t *msgs = json_array(), *v;
	int rc;

	r->chat = json_pack("{s:o, s:b}", "messages", msgs, "add_generation_prompt", 1);
	if (!r->chat)
		return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
	if ((rc = parse_messages(root, msgs, err)) || (rc = parse_tools(root, r, err)))
		return rc;
	if ((v = opt(root, "response_format"))) {
		const char *type = json_string_value(json_object_get(v, "type"));
		if (!json_is_object(v) || !type)
			return wrong_type(err, "response_format", "an object with a 'type'", v);
		if (strcmp(type, "text"))
			return unsupported(err, "response_format", "a format other than 'text'");
	}
	return 0;
}

/* ---- completions --------------------------------------------------------------------------- */

static int parse_ids(json_t *arr, int vocab, struct q3_api_req *r, struct q3_api_error *err)
{
	size_t n = json_array_size(arr), i;
	json_t *v;

	if (n == 0)
		return q3_api_errorf(err, BAD, INVALID, "prompt", "invalid_value", "Invalid 'prompt': empty.");
	if (!(r->prompt_ids = malloc(n * sizeof(*r->prompt_ids))))
		return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
	json_array_foreach(arr, i, v) {
		if (!json_is_integer(v))
			return wrong_type(err, "prompt", "a string or an array of token ids", v);
		json_int_t id = json_integer_value(v);
		if (id < 0 || id >= vocab)
			return q3_api_errorf(err, BAD, INVALID, "prompt", "invalid_value",
					     "Invalid 'prompt': token id %" JSON_INTEGER_FORMAT
					     " is outside the vocabulary [0, %d).",
					     id, vocab);
		r->prompt_ids[i] = (int32_t)id;
	}
	r->nprompt_ids = (int)n;
	return 0;
}

static int parse_completion(json_t *root, int vocab, struct q3_api_req *r, struct q3_api_error *err)
{
	json_t *p = opt(root, "prompt"), *v;
	bool echo = false;
	int rc;

	if (!p)
		return q3_api_errorf(err, BAD, INVALID, "prompt", "missing_required_parameter",
				     "Missing required parameter: 'prompt'.");
	if (json_is_array(p) && json_array_size(p) == 1 &&
	    (json_is_string(json_array_get(p, 0)) || json_is_array(json_array_get(p, 0))))
		p = json_array_get(p, 0); /* a batch of one */
	if (json_is_string(p)) {
		r->prompt = json_string_value(p);
		r->prompt_len = json_string_length(p);
		if (r->prompt_len == 0)
			return q3_api_errorf(err, BAD, INVALID, "prompt", "invalid_value",
					     "Invalid 'prompt': empty.");
	} else if (json_is_array(p)) {
		json_t *first = json_array_get(p, 0);
		if (json_is_string(first) || json_is_array(first))
			return unsupported(err, "prompt", "more than one prompt per request");
		if ((rc = parse_ids(p, vocab, r, err)))
			return rc;
	} else {
		return wrong_type(err, "prompt", "a string or an array of token ids", p);
	}
	if ((rc = get_bool(root, "echo", &echo, err)))
		return rc;
	if (echo)
		return unsupported(err, "echo", "echoing the prompt");
	if ((v = opt(root, "suffix")) && !(json_is_string(v) && json_string_length(v) == 0))
		return unsupported(err, "suffix", "a suffix");
	json_int_t best_of = 1;
	if ((rc = get_int(root, "best_of", 1, 1 << 30, &best_of, NULL, err)))
		return rc;
	if (best_of != 1)
		return unsupported(err, "best_of", "more than one candidate");
	return 0;
}

int q3_api_parse(enum q3_api_kind kind, const char *body, size_t len, const struct q3_sampling *defaults,
		 int vocab, struct q3_api_req *r, struct q3_api_error *err)
{
	json_error_t je;
	int rc;

	memset(r, 0, sizeof(*r));
	r->kind = kind;
	r->samp = *defaults;
	r->samp.bias = NULL;
	r->samp.nbias = 0;
	r->root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
	if (!r->root)
		return q3_api_errorf(err, BAD, INVALID, NULL, "invalid_json",
				     "We could not parse the JSON body of your request: %s (line %d, column %d).",
				     je.text, je.line, je.column);
	if (!json_is_object(r->root)) {
		rc = q3_api_errorf(err, BAD, INVALID, NULL, "invalid_json",
				   "The request body must be a JSON object, not %s.", type_name(r->root));
		goto fail;
	}
	if ((rc = parse_common(r->root, vocab, r, err)))
		goto fail;
	rc = kind == Q3_API_CHAT ? parse_chat(r->root, r, err) : parse_completion(r->root, vocab, r, err);
	if (rc)
		goto fail;
	return 0;
fail:
	q3_api_req_free(r);
	return rc;
}

void q3_api_req_free(struct q3_api_req *r)
{
	json_decref(r->chat);
	json_decref(r->root);
	free(r->prompt_ids);
	free(r->bias);
	memset(r, 0, sizeof(*r));
}
