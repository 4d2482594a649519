// SPDX-License-Identifier: GPL-2.0
/*
 * main.c - the qwen3mm module: its parameters, /dev/qwen3mm, and the ioctls
 * that carve buffers out of the pool (qwen3mm_uapi.h is the contract).
 *
 * Each open file keeps its buffers in an xarray keyed by handle; the entry
 * is the file's reference to the buffer.  An ioctl copies its argument in at
 * the edge, calls a typed function, and copies the result out.  Every file
 * and every mapping pins the module (the mapping through its file), so rmmod
 * is refused while any buffer exists.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/nodemask.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/xarray.h>

#include "qwen3mm.h"

static unsigned long pool_mb;
module_param(pool_mb, ulong, 0444);
MODULE_PARM_DESC(pool_mb, "MiB to reserve on each node of nodes= at load (default 0)");

static char *nodes;
module_param(nodes, charp, 0444);
MODULE_PARM_DESC(nodes, "nodes that get pool_mb, e.g. 0-1,3 (default: all with memory)");

static bool debug_ioctls;
module_param(debug_ioctls, bool, 0444);
MODULE_PARM_DESC(debug_ioctls, "enable the DEBUG_PIN/DEBUG_UNPIN test hook (default off)");

struct q3mm_file {
	struct xarray bufs;	/* handle -> buffer, one reference each */
	u32 next_handle;	/* handles are not reused soon after FREE */
	struct mutex pin_lock;	/* pins, nr_pins */
	struct page **pins;	/* DEBUG_PIN's pages, until DEBUG_UNPIN or close */
	unsigned long nr_pins;
};

static int q3mm_open(struct inode *inode, struct file *file)
{
	struct q3mm_file *f = kzalloc(sizeof(*f), GFP_KERNEL);

	if (!f)
		return -ENOMEM;
	xa_init_flags(&f->bufs, XA_FLAGS_ALLOC1);
	mutex_init(&f->pin_lock);
	file->private_data = f;
	return 0;
}

static void q3mm_unpin(struct q3mm_file *f)
{
	if (!f->pins)
		return;
	unpin_user_pages(f->pins, f->nr_pins);
	kvfree(f->pins);
	f->pins = NULL;
	f->nr_pins = 0;
}

static int q3mm_release(struct inode *inode, struct file *file)
{
	struct q3mm_file *f = file->private_data;
	struct q3mm_buf *buf;
	unsigned long handle;

	xa_for_each(&f->bufs, handle, buf) {
		xa_erase(&f->bufs, handle);
		q3mm_buf_put(buf);
	}
	xa_destroy(&f->bufs);
	q3mm_unpin(f);
	kfree(f);
	return 0;
}

/* The buffer named by handle with a new reference, or NULL. */
static struct q3mm_buf *q3mm_file_get(struct q3mm_file *f, u64 handle)
{
	struct q3mm_buf *buf;

	if (!handle || handle > QWEN3MM_MAX_HANDLE)
		return NULL;
	xa_lock(&f->bufs);
	buf = xa_load(&f->bufs, handle);
	if (buf)
		kref_get(&buf->ref);
	xa_unlock(&f->bufs);
	return buf;
}

static int q3mm_file_free(struct q3mm_file *f, u64 handle)
{
	struct q3mm_buf *buf = NULL;

	if (handle && handle <= QWEN3MM_MAX_HANDLE)
		buf = xa_erase(&f->bufs, handle);
	if (!buf)
		return -EINVAL;
	q3mm_buf_put(buf);
	return 0;
}

static int q3mm_mmap(struct file *file, struct vm_area_struct *vma)
{
	u64 handle = vma->vm_pgoff >> (QWEN3MM_MMAP_SHIFT - PAGE_SHIFT);
	struct q3mm_buf *buf = q3mm_file_get(file->private_data, handle);
	int ret;

	if (!buf)
		return -EINVAL;
	ret = q3mm_buf_mmap(buf, vma);
	if (ret)
		q3mm_buf_put(buf);
	return ret;
}

static void q3mm_version(struct qwen3mm_version *v)
{
	v->version = QWEN3MM_VERSION;
	v->chunk_shift = QWEN3MM_CHUNK_SHIFT;
	v->max_buffer_size = QWEN3MM_MAX_BUFFER_SIZE;
	v->nr_node_ids = nr_node_ids;
	v->debug = debug_ioctls;
}

static int q3mm_alloc(struct q3mm_file *f, struct qwen3mm_alloc *a)
{
	struct q3mm_buf *buf;
	int nid = NUMA_NO_NODE;
	u32 id;
	int ret;

	if (a->flags & ~QWEN3MM_ALLOC_EXACT_NODE)
		return -EINVAL;
	if (!a->size || a->size > QWEN3MM_MAX_BUFFER_SIZE)
		return -EINVAL;
	if (a->node != QWEN3MM_NODE_ANY) {
		if (a->node >= nr_node_ids || !q3mm_pool_has_node(a->node))
			return -EINVAL;
		nid = a->node;
	}
	buf = q3mm_buf_create(round_up(a->size, QWEN3MM_CHUNK_SIZE), nid,
			      a->flags & QWEN3MM_ALLOC_EXACT_NODE);
	if (IS_ERR(buf))
		return PTR_ERR(buf);
	ret = xa_alloc_cyclic(&f->bufs, &id, buf, XA_LIMIT(1, QWEN3MM_MAX_HANDLE),
			      &f->next_handle, GFP_KERNEL);
	if (ret < 0) {
		q3mm_buf_put(buf);
		return ret == -EBUSY ? -ENOSPC : ret;
	}
	a->handle = id;
	a->mmap_offset = (u64)id << QWEN3MM_MMAP_SHIFT;
	a->alloc_size = buf->size;
	a->alloc_node = buf->nid;
	a->reserved = 0;
	return 0;
}

static int q3mm_query(struct q3mm_file *f, struct qwen3mm_query *q)
{
	struct q3mm_buf *buf = q3mm_file_get(f, q->handle);

	if (!buf)
		return -EINVAL;
	q->size = buf->size;
	q->mmap_offset = q->handle << QWEN3MM_MMAP_SHIFT;
	q->node = buf->nid;
	q->map_count = atomic_read(&buf->map_count);
	q3mm_buf_put(buf);
	return 0;
}

static int q3mm_node_info(struct qwen3mm_node_info *ni)
{
	struct q3mm_stats st;

	if (ni->reserved || ni->node >= nr_node_ids || !q3mm_pool_has_node(ni->node))
		return -EINVAL;
	q3mm_pool_stats(ni->node, &st);
	ni->total_bytes = (u64)st.total << QWEN3MM_CHUNK_SHIFT;
	ni->free_bytes = (u64)st.free << QWEN3MM_CHUNK_SHIFT;
	ni->used_bytes = (u64)st.used << QWEN3MM_CHUNK_SHIFT;
	ni->held_bytes = (u64)st.held << QWEN3MM_CHUNK_SHIFT;
	return 0;
}

static int q3mm_debug_pin(struct q3mm_file *f, struct qwen3mm_debug_pin *p)
{
	unsigned int gup_flags = 0;
	struct page **pages;
	unsigned long nr;
	int ret;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (p->flags & ~(QWEN3MM_PIN_WRITE | QWEN3MM_PIN_LONGTERM) || p->reserved)
		return -EINVAL;
	if (!p->size || p->size > QWEN3MM_DEBUG_PIN_MAX ||
	    !PAGE_ALIGNED(p->addr) || !PAGE_ALIGNED(p->size) || p->addr + p->size < p->addr)
		return -EINVAL;
	if (p->flags & QWEN3MM_PIN_WRITE)
		gup_flags |= FOLL_WRITE;
	if (p->flags & QWEN3MM_PIN_LONGTERM)
		gup_flags |= FOLL_LONGTERM;
	nr = p->size >> PAGE_SHIFT;

	mutex_lock(&f->pin_lock);
	ret = -EBUSY;
	if (f->pins)
		goto out_unlock;
	ret = -ENOMEM;
	pages = kvmalloc_array(nr, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		goto out_unlock;
	ret = pin_user_pages_fast(p->addr, nr, gup_flags, pages);
	if (ret >= 0 && ret < nr) {
		unpin_user_pages(pages, ret);
		ret = -EFAULT;
	}
	if (ret < 0) {
		kvfree(pages);
		goto out_unlock;
	}
	f->pins = pages;
	f->nr_pins = nr;
	p->pinned = nr;
	ret = 0;
out_unlock:
	mutex_unlock(&f->pin_lock);
	return ret;
}

static int q3mm_debug_unpin(struct q3mm_file *f)
{
	int ret = 0;

	mutex_lock(&f->pin_lock);
	if (f->pins)
		q3mm_unpin(f);
	else
		ret = -EINVAL;
	mutex_unlock(&f->pin_lock);
	return ret;
}

static long q3mm_ioctl_version(void __user *uarg)
{
	struct qwen3mm_version v = {};

	q3mm_version(&v);
	return copy_to_user(uarg, &v, sizeof(v)) ? -EFAULT : 0;
}

static long q3mm_ioctl_alloc(struct q3mm_file *f, void __user *uarg)
{
	struct qwen3mm_alloc a;
	int ret;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	ret = q3mm_alloc(f, &a);
	if (ret)
		return ret;
	if (copy_to_user(uarg, &a, sizeof(a))) {
		q3mm_file_free(f, a.handle);
		return -EFAULT;
	}
	return 0;
}

static long q3mm_ioctl_query(struct q3mm_file *f, void __user *uarg)
{
	struct qwen3mm_query q;
	int ret;

	if (copy_from_user(&q, uarg, sizeof(q)))
		return -EFAULT;
	ret = q3mm_query(f, &q);
	if (ret)
		return ret;
	return copy_to_user(uarg, &q, sizeof(q)) ? -EFAULT : 0;
}

static long q3mm_ioctl_free(struct q3mm_file *f, void __user *uarg)
{
	struct qwen3mm_free fr;

	if (copy_from_user(&fr, uarg, sizeof(fr)))
		return -EFAULT;
	return q3mm_file_free(f, fr.handle);
}

static long q3mm_ioctl_node_info(void __user *uarg)
{
	struct qwen3mm_node_info ni;
	int ret;

	if (copy_from_user(&ni, uarg, sizeof(ni)))
		return -EFAULT;
	ret = q3mm_node_info(&ni);
	if (ret)
		return ret;
	return copy_to_user(uarg, &ni, sizeof(ni)) ? -EFAULT : 0;
}

static long q3mm_ioctl_debug_pin(struct q3mm_file *f, void __user *uarg)
{
	struct qwen3mm_debug_pin p;
	int ret;

	if (copy_from_user(&p, uarg, sizeof(p)))
		return -EFAULT;
	ret = q3mm_debug_pin(f, &p);
	if (ret)
		return ret;
	if (copy_to_user(uarg, &p, sizeof(p))) {
		q3mm_debug_unpin(f);
		return -EFAULT;
	}
	return 0;
}

static long q3mm_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct q3mm_file *f = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case QWEN3MM_IOC_GET_VERSION:
		return q3mm_ioctl_version(uarg);
	case QWEN3MM_IOC_ALLOC:
		return q3mm_ioctl_alloc(f, uarg);
	case QWEN3MM_IOC_QUERY:
		return q3mm_ioctl_query(f, uarg);
	case QWEN3MM_IOC_FREE:
		return q3mm_ioctl_free(f, uarg);
	case QWEN3MM_IOC_NODE_INFO:
		return q3mm_ioctl_node_info(uarg);
	case QWEN3MM_IOC_DEBUG_PIN:
		return debug_ioctls ? q3mm_ioctl_debug_pin(f, uarg) : -ENOTTY;
	case QWEN3MM_IOC_DEBUG_UNPIN:
		return debug_ioctls ? q3mm_debug_unpin(f) : -ENOTTY;
	default:
		return -ENOTTY;
	}
}

static const struct file_operations q3mm_fops = {
	.owner = THIS_MODULE,
	.open = q3mm_open,
	.release = q3mm_release,
	.mmap = q3mm_mmap,
	.unlocked_ioctl = q3mm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice q3mm_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "qwen3mm",
	.fops = &q3mm_fops,
	.mode = 0660,	/* udev/ gives the group qwen3 */
};

/* Reserves pool_mb on every node of the nodes= list (default: all with memory). */
static int q3mm_reserve(void)
{
	nodemask_t mask = node_states[N_MEMORY];
	unsigned long chunks;
	int nid, ret;

	if (nodes && *nodes) {
		if (nodelist_parse(nodes, mask) || !nodes_subset(mask, node_states[N_MEMORY])) {
			pr_err("nodes=%s: not a list of nodes with memory\n", nodes);
			return -EINVAL;
		}
	}
	chunks = q3mm_mb_to_chunks(pool_mb);
	for_each_node_mask(nid, mask) {
		ret = q3mm_pool_resize(nid, chunks);
		if (ret) {
			pr_err("cannot reserve %lu MiB on node %d: %d\n", pool_mb, nid, ret);
			return ret;
		}
	}
	if (chunks)
		pr_info("reserved %lu MiB on each of nodes %*pbl\n", chunks * Q3MM_CHUNK_MB,
			nodemask_pr_args(&mask));
	return 0;
}

static int __init q3mm_init(void)
{
	int ret;

	ret = q3mm_pool_init();
	if (ret)
		return ret;
	ret = q3mm_reserve();
	if (ret)
		goto out_pool;
	ret = q3mm_sysfs_init();
	if (ret)
		goto out_pool;
	ret = misc_register(&q3mm_misc);
	if (ret)
		goto out_sysfs;
	return 0;

out_sysfs:
	q3mm_sysfs_exit();
out_pool:
	q3mm_pool_exit();
	return ret;
}

static void __exit q3mm_exit(void)
{
	misc_deregister(&q3mm_misc);
	q3mm_sysfs_exit();
	q3mm_pool_exit();
}

module_init(q3mm_init);
module_exit(q3mm_exit);
MODULE_DESCRIPTION("qwen3mm: pinned 2 MiB page pool per NUMA node for qwen3d");
MODULE_VERSION("1.0");
MODULE_LICENSE("GPL");
