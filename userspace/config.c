/* config.c - config.json and quantization_config parsing and validation (see config.h). */
#include "config.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

const char *q3_layer_kind_name(enum q3_layer_kind k)
{
	return k == Q3_LAYER_FULL ? "full_attention" : "linear_attention";
}

/* Reads an integer key in [lo, hi].  A missing key takes def when def_ok, else is an error. */
static int get_int(json_t *o, const char *fname, const char *key, long lo, long hi, bool def_ok,
		   long def, int *out, q3_err *e)
{
	json_t *v = json_object_get(o, key);
	json_int_t x;

	if (!v || json_is_null(v)) {
		if (!def_ok)
			return q3_errf(e, -EINVAL, "%s: %s: missing", fname, key);
		*out = (int)def;
		return 0;
	}
	if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
	    fabs(json_real_value(v)) < 1e15)
		x = (json_int_t)json_real_value(v);
	else if (json_is_integer(v))
		x = json_integer_value(v);
	else
		return q3_errf(e, -EINVAL, "%s: %s: expected an integer", fname, key);
	if (x < lo || x > hi)
		return q3_errf(e, -EINVAL, "%s: %s: %lld is outside [%ld, %ld]", fname, key, (long long)x,
			       lo, hi);
	*out = (int)x;
	return 0;
}

static int get_num(json_t *o, const char *fname, const char *key, double lo, double hi, double def,
		   double *out, q3_err *e)
{
	json_t *v = json_object_get(o, key);

	if (!v || json_is_null(v)) {
		*out = def;
		return 0;
	}
	if (!json_is_number(v))
		return q3_errf(e, -EINVAL, "%s: %s: expected a number", fname, key);
	*out = json_number_value(v);
	if (!(*out >= lo && *out <= hi))
		return q3_errf(e, -EINVAL, "%s: %s: %g is outside [%g, %g]", fname, key, *out, lo, hi);
	return 0;
}

static int get_bool(json_t *o, const char *fname, const char *key, bool def, bool *out, q3_err *e)
{
	json_t *v = json_object_get(o, key);

	if (!v || json_is_null(v)) {
		*out = def;
		return 0;
	}
	if (!json_is_boolean(v))
		return q3_errf(e, -EINVAL, "%s: %s: expected true or false", fname, key);
	*out = json_is_true(v);
	return 0;
}

/* ---- quantization_config ------------------------------------------------------------------ */

void q3_quant_free(struct q3_quant *q)
{
	for (size_t i = 0; i < q->nrules; i++) {
		free(q->rules[i].pattern);
		pcre2_code_free(q->rules[i].re);
	}
	free(q->rules);
	memset(q, 0, sizeof(*q));
}

static int check_bits(const char *fname, const char *what, int bits, bool allow16, q3_err *e)
{
	if (bits == 4 || bits == 8 || (allow16 && bits >= 16))
		return 0;
	return q3_errf(e, -EINVAL, "%s: %s: %d bits is not supported (4 or 8)", fname, what, bits);
}

static int check_group(const char *fname, const char *what, int g, q3_err *e)
{
	if (g == -1 || (g >= 16 && (g & (g - 1)) == 0))
		return 0;
	return q3_errf(e, -EINVAL, "%s: %s: group_size %d is not supported (-1 or a power of two >= 16)",
		       fname, what, g);
}

/* Parses one override object ({"bits": 8, "group_size": 128, "sym": true, ...}) into r. */
static int parse_rule_body(json_t *v, const char *fname, const char *where, struct q3_qrule *r,
			   q3_err *e)
{
	json_t *x;
	char what[320];
	int err;

	r->bits = r->group_size = r->sym = r->desc_act = Q3_INHERIT;
	if (!json_is_object(v))
		return q3_errf(e, -EINVAL, "%s: %s: expected an object", fname, where);
	snprintf(what, sizeof(what), "%s.bits", where);
	if ((x = json_object_get(v, "bits"))) {
		if (!json_is_integer(x))
			return q3_errf(e, -EINVAL, "%s: %s: expected an integer", fname, what);
		r->bits = (int)json_integer_value(x);
		if ((err = check_bits(fname, what, r->bits, true, e)))
			return err;
	}
	snprintf(what, sizeof(what), "%s.group_size", where);
	if ((x = json_object_get(v, "group_size"))) {
		if (!json_is_integer(x))
			return q3_errf(e, -EINVAL, "%s: %s: expected an integer", fname, what);
		r->group_size = (int)json_integer_value(x);
		if ((err = check_group(fname, what, r->group_size, e)))
			return err;
	}
	if ((x = json_object_get(v, "sym"))) {
		if (!json_is_boolean(x))
			return q3_errf(e, -EINVAL, "%s: %s.sym: expected true or false", fname, where);
		r->sym = json_is_true(x);
	}
	if ((x = json_object_get(v, "desc_act"))) {
		if (!json_is_boolean(x))
			return q3_errf(e, -EINVAL, "%s: %s.desc_act: expected true or false", fname, where);
		r->desc_act = json_is_true(x);
	}
	/* AutoRound marks unquantized modules with data_type "fp" (and bits 16). */
	if ((x = json_object_get(v, "data_type")) && json_is_string(x) &&
	    strcmp(json_string_value(x), "int") && (r->bits == Q3_INHERIT || r->bits < 16))
		return q3_errf(e, -EINVAL, "%s: %s.data_type: \"%s\" with %d bits is not supported", fname,
			       where, json_string_value(x), r->bits);
	return 0;
}

static int compile_rule(const char *fname, const char *where, struct q3_qrule *r, q3_err *e)
{
	int errcode;
	PCRE2_SIZE erroff;

	r->re = pcre2_compile((PCRE2_SPTR)r->pattern, PCRE2_ZERO_TERMINATED, PCRE2_ANCHORED | PCRE2_UTF,
			      &errcode, &erroff, NULL);
	if (!r->re) {
		PCRE2_UCHAR msg[128];
		pcre2_get_error_message(errcode, msg, sizeof(msg));
		return q3_errf(e, -EINVAL, "%s: %s: bad regular expression \"%s\": %s at offset %zu",
			       fname, where, r->pattern, (char *)msg, (size_t)erroff);
	}
	return 0;
}

static int parse_rules(json_t *obj, const char *fname, const char *key, bool gptqmodel,
		       struct q3_quant *q, q3_err *e)
{
	const char *k;
	json_t *v;
	size_t n;
	int err;

	if (!obj || json_is_null(obj))
		return 0;
	if (!json_is_object(obj))
		return q3_errf(e, -EINVAL, "%s: quantization_config.%s: expected an object", fname, key);
	n = json_object_size(obj);
	q->rules = calloc(n ? n : 1, sizeof(*q->rules));
	if (!q->rules)
		return q3_errf(e, -ENOMEM, "out of memory");
	json_object_foreach(obj, k, v) {
		struct q3_qrule *r = &q->rules[q->nrules];
		char where[300];
		const char *pat = k;
		bool is_regex = gptqmodel;

		snprintf(where, sizeof(where), "quantization_config.%s[\"%.200s\"]", key, k);
		if (gptqmodel && (!strncmp(k, "+:", 2) || !strncmp(k, "-:", 2))) {
			r->skip = k[0] == '-';
			pat = k + 2;
		}
		if (!gptqmodel) /* AutoRound: a module name, or a regex if it has regex syntax */
			is_regex = strpbrk(k, "*+?[]()\\^$|{}") != NULL;
		r->pattern = strdup(pat);
		if (!r->pattern)
			return q3_errf(e, -ENOMEM, "out of memory");
		q->nrules++;
		if (!r->skip && (err = parse_rule_body(v, fname, where, r, e)))
			return err;
		if (r->skip)
			r->bits = r->group_size = r->sym = r->desc_act = Q3_INHERIT;
		if (is_regex && (err = compile_rule(fname, where, r, e)))
			return err;
	}
	return 0;
}

static int quant_parse(json_t *qc, const char *fname, struct q3_quant *q, q3_err *e)
{
	json_t *m = json_object_get(qc, "quant_method");
	const char *method = json_is_string(m) ? json_string_value(m) : NULL;
	json_t *fmt;
	int err;

	memset(q, 0, sizeof(*q));
	if (!json_is_object(qc))
		return q3_errf(e, -EINVAL, "%s: quantization_config: expected an object", fname);
	if (m && !json_is_string(m))
		return q3_errf(e, -EINVAL, "%s: quant_method: expected a string", fname);
	/* AutoGPTQ's older quantize_config.json files carry no quant_method. */
	if (!method || !strcmp(method, "gptq")) {
		q->method = Q3_QM_GPTQ;
		fmt = json_object_get(qc, "checkpoint_format");
		if (fmt && !json_is_null(fmt) && !json_is_string(fmt))
			return q3_errf(e, -EINVAL, "%s: checkpoint_format: expected a string", fname);
		if (!fmt || json_is_null(fmt) || !strcmp(json_string_value(fmt), "gptq")) {
			q->format = "gptq", q->zero_offset = 1;
		} else if (!strcmp(json_string_value(fmt), "gptq_v2")) {
			q->format = "gptq_v2", q->zero_offset = 0;
		} else {
			return q3_errf(e, -EINVAL,
				       "%s: checkpoint_format \"%s\" is not supported (gptq, gptq_v2)", fname,
				       json_string_value(fmt));
		}
	} else if (!strcmp(method, "auto-round") || !strcmp(method, "auto_round") ||
		   !strcmp(method, "intel/auto-round")) {
		q->method = Q3_QM_AUTOROUND;
		fmt = json_object_get(qc, "packing_format");
		if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "auto_round:auto_gptq"))
			return q3_errf(e, -EINVAL,
				       "%s: packing_format %s%s%s is not supported (auto_round:auto_gptq)",
				       fname, json_is_string(fmt) ? "\"" : "",
				       json_is_string(fmt) ? json_string_value(fmt) : "(missing)",
				       json_is_string(fmt) ? "\"" : "");
		q->format = "auto_round:auto_gptq", q->zero_offset = 1;
	} else {
		return q3_errf(e, -EINVAL, "%s: quant_method \"%s\" is not supported (gptq, auto-round)",
			       fname, method);
	}
	if ((err = get_int(qc, fname, "bits", 0, 64, false, 0, &q->base.bits, e)))
		return err;
	if ((err = check_bits(fname, "bits", q->base.bits, false, e)))
		return err;
	if ((err = get_int(qc, fname, "group_size", -1, 1 << 20, false, 0, &q->base.group_size, e)))
		return err;
	if ((err = check_group(fname, "group_size", q->base.group_size, e)))
		return err;
	if ((err = get_bool(qc, fname, "sym", true, &q->base.sym, e)) ||
	    (err = get_bool(qc, fname, "desc_act", false, &q->base.desc_act, e)) ||
	    (err = get_bool(qc, fname, "lm_head", false, &q->lm_head, e)))
		return err;
	if (q->method == Q3_QM_AUTOROUND) {
		json_t *dt = json_object_get(qc, "data_type");
		if (dt && (!json_is_string(dt) || strcmp(json_string_value(dt), "int")))
			return q3_errf(e, -EINVAL, "%s: data_type: only \"int\" is supported", fname);
		return parse_rules(json_object_get(qc, "extra_config"), fname, "extra_config", false, q, e);
	}
	return parse_rules(json_object_get(qc, "dynamic"), fname, "dynamic", true, q, e);
}

int q3_quant_parse_text(const char *json, size_t len, const char *fname, struct q3_quant *q,
			q3_err *e)
{
	json_error_t jerr;
	json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
	int err;

	memset(q, 0, sizeof(*q));
	if (!root)
		return q3_errf(e, -EINVAL, "%s: line %d: %s", fname, jerr.line, jerr.text);
	err = quant_parse(root, fname, q, e);
	json_decref(root);
	if (err)
		q3_quant_free(q);
	return err;
}

static bool rule_matches(const struct q3_qrule *r, const char *module)
{
	pcre2_match_data *md;
	int rc;

	if (!r->re)
		return !strcmp(r->pattern, module);
	md = pcre2_match_data_create_from_pattern(r->re, NULL);
	if (!md)
		return false;
	rc = pcre2_match(r->re, (PCRE2_SPTR)module, strlen(module), 0, 0, md, NULL);
	pcre2_match_data_free(md);
	return rc >= 0;
}

void q3_quant_scheme(const struct q3_quant *q, const char *module, struct q3_qscheme *s)
{
	*s = q->base;
	if (q->method == Q3_QM_NONE) {
		s->bits = 16;
		return;
	}
	for (size_t i = 0; i < q->nrules; i++) {
		const struct q3_qrule *r = &q->rules[i];

		if (!rule_matches(r, module))
			continue;
		if (r->skip) {
			s->bits = 16;
			return;
		}
		if (r->bits != Q3_INHERIT)
			s->bits = r->bits;
		if (r->group_size != Q3_INHERIT)
			s->group_size = r->group_size;
		if (r->sym != Q3_INHERIT)
			s->sym = r->sym;
		if (r->desc_act != Q3_INHERIT)
			s->desc_act = r->desc_act;
		return;
	}
}

/* ---- config.json ---------------------------------------------------------------------------- */

void q3_config_free(struct q3_config *c)
{
	free(c->layer_kind);
	q3_quant_free(&c->quant);
	memset(c, 0, sizeof(*c));
}

static int refuse_if(bool cond, q3_err *e, const char *fname, const char *what)
{
	return cond ? q3_errf(e, -EINVAL, "%s: %s is not supported by this engine", fname, what) : 0;
}

static int parse_layer_types(json_t *root, const char *fname, struct q3_config *c, q3_err *e)
{
	json_t *lt = json_object_get(root, "layer_types");

	c->layer_kind = calloc((size_t)c->num_layers, sizeof(*c->layer_kind));
	if (!c->layer_kind)
		return q3_errf(e, -ENOMEM, "out of memory");
	if (lt && !json_is_null(lt)) {
		if (!json_is_array(lt) || json_array_size(lt) != (size_t)c->num_layers)
			return q3_errf(e, -EINVAL, "%s: layer_types: expected an array of %d strings", fname,
				       c->num_layers);
		for (int i = 0; i < c->num_layers; i++) {
			json_t *s = json_array_get(lt, (size_t)i);
			const char *v = json_is_string(s) ? json_string_value(s) : "";

			if (!strcmp(v, "linear_attention"))
				c->layer_kind[i] = Q3_LAYER_LINEAR;
			else if (!strcmp(v, "full_attention"))
				c->layer_kind[i] = Q3_LAYER_FULL;
			else
				return q3_errf(e, -EINVAL,
					       "%s: layer_types[%d]: expected \"linear_attention\" or \"full_attention\"",
					       fname, i);
		}
	} else {
		for (int i = 0; i < c->num_layers; i++)
			c->layer_kind[i] = (i + 1) % c->full_attention_interval ? Q3_LAYER_LINEAR : Q3_LAYER_FULL;
	}
	for (int i = 0; i < c->num_layers; i++) {
		if (c->layer_kind[i] == Q3_LAYER_FULL)
			c->num_full_layers++;
		else
			c->num_linear_layers++;
	}
	return 0;
}

static int parse_eos(json_t *root, const char *fname, struct q3_config *c, q3_err *e)
{
	json_t *v = json_object_get(root, "eos_token_id"), *b = json_object_get(root, "bos_token_id");

	c->bos_id = json_is_integer(b) ? (int)json_integer_value(b) : -1;
	if (!v || json_is_null(v))
		return 0;
	if (json_is_integer(v)) {
		c->eos_ids[c->n_eos++] = (int)json_integer_value(v);
	} else if (json_is_array(v)) {
		size_t i;
		json_t *x;
		json_array_foreach(v, i, x) {
			if (!json_is_integer(x) || c->n_eos == Q3_MAX_EOS)
				return q3_errf(e, -EINVAL, "%s: eos_token_id[%zu]: expected at most %d integers",
					       fname, i, Q3_MAX_EOS);
			c->eos_ids[c->n_eos++] = (int)json_integer_value(x);
		}
	} else {
		return q3_errf(e, -EINVAL, "%s: eos_token_id: expected an integer or a list", fname);
	}
	/* Ids outside the vocabulary are kept: tiny test models keep the real eos ids. */
	return 0;
}

static int parse_rope(json_t *root, const char *fname, struct q3_config *c, q3_err *e)
{
	json_t *rp = json_object_get(root, "rope_parameters"), *rs = json_object_get(root, "rope_scaling");
	json_t *src = root;
	double theta, prf;
	int err;

	if (rs && !json_is_null(rs)) {
		json_t *t = json_is_object(rs) ? json_object_get(rs, "rope_type") : NULL;
		if (!t)
			t = json_is_object(rs) ? json_object_get(rs, "type") : NULL;
		if (!json_is_string(t) || strcmp(json_string_value(t), "default"))
			return q3_errf(e, -EINVAL, "%s: rope_scaling: only null or the default rope is supported",
				       fname);
	}
	if (rp && !json_is_null(rp)) {
		json_t *t;
		if (!json_is_object(rp))
			return q3_errf(e, -EINVAL, "%s: rope_parameters: expected an object", fname);
		const char *key;
		json_t *v;

		t = json_object_get(rp, "rope_type");
		if (t && (!json_is_string(t) || strcmp(json_string_value(t), "default")))
			return q3_errf(e, -EINVAL, "%s: rope_parameters.rope_type: only \"default\" is supported",
				       fname);
		/* anything else (scaling factors, a per-layer-type form) would change the numerics:
		 * refused rather than silently replaced by the defaults */
		json_object_foreach(rp, key, v)
			if (strcmp(key, "rope_type") && strcmp(key, "rope_theta") && strcmp(key, "partial_rotary_factor"))
				return q3_errf(e, -EINVAL, "%s: rope_parameters.%s: not supported (only rope_type, "
					       "rope_theta, partial_rotary_factor)", fname, key);
		src = rp;
	}
	if ((err = get_num(src, fname, "rope_theta", 1.0, 1e12,
			   src == rp ? 10000.0 : 10000.0, &theta, e)))
		return err;
	/* A top-level key still counts when rope_parameters lacks it. */
	if (src == rp && !json_object_get(rp, "rope_theta") &&
	    (err = get_num(root, fname, "rope_theta", 1.0, 1e12, 10000.0, &theta, e)))
		return err;
	if ((err = get_num(src, fname, "partial_rotary_factor", 0.0, 1.0, 0.25, &prf, e)))
		return err;
	if (src == rp && !json_object_get(rp, "partial_rotary_factor") &&
	    (err = get_num(root, fname, "partial_rotary_factor", 0.0, 1.0, 0.25, &prf, e)))
		return err;
	c->rope_theta = theta;
	c->partial_rotary = (float)prf;
	c->rotary_dim = (int)lround(c->head_dim * prf);
	if (fabs(c->rotary_dim - c->head_dim * prf) > 1e-6 || c->rotary_dim % 2 || c->rotary_dim <= 0)
		return q3_errf(e, -EINVAL,
			       "%s: partial_rotary_factor %g of head_dim %d is not a positive even number of dims",
			       fname, prf, c->head_dim);
	return 0;
}

int q3_config_parse(const char *json, size_t len, const char *fname, struct q3_config *c, q3_err *e)
{
	json_error_t jerr;
	json_t *root, *v;
	double eps;
	int err, tmp;

	memset(c, 0, sizeof(*c));
	root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return q3_errf(e, -EINVAL, "%s: line %d: %s", fname, jerr.line, jerr.text);
	if (!json_is_object(root)) {
		err = q3_errf(e, -EINVAL, "%s: expected a JSON object", fname);
		goto out;
	}
	v = json_object_get(root, "model_type");
	if (!json_is_string(v) || strcmp(json_string_value(v), "qwen3_next")) {
		err = q3_errf(e, -EINVAL, "%s: model_type: expected \"qwen3_next\", got %s%s%s", fname,
			      json_is_string(v) ? "\"" : "", json_is_string(v) ? json_string_value(v) : "none",
			      json_is_string(v) ? "\"" : "");
		goto out;
	}
	if ((err = get_int(root, fname, "vocab_size", 1, 1 << 24, false, 0, &c->vocab_size, e)) ||
	    (err = get_int(root, fname, "hidden_size", 1, 65536, false, 0, &c->hidden_size, e)) ||
	    (err = get_int(root, fname, "num_hidden_layers", 1, 1024, false, 0, &c->num_layers, e)) ||
	    (err = get_int(root, fname, "num_attention_heads", 1, 1024, false, 0, &c->num_heads, e)) ||
	    (err = get_int(root, fname, "num_key_value_heads", 1, 1024, false, 0, &c->num_kv_heads, e)) ||
	    (err = get_int(root, fname, "head_dim", 2, 4096, true, 256, &c->head_dim, e)) ||
	    (err = get_int(root, fname, "linear_num_key_heads", 1, 1024, false, 0, &c->lin_num_k_heads, e)) ||
	    (err = get_int(root, fname, "linear_num_value_heads", 1, 1024, false, 0, &c->lin_num_v_heads, e)) ||
	    (err = get_int(root, fname, "linear_key_head_dim", 1, 4096, false, 0, &c->lin_k_dim, e)) ||
	    (err = get_int(root, fname, "linear_value_head_dim", 1, 4096, false, 0, &c->lin_v_dim, e)) ||
	    (err = get_int(root, fname, "linear_conv_kernel_dim", 1, 64, true, 4, &c->conv_kernel, e)) ||
	    (err = get_int(root, fname, "num_experts", 1, 65536, false, 0, &c->num_experts, e)) ||
	    (err = get_int(root, fname, "num_experts_per_tok", 1, 65536, false, 0, &c->top_k, e)) ||
	    (err = get_int(root, fname, "moe_intermediate_size", 1, 1 << 20, false, 0, &c->moe_inter, e)) ||
	    (err = get_int(root, fname, "shared_expert_intermediate_size", 1, 1 << 20, true, 512, &c->shared_inter, e)) ||
	    (err = get_int(root, fname, "full_attention_interval", 1, 1024, true, 4, &c->full_attention_interval, e)) ||
	    (err = get_int(root, fname, "max_position_embeddings", 1, 1 << 30, true, 262144, &c->max_position_embeddings, e)) ||
	    (err = get_int(root, fname, "decoder_sparse_step", 1, 1024, true, 1, &tmp, e)))
		goto out;
	if ((err = refuse_if(tmp != 1, e, fname, "decoder_sparse_step other than 1 (dense MLP layers)")))
		goto out;
	v = json_object_get(root, "mlp_only_layers");
	if ((err = refuse_if(v && !(json_is_array(v) && json_array_size(v) == 0) && !json_is_null(v), e, fname,
			     "a non-empty mlp_only_layers (dense MLP layers)")))
		goto out;
	if ((err = get_bool(root, fname, "norm_topk_prob", true, &c->norm_topk_prob, e)) ||
	    (err = get_bool(root, fname, "tie_word_embeddings", false, &c->tie_word_embeddings, e)))
		goto out;
	{
		bool ab;
		if ((err = get_bool(root, fname, "attention_bias", false, &ab, e)) ||
		    (err = refuse_if(ab, e, fname, "attention_bias = true")))
			goto out;
	}
	v = json_object_get(root, "hidden_act");
	if ((err = refuse_if(v && (!json_is_string(v) || strcmp(json_string_value(v), "silu")), e, fname,
			     "a hidden_act other than \"silu\"")))
		goto out;
	if ((err = get_num(root, fname, "rms_norm_eps", 0.0, 1.0, 1e-6, &eps, e)))
		goto out;
	c->rms_eps = (float)eps;
	if (c->num_heads % c->num_kv_heads) {
		err = q3_errf(e, -EINVAL, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
			      fname, c->num_heads, c->num_kv_heads);
		goto out;
	}
	if (c->lin_num_v_heads % c->lin_num_k_heads) {
		err = q3_errf(e, -EINVAL,
			      "%s: linear_num_value_heads %d is not a multiple of linear_num_key_heads %d",
			      fname, c->lin_num_v_heads, c->lin_num_k_heads);
		goto out;
	}
	if (c->top_k > c->num_experts) {
		err = q3_errf(e, -EINVAL, "%s: num_experts_per_tok %d is more than num_experts %d", fname,
			      c->top_k, c->num_experts);
		goto out;
	}
	if ((err = parse_rope(root, fname, c, e)) || (err = parse_layer_types(root, fname, c, e)) ||
	    (err = parse_eos(root, fname, c, e)))
		goto out;
	c->q_dim = c->num_heads * c->head_dim;
	c->kv_dim = c->num_kv_heads * c->head_dim;
	c->lin_key_dim = c->lin_num_k_heads * c->lin_k_dim;
	c->lin_value_dim = c->lin_num_v_heads * c->lin_v_dim;
	c->conv_dim = 2 * c->lin_key_dim + c->lin_value_dim;
	c->qkvz_dim = 2 * c->lin_key_dim + 2 * c->lin_value_dim;
	c->ba_dim = 2 * c->lin_num_v_heads;
	v = json_object_get(root, "quantization_config");
	if (v && !json_is_null(v)) {
		err = quant_parse(v, fname, &c->quant, e);
		if (err)
			goto out;
	}
	err = 0;
out:
	json_decref(root);
	if (err)
		q3_config_free(c);
	return err;
}
