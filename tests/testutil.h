/* testutil.h - helpers shared by the cmocka tests: the fixtures' reference tensors, numeric
 * comparisons in the style of style-anchors principle 4 (NaN/Inf first, then a scale-free error,
 * first mismatches printed), a seeded random generator.  Header-only; include once per test. */
#pragma once
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "safetensors.h"
#include "util.h"

#define FIXTURES "tests/fixtures/models"

/* A fixture's reference.safetensors (see tests/fixtures/models/README.md). */
struct fixture_ref {
	char *buf;	      /* the file */
	int T, G, L1, H, V;   /* prompt length, decode steps, layers + 1, hidden, vocab */
	int32_t *prompt;      /* [T] */
	int32_t *gen;	      /* [G] */
	float *prefill;	      /* [T][V] */
	float *decode;	      /* [G][V] */
	float *hidden;	      /* [L1][T][H] */
};

/* Copies tensor name out of a parsed file (data is unaligned in the file). */
static inline void *st_copy(const char *buf, const struct q3_st_header *h, const char *name, int ndim,
		     int64_t *shape)
{
	for (size_t i = 0; i < h->n; i++) {
		const struct q3_st_tensor *t = &h->t[i];
		void *p;

		if (strcmp(t->name, name))
			continue;
		if (t->ndim != ndim)
			return NULL;
		memcpy(shape, t->shape, sizeof(int64_t) * (size_t)ndim);
		p = malloc(t->end - t->begin + 1);
		if (p)
			memcpy(p, buf + h->data_off + t->begin, t->end - t->begin);
		return p;
	}
	return NULL;
}

static inline int fixture_ref_load(const char *model_dir, struct fixture_ref *r)
{
	char path[512];
	size_t len;
	struct q3_st_header h = { 0 };
	q3_err e = { { 0 } };
	int64_t s[3] = { 0 };

	memset(r, 0, sizeof(*r));
	snprintf(path, sizeof(path), "%s/reference.safetensors", model_dir);
	if (q3_read_file(path, 1u << 30, &r->buf, &len, &e) ||
	    q3_st_parse(r->buf, len, len, path, &h, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return -1;
	}
	r->prompt = st_copy(r->buf, &h, "prompt_ids", 1, s);
	r->T = (int)s[0];
	r->gen = st_copy(r->buf, &h, "gen_ids", 1, s);
	r->G = (int)s[0];
	r->prefill = st_copy(r->buf, &h, "prefill_logits", 2, s);
	r->V = (int)s[1];
	r->decode = st_copy(r->buf, &h, "decode_logits", 2, s);
	r->hidden = st_copy(r->buf, &h, "prefill_hidden", 3, s);
	r->L1 = (int)s[0];
	r->H = (int)s[2];
	q3_st_header_free(&h);
	return r->prompt && r->gen && r->prefill && r->decode && r->hidden ? 0 : -1;
}

static inline void fixture_ref_free(struct fixture_ref *r)
{
	free(r->buf);
	free(r->prompt);
	free(r->gen);
	free(r->prefill);
	free(r->decode);
	free(r->hidden);
}

/* ‖a − b‖ / ‖b‖ (0 when both are 0). */
static inline double rel_l2(const float *a, const float *b, size_t n)
{
	double num = 0, den = 0;

	for (size_t i = 0; i < n; i++) {
		double d = (double)a[i] - (double)b[i];

		num += d * d;
		den += (double)b[i] * b[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

static inline int argmax_f(const float *x, int n)
{
	int best = 0;

	for (int i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}

/* Compares got to want (n values): NaN/Inf positions and signs must agree, then the relative L2
 * error must be <= tol.  Prints what failed and the first mismatches; returns 0 when close. */
static inline int check_close(const char *what, const float *got, const float *want, size_t n, double tol)
{
	double rel;
	int shown = 0;

	for (size_t i = 0; i < n; i++) {
		bool gbad = !isfinite(got[i]), wbad = !isfinite(want[i]);

		if (gbad != wbad || (gbad && (isnan(got[i]) != isnan(want[i]) ||
					      !signbit(got[i]) != !signbit(want[i])))) {
			fprintf(stderr, "%s: [%zu] is %g, expected %g\n", what, i, got[i], want[i]);
			return -1;
		}
	}
	rel = rel_l2(got, want, n);
	if (rel <= tol)
		return 0;
	fprintf(stderr, "%s: relative L2 error %.3e > %.1e\n", what, rel, tol);
	for (size_t i = 0; i < n && shown < 8; i++) {
		double d = fabs((double)got[i] - want[i]);

		if (d > tol * (fabs(want[i]) + 1e-3)) {
			fprintf(stderr, "  [%zu] got %.7g expected %.7g\n", i, got[i], want[i]);
			shown++;
		}
	}
	return -1;
}

/* xorshift64*: reproducible uniform floats in [-1, 1). */
static uint64_t rng_state __attribute__((unused)) = 88172645463325252ull;

static inline void rng_seed(uint64_t s)
{
	rng_state = s ? s : 1;
}

static inline float rng_f(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (float)((double)((rng_state * 2685821657736338717ull) >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

static inline uint32_t rng_u32(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint32_t)((rng_state * 2685821657736338717ull) >> 32);
}

static inline void rng_fill(float *x, size_t n, float scale)
{
	for (size_t i = 0; i < n; i++)
		x[i] = scale * rng_f();
}

/* ---- temp dirs and files (tests that build corrupted copies of fixtures) ---- */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static inline char *tu_mkdtemp(void)
{
	char tmpl[] = "/tmp/qwen3d-test-XXXXXX";
	char *d = mkdtemp(tmpl);
	return d ? strdup(d) : NULL;
}

static inline int tu_write_file(const char *path, const void *data, size_t len)
{
	FILE *f = fopen(path, "wb");
	if (!f)
		return -errno;
	if (len && fwrite(data, 1, len, f) != len) {
		fclose(f);
		return -EIO;
	}
	return fclose(f) ? -errno : 0;
}

static inline char *tu_read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc((size_t)n + 1);
	if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
		free(buf);
		buf = NULL;
	}
	fclose(f);
	if (buf) {
		buf[n] = 0;
		if (len)
			*len = (size_t)n;
	}
	return buf;
}

/* Copies every regular file of src into dst (flat folders only, as model folders are). */
static inline int tu_copy_dir(const char *src, const char *dst)
{
	DIR *d = opendir(src);
	struct dirent *de;
	char a[4096], b[4096];

	if (!d)
		return -errno;
	mkdir(dst, 0755);
	while ((de = readdir(d))) {
		size_t n;
		char *buf;

		if (de->d_name[0] == '.')
			continue;
		snprintf(a, sizeof(a), "%s/%s", src, de->d_name);
		snprintf(b, sizeof(b), "%s/%s", dst, de->d_name);
		buf = tu_read_file(a, &n);
		if (!buf || tu_write_file(b, buf, n)) {
			free(buf);
			closedir(d);
			return -EIO;
		}
		free(buf);
	}
	closedir(d);
	return 0;
}

static inline void tu_rm_rf(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char p[4096];

	if (!d)
		return;
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
		unlink(p);
	}
	closedir(d);
	rmdir(dir);
}

/* Replaces the first occurrence of `from` by `to` in a text file. Returns 0 if found. */
static inline int tu_replace_in_file(const char *path, const char *from, const char *to)
{
	size_t n;
	char *buf = tu_read_file(path, &n), *p, *out;
	int err;

	if (!buf)
		return -ENOENT;
	p = strstr(buf, from);
	if (!p) {
		free(buf);
		return -ENOENT;
	}
	out = malloc(n - strlen(from) + strlen(to) + 1);
	memcpy(out, buf, (size_t)(p - buf));
	strcpy(out + (p - buf), to);
	strcat(out, p + strlen(from));
	err = tu_write_file(path, out, strlen(out));
	free(buf);
	free(out);
	return err;
}
