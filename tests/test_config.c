/* test_config.c - config.json forms (hub keys, rope_parameters, layer_types) and
 * quantization_config (gptq v1/v2, auto-round, dynamic and extra_config overrides), and the
 * errors for what the engine does not support. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "config.h"

#define BASE                                                                                        \
	"\"model_type\":\"qwen3_next\",\"vocab_size\":1000,\"hidden_size\":64,\"num_hidden_layers\":8,"  \
	"\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":16,\"linear_num_key_heads\":2," \
	"\"linear_num_value_heads\":4,\"linear_key_head_dim\":16,\"linear_value_head_dim\":16,"          \
	"\"num_experts\":8,\"num_experts_per_tok\":2,\"moe_intermediate_size\":32"

static int parse(const char *extra, struct q3_config *c, q3_err *e)
{
	char buf[8192];

	snprintf(buf, sizeof(buf), "{" BASE "%s}", extra);
	e->msg[0] = 0;
	return q3_config_parse(buf, strlen(buf), "config.json", c, e);
}

static void expect_error(const char *extra, const char *needle)
{
	struct q3_config c;
	q3_err e;
	int r = parse(extra, &c, &e);

	if (r != -EINVAL || !strstr(e.msg, needle) || !strstr(e.msg, "config.json"))
		fail_msg("%s: got %d \"%s\", wanted \"%s\"", extra, r, e.msg, needle);
}

static void test_hub_form_defaults_and_derived_sizes(void **state)
{
	struct q3_config c;
	q3_err e;

	assert_int_equal(parse(",\"rope_theta\":10000000,\"partial_rotary_factor\":0.25,"
			       "\"full_attention_interval\":4,\"eos_token_id\":[5,6]", &c, &e), 0);
	assert_true(c.rope_theta == 1e7);
	assert_int_equal(c.rotary_dim, 4);
	assert_int_equal(c.layer_kind[3], Q3_LAYER_FULL);
	assert_int_equal(c.layer_kind[7], Q3_LAYER_FULL);
	assert_int_equal(c.layer_kind[4], Q3_LAYER_LINEAR);
	assert_int_equal(c.num_full_layers, 2);
	assert_int_equal(c.conv_kernel, 4);
	assert_int_equal(c.shared_inter, 512);
	assert_true(c.rms_eps == 1e-6f);
	assert_true(c.norm_topk_prob);
	assert_int_equal(c.q_dim, 64);
	assert_int_equal(c.kv_dim, 32);
	assert_int_equal(c.conv_dim, 2 * 32 + 64);
	assert_int_equal(c.qkvz_dim, 2 * 32 + 2 * 64);
	assert_int_equal(c.ba_dim, 8);
	assert_int_equal(c.n_eos, 2);
	assert_int_equal(c.eos_ids[1], 6);
	assert_int_equal(c.quant.method, Q3_QM_NONE);
	q3_config_free(&c);
}

static void test_newer_forms_rope_parameters_and_layer_types(void **state)
{
	struct q3_config c;
	q3_err e;

	assert_int_equal(parse(",\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":5000000.0,"
			       "\"partial_rotary_factor\":0.5},\"layer_types\":[\"full_attention\","
			       "\"linear_attention\",\"linear_attention\",\"linear_attention\","
			       "\"full_attention\",\"linear_attention\",\"linear_attention\",\"linear_attention\"]",
			       &c, &e),
			 0);
	assert_true(c.rope_theta == 5e6);
	assert_int_equal(c.rotary_dim, 8);
	assert_int_equal(c.layer_kind[0], Q3_LAYER_FULL);
	assert_int_equal(c.layer_kind[3], Q3_LAYER_LINEAR);
	assert_int_equal(c.layer_kind[4], Q3_LAYER_FULL);
	q3_config_free(&c);
}

static void test_config_errors_name_the_key(void **state)
{
	expect_error(",\"layer_types\":[\"full_attention\"]", "layer_types");
	expect_error(",\"layer_types\":[1,2,3,4,5,6,7,8]", "layer_types[0]");
	expect_error(",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}", "rope_scaling");
	expect_error(",\"rope_parameters\":{\"rope_type\":\"linear\"}", "rope_type");
	expect_error(",\"rope_parameters\":{\"full_attention\":{\"rope_theta\":1e7}}", "rope_parameters.full_attention");
	expect_error(",\"rope_parameters\":{\"rope_theta\":1e7,\"factor\":4.0}", "rope_parameters.factor");
	expect_error(",\"partial_rotary_factor\":0.3", "partial_rotary_factor");
	expect_error(",\"attention_bias\":true", "attention_bias");
	expect_error(",\"mlp_only_layers\":[1]", "mlp_only_layers");
	expect_error(",\"hidden_act\":\"gelu\"", "hidden_act");
	expect_error(",\"rms_norm_eps\":\"x\"", "rms_norm_eps");
	/* the binding would divide by it (every layer has its shared expert) */
	expect_error(",\"shared_expert_intermediate_size\":0", "shared_expert_intermediate_size");
	{
		struct q3_config c;
		q3_err e;
		const char *j = "{\"model_type\":\"qwen3_next\",\"vocab_size\":10}";
		assert_int_equal(q3_config_parse(j, strlen(j), "config.json", &c, &e), -EINVAL);
		assert_non_null(strstr(e.msg, "hidden_size: missing"));
		j = "{\"model_type\":\"qwen3_next\",\"vocab_size\":-5}";
		assert_int_equal(q3_config_parse(j, strlen(j), "config.json", &c, &e), -EINVAL);
		assert_non_null(strstr(e.msg, "vocab_size: -5 is outside"));
	}
}

static void test_heads_must_divide(void **state)
{
	struct q3_config c;
	q3_err e;
	char buf[4096];

	snprintf(buf, sizeof(buf), "{" BASE "}");
	/* 4 heads over 3 kv heads */
	char *p = strstr(buf, "\"num_key_value_heads\":2");
	p[22] = '3';
	assert_int_equal(q3_config_parse(buf, strlen(buf), "config.json", &c, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "not a multiple"));
}

static void test_gptq_v1_v2_and_dynamic(void **state)
{
	struct q3_config c;
	struct q3_qscheme s;
	q3_err e;

	assert_int_equal(parse(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,"
			       "\"group_size\":128,\"sym\":true,\"desc_act\":false,\"checkpoint_format\":\"gptq_v2\","
			       "\"dynamic\":{\"-:.*shared_expert_gate\":{},"
			       "\"+:model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\..*\":{\"bits\":8,\"group_size\":-1},"
			       "\"model\\\\.layers\\\\.1\\\\.mlp\\\\.experts\\\\..*\":{\"group_size\":32,\"sym\":false}}}",
			       &c, &e),
			 0);
	assert_int_equal(c.quant.method, Q3_QM_GPTQ);
	assert_int_equal(c.quant.zero_offset, 0);
	assert_int_equal(c.quant.nrules, 3);
	q3_quant_scheme(&c.quant, "model.layers.0.mlp.experts.3.up_proj", &s);
	assert_int_equal(s.bits, 4);
	assert_int_equal(s.group_size, 128);
	q3_quant_scheme(&c.quant, "model.layers.1.mlp.experts.3.up_proj", &s);
	assert_int_equal(s.group_size, 32);
	assert_false(s.sym);
	q3_quant_scheme(&c.quant, "model.layers.7.self_attn.q_proj", &s);
	assert_int_equal(s.bits, 8);
	assert_int_equal(s.group_size, -1);
	q3_quant_scheme(&c.quant, "model.layers.7.mlp.shared_expert_gate", &s);
	assert_int_equal(s.bits, 16);
	/* re.match semantics: anchored at the start only */
	q3_quant_scheme(&c.quant, "xmodel.layers.7.self_attn.q_proj", &s);
	assert_int_equal(s.bits, 4);
	q3_config_free(&c);
}

static void test_autoround_extra_config(void **state)
{
	struct q3_config c;
	struct q3_qscheme s;
	q3_err e;

	assert_int_equal(parse(",\"quantization_config\":{\"quant_method\":\"auto-round\","
			       "\"packing_format\":\"auto_round:auto_gptq\",\"bits\":4,\"group_size\":32,"
			       "\"sym\":true,\"data_type\":\"int\",\"extra_config\":{"
			       "\"model.layers.0.linear_attn.in_proj_qkvz\":{\"bits\":8,\"group_size\":128},"
			       "\"model.layers.0.mlp.shared_expert_gate\":{\"bits\":16,\"data_type\":\"fp\"},"
			       "\".*self_attn.*\":{\"bits\":8}}}",
			       &c, &e),
			 0);
	assert_int_equal(c.quant.method, Q3_QM_AUTOROUND);
	assert_int_equal(c.quant.zero_offset, 1);
	q3_quant_scheme(&c.quant, "model.layers.0.linear_attn.in_proj_qkvz", &s);
	assert_int_equal(s.bits, 8);
	assert_int_equal(s.group_size, 128);
	q3_quant_scheme(&c.quant, "model.layers.1.linear_attn.in_proj_qkvz", &s);
	assert_int_equal(s.bits, 4);
	assert_int_equal(s.group_size, 32);
	q3_quant_scheme(&c.quant, "model.layers.0.mlp.shared_expert_gate", &s);
	assert_int_equal(s.bits, 16);
	q3_quant_scheme(&c.quant, "model.layers.3.self_attn.k_proj", &s);
	assert_int_equal(s.bits, 8);
	assert_int_equal(s.group_size, 32);
	q3_config_free(&c);
}

static void test_quant_errors(void **state)
{
	expect_error(",\"quantization_config\":{\"quant_method\":\"awq\",\"bits\":4}", "quant_method \"awq\"");
	expect_error(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":3,\"group_size\":128}", "3 bits");
	expect_error(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":100}", "group_size 100");
	expect_error(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4}", "group_size: missing");
	expect_error(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":128,"
		     "\"checkpoint_format\":\"marlin\"}", "checkpoint_format \"marlin\"");
	expect_error(",\"quantization_config\":{\"quant_method\":\"auto-round\",\"bits\":4,\"group_size\":128,"
		     "\"packing_format\":\"auto_round:auto_awq\"}", "packing_format");
	expect_error(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":128,"
		     "\"dynamic\":{\"+:(\":{}}}", "bad regular expression");
	expect_error(",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":128,"
		     "\"dynamic\":{\"x\":{\"bits\":2}}}", "2 bits");
}

static void test_standalone_quantize_config(void **state)
{
	struct q3_quant q;
	q3_err e;
	const char *j = "{\"bits\": 8, \"group_size\": 64, \"desc_act\": true, \"sym\": false}";

	/* AutoGPTQ's older files carry no quant_method: they are GPTQ v1 */
	assert_int_equal(q3_quant_parse_text(j, strlen(j), "quantize_config.json", &q, &e), 0);
	assert_int_equal(q.method, Q3_QM_GPTQ);
	assert_int_equal(q.zero_offset, 1);
	assert_int_equal(q.base.bits, 8);
	assert_true(q.base.desc_act);
	q3_quant_free(&q);
	assert_int_equal(q3_quant_parse_text("{", 1, "quantize_config.json", &q, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "quantize_config.json"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_hub_form_defaults_and_derived_sizes),
		cmocka_unit_test(test_newer_forms_rope_parameters_and_layer_types),
		cmocka_unit_test(test_config_errors_name_the_key),
		cmocka_unit_test(test_heads_must_divide),
		cmocka_unit_test(test_gptq_v1_v2_and_dynamic),
		cmocka_unit_test(test_autoround_extra_config),
		cmocka_unit_test(test_quant_errors),
		cmocka_unit_test(test_standalone_quantize_config),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
