/* chat.h - the Qwen3-Instruct-2507 chat template (Qwen3-Next-80B-A3B-Instruct), rendered in C
 * byte for byte as Hugging Face transformers' apply_chat_template renders
 * chat_template.jinja (docs: qwen3next.md section 9).
 *
 * The request is a JSON object:
 *   "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
 *                 "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}, ...]
 *   "tools": [OpenAI tool objects] or null (each rendered whole, one per line, via tojson)
 *   "add_generation_prompt": true|false (default true, as OpenAI-style servers want)
 * Other keys are ignored.  What the template does, and so what this does:
 *   - content that is not a string (null, an array of {"type": "text", ...} parts, ...) renders
 *     as '' -- except in a first system message, which the template concatenates, where it is
 *     an error as it is in transformers.  Callers that want text parts kept must join them into
 *     a string first.
 *   - tool_call "arguments" given as a string are pasted verbatim; anything else goes through
 *     tojson (Python json.dumps, see json_py.h); a tool_call without "function" is read as the
 *     function itself.
 *   - consecutive "tool" messages share one user turn of <tool_response> blocks.
 * Stricter than the template (which would silently render nothing): a role that is not a string
 * or not one of the four, a tool call without a string name or without arguments.  Errors name
 * the part at fault, e.g. "messages[2].role: expected a string".
 */
#pragma once
#include <jansson.h>
#include <stddef.h>

#include "util.h"

/* Renders req into a malloc'ed NUL-terminated prompt *text of *len bytes. */
int q3_chat_render(const json_t *req, char **text, size_t *len, q3_err *e);

/* Compares the chat template of model folder dir (chat_template.jinja, else tokenizer_config.json
 * "chat_template") with the one rendered here: 0 when identical, 1 when it differs or is absent
 * (e says how), -errno when the files cannot be read. */
int q3_chat_check_template(const char *dir, q3_err *e);

/* The template text rendered here (chat_template.jinja of Qwen3-Instruct-2507). */
extern const char q3_chat_template_text[];
