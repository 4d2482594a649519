/* tokenizer_load.c - builds a struct q3_tok from tokenizer.json (+ tokenizer_config.json) or
 * vocab.json + merges.txt + tokenizer_config.json, refusing with a precise message any pipeline
 * piece that tokenizer.c does not implement exactly. */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jsonfile.h"
#include "strbuf.h"
#include "tokenizer_impl.h"
#include "utf8.h"

/* The Qwen2 split regex (implied for vocab.json + merges.txt) and GPT-2's (ByteLevel with
 * use_regex: true). */
static const char QWEN2_PATTERN[] =
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
	"|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char GPT2_PATTERN[] =
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

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
	if (n > TOK_MAX_PIECE)
		return q3_errf(e, -EINVAL, "%s: %s: token string of %zu bytes (at most %d)", t->path,
			       what, n, TOK_MAX_PIECE);
	if ((err = ensure_id(t, id, e)))
		return err;
	if ((err = arena_add(t, s, n, &t->ent[id].piece, e)))
		return err;
	t->ent[id].piece_len = (uint32_t)n;
	return 0;
}

/* (Re)builds the string -> id map with room for n strings: the model's tokens, then the added
 * ones, which override model tokens of the same string (HF's token_to_id).  Linear probing
 * needs free slots: at most half of it is ever used. */
static int build_vmap(struct q3_tok *t, size_t n, q3_err *e)
{
	size_t cap = 1024;
	while (cap < 2 * n + 2)
		cap *= 2;
	free(t->vmap);
	t->vmap = calloc(cap, sizeof(*t->vmap));
	if (!t->vmap)
		return q3_errf(e, -ENOMEM, "%s: out of memory", t->path);
	t->vmask = cap - 1;
	for (int32_t id = 0; id < t->n_vocab; id++)
		if (t->ent[id].piece_len && !(t->flags[id] & TOK_ADDED))
			vmap_put(t, id);
	for (size_t i = 0; i < t->n_added; i++)
		vmap_put(t, t->added[i].id);
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
		if (!json_is_integer(val) || id < 0 || id > TOK_MAX_ID)
			return q3_errf(e, -EINVAL, "%s: %s[\"%.40s\"]: expected an id in [0, %d]", t->path,
				       where, key, TOK_MAX_ID);
		if (id < t->n_vocab && t->ent[id].piece_len)
			return q3_errf(e, -EINVAL, "%s: %s: id %lld is given to both \"%.40s\" and \"%.40s\"",
				       t->path, where, (long long)id, piece_of(t, (int32_t)id), key);
		char what[96];
		snprintf(what, sizeof(what), "%s[\"%.40s\"]", where, key);
		if ((err = set_piece(t, (int32_t)id, key, json_object_iter_key_len(json_object_key_to_iter(key)),
				     what, e)))
			return err;
	}
	return build_vmap(t, (size_t)t->n_vocab + 4096, e);
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
	int32_t prev = vmap_get(t, s, n);
	int err;

	if (prev >= 0 && (t->flags[prev] & TOK_ADDED)) { /* added before (the map holds added tokens) */
		if (prev != id)
			return q3_errf(e, -EINVAL, "%s: %s: \"%.*s\" is added as both id %d and id %d", t->path,
				       where, (int)Q3_MIN(n, 64), s, prev, id);
		return 0;
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
	if (2 * ((size_t)t->n_vocab + t->n_added) + 2 > t->vmask + 1)
		return build_vmap(t, 2 * ((size_t)t->n_vocab + t->n_added), e);
	vmap_put(t, id);
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
	if (id < 0 || id > TOK_MAX_ID)
		return q3_errf(e, -EINVAL, "%s: %s: id out of [0, %d]", t->path, where, TOK_MAX_ID);
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
	err = q3_json_read(path, TOK_MAX_FILE, true, &root, e);
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

	if ((err = q3_json_read(path, TOK_MAX_FILE, true, &root, e)))
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
	if ((err = q3_json_read(path, TOK_MAX_FILE, false, &vocab, e))) {
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
	if ((err = q3_read_file(path, TOK_MAX_FILE, &buf, &len, e)))
		return err;
	err = load_merges_txt(t, buf, len, e);
	free(buf);
	if (err)
		return err;
	t->nfc = true;
	return compile_regex(t, QWEN2_PATTERN, strlen(QWEN2_PATTERN), false, e);
}

static int longer_first(const void *a, const void *b)
{
	uint32_t x = ((const struct added *)a)->len, y = ((const struct added *)b)->len;
	return x > y ? -1 : x < y;
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
	for (int b = 0; b < 256; b++) /* longest first: equal lengths never match at one place */
		qsort(m->tok + m->start[b], m->start[b + 1] - m->start[b], sizeof(*m->tok), longer_first);
	return 0;
}

/* Decoded bytes of every token: the byte-level inverse when every character of the string
 * has one, else the string's own UTF-8 (what Hugging Face's ByteLevel decoder does). */
static int build_bytes(struct q3_tok *t, q3_err *e)
{
	uint8_t *tmp = malloc(TOK_MAX_PIECE);
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
	if ((err = build_bytes(t, e)) || (err = build_bmap(t, e)) || (err = build_matcher(t, &t->raw, false, e)) ||
	    (err = build_matcher(t, &t->norm, true, e)))
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
	if (t->re)
		pcre2_code_free(t->re);
	free(t);
}
