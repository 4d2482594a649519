/* checkpoint.h - a model folder on disk: config, shards and one validated tensor table.
 *
 * q3_ckpt_open reads config.json (+ quantize_config.json), model.safetensors.index.json (or a
 * single model.safetensors) and every shard's header, cross-checks them, and builds the tensor
 * table: name, shard, absolute file offset, byte count, dtype, shape.  It reads no tensor data;
 * the loader (or q3_ckpt_map for tests and small models) fills tensor->data later.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "safetensors.h"
#include "util.h"

struct q3_shard {
	char *name;	   /* file name inside the folder */
	char *path;	   /* folder + name */
	uint64_t size;	   /* file size */
	uint64_t data_off; /* start of the data section */
	size_t ntensors;
};

struct q3_tensor {
	char *name;
	int shard;
	enum q3_dtype dtype;
	int ndim;
	int64_t shape[Q3_MAX_DIMS];
	uint64_t off;	 /* absolute byte offset of the data in the shard file */
	uint64_t nbytes;
	void *data;	 /* host bytes once loaded (may be unaligned: safetensors data is packed) */
	void *dev;	 /* a backend's device copy, if any */
	bool bound;	 /* claimed by the model binding (model.c) */
};

struct q3_ckpt {
	char *dir;
	struct q3_config cfg;
	int nshards;
	struct q3_shard *shards;
	size_t ntensors;
	struct q3_tensor *tensors; /* sorted by name */
	uint64_t total_bytes;	   /* sum of tensor bytes */
	void **maps;		   /* q3_ckpt_map's mappings, one per shard */
};

/* Opens and validates a model folder. Returns 0 or -errno with a one-line reason naming the
 * file, tensor or key. */
int q3_ckpt_open(const char *dir, struct q3_ckpt **out, q3_err *e);
void q3_ckpt_close(struct q3_ckpt *ck);

/* The tensor of that exact name, or NULL. */
struct q3_tensor *q3_ckpt_find(const struct q3_ckpt *ck, const char *name);

/* Maps every shard read-only and points each tensor's data at its bytes (page cache, no copy).
 * For tests, tools and small models; the loader is the fast path for big ones. */
int q3_ckpt_map(struct q3_ckpt *ck, q3_err *e);

/* Number of elements of a tensor. */
uint64_t q3_tensor_numel(const struct q3_tensor *t);
/* "[512, 2048]" */
const char *q3_tensor_shape_str(const struct q3_tensor *t, char *buf, size_t len);
