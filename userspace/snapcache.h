/* snapcache.h - saved model states keyed by the tokens they consumed: how a later request that
 * extends an earlier conversation skips re-reading it.
 *
 * Each entry pairs a token sequence with an opaque state (the server stores a struct q3_session
 * whose whole state, KV rows and recurrent/conv states, equals having fed exactly those tokens).
 * Whole states, not truncated caches: a Gated DeltaNet state cannot be rolled back, so a prompt
 * can only reuse an entry whose key is a prefix of it.
 *
 * The cache holds at most `cap` entries and evicts the least recently used.  It never allocates
 * or frees states itself: put() hands back the evicted entry's state for the caller to reuse.
 * Not thread-safe: the inference worker owns it.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

struct q3_snap {
	int32_t *ids; /* [n] the tokens the state has consumed */
	int n;
	void *state;
	uint64_t used; /* LRU clock of the last lookup hit or put */
};

struct q3_snapcache {
	struct q3_snap *e; /* [cap] */
	int cap, n;
	uint64_t clock;
	uint64_t hits, misses, hit_tokens; /* lookups that found an entry, that did not, and the
					      tokens the hits covered */
};

/* cap 0 gives a cache that stores nothing. */
int q3_snapcache_init(struct q3_snapcache *c, int cap, q3_err *e);
/* Frees the keys; calls free_state(ctx, state) for every entry that has a state. */
void q3_snapcache_free(struct q3_snapcache *c, void (*free_state)(void *ctx, void *state), void *ctx);

/* The entry with the longest key that is a prefix of ids[0..n) and at most max_len long (the
 * caller needs max_len < n to have a token left to compute logits from), or NULL.  A hit
 * refreshes the entry's LRU position and counts in hits/hit_tokens; NULL counts a miss. */
struct q3_snap *q3_snapcache_lookup(struct q3_snapcache *c, const int32_t *ids, int n, int max_len);

/* Makes room for the key ids[0..n): returns the entry to fill, with its key copied and
 * *recycled set to the state the caller must overwrite or free: an evicted entry's state, or
 * NULL when the entry is new.  If an entry with exactly this key exists, returns NULL and sets
 * *exists (its LRU position is refreshed; nothing to save).  NULL with !*exists: cap is 0 or
 * out of memory.  Once the caller has put its state in entry->state it is the cache's. */
struct q3_snap *q3_snapcache_put(struct q3_snapcache *c, const int32_t *ids, int n, void **recycled,
				 bool *exists);

/* Removes an entry (after a put whose state could not be saved); returns its state, if any. */
void *q3_snapcache_drop(struct q3_snapcache *c, struct q3_snap *s);
