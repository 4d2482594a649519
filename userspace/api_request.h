/* api_request.h - OpenAI request bodies parsed and validated into what the server runs.
 *
 * POST /v1/chat/completions and POST /v1/completions bodies become a struct q3_api_req: the
 * sampling parameters (request values over the model's generation_config defaults), limits, stop
 * strings, streaming options, and either a chat request normalised for q3_chat_render (text
 * content parts joined, "developer" read as "system", tools kept or dropped per tool_choice) or
 * a completion prompt (text or token ids).
 *
 * Anything wrong gives an OpenAI-shaped error: HTTP status, type, the parameter at fault and a
 * one-line message ("Invalid type for 'temperature': expected a number, got a string.").
 * Unknown keys are ignored, as most OpenAI-compatible servers do; null means "not given".
 * Pure functions of the body: fuzzed by tests/fuzz/fuzz_request.c.
 */
#pragma once
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sampler.h"

enum q3_api_kind { Q3_API_CHAT, Q3_API_COMPLETION };
enum q3_tool_choice { Q3_TOOLS_AUTO, Q3_TOOLS_NONE, Q3_TOOLS_REQUIRED, Q3_TOOLS_NAMED };

#define Q3_API_MAX_STOP 4
#define Q3_API_MAX_STOP_LEN 256 /* bytes per stop string */
#define Q3_API_MAX_BIAS 1024	/* logit_bias entries */

struct q3_api_error {
	int status;	  /* HTTP status */
	const char *type; /* "invalid_request_error", "authentication_error", "not_found_error", ... */
	const char *code; /* NULL, or e.g. "invalid_type", "context_length_exceeded" */
	char param[64];	  /* the parameter at fault, "" if none */
	char message[512];
};

struct q3_api_req {
	enum q3_api_kind kind;
	json_t *root;	  /* the parsed body: the strings below point into it */
	const char *model; /* as given (NULL: not given) */
	bool stream;
	bool include_usage; /* stream_options.include_usage */

	/* chat: {"messages": [...], "tools": [...] (only if used), "add_generation_prompt": true} */
	json_t *chat;
	enum q3_tool_choice tool_choice;
	const char *tool_name; /* Q3_TOOLS_NAMED */
	bool tools;	       /* tools are rendered and the output is parsed for tool calls */

	/* completion: text, or token ids */
	const char *prompt;
	size_t prompt_len;
	int32_t *prompt_ids; /* malloc'ed, or NULL */
	int nprompt_ids;

	struct q3_sampling samp; /* samp.bias points into bias below */
	bool has_seed;
	struct q3_logit_bias *bias; /* logit_bias, malloc'ed, or NULL */
	int max_tokens; /* 0: not given (up to the context) */
	const char *stop[Q3_API_MAX_STOP];
	int nstop;
};

/* Parses body[0..len) as a request of kind `kind`.  defaults: the model's sampling defaults
 * (generation_config.json), which the request's values override.  vocab bounds prompt token ids.
 * Returns 0, or -EINVAL with *err filled (r is then freed). */
int q3_api_parse(enum q3_api_kind kind, const char *body, size_t len, const struct q3_sampling *defaults,
		 int vocab, struct q3_api_req *r, struct q3_api_error *err);
void q3_api_req_free(struct q3_api_req *r);

/* Fills err; returns -EINVAL.  param may be NULL. */
int q3_api_errorf(struct q3_api_error *err, int status, const char *type, const char *param,
		  const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* {"error": {"message", "type", "param", "code"}} as malloc'ed text (NULL on ENOMEM). */
char *q3_api_error_json(const struct q3_api_error *err);
