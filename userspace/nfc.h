/* nfc.h - Unicode NFC (utf8proc's data) that leaves already-normalized text alone and costs
 * O(n log n) even on adversarial runs of combining marks.
 *
 * Text is cut before every character that starts a normalization segment: a starter that
 * cannot combine with anything before it (ccc 0, not the second of any composition pair, and
 * decomposing, if at all, to such a starter).  NFC of a text is the concatenation of NFC of its
 * segments, and a segment of one character that NFC keeps is left as it is, so only segments
 * holding combining marks (or singletons like U+2126) are normalized, with utf8proc's
 * decomposition and composition and a stable sort for canonical ordering (utf8proc's own is a
 * quadratic bubble sort).
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "util.h"

/* Scratch space of one caller (one thread): grown as needed, freed with q3_nfc_buf_free. */
struct q3_nfc_buf {
	int32_t *cps;
	size_t cps_cap;
	char *out;
	size_t out_len, out_cap;
};

/* NFC of s[0..n), which must be well-formed UTF-8: *out is s itself when NFC changes nothing,
 * else b->out.  0 or -ENOMEM. */
int q3_nfc(struct q3_nfc_buf *b, const uint8_t *s, size_t n, const uint8_t **out, size_t *out_n, q3_err *e);
void q3_nfc_buf_free(struct q3_nfc_buf *b);
