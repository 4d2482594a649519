/* util.c - errors, logging, time and file helpers (see util.h). */
#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <sched.h>
#include <math.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int q3_errf(q3_err *e, int code, const char *fmt, ...)
{
	if (e) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
		va_end(ap);
	}
	return code;
}

int q3_err_prefix(q3_err *e, int code, const char *fmt, ...)
{
	if (e) {
		char pre[256], old[sizeof(e->msg)];
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(pre, sizeof(pre), fmt, ap);
		va_end(ap);
		memcpy(old, e->msg, sizeof(old));
		snprintf(e->msg, sizeof(e->msg), "%s: %s", pre, old);
	}
	return code;
}

static int log_level = -1;

bool q3_log_enabled(enum q3_log_level lvl)
{
	if (log_level < 0) {
		const char *s = getenv("QWEN3D_LOG");
		log_level = Q3_LOG_INFO;
		if (s && !strcmp(s, "error"))
			log_level = Q3_LOG_ERROR;
		else if (s && !strcmp(s, "warn"))
			log_level = Q3_LOG_WARN;
		else if (s && !strcmp(s, "debug"))
			log_level = Q3_LOG_DEBUG;
	}
	return (int)lvl <= log_level;
}

void q3_log(enum q3_log_level lvl, const char *fmt, ...)
{
	static const char *const tag[] = { "error: ", "warning: ", "", "debug: " };
	char line[2048];
	va_list ap;

	if (!q3_log_enabled(lvl))
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "qwen3d: %s%s\n", tag[lvl], line);
}

void q3_die(const char *fmt, ...)
{
	char line[2048];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "qwen3d: %s\n", line);
	exit(1);
}

double q3_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int q3_read_file(const char *path, size_t max, char **buf, size_t *len, q3_err *e)
{
	struct stat st;
	char *b;
	size_t got = 0;
	int fd, err;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return q3_errf(e, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		err = -errno;
		close(fd);
		return q3_errf(e, err, "%s: %s", path, strerror(-err));
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return q3_errf(e, -EINVAL, "%s: not a regular file", path);
	}
	if ((uint64_t)st.st_size > max) {
		close(fd);
		return q3_errf(e, -EFBIG, "%s: %" PRIu64 " bytes, more than the %zu allowed", path,
			       (uint64_t)st.st_size, max);
	}
	b = malloc((size_t)st.st_size + 1);
	if (!b) {
		close(fd);
		return q3_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	while (got < (size_t)st.st_size) {
		ssize_t r = read(fd, b + got, (size_t)st.st_size - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			err = r < 0 ? -errno : -EIO;
			free(b);
			close(fd);
			return q3_errf(e, err, "%s: read failed at byte %zu: %s", path, got,
				       r < 0 ? strerror(-err) : "unexpected end of file");
		}
		got += (size_t)r;
	}
	close(fd);
	b[got] = 0;
	*buf = b;
	*len = got;
	return 0;
}

int q3_path_join(char *out, size_t n, const char *dir, const char *name)
{
	int r = snprintf(out, n, "%s/%s", dir, name);
	return (r < 0 || (size_t)r >= n) ? -ENAMETOOLONG : 0;
}

int q3_parse_ids(const char *s, int64_t limit, int32_t **out, q3_err *e)
{
	size_t cap = 16, n = 0;
	int32_t *ids;
	const char *p = s;

	if (!s || !*s)
		return q3_errf(e, -EINVAL, "empty id list");
	ids = malloc(cap * sizeof(*ids));
	if (!ids)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (;;) {
		int64_t v = 0;
		const char *start = p;
		while (*p == ' ')
			p++;
		if (!isdigit((unsigned char)*p)) {
			free(ids);
			return q3_errf(e, -EINVAL, "id list: item %zu (\"%.16s\") is not a non-negative integer",
				       n, start);
		}
		while (isdigit((unsigned char)*p)) {
			v = v * 10 + (*p++ - '0');
			if (v > INT32_MAX) {
				free(ids);
				return q3_errf(e, -EINVAL, "id list: item %zu is too large", n);
			}
		}
		while (*p == ' ')
			p++;
		if (limit > 0 && v >= limit) {
			free(ids);
			return q3_errf(e, -EINVAL, "id list: id %" PRId64 " (item %zu) is out of range [0, %" PRId64 ")",
				       v, n, limit);
		}
		if (n == cap) {
			int32_t *nb = realloc(ids, (cap *= 2) * sizeof(*ids));
			if (!nb) {
				free(ids);
				return q3_errf(e, -ENOMEM, "out of memory");
			}
			ids = nb;
		}
		ids[n++] = (int32_t)v;
		if (*p == 0)
			break;
		if (*p != ',') {
			free(ids);
			return q3_errf(e, -EINVAL, "id list: unexpected '%c' after item %zu", *p, n - 1);
		}
		p++;
	}
	*out = ids;
	return (int)n;
}

int q3_parse_size(const char *s, uint64_t *out)
{
	char *end;
	double v;
	uint64_t mul = 1;

	if (!s || !*s)
		return -EINVAL;
	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || !(v >= 0) || isinf(v)) /* NaN and inf too */
		return -EINVAL;
	while (*end == ' ')
		end++;
	if (!strcasecmp(end, "") || !strcasecmp(end, "b"))
		mul = 1;
	else if (!strcasecmp(end, "k") || !strcasecmp(end, "kib") || !strcasecmp(end, "kb"))
		mul = 1ull << 10;
	else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib") || !strcasecmp(end, "mb"))
		mul = 1ull << 20;
	else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib") || !strcasecmp(end, "gb"))
		mul = 1ull << 30;
	else if (!strcasecmp(end, "t") || !strcasecmp(end, "tib") || !strcasecmp(end, "tb"))
		mul = 1ull << 40;
	else
		return -EINVAL;
	if (v * (double)mul >= 18446744073709551616.0)
		return -ERANGE;
	*out = (uint64_t)(v * (double)mul);
	return 0;
}

const char *q3_fmt_bytes(uint64_t n, char *buf, size_t len)
{
	static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)n;
	int u = 0;

	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%" PRIu64 " B", n);
	else
		snprintf(buf, len, "%.1f %s", v, unit[u]);
	return buf;
}

int q3_ncpu(void)
{
	/* the CPUs this process may run on (taskset, cgroup cpusets), not all online ones: more
	 * threads than that only wait for each other */
	cpu_set_t set;
	long n;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		return CPU_COUNT(&set);
	n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (int)n : 1;
}
