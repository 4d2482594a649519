/* cpu_backend.c - the CPU backend: the Qwen3-Next forward pass in fp32 on the reference ops of
 * kernels/cpu_ref.h, with the matvecs (cpu_linear.h) and the per-head work spread over a thread
 * pool.  Implements backend.h.
 *
 * A forward call lays the tokens of all its sequences out as rows [R][H] (sequence after
 * sequence).  Token-wise work (norms, projections, the MoE) runs on all rows at once; work that
 * mixes positions (the conv, the delta rule, attention) runs per sequence on its own state.
 * Every buffer is allocated at open (scratch for max_tokens rows, per-worker scratch) or at
 * state_new (KV cache, conv and recurrent states); forward only computes.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_linear.h"
#include "cpu_ref.h"
#include "dequant.h"
#include "half.h"
#include "threadpool.h"

/* The weights of one layer as this backend uses them. */
struct cpu_layer {
	float *input_norm, *post_norm; /* [H], fp32 copies */

	/* Gated DeltaNet */
	int lin;		    /* index of its conv / recurrent state, -1 for full attention */
	struct q3_cpu_linear qkvz, ba, lin_out;
	float *conv_w;		    /* [conv_dim][W] */
	float *A_log, *dt_bias;	    /* [Nv] */
	float *lin_norm;	    /* [Dv] */

	/* gated full attention */
	int full;		    /* index of its KV cache, -1 for linear attention */
	struct q3_cpu_linear q, k, v, o;
	float *q_norm, *k_norm;	    /* [D] */

	/* MoE: groups 0..E-1 are the routed experts, group E the shared expert */
	struct q3_cpu_linear router, shared_gate;
	struct q3_cpu_linear (*ffn)[3]; /* [E + 1][gate, up, down] */
};

/* A session's buffers. */
struct cpu_state {
	float *kv;   /* [n_full][2][max_ctx][kv_dim]: K then V of each full-attention layer */
	float *conv; /* [n_linear][W - 1][conv_dim]: the last W - 1 pre-conv inputs */
	float *rec;  /* [n_linear][Nv][Dk][Dv]: delta-rule states */
};

/* One Linear applied to rows of activations, part of a batch run in one pool dispatch. */
struct lin_op {
	const struct q3_cpu_linear *cl;
	const float *x;
	size_t ldx;
	int T;
	float *y;
	size_t ldy;
	int first_task; /* tasks [first_task, first_task + ceil(N / Q3_CPU_LINEAR_ROWS)) */
};

struct cpu_bk {
	const struct q3_model *m;
	const struct q3_config *c;
	struct q3_backend_opts o;
	struct q3_pool *pool;
	struct cpu_layer *layers;
	float *final_norm;
	struct q3_cpu_linear lm_head;
	q3_trace_fn trace;
	void *trace_ctx;

	/* per forward call: where each row comes from */
	const struct q3_fwd_seq *seqs;
	int *row_seq, *row_pos; /* [max_tokens] */
	int *seq_row0;		/* [max_batch] first row of each sequence */

	/* activations, [max_tokens] rows each */
	float *h, *xn, *out;		 /* [H]: residual stream, normed input, block output */
	float *qkvz, *ba;		 /* projections of linear attention */
	float *mixed, *conv_out, *z;	 /* [conv_dim], [conv_dim], [value_dim] */
	float *b, *a, *beta, *g;	 /* [Nv] */
	float *qn, *kn;			 /* [key_dim] l2-normed q (scaled) and k */
	float *core;			 /* [value_dim] delta-rule output, then gated-normed */
	float *qg, *kk, *vv, *qh, *att;	 /* full attention: [2 q_dim], [kv_dim] x2, [q_dim] x2 */
	float *logits_r, *sg;		 /* [E] router logits, [1] shared-expert gate logit */
	int *top_idx;			 /* [top_k] */
	float *top_w;			 /* [top_k] */
	/* MoE pairs (row, group), grouped by expert then row: max_tokens * (top_k + 1) */
	int *pair_row;
	float *pair_w;
	int *group_start;		 /* [E + 2] */
	int *group_fill;		 /* [E + 1] */
	float *xe, *ge, *ue, *ye;	 /* [pairs][H], [pairs][I] x2, [pairs][H] */
	struct lin_op *ops;		 /* [2 (E + 1) + max_batch] */

	/* per worker */
	float *wscratch; /* [threads][wscratch_len] */
	size_t wscratch_len;
};

/* ---- setup ---------------------------------------------------------------------------------- */

static float *to_f32(const struct q3_tensor *t)
{
	float *p = malloc(sizeof(float) * q3_tensor_numel(t));

	if (p)
		q3_tensor_to_f32(t, p);
	return p;
}

static void *zalloc(size_t n)
{
	return calloc(1, n ? n : 1);
}

static void free_layer(struct cpu_layer *L, int E)
{
	free(L->input_norm);
	free(L->post_norm);
	free(L->conv_w);
	free(L->A_log);
	free(L->dt_bias);
	free(L->lin_norm);
	free(L->q_norm);
	free(L->k_norm);
	q3_cpu_linear_release(&L->qkvz);
	q3_cpu_linear_release(&L->ba);
	q3_cpu_linear_release(&L->lin_out);
	q3_cpu_linear_release(&L->q);
	q3_cpu_linear_release(&L->k);
	q3_cpu_linear_release(&L->v);
	q3_cpu_linear_release(&L->o);
	q3_cpu_linear_release(&L->router);
	q3_cpu_linear_release(&L->shared_gate);
	if (L->ffn)
		for (int e = 0; e <= E; e++)
			for (int j = 0; j < 3; j++)
				q3_cpu_linear_release(&L->ffn[e][j]);
	free(L->ffn);
}

static int prep_expert(struct q3_cpu_linear *dst, const struct q3_expert *x, q3_err *e)
{
	int err;

	if ((err = q3_cpu_linear_prepare(&dst[0], &x->gate, e)) ||
	    (err = q3_cpu_linear_prepare(&dst[1], &x->up, e)) ||
	    (err = q3_cpu_linear_prepare(&dst[2], &x->down, e)))
		return err;
	return 0;
}

static int prep_layer(struct cpu_bk *bk, int i, int *nlin, int *nfull, q3_err *e)
{
	const struct q3_layer *ML = &bk->m->layers[i];
	struct cpu_layer *L = &bk->layers[i];
	int E = bk->c->num_experts, err;

	L->lin = L->full = -1;
	if (!(L->input_norm = to_f32(ML->input_norm)) || !(L->post_norm = to_f32(ML->post_norm)))
		goto nomem;
	if (ML->kind == Q3_LAYER_LINEAR) {
		L->lin = (*nlin)++;
		if ((err = q3_cpu_linear_prepare(&L->qkvz, &ML->qkvz, e)) ||
		    (err = q3_cpu_linear_prepare(&L->ba, &ML->ba, e)) ||
		    (err = q3_cpu_linear_prepare(&L->lin_out, &ML->lin_out, e)))
			return err;
		if (!(L->conv_w = to_f32(ML->conv1d)) || !(L->A_log = to_f32(ML->A_log)) ||
		    !(L->dt_bias = to_f32(ML->dt_bias)) || !(L->lin_norm = to_f32(ML->lin_norm)))
			goto nomem;
	} else {
		L->full = (*nfull)++;
		if ((err = q3_cpu_linear_prepare(&L->q, &ML->q, e)) ||
		    (err = q3_cpu_linear_prepare(&L->k, &ML->k, e)) ||
		    (err = q3_cpu_linear_prepare(&L->v, &ML->v, e)) ||
		    (err = q3_cpu_linear_prepare(&L->o, &ML->o, e)))
			return err;
		if (!(L->q_norm = to_f32(ML->q_norm)) || !(L->k_norm = to_f32(ML->k_norm)))
			goto nomem;
	}
	if ((err = q3_cpu_linear_prepare(&L->router, &ML->router, e)) ||
	    (err = q3_cpu_linear_prepare(&L->shared_gate, &ML->shared_gate, e)))
		return err;
	L->ffn = calloc((size_t)E + 1, sizeof(*L->ffn));
	if (!L->ffn)
		goto nomem;
	for (int x = 0; x < E; x++)
		if ((err = prep_expert(L->ffn[x], &ML->experts[x], e)))
			return err;
	return prep_expert(L->ffn[E], &ML->shared, e);
nomem:
	return q3_errf(e, -ENOMEM, "out of memory");
}

/* Every activation buffer for max_tokens rows, and per-worker scratch: allocated at open
 * (alloc true, returns -ENOMEM if any allocation failed) or freed (alloc false). */
static int scratch(struct cpu_bk *bk, bool alloc)
{
	const struct q3_config *c = bk->c;
	size_t R = (size_t)bk->o.max_tokens, P = R * ((size_t)c->top_k + 1);
	size_t I = (size_t)Q3_MAX(c->moe_inter, c->shared_inter), f = sizeof(float), i = sizeof(int);
	size_t E = (size_t)c->num_experts, Nv = (size_t)c->lin_num_v_heads;
	struct {
		void *p;
		size_t bytes;
	} t[] = {
		{ &bk->row_seq, R * i },
		{ &bk->row_pos, R * i },
		{ &bk->seq_row0, (size_t)bk->o.max_batch * i },
		{ &bk->h, R * c->hidden_size * f },
		{ &bk->xn, R * c->hidden_size * f },
		{ &bk->out, R * c->hidden_size * f },
		{ &bk->qkvz, R * c->qkvz_dim * f },
		{ &bk->ba, R * c->ba_dim * f },
		{ &bk->mixed, R * c->conv_dim * f },
		{ &bk->conv_out, R * c->conv_dim * f },
		{ &bk->z, R * c->lin_value_dim * f },
		{ &bk->b, R * Nv * f },
		{ &bk->a, R * Nv * f },
		{ &bk->beta, R * Nv * f },
		{ &bk->g, R * Nv * f },
		{ &bk->qn, R * c->lin_key_dim * f },
		{ &bk->kn, R * c->lin_key_dim * f },
		{ &bk->core, R * c->lin_value_dim * f },
		{ &bk->qg, R * 2 * c->q_dim * f },
		{ &bk->kk, R * c->kv_dim * f },
		{ &bk->vv, R * c->kv_dim * f },
		{ &bk->qh, R * c->q_dim * f },
		{ &bk->att, R * c->q_dim * f },
		{ &bk->logits_r, R * E * f },
		{ &bk->sg, R * f },
		{ &bk->top_idx, R * c->top_k * i },
		{ &bk->top_w, R * c->top_k * f },
		{ &bk->pair_row, P * i },
		{ &bk->pair_w, P * f },
		{ &bk->group_start, (E + 2) * i },
		{ &bk->group_fill, (E + 1) * i },
		{ &bk->xe, P * c->hidden_size * f },
		{ &bk->ge, P * I * f },
		{ &bk->ue, P * I * f },
		{ &bk->ye, P * c->hidden_size * f },
		{ &bk->ops, (2 * (E + 1) + (size_t)bk->o.max_batch) * sizeof(struct lin_op) },
		{ &bk->wscratch, (size_t)bk->o.threads * bk->wscratch_len * f },
	};
	int err = 0;

	for (size_t k = 0; k < Q3_ARRAY_SIZE(t); k++) {
		void **p = t[k].p;

		if (!alloc) {
			free(*p);
			*p = NULL;
		} else if (!(*p = zalloc(t[k].bytes))) {
			err = -ENOMEM;
		}
	}
	return err;
}

static void cpu_close(void *p)
{
	struct cpu_bk *bk = p;

	if (!bk)
		return;
	q3_pool_free(bk->pool);
	if (bk->layers)
		for (int i = 0; i < bk->c->num_layers; i++)
			free_layer(&bk->layers[i], bk->c->num_experts);
	free(bk->layers);
	free(bk->final_norm);
	q3_cpu_linear_release(&bk->lm_head);
	scratch(bk, false);
	free(bk);
}

static int cpu_open(const struct q3_model *m, const struct q3_backend_opts *o, void **out, q3_err *e)
{
	struct cpu_bk *bk;
	int nlin = 0, nfull = 0, err;

	*out = NULL;
	if (o->threads < 1 || o->max_ctx < 1 || o->max_batch < 1 || o->max_tokens < o->max_batch)
		return q3_errf(e, -EINVAL, "cpu backend: bad options (threads %d, max_ctx %d, max_batch %d, max_tokens %d)",
			       o->threads, o->max_ctx, o->max_batch, o->max_tokens);
	bk = calloc(1, sizeof(*bk));
	if (!bk)
		return q3_errf(e, -ENOMEM, "out of memory");
	bk->m = m;
	bk->c = m->cfg;
	bk->o = *o;
	if ((err = q3_pool_new(o->threads, &bk->pool, e)))
		goto fail;
	bk->layers = calloc((size_t)bk->c->num_layers, sizeof(*bk->layers));
	if (!bk->layers || !(bk->final_norm = to_f32(m->final_norm)))
		goto nomem;
	for (int i = 0; i < bk->c->num_layers; i++)
		if ((err = prep_layer(bk, i, &nlin, &nfull, e)))
			goto fail;
	if ((err = q3_cpu_linear_prepare(&bk->lm_head, &m->lm_head, e)))
		goto fail;
	bk->wscratch_len = Q3_MAX((size_t)o->max_ctx,
				  q3_ref_delta_chunked_scratch(bk->c->lin_k_dim, bk->c->lin_v_dim));
	if (scratch(bk, true))
		goto nomem;
	*out = bk;
	return 0;
nomem:
	err = q3_errf(e, -ENOMEM, "cpu backend: out of memory");
fail:
	cpu_close(bk);
	return err;
}

static size_t kv_floats(const struct cpu_bk *bk)
{
	return (size_t)bk->c->num_full_layers * 2 * (size_t)bk->o.max_ctx * bk->c->kv_dim;
}

static size_t conv_floats(const struct cpu_bk *bk)
{
	return (size_t)bk->c->num_linear_layers * (size_t)(bk->c->conv_kernel - 1) * bk->c->conv_dim;
}

static size_t rec_floats(const struct cpu_bk *bk)
{
	const struct q3_config *c = bk->c;

	return (size_t)c->num_linear_layers * c->lin_num_v_heads * (size_t)c->lin_k_dim * c->lin_v_dim;
}

static void cpu_state_free(void *p, void *st)
{
	struct cpu_state *s = st;

	if (!s)
		return;
	free(s->kv);
	free(s->conv);
	free(s->rec);
	free(s);
}

static int cpu_state_new(void *p, void **out, q3_err *e)
{
	struct cpu_bk *bk = p;
	struct cpu_state *s = calloc(1, sizeof(*s));

	*out = NULL;
	if (!s || !(s->kv = zalloc(kv_floats(bk) * sizeof(float))) ||
	    !(s->conv = zalloc(conv_floats(bk) * sizeof(float))) ||
	    !(s->rec = zalloc(rec_floats(bk) * sizeof(float)))) {
		cpu_state_free(bk, s);
		return q3_errf(e, -ENOMEM, "cpu backend: out of memory for a session (%zu MiB)",
			       (kv_floats(bk) + conv_floats(bk) + rec_floats(bk)) * sizeof(float) >> 20);
	}
	*out = s;
	return 0;
}

static float *kv_rows(const struct cpu_bk *bk, const struct cpu_state *s, int full, int which)
{
	return s->kv + ((size_t)full * 2 + which) * (size_t)bk->o.max_ctx * bk->c->kv_dim;
}

static int cpu_state_copy(void *p, void *dst, const void *src, int pos, q3_err *e)
{
	struct cpu_bk *bk = p;
	struct cpu_state *d = dst;
	const struct cpu_state *s = src;

	for (int f = 0; f < bk->c->num_full_layers; f++)
		for (int w = 0; w < 2; w++)
			memcpy(kv_rows(bk, d, f, w), kv_rows(bk, s, f, w),
			       (size_t)pos * bk->c->kv_dim * sizeof(float));
	memcpy(d->conv, s->conv, conv_floats(bk) * sizeof(float));
	memcpy(d->rec, s->rec, rec_floats(bk) * sizeof(float));
	return 0;
}

static void cpu_set_trace(void *p, q3_trace_fn fn, void *ctx)
{
	struct cpu_bk *bk = p;

	bk->trace = fn;
	bk->trace_ctx = ctx;
}

/* ---- parallel helpers ----------------------------------------------------------------------- */

static int lin_tasks(const struct q3_cpu_linear *cl)
{
	return (cl->l->N + Q3_CPU_LINEAR_ROWS - 1) / Q3_CPU_LINEAR_ROWS;
}

/* Multiply-adds below which an op runs on the calling thread alone: waking the pool costs
 * more than it saves (tens of microseconds on a busy machine). */
#define PARALLEL_MIN_WORK (256u << 10)

/* Runs fn over ntasks tasks, on the pool when the op's work (about one multiply-add each) is
 * worth it, else here. */
static void run(struct cpu_bk *bk, int ntasks, q3_task_fn fn, void *ctx, uint64_t work)
{
	if (work >= PARALLEL_MIN_WORK) {
		q3_pool_run(bk->pool, ntasks, fn, ctx);
		return;
	}
	for (int i = 0; i < ntasks; i++)
		fn(ctx, i, 0);
}

struct lin_batch {
	struct lin_op *ops;
	int n, ntasks;
	uint64_t work; /* Σ N K T */
};

static void lin_add(struct lin_batch *b, const struct q3_cpu_linear *cl, const float *x, size_t ldx,
		    int T, float *y, size_t ldy)
{
	b->ops[b->n] = (struct lin_op){ cl, x, ldx, T, y, ldy, b->ntasks };
	b->ntasks += lin_tasks(cl);
	b->work += (uint64_t)cl->l->N * cl->l->K * T;
	b->n++;
}

static void lin_task(void *ctx, int task, int worker)
{
	const struct lin_batch *b = ctx;
	int lo = 0, hi = b->n - 1;

	while (lo < hi) { /* the last op whose first_task <= task */
		int mid = (lo + hi + 1) / 2;

		if (b->ops[mid].first_task <= task)
			lo = mid;
		else
			hi = mid - 1;
	}
	const struct lin_op *op = &b->ops[lo];
	int n0 = (task - op->first_task) * Q3_CPU_LINEAR_ROWS;
	int n1 = Q3_MIN(op->cl->l->N, n0 + Q3_CPU_LINEAR_ROWS);

	q3_cpu_linear_rows(op->cl, op->x, op->ldx, op->T, op->y, op->ldy, n0, n1);
}

static void lin_run(struct cpu_bk *bk, struct lin_batch *b)
{
	run(bk, b->ntasks, lin_task, b, b->work);
}

/* One Linear over R rows of width K into rows of width N. */
static void linear(struct cpu_bk *bk, const struct q3_cpu_linear *cl, const float *x, int R, float *y)
{
	struct lin_batch b = { .ops = bk->ops };

	lin_add(&b, cl, x, (size_t)cl->l->K, R, y, (size_t)cl->l->N);
	lin_run(bk, &b);
}

static float *worker_scratch(struct cpu_bk *bk, int worker)
{
	return bk->wscratch + (size_t)worker * bk->wscratch_len;
}

/* ---- Gated DeltaNet ------------------------------------------------------------------------- */

struct delta_job {
	struct cpu_bk *bk;
	const struct cpu_layer *L;
	int nseq;
};

/* Task (sequence, value head): the delta rule over the sequence's rows, then the gated norm. */
static void delta_task(void *ctx, int task, int worker)
{
	const struct delta_job *j = ctx;
	struct cpu_bk *bk = j->bk;
	const struct q3_config *c = bk->c;
	int Nv = c->lin_num_v_heads, Dk = c->lin_k_dim, Dv = c->lin_v_dim;
	int s = task / Nv, hv = task % Nv, kh = hv / (Nv / c->lin_num_k_heads);
	const struct q3_fwd_seq *sq = &bk->seqs[s];
	struct cpu_state *st = sq->state;
	float *S = st->rec + ((size_t)j->L->lin * Nv + hv) * (size_t)Dk * Dv;
	size_t r0 = (size_t)bk->seq_row0[s];
	const float *q = bk->qn + r0 * c->lin_key_dim + (size_t)kh * Dk;
	const float *k = bk->kn + r0 * c->lin_key_dim + (size_t)kh * Dk;
	const float *v = bk->conv_out + r0 * c->conv_dim + 2 * (size_t)c->lin_key_dim + (size_t)hv * Dv;
	float *o = bk->core + r0 * c->lin_value_dim + (size_t)hv * Dv;

	if (sq->n == 1)
		q3_ref_delta_step(S, q, k, v, bk->g[r0 * Nv + hv], bk->beta[r0 * Nv + hv], o, Dk, Dv);
	else
		q3_ref_delta_chunked(S, q, k, c->lin_key_dim, v, c->conv_dim, bk->g + r0 * Nv + hv,
				     bk->beta + r0 * Nv + hv, Nv, o, c->lin_value_dim, sq->n, Dk, Dv,
				     worker_scratch(bk, worker));
	for (int t = 0; t < sq->n; t++) {
		float *ot = o + (size_t)t * c->lin_value_dim;

		q3_ref_rmsnorm_gated(ot, ot, bk->z + (r0 + t) * c->lin_value_dim + (size_t)hv * Dv,
				     j->L->lin_norm, Dv, c->rms_eps);
	}
}

/* out = GatedDeltaNet(xn) for every row (qwen3next.md 4.5). */
static void linear_attention(struct cpu_bk *bk, const struct cpu_layer *L, int R, int nseq)
{
	const struct q3_config *c = bk->c;
	int Nk = c->lin_num_k_heads, Nv = c->lin_num_v_heads, Dk = c->lin_k_dim, Dv = c->lin_v_dim;
	int W = c->conv_kernel, H = c->hidden_size;
	struct lin_batch b = { .ops = bk->ops };
	struct delta_job job = { bk, L, nseq };

	lin_add(&b, &L->qkvz, bk->xn, H, R, bk->qkvz, c->qkvz_dim);
	lin_add(&b, &L->ba, bk->xn, H, R, bk->ba, c->ba_dim);
	lin_run(bk, &b);
	for (int r = 0; r < R; r++) {
		size_t v = (size_t)r * Nv;

		q3_ref_qkvz_split(bk->qkvz + (size_t)r * c->qkvz_dim, bk->ba + (size_t)r * c->ba_dim, Nk, Nv,
				  Dk, Dv, bk->mixed + (size_t)r * c->conv_dim,
				  bk->z + (size_t)r * c->lin_value_dim, bk->b + v, bk->a + v);
		q3_ref_delta_gates(bk->beta + v, bk->g + v, bk->b + v, bk->a + v, L->A_log, L->dt_bias, Nv);
	}
	for (int s = 0; s < nseq; s++) {
		struct cpu_state *st = bk->seqs[s].state;
		size_t r0 = (size_t)bk->seq_row0[s];

		q3_ref_conv1d_silu(bk->conv_out + r0 * c->conv_dim, bk->mixed + r0 * c->conv_dim,
				   bk->seqs[s].n, c->conv_dim, L->conv_w, W,
				   st->conv + (size_t)L->lin * (W - 1) * c->conv_dim);
	}
	for (int r = 0; r < R; r++) {
		const float *u = bk->conv_out + (size_t)r * c->conv_dim;

		for (int kh = 0; kh < Nk; kh++)
			q3_ref_delta_qk(bk->qn + (size_t)r * c->lin_key_dim + (size_t)kh * Dk,
					bk->kn + (size_t)r * c->lin_key_dim + (size_t)kh * Dk,
					u + (size_t)kh * Dk, u + c->lin_key_dim + (size_t)kh * Dk, Dk);
	}
	run(bk, nseq * Nv, delta_task, &job, (uint64_t)R * Nv * Dk * Dv * 4);
	linear(bk, &L->lin_out, bk->core, R, bk->out);
}

/* ---- gated full attention ------------------------------------------------------------------- */

struct attn_job {
	struct cpu_bk *bk;
	const struct cpu_layer *L;
};

/* Task (row, query head): attention over the row's sequence up to its position. */
static void attn_task(void *ctx, int task, int worker)
{
	const struct attn_job *j = ctx;
	struct cpu_bk *bk = j->bk;
	const struct q3_config *c = bk->c;
	int D = c->head_dim, r = task / c->num_heads, h = task % c->num_heads;
	int kvh = h / (c->num_heads / c->num_kv_heads);
	const struct cpu_state *st = bk->seqs[bk->row_seq[r]].state;

	q3_ref_attention_head(bk->att + (size_t)r * c->q_dim + (size_t)h * D,
			      bk->qh + (size_t)r * c->q_dim + (size_t)h * D,
			      bk->qg + (size_t)r * 2 * c->q_dim + (size_t)h * 2 * D + D,
			      kv_rows(bk, st, j->L->full, 0) + (size_t)kvh * D,
			      kv_rows(bk, st, j->L->full, 1) + (size_t)kvh * D, (size_t)c->kv_dim,
			      bk->row_pos[r] + 1, D, 1.0f / sqrtf((float)D), worker_scratch(bk, worker));
}

/* Multiply-adds of the attention of R rows: 2 D per visible position and head. */
static uint64_t attn_work(const struct cpu_bk *bk, int R)
{
	uint64_t w = 0;

	for (int r = 0; r < R; r++)
		w += 2 * (uint64_t)(bk->row_pos[r] + 1) * bk->c->head_dim * bk->c->num_heads;
	return w;
}

/* out = GatedAttention(xn) for every row (qwen3next.md 4.4); K and V of the rows are appended to
 * their sequences' caches first, so that each row sees its own and earlier positions. */
static void full_attention(struct cpu_bk *bk, const struct cpu_layer *L, int R)
{
	const struct q3_config *c = bk->c;
	int D = c->head_dim, H = c->hidden_size;
	struct lin_batch b = { .ops = bk->ops };
	struct attn_job job = { bk, L };

	lin_add(&b, &L->q, bk->xn, H, R, bk->qg, 2 * (size_t)c->q_dim);
	lin_add(&b, &L->k, bk->xn, H, R, bk->kk, c->kv_dim);
	lin_add(&b, &L->v, bk->xn, H, R, bk->vv, c->kv_dim);
	lin_run(bk, &b);
	for (int r = 0; r < R; r++) {
		const struct cpu_state *st = bk->seqs[bk->row_seq[r]].state;
		int pos = bk->row_pos[r];
		float *K = kv_rows(bk, st, L->full, 0) + (size_t)pos * c->kv_dim;
		float *V = kv_rows(bk, st, L->full, 1) + (size_t)pos * c->kv_dim;

		for (int h = 0; h < c->num_heads; h++) {
			float *q = bk->qh + (size_t)r * c->q_dim + (size_t)h * D;

			q3_ref_rmsnorm(q, bk->qg + (size_t)r * 2 * c->q_dim + (size_t)h * 2 * D, L->q_norm, D,
				       c->rms_eps);
			q3_ref_rope(q, c->rotary_dim, pos, c->rope_theta);
		}
		for (int j = 0; j < c->num_kv_heads; j++) {
			q3_ref_rmsnorm(K + (size_t)j * D, bk->kk + (size_t)r * c->kv_dim + (size_t)j * D,
				       L->k_norm, D, c->rms_eps);
			q3_ref_rope(K + (size_t)j * D, c->rotary_dim, pos, c->rope_theta);
		}
		memcpy(V, bk->vv + (size_t)r * c->kv_dim, sizeof(float) * c->kv_dim);
	}
	run(bk, R * c->num_heads, attn_task, &job, attn_work(bk, R));
	linear(bk, &L->o, bk->att, R, bk->out);
}

/* ---- sparse MoE ----------------------------------------------------------------------------- */

/* out = MoE(xn) for every row (qwen3next.md 4.6).  The rows are routed, then grouped by expert
 * (pairs of row and group, the shared expert last as group E), so that each expert runs once
 * over all the rows that chose it; each row's output adds its experts in ascending id, then the
 * shared expert, as HF does. */
static void moe(struct cpu_bk *bk, const struct cpu_layer *L, int R)
{
	const struct q3_config *c = bk->c;
	int E = c->num_experts, K = c->top_k, H = c->hidden_size;
	int I = c->moe_inter, Is = c->shared_inter;
	int *start = bk->group_start, *fill = bk->group_fill, P;
	struct lin_batch b = { .ops = bk->ops };

	lin_add(&b, &L->router, bk->xn, H, R, bk->logits_r, E);
	lin_add(&b, &L->shared_gate, bk->xn, H, R, bk->sg, 1);
	lin_run(bk, &b);

	memset(fill, 0, sizeof(int) * ((size_t)E + 1));
	for (int r = 0; r < R; r++) {
		q3_ref_router_topk(bk->logits_r + (size_t)r * E, E, K, c->norm_topk_prob,
				   bk->top_idx + (size_t)r * K, bk->top_w + (size_t)r * K);
		for (int j = 0; j < K; j++)
			fill[bk->top_idx[(size_t)r * K + j]]++;
	}
	fill[E] = R;
	start[0] = 0;
	for (int e = 0; e <= E; e++) {
		start[e + 1] = start[e] + fill[e];
		fill[e] = start[e];
	}
	P = start[E + 1];
	for (int r = 0; r < R; r++) {
		for (int j = 0; j < K; j++) {
			int p = fill[bk->top_idx[(size_t)r * K + j]]++;

			bk->pair_row[p] = r;
			bk->pair_w[p] = bk->top_w[(size_t)r * K + j];
		}
		bk->pair_row[fill[E]] = r;
		bk->pair_w[fill[E]++] = q3_sigmoid(bk->sg[r]);
	}
	for (int p = 0; p < P; p++)
		memcpy(bk->xe + (size_t)p * H, bk->xn + (size_t)bk->pair_row[p] * H, sizeof(float) * H);

	/* gate and up of every group, then SwiGLU, then down */
	b = (struct lin_batch){ .ops = bk->ops };
	for (int e = 0; e <= E; e++) {
		int n = start[e + 1] - start[e], w = e < E ? I : Is;

		if (!n)
			continue;
		lin_add(&b, &L->ffn[e][0], bk->xe + (size_t)start[e] * H, H, n, bk->ge + (size_t)start[e] * w, w);
		lin_add(&b, &L->ffn[e][1], bk->xe + (size_t)start[e] * H, H, n, bk->ue + (size_t)start[e] * w, w);
	}
	lin_run(bk, &b);
	for (int e = 0; e <= E; e++) {
		int w = e < E ? I : Is;
		size_t off = (size_t)start[e] * w, len = (size_t)(start[e + 1] - start[e]) * w;

		q3_ref_swiglu(bk->ge + off, bk->ge + off, bk->ue + off, (int)len);
	}
	b = (struct lin_batch){ .ops = bk->ops };
	for (int e = 0; e <= E; e++) {
		int n = start[e + 1] - start[e], w = e < E ? I : Is;

		if (n)
			lin_add(&b, &L->ffn[e][2], bk->ge + (size_t)start[e] * w, w, n,
				bk->ye + (size_t)start[e] * H, H);
	}
	lin_run(bk, &b);

	memset(bk->out, 0, sizeof(float) * (size_t)R * H);
	for (int p = 0; p < P; p++) {
		float *o = bk->out + (size_t)bk->pair_row[p] * H, w = bk->pair_w[p];
		const float *y = bk->ye + (size_t)p * H;

		for (int i = 0; i < H; i++)
			o[i] += w * y[i];
	}
}

/* ---- the forward pass ----------------------------------------------------------------------- */

static void add_rows(float *h, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h[i] += x[i];
}

static void norm_rows(float *y, const float *x, const float *w, int R, int H, float eps)
{
	for (int r = 0; r < R; r++)
		q3_ref_rmsnorm(y + (size_t)r * H, x + (size_t)r * H, w, H, eps);
}

static void embed(struct cpu_bk *bk, int R)
{
	const struct q3_tensor *t = bk->m->embed;
	int H = bk->c->hidden_size;

	for (int r = 0; r < R; r++) {
		const struct q3_fwd_seq *sq = &bk->seqs[bk->row_seq[r]];
		uint64_t base = (uint64_t)sq->ids[bk->row_pos[r] - sq->pos] * H;

		for (int i = 0; i < H; i++)
			bk->h[(size_t)r * H + i] = q3_tensor_f32_at(t, base + i);
	}
}

static void clear_state(struct cpu_bk *bk, struct cpu_state *st)
{
	memset(st->conv, 0, conv_floats(bk) * sizeof(float));
	memset(st->rec, 0, rec_floats(bk) * sizeof(float));
}

/* Final norm and lm_head for the rows whose logits are asked for, straight into the callers'
 * buffers. */
static void head(struct cpu_bk *bk, const struct q3_fwd_seq *seqs, int nseq)
{
	int H = bk->c->hidden_size, V = bk->c->vocab_size;
	struct lin_batch b = { .ops = bk->ops };

	for (int s = 0; s < nseq; s++) {
		int r0 = bk->seq_row0[s], n = seqs[s].n;

		if (!seqs[s].logits)
			continue;
		if (!seqs[s].all_logits) {
			r0 += n - 1;
			n = 1;
		}
		norm_rows(bk->xn + (size_t)r0 * H, bk->h + (size_t)r0 * H, bk->final_norm, n, H,
			  bk->c->rms_eps);
		lin_add(&b, &bk->lm_head, bk->xn + (size_t)r0 * H, H, n, seqs[s].logits, V);
	}
	lin_run(bk, &b);
}

static int cpu_forward(void *p, const struct q3_fwd_seq *seqs, int nseq, q3_err *e)
{
	struct cpu_bk *bk = p;
	const struct q3_config *c = bk->c;
	int H = c->hidden_size, R = 0;

	bk->seqs = seqs;
	for (int s = 0; s < nseq; s++) {
		bk->seq_row0[s] = R;
		for (int i = 0; i < seqs[s].n; i++, R++) {
			bk->row_seq[R] = s;
			bk->row_pos[R] = seqs[s].pos + i;
		}
		if (seqs[s].pos == 0)
			clear_state(bk, seqs[s].state);
	}
	embed(bk, R);
	if (bk->trace)
		bk->trace(bk->trace_ctx, -1, bk->h, R, H);
	for (int i = 0; i < c->num_layers; i++) {
		const struct cpu_layer *L = &bk->layers[i];

		norm_rows(bk->xn, bk->h, L->input_norm, R, H, c->rms_eps);
		if (L->lin >= 0)
			linear_attention(bk, L, R, nseq);
		else
			full_attention(bk, L, R);
		add_rows(bk->h, bk->out, (size_t)R * H);
		norm_rows(bk->xn, bk->h, L->post_norm, R, H, c->rms_eps);
		moe(bk, L, R);
		add_rows(bk->h, bk->out, (size_t)R * H);
		if (bk->trace)
			bk->trace(bk->trace_ctx, i, bk->h, R, H);
	}
	head(bk, seqs, nseq);
	bk->seqs = NULL;
	return 0;
}

const struct q3_backend_ops q3_backend_cpu = {
	.name = "cpu",
	.open = cpu_open,
	.close = cpu_close,
	.state_new = cpu_state_new,
	.state_free = cpu_state_free,
	.state_copy = cpu_state_copy,
	.forward = cpu_forward,
	.set_trace = cpu_set_trace,
};
