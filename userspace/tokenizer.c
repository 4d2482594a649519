/* tokenizer.c - the byte-level BPE tokenizer of tokenizer.h: loading tokenizer.json or
 * vocab.json + merges.txt, encoding (added tokens, NFC, split regex, BPE), decoding and the
 * streaming decoder.
 *
 * Internally BPE runs on raw bytes: the GPT-2 byte-to-character mapping is a bijection, so each
 * vocabulary string is turned into its bytes once at load and the text is never mapped.
 * Merges are a hash map (left id, right id) -> (rank, merged id), and a word is merged in
 * exactly Hugging Face's order: a min-heap on (rank, position) with stale entries skipped
 * when the pair at that position no longer yields the entry's merged id (tokenizers'
 * models/bpe/word.rs, merge_all).
 */
#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "jsonfile.h"
#include "strbuf.h"
#include "utf8.h"

#define MAX_FILE (256u << 20)   /* tokenizer.json of a 256k vocabulary is ~11 MB */
#define MAX_ID ((1 << 22) - 1)  /* ids above this are refused (bounds the id tables) */
#define MAX_PIECE 65535         /* longest token string, in bytes */

/* The Qwen2 split regex (implied for vocab.json + merges.txt) and GPT-2's (ByteLevel with
 * use_regex: true). */
static const char QWEN2_PATTERN[] =
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
	"|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char GPT2_PATTERN[] =
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

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
	uint8_t *nfc_cls;           /* 2 bits per code point below NFC_TABLE_END, see nfc_class() */
	pcre2_code *re;
	bool jit;
	size_t max_bytes;           /* longest token, decoded */
	char path[256];             /* file being loaded, for messages */
};

static int build_nfc_table(struct q3_tok *t, q3_err *e);

/* ---- hashing --------------------------------------------------------------------------- */

static uint64_t hash_str(const void *p, size_t n)
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

static const char *piece_of(const struct q3_tok *t, int32_t id)
{
	return t->arena + t->ent[id].piece;
}

static int32_t vmap_get(const struct q3_tok *t, const char *s, size_t n)
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

/* Maps the string of id to id, replacing an earlier id with the same string. */
static void vmap_put(struct q3_tok *t, int32_t id)
{
	const struct entry *en = &t->ent[id];
	const char *s = t->arena + en->piece;
	for (size_t i = hash_str(s, en->piece_len) & t->vmask;; i = (i + 1) & t->vmask) {
		uint32_t v = t->vmap[i];
		if (!v || (t->ent[v - 1].piece_len == en->piece_len &&
			   !memcmp(t->arena + t->ent[v - 1].piece, s, en->piece_len))) {
			t->vmap[i] = (uint32_t)id + 1;
			return;
		}
	}
}

static inline uint64_t head8(const uint8_t *s, size_t n)
{
	uint64_t h = 0;
	memcpy(&h, s, n < 8 ? n : 8);
	return h;
}

static struct bslot *bmap_get(const struct q3_tok *t, const uint8_t *s, size_t n)
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

/* A later merge of the same pair replaces the earlier one, as Hugging Face's HashMap does. */
static void merge_put(struct q3_tok *t, int32_t a, int32_t b, uint32_t rank, int32_t new_id)
{
	uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
	for (size_t i = hash_pair(key, t->mbits);; i = (i + 1) & t->mmask) {
		struct merge_slot *m = &t->mm[i];
		if (m->key == key || m->key == EMPTY_KEY) {
			*m = (struct merge_slot){ key, rank, new_id };
			return;
		}
	}
}

/* ---- loading --------------------------------------------------------------------------- */

static int arena_add(struct q3_tok *t, const void *s, size_t n, uint32_t *off, q3_err *e)
{
	if (t->arena_len + n + 1 > t->arena_cap) {
		size_t cap = t->arena_cap ? t->arena_cap : 1 << 20;
		while (cap < t->arena_len + n + 1)
			cap *= 2;
		if (cap > UINT32_MAX)
			return q3_errf(e, -EFBIG, "%s: the token strings exceed 4 GiB", t->path);
		char *nb = realloc(t->arena, cap);
		if (!nb)
			return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
		t->arena = nb;
		t->arena_cap = cap;
	}
	*off = (uint32_t)t->arena_len;
	memcpy(t->arena + t->arena_len, s, n);
	t->arena[t->arena_len + n] = 0;
	t->arena_len += n + 1;
	return 0;
}

/* Grows the id tables to hold id (capacity doubles: ids mostly arrive in increasing order). */
static int ensure_id(struct q3_tok *t, int32_t id, q3_err *e)
{
	if (id < t->n_vocab)
		return 0;
	if ((size_t)id >= t->id_cap) {
		size_t cap = t->id_cap ? t->id_cap : 1024;
		while (cap <= (size_t)id)
			cap *= 2;
		struct entry *ne = realloc(t->ent, cap * sizeof(*ne));
		if (!ne)
			return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
		t->ent = ne;
		uint8_t *nf = realloc(t->flags, cap);
		if (!nf)
			return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
		t->flags = nf;
		t->id_cap = cap;
	}
	size_t n = (size_t)id + 1;
	memset(t->ent + t->n_vocab, 0, (n - (size_t)t->n_vocab) * sizeof(*t->ent));
	memset(t->flags + t->n_vocab, 0, n - (size_t)t->n_vocab);
	t->n_vocab = (int32_t)n;
	return 0;
}

static int set_piece(struct q3_tok *t, int32_t id, const char *s, size_t n, const char *what, q3_err *e)
{
	int err;
	if (n == 0)
		return q3_errf(e, -EINVAL, "%s: %s: empty token string", t->path, what);
	if (n > MAX_PIECE)
		return q3_errf(e, -EINVAL, "%s: %s: token string of %zu bytes (at most %d)", t->path,
			       what, n, MAX_PIECE);
	if ((err = ensure_id(t, id, e)))
		return err;
	if ((err = arena_add(t, s, n, &t->ent[id].piece, e)))
		return err;
	t->ent[id].piece_len = (uint32_t)n;
	return 0;
}

static int alloc_vmap(struct q3_tok *t, size_t n, q3_err *e)
{
	size_t cap = 1024;
	while (cap < 2 * n + 2)
		cap *= 2;
	free(t->vmap);
	t->vmap = calloc(cap, sizeof(*t->vmap));
	if (!t->vmap)
		return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
	t->vmask = cap - 1;
	return 0;
}

/* The model's vocabulary: an object {"token": id}. */
static int load_vocab(struct q3_tok *t, json_t *vocab, const char *where, q3_err *e)
{
	const char *key;
	json_t *val;
	int err;

	if (!json_is_object(vocab))
		return q3_errf(e, -EINVAL, "%s: %s: expected an object of token -> id", t->path, where);
	if (json_object_size(vocab) == 0)
		return q3_errf(e, -EINVAL, "%s: %s: empty vocabulary", t->path, where);
	json_object_foreach(vocab, key, val) {
		json_int_t id = json_integer_value(val);
		if (!json_is_integer(val) || id < 0 || id > MAX_ID)
			return q3_errf(e, -EINVAL, "%s: %s[\"%.40s\"]: expected an id in [0, %d]", t->path,
				       where, key, MAX_ID);
		if (id < t->n_vocab && t->ent[id].piece_len)
			return q3_errf(e, -EINVAL, "%s: %s: id %lld is given to both \"%.40s\" and \"%.40s\"",
				       t->path, where, (long long)id, piece_of(t, (int32_t)id), key);
		char what[96];
		snprintf(what, sizeof(what), "%s[\"%.40s\"]", where, key);
		if ((err = set_piece(t, (int32_t)id, key, json_object_iter_key_len(json_object_key_to_iter(key)),
				     what, e)))
			return err;
	}
	if ((err = alloc_vmap(t, (size_t)t->n_vocab + 4096, e)))
		return err;
	for (int32_t id = 0; id < t->n_vocab; id++)
		if (t->ent[id].piece_len)
			vmap_put(t, id);
	return 0;
}

static void byte_tables(struct q3_tok *t)
{
	int n = 0;
	memset(t->cp_byte, 0xff, sizeof(t->cp_byte));
	for (int b = 0; b < 256; b++) {
		bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
		t->byte_cp[b] = (uint16_t)(keep ? b : 256 + n++);
		t->cp_byte[t->byte_cp[b]] = (int16_t)b;
	}
}

static int byte_ids(struct q3_tok *t, q3_err *e)
{
	for (int b = 0; b < 256; b++) {
		char s[4];
		int n = q3_utf8_put(s, t->byte_cp[b]);
		t->byte_id[b] = vmap_get(t, s, (size_t)n);
		if (t->byte_id[b] < 0)
			return q3_errf(e, -EINVAL, "%s: the vocabulary lacks the byte-level token \"%.*s\" of byte 0x%02x "
				       "(not a byte-level BPE vocabulary)", t->path, n, s, b);
	}
	return 0;
}

static int alloc_merges(struct q3_tok *t, size_t n, q3_err *e)
{
	t->mbits = 10;
	while (((size_t)1 << t->mbits) < n + n / 2 + 2)
		t->mbits++;
	t->mm = malloc(((size_t)1 << t->mbits) * sizeof(*t->mm));
	if (!t->mm)
		return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
	t->mmask = ((size_t)1 << t->mbits) - 1;
	for (size_t i = 0; i <= t->mmask; i++)
		t->mm[i].key = EMPTY_KEY;
	return 0;
}

/* Merge number rank: a + b -> ab; all three must be in the vocabulary. */
static int add_merge(struct q3_tok *t, uint32_t rank, const char *a, size_t alen, const char *b, size_t blen,
		     const char *where, q3_err *e)
{
	char buf[2 * 1024];
	int32_t ia = vmap_get(t, a, alen), ib = vmap_get(t, b, blen), ic;

	if (ia < 0 || ib < 0)
		return q3_errf(e, -EINVAL, "%s: %s[%u]: \"%.*s\" is not in the vocabulary", t->path, where, rank,
			       (int)Q3_MIN(ia < 0 ? alen : blen, 64), ia < 0 ? a : b);
	if (alen + blen > sizeof(buf))
		return q3_errf(e, -EINVAL, "%s: %s[%u]: merged token too long", t->path, where, rank);
	memcpy(buf, a, alen);
	memcpy(buf + alen, b, blen);
	ic = vmap_get(t, buf, alen + blen);
	if (ic < 0)
		return q3_errf(e, -EINVAL, "%s: %s[%u]: the merged token \"%.*s\" is not in the vocabulary", t->path,
			       where, rank, (int)Q3_MIN(alen + blen, 64), buf);
	merge_put(t, ia, ib, rank, ic);
	return 0;
}

/* tokenizer.json "merges": ["a b", ...] (older files) or [["a", "b"], ...]. */
static int load_merges_json(struct q3_tok *t, json_t *merges, q3_err *e)
{
	size_t i;
	json_t *m;
	int err;

	if (!json_is_array(merges))
		return q3_errf(e, -EINVAL, "%s: model.merges: expected an array", t->path);
	if ((err = alloc_merges(t, json_array_size(merges), e)))
		return err;
	json_array_foreach(merges, i, m) {
		const char *a, *b;
		size_t alen, blen;
		if (json_is_string(m)) {
			a = json_string_value(m);
			const char *sp = strchr(a, ' ');
			if (!sp || strchr(sp + 1, ' '))
				return q3_errf(e, -EINVAL, "%s: model.merges[%zu]: expected \"left right\"", t->path, i);
			alen = (size_t)(sp - a);
			b = sp + 1;
			blen = json_string_length(m) - alen - 1;
		} else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
			   json_is_string(json_array_get(m, 1))) {
			a = json_string_value(json_array_get(m, 0));
			alen = json_string_length(json_array_get(m, 0));
			b = json_string_value(json_array_get(m, 1));
			blen = json_string_length(json_array_get(m, 1));
		} else {
			return q3_errf(e, -EINVAL, "%s: model.merges[%zu]: expected \"left right\" or [left, right]",
				       t->path, i);
		}
		if (i > UINT32_MAX)
			return q3_errf(e, -EINVAL, "%s: model.merges: too many", t->path);
		if ((err = add_merge(t, (uint32_t)i, a, alen, b, blen, "model.merges", e)))
			return err;
	}
	return 0;
}

/* merges.txt: one "left right" a line; lines starting with "#version" are skipped. */
static int load_merges_txt(struct q3_tok *t, const char *text, size_t len, q3_err *e)
{
	size_t lines = 0, rank = 0;
	const char *p = text, *end = text + len;
	int err;

	if (q3_utf8_check(text, len) != len)
		return q3_errf(e, -EINVAL, "%s: not UTF-8 (byte %zu)", t->path, q3_utf8_check(text, len));
	for (const char *q = text; q < end; q++)
		lines += *q == '\n';
	if ((err = alloc_merges(t, lines + 1, e)))
		return err;
	for (size_t line = 1; p < end; line++) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *le = nl ? nl : end;
		if (le > p && le[-1] == '\r')
			le--;
		if (!(le - p >= 8 && !memcmp(p, "#version", 8))) {
			const char *sp = memchr(p, ' ', (size_t)(le - p));
			if (!sp || memchr(sp + 1, ' ', (size_t)(le - sp - 1)))
				return q3_errf(e, -EINVAL, "%s: line %zu: expected \"left right\"", t->path, line);
			if ((err = add_merge(t, (uint32_t)rank, p, (size_t)(sp - p), sp + 1, (size_t)(le - sp - 1),
					     "merge", e)))
				return err;
			rank++;
		}
		p = nl ? nl + 1 : end;
	}
	return 0;
}

static int add_added(struct q3_tok *t, int32_t id, const char *s, size_t n, bool special, bool normalized,
		     const char *where, q3_err *e)
{
	int err;

	for (size_t i = 0; i < t->n_added; i++) {
		struct added *a = &t->added[i];
		if (a->len == n && !memcmp(t->arena + a->piece, s, n)) {
			if (a->id != id)
				return q3_errf(e, -EINVAL, "%s: %s: \"%.*s\" is added as both id %d and id %d", t->path,
					       where, (int)Q3_MIN(n, 64), s, a->id, id);
			return 0;
		}
	}
	if (t->n_added == t->cap_added) {
		size_t cap = t->cap_added ? 2 * t->cap_added : 32;
		struct added *na = realloc(t->added, cap * sizeof(*na));
		if (!na)
			return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
		t->added = na;
		t->cap_added = cap;
	}
	if ((err = set_piece(t, id, s, n, where, e)))
		return err;
	t->added[t->n_added++] = (struct added){ t->ent[id].piece, (uint32_t)n, id, special, normalized };
	t->flags[id] = (uint8_t)(TOK_ADDED | (special ? TOK_SPECIAL : 0));
	return 0;
}

static bool opt_bool(json_t *o, const char *key, bool def)
{
	json_t *v = json_object_get(o, key);
	return json_is_boolean(v) ? json_is_true(v) : def;
}

/* One added token object: {"id"?, "content", "special", "normalized", "lstrip", ...}. */
static int load_added_one(struct q3_tok *t, json_t *o, json_int_t id, const char *where, q3_err *e)
{
	json_t *c = json_object_get(o, "content");

	if (!json_is_object(o) || !json_is_string(c))
		return q3_errf(e, -EINVAL, "%s: %s: expected an object with a \"content\" string", t->path, where);
	if (id < 0 || id > MAX_ID)
		return q3_errf(e, -EINVAL, "%s: %s: id out of [0, %d]", t->path, where, MAX_ID);
	if (opt_bool(o, "lstrip", false) || opt_bool(o, "rstrip", false) || opt_bool(o, "single_word", false))
		return q3_errf(e, -ENOTSUP, "%s: %s: lstrip, rstrip and single_word added tokens are not supported",
			       t->path, where);
	/* Hugging Face's default for "normalized" is !special. */
	bool special = opt_bool(o, "special", false);
	return add_added(t, (int32_t)id, json_string_value(c), json_string_length(c), special,
			 opt_bool(o, "normalized", !special), where, e);
}

static int load_added_json(struct q3_tok *t, json_t *arr, q3_err *e)
{
	size_t i;
	json_t *o;
	int err;

	if (!arr || json_is_null(arr))
		return 0;
	if (!json_is_array(arr))
		return q3_errf(e, -EINVAL, "%s: added_tokens: expected an array", t->path);
	json_array_foreach(arr, i, o) {
		char where[48];
		json_t *id = json_object_get(o, "id");
		snprintf(where, sizeof(where), "added_tokens[%zu]", i);
		if (!json_is_integer(id))
			return q3_errf(e, -EINVAL, "%s: %s.id: expected an integer", t->path, where);
		if ((err = load_added_one(t, o, json_integer_value(id), where, e)))
			return err;
	}
	return 0;
}

/* tokenizer_config.json: "added_tokens_decoder": {"151643": {...}}; and, for vocab.json +
 * merges.txt, the tokenizer_class must be Qwen2's. */
static int load_config(struct q3_tok *t, const char *dir, bool need_qwen2, q3_err *e)
{
	char path[4096];
	json_t *root, *dec;
	int err = 0;

	if (q3_path_join(path, sizeof(path), dir, "tokenizer_config.json"))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	err = q3_json_read(path, MAX_FILE, true, &root, e);
	if (err == -ENOENT)
		return 0;
	if (err)
		return err;
	snprintf(t->path, sizeof(t->path), "%s", path);
	if (need_qwen2) {
		json_t *cls = json_object_get(root, "tokenizer_class");
		if (json_is_string(cls) && strncmp(json_string_value(cls), "Qwen2Tokenizer", 14)) {
			err = q3_errf(e, -ENOTSUP, "%s: tokenizer_class \"%.40s\": only Qwen2Tokenizer is known for "
				      "vocab.json + merges.txt", path, json_string_value(cls));
			goto out;
		}
	}
	dec = json_object_get(root, "added_tokens_decoder");
	if (dec && !json_is_object(dec)) {
		err = q3_errf(e, -EINVAL, "%s: added_tokens_decoder: expected an object", path);
		goto out;
	}
	const char *key;
	json_t *o;
	json_object_foreach(dec, key, o) {
		char where[96], *end;
		long long id = strtoll(key, &end, 10);
		snprintf(where, sizeof(where), "added_tokens_decoder[\"%.40s\"]", key);
		if (!*key || *end || id < 0) {
			err = q3_errf(e, -EINVAL, "%s: %s: the key must be an id", path, where);
			goto out;
		}
		if ((err = load_added_one(t, o, id, where, e)))
			goto out;
	}
out:
	json_decref(root);
	return err;
}

/* Oniguruma's \s (what Hugging Face's regexes run on) is [\t-\r\x85\p{Z}]; PCRE2's also has
 * U+180E.  Rewrites \s and \S to the explicit class so that both agree. */
static int onig_pattern(const char *pat, size_t n, struct q3_sb *out)
{
	static const char SP[] = "\\t-\\r\\x{85}\\p{Z}";
	bool in_class = false;
	int err = 0;

	for (size_t i = 0; i < n && !err; i++) {
		char c = pat[i];
		if (c == '\\' && i + 1 < n) {
			char d = pat[++i];
			if (d == 's')
				err = q3_sb_addf(out, in_class ? "%s" : "[%s]", SP);
			else if (d == 'S' && !in_class)
				err = q3_sb_addf(out, "[^%s]", SP);
			else
				err = q3_sb_addc(out, c) ?: q3_sb_addc(out, d);
			continue;
		}
		if (!in_class && c == '[') {
			in_class = true;
			err = q3_sb_addc(out, c);
			if (i + 1 < n && pat[i + 1] == '^')
				err = err ?: q3_sb_addc(out, pat[++i]);
			if (i + 1 < n && pat[i + 1] == ']') /* a leading ] is literal */
				err = err ?: q3_sb_addc(out, pat[++i]);
			continue;
		}
		if (in_class && c == '[' && i + 1 < n && pat[i + 1] == ':') {
			const char *close = strstr(pat + i + 2, ":]");
			if (close && (size_t)(close - pat) < n) {
				err = q3_sb_add(out, pat + i, (size_t)(close - pat) + 2 - i);
				i = (size_t)(close - pat) + 1;
				continue;
			}
		}
		if (in_class && c == ']')
			in_class = false;
		err = q3_sb_addc(out, c);
	}
	return err;
}

static int compile_regex(struct q3_tok *t, const char *pat, size_t n, bool literal, q3_err *e)
{
	struct q3_sb sb = Q3_SB_INIT;
	int ec, err;
	PCRE2_SIZE eo;

	if (literal)
		err = q3_sb_add(&sb, pat, n);
	else
		err = onig_pattern(pat, n, &sb);
	if (err)
		return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
	t->re = pcre2_compile((PCRE2_SPTR)sb.buf, sb.len,
			      PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &ec, &eo, NULL);
	q3_sb_free(&sb);
	if (!t->re) {
		PCRE2_UCHAR msg[160];
		pcre2_get_error_message(ec, msg, sizeof(msg));
		return q3_errf(e, -EINVAL, "%s: split regex at offset %zu: %s", t->path, (size_t)eo, (char *)msg);
	}
	t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
	return 0;
}

static bool type_is(json_t *o, const char *type)
{
	json_t *v = json_object_get(o, "type");
	return json_is_string(v) && !strcmp(json_string_value(v), type);
}

static int check_normalizer(struct q3_tok *t, json_t *n, q3_err *e)
{
	if (!n || json_is_null(n))
		return 0;
	if (type_is(n, "NFC")) {
		t->nfc = true;
		return 0;
	}
	if (type_is(n, "Sequence")) {
		json_t *list = json_object_get(n, "normalizers"), *x;
		size_t i;
		json_array_foreach(list, i, x) {
			if (!type_is(x, "NFC"))
				return q3_errf(e, -ENOTSUP, "%s: normalizer: only NFC is supported", t->path);
			t->nfc = true;
		}
		return 0;
	}
	return q3_errf(e, -ENOTSUP, "%s: normalizer: only NFC is supported", t->path);
}

static int check_bytelevel(struct q3_tok *t, json_t *bl, bool want_regex, q3_err *e)
{
	if (opt_bool(bl, "add_prefix_space", false))
		return q3_errf(e, -ENOTSUP, "%s: pre_tokenizer: ByteLevel add_prefix_space is not supported", t->path);
	if (opt_bool(bl, "use_regex", true) != want_regex)
		return q3_errf(e, -ENOTSUP, "%s: pre_tokenizer: ByteLevel use_regex must be %s here", t->path,
			       want_regex ? "true (no Split)" : "false (after a Split)");
	return 0;
}

/* Supported: Sequence[Split(regex, Isolated), ByteLevel(use_regex false)] (Qwen2, Llama 3) or
 * ByteLevel(use_regex true) alone (GPT-2). */
static int load_pretokenizer(struct q3_tok *t, json_t *p, q3_err *e)
{
	json_t *split, *bl, *pat, *rx, *lit;
	int err;

	if (type_is(p, "ByteLevel")) {
		if ((err = check_bytelevel(t, p, true, e)))
			return err;
		return compile_regex(t, GPT2_PATTERN, strlen(GPT2_PATTERN), false, e);
	}
	if (!type_is(p, "Sequence") || json_array_size(json_object_get(p, "pretokenizers")) != 2)
		return q3_errf(e, -ENOTSUP, "%s: pre_tokenizer: expected Sequence[Split, ByteLevel] or ByteLevel",
			       t->path);
	split = json_array_get(json_object_get(p, "pretokenizers"), 0);
	bl = json_array_get(json_object_get(p, "pretokenizers"), 1);
	if (!type_is(split, "Split") || !type_is(bl, "ByteLevel"))
		return q3_errf(e, -ENOTSUP, "%s: pre_tokenizer: expected Sequence[Split, ByteLevel]", t->path);
	if ((err = check_bytelevel(t, bl, false, e)))
		return err;
	json_t *beh = json_object_get(split, "behavior");
	if (!json_is_string(beh) || strcmp(json_string_value(beh), "Isolated") || opt_bool(split, "invert", false))
		return q3_errf(e, -ENOTSUP, "%s: pre_tokenizer: only Split with behavior Isolated, not inverted, "
			       "is supported", t->path);
	pat = json_object_get(split, "pattern");
	rx = json_object_get(pat, "Regex");
	lit = json_object_get(pat, "String");
	if (json_is_string(rx))
		return compile_regex(t, json_string_value(rx), json_string_length(rx), false, e);
	if (json_is_string(lit))
		return compile_regex(t, json_string_value(lit), json_string_length(lit), true, e);
	return q3_errf(e, -EINVAL, "%s: pre_tokenizer: Split.pattern: expected {\"Regex\": ...} or {\"String\": ...}",
		       t->path);
}

static int check_model(struct q3_tok *t, json_t *m, q3_err *e)
{
	json_t *v;

	if (!json_is_object(m))
		return q3_errf(e, -EINVAL, "%s: model: expected an object", t->path);
	if ((v = json_object_get(m, "type")) && !type_is(m, "BPE"))
		return q3_errf(e, -ENOTSUP, "%s: model.type \"%.32s\": only BPE is supported", t->path,
			       json_is_string(v) ? json_string_value(v) : "?");
	v = json_object_get(m, "dropout");
	if (v && !json_is_null(v) && json_number_value(v) != 0)
		return q3_errf(e, -ENOTSUP, "%s: model.dropout: BPE dropout is not supported", t->path);
	static const char *const empty[] = { "continuing_subword_prefix", "end_of_word_suffix" };
	for (size_t i = 0; i < Q3_ARRAY_SIZE(empty); i++) {
		v = json_object_get(m, empty[i]);
		if (v && !json_is_null(v) && !(json_is_string(v) && !json_string_length(v)))
			return q3_errf(e, -ENOTSUP, "%s: model.%s is not supported", t->path, empty[i]);
	}
	if (opt_bool(m, "byte_fallback", false))
		return q3_errf(e, -ENOTSUP, "%s: model.byte_fallback is not supported", t->path);
	t->ignore_merges = opt_bool(m, "ignore_merges", false);
	return 0;
}

static int load_tokenizer_json(struct q3_tok *t, const char *path, q3_err *e)
{
	json_t *root, *model, *dec;
	int err;

	if ((err = q3_json_read(path, MAX_FILE, true, &root, e)))
		return err;
	model = json_object_get(root, "model");
	dec = json_object_get(root, "decoder");
	if ((err = check_model(t, model, e)) || (err = check_normalizer(t, json_object_get(root, "normalizer"), e)) ||
	    (err = load_pretokenizer(t, json_object_get(root, "pre_tokenizer"), e)))
		goto out;
	if (!type_is(dec, "ByteLevel")) {
		err = q3_errf(e, -ENOTSUP, "%s: decoder: only ByteLevel is supported", path);
		goto out;
	}
	if ((err = load_vocab(t, json_object_get(model, "vocab"), "model.vocab", e)) || (err = byte_ids(t, e)) ||
	    (err = load_merges_json(t, json_object_get(model, "merges"), e)))
		goto out;
	err = load_added_json(t, json_object_get(root, "added_tokens"), e);
out:
	json_decref(root);
	return err;
}

static int load_vocab_merges(struct q3_tok *t, const char *dir, q3_err *e)
{
	char path[4096];
	char *buf;
	size_t len;
	json_t *vocab;
	int err;

	if (q3_path_join(path, sizeof(path), dir, "vocab.json"))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	snprintf(t->path, sizeof(t->path), "%s", path);
	if ((err = q3_json_read(path, MAX_FILE, false, &vocab, e))) {
		if (err == -ENOENT)
			return q3_errf(e, err, "%s: no tokenizer.json, nor vocab.json + merges.txt", dir);
		return err;
	}
	err = load_vocab(t, vocab, "vocab", e);
	json_decref(vocab);
	if (err || (err = byte_ids(t, e)))
		return err;
	if (q3_path_join(path, sizeof(path), dir, "merges.txt"))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	snprintf(t->path, sizeof(t->path), "%s", path);
	if ((err = q3_read_file(path, MAX_FILE, &buf, &len, e)))
		return err;
	err = load_merges_txt(t, buf, len, e);
	free(buf);
	if (err)
		return err;
	t->nfc = true;
	return compile_regex(t, QWEN2_PATTERN, strlen(QWEN2_PATTERN), false, e);
}

static int build_matcher(struct q3_tok *t, struct matcher *m, bool normalized, q3_err *e)
{
	size_t n = 0;

	for (size_t i = 0; i < t->n_added; i++)
		n += t->added[i].normalized == normalized;
	m->n = n;
	memset(m->start, 0, sizeof(m->start));
	if (!n)
		return 0;
	m->tok = malloc(n * sizeof(*m->tok));
	if (!m->tok)
		return q3_errf(e, -ENOMEM, "out of memory");
	/* counting sort on the first byte, then longest first within each group */
	for (size_t i = 0; i < t->n_added; i++)
		if (t->added[i].normalized == normalized)
			m->start[(uint8_t)t->arena[t->added[i].piece] + 1]++;
	for (int b = 0; b < 256; b++)
		m->start[b + 1] += m->start[b];
	uint32_t fill[256];
	memcpy(fill, m->start, sizeof(fill));
	for (size_t i = 0; i < t->n_added; i++)
		if (t->added[i].normalized == normalized)
			m->tok[fill[(uint8_t)t->arena[t->added[i].piece]]++] = t->added[i];
	for (int b = 0; b < 256; b++) /* insertion sort by length, descending */
		for (uint32_t i = m->start[b] + 1; i < m->start[b + 1]; i++)
			for (uint32_t j = i; j > m->start[b] && m->tok[j].len > m->tok[j - 1].len; j--) {
				struct added tmp = m->tok[j];
				m->tok[j] = m->tok[j - 1];
				m->tok[j - 1] = tmp;
			}
	return 0;
}

/* Decoded bytes of every token: the byte-level inverse when every character of the string
 * has one, else the string's own UTF-8 (what Hugging Face's ByteLevel decoder does). */
static int build_bytes(struct q3_tok *t, q3_err *e)
{
	uint8_t *tmp = malloc(MAX_PIECE);
	int err = 0;

	if (!tmp)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (int32_t id = 0; id < t->n_vocab && !err; id++) {
		struct entry *en = &t->ent[id];
		const uint8_t *s = (const uint8_t *)t->arena + en->piece;
		size_t n = 0, i = 0;
		bool mapped = true;
		if (!en->piece_len)
			continue;
		while (i < en->piece_len) {
			int32_t cp;
			i += (size_t)q3_utf8_next(s + i, en->piece_len - i, &cp);
			if (cp >= 512 || t->cp_byte[cp] < 0) {
				mapped = false;
				break;
			}
			tmp[n++] = (uint8_t)t->cp_byte[cp];
		}
		if (mapped) {
			err = arena_add(t, tmp, n, &en->bytes, e);
			en->bytes_len = (uint32_t)n;
		} else {
			en->bytes = en->piece;
			en->bytes_len = en->piece_len;
		}
		t->max_bytes = Q3_MAX(t->max_bytes, en->bytes_len);
	}
	free(tmp);
	return err;
}

/* The bytes -> id map of the model's tokens (added tokens never come out of BPE). */
static int build_bmap(struct q3_tok *t, q3_err *e)
{
	size_t cap = 1024;
	while (cap < (size_t)t->n_vocab + t->n_vocab / 2 + 2)
		cap *= 2;
	t->bmap = calloc(cap, sizeof(*t->bmap));
	if (!t->bmap)
		return q3_errf(e, -ENOMEM, "out of memory");
	t->bmask = cap - 1;
	for (size_t i = 0; i < cap; i++)
		t->bmap[i].id = -1;
	for (int32_t id = 0; id < t->n_vocab; id++) {
		const struct entry *en = &t->ent[id];
		const uint8_t *s = (const uint8_t *)t->arena + en->bytes;
		if (!en->piece_len || (t->flags[id] & TOK_ADDED) || en->bytes_len > UINT16_MAX ||
		    bmap_get(t, s, en->bytes_len)) /* two strings with the same bytes: keep the first */
			continue;
		size_t i = hash_str(s, en->bytes_len) & t->bmask;
		while (t->bmap[i].id >= 0)
			i = (i + 1) & t->bmask;
		t->bmap[i] = (struct bslot){ head8(s, en->bytes_len), id, (uint16_t)en->bytes_len, 0, 0 };
	}
	return 0;
}

int q3_tok_load(const char *dir, struct q3_tok **out, q3_err *e)
{
	char path[4096];
	struct q3_tok *t;
	int err;

	*out = NULL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return q3_errf(e, -ENOMEM, "out of memory");
	byte_tables(t);
	if (q3_path_join(path, sizeof(path), dir, "tokenizer.json")) {
		err = q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
		goto fail;
	}
	snprintf(t->path, sizeof(t->path), "%s", path);
	if (access(path, F_OK) == 0) {
		err = load_tokenizer_json(t, path, e);
		if (!err)
			err = load_config(t, dir, false, e);
	} else {
		err = load_vocab_merges(t, dir, e);
		if (!err)
			err = load_config(t, dir, true, e);
	}
	if (err)
		goto fail;
	/* added tokens override model tokens of the same string (HF's token_to_id) */
	for (size_t i = 0; i < t->n_added; i++)
		vmap_put(t, t->added[i].id);
	if ((err = build_bytes(t, e)) || (err = build_bmap(t, e)) || (err = build_matcher(t, &t->raw, false, e)) ||
	    (err = build_matcher(t, &t->norm, true, e)) || (t->nfc && (err = build_nfc_table(t, e))))
		goto fail;
	*out = t;
	return 0;
fail:
	q3_tok_free(t);
	return err;
}

void q3_tok_free(struct q3_tok *t)
{
	if (!t)
		return;
	free(t->ent);
	free(t->flags);
	free(t->bmap);
	free(t->arena);
	free(t->vmap);
	free(t->mm);
	free(t->added);
	free(t->raw.tok);
	free(t->norm.tok);
	free(t->nfc_cls);
	if (t->re)
		pcre2_code_free(t->re);
	free(t);
}

/* ---- encoding -------------------------------------------------------------------------- */

struct sym {
	int32_t c, prev, next, len;
};

struct heap_ent {
	uint64_t key; /* rank << 32 | pos: the smallest pops first */
	int32_t new_id;
};

/* A word of 2..15 bytes and its (at most 4) ids; len 0: empty. */
struct wc_ent {
	uint8_t key[15];
	uint8_t len;
	int32_t ids[4]; /* -1 past the last */
};
#define WC_MIN_TEXT 4096 /* shorter texts go without the cache */

/* Per-call state: nothing in q3_tok changes while encoding, so threads never share this. */
struct enc {
	const struct q3_tok *t;
	int32_t *ids;
	size_t n, cap;
	struct sym *sym;
	struct heap_ent *heap;
	size_t sym_cap;
	int32_t *cps;        /* NFC: code points of one segment */
	size_t cps_cap;
	char *nfc;           /* NFC output */
	size_t nfc_len, nfc_cap;
	pcre2_match_data *md;
	struct wc_ent *wc;   /* cache of recent words, for long texts only */
	size_t wc_mask;
	q3_err *e;
};

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
	if (need <= *cap)
		return 0;
	size_t c = *cap ? *cap : 64;
	while (c < need)
		c *= 2;
	void *np = realloc(*p, c * elem);
	if (!np)
		return -ENOMEM;
	*p = np;
	*cap = c;
	return 0;
}

static inline int emit(struct enc *c, int32_t id)
{
	if (c->n == c->cap && grow((void **)&c->ids, &c->cap, c->n + 1, sizeof(*c->ids)))
		return q3_errf(c->e, -ENOMEM, "out of memory");
	c->ids[c->n++] = id;
	return 0;
}

static inline void heap_push(struct heap_ent *h, size_t *n, struct heap_ent x)
{
	size_t i = (*n)++;
	while (i) {
		size_t p = (i - 1) / 2;
		if (h[p].key <= x.key)
			break;
		h[i] = h[p];
		i = p;
	}
	h[i] = x;
}

static inline struct heap_ent heap_pop(struct heap_ent *h, size_t *n)
{
	struct heap_ent top = h[0], x = h[--*n];
	size_t i = 0, m = *n;
	for (;;) {
		size_t l = 2 * i + 1;
		if (l >= m)
			break;
		if (l + 1 < m && h[l + 1].key < h[l].key)
			l++;
		if (x.key <= h[l].key)
			break;
		h[i] = h[l];
		i = l;
	}
	if (m)
		h[i] = x;
	return top;
}

static inline void push_pair(const struct q3_tok *t, struct heap_ent *h, size_t *nh, const struct sym *s,
			     int32_t pos)
{
	const struct merge_slot *m = merge_get(t, s[pos].c, s[s[pos].next].c);
	if (m)
		heap_push(h, nh, (struct heap_ent){ (uint64_t)m->rank << 32 | (uint32_t)pos, m->new_id });
}

static int bpe_uncached(struct enc *c, const uint8_t *w, size_t n);

/* BPE of one pre-token w[0..n) (raw bytes). */
static int bpe_word(struct enc *c, const uint8_t *w, size_t n)
{
	const struct q3_tok *t = c->t;

	if (n == 1)
		return emit(c, t->byte_id[w[0]]);
	struct wc_ent *ce = NULL;
	size_t n0 = c->n;
	if (c->wc && n < sizeof(ce->key)) {
		ce = &c->wc[hash_str(w, n) & c->wc_mask];
		if (ce->len == n && !memcmp(ce->key, w, n)) {
			for (int i = 0; i < 4 && ce->ids[i] >= 0; i++)
				if (emit(c, ce->ids[i]))
					return -ENOMEM;
			return 0;
		}
	}
	int err = bpe_uncached(c, w, n);
	if (!err && ce && c->n - n0 <= 4) {
		memcpy(ce->key, w, n);
		ce->len = (uint8_t)n;
		for (size_t i = 0; i < 4; i++)
			ce->ids[i] = n0 + i < c->n ? c->ids[n0 + i] : -1;
	}
	return err;
}

/* BPE without the word cache. */
static int bpe_uncached(struct enc *c, const uint8_t *w, size_t n)
{
	const struct q3_tok *t = c->t;
	struct sym *s;
	struct heap_ent *h;
	size_t nh = 0;
	struct bslot *whole = n <= t->max_bytes ? bmap_get(t, w, n) : NULL;
	if (whole) {
		/* ignore_merges: a word that is a token is that token; otherwise only when BPE
		 * would rebuild it, which is learnt the first time the word is seen */
		int st = __atomic_load_n(&whole->whole, __ATOMIC_RELAXED);
		if (t->ignore_merges || st == WHOLE_YES)
			return emit(c, whole->id);
		if (st == WHOLE_NO)
			whole = NULL;
	}
	if (n > INT32_MAX / 4)
		return q3_errf(c->e, -E2BIG, "a pre-token of %zu bytes is too long", n);
	if (n > c->sym_cap) {
		size_t cap = c->sym_cap;
		if (grow((void **)&c->sym, &cap, n, sizeof(*c->sym)))
			return q3_errf(c->e, -ENOMEM, "out of memory");
		struct heap_ent *nh2 = realloc(c->heap, 3 * cap * sizeof(*c->heap));
		if (!nh2)
			return q3_errf(c->e, -ENOMEM, "out of memory");
		c->heap = nh2;
		c->sym_cap = cap;
	}
	s = c->sym;
	h = c->heap;
	for (size_t i = 0; i < n; i++)
		s[i] = (struct sym){ t->byte_id[w[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 1 };
	for (size_t i = 0; i + 1 < n; i++)
		push_pair(t, h, &nh, s, (int32_t)i);
	while (nh) {
		struct heap_ent top = heap_pop(h, &nh);
		int32_t pos = (int32_t)(uint32_t)top.key, next = s[pos].next;
		if (!s[pos].len || next < 0)
			continue;
		const struct merge_slot *m = merge_get(t, s[pos].c, s[next].c);
		if (!m || m->new_id != top.new_id)
			continue; /* stale entry */
		s[pos].c = top.new_id;
		s[pos].len += s[next].len;
		s[pos].next = s[next].next;
		s[next].len = 0;
		if (s[pos].next >= 0)
			s[s[pos].next].prev = pos;
		if (s[pos].prev >= 0)
			push_pair(t, h, &nh, s, s[pos].prev);
		if (s[pos].next >= 0)
			push_pair(t, h, &nh, s, pos);
	}
	if (whole)
		__atomic_store_n(&whole->whole, s[0].next < 0 && s[0].c == whole->id ? WHOLE_YES : WHOLE_NO,
				 __ATOMIC_RELAXED);
	for (int32_t i = 0; i >= 0; i = s[i].next)
		if (emit(c, s[i].c))
			return -ENOMEM;
	return 0;
}


/* Split by the regex (matches and the gaps between them are pre-tokens), then BPE.  An empty
 * match (possible only with unusual patterns) is stepped over; its character joins the gap. */
static int pretokenize(struct enc *c, const uint8_t *s, size_t n)
{
	const struct q3_tok *t = c->t;
	size_t pos = 0, from = 0;
	int err;

	while (from < n) {
		int rc;
		if (t->jit)
			rc = pcre2_jit_match(t->re, s, n, from, 0, c->md, NULL);
		else
			rc = PCRE2_ERROR_JIT_STACKLIMIT;
		if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
			rc = pcre2_match(t->re, s, n, from, PCRE2_NO_UTF_CHECK, c->md, NULL);
		if (rc == PCRE2_ERROR_NOMATCH)
			break;
		if (rc < 0) {
			PCRE2_UCHAR msg[160];
			pcre2_get_error_message(rc, msg, sizeof(msg));
			return q3_errf(c->e, -EINVAL, "split regex failed at byte %zu: %s", from, (char *)msg);
		}
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
		size_t ms = ov[0], me = ov[1];
		if (me == ms) {
			int32_t cp;
			if (ms >= n)
				break;
			from = ms + (size_t)q3_utf8_next(s + ms, n - ms, &cp);
			continue;
		}
		if (ms > pos && (err = bpe_word(c, s + pos, ms - pos)))
			return err;
		if ((err = bpe_word(c, s + ms, me - ms)))
			return err;
		pos = from = me;
	}
	return pos < n ? bpe_word(c, s + pos, n - pos) : 0;
}

/* Calls fn on the text between matches of m's strings (leftmost-longest) and emits the ids
 * of the matches. */
static int split_added(struct enc *c, const struct matcher *m, const uint8_t *s, size_t n,
		       int (*fn)(struct enc *, const uint8_t *, size_t))
{
	size_t gap = 0;
	int err;

	if (!m->n)
		return n ? fn(c, s, n) : 0;
	for (size_t i = 0; i < n; i++) {
		uint8_t b = s[i];
		for (uint32_t k = m->start[b]; k < m->start[b + 1]; k++) {
			const struct added *a = &m->tok[k];
			if (a->len > n - i || memcmp(c->t->arena + a->piece, s + i, a->len))
				continue;
			if (i > gap && (err = fn(c, s + gap, i - gap)))
				return err;
			if ((err = emit(c, a->id)))
				return err;
			i += a->len - 1;
			gap = i + 1;
			break;
		}
	}
	return gap < n ? fn(c, s + gap, n - gap) : 0;
}

/* ---- NFC -------------------------------------------------------------------------------
 * Text is cut before every character that starts a normalization segment: a starter that
 * cannot combine with anything before it (ccc 0, not the second of any composition pair, and
 * decomposing, if at all, to such a starter).  NFC of the whole text is the concatenation of
 * NFC of the segments, and a segment of one character that NFC keeps is left alone, so only
 * segments holding combining marks (or singletons like U+2126) are normalized.  Canonical
 * ordering is done here with a stable sort (utf8proc's bubble sort is quadratic). */

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

static int build_nfc_table(struct q3_tok *t, q3_err *e)
{
	t->nfc_cls = calloc(NFC_TABLE_END / 4, 1);
	if (!t->nfc_cls)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (int32_t cp = 0x300; cp < NFC_TABLE_END; cp++)
		t->nfc_cls[cp >> 2] |= (uint8_t)(nfc_class_slow(cp) << (2 * (cp & 3)));
	return 0;
}

static inline int nfc_class(const struct q3_tok *t, int32_t cp)
{
	if (cp < NFC_TABLE_END)
		return (t->nfc_cls[cp >> 2] >> (2 * (cp & 3))) & 3;
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

/* Appends NFC of the segment s[0..n) to c->nfc. */
static int nfc_segment(struct enc *c, const uint8_t *s, size_t n)
{
	size_t k = 0;

	/* canonical decompositions are at most 4 code points; half the buffer is sort scratch */
	if (grow((void **)&c->cps, &c->cps_cap, 8 * n + 8, sizeof(*c->cps)))
		return q3_errf(c->e, -ENOMEM, "out of memory");
	for (size_t i = 0; i < n;) {
		int32_t cp;
		int bc = 0;
		i += (size_t)q3_utf8_next(s + i, n - i, &cp);
		utf8proc_ssize_t r = utf8proc_decompose_char(cp, c->cps + k, 4, UTF8PROC_DECOMPOSE, &bc);
		if (r < 0 || r > 4)
			return q3_errf(c->e, -EINVAL, "NFC: cannot decompose U+%04X", (unsigned)cp);
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
	if (m < 0 || grow((void **)&c->nfc, &c->nfc_cap, c->nfc_len + 4 * (size_t)m, 1))
		return q3_errf(c->e, -ENOMEM, "out of memory");
	for (utf8proc_ssize_t i = 0; i < m; i++)
		c->nfc_len += (size_t)q3_utf8_put(c->nfc + c->nfc_len, c->cps[i]);
	return 0;
}

static int nfc_copy(struct enc *c, const uint8_t *s, size_t n)
{
	if (grow((void **)&c->nfc, &c->nfc_cap, c->nfc_len + n, 1))
		return q3_errf(c->e, -ENOMEM, "out of memory");
	memcpy(c->nfc + c->nfc_len, s, n);
	c->nfc_len += n;
	return 0;
}

/* NFC of s[0..n): *out is s itself when nothing changes, else c->nfc. */
static int nfc(struct enc *c, const uint8_t *s, size_t n, const uint8_t **out, size_t *out_n)
{
	size_t seg = 0, copied = 0, i = 0;
	bool dirty = false;
	int err;

	c->nfc_len = 0;
	while (i <= n) {
		int32_t cp = 0;
		int len = 1, cls = NFC_KEEP;
		if (i < n && s[i] >= 0x80) {
			len = q3_utf8_next(s + i, n - i, &cp);
			cls = nfc_class(c->t, cp);
		}
		if (cls != NFC_JOIN) {
			if (dirty) { /* [seg, i) needs normalizing */
				if ((err = nfc_copy(c, s + copied, seg - copied)) || (err = nfc_segment(c, s + seg, i - seg)))
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
	if ((err = nfc_copy(c, s + copied, n - copied)))
		return err;
	*out = (const uint8_t *)c->nfc;
	*out_n = c->nfc_len;
	return 0;
}

static int after_normalize(struct enc *c, const uint8_t *s, size_t n)
{
	return split_added(c, &c->t->norm, s, n, pretokenize);
}

/* The text between raw added tokens: NFC, then normalized added tokens, then split + BPE. */
static int normalize_segment(struct enc *c, const uint8_t *s, size_t n)
{
	if (c->t->nfc) {
		int err = nfc(c, s, n, &s, &n);
		if (err)
			return err;
	}
	return after_normalize(c, s, n);
}

int q3_tok_encode(const struct q3_tok *t, const char *text, size_t len, int32_t **ids, size_t *n, q3_err *e)
{
	struct enc c = { .t = t, .e = e };
	size_t bad = q3_utf8_check(text, len);
	int err;

	*ids = NULL;
	*n = 0;
	if (bad != len)
		return q3_errf(e, -EINVAL, "text is not valid UTF-8 (byte %zu)", bad);
	c.md = pcre2_match_data_create(1, NULL);
	if (len >= WC_MIN_TEXT) {
		size_t entries = 256;
		while (entries < 8192 && entries < len / 32)
			entries *= 2;
		c.wc = calloc(entries, sizeof(*c.wc));
		c.wc_mask = entries - 1;
	}
	if (!c.md || (len >= WC_MIN_TEXT && !c.wc) || grow((void **)&c.ids, &c.cap, len / 3 + 16, sizeof(*c.ids))) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto out;
	}
	err = split_added(&c, &t->raw, (const uint8_t *)text, len, normalize_segment);
out:
	pcre2_match_data_free(c.md);
	free(c.sym);
	free(c.heap);
	free(c.cps);
	free(c.nfc);
	free(c.wc);
	if (err) {
		free(c.ids);
		return err;
	}
	*ids = c.ids;
	*n = c.n;
	return 0;
}

/* ---- decoding -------------------------------------------------------------------------- */

static int check_id(const struct q3_tok *t, int32_t id, size_t item, q3_err *e)
{
	if (id < 0 || id >= t->n_vocab)
		return q3_errf(e, -EINVAL, "id %d (item %zu) is outside the vocabulary [0, %d)", id, item, t->n_vocab);
	return 0;
}

int q3_tok_decode(const struct q3_tok *t, const int32_t *ids, size_t n, char **text, size_t *len, q3_err *e)
{
	size_t total = 0, o = 0;
	char *raw, *out;
	int err;

	*text = NULL;
	*len = 0;
	for (size_t i = 0; i < n; i++) {
		if ((err = check_id(t, ids[i], i, e)))
			return err;
		total += t->ent[ids[i]].bytes_len;
	}
	raw = malloc(total + 1);
	if (!raw)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (size_t i = 0; i < n; i++) {
		const struct entry *en = &t->ent[ids[i]];
		memcpy(raw + o, t->arena + en->bytes, en->bytes_len);
		o += en->bytes_len;
	}
	raw[total] = 0;
	if (q3_utf8_check(raw, total) == total) {
		*text = raw;
		*len = total;
		return 0;
	}
	out = malloc(3 * total + 1);
	if (!out) {
		free(raw);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	o = q3_utf8_lossy((const uint8_t *)raw, total, out, true, NULL);
	out[o] = 0;
	free(raw);
	*text = out;
	*len = o;
	return 0;
}

int q3_tok_stream_init(struct q3_tok_stream *s, const struct q3_tok *t, unsigned flags, q3_err *e)
{
	memset(s, 0, sizeof(*s));
	s->tok = t;
	s->flags = flags;
	s->work = malloc(t->max_bytes + 4);
	s->out = malloc(3 * (t->max_bytes + 4) + 1);
	if (!s->work || !s->out) {
		q3_tok_stream_free(s);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	return 0;
}

int q3_tok_stream_push(struct q3_tok_stream *s, int32_t id, const char **text, size_t *len, q3_err *e)
{
	const struct q3_tok *t = s->tok;
	size_t n, used;
	int err;

	*text = s->out;
	*len = 0;
	if ((err = check_id(t, id, 0, e)))
		return err;
	if ((s->flags & Q3_TOK_SKIP_SPECIAL) && (t->flags[id] & TOK_SPECIAL))
		return 0;
	const struct entry *en = &t->ent[id];
	memcpy(s->work, s->pend, s->npend);
	memcpy(s->work + s->npend, t->arena + en->bytes, en->bytes_len);
	n = s->npend + en->bytes_len;
	*len = q3_utf8_lossy(s->work, n, s->out, false, &used);
	s->npend = n - used;
	memcpy(s->pend, s->work + used, s->npend);
	return 0;
}

void q3_tok_stream_flush(struct q3_tok_stream *s, const char **text, size_t *len)
{
	*text = s->out;
	*len = q3_utf8_lossy(s->pend, s->npend, s->out, true, NULL);
	s->npend = 0;
}

void q3_tok_stream_free(struct q3_tok_stream *s)
{
	free(s->work);
	free(s->out);
	s->work = NULL;
	s->out = NULL;
}

/* ---- lookups --------------------------------------------------------------------------- */

int q3_tok_vocab_size(const struct q3_tok *t)
{
	return t->n_vocab;
}

int32_t q3_tok_id(const struct q3_tok *t, const char *token_text)
{
	return vmap_get(t, token_text, strlen(token_text));
}

const char *q3_tok_piece(const struct q3_tok *t, int32_t id)
{
	if (id < 0 || id >= t->n_vocab || !t->ent[id].piece_len)
		return NULL;
	return piece_of(t, id);
}

const uint8_t *q3_tok_bytes(const struct q3_tok *t, int32_t id, size_t *len)
{
	if (id < 0 || id >= t->n_vocab || !t->ent[id].piece_len)
		return NULL;
	*len = t->ent[id].bytes_len;
	return (const uint8_t *)t->arena + t->ent[id].bytes;
}

bool q3_tok_is_special(const struct q3_tok *t, int32_t id)
{
	return id >= 0 && id < t->n_vocab && (t->flags[id] & TOK_SPECIAL);
}
