/* cli_daemon.c - qwen3d start | stop | status: the pid file, daemonizing with a readiness pipe,
 * and the status report.
 *
 * RUN_DIR holds qwen3d.pid (locked with flock by the running daemon for its whole life: a pid
 * file whose lock is free is stale, whatever pid it names), qwen3d.json (the daemon's state,
 * daemon.c) and qwen3d.log (stderr of a daemonized qwen3d).  `start` without --foreground forks;
 * the parent waits on a pipe until the child says it serves (exit 0) or why it failed (exit 1).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "daemon.h"
#include "server.h"
#include "settings.h"

#define NOT_RUNNING 3 /* LSB: program is not running */

static void usage(FILE *f, const char *cmd)
{
	fprintf(f, "usage: qwen3d %s [--config FILE] [--run-dir DIR]%s\n", cmd,
		!strcmp(cmd, "start") ? " [--model DIR] [--foreground] [--backend cpu|cuda|auto] [--host H]\n"
					"                    [--port P] [--api-key K] [--SETTING VALUE ...]" : "");
	if (strcmp(cmd, "start"))
		return;
	fprintf(f, "\nsettings (flag > sysfs knob > config file > default):\n");
	for (int id = 0; id < Q3_SET_COUNT; id++) {
		const struct q3_set_def *d = &q3_set_defs[id];
		char flag[64];
		snprintf(flag, sizeof(flag), "--%s", d->name);
		for (char *p = flag + 2; *p; p++)
			if (*p == '_')
				*p = '-';
		fprintf(f, "  %-20s %s%s%s%s%s\n", flag, d->help, *d->def ? " [" : "", d->def, *d->def ? "]" : "",
			d->reloadable ? " (SIGHUP)" : "");
	}
}

/* Parses settings flags (and --foreground for start); returns 0, 2 after printing usage for a bad
 * argument, or -1 after printing it for --help. */
static int parse_args(int argc, char **argv, struct q3_set_flags *f, bool *foreground)
{
	q3_err e;
	for (int i = 1; i < argc;) {
		int rc = q3_settings_flag(f, argc, argv, &i, &e);
		if (rc < 0) {
			fprintf(stderr, "qwen3d %s: %s\n", argv[0], e.msg);
			return 2;
		}
		if (rc)
			continue;
		if (foreground && !strcmp(argv[i], "--foreground")) {
			*foreground = true;
			i++;
			continue;
		}
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout, argv[0]);
			return -1;
		}
		fprintf(stderr, "qwen3d %s: unknown argument '%s'\n", argv[0], argv[i]);
		usage(stderr, argv[0]);
		return 2;
	}
	return 0;
}

static int load_settings(const char *cmd, const struct q3_set_flags *f, struct q3_settings *s)
{
	q3_err e;
	if (q3_settings_load_system(s, f, &e)) {
		fprintf(stderr, "qwen3d %s: %s\n", cmd, e.msg);
		return 1;
	}
	return 0;
}

static void run_path(const struct q3_settings *s, const char *name, char *out, size_t n)
{
	snprintf(out, n, "%s/%s", q3_set_str(s, Q3_SET_RUN_DIR), name);
}

/* Opens the pid file; *pid gets the pid it names (0 if none); returns the fd or -errno. */
static int open_pidfile(const struct q3_settings *s, bool create, int *pid)
{
	char path[PATH_MAX], buf[32] = "";
	int fd;

	run_path(s, "qwen3d.pid", path, sizeof(path));
	fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
	if (fd < 0)
		return -errno;
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
	buf[n > 0 ? n : 0] = 0;
	*pid = atoi(buf);
	return fd;
}

/* Whether a live daemon holds the pid file's lock. */
static bool locked_by_other(int fd)
{
	if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
		flock(fd, LOCK_UN);
		return false;
	}
	return errno == EWOULDBLOCK;
}

/* ---- start --------------------------------------------------------------------------------- */

struct ready_pipe {
	int fd;		/* write end, -1 in the foreground */
	const char *cmd;
};

static void report_ready(void *ctx, bool ok, const char *msg)
{
	struct ready_pipe *p = ctx;
	if (p->fd < 0) {
		if (!ok)
			fprintf(stderr, "qwen3d %s: %s\n", p->cmd, msg);
		return;
	}
	dprintf(p->fd, "%s %s\n", ok ? "OK" : "ERR", msg);
	close(p->fd);
	p->fd = -1;
}

/* The parent's side: waits for the child's one line. */
static int wait_ready(int fd, pid_t child, const char *log)
{
	char buf[1024];
	size_t got = 0;
	ssize_t n;

	while (got < sizeof(buf) - 1 && (n = read(fd, buf + got, sizeof(buf) - 1 - got)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			break;
		got += (size_t)n;
		if (memchr(buf, '\n', got))
			break;
	}
	buf[got] = 0;
	buf[strcspn(buf, "\n")] = 0;
	if (!strncmp(buf, "OK ", 3)) {
		printf("qwen3d: %s (pid %d, log %s)\n", buf + 3, (int)child, log);
		return 0;
	}
	if (!strncmp(buf, "ERR ", 4))
		fprintf(stderr, "qwen3d start: %s\n", buf + 4);
	else
		fprintf(stderr, "qwen3d start: the daemon exited during startup (see %s)\n", log);
	return 1;
}

int cmd_start(int argc, char **argv)
{
	struct q3_set_flags f = { 0 };
	struct q3_settings s;
	bool fg = false;
	char path[PATH_MAX], logpath[PATH_MAX], abs_model[PATH_MAX];
	int rc, pid, pfd, lfd, pipefd[2];
	q3_err e;

	if ((rc = parse_args(argc, argv, &f, &fg)))
		return rc < 0 ? 0 : rc;
	if ((rc = load_settings("start", &f, &s)))
		return rc;
	const char *model = q3_set_str(&s, Q3_SET_MODEL);
	if (!*model) {
		fprintf(stderr, "qwen3d start: no model: give --model DIR (or \"model\" in the config file); "
				"`make demo` serves a small demo model\n");
		goto fail;
	}
	if (!realpath(model, abs_model)) {
		fprintf(stderr, "qwen3d start: model %s: %s\n", model, strerror(errno));
		goto fail;
	}
	snprintf(path, sizeof(path), "%s/config.json", abs_model);
	if (access(path, R_OK)) {
		fprintf(stderr, "qwen3d start: model %s: no readable config.json (not a model folder)\n", abs_model);
		goto fail;
	}
	free(s.v[Q3_SET_MODEL].str);
	s.v[Q3_SET_MODEL].str = strdup(abs_model);
	f.val[Q3_SET_MODEL] = s.v[Q3_SET_MODEL].src == Q3_SRC_FLAG ? s.v[Q3_SET_MODEL].str : f.val[Q3_SET_MODEL];

	const char *run_dir = q3_set_str(&s, Q3_SET_RUN_DIR);
	if (mkdir(run_dir, 0755) && errno != EEXIST) {
		fprintf(stderr, "qwen3d start: run_dir %s: %s\n", run_dir, strerror(errno));
		goto fail;
	}
	if ((pfd = open_pidfile(&s, true, &pid)) < 0) {
		fprintf(stderr, "qwen3d start: pid file in %s: %s\n", run_dir, strerror(-pfd));
		goto fail;
	}
	if (flock(pfd, LOCK_EX | LOCK_NB)) {
		fprintf(stderr, "qwen3d start: already running (pid %d; `qwen3d stop` stops it)\n", pid);
		goto fail;
	}
	if (pid > 0)
		fprintf(stderr, "qwen3d: removed a stale pid file (pid %d is gone)\n", pid);
	if (q3_listen(q3_set_str(&s, Q3_SET_HOST), (int)q3_set_num(&s, Q3_SET_PORT), &lfd, &e)) {
		fprintf(stderr, "qwen3d start: %s\n", e.msg);
		goto fail;
	}
	if (*q3_set_str(&s, Q3_SET_LOG_FILE))
		snprintf(logpath, sizeof(logpath), "%s", q3_set_str(&s, Q3_SET_LOG_FILE));
	else
		run_path(&s, "qwen3d.log", logpath, sizeof(logpath));

	struct ready_pipe rp = { .fd = -1, .cmd = "start" };
	if (!fg) {
		if (pipe2(pipefd, O_CLOEXEC)) {
			fprintf(stderr, "qwen3d start: pipe: %s\n", strerror(errno));
			goto fail;
		}
		fflush(NULL);
		pid_t child = fork();
		if (child < 0) {
			fprintf(stderr, "qwen3d start: fork: %s\n", strerror(errno));
			goto fail;
		}
		if (child > 0) {
			close(pipefd[1]);
			close(lfd);
			close(pfd); /* the child's copy keeps the lock */
			rc = wait_ready(pipefd[0], child, logpath);
			q3_settings_free(&s);
			return rc;
		}
		close(pipefd[0]);
		rp.fd = pipefd[1];
		setsid();
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);
		int log = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
		if (null < 0 || log < 0) {
			report_ready(&rp, false, "cannot open /dev/null or the log file");
			_exit(1);
		}
		dup2(null, 0);
		dup2(log, 1);
		dup2(log, 2);
		close(null);
		close(log);
		if (chdir("/") < 0) /* not holding a mount busy; "/" is always there */
			q3_warn("chdir /: %s", strerror(errno));
	}
	char pidbuf[32];
	int n = snprintf(pidbuf, sizeof(pidbuf), "%d\n", (int)getpid());
	if (ftruncate(pfd, 0) || pwrite(pfd, pidbuf, n, 0) != n)
		q3_warn("cannot write the pid file");
	rc = q3_daemon_run(&s, &f, lfd, report_ready, &rp);
	run_path(&s, "qwen3d.json", path, sizeof(path));
	unlink(path);
	run_path(&s, "qwen3d.pid", path, sizeof(path));
	unlink(path);
	close(pfd);
	q3_settings_free(&s);
	return rc;
fail:
	q3_settings_free(&s);
	return 1;
}

/* ---- stop ---------------------------------------------------------------------------------- */

int cmd_stop(int argc, char **argv)
{
	struct q3_set_flags f = { 0 };
	struct q3_settings s;
	int rc, pid, fd;

	if ((rc = parse_args(argc, argv, &f, NULL)))
		return rc < 0 ? 0 : rc;
	if ((rc = load_settings("stop", &f, &s)))
		return rc;
	fd = open_pidfile(&s, false, &pid);
	if (fd < 0 || !locked_by_other(fd) || pid <= 0) {
		printf("qwen3d is not running\n");
		if (fd >= 0)
			close(fd);
		q3_settings_free(&s);
		return 0;
	}
	if (kill(pid, SIGTERM)) {
		fprintf(stderr, "qwen3d stop: pid %d: %s\n", pid, strerror(errno));
		close(fd);
		q3_settings_free(&s);
		return 1;
	}
	/* the lock goes with the process: wait for it (drain_timeout, plus time to unload) */
	double limit = (double)q3_set_num(&s, Q3_SET_DRAIN_TIMEOUT) + 30, t0 = q3_now();
	while (locked_by_other(fd) && q3_now() - t0 < limit) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	rc = locked_by_other(fd);
	if (rc)
		fprintf(stderr, "qwen3d stop: pid %d still running after %.0f s\n", pid, limit);
	else
		printf("qwen3d stopped (pid %d)\n", pid);
	close(fd);
	q3_settings_free(&s);
	return rc;
}

/* ---- status -------------------------------------------------------------------------------- */

/* "VmRSS:  123 kB" lines of /proc/PID/status, in bytes */
static void proc_memory(int pid, const char *const *keys, uint64_t *vals, int n)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", pid);
	FILE *f = fopen(path, "re");
	for (int i = 0; i < n; i++)
		vals[i] = 0;
	while (f && fgets(line, sizeof(line), f))
		for (int i = 0; i < n; i++)
			if (!strncmp(line, keys[i], strlen(keys[i])) && line[strlen(keys[i])] == ':')
				vals[i] = strtoull(line + strlen(keys[i]) + 1, NULL, 10) * 1024;
	if (f)
		fclose(f);
}

/* GET /metrics from the running daemon (a loopback address where it listens on every one):
 * the body, malloc'ed, or NULL when it does not answer 200 within two seconds (*code: the HTTP
 * status it gave, 0 if none). */
static char *fetch_metrics(const char *host, const char *port, const char *key, int *code)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai = NULL;
	struct timeval tv = { 2, 0 };
	char req[512], *buf = NULL, *body = NULL;
	size_t len = 0, cap = 0;
	int fd = -1;

	*code = 0;
	if (!strcmp(host, "0.0.0.0") || !*host)
		host = "127.0.0.1";
	else if (!strcmp(host, "::"))
		host = "::1";
	if (getaddrinfo(host, port, &hints, &ai) || (fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		goto out;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	int n = snprintf(req, sizeof(req), "GET /metrics HTTP/1.0\r\nHost: %s\r\n%s%s%sConnection: close\r\n\r\n",
			 host, *key ? "Authorization: Bearer " : "", key, *key ? "\r\n" : "");
	if (n >= (int)sizeof(req) || connect(fd, ai->ai_addr, ai->ai_addrlen) || send(fd, req, (size_t)n, MSG_NOSIGNAL) != n)
		goto out;
	for (;;) {
		if (cap - len < 4096) {
			if (cap >= (1u << 20))
				goto out; /* not our daemon's metrics */
			char *nb = realloc(buf, cap = cap ? cap * 2 : 16384);
			if (!nb)
				goto out;
			buf = nb;
		}
		ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
		if (r < 0)
			goto out;
		if (r == 0)
			break;
		len += (size_t)r;
	}
	buf[len] = 0;
	char *sep = strstr(buf, "\r\n\r\n");
	if (sep && !strncmp(buf, "HTTP/1.", 7))
		*code = atoi(buf + 8);
	if (*code == 200)
		body = strdup(sep + 4);
out:
	if (fd >= 0)
		close(fd);
	if (ai)
		freeaddrinfo(ai);
	free(buf);
	return body;
}

/* The value of the sample line `name value` (name with its labels, if any); NAN if absent. */
static double metric(const char *body, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = body; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
		if (!strncmp(p, name, n) && p[n] == ' ')
			return strtod(p + n + 1, NULL);
	return NAN;
}

/* The live part of the report: generations, and where the routed experts are served from. */
static void print_live(const char *body)
{
	char b[3][32];
	double pairs_v = metric(body, "qwen3d_expert_pairs_total{where=\"vram\"}");
	double pairs_c = metric(body, "qwen3d_expert_pairs_total{where=\"cpu\"}");
	double pairs_p = metric(body, "qwen3d_expert_pairs_total{where=\"pcie\"}");
	double tokens = metric(body, "qwen3d_offload_tokens_total");
	double busy = metric(body, "qwen3d_cpu_expert_busy_seconds_total");
	double total = metric(body, "qwen3d_experts");
	const char *info = strstr(body, "\nqwen3d_cpu_expert_info{");

	printf("live      %.0f running, %.0f queued, %.1f tokens/s now; %.0f generated, %.0f prompt tokens "
	       "(%.0f restored from saved states)\n",
	       metric(body, "qwen3d_requests_running"), metric(body, "qwen3d_requests_queued"),
	       metric(body, "qwen3d_tokens_per_second"), metric(body, "qwen3d_completion_tokens_total"),
	       metric(body, "qwen3d_prompt_tokens_total"), metric(body, "qwen3d_cached_prompt_tokens_total"));
	if (isnan(total)) /* the worker has not published yet */
		return;
	if (total == 0) {
		printf("experts   computed by the CPU backend (no VRAM cache)\n");
		return;
	}
	q3_fmt_bytes((uint64_t)metric(body, "qwen3d_vram_budget_bytes"), b[0], sizeof(b[0]));
	if (metric(body, "qwen3d_expert_offload") == 0) {
		printf("experts   all %.0f routed experts in VRAM (weights %s)\n", total, b[0]);
		return;
	}
	q3_fmt_bytes((uint64_t)(tokens > 0 ? metric(body, "qwen3d_pcie_bytes_total") / tokens : 0), b[1], sizeof(b[1]));
	if (isnan(pairs_p)) /* a daemon from before the GPU read experts over PCIe */
		pairs_p = 0;
	double pairs = pairs_v + pairs_c + pairs_p;

	printf("experts   %.0f of %.0f in VRAM (budget %s), the rest in RAM; hit rate %.1f%% of %.0f pairs "
	       "(%.1f%% read by the GPU over PCIe), PCIe %s per token\n",
	       metric(body, "qwen3d_experts_vram"), total, b[0], pairs > 0 ? 100 * pairs_v / pairs : 100.0, pairs,
	       pairs > 0 ? 100 * pairs_p / pairs : 0.0, b[1]);
	q3_fmt_bytes((uint64_t)metric(body, "qwen3d_cpu_expert_bytes_total"), b[2], sizeof(b[2]));
	printf("          CPU experts: %.1f GB/s while busy (%s read in %.1f s)%s%.*s\n",
	       metric(body, "qwen3d_cpu_expert_gbytes_per_second"), b[2], busy, info ? ", " : "",
	       info ? (int)strcspn(info + 24, "}") : 0, info ? info + 24 : "");
}

int cmd_status(int argc, char **argv)
{
	static const char *const keys[] = { "VmRSS", "VmHWM", "RssAnon", "RssFile", "HugetlbPages", "VmLck" };
	struct q3_set_flags f = { 0 };
	struct q3_settings s;
	char path[PATH_MAX], b[6][32];
	uint64_t mem[6];
	int rc, pid, fd;

	if ((rc = parse_args(argc, argv, &f, NULL)))
		return rc < 0 ? 0 : rc;
	if ((rc = load_settings("status", &f, &s)))
		return rc;
	fd = open_pidfile(&s, false, &pid);
	if (fd < 0 || !locked_by_other(fd)) {
		if (fd >= 0 && pid > 0)
			printf("qwen3d is not running (stale pid file for pid %d in %s)\n", pid, q3_set_str(&s, Q3_SET_RUN_DIR));
		else
			printf("qwen3d is not running (no daemon in %s)\n", q3_set_str(&s, Q3_SET_RUN_DIR));
		if (fd >= 0)
			close(fd);
		q3_settings_free(&s);
		return NOT_RUNNING;
	}
	close(fd);
	run_path(&s, "qwen3d.json", path, sizeof(path));
	json_t *st = json_load_file(path, 0, NULL);
	if (!st) {
		printf("qwen3d pid %d is starting (model loading)\n", pid);
		q3_settings_free(&s);
		return 0;
	}
	time_t started = (time_t)json_integer_value(json_object_get(st, "started"));
	long up = (long)(time(NULL) - started);
	printf("qwen3d %s running, pid %d, up %ldh%02ldm%02lds\n", json_string_value(json_object_get(st, "version")), pid,
	       up / 3600, up / 60 % 60, up % 60);
	printf("model     %s (id %s)\n", json_string_value(json_object_get(st, "model")),
	       json_string_value(json_object_get(st, "model_id")));
	printf("backend   %s, max_ctx %lld, max_batch %lld\n", json_string_value(json_object_get(st, "backend")),
	       (long long)json_integer_value(json_object_get(st, "max_ctx")),
	       (long long)json_integer_value(json_object_get(st, "max_batch")));
	printf("api       %s  (GET /metrics for live counters)\n", json_string_value(json_object_get(st, "url")));
	{
		json_t *set = json_object_get(st, "settings");
		json_t *host = json_object_get(json_object_get(set, "host"), "value");
		char port[16];
		snprintf(port, sizeof(port), "%lld",
			 (long long)json_integer_value(json_object_get(json_object_get(set, "port"), "value")));
		int code;
		char *body = fetch_metrics(json_is_string(host) ? json_string_value(host) : "127.0.0.1", port,
					   q3_set_str(&s, Q3_SET_API_KEY), &code);
		if (body)
			print_live(body);
		else if (code == 401)
			printf("live      (GET /metrics needs the API key: pass --api-key or put it in the config)\n");
		else
			printf("live      (the daemon did not answer GET /metrics: %s)\n", code ? "HTTP error" : "no answer");
		free(body);
	}
	json_t *wt = json_object_get(st, "weights");
	if (wt) {
		char wb[32];
		printf("weights   %s read in %.1f s (%s)\n          host copy: %s\n",
		       q3_fmt_bytes((uint64_t)json_integer_value(json_object_get(wt, "bytes")), wb, sizeof(wb)),
		       json_real_value(json_object_get(wt, "seconds")), json_string_value(json_object_get(wt, "path")),
		       json_string_value(json_object_get(wt, "memory")));
	}
	proc_memory(pid, keys, mem, 6);
	for (int i = 0; i < 6; i++)
		q3_fmt_bytes(mem[i], b[i], sizeof(b[i]));
	printf("memory    resident %s (peak %s): anonymous %s, file-mapped %s, huge pages %s, locked %s\n", b[0], b[1],
	       b[2], b[3], b[4], b[5]);
	char sb[32];
	printf("          saved conversation states: up to %lld of %s each\n",
	       (long long)json_integer_value(json_object_get(st, "cache_entries")),
	       q3_fmt_bytes((uint64_t)json_integer_value(json_object_get(st, "state_bytes")), sb, sizeof(sb)));
	printf("settings  (effective value, and where it came from: flag > knob > config > default)\n");
	const char *name;
	json_t *v;
	json_object_foreach(json_object_get(st, "settings"), name, v) {
		json_t *val = json_object_get(v, "value");
		char text[300];
		if (json_is_string(val))
			snprintf(text, sizeof(text), "%s", json_string_value(val));
		else
			snprintf(text, sizeof(text), "%lld", (long long)json_integer_value(val));
		printf("  %-18s %-28s %s\n", name, *text ? text : "\"\"", json_string_value(json_object_get(v, "origin")));
	}
	json_decref(st);
	q3_settings_free(&s);
	return 0;
}
