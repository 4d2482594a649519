/* tok_fixtures.h - helpers shared by the tokenizer, chat and tool-call tests: the fixture folder
 * (tests/fixtures/tokenizer, see its README) and reading its .jsonl files. */
#pragma once
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define TOK_FIXTURES "tests/fixtures/tokenizer"

/* Calls fn(record, line number, ctx) for every line of TOK_FIXTURES/name; returns the count. */
static inline int for_each_jsonl(const char *name, void (*fn)(json_t *rec, int line, void *ctx), void *ctx)
{
	char path[512], *buf, *p, *nl;
	size_t len;
	int line = 0;
	q3_err e;

	snprintf(path, sizeof(path), "%s/%s", TOK_FIXTURES, name);
	if (q3_read_file(path, 64u << 20, &buf, &len, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		abort();
	}
	for (p = buf; p < buf + len; p = nl + 1) {
		json_error_t je;
		nl = memchr(p, '\n', (size_t)(buf + len - p));
		if (!nl)
			nl = buf + len;
		if (nl == p)
			continue;
		json_t *rec = json_loadb(p, (size_t)(nl - p), 0, &je);
		line++;
		if (!rec) {
			fprintf(stderr, "%s:%d: %s\n", path, line, je.text);
			abort();
		}
		fn(rec, line, ctx);
		json_decref(rec);
	}
	free(buf);
	return line;
}

/* ids of a JSON array of integers, malloc'ed. */
static inline int32_t *json_ids(json_t *arr, size_t *n)
{
	size_t i;
	json_t *v;
	int32_t *ids = malloc((json_array_size(arr) + 1) * sizeof(*ids));

	json_array_foreach(arr, i, v)
		ids[i] = (int32_t)json_integer_value(v);
	*n = json_array_size(arr);
	return ids;
}
