/* model.c - bind checkpoint tensors to the Qwen3-Next architecture (see model.h). */
#include "model.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Binding keeps going after a problem so that it can say how many there are; the first one is
 * the message. */
/* Past this many problems binding stops: a config.json that asks for 1024 layers of 65536
 * experts over a small checkpoint would otherwise look up (and allocate for) every one. */
#define MAX_PROBLEMS 1000

struct binder {
	struct q3_ckpt *ck;
	struct q3_model *m;
	int nerr;
	q3_err first;
};

static void problem(struct binder *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(struct binder *b, const char *fmt, ...)
{
	if (b->nerr++ == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(b->first.msg, sizeof(b->first.msg), fmt, ap);
		va_end(ap);
	}
}

static bool is_float(enum q3_dtype d)
{
	return d == Q3_DT_BF16 || d == Q3_DT_F16 || d == Q3_DT_F32;
}

static struct q3_tensor *claim(struct binder *b, const char *name)
{
	struct q3_tensor *t = q3_ckpt_find(b->ck, name);

	if (t)
		t->bound = true;
	return t;
}

static bool shape_is(const struct q3_tensor *t, int ndim, const int64_t *dims)
{
	if (t->ndim != ndim)
		return false;
	for (int i = 0; i < ndim; i++)
		if (t->shape[i] != dims[i])
			return false;
	return true;
}

static void expect_shape(struct binder *b, const struct q3_tensor *t, int ndim, const int64_t *dims)
{
	char got[96], want[96];
	struct q3_tensor w = { .ndim = ndim };

	if (shape_is(t, ndim, dims))
		return;
	memcpy(w.shape, dims, sizeof(int64_t) * (size_t)ndim);
	problem(b, "tensor %s: shape %s, expected %s", t->name, q3_tensor_shape_str(t, got, sizeof(got)),
		q3_tensor_shape_str(&w, want, sizeof(want)));
}

/* A float vector or small tensor of a given shape (norm weights, dt_bias, conv1d, ...). */
static struct q3_tensor *bind_float(struct binder *b, const char *name, int ndim, const int64_t *dims)
{
	struct q3_tensor *t = claim(b, name);

	if (!t) {
		problem(b, "missing tensor %s", name);
		return NULL;
	}
	if (!is_float(t->dtype))
		problem(b, "tensor %s: dtype %s, expected BF16, F16 or F32", name, q3_dtype_name(t->dtype));
	expect_shape(b, t, ndim, dims);
	return t;
}

static struct q3_tensor *bind_vec(struct binder *b, const char *name, int64_t n)
{
	return bind_float(b, name, 1, &n);
}

static void bind_gptq(struct binder *b, const char *mod, struct q3_tensor *qw, struct q3_linear *l)
{
	const struct q3_quant *q = &b->ck->cfg.quant;
	struct q3_qscheme s;
	char name[512];
	int64_t pack, dims[2];

	if (q->method == Q3_QM_NONE) {
		problem(b, "tensor %s: GPTQ weights but the checkpoint has no quantization_config", qw->name);
		return;
	}
	q3_quant_scheme(q, mod, &s);
	if (s.bits >= 16) {
		problem(b, "tensor %s: GPTQ weights but quantization_config says %s is not quantized",
			qw->name, mod);
		return;
	}
	l->fmt = Q3_W_GPTQ;
	l->qweight = qw;
	l->bits = s.bits;
	l->sym = s.sym;
	l->desc_act = s.desc_act;
	l->zero_offset = q->zero_offset;
	pack = 32 / s.bits;
	if (qw->dtype != Q3_DT_I32) {
		problem(b, "tensor %s: dtype %s, expected I32", qw->name, q3_dtype_name(qw->dtype));
		return;
	}
	if (l->K % pack || l->N % pack) {
		problem(b, "%s: %d-bit packing needs in and out features (%d, %d) divisible by %" PRId64,
			mod, s.bits, l->K, l->N, pack);
		return;
	}
	if (qw->ndim == 2 && qw->shape[1] == l->N && qw->shape[0] * pack != l->K &&
	    (qw->shape[0] * 32) % l->K == 0) {
		problem(b, "tensor %s: rows %" PRId64 " mean %" PRId64 "-bit codes but quantization_config says %d bits",
			qw->name, qw->shape[0], qw->shape[0] * 32 / l->K, s.bits);
		return;
	}
	dims[0] = l->K / pack, dims[1] = l->N;
	expect_shape(b, qw, 2, dims);

	l->group_size = s.group_size == -1 ? l->K : s.group_size;
	if (l->K % l->group_size) {
		problem(b, "%s: in features %d are not a multiple of group_size %d", mod, l->K, l->group_size);
		return;
	}
	l->ngroups = l->K / l->group_size;

	snprintf(name, sizeof(name), "%s.scales", mod);
	l->scales = claim(b, name);
	if (!l->scales) {
		problem(b, "missing tensor %s", name);
		return;
	}
	if (l->scales->dtype != Q3_DT_F16 && l->scales->dtype != Q3_DT_BF16)
		problem(b, "tensor %s: dtype %s, expected F16 or BF16", name, q3_dtype_name(l->scales->dtype));
	if (l->scales->ndim == 2 && l->scales->shape[1] == l->N && l->scales->shape[0] != l->ngroups) {
		problem(b, "tensor %s: %" PRId64 " groups, but group_size %d over %d inputs gives %d", name,
			l->scales->shape[0], s.group_size, l->K, l->ngroups);
		return;
	}
	dims[0] = l->ngroups, dims[1] = l->N;
	expect_shape(b, l->scales, 2, dims);

	snprintf(name, sizeof(name), "%s.qzeros", mod);
	l->qzeros = claim(b, name);
	if (!l->qzeros) {
		problem(b, "missing tensor %s", name);
		return;
	}
	if (l->qzeros->dtype != Q3_DT_I32)
		problem(b, "tensor %s: dtype %s, expected I32", name, q3_dtype_name(l->qzeros->dtype));
	dims[0] = l->ngroups, dims[1] = l->N / pack;
	expect_shape(b, l->qzeros, 2, dims);

	snprintf(name, sizeof(name), "%s.g_idx", mod);
	l->g_idx = claim(b, name);
	if (l->g_idx) {
		if (l->g_idx->dtype != Q3_DT_I32)
			problem(b, "tensor %s: dtype %s, expected I32", name, q3_dtype_name(l->g_idx->dtype));
		dims[0] = l->K;
		expect_shape(b, l->g_idx, 1, dims);
	} else if (s.desc_act) {
		problem(b, "missing tensor %s: desc_act is set, so the group of each input is needed", name);
	}
}

static void bind_linear(struct binder *b, const char *mod, int K, int N, struct q3_linear *l)
{
	char name[512];
	struct q3_tensor *w, *qw;
	int64_t dims[2] = { N, K };

	memset(l, 0, sizeof(*l));
	l->K = K;
	l->N = N;
	snprintf(name, sizeof(name), "%s.weight", mod);
	w = claim(b, name);
	snprintf(name, sizeof(name), "%s.qweight", mod);
	qw = claim(b, name);
	if (w && qw) {
		problem(b, "%s: both .weight and .qweight are present", mod);
	} else if (qw) {
		bind_gptq(b, mod, qw, l);
	} else if (w) {
		l->fmt = Q3_W_DENSE;
		l->w = w;
		if (!is_float(w->dtype))
			problem(b, "tensor %s: dtype %s, expected BF16, F16 or F32", w->name,
				q3_dtype_name(w->dtype));
		expect_shape(b, w, 2, dims);
	} else {
		problem(b, "missing tensor %s.weight (or %s.qweight)", mod, mod);
	}
}

uint64_t q3_linear_bytes(const struct q3_linear *l)
{
	uint64_t n = 0;

	if (l->w)
		n += l->w->nbytes;
	if (l->qweight)
		n += l->qweight->nbytes;
	if (l->qzeros)
		n += l->qzeros->nbytes;
	if (l->scales)
		n += l->scales->nbytes;
	if (l->g_idx)
		n += l->g_idx->nbytes;
	return n;
}

const char *q3_linear_name(const struct q3_linear *l, char *buf, size_t len)
{
	const struct q3_tensor *t = l->w ? l->w : l->qweight;
	const char *dot;

	if (!t) {
		snprintf(buf, len, "?");
		return buf;
	}
	dot = strrchr(t->name, '.');
	snprintf(buf, len, "%.*s", dot ? (int)(dot - t->name) : (int)strlen(t->name), t->name);
	return buf;
}

static void bind_linear_attn(struct binder *b, const char *p, struct q3_layer *L)
{
	const struct q3_config *c = &b->ck->cfg;
	char mod[256];
	int64_t conv[3] = { c->conv_dim, 1, c->conv_kernel };

	snprintf(mod, sizeof(mod), "%s.linear_attn.in_proj_qkvz", p);
	bind_linear(b, mod, c->hidden_size, c->qkvz_dim, &L->qkvz);
	snprintf(mod, sizeof(mod), "%s.linear_attn.in_proj_ba", p);
	bind_linear(b, mod, c->hidden_size, c->ba_dim, &L->ba);
	snprintf(mod, sizeof(mod), "%s.linear_attn.out_proj", p);
	bind_linear(b, mod, c->lin_value_dim, c->hidden_size, &L->lin_out);
	snprintf(mod, sizeof(mod), "%s.linear_attn.conv1d.weight", p);
	L->conv1d = bind_float(b, mod, 3, conv);
	snprintf(mod, sizeof(mod), "%s.linear_attn.dt_bias", p);
	L->dt_bias = bind_vec(b, mod, c->lin_num_v_heads);
	snprintf(mod, sizeof(mod), "%s.linear_attn.A_log", p);
	L->A_log = bind_vec(b, mod, c->lin_num_v_heads);
	snprintf(mod, sizeof(mod), "%s.linear_attn.norm.weight", p);
	L->lin_norm = bind_vec(b, mod, c->lin_v_dim);
}

static void bind_full_attn(struct binder *b, const char *p, struct q3_layer *L)
{
	const struct q3_config *c = &b->ck->cfg;
	char mod[256];

	snprintf(mod, sizeof(mod), "%s.self_attn.q_proj", p);
	bind_linear(b, mod, c->hidden_size, 2 * c->q_dim, &L->q);
	snprintf(mod, sizeof(mod), "%s.self_attn.k_proj", p);
	bind_linear(b, mod, c->hidden_size, c->kv_dim, &L->k);
	snprintf(mod, sizeof(mod), "%s.self_attn.v_proj", p);
	bind_linear(b, mod, c->hidden_size, c->kv_dim, &L->v);
	snprintf(mod, sizeof(mod), "%s.self_attn.o_proj", p);
	bind_linear(b, mod, c->q_dim, c->hidden_size, &L->o);
	snprintf(mod, sizeof(mod), "%s.self_attn.q_norm.weight", p);
	L->q_norm = bind_vec(b, mod, c->head_dim);
	snprintf(mod, sizeof(mod), "%s.self_attn.k_norm.weight", p);
	L->k_norm = bind_vec(b, mod, c->head_dim);
}

static void bind_expert(struct binder *b, const char *p, int H, int I, struct q3_expert *x)
{
	char mod[256];

	snprintf(mod, sizeof(mod), "%s.gate_proj", p);
	bind_linear(b, mod, H, I, &x->gate);
	snprintf(mod, sizeof(mod), "%s.up_proj", p);
	bind_linear(b, mod, H, I, &x->up);
	snprintf(mod, sizeof(mod), "%s.down_proj", p);
	bind_linear(b, mod, I, H, &x->down);
}

static uint64_t expert_bytes(const struct q3_expert *x)
{
	return q3_linear_bytes(&x->gate) + q3_linear_bytes(&x->up) + q3_linear_bytes(&x->down);
}

static int bind_moe(struct binder *b, const char *p, struct q3_layer *L)
{
	const struct q3_config *c = &b->ck->cfg;
	struct q3_model_bytes *by = &b->m->bytes;
	char mod[256];

	snprintf(mod, sizeof(mod), "%s.mlp.experts.gate_up_proj", p);
	if (q3_ckpt_find(b->ck, mod) || (snprintf(mod, sizeof(mod), "%s.mlp.experts.gate_up_proj.weight", p),
					 q3_ckpt_find(b->ck, mod)))
		problem(b, "tensor %s: fused expert tensors (transformers v5 in-memory format) are not supported; "
			   "use per-expert names (mlp.experts.N.gate_proj ...)", mod);
	snprintf(mod, sizeof(mod), "%s.mlp.gate", p);
	bind_linear(b, mod, c->hidden_size, c->num_experts, &L->router);
	L->experts = calloc((size_t)c->num_experts, sizeof(*L->experts));
	if (!L->experts)
		return -ENOMEM;
	for (int e = 0; e < c->num_experts && b->nerr <= MAX_PROBLEMS; e++) {
		uint64_t n;

		snprintf(mod, sizeof(mod), "%s.mlp.experts.%d", p, e);
		bind_expert(b, mod, c->hidden_size, c->moe_inter, &L->experts[e]);
		n = expert_bytes(&L->experts[e]);
		by->experts += n;
		if (!by->expert_min || n < by->expert_min)
			by->expert_min = n;
		if (n > by->expert_max)
			by->expert_max = n;
	}
	snprintf(mod, sizeof(mod), "%s.mlp.shared_expert", p);
	bind_expert(b, mod, c->hidden_size, c->shared_inter, &L->shared);
	snprintf(mod, sizeof(mod), "%s.mlp.shared_expert_gate", p);
	bind_linear(b, mod, c->hidden_size, 1, &L->shared_gate);
	return 0;
}

static uint64_t layer_dense_bytes(const struct q3_layer *L)
{
	const struct q3_linear *lin[] = { &L->qkvz, &L->ba, &L->lin_out, &L->q, &L->k, &L->v, &L->o,
					  &L->router, &L->shared.gate, &L->shared.up, &L->shared.down,
					  &L->shared_gate };
	const struct q3_tensor *vec[] = { L->input_norm, L->post_norm, L->conv1d, L->dt_bias,
					  L->A_log, L->lin_norm, L->q_norm, L->k_norm };
	uint64_t n = 0;

	for (size_t i = 0; i < Q3_ARRAY_SIZE(lin); i++)
		n += q3_linear_bytes(lin[i]);
	for (size_t i = 0; i < Q3_ARRAY_SIZE(vec); i++)
		n += vec[i] ? vec[i]->nbytes : 0;
	return n;
}

void q3_model_free(struct q3_model *m)
{
	if (!m)
		return;
	if (m->layers)
		for (int i = 0; i < m->cfg->num_layers; i++)
			free(m->layers[i].experts);
	free(m->layers);
	free(m);
}

int q3_model_bind(struct q3_ckpt *ck, struct q3_model **out, q3_err *e)
{
	const struct q3_config *c = &ck->cfg;
	struct binder b = { .ck = ck };
	struct q3_model *m;
	int64_t emb[2] = { c->vocab_size, c->hidden_size };
	size_t unknown = 0;
	const char *first_unknown = NULL;

	*out = NULL;
	for (size_t i = 0; i < ck->ntensors; i++)
		ck->tensors[i].bound = false;
	m = calloc(1, sizeof(*m));
	if (!m)
		return q3_errf(e, -ENOMEM, "out of memory");
	m->ck = ck;
	m->cfg = c;
	b.m = m;
	m->layers = calloc((size_t)c->num_layers, sizeof(*m->layers));
	if (!m->layers) {
		q3_model_free(m);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	m->embed = bind_float(&b, "model.embed_tokens.weight", 2, emb);
	m->final_norm = bind_vec(&b, "model.norm.weight", c->hidden_size);
	if (c->tie_word_embeddings) {
		m->lm_head = (struct q3_linear){ .fmt = Q3_W_DENSE, .K = c->hidden_size,
						 .N = c->vocab_size, .w = m->embed };
		if (q3_ckpt_find(ck, "lm_head.weight"))
			problem(&b, "tensor lm_head.weight: present although tie_word_embeddings is true");
	} else {
		bind_linear(&b, "lm_head", c->hidden_size, c->vocab_size, &m->lm_head);
	}
	for (int i = 0; i < c->num_layers && b.nerr <= MAX_PROBLEMS; i++) {
		struct q3_layer *L = &m->layers[i];
		char p[64], name[128];

		L->idx = i;
		L->kind = c->layer_kind[i];
		snprintf(p, sizeof(p), "model.layers.%d", i);
		snprintf(name, sizeof(name), "%s.input_layernorm.weight", p);
		L->input_norm = bind_vec(&b, name, c->hidden_size);
		snprintf(name, sizeof(name), "%s.post_attention_layernorm.weight", p);
		L->post_norm = bind_vec(&b, name, c->hidden_size);
		if (L->kind == Q3_LAYER_LINEAR)
			bind_linear_attn(&b, p, L);
		else
			bind_full_attn(&b, p, L);
		if (bind_moe(&b, p, L)) {
			q3_model_free(m);
			return q3_errf(e, -ENOMEM, "out of memory");
		}
		m->bytes.dense += layer_dense_bytes(L);
	}
	m->bytes.embed = m->embed ? m->embed->nbytes : 0;
	m->bytes.lm_head = c->tie_word_embeddings ? 0 : q3_linear_bytes(&m->lm_head);
	m->bytes.other = m->final_norm ? m->final_norm->nbytes : 0;
	for (size_t i = 0; i < ck->ntensors; i++) {
		struct q3_tensor *t = &ck->tensors[i];

		if (t->bound)
			continue;
		if (!strncmp(t->name, "mtp.", 4)) {
			m->n_mtp++;
			m->bytes.mtp += t->nbytes;
			continue;
		}
		if (!unknown++)
			first_unknown = t->name;
	}
	if (unknown)
		problem(&b, "unknown tensor %s%s", first_unknown,
			unknown > 1 ? " (and more unknown tensors)" : "");
	if (b.nerr) {
		q3_model_free(m);
		if (b.nerr > MAX_PROBLEMS)
			return q3_errf(e, -EINVAL, "%s (and at least %d more problems)", b.first.msg,
				       MAX_PROBLEMS);
		if (b.nerr > 1)
			return q3_errf(e, -EINVAL, "%s (and %d more problem%s)", b.first.msg, b.nerr - 1,
				       b.nerr > 2 ? "s" : "");
		return q3_errf(e, -EINVAL, "%s", b.first.msg);
	}
	*out = m;
	return 0;
}

static int check_gidx(const struct q3_linear *l, q3_err *e)
{
	const unsigned char *p;

	if (l->fmt != Q3_W_GPTQ || !l->g_idx)
		return 0;
	if (!l->g_idx->data)
		return q3_errf(e, -EINVAL, "tensor %s: not loaded", l->g_idx->name);
	p = l->g_idx->data;
	for (int k = 0; k < l->K; k++) {
		int32_t g;
		memcpy(&g, p + 4 * (size_t)k, 4);
		if (g < 0 || g >= l->ngroups)
			return q3_errf(e, -EINVAL, "tensor %s: entry %d is %d, outside [0, %d)", l->g_idx->name, k,
				       g, l->ngroups);
	}
	return 0;
}

int q3_model_check_data(const struct q3_model *m, q3_err *e)
{
	int err;

	for (int i = 0; i < m->cfg->num_layers; i++) {
		const struct q3_layer *L = &m->layers[i];
		const struct q3_linear *lin[] = { &L->qkvz, &L->ba, &L->lin_out, &L->q, &L->k, &L->v,
						  &L->o, &L->router, &L->shared.gate, &L->shared.up,
						  &L->shared.down, &L->shared_gate };

		for (size_t j = 0; j < Q3_ARRAY_SIZE(lin); j++)
			if ((err = check_gidx(lin[j], e)))
				return err;
		for (int x = 0; x < m->cfg->num_experts; x++)
			if ((err = check_gidx(&L->experts[x].gate, e)) ||
			    (err = check_gidx(&L->experts[x].up, e)) ||
			    (err = check_gidx(&L->experts[x].down, e)))
				return err;
	}
	return check_gidx(&m->lm_head, e);
}
