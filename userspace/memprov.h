/* memprov.h - where qwen3d's large pinned host buffers come from.
 *
 * q3_mem_alloc() tries each provider the flags allow, in this order, and the first that can
 * serve the whole request does:
 *   kmod     the qwen3mm module's pool (/dev/qwen3mm): pinned, zeroed 2 MiB pages reserved at
 *            insmod; the buffer lives until q3_mem_free() (or the process) unmaps it
 *   hugetlb  MAP_HUGETLB 2 MiB pages (vm.nr_hugepages), bound to the node with mbind before the
 *            first touch
 *   thp      anonymous memory with MADV_HUGEPAGE, bound, populated, then mlock'ed
 *   plain    anonymous base pages, bound, populated, mlock'ed if RLIMIT_MEMLOCK allows
 * All memory comes back populated (no page faults later), zeroed, excluded from fork
 * (MADV_DONTFORK: a child must not COW pages the GPU or the disk DMA into).
 *
 * The result says which provider served, why the earlier ones did not (note), whether io_uring
 * accepts it as a registered buffer (fixed_io: Linux 6.1 refuses device mappings, so a loader
 * that wants READ_FIXED passes Q3_MEM_FIXED_IO or falls back to plain reads), and
 * q3_mem_nodes_of() reads back on which NUMA nodes the pages really are.
 *
 * Tests and the daemon choose providers with the Q3_MEM_NO_* flags, or with
 * q3_mem_provider_parse("hugetlb,plain") on a user-given list.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "util.h"

enum q3_mem_provider {
	Q3_MEM_KMOD,
	Q3_MEM_HUGETLB,
	Q3_MEM_THP,
	Q3_MEM_PLAIN,
	Q3_MEM_NR_PROVIDERS
};

/* q3_mem_alloc flags */
#define Q3_MEM_NO_KMOD (1u << 0)
#define Q3_MEM_NO_HUGETLB (1u << 1)
#define Q3_MEM_NO_THP (1u << 2)
#define Q3_MEM_NO_PLAIN (1u << 3)
#define Q3_MEM_NO_ALL (Q3_MEM_NO_KMOD | Q3_MEM_NO_HUGETLB | Q3_MEM_NO_THP | Q3_MEM_NO_PLAIN)
#define Q3_MEM_STRICT_NODE (1u << 8) /* every page on `node`, or that provider fails */
#define Q3_MEM_FIXED_IO (1u << 9)    /* pass over memory io_uring refuses to register */

#define Q3_MEM_HUGE_PAGE (2u << 20)

struct q3_membuf {
	void *ptr;
	size_t len;       /* usable bytes: the request rounded up to page_size */
	size_t page_size; /* 2 MiB for kmod, hugetlb and thp; the base page size for plain */
	int node;         /* the node asked for; -1 = any */
	enum q3_mem_provider provider;
	bool locked;      /* cannot be swapped: kmod and hugetlb always, thp/plain if mlock worked */
	int fixed_io;     /* io_uring_register_buffers on it: 1 accepted, 0 refused, -1 no io_uring */
	char note[384];   /* why providers before this one were passed over ("" if none) */
};

/* Allocates len bytes (> 0) for node (-1: any; else an existing node) from the first allowed
 * provider that can serve them.  Returns 0, -EINVAL for bad arguments or all providers
 * disabled, or -ENOMEM when none could serve (e names each provider's reason). */
int q3_mem_alloc(size_t len, int node, unsigned flags, struct q3_membuf *out, q3_err *e);

/* Unmaps the buffer (returns kmod chunks to the pool). Safe on a zeroed or freed buffer. */
void q3_mem_free(struct q3_membuf *b);

/* "kmod", "hugetlb", "thp", "plain" ("?" for anything else). */
const char *q3_mem_provider_name(enum q3_mem_provider p);

/* Turns a comma list of allowed providers ("kmod,thp"; "auto" = all) into Q3_MEM_NO_* bits for
 * the others, ORed into *flags. -EINVAL with a reason for an unknown name or an empty list. */
int q3_mem_provider_parse(const char *list, unsigned *flags, q3_err *e);

#define Q3_MEM_MAX_NODES 64
#define Q3_MEM_MAX_SAMPLES 65536

/* Where the pages of a buffer are, from move_pages(2) on up to Q3_MEM_MAX_SAMPLES pages spread
 * evenly over it (one per page_size step when that is fewer). */
struct q3_mem_placement {
	unsigned long samples;
	unsigned long on_node[Q3_MEM_MAX_NODES]; /* samples on each node */
	unsigned long elsewhere;                 /* samples on nodes >= Q3_MEM_MAX_NODES */
	unsigned long missing;                   /* samples with no page behind them */
	int nr_nodes;                            /* nodes holding at least one sample */
	int main_node;                           /* the node holding most samples; -1 if none */
};

/* Fills p for b. A kernel without NUMA counts everything on node 0. Returns 0 or -errno. */
int q3_mem_nodes_of(const struct q3_membuf *b, struct q3_mem_placement *p, q3_err *e);
