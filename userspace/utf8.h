/* utf8.h - UTF-8 validation and lossy decoding, the way Python's bytes.decode("utf-8",
 * errors="replace") and Rust's String::from_utf8_lossy do it: every maximal ill-formed subpart
 * becomes one U+FFFD (Unicode 15, section 3.9, "U+FFFD Substitution of Maximal Subparts").
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Returns n if s[0..n) is well-formed UTF-8 (no overlongs, surrogates or code points above
 * U+10FFFF), else the offset of the first byte of the first ill-formed sequence. */
size_t q3_utf8_check(const char *s, size_t n);

/* Copies in[0..n) to out, replacing each maximal ill-formed subpart by U+FFFD (EF BF BD).
 * out must hold 3 * n bytes.  With final false, an incomplete sequence at the very end that
 * could still become valid is left unconsumed; with final true it becomes one U+FFFD.
 * Returns the bytes written; *consumed (may be NULL when final) gets the bytes read. */
size_t q3_utf8_lossy(const uint8_t *in, size_t n, char *out, bool final, size_t *consumed);

/* Decodes the code point at s[0..n) (n >= 1) of well-formed UTF-8; returns its length. */
static inline int q3_utf8_next(const uint8_t *s, size_t n, int32_t *cp)
{
	uint8_t b = s[0];
	if (b < 0x80 || n < 2) {
		*cp = b;
		return 1;
	}
	if (b < 0xE0) {
		*cp = ((b & 0x1F) << 6) | (s[1] & 0x3F);
		return 2;
	}
	if (b < 0xF0 && n >= 3) {
		*cp = ((b & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
		return 3;
	}
	if (n >= 4) {
		*cp = ((b & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
		return 4;
	}
	*cp = b;
	return 1;
}

/* Writes code point cp (< 0x110000) as UTF-8 into out (4 bytes room); returns its length. */
int q3_utf8_put(char *out, int32_t cp);
