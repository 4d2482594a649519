/* engine.c - engines and sessions (engine.h) on top of a backend (backend.h).
 *
 * Opening: checkpoint (config, shards, tensor table) -> role binding -> tensor bytes (mapped
 * for now; the loader will stream them) -> data checks -> the chosen backend prepares its
 * weights.  Sessions are a backend state plus a position; this file validates every request
 * (ids, capacity, batch) before the backend sees it, and splits long prompts into calls of at
 * most max_tokens tokens.
 */
#include "engine.h"
#include "loader.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "checkpoint.h"
#include "knobs.h"
#include "model.h"

#define DEFAULT_MAX_CTX 4096
#define DEFAULT_MAX_BATCH 16
/* Tokens per backend call: prompts longer than this are fed in several calls. */
#define MAX_TOKENS 256

struct q3_engine {
	struct q3_ckpt *ck;
	struct q3_model *m;
	struct q3_load *ld; /* the weights' host memory (loader.h) */
	struct q3_load_stats load;
	const struct q3_backend_ops *ops;
	void *bk;
	struct q3_backend_opts bo;
	struct q3_fwd_seq *seqs; /* [max_batch], for q3_engine_decode */
	/* q3_engine_decode_sample: the draws' plans (backends that sample) or the logits (others),
	 * allocated on first use */
	struct q3_sample_row *srows; /* [max_batch] */
	struct q3_logit_adj *adj;    /* [Q3_SAMPLE_ADJ_MAX] */
	float *logits;		     /* [max_batch][V] */
	uint64_t draws_backend, draws_host;
};

struct q3_session {
	struct q3_engine *eng;
	void *st;
	int pos;
};

/* The backend a name asks for; *fallback is set when another may be tried if it fails to open
 * ("auto": CUDA where built, else or failing that the CPU). */
static int pick_backend(const char *name, const struct q3_backend_ops **out,
			const struct q3_backend_ops **fallback, q3_err *e)
{
	*fallback = NULL;
	if (!name || !strcmp(name, "auto")) {
		*out = q3_cuda_backend_ops() ? q3_cuda_backend_ops() : &q3_backend_cpu;
		if (*out != &q3_backend_cpu)
			*fallback = &q3_backend_cpu;
		return 0;
	}
	if (!strcmp(name, "cpu")) {
		*out = &q3_backend_cpu;
		return 0;
	}
	if (!strcmp(name, "cuda")) {
		*out = q3_cuda_backend_ops();
		if (!*out)
			return q3_errf(e, -ENOTSUP, "backend cuda: %s (use --backend cpu)",
				       q3_backend_cuda ? "no usable CUDA device" : "this build has no CUDA backend");
		return 0;
	}
	return q3_errf(e, -EINVAL, "backend '%s': expected cpu, cuda or auto", name);
}

void q3_engine_close(struct q3_engine *eng)
{
	if (!eng)
		return;
	if (eng->bk)
		eng->ops->close(eng->bk);
	free(eng->seqs);
	free(eng->srows);
	free(eng->adj);
	free(eng->logits);
	q3_model_free(eng->m);
	q3_load_free(eng->ld);
	q3_ckpt_close(eng->ck);
	free(eng);
}

int q3_engine_open(const struct q3_engine_opts *o, struct q3_engine **out, q3_err *e)
{
	struct q3_engine *eng;
	const struct q3_config *c;
	const struct q3_backend_ops *fallback;
	int err;

	*out = NULL;
	if (!o || !o->model_dir)
		return q3_errf(e, -EINVAL, "engine: no model folder given");
	if (o->threads < 0 || o->max_ctx < 0 || o->max_batch < 0)
		return q3_errf(e, -EINVAL, "engine: negative threads, max_ctx or max_batch");
	eng = calloc(1, sizeof(*eng));
	if (!eng)
		return q3_errf(e, -ENOMEM, "out of memory");
	if ((err = pick_backend(o->backend, &eng->ops, &fallback, e)))
		goto fail;
	if ((err = q3_ckpt_open(o->model_dir, &eng->ck, e)) ||
	    (err = q3_model_bind(eng->ck, &eng->m, e)))
		goto fail;
	{
		/* Every tensor's home is pinned RAM here; backends copy what they want on the device. */
		struct q3_load_opts lo = { .node = -1, .req_bytes = o->read_chunk, .qd = o->queue_depth,
					   .progress = !o->quiet };

		if ((err = q3_load(eng->ck, &lo, &eng->ld, &eng->load, e)))
			goto fail;
		if (!o->quiet && eng->ck->total_bytes > (64u << 20))
			q3_info("engine: loaded %.2f GB in %.2f s (%s; %s)", eng->load.bytes / 1e9,
				eng->load.t_total, eng->load.path, eng->load.mem);
	}
	if ((err = q3_model_check_data(eng->m, e)))
		goto fail;
	c = &eng->ck->cfg;
	eng->bo = (struct q3_backend_opts){
		.threads = o->threads ? o->threads : q3_ncpu(),
		.max_ctx = o->max_ctx ? o->max_ctx : Q3_MIN(DEFAULT_MAX_CTX, c->max_position_embeddings),
		.max_batch = o->max_batch ? o->max_batch : DEFAULT_MAX_BATCH,
		.vram_budget = o->vram_budget,
		.expert_threads = o->expert_threads,
		.expert_cache = Q3_CACHE_LRU,
		.expert_stats = o->expert_stats && *o->expert_stats ? o->expert_stats : NULL,
		.quiet = o->quiet,
	};
	if (o->expert_cache && *o->expert_cache) {
		int p = q3_cache_policy_parse(o->expert_cache);

		if (p < 0) {
			err = q3_errf(e, -EINVAL, "engine: expert_cache '%s': expected lru, lfu or static",
				      o->expert_cache);
			goto fail;
		}
		eng->bo.expert_cache = p;
	}
	if (eng->bo.max_ctx > c->max_position_embeddings) {
		err = q3_errf(e, -EINVAL, "engine: max_ctx %d exceeds the model's max_position_embeddings %d",
			      eng->bo.max_ctx, c->max_position_embeddings);
		goto fail;
	}
	eng->bo.max_tokens = Q3_MAX(eng->ops->max_tokens ? eng->ops->max_tokens : MAX_TOKENS, eng->bo.max_batch);
	eng->seqs = calloc((size_t)eng->bo.max_batch, sizeof(*eng->seqs));
	if (!eng->seqs) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto fail;
	}
	err = eng->ops->open(eng->m, &eng->bo, &eng->bk, e);
	if (err && fallback) {
		if (!o->quiet)
			q3_info("engine: backend %s unavailable (%s); using %s", eng->ops->name, e ? e->msg : "",
				fallback->name);
		eng->ops = fallback;
		eng->bo.max_tokens = Q3_MAX(fallback->max_tokens ? fallback->max_tokens : MAX_TOKENS, eng->bo.max_batch);
		err = eng->ops->open(eng->m, &eng->bo, &eng->bk, e);
	}
	if (err)
		goto fail;
	if (!o->quiet)
		q3_info("engine: %s, %d layers, backend %s, %d threads, max_ctx %d, max_batch %d",
			o->model_dir, c->num_layers, eng->ops->name, eng->bo.threads, eng->bo.max_ctx,
			eng->bo.max_batch);
	*out = eng;
	return 0;
fail:
	q3_engine_close(eng);
	return err;
}

const struct q3_config *q3_engine_config(const struct q3_engine *eng)
{
	return &eng->ck->cfg;
}

void q3_engine_stats(const struct q3_engine *eng, struct q3_engine_stats *s)
{
	memset(s, 0, sizeof(*s));
	if (eng->ops->stats)
		eng->ops->stats(eng->bk, s);
	s->draws_backend = eng->draws_backend;
	s->draws_host = eng->draws_host;
}

void q3_engine_load_info(const struct q3_engine *eng, struct q3_engine_load *l)
{
	l->bytes = eng->load.bytes;
	l->seconds = eng->load.t_total;
	snprintf(l->path, sizeof(l->path), "%s", eng->load.path);
	snprintf(l->mem, sizeof(l->mem), "%s", eng->load.mem);
}

int q3_engine_idle(struct q3_engine *eng, q3_err *e)
{
	return eng->ops->idle ? eng->ops->idle(eng->bk, e) : 0;
}

const char *q3_engine_backend(const struct q3_engine *eng)
{
	return eng->ops->name;
}

int q3_engine_max_ctx(const struct q3_engine *eng)
{
	return eng->bo.max_ctx;
}

int q3_engine_max_batch(const struct q3_engine *eng)
{
	return eng->bo.max_batch;
}

const struct q3_model *q3_engine_model(const struct q3_engine *eng)
{
	return eng->m;
}

int q3_engine_set_trace(struct q3_engine *eng, q3_trace_fn fn, void *ctx)
{
	if (!eng->ops->set_trace)
		return -ENOTSUP;
	eng->ops->set_trace(eng->bk, fn, ctx);
	return 0;
}

int q3_session_new(struct q3_engine *eng, struct q3_session **out, q3_err *e)
{
	struct q3_session *s = calloc(1, sizeof(*s));
	int err;

	*out = NULL;
	if (!s)
		return q3_errf(e, -ENOMEM, "out of memory");
	s->eng = eng;
	if ((err = eng->ops->state_new(eng->bk, &s->st, e))) {
		free(s);
		return err;
	}
	*out = s;
	return 0;
}

void q3_session_free(struct q3_session *s)
{
	if (!s)
		return;
	s->eng->ops->state_free(s->eng->bk, s->st);
	free(s);
}

int q3_session_pos(const struct q3_session *s)
{
	return s->pos;
}

void q3_session_reset(struct q3_session *s)
{
	s->pos = 0; /* backends start from an empty state at position 0 */
}

int q3_session_copy(struct q3_session *dst, const struct q3_session *src, q3_err *e)
{
	if (dst->eng != src->eng)
		return q3_errf(e, -EINVAL, "session copy: the sessions belong to different engines");
	if (dst != src) {
		int err = dst->eng->ops->state_copy(dst->eng->bk, dst->st, src->st, src->pos, e);

		if (err) {
			dst->pos = 0; /* its state is unknown: start over */
			return err;
		}
	}
	dst->pos = src->pos;
	return 0;
}

static int check_ids(const struct q3_engine *eng, const int32_t *ids, int n, q3_err *e)
{
	int V = eng->ck->cfg.vocab_size;

	for (int i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= V)
			return q3_errf(e, -EINVAL, "token id %d (item %d) is outside the vocabulary [0, %d)",
				       ids[i], i, V);
	return 0;
}

int q3_session_eval(struct q3_session *s, const int32_t *ids, int n, float *logits, unsigned flags,
		    q3_err *e)
{
	struct q3_engine *eng = s->eng;
	bool all = flags & Q3_EVAL_ALL_LOGITS;
	size_t V = (size_t)eng->ck->cfg.vocab_size;
	int err;

	if (n < 1)
		return q3_errf(e, -EINVAL, "eval: no tokens to feed");
	if ((err = check_ids(eng, ids, n, e)))
		return err;
	if (n > eng->bo.max_ctx - s->pos)
		return q3_errf(e, -ENOSPC, "eval: %d tokens at position %d pass the context of %d", n, s->pos,
			       eng->bo.max_ctx);
	for (int off = 0; off < n; off += eng->bo.max_tokens) {
		int len = Q3_MIN(eng->bo.max_tokens, n - off);
		bool last = off + len == n;
		struct q3_fwd_seq sq = {
			.state = s->st,
			.pos = s->pos,
			.n = len,
			.ids = ids + off,
			.logits = !logits ? NULL : all ? logits + (size_t)off * V : last ? logits : NULL,
			.all_logits = all,
		};

		if ((err = eng->ops->forward(eng->bk, &sq, 1, e))) {
			s->pos = 0;
			return err;
		}
		s->pos += len;
	}
	return 0;
}

/* Checks a decode step's arguments and fills eng->seqs (logits NULL: none). */
static int decode_prep(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n, float *logits,
		       q3_err *e)
{
	size_t V = (size_t)eng->ck->cfg.vocab_size;
	int err;

	if (n < 1 || n > eng->bo.max_batch)
		return q3_errf(e, -EINVAL, "decode: %d sessions, expected 1 to %d", n, eng->bo.max_batch);
	if ((err = check_ids(eng, ids, n, e)))
		return err;
	for (int i = 0; i < n; i++) {
		if (ss[i]->eng != eng)
			return q3_errf(e, -EINVAL, "decode: session %d belongs to another engine", i);
		if (ss[i]->pos >= eng->bo.max_ctx)
			return q3_errf(e, -ENOSPC, "decode: session %d is at the context limit %d", i,
				       eng->bo.max_ctx);
		for (int j = 0; j < i; j++)
			if (ss[j] == ss[i])
				return q3_errf(e, -EINVAL, "decode: session %d appears twice", i);
		eng->seqs[i] = (struct q3_fwd_seq){
			.state = ss[i]->st,
			.pos = ss[i]->pos,
			.n = 1,
			.ids = ids + i,
			.logits = logits ? logits + (size_t)i * V : NULL,
		};
	}
	return 0;
}

/* Runs the step eng->seqs[0 .. n) and advances the sessions (resets them on failure). */
static int decode_run(struct q3_engine *eng, struct q3_session **ss, int n, q3_err *e)
{
	int err;

	if ((err = eng->ops->forward(eng->bk, eng->seqs, n, e))) {
		for (int i = 0; i < n; i++)
			ss[i]->pos = 0;
		return err;
	}
	for (int i = 0; i < n; i++)
		ss[i]->pos++;
	return 0;
}

int q3_engine_decode(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n,
		     float *logits, q3_err *e)
{
	int err = decode_prep(eng, ss, ids, n, logits, e);

	return err ? err : decode_run(eng, ss, n, e);
}

/* Plans every row's draw for the backend; false (no step taken) where one does not fit. */
static bool plan_draws(struct q3_engine *eng, struct q3_sampler **smp, int32_t *out, int n)
{
	int used = 0, i;

	for (i = 0; i < n; i++) {
		if (q3_sampler_plan(smp[i], &eng->srows[i], eng->adj + used, Q3_SAMPLE_ADJ_MAX - used))
			break;
		used += eng->srows[i].nbias + eng->srows[i].npen;
		eng->seqs[i].sample = &eng->srows[i];
		eng->seqs[i].token = &out[i];
	}
	if (i == n)
		return true;
	while (i-- > 0) { /* the host draws instead, with the same step numbers */
		smp[i]->step--;
		eng->seqs[i].sample = NULL;
		eng->seqs[i].token = NULL;
	}
	return false;
}

int q3_engine_decode_sample(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n,
			    struct q3_sampler **smp, int32_t *out, q3_err *e)
{
	size_t V = (size_t)eng->ck->cfg.vocab_size;
	const char *hs = getenv("QWEN3D_HOST_SAMPLING");
	bool dev = eng->ops->samples && !(hs && *hs && strcmp(hs, "0"));
	int err;

	if ((err = decode_prep(eng, ss, ids, n, NULL, e)))
		return err;
	if (dev && !eng->srows) {
		eng->srows = calloc((size_t)eng->bo.max_batch, sizeof(*eng->srows));
		eng->adj = malloc(Q3_SAMPLE_ADJ_MAX * sizeof(*eng->adj));
		if (!eng->srows || !eng->adj) {
			free(eng->srows);
			free(eng->adj);
			eng->srows = NULL;
			eng->adj = NULL;
			return q3_errf(e, -ENOMEM, "decode: out of memory for the draws' plans");
		}
	}
	if (dev && plan_draws(eng, smp, out, n)) {
		if ((err = decode_run(eng, ss, n, e)))
			return err;
		for (int i = 0; i < n; i++)
			out[i] = out[i] < 0 ? -EDOM : out[i];
		eng->draws_backend += (uint64_t)n;
		return 0;
	}
	if (!eng->logits && !(eng->logits = malloc((size_t)eng->bo.max_batch * V * sizeof(float))))
		return q3_errf(e, -ENOMEM, "decode: out of memory for %d rows of logits", eng->bo.max_batch);
	for (int i = 0; i < n; i++)
		eng->seqs[i].logits = eng->logits + (size_t)i * V;
	if ((err = decode_run(eng, ss, n, e)))
		return err;
	for (int i = 0; i < n; i++)
		out[i] = q3_sampler_sample(smp[i], eng->logits + (size_t)i * V);
	eng->draws_host += (uint64_t)n;
	return 0;
}
