/* json_py.h - JSON text exactly as Python's json.dumps(x, ensure_ascii=False) writes it, which is
 * what Hugging Face's chat templates emit for `x | tojson`: ", " and ": " separators, keys in
 * insertion order (jansson keeps it), non-ASCII characters as they are, control characters as
 * \uXXXX (lowercase hex), integers as is and floats as Python's repr (shortest round trip:
 * 1.0, 0.1, 1e-05, 1e+16).
 */
#pragma once
#include <jansson.h>

#include "strbuf.h"

/* Appends x to sb; 0 or -ENOMEM. */
int q3_json_py(struct q3_sb *sb, const json_t *x);
/* The same into a malloc'ed string (NULL when out of memory). */
char *q3_json_py_str(const json_t *x);
