/* tokenizer.h - the Qwen2/Qwen3 byte-level BPE tokenizer, byte-exact with Hugging Face
 * `tokenizers` (see docs: qwen3next.md section 8).
 *
 * Loads a model folder's tokenizer.json (+ tokenizer_config.json when present), or, when the
 * folder has no tokenizer.json, vocab.json + merges.txt + tokenizer_config.json (the Qwen2
 * pipeline is then implied).  Encoding, in Hugging Face's order:
 *   1. added tokens (tokenizer.json "added_tokens", tokenizer_config "added_tokens_decoder")
 *      are cut out first, leftmost-longest, whether "special" or not;
 *   2. NFC (utf8proc) on the text between them;
 *   3. the split regex of tokenizer.json (PCRE2 with JIT; Oniguruma's \s made exact);
 *   4. GPT-2 byte-level mapping and BPE by merge rank, exactly Hugging Face's merge order.
 * Nothing else is added: no BOS/EOS (a post_processor in tokenizer.json is ignored).
 *
 * Decoding concatenates the tokens' bytes and turns ill-formed UTF-8 into U+FFFD the way
 * Python's errors="replace" does.  The streaming decoder emits only whole characters.
 *
 * Input text must be well-formed UTF-8: anything else is refused with an error naming the
 * byte offset (Hugging Face takes Python/Rust strings, which cannot hold such bytes).
 *
 * A loaded tokenizer is immutable: any number of threads may encode and decode with it at
 * once.  Every function returns 0 or -errno and fills q3_err with one line on failure.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

struct q3_tok;

/* Loads the tokenizer of folder dir (see above). */
int q3_tok_load(const char *dir, struct q3_tok **out, q3_err *e);
void q3_tok_free(struct q3_tok *tok);

/* Encodes text[0..len) into a malloc'ed array *ids of *n ids (never NULL on success, even for
 * empty text; free() it).  -EINVAL for ill-formed UTF-8. */
int q3_tok_encode(const struct q3_tok *tok, const char *text, size_t len, int32_t **ids, size_t *n,
		  q3_err *e);

/* Decodes ids into a malloc'ed NUL-terminated string *text of *len bytes (free() it).
 * Special tokens are kept (skip_special_tokens=False).  -EINVAL for an id outside
 * [0, vocab size); ids inside the range that name no token decode to nothing, as in HF. */
int q3_tok_decode(const struct q3_tok *tok, const int32_t *ids, size_t n, char **text, size_t *len,
		  q3_err *e);

/* Highest id + 1 (151669 for Qwen3; the model's embedding table may be larger). */
int q3_tok_vocab_size(const struct q3_tok *tok);
/* The id of a token given as its vocabulary string ("<|im_end|>", "Ġhello"), or -1. */
int32_t q3_tok_id(const struct q3_tok *tok, const char *token_text);
/* The vocabulary string of id (byte-level form, e.g. "Ġhello"), or NULL for no such id. */
const char *q3_tok_piece(const struct q3_tok *tok, int32_t id);
/* The bytes id decodes to (not NUL-terminated, may be a partial UTF-8 character), or NULL. */
const uint8_t *q3_tok_bytes(const struct q3_tok *tok, int32_t id, size_t *len);
/* Whether id is an added token marked "special" (the ones skip_special_tokens drops). */
bool q3_tok_is_special(const struct q3_tok *tok, int32_t id);

/* Streaming decoder: feed generated ids one at a time, get the text that is safe to emit
 * (whole UTF-8 characters only; an ill-formed byte run becomes U+FFFD as soon as it is known
 * to be one).  The concatenation of every push and the final flush equals q3_tok_decode of
 * all the ids (minus special tokens with Q3_TOK_SKIP_SPECIAL).  init allocates, push and
 * flush never do; the returned text points into the stream and stays valid until the next
 * call.  One stream per generation, used by one thread. */
enum { Q3_TOK_SKIP_SPECIAL = 1 };

struct q3_tok_stream {
	const struct q3_tok *tok;
	unsigned flags;
	uint8_t pend[4]; /* the start of a character not complete yet */
	size_t npend;
	uint8_t *work;   /* pend + one token's bytes */
	char *out;       /* what push/flush return */
};

int q3_tok_stream_init(struct q3_tok_stream *s, const struct q3_tok *tok, unsigned flags, q3_err *e);
/* Feeds id; *text and *len get the bytes ready to emit (possibly none).  -EINVAL for an id
 * outside the vocabulary (nothing is emitted for it, the stream stays usable). */
int q3_tok_stream_push(struct q3_tok_stream *s, int32_t id, const char **text, size_t *len, q3_err *e);
/* End of generation: emits what is pending (an incomplete character becomes U+FFFD) and
 * resets the stream for reuse. */
void q3_tok_stream_flush(struct q3_tok_stream *s, const char **text, size_t *len);
void q3_tok_stream_free(struct q3_tok_stream *s);
