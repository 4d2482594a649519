/* loader_plan.c - where every tensor goes and which reads bring it there (see loader.h, steps 1
 * and 2): default placement for a VRAM budget, tensors merged into extents of one home, aligned
 * read ranges, requests, arena offsets.  No I/O here. */
#include "loader.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tensors of one home this close in a file are read as one extent (the gap is read too). */
#define MERGE_GAP (64u << 10)

static int cmp_file_order(const void *a, const void *b, void *arg)
{
	const struct q3_ckpt *ck = arg;
	const struct q3_tensor *x = &ck->tensors[*(const size_t *)a];
	const struct q3_tensor *y = &ck->tensors[*(const size_t *)b];

	if (x->shard != y->shard)
		return x->shard < y->shard ? -1 : 1;
	return x->off < y->off ? -1 : x->off > y->off;
}

/* ".mlp.experts.<e>." in the name: a routed expert's tensor; *layer and *expert from the name. */
static bool expert_of(const char *name, int *layer, int *expert)
{
	const char *p = strstr(name, ".mlp.experts.");

	if (!p || sscanf(name, "model.layers.%d.", layer) != 1)
		return false;
	return sscanf(p, ".mlp.experts.%d.", expert) == 1;
}

struct expert_group {
	int layer, expert;
	size_t first, n; /* ck->tensors[first .. first + n): name order keeps an expert together */
	uint64_t bytes;
};

static int cmp_group(const void *a, const void *b)
{
	const struct expert_group *x = a, *y = b;

	if (x->layer != y->layer)
		return x->layer < y->layer ? -1 : 1;
	return x->expert < y->expert ? -1 : x->expert > y->expert;
}

uint64_t q3_load_place(const struct q3_ckpt *ck, uint64_t vram_budget, uint8_t *home)
{
	struct expert_group *g = NULL;
	size_t ng = 0, cap = 0;
	uint64_t used = 0;
	int layer, expert;

	memset(home, Q3_HOME_RAM, ck->ntensors);
	if (!vram_budget)
		return 0;
	for (size_t i = 0; i < ck->ntensors; i++) {
		const struct q3_tensor *t = &ck->tensors[i];

		if (!expert_of(t->name, &layer, &expert)) {
			if (used + t->nbytes <= vram_budget) {
				home[i] = Q3_HOME_VRAM;
				used += t->nbytes;
			}
			continue;
		}
		if (ng && g[ng - 1].layer == layer && g[ng - 1].expert == expert) {
			g[ng - 1].n++;
			g[ng - 1].bytes += t->nbytes;
			continue;
		}
		if (ng == cap) {
			struct expert_group *ngp = realloc(g, (cap = cap ? 2 * cap : 1024) * sizeof(*g));
			if (!ngp)
				break; /* out of memory: experts stay in RAM */
			g = ngp;
		}
		g[ng++] = (struct expert_group){ layer, expert, i, 1, t->nbytes };
	}
	/* then whole experts, layer by layer in numeric order */
	qsort(g, ng, sizeof(*g), cmp_group);
	for (size_t k = 0; k < ng; k++) {
		if (used + g[k].bytes > vram_budget)
			continue;
		memset(home + g[k].first, Q3_HOME_VRAM, g[k].n);
		used += g[k].bytes;
	}
	free(g);
	return used;
}

void q3_load_plan_free(struct q3_load_plan *p)
{
	free(p->ext);
	free(p->order);
	free(p->req);
	memset(p, 0, sizeof(*p));
}

int q3_load_plan_build(const struct q3_ckpt *ck, const uint8_t *home, uint32_t req_bytes,
		       struct q3_load_plan *p, q3_err *e)
{
	size_t cap_ext = 64, cap_req = 256;

	memset(p, 0, sizeof(*p));
	if (!req_bytes || req_bytes % Q3_LOAD_ALIGN)
		return q3_errf(e, -EINVAL, "read request size %u is not a positive multiple of %u", req_bytes,
			       Q3_LOAD_ALIGN);
	p->order = malloc((ck->ntensors ? ck->ntensors : 1) * sizeof(*p->order));
	p->ext = malloc(cap_ext * sizeof(*p->ext));
	p->req = malloc(cap_req * sizeof(*p->req));
	if (!p->order || !p->ext || !p->req)
		goto nomem;
	for (size_t i = 0; i < ck->ntensors; i++)
		p->order[i] = i;
	qsort_r(p->order, ck->ntensors, sizeof(*p->order), cmp_file_order, (void *)ck);

	/* extents: runs of one home in one file, gaps up to MERGE_GAP included */
	for (size_t k = 0; k < ck->ntensors; k++) {
		const struct q3_tensor *t = &ck->tensors[p->order[k]];
		enum q3_home h = home ? (enum q3_home)home[p->order[k]] : Q3_HOME_RAM;
		struct q3_extent *x = p->n_ext ? &p->ext[p->n_ext - 1] : NULL;

		if (x && x->shard == t->shard && x->home == h && t->off >= x->end &&
		    t->off - x->end <= MERGE_GAP) {
			x->end = t->off + t->nbytes;
			x->n++;
			continue;
		}
		if (p->n_ext == cap_ext) {
			struct q3_extent *nx = realloc(p->ext, (cap_ext *= 2) * sizeof(*nx));
			if (!nx)
				goto nomem;
			p->ext = nx;
		}
		p->ext[p->n_ext++] = (struct q3_extent){ .shard = t->shard, .home = h, .start = t->off,
							 .end = t->off + t->nbytes, .first = k, .n = 1 };
	}

	/* aligned read ranges, arena offsets, requests */
	for (size_t i = 0; i < p->n_ext; i++) {
		struct q3_extent *x = &p->ext[i];
		uint64_t fend = Q3_ALIGN_UP(ck->shards[x->shard].size, Q3_LOAD_ALIGN);
		uint64_t *arena = x->home == Q3_HOME_RAM ? &p->ram_bytes : &p->vram_bytes;

		x->astart = x->start / Q3_LOAD_ALIGN * Q3_LOAD_ALIGN;
		x->aend = Q3_MIN(Q3_ALIGN_UP(x->end, Q3_LOAD_ALIGN), fend);
		if (x->aend < x->end) /* a tensor past the end of its file: the header check prevents it */
			x->aend = Q3_ALIGN_UP(x->end, Q3_LOAD_ALIGN);
		x->dst = *arena;
		*arena += x->aend - x->astart;
		p->read_bytes += x->aend - x->astart;
		for (uint64_t off = x->astart; off < x->aend; off += req_bytes) {
			if (p->n_req == cap_req) {
				struct q3_lreq *nr = realloc(p->req, (cap_req *= 2) * sizeof(*nr));
				if (!nr)
					goto nomem;
				p->req = nr;
			}
			p->req[p->n_req++] = (struct q3_lreq){ .ext = (uint32_t)i, .off = off,
							       .len = (uint32_t)Q3_MIN(req_bytes, x->aend - off) };
		}
	}
	return 0;
nomem:
	q3_load_plan_free(p);
	return q3_errf(e, -ENOMEM, "out of memory planning the load");
}

int q3_load_plan_interleave(struct q3_load_plan *p, int lanes, q3_err *e)
{
	size_t cur[Q3_LOAD_MAX_LANES + 1], k = 0;
	struct q3_lreq *nr;
	uint64_t total = 0, acc = 0;
	int n = 0;

	if (lanes < 1 || lanes > Q3_LOAD_MAX_LANES)
		return q3_errf(e, -EINVAL, "read lanes %d out of range (1 to %d)", lanes, Q3_LOAD_MAX_LANES);
	if (lanes == 1 || p->n_req < 2)
		return 0;
	for (size_t i = 0; i < p->n_req; i++)
		total += p->req[i].len;
	/* lane j starts at the first request at or past j / lanes of the bytes */
	cur[n++] = 0;
	for (size_t i = 0; i < p->n_req && n < lanes; i++) {
		if (i > cur[n - 1] && acc >= total / lanes * n)
			cur[n++] = i;
		acc += p->req[i].len;
	}
	cur[n] = p->n_req;
	if (!(nr = malloc(p->n_req * sizeof(*nr))))
		return q3_errf(e, -ENOMEM, "out of memory planning the load");
	size_t end[Q3_LOAD_MAX_LANES];

	for (int j = 0; j < n; j++)
		end[j] = cur[j + 1];
	while (k < p->n_req)
		for (int j = 0; j < n; j++)
			if (cur[j] < end[j])
				nr[k++] = p->req[cur[j]++];
	free(p->req);
	p->req = nr;
	return 0;
}
