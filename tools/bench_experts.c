/* bench_experts.c - `qwen3d bench experts`: the CPU expert kernels' achieved memory bandwidth next
 * to this machine's, measured in the same run with the same threads on the same cores.
 *
 *   qwen3d bench experts [--threads N] [--cpus LIST] [--node N] [--pool N] [--seconds S]
 *                        [--rows SPEC] [--isa NAME] [--mem-mb M] [--csv FILE]
 *
 * A pool of synthetic full-size routed experts (2048 -> 512 -> 2048, GPTQ int4 g128 sym; the
 * default 256 of them, 420 MB, far more than any last-level cache) is laid out in both layouts
 * (packed blobs and the checkpoint's GPTQ tensors).  Each row runs MoE calls of T tokens routed
 * to k random distinct experts each (all computed on the CPU) through the threaded executor, for
 * S seconds; GB/s is the weight bytes read (each distinct expert once per call) over the time.
 * The reference is a read-only pass over a large buffer with the same threads (sum of 32-byte
 * loads, STREAM-like), best of several runs interleaved with the rows.
 *
 * Default rows: decode (T=1, k=10) int8 packed, int8 gptq, fp32 packed; batch T=4 and T=16 int8
 * packed.  --rows takes a list like "1x10:int8:packed,4x10:fp32:gptq".
 */
#include <errno.h>
#include <getopt.h>
#include <immintrin.h>
#include <numa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cli.h"
#include "cpu_moe.h"
#include "topology.h"
#include "xsynth.h"

#define XH 2048
#define XI 512
#define NE_MAX 4096

struct row {
	int T, k;
	enum q3_xact_kind act;
	bool gptq;
};

struct bench {
	int nthreads, ncpus, node, pool_n;
	int cpus[1024];
	double seconds;
	size_t mem_bytes;
	enum q3_xisa isa;
	FILE *csv;
	struct q3_xpool *pool;
	/* experts, both layouts */
	struct q3_xexpert *packed, *gptq;
	const struct q3_xexpert **table;
	char *blob_mem, *gptq_mem;
	size_t blob_sz, gptq_sz;
	/* the bandwidth pass */
	char *bw_buf;
	double bw_best;
	double sink[256];
};

/* ---- memory bandwidth ------------------------------------------------------------------------- */

struct bw_ctx {
	struct bench *B;
	size_t slice;
};

__attribute__((target("avx2"))) static double read_avx2(const char *p, size_t n)
{
	__m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;

	for (size_t i = 0; i + 128 <= n; i += 128) {
		s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i *)(p + i)));
		s1 = _mm256_add_epi64(s1, _mm256_load_si256((const __m256i *)(p + i + 32)));
		s2 = _mm256_add_epi64(s2, _mm256_load_si256((const __m256i *)(p + i + 64)));
		s3 = _mm256_add_epi64(s3, _mm256_load_si256((const __m256i *)(p + i + 96)));
	}
	s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
	return (double)_mm256_extract_epi64(s0, 0);
}

static double read_plain(const char *p, size_t n)
{
	const uint64_t *q = (const uint64_t *)p;
	uint64_t s[8] = {0};

	for (size_t i = 0; i + 8 <= n / 8; i += 8)
		for (int j = 0; j < 8; j++)
			s[j] += q[i + j];
	return (double)(s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7]);
}

static int bw_ntasks(void *ctx, int ph)
{
	return q3_xpool_size(((struct bw_ctx *)ctx)->B->pool);
}

static void bw_task(void *ctx, int ph, int i, int w)
{
	struct bw_ctx *c = ctx;
	const char *p = c->B->bw_buf + (size_t)i * c->slice;

	c->B->sink[w % 256] += __builtin_cpu_supports("avx2") ? read_avx2(p, c->slice)
							      : read_plain(p, c->slice);
}

static void first_touch(void *ctx, int w)
{
	struct bw_ctx *c = ctx;

	memset(c->B->bw_buf + (size_t)w * c->slice, w + 1, c->slice);
}

/* One read pass over the buffer (each worker its slice); GB/s. */
static double bw_pass(struct bench *B)
{
	struct bw_ctx c = {B, B->mem_bytes / (size_t)B->nthreads / 128 * 128};
	struct q3_xjob job = {.nphases = 1, .ntasks = bw_ntasks, .task = bw_task, .ctx = &c};
	double t0 = q3_now();

	q3_xpool_run(B->pool, &job);
	return (double)c.slice * B->nthreads / (q3_now() - t0) / 1e9;
}

/* ---- experts ----------------------------------------------------------------------------------- */

static void *alloc_node(size_t n, int node)
{
	void *p;

	if (node >= 0 && numa_available() >= 0)
		return numa_alloc_onnode(n, node);
	p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

/* Copies of one synthetic expert (the contents do not matter for bandwidth), in both layouts. */
static int make_experts(struct bench *B, q3_err *e)
{
	struct q3_xsynth_opts o = {.H = XH, .I = XI, .G = 128, .sym = true, .zero_offset = 1, .seed = 1};
	struct q3_xsynth *s;
	struct q3_xexpert xg;
	const struct q3_linear *lin[3];
	size_t off[3][3], gsz = 0;
	void *blob;
	int err;

	err = q3_xsynth_new(&o, &s, e);
	if (err)
		return err;
	lin[0] = &s->ex.gate;
	lin[1] = &s->ex.up;
	lin[2] = &s->ex.down;
	B->blob_sz = Q3_ALIGN_UP(q3_xexpert_packed_size(&s->ex), 4096);
	blob = aligned_alloc(64, B->blob_sz);
	err = blob ? q3_xexpert_pack(&s->ex, blob, B->blob_sz, e) : q3_errf(e, -ENOMEM, "out of memory");
	err = err ?: q3_xexpert_gptq(&xg, &s->ex, e);
	/* the GPTQ copy: qweight, qzeros, scales of gate, up, down back to back */
	for (int i = 0; i < 3 && !err; i++) {
		const struct q3_tensor *t[3] = {lin[i]->qweight, lin[i]->qzeros, lin[i]->scales};

		for (int j = 0; j < 3; j++) {
			off[i][j] = gsz;
			gsz += Q3_ALIGN_UP(t[j]->nbytes, 64);
		}
	}
	B->gptq_sz = Q3_ALIGN_UP(gsz, 4096);
	B->packed = calloc((size_t)B->pool_n, sizeof(*B->packed));
	B->gptq = calloc((size_t)B->pool_n, sizeof(*B->gptq));
	B->table = calloc((size_t)B->pool_n, sizeof(*B->table));
	B->blob_mem = alloc_node(B->blob_sz * (size_t)B->pool_n, B->node);
	B->gptq_mem = alloc_node(B->gptq_sz * (size_t)B->pool_n, B->node);
	if (!err && (!B->packed || !B->gptq || !B->table || !B->blob_mem || !B->gptq_mem))
		err = q3_errf(e, -ENOMEM, "out of memory for %d experts", B->pool_n);
	for (int n = 0; n < B->pool_n && !err; n++) {
		char *bp = B->blob_mem + (size_t)n * B->blob_sz, *gp = B->gptq_mem + (size_t)n * B->gptq_sz;
		struct q3_xmat *m[3];

		memcpy(bp, blob, B->blob_sz);
		err = q3_xexpert_view(&B->packed[n], bp, B->blob_sz, e);
		B->gptq[n] = xg;
		m[0] = &B->gptq[n].gate;
		m[1] = &B->gptq[n].up;
		m[2] = &B->gptq[n].down;
		for (int i = 0; i < 3; i++) {
			memcpy(gp + off[i][0], lin[i]->qweight->data, lin[i]->qweight->nbytes);
			memcpy(gp + off[i][1], lin[i]->qzeros->data, lin[i]->qzeros->nbytes);
			memcpy(gp + off[i][2], lin[i]->scales->data, lin[i]->scales->nbytes);
			m[i]->codes = (const uint32_t *)(gp + off[i][0]);
			if (m[i]->zeros)
				m[i]->zeros = (const uint32_t *)(gp + off[i][1]);
			m[i]->scales = (const uint16_t *)(gp + off[i][2]);
		}
	}
	free(blob);
	q3_xsynth_free(s);
	return err;
}

/* ---- rows -------------------------------------------------------------------------------------- */

static int parse_rows(const char *spec, struct row *rows, int max)
{
	char buf[512], *save = NULL, *tok;
	int n = 0;

	snprintf(buf, sizeof(buf), "%s", spec);
	for (tok = strtok_r(buf, ",", &save); tok && n < max; tok = strtok_r(NULL, ",", &save)) {
		struct row r = {.act = Q3_XACT_INT8};
		char act[16] = "int8", lay[16] = "packed";

		if (sscanf(tok, "%dx%d:%15[^:]:%15s", &r.T, &r.k, act, lay) < 2 || r.T < 1 ||
		    r.T > 4096 || r.k < 1 || r.k > 64)
			return -EINVAL;
		if (!strcmp(act, "fp32"))
			r.act = Q3_XACT_F32;
		else if (strcmp(act, "int8"))
			return -EINVAL;
		if (!strcmp(lay, "gptq"))
			r.gptq = true;
		else if (strcmp(lay, "packed"))
			return -EINVAL;
		rows[n++] = r;
	}
	return tok ? -EINVAL : n;
}

static void run_row(struct bench *B, const struct row *rw)
{
	struct q3_cpu_moe_opts mo = {.H = XH, .I = XI, .num_experts = B->pool_n, .top_k = rw->k,
				     .max_tokens = rw->T, .isa = B->isa, .act = rw->act};
	struct q3_cpu_moe *m;
	struct q3_cpu_moe_stats st;
	q3_err e = {0};
	float *x = malloc(sizeof(float) * (size_t)rw->T * XH), *w = malloc(sizeof(float) * rw->T * rw->k);
	float *out = malloc(sizeof(float) * (size_t)rw->T * XH);
	int32_t *ids = malloc(sizeof(int32_t) * rw->T * rw->k);
	uint64_t rng = 12345;
	double t0, dt, bw;
	int calls = 0;

	for (int i = 0; i < B->pool_n; i++)
		B->table[i] = rw->gptq ? &B->gptq[i] : &B->packed[i];
	for (int i = 0; i < rw->T * XH; i++)
		x[i] = (float)(q3_xrandu(&rng) - 0.5);
	if (q3_cpu_moe_new(B->pool, &mo, &m, &e)) {
		fprintf(stderr, "qwen3d bench experts: %s\n", e.msg);
		goto out;
	}
	bw = bw_pass(B);
	B->bw_best = bw > B->bw_best ? bw : B->bw_best;
	t0 = q3_now();
	do {
		for (int t = 0; t < rw->T; t++)
			for (int i = 0; i < rw->k; i++) {
				int id, dup;

				do { /* k distinct experts per token */
					id = (int)(q3_xrand(&rng) % (uint64_t)B->pool_n);
					dup = 0;
					for (int j = 0; j < i; j++)
						dup |= ids[t * rw->k + j] == id;
				} while (dup);
				ids[t * rw->k + i] = id;
				w[t * rw->k + i] = 0.1f;
			}
		struct q3_cpu_moe_req r = {.T = rw->T, .x = x, .ldx = XH, .ids = ids, .w = w, .k = rw->k,
					   .experts = B->table, .out = out, .ldo = XH};

		if (q3_cpu_moe_run(m, &r, &e)) {
			fprintf(stderr, "qwen3d bench experts: %s\n", e.msg);
			break;
		}
		calls++;
	} while (q3_now() - t0 < B->seconds);
	dt = q3_now() - t0;
	q3_cpu_moe_stats(m, &st);
	bw = bw_pass(B);
	B->bw_best = bw > B->bw_best ? bw : B->bw_best;
	double gbs = (double)st.bytes / dt / 1e9;

	printf("%-22s %6d %4d %8.1f %8.1f %8.2f %8.1f%%\n",
	       rw->T == 1 ? "decode" : "batch", rw->T, rw->k, dt / calls * 1e6,
	       (double)st.experts / calls, gbs, 100.0 * gbs / B->bw_best);
	printf("%-22s %s %s; us a call: plan + activations %.1f, gate/up %.1f, down %.1f\n", "",
	       rw->act == Q3_XACT_INT8 ? "int8" : "fp32", rw->gptq ? "gptq" : "packed", st.act_s / calls * 1e6,
	       st.gateup_s / calls * 1e6, st.down_s / calls * 1e6);
	if (B->csv)
		fprintf(B->csv, "experts,%d,%d,%s,%s,%s,%d,%.3f,%.3f,%.4f\n", rw->T, rw->k,
			rw->act == Q3_XACT_INT8 ? "int8" : "fp32", rw->gptq ? "gptq" : "packed",
			q3_xisa_name(B->isa), B->nthreads, dt / calls * 1e6, gbs, B->bw_best);
	q3_cpu_moe_free(m);
out:
	free(x);
	free(w);
	free(out);
	free(ids);
}

static void usage(FILE *f)
{
	fprintf(f, "usage: qwen3d bench experts [--threads N] [--cpus LIST] [--node N] [--pool N]\n"
		   "         [--seconds S] [--rows TxK:int8|fp32:packed|gptq,...] [--isa scalar|avx2|avx512|amx]\n"
		   "         [--mem-mb M] [--csv FILE]\n");
}

int cmd_bench_experts(int argc, char **argv)
{
	static const struct option opts[] = {
		{"threads", 1, 0, 't'}, {"cpus", 1, 0, 'c'},	{"node", 1, 0, 'n'},
		{"pool", 1, 0, 'p'},	{"seconds", 1, 0, 's'}, {"rows", 1, 0, 'r'},
		{"isa", 1, 0, 'i'},	{"mem-mb", 1, 0, 'm'},	{"csv", 1, 0, 'C'},
		{"help", 0, 0, 'h'},	{0, 0, 0, 0},
	};
	struct bench B = {.node = -1, .pool_n = 256, .seconds = 2.0, .mem_bytes = 1ull << 30,
			  .isa = q3_xisa_best()};
	struct row rows[32] = {
		{1, 10, Q3_XACT_INT8, false}, {1, 10, Q3_XACT_INT8, true}, {1, 10, Q3_XACT_F32, false},
		{4, 10, Q3_XACT_INT8, false}, {16, 10, Q3_XACT_INT8, false},
	};
	int nrows = 5, c, ret = 1;
	const char *cpus = NULL;
	struct q3_topo *topo = NULL;
	q3_err e = {0};

	optind = 1;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 't':
			B.nthreads = atoi(optarg);
			break;
		case 'c':
			cpus = optarg;
			break;
		case 'n':
			B.node = atoi(optarg);
			break;
		case 'p':
			B.pool_n = atoi(optarg);
			break;
		case 's':
			B.seconds = atof(optarg);
			break;
		case 'r':
			nrows = parse_rows(optarg, rows, 32);
			if (nrows <= 0) {
				fprintf(stderr, "qwen3d bench experts: bad --rows '%s'\n", optarg);
				return 2;
			}
			break;
		case 'i':
			if (q3_xisa_parse(optarg, &B.isa) || !q3_xisa_available(B.isa)) {
				fprintf(stderr, "qwen3d bench experts: ISA '%s' unknown or not on this CPU\n",
					optarg);
				return 2;
			}
			break;
		case 'm':
			B.mem_bytes = (size_t)atol(optarg) << 20;
			break;
		case 'C':
			B.csv = fopen(optarg, "w");
			if (!B.csv) {
				fprintf(stderr, "qwen3d bench experts: %s: %s\n", optarg, strerror(errno));
				return 1;
			}
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc || B.pool_n < 16 || B.pool_n > NE_MAX || B.seconds <= 0 ||
	    B.mem_bytes < (64u << 20)) {
		usage(stderr);
		return 2;
	}
	/* cores: --cpus, else the node's (or the machine's) cores from the topology */
	if (cpus) {
		B.ncpus = q3_parse_cpulist(cpus, B.cpus, 1024);
		if (B.ncpus <= 0) {
			fprintf(stderr, "qwen3d bench experts: bad --cpus '%s'\n", cpus);
			return 2;
		}
	} else if (q3_topo_load(NULL, &topo, &e) == 0) {
		B.ncpus = q3_topo_node_cores(topo, B.node, B.cpus, 1024);
	}
	if (B.ncpus <= 0) {
		B.ncpus = 1;
		B.cpus[0] = 0;
	}
	if (!B.nthreads)
		B.nthreads = B.ncpus;
	if (B.nthreads > B.ncpus) {
		fprintf(stderr, "qwen3d bench experts: %d threads for %d cores\n", B.nthreads, B.ncpus);
		goto out;
	}
	/* when every core has a worker, this thread sleeps while they work */
	struct q3_xpool_opts po = {.nthreads = B.nthreads, .cpus = B.cpus, .ncpus = B.ncpus,
				   .wait_spin_us = B.nthreads == q3_ncpu() ? -1 : 0};

	if (q3_xpool_new(&po, &B.pool, &e) || make_experts(&B, &e)) {
		fprintf(stderr, "qwen3d bench experts: %s\n", e.msg);
		goto out;
	}
	B.bw_buf = alloc_node(B.mem_bytes, B.node);
	if (!B.bw_buf) {
		fprintf(stderr, "qwen3d bench experts: out of memory for a %zu MiB buffer\n",
			B.mem_bytes >> 20);
		goto out;
	}
	struct bw_ctx fc = {&B, B.mem_bytes / (size_t)B.nthreads / 128 * 128};

	q3_xpool_each(B.pool, first_touch, &fc);
	for (int i = 0; i < 3; i++) {
		double bw = bw_pass(&B);

		B.bw_best = bw > B.bw_best ? bw : B.bw_best;
	}
	printf("# CPU experts: %d threads (%d bound) on cpus", B.nthreads, q3_xpool_bound(B.pool));
	for (int i = 0; i < B.nthreads; i++)
		printf("%s%d", i ? "," : " ", B.cpus[i]);
	printf(", node %d, ISA %s, %d experts x %.2f MB (%.0f MB)\n", B.node, q3_xisa_name(B.isa),
	       B.pool_n, (double)q3_xexpert_bytes(&B.packed[0]) / 1e6,
	       (double)q3_xexpert_bytes(&B.packed[0]) * B.pool_n / 1e6);
	printf("%-22s %6s %4s %8s %8s %8s %9s\n", "row", "tokens", "k", "us/call", "experts", "GB/s",
	       "of mem bw");
	for (int i = 0; i < nrows; i++)
		run_row(&B, &rows[i]);
	printf("memory read bandwidth (best of all passes, same threads): %.2f GB/s\n", B.bw_best);
	ret = 0;
out:
	if (B.bw_buf)
		numa_available() >= 0 && B.node >= 0 ? numa_free(B.bw_buf, B.mem_bytes)
						     : (void)munmap(B.bw_buf, B.mem_bytes);
	if (B.blob_mem)
		numa_available() >= 0 && B.node >= 0 ? numa_free(B.blob_mem, B.blob_sz * B.pool_n)
						       : (void)munmap(B.blob_mem, B.blob_sz * B.pool_n);
	if (B.gptq_mem)
		numa_available() >= 0 && B.node >= 0 ? numa_free(B.gptq_mem, B.gptq_sz * B.pool_n)
						       : (void)munmap(B.gptq_mem, B.gptq_sz * B.pool_n);
	free(B.packed);
	free(B.gptq);
	free(B.table);
	q3_xpool_free(B.pool);
	q3_topo_free(topo);
	if (B.csv)
		fclose(B.csv);
	return ret;
}
