/* api_response.c - OpenAI response objects, streaming chunks and the model list (see
 * api_response.h). */
#include "api_response.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "version.h"

void q3_api_resp_init(struct q3_api_resp *r, enum q3_api_kind kind, const char *model)
{
	unsigned char rnd[12];
	char hex[25];

	if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd))
		memset(rnd, 0, sizeof(rnd));
	for (size_t i = 0; i < sizeof(rnd); i++)
		snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
	snprintf(r->id, sizeof(r->id), "%s-%s", kind == Q3_API_CHAT ? "chatcmpl" : "cmpl", hex);
	r->kind = kind;
	r->created = time(NULL);
	r->model = model;
}

const char *q3_api_finish_reason(enum q3_finish f, bool tool_calls)
{
	switch (f) {
	case Q3_FINISH_STOP: return tool_calls ? "tool_calls" : "stop";
	case Q3_FINISH_LENGTH: return "length";
	case Q3_FINISH_NONE: return NULL;
	default: return "stop";
	}
}

static json_t *text_value(const char *text, size_t len)
{
	json_t *s = json_stringn(text, len);
	return s ? s : json_string(""); /* never: the worker emits valid UTF-8 */
}

static json_t *usage_json(const struct q3_api_usage *u)
{
	return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", u->prompt, "completion_tokens",
			 u->completion, "total_tokens", u->prompt + u->completion, "prompt_tokens_details",
			 "cached_tokens", u->cached);
}

static json_t *envelope(const struct q3_api_resp *r, const char *object)
{
	return json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", r->id, "object", object, "created",
			 (json_int_t)r->created, "model", r->model, "system_fingerprint", "qwen3d-" QWEN3D_VERSION);
}

static char *dump(json_t *o)
{
	char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
	json_decref(o);
	return s;
}

char *q3_api_response_json(const struct q3_api_resp *r, const char *text, size_t len, json_t *tool_calls,
			   const char *finish, const struct q3_api_usage *u)
{
	bool chat = r->kind == Q3_API_CHAT;
	json_t *o = envelope(r, chat ? "chat.completion" : "text_completion"), *choice;

	if (chat) {
		bool calls = tool_calls && json_array_size(tool_calls) > 0;
		json_t *msg = json_pack("{s:s, s:o}", "role", "assistant", "content",
					calls && len == 0 ? json_null() : text_value(text, len));
		if (msg && calls)
			json_object_set(msg, "tool_calls", tool_calls);
		choice = json_pack("{s:i, s:o, s:n, s:s}", "index", 0, "message", msg, "logprobs", "finish_reason",
				   finish);
	} else {
		choice = json_pack("{s:o, s:i, s:n, s:s}", "text", text_value(text, len), "index", 0, "logprobs",
				   "finish_reason", finish);
	}
	if (o) {
		json_object_set_new(o, "choices", json_pack("[o]", choice));
		json_object_set_new(o, "usage", usage_json(u));
	} else {
		json_decref(choice);
	}
	return dump(o);
}

int q3_api_buf_add(char **out, size_t *len, size_t *cap, const char *s, size_t n)
{
	if (*len + n + 1 > *cap) {
		size_t c = Q3_MAX(*cap * 2, *len + n + 1);
		char *b = realloc(*out, c);
		if (!b)
			return -ENOMEM;
		*out = b;
		*cap = c;
	}
	memcpy(*out + *len, s, n);
	*len += n;
	(*out)[*len] = 0;
	return 0;
}

static int add_event(char **out, size_t *len, size_t *cap, json_t *o)
{
	char *s = dump(o);
	int rc;

	if (!s)
		return -ENOMEM;
	rc = q3_api_buf_add(out, len, cap, "data: ", 6);
	if (!rc)
		rc = q3_api_buf_add(out, len, cap, s, strlen(s));
	if (!rc)
		rc = q3_api_buf_add(out, len, cap, "\n\n", 2);
	free(s);
	return rc;
}

int q3_api_chunk_sse(struct q3_api_resp *r, char **out, size_t *len, size_t *cap, json_t *delta,
		     const char *text, size_t tlen, const char *finish)
{
	bool chat = r->kind == Q3_API_CHAT;
	json_t *o = envelope(r, chat ? "chat.completion.chunk" : "text_completion"), *choice;

	if (chat)
		choice = json_pack("{s:i, s:o, s:n, s:o}", "index", 0, "delta", delta ? delta : json_object(),
				   "logprobs", "finish_reason", finish ? json_string(finish) : json_null());
	else
		choice = json_pack("{s:o, s:i, s:n, s:o}", "text", text_value(text, tlen), "index", 0, "logprobs",
				   "finish_reason", finish ? json_string(finish) : json_null());
	if (!o || !choice) {
		json_decref(o);
		json_decref(choice);
		return -ENOMEM;
	}
	json_object_set_new(o, "choices", json_pack("[o]", choice));
	return add_event(out, len, cap, o);
}

int q3_api_usage_sse(struct q3_api_resp *r, char **out, size_t *len, size_t *cap, const struct q3_api_usage *u)
{
	json_t *o = envelope(r, r->kind == Q3_API_CHAT ? "chat.completion.chunk" : "text_completion");

	if (!o)
		return -ENOMEM;
	json_object_set_new(o, "choices", json_array());
	json_object_set_new(o, "usage", usage_json(u));
	return add_event(out, len, cap, o);
}

char *q3_api_models_json(const char *model, time_t created)
{
	return dump(json_pack("{s:s, s:[{s:s, s:s, s:I, s:s}]}", "object", "list", "data", "id", model, "object",
			      "model", "created", (json_int_t)created, "owned_by", "qwen3d"));
}
