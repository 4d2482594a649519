/* tune.c - see tune.h. */
#include "tune.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

void q3_tune_init(struct q3_tune *t, int n, int per, uint64_t recheck)
{
	memset(t, 0, sizeof(*t));
	t->n = Q3_MAX(1, Q3_MIN(n, Q3_TUNE_MAX_SETTINGS));
	t->per = Q3_MAX(1, Q3_MIN(per, Q3_TUNE_MAX_PER));
	t->recheck = recheck;
	t->in_trial = t->n > 1 ? 0 : -1;
}

int q3_tune_next(struct q3_tune *t)
{
	if (t->in_trial < 0 && t->n > 1 && t->recheck && t->calls >= t->next_trial)
		t->in_trial = 0;
	t->cur = t->in_trial >= 0 ? t->in_trial % t->n : t->best;
	return t->cur;
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return x < y ? -1 : x > y;
}

void q3_tune_done(struct q3_tune *t, double seconds)
{
	t->calls++;
	if (t->in_trial < 0)
		return;
	t->t[t->cur][t->in_trial / t->n] = (float)seconds;
	if (++t->in_trial < t->n * t->per)
		return;
	float best = 0;

	for (int s = 0; s < t->n; s++) { /* the median of each setting's calls */
		qsort(t->t[s], (size_t)t->per, sizeof(float), cmp_float);
		float med = t->t[s][t->per / 2];

		if (s == 0 || med < best) {
			best = med;
			t->best = s;
		}
	}
	t->in_trial = -1;
	t->next_trial = t->calls + t->recheck;
}
