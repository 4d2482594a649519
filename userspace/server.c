/* server.c - routes, limits, authentication, request bodies, and the waiting side of a
 * generation: one JSON response or a stream of SSE chunks (see server.h). */
#include "server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "api_request.h"
#include "api_response.h"
#include "chat.h"
#include "metrics.h"
#include "server_tools.h"
#include "tokenizer.h"
#include "worker.h"

#define WAIT_SLICE 0.25	 /* seconds between two looks at the client's socket */
/* An SSE comment after this long without output keeps proxies patient, and, sent well within
 * conn_timeout, keeps libmicrohttpd from taking a stream that waits for its tokens for a silent
 * connection (it times connections out on the time since their last send). */
#define KEEPALIVE_S 10.0

struct q3_server {
	struct q3_server_opts o;
	struct MHD_Daemon *mhd;
	pthread_mutex_t mu; /* guards lim */
	struct q3_server_limits lim;
	atomic_int inflight;
	atomic_bool draining;
	time_t started;
};

/* One HTTP request, from its first header to the request-completed callback. */
struct req {
	struct q3_server *srv;
	struct MHD_Connection *conn;
	enum q3_endpoint ep;
	double t0;
	int status;
	struct q3_server_limits lim; /* copied at the start: a reload does not change a request */

	char *body; /* the upload */
	size_t len, cap;
	bool too_big;

	/* generation */
	struct q3_api_req api;
	bool parsed;
	struct q3_api_resp resp;
	struct q3_job *job;
	int nprompt;
	struct q3_tools *tools; /* tool-call parser, chat requests with tools */
	bool counted;		/* in srv->inflight */

	/* streaming */
	size_t seen;	       /* job text bytes already turned into chunks */
	char *out;	       /* SSE bytes not yet handed to MHD */
	size_t out_len, out_off, out_cap;
	bool role_sent, ended; /* the last event is in out */
	double last_out;
};

/* ---- small helpers ------------------------------------------------------------------------- */

static int client_fd(struct MHD_Connection *c)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
	return ci ? ci->connect_fd : -1;
}

/* Whether the peer has closed or reset the connection (a half-close counts: an HTTP client
 * that shuts down its side is not waiting for an answer). */
static bool client_gone(struct MHD_Connection *c)
{
	struct pollfd p = { .fd = client_fd(c), .events = POLLRDHUP };
	if (p.fd < 0)
		return true;
	return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static enum MHD_Result respond(struct req *r, int status, const char *ctype, char *body)
{
	struct MHD_Response *resp;
	enum MHD_Result ret;

	if (!body) {
		status = 500;
		ctype = "application/json";
		body = strdup("{\"error\":{\"message\":\"Out of memory.\",\"type\":\"server_error\","
			      "\"param\":null,\"code\":null}}");
		if (!body)
			return MHD_NO;
	}
	resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	if (status == 401)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
	r->status = status;
	ret = MHD_queue_response(r->conn, status, resp);
	MHD_destroy_response(resp);
	return ret;
}

static enum MHD_Result respond_error(struct req *r, const struct q3_api_error *err)
{
	return respond(r, err->status, "application/json", q3_api_error_json(err));
}

static enum MHD_Result fail(struct req *r, int status, const char *type, const char *code, const char *msg)
{
	struct q3_api_error err;
	q3_api_errorf(&err, status, type, NULL, code, "%s", msg);
	return respond_error(r, &err);
}

static enum q3_endpoint route(const char *url)
{
	if (!strcmp(url, "/v1/chat/completions"))
		return Q3_EP_CHAT;
	if (!strcmp(url, "/v1/completions"))
		return Q3_EP_COMPLETIONS;
	if (!strcmp(url, "/v1/models"))
		return Q3_EP_MODELS;
	if (!strcmp(url, "/health"))
		return Q3_EP_HEALTH;
	if (!strcmp(url, "/metrics"))
		return Q3_EP_METRICS;
	return Q3_EP_OTHER;
}

/* Constant-time comparison of the bearer token with the key. */
static bool authorized(struct req *r)
{
	const char *key = r->lim.api_key, *h;
	size_t n = strlen(key), m;
	unsigned char diff = 0;

	if (!*key)
		return true;
	h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
	if (!h || strncasecmp(h, "Bearer ", 7))
		return false;
	h += 7;
	m = strlen(h);
	for (size_t i = 0; i < n; i++)
		diff |= (unsigned char)key[i] ^ (unsigned char)(i < m ? h[i] : 0);
	return diff == 0 && m == n;
}

/* ---- GET endpoints ------------------------------------------------------------------------- */

static enum MHD_Result get_health(struct req *r)
{
	struct q3_server *s = r->srv;
	char *body;
	if (asprintf(&body, "{\"status\":\"%s\",\"model\":\"%s\",\"load\":%d,\"uptime_s\":%ld}",
		     atomic_load(&s->draining) ? "draining" : "ok", s->o.model_id, q3_worker_load(s->o.worker),
		     (long)(time(NULL) - s->started)) < 0)
		body = NULL;
	return respond(r, atomic_load(&s->draining) ? 503 : 200, "application/json", body);
}

/* ---- prompts ------------------------------------------------------------------------------- */

/* Renders and tokenizes the request's prompt into *ids.  For tool_choice "required" or a named
 * function, the assistant turn is started with the opening of a call (the model then can only
 * continue it), and the same text is given to the tool-call parser as already generated. */
static int build_prompt(struct req *r, int32_t **ids, int *n, char **forced, struct q3_api_error *err)
{
	struct q3_server *s = r->srv;
	char *text = NULL;
	size_t len, nids;
	q3_err e;
	int rc;

	*forced = NULL;
	if (r->api.prompt_ids) {
		*ids = malloc(r->api.nprompt_ids * sizeof(**ids));
		if (!*ids)
			return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
		memcpy(*ids, r->api.prompt_ids, r->api.nprompt_ids * sizeof(**ids));
		*n = r->api.nprompt_ids;
		return 0;
	}
	if (r->api.kind == Q3_API_CHAT) {
		if ((rc = q3_chat_render(r->api.chat, &text, &len, &e)))
			return q3_api_errorf(err, 400, "invalid_request_error", "messages", "invalid_value", "%s",
					     e.msg);
		if ((rc = q3_tools_forced_prefix(&r->api, forced)) == 0 && *forced) {
			char *t = realloc(text, len + strlen(*forced) + 1);
			if (!t) {
				free(text);
				return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Out of memory.");
			}
			text = t;
			memcpy(text + len, *forced, strlen(*forced) + 1);
			len += strlen(*forced);
		}
		rc = q3_tok_encode(s->o.tok, text, len, ids, &nids, &e);
		free(text);
	} else {
		rc = q3_tok_encode(s->o.tok, r->api.prompt, r->api.prompt_len, ids, &nids, &e);
	}
	if (rc)
		return q3_api_errorf(err, 400, "invalid_request_error", r->api.kind == Q3_API_CHAT ? "messages" : "prompt",
				     "invalid_value", "%s", e.msg);
	*n = (int)nids;
	return 0;
}

/* ---- answers ------------------------------------------------------------------------------- */

static void usage_of(struct q3_job *j, int nprompt, struct q3_api_usage *u)
{
	u->prompt = nprompt;
	u->completion = j->ntokens;
	u->cached = j->cached;
}

/* Maps a job that ended without output to an error answer; 0 if it ended normally. */
static int job_error(struct q3_job *j, struct q3_api_error *err)
{
	if (j->finish == Q3_FINISH_ERROR)
		return q3_api_errorf(err, 500, "server_error", NULL, NULL, "Generation failed: %s", j->error);
	if (j->finish == Q3_FINISH_CANCELLED)
		return q3_api_errorf(err, 503, "server_error", NULL, "shutting_down",
				     "The server is shutting down; the request was not completed.");
	return 0;
}

static enum MHD_Result answer_whole(struct req *r)
{
	struct q3_job *j = r->job;
	struct q3_api_error err;
	struct q3_api_usage u;
	json_t *calls = NULL;

	for (;;) {
		pthread_mutex_lock(&j->mu);
		bool done = j->done;
		size_t len = j->len;
		pthread_mutex_unlock(&j->mu);
		if (done)
			break;
		q3_job_wait(j, len, WAIT_SLICE);
		if (client_gone(r->conn)) {
			atomic_store(&j->cancel, true);
			r->status = 499; /* nginx's "client closed request", for the metrics */
			return MHD_NO;
		}
	}
	if (job_error(j, &err))
		return respond_error(r, &err);
	/* done: the worker no longer writes to the job */
	const char *text = j->text;
	size_t len = j->len;
	char *content = NULL;
	size_t clen = 0;
	if (r->tools) {
		q3_tools_feed(r->tools, text, len);
		q3_tools_finish(r->tools, &content, &clen, &calls);
		text = content;
		len = clen;
	}
	usage_of(j, r->nprompt, &u);
	char *body = q3_api_response_json(&r->resp, text, len, calls,
					  q3_api_finish_reason(j->finish, calls && json_array_size(calls)), &u);
	free(content);
	json_decref(calls);
	return respond(r, 200, "application/json", body);
}

/* Appends to r->out the events for the job's new text, and for its end.  Returns -ENOMEM. */
static int stream_produce(struct req *r, bool done)
{
	struct q3_job *j = r->job;
	char **o = &r->out;
	size_t *ol = &r->out_len, *oc = &r->out_cap;
	int rc = 0;

	if (r->api.kind == Q3_API_CHAT && !r->role_sent) {
		rc = q3_api_chunk_sse(&r->resp, o, ol, oc, json_pack("{s:s, s:s}", "role", "assistant", "content", ""),
				      NULL, 0, NULL);
		r->role_sent = true;
	}
	pthread_mutex_lock(&j->mu);
	const char *text = j->text + r->seen;
	size_t n = j->len - r->seen;
	/* the worker appends only; bytes before len never move while we hold the lock */
	if (n && !rc) {
		if (r->api.kind == Q3_API_COMPLETION)
			rc = q3_api_chunk_sse(&r->resp, o, ol, oc, NULL, text, n, NULL);
		else if (r->tools)
			rc = q3_tools_stream(r->tools, &r->resp, text, n, o, ol, oc);
		else
			rc = q3_api_chunk_sse(&r->resp, o, ol, oc, json_pack("{s:s%}", "content", text, n), NULL, 0,
					      NULL);
	}
	r->seen = j->len;
	pthread_mutex_unlock(&j->mu);
	if (rc || !done)
		return rc;

	struct q3_api_error err;
	if (job_error(j, &err)) {
		char *e = q3_api_error_json(&err);
		rc = !e ? -ENOMEM : q3_api_buf_add(o, ol, oc, "data: ", 6) ?: q3_api_buf_add(o, ol, oc, e, strlen(e))
			?: q3_api_buf_add(o, ol, oc, "\n\n", 2);
		free(e);
	} else {
		bool calls = false;
		if (r->tools)
			rc = q3_tools_stream_end(r->tools, &r->resp, o, ol, oc, &calls);
		const char *fin = q3_api_finish_reason(j->finish, calls);
		if (!rc)
			rc = r->api.kind == Q3_API_CHAT ? q3_api_chunk_sse(&r->resp, o, ol, oc, NULL, NULL, 0, fin)
							: q3_api_chunk_sse(&r->resp, o, ol, oc, NULL, "", 0, fin);
		if (!rc && r->api.include_usage) {
			struct q3_api_usage u;
			usage_of(j, r->nprompt, &u);
			rc = q3_api_usage_sse(&r->resp, o, ol, oc, &u);
		}
	}
	if (!rc)
		rc = q3_api_buf_add(o, ol, oc, "data: [DONE]\n\n", 14);
	r->ended = true;
	return rc;
}

/* MHD's content reader for SSE: blocks (this is the connection's own thread) until there is
 * something to send, the job ends, or the client goes away. */
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
	struct req *r = cls;

	while (r->out_off == r->out_len) {
		r->out_off = r->out_len = 0;
		if (r->ended)
			return MHD_CONTENT_READER_END_OF_STREAM;
		pthread_mutex_lock(&r->job->mu);
		bool done = r->job->done;
		bool more = r->job->len > r->seen;
		pthread_mutex_unlock(&r->job->mu);
		if (done || more || !r->role_sent) {
			if (stream_produce(r, done))
				return MHD_CONTENT_READER_END_WITH_ERROR;
			continue;
		}
		if (client_gone(r->conn)) {
			atomic_store(&r->job->cancel, true);
			r->status = 499;
			return MHD_CONTENT_READER_END_WITH_ERROR;
		}
		if (q3_now() - r->last_out > Q3_MIN(KEEPALIVE_S, r->srv->o.conn_timeout / 3.0)) {
			if (q3_api_buf_add(&r->out, &r->out_len, &r->out_cap, ": keepalive\n\n", 13))
				return MHD_CONTENT_READER_END_WITH_ERROR;
			break;
		}
		q3_job_wait(r->job, r->seen, WAIT_SLICE);
	}
	size_t n = Q3_MIN(max, r->out_len - r->out_off);
	memcpy(buf, r->out + r->out_off, n);
	r->out_off += n;
	r->last_out = q3_now();
	return (ssize_t)n;
}

static enum MHD_Result answer_stream(struct req *r)
{
	struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, r, NULL);
	enum MHD_Result ret;

	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
	r->status = 200;
	r->last_out = q3_now();
	ret = MHD_queue_response(r->conn, 200, resp);
	MHD_destroy_response(resp);
	return ret;
}

static enum MHD_Result generate(struct req *r)
{
	struct q3_server *s = r->srv;
	struct q3_api_error err;
	int32_t *ids = NULL;
	char *forced = NULL;
	int n = 0, rc;

	if (atomic_load(&s->draining))
		return fail(r, 503, "server_error", "shutting_down", "The server is shutting down.");
	if (q3_api_parse(r->ep == Q3_EP_CHAT ? Q3_API_CHAT : Q3_API_COMPLETION, r->body, r->len, &s->o.defaults,
			 s->o.vocab, &r->api, &err))
		return respond_error(r, &err);
	r->parsed = true;
	if (build_prompt(r, &ids, &n, &forced, &err))
		return respond_error(r, &err);

	int max_prompt = r->lim.max_prompt_tokens > 0 ? r->lim.max_prompt_tokens : s->o.max_ctx - 1;
	max_prompt = Q3_MIN(max_prompt, s->o.max_ctx - 1);
	if (n > max_prompt || (r->api.max_tokens && n + r->api.max_tokens > s->o.max_ctx)) {
		q3_api_errorf(&err, 400, "invalid_request_error", r->api.kind == Q3_API_CHAT ? "messages" : "prompt",
			      "context_length_exceeded",
			      "This model's maximum context length is %d tokens and prompts may have at most %d. "
			      "However, you requested %d tokens (%d in the prompt, %d for the completion).",
			      s->o.max_ctx, max_prompt, n + r->api.max_tokens, n, r->api.max_tokens);
		free(ids);
		free(forced);
		return respond_error(r, &err);
	}
	if (!r->api.has_seed && getrandom(&r->api.samp.seed, sizeof(r->api.samp.seed), 0) < 0)
		r->api.samp.seed = (uint64_t)(q3_now() * 1e9);
	int max_tokens = r->api.max_tokens ? r->api.max_tokens : s->o.max_ctx - n;
	r->job = q3_job_new(ids, n, &r->api.samp, max_tokens, r->api.stop, r->api.nstop);
	free(ids);
	r->nprompt = n;
	if (r->api.tools && !(r->tools = q3_tools_new(&r->api, forced)))
		rc = -ENOMEM;
	else
		rc = r->job ? q3_worker_submit(s->o.worker, r->job) : -ENOMEM;
	free(forced);
	if (rc == -EAGAIN)
		return fail(r, 503, "server_error", "overloaded",
			    "The server is busy (too many requests queued); retry later.");
	if (rc == -ESHUTDOWN)
		return fail(r, 503, "server_error", "shutting_down", "The server is shutting down.");
	if (rc)
		return fail(r, 500, "server_error", NULL, "Out of memory.");
	q3_api_resp_init(&r->resp, r->api.kind, s->o.model_id);
	return r->api.stream ? answer_stream(r) : answer_whole(r);
}

/* ---- the MHD callbacks --------------------------------------------------------------------- */

static enum MHD_Result too_big(struct req *r)
{
	char msg[128];
	snprintf(msg, sizeof(msg), "The request body is larger than the %zu bytes allowed.", r->lim.max_body);
	return fail(r, 413, "invalid_request_error", "request_too_large", msg);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
				  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
	struct q3_server *s = cls;
	struct req *r = *con_cls;

	if (!r) {
		if (!(r = calloc(1, sizeof(*r))))
			return MHD_NO;
		*con_cls = r;
		r->srv = s;
		r->conn = conn;
		r->t0 = q3_now();
		r->ep = route(url);
		pthread_mutex_lock(&s->mu);
		r->lim = s->lim;
		pthread_mutex_unlock(&s->mu);
		atomic_fetch_add(&s->inflight, 1);
		r->counted = true;

		bool post = !strcmp(method, MHD_HTTP_METHOD_POST), get = !strcmp(method, MHD_HTTP_METHOD_GET);
		bool gen = r->ep == Q3_EP_CHAT || r->ep == Q3_EP_COMPLETIONS;
		if (r->ep == Q3_EP_OTHER)
			return fail(r, 404, "not_found_error", "unknown_url", "Unknown URL; the API serves /v1/chat/completions, "
				    "/v1/completions, /v1/models, /health and /metrics.");
		if ((gen && !post) || (!gen && !get))
			return fail(r, 405, "invalid_request_error", "method_not_allowed", "Method not allowed for this URL.");
		if (r->ep == Q3_EP_HEALTH)
			return get_health(r);
		if (!authorized(r))
			return fail(r, 401, "authentication_error", "invalid_api_key",
				    "Missing or wrong API key (send 'Authorization: Bearer KEY').");
		if (r->ep == Q3_EP_MODELS)
			return respond(r, 200, "application/json", q3_api_models_json(s->o.model_id, s->started));
		if (r->ep == Q3_EP_METRICS)
			return respond(r, 200, "text/plain; version=0.0.4", q3_metrics_render(s->o.metrics));
		const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
		if (cl && strtoull(cl, NULL, 10) > r->lim.max_body) /* answered before the body is read */
			return too_big(r);
		return MHD_YES;
	}
	if (*upload_size) {
		size_t n = *upload_size;
		*upload_size = 0;
		if (r->status) /* answered already: the rest of the body is discarded */
			return MHD_YES;
		if (q3_now() - r->t0 > r->lim.request_timeout) {
			/* libmicrohttpd cannot answer before the body is complete, and this client may
			 * never complete it: drop the connection (counted as a 408) */
			r->status = 408;
			return MHD_NO;
		}
		if (r->too_big || r->len + n > r->lim.max_body) {
			r->too_big = true;
			r->len += n; /* counted, not kept; a client that goes on far past the limit is dropped */
			if (r->len > 4 * r->lim.max_body) {
				r->status = 413;
				return MHD_NO;
			}
		} else if (q3_api_buf_add(&r->body, &r->len, &r->cap, upload, n))
			return MHD_NO;
		return MHD_YES;
	}
	if (r->status) /* answered already (a GET, or an error on the first call) */
		return MHD_YES;
	if (r->too_big)
		return too_big(r);
	if (!r->body)
		return fail(r, 400, "invalid_request_error", "invalid_json", "The request body is empty.");
	return generate(r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe)
{
	struct q3_server *s = cls;
	struct req *r = *con_cls;

	if (!r)
		return;
	if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && r->status == 200)
		r->status = 499;
	if (r->job) { /* one line per generation: the access log */
		atomic_store(&r->job->cancel, true); /* no-op if done; stops it if the client left */
		pthread_mutex_lock(&r->job->mu);
		int cached = r->job->cached, ntok = r->job->ntokens;
		pthread_mutex_unlock(&r->job->mu);
		q3_job_put(r->job); /* last: this may free the job */
		q3_info("%s %d %.3fs prompt %d (cached %d) completion %d%s", r->ep == Q3_EP_CHAT ? "chat" : "completion",
			r->status, q3_now() - r->t0, r->nprompt, cached, ntok, r->api.stream ? " stream" : "");
	}
	else if (r->status >= 400)
		q3_info("%s %d", r->ep == Q3_EP_OTHER ? "?" : r->ep == Q3_EP_CHAT ? "chat" : r->ep == Q3_EP_COMPLETIONS ? "completion" : "get", r->status);
	if (s->o.metrics)
		q3_metrics_request(s->o.metrics, r->ep, r->status);
	if (r->tools)
		q3_tools_free(r->tools);
	if (r->parsed)
		q3_api_req_free(&r->api);
	if (r->counted)
		atomic_fetch_sub(&s->inflight, 1);
	free(r->body);
	free(r->out);
	free(r);
	*con_cls = NULL;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_ctx, enum MHD_ConnectionNotificationCode code)
{
	struct q3_server *s = cls;
	if (s->o.metrics)
		atomic_fetch_add(&s->o.metrics->connections, code == MHD_CONNECTION_NOTIFY_STARTED ? 1 : -1);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	char line[512];
	vsnprintf(line, sizeof(line), fmt, ap);
	line[strcspn(line, "\n")] = 0;
	q3_debug("http: %s", line);
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

int q3_listen(const char *host, int port, int *fd, q3_err *e)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE };
	struct addrinfo *ai;
	char sport[16];
	int one = 1, rc, s;

	snprintf(sport, sizeof(sport), "%d", port);
	if ((rc = getaddrinfo(host, sport, &hints, &ai)))
		return q3_errf(e, -EINVAL, "host '%s': not an IP address (%s)", host, gai_strerror(rc));
	s = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		rc = -errno;
		freeaddrinfo(ai);
		return q3_errf(e, rc, "%s:%d: socket: %s", host, port, strerror(-rc));
	}
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, ai->ai_addr, ai->ai_addrlen) < 0 || listen(s, 128) < 0) {
		rc = -errno;
		freeaddrinfo(ai);
		close(s);
		return q3_errf(e, rc, "%s:%d: %s%s", host, port, strerror(-rc),
			       rc == -EADDRINUSE ? " (another server is listening there; pick one with --port)" :
			       rc == -EADDRNOTAVAIL ? " (no interface has this address)" :
			       rc == -EACCES ? " (ports below 1024 need privileges)" : "");
	}
	freeaddrinfo(ai);
	*fd = s;
	return 0;
}

int q3_server_start(const struct q3_server_opts *o, struct q3_server **out, q3_err *e)
{
	struct q3_server *s = calloc(1, sizeof(*s));

	if (!s)
		return q3_errf(e, -ENOMEM, "server: out of memory");
	s->o = *o;
	s->lim = o->lim;
	s->started = time(NULL);
	pthread_mutex_init(&s->mu, NULL);
	s->mhd = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC |
					  MHD_USE_ERROR_LOG | MHD_USE_POLL,
				  0, NULL, NULL, on_request, s,
				  MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s,
				  MHD_OPTION_LISTEN_SOCKET, o->listen_fd,
				  MHD_OPTION_CONNECTION_LIMIT, (unsigned)o->max_connections,
				  MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)o->conn_timeout,
				  MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
				  MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
				  MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
				  MHD_OPTION_END);
	if (!s->mhd) {
		pthread_mutex_destroy(&s->mu);
		free(s);
		return q3_errf(e, -EIO, "server: libmicrohttpd failed to start");
	}
	*out = s;
	return 0;
}

void q3_server_set_limits(struct q3_server *s, const struct q3_server_limits *lim)
{
	pthread_mutex_lock(&s->mu);
	s->lim = *lim;
	pthread_mutex_unlock(&s->mu);
}

void q3_server_drain(struct q3_server *s)
{
	if (atomic_exchange(&s->draining, true))
		return;
	MHD_socket fd = MHD_quiesce_daemon(s->mhd);
	if (fd != MHD_INVALID_SOCKET)
		close(fd);
}

int q3_server_inflight(struct q3_server *s)
{
	return atomic_load(&s->inflight);
}

void q3_server_stop(struct q3_server *s)
{
	if (!s)
		return;
	if (!atomic_load(&s->draining)) {
		MHD_socket fd = MHD_quiesce_daemon(s->mhd);
		if (fd != MHD_INVALID_SOCKET)
			close(fd);
	}
	MHD_stop_daemon(s->mhd);
	pthread_mutex_destroy(&s->mu);
	free(s);
}
