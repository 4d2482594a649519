/* toolcall.c - incremental tool-call parsing of model output (see toolcall.h). */
#include "toolcall.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "json_py.h"
#include "strbuf.h"

static const char OPEN[] = "<tool_call>";
static const char CLOSE[] = "</tool_call>";
#define OPEN_LEN (sizeof(OPEN) - 1)
#define CLOSE_LEN (sizeof(CLOSE) - 1)

struct q3_tc {
	struct q3_sb buf; /* text received and not yet reported */
	size_t scanned;   /* buf[0..scanned) was searched already: in a call it holds no start of
			   * "</tool_call>"; else it is whitespace waiting after a call */
	bool in_call;     /* buf holds the body of an open <tool_call> */
	bool finished;    /* the message ended; the next feed starts a new one */
	int ncalls;
};

int q3_tc_new(struct q3_tc **out, q3_err *e)
{
	*out = calloc(1, sizeof(**out));
	return *out ? 0 : q3_errf(e, -ENOMEM, "out of memory");
}

void q3_tc_free(struct q3_tc *p)
{
	if (p) {
		q3_sb_free(&p->buf);
		free(p);
	}
}

int q3_tc_count(const struct q3_tc *p)
{
	return p->ncalls;
}

static const char *find(const char *s, size_t n, const char *pat, size_t m)
{
	return n >= m ? memmem(s, n, pat, m) : NULL;
}

static bool all_space(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] != ' ' && s[i] != '\n' && s[i] != '\t' && s[i] != '\r')
			return false;
	return true;
}

static int emit_text(struct q3_tc *p, const char *s, size_t n, bool malformed, q3_tc_cb cb, void *ctx)
{
	struct q3_tc_event ev = { .kind = Q3_TC_TEXT, .text = s, .len = n, .malformed = malformed };

	if (!n || (!malformed && p->ncalls && all_space(s, n)))
		return 0;
	return cb(ctx, &ev);
}

/* The body between the tags: {"name": string, "arguments": any}, surrounding whitespace allowed.
 * *ok says whether it was one; then the callback's value is returned. */
static int emit_call(struct q3_tc *p, const char *body, size_t n, bool *ok, q3_tc_cb cb, void *ctx, q3_err *e)
{
	json_t *root = json_loadb(body, n, 0, NULL), *name, *args;
	int rc = 0;

	name = json_object_get(root, "name");
	args = json_object_get(root, "arguments");
	*ok = json_is_object(root) && json_is_string(name) && json_string_length(name) &&
	      strlen(json_string_value(name)) == json_string_length(name) && args;
	if (*ok) {
		char *a = q3_json_py_str(args);
		if (!a) {
			rc = q3_errf(e, -ENOMEM, "out of memory");
		} else {
			struct q3_tc_event ev = { .kind = Q3_TC_CALL, .name = json_string_value(name),
						  .arguments = a, .index = p->ncalls };
			p->ncalls++;
			rc = cb(ctx, &ev);
			free(a);
		}
	}
	json_decref(root);
	return rc;
}

/* A block that did not parse goes out verbatim, tags included. */
static int emit_malformed(struct q3_tc *p, const char *body, size_t n, bool closed, q3_tc_cb cb, void *ctx,
			  q3_err *e)
{
	struct q3_sb sb = Q3_SB_INIT;
	int rc;

	if (q3_sb_add(&sb, OPEN, OPEN_LEN) || q3_sb_add(&sb, body, n) || (closed && q3_sb_add(&sb, CLOSE, CLOSE_LEN))) {
		q3_sb_free(&sb);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	rc = emit_text(p, sb.buf, sb.len, true, cb, ctx);
	q3_sb_free(&sb);
	return rc;
}

static int block(struct q3_tc *p, const char *body, size_t n, bool closed, q3_tc_cb cb, void *ctx, q3_err *e)
{
	bool ok;
	int rc = emit_call(p, body, n, &ok, cb, ctx, e);
	return ok ? rc : emit_malformed(p, body, n, closed, cb, ctx, e);
}

/* Longest suffix of s[0..n) that is a proper prefix of tag. */
static size_t tag_prefix(const char *s, size_t n, const char *tag, size_t tag_len)
{
	for (size_t k = Q3_MIN(n, tag_len - 1); k > 0; k--)
		if (!memcmp(s + n - k, tag, k))
			return k;
	return 0;
}

static void consume(struct q3_tc *p, size_t k)
{
	memmove(p->buf.buf, p->buf.buf + k, p->buf.len - k);
	p->buf.len -= k;
	p->buf.buf[p->buf.len] = 0;
	p->scanned = 0;
}

/* After q3_tc_finish, the count stays readable until the next message starts. */
static void start_message(struct q3_tc *p)
{
	if (p->finished) {
		p->finished = false;
		p->ncalls = 0;
	}
}

int q3_tc_feed(struct q3_tc *p, const char *s, size_t n, q3_tc_cb cb, void *ctx, q3_err *e)
{
	int rc;

	start_message(p);
	if (q3_sb_add(&p->buf, s, n))
		return q3_errf(e, -ENOMEM, "out of memory");
	for (;;) {
		const char *b = p->buf.buf;
		size_t len = p->buf.len;
		if (p->in_call) {
			const char *end = find(b + p->scanned, len - p->scanned, CLOSE, CLOSE_LEN);
			if (!end) {
				/* only the last CLOSE_LEN - 1 bytes can still start the tag */
				p->scanned = len >= CLOSE_LEN ? len - (CLOSE_LEN - 1) : 0;
				return 0;
			}
			if ((rc = block(p, b, (size_t)(end - b), true, cb, ctx, e)))
				return rc;
			consume(p, (size_t)(end - b) + CLOSE_LEN);
			p->in_call = false;
			continue;
		}
		/* whitespace holds no '<': the tag can only start after what was scanned */
		const char *start = find(b + p->scanned, len - p->scanned, OPEN, OPEN_LEN);
		if (start) {
			if ((rc = emit_text(p, b, (size_t)(start - b), false, cb, ctx)))
				return rc;
			consume(p, (size_t)(start - b) + OPEN_LEN);
			p->in_call = true;
			continue;
		}
		size_t keep = tag_prefix(b, len, OPEN, OPEN_LEN);
		/* after a call, whitespace waits to see what follows it */
		if (p->ncalls && all_space(b + p->scanned, len - keep - p->scanned)) {
			p->scanned = len - keep;
			return 0;
		}
		if ((rc = emit_text(p, b, len - keep, false, cb, ctx)))
			return rc;
		consume(p, len - keep);
		return 0;
	}
}

int q3_tc_finish(struct q3_tc *p, q3_tc_cb cb, void *ctx, q3_err *e)
{
	int rc;

	start_message(p);
	if (p->in_call) {
		/* cut inside its closing tag (max_tokens, a stop string): the call without the cut tag */
		size_t k = tag_prefix(p->buf.buf, p->buf.len, CLOSE, CLOSE_LEN);
		bool ok = false;

		rc = k ? emit_call(p, p->buf.buf, p->buf.len - k, &ok, cb, ctx, e) : 0;
		if (!ok)
			rc = block(p, p->buf.buf, p->buf.len, false, cb, ctx, e);
	} else
		rc = emit_text(p, p->buf.buf, p->buf.len, false, cb, ctx);
	p->buf.len = 0;
	if (p->buf.buf)
		p->buf.buf[0] = 0;
	p->scanned = 0;
	p->in_call = false;
	p->finished = true;
	return rc;
}
