/* fuzz_request.c - libFuzzer target: OpenAI request bodies through q3_api_parse, as a chat and as
 * a completion request; then the error JSON when refused.  Must never crash, leak or hang. */
#include <stdint.h>
#include <stdlib.h>

#include "api_request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct q3_sampling def;
	struct q3_api_req r;
	struct q3_api_error err;

	q3_sampling_default(&def);
	for (int kind = Q3_API_CHAT; kind <= Q3_API_COMPLETION; kind++) {
		if (q3_api_parse(kind, (const char *)data, size, &def, 151936, &r, &err) == 0) {
			char *s = r.chat ? json_dumps(r.chat, JSON_COMPACT) : NULL;
			free(s);
			q3_api_req_free(&r);
		} else {
			free(q3_api_error_json(&err));
		}
	}
	return 0;
}
