/* gpu_compare.h - the comparison every GPU test ends with, shared by the C and CUDA tests:
 * non-finite values first (where the reference is finite), then the relative L2 error. */
#pragma once
#include <math.h>
#include <stddef.h>

struct gc_result {
	size_t bad;   /* non-finite outputs where the reference is finite */
	size_t first; /* the first of them */
	double rel;   /* ||got - ref|| / ||ref|| over the finite ones (absolute if ref is 0) */
};

static inline struct gc_result gc_compare(const float *got, const float *ref, size_t n)
{
	struct gc_result r = { 0, 0, 0.0 };
	double num = 0, den = 0;

	for (size_t i = 0; i < n; i++) {
		if (!isfinite(got[i]) && isfinite(ref[i])) {
			if (!r.bad++)
				r.first = i;
			continue;
		}
		num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
		den += (double)ref[i] * ref[i];
	}
	r.rel = den > 0 ? sqrt(num / den) : sqrt(num);
	return r;
}
