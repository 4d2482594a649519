/* server_tools.c - tool calls in chat answers, whole or streamed (see server_tools.h). */
#include "server_tools.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "toolcall.h"

struct q3_tools {
	struct q3_tc *tc;
	json_t *calls;	/* whole answers: the calls so far */
	char *content;	/* whole answers: the text so far */
	size_t clen, ccap;
	/* streaming: where the callback writes, for the duration of one feed */
	struct q3_api_resp *resp;
	char **out;
	size_t *len, *cap;
};

int q3_tools_forced_prefix(const struct q3_api_req *api, char **prefix)
{
	*prefix = NULL;
	if (api->tool_choice == Q3_TOOLS_REQUIRED) {
		*prefix = strdup("<tool_call>\n");
	} else if (api->tool_choice == Q3_TOOLS_NAMED) {
		json_t *name = json_string(api->tool_name);
		char *quoted = name ? json_dumps(name, JSON_ENCODE_ANY) : NULL;
		json_decref(name);
		if (quoted && asprintf(prefix, "<tool_call>\n{\"name\": %s, \"arguments\": ", quoted) < 0)
			*prefix = NULL;
		free(quoted);
	} else {
		return 0;
	}
	return *prefix ? 0 : -ENOMEM;
}

static json_t *call_json(const struct q3_tc_event *ev, bool with_index)
{
	unsigned char rnd[12];
	char id[32];

	if (getrandom(rnd, sizeof(rnd), 0) != sizeof(rnd))
		memset(rnd, 0, sizeof(rnd));
	snprintf(id, sizeof(id), "call_");
	for (size_t i = 0; i < sizeof(rnd); i++)
		snprintf(id + 5 + 2 * i, 3, "%02x", rnd[i]);
	json_t *c = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", id, "type", "function", "function", "name", ev->name,
			      "arguments", ev->arguments);
	if (c && with_index)
		json_object_set_new(c, "index", json_integer(ev->index));
	return c;
}

/* whole answers: collect */
static int collect(void *ctx, const struct q3_tc_event *ev)
{
	struct q3_tools *t = ctx;
	if (ev->kind == Q3_TC_TEXT)
		return q3_api_buf_add(&t->content, &t->clen, &t->ccap, ev->text, ev->len);
	json_t *c = call_json(ev, false);
	return c && !json_array_append_new(t->calls, c) ? 0 : -ENOMEM;
}

/* streaming: one chunk per event */
static int emit(void *ctx, const struct q3_tc_event *ev)
{
	struct q3_tools *t = ctx;
	json_t *delta;

	if (ev->kind == Q3_TC_TEXT) {
		if (!ev->len)
			return 0;
		delta = json_pack("{s:s%}", "content", ev->text, ev->len);
	} else {
		json_t *c = call_json(ev, true);
		delta = c ? json_pack("{s:[o]}", "tool_calls", c) : NULL;
	}
	if (!delta)
		return -ENOMEM;
	return q3_api_chunk_sse(t->resp, t->out, t->len, t->cap, delta, NULL, 0, NULL);
}

struct q3_tools *q3_tools_new(const struct q3_api_req *api, const char *forced)
{
	struct q3_tools *t = calloc(1, sizeof(*t));
	q3_err e;

	if (!t || q3_tc_new(&t->tc, &e) || !(t->calls = json_array())) {
		q3_tools_free(t);
		return NULL;
	}
	/* the forced opening is all held back (it is the start of a call): nothing is emitted */
	if (forced && q3_tc_feed(t->tc, forced, strlen(forced), collect, t, &e)) {
		q3_tools_free(t);
		return NULL;
	}
	return t;
}

void q3_tools_free(struct q3_tools *t)
{
	if (!t)
		return;
	if (t->tc)
		q3_tc_free(t->tc);
	json_decref(t->calls);
	free(t->content);
	free(t);
}

void q3_tools_feed(struct q3_tools *t, const char *text, size_t n)
{
	q3_err e;
	q3_tc_feed(t->tc, text, n, collect, t, &e);
}

void q3_tools_finish(struct q3_tools *t, char **content, size_t *len, json_t **calls)
{
	q3_err e;
	q3_tc_finish(t->tc, collect, t, &e);
	*content = t->content;
	*len = t->clen;
	*calls = t->calls;
	t->content = NULL;
	t->clen = t->ccap = 0;
	t->calls = NULL;
}

int q3_tools_stream(struct q3_tools *t, struct q3_api_resp *resp, const char *text, size_t n, char **out,
		    size_t *len, size_t *cap)
{
	q3_err e;
	t->resp = resp;
	t->out = out;
	t->len = len;
	t->cap = cap;
	return q3_tc_feed(t->tc, text, n, emit, t, &e);
}

int q3_tools_stream_end(struct q3_tools *t, struct q3_api_resp *resp, char **out, size_t *len, size_t *cap,
			bool *calls)
{
	q3_err e;
	t->resp = resp;
	t->out = out;
	t->len = len;
	t->cap = cap;
	int rc = q3_tc_finish(t->tc, emit, t, &e);
	*calls = q3_tc_count(t->tc) > 0;
	return rc;
}
