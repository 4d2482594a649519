/* strbuf.c - the growable byte buffer and arrays of strbuf.h. */
#include "strbuf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int q3_sb_reserve(struct q3_sb *sb, size_t extra)
{
	size_t need, cap;
	char *nb;

	if (extra > SIZE_MAX - 1 - sb->len)
		return -ENOMEM;
	need = sb->len + extra + 1;
	if (need <= sb->cap)
		return 0;
	cap = sb->cap ? sb->cap : 64;
	while (cap < need)
		cap = cap > SIZE_MAX / 2 ? need : cap * 2;
	nb = realloc(sb->buf, cap);
	if (!nb)
		return -ENOMEM;
	sb->buf = nb;
	sb->cap = cap;
	return 0;
}

int q3_sb_add(struct q3_sb *sb, const void *data, size_t n)
{
	if (q3_sb_reserve(sb, n))
		return -ENOMEM;
	if (n)
		memcpy(sb->buf + sb->len, data, n);
	sb->len += n;
	sb->buf[sb->len] = 0;
	return 0;
}

int q3_sb_adds(struct q3_sb *sb, const char *s)
{
	return q3_sb_add(sb, s, strlen(s));
}

int q3_sb_addc(struct q3_sb *sb, char c)
{
	return q3_sb_add(sb, &c, 1);
}

int q3_sb_addf(struct q3_sb *sb, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || q3_sb_reserve(sb, (size_t)n))
		return -ENOMEM;
	va_start(ap, fmt);
	vsnprintf(sb->buf + sb->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	sb->len += (size_t)n;
	return 0;
}

char *q3_sb_take(struct q3_sb *sb, size_t *len)
{
	char *s = sb->buf;

	if (!s)
		s = calloc(1, 1);
	if (len)
		*len = s ? sb->len : 0;
	sb->buf = NULL;
	sb->len = sb->cap = 0;
	return s;
}

void q3_sb_free(struct q3_sb *sb)
{
	free(sb->buf);
	sb->buf = NULL;
	sb->len = sb->cap = 0;
}

int q3_grow(void **p, size_t *cap, size_t need, size_t elem)
{
	if (need <= *cap)
		return 0;
	size_t c = *cap ? *cap : 64;
	while (c < need)
		c = c > SIZE_MAX / 2 ? need : c * 2;
	if (c > SIZE_MAX / elem)
		return -ENOMEM;
	void *np = realloc(*p, c * elem);
	if (!np)
		return -ENOMEM;
	*p = np;
	*cap = c;
	return 0;
}
