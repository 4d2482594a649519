/* test_snapcache.c - the state cache: longest-prefix lookup, LRU eviction that hands states back,
 * duplicate keys, the max_len bound, and counters. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmocka.h>

#include "snapcache.h"

static int freed;
static void count_free(void *ctx, void *state)
{
	freed++;
}

/* puts ids with a state that is just a tag pointer; returns what was recycled */
static void *put(struct q3_snapcache *c, const int32_t *ids, int n, intptr_t tag)
{
	void *recycled;
	bool exists;
	struct q3_snap *s = q3_snapcache_put(c, ids, n, &recycled, &exists);
	assert_non_null(s);
	assert_false(exists);
	s->state = (void *)tag;
	return recycled;
}

static void test_lookup_finds_the_longest_stored_prefix(void **st)
{
	struct q3_snapcache c;
	const int32_t a[] = { 1, 2, 3 }, b[] = { 1, 2, 3, 4, 5 }, other[] = { 1, 9, 3, 4, 5, 6 };
	const int32_t q[] = { 1, 2, 3, 4, 5, 6, 7 };
	assert_int_equal(q3_snapcache_init(&c, 4, NULL), 0);
	put(&c, a, 3, 10);
	put(&c, b, 5, 20);
	put(&c, other, 6, 30);

	struct q3_snap *s = q3_snapcache_lookup(&c, q, 7, 6);
	assert_non_null(s);
	assert_int_equal((intptr_t)s->state, 20);
	assert_int_equal(s->n, 5);
	/* max_len bounds the match: the caller must keep a token to compute */
	s = q3_snapcache_lookup(&c, q, 7, 4);
	assert_int_equal((intptr_t)s->state, 10);
	/* a prompt equal to a key cannot use it when max_len = n - 1 */
	s = q3_snapcache_lookup(&c, a, 3, 2);
	assert_null(s);
	/* diverging at the second token: nothing */
	const int32_t miss[] = { 1, 8, 3, 4 };
	assert_null(q3_snapcache_lookup(&c, miss, 4, 3));
	assert_int_equal(c.hits, 2);
	assert_int_equal(c.misses, 2);
	assert_int_equal(c.hit_tokens, 8);
	freed = 0;
	q3_snapcache_free(&c, count_free, NULL);
	assert_int_equal(freed, 3);
}

static void test_full_cache_evicts_the_least_recently_used_and_returns_its_state(void **st)
{
	struct q3_snapcache c;
	const int32_t k1[] = { 1 }, k2[] = { 2 }, k3[] = { 3 }, k4[] = { 4 }, q1[] = { 1, 5 };
	assert_int_equal(q3_snapcache_init(&c, 3, NULL), 0);
	assert_null(put(&c, k1, 1, 1));
	assert_null(put(&c, k2, 1, 2));
	assert_null(put(&c, k3, 1, 3));
	assert_non_null(q3_snapcache_lookup(&c, q1, 2, 1)); /* k1 is now the most recent */
	assert_int_equal((intptr_t)put(&c, k4, 1, 4), 2);   /* k2 was the oldest */
	assert_int_equal(c.n, 3);
	const int32_t q2[] = { 2, 7 };
	assert_null(q3_snapcache_lookup(&c, q2, 2, 1));
	assert_int_equal((intptr_t)put(&c, k2, 1, 5), 3);
	q3_snapcache_free(&c, NULL, NULL);
}

static void test_an_existing_key_is_refreshed_not_duplicated(void **st)
{
	struct q3_snapcache c;
	const int32_t k[] = { 5, 6, 7 };
	void *recycled;
	bool exists;
	assert_int_equal(q3_snapcache_init(&c, 2, NULL), 0);
	put(&c, k, 3, 1);
	assert_null(q3_snapcache_put(&c, k, 3, &recycled, &exists));
	assert_true(exists);
	assert_int_equal(c.n, 1);
	q3_snapcache_free(&c, NULL, NULL);
}

static void test_drop_removes_an_entry_and_returns_its_state(void **st)
{
	struct q3_snapcache c;
	const int32_t a[] = { 1, 2 }, b[] = { 3, 4 }, q[] = { 1, 2, 3 };
	void *recycled;
	bool exists;
	assert_int_equal(q3_snapcache_init(&c, 2, NULL), 0);
	put(&c, a, 2, 1);
	struct q3_snap *s = q3_snapcache_put(&c, b, 2, &recycled, &exists);
	assert_null(q3_snapcache_drop(&c, s)); /* never filled */
	assert_int_equal(c.n, 1);
	s = q3_snapcache_lookup(&c, q, 3, 2);
	assert_int_equal((intptr_t)q3_snapcache_drop(&c, s), 1);
	assert_int_equal(c.n, 0);
	assert_null(q3_snapcache_lookup(&c, q, 3, 2));
	q3_snapcache_free(&c, NULL, NULL);
}

static void test_a_zero_capacity_cache_stores_nothing(void **st)
{
	struct q3_snapcache c;
	const int32_t k[] = { 1, 2 };
	void *recycled;
	bool exists;
	assert_int_equal(q3_snapcache_init(&c, 0, NULL), 0);
	assert_null(q3_snapcache_put(&c, k, 2, &recycled, &exists));
	assert_false(exists);
	assert_null(q3_snapcache_lookup(&c, k, 2, 1));
	assert_int_equal(q3_snapcache_init(&c, -1, NULL), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_lookup_finds_the_longest_stored_prefix),
		cmocka_unit_test(test_full_cache_evicts_the_least_recently_used_and_returns_its_state),
		cmocka_unit_test(test_an_existing_key_is_refreshed_not_duplicated),
		cmocka_unit_test(test_drop_removes_an_entry_and_returns_its_state),
		cmocka_unit_test(test_a_zero_capacity_cache_stores_nothing),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
