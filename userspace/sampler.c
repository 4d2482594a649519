/* sampler.c - the plain C reference sampler: penalties, temperature, top_k, top_p, min_p and a
 * counter-based draw (see sampler.h for the exact rules, which the CUDA sampler mirrors). */
#include "sampler.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void q3_sampling_default(struct q3_sampling *p)
{
	*p = (struct q3_sampling){ .temperature = 1.0f, .top_p = 1.0f };
}

int q3_sampler_init(struct q3_sampler *s, int vocab, q3_err *e)
{
	memset(s, 0, sizeof(*s));
	if (vocab <= 0)
		return q3_errf(e, -EINVAL, "sampler: vocabulary size %d", vocab);
	s->vocab = vocab;
	s->count = calloc(vocab, sizeof(*s->count));
	s->seen = calloc(vocab, sizeof(*s->seen));
	s->cand = calloc(vocab, sizeof(*s->cand));
	if (!s->count || !s->seen || !s->cand) {
		q3_sampler_free(s);
		return q3_errf(e, -ENOMEM, "sampler: out of memory for %d ids", vocab);
	}
	q3_sampling_default(&s->p);
	return 0;
}

void q3_sampler_free(struct q3_sampler *s)
{
	free(s->count);
	free(s->seen);
	free(s->cand);
	memset(s, 0, sizeof(*s));
}

void q3_sampler_reset(struct q3_sampler *s, const struct q3_sampling *p)
{
	for (int i = 0; i < s->nseen; i++)
		s->count[s->seen[i]] = 0;
	s->nseen = 0;
	s->step = 0;
	s->p = *p;
}

void q3_sampler_accept(struct q3_sampler *s, int32_t id)
{
	if (id < 0 || id >= s->vocab)
		return;
	if (s->count[id]++ == 0)
		s->seen[s->nseen++] = id;
}

int q3_sampler_plan(struct q3_sampler *s, struct q3_sample_row *r, struct q3_logit_adj *adj, int cap)
{
	const struct q3_sampling *p = &s->p;
	int n = 0, err = 0;

	/* count[] is 0 or a penalty count: a bias id is marked by a negative count while the entries
	 * are gathered (a second entry for it is then seen), and restored after */
	for (int i = 0; i < p->nbias; i++) {
		int32_t id = p->bias[i].id;

		if (id < 0 || id >= s->vocab)
			continue; /* ignored, as q3_sampler_sample does */
		if (n == cap || s->count[id] < 0) {
			err = n == cap ? -ENOSPC : -EEXIST;
			break;
		}
		s->count[id] = -s->count[id] - 1;
		adj[n++] = (struct q3_logit_adj){ id, p->bias[i].bias };
	}
	for (int j = 0; j < n; j++)
		s->count[adj[j].id] = -s->count[adj[j].id] - 1;
	if (err)
		return err;
	r->nbias = n;
	/* no penalties: adding -0 changes no logit, so there is nothing to send */
	bool pen = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;

	if (pen && n + s->nseen > cap)
		return -ENOSPC;
	for (int i = 0; pen && i < s->nseen; i++) {
		int32_t t = s->seen[i];

		/* logits[t] -= pen is logits[t] += -pen exactly */
		adj[n++] = (struct q3_logit_adj){ t, -(p->presence_penalty + p->frequency_penalty * (float)s->count[t]) };
	}
	r->npen = n - r->nbias;
	r->adj = adj;
	r->temperature = p->temperature;
	r->top_p = p->top_p;
	r->top_k = p->top_k;
	r->min_p = p->min_p;
	r->seed = p->seed;
	r->step = s->step++;
	return 0;
}

double q3_sampler_uniform(uint64_t seed, uint64_t step)
{
	uint64_t z = seed + (step + 1) * 0x9E3779B97F4A7C15ull; /* splitmix64 */
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	z ^= z >> 31;
	return (double)(z >> 11) * 0x1.0p-53;
}

/* ---- ordering helpers: "better" is (z desc, id asc), a strict total order ------------------- */

static inline bool better(const struct q3_cand *a, const struct q3_cand *b)
{
	return a->z > b->z || (a->z == b->z && a->id < b->id);
}

static inline void swap_cand(struct q3_cand *a, struct q3_cand *b)
{
	struct q3_cand t = *a;
	*a = *b;
	*b = t;
}

/* Rearranges c[0..n) so that c[0..k) holds the k best (in no particular order); 0 < k <= n.
 * Quickselect with a median-of-three pivot. */
static void select_best(struct q3_cand *c, int n, int k)
{
	int lo = 0, hi = n - 1;

	while (lo < hi) {
		int mid = lo + (hi - lo) / 2;
		if (better(&c[mid], &c[lo]))
			swap_cand(&c[mid], &c[lo]);
		if (better(&c[hi], &c[lo]))
			swap_cand(&c[hi], &c[lo]);
		if (better(&c[hi], &c[mid]))
			swap_cand(&c[hi], &c[mid]);
		/* c[lo] best, c[mid] median, c[hi] worst: partition around the median */
		struct q3_cand pivot = c[mid];
		int i = lo, j = hi;
		while (i <= j) {
			while (better(&c[i], &pivot))
				i++;
			while (better(&pivot, &c[j]))
				j--;
			if (i <= j)
				swap_cand(&c[i++], &c[j--]);
		}
		/* now c[lo..j] are all >= pivot-ish and c[i..hi] <= pivot; j < i */
		if (k - 1 <= j)
			hi = j;
		else if (k - 1 >= i)
			lo = i;
		else
			return;
	}
}

static int cmp_best(const void *a, const void *b)
{
	return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

static int cmp_id(const void *a, const void *b)
{
	const struct q3_cand *x = a, *y = b;
	return (x->id > y->id) - (x->id < y->id);
}

static int32_t argmax(const float *x, int n)
{
	int32_t best = -1;
	float bv = -INFINITY;
	for (int i = 0; i < n; i++)
		if (x[i] > bv) { /* NaN compares false: it never wins */
			bv = x[i];
			best = i;
		}
	return best < 0 ? -EDOM : best;
}

/* Keeps the smallest prefix, in "better" order, of c[0..n) whose weight reaches top_p of the
 * total; returns its length.  Sorts only as many candidates as it needs, growing 4x. */
static int top_p_cut(struct q3_cand *c, int n, float zmax, float top_p)
{
	double total = 0;
	for (int i = 0; i < n; i++)
		total += expf(c[i].z - zmax);
	double want = top_p * total;

	for (int m = Q3_MIN(n, 64);; m = Q3_MIN(n, m * 4)) {
		if (m < n)
			select_best(c, n, m);
		qsort(c, m, sizeof(*c), cmp_best);
		double cum = 0;
		for (int i = 0; i < m; i++) {
			cum += expf(c[i].z - zmax);
			if (cum >= want)
				return i + 1;
		}
		if (m == n)
			return n; /* rounding: the whole set never quite reached want */
	}
}

int32_t q3_sampler_sample(struct q3_sampler *s, float *logits)
{
	const struct q3_sampling *p = &s->p;
	const int V = s->vocab;

	for (int i = 0; i < p->nbias; i++)
		if (p->bias[i].id >= 0 && p->bias[i].id < V)
			logits[p->bias[i].id] += p->bias[i].bias;
	for (int i = 0; i < s->nseen; i++) {
		int32_t t = s->seen[i];
		logits[t] -= p->presence_penalty + p->frequency_penalty * (float)s->count[t];
	}
	/* below 1e-5 the scaled logits overflow or the draw is greedy in all but name (vLLM: the same) */
	if (p->temperature < Q3_SAMPLER_GREEDY_T || p->top_k == 1) {
		int32_t id = argmax(logits, V);
		s->step++;
		return id;
	}

	/* candidates: the finite logits (and +inf), scaled by 1 / temperature, in id order */
	float zmax = -INFINITY;
	int n = 0;
	for (int i = 0; i < V; i++) {
		float z = logits[i] / p->temperature;
		if (!(z > -INFINITY))
			continue; /* -inf and NaN */
		s->cand[n++] = (struct q3_cand){ z, i };
		if (z > zmax)
			zmax = z;
	}
	if (n == 0) {
		s->step++;
		return -EDOM;
	}
	if (isinf(zmax)) { /* +inf logits: they share all the mass */
		for (int i = 0; i < n; i++)
			s->cand[i].z = isinf(s->cand[i].z) ? 0.0f : -INFINITY;
		zmax = 0.0f;
	}
	bool filtered = false;
	if (p->top_k > 0 && p->top_k < n) {
		select_best(s->cand, n, p->top_k);
		n = p->top_k;
		filtered = true;
	}
	if (p->top_p < 1.0f) {
		int m = top_p_cut(s->cand, n, zmax, p->top_p);
		filtered |= m < n;
		n = m;
	}
	if (p->min_p > 0.0f) {
		int m = 0;
		for (int i = 0; i < n; i++)
			if (expf(s->cand[i].z - zmax) >= p->min_p)
				s->cand[m++] = s->cand[i];
		filtered |= m < n;
		n = m;
	}
	if (n == 0) { /* only with min_p > 1, which the API refuses but a caller may pass */
		s->step++;
		return -EDOM;
	}
	if (filtered)
		qsort(s->cand, n, sizeof(*s->cand), cmp_id);

	double total = 0;
	for (int i = 0; i < n; i++)
		total += expf(s->cand[i].z - zmax);
	double r = q3_sampler_uniform(p->seed, s->step++) * total, cum = 0;
	for (int i = 0; i < n; i++) {
		cum += expf(s->cand[i].z - zmax);
		if (cum > r)
			return s->cand[i].id;
	}
	return s->cand[n - 1].id;
}
