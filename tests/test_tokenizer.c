/* test_tokenizer.c - the tokenizer against Hugging Face: every vector of encode.jsonl (ids and
 * decoded text), llama.cpp's 46 qwen2 cases, the vocab.json + merges.txt loading path, round
 * trips, NFC against utf8proc, the streaming decoder at every split point of multi-byte text,
 * invalid input, concurrent encoding, and loader errors. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utf8proc.h>

#include "tok_fixtures.h"
#include "tokenizer.h"
#include "utf8.h"

static struct q3_tok *tok;
static int32_t byte_tok[256]; /* the token that decodes to exactly that byte */

static int setup(void **state)
{
	q3_err e;
	if (q3_tok_load(TOK_FIXTURES, &tok, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return -1;
	}
	memset(byte_tok, 0xff, sizeof(byte_tok));
	for (int32_t t = q3_tok_vocab_size(tok) - 1; t >= 0; t--) {
		size_t bl;
		const uint8_t *b = q3_tok_bytes(tok, t, &bl);
		if (b && bl == 1)
			byte_tok[b[0]] = t;
	}
	for (int b = 0; b < 256; b++)
		if (byte_tok[b] < 0)
			return -1;
	return 0;
}

static int teardown(void **state)
{
	q3_tok_free(tok);
	return 0;
}

static int32_t *encode(const struct q3_tok *t, const char *s, size_t len, size_t *n)
{
	int32_t *ids;
	q3_err e;
	int rc = q3_tok_encode(t, s, len, &ids, n, &e);
	if (rc)
		fail_msg("encode failed: %s", e.msg);
	return ids;
}

static void assert_ids(const int32_t *got, size_t ngot, const int32_t *want, size_t nwant, const char *what,
		       int line)
{
	size_t i = 0;
	while (i < ngot && i < nwant && got[i] == want[i])
		i++;
	if (i == ngot && i == nwant)
		return;
	fail_msg("%s (vector %d): ids differ at %zu of %zu/%zu: got %d, want %d", what, line, i, ngot, nwant,
		 i < ngot ? got[i] : -1, i < nwant ? want[i] : -1);
}

/* ---- encode.jsonl ---------------------------------------------------------------------- */

static void check_encode_vector(json_t *rec, int line, void *ctx)
{
	json_t *text = json_object_get(rec, "text"), *dec = json_object_get(rec, "decoded");
	size_t nwant, ngot, dlen;
	int32_t *want = json_ids(json_object_get(rec, "ids"), &nwant);
	int32_t *got = encode(tok, json_string_value(text), json_string_length(text), &ngot);
	char *s;
	q3_err e;

	assert_ids(got, ngot, want, nwant, "encode.jsonl", line);
	assert_int_equal(q3_tok_decode(tok, want, nwant, &s, &dlen, &e), 0);
	assert_int_equal(dlen, json_string_length(dec));
	assert_memory_equal(s, json_string_value(dec), dlen);
	free(s);
	/* round trip: what decodes is NFC, and NFC encodes to the same ids */
	free(got);
	got = encode(tok, json_string_value(dec), json_string_length(dec), &ngot);
	assert_ids(got, ngot, want, nwant, "encode(decode(ids))", line);
	(*(int *)ctx)++;
	free(got);
	free(want);
}

static void test_encode_vectors(void **state)
{
	int n = 0;
	for_each_jsonl("encode.jsonl", check_encode_vector, &n);
	assert_int_equal(n, 392);
}

/* ---- llama.cpp's cases ----------------------------------------------------------------- */

static void test_llamacpp(void **state)
{
	static const char SEP[] = "\n__ggml_vocab_test__\n";
	char *inp, *out, *p, *o;
	size_t ilen, olen;
	int cases = 0;
	q3_err e;

	assert_int_equal(q3_read_file(TOK_FIXTURES "/llamacpp-vocab-qwen2.inp", 1 << 20, &inp, &ilen, &e), 0);
	assert_int_equal(q3_read_file(TOK_FIXTURES "/llamacpp-vocab-qwen2.out", 1 << 20, &out, &olen, &e), 0);
	for (p = inp, o = out; o < out + olen && *o; cases++) {
		char *sep = strstr(p, SEP), *nl = strchr(o, '\n');
		size_t n, nw = 0;
		int32_t want[256];
		assert_non_null(sep);
		assert_non_null(nl);
		*nl = 0;
		for (char *q = o; *q;) {
			char *end;
			want[nw++] = (int32_t)strtol(q, &end, 10);
			q = end;
			while (*q == ' ')
				q++;
		}
		int32_t *got = encode(tok, p, (size_t)(sep - p), &n);
		assert_ids(got, n, want, nw, "llama.cpp qwen2", cases + 1);
		free(got);
		p = sep + strlen(SEP);
		o = nl + 1;
	}
	assert_int_equal(cases, 46);
	free(inp);
	free(out);
}

/* ---- vocab.json + merges.txt, made from tokenizer.json at run time ------------------------ */

static void write_file(const char *dir, const char *name, const char *data, size_t len)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
}

static void write_str(const char *dir, const char *name, const char *s)
{
	write_file(dir, name, s, strlen(s));
}

static void remove_dir(const char *dir)
{
	static const char *const names[] = { "vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json" };
	char path[512];
	for (size_t i = 0; i < Q3_ARRAY_SIZE(names); i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
	}
	rmdir(dir);
}

struct two_toks {
	struct q3_tok *a, *b;
};

static void compare_encodings(json_t *rec, int line, void *ctx)
{
	struct two_toks *tt = ctx;
	json_t *text = json_object_get(rec, "text");
	size_t na, nb;
	int32_t *a = encode(tt->a, json_string_value(text), json_string_length(text), &na);
	int32_t *b = encode(tt->b, json_string_value(text), json_string_length(text), &nb);
	assert_ids(b, nb, a, na, "vocab.json+merges.txt vs tokenizer.json", line);
	free(a);
	free(b);
}

static void test_vocab_merges_path(void **state)
{
	char dir[] = "/tmp/q3tokXXXXXX", *buf, *cfg;
	size_t len, clen;
	json_error_t je;
	q3_err e;
	struct q3_tok *t2;

	assert_non_null(mkdtemp(dir));
	assert_int_equal(q3_read_file(TOK_FIXTURES "/tokenizer.json", 64u << 20, &buf, &len, &e), 0);
	json_t *root = json_loadb(buf, len, 0, &je);
	free(buf);
	assert_non_null(root);
	json_t *model = json_object_get(root, "model"), *m;
	char *vocab = json_dumps(json_object_get(model, "vocab"), JSON_COMPACT);
	write_file(dir, "vocab.json", vocab, strlen(vocab));
	free(vocab);
	FILE *f = open_memstream(&buf, &len);
	fputs("#version: 0.2\n", f);
	size_t i;
	json_array_foreach(json_object_get(model, "merges"), i, m)
		fprintf(f, "%s %s\n", json_string_value(json_array_get(m, 0)), json_string_value(json_array_get(m, 1)));
	fclose(f);
	write_file(dir, "merges.txt", buf, len);
	free(buf);
	json_decref(root);
	assert_int_equal(q3_read_file(TOK_FIXTURES "/tokenizer_config.json", 1 << 20, &cfg, &clen, &e), 0);
	write_file(dir, "tokenizer_config.json", cfg, clen);
	free(cfg);

	if (q3_tok_load(dir, &t2, &e))
		fail_msg("%s", e.msg);
	assert_int_equal(q3_tok_vocab_size(t2), q3_tok_vocab_size(tok));
	for (int32_t id = 0; id < q3_tok_vocab_size(tok); id++) {
		size_t l1, l2;
		assert_string_equal(q3_tok_piece(t2, id), q3_tok_piece(tok, id));
		const uint8_t *b1 = q3_tok_bytes(tok, id, &l1), *b2 = q3_tok_bytes(t2, id, &l2);
		assert_int_equal(l1, l2);
		assert_memory_equal(b1, b2, l1);
		assert_int_equal(q3_tok_is_special(t2, id), q3_tok_is_special(tok, id));
	}
	struct two_toks tt = { tok, t2 };
	for_each_jsonl("encode.jsonl", compare_encodings, &tt);
	q3_tok_free(t2);

	/* a config naming another tokenizer class is refused for this path */
	write_str(dir, "tokenizer_config.json", "{\"tokenizer_class\": \"LlamaTokenizer\"}");
	assert_int_equal(q3_tok_load(dir, &t2, &e), -ENOTSUP);
	assert_non_null(strstr(e.msg, "LlamaTokenizer"));
	/* a merge naming a token that is not in the vocabulary */
	write_str(dir, "tokenizer_config.json", "{}");
	write_str(dir, "merges.txt", "\xc4\xa0 \xc4\xa0\nzzqq yy\n");
	assert_int_equal(q3_tok_load(dir, &t2, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "merges.txt"));
	assert_non_null(strstr(e.msg, "zzqq"));
	write_str(dir, "merges.txt", "a b c\n");
	assert_int_equal(q3_tok_load(dir, &t2, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "line 1"));
	remove_dir(dir);
}

/* ---- lookups and decoding -------------------------------------------------------------- */

static void test_lookups(void **state)
{
	size_t len;
	const uint8_t *b;

	assert_int_equal(q3_tok_vocab_size(tok), 151669);
	assert_int_equal(q3_tok_id(tok, "<|im_end|>"), 151645);
	assert_int_equal(q3_tok_id(tok, "<|endoftext|>"), 151643);
	assert_int_equal(q3_tok_id(tok, "<tool_call>"), 151657);
	assert_int_equal(q3_tok_id(tok, "</think>"), 151668);
	assert_int_equal(q3_tok_id(tok, "\xc4\xa0"), 220); /* "Ġ" */
	assert_int_equal(q3_tok_id(tok, "no such token"), -1);
	assert_string_equal(q3_tok_piece(tok, 151644), "<|im_start|>");
	assert_string_equal(q3_tok_piece(tok, 9707), "Hello");
	assert_null(q3_tok_piece(tok, -1));
	assert_null(q3_tok_piece(tok, 151669));
	b = q3_tok_bytes(tok, 220, &len);
	assert_int_equal(len, 1);
	assert_int_equal(b[0], ' ');
	b = q3_tok_bytes(tok, 198, &len);
	assert_int_equal(len, 1);
	assert_int_equal(b[0], '\n');
	assert_true(q3_tok_is_special(tok, 151645));
	assert_false(q3_tok_is_special(tok, 151657)); /* <tool_call> is added, not special */
	assert_false(q3_tok_is_special(tok, 9707));
	assert_false(q3_tok_is_special(tok, 999999));
}

static void test_decode_errors(void **state)
{
	int32_t bad[] = { 9707, 151669 }, neg[] = { -5 }, ff[2];
	char *s;
	size_t len;
	q3_err e;

	assert_int_equal(q3_tok_decode(tok, bad, 2, &s, &len, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "151669 (item 1)"));
	assert_int_equal(q3_tok_decode(tok, neg, 1, &s, &len, &e), -EINVAL);
	/* byte tokens that are not UTF-8 decode to U+FFFD, as errors="replace" does */
	ff[0] = q3_tok_id(tok, "\xc3\xbf");           /* byte 0xff */
	ff[1] = q3_tok_id(tok, "a");
	assert_int_equal(q3_tok_decode(tok, ff, 2, &s, &len, &e), 0);
	assert_string_equal(s, "\xef\xbf\xbd" "a");
	free(s);
	assert_int_equal(q3_tok_decode(tok, NULL, 0, &s, &len, &e), 0);
	assert_int_equal(len, 0);
	assert_string_equal(s, "");
	free(s);
}

/* ---- invalid and unusual input --------------------------------------------------------- */

static void test_invalid_utf8(void **state)
{
	static const struct {
		const char *s;
		size_t at;
	} cases[] = {
		{ "\xff", 0 }, { "ab\xc3", 2 }, { "ok \xed\xa0\x80", 3 }, { "\xc0\xaf", 0 },
		{ "x\xf4\x90\x80\x80", 1 }, { "\xe2\x82(", 0 }, { "abc\x80", 3 },
	};
	int32_t *ids;
	size_t n;
	q3_err e;

	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		char want[64];
		assert_int_equal(q3_tok_encode(tok, cases[i].s, strlen(cases[i].s), &ids, &n, &e), -EINVAL);
		snprintf(want, sizeof(want), "(byte %zu)", cases[i].at);
		assert_non_null(strstr(e.msg, want));
		assert_null(ids);
	}
	/* NUL bytes are ordinary text */
	assert_int_equal(q3_tok_encode(tok, "a\0b", 3, &ids, &n, &e), 0);
	assert_int_equal(n, 3);
	free(ids);
	/* empty text */
	assert_int_equal(q3_tok_encode(tok, "", 0, &ids, &n, &e), 0);
	assert_int_equal(n, 0);
	assert_non_null(ids);
	free(ids);
}

/* Hugging Face's regexes run on Oniguruma, whose \s lacks U+180E (PCRE2's has it): with
 * Oniguruma's meaning "x\u180e\u180ey" splits as x | \u180e\u180e | y. */
static void test_onig_space(void **state)
{
	static const char *const parts[] = { "x", "\xe1\xa0\x8e\xe1\xa0\x8e", "y" };
	int32_t want[32];
	size_t nw = 0, n;

	for (size_t i = 0; i < 3; i++) {
		int32_t *ids = encode(tok, parts[i], strlen(parts[i]), &n);
		memcpy(want + nw, ids, n * sizeof(*ids));
		nw += n;
		free(ids);
	}
	int32_t *got = encode(tok, "x\xe1\xa0\x8e\xe1\xa0\x8ey", 8, &n);
	assert_ids(got, n, want, nw, "U+180E", 0);
	free(got);
}

/* An LV syllable and U+11A7 (TIndex 0, not a trailing consonant) do not compose: Hugging Face
 * keeps both (checked against tokenizers 0.23: 가ᆧ -> 19969 124137 100), where utf8proc's own
 * NFC wrongly drops U+11A7. */
static void test_hangul_tindex0(void **state)
{
	static const char s[] = "\xea\xb0\x80\xe1\x86\xa7";
	int32_t want[] = { 19969, 124137, 100 };
	size_t n, dlen;
	char *d;
	q3_err e;
	int32_t *ids = encode(tok, s, strlen(s), &n);

	assert_ids(ids, n, want, 3, "U+AC00 U+11A7", 0);
	assert_int_equal(q3_tok_decode(tok, ids, n, &d, &dlen, &e), 0);
	assert_string_equal(d, s);
	free(d);
	free(ids);
}

/* Long runs (BPE of a 100k-byte word, 200k spaces, 6000 combining marks) finish and round-trip. */
static void test_long_runs(void **state)
{
	size_t len = 200000, n, dlen;
	char *s = malloc(len + 1), *d;
	q3_err e;

	for (int kind = 0; kind < 3; kind++) {
		size_t sl;
		if (kind == 0) {
			for (size_t i = 0; i < 100000; i++)
				s[i] = "abcdefgh"[(i * 7) % 8];
			sl = 100000;
		} else if (kind == 1) {
			memset(s, ' ', len);
			sl = len;
		} else { /* 'e' then alternating U+0323 (ccc 220) and U+0301 (ccc 230) */
			s[0] = 'e';
			sl = 1;
			for (int i = 0; i < 6000; i++, sl += 2)
				memcpy(s + sl, i & 1 ? "\xcc\x81" : "\xcc\xa3", 2);
		}
		int32_t *ids = encode(tok, s, sl, &n);
		assert_int_equal(q3_tok_decode(tok, ids, n, &d, &dlen, &e), 0);
		utf8proc_uint8_t *nfc = NULL;
		utf8proc_ssize_t nl = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)sl, &nfc,
						   UTF8PROC_STABLE | UTF8PROC_COMPOSE);
		if (kind < 2) {
			assert_int_equal(dlen, sl);
			assert_memory_equal(d, s, sl);
		} else {
			/* NFC sorts the marks (U+0323 first) and composes e + U+0323 */
			assert_true(nl > 0);
			assert_int_equal(dlen, (size_t)nl);
			assert_memory_equal(d, nfc, dlen);
			assert_memory_equal(d, "\xe1\xba\xb9\xcc\xa3", 5);
		}
		free(nfc);
		free(d);
		free(ids);
	}
	free(s);
}

/* decode(encode(s)) == NFC(s), with utf8proc's NFC as the oracle, on random text drawn from
 * characters that compose, reorder or decompose. */
static void test_nfc_random(void **state)
{
	static const int32_t pool[] = {
		'a', 'e', 'o', 'A', ' ', '\n', 0x0300, 0x0301, 0x0308, 0x0323, 0x0327, 0x0345, 0x05B0, 0x0BC6,
		0x0BBE, 0x0BD7, 0x1100, 0x1161, 0x11A8, 0xAC00, 0x2126, 0x212B, 0x0344, 0x0958, 0xF900, 0x1E9B,
		0x00C5, 0x00E9, 0x1EC7, 0x0F73, 0x3099, 0x304B, 0x1D15E, 0x1D165, 0x2F800, 0x0CC6, 0x0CD5, 0x0CC2,
		0x09C7, 0x09BE, 0x4E2D, 0x1F600, 0x200D, 0x180E, 0x3000, 0x00A0,
	};
	uint64_t rng = 12345;
	char s[1024];
	q3_err e;

	for (int iter = 0; iter < 3000; iter++) {
		size_t sl = 0, n, dlen;
		rng = rng * 6364136223846793005ull + 1442695040888963407ull;
		int count = 1 + (int)((rng >> 33) % 40);
		for (int k = 0; k < count; k++) {
			rng = rng * 6364136223846793005ull + 1442695040888963407ull;
			sl += (size_t)q3_utf8_put(s + sl, pool[(rng >> 33) % Q3_ARRAY_SIZE(pool)]);
		}
		int32_t *ids = encode(tok, s, sl, &n);
		char *d;
		assert_int_equal(q3_tok_decode(tok, ids, n, &d, &dlen, &e), 0);
		utf8proc_uint8_t *nfc = NULL;
		utf8proc_ssize_t nl = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)sl, &nfc,
						   UTF8PROC_STABLE | UTF8PROC_COMPOSE);
		assert_true(nl >= 0);
		if (dlen != (size_t)nl || memcmp(d, nfc, dlen))
			fail_msg("NFC differs on iteration %d (%zu bytes in)", iter, sl);
		free(nfc);
		free(d);
		free(ids);
	}
}

/* ---- streaming decoder ----------------------------------------------------------------- */

static const char *const MULTIBYTE[] = {
	"héllo wörld", "北京是中国的首都。", "emoji: 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ✅", "Привет, мир!",
	"مرحبا بالعالم", "नमस्ते दुनिया", "a\xf4\x8f\xbf\xbfz", "mixed 中文 and English 123 😀",
};

/* Pushes every byte as its own token, so every character is split at every inner point: each
 * chunk must be whole characters, and after k bytes the text out must be exactly the characters
 * complete in those k bytes. */
static void test_stream_split_points(void **state)
{
	struct q3_tok_stream st;
	q3_err e;

	assert_int_equal(q3_tok_stream_init(&st, tok, 0, &e), 0);
	for (size_t c = 0; c < Q3_ARRAY_SIZE(MULTIBYTE); c++) {
		const char *s = MULTIBYTE[c];
		size_t n = strlen(s), outlen = 0;
		char out[256];
		for (size_t k = 0; k < n; k++) {
			const char *text;
			size_t len;
			int32_t id = byte_tok[(uint8_t)s[k]];
			assert_int_equal(q3_tok_stream_push(&st, id, &text, &len, &e), 0);
			assert_int_equal(q3_utf8_check(text, len), len);
			memcpy(out + outlen, text, len);
			outlen += len;
			size_t complete = k + 1; /* back off to the last character boundary */
			while (complete < n && (((const uint8_t *)s)[complete] & 0xC0) == 0x80)
				complete--;
			assert_int_equal(outlen, complete);
			assert_memory_equal(out, s, outlen);
		}
		const char *text;
		size_t len;
		q3_tok_stream_flush(&st, &text, &len);
		assert_int_equal(len, 0);
	}
	q3_tok_stream_free(&st);
}

/* The same texts tokenized for real (emoji split across tokens), and ill-formed byte runs
 * against what Python's bytes.decode("utf-8", "replace") gives. */
static void stream_all(const int32_t *ids, size_t n, unsigned flags, char *out, size_t *outlen)
{
	struct q3_tok_stream st;
	const char *text;
	size_t len;
	q3_err e;

	*outlen = 0;
	assert_int_equal(q3_tok_stream_init(&st, tok, flags, &e), 0);
	for (size_t i = 0; i < n; i++) {
		assert_int_equal(q3_tok_stream_push(&st, ids[i], &text, &len, &e), 0);
		assert_int_equal(q3_utf8_check(text, len), len);
		memcpy(out + *outlen, text, len);
		*outlen += len;
	}
	q3_tok_stream_flush(&st, &text, &len);
	memcpy(out + *outlen, text, len);
	*outlen += len;
	q3_tok_stream_free(&st);
}

static void test_stream_real_and_invalid(void **state)
{
	static const struct {
		const char *in, *py;
	} bad[] = {
		{ "\xff", "\xef\xbf\xbd" },
		{ "\x80", "\xef\xbf\xbd" },
		{ "a\x80" "b", "a\xef\xbf\xbd" "b" },
		{ "\xc3", "\xef\xbf\xbd" },
		{ "\xc3(", "\xef\xbf\xbd(" },
		{ "\xe2\x82", "\xef\xbf\xbd" },
		{ "\xe2\x82(", "\xef\xbf\xbd(" },
		{ "\xf0\x9f\x98", "\xef\xbf\xbd" },
		{ "\xf0\x9f\x98" "a", "\xef\xbf\xbd" "a" },
		{ "\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" },
		{ "\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd" },
		{ "\xe0\x80\xaf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" },
		{ "\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" },
		{ "\xf5\x80", "\xef\xbf\xbd\xef\xbf\xbd" },
		{ "\xf0\x80\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" },
		{ "\xe0\xa0", "\xef\xbf\xbd" },
		{ "\xf0\x9f\x98\x80\x80", "\xf0\x9f\x98\x80\xef\xbf\xbd" },
		{ "\xc2\xc2\xa9", "\xef\xbf\xbd\xc2\xa9" },
		{ "\xfe\xfe\xff", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" },
	};
	char out[1024], *d;
	size_t outlen, n, dlen;
	q3_err e;

	for (size_t c = 0; c < Q3_ARRAY_SIZE(MULTIBYTE); c++) {
		int32_t *ids = encode(tok, MULTIBYTE[c], strlen(MULTIBYTE[c]), &n);
		stream_all(ids, n, 0, out, &outlen);
		assert_int_equal(outlen, strlen(MULTIBYTE[c]));
		assert_memory_equal(out, MULTIBYTE[c], outlen);
		free(ids);
	}
	for (size_t c = 0; c < Q3_ARRAY_SIZE(bad); c++) {
		int32_t ids[16];
		size_t nb = strlen(bad[c].in);
		for (size_t k = 0; k < nb; k++)
			ids[k] = byte_tok[(uint8_t)bad[c].in[k]];
		stream_all(ids, nb, 0, out, &outlen);
		assert_int_equal(outlen, strlen(bad[c].py));
		assert_memory_equal(out, bad[c].py, outlen);
		assert_int_equal(q3_tok_decode(tok, ids, nb, &d, &dlen, &e), 0);
		assert_int_equal(dlen, outlen);
		assert_memory_equal(d, out, dlen);
		free(d);
	}
}

static void test_stream_special(void **state)
{
	const char *text = "<|im_start|>assistant\nhi <tool_call>x</tool_call><|im_end|>";
	char out[256];
	size_t n, outlen;
	int32_t *ids = encode(tok, text, strlen(text), &n);
	struct q3_tok_stream st;
	const char *t;
	size_t len;
	q3_err e;

	stream_all(ids, n, 0, out, &outlen);
	assert_int_equal(outlen, strlen(text));
	assert_memory_equal(out, text, outlen);
	stream_all(ids, n, Q3_TOK_SKIP_SPECIAL, out, &outlen);
	out[outlen] = 0;
	assert_string_equal(out, "assistant\nhi <tool_call>x</tool_call>");
	free(ids);
	assert_int_equal(q3_tok_stream_init(&st, tok, 0, &e), 0);
	assert_int_equal(q3_tok_stream_push(&st, 151669, &t, &len, &e), -EINVAL);
	assert_int_equal(len, 0);
	assert_int_equal(q3_tok_stream_push(&st, 9707, &t, &len, &e), 0);
	assert_int_equal(len, 5);
	q3_tok_stream_free(&st);
}

/* ---- threads --------------------------------------------------------------------------- */

struct job {
	struct q3_tok *t;
	json_t *texts, *ids;
	int start, bad;
};

static void *encode_all(void *arg)
{
	struct job *j = arg;
	size_t count = json_array_size(j->texts);
	for (size_t k = 0; k < count; k++) {
		size_t i = (k + (size_t)j->start * 97) % count, n, nw;
		json_t *tx = json_array_get(j->texts, i);
		int32_t *ids;
		q3_err e;
		if (q3_tok_encode(j->t, json_string_value(tx), json_string_length(tx), &ids, &n, &e)) {
			j->bad++;
			continue;
		}
		int32_t *want = json_ids(json_array_get(j->ids, i), &nw);
		j->bad += n != nw || memcmp(ids, want, n * sizeof(*ids));
		free(ids);
		free(want);
	}
	return NULL;
}

static void collect(json_t *rec, int line, void *ctx)
{
	json_t **arrs = ctx;
	json_array_append(arrs[0], json_object_get(rec, "text"));
	json_array_append(arrs[1], json_object_get(rec, "ids"));
}

static void test_threads(void **state)
{
	json_t *arrs[2] = { json_array(), json_array() };
	struct job jobs[4];
	pthread_t th[4];
	struct q3_tok *fresh; /* nothing learnt yet: the threads fill its lazy state together */
	q3_err e;

	for_each_jsonl("encode.jsonl", collect, arrs);
	assert_int_equal(q3_tok_load(TOK_FIXTURES, &fresh, &e), 0);
	for (int i = 0; i < 4; i++) {
		jobs[i] = (struct job){ fresh, arrs[0], arrs[1], i, 0 };
		assert_int_equal(pthread_create(&th[i], NULL, encode_all, &jobs[i]), 0);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		assert_int_equal(jobs[i].bad, 0);
	}
	q3_tok_free(fresh);
	json_decref(arrs[0]);
	json_decref(arrs[1]);
}

/* ---- loader errors --------------------------------------------------------------------- */

static void expect_load_error(const char *json, const char *want)
{
	char dir[] = "/tmp/q3tokXXXXXX";
	struct q3_tok *t;
	q3_err e;

	assert_non_null(mkdtemp(dir));
	write_str(dir, "tokenizer.json", json);
	int rc = q3_tok_load(dir, &t, &e);
	remove_dir(dir);
	if (rc == 0)
		fail_msg("loaded, expected an error with \"%s\"", want);
	if (!strstr(e.msg, want))
		fail_msg("error \"%s\" lacks \"%s\"", e.msg, want);
	assert_null(t);
}

/* Many added tokens over a small vocabulary (the byte-level alphabet only): loading used to spin
 * forever once they outgrew the lookup table sized for the vocabulary.  Each still resolves, and
 * encoding finds one in running text. */
static void test_many_added_tokens(void **state)
{
	char dir[] = "/tmp/q3tokXXXXXX", *buf, name[32];
	size_t len;
	json_error_t je;
	q3_err e;
	struct q3_tok *t2;
	const char *key;
	json_t *v;
	int32_t nv = 0;
	enum { EXTRA = 20000 };

	assert_non_null(mkdtemp(dir));
	assert_int_equal(q3_read_file(TOK_FIXTURES "/tokenizer.json", 64u << 20, &buf, &len, &e), 0);
	json_t *root = json_loadb(buf, len, 0, &je), *model, *vocab = json_object(), *added = json_array();
	free(buf);
	assert_non_null(root);
	model = json_object_get(root, "model");
	/* the byte-level alphabet: the 256 tokens of one code point */
	json_object_foreach(json_object_get(model, "vocab"), key, v)
		if (key[0] && q3_utf8_next((const uint8_t *)key, strlen(key), &(int32_t){ 0 }) == (int)strlen(key))
			json_object_set_new(vocab, key, json_integer(nv++));
	assert_int_equal(nv, 256);
	json_object_set_new(model, "vocab", vocab);
	json_object_set_new(model, "merges", json_array());
	for (int i = 0; i < EXTRA; i++) {
		snprintf(name, sizeof(name), "<extra_%d>", i);
		json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", nv + i, "content",
						       name, "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized",
						       0, "special", 1));
	}
	json_object_set_new(root, "added_tokens", added);
	buf = json_dumps(root, JSON_COMPACT);
	json_decref(root);
	write_file(dir, "tokenizer.json", buf, strlen(buf));
	free(buf);
	if (q3_tok_load(dir, &t2, &e))
		fail_msg("%s", e.msg);
	assert_int_equal(q3_tok_vocab_size(t2), nv + EXTRA);
	for (int i = 0; i < EXTRA; i += 997) {
		snprintf(name, sizeof(name), "<extra_%d>", i);
		assert_int_equal(q3_tok_id(t2, name), nv + i);
	}
	size_t n;
	int32_t *ids = encode(t2, "ab<extra_19999>c", 16, &n);
	assert_int_equal(n, 4); /* a, b, the added token, c: no merges */
	assert_int_equal(ids[2], nv + 19999);
	free(ids);
	q3_tok_free(t2);
	remove_dir(dir);
}

static void test_load_errors(void **state)
{
	struct q3_tok *t;
	q3_err e;

	assert_int_equal(q3_tok_load("/nonexistent/dir", &t, &e), -ENOENT);
	assert_non_null(strstr(e.msg, "no tokenizer.json, nor vocab.json + merges.txt"));
	expect_load_error("{\"model\": ", "line 1");
	expect_load_error("[]", "expected a JSON object");
	expect_load_error("{\"model\": {\"type\": \"WordPiece\"}}", "only BPE");
	expect_load_error("{\"model\": {\"type\": \"BPE\", \"byte_fallback\": true}}", "byte_fallback");
	expect_load_error("{\"model\": {\"type\": \"BPE\"}, \"normalizer\": {\"type\": \"NFKC\"}}", "only NFC");
	expect_load_error("{\"model\": {\"type\": \"BPE\"}, \"pre_tokenizer\": {\"type\": \"Whitespace\"}}",
			  "pre_tokenizer");
	expect_load_error("{\"model\": {}, \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"use_regex\": true}, "
			  "\"decoder\": {\"type\": \"ByteLevel\"}}", "model.vocab");
	expect_load_error("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 0}}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}, "
			  "\"decoder\": {\"type\": \"ByteLevel\"}}", "id 0 is given to both");
	expect_load_error("{\"model\": {\"vocab\": {\"a\": 0}}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}, "
			  "\"decoder\": {\"type\": \"ByteLevel\"}}", "lacks the byte-level token");
	expect_load_error("{\"model\": {\"vocab\": {\"a\": 99999999}}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}, "
			  "\"decoder\": {\"type\": \"ByteLevel\"}}", "expected an id in");
	expect_load_error("{\"model\": {}, \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": "
			  "[{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(unclosed\"}, \"behavior\": \"Isolated\"}, "
			  "{\"type\": \"ByteLevel\", \"use_regex\": false}]}}", "split regex at offset");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_encode_vectors),
		cmocka_unit_test(test_llamacpp),
		cmocka_unit_test(test_lookups),
		cmocka_unit_test(test_decode_errors),
		cmocka_unit_test(test_invalid_utf8),
		cmocka_unit_test(test_onig_space),
		cmocka_unit_test(test_hangul_tindex0),
		cmocka_unit_test(test_long_runs),
		cmocka_unit_test(test_nfc_random),
		cmocka_unit_test(test_stream_split_points),
		cmocka_unit_test(test_stream_real_and_invalid),
		cmocka_unit_test(test_stream_special),
		cmocka_unit_test(test_vocab_merges_path),
		cmocka_unit_test(test_threads),
		cmocka_unit_test(test_many_added_tokens),
		cmocka_unit_test(test_load_errors),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
