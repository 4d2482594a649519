/* cpu_ref.c - the plain-C fp32 reference ops (see cpu_ref.h; the formulas are qwen3next.md 4). */
#include "cpu_ref.h"

#include <math.h>
#include <string.h>

#include "dequant.h"

void q3_ref_rmsnorm(float *y, const float *x, const float *w, int n, float eps)
{
	float ss = 0.0f, r;

	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	r = 1.0f / sqrtf(ss / (float)n + eps);
	for (int i = 0; i < n; i++)
		y[i] = (x[i] * r) * (1.0f + w[i]);
}

void q3_ref_rmsnorm_gated(float *y, const float *x, const float *z, const float *w, int n, float eps)
{
	float ss = 0.0f, r;

	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	r = 1.0f / sqrtf(ss / (float)n + eps);
	for (int i = 0; i < n; i++)
		y[i] = (w[i] * (x[i] * r)) * q3_silu(z[i]);
}

void q3_ref_l2norm(float *y, const float *x, int n, float eps)
{
	float ss = 0.0f, r;

	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	r = 1.0f / sqrtf(ss + eps);
	for (int i = 0; i < n; i++)
		y[i] = x[i] * r;
}

void q3_ref_rope(float *x, int rot, int pos, double theta)
{
	int half = rot / 2;

	for (int i = 0; i < half; i++) {
		/* HF: inv_freq = 1 / base^(2i/rot) and freqs = pos * inv_freq, both in fp32 */
		float inv = 1.0f / powf((float)theta, (float)(2 * i) / (float)rot);
		float a = (float)pos * inv;
		float c = cosf(a), s = sinf(a);
		float x0 = x[i], x1 = x[i + half];

		x[i] = x0 * c - x1 * s;
		x[i + half] = x1 * c + x0 * s;
	}
}

void q3_ref_attention_head(float *out, const float *q, const float *gate, const float *K,
			   const float *V, size_t ldkv, int n, int D, float scale, float *scores)
{
	float mx = -INFINITY, sum = 0.0f;

	for (int j = 0; j < n; j++) {
		const float *kj = K + (size_t)j * ldkv;
		float s = 0.0f;

		for (int d = 0; d < D; d++)
			s += q[d] * kj[d];
		scores[j] = s * scale;
		if (scores[j] > mx)
			mx = scores[j];
	}
	for (int j = 0; j < n; j++) {
		scores[j] = expf(scores[j] - mx);
		sum += scores[j];
	}
	for (int d = 0; d < D; d++)
		out[d] = 0.0f;
	for (int j = 0; j < n; j++) {
		const float *vj = V + (size_t)j * ldkv;
		float p = scores[j] / sum;

		for (int d = 0; d < D; d++)
			out[d] += p * vj[d];
	}
	for (int d = 0; d < D; d++)
		out[d] *= q3_sigmoid(gate[d]);
}

void q3_ref_attention(float *out, const float *q, const float *gate, const float *K, const float *V,
		      int n, int Hq, int Hkv, int D, float scale, float *scores)
{
	int group = Hq / Hkv;

	for (int h = 0; h < Hq; h++) {
		size_t kv = (size_t)(h / group) * (size_t)D;

		q3_ref_attention_head(out + (size_t)h * D, q + (size_t)h * D, gate + (size_t)h * D,
				      K + kv, V + kv, (size_t)Hkv * (size_t)D, n, D, scale, scores);
	}
}

void q3_ref_qkvz_split(const float *qkvz, const float *ba, int Nk, int Nv, int Dk, int Dv,
		       float *mixed, float *z, float *b, float *a)
{
	int r = Nv / Nk;
	size_t key_dim = (size_t)Nk * Dk, group = 2 * (size_t)Dk + 2 * (size_t)r * Dv;

	for (int g = 0; g < Nk; g++) {
		const float *p = qkvz + (size_t)g * group;

		memcpy(mixed + (size_t)g * Dk, p, sizeof(float) * (size_t)Dk);
		memcpy(mixed + key_dim + (size_t)g * Dk, p + Dk, sizeof(float) * (size_t)Dk);
		memcpy(mixed + 2 * key_dim + (size_t)g * r * Dv, p + 2 * Dk, sizeof(float) * (size_t)r * Dv);
		memcpy(z + (size_t)g * r * Dv, p + 2 * Dk + (size_t)r * Dv, sizeof(float) * (size_t)r * Dv);
		for (int i = 0; i < r; i++) {
			b[g * r + i] = ba[g * 2 * r + i];
			a[g * r + i] = ba[g * 2 * r + r + i];
		}
	}
}

void q3_ref_conv1d_silu(float *y, const float *x, int T, int C, const float *w, int W, float *state)
{
	int S = W - 1;

	for (int t = 0; t < T; t++) {
		for (int c = 0; c < C; c++) {
			float acc = 0.0f;

			for (int m = 0; m < W; m++) {
				int src = t - S + m; /* index into x; negative: into the state */
				float in = src >= 0 ? x[(size_t)src * C + c] : state[(size_t)(S + src) * C + c];

				acc += w[(size_t)c * W + m] * in;
			}
			y[(size_t)t * C + c] = q3_silu(acc);
		}
	}
	/* new state: the last S inputs of (state, x) */
	for (int i = 0; i < S; i++) {
		int src = T - S + i;

		if (src >= 0)
			memcpy(state + (size_t)i * C, x + (size_t)src * C, sizeof(float) * (size_t)C);
		else
			memmove(state + (size_t)i * C, state + (size_t)(S + src) * C, sizeof(float) * (size_t)C);
	}
}

void q3_ref_delta_gates(float *beta, float *g, const float *b, const float *a, const float *A_log,
			const float *dt_bias, int Nv)
{
	for (int j = 0; j < Nv; j++) {
		beta[j] = q3_sigmoid(b[j]);
		g[j] = -expf(A_log[j]) * q3_softplus(a[j] + dt_bias[j]);
	}
}

void q3_ref_delta_qk(float *qn, float *kn, const float *q, const float *k, int Dk)
{
	float scale = 1.0f / sqrtf((float)Dk);

	q3_ref_l2norm(qn, q, Dk, 1e-6f);
	q3_ref_l2norm(kn, k, Dk, 1e-6f);
	for (int i = 0; i < Dk; i++)
		qn[i] *= scale;
}

void q3_ref_delta_step(float *S, const float *q, const float *k, const float *v, float g, float beta,
		       float *o, int Dk, int Dv)
{
	float alpha = expf(g);
	float delta[Dv];

	/* decay, and kv_mem = Sᵀk accumulated row by row into delta */
	for (int c = 0; c < Dv; c++)
		delta[c] = 0.0f;
	for (int i = 0; i < Dk; i++) {
		float *Si = S + (size_t)i * Dv;

		for (int c = 0; c < Dv; c++) {
			Si[c] *= alpha;
			delta[c] += Si[c] * k[i];
		}
	}
	for (int c = 0; c < Dv; c++) {
		delta[c] = (v[c] - delta[c]) * beta;
		o[c] = 0.0f;
	}
	/* S += k ⊗ delta, then o = Sᵀq with the updated state */
	for (int i = 0; i < Dk; i++) {
		float *Si = S + (size_t)i * Dv;

		for (int c = 0; c < Dv; c++) {
			Si[c] += k[i] * delta[c];
			o[c] += Si[c] * q[i];
		}
	}
}

size_t q3_ref_delta_chunked_scratch(int Dk, int Dv)
{
	size_t C = Q3_DELTA_CHUNK;

	return 3 * C + 2 * C * C + 2 * C * (size_t)Dk + C * (size_t)Dv;
}

/* y[0, n) += a · x[0, n) */
static void axpy(float *y, float a, const float *x, int n)
{
	for (int i = 0; i < n; i++)
		y[i] += a * x[i];
}

/* One chunk of c <= Q3_DELTA_CHUNK tokens; see q3_ref_delta_chunked.  The matrix products of the
 * recipe are written as row updates (y_i += a · x_j) so that the inner loops run along rows. */
static void delta_chunk(float *S, const float *q, const float *k, size_t ldqk, const float *v,
			size_t ldv, const float *g, const float *beta, size_t ldg, float *o, size_t ldo,
			int c, int Dk, int Dv, float *scratch)
{
	const int C = Q3_DELTA_CHUNK;
	float *Gc = scratch;		 /* [C] cumulative log-decay inside the chunk */
	float *eG = Gc + C;		 /* [C] exp(Gc) */
	float *row = eG + C;		 /* [C] */
	float *decay = row + C;		 /* [C][C] exp(Gc_i − Gc_j), i >= j */
	float *A = decay + C * C;	 /* [C][C] strictly lower: A, then (T − I) */
	float *W = A + C * C;		 /* [C][Dk]: kβ ⊙ exp(Gc), then W = T (kβ ⊙ exp(Gc)) */
	float *kb = W + (size_t)C * Dk;	 /* [C][Dk]: k ⊙ beta */
	float *U = kb + (size_t)C * Dk;	 /* [C][Dv]: v ⊙ beta, then T (v ⊙ beta), then v_new */
	float last, el;

	for (int i = 0; i < c; i++) {
		const float *ki = k + (size_t)i * ldqk, *vi = v + (size_t)i * ldv;
		float bi = beta[(size_t)i * ldg];

		Gc[i] = (i ? Gc[i - 1] : 0.0f) + g[(size_t)i * ldg];
		eG[i] = expf(Gc[i]);
		for (int d = 0; d < Dk; d++) {
			kb[(size_t)i * Dk + d] = ki[d] * bi;
			W[(size_t)i * Dk + d] = kb[(size_t)i * Dk + d] * eG[i];
		}
		for (int e = 0; e < Dv; e++)
			U[(size_t)i * Dv + e] = vi[e] * bi;
	}
	/* A[i][j] = −(kβ_i · k_j) exp(Gc_i − Gc_j) for i > j */
	for (int i = 0; i < c; i++)
		for (int j = 0; j <= i; j++) {
			const float *kj = k + (size_t)j * ldqk;
			float s = 0.0f;

			decay[i * C + j] = expf(Gc[i] - Gc[j]);
			if (j == i) {
				A[i * C + j] = 0.0f;
				continue;
			}
			for (int d = 0; d < Dk; d++)
				s += kb[(size_t)i * Dk + d] * kj[d];
			A[i * C + j] = -(s * decay[i * C + j]);
		}
	/* forward substitution: A[i][:i] += A[i][:i] @ A[:i][:i], rows in order */
	for (int i = 1; i < c; i++) {
		for (int j = 0; j < i; j++)
			row[j] = A[i * C + j];
		for (int j = 0; j < i; j++) {
			float s = 0.0f;

			for (int m = j + 1; m < i; m++) /* A[m][j] = 0 for m <= j */
				s += row[m] * A[m * C + j];
			A[i * C + j] = row[j] + s;
		}
	}
	/* U = (A + I)(v ⊙ beta), W = (A + I)(kβ ⊙ exp(Gc)): row i adds rows j < i, which are
	 * still the inputs, so go from the last row up */
	for (int i = c - 1; i > 0; i--)
		for (int j = 0; j < i; j++) {
			axpy(U + (size_t)i * Dv, A[i * C + j], U + (size_t)j * Dv, Dv);
			axpy(W + (size_t)i * Dk, A[i * C + j], W + (size_t)j * Dk, Dk);
		}
	/* v_new = U − W S */
	for (int i = 0; i < c; i++)
		for (int d = 0; d < Dk; d++)
			axpy(U + (size_t)i * Dv, -W[(size_t)i * Dk + d], S + (size_t)d * Dv, Dv);
	/* o_i = (q_i ⊙ exp(Gc_i)) S + Σ_{j<=i} (q_i·k_j) exp(Gc_i − Gc_j) v_new_j */
	for (int i = 0; i < c; i++) {
		const float *qi = q + (size_t)i * ldqk;
		float *oi = o + (size_t)i * ldo;

		for (int e = 0; e < Dv; e++)
			oi[e] = 0.0f;
		for (int d = 0; d < Dk; d++)
			axpy(oi, qi[d] * eG[i], S + (size_t)d * Dv, Dv);
		for (int j = 0; j <= i; j++) {
			const float *kj = k + (size_t)j * ldqk;
			float s = 0.0f;

			for (int d = 0; d < Dk; d++)
				s += qi[d] * kj[d];
			axpy(oi, s * decay[i * C + j], U + (size_t)j * Dv, Dv);
		}
	}
	/* S = S exp(Gc_last) + Σ_j (k_j exp(Gc_last − Gc_j)) ⊗ v_new_j */
	last = Gc[c - 1];
	el = expf(last);
	for (int j = 0; j < c; j++)
		row[j] = expf(last - Gc[j]);
	for (int d = 0; d < Dk; d++) {
		float *Sd = S + (size_t)d * Dv;

		for (int e = 0; e < Dv; e++)
			Sd[e] *= el;
		for (int j = 0; j < c; j++)
			axpy(Sd, k[(size_t)j * ldqk + d] * row[j], U + (size_t)j * Dv, Dv);
	}
}

void q3_ref_delta_chunked(float *S, const float *q, const float *k, size_t ldqk, const float *v,
			  size_t ldv, const float *g, const float *beta, size_t ldg, float *o, size_t ldo,
			  int T, int Dk, int Dv, float *scratch)
{
	for (int t0 = 0; t0 < T; t0 += Q3_DELTA_CHUNK) {
		int c = Q3_MIN(Q3_DELTA_CHUNK, T - t0);

		delta_chunk(S, q + (size_t)t0 * ldqk, k + (size_t)t0 * ldqk, ldqk, v + (size_t)t0 * ldv, ldv,
			    g + (size_t)t0 * ldg, beta + (size_t)t0 * ldg, ldg, o + (size_t)t0 * ldo, ldo, c,
			    Dk, Dv, scratch);
	}
}

void q3_ref_router_topk(const float *logits, int E, int k, bool norm, int *idx, float *w)
{
	float mx = -INFINITY, sum = 0.0f;

	for (int e = 0; e < E; e++)
		if (logits[e] > mx)
			mx = logits[e];
	for (int e = 0; e < E; e++)
		sum += expf(logits[e] - mx);
	/* selection: repeatedly the largest not yet taken; strict '>' keeps the lower index on ties */
	for (int i = 0; i < k; i++) {
		int best = -1;
		float bp = 0.0f;

		for (int e = 0; e < E; e++) {
			float p = expf(logits[e] - mx) / sum;
			bool taken = false;

			for (int j = 0; j < i; j++)
				taken |= idx[j] == e;
			if (!taken && (best < 0 || p > bp)) {
				best = e;
				bp = p;
			}
		}
		idx[i] = best;
		w[i] = bp;
	}
	if (norm) {
		float s = 0.0f;

		for (int i = 0; i < k; i++)
			s += w[i];
		for (int i = 0; i < k; i++)
			w[i] /= s;
	}
}

void q3_ref_swiglu(float *y, const float *g, const float *u, int n)
{
	for (int i = 0; i < n; i++)
		y[i] = q3_silu(g[i]) * u[i];
}

static uint32_t load_u32(const struct q3_tensor *t, size_t i)
{
	uint32_t v;

	memcpy(&v, (const char *)t->data + 4 * i, 4);
	return v;
}

/* W[n][k] of a GPTQ Linear, decoded from the packed words (qwen3next.md 5.2 - 5.4). */
static float gptq_weight(const struct q3_linear *l, int n, int k)
{
	int per = 32 / l->bits;
	uint32_t mask = (1u << l->bits) - 1;
	int g = l->g_idx ? (int)load_u32(l->g_idx, (size_t)k) : k / l->group_size;
	uint32_t qw = load_u32(l->qweight, (size_t)(k / per) * l->N + n);
	uint32_t qz = load_u32(l->qzeros, (size_t)g * (l->N / per) + n / per);
	int q = (int)((qw >> (l->bits * (k % per))) & mask);
	int z = (int)((((qz >> (l->bits * (n % per))) & mask) + (uint32_t)l->zero_offset) & mask);

	return q3_tensor_f32_at(l->scales, (uint64_t)g * l->N + n) * (float)(q - z);
}

void q3_ref_linear(const struct q3_linear *l, const float *x, int T, float *y)
{
	for (int t = 0; t < T; t++)
		for (int n = 0; n < l->N; n++) {
			const float *xt = x + (size_t)t * l->K;
			float acc = 0.0f;

			for (int k = 0; k < l->K; k++) {
				float w = l->fmt == Q3_W_DENSE ? q3_tensor_f32_at(l->w, (uint64_t)n * l->K + k)
							       : gptq_weight(l, n, k);
				acc += xt[k] * w;
			}
			y[(size_t)t * l->N + n] = acc;
		}
}

size_t q3_ref_moe_scratch(const struct q3_config *c)
{
	int I = Q3_MAX(c->moe_inter, c->shared_inter);

	/* logits [E], weights [k], gate and up [I] each, expert output [H], indices [k] */
	return (size_t)c->num_experts + 2 * (size_t)c->top_k + 2 * (size_t)I + (size_t)c->hidden_size;
}

/* y += wt · expert(x) */
static void expert_acc(const struct q3_expert *x_, int I, int H, const float *x, float wt, float *y,
		       float *gbuf, float *ubuf, float *ye)
{
	q3_ref_linear(&x_->gate, x, 1, gbuf);
	q3_ref_linear(&x_->up, x, 1, ubuf);
	q3_ref_swiglu(gbuf, gbuf, ubuf, I);
	q3_ref_linear(&x_->down, gbuf, 1, ye);
	for (int i = 0; i < H; i++)
		y[i] += wt * ye[i];
}

void q3_ref_moe(const struct q3_config *c, const struct q3_layer *L, const float *x, float *y,
		float *scratch)
{
	int E = c->num_experts, K = c->top_k, H = c->hidden_size;
	int I = Q3_MAX(c->moe_inter, c->shared_inter);
	float *logits = scratch, *w = logits + E, *gbuf = w + K, *ubuf = gbuf + I, *ye = ubuf + I;
	int *idx = (int *)(ye + H); /* k ints after ye (sizeof(int) == sizeof(float)) */
	float sg;

	q3_ref_linear(&L->router, x, 1, logits);
	q3_ref_router_topk(logits, E, K, c->norm_topk_prob, idx, w);
	for (int i = 0; i < H; i++)
		y[i] = 0.0f;
	/* routed experts in ascending expert id (the order HF accumulates them) */
	for (int e = 0; e < E; e++)
		for (int j = 0; j < K; j++)
			if (idx[j] == e)
				expert_acc(&L->experts[e], c->moe_inter, H, x, w[j], y, gbuf, ubuf, ye);
	q3_ref_linear(&L->shared_gate, x, 1, &sg);
	expert_acc(&L->shared, c->shared_inter, H, x, q3_sigmoid(sg), y, gbuf, ubuf, ye);
}
