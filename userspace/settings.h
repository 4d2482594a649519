/* settings.h - the daemon's settings: one table, four sources, one precedence.
 *
 * Every setting has a name (the config file key; the flag is --name with '_' as '-'), a type, a
 * default, and optionally a sysfs knob of the qwen3mm module.  Its effective value comes from,
 * first found wins:
 *     flag  >  sysfs knob  >  config file  >  default
 * and remembers where it came from, so that `qwen3d status` can say so.
 *
 * The config file is a JSON object of name: value (string or integer); an unknown key, a value of
 * the wrong type or out of range is refused with one line naming the file and key.  Knobs are read
 * through a caller-given function (the qwen3mm sysfs files in the daemon, a table in tests).
 * Settings marked reloadable take effect on SIGHUP; the others need a restart.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "knobs.h"
#include "util.h"

enum q3_set_id {
	Q3_SET_MODEL,
	Q3_SET_BACKEND,
	Q3_SET_HOST,
	Q3_SET_PORT,
	Q3_SET_API_KEY,
	Q3_SET_RUN_DIR,
	Q3_SET_LOG_FILE,
	Q3_SET_THREADS,
	Q3_SET_MAX_CTX,
	Q3_SET_MAX_BATCH,
	Q3_SET_VRAM_BUDGET,
	Q3_SET_READ_CHUNK,
	Q3_SET_QUEUE_DEPTH,
	Q3_SET_EXPERT_CACHE,
	Q3_SET_EXPERT_THREADS,
	Q3_SET_EXPERT_STATS,
	Q3_SET_CACHE_SIZE,
	Q3_SET_PREFILL_CHUNK,
	Q3_SET_MAX_BODY,
	Q3_SET_MAX_PROMPT_TOKENS,
	Q3_SET_MAX_CONNECTIONS,
	Q3_SET_MAX_QUEUE,
	Q3_SET_CONN_TIMEOUT,
	Q3_SET_REQUEST_TIMEOUT,
	Q3_SET_DRAIN_TIMEOUT,
	Q3_SET_COUNT
};

enum q3_set_type {
	Q3_SET_STR,
	Q3_SET_INT,  /* decimal integer within [min, max] */
	Q3_SET_SIZE, /* bytes: "8MiB", "512M", "1048576" (q3_parse_size) */
};

enum q3_set_src { Q3_SRC_DEFAULT, Q3_SRC_CONFIG, Q3_SRC_KNOB, Q3_SRC_FLAG };

struct q3_set_def {
	const char *name;
	enum q3_set_type type;
	const char *def;  /* default, as text ("" = unset) */
	const char *knob; /* qwen3mm sysfs knob name, or NULL */
	int64_t min, max; /* Q3_SET_INT and Q3_SET_SIZE bounds */
	bool reloadable;
	bool secret;	  /* never shown (api_key) */
	const char *help;
};

extern const struct q3_set_def q3_set_defs[Q3_SET_COUNT];

struct q3_settings {
	struct q3_setval {
		char *str;	     /* the value as text (always set, "" when unset) */
		int64_t num;	     /* parsed value of INT and SIZE settings */
		enum q3_set_src src;
		char origin[320];    /* "default", "--port", "config /etc/qwen3d/config.json",
					"knob /sys/module/qwen3mm/parameters/read_chunk_kb" */
	} v[Q3_SET_COUNT];
	char config_path[256]; /* the config file read, "" if none */
};

/* Flags given on the command line: value text per setting, NULL where not given. */
struct q3_set_flags {
	const char *val[Q3_SET_COUNT];
	const char *config; /* --config FILE */
};

/* Reads knob `name` into buf (NUL-terminated, trailing newline removed) and names where it came
 * from in origin; returns 0, or -ENOENT when the knob does not exist (module not loaded). */
typedef int (*q3_knob_fn)(void *ctx, const char *name, char *buf, size_t n, char *origin, size_t on);

/* Recognises --name VALUE and --name=VALUE for every setting, and --config FILE, at argv[*i];
 * advances *i past what it used.  Returns 1 if it took the argument, 0 if the argument is not a
 * setting, -EINVAL (with a reason) for a setting flag missing its value. */
int q3_settings_flag(struct q3_set_flags *f, int argc, char **argv, int *i, q3_err *e);

/* Resolves every setting (see the precedence above).  config_path NULL: the flags' --config, else
 * $QWEN3D_CONFIG, else /etc/qwen3d/config.json if it exists.  knob may be NULL (no knobs).  On
 * error s is left freed and the reason names the source and key. */
int q3_settings_load(struct q3_settings *s, const struct q3_set_flags *f, q3_knob_fn knob,
		     void *knob_ctx, q3_err *e);
void q3_settings_free(struct q3_settings *s);

static inline const char *q3_set_str(const struct q3_settings *s, enum q3_set_id id)
{
	return s->v[id].str;
}

static inline int64_t q3_set_num(const struct q3_settings *s, enum q3_set_id id)
{
	return s->v[id].num;
}

/* Looks a setting up by name ("max_batch" or "max-batch"); -1 if none. */
int q3_settings_find(const char *name);

/* The settings as a JSON object text {"name": {"value": ..., "source": "flag|knob|config|default",
 * "origin": "...", "reloadable": bool}} (secrets shown as "(set)"), malloc'ed; NULL on ENOMEM. */
char *q3_settings_json(const struct q3_settings *s);

/* The qwen3mm knobs (knobs.h), read once: from $QWEN3D_KNOBS_DIR if set, else Q3_KNOBS_DIR. */
struct q3_sysfs_knobs {
	struct q3_knobs k;
	char dir[256];
};
/* Reads them; a missing module is no error (no knob present), a garbage value is (-EINVAL). */
int q3_settings_read_knobs(struct q3_sysfs_knobs *sk, q3_err *e);
/* The knob reader the daemon passes to q3_settings_load, ctx a struct q3_sysfs_knobs: the
 * settings' values in their units ("8192KiB", "lfu"), origin the sysfs file. */
int q3_settings_sysfs_knob(void *ctx, const char *name, char *buf, size_t n, char *origin, size_t on);
/* q3_settings_load with this machine's knobs: what the daemon and its commands use. */
int q3_settings_load_system(struct q3_settings *s, const struct q3_set_flags *f, q3_err *e);
