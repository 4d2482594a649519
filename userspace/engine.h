/* engine.h - the narrow boundary between the model and everything else (CLI, server, benches).
 *
 * An engine is a loaded model on one backend (cpu or cuda).  A session is one timeline: its
 * position, the KV cache of the full-attention layers, and the conv and recurrent states of the
 * Gated DeltaNet layers.  Sessions are created and freed by the caller; every buffer a session
 * needs is allocated when it is created (setup allocates, the hot path only computes).
 *
 * Threading: one thread owns an engine and all of its sessions (the server's inference worker).
 * None of these calls may be made concurrently on the same engine.
 *
 * Callers never see tensors, devices or kernels: only token ids, logits and sampled tokens.
 * Errors: 0 or -errno, with a one-line reason in *e.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "util.h"

struct q3_engine;
struct q3_session;

struct q3_engine_opts {
	const char *model_dir;
	const char *backend;   /* "cpu", "cuda" or "auto" (NULL = auto: cuda when usable) */
	int threads;	       /* CPU threads, 0 = all online CPUs */
	int max_ctx;	       /* positions per session (KV capacity); 0 = 4096 */
	int max_batch;	       /* sessions decoded in one step; 0 = 16 */
	uint64_t vram_budget;  /* bytes of VRAM the weights may use; 0 = automatic */
	uint32_t read_chunk;   /* bytes per checkpoint read (a multiple of 4 KiB); 0 = 8 MiB */
	int queue_depth;       /* checkpoint reads in flight; 0 = 32 */
	/* routed experts beyond the VRAM budget (issue 8; the CUDA backend) */
	int expert_threads;	  /* CPU threads computing the experts kept in RAM; 0 = automatic */
	const char *expert_cache; /* "lru", "lfu" or "static" (NULL = lru): how the cache re-balances */
	const char *expert_stats; /* file keeping the expert statistics across restarts; NULL = none */
	bool quiet;	       /* no progress output on stderr */
};

/* Loads and validates the model folder and prepares the backend. */
int q3_engine_open(const struct q3_engine_opts *o, struct q3_engine **out, q3_err *e);
void q3_engine_close(struct q3_engine *eng);

const struct q3_config *q3_engine_config(const struct q3_engine *eng);
const char *q3_engine_backend(const struct q3_engine *eng); /* "cpu", "cuda" */
int q3_engine_max_ctx(const struct q3_engine *eng);
int q3_engine_max_batch(const struct q3_engine *eng);

/* Where the weights live and how the routed experts are served (issue 8), for `qwen3d status`
 * and /metrics.  Counters are totals since open; zeros where the backend has nothing to say
 * (the CPU backend, or every expert in VRAM). */
struct q3_engine_stats {
	bool offload;		  /* some routed experts live in host RAM */
	int experts_vram, experts_total;
	uint64_t vram_budget;	  /* bytes of VRAM for weights in force */
	uint64_t pairs_vram;	  /* routed (token, expert) pairs served from VRAM */
	uint64_t pairs_cpu;	  /* ... computed by the CPU (decode) or streamed in (prefill) */
	uint64_t pairs_pcie;	  /* ... computed by the GPU reading host memory over PCIe (decode) */
	int pcie_experts;	  /* missing experts of a decode token the GPU reads so, at most (0: none) */
	int pcie_experts_now;	  /* ... in the last single-row call (tuned between 0 and that) */
	uint64_t pcie_bytes;	  /* offload traffic: handoffs and streamed experts */
	uint64_t tokens;	  /* rows that went through the offload path */
	uint64_t draws_backend;	  /* tokens q3_engine_decode_sample drew on the backend (device) */
	uint64_t draws_host;	  /* ... and on the host, from the logits */
	uint64_t cpu_expert_bytes; /* expert weights the CPU expert threads read */
	double cpu_expert_busy_s;  /* their busy time: bytes / busy = CPU expert GB/s */
	double cpu_expert_phase_s[3]; /* the busy time by phase: activations, gate / up, down */
	uint64_t prefill_layers;      /* prefill layer calls that streamed experts in, and their GPU */
	double prefill_phase_s[5];    /* time: resident pass, waiting for copies, repacking, streamed
				       * passes; then the copy engine's busy time */
	double prefill_copy_alone_gbps; /* those copies' rate with nothing beside them (0: unknown) */
	int cpu_threads, cpu_node;
	char cpu_isa[16];
};

/* Fills s.  Same thread as every other call on the engine. */
void q3_engine_stats(const struct q3_engine *eng, struct q3_engine_stats *s);

/* How the weights were read (fixed once open: any thread may ask). */
struct q3_engine_load {
	uint64_t bytes;	 /* tensor bytes */
	double seconds;	 /* the whole load */
	char path[256];	 /* how they were read, one line (loader.h) */
	char mem[320];	 /* the host memory holding them: provider, node, page size */
};
void q3_engine_load_info(const struct q3_engine *eng, struct q3_engine_load *l);

/* Between requests (the server's worker when its queue is empty): lets the backend re-balance
 * its caches, e.g. move the routed experts used most lately into VRAM, a bounded step (a few
 * milliseconds) at a time.  1: it did something, call again while idle; 0: nothing left to do
 * until more tokens were computed; -errno. */
int q3_engine_idle(struct q3_engine *eng, q3_err *e);

/* A new, empty timeline (position 0). */
int q3_session_new(struct q3_engine *eng, struct q3_session **out, q3_err *e);
void q3_session_free(struct q3_session *s);
/* Number of tokens the session has consumed. */
int q3_session_pos(const struct q3_session *s);
/* Back to position 0 (no allocation). */
void q3_session_reset(struct q3_session *s);
/* Makes dst an exact copy of src's state (both from the same engine): KV rows up to the
 * position, conv and recurrent states.  The server snapshots a conversation with this and
 * restores it when a later request extends the same prompt. */
int q3_session_copy(struct q3_session *dst, const struct q3_session *src, q3_err *e);

/* Flags for q3_session_eval. */
#define Q3_EVAL_ALL_LOGITS 1u /* logits for every fed position ([n][V]); else only the last ([V]) */

/* Feeds n >= 1 tokens on top of the session's state (prefill, or a continued prefill: the same
 * logits as one single prefill of the whole prompt).  logits may be NULL.  Fails with -ENOSPC
 * when the session would pass max_ctx, -EINVAL for ids outside the vocabulary; the session is
 * unchanged on those failures (checked before anything runs).  Should the backend itself fail
 * mid-way (a device error), the session is reset to position 0.  Prompts of any length are fed
 * in backend-sized pieces; the caller need not split them. */
int q3_session_eval(struct q3_session *s, const int32_t *ids, int n, float *logits, unsigned flags,
		    q3_err *e);

/* One decode step for n sessions together (n <= max_batch, all distinct): feeds ids[i] to ss[i]
 * and writes logits[i][V] (if logits is not NULL).  Each session's logits are those it would get
 * decoding alone.  Errors as q3_session_eval (checked before anything runs). */
int q3_engine_decode(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n,
		     float *logits, q3_err *e);
/* One decode step for n sessions that also draws each one's next token: out[i] = what
 * q3_sampler_sample(smp[i], logits of ss[i]) would return (the id, or -EDOM), smp[i]'s step
 * advanced the same way.  Where the backend samples on the device (CUDA) only the ids come back;
 * otherwise (or for a step whose adjustments do not fit, see q3_sampler_plan) the logits come to
 * the host and are sampled there.  QWEN3D_HOST_SAMPLING=1 forces the host. */
struct q3_sampler;
int q3_engine_decode_sample(struct q3_engine *eng, struct q3_session **ss, const int32_t *ids, int n,
			    struct q3_sampler **smp, int32_t *out, q3_err *e);
