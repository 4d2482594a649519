/* gpu_weights.cu - weights in the kernels' tile format: the plan (format and sizes, decided on the
 * host from the stored Linears), the upload and repack (raw GPTQ or dense tensors copied to the
 * device, then rearranged by a kernel), and the expansion back to an fp16 row-major matrix (for
 * cuBLAS in prefill, and for the tests).
 *
 * Tile format.  Output rows come in tiles of 16, inputs in chunks of 64 (four mma k-steps of 16);
 * K is first permuted (act-order: inputs sorted by group, so that groups are contiguous runs) and
 * padded to whole chunks, N padded to whole tiles.  For k-step s of a chunk, lane l = 4g + t of a
 * warp holds the mma.m16n8k16 A fragment
 *     reg0 = rows g,   inputs 16s + 2t + {0,1}      reg1 = rows g+8, inputs 16s + 2t + {0,1}
 *     reg2 = rows g,   inputs 16s + 2t + 8 + {0,1}  reg3 = rows g+8, inputs 16s + 2t + 8 + {0,1}
 * (the lower input of a pair in the lower half).  Per (tile, chunk):
 *  - Q4:   512 bytes: lane l's 16 bytes at l·16; word s is k-step s; regR element E is the
 *          nibble R + 4E, so (word >> 4R) & 0x000F000F puts both codes of regR in place;
 *  - Q8:   1024 bytes: two 512-byte parts (k-steps 0-1, 2-3); in part p lane l's 16 bytes hold
 *          words (2(s & 1) + (R >> 1)) with bytes (2(R & 1) + E), s = 2p + (s & 1);
 *  - F16:  2048 bytes: four 512-byte parts, part s = k-step s, lane l's 16 bytes = reg0..reg3.
 * So a warp reads each 512-byte part with one fully coalesced 16-byte load per lane.
 * Scales and zero points are fp32 [tile][group][16 rows]; codes are stored as they are, and the
 * kernels form q − z exactly in fp16, multiply by the group's scale in fp32.  Dense weights are
 * stored fp16 (bf16 and f32 checkpoints converted, saturating at +-65504).
 */
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "gpu.h"

extern "C" {
#include "dequant.h"
#include "half.h"
#include "model.h"
}

/* ---- plan ----------------------------------------------------------------------------------- */

static uint32_t u32_at(const struct q3_tensor *t, size_t i)
{
	return q3_tensor_u32_at(t, i);
}

static int gptq_zero(const struct q3_linear *l, int g, int n)
{
	int P = 32 / l->bits, mask = (1 << l->bits) - 1;
	uint32_t w = u32_at(l->qzeros, (size_t)g * (l->N / P) + n / P);

	return (int)((((w >> (l->bits * (n % P))) & mask) + l->zero_offset) & mask);
}

/* Whether l's zero points are all the symmetric value 2^(bits-1). */
static bool gptq_symmetric(const struct q3_linear *l)
{
	int sym = 1 << (l->bits - 1);

	for (int g = 0; g < l->ngroups; g++)
		for (int n = 0; n < l->N; n++)
			if (gptq_zero(l, g, n) != sym)
				return false;
	return true;
}

/* The error of q3_gptq_order's r < 0 where the plan had found the order */
static int order_failed(int r, q3_err *e)
{
	return r == -ENOMEM ? q3_errf(e, -ENOMEM, "out of memory")
			    : q3_errf(e, -EINVAL, "gpu weights: act-order groups changed since the plan");
}

static size_t align256(size_t x)
{
	return (x + 255) & ~(size_t)255;
}

static size_t chunk_bytes(int fmt)
{
	return fmt == Q3G_Q4 ? Q3G_CHUNK_BYTES_Q4 : fmt == Q3G_Q8 ? Q3G_CHUNK_BYTES_Q8 : Q3G_CHUNK_BYTES_F16;
}

extern "C" int q3g_mat_plan(const struct q3_linear *const *ls, int nmat, struct q3g_mat_plan *p,
			    q3_err *e)
{
	const struct q3_linear *l0 = ls[0];
	int *perm = NULL;
	bool dense16 = false;

	memset(p, 0, sizeof(*p));
	p->N = l0->N;
	p->K = l0->K;
	p->nmat = nmat;
	p->ntiles = cdiv(p->N, Q3G_TILE_N);
	p->nchunks = cdiv(p->K, Q3G_KCHUNK);
	for (int i = 0; i < nmat; i++) {
		const struct q3_linear *l = ls[i];

		if (l->N != l0->N || l->K != l0->K)
			return q3_errf(e, -EINVAL, "gpu weights: a stack mixes shapes [%d, %d] and [%d, %d]",
				       l0->N, l0->K, l->N, l->K);
		/* the tile formats: same quantization across the stack, whole groups (a partial last
		 * group would get no scale), and a permutation that fits 16 bits */
		if (l->fmt == Q3_W_DENSE || l->fmt != l0->fmt || l->bits != l0->bits ||
		    l->group_size != l0->group_size || l->group_size % Q3G_KSTEP || l->K % Q3G_KSTEP ||
		    l->K % l->group_size || l->K >= 0xffff || (l->bits != 4 && l->bits != 8))
			dense16 = true;
	}
	if (!dense16) {
		perm = (int *)malloc(sizeof(int) * (size_t)p->K);
		if (!perm)
			return q3_errf(e, -ENOMEM, "out of memory");
		for (int i = 0; i < nmat && !dense16; i++) {
			int r = q3_gptq_order(ls[i], perm, NULL);

			if (r == -ENOMEM) {
				free(perm);
				return q3_errf(e, -ENOMEM, "out of memory");
			}
			if (r < 0) /* groups not runs of group_size inputs: no fast path */
				dense16 = true;
			else if (r == 0)
				p->perm = true;
			if (!p->zeros && !gptq_symmetric(ls[i]))
				p->zeros = true;
		}
		free(perm);
	}
	if (dense16) {
		p->fmt = Q3G_F16;
		p->perm = p->zeros = false;
	} else {
		p->fmt = l0->bits == 4 ? Q3G_Q4 : Q3G_Q8;
		p->gsteps = l0->group_size / Q3G_KSTEP;
		p->ngroups = cdiv(p->nchunks * Q3G_KCHUNK, l0->group_size);
		p->sz_floats = (size_t)p->ntiles * p->ngroups * Q3G_TILE_N;
	}
	p->data_bytes = (size_t)p->ntiles * p->nchunks * chunk_bytes(p->fmt);
	p->perm_entries = p->perm ? (size_t)p->nchunks * Q3G_KCHUNK : 0;
	return 0;
}

static size_t data_stride(const struct q3g_mat_plan *p)
{
	return align256(p->data_bytes);
}

extern "C" size_t q3g_mat_bytes(const struct q3g_mat_plan *p)
{
	size_t n = (size_t)p->nmat;

	return n * data_stride(p) + align256(n * p->sz_floats * 4) * (p->zeros ? 2 : 1) +
	       (p->sorted ? 0 : align256(n * p->perm_entries * 2));
}

extern "C" void q3g_mat_place(struct q3g_mat *m, const struct q3g_mat_plan *p, void *mem)
{
	char *c = (char *)mem;
	size_t n = (size_t)p->nmat;

	memset(m, 0, sizeof(*m));
	m->fmt = p->fmt;
	m->N = p->N;
	m->K = p->K;
	m->ntiles = p->ntiles;
	m->nchunks = p->nchunks;
	m->gsteps = p->gsteps;
	m->ngroups = p->ngroups;
	m->nmat = p->nmat;
	m->data = c;
	m->data_stride = data_stride(p);
	c += n * m->data_stride;
	m->sz_stride = p->sz_floats;
	if (p->fmt != Q3G_F16) {
		m->scales = (const float *)c;
		c += align256(n * p->sz_floats * 4);
		if (p->zeros) {
			m->zeros = (const float *)c;
			c += align256(n * p->sz_floats * 4);
		}
	}
	if (p->perm) {
		/* a sorted stack's stride too: the permutation it borrows has the same layout */
		m->perm_stride = p->perm_entries;
		if (p->sorted)
			m->sorted = true;
		else
			m->perm = (const uint16_t *)c;
	}
}

/* ---- repack kernels --------------------------------------------------------------------------- */

/* Where the element (reg R, element E) of k-step s of lane l lives, and which row / input it is. */
static __device__ __forceinline__ void frag_pos(int l, int s, int R, int E, int *row, int *kin)
{
	int g = l >> 2, t = l & 3;

	*row = g + 8 * (R & 1);
	*kin = 16 * s + 2 * t + 8 * (R >> 1) + E;
}

struct gptq_src {
	const uint32_t *qweight; /* [K / P][Nsrc] */
	const uint32_t *qzeros;	 /* [ngroups][Nsrc / P] */
	const uint16_t *scales;	 /* [ngroups][Nsrc], f16 or bf16 */
	const int *gidx;	 /* [K] or NULL: k / G (only for the fp16 fallback) */
	const uint16_t *perm;	 /* [Kp] or NULL */
	const int *rowmap;	 /* [N] or NULL */
	int N, K, bits, G, zero_off, scales_bf16;
};

static __device__ __forceinline__ int src_row(const gptq_src &s, int n)
{
	return s.rowmap ? s.rowmap[n] : n;
}

static __device__ __forceinline__ int gptq_code(const gptq_src &s, int n, int k)
{
	int P = 32 / s.bits;

	return (int)((s.qweight[(size_t)(k / P) * s.N + src_row(s, n)] >> (s.bits * (k % P))) & ((1u << s.bits) - 1));
}

static __device__ __forceinline__ int gptq_zero_dev(const gptq_src &s, int g, int n)
{
	int P = 32 / s.bits, mask = (1 << s.bits) - 1, r = src_row(s, n);
	uint32_t w = s.qzeros[(size_t)g * (s.N / P) + r / P];

	return (int)((((w >> (s.bits * (r % P))) & mask) + s.zero_off) & mask);
}

static __device__ __forceinline__ float half_bits(uint16_t h, int is_bf16)
{
	if (is_bf16)
		return __uint_as_float((uint32_t)h << 16);
	return __half2float(__ushort_as_half(h));
}

/* repack_gptq_at for 4-bit codes in whole tiles and chunks, no permutation or row map: lane (g, t)
 * holds rows g and g + 8 of the tile, at k = 16 st + 8 h + 2 t + E; those are nibbles 2t and
 * 2t + 1 of word 2 st + h of the chunk's 8 words of each row.  16 loads, no divisions. */
static __device__ __forceinline__ uint4 repack_q4_lane(const gptq_src &s, int tile, int ch, int l)
{
	const int g = l >> 2, t = l & 3, r0 = tile * Q3G_TILE_N + g;
	const uint32_t *q = s.qweight + (size_t)ch * (Q3G_KCHUNK / 8) * s.N + r0;
	uint32_t w[4];

#pragma unroll
	for (int st = 0; st < 4; st++) {
		uint32_t acc = 0;

#pragma unroll
		for (int h = 0; h < 2; h++) {
			uint32_t a = q[(size_t)(2 * st + h) * s.N], b = q[(size_t)(2 * st + h) * s.N + 8];

#pragma unroll
			for (int E = 0; E < 2; E++) {
				uint32_t qa = (a >> (8 * t + 4 * E)) & 15, qb = (b >> (8 * t + 4 * E)) & 15;

				acc |= qa << (4 * (2 * h + 4 * E)) | qb << (4 * (2 * h + 1 + 4 * E));
			}
		}
		w[st] = acc;
	}
	return make_uint4(w[0], w[1], w[2], w[3]);
}

/* One thread per (tile, chunk, lane): its 16 (Q4) or 32 (Q8) bytes of codes. */
static __device__ void repack_gptq_at(const gptq_src &s, uint8_t *dst, int ntiles, int nchunks, size_t id)
{
	int l = (int)(id & 31);
	size_t tc = id >> 5;

	if (tc >= (size_t)ntiles * nchunks)
		return;
	if (s.bits == 4 && !s.perm && !s.rowmap && s.N % Q3G_TILE_N == 0 && s.K % Q3G_KCHUNK == 0) {
		int tci = (int)tc, tile = tci / nchunks, ch = tci - tile * nchunks;

		((uint4 *)(dst + tc * Q3G_CHUNK_BYTES_Q4))[l] = repack_q4_lane(s, tile, ch, l);
		return;
	}
	int tile = (int)(tc / nchunks), ch = (int)(tc % nchunks);
	uint32_t w[8] = { 0, 0, 0, 0, 0, 0, 0, 0 };

	for (int st = 0; st < 4; st++)
		for (int R = 0; R < 4; R++)
			for (int E = 0; E < 2; E++) {
				int row, kin, q = 0;

				frag_pos(l, st, R, E, &row, &kin);
				row += tile * Q3G_TILE_N;
				kin += ch * Q3G_KCHUNK;
				if (row < s.N && kin < s.K) {
					int k = s.perm ? s.perm[kin] : kin;

					q = gptq_code(s, row, k);
				}
				if (s.bits == 4)
					w[st] |= (uint32_t)q << (4 * (R + 4 * E));
				else
					w[4 * (st >> 1) + 2 * (st & 1) + (R >> 1)] |= (uint32_t)q << (8 * (2 * (R & 1) + E));
			}
	if (s.bits == 4) {
		uint4 *o = (uint4 *)(dst + tc * Q3G_CHUNK_BYTES_Q4) + l;

		*o = make_uint4(w[0], w[1], w[2], w[3]);
	} else {
		uint4 *o = (uint4 *)(dst + tc * Q3G_CHUNK_BYTES_Q8);

		o[l] = make_uint4(w[0], w[1], w[2], w[3]);
		o[32 + l] = make_uint4(w[4], w[5], w[6], w[7]);
	}
}

__global__ void repack_gptq_kernel(gptq_src s, uint8_t *dst, int ntiles, int nchunks)
{
	repack_gptq_at(s, dst, ntiles, nchunks, (size_t)blockIdx.x * blockDim.x + threadIdx.x);
}

/* One thread per (tile, group, row): scale and zero point, fp32; 0 / symmetric for padding. */
static __device__ void repack_scales_at(const gptq_src &s, float *sc, float *zr, int ntiles, int ngroups, size_t id)
{
	if (id >= (size_t)ntiles * ngroups * Q3G_TILE_N)
		return;
	int rr = (int)(id % Q3G_TILE_N), g = (int)(id / Q3G_TILE_N % ngroups);
	int row = (int)(id / ((size_t)Q3G_TILE_N * ngroups)) * Q3G_TILE_N + rr;
	float scale = 0.0f, zero = (float)(1 << (s.bits - 1));

	if (row < s.N && g < s.K / s.G) {
		scale = half_bits(s.scales[(size_t)g * s.N + src_row(s, row)], s.scales_bf16);
		zero = (float)gptq_zero_dev(s, g, row);
	}
	sc[id] = scale;
	if (zr)
		zr[id] = zero;
}

__global__ void repack_scales_kernel(gptq_src s, float *sc, float *zr, int ntiles, int ngroups)
{
	repack_scales_at(s, sc, zr, ntiles, ngroups, (size_t)blockIdx.x * blockDim.x + threadIdx.x);
}

/* Raw GPTQ tensors of up to Q3G_RAW_BATCH matrices on the device: matrix j's qweight, qzeros and
 * scales at base + off[j][0..2] (by value: a kernel parameter, no table to upload). */
struct raw_batch {
	const char *base;
	uint64_t off[Q3G_RAW_BATCH][3];
};

/* blockIdx.y: the matrix of the batch; codes (part 0) or scales (part 1) by blockIdx.z */
__global__ void repack_raw_kernel(gptq_src s, raw_batch rb, uint8_t *dst, size_t dst_stride, float *sc, float *zr,
				  size_t sz_stride, int ntiles, int nchunks, int ngroups)
{
	int j = blockIdx.y;
	size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	s.qweight = (const uint32_t *)(rb.base + rb.off[j][0]);
	s.qzeros = (const uint32_t *)(rb.base + rb.off[j][1]);
	s.scales = (const uint16_t *)(rb.base + rb.off[j][2]);
	if (blockIdx.z == 0)
		repack_gptq_at(s, dst + (size_t)j * dst_stride, ntiles, nchunks, id);
	else
		repack_scales_at(s, sc + (size_t)j * sz_stride, zr ? zr + (size_t)j * sz_stride : NULL, ntiles, ngroups,
				 id);
}

/* Dense source: rows [0, N) of [N][K] in F32 / F16 / BF16 (dtype 0 / 1 / 2), or a GPTQ Linear
 * dequantized (fallback); one thread per (tile, chunk, lane), 64 bytes of fp16. */
struct dense_src {
	const void *w;	/* [rows][K] */
	int dtype;	/* 0 f32, 1 f16, 2 bf16 */
	int row0;	/* first row of the slice in w */
	int nrows;	/* rows in the slice */
};

static __device__ __forceinline__ float dense_at(const dense_src &d, int K, int row, int k)
{
	size_t i = (size_t)(row - d.row0) * K + k;

	if (d.dtype == 0)
		return ((const float *)d.w)[i];
	return half_bits(((const uint16_t *)d.w)[i], d.dtype == 2);
}

static __device__ __forceinline__ float gptq_dequant(const gptq_src &s, int row, int k)
{
	int g = s.gidx ? s.gidx[k] : k / s.G;
	float sc = half_bits(s.scales[(size_t)g * s.N + src_row(s, row)], s.scales_bf16);

	return sc * (float)(gptq_code(s, row, k) - gptq_zero_dev(s, g, row));
}

__global__ void repack_f16_kernel(dense_src d, gptq_src s, bool from_gptq, uint8_t *dst, int N, int K,
				   int tile0, int ntiles, int nchunks)
{
	size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	int l = (int)(id & 31);
	size_t tc = id >> 5;

	if (tc >= (size_t)ntiles * nchunks)
		return;
	int tile = tile0 + (int)(tc / nchunks), ch = (int)(tc % nchunks);
	uint8_t *base = dst + ((size_t)tile * nchunks + ch) * Q3G_CHUNK_BYTES_F16;

	for (int st = 0; st < 4; st++) {
		uint32_t w[4];

		for (int R = 0; R < 4; R++) {
			float v[2];

			for (int E = 0; E < 2; E++) {
				int row, kin;

				frag_pos(l, st, R, E, &row, &kin);
				row += tile * Q3G_TILE_N;
				kin += ch * Q3G_KCHUNK;
				v[E] = 0.0f;
				if (row < N && kin < K)
					v[E] = from_gptq ? gptq_dequant(s, row, kin) : dense_at(d, K, row, kin);
			}
			w[R] = pack_h2(v[0], v[1]);
		}
		*((uint4 *)(base + st * 512) + l) = make_uint4(w[0], w[1], w[2], w[3]);
	}
}

/* ---- upload --------------------------------------------------------------------------------- */

static int dtype_code(enum q3_dtype dt)
{
	return dt == Q3_DT_F32 ? 0 : dt == Q3_DT_F16 ? 1 : 2;
}

/* Copies n bytes from host memory src (the loader's RAM home: pinned or not, the driver copes)
 * into the device stage at offset off. */
static int stage_put(struct q3g_stage *sg, size_t off, const void *src, size_t n, cudaStream_t st,
		     q3_err *e)
{
	CUDA_CHECK(e, cudaMemcpyAsync((char *)sg->dev + off, src, n, cudaMemcpyHostToDevice, st));
	return 0;
}

static int upload_dense(const struct q3g_mat *m, int idx, const struct q3_linear *l, const int *rowmap,
			struct q3g_stage *sg, cudaStream_t st, q3_err *e)
{
	size_t esz = q3_dtype_size(l->w->dtype), rowb = (size_t)l->K * esz;
	/* rows per slice: whole tiles that fit the stage */
	int tiles = (int)(sg->bytes / (rowb * Q3G_TILE_N));
	uint8_t *dst = (uint8_t *)m->data + (size_t)idx * m->data_stride;
	gptq_src none;

	memset(&none, 0, sizeof(none));
	if (tiles < 1)
		return q3_errf(e, -EINVAL, "gpu weights: staging buffer too small for rows of %zu bytes", rowb);
	for (int t0 = 0; t0 < m->ntiles; t0 += tiles) {
		int nt = Q3_MIN(tiles, m->ntiles - t0);
		int r0 = t0 * Q3G_TILE_N, r1 = Q3_MIN(l->N, (t0 + nt) * Q3G_TILE_N);

		if (r1 > r0) {
			if (rowmap) {
				for (int r = r0; r < r1; r++)
					memcpy((char *)sg->host + (size_t)(r - r0) * rowb,
					       (const char *)l->w->data + (size_t)rowmap[r] * rowb, rowb);
				CUDA_CHECK(e, cudaMemcpyAsync(sg->dev, sg->host, (size_t)(r1 - r0) * rowb,
							      cudaMemcpyHostToDevice, st));
			} else {
				int err = stage_put(sg, 0, (const char *)l->w->data + (size_t)r0 * rowb,
						    (size_t)(r1 - r0) * rowb, st, e);
				if (err)
					return err;
			}
		}
		dense_src d = { sg->dev, dtype_code(l->w->dtype), r0, r1 - r0 };
		size_t threads = (size_t)nt * m->nchunks * 32;

		repack_f16_kernel<<<(unsigned)cdiv((int)threads, 256), 256, 0, st>>>(d, none, false, dst, l->N, l->K,
										       t0, nt, m->nchunks);
		CUDA_CHECK_LAUNCH(e);
		CUDA_CHECK(e, cudaStreamSynchronize(st)); /* the stage is reused by the next slice */
	}
	return 0;
}

/* The shape and quantization facts of a GPTQ Linear; the pointers are the caller's to set. */
static void gptq_src_init(gptq_src *s, const struct q3_linear *l)
{
	memset(s, 0, sizeof(*s));
	s->N = l->N;
	s->K = l->K;
	s->bits = l->bits;
	s->G = l->group_size;
	s->zero_off = l->zero_offset;
	s->scales_bf16 = l->scales->dtype == Q3_DT_BF16;
}

extern "C" int q3g_mat_upload(const struct q3g_mat *m, int idx, const struct q3_linear *l,
			      const int *rowmap, struct q3g_stage *sg, q3g_stream stream, q3_err *e)
{
	cudaStream_t st = (cudaStream_t)stream;
	size_t off = 0, qw_b, qz_b, sc_b, gi_b, rm_b;
	gptq_src s;
	int err;

	if (l->fmt == Q3_W_DENSE)
		return upload_dense(m, idx, l, rowmap, sg, st, e);
	qw_b = q3_tensor_numel(l->qweight) * 4;
	qz_b = q3_tensor_numel(l->qzeros) * 4;
	sc_b = q3_tensor_numel(l->scales) * 2;
	gi_b = l->g_idx ? (size_t)l->K * 4 : 0;
	rm_b = rowmap ? (size_t)l->N * 4 : 0;
	if (align256(qw_b) + align256(qz_b) + align256(sc_b) + align256(gi_b) + align256(rm_b) +
		    align256((size_t)m->nchunks * Q3G_KCHUNK * 2) > sg->bytes)
		return q3_errf(e, -EINVAL, "gpu weights: staging buffer too small for a GPTQ Linear [%d, %d]",
			       l->N, l->K);
	gptq_src_init(&s, l);
#define PUT(field, type, src, n)                                                               \
	do {                                                                                   \
		if ((err = stage_put(sg, off, src, n, st, e)))                                 \
			return err;                                                            \
		s.field = (type)((char *)sg->dev + off);                                       \
		off += align256(n);                                                            \
	} while (0)
	PUT(qweight, const uint32_t *, l->qweight->data, qw_b);
	PUT(qzeros, const uint32_t *, l->qzeros->data, qz_b);
	PUT(scales, const uint16_t *, l->scales->data, sc_b);
	if (rowmap)
		PUT(rowmap, const int *, rowmap, rm_b);
	if (m->fmt == Q3G_F16) {
		uint8_t *dst = (uint8_t *)m->data + (size_t)idx * m->data_stride;
		dense_src none = { NULL, 0, 0, 0 };
		size_t threads = (size_t)m->ntiles * m->nchunks * 32;

		if (l->g_idx)
			PUT(gidx, const int *, l->g_idx->data, gi_b);
		repack_f16_kernel<<<(unsigned)cdiv((int)threads, 256), 256, 0, st>>>(none, s, true, dst, l->N, l->K,
										       0, m->ntiles, m->nchunks);
		CUDA_CHECK_LAUNCH(e);
	} else {
		uint8_t *dst = (uint8_t *)m->data + (size_t)idx * m->data_stride;
		float *sc = (float *)m->scales + (size_t)idx * m->sz_stride;
		float *zr = m->zeros ? (float *)m->zeros + (size_t)idx * m->sz_stride : NULL;
		size_t threads = (size_t)m->ntiles * m->nchunks * 32, nsc = (size_t)m->ntiles * m->ngroups * 16;

		if (m->perm || m->sorted) {
			int Kp = m->nchunks * Q3G_KCHUNK;
			int *perm = (int *)malloc(sizeof(int) * (size_t)l->K);
			uint16_t *p16 = (uint16_t *)((char *)sg->host + off);
			int r = perm ? q3_gptq_order(l, perm, NULL) : -ENOMEM;

			if (r < 0) {
				free(perm);
				return order_failed(r, e);
			}
			for (int k = 0; k < Kp; k++)
				p16[k] = (uint16_t)(k < l->K ? perm[k] : 0xffff);
			free(perm);
			CUDA_CHECK(e, cudaMemcpyAsync((char *)sg->dev + off, p16, (size_t)Kp * 2,
						      cudaMemcpyHostToDevice, st));
			s.perm = (const uint16_t *)((char *)sg->dev + off);
			/* the permutation is part of the weight: keep a copy next to it (a sorted
			 * stack keeps none: its perm, if any, is another's) */
			if (m->perm && !m->sorted)
				CUDA_CHECK(e, cudaMemcpyAsync((uint16_t *)m->perm + (size_t)idx * m->perm_stride,
							      s.perm, (size_t)Kp * 2, cudaMemcpyDeviceToDevice, st));
			off += align256((size_t)Kp * 2);
		}
		repack_gptq_kernel<<<(unsigned)cdiv((int)threads, 256), 256, 0, st>>>(s, dst, m->ntiles, m->nchunks);
		CUDA_CHECK_LAUNCH(e);
		repack_scales_kernel<<<(unsigned)cdiv((int)nsc, 256), 256, 0, st>>>(s, sc, zr, m->ntiles, m->ngroups);
		CUDA_CHECK_LAUNCH(e);
	}
#undef PUT
	CUDA_CHECK(e, cudaStreamSynchronize(st));
	return 0;
}

extern "C" int q3g_expert_upload(const struct q3g_mat *gate, const struct q3g_mat *up, const struct q3g_mat *down,
				 int idx, const struct q3_expert *x, struct q3g_stage *sg, q3g_stream st, q3_err *e)
{
	const struct q3_linear *ls[3] = { &x->gate, &x->up, &x->down };
	const struct q3g_mat *ms[3] = { gate, up, down };
	int *order = NULL, err = 0;

	if (down->sorted && !down->perm) {
		/* row n of gate and up is stored at place n' where down reads input n at position n' */
		if (x->down.K != x->gate.N || x->down.K != x->up.N)
			return q3_errf(e, -EINVAL, "gpu weights: down's %d inputs are not gate's %d and up's %d rows",
				       x->down.K, x->gate.N, x->up.N);
		if (!(order = (int *)malloc(sizeof(int) * (size_t)x->down.K)))
			return q3_errf(e, -ENOMEM, "out of memory");
		int r = q3_gptq_order(&x->down, order, NULL);

		if (r < 0)
			err = order_failed(r, e);
	}
	for (int i = 0; i < 3 && !err; i++)
		if ((err = q3g_mat_upload(ms[i], idx, ls[i], i < 2 ? order : NULL, sg, st, e))) {
			char name[256];

			err = q3_err_prefix(e, err, "%s", q3_linear_name(ls[i], name, sizeof(name)));
		}
	free(order);
	return err;
}

/* Whether experts xs[0 .. n) each read gate's and up's inputs in one act-order: the same groups
 * give the same permutation, so none is computed here (the plan and the upload compute them). */
static bool gate_up_one_order(const struct q3_expert *xs, int n)
{
	for (int i = 0; i < n; i++)
		if (!q3_gptq_same_groups(&xs[i].gate, &xs[i].up))
			return false;
	return true;
}

extern "C" int q3g_mlp_plan(const struct q3_expert *xs, int n, bool sorted_down, struct q3g_mat_plan p[3],
			    q3_err *e)
{
	const struct q3_linear **ls = (const struct q3_linear **)malloc(sizeof(*ls) * (size_t)Q3_MAX(n, 1));
	int err = 0;

	if (!ls)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (int w = 0; w < 3 && !err; w++) {
		for (int x = 0; x < n; x++)
			ls[x] = w == 0 ? &xs[x].gate : w == 1 ? &xs[x].up : &xs[x].down;
		err = q3g_mat_plan(ls, n, &p[w], e);
	}
	free(ls);
	if (err)
		return err;
	/* (the orders compared only where there are permutations: a start-up pass otherwise) */
	p[1].sorted = p[0].perm && p[1].perm && gate_up_one_order(xs, n);
	p[2].sorted = sorted_down;
	return 0;
}

extern "C" void q3g_mlp_place(struct q3g_mat *const ms[3], const struct q3g_mat_plan p[3], void *const mem[3])
{
	for (int w = 0; w < 3; w++)
		q3g_mat_place(ms[w], &p[w], mem[w]);
	if (ms[1]->sorted)
		ms[1]->perm = ms[0]->perm;
}

extern "C" int q3g_mat_repack_raw(const struct q3g_mat *m, int idx0, int n, const struct q3_linear *l,
				  const void *base, const uint64_t (*off)[3], q3g_stream stream, q3_err *e)
{
	gptq_src s;
	raw_batch rb;

	if (l->fmt != Q3_W_GPTQ || m->fmt == Q3G_F16 || m->perm || m->sorted)
		return q3_errf(e, -EINVAL, "gpu weights: raw repack takes GPTQ tile formats without act-order");
	if (n < 1 || n > Q3G_RAW_BATCH)
		return q3_errf(e, -EINVAL, "gpu weights: raw repack of %d matrices (1 to %d)", n, Q3G_RAW_BATCH);
	gptq_src_init(&s, l);
	rb.base = (const char *)base;
	memcpy(rb.off, off, sizeof(rb.off[0]) * n);
	size_t codes = (size_t)m->ntiles * m->nchunks * 32, nsc = (size_t)m->ntiles * m->ngroups * 16;
	dim3 grid((unsigned)cdiv((int)Q3_MAX(codes, nsc), 256), n, 2);

	repack_raw_kernel<<<grid, 256, 0, (cudaStream_t)stream>>>(
		s, rb, (uint8_t *)m->data + (size_t)idx0 * m->data_stride, m->data_stride,
		(float *)m->scales + (size_t)idx0 * m->sz_stride,
		m->zeros ? (float *)m->zeros + (size_t)idx0 * m->sz_stride : NULL, m->sz_stride, m->ntiles, m->nchunks,
		m->ngroups);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

/* ---- expansion ------------------------------------------------------------------------------- */

/* Element (row, position kin) of matrix idx, from the tile format. */
static __device__ float tile_weight(const struct q3g_mat &m, int idx, int row, int kin)
{
	int tile = row / Q3G_TILE_N, rr = row % Q3G_TILE_N, ch = kin / Q3G_KCHUNK, kc = kin % Q3G_KCHUNK;
	int s = kc / 16, ks = kc % 16;
	int g = rr & 7, hi = rr >> 3, t = (ks & 7) >> 1, E = ks & 1, kh = ks >> 3;
	int R = hi + 2 * kh, l = 4 * g + t;
	const uint8_t *base = (const uint8_t *)m.data + (size_t)idx * m.data_stride;
	size_t tc = (size_t)tile * m.nchunks + ch;

	if (m.fmt == Q3G_F16) {
		const uint16_t *p = (const uint16_t *)(base + tc * Q3G_CHUNK_BYTES_F16 + s * 512 + l * 16 + R * 4);

		return h_bits2f(p[E]);
	}
	int q, grp = (ch * Q3G_KCHUNK + s * 16) / (m.gsteps * 16);
	size_t si = (size_t)idx * m.sz_stride + ((size_t)tile * m.ngroups + grp) * Q3G_TILE_N + rr;
	float z;

	if (m.fmt == Q3G_Q4) {
		uint32_t w = *(const uint32_t *)(base + tc * Q3G_CHUNK_BYTES_Q4 + l * 16 + s * 4);

		q = (int)((w >> (4 * (R + 4 * E))) & 15);
		z = m.zeros ? m.zeros[si] : 8.0f;
	} else {
		const uint32_t *p = (const uint32_t *)(base + tc * Q3G_CHUNK_BYTES_Q8 + (s >> 1) * 512 + l * 16);
		uint32_t w = p[2 * (s & 1) + (R >> 1)];

		q = (int)((w >> (8 * (2 * (R & 1) + E))) & 255);
		z = m.zeros ? m.zeros[si] : 128.0f;
	}
	return m.scales[si] * ((float)q - z);
}

/* w16 (fp16) or w32 (fp32): one of them */
__global__ void expand_kernel(struct q3g_mat m, int idx, uint16_t *w16, float *w32)
{
	size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	int Kp = m.nchunks * Q3G_KCHUNK;

	if (id >= (size_t)m.N * Kp)
		return;
	int row = (int)(id / Kp), kin = (int)(id % Kp);
	const uint16_t *perm = m.perm ? m.perm + (size_t)idx * m.perm_stride : NULL;
	int k = perm ? perm[kin] : kin;

	if (kin >= m.K || k >= m.K)
		return;
	float v = tile_weight(m, idx, row, kin);

	if (w32)
		w32[(size_t)row * m.K + k] = v;
	else
		w16[(size_t)row * m.K + k] = f2h_bits(v);
}

extern "C" int q3g_mat_expand(const struct q3g_mat *m, int idx, uint16_t *w, q3g_stream st, q3_err *e)
{
	size_t n = (size_t)m->N * m->nchunks * Q3G_KCHUNK;

	expand_kernel<<<(unsigned)((n + 255) / 256), 256, 0, (cudaStream_t)st>>>(*m, idx, w, NULL);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

extern "C" int q3g_mat_expand_f32(const struct q3g_mat *m, int idx, float *w, q3g_stream st, q3_err *e)
{
	size_t n = (size_t)m->N * m->nchunks * Q3G_KCHUNK;

	expand_kernel<<<(unsigned)((n + 255) / 256), 256, 0, (cudaStream_t)st>>>(*m, idx, NULL, w);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}
