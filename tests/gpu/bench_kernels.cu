/* bench_kernels.cu - kernel timings against the measured copy bandwidth: the int4 matvec at the
 * model's dense shapes, the decode MoE (10 routed + 1 shared experts), the bf16 lm_head, decode
 * attention and the delta rule.  Weights are random and rotated through enough copies (or
 * experts) that each timed call reads from memory, not from L2; each case is a CUDA graph of
 * REPS launches replayed, timed with events, the median of several replays.
 *
 *   bench_kernels [--csv F]      one line per case: us per call, GB/s, % of the copy bandwidth
 */
#include <time.h>

#include <algorithm>

#include "gpu_test.h"

#define REPS 20
#define ROUNDS 7

static FILE *g_csv;
static double g_peak;

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

	rnd_bf16(xb, xf, (size_t)R * K, 1.0f);
	uint16_t *x = dev_upload(xb.data(), xb.size());
	float *y = dev_alloc<float>((size_t)R * N);
	cudaGraph_t g;
	cudaGraphExec_t ex;

	GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
	for (int i = 0; i < REPS; i++) {
		struct q3g_job j;
		int c = i % copies;

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
	report(what, time_graph(ex, st), (double)mat_bytes(&d) / copies);
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
	int S = k + 1, ldgu = 2 * I;

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

	rnd_bf16(xb, xf, (size_t)R * H, 1.0f);
	uint16_t *x = dev_upload(xb.data(), xb.size());
	int *di = dev_upload(idx.data(), idx.size());
	float *dw = dev_upload(w.data(), w.size()), *gu = dev_alloc<float>((size_t)R * S * ldgu), *h = dev_alloc<float>((size_t)R * H);
	cudaGraph_t g[2];
	cudaGraphExec_t ex[2];

	for (int part = 0; part < 2; part++) {
		GT_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
		for (int i = 0; i < REPS; i++) {
			const int *ix = di + (size_t)i * R * S;

			if (part == 0)
				GT_OK(q3g_moe_up(gu, x, ix, &dg.m, &du.m, &sg.m, &su.m, R, k, H, ldgu, st, &e_));
			else
				GT_OK(q3g_moe_down(h, gu, ix, dw, &dd.m, &sd.m, R, k, H, ldgu, st, &e_));
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
	report(what, time_graph(ex[0], st), up_b);
	snprintf(what, sizeof(what), "moe down + residual %d+1 experts, R=%d", k, R);
	report(what, time_graph(ex[1], st), down_b);
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

int main(int argc, char **argv)
{
	cudaStream_t st;

	for (int i = 1; i + 1 < argc; i++)
		if (!strcmp(argv[i], "--csv"))
			g_csv = fopen(argv[i + 1], "w");
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
	/* the dense Linears of a decode step, batch 1 and 16 */
	bench_linear("qkvz", 12288, 2048, LIN_GPTQ, 1, st);
	bench_linear("q_proj", 8192, 2048, LIN_GPTQ, 1, st);
	bench_linear("out_proj / o_proj", 2048, 4096, LIN_GPTQ, 1, st);
	bench_linear("expert gate (one)", 512, 2048, LIN_GPTQ, 1, st);
	bench_linear("router", 512, 2048, LIN_BF16, 1, st);
	bench_linear("lm_head", 151936, 2048, LIN_BF16, 1, st);
	bench_moe(512, 10, 2048, 512, 1, st);
	bench_linear("qkvz", 12288, 2048, LIN_GPTQ, 16, st);
	bench_linear("out_proj / o_proj", 2048, 4096, LIN_GPTQ, 16, st);
	bench_linear("lm_head", 151936, 2048, LIN_BF16, 16, st);
	bench_moe(512, 10, 2048, 512, 16, st);
	if (g_csv)
		fclose(g_csv);
	return 0;
}
