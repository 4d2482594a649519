/* util.h - errors, logging, time and file helpers shared by all of userspace.
 *
 * Errors: library code returns 0 or -errno and, where the caller wants a reason, fills a
 * struct q3_err with one line naming the file, tensor, key or request part at fault.  Only
 * main() and startup paths print and exit.
 */
#pragma once
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define Q3_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define Q3_MIN(a, b) ((a) < (b) ? (a) : (b))
#define Q3_MAX(a, b) ((a) > (b) ? (a) : (b))
#define Q3_ALIGN_UP(x, a) (((x) + (a) - 1) / (a) * (a))

typedef struct q3_err {
	char msg[512];
} q3_err;

/* Formats a one-line reason into e (if e is not NULL) and returns code, which is a
 * negative errno, so that `return q3_errf(e, -EINVAL, "...")` reads naturally. */
int q3_errf(q3_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Prefixes an existing message: "ctx: old message". Returns code. */
int q3_err_prefix(q3_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

enum q3_log_level { Q3_LOG_ERROR, Q3_LOG_WARN, Q3_LOG_INFO, Q3_LOG_DEBUG };
/* Log level from QWEN3D_LOG (error|warn|info|debug), default info; messages go to stderr. */
void q3_log(enum q3_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define q3_info(...) q3_log(Q3_LOG_INFO, __VA_ARGS__)
#define q3_warn(...) q3_log(Q3_LOG_WARN, __VA_ARGS__)
#define q3_debug(...) q3_log(Q3_LOG_DEBUG, __VA_ARGS__)
bool q3_log_enabled(enum q3_log_level lvl);

/* Prints "qwen3d: <msg>" to stderr and exits 1.  For startup code and CLI commands only. */
void q3_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Monotonic clock in seconds. */
double q3_now(void);

/* Reads a whole file into a malloc'ed buffer with a trailing NUL (not counted in *len).
 * Refuses files larger than max bytes. Returns 0 or -errno with a reason naming the path. */
int q3_read_file(const char *path, size_t max, char **buf, size_t *len, q3_err *e);

/* Joins dir and name into out (size n); returns -ENAMETOOLONG if it does not fit. */
int q3_path_join(char *out, size_t n, const char *dir, const char *name);

/* Parses "1,2,3" into a malloc'ed int32 array; rejects empty items, signs, overflow and
 * values >= limit (limit 0: no limit). Returns the count or -EINVAL with a reason. */
int q3_parse_ids(const char *s, int64_t limit, int32_t **out, q3_err *e);

/* Parses a byte size such as "20GiB", "512M", "1048576"; returns -EINVAL on garbage. */
int q3_parse_size(const char *s, uint64_t *out);

/* Formats n bytes as "41.8 GiB" into buf. Returns buf. */
const char *q3_fmt_bytes(uint64_t n, char *buf, size_t len);

/* Number of online CPUs (>= 1). */
int q3_ncpu(void);
