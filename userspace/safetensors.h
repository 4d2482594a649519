/* safetensors.h - the safetensors container: dtypes, and a header parser that works on a memory
 * buffer and trusts nothing.
 *
 * File layout: 8-byte little-endian N, then N bytes of UTF-8 JSON
 *   { "name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
 *     "__metadata__": {"k": "v"} }
 * then the data section; offsets are relative to its start (8 + N) and must tile it exactly:
 * sorted by begin, each tensor starts where the previous ended, the last ends at the file end
 * (the rule of the reference implementation, huggingface/safetensors).
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "util.h"

enum q3_dtype {
	Q3_DT_F32,
	Q3_DT_F16,
	Q3_DT_BF16,
	Q3_DT_F64,
	Q3_DT_I8,
	Q3_DT_U8,
	Q3_DT_I16,
	Q3_DT_U16,
	Q3_DT_I32,
	Q3_DT_U32,
	Q3_DT_I64,
	Q3_DT_U64,
	Q3_DT_BOOL,
	Q3_DT_F8_E4M3,
	Q3_DT_F8_E5M2,
	Q3_DT_COUNT
};

size_t q3_dtype_size(enum q3_dtype dt);
const char *q3_dtype_name(enum q3_dtype dt);
/* Returns the dtype for a safetensors name ("BF16"), or -1. */
int q3_dtype_parse(const char *name);

#define Q3_MAX_DIMS 8
/* Largest header accepted; the reference implementation's limit is 100 MB. */
#define Q3_ST_MAX_HEADER (100u << 20)

struct q3_st_tensor {
	char *name;
	enum q3_dtype dtype;
	int ndim;
	int64_t shape[Q3_MAX_DIMS];
	uint64_t begin, end; /* byte range inside the data section */
};

struct q3_st_header {
	uint64_t header_len; /* N */
	uint64_t data_off;   /* 8 + N: where the data section starts in the file */
	size_t n;            /* number of tensors */
	struct q3_st_tensor *t; /* sorted by begin */
};

/* Reads N from the first 8 bytes.  Fails unless 8 + N <= file_size and N <= Q3_ST_MAX_HEADER, so
 * that the caller knows how many bytes to hand to q3_st_parse. */
int q3_st_header_len(const void *first8, uint64_t file_size, const char *fname, uint64_t *n,
		     q3_err *e);

/* Parses and validates a header.  buf holds the first len bytes of the file (at least 8 + N);
 * file_size is the size of the whole file.  Every entry is checked (dtype known, shape
 * non-negative and small, byte count = numel * dtype size without overflow, offsets tile the
 * data section exactly, names unique and valid UTF-8).  fname only names the file in errors.
 * Returns 0 or -EINVAL/-ENOMEM with a one-line reason. */
int q3_st_parse(const void *buf, size_t len, uint64_t file_size, const char *fname,
		struct q3_st_header *h, q3_err *e);
void q3_st_header_free(struct q3_st_header *h);

/* Writes a safetensors file from a list of tensors (name, dtype, shape, data), in list order.
 * Used by tests, `qwen3d logits` and the model generator. Returns 0 or -errno. */
struct q3_st_out {
	const char *name;
	enum q3_dtype dtype;
	int ndim;
	int64_t shape[Q3_MAX_DIMS];
	const void *data;
};
int q3_st_write(const char *path, const struct q3_st_out *t, size_t n, q3_err *e);
/* Builds just the header (8-byte length + JSON padded to a multiple of 8 with spaces) for the
 * given tensors, laid out back to back in list order.  *out is malloc'ed. */
int q3_st_build_header(const struct q3_st_out *t, size_t n, char **out, size_t *len, q3_err *e);
