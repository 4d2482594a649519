/* tokenizer.c - encoding and decoding with a loaded struct q3_tok (tokenizer_load.c builds it):
 * added tokens, NFC, the split regex and BPE; decoding and the streaming decoder.
 *
 * A word is merged in exactly Hugging Face's order: a min-heap on (rank, position) with stale
 * entries skipped when the pair at that position no longer yields the entry's merged id
 * (tokenizers' models/bpe/word.rs, merge_all).  Two shortcuts that do not change the result: a
 * word that is itself a token and that BPE rebuilds (learnt once per token, see struct bslot)
 * is that token, and long texts keep a small cache of recent words.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nfc.h"
#include "strbuf.h"
#include "tokenizer_impl.h"
#include "utf8.h"

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
	struct q3_nfc_buf nfcb;
	pcre2_match_data *md;
	struct wc_ent *wc;   /* cache of recent words, for long texts only */
	size_t wc_mask;
	q3_err *e;
};

static inline int emit(struct enc *c, int32_t id)
{
	if (c->n == c->cap && q3_grow((void **)&c->ids, &c->cap, c->n + 1, sizeof(*c->ids)))
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
		if (q3_grow((void **)&c->sym, &cap, n, sizeof(*c->sym)))
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

static int after_normalize(struct enc *c, const uint8_t *s, size_t n)
{
	return split_added(c, &c->t->norm, s, n, pretokenize);
}

/* The text between raw added tokens: NFC, then normalized added tokens, then split + BPE. */
static int normalize_segment(struct enc *c, const uint8_t *s, size_t n)
{
	if (c->t->nfc) {
		int err = q3_nfc(&c->nfcb, s, n, &s, &n, c->e);
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
	if (!c.md || (len >= WC_MIN_TEXT && !c.wc) || q3_grow((void **)&c.ids, &c.cap, len / 3 + 16, sizeof(*c.ids))) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto out;
	}
	err = split_added(&c, &t->raw, (const uint8_t *)text, len, normalize_segment);
out:
	pcre2_match_data_free(c.md);
	free(c.sym);
	free(c.heap);
	q3_nfc_buf_free(&c.nfcb);
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
