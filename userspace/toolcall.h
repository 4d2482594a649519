/* toolcall.h - incremental parsing of Qwen3 model output into text and OpenAI tool calls.
 *
 * The model writes calls as (docs: qwen3next.md section 9)
 *     <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
 * several per message (separated by "\n"), possibly after some text.  Feed the decoded text as it
 * is generated (q3_tc_feed, any split, e.g. the pieces of q3_tok_stream_push); the callback gets:
 *   Q3_TC_TEXT  text that is safe to emit now: only what could still be the start of
 *               "<tool_call>" is held back.  Whitespace-only text after a tool call (the "\n"
 *               between calls, or at the end) is dropped; other text between calls is emitted.
 *               malformed is set when the text is a <tool_call>...</tool_call> block (tags
 *               included) whose body is not {"name": string, "arguments": any}: it comes back
 *               verbatim as text.
 *   Q3_TC_CALL  a complete call: name, and arguments as JSON text (Python json.dumps style, as
 *               the template renders and vLLM returns them), index 0, 1, ... in the message.
 * q3_tc_finish ends the message: held text is emitted, and an unterminated <tool_call> block is
 * still accepted as a call when its body parses (output cut by a stop string), else it is text
 * with malformed set.
 * Strings in events are valid until the callback returns.  A callback returning non-zero stops
 * the parser; that value is returned.  One parser per message, one thread at a time.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "util.h"

enum q3_tc_kind { Q3_TC_TEXT, Q3_TC_CALL };

struct q3_tc_event {
	enum q3_tc_kind kind;
	const char *text;      /* TEXT: bytes to emit (not NUL-terminated) */
	size_t len;
	bool malformed;        /* TEXT: a tool call block that did not parse */
	const char *name;      /* CALL: function name (NUL-terminated) */
	const char *arguments; /* CALL: JSON text (NUL-terminated) */
	int index;             /* CALL: 0-based position among this message's calls */
};

typedef int (*q3_tc_cb)(void *ctx, const struct q3_tc_event *ev);

struct q3_tc;

int q3_tc_new(struct q3_tc **out, q3_err *e);
int q3_tc_feed(struct q3_tc *p, const char *s, size_t n, q3_tc_cb cb, void *ctx, q3_err *e);
/* Ends the message (see above); the parser can then be reused for the next message. */
int q3_tc_finish(struct q3_tc *p, q3_tc_cb cb, void *ctx, q3_err *e);
/* Number of well-formed calls reported so far in this message; after q3_tc_finish, in the
 * message just ended (until the next feed starts a new one). */
int q3_tc_count(const struct q3_tc *p);
void q3_tc_free(struct q3_tc *p);
