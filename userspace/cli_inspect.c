/* cli_inspect.c - `qwen3d inspect --model DIR [--json] [--check-data]`: validate a checkpoint and
 * summarize it (layers and kinds, per-module quantization, bytes by category, per-expert size).
 * Exit 0 when valid; otherwise exit 1 with one line naming the file, tensor or key at fault. */
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "cli.h"
#include "model.h"

/* "int4 g128 sym", "int8 g-1 asym act-order", "bf16" */
static const char *linear_format(const struct q3_linear *l, char *buf, size_t len)
{
	if (l->fmt == Q3_W_DENSE) {
		const char *d = q3_dtype_name(l->w->dtype);
		snprintf(buf, len, "%s", !strcmp(d, "BF16") ? "bf16" : !strcmp(d, "F16") ? "fp16" : "fp32");
	} else {
		snprintf(buf, len, "int%d g%d %s%s%s scales %s", l->bits,
			 l->group_size,
			 l->sym ? "sym" : "asym", l->g_idx ? (l->desc_act ? " act-order" : " g_idx") : "",
			 l->zero_offset ? "" : " v2", l->scales->dtype == Q3_DT_BF16 ? "bf16" : "fp16");
	}
	return buf;
}

/* One row per (module role, format) with a count. */
struct fmt_row {
	char role[64];
	char fmt[64];
	int count;
	uint64_t bytes;
};

struct fmt_table {
	struct fmt_row rows[128];
	int n;
};

static void tally(struct fmt_table *ft, const char *role, const struct q3_linear *l)
{
	char f[64];

	linear_format(l, f, sizeof(f));
	for (int i = 0; i < ft->n; i++)
		if (!strcmp(ft->rows[i].role, role) && !strcmp(ft->rows[i].fmt, f)) {
			ft->rows[i].count++;
			ft->rows[i].bytes += q3_linear_bytes(l);
			return;
		}
	if (ft->n < (int)Q3_ARRAY_SIZE(ft->rows)) {
		struct fmt_row *r = &ft->rows[ft->n++];
		snprintf(r->role, sizeof(r->role), "%s", role);
		snprintf(r->fmt, sizeof(r->fmt), "%s", f);
		r->count = 1;
		r->bytes = q3_linear_bytes(l);
	}
}

static void tally_model(const struct q3_model *m, struct fmt_table *ft)
{
	const struct q3_config *c = m->cfg;

	for (int i = 0; i < c->num_layers; i++) {
		const struct q3_layer *L = &m->layers[i];

		if (L->kind == Q3_LAYER_LINEAR) {
			tally(ft, "linear_attn.in_proj_qkvz", &L->qkvz);
			tally(ft, "linear_attn.in_proj_ba", &L->ba);
			tally(ft, "linear_attn.out_proj", &L->lin_out);
		} else {
			tally(ft, "self_attn.q_proj", &L->q);
			tally(ft, "self_attn.k_proj", &L->k);
			tally(ft, "self_attn.v_proj", &L->v);
			tally(ft, "self_attn.o_proj", &L->o);
		}
		tally(ft, "mlp.gate (router)", &L->router);
		for (int x = 0; x < c->num_experts; x++) {
			tally(ft, "mlp.experts.*.gate_proj", &L->experts[x].gate);
			tally(ft, "mlp.experts.*.up_proj", &L->experts[x].up);
			tally(ft, "mlp.experts.*.down_proj", &L->experts[x].down);
		}
		tally(ft, "mlp.shared_expert.gate_proj", &L->shared.gate);
		tally(ft, "mlp.shared_expert.up_proj", &L->shared.up);
		tally(ft, "mlp.shared_expert.down_proj", &L->shared.down);
		tally(ft, "mlp.shared_expert_gate", &L->shared_gate);
	}
	if (!c->tie_word_embeddings)
		tally(ft, "lm_head", &m->lm_head);
}

static void layer_string(const struct q3_config *c, char *buf, size_t len)
{
	size_t o = 0;

	for (int i = 0; i < c->num_layers && o + 2 < len; i++) {
		if (i && i % 4 == 0)
			buf[o++] = ' ';
		buf[o++] = c->layer_kind[i] == Q3_LAYER_FULL ? 'F' : 'L';
	}
	buf[o] = 0;
}

static void print_text(const struct q3_model *m, const struct fmt_table *ft)
{
	const struct q3_ckpt *ck = m->ck;
	const struct q3_config *c = m->cfg;
	const struct q3_model_bytes *b = &m->bytes;
	char s1[32], s2[32], layers[2048];
	uint64_t total = b->experts + b->dense + b->embed + b->lm_head + b->mtp + b->other;

	layer_string(c, layers, sizeof(layers));
	printf("model       %s\n", ck->dir);
	printf("shards      %d files, %zu tensors, %s\n", ck->nshards, ck->ntensors,
	       q3_fmt_bytes(ck->total_bytes, s1, sizeof(s1)));
	printf("layers      %d: %d linear_attention (L) + %d full_attention (F)\n", c->num_layers,
	       c->num_linear_layers, c->num_full_layers);
	printf("            %s\n", layers);
	printf("hidden      %d, vocab %d, rms_eps %g%s\n", c->hidden_size, c->vocab_size, c->rms_eps,
	       c->tie_word_embeddings ? ", lm_head tied to the embedding" : "");
	printf("attention   %d query / %d kv heads x %d, rotary %d dims (theta %g)\n", c->num_heads,
	       c->num_kv_heads, c->head_dim, c->rotary_dim, c->rope_theta);
	printf("deltanet    %d qk heads x %d, %d v heads x %d, conv %d\n", c->lin_num_k_heads, c->lin_k_dim,
	       c->lin_num_v_heads, c->lin_v_dim, c->conv_kernel);
	printf("moe         %d experts, top %d%s, expert %d, shared expert %d\n", c->num_experts, c->top_k,
	       c->norm_topk_prob ? " (renormalized)" : "", c->moe_inter, c->shared_inter);
	if (c->quant.method == Q3_QM_NONE)
		printf("quant       none\n");
	else
		printf("quant       %s (%s), %d-bit, group %d, %s, desc_act %s, %zu per-module rules\n",
		       c->quant.method == Q3_QM_GPTQ ? "gptq" : "auto-round", c->quant.format,
		       c->quant.base.bits, c->quant.base.group_size, c->quant.base.sym ? "sym" : "asym",
		       c->quant.base.desc_act ? "true" : "false", c->quant.nrules);
	printf("\nmodule                          count  format                                bytes\n");
	for (int i = 0; i < ft->n; i++)
		printf("%-30s %6d  %-36s %s\n", ft->rows[i].role, ft->rows[i].count, ft->rows[i].fmt,
		       q3_fmt_bytes(ft->rows[i].bytes, s1, sizeof(s1)));
	printf("\nbytes       experts %s, dense %s, embeddings %s, lm_head %s", q3_fmt_bytes(b->experts, s1, sizeof(s1)),
	       q3_fmt_bytes(b->dense, s2, sizeof(s2)), q3_fmt_bytes(b->embed, layers, 32),
	       q3_fmt_bytes(b->lm_head, layers + 32, 32));
	printf(", other %s", q3_fmt_bytes(b->other, s1, sizeof(s1)));
	if (m->n_mtp)
		printf(", mtp %s (%zu tensors, unused)", q3_fmt_bytes(b->mtp, s2, sizeof(s2)), m->n_mtp);
	printf("\ntotal       %" PRIu64 " bytes (%s)\n", total, q3_fmt_bytes(total, s1, sizeof(s1)));
	if (b->expert_min == b->expert_max)
		printf("per expert  %" PRIu64 " bytes (gate + up + down)\n", b->expert_min);
	else
		printf("per expert  %" PRIu64 " to %" PRIu64 " bytes (gate + up + down)\n", b->expert_min,
		       b->expert_max);
}

static void print_json(const struct q3_model *m, const struct fmt_table *ft)
{
	const struct q3_config *c = m->cfg;
	const struct q3_model_bytes *b = &m->bytes;
	json_t *o = json_object(), *kinds = json_array(), *mods = json_array(), *by = json_object();
	char *s;

	for (int i = 0; i < c->num_layers; i++)
		json_array_append_new(kinds, json_string(q3_layer_kind_name(c->layer_kind[i])));
	for (int i = 0; i < ft->n; i++)
		json_array_append_new(mods, json_pack("{s:s, s:s, s:i, s:I}", "module", ft->rows[i].role,
						      "format", ft->rows[i].fmt, "count", ft->rows[i].count,
						      "bytes", (json_int_t)ft->rows[i].bytes));
	json_object_set_new(by, "experts", json_integer((json_int_t)b->experts));
	json_object_set_new(by, "dense", json_integer((json_int_t)b->dense));
	json_object_set_new(by, "embeddings", json_integer((json_int_t)b->embed));
	json_object_set_new(by, "lm_head", json_integer((json_int_t)b->lm_head));
	json_object_set_new(by, "mtp", json_integer((json_int_t)b->mtp));
	json_object_set_new(by, "other", json_integer((json_int_t)b->other));
	json_object_set_new(by, "total", json_integer((json_int_t)m->ck->total_bytes));
	json_object_set_new(o, "shards", json_integer(m->ck->nshards));
	json_object_set_new(o, "tensors", json_integer((json_int_t)m->ck->ntensors));
	json_object_set_new(o, "layers", kinds);
	json_object_set_new(o, "hidden_size", json_integer(c->hidden_size));
	json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
	json_object_set_new(o, "num_experts", json_integer(c->num_experts));
	json_object_set_new(o, "quant_method", json_string(c->quant.method == Q3_QM_NONE ? "none" :
							     c->quant.method == Q3_QM_GPTQ ? "gptq" : "auto-round"));
	json_object_set_new(o, "modules", mods);
	json_object_set_new(o, "bytes", by);
	json_object_set_new(o, "expert_bytes_min", json_integer((json_int_t)b->expert_min));
	json_object_set_new(o, "expert_bytes_max", json_integer((json_int_t)b->expert_max));
	json_object_set_new(o, "mtp_tensors", json_integer((json_int_t)m->n_mtp));
	s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	puts(s);
	free(s);
	json_decref(o);
}

int cmd_inspect(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' },
		{ "json", no_argument, 0, 'j' },
		{ "check-data", no_argument, 0, 'c' },
		{ "help", no_argument, 0, 'h' },
		{ 0 },
	};
	const char *dir = NULL;
	bool json = false, check = false;
	struct q3_ckpt *ck;
	struct q3_model *m;
	struct fmt_table *ft;
	q3_err e;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "m:jch", opts, NULL)) != -1) {
		switch (c) {
		case 'm': dir = optarg; break;
		case 'j': json = true; break;
		case 'c': check = true; break;
		case 'h':
			printf("usage: qwen3d inspect --model DIR [--json] [--check-data]\n"
			       "  validates config.json, the index and every shard header, binds every tensor\n"
			       "  by role and prints a summary; --check-data also reads the bytes that can be\n"
			       "  checked (g_idx ranges).  Exit 1 with one line on any problem.\n");
			return 0;
		default:
			return 2;
		}
	}
	if (!dir || optind != argc) {
		fprintf(stderr, "usage: qwen3d inspect --model DIR [--json] [--check-data]\n");
		return 2;
	}
	if (q3_ckpt_open(dir, &ck, &e)) {
		fprintf(stderr, "qwen3d inspect: %s\n", e.msg);
		return 1;
	}
	if (q3_model_bind(ck, &m, &e)) {
		fprintf(stderr, "qwen3d inspect: %s: %s\n", dir, e.msg);
		q3_ckpt_close(ck);
		return 1;
	}
	if (check && (q3_ckpt_map(ck, &e) || q3_model_check_data(m, &e))) {
		fprintf(stderr, "qwen3d inspect: %s: %s\n", dir, e.msg);
		q3_model_free(m);
		q3_ckpt_close(ck);
		return 1;
	}
	ft = calloc(1, sizeof(*ft));
	if (!ft)
		q3_die("out of memory");
	tally_model(m, ft);
	if (json)
		print_json(m, ft);
	else
		print_text(m, ft);
	free(ft);
	q3_model_free(m);
	q3_ckpt_close(ck);
	return 0;
}
