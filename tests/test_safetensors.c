/* test_safetensors.c - the safetensors header parser on hand-made buffers: every rule it enforces
 * has a case that breaks it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

/* Builds a file image: 8-byte length, header text, then data_len zero bytes. */
static unsigned char *image(const char *hdr, size_t data_len, size_t *len)
{
	size_t n = strlen(hdr);
	unsigned char *b = calloc(1, 8 + n + data_len + 1);

	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(((uint64_t)n >> (8 * i)) & 0xff);
	memcpy(b + 8, hdr, n);
	*len = 8 + n + data_len;
	return b;
}

/* Parses hdr with data_len bytes of data; returns the error code and leaves the message in e. */
static int parse(const char *hdr, size_t data_len, struct q3_st_header *h, q3_err *e)
{
	size_t len;
	unsigned char *b = image(hdr, data_len, &len);
	int r;

	e->msg[0] = 0;
	r = q3_st_parse(b, len, len, "t.safetensors", h, e);
	free(b);
	return r;
}

static void expect_error(const char *hdr, size_t data_len, const char *needle)
{
	struct q3_st_header h;
	q3_err e;
	int r = parse(hdr, data_len, &h, &e);

	if (r == 0 || !strstr(e.msg, needle) || strchr(e.msg, '\n'))
		fail_msg("header %s: got %d \"%s\", wanted an error containing \"%s\"", hdr, r, e.msg, needle);
	assert_non_null(strstr(e.msg, "t.safetensors"));
}

static void test_valid_two_tensors_sorted_by_offset(void **state)
{
	struct q3_st_header h;
	q3_err e;
	const char *hdr = "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
			  "\"__metadata__\":{\"format\":\"pt\"},"
			  "\"a\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}";

	assert_int_equal(parse(hdr, 12, &h, &e), 0);
	assert_int_equal(h.n, 2);
	assert_string_equal(h.t[0].name, "a");
	assert_int_equal(h.t[0].dtype, Q3_DT_BF16);
	assert_int_equal(h.t[0].ndim, 2);
	assert_int_equal(h.t[0].shape[1], 2);
	assert_string_equal(h.t[1].name, "b");
	assert_int_equal(h.t[1].begin, 4);
	assert_int_equal(h.t[1].end, 12);
	assert_int_equal(h.data_off, 8 + strlen(hdr));
	q3_st_header_free(&h);
}

static void test_empty_header_and_scalar_and_zero_size(void **state)
{
	struct q3_st_header h;
	q3_err e;

	assert_int_equal(parse("{}", 0, &h, &e), 0);
	assert_int_equal(h.n, 0);
	q3_st_header_free(&h);
	/* a scalar (shape []) is one element; a zero-size tensor occupies no bytes */
	assert_int_equal(parse("{\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]},"
			       "\"z\":{\"dtype\":\"F16\",\"shape\":[0,4],\"data_offsets\":[8,8]}}",
			       8, &h, &e),
			 0);
	assert_int_equal(h.n, 2);
	q3_st_header_free(&h);
}

static void test_header_padding_spaces_are_allowed(void **state)
{
	struct q3_st_header h;
	q3_err e;

	assert_int_equal(parse("{\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}     ", 3, &h, &e), 0);
	q3_st_header_free(&h);
}

static void test_length_field_errors(void **state)
{
	unsigned char b[16] = { 0 };
	struct q3_st_header h;
	q3_err e;

	/* header length larger than the file */
	b[0] = 200;
	assert_int_equal(q3_st_parse(b, 16, 16, "t.safetensors", &h, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "past the end"));
	/* a file shorter than the length field */
	assert_int_equal(q3_st_parse(b, 4, 4, "t.safetensors", &h, &e), -EINVAL);
	/* 2^64 - 1 must not overflow the check */
	memset(b, 0xff, 8);
	assert_int_equal(q3_st_parse(b, 16, 16, "t.safetensors", &h, &e), -EINVAL);
	/* fewer bytes handed in than the header needs */
	memset(b, 0, 8);
	b[0] = 6;
	memcpy(b + 8, "{}    ", 6);
	assert_int_equal(q3_st_parse(b, 10, 16, "t.safetensors", &h, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "only 10 bytes"));
}

static void test_header_json_errors(void **state)
{
	expect_error("{\"a\":1", 0, "JSON");
	expect_error("[1,2,3]", 0, "start with");
	expect_error("{\"a\":1}", 0, "not an object");
	expect_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
		     "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
		     8, "JSON"); /* duplicate names are rejected by the JSON layer */
	expect_error("{\"__metadata__\":{\"k\":1}}", 0, "__metadata__.k");
	expect_error("{\"__metadata__\":[]}", 0, "__metadata__ is not an object");
	expect_error("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "empty name");
}

static void test_non_utf8_header(void **state)
{
	expect_error("{\"a\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "UTF-8");
	/* an overlong encoding of '/' and a lone surrogate are not UTF-8 either */
	expect_error("{\"a\xc0\xaf\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "UTF-8");
	expect_error("{\"a\xed\xa0\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "UTF-8");
}

static void test_entry_field_errors(void **state)
{
	expect_error("{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "unknown dtype");
	expect_error("{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "dtype missing");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", 1, "shape[0]");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]}}", 1, "shape[0]");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":1,\"data_offsets\":[0,1]}}", 1, "shape missing");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
		     "dimensions");
	expect_error("{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8,
		     "overflow");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", 1, "data_offsets");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,0]}}", 1, "end 0 < begin 1");
	expect_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "shape gives 8");
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", 1, "unknown field");
}

static void test_layout_errors(void **state)
{
	/* overlapping extents */
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		     "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]}}",
		     6, "overlaps");
	/* a hole between tensors */
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		     "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[6,10]}}",
		     10, "gap");
	/* the data section is shorter than the offsets say (truncated file) */
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}", 5, "truncated");
	/* bytes that no tensor covers */
	expect_error("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 9, "not covered");
}

static void test_writer_round_trip(void **state)
{
	float a[3] = { 1, 2, 3 };
	uint16_t b[4] = { 1, 2, 3, 4 };
	struct q3_st_out t[2] = {
		{ .name = "x.weight", .dtype = Q3_DT_F32, .ndim = 1, .shape = { 3 }, .data = a },
		{ .name = "y", .dtype = Q3_DT_BF16, .ndim = 2, .shape = { 2, 2 }, .data = b },
	};
	char *hdr;
	size_t hl;
	struct q3_st_header h;
	q3_err e;
	unsigned char *file;

	assert_int_equal(q3_st_build_header(t, 2, &hdr, &hl, &e), 0);
	assert_int_equal(hl % 8, 0);
	file = calloc(1, hl + 20);
	memcpy(file, hdr, hl);
	memcpy(file + hl, a, 12);
	memcpy(file + hl + 12, b, 8);
	assert_int_equal(q3_st_parse(file, hl + 20, hl + 20, "w", &h, &e), 0);
	assert_int_equal(h.n, 2);
	assert_string_equal(h.t[0].name, "x.weight");
	assert_int_equal(h.t[1].begin, 12);
	assert_int_equal(h.data_off, hl);
	q3_st_header_free(&h);
	free(file);
	free(hdr);
}

static void test_dtype_table(void **state)
{
	assert_int_equal(q3_dtype_parse("BF16"), Q3_DT_BF16);
	assert_int_equal(q3_dtype_parse("bf16"), -1);
	assert_int_equal(q3_dtype_size(Q3_DT_I32), 4);
	assert_int_equal(q3_dtype_size(Q3_DT_F8_E4M3), 1);
	assert_string_equal(q3_dtype_name(Q3_DT_U64), "U64");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid_two_tensors_sorted_by_offset),
		cmocka_unit_test(test_empty_header_and_scalar_and_zero_size),
		cmocka_unit_test(test_header_padding_spaces_are_allowed),
		cmocka_unit_test(test_length_field_errors),
		cmocka_unit_test(test_header_json_errors),
		cmocka_unit_test(test_non_utf8_header),
		cmocka_unit_test(test_entry_field_errors),
		cmocka_unit_test(test_layout_errors),
		cmocka_unit_test(test_writer_round_trip),
		cmocka_unit_test(test_dtype_table),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
