/* cpu_expert.c - preparing routed experts for the CPU kernels (the packed layout, the direct GPTQ
 * view), quantizing activations, choosing the ISA at run time, and the one-thread expert FFN
 * (see cpu_expert.h).
 */
#include "cpu_expert.h"

#include <cpuid.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_expert_impl.h"
#include "dequant.h"
#include "half.h"

/* ---- the packed blob ------------------------------------------------------------------------ */

#define BLOB_MAGIC "Q3XEXP1"
#define BLOB_ALIGN 64

enum { MAT_BF16 = 1, MAT_ZEROS = 2, MAT_PERM = 4 };

struct blob_mat {
	uint32_t K, N, G, flags, zconst, pad;
	uint64_t off_codes, off_scales, off_zeros, off_perm;
};

struct blob_hdr {
	char magic[8];
	uint32_t H, I;
	struct blob_mat mat[3]; /* gate, up, down */
	uint64_t total;
};

_Static_assert(sizeof(struct blob_hdr) <= 256, "blob header fits its 256 bytes");
#define BLOB_HDR 256

/* What packing one Linear needs to know, computed from its tensors. */
struct lin_plan {
	const struct q3_linear *l;
	uint16_t *perm; /* [K] kernel input -> model input, NULL for the identity */
	bool zeros;	/* zero points differ: keep them */
	int zconst;
};

static const struct q3_linear *expert_lin(const struct q3_expert *ex, int i)
{
	return i == 0 ? &ex->gate : i == 1 ? &ex->up : &ex->down;
}

static const char *lin_name(const struct q3_linear *l, char *buf, size_t n)
{
	return q3_linear_name(l, buf, n);
}

static int zero_model(const struct q3_linear *l, int g, int n)
{
	uint32_t w = q3_tensor_u32_at(l->qzeros, (uint64_t)g * (uint64_t)(l->N / 8) + (uint64_t)(n / 8));

	return q3_xzero(w, n % 8, l->zero_offset);
}

static int check_lin(const struct q3_linear *l, q3_err *e)
{
	char nm[160];

	if (l->fmt != Q3_W_GPTQ || l->bits != 4)
		return q3_errf(e, -ENOTSUP, "%s: the CPU expert kernels take GPTQ 4-bit weights only",
			       lin_name(l, nm, sizeof(nm)));
	if (l->K % Q3_XTILE || l->N % Q3_XTILE || l->K > 65535)
		return q3_errf(e, -ENOTSUP, "%s: shape [%d, %d] is not a multiple of %d",
			       lin_name(l, nm, sizeof(nm)), l->N, l->K, Q3_XTILE);
	if (l->group_size % Q3_XBLOCK || l->K % l->group_size)
		return q3_errf(e, -ENOTSUP, "%s: group size %d is not a multiple of %d",
			       lin_name(l, nm, sizeof(nm)), l->group_size, Q3_XBLOCK);
	if (l->scales->dtype != Q3_DT_F16 && l->scales->dtype != Q3_DT_BF16)
		return q3_errf(e, -ENOTSUP, "%s: scales must be F16 or BF16",
			       lin_name(l, nm, sizeof(nm)));
	if (!l->qweight->data || !l->qzeros->data || !l->scales->data ||
	    (l->g_idx && !l->g_idx->data))
		return q3_errf(e, -EINVAL, "%s: tensor data not loaded", lin_name(l, nm, sizeof(nm)));
	return 0;
}

/* Fills p for l: the input permutation that makes groups contiguous (q3_gptq_order) and whether
 * zero points vary. */
static int plan_lin(struct lin_plan *p, const struct q3_linear *l, q3_err *e)
{
	char nm[160];
	int err, *order, bad;

	memset(p, 0, sizeof(*p));
	p->l = l;
	err = check_lin(l, e);
	if (err)
		return err;
	if (!(order = malloc((size_t)l->K * sizeof(int))))
		return q3_errf(e, -ENOMEM, "out of memory");
	err = q3_gptq_order(l, order, &bad);
	if (err == 0 && !(p->perm = malloc((size_t)l->K * sizeof(uint16_t))))
		err = -ENOMEM;
	for (int k = 0; err == 0 && k < l->K; k++)
		p->perm[k] = (uint16_t)order[k]; /* K <= 65535: check_lin */
	free(order);
	if (err == -ENOMEM)
		return q3_errf(e, -ENOMEM, "out of memory");
	if (err < 0) /* bad < 0 (K not ngroups · G) only where ngroups disagrees with K / G */
		return bad < 0 ? q3_errf(e, -ENOTSUP, "%s: %d inputs are not %d groups of %d",
					 lin_name(l, nm, sizeof(nm)), l->K, l->ngroups, l->group_size)
			       : q3_errf(e, -ENOTSUP, "%s: g_idx[%d] = %u: groups are not %d inputs each",
					 lin_name(l, nm, sizeof(nm)), bad,
					 q3_tensor_u32_at(l->g_idx, (uint64_t)bad), l->group_size);
	p->zconst = zero_model(l, 0, 0);
	for (int g = 0; g < l->ngroups && !p->zeros; g++)
		for (int n = 0; n < l->N; n++)
			if (zero_model(l, g, n) != p->zconst) {
				p->zeros = true;
				break;
			}
	return 0;
}

static void plan_free(struct lin_plan *p, int n)
{
	for (int i = 0; i < n; i++)
		free(p[i].perm);
}

static size_t mat_sizes(const struct q3_linear *l, const struct lin_plan *p, size_t sz[4])
{
	int tiles = l->N / Q3_XTILE;

	sz[0] = Q3_ALIGN_UP((size_t)l->K / 8 * (size_t)l->N * 4, BLOB_ALIGN);
	sz[1] = Q3_ALIGN_UP((size_t)l->ngroups * (size_t)l->N * 2, BLOB_ALIGN);
	sz[2] = p->zeros ? Q3_ALIGN_UP((size_t)tiles * (size_t)l->ngroups * (Q3_XTILE / 8) * 4, BLOB_ALIGN) : 0;
	sz[3] = p->perm ? Q3_ALIGN_UP((size_t)l->K * 2, BLOB_ALIGN) : 0;
	return sz[0] + sz[1] + sz[2] + sz[3];
}

int q3_xexpert_check(const struct q3_expert *ex, q3_err *e)
{
	struct lin_plan p[3];
	int err = 0, i;

	for (i = 0; i < 3 && !err; i++)
		err = plan_lin(&p[i], expert_lin(ex, i), e);
	plan_free(p, i);
	if (err)
		return err;
	if (ex->gate.N != ex->up.N || ex->gate.K != ex->up.K || ex->down.K != ex->gate.N ||
	    ex->down.N != ex->gate.K)
		return q3_errf(e, -EINVAL, "expert: gate/up/down shapes do not chain");
	return 0;
}

size_t q3_xexpert_packed_size(const struct q3_expert *ex)
{
	struct lin_plan p[3];
	size_t total = BLOB_HDR, sz[4];
	int i;

	for (i = 0; i < 3; i++)
		if (plan_lin(&p[i], expert_lin(ex, i), NULL))
			break;
	if (i < 3) {
		plan_free(p, i);
		return 0;
	}
	for (i = 0; i < 3; i++)
		total += mat_sizes(expert_lin(ex, i), &p[i], sz);
	plan_free(p, 3);
	return total;
}

static uint16_t scale_bits(const struct q3_linear *l, int g, int n)
{
	uint16_t h;

	memcpy(&h, (const char *)l->scales->data + 2 * ((size_t)g * (size_t)l->N + (size_t)n), 2);
	return h;
}

static int code_model(const struct q3_linear *l, int k, int n)
{
	uint32_t w = q3_tensor_u32_at(l->qweight, (uint64_t)(k / 8) * (uint64_t)l->N + (uint64_t)n);

	return (int)((w >> (4 * (k % 8))) & 0xF);
}

/* Without permutations the packed layout is the stored words rearranged: a tile's rows are
 * runs of Q3_XTILE words of qweight, its scales runs of Q3_XTILE scales, its zero points the
 * qzeros words of its columns (offset applied).  Copies, no per-code work. */
static void pack_plain(const struct q3_linear *l, uint32_t *codes, uint16_t *scales, uint32_t *zeros)
{
	const char *qw = l->qweight->data, *sc = l->scales->data;
	int K = l->K, N = l->N, ng = l->ngroups, tiles = N / Q3_XTILE;

	for (int t = 0; t < tiles; t++) {
		for (int r = 0; r < K / 8; r++)
			memcpy(codes + ((size_t)t * (size_t)(K / 8) + (size_t)r) * Q3_XTILE,
			       qw + ((size_t)r * (size_t)N + (size_t)t * Q3_XTILE) * 4, Q3_XTILE * 4);
		for (int g = 0; g < ng; g++)
			memcpy(scales + ((size_t)t * (size_t)ng + (size_t)g) * Q3_XTILE,
			       sc + ((size_t)g * (size_t)N + (size_t)t * Q3_XTILE) * 2, Q3_XTILE * 2);
		for (int g = 0; zeros && g < ng; g++)
			for (int q = 0; q < Q3_XTILE / 8; q++) {
				uint32_t w = q3_tensor_u32_at(l->qzeros, (uint64_t)g * (uint64_t)(N / 8) +
									  (uint64_t)(t * Q3_XTILE / 8 + q)),
					 o = 0;

				for (int i = 0; i < 8; i++)
					o |= (uint32_t)q3_xzero(w, i, l->zero_offset) << (4 * i);
				zeros[((size_t)t * (size_t)ng + (size_t)g) * (Q3_XTILE / 8) + (size_t)q] = o;
			}
	}
}

/* Writes one Linear into the blob at base + *off; colmap maps kernel column -> model column
 * (NULL: identity). */
static void pack_lin(char *base, uint64_t *off, struct blob_mat *bm, const struct lin_plan *p,
		     const uint16_t *colmap)
{
	const struct q3_linear *l = p->l;
	int K = l->K, N = l->N, G = l->group_size, ng = l->ngroups, tiles = N / Q3_XTILE;
	size_t sz[4];
	uint32_t *codes;
	uint16_t *scales;

	mat_sizes(l, p, sz);
	bm->K = (uint32_t)K;
	bm->N = (uint32_t)N;
	bm->G = (uint32_t)G;
	bm->flags = (l->scales->dtype == Q3_DT_BF16 ? MAT_BF16 : 0) | (p->zeros ? MAT_ZEROS : 0) |
		    (p->perm ? MAT_PERM : 0);
	bm->zconst = (uint32_t)p->zconst;
	bm->off_codes = *off;
	bm->off_scales = *off + sz[0];
	bm->off_zeros = sz[2] ? *off + sz[0] + sz[1] : 0;
	bm->off_perm = sz[3] ? *off + sz[0] + sz[1] + sz[2] : 0;
	codes = (uint32_t *)(base + bm->off_codes);
	scales = (uint16_t *)(base + bm->off_scales);
	if (!p->perm && !colmap) {
		pack_plain(l, codes, scales, p->zeros ? (uint32_t *)(base + bm->off_zeros) : NULL);
		*off += sz[0] + sz[1] + sz[2] + sz[3];
		return;
	}
	for (int t = 0; t < tiles; t++)
		for (int c = 0; c < Q3_XTILE; c++) {
			int j = t * Q3_XTILE + c, n = colmap ? colmap[j] : j;

			for (int r = 0; r < K / 8; r++) {
				uint32_t w = 0;

				for (int i = 0; i < 8; i++) {
					int k = p->perm ? p->perm[8 * r + i] : 8 * r + i;

					w |= (uint32_t)code_model(l, k, n) << (4 * i);
				}
				codes[((size_t)t * (size_t)(K / 8) + (size_t)r) * Q3_XTILE + (size_t)c] = w;
			}
			for (int g = 0; g < ng; g++)
				scales[((size_t)t * (size_t)ng + (size_t)g) * Q3_XTILE + (size_t)c] =
					scale_bits(l, g, n);
		}
	if (p->zeros) {
		uint32_t *zeros = (uint32_t *)(base + bm->off_zeros);

		for (int t = 0; t < tiles; t++)
			for (int g = 0; g < ng; g++)
				for (int q = 0; q < Q3_XTILE / 8; q++) {
					uint32_t w = 0;

					for (int i = 0; i < 8; i++) {
						int j = t * Q3_XTILE + q * 8 + i, n = colmap ? colmap[j] : j;

						w |= (uint32_t)zero_model(l, g, n) << (4 * i);
					}
					zeros[((size_t)t * (size_t)ng + (size_t)g) * (Q3_XTILE / 8) + (size_t)q] = w;
				}
	}
	if (p->perm)
		memcpy(base + bm->off_perm, p->perm, (size_t)K * 2);
	*off += sz[0] + sz[1] + sz[2] + sz[3];
}

int q3_xexpert_pack(const struct q3_expert *ex, void *dst, size_t size, q3_err *e)
{
	struct lin_plan p[3];
	struct blob_hdr h;
	uint64_t off = BLOB_HDR;
	size_t need;
	int err = 0, i;

	err = q3_xexpert_check(ex, e);
	if (err)
		return err;
	need = q3_xexpert_packed_size(ex);
	if (size < need)
		return q3_errf(e, -EINVAL, "expert blob: %zu bytes given, %zu needed", size, need);
	if ((uintptr_t)dst % BLOB_ALIGN)
		return q3_errf(e, -EINVAL, "expert blob: destination not %d-byte aligned", BLOB_ALIGN);
	for (i = 0; i < 3 && !err; i++)
		err = plan_lin(&p[i], expert_lin(ex, i), e);
	if (err) {
		plan_free(p, i);
		return err;
	}
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, BLOB_MAGIC, 8);
	h.H = (uint32_t)ex->gate.K;
	h.I = (uint32_t)ex->gate.N;
	memset(dst, 0, BLOB_HDR);
	/* gate and up columns in the order down reads its inputs */
	for (i = 0; i < 3; i++)
		pack_lin(dst, &off, &h.mat[i], &p[i], i < 2 ? p[2].perm : NULL);
	h.total = off;
	memcpy(dst, &h, sizeof(h));
	plan_free(p, 3);
	return 0;
}

static int view_mat(struct q3_xmat *m, const struct blob_mat *bm, const char *base, size_t size,
		    const char *what, q3_err *e)
{
	int K = (int)bm->K, N = (int)bm->N, G = (int)bm->G;

	if (K <= 0 || N <= 0 || G <= 0 || K % Q3_XTILE || N % Q3_XTILE || G % Q3_XBLOCK || K % G ||
	    K > 65535 || bm->zconst > 15)
		return q3_errf(e, -EINVAL, "expert blob: %s: bad shape [%d, %d] group %d", what, N, K, G);
	memset(m, 0, sizeof(*m));
	m->K = K;
	m->N = N;
	m->G = G;
	m->ngroups = K / G;
	size_t need[4] = {(size_t)K / 8 * (size_t)N * 4, (size_t)m->ngroups * (size_t)N * 2,
			  (size_t)m->ngroups * (size_t)N / 2, (size_t)K * 2};
	uint64_t offs[4] = {bm->off_codes, bm->off_scales, bm->off_zeros, bm->off_perm};
	bool has[4] = {true, true, bm->flags & MAT_ZEROS, bm->flags & MAT_PERM};

	for (int i = 0; i < 4; i++)
		if (has[i] && (offs[i] < BLOB_HDR || offs[i] % BLOB_ALIGN || offs[i] > size ||
			       need[i] > size - offs[i]))
			return q3_errf(e, -EINVAL, "expert blob: %s: section %d out of bounds", what, i);
	m->codes = (const uint32_t *)(base + bm->off_codes);
	m->cd_row = Q3_XTILE;
	m->cd_tile = (size_t)K / 8 * Q3_XTILE;
	m->scales = (const uint16_t *)(base + bm->off_scales);
	m->sc_grp = Q3_XTILE;
	m->sc_tile = (size_t)m->ngroups * Q3_XTILE;
	m->bf16_scales = bm->flags & MAT_BF16;
	m->zconst = (int)bm->zconst;
	if (bm->flags & MAT_ZEROS) {
		m->zeros = (const uint32_t *)(base + bm->off_zeros);
		m->zp_grp = Q3_XTILE / 8;
		m->zp_tile = (size_t)m->ngroups * (Q3_XTILE / 8);
	}
	if (bm->flags & MAT_PERM) {
		m->perm = (const uint16_t *)(base + bm->off_perm);
		for (int k = 0; k < K; k++)
			if (m->perm[k] >= K)
				return q3_errf(e, -EINVAL, "expert blob: %s: perm[%d] out of range", what, k);
	}
	return 0;
}

int q3_xexpert_view(struct q3_xexpert *x, const void *blob, size_t size, q3_err *e)
{
	static const char *names[3] = {"gate", "up", "down"};
	struct blob_hdr h;
	struct q3_xmat *m[3] = {&x->gate, &x->up, &x->down};
	int err;

	memset(x, 0, sizeof(*x));
	if (size < BLOB_HDR || (uintptr_t)blob % BLOB_ALIGN)
		return q3_errf(e, -EINVAL, "expert blob: too small or misaligned");
	memcpy(&h, blob, sizeof(h));
	if (memcmp(h.magic, BLOB_MAGIC, 8) || h.total > size)
		return q3_errf(e, -EINVAL, "expert blob: bad header");
	for (int i = 0; i < 3; i++) {
		err = view_mat(m[i], &h.mat[i], blob, size, names[i], e);
		if (err)
			return err;
	}
	if (x->gate.K != (int)h.H || x->up.K != (int)h.H || x->gate.N != (int)h.I ||
	    x->up.N != (int)h.I || x->down.K != (int)h.I || x->down.N != (int)h.H)
		return q3_errf(e, -EINVAL, "expert blob: gate/up/down shapes do not chain");
	x->H = (int)h.H;
	x->I = (int)h.I;
	return 0;
}

static void gptq_mat(struct q3_xmat *m, const struct q3_linear *l, const struct lin_plan *p)
{
	memset(m, 0, sizeof(*m));
	m->K = l->K;
	m->N = l->N;
	m->G = l->group_size;
	m->ngroups = l->ngroups;
	m->codes = l->qweight->data;
	m->cd_row = (size_t)l->N;
	m->cd_tile = Q3_XTILE;
	m->scales = l->scales->data;
	m->sc_grp = (size_t)l->N;
	m->sc_tile = Q3_XTILE;
	m->bf16_scales = l->scales->dtype == Q3_DT_BF16;
	if (p->zeros) {
		m->zeros = l->qzeros->data;
		m->zp_grp = (size_t)l->N / 8;
		m->zp_tile = Q3_XTILE / 8;
		m->zero_offset = l->zero_offset;
	}
	m->zconst = p->zconst;
}

int q3_xexpert_gptq(struct q3_xexpert *x, const struct q3_expert *ex, q3_err *e)
{
	struct lin_plan p[3];
	char nm[160];
	int err = 0, i;

	memset(x, 0, sizeof(*x));
	err = q3_xexpert_check(ex, e);
	if (err)
		return err;
	for (i = 0; i < 3 && !err; i++)
		err = plan_lin(&p[i], expert_lin(ex, i), e);
	for (int j = 0; j < i && !err; j++)
		if (p[j].perm)
			err = q3_errf(e, -ENOTSUP, "%s: act-order g_idx needs the packed layout",
				      lin_name(expert_lin(ex, j), nm, sizeof(nm)));
	if (!err) {
		gptq_mat(&x->gate, &ex->gate, &p[0]);
		gptq_mat(&x->up, &ex->up, &p[1]);
		gptq_mat(&x->down, &ex->down, &p[2]);
		x->H = ex->gate.K;
		x->I = ex->gate.N;
	}
	plan_free(p, i);
	return err;
}

float q3_xmat_weight(const struct q3_xmat *m, int j, int kk)
{
	int tile = j / Q3_XTILE, c = j % Q3_XTILE, g = kk / m->G, z;
	uint32_t w = q3_xld32(m->codes + (size_t)tile * m->cd_tile + (size_t)(kk / 8) * m->cd_row +
			      (size_t)c);
	uint16_t h;
	float s;

	memcpy(&h, m->scales + (size_t)tile * m->sc_tile + (size_t)g * m->sc_grp + (size_t)c, 2);
	s = m->bf16_scales ? q3_bf16_to_f32(h) : q3_f16_to_f32(h);
	if (m->zeros)
		z = q3_xzero(q3_xld32(m->zeros + (size_t)tile * m->zp_tile + (size_t)g * m->zp_grp +
				      (size_t)(c / 8)),
			     c % 8, m->zero_offset);
	else
		z = m->zconst;
	return s * (float)((int)((w >> (4 * (kk % 8))) & 0xF) - z);
}

uint64_t q3_xexpert_bytes(const struct q3_xexpert *x)
{
	const struct q3_xmat *m[3] = {&x->gate, &x->up, &x->down};
	uint64_t b = 0;

	for (int i = 0; i < 3; i++) {
		b += (uint64_t)m[i]->K / 2 * (uint64_t)m[i]->N;	      /* codes */
		b += (uint64_t)m[i]->ngroups * (uint64_t)m[i]->N * 2; /* scales */
		if (m[i]->zeros)
			b += (uint64_t)m[i]->ngroups * (uint64_t)m[i]->N / 2;
		if (m[i]->perm)
			b += (uint64_t)m[i]->K * 2;
	}
	return b;
}

/* ---- activations ---------------------------------------------------------------------------- */

static size_t al(size_t n)
{
	return Q3_ALIGN_UP(n, 64);
}

size_t q3_xact_size(int T, int K, enum q3_xact_kind kind)
{
	size_t nb = (size_t)T * (size_t)(K / Q3_XBLOCK) * sizeof(float);

	if (kind == Q3_XACT_INT8)
		return al((size_t)T * (size_t)K) + 2 * al(nb);
	return al((size_t)T * (size_t)K * sizeof(float)) + al(nb);
}

void q3_xact_init(struct q3_xact *a, void *mem, int T, int K, enum q3_xact_kind kind)
{
	char *p = mem;
	size_t nb = (size_t)T * (size_t)(K / Q3_XBLOCK) * sizeof(float);

	memset(a, 0, sizeof(*a));
	a->T = T;
	a->K = K;
	a->kind = kind;
	if (kind == Q3_XACT_INT8) {
		a->q = (int8_t *)p;
		p += al((size_t)T * (size_t)K);
		a->d = (float *)p;
		p += al(nb);
	} else {
		a->xs = (float *)p;
		p += al((size_t)T * (size_t)K * sizeof(float));
	}
	a->bsum = (float *)p;
}

/* ---- ISA choice ------------------------------------------------------------------------------ */

static const char *const isa_names[Q3_XISA_COUNT] = {"scalar", "avx2", "avx512", "amx"};

const char *q3_xisa_name(enum q3_xisa isa)
{
	return (unsigned)isa < Q3_XISA_COUNT ? isa_names[isa] : "?";
}

int q3_xisa_parse(const char *s, enum q3_xisa *out)
{
	for (int i = 0; i < Q3_XISA_COUNT; i++)
		if (!strcmp(s, isa_names[i])) {
			*out = (enum q3_xisa)i;
			return 0;
		}
	return -EINVAL;
}

static uint64_t xgetbv0(void)
{
	uint32_t lo, hi;

	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((uint64_t)hi << 32) | lo;
}

/* cpuid + XCR0: what the CPU has and the OS saves. */
static unsigned isa_mask(void)
{
	static int cached = -1;
	unsigned a, b, c, d, m = 1u << Q3_XISA_SCALAR;
	uint64_t xcr0;

	if (cached >= 0)
		return (unsigned)cached;
	if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_FMA) ||
	    !(c & bit_F16C) || !(c & bit_AVX)) {
		cached = (int)m;
		return m;
	}
	xcr0 = xgetbv0();
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) { /* no leaf 7: nothing past AVX */
		cached = (int)m;
		return m;
	}
	if ((xcr0 & 6) == 6 && (b & bit_AVX2))
		m |= 1u << Q3_XISA_AVX2;
	/* AVX-512: F, DQ, BW, VL and VNNI; the OS saves opmask and ZMM state */
	if ((m & (1u << Q3_XISA_AVX2)) && (xcr0 & 0xe6) == 0xe6 && (b & bit_AVX512F) &&
	    (b & bit_AVX512DQ) && (b & bit_AVX512BW) && (b & bit_AVX512VL) && (c & bit_AVX512VNNI))
		m |= 1u << Q3_XISA_AVX512;
	/* AMX-TILE and AMX-INT8 (edx bits 24, 25), tile state enabled (XCR0 bits 17, 18), and the
	 * kernel's permission */
	if ((m & (1u << Q3_XISA_AVX512)) && (d & (1u << 24)) && (d & (1u << 25)) &&
	    (xcr0 & (3ull << 17)) == (3ull << 17) && q3_xamx_enable())
		m |= 1u << Q3_XISA_AMX;
	cached = (int)m;
	return m;
}

bool q3_xisa_available(enum q3_xisa isa)
{
	return (unsigned)isa < Q3_XISA_COUNT && (isa_mask() & (1u << isa));
}

enum q3_xisa q3_xisa_best(void)
{
	const char *env = getenv("QWEN3D_XISA");
	enum q3_xisa isa;

	if (env && !q3_xisa_parse(env, &isa) && q3_xisa_available(isa))
		return isa;
	for (int i = Q3_XISA_COUNT - 1; i > 0; i--)
		if (q3_xisa_available((enum q3_xisa)i))
			return (enum q3_xisa)i;
	return Q3_XISA_SCALAR;
}

static const struct q3_xkern *kern(enum q3_xisa isa)
{
	switch (isa) {
	case Q3_XISA_AVX2:
		return &q3_xkern_avx2;
	case Q3_XISA_AVX512:
		return &q3_xkern_avx512;
	case Q3_XISA_AMX:
		return &q3_xkern_amx;
	default:
		return &q3_xkern_scalar;
	}
}

void q3_xact_set_isa(enum q3_xisa isa, struct q3_xact *a, int t, const float *x,
		     const uint16_t *perm)
{
	kern(isa)->act_set(a, t, x, perm, 0, a->K / Q3_XBLOCK);
}

void q3_xact_set_blocks(enum q3_xisa isa, struct q3_xact *a, int t, const float *x,
			const uint16_t *perm, int b0, int b1)
{
	kern(isa)->act_set(a, t, x, perm, b0, b1);
}

void q3_xact_set(struct q3_xact *a, int t, const float *x, const uint16_t *perm)
{
	static int best = -1;

	if (best < 0)
		best = (int)q3_xisa_best();
	kern((enum q3_xisa)best)->act_set(a, t, x, perm, 0, a->K / Q3_XBLOCK);
}

void q3_xmat_run(enum q3_xisa isa, const struct q3_xmat *m, const struct q3_xact *a, float *y,
		 size_t ldy, int tile0, int tile1)
{
	const struct q3_xkern *k = kern(isa);

	if (a->kind == Q3_XACT_INT8)
		k->mat_q8(m, a, y, ldy, tile0, tile1);
	else
		k->mat_f32(m, a, y, ldy, tile0, tile1);
}

/* ---- one expert, one thread ----------------------------------------------------------------- */

static bool same_perm(const struct q3_xmat *a, const struct q3_xmat *b)
{
	if (!a->perm || !b->perm)
		return a->perm == b->perm;
	return a->perm == b->perm || !memcmp(a->perm, b->perm, (size_t)a->K * 2);
}

size_t q3_xexpert_ffn_scratch(const struct q3_xexpert *x, int T, enum q3_xact_kind kind)
{
	return 2 * q3_xact_size(T, x->H, kind) + q3_xact_size(T, x->I, kind) +
	       2 * al((size_t)T * (size_t)x->I * sizeof(float));
}

void q3_xexpert_ffn(enum q3_xisa isa, enum q3_xact_kind kind, const struct q3_xexpert *x,
		    const float *xin, size_t ldx, int T, float *y, size_t ldy, void *scratch)
{
	struct q3_xact ag, au, ah;
	char *p = scratch;
	float *gate, *up;
	bool shared = same_perm(&x->gate, &x->up);

	q3_xact_init(&ag, p, T, x->H, kind);
	p += q3_xact_size(T, x->H, kind);
	q3_xact_init(&au, p, T, x->H, kind);
	p += q3_xact_size(T, x->H, kind);
	q3_xact_init(&ah, p, T, x->I, kind);
	p += q3_xact_size(T, x->I, kind);
	gate = (float *)p;
	p += al((size_t)T * (size_t)x->I * sizeof(float));
	up = (float *)p;
	for (int t = 0; t < T; t++) {
		q3_xact_set_isa(isa, &ag, t, xin + (size_t)t * ldx, x->gate.perm);
		if (!shared)
			q3_xact_set_isa(isa, &au, t, xin + (size_t)t * ldx, x->up.perm);
	}
	q3_xmat_run(isa, &x->gate, &ag, gate, (size_t)x->I, 0, x->I / Q3_XTILE);
	q3_xmat_run(isa, &x->up, shared ? &ag : &au, up, (size_t)x->I, 0, x->I / Q3_XTILE);
	for (int t = 0; t < T; t++) {
		float *g = gate + (size_t)t * (size_t)x->I, *u = up + (size_t)t * (size_t)x->I;

		for (int i = 0; i < x->I; i++)
			g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
		q3_xact_set_isa(isa, &ah, t, g, NULL);
	}
	q3_xmat_run(isa, &x->down, &ah, y, ldy, 0, x->H / Q3_XTILE);
}
