/* vmtest.c - the qwen3mm checks that run inside the qemu VM (tests/kmod/run.sh builds it static).
 *
 *   vmtest gen FILE BYTES            on the host: writes the pattern file the VM's disk carries
 *   vmtest run MODULE.ko DATAFILE    in the VM, as root: loads the module and checks it
 *
 * One line per check, "ok - what" or "not ok - what: why", invalid inputs before valid ones, then
 * "# N passed, N failed" and exit 1 on any failure.  The VM has two NUMA nodes (0 and 1, 384 MiB
 * each), 16 free 2 MiB huge pages, and DATAFILE on an ext4 virtio disk.  What a kernel should do
 * is decided by its version: io_uring registered buffers on a device mapping are refused before
 * 6.5 (-EOPNOTSUPP) and accepted from 6.5 on.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <numaif.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "knobs.h"
#include "memprov.h"
#include "qwen3mm_uapi.h"

#define MiB (1ull << 20)
#define CHUNK QWEN3MM_CHUNK_SIZE
#define SYS QWEN3MM_SYSFS_DIR
#define POOL_MB 32 /* per node, at load */

static int n_pass, n_fail;
static bool expect_fixed_on_device; /* kernel >= 6.5 */
static const char *module_path, *data_path;

/* ---- reporting -------------------------------------------------------------------------- */

static bool check(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool check(bool ok, const char *fmt, ...)
{
	va_list ap;

	printf(ok ? "ok - " : "not ok - ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (ok)
		n_pass++;
	else
		n_fail++;
	return ok;
}

static const char *errname(int e)
{
	static char buf[32];

	switch (e) {
	case 0: return "0";
	case -EINVAL: return "-EINVAL";
	case -ENOMEM: return "-ENOMEM";
	case -ENOTTY: return "-ENOTTY";
	case -EFAULT: return "-EFAULT";
	case -EBUSY: return "-EBUSY";
	case -EPERM: return "-EPERM";
	case -EACCES: return "-EACCES";
	case -EAGAIN: return "-EAGAIN";
	case -EOPNOTSUPP: return "-EOPNOTSUPP";
	case -ENOENT: return "-ENOENT";
	}
	snprintf(buf, sizeof(buf), "%d", e);
	return buf;
}

/* "what -> -EINVAL"; on mismatch also what came instead */
static bool expect(int got, int want, const char *what)
{
	if (got == want)
		return check(true, "%s -> %s", what, errname(want));
	return check(false, "%s: got %s, want %s", what, errname(got), errname(want));
}

static int xioctl(int fd, unsigned long cmd, void *arg)
{
	return ioctl(fd, cmd, arg) ? -errno : 0;
}

/* ---- sysfs and module helpers ----------------------------------------------------------- */

static int sysfs_read(const char *path, char *buf, size_t n)
{
	int fd = open(path, O_RDONLY);
	ssize_t r;

	if (fd < 0)
		return -errno;
	r = read(fd, buf, n - 1);
	close(fd);
	if (r < 0)
		return -errno;
	buf[r] = 0;
	if (r && buf[r - 1] == '\n')
		buf[r - 1] = 0;
	return 0;
}

static int sysfs_write(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY);
	int ret = 0;

	if (fd < 0)
		return -errno;
	if (write(fd, val, strlen(val)) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

static long long sysfs_num(const char *path)
{
	char buf[64];

	if (sysfs_read(path, buf, sizeof(buf)))
		return -1;
	return strtoll(buf, NULL, 10);
}

struct snap {
	long long total, free, used, held, buffers;
};

static struct snap pool_snap(const char *dir)
{
	char p[128];
	struct snap s;

	snprintf(p, sizeof(p), "%s/total_bytes", dir);
	s.total = sysfs_num(p);
	snprintf(p, sizeof(p), "%s/free_bytes", dir);
	s.free = sysfs_num(p);
	snprintf(p, sizeof(p), "%s/used_bytes", dir);
	s.used = sysfs_num(p);
	snprintf(p, sizeof(p), "%s/held_bytes", dir);
	s.held = sysfs_num(p);
	s.buffers = sysfs_num(SYS "/buffers");
	return s;
}

static bool snap_eq(struct snap a, struct snap b)
{
	return a.total == b.total && a.free == b.free && a.used == b.used && a.held == b.held &&
	       a.buffers == b.buffers;
}

static int load_module(const char *params)
{
	int fd = open(module_path, O_RDONLY | O_CLOEXEC);
	int ret = 0;

	if (fd < 0)
		return -errno;
	if (syscall(SYS_finit_module, fd, params, 0))
		ret = -errno;
	close(fd);
	return ret;
}

static int unload_module(void)
{
	return syscall(SYS_delete_module, "qwen3mm", O_NONBLOCK) ? -errno : 0;
}

static int dev_open(void)
{
	return open(QWEN3MM_DEVICE, O_RDWR | O_CLOEXEC);
}

/* Allocates on fd; returns 0 and fills a, or -errno. */
static int dev_alloc(int fd, uint64_t size, uint32_t node, uint32_t flags, struct qwen3mm_alloc *a)
{
	memset(a, 0, sizeof(*a));
	a->size = size;
	a->node = node;
	a->flags = flags;
	return xioctl(fd, QWEN3MM_IOC_ALLOC, a);
}

static int dev_free(int fd, uint64_t handle)
{
	struct qwen3mm_free f = { .handle = handle };

	return xioctl(fd, QWEN3MM_IOC_FREE, &f);
}

static void *dev_map(int fd, const struct qwen3mm_alloc *a, size_t len, uint64_t off)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, a->mmap_offset + off);

	return p == MAP_FAILED ? NULL : p;
}

static int map_err(int fd, uint64_t off, size_t len, int flags)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, off);

	if (p != MAP_FAILED) {
		munmap(p, len);
		return 0;
	}
	return -errno;
}

/* ---- data patterns ---------------------------------------------------------------------- */

static uint64_t pat(uint64_t i)
{
	uint64_t z = i + 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* word k of p holds pat(first + k) */
static void fill(void *p, size_t len, uint64_t first)
{
	uint64_t *w = p;

	for (size_t k = 0; k < len / 8; k++)
		w[k] = pat(first + k);
}

static bool matches(const void *p, size_t len, uint64_t first)
{
	const uint64_t *w = p;

	for (size_t k = 0; k < len / 8; k++)
		if (w[k] != pat(first + k))
			return false;
	return true;
}

static bool all_zero(const void *p, size_t len)
{
	const uint64_t *w = p;

	for (size_t k = 0; k < len / 8; k++)
		if (w[k])
			return false;
	return true;
}

static int gen(const char *path, const char *bytes)
{
	size_t n = strtoull(bytes, NULL, 0), chunk = 1 << 20;
	uint64_t *buf = malloc(chunk);
	FILE *f = fopen(path, "wb");

	if (!buf || !f || n % chunk)
		return fprintf(stderr, "vmtest gen: cannot write %s (%s bytes)\n", path, bytes), 1;
	for (size_t off = 0; off < n; off += chunk) {
		fill(buf, chunk, off / 8);
		if (fwrite(buf, 1, chunk, f) != chunk)
			return fprintf(stderr, "vmtest gen: %s: %s\n", path, strerror(errno)), 1;
	}
	free(buf);
	return fclose(f) ? 1 : 0;
}

/* ---- phase 1: loading ------------------------------------------------------------------- */

static void test_load(void)
{
	struct stat st;
	char params[64];

	expect(load_module("pool_mb=abc"), -EINVAL, "insmod pool_mb=abc");
	expect(load_module("nodes=5"), -EINVAL, "insmod nodes=5 (no such node)");
	expect(load_module("nodes=0-x"), -EINVAL, "insmod nodes=0-x");
	expect(load_module("pool_mb=100000 nodes=0"), -EINVAL,
	       "insmod pool_mb=100000 (more than the node has)");
	expect(load_module("pool_mb=18446744073709551615"), -EINVAL, "insmod pool_mb=2^64-1");
	check(stat(SYS, &st) && errno == ENOENT, "failed loads leave no %s", SYS);
	snprintf(params, sizeof(params), "pool_mb=%d nodes=0-1 debug_ioctls=1", POOL_MB);
	if (!expect(load_module(params), 0, "insmod qwen3mm pool_mb=32 nodes=0-1 debug_ioctls=1"))
		exit(1);
	check(!stat(QWEN3MM_DEVICE, &st) && S_ISCHR(st.st_mode) && (st.st_mode & 0777) == 0660,
	      "%s is a character device, mode 0660", QWEN3MM_DEVICE);
}

/* ---- phase 2: sysfs --------------------------------------------------------------------- */

struct bad_write {
	const char *file, *value;
};

static void test_sysfs(void)
{
	static const struct bad_write bad[] = {
		{ "knobs/read_chunk_kb", "0" },         { "knobs/read_chunk_kb", "3" },
		{ "knobs/read_chunk_kb", "1000" },      { "knobs/read_chunk_kb", "2097152" },
		{ "knobs/read_chunk_kb", "abc" },       { "knobs/read_chunk_kb", "-8" },
		{ "knobs/read_chunk_kb", "\n" },        { "knobs/read_chunk_kb", "4096x" },
		{ "knobs/queue_depth", "0" },           { "knobs/queue_depth", "4097" },
		{ "knobs/queue_depth", "99999999999" }, { "knobs/vram_budget_mb", "16777217" },
		{ "knobs/vram_budget_mb", "-1" },       { "knobs/expert_cache_policy", "fifo" },
		{ "knobs/expert_cache_policy", "\n" },  { "knobs/expert_cache_policy", "lru lfu" },
		{ "knobs/cpu_expert_threads", "4097" }, { "knobs/cpu_expert_threads", "1.5" },
		{ "node0/pool_mb", "abc" },             { "node0/pool_mb", "-2" },
		{ "node0/pool_mb", "99999999" },        { "node1/pool_mb", "\n" },
		{ "node0/pool_mb", "17592186044415" },  { "node0/pool_mb", "18446744073709551615" },
		{ "node0/pool_mb", "18446744073709551616" },
	};
	static const struct bad_write good[] = {
		{ "knobs/read_chunk_kb", "4096" },        { "knobs/queue_depth", "4096" },
		{ "knobs/vram_budget_mb", "20480" },      { "knobs/cpu_expert_threads", "12" },
		{ "knobs/read_chunk_kb", "1048576" },     { "knobs/queue_depth", "1" },
	};
	static const char *const knobs[] = { "knobs/read_chunk_kb", "knobs/queue_depth",
		"knobs/vram_budget_mb", "knobs/expert_cache_policy", "knobs/cpu_expert_threads" };
	static const char *const defaults[] = { "8192", "32", "0", "[lru] lfu static", "0" };
	char path[128], before[64], after[64];
	struct snap s = pool_snap(SYS);
	struct q3_knobs k;
	q3_err e = { "" };
	int ret;

	sysfs_read(SYS "/version", before, sizeof(before));
	check(!strcmp(before, "1.0"), "sysfs version reads 1.0 (%s)", before);
	check(s.total == 2 * POOL_MB * MiB && s.free == s.total && !s.used && !s.held && !s.buffers,
	      "pool after load: total %lld free %lld used %lld held %lld buffers %lld", s.total,
	      s.free, s.used, s.held, s.buffers);
	for (int n = 0; n < 2; n++) {
		snprintf(path, sizeof(path), SYS "/node%d", n);
		s = pool_snap(path);
		snprintf(path, sizeof(path), SYS "/node%d/pool_mb", n);
		check(s.total == POOL_MB * MiB && s.free == s.total && sysfs_num(path) == POOL_MB,
		      "node%d pool: total %lld free %lld pool_mb %lld", n, s.total, s.free, sysfs_num(path));
	}
	check(sysfs_num(SYS "/alloc_failures") == 0 && sysfs_num(SYS "/peak_bytes") == 0,
	      "alloc_failures and peak_bytes start at 0");
	for (size_t i = 0; i < Q3_ARRAY_SIZE(knobs); i++) {
		snprintf(path, sizeof(path), SYS "/%s", knobs[i]);
		sysfs_read(path, before, sizeof(before));
		check(!strcmp(before, defaults[i]), "%s defaults to '%s' (%s)", knobs[i], defaults[i], before);
	}

	for (size_t i = 0; i < Q3_ARRAY_SIZE(bad); i++) {
		snprintf(path, sizeof(path), SYS "/%s", bad[i].file);
		sysfs_read(path, before, sizeof(before));
		ret = sysfs_write(path, bad[i].value);
		sysfs_read(path, after, sizeof(after));
		check(ret == -EINVAL && !strcmp(before, after), "write '%s' to %s -> %s, unchanged (%s)",
		      strcmp(bad[i].value, "\n") ? bad[i].value : "\\n", bad[i].file, errname(ret), after);
	}
	expect(sysfs_write(SYS "/total_bytes", "0"), -EACCES, "write to read-only total_bytes");
	expect(sysfs_write(SYS "/node0/free_bytes", "0"), -EACCES, "write to read-only node0/free_bytes");

	for (size_t i = 0; i < Q3_ARRAY_SIZE(good); i++) {
		snprintf(path, sizeof(path), SYS "/%s", good[i].file);
		sysfs_write(path, good[i].value);
		sysfs_read(path, after, sizeof(after));
		check(!strcmp(after, good[i].value), "write %s to %s reads back", good[i].value, good[i].file);
	}
	sysfs_write(SYS "/knobs/expert_cache_policy", "lfu\n");
	sysfs_read(SYS "/knobs/expert_cache_policy", after, sizeof(after));
	check(!strcmp(after, "lru [lfu] static"), "expert_cache_policy takes 'lfu' (%s)", after);
	sysfs_write(SYS "/knobs/expert_cache_policy", "static");
	ret = q3_knobs_read(NULL, &k, &e);
	check(!ret && k.present == Q3_KNOB_ALL && k.read_chunk_kb == 1048576 && k.queue_depth == 1 &&
	      k.vram_budget_mb == 20480 && k.cpu_expert_threads == 12 &&
	      k.expert_cache_policy == Q3_CACHE_STATIC,
	      "userspace knobs reader sees what was written (%s)", ret ? e.msg : "all 5 present");
	for (size_t i = 0; i < Q3_ARRAY_SIZE(knobs); i++) {
		snprintf(path, sizeof(path), SYS "/%s", knobs[i]);
		sysfs_write(path, i == 3 ? "lru" : defaults[i]);
	}

	expect(sysfs_write(SYS "/node0/pool_mb", "48"), 0, "grow node0 pool to 48 MiB");
	check(sysfs_num(SYS "/node0/total_bytes") == 48 * MiB && sysfs_num(SYS "/total_bytes") ==
	      (48 + POOL_MB) * MiB, "node0 total 48 MiB, pool total 80 MiB");
	expect(sysfs_write(SYS "/node0/pool_mb", "33"), 0, "resize node0 to 33 MiB");
	check(sysfs_num(SYS "/node0/pool_mb") == 34, "33 MiB rounds up to 34 (%lld)",
	      sysfs_num(SYS "/node0/pool_mb"));
	expect(sysfs_write(SYS "/node0/pool_mb", "32"), 0, "shrink node0 back to 32 MiB");
	check(sysfs_num(SYS "/node0/free_bytes") == 32 * MiB, "node0 free is 32 MiB again");
}

/* udev/qwen3mm-knobs against the real sysfs: good lines applied, bad ones reported */
static void test_udev_helper(void)
{
	static const char conf[] = "# test\nqueue_depth=64\nexpert_cache_policy=static\n"
				   "read_chunk_kb=1000\nbogus=1\nnode1/pool_mb=36\nno equals sign\n";
	char policy[64];
	FILE *f = fopen("/tmp/qwen3mm.conf", "w");
	int status;

	if (!check(f && fputs(conf, f) >= 0 && !fclose(f), "write a qwen3mm.conf for the udev helper"))
		return;
	status = system("QWEN3MM_CONF=/tmp/qwen3mm.conf /qwen3mm-knobs 2>/tmp/knobs.err");
	check(WIFEXITED(status) && WEXITSTATUS(status) == 1,
	      "udev helper exits 1 when a line is refused (%d)", status);
	sysfs_read(SYS "/knobs/expert_cache_policy", policy, sizeof(policy));
	check(sysfs_num(SYS "/knobs/queue_depth") == 64 && !strcmp(policy, "lru lfu [static]") &&
	      sysfs_num(SYS "/node1/pool_mb") == 36,
	      "udev helper applied the good lines (queue_depth, policy, node1/pool_mb)");
	check(sysfs_num(SYS "/knobs/read_chunk_kb") == 8192,
	      "the module refused read_chunk_kb=1000 and kept 8192");
	status = system("grep -q \"refused '1000'\" /tmp/knobs.err && grep -q \"unknown name 'bogus'\" "
			"/tmp/knobs.err && grep -q 'not NAME=VALUE' /tmp/knobs.err");
	check(WIFEXITED(status) && !WEXITSTATUS(status), "udev helper names each refused line");
	sysfs_write(SYS "/knobs/queue_depth", "32");
	sysfs_write(SYS "/knobs/expert_cache_policy", "lru");
	sysfs_write(SYS "/node1/pool_mb", "32");
}

/* ---- phase 3: invalid ioctls and mmaps -------------------------------------------------- */

static void test_bad_ioctls(int fd)
{
	struct qwen3mm_alloc a;
	struct qwen3mm_query q = { 0 };
	struct qwen3mm_node_info ni = { 0 };
	struct qwen3mm_debug_pin pin = { 0 };
	static const uint64_t handles[] = { 0, 1, QWEN3MM_MAX_HANDLE + 1, UINT64_MAX };
	long long failures = sysfs_num(SYS "/alloc_failures");
	struct snap s0 = pool_snap(SYS);
	char big[64] = { 0 };
	void *p;

	expect(xioctl(fd, _IO(QWEN3MM_IOC_MAGIC, 0x7f), NULL), -ENOTTY, "unknown ioctl number");
	expect(xioctl(fd, _IOR('x', 0x00, struct qwen3mm_version), big), -ENOTTY,
	       "ioctl of another magic");
	expect(xioctl(fd, _IOR(QWEN3MM_IOC_MAGIC, 0x00, big), big), -ENOTTY,
	       "GET_VERSION with a wrong size");
	expect(xioctl(fd, _IOWR(QWEN3MM_IOC_MAGIC, 0x01, uint64_t), big), -ENOTTY,
	       "ALLOC with a wrong size");
	expect(xioctl(fd, QWEN3MM_IOC_GET_VERSION, NULL), -EFAULT, "GET_VERSION to NULL");
	expect(xioctl(fd, QWEN3MM_IOC_ALLOC, NULL), -EFAULT, "ALLOC from NULL");
	expect(xioctl(fd, QWEN3MM_IOC_ALLOC, (void *)8), -EFAULT, "ALLOC from address 8");

	expect(dev_alloc(fd, 0, 0, 0, &a), -EINVAL, "ALLOC size 0");
	expect(dev_alloc(fd, QWEN3MM_MAX_BUFFER_SIZE + 1, 0, 0, &a), -EINVAL, "ALLOC size 1 TiB + 1");
	expect(dev_alloc(fd, UINT64_MAX, 0, 0, &a), -EINVAL,
	       "ALLOC size 2^64-1 (rounding would overflow)");
	expect(dev_alloc(fd, CHUNK, 0, 0x2, &a), -EINVAL, "ALLOC unknown flag 0x2");
	expect(dev_alloc(fd, CHUNK, 0, 0x80000000u, &a), -EINVAL, "ALLOC unknown flag 0x80000000");
	expect(dev_alloc(fd, CHUNK, 2, 0, &a), -EINVAL, "ALLOC node 2 (no such node)");
	expect(dev_alloc(fd, CHUNK, 1023, 0, &a), -EINVAL, "ALLOC node 1023");
	expect(dev_alloc(fd, CHUNK, 0x7fffffff, 0, &a), -EINVAL, "ALLOC node 2^31-1");
	expect(dev_alloc(fd, CHUNK, 0xfffffffe, 0, &a), -EINVAL, "ALLOC node 2^32-2");
	check(sysfs_num(SYS "/alloc_failures") == failures, "argument errors are not counted as failures");
	expect(dev_alloc(fd, 64 * MiB, 0, 0, &a), -ENOMEM, "ALLOC 64 MiB (no node has it)");
	expect(dev_alloc(fd, 34 * MiB, 1, QWEN3MM_ALLOC_EXACT_NODE, &a), -ENOMEM,
	       "ALLOC 34 MiB exactly on node 1 (32 MiB pool)");
	check(sysfs_num(SYS "/alloc_failures") == failures + 2 &&
	      sysfs_num(SYS "/node1/alloc_failures") == 1,
	      "alloc_failures counts both (%lld), node1 one", sysfs_num(SYS "/alloc_failures"));

	for (size_t i = 0; i < Q3_ARRAY_SIZE(handles); i++) {
		q.handle = handles[i];
		expect(xioctl(fd, QWEN3MM_IOC_QUERY, &q), -EINVAL, "QUERY of a handle never given");
		expect(dev_free(fd, handles[i]), -EINVAL, "FREE of a handle never given");
	}
	ni.node = 2;
	expect(xioctl(fd, QWEN3MM_IOC_NODE_INFO, &ni), -EINVAL, "NODE_INFO node 2");
	ni.node = UINT32_MAX;
	expect(xioctl(fd, QWEN3MM_IOC_NODE_INFO, &ni), -EINVAL, "NODE_INFO node 2^32-1");
	ni.node = 0;
	ni.reserved = 1;
	expect(xioctl(fd, QWEN3MM_IOC_NODE_INFO, &ni), -EINVAL, "NODE_INFO reserved != 0");

	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = 4096, .flags = 0x4 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN unknown flag");
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = 4096, .reserved = 1 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN reserved != 0");
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = 0 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN size 0");
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p + 1, .size = 4096 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN unaligned address");
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = 100 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN size not a page multiple");
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = QWEN3MM_DEBUG_PIN_MAX + 4096 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN more than 1 GiB");
	pin = (struct qwen3mm_debug_pin){ .addr = UINT64_MAX & ~4095ull, .size = 8192 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EINVAL, "DEBUG_PIN range wrapping past 2^64");
	pin = (struct qwen3mm_debug_pin){ .addr = 4096, .size = 4096 };
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_PIN, &pin), -EFAULT, "DEBUG_PIN of unmapped address 4096");
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_UNPIN, NULL), -EINVAL, "DEBUG_UNPIN with nothing pinned");
	munmap(p, 4096);

	expect(map_err(fd, 0, CHUNK, MAP_SHARED), -EINVAL, "mmap offset 0 (no buffer 0)");
	expect(map_err(fd, 7ull << QWEN3MM_MMAP_SHIFT, CHUNK, MAP_SHARED), -EINVAL,
	       "mmap of a handle never given");
	if (!expect(dev_alloc(fd, 2 * CHUNK, 0, 0, &a), 0, "ALLOC 4 MiB for the mmap checks"))
		return;
	expect(map_err(fd, a.mmap_offset, CHUNK, MAP_PRIVATE), -EINVAL, "mmap MAP_PRIVATE");
	expect(map_err(fd, a.mmap_offset, 3 * CHUNK, MAP_SHARED), -EINVAL, "mmap 6 MiB of a 4 MiB buffer");
	expect(map_err(fd, a.mmap_offset + 2 * CHUNK, 4096, MAP_SHARED), -EINVAL,
	       "mmap starting at the buffer's end");
	expect(map_err(fd, a.mmap_offset + CHUNK, 2 * CHUNK, MAP_SHARED), -EINVAL,
	       "mmap running past the buffer's end");
	expect(dev_free(fd, a.handle), 0, "FREE the 4 MiB buffer");
	expect(dev_free(fd, a.handle), -EINVAL, "FREE it twice");
	expect(map_err(fd, a.mmap_offset, CHUNK, MAP_SHARED), -EINVAL, "mmap after FREE");
	check(snap_eq(pool_snap(SYS), s0), "pool accounting unchanged by the invalid calls");
}

/* ---- phase 4: valid buffers ------------------------------------------------------------- */

static int node_of(void *addr)
{
	int status = -1;

	if (move_pages(0, 1, &addr, NULL, &status, 0))
		return -errno;
	return status;
}

static void test_buffers(int fd)
{
	struct qwen3mm_version v = { 0 };
	struct qwen3mm_query q = { 0 };
	struct qwen3mm_node_info ni = { .node = 1 };
	struct qwen3mm_alloc a, b;
	const size_t len = 2 * CHUNK;
	char *p, *p2;
	bool on1 = true;

	expect(xioctl(fd, QWEN3MM_IOC_GET_VERSION, &v), 0, "GET_VERSION");
	check(v.version == QWEN3MM_VERSION && v.chunk_shift == 21 && v.max_buffer_size ==
	      QWEN3MM_MAX_BUFFER_SIZE && v.nr_node_ids >= 2 && v.debug == 1,
	      "version %u.%u chunk_shift %u nr_node_ids %u debug %u", v.version >> 16,
	      v.version & 0xffff, v.chunk_shift, v.nr_node_ids, v.debug);

	if (!expect(dev_alloc(fd, 3 * MiB, 1, 0, &a), 0, "ALLOC 3 MiB on node 1"))
		return;
	check(a.alloc_size == len && a.alloc_node == 1 && a.handle >= 1 &&
	      a.mmap_offset == a.handle << QWEN3MM_MMAP_SHIFT && !a.reserved,
	      "rounded to %llu bytes on node %u, handle %llu", (unsigned long long)a.alloc_size,
	      a.alloc_node, (unsigned long long)a.handle);
	q.handle = a.handle;
	expect(xioctl(fd, QWEN3MM_IOC_QUERY, &q), 0, "QUERY it");
	check(q.size == len && q.node == 1 && q.mmap_offset == a.mmap_offset && q.map_count == 0,
	      "QUERY: size %llu node %u map_count %u", (unsigned long long)q.size, q.node, q.map_count);
	expect(xioctl(fd, QWEN3MM_IOC_NODE_INFO, &ni), 0, "NODE_INFO node 1");
	check(ni.total_bytes == POOL_MB * MiB && ni.used_bytes == len && ni.free_bytes ==
	      POOL_MB * MiB - len && !ni.held_bytes, "node 1: used %llu free %llu",
	      (unsigned long long)ni.used_bytes, (unsigned long long)ni.free_bytes);
	check(sysfs_num(SYS "/node1/used_bytes") == (long long)len && sysfs_num(SYS "/buffers") == 1,
	      "sysfs: node1 used_bytes %lld, buffers %lld", sysfs_num(SYS "/node1/used_bytes"),
	      sysfs_num(SYS "/buffers"));

	p = dev_map(fd, &a, len, 0);
	if (!check(p != NULL, "mmap the whole buffer"))
		return;
	expect(xioctl(fd, QWEN3MM_IOC_QUERY, &q), 0, "QUERY while mapped");
	check(q.map_count == 1, "map_count 1 (%u)", q.map_count);
	check(all_zero(p, len), "a new buffer reads as zeros");
	fill(p, len, 1000);
	check(matches(p, len, 1000), "written pattern reads back");
	for (size_t off = 0; off < len; off += 64 * 1024)
		on1 &= node_of(p + off) == 1;
	check(on1, "move_pages: every page is on node 1 (first: %d)", node_of(p));

	check(!madvise(p, MiB, MADV_DONTNEED) && matches(p, len, 1000),
	      "MADV_DONTNEED then read: the fault handler maps the same pages back");
	p2 = dev_map(fd, &a, CHUNK, CHUNK);
	check(p2 && matches(p2, CHUNK, 1000 + CHUNK / 8),
	      "a second mapping of the buffer's second half shares its pages");
	if (p2)
		munmap(p2, CHUNK);
	check(!munmap(p + MiB, MiB), "munmap 1 MiB in the middle");
	expect(xioctl(fd, QWEN3MM_IOC_QUERY, &q), 0, "QUERY after the split");
	check(q.map_count == 2, "map_count 2 after the split (%u)", q.map_count);
	check(matches(p, MiB, 1000) && matches(p + 2 * MiB, len - 2 * MiB, 1000 + 2 * MiB / 8),
	      "both pieces still hold the pattern");

	expect(dev_free(fd, a.handle), 0, "FREE while mapped");
	check(sysfs_num(SYS "/buffers") == 1 && sysfs_num(SYS "/node1/used_bytes") == (long long)len,
	      "the mappings keep the buffer");
	munmap(p, MiB);
	munmap(p + 2 * MiB, len - 2 * MiB);
	check(sysfs_num(SYS "/buffers") == 0 && sysfs_num(SYS "/node1/used_bytes") == 0 &&
	      sysfs_num(SYS "/node1/free_bytes") == POOL_MB * MiB,
	      "unmapping the last piece returns the chunks to node 1");
	check(sysfs_num(SYS "/peak_bytes") >= (long long)len, "peak_bytes remembers %zu (%lld)", len,
	      sysfs_num(SYS "/peak_bytes"));

	/* nearest node: node 1 short, node 0 has room */
	expect(dev_alloc(fd, 20 * MiB, 1, QWEN3MM_ALLOC_EXACT_NODE, &a), 0,
	       "ALLOC 20 MiB exactly on node 1");
	expect(dev_alloc(fd, 20 * MiB, 1, QWEN3MM_ALLOC_EXACT_NODE, &b), -ENOMEM,
	       "ALLOC 20 MiB more exactly on node 1");
	if (expect(dev_alloc(fd, 20 * MiB, 1, 0, &b), 0, "ALLOC 20 MiB more on node 1 or nearest"))
		check(b.alloc_node == 0, "it came from node 0 (%u)", b.alloc_node);
	dev_free(fd, b.handle);
	if (expect(dev_alloc(fd, CHUNK, QWEN3MM_NODE_ANY, 0, &b), 0, "ALLOC on NODE_ANY"))
		dev_free(fd, b.handle);

	/* the chunks written above come back zeroed to the next user */
	p = dev_map(fd, &a, 20 * MiB, 0);
	check(p && all_zero(p, 20 * MiB), "20 MiB of reused chunks read as zeros");
	if (p) {
		fill(p, 20 * MiB, 7);
		munmap(p, 20 * MiB);
	}
	dev_free(fd, a.handle);
	if (expect(dev_alloc(fd, POOL_MB * MiB, 1, QWEN3MM_ALLOC_EXACT_NODE, &a), 0,
		   "ALLOC all of node 1")) {
		p = dev_map(fd, &a, POOL_MB * MiB, 0);
		check(p && all_zero(p, POOL_MB * MiB), "all of node 1 reads as zeros after reuse");
		if (p)
			munmap(p, POOL_MB * MiB);
		dev_free(fd, a.handle);
	}
}

/* ---- phase 5: I/O into the mapping ------------------------------------------------------ */

static int uring_read(struct io_uring *ring, int dfd, char *p, size_t len, bool fixed)
{
	const size_t piece = MiB;
	struct io_uring_cqe *cqe;
	int n = 0, ret = 0;

	for (size_t off = 0; off < len; off += piece) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

		if (fixed)
			io_uring_prep_read_fixed(sqe, dfd, p + off, piece, off, 0);
		else
			io_uring_prep_read(sqe, dfd, p + off, piece, off);
		n++;
	}
	if (io_uring_submit(ring) != n)
		return -EIO;
	while (n--) {
		if (io_uring_wait_cqe(ring, &cqe))
			return -EIO;
		if (cqe->res != (int)piece && !ret)
			ret = cqe->res < 0 ? cqe->res : -EIO;
		io_uring_cqe_seen(ring, cqe);
	}
	return ret;
}

static void test_io(int fd)
{
	const size_t len = 4 * MiB;
	struct io_uring ring;
	struct qwen3mm_alloc a;
	struct iovec iov;
	char *p, *h;
	int dfd, ret;

	dfd = open(data_path, O_RDONLY | O_DIRECT);
	if (!check(dfd >= 0, "open %s with O_DIRECT", data_path))
		return;
	if (!expect(dev_alloc(fd, len, 0, 0, &a), 0, "ALLOC 4 MiB for I/O"))
		return;
	p = dev_map(fd, &a, len, 0);
	if (!check(p != NULL, "mmap it"))
		return;

	check(pread(dfd, p, len, 0) == (ssize_t)len && matches(p, len, 0),
	      "O_DIRECT pread of 4 MiB from the virtio disk into the mapping");
	memset(p, 0, len);
	ret = io_uring_queue_init(16, &ring, 0);
	if (!expect(ret, 0, "io_uring_queue_init"))
		return;
	ret = uring_read(&ring, dfd, p, len, false);
	check(!ret && matches(p, len, 0), "io_uring READ (O_DIRECT) into the mapping: %s, data %s",
	      errname(ret), matches(p, len, 0) ? "correct" : "WRONG");

	memset(p, 0, len);
	iov = (struct iovec){ .iov_base = p, .iov_len = len };
	ret = io_uring_register_buffers(&ring, &iov, 1);
	if (expect_fixed_on_device) {
		expect(ret, 0, "io_uring_register_buffers on the mapping (kernel >= 6.5 accepts)");
		if (!ret) {
			ret = uring_read(&ring, dfd, p, len, true);
			check(!ret && matches(p, len, 0), "io_uring READ_FIXED into the mapping: %s",
			      errname(ret));
			/* a registration pins the chunks past munmap and FREE */
			munmap(p, len);
			dev_free(fd, a.handle);
			check(sysfs_num(SYS "/node0/held_bytes") == (long long)len &&
			      sysfs_num(SYS "/buffers") == 0,
			      "freed while registered: 4 MiB held, not reused (%lld)",
			      sysfs_num(SYS "/node0/held_bytes"));
			io_uring_unregister_buffers(&ring);
			check(sysfs_num(SYS "/node0/held_bytes") == 0 &&
			      sysfs_num(SYS "/node0/free_bytes") == POOL_MB * MiB,
			      "unregistering returns them to the pool");
			p = NULL;
		}
	} else {
		expect(ret, -EOPNOTSUPP, "io_uring_register_buffers on the mapping (kernel < 6.5 refuses)");
	}
	if (p) {
		munmap(p, len);
		dev_free(fd, a.handle);
	}

	h = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (check(h != MAP_FAILED, "MAP_HUGETLB 4 MiB (control)")) {
		iov = (struct iovec){ .iov_base = h, .iov_len = len };
		ret = io_uring_register_buffers(&ring, &iov, 1);
		expect(ret, 0, "io_uring_register_buffers on hugetlb memory");
		if (!ret) {
			ret = uring_read(&ring, dfd, h, len, true);
			check(!ret && matches(h, len, 0), "io_uring READ_FIXED into hugetlb memory: %s",
			      errname(ret));
			io_uring_unregister_buffers(&ring);
		}
		munmap(h, len);
	}
	io_uring_queue_exit(&ring);
	close(dfd);
}

/* ---- phase 6: the userspace provider on top of the module ------------------------------- */

static void test_memprov(void)
{
	static const struct {
		unsigned flags;
		enum q3_mem_provider want;
	} cases[] = {
		{ Q3_MEM_NO_KMOD, Q3_MEM_HUGETLB },
		{ Q3_MEM_NO_KMOD | Q3_MEM_NO_HUGETLB, Q3_MEM_THP },
		{ Q3_MEM_NO_KMOD | Q3_MEM_NO_HUGETLB | Q3_MEM_NO_THP, Q3_MEM_PLAIN },
	};
	struct snap s0 = pool_snap(SYS);
	struct q3_mem_placement pl;
	struct q3_membuf b;
	q3_err e = { "" };
	int ret;

	ret = q3_mem_alloc(5 * MiB, 1, 0, &b, &e);
	if (check(!ret && b.provider == Q3_MEM_KMOD && b.len == 6 * MiB,
		  "memprov 5 MiB on node 1 -> %s, %zu bytes (%s)", q3_mem_provider_name(b.provider),
		  b.len, ret ? e.msg : "ok")) {
		ret = q3_mem_nodes_of(&b, &pl, &e);
		check(!ret && pl.main_node == 1 && pl.nr_nodes == 1 && !pl.missing,
		      "memprov read-back: %lu samples, all on node %d", pl.samples, pl.main_node);
		check(b.fixed_io == (expect_fixed_on_device ? 1 : 0),
		      "memprov probe: io_uring %s the kmod buffer", b.fixed_io ? "registers" : "refuses");
		check(sysfs_num(SYS "/node1/used_bytes") == 6 * (long long)MiB &&
		      sysfs_num(SYS "/buffers") == 1, "the pool shows the provider's buffer");
		q3_mem_free(&b);
	}
	ret = q3_mem_alloc(5 * MiB, 1, Q3_MEM_FIXED_IO, &b, &e);
	if (expect_fixed_on_device)
		check(!ret && b.provider == Q3_MEM_KMOD && b.fixed_io == 1,
		      "memprov with FIXED_IO on >= 6.5 stays on kmod (%s)", q3_mem_provider_name(b.provider));
	else
		check(!ret && b.provider == Q3_MEM_HUGETLB && b.fixed_io == 1 &&
		      strstr(b.note, "kmod: io_uring refuses"),
		      "memprov with FIXED_IO on < 6.5 falls back to %s (%s)",
		      q3_mem_provider_name(b.provider), b.note);
	if (!ret) {
		ret = q3_mem_nodes_of(&b, &pl, &e);
		check(!ret && pl.main_node == 1 && pl.nr_nodes == 1,
		      "its pages are on node %d", pl.main_node);
		q3_mem_free(&b);
	}
	for (size_t i = 0; i < Q3_ARRAY_SIZE(cases); i++) {
		ret = q3_mem_alloc(5 * MiB, 1, cases[i].flags, &b, &e);
		if (!check(!ret && b.provider == cases[i].want, "memprov flags 0x%x -> %s (%s)",
			   cases[i].flags, q3_mem_provider_name(cases[i].want),
			   ret ? e.msg : q3_mem_provider_name(b.provider)))
			continue;
		ret = q3_mem_nodes_of(&b, &pl, &e);
		check(!ret && pl.main_node == 1 && pl.on_node[1] == pl.samples,
		      "%s: %lu of %lu samples on node 1", q3_mem_provider_name(b.provider),
		      pl.on_node[1], pl.samples);
		check(all_zero(b.ptr, b.len) && b.fixed_io == 1, "%s: zeroed, io_uring registers it",
		      q3_mem_provider_name(b.provider));
		q3_mem_free(&b);
	}
	check(snap_eq(pool_snap(SYS), s0), "the pool is back where it was after the provider checks");
}

/* ---- phase 7: long-term pins ------------------------------------------------------------ */

static void test_pins(int fd)
{
	const size_t len = 2 * CHUNK;
	struct qwen3mm_debug_pin pin;
	struct qwen3mm_alloc a, big;
	int fd2 = dev_open();
	char *p;

	if (!expect(dev_alloc(fd, len, 0, QWEN3MM_ALLOC_EXACT_NODE, &a), 0, "ALLOC 4 MiB to pin"))
		return;
	p = dev_map(fd, &a, len, 0);
	if (!check(p != NULL, "mmap it"))
		return;
	fill(p, len, 99);
	pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = len,
		.flags = QWEN3MM_PIN_WRITE | QWEN3MM_PIN_LONGTERM };
	expect(xioctl(fd2, QWEN3MM_IOC_DEBUG_PIN, &pin), 0,
	       "pin_user_pages_fast(FOLL_WRITE | FOLL_LONGTERM) on the mapping (cudaHostRegister's pin)");
	check(pin.pinned == len / 4096, "all %zu pages pinned (%llu)", len / 4096,
	      (unsigned long long)pin.pinned);
	expect(xioctl(fd2, QWEN3MM_IOC_DEBUG_PIN, &pin), -EBUSY, "a second DEBUG_PIN on the same file");
	check(matches(p, len, 99), "the pinned mapping still reads the pattern");

	munmap(p, len);
	dev_free(fd, a.handle);
	check(sysfs_num(SYS "/buffers") == 0 && sysfs_num(SYS "/node0/used_bytes") == 0 &&
	      sysfs_num(SYS "/node0/held_bytes") == (long long)len &&
	      sysfs_num(SYS "/node0/free_bytes") == POOL_MB * MiB - (long long)len,
	      "buffer gone while pinned: its 4 MiB are held, not free");
	expect(dev_alloc(fd, POOL_MB * MiB, 0, QWEN3MM_ALLOC_EXACT_NODE, &big), -ENOMEM,
	       "ALLOC all of node 0 while chunks are pinned");
	expect(xioctl(fd2, QWEN3MM_IOC_DEBUG_UNPIN, NULL), 0, "DEBUG_UNPIN");
	check(sysfs_num(SYS "/node0/held_bytes") == 0 &&
	      sysfs_num(SYS "/node0/free_bytes") == POOL_MB * MiB, "unpinned chunks rejoin the pool");
	if (expect(dev_alloc(fd, POOL_MB * MiB, 0, QWEN3MM_ALLOC_EXACT_NODE, &big), 0,
		   "ALLOC all of node 0 after the unpin")) {
		p = dev_map(fd, &big, POOL_MB * MiB, 0);
		check(p && all_zero(p, POOL_MB * MiB), "the once-pinned chunks come back zeroed");
		if (p) {
			pin = (struct qwen3mm_debug_pin){ .addr = (uintptr_t)p, .size = 8 * MiB,
				.flags = QWEN3MM_PIN_WRITE };
			expect(xioctl(fd2, QWEN3MM_IOC_DEBUG_PIN, &pin), 0, "short-term pin (FOLL_WRITE) works too");
			munmap(p, POOL_MB * MiB);
		}
		dev_free(fd, big.handle);
	}
	close(fd2); /* drops the short-term pin: close releases what DEBUG_PIN held */
	check(sysfs_num(SYS "/node0/held_bytes") == 0 && sysfs_num(SYS "/buffers") == 0,
	      "closing the pinning file releases its pins");
}

/* ---- phase 8: lifetime across exit, SIGKILL, fork; rmmod -------------------------------- */

/* child: allocates and maps 8 MiB on node 1, closes the fd, tells the parent, then acts */
static void child_holder(int ready, bool exit_now)
{
	struct qwen3mm_alloc a;
	int fd = dev_open();
	char *p;

	if (fd < 0 || dev_alloc(fd, 8 * MiB, 1, 0, &a) || !(p = dev_map(fd, &a, 8 * MiB, 0)))
		_exit(3);
	fill(p, 8 * MiB, 5);
	close(fd);
	if (exit_now)
		_exit(0);
	if (write(ready, "x", 1) != 1)
		_exit(4);
	for (;;)
		pause();
}

static void test_lifetime(int fd)
{
	struct snap s0 = pool_snap(SYS);
	struct qwen3mm_alloc a;
	int pfd[2], status;
	char c;
	pid_t pid;
	char *p;

	pid = fork();
	if (!pid)
		child_holder(-1, true);
	waitpid(pid, &status, 0);
	check(WIFEXITED(status) && !WEXITSTATUS(status) && snap_eq(pool_snap(SYS), s0),
	      "a process that exits with a mapping gives its buffer back");

	if (pipe(pfd))
		return;
	pid = fork();
	if (!pid)
		child_holder(pfd[1], false);
	if (read(pfd[0], &c, 1) != 1)
		c = 0;
	check(c == 'x' && sysfs_num(SYS "/buffers") == 1 &&
	      sysfs_num(SYS "/node1/used_bytes") == 8 * (long long)MiB,
	      "a child holds an 8 MiB mapping with its fd closed");
	expect(unload_module(), -EAGAIN, "rmmod while a mapping exists is refused");
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	check(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && snap_eq(pool_snap(SYS), s0),
	      "SIGKILL of the holder gives the buffer back");
	close(pfd[0]);
	close(pfd[1]);

	if (expect(dev_alloc(fd, CHUNK, 0, 0, &a), 0, "ALLOC 2 MiB for the fork check")) {
		p = dev_map(fd, &a, CHUNK, 0);
		pid = fork();
		if (!pid) {
			signal(SIGSEGV, SIG_DFL);
			*(volatile char *)p = 1;
			_exit(0);
		}
		waitpid(pid, &status, 0);
		check(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
		      "a forked child does not inherit the mapping (VM_DONTCOPY)");
		munmap(p, CHUNK);
		dev_free(fd, a.handle);
	}
	expect(unload_module(), -EAGAIN, "rmmod while /dev/qwen3mm is open is refused");
}

/* ---- phase 9: unload, reload with an empty pool, dmesg ---------------------------------- */

static void test_unload(struct snap start)
{
	struct qwen3mm_alloc a;
	struct stat st;
	int fd;

	check(snap_eq(pool_snap(SYS), start),
	      "pool accounting is back to its start (total %lld, free %lld)", pool_snap(SYS).total,
	      pool_snap(SYS).free);
	expect(unload_module(), 0, "rmmod with no file and no mapping left");
	check(stat(SYS, &st) && stat(QWEN3MM_DEVICE, &st), "rmmod removed %s and %s", SYS, QWEN3MM_DEVICE);

	if (!expect(load_module(""), 0, "insmod with no parameters (empty pool)"))
		return;
	check(sysfs_num(SYS "/total_bytes") == 0, "empty pool: total_bytes 0");
	fd = dev_open();
	expect(dev_alloc(fd, CHUNK, QWEN3MM_NODE_ANY, 0, &a), -ENOMEM, "ALLOC from the empty pool");
	expect(xioctl(fd, QWEN3MM_IOC_DEBUG_UNPIN, NULL), -ENOTTY, "DEBUG_UNPIN without debug_ioctls=1");
	expect(sysfs_write(SYS "/node1/pool_mb", "4"), 0, "grow node1 to 4 MiB at run time");
	if (expect(dev_alloc(fd, 4 * MiB, QWEN3MM_NODE_ANY, 0, &a), 0, "ALLOC 4 MiB from it"))
		check(a.alloc_node == 1, "served from node 1 (%u)", a.alloc_node);
	expect(sysfs_write(SYS "/node1/pool_mb", "0"), -EBUSY, "shrink node1 to 0 while used");
	dev_free(fd, a.handle);
	expect(sysfs_write(SYS "/node1/pool_mb", "0"), 0, "shrink node1 to 0 after FREE");
	close(fd);
	expect(unload_module(), 0, "rmmod again");
}

/* A pipe keeps page references (vmsplice) past the buffer, the file and the module itself. */
static void test_unload_with_referenced_pages(void)
{
	char *p, *copy = malloc(64 * 1024);
	struct qwen3mm_alloc a;
	struct iovec iov;
	int fd, pp[2];
	ssize_t n;

	if (!expect(load_module("pool_mb=4 nodes=0"), 0, "insmod pool_mb=4 nodes=0"))
		return;
	fd = dev_open();
	if (dev_alloc(fd, 4 * MiB, 0, 0, &a) || !(p = dev_map(fd, &a, 4 * MiB, 0)) || pipe(pp)) {
		check(false, "set up the vmsplice check");
		return;
	}
	fill(p, 64 * 1024, 4242);
	iov = (struct iovec){ .iov_base = p, .iov_len = 64 * 1024 };
	n = vmsplice(pp[1], &iov, 1, 0);
	check(n == 64 * 1024, "vmsplice 64 KiB of the mapping into a pipe (%zd)", n);
	munmap(p, 4 * MiB);
	close(fd);
	check(sysfs_num(SYS "/buffers") == 0 && sysfs_num(SYS "/held_bytes") == (long long)CHUNK &&
	      sysfs_num(SYS "/free_bytes") == (long long)CHUNK,
	      "the chunk the pipe references is held, the other is free");
	expect(unload_module(), 0, "rmmod while only a pipe references pool pages");
	check(read(pp[0], copy, 64 * 1024) == 64 * 1024 && matches(copy, 64 * 1024, 4242),
	      "the pipe still reads the data after rmmod");
	close(pp[0]);
	close(pp[1]);
	free(copy);
}

/* the kernel log, malloc'ed and NUL-terminated */
static char *read_dmesg(void)
{
	int n = klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
	char *buf = malloc(n > 0 ? n + 1 : 1);

	n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, n > 0 ? n : 0);
	buf[n > 0 ? n : 0] = 0;
	return buf;
}

static bool dmesg_has(const char *needle)
{
	char *buf = read_dmesg();
	bool found = strstr(buf, needle) != NULL;

	free(buf);
	return found;
}

static void test_dmesg(void)
{
	static const char *const bad[] = { "WARNING:", "BUG:", "Oops", "Call Trace", "general protection",
		"Bad page", "refcount_t:" };
	char *buf = read_dmesg();
	const char *hit = NULL;

	for (size_t i = 0; i < Q3_ARRAY_SIZE(bad) && !hit; i++)
		if (strstr(buf, bad[i]))
			hit = bad[i];
	if (!check(*buf && !hit, "dmesg has no WARNING:/BUG:/Oops (%s)", hit ? hit : "clean"))
		printf("%s\n", buf);
	free(buf);
}

static int run(void)
{
	struct utsname u;
	int maj = 0, min = 0, fd;
	struct snap start;

	uname(&u);
	sscanf(u.release, "%d.%d", &maj, &min);
	expect_fixed_on_device = maj > 6 || (maj == 6 && min >= 5);
	printf("# kernel %s: io_uring registered buffers on a device mapping %s\n", u.release,
	       expect_fixed_on_device ? "expected to work" : "expected to be refused");

	test_load();
	test_sysfs();
	test_udev_helper();
	start = pool_snap(SYS);
	fd = dev_open();
	if (check(fd >= 0, "open %s", QWEN3MM_DEVICE)) {
		test_bad_ioctls(fd);
		test_buffers(fd);
		test_io(fd);
		test_memprov();
		test_pins(fd);
		test_lifetime(fd);
		close(fd);
	}
	test_unload(start);
	test_unload_with_referenced_pages();
	check(dmesg_has("chunks still pinned by others, freed when they unpin"),
	      "rmmod said it left the referenced chunk to its holder");
	test_dmesg();
	printf("# %d passed, %d failed\n", n_pass, n_fail);
	return n_fail ? 1 : 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "gen"))
		return gen(argv[2], argv[3]);
	if (argc == 4 && !strcmp(argv[1], "run")) {
		module_path = argv[2];
		data_path = argv[3];
		return run();
	}
	fprintf(stderr, "usage: vmtest gen FILE BYTES | vmtest run MODULE.ko DATAFILE\n");
	return 2;
}
