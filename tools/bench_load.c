/* bench_load.c - `qwen3d bench load`: time to weights-ready, next to the baselines measured in the
 * same run on the same files.
 *
 *   qwen3d bench load --model DIR [--cold] [--vram-budget X] [--csv F] [options]
 *
 * Rows (each preceded by a page-cache drop with --cold; after a warming read otherwise):
 *   raw O_DIRECT xN      N threads, each reading whole files sequentially in 16 MiB O_DIRECT reads
 *                        into a reused buffer: `dd iflag=direct bs=16M`, N in parallel, except
 *                        that the buffers sit on huge pages (as the loader's arena does: with
 *                        4 KiB pages a virtio disk gets many small requests and dd is slower
 *                        than the disk)
 *   raw O_DIRECT x32 ranges  32 threads over 256 MiB ranges: 32 reads in flight (the disk's
 *                        limit where it wants a deep queue)
 *   buffered read() xN   the same through the page cache, files cut in 256 MiB ranges
 *   mmap + copy xN       mmap + memcpy of 16 MiB pieces into a reused buffer
 *   safetensors peer     python3 safetensors.torch.load_file(f, device="cuda") per shard, where
 *                        python3 has torch (with a GPU) and safetensors; skipped with a reason
 *   qwen3d loader        q3_load into its homes (RAM arena; VRAM within --vram-budget), one row
 *                        per --loader-io mode, with its stages
 * Bytes are file bytes for the baselines and tensor bytes for the loader (the headers, ~0.1%,
 * are the difference); the comparison that matters is time to the same weights.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "cli.h"
#include "loader.h"
#include "memprov.h"

#define RAW_BUF (16u << 20)
#define RANGE (256ull << 20)

struct bench {
	struct q3_ckpt *ck;
	bool cold, global_drop, quiet;
	int verify;		/* 0 off, 1 sampled, 2 full */
	uint64_t vram_budget;
	uint8_t *home;
	struct q3_membuf pool; /* --pool: a populated arena (memprov) handed to every loader row */
	uint64_t file_bytes;
	FILE *csv;
	double best_raw;	/* fastest raw read of the files, seconds */
	int loads;		/* loader rows run so far */
	char best_raw_name[48];
	int failures;
};

/* ---- page cache ----------------------------------------------------------------------------- */

static double file_cached(const char *path, uint64_t size)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = (size_t)((size + pg - 1) / pg), hit = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	unsigned char *vec = n ? malloc(n) : NULL;
	void *m = MAP_FAILED;

	if (fd >= 0 && n)
		m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (m != MAP_FAILED && vec && !mincore(m, size, vec))
		for (size_t i = 0; i < n; i++)
			hit += vec[i] & 1;
	if (m != MAP_FAILED)
		munmap(m, size);
	if (fd >= 0)
		close(fd);
	free(vec);
	return n ? (double)hit / (double)n : 1.0;
}

/* Fraction of the model's file bytes in the page cache. */
static double cached(const struct bench *B)
{
	double c = 0;

	for (int s = 0; s < B->ck->nshards; s++)
		c += file_cached(B->ck->shards[s].path, B->ck->shards[s].size) * (double)B->ck->shards[s].size;
	return B->file_bytes ? c / (double)B->file_bytes : 1.0;
}

static bool write_sysctl(const char *path, const char *v)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	bool ok = fd >= 0 && write(fd, v, strlen(v)) == (ssize_t)strlen(v);

	if (fd >= 0)
		close(fd);
	return ok;
}

/* Drops the model's pages from the page cache: POSIX_FADV_DONTNEED per file (clean pages, any
 * user), then, if pages remain and we may, the global drop_caches.  note says what worked. */
static bool drop(struct bench *B, char *note, size_t len)
{
	double left;

	if (!B->global_drop)
		for (int s = 0; s < B->ck->nshards; s++) {
			int fd = open(B->ck->shards[s].path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			fdatasync(fd);
			posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
			close(fd);
		}
	left = B->global_drop ? 1.0 : cached(B);
	if (left > 0.01) {
		sync();
		if (write_sysctl("/proc/sys/vm/drop_caches", "3")) {
			left = cached(B);
			snprintf(note, len, "cold: drop_caches, %.1f%% still cached", 100 * left);
			return left <= 0.01;
		}
		snprintf(note, len, "NOT cold: %.1f%% still cached (fadvise left pages; drop_caches needs root)",
			 100 * left);
		return false;
	}
	snprintf(note, len, "cold: posix_fadvise(DONTNEED) per file, %.1f%% cached", 100 * left);
	return true;
}

/* ---- raw reads (the baselines) -------------------------------------------------------------- */

enum raw_mode { RAW_DIRECT, RAW_BUFFERED, RAW_MMAP };

struct raw {
	const struct q3_ckpt *ck;
	enum raw_mode mode;
	bool whole_files;	/* one unit per file (dd-like), else RANGE units */
	size_t nunits, next;	/* atomic next */
	int *ushard;
	uint64_t *uoff;
	int err;
	char msg[300];
	pthread_mutex_t mu;
};

static void raw_fail(struct raw *R, int err, const char *path, uint64_t off)
{
	pthread_mutex_lock(&R->mu);
	if (!R->err) {
		R->err = err;
		snprintf(R->msg, sizeof(R->msg), "%s: read at %" PRIu64 ": %s", path, off, strerror(-err));
	}
	pthread_mutex_unlock(&R->mu);
}

/* Reads [off, end) of one file into buf, RAW_BUF at a time. */
static void raw_range(struct raw *R, int s, uint64_t off, uint64_t end, uint8_t *buf)
{
	const struct q3_shard *sh = &R->ck->shards[s];
	int fd = open(sh->path, O_RDONLY | O_CLOEXEC | (R->mode == RAW_DIRECT ? O_DIRECT : 0));

	if (fd < 0 && R->mode == RAW_DIRECT && errno == EINVAL)
		fd = open(sh->path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		raw_fail(R, -errno, sh->path, off);
		return;
	}
	if (R->mode == RAW_MMAP) {
		uint8_t *m = mmap(NULL, end - off, PROT_READ, MAP_SHARED, fd, (off_t)off);
		if (m == MAP_FAILED) {
			raw_fail(R, -errno, sh->path, off);
		} else {
			for (uint64_t p = 0; p < end - off; p += RAW_BUF)
				memcpy(buf, m + p, Q3_MIN(RAW_BUF, end - off - p));
			munmap(m, end - off);
		}
	} else {
		while (off < end) {
			ssize_t n = pread(fd, buf, RAW_BUF, (off_t)off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				raw_fail(R, n < 0 ? -errno : -EIO, sh->path, off);
				break;
			}
			off += (uint64_t)n;
		}
	}
	close(fd);
}

struct raw_worker {
	struct raw *R;
	struct q3_membuf buf;
};

static void *raw_thread(void *arg)
{
	struct raw_worker *w = arg;
	struct raw *R = w->R;

	for (;;) {
		size_t i = __atomic_fetch_add(&R->next, 1, __ATOMIC_RELAXED);
		int s;
		uint64_t off, end;

		if (i >= R->nunits || R->err)
			break;
		s = R->ushard[i];
		off = R->uoff[i];
		end = R->whole_files ? R->ck->shards[s].size : Q3_MIN(off + RANGE, R->ck->shards[s].size);
		raw_range(R, s, off, end, w->buf.ptr);
	}
	return NULL;
}

/* Seconds to read every file with nthreads threads, or -1 (msg says why). */
static double raw_read(const struct q3_ckpt *ck, enum raw_mode mode, bool whole_files, int nthreads,
		       char *msg, size_t len)
{
	struct raw R = { .ck = ck, .mode = mode, .whole_files = whole_files,
			 .mu = PTHREAD_MUTEX_INITIALIZER };
	pthread_t *th = calloc((size_t)nthreads, sizeof(*th));
	struct raw_worker *w = calloc((size_t)nthreads, sizeof(*w));
	size_t cap = 0;
	double t0;
	int started = 0, nbuf = 0;
	q3_err e;

	for (int s = 0; s < ck->nshards; s++)
		cap += whole_files ? 1 : (size_t)((ck->shards[s].size + RANGE - 1) / RANGE);
	R.ushard = calloc(cap + 1, sizeof(int));
	R.uoff = calloc(cap + 1, sizeof(uint64_t));
	/* read buffers on huge pages, like the loader's arena: with 4 KiB pages an O_DIRECT read
	 * becomes many small device requests (a virtio disk's segment limit) and the baseline, not
	 * the disk, would be the slow part; made (and faulted in) before the clock starts */
	for (; th && w && nbuf < nthreads; nbuf++)
		if (q3_mem_alloc(RAW_BUF, -1, Q3_MEM_NO_KMOD, &w[nbuf].buf, &e))
			break;
	if (!th || !w || !R.ushard || !R.uoff || nbuf < nthreads) {
		for (int i = 0; i < nbuf; i++)
			q3_mem_free(&w[i].buf);
		free(th), free(w), free(R.ushard), free(R.uoff);
		snprintf(msg, len, "out of memory");
		return -1;
	}
	for (int s = 0; s < ck->nshards; s++)
		for (uint64_t off = 0; off < ck->shards[s].size; off += whole_files ? ck->shards[s].size : RANGE) {
			R.ushard[R.nunits] = s;
			R.uoff[R.nunits++] = off;
		}
	t0 = q3_now();
	for (; started < nthreads; started++) {
		w[started].R = &R;
		if (pthread_create(&th[started], NULL, raw_thread, &w[started]))
			break;
	}
	for (int i = 0; i < started; i++)
		pthread_join(th[i], NULL);
	t0 = q3_now() - t0;
	for (int i = 0; i < nbuf; i++)
		q3_mem_free(&w[i].buf);
	free(th), free(w), free(R.ushard), free(R.uoff);
	if (R.err || !started) {
		snprintf(msg, len, "%s", started ? R.msg : "cannot start threads");
		return -1;
	}
	return t0;
}

/* ---- output ----------------------------------------------------------------------------------- */

static void row(struct bench *B, const char *method, uint64_t bytes, double secs, const char *notes)
{
	const char *cache = B->cold ? "cold" : "warm";

	if (secs < 0) {
		printf("%-28s %9s %8s   %s\n", method, "-", "-", notes);
		if (B->csv)
			fprintf(B->csv, "\"%s\",%s,%" PRIu64 ",,,\"%s\"\n", method, cache, bytes, notes);
		return;
	}
	printf("%-28s %9.2f %8.2f   %s\n", method, secs, (double)bytes / 1e9 / secs, notes);
	if (B->csv)
		fprintf(B->csv, "\"%s\",%s,%" PRIu64 ",%.4f,%.4f,\"%s\"\n", method, cache, bytes, secs,
			(double)bytes / 1e9 / secs, notes);
	fflush(stdout);
}

static void prepare_cache(struct bench *B, char *note, size_t len)
{
	if (B->cold) {
		drop(B, note, len);
		return;
	}
	if (cached(B) < 0.99) { /* warm it: one buffered pass */
		char msg[300];
		raw_read(B->ck, RAW_BUFFERED, false, q3_ncpu(), msg, sizeof(msg));
	}
	snprintf(note, len, "warm: %.1f%% cached", 100 * cached(B));
}

/* whole_files: one thread per file at a time, sequential (dd); else 256 MiB ranges of the files
 * shared by all threads (fio-like: nthreads reads in flight). */
static void bench_raw(struct bench *B, enum raw_mode mode, bool whole_files, int nthreads)
{
	static const char *const names[] = { "raw O_DIRECT", "buffered read()", "mmap + copy" };
	char method[48], note[200], msg[300];
	double t;

	snprintf(method, sizeof(method), "%s x%d%s", names[mode], nthreads,
		 whole_files || mode != RAW_DIRECT ? "" : " ranges");
	prepare_cache(B, note, sizeof(note));
	t = raw_read(B->ck, mode, whole_files, nthreads, msg, sizeof(msg));
	if (t < 0) {
		row(B, method, B->file_bytes, -1, msg);
		B->failures++;
		return;
	}
	if (t < B->best_raw || !B->best_raw) {
		B->best_raw = t;
		snprintf(B->best_raw_name, sizeof(B->best_raw_name), "%s", method);
	}
	snprintf(note + strlen(note), sizeof(note) - strlen(note), "; %s",
		 whole_files ? "whole files, 16 MiB reads (dd iflag=direct bs=16M)" :
		 "256 MiB ranges, 16 MiB pieces");
	row(B, method, B->file_bytes, t, note);
}

/* ---- the safetensors peer ----------------------------------------------------------------- */

static const char peer_py[] =
	"import sys, time\n"
	"try:\n"
	"    import torch\n"
	"    from safetensors.torch import load_file\n"
	"except Exception as ex:\n"
	"    print('SKIP', type(ex).__name__, ex); sys.exit(0)\n"
	"if not torch.cuda.is_available():\n"
	"    print('SKIP torch sees no CUDA device'); sys.exit(0)\n"
	"torch.cuda.init(); torch.zeros(1, device='cuda')\n"
	"t = time.time(); n = 0\n"
	"for f in sys.argv[1:]:\n"
	"    d = load_file(f, device='cuda')\n"
	"    n += sum(v.numel() * v.element_size() for v in d.values())\n"
	"    torch.cuda.synchronize(); del d\n"
	"print('OK', n, time.time() - t)\n";

static void bench_peer(struct bench *B, int nfiles)
{
	char note[200], cmd[8192], line[512] = "";
	size_t o;
	FILE *p;
	uint64_t bytes = 0;
	double secs = -1;
	char *script = "/tmp/qwen3d-peer.py";
	FILE *f = fopen(script, "w");

	if (!f || fputs(peer_py, f) < 0) {
		if (f)
			fclose(f);
		row(B, "safetensors peer", 0, -1, "skipped: cannot write the helper script");
		return;
	}
	fclose(f);
	if (nfiles <= 0 || nfiles > B->ck->nshards)
		nfiles = B->ck->nshards;
	prepare_cache(B, note, sizeof(note));
	o = (size_t)snprintf(cmd, sizeof(cmd), "python3 %s", script);
	for (int s = 0; s < nfiles; s++) {
		if (strchr(B->ck->shards[s].path, '\'') || o + strlen(B->ck->shards[s].path) + 16 >= sizeof(cmd)) {
			row(B, "safetensors peer", 0, -1, "skipped: the shard paths do not fit a shell command");
			return;
		}
		o += (size_t)snprintf(cmd + o, sizeof(cmd) - o, " '%s'", B->ck->shards[s].path);
	}
	snprintf(cmd + o, sizeof(cmd) - o, " 2>&1");
	p = popen(cmd, "r");
	if (p) {
		char buf[512];
		while (fgets(buf, sizeof(buf), p))
			snprintf(line, sizeof(line), "%s", buf); /* the last line says */
		pclose(p);
	}
	unlink(script);
	line[strcspn(line, "\n")] = 0;
	if (sscanf(line, "OK %" SCNu64 " %lf", &bytes, &secs) != 2) {
		char why[300];
		snprintf(why, sizeof(why), "skipped: %s", !strncmp(line, "SKIP ", 5) ? line + 5 :
			 line[0] ? line : "python3 not found");
		row(B, "safetensors peer", 0, -1, why);
		return;
	}
	snprintf(note + strlen(note), sizeof(note) - strlen(note), "; load_file(device=\"cuda\"), %d of %d files",
		 nfiles, B->ck->nshards);
	row(B, "safetensors peer", bytes, secs, note);
}

/* ---- the loader ----------------------------------------------------------------------------- */

/* Compares the loaded bytes with the files: every tensor's first and last 4 KiB (sampled), or
 * every byte (full).  VRAM tensors are copied back first. */
static int verify(struct bench *B, struct q3_load *ld, q3_err *e)
{
	const struct q3_ckpt *ck = B->ck;
	size_t win = 4096, nbad = 0;
	uint8_t *a = malloc(RAW_BUF), *b = malloc(RAW_BUF);
	int *fd = calloc((size_t)ck->nshards, sizeof(int)), err = 0;

	for (int s = 0; s < ck->nshards; s++)
		fd[s] = open(ck->shards[s].path, O_RDONLY | O_CLOEXEC);
	for (size_t i = 0; i < ck->ntensors && !err && a && b; i++) {
		const struct q3_tensor *t = &ck->tensors[i];
		uint64_t step = B->verify == 2 ? RAW_BUF : Q3_MAX(t->nbytes, win);

		for (uint64_t off = 0; off < t->nbytes && !err; off += step) {
			/* sampled: the head window, then the tail window */
			for (int k = 0; k < (B->verify == 2 ? 1 : 2); k++) {
				uint64_t at = B->verify == 2 ? off : k ? (t->nbytes > win ? t->nbytes - win : 0) : 0;
				size_t n = (size_t)Q3_MIN(B->verify == 2 ? (uint64_t)RAW_BUF : win, t->nbytes - at);

				if (pread(fd[t->shard], b, n, (off_t)(t->off + at)) != (ssize_t)n) {
					err = q3_errf(e, -EIO, "verify: %s: cannot read tensor %s", ck->shards[t->shard].path, t->name);
					break;
				}
				if (t->dev) {
					if ((err = q3_load_read_vram(ld, (const uint8_t *)t->dev + at, a, n, e)))
						break;
				} else {
					memcpy(a, (const uint8_t *)t->data + at, n);
				}
				if (memcmp(a, b, n) && !nbad++)
					err = q3_errf(e, -EIO, "verify: tensor %s (%s) differs from %s at bytes %" PRIu64 "..%" PRIu64,
						      t->name, t->dev ? "VRAM" : "RAM", ck->shards[t->shard].path,
						      t->off + at, t->off + at + n);
			}
		}
	}
	for (int s = 0; s < ck->nshards; s++)
		if (fd[s] >= 0)
			close(fd[s]);
	free(fd);
	free(a);
	free(b);
	if (!err && (!a || !b))
		err = q3_errf(e, -ENOMEM, "verify: out of memory");
	return err;
}

static void bench_loader(struct bench *B, struct q3_load_opts o, const char *io_name)
{
	struct q3_load_stats st;
	struct q3_load *ld = NULL;
	char method[64], note[400], cache[200], ram[32], vram[32], ring[32];
	q3_err e;
	int err;

	const char *pool = B->pool.ptr && o.io != Q3_IO_MMAP ? ", pool" : "";

	if (o.home)
		snprintf(method, sizeof(method), "qwen3d loader (%s%s, VRAM %s)", io_name, pool,
			 q3_fmt_bytes(B->vram_budget, ram, sizeof(ram)));
	else
		snprintf(method, sizeof(method), "qwen3d loader (%s%s)", io_name, pool);
	prepare_cache(B, cache, sizeof(cache));
	o.progress = !B->quiet;
	if (B->pool.ptr && o.io != Q3_IO_MMAP) {
		o.arena = B->pool.ptr;
		o.arena_len = B->pool.len;
	}
	err = q3_load(B->ck, &o, &ld, &st, &e);
	if (err) {
		row(B, method, 0, -1, e.msg);
		B->failures++;
		return;
	}
	/* the first load of a process maps memory nobody touched yet: in a VM its first touch can
	 * cost more than the reads; later rows reuse what the kernel has already backed */
	snprintf(note, sizeof(note), "%s; %s%s", cache, B->loads++ ? "" : "first load of the process; ", st.path);
	row(B, method, st.bytes, st.t_total, note);
	if (o.io == Q3_IO_MMAP)
		printf("%-28s alloc %.2f s, map + populate + VRAM reads %.2f s, copies after the last read %.2f s\n", "",
		       st.t_alloc, st.t_io, st.t_drain);
	else
		printf("%-28s alloc %.2f s, prefault (%s) %.2f s, reads %.2f s (%.2f GB/s), copies after the last read %.2f s\n",
		       "", st.t_alloc, st.prefault, st.t_populate, st.t_io,
		       st.t_io > 0 ? (double)st.bytes_read / 1e9 / st.t_io : 0, st.t_drain);
	printf("%-28s RAM %s (%s), VRAM %s (ring %s), %zu extents, %zu requests, %" PRIu64 " requeued\n", "",
	       q3_fmt_bytes(st.bytes_ram, ram, sizeof(ram)), st.mem, q3_fmt_bytes(st.bytes_vram, vram, sizeof(vram)),
	       q3_fmt_bytes(st.ring_bytes, ring, sizeof(ring)), st.nextents, st.nreq, st.retries);
	if (B->best_raw > 0)
		printf("%-28s %.2fx the time of the best raw read (%s, %.2f s)\n", "", st.t_total / B->best_raw,
		       B->best_raw_name, B->best_raw);
	if (B->verify) {
		err = verify(B, ld, &e);
		printf("%-28s verify (%s): %s\n", "", B->verify == 2 ? "every byte" : "first and last 4 KiB of every tensor",
		       err ? e.msg : "every tensor matches the files");
		if (err)
			B->failures++;
	}
	q3_load_free(ld);
	for (size_t i = 0; i < B->ck->ntensors; i++)
		B->ck->tensors[i].data = B->ck->tensors[i].dev = NULL;
}

/* ---- the command ---------------------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: qwen3d bench load --model DIR [options]\n"
		"  --cold               drop the model's pages from the page cache before each row\n"
		"  --drop-global        drop with /proc/sys/vm/drop_caches (root) instead of per-file fadvise\n"
		"  --vram-budget SIZE   place up to SIZE of tensors in VRAM (dense first, then experts)\n"
		"  --csv FILE           append rows as CSV (method,cache,bytes,seconds,gbps,notes)\n"
		"  --only LIST          rows to run, from: direct (dd x raw-threads), direct1 (one dd),\n"
		"                       directq (32 O_DIRECT readers over 256 MiB ranges: a deep queue),\n"
		"                       buffered, mmap, peer, loader\n"
		"                       (default: direct,buffered,mmap,peer,loader)\n"
		"  --raw-threads N      threads of the raw baselines (default 4: four dd in parallel)\n"
		"  --loader-io LIST     loader modes, from auto,direct,buffered,mmap (default: auto)\n"
		"  --engine E           uring or threads (default: uring, threads where io_uring is missing)\n"
		"  --qd N               loader requests in flight (default 32)\n"
		"  --req-size SIZE      loader request size (default 8M)\n"
		"  --lanes N            sequential streams the loader's requests interleave (default 1)\n"
		"  --threads N          loader threads: pread engine, io-wq workers (default: online CPUs)\n"
		"  --streams N          CUDA streams for VRAM copies (default 4)\n"
		"  --peer-files N       the safetensors peer loads only the first N shards (default: all)\n"
		"  --prefault P         auto, overlap, first or off: how the loader faults its arena in\n"
		"  --register-arena     io_uring fixed buffers for the RAM arena too (for --pool)\n"
		"  --pool               give the loader a populated host arena from memprov (what the qwen3mm\n"
		"                       module's pool or a running daemon has); its setup is timed apart\n"
		"  --verify[=full]      compare the loaded tensors with the files (sampled, or every byte)\n"
		"  --repeat N           run the loader rows N times (default 1)\n"
		"  --quiet              no progress line\n");
}

static bool listed(const char *list, const char *item)
{
	size_t n = strlen(item);

	for (const char *p = list; p && *p;) {
		const char *c = strchr(p, ',');
		size_t l = c ? (size_t)(c - p) : strlen(p);
		if (l == n && !strncmp(p, item, n))
			return true;
		p = c ? c + 1 : NULL;
	}
	return false;
}

int cmd_bench_load(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "model", required_argument, 0, 'm' },	   { "cold", no_argument, 0, 'c' },
		{ "drop-global", no_argument, 0, 'G' },	   { "vram-budget", required_argument, 0, 'v' },
		{ "csv", required_argument, 0, 'C' },	   { "only", required_argument, 0, 'o' },
		{ "raw-threads", required_argument, 0, 'r' }, { "loader-io", required_argument, 0, 'i' },
		{ "engine", required_argument, 0, 'e' },   { "qd", required_argument, 0, 'Q' },
		{ "req-size", required_argument, 0, 'R' }, { "threads", required_argument, 0, 't' },
		{ "streams", required_argument, 0, 's' },  { "peer-files", required_argument, 0, 'p' },
		{ "verify", optional_argument, 0, 'V' },   { "repeat", required_argument, 0, 'n' },
		{ "quiet", no_argument, 0, 'q' },	   { "help", no_argument, 0, 'h' },
		{ "pool", no_argument, 0, 'P' },	   { "prefault", required_argument, 0, 'F' },
		{ "register-arena", no_argument, 0, 'A' }, { "lanes", required_argument, 0, 'L' },
		{ 0 }
	};
	struct bench B = { 0 };
	struct q3_load_opts o = { .node = -1 };
	const char *model = NULL, *only = "direct,buffered,mmap,peer,loader", *lio = "auto", *csv = NULL;
	int raw_threads = 4, peer_files = 0, repeat = 1, c, rc = 0;
	bool use_pool = false;
	uint64_t v;
	char *end, b1[32], b2[32];
	q3_err e;
	double t0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case 'm': model = optarg; break;
		case 'c': B.cold = true; break;
		case 'G': B.global_drop = true; break;
		case 'v': if (q3_parse_size(optarg, &B.vram_budget)) goto bad; break;
		case 'C': csv = optarg; break;
		case 'o': only = optarg; break;
		case 'r': raw_threads = (int)strtol(optarg, &end, 10); if (*end || raw_threads < 1 || raw_threads > 256) goto bad; break;
		case 'i': lio = optarg; break;
		case 'e':
			if (!strcmp(optarg, "uring")) o.engine = Q3_ENGINE_URING;
			else if (!strcmp(optarg, "threads")) o.engine = Q3_ENGINE_THREADS;
			else goto bad;
			break;
		case 'L': o.lanes = (int)strtol(optarg, &end, 10); if (*end || o.lanes < 1 || o.lanes > Q3_LOAD_MAX_LANES) goto bad; break;
		case 'Q': o.qd = (int)strtol(optarg, &end, 10); if (*end || o.qd < 1 || o.qd > 4096) goto bad; break;
		case 'R': if (q3_parse_size(optarg, &v) || !v || v > (1u << 30)) goto bad; o.req_bytes = (uint32_t)v; break;
		case 't': o.threads = (int)strtol(optarg, &end, 10); if (*end || o.threads < 1 || o.threads > 1024) goto bad; break;
		case 's': o.streams = (int)strtol(optarg, &end, 10); if (*end || o.streams < 1 || o.streams > 64) goto bad; break;
		case 'p': peer_files = (int)strtol(optarg, &end, 10); if (*end || peer_files < 0) goto bad; break;
		case 'V': B.verify = optarg && !strcmp(optarg, "full") ? 2 : 1; if (optarg && strcmp(optarg, "full")) goto bad; break;
		case 'n': repeat = (int)strtol(optarg, &end, 10); if (*end || repeat < 1 || repeat > 100) goto bad; break;
		case 'q': B.quiet = true; break;
		case 'P': use_pool = true; break;
		case 'A': o.register_arena = true; break;
		case 'F':
			if (!strcmp(optarg, "auto")) o.prefault = Q3_PREFAULT_AUTO;
			else if (!strcmp(optarg, "overlap")) o.prefault = Q3_PREFAULT_OVERLAP;
			else if (!strcmp(optarg, "first")) o.prefault = Q3_PREFAULT_FIRST;
			else if (!strcmp(optarg, "off")) o.prefault = Q3_PREFAULT_OFF;
			else goto bad;
			break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!model || optind < argc) {
		fprintf(stderr, "qwen3d bench load: %s\n", model ? "unexpected argument" : "--model is required");
		usage(stderr);
		return 2;
	}
	t0 = q3_now();
	if (q3_ckpt_open(model, &B.ck, &e)) {
		fprintf(stderr, "qwen3d bench load: %s\n", e.msg);
		return 1;
	}
	for (int s = 0; s < B.ck->nshards; s++)
		B.file_bytes += B.ck->shards[s].size;
	printf("model      %s: %d files, %zu tensors, %s of tensors (%.2f GB), %s on disk; headers read in %.2f s\n",
	       model, B.ck->nshards, B.ck->ntensors, q3_fmt_bytes(B.ck->total_bytes, b1, sizeof(b1)),
	       B.ck->total_bytes / 1e9, q3_fmt_bytes(B.file_bytes, b2, sizeof(b2)), q3_now() - t0);
	if (csv && !(B.csv = fopen(csv, "a"))) {
		fprintf(stderr, "qwen3d bench load: %s: %s\n", csv, strerror(errno));
		q3_ckpt_close(B.ck);
		return 1;
	}
	if (B.csv && ftell(B.csv) == 0)
		fprintf(B.csv, "method,cache,bytes,seconds,gbps,notes\n");
	B.home = calloc(B.ck->ntensors ? B.ck->ntensors : 1, 1);
	if (B.vram_budget) {
		int ngpu = q3_load_gpus();
		if (ngpu <= 0) {
			printf("vram       --vram-budget ignored: no CUDA device (everything goes to RAM)\n");
		} else {
			uint64_t placed = q3_load_place(B.ck, B.vram_budget, B.home);
			printf("vram       %s of tensors placed in VRAM (budget %s): dense first, then whole experts\n",
			       q3_fmt_bytes(placed, b1, sizeof(b1)), q3_fmt_bytes(B.vram_budget, b2, sizeof(b2)));
			o.home = B.home;
		}
	}
	if (use_pool) {
		double tp = q3_now();
		if (q3_mem_alloc(q3_load_ram_bytes(B.ck, B.home), -1, 0, &B.pool, &e)) {
			fprintf(stderr, "qwen3d bench load: --pool: %s\n", e.msg);
			free(B.home);
			q3_ckpt_close(B.ck);
			return 1;
		}
		tp = q3_now() - tp;
		printf("pool       %s from memprov (%s%s%s) in %.2f s (%.2f GB/s), before and outside the timed rows\n",
		       q3_fmt_bytes(B.pool.len, b1, sizeof(b1)), q3_mem_provider_name(B.pool.provider),
		       B.pool.note[0] ? "; " : "", B.pool.note, tp, B.pool.len / 1e9 / tp);
	}
	printf("cache      %s; %.1f%% of the files cached now\n\n", B.cold ? "cold: dropped before each row" :
	       "warm: files read into the page cache first", 100 * cached(&B));
	printf("%-28s %9s %8s   %s\n", "method", "seconds", "GB/s", "notes");
	if (listed(only, "direct"))
		bench_raw(&B, RAW_DIRECT, true, raw_threads);
	if (listed(only, "direct1"))
		bench_raw(&B, RAW_DIRECT, true, 1);
	if (listed(only, "directq"))
		bench_raw(&B, RAW_DIRECT, false, 32);
	if (listed(only, "buffered"))
		bench_raw(&B, RAW_BUFFERED, false, raw_threads);
	if (listed(only, "mmap"))
		bench_raw(&B, RAW_MMAP, false, raw_threads);
	if (listed(only, "peer"))
		bench_peer(&B, peer_files);
	if (listed(only, "loader"))
		for (int r = 0; r < repeat; r++) {
			static const char *const modes[] = { "auto", "direct", "buffered", "mmap" };
			for (size_t m = 0; m < Q3_ARRAY_SIZE(modes); m++)
				if (listed(lio, modes[m])) {
					o.io = (enum q3_io_mode)m;
					bench_loader(&B, o, modes[m]);
				}
		}
	if (B.csv)
		fclose(B.csv);
	q3_mem_free(&B.pool);
	free(B.home);
	q3_ckpt_close(B.ck);
	rc = B.failures ? 1 : 0;
	return rc;
bad:
	for (const struct option *p = lo; p->name; p++)
		if (p->val == c)
			fprintf(stderr, "qwen3d bench load: --%s: bad value '%s'\n", p->name, optarg ? optarg : "");
	return 2;
}
