/* nfc.c - NFC that leaves normalized text alone (see nfc.h). */
#include "nfc.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "strbuf.h"
#include "utf8.h"

enum { NFC_KEEP = 0, NFC_CHANGE = 1, NFC_JOIN = 2 };
#define NFC_TABLE_END 0x30000

static bool nfc_second(int32_t cp)
{
	const utf8proc_property_t *p = utf8proc_get_property(cp);
	return p->combining_class || (p->comb_index != UINT16_MAX && p->comb_index >= 0x8000) ||
	       (cp >= 0x1161 && cp <= 0x1175) || (cp >= 0x11A8 && cp <= 0x11C2); /* Hangul V, T */
}

static int nfc_class_slow(int32_t cp)
{
	const utf8proc_property_t *p = utf8proc_get_property(cp);
	utf8proc_int32_t d[32];
	int bc = 0;

	if (nfc_second(cp))
		return NFC_JOIN;
	if (p->decomp_seqindex == UINT16_MAX || p->decomp_type)
		return NFC_KEEP;
	utf8proc_ssize_t k = utf8proc_decompose_char(cp, d, 32, UTF8PROC_DECOMPOSE, &bc);
	if (k <= 0 || k > 32 || nfc_second(d[0]))
		return NFC_JOIN;
	k = utf8proc_normalize_utf32(d, k, UTF8PROC_COMPOSE | UTF8PROC_STABLE);
	return k == 1 && d[0] == cp ? NFC_KEEP : NFC_CHANGE;
}

/* 2 bits per code point below NFC_TABLE_END (0 below U+0300), filled once. */
static uint8_t nfc_cls[NFC_TABLE_END / 4];
static pthread_once_t nfc_once = PTHREAD_ONCE_INIT;

static void build_nfc_table(void)
{
	for (int32_t cp = 0x300; cp < NFC_TABLE_END; cp++)
		nfc_cls[cp >> 2] |= (uint8_t)(nfc_class_slow(cp) << (2 * (cp & 3)));
}

static inline int nfc_class(int32_t cp)
{
	if (cp < NFC_TABLE_END)
		return (nfc_cls[cp >> 2] >> (2 * (cp & 3))) & 3;
	return nfc_class_slow(cp);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Stable sort of a run of non-starters by combining class. */
static void sort_marks(int32_t *cp, size_t n, uint64_t *scratch)
{
	if (n <= 32) {
		for (size_t i = 1; i < n; i++) {
			int32_t x = cp[i];
			int cx = utf8proc_get_property(x)->combining_class;
			size_t j = i;
			for (; j > 0 && utf8proc_get_property(cp[j - 1])->combining_class > cx; j--)
				cp[j] = cp[j - 1];
			cp[j] = x;
		}
		return;
	}
	for (size_t i = 0; i < n; i++)
		scratch[i] = (uint64_t)utf8proc_get_property(cp[i])->combining_class << 56 | (uint64_t)i << 21 |
			     (uint32_t)cp[i];
	qsort(scratch, n, sizeof(*scratch), cmp_u64);
	for (size_t i = 0; i < n; i++)
		cp[i] = (int32_t)(scratch[i] & 0x1FFFFF);
}

/* Appends NFC of the segment s[0..n) to c->out. */
static int nfc_segment(struct q3_nfc_buf *c, const uint8_t *s, size_t n, q3_err *e)
{
	size_t k = 0;

	/* canonical decompositions are at most 4 code points; half the buffer is sort scratch */
	if (q3_grow((void **)&c->cps, &c->cps_cap, 8 * n + 8, sizeof(*c->cps)))
		return q3_errf(e, -ENOMEM, "out of memory");
	for (size_t i = 0; i < n;) {
		int32_t cp;
		int bc = 0;
		i += (size_t)q3_utf8_next(s + i, n - i, &cp);
		utf8proc_ssize_t r = utf8proc_decompose_char(cp, c->cps + k, 4, UTF8PROC_DECOMPOSE, &bc);
		if (r < 0 || r > 4)
			return q3_errf(e, -EINVAL, "NFC: cannot decompose U+%04X", (unsigned)cp);
		k += (size_t)r;
	}
	for (size_t i = 0; i < k;) {
		if (!utf8proc_get_property(c->cps[i])->combining_class) {
			i++;
			continue;
		}
		size_t j = i;
		while (j < k && utf8proc_get_property(c->cps[j])->combining_class)
			j++;
		sort_marks(c->cps + i, j - i, (uint64_t *)(void *)(c->cps + 4 * n + 4));
		i = j;
	}
	utf8proc_ssize_t m = utf8proc_normalize_utf32(c->cps, (utf8proc_ssize_t)k, UTF8PROC_COMPOSE | UTF8PROC_STABLE);
	if (m < 0 || q3_grow((void **)&c->out, &c->out_cap, c->out_len + 4 * (size_t)m, 1))
		return q3_errf(e, -ENOMEM, "out of memory");
	for (utf8proc_ssize_t i = 0; i < m; i++)
		c->out_len += (size_t)q3_utf8_put(c->out + c->out_len, c->cps[i]);
	return 0;
}

static int nfc_copy(struct q3_nfc_buf *c, const uint8_t *s, size_t n, q3_err *e)
{
	if (!n) /* c->out may still be NULL: memcpy(NULL, s, 0) is undefined */
		return 0;
	if (q3_grow((void **)&c->out, &c->out_cap, c->out_len + n, 1))
		return q3_errf(e, -ENOMEM, "out of memory");
	memcpy(c->out + c->out_len, s, n);
	c->out_len += n;
	return 0;
}

/* NFC of s[0..n): *out is s itself when nothing changes, else c->out. */
int q3_nfc(struct q3_nfc_buf *c, const uint8_t *s, size_t n, const uint8_t **out, size_t *out_n, q3_err *e)
{
	size_t seg = 0, copied = 0, i = 0;
	bool dirty = false;
	int err;

	pthread_once(&nfc_once, build_nfc_table);
	c->out_len = 0;
	while (i <= n) {
		int32_t cp = 0;
		int len = 1, cls = NFC_KEEP;
		if (i < n && s[i] >= 0x80) {
			len = q3_utf8_next(s + i, n - i, &cp);
			cls = nfc_class(cp);
		}
		if (cls != NFC_JOIN) {
			if (dirty) { /* [seg, i) needs normalizing */
				if ((err = nfc_copy(c, s + copied, seg - copied, e)) || (err = nfc_segment(c, s + seg, i - seg, e)))
					return err;
				copied = i;
			}
			seg = i;
			dirty = cls == NFC_CHANGE;
			if (i < n && s[i] < 0x80) { /* skip ASCII; its last character may start a segment */
				size_t j = i + 1;
				while (j < n && s[j] < 0x80)
					j++;
				seg = j - 1;
				i = j;
				continue;
			}
		} else {
			dirty = true;
		}
		if (i == n)
			break;
		i += (size_t)len;
	}
	if (!copied) {
		*out = s;
		*out_n = n;
		return 0;
	}
	if ((err = nfc_copy(c, s + copied, n - copied, e)))
		return err;
	*out = (const uint8_t *)c->out;
	*out_n = c->out_len;
	return 0;
}

void q3_nfc_buf_free(struct q3_nfc_buf *b)
{
	free(b->cps);
	free(b->out);
	memset(b, 0, sizeof(*b));
}
