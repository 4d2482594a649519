/* stopstr.h - stop strings over streamed text.
 *
 * Generated text arrives in pieces (one token's worth at a time); a stop string may span pieces.
 * Each feed returns the bytes that can no longer be part of a stop string; bytes that might still
 * begin one are held back until the next piece tells.  The first complete match ends the stream:
 * the text before it is returned, the rest dropped.  With whole UTF-8 characters in and stop
 * strings of valid UTF-8, the returned text is always whole characters too (a held-back tail
 * starts where a stop string starts, on a character boundary).
 *
 * Setup allocates; feed only grows the hold buffer when a piece is longer than any seen before.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>

struct q3_stopstr {
	char *const *stop; /* [n] NUL-terminated, non-empty; borrowed */
	int n;
	char *hold; /* hold[start, len): text not emitted yet */
	size_t start, len, cap;
};

int q3_stopstr_init(struct q3_stopstr *s);
void q3_stopstr_free(struct q3_stopstr *s);
/* Starts a new stream with these stop strings (borrowed until the next reset). */
void q3_stopstr_reset(struct q3_stopstr *s, char *const *stop, int n);
/* Feeds text[0..n).  *out, *nout: the bytes to emit now (valid until the next call).  final: the
 * stream ends after this piece, so nothing is held back.  Returns true when a stop string was
 * found: *out is the text before it and the stream is over.  -ENOMEM cannot happen to the
 * caller: if the hold buffer cannot grow, everything is emitted and nothing held. */
bool q3_stopstr_feed(struct q3_stopstr *s, const char *text, size_t n, bool final, const char **out,
		     size_t *nout);
