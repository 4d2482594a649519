/* strbuf.h - a growable byte buffer for building text (prompts, JSON, decoded tokens), and
 * growing arrays.
 *
 * The buffer is always NUL-terminated (the NUL is not counted in len).  Appends return 0 or
 * -ENOMEM; after a failed append the buffer keeps its old contents.  q3_sb_take() hands the
 * malloc'ed string to the caller and leaves the buffer empty.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

struct q3_sb {
	char *buf;
	size_t len, cap;
};

#define Q3_SB_INIT { 0 }

int q3_sb_reserve(struct q3_sb *sb, size_t extra);
int q3_sb_add(struct q3_sb *sb, const void *data, size_t n);
int q3_sb_adds(struct q3_sb *sb, const char *s);
int q3_sb_addc(struct q3_sb *sb, char c);
int q3_sb_addf(struct q3_sb *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Returns the malloc'ed NUL-terminated contents (an empty string if nothing was added, or NULL
 * if even that cannot be allocated) and resets sb. */
char *q3_sb_take(struct q3_sb *sb, size_t *len);
void q3_sb_free(struct q3_sb *sb);

/* Grows the malloc'ed array *p of *cap elements of elem bytes to hold at least need elements
 * (capacity doubles); 0 or -ENOMEM (*p unchanged). */
int q3_grow(void **p, size_t *cap, size_t need, size_t elem);
