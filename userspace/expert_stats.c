/* expert_stats.c - decayed expert use, its file, and the re-balance decision (see
 * expert_stats.h).
 *
 * Counts are kept scaled: a use at time t adds `scale` = 2^(t / half_life), so that every count
 * divided by the current scale is its decayed value now; the scale is folded back into the
 * counts before it overflows.
 *
 * File layout (little-endian):
 *    0  "Q3XSTAT1"          8 bytes
 *    8  u32 version (1), u32 layers, u32 experts, u32 zero
 *   24  u64 model fingerprint
 *   32  f64 half-life (tokens), f64 decayed tokens
 *   48  f32 decayed counts [layers][experts]
 *  end  u64 FNV-1a of everything before
 */
#include "expert_stats.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAGIC "Q3XSTAT1"
#define VERSION 1
#define HDR 48
#define RESCALE 1e100

struct q3_xstats {
	int L, E;
	double half_life; /* <= 0: no decay */
	uint64_t fp;
	double *c;	  /* [L][E] scaled counts */
	double tok;	  /* scaled tokens */
	double scale;
};

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 0x100000001b3ull;
	return h;
}

#define FNV0 0xcbf29ce484222325ull

int q3_xstats_new(int nlayers, int nexperts, double half_life_tokens, uint64_t fingerprint,
		  struct q3_xstats **out, q3_err *e)
{
	struct q3_xstats *s;

	*out = NULL;
	if (nlayers <= 0 || nexperts <= 0 || nlayers > 1024 || nexperts > 65536 ||
	    !isfinite(half_life_tokens))
		return q3_errf(e, -EINVAL, "expert stats: bad shape %d x %d", nlayers, nexperts);
	s = calloc(1, sizeof(*s));
	if (!s || !(s->c = calloc((size_t)nlayers * (size_t)nexperts, sizeof(double)))) {
		free(s);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	s->L = nlayers;
	s->E = nexperts;
	s->half_life = half_life_tokens;
	s->fp = fingerprint;
	s->scale = 1.0;
	*out = s;
	return 0;
}

void q3_xstats_free(struct q3_xstats *s)
{
	if (!s)
		return;
	free(s->c);
	free(s);
}

void q3_xstats_add(struct q3_xstats *s, int layer, const int32_t *ids, int n)
{
	if (layer < 0 || layer >= s->L)
		return;
	for (int i = 0; i < n; i++)
		if (ids[i] >= 0 && ids[i] < s->E)
			s->c[(size_t)layer * (size_t)s->E + (size_t)ids[i]] += s->scale;
}

void q3_xstats_add_hist(struct q3_xstats *s, const uint32_t *counts)
{
	for (size_t i = 0; i < (size_t)s->L * (size_t)s->E; i++)
		s->c[i] += s->scale * counts[i];
}

void q3_xstats_tick(struct q3_xstats *s, uint64_t ntokens)
{
	s->tok += (double)ntokens * s->scale;
	if (s->half_life <= 0)
		return;
	s->scale *= exp2((double)ntokens / s->half_life);
	if (s->scale > RESCALE) {
		for (size_t i = 0; i < (size_t)s->L * (size_t)s->E; i++)
			s->c[i] /= s->scale;
		s->tok /= s->scale;
		s->scale = 1.0;
	}
}

void q3_xstats_freq(const struct q3_xstats *s, double *freq)
{
	/* per token, over at least one token (the counts of a token not yet ticked) */
	double tok = fmax(s->tok, s->scale);

	for (size_t i = 0; i < (size_t)s->L * (size_t)s->E; i++)
		freq[i] = s->c[i] / tok;
}

double q3_xstats_tokens(const struct q3_xstats *s)
{
	return s->tok / s->scale;
}

uint64_t q3_xstats_fingerprint(const struct q3_ckpt *ck)
{
	const struct q3_config *c = &ck->cfg;
	int32_t shape[6] = {c->num_layers, c->num_experts, c->hidden_size, c->moe_inter, c->top_k,
			    c->quant.base.bits};
	uint64_t h = fnv(FNV0, shape, sizeof(shape));

	h = fnv(h, &ck->total_bytes, sizeof(ck->total_bytes));
	for (size_t i = 0; i < ck->ntensors; i++) {
		const struct q3_tensor *t = &ck->tensors[i];
		size_t n = strlen(t->name), tail = strlen(".mlp.gate.weight");

		h = fnv(h, t->name, n);
		h = fnv(h, &t->nbytes, sizeof(t->nbytes));
		/* the routers decide routing: checkpoints of the same shapes (another fine-tune, another
		 * mkmodel seed) differ there; their first 4 KiB, where loaded */
		if (t->data && n > tail && !strcmp(t->name + n - tail, ".mlp.gate.weight"))
			h = fnv(h, t->data, t->nbytes < 4096 ? (size_t)t->nbytes : 4096);
	}
	return h;
}

static size_t file_size(int L, int E)
{
	return HDR + (size_t)L * (size_t)E * 4 + 8;
}

int q3_xstats_save(const struct q3_xstats *s, const char *path, q3_err *e)
{
	size_t n = (size_t)s->L * (size_t)s->E, len = file_size(s->L, s->E);
	unsigned char *b = calloc(1, len);
	uint32_t u[4] = {VERSION, (uint32_t)s->L, (uint32_t)s->E, 0};
	double d[2] = {s->half_life, s->tok / s->scale};
	char tmp[4200];
	uint64_t h;
	int fd, err = 0;

	if (!b)
		return q3_errf(e, -ENOMEM, "out of memory");
	memcpy(b, MAGIC, 8);
	memcpy(b + 8, u, 16);
	memcpy(b + 24, &s->fp, 8);
	memcpy(b + 32, d, 16);
	for (size_t i = 0; i < n; i++) {
		float f = (float)(s->c[i] / s->scale);

		memcpy(b + HDR + 4 * i, &f, 4);
	}
	h = q3_xstats_checksum(b, len);
	memcpy(b + len - 8, &h, 8);
	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		err = q3_errf(e, -errno, "expert stats: %s: %s", tmp, strerror(errno));
		goto out;
	}
	errno = 0; /* a short write sets none */
	if (write(fd, b, len) != (ssize_t)len || fsync(fd)) {
		err = q3_errf(e, errno ? -errno : -EIO, "expert stats: %s: %s", tmp,
			      strerror(errno ? errno : EIO));
		close(fd);
		unlink(tmp);
		goto out;
	}
	close(fd);
	if (rename(tmp, path)) {
		err = q3_errf(e, -errno, "expert stats: %s: %s", path, strerror(errno));
		unlink(tmp);
	} else {
		/* the rename itself durable: sync the folder */
		char dir[4200];
		const char *slash = strrchr(path, '/');
		int dfd;

		snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - path) + (slash == path) : 1, slash ? path : ".");
		if ((dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
			fsync(dfd);
			close(dfd);
		}
	}
out:
	free(b);
	return err;
}

uint64_t q3_xstats_checksum(const void *buf, size_t len)
{
	return fnv(FNV0, buf, len >= 8 ? len - 8 : 0);
}

int q3_xstats_load_buf(struct q3_xstats *s, const void *buf, size_t len, const char *path,
		       q3_err *e)
{
	size_t n = (size_t)s->L * (size_t)s->E, want = file_size(s->L, s->E);
	const unsigned char *b = buf;
	uint32_t u[4];
	uint64_t fp, h;
	double d[2];

	if (len != want)
		return q3_errf(e, -EINVAL,
			       "expert stats: %s: %zu bytes, %zu expected for %d layers x %d experts",
			       path, len, want, s->L, s->E);
	memcpy(u, b + 8, 16);
	memcpy(&fp, b + 24, 8);
	memcpy(d, b + 32, 16);
	memcpy(&h, b + len - 8, 8);
	if (memcmp(b, MAGIC, 8) || u[0] != VERSION)
		return q3_errf(e, -EINVAL, "expert stats: %s: not a stats file of this version", path);
	if (q3_xstats_checksum(b, len) != h)
		return q3_errf(e, -EINVAL, "expert stats: %s: checksum mismatch (corrupt)", path);
	if (u[1] != (uint32_t)s->L || u[2] != (uint32_t)s->E || fp != s->fp)
		return q3_errf(e, -EINVAL,
			       "expert stats: %s: written for another model (%u x %u, fingerprint %016llx)",
			       path, u[1], u[2], (unsigned long long)fp);
	if (!isfinite(d[1]) || d[1] < 0 || d[1] > 1e300)
		return q3_errf(e, -EINVAL, "expert stats: %s: bad token count", path);
	for (size_t i = 0; i < n; i++) {
		float f;

		memcpy(&f, b + HDR + 4 * i, 4);
		/* a token uses an expert at most once per layer */
		if (!isfinite(f) || f < 0 || f > d[1] * 1.001 + 1)
			return q3_errf(e, -EINVAL, "expert stats: %s: bad count for layer %zu expert %zu",
				       path, i / (size_t)s->E, i % (size_t)s->E);
	}
	for (size_t i = 0; i < n; i++) {
		float f;

		memcpy(&f, b + HDR + 4 * i, 4);
		s->c[i] = (double)f * s->scale;
	}
	s->tok = d[1] * s->scale;
	return 0;
}

int q3_xstats_load(struct q3_xstats *s, const char *path, q3_err *e)
{
	size_t want = file_size(s->L, s->E), len;
	char *b;
	int err;

	err = q3_read_file(path, want + 1, &b, &len, e);
	if (err == -ENOENT)
		return q3_errf(e, -ENOENT, "expert stats: %s: no such file", path);
	if (err)
		return q3_errf(e, -EINVAL, "expert stats: %s: unreadable or too large", path);
	err = q3_xstats_load_buf(s, b, len, path, e);
	free(b);
	return err;
}

/* ---- re-balance --------------------------------------------------------------------------------- */

struct ent {
	int idx;
	double f;
};

static int by_f_desc(const void *a, const void *b)
{
	const struct ent *x = a, *y = b;

	if (x->f != y->f)
		return x->f > y->f ? -1 : 1;
	return x->idx - y->idx;
}

/* a is used clearly more than b: by the hysteresis factor and beyond counting noise */
static bool better(double a, double b, const struct q3_rebalance_opts *o)
{
	return a > b * (1.0 + o->hysteresis) && a - b > o->z * sqrt(a + b);
}

/* One pool of candidates: entries [0, n) of the table (a layer, or all). */
static int rebalance_range(const struct q3_xstats *s, const uint8_t *resident, const uint64_t *bytes,
			   const struct q3_rebalance_opts *o, size_t first, size_t n, struct ent *in,
			   struct ent *out, struct q3_swap *swaps, int max, uint64_t *moved)
{
	int nin = 0, nout = 0, ns = 0;

	for (size_t i = first; i < first + n; i++) {
		struct ent x = {(int)i, s->c[i] / s->scale}; /* decayed counts: noise ~ sqrt */

		if (resident[i])
			out[nout++] = x;
		else
			in[nin++] = x;
	}
	qsort(in, (size_t)nin, sizeof(*in), by_f_desc);
	qsort(out, (size_t)nout, sizeof(*out), by_f_desc); /* evict from the end: least used */
	for (int i = 0, j = nout - 1; i < nin && j >= 0 && ns < max; i++) {
		const struct ent *a = &in[i];

		if (!better(a->f, out[j].f, o))
			break; /* in is sorted down, out up: no later pair qualifies */
		while (j >= 0 && bytes[out[j].idx] < bytes[a->idx])
			j--; /* too small to make room */
		if (j < 0 || !better(a->f, out[j].f, o))
			break;
		if (o->max_bytes && *moved + bytes[a->idx] > o->max_bytes)
			break;
		*moved += bytes[a->idx];
		swaps[ns++] = (struct q3_swap){a->idx / s->E, a->idx % s->E, out[j].idx / s->E,
					       out[j].idx % s->E};
		j--;
	}
	return ns;
}

int q3_xstats_rebalance(const struct q3_xstats *s, const uint8_t *resident, const uint64_t *bytes,
			const struct q3_rebalance_opts *o, struct q3_swap *swaps, int max)
{
	size_t n = (size_t)s->L * (size_t)s->E;
	struct ent *in, *out;
	int ns = 0;
	uint64_t moved = 0;

	if (max <= 0 || q3_xstats_tokens(s) < o->min_tokens)
		return 0;
	in = malloc(n * sizeof(*in));
	out = malloc(n * sizeof(*out));
	if (in && out) {
		if (o->same_layer)
			for (int l = 0; l < s->L && ns < max; l++) /* layer by layer */
				ns += rebalance_range(s, resident, bytes, o, (size_t)l * s->E, (size_t)s->E, in, out,
						      swaps + ns, max - ns, &moved);
		else
			ns = rebalance_range(s, resident, bytes, o, 0, n, in, out, swaps, max, &moved);
	}
	free(in);
	free(out);
	return ns;
}
