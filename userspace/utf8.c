/* utf8.c - UTF-8 validation and lossy decoding (see utf8.h). */
#include "utf8.h"

#include <string.h>

/* For a lead byte: the sequence length (0: never valid as a lead) and the range of the
 * second byte; later bytes are always 80..BF. */
static int lead_info(uint8_t b, uint8_t *lo, uint8_t *hi)
{
	*lo = 0x80;
	*hi = 0xBF;
	if (b >= 0xC2 && b <= 0xDF)
		return 2;
	if (b >= 0xE0 && b <= 0xEF) {
		if (b == 0xE0)
			*lo = 0xA0;
		else if (b == 0xED)
			*hi = 0x9F;
		return 3;
	}
	if (b >= 0xF0 && b <= 0xF4) {
		if (b == 0xF0)
			*lo = 0x90;
		else if (b == 0xF4)
			*hi = 0x8F;
		return 4;
	}
	return 0;
}

/* Length of the valid sequence at s[0..n), or -k where k >= 1 is the length of the maximal
 * ill-formed subpart, or 0 when the input ends inside a sequence that is valid so far. */
static int seq_at(const uint8_t *s, size_t n)
{
	uint8_t lo, hi;
	int len = lead_info(s[0], &lo, &hi);

	if (!len)
		return -1;
	for (int k = 1; k < len; k++) {
		if ((size_t)k >= n)
			return 0;
		if (s[k] < lo || s[k] > hi)
			return -k;
		lo = 0x80;
		hi = 0xBF;
	}
	return len;
}

static inline bool ascii8(const uint8_t *s)
{
	uint64_t w;
	memcpy(&w, s, 8);
	return !(w & 0x8080808080808080ull);
}

size_t q3_utf8_check(const char *str, size_t n)
{
	const uint8_t *s = (const uint8_t *)str;
	size_t i = 0;

	while (i < n) {
		if (i + 8 <= n && ascii8(s + i)) {
			i += 8;
			continue;
		}
		if (s[i] < 0x80) {
			i++;
			continue;
		}
		int k = seq_at(s + i, n - i);
		if (k <= 0)
			return i;
		i += (size_t)k;
	}
	return n;
}

size_t q3_utf8_lossy(const uint8_t *s, size_t n, char *out, bool final, size_t *consumed)
{
	size_t i = 0, o = 0;

	while (i < n) {
		if (s[i] < 0x80) {
			out[o++] = (char)s[i++];
			continue;
		}
		int k = seq_at(s + i, n - i);
		if (k > 0) {
			memcpy(out + o, s + i, (size_t)k);
			o += (size_t)k;
			i += (size_t)k;
			continue;
		}
		if (k == 0) {
			if (!final)
				break;
			k = -(int)(n - i);
		}
		memcpy(out + o, "\xEF\xBF\xBD", 3);
		o += 3;
		i += (size_t)-k;
	}
	if (consumed)
		*consumed = i;
	return o;
}

int q3_utf8_put(char *out, int32_t cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xE0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}
