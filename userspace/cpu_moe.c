/* cpu_moe.c - the CPU's share of a MoE layer on the expert threads (see cpu_moe.h). */
#include "cpu_moe.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"

enum { PH_PLAN, PH_ACT, PH_GATEUP, PH_DOWN, NPH };

/* One distinct expert of a call. */
struct slot {
	const struct q3_xexpert *x;
	int id;
	int n;		   /* tokens routed to it */
	int off;	   /* its first pair row */
	int16_t *tok;	   /* [n] token indices */
	float *wt;	   /* [n] routing weights */
	struct q3_xact ag, au; /* gate / up input views (rows = tok, or its own rows) */
	struct q3_xact ah; /* down input: rows off .. off + n - 1 of the h activation */
};

/* Phase 1 work item: quantize blocks [b0, b1) of x[tok] through perm into storage row `row` of act. */
struct act_item {
	struct q3_xact *act;
	int row, tok;
	const uint16_t *perm;
	int b0, b1;
};

/* the shared activation rows (no permutation) are cut into this many block ranges, so that at
 * decode, where one row is all there is, the workers share it instead of one converting it while
 * the others wait */
#define ACT_PARTS 8

struct q3_cpu_moe {
	struct q3_cpu_moe_opts o;
	struct q3_xpool *pool;
	int nw, max_pairs;
	/* the call */
	struct q3_cpu_moe_req r;
	int err;
	char errmsg[160];
	int nslots, nact, tasks_gu, tasks_dn, units_gu;
	struct slot *slots;	 /* [max_pairs] */
	int *slot_of;		 /* [num_experts]: slot + 1, 0 = none */
	int16_t *tok_store;	 /* [max_pairs] */
	float *wt_store;	 /* [max_pairs] */
	struct act_item *items;	 /* [max_pairs * 2 + max_tokens] */
	int *chunk_slot, *chunk_j0; /* [max_pairs]: token chunk c is rows chunk_j0[c] .. of slot chunk_slot[c] */
	struct q3_xact xs;	 /* shared input: one row per token */
	struct q3_xact xp;	 /* per-pair inputs (perms): gate rows, then up rows */
	struct q3_xact xh;	 /* down inputs, one row per pair */
	float *G, *U;		 /* [max_pairs][I] */
	float **ytmp;		 /* per worker [Q3_XT_MAX][H] */
	void *mem;
	double t0, t1, t_act, t_gu; /* job start and end; ends of the activation and gate / up phases */
	atomic_int act_left, gu_left, dn_left, plan_left;
	struct q3_cpu_moe_stats st;
	uint64_t call_bytes;
	int call_pairs, call_skipped, call_elsewhere, ldk;
	bool posted;
};

static int fail(struct q3_cpu_moe *m, const char *msg, int v)
{
	m->err = -EINVAL;
	snprintf(m->errmsg, sizeof(m->errmsg), msg, v);
	return m->err;
}

static bool same_perm(const uint16_t *a, const uint16_t *b, int K)
{
	return a == b || (a && b && !memcmp(a, b, (size_t)K * 2));
}

static void act_view(struct q3_xact *v, const struct q3_xact *base, int row0, int n, int K)
{
	*v = *base;
	v->T = n;
	v->rows = NULL;
	if (v->q) {
		v->q += (size_t)row0 * (size_t)K;
		v->d += (size_t)row0 * (size_t)(K / Q3_XBLOCK);
	}
	if (v->xs)
		v->xs += (size_t)row0 * (size_t)K;
	v->bsum += (size_t)row0 * (size_t)(K / Q3_XBLOCK);
}

/* Without act-order permutations every expert reads the shared rows (one a token): phase 0
 * quantizes them in ACT_PARTS block ranges a row beside the plan, and the activation phase is
 * empty (the pool leaves out its barrier).  Needs only the request, so every worker agrees. */
static bool act_early(const struct q3_cpu_moe *m)
{
	return !m->o.perms && m->r.T > 0 && m->r.T <= m->o.max_tokens && (m->r.x || m->r.xh);
}

static int act_parts(const struct q3_cpu_moe *m)
{
	return Q3_MIN(ACT_PARTS, m->o.H / Q3_XBLOCK);
}

/* How many of a token's routed experts in the table, the first ones in routing order, are the
 * CPU's: all but the last min(elsewhere, m - keep) (cpu_moe.h). */
static int cpu_share(const struct q3_cpu_moe *m, const int32_t *ids)
{
	const struct q3_cpu_moe_req *r = &m->r;
	int n = 0;

	for (int i = 0; i < r->k; i++)
		n += ids[i] >= 0 && ids[i] < m->o.num_experts && r->experts[ids[i]];
	return n - Q3_MIN(r->elsewhere, Q3_MAX(0, n - r->keep));
}

/* Whether the CPU computes the routed entry (expert id) of a token: the expert is in the table
 * and within the token's share (*left, from cpu_share, counts it down). */
static bool cpu_computes(const struct q3_cpu_moe_req *r, int id, int *left)
{
	if (!r->experts[id])
		return false;
	if (*left > 0) {
		(*left)--;
		return true;
	}
	return false;
}

/* Phase 0: pairs grouped by expert, activation items, task counts. */
static void plan(struct q3_cpu_moe *m)
{
	const struct q3_cpu_moe_req *r = &m->r;
	int H = m->o.H, I = m->o.I, pairs = 0, nw = m->nw;
	bool shared_used = false;

	m->nslots = m->nact = m->tasks_gu = m->tasks_dn = 0;
	m->call_bytes = 0;
	m->call_skipped = m->call_elsewhere = 0;
	m->ldk = r->ldk ? r->ldk : r->k;
	if (r->T < 0 || r->T > m->o.max_tokens || r->k < 0 || r->k > m->o.top_k || m->ldk < r->k ||
	    (!r->x && !r->xh)) {
		fail(m, "cpu experts: %d tokens or routing width past the limits", r->T);
		return;
	}
	/* count tokens per expert, in ascending expert order */
	memset(m->slot_of, 0, sizeof(int) * (size_t)m->o.num_experts);
	for (int t = 0; t < r->T; t++)
		for (int i = 0, left = cpu_share(m, r->ids + (size_t)t * m->ldk); i < r->k; i++) {
			int id = r->ids[(size_t)t * m->ldk + i];

			if (id < 0 || id >= m->o.num_experts) {
				fail(m, "cpu experts: routed expert id %d out of range", id);
				return;
			}
			if (cpu_computes(r, id, &left))
				m->slot_of[id]++;
			else if (r->experts[id])
				m->call_elsewhere++;
			else
				m->call_skipped++;
		}
	if (r->stats)
		for (int t = 0; t < (r->stats_rows > 0 ? Q3_MIN(r->stats_rows, r->T) : r->T); t++)
			q3_xstats_add(r->stats, r->layer, r->ids + (size_t)t * m->ldk, r->k);
	for (int id = 0; id < m->o.num_experts; id++) {
		struct slot *s;

		if (!m->slot_of[id])
			continue;
		s = &m->slots[m->nslots];
		s->x = r->experts[id];
		s->id = id;
		s->off = pairs;
		s->n = 0;
		s->tok = m->tok_store + pairs;
		s->wt = m->wt_store + pairs;
		pairs += m->slot_of[id];
		m->slot_of[id] = ++m->nslots;
		m->call_bytes += q3_xexpert_bytes(s->x);
	}
	for (int t = 0; t < r->T; t++)
		for (int i = 0, left = cpu_share(m, r->ids + (size_t)t * m->ldk); i < r->k; i++) {
			int id = r->ids[(size_t)t * m->ldk + i];

			if (cpu_computes(r, id, &left)) {
				struct slot *s = &m->slots[m->slot_of[id] - 1];

				s->tok[s->n] = (int16_t)t;
				s->wt[s->n++] = r->w[(size_t)t * m->ldk + i];
			}
		}
	m->call_pairs = pairs;
	/* activations: the shared one for experts without permutations, else per pair rows */
	for (int i = 0; i < m->nslots; i++) {
		struct slot *s = &m->slots[i];
		const uint16_t *pg = s->x->gate.perm, *pu = s->x->up.perm;

		act_view(&s->ah, &m->xh, s->off, s->n, I);
		if (!pg && !pu) {
			s->ag = m->xs;
			s->ag.T = s->n;
			s->ag.rows = s->tok;
			s->au = s->ag;
			shared_used = true;
			continue;
		}
		act_view(&s->ag, &m->xp, s->off, s->n, H);
		for (int j = 0; j < s->n; j++)
			m->items[m->nact++] = (struct act_item){&s->ag, j, s->tok[j], pg, 0, H / Q3_XBLOCK};
		if (same_perm(pg, pu, H)) {
			s->au = s->ag;
			continue;
		}
		act_view(&s->au, &m->xp, m->max_pairs + s->off, s->n, H);
		for (int j = 0; j < s->n; j++)
			m->items[m->nact++] = (struct act_item){&s->au, j, s->tok[j], pu, 0, H / Q3_XBLOCK};
	}
	if (shared_used && !act_early(m)) {
		int nb = H / Q3_XBLOCK, parts = act_parts(m);

		for (int t = 0; t < r->T; t++)
			for (int q = 0; q < parts; q++)
				m->items[m->nact++] = (struct act_item){&m->xs, t, t, NULL, q * nb / parts,
									(q + 1) * nb / parts};
	}
	/* gate/up: units of (token chunk, tile of Q3_XTILE intermediate columns), cut into contiguous
	 * runs.  One run a worker where every unit costs the same (each chunk has as many tokens: a
	 * decode step), so that no worker takes a second round while the others wait; four a worker
	 * otherwise, for the dynamic scheduling to even out.  down: runs of output tiles. */
	int tiles_i = I / Q3_XTILE, tiles_h = H / Q3_XTILE, chunks = 0;
	bool even = true;

	for (int i = 0; i < m->nslots; i++)
		for (int j0 = 0; j0 < m->slots[i].n; j0 += Q3_XT_MAX) {
			m->chunk_slot[chunks] = i;
			m->chunk_j0[chunks++] = j0;
			even &= Q3_MIN(Q3_XT_MAX, m->slots[i].n - j0) == Q3_MIN(Q3_XT_MAX, m->slots[0].n);
		}
	m->units_gu = chunks * tiles_i;
	m->tasks_gu = Q3_MIN(m->units_gu, nw * (even ? 1 : 4));
	m->tasks_dn = r->T ? Q3_MIN(tiles_h, nw) : 0;
	atomic_store(&m->act_left, m->nact);
	atomic_store(&m->gu_left, m->tasks_gu);
	atomic_store(&m->dn_left, m->tasks_dn);
}

static void act_run(struct q3_cpu_moe *m, const struct act_item *it, int worker)
{
	const float *x = m->r.x + (size_t)it->tok * m->r.ldx;

	if (!m->r.x) { /* fp16 rows (the GPU's activations): to fp32 in this worker's scratch
		       * (free until phase 3); the item's blocks, or all of them through a permutation */
		const uint16_t *xh = m->r.xh + (size_t)it->tok * m->r.ldx;
		float *f = m->ytmp[worker];
		int k0 = it->perm ? 0 : it->b0 * Q3_XBLOCK, k1 = it->perm ? m->o.H : it->b1 * Q3_XBLOCK;

		for (int k = k0; k < k1; k++)
			f[k] = q3_f16_to_f32(xh[k]);
		x = f;
	}
	q3_xact_set_blocks(m->o.isa, it->act, it->row, x, it->perm, it->b0, it->b1);
}

static void task_act(struct q3_cpu_moe *m, int i, int worker)
{
	act_run(m, &m->items[i], worker);
	if (atomic_fetch_sub(&m->act_left, 1) == 1)
		m->t_act = q3_now();
}

/* Phase 0 task i > 0: block range (i - 1) % parts of shared row (i - 1) / parts. */
static void task_act_early(struct q3_cpu_moe *m, int i, int worker)
{
	int parts = act_parts(m), nb = m->o.H / Q3_XBLOCK, t = (i - 1) / parts, q = (i - 1) % parts;
	struct act_item it = { &m->xs, t, t, NULL, q * nb / parts, (q + 1) * nb / parts };

	act_run(m, &it, worker);
}

/* Rows j0 .. j0 + Q3_XT_MAX - 1 of slot s, intermediate tiles [tile0, tile1): gate, up, silu(gate)·up
 * quantized into the down activations. */
static void gateup_run(struct q3_cpu_moe *m, int s, int j0, int tile0, int tile1)
{
	int I = m->o.I;
	struct slot *sl = &m->slots[s];
	int nt = Q3_MIN(Q3_XT_MAX, sl->n - j0);
	struct q3_xact ag = sl->ag, au = sl->au;
	float *G = m->G + (size_t)(sl->off + j0) * (size_t)I, *U = m->U + (size_t)(sl->off + j0) * (size_t)I;

	/* rows j0 .. j0 + nt - 1 of the expert's inputs */
	ag.T = au.T = nt;
	if (ag.rows)
		ag.rows += j0;
	else
		act_view(&ag, &sl->ag, j0, nt, m->o.H);
	if (au.rows)
		au.rows += j0;
	else
		act_view(&au, &sl->au, j0, nt, m->o.H);
	q3_xmat_run(m->o.isa, &sl->x->gate, &ag, G, (size_t)I, tile0, tile1);
	q3_xmat_run(m->o.isa, &sl->x->up, &au, U, (size_t)I, tile0, tile1);
	for (int t = 0; t < nt; t++) {
		float *g = G + (size_t)t * (size_t)I, *u = U + (size_t)t * (size_t)I;

		for (int c = tile0 * Q3_XTILE; c < tile1 * Q3_XTILE; c++)
			g[c] = g[c] / (1.0f + expf(-g[c])) * u[c];
		/* Q3_XTILE is a multiple of Q3_XBLOCK: the tiles are whole blocks */
		q3_xact_set_blocks(m->o.isa, &m->xh, sl->off + j0 + t, g, NULL,
				   tile0 * Q3_XTILE / Q3_XBLOCK, tile1 * Q3_XTILE / Q3_XBLOCK);
	}
}

/* Phase 2 task i: a contiguous run of (token chunk, intermediate tile) units. */
static void task_gateup(struct q3_cpu_moe *m, int i)
{
	int tiles_i = m->o.I / Q3_XTILE;
	int u0 = (int)((long)i * m->units_gu / m->tasks_gu), u1 = (int)((long)(i + 1) * m->units_gu / m->tasks_gu);

	while (u0 < u1) {
		int c = u0 / tiles_i, tile0 = u0 % tiles_i, tile1 = Q3_MIN(tiles_i, tile0 + (u1 - u0));

		gateup_run(m, m->chunk_slot[c], m->chunk_j0[c], tile0, tile1);
		u0 += tile1 - tile0;
	}
	if (atomic_fetch_sub(&m->gu_left, 1) == 1)
		m->t_gu = q3_now();
}

/* Phase 3 task i: output tiles [tile0, tile1) of every token, experts in ascending order. */
static void task_down(struct q3_cpu_moe *m, int i, int worker)
{
	const struct q3_cpu_moe_req *r = &m->r;
	int H = m->o.H, tiles_h = H / Q3_XTILE;
	int tile0 = i * tiles_h / m->tasks_dn, tile1 = (i + 1) * tiles_h / m->tasks_dn;
	int c0 = tile0 * Q3_XTILE, c1 = tile1 * Q3_XTILE;
	float *y = m->ytmp[worker];

	for (int t = 0; t < r->T; t++)
		memset(r->out + (size_t)t * r->ldo + c0, 0, sizeof(float) * (size_t)(c1 - c0));
	for (int s = 0; s < m->nslots; s++) {
		struct slot *sl = &m->slots[s];

		for (int j0 = 0; j0 < sl->n; j0 += Q3_XT_MAX) {
			int nt = Q3_MIN(Q3_XT_MAX, sl->n - j0);
			struct q3_xact ah;

			act_view(&ah, &sl->ah, j0, nt, m->o.I);
			q3_xmat_run(m->o.isa, &sl->x->down, &ah, y, (size_t)H, tile0, tile1);
			for (int t = 0; t < nt; t++) {
				float *o = r->out + (size_t)sl->tok[j0 + t] * r->ldo, w = sl->wt[j0 + t];
				const float *yt = y + (size_t)t * (size_t)H;

				for (int c = c0; c < c1; c++)
					o[c] += w * yt[c];
			}
		}
	}
	if (atomic_fetch_sub(&m->dn_left, 1) == 1)
		m->t1 = q3_now();
}

static int job_ntasks(void *ctx, int ph)
{
	struct q3_cpu_moe *m = ctx;

	if (ph == PH_PLAN)
		return 1 + (act_early(m) ? m->r.T * act_parts(m) : 0);
	if (m->err)
		return 0;
	return ph == PH_ACT ? m->nact : ph == PH_GATEUP ? m->tasks_gu : m->tasks_dn;
}

static void job_task(void *ctx, int ph, int i, int worker)
{
	struct q3_cpu_moe *m = ctx;

	switch (ph) {
	case PH_PLAN:
		if (i == 0) {
			m->t0 = m->t1 = m->t_act = m->t_gu = q3_now(); /* phases without tasks take no time */
			plan(m);
		} else {
			task_act_early(m, i, worker);
		}
		/* the last task of phase 0 ends the activations when phase 1 has none (else phase 1's) */
		if (atomic_fetch_sub(&m->plan_left, 1) == 1)
			m->t_act = q3_now();
		break;
	case PH_ACT:
		task_act(m, i, worker);
		break;
	case PH_GATEUP:
		task_gateup(m, i);
		break;
	default:
		task_down(m, i, worker);
	}
}

static size_t al(size_t n)
{
	return Q3_ALIGN_UP(n, 64);
}

int q3_cpu_moe_new(struct q3_xpool *pool, const struct q3_cpu_moe_opts *o, struct q3_cpu_moe **out,
		   q3_err *e)
{
	struct q3_cpu_moe *m;
	int P, T, nw = q3_xpool_size(pool);
	size_t sz[8], total = 0;
	char *p;

	*out = NULL;
	if (o->H <= 0 || o->I <= 0 || o->H % Q3_XTILE || o->I % Q3_XTILE || o->num_experts <= 0 ||
	    o->top_k <= 0 || o->max_tokens <= 0 || o->max_tokens > 32767 ||
	    !q3_xisa_available(o->isa))
		return q3_errf(e, -EINVAL, "cpu experts: bad limits (H %d, I %d, %d experts, top %d, %d tokens, %s)",
			       o->H, o->I, o->num_experts, o->top_k, o->max_tokens, q3_xisa_name(o->isa));
	m = calloc(1, sizeof(*m));
	if (!m)
		return q3_errf(e, -ENOMEM, "out of memory");
	m->o = *o;
	m->pool = pool;
	m->nw = nw;
	T = o->max_tokens;
	P = m->max_pairs = T * o->top_k;
	sz[0] = q3_xact_size(T, o->H, o->act);
	sz[1] = o->perms ? q3_xact_size(2 * P, o->H, o->act) : 0;
	sz[2] = q3_xact_size(P, o->I, o->act);
	sz[3] = al(sizeof(float) * (size_t)P * (size_t)o->I); /* G */
	sz[4] = sz[3];					      /* U */
	sz[5] = al(sizeof(float) * Q3_XT_MAX * (size_t)o->H) * (size_t)nw;
	for (int i = 0; i < 6; i++)
		total += sz[i];
	m->mem = aligned_alloc(64, total);
	m->slots = calloc((size_t)P + 1, sizeof(*m->slots));
	m->slot_of = calloc((size_t)o->num_experts, sizeof(int));
	m->tok_store = calloc((size_t)P, sizeof(int16_t));
	m->wt_store = calloc((size_t)P, sizeof(float));
	m->items = calloc((size_t)(3 * P + ACT_PARTS * T), sizeof(*m->items));
	m->chunk_slot = calloc((size_t)P + 1, sizeof(int));
	m->chunk_j0 = calloc((size_t)P + 1, sizeof(int));
	m->ytmp = calloc((size_t)nw, sizeof(float *));
	if (!m->mem || !m->slots || !m->slot_of || !m->tok_store || !m->wt_store || !m->items ||
	    !m->chunk_slot || !m->chunk_j0 || !m->ytmp) {
		q3_cpu_moe_free(m);
		return q3_errf(e, -ENOMEM, "cpu experts: out of memory for %d tokens", T);
	}
	p = m->mem;
	q3_xact_init(&m->xs, p, T, o->H, o->act);
	p += sz[0];
	if (o->perms)
		q3_xact_init(&m->xp, p, 2 * P, o->H, o->act);
	p += sz[1];
	q3_xact_init(&m->xh, p, P, o->I, o->act);
	p += sz[2];
	m->G = (float *)p;
	p += sz[3];
	m->U = (float *)p;
	p += sz[4];
	for (int i = 0; i < nw; i++)
		m->ytmp[i] = (float *)(p + (size_t)i * (sz[5] / (size_t)nw));
	*out = m;
	return 0;
}

void q3_cpu_moe_free(struct q3_cpu_moe *m)
{
	if (!m)
		return;
	if (m->posted)
		q3_xpool_wait(m->pool);
	free(m->mem);
	free(m->slots);
	free(m->slot_of);
	free(m->tok_store);
	free(m->wt_store);
	free(m->items);
	free(m->chunk_slot);
	free(m->chunk_j0);
	free(m->ytmp);
	free(m);
}

int q3_cpu_moe_post(struct q3_cpu_moe *m, const struct q3_cpu_moe_req *r,
		    const volatile uint32_t *gate, uint32_t gate_value, volatile uint32_t *done,
		    uint32_t done_value, q3_err *e)
{
	struct q3_xjob job = {
		.nphases = NPH,
		.ntasks = job_ntasks,
		.task = job_task,
		.ctx = m,
		.gate = gate,
		.gate_value = gate_value,
		.gate_timeout_s = m->o.gate_timeout_s,
		.done = done,
		.done_value = done_value,
	};
	int err;

	if (m->posted)
		return q3_errf(e, -EBUSY, "cpu experts: a call is in flight");
	if (!m->o.perms)
		for (int id = 0; id < m->o.num_experts; id++)
			if (r->experts[id] && (r->experts[id]->gate.perm || r->experts[id]->up.perm))
				return q3_errf(e, -EINVAL,
					       "cpu experts: expert %d permutes its inputs (act-order) but "
					       "the executor was made without perms",
					       id);
	m->r = *r;
	atomic_store(&m->plan_left, job_ntasks(m, PH_PLAN));
	m->err = 0;
	err = q3_xpool_post(m->pool, &job);
	if (err)
		return q3_errf(e, err, "cpu experts: the expert threads are busy");
	m->posted = true;
	return 0;
}

int q3_cpu_moe_wait(struct q3_cpu_moe *m, q3_err *e)
{
	int err;

	if (!m->posted)
		return 0;
	err = q3_xpool_wait(m->pool);
	m->posted = false;
	if (err)
		return q3_errf(e, err, "cpu experts: the GPU never opened the gate");
	if (m->err)
		return q3_errf(e, m->err, "%s", m->errmsg);
	m->st.calls++;
	m->st.pairs += (uint64_t)m->call_pairs;
	m->st.skipped += (uint64_t)m->call_skipped;
	m->st.elsewhere += (uint64_t)m->call_elsewhere;
	m->st.experts += (uint64_t)m->nslots;
	m->st.bytes += m->call_bytes;
	m->st.busy_s += m->t1 - m->t0;
	/* a phase without tasks leaves its end at the job's start: clamp to the previous end */
	m->t_act = fmax(m->t_act, m->t0);
	m->t_gu = fmax(m->t_gu, m->t_act);
	m->st.act_s += m->t_act - m->t0;
	m->st.gateup_s += m->t_gu - m->t_act;
	m->st.down_s += fmax(m->t1, m->t_gu) - m->t_gu;
	return 0;
}

int q3_cpu_moe_run(struct q3_cpu_moe *m, const struct q3_cpu_moe_req *r, q3_err *e)
{
	int err = q3_cpu_moe_post(m, r, NULL, 0, NULL, 0, e);

	return err ? err : q3_cpu_moe_wait(m, e);
}

void q3_cpu_moe_stats(const struct q3_cpu_moe *m, struct q3_cpu_moe_stats *s)
{
	*s = m->st;
}
