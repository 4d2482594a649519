/* settings.c - the settings table, flag/knob/config/default resolution, and its JSON view (see
 * settings.h). */
#include "settings.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#define KIB 1024ll
#define MIB (1024ll * 1024)
#define GIB (1024ll * 1024 * 1024)

const struct q3_set_def q3_set_defs[Q3_SET_COUNT] = {
	[Q3_SET_MODEL] = { "model", Q3_SET_STR, "", NULL, 0, 0, false, false,
			   "model folder (config.json, *.safetensors, tokenizer.json)" },
	[Q3_SET_BACKEND] = { "backend", Q3_SET_STR, "auto", NULL, 0, 0, false, false, "cpu, cuda or auto" },
	[Q3_SET_HOST] = { "host", Q3_SET_STR, "127.0.0.1", NULL, 0, 0, false, false,
			  "address to listen on (IPv4 or IPv6 literal)" },
	[Q3_SET_PORT] = { "port", Q3_SET_INT, "8000", NULL, 1, 65535, false, false, "TCP port" },
	[Q3_SET_API_KEY] = { "api_key", Q3_SET_STR, "", NULL, 0, 0, true, true,
			     "require 'Authorization: Bearer KEY' (empty: no key)" },
	[Q3_SET_RUN_DIR] = { "run_dir", Q3_SET_STR, "", NULL, 0, 0, false, false,
			     "pid, state and log files (default /run/qwen3d for root, else "
			     "$XDG_RUNTIME_DIR/qwen3d or /tmp/qwen3d-UID)" },
	[Q3_SET_LOG_FILE] = { "log_file", Q3_SET_STR, "", NULL, 0, 0, false, false,
			      "daemon log (default RUN_DIR/qwen3d.log)" },
	[Q3_SET_THREADS] = { "threads", Q3_SET_INT, "0", NULL, 0, 4096, false, false,
			     "CPU compute threads (0: all online CPUs)" },
	[Q3_SET_MAX_CTX] = { "max_ctx", Q3_SET_INT, "4096", NULL, 16, 262144, false, false,
			     "tokens per conversation (prompt + completion)" },
	[Q3_SET_MAX_BATCH] = { "max_batch", Q3_SET_INT, "16", NULL, 1, 256, false, false,
			       "requests decoded together in one step" },
	[Q3_SET_VRAM_BUDGET] = { "vram_budget", Q3_SET_SIZE, "0", "vram_budget_mb", 0, INT64_MAX, false, false,
				 "VRAM the weights may use (0: automatic)" },
	[Q3_SET_READ_CHUNK] = { "read_chunk", Q3_SET_SIZE, "8MiB", "read_chunk_kb", 4 * KIB, 1 * GIB, false,
				false, "size of one checkpoint read" },
	[Q3_SET_QUEUE_DEPTH] = { "queue_depth", Q3_SET_INT, "32", "queue_depth", 1, 4096, false, false,
				 "checkpoint reads in flight" },
	[Q3_SET_EXPERT_CACHE] = { "expert_cache", Q3_SET_STR, "lru", "expert_cache_policy", 0, 0, false,
				  false, "VRAM expert cache: lru (follows recent use), lfu (long-run use) or static (fixed at start)" },
	[Q3_SET_EXPERT_THREADS] = { "expert_threads", Q3_SET_INT, "0", "cpu_expert_threads", 0, 4096, false,
				    false, "CPU threads for experts kept in RAM (0: automatic)" },
	[Q3_SET_EXPERT_STATS] = { "expert_stats", Q3_SET_STR, "", NULL, 0, 0, false, false,
				  "file keeping the expert use statistics across restarts (default "
				  "RUN_DIR/expert-stats; none: not kept)" },
	[Q3_SET_CACHE_SIZE] = { "cache_size", Q3_SET_SIZE, "1GiB", NULL, 0, INT64_MAX, false, false,
				"memory for saved conversation states (0: no reuse across requests)" },
	[Q3_SET_PREFILL_CHUNK] = { "prefill_chunk", Q3_SET_INT, "256", NULL, 1, 65536, true, false,
				   "prompt tokens computed between two decode steps" },
	[Q3_SET_MAX_BODY] = { "max_body", Q3_SET_SIZE, "4MiB", NULL, 1 * KIB, 1 * GIB, true, false,
			      "largest request body accepted" },
	[Q3_SET_MAX_PROMPT_TOKENS] = { "max_prompt_tokens", Q3_SET_INT, "0", NULL, 0, 262144, true, false,
				       "longest prompt accepted (0: max_ctx - 1)" },
	[Q3_SET_MAX_CONNECTIONS] = { "max_connections", Q3_SET_INT, "128", NULL, 1, 65536, false, false,
				     "concurrent HTTP connections" },
	[Q3_SET_MAX_QUEUE] = { "max_queue", Q3_SET_INT, "256", NULL, 1, 1 << 20, true, false,
			       "requests waiting or running before new ones get 503" },
	[Q3_SET_CONN_TIMEOUT] = { "conn_timeout", Q3_SET_INT, "30", NULL, 1, 86400, false, false,
				  "seconds a connection may stay silent" },
	[Q3_SET_REQUEST_TIMEOUT] = { "request_timeout", Q3_SET_INT, "60", NULL, 1, 86400, true, false,
				     "seconds a client may take to send its request" },
	[Q3_SET_DRAIN_TIMEOUT] = { "drain_timeout", Q3_SET_INT, "60", NULL, 0, 86400, true, false,
				   "seconds SIGTERM waits for in-flight requests" },
};

int q3_settings_find(const char *name)
{
	char norm[64];
	size_t i;

	for (i = 0; name[i] && i < sizeof(norm) - 1; i++)
		norm[i] = name[i] == '-' ? '_' : name[i];
	if (name[i])
		return -1;
	norm[i] = 0;
	for (int id = 0; id < Q3_SET_COUNT; id++)
		if (!strcmp(q3_set_defs[id].name, norm))
			return id;
	return -1;
}

int q3_settings_flag(struct q3_set_flags *f, int argc, char **argv, int *i, q3_err *e)
{
	const char *arg = argv[*i], *val = NULL;
	char name[64];
	size_t len;
	int id;

	if (strncmp(arg, "--", 2))
		return 0;
	arg += 2;
	len = strcspn(arg, "=");
	if (len >= sizeof(name))
		return 0;
	memcpy(name, arg, len);
	name[len] = 0;
	if (arg[len] == '=')
		val = arg + len + 1;
	id = strcmp(name, "config") ? q3_settings_find(name) : Q3_SET_COUNT;
	if (id < 0)
		return 0;
	if (!val) {
		if (*i + 1 >= argc)
			return q3_errf(e, -EINVAL, "--%s needs a value", name);
		val = argv[++*i];
	}
	(*i)++;
	if (id == Q3_SET_COUNT)
		f->config = val;
	else
		f->val[id] = val;
	return 1;
}

/* Parses text for setting id into v (str and num); the reason names `where`. */
static int set_value(struct q3_setval *v, int id, const char *text, const char *where, q3_err *e)
{
	const struct q3_set_def *d = &q3_set_defs[id];
	int64_t num = 0;

	if (d->type == Q3_SET_INT) {
		char *end;
		errno = 0;
		long long x = strtoll(text, &end, 10);
		if (errno || end == text || *end)
			return q3_errf(e, -EINVAL, "%s: %s: '%s' is not an integer", where, d->name, text);
		num = x;
	} else if (d->type == Q3_SET_SIZE) {
		uint64_t x;
		if (q3_parse_size(text, &x) || x > INT64_MAX)
			return q3_errf(e, -EINVAL, "%s: %s: '%s' is not a size (e.g. 512MiB)", where, d->name,
				       text);
		num = (int64_t)x;
	}
	if (d->type != Q3_SET_STR && (num < d->min || num > d->max))
		return q3_errf(e, -ERANGE, "%s: %s: %s is outside [%" PRId64 ", %" PRId64 "]", where, d->name,
			       text, d->min, d->max);
	char *s = strdup(text);
	if (!s)
		return q3_errf(e, -ENOMEM, "%s: %s: out of memory", where, d->name);
	free(v->str);
	v->str = s;
	v->num = num;
	return 0;
}

/* Reads the config file into cfg[id] (JSON text values; NULL where absent). */
static int read_config(const char *path, json_t **root, const char *cfg[Q3_SET_COUNT], q3_err *e)
{
	json_error_t je;
	const char *key;
	json_t *val;

	*root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
	if (!*root)
		return q3_errf(e, -EINVAL, "config %s: line %d: %s", path, je.line, je.text);
	if (!json_is_object(*root))
		return q3_errf(e, -EINVAL, "config %s: not a JSON object", path);
	json_object_foreach(*root, key, val) {
		int id = q3_settings_find(key);
		if (id < 0)
			return q3_errf(e, -EINVAL, "config %s: unknown key '%s'", path, key);
		if (json_is_integer(val)) {
			/* keep the text form: set_value parses every source the same way */
			char buf[32];
			snprintf(buf, sizeof(buf), "%" JSON_INTEGER_FORMAT, json_integer_value(val));
			json_object_set_new(*root, key, json_string(buf));
			val = json_object_get(*root, key);
		} else if (!json_is_string(val)) {
			return q3_errf(e, -EINVAL, "config %s: %s: expected a string or an integer", path, key);
		}
		cfg[id] = json_string_value(val);
	}
	return 0;
}

static void default_run_dir(char *buf, size_t n)
{
	const char *xdg = getenv("XDG_RUNTIME_DIR");
	if (geteuid() == 0)
		snprintf(buf, n, "/run/qwen3d");
	else if (xdg && *xdg)
		snprintf(buf, n, "%s/qwen3d", xdg);
	else
		snprintf(buf, n, "/tmp/qwen3d-%u", (unsigned)geteuid());
}

int q3_settings_load(struct q3_settings *s, const struct q3_set_flags *f, q3_knob_fn knob,
		     void *knob_ctx, q3_err *e)
{
	const char *cfg[Q3_SET_COUNT] = { 0 };
	const char *path = f->config;
	json_t *root = NULL;
	int err = 0;

	memset(s, 0, sizeof(*s));
	if (!path)
		path = getenv("QWEN3D_CONFIG");
	if (!path && access("/etc/qwen3d/config.json", F_OK) == 0)
		path = "/etc/qwen3d/config.json";
	if (path) {
		snprintf(s->config_path, sizeof(s->config_path), "%s", path);
		if ((err = read_config(path, &root, cfg, e)))
			goto out;
	}
	for (int id = 0; id < Q3_SET_COUNT; id++) {
		const struct q3_set_def *d = &q3_set_defs[id];
		struct q3_setval *v = &s->v[id];
		char kbuf[256], korigin[256], where[300];
		const char *text = d->def;

		v->src = Q3_SRC_DEFAULT;
		snprintf(v->origin, sizeof(v->origin), "default");
		if (f->val[id]) {
			text = f->val[id];
			v->src = Q3_SRC_FLAG;
			snprintf(v->origin, sizeof(v->origin), "--%s", d->name);
		} else if (d->knob && knob && knob(knob_ctx, d->knob, kbuf, sizeof(kbuf), korigin,
						   sizeof(korigin)) == 0) {
			text = kbuf;
			v->src = Q3_SRC_KNOB;
			snprintf(v->origin, sizeof(v->origin), "knob %s", korigin);
		} else if (cfg[id]) {
			text = cfg[id];
			v->src = Q3_SRC_CONFIG;
			snprintf(v->origin, sizeof(v->origin), "config %s", path);
		} else if (id == Q3_SET_RUN_DIR) {
			default_run_dir(kbuf, sizeof(kbuf));
			text = kbuf;
		}
		snprintf(where, sizeof(where), "%s", v->src == Q3_SRC_FLAG ? "command line" : v->origin);
		if ((err = set_value(v, id, text, where, e)))
			goto out;
	}
out:
	json_decref(root);
	if (err)
		q3_settings_free(s);
	return err;
}

void q3_settings_free(struct q3_settings *s)
{
	for (int id = 0; id < Q3_SET_COUNT; id++) {
		free(s->v[id].str);
		s->v[id].str = NULL;
	}
}

char *q3_settings_json(const struct q3_settings *s)
{
	static const char *const srcname[] = { "default", "config", "knob", "flag" };
	json_t *o = json_object();
	char *text;

	for (int id = 0; o && id < Q3_SET_COUNT; id++) {
		const struct q3_set_def *d = &q3_set_defs[id];
		const struct q3_setval *v = &s->v[id];
		json_t *val;
		if (d->secret)
			val = json_string(*v->str ? "(set)" : "");
		else if (d->type == Q3_SET_STR)
			val = json_string(v->str);
		else
			val = json_integer(v->num);
		json_object_set_new(o, d->name,
				    json_pack("{s:o, s:s, s:s, s:b}", "value", val, "source", srcname[v->src],
					      "origin", v->origin, "reloadable", d->reloadable));
	}
	text = o ? json_dumps(o, JSON_PRESERVE_ORDER | JSON_INDENT(1)) : NULL;
	json_decref(o);
	return text;
}

int q3_settings_sysfs_knob(void *ctx, const char *name, char *buf, size_t n, char *origin, size_t on)
{
	const struct q3_sysfs_knobs *sk = ctx;
	const struct q3_knobs *k = &sk->k;

	if (!strcmp(name, "read_chunk_kb") && (k->present & Q3_KNOB_READ_CHUNK_KB))
		snprintf(buf, n, "%uKiB", k->read_chunk_kb);
	else if (!strcmp(name, "queue_depth") && (k->present & Q3_KNOB_QUEUE_DEPTH))
		snprintf(buf, n, "%u", k->queue_depth);
	else if (!strcmp(name, "vram_budget_mb") && (k->present & Q3_KNOB_VRAM_BUDGET_MB))
		snprintf(buf, n, "%uMiB", k->vram_budget_mb);
	else if (!strcmp(name, "expert_cache_policy") && (k->present & Q3_KNOB_EXPERT_CACHE_POLICY))
		snprintf(buf, n, "%s", q3_cache_policy_name(k->expert_cache_policy));
	else if (!strcmp(name, "cpu_expert_threads") && (k->present & Q3_KNOB_CPU_EXPERT_THREADS))
		snprintf(buf, n, "%u", k->cpu_expert_threads);
	else
		return -ENOENT;
	snprintf(origin, on, "%s/%s", sk->dir, name);
	return 0;
}

int q3_settings_read_knobs(struct q3_sysfs_knobs *sk, q3_err *e)
{
	const char *dir = getenv("QWEN3D_KNOBS_DIR");

	snprintf(sk->dir, sizeof(sk->dir), "%s", dir && *dir ? dir : Q3_KNOBS_DIR);
	return q3_knobs_read(sk->dir, &sk->k, e);
}

int q3_settings_load_system(struct q3_settings *s, const struct q3_set_flags *f, q3_err *e)
{
	struct q3_sysfs_knobs sk;
	int rc = q3_settings_read_knobs(&sk, e);

	return rc ? rc : q3_settings_load(s, f, q3_settings_sysfs_knob, &sk, e);
}
