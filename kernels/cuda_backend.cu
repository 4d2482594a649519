/* cuda_backend.cu - the CUDA backend (backend.h): the Qwen3-Next forward pass on one GPU with the
 * kernels of gpu.h.
 *
 * open       every weight is uploaded and repacked into the tile format (GPTQ int4/int8 stay
 *            quantized; dense weights become fp16), in_proj_qkvz / in_proj_ba rows reordered to
 *            [q | k | v | z] and [b | a]; activation scratch for max_tokens rows is allocated.
 * state_new  one device allocation per session: KV cache (bf16) of the full-attention layers,
 *            conv states (fp32, double-buffered: a call reads one half and writes the other),
 *            delta-rule states (fp32).
 * forward    the rows of all sequences go through each layer together.  A call whose sequences
 *            all feed one token (decode) replays a CUDA graph captured for its batch size (the
 *            batch padded to a bucket with a scratch session): the per-call facts (ids,
 *            positions, state pointers) are the graph's first node, a copy from pinned memory,
 *            and the logits its last.  Prefill calls run the same ops eagerly, with cuBLAS for
 *            the dense Linears and attention, and the grouped MoE GEMM.
 * Nothing is allocated and nothing waits for the device inside a step, except the final wait
 * for the logits.
 */
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_offload.h"
#include "gpu_internal.h"

extern "C" {
#include "backend.h"
#include "engine.h"
#include "expert_stats.h"
#include "dequant.h"
#include "half.h"
#include "model.h"
}

#define BK_STAGE_BYTES (64u << 20) /* upload staging */
#define BK_MAX_TOKENS 4096	   /* rows per forward call (prefill chunk) */
#define BK_LOGIT_ROWS 16	   /* rows of logits computed per lm_head pass */
#define BK_ATT_DECODE_MAX 16	   /* sequences up to this many new tokens attend with the decode kernel */
#define BK_MAX_GRAPHS 64
#define BK_MMV_ROWS 64		   /* Linears on up to this many rows use the matvec */
/* Calls of up to this many rows fold the RMSNorms into the consumers' staging; more rows write the
 * normalized rows once (each block of a consumer would otherwise normalize every row again).
 * Either way a row gets the same fp16 inputs (row_rsqrt): its results do not depend on its batch.
 * Every decode batch (the matvec's rows), since the matvec's blocks take up to eight row tiles
 * above four rows: two norm launches a layer saved, 1540.9 -> 1568.7 tok/s at batch 16 (H200,
 * 80b-a3b synthetic; the limit was 4). */
#define BK_FUSED_NORM_ROWS Q3G_MMV_MAX_TOK

struct lin {
	struct q3g_mat m;
	void *mem;
};

struct glayer {
	int lin, full;
	float *input_norm, *post_norm;
	struct lin qkvz, ba, lin_out;
	float *conv_w, *A_log, *dt_bias, *lin_norm;
	struct lin q, k, v, o;
	float *q_norm, *k_norm;
	struct lin router, shared_gate, egate, eup, edown, sgate, sup, sdown;
};

struct gstate {
	void *mem;
	uint16_t *kv;
	float *conv[2];
	float *rec;
	int parity; /* conv[parity] holds the state before the next call */
};

struct graph {
	int B;
	bool samp; /* ends with the draws (q3_fwd_seq.sample), not the logits' copy */
	cudaGraphExec_t exec;
};

struct cuda_bk {
	const struct q3_model *m;
	const struct q3_config *c;
	struct q3_backend_opts o;
	struct q3g_dims d;
	cudaStream_t st;
	cublasHandle_t cb;
	void *cb_ws;
	struct glayer *layers;
	uint16_t *embed;
	float *final_norm;
	struct lin lm_head;
	int maxrows;		/* rows per call: max_tokens, at least the largest decode bucket */
	size_t kv_elems, conv_elems, rec_elems;

	/* per-call table: pinned host and device copies, [ids R | row_seq R | row_pos R | lrows L | seq S] */
	void *tab_h, *tab_d;
	size_t tab_bytes;

	/* activations (maxrows rows) */
	float *h, *qkvz, *ba, *u, *og, *qg, *kk, *vv, *logits_r, *sg, *wts, *part, *att_o, *logits;
	uint16_t *xb, *core, *qb, *att, *wtmp, *att_p, *act;
	float *xf, *wtmp32;	/* the router's fp32 input and expanded weights (prefill) */
	float *att_s;
	size_t att_elems;
	int *idx;
	void *moe_ws;
	float *logits_h; /* pinned [max(max_batch, 16)][V] */
	/* decode draws on the device (q3_fwd_seq.sample): pinned host memory, mapped, that the host
	 * fills and the sampling kernels read (the adjustments; the parameters through samp_cp) and
	 * write (ids); h: host view, d: device */
	void *samp_h, *samp_d;
	struct q3g_sampling *samp_par;	 /* [max(max_batch, 16)] */
	struct q3g_adjust_row *samp_rows; /* [max(max_batch, 16)] */
	int32_t *samp_tok;		 /* [max(max_batch, 16)] */
	void *samp_ws;			 /* device scratch of q3g_sample */
	/* samp_par and samp_rows copied to the device at each draw: every block of the kernels
	 * reads its row's, and one read of mapped memory crosses PCIe (sample_max_kernel's 1,024
	 * blocks at 16 rows took 40 us of a 7.8 ms step, ncu, H200) */
	void *samp_cp;
	size_t samp_cp_bytes;
	struct q3g_adj *samp_adj;	 /* [Q3_SAMPLE_ADJ_MAX] */
	int dec_rows;		/* rows the decode paths (attention splits, per-pair MoE) take */

	struct gstate dummy;
	struct q3_offload *off; /* routed experts beyond VRAM (cuda_offload.h) */
	int *sidx;		/* [maxrows][k + 1] expert slots of the pairs (offload) */
	struct graph graphs[BK_MAX_GRAPHS];
	int ngraphs;
	bool no_graphs;
	bool profiled; /* cudaProfilerStart called (first forward) */
	q3_trace_fn trace;
	void *trace_ctx;
	float *trace_h;
};

/* ---- allocation helpers ----------------------------------------------------------------------- */

static int dalloc(void **p, size_t bytes, const char *what, q3_err *e)
{
	cudaError_t err = cudaMalloc(p, bytes ? bytes : 16);

	if (err != cudaSuccess) {
		size_t fr = 0, tot = 0;

		cudaGetLastError();
		cudaMemGetInfo(&fr, &tot);
		*p = NULL;
		return q3_errf(e, -ENOMEM, "cuda backend: no device memory for %s (%zu MiB; %zu of %zu MiB free)", what,
			       bytes >> 20, fr >> 20, tot >> 20);
	}
	return 0;
}

#define DALLOC(ptr, bytes, what)                                                   \
	do {                                                                       \
		if ((err = dalloc((void **)&(ptr), (bytes), (what), e)))           \
			return err;                                                \
	} while (0)

/* A float tensor (any float dtype) as fp32 on the device. */
static int up_f32(float **dst, const struct q3_tensor *t, q3_err *e)
{
	size_t n = q3_tensor_numel(t);
	float *h = (float *)malloc(sizeof(float) * n);
	int err;

	if (!h)
		return q3_errf(e, -ENOMEM, "out of memory");
	q3_tensor_to_f32(t, h);
	if ((err = dalloc((void **)dst, sizeof(float) * n, t->name, e))) {
		free(h);
		return err;
	}
	cudaError_t ce = cudaMemcpy(*dst, h, sizeof(float) * n, cudaMemcpyHostToDevice);

	free(h);
	CUDA_CHECK(e, ce);
	return 0;
}

/* One Linear in tile format. */
static int up_one(struct lin *L, const struct q3_linear *l, const int *rowmap, struct q3g_stage *sg,
		  cudaStream_t st, q3_err *e)
{
	struct q3g_mat_plan p;
	char name[256];
	int err;

	q3_linear_name(l, name, sizeof(name));
	if ((err = q3g_mat_plan(&l, 1, &p, e)) || (err = dalloc(&L->mem, q3g_mat_bytes(&p), name, e)))
		return err;
	q3g_mat_place(&L->m, &p, L->mem);
	if ((err = q3g_mat_upload(&L->m, 0, l, rowmap, sg, st, e)))
		return q3_err_prefix(e, err, "%s", name);
	return 0;
}

/* ---- open / close --------------------------------------------------------------------------- */

static void free_lin(struct lin *L)
{
	cudaFree(L->mem);
	L->mem = NULL;
}

static void cuda_close(void *p)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;

	if (!bk)
		return;
	if (bk->st)
		cudaStreamSynchronize(bk->st);
	q3_off_close(bk->off);
	for (int i = 0; i < bk->ngraphs; i++)
		cudaGraphExecDestroy(bk->graphs[i].exec);
	if (bk->layers) {
		for (int i = 0; i < bk->c->num_layers; i++) {
			struct glayer *L = &bk->layers[i];
			struct lin *ls[] = { &L->qkvz, &L->ba, &L->lin_out, &L->q, &L->k, &L->v, &L->o,
					     &L->router, &L->shared_gate, &L->egate, &L->eup, &L->edown,
					     &L->sgate, &L->sup, &L->sdown };
			float *fs[] = { L->input_norm, L->post_norm, L->conv_w, L->A_log, L->dt_bias,
					L->lin_norm, L->q_norm, L->k_norm };

			for (size_t j = 0; j < Q3_ARRAY_SIZE(ls); j++)
				free_lin(ls[j]);
			for (size_t j = 0; j < Q3_ARRAY_SIZE(fs); j++)
				cudaFree(fs[j]);
		}
		free(bk->layers);
	}
	free_lin(&bk->lm_head);
	void *bufs[] = { bk->embed, bk->final_norm, bk->tab_d, bk->h, bk->qkvz, bk->ba, bk->u, bk->og,
			 bk->qg, bk->kk, bk->vv, bk->logits_r, bk->sg, bk->wts, bk->act, bk->part, bk->att_o,
			 bk->logits, bk->xb, bk->core, bk->qb, bk->att, bk->wtmp, bk->att_p, bk->att_s,
			 bk->idx, bk->moe_ws, bk->dummy.mem, bk->cb_ws, bk->xf, bk->wtmp32, bk->sidx, bk->samp_ws, bk->samp_cp };
	for (size_t j = 0; j < Q3_ARRAY_SIZE(bufs); j++)
		cudaFree(bufs[j]);
	cudaFreeHost(bk->tab_h);
	cudaFreeHost(bk->logits_h);
	cudaFreeHost(bk->samp_h);
	free(bk->trace_h);
	if (bk->cb)
		cublasDestroy(bk->cb);
	if (bk->st)
		cudaStreamDestroy(bk->st);
	free(bk);
}

static void fill_dims(struct cuda_bk *bk)
{
	const struct q3_config *c = bk->c;
	struct q3g_dims *d = &bk->d;

	d->H = c->hidden_size;
	d->V = c->vocab_size;
	d->Hq = c->num_heads;
	d->Hkv = c->num_kv_heads;
	d->D = c->head_dim;
	d->rot = c->rotary_dim;
	d->rope_theta = c->rope_theta;
	d->Nk = c->lin_num_k_heads;
	d->Nv = c->lin_num_v_heads;
	d->Dk = c->lin_k_dim;
	d->Dv = c->lin_v_dim;
	d->W = c->conv_kernel;
	d->key_dim = c->lin_key_dim;
	d->value_dim = c->lin_value_dim;
	d->conv_dim = c->conv_dim;
	d->E = c->num_experts;
	d->topk = c->top_k;
	d->I = c->moe_inter;
	d->Is = c->shared_inter;
	d->norm_topk = c->norm_topk_prob;
	d->eps = c->rms_eps;
	d->max_ctx = bk->o.max_ctx;
}

/* Row maps of the Gated DeltaNet projections: new row -> stored row (qwen3next.md 4.5.1). */
static void gdn_rowmaps(const struct q3_config *c, int *qkvz, int *ba)
{
	int Nk = c->lin_num_k_heads, Nv = c->lin_num_v_heads, Dk = c->lin_k_dim, Dv = c->lin_v_dim;
	int r = Nv / Nk, grp = 2 * Dk + 2 * r * Dv, n = 0;

	for (int g = 0; g < Nk; g++)
		for (int i = 0; i < Dk; i++)
			qkvz[n++] = g * grp + i;
	for (int g = 0; g < Nk; g++)
		for (int i = 0; i < Dk; i++)
			qkvz[n++] = g * grp + Dk + i;
	for (int j = 0; j < Nv; j++)
		for (int i = 0; i < Dv; i++)
			qkvz[n++] = (j / r) * grp + 2 * Dk + (j % r) * Dv + i;
	for (int j = 0; j < Nv; j++)
		for (int i = 0; i < Dv; i++)
			qkvz[n++] = (j / r) * grp + 2 * Dk + r * Dv + (j % r) * Dv + i;
	for (int j = 0; j < Nv; j++) {
		ba[j] = (j / r) * 2 * r + j % r;
		ba[Nv + j] = (j / r) * 2 * r + r + j % r;
	}
}

/* An MLP's stacks (gate, up, down; nmat matrices each) planned from experts xs[0 .. n) with what
 * act-order allows (q3g_mlp_plan): down reads its inputs sorted, without a gather, where the
 * activations stay on the device (sorted_down). */
static int place_mlp(struct lin *st[3], const struct q3_expert *xs, int n, int nmat, bool sorted_down,
		     const char *what, q3_err *e)
{
	struct q3g_mat_plan p[3];
	struct q3g_mat *ms[3];
	void *mem[3];
	char name[96];
	int err;

	if ((err = q3g_mlp_plan(xs, n, sorted_down, p, e)))
		return err;
	for (int w = 0; w < 3; w++) {
		p[w].nmat = nmat;
		snprintf(name, sizeof(name), "%s %s", what, w == 0 ? "gate" : w == 1 ? "up" : "down");
		if ((err = dalloc(&st[w]->mem, q3g_mat_bytes(&p[w]), name, e)))
			return err;
		ms[w] = &st[w]->m;
		mem[w] = st[w]->mem;
	}
	q3g_mlp_place(ms, p, mem);
	return 0;
}

/* The stacks of a layer's routed experts in VRAM, slot by slot (all of them when nothing is
 * offloaded; a spare slot holds expert 0's weights and is never read).  Their formats come from every
 * expert of the layer, not only the resident ones: re-balancing later uploads others into these
 * slots, and one needing zero points or an act-order permutation must find room for them.  Down
 * reads sorted inputs unless the offload computes some experts on the CPU, whose activations
 * keep the checkpoint's order. */
static int up_experts(struct glayer *L, const struct q3_layer *ML, int E, const struct q3_offload *off,
		      struct q3g_stage *sg, cudaStream_t st, q3_err *e)
{
	struct lin *stacks[3] = { &L->egate, &L->eup, &L->edown };
	int n = q3_off_slots(off, ML->idx), err;
	char what[64];

	snprintf(what, sizeof(what), "layer %d experts'", ML->idx);
	if ((err = place_mlp(stacks, ML->experts, E, n, !q3_off_active(off), what, e)))
		return err;
	for (int s = 0; s < n && !err; s++)
		err = q3g_expert_upload(&L->egate.m, &L->eup.m, &L->edown.m, s,
					&ML->experts[Q3_MAX(0, q3_off_slot_expert(off, ML->idx, s))], sg, st, e);
	return err;
}

/* The shared expert (its activations never leave the device: down reads them sorted). */
static int up_shared(struct glayer *L, const struct q3_layer *ML, struct q3g_stage *sg, cudaStream_t st, q3_err *e)
{
	struct lin *stacks[3] = { &L->sgate, &L->sup, &L->sdown };
	char what[64];
	int err;

	snprintf(what, sizeof(what), "layer %d shared expert's", ML->idx);
	if ((err = place_mlp(stacks, &ML->shared, 1, 1, true, what, e)))
		return err;
	return q3g_expert_upload(&L->sgate.m, &L->sup.m, &L->sdown.m, 0, &ML->shared, sg, st, e);
}

static int up_layer(struct cuda_bk *bk, int i, int *nlin, int *nfull, const int *rm_qkvz, const int *rm_ba,
		    struct q3g_stage *sg, q3_err *e)
{
	const struct q3_layer *ML = &bk->m->layers[i];
	struct glayer *L = &bk->layers[i];
	cudaStream_t st = bk->st;
	int err;

	L->lin = L->full = -1;
	if ((err = up_f32(&L->input_norm, ML->input_norm, e)) || (err = up_f32(&L->post_norm, ML->post_norm, e)))
		return err;
	if (ML->kind == Q3_LAYER_LINEAR) {
		L->lin = (*nlin)++;
		if ((err = up_one(&L->qkvz, &ML->qkvz, rm_qkvz, sg, st, e)) ||
		    (err = up_one(&L->ba, &ML->ba, rm_ba, sg, st, e)) ||
		    (err = up_one(&L->lin_out, &ML->lin_out, NULL, sg, st, e)) ||
		    (err = up_f32(&L->conv_w, ML->conv1d, e)) || (err = up_f32(&L->A_log, ML->A_log, e)) ||
		    (err = up_f32(&L->dt_bias, ML->dt_bias, e)) || (err = up_f32(&L->lin_norm, ML->lin_norm, e)))
			return err;
	} else {
		L->full = (*nfull)++;
		if ((err = up_one(&L->q, &ML->q, NULL, sg, st, e)) || (err = up_one(&L->k, &ML->k, NULL, sg, st, e)) ||
		    (err = up_one(&L->v, &ML->v, NULL, sg, st, e)) || (err = up_one(&L->o, &ML->o, NULL, sg, st, e)) ||
		    (err = up_f32(&L->q_norm, ML->q_norm, e)) || (err = up_f32(&L->k_norm, ML->k_norm, e)))
			return err;
	}
	if ((err = up_one(&L->router, &ML->router, NULL, sg, st, e)) ||
	    (err = up_one(&L->shared_gate, &ML->shared_gate, NULL, sg, st, e)) ||
	    (err = up_shared(L, ML, sg, st, e)))
		return err;
	return 0;
}

/* The embedding as bf16 [V][H]. */
static int up_embed(struct cuda_bk *bk, q3_err *e)
{
	const struct q3_tensor *t = bk->m->embed;
	size_t n = q3_tensor_numel(t);
	int err;

	DALLOC(bk->embed, n * 2, "the embedding");
	if (t->dtype == Q3_DT_BF16) {
		CUDA_CHECK(e, cudaMemcpy(bk->embed, t->data, n * 2, cudaMemcpyHostToDevice));
		return 0;
	}
	uint16_t *h = (uint16_t *)malloc(n * 2);

	if (!h)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (size_t i = 0; i < n; i++)
		h[i] = q3_f32_to_bf16(q3_tensor_f32_at(t, i));
	cudaError_t ce = cudaMemcpy(bk->embed, h, n * 2, cudaMemcpyHostToDevice);

	free(h);
	CUDA_CHECK(e, ce);
	return 0;
}

static size_t tab_size(int R, int L, int S)
{
	return ((size_t)(4 * R + L) * sizeof(int) + 15) / 16 * 16 + (size_t)S * sizeof(struct q3g_seq);
}

static int alloc_scratch(struct cuda_bk *bk, q3_err *e)
{
	const struct q3g_dims *d = &bk->d;
	size_t R = (size_t)bk->maxrows, P = R * (d->topk + 1);
	size_t lrows = Q3_MAX((size_t)bk->o.max_batch, (size_t)BK_LOGIT_ROWS), wt = 0;
	int err;

	bk->tab_bytes = tab_size(bk->maxrows, bk->maxrows, Q3_MAX(bk->maxrows, bk->o.max_batch));
	CUDA_CHECK(e, cudaMallocHost(&bk->tab_h, bk->tab_bytes));
	DALLOC(bk->tab_d, bk->tab_bytes, "the call table");
	DALLOC(bk->h, R * d->H * 4, "activations");
	DALLOC(bk->xb, R * d->H * 2, "activations");
	DALLOC(bk->qkvz, R * (2 * d->key_dim + 2 * d->value_dim) * 4, "activations");
	DALLOC(bk->ba, R * 2 * d->Nv * 4, "activations");
	DALLOC(bk->u, R * d->conv_dim * 4, "activations");
	DALLOC(bk->og, R * d->value_dim * 4, "activations");
	DALLOC(bk->core, R * d->value_dim * 2, "activations");
	DALLOC(bk->qg, R * 2 * d->Hq * d->D * 4, "activations");
	DALLOC(bk->kk, R * d->Hkv * d->D * 4, "activations");
	DALLOC(bk->vv, R * d->Hkv * d->D * 4, "activations");
	DALLOC(bk->qb, R * d->Hq * d->D * 2, "activations");
	DALLOC(bk->att, R * d->Hq * d->D * 2, "activations");
	DALLOC(bk->att_o, R * d->Hq * d->D * 4, "activations");
	bk->dec_rows = Q3_MAX(BK_ATT_DECODE_MAX, bk->o.max_batch);
	DALLOC(bk->part, (size_t)bk->dec_rows * d->Hq * Q3G_ATT_SPLITS * (d->D + 2) * 4, "attention splits");
	DALLOC(bk->logits_r, R * d->E * 4, "router logits");
	DALLOC(bk->sg, R * 4, "router logits");
	DALLOC(bk->idx, P * 4, "routing");
	DALLOC(bk->wts, P * 4, "routing");
	DALLOC(bk->act, (size_t)bk->dec_rows * (d->topk + 1) * q3g_moe_lda(d->I, d->Is) * 2, "expert activations");
	DALLOC(bk->moe_ws, q3g_moe_prefill_scratch(bk->maxrows, d), "the prefill MoE");
	DALLOC(bk->logits, lrows * d->V * 4, "logits");
	CUDA_CHECK(e, cudaMallocHost(&bk->logits_h, lrows * d->V * 4));
	DALLOC(bk->samp_ws, q3g_sample_scratch((int)lrows), "sampling");
	{
		size_t o_rows = lrows * sizeof(struct q3g_sampling), o_tok = o_rows + lrows * sizeof(struct q3g_adjust_row);
		size_t o_adj = (o_tok + lrows * 4 + 15) / 16 * 16, bytes = o_adj + Q3_SAMPLE_ADJ_MAX * sizeof(struct q3g_adj);

		CUDA_CHECK(e, cudaHostAlloc(&bk->samp_h, bytes, cudaHostAllocMapped));
		CUDA_CHECK(e, cudaHostGetDevicePointer(&bk->samp_d, bk->samp_h, 0));
		bk->samp_par = (struct q3g_sampling *)bk->samp_h;
		bk->samp_rows = (struct q3g_adjust_row *)((char *)bk->samp_h + o_rows);
		bk->samp_tok = (int32_t *)((char *)bk->samp_h + o_tok);
		bk->samp_adj = (struct q3g_adj *)((char *)bk->samp_h + o_adj);
		bk->samp_cp_bytes = o_tok; /* samp_par, samp_rows */
		DALLOC(bk->samp_cp, o_tok, "sampling parameters");
	}
	/* the largest dense Linear expanded for cuBLAS */
	for (int i = 0; i < bk->c->num_layers; i++) {
		const struct glayer *L = &bk->layers[i];
		const struct lin *ls[] = { &L->qkvz, &L->ba, &L->lin_out, &L->q, &L->k, &L->v, &L->o,
					   &L->router, &L->shared_gate };

		for (size_t j = 0; j < Q3_ARRAY_SIZE(ls); j++)
			if (ls[j]->mem)
				wt = Q3_MAX(wt, (size_t)ls[j]->m.N * ls[j]->m.K);
	}
	DALLOC(bk->wtmp, wt * 2, "expanded weights");
	DALLOC(bk->xf, R * d->H * 4, "the router's input");
	DALLOC(bk->wtmp32, (size_t)Q3_MAX(d->E, 1) * d->H * 4, "the router's expanded weights");
	/* prefill attention: scores for up to 64 Mi elements per pass */
	bk->att_elems = Q3_MAX((size_t)64 << 20, (size_t)(d->Hq / d->Hkv) * bk->o.max_ctx);
	DALLOC(bk->att_s, bk->att_elems * 4, "attention scores");
	DALLOC(bk->att_p, bk->att_elems * 2, "attention scores");
	return 0;
}

static int state_alloc(struct cuda_bk *bk, struct gstate *s, q3_err *e)
{
	size_t bytes = bk->kv_elems * 2 + (2 * bk->conv_elems + bk->rec_elems) * 4;
	char *c;
	int err;

	memset(s, 0, sizeof(*s));
	if ((err = dalloc(&s->mem, bytes, "a session", e)))
		return err;
	c = (char *)s->mem;
	s->kv = (uint16_t *)c;
	c += (bk->kv_elems * 2 + 15) / 16 * 16;
	s->conv[0] = (float *)c;
	s->conv[1] = s->conv[0] + bk->conv_elems;
	s->rec = s->conv[1] + bk->conv_elems;
	return 0;
}

/* After the dense weights (dense bytes of device memory) and the scratch: the offload plan, then
 * the routed experts it keeps in VRAM. */
static int up_all_experts(struct cuda_bk *bk, uint64_t dense, struct q3g_stage *sg, q3_err *e)
{
	const struct q3_config *c = bk->c;
	const struct q3_expert *x0 = &bk->m->layers[0].experts[0];
	const struct q3_linear *ls[3] = { &x0->gate, &x0->up, &x0->down };
	struct q3_off_opts oo;
	size_t fr = 0, tot = 0;
	char busid[32] = "";
	const char *env = getenv("QWEN3D_VRAM_BUDGET");
	int err;

	memset(&oo, 0, sizeof(oo));
	for (int i = 0; i < 3; i++) {
		struct q3g_mat_plan p;

		if ((err = q3g_mat_plan(&ls[i], 1, &p, e)))
			return err;
		oo.expert_bytes += q3g_mat_bytes(&p);
	}
	cudaMemGetInfo(&fr, &tot);
	cudaDeviceGetPCIBusId(busid, sizeof(busid), q3g_dev.id);
	oo.vram_budget = bk->o.vram_budget;
	if (!oo.vram_budget && env && q3_parse_size(env, &oo.vram_budget))
		return q3_errf(e, -EINVAL, "QWEN3D_VRAM_BUDGET='%s' is not a size (like 20GiB)", env);
	oo.dense_bytes = dense;
	oo.free_bytes = fr;
	/* sessions (KV + states) for a full batch, CUDA graphs and the context's own growth */
	oo.reserve_bytes = (uint64_t)bk->o.max_batch * (bk->kv_elems * 2 + (2 * bk->conv_elems + bk->rec_elems) * 4) +
			   (512ull << 20);
	oo.max_rows = bk->dec_rows;
	oo.gpu_busid = busid;
	oo.threads = bk->o.expert_threads;
	oo.cache = bk->o.expert_cache;
	oo.stats_path = bk->o.expert_stats;
	oo.quiet = bk->o.quiet;
	if ((err = q3_off_open(&bk->off, bk->m, &oo, e)))
		return err;
	for (int i = 0; i < c->num_layers; i++) {
		struct glayer *L = &bk->layers[i];
		const struct q3_layer *ML = &bk->m->layers[i];

		if ((err = up_experts(L, ML, c->num_experts, bk->off, sg, bk->st, e)))
			return err;
	}
	DALLOC(bk->sidx, (size_t)bk->maxrows * (c->top_k + 1) * 4, "routing");
	return 0;
}

static int cuda_open_inner(struct cuda_bk *bk, q3_err *e)
{
	const struct q3_config *c = bk->c;
	struct q3g_stage sg = { NULL, NULL, BK_STAGE_BYTES };
	int *rm_qkvz = NULL, *rm_ba = NULL, nlin = 0, nfull = 0, err;
	size_t free0 = 0, free1 = 0, tot0 = 0;
	double t0 = q3_now();

	if ((err = q3g_init(e)))
		return err;
	CUDA_CHECK(e, cudaStreamCreateWithFlags(&bk->st, cudaStreamNonBlocking));
	if (cublasCreate(&bk->cb) != CUBLAS_STATUS_SUCCESS)
		return q3_errf(e, -EIO, "cuda backend: cublasCreate failed");
	/* a fixed cuBLAS workspace: no allocation inside a step */
	DALLOC(bk->cb_ws, 32u << 20, "the cuBLAS workspace");
	/* the stream first: cublasSetStream resets the workspace to cuBLAS's default pool */
	if (cublasSetStream(bk->cb, bk->st) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetWorkspace(bk->cb, bk->cb_ws, 32u << 20) != CUBLAS_STATUS_SUCCESS)
		return q3_errf(e, -EIO, "cuda backend: cuBLAS setup failed");
	fill_dims(bk);
	bk->kv_elems = (size_t)c->num_full_layers * 2 * bk->o.max_ctx * c->kv_dim;
	bk->conv_elems = (size_t)c->num_linear_layers * (c->conv_kernel - 1) * c->conv_dim;
	bk->rec_elems = (size_t)c->num_linear_layers * c->lin_num_v_heads * c->lin_k_dim * c->lin_v_dim;

	CUDA_CHECK(e, cudaMallocHost(&sg.host, sg.bytes));
	if ((err = dalloc(&sg.dev, sg.bytes, "the upload stage", e)))
		goto out;
	rm_qkvz = (int *)malloc(sizeof(int) * (size_t)c->qkvz_dim);
	rm_ba = (int *)malloc(sizeof(int) * (size_t)c->ba_dim);
	bk->layers = (struct glayer *)calloc((size_t)c->num_layers, sizeof(*bk->layers));
	if (!rm_qkvz || !rm_ba || !bk->layers) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto out;
	}
	gdn_rowmaps(c, rm_qkvz, rm_ba);
	cudaMemGetInfo(&free0, &tot0);
	for (int i = 0; i < c->num_layers; i++) {
		if ((err = up_layer(bk, i, &nlin, &nfull, rm_qkvz, rm_ba, &sg, e)))
			goto out;
		if (!bk->o.quiet && c->num_layers >= 8 && (i + 1) % 8 == 0)
			q3_info("cuda backend: %d / %d layers on the device (%.1f s)", i + 1, c->num_layers, q3_now() - t0);
	}
	if ((err = up_embed(bk, e)) || (err = up_f32(&bk->final_norm, bk->m->final_norm, e)) ||
	    (err = up_one(&bk->lm_head, &bk->m->lm_head, NULL, &sg, bk->st, e)))
		goto out;
	cudaMemGetInfo(&free1, &tot0);
	bk->maxrows = Q3_MAX(bk->o.max_tokens, bk->o.max_batch);
	if ((err = alloc_scratch(bk, e)) || (err = state_alloc(bk, &bk->dummy, e)) ||
	    (err = up_all_experts(bk, free0 > free1 ? free0 - free1 : 0, &sg, e)))
		goto out;
	bk->no_graphs = getenv("QWEN3D_NO_GRAPHS") != NULL;
	if (!bk->o.quiet) {
		size_t fr = 0, tot = 0;

		cudaMemGetInfo(&fr, &tot);
		q3_info("cuda backend: weights on device %d in %.1f s; %zu of %zu MiB in use", q3g_dev.id, q3_now() - t0,
			(tot - fr) >> 20, tot >> 20);
	}
out:
	free(rm_qkvz);
	free(rm_ba);
	cudaFree(sg.dev);
	cudaFreeHost(sg.host);
	return err;
}

static int cuda_open(const struct q3_model *m, const struct q3_backend_opts *o, void **out, q3_err *e)
{
	struct cuda_bk *bk = (struct cuda_bk *)calloc(1, sizeof(*bk));
	int err;

	*out = NULL;
	if (!bk)
		return q3_errf(e, -ENOMEM, "out of memory");
	bk->m = m;
	bk->c = m->cfg;
	bk->o = *o;
	if (o->max_ctx < 1 || o->max_batch < 1 || o->max_tokens < o->max_batch) {
		free(bk);
		return q3_errf(e, -EINVAL, "cuda backend: bad options (max_ctx %d, max_batch %d, max_tokens %d)",
			       o->max_ctx, o->max_batch, o->max_tokens);
	}
	if ((err = cuda_open_inner(bk, e))) {
		cuda_close(bk);
		return err;
	}
	*out = bk;
	return 0;
}

/* ---- sessions ------------------------------------------------------------------------------- */

static int cuda_state_new(void *p, void **out, q3_err *e)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;
	struct gstate *s = (struct gstate *)calloc(1, sizeof(*s));
	int err;

	*out = NULL;
	if (!s)
		return q3_errf(e, -ENOMEM, "out of memory");
	if ((err = state_alloc(bk, s, e))) {
		free(s);
		return err;
	}
	*out = s;
	return 0;
}

static void cuda_state_free(void *p, void *st)
{
	struct gstate *s = (struct gstate *)st;

	if (!s)
		return;
	cudaFree(s->mem);
	free(s);
}

static int cuda_state_copy(void *p, void *dst, const void *src, int pos, q3_err *e)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;
	struct gstate *d = (struct gstate *)dst;
	const struct gstate *s = (const struct gstate *)src;
	size_t kvd = bk->c->kv_dim, layer = (size_t)bk->o.max_ctx * kvd;

	for (int f = 0; f < bk->c->num_full_layers; f++)
		for (int w = 0; w < 2; w++)
			CUDA_CHECK(e, cudaMemcpyAsync(d->kv + (2 * (size_t)f + w) * layer,
						      s->kv + (2 * (size_t)f + w) * layer, (size_t)pos * kvd * 2,
						      cudaMemcpyDeviceToDevice, bk->st));
	CUDA_CHECK(e, cudaMemcpyAsync(d->conv[0], s->conv[0], (2 * bk->conv_elems + bk->rec_elems) * 4,
				      cudaMemcpyDeviceToDevice, bk->st));
	d->parity = s->parity;
	CUDA_CHECK(e, cudaStreamSynchronize(bk->st));
	return 0;
}

static void cuda_set_trace(void *p, q3_trace_fn fn, void *ctx)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;

	bk->trace = fn;
	bk->trace_ctx = ctx;
}

/* ---- the forward pass ---------------------------------------------------------------------- */

/* Where the call table's parts live for R rows, L logit rows, S sequences. */
struct tab {
	int32_t *ids;
	int *row_seq, *row_pos, *lrows;
	struct q3g_seq *seq;
};

static struct tab tab_at(void *base, int R, int L)
{
	struct tab t;
	char *c = (char *)base;

	t.ids = (int32_t *)c;
	t.row_seq = (int *)c + R;
	t.row_pos = (int *)c + 2 * R;
	t.lrows = (int *)c + 3 * R;
	t.seq = (struct q3g_seq *)(c + ((size_t)(4 * R + L) * sizeof(int) + 15) / 16 * 16);
	return t;
}

/* Linears on R rows: the matvec for a few rows, cuBLAS for many. */
static int linears(struct cuda_bk *bk, const struct q3g_job *jobs, int n, int R, q3_err *e)
{
	int err;

	if (R <= BK_MMV_ROWS) {
		/* a few rows: the matvec, 16 rows per pass (weights re-read per pass, never expanded) */
		for (int r0 = 0; r0 < R; r0 += Q3G_MMV_MAX_TOK) {
			struct q3g_job c[Q3G_MMV_MAX_JOBS];

			for (int i = 0; i < n; i++) {
				c[i] = jobs[i];
				if (c[i].xh)
					c[i].xh += (size_t)r0 * jobs[i].ldx;
				else
					c[i].x += (size_t)r0 * jobs[i].ldx;
				c[i].y += (size_t)r0 * jobs[i].ldy;
			}
			if ((err = q3g_mmv(c, n, Q3_MIN(Q3G_MMV_MAX_TOK, R - r0), bk->st, e)))
				return err;
		}
		return 0;
	}
	for (int i = 0; i < n; i++)
		if ((err = q3g_gemm(bk->cb, &jobs[i], R, bk->wtmp, bk->st, e)))
			return err;
	return 0;
}

static struct q3g_job job(const struct lin *l, const uint16_t *x, int ldx, float *y, int ldy, int epi)
{
	struct q3g_job j;

	memset(&j, 0, sizeof(j));
	j.w = l->m;
	j.x = x;
	j.y = y;
	j.ldx = ldx;
	j.ldy = ldy;
	j.epi = epi;
	return j;
}

struct call {
	int R, nseq, maxn, nl; /* rows, sequences, longest sequence, logit rows */
	struct q3g_rows rows;	/* device pointers */
	const struct q3g_seq *seq_h; /* host copies (prefill attention) */
	bool decode;
	bool fuse_norm; /* the Linears and the MoE normalize the residual stream while staging it */
	bool capture;	/* run_layers is being captured into a graph */
	bool samp;	/* decode draws on the device (q3_fwd_seq.sample) instead of logits */
};

/* The job reading the normed residual stream: x = xb, or (fuse_norm) h normalized in place. */
static struct q3g_job job_in(struct cuda_bk *bk, const struct call *k, const struct lin *l, const float *normw,
			     float *y, int ldy)
{
	struct q3g_job j = job(l, bk->xb, bk->d.H, y, ldy, Q3G_EPI_STORE);

	if (k->fuse_norm) {
		j.xh = bk->h;
		j.normw = normw;
		j.eps = bk->d.eps;
	}
	return j;
}

static int layer_linear(struct cuda_bk *bk, const struct glayer *L, const struct call *k, q3_err *e)
{
	const struct q3g_dims *d = &bk->d;
	int qd = 2 * d->key_dim + 2 * d->value_dim, H = d->H, err;
	struct q3g_job j[2] = { job_in(bk, k, &L->qkvz, L->input_norm, bk->qkvz, qd),
				job_in(bk, k, &L->ba, L->input_norm, bk->ba, 2 * d->Nv) };

	if ((err = linears(bk, j, 2, k->R, e)))
		return err;
	if (k->decode) {
		/* one kernel: conv step, gates, recurrence, gated norm */
		err = q3g_delta_decode(bk->qkvz, qd, L->conv_w, bk->ba, L->A_log, L->dt_bias, bk->core,
				       bk->qkvz + d->conv_dim, qd, L->lin_norm, k->rows, k->nseq, L->lin, d, bk->st, e);
	} else {
		err = q3g_conv1d_silu(bk->u, bk->qkvz, qd, L->conv_w, k->rows, k->R, k->nseq, L->lin, d, bk->st, e);
		if (!err)
			err = q3g_delta(bk->u, bk->ba, L->A_log, L->dt_bias, bk->og, k->rows, k->nseq, L->lin, d, bk->st, e);
		if (!err)
			err = q3g_gated_rmsnorm(bk->core, bk->og, bk->qkvz + d->conv_dim, qd, L->lin_norm, k->R, d->Nv,
						d->Dv, d->eps, bk->st, e);
	}
	if (err)
		return err;
	j[0] = job(&L->lin_out, bk->core, d->value_dim, bk->h, H, Q3G_EPI_ADD);
	return linears(bk, j, 1, k->R, e);
}

static int layer_full(struct cuda_bk *bk, const struct glayer *L, const struct call *k, q3_err *e)
{
	const struct q3g_dims *d = &bk->d;
	int H = d->H, qd = d->Hq * d->D, kvd = d->Hkv * d->D, err;
	struct q3g_job j[3] = { job_in(bk, k, &L->q, L->input_norm, bk->qg, 2 * qd),
				job_in(bk, k, &L->k, L->input_norm, bk->kk, kvd),
				job_in(bk, k, &L->v, L->input_norm, bk->vv, kvd) };

	if ((err = linears(bk, j, 3, k->R, e)) ||
	    (err = q3g_attn_prep(bk->qb, bk->qg, bk->kk, bk->vv, L->q_norm, L->k_norm, k->rows, k->R, L->full, d,
				 bk->st, e)))
		return err;
	if (k->maxn <= BK_ATT_DECODE_MAX && k->R <= bk->dec_rows) {
		err = q3g_attn_decode(bk->att, bk->qb, bk->qg, bk->part, k->rows, k->R, L->full, d, bk->st, e);
	} else {
		for (int s = 0; s < k->nseq && !err; s++)
			err = q3g_attn_prefill(bk->cb, bk->att, bk->qb, bk->qg, &k->seq_h[s], L->full, bk->att_s, bk->att_p,
					       bk->att_o, bk->att_elems, d, bk->st, e);
	}
	if (err)
		return err;
	j[0] = job(&L->o, bk->att, qd, bk->h, H, Q3G_EPI_ADD);
	return linears(bk, j, 1, k->R, e);
}

/* The MoE block of layer li.  With experts beyond VRAM (cuda_offload.h): in decode the routing and
 * activations go to the CPU threads, the GPU computes its resident experts (slots) and the shared
 * one meanwhile, then adds the CPU's part; in prefill the missing experts are streamed in. */
static int layer_moe(struct cuda_bk *bk, int li, const struct glayer *L, const struct call *k, q3_err *e)
{
	const struct q3g_dims *d = &bk->d;
	int H = d->H, lda = q3g_moe_lda(d->I, d->Is), err;
	struct q3g_job j[2] = { job_in(bk, k, &L->router, L->post_norm, bk->logits_r, d->E),
				job_in(bk, k, &L->shared_gate, L->post_norm, bk->sg, 1) };
	/* with experts on the CPU the threads read the normed activations xb, which run_layers then
	 * writes even when the norm is otherwise fused */
	bool off = q3_off_layer_cpu(bk->off, li), fuse = k->fuse_norm && !off, xb_ready = !fuse;
	const int *ix = off ? bk->sidx : bk->idx;

	/* routing decisions from fp32 inputs (dense router and gate, the usual case; the router
	 * then writes the experts' normalized input xb as well), else the Linears' fp16 path */
	if (L->router.m.fmt == Q3G_F16 && L->shared_gate.m.fmt == Q3G_F16 && !getenv("QWEN3D_ROUTER_F16")) {
		err = q3g_router(bk->cb, bk->logits_r, bk->sg, bk->idx, bk->wts, d->E, d->topk, d->norm_topk,
				 bk->h, L->post_norm, d->eps, &L->router.m, &L->shared_gate.m, k->R, H, bk->xf,
				 bk->wtmp32, fuse ? bk->xb : NULL, bk->st, e);
		xb_ready = true;
	} else if (!(err = linears(bk, j, 2, k->R, e)))
		err = q3g_router_topk(bk->idx, bk->wts, bk->logits_r, bk->sg, k->R, d->E, d->topk, d->norm_topk, bk->st, e);
	if (err)
		return err;
	if (k->R <= bk->dec_rows) {
		if (off && (err = q3_off_publish(bk->off, li, bk->idx, bk->wts, bk->xb, bk->sidx, k->R, bk->st, e)))
			return err;
		err = !xb_ready ? q3g_moe_up_norm(bk->act, bk->h, L->post_norm, d->eps, ix, &L->egate.m, &L->eup.m,
						  &L->sgate.m, &L->sup.m, k->R, d->topk, H, lda, bk->st, e)
				: q3g_moe_up(bk->act, bk->xb, ix, &L->egate.m, &L->eup.m, &L->sgate.m, &L->sup.m, k->R, d->topk,
					H, lda, bk->st, e);
		if (err ||
		    (err = q3g_moe_down(bk->h, bk->act, ix, bk->wts, &L->edown.m, &L->sdown.m, k->R, d->topk, H, lda,
					bk->st, e)))
			return err;
		return off ? q3_off_join(bk->off, li, bk->h, k->R, bk->st, e) : 0;
	}
	if (off)
		return q3_off_prefill(bk->off, li, bk->h, bk->xb, bk->idx, bk->wts, bk->sidx, &L->egate.m, &L->eup.m,
				      &L->edown.m, &L->sgate.m, &L->sup.m, &L->sdown.m, k->R, d, bk->moe_ws, bk->st, e);
	return q3g_moe_prefill(bk->h, bk->xb, bk->idx, bk->wts, &L->egate.m, &L->eup.m, &L->edown.m, &L->sgate.m,
			       &L->sup.m, &L->sdown.m, k->R, d, bk->moe_ws, bk->st, e);
}

static int do_trace(struct cuda_bk *bk, int layer, int R, q3_err *e)
{
	size_t n = (size_t)R * bk->d.H;

	if (!bk->trace_h && !(bk->trace_h = (float *)malloc((size_t)bk->maxrows * bk->d.H * 4)))
		return q3_errf(e, -ENOMEM, "out of memory");
	CUDA_CHECK(e, cudaMemcpyAsync(bk->trace_h, bk->h, n * 4, cudaMemcpyDeviceToHost, bk->st));
	CUDA_CHECK(e, cudaStreamSynchronize(bk->st));
	bk->trace(bk->trace_ctx, layer, bk->trace_h, R, bk->d.H);
	return 0;
}

/* Everything of one call after the table is on the device: layers, final norm, lm_head of the
 * first min(nl, BK_LOGIT_ROWS·chunks) logit rows into bk->logits, and the copy to logits_h. */
static int run_layers(struct cuda_bk *bk, const struct call *k, q3_err *e)
{
	const struct q3g_dims *d = &bk->d;
	int err;

	if ((err = q3g_embed(bk->h, bk->embed, k->rows, k->R, d->H, bk->st, e)))
		return err;
	if (bk->trace && (err = do_trace(bk, -1, k->R, e)))
		return err;
	for (int i = 0; i < bk->c->num_layers; i++) {
		const struct glayer *L = &bk->layers[i];

		/* the norms are separate kernels unless the consumers normalize while staging */
		if ((!k->fuse_norm &&
		     (err = q3g_add_rmsnorm(bk->h, NULL, bk->xb, L->input_norm, NULL, k->R, d->H, d->eps, bk->st, e))) ||
		    (err = L->lin >= 0 ? layer_linear(bk, L, k, e) : layer_full(bk, L, k, e)) ||
		    ((!k->fuse_norm || q3_off_layer_cpu(bk->off, i)) &&
		     (err = q3g_add_rmsnorm(bk->h, NULL, bk->xb, L->post_norm, NULL, k->R, d->H, d->eps, bk->st, e))) ||
		    (err = layer_moe(bk, i, L, k, e)))
			return err;
		/* eager decode: the layer's CPU job, once its GPU work is queued (a graph's are armed
		 * after the launch) */
		if (!k->capture && k->R <= bk->dec_rows && (err = q3_off_cpu_layer(bk->off, i, e)))
			return err;
		if (bk->trace && (err = do_trace(bk, i, k->R, e)))
			return err;
	}
	return 0;
}

/* The device address of p, a pointer into the mapped sampling buffers. */
template <typename T> static T *samp_dev(const struct cuda_bk *bk, T *p)
{
	return (T *)((char *)bk->samp_d + ((char *)p - (char *)bk->samp_h));
}

/* ... and of p's device copy (samp_par, samp_rows: samp_cp) */
template <typename T> static T *samp_copy(const struct cuda_bk *bk, T *p)
{
	return (T *)((char *)bk->samp_cp + ((char *)p - (char *)bk->samp_h));
}

/* Final norm and lm_head for logit rows [l0, l0 + n) (n <= rows of bk->logits), then the copy
 * of their logits to the pinned host buffer, or (samp) each row's draw into samp_tok. */
static int head_rows(struct cuda_bk *bk, const int *lrows_d, int l0, int n, bool samp, q3_err *e)
{
	const struct q3g_dims *d = &bk->d;
	int err;

	if ((err = q3g_add_rmsnorm(bk->h, NULL, bk->xb, bk->final_norm, lrows_d + l0, n, d->H, d->eps, bk->st, e)))
		return err;
	for (int r0 = 0; r0 < n; r0 += BK_LOGIT_ROWS) {
		int nr = Q3_MIN(BK_LOGIT_ROWS, n - r0);
		struct q3g_job j = job(&bk->lm_head, bk->xb + (size_t)r0 * d->H, d->H, bk->logits + (size_t)r0 * d->V, d->V,
				       Q3G_EPI_STORE);

		if ((err = q3g_mmv(&j, 1, nr, bk->st, e)))
			return err;
	}
	if (samp) { /* only the ids come back: 4 bytes a row instead of 4 V */
		CUDA_CHECK(e, cudaMemcpyAsync(bk->samp_cp, bk->samp_h, bk->samp_cp_bytes, cudaMemcpyHostToDevice, bk->st));
		if ((err = q3g_logits_adjust(bk->logits, d->V, samp_copy(bk, bk->samp_rows), n, bk->st, e)))
			return err;
		return q3g_sample(samp_dev(bk, bk->samp_tok), bk->logits, samp_copy(bk, bk->samp_par), n, d->V,
				  bk->samp_ws, bk->st, e);
	}
	CUDA_CHECK(e, cudaMemcpyAsync(bk->logits_h, bk->logits, (size_t)n * d->V * 4, cudaMemcpyDeviceToHost, bk->st));
	return 0;
}

/* The draws of rows [0, nrows) into the mapped buffers: row s < nseq from seqs[s].sample, the
 * padding rows of a graph greedy with nothing to adjust. */
static int samp_fill(struct cuda_bk *bk, const struct q3_fwd_seq *seqs, int nseq, int nrows, q3_err *e)
{
	int used = 0;

	for (int s = 0; s < nrows; s++) {
		struct q3g_sampling *p = &bk->samp_par[s];
		struct q3g_adjust_row *a = &bk->samp_rows[s];

		memset(p, 0, sizeof(*p));
		a->adj = samp_dev(bk, bk->samp_adj + used);
		a->nbias = a->npen = 0;
		if (s >= nseq)
			continue; /* temperature 0: greedy */
		const struct q3_sample_row *r = seqs[s].sample;
		int n = r->nbias + r->npen;

		if (r->nbias < 0 || r->npen < 0 || n > Q3_SAMPLE_ADJ_MAX - used)
			return q3_errf(e, -ENOSPC, "cuda backend: sequence %d: %d logit adjustments (a step takes %d)", s,
				       n, Q3_SAMPLE_ADJ_MAX);
		*p = (struct q3g_sampling){ r->temperature, r->top_p, r->top_k, r->min_p, r->seed, r->step };
		static_assert(sizeof(struct q3g_adj) == sizeof(struct q3_logit_adj), "q3g_adj mirrors q3_logit_adj");
		memcpy(bk->samp_adj + used, r->adj, (size_t)n * sizeof(struct q3g_adj));
		a->nbias = r->nbias;
		a->npen = r->npen;
		used += n;
	}
	return 0;
}

static int bucket(int n)
{
	static const int b[] = { 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256 };

	for (size_t i = 0; i < Q3_ARRAY_SIZE(b); i++)
		if (n <= b[i])
			return b[i];
	return (n + 63) / 64 * 64;
}

/* Fills the host table for the given sequences (padded to R = B rows / sequences with the
 * scratch session when B > nseq) and returns the call. */
static struct call fill_table(struct cuda_bk *bk, const struct q3_fwd_seq *seqs, int nseq, int B, bool graph,
			      void *base, void *dbase)
{
	struct call k;
	int R = 0, nl = 0;

	memset(&k, 0, sizeof(k));
	for (int s = 0; s < nseq; s++)
		R += seqs[s].n;
	if (B > nseq)
		R += B - nseq;
	for (int s = 0; s < nseq; s++)
		if (seqs[s].logits || seqs[s].sample)
			nl += seqs[s].all_logits ? seqs[s].n : 1;
	if (graph)
		nl = B; /* a graph computes the logits of every row (one per sequence); unwanted ones are dropped */
	struct tab t = tab_at(base, R, Q3_MAX(nl, 1)), td = tab_at(dbase, R, Q3_MAX(nl, 1));
	int r = 0, l = 0;

	for (int s = 0; s < Q3_MAX(nseq, B); s++) {
		bool pad = s >= nseq;
		const struct gstate *gs = pad ? &bk->dummy : (const struct gstate *)seqs[s].state;
		int n = pad ? 1 : seqs[s].n, pos = pad ? 0 : seqs[s].pos;
		struct q3g_seq *q = &t.seq[s];

		q->row0 = r;
		q->n = n;
		q->pos = pos;
		q->pad = 0;
		q->kv = gs->kv;
		q->conv_rd = gs->conv[gs->parity];
		q->conv_wr = gs->conv[gs->parity ^ 1];
		q->rec = gs->rec;
		for (int i = 0; i < n; i++, r++) {
			t.ids[r] = pad ? 0 : seqs[s].ids[i];
			t.row_seq[r] = s;
			t.row_pos[r] = pos + i;
		}
		if (graph)
			t.lrows[l++] = r - 1;
		else if (!pad && (seqs[s].logits || seqs[s].sample)) {
			if (seqs[s].all_logits)
				for (int i = 0; i < n; i++)
					t.lrows[l++] = r - n + i;
			else
				t.lrows[l++] = r - 1;
		}
		k.maxn = Q3_MAX(k.maxn, n);
	}
	k.R = R;
	k.nseq = Q3_MAX(nseq, B);
	k.nl = nl;
	k.rows.ids = td.ids;
	k.rows.row_seq = td.row_seq;
	k.rows.row_pos = td.row_pos;
	k.rows.seq = td.seq;
	k.seq_h = t.seq;
	return k;
}

static size_t call_tab_bytes(const struct call *k)
{
	return tab_size(k->R, Q3_MAX(k->nl, 1), k->nseq);
}

/* The graph of batch bucket B (captured on first use). */
static int graph_for(struct cuda_bk *bk, int B, const struct call *k, cudaGraphExec_t *out, q3_err *e)
{
	cudaGraph_t g = NULL;
	cudaGraphExec_t ex = NULL;
	int err = 0;

	for (int i = 0; i < bk->ngraphs; i++)
		if (bk->graphs[i].B == B && bk->graphs[i].samp == k->samp) {
			*out = bk->graphs[i].exec;
			return 0;
		}
	if (bk->ngraphs == BK_MAX_GRAPHS)
		return q3_errf(e, -ENOSPC, "cuda backend: too many decode graphs");
	struct call kc = *k;

	kc.capture = true;
	k = &kc;
	CUDA_CHECK(e, cudaStreamBeginCapture(bk->st, cudaStreamCaptureModeThreadLocal));
	err = cudaMemcpyAsync(bk->tab_d, bk->tab_h, call_tab_bytes(k), cudaMemcpyHostToDevice, bk->st) == cudaSuccess
		      ? 0
		      : q3_errf(e, -EIO, "cuda backend: table copy in capture failed");
	if (!err)
		err = run_layers(bk, k, e);
	if (!err)
		err = head_rows(bk, tab_at(bk->tab_d, k->R, k->nl).lrows, 0, k->nl, k->samp, e);
	cudaError_t ce = cudaStreamEndCapture(bk->st, &g);

	if (err) {
		if (g)
			cudaGraphDestroy(g);
		return err;
	}
	CUDA_CHECK(e, ce);
	ce = cudaGraphInstantiate(&ex, g, 0);
	cudaGraphDestroy(g);
	CUDA_CHECK(e, ce);
	bk->graphs[bk->ngraphs].B = B;
	bk->graphs[bk->ngraphs].samp = k->samp;
	bk->graphs[bk->ngraphs++].exec = ex;
	*out = ex;
	return 0;
}

static void copy_logits_out(struct cuda_bk *bk, const struct q3_fwd_seq *seqs, int nseq, int l0, int nl_chunk,
			    int *lcursor)
{
	/* logit rows were assigned to sequences in order; lcursor counts rows handed out so far */
	size_t V = (size_t)bk->d.V;
	int l = 0;

	for (int s = 0; s < nseq; s++) {
		int n = !seqs[s].logits ? 0 : seqs[s].all_logits ? seqs[s].n : 1;

		for (int i = 0; i < n; i++, l++)
			if (l >= l0 && l < l0 + nl_chunk)
				memcpy(seqs[s].logits + (size_t)i * V, bk->logits_h + (size_t)(l - l0) * V, V * 4);
	}
	*lcursor = l0 + nl_chunk;
}

static int forward_inner(struct cuda_bk *bk, const struct q3_fwd_seq *seqs, int nseq, q3_err *e)
{
	bool decode = true, samp = seqs[0].sample != NULL;
	int err, B = nseq, lcur = 0;

	for (int s = 0; s < nseq; s++) {
		decode &= seqs[s].n == 1;
		if ((seqs[s].sample != NULL) != samp || (samp && (seqs[s].n != 1 || seqs[s].logits || !seqs[s].token)))
			return q3_errf(e, -EINVAL, "cuda backend: sequence %d: a step draws on the device for every "
					       "sequence or none, one token each, without logits", s);
	}
	if (decode && !bk->no_graphs && !bk->trace) {
		/* clamp to the largest batch rather than falling back to nseq: every size between the
		 * last bucket and max_batch would otherwise get its own graph (BK_MAX_GRAPHS) */
		B = Q3_MIN(bucket(nseq), Q3_MIN(bk->maxrows, Q3_MAX(bk->o.max_batch, BK_LOGIT_ROWS)));
		B = Q3_MAX(B, nseq);
	}
	bool graph = decode && !bk->no_graphs && !bk->trace && B >= nseq;
	struct call k = fill_table(bk, seqs, nseq, graph ? B : nseq, graph, bk->tab_h, bk->tab_d);

	k.decode = decode;
	k.samp = samp;
	k.fuse_norm = k.R <= Q3_MIN(BK_FUSED_NORM_ROWS, bk->dec_rows) && !getenv("QWEN3D_NO_FUSED_NORM");
	if (k.R > bk->maxrows)
		return q3_errf(e, -EINVAL, "cuda backend: %d rows in one call (at most %d)", k.R, bk->maxrows);
	if (graph) {
		cudaGraphExec_t ex = NULL;

		if ((err = graph_for(bk, B, &k, &ex, e)) || (samp && (err = samp_fill(bk, seqs, nseq, B, e))))
			return err;
		q3_off_begin(bk->off, k.R, nseq);
		CUDA_CHECK(e, cudaGraphLaunch(ex, bk->st));
		for (int i = 0; i < bk->c->num_layers; i++)
			if ((err = q3_off_cpu_layer(bk->off, i, e)))
				return err;
		if ((err = q3_off_cpu_end(bk->off, e)))
			return err;
		CUDA_CHECK(e, cudaStreamSynchronize(bk->st));
		for (int s = 0; s < nseq; s++)
			if (samp)
				*seqs[s].token = bk->samp_tok[s];
			else if (seqs[s].logits)
				memcpy(seqs[s].logits, bk->logits_h + (size_t)s * bk->d.V, (size_t)bk->d.V * 4);
		return 0;
	}
	if (samp && (err = samp_fill(bk, seqs, nseq, k.nl, e)))
		return err;
	CUDA_CHECK(e, cudaMemcpyAsync(bk->tab_d, bk->tab_h, call_tab_bytes(&k), cudaMemcpyHostToDevice, bk->st));
	q3_off_begin(bk->off, k.R, k.R);
	if ((err = run_layers(bk, &k, e)) || (err = q3_off_cpu_end(bk->off, e)))
		return err;
	const int *lrows_d = tab_at(bk->tab_d, k.R, Q3_MAX(k.nl, 1)).lrows;
	int lrows_cap = Q3_MAX(bk->o.max_batch, BK_LOGIT_ROWS);

	for (int l0 = 0; l0 < k.nl; l0 += lrows_cap) {
		int n = Q3_MIN(lrows_cap, k.nl - l0);

		if ((err = head_rows(bk, lrows_d, l0, n, samp, e)))
			return err;
		CUDA_CHECK(e, cudaStreamSynchronize(bk->st));
		if (!samp)
			copy_logits_out(bk, seqs, nseq, l0, n, &lcur);
	}
	CUDA_CHECK(e, cudaStreamSynchronize(bk->st));
	for (int s = 0; samp && s < nseq; s++) /* a decode step: row s is sequence s */
		*seqs[s].token = bk->samp_tok[s];
	return 0;
}

static int cuda_forward(void *p, const struct q3_fwd_seq *seqs, int nseq, q3_err *e)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;
	int err;

	/* a profiler started with profiling off (ncu --profile-from-start off) sees the forward
	 * passes, not the thousands of repacking launches of the load (tools/gpu_profile.sh) */
	if (!bk->profiled) {
		if (cudaProfilerStart() != cudaSuccess)
			cudaGetLastError(); /* no profiler API here: nothing to report */
		bk->profiled = true;
	}
	err = forward_inner(bk, seqs, nseq, e);

	if (err) {
		q3_off_abort(bk->off); /* no GPU wait may outlive the call */
		cudaStreamSynchronize(bk->st);
		cudaGetLastError();
		return err;
	}
	for (int s = 0; s < nseq; s++) {
		struct gstate *gs = (struct gstate *)seqs[s].state;

		gs->parity ^= 1;
	}
	return 0;
}

static void cuda_stats(void *p, struct q3_engine_stats *s)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;
	struct q3_off_stats os;

	q3_off_stats(bk->off, &os);
	s->offload = os.active;
	s->experts_vram = os.experts_vram;
	s->experts_total = os.experts_total;
	s->vram_budget = os.budget_bytes;
	s->pairs_vram = os.pairs_gpu;
	s->pairs_cpu = os.pairs_cpu;
	s->pairs_pcie = os.pairs_pcie;
	s->pcie_experts = os.pcie_experts;
	s->pcie_experts_now = os.pcie_experts_now;
	s->pcie_bytes = os.pcie_bytes;
	s->tokens = os.tokens;
	s->cpu_expert_bytes = os.cpu_bytes;
	s->cpu_expert_busy_s = os.cpu_busy_s;
	for (int i = 0; i < 3; i++)
		s->cpu_expert_phase_s[i] = os.cpu_phase_s[i];
	s->prefill_layers = os.prefill_layers;
	s->prefill_copy_alone_gbps = os.copy_alone_gbps;
	for (int i = 0; i < 5; i++)
		s->prefill_phase_s[i] = os.prefill_phase_s[i];
	s->cpu_threads = os.cpu_threads;
	s->cpu_node = os.cpu_node;
	snprintf(s->cpu_isa, sizeof(s->cpu_isa), "%s", os.isa);
}

/* Between requests: one bounded re-balancing round of the VRAM expert cache (cuda_offload.h). */
static int cuda_idle(void *p, q3_err *e)
{
	struct cuda_bk *bk = (struct cuda_bk *)p;
	struct q3_swap sw[64];
	struct q3g_stage sg = { NULL, NULL, 16u << 20 };
	int n, err = 0, done = 0;

	if (!q3_off_active(bk->off) || !(n = q3_off_rebalance_plan(bk->off, sw, 64, 64ull << 20)))
		return 0; /* nothing to move until more tokens were seen */
	CUDA_CHECK(e, cudaMallocHost(&sg.host, sg.bytes));
	if (cudaMalloc(&sg.dev, sg.bytes) != cudaSuccess) {
		cudaFreeHost(sg.host);
		return q3_errf(e, -ENOMEM, "cuda backend: no device memory to re-balance the expert cache");
	}
	for (int i = 0; i < n && !err; i++) {
		int l = sw[i].layer_in, xi = sw[i].expert_in, xo = sw[i].expert_out;
		int slot = q3_off_swap_slot(bk->off, l, xi, xo);
		struct glayer *L = &bk->layers[l];
		const struct q3_expert *X = bk->m->layers[l].experts;

		if (slot < 0)
			continue;
		if (!(err = q3g_expert_upload(&L->egate.m, &L->eup.m, &L->edown.m, slot, &X[xi], &sg, bk->st, e)) &&
		    !(err = q3_off_swap_commit(bk->off, l, xi, xo, e))) {
			done++;
		} else {
			/* the slot still belongs to xo: put its weights back (best effort) */
			q3_err re;

			q3g_expert_upload(&L->egate.m, &L->eup.m, &L->edown.m, slot, &X[xo], &sg, bk->st, &re);
		}
	}
	cudaFree(sg.dev);
	cudaFreeHost(sg.host);
	return err ? err : done > 0; /* 0: nothing moved, the worker stops asking */
}

static const struct q3_backend_ops cuda_ops = {
	"cuda",
	cuda_open,
	cuda_close,
	cuda_state_new,
	cuda_state_free,
	cuda_state_copy,
	cuda_forward,
	cuda_set_trace,
	BK_MAX_TOKENS,
	cuda_stats,
	cuda_idle,
	true, /* samples */
};

extern "C" const struct q3_backend_ops *q3_backend_cuda(void)
{
	int n = 0;

	if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
		cudaGetLastError();
		return NULL;
	}
	return &cuda_ops;
}

extern "C" double q3_cuda_copy_gbs(void)
{
	q3_err e;

	return q3g_copy_bandwidth((size_t)1 << 30, 10, &e);
}
