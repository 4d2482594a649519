/* stopstr.c - stop strings over streamed text, with hold-back across pieces (see stopstr.h). */
#include "stopstr.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

int q3_stopstr_init(struct q3_stopstr *s)
{
	memset(s, 0, sizeof(*s));
	s->cap = 1024;
	s->hold = malloc(s->cap);
	return s->hold ? 0 : -ENOMEM;
}

void q3_stopstr_free(struct q3_stopstr *s)
{
	free(s->hold);
	memset(s, 0, sizeof(*s));
}

void q3_stopstr_reset(struct q3_stopstr *s, char *const *stop, int n)
{
	s->stop = stop;
	s->n = n;
	s->start = s->len = 0;
}

bool q3_stopstr_feed(struct q3_stopstr *s, const char *text, size_t n, bool final, const char **out,
		     size_t *nout)
{
	if (s->n == 0) {
		*out = text;
		*nout = n;
		return false;
	}
	/* compact: what the last call returned has been used */
	memmove(s->hold, s->hold + s->start, s->len - s->start);
	s->len -= s->start;
	s->start = 0;
	if (s->len + n > s->cap) {
		size_t cap = Q3_MAX(s->cap * 2, s->len + n);
		char *h = realloc(s->hold, cap);
		if (!h) { /* emit the held text now and the piece next time round */
			*out = s->hold;
			*nout = s->len;
			s->start = s->len;
			return false;
		}
		s->hold = h;
		s->cap = cap;
	}
	memcpy(s->hold + s->len, text, n);
	s->len += n;

	size_t cut = s->len; /* the earliest match */
	for (int i = 0; i < s->n; i++) {
		const char *p = memmem(s->hold, s->len, s->stop[i], strlen(s->stop[i]));
		if (p && (size_t)(p - s->hold) < cut)
			cut = (size_t)(p - s->hold);
	}
	*out = s->hold;
	if (cut < s->len) {
		*nout = cut;
		s->start = s->len; /* the rest is dropped */
		return true;
	}
	size_t keep = 0; /* the longest tail that begins a stop string */
	for (int i = 0; i < s->n && !final; i++) {
		size_t ls = strlen(s->stop[i]);
		for (size_t k = Q3_MIN(ls - 1, s->len); k > keep; k--)
			if (!memcmp(s->hold + s->len - k, s->stop[i], k)) {
				keep = k;
				break;
			}
	}
	*nout = s->len - keep;
	s->start = s->len - keep;
	return false;
}
