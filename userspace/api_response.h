/* api_response.h - the JSON the API answers with: OpenAI chat.completion / text_completion
 * objects, their streaming chunks (as SSE "data:" events), usage, and the model list.
 *
 * Every builder returns malloc'ed text (NULL on ENOMEM).  Text given to them is UTF-8 (the
 * worker emits whole characters only).
 */
#pragma once
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "api_request.h"
#include "worker.h"

/* What identifies one response and is repeated in each of its chunks. */
struct q3_api_resp {
	enum q3_api_kind kind;
	char id[48];	   /* "chatcmpl-<hex>" or "cmpl-<hex>" */
	time_t created;
	const char *model; /* the served model id */
};

struct q3_api_usage {
	int prompt, completion, cached;
};

void q3_api_resp_init(struct q3_api_resp *r, enum q3_api_kind kind, const char *model);

/* "stop", "length", "tool_calls" (when tool_calls is non-empty) or NULL for unfinished. */
const char *q3_api_finish_reason(enum q3_finish f, bool tool_calls);

/* The whole non-streaming response.  tool_calls: NULL or an array of OpenAI tool calls (chat
 * only; content becomes null when text is empty and there are calls). */
char *q3_api_response_json(const struct q3_api_resp *r, const char *text, size_t len, json_t *tool_calls,
			   const char *finish, const struct q3_api_usage *u);

/* One SSE event "data: {...}\n\n" appended to *out.  For chat, delta is the "delta" object
 * (stolen); for completions, text/len is the chunk's text.  finish NULL: not finished. */
int q3_api_chunk_sse(struct q3_api_resp *r, char **out, size_t *len, size_t *cap, json_t *delta,
		     const char *text, size_t tlen, const char *finish);
/* The usage-only chunk of stream_options.include_usage ("choices": []). */
int q3_api_usage_sse(struct q3_api_resp *r, char **out, size_t *len, size_t *cap, const struct q3_api_usage *u);
/* Appends raw bytes to the growable buffer. */
int q3_api_buf_add(char **out, size_t *len, size_t *cap, const char *s, size_t n);

/* GET /v1/models */
char *q3_api_models_json(const char *model, time_t created);
