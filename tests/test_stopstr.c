/* test_stopstr.c - stop strings over streamed pieces: matches across pieces, false starts released,
 * the earliest of several stops, the final flush, and text with no stop strings. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "stopstr.h"

/* feeds pieces (NULL-terminated), the last one final; returns the emitted text and whether a stop
 * string ended it */
static bool run(char *const *stops, int n, const char *const *pieces, char *got, size_t cap)
{
	struct q3_stopstr s;
	bool stopped = false;
	size_t len = 0;

	assert_int_equal(q3_stopstr_init(&s), 0);
	q3_stopstr_reset(&s, stops, n);
	for (int i = 0; pieces[i] && !stopped; i++) {
		const char *out;
		size_t nout;
		stopped = q3_stopstr_feed(&s, pieces[i], strlen(pieces[i]), !pieces[i + 1], &out, &nout);
		assert_true(len + nout < cap);
		memcpy(got + len, out, nout);
		len += nout;
	}
	got[len] = 0;
	q3_stopstr_free(&s);
	return stopped;
}

static void test_a_stop_string_split_across_pieces_is_found(void **st)
{
	char *stops[] = { "END" };
	const char *pieces[] = { "hello E", "N", "D and more", NULL };
	char got[64];
	assert_true(run(stops, 1, pieces, got, sizeof(got)));
	assert_string_equal(got, "hello ");
}

static void test_a_false_start_is_released_when_the_next_piece_differs(void **st)
{
	char *stops[] = { "END" };
	const char *pieces[] = { "the EN", "TRY is", " here", NULL };
	char got[64];
	assert_false(run(stops, 1, pieces, got, sizeof(got)));
	assert_string_equal(got, "the ENTRY is here");
}

static void test_held_text_is_emitted_at_the_end(void **st)
{
	char *stops[] = { "END" };
	const char *pieces[] = { "ends with E", "N", NULL };
	char got[64];
	assert_false(run(stops, 1, pieces, got, sizeof(got)));
	assert_string_equal(got, "ends with EN");
}

static void test_the_earliest_of_several_stops_wins(void **st)
{
	char *stops[] = { "zz", "b c", "a" };
	const char *pieces[] = { "xx b", " c a zz", NULL };
	char got[64];
	assert_true(run(stops, 3, pieces, got, sizeof(got)));
	assert_string_equal(got, "xx ");
}

static void test_overlapping_prefixes_do_not_hide_a_match(void **st)
{
	char *stops[] = { "aab" };
	const char *pieces[] = { "xa", "a", "a", "b!", NULL };
	char got[64];
	assert_true(run(stops, 1, pieces, got, sizeof(got)));
	assert_string_equal(got, "xa");
}

static void test_a_stop_at_the_very_start_emits_nothing(void **st)
{
	char *stops[] = { "\n\n" };
	const char *pieces[] = { "\n", "\nrest", NULL };
	char got[64];
	assert_true(run(stops, 1, pieces, got, sizeof(got)));
	assert_string_equal(got, "");
}

static void test_utf8_pieces_stay_whole_characters(void **st)
{
	char *stops[] = { "\xc3\xa9t\xc3\xa9" }; /* "été" */
	const char *pieces[] = { "un \xc3\xa9", "t", "\xc3\xa9", NULL };
	char got[64];
	assert_true(run(stops, 1, pieces, got, sizeof(got)));
	assert_string_equal(got, "un ");
}

static void test_no_stop_strings_pass_text_through(void **st)
{
	const char *pieces[] = { "a", "bc", NULL };
	char got[64];
	assert_false(run(NULL, 0, pieces, got, sizeof(got)));
	assert_string_equal(got, "abc");
}

static void test_long_pieces_grow_the_buffer(void **st)
{
	static char big[5000], got[6000];
	char *stops[] = { "STOP" };
	memset(big, 'x', sizeof(big) - 1);
	const char *pieces[] = { big, "ST", "OP", NULL };
	assert_true(run(stops, 1, pieces, got, sizeof(got)));
	assert_int_equal(strlen(got), sizeof(big) - 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_a_stop_string_split_across_pieces_is_found),
		cmocka_unit_test(test_a_false_start_is_released_when_the_next_piece_differs),
		cmocka_unit_test(test_held_text_is_emitted_at_the_end),
		cmocka_unit_test(test_the_earliest_of_several_stops_wins),
		cmocka_unit_test(test_overlapping_prefixes_do_not_hide_a_match),
		cmocka_unit_test(test_a_stop_at_the_very_start_emits_nothing),
		cmocka_unit_test(test_utf8_pieces_stay_whole_characters),
		cmocka_unit_test(test_no_stop_strings_pass_text_through),
		cmocka_unit_test(test_long_pieces_grow_the_buffer),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
