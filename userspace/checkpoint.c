/* checkpoint.c - model folder → validated tensor table (see checkpoint.h). */
#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_CONFIG_BYTES (4u << 20)
#define MAX_INDEX_BYTES (512u << 20)

uint64_t q3_tensor_numel(const struct q3_tensor *t)
{
	uint64_t n = 1;

	for (int i = 0; i < t->ndim; i++)
		n *= (uint64_t)t->shape[i];
	return n;
}

const char *q3_tensor_shape_str(const struct q3_tensor *t, char *buf, size_t len)
{
	size_t o = 0;

	o += (size_t)snprintf(buf + o, len - o, "[");
	for (int i = 0; i < t->ndim && o < len; i++)
		o += (size_t)snprintf(buf + o, len - o, "%s%" PRId64, i ? ", " : "", t->shape[i]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
	return buf;
}

static int cmp_tensor_name(const void *a, const void *b)
{
	return strcmp(((const struct q3_tensor *)a)->name, ((const struct q3_tensor *)b)->name);
}

struct q3_tensor *q3_ckpt_find(const struct q3_ckpt *ck, const char *name)
{
	struct q3_tensor key = { .name = (char *)name };

	return bsearch(&key, ck->tensors, ck->ntensors, sizeof(key), cmp_tensor_name);
}

void q3_ckpt_close(struct q3_ckpt *ck)
{
	if (!ck)
		return;
	for (int i = 0; i < ck->nshards; i++) {
		if (ck->maps && ck->maps[i])
			munmap(ck->maps[i], ck->shards[i].size);
		free(ck->shards[i].name);
		free(ck->shards[i].path);
	}
	for (size_t i = 0; i < ck->ntensors; i++)
		free(ck->tensors[i].name);
	free(ck->maps);
	free(ck->shards);
	free(ck->tensors);
	q3_config_free(&ck->cfg);
	free(ck->dir);
	free(ck);
}

static bool file_exists(const char *dir, const char *name)
{
	char p[4096];
	struct stat st;

	return !q3_path_join(p, sizeof(p), dir, name) && stat(p, &st) == 0;
}

static int read_json_file(const char *dir, const char *name, size_t max, char **buf, size_t *len,
			  q3_err *e)
{
	char p[4096];

	if (q3_path_join(p, sizeof(p), dir, name))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", dir);
	return q3_read_file(p, max, buf, len, e);
}

static int load_config(struct q3_ckpt *ck, q3_err *e)
{
	char *buf, p[4096];
	size_t len;
	int err;

	err = read_json_file(ck->dir, "config.json", MAX_CONFIG_BYTES, &buf, &len, e);
	if (err)
		return err;
	q3_path_join(p, sizeof(p), ck->dir, "config.json");
	err = q3_config_parse(buf, len, p, &ck->cfg, e);
	free(buf);
	if (err || ck->cfg.quant.method != Q3_QM_NONE || !file_exists(ck->dir, "quantize_config.json"))
		return err;
	/* Older exports keep the quantization settings beside config.json. */
	err = read_json_file(ck->dir, "quantize_config.json", MAX_CONFIG_BYTES, &buf, &len, e);
	if (err)
		return err;
	q3_path_join(p, sizeof(p), ck->dir, "quantize_config.json");
	err = q3_quant_parse_text(buf, len, p, &ck->cfg.quant, e);
	free(buf);
	return err;
}

/* A shard name from the index must be a plain file name in the folder. */
static bool valid_shard_name(const char *s)
{
	size_t n = strlen(s);

	return n > 12 && !strchr(s, '/') && s[0] != '.' && !strcmp(s + n - 12, ".safetensors");
}

struct index_entry {
	const char *name;
	int shard;
};

static int cmp_index_entry(const void *a, const void *b)
{
	return strcmp(((const struct index_entry *)a)->name, ((const struct index_entry *)b)->name);
}

static int add_shard(struct q3_ckpt *ck, const char *name, q3_err *e)
{
	struct q3_shard *s = &ck->shards[ck->nshards];
	char p[4096];

	if (q3_path_join(p, sizeof(p), ck->dir, name))
		return q3_errf(e, -ENAMETOOLONG, "%s: path too long", name);
	s->name = strdup(name);
	s->path = strdup(p);
	if (!s->name || !s->path)
		return q3_errf(e, -ENOMEM, "out of memory");
	return ck->nshards++;
}

/* Reads model.safetensors.index.json into a sorted (name, shard) list and the shard list. */
static int load_index(struct q3_ckpt *ck, struct index_entry **out, size_t *nout, json_t **keep,
		      q3_err *e)
{
	char *buf, p[4096];
	size_t len, n, i = 0;
	json_error_t jerr;
	json_t *root, *wm, *v, *meta;
	const char *k;
	struct index_entry *ent;
	int err = 0;

	err = read_json_file(ck->dir, "model.safetensors.index.json", MAX_INDEX_BYTES, &buf, &len, e);
	if (err)
		return err;
	q3_path_join(p, sizeof(p), ck->dir, "model.safetensors.index.json");
	root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
	free(buf);
	if (!root)
		return q3_errf(e, -EINVAL, "%s: line %d: %s", p, jerr.line, jerr.text);
	wm = json_object_get(root, "weight_map");
	if (!json_is_object(wm) || !json_object_size(wm)) {
		json_decref(root);
		return q3_errf(e, -EINVAL, "%s: weight_map: missing, empty or not an object", p);
	}
	meta = json_object_get(root, "metadata");
	if (meta && !json_is_null(meta) && !json_is_object(meta)) {
		json_decref(root);
		return q3_errf(e, -EINVAL, "%s: metadata: expected an object", p);
	}
	n = json_object_size(wm);
	ent = calloc(n, sizeof(*ent));
	ck->shards = calloc(n, sizeof(*ck->shards));
	if (!ent || !ck->shards) {
		free(ent);
		json_decref(root);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	json_object_foreach(wm, k, v) {
		const char *sname = json_is_string(v) ? json_string_value(v) : NULL;
		int s;

		if (!sname || !valid_shard_name(sname)) {
			err = q3_errf(e, -EINVAL, "%s: weight_map[\"%.200s\"]: expected a .safetensors file name in the folder",
				      p, k);
			break;
		}
		for (s = 0; s < ck->nshards; s++)
			if (!strcmp(ck->shards[s].name, sname))
				break;
		if (s == ck->nshards && (s = add_shard(ck, sname, e)) < 0) {
			err = s;
			break;
		}
		ent[i].name = k;
		ent[i++].shard = s;
	}
	if (err) {
		free(ent);
		json_decref(root);
		return err;
	}
	qsort(ent, n, sizeof(*ent), cmp_index_entry);
	*out = ent;
	*nout = n;
	*keep = root; /* ent[].name points into it */
	return 0;
}

/* Opens one shard and parses its header into h (sets the shard's size and data offset). */
static int parse_shard(struct q3_ckpt *ck, int si, struct q3_st_header *h, q3_err *e)
{
	struct q3_shard *s = &ck->shards[si];
	struct stat st;
	unsigned char first8[8];
	uint64_t hl;
	char *hbuf;
	ssize_t r;
	int fd, err;

	fd = open(s->path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return q3_errf(e, -errno, "%s: %s (named by the index)", s->path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return q3_errf(e, -EINVAL, "%s: not a regular file", s->path);
	}
	s->size = (uint64_t)st.st_size;
	r = pread(fd, first8, 8, 0);
	if (r != 8) {
		close(fd);
		return q3_errf(e, -EINVAL, "%s: %" PRIu64 " bytes, too short for a safetensors file", s->path,
			       s->size);
	}
	err = q3_st_header_len(first8, s->size, s->path, &hl, e);
	if (err) {
		close(fd);
		return err;
	}
	hbuf = malloc(8 + hl);
	if (!hbuf) {
		close(fd);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	memcpy(hbuf, first8, 8);
	for (uint64_t got = 0; got < hl;) {
		r = pread(fd, hbuf + 8 + got, hl - got, (off_t)(8 + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			free(hbuf);
			close(fd);
			return q3_errf(e, -EIO, "%s: read of the header failed at byte %" PRIu64, s->path, 8 + got);
		}
		got += (uint64_t)r;
	}
	close(fd);
	err = q3_st_parse(hbuf, 8 + hl, s->size, s->path, h, e);
	free(hbuf);
	if (err)
		return err;
	s->data_off = h->data_off;
	s->ntensors = h->n;
	return 0;
}

/* Appends a parsed shard's tensors to ck->tensors (and frees the header). */
static int append_shard(struct q3_ckpt *ck, int si, struct q3_st_header *hp, size_t *cap, q3_err *e)
{
	struct q3_st_header h = *hp;

	memset(hp, 0, sizeof(*hp));
	if (ck->ntensors + h.n > *cap) {
		size_t nc = (ck->ntensors + h.n) * 2;
		struct q3_tensor *nt = realloc(ck->tensors, nc * sizeof(*nt));
		if (!nt) {
			q3_st_header_free(&h);
			return q3_errf(e, -ENOMEM, "out of memory");
		}
		ck->tensors = nt;
		*cap = nc;
	}
	for (size_t i = 0; i < h.n; i++) {
		struct q3_tensor *t = &ck->tensors[ck->ntensors++];

		memset(t, 0, sizeof(*t));
		t->name = h.t[i].name;
		h.t[i].name = NULL;
		t->shard = si;
		t->dtype = h.t[i].dtype;
		t->ndim = h.t[i].ndim;
		memcpy(t->shape, h.t[i].shape, sizeof(t->shape));
		t->off = h.data_off + h.t[i].begin;
		t->nbytes = h.t[i].end - h.t[i].begin;
		ck->total_bytes += t->nbytes;
	}
	q3_st_header_free(&h);
	return 0;
}

/* The headers of a 45 GB checkpoint hold ~300k tensors in ~36 MB of JSON: parsed one shard per
 * thread, appended in shard order (the first error in shard order is the one reported). */
struct shard_job {
	struct q3_ckpt *ck;
	struct q3_st_header *h;
	int *err;
	q3_err *e;
	int next; /* atomic */
};

static void *parse_thread(void *arg)
{
	struct shard_job *j = arg;

	for (;;) {
		int s = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
		if (s >= j->ck->nshards)
			return NULL;
		j->err[s] = parse_shard(j->ck, s, &j->h[s], &j->e[s]);
	}
}

static int read_shards(struct q3_ckpt *ck, size_t *cap, q3_err *e)
{
	int n = ck->nshards, nth = Q3_MIN(Q3_MIN(n, q3_ncpu()), 16), started = 0, err = 0;
	struct shard_job j = { .ck = ck };
	pthread_t th[16];

	j.h = calloc((size_t)n, sizeof(*j.h));
	j.err = calloc((size_t)n, sizeof(*j.err));
	j.e = calloc((size_t)n, sizeof(*j.e));
	if (!j.h || !j.err || !j.e) {
		free(j.h), free(j.err), free(j.e);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	for (; nth > 1 && started < nth; started++)
		if (pthread_create(&th[started], NULL, parse_thread, &j))
			break;
	parse_thread(&j); /* this thread works too (alone when threads cannot start) */
	for (int i = 0; i < started; i++)
		pthread_join(th[i], NULL);
	for (int s = 0; s < n; s++) {
		if (!err && j.err[s])
			err = q3_errf(e, j.err[s], "%s", j.e[s].msg);
		else if (!err)
			err = append_shard(ck, s, &j.h[s], cap, e);
		q3_st_header_free(&j.h[s]);
	}
	free(j.h), free(j.err), free(j.e);
	return err;
}

/* Every tensor named by the index is in the shard it names, and nothing else is in any shard. */
static int cross_check(struct q3_ckpt *ck, const struct index_entry *ent, size_t n, const char *ipath,
		       q3_err *e)
{
	size_t i = 0, j = 0;

	while (i < n || j < ck->ntensors) {
		int c = i == n ? 1 : j == ck->ntensors ? -1 : strcmp(ent[i].name, ck->tensors[j].name);

		if (j + 1 < ck->ntensors && !strcmp(ck->tensors[j].name, ck->tensors[j + 1].name))
			return q3_errf(e, -EINVAL, "tensor %s is in both %s and %s", ck->tensors[j].name,
				       ck->shards[ck->tensors[j].shard].path,
				       ck->shards[ck->tensors[j + 1].shard].path);
		if (c < 0)
			return q3_errf(e, -EINVAL, "%s: tensor %s is not in %s", ipath, ent[i].name,
				       ck->shards[ent[i].shard].path);
		if (c > 0)
			return q3_errf(e, -EINVAL, "%s: tensor %s is not listed in %s",
				       ck->shards[ck->tensors[j].shard].path, ck->tensors[j].name, ipath);
		if (ent[i].shard != ck->tensors[j].shard)
			return q3_errf(e, -EINVAL, "%s: tensor %s is listed in %s but stored in %s", ipath,
				       ent[i].name, ck->shards[ent[i].shard].name,
				       ck->shards[ck->tensors[j].shard].name);
		i++, j++;
	}
	return 0;
}

int q3_ckpt_open(const char *dir, struct q3_ckpt **out, q3_err *e)
{
	struct q3_ckpt *ck;
	struct index_entry *ent = NULL;
	json_t *index = NULL;
	size_t nent = 0, cap = 0;
	struct stat st;
	char ipath[4096];
	int err;

	*out = NULL;
	if (stat(dir, &st) < 0)
		return q3_errf(e, -errno, "%s: %s", dir, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return q3_errf(e, -ENOTDIR, "%s: not a directory", dir);
	ck = calloc(1, sizeof(*ck));
	if (!ck || !(ck->dir = strdup(dir))) {
		free(ck);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	err = load_config(ck, e);
	if (err)
		goto fail;
	q3_path_join(ipath, sizeof(ipath), dir, "model.safetensors.index.json");
	if (file_exists(dir, "model.safetensors.index.json")) {
		err = load_index(ck, &ent, &nent, &index, e);
		if (err)
			goto fail;
	} else if (file_exists(dir, "model.safetensors")) {
		ck->shards = calloc(1, sizeof(*ck->shards));
		if (!ck->shards) {
			err = q3_errf(e, -ENOMEM, "out of memory");
			goto fail;
		}
		if ((err = add_shard(ck, "model.safetensors", e)) < 0)
			goto fail;
	} else {
		err = q3_errf(e, -ENOENT, "%s: no model.safetensors.index.json and no model.safetensors", dir);
		goto fail;
	}
	if ((err = read_shards(ck, &cap, e)))
		goto fail;
	qsort(ck->tensors, ck->ntensors, sizeof(*ck->tensors), cmp_tensor_name);
	if (index) {
		json_t *ts = json_object_get(json_object_get(index, "metadata"), "total_size");

		err = cross_check(ck, ent, nent, ipath, e);
		if (err)
			goto fail;
		if (json_is_integer(ts) && (uint64_t)json_integer_value(ts) != ck->total_bytes)
			q3_warn("%s: metadata.total_size %" PRId64 " differs from the %" PRIu64
				" bytes of tensors in the shards",
				ipath, (int64_t)json_integer_value(ts), ck->total_bytes);
	} else {
		for (size_t j = 1; j < ck->ntensors; j++)
			if (!strcmp(ck->tensors[j - 1].name, ck->tensors[j].name)) {
				err = q3_errf(e, -EINVAL, "tensor %s appears twice", ck->tensors[j].name);
				goto fail;
			}
	}
	free(ent);
	json_decref(index);
	*out = ck;
	return 0;
fail:
	free(ent);
	json_decref(index);
	q3_ckpt_close(ck);
	return err;
}

/* Unmaps what q3_ckpt_map mapped so far: a failed map leaves nothing (a later call retries). */
static void unmap_all(struct q3_ckpt *ck)
{
	for (int s = 0; ck->maps && s < ck->nshards; s++)
		if (ck->maps[s])
			munmap(ck->maps[s], ck->shards[s].size);
	free(ck->maps);
	ck->maps = NULL;
}

int q3_ckpt_map(struct q3_ckpt *ck, q3_err *e)
{
	int err = 0;

	if (ck->maps)
		return 0;
	ck->maps = calloc((size_t)ck->nshards, sizeof(*ck->maps));
	if (!ck->maps)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (int s = 0; s < ck->nshards && !err; s++) {
		struct stat st;
		int fd = open(ck->shards[s].path, O_RDONLY | O_CLOEXEC);
		void *m;

		if (fd < 0) {
			err = q3_errf(e, -errno, "%s: %s", ck->shards[s].path, strerror(errno));
			break;
		}
		/* The file may have changed since its header was read. */
		if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != ck->shards[s].size) {
			close(fd);
			err = q3_errf(e, -EIO, "%s: size changed since it was opened", ck->shards[s].path);
			break;
		}
		m = mmap(NULL, ck->shards[s].size, PROT_READ, MAP_PRIVATE, fd, 0);
		close(fd);
		if (m == MAP_FAILED)
			err = q3_errf(e, -errno, "%s: mmap: %s", ck->shards[s].path, strerror(errno));
		else
			ck->maps[s] = m;
	}
	if (err) {
		unmap_all(ck);
		return err;
	}
	for (size_t i = 0; i < ck->ntensors; i++)
		ck->tensors[i].data = (char *)ck->maps[ck->tensors[i].shard] + ck->tensors[i].off;
	return 0;
}
