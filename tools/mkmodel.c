/* mkmodel.c - `qwen3d mkmodel`: writes a synthetic checkpoint in the exact hub layout at disk speed.
 *
 *   qwen3d mkmodel --preset tiny|80b-a3b --out DIR [--layers N] [--experts N] [--experts-bits 4|8]
 *                  [--dense q4|q8|bf16] [--group-size 128] [--no-g-idx | --act-order] [--zipf S] [--seed N]
 *                  [--shard-size 5GB] [--threads N] [--no-direct] [--force] [--dry-run] [--quiet]
 *
 * The description (tensors, shards, offsets, values) comes from synth.c.  Writing: the files are
 * cut into 32 MiB chunks of file bytes; worker threads each take the next chunk, generate its bytes
 * (header and tensor data, counter-based so chunks are independent) into an aligned buffer and
 * pwrite it with O_DIRECT (no page cache: the files start cold, and the page cache does not fill
 * RAM), falling back to buffered writes where O_DIRECT is refused.  The JSON files are written last,
 * the index at the very end, so an interrupted run leaves a folder that inspect rejects.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "cli.h"
#include "progress.h"
#include "synth.h"

#define CHUNK (32u << 20)
#define DIO_ALIGN 4096u

struct unit {
	int shard;
	uint64_t off;
	uint32_t len;
};

struct writer {
	const struct q3_synth *s;
	int *fds;
	bool direct;
	struct unit *units;
	size_t nunits;
	size_t next;	  /* atomic: next unit to take */
	struct q3_progress prog;
	pthread_mutex_t mu;
	int err;	  /* first error, under mu */
	q3_err e;
};

/* Bytes [off, off + len) of shard sh into buf. */
static void make_chunk(const struct q3_synth *s, int sh, uint64_t off, uint32_t len, uint8_t *buf)
{
	const struct q3_synth_shard *h = &s->shards[sh];
	const struct q3_synth_tensor *t = s->t + h->first;
	uint64_t end = off + len;
	size_t lo = 0, hi = h->n;

	if (off < h->header_len)
		memcpy(buf, h->header + off, Q3_MIN(h->header_len, end) - off);
	/* first tensor that ends after off */
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (t[mid].off + t[mid].nbytes <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (size_t i = lo; i < h->n && t[i].off < end; i++) {
		uint64_t a = Q3_MAX(off, t[i].off), b = Q3_MIN(end, t[i].off + t[i].nbytes);
		q3_synth_fill(&t[i], a - t[i].off, b - a, buf + (a - off));
	}
}

static void fail(struct writer *w, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(struct writer *w, int err, const char *fmt, ...)
{
	pthread_mutex_lock(&w->mu);
	if (!w->err) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(w->e.msg, sizeof(w->e.msg), fmt, ap);
		va_end(ap);
		w->err = err;
	}
	pthread_mutex_unlock(&w->mu);
}

static void *write_thread(void *arg)
{
	struct writer *w = arg;
	uint8_t *buf = aligned_alloc(DIO_ALIGN, CHUNK);

	if (!buf) {
		fail(w, -ENOMEM, "out of memory");
		return NULL;
	}
	for (;;) {
		size_t i = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
		const struct unit *u;
		uint64_t wl, done = 0;

		if (i >= w->nunits || __atomic_load_n(&w->err, __ATOMIC_RELAXED))
			break;
		u = &w->units[i];
		make_chunk(w->s, u->shard, u->off, u->len, buf);
		/* O_DIRECT writes whole blocks: the file's last chunk is padded, then truncated */
		wl = w->direct ? Q3_ALIGN_UP((uint64_t)u->len, DIO_ALIGN) : u->len;
		memset(buf + u->len, 0, wl - u->len);
		while (done < wl) {
			ssize_t r = pwrite(w->fds[u->shard], buf + done, wl - done, (off_t)(u->off + done));
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0) {
				int err = r < 0 ? errno : EIO;
				fail(w, -err, "%s: write at byte %" PRIu64 " failed: %s%s",
				     w->s->shards[u->shard].name, u->off + done, strerror(err),
				     w->direct && err == EINVAL ? " (try --no-direct)" : "");
				break;
			}
			done += (uint64_t)r;
		}
		q3_progress_add(&w->prog, u->len);
	}
	free(buf);
	return NULL;
}

static int write_text(const char *dir, const char *name, const char *text, q3_err *e)
{
	char p[4096];
	FILE *f;

	if (q3_path_join(p, sizeof(p), dir, name))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	f = fopen(p, "w");
	if (!f)
		return q3_errf(e, -errno, "%s: %s", p, strerror(errno));
	if (fputs(text, f) < 0 || fputc('\n', f) < 0 || fclose(f) != 0)
		return q3_errf(e, -EIO, "%s: write failed", p);
	return 0;
}

/* The output folder: created if missing; one that already holds a model needs --force, and then
 * loses its old shards and index (so that no stale shard survives a smaller rewrite). */
static int prepare_dir(const char *dir, bool force, q3_err *e)
{
	DIR *d;
	struct dirent *de;
	char p[4096];
	bool has_model = false;

	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return q3_errf(e, -errno, "%s: %s", dir, strerror(errno));
	d = opendir(dir);
	if (!d)
		return q3_errf(e, -errno, "%s: %s", dir, strerror(errno));
	while ((de = readdir(d))) {
		bool shard = !strncmp(de->d_name, "model", 5) && strstr(de->d_name, ".safetensors");
		if (!shard)
			continue;
		has_model = true;
		if (force && !q3_path_join(p, sizeof(p), dir, de->d_name))
			unlink(p);
	}
	closedir(d);
	if (has_model && !force)
		return q3_errf(e, -EEXIST, "%s already holds a model (--force overwrites it)", dir);
	return 0;
}

static int write_model(const struct q3_synth *s, const char *dir, int nthreads, bool direct, bool quiet,
		       q3_err *e)
{
	struct writer w = { .s = s, .mu = PTHREAD_MUTEX_INITIALIZER };
	pthread_t *th = NULL;
	struct statvfs vfs;
	double t0 = q3_now(), dt;
	const char *files[] = { "config.json", "quantize_config.json", "generation_config.json",
				"model.safetensors.index.json" };
	int err = 0, nfd = 0, started = 0;
	char sz[32];

	if (statvfs(dir, &vfs) == 0 && (uint64_t)vfs.f_bavail * vfs.f_frsize < s->file_bytes + (64u << 20))
		return q3_errf(e, -ENOSPC, "%s: the model needs %s, only %s free", dir,
			       q3_fmt_bytes(s->file_bytes, sz, sizeof(sz)),
			       q3_fmt_bytes((uint64_t)vfs.f_bavail * vfs.f_frsize, (char[32]){ 0 }, 32));
	w.fds = calloc((size_t)s->nshards, sizeof(int));
	for (int i = 0; i < s->nshards; i++)
		w.nunits += (size_t)((s->shards[i].size + CHUNK - 1) / CHUNK);
	w.units = calloc(w.nunits ? w.nunits : 1, sizeof(*w.units));
	th = calloc((size_t)nthreads, sizeof(*th));
	if (!w.fds || !w.units || !th) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto out;
	}
	w.nunits = 0;
	for (int i = 0; i < s->nshards; i++)
		for (uint64_t off = 0; off < s->shards[i].size; off += CHUNK)
			w.units[w.nunits++] = (struct unit){ i, off, (uint32_t)Q3_MIN(CHUNK, s->shards[i].size - off) };
	w.direct = direct;
	for (nfd = 0; nfd < s->nshards; nfd++) {
		char p[4096];
		int fl = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;

		if (q3_path_join(p, sizeof(p), dir, s->shards[nfd].name)) {
			err = q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
			goto out;
		}
		w.fds[nfd] = open(p, fl | (w.direct ? O_DIRECT : 0), 0644);
		if (w.fds[nfd] < 0 && w.direct && errno == EINVAL) { /* tmpfs and friends */
			w.direct = false;
			w.fds[nfd] = open(p, fl, 0644);
			for (int j = 0; j < nfd; j++) /* same mode for every file */
				fcntl(w.fds[j], F_SETFL, fcntl(w.fds[j], F_GETFL) & ~O_DIRECT);
		}
		if (w.fds[nfd] < 0) {
			err = q3_errf(e, -errno, "%s: %s", p, strerror(errno));
			goto out;
		}
	}
	q3_progress_begin(&w.prog, "mkmodel", s->file_bytes, !quiet);
	for (started = 0; started < nthreads; started++)
		if (pthread_create(&th[started], NULL, write_thread, &w))
			break;
	for (int i = 0; i < started; i++)
		pthread_join(th[i], NULL);
	q3_progress_end(&w.prog);
	if (!started)
		err = q3_errf(e, -EAGAIN, "cannot start writer threads");
	else if (w.err)
		err = q3_errf(e, w.err, "%s", w.e.msg);
	for (int i = 0; i < nfd && !err; i++)
		if (ftruncate(w.fds[i], (off_t)s->shards[i].size) < 0 || fdatasync(w.fds[i]) < 0)
			err = q3_errf(e, -errno, "%s/%s: %s", dir, s->shards[i].name, strerror(errno));
	for (size_t f = 0; f < Q3_ARRAY_SIZE(files) && !err; f++) {
		char *text;
		if (!(err = q3_synth_json(s, files[f], &text, e))) {
			err = write_text(dir, files[f], text, e);
			free(text);
		}
	}
	dt = q3_now() - t0;
	if (!err)
		printf("mkmodel: %s: %s (%.2f GB) in %d shards, %zu tensors, %.1f s, %.2f GB/s (%s, %d threads)\n",
		       dir, q3_fmt_bytes(s->file_bytes, sz, sizeof(sz)), s->file_bytes / 1e9, s->nshards,
		       s->ntensors, dt, s->file_bytes / 1e9 / dt, w.direct ? "O_DIRECT" : "buffered", started);
out:
	for (int i = 0; i < nfd; i++)
		close(w.fds[i]);
	free(w.fds);
	free(w.units);
	free(th);
	return err;
}

static void describe(const struct q3_synth *s)
{
	const struct q3_synth_arch *a = &s->arch;
	char b1[32];

	printf("preset %s\nlayers %d\nexperts %d\nhidden %d\nvocab %d\n", a->name, a->layers, a->experts,
	       a->hidden, a->vocab);
	printf("experts_bits %d\ndense %s\ngroup_size %d\ng_idx %s\n", s->opt.expert_bits,
	       s->opt.dense_bits == 16 ? "bf16" : s->opt.dense_bits == 8 ? "q8" : "q4", s->opt.group_size,
	       !s->opt.g_idx ? "no" : s->opt.act_order ? "yes (act-order: a shuffled input order)" : "yes (sequential)");
	printf("tensors %zu\nshards %d\ntensor_bytes %" PRIu64 "\nexpert_bytes %" PRIu64 "\nfile_bytes %" PRIu64
	       "\nsize %s\n",
	       s->ntensors, s->nshards, s->tensor_bytes, s->expert_bytes, s->file_bytes,
	       q3_fmt_bytes(s->file_bytes, b1, sizeof(b1)));
	if (s->opt.zipf > 0)
		printf("zipf %.3f\nzipf_top1_rate %.3f\nzipf_top10_share %.3f\n", s->opt.zipf, s->zipf_top1,
		       s->zipf_top10);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: qwen3d mkmodel --preset tiny|80b-a3b --out DIR [options]\n"
		"  --layers N          layers (default: the preset's; 80b-a3b has 48)\n"
		"  --experts N         routed experts per layer (80b-a3b: 512)\n"
		"  --vocab N           vocabulary size (151936 for the real tokenizer)\n"
		"  --experts-bits B    4 or 8 (default 4)\n"
		"  --dense F           q4, q8 or bf16: the other projections (default bf16)\n"
		"  --group-size G      GPTQ group size (default 128)\n"
		"  --no-g-idx          leave out g_idx (AutoRound style)\n"
		"  --act-order         g_idx of a shuffled input order (desc_act: the engine permutes the\n"
		"                      inputs), one for the Linears that read one input, as GPTQ's; the\n"
		"                      default g_idx is sequential, as without act-order\n"
		"  --zipf S            skew routing: expert popularity ~ rank^-S (default 0: none)\n"
		"  --seed N            random seed (default 1)\n"
		"  --shard-size SIZE   bytes of tensors per shard (default 5e9, as the hub's 5GB)\n"
		"  --threads N         writer threads (default: twice the online CPUs, so writes overlap)\n"
		"  --no-direct         buffered writes instead of O_DIRECT\n"
		"  --force             overwrite a model already in DIR\n"
		"  --dry-run           print the plan (sizes, shards, routing skew) and write nothing\n"
		"  --quiet             no progress line\n");
}

int cmd_mkmodel(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "preset", required_argument, 0, 'p' },   { "out", required_argument, 0, 'o' },
		{ "layers", required_argument, 0, 'L' },   { "experts", required_argument, 0, 'E' },
		{ "experts-bits", required_argument, 0, 'b' }, { "dense", required_argument, 0, 'd' },
		{ "group-size", required_argument, 0, 'g' }, { "no-g-idx", no_argument, 0, 'G' },
		{ "act-order", no_argument, 0, 'A' },
		{ "zipf", required_argument, 0, 'z' },	   { "seed", required_argument, 0, 's' },
		{ "shard-size", required_argument, 0, 'S' }, { "threads", required_argument, 0, 't' },
		{ "no-direct", no_argument, 0, 'D' },	   { "force", no_argument, 0, 'f' },
		{ "dry-run", no_argument, 0, 'n' },	   { "quiet", no_argument, 0, 'q' },
		{ "vocab", required_argument, 0, 'V' },   { "help", no_argument, 0, 'h' }, { 0 }
	};
	struct q3_synth_opts o = { .expert_bits = 4, .dense_bits = 16, .group_size = 128, .g_idx = true,
				   .seed = 1, .shard_size = 5000000000ull };
	const char *out = NULL;
	int threads = Q3_MIN(64, 2 * q3_ncpu()), c, err;
	bool direct = true, force = false, dry = false, quiet = false;
	struct q3_synth s;
	q3_err e;
	char *end;

	optind = 1;
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case 'p': o.preset = optarg; break;
		case 'o': out = optarg; break;
		case 'L': o.layers = (int)strtol(optarg, &end, 10); if (*end || o.layers < 1) goto bad; break;
		case 'V': o.vocab = (int)strtol(optarg, &end, 10); if (*end) goto bad; break;
		case 'E': o.experts = (int)strtol(optarg, &end, 10); if (*end || o.experts < 1) goto bad; break;
		case 'b': o.expert_bits = (int)strtol(optarg, &end, 10); if (*end) goto bad; break;
		case 'd':
			if (!strcmp(optarg, "q4")) o.dense_bits = 4;
			else if (!strcmp(optarg, "q8")) o.dense_bits = 8;
			else if (!strcmp(optarg, "bf16")) o.dense_bits = 16;
			else goto bad;
			break;
		case 'g': o.group_size = (int)strtol(optarg, &end, 10); if (*end) goto bad; break;
		case 'G': o.g_idx = false; break;
		case 'A': o.act_order = true; break;
		case 'z': o.zipf = strtod(optarg, &end); if (*end) goto bad; break;
		case 's': o.seed = strtoull(optarg, &end, 0); if (*end) goto bad; break;
		case 'S': if (q3_parse_size(optarg, &o.shard_size)) goto bad; break;
		case 't': threads = (int)strtol(optarg, &end, 10); if (*end || threads < 1 || threads > 1024) goto bad; break;
		case 'D': direct = false; break;
		case 'f': force = true; break;
		case 'n': dry = true; break;
		case 'q': quiet = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc || !o.preset || (!out && !dry)) {
		fprintf(stderr, "qwen3d mkmodel: %s\n",
			optind < argc ? "unexpected argument" : !o.preset ? "--preset is required" : "--out is required");
		usage(stderr);
		return 2;
	}
	err = q3_synth_plan(&o, &s, &e);
	if (err) {
		fprintf(stderr, "qwen3d mkmodel: %s\n", e.msg);
		q3_synth_free(&s);
		return err == -EINVAL ? 2 : 1;
	}
	if (dry) {
		describe(&s);
		q3_synth_free(&s);
		return 0;
	}
	if ((err = prepare_dir(out, force, &e)) || (err = write_model(&s, out, threads, direct, quiet, &e)))
		fprintf(stderr, "qwen3d mkmodel: %s\n", e.msg);
	else if (o.zipf > 0)
		printf("mkmodel: routing skew zipf %.2f: top expert picked by %.0f%% of tokens, top 10 take %.0f%% of picks (router-only estimate)\n",
		       o.zipf, 100 * s.zipf_top1, 100 * s.zipf_top10);
	q3_synth_free(&s);
	return err ? 1 : 0;
bad:
	for (const struct option *p = lo; p->name; p++)
		if (p->val == c)
			fprintf(stderr, "qwen3d mkmodel: --%s: bad value '%s'\n", p->name, optarg);
	return 2;
}
