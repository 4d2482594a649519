/* server.h - the HTTP side of the daemon: libmicrohttpd, one thread per connection.
 *
 * Routes:  POST /v1/chat/completions, POST /v1/completions (JSON or SSE when "stream": true),
 *          GET /v1/models, GET /health (no key needed), GET /metrics (Prometheus text).
 * A connection thread reads the body (up to max_body, within request_timeout), validates it
 * (api_request.h), renders the chat template, tokenizes, submits a job to the worker and then
 * waits on the job: for a streaming request it turns new text into SSE chunks as it comes, else
 * it builds one response at the end.  While waiting it watches the socket, and a client that
 * hangs up cancels its job.  Tool calls in the output are parsed into OpenAI tool_calls.
 *
 * Security: binds where the caller's socket is bound (127.0.0.1 by default), optional API key
 * (Authorization: Bearer), limits on body size, prompt tokens, connections, silent connections
 * (conn_timeout) and slow uploads (request_timeout: the connection is dropped, since
 * libmicrohttpd cannot answer before the body is complete).
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sampler.h"
#include "util.h"

struct q3_tok;
struct q3_worker;
struct q3_metrics;
struct q3_server;

/* The limits that SIGHUP may change. */
struct q3_server_limits {
	size_t max_body;
	int max_prompt_tokens; /* 0: max_ctx - 1 */
	int request_timeout;   /* seconds */
	char api_key[256];     /* "" = no key */
};

struct q3_server_opts {
	int listen_fd;		   /* bound and listening; the server takes it */
	struct q3_worker *worker;
	const struct q3_tok *tok;
	struct q3_metrics *metrics;
	const char *model_id;	   /* the name /v1/models lists */
	struct q3_sampling defaults; /* generation_config.json */
	int vocab;		   /* model vocabulary (prompt ids are checked against it) */
	int max_ctx;
	int max_connections;
	int conn_timeout;	   /* seconds a connection may stay silent */
	struct q3_server_limits lim;
};

int q3_server_start(const struct q3_server_opts *o, struct q3_server **out, q3_err *e);
void q3_server_set_limits(struct q3_server *s, const struct q3_server_limits *lim);
/* Stops accepting connections and refuses new requests with 503 (SIGTERM's first step). */
void q3_server_drain(struct q3_server *s);
/* Requests being answered now. */
int q3_server_inflight(struct q3_server *s);
void q3_server_stop(struct q3_server *s);

/* Creates a listening TCP socket on host:port (SO_REUSEADDR).  A busy port or bad address gives
 * one line: "127.0.0.1:8000: address already in use (another server is listening there)". */
int q3_listen(const char *host, int port, int *fd, q3_err *e);
