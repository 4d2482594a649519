/* placement.c - the VRAM / RAM plan of the weights (see placement.h). */
#include "placement.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct cand {
	int l, e, rank; /* rank: place within its layer, most used first */
	double f, density;
	uint64_t bytes;
};

static int cmp_in_layer(const void *a, const void *b)
{
	const struct cand *x = a, *y = b;

	if (x->density != y->density)
		return x->density > y->density ? -1 : 1;
	return x->e - y->e;
}

/* Most used per byte first; ties round-robin over the layers (rank), then layer order. */
static int cmp_global(const void *a, const void *b)
{
	const struct cand *x = a, *y = b;

	if (x->density != y->density)
		return x->density > y->density ? -1 : 1;
	if (x->rank != y->rank)
		return x->rank - y->rank;
	if (x->l != y->l)
		return x->l - y->l;
	return x->e - y->e;
}

static double gib(uint64_t b)
{
	return (double)b / (double)(1ull << 30);
}

int q3_place_plan(const struct q3_place_in *in, struct q3_place_plan *out, q3_err *e)
{
	int L = in->nlayers, E = in->nexperts, node = 0;
	size_t n = (size_t)L * (size_t)E;
	struct cand *c;
	uint64_t left, cap_total = 0, need_ram = 0;
	double ftot = 0, fres = 0;

	memset(out, 0, sizeof(*out));
	if (L <= 0 || E <= 0 || !in->expert_bytes || in->nnodes < 1 || in->nnodes > Q3_PLACE_MAX_NODES ||
	    !in->node_order || !in->node_capacity)
		return q3_errf(e, -EINVAL, "placement: bad input (%d layers, %d experts, %d nodes)", L, E,
			       in->nnodes);
	if (in->dense_bytes > in->vram_budget)
		return q3_errf(e, -ENOSPC,
			       "placement: the dense weights (%.2f GiB) do not fit the VRAM budget (%.2f GiB)",
			       gib(in->dense_bytes), gib(in->vram_budget));
	for (size_t i = 0; i < n; i++)
		if (!in->expert_bytes[i] || (in->freq && !(in->freq[i] >= 0)))
			return q3_errf(e, -EINVAL, "placement: expert %zu of layer %zu: bad size or frequency",
				       i % (size_t)E, i / (size_t)E);
	c = calloc(n, sizeof(*c));
	out->vram = calloc(n, 1);
	out->ram_node = malloc(n * sizeof(int16_t));
	if (!c || !out->vram || !out->ram_node) {
		free(c);
		q3_place_plan_free(out);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	out->nlayers = L;
	out->nexperts = E;
	for (size_t i = 0; i < n; i++) {
		c[i].l = (int)(i / (size_t)E);
		c[i].e = (int)(i % (size_t)E);
		c[i].f = in->freq ? in->freq[i] : 1.0;
		c[i].bytes = in->expert_bytes[i];
		c[i].density = c[i].f / (double)c[i].bytes;
		out->ram_node[i] = -1;
		ftot += c[i].f;
	}
	for (int l = 0; l < L; l++) {
		qsort(c + (size_t)l * E, (size_t)E, sizeof(*c), cmp_in_layer);
		for (int r = 0; r < E; r++)
			c[(size_t)l * E + r].rank = r;
	}
	qsort(c, n, sizeof(*c), cmp_global);
	/* VRAM: greedy by use per byte while the budget lasts */
	left = in->vram_budget - in->dense_bytes;
	out->vram_bytes = in->dense_bytes;
	for (size_t i = 0; i < n; i++)
		if (c[i].bytes <= left) {
			left -= c[i].bytes;
			out->vram[(size_t)c[i].l * E + c[i].e] = 1;
			out->vram_bytes += c[i].bytes;
			out->n_vram++;
			fres += c[i].f;
		}
	/* RAM homes: CPU experts (most used first), then the VRAM ones' copies, nearest node first */
	out->nnodes = in->nnodes;
	for (int k = 0; k < in->nnodes; k++) {
		out->node_os[k] = in->node_order[k];
		cap_total += in->node_capacity[k];
	}
	for (int pass = 0; pass < 2; pass++)
		for (size_t i = 0; i < n; i++) {
			size_t idx = (size_t)c[i].l * E + c[i].e;
			bool resident = out->vram[idx];

			if (resident != (pass == 1) || (resident && !in->ram_all))
				continue;
			/* the nearest node with room for this one (sizes differ: a full node may still
			 * take a smaller expert later) */
			for (node = 0; node < in->nnodes && out->node_bytes[node] + c[i].bytes > in->node_capacity[node];
			     node++)
				;
			if (node == in->nnodes) {
				need_ram = 0;
				for (size_t j = 0; j < n; j++)
					need_ram += !out->vram[j] || in->ram_all ? in->expert_bytes[j] : 0;
				free(c);
				q3_place_plan_free(out);
				return q3_errf(e, -ENOSPC,
					       "placement: the experts' RAM homes need %.2f GiB, the NUMA nodes "
					       "give %.2f GiB",
					       gib(need_ram), gib(cap_total));
			}
			out->node_bytes[node] += c[i].bytes;
			out->ram_bytes += c[i].bytes;
			out->ram_node[idx] = (int16_t)in->node_order[node];
		}
	out->hit = ftot > 0 ? fres / ftot : 0;
	out->hit_layer_min = 1;
	for (int l = 0; l < L; l++) {
		double ft = 0, fr = 0;

		for (int x = 0; x < E; x++) {
			double f = in->freq ? in->freq[(size_t)l * E + x] : 1.0;

			ft += f;
			fr += out->vram[(size_t)l * E + x] ? f : 0;
		}
		if (ft > 0 && fr / ft < out->hit_layer_min)
			out->hit_layer_min = fr / ft;
	}
	free(c);
	return 0;
}

void q3_place_plan_free(struct q3_place_plan *p)
{
	free(p->vram);
	free(p->ram_node);
	p->vram = NULL;
	p->ram_node = NULL;
}

uint64_t q3_place_expert_bytes(const struct q3_expert *x)
{
	return q3_linear_bytes(&x->gate) + q3_linear_bytes(&x->up) + q3_linear_bytes(&x->down);
}

uint64_t q3_place_dense_bytes(const struct q3_model *m, bool embed_in_vram)
{
	const struct q3_model_bytes *b = &m->bytes;

	return b->dense + b->lm_head + b->other + (embed_in_vram || !b->lm_head ? b->embed : 0);
}

static void set_home(const struct q3_model *m, const struct q3_tensor *t, uint8_t h, uint8_t *home)
{
	if (t)
		home[t - m->ck->tensors] = h;
}

static void set_linear(const struct q3_model *m, const struct q3_linear *l, uint8_t h, uint8_t *home)
{
	set_home(m, l->w, h, home);
	set_home(m, l->qweight, h, home);
	set_home(m, l->qzeros, h, home);
	set_home(m, l->scales, h, home);
	set_home(m, l->g_idx, h, home);
}

void q3_place_homes(const struct q3_model *m, const struct q3_place_plan *p, bool embed_in_vram,
		    uint8_t *home)
{
	const struct q3_ckpt *ck = m->ck;

	for (size_t i = 0; i < ck->ntensors; i++)
		home[i] = ck->tensors[i].bound ? 1 : 0;
	if (!embed_in_vram && m->bytes.lm_head) /* tied: lm_head reads the embedding on the GPU */
		set_home(m, m->embed, 0, home);
	for (int l = 0; l < m->cfg->num_layers && l < p->nlayers; l++)
		for (int x = 0; x < m->cfg->num_experts && x < p->nexperts; x++) {
			const struct q3_expert *ex = &m->layers[l].experts[x];
			size_t idx = (size_t)l * (size_t)p->nexperts + (size_t)x;
			uint8_t h = p->vram[idx] && p->ram_node[idx] < 0 ? 1 : 0;

			set_linear(m, &ex->gate, h, home);
			set_linear(m, &ex->up, h, home);
			set_linear(m, &ex->down, h, home);
		}
}

void q3_place_capacity_from_topo(const struct q3_topo *t, const int *node_order, int nnodes,
				 double reserve_frac, uint64_t *capacity)
{
	for (int i = 0; i < nnodes; i++) {
		const struct q3_topo_node *nd = q3_topo_node_os(t, node_order[i]);

		capacity[i] = nd ? (uint64_t)((double)nd->mem * (1.0 - reserve_frac)) : 0;
	}
}

int q3_place_cpus(const struct q3_topo *t, int node, int reserve, int *cpus, int max)
{
	int n, all[4096], order[Q3_PLACE_MAX_NODES], nn;

	n = q3_topo_node_cores(t, node, all, 4096);
	/* a memory-only node (or one whose cores this process may not use): the nearest node that
	 * has cores, not the whole machine */
	nn = n > 0 || node < 0 ? 0 : q3_topo_node_order(t, node, order, Q3_PLACE_MAX_NODES);
	for (int k = 0; k < nn && n <= 0; k++)
		n = q3_topo_node_cores(t, order[k], all, 4096);
	if (n <= 0)
		n = q3_topo_node_cores(t, -1, all, 4096);
	if (n <= 0)
		return 0;
	reserve = Q3_MAX(0, Q3_MIN(reserve, n - 1));
	n = Q3_MIN(n - reserve, max);
	memcpy(cpus, all + reserve, (size_t)n * sizeof(int));
	return n;
}
