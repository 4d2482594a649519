/* memprov.c - the memory providers: qwen3mm module, hugetlbfs, THP, plain pages (see memprov.h).
 *
 * Each provider is one function that either fills a q3_membuf or says in one short phrase why it
 * cannot; q3_mem_alloc() walks them in order and joins the phrases into the note.  Placement is
 * set before the first touch (mbind), and memory is populated with MADV_POPULATE_WRITE, which
 * reports a shortage as an error instead of the SIGBUS a touch of a hugetlb page would raise.
 */
#include "memprov.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <numa.h>
#include <numaif.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "qwen3mm_uapi.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif

#define Q3_MEM_MAX_NODE_ID 1023 /* the largest node number mbind's mask below can carry */

static const char *const provider_names[Q3_MEM_NR_PROVIDERS] = {
	"kmod", "hugetlb", "thp", "plain"
};

const char *q3_mem_provider_name(enum q3_mem_provider p)
{
	return (unsigned)p < Q3_MEM_NR_PROVIDERS ? provider_names[p] : "?";
}

int q3_mem_provider_parse(const char *list, unsigned *flags, q3_err *e)
{
	unsigned allowed = 0;
	const char *s = list;

	if (!list || !*list)
		return q3_errf(e, -EINVAL,
			       "memory providers: empty list (use kmod, hugetlb, thp, plain or auto)");
	if (!strcmp(list, "auto"))
		return 0;
	while (*s) {
		size_t n = strcspn(s, ",");
		int p;

		for (p = 0; p < Q3_MEM_NR_PROVIDERS; p++)
			if (strlen(provider_names[p]) == n && !strncmp(s, provider_names[p], n))
				break;
		if (p == Q3_MEM_NR_PROVIDERS)
			return q3_errf(e, -EINVAL, "memory providers: unknown provider '%.*s' in '%s' "
				       "(kmod, hugetlb, thp, plain, auto)", (int)n, s, list);
		allowed |= 1u << p;
		s += n;
		if (*s == ',' && !*++s)
			return q3_errf(e, -EINVAL, "memory providers: trailing comma in '%s'", list);
	}
	*flags |= Q3_MEM_NO_ALL & ~allowed;
	return 0;
}

/* ---- shared steps ----------------------------------------------------------------------- */

/* Sets the policy of [p, p + len) before anything touches it: bind (strict) or prefer node. */
static int bind_node(void *p, size_t len, int node, bool strict)
{
	unsigned long mask[(Q3_MEM_MAX_NODE_ID + 1) / (8 * sizeof(unsigned long))] = { 0 };

	if (node < 0)
		return 0;
	mask[node / (8 * sizeof(unsigned long))] = 1ul << (node % (8 * sizeof(unsigned long)));
	/* maxnode counts one more than the bits the kernel reads */
	if (mbind(p, len, strict ? MPOL_BIND : MPOL_PREFERRED, mask, (unsigned long)node + 2,
		  strict ? MPOL_MF_STRICT : 0))
		return -errno;
	return 0;
}

/* Faults every page in now, so a shortage is an error here and not a signal later. */
static int populate(void *p, size_t len)
{
	if (!madvise(p, len, MADV_POPULATE_WRITE))
		return 0;
	if (errno != EINVAL)
		return -errno;
	/* kernels before 5.14: touch each page (base pages only reach here: see try_hugetlb) */
	for (size_t off = 0; off < len; off += (size_t)sysconf(_SC_PAGESIZE))
		((volatile char *)p)[off] = 0;
	return 0;
}

/* 1 if io_uring accepts [p, p + a page) as a registered buffer, 0 if it refuses, -1 if there is
 * no io_uring to ask; *err gets the refusal's errno. */
static int probe_fixed_io(void *p, size_t page, int *err)
{
	struct iovec iov = { .iov_base = p, .iov_len = page };
	struct io_uring ring;
	int ret;

	*err = 0;
	if (io_uring_queue_init(1, &ring, 0) < 0)
		return -1;
	ret = io_uring_register_buffers(&ring, &iov, 1);
	if (!ret)
		io_uring_unregister_buffers(&ring);
	io_uring_queue_exit(&ring);
	*err = -ret;
	return ret ? 0 : 1;
}

/* Maps len bytes aligned to align (a power of two) with the given extra mmap flags. */
static void *map_aligned(size_t len, size_t align, int mflags)
{
	size_t span = len + align;
	char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | mflags, -1, 0);
	char *p;

	if (raw == MAP_FAILED)
		return NULL;
	p = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
	if (p > raw)
		munmap(raw, p - raw);
	if (raw + span > p + len)
		munmap(p + len, raw + span - (p + len));
	return p;
}

/* ---- providers: 0 and b filled, or -errno and a short reason in why ------------------------ */

static int try_kmod(size_t len, int node, unsigned flags, struct q3_membuf *b, char *why, size_t n)
{
	struct qwen3mm_version v = { 0 };
	struct qwen3mm_alloc a = { 0 };
	struct qwen3mm_free fr = { 0 };
	void *p;
	int fd, ret = 0;

	fd = open(QWEN3MM_DEVICE, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		snprintf(why, n, "%s: %s", QWEN3MM_DEVICE, strerror(errno));
		return ret;
	}
	if (ioctl(fd, QWEN3MM_IOC_GET_VERSION, &v)) {
		ret = -errno;
		snprintf(why, n, "GET_VERSION: %s", strerror(errno));
		goto out_close;
	}
	if (v.version >> 16 != QWEN3MM_VERSION_MAJOR) {
		ret = -EPROTO;
		snprintf(why, n, "module ABI %u.%u, this build speaks %u.x", v.version >> 16,
			 v.version & 0xffff, QWEN3MM_VERSION_MAJOR);
		goto out_close;
	}
	a.size = len;
	a.node = node < 0 ? QWEN3MM_NODE_ANY : (unsigned)node;
	a.flags = node >= 0 && (flags & Q3_MEM_STRICT_NODE) ? QWEN3MM_ALLOC_EXACT_NODE : 0;
	if (ioctl(fd, QWEN3MM_IOC_ALLOC, &a)) {
		ret = -errno;
		snprintf(why, n, "pool cannot give %zu bytes on node %d: %s", len, node, strerror(errno));
		goto out_close;
	}
	p = mmap(NULL, a.alloc_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)a.mmap_offset);
	if (p == MAP_FAILED) {
		ret = -errno;
		snprintf(why, n, "mmap: %s", strerror(errno));
	} else {
		b->ptr = p;
		b->len = a.alloc_size;
		b->page_size = QWEN3MM_CHUNK_SIZE;
		b->locked = true;
	}
	/* the mapping holds the buffer from now on; munmap gives it back */
	fr.handle = a.handle;
	ioctl(fd, QWEN3MM_IOC_FREE, &fr);
out_close:
	close(fd);
	return ret;
}

static int try_hugetlb(size_t len, int node, unsigned flags, struct q3_membuf *b, char *why,
		       size_t n)
{
	size_t L = Q3_ALIGN_UP(len, Q3_MEM_HUGE_PAGE);
	void *p;
	int ret;

	/* reserves the pages now: fails with ENOMEM if the pool is short */
	p = mmap(NULL, L, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB, -1, 0);
	if (p == MAP_FAILED) {
		ret = -errno;
		snprintf(why, n, "no %zu free 2 MiB huge pages (vm.nr_hugepages): %s",
			 L / Q3_MEM_HUGE_PAGE, strerror(errno));
		return ret;
	}
	ret = bind_node(p, L, node, flags & Q3_MEM_STRICT_NODE);
	/* no touching fallback here: touching a page a short node cannot give raises SIGBUS */
	if (!ret && madvise(p, L, MADV_POPULATE_WRITE))
		ret = -errno;
	if (ret) {
		snprintf(why, n, "populating %zu huge pages on node %d: %s", L / Q3_MEM_HUGE_PAGE, node,
			 strerror(-ret));
		munmap(p, L);
		return ret;
	}
	b->ptr = p;
	b->len = L;
	b->page_size = Q3_MEM_HUGE_PAGE;
	b->locked = true;
	return 0;
}

/* Binds, populates and tries to lock anonymous memory at p; frees it on error. */
static int finish_anon(void *p, size_t L, size_t page, int node, unsigned flags,
		       struct q3_membuf *b, char *why, size_t n)
{
	int ret = bind_node(p, L, node, flags & Q3_MEM_STRICT_NODE);

	if (!ret)
		ret = populate(p, L);
	if (ret) {
		snprintf(why, n, "populating %zu bytes on node %d: %s", L, node, strerror(-ret));
		munmap(p, L);
		return ret;
	}
	b->ptr = p;
	b->len = L;
	b->page_size = page;
	b->locked = !mlock(p, L);
	return 0;
}

static bool thp_enabled(char *why, size_t n)
{
	char buf[128] = "";
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");

	if (!f) {
		snprintf(why, n, "the kernel has no transparent huge pages");
		return false;
	}
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = 0;
	fclose(f);
	if (strstr(buf, "[never]")) {
		snprintf(why, n, "transparent_hugepage/enabled is never");
		return false;
	}
	return true;
}

static int try_thp(size_t len, int node, unsigned flags, struct q3_membuf *b, char *why, size_t n)
{
	size_t L = Q3_ALIGN_UP(len, Q3_MEM_HUGE_PAGE);
	void *p;
	int ret;

	if (!thp_enabled(why, n))
		return -EOPNOTSUPP;
	p = map_aligned(L, Q3_MEM_HUGE_PAGE, MAP_NORESERVE);
	if (!p) {
		ret = -errno;
		snprintf(why, n, "mmap %zu bytes: %s", L, strerror(errno));
		return ret;
	}
	if (madvise(p, L, MADV_HUGEPAGE)) {
		ret = -errno;
		snprintf(why, n, "MADV_HUGEPAGE: %s", strerror(errno));
		munmap(p, L);
		return ret;
	}
	return finish_anon(p, L, Q3_MEM_HUGE_PAGE, node, flags, b, why, n);
}

static int try_plain(size_t len, int node, unsigned flags, struct q3_membuf *b, char *why, size_t n)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t L = Q3_ALIGN_UP(len, page);
	void *p = mmap(NULL, L, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		       -1, 0);
	int ret;

	if (p == MAP_FAILED) {
		ret = -errno;
		snprintf(why, n, "mmap %zu bytes: %s", L, strerror(errno));
		return ret;
	}
	return finish_anon(p, L, page, node, flags, b, why, n);
}

typedef int (*provider_fn)(size_t, int, unsigned, struct q3_membuf *, char *, size_t);

static const provider_fn providers[Q3_MEM_NR_PROVIDERS] = {
	try_kmod, try_hugetlb, try_thp, try_plain
};

/* ---- the entry points ------------------------------------------------------------------- */

static bool node_exists(int node)
{
	if (numa_available() < 0)
		return node == 0;
	return node <= numa_max_node() && node <= Q3_MEM_MAX_NODE_ID;
}

static void note_add(char *note, size_t size, const char *name, const char *why)
{
	size_t used = strlen(note);

	snprintf(note + used, size - used, "%s%s: %s", used ? "; " : "", name, why);
}

int q3_mem_alloc(size_t len, int node, unsigned flags, struct q3_membuf *out, q3_err *e)
{
	char note[sizeof(out->note)] = "";
	char why[192];
	int p;

	memset(out, 0, sizeof(*out));
	if (!len || len > SIZE_MAX / 2)
		return q3_errf(e, -EINVAL, "memprov: cannot allocate %zu bytes", len);
	if (node < -1 || (node >= 0 && !node_exists(node)))
		return q3_errf(e, -EINVAL, "memprov: node %d does not exist", node);
	if ((flags & Q3_MEM_NO_ALL) == Q3_MEM_NO_ALL)
		return q3_errf(e, -EINVAL, "memprov: every provider is disabled");

	for (p = 0; p < Q3_MEM_NR_PROVIDERS; p++) {
		struct q3_membuf b = { 0 };
		int err;

		if (flags & (1u << p))
			continue;
		why[0] = 0;
		if (providers[p](len, node, flags, &b, why, sizeof(why))) {
			note_add(note, sizeof(note), provider_names[p], why);
			continue;
		}
		b.fixed_io = probe_fixed_io(b.ptr, (size_t)sysconf(_SC_PAGESIZE), &err);
		if (b.fixed_io == 0 && (flags & Q3_MEM_FIXED_IO)) {
			snprintf(why, sizeof(why), "io_uring refuses it as a registered buffer (%s)",
				 strerror(err));
			note_add(note, sizeof(note), provider_names[p], why);
			munmap(b.ptr, b.len);
			continue;
		}
		if (p != Q3_MEM_KMOD)
			madvise(b.ptr, b.len, MADV_DONTFORK); /* kmod mappings are VM_DONTCOPY already */
		b.node = node;
		b.provider = (enum q3_mem_provider)p;
		memcpy(b.note, note, sizeof(note));
		*out = b;
		return 0;
	}
	return q3_errf(e, -ENOMEM, "memprov: no provider could serve %zu bytes on node %d: %s", len,
		       node, note);
}

void q3_mem_free(struct q3_membuf *b)
{
	if (b->ptr)
		munmap(b->ptr, b->len);
	b->ptr = NULL;
	b->len = 0;
}

int q3_mem_nodes_of(const struct q3_membuf *b, struct q3_mem_placement *p, q3_err *e)
{
	enum { BATCH = 1024 };
	void *addr[BATCH];
	int status[BATCH];
	size_t step, n_pages, i = 0;

	memset(p, 0, sizeof(*p));
	p->main_node = -1;
	if (!b->ptr || !b->len)
		return q3_errf(e, -EINVAL, "memprov: read-back of an empty buffer");
	step = b->page_size;
	n_pages = b->len / step;
	if (n_pages > Q3_MEM_MAX_SAMPLES) {
		step = Q3_ALIGN_UP(b->len / Q3_MEM_MAX_SAMPLES, b->page_size);
		n_pages = b->len / step;
	}
	while (i < n_pages) {
		size_t cnt = Q3_MIN((size_t)BATCH, n_pages - i);

		for (size_t k = 0; k < cnt; k++)
			addr[k] = (char *)b->ptr + (i + k) * step;
		if (move_pages(0, cnt, addr, NULL, status, 0)) {
			if (errno != ENOSYS)
				return q3_errf(e, -errno, "memprov: move_pages: %s", strerror(errno));
			for (size_t k = 0; k < cnt; k++)
				status[k] = 0; /* no NUMA in this kernel: one node */
		}
		for (size_t k = 0; k < cnt; k++) {
			if (status[k] < 0)
				p->missing++;
			else if (status[k] >= Q3_MEM_MAX_NODES)
				p->elsewhere++;
			else
				p->on_node[status[k]]++;
		}
		i += cnt;
	}
	p->samples = n_pages;
	for (int k = 0; k < Q3_MEM_MAX_NODES; k++) {
		if (!p->on_node[k])
			continue;
		p->nr_nodes++;
		if (p->main_node < 0 || p->on_node[k] > p->on_node[p->main_node])
			p->main_node = k;
	}
	return 0;
}
