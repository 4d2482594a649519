/* gpu_test.h - what the GPU test programs share: a seeded random source, device buffers,
 * synthetic Linears (dense and GPTQ, every layout variant), and the comparison that every op test
 * ends with (non-finite values first, then a scale-free error against a tolerance that the caller
 * justifies).  Header-only: each test is one program. */
#pragma once
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

extern "C" {
#include "cpu_ref.h"
#include "dequant.h"
#include "half.h"
#include "model.h"
}
#include "gpu.h"
#include "gpu_compare.h"

static int g_pass, g_fail;

#define GT_CHECK(stmt)                                                                                 \
	do {                                                                                           \
		cudaError_t err_ = (stmt);                                                             \
		if (err_ != cudaSuccess) {                                                             \
			fprintf(stderr, "%s:%d %s: %s: %s\n", __FILE__, __LINE__, __func__, #stmt,      \
				cudaGetErrorString(err_));                                             \
			exit(1);                                                                       \
		}                                                                                      \
	} while (0)

#define GT_OK(call)                                                                                    \
	do {                                                                                           \
		q3_err e_;                                                                             \
		if ((call) != 0) {                                                                     \
			fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, e_.msg);          \
			exit(1);                                                                       \
		}                                                                                      \
	} while (0)

/* xorshift64*; seeded per run from the clock unless GPU_TEST_SEED is set (printed either way). */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static inline uint64_t rnd_u64(void)
{
	g_rng ^= g_rng >> 12;
	g_rng ^= g_rng << 25;
	g_rng ^= g_rng >> 27;
	return g_rng * 0x2545F4914F6CDD1Dull;
}

static inline float rnd_uniform(void) /* [-1, 1) */
{
	return (float)((double)(rnd_u64() >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static inline float rnd_normal(void)
{
	double u1 = ((rnd_u64() >> 11) + 1) * 0x1.0p-53, u2 = (rnd_u64() >> 11) * 0x1.0p-53;

	return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static inline int rnd_int(int n)
{
	return (int)(rnd_u64() % (uint64_t)n);
}

static inline void gt_seed(void)
{
	const char *s = getenv("GPU_TEST_SEED");
	/* fixed by default: a run is repeatable; GPU_TEST_SEED explores other inputs */
	uint64_t seed = s ? strtoull(s, NULL, 0) : 20261128u;

	printf("seed %llu (GPU_TEST_SEED to repeat)\n", (unsigned long long)seed);
	g_rng ^= seed * 0x9E3779B97F4A7C15ull + 1;
	for (int i = 0; i < 8; i++)
		rnd_u64();
}

/* ---- device buffers ------------------------------------------------------------------------- */

template <typename T> static inline T *dev_alloc(size_t n)
{
	void *p = NULL;

	GT_CHECK(cudaMalloc(&p, n * sizeof(T) + 16));
	GT_CHECK(cudaMemset(p, 0xff, n * sizeof(T) + 16)); /* poison: NaN for floats */
	return (T *)p;
}

template <typename T> static inline T *dev_upload(const T *h, size_t n)
{
	T *d = dev_alloc<T>(n);

	GT_CHECK(cudaMemcpy(d, h, n * sizeof(T), cudaMemcpyHostToDevice));
	return d;
}

template <typename T> static inline void dev_poison(T *d, size_t n)
{
	GT_CHECK(cudaMemset(d, 0xff, n * sizeof(T)));
}

template <typename T> static inline std::vector<T> dev_download(const T *d, size_t n)
{
	std::vector<T> h(n);

	GT_CHECK(cudaDeviceSynchronize());
	GT_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
	return h;
}

static inline std::vector<float> bf16_to_f32(const std::vector<uint16_t> &b)
{
	std::vector<float> f(b.size());

	for (size_t i = 0; i < b.size(); i++)
		f[i] = q3_bf16_to_f32(b[i]);
	return f;
}

/* Random activations as bf16 (what the device gets) and the same values as fp32 (what the
 * reference gets), so that the comparison measures the op, not the input rounding. */
static inline void rnd_bf16(std::vector<uint16_t> &b, std::vector<float> &f, size_t n, float scale)
{
	b.resize(n);
	f.resize(n);
	for (size_t i = 0; i < n; i++) {
		b[i] = q3_f32_to_bf16(rnd_normal() * scale);
		f[i] = q3_bf16_to_f32(b[i]);
	}
}

static inline std::vector<float> f16_to_f32(const std::vector<uint16_t> &b)
{
	std::vector<float> f(b.size());

	for (size_t i = 0; i < b.size(); i++)
		f[i] = q3_f16_to_f32(b[i]);
	return f;
}

/* The same with fp16 (the inputs of Linears). */
static inline void rnd_f16(std::vector<uint16_t> &b, std::vector<float> &f, size_t n, float scale)
{
	b.resize(n);
	f.resize(n);
	for (size_t i = 0; i < n; i++) {
		b[i] = q3_f32_to_f16(rnd_normal() * scale);
		f[i] = q3_f16_to_f32(b[i]);
	}
}

static inline std::vector<float> rnd_vec(size_t n, float scale)
{
	std::vector<float> v(n);

	for (size_t i = 0; i < n; i++)
		v[i] = rnd_normal() * scale;
	return v;
}

/* ---- comparison ----------------------------------------------------------------------------- */

/* Checks got against ref: first that got is finite wherever ref is (and reports the first bad
 * positions), then the relative L2 error ||got - ref|| / ||ref|| against tol.  One line. */
static inline bool gt_compare(const char *what, const float *got, const float *ref, size_t n, double tol)
{
	struct gc_result c = gc_compare(got, ref, n);

	if (c.bad) {
		printf("FAIL  %s: %zu non-finite values, the first at %zu of %zu (got %g, reference %g)\n", what, c.bad,
		       c.first, n, got[c.first], ref[c.first]);
		g_fail++;
		return false;
	}
	bool ok = c.rel <= tol;

	printf("%s %s: rel L2 %.2e (tol %.0e)\n", ok ? "ok   " : "FAIL ", what, c.rel, tol);
	ok ? g_pass++ : g_fail++;
	return ok;
}

static inline bool gt_expect(bool cond, const char *what)
{
	printf("%s %s\n", cond ? "ok   " : "FAIL ", what);
	cond ? g_pass++ : g_fail++;
	return cond;
}

static inline int gt_finish(const char *prog)
{
	printf("== %s: %d passed, %d failed\n", prog, g_pass, g_fail);
	return g_fail ? 1 : 0;
}

/* Exits 77 (skip) when there is no usable device. */
static inline void gt_need_device(void)
{
	int n = 0;

	if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
		printf("no CUDA device: skipped\n");
		exit(77);
	}
	cudaDeviceProp p;

	GT_CHECK(cudaGetDeviceProperties(&p, 0));
	printf("device 0: %s, %d SMs, compute capability %d.%d\n", p.name, p.multiProcessorCount, p.major, p.minor);
}

/* ---- synthetic Linears ---------------------------------------------------------------------- */

enum lin_kind { LIN_BF16, LIN_F32, LIN_GPTQ };

struct tlin {
	struct q3_linear l;
	struct q3_tensor tw, tq, tz, ts, tg;
	std::vector<uint8_t> w, q, z, s, g;
	char name[64];
};

static inline void tensor_init(struct q3_tensor *t, const char *name, enum q3_dtype dt, int64_t d0, int64_t d1,
			std::vector<uint8_t> &buf)
{
	memset(t, 0, sizeof(*t));
	t->name = (char *)name;
	t->dtype = dt;
	t->ndim = d1 ? 2 : 1;
	t->shape[0] = d0;
	t->shape[1] = d1;
	t->nbytes = (uint64_t)d0 * (d1 ? d1 : 1) * q3_dtype_size(dt);
	buf.resize(t->nbytes);
	t->data = buf.data();
}

/* A Linear [N][K]: dense (bf16 or f32 values ~ N(0, 1/K)), or GPTQ with `bits`, group G (-1:
 * K), zero points asymmetric or not, act-order or not, v1 (zero_offset 1) or v2 layout. */
static inline void make_linear(struct tlin *t, int N, int K, enum lin_kind kind, int bits = 4, int G = 128,
			bool asym = false, bool actorder = false, int zoff = 1)
{
	struct q3_linear *l = &t->l;
	float sd = 1.0f / sqrtf((float)K);

	memset(l, 0, sizeof(*l));
	snprintf(t->name, sizeof(t->name), "test.lin");
	l->N = N;
	l->K = K;
	if (kind != LIN_GPTQ) {
		l->fmt = Q3_W_DENSE;
		tensor_init(&t->tw, t->name, kind == LIN_BF16 ? Q3_DT_BF16 : Q3_DT_F32, N, K, t->w);
		bool big = (size_t)N * K > 10000000; /* uniform: far cheaper to draw at lm_head size */
		for (size_t i = 0; i < (size_t)N * K; i++) {
			float v = (big ? rnd_uniform() * 1.7320508f : rnd_normal()) * sd;

			if (kind == LIN_BF16)
				((uint16_t *)t->w.data())[i] = q3_f32_to_bf16(v);
			else
				((float *)t->w.data())[i] = v;
		}
		l->w = &t->tw;
		return;
	}
	int P = 32 / bits, mask = (1 << bits) - 1, ng;

	if (G < 0)
		G = K;
	ng = K / G;
	l->fmt = Q3_W_GPTQ;
	l->bits = bits;
	l->group_size = G;
	l->ngroups = ng;
	l->zero_offset = zoff;
	l->sym = !asym;
	l->desc_act = actorder;
	tensor_init(&t->tq, t->name, Q3_DT_I32, K / P, N, t->q);
	tensor_init(&t->tz, t->name, Q3_DT_I32, ng, N / P, t->z);
	tensor_init(&t->ts, t->name, Q3_DT_F16, ng, N, t->s);
	uint32_t *qw = (uint32_t *)t->q.data(), *qz = (uint32_t *)t->z.data();
	uint16_t *sc = (uint16_t *)t->s.data();

	memset(qw, 0, t->q.size());
	memset(qz, 0, t->z.size());
	for (int k = 0; k < K; k++)
		for (int n = 0; n < N; n++)
			qw[(size_t)(k / P) * N + n] |= (uint32_t)(rnd_u64() & mask) << (bits * (k % P));
	for (int g = 0; g < ng; g++)
		for (int n = 0; n < N; n++) {
			int z = asym ? rnd_int(mask + 1) : 1 << (bits - 1); /* the zero point meant */
			int stored = (z - zoff) & mask;

			qz[(size_t)g * (N / P) + n / P] |= (uint32_t)stored << (bits * (n % P));
			sc[(size_t)g * N + n] = q3_f32_to_f16(sd * (0.5f + 0.5f * fabsf(rnd_uniform())) * 4.0f / (float)mask);
		}
	l->qweight = &t->tq;
	l->qzeros = &t->tz;
	l->scales = &t->ts;
	if (actorder) {
		std::vector<int> perm(K);

		tensor_init(&t->tg, t->name, Q3_DT_I32, K, 0, t->g);
		for (int k = 0; k < K; k++)
			perm[k] = k;
		for (int k = K - 1; k > 0; k--)
			std::swap(perm[k], perm[rnd_int(k + 1)]);
		for (int i = 0; i < K; i++)
			((int32_t *)t->g.data())[perm[i]] = i / G;
		l->g_idx = &t->tg;
	}
}

/* y[R][N] = x[R][K]·Wᵀ by the reference: q3_ref_linear, or for large shapes the reference
 * dequantization (q3_linear_dequant) once and the same fp32 dot products. */
static inline void ref_linear(const struct q3_linear *l, const float *x, int R, float *y)
{
	if ((double)l->N * l->K * R < 2e7) {
		q3_ref_linear(l, x, R, y);
		return;
	}
	std::vector<float> W((size_t)l->N * l->K);

	q3_linear_dequant(l, W.data());
	for (int r = 0; r < R; r++)
		for (int n = 0; n < l->N; n++) {
			const float *w = &W[(size_t)n * l->K], *xr = x + (size_t)r * l->K;
			float acc = 0.0f;

			for (int k = 0; k < l->K; k++)
				acc += xr[k] * w[k];
			y[(size_t)r * l->N + n] = acc;
		}
}

/* A device stack of Linears in tile format. */
struct dmat {
	struct q3g_mat m;
	struct q3g_mat_plan p;
	void *mem;
};

static inline struct q3g_stage *gt_stage(void)
{
	static struct q3g_stage sg;

	if (!sg.dev) {
		sg.bytes = 64u << 20;
		GT_CHECK(cudaMallocHost(&sg.host, sg.bytes));
		GT_CHECK(cudaMalloc(&sg.dev, sg.bytes));
	}
	return &sg;
}

static inline void dmat_upload(struct dmat *d, const struct q3_linear *const *ls, int n, const int *rowmap = NULL)
{
	GT_OK(q3g_mat_plan(ls, n, &d->p, &e_));
	GT_CHECK(cudaMalloc(&d->mem, q3g_mat_bytes(&d->p)));
	q3g_mat_place(&d->m, &d->p, d->mem);
	for (int i = 0; i < n; i++)
		GT_OK(q3g_mat_upload(&d->m, i, ls[i], rowmap, gt_stage(), 0, &e_));
}

/* An MLP's stacks (gate, up, down) of n experts xs.  engine: as the engine stores them without
 * offload (q3g_mlp_plan with down sorted: up takes gate's permutation where theirs are one, down
 * reads its act-order inputs in order, gate's and up's rows stored in that order); else each stack
 * keeps its own permutation and down gathers. */
static inline void dmlp_upload(struct dmat *g, struct dmat *u, struct dmat *d, const struct q3_expert *xs, int n,
			       bool engine)
{
	struct dmat *st[3] = { g, u, d };
	struct q3g_mat_plan p[3];
	struct q3g_mat *ms[3];
	void *mem[3];

	GT_OK(q3g_mlp_plan(xs, n, engine, p, &e_));
	if (!engine) /* (q3g_mlp_plan compared gate's and up's orders for nothing: a test's pass) */
		p[1].sorted = false;
	for (int w = 0; w < 3; w++) {
		st[w]->p = p[w];
		GT_CHECK(cudaMalloc(&st[w]->mem, q3g_mat_bytes(&p[w])));
		ms[w] = &st[w]->m;
		mem[w] = st[w]->mem;
	}
	q3g_mlp_place(ms, p, mem);
	for (int x = 0; x < n; x++)
		GT_OK(q3g_expert_upload(&g->m, &u->m, &d->m, x, &xs[x], gt_stage(), 0, &e_));
}

/* dst reads its inputs in src's act-order (its g_idx a copy of src's), as GPTQ leaves Linears
 * that read one input. */
static inline void tlin_same_order(struct tlin *dst, const struct tlin *src)
{
	if (!src->g.empty())
		memcpy(dst->g.data(), src->g.data(), src->g.size());
}

static inline void dmat_free(struct dmat *d)
{
	cudaFree(d->mem);
	d->mem = NULL;
}

static inline const char *fmt_name(int f)
{
	return f == Q3G_Q4 ? "q4" : f == Q3G_Q8 ? "q8" : "f16";
}

/* Experts' raw GPTQ tensors (gate, up, down) copied into one mapped pinned buffer, as the offload
 * finds a registered checkpoint, and the table of their device addresses for q3g_moe_host.
 * Expert x's qweights start (shift_step * x) % 16 bytes past a 16-byte boundary (safetensors packs
 * tensors unpadded); huge: malloc'ed in 2 MiB pages and registered, else cudaHostAlloc'ed. */
struct hx_host {
	char *host;
	size_t bytes;
	bool huge;
	std::vector<struct q3g_hexpert> tab;
	double expert_bytes; /* expert 0's raw bytes */
};

static inline const struct q3_linear *hx_lin(const struct q3_expert *ex, int i)
{
	return i == 0 ? &ex->gate : i == 1 ? &ex->up : &ex->down;
}

static inline void hx_host_make(struct hx_host *b, const struct q3_expert *ex, int E, int shift_step, bool huge)
{
	size_t per = 0;
	char *dev = NULL;

	for (int i = 0; i < 3; i++) { /* room for the shift after each qweight */
		const struct q3_linear *l = hx_lin(&ex[0], i);

		per += Q3_ALIGN_UP(l->qweight->nbytes + 16, 256) + Q3_ALIGN_UP(l->qzeros->nbytes, 256) +
		       Q3_ALIGN_UP(l->scales->nbytes, 256);
	}
	b->huge = huge;
	b->bytes = Q3_ALIGN_UP(per * E, 2u << 20);
	b->expert_bytes = 0;
	if (huge) {
		b->host = (char *)aligned_alloc(2u << 20, b->bytes);
		madvise(b->host, b->bytes, MADV_HUGEPAGE);
		memset(b->host, 0, b->bytes);
		GT_CHECK(cudaHostRegister(b->host, b->bytes, cudaHostRegisterMapped));
	} else {
		GT_CHECK(cudaHostAlloc((void **)&b->host, b->bytes, cudaHostAllocMapped));
	}
	GT_CHECK(cudaHostGetDevicePointer((void **)&dev, b->host, 0));
	b->tab.resize(E);
	for (int x = 0; x < E; x++) {
		size_t at = per * x;

		for (int i = 0; i < 3; i++) {
			const struct q3_linear *l = hx_lin(&ex[x], i);
			const struct q3_tensor *t[3] = { l->qweight, l->qzeros, l->scales };
			const void *p[3];

			for (int j = 0; j < 3; j++) {
				size_t o = at + (j == 0 ? (size_t)(shift_step * x) % 16 : 0);

				memcpy(b->host + o, t[j]->data, t[j]->nbytes);
				p[j] = dev + o;
				at += Q3_ALIGN_UP(t[j]->nbytes + (j == 0 ? 16 : 0), 256);
				b->expert_bytes += x == 0 ? (double)t[j]->nbytes : 0.0;
			}
			b->tab[x].lin[i] = (struct q3g_hlin){ (const uint32_t *)p[0], (const uint32_t *)p[1],
							      (const uint16_t *)p[2] };
		}
	}
}

static inline void hx_host_free(struct hx_host *b)
{
	if (b->huge) {
		cudaHostUnregister(b->host);
		free(b->host);
	} else {
		cudaFreeHost(b->host);
	}
	b->host = NULL;
}
