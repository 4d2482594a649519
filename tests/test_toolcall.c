/* test_toolcall.c - tool-call parsing of model output: well-formed calls, several per message,
 * text around them, every split of the output into pieces (and byte by byte), malformed and
 * unterminated blocks, and the parser stopping when its callback says so. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strbuf.h"
#include "toolcall.h"

/* Everything the callback saw, flattened: text as T[...] (consecutive text events merged, so
 * that different splits of the same output compare equal), calls as C<index>[name|args],
 * malformed blocks as M[...]. */
struct log {
	struct q3_sb all;
	int events, stop_at;
	bool last_text;
};

static int on_event(void *ctx, const struct q3_tc_event *ev)
{
	struct log *l = ctx;
	bool plain = ev->kind == Q3_TC_TEXT && !ev->malformed;

	l->events++;
	if (ev->kind == Q3_TC_CALL) {
		q3_sb_addf(&l->all, "C%d[%s|%s]", ev->index, ev->name, ev->arguments);
	} else {
		assert_true(ev->len > 0);
		if (plain && l->last_text)
			l->all.len--; /* reopen the previous T[...] */
		else
			q3_sb_adds(&l->all, ev->malformed ? "M[" : "T[");
		q3_sb_add(&l->all, ev->text, ev->len);
		q3_sb_adds(&l->all, "]");
	}
	l->last_text = plain;
	return l->stop_at && l->events == l->stop_at ? 42 : 0;
}

/* Feeds s in the given piece sizes (0-terminated list; the rest in one piece) and finishes. */
static char *run(const char *s, const size_t *pieces)
{
	struct q3_tc *p;
	struct log l = { Q3_SB_INIT, 0, 0, false };
	size_t n = strlen(s), at = 0;
	q3_err e;

	assert_int_equal(q3_tc_new(&p, &e), 0);
	for (; pieces && *pieces && at < n; pieces++) {
		size_t k = *pieces < n - at ? *pieces : n - at;
		assert_int_equal(q3_tc_feed(p, s + at, k, on_event, &l, &e), 0);
		at += k;
	}
	assert_int_equal(q3_tc_feed(p, s + at, n - at, on_event, &l, &e), 0);
	assert_int_equal(q3_tc_finish(p, on_event, &l, &e), 0);
	q3_tc_free(p);
	return q3_sb_take(&l.all, NULL);
}

static void expect(const char *output, const char *want)
{
	char *got = run(output, NULL);
	if (strcmp(got, want))
		fail_msg("output \"%s\"\n  got  %s\n  want %s", output, got, want);
	free(got);
	/* every split into two pieces, and byte by byte, gives the same events */
	size_t n = strlen(output);
	size_t *ones = malloc((n + 1) * sizeof(*ones));
	for (size_t i = 0; i < n; i++)
		ones[i] = 1;
	ones[n] = 0;
	got = run(output, ones);
	if (strcmp(got, want))
		fail_msg("byte by byte \"%s\"\n  got  %s\n  want %s", output, got, want);
	free(got);
	free(ones);
	for (size_t k = 1; k < n; k++) {
		size_t pieces[2] = { k, 0 };
		got = run(output, pieces);
		if (strcmp(got, want))
			fail_msg("split at %zu of \"%s\"\n  got  %s\n  want %s", k, output, got, want);
		free(got);
	}
}

static void test_well_formed(void **state)
{
	expect("Hello, world.", "T[Hello, world.]");
	expect("", "");
	expect("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
	       "C0[get_weather|{\"city\": \"Paris\"}]");
	expect("Let me check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
	       "T[Let me check.\n]C0[f|{}]");
	/* arguments come back in Python's json.dumps style */
	expect("<tool_call>{\"name\":\"f\",\"arguments\":{\"b\":1.0,\"a\":[1,2],\"s\":\"é\\n\"}}</tool_call>",
	       "C0[f|{\"b\": 1.0, \"a\": [1, 2], \"s\": \"é\\n\"}]");
	/* text that merely looks like the start of a tag is text */
	expect("a < b and <tool but not <tool_cal", "T[a < b and <tool but not <tool_cal]");
	expect("<b>bold</b> <tool_call", "T[<b>bold</b> <tool_call]");
}

static void test_several(void **state)
{
	expect("<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n"
	       "<tool_call>\n{\"name\": \"b\", \"arguments\": {\"y\": [true, null]}}\n</tool_call>\n",
	       "C0[a|{\"x\": 1}]C1[b|{\"y\": [true, null]}]");
	expect("Two calls:<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>  \n  "
	       "<tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>",
	       "T[Two calls:]C0[a|{}]C1[b|{}]");
	/* real text after a call is kept, with its leading whitespace */
	expect("<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\nDone.", "C0[a|{}]T[\nDone.]");
}

static void test_malformed(void **state)
{
	expect("<tool_call>\nnot json\n</tool_call>", "M[<tool_call>\nnot json\n</tool_call>]");
	expect("<tool_call>{\"arguments\": {}}</tool_call>", "M[<tool_call>{\"arguments\": {}}</tool_call>]");
	expect("<tool_call>{\"name\": 3, \"arguments\": {}}</tool_call>",
	       "M[<tool_call>{\"name\": 3, \"arguments\": {}}</tool_call>]");
	expect("<tool_call>{\"name\": \"f\"}</tool_call>", "M[<tool_call>{\"name\": \"f\"}</tool_call>]");
	expect("<tool_call>[1]</tool_call>", "M[<tool_call>[1]</tool_call>]");
	/* a malformed block does not count: the next good call is index 0 */
	expect("x<tool_call>{bad</tool_call><tool_call>{\"name\": \"g\", \"arguments\": 5}</tool_call>",
	       "T[x]M[<tool_call>{bad</tool_call>]C0[g|5]");
	/* unterminated at the end: a call if it parses, else text */
	expect("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"x\"}}\n", "C0[f|{\"q\": \"x\"}]");
	expect("ok <tool_call>\n{\"name\": \"f\", \"argu", "T[ok ]M[<tool_call>\n{\"name\": \"f\", \"argu]");
	/* cut inside the closing tag: still the call */
	expect("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_", "C0[f|{}]");
	expect("<tool_call>{\"name\": \"f\", \"arguments\": 1}<", "C0[f|1]");
	/* a tag inside a call body makes it malformed, never a crash */
	expect("<tool_call><tool_call>{}</tool_call></tool_call>",
	       "M[<tool_call><tool_call>{}</tool_call>]T[</tool_call>]");
}

/* Only what could start "<tool_call>" is held back while streaming. */
static void test_hold_back(void **state)
{
	struct q3_tc *p;
	struct log l = { Q3_SB_INIT, 0, 0, false };
	q3_err e;

	assert_int_equal(q3_tc_new(&p, &e), 0);
	assert_int_equal(q3_tc_feed(p, "Hello <tool", 11, on_event, &l, &e), 0);
	assert_string_equal(l.all.buf, "T[Hello ]");
	assert_int_equal(q3_tc_feed(p, "_c", 2, on_event, &l, &e), 0);
	assert_string_equal(l.all.buf, "T[Hello ]");
	assert_int_equal(q3_tc_feed(p, "x", 1, on_event, &l, &e), 0);
	assert_string_equal(l.all.buf, "T[Hello <tool_cx]");
	assert_int_equal(q3_tc_feed(p, "<tool_call>{\"name\": \"f\", \"arguments\": {}}", 41, on_event, &l, &e), 0);
	assert_string_equal(l.all.buf, "T[Hello <tool_cx]");
	assert_int_equal(q3_tc_feed(p, "</tool_call>", 12, on_event, &l, &e), 0);
	assert_string_equal(l.all.buf, "T[Hello <tool_cx]C0[f|{}]");
	assert_int_equal(q3_tc_count(p), 1);
	assert_int_equal(q3_tc_finish(p, on_event, &l, &e), 0);
	assert_int_equal(q3_tc_count(p), 1); /* still the message just ended */
	/* reusable for the next message, counting from 0 again */
	assert_int_equal(q3_tc_feed(p, "<tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>", 53, on_event, &l,
				&e), 0);
	assert_string_equal(l.all.buf, "T[Hello <tool_cx]C0[f|{}]C0[g|{}]");
	assert_int_equal(q3_tc_count(p), 1);
	assert_int_equal(q3_tc_finish(p, on_event, &l, &e), 0);
	assert_int_equal(q3_tc_finish(p, on_event, &l, &e), 0); /* an empty message */
	assert_int_equal(q3_tc_count(p), 0);
	q3_tc_free(p);
	q3_sb_free(&l.all);
}

static void test_callback_stops(void **state)
{
	struct q3_tc *p;
	struct log l = { Q3_SB_INIT, 0, 2, false };
	const char *s = "a<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>b<tool_call>";
	q3_err e;

	assert_int_equal(q3_tc_new(&p, &e), 0);
	assert_int_equal(q3_tc_feed(p, s, strlen(s), on_event, &l, &e), 42);
	assert_int_equal(l.events, 2);
	q3_tc_free(p);
	q3_sb_free(&l.all);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_well_formed),
		cmocka_unit_test(test_several),
		cmocka_unit_test(test_malformed),
		cmocka_unit_test(test_hold_back),
		cmocka_unit_test(test_callback_stops),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
