// SPDX-License-Identifier: GPL-2.0
/*
 * pool.c - the pool of pinned 2 MiB pages, one list per NUMA node.
 *
 * A chunk is an order-9 __GFP_COMP page allocated on its node only, zeroed.
 * The pool owns the chunk's first reference, so a chunk nobody else uses has
 * a page count of exactly 1.  Free chunks and held ones (given back by a
 * buffer while someone, such as an io_uring registration or a CUDA host
 * registration, still pins them) are linked through the head page's lru.
 * Held chunks are looked at again on every pool operation and once a second
 * until none is left; a chunk is zeroed before it rejoins the free list, so
 * no user ever sees another user's data.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/gfp.h>
#include <linux/highmem.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/mutex.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/topology.h>
#include <linux/workqueue.h>

#include "qwen3mm.h"

#define Q3MM_GFP	(GFP_KERNEL | __GFP_COMP | __GFP_ZERO | __GFP_THISNODE | \
			 __GFP_NOWARN | __GFP_RETRY_MAYFAIL)

struct q3mm_node {
	struct list_head free_list;
	struct list_head held_list;
	struct q3mm_stats st;
};

/* [nr_node_ids]; NULL for nodes that had no memory at load */
static struct q3mm_node **q3mm_nodes;
/* the lists and every counter */
static DEFINE_MUTEX(q3mm_pool_lock);
/* one resize at a time: only resizes change totals */
static DEFINE_MUTEX(q3mm_resize_lock);
/* whole-pool counters the per-node ones cannot give */
static unsigned long q3mm_used_all;
static unsigned long q3mm_peak_all;
static unsigned long q3mm_failures_all;

static void q3mm_reclaim_fn(struct work_struct *work);
static DECLARE_DELAYED_WORK(q3mm_reclaim_work, q3mm_reclaim_fn);

static struct q3mm_node *q3mm_node_of(int nid)
{
	if (nid < 0 || nid >= nr_node_ids)
		return NULL;
	return q3mm_nodes[nid];
}

bool q3mm_pool_has_node(int nid)
{
	return q3mm_node_of(nid) != NULL;
}

static bool q3mm_chunk_idle(struct page *head)
{
	return page_count(head) == 1;
}

static void q3mm_chunk_zero(struct page *head)
{
	unsigned long i;

	for (i = 0; i < Q3MM_CHUNK_PAGES; i++)
		clear_highpage(nth_page(head, i));
}

/* Drops the pool's reference: a chunk someone still pins is freed by the last unpin. */
static void q3mm_chunks_put(struct list_head *list)
{
	struct page *page, *tmp;

	list_for_each_entry_safe(page, tmp, list, lru) {
		list_del(&page->lru);
		put_page(page);
		cond_resched();
	}
}

/* Moves held chunks nobody references any more to the free list; returns true if some stay held. */
static bool q3mm_reclaim_held(void)
{
	struct page *page, *tmp;
	bool left = false;
	int nid;

	lockdep_assert_held(&q3mm_pool_lock);
	for (nid = 0; nid < nr_node_ids; nid++) {
		struct q3mm_node *n = q3mm_nodes[nid];

		if (!n)
			continue;
		list_for_each_entry_safe(page, tmp, &n->held_list, lru) {
			if (!q3mm_chunk_idle(page)) {
				left = true;
				continue;
			}
			q3mm_chunk_zero(page);
			list_move_tail(&page->lru, &n->free_list);
			n->st.held--;
			n->st.free++;
			/* a process that pinned gigabytes can release them all at once */
			cond_resched();
		}
	}
	return left;
}

static void q3mm_reclaim_fn(struct work_struct *work)
{
	bool left;

	mutex_lock(&q3mm_pool_lock);
	left = q3mm_reclaim_held();
	mutex_unlock(&q3mm_pool_lock);
	if (left)
		schedule_delayed_work(&q3mm_reclaim_work, HZ);
}

int q3mm_pool_init(void)
{
	int nid;

	q3mm_nodes = kcalloc(nr_node_ids, sizeof(*q3mm_nodes), GFP_KERNEL);
	if (!q3mm_nodes)
		return -ENOMEM;
	for_each_node_state(nid, N_MEMORY) {
		struct q3mm_node *n = kzalloc_node(sizeof(*n), GFP_KERNEL, nid);

		if (!n) {
			q3mm_pool_exit();
			return -ENOMEM;
		}
		INIT_LIST_HEAD(&n->free_list);
		INIT_LIST_HEAD(&n->held_list);
		q3mm_nodes[nid] = n;
	}
	return 0;
}

/* Called when no buffer is left (the device's files are all closed). */
void q3mm_pool_exit(void)
{
	int nid;

	cancel_delayed_work_sync(&q3mm_reclaim_work);
	for (nid = 0; nid < nr_node_ids; nid++) {
		struct q3mm_node *n = q3mm_nodes[nid];

		if (!n)
			continue;
		if (n->st.held)
			pr_info("node %d: %lu chunks still pinned by others, freed when they unpin\n",
				nid, n->st.held);
		q3mm_chunks_put(&n->free_list);
		q3mm_chunks_put(&n->held_list);
		kfree(n);
	}
	kfree(q3mm_nodes);
	q3mm_nodes = NULL;
}

/* Allocates nr zeroed chunks on nid into list; on failure the list holds what was got. */
static int q3mm_chunks_alloc(int nid, unsigned long nr, struct list_head *list)
{
	unsigned long i;

	for (i = 0; i < nr; i++) {
		struct page *page;

		if (fatal_signal_pending(current))
			return -EINTR;
		page = alloc_pages_node(nid, Q3MM_GFP, Q3MM_CHUNK_ORDER);
		if (!page)
			return -ENOMEM;
		list_add_tail(&page->lru, list);
		cond_resched();
	}
	return 0;
}

static int q3mm_pool_shrink(struct q3mm_node *n, unsigned long drop, struct list_head *out)
{
	unsigned long i;

	if (drop > n->st.free)
		return -EBUSY;
	for (i = 0; i < drop; i++)
		list_move(n->free_list.next, out);
	n->st.free -= drop;
	n->st.total -= drop;
	return 0;
}

/*
 * Sets node nid's pool to nr_chunks: grows it with new zeroed chunks, or
 * shrinks it by freeing free chunks.  Nothing changes on error: -EINVAL for a
 * node without memory or more than it has, -EBUSY if shrinking would take
 * chunks in use, -ENOMEM if the pages cannot be had, -EINTR if killed.
 */
int q3mm_pool_resize(int nid, unsigned long nr_chunks)
{
	struct q3mm_node *n = q3mm_node_of(nid);
	unsigned long have;
	LIST_HEAD(list);
	int ret = 0;

	if (!n || nr_chunks > (node_present_pages(nid) >> Q3MM_CHUNK_ORDER))
		return -EINVAL;
	mutex_lock(&q3mm_resize_lock);
	mutex_lock(&q3mm_pool_lock);
	q3mm_reclaim_held();
	have = n->st.total;
	if (nr_chunks < have)
		ret = q3mm_pool_shrink(n, have - nr_chunks, &list);
	mutex_unlock(&q3mm_pool_lock);

	if (nr_chunks > have) {
		/* allocating may take seconds: do it without blocking buffer users */
		ret = q3mm_chunks_alloc(nid, nr_chunks - have, &list);
		mutex_lock(&q3mm_pool_lock);
		if (ret) {
			n->st.failures++;
			q3mm_failures_all++;
		} else {
			list_splice_tail_init(&list, &n->free_list);
			n->st.total += nr_chunks - have;
			n->st.free += nr_chunks - have;
		}
		mutex_unlock(&q3mm_pool_lock);
	}
	mutex_unlock(&q3mm_resize_lock);
	q3mm_chunks_put(&list);
	return ret;
}

/* The node with room for nr chunks nearest to nid (nid itself first), or -1. */
static int q3mm_pick_node(int nid, bool exact, unsigned long nr)
{
	int best = -1;
	int k;

	for (k = 0; k < nr_node_ids; k++) {
		struct q3mm_node *n = q3mm_nodes[k];

		if (!n || n->st.free < nr || (exact && k != nid))
			continue;
		if (best < 0 || node_distance(nid, k) < node_distance(nid, best))
			best = k;
	}
	return best;
}

/*
 * Takes nr chunks, all from one node: nid if it has room, else (unless
 * exact) the nearest node that has.  NUMA_NO_NODE means the caller's node.
 * Returns the node used, or -ENOMEM.
 */
int q3mm_pool_take(int nid, bool exact, unsigned long nr, struct page **chunks)
{
	struct q3mm_node *n;
	unsigned long i;
	int got;

	if (nid == NUMA_NO_NODE)
		nid = numa_node_id();
	mutex_lock(&q3mm_pool_lock);
	q3mm_reclaim_held();
	got = q3mm_pick_node(nid, exact, nr);
	if (got < 0) {
		n = q3mm_node_of(nid);
		if (n)
			n->st.failures++;
		q3mm_failures_all++;
		mutex_unlock(&q3mm_pool_lock);
		return -ENOMEM;
	}
	n = q3mm_nodes[got];
	for (i = 0; i < nr; i++) {
		chunks[i] = list_first_entry(&n->free_list, struct page, lru);
		list_del(&chunks[i]->lru);
	}
	n->st.free -= nr;
	n->st.used += nr;
	n->st.peak = max(n->st.peak, n->st.used);
	q3mm_used_all += nr;
	q3mm_peak_all = max(q3mm_peak_all, q3mm_used_all);
	mutex_unlock(&q3mm_pool_lock);
	return got;
}

/* Gives a buffer's chunks back: idle ones zeroed to the free list, pinned ones to the held list. */
void q3mm_pool_give(int nid, struct page **chunks, unsigned long nr)
{
	struct q3mm_node *n = q3mm_nodes[nid];
	unsigned long i, nr_idle = 0;
	LIST_HEAD(idle);
	LIST_HEAD(busy);

	for (i = 0; i < nr; i++) {
		if (q3mm_chunk_idle(chunks[i])) {
			q3mm_chunk_zero(chunks[i]);
			list_add_tail(&chunks[i]->lru, &idle);
			nr_idle++;
		} else {
			list_add_tail(&chunks[i]->lru, &busy);
		}
		cond_resched();
	}
	mutex_lock(&q3mm_pool_lock);
	list_splice_tail(&idle, &n->free_list);
	list_splice_tail(&busy, &n->held_list);
	n->st.free += nr_idle;
	n->st.held += nr - nr_idle;
	n->st.used -= nr;
	q3mm_used_all -= nr;
	mutex_unlock(&q3mm_pool_lock);
	if (nr_idle < nr)
		schedule_delayed_work(&q3mm_reclaim_work, HZ);
}

/* Counters of node nid, or of the whole pool for NUMA_NO_NODE. */
void q3mm_pool_stats(int nid, struct q3mm_stats *st)
{
	int k;

	memset(st, 0, sizeof(*st));
	mutex_lock(&q3mm_pool_lock);
	q3mm_reclaim_held();
	if (nid != NUMA_NO_NODE) {
		if (q3mm_node_of(nid))
			*st = q3mm_nodes[nid]->st;
		goto out_unlock;
	}
	for (k = 0; k < nr_node_ids; k++) {
		struct q3mm_node *n = q3mm_nodes[k];

		if (!n)
			continue;
		st->total += n->st.total;
		st->free += n->st.free;
		st->used += n->st.used;
		st->held += n->st.held;
	}
	st->peak = q3mm_peak_all;
	st->failures = q3mm_failures_all;
out_unlock:
	mutex_unlock(&q3mm_pool_lock);
}
