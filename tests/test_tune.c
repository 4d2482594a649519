/* test_tune.c - the setting picker (userspace/tune.h): the fastest setting wins a trial even with
 * outliers, the trial runs the settings round-robin, it is repeated after `recheck` calls and
 * follows a change, and one setting needs no trial. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "tune.h"

/* a call's time under setting s: cost[s], with every fifth call of a setting ten times slower */
static double timed(const double *cost, int s, int i)
{
	return i % 5 == 4 ? 10 * cost[s] : cost[s];
}

static int run_trial(struct q3_tune *t, const double *cost, int *order)
{
	int calls = 0;

	while (t->in_trial >= 0 || calls == 0) {
		int s = q3_tune_next(t);

		if (order)
			order[calls] = s;
		q3_tune_done(t, timed(cost, s, calls / t->n));
		calls++;
	}
	return calls;
}

static void test_fastest_wins(void **state)
{
	struct q3_tune t;
	double cost[3] = {3.0, 1.0, 2.0};
	int order[64];

	(void)state;
	q3_tune_init(&t, 3, 8, 100);
	assert_int_equal(run_trial(&t, cost, order), 24);
	for (int i = 0; i < 24; i++) /* round-robin */
		assert_int_equal(order[i], i % 3);
	assert_int_equal(t.best, 1);
	for (int i = 0; i < 100; i++) { /* the best until the recheck, 100 calls on */
		assert_int_equal(q3_tune_next(&t), 1);
		q3_tune_done(&t, 1.0);
	}
	/* the machine changed: setting 2 is now the fastest */
	cost[1] = 5.0;
	assert_int_equal(q3_tune_next(&t), 0); /* a new trial starts */
	q3_tune_done(&t, timed(cost, 0, 0));
	int rest = run_trial(&t, cost, NULL);

	assert_int_equal(rest + 1, 24);
	assert_int_equal(t.best, 2);
}

static void test_one_setting(void **state)
{
	struct q3_tune t;

	(void)state;
	q3_tune_init(&t, 1, 8, 10);
	for (int i = 0; i < 50; i++) {
		assert_int_equal(q3_tune_next(&t), 0);
		q3_tune_done(&t, 1.0);
		assert_int_equal(t.in_trial, -1);
	}
}

static void test_no_recheck(void **state)
{
	struct q3_tune t;
	double cost[2] = {1.0, 2.0};

	(void)state;
	q3_tune_init(&t, 2, 4, 0); /* recheck 0: one trial, then the best for good */
	run_trial(&t, cost, NULL);
	for (int i = 0; i < 1000; i++) {
		assert_int_equal(q3_tune_next(&t), 0);
		q3_tune_done(&t, 1.0);
	}
	assert_int_equal(t.in_trial, -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_fastest_wins),
		cmocka_unit_test(test_one_setting),
		cmocka_unit_test(test_no_recheck),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
