/* daemon.h - the running daemon: model, tokenizer, worker and HTTP server brought up from the
 * settings, signals handled until shutdown, and the state file `qwen3d status` reads.
 *
 * Startup order: the caller has bound the listening socket and holds the pid-file lock; this
 * loads the engine and tokenizer, reads generation_config.json (sampling defaults, eos ids),
 * starts the worker, then the HTTP server, writes RUN_DIR/qwen3d.json, and only then reports
 * ready, so "ready" means the model is loaded and the port answers.
 *
 * Signals (blocked in every thread, taken by sigwait in the main thread):
 *   SIGTERM, SIGINT  stop accepting, let in-flight requests finish (up to drain_timeout), exit 0;
 *   SIGHUP           re-read the config file and knobs; apply the reloadable settings, log the
 *                    others as needing a restart; rewrite the state file.
 */
#pragma once
#include "settings.h"
#include "util.h"

/* Called once the daemon is ready (msg: "serving MODEL on http://...") or has failed (msg: the
 * reason); ok tells which. */
typedef void (*q3_daemon_ready_fn)(void *ctx, bool ok, const char *msg);

/* Runs the daemon until a SIGTERM/SIGINT has drained it.  s: the resolved settings (the model
 * path absolute); flags: kept to re-resolve the settings on SIGHUP; listen_fd: the bound socket.
 * Returns the exit status. */
int q3_daemon_run(struct q3_settings *s, const struct q3_set_flags *flags, int listen_fd,
		  q3_daemon_ready_fn ready, void *ctx);

/* Bytes one saved conversation state takes (KV rows for max_ctx positions of every full-attention
 * layer, and the conv and recurrent states of the linear layers, fp32) - what sizes the cache. */
struct q3_config;
uint64_t q3_daemon_state_bytes(const struct q3_config *c, int max_ctx);
