/* knobs.h - the tuning knobs the qwen3mm module keeps in sysfs, read into a struct.
 *
 * The module holds them so that an administrator (or the udev rule) sets them once per boot;
 * qwen3d reads them at start and layers them: command-line flags > knobs > config > defaults.
 * This file only reads: q3_knobs_read() fills what is present and says which were, and checks
 * each value against the ranges in qwen3mm_uapi.h (the module enforces the same ones).
 */
#pragma once
#include <stdint.h>

#include "util.h"

#define Q3_KNOBS_DIR "/sys/kernel/qwen3mm/knobs"

enum q3_cache_policy { Q3_CACHE_LRU, Q3_CACHE_LFU, Q3_CACHE_STATIC, Q3_CACHE_NR_POLICIES };

/* q3_knobs.present bits */
#define Q3_KNOB_READ_CHUNK_KB (1u << 0)
#define Q3_KNOB_QUEUE_DEPTH (1u << 1)
#define Q3_KNOB_VRAM_BUDGET_MB (1u << 2)
#define Q3_KNOB_EXPERT_CACHE_POLICY (1u << 3)
#define Q3_KNOB_CPU_EXPERT_THREADS (1u << 4)
#define Q3_KNOB_ALL 0x1fu

struct q3_knobs {
	uint32_t read_chunk_kb;      /* io_uring read size, KiB, a power of two */
	uint32_t queue_depth;        /* reads in flight */
	uint32_t vram_budget_mb;     /* VRAM qwen3d may use; 0 = decide from free VRAM */
	enum q3_cache_policy expert_cache_policy;
	uint32_t cpu_expert_threads; /* 0 = auto */
	unsigned present;            /* Q3_KNOB_* bits of the values that came from the files */
};

/* The module's defaults (qwen3mm_uapi.h), present = 0. */
void q3_knobs_defaults(struct q3_knobs *k);

/* Sets k to the defaults, then reads each knob file under dir (NULL: Q3_KNOBS_DIR).  A missing
 * directory or file is not an error: those knobs keep their defaults and their present bit
 * stays clear.  A file that exists but holds garbage or an out-of-range value is: -EINVAL with
 * the file named, and k keeps the defaults for it. */
int q3_knobs_read(const char *dir, struct q3_knobs *k, q3_err *e);

/* "lru", "lfu", "static"; "?" for anything else. */
const char *q3_cache_policy_name(enum q3_cache_policy p);
/* The policy marked [like this] in "lru [lfu] static" (what sysfs shows), or a bare name;
 * -1 if neither. */
int q3_cache_policy_parse(const char *s);
