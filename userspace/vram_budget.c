/* vram_budget.c - the VRAM budget for weights: settings and arithmetic (see vram_budget.h). */
#include "vram_budget.h"

#include <ctype.h>
#include <errno.h>
#include <string.h>
#include <strings.h>

static const char *const src_names[] = {"--vram-budget", "sysfs knob vram_budget", "config",
					"auto"};

const char *q3_budget_src_name(enum q3_budget_src s)
{
	return (unsigned)s < Q3_ARRAY_SIZE(src_names) ? src_names[s] : "?";
}

uint64_t q3_vram_reserve(const struct q3_vram_need *n)
{
	return n->reserve_bytes ? n->reserve_bytes : (256ull << 20) + n->free_vram / 50;
}

/* What the card can give the weights. */
static uint64_t room(const struct q3_vram_need *n)
{
	uint64_t used = n->kv_bytes + n->state_bytes + n->workspace_bytes + q3_vram_reserve(n);

	return n->free_vram > used ? n->free_vram - used : 0;
}

uint64_t q3_vram_budget_auto(const struct q3_vram_need *n)
{
	return room(n);
}

uint64_t q3_vram_kv_bytes(const struct q3_config *c, int max_ctx, int sessions, int elem_bytes)
{
	return (uint64_t)c->num_full_layers * 2 * (uint64_t)c->num_kv_heads * (uint64_t)c->head_dim *
	       (uint64_t)max_ctx * (uint64_t)sessions * (uint64_t)elem_bytes;
}

uint64_t q3_vram_state_bytes(const struct q3_config *c, int sessions, int conv_elem_bytes)
{
	uint64_t rec = (uint64_t)c->lin_num_v_heads * (uint64_t)c->lin_k_dim * (uint64_t)c->lin_v_dim * 4;
	uint64_t conv = (uint64_t)c->conv_dim * (uint64_t)(c->conv_kernel - 1) * (uint64_t)conv_elem_bytes;

	return (uint64_t)c->num_linear_layers * (rec + conv) * (uint64_t)sessions;
}

int q3_vram_budget_parse(const char *s, uint64_t *out)
{
	uint64_t v;

	if (!s)
		return 1;
	while (isspace((unsigned char)*s))
		s++;
	if (!*s || !strcasecmp(s, "auto"))
		return 1;
	if (!isdigit((unsigned char)*s) && *s != '.')
		return -EINVAL; /* no signs, no "nan" / "inf" */
	if (q3_parse_size(s, &v))
		return -EINVAL;
	if (!v)
		return 1;
	*out = v;
	return 0;
}

static double gib(uint64_t b)
{
	return (double)b / (double)(1ull << 30);
}

int q3_vram_budget_resolve(const char *flag, const char *knob, const char *config,
			   const struct q3_vram_need *n, uint64_t *budget, enum q3_budget_src *src,
			   q3_err *e)
{
	const char *v[3] = {flag, knob, config};

	for (int i = 0; i < 3; i++) {
		uint64_t b;
		int r = q3_vram_budget_parse(v[i], &b);

		if (r < 0)
			return q3_errf(e, -EINVAL, "%s: '%s' is not a size (like 20GiB) or auto",
				       q3_budget_src_name((enum q3_budget_src)i), v[i]);
		if (r > 0)
			continue;
		if (b > room(n))
			return q3_errf(e, -ENOSPC,
				       "%s %.2f GiB: the GPU has %.2f GiB free, of which the KV cache takes "
				       "%.2f, the states %.2f, the workspace %.2f and the reserve %.2f: at "
				       "most %.2f GiB for weights",
				       q3_budget_src_name((enum q3_budget_src)i), gib(b), gib(n->free_vram),
				       gib(n->kv_bytes), gib(n->state_bytes), gib(n->workspace_bytes),
				       gib(q3_vram_reserve(n)), gib(room(n)));
		*budget = b;
		*src = (enum q3_budget_src)i;
		return 0;
	}
	*budget = room(n);
	*src = Q3_BUDGET_AUTO;
	return 0;
}
