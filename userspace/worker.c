/* worker.c - the inference worker: admission, saved-state reuse, interleaved prefill and batched
 * decode, sampling, detokenization and stop handling (see worker.h). */
#include "worker.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "metrics.h"
#include "snapcache.h"
#include "stopstr.h"
#include "tokenizer.h"

#define RLX memory_order_relaxed

/* ---- jobs ---------------------------------------------------------------------------------- */

static void job_free(struct q3_job *j)
{
	for (int i = 0; i < j->nstop; i++)
		free(j->stop[i]);
	free(j->prompt);
	free(j->text);
	free(j->bias);
	free(j);
}

struct q3_job *q3_job_new(const int32_t *prompt, int nprompt, const struct q3_sampling *samp,
			  int max_tokens, const char *const *stop, int nstop)
{
	struct q3_job *j = calloc(1, sizeof(*j));

	if (!j)
		return NULL;
	j->prompt = malloc(Q3_MAX(nprompt, 1) * sizeof(*j->prompt));
	j->cap = 256;
	j->text = malloc(j->cap);
	if (!j->prompt || !j->text)
		goto fail;
	memcpy(j->prompt, prompt, nprompt * sizeof(*prompt));
	j->text[0] = 0;
	j->nprompt = nprompt;
	j->samp = *samp;
	if (samp->nbias) {
		if (!(j->bias = malloc(samp->nbias * sizeof(*j->bias))))
			goto fail;
		memcpy(j->bias, samp->bias, samp->nbias * sizeof(*j->bias));
	}
	j->samp.bias = j->bias;
	j->max_tokens = max_tokens;
	for (int i = 0; i < nstop && i < Q3_API_MAX_STOP; i++) {
		if (!(j->stop[i] = strdup(stop[i])))
			goto fail;
		j->nstop++;
	}
	pthread_mutex_init(&j->mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&j->cv, &ca);
	pthread_condattr_destroy(&ca);
	atomic_init(&j->refs, 1);
	j->t_queued = q3_now();
	return j;
fail:
	job_free(j);
	return NULL;
}

void q3_job_put(struct q3_job *j)
{
	if (!j || atomic_fetch_sub(&j->refs, 1) != 1)
		return;
	pthread_mutex_destroy(&j->mu);
	pthread_cond_destroy(&j->cv);
	job_free(j);
}

bool q3_job_wait(struct q3_job *j, size_t seen, double timeout_s)
{
	struct timespec ts;
	bool ready;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += (time_t)timeout_s;
	ts.tv_nsec += (long)((timeout_s - (double)(time_t)timeout_s) * 1e9);
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&j->mu);
	while (!(ready = j->done || j->len > seen))
		if (pthread_cond_timedwait(&j->cv, &j->mu, &ts) == ETIMEDOUT)
			break;
	ready = j->done || j->len > seen;
	pthread_mutex_unlock(&j->mu);
	return ready;
}

/* ---- worker state -------------------------------------------------------------------------- */

struct slot {
	struct q3_job *job; /* NULL: free */
	uint64_t seq;	    /* admission order */
	struct q3_session *s;
	struct q3_sampler smp;
	struct q3_tok_stream ts;
	int32_t *ids; /* [max_ctx] tokens the session consumed: the prompt, then generated ones */
	int nids;
	bool decoding; /* prompt done; `next` waits to be fed */
	int32_t next;
	struct q3_stopstr stops;
};

struct q3_worker {
	struct q3_worker_opts o;
	int V, max_ctx, max_batch;

	pthread_t thread;
	pthread_mutex_t mu; /* guards the queue and quit */
	pthread_cond_t cv;
	struct qent {
		struct q3_job *job;
		struct qent *next;
	} *qhead, *qtail;
	bool quit, joined;
	atomic_int load, prefill_chunk, max_queue;

	struct slot *slots; /* [max_batch] */
	int nactive;
	uint64_t seq;
	struct q3_snapcache cache;
	double t_stats;		/* when the engine's stats were last published */
	float *logits;		/* [V]: a prompt's last logits */
	struct q3_session **ss; /* [max_batch] decode scratch */
	int32_t *toks, *drawn;
	struct q3_sampler **smp;
	struct slot **dec;
};

static void free_session(void *ctx, void *state)
{
	q3_session_free(state);
}

/* ---- output -------------------------------------------------------------------------------- */

/* Appends text to the job (under its lock) and wakes its reader. */
static void job_append(struct q3_job *j, const char *text, size_t n)
{
	if (!n)
		return;
	pthread_mutex_lock(&j->mu);
	if (j->len + n + 1 > j->cap) {
		size_t cap = Q3_MAX(j->cap * 2, j->len + n + 1);
		char *t = realloc(j->text, cap);
		if (!t) { /* keep what we have; the reader sees a short text */
			pthread_mutex_unlock(&j->mu);
			return;
		}
		j->text = t;
		j->cap = cap;
	}
	memcpy(j->text + j->len, text, n);
	j->len += n;
	j->text[j->len] = 0;
	pthread_cond_broadcast(&j->cv);
	pthread_mutex_unlock(&j->mu);
}

/* Feeds decoded text through the stop strings and appends what is certain to the job.  Returns
 * true when a stop string was found. */
static bool emit_text(struct slot *sl, const char *text, size_t n, bool final)
{
	const char *out;
	size_t nout;
	bool stop = q3_stopstr_feed(&sl->stops, text, n, final, &out, &nout);

	job_append(sl->job, out, nout);
	return stop;
}

/* ---- sessions and saved states ------------------------------------------------------------- */

/* Saves slot's state under its first n consumed tokens: by copy (the slot keeps running) or, when
 * `give` is set, by handing the slot's session to the cache and taking another. */
static void save_state(struct q3_worker *w, struct slot *sl, int n, bool give)
{
	void *recycled;
	bool exists;
	q3_err e;

	if (n <= 0 || w->cache.cap == 0)
		return;
	struct q3_snap *snap = q3_snapcache_put(&w->cache, sl->ids, n, &recycled, &exists);
	if (!snap)
		return;
	struct q3_session *other = recycled;
	if (!other && q3_session_new(w->o.eng, &other, &e)) {
		q3_warn("saved states: no session for a new state: %s", e.msg);
		q3_snapcache_drop(&w->cache, snap);
		return;
	}
	if (give) {
		snap->state = sl->s;
		sl->s = other;
	} else if (q3_session_copy(other, sl->s, &e)) {
		q3_warn("saved states: copy failed: %s", e.msg);
		q3_session_free(other);
		q3_snapcache_drop(&w->cache, snap);
		return;
	} else {
		snap->state = other;
	}
	if (w->o.metrics) {
		atomic_fetch_add_explicit(&w->o.metrics->cache_saves, 1, RLX);
		atomic_store(&w->o.metrics->cache_entries, w->cache.n);
	}
}

/* ---- admission and the end of a job --------------------------------------------------------- */

static void finish(struct q3_worker *w, struct slot *sl, enum q3_finish why, const char *err)
{
	struct q3_job *j = sl->job;
	const char *text;
	size_t n;

	q3_tok_stream_flush(&sl->ts, &text, &n); /* an incomplete character becomes U+FFFD */
	if (why != Q3_FINISH_ERROR && why != Q3_FINISH_CANCELLED)
		emit_text(sl, text, n, true);
	if (why == Q3_FINISH_ERROR)
		q3_session_reset(sl->s); /* state unknown: never save it */
	else
		save_state(w, sl, sl->nids, true);

	pthread_mutex_lock(&j->mu);
	j->done = true;
	j->finish = why;
	j->t_done = q3_now();
	if (err)
		snprintf(j->error, sizeof(j->error), "%s", err);
	pthread_cond_broadcast(&j->cv);
	pthread_mutex_unlock(&j->mu);

	if (w->o.metrics) {
		struct q3_metrics *m = w->o.metrics;
		atomic_fetch_add_explicit(&m->prompt_tokens, j->nprompt, RLX);
		atomic_fetch_add_explicit(&m->cached_tokens, j->cached, RLX);
		atomic_fetch_add_explicit(&m->gen_seconds_us, (uint64_t)((j->t_done - j->t_queued) * 1e6), RLX);
		atomic_fetch_add_explicit(&m->gen_count, 1, RLX);
		if (why == Q3_FINISH_CANCELLED)
			atomic_fetch_add_explicit(&m->cancelled, 1, RLX);
		atomic_fetch_sub(&m->running, 1);
	}
	q3_job_put(j);
	sl->job = NULL;
	sl->decoding = false;
	w->nactive--;
	atomic_fetch_sub(&w->load, 1);
}

static void admit(struct q3_worker *w, struct slot *sl, struct q3_job *j)
{
	struct q3_snap *snap;
	q3_err e;

	sl->job = j;
	sl->seq = ++w->seq;
	sl->decoding = false;
	q3_stopstr_reset(&sl->stops, j->stop, j->nstop);
	w->nactive++;
	if (w->o.metrics) {
		atomic_fetch_sub(&w->o.metrics->queued, 1);
		atomic_fetch_add(&w->o.metrics->running, 1);
	}
	q3_sampler_reset(&sl->smp, &j->samp);
	q3_session_reset(sl->s);
	sl->nids = 0;
	if (j->nprompt < 1 || j->nprompt >= w->max_ctx) {
		snprintf(e.msg, sizeof(e.msg), "prompt of %d tokens does not fit the context of %d", j->nprompt,
			 w->max_ctx);
		finish(w, sl, Q3_FINISH_ERROR, e.msg);
		return;
	}
	memcpy(sl->ids, j->prompt, j->nprompt * sizeof(*sl->ids));
	snap = q3_snapcache_lookup(&w->cache, j->prompt, j->nprompt, j->nprompt - 1);
	if (snap && q3_session_copy(sl->s, snap->state, &e) == 0) {
		sl->nids = snap->n;
		pthread_mutex_lock(&j->mu);
		j->cached = snap->n;
		pthread_mutex_unlock(&j->mu);
	} else if (snap) {
		q3_warn("saved states: restore failed: %s", e.msg);
		q3_session_reset(sl->s);
	}
	if (w->o.metrics)
		atomic_fetch_add_explicit(snap ? &w->o.metrics->cache_hits : &w->o.metrics->cache_misses, 1,
					  RLX);
}

static bool is_eos(const struct q3_worker *w, int32_t id)
{
	for (int i = 0; i < w->o.neos; i++)
		if (w->o.eos[i] == id)
			return true;
	return false;
}

/* A token was sampled for sl: account for it, end the job or queue it for the next step. */
static void take_token(struct q3_worker *w, struct slot *sl, int32_t id)
{
	struct q3_job *j = sl->job;
	const char *text;
	size_t n;
	q3_err e;

	if (id < 0) {
		finish(w, sl, Q3_FINISH_ERROR, "the model produced no finite logit");
		return;
	}
	pthread_mutex_lock(&j->mu);
	if (j->ntokens++ == 0)
		j->t_first = q3_now();
	pthread_mutex_unlock(&j->mu);
	if (w->o.metrics)
		q3_metrics_tokens(w->o.metrics, 1);
	if (is_eos(w, id)) {
		finish(w, sl, Q3_FINISH_STOP, NULL);
		return;
	}
	q3_sampler_accept(&sl->smp, id);
	if (q3_tok_stream_push(&sl->ts, id, &text, &n, &e) == 0 && emit_text(sl, text, n, false)) {
		q3_tok_stream_flush(&sl->ts, &text, &n); /* after the stop string: dropped, not emitted */
		finish(w, sl, Q3_FINISH_STOP, NULL);
		return;
	}
	if (j->ntokens >= j->max_tokens || sl->nids + 1 > w->max_ctx) {
		finish(w, sl, Q3_FINISH_LENGTH, NULL);
		return;
	}
	sl->next = id;
	sl->decoding = true;
}

/* ---- the two kinds of step ------------------------------------------------------------------ */

/* Feeds one piece of sl's prompt: [nids, n-1) in chunks of at most `budget` tokens, with a saved
 * state taken at n-1, then the last token with its logits, from which the first token is
 * sampled.  Returns the tokens computed. */
static int prefill_one(struct q3_worker *w, struct slot *sl, int budget)
{
	struct q3_job *j = sl->job;
	int last = j->nprompt - 1, n;
	q3_err e;

	if (sl->nids < last) {
		n = Q3_MIN(last - sl->nids, budget);
		if (q3_session_eval(sl->s, sl->ids + sl->nids, n, NULL, 0, &e)) {
			finish(w, sl, Q3_FINISH_ERROR, e.msg);
			return n;
		}
		sl->nids += n;
		if (sl->nids == last)
			save_state(w, sl, last, false);
	} else {
		n = 1;
		if (q3_session_eval(sl->s, sl->ids + last, 1, w->logits, 0, &e)) {
			finish(w, sl, Q3_FINISH_ERROR, e.msg);
			return n;
		}
		sl->nids++;
		take_token(w, sl, q3_sampler_sample(&sl->smp, w->logits));
	}
	if (w->o.metrics)
		atomic_fetch_add_explicit(&w->o.metrics->prefill_tokens, n, RLX);
	return n;
}

/* Spends up to prefill_chunk tokens on the prompts of the jobs still reading them, oldest first:
 * one long prompt takes the whole budget, many short ones share it, and the running generations
 * wait at most one budget between two of their tokens. */
static void prefill_step(struct q3_worker *w)
{
	int budget = atomic_load_explicit(&w->prefill_chunk, RLX);

	while (budget > 0) {
		struct slot *sl = NULL;
		for (int i = 0; i < w->max_batch; i++) {
			struct slot *c = &w->slots[i];
			if (c->job && !c->decoding && (!sl || c->seq < sl->seq))
				sl = c;
		}
		if (!sl)
			return;
		budget -= prefill_one(w, sl, budget);
	}
}

/* One decode step over every generating job: feeds each its last sampled token. */
static void decode_step(struct q3_worker *w)
{
	int n = 0, rc;
	q3_err e;

	for (int i = 0; i < w->max_batch; i++) {
		struct slot *sl = &w->slots[i];
		if (sl->job && sl->decoding) {
			w->ss[n] = sl->s;
			w->toks[n] = sl->next;
			w->smp[n] = &sl->smp;
			w->dec[n++] = sl;
		}
	}
	if (!n)
		return;
	/* the draws on the device where the backend can: only the ids come back */
	if ((rc = q3_engine_decode_sample(w->o.eng, w->ss, w->toks, n, w->smp, w->drawn, &e))) {
		for (int i = 0; i < n; i++)
			finish(w, w->dec[i], Q3_FINISH_ERROR, e.msg);
		return;
	}
	if (w->o.metrics) {
		atomic_fetch_add_explicit(&w->o.metrics->decode_steps, 1, RLX);
		atomic_fetch_add_explicit(&w->o.metrics->decode_seqs, n, RLX);
	}
	for (int i = 0; i < n; i++) {
		struct slot *sl = w->dec[i];
		sl->ids[sl->nids++] = sl->next;
		take_token(w, sl, w->drawn[i]);
	}
}

/* Ends the queue entries of list q (taken out of the queue) as cancelled: never admitted. */
static void end_queued(struct q3_worker *w, struct qent *q)
{
	for (struct qent *next; q; q = next) {
		next = q->next;
		pthread_mutex_lock(&q->job->mu);
		q->job->done = true;
		q->job->finish = Q3_FINISH_CANCELLED;
		q->job->t_done = q3_now();
		pthread_cond_broadcast(&q->job->cv);
		pthread_mutex_unlock(&q->job->mu);
		if (w->o.metrics) {
			atomic_fetch_sub(&w->o.metrics->queued, 1);
			atomic_fetch_add_explicit(&w->o.metrics->cancelled, 1, RLX);
		}
		atomic_fetch_sub(&w->load, 1);
		q3_job_put(q->job);
		free(q);
	}
}

/* A client that left while its job was still queued gives its place back now, not when a batch
 * slot frees (abandoned jobs would otherwise fill max_queue behind long generations). */
static void drop_cancelled_queued(struct q3_worker *w)
{
	struct qent *gone = NULL, **pp;

	pthread_mutex_lock(&w->mu);
	w->qtail = NULL;
	for (pp = &w->qhead; *pp;) {
		struct qent *q = *pp;

		if (atomic_load_explicit(&q->job->cancel, RLX)) {
			*pp = q->next;
			q->next = gone;
			gone = q;
		} else {
			w->qtail = q;
			pp = &q->next;
		}
	}
	pthread_mutex_unlock(&w->mu);
	end_queued(w, gone);
}

/* The engine's expert facts for /metrics and `qwen3d status`, at most a few times a second. */
static void publish_stats(struct q3_worker *w, bool now)
{
	struct q3_engine_stats s;
	double t = q3_now();

	if (!w->o.metrics || (!now && t - w->t_stats < 0.25))
		return;
	w->t_stats = t;
	q3_engine_stats(w->o.eng, &s);
	q3_metrics_experts(w->o.metrics, &s);
}

/* Nothing queued or running: one bounded round of the engine's re-balancing (the expert cache
 * follows what the last requests used).  False when there is nothing left to do. */
static bool idle_round(struct q3_worker *w)
{
	q3_err e;
	int r = q3_engine_idle(w->o.eng, &e);

	if (r < 0)
		q3_warn("worker: re-balancing the expert cache: %s", e.msg);
	publish_stats(w, r <= 0);
	return r > 0;
}

static void *worker_main(void *arg)
{
	struct q3_worker *w = arg;
	bool idle_work = true; /* statistics moved since the last re-balancing round */

	publish_stats(w, true);
	for (;;) {
		pthread_mutex_lock(&w->mu);
		while (!w->quit && !w->nactive && !w->qhead) {
			if (idle_work) { /* between requests only: a new one waits at most one round */
				pthread_mutex_unlock(&w->mu);
				idle_work = idle_round(w);
				pthread_mutex_lock(&w->mu);
				continue;
			}
			pthread_cond_wait(&w->cv, &w->mu);
		}
		bool quit = w->quit;
		pthread_mutex_unlock(&w->mu);
		drop_cancelled_queued(w);
		pthread_mutex_lock(&w->mu);
		for (int i = 0; i < w->max_batch && w->qhead && !quit; i++) {
			if (w->slots[i].job)
				continue;
			struct qent *q = w->qhead;
			w->qhead = q->next;
			if (!w->qhead)
				w->qtail = NULL;
			pthread_mutex_unlock(&w->mu);
			admit(w, &w->slots[i], q->job);
			free(q);
			pthread_mutex_lock(&w->mu);
		}
		pthread_mutex_unlock(&w->mu);

		for (int i = 0; i < w->max_batch; i++) {
			struct slot *sl = &w->slots[i];
			if (sl->job && (quit || atomic_load_explicit(&sl->job->cancel, RLX)))
				finish(w, sl, Q3_FINISH_CANCELLED, NULL);
		}
		if (quit)
			break;
		prefill_step(w);
		decode_step(w);
		publish_stats(w, false);
		idle_work = true;
	}
	return NULL;
}

/* ---- public -------------------------------------------------------------------------------- */

int q3_worker_submit(struct q3_worker *w, struct q3_job *j)
{
	struct qent *q = malloc(sizeof(*q));
	int rc = 0;

	if (!q)
		return -ENOMEM;
	pthread_mutex_lock(&w->mu);
	if (w->quit)
		rc = -ESHUTDOWN;
	else if (atomic_load(&w->load) >= atomic_load(&w->max_queue))
		rc = -EAGAIN;
	if (rc) {
		pthread_mutex_unlock(&w->mu);
		free(q);
		return rc;
	}
	atomic_fetch_add(&j->refs, 1);
	atomic_fetch_add(&w->load, 1);
	if (w->o.metrics)
		atomic_fetch_add(&w->o.metrics->queued, 1);
	q->job = j;
	q->next = NULL;
	if (w->qtail)
		w->qtail->next = q;
	else
		w->qhead = q;
	w->qtail = q;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
	return 0;
}

int q3_worker_load(struct q3_worker *w)
{
	return atomic_load(&w->load);
}

void q3_worker_set_limits(struct q3_worker *w, int prefill_chunk, int max_queue)
{
	atomic_store(&w->prefill_chunk, Q3_MAX(prefill_chunk, 1));
	atomic_store(&w->max_queue, Q3_MAX(max_queue, 1));
}

/* Everything q3_worker_start allocates (the thread is not running). */
static void worker_free_mem(struct q3_worker *w)
{
	for (int i = 0; w->slots && i < w->max_batch; i++) {
		struct slot *sl = &w->slots[i];
		if (sl->s)
			q3_session_free(sl->s);
		q3_sampler_free(&sl->smp);
		if (sl->ts.tok)
			q3_tok_stream_free(&sl->ts);
		free(sl->ids);
		q3_stopstr_free(&sl->stops);
	}
	free(w->slots);
	q3_snapcache_free(&w->cache, free_session, NULL);
	free(w->logits);
	free(w->ss);
	free(w->toks);
	free(w->drawn);
	free(w->smp);
	free(w->dec);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->cv);
	free(w);
}

int q3_worker_start(const struct q3_worker_opts *o, struct q3_worker **out, q3_err *e)
{
	struct q3_worker *w = calloc(1, sizeof(*w));
	int rc;

	if (!w)
		return q3_errf(e, -ENOMEM, "worker: out of memory");
	w->o = *o;
	w->V = q3_engine_config(o->eng)->vocab_size;
	w->max_ctx = q3_engine_max_ctx(o->eng);
	w->max_batch = q3_engine_max_batch(o->eng);
	atomic_init(&w->prefill_chunk, Q3_MAX(o->prefill_chunk, 1));
	atomic_init(&w->max_queue, Q3_MAX(o->max_queue, 1));
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	if ((rc = q3_snapcache_init(&w->cache, o->cache_entries, e)))
		goto fail;
	w->slots = calloc(w->max_batch, sizeof(*w->slots));
	w->logits = malloc((size_t)w->V * sizeof(float));
	w->ss = calloc(w->max_batch, sizeof(*w->ss));
	w->toks = calloc(w->max_batch, sizeof(*w->toks));
	w->drawn = calloc(w->max_batch, sizeof(*w->drawn));
	w->smp = calloc(w->max_batch, sizeof(*w->smp));
	w->dec = calloc(w->max_batch, sizeof(*w->dec));
	if (!w->slots || !w->logits || !w->ss || !w->toks || !w->drawn || !w->smp || !w->dec) {
		rc = q3_errf(e, -ENOMEM, "worker: out of memory for %d slots", w->max_batch);
		goto fail;
	}
	for (int i = 0; i < w->max_batch; i++) {
		struct slot *sl = &w->slots[i];
		if ((rc = q3_session_new(o->eng, &sl->s, e)) || (rc = q3_sampler_init(&sl->smp, w->V, e)) ||
		    (rc = q3_tok_stream_init(&sl->ts, o->tok, Q3_TOK_SKIP_SPECIAL, e)))
			goto fail;
		if (!(sl->ids = malloc(w->max_ctx * sizeof(*sl->ids))) || q3_stopstr_init(&sl->stops)) {
			rc = q3_errf(e, -ENOMEM, "worker: out of memory for slot %d", i);
			goto fail;
		}
	}
	if ((rc = -pthread_create(&w->thread, NULL, worker_main, w))) {
		q3_errf(e, rc, "worker: cannot start the thread: %s", strerror(-rc));
		goto fail;
	}
	*out = w;
	return 0;
fail:
	worker_free_mem(w);
	return rc;
}

void q3_worker_stop(struct q3_worker *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&w->mu);
	bool joined = w->joined;
	w->quit = true;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
	if (joined)
		return;
	pthread_join(w->thread, NULL);
	w->joined = true;
	/* jobs never admitted: end them as cancelled */
	pthread_mutex_lock(&w->mu);
	struct qent *q = w->qhead;
	w->qhead = w->qtail = NULL;
	pthread_mutex_unlock(&w->mu);
	end_queued(w, q);
}

void q3_worker_free(struct q3_worker *w)
{
	if (!w)
		return;
	q3_worker_stop(w);
	worker_free_mem(w);
}
