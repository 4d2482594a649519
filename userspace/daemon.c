/* daemon.c - the running daemon: startup, signal loop, reload, drain and the state file (see
 * daemon.h). */
#include "daemon.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "config.h"
#include "engine.h"
#include "metrics.h"
#include "server.h"
#include "tokenizer.h"
#include "version.h"
#include "worker.h"

#define MAX_CACHE_ENTRIES 256

uint64_t q3_daemon_state_bytes(const struct q3_config *c, int max_ctx)
{
	uint64_t kv = (uint64_t)c->num_full_layers * max_ctx * 2 * c->kv_dim * sizeof(float);
	uint64_t lin = (uint64_t)c->num_linear_layers *
		       ((uint64_t)c->lin_num_v_heads * c->lin_k_dim * c->lin_v_dim + (uint64_t)c->conv_dim * (c->conv_kernel - 1)) *
		       sizeof(float);
	return kv + lin;
}

/* Sampling defaults and stop ids from generation_config.json (absent: greedy off, no filters;
 * eos from config.json), plus the chat end tokens the tokenizer knows. */
static void generation_defaults(const char *dir, const struct q3_config *cfg, const struct q3_tok *tok,
				struct q3_sampling *d, int32_t *eos, int *neos)
{
	char path[PATH_MAX];
	json_t *g, *v;

	q3_sampling_default(d);
	*neos = 0;
	snprintf(path, sizeof(path), "%s/generation_config.json", dir);
	if ((g = json_load_file(path, 0, NULL))) {
		if (json_is_number(v = json_object_get(g, "temperature")))
			d->temperature = (float)json_number_value(v);
		if (json_is_number(v = json_object_get(g, "top_p")))
			d->top_p = (float)json_number_value(v);
		if (json_is_integer(v = json_object_get(g, "top_k")))
			d->top_k = (int)json_integer_value(v);
		if (json_is_number(v = json_object_get(g, "min_p")))
			d->min_p = (float)json_number_value(v);
		if (json_is_false(json_object_get(g, "do_sample")))
			d->temperature = 0;
		/* the ranges the API accepts (api_request.c): outside them the sampler misbehaves */
		if (!(d->temperature >= 0 && d->temperature <= 2) || !(d->top_p > 0 && d->top_p <= 1) ||
		    !(d->min_p >= 0 && d->min_p <= 1) || d->top_k < 0) {
			q3_warn("%s: sampling defaults out of range: ignored", path);
			q3_sampling_default(d);
		}
		v = json_object_get(g, "eos_token_id");
		if (json_is_integer(v))
			eos[(*neos)++] = (int32_t)json_integer_value(v);
		for (size_t i = 0; json_is_array(v) && i < json_array_size(v) && *neos < Q3_MAX_EOS; i++)
			if (json_is_integer(json_array_get(v, i)))
				eos[(*neos)++] = (int32_t)json_integer_value(json_array_get(v, i));
		json_decref(g);
	}
	if (*neos == 0)
		for (int i = 0; i < cfg->n_eos && *neos < Q3_MAX_EOS; i++)
			eos[(*neos)++] = cfg->eos_ids[i];
	const char *ends[] = { "<|im_end|>", "<|endoftext|>" };
	for (int i = 0; i < 2; i++) {
		int32_t id = q3_tok_id(tok, ends[i]);
		bool have = false;
		for (int k = 0; k < *neos; k++)
			have |= eos[k] == id;
		if (id >= 0 && !have && *neos < Q3_MAX_EOS + 2)
			eos[(*neos)++] = id;
	}
}

struct daemon {
	struct q3_settings *s;
	const struct q3_set_flags *flags;
	struct q3_engine *eng;
	struct q3_tok *tok;
	struct q3_worker *worker;
	struct q3_server *srv;
	struct q3_metrics metrics;
	char model_id[256];
	int cache_entries;
	uint64_t state_bytes;
	time_t started;
};

static const char *base_name(const char *path)
{
	size_t n = strlen(path);
	while (n > 1 && path[n - 1] == '/')
		n--;
	const char *p = path + n;
	while (p > path && p[-1] != '/')
		p--;
	return p;
}

static void limits_of(const struct q3_settings *s, struct q3_server_limits *lim)
{
	memset(lim, 0, sizeof(*lim));
	lim->max_body = (size_t)q3_set_num(s, Q3_SET_MAX_BODY);
	lim->max_prompt_tokens = (int)q3_set_num(s, Q3_SET_MAX_PROMPT_TOKENS);
	lim->request_timeout = (int)q3_set_num(s, Q3_SET_REQUEST_TIMEOUT);
	snprintf(lim->api_key, sizeof(lim->api_key), "%s", q3_set_str(s, Q3_SET_API_KEY));
}

/* RUN_DIR/qwen3d.json: what `qwen3d status` shows besides what /proc says. */
static void write_state(struct daemon *d)
{
	char path[PATH_MAX], tmp[PATH_MAX + 8], *settings = q3_settings_json(d->s);
	json_t *st = settings ? json_loads(settings, 0, NULL) : NULL;
	const char *host = q3_set_str(d->s, Q3_SET_HOST);
	char url[320];

	free(settings);
	snprintf(url, sizeof(url), strchr(host, ':') ? "http://[%s]:%lld" : "http://%s:%lld", host,
		 (long long)q3_set_num(d->s, Q3_SET_PORT));
	json_t *o = json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:I, s:i, s:I, s:i, s:i, s:o}", "pid", (int)getpid(),
			      "version", QWEN3D_VERSION, "model", q3_set_str(d->s, Q3_SET_MODEL), "model_id", d->model_id,
			      "backend", q3_engine_backend(d->eng), "url", url, "started", (json_int_t)d->started,
			      "cache_entries", d->cache_entries, "state_bytes", (json_int_t)d->state_bytes, "max_ctx",
			      q3_engine_max_ctx(d->eng), "max_batch", q3_engine_max_batch(d->eng), "settings",
			      st ? st : json_object());
	struct q3_engine_load wl;
	q3_engine_load_info(d->eng, &wl);
	if (o)
		json_object_set_new(o, "weights", json_pack("{s:I, s:f, s:s, s:s}", "bytes", (json_int_t)wl.bytes,
							     "seconds", wl.seconds, "path", wl.path, "memory", wl.mem));
	snprintf(path, sizeof(path), "%s/qwen3d.json", q3_set_str(d->s, Q3_SET_RUN_DIR));
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	if (!o || json_dump_file(o, tmp, JSON_INDENT(1) | JSON_PRESERVE_ORDER) || rename(tmp, path))
		q3_warn("cannot write the state file %s", path);
	json_decref(o);
}

/* Signals: blocked in every thread and taken by this one, so that a SIGTERM during the model
 * load (minutes for the real model) ends the process at once, and later ones drain it. */
static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	sigset_t set;
	bool ready;
	int hup, term;
} sigs = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static void *signal_thread(void *arg)
{
	for (;;) {
		int sig;
		if (sigwait(&sigs.set, &sig))
			continue;
		pthread_mutex_lock(&sigs.mu);
		if (sig != SIGHUP && !sigs.ready) {
			q3_info("%s while loading: exiting", strsignal(sig));
			_exit(1); /* nothing to drain; the pid file's lock goes with the process */
		}
		if (sig == SIGHUP)
			sigs.hup++;
		else
			sigs.term = sig;
		pthread_cond_signal(&sigs.cv);
		pthread_mutex_unlock(&sigs.mu);
	}
	return NULL;
}

static void reload(struct daemon *d)
{
	struct q3_settings ns;
	struct q3_server_limits lim;
	q3_err e;

	if (q3_settings_load_system(&ns, d->flags, &e)) {
		q3_warn("SIGHUP: settings not reloaded: %s", e.msg);
		return;
	}
	for (int id = 0; id < Q3_SET_COUNT; id++)
		if (!q3_set_defs[id].reloadable && strcmp(ns.v[id].str, d->s->v[id].str) &&
		    id != Q3_SET_MODEL) /* the model path was made absolute at start */
			q3_warn("SIGHUP: %s changed to '%s' (%s): takes effect at the next start",
				q3_set_defs[id].name, q3_set_defs[id].secret ? "(hidden)" : ns.v[id].str, ns.v[id].origin);
	for (int id = 0; id < Q3_SET_COUNT; id++)
		if (q3_set_defs[id].reloadable) {
			struct q3_setval t = d->s->v[id];
			d->s->v[id] = ns.v[id];
			ns.v[id] = t;
		}
	q3_settings_free(&ns);
	limits_of(d->s, &lim);
	q3_server_set_limits(d->srv, &lim);
	q3_worker_set_limits(d->worker, (int)q3_set_num(d->s, Q3_SET_PREFILL_CHUNK), (int)q3_set_num(d->s, Q3_SET_MAX_QUEUE));
	write_state(d);
	q3_info("SIGHUP: settings reloaded");
}

static void drain(struct daemon *d)
{
	int limit = (int)q3_set_num(d->s, Q3_SET_DRAIN_TIMEOUT);
	double t0 = q3_now();

	q3_server_drain(d->srv);
	q3_info("draining: %d requests in flight", q3_server_inflight(d->srv));
	while (q3_server_inflight(d->srv) > 0 && q3_now() - t0 < limit) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	if (q3_server_inflight(d->srv) > 0)
		q3_warn("drain_timeout (%d s) reached with %d requests in flight: cancelling them", limit,
			q3_server_inflight(d->srv));
}

int q3_daemon_run(struct q3_settings *s, const struct q3_set_flags *flags, int listen_fd, q3_daemon_ready_fn ready,
		  void *ctx)
{
	struct daemon d = { .s = s, .flags = flags, .started = time(NULL) };
	struct q3_engine_opts eo = { 0 };
	struct q3_server_opts so = { 0 };
	struct q3_worker_opts wo = { 0 };
	struct q3_sampling defaults;
	int32_t eos[Q3_MAX_EOS + 2];
	int neos, rc = 1;
	char msg[600], stats_path[4096];
	pthread_t sigthr;
	q3_err e;

	sigemptyset(&sigs.set);
	sigaddset(&sigs.set, SIGTERM);
	sigaddset(&sigs.set, SIGINT);
	sigaddset(&sigs.set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs.set, NULL); /* before any thread exists: all inherit it */
	signal(SIGPIPE, SIG_IGN);
	if (pthread_create(&sigthr, NULL, signal_thread, NULL) == 0)
		pthread_detach(sigthr);

	eo.model_dir = q3_set_str(s, Q3_SET_MODEL);
	eo.backend = q3_set_str(s, Q3_SET_BACKEND);
	eo.threads = (int)q3_set_num(s, Q3_SET_THREADS);
	/* the default is 4096 or the model's own limit, whichever is less (the engine decides) */
	eo.max_ctx = s->v[Q3_SET_MAX_CTX].src == Q3_SRC_DEFAULT ? 0 : (int)q3_set_num(s, Q3_SET_MAX_CTX);
	eo.max_batch = (int)q3_set_num(s, Q3_SET_MAX_BATCH);
	eo.vram_budget = (uint64_t)q3_set_num(s, Q3_SET_VRAM_BUDGET);
	eo.read_chunk = (uint32_t)q3_set_num(s, Q3_SET_READ_CHUNK);
	eo.queue_depth = (int)q3_set_num(s, Q3_SET_QUEUE_DEPTH);
	eo.expert_threads = (int)q3_set_num(s, Q3_SET_EXPERT_THREADS);
	eo.expert_cache = q3_set_str(s, Q3_SET_EXPERT_CACHE);
	eo.expert_stats = q3_set_str(s, Q3_SET_EXPERT_STATS);
	if (!*eo.expert_stats) {
		snprintf(stats_path, sizeof(stats_path), "%s/expert-stats", q3_set_str(s, Q3_SET_RUN_DIR));
		eo.expert_stats = stats_path;
	} else if (!strcmp(eo.expert_stats, "none")) {
		eo.expert_stats = NULL;
	}
	eo.quiet = true;
	snprintf(d.model_id, sizeof(d.model_id), "%s", base_name(eo.model_dir));
	q3_info("qwen3d %s: loading %s (backend %s)", QWEN3D_VERSION, eo.model_dir, eo.backend);
	if (q3_engine_open(&eo, &d.eng, &e)) {
		snprintf(msg, sizeof(msg), "model %s: %s", eo.model_dir, e.msg);
		goto fail;
	}
	if (q3_tok_load(eo.model_dir, &d.tok, &e)) {
		snprintf(msg, sizeof(msg), "tokenizer of %s: %s", eo.model_dir, e.msg);
		goto fail;
	}
	const struct q3_config *cfg = q3_engine_config(d.eng);
	generation_defaults(eo.model_dir, cfg, d.tok, &defaults, eos, &neos);
	d.state_bytes = q3_daemon_state_bytes(cfg, q3_engine_max_ctx(d.eng));
	d.cache_entries = (int)Q3_MIN((uint64_t)q3_set_num(s, Q3_SET_CACHE_SIZE) / Q3_MAX(d.state_bytes, 1),
				      MAX_CACHE_ENTRIES);

	wo.eng = d.eng;
	wo.tok = d.tok;
	wo.metrics = &d.metrics;
	wo.cache_entries = d.cache_entries;
	wo.prefill_chunk = (int)q3_set_num(s, Q3_SET_PREFILL_CHUNK);
	wo.max_queue = (int)q3_set_num(s, Q3_SET_MAX_QUEUE);
	wo.eos = eos;
	wo.neos = neos;
	if (q3_worker_start(&wo, &d.worker, &e)) {
		snprintf(msg, sizeof(msg), "%s", e.msg);
		goto fail;
	}
	so.listen_fd = listen_fd;
	so.worker = d.worker;
	so.tok = d.tok;
	so.metrics = &d.metrics;
	so.model_id = d.model_id;
	so.defaults = defaults;
	so.vocab = cfg->vocab_size;
	so.max_ctx = q3_engine_max_ctx(d.eng);
	so.max_connections = (int)q3_set_num(s, Q3_SET_MAX_CONNECTIONS);
	so.conn_timeout = (int)q3_set_num(s, Q3_SET_CONN_TIMEOUT);
	limits_of(s, &so.lim);
	if (q3_server_start(&so, &d.srv, &e)) {
		snprintf(msg, sizeof(msg), "%s", e.msg);
		goto fail;
	}
	listen_fd = -1; /* the server owns it now */
	write_state(&d);
	snprintf(msg, sizeof(msg), "serving %s on http://%s:%lld (backend %s, %d saved states of %.1f MiB)", d.model_id,
		 q3_set_str(s, Q3_SET_HOST), (long long)q3_set_num(s, Q3_SET_PORT), q3_engine_backend(d.eng),
		 d.cache_entries, d.state_bytes / 1048576.0);
	q3_info("%s", msg);
	pthread_mutex_lock(&sigs.mu);
	sigs.ready = true; /* from now on a SIGTERM drains */
	pthread_mutex_unlock(&sigs.mu);
	ready(ctx, true, msg);
	ready = NULL;

	pthread_mutex_lock(&sigs.mu);
	for (;;) {
		while (!sigs.hup && !sigs.term)
			pthread_cond_wait(&sigs.cv, &sigs.mu);
		if (sigs.term)
			break;
		sigs.hup = 0;
		pthread_mutex_unlock(&sigs.mu);
		reload(&d);
		pthread_mutex_lock(&sigs.mu);
	}
	int sig = sigs.term;
	pthread_mutex_unlock(&sigs.mu);
	q3_info("%s: shutting down", strsignal(sig));
	drain(&d);
	rc = 0;
	goto out;
fail:
	q3_log(Q3_LOG_ERROR, "%s", msg);
	if (ready)
		ready(ctx, false, msg);
out:
	q3_worker_stop(d.worker); /* cancels what the drain left: waiting HTTP threads then answer */
	q3_server_stop(d.srv);
	q3_worker_free(d.worker);
	if (d.tok)
		q3_tok_free(d.tok);
	q3_engine_close(d.eng);
	if (listen_fd >= 0)
		close(listen_fd);
	if (rc == 0)
		q3_info("stopped");
	return rc;
}
