/* fuzz_expert_stats.c - libFuzzer target for the expert statistics file (expert_stats.h).  The
 * input is tried as is, then with its checksum recomputed, so the fuzzer also reaches the checks
 * behind the checksum; a refused file must leave the counts as they were. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "expert_stats.h"

#define LAYERS 2
#define EXPERTS 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct q3_xstats *s;
	double before[LAYERS * EXPERTS], after[LAYERS * EXPERTS];
	uint8_t *copy;
	q3_err e;

	if (!s && q3_xstats_new(LAYERS, EXPERTS, 1000, 1, &s, &e))
		abort();
	q3_xstats_freq(s, before);
	if (q3_xstats_load_buf(s, data, size, "fuzz", &e)) {
		q3_xstats_freq(s, after);
		if (memcmp(before, after, sizeof(before)))
			abort();
	}
	if (size < 8 || !(copy = malloc(size)))
		return 0;
	memcpy(copy, data, size);
	uint64_t h = q3_xstats_checksum(copy, size);

	memcpy(copy + size - 8, &h, 8);
	if (!q3_xstats_load_buf(s, copy, size, "fuzz", &e)) {
		q3_xstats_freq(s, after);
		for (int i = 0; i < LAYERS * EXPERTS; i++)
			if (!(after[i] >= 0 && after[i] <= 2.01)) /* count <= tokens + 1 */
				abort();
	}
	free(copy);
	return 0;
}
