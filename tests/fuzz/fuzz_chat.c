/* fuzz_chat.c - libFuzzer target for the chat renderer and the tool-call parser: the input is
 * parsed as a JSON request and rendered (errors are fine, crashes are not), and fed as model
 * output to the tool-call parser in pieces whose sizes come from the input itself. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "toolcall.h"

static int on_event(void *ctx, const struct q3_tc_event *ev)
{
	size_t *total = ctx;
	if (ev->kind == Q3_TC_TEXT)
		*total += ev->len;
	else if (!ev->name || !ev->arguments)
		abort();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_t *req = json_loadb((const char *)data, size, 0, NULL);
	struct q3_tc *p;
	size_t at = 0, total = 0;
	q3_err e;

	if (req) {
		char *text;
		size_t len;
		if (q3_chat_render(req, &text, &len, &e) == 0) {
			if (strlen(text) > len)
				abort();
			free(text);
		}
		json_decref(req);
	}
	if (q3_tc_new(&p, &e))
		return 0;
	while (at < size) {
		size_t k = 1 + data[at] % 7;
		if (k > size - at)
			k = size - at;
		q3_tc_feed(p, (const char *)data + at, k, on_event, &total, &e);
		at += k;
	}
	q3_tc_finish(p, on_event, &total, &e);
	q3_tc_free(p);
	return 0;
}
