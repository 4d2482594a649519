/* knobs.c - reads the qwen3mm module's sysfs knobs (see knobs.h and qwen3mm_uapi.h). */
#include "knobs.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qwen3mm_uapi.h"

static const char *const policy_names[] = QWEN3MM_POLICY_NAMES;

_Static_assert(Q3_ARRAY_SIZE(policy_names) == Q3_CACHE_NR_POLICIES,
	       "enum q3_cache_policy follows the module's policy list");

const char *q3_cache_policy_name(enum q3_cache_policy p)
{
	return (unsigned)p < Q3_CACHE_NR_POLICIES ? policy_names[p] : "?";
}

void q3_knobs_defaults(struct q3_knobs *k)
{
	memset(k, 0, sizeof(*k));
	k->read_chunk_kb = QWEN3MM_KNOB_READ_CHUNK_KB_DEFAULT;
	k->queue_depth = QWEN3MM_KNOB_QUEUE_DEPTH_DEFAULT;
	k->vram_budget_mb = QWEN3MM_KNOB_VRAM_BUDGET_MB_DEFAULT;
	k->expert_cache_policy = (enum q3_cache_policy)QWEN3MM_POLICY_DEFAULT;
	k->cpu_expert_threads = QWEN3MM_KNOB_CPU_EXPERT_THREADS_DEFAULT;
}

/* Reads dir/name into buf without the trailing newline: 1 read, 0 absent, -errno. */
static int read_knob(const char *dir, const char *name, char *buf, size_t n, q3_err *e)
{
	char path[512];
	size_t len;
	FILE *f;

	if (q3_path_join(path, sizeof(path), dir, name))
		return q3_errf(e, -ENAMETOOLONG, "knobs: path too long: %s/%s", dir, name);
	f = fopen(path, "r");
	if (!f) {
		if (errno == ENOENT || errno == ENOTDIR)
			return 0;
		return q3_errf(e, -errno, "knobs: %s: %s", path, strerror(errno));
	}
	len = fread(buf, 1, n - 1, f);
	fclose(f);
	buf[len] = 0;
	if (len && buf[len - 1] == '\n')
		buf[--len] = 0;
	return 1;
}

/* Parses a decimal in [min, max] (and a power of two if pow2); false on anything else. */
static bool parse_u32(const char *s, uint32_t min, uint32_t max, bool pow2, uint32_t *out)
{
	unsigned long long v;
	char *end;

	if (*s < '0' || *s > '9')
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v < min || v > max || (pow2 && (v & (v - 1))))
		return false;
	*out = (uint32_t)v;
	return true;
}

int q3_cache_policy_parse(const char *s)
{
	const char *open = strchr(s, '[');
	size_t n = strlen(s);

	if (open) {
		const char *close = strchr(open, ']');

		if (!close)
			return -1;
		s = open + 1;
		n = (size_t)(close - s);
	}
	for (int p = 0; p < Q3_CACHE_NR_POLICIES; p++)
		if (strlen(policy_names[p]) == n && !strncmp(s, policy_names[p], n))
			return p;
	return -1;
}

struct knob_spec {
	const char *name;
	unsigned bit;
	uint32_t min, max;
	bool pow2;
	size_t offset; /* of the uint32_t in struct q3_knobs */
};

static const struct knob_spec numeric_knobs[] = {
	{ "read_chunk_kb", Q3_KNOB_READ_CHUNK_KB, QWEN3MM_KNOB_READ_CHUNK_KB_MIN,
	  QWEN3MM_KNOB_READ_CHUNK_KB_MAX, true, offsetof(struct q3_knobs, read_chunk_kb) },
	{ "queue_depth", Q3_KNOB_QUEUE_DEPTH, QWEN3MM_KNOB_QUEUE_DEPTH_MIN,
	  QWEN3MM_KNOB_QUEUE_DEPTH_MAX, false, offsetof(struct q3_knobs, queue_depth) },
	{ "vram_budget_mb", Q3_KNOB_VRAM_BUDGET_MB, 0, QWEN3MM_KNOB_VRAM_BUDGET_MB_MAX, false,
	  offsetof(struct q3_knobs, vram_budget_mb) },
	{ "cpu_expert_threads", Q3_KNOB_CPU_EXPERT_THREADS, 0, QWEN3MM_KNOB_CPU_EXPERT_THREADS_MAX,
	  false, offsetof(struct q3_knobs, cpu_expert_threads) },
};

int q3_knobs_read(const char *dir, struct q3_knobs *k, q3_err *e)
{
	char buf[128];
	int ret, p;

	q3_knobs_defaults(k);
	if (!dir)
		dir = Q3_KNOBS_DIR;
	for (size_t i = 0; i < Q3_ARRAY_SIZE(numeric_knobs); i++) {
		const struct knob_spec *s = &numeric_knobs[i];
		uint32_t *field = (uint32_t *)((char *)k + s->offset);

		ret = read_knob(dir, s->name, buf, sizeof(buf), e);
		if (ret < 0)
			return ret;
		if (!ret)
			continue;
		if (!parse_u32(buf, s->min, s->max, s->pow2, field))
			return q3_errf(e, -EINVAL, "knobs: %s/%s: '%s' is not %s in %u..%u", dir,
				       s->name, buf, s->pow2 ? "a power of two" : "a number", s->min,
				       s->max);
		k->present |= s->bit;
	}
	ret = read_knob(dir, "expert_cache_policy", buf, sizeof(buf), e);
	if (ret < 0)
		return ret;
	if (ret) {
		p = q3_cache_policy_parse(buf);
		if (p < 0)
			return q3_errf(e, -EINVAL, "knobs: %s/expert_cache_policy: '%s' names no policy "
				       "(lru, lfu, static)", dir, buf);
		k->expert_cache_policy = (enum q3_cache_policy)p;
		k->present |= Q3_KNOB_EXPERT_CACHE_POLICY;
	}
	return 0;
}
