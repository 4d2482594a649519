/* server_tools.h - tool calls in chat answers: the OpenAI side of toolcall.h's parser.
 *
 * A chat request with tools (and tool_choice not "none") gets one of these.  The generated text
 * goes through the Qwen3 tool-call parser; plain text becomes content, each complete call an
 * OpenAI tool call {"id": "call_...", "type": "function", "function": {"name", "arguments"}}:
 * collected for a whole answer, or sent as a streaming delta as soon as the call is complete.
 *
 * tool_choice "required" and a named function are enforced by starting the assistant turn with
 * the opening of a call (q3_tools_forced_prefix); the parser is given the same text first, so the
 * model's continuation completes the call.
 */
#pragma once
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "api_request.h"
#include "api_response.h"

struct q3_tools;

/* The text that starts the assistant turn for tool_choice, malloc'ed in *prefix, or NULL when
 * the choice is free ("auto").  Returns 0 or -ENOMEM. */
int q3_tools_forced_prefix(const struct q3_api_req *api, char **prefix);
/* A parser for one answer; forced: the prefix above or NULL.  NULL on ENOMEM. */
struct q3_tools *q3_tools_new(const struct q3_api_req *api, const char *forced);
void q3_tools_free(struct q3_tools *t);

/* Whole answers: feed all the text, then take the content and the calls (an array, never
 * NULL; the caller owns both). */
void q3_tools_feed(struct q3_tools *t, const char *text, size_t n);
void q3_tools_finish(struct q3_tools *t, char **content, size_t *len, json_t **calls);

/* Streaming: appends the SSE chunks for new text to out; at the end, the chunks for what was
 * held back, and *calls tells whether the answer made any call.  0 or -ENOMEM. */
int q3_tools_stream(struct q3_tools *t, struct q3_api_resp *resp, const char *text, size_t n, char **out,
		    size_t *len, size_t *cap);
int q3_tools_stream_end(struct q3_tools *t, struct q3_api_resp *resp, char **out, size_t *len, size_t *cap,
			bool *calls);
