/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * qwen3mm_uapi.h - the whole ABI between the qwen3mm module and userspace.
 *
 * The module keeps a pool of pinned, zeroed 2 MiB pages (order-9 compound
 * pages) per NUMA node.  A process opens /dev/qwen3mm, carves a buffer out of
 * the pool with QWEN3MM_IOC_ALLOC and mmap()s it (MAP_SHARED) at the returned
 * offset.  The mapping holds struct pages, so O_DIRECT, io_uring and
 * cudaHostRegister (a FOLL_LONGTERM pin) work on it.
 *
 * Lifetime: a buffer is referenced by the file that allocated it (until
 * QWEN3MM_IOC_FREE or close) and by every mapping of it.  When the last
 * reference goes, even on SIGKILL, its chunks return to the pool; chunks that
 * someone still pins (an io_uring registration, a CUDA host registration) are
 * parked ("held") and rejoin the pool, zeroed, once released.
 *
 * Rules of this file: every struct uses __u64/__u32 only, its size is a
 * multiple of 8, fields are marked // in or // out, reserved fields must be
 * zero.  The file only grows: a change of behaviour gets a new ioctl number
 * and a new struct (_V2); existing ones never change.  The version is
 * (major << 16) | minor; a minor bump adds ioctls or sysfs files only.
 *
 * sysfs, under /sys/kernel/qwen3mm/ (all sizes in bytes unless named _mb/_kb):
 *   version                      "MAJOR.MINOR"
 *   total_bytes free_bytes used_bytes held_bytes peak_bytes alloc_failures
 *                                the pool over all nodes; total = free + used + held
 *   buffers                      live buffers
 *   node<N>/                     one per NUMA node with memory: the same counters
 *                                for that node, plus pool_mb (rw): the node's pool
 *                                size; writing resizes it (rounded up to 2 MiB;
 *                                -EINVAL on garbage or more than the node's memory,
 *                                -EBUSY if shrinking would take used chunks,
 *                                -ENOMEM if growing fails; nothing changes on error)
 *   knobs/                       tuning qwen3d reads at start (rw, validated, -EINVAL
 *                                and unchanged on bad input; QWEN3MM_KNOB_* below):
 *     read_chunk_kb              io_uring read size, a power of two
 *     queue_depth                reads in flight
 *     vram_budget_mb             VRAM qwen3d may use; 0 = decide from free VRAM
 *     expert_cache_policy        one of "lru lfu static"; reads show "[lru] lfu static"
 *     cpu_expert_threads         threads computing experts on the CPU; 0 = auto
 */
#ifndef _QWEN3MM_UAPI_H
#define _QWEN3MM_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define QWEN3MM_VERSION_MAJOR	1
#define QWEN3MM_VERSION_MINOR	0
#define QWEN3MM_VERSION		((QWEN3MM_VERSION_MAJOR << 16) | QWEN3MM_VERSION_MINOR)

#define QWEN3MM_DEVICE		"/dev/qwen3mm"
#define QWEN3MM_SYSFS_DIR	"/sys/kernel/qwen3mm"

/* The pool's page: an order-9 compound page, 2 MiB on x86-64. */
#define QWEN3MM_CHUNK_SHIFT	21
#define QWEN3MM_CHUNK_SIZE	(1ULL << QWEN3MM_CHUNK_SHIFT)

/*
 * Buffers are at most 1 TiB; buffer N is mapped at file offset
 * N << QWEN3MM_MMAP_SHIFT (QWEN3MM_IOC_ALLOC returns it), and a mapping may
 * start at any page inside the buffer (mmap offset + page offset).
 */
#define QWEN3MM_MMAP_SHIFT	40
#define QWEN3MM_MAX_BUFFER_SIZE	(1ULL << QWEN3MM_MMAP_SHIFT)
#define QWEN3MM_MAX_HANDLE	65535

#define QWEN3MM_NODE_ANY	0xffffffffU

/* QWEN3MM_IOC_ALLOC flags */
#define QWEN3MM_ALLOC_EXACT_NODE	(1U << 0)	/* never fall back to another node */

/* QWEN3MM_IOC_DEBUG_PIN flags */
#define QWEN3MM_PIN_WRITE	(1U << 0)	/* FOLL_WRITE */
#define QWEN3MM_PIN_LONGTERM	(1U << 1)	/* FOLL_LONGTERM, as cudaHostRegister */
#define QWEN3MM_DEBUG_PIN_MAX	(1ULL << 30)	/* bytes one DEBUG_PIN may pin */

struct qwen3mm_version {
	// out
	__u32 version;		/* QWEN3MM_VERSION of the loaded module */
	__u32 chunk_shift;	/* QWEN3MM_CHUNK_SHIFT */
	__u64 max_buffer_size;	/* QWEN3MM_MAX_BUFFER_SIZE */
	__u32 nr_node_ids;	/* node numbers are below this */
	__u32 debug;		/* 1 if the DEBUG_ ioctls are enabled */
};

struct qwen3mm_alloc {
	// in
	__u64 size;		/* bytes, 1..QWEN3MM_MAX_BUFFER_SIZE */
	__u32 node;		/* preferred node, or QWEN3MM_NODE_ANY (the caller's) */
	__u32 flags;		/* QWEN3MM_ALLOC_* */
	// out
	__u64 handle;		/* names the buffer to QUERY and FREE; >= 1 */
	__u64 mmap_offset;	/* offset to pass to mmap(MAP_SHARED) */
	__u64 alloc_size;	/* size rounded up to whole chunks */
	__u32 alloc_node;	/* node all chunks came from: the preferred one, or
				 * the nearest one with room */
	__u32 reserved;		/* 0 */
};

struct qwen3mm_query {
	// in
	__u64 handle;
	// out
	__u64 size;		/* bytes (whole chunks) */
	__u64 mmap_offset;
	__u32 node;
	__u32 map_count;	/* live mappings (VMAs) of the buffer */
};

struct qwen3mm_free {
	// in
	__u64 handle;		/* drops the file's reference; mappings keep the
				 * buffer alive until they go */
};

struct qwen3mm_node_info {
	// in
	__u32 node;
	__u32 reserved;		/* must be 0 */
	// out
	__u64 total_bytes;
	__u64 free_bytes;
	__u64 used_bytes;
	__u64 held_bytes;
};

/*
 * Test hook, present only with the module parameter debug_ioctls=1 (else
 * -ENOTTY), and for CAP_SYS_ADMIN (else -EPERM): pins [addr, addr + size) of
 * the caller with pin_user_pages_fast(), the call cudaHostRegister's driver
 * makes, and keeps the pins until QWEN3MM_IOC_DEBUG_UNPIN or close.  One pin
 * set per file (-EBUSY for a second).
 */
struct qwen3mm_debug_pin {
	// in
	__u64 addr;		/* page aligned */
	__u64 size;		/* bytes, page multiple, <= QWEN3MM_DEBUG_PIN_MAX */
	__u32 flags;		/* QWEN3MM_PIN_* */
	__u32 reserved;		/* must be 0 */
	// out
	__u64 pinned;		/* pages pinned (all of them, or the call fails) */
};

#define QWEN3MM_IOC_MAGIC	0xB7

#define QWEN3MM_IOC_GET_VERSION	_IOR(QWEN3MM_IOC_MAGIC, 0x00, struct qwen3mm_version)
#define QWEN3MM_IOC_ALLOC	_IOWR(QWEN3MM_IOC_MAGIC, 0x01, struct qwen3mm_alloc)
#define QWEN3MM_IOC_QUERY	_IOWR(QWEN3MM_IOC_MAGIC, 0x02, struct qwen3mm_query)
#define QWEN3MM_IOC_FREE	_IOW(QWEN3MM_IOC_MAGIC, 0x03, struct qwen3mm_free)
#define QWEN3MM_IOC_NODE_INFO	_IOWR(QWEN3MM_IOC_MAGIC, 0x04, struct qwen3mm_node_info)
#define QWEN3MM_IOC_DEBUG_PIN	_IOWR(QWEN3MM_IOC_MAGIC, 0x40, struct qwen3mm_debug_pin)
#define QWEN3MM_IOC_DEBUG_UNPIN	_IO(QWEN3MM_IOC_MAGIC, 0x41)

/* Knobs: defaults and accepted ranges (inclusive), shared with qwen3d. */
#define QWEN3MM_KNOB_READ_CHUNK_KB_DEFAULT	8192
#define QWEN3MM_KNOB_READ_CHUNK_KB_MIN		4
#define QWEN3MM_KNOB_READ_CHUNK_KB_MAX		1048576	/* and a power of two */
#define QWEN3MM_KNOB_QUEUE_DEPTH_DEFAULT	32
#define QWEN3MM_KNOB_QUEUE_DEPTH_MIN		1
#define QWEN3MM_KNOB_QUEUE_DEPTH_MAX		4096
#define QWEN3MM_KNOB_VRAM_BUDGET_MB_DEFAULT	0
#define QWEN3MM_KNOB_VRAM_BUDGET_MB_MAX		16777216	/* 16 TiB */
#define QWEN3MM_KNOB_CPU_EXPERT_THREADS_DEFAULT	0
#define QWEN3MM_KNOB_CPU_EXPERT_THREADS_MAX	4096

/* expert_cache_policy values, in the order sysfs lists them */
#define QWEN3MM_POLICY_LRU	0	/* least recently used expert leaves VRAM */
#define QWEN3MM_POLICY_LFU	1	/* least frequently used leaves */
#define QWEN3MM_POLICY_STATIC	2	/* placement fixed at start, no eviction */
#define QWEN3MM_POLICY_NAMES	{ "lru", "lfu", "static" }
#define QWEN3MM_POLICY_DEFAULT	QWEN3MM_POLICY_LRU

#endif /* _QWEN3MM_UAPI_H */
