/* loader.c - reads the plan (loader_plan.c) into the homes: the host arena for RAM tensors, the
 * staging ring and the CUDA copy engine (kernels/load_cuda.cu) for VRAM tensors.  See loader.h
 * for the data flow; this file owns steps 3 and 4: host memory, per-file I/O mode, the io_uring
 * engine, the pread-thread engine, completion handling (requeue, errors) and the statistics. */
#include "loader.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <numaif.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "load_gpu.h"
#include "memprov.h"
#include "progress.h"

#define DEFAULT_REQ (8u << 20)
#define DEFAULT_QD 32
#define DEFAULT_LANES 1
#define HUGE_2M (2ull << 20)
#define GIB (1ull << 30)
#define POPULATE_CHUNK (64ull << 20)
#define MAX_STALLS 1000 /* retries of one request without a byte of progress before giving up */

/* CUDA's copy engine (stubs that say "no CUDA" in a CPU-only build). */
static const struct q3_h2d_ops q3_h2d_cuda = {
	q3_h2d_devices, q3_h2d_open, q3_h2d_vram, q3_h2d_copy, q3_h2d_busy,
	q3_h2d_wait, q3_h2d_finish, q3_h2d_read, q3_h2d_close,
};

/* ---- host memory ---------------------------------------------------------------------------
 * RAM homes and the staging ring come from the memory providers (memprov.h), with one exception.
 * memprov populates what it hands out, in the calling thread: right for the module's pool
 * (populated at insmod: nothing left to do) and for the small ring, but for a fresh 45 GB arena
 * that is 10-25 s of page faults (zeroing; in a VM also the host's backing) before the first
 * read.  So the arena is taken from the qwen3mm pool when there is one, and otherwise mapped here
 * without populating (hugetlbfs if reserved, else THP, locked as it faults in), and faulted in by
 * threads beside the reads (or before them, when the files are cached). */

struct hostmem {
	void *ptr;
	size_t len;
	bool populated;	      /* nothing left to fault in */
	bool memprov;	      /* mb is memprov's */
	struct q3_membuf mb;
	char provider[160];
};

static void host_free(struct hostmem *b)
{
	if (b->memprov)
		q3_mem_free(&b->mb);
	else if (b->ptr)
		munmap(b->ptr, b->len);
	memset(b, 0, sizeof(*b));
}

/* Maps len bytes of 2 MiB-aligned anonymous memory without touching it. */
static int lazy_alloc(size_t len, int node, struct hostmem *b, const char *why_not_kmod, q3_err *e)
{
	size_t want = Q3_ALIGN_UP(len, HUGE_2M);
	const char *kind = "hugetlbfs 2 MiB pages";
	char *p;
	bool locked;

	p = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (p == MAP_FAILED) {
		/* over-map by 2 MiB and trim, so that THP can back every 2 MiB of it */
		char *q = mmap(NULL, want + HUGE_2M, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		size_t head;

		if (q == MAP_FAILED)
			return q3_errf(e, -ENOMEM, "cannot map %zu bytes of host memory: %s", want, strerror(errno));
		head = (size_t)(Q3_ALIGN_UP((uintptr_t)q, HUGE_2M) - (uintptr_t)q);
		if (head)
			munmap(q, head);
		munmap(q + head + want, HUGE_2M - head);
		p = q + head;
		kind = madvise(p, want, MADV_HUGEPAGE) ? "4 KiB pages" : "THP";
	}
	if (node >= 0 && node < 64) {
		unsigned long mask = 1ul << node;
		if (mbind(p, want, MPOL_BIND, &mask, 64, 0))
			node = -1;
	}
	/* locked as it faults in: nothing pages the weights out */
	locked = mlock2(p, want, MLOCK_ONFAULT) == 0;
	madvise(p, want, MADV_DONTFORK); /* no child may copy-on-write pages a DMA targets */
	b->ptr = p;
	b->len = want;
	snprintf(b->provider, sizeof(b->provider), "%s, faulted in by the loader%s%s (qwen3mm pool: %s)", kind,
		 locked ? ", mlocked" : ", not locked", node >= 0 ? ", bound to its node" : "", why_not_kmod);
	return 0;
}

/* The RAM arena: the qwen3mm pool, else lazily faulted memory. */
static int arena_alloc(size_t len, int node, struct hostmem *b, q3_err *e)
{
	q3_err why;

	memset(b, 0, sizeof(*b));
	if (!q3_mem_alloc(len, node, Q3_MEM_NO_ALL & ~Q3_MEM_NO_KMOD, &b->mb, &why)) {
		b->ptr = b->mb.ptr;
		b->len = b->mb.len;
		b->memprov = b->populated = true;
		snprintf(b->provider, sizeof(b->provider), "qwen3mm pool (pinned 2 MiB pages)");
		return 0;
	}
	/* "kmod: /dev/qwen3mm: No such file or directory" -> the part after the provider name */
	return lazy_alloc(len, node, b, strncmp(why.msg, "kmod: ", 6) ? why.msg : why.msg + 6, e);
}

/* The staging ring: small, so whatever memprov gives, populated. */
static int ring_alloc(size_t len, int node, struct hostmem *b, q3_err *e)
{
	memset(b, 0, sizeof(*b));
	if (q3_mem_alloc(len, node, 0, &b->mb, e))
		return -ENOMEM;
	b->ptr = b->mb.ptr;
	b->len = b->mb.len;
	b->memprov = b->populated = true;
	snprintf(b->provider, sizeof(b->provider), "%s", q3_mem_provider_name(b->mb.provider));
	return 0;
}

/* ---- the run ------------------------------------------------------------------------------ */

struct lfile {
	int fd_direct, fd_buf;
	bool direct;	/* read with O_DIRECT */
	bool cached;	/* AUTO found it in the page cache */
	void *map;	/* MMAP mode */
};

enum slot_state { SLOT_FREE, SLOT_READING, SLOT_COPYING };

struct run {
	struct q3_ckpt *ck;
	struct q3_load_opts o;
	struct q3_load_plan plan;
	struct lfile *f;
	struct hostmem arena, ring;
	struct q3_h2d *h2d;
	const struct q3_h2d_ops *ops; /* h2d's functions */
	uint32_t slot_bytes;
	int nslots;
	unsigned char *slot; /* enum slot_state per slot (io_uring engine) */
	struct q3_progress prog;
	struct q3_load_stats *st;
	bool fixed_ring, fixed_arena;
	char fixed_note[96];
	/* shared by threads */
	pthread_mutex_t mu;
	int err;
	q3_err *e;
	size_t next_req;  /* thread engine: next request to take */
	uint64_t retries;
	bool reads_done;  /* populate threads stop */
};

static bool failed(struct run *R)
{
	return __atomic_load_n(&R->err, __ATOMIC_RELAXED) != 0;
}

/* Records the first error (one line); returns code. */
static int fail(struct run *R, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct run *R, int code, const char *fmt, ...)
{
	pthread_mutex_lock(&R->mu);
	if (!R->err) {
		va_list ap;
		va_start(ap, fmt);
		if (R->e)
			vsnprintf(R->e->msg, sizeof(R->e->msg), fmt, ap);
		va_end(ap);
		__atomic_store_n(&R->err, code, __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&R->mu);
	return code;
}

static const struct q3_extent *ext_of(const struct run *R, const struct q3_lreq *r)
{
	return &R->plan.ext[r->ext];
}

static bool req_in_vram(const struct run *R, const struct q3_lreq *r)
{
	return ext_of(R, r)->home == Q3_HOME_VRAM;
}

/* In MMAP mode RAM extents are the mapped page cache: nothing to read. */
static bool req_skipped(const struct run *R, const struct q3_lreq *r)
{
	return R->o.io == Q3_IO_MMAP && !req_in_vram(R, r);
}

static uint8_t *ram_dst(const struct run *R, const struct q3_lreq *r)
{
	const struct q3_extent *x = ext_of(R, r);

	return (uint8_t *)R->arena.ptr + x->dst + (r->off - x->astart);
}

static uint8_t *slot_mem(const struct run *R, int slot)
{
	return (uint8_t *)R->ring.ptr + (size_t)slot * R->slot_bytes;
}

/* Bytes a request can get: the last request of a file stops at its end. */
static uint32_t req_expect(const struct run *R, const struct q3_lreq *r)
{
	uint64_t size = R->ck->shards[ext_of(R, r)->shard].size;

	return (uint32_t)Q3_MIN((uint64_t)r->len, size - r->off);
}

static int req_fd(const struct run *R, const struct q3_lreq *r)
{
	const struct lfile *f = &R->f[ext_of(R, r)->shard];

	return f->direct ? f->fd_direct : f->fd_buf;
}

/* What a completed read means.  *done: bytes of the request read so far (updated).  Returns 0
 * when the request is complete, 1 when the rest must be read again, or -errno (error recorded,
 * naming the file and offset). */
static int judge(struct run *R, const struct q3_lreq *r, uint32_t *done, int *stalls, int res)
{
	const struct q3_extent *x = ext_of(R, r);
	const char *path = R->ck->shards[x->shard].path;
	uint32_t want = req_expect(R, r), before = *done;

	if (R->o.fault) { /* tests: one call at a time, whatever the engine */
		pthread_mutex_lock(&R->mu);
		res = R->o.fault(R->o.fault_ctx, x->shard, r->off + *done, r->len - *done, res);
		pthread_mutex_unlock(&R->mu);
	}
	if (res == -EAGAIN || res == -EINTR) {
		__atomic_add_fetch(&R->retries, 1, __ATOMIC_RELAXED);
	} else if (res < 0) {
		return fail(R, res, "%s: read of %u bytes at offset %" PRIu64 " failed: %s", path,
			    r->len - *done, r->off + *done, strerror(-res));
	} else if (res == 0) {
		struct stat sb;
		uint64_t now = fstat(req_fd(R, r), &sb) ? 0 : (uint64_t)sb.st_size;
		return fail(R, -EIO, "%s: file ends at byte %" PRIu64 ", expected %" PRIu64
			    " (truncated while loading?): read at offset %" PRIu64 " got nothing",
			    path, now, R->ck->shards[x->shard].size, r->off + *done);
	} else {
		*done += (uint32_t)res;
		if (*done >= want)
			return 0;
		__atomic_add_fetch(&R->retries, 1, __ATOMIC_RELAXED);
		if (R->f[x->shard].direct) /* O_DIRECT resumes on a block boundary */
			*done = *done / Q3_LOAD_ALIGN * Q3_LOAD_ALIGN;
	}
	*stalls = *done > before ? 0 : *stalls + 1;
	if (*stalls > MAX_STALLS)
		return fail(R, -EIO, "%s: read at offset %" PRIu64 " made no progress in %d tries (last result %d)",
			    path, r->off + *done, MAX_STALLS, res);
	return 1;
}

/* ---- per-file I/O mode -------------------------------------------------------------------- */

/* Fraction of a file's pages in the page cache (mincore on a mapping that is never touched). */
static double cached_fraction(int fd, uint64_t size)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = (size_t)((size + pg - 1) / pg), hit = 0;
	unsigned char *vec;
	void *m;

	if (!n)
		return 1.0;
	m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	vec = malloc(n);
	if (m == MAP_FAILED || !vec || mincore(m, size, vec)) {
		if (m != MAP_FAILED)
			munmap(m, size);
		free(vec);
		return 0.0;
	}
	for (size_t i = 0; i < n; i++)
		hit += vec[i] & 1;
	munmap(m, size);
	free(vec);
	return (double)hit / (double)n;
}

static int open_files(struct run *R)
{
	struct q3_ckpt *ck = R->ck;

	R->f = calloc((size_t)ck->nshards, sizeof(*R->f));
	if (!R->f)
		return fail(R, -ENOMEM, "out of memory");
	for (int s = 0; s < ck->nshards; s++) /* close_files runs after a failure part-way through */
		R->f[s].fd_direct = R->f[s].fd_buf = -1;
	for (int s = 0; s < ck->nshards; s++) {
		struct lfile *f = &R->f[s];
		struct stat sb;

		f->fd_buf = open(ck->shards[s].path, O_RDONLY | O_CLOEXEC);
		if (f->fd_buf < 0)
			return fail(R, -errno, "%s: %s", ck->shards[s].path, strerror(errno));
		if (fstat(f->fd_buf, &sb) || (uint64_t)sb.st_size != ck->shards[s].size)
			return fail(R, -EIO, "%s: %" PRIu64 " bytes now, %" PRIu64 " when the checkpoint was opened",
				    ck->shards[s].path, (uint64_t)sb.st_size, ck->shards[s].size);
		if (R->o.io == Q3_IO_MMAP) {
			f->map = mmap(NULL, ck->shards[s].size, PROT_READ, MAP_SHARED, f->fd_buf, 0);
			if (f->map == MAP_FAILED) {
				f->map = NULL;
				return fail(R, -errno, "%s: mmap: %s", ck->shards[s].path, strerror(errno));
			}
			continue; /* VRAM extents of mapped files are read buffered (from the cache) */
		}
		if (R->o.io == Q3_IO_BUFFERED)
			continue;
		if (R->o.io == Q3_IO_AUTO &&
		    cached_fraction(f->fd_buf, ck->shards[s].size) >= R->o.cached_min) {
			f->cached = true;
			R->st->files_cached++;
			continue;
		}
		f->fd_direct = open(ck->shards[s].path, O_RDONLY | O_CLOEXEC | O_DIRECT);
		f->direct = f->fd_direct >= 0; /* file systems without O_DIRECT: buffered */
	}
	for (int s = 0; s < ck->nshards; s++)
		if (R->f[s].direct)
			R->st->files_direct++;
		else
			R->st->files_buffered++;
	return 0;
}

static void close_files(struct run *R)
{
	for (int s = 0; R->f && s < R->ck->nshards; s++) {
		if (R->f[s].fd_direct >= 0)
			close(R->f[s].fd_direct);
		if (R->f[s].fd_buf >= 0)
			close(R->f[s].fd_buf);
	}
}

/* ---- populate: fault the arena in parallel, ahead of the reads ---------------------------
 * An O_DIRECT read pins its destination pages, faulting in (zeroing) any that are missing, in the
 * submitting thread: one thread's page-fault rate would then bound the load.  MADV_POPULATE_WRITE
 * in a few threads walking the arena in read order does that work beside the reads; a page a read
 * already holds is left as it is. */

struct populate {
	struct run *R;
	uint8_t *base;
	uint64_t len;
	int advice;
	uint64_t next;	/* atomic */
	double t_end;	/* when the walk reached the end (0: stopped early) */
};

static void *populate_thread(void *arg)
{
	struct populate *P = arg;

	for (;;) {
		uint64_t off = __atomic_fetch_add(&P->next, POPULATE_CHUNK, __ATOMIC_RELAXED);
		if (off >= P->len) {
			double now = q3_now();
			__atomic_store(&P->t_end, &now, __ATOMIC_RELAXED); /* racing writers agree closely */
			break;
		}
		if (__atomic_load_n(&P->R->reads_done, __ATOMIC_RELAXED) || failed(P->R))
			break;
		if (madvise(P->base + off, Q3_MIN(POPULATE_CHUNK, P->len - off), P->advice))
			break; /* MADV_POPULATE_* needs 5.14: the reads fault the pages in themselves */
	}
	return NULL;
}

/* Faults [base, base + len) in with nthreads threads. */
static void prefault(struct run *R, void *base, size_t len, int nthreads)
{
	struct populate pp = { .R = R, .base = base, .len = len, .advice = MADV_POPULATE_WRITE };
	pthread_t th[64];
	int n = 0;

	for (; n < Q3_MIN(nthreads, 64); n++)
		if (pthread_create(&th[n], NULL, populate_thread, &pp))
			break;
	if (!n)
		populate_thread(&pp);
	for (int i = 0; i < n; i++)
		pthread_join(th[i], NULL);
}

/* ---- the io_uring engine ------------------------------------------------------------------ */

struct inflight {
	uint32_t req;
	uint32_t done;
	int slot;
	int stalls;
};

static int get_slot(struct run *R)
{
	for (int i = 0; i < R->nslots; i++) {
		if (R->slot[i] == SLOT_COPYING) {
			q3_err ce;
			int b = R->ops->busy(R->h2d, i, &ce);
			if (b < 0)
				return fail(R, b, "%s", ce.msg);
			if (!b)
				R->slot[i] = SLOT_FREE;
		}
		if (R->slot[i] == SLOT_FREE)
			return i;
	}
	return -1;
}

static int wait_any_copy(struct run *R)
{
	for (int i = 0; i < R->nslots; i++)
		if (R->slot[i] == SLOT_COPYING) {
			q3_err ce;
			int err = R->ops->wait(R->h2d, i, &ce);
			if (err)
				return fail(R, err, "%s", ce.msg);
			R->slot[i] = SLOT_FREE;
			return 0;
		}
	return 0;
}

/* A complete VRAM request: its slot goes to the GPU. */
static int start_copy(struct run *R, const struct q3_lreq *r, int slot, uint32_t bytes)
{
	const struct q3_extent *x = ext_of(R, r);
	q3_err ce;
	int err = R->ops->copy(R->h2d, slot, x->dst + (r->off - x->astart), slot_mem(R, slot), bytes, &ce);

	if (err)
		return fail(R, err, "%s", ce.msg);
	return 0;
}

static void register_buffers(struct run *R, struct io_uring *ring)
{
	size_t nio = 0, cap;
	struct iovec *iov;
	int err;

	if (R->o.no_register) {
		snprintf(R->fixed_note, sizeof(R->fixed_note), "off (asked)");
		return;
	}
	/* the arena too when asked, or when it is the module's pool and memprov found that io_uring
	 * takes it (pinning populated memory costs nothing; 6.1 refuses device mappings) */
	if (R->arena.memprov && R->arena.mb.fixed_io == 1)
		R->o.register_arena = true;
	cap = (size_t)R->nslots + (R->o.register_arena ? R->arena.len / GIB + 1 : 0);
	if (!cap) {
		/* pinning a fresh arena would fault all of it in, in this one thread, before any read */
		snprintf(R->fixed_note, sizeof(R->fixed_note), "%s",
			 !R->arena.len ? "not used (no arena, no ring)" :
			 R->arena.populated ? "not used (register_arena not asked)" :
			 "not used (pinning a fresh arena would fault it in one thread)");
		return;
	}
	iov = calloc(cap, sizeof(*iov));
	if (!iov)
		return;
	for (int i = 0; i < R->nslots; i++)
		iov[nio++] = (struct iovec){ slot_mem(R, i), R->slot_bytes };
	if (R->o.register_arena) /* 1 GiB per registered buffer is the kernel's limit */
		for (size_t off = 0; off < R->arena.len; off += GIB)
			iov[nio++] = (struct iovec){ (uint8_t *)R->arena.ptr + off, Q3_MIN(GIB, R->arena.len - off) };
	err = nio > 16384 ? -E2BIG : io_uring_register_buffers(ring, iov, (unsigned)nio);
	if (!err) {
		R->fixed_ring = R->nslots > 0;
		R->fixed_arena = R->o.register_arena;
		snprintf(R->fixed_note, sizeof(R->fixed_note), "%s%s%s", R->fixed_ring ? "ring" : "",
			 R->fixed_ring && R->fixed_arena ? " + " : "", R->fixed_arena ? "arena" : "");
	} else {
		/* 6.1 refuses file-backed (device) mappings, RLIMIT_MEMLOCK may be low: plain reads */
		snprintf(R->fixed_note, sizeof(R->fixed_note), "refused (%s): plain reads", strerror(-err));
	}
	free(iov);
}

static void prep(struct run *R, struct io_uring_sqe *sqe, struct inflight *fl)
{
	const struct q3_lreq *r = &R->plan.req[fl->req];
	int fd = req_fd(R, r);
	uint32_t n = r->len - fl->done;
	uint64_t off = r->off + fl->done;

	if (fl->slot >= 0) {
		uint8_t *dst = slot_mem(R, fl->slot) + fl->done;
		if (R->fixed_ring)
			io_uring_prep_read_fixed(sqe, fd, dst, n, off, fl->slot);
		else
			io_uring_prep_read(sqe, fd, dst, n, off);
	} else {
		uint8_t *dst = ram_dst(R, r) + fl->done;
		uint64_t a = (uint64_t)(dst - (uint8_t *)R->arena.ptr);
		if (R->fixed_arena && a / GIB == (a + n - 1) / GIB)
			io_uring_prep_read_fixed(sqe, fd, dst, n, off, R->nslots + (int)(a / GIB));
		else
			io_uring_prep_read(sqe, fd, dst, n, off);
	}
	/* page-cache reads run inline in the submitter unless punted: io-wq copies in parallel */
	if (!R->f[ext_of(R, r)->shard].direct)
		sqe->flags |= IOSQE_ASYNC;
	io_uring_sqe_set_data(sqe, fl);
}

static int uring_setup(struct run *R, struct io_uring *ring)
{
	struct io_uring_params p = { 0 };
	int err;

	err = io_uring_queue_init_params((unsigned)R->o.qd, ring, &p);
	if (err)
		return err;
	if (R->o.threads > 0) {
		unsigned w[2] = { (unsigned)R->o.threads, (unsigned)R->o.threads };
		io_uring_register_iowq_max_workers(ring, w);
	}
	register_buffers(R, ring);
	return 0;
}

static int run_uring(struct run *R, struct io_uring *ring)
{
	const struct q3_load_plan *P = &R->plan;
	int qd = R->o.qd, inflight = 0, nretry = 0;
	struct inflight *pool = calloc((size_t)qd, sizeof(*pool)), **free_fl, **retry;
	size_t next = 0;
	int nfree = qd;

	free_fl = calloc((size_t)qd, sizeof(*free_fl));
	retry = calloc((size_t)qd, sizeof(*retry));
	if (!pool || !free_fl || !retry) {
		free(pool), free(free_fl), free(retry);
		return fail(R, -ENOMEM, "out of memory");
	}
	for (int i = 0; i < qd; i++)
		free_fl[i] = &pool[i];
	for (;;) {
		struct io_uring_cqe *cqe;
		bool blocked = false;

		/* keep qd reads in flight: requeued ones first, then the plan in file order */
		while (!failed(R) && inflight < qd) {
			struct inflight *fl;
			struct io_uring_sqe *sqe;

			if (nretry) {
				fl = retry[--nretry];
			} else {
				while (next < P->n_req && req_skipped(R, &P->req[next]))
					next++;
				if (next == P->n_req)
					break;
				fl = free_fl[--nfree];
				*fl = (struct inflight){ .req = (uint32_t)next, .slot = -1 };
				if (req_in_vram(R, &P->req[next])) {
					fl->slot = get_slot(R);
					if (fl->slot < 0) {
						free_fl[nfree++] = fl;
						blocked = true;
						break;
					}
					R->slot[fl->slot] = SLOT_READING;
				}
				next++;
			}
			sqe = io_uring_get_sqe(ring); /* the SQ holds qd entries: never NULL here */
			prep(R, sqe, fl);
			inflight++;
		}
		if (!inflight) {
			if (failed(R) || (!blocked && next == P->n_req))
				break;
			wait_any_copy(R); /* every slot is on its way to the GPU */
			continue;
		}
		{
			int err = io_uring_submit_and_wait(ring, 1);
			if (err < 0 && err != -EINTR && err != -EAGAIN && err != -EBUSY) {
				fail(R, err, "io_uring_submit: %s", strerror(-err));
				inflight -= (int)io_uring_sq_ready(ring); /* prepared, never sent */
				break;
			}
		}
		while (io_uring_peek_cqe(ring, &cqe) == 0) {
			struct inflight *fl = io_uring_cqe_get_data(cqe);
			const struct q3_lreq *r = &P->req[fl->req];
			uint32_t before = fl->done;
			int v = judge(R, r, &fl->done, &fl->stalls, cqe->res);

			io_uring_cqe_seen(ring, cqe);
			inflight--;
			if (v == 1) {
				retry[nretry++] = fl;
			} else {
				if (v == 0 && fl->slot >= 0 && !start_copy(R, r, fl->slot, fl->done))
					R->slot[fl->slot] = SLOT_COPYING;
				else if (fl->slot >= 0)
					R->slot[fl->slot] = SLOT_FREE;
				free_fl[nfree++] = fl;
			}
			if (fl->done > before)
				q3_progress_add(&R->prog, fl->done - before);
		}
	}
	/* after an error, let the reads still in flight land before their memory goes away */
	while (inflight > 0) {
		struct io_uring_cqe *cqe;
		int w = io_uring_wait_cqe(ring, &cqe);
		if (w == -EINTR)
			continue; /* a signal: the reads are still in flight */
		if (w)
			break;
		io_uring_cqe_seen(ring, cqe);
		inflight--;
	}
	free(pool);
	free(free_fl);
	free(retry);
	return R->err;
}

/* ---- the pread-thread engine -------------------------------------------------------------- */

struct reader {
	struct run *R;
	int id, nthreads;
	int next_slot; /* this thread's slots: id, id + nthreads, ... */
};

static void *reader_thread(void *arg)
{
	struct reader *w = arg;
	struct run *R = w->R;
	const struct q3_load_plan *P = &R->plan;

	for (;;) {
		size_t i = __atomic_fetch_add(&R->next_req, 1, __ATOMIC_RELAXED);
		const struct q3_lreq *r;
		uint32_t done = 0;
		int stalls = 0, slot = -1, v;
		uint8_t *dst;

		if (i >= P->n_req || failed(R))
			break;
		r = &P->req[i];
		if (req_skipped(R, r))
			continue;
		if (req_in_vram(R, r)) {
			slot = w->next_slot;
			w->next_slot += w->nthreads;
			if (w->next_slot >= R->nslots)
				w->next_slot = w->id;
			{
				q3_err ce;
				if ((v = R->ops->wait(R->h2d, slot, &ce))) {
					fail(R, v, "%s", ce.msg);
					break;
				}
			}
			dst = slot_mem(R, slot);
		} else {
			dst = ram_dst(R, r);
		}
		do {
			ssize_t n = pread(req_fd(R, r), dst + done, r->len - done, (off_t)(r->off + done));
			uint32_t before = done;
			v = judge(R, r, &done, &stalls, n < 0 ? -errno : (int)n);
			if (done > before)
				q3_progress_add(&R->prog, done - before);
		} while (v == 1);
		if (v < 0 || (slot >= 0 && start_copy(R, r, slot, done)))
			break;
	}
	return NULL;
}

static int run_threads(struct run *R)
{
	/* each thread owns the slots id, id + n, ...: no more threads than slots (the ring was sized
	 * for io_uring when the thread engine is its fallback) */
	int n = R->nslots ? Q3_MIN(R->o.threads, R->nslots) : R->o.threads;
	pthread_t *th = calloc((size_t)n, sizeof(*th));
	struct reader *w = calloc((size_t)n, sizeof(*w));
	int started = 0;

	if (!th || !w) {
		free(th), free(w);
		return fail(R, -ENOMEM, "out of memory");
	}
	for (; started < n; started++) {
		w[started] = (struct reader){ R, started, n, started };
		if (pthread_create(&th[started], NULL, reader_thread, &w[started]))
			break;
	}
	if (!started)
		fail(R, -EAGAIN, "cannot start reader threads");
	for (int i = 0; i < started; i++)
		pthread_join(th[i], NULL);
	free(th);
	free(w);
	return R->err;
}

/* ---- q3_load ------------------------------------------------------------------------------ */

struct q3_load {
	struct hostmem arena, ring;
	const struct q3_h2d_ops *ops;
	bool arena_borrowed; /* the caller's pool */
	struct q3_h2d *h2d;
	int nmaps;
	void **maps;
	uint64_t *map_len;
};

void q3_load_free(struct q3_load *ld)
{
	if (!ld)
		return;
	if (ld->h2d)
		ld->ops->close(ld->h2d, 0);
	host_free(&ld->ring);
	if (!ld->arena_borrowed)
		host_free(&ld->arena);
	for (int i = 0; i < ld->nmaps; i++)
		if (ld->maps[i])
			munmap(ld->maps[i], ld->map_len[i]);
	free(ld->maps);
	free(ld->map_len);
	free(ld);
}

uint64_t q3_load_ram_bytes(const struct q3_ckpt *ck, const uint8_t *home)
{
	struct q3_load_plan p;
	uint64_t n;

	if (q3_load_plan_build(ck, home, DEFAULT_REQ, &p, NULL))
		return 0;
	n = p.ram_bytes;
	q3_load_plan_free(&p);
	return n;
}

int q3_load_gpus(void)
{
	return q3_h2d_devices();
}

int q3_load_read_vram(struct q3_load *ld, const void *dev, void *dst, size_t n, q3_err *e)
{
	if (!ld->h2d)
		return q3_errf(e, -EINVAL, "this load put nothing in VRAM");
	return ld->ops->read(ld->h2d, dev, dst, n, e);
}

static void defaults(struct q3_load_opts *o)
{
	if (!o->req_bytes)
		o->req_bytes = DEFAULT_REQ;
	o->req_bytes = Q3_ALIGN_UP(o->req_bytes, Q3_LOAD_ALIGN);
	if (o->qd <= 0)
		o->qd = DEFAULT_QD;
	if (o->lanes <= 0)
		o->lanes = DEFAULT_LANES;
	if (o->threads <= 0 && o->engine == Q3_ENGINE_THREADS)
		o->threads = q3_ncpu();
	if (o->streams <= 0)
		o->streams = 4;
	if (o->cached_min <= 0)
		o->cached_min = 0.5;
}

/* Host arena, ring and VRAM arena. */
static int alloc_homes(struct run *R)
{
	const struct q3_load_plan *P = &R->plan;
	q3_err le;
	int err;

	if (P->ram_bytes && R->o.io != Q3_IO_MMAP && R->o.arena) {
		if (R->o.arena_len < P->ram_bytes || (uintptr_t)R->o.arena % Q3_LOAD_ALIGN)
			return fail(R, -EINVAL, "the arena given holds %zu bytes at %p; the RAM homes need %" PRIu64
				    " bytes, 4 KiB aligned", R->o.arena_len, R->o.arena, P->ram_bytes);
		R->arena.ptr = R->o.arena; /* the caller's: never freed here */
		R->arena.len = R->o.arena_len;
		R->arena.populated = true;  /* a pool, as the contract says */
		snprintf(R->arena.provider, sizeof(R->arena.provider), "the caller's pool");
	} else if (P->ram_bytes && R->o.io != Q3_IO_MMAP) {
		err = arena_alloc(P->ram_bytes, R->o.node, &R->arena, &le);
		if (err)
			return fail(R, err, "%s", le.msg);
	}
	if (!P->vram_bytes)
		return 0;
	if (R->ops->devices() <= R->o.gpu)
		return fail(R, -ENODEV, "%" PRIu64 " bytes of tensors are placed in VRAM, but CUDA device %d is not available",
			    P->vram_bytes, R->o.gpu);
	R->slot_bytes = R->o.req_bytes;
	R->nslots = R->o.ring_slots > 0 ? R->o.ring_slots : R->o.qd + 8;
	if (R->o.engine == Q3_ENGINE_THREADS)
		R->nslots = Q3_MAX(R->nslots, 2 * R->o.threads);
	R->slot = calloc((size_t)R->nslots, 1);
	if (!R->slot)
		return fail(R, -ENOMEM, "out of memory");
	err = ring_alloc((size_t)R->nslots * R->slot_bytes, R->o.node, &R->ring, &le);
	if (!err)
		err = R->ops->open(R->o.gpu, P->vram_bytes, R->ring.ptr, R->ring.len, R->nslots, R->o.streams,
				  &R->h2d, &le);
	if (err)
		return fail(R, err, "%s", le.msg);
	R->st->ring_bytes = R->ring.len;
	return 0;
}

/* nth threads sharing one populate walk; returns how many started. */
static int start_populate(struct populate *pp, pthread_t *th, int nth)
{
	int n = 0;

	for (; n < nth; n++)
		if (pthread_create(&th[n], NULL, populate_thread, pp))
			break;
	return n;
}

static void point_tensors(struct run *R)
{
	const struct q3_load_plan *P = &R->plan;
	uint8_t *vram = R->h2d ? R->ops->vram(R->h2d) : NULL;

	for (size_t i = 0; i < P->n_ext; i++) {
		const struct q3_extent *x = &P->ext[i];
		for (size_t k = x->first; k < x->first + x->n; k++) {
			struct q3_tensor *t = &R->ck->tensors[P->order[k]];
			if (x->home == Q3_HOME_VRAM) {
				t->data = NULL;
				t->dev = vram + x->dst + (t->off - x->astart);
			} else if (R->o.io == Q3_IO_MMAP) {
				t->data = (uint8_t *)R->f[x->shard].map + t->off;
				t->dev = NULL;
			} else {
				t->data = (uint8_t *)R->arena.ptr + x->dst + (t->off - x->astart);
				t->dev = NULL;
			}
		}
	}
}

static void describe(struct run *R, const char *engine)
{
	struct q3_load_stats *st = R->st;
	char rq[32];

	q3_fmt_bytes(R->o.req_bytes, rq, sizeof(rq));
	if (R->o.io == Q3_IO_MMAP) {
		snprintf(st->path, sizeof(st->path), "mmap: RAM homes are the page cache (%d files)%s%s",
			 R->ck->nshards, R->plan.vram_bytes ? "; VRAM via " : "", R->plan.vram_bytes ? engine : "");
		return;
	}
	snprintf(st->path, sizeof(st->path),
		 "%s, %d x %s in %d lane%s: O_DIRECT %d files, buffered %d (%d cached); fixed buffers %s", engine,
		 !strncmp(engine, "io_uring", 8) ? R->o.qd : R->o.threads, rq, R->o.lanes, R->o.lanes > 1 ? "s" : "",
		 st->files_direct,
		 st->files_buffered, st->files_cached, R->fixed_note[0] ? R->fixed_note : "not used");
}

#if !defined(__SANITIZE_ADDRESS__) && defined(__has_feature)
#if __has_feature(address_sanitizer)
#define __SANITIZE_ADDRESS__ 1
#endif
#endif
#ifdef __SANITIZE_ADDRESS__
#include <dirent.h>
/* LeakSanitizer stops the world with ptrace and crashes ("Tracer caught signal 11") on io_uring's
 * worker threads (iou-wrk-*), which outlive io_uring_queue_exit for a moment.  In sanitizer
 * builds only, wait (at most 2 s) until they are gone so that a leak check at exit can run. */
static void wait_io_workers_gone(void)
{
	for (int tries = 0; tries < 200; tries++) {
		DIR *d = opendir("/proc/self/task");
		struct dirent *de;
		bool busy = false;

		if (!d)
			return;
		while (!busy && (de = readdir(d))) {
			char p[64], comm[32] = "";
			FILE *f;

			snprintf(p, sizeof(p), "/proc/self/task/%.20s/comm", de->d_name);
			f = fopen(p, "r");
			if (f) {
				busy = fgets(comm, sizeof(comm), f) && !strncmp(comm, "iou-", 4);
				fclose(f);
			}
		}
		closedir(d);
		if (!busy)
			return;
		usleep(10000);
	}
}
#else
static void wait_io_workers_gone(void)
{
}
#endif

int q3_load(struct q3_ckpt *ck, const struct q3_load_opts *opts, struct q3_load **out,
	    struct q3_load_stats *st_out, q3_err *e)
{
	struct run R = { .ck = ck, .mu = PTHREAD_MUTEX_INITIALIZER, .e = e };
	struct q3_load_stats st_local, *st = st_out ? st_out : &st_local;
	struct q3_load_opts zero = { .node = -1 };
	struct io_uring ring;
	bool have_ring = false;
	struct populate pop = { 0 };
	pthread_t pth[16];
	int npop = 0, err;
	double t0 = q3_now(), t1, tr;
	char engine[48] = "threads";

	*out = NULL;
	memset(st, 0, sizeof(*st));
	R.o = opts ? *opts : zero;
	R.ops = R.o.h2d_ops ? R.o.h2d_ops : &q3_h2d_cuda;
	R.st = st;
	defaults(&R.o);
	err = q3_load_plan_build(ck, R.o.home, R.o.req_bytes, &R.plan, e);
	if (!err && (err = q3_load_plan_interleave(&R.plan, R.o.lanes, e)))
		q3_load_plan_free(&R.plan);
	if (err)
		return err;
	st->nextents = R.plan.n_ext;
	for (size_t i = 0; i < R.plan.n_ext; i++)
		for (size_t k = R.plan.ext[i].first; k < R.plan.ext[i].first + R.plan.ext[i].n; k++) {
			uint64_t nb = ck->tensors[R.plan.order[k]].nbytes;
			*(R.plan.ext[i].home == Q3_HOME_VRAM ? &st->bytes_vram : &st->bytes_ram) += nb;
		}
	st->bytes = st->bytes_ram + st->bytes_vram;

	if (open_files(&R) || alloc_homes(&R))
		goto out;
	st->arena_bytes = R.arena.len;
	snprintf(st->mem, sizeof(st->mem), "%s", R.o.io == Q3_IO_MMAP ? "page cache (mapped)" :
		 R.arena.len ? R.arena.provider : "none");
	if (R.o.engine != Q3_ENGINE_THREADS) {
		err = uring_setup(&R, &ring);
		if (!err) {
			have_ring = true;
			snprintf(engine, sizeof(engine), "io_uring");
		} else if (R.o.engine == Q3_ENGINE_URING) {
			fail(&R, err, "io_uring: %s", strerror(-err));
			goto out;
		} else {
			snprintf(engine, sizeof(engine), "threads (io_uring: %s)", strerror(-err));
		}
	}
	if (!have_ring && R.o.threads <= 0)
		R.o.threads = q3_ncpu();
	t1 = q3_now();
	st->t_alloc = t1 - t0;

	/* how the arena gets faulted in; in MMAP mode the page cache gets mapped instead */
	{
		int nth = R.o.threads > 0 ? R.o.threads : q3_ncpu();
		enum q3_prefault pf = R.o.prefault;

		if (pf == Q3_PREFAULT_AUTO)
			pf = st->files_direct ? Q3_PREFAULT_OVERLAP : Q3_PREFAULT_FIRST;
		if (R.arena.populated || !R.arena.len)
			pf = Q3_PREFAULT_OFF;
		st->prefault = R.arena.populated ? "none: a pool" : pf == Q3_PREFAULT_OVERLAP ? "overlap" :
			       pf == Q3_PREFAULT_FIRST ? "first" : "off";
		if (R.o.io == Q3_IO_MMAP)
			npop = Q3_MIN((int)Q3_ARRAY_SIZE(pth), nth);
		else if (pf == Q3_PREFAULT_OVERLAP)
			npop = Q3_MIN((int)Q3_ARRAY_SIZE(pth), Q3_MAX(1, nth / 2));
		if (pf == Q3_PREFAULT_FIRST && R.o.io != Q3_IO_MMAP) {
			double tp = q3_now();
			prefault(&R, R.arena.ptr, R.arena.len, nth);
			st->t_populate = q3_now() - tp;
		}
	}
	tr = q3_now(); /* the reads (or the mapping) start */
	{
		uint64_t total = R.plan.read_bytes;
		if (R.o.io == Q3_IO_MMAP) /* whole files mapped, plus the reads of VRAM extents */
			for (int s = 0; s < ck->nshards; s++)
				total += ck->shards[s].size;
		q3_progress_begin(&R.prog, "load", total, R.o.progress);
	}
	if (R.o.io == Q3_IO_MMAP) {
		/* MADV_POPULATE_READ maps the cached pages (reading any missing ones), file by file,
		 * several threads per file */
		for (int s = 0; s < ck->nshards && !failed(&R); s++) {
			struct populate pp = { .R = &R, .base = R.f[s].map, .len = ck->shards[s].size,
					       .advice = MADV_POPULATE_READ };
			int n = start_populate(&pp, pth, npop);
			if (!n)
				populate_thread(&pp);
			for (int i = 0; i < n; i++)
				pthread_join(pth[i], NULL);
			q3_progress_add(&R.prog, ck->shards[s].size);
		}
		st->bytes_mapped = st->bytes_ram;
		npop = 0;
	} else if (npop) {
		pop = (struct populate){ .R = &R, .base = R.arena.ptr, .len = R.arena.len,
					 .advice = MADV_POPULATE_WRITE };
		npop = start_populate(&pop, pth, npop);
	}
	if (have_ring)
		run_uring(&R, &ring);
	else
		run_threads(&R);
	st->t_io = q3_now() - tr;
	__atomic_store_n(&R.reads_done, true, __ATOMIC_RELAXED);
	for (int i = 0; i < npop; i++)
		pthread_join(pth[i], NULL);
	if (npop && pop.t_end > 0 && R.o.io != Q3_IO_MMAP)
		st->t_populate = pop.t_end - tr;
	if (R.h2d && !R.err) {
		double t2 = q3_now();
		q3_err ce;
		if ((err = R.ops->finish(R.h2d, &ce)))
			fail(&R, err, "%s", ce.msg);
		st->t_drain = q3_now() - t2;
	}
	q3_progress_end(&R.prog);
	st->retries = R.retries;
	st->nreq = R.plan.n_req;
	for (size_t i = 0; i < R.plan.n_req; i++) {
		const struct q3_lreq *r = &R.plan.req[i];
		uint64_t n = req_expect(&R, r);
		if (req_skipped(&R, r))
			continue;
		st->bytes_read += n;
		*(R.f[ext_of(&R, r)->shard].direct ? &st->bytes_direct : &st->bytes_buffered) += n;
	}
	describe(&R, engine);
out:
	if (have_ring) {
		io_uring_queue_exit(&ring);
		wait_io_workers_gone();
	}
	close_files(&R);
	if (!R.err) {
		struct q3_load *ld = calloc(1, sizeof(*ld));
		if (ld && R.o.io == Q3_IO_MMAP) {
			ld->maps = calloc((size_t)ck->nshards, sizeof(void *));
			ld->map_len = calloc((size_t)ck->nshards, sizeof(uint64_t));
			if (!ld->maps || !ld->map_len) {
				free(ld->maps), free(ld->map_len), free(ld);
				ld = NULL;
			}
		}
		if (!ld) {
			fail(&R, -ENOMEM, "out of memory");
		} else {
			point_tensors(&R);
			ld->arena = R.arena, ld->ring = R.ring, ld->h2d = R.h2d, ld->ops = R.ops;
			ld->arena_borrowed = R.o.arena != NULL;
			if (R.o.io == Q3_IO_MMAP) {
				ld->nmaps = ck->nshards;
				for (int s = 0; s < ck->nshards; s++) {
					ld->maps[s] = R.f[s].map;
					ld->map_len[s] = ck->shards[s].size;
					R.f[s].map = NULL;
				}
			}
			/* ld owns them now: host_free below must see nothing (it frees mb, not ptr) */
			memset(&R.arena, 0, sizeof(R.arena));
			memset(&R.ring, 0, sizeof(R.ring));
			R.h2d = NULL;
			*out = ld;
		}
	}
	if (R.h2d)
		R.ops->close(R.h2d, 0);
	host_free(&R.ring);
	if (!R.o.arena)
		host_free(&R.arena);
	for (int s = 0; R.f && s < ck->nshards; s++)
		if (R.f[s].map)
			munmap(R.f[s].map, ck->shards[s].size);
	free(R.f);
	free(R.slot);
	q3_load_plan_free(&R.plan);
	st->t_total = q3_now() - t0;
	return R.err;
}
