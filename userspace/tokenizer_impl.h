/* tokenizer_impl.h - the insides of struct q3_tok, shared by tokenizer_load.c (which builds it)
 * and tokenizer.c (which encodes and decodes with it).  Not for other files: use tokenizer.h.
 *
 * Internally BPE runs on raw bytes: the GPT-2 byte-to-character mapping is a bijection, so each
 * vocabulary string is turned into its bytes once at load and the text is never mapped.
 * Merges are a hash map (left id, right id) -> (rank, merged id).
 */
#pragma once
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tokenizer.h"

#define TOK_MAX_FILE (256u << 20)   /* tokenizer.json of a 256k vocabulary is ~11 MB */
#define TOK_MAX_ID ((1 << 22) - 1)  /* ids above this are refused (bounds the id tables) */
#define TOK_MAX_PIECE 65535         /* longest token string, in bytes */

struct entry {
	uint32_t piece, piece_len; /* vocabulary string in the arena (NUL-terminated); 0 len: no token */
	uint32_t bytes, bytes_len; /* what it decodes to */
};

enum { TOK_SPECIAL = 1, TOK_ADDED = 2 };

/* One slot of the bytes -> id map, self-contained for tokens of up to 8 bytes so that a lookup
 * is one cache miss.  whole: 0 not known yet, WHOLE_YES when BPE of the bytes gives the token
 * itself, WHOLE_NO when not; filled lazily by encoders with relaxed atomics (every encoder
 * computes the same value). */
struct bslot {
	uint64_t head; /* the first 8 bytes, zero-padded */
	int32_t id;    /* -1: free */
	uint16_t len;
	uint8_t whole;
	uint8_t pad;
};
enum { WHOLE_YES = 1, WHOLE_NO = 2 };

struct merge_slot {
	uint64_t key; /* left << 32 | right; EMPTY_KEY when free */
	uint32_t rank;
	int32_t new_id;
};
#define EMPTY_KEY UINT64_MAX

struct added {
	uint32_t piece, len; /* content, in the arena */
	int32_t id;
	bool special, normalized;
};

/* Leftmost-longest matching of a few strings: candidates grouped by first byte, longest first. */
struct matcher {
	uint32_t start[257];
	struct added *tok;
	size_t n;
};

struct q3_tok {
	int32_t n_vocab;
	size_t id_cap;
	struct entry *ent;
	uint8_t *flags;            /* per id: TOK_SPECIAL, TOK_ADDED */
	char *arena;
	size_t arena_len, arena_cap;

	uint32_t *vmap; /* string -> id + 1 (0: free) */
	size_t vmask;
	struct bslot *bmap; /* model token bytes -> id, for words that are one token */
	size_t bmask;

	struct merge_slot *mm;
	size_t mmask;
	int mbits;

	int32_t byte_id[256];       /* the token of each single byte */
	uint16_t byte_cp[256];      /* GPT-2 bytes_to_unicode */
	int16_t cp_byte[512];       /* its inverse, -1 where none */

	struct added *added;
	size_t n_added, cap_added;
	struct matcher raw, norm;   /* added tokens matched before / after NFC */

	bool nfc, ignore_merges;
	pcre2_code *re;
	bool jit;
	size_t max_bytes;           /* longest token, decoded */
	char path[256];             /* file being loaded, for messages */
};

static inline uint64_t hash_str(const void *p, size_t n)
{
	const uint8_t *s = p;
	uint64_t h = 0x9E3779B97F4A7C15ull ^ n, w;

	for (; n >= 8; s += 8, n -= 8) {
		memcpy(&w, s, 8);
		h = (h ^ w) * 0xff51afd7ed558ccdull;
		h ^= h >> 32;
	}
	if (n) {
		w = 0;
		memcpy(&w, s, n);
		h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
	}
	return h ^ (h >> 29);
}

static inline size_t hash_pair(uint64_t key, int bits)
{
	return (size_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

static inline const char *piece_of(const struct q3_tok *t, int32_t id)
{
	return t->arena + t->ent[id].piece;
}

static inline int32_t vmap_get(const struct q3_tok *t, const char *s, size_t n)
{
	for (size_t i = hash_str(s, n) & t->vmask;; i = (i + 1) & t->vmask) {
		uint32_t v = t->vmap[i];
		if (!v)
			return -1;
		const struct entry *en = &t->ent[v - 1];
		if (en->piece_len == n && !memcmp(t->arena + en->piece, s, n))
			return (int32_t)v - 1;
	}
}

static inline uint64_t head8(const uint8_t *s, size_t n)
{
	uint64_t h = 0;
	memcpy(&h, s, n < 8 ? n : 8);
	return h;
}

static inline struct bslot *bmap_get(const struct q3_tok *t, const uint8_t *s, size_t n)
{
	uint64_t head = head8(s, n);
	for (size_t i = hash_str(s, n) & t->bmask;; i = (i + 1) & t->bmask) {
		struct bslot *b = &t->bmap[i];
		if (b->id < 0)
			return NULL;
		if (b->head == head && b->len == n &&
		    (n <= 8 || !memcmp(t->arena + t->ent[b->id].bytes + 8, s + 8, n - 8)))
			return b;
	}
}

static inline const struct merge_slot *merge_get(const struct q3_tok *t, int32_t a, int32_t b)
{
	uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
	for (size_t i = hash_pair(key, t->mbits);; i = (i + 1) & t->mmask) {
		const struct merge_slot *m = &t->mm[i];
		if (m->key == key)
			return m;
		if (m->key == EMPTY_KEY)
			return NULL;
	}
}
