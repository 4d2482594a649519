/* model_ref.h - what the whole-model GPU tests (test_model.c, test_offload.c) share: the
 * fixtures' reference logits (reference.safetensors), pass/fail counting, and the logits
 * comparison of docs/DESIGN.md "Numerics" (NaN/Inf first, relative L2, argmax agreement).
 * Header-only: each test stays one program. */
#pragma once
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "gpu_compare.h"
#include "safetensors.h"
#include "util.h"

static int npass, nfail;

struct ref {
	char *buf;
	size_t len;
	struct q3_st_header h;
};

static const void *ref_tensor(const struct ref *r, const char *name, int64_t *d0, int64_t *d1)
{
	for (size_t i = 0; i < r->h.n; i++)
		if (!strcmp(r->h.t[i].name, name)) {
			*d0 = r->h.t[i].shape[0];
			*d1 = r->h.t[i].ndim > 1 ? r->h.t[i].shape[1] : 1;
			return r->buf + r->h.data_off + r->h.t[i].begin;
		}
	return NULL;
}

static int ref_load(const char *dir, struct ref *r)
{
	char path[1024];
	q3_err e;

	snprintf(path, sizeof(path), "%s/reference.safetensors", dir);
	memset(r, 0, sizeof(*r));
	if (q3_read_file(path, (size_t)1 << 32, &r->buf, &r->len, &e) ||
	    q3_st_parse(r->buf, r->len, r->len, path, &r->h, &e)) {
		printf("skip  %s: %s\n", dir, e.msg);
		return -1;
	}
	return 0;
}

static void result(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void result(bool ok, const char *fmt, ...)
{
	va_list ap;

	printf("%s ", ok ? "ok   " : "FAIL ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	ok ? npass++ : nfail++;
}

static int argmax(const float *x, int n)
{
	int b = 0;

	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

/* rel L2 over rows x V and the fraction of rows whose argmax agrees; NaN/Inf first.  tie > 0:
 * rows whose reference top-2 gap is below tie x the row's RMS are near-ties that an error within
 * tolerance may legitimately flip; they are left out of the argmax count (and reported).  tie < 0:
 * the same with |tie| standard deviations of the measured error: a logit's error has a standard
 * deviation of about rel x RMS, the difference of two about sqrt(2) rel x RMS. */
static void compare_logits_ties(const char *what, const float *got, const float *ref, int rows, int V, double tol,
				double min_agree, double tie)
{
	struct gc_result c = gc_compare(got, ref, (size_t)rows * V);
	int agree = 0, counted = 0;

	if (c.bad) {
		result(false, "%s: %zu non-finite logits, the first at row %zu column %zu", what, c.bad, c.first / V,
		       c.first % V);
		return;
	}
	if (tie < 0)
		tie = -tie * sqrt(2.0) * c.rel;
	for (int r = 0; r < rows; r++) {
		const float *x = ref + (size_t)r * V;
		int b = argmax(x, V);
		double ss = 0, second = -INFINITY;

		for (int i = 0; i < V; i++) {
			ss += (double)x[i] * x[i];
			if (i != b && x[i] > second)
				second = x[i];
		}
		if (tie > 0 && x[b] - second < tie * sqrt(ss / V))
			continue;
		counted++;
		agree += argmax(got + (size_t)r * V, V) == b;
	}
	double frac = counted ? (double)agree / counted : 1.0;
	char ties[64] = "";

	if (counted < rows)
		snprintf(ties, sizeof(ties), "; %d near-ties (gap < %.1e x RMS) left out", rows - counted, tie);
	/* near-ties may not be most of the rows: the argmax check must keep rows to check */
	result(c.rel <= tol && frac >= min_agree && 2 * counted >= rows,
	       "%s: rel L2 %.2e (tol %.0e), argmax agrees at %d of %d (need %.0f%%)%s", what, c.rel, tol, agree, counted,
	       min_agree * 100, ties);
}

/* Near-tie threshold where CPU experts (int8 activations) compute: three standard deviations of
 * the measured error (see test_offload.c). */
#define OFFLOAD_TIE (-3.0)

static inline void compare_logits(const char *what, const float *got, const float *ref, int rows, int V, double tol,
			   double min_agree)
{
	compare_logits_ties(what, got, ref, rows, V, tol, min_agree, 0.0);
}
