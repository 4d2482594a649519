/* fuzz_safetensors.c - libFuzzer target: the input is a whole safetensors file image. The parser
 * must accept or reject it without crashing, leaking or reading out of bounds; an accepted header
 * must describe tensors that tile the file exactly. */
#include <stdint.h>
#include <stdlib.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct q3_st_header h;
	q3_err e;
	uint64_t end = 0;

	if (q3_st_parse(data, size, size, "fuzz", &h, &e))
		return 0;
	for (size_t i = 0; i < h.n; i++) {
		if (h.t[i].begin != end || h.t[i].end < h.t[i].begin)
			abort();
		end = h.t[i].end;
	}
	if (h.data_off + end != size)
		abort();
	q3_st_header_free(&h);
	return 0;
}
