/* loader.h - a checkpoint's bytes into their homes at the speed of the disk (or of memory, when the
 * files are already in the page cache).
 *
 * 1. place   every tensor has a home: pinned RAM (on NUMA node K) or VRAM.  The caller says which
 *            (q3_load_place gives the default policy for a VRAM budget; the CUDA backend will pass
 *            its own plan).
 * 2. plan    tensors sorted by (file, offset) are merged into extents of one home (safetensors
 *            tiles its data section, so an extent is one contiguous file range); each extent's
 *            read range is widened to 4 KiB boundaries (safetensors data is not aligned, O_DIRECT
 *            needs it) and cut into requests of req_bytes.  RAM extents get a place in one host
 *            arena whose 4 KiB alignment matches the file's, so that tensors land at
 *            arena + (offset - aligned start): no CPU copy, a tensor's RAM home is where it landed.
 *            VRAM extents get a place in one VRAM arena, laid out the same way.
 * 3. read    io_uring keeps qd requests in flight: O_DIRECT for files that are not in the page
 *            cache, buffered reads punted to io-wq workers (parallel copies out of the page cache)
 *            for files that are (mincore decides per file).  Short reads and -EAGAIN are requeued;
 *            EIO or a file that ends early is an error naming the file and offset.  A pool of
 *            pread threads does the same where io_uring is unavailable (or when asked).
 * 4. copy    requests of VRAM extents land in a small pinned ring of slots; each completed slot
 *            is copied to the VRAM arena asynchronously on one of several CUDA streams, overlapping
 *            the reads, and the slot is reused once its copy is done.
 *
 * After q3_load, tensor->data points at every RAM-home tensor's bytes and tensor->dev at every
 * VRAM-home tensor's device copy (tensor->data NULL).  Both keep the file's alignment modulo
 * 4096.  The memory stays valid until q3_load_free.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "checkpoint.h"
#include "util.h"

struct q3_h2d_ops;

enum q3_home { Q3_HOME_RAM = 0, Q3_HOME_VRAM = 1 };

enum q3_io_mode {
	Q3_IO_AUTO,	/* per file: O_DIRECT when cold, buffered when mostly cached */
	Q3_IO_DIRECT,	/* O_DIRECT for every file (buffered where the file system refuses it) */
	Q3_IO_BUFFERED, /* page-cache reads for every file */
	Q3_IO_MMAP,	/* RAM homes ARE the page cache: the files are mapped and populated, nothing is
			 * copied; zero-copy for a warm start, but not pinned memory */
};

enum q3_io_engine { Q3_ENGINE_AUTO, Q3_ENGINE_URING, Q3_ENGINE_THREADS };

/* Faulting in the arena the loader allocates (zeroing its pages: in a VM, also the host backing
 * them) is work of its own, done with MADV_POPULATE_WRITE in parallel threads. */
enum q3_prefault {
	Q3_PREFAULT_AUTO,    /* OVERLAP when some file is read from the disk, FIRST when all come
			      * from the page cache (then memory is the bottleneck twice over) */
	Q3_PREFAULT_OVERLAP, /* half the threads fault ahead of the reads, beside them */
	Q3_PREFAULT_FIRST,   /* every thread faults the whole arena, then the reads start */
	Q3_PREFAULT_OFF,     /* the reads fault their pages themselves */
};

struct q3_load_opts {
	const uint8_t *home;	 /* [ck->ntensors] enum q3_home, in ck->tensors order; NULL: all RAM */
	int node;		 /* NUMA node of the RAM homes; -1: wherever the kernel puts them */
	int gpu;		 /* CUDA device of the VRAM homes */
	enum q3_io_mode io;
	enum q3_io_engine engine;
	uint32_t req_bytes;	 /* bytes per read request, a multiple of 4 KiB; 0: 8 MiB */
	int qd;			 /* requests in flight; 0: 32 */
	int lanes;		 /* sequential streams the requests are interleaved from; 0: 1 */
	int threads;		 /* pread threads (thread engine), io-wq workers, populate threads;
				  * 0: online CPUs */
	int ring_slots;		 /* VRAM staging ring: slots of req_bytes; 0: qd + 8 */
	int streams;		 /* CUDA streams for the copies; 0: 4 */
	double cached_min;	 /* AUTO: read a file buffered when at least this fraction of its pages
				  * is cached; 0: 0.5 */
	void *arena;		 /* host memory for the RAM homes from the caller (a pinned, pre-faulted
				  * pool: q3_load_ram_bytes says how much, 4 KiB aligned); NULL: the
				  * loader allocates it (and faults it in while reading) */
	size_t arena_len;
	bool register_arena;	 /* io_uring fixed buffers for the RAM arena too (pins it all up front,
				  * which faults it in one thread: only worth it for a pre-faulted pool) */
	bool no_register;	 /* no fixed buffers at all */
	enum q3_prefault prefault;
	bool progress;		 /* progress line on stderr when it is a terminal */
	/* The host-to-device copy engine for VRAM homes (kernels/load_gpu.h); NULL: CUDA.  Tests
	 * pass a fake that keeps "VRAM" in host memory. */
	const struct q3_h2d_ops *h2d_ops;
	/* Test hook: sees every completed read (shard, file offset, bytes asked, result: bytes or
	 * -errno) and returns the result the loader acts on, so that tests can inject short reads,
	 * -EAGAIN and -EIO at the completion layer.  Called one at a time (under a lock). */
	int (*fault)(void *ctx, int shard, uint64_t off, uint32_t len, int res);
	void *fault_ctx;
};

struct q3_load_stats {
	uint64_t bytes;		 /* tensor bytes placed */
	uint64_t bytes_ram, bytes_vram;
	uint64_t bytes_read;	 /* bytes read from files, alignment over-read included */
	uint64_t bytes_direct, bytes_buffered, bytes_mapped;
	uint64_t arena_bytes;	 /* host arena size */
	uint64_t ring_bytes;
	size_t nextents, nreq;
	uint64_t retries;	 /* short reads and -EAGAIN requeued */
	int files_direct, files_buffered, files_cached;
	double t_alloc;		 /* host + VRAM arenas, ring, CUDA setup */
	double t_io;		 /* first submit to last read done */
	double t_drain;		 /* last read done to last VRAM copy done */
	double t_populate;	 /* prefault: its time (FIRST, part of t_total) or when it caught up
				  * with the end of the arena (OVERLAP; 0 when the reads finished first) */
	const char *prefault;	 /* what was done: "overlap", "first", "off", "pool" */
	double t_total;		 /* q3_load call: weights ready */
	char path[256];		 /* what was done, one line */
	char mem[320];		 /* where the host arena came from */
};

struct q3_load;

/* Loads every tensor of ck into its home.  Returns 0, or -errno with one line naming the file and
 * offset (I/O), the tensor (placement), or the resource (memory, CUDA) at fault; on failure
 * nothing stays allocated and the tensors' pointers are left as they were (set only on success). */
int q3_load(struct q3_ckpt *ck, const struct q3_load_opts *o, struct q3_load **out,
	    struct q3_load_stats *st, q3_err *e);
/* Frees the arenas (the tensors' data / dev pointers dangle afterwards: clear them first if the
 * checkpoint lives on). */
void q3_load_free(struct q3_load *ld);

/* Copies n bytes of VRAM at dev (a tensor->dev) back to host memory: for checks and tests. */
int q3_load_read_vram(struct q3_load *ld, const void *dev, void *dst, size_t n, q3_err *e);

/* Default placement for a VRAM budget: every tensor that is not a routed expert's (in file
 * order), then routed experts layer by layer, whole experts at a time, while the budget lasts;
 * the rest stays in RAM.  home has ck->ntensors entries.  Returns the bytes placed in VRAM. */
uint64_t q3_load_place(const struct q3_ckpt *ck, uint64_t vram_budget, uint8_t *home);

/* CUDA devices usable for VRAM homes (0 in a CPU-only build or without a GPU). */
int q3_load_gpus(void);

/* Bytes of host arena the RAM homes of this placement need (home NULL: all RAM). */
uint64_t q3_load_ram_bytes(const struct q3_ckpt *ck, const uint8_t *home);

/* ---- the plan (exposed for tests) ---------------------------------------------------------- */

#define Q3_LOAD_ALIGN 4096u

struct q3_extent {
	int shard;
	enum q3_home home;
	uint64_t start, end;   /* tensor bytes [start, end) of the file */
	uint64_t astart, aend; /* the read range: 4 KiB aligned, aend capped at the aligned file end */
	uint64_t dst;	       /* arena (RAM) or VRAM offset of astart: a multiple of 4 KiB */
	size_t first, n;       /* tensors order[first .. first + n) */
};

struct q3_lreq {
	uint32_t ext;  /* extent index */
	uint32_t len;  /* bytes asked (the last request of a file may get fewer: the file ends) */
	uint64_t off;  /* file offset, 4 KiB aligned */
};

struct q3_load_plan {
	size_t n_ext, n_req;
	struct q3_extent *ext;
	size_t *order;	     /* tensor indices sorted by (shard, offset) */
	struct q3_lreq *req; /* shard by shard, in file order; or lanes of that interleaved */
	uint64_t ram_bytes, vram_bytes; /* arena sizes */
	uint64_t read_bytes;
};

/* Builds the plan.  home: as in q3_load_opts (NULL: all RAM).  Returns 0 or -ENOMEM. */
int q3_load_plan_build(const struct q3_ckpt *ck, const uint8_t *home, uint32_t req_bytes,
		       struct q3_load_plan *p, q3_err *e);
void q3_load_plan_free(struct q3_load_plan *p);
/* Cuts the requests into `lanes` runs of about equal bytes, each in file order, and takes them
 * round robin: several sequential streams at once, as parallel `dd`s read, which some disks
 * (virtual ones backed by a host's files) serve faster than one deep stream.  0 or -EINVAL. */
#define Q3_LOAD_MAX_LANES 64
int q3_load_plan_interleave(struct q3_load_plan *p, int lanes, q3_err *e);
