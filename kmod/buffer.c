// SPDX-License-Identifier: GPL-2.0
/*
 * buffer.c - buffers carved from the pool, and their mappings.
 *
 * A buffer is an array of chunks from one node.  Its references are the
 * handle of the file that allocated it and one per VMA mapping it (vm_ops
 * open and close keep the count right across splits and mremap); the last
 * one gives the chunks back to the pool.
 *
 * mmap inserts the chunks' struct pages with vm_insert_pages(), which makes
 * the VMA VM_MIXEDMAP with ordinary page-backed PTEs, so GUP - and with it
 * O_DIRECT, io_uring and FOLL_LONGTERM pins such as cudaHostRegister's -
 * works on it.  remap_pfn_range() would make it VM_PFNMAP, which GUP refuses.
 * The fault handler puts a page back after MADV_DONTNEED zapped it.
 */
#include <linux/atomic.h>
#include <linux/mm.h>
#include <linux/overflow.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>

#include "qwen3mm.h"

/* the page offset inside a buffer, from a VMA's vm_pgoff */
#define Q3MM_PGOFF_MASK	((1UL << (QWEN3MM_MMAP_SHIFT - PAGE_SHIFT)) - 1)

static atomic_long_t q3mm_nr_bufs = ATOMIC_LONG_INIT(0);

long q3mm_buf_count(void)
{
	return atomic_long_read(&q3mm_nr_bufs);
}

/* A buffer of size bytes (whole chunks) on nid or, unless exact, the nearest node with room. */
struct q3mm_buf *q3mm_buf_create(u64 size, int nid, bool exact)
{
	unsigned long nr = size >> QWEN3MM_CHUNK_SHIFT;
	struct q3mm_buf *buf;
	int got;

	buf = kvzalloc(struct_size(buf, chunks, nr), GFP_KERNEL);
	if (!buf)
		return ERR_PTR(-ENOMEM);
	got = q3mm_pool_take(nid, exact, nr, buf->chunks);
	if (got < 0) {
		kvfree(buf);
		return ERR_PTR(got);
	}
	kref_init(&buf->ref);
	buf->size = size;
	buf->nid = got;
	buf->nr_chunks = nr;
	atomic_set(&buf->map_count, 0);
	atomic_long_inc(&q3mm_nr_bufs);
	return buf;
}

static void q3mm_buf_release(struct kref *ref)
{
	struct q3mm_buf *buf = container_of(ref, struct q3mm_buf, ref);

	q3mm_pool_give(buf->nid, buf->chunks, buf->nr_chunks);
	atomic_long_dec(&q3mm_nr_bufs);
	kvfree(buf);
}

/* Drops one reference; the last one returns the chunks (may sleep). */
void q3mm_buf_put(struct q3mm_buf *buf)
{
	kref_put(&buf->ref, q3mm_buf_release);
}

static struct page *q3mm_buf_page(struct q3mm_buf *buf, pgoff_t idx)
{
	return nth_page(buf->chunks[idx >> Q3MM_CHUNK_ORDER], idx & (Q3MM_CHUNK_PAGES - 1));
}

static void q3mm_vm_open(struct vm_area_struct *vma)
{
	struct q3mm_buf *buf = vma->vm_private_data;

	kref_get(&buf->ref);
	atomic_inc(&buf->map_count);
}

static void q3mm_vm_close(struct vm_area_struct *vma)
{
	struct q3mm_buf *buf = vma->vm_private_data;

	atomic_dec(&buf->map_count);
	q3mm_buf_put(buf);
}

static vm_fault_t q3mm_vm_fault(struct vm_fault *vmf)
{
	struct q3mm_buf *buf = vmf->vma->vm_private_data;
	pgoff_t idx = vmf->pgoff & Q3MM_PGOFF_MASK;
	struct page *page;

	if (idx >= buf->size >> PAGE_SHIFT)
		return VM_FAULT_SIGBUS;
	page = q3mm_buf_page(buf, idx);
	get_page(page);
	vmf->page = page;
	return 0;
}

static const struct vm_operations_struct q3mm_vm_ops = {
	.open = q3mm_vm_open,
	.close = q3mm_vm_close,
	.fault = q3mm_vm_fault,
};

/* Maps nr pages of buf from page first on at the start of vma, a chunk's worth per call. */
static int q3mm_buf_insert(struct q3mm_buf *buf, struct vm_area_struct *vma,
			   pgoff_t first, unsigned long nr)
{
	unsigned long done = 0;
	struct page **pages;
	int ret = 0;

	pages = kmalloc_array(Q3MM_CHUNK_PAGES, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return -ENOMEM;
	while (done < nr) {
		pgoff_t idx = first + done;
		unsigned long n = min(nr - done, Q3MM_CHUNK_PAGES - (idx & (Q3MM_CHUNK_PAGES - 1)));
		unsigned long left = n;
		unsigned long i;

		for (i = 0; i < n; i++)
			pages[i] = q3mm_buf_page(buf, idx + i);
		ret = vm_insert_pages(vma, vma->vm_start + done * PAGE_SIZE, pages, &left);
		if (ret)
			break;
		done += n;
		/* a 1 TiB mapping is 2^28 PTEs: let a killed mapper go */
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		cond_resched();
	}
	kfree(pages);
	return ret;
}

/*
 * Maps buf into vma, which must be MAP_SHARED and lie inside the buffer.
 * On success the VMA owns the caller's reference; on error the caller keeps it.
 */
int q3mm_buf_mmap(struct q3mm_buf *buf, struct vm_area_struct *vma)
{
	pgoff_t first = vma->vm_pgoff & Q3MM_PGOFF_MASK;
	unsigned long buf_pages = buf->size >> PAGE_SHIFT;
	unsigned long nr = vma_pages(vma);
	int ret;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if (first >= buf_pages || nr > buf_pages - first)
		return -EINVAL;
	/* no copy into a child, no growth by mremap, not in core dumps */
	q3mm_vm_flags_set(vma, VM_MIXEDMAP | VM_DONTCOPY | VM_DONTEXPAND | VM_DONTDUMP);
	vma->vm_ops = &q3mm_vm_ops;
	vma->vm_private_data = buf;
	ret = q3mm_buf_insert(buf, vma, first, nr);
	if (ret)
		return ret;
	atomic_inc(&buf->map_count);
	return 0;
}
