/* fuzz_config.c - libFuzzer target for config.json and quantize_config.json parsing, including
 * the per-module override rules (regexes compiled from the input) and their matching. */
#include <stdint.h>
#include <stdlib.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct q3_config c;
	struct q3_quant q;
	struct q3_qscheme s;
	q3_err e;

	if (!q3_config_parse((const char *)data, size, "config.json", &c, &e)) {
		if (c.rotary_dim <= 0 || c.rotary_dim > c.head_dim || !c.layer_kind)
			abort();
		q3_quant_scheme(&c.quant, "model.layers.0.mlp.experts.1.up_proj", &s);
		q3_config_free(&c);
	}
	if (!q3_quant_parse_text((const char *)data, size, "quantize_config.json", &q, &e)) {
		q3_quant_scheme(&q, "model.layers.3.self_attn.q_proj", &s);
		if (s.bits != 4 && s.bits != 8 && s.bits < 16)
			abort();
		q3_quant_free(&q);
	}
	return 0;
}
