/* testutil.h - small helpers shared by the cmocka programs: temp dirs, file copies, fixtures.
 * Header-only so each test stays one program. */
#pragma once
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The committed model fixtures, relative to the repository root (tests run from there). */
#define FIXTURES "tests/fixtures/models"

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
