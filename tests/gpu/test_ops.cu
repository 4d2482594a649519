/* test_ops.cu - every CUDA op of gpu.h against its CPU reference (kernels/cpu_ref.h) on fresh
 * random inputs, at tiny shapes, tile edges and the real model's shapes.
 *
 * Each check first looks for non-finite values (outputs are poisoned with NaN before each run, so
 * an element never written shows up there), then compares by relative L2 error against a
 * tolerance chosen per op; the comment at each tolerance says why.  The reference always gets the
 * exact values the device got (bf16 inputs as fp32), so the error measures the op.
 *
 *   test_ops [filter,...]   runs the cases whose name contains one of the filters (all by default)
 */
#include <cublas_v2.h>
#include <errno.h>
#include <time.h>

#include <algorithm>

#include "gpu_test.h"

extern "C" {
#include "sampler.h"
}

static const char *g_filter;
static cublasHandle_t g_cublas;
static uint16_t *g_wtmp; /* expanded weights for q3g_gemm */

/* Whether the case runs: no filter, or its name contains one of the comma-separated filters. */
static bool want(const char *name)
{
	char buf[256];

	if (!g_filter)
		return true;
	snprintf(buf, sizeof(buf), "%s", g_filter);
	for (char *sv = NULL, *tok = strtok_r(buf, ",", &sv); tok; tok = strtok_r(NULL, ",", &sv))
		if (strstr(name, tok))
			return true;
	return false;
}

/* ---- Linears -------------------------------------------------------------------------------- */

static std::vector<float> round_bf16(const std::vector<float> &v)
{
	std::vector<float> r(v.size());

	for (size_t i = 0; i < v.size(); i++)
		r[i] = q3_bf16_to_f32(q3_f32_to_bf16(v[i]));
	return r;
}

static std::vector<float> round_f16(const std::vector<float> &v)
{
	std::vector<float> r(v.size());

	for (size_t i = 0; i < v.size(); i++)
		r[i] = q3_f16_to_f32(q3_f32_to_f16(v[i]));
	return r;
}


/* Tolerances of a Linear against the reference:
 *  - weights the tile format holds exactly (GPTQ on the fast path; bf16 dense, which fp16 holds
 *    exactly down to 6e-5): the products are exact in fp32 and only the order of fp32 additions
 *    (and the tensor cores' accumulation) differs: well under 1e-5 relative; 1e-4 leaves room;
 *  - f32 dense weights, and GPTQ layouts that fall back to dequantized fp16: each weight carries
 *    fp16 rounding (2^-11 relative), about 3e-4 on a dot product; 2e-3. */
static double lin_tol(const struct dmat *d, const struct q3_linear *l, int R)
{
	bool exact = d->p.fmt != Q3G_F16 || (l->fmt == Q3_W_DENSE && l->w->dtype == Q3_DT_BF16);

	/* R > 16 goes through q3g_gemm, which expands W to fp16 for cuBLAS: scale·(q − z) rounded to
	 * fp16 is off by up to 2^-11 relative per weight, ~2e-4 relative L2 on the outputs (seen on
	 * the H200: 1.2e-4 to 2.1e-4); the matvec applies the group scale in fp32 and stays exact */
	if (R > Q3G_MMV_MAX_TOK)
		return 1e-3;
	return exact ? 1e-4 : 2e-3;
}

/* Runs the Linear on R rows through the matvec (R <= 16) or cuBLAS, compares with the reference. */
static void lin_case(const char *label, int N, int K, enum lin_kind kind, int bits, int G, bool asym, bool act,
		     int zoff, int R, bool add = false)
{
	char name[256];
	struct tlin t;
	struct dmat d;
	const struct q3_linear *lp = &t.l;
	std::vector<uint16_t> xb;
	std::vector<float> xf, y0((size_t)R * N), ref((size_t)R * N);

	snprintf(name, sizeof(name), "linear %s N=%d K=%d R=%d%s", label, N, K, R, add ? " (add)" : "");
	if (!want(name))
		return;
	make_linear(&t, N, K, kind, bits, G, asym, act, zoff);
	dmat_upload(&d, &lp, 1);
	rnd_f16(xb, xf, (size_t)R * K, 1.0f);
	uint16_t *x = dev_upload(xb.data(), xb.size());
	float *y = dev_alloc<float>((size_t)R * N);

	ref_linear(&t.l, xf.data(), R, ref.data());
	if (add) {
		y0 = rnd_vec((size_t)R * N, 1.0f);
		GT_CHECK(cudaMemcpy(y, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice));
		for (size_t i = 0; i < ref.size(); i++)
			ref[i] += y0[i];
	}
	struct q3g_job j = { d.m, x, y, K, N, add ? Q3G_EPI_ADD : Q3G_EPI_STORE };

	if (R <= Q3G_MMV_MAX_TOK)
		GT_OK(q3g_mmv(&j, 1, R, 0, &e_));
	else
		GT_OK(q3g_gemm(g_cublas, &j, R, g_wtmp, 0, &e_));
	std::vector<float> got = dev_download(y, (size_t)R * N);
	char full[300];

	snprintf(full, sizeof(full), "%s [%s%s]", name, fmt_name(d.p.fmt), d.p.perm ? ", act-order" : "");
	gt_compare(full, got.data(), ref.data(), got.size(), lin_tol(&d, &t.l, R));
	cudaFree(x);
	cudaFree(y);
	dmat_free(&d);
}

/* Batch invariance: row 0's outputs with R rows (row 0 the same input, the others random) are
 * bit for bit those with R = 1, for every R the decode paths take: the block shapes, and so the
 * order of every sum, depend on the matrix alone (the engine promises a sequence the same logits
 * whatever it is batched with). */
static void mmv_invariance_case(const char *label, int N, int K, enum lin_kind kind = LIN_GPTQ, int bits = 4,
				int G = 128, bool asym = false, bool act = false)
{
	char name[256];
	struct tlin t;
	struct dmat d;
	const struct q3_linear *lp = &t.l;
	static const int Rs[] = { 1, 3, 8, 9, 16 };
	std::vector<float> first;
	bool same = true;

	snprintf(name, sizeof(name), "linear %s N=%d K=%d: row 0 the same at R = 1, 3, 8, 9, 16", label, N, K);
	if (!want(name))
		return;
	make_linear(&t, N, K, kind, bits, G, asym, act);
	dmat_upload(&d, &lp, 1);
	std::vector<uint16_t> x0;
	std::vector<float> x0f;

	rnd_f16(x0, x0f, (size_t)K, 1.0f); /* row 0, every time */
	for (int R : Rs) {
		std::vector<uint16_t> xb(x0), rest;
		std::vector<float> rf;

		rnd_f16(rest, rf, (size_t)(R - 1) * K, 1.0f);
		xb.insert(xb.end(), rest.begin(), rest.end());
		uint16_t *x = dev_upload(xb.data(), xb.size());
		float *y = dev_alloc<float>((size_t)R * N);
		struct q3g_job j = { d.m, x, y, K, N, Q3G_EPI_STORE };

		GT_OK(q3g_mmv(&j, 1, R, 0, &e_));
		std::vector<float> got = dev_download(y, (size_t)N);

		if (first.empty())
			first = got;
		else
			same &= memcmp(first.data(), got.data(), (size_t)N * 4) == 0;
		cudaFree(x);
		cudaFree(y);
	}
	gt_expect(same, name);
	dmat_free(&d);
}

/* The two ways a row reaches a Linear normalized - folded into the matvec's staging (small
 * batches) and written out first by q3g_add_rmsnorm (larger ones), and the router's fp16 copy -
 * give the same fp16 inputs, so row 0's outputs are bit for bit the same at R = 1 (fused) and
 * R = 16 (written out); and fused beside a second Linear of the same inputs in one launch (qkvz
 * and ba: at a large N the sliced blocks, on sm_90 a cluster's blocks normalizing and staging a
 * share of the rows each, the grid padded to whole clusters), all 16 rows of both are those of
 * the pair written out.  act: the Linears' inputs through act-order permutations (each its own:
 * no clusters). */
static void norm_paths_case(int N, int K, bool act)
{
	char name[200];

	snprintf(name, sizeof(name), "linear norm paths N=%d K=%d%s: row 0 the same fused at R = 1 and written out at R = 16", N,
		 K, act ? " act-order" : "");
	if (!want(name))
		return;
	struct tlin t, tr, tg, t2;
	struct dmat d, dr, dg, d2;
	const struct q3_linear *lp = &t.l, *lr = &tr.l, *lg = &tg.l, *l2 = &t2.l;
	const int R = 16, E = 64, N2 = 64;

	make_linear(&t, N, K, LIN_GPTQ, 4, 128, act, act, 1);
	make_linear(&tr, E, K, LIN_BF16);
	make_linear(&tg, 1, K, LIN_BF16);
	make_linear(&t2, N2, K, LIN_GPTQ, 4, 128, act, act, 1);
	dmat_upload(&d, &lp, 1);
	dmat_upload(&dr, &lr, 1);
	dmat_upload(&dg, &lg, 1);
	dmat_upload(&d2, &l2, 1);
	std::vector<float> h = rnd_vec((size_t)R * K, 2.0f), w = rnd_vec(K, 0.2f);
	float *dh = dev_upload(h.data(), h.size()), *dw = dev_upload(w.data(), K);
	float *y1 = dev_alloc<float>(N), *y16 = dev_alloc<float>((size_t)R * N), *yf = dev_alloc<float>((size_t)R * N);
	float *yw = dev_alloc<float>((size_t)R * N), *y2 = dev_alloc<float>((size_t)R * N2);
	float *y2w = dev_alloc<float>((size_t)R * N2);
	float *lgt = dev_alloc<float>(E), *sg = dev_alloc<float>(1), *wts = dev_alloc<float>(11);
	uint16_t *xb = dev_alloc<uint16_t>((size_t)R * K), *xo = dev_alloc<uint16_t>(K);
	int *idx = dev_alloc<int>(11);
	struct q3g_job j1 = { d.m, NULL, y1, K, N, Q3G_EPI_STORE }, j16 = { d.m, xb, y16, K, N, Q3G_EPI_STORE };

	j1.xh = dh, j1.normw = dw, j1.eps = 1e-6f;
	GT_OK(q3g_mmv(&j1, 1, 1, 0, &e_));
	GT_OK(q3g_add_rmsnorm(dh, NULL, xb, dw, NULL, R, K, 1e-6f, 0, &e_));
	GT_OK(q3g_mmv(&j16, 1, R, 0, &e_));
	struct q3g_job jf[2] = { { d.m, NULL, yf, K, N, Q3G_EPI_STORE }, { d2.m, NULL, y2, K, N2, Q3G_EPI_STORE } };

	for (struct q3g_job &jj : jf)
		jj.xh = dh, jj.normw = dw, jj.eps = 1e-6f;
	GT_OK(q3g_mmv(jf, 2, R, 0, &e_));
	/* the second Linear written out in the same pair of jobs: alone it would take other blocks
	 * (a 64-row Linear the wide ones), so other sums */
	struct q3g_job jw[2] = { { d.m, xb, yw, K, N, Q3G_EPI_STORE }, { d2.m, xb, y2w, K, N2, Q3G_EPI_STORE } };

	GT_OK(q3g_mmv(jw, 2, R, 0, &e_));
	GT_OK(q3g_router(g_cublas, lgt, sg, idx, wts, E, 10, true, dh, dw, 1e-6f, &dr.m, &dg.m, 1, K, NULL, NULL, xo,
			 0, &e_));
	std::vector<float> a = dev_download(y1, N), b = dev_download(y16, N);
	std::vector<uint16_t> xa = dev_download(xb, K), xr = dev_download(xo, K);
	char n2[260];

	snprintf(n2, sizeof(n2), "%s: the router's fp16 copy equals q3g_add_rmsnorm's", name);
	gt_expect(memcmp(xa.data(), xr.data(), (size_t)K * 2) == 0, n2);
	gt_expect(memcmp(a.data(), b.data(), (size_t)N * 4) == 0, name);
	std::vector<float> all = dev_download(y16, (size_t)R * N), fused = dev_download(yf, (size_t)R * N);

	snprintf(n2, sizeof(n2), "%s: every row fused at R = 16 beside a second Linear as written out", name);
	gt_expect(memcmp(all.data(), fused.data(), all.size() * 4) == 0, n2);
	std::vector<float> w1 = dev_download(yw, (size_t)R * N), f2 = dev_download(y2, (size_t)R * N2);
	std::vector<float> w2 = dev_download(y2w, (size_t)R * N2);

	snprintf(n2, sizeof(n2), "%s: both Linears' rows fused as written out in one launch", name);
	gt_expect(!memcmp(w1.data(), fused.data(), w1.size() * 4) && !memcmp(w2.data(), f2.data(), w2.size() * 4), n2);
	void *fr[] = { dh, dw, y1, y16, yf, yw, y2, y2w, lgt, sg, wts, xb, xo, idx };
	for (void *p : fr)
		cudaFree(p);
	dmat_free(&d);
	dmat_free(&dr);
	dmat_free(&dg);
	dmat_free(&d2);
}

/* The expansion back to fp16 row-major (cuBLAS's input) against the reference dequantization:
 * equal up to fp16 rounding (2^-11 per element); 2e-3. */
static void expand_case(const char *label, int N, int K, enum lin_kind kind, int bits, int G, bool asym, bool act)
{
	char name[256];
	struct tlin t;
	struct dmat d;
	const struct q3_linear *lp = &t.l;

	snprintf(name, sizeof(name), "expand %s N=%d K=%d", label, N, K);
	if (!want(name))
		return;
	make_linear(&t, N, K, kind, bits, G, asym, act, 1);
	dmat_upload(&d, &lp, 1);
	uint16_t *w = dev_alloc<uint16_t>((size_t)N * K);

	GT_OK(q3g_mat_expand(&d.m, 0, w, 0, &e_));
	std::vector<float> got = f16_to_f32(dev_download(w, (size_t)N * K)), ref((size_t)N * K);

	q3_linear_dequant(&t.l, ref.data());
	gt_compare(name, got.data(), ref.data(), ref.size(), 2e-3);
	cudaFree(w);
	dmat_free(&d);
}

/* Stacks filled by q3g_mat_repack_raw (raw GPTQ bytes already on the device, as the offload's
 * prefill streams them: n matrices in two calls, each tensor at its own offset) are byte for byte
 * the stacks q3g_mat_upload makes from the host. */
static void repack_raw_case(int N, int K, int bits, int G, bool asym, int n)
{
	char name[256];
	std::vector<struct tlin> t(n);
	std::vector<const struct q3_linear *> ls(n);
	struct dmat a, b;

	snprintf(name, sizeof(name), "linear repack raw q%d %s N=%d K=%d x%d", bits, asym ? "asym" : "sym", N, K, n);
	if (!want(name))
		return;
	for (int j = 0; j < n; j++) {
		make_linear(&t[j], N, K, LIN_GPTQ, bits, G, asym, false, 1);
		ls[j] = &t[j].l;
	}
	GT_OK(q3g_mat_plan(ls.data(), n, &a.p, &e_));
	b.p = a.p;
	size_t bytes = q3g_mat_bytes(&a.p);

	GT_CHECK(cudaMalloc(&a.mem, bytes));
	GT_CHECK(cudaMalloc(&b.mem, bytes));
	GT_CHECK(cudaMemset(a.mem, 0x5a, bytes)); /* bytes no path writes compare equal */
	GT_CHECK(cudaMemset(b.mem, 0x5a, bytes));
	q3g_mat_place(&a.m, &a.p, a.mem);
	q3g_mat_place(&b.m, &b.p, b.mem);
	for (int j = 0; j < n; j++)
		GT_OK(q3g_mat_upload(&a.m, j, ls[j], NULL, gt_stage(), 0, &e_));
	/* the raw bytes: matrix j's tensors in the order scales, qweight, qzeros, 4-byte aligned with
	 * a gap that differs per matrix */
	std::vector<uint64_t> off((size_t)n * 3);
	uint64_t at = 0;

	for (int j = 0; j < n; j++) {
		const struct q3_tensor *ts[3] = { ls[j]->qweight, ls[j]->qzeros, ls[j]->scales };

		for (int k : { 2, 0, 1 }) {
			at += 4 * (uint64_t)(j + k);
			off[(size_t)j * 3 + k] = at;
			at += Q3_ALIGN_UP(ts[k]->nbytes, 4);
		}
	}
	char *raw = dev_alloc<char>(at);

	for (int j = 0; j < n; j++) {
		const struct q3_tensor *ts[3] = { ls[j]->qweight, ls[j]->qzeros, ls[j]->scales };

		for (int k = 0; k < 3; k++)
			GT_CHECK(cudaMemcpy(raw + off[(size_t)j * 3 + k], ts[k]->data, ts[k]->nbytes, cudaMemcpyHostToDevice));
	}
	int cut = n / 2;

	GT_OK(q3g_mat_repack_raw(&b.m, 0, cut, ls[0], raw, (const uint64_t(*)[3])off.data(), 0, &e_));
	GT_OK(q3g_mat_repack_raw(&b.m, cut, n - cut, ls[cut], raw, (const uint64_t(*)[3])(off.data() + 3 * cut), 0,
				 &e_));
	GT_CHECK(cudaDeviceSynchronize());
	std::vector<uint8_t> ha = dev_download((const uint8_t *)a.mem, bytes), hb = dev_download((const uint8_t *)b.mem, bytes);
	size_t diff = 0;

	for (size_t i = 0; i < bytes; i++)
		diff += ha[i] != hb[i];
	snprintf(name + strlen(name), sizeof(name) - strlen(name), ": %zu of %zu bytes differ from the upload", diff,
		 bytes);
	gt_expect(diff == 0, name);
	cudaFree(raw);
	dmat_free(&a);
	dmat_free(&b);
}

/* Three Linears of different formats in one matvec launch. */
static void multi_job_case(int R)
{
	char name[128];
	struct tlin t[3];
	struct dmat d[3];
	int N[3] = { 200, 64, 1 }, K = 512;
	std::vector<uint16_t> xb;
	std::vector<float> xf;

	snprintf(name, sizeof(name), "linear 3 jobs (q4 act-order, f16, f16 N=1) R=%d", R);
	if (!want(name))
		return;
	make_linear(&t[0], N[0], K, LIN_GPTQ, 4, 128, true, true);
	make_linear(&t[1], N[1], K, LIN_BF16);
	make_linear(&t[2], N[2], K, LIN_BF16);
	rnd_f16(xb, xf, (size_t)R * K, 1.0f);
	uint16_t *x = dev_upload(xb.data(), xb.size());
	struct q3g_job j[3];
	float *y[3];

	for (int i = 0; i < 3; i++) {
		const struct q3_linear *lp = &t[i].l;

		dmat_upload(&d[i], &lp, 1);
		y[i] = dev_alloc<float>((size_t)R * N[i]);
		j[i] = (struct q3g_job){ d[i].m, x, y[i], K, N[i], Q3G_EPI_STORE };
	}
	GT_OK(q3g_mmv(j, 3, R, 0, &e_));
	for (int i = 0; i < 3; i++) {
		std::vector<float> ref((size_t)R * N[i]);
		char n2[160];

		ref_linear(&t[i].l, xf.data(), R, ref.data());
		snprintf(n2, sizeof(n2), "%s: job %d", name, i);
		gt_compare(n2, dev_download(y[i], ref.size()).data(), ref.data(), ref.size(), 1e-4);
		cudaFree(y[i]);
		dmat_free(&d[i]);
	}
	cudaFree(x);
}

/* The matvec normalizing its input while staging (decode): against the reference RMSNorm,
 * rounded to fp16 as q3g_add_rmsnorm writes it, then the reference Linear.  An input whose fp32
 * value straddles an fp16 rounding boundary may round the other way on the device (different
 * summation order of the norm): one ulp (2^-10) on a few inputs, ~1e-5 on the outputs; 1e-4. */
static void norm_lin_case(int N, int K, int R, bool act)
{
	char name[160];
	struct tlin t;
	struct dmat d;
	const struct q3_linear *lp = &t.l;

	snprintf(name, sizeof(name), "linear with RMSNorm staging N=%d K=%d R=%d%s", N, K, R, act ? " act-order" : "");
	if (!want(name))
		return;
	make_linear(&t, N, K, LIN_GPTQ, 4, 128, act, act, 1);
	dmat_upload(&d, &lp, 1);
	std::vector<float> h = rnd_vec((size_t)R * K, 3.0f), w = rnd_vec(K, 0.2f), xn((size_t)R * K), ref((size_t)R * N);

	for (int r = 0; r < R; r++)
		q3_ref_rmsnorm(&xn[(size_t)r * K], &h[(size_t)r * K], w.data(), K, 1e-6f);
	xn = round_f16(xn);
	ref_linear(&t.l, xn.data(), R, ref.data());
	float *dh = dev_upload(h.data(), h.size()), *dw = dev_upload(w.data(), w.size()), *y = dev_alloc<float>(ref.size());
	struct q3g_job j;

	memset(&j, 0, sizeof(j));
	j.w = d.m;
	j.y = y;
	j.ldx = K;
	j.ldy = N;
	j.xh = dh;
	j.normw = dw;
	j.eps = 1e-6f;
	GT_OK(q3g_mmv(&j, 1, R, 0, &e_));
	gt_compare(name, dev_download(y, ref.size()).data(), ref.data(), ref.size(), 1e-4);
	cudaFree(dh);
	cudaFree(dw);
	cudaFree(y);
	dmat_free(&d);
}

static void linear_tests(void)
{
	/* every layout variant at small and edge shapes */
	lin_case("bf16", 64, 2048, LIN_BF16, 0, 0, false, false, 1, 1);
	lin_case("bf16", 64, 2048, LIN_BF16, 0, 0, false, false, 1, 2);
	lin_case("bf16 N=1", 1, 2048, LIN_BF16, 0, 0, false, false, 1, 4);
	lin_case("f32 tile edges", 40, 80, LIN_F32, 0, 0, false, false, 1, 3);
	lin_case("q4 sym g128", 512, 2048, LIN_GPTQ, 4, 128, false, false, 1, 1);
	lin_case("q4 sym g128", 512, 2048, LIN_GPTQ, 4, 128, false, false, 1, 8);
	lin_case("q4 sym g128", 512, 2048, LIN_GPTQ, 4, 128, false, false, 1, 9);
	lin_case("q4 sym g128", 512, 2048, LIN_GPTQ, 4, 128, false, false, 1, 16);
	lin_case("q4 sym g128", 512, 2048, LIN_GPTQ, 4, 128, false, false, 1, 16, true);
	lin_case("q4 asym act-order g128 edges", 24, 256, LIN_GPTQ, 4, 128, true, true, 1, 5);
	lin_case("q4 asym act-order g32", 40, 192, LIN_GPTQ, 4, 32, true, true, 1, 2);
	lin_case("q4 sym g32", 128, 256, LIN_GPTQ, 4, 32, false, false, 1, 1);
	lin_case("q4 sym g16 K=80 (pad)", 16, 80, LIN_GPTQ, 4, 16, false, false, 1, 3);
	lin_case("q4 group=K", 16, 192, LIN_GPTQ, 4, -1, false, false, 1, 2);
	lin_case("q4 v2 asym", 32, 128, LIN_GPTQ, 4, 64, true, false, 0, 7);
	lin_case("q4 g8 (bf16 fallback)", 16, 64, LIN_GPTQ, 4, 8, true, false, 1, 2);
	lin_case("q8 sym g128", 256, 512, LIN_GPTQ, 8, 128, false, false, 1, 4);
	lin_case("q8 asym act-order g128", 40, 384, LIN_GPTQ, 8, 128, true, true, 1, 1);
	lin_case("q8 sym g128", 2048, 512, LIN_GPTQ, 8, 128, false, false, 1, 12);
	/* the wide blocks' rows multicast (sm_90) with an odd tile count: the grid padded to whole
	 * clusters, the pad block copying its share of the rows */
	lin_case("q4 sym g128 (three tiles)", 40, 512, LIN_GPTQ, 4, 128, false, false, 1, 9, true);
	multi_job_case(1);
	multi_job_case(11);
	norm_lin_case(512, 2048, 1, false);
	norm_lin_case(40, 256, 13, true);
	/* the real model's shapes */
	lin_case("q4 qkvz", 12288, 2048, LIN_GPTQ, 4, 128, false, false, 1, 1);
	lin_case("q4 qkvz", 12288, 2048, LIN_GPTQ, 4, 128, false, false, 1, 16);
	lin_case("q4 out_proj", 2048, 4096, LIN_GPTQ, 4, 128, false, false, 1, 1, true);
	lin_case("q4 out_proj", 2048, 4096, LIN_GPTQ, 4, 128, false, false, 1, 16);
	lin_case("q4 expert down", 2048, 512, LIN_GPTQ, 4, 128, true, true, 1, 3);
	lin_case("bf16 router", 512, 2048, LIN_BF16, 0, 0, false, false, 1, 16);
	mmv_invariance_case("q4 out_proj (few tiles: wide blocks)", 2048, 4096);
	mmv_invariance_case("q4 qkvz (two tiles a block)", 12288, 2048);
	/* the one-token-tile instance (R <= 8) against the sliced two-tile one (R = 9, 16) where a
	 * warp's slice starts inside a scale group, with zero points, act-order and int8 */
	mmv_invariance_case("q4 asym act-order g80 (slices from mid-group)", 6144, 1280, LIN_GPTQ, 4, 80, true, true);
	mmv_invariance_case("q8 asym g32 (wide blocks)", 512, 2048, LIN_GPTQ, 8, 32, true, false);
	lin_case("q4 asym act-order g80", 6144, 1280, LIN_GPTQ, 4, 80, true, true, 1, 1);
	lin_case("q8 asym g32", 512, 2048, LIN_GPTQ, 8, 32, true, false, 1, 2, true);
	/* the sliced instance above four rows (several slices a warp) at the dense shapes and formats */
	mmv_invariance_case("bf16 q_proj", 8192, 2048, LIN_BF16);
	lin_case("bf16 qkvz", 12288, 2048, LIN_BF16, 0, 0, false, false, 1, 16);
	lin_case("bf16 q_proj", 8192, 2048, LIN_BF16, 0, 0, false, false, 1, 9, true);
	lin_case("q4 asym act-order qkvz", 12288, 2048, LIN_GPTQ, 4, 128, true, true, 1, 16, true);
	lin_case("q8 sym q_proj", 8192, 2048, LIN_GPTQ, 8, 128, false, false, 1, 5);
	norm_paths_case(12288, 2048, false);
	norm_paths_case(512, 2048, true);
	/* many rows: cuBLAS on the expanded matrix */
	lin_case("gemm q4 asym act-order", 96, 256, LIN_GPTQ, 4, 128, true, true, 1, 40);
	lin_case("gemm q4 out_proj", 2048, 4096, LIN_GPTQ, 4, 128, false, false, 1, 100, true);
	lin_case("gemm bf16", 64, 2048, LIN_BF16, 0, 0, false, false, 1, 33);
	lin_case("gemm q8", 256, 512, LIN_GPTQ, 8, 128, false, false, 1, 70);
	repack_raw_case(512, 2048, 4, 128, true, 5);
	repack_raw_case(2048, 512, 4, 128, false, 3);
	repack_raw_case(64, 256, 8, 128, false, 3);
	expand_case("q4 asym act-order", 48, 256, LIN_GPTQ, 4, 64, true, true);
	expand_case("q8 sym", 32, 128, LIN_GPTQ, 8, 128, false, false);
	expand_case("bf16", 24, 80, LIN_BF16, 0, 0, false, false);
}

/* ---- norms and embedding ---------------------------------------------------------------------- */

/* 16-bit outputs against the reference rounded the same way: they differ only where the fp32
 * values straddle a rounding boundary (one ulp on a few elements: 2^-8 relative for bf16, 2^-10
 * for fp16): 5e-3 and 1e-3. */
#define TOL_BF16_OUT 5e-3
#define TOL_F16_OUT 1e-3

static void norm_tests(void)
{
	const int R = 5, n = 2048;
	const float eps = 1e-6f;

	if (want("add_rmsnorm")) {
		std::vector<float> h = rnd_vec((size_t)R * n, 1.0f), a = rnd_vec((size_t)R * n, 0.3f), w = rnd_vec(n, 0.2f);
		std::vector<float> hs(h), ref((size_t)R * n);
		float *dh = dev_upload(h.data(), h.size()), *da = dev_upload(a.data(), a.size()), *dw = dev_upload(w.data(), n);
		uint16_t *dy = dev_alloc<uint16_t>((size_t)R * n);

		for (size_t i = 0; i < hs.size(); i++)
			hs[i] += a[i];
		for (int r = 0; r < R; r++)
			q3_ref_rmsnorm(&ref[(size_t)r * n], &hs[(size_t)r * n], w.data(), n, eps);
		GT_OK(q3g_add_rmsnorm(dh, da, dy, dw, NULL, R, n, eps, 0, &e_));
		/* h + a is one fp32 addition on both sides: exact */
		gt_compare("add_rmsnorm: residual h += a", dev_download(dh, hs.size()).data(), hs.data(), hs.size(), 1e-7);
		gt_compare("add_rmsnorm: y", f16_to_f32(dev_download(dy, ref.size())).data(), round_f16(ref).data(),
			   ref.size(), TOL_F16_OUT);
		/* selected rows, no add (the final norm before lm_head) */
		int sel[2] = { 4, 1 };
		int *dsel = dev_upload(sel, 2);
		std::vector<float> ref2((size_t)2 * n);

		dev_poison(dy, (size_t)R * n);
		for (int i = 0; i < 2; i++)
			q3_ref_rmsnorm(&ref2[(size_t)i * n], &hs[(size_t)sel[i] * n], w.data(), n, eps);
		GT_OK(q3g_add_rmsnorm(dh, NULL, dy, dw, dsel, 2, n, eps, 0, &e_));
		gt_compare("add_rmsnorm: selected rows", f16_to_f32(dev_download(dy, ref2.size())).data(),
			   round_f16(ref2).data(), ref2.size(), TOL_F16_OUT);
		cudaFree(dh);
		cudaFree(da);
		cudaFree(dw);
		cudaFree(dy);
		cudaFree(dsel);
	}
	if (want("gated_rmsnorm")) {
		const int nh = 32, Dv = 128, ldz = 4096 + 8;
		std::vector<float> o = rnd_vec((size_t)R * nh * Dv, 1.0f), z = rnd_vec((size_t)R * ldz, 1.0f),
				   w = rnd_vec(Dv, 1.0f), ref((size_t)R * nh * Dv);
		float *dO = dev_upload(o.data(), o.size()), *dz = dev_upload(z.data(), z.size()), *dw = dev_upload(w.data(), w.size());
		uint16_t *dc = dev_alloc<uint16_t>(ref.size());

		for (int r = 0; r < R; r++)
			for (int j = 0; j < nh; j++)
				q3_ref_rmsnorm_gated(&ref[((size_t)r * nh + j) * Dv], &o[((size_t)r * nh + j) * Dv],
						     &z[(size_t)r * ldz + (size_t)j * Dv], w.data(), Dv, eps);
		GT_OK(q3g_gated_rmsnorm(dc, dO, dz, ldz, dw, R, nh, Dv, eps, 0, &e_));
		gt_compare("gated_rmsnorm", f16_to_f32(dev_download(dc, ref.size())).data(), round_f16(ref).data(),
			   ref.size(), TOL_F16_OUT);
		cudaFree(dO);
		cudaFree(dz);
		cudaFree(dw);
		cudaFree(dc);
	}
	if (want("embed")) {
		const int V = 1000, H = 256, n = 7;
		std::vector<uint16_t> tb;
		std::vector<float> tf;
		std::vector<int32_t> ids(n);
		std::vector<float> ref((size_t)n * H);

		rnd_bf16(tb, tf, (size_t)V * H, 1.0f);
		for (int i = 0; i < n; i++) {
			ids[i] = rnd_int(V);
			memcpy(&ref[(size_t)i * H], &tf[(size_t)ids[i] * H], H * 4);
		}
		uint16_t *dt = dev_upload(tb.data(), tb.size());
		int32_t *di = dev_upload(ids.data(), n);
		float *dh = dev_alloc<float>(ref.size());
		struct q3g_rows rows = { di, NULL, NULL, NULL };

		GT_OK(q3g_embed(dh, dt, rows, n, H, 0, &e_));
		/* a copy: exact */
		gt_compare("embed", dev_download(dh, ref.size()).data(), ref.data(), ref.size(), 0.0);
		cudaFree(dt);
		cudaFree(di);
		cudaFree(dh);
	}
}

/* ---- sessions for the stateful ops ---------------------------------------------------------- */

/* One layer of each kind, states laid out as the backend lays them out. */
struct tseq {
	int pos, n;
};

struct tstate {
	struct q3g_dims d;
	int nseq, R;
	std::vector<struct q3g_seq> seq_h;
	std::vector<int> row_seq, row_pos;
	std::vector<int32_t> ids;
	struct q3g_rows rows;
	void *dmem;
	std::vector<void *> bufs;
	size_t kv_n, conv_n, rec_n;
};

static void tstate_init(struct tstate *t, const struct q3g_dims *d, const std::vector<tseq> &seqs)
{
	t->d = *d;
	t->nseq = (int)seqs.size();
	t->R = 0;
	t->kv_n = (size_t)2 * d->max_ctx * d->Hkv * d->D;
	t->conv_n = (size_t)(d->W - 1) * d->conv_dim;
	t->rec_n = (size_t)d->Nv * d->Dv * d->Dk;
	for (int s = 0; s < t->nseq; s++) {
		struct q3g_seq q;
		uint16_t *kv = dev_alloc<uint16_t>(t->kv_n);
		float *conv = dev_alloc<float>(2 * t->conv_n), *rec = dev_alloc<float>(t->rec_n);

		memset(&q, 0, sizeof(q));
		q.row0 = t->R;
		q.n = seqs[s].n;
		q.pos = seqs[s].pos;
		q.kv = kv;
		q.conv_rd = conv;
		q.conv_wr = conv + t->conv_n;
		q.rec = rec;
		t->bufs.push_back(kv);
		t->bufs.push_back(conv);
		t->bufs.push_back(rec);
		t->seq_h.push_back(q);
		for (int i = 0; i < q.n; i++) {
			t->row_seq.push_back(s);
			t->row_pos.push_back(q.pos + i);
			t->ids.push_back(rnd_int(100));
		}
		t->R += q.n;
	}
	t->rows.ids = dev_upload(t->ids.data(), t->ids.size());
	t->rows.row_seq = dev_upload(t->row_seq.data(), t->row_seq.size());
	t->rows.row_pos = dev_upload(t->row_pos.data(), t->row_pos.size());
	t->rows.seq = dev_upload(t->seq_h.data(), t->seq_h.size());
}

static void tstate_free(struct tstate *t)
{
	for (void *p : t->bufs)
		cudaFree(p);
	cudaFree((void *)t->rows.ids);
	cudaFree((void *)t->rows.row_seq);
	cudaFree((void *)t->rows.row_pos);
	cudaFree((void *)t->rows.seq);
}

static struct q3g_dims dims_small(void)
{
	struct q3g_dims d;

	memset(&d, 0, sizeof(d));
	d.H = 256;
	d.V = 4096;
	d.Hq = 4;
	d.Hkv = 2;
	d.D = 64;
	d.rot = 16;
	d.rope_theta = 1e7;
	d.Nk = 2;
	d.Nv = 4;
	d.Dk = 64;
	d.Dv = 64;
	d.W = 4;
	d.key_dim = 128;
	d.value_dim = 256;
	d.conv_dim = 512;
	d.E = 16;
	d.topk = 4;
	d.I = 128;
	d.Is = 128;
	d.norm_topk = true;
	d.eps = 1e-6f;
	d.max_ctx = 512;
	return d;
}

static struct q3g_dims dims_real(void)
{
	struct q3g_dims d = dims_small();

	d.H = 2048;
	d.V = 151936;
	d.Hq = 16;
	d.Hkv = 2;
	d.D = 256;
	d.rot = 64;
	d.Nk = 16;
	d.Nv = 32;
	d.Dk = 128;
	d.Dv = 128;
	d.key_dim = 2048;
	d.value_dim = 4096;
	d.conv_dim = 8192;
	d.E = 512;
	d.topk = 10;
	d.I = 512;
	d.Is = 512;
	d.max_ctx = 8192;
	return d;
}

/* ---- Gated DeltaNet ------------------------------------------------------------------------- */

static void conv_case(const char *label, const struct q3g_dims *d, const std::vector<tseq> &seqs)
{
	char name[128];

	snprintf(name, sizeof(name), "conv1d_silu %s", label);
	if (!want(name))
		return;
	struct tstate t;
	const int C = d->conv_dim, W = d->W, S = W - 1, ldq = C + 40;

	tstate_init(&t, d, seqs);
	std::vector<float> x = rnd_vec((size_t)t.R * ldq, 1.0f), cw = rnd_vec((size_t)C * W, 0.5f);
	std::vector<float> ref_u((size_t)t.R * C), ref_state;
	float *dx = dev_upload(x.data(), x.size()), *dcw = dev_upload(cw.data(), cw.size());
	float *du = dev_alloc<float>(ref_u.size());

	for (int s = 0; s < t.nseq; s++) {
		const struct q3g_seq &q = t.seq_h[s];
		std::vector<float> st = rnd_vec((size_t)S * C, 1.0f), xin((size_t)q.n * C);

		/* slots for positions before 0 must not be read (a fresh sequence's state is stale):
		 * poison them on the device, zeros for the reference */
		for (int j = 0; j < S; j++)
			if (q.pos - S + j < 0)
				std::fill(st.begin() + (size_t)j * C, st.begin() + (size_t)(j + 1) * C, NAN);
		GT_CHECK(cudaMemcpy(q.conv_rd, st.data(), st.size() * 4, cudaMemcpyHostToDevice));
		for (float &v : st)
			if (isnan(v))
				v = 0.0f;
		for (int i = 0; i < q.n; i++)
			memcpy(&xin[(size_t)i * C], &x[(size_t)(q.row0 + i) * ldq], C * 4);
		q3_ref_conv1d_silu(&ref_u[(size_t)q.row0 * C], xin.data(), q.n, C, cw.data(), W, st.data());
		ref_state.insert(ref_state.end(), st.begin(), st.end());
	}
	GT_OK(q3g_conv1d_silu(du, dx, ldq, dcw, t.rows, t.R, t.nseq, 0, d, 0, &e_));
	char n2[160];

	/* the same fp32 sums in the same order; silu's exp differs by an ulp or two: 1e-5 */
	snprintf(n2, sizeof(n2), "%s: output", name);
	gt_compare(n2, dev_download(du, ref_u.size()).data(), ref_u.data(), ref_u.size(), 1e-5);
	std::vector<float> got;
	for (int s = 0; s < t.nseq; s++) {
		std::vector<float> g = dev_download(t.seq_h[s].conv_wr, (size_t)S * C);
		got.insert(got.end(), g.begin(), g.end());
	}
	/* the new state is a copy of inputs: exact */
	snprintf(n2, sizeof(n2), "%s: new state", name);
	gt_compare(n2, got.data(), ref_state.data(), got.size(), 0.0);
	cudaFree(dx);
	cudaFree(dcw);
	cudaFree(du);
	tstate_free(&t);
}

static void delta_case(const char *label, const struct q3g_dims *d, const std::vector<tseq> &seqs, bool fuse)
{
	char name[160];

	snprintf(name, sizeof(name), "delta %s%s", label, fuse ? " (fused gated norm)" : "");
	if (!want(name))
		return;
	struct tstate t;
	const int Nv = d->Nv, Dk = d->Dk, Dv = d->Dv, C = d->conv_dim, ldz = d->value_dim + 16;

	tstate_init(&t, d, seqs);
	std::vector<float> u = rnd_vec((size_t)t.R * C, 1.0f), ba = rnd_vec((size_t)t.R * 2 * Nv, 1.0f);
	/* decode (fuse): the kernel also runs the conv step, from the projections x and the conv
	 * state; the reference conv gives u */
	const int W = d->W, ldq = C + 24;
	std::vector<float> x = rnd_vec((size_t)t.R * ldq, 1.0f), cw = rnd_vec((size_t)C * W, 0.5f), ref_conv;

	if (fuse)
		for (int sidx = 0; sidx < t.nseq; sidx++) {
			const struct q3g_seq &q = t.seq_h[sidx];
			std::vector<float> st = rnd_vec((size_t)(W - 1) * C, 1.0f);

			for (int j = 0; j < W - 1; j++) /* positions before 0: poison, never read */
				if (q.pos - (W - 1) + j < 0)
					std::fill(st.begin() + (size_t)j * C, st.begin() + (size_t)(j + 1) * C, NAN);
			GT_CHECK(cudaMemcpy(q.conv_rd, st.data(), st.size() * 4, cudaMemcpyHostToDevice));
			for (float &v : st)
				if (isnan(v))
					v = 0.0f;
			q3_ref_conv1d_silu(&u[(size_t)q.row0 * C], &x[(size_t)q.row0 * ldq], 1, C, cw.data(), W, st.data());
			ref_conv.insert(ref_conv.end(), st.begin(), st.end());
		}
	std::vector<float> A_log(Nv), dtb = rnd_vec(Nv, 0.5f), z = rnd_vec((size_t)t.R * ldz, 1.0f),
			   nw = rnd_vec(Dv, 1.0f);
	std::vector<float> ref_o((size_t)t.R * Nv * Dv), ref_core((size_t)t.R * Nv * Dv), ref_S, S0;

	for (int j = 0; j < Nv; j++)
		A_log[j] = logf(1.0f + 15.0f * fabsf(rnd_uniform()));
	for (int s = 0; s < t.nseq; s++) {
		const struct q3g_seq &q = t.seq_h[s];
		std::vector<float> Sdev = rnd_vec(t.rec_n, 0.1f);

		if (q.pos == 0)
			std::fill(Sdev.begin(), Sdev.end(), NAN); /* must not be read */
		GT_CHECK(cudaMemcpy(q.rec, Sdev.data(), Sdev.size() * 4, cudaMemcpyHostToDevice));
		if (s == 0)
			S0 = Sdev;
		for (int j = 0; j < Nv; j++) {
			int kh = j / (Nv / d->Nk);
			std::vector<float> S((size_t)Dk * Dv), qn(Dk), kn(Dk), beta(Nv), g(Nv);

			/* device layout [Dv][Dk] (transposed) -> reference S[i][c] */
			for (int c = 0; c < Dv; c++)
				for (int i = 0; i < Dk; i++)
					S[(size_t)i * Dv + c] = q.pos ? Sdev[((size_t)j * Dv + c) * Dk + i] : 0.0f;
			for (int tk = 0; tk < q.n; tk++) {
				int r = q.row0 + tk;
				const float *ur = &u[(size_t)r * C];
				float *o = &ref_o[((size_t)r * Nv + j) * Dv];

				q3_ref_delta_qk(qn.data(), kn.data(), ur + kh * Dk, ur + d->key_dim + kh * Dk, Dk);
				q3_ref_delta_gates(beta.data(), g.data(), &ba[(size_t)r * 2 * Nv], &ba[(size_t)r * 2 * Nv + Nv],
						   A_log.data(), dtb.data(), Nv);
				q3_ref_delta_step(S.data(), qn.data(), kn.data(), ur + 2 * d->key_dim + j * Dv, g[j], beta[j], o,
						  Dk, Dv);
				q3_ref_rmsnorm_gated(&ref_core[((size_t)r * Nv + j) * Dv], o, &z[(size_t)r * ldz + j * Dv],
						     nw.data(), Dv, d->eps);
			}
			for (int c = 0; c < Dv; c++)
				for (int i = 0; i < Dk; i++)
					Sdev[((size_t)j * Dv + c) * Dk + i] = S[(size_t)i * Dv + c];
		}
		ref_S.insert(ref_S.end(), Sdev.begin(), Sdev.end());
	}
	float *du = dev_upload(u.data(), u.size()), *dba = dev_upload(ba.data(), ba.size());
	float *dA = dev_upload(A_log.data(), Nv), *ddt = dev_upload(dtb.data(), Nv), *dz = dev_upload(z.data(), z.size());
	float *dnw = dev_upload(nw.data(), Dv), *dO = dev_alloc<float>(ref_o.size());
	uint16_t *dcore = dev_alloc<uint16_t>(ref_core.size());

	if (fuse) {
		float *dx = dev_upload(x.data(), x.size()), *dcw = dev_upload(cw.data(), cw.size());

		GT_OK(q3g_delta_decode(dx, ldq, dcw, dba, dA, ddt, dcore, dz, ldz, dnw, t.rows, t.nseq, 0, d, 0, &e_));
		std::vector<float> got;
		for (int sidx = 0; sidx < t.nseq; sidx++) {
			std::vector<float> g = dev_download(t.seq_h[sidx].conv_wr, (size_t)(W - 1) * C);
			got.insert(got.end(), g.begin(), g.end());
		}
		char n3[200];
		/* the new conv state is a copy of inputs: exact */
		snprintf(n3, sizeof(n3), "%s: new conv state", name);
		gt_compare(n3, got.data(), ref_conv.data(), got.size(), 0.0);
		if (t.nseq > 1) {
			/* sequence 0 again alone, from its state before: the bits it got in the batch (the
			 * batch's size may pick another block shape) */
			const struct q3g_seq &q0 = t.seq_h[0];
			std::vector<uint16_t> cb = dev_download(dcore + (size_t)q0.row0 * Nv * Dv, (size_t)Nv * Dv);
			std::vector<float> sb = dev_download(q0.rec, t.rec_n);

			GT_CHECK(cudaMemcpy(q0.rec, S0.data(), S0.size() * 4, cudaMemcpyHostToDevice));
			GT_OK(q3g_delta_decode(dx, ldq, dcw, dba, dA, ddt, dcore, dz, ldz, dnw, t.rows, 1, 0, d, 0, &e_));
			std::vector<uint16_t> ca = dev_download(dcore + (size_t)q0.row0 * Nv * Dv, (size_t)Nv * Dv);
			std::vector<float> sa = dev_download(q0.rec, t.rec_n);

			snprintf(n3, sizeof(n3), "%s: sequence 0 alone gives the bits of the batch of %d (output, state)", name,
				 t.nseq);
			gt_expect(!memcmp(ca.data(), cb.data(), ca.size() * 2) && !memcmp(sa.data(), sb.data(), sa.size() * 4), n3);
		}
		cudaFree(dx);
		cudaFree(dcw);
	} else {
		GT_OK(q3g_delta(du, dba, dA, ddt, dO, t.rows, t.nseq, 0, d, 0, &e_));
		GT_OK(q3g_gated_rmsnorm(dcore, dO, dz, ldz, dnw, t.R, Nv, Dv, d->eps, 0, &e_));
	}
	char n2[200];
	/* fp32 on both sides; reductions in another order and exp/log1p of the device's libm: the
	 * recurrence carries rounding across tokens, still far under 1e-4 for a few hundred steps
	 * (fla's own tests allow 2e-3) */
	if (!fuse) {
		snprintf(n2, sizeof(n2), "%s: o", name);
		gt_compare(n2, dev_download(dO, ref_o.size()).data(), ref_o.data(), ref_o.size(), 1e-4);
	}
	snprintf(n2, sizeof(n2), "%s: gated-normed output (fp16)", name);
	gt_compare(n2, f16_to_f32(dev_download(dcore, ref_core.size())).data(), round_f16(ref_core).data(),
		   ref_core.size(), TOL_F16_OUT);
	std::vector<float> got;
	for (int s = 0; s < t.nseq; s++) {
		std::vector<float> g = dev_download(t.seq_h[s].rec, t.rec_n);
		got.insert(got.end(), g.begin(), g.end());
	}
	snprintf(n2, sizeof(n2), "%s: final state", name);
	gt_compare(n2, got.data(), ref_S.data(), got.size(), 1e-4);
	void *fr[] = { du, dba, dA, ddt, dz, dnw, dO, dcore };
	for (void *p : fr)
		cudaFree(p);
	tstate_free(&t);
}

static void gdn_tests(void)
{
	struct q3g_dims ds = dims_small(), dr = dims_real();

	conv_case("small, 4 sequences (fresh, decode, short continuation, fresh 1)", &ds,
		  { { 0, 5 }, { 7, 1 }, { 2, 2 }, { 0, 1 } });
	conv_case("real conv_dim 8192, decode batch", &dr, { { 3, 1 }, { 100, 1 }, { 0, 1 } });
	conv_case("real conv_dim 8192, prefill 70", &dr, { { 5, 70 } });
	delta_case("small decode", &ds, { { 0, 1 }, { 9, 1 }, { 3, 1 }, { 1, 1 } }, true);
	delta_case("small prefill", &ds, { { 0, 70 }, { 3, 130 } }, false);
	delta_case("real decode", &dr, { { 4, 1 }, { 0, 1 } }, true);
	delta_case("real decode, 16 sequences", &dr,
		   { { 9, 1 }, { 0, 1 }, { 1, 1 }, { 2, 1 }, { 3, 1 }, { 5, 1 }, { 8, 1 }, { 13, 1 }, { 21, 1 }, { 34, 1 },
		     { 55, 1 }, { 89, 1 }, { 144, 1 }, { 233, 1 }, { 377, 1 }, { 610, 1 } },
		   true);
	if (want("delta refuses")) { /* missing outputs or inputs: refused before any launch */
		struct q3g_rows none;
		q3_err e1, e2, e3;

		memset(&none, 0, sizeof(none));
		e1.msg[0] = e2.msg[0] = e3.msg[0] = 0;
		int r1 = q3g_delta(NULL, NULL, NULL, NULL, NULL, none, 1, 0, &dr, 0, &e1);
		int r2 = q3g_delta_decode(NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL, none, 1, 0, &dr, 0, &e2);
		/* any non-NULL conv weights: refused before they are read */
		int r3 = q3g_delta_decode(NULL, 0, (const float *)&dr, NULL, NULL, NULL, NULL, NULL, 0, NULL, none, 1, 0, &dr,
					  0, &e3);
		char n2[1200];

		snprintf(n2, sizeof(n2), "delta refuses prefill without o (%d: %s), decode without conv weights (%d: %s) "
			 "and without core (%d: %s)", r1, e1.msg, r2, e2.msg, r3, e3.msg);
		gt_expect(r1 == -EINVAL && r2 == -EINVAL && r3 == -EINVAL && strstr(e1.msg, "delta rule") &&
				  strstr(e2.msg, "conv weights") && strstr(e3.msg, "core"),
			  n2);
	}
	/* chunks of 32 tokens: a sequence of 2 chunks and a tail, one shorter than a chunk, one of
	 * ten chunks and a tail */
	delta_case("real prefill", &dr, { { 0, 65 }, { 17, 3 }, { 5, 330 } }, false);
}

/* ---- attention ------------------------------------------------------------------------------- */

/* Fills a sequence's cache positions [0, upto) of layer 0 with random bf16 K and V; returns them
 * as fp32 [upto][Hkv·D] each. */
static void fill_cache(const struct q3g_dims *d, const struct q3g_seq &q, int upto, std::vector<float> &K,
		       std::vector<float> &V)
{
	size_t kvd = (size_t)d->Hkv * d->D, n = (size_t)upto * kvd;
	std::vector<uint16_t> kb, vb;

	rnd_bf16(kb, K, n, 1.0f);
	rnd_bf16(vb, V, n, 1.0f);
	GT_CHECK(cudaMemcpy(q.kv, kb.data(), n * 2, cudaMemcpyHostToDevice));
	GT_CHECK(cudaMemcpy(q.kv + (size_t)d->max_ctx * kvd, vb.data(), n * 2, cudaMemcpyHostToDevice));
}

static void prep_case(const char *label, const struct q3g_dims *d, const std::vector<tseq> &seqs)
{
	char name[128];

	snprintf(name, sizeof(name), "attn_prep %s", label);
	if (!want(name))
		return;
	struct tstate t;
	const int D = d->D, qd = d->Hq * D, kvd = d->Hkv * D;

	tstate_init(&t, d, seqs);
	std::vector<float> qg = rnd_vec((size_t)t.R * 2 * qd, 1.0f), k = rnd_vec((size_t)t.R * kvd, 1.0f),
			   v = rnd_vec((size_t)t.R * kvd, 1.0f), qnw = rnd_vec(D, 0.3f), knw = rnd_vec(D, 0.3f);
	std::vector<float> ref_q((size_t)t.R * qd), ref_k((size_t)t.R * kvd), ref_v((size_t)t.R * kvd);

	for (int r = 0; r < t.R; r++) {
		int pos = t.row_pos[r];

		for (int h = 0; h < d->Hq; h++) {
			float *y = &ref_q[((size_t)r * d->Hq + h) * D];

			q3_ref_rmsnorm(y, &qg[(size_t)r * 2 * qd + (size_t)h * 2 * D], qnw.data(), D, d->eps);
			q3_ref_rope(y, d->rot, pos, d->rope_theta);
		}
		for (int h = 0; h < d->Hkv; h++) {
			float *y = &ref_k[(size_t)r * kvd + (size_t)h * D];

			q3_ref_rmsnorm(y, &k[(size_t)r * kvd + (size_t)h * D], knw.data(), D, d->eps);
			q3_ref_rope(y, d->rot, pos, d->rope_theta);
		}
		memcpy(&ref_v[(size_t)r * kvd], &v[(size_t)r * kvd], kvd * 4);
	}
	float *dqg = dev_upload(qg.data(), qg.size()), *dk = dev_upload(k.data(), k.size()), *dv = dev_upload(v.data(), v.size());
	float *dqn = dev_upload(qnw.data(), D), *dkn = dev_upload(knw.data(), D);
	uint16_t *dq = dev_alloc<uint16_t>(ref_q.size());

	GT_OK(q3g_attn_prep(dq, dqg, dk, dv, dqn, dkn, t.rows, t.R, 0, d, 0, &e_));
	std::vector<float> gk, gv;
	for (int r = 0; r < t.R; r++) {
		const struct q3g_seq &q = t.seq_h[t.row_seq[r]];
		std::vector<float> a = bf16_to_f32(dev_download(q.kv + (size_t)t.row_pos[r] * kvd, kvd));
		std::vector<float> b = bf16_to_f32(dev_download(q.kv + ((size_t)d->max_ctx + t.row_pos[r]) * kvd, kvd));
		gk.insert(gk.end(), a.begin(), a.end());
		gv.insert(gv.end(), b.begin(), b.end());
	}
	char n2[160];
	/* bf16 outputs; RoPE angles from the device's sincosf/powf (a few ulp at large positions) */
	snprintf(n2, sizeof(n2), "%s: q", name);
	gt_compare(n2, bf16_to_f32(dev_download(dq, ref_q.size())).data(), round_bf16(ref_q).data(), ref_q.size(), 1e-2);
	snprintf(n2, sizeof(n2), "%s: K cache", name);
	gt_compare(n2, gk.data(), round_bf16(ref_k).data(), gk.size(), 1e-2);
	snprintf(n2, sizeof(n2), "%s: V cache", name);
	gt_compare(n2, gv.data(), round_bf16(ref_v).data(), gv.size(), 0.0);
	void *fr[] = { dqg, dk, dv, dqn, dkn, dq };
	for (void *p : fr)
		cudaFree(p);
	tstate_free(&t);
}

/* Decode attention: each row its own sequence at pos p, cache [0, p] random.  Its splits follow
 * from p alone: one (p < 64), several of 64, and 32 of 128 (p = 4095), 94 -> 96 (2999: a last
 * split of a partial tile) or 256 (8191). */
static void decode_att_case(const char *label, const struct q3g_dims *d, const std::vector<int> &pos)
{
	char name[160];

	snprintf(name, sizeof(name), "attn_decode %s pos %d..%d", label, pos.front(), pos.back());
	if (!want(name))
		return;
	std::vector<tseq> seqs;
	for (int p : pos)
		seqs.push_back({ p, 1 });
	struct tstate t;
	const int D = d->D, qd = d->Hq * D;

	tstate_init(&t, d, seqs);
	std::vector<uint16_t> qb;
	std::vector<float> qf, qg = rnd_vec((size_t)t.R * 2 * qd, 1.0f), ref((size_t)t.R * qd), scores(d->max_ctx);

	rnd_bf16(qb, qf, (size_t)t.R * qd, 1.0f);
	for (int r = 0; r < t.R; r++) {
		std::vector<float> K, V, gate(qd);

		fill_cache(d, t.seq_h[r], pos[r] + 1, K, V);
		for (int h = 0; h < d->Hq; h++)
			memcpy(&gate[(size_t)h * D], &qg[(size_t)r * 2 * qd + (size_t)h * 2 * D + D], D * 4);
		q3_ref_attention(&ref[(size_t)r * qd], &qf[(size_t)r * qd], gate.data(), K.data(), V.data(), pos[r] + 1,
				 d->Hq, d->Hkv, D, 1.0f / sqrtf((float)D), scores.data());
	}
	uint16_t *dq = dev_upload(qb.data(), qb.size()), *datt = dev_alloc<uint16_t>(ref.size());
	float *dqg = dev_upload(qg.data(), qg.size());
	float *part = dev_alloc<float>((size_t)t.R * d->Hq * Q3G_ATT_SPLITS * (D + 2));

	GT_OK(q3g_attn_decode(datt, dq, dqg, part, t.rows, t.R, 0, d, 0, &e_));
	/* fp16 output, fp32 online softmax; q, K, V bf16 on both sides, P rounded to bf16 before
	 * P·V (2^-9 relative per weight), as the prefill's: 1e-2 */
	const std::vector<uint16_t> all = dev_download(datt, ref.size());

	gt_compare(name, f16_to_f32(all).data(), ref.data(), ref.size(), 1e-2);
	/* each row alone (its tables, q, gate and output from row r on): the batch's bits */
	bool same = true;

	for (int r = 0; r < t.R; r++) {
		struct q3g_rows one = t.rows;

		one.ids += r, one.row_seq += r, one.row_pos += r;
		GT_OK(q3g_attn_decode(datt, dq + (size_t)r * qd, dqg + (size_t)r * 2 * qd, part, one, 1, 0, d, 0, &e_));
		same &= dev_download(datt, qd) == std::vector<uint16_t>(all.begin() + (size_t)r * qd,
									all.begin() + (size_t)(r + 1) * qd);
	}
	char n2[200];

	snprintf(n2, sizeof(n2), "%s: each row alone bit for bit as in the batch", name);
	gt_expect(same, n2);
	cudaFree(dq);
	cudaFree(datt);
	cudaFree(dqg);
	cudaFree(part);
	tstate_free(&t);
}

static void prefill_att_case(const char *label, const struct q3g_dims *d, int p0, int n)
{
	char name[160];

	snprintf(name, sizeof(name), "attn_prefill %s p0=%d n=%d", label, p0, n);
	if (!want(name))
		return;
	struct tstate t;
	const int D = d->D, qd = d->Hq * D;

	tstate_init(&t, d, { { p0, n } });
	std::vector<uint16_t> qb;
	std::vector<float> qf, K, V, qg = rnd_vec((size_t)n * 2 * qd, 1.0f), ref((size_t)n * qd), scores(d->max_ctx);

	rnd_bf16(qb, qf, (size_t)n * qd, 1.0f);
	fill_cache(d, t.seq_h[0], p0 + n, K, V);
	for (int i = 0; i < n; i++) {
		std::vector<float> gate(qd);

		for (int h = 0; h < d->Hq; h++)
			memcpy(&gate[(size_t)h * D], &qg[(size_t)i * 2 * qd + (size_t)h * 2 * D + D], D * 4);
		q3_ref_attention(&ref[(size_t)i * qd], &qf[(size_t)i * qd], gate.data(), K.data(), V.data(), p0 + i + 1,
				 d->Hq, d->Hkv, D, 1.0f / sqrtf((float)D), scores.data());
	}
	size_t elems = (size_t)(d->Hq / d->Hkv) * (p0 + n) * 7; /* small scratch: several passes */
	uint16_t *dq = dev_upload(qb.data(), qb.size()), *datt = dev_alloc<uint16_t>(ref.size());
	uint16_t *p = dev_alloc<uint16_t>(elems);
	float *dqg = dev_upload(qg.data(), qg.size()), *s = dev_alloc<float>(elems), *o = dev_alloc<float>(ref.size());

	GT_OK(q3g_attn_prefill(g_cublas, datt, dq, dqg, &t.seq_h[0], 0, s, p, o, elems, d, 0, &e_));
	/* P is rounded to bf16 before P·V (2^-9 relative per weight), the output to fp16: 1e-2 */
	gt_compare(name, f16_to_f32(dev_download(datt, ref.size())).data(), ref.data(), ref.size(), 1e-2);
	void *fr[] = { dq, datt, p, dqg, s, o };
	for (void *q : fr)
		cudaFree(q);
	tstate_free(&t);
}

static void attn_tests(void)
{
	struct q3g_dims ds = dims_small(), dr = dims_real();

	prep_case("small", &ds, { { 0, 3 }, { 100, 1 } });
	prep_case("real", &dr, { { 0, 2 }, { 5000, 1 } });
	decode_att_case("small", &ds, { 0, 6, 63, 64, 100, 511 });
	decode_att_case("real", &dr, { 0, 37, 1023, 2999, 4095 });
	decode_att_case("real", &dr, { 8191 });
	prefill_att_case("small", &ds, 0, 40);
	prefill_att_case("small", &ds, 37, 50);
	prefill_att_case("real", &dr, 0, 96);
	prefill_att_case("real", &dr, 300, 70);
}

/* ---- MoE ------------------------------------------------------------------------------------- */

/* The router and shared gate in fp32 from the residual stream: the reference RMSNorm and Linear
 * in fp32 on the same numbers; only the order of fp32 sums differs: 1e-5. */
static void router_logits_case(int R, int E, int H)
{
	char name[128];

	snprintf(name, sizeof(name), "router logits fp32 R=%d E=%d H=%d (%s)", R, E, H, R <= 16 ? "SIMT" : "cuBLAS");
	if (!want(name))
		return;
	struct tlin tr, tg;
	struct dmat dr, dg;
	const struct q3_linear *lr = &tr.l, *lg = &tg.l;

	make_linear(&tr, E, H, LIN_BF16);
	make_linear(&tg, 1, H, LIN_BF16);
	dmat_upload(&dr, &lr, 1);
	dmat_upload(&dg, &lg, 1);
	std::vector<float> h = rnd_vec((size_t)R * H, 2.0f), w = rnd_vec(H, 0.2f), xn((size_t)R * H);
	std::vector<float> ref((size_t)R * E), rsg(R);

	for (int r = 0; r < R; r++)
		q3_ref_rmsnorm(&xn[(size_t)r * H], &h[(size_t)r * H], w.data(), H, 1e-6f);
	ref_linear(&tr.l, xn.data(), R, ref.data());
	ref_linear(&tg.l, xn.data(), R, rsg.data());
	float *dh = dev_upload(h.data(), h.size()), *dw = dev_upload(w.data(), H), *dl = dev_alloc<float>(ref.size());
	float *ds = dev_alloc<float>(R), *xf = dev_alloc<float>((size_t)R * H), *wt = dev_alloc<float>((size_t)E * H);

	GT_OK(q3g_router_logits(g_cublas, dl, ds, dh, dw, 1e-6f, &dr.m, &dg.m, R, H, xf, wt, 0, &e_));
	char n2[200];
	/* the shared gate is one more row of the same product: compared with the logits (alone, a
	 * single value near zero would make a relative error of rounding noise) */
	std::vector<float> got = dev_download(dl, ref.size()), gsg = dev_download(ds, R);

	got.insert(got.end(), gsg.begin(), gsg.end());
	ref.insert(ref.end(), rsg.begin(), rsg.end());
	snprintf(n2, sizeof(n2), "%s: logits and shared gate", name);
	gt_compare(n2, got.data(), ref.data(), ref.size(), 1e-5);
	ref.resize((size_t)R * E);
	/* the router with its top k (q3g_router): the experts the reference top-k picks from these
	 * logits, twice in a row */
	const int k = E >= 10 ? 10 : E / 2;
	std::vector<float> gl(got.begin(), got.begin() + (size_t)R * E), gs(gsg);
	int *di = dev_alloc<int>((size_t)R * (k + 1));
	float *dwt = dev_alloc<float>((size_t)R * (k + 1));
	uint16_t *xo = dev_alloc<uint16_t>((size_t)R * H);

	for (int rep = 0; rep < 2; rep++) {
		GT_CHECK(cudaMemset(di, 0xff, (size_t)R * (k + 1) * 4));
		GT_CHECK(cudaMemset(xo, 0xff, (size_t)R * H * 2));
		GT_OK(q3g_router(g_cublas, dl, ds, di, dwt, E, k, true, dh, dw, 1e-6f, &dr.m, &dg.m, R, H, xf, wt, xo, 0,
				 &e_));
		/* the experts' input: the normalized rows in fp16 (one rounding of the fp32 value: 1e-3) */
		std::vector<uint16_t> gx = dev_download(xo, (size_t)R * H);
		std::vector<float> gxf((size_t)R * H);

		for (size_t i = 0; i < gx.size(); i++)
			gxf[i] = q3_f16_to_f32(gx[i]);
		snprintf(n2, sizeof(n2), "%s: normalized rows in fp16, launch %d", name, rep + 1);
		gt_compare(n2, gxf.data(), xn.data(), xn.size(), 1e-3);
		std::vector<int> gi = dev_download(di, (size_t)R * (k + 1));
		std::vector<float> gw = dev_download(dwt, (size_t)R * (k + 1)), rw_all((size_t)R * (k + 1));
		std::vector<int> ridx(k);
		std::vector<float> rw(k);
		bool same = true;

		for (int r = 0; r < R; r++) {
			q3_ref_router_topk(&gl[(size_t)r * E], E, k, true, ridx.data(), rw.data());
			for (int j = 0; j < k; j++) {
				same &= gi[(size_t)r * (k + 1) + j] == ridx[j];
				rw_all[(size_t)r * (k + 1) + j] = rw[j];
			}
			same &= gi[(size_t)r * (k + 1) + k] == -1;
			rw_all[(size_t)r * (k + 1) + k] = q3_sigmoid(gs[r]);
		}
		snprintf(n2, sizeof(n2), "%s: top-%d, launch %d: the reference's experts", name, k, rep + 1);
		gt_expect(same, n2);
		snprintf(n2, sizeof(n2), "%s: top-%d, launch %d: weights", name, k, rep + 1);
		gt_compare(n2, gw.data(), rw_all.data(), gw.size(), 1e-5);
	}
	void *fr[] = { dh, dw, dl, ds, xf, wt, di, dwt, xo };
	for (void *p : fr)
		cudaFree(p);
	dmat_free(&dr);
	dmat_free(&dg);
}

/* The router's row 0 bit for bit the same at R = 1, 5, 16 (the SIMT kernel's variants of 1, 8
 * and 16 rows sum each row in the same order): see mmv_invariance_case. */
static void router_invariance_case(int E, int H)
{
	const char *name = "router logits fp32: row 0 the same at R = 1, 5, 16";
	struct tlin tr, tg;
	struct dmat dr, dg;
	const struct q3_linear *lr = &tr.l, *lg = &tg.l;
	std::vector<float> h0 = rnd_vec(H, 2.0f), w = rnd_vec(H, 0.2f), first;
	bool same = true;

	if (!want(name))
		return;
	make_linear(&tr, E, H, LIN_BF16);
	make_linear(&tg, 1, H, LIN_BF16);
	dmat_upload(&dr, &lr, 1);
	dmat_upload(&dg, &lg, 1);
	float *dw = dev_upload(w.data(), H);
	for (int R : { 1, 5, 16 }) {
		std::vector<float> h(h0), rest = rnd_vec((size_t)(R - 1) * H, 2.0f);

		h.insert(h.end(), rest.begin(), rest.end());
		float *dh = dev_upload(h.data(), h.size()), *dl = dev_alloc<float>((size_t)R * E), *ds = dev_alloc<float>(R);

		GT_OK(q3g_router_logits(g_cublas, dl, ds, dh, dw, 1e-6f, &dr.m, &dg.m, R, H, NULL, NULL, 0, &e_));
		std::vector<float> got = dev_download(dl, (size_t)E), gs = dev_download(ds, 1);

		got.push_back(gs[0]);
		if (first.empty())
			first = got;
		else
			same &= memcmp(first.data(), got.data(), got.size() * 4) == 0;
		cudaFree(dh);
		cudaFree(dl);
		cudaFree(ds);
	}
	gt_expect(same, name);
	cudaFree(dw);
	dmat_free(&dr);
	dmat_free(&dg);
}

/* step > 0: logits on a grid of that step, so that many tie (the lower id first): a few at the
 * k-th place (the candidates' ranking), or more than 32 at or above it (the rounds) */
static void router_case(int R, int E, int k, bool norm, float step = 0.0f)
{
	char name[128];

	snprintf(name, sizeof(name), "router_topk R=%d E=%d k=%d%s%s", R, E, k, norm ? "" : " (no renorm)",
		 step > 0.0f ? (step < 0.1f ? " fine ties" : " coarse ties") : "");
	if (!want(name))
		return;
	std::vector<float> lg = rnd_vec((size_t)R * E, 3.0f), sg = rnd_vec(R, 1.0f);

	if (step > 0.0f)
		for (float &x : lg)
			x = roundf(x / step) * step;
	std::vector<int> ridx((size_t)R * k);
	std::vector<float> rw((size_t)R * k), rw_all((size_t)R * (k + 1));
	float *dl = dev_upload(lg.data(), lg.size()), *ds = dev_upload(sg.data(), R), *dw = dev_alloc<float>((size_t)R * (k + 1));
	int *di = dev_alloc<int>((size_t)R * (k + 1));

	GT_OK(q3g_router_topk(di, dw, dl, ds, R, E, k, norm, 0, &e_));
	std::vector<int> gi = dev_download(di, (size_t)R * (k + 1));
	std::vector<float> gw = dev_download(dw, (size_t)R * (k + 1));
	bool same = true;

	for (int r = 0; r < R; r++) {
		q3_ref_router_topk(&lg[(size_t)r * E], E, k, norm, &ridx[(size_t)r * k], &rw[(size_t)r * k]);
		for (int j = 0; j < k; j++) {
			same &= gi[(size_t)r * (k + 1) + j] == ridx[(size_t)r * k + j];
			rw_all[(size_t)r * (k + 1) + j] = rw[(size_t)r * k + j];
		}
		same &= gi[(size_t)r * (k + 1) + k] == -1;
		rw_all[(size_t)r * (k + 1) + k] = q3_sigmoid(sg[r]);
	}
	char n2[200];

	snprintf(n2, sizeof(n2), "%s: the same experts in the same order", name);
	gt_expect(same, n2);
	snprintf(n2, sizeof(n2), "%s: weights", name);
	/* fp32 softmax: the sum in another order, __expf vs expf: 1e-5 */
	gt_compare(n2, gw.data(), rw_all.data(), gw.size(), 1e-5);
	cudaFree(dl);
	cudaFree(ds);
	cudaFree(dw);
	cudaFree(di);
}

/* A random MoE layer: router bf16, experts GPTQ (bits, group, asym, act-order), shared expert
 * 8-bit, shared gate bf16. */
struct tmoe {
	struct q3_config c;
	struct q3_layer L;
	std::vector<struct q3_expert> experts;
	std::vector<struct tlin> lins;
};

/* sbits: the shared expert's format, GPTQ 8 bits (g128, symmetric), 4 bits (g128, asym and act
 * as the routed ones') or 16 (bf16, as the 80b-a3b synthetic keeps it) */
static void make_moe(struct tmoe *m, const struct q3g_dims *d, int bits, int G, bool asym, bool act, int sbits = 8)
{
	int E = d->E;

	memset(&m->c, 0, sizeof(m->c));
	memset(&m->L, 0, sizeof(m->L));
	m->c.num_experts = E;
	m->c.top_k = d->topk;
	m->c.hidden_size = d->H;
	m->c.moe_inter = d->I;
	m->c.shared_inter = d->Is;
	m->c.norm_topk_prob = d->norm_topk;
	m->lins.resize(3 * E + 5);
	m->experts.resize(E);
	for (int x = 0; x < E; x++) {
		make_linear(&m->lins[3 * x], d->I, d->H, LIN_GPTQ, bits, G, asym, act);
		make_linear(&m->lins[3 * x + 1], d->I, d->H, LIN_GPTQ, bits, G, asym, act);
		make_linear(&m->lins[3 * x + 2], d->H, d->I, LIN_GPTQ, bits, G, asym, act);
	}
	for (int i = 0; i < 3; i++) {
		const int n = i < 2 ? d->Is : d->H, kk = i < 2 ? d->H : d->Is;

		if (sbits == 16)
			make_linear(&m->lins[3 * E + i], n, kk, LIN_BF16);
		else
			make_linear(&m->lins[3 * E + i], n, kk, LIN_GPTQ, sbits, 128, sbits == 4 && asym,
				    sbits == 4 && act);
	}
	make_linear(&m->lins[3 * E + 3], E, d->H, LIN_BF16);
	make_linear(&m->lins[3 * E + 4], 1, d->H, LIN_BF16);
	/* a router with a clear ranking: logits spread wide enough that the device's fp32 sums in
	 * another order cannot swap the k-th and (k+1)-th expert */
	for (size_t i = 0; i < m->lins[3 * E + 3].w.size() / 2; i++)
		((uint16_t *)m->lins[3 * E + 3].w.data())[i] = q3_f32_to_bf16(rnd_normal() * 4.0f / sqrtf((float)d->H));
	for (int x = 0; x < E; x++)
		m->experts[x] = (struct q3_expert){ m->lins[3 * x].l, m->lins[3 * x + 1].l, m->lins[3 * x + 2].l };
	m->L.experts = m->experts.data();
	m->L.shared = (struct q3_expert){ m->lins[3 * E].l, m->lins[3 * E + 1].l, m->lins[3 * E + 2].l };
	m->L.router = m->lins[3 * E + 3].l;
	m->L.shared_gate = m->lins[3 * E + 4].l;
}

/* A tmoe's experts on the device: the routed stacks and the shared expert. */
struct dmoe {
	struct dmat g, u, d, sg, su, sd;
};

/* engine: the engine's layout of act-order experts without offload (dmlp_upload) */
static void dmoe_upload(struct dmoe *dm, struct tmoe *m, int E, bool engine = false)
{
	dmlp_upload(&dm->g, &dm->u, &dm->d, m->experts.data(), E, engine);
	dmlp_upload(&dm->sg, &dm->su, &dm->sd, &m->L.shared, 1, engine);
}

static void dmoe_free(struct dmoe *dm)
{
	struct dmat *all[] = { &dm->g, &dm->u, &dm->d, &dm->sg, &dm->su, &dm->sd };
	for (struct dmat *p : all)
		dmat_free(p);
}

/* decode: the decode kernels (q3g_moe_up / q3g_moe_down), which the engine uses up to its decode
 * batch (max_batch, may pass 16 rows: moe_down then runs several row groups); else the prefill
 * GEMM. */
static void moe_case(const char *label, const struct q3g_dims *d, int bits, int G, bool asym, bool act, int R,
		     bool decode, int sbits = 8)
{
	char name[192], sf[32] = "";

	if (sbits != 8)
		snprintf(sf, sizeof(sf), ", shared expert %s", sbits == 16 ? "bf16" : "q4");
	snprintf(name, sizeof(name), "moe %s E=%d k=%d H=%d I=%d R=%d (%s%s)", label, d->E, d->topk, d->H, d->I, R,
		 decode ? "decode kernels" : "grouped prefill GEMM", sf);
	if (!want(name))
		return;
	struct tmoe m;
	const int E = d->E, H = d->H, k = d->topk, lda = q3g_moe_lda(d->I, d->Is);

	make_moe(&m, d, bits, G, asym, act, sbits);
	struct dmoe dm;
	struct dmat rt, sgt;
	const struct q3_linear *one;

	dmoe_upload(&dm, &m, E);
	one = &m.L.router, dmat_upload(&rt, &one, 1);
	one = &m.L.shared_gate, dmat_upload(&sgt, &one, 1);

	std::vector<uint16_t> xb;
	std::vector<float> xf, ref((size_t)R * H), scratch(q3_ref_moe_scratch(&m.c));

	rnd_f16(xb, xf, (size_t)R * H, 1.0f);
	for (int r = 0; r < R; r++)
		q3_ref_moe(&m.c, &m.L, &xf[(size_t)r * H], &ref[(size_t)r * H], scratch.data());
	uint16_t *dx = dev_upload(xb.data(), xb.size());
	float *dh = dev_alloc<float>((size_t)R * H), *dlog = dev_alloc<float>((size_t)R * E), *dsg = dev_alloc<float>(R);
	float *dw = dev_alloc<float>((size_t)R * (k + 1));
	uint16_t *dgu = dev_alloc<uint16_t>((size_t)R * (k + 1) * lda);
	int *di = dev_alloc<int>((size_t)R * (k + 1));

	GT_CHECK(cudaMemset(dh, 0, (size_t)R * H * 4));
	for (int r0 = 0; r0 < R; r0 += 16) {
		int nr = std::min(16, R - r0);
		struct q3g_job j[2] = { { rt.m, dx + (size_t)r0 * H, dlog + (size_t)r0 * E, H, E, Q3G_EPI_STORE },
					{ sgt.m, dx + (size_t)r0 * H, dsg + r0, H, 1, Q3G_EPI_STORE } };

		GT_OK(q3g_mmv(j, 2, nr, 0, &e_));
	}
	GT_OK(q3g_router_topk(di, dw, dlog, dsg, R, E, k, d->norm_topk, 0, &e_));
	if (decode) {
		GT_OK(q3g_moe_up(dgu, dx, di, &dm.g.m, &dm.u.m, &dm.sg.m, &dm.su.m, R, k, H, lda, 0, &e_));
		GT_OK(q3g_moe_down(dh, dgu, di, dw, &dm.d.m, &dm.sd.m, R, k, H, lda, 0, &e_));
	} else {
		void *ws = dev_alloc<char>(q3g_moe_prefill_scratch(R, d));

		GT_OK(q3g_moe_prefill(dh, dx, di, dw, &dm.g.m, &dm.u.m, &dm.d.m, &dm.sg.m, &dm.su.m, &dm.sd.m, R, d, ws, 0,
				      &e_));
		GT_CHECK(cudaDeviceSynchronize());
		cudaFree(ws);
	}
	/* the expert activations silu(gate)·up are rounded to fp16 before the down projection (the
	 * reference keeps fp32): about 2^-11 relative per input of down, ~3e-4 on the output; 2e-3 */
	gt_compare(name, dev_download(dh, ref.size()).data(), ref.data(), ref.size(), 2e-3);
	dmoe_free(&dm);
	dmat_free(&rt);
	dmat_free(&sgt);
	void *fr[] = { dx, dh, dlog, dsg, dw, dgu, di };
	for (void *p : fr)
		cudaFree(p);
}

/* The decode experts' output for row 0 bit for bit the same at R = 1, 7 and 16 (rows of a larger
 * batch share blocks: moe_up then computes an expert that several rows picked once for all of
 * them, their rows the mma's columns, and the shared expert 7 or 16 rows at once): routing given,
 * the same for row 0 every time; the last time every row picks row 0's experts (an expert's 16
 * pairs in four groups of four columns), and row 1 is row 0 again (its input and weights): its
 * pairs in the second column of row 0's groups, its output row 0's too. */
static void moe_invariance_case(const struct q3g_dims *d, bool act, int sbits = 8)
{
	char name[160];

	snprintf(name, sizeof(name), "moe decode%s H=%d I=%d%s: row 0 the same at R = 1, 7, 16, 16 alike (row 1 = row 0)",
		 act ? " act-order" : "", d->H, d->I, sbits == 16 ? ", shared expert bf16" : sbits == 4 ? ", shared expert q4" : "");
	if (!want(name))
		return;
	struct tmoe m;
	struct dmoe dm;
	const int E = d->E, H = d->H, k = d->topk, lda = q3g_moe_lda(d->I, d->Is);

	make_moe(&m, d, 4, 128, act, act, sbits);
	dmoe_upload(&dm, &m, E);
	std::vector<uint16_t> x0;
	std::vector<float> x0f, first;
	bool same = true;

	rnd_f16(x0, x0f, (size_t)H, 1.0f);
	for (int v : { 1, 7, 16, -16 }) {
		const int R = abs(v);
		std::vector<uint16_t> xb(x0), rest;
		std::vector<float> rf, w((size_t)R * (k + 1));
		std::vector<int> idx((size_t)R * (k + 1));

		rnd_f16(rest, rf, (size_t)(R - 1) * H, 1.0f);
		if (v < 0)
			std::copy(x0.begin(), x0.end(), rest.begin()); /* row 1 = row 0 */
		xb.insert(xb.end(), rest.begin(), rest.end());
		for (int r = 0; r < R; r++)
			for (int j = 0; j <= k; j++) { /* row 0: experts 3j mod E, weights 1/(j+1), every time */
				const bool r0 = r == 0 || (v < 0 && r == 1);

				idx[(size_t)r * (k + 1) + j] = j == k ? -1 : r0 || v < 0 ? (3 * j) % E : rnd_int(E);
				w[(size_t)r * (k + 1) + j] = r0 ? 1.0f / (j + 1) : rnd_uniform();
			}
		uint16_t *dx = dev_upload(xb.data(), xb.size());
		int *di = dev_upload(idx.data(), idx.size());
		float *dw = dev_upload(w.data(), w.size());
		uint16_t *dgu = dev_alloc<uint16_t>((size_t)R * (k + 1) * lda);
		float *dh = dev_alloc<float>((size_t)R * H);

		GT_CHECK(cudaMemset(dh, 0, (size_t)R * H * 4));
		GT_OK(q3g_moe_up(dgu, dx, di, &dm.g.m, &dm.u.m, &dm.sg.m, &dm.su.m, R, k, H, lda, 0, &e_));
		GT_OK(q3g_moe_down(dh, dgu, di, dw, &dm.d.m, &dm.sd.m, R, k, H, lda, 0, &e_));
		std::vector<float> got = dev_download(dh, (size_t)(v < 0 ? 2 : 1) * H);

		if (first.empty())
			first = got;
		else
			for (size_t r = 0; r < got.size() / H; r++)
				same &= memcmp(first.data(), got.data() + r * H, (size_t)H * 4) == 0;
		void *fr[] = { dx, di, dw, dgu, dh };
		for (void *p : fr)
			cudaFree(p);
	}
	gt_expect(same, name);
	dmoe_free(&dm);
}

/* The engine's layout of act-order experts (dmlp_upload's engine: down reads its inputs sorted,
 * gate's and up's rows stored in that order; up takes gate's permutation where theirs are one)
 * gives what each stack with its own permutation gives, bit for bit: the decode kernels (the row
 * staged as is and normalized while staging) and the prefill GEMM, routed and shared experts (the
 * shared one q4 g128 act-order, or bf16: sbits).  one: gate and up of each expert in one order, as
 * GPTQ makes them. */
static void moe_sorted_case(const char *label, const struct q3g_dims *d, int G, int R, bool decode, bool one,
			    int sbits = 4)
{
	char name[224];

	snprintf(name, sizeof(name), "moe %s H=%d I=%d R=%d (%s%s): the engine's layout = own permutations, bit for bit",
		 label, d->H, d->I, R, decode ? "decode kernels" : "grouped prefill GEMM",
		 one ? ", gate and up in one order" : "");
	if (!want(name))
		return;
	struct tmoe m;
	struct dmoe dg, de;
	const int E = d->E, H = d->H, k = d->topk, lda = q3g_moe_lda(d->I, d->Is);

	make_moe(&m, d, 4, G, true, true, sbits);
	for (int x = 0; x <= E && one; x++) /* up in gate's order (x = E: the shared expert) */
		tlin_same_order(&m.lins[3 * x + 1], &m.lins[3 * x]);
	dmoe_upload(&dg, &m, E);
	dmoe_upload(&de, &m, E, true);
	/* (a shared down of one group has no permutation to drop) */
	gt_expect(dg.d.m.perm && de.d.m.sorted && !de.d.m.perm && !dg.d.m.sorted && !de.sd.m.perm &&
			  (dg.sd.m.perm != NULL) == de.sd.m.sorted && dg.u.m.perm != dg.g.m.perm &&
			  (de.u.m.perm == de.g.m.perm) == one && de.u.m.sorted == one &&
			  de.u.m.perm_stride == de.g.m.perm_stride,
		  "moe engine layout: downs without their gather, up with gate's permutation where one");
	std::vector<uint16_t> xb;
	std::vector<float> xf, w((size_t)R * (k + 1)), hf = rnd_vec((size_t)R * H, 1.0f), nw = rnd_vec(H, 0.1f);
	std::vector<int> idx((size_t)R * (k + 1));

	rnd_f16(xb, xf, (size_t)R * H, 1.0f);
	for (int r = 0; r < R; r++) { /* k distinct experts, then the shared one */
		int *ir = &idx[(size_t)r * (k + 1)];

		for (int j = 0; j < k; j++) {
			do
				ir[j] = rnd_int(E);
			while (std::find(ir, ir + j, ir[j]) != ir + j);
			w[(size_t)r * (k + 1) + j] = rnd_uniform();
		}
		ir[k] = -1;
		w[(size_t)r * (k + 1) + k] = rnd_uniform();
	}
	uint16_t *dx = dev_upload(xb.data(), xb.size());
	float *dhf = dev_upload(hf.data(), hf.size()), *dnw = dev_upload(nw.data(), nw.size());
	int *di = dev_upload(idx.data(), idx.size());
	float *dw = dev_upload(w.data(), w.size());
	uint16_t *dgu = dev_alloc<uint16_t>((size_t)R * (k + 1) * lda);
	float *dh = dev_alloc<float>((size_t)R * H);
	void *ws = decode ? NULL : dev_alloc<char>(q3g_moe_prefill_scratch(R, d));
	std::vector<float> out[2][2];

	for (int v = 0; v < 2; v++) {
		struct dmoe *dm = v ? &de : &dg;

		for (int norm = 0; norm < 1 + decode; norm++) {
			GT_CHECK(cudaMemset(dh, 0, (size_t)R * H * 4));
			if (decode) {
				if (norm)
					GT_OK(q3g_moe_up_norm(dgu, dhf, dnw, 1e-6f, di, &dm->g.m, &dm->u.m, &dm->sg.m, &dm->su.m,
							      R, k, H, lda, 0, &e_));
				else
					GT_OK(q3g_moe_up(dgu, dx, di, &dm->g.m, &dm->u.m, &dm->sg.m, &dm->su.m, R, k, H, lda, 0,
							 &e_));
				GT_OK(q3g_moe_down(dh, dgu, di, dw, &dm->d.m, &dm->sd.m, R, k, H, lda, 0, &e_));
			} else {
				GT_OK(q3g_moe_prefill(dh, dx, di, dw, &dm->g.m, &dm->u.m, &dm->d.m, &dm->sg.m, &dm->su.m,
						      &dm->sd.m, R, d, ws, 0, &e_));
			}
			out[v][norm] = dev_download(dh, (size_t)R * H);
		}
	}
	bool same = true;

	for (int norm = 0; norm < 1 + decode; norm++)
		same &= memcmp(out[0][norm].data(), out[1][norm].data(), out[0][norm].size() * 4) == 0;
	gt_expect(same, name);
	dmoe_free(&dg);
	dmoe_free(&de);
	void *fr[] = { dx, dhf, dnw, di, dw, dgu, dh, ws };
	for (void *p : fr)
		cudaFree(p);
}

/* Pairs marked Q3G_SKIP (the CPU computes them under offload) leave the decode experts' output
 * exactly as the same routing with those pairs' weights at zero: bit for bit (a skipped item adds
 * nothing, a zero-weight item adds 0).  The shared expert's slot is skipped in odd rows (moe_up
 * computes it for several rows at once). */
static void moe_skip_case(const struct q3g_dims *d, int R)
{
	char name[160];

	snprintf(name, sizeof(name), "moe decode H=%d I=%d R=%d: Q3G_SKIP pairs the same as zero weights", d->H, d->I,
		 R);
	if (!want(name))
		return;
	struct tmoe m;
	struct dmoe dm;
	const int E = d->E, H = d->H, k = d->topk, S = k + 1, lda = q3g_moe_lda(d->I, d->Is);

	make_moe(&m, d, 4, 128, false, false);
	dmoe_upload(&dm, &m, E);
	std::vector<uint16_t> xb;
	std::vector<float> xf, w((size_t)R * S), wz;
	std::vector<int> idx((size_t)R * S), skip;

	rnd_f16(xb, xf, (size_t)R * H, 1.0f);
	for (int r = 0; r < R; r++)
		for (int j = 0; j < S; j++) {
			idx[(size_t)r * S + j] = j == k ? -1 : (5 * r + 3 * j) % E;
			w[(size_t)r * S + j] = 0.1f + 0.05f * j;
		}
	skip = idx;
	wz = w;
	for (int r = 0; r < R; r++)
		for (int j = 0; j <= k; j++) /* every third routed slot, a different third a row; odd rows' shared */
			if (j < k ? j % 3 == r % 3 : r % 2) {
				skip[(size_t)r * S + j] = Q3G_SKIP;
				wz[(size_t)r * S + j] = 0.0f;
			}
	uint16_t *dx = dev_upload(xb.data(), xb.size());
	int *di = dev_upload(skip.data(), skip.size()), *dz = dev_upload(idx.data(), idx.size());
	float *dw = dev_upload(w.data(), w.size()), *dwz = dev_upload(wz.data(), wz.size());
	uint16_t *gu = dev_alloc<uint16_t>((size_t)R * S * lda);
	float *h1 = dev_alloc<float>((size_t)R * H);
	float *h2 = dev_alloc<float>((size_t)R * H);

	GT_CHECK(cudaMemset(h1, 0, (size_t)R * H * 4));
	GT_CHECK(cudaMemset(h2, 0, (size_t)R * H * 4));
	GT_OK(q3g_moe_up(gu, dx, di, &dm.g.m, &dm.u.m, &dm.sg.m, &dm.su.m, R, k, H, lda, 0, &e_));
	GT_OK(q3g_moe_down(h1, gu, di, dw, &dm.d.m, &dm.sd.m, R, k, H, lda, 0, &e_));
	GT_OK(q3g_moe_up(gu, dx, dz, &dm.g.m, &dm.u.m, &dm.sg.m, &dm.su.m, R, k, H, lda, 0, &e_));
	GT_OK(q3g_moe_down(h2, gu, dz, dwz, &dm.d.m, &dm.sd.m, R, k, H, lda, 0, &e_));
	std::vector<float> a = dev_download(h1, (size_t)R * H), b = dev_download(h2, (size_t)R * H);

	gt_expect(memcmp(a.data(), b.data(), (size_t)R * H * 4) == 0, name);
	void *fr[] = { dx, di, dz, dw, dwz, gu, h1, h2 };
	for (void *p : fr)
		cudaFree(p);
	dmoe_free(&dm);
}

/* q3g_moe_up_norm (the norm folded into the staging: every routed block stages its row, the
 * shared expert's blocks up to 16 rows) gives the bits of q3g_add_rmsnorm's fp16 rows through
 * q3g_moe_up, for every pair. */
static void moe_up_norm_case(const struct q3g_dims *d, int R, int sbits, bool act)
{
	char name[160];

	snprintf(name, sizeof(name), "moe up H=%d I=%d R=%d%s%s: the norm folded in = q3g_add_rmsnorm's rows", d->H,
		 d->I, R, sbits == 16 ? ", shared expert bf16" : "", act ? ", act-order" : "");
	if (!want(name))
		return;
	struct tmoe m;
	struct dmoe dm;
	const int E = d->E, H = d->H, k = d->topk, S = k + 1, lda = q3g_moe_lda(d->I, d->Is);

	make_moe(&m, d, 4, 128, act, act, sbits);
	dmoe_upload(&dm, &m, E);
	std::vector<float> h((size_t)R * H), nw(H);
	std::vector<int> idx((size_t)R * S);

	for (auto &v : h)
		v = rnd_normal() * 3.0f;
	for (auto &v : nw)
		v = 0.2f * rnd_normal();
	for (int r = 0; r < R; r++)
		for (int j = 0; j < S; j++)
			idx[(size_t)r * S + j] = j == k ? -1 : (7 * r + 3 * j) % E;
	float *dh = dev_upload(h.data(), h.size()), *dnw = dev_upload(nw.data(), nw.size());
	int *di = dev_upload(idx.data(), idx.size());
	uint16_t *xb = dev_alloc<uint16_t>((size_t)R * H);
	uint16_t *a1 = dev_alloc<uint16_t>((size_t)R * S * lda), *a2 = dev_alloc<uint16_t>((size_t)R * S * lda);

	GT_CHECK(cudaMemset(a1, 0, (size_t)R * S * lda * 2));
	GT_CHECK(cudaMemset(a2, 0, (size_t)R * S * lda * 2));
	GT_OK(q3g_add_rmsnorm(dh, NULL, xb, dnw, NULL, R, H, 1e-6f, 0, &e_));
	GT_OK(q3g_moe_up(a1, xb, di, &dm.g.m, &dm.u.m, &dm.sg.m, &dm.su.m, R, k, H, lda, 0, &e_));
	GT_OK(q3g_moe_up_norm(a2, dh, dnw, 1e-6f, di, &dm.g.m, &dm.u.m, &dm.sg.m, &dm.su.m, R, k, H, lda, 0, &e_));
	std::vector<uint16_t> x = dev_download(a1, (size_t)R * S * lda), y = dev_download(a2, (size_t)R * S * lda);
	bool any = false;

	for (uint16_t v : x)
		any |= v != 0;
	gt_expect(any && x == y, name);
	void *fr[] = { dh, dnw, di, xb, a1, a2 };
	for (void *p : fr)
		cudaFree(p);
	dmoe_free(&dm);
}

/* q3g_moe_host: a row's first G routed experts without a VRAM slot, read from mapped pinned host
 * memory in the raw GPTQ layout, their weighted sum stored into out; against the reference experts (q3_ref_linear,
 * fp32) over the same picks.  `shift`: expert x's qweights start 4 · (x % 4) bytes past a 16-byte
 * boundary (safetensors packs tensors unpadded; the kernels then shift their column tiles);
 * bits_dn != bits: down stored with other bits than gate and up. */
static void moe_host_case(const struct q3g_dims *d, int bits, int bits_dn, int Gs, bool asym, int R, int G, int keep,
			  bool shift)
{
	char name[192];

	snprintf(name, sizeof(name), "moe host experts q%d/q%d g%d%s H=%d I=%d R=%d G=%d keep %d%s", bits, bits_dn, Gs,
		 asym ? " asym" : "", d->H, d->I, R, G, keep, shift ? " (qweights 0-12 bytes off alignment)" : "");
	if (!want(name))
		return;
	struct tmoe m;
	const int E = d->E, H = d->H, I = d->I, k = d->topk, S = k + 1;

	make_moe(&m, d, bits, Gs, asym, false);
	if (bits_dn != bits)
		for (int x = 0; x < E; x++) {
			make_linear(&m.lins[3 * x + 2], H, I, LIN_GPTQ, bits_dn, Gs, asym, false);
			m.experts[x].down = m.lins[3 * x + 2].l;
		}
	struct hx_host hb;

	hx_host_make(&hb, m.experts.data(), E, shift ? 4 : 0, false);
	struct q3g_hfmt f;
	const struct q3_linear *f0[2] = { &m.experts[0].gate, &m.experts[0].down };

	memset(&f, 0, sizeof(f));
	for (int i = 0; i < 2; i++) {
		f.bits[i] = f0[i]->bits;
		f.group[i] = f0[i]->group_size;
		f.zero_off[i] = f0[i]->zero_offset;
		f.bf16[i] = false;
	}
	/* about 60% of the experts without a slot, as with a 20 GiB budget; k distinct experts a row,
	 * the shared expert's -1 last */
	std::vector<int16_t> slot(E);
	std::vector<int> idx((size_t)R * S);
	std::vector<float> w((size_t)R * S);
	for (int x = 0; x < E; x++)
		slot[x] = rnd_uniform() < 0.2f ? -1 : (int16_t)x;
	for (int r = 0; r < R; r++) {
		std::vector<int> perm(E);
		for (int x = 0; x < E; x++)
			perm[x] = x;
		for (int j = 0; j < k; j++) {
			std::swap(perm[j], perm[j + rnd_int(E - j)]);
			idx[(size_t)r * S + j] = perm[j];
			w[(size_t)r * S + j] = 0.05f + 0.1f * fabsf(rnd_uniform());
		}
		idx[(size_t)r * S + k] = -1;
		w[(size_t)r * S + k] = 0.5f;
	}
	if (R > 1) /* the last row: every expert resident, no picks (out: zeros) */
		for (int j = 0; j < k; j++)
			slot[idx[(size_t)(R - 1) * S + j]] = 0;
	std::vector<uint16_t> xb;
	std::vector<float> xf, ref((size_t)R * H, 0.0f);
	std::vector<float> g(I), u(I), y(H);
	int picked = 0;

	rnd_f16(xb, xf, (size_t)R * H, 1.0f);
	for (int r = 0; r < R; r++) {
		int miss = 0; /* the picks: the last min(G, miss - keep) of the row's missing experts */

		for (int j = 0; j < k; j++)
			miss += slot[idx[(size_t)r * S + j]] < 0;
		int npick = std::min(G, std::max(0, miss - keep));

		for (int j = 0, rank = 0; j < k; j++) {
			int x = idx[(size_t)r * S + j];

			if (slot[x] >= 0 || rank++ < miss - npick)
				continue;
			picked++;
			q3_ref_linear(&m.experts[x].gate, &xf[(size_t)r * H], 1, g.data());
			q3_ref_linear(&m.experts[x].up, &xf[(size_t)r * H], 1, u.data());
			q3_ref_swiglu(g.data(), g.data(), u.data(), I);
			q3_ref_linear(&m.experts[x].down, g.data(), 1, y.data());
			for (int c = 0; c < H; c++)
				ref[(size_t)r * H + c] += w[(size_t)r * S + j] * y[c];
		}
	}
	uint16_t *dx = dev_upload(xb.data(), xb.size());
	int *di = dev_upload(idx.data(), idx.size());
	int16_t *ds = dev_upload(slot.data(), slot.size());
	/* out starts as garbage: every element is stored, rows without picks as zeros */
	std::vector<float> junk((size_t)R * H, 12345.0f);
	float *dw = dev_upload(w.data(), w.size()), *dh = dev_upload(junk.data(), junk.size());
	float *ws = dev_alloc<float>(q3g_moe_host_scratch(R, G, H, I));
	struct q3g_hexpert *dtab = dev_upload(hb.tab.data(), hb.tab.size());

	GT_OK(q3g_moe_host(dh, ws, dx, di, dw, S, k, ds, dtab, &f, G, keep, NULL, R, H, I, 0, &e_));
	std::vector<float> got = dev_download(dh, (size_t)R * H);
	/* fp32 throughout, as the reference, in another summation order */
	snprintf(name + strlen(name), sizeof(name) - strlen(name), ", %d experts", picked);
	gt_compare(name, got.data(), ref.data(), ref.size(), 1e-5);
	/* and the same bits on a second run (no atomics) */
	GT_CHECK(cudaMemcpy(dh, junk.data(), junk.size() * 4, cudaMemcpyHostToDevice));
	GT_OK(q3g_moe_host(dh, ws, dx, di, dw, S, k, ds, dtab, &f, G, keep, NULL, R, H, I, 0, &e_));
	gt_expect(dev_download(dh, (size_t)R * H) == got, "moe host experts: the same bits on a second run");
	void *fr[] = { dx, di, ds, dw, dh, ws, dtab };
	for (void *p : fr)
		cudaFree(p);
	hx_host_free(&hb);
}

static void moe_tests(void)
{
	struct q3g_dims ds = dims_small(), dr = dims_real();

	router_logits_case(1, 512, 2048);
	router_logits_case(16, 512, 2048);
	router_logits_case(3, 16, 256);
	router_logits_case(9, 512, 2048);
	router_logits_case(5, 40, 200); /* a partial last k-step, a slice of 8 inputs */
	router_logits_case(40, 512, 2048);
	router_invariance_case(512, 2048);
	router_case(7, 512, 10, true);
	router_case(3, 16, 4, false);
	router_case(33, 1000, 32, true);
	router_case(16, 512, 10, true, 1.0f / 64);
	router_case(16, 512, 10, true, 0.5f);
	router_case(5, 61, 8, false, 0.25f);
	moe_case("q4 sym g128", &ds, 4, 128, false, false, 3, true);
	moe_case("q4 asym act-order g32", &ds, 4, 32, true, true, 5, true);
	moe_case("q4 sym g128", &ds, 4, 128, false, false, 40, false);
	moe_case("q4 asym act-order g32", &ds, 4, 32, true, true, 150, false);
	moe_case("q4 asym act-order g32, two row groups", &ds, 4, 32, true, true, 24, true);
	{ /* five row tiles a routed matrix (moe_up's blocks take two: the last block's second is past
	   * the end), a bf16 shared expert of three (its own block count; bf16, for a GPTQ one's
	   * groups of 128 would not divide its 48 inputs), k-chunks of the down projections partial
	   * (80 and 48 inputs); one row runs the small-grid instance */
		struct q3g_dims dodd = ds;

		dodd.I = 80;
		dodd.Is = 48;
		moe_case("q4 asym g16, odd row tiles", &dodd, 4, 16, true, false, 1, true, 16);
		moe_case("q4 asym g16, odd row tiles", &dodd, 4, 16, true, false, 16, true, 16);
		moe_sorted_case("q4 asym act-order g16, odd row tiles", &dodd, 16, 5, true, false, 16);
		moe_sorted_case("q4 asym act-order g16, odd row tiles", &dodd, 16, 30, false, true, 16);
	}
	moe_sorted_case("q4 asym act-order g32", &ds, 32, 24, true, false);
	moe_sorted_case("q4 asym act-order g32", &ds, 32, 24, true, true);
	dr.E = 32; /* the real expert shapes; fewer of them keeps the CPU reference quick */
	moe_case("real shapes q4 sym g128", &dr, 4, 128, false, false, 2, true);
	moe_case("real shapes q4 sym g128", &dr, 4, 128, false, false, 16, true);
	moe_case("real shapes q4 asym act-order g128", &dr, 4, 128, true, true, 16, true);
	moe_case("real shapes q4 sym g128", &dr, 4, 128, false, false, 20, false);
	moe_invariance_case(&dr, false);
	moe_invariance_case(&dr, true);
	moe_invariance_case(&dr, false, 16);
	moe_invariance_case(&dr, false, 4);
	moe_case("real shapes q4 sym g128", &dr, 4, 128, false, false, 16, true, 16);
	moe_case("real shapes q4 sym g128", &dr, 4, 128, false, false, 16, true, 4);
	moe_case("real shapes q4 sym g128", &dr, 4, 128, false, false, 1, true, 16);
	moe_case("real shapes q4 asym act-order g128", &dr, 4, 128, true, true, 16, true, 4);
	moe_skip_case(&dr, 5);
	moe_sorted_case("real shapes q4 asym act-order g128", &dr, 128, 16, true, false);
	moe_sorted_case("real shapes q4 asym act-order g128", &dr, 128, 16, true, true);
	moe_sorted_case("real shapes q4 asym act-order g128", &dr, 128, 1, true, true);
	moe_sorted_case("real shapes q4 asym act-order g128", &dr, 128, 3, true, true);
	moe_sorted_case("real shapes q4 asym act-order g128", &dr, 128, 40, false, true);
	moe_up_norm_case(&dr, 16, 16, false);
	moe_up_norm_case(&dr, 3, 8, true);
	moe_case("q8 sym g64", &ds, 8, 64, false, false, 4, true);
	moe_case("real shapes q8 asym act-order g128", &dr, 8, 128, true, true, 16, true);
	/* the decode kernels again with q3g_moe_down's kernel for devices before sm_90 */
	q3g_moe_down_force_regs = true;
	moe_case("q4 asym act-order g32, down before sm_90", &ds, 4, 32, true, true, 5, true);
	moe_case("q4 asym act-order g32, two row groups, down before sm_90", &ds, 4, 32, true, true, 24, true);
	moe_case("real shapes q4 asym act-order g128, down before sm_90", &dr, 4, 128, true, true, 16, true);
	moe_skip_case(&dr, 7);
	moe_sorted_case("real shapes q4 asym act-order g128, down before sm_90", &dr, 128, 16, true, true);
	q3g_moe_down_force_regs = false;
	moe_host_case(&ds, 4, 4, 128, false, 1, 2, 0, false);
	moe_host_case(&ds, 4, 4, 32, true, 3, 3, 1, true);
	moe_host_case(&ds, 8, 4, 64, true, 2, 2, 0, false);
	moe_host_case(&ds, 4, 8, 128, false, 2, 4, 0, true);
	moe_host_case(&dr, 4, 4, 128, false, 1, 2, 0, false);
	moe_host_case(&dr, 4, 4, 128, true, 1, 8, 0, false);
	moe_host_case(&dr, 4, 4, 128, false, 4, 1, 2, false);
	moe_host_case(&dr, 8, 8, 128, false, 1, 1, 2, true);
}

/* ---- sampling ------------------------------------------------------------------------------ */

/* sampler.h's rules restated (the C reference sampler lives on the server branch): candidates,
 * top_k, top_p, min_p in the order (z desc, id asc), the draw in ascending id order. */
static int ref_sample(const float *logits, int V, const struct q3g_sampling *p)
{
	struct cand {
		float z;
		int id;
	};
	std::vector<cand> c;
	float zmax = -INFINITY;

	if (p->temperature <= 0.0f || p->top_k == 1) {
		int best = -1;
		float bv = -INFINITY;

		for (int i = 0; i < V; i++)
			if (logits[i] > bv) {
				bv = logits[i];
				best = i;
			}
		return best;
	}
	for (int i = 0; i < V; i++) {
		float z = logits[i] / p->temperature;

		if (!(z > -INFINITY))
			continue;
		c.push_back({ z, i });
		zmax = std::max(zmax, z);
	}
	if (c.empty())
		return -1;
	if (isinf(zmax)) {
		for (cand &x : c)
			x.z = isinf(x.z) ? 0.0f : -INFINITY;
		zmax = 0.0f;
	}
	std::sort(c.begin(), c.end(), [](const cand &a, const cand &b) { return a.z > b.z || (a.z == b.z && a.id < b.id); });
	size_t n = c.size();
	if (p->top_k > 0 && (size_t)p->top_k < n)
		n = p->top_k;
	if (p->top_p < 1.0f) {
		double total = 0, cum = 0;
		size_t m = n;

		for (size_t i = 0; i < n; i++)
			total += expf(c[i].z - zmax);
		for (size_t i = 0; i < n; i++) {
			cum += expf(c[i].z - zmax);
			if (cum >= p->top_p * total) {
				m = i + 1;
				break;
			}
		}
		n = m;
	}
	c.resize(n);
	if (p->min_p > 0.0f) {
		std::vector<cand> k2;
		for (const cand &x : c)
			if (expf(x.z - zmax) >= p->min_p)
				k2.push_back(x);
		c = k2;
	}
	std::sort(c.begin(), c.end(), [](const cand &a, const cand &b) { return a.id < b.id; });
	double total = 0, cum = 0;
	for (const cand &x : c)
		total += expf(x.z - zmax);
	uint64_t z = p->seed + (p->step + 1) * 0x9E3779B97F4A7C15ull;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	z ^= z >> 31;
	double r = (double)(z >> 11) * 0x1.0p-53 * total;
	for (const cand &x : c) {
		cum += expf(x.z - zmax);
		if (cum > r)
			return x.id;
	}
	return c.back().id;
}

static void sample_case(const char *label, int V, int R, struct q3g_sampling base, bool specials)
{
	char name[160];

	snprintf(name, sizeof(name), "sample %s V=%d R=%d", label, V, R);
	if (!want(name))
		return;
	std::vector<float> lg = rnd_vec((size_t)R * V, 2.0f);
	std::vector<struct q3g_sampling> ps(R);
	std::vector<int> ref(R);

	for (int r = 0; r < R; r++) {
		ps[r] = base;
		ps[r].seed = rnd_u64();
		ps[r].step = (uint64_t)rnd_int(1000);
		if (specials) { /* ties, -inf, NaN, and a row of +inf */
			float *l = &lg[(size_t)r * V];

			for (int i = 0; i < V / 10; i++)
				l[rnd_int(V)] = -INFINITY;
			for (int i = 0; i < 3; i++)
				l[rnd_int(V)] = NAN;
			l[5] = l[9] = 8.0f;
			if (r == 1)
				l[rnd_int(V)] = l[rnd_int(V)] = INFINITY;
			if (r == 2)
				for (int i = 0; i < V; i++)
					l[i] = i % 2 ? -INFINITY : NAN;
		}
		ref[r] = ref_sample(&lg[(size_t)r * V], V, &ps[r]);
	}
	float *dl = dev_upload(lg.data(), lg.size());
	struct q3g_sampling *dp = dev_upload(ps.data(), R);
	int32_t *dout = dev_alloc<int32_t>(R);

	char *ws = dev_alloc<char>(q3g_sample_scratch(R));

	GT_OK(q3g_sample(dout, dl, dp, R, V, ws, 0, &e_));
	std::vector<int32_t> got = dev_download(dout, R);
	int same = 0;

	cudaFree(ws);
	for (int r = 0; r < R; r++)
		same += got[r] == ref[r];
	char n2[200];

	/* the same rules on the same numbers: every id equal (sums in another order could only
	 * matter at an exact top_p or draw boundary, which random inputs do not hit) */
	snprintf(n2, sizeof(n2), "%s: %d of %d ids as the reference", name, same, R);
	gt_expect(same == R, n2);
	cudaFree(dl);
	cudaFree(dp);
	cudaFree(dout);
}

/* The decode path's draw (cuda_backend.cu): q3g_logits_adjust with a sampler's plan
 * (q3_sampler_plan: bias entries, then penalties), then q3g_sample with its parameters, against
 * the host sampler (sampler.c) on the same logits: the adjusted logits bit for bit, every id. */
static void sample_plan_case(const char *label, int V, int R, float temperature, int top_k, float top_p)
{
	char name[160];

	snprintf(name, sizeof(name), "sample %s with bias and penalties (q3_sampler_plan) V=%d R=%d", label, V, R);
	if (!want(name))
		return;
	std::vector<float> lg = rnd_vec((size_t)R * V, 2.0f), host = lg;
	std::vector<struct q3_logit_adj> adj((size_t)R * 64);
	std::vector<struct q3g_adjust_row> rows(R);
	std::vector<struct q3g_sampling> ps(R);
	std::vector<int> ref(R);
	struct q3_logit_bias bias[6];
	q3_err e;

	struct q3g_adj *dadj = dev_alloc<struct q3g_adj>(adj.size());
	for (int r = 0; r < R; r++) {
		struct q3_sampler hs, ds;
		struct q3_sampling p;
		struct q3_sample_row row;

		q3_sampling_default(&p);
		p.temperature = temperature;
		p.top_k = top_k;
		p.top_p = top_p;
		p.presence_penalty = r % 2 ? 0.4f : 0.0f;
		p.frequency_penalty = 0.3f;
		p.seed = rnd_u64();
		for (int i = 0; i < 6; i++) /* ids under 200, where the generated ones are: some in both */
			bias[i] = (struct q3_logit_bias){ i == 5 ? -4 : 40 * i + rnd_int(40), 3.0f * rnd_uniform() };
		p.bias = bias;
		p.nbias = 6;
		GT_OK(q3_sampler_init(&hs, V, &e));
		GT_OK(q3_sampler_init(&ds, V, &e));
		q3_sampler_reset(&hs, &p);
		q3_sampler_reset(&ds, &p);
		for (int i = 0; i < 30; i++) {
			int32_t t = rnd_int(200);

			q3_sampler_accept(&hs, t);
			q3_sampler_accept(&ds, t);
		}
		hs.step = ds.step = (uint64_t)rnd_int(1000);
		GT_OK(q3_sampler_plan(&ds, &row, &adj[(size_t)r * 64], 64));
		ps[r] = (struct q3g_sampling){ row.temperature, row.top_p, row.top_k, row.min_p, row.seed, row.step };
		rows[r] = (struct q3g_adjust_row){ dadj + (size_t)r * 64, row.nbias, row.npen };
		ref[r] = q3_sampler_sample(&hs, &host[(size_t)r * V]);
		q3_sampler_free(&hs);
		q3_sampler_free(&ds);
	}
	GT_CHECK(cudaMemcpy(dadj, adj.data(), adj.size() * sizeof(adj[0]), cudaMemcpyHostToDevice));
	float *dl = dev_upload(lg.data(), lg.size());
	struct q3g_sampling *dp = dev_upload(ps.data(), R);
	struct q3g_adjust_row *drows = dev_upload(rows.data(), R);
	int32_t *dout = dev_alloc<int32_t>(R);

	char *ws = dev_alloc<char>(q3g_sample_scratch(R));

	GT_OK(q3g_logits_adjust(dl, V, drows, R, 0, &e_));
	GT_OK(q3g_sample(dout, dl, dp, R, V, ws, 0, &e_));
	cudaFree(ws);
	std::vector<int32_t> got = dev_download(dout, R);
	std::vector<float> adjusted = dev_download(dl, lg.size());
	int same = 0;
	char n2[240];

	snprintf(n2, sizeof(n2), "%s: the adjusted logits as the host sampler's, bit for bit", name);
	gt_expect(!memcmp(adjusted.data(), host.data(), host.size() * 4), n2);
	for (int r = 0; r < R; r++)
		same += got[r] == ref[r];
	snprintf(n2, sizeof(n2), "%s: %d of %d ids as q3_sampler_sample", name, same, R);
	gt_expect(same == R, n2);
	cudaFree(dl);
	cudaFree(dp);
	cudaFree(drows);
	cudaFree(dadj);
	cudaFree(dout);
}

static void sample_tests(void)
{
	struct q3g_sampling p;

	memset(&p, 0, sizeof(p));
	p.top_p = 1.0f;
	sample_case("greedy", 151936, 4, p, false);
	sample_case("greedy (specials)", 1000, 4, p, true);
	p.temperature = 0.8f;
	sample_case("temperature 0.8", 151936, 8, p, false);
	p.top_k = 40;
	sample_case("top_k 40", 151936, 8, p, false);
	p.top_p = 0.9f;
	sample_case("top_k 40 top_p 0.9", 151936, 8, p, false);
	p.top_k = 0;
	sample_case("top_p 0.5", 151936, 8, p, false);
	p.min_p = 0.05f;
	sample_case("top_p 0.5 min_p 0.05", 151936, 8, p, false);
	p.top_p = 1.0f;
	p.temperature = 1.3f;
	sample_case("min_p 0.05 (specials)", 1000, 6, p, true);
	p.top_k = 7;
	p.top_p = 0.7f;
	sample_case("top_k 7 top_p 0.7 min_p (specials)", 1000, 6, p, true);
	sample_plan_case("greedy", 151936, 4, 0.0f, 0, 1.0f);
	sample_plan_case("temperature 0.9 top_p 0.9", 151936, 8, 0.9f, 0, 0.9f);
	sample_plan_case("temperature 1.2 top_k 50", 1000, 8, 1.2f, 50, 1.0f);
}

int main(int argc, char **argv)
{
	g_filter = argc > 1 ? argv[1] : NULL;
	setvbuf(stdout, NULL, _IOLBF, 0); /* a case that hangs leaves the ones before it in a log */
	gt_need_device();
	gt_seed();
	GT_OK(q3g_init(&e_));
	if (cublasCreate(&g_cublas) != CUBLAS_STATUS_SUCCESS) {
		fprintf(stderr, "cublasCreate failed\n");
		return 1;
	}
	GT_CHECK(cudaMalloc(&g_wtmp, (size_t)2048 * 4096 * 2));
	linear_tests();
	norm_tests();
	gdn_tests();
	attn_tests();
	moe_tests();
	sample_tests();
	GT_CHECK(cudaDeviceSynchronize());
	return gt_finish("test_ops");
}
