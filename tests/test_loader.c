/* test_loader.c - the loader: every fixture loads byte-identical to a plain read in every mode and
 * engine; the plan merges extents and respects alignment; default placement; short reads, -EAGAIN,
 * -EIO and truncated files at the completion layer; caller-provided arenas; VRAM homes (checked
 * against the files on a machine with a GPU, refused cleanly without one). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <inttypes.h>
#include <sys/mman.h>

#include "checkpoint.h"
#include "load_gpu.h"
#include "loader.h"
#include "memprov.h"
#include "testutil.h"

static const char *const fixtures[] = { FIXTURES "/tiny-sym", FIXTURES "/tiny-actorder", FIXTURES "/tiny-mixed" };

/* Every RAM tensor's bytes equal the file's; VRAM tensors read back equal too. */
static void assert_identical(struct q3_ckpt *ck, struct q3_load *ld)
{
	int fd[16];

	assert_true(ck->nshards <= 16);
	for (int s = 0; s < ck->nshards; s++)
		assert_true((fd[s] = open(ck->shards[s].path, O_RDONLY)) >= 0);
	for (size_t i = 0; i < ck->ntensors; i++) {
		const struct q3_tensor *t = &ck->tensors[i];
		uint8_t *want = malloc(t->nbytes + 1), *got = malloc(t->nbytes + 1);
		q3_err e;

		assert_int_equal(pread(fd[t->shard], want, t->nbytes, (off_t)t->off), (ssize_t)t->nbytes);
		if (t->dev) {
			assert_null(t->data);
			assert_int_equal(q3_load_read_vram(ld, t->dev, got, t->nbytes, &e), 0);
		} else {
			assert_non_null(t->data);
			memcpy(got, t->data, t->nbytes);
			/* the file's alignment modulo 4 KiB is kept */
			assert_int_equal((uintptr_t)t->data % Q3_LOAD_ALIGN, t->off % Q3_LOAD_ALIGN);
		}
		if (memcmp(want, got, t->nbytes))
			fail_msg("tensor %s differs from %s", t->name, ck->shards[t->shard].path);
		free(want);
		free(got);
	}
	for (int s = 0; s < ck->nshards; s++)
		close(fd[s]);
}

static void load_ok(const char *dir, struct q3_load_opts *o, struct q3_load_stats *st)
{
	struct q3_ckpt *ck;
	struct q3_load *ld;
	q3_err e;

	assert_int_equal(q3_ckpt_open(dir, &ck, &e), 0);
	if (q3_load(ck, o, &ld, st, &e))
		fail_msg("%s: %s", dir, e.msg);
	assert_int_equal(st->bytes, ck->total_bytes);
	assert_true(st->t_total >= 0);
	assert_true(st->path[0] != 0);
	assert_identical(ck, ld);
	q3_load_free(ld);
	q3_ckpt_close(ck);
}

static void test_fixtures_load_identical_in_every_mode(void **state)
{
	static const enum q3_io_mode modes[] = { Q3_IO_AUTO, Q3_IO_DIRECT, Q3_IO_BUFFERED, Q3_IO_MMAP };
	static const enum q3_io_engine engines[] = { Q3_ENGINE_AUTO, Q3_ENGINE_THREADS };

	for (size_t f = 0; f < Q3_ARRAY_SIZE(fixtures); f++)
		for (size_t m = 0; m < Q3_ARRAY_SIZE(modes); m++)
			for (size_t g = 0; g < Q3_ARRAY_SIZE(engines); g++) {
				/* small requests and a shallow queue: many requests per file, refills;
				 * one to three lanes */
				struct q3_load_opts o = { .node = -1, .io = modes[m], .engine = engines[g],
							  .req_bytes = 64 << 10, .qd = 3, .threads = 3,
							  .lanes = 1 + (int)(f + m + g) % 3 };
				struct q3_load_stats st;

				load_ok(fixtures[f], &o, &st);
				assert_int_equal(st.retries, 0);
				if (modes[m] == Q3_IO_MMAP)
					assert_int_equal(st.bytes_mapped, st.bytes_ram);
				else
					assert_true(st.bytes_read >= st.bytes);
			}
}

static void test_plan_merges_extents_and_aligns(void **state)
{
	struct q3_ckpt *ck;
	struct q3_load_plan p;
	uint8_t *home;
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[0], &ck, &e), 0);
	/* one home: safetensors tiles each file, so one extent per file */
	assert_int_equal(q3_load_plan_build(ck, NULL, 1 << 20, &p, &e), 0);
	assert_int_equal(p.n_ext, (size_t)ck->nshards);
	assert_int_equal(p.vram_bytes, 0);
	q3_load_plan_free(&p);

	/* alternating homes by file position: extents split exactly where the home changes */
	home = calloc(ck->ntensors, 1);
	assert_int_equal(q3_load_plan_build(ck, NULL, 1 << 20, &p, &e), 0);
	for (size_t k = 0; k < ck->ntensors; k++)
		home[p.order[k]] = (k / 7) % 2;
	q3_load_plan_free(&p);
	assert_int_equal(q3_load_plan_build(ck, home, 64 << 10, &p, &e), 0);
	{
		size_t seen = 0, r = 0;
		uint64_t ram = 0, vram = 0;

		for (size_t i = 0; i < p.n_ext; i++) {
			const struct q3_extent *x = &p.ext[i];
			uint64_t fsz = ck->shards[x->shard].size;

			assert_int_equal(x->astart % Q3_LOAD_ALIGN, 0);
			assert_int_equal(x->dst % Q3_LOAD_ALIGN, 0);
			assert_true(x->astart <= x->start && x->start < x->end && x->end <= x->aend);
			assert_true(x->aend <= Q3_ALIGN_UP(fsz, Q3_LOAD_ALIGN));
			assert_true(x->aend - x->end < Q3_LOAD_ALIGN && x->start - x->astart < Q3_LOAD_ALIGN);
			/* arena places are disjoint and in order */
			if (x->home == Q3_HOME_RAM) {
				assert_int_equal(x->dst, ram);
				ram += x->aend - x->astart;
			} else {
				assert_int_equal(x->dst, vram);
				vram += x->aend - x->astart;
			}
			/* tensors of the extent: its home, inside it, contiguous */
			for (size_t k = x->first; k < x->first + x->n; k++) {
				const struct q3_tensor *t = &ck->tensors[p.order[k]];
				assert_int_equal(home[p.order[k]], x->home);
				assert_true(t->off >= x->start && t->off + t->nbytes <= x->end);
				assert_int_equal(k, seen);
				seen++;
			}
			/* the next extent of the same file has the other home (else they would merge) */
			if (i + 1 < p.n_ext && p.ext[i + 1].shard == x->shard)
				assert_int_not_equal(p.ext[i + 1].home, x->home);
			/* requests tile [astart, aend) in order, aligned, at most 64 KiB */
			for (uint64_t off = x->astart; off < x->aend; r++) {
				assert_true(r < p.n_req);
				assert_int_equal(p.req[r].ext, i);
				assert_int_equal(p.req[r].off, off);
				assert_int_equal(p.req[r].off % Q3_LOAD_ALIGN, 0);
				assert_true(p.req[r].len > 0 && p.req[r].len <= (64 << 10));
				off += p.req[r].len;
				assert_true(off <= x->aend);
			}
		}
		assert_int_equal(seen, ck->ntensors);
		assert_int_equal(r, p.n_req);
		assert_int_equal(ram, p.ram_bytes);
		assert_int_equal(vram, p.vram_bytes);
		assert_true(p.n_ext > (size_t)ck->nshards);
		assert_int_equal(q3_load_ram_bytes(ck, home), p.ram_bytes);
	}
	q3_load_plan_free(&p);
	assert_int_not_equal(q3_load_plan_build(ck, NULL, 1000, &p, &e), 0); /* not a multiple of 4 KiB */
	free(home);
	q3_ckpt_close(ck);
}

/* Lanes: a permutation of the plan's requests made of `lanes` runs in file order, taken round
 * robin (each of the first `lanes` requests starts a run). */
static void test_plan_lanes_interleave_in_order(void **state)
{
	struct q3_ckpt *ck;
	struct q3_load_plan p, q;
	q3_err e;

	(void)state;
	assert_int_equal(q3_ckpt_open(fixtures[0], &ck, &e), 0);
	assert_int_equal(q3_load_plan_build(ck, NULL, 4096, &p, &e), 0);
	assert_true(p.n_req >= 16);
	for (int lanes = 1; lanes <= 5; lanes++) {
		size_t *idx = calloc(p.n_req, sizeof(*idx)), *next = calloc(lanes, sizeof(*next));
		bool *seen = calloc(p.n_req, 1);
		int runs = 0;

		assert_int_equal(q3_load_plan_build(ck, NULL, 4096, &q, &e), 0);
		assert_int_equal(q3_load_plan_interleave(&q, lanes, &e), 0);
		for (size_t k = 0; k < q.n_req; k++) {
			size_t i = 0;
			int j;

			while (i < p.n_req && (p.req[i].ext != q.req[k].ext || p.req[i].off != q.req[k].off))
				i++;
			assert_true(i < p.n_req);
			assert_false(seen[i]);
			assert_int_equal(p.req[i].len, q.req[k].len);
			seen[i] = true;
			idx[k] = i;
			for (j = 0; j < runs && next[j] != i; j++)
				;
			if (j == runs) { /* a new run: only in the first round */
				assert_true(runs < lanes);
				assert_int_equal(k, (size_t)runs);
				runs++;
			}
			next[j] = i + 1;
		}
		assert_int_equal(runs, lanes);
		assert_int_equal(idx[0], 0);
		q3_load_plan_free(&q);
		free(idx), free(next), free(seen);
	}
	assert_int_equal(q3_load_plan_interleave(&p, 0, &e), -EINVAL);
	assert_int_equal(q3_load_plan_interleave(&p, Q3_LOAD_MAX_LANES + 1, &e), -EINVAL);
	q3_load_plan_free(&p);
	q3_ckpt_close(ck);
}

static bool is_expert(const char *name)
{
	return strstr(name, ".mlp.experts.") != NULL;
}

static void test_place_puts_dense_first_then_whole_experts(void **state)
{
	struct q3_ckpt *ck;
	uint8_t *home;
	uint64_t dense = 0, one_expert = 0, used;
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[0], &ck, &e), 0);
	home = malloc(ck->ntensors);
	for (size_t i = 0; i < ck->ntensors; i++) {
		if (!is_expert(ck->tensors[i].name))
			dense += ck->tensors[i].nbytes;
		else if (strstr(ck->tensors[i].name, "model.layers.0.mlp.experts.0."))
			one_expert += ck->tensors[i].nbytes;
	}
	assert_int_equal(q3_load_place(ck, 0, home), 0);
	for (size_t i = 0; i < ck->ntensors; i++)
		assert_int_equal(home[i], Q3_HOME_RAM);
	/* dense plus two and a half experts: exactly the dense part and two whole experts */
	used = q3_load_place(ck, dense + 2 * one_expert + one_expert / 2, home);
	assert_int_equal(used, dense + 2 * one_expert);
	for (size_t i = 0; i < ck->ntensors; i++) {
		const char *n = ck->tensors[i].name;
		bool first_two = strstr(n, "model.layers.0.mlp.experts.0.") || strstr(n, "model.layers.0.mlp.experts.1.");
		assert_int_equal(home[i], !is_expert(n) || first_two ? Q3_HOME_VRAM : Q3_HOME_RAM);
	}
	/* a huge budget takes everything */
	assert_int_equal(q3_load_place(ck, UINT64_MAX / 2, home), ck->total_bytes);
	free(home);
	q3_ckpt_close(ck);
}

/* ---- fault injection at the completion layer ------------------------------------------------ */

struct faults {
	int calls;
	int short_every;  /* every Nth successful completion is cut in half */
	int eagain_first; /* the first N completions are -EAGAIN */
	int eagain_always;
	int eio_at_call;  /* this completion (1-based) is -EIO */
	const char *truncate_path; /* truncated to truncate_len at the first completion */
	off_t truncate_len;
	uint64_t eio_off;  /* file offset of the read made to fail */
};

static int inject(void *ctx, int shard, uint64_t off, uint32_t len, int res)
{
	struct faults *f = ctx;

	f->calls++;
	if (f->truncate_path && f->calls == 1)
		assert_int_equal(truncate(f->truncate_path, f->truncate_len), 0);
	if (f->eagain_always || f->calls <= f->eagain_first)
		return -EAGAIN;
	if (f->calls == f->eio_at_call) {
		f->eio_off = off;
		return -EIO;
	}
	if (f->short_every && res > 1 && f->calls % f->short_every == 0)
		return res / 2;
	return res;
}

static void each_engine_and_io(void (*fn)(enum q3_io_engine, enum q3_io_mode))
{
	fn(Q3_ENGINE_URING, Q3_IO_DIRECT);
	fn(Q3_ENGINE_URING, Q3_IO_BUFFERED);
	fn(Q3_ENGINE_THREADS, Q3_IO_DIRECT);
	fn(Q3_ENGINE_THREADS, Q3_IO_BUFFERED);
}

static void short_reads(enum q3_io_engine g, enum q3_io_mode m)
{
	struct faults f = { .short_every = 2 };
	struct q3_load_opts o = { .node = -1, .io = m, .engine = g, .req_bytes = 64 << 10, .qd = 4,
				  .threads = 2, .fault = inject, .fault_ctx = &f };
	struct q3_load_stats st;

	load_ok(fixtures[1], &o, &st);
	assert_true(st.retries > 0);
}

static void test_short_reads_are_requeued(void **state)
{
	each_engine_and_io(short_reads);
}

static void eagain(enum q3_io_engine g, enum q3_io_mode m)
{
	struct faults f = { .eagain_first = 25 };
	struct q3_load_opts o = { .node = -1, .io = m, .engine = g, .req_bytes = 64 << 10, .qd = 4,
				  .threads = 2, .fault = inject, .fault_ctx = &f };
	struct q3_load_stats st;

	load_ok(fixtures[1], &o, &st);
	assert_int_equal(st.retries, 25);
}

static void test_eagain_is_retried(void **state)
{
	each_engine_and_io(eagain);
}

static void expect_failure(struct q3_load_opts *o, const char *dir, int code, const char *has1,
			   const char *has2)
{
	struct q3_ckpt *ck;
	struct q3_load *ld = (struct q3_load *)1;
	struct q3_load_stats st;
	q3_err e;

	assert_int_equal(q3_ckpt_open(dir, &ck, &e), 0);
	assert_int_equal(q3_load(ck, o, &ld, &st, &e), code);
	assert_null(ld);
	if (!strstr(e.msg, has1) || (has2 && !strstr(e.msg, has2)))
		fail_msg("error \"%s\" does not say \"%s\" and \"%s\"", e.msg, has1, has2 ? has2 : "");
	assert_null(strchr(e.msg, '\n'));
	q3_ckpt_close(ck);
}

static void eio(enum q3_io_engine g, enum q3_io_mode m)
{
	struct faults f = { .eio_at_call = 5 };
	struct q3_load_opts o = { .node = -1, .io = m, .engine = g, .req_bytes = 64 << 10, .qd = 4,
				  .threads = 1, .fault = inject, .fault_ctx = &f };
	struct q3_ckpt *ck;
	struct q3_load *ld;
	char off[64];
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[1], &ck, &e), 0);
	assert_int_equal(q3_load(ck, &o, &ld, NULL, &e), -EIO);
	snprintf(off, sizeof(off), "at offset %" PRIu64 " failed: Input/output error", f.eio_off);
	if (!strstr(e.msg, off) || !strstr(e.msg, ".safetensors: read of "))
		fail_msg("error \"%s\" does not name the file and \"%s\"", e.msg, off);
	q3_ckpt_close(ck);
}

static void test_eio_names_file_and_offset(void **state)
{
	each_engine_and_io(eio);
}

static void stuck(enum q3_io_engine g, enum q3_io_mode m)
{
	struct faults f = { .eagain_always = 1 };
	struct q3_load_opts o = { .node = -1, .io = m, .engine = g, .req_bytes = 64 << 10, .qd = 2,
				  .threads = 1, .fault = inject, .fault_ctx = &f };

	expect_failure(&o, fixtures[0], -EIO, "made no progress", "offset");
}

static void test_endless_eagain_gives_up(void **state)
{
	each_engine_and_io(stuck);
}

static char *copy_fixture(const char *src)
{
	char *d = tu_mkdtemp();

	assert_non_null(d);
	assert_int_equal(tu_copy_dir(src, d), 0);
	return d;
}

static void truncated_mid_load(enum q3_io_engine g, enum q3_io_mode m)
{
	char *d = copy_fixture(fixtures[1]), path[4096];
	struct faults f = { .truncate_path = path, .truncate_len = 1 << 20 };
	struct q3_load_opts o = { .node = -1, .io = m, .engine = g, .req_bytes = 64 << 10, .qd = 2,
				  .threads = 1, .fault = inject, .fault_ctx = &f };

	/* the file shrinks after the checkpoint was opened, under the first completion */
	snprintf(path, sizeof(path), "%s/model-00002-of-00003.safetensors", d);
	expect_failure(&o, d, -EIO, "model-00002-of-00003.safetensors: file ends at byte 1048576", "truncated");
	tu_rm_rf(d);
	free(d);
}

static void test_truncation_mid_load_is_an_error(void **state)
{
	each_engine_and_io(truncated_mid_load);
}

static void test_file_changed_since_open_is_refused(void **state)
{
	char *d = copy_fixture(fixtures[0]), path[4096];
	struct q3_ckpt *ck;
	struct q3_load *ld;
	q3_err e;

	if (fcntl(0, F_GETFD) < 0) /* fd 0 is someone's: the failed load must not close it */
		assert_int_equal(open("/dev/null", O_RDONLY), 0);
	assert_int_equal(q3_ckpt_open(d, &ck, &e), 0);
	snprintf(path, sizeof(path), "%s/model-00001-of-00002.safetensors", d);
	assert_int_equal(truncate(path, 4096), 0);
	assert_int_equal(q3_load(ck, NULL, &ld, NULL, &e), -EIO);
	assert_non_null(strstr(e.msg, "model-00001-of-00002.safetensors: 4096 bytes now"));
	/* the second shard was never opened: its descriptors were not fd 0 either */
	assert_true(fcntl(0, F_GETFD) >= 0);
	q3_ckpt_close(ck);
	tu_rm_rf(d);
	free(d);
}

/* ---- arenas and VRAM ------------------------------------------------------------------------ */

static void test_caller_arena_is_used_and_kept(void **state)
{
	struct q3_ckpt *ck;
	struct q3_load *ld;
	struct q3_membuf m;
	struct q3_load_opts o = { .node = -1 };
	q3_err e;
	uint64_t need;

	assert_int_equal(q3_ckpt_open(fixtures[2], &ck, &e), 0);
	need = q3_load_ram_bytes(ck, NULL);
	assert_true(need >= ck->total_bytes);
	assert_int_equal(q3_mem_alloc(need, -1, 0, &m, &e), 0);
	o.arena = m.ptr;
	o.arena_len = need - 4096; /* too small */
	assert_int_equal(q3_load(ck, &o, &ld, NULL, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "arena"));
	o.arena_len = m.len;
	assert_int_equal(q3_load(ck, &o, &ld, NULL, &e), 0);
	for (size_t i = 0; i < ck->ntensors; i++)
		assert_true((uint8_t *)ck->tensors[i].data >= (uint8_t *)m.ptr &&
			    (uint8_t *)ck->tensors[i].data + ck->tensors[i].nbytes <= (uint8_t *)m.ptr + m.len);
	assert_identical(ck, ld);
	q3_load_free(ld);
	memset(m.ptr, 0, m.len); /* still ours after q3_load_free */
	q3_mem_free(&m);
	q3_ckpt_close(ck);
}

static void test_vram_homes(void **state)
{
	struct q3_ckpt *ck;
	struct q3_load *ld;
	uint8_t *home;
	struct q3_load_opts o = { .node = -1, .req_bytes = 64 << 10, .qd = 4, .ring_slots = 3, .streams = 2 };
	struct q3_load_stats st;
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[1], &ck, &e), 0);
	home = malloc(ck->ntensors);
	q3_load_place(ck, ck->total_bytes / 3, home);
	o.home = home;
	if (q3_load_gpus() <= 0) {
		/* no GPU: refused with a reason, nothing left allocated */
		assert_int_equal(q3_load(ck, &o, &ld, &st, &e), -ENODEV);
		assert_non_null(strstr(e.msg, "VRAM"));
	} else {
		/* with a GPU: a ring of three slots for many requests, both engines */
		for (int g = 0; g < 2; g++) {
			o.engine = g ? Q3_ENGINE_THREADS : Q3_ENGINE_URING;
			o.threads = 1;
			if (q3_load(ck, &o, &ld, &st, &e))
				fail_msg("%s", e.msg);
			assert_true(st.bytes_vram > 0 && st.bytes_ram > 0);
			assert_identical(ck, ld);
			q3_load_free(ld);
		}
	}
	free(home);
	q3_ckpt_close(ck);
}

/* ---- VRAM homes through a fake copy engine ---------------------------------------------------
 * "VRAM" is host memory and a copy lands only when it completes: after a few polls, at a wait or
 * at finish, reading its slot as it is then.  A loader that refilled a slot before its copy was
 * done would put the wrong bytes in "VRAM", and the comparison with the files would catch it. */

struct fake_slot {
	int polls;	 /* busy answers left */
	bool pending;
	const void *src;
	uint64_t off;
	size_t len;
};

static int fake_violations; /* a slot refilled while its copy ran, or a copy out of bounds */
static void *fake_last_ring;  /* the staging ring the loader handed to the last fake_open */

struct fake_h2d {
	uint8_t *vram;
	uint64_t vram_bytes;
	const uint8_t *ring;
	size_t ring_bytes;
	int nslots;
	struct fake_slot *slot;
	int copies;
};

static int fake_devices(void)
{
	return 1;
}

static int fake_open(int gpu, uint64_t vram_bytes, void *ring, size_t ring_bytes, int nslots, int nstreams,
		     struct q3_h2d **out, q3_err *e)
{
	struct fake_h2d *f = calloc(1, sizeof(*f));

	f->vram = malloc(vram_bytes);
	f->vram_bytes = vram_bytes;
	f->ring = ring;
	f->ring_bytes = ring_bytes;
	fake_last_ring = ring;
	f->nslots = nslots;
	f->slot = calloc((size_t)nslots, sizeof(*f->slot));
	*out = (struct q3_h2d *)f;
	return 0;
}

static void *fake_vram(struct q3_h2d *h)
{
	return ((struct fake_h2d *)h)->vram;
}

static void fake_land(struct fake_h2d *f, int slot)
{
	struct fake_slot *s = &f->slot[slot];

	if (s->pending)
		memcpy(f->vram + s->off, s->src, s->len);
	s->pending = false;
}

static int fake_copy(struct q3_h2d *h, int slot, uint64_t off, const void *src, size_t len, q3_err *e)
{
	struct fake_h2d *f = (struct fake_h2d *)h;
	struct fake_slot *s = &f->slot[slot];

	/* counted, not asserted: the thread engine calls this from its threads */
	if (slot < 0 || slot >= f->nslots || s->pending || (const uint8_t *)src < f->ring ||
	    (const uint8_t *)src + len > f->ring + f->ring_bytes || off + len > f->vram_bytes) {
		__atomic_add_fetch(&fake_violations, 1, __ATOMIC_RELAXED);
		return q3_errf(e, -EINVAL, "fake copy engine: slot %d misused", slot);
	}
	*s = (struct fake_slot){ .polls = 1 + slot % 3, .pending = true, .src = src, .off = off, .len = len };
	__atomic_add_fetch(&f->copies, 1, __ATOMIC_RELAXED);
	return 0;
}

static int fake_busy(struct q3_h2d *h, int slot, q3_err *e)
{
	struct fake_h2d *f = (struct fake_h2d *)h;
	struct fake_slot *s = &f->slot[slot];

	if (s->pending && s->polls-- > 0)
		return 1;
	fake_land(f, slot);
	return 0;
}

static int fake_wait(struct q3_h2d *h, int slot, q3_err *e)
{
	fake_land((struct fake_h2d *)h, slot);
	return 0;
}

static int fake_finish(struct q3_h2d *h, q3_err *e)
{
	struct fake_h2d *f = (struct fake_h2d *)h;

	for (int i = 0; i < f->nslots; i++)
		fake_land(f, i);
	return 0;
}

static int fake_read(struct q3_h2d *h, const void *dev, void *dst, size_t n, q3_err *e)
{
	memcpy(dst, dev, n);
	return 0;
}

static void fake_close(struct q3_h2d *h, int keep)
{
	struct fake_h2d *f = (struct fake_h2d *)h;

	free(f->vram);
	free(f->slot);
	free(f);
}

static const struct q3_h2d_ops fake_ops = { fake_devices, fake_open, fake_vram, fake_copy, fake_busy,
					    fake_wait, fake_finish, fake_read, fake_close };

static void test_vram_homes_through_the_ring(void **state)
{
	struct q3_ckpt *ck;
	uint8_t *home;
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[1], &ck, &e), 0);
	home = malloc(ck->ntensors);
	assert_true(q3_load_place(ck, ck->total_bytes / 2, home) > 0);
	q3_ckpt_close(ck);
	for (int g = 0; g < 2; g++)
		for (int m = 0; m < 3; m++) {
			static const enum q3_io_mode io[] = { Q3_IO_DIRECT, Q3_IO_BUFFERED, Q3_IO_MMAP };
			struct faults f = { .short_every = 3 };
			/* a ring of 3 slots under a queue of 4, or 2 threads owning 2 slots each */
			struct q3_load_opts o = { .node = -1, .home = home, .io = io[m], .req_bytes = 64 << 10,
						  .qd = 4, .threads = 2, .ring_slots = 3, .streams = 2,
						  .engine = g ? Q3_ENGINE_THREADS : Q3_ENGINE_URING,
						  .h2d_ops = &fake_ops, .fault = inject, .fault_ctx = &f };
			struct q3_load_stats st;

			fake_violations = 0;
			load_ok(fixtures[1], &o, &st);
			assert_int_equal(fake_violations, 0);
			assert_true(st.bytes_vram > 0 && st.bytes_ram > 0);
			assert_true(st.retries > 0);
			assert_true(st.ring_bytes >= 3 * (64 << 10));
		}
	free(home);
}

/* The ring (and the arena) belong to the load until q3_load_free: q3_load must not unmap them
 * on its way out, or q3_load_free unmaps them a second time, taking whatever was mapped there
 * in between with it. */
static void test_ring_lives_until_load_free(void **state)
{
	struct q3_ckpt *ck;
	struct q3_load *ld;
	struct q3_load_stats st;
	uint8_t *home;
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[1], &ck, &e), 0);
	home = malloc(ck->ntensors);
	assert_true(q3_load_place(ck, ck->total_bytes / 2, home) > 0);
	struct q3_load_opts o = { .node = -1, .home = home, .io = Q3_IO_BUFFERED, .req_bytes = 64 << 10,
				  .qd = 4, .ring_slots = 3, .h2d_ops = &fake_ops };
	if (q3_load(ck, &o, &ld, &st, &e))
		fail_msg("%s", e.msg);
	assert_non_null(fake_last_ring);
	/* msync fails with ENOMEM on an unmapped range */
	assert_int_equal(msync(fake_last_ring, 4096, MS_ASYNC), 0);
	q3_load_free(ld);
	free(home);
	q3_ckpt_close(ck);
}

/* Slow completions: every reader thread gets to take requests before the work runs out. */
static int slow_reads(void *ctx, int shard, uint64_t off, uint32_t len, int res)
{
	usleep(300);
	return res;
}

/* io_uring refused (here: a queue deeper than it allows; in containers: seccomp), AUTO falls back
 * to the thread engine with a ring sized for io_uring: no thread may use a slot past its end. */
static void test_thread_fallback_stays_inside_the_ring(void **state)
{
	struct q3_ckpt *ck;
	uint8_t *home;
	q3_err e;

	assert_int_equal(q3_ckpt_open(fixtures[1], &ck, &e), 0);
	home = malloc(ck->ntensors);
	memset(home, Q3_HOME_VRAM, ck->ntensors); /* every request goes through a slot */
	q3_ckpt_close(ck);
	struct q3_load_opts o = { .node = -1, .home = home, .io = Q3_IO_BUFFERED, .req_bytes = 64 << 10,
				  .qd = 1 << 16, .threads = 8, .ring_slots = 3, .engine = Q3_ENGINE_AUTO,
				  .h2d_ops = &fake_ops, .fault = slow_reads };
	struct q3_load_stats st;

	fake_violations = 0;
	load_ok(fixtures[1], &o, &st);
	assert_non_null(strstr(st.path, "threads"));
	assert_int_equal(fake_violations, 0);
	free(home);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_fixtures_load_identical_in_every_mode),
		cmocka_unit_test(test_plan_merges_extents_and_aligns),
		cmocka_unit_test(test_plan_lanes_interleave_in_order),
		cmocka_unit_test(test_place_puts_dense_first_then_whole_experts),
		cmocka_unit_test(test_short_reads_are_requeued),
		cmocka_unit_test(test_eagain_is_retried),
		cmocka_unit_test(test_eio_names_file_and_offset),
		cmocka_unit_test(test_endless_eagain_gives_up),
		cmocka_unit_test(test_truncation_mid_load_is_an_error),
		cmocka_unit_test(test_file_changed_since_open_is_refused),
		cmocka_unit_test(test_caller_arena_is_used_and_kept),
		cmocka_unit_test(test_vram_homes),
		cmocka_unit_test(test_vram_homes_through_the_ring),
		cmocka_unit_test(test_ring_lives_until_load_free),
		cmocka_unit_test(test_thread_fallback_stays_inside_the_ring),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
