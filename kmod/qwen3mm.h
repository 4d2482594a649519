/* SPDX-License-Identifier: GPL-2.0 */
/*
 * qwen3mm.h - what the parts of the qwen3mm module share: the pool
 * (pool.c), buffers and their mappings (buffer.c), sysfs (sysfs.c) and the
 * device (main.c).  Kernel-version differences live here, nowhere else.
 */
#ifndef _QWEN3MM_H
#define _QWEN3MM_H

#include <linux/kref.h>
#include <linux/mm.h>
#include <linux/nodemask.h>
#include <linux/version.h>

#include "qwen3mm_uapi.h"

#define Q3MM_CHUNK_ORDER	(QWEN3MM_CHUNK_SHIFT - PAGE_SHIFT)
#define Q3MM_CHUNK_PAGES	(1UL << Q3MM_CHUNK_ORDER)
#define Q3MM_CHUNK_MB		(1UL << (QWEN3MM_CHUNK_SHIFT - 20))

/* MiB to whole chunks, rounded up, without overflow for any value */
static inline unsigned long q3mm_mb_to_chunks(unsigned long mb)
{
	return mb / Q3MM_CHUNK_MB + !!(mb % Q3MM_CHUNK_MB);
}

/* Counters of one node, or of the whole pool; units are chunks. */
struct q3mm_stats {
	unsigned long total;	/* chunks the pool owns: free + used + held */
	unsigned long free;	/* zeroed, ready to carve */
	unsigned long used;	/* in live buffers */
	unsigned long held;	/* out of buffers but still referenced elsewhere */
	unsigned long peak;	/* most chunks ever used at once */
	unsigned long failures;	/* allocations or pool growths that failed */
};

/* pool.c */
int q3mm_pool_init(void);
void q3mm_pool_exit(void);
bool q3mm_pool_has_node(int nid);
int q3mm_pool_resize(int nid, unsigned long nr_chunks);
int q3mm_pool_take(int nid, bool exact, unsigned long nr, struct page **chunks);
void q3mm_pool_give(int nid, struct page **chunks, unsigned long nr);
void q3mm_pool_stats(int nid, struct q3mm_stats *st);

/* buffer.c: one carved buffer; chunks[] are order-9 compound heads */
struct q3mm_buf {
	struct kref ref;	/* the owning file's handle + one per VMA */
	u64 size;		/* bytes, whole chunks */
	int nid;
	atomic_t map_count;
	unsigned long nr_chunks;
	struct page *chunks[];
};

struct q3mm_buf *q3mm_buf_create(u64 size, int nid, bool exact);
void q3mm_buf_put(struct q3mm_buf *buf);
int q3mm_buf_mmap(struct q3mm_buf *buf, struct vm_area_struct *vma);
long q3mm_buf_count(void);

/* sysfs.c */
int q3mm_sysfs_init(void);
void q3mm_sysfs_exit(void);

/* vm_flags became read-only with accessors in 6.3 */
static inline void q3mm_vm_flags_set(struct vm_area_struct *vma, vm_flags_t flags)
{
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 3, 0)
	vma->vm_flags |= flags;
#else
	vm_flags_set(vma, flags);
#endif
}

#endif /* _QWEN3MM_H */
