/* safetensors.c - safetensors header parser (memory only, no I/O) and a small writer. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const struct {
	const char *name;
	size_t size;
} dtypes[Q3_DT_COUNT] = {
	[Q3_DT_F32] = { "F32", 4 },	[Q3_DT_F16] = { "F16", 2 },	[Q3_DT_BF16] = { "BF16", 2 },
	[Q3_DT_F64] = { "F64", 8 },	[Q3_DT_I8] = { "I8", 1 },	[Q3_DT_U8] = { "U8", 1 },
	[Q3_DT_I16] = { "I16", 2 },	[Q3_DT_U16] = { "U16", 2 },	[Q3_DT_I32] = { "I32", 4 },
	[Q3_DT_U32] = { "U32", 4 },	[Q3_DT_I64] = { "I64", 8 },	[Q3_DT_U64] = { "U64", 8 },
	[Q3_DT_BOOL] = { "BOOL", 1 },	[Q3_DT_F8_E4M3] = { "F8_E4M3", 1 },
	[Q3_DT_F8_E5M2] = { "F8_E5M2", 1 },
};

size_t q3_dtype_size(enum q3_dtype dt)
{
	return (unsigned)dt < Q3_DT_COUNT ? dtypes[dt].size : 0;
}

const char *q3_dtype_name(enum q3_dtype dt)
{
	return (unsigned)dt < Q3_DT_COUNT ? dtypes[dt].name : "?";
}

int q3_dtype_parse(const char *name)
{
	for (int i = 0; i < Q3_DT_COUNT; i++)
		if (!strcmp(name, dtypes[i].name))
			return i;
	return -1;
}

/* Returns the offset of the first byte that is not valid UTF-8 (RFC 3629: no overlongs, no
 * surrogates, nothing above U+10FFFF), or len when all of it is valid. */
static size_t utf8_valid_prefix(const unsigned char *s, size_t len)
{
	size_t i = 0;

	while (i < len) {
		unsigned c = s[i];
		size_t n;
		uint32_t cp;

		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xe0) == 0xc0) {
			n = 1, cp = c & 0x1f;
		} else if ((c & 0xf0) == 0xe0) {
			n = 2, cp = c & 0x0f;
		} else if ((c & 0xf8) == 0xf0) {
			n = 3, cp = c & 0x07;
		} else {
			return i;
		}
		if (i + n >= len) /* truncated sequence */
			return i;
		for (size_t k = 1; k <= n; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return i;
			cp = (cp << 6) | (s[i + k] & 0x3f);
		}
		if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
		    cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return i;
		i += n + 1;
	}
	return len;
}

int q3_st_header_len(const void *first8, uint64_t file_size, const char *fname, uint64_t *n,
		     q3_err *e)
{
	const unsigned char *p = first8;
	uint64_t v = 0;

	if (file_size < 8)
		return q3_errf(e, -EINVAL, "%s: %" PRIu64 " bytes, too short for a safetensors file",
			       fname, file_size);
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	if (v > file_size - 8)
		return q3_errf(e, -EINVAL,
			       "%s: header length %" PRIu64 " runs past the end of the file (%" PRIu64
			       " bytes)",
			       fname, v, file_size);
	if (v > Q3_ST_MAX_HEADER)
		return q3_errf(e, -EINVAL, "%s: header length %" PRIu64 " is larger than the %u allowed",
			       fname, v, Q3_ST_MAX_HEADER);
	if (v < 2)
		return q3_errf(e, -EINVAL, "%s: header length %" PRIu64 " cannot hold a JSON object",
			       fname, v);
	*n = v;
	return 0;
}

static int cmp_begin(const void *a, const void *b)
{
	const struct q3_st_tensor *x = a, *y = b;

	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	if (x->end != y->end)
		return x->end < y->end ? -1 : 1;
	return strcmp(x->name, y->name);
}

void q3_st_header_free(struct q3_st_header *h)
{
	for (size_t i = 0; i < h->n; i++)
		free(h->t[i].name);
	free(h->t);
	memset(h, 0, sizeof(*h));
}

/* Parses one tensor entry; name is already known unique and valid UTF-8. */
static int parse_entry(const char *fname, const char *name, json_t *v, struct q3_st_tensor *t,
		       q3_err *e)
{
	json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape");
	json_t *offs = json_object_get(v, "data_offsets");
	const char *key;
	json_t *val;
	uint64_t numel = 1, nbytes;
	int d;

	if (!json_is_object(v))
		return q3_errf(e, -EINVAL, "%s: tensor %s: entry is not an object", fname, name);
	json_object_foreach(v, key, val) {
		if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets"))
			return q3_errf(e, -EINVAL, "%s: tensor %s: unknown field \"%s\"", fname, name, key);
	}
	if (!json_is_string(dt))
		return q3_errf(e, -EINVAL, "%s: tensor %s: dtype missing or not a string", fname, name);
	d = q3_dtype_parse(json_string_value(dt));
	if (d < 0)
		return q3_errf(e, -EINVAL, "%s: tensor %s: unknown dtype \"%s\"", fname, name,
			       json_string_value(dt));
	t->dtype = d;
	if (!json_is_array(shape))
		return q3_errf(e, -EINVAL, "%s: tensor %s: shape missing or not an array", fname, name);
	if (json_array_size(shape) > Q3_MAX_DIMS)
		return q3_errf(e, -EINVAL, "%s: tensor %s: %zu dimensions, at most %d supported", fname,
			       name, json_array_size(shape), Q3_MAX_DIMS);
	t->ndim = (int)json_array_size(shape);
	for (int i = 0; i < t->ndim; i++) {
		json_t *s = json_array_get(shape, i);
		json_int_t x;

		if (!json_is_integer(s) || (x = json_integer_value(s)) < 0)
			return q3_errf(e, -EINVAL, "%s: tensor %s: shape[%d] is not a non-negative integer",
				       fname, name, i);
		t->shape[i] = x;
		if (x && numel > UINT64_MAX / (uint64_t)x)
			return q3_errf(e, -EINVAL, "%s: tensor %s: element count overflows", fname, name);
		numel *= (uint64_t)x;
	}
	if (numel > UINT64_MAX / q3_dtype_size(t->dtype))
		return q3_errf(e, -EINVAL, "%s: tensor %s: byte count overflows", fname, name);
	nbytes = numel * q3_dtype_size(t->dtype);
	if (!json_is_array(offs) || json_array_size(offs) != 2 ||
	    !json_is_integer(json_array_get(offs, 0)) || !json_is_integer(json_array_get(offs, 1)) ||
	    json_integer_value(json_array_get(offs, 0)) < 0 ||
	    json_integer_value(json_array_get(offs, 1)) < 0)
		return q3_errf(e, -EINVAL,
			       "%s: tensor %s: data_offsets must be two non-negative integers", fname, name);
	t->begin = (uint64_t)json_integer_value(json_array_get(offs, 0));
	t->end = (uint64_t)json_integer_value(json_array_get(offs, 1));
	if (t->end < t->begin)
		return q3_errf(e, -EINVAL, "%s: tensor %s: data_offsets end %" PRIu64 " < begin %" PRIu64,
			       fname, name, t->end, t->begin);
	if (t->end - t->begin != nbytes)
		return q3_errf(e, -EINVAL,
			       "%s: tensor %s: %" PRIu64 " bytes in data_offsets but dtype %s shape gives %" PRIu64,
			       fname, name, t->end - t->begin, q3_dtype_name(t->dtype), nbytes);
	return 0;
}

int q3_st_parse(const void *buf, size_t len, uint64_t file_size, const char *fname,
		struct q3_st_header *h, q3_err *e)
{
	const unsigned char *p = buf;
	json_error_t jerr;
	json_t *root, *val;
	const char *key;
	uint64_t n, data_size, prev_end = 0;
	size_t bad, i = 0;
	int err;

	memset(h, 0, sizeof(*h));
	if (len < 8)
		return q3_errf(e, -EINVAL, "%s: fewer than 8 bytes", fname);
	err = q3_st_header_len(buf, file_size, fname, &n, e);
	if (err)
		return err;
	if (len < 8 + n)
		return q3_errf(e, -EINVAL, "%s: header of %" PRIu64 " bytes but only %zu bytes given",
			       fname, n, len);
	bad = utf8_valid_prefix(p + 8, n);
	if (bad != n)
		return q3_errf(e, -EINVAL, "%s: header is not valid UTF-8 (byte %zu)", fname, bad);
	if (p[8] != '{')
		return q3_errf(e, -EINVAL, "%s: header does not start with '{'", fname);
	root = json_loadb((const char *)p + 8, n, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return q3_errf(e, -EINVAL, "%s: header JSON: %s (column %d)", fname, jerr.text,
			       jerr.column);
	if (!json_is_object(root)) {
		json_decref(root);
		return q3_errf(e, -EINVAL, "%s: header is not a JSON object", fname);
	}
	h->header_len = n;
	h->data_off = 8 + n;
	data_size = file_size - h->data_off;
	h->t = calloc(json_object_size(root) + 1, sizeof(*h->t));
	if (!h->t) {
		json_decref(root);
		return q3_errf(e, -ENOMEM, "%s: out of memory", fname);
	}
	json_object_foreach(root, key, val) {
		if (!strcmp(key, "__metadata__")) {
			const char *k2;
			json_t *v2;

			if (!json_is_object(val)) {
				err = q3_errf(e, -EINVAL, "%s: __metadata__ is not an object", fname);
				goto fail;
			}
			json_object_foreach(val, k2, v2) {
				if (!json_is_string(v2)) {
					err = q3_errf(e, -EINVAL, "%s: __metadata__.%s is not a string", fname, k2);
					goto fail;
				}
			}
			continue;
		}
		if (!*key) {
			err = q3_errf(e, -EINVAL, "%s: a tensor has an empty name", fname);
			goto fail;
		}
		err = parse_entry(fname, key, val, &h->t[i], e);
		if (err)
			goto fail;
		h->t[i].name = strdup(key);
		if (!h->t[i].name) {
			err = q3_errf(e, -ENOMEM, "%s: out of memory", fname);
			goto fail;
		}
		h->n = ++i;
	}
	json_decref(root);
	root = NULL;
	qsort(h->t, h->n, sizeof(*h->t), cmp_begin);
	for (i = 0; i < h->n; i++) {
		struct q3_st_tensor *t = &h->t[i];

		if (t->begin < prev_end) {
			err = q3_errf(e, -EINVAL, "%s: tensor %s [%" PRIu64 ", %" PRIu64
				      ") overlaps tensor %s which ends at %" PRIu64,
				      fname, t->name, t->begin, t->end, h->t[i - 1].name, prev_end);
			goto fail;
		}
		if (t->begin > prev_end) {
			err = q3_errf(e, -EINVAL, "%s: gap of %" PRIu64 " bytes before tensor %s at %" PRIu64,
				      fname, t->begin - prev_end, t->name, t->begin);
			goto fail;
		}
		if (t->end > data_size) {
			err = q3_errf(e, -EINVAL,
				      "%s: tensor %s ends at byte %" PRIu64 " of the data section, past the end of the file (data section is %" PRIu64 " bytes; file truncated?)",
				      fname, t->name, t->end, data_size);
			goto fail;
		}
		prev_end = t->end;
	}
	if (prev_end != data_size) {
		err = q3_errf(e, -EINVAL, "%s: %" PRIu64 " bytes after the last tensor are not covered by the header",
			      fname, data_size - prev_end);
		goto fail;
	}
	return 0;
fail:
	if (root)
		json_decref(root);
	q3_st_header_free(h);
	return err;
}

int q3_st_build_header(const struct q3_st_out *t, size_t n, char **out, size_t *len, q3_err *e)
{
	json_t *root = json_object(), *meta = json_object();
	uint64_t off = 0;
	char *js = NULL, *buf;
	size_t jl, padded;

	if (!root || !meta)
		goto nomem;
	json_object_set_new(meta, "format", json_string("pt"));
	json_object_set_new(root, "__metadata__", meta);
	for (size_t i = 0; i < n; i++) {
		json_t *ent = json_object(), *shape = json_array(), *offs = json_array();
		uint64_t nb = q3_dtype_size(t[i].dtype);

		if (!ent || !shape || !offs)
			goto nomem;
		for (int d = 0; d < t[i].ndim; d++) {
			json_array_append_new(shape, json_integer(t[i].shape[d]));
			nb *= (uint64_t)t[i].shape[d];
		}
		json_array_append_new(offs, json_integer((json_int_t)off));
		json_array_append_new(offs, json_integer((json_int_t)(off + nb)));
		off += nb;
		json_object_set_new(ent, "dtype", json_string(q3_dtype_name(t[i].dtype)));
		json_object_set_new(ent, "shape", shape);
		json_object_set_new(ent, "data_offsets", offs);
		if (json_object_set_new(root, t[i].name, ent)) {
			json_decref(root);
			return q3_errf(e, -EINVAL, "tensor name %s is not valid UTF-8 or repeated", t[i].name);
		}
	}
	js = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(root);
	root = NULL;
	if (!js)
		goto nomem;
	jl = strlen(js);
	padded = Q3_ALIGN_UP(8 + jl, 8) - 8;
	buf = malloc(8 + padded);
	if (!buf)
		goto nomem;
	for (int i = 0; i < 8; i++)
		buf[i] = (char)(((uint64_t)padded >> (8 * i)) & 0xff);
	memcpy(buf + 8, js, jl);
	memset(buf + 8 + jl, ' ', padded - jl);
	free(js);
	*out = buf;
	*len = 8 + padded;
	return 0;
nomem:
	json_decref(root);
	free(js);
	return q3_errf(e, -ENOMEM, "out of memory building a safetensors header");
}

static int write_all(int fd, const void *p, size_t n)
{
	const char *c = p;

	while (n) {
		ssize_t w = write(fd, c, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		c += w;
		n -= (size_t)w;
	}
	return 0;
}

int q3_st_write(const char *path, const struct q3_st_out *t, size_t n, q3_err *e)
{
	char *hdr;
	size_t hl;
	int fd, err;

	err = q3_st_build_header(t, n, &hdr, &hl, e);
	if (err)
		return err;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		free(hdr);
		return q3_errf(e, -errno, "%s: %s", path, strerror(errno));
	}
	err = write_all(fd, hdr, hl);
	free(hdr);
	for (size_t i = 0; i < n && !err; i++) {
		uint64_t nb = q3_dtype_size(t[i].dtype);
		for (int d = 0; d < t[i].ndim; d++)
			nb *= (uint64_t)t[i].shape[d];
		err = write_all(fd, t[i].data, nb);
	}
	if (close(fd) < 0 && !err)
		err = -errno;
	if (err)
		return q3_errf(e, err, "%s: write failed: %s", path, strerror(-err));
	return 0;
}
