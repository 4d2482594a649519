/* synth.c - the synthetic checkpoint's description and values (see synth.h). */
#include "synth.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"

/* ---- presets ------------------------------------------------------------------------------ */

static const struct q3_synth_arch arches[] = {
	/* The shapes of the CI fixtures (tests/fixtures/models/tiny-sym): small enough to write and
	 * run through the CPU engine in milliseconds, every size a multiple of 128. */
	{ .name = "tiny", .vocab = 4096, .hidden = 256, .layers = 4, .full_interval = 4,
	  .heads = 4, .kv_heads = 2, .head_dim = 64,
	  .lin_k_heads = 2, .lin_v_heads = 4, .lin_k_dim = 64, .lin_v_dim = 64, .conv_kernel = 4,
	  .experts = 16, .top_k = 4, .moe_inter = 128, .shared_inter = 128, .intermediate = 1024 },
	/* Qwen3-Next-80B-A3B (qwen3next.md section 1). */
	{ .name = "80b-a3b", .vocab = 151936, .hidden = 2048, .layers = 48, .full_interval = 4,
	  .heads = 16, .kv_heads = 2, .head_dim = 256,
	  .lin_k_heads = 16, .lin_v_heads = 32, .lin_k_dim = 128, .lin_v_dim = 128, .conv_kernel = 4,
	  .experts = 512, .top_k = 10, .moe_inter = 512, .shared_inter = 512, .intermediate = 5120 },
};

const char *const q3_synth_presets[] = { "tiny", "80b-a3b", NULL };

/* ---- values: a counter-based generator, so any byte range can be made on its own ---------- */

/* splitmix64 of the idx-th state: fast, and a good enough mixer for weights nobody trained. */
static inline uint64_t rnd(uint64_t seed, uint64_t idx)
{
	uint64_t z = seed + (idx + 1) * 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 16-bit resolution: four elements share one 64-bit draw. */
static inline float unit16(uint64_t seed, uint64_t i)
{
	uint64_t r = rnd(seed, i >> 2);

	return ((float)((r >> (16 * (i & 3))) & 0xffff) + 0.5f) * (1.0f / 65536.0f);
}

/* Element i as a float (the slow kinds; OCTAVE and GIDX are made as bits). */
static float gen_value(const struct q3_gen *g, uint64_t i)
{
	float u = unit16(g->seed, i);

	if (g->kind == Q3_GEN_LOGU)
		return logf(g->mean + (g->std - g->mean) * u);
	return g->mean + g->std * 1.7320508f * (2.0f * u - 1.0f);
}

static void encode(enum q3_dtype dt, float v, uint8_t *b)
{
	uint16_t h;

	if (dt == Q3_DT_F32) {
		memcpy(b, &v, 4);
		return;
	}
	h = dt == Q3_DT_BF16 ? q3_f32_to_bf16(v) : q3_f32_to_f16(v);
	memcpy(b, &h, 2);
}

/* OCTAVE: with m uniform in [1, 2), E[m^2] = 7/3; octave E + 1 is taken with probability p so
 * that (7/3) 4^E (1 + 3p) = rms^2 exactly.  p is compared with 8 random bits. */
struct octave {
	int ebits, mbits; /* exponent and mantissa widths: BF16 8/7, F16 5/10 */
	uint32_t ebase;	  /* biased exponent of 2^E */
	uint32_t pthr;	  /* p * 256 */
	bool sign;
};

static struct octave octave_of(const struct q3_gen *g, enum q3_dtype dt)
{
	struct octave o = { .sign = !g->positive };
	double r = g->std / sqrt(7.0 / 3.0);
	int E = (int)floor(log2(r));
	double p = (r * r / ldexp(1.0, 2 * E) - 1.0) / 3.0;

	o.ebits = dt == Q3_DT_BF16 ? 8 : 5;
	o.mbits = dt == Q3_DT_BF16 ? 7 : 10;
	o.ebase = (uint32_t)(E + (dt == Q3_DT_BF16 ? 127 : 15));
	o.pthr = (uint32_t)fmin(256.0, fmax(0.0, p * 256.0 + 0.5));
	return o;
}

/* 21 random bits per element, three elements per 64-bit draw: mantissa, 8 bits for the octave,
 * the sign. */
static inline uint16_t octave_bits(const struct octave *o, uint32_t x)
{
	uint32_t m = x & ((1u << o->mbits) - 1), up = ((x >> 12) & 0xff) < o->pthr;
	uint32_t s = o->sign ? (x >> 20) & 1 : 0;

	return (uint16_t)(s << 15 | (o->ebase + up) << o->mbits | m);
}

/* The input order of an act-order g_idx of n inputs: σ(i), a pseudo-random permutation of
 * [0, n) keyed by the order's key (q3_gen.order, else the tensor's seed), made element by
 * element (a range cut anywhere gives the same bytes): rounds of bijections on the bits of the
 * next power of two (multiply by an odd number, xor a right shift, add), walked again while the
 * result is n or more (a bijection on [0, n)).  Input i falls in group σ(i) / group: every group
 * gets `group` inputs scattered over the row, as GPTQ's desc_act leaves them. */
struct gidx_order {
	uint64_t n, mask, key[4];
	int shift;
};

static struct gidx_order gidx_order_of(const struct q3_gen *g, uint64_t n)
{
	struct gidx_order o = { .n = n };
	int bits = 1;

	while (bits < 63 && (1ull << bits) < n)
		bits++;
	o.mask = (1ull << bits) - 1;
	o.shift = bits / 2 + 1;
	for (int r = 0; r < 4; r++)
		o.key[r] = rnd(g->order ? g->order : g->seed, 1 + (uint64_t)r);
	return o;
}

static uint64_t gidx_sigma(const struct gidx_order *o, uint64_t i)
{
	do {
		for (int r = 0; r < 4; r++) {
			i = (i * (o->key[r] | 1)) & o->mask;
			i ^= i >> o->shift;
			i = (i + (o->key[r] >> 32)) & o->mask;
		}
	} while (i >= o->n);
	return i;
}

/* Whole elements [i0, i1) into dst (element i0 at dst). */
static void fill_whole(const struct q3_synth_tensor *t, uint64_t i0, uint64_t i1, uint8_t *dst)
{
	const struct q3_gen *g = &t->gen;
	size_t es = q3_dtype_size(t->dtype);

	if (g->kind == Q3_GEN_OCTAVE) {
		struct octave o = octave_of(g, t->dtype);
		uint64_t i = i0;

		for (; i < i1 && i % 3; i++, dst += 2) { /* up to the next whole draw */
			uint16_t h = octave_bits(&o, (uint32_t)(rnd(g->seed, i / 3) >> (21 * (i % 3))));
			memcpy(dst, &h, 2);
		}
		for (; i + 3 <= i1; i += 3, dst += 6) {
			uint64_t r = rnd(g->seed, i / 3);
			uint16_t h[3] = { octave_bits(&o, (uint32_t)r), octave_bits(&o, (uint32_t)(r >> 21)),
					  octave_bits(&o, (uint32_t)(r >> 42)) };
			memcpy(dst, h, 6);
		}
		for (; i < i1; i++, dst += 2) {
			uint16_t h = octave_bits(&o, (uint32_t)(rnd(g->seed, i / 3) >> (21 * (i % 3))));
			memcpy(dst, &h, 2);
		}
	} else if (g->kind == Q3_GEN_GIDX) {
		const struct gidx_order o = gidx_order_of(g, (uint64_t)g->cols);

		for (uint64_t i = i0; i < i1; i++, dst += 4) {
			uint64_t k = g->shuffled ? gidx_sigma(&o, i) : i;
			int32_t v = (int32_t)(k / (uint64_t)g->group);
			memcpy(dst, &v, 4);
		}
	} else {
		for (uint64_t i = i0; i < i1; i++, dst += es)
			encode(t->dtype, gen_value(g, i), dst);
	}
}

/* Element i with value bytes b, clipped to the byte window [begin, end) that dst starts at. */
static void put_clipped(size_t es, uint64_t i, const uint8_t *b, uint64_t begin, uint64_t end,
			uint8_t *dst)
{
	for (size_t k = 0; k < es; k++) {
		uint64_t at = i * es + k;
		if (at >= begin && at < end)
			dst[at - begin] = b[k];
	}
}

static void put_value(const struct q3_synth_tensor *t, uint64_t i, float v, uint64_t begin, uint64_t end,
		      uint8_t *dst)
{
	uint8_t b[8];

	encode(t->dtype, v, b);
	put_clipped(q3_dtype_size(t->dtype), i, b, begin, end, dst);
}

/* The special row / columns (routing skew) of a float tensor over elements [e0, e1). */
static void fix_specials(const struct q3_synth_tensor *t, uint64_t e0, uint64_t e1, uint64_t begin,
			 uint64_t end, uint8_t *dst)
{
	const struct q3_gen *g = &t->gen;
	uint64_t cols = (uint64_t)g->cols;

	if (g->kind == Q3_GEN_GIDX)
		return;
	if (g->zero_row >= 0) {
		uint64_t a = Q3_MAX(e0, (uint64_t)g->zero_row * cols);
		uint64_t b = Q3_MIN(e1, ((uint64_t)g->zero_row + 1) * cols);
		for (uint64_t i = a; i < b; i++)
			put_value(t, i, 0.0f, begin, end, dst);
	}
	for (int which = 0; which < 2; which++) {
		int64_t c = which ? g->fix_col : g->zero_col;
		if (c < 0)
			continue;
		for (uint64_t row = e0 / cols; row * cols < e1; row++) {
			uint64_t i = row * cols + (uint64_t)c;
			if (i >= e0 && i < e1)
				put_value(t, i, !which ? 0.0f : g->colvals ? g->colvals[row] : g->colval,
					  begin, end, dst);
		}
	}
}

/* Bytes [begin, begin + len) of an element-wise tensor: whole elements in place, the ragged
 * first and last element through a small buffer. */
static void fill_elems(const struct q3_synth_tensor *t, uint64_t begin, uint64_t len, uint8_t *dst)
{
	size_t es = q3_dtype_size(t->dtype);
	uint64_t end = begin + len, e0 = begin / es, e1 = (end + es - 1) / es;
	uint64_t w0 = (begin + es - 1) / es, w1 = end / es; /* whole elements */

	uint8_t b[8];

	if (w0 < w1)
		fill_whole(t, w0, w1, dst + (w0 * es - begin));
	if (e0 < w0 || w0 >= w1) { /* ragged first element (or the only one) */
		fill_whole(t, e0, e0 + 1, b);
		put_clipped(es, e0, b, begin, end, dst);
	}
	if (e1 - 1 >= w1 && e1 - 1 != e0) { /* ragged last element */
		fill_whole(t, e1 - 1, e1, b);
		put_clipped(es, e1 - 1, b, begin, end, dst);
	}
	fix_specials(t, e0, e1, begin, end, dst);
}

/* Word w of a tensor made of 64-bit words: constant zero points, or symmetric codes (a random
 * word whose all-zero fields, nibbles or bytes, become the zero point: SWAR, no branch). */
static inline uint64_t word_of(const struct q3_gen *g, uint64_t w)
{
	uint64_t x, any;

	if (g->kind == Q3_GEN_CONST32)
		return (uint64_t)g->cval << 32 | g->cval;
	x = rnd(g->seed, w);
	if (g->group == 8) {
		any = x | x >> 1 | x >> 2 | x >> 3 | x >> 4 | x >> 5 | x >> 6 | x >> 7;
		return x | (~any & 0x0101010101010101ull) << 7;
	}
	any = x | x >> 1 | x >> 2 | x >> 3;
	return x | (~any & 0x1111111111111111ull) << 3;
}

static void fill_words(const struct q3_synth_tensor *t, uint64_t begin, uint64_t len, uint8_t *dst)
{
	uint64_t end = begin + len;

	for (uint64_t w = begin / 8; w * 8 < end; w++) {
		uint64_t v = word_of(&t->gen, w), at = w * 8;

		if (at >= begin && at + 8 <= end) {
			memcpy(dst + (at - begin), &v, 8);
			continue;
		}
		for (uint64_t k = 0; k < 8; k++) /* ragged first or last word */
			if (at + k >= begin && at + k < end)
				dst[at + k - begin] = (uint8_t)(v >> (8 * k));
	}
}

void q3_synth_fill(const struct q3_synth_tensor *t, uint64_t begin, uint64_t len, void *dst)
{
	if (t->gen.kind == Q3_GEN_CODES || t->gen.kind == Q3_GEN_CONST32)
		fill_words(t, begin, len, dst);
	else
		fill_elems(t, begin, len, dst);
}

/* ---- routing skew ------------------------------------------------------------------------- */

/* Target selection rate of rank r: min(1, c r^-s), with c such that the rates add up to k. */
static void zipf_targets(int E, int k, double s, double *f)
{
	double lo = -50, hi = 50;

	for (int it = 0; it < 200; it++) {
		double lc = (lo + hi) / 2, sum = 0;
		for (int r = 0; r < E; r++)
			sum += fmin(1.0, exp(lc - s * log(r + 1.0)));
		if (sum > k)
			hi = lc;
		else
			lo = lc;
	}
	for (int r = 0; r < E; r++)
		f[r] = fmin(1.0, exp(lo - s * log(r + 1.0)));
}

/* Standard normal from two counter-based uniforms (Box-Muller). */
static inline double normal(uint64_t seed, uint64_t i)
{
	uint64_t r = rnd(seed, i);
	double u1 = ((double)(r >> 11) + 0.5) * (1.0 / 9007199254740992.0);
	double u2 = (double)(rnd(seed ^ 0x5bd1e995ull, i) >> 11) * (1.0 / 9007199254740992.0);

	return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Selection rates of a router whose logits are bias + noise, noise[T][E] ~ N(0, 1). */
static void simulate_router(int E, int k, const double *bias, int T, const float *noise, double *freq)
{
	int top[64];
	double val[64];

	memset(freq, 0, sizeof(double) * (size_t)E);
	for (int t = 0; t < T; t++) {
		const float *nz = noise + (size_t)t * (size_t)E;
		int n = 0;

		for (int e = 0; e < E; e++) {
			double v = bias[e] + nz[e];
			int j;
			if (n == k && v <= val[k - 1])
				continue;
			j = n < k ? n++ : k - 1;
			while (j > 0 && val[j - 1] < v) {
				val[j] = val[j - 1], top[j] = top[j - 1];
				j--;
			}
			val[j] = v, top[j] = e;
		}
		for (int j = 0; j < n; j++)
			freq[top[j]] += 1.0 / T;
	}
}

static void fill_noise(float *noise, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		noise[i] = (float)normal(seed, i);
}

/* Calibrates bias[rank] so that the simulated selection rates follow the capped Zipf law, by
 * iterative proportional fitting on one fixed noise sample, then measures the result on a fresh
 * one: the rate of the top expert and the top ten's share of all picks. */
static int calibrate_router(int E, int k, double s, uint64_t seed, double *bias, double *top1,
			    double *top10)
{
	int T = Q3_MIN(16384, Q3_MAX(2048, (1 << 21) / E)); /* tokens: about 2M selections */
	double *f = calloc((size_t)E, sizeof(double)), *m = calloc((size_t)E, sizeof(double));
	float *noise = malloc(sizeof(float) * (size_t)T * (size_t)E);
	double eps = 0.5 / T, sum10 = 0;

	if (!f || !m || !noise) {
		free(f), free(m), free(noise);
		return -ENOMEM;
	}
	zipf_targets(E, k, s, f);
	fill_noise(noise, (size_t)T * (size_t)E, seed);
	for (int r = 0; r < E; r++)
		bias[r] = -s * log(r + 1.0);
	for (int it = 0; it < 400; it++) {
		double mean = 0, moved = 0;
		simulate_router(E, k, bias, T, noise, m);
		for (int r = 0; r < E; r++) {
			/* small bounded steps: larger ones make the tail oscillate instead of converging */
			double step = fmax(-0.3, fmin(0.3, 0.3 * (log(f[r] + eps) - log(m[r] + eps))));
			bias[r] += step;
			mean += bias[r] / E;
			moved = fmax(moved, fabs(step));
		}
		for (int r = 0; r < E; r++)
			bias[r] -= mean;
		if (moved < 0.002) /* converged on this sample */
			break;
	}
	fill_noise(noise, (size_t)T * (size_t)E, seed ^ 0xabcdefull);
	simulate_router(E, k, bias, T, noise, m);
	for (int r = 0; r < 10 && r < E; r++)
		sum10 += m[r];
	*top1 = m[0];
	*top10 = sum10 / k;
	free(f);
	free(m);
	free(noise);
	return 0;
}

/* ---- the tensor list ---------------------------------------------------------------------- */

#define OUT_RMS 0.15f	 /* RMS each sub-layer adds to the residual stream (embeddings: 1) */
#define SILU_RMS 0.6f	 /* RMS of silu(N(0,1)) (times an independent N(0,1)): SwiGLU activations */
#define ATTN_RMS 0.5f	 /* RMS of sigmoid-gated attention output rows */
#define MOE_MIX 0.6f	 /* RMS of top-k mix + gated shared expert relative to one expert */
#define SKEW_KAPPA 4.0	 /* value of the skew channel after the first norm */

struct builder {
	struct q3_synth *s;
	size_t cap;
	uint64_t seed;
	bool expert; /* tensors added now belong to a routed expert */
	int err;
	q3_err *e;
};

static struct q3_synth_tensor *add(struct builder *b, const char *name, enum q3_dtype dt, int ndim,
				   const int64_t *shape, struct q3_gen g)
{
	struct q3_synth *s = b->s;
	struct q3_synth_tensor *t;

	if (b->err)
		return NULL;
	if (s->ntensors == b->cap) {
		size_t nc = b->cap ? b->cap * 2 : 1024;
		struct q3_synth_tensor *nt = realloc(s->t, nc * sizeof(*nt));
		if (!nt) {
			b->err = q3_errf(b->e, -ENOMEM, "out of memory");
			return NULL;
		}
		s->t = nt, b->cap = nc;
	}
	t = &s->t[s->ntensors];
	memset(t, 0, sizeof(*t));
	if (!(t->name = strdup(name))) {
		b->err = q3_errf(b->e, -ENOMEM, "out of memory");
		return NULL;
	}
	t->dtype = dt;
	t->ndim = ndim;
	t->nbytes = q3_dtype_size(dt);
	for (int i = 0; i < ndim; i++) {
		t->shape[i] = shape[i];
		t->nbytes *= (uint64_t)shape[i];
	}
	t->gen = g;
	t->expert = b->expert;
	t->gen.seed = rnd(b->seed, s->ntensors);
	if (!t->gen.cols)
		t->gen.cols = shape[ndim - 1];
	s->ntensors++;
	s->tensor_bytes += t->nbytes;
	return t;
}

/* A generator of that kind with no special row or column. */
static struct q3_gen gen(enum q3_gen_kind kind)
{
	return (struct q3_gen){ .kind = kind, .zero_col = -1, .zero_row = -1, .fix_col = -1 };
}

static struct q3_gen uniform(float mean, float std)
{
	struct q3_gen g = gen(Q3_GEN_UNIFORM);

	g.mean = mean;
	g.std = std;
	return g;
}

/* Random sign (or positive), RMS rms: the bulk of BF16 weights and F16 scales. */
static struct q3_gen octave(float rms, bool positive)
{
	struct q3_gen g = uniform(0, rms);

	g.kind = Q3_GEN_OCTAVE;
	g.positive = positive;
	return g;
}

static void add_vec(struct builder *b, const char *name, int64_t n, struct q3_gen g)
{
	add(b, name, Q3_DT_BF16, 1, &n, g);
}

/* A Linear [K in -> N out] with weight RMS gain / sqrt(K).  bits 16 = BF16 .weight, else GPTQ v1
 * symmetric.  zero_out: output channel forced to 0 (the routing skew channel).  order: the key of
 * its act-order input order (input_order), 0 for one of its own. */
static void add_linear(struct builder *b, const char *mod, int64_t K, int64_t N, int bits, float gain,
		       int64_t zero_out, bool expert, uint64_t order)
{
	const struct q3_synth_opts *o = &b->s->opt;
	float wstd = gain / sqrtf((float)K);
	char name[256];
	struct q3_gen g;

	if (b->err)
		return;
	b->expert = expert;
	if (bits == 16) {
		int64_t sh[2] = { N, K };
		g = octave(wstd, false);
		g.cols = K;
		g.zero_row = zero_out;
		snprintf(name, sizeof(name), "%s.weight", mod);
		add(b, name, Q3_DT_BF16, 2, sh, g);
		b->expert = false;
		return;
	}
	if (K % o->group_size || K % (32 / bits) || N % (32 / bits)) {
		b->err = q3_errf(b->e, -EINVAL, "%s: %" PRId64 " inputs, %" PRId64 " outputs: not divisible by group size %d and %d-bit packing",
				 mod, K, N, o->group_size, bits);
		return;
	}
	{
		int64_t G = K / o->group_size, pack = 32 / bits;
		/* E[(q - z)^2] of the symmetric codes: 2 (1^2 + ... + (z-1)^2) / 2^bits */
		float qrms = bits == 4 ? sqrtf(17.5f) : sqrtf(5397.5f);
		float smean = wstd / qrms;
		int64_t sqw[2] = { K / pack, N }, sqz[2] = { G, N / pack }, ssc[2] = { G, N }, sgi[1] = { K };

		snprintf(name, sizeof(name), "%s.qweight", mod);
		g = gen(Q3_GEN_CODES);
		g.group = bits;
		add(b, name, Q3_DT_I32, 2, sqw, g);
		snprintf(name, sizeof(name), "%s.qzeros", mod);
		/* v1 stores z - 1 in every field: 7 per nibble, 127 per byte */
		g = gen(Q3_GEN_CONST32);
		g.cval = bits == 4 ? 0x77777777u : 0x7f7f7f7fu;
		add(b, name, Q3_DT_I32, 2, sqz, g);
		snprintf(name, sizeof(name), "%s.scales", mod);
		g = octave(smean, true);
		g.zero_col = zero_out;
		add(b, name, Q3_DT_F16, 2, ssc, g);
		if (o->g_idx) {
			snprintf(name, sizeof(name), "%s.g_idx", mod);
			g = gen(Q3_GEN_GIDX);
			g.group = o->group_size;
			g.shuffled = o->act_order;
			g.order = order;
			add(b, name, Q3_DT_I32, 1, sgi, g);
		}
	}
	b->expert = false;
}

/* The act-order key of an input that several Linears of layer `layer` read: GPTQ's desc_act sorts
 * a Linear's inputs by the Hessian of what it reads, so Linears that read one input (q, k and v;
 * an expert's gate and up, whose Hessian sums the tokens routed to that expert) get one order.
 * which: 0 attention's input, 1 the shared expert's, 2 + x routed expert x's. */
static uint64_t input_order(const struct builder *b, int layer, int which)
{
	return rnd(b->seed ^ 0x6f72646572ull, (uint64_t)layer << 20 | (uint64_t)which) | 1;
}

static struct q3_gen zero_centred_norm(void)
{
	return uniform(0, 0.02f);
}

static void add_layer(struct builder *b, int i)
{
	const struct q3_synth_arch *a = &b->s->arch;
	const struct q3_synth_opts *o = &b->s->opt;
	struct q3_synth *s = b->s;
	int64_t H = a->hidden, skew = o->zipf > 0 ? s->skew_channel : -1;
	int db = o->dense_bits;
	char p[64], m[160];
	struct q3_gen g;

	snprintf(p, sizeof(p), "model.layers.%d", i);
	if ((i + 1) % a->full_interval) { /* Gated DeltaNet */
		int64_t kd = (int64_t)a->lin_k_heads * a->lin_k_dim, vd = (int64_t)a->lin_v_heads * a->lin_v_dim;
		int64_t conv[3] = { 2 * kd + vd, 1, a->conv_kernel };

		snprintf(m, sizeof(m), "%s.linear_attn.in_proj_qkvz", p);
		add_linear(b, m, H, 2 * kd + 2 * vd, db, 1.0f, -1, false, input_order(b, i, 0));
		snprintf(m, sizeof(m), "%s.linear_attn.in_proj_ba", p);
		add_linear(b, m, H, 2 * a->lin_v_heads, 16, 1.0f, -1, false, 0);
		snprintf(m, sizeof(m), "%s.linear_attn.conv1d.weight", p);
		add(b, m, Q3_DT_BF16, 3, conv, uniform(0, 0.5f));
		snprintf(m, sizeof(m), "%s.linear_attn.dt_bias", p);
		add_vec(b, m, a->lin_v_heads, uniform(1.0f, 0.1f));
		snprintf(m, sizeof(m), "%s.linear_attn.A_log", p);
		g = uniform(0.5f, 4.0f); /* A = exp(A_log) uniform in [0.5, 4] */
		g.kind = Q3_GEN_LOGU;
		add_vec(b, m, a->lin_v_heads, g);
		snprintf(m, sizeof(m), "%s.linear_attn.norm.weight", p);
		add_vec(b, m, a->lin_v_dim, uniform(1.0f, 0.02f));
		snprintf(m, sizeof(m), "%s.linear_attn.out_proj", p);
		add_linear(b, m, vd, H, db, OUT_RMS / SILU_RMS, skew, false, 0);
	} else { /* gated full attention */
		int64_t qd = (int64_t)a->heads * a->head_dim, kvd = (int64_t)a->kv_heads * a->head_dim;

		snprintf(m, sizeof(m), "%s.self_attn.q_proj", p);
		add_linear(b, m, H, 2 * qd, db, 1.0f, -1, false, input_order(b, i, 0));
		snprintf(m, sizeof(m), "%s.self_attn.k_proj", p);
		add_linear(b, m, H, kvd, db, 1.0f, -1, false, input_order(b, i, 0));
		snprintf(m, sizeof(m), "%s.self_attn.v_proj", p);
		add_linear(b, m, H, kvd, db, 1.0f, -1, false, input_order(b, i, 0));
		snprintf(m, sizeof(m), "%s.self_attn.o_proj", p);
		add_linear(b, m, qd, H, db, OUT_RMS / ATTN_RMS, skew, false, 0);
		snprintf(m, sizeof(m), "%s.self_attn.q_norm.weight", p);
		add_vec(b, m, a->head_dim, zero_centred_norm());
		snprintf(m, sizeof(m), "%s.self_attn.k_norm.weight", p);
		add_vec(b, m, a->head_dim, zero_centred_norm());
	}

	/* router: noise of RMS 1 on the logits, plus the popularity bias on the skew channel */
	{
		int64_t sh[2] = { a->experts, H };
		g = octave(1.0f / sqrtf((float)H), false);
		g.cols = H;
		if (s->router_bias) {
			g.fix_col = skew;
			g.colvals = s->router_bias + (size_t)i * (size_t)a->experts;
		}
		snprintf(m, sizeof(m), "%s.mlp.gate.weight", p);
		add(b, m, Q3_DT_BF16, 2, sh, g);
	}
	for (int x = 0; x < a->experts; x++) {
		const char *proj[3] = { "gate_proj", "up_proj", "down_proj" };
		for (int j = 0; j < 3; j++) {
			snprintf(m, sizeof(m), "%s.mlp.experts.%d.%s", p, x, proj[j]);
			if (j < 2)
				add_linear(b, m, H, a->moe_inter, o->expert_bits, 1.0f, -1, true, input_order(b, i, 2 + x));
			else
				add_linear(b, m, a->moe_inter, H, o->expert_bits,
					   OUT_RMS / (SILU_RMS * MOE_MIX), skew, true, 0);
		}
	}
	snprintf(m, sizeof(m), "%s.mlp.shared_expert.gate_proj", p);
	add_linear(b, m, H, a->shared_inter, db, 1.0f, -1, false, input_order(b, i, 1));
	snprintf(m, sizeof(m), "%s.mlp.shared_expert.up_proj", p);
	add_linear(b, m, H, a->shared_inter, db, 1.0f, -1, false, input_order(b, i, 1));
	snprintf(m, sizeof(m), "%s.mlp.shared_expert.down_proj", p);
	add_linear(b, m, a->shared_inter, H, db, OUT_RMS / (SILU_RMS * MOE_MIX), skew, false, 0);
	snprintf(m, sizeof(m), "%s.mlp.shared_expert_gate", p);
	add_linear(b, m, H, 1, 16, 1.0f, -1, false, 0);
	snprintf(m, sizeof(m), "%s.input_layernorm.weight", p);
	add_vec(b, m, H, zero_centred_norm());
	snprintf(m, sizeof(m), "%s.post_attention_layernorm.weight", p);
	add_vec(b, m, H, zero_centred_norm());
}

/* Router biases per layer: the calibrated bias of each expert's popularity rank (a random
 * permutation per layer), divided by the skew channel's expected value after that layer's
 * post-attention norm. */
static int plan_skew(struct q3_synth *s, q3_err *e)
{
	const struct q3_synth_arch *a = &s->arch;
	int E = a->experts, H = a->hidden;
	double *bias = calloc((size_t)E, sizeof(double));
	int *perm = calloc((size_t)E, sizeof(int));

	s->router_bias = calloc((size_t)a->layers * (size_t)E, sizeof(float));
	if (!bias || !perm || !s->router_bias) {
		free(bias);
		free(perm);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	if (calibrate_router(E, a->top_k, s->opt.zipf, s->opt.seed ^ 0x2545f4914f6cdd1dull, bias,
			     &s->zipf_top1, &s->zipf_top10)) {
		free(bias);
		free(perm);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	s->skew_channel = 0;
	/* C such that C / rms(h_0) = kappa, with the other H - 1 channels of RMS 1 */
	s->embed_const = sqrt(SKEW_KAPPA * SKEW_KAPPA * (H - 1) / (H - SKEW_KAPPA * SKEW_KAPPA));
	for (int l = 0; l < a->layers; l++) {
		/* before layer l's MoE, 2l + 1 sub-layers have each added OUT_RMS^2 of energy */
		double en = 1.0 + (2.0 * l + 1.0) * OUT_RMS * OUT_RMS;
		double C = s->embed_const, kappa = C / sqrt((C * C + (H - 1) * en) / H);

		for (int x = 0; x < E; x++)
			perm[x] = x;
		for (int x = E - 1; x > 0; x--) {
			int j = (int)(rnd(s->opt.seed ^ 0x9e37ull, (uint64_t)l * (uint64_t)E + (uint64_t)x) %
				      (uint64_t)(x + 1));
			int tmp = perm[x];
			perm[x] = perm[j], perm[j] = tmp;
		}
		for (int r = 0; r < E; r++) /* the expert of rank r is perm[r] */
			s->router_bias[(size_t)l * E + perm[r]] = (float)(bias[r] / kappa);
	}
	free(bias);
	free(perm);
	return 0;
}

/* ---- shards and layout -------------------------------------------------------------------- */

/* The order of huggingface/safetensors' Dtype enum: files list tensors by it, descending. */
static int dtype_rank(enum q3_dtype d)
{
	switch (d) {
	case Q3_DT_BOOL: return 0;
	case Q3_DT_U8: return 4;
	case Q3_DT_I8: return 5;
	case Q3_DT_F8_E5M2: return 6;
	case Q3_DT_F8_E4M3: return 7;
	case Q3_DT_I16: return 9;
	case Q3_DT_U16: return 10;
	case Q3_DT_F16: return 11;
	case Q3_DT_BF16: return 12;
	case Q3_DT_I32: return 13;
	case Q3_DT_U32: return 14;
	case Q3_DT_F32: return 15;
	case Q3_DT_F64: return 16;
	case Q3_DT_I64: return 17;
	case Q3_DT_U64: return 18;
	default: return 0;
	}
}

static int cmp_layout(const void *pa, const void *pb)
{
	const struct q3_synth_tensor *a = pa, *b = pb;

	if (a->shard != b->shard)
		return a->shard < b->shard ? -1 : 1;
	if (dtype_rank(a->dtype) != dtype_rank(b->dtype))
		return dtype_rank(a->dtype) > dtype_rank(b->dtype) ? -1 : 1;
	return strcmp(a->name, b->name);
}

static int layout(struct q3_synth *s, q3_err *e)
{
	uint64_t cur = 0;
	int shard = 0;

	/* huggingface_hub split_torch_state_dict_into_shards: a new shard when the next tensor
	 * would pass the limit */
	for (size_t i = 0; i < s->ntensors; i++) {
		if (cur && cur + s->t[i].nbytes > s->opt.shard_size)
			shard++, cur = 0;
		s->t[i].shard = shard;
		cur += s->t[i].nbytes;
	}
	s->nshards = shard + 1;
	if (s->nshards > 99999)
		return q3_errf(e, -EINVAL, "--shard-size: %d shards, more than the 99999 the file names allow",
			       s->nshards);
	qsort(s->t, s->ntensors, sizeof(*s->t), cmp_layout);
	s->shards = calloc((size_t)s->nshards, sizeof(*s->shards));
	if (!s->shards)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (size_t i = 0; i < s->ntensors;) {
		struct q3_synth_shard *sh = &s->shards[s->t[i].shard];
		struct q3_st_out *out;
		size_t j = i;
		uint64_t off;
		int err;

		while (j < s->ntensors && s->t[j].shard == s->t[i].shard)
			j++;
		snprintf(sh->name, sizeof(sh->name), "model-%05d-of-%05d.safetensors", s->t[i].shard + 1,
			 s->nshards);
		sh->first = i, sh->n = j - i;
		out = calloc(sh->n, sizeof(*out));
		if (!out)
			return q3_errf(e, -ENOMEM, "out of memory");
		for (size_t k = 0; k < sh->n; k++) {
			const struct q3_synth_tensor *t = &s->t[i + k];
			out[k] = (struct q3_st_out){ .name = t->name, .dtype = t->dtype, .ndim = t->ndim };
			memcpy(out[k].shape, t->shape, sizeof(t->shape));
		}
		err = q3_st_build_header(out, sh->n, &sh->header, &sh->header_len, e);
		free(out);
		if (err)
			return err;
		off = sh->header_len;
		for (size_t k = i; k < j; k++) {
			s->t[k].off = off;
			off += s->t[k].nbytes;
		}
		sh->size = off;
		s->file_bytes += off;
		i = j;
	}
	return 0;
}

int q3_synth_plan(const struct q3_synth_opts *o, struct q3_synth *s, q3_err *e)
{
	struct builder b = { .s = s, .e = e };
	const struct q3_synth_arch *a = NULL;
	int err;

	memset(s, 0, sizeof(*s));
	for (size_t i = 0; i < Q3_ARRAY_SIZE(arches); i++)
		if (o->preset && !strcmp(o->preset, arches[i].name))
			a = &arches[i];
	if (!a)
		return q3_errf(e, -EINVAL, "--preset %s: unknown (tiny, 80b-a3b)", o->preset ? o->preset : "(none)");
	s->arch = *a;
	s->opt = *o;
	if (o->layers)
		s->arch.layers = o->layers;
	if (o->experts)
		s->arch.experts = o->experts;
	if (o->vocab)
		s->arch.vocab = o->vocab;
	if (s->arch.vocab < 256 || s->arch.vocab > 1 << 20)
		return q3_errf(e, -EINVAL, "--vocab %d: expected 256..1048576", s->arch.vocab);
	if (s->arch.layers < 1 || s->arch.layers > 1024)
		return q3_errf(e, -EINVAL, "--layers %d: expected 1..1024", s->arch.layers);
	if (s->arch.experts < s->arch.top_k || s->arch.experts > 4096)
		return q3_errf(e, -EINVAL, "--experts %d: expected %d..4096 (at least top_k)", s->arch.experts,
			       s->arch.top_k);
	if (o->expert_bits != 4 && o->expert_bits != 8)
		return q3_errf(e, -EINVAL, "--experts-bits %d: expected 4 or 8", o->expert_bits);
	if (o->dense_bits != 4 && o->dense_bits != 8 && o->dense_bits != 16)
		return q3_errf(e, -EINVAL, "--dense: expected q4, q8 or bf16");
	if (o->group_size < 32 || o->group_size > 4096 || o->group_size & (o->group_size - 1))
		return q3_errf(e, -EINVAL, "--group-size %d: expected a power of two in 32..4096", o->group_size);
	if (o->act_order && !o->g_idx)
		return q3_errf(e, -EINVAL, "--act-order needs g_idx (drop --no-g-idx)");
	if (!(o->zipf >= 0 && o->zipf <= 4))
		return q3_errf(e, -EINVAL, "--zipf %g: expected 0..4", o->zipf);
	if (o->shard_size < (1u << 20))
		return q3_errf(e, -EINVAL, "--shard-size: at least 1 MiB");
	a = &s->arch;
	b.seed = rnd(o->seed, 0x51a7);
	if (o->zipf > 0 && (err = plan_skew(s, e)))
		return err;

	{
		int64_t emb[2] = { a->vocab, a->hidden };
		struct q3_gen g = octave(1.0f, false);
		if (o->zipf > 0) {
			g.fix_col = s->skew_channel;
			g.colval = (float)s->embed_const;
		}
		add(&b, "model.embed_tokens.weight", Q3_DT_BF16, 2, emb, g);
	}
	for (int i = 0; i < a->layers && !b.err; i++)
		add_layer(&b, i);
	add_vec(&b, "model.norm.weight", a->hidden, zero_centred_norm());
	add_linear(&b, "lm_head", a->hidden, a->vocab, 16, 2.0f, -1, false, 0);
	if (b.err)
		return b.err;
	for (size_t i = 0; i < s->ntensors; i++)
		if (s->t[i].expert)
			s->expert_bytes += s->t[i].nbytes;
	return layout(s, e);
}

void q3_synth_free(struct q3_synth *s)
{
	for (size_t i = 0; i < s->ntensors; i++)
		free(s->t[i].name);
	for (int i = 0; i < s->nshards; i++)
		free(s->shards[i].header);
	free(s->t);
	free(s->shards);
	free(s->router_bias);
	memset(s, 0, sizeof(*s));
}

/* ---- JSON files --------------------------------------------------------------------------- */

static json_t *quant_config(const struct q3_synth *s)
{
	const struct q3_synth_opts *o = &s->opt;
	json_t *q = json_object();

	json_object_set_new(q, "bits", json_integer(o->expert_bits));
	json_object_set_new(q, "group_size", json_integer(o->group_size));
	json_object_set_new(q, "desc_act", json_boolean(o->g_idx && o->act_order));
	json_object_set_new(q, "sym", json_true());
	json_object_set_new(q, "lm_head", json_false());
	json_object_set_new(q, "quant_method", json_string("gptq"));
	json_object_set_new(q, "checkpoint_format", json_string("gptq"));
	json_object_set_new(q, "true_sequential", json_true());
	json_object_set_new(q, "damp_percent", json_real(0.01));
	/* GPTQModel per-module overrides: the non-expert Linears' bits, or "-:" = left in BF16 */
	if (o->dense_bits != o->expert_bits) {
		const char *re = "model\\.layers\\.\\d+\\.(self_attn|linear_attn|mlp\\.shared_expert)\\.";
		json_t *dyn = json_object(), *rule = json_object();
		char key[160];

		if (o->dense_bits == 16) {
			snprintf(key, sizeof(key), "-:%s", re);
		} else {
			snprintf(key, sizeof(key), "+:%s", re);
			json_object_set_new(rule, "bits", json_integer(o->dense_bits));
		}
		json_object_set_new(dyn, key, rule);
		json_object_set_new(q, "dynamic", dyn);
	}
	return q;
}

static json_t *config(const struct q3_synth *s)
{
	const struct q3_synth_arch *a = &s->arch;
	json_t *c = json_object();

	json_object_set_new(c, "architectures", json_pack("[s]", "Qwen3NextForCausalLM"));
	json_object_set_new(c, "model_type", json_string("qwen3_next"));
	json_object_set_new(c, "attention_bias", json_false());
	json_object_set_new(c, "attention_dropout", json_real(0.0));
	json_object_set_new(c, "bos_token_id", json_integer(151643));
	json_object_set_new(c, "eos_token_id", json_integer(151645));
	json_object_set_new(c, "decoder_sparse_step", json_integer(1));
	json_object_set_new(c, "full_attention_interval", json_integer(a->full_interval));
	json_object_set_new(c, "head_dim", json_integer(a->head_dim));
	json_object_set_new(c, "hidden_act", json_string("silu"));
	json_object_set_new(c, "hidden_size", json_integer(a->hidden));
	json_object_set_new(c, "initializer_range", json_real(0.02));
	json_object_set_new(c, "intermediate_size", json_integer(a->intermediate));
	json_object_set_new(c, "linear_conv_kernel_dim", json_integer(a->conv_kernel));
	json_object_set_new(c, "linear_key_head_dim", json_integer(a->lin_k_dim));
	json_object_set_new(c, "linear_num_key_heads", json_integer(a->lin_k_heads));
	json_object_set_new(c, "linear_num_value_heads", json_integer(a->lin_v_heads));
	json_object_set_new(c, "linear_value_head_dim", json_integer(a->lin_v_dim));
	json_object_set_new(c, "max_position_embeddings", json_integer(262144));
	json_object_set_new(c, "mlp_only_layers", json_array());
	json_object_set_new(c, "moe_intermediate_size", json_integer(a->moe_inter));
	json_object_set_new(c, "norm_topk_prob", json_true());
	json_object_set_new(c, "num_attention_heads", json_integer(a->heads));
	json_object_set_new(c, "num_experts", json_integer(a->experts));
	json_object_set_new(c, "num_experts_per_tok", json_integer(a->top_k));
	json_object_set_new(c, "num_hidden_layers", json_integer(a->layers));
	json_object_set_new(c, "num_key_value_heads", json_integer(a->kv_heads));
	json_object_set_new(c, "output_router_logits", json_false());
	json_object_set_new(c, "partial_rotary_factor", json_real(0.25));
	json_object_set_new(c, "rms_norm_eps", json_real(1e-6));
	json_object_set_new(c, "rope_scaling", json_null());
	json_object_set_new(c, "rope_theta", json_real(1e7));
	json_object_set_new(c, "router_aux_loss_coef", json_real(0.001));
	json_object_set_new(c, "shared_expert_intermediate_size", json_integer(a->shared_inter));
	json_object_set_new(c, "tie_word_embeddings", json_false());
	json_object_set_new(c, "torch_dtype", json_string("bfloat16"));
	json_object_set_new(c, "use_cache", json_true());
	json_object_set_new(c, "vocab_size", json_integer(a->vocab));
	json_object_set_new(c, "quantization_config", quant_config(s));
	return c;
}

static json_t *index_json(const struct q3_synth *s)
{
	json_t *root = json_object(), *meta = json_object(), *wm = json_object();

	json_object_set_new(meta, "total_size", json_integer((json_int_t)s->tensor_bytes));
	for (size_t i = 0; i < s->ntensors; i++)
		json_object_set_new_nocheck(wm, s->t[i].name, json_string(s->shards[s->t[i].shard].name));
	json_object_set_new(root, "metadata", meta);
	json_object_set_new(root, "weight_map", wm);
	return root;
}

int q3_synth_json(const struct q3_synth *s, const char *which, char **out, q3_err *e)
{
	json_t *j;
	size_t flags = JSON_INDENT(2) | JSON_PRESERVE_ORDER;

	if (!strcmp(which, "config.json")) {
		j = config(s);
	} else if (!strcmp(which, "quantize_config.json")) {
		j = quant_config(s);
	} else if (!strcmp(which, "generation_config.json")) {
		j = json_pack("{s:i, s:[i, i], s:b, s:f, s:f, s:i}", "bos_token_id", 151643, "eos_token_id",
			      151645, 151643, "do_sample", 1, "temperature", 0.7, "top_p", 0.8, "top_k", 20);
	} else if (!strcmp(which, "model.safetensors.index.json")) {
		j = index_json(s);
		flags = JSON_INDENT(2) | JSON_SORT_KEYS;
	} else {
		return q3_errf(e, -EINVAL, "%s: not a file of the model folder", which);
	}
	*out = j ? json_dumps(j, flags) : NULL;
	json_decref(j);
	if (!*out)
		return q3_errf(e, -ENOMEM, "out of memory writing %s", which);
	return 0;
}
