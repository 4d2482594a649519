/* bench_kernels.cu - kernel timings against the measured copy bandwidth: the int4 matvec at the
 * model's dense shapes, the decode MoE (10 routed + 1 shared experts), the bf16 lm_head, decode
 * attention and the delta rule.  Weights are random and rotated through enough copies (or
 * experts) that each timed call reads from memory, not from L2; each case is a CUDA graph of
 * REPS launches replayed, timed with events, the median of several replays.
 *
 *   bench_kernels [--csv F]      one line per case: us per call, GB/s, % of the copy bandwidth
 *   bench_kernels --gdn [R]      only the GDN decode layer at batch R, default 1 (under a profiler)
 *   bench_kernels --dense bf16   the GDN layer's dense projections and shared expert in bf16 (as the
 *                                80b-a3b synthetic keeps them), not GPTQ int4
 *   bench_kernels --act-order    the GDN layer's experts (and GPTQ shared expert) with act-order, as
 *                                mkmodel --act-order makes them, stored as the engine stores them
 *                                (down's inputs sorted, no gather)
 *   bench_kernels --host         only the experts read from host memory over PCIe (q3g_moe_host)
 *   bench_kernels --linear       only the dense Linears (the matvec), each beside a copy of its traffic
 */
#include <sys/mman.h>
#include <time.h>

#include <algorithm>

#include "gpu_test.h"

#define REPS 20
#define ROUNDS 7

static FILE *g_csv;
static enum lin_kind g_dense = LIN_GPTQ; /* the GDN layer's qkvz, out_proj and shared expert */
static bool g_actorder; /* the GDN layer's experts with act-order (mkmodel --act-order: a shuffled g_idx) */
static double g_peak, g_h2d;

static float time_graph(cudaGraphExec_t ex, cudaStream_t st)
{
	cudaEvent_t a, b;
	float ms[ROUNDS];

	GT_CHECK(cudaEventCreate(&a));
	GT_CHECK(cudaEventCreate(&b));
	GT_CHECK(cudaGraphLaunch(ex, st)); /* warm up */
	GT_CHECK(cudaStreamSynchronize(st));
	for (int i = 0; i < ROUNDS; i++) {
		GT_CHECK(cudaEventRecord(a, st));
		GT_CHECK(cudaGraphLaunch(ex, st));
		GT_CHECK(cudaEventRecord(b, st));
		GT_CHECK(cudaEventSynchronize(b));
		GT_CHECK(cudaEventElapsedTime(&ms[i], a, b));
	}
	std::sort(ms, ms + ROUNDS);
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	return ms[ROUNDS / 2] / REPS; /* ms per call */
}

static void report(const char *what, float ms, double bytes)
{
	double gbs = bytes / (ms * 1e-3) / 1e9;

	printf("%-52s %9.2f us  %7.0f GB/s  %5.1f%% of copy\n", what, ms * 1e3, gbs, 100 * gbs / g_peak);
	if (g_csv)
		fprintf(g_csv, "%s,%.3f,%.1f,%.1f\n", what, ms * 1e3, gbs, 100 * gbs / g_peak);
}

/* The same traffic as a kernel reading `bytes`, as copies do it: REPS device-to-device copies of
 * bytes / 2 (read + written) in a graph, each from and to its own place in 1 GiB so that none comes
 * from L2.  A launch of a few MB pays the same fixed costs as the kernel (the launch, the first
 * loads' latency, the tail), which the 1 GiB copy that sets the peak does not: the kernel's time
 * against this one says how far it is from what memory allows a launch of its size. */
static float copy_same_ms(double bytes, cudaStream_t st)
{
	const size_t half = ((size_t)(bytes / 2) + 255) & ~(size_t)255, pool = (size_t)512 << 20;
	const int slots = (int)std::max((size_t)1, pool / half);
	char *src = dev_alloc<char>(pool + half), *dst = dev_alloc<char>(pool + half);
	cudaGraph_t g;
	cudaGraphExec_t ex;

	GT_CHECK(cudaMemset(src, 1, pool + half));
	GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
	for (int i = 0; i < REPS; i++) {
		size_t off = (size_t)(i % slots) * half;

		GT_CHECK(cudaMemcpyAsync(dst + off, src + off, half, cudaMemcpyDeviceToDevice, st));
	}
	GT_CHECK(cudaStreamEndCapture(st, &g));
	GT_CHECK(cudaGraphInstantiate(&ex, g, 0));
	float ms = time_graph(ex, st);

	cudaGraphExecDestroy(ex);
	cudaGraphDestroy(g);
	cudaFree(src);
	cudaFree(dst);
	return ms;
}

/* report, then the same traffic copied (copy_same_ms) beside it */
static void report_vs_copy(const char *what, float ms, double bytes, cudaStream_t st)
{
	float cms = copy_same_ms(bytes, st);

	report(what, ms, bytes);
	printf("%-52s %9.2f us  %7.0f GB/s  the kernel at %5.1f%% of it\n", "  the same traffic copied", cms * 1e3,
	       bytes / (cms * 1e-3) / 1e9, 100.0 * cms / ms);
	if (g_csv)
		fprintf(g_csv, "%s (same traffic copied),%.3f,%.1f,%.1f\n", what, cms * 1e3, bytes / (cms * 1e-3) / 1e9,
			100.0 * cms / ms);
}

/* A stack of `copies` identical-shape Linears (random GPTQ or bf16). */
static void make_stack(struct dmat *d, std::vector<struct tlin> &ls, int copies, int N, int K, enum lin_kind kind)
{
	std::vector<const struct q3_linear *> p(copies);

	ls.resize(copies);
	for (int i = 0; i < copies; i++) {
		/* one random matrix, repeated: uploads stay quick, bytes are distinct in memory */
		if (i == 0)
			make_linear(&ls[0], N, K, kind, 4, 128, false, false);
		p[i] = &ls[0].l;
	}
	dmat_upload(d, p.data(), copies);
}

/* An MLP's stacks of `copies` experts (one random expert repeated, as make_stack) as the engine
 * stores them (dmlp_upload).  Act-order: gate and up in one order, as GPTQ leaves Linears that
 * share an input. */
static void make_mlp(struct dmat *g, struct dmat *u, struct dmat *d, std::vector<struct tlin> *te, int copies, int I,
		     int H, enum lin_kind kind, bool actorder)
{
	for (int w = 0; w < 3; w++) {
		te[w].resize(1);
		make_linear(&te[w][0], w < 2 ? I : H, w < 2 ? H : I, kind, 4, 128, false, actorder);
	}
	tlin_same_order(&te[1][0], &te[0][0]);
	std::vector<struct q3_expert> xs(copies, (struct q3_expert){ te[0][0].l, te[1][0].l, te[2][0].l });

	dmlp_upload(g, u, d, xs.data(), copies, true);
}

static size_t mat_bytes(const struct dmat *d)
{
	return d->p.data_bytes + d->p.sz_floats * 4;
}

static void bench_linear(const char *name, int N, int K, enum lin_kind kind, int R, cudaStream_t st)
{
	struct dmat d;
	std::vector<struct tlin> ls;
	size_t one;
	int copies;

	{ /* size one copy first */
		struct tlin t;
		struct q3g_mat_plan p;
		const struct q3_linear *lp = &t.l;

		make_linear(&t, N, K, kind, 4, 128, false, false);
		GT_OK(q3g_mat_plan(&lp, 1, &p, &e_));
		one = p.data_bytes + p.sz_floats * 4;
	}
	copies = (int)std::max((size_t)1, ((size_t)512 << 20) / one);
	copies = std::min(copies, 64);
	make_stack(&d, ls, copies, N, K, kind);
	std::vector<uint16_t> xb;
	std::vector<float> xf;

	rnd_f16(xb, xf, (size_t)R * K, 1.0f);
	uint16_t *x = dev_upload(xb.data(), xb.size());
	float *y = dev_alloc<float>((size_t)R * N);
	cudaGraph_t g;
	cudaGraphExec_t ex;

	GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
	for (int i = 0; i < REPS; i++) {
		struct q3g_job j;
		int c = i % copies;

		memset(&j, 0, sizeof(j)); /* xh / normw / eps unset: the plain (unfused) input path */
		j.w = d.m;
		j.w.data = (const char *)d.m.data + c * d.m.data_stride;
		j.w.scales = d.m.scales + c * d.m.sz_stride;
		j.x = x;
		j.y = y;
		j.ldx = K;
		j.ldy = N;
		j.epi = Q3G_EPI_STORE;
		GT_OK(q3g_mmv(&j, 1, R, st, &e_));
	}
	GT_CHECK(cudaStreamEndCapture(st, &g));
	GT_CHECK(cudaGraphInstantiate(&ex, g, 0));
	char what[128];

	snprintf(what, sizeof(what), "%s [%d x %d] %s R=%d", name, N, K, fmt_name(d.p.fmt), R);
	report_vs_copy(what, time_graph(ex, st), (double)mat_bytes(&d), st); /* bytes of one call's matrix */
	cudaGraphExecDestroy(ex);
	cudaGraphDestroy(g);
	cudaFree(x);
	cudaFree(y);
	dmat_free(&d);
}

/* The decode MoE of one layer: E experts (gate, up, down int4 g128), k routed + 1 shared per
 * row, fresh random expert ids for each call. */
static void bench_moe(int E, int k, int H, int I, int R, cudaStream_t st)
{
	struct dmat dg, du, dd, sg, su, sd;
	std::vector<struct tlin> lg, lu, ld, s1, s2, s3;
	int S = k + 1, lda = q3g_moe_lda(I, I);

	make_stack(&dg, lg, E, I, H, LIN_GPTQ);
	make_stack(&du, lu, E, I, H, LIN_GPTQ);
	make_stack(&dd, ld, E, H, I, LIN_GPTQ);
	make_stack(&sg, s1, 1, I, H, LIN_GPTQ);
	make_stack(&su, s2, 1, I, H, LIN_GPTQ);
	make_stack(&sd, s3, 1, H, I, LIN_GPTQ);
	std::vector<int> idx((size_t)REPS * R * S);
	std::vector<float> w((size_t)R * S, 1.0f / S);

	for (int i = 0; i < REPS * R; i++) {
		for (int j = 0; j < k; j++) {
			int x;
			bool dup;

			do {
				x = rnd_int(E);
				dup = false;
				for (int q = 0; q < j; q++)
					dup |= idx[(size_t)i * S + q] == x;
			} while (dup);
			idx[(size_t)i * S + j] = x;
		}
		idx[(size_t)i * S + k] = -1;
	}
	std::vector<uint16_t> xb;
	std::vector<float> xf;

	rnd_f16(xb, xf, (size_t)R * H, 1.0f);
	uint16_t *x = dev_upload(xb.data(), xb.size());
	int *di = dev_upload(idx.data(), idx.size());
	float *dw = dev_upload(w.data(), w.size()), *h = dev_alloc<float>((size_t)R * H);
	uint16_t *gu = dev_alloc<uint16_t>((size_t)R * S * lda);
	cudaGraph_t g[2];
	cudaGraphExec_t ex[2];

	for (int part = 0; part < 2; part++) {
		GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
		for (int i = 0; i < REPS; i++) {
			const int *ix = di + (size_t)i * R * S;

			if (part == 0)
				GT_OK(q3g_moe_up(gu, x, ix, &dg.m, &du.m, &sg.m, &su.m, R, k, H, lda, st, &e_));
			else
				GT_OK(q3g_moe_down(h, gu, ix, dw, &dd.m, &sd.m, R, k, H, lda, st, &e_));
		}
		GT_CHECK(cudaStreamEndCapture(st, &g[part]));
		GT_CHECK(cudaGraphInstantiate(&ex[part], g[part], 0));
	}
	/* bytes: distinct experts per call (R rows may share a few) x their matrices + the shared one */
	double distinct = 0;
	for (int i = 0; i < REPS; i++) {
		std::vector<int> v(idx.begin() + (size_t)i * R * S, idx.begin() + (size_t)(i + 1) * R * S);
		std::sort(v.begin(), v.end());
		distinct += std::unique(v.begin(), v.end()) - v.begin() - 1;
	}
	distinct /= REPS;
	double up_b = (distinct + 1) * 2 * (double)mat_bytes(&sg), down_b = (distinct + 1) * (double)mat_bytes(&sd);
	char what[128];

	snprintf(what, sizeof(what), "moe up (gate+up) %d+1 experts, R=%d", k, R);
	report_vs_copy(what, time_graph(ex[0], st), up_b, st);
	snprintf(what, sizeof(what), "moe down + residual %d+1 experts, R=%d", k, R);
	report_vs_copy(what, time_graph(ex[1], st), down_b, st);
	for (int p = 0; p < 2; p++) {
		cudaGraphExecDestroy(ex[p]);
		cudaGraphDestroy(g[p]);
	}
	void *fr[] = { x, di, dw, gu, h };
	for (void *p : fr)
		cudaFree(p);
	struct dmat *all[] = { &dg, &du, &dd, &sg, &su, &sd };
	for (struct dmat *p : all)
		dmat_free(p);
}

/* q3g_moe_host: G picks a token read from host memory over PCIe (decode with experts beyond
 * VRAM), against the host-to-device copy rate.  128 experts of the real shapes (q4 g128), every
 * other one's qweights 8 bytes off 16-byte alignment as safetensors may leave them, in mapped pinned memory:
 * cudaHostAlloc'ed, or (huge) malloc'ed in 2 MiB pages and registered, as the engine pins the
 * checkpoint.  Each launch of the graph picks other experts, so L2 holds none of them. */
static void bench_moe_host(int G, bool huge, cudaStream_t st)
{
	const int E = 128, H = 2048, I = 512, k = 10, S = k + 1;
	struct tlin lg, ld;

	make_linear(&lg, I, H, LIN_GPTQ, 4, 128, false, false);
	make_linear(&ld, H, I, LIN_GPTQ, 4, 128, false, false);
	std::vector<struct q3_expert> experts(E, (struct q3_expert){ lg.l, lg.l, ld.l }); /* bytes alike, places apart */
	struct hx_host hb;

	hx_host_make(&hb, experts.data(), E, 8, huge);
	double bytes = hb.expert_bytes;
	struct q3g_hfmt f = { { 4, 4 }, { 128, 128 }, { 1, 1 }, { false, false } };
	std::vector<int16_t> slot(E, -1);
	std::vector<int> idx((size_t)REPS * S);
	std::vector<float> w(S, 0.1f);
	std::vector<uint16_t> xb;
	std::vector<float> xf;

	for (int i = 0; i < REPS; i++) /* launch i: experts i·k .. i·k + k - 1 (mod E) */
		for (int j = 0; j <= k; j++)
			idx[(size_t)i * S + j] = j == k ? -1 : (i * k + j) % E;
	rnd_f16(xb, xf, (size_t)H, 1.0f);
	uint16_t *dx = dev_upload(xb.data(), xb.size());
	int *di = dev_upload(idx.data(), idx.size());
	int16_t *ds = dev_upload(slot.data(), slot.size());
	float *dw = dev_upload(w.data(), w.size()), *dh = dev_alloc<float>(H);
	float *ws = dev_alloc<float>(q3g_moe_host_scratch(1, G, H, I));
	struct q3g_hexpert *dtab = dev_upload(hb.tab.data(), hb.tab.size());
	cudaGraph_t g;
	cudaGraphExec_t ex;

	GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
	for (int i = 0; i < REPS; i++)
		GT_OK(q3g_moe_host(dh, ws, dx, di + (size_t)i * S, dw, S, k, ds, dtab, &f, G, 0, NULL, 1, H, I, st, &e_));
	GT_CHECK(cudaStreamEndCapture(st, &g));
	GT_CHECK(cudaGraphInstantiate(&ex, g, 0));
	float ms = time_graph(ex, st);
	double gbs = G * bytes / (ms * 1e-3) / 1e9;

	printf("moe host experts G=%d (%s)%*s %9.2f us  %7.1f GB/s  %5.1f%% of the host-to-device copy\n", G,
	       huge ? "registered 2 MiB pages" : "cudaHostAlloc", huge ? 4 : 13, "", ms * 1e3, gbs, 100 * gbs / g_h2d);
	if (g_csv)
		fprintf(g_csv, "moe host G=%d %s,%.3f,%.1f,%.1f\n", G, huge ? "registered" : "hostalloc", ms * 1e3, gbs,
			100 * gbs / g_h2d);
	cudaGraphExecDestroy(ex);
	cudaGraphDestroy(g);
	void *fr[] = { dx, di, ds, dw, dh, ws, dtab };
	for (void *p : fr)
		cudaFree(p);
	hx_host_free(&hb);
}

/* The host-to-device copy rate from pinned memory (256 MiB, the median of five). */
static double h2d_bandwidth(cudaStream_t st)
{
	size_t n = 256u << 20;
	void *h, *d;
	cudaEvent_t a, b;
	float ms[5];

	GT_CHECK(cudaHostAlloc(&h, n, cudaHostAllocDefault));
	GT_CHECK(cudaMalloc(&d, n));
	GT_CHECK(cudaEventCreate(&a));
	GT_CHECK(cudaEventCreate(&b));
	GT_CHECK(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, st));
	for (int i = 0; i < 5; i++) {
		GT_CHECK(cudaEventRecord(a, st));
		GT_CHECK(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, st));
		GT_CHECK(cudaEventRecord(b, st));
		GT_CHECK(cudaEventSynchronize(b));
		GT_CHECK(cudaEventElapsedTime(&ms[i], a, b));
	}
	std::sort(ms, ms + 5);
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	cudaFreeHost(h);
	cudaFree(d);
	return (double)n / (ms[2] * 1e-3) / 1e9;
}

extern bool q3g_pdl; /* kernels/gpu_device.cu */

/* ms of five replays of ex after a warm-up one */
static float replay5(cudaGraphExec_t ex, cudaStream_t st)
{
	float ms = 0;
	cudaEvent_t a, b;

	GT_CHECK(cudaEventCreate(&a));
	GT_CHECK(cudaEventCreate(&b));
	GT_CHECK(cudaGraphLaunch(ex, st));
	GT_CHECK(cudaStreamSynchronize(st));
	GT_CHECK(cudaEventRecord(a, st));
	for (int i = 0; i < 5; i++)
		GT_CHECK(cudaGraphLaunch(ex, st));
	GT_CHECK(cudaEventRecord(b, st));
	GT_CHECK(cudaEventSynchronize(b));
	GT_CHECK(cudaEventElapsedTime(&ms, a, b));
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	return ms;
}

/* ms of five replays (after a warm-up one) of the graph that body() captures on st */
template <class F> static float graph_ms(cudaStream_t st, F &&body)
{
	cudaGraph_t g;
	cudaGraphExec_t ex;

	GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
	body();
	GT_CHECK(cudaStreamEndCapture(st, &g));
	GT_CHECK(cudaGraphInstantiate(&ex, g, 0));
	float ms = replay5(ex, st);

	cudaGraphExecDestroy(ex);
	cudaGraphDestroy(g);
	return ms;
}

/* A launch that does nothing: the floor under every launch of a graph. */
__global__ void empty_kernel(void)
{
}

/* One Gated DeltaNet decode layer as the backend runs it at batch R (all launches of the layer:
 * qkvz+ba with the norm folded in, conv+delta+gated norm, out_proj + residual, router + shared
 * gate with the top-k (and the experts' normalized input), experts up, experts down + residual), NL layers with their own dense
 * weights chained in one graph: the time per layer includes the gaps between kernels.  Then each
 * launch alone, NL in a row, to show where the layer's time goes. */
static void bench_gdn_layers(int NL, int R, cudaStream_t st)
{
	struct q3g_dims d;
	const int H = 2048, E = 512, k = 10, I = 512, S = k + 1;

	memset(&d, 0, sizeof(d));
	d.H = H; d.Nk = 16; d.Nv = 32; d.Dk = 128; d.Dv = 128; d.W = 4; d.key_dim = 2048; d.value_dim = 4096;
	d.conv_dim = 8192; d.E = E; d.topk = k; d.I = I; d.Is = I; d.norm_topk = true; d.eps = 1e-6f; d.max_ctx = 64;
	const int qd = 2 * d.key_dim + 2 * d.value_dim, lda = q3g_moe_lda(I, I);
	std::vector<struct dmat> qkvz(NL), ba(NL), out(NL), router(NL), sgate(NL);
	/* every layer its own experts, as the model's: one stack for all of them let a launch timed
	 * alone find the experts the one before it had read in L2 */
	std::vector<struct dmat> eg(NL), eu(NL), ed(NL), shg(NL), shu(NL), shd(NL);
	std::vector<struct tlin> tl[5], te[6];

	for (int l = 0; l < NL; l++) {
		make_stack(&qkvz[l], tl[0], 1, qd, H, g_dense);
		make_stack(&ba[l], tl[1], 1, 2 * d.Nv, H, LIN_BF16);
		make_stack(&out[l], tl[2], 1, H, d.value_dim, g_dense);
		make_stack(&router[l], tl[3], 1, E, H, LIN_BF16);
		make_stack(&sgate[l], tl[4], 1, 1, H, LIN_BF16);
		make_mlp(&eg[l], &eu[l], &ed[l], &te[0], E, I, H, LIN_GPTQ, g_actorder);
		make_mlp(&shg[l], &shu[l], &shd[l], &te[3], 1, I, H, g_dense, g_actorder);
	}
	/* sessions: R sequences at position 10, one layer of state each */
	size_t conv_n = (size_t)3 * d.conv_dim, rec_n = (size_t)d.Nv * d.Dv * d.Dk;
	std::vector<struct q3g_seq> seqs(R);
	std::vector<int> row_seq(R), row_pos(R, 10);
	std::vector<int32_t> ids(R, 1);
	for (int r = 0; r < R; r++) {
		float *conv = dev_alloc<float>(2 * conv_n), *rec = dev_alloc<float>(rec_n);

		GT_CHECK(cudaMemset(conv, 0, 2 * conv_n * 4));
		GT_CHECK(cudaMemset(rec, 0, rec_n * 4));
		seqs[r] = (struct q3g_seq){ r, 1, 10, 0, NULL, conv, conv + conv_n, rec };
		row_seq[r] = r;
	}
	struct q3g_rows rows = { dev_upload(ids.data(), R), dev_upload(row_seq.data(), R), dev_upload(row_pos.data(), R),
				 dev_upload(seqs.data(), R) };
	std::vector<float> hh = rnd_vec((size_t)R * H, 1.0f), ones(H, 0.0f), A_log(d.Nv, 0.5f), dtb(d.Nv, 0.0f),
			   cw = rnd_vec((size_t)d.conv_dim * 4, 0.5f), nw(d.Dv, 1.0f);
	float *h = dev_upload(hh.data(), hh.size()), *w0 = dev_upload(ones.data(), H), *dA = dev_upload(A_log.data(), d.Nv);
	float *ddt = dev_upload(dtb.data(), d.Nv), *dcw = dev_upload(cw.data(), cw.size()), *dnw = dev_upload(nw.data(), d.Dv);
	float *pq = dev_alloc<float>((size_t)R * qd), *pba = dev_alloc<float>((size_t)R * 2 * d.Nv);
	float *lg = dev_alloc<float>((size_t)R * E), *sg = dev_alloc<float>(R);
	uint16_t *gu = dev_alloc<uint16_t>((size_t)R * S * lda);
	uint16_t *core = dev_alloc<uint16_t>((size_t)R * d.value_dim), *xb = dev_alloc<uint16_t>((size_t)R * H);
	/* every layer's own routing, as its router left it in the chain below: the experts launches
	 * timed alone read each layer's picks, not one layer's eight times */
	std::vector<int *> idx(NL);
	std::vector<float *> wts(NL);

	for (int l = 0; l < NL; l++) {
		idx[l] = dev_alloc<int>((size_t)R * S);
		wts[l] = dev_alloc<float>((size_t)R * S);
		GT_CHECK(cudaMemset(idx[l], 0, (size_t)R * S * sizeof(int)));
		GT_CHECK(cudaMemset(wts[l], 0, (size_t)R * S * sizeof(float)));
	}
	static const char *names[] = { "qkvz+ba (norm fused)", "conv+delta+gated norm", "out_proj + residual",
				       "router + top-k + norm", "experts up", "experts down + residual",
				       "(router logits alone)", "(top-k alone)", "(an empty kernel)" };
	/* launch op of layer l: 0-5 the layer's, 6-8 for comparison */
	auto launch = [&](int op, int l) {
		struct q3g_job j[2];

		memset(j, 0, sizeof(j));
		switch (op) {
		case 0:
			j[0].w = qkvz[l].m, j[0].y = pq, j[0].ldx = H, j[0].ldy = qd, j[0].xh = h, j[0].normw = w0;
			j[0].eps = 1e-6f;
			j[1] = j[0], j[1].w = ba[l].m, j[1].y = pba, j[1].ldy = 2 * d.Nv;
			GT_OK(q3g_mmv(j, 2, R, st, &e_));
			break;
		case 1:
			GT_OK(q3g_delta_decode(pq, qd, dcw, pba, dA, ddt, core, pq + d.conv_dim, qd, dnw, rows, R,
					       0, &d, st, &e_));
			break;
		case 2:
			j[0].w = out[l].m, j[0].x = core, j[0].y = h, j[0].ldx = d.value_dim, j[0].ldy = H;
			j[0].epi = Q3G_EPI_ADD;
			GT_OK(q3g_mmv(j, 1, R, st, &e_));
			break;
		case 3: /* the router in fp32 (R <= 16: the SIMT kernel, no cuBLAS), then the top k */
			GT_OK(q3g_router(NULL, lg, sg, idx[l], wts[l], E, k, true, h, w0, 1e-6f, &router[l].m, &sgate[l].m, R,
					 H, NULL, NULL, xb, st, &e_));
			break;
		case 4:
			GT_OK(q3g_moe_up(gu, xb, idx[l], &eg[l].m, &eu[l].m, &shg[l].m, &shu[l].m, R, k, H, lda, st, &e_));
			break;
		case 5:
			GT_OK(q3g_moe_down(h, gu, idx[l], wts[l], &ed[l].m, &shd[l].m, R, k, H, lda, st, &e_));
			break;
		case 6:
			GT_OK(q3g_router_logits(NULL, lg, sg, h, w0, 1e-6f, &router[l].m, &sgate[l].m, R, H, NULL, NULL, st,
						&e_));
			break;
		case 7:
			GT_OK(q3g_router_topk(idx[l], wts[l], lg, sg, R, E, k, true, st, &e_));
			break;
		default: /* the floor: a launch that does nothing, after one that did */
			empty_kernel<<<1, 32, 0, st>>>();
			GT_CHECK(cudaGetLastError());
		}
	};
	/* per layer: dense weights, ~R·10 distinct experts + shared, state r+w */
	const double distinct = E * (1.0 - pow(1.0 - (double)k / E, R));
	const double bytes = (double)mat_bytes(&qkvz[0]) + mat_bytes(&ba[0]) + mat_bytes(&out[0]) +
			     mat_bytes(&router[0]) + mat_bytes(&sgate[0]) +
			     distinct * ((double)mat_bytes(&eg[0]) + mat_bytes(&eu[0]) + mat_bytes(&ed[0])) +
			     (double)mat_bytes(&shg[0]) + mat_bytes(&shu[0]) + mat_bytes(&shd[0]) +
			     2.0 * R * rec_n * 4;
	cudaDeviceProp prop;

	GT_CHECK(cudaGetDeviceProperties(&prop, 0));
	for (int pdl = 0; pdl < 2; pdl++) {
		bool saved = q3g_pdl;

		if (pdl && prop.major < 9)
			continue; /* no PDL before sm_90 */
		q3g_pdl = pdl;
		float ms = graph_ms(st, [&] {
			for (int l = 0; l < NL; l++)
				for (int op = 0; op < 6; op++)
					launch(op, l);
		});
		char what[128];

		snprintf(what, sizeof(what), "GDN decode layer (7 launches%s), R=%d, PDL %s",
			 g_dense == LIN_BF16 ? ", dense bf16" : "", R, pdl ? "on" : "off");
		/* report per layer: (ms / 5 replays / NL layers) in the REPS convention of report() */
		report(what, ms / 5 / NL * 1.0f, bytes);
		printf("  48 such layers: %.0f tok/s at batch %d (before the attention layers' extra work and lm_head)\n",
		       R / (48.0 * ms / 5 / NL * 1e-3), R);
		q3g_pdl = saved;
	}
	/* each launch of the layer alone, NL in a row with the layers' own weights (PDL as the
	 * engine runs it): where the layer's time goes */
	for (int op = 0; op < 9; op++) {
		float ms = graph_ms(st, [&] {
			for (int l = 0; l < NL; l++)
				launch(op, l);
		});

		printf("  %-28s R=%-2d %8.2f us per layer\n", names[op], R, ms * 1e3 / 5 / NL);
		if (g_csv)
			fprintf(g_csv, "gdn op %s R=%d,%.3f,,\n", names[op], R, ms * 1e3 / 5 / NL);
	}
}

/* The attention half of a full-attention decode layer at batch R, each row its own sequence at
 * position ctx - 1 (dense projections bf16 as in mkmodel's 80b-a3b): q/k/v with the norm fused,
 * q/k norm + RoPE + KV write, split-KV attention + combine, o_proj + residual; NL layers in one
 * graph, then each step alone NL in a row. */
static void bench_attn_layers(int NL, int R, int ctx, cudaStream_t st)
{
	struct q3g_dims d;
	const int H = 2048;

	memset(&d, 0, sizeof(d));
	d.H = H; d.Hq = 16; d.Hkv = 2; d.D = 256; d.rot = 64; d.rope_theta = 1e7; d.eps = 1e-6f; d.max_ctx = ctx;
	const int qd = d.Hq * d.D, kvd = d.Hkv * d.D;
	std::vector<struct dmat> q(NL), k(NL), v(NL), o(NL);
	std::vector<struct tlin> tl[4];

	for (int l = 0; l < NL; l++) {
		make_stack(&q[l], tl[0], 1, 2 * qd, H, LIN_BF16);
		make_stack(&k[l], tl[1], 1, kvd, H, LIN_BF16);
		make_stack(&v[l], tl[2], 1, kvd, H, LIN_BF16);
		make_stack(&o[l], tl[3], 1, H, qd, LIN_BF16);
	}
	std::vector<struct q3g_seq> seqs(R);
	std::vector<int> row_seq(R), row_pos(R, ctx - 1);
	std::vector<int32_t> ids(R, 1);
	for (int r = 0; r < R; r++) {
		uint16_t *kv = dev_alloc<uint16_t>((size_t)2 * ctx * kvd);

		GT_CHECK(cudaMemset(kv, 0x3c, (size_t)2 * ctx * kvd * 2)); /* bf16 ~0.01: finite scores */
		seqs[r] = (struct q3g_seq){ r, 1, ctx - 1, 0, kv, NULL, NULL, NULL };
		row_seq[r] = r;
	}
	struct q3g_rows rows = { dev_upload(ids.data(), R), dev_upload(row_seq.data(), R), dev_upload(row_pos.data(), R),
				 dev_upload(seqs.data(), R) };
	std::vector<float> hh = rnd_vec((size_t)R * H, 1.0f), w0(H, 0.0f), nw(d.D, 0.0f);
	float *h = dev_upload(hh.data(), hh.size()), *dw = dev_upload(w0.data(), H), *dnw = dev_upload(nw.data(), d.D);
	float *qg = dev_alloc<float>((size_t)R * 2 * qd), *kk = dev_alloc<float>((size_t)R * kvd);
	float *vv = dev_alloc<float>((size_t)R * kvd), *part = dev_alloc<float>((size_t)R * d.Hq * Q3G_ATT_SPLITS * (d.D + 2));
	uint16_t *qb = dev_alloc<uint16_t>((size_t)R * qd), *att = dev_alloc<uint16_t>((size_t)R * qd);
	static const char *names[] = { "q/k/v (norm fused)", "q/k norm + RoPE + KV write", "attention + combine",
				       "o_proj + residual" };

	/* launch op of layer l */
	auto launch = [&](int op, int l) {
		struct q3g_job j[3];

		memset(j, 0, sizeof(j));
		switch (op) {
		case 0:
			j[0].w = q[l].m, j[0].y = qg, j[0].ldx = H, j[0].ldy = 2 * qd, j[0].xh = h, j[0].normw = dw;
			j[0].eps = 1e-6f;
			j[1] = j[0], j[1].w = k[l].m, j[1].y = kk, j[1].ldy = kvd;
			j[2] = j[0], j[2].w = v[l].m, j[2].y = vv, j[2].ldy = kvd;
			GT_OK(q3g_mmv(j, 3, R, st, &e_));
			break;
		case 1:
			GT_OK(q3g_attn_prep(qb, qg, kk, vv, dnw, dnw, rows, R, 0, &d, st, &e_));
			break;
		case 2:
			GT_OK(q3g_attn_decode(att, qb, qg, part, rows, R, 0, &d, st, &e_));
			break;
		default:
			j[0].w = o[l].m, j[0].x = att, j[0].y = h, j[0].ldx = qd, j[0].ldy = H, j[0].epi = Q3G_EPI_ADD;
			GT_OK(q3g_mmv(j, 1, R, st, &e_));
		}
	};

	for (int op = -1; op < 4; op++) { /* -1: the whole chain */
		const int first = op < 0 ? 0 : op, last = op < 0 ? 3 : op;
		float ms = graph_ms(st, [&] {
			for (int l = 0; l < NL; l++)
				for (int step = first; step <= last; step++)
					launch(step, l);
		});

		if (op < 0)
			printf("attention decode layer before the MoE (5 launches), R=%d, ctx %d: %8.2f us per layer\n", R, ctx,
			       ms * 1e3 / 5 / NL);
		else
			printf("  %-28s R=%-2d %8.2f us per layer\n", names[op], R, ms * 1e3 / 5 / NL);
		if (g_csv)
			fprintf(g_csv, "attn op %s R=%d,%.3f,,\n", op < 0 ? "layer" : names[op], R, ms * 1e3 / 5 / NL);
	}
}

int main(int argc, char **argv)
{
	cudaStream_t st;

	int gdn_only = 0; /* --gdn [R]: only the GDN layer at batch R (default 1; for a profiler) */
	int host_only = 0; /* --host: only the experts read from host memory */
	int linear_only = 0; /* --linear: only the dense Linears */

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--csv") && i + 1 < argc)
			g_csv = fopen(argv[++i], "w");
		else if (!strcmp(argv[i], "--host"))
			host_only = 1;
		else if (!strcmp(argv[i], "--linear"))
			linear_only = 1;
		else if (!strcmp(argv[i], "--dense")) {
			if (i + 1 >= argc || strcmp(argv[i + 1], "bf16")) {
				fprintf(stderr, "bench_kernels: --dense takes bf16 (GPTQ int4 is the default)\n");
				return 2;
			}
			g_dense = LIN_BF16, i++;
		}
		else if (!strcmp(argv[i], "--act-order"))
			g_actorder = true;
		else if (!strcmp(argv[i], "--gdn"))
			gdn_only = i + 1 < argc && atoi(argv[i + 1]) > 0 ? atoi(argv[++i]) : 1;
	}
	if (gdn_only > Q3G_MMV_MAX_TOK) {
		fprintf(stderr, "bench_kernels: --gdn %d: decode batches go up to %d rows\n", gdn_only, Q3G_MMV_MAX_TOK);
		return 2;
	}
	gt_need_device();
	gt_seed();
	GT_OK(q3g_init(&e_));
	GT_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
	q3_err e;

	g_peak = q3g_copy_bandwidth((size_t)1 << 30, 20, &e);
	if (g_peak <= 0) {
		fprintf(stderr, "copy bandwidth: %s\n", e.msg);
		return 1;
	}
	printf("device-to-device copy: %.0f GB/s (bytes read + written)\n", g_peak);
	if (g_csv)
		fprintf(g_csv, "case,us,gb_s,pct_copy\ncopy,,%.1f,100\n", g_peak);
	if (gdn_only) {
		bench_gdn_layers(8, gdn_only, st);
		bench_attn_layers(8, gdn_only, 1024, st);
		return 0;
	}
	if (!linear_only) {
		g_h2d = h2d_bandwidth(st);
		printf("host-to-device copy (pinned): %.1f GB/s\n", g_h2d);
		for (int G : { 1, 2, 3, 4, 6 })
			for (int huge = 0; huge < 2; huge++)
				bench_moe_host(G, huge, st);
		if (host_only)
			return 0;
	}
	/* the dense Linears of a decode step, batch 1 and 16 */
	bench_linear("qkvz", 12288, 2048, LIN_GPTQ, 1, st);
	/* the same rows twice and four times over: what a launch costs beside its bytes */
	bench_linear("qkvz x2", 2 * 12288, 2048, LIN_GPTQ, 1, st);
	bench_linear("qkvz x4", 4 * 12288, 2048, LIN_GPTQ, 1, st);
	bench_linear("q_proj", 8192, 2048, LIN_GPTQ, 1, st);
	bench_linear("out_proj / o_proj", 2048, 4096, LIN_GPTQ, 1, st);
	bench_linear("expert gate (one)", 512, 2048, LIN_GPTQ, 1, st);
	bench_linear("router", 512, 2048, LIN_BF16, 1, st);
	/* mkmodel's 80b-a3b keeps the dense projections bf16 by default */
	bench_linear("qkvz bf16", 12288, 2048, LIN_BF16, 1, st);
	bench_linear("out_proj bf16", 2048, 4096, LIN_BF16, 1, st);
	bench_linear("lm_head", 151936, 2048, LIN_BF16, 1, st);
	if (!linear_only)
		bench_moe(512, 10, 2048, 512, 1, st);
	bench_linear("qkvz", 12288, 2048, LIN_GPTQ, 16, st);
	bench_linear("out_proj / o_proj", 2048, 4096, LIN_GPTQ, 16, st);
	bench_linear("lm_head", 151936, 2048, LIN_BF16, 16, st);
	bench_linear("qkvz bf16", 12288, 2048, LIN_BF16, 16, st);
	bench_linear("out_proj bf16", 2048, 4096, LIN_BF16, 16, st);
	if (linear_only)
		return 0;
	bench_moe(512, 10, 2048, 512, 16, st);
	bench_gdn_layers(8, 1, st);
	bench_gdn_layers(8, 16, st);
	bench_attn_layers(8, 1, 1024, st);
	bench_attn_layers(8, 16, 1024, st);
	if (g_csv)
		fclose(g_csv);
	return 0;
}
