/* snapcache.c - saved model states keyed by their token prefix, LRU-evicted (see snapcache.h).
 * A linear scan: the cache holds tens of entries and each comparison stops at the first
 * differing token, which is cheap next to a prefill. */
#include "snapcache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int q3_snapcache_init(struct q3_snapcache *c, int cap, q3_err *e)
{
	memset(c, 0, sizeof(*c));
	if (cap < 0)
		return q3_errf(e, -EINVAL, "snapshot cache: %d entries", cap);
	if (cap && !(c->e = calloc(cap, sizeof(*c->e))))
		return q3_errf(e, -ENOMEM, "snapshot cache: out of memory for %d entries", cap);
	c->cap = cap;
	return 0;
}

void q3_snapcache_free(struct q3_snapcache *c, void (*free_state)(void *ctx, void *state), void *ctx)
{
	for (int i = 0; i < c->n; i++) {
		if (c->e[i].state && free_state)
			free_state(ctx, c->e[i].state);
		free(c->e[i].ids);
	}
	free(c->e);
	memset(c, 0, sizeof(*c));
}

static bool is_prefix(const int32_t *key, int nkey, const int32_t *ids, int n)
{
	return nkey <= n && !memcmp(key, ids, nkey * sizeof(*ids));
}

struct q3_snap *q3_snapcache_lookup(struct q3_snapcache *c, const int32_t *ids, int n, int max_len)
{
	struct q3_snap *best = NULL;

	for (int i = 0; i < c->n; i++) {
		struct q3_snap *s = &c->e[i];
		if (s->n > 0 && s->n <= max_len && (!best || s->n > best->n) &&
		    is_prefix(s->ids, s->n, ids, n))
			best = s;
	}
	if (!best) {
		c->misses++;
		return NULL;
	}
	best->used = ++c->clock;
	c->hits++;
	c->hit_tokens += best->n;
	return best;
}

struct q3_snap *q3_snapcache_put(struct q3_snapcache *c, const int32_t *ids, int n, void **recycled,
				 bool *exists)
{
	struct q3_snap *s = NULL;
	int32_t *key;

	*recycled = NULL;
	*exists = false;
	if (c->cap == 0 || n <= 0)
		return NULL;
	for (int i = 0; i < c->n; i++)
		if (c->e[i].n == n && is_prefix(c->e[i].ids, n, ids, n)) {
			c->e[i].used = ++c->clock;
			*exists = true;
			return NULL;
		}
	if (!(key = malloc(n * sizeof(*key))))
		return NULL;
	memcpy(key, ids, n * sizeof(*key));
	if (c->n < c->cap) {
		s = &c->e[c->n++];
		memset(s, 0, sizeof(*s));
	} else {
		s = &c->e[0];
		for (int i = 1; i < c->n; i++)
			if (c->e[i].used < s->used)
				s = &c->e[i];
		free(s->ids);
		*recycled = s->state;
		s->state = NULL;
	}
	s->ids = key;
	s->n = n;
	s->used = ++c->clock;
	return s;
}

void *q3_snapcache_drop(struct q3_snapcache *c, struct q3_snap *s)
{
	void *state = s->state;

	free(s->ids);
	*s = c->e[--c->n]; /* the last entry fills the hole */
	return state;
}
