/* cuda_offload.cu - routed experts beyond VRAM for the CUDA backend: the plan, the CPU side, the
 * decode handoff kernels and the prefill streaming (see cuda_offload.h).
 *
 * Handoff memory is pinned and mapped into the device's address space: five words (gate, done,
 * the call's base sequence number, an error word, the GPU's PCIe share in this call) and the
 * routing / activation / output rows of one layer.  Layer l of a call has the sequence number
 * seq0 + l + 1; the GPU stores it into `gate` after writing the rows, the CPU threads store it
 * into `done` after their output, and both
 * sides compare as wrapping 32-bit numbers.  The GPU's wait gives up after QWEN3D_OFFLOAD_TIMEOUT
 * seconds (default 10) and traps: the context is lost, the process must restart, as for any
 * device fault.
 */
#include <atomic>
#include <numa.h>
#include <numaif.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_offload.h"
#include "gpu_internal.h"

extern "C" {
#include "cpu_expert.h"
#include "cpu_moe.h"
#include "expert_stats.h"
#include "knobs.h"
#include "model.h"
#include "checkpoint.h"
#include "placement.h"
#include "topology.h"
#include "tune.h"
#include "xpool.h"
}

#define OFF_STAGE Q3G_RAW_BATCH /* experts per prefill staging batch */
#define OFF_RAW_DEFAULT 4	/* raw staging buffers (QWEN3D_OFFLOAD_STAGE_RAW: 2 .. OFF_MAX_RAW) */
#define OFF_MAX_RAW 16
/* rows x top-k at or above this many times the experts: every expert is used (all but e^-8 of
 * them), so a prefill call streams all missing experts without waiting for the routing */
#define OFF_ALL_USED 8
/* missing experts of a decode token the GPU reads from host memory over PCIe while the CPU
 * computes the rest (QWEN3D_OFFLOAD_PCIE_EXPERTS, 0 .. Q3G_HX_MAX; 0: the CPU computes all) */
#define OFF_HX_DEFAULT 2
/* without the setting, the decode calls themselves pick 0 .. OFF_HX_DEFAULT (tune.h): trials of
 * OFF_TUNE_PER single-row calls a setting, again every OFF_TUNE_RECHECK calls */
#define OFF_TUNE_PER 8
#define OFF_TUNE_RECHECK 4096
/* ... and only when the CPU keeps at least this many: under a PCIe read of ~55 us (one expert,
 * measured on the H200 machine) the CPU's ~25 us an expert (after ~10 us of start) beats the link
 * for one or two experts.  With Zipf-1.0 routing (1.4 missing experts a token) taking one of
 * them anyway cost 10%: 157-159 tok/s against 176. */
#define OFF_HX_KEEP 2
/* tokens: the expert statistics' memory, by cache policy.  lru follows what the last requests
 * used; lfu the long-run frequency; static keeps the placement made at start (no re-balancing). */
#define OFF_HALF_LIFE_LRU 20000.0
#define OFF_HALF_LIFE_LFU 200000.0

struct hand {
	volatile uint32_t gate, done, seq0, err;
	volatile uint32_t hx_g; /* the GPU's picks a token in this call (publish copies it to the device) */
};

struct off_layer {
	int nslots;		/* stack size (>= 1) */
	int *slot_expert;	/* [nslots] expert id, -1 spare */
	int16_t *slot_of_h;	/* [E] slot or -1 */
	int16_t *slot_of_d;	/* device copy */
	const struct q3_xexpert **table; /* [E] the CPU's experts (NULL: in VRAM) */
	int ncpu;
};

/* Where a prefill layer's time goes, from events on the two streams: the resident pass (with the
 * routing's copy to the host), waiting for copies, repacking, the streamed passes, and the copy
 * engine's busy time.  Two sets of events: a call reads the previous call's, complete once this
 * call's routing has reached the host (everything before it on both streams has run). */
enum { PF_RESIDENT, PF_WAIT, PF_REPACK, PF_STREAMED, PF_COPY, PF_N };
struct off_prof {
	int nev;		/* events a set: 2 + 5 per batch */
	cudaEvent_t *ev[2];
	int pending[2];		/* batches recorded in set s, -1: nothing to read */
	int cur;
	double s[PF_N];
	uint64_t calls;
};

/* Prefill streaming: the copy stream lands a batch's raw GPTQ bytes in one of a ring of raw
 * buffers (several: copies run ahead of the compute, across layers); the compute stream repacks
 * them into one of two sets of stacks and runs the pass over them. */
struct stage_raw {
	void *raw;		/* raw GPTQ bytes of OFF_STAGE experts, raw_bytes each */
	cudaEvent_t copied, free_ev;
};

struct stage_pack {
	struct q3g_mat gate, up, down;
	void *mat_mem;		/* the three stacks */
};

struct q3_offload {
	const struct q3_model *m;
	int L, E, k, H, I, max_rows;
	bool active, perms;
	uint64_t budget, expert_bytes;
	struct off_layer *layers;
	struct q3_xexpert *views; /* [L][E] */
	void *blobs;
	size_t blobs_bytes;
	/* CPU */
	struct q3_xpool *pool;
	struct q3_cpu_moe *moe;
	enum q3_xisa isa;
	int node, nthreads;
	struct q3_xstats *xs;
	int cache; /* enum q3_cache_policy */
	char stats_path[1024];
	/* handoff (mapped pinned) */
	struct hand *hw, *hw_d;
	int32_t *idx_h, *idx_hd;	/* host, and the device's view (mapped) */
	float *w_h, *w_hd, *out_h, *out_d;
	uint16_t *xb_h, *xb_hd;
	uint32_t next_seq;
	int R, rows_real, armed;
	double timeout_s;
	/* prefill */
	struct stage_raw raw[OFF_MAX_RAW];
	struct stage_pack pack[2];
	int nraw;		/* raw buffers in the ring */
	unsigned raw_next;	/* the ring's next buffer (it runs on across calls) */
	size_t raw_bytes;	/* a slot of a raw buffer */
	cudaEvent_t idx_ev;	/* the routing's copy to the host has landed */
	unsigned calls;		/* prefill calls that streamed (parity: which half of maps_h) */
	cudaStream_t copy_st;
	struct q3g_stage upstage; /* act-order experts: q3g_mat_upload's staging */
	int32_t *pidx_h;	/* pinned [pf_rows][k + 1] routing of a prefill call */
	int pf_rows;
	int16_t *maps_h, *maps_d; /* [2][E / OFF_STAGE + 2][E] (device: one half) expert -> staging
				   * slot per batch; two halves: a call may fill one while the previous
				   * call's copies from the other are still queued */
	struct off_prof *prof;	  /* a pointer: q3_off_stats reads it through a const offload */
	/* the checkpoint's mappings registered with CUDA (pinned: full-speed prefill copies) */
	void **pinned;
	int npinned;
	struct pin_range *pr;	/* the ranges, sorted, with the device's view of each */
	int npr;
	/* decode: of a row's missing experts the GPU reads up to hx_max over PCIe (gpu_moe_host.cu);
	 * hx_cur in this call, picked by the tuner unless the setting fixed it */
	int hx_max, hx_cur;
	bool hx_auto;
	struct q3_tune tune;
	double call_t0;
	int *hx_g_d;		/* device copy of hw->hx_g, for the kernels */
	struct q3g_hexpert *hx_tab_d; /* [L][E] */
	struct q3g_hfmt hx_fmt;
	float *hx_ws, *hx_out;	/* scratch, and the share's output [H] (single rows) */
	cudaStream_t hx_st;	/* the side stream they run on, forked and joined by events */
	cudaEvent_t hx_fork, hx_done;
	uint64_t hx_bytes;	/* raw bytes of an expert */
	const int *dec_idx;	/* the backend's routing and activations (device), from publish */
	const float *dec_w;
	const uint16_t *dec_xb;
	/* counters */
	uint64_t pairs_gpu, pairs_cpu, pcie, uploads, tokens;
	double copy_alone_gbps; /* copy_probe's */
};

/* ---- kernels ------------------------------------------------------------------------------------ */

/* expert id -> stack slot; experts not there -> Q3G_SKIP; the shared expert (-1) kept, or
 * skipped when skip_shared */
static __device__ __forceinline__ int remap_one(int ex, const int16_t *slot_of, bool skip_shared)
{
	if (ex < 0)
		return skip_shared ? Q3G_SKIP : ex;
	return slot_of[ex] >= 0 ? slot_of[ex] : Q3G_SKIP;
}

__global__ void off_remap_kernel(int *sidx, const int *idx, const int16_t *slot_of, int P, bool skip_shared)
{
	int p = blockIdx.x * blockDim.x + threadIdx.x;

	if (p < P)
		sidx[p] = remap_one(idx[p], slot_of, skip_shared);
}

/* A decode layer's handoff, one block: the routing (P entries) and the fp16 activations (nx
 * 32-bit words) into mapped host memory, the slots of the routing for the GPU's experts, then,
 * once every thread's stores are out (fence, barrier), the gate for the CPU threads.  One launch
 * where three copies, a signal and the remap were five graph nodes in a row. */
__global__ void off_publish_kernel(struct hand *hw, uint32_t layer, int32_t *idx_h, float *w_h, uint32_t *xb_h,
				   const int *idx, const float *w, const uint32_t *xb, int P, int nx, int *sidx,
				   const int16_t *slot_of, int *hx_g)
{
	if (hx_g && threadIdx.x == 0)
		*hx_g = (int)hw->hx_g;
	for (int p = threadIdx.x; p < P; p += blockDim.x) {
		int ex = idx[p];

		idx_h[p] = ex;
		w_h[p] = w[p];
		sidx[p] = remap_one(ex, slot_of, false);
	}
	for (int i = threadIdx.x; i < nx; i += blockDim.x)
		xb_h[i] = xb[i];
	__threadfence_system();
	__syncthreads();
	if (threadIdx.x == 0) {
		hw->gate = hw->seq0 + layer + 1;
		__threadfence_system();
	}
}

/* h[i] += out[i] (+ hx[i]) once the CPU threads' done word says their part is in out (host memory,
 * read over PCIe); hx: the GPU's share read over PCIe (NULL: none).  Thread 0 of each block polls
 * (timeout: trap, the context is lost). */
__global__ void off_join_kernel(float *h, const float *out, const float *hx, int n, struct hand *hw, uint32_t layer,
				long long timeout_cycles)
{
	if (threadIdx.x == 0) {
		uint32_t want = hw->seq0 + layer + 1;
		long long t0 = clock64();

		while ((int32_t)(hw->done - want) < 0) {
			if (clock64() - t0 > timeout_cycles) {
				hw->err = want;
				__threadfence_system();
				__trap();
			}
			__nanosleep(100);
		}
		__threadfence_system();
	}
	__syncthreads();
	for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
		h[i] += hx ? out[i] + hx[i] : out[i];
}

/* ---- open / close ------------------------------------------------------------------------------- */

static double gib(uint64_t b)
{
	return (double)b / (double)(1ull << 30);
}

/* The CPU threads: the cores of the GPU's node (all cores when unknown) but the first, which the
 * engine's own threads use. */
static int cpu_pool(struct q3_offload *off, const struct q3_off_opts *o, q3_err *e)
{
	struct q3_topo *t = NULL;
	struct q3_locality loc;
	int cpus[4096], n = 0;
	q3_err e2;

	off->node = -1;
	if (q3_topo_load(NULL, &t, &e2) == 0) {
		if (o->gpu_busid && q3_topo_pci_locality(t, o->gpu_busid, &loc, &e2) == 0)
			off->node = loc.node;
		n = q3_place_cpus(t, off->node, 1, cpus, 4096);
		q3_topo_free(t);
	}
	if (n <= 0) {
		n = Q3_MAX(1, q3_ncpu() - 1);
		for (int i = 0; i < n; i++)
			cpus[i] = i + (q3_ncpu() > 1 ? 1 : 0);
	}
	off->nthreads = o->threads > 0 ? Q3_MIN(o->threads, n) : n;
	struct q3_xpool_opts po = { off->nthreads, cpus, n, 0, 0 };

	off->isa = q3_xisa_best();
	return q3_xpool_new(&po, &off->pool, e);
}

static int cpu_moe(struct q3_offload *off, q3_err *e)
{
	struct q3_cpu_moe_opts mo;

	memset(&mo, 0, sizeof(mo));
	mo.H = off->H;
	mo.I = off->I;
	mo.num_experts = off->E;
	mo.top_k = off->k;
	mo.max_tokens = off->max_rows;
	mo.isa = off->isa;
	mo.act = Q3_XACT_INT8;
	mo.perms = off->perms;
	mo.gate_timeout_s = off->timeout_s;
	return q3_cpu_moe_new(off->pool, &mo, &off->moe, e);
}

/* Packing job: expert i of the list into its place in the blobs (the worker's own node memory). */
struct pack_job {
	struct q3_offload *off;
	int n;
	int *le;	  /* [n] layer * E + expert */
	size_t *at;	  /* [n] blob offsets */
	std::atomic<int> err;
	char msg[600];
};

/* Bytes of the mapping that holds p backed by transparent huge pages (/proc/self/smaps; the
 * kernel may have merged neighbours into it); -1 where that cannot be read. */
static long long thp_bytes(const void *p)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	bool in = false;
	long long kb = -1;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long a, b;

		if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' ')) {
			if (in)
				break;
			in = (const char *)a <= (const char *)p && (const char *)p < (const char *)b;
		} else if (in && sscanf(line, "AnonHugePages: %lld kB", &kb) == 1) {
			break;
		}
	}
	fclose(f);
	return kb < 0 ? -1 : kb << 10;
}

static int pack_ntasks(void *ctx, int ph)
{
	return ((struct pack_job *)ctx)->n;
}

static void pack_task(void *ctx, int ph, int i, int w)
{
	struct pack_job *j = (struct pack_job *)ctx;
	struct q3_offload *off = j->off;
	int l = j->le[i] / off->E, x = j->le[i] % off->E;
	const struct q3_expert *ex = &off->m->layers[l].experts[x];
	size_t sz = Q3_ALIGN_UP(q3_xexpert_packed_size(ex), 64);
	char *p = (char *)off->blobs + j->at[i];
	q3_err e;

	if (q3_xexpert_pack(ex, p, sz, &e) || q3_xexpert_view(&off->views[j->le[i]], p, sz, &e)) {
		if (j->err.exchange(1) == 0)
			snprintf(j->msg, sizeof(j->msg), "offload: layer %d expert %d: %s", l, x, e.msg);
	}
}

/* Memory for the packed experts: preferably on node (-1: anywhere), the kernel falling back to
 * the nearest other nodes when it is full (MPOL_PREFERRED: one copy, spilled, never duplicated). */
static void *blobs_alloc(size_t n, int node)
{
	void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	if (node >= 0 && node < 1024 && numa_available() >= 0) {
		unsigned long mask[1024 / (8 * sizeof(unsigned long))] = { 0 };

		mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
		mbind(p, n, MPOL_PREFERRED, mask, 1024, 0);
	}
	madvise(p, n, MADV_HUGEPAGE);
	return p;
}

/* CPU views of every expert not in VRAM: packed copies (the faster layout, measured: bench
 * experts), made in parallel by the expert threads into memory of the GPU's node; or, with
 * QWEN3D_OFFLOAD_CPU_LAYOUT=gptq, the stored tensors read in place (no copy, slower), except
 * act-order experts, which always need the packed layout. */
static int cpu_views(struct q3_offload *off, q3_err *e)
{
	const struct q3_model *m = off->m;
	const char *lay = getenv("QWEN3D_OFFLOAD_CPU_LAYOUT");
	bool gptq = lay && !strcmp(lay, "gptq");
	struct pack_job job;
	size_t need = 0;
	int err;

	job.off = off;
	job.n = 0;
	job.le = NULL;
	job.at = NULL;
	job.err = 0;
	job.msg[0] = 0;
	off->views = (struct q3_xexpert *)calloc((size_t)off->L * off->E, sizeof(*off->views));
	job.le = (int *)malloc(sizeof(int) * (size_t)off->L * off->E);
	job.at = (size_t *)malloc(sizeof(size_t) * (size_t)off->L * off->E);
	if (!off->views || !job.le || !job.at) {
		err = q3_errf(e, -ENOMEM, "out of memory");
		goto out;
	}
	for (int l = 0; l < off->L; l++)
		for (int x = 0; x < off->E; x++) {
			const struct q3_expert *ex = &m->layers[l].experts[x], *e0 = &m->layers[0].experts[0];
			struct q3_xexpert *v = &off->views[(size_t)l * off->E + x];

			if (ex->gate.bits != e0->gate.bits || ex->gate.group_size != e0->gate.group_size ||
			    ex->down.group_size != e0->down.group_size || ex->gate.fmt != e0->gate.fmt) {
				err = q3_errf(e, -ENOTSUP,
					      "offload: layer %d expert %d is stored unlike layer 0's experts (bits, "
					      "group): streaming needs one format",
					      l, x);
				goto out;
			}
			if (off->layers[l].slot_of_h[x] >= 0)
				continue;
			if ((err = q3_xexpert_check(ex, e))) {
				q3_err_prefix(e, err, "offload: layer %d expert %d", l, x);
				goto out;
			}
			off->layers[l].table[x] = v;
			if (q3_xexpert_gptq(v, ex, NULL))
				off->perms = true; /* act-order: packed whatever the setting */
			else if (gptq)
				continue;
			job.le[job.n] = l * off->E + x;
			job.at[job.n++] = need;
			need += Q3_ALIGN_UP(q3_xexpert_packed_size(ex), 64);
		}
	if (need) {
		off->blobs = blobs_alloc(need, off->node);
		off->blobs_bytes = need;
		if (!off->blobs) {
			err = q3_errf(e, -ENOMEM, "offload: no memory for %.1f GiB of packed experts", gib(need));
			goto out;
		}
		double t0 = q3_now();
		struct q3_xjob xj;

		memset(&xj, 0, sizeof(xj));
		xj.nphases = 1;
		xj.ntasks = pack_ntasks;
		xj.task = pack_task;
		xj.ctx = &job;
		q3_xpool_run(off->pool, &xj);
		if (job.err.load()) {
			err = q3_errf(e, -EINVAL, "%s", job.msg);
			goto out;
		}
		/* the CPU experts stream these: in 4 KiB pages every page of weights would miss the TLB */
		long long huge = thp_bytes(off->blobs);
		char hp[64] = "huge pages unknown";

		if (huge >= 0)
			snprintf(hp, sizeof(hp), "%.0f%% in 2 MiB pages", 100.0 * (double)huge / (double)need);
		q3_info("offload: %d experts packed for the CPU (%.1f GiB, %s) in %.1f s", job.n, gib(need), hp,
			q3_now() - t0);
	}
	err = 0;
out:
	free(job.le);
	free(job.at);
	return err;
}

static int layers_from_plan(struct q3_offload *off, const struct q3_place_plan *p, q3_err *e)
{
	off->layers = (struct off_layer *)calloc((size_t)off->L, sizeof(*off->layers));
	if (!off->layers)
		return q3_errf(e, -ENOMEM, "out of memory");
	for (int l = 0; l < off->L; l++) {
		struct off_layer *ol = &off->layers[l];
		int n = 0;

		ol->slot_of_h = (int16_t *)malloc(sizeof(int16_t) * off->E);
		ol->table = (const struct q3_xexpert **)calloc((size_t)off->E, sizeof(*ol->table));
		ol->slot_expert = (int *)malloc(sizeof(int) * (size_t)off->E);
		if (!ol->slot_of_h || !ol->table || !ol->slot_expert)
			return q3_errf(e, -ENOMEM, "out of memory");
		for (int x = 0; x < off->E; x++) {
			bool in = !p || p->vram[(size_t)l * off->E + x];

			ol->slot_of_h[x] = in ? (int16_t)n : -1;
			if (in)
				ol->slot_expert[n++] = x;
		}
		ol->ncpu = off->E - n;
		ol->nslots = n ? n : 1;
		if (!n)
			ol->slot_expert[0] = -1;
		if (cudaMalloc((void **)&ol->slot_of_d, sizeof(int16_t) * off->E) != cudaSuccess)
			return q3_errf(e, -ENOMEM, "offload: no device memory for the slot maps");
		CUDA_CHECK(e, cudaMemcpy(ol->slot_of_d, ol->slot_of_h, sizeof(int16_t) * off->E, cudaMemcpyHostToDevice));
	}
	return 0;
}

static int handoff_alloc(struct q3_offload *off, q3_err *e)
{
	size_t R = (size_t)off->max_rows, S = (size_t)off->k + 1;

	CUDA_CHECK(e, cudaHostAlloc((void **)&off->hw, sizeof(struct hand), cudaHostAllocMapped));
	memset((void *)off->hw, 0, sizeof(struct hand));
	CUDA_CHECK(e, cudaHostGetDevicePointer((void **)&off->hw_d, (void *)off->hw, 0));
	CUDA_CHECK(e, cudaHostAlloc((void **)&off->idx_h, R * S * 4, cudaHostAllocMapped));
	CUDA_CHECK(e, cudaHostAlloc((void **)&off->w_h, R * S * 4, cudaHostAllocMapped));
	CUDA_CHECK(e, cudaHostAlloc((void **)&off->xb_h, R * off->H * 2, cudaHostAllocMapped));
	CUDA_CHECK(e, cudaHostGetDevicePointer((void **)&off->idx_hd, off->idx_h, 0));
	CUDA_CHECK(e, cudaHostGetDevicePointer((void **)&off->w_hd, off->w_h, 0));
	CUDA_CHECK(e, cudaHostGetDevicePointer((void **)&off->xb_hd, off->xb_h, 0));
	CUDA_CHECK(e, cudaHostAlloc((void **)&off->out_h, R * off->H * 4, cudaHostAllocMapped));
	CUDA_CHECK(e, cudaHostGetDevicePointer((void **)&off->out_d, off->out_h, 0));
	off->next_seq = 1;
	off->armed = -1;
	return 0;
}

/* VRAM of the prefill staging: two sets of stacks and the raw ring */
static uint64_t staging_bytes(const struct q3_offload *off)
{
	return (uint64_t)OFF_STAGE * (2 * off->expert_bytes + off->nraw * (off->expert_bytes + 3 * 3 * 256));
}

/* The raw ring (nraw buffers of OFF_STAGE experts' GPTQ bytes), two staging stacks of OFF_STAGE
 * experts (tile format), the maps and the profile's events. */
static int stage_alloc(struct q3_offload *off, q3_err *e)
{
	const struct q3_layer *L0 = &off->m->layers[0];
	const struct q3_linear *g = &L0->experts[0].gate, *u = &L0->experts[0].up, *dn = &L0->experts[0].down;
	const struct q3_linear *ls[3] = { g, u, dn };
	size_t raw = 0;
	int err;

	for (int i = 0; i < 3; i++)
		raw += Q3_ALIGN_UP(q3_linear_bytes(ls[i]), 256) + 3 * 256;
	off->raw_bytes = raw;
	CUDA_CHECK(e, cudaStreamCreateWithFlags(&off->copy_st, cudaStreamNonBlocking));
	CUDA_CHECK(e, cudaEventCreateWithFlags(&off->idx_ev, cudaEventDisableTiming));
	for (int b = 0; b < off->nraw; b++) {
		struct stage_raw *sr = &off->raw[b];

		if (cudaMalloc(&sr->raw, raw * OFF_STAGE) != cudaSuccess)
			return q3_errf(e, -ENOMEM, "offload: no device memory for the prefill staging (%.2f GiB)",
				       gib(staging_bytes(off)));
		CUDA_CHECK(e, cudaEventCreateWithFlags(&sr->copied, cudaEventDisableTiming));
		CUDA_CHECK(e, cudaEventCreateWithFlags(&sr->free_ev, cudaEventDisableTiming));
	}
	for (int b = 0; b < 2; b++) {
		struct stage_pack *sp = &off->pack[b];
		struct q3g_mat *mats[3] = { &sp->gate, &sp->up, &sp->down };
		struct q3g_mat_plan plans[3];
		size_t bytes = 0;
		char *mem;

		for (int i = 0; i < 3; i++) {
			const struct q3_linear *arr[OFF_STAGE];

			for (int j = 0; j < OFF_STAGE; j++)
				arr[j] = ls[i];
			if ((err = q3g_mat_plan(arr, OFF_STAGE, &plans[i], e)))
				return err;
			/* any expert may come here: room for zero points (a symmetric one gets 8s) */
			plans[i].zeros = plans[i].fmt != Q3G_F16;
			bytes += Q3_ALIGN_UP(q3g_mat_bytes(&plans[i]), 256);
		}
		if (cudaMalloc(&sp->mat_mem, bytes) != cudaSuccess)
			return q3_errf(e, -ENOMEM, "offload: no device memory for the prefill staging (%.2f GiB)",
				       gib(staging_bytes(off)));
		mem = (char *)sp->mat_mem;
		for (int i = 0; i < 3; i++) {
			q3g_mat_place(mats[i], &plans[i], mem);
			mem += Q3_ALIGN_UP(q3g_mat_bytes(&plans[i]), 256);
		}
	}
	if (off->perms) { /* act-order experts go through the synchronous upload (it sorts g_idx) */
		off->upstage.bytes = 16u << 20;
		CUDA_CHECK(e, cudaHostAlloc(&off->upstage.host, off->upstage.bytes, cudaHostAllocDefault));
		if (cudaMalloc(&off->upstage.dev, off->upstage.bytes) != cudaSuccess)
			return q3_errf(e, -ENOMEM, "offload: no device memory for the upload stage");
	}
	off->pf_rows = 4096;
	CUDA_CHECK(e, cudaHostAlloc((void **)&off->pidx_h, (size_t)off->pf_rows * (off->k + 1) * 4, cudaHostAllocDefault));
	size_t nb = (size_t)off->E / OFF_STAGE + 2;

	CUDA_CHECK(e, cudaHostAlloc((void **)&off->maps_h, 2 * nb * off->E * 2, cudaHostAllocDefault));
	if (cudaMalloc((void **)&off->maps_d, nb * off->E * 2) != cudaSuccess)
		return q3_errf(e, -ENOMEM, "offload: no device memory for the staging maps");
	if (!(off->prof = (struct off_prof *)calloc(1, sizeof(*off->prof))))
		return q3_errf(e, -ENOMEM, "offload: no memory");
	off->prof->nev = 2 + 5 * (int)nb;
	for (int s = 0; s < 2; s++) {
		off->prof->pending[s] = -1;
		if (!(off->prof->ev[s] = (cudaEvent_t *)calloc(off->prof->nev, sizeof(cudaEvent_t))))
			return q3_errf(e, -ENOMEM, "offload: no memory");
		for (int i = 0; i < off->prof->nev; i++)
			CUDA_CHECK(e, cudaEventCreate(&off->prof->ev[s][i]));
	}
	return 0;
}

/* ---- the prefill profile ---------------------------------------------------------------------- */

/* Event i of the current set: 0 start, 1 after the resident pass; batch b: 2 + 5b + {0 copy
 * waited, 1 repacked, 2 passed, 3 copies start, 4 copies end}. */
static cudaEvent_t pev(const struct q3_offload *off, int i)
{
	return off->prof->ev[off->prof->cur][i];
}

static float pel(cudaEvent_t a, cudaEvent_t b)
{
	float ms = 0;

	return cudaEventElapsedTime(&ms, a, b) == cudaSuccess ? ms : 0.0f;
}

/* Adds set s's times to the totals; its events have completed (or are waited for here). */
static void prof_read(struct off_prof *pf, int s)
{
	cudaEvent_t *ev = pf->ev[s];
	int nb = pf->pending[s];

	if (nb < 0)
		return;
	cudaEventSynchronize(ev[nb ? 2 + 5 * (nb - 1) + 2 : 1]);
	pf->s[PF_RESIDENT] += pel(ev[0], ev[1]) * 1e-3;
	for (int b = 0; b < nb; b++) {
		cudaEvent_t *x = ev + 2 + 5 * b;

		pf->s[PF_WAIT] += pel(b ? x[-5 + 2] : ev[1], x[0]) * 1e-3;
		pf->s[PF_REPACK] += pel(x[0], x[1]) * 1e-3;
		pf->s[PF_STREAMED] += pel(x[1], x[2]) * 1e-3;
		pf->s[PF_COPY] += pel(x[3], x[4]) * 1e-3;
	}
	pf->pending[s] = -1;
	pf->calls++;
	cudaGetLastError(); /* an event never recorded is not an error of the next call */
}

/* The experts' host bytes are the checkpoint's mappings or the loader's arena: registering them
 * with CUDA makes the prefill copies DMA straight from them at full PCIe speed (read-only; the
 * pages are faulted in and stay).  Without it the driver stages every copy through a bounce
 * buffer: 3.9 GB/s measured on the H200 machine, against ~50 GB/s pinned.  The ranges: each
 * mapping, or (loader) each shard's span of tensor bytes, page-aligned, merged where they touch.
 * Best effort: a range that will not register is staged, with a warning. */
struct pin_range {
	uintptr_t a, b;
	uintptr_t d; /* where the device sees a (registered mapped), 0: nowhere */
};

static int cmp_range(const void *x, const void *y)
{
	const struct pin_range *p = (const struct pin_range *)x, *q = (const struct pin_range *)y;

	return p->a < q->a ? -1 : p->a > q->a;
}

static int pin_ranges(const struct q3_ckpt *ck, struct pin_range *r)
{
	const uintptr_t pg = 4096;
	int n = 0;

	for (int s = 0; s < ck->nshards; s++) {
		uintptr_t lo = UINTPTR_MAX, hi = 0;

		if (ck->maps) {
			if (ck->maps[s]) {
				lo = (uintptr_t)ck->maps[s];
				hi = lo + ck->shards[s].size;
			}
		} else {
			for (size_t i = 0; i < ck->ntensors; i++) {
				const struct q3_tensor *t = &ck->tensors[i];

				if (t->shard == s && t->data && t->nbytes) {
					lo = Q3_MIN(lo, (uintptr_t)t->data);
					hi = Q3_MAX(hi, (uintptr_t)t->data + t->nbytes);
				}
			}
		}
		if (lo < hi)
			r[n++] = (struct pin_range){ lo & ~(pg - 1), (hi + pg - 1) & ~(pg - 1) };
	}
	qsort(r, (size_t)n, sizeof(*r), cmp_range);
	int m = 0;

	for (int i = 0; i < n; i++) {
		if (m && r[i].a <= r[m - 1].b)
			r[m - 1].b = Q3_MAX(r[m - 1].b, r[i].b);
		else
			r[m++] = r[i];
	}
	return m;
}

static void pin_checkpoint(struct q3_offload *off, bool quiet)
{
	const struct q3_ckpt *ck = off->m->ck;
	const char *env = getenv("QWEN3D_OFFLOAD_PIN");
	double t0 = q3_now();
	uint64_t bytes = 0;
	struct pin_range *r;
	int n;

	if ((env && !strcmp(env, "0")) || !ck->nshards)
		return;
	r = (struct pin_range *)calloc((size_t)ck->nshards, sizeof(*r));
	off->pinned = (void **)calloc((size_t)ck->nshards, sizeof(void *));
	off->pr = (struct pin_range *)calloc((size_t)ck->nshards, sizeof(*r));
	if (!r || !off->pinned || !off->pr) {
		free(r);
		return;
	}
	n = pin_ranges(ck, r);
	for (int i = 0; i < n; i++) {
		cudaError_t ce = cudaHostRegister((void *)r[i].a, r[i].b - r[i].a,
						  cudaHostRegisterReadOnly | cudaHostRegisterPortable |
							  cudaHostRegisterMapped);
		void *d = NULL;

		if (ce == cudaErrorHostMemoryAlreadyRegistered) { /* pinned by its owner already */
			cudaGetLastError();
		} else if (ce != cudaSuccess) {
			cudaGetLastError();
			if (!quiet)
				q3_warn("offload: cudaHostRegister of %.2f GiB of weights: %s (prefill copies will be "
					"staged)", gib(r[i].b - r[i].a), cudaGetErrorString(ce));
			continue;
		} else {
			off->pinned[off->npinned++] = (void *)r[i].a;
		}
		bytes += r[i].b - r[i].a;
		if (cudaHostGetDevicePointer(&d, (void *)r[i].a, 0) != cudaSuccess) {
			cudaGetLastError();
			d = NULL;
		}
		r[i].d = (uintptr_t)d;
		off->pr[off->npr++] = r[i];
	}
	free(r);
	if (!quiet && bytes)
		q3_info("offload: %.1f GiB of weights pinned for DMA in %.1f s", gib(bytes), q3_now() - t0);
}

static void copy_probe(struct q3_offload *off, bool quiet);
static int hx_open(struct q3_offload *off, bool quiet, q3_err *e);

static int open_inner(struct q3_offload *off, const struct q3_off_opts *o, q3_err *e)
{
	const struct q3_model *m = off->m;
	uint64_t room, total = (uint64_t)off->L * off->E * o->expert_bytes, have = 0;
	struct q3_place_plan plan;
	const char *sp = o->stats_path ? o->stats_path : getenv("QWEN3D_EXPERT_STATS");
	double *freq = NULL;
	int err;

	have = o->free_bytes > o->reserve_bytes ? o->free_bytes - o->reserve_bytes : 0;
	if (o->vram_budget) {
		if (o->vram_budget < o->dense_bytes)
			return q3_errf(e, -ENOSPC,
				       "--vram-budget %.2f GiB: the dense weights alone take %.2f GiB",
				       gib(o->vram_budget), gib(o->dense_bytes));
		room = o->vram_budget - o->dense_bytes;
		if (room > have)
			return q3_errf(e, -ENOSPC,
				       "--vram-budget %.2f GiB: after %.2f GiB of dense weights only %.2f GiB is "
				       "free for experts (%.2f GiB kept for activations, sessions, staging)",
				       gib(o->vram_budget), gib(o->dense_bytes), gib(have), gib(o->reserve_bytes));
	} else {
		room = have;
	}
	off->expert_bytes = o->expert_bytes;
	/* tests: keep this fraction of the experts in VRAM whatever the budget */
	const char *fr = getenv("QWEN3D_OFFLOAD_FRACTION");
	bool forced = false;

	if (fr && *fr) {
		double f = atof(fr);

		if (!(f >= 0 && f <= 1))
			return q3_errf(e, -EINVAL, "QWEN3D_OFFLOAD_FRACTION='%s': expected 0 .. 1", fr);
		/* f of the experts' bytes, plus the staging taken out of the room below; offload stays
		 * on for f < 1 even where the staging is larger than the experts (tiny models) */
		forced = f < 1;
		room = forced ? (uint64_t)(f * (double)total) + staging_bytes(off) : total;
	}
	if (!forced && room >= total) { /* everything fits: no offload */
		off->budget = o->dense_bytes + total;
		return layers_from_plan(off, NULL, e);
	}
	off->active = true;
	/* streaming staging comes out of the experts' room */
	room = room > staging_bytes(off) ? room - staging_bytes(off) : 0;
	off->budget = o->dense_bytes + room;
	if (sp && *sp) {
		snprintf(off->stats_path, sizeof(off->stats_path), "%s", sp);
	}
	off->cache = o->cache;
	if ((err = q3_xstats_new(off->L, off->E, o->cache == Q3_CACHE_LRU ? OFF_HALF_LIFE_LRU : OFF_HALF_LIFE_LFU,
				 q3_xstats_fingerprint(m->ck), &off->xs, e)))
		return err;
	if (off->stats_path[0]) {
		q3_err le;

		if (q3_xstats_load(off->xs, off->stats_path, &le) && !o->quiet && !strstr(le.msg, "no such file"))
			q3_warn("offload: %s; starting without expert statistics", le.msg);
	}
	if (q3_xstats_tokens(off->xs) > 0) {
		freq = (double *)malloc(sizeof(double) * off->L * off->E);
		if (freq) {
			q3_xstats_freq(off->xs, freq);
			/* a layer that had no CPU experts last time was never counted (its routing
			 * stays on the GPU): give it the average use, not none, or the plan would
			 * evict all of it first */
			for (int l = 0; l < off->L; l++) {
				double sum = 0;

				for (int x = 0; x < off->E; x++)
					sum += freq[(size_t)l * off->E + x];
				for (int x = 0; x < off->E && sum == 0; x++)
					freq[(size_t)l * off->E + x] = (double)off->k / off->E;
			}
		}
	}
	uint64_t *eb = (uint64_t *)malloc(sizeof(uint64_t) * off->L * off->E), cap = UINT64_MAX / 4;
	int order = off->node >= 0 ? off->node : 0;

	if (!eb) {
		free(freq);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	for (int i = 0; i < off->L * off->E; i++)
		eb[i] = o->expert_bytes;
	struct q3_place_in in;

	memset(&in, 0, sizeof(in));
	in.nlayers = off->L;
	in.nexperts = off->E;
	in.expert_bytes = eb;
	in.freq = freq;
	in.dense_bytes = 0;
	in.vram_budget = room;
	in.ram_all = true;
	in.nnodes = 1;
	in.node_order = &order;
	in.node_capacity = &cap;
	err = q3_place_plan(&in, &plan, e);
	free(eb);
	free(freq);
	if (err)
		return err;
	err = layers_from_plan(off, &plan, e);
	if (!err && !o->quiet)
		q3_info("offload: %d of %d routed experts in VRAM (%.2f of %.2f GiB budget; expected hit rate "
			"%.1f%%), the rest computed by the CPU",
			plan.n_vram, off->L * off->E, gib(off->budget), gib(o->vram_budget ? o->vram_budget : off->budget),
			100.0 * plan.hit);
	q3_place_plan_free(&plan);
	if (!err)
		err = cpu_pool(off, o, e);
	if (!err)
		err = cpu_views(off, e);
	if (!err)
		err = cpu_moe(off, e);
	if (!err)
		err = handoff_alloc(off, e);
	if (!err)
		err = stage_alloc(off, e);
	if (!err)
		pin_checkpoint(off, o->quiet);
	if (!err)
		copy_probe(off, o->quiet);
	if (!err)
		err = hx_open(off, o->quiet, e);
	if (!err && !o->quiet)
		q3_info("offload: %d CPU expert threads (%s) on node %d", off->nthreads, q3_xisa_name(off->isa),
			off->node);
	return err;
}

extern "C" int q3_off_open(struct q3_offload **out, const struct q3_model *m, const struct q3_off_opts *o,
			   q3_err *e)
{
	struct q3_offload *off = (struct q3_offload *)calloc(1, sizeof(*off));
	const char *to = getenv("QWEN3D_OFFLOAD_TIMEOUT");
	int err;

	*out = NULL;
	if (!off)
		return q3_errf(e, -ENOMEM, "out of memory");
	off->m = m;
	off->L = m->cfg->num_layers;
	off->E = m->cfg->num_experts;
	off->k = m->cfg->top_k;
	off->H = m->cfg->hidden_size;
	off->I = m->cfg->moe_inter;
	off->max_rows = Q3_MAX(1, o->max_rows);
	off->timeout_s = to && atof(to) > 0 ? Q3_MIN(atof(to), 3600.0) : 10.0; /* cycles fit a long long */
	off->node = -1;
	const char *nr = getenv("QWEN3D_OFFLOAD_STAGE_RAW");

	off->nraw = nr && *nr ? atoi(nr) : OFF_RAW_DEFAULT;
	if (off->nraw < 2 || off->nraw > OFF_MAX_RAW) {
		free(off);
		return q3_errf(e, -EINVAL, "QWEN3D_OFFLOAD_STAGE_RAW='%s': expected 2 .. %d raw staging buffers", nr,
			       OFF_MAX_RAW);
	}
	if ((err = open_inner(off, o, e))) {
		q3_off_close(off);
		return err;
	}
	*out = off;
	return 0;
}

extern "C" void q3_off_close(struct q3_offload *off)
{
	if (!off)
		return;
	if (off->moe) {
		q3_err e;

		q3_cpu_moe_wait(off->moe, &e);
	}
	if (off->xs && off->stats_path[0] && q3_xstats_tokens(off->xs) > 0) {
		q3_err e;

		if (q3_xstats_save(off->xs, off->stats_path, &e))
			q3_warn("offload: %s", e.msg);
	}
	q3_cpu_moe_free(off->moe);
	q3_xpool_free(off->pool);
	for (int i = 0; i < off->npinned; i++)
		cudaHostUnregister(off->pinned[i]);
	free(off->pinned);
	free(off->pr);
	cudaFree(off->hx_tab_d);
	cudaFree(off->hx_ws);
	cudaFree(off->hx_out);
	cudaFree(off->hx_g_d);
	if (off->hx_fork)
		cudaEventDestroy(off->hx_fork);
	if (off->hx_done)
		cudaEventDestroy(off->hx_done);
	if (off->hx_st)
		cudaStreamDestroy(off->hx_st);
	q3_xstats_free(off->xs);
	if (off->layers)
		for (int l = 0; l < off->L; l++) {
			free(off->layers[l].slot_expert);
			free(off->layers[l].slot_of_h);
			free(off->layers[l].table);
			cudaFree(off->layers[l].slot_of_d);
		}
	free(off->layers);
	free(off->views);
	if (off->blobs)
		munmap(off->blobs, off->blobs_bytes);
	for (int s = 0; off->prof && s < 2; s++) {
		for (int i = 0; off->prof->ev[s] && i < off->prof->nev; i++)
			if (off->prof->ev[s][i])
				cudaEventDestroy(off->prof->ev[s][i]);
		free(off->prof->ev[s]);
	}
	free(off->prof);
	for (int b = 0; b < 2; b++)
		cudaFree(off->pack[b].mat_mem);
	for (int b = 0; b < OFF_MAX_RAW; b++) {
		cudaFree(off->raw[b].raw);
		if (off->raw[b].copied)
			cudaEventDestroy(off->raw[b].copied);
		if (off->raw[b].free_ev)
			cudaEventDestroy(off->raw[b].free_ev);
	}
	if (off->idx_ev)
		cudaEventDestroy(off->idx_ev);
	if (off->copy_st)
		cudaStreamDestroy(off->copy_st);
	cudaFreeHost((void *)off->hw);
	cudaFreeHost(off->idx_h);
	cudaFreeHost(off->w_h);
	cudaFreeHost(off->xb_h);
	cudaFreeHost(off->out_h);
	cudaFreeHost(off->pidx_h);
	cudaFreeHost(off->maps_h);
	cudaFree(off->maps_d);
	cudaFree(off->upstage.dev);
	cudaFreeHost(off->upstage.host);
	free(off);
}

extern "C" bool q3_off_active(const struct q3_offload *off)
{
	return off && off->active;
}

extern "C" int q3_off_slots(const struct q3_offload *off, int layer)
{
	return off->layers[layer].nslots;
}

extern "C" int q3_off_slot_expert(const struct q3_offload *off, int layer, int slot)
{
	return off->layers[layer].slot_expert[slot];
}

extern "C" bool q3_off_layer_cpu(const struct q3_offload *off, int layer)
{
	return off && off->active && off->layers[layer].ncpu > 0;
}

/* ---- decode --------------------------------------------------------------------------------------- */

/* The GPU's picks a row in a decode call of R rows: single-row calls only (the rows of a batch
 * would each read their picks, the same experts over again, where the CPU reads each once). */
static int hx_picks(const struct q3_offload *off, int R)
{
	return R == 1 ? off->hx_max : 0;
}

/* Where the device sees host address p (inside a registered, mapped range), 0: nowhere. */
static uintptr_t dev_view(const struct q3_offload *off, const void *p)
{
	uintptr_t a = (uintptr_t)p;
	int lo = 0, hi = off->npr - 1;

	while (lo <= hi) {
		int mid = (lo + hi) / 2;
		const struct pin_range *r = &off->pr[mid];

		if (a < r->a)
			hi = mid - 1;
		else if (a >= r->b)
			lo = mid + 1;
		else
			return r->d ? r->d + (a - r->a) : 0;
	}
	return 0;
}

/* The device's table of every expert's raw tensors in host memory, for q3g_moe_host: made when
 * the experts are stored alike (bits, group, zero offset, scale type), without act-order, and
 * inside the pinned ranges; else the GPU reads none (the CPU computes every missing expert). */
static int hx_open(struct q3_offload *off, bool quiet, q3_err *e)
{
	const char *env = getenv("QWEN3D_OFFLOAD_PCIE_EXPERTS");
	int G = env && *env ? atoi(env) : OFF_HX_DEFAULT;
	const struct q3_expert *x0 = &off->m->layers[0].experts[0];
	const struct q3_linear *f0[2] = { &x0->gate, &x0->down };
	struct q3g_hfmt *f = &off->hx_fmt;
	struct q3g_hexpert *tab = NULL;
	const char *why = NULL;

	if (env && *env && (G < 0 || G > Q3G_HX_MAX))
		return q3_errf(e, -EINVAL, "QWEN3D_OFFLOAD_PCIE_EXPERTS='%s': expected 0 .. %d experts a token", env,
			       Q3G_HX_MAX);
	G = Q3_MIN(G, off->k);
	if (!G || !off->active)
		return 0;
	for (int i = 0; i < 2; i++) {
		f->bits[i] = f0[i]->bits;
		f->group[i] = f0[i]->group_size;
		f->zero_off[i] = f0[i]->zero_offset;
		f->bf16[i] = f0[i]->scales && f0[i]->scales->dtype == Q3_DT_BF16;
	}
	if (off->perms)
		why = "act-order experts";
	else if (!off->npr)
		why = "the weights are not pinned";
	else if (off->H % 4 || off->I % 4)
		why = "hidden or expert size not a multiple of 4";
	else if (!(tab = (struct q3g_hexpert *)calloc((size_t)off->L * off->E, sizeof(*tab))))
		return q3_errf(e, -ENOMEM, "out of memory");
	for (int l = 0; l < off->L && !why; l++)
		for (int x = 0; x < off->E && !why; x++) {
			const struct q3_expert *ex = &off->m->layers[l].experts[x];
			const struct q3_linear *ls[3] = { &ex->gate, &ex->up, &ex->down };

			for (int i = 0; i < 3 && !why; i++) {
				const struct q3_linear *q = ls[i], *r = f0[i == 2];
				struct q3g_hlin *h = &tab[(size_t)l * off->E + x].lin[i];

				if (q->fmt != Q3_W_GPTQ || q->bits != r->bits || q->group_size != r->group_size ||
				    q->zero_offset != r->zero_offset || q->desc_act || !q->scales || !q->qzeros ||
				    !r->scales || q->scales->dtype != r->scales->dtype) {
					why = "experts stored unlike each other";
					break;
				}
				h->qweight = (const uint32_t *)dev_view(off, q->qweight->data);
				h->qzeros = (const uint32_t *)dev_view(off, q->qzeros->data);
				h->scales = (const uint16_t *)dev_view(off, q->scales->data);
				if (!h->qweight || !h->qzeros || !h->scales || (uintptr_t)h->qzeros % 4 ||
				    (uintptr_t)h->qweight % 4 || (uintptr_t)h->scales % 2)
					why = "weights outside the memory the GPU can map";
			}
		}
	if (why) {
		free(tab);
		if (!quiet)
			q3_info("offload: the GPU reads no experts over PCIe in decode (%s)", why);
		return 0;
	}
	size_t tb = sizeof(*tab) * (size_t)off->L * off->E;
	cudaError_t ce = cudaMalloc((void **)&off->hx_tab_d, tb);

	if (ce == cudaSuccess)
		ce = cudaMalloc((void **)&off->hx_ws, sizeof(float) * q3g_moe_host_scratch(1, G, off->H, off->I));
	if (ce == cudaSuccess)
		ce = cudaMalloc((void **)&off->hx_out, sizeof(float) * off->H);
	if (ce == cudaSuccess)
		ce = cudaMalloc((void **)&off->hx_g_d, sizeof(int));
	if (ce == cudaSuccess)
		ce = cudaMemcpy(off->hx_tab_d, tab, tb, cudaMemcpyHostToDevice);
	free(tab);
	CUDA_CHECK(e, ce);
	CUDA_CHECK(e, cudaStreamCreateWithFlags(&off->hx_st, cudaStreamNonBlocking));
	CUDA_CHECK(e, cudaEventCreateWithFlags(&off->hx_fork, cudaEventDisableTiming));
	CUDA_CHECK(e, cudaEventCreateWithFlags(&off->hx_done, cudaEventDisableTiming));
	for (int i = 0; i < 3; i++) { /* all experts alike: expert 0's raw bytes are any one's */
		const struct q3_linear *l = i == 0 ? &x0->gate : i == 1 ? &x0->up : &x0->down;

		off->hx_bytes += l->qweight->nbytes + l->qzeros->nbytes + l->scales->nbytes;
	}
	off->hx_max = G;
	off->hx_auto = !(env && *env);
	off->hx_cur = off->hx_auto ? 0 : G;
	q3_tune_init(&off->tune, G + 1, OFF_TUNE_PER, OFF_TUNE_RECHECK);
	if (!quiet)
		q3_info("offload: in decode the GPU reads %s%d of a token's missing experts over PCIe (the last, "
			"where the CPU keeps %d), the CPU computes the rest", off->hx_auto ? "0 to " : "", G,
			OFF_HX_KEEP);
	return 0;
}

extern "C" int q3_off_publish(struct q3_offload *off, int layer, const int *idx, const float *w, const uint16_t *xb,
			      int *sidx, int R, q3g_stream stream, q3_err *e)
{
	cudaStream_t st = (cudaStream_t)stream;
	size_t S = (size_t)off->k + 1;

	if (!q3_off_layer_cpu(off, layer))
		return 0;
	if (R > off->max_rows)
		return q3_errf(e, -EINVAL, "offload: %d rows in a decode handoff (at most %d)", R, off->max_rows);
	off->dec_idx = idx;
	off->dec_w = w;
	off->dec_xb = xb;
	off_publish_kernel<<<1, 512, 0, st>>>(off->hw_d, (uint32_t)layer, off->idx_hd, off->w_hd, (uint32_t *)off->xb_hd,
					      idx, w, (const uint32_t *)xb, R * (int)S, R * off->H / 2, sidx,
					      off->layers[layer].slot_of_d, hx_picks(off, R) ? off->hx_g_d : NULL);
	CUDA_CHECK_LAUNCH(e);
	/* the GPU's share of the missing experts: on the side stream, beside the resident experts
	 * (it reads host memory and writes only its own buffers; q3_off_join adds its output) */
	if (hx_picks(off, R)) {
		CUDA_CHECK(e, cudaEventRecord(off->hx_fork, st));
		CUDA_CHECK(e, cudaStreamWaitEvent(off->hx_st, off->hx_fork, 0));
		int err = q3g_moe_host(off->hx_out, off->hx_ws, xb, idx, w, (int)S, off->k, off->layers[layer].slot_of_d,
				       off->hx_tab_d + (size_t)layer * off->E, &off->hx_fmt, hx_picks(off, R), OFF_HX_KEEP,
				       off->hx_g_d, R, off->H, off->I, (q3g_stream)off->hx_st, e);

		if (err)
			return err;
		CUDA_CHECK(e, cudaEventRecord(off->hx_done, off->hx_st));
	}
	return 0;
}

extern "C" int q3_off_join(struct q3_offload *off, int layer, float *h, int R, q3g_stream stream, q3_err *e)
{
	cudaStream_t st = (cudaStream_t)stream;
	int n = R * off->H;
	bool hx = hx_picks(off, R) > 0;

	if (!q3_off_layer_cpu(off, layer))
		return 0;
	if (hx)
		CUDA_CHECK(e, cudaStreamWaitEvent(st, off->hx_done, 0));
	off_join_kernel<<<Q3_MIN(cdiv(n, 1024), 8), 1024, 0, st>>>(h, off->out_d, hx ? off->hx_out : NULL, n, off->hw_d,
								     (uint32_t)layer,
								     (long long)(off->timeout_s * 2.0e9)); /* cycles at up to 2 GHz */
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

extern "C" void q3_off_begin(struct q3_offload *off, int R, int real)
{
	if (!q3_off_active(off))
		return;
	off->R = R;
	off->rows_real = Q3_MIN(real, R);
	off->armed = -1;
	off->hw->seq0 = off->next_seq;
	off->next_seq += (uint32_t)off->L + 1;
	off->tokens += (uint64_t)off->rows_real;
	/* single rows: the GPU's share of the missing experts in this call, and the call's start (the
	 * tuner times it to q3_off_cpu_end) */
	if (hx_picks(off, R)) {
		off->hx_cur = off->hx_auto ? q3_tune_next(&off->tune) : off->hx_max;
		off->hw->hx_g = (uint32_t)off->hx_cur;
		off->call_t0 = q3_now();
	}
	/* the CPU computes the real rows only (a graph's padding rows would cost it whole experts);
	 * the GPU adds all R rows of out: the padding ones are zeros for the whole call */
	if (off->rows_real < Q3_MIN(R, off->max_rows))
		memset(off->out_h + (size_t)off->rows_real * off->H, 0,
		       sizeof(float) * (size_t)(Q3_MIN(R, off->max_rows) - off->rows_real) * off->H);
}

extern "C" void q3_off_abort(struct q3_offload *off)
{
	q3_err e;

	if (!q3_off_active(off))
		return;
	/* open every gate of the call, let an armed CPU job finish (it stores its own, smaller, done
	 * value), then release every GPU wait of the call */
	off->hw->gate = off->hw->seq0 + (uint32_t)off->L + 1;
	if (off->armed >= 0)
		q3_cpu_moe_wait(off->moe, &e);
	off->armed = -1;
	__atomic_store_n(&off->hw->done, off->hw->seq0 + (uint32_t)off->L + 1, __ATOMIC_RELEASE);
}

extern "C" int q3_off_cpu_layer(struct q3_offload *off, int layer, q3_err *e)
{
	int err;

	if (!q3_off_layer_cpu(off, layer))
		return 0;
	if (off->armed >= 0 && (err = q3_cpu_moe_wait(off->moe, e)))
		return err;
	struct q3_cpu_moe_req r;
	uint32_t v = off->hw->seq0 + (uint32_t)layer + 1;

	memset(&r, 0, sizeof(r));
	r.T = off->rows_real;
	r.xh = off->xb_h; /* fp16: the backend's normed activations */
	r.ldx = (size_t)off->H;
	r.ids = off->idx_h;
	r.w = off->w_h;
	r.k = off->k;
	r.ldk = off->k + 1;
	r.experts = off->layers[layer].table;
	r.elsewhere = hx_picks(off, off->R) ? off->hx_cur : 0;
	r.keep = OFF_HX_KEEP;
	r.out = off->out_h;
	r.ldo = (size_t)off->H;
	r.stats = off->xs;
	r.layer = layer;
	r.stats_rows = off->rows_real;
	off->armed = layer;
	off->pcie += (uint64_t)off->R * ((off->k + 1) * 8 + off->H * 2 + off->H * 4);
	return q3_cpu_moe_post(off->moe, &r, &off->hw->gate, v, &off->hw->done, v, e);
}

extern "C" int q3_off_cpu_end(struct q3_offload *off, q3_err *e)
{
	int err = 0;

	if (!q3_off_active(off))
		return 0;
	if (off->armed >= 0)
		err = q3_cpu_moe_wait(off->moe, e);
	off->armed = -1;
	if (hx_picks(off, off->R) && off->hx_auto && !err)
		q3_tune_done(&off->tune, q3_now() - off->call_t0);
	if (off->xs)
		q3_xstats_tick(off->xs, (uint64_t)off->rows_real);
	return err; /* on failure the backend calls q3_off_abort */
}

/* ---- prefill -------------------------------------------------------------------------------------- */

/* Where an expert's raw tensors go in a staging slot: one copy of the stretch of host memory they
 * span when it is compact (a checkpoint keeps an expert's tensors together) and keeps them 4-byte
 * aligned, else one copy each, 256-aligned.  off[i][k]: the slot offset of linear i's tensor k
 * (qweight, qzeros, scales). */
struct raw_layout {
	const char *span; /* NULL: per-tensor copies */
	size_t span_len;
	size_t off[3][3];
};

static void raw_layout(const struct q3_expert *ex, size_t slot_bytes, struct raw_layout *rl)
{
	const struct q3_linear *ls[3] = { &ex->gate, &ex->up, &ex->down };
	const char *lo = NULL, *hi = NULL;
	bool aligned = true;
	size_t at = 0;

	for (int i = 0; i < 3; i++) {
		const struct q3_tensor *t[4] = { ls[i]->qweight, ls[i]->qzeros, ls[i]->scales, ls[i]->g_idx };

		for (int k = 0; k < 4; k++) {
			const char *p = t[k] ? (const char *)t[k]->data : NULL;

			if (!p)
				continue;
			lo = !lo || p < lo ? p : lo;
			hi = !hi || p + t[k]->nbytes > hi ? p + t[k]->nbytes : hi;
		}
	}
	for (int i = 0; i < 3; i++) {
		const struct q3_tensor *t[3] = { ls[i]->qweight, ls[i]->qzeros, ls[i]->scales };

		for (int k = 0; k < 3; k++)
			aligned &= ((const char *)t[k]->data - lo) % 4 == 0;
	}
	rl->span = lo && (size_t)(hi - lo) <= slot_bytes && aligned ? lo : NULL;
	rl->span_len = rl->span ? (size_t)(hi - lo) : 0;
	for (int i = 0; i < 3; i++) {
		const struct q3_tensor *t[3] = { ls[i]->qweight, ls[i]->qzeros, ls[i]->scales };

		for (int k = 0; k < 3; k++) {
			rl->off[i][k] = rl->span ? (size_t)((const char *)t[k]->data - lo) : at;
			at += Q3_ALIGN_UP(t[k]->nbytes, 256);
		}
	}
}

/* Expert ex's raw tensors into dst (a raw slot), on the copy stream; adds the bytes to *bytes. */
static int copy_raw(struct q3_offload *off, const struct q3_expert *ex, char *dst, uint64_t *bytes, q3_err *e)
{
	const struct q3_linear *ls[3] = { &ex->gate, &ex->up, &ex->down };
	struct raw_layout rl;

	raw_layout(ex, off->raw_bytes, &rl);
	if (rl.span) {
		CUDA_CHECK(e, cudaMemcpyAsync(dst, rl.span, rl.span_len, cudaMemcpyHostToDevice, off->copy_st));
		*bytes += rl.span_len;
		return 0;
	}
	for (int i = 0; i < 3; i++) {
		const struct q3_tensor *t[3] = { ls[i]->qweight, ls[i]->qzeros, ls[i]->scales };

		for (int k = 0; k < 3; k++) {
			CUDA_CHECK(e, cudaMemcpyAsync(dst + rl.off[i][k], t[k]->data, t[k]->nbytes, cudaMemcpyHostToDevice,
						      off->copy_st));
			*bytes += t[k]->nbytes;
		}
	}
	return 0;
}

/* Raw copies of the tensors of n experts (ids xs) into a staging buffer's raw area, slot j for
 * xs[j], on the copy stream; then the buffer's `copied` event. */
static int stage_copies(struct q3_offload *off, struct stage_raw *sb, int layer, const int *xs, int n, int b,
			q3_err *e)
{
	int err;

	CUDA_CHECK(e, cudaEventRecord(pev(off, 2 + 5 * b + 3), off->copy_st));
	for (int j = 0; j < n && !off->perms; j++)
		if ((err = copy_raw(off, &off->m->layers[layer].experts[xs[j]], (char *)sb->raw + (size_t)j * off->raw_bytes,
				    &off->pcie, e)))
			return err;
	CUDA_CHECK(e, cudaEventRecord(pev(off, 2 + 5 * b + 4), off->copy_st));
	CUDA_CHECK(e, cudaEventRecord(sb->copied, off->copy_st));
	return 0;
}

/* The prefill's copies with nothing beside them: the missing experts of the layer with the most,
 * as many as the raw ring holds, twice (the second pass timed).  The rate bench offload puts
 * beside the copy engine's during prefill; 0 where it cannot be measured (act-order experts go
 * through another path; a CUDA error only skips it). */
static void copy_probe(struct q3_offload *off, bool quiet)
{
	int layer = -1, most = 0;
	cudaEvent_t ev[2] = { NULL, NULL };
	uint64_t bytes = 0;
	float ms = 0;
	q3_err e;

	for (int l = 0; l < off->L; l++)
		if (off->layers[l].ncpu > most)
			most = off->layers[l].ncpu, layer = l;
	if (layer < 0 || off->perms || cudaEventCreate(&ev[0]) != cudaSuccess ||
	    cudaEventCreate(&ev[1]) != cudaSuccess)
		goto out;
	for (int pass = 0; pass < 2; pass++) {
		int n = 0;

		bytes = 0;
		if (pass && cudaEventRecord(ev[0], off->copy_st) != cudaSuccess)
			goto out;
		for (int x = 0; x < off->E && n < off->nraw * OFF_STAGE; x++) {
			if (off->layers[layer].slot_of_h[x] >= 0)
				continue;
			char *dst = (char *)off->raw[n / OFF_STAGE].raw + (size_t)(n % OFF_STAGE) * off->raw_bytes;

			if (copy_raw(off, &off->m->layers[layer].experts[x], dst, &bytes, &e))
				goto out;
			n++;
		}
	}
	if (cudaEventRecord(ev[1], off->copy_st) != cudaSuccess || cudaEventSynchronize(ev[1]) != cudaSuccess ||
	    cudaEventElapsedTime(&ms, ev[0], ev[1]) != cudaSuccess || ms <= 0)
		goto out;
	off->copy_alone_gbps = (double)bytes / ms / 1e6;
	if (!quiet)
		q3_info("offload: prefill copies with nothing beside them: %.0f MB of layer %d's experts at %.1f GB/s",
			(double)bytes / 1e6, layer, off->copy_alone_gbps);
out:
	for (int i = 0; i < 2; i++)
		if (ev[i])
			cudaEventDestroy(ev[i]);
	cudaStreamSynchronize(off->copy_st);
	cudaGetLastError(); /* a failed probe is no error of the engine */
}

static const struct q3_linear *linear_of(const struct q3_expert *ex, int i)
{
	return i == 0 ? &ex->gate : i == 1 ? &ex->up : &ex->down;
}

/* Whether two GPTQ linears repack alike (one q3g_mat_repack_raw call takes both). */
static bool repack_alike(const struct q3_linear *a, const struct q3_linear *b)
{
	return a->N == b->N && a->K == b->K && a->bits == b->bits && a->group_size == b->group_size &&
	       a->zero_offset == b->zero_offset && a->scales->dtype == b->scales->dtype;
}

/* Repacks experts xs[0 .. n) (their raw bytes in slots 0 .. n of the buffer) into the same slots of
 * the staging stacks: a launch a matrix kind for the batch, not one per expert and tensor. */
static int stage_repack(struct q3_offload *off, const struct stage_raw *sb, const struct stage_pack *sp, int layer,
			const int *xs, int n, cudaStream_t st, q3_err *e)
{
	const struct q3_expert *exs = off->m->layers[layer].experts;
	const struct q3g_mat *mats[3] = { &sp->gate, &sp->up, &sp->down };
	uint64_t offs[3][OFF_STAGE][3];
	int err;

	if (off->perms) { /* act-order: the synchronous upload sorts g_idx */
		for (int j = 0; j < n; j++)
			for (int i = 0; i < 3; i++) {
				if ((err = q3g_mat_upload(mats[i], j, linear_of(&exs[xs[j]], i), NULL, &off->upstage, st,
							  e)))
					return err;
				off->pcie += q3_linear_bytes(linear_of(&exs[xs[j]], i));
			}
		return 0;
	}
	for (int j = 0; j < n; j++) {
		struct raw_layout rl;

		raw_layout(&exs[xs[j]], off->raw_bytes, &rl);
		for (int i = 0; i < 3; i++)
			for (int k = 0; k < 3; k++)
				offs[i][j][k] = (uint64_t)j * off->raw_bytes + rl.off[i][k];
	}
	for (int i = 0; i < 3; i++)
		for (int j0 = 0, j = 1; j <= n; j++)
			if (j == n || !repack_alike(linear_of(&exs[xs[j0]], i), linear_of(&exs[xs[j]], i))) {
				if ((err = q3g_mat_repack_raw(mats[i], j0, j - j0, linear_of(&exs[xs[j0]], i), sb->raw,
							      offs[i] + j0, st, e)))
					return err;
				j0 = j;
			}
	return 0;
}

/* The routing of a prefill call (in pidx_h): the statistics, the pair counters, and (used != NULL)
 * which missing experts the rows use. */
static void route_count(struct q3_offload *off, int layer, int R, bool *used)
{
	const struct off_layer *ol = &off->layers[layer];
	int S = off->k + 1;

	for (int r = 0; r < R; r++) {
		if (off->xs)
			q3_xstats_add(off->xs, layer, off->pidx_h + (size_t)r * S, off->k);
		for (int s = 0; s < off->k; s++) {
			int x = off->pidx_h[(size_t)r * S + s];

			if (x < 0 || x >= off->E)
				continue;
			if (ol->slot_of_h[x] >= 0) {
				off->pairs_gpu++;
			} else {
				off->pairs_cpu++; /* streamed: counted as misses of the cache */
				if (used)
					used[x] = true;
			}
		}
	}
}

/* Copies of batch b (experts need[b * OFF_STAGE ..]) into raw buffer `rb` once the compute stream
 * has repacked what that buffer held before. */
static int stage_batch(struct q3_offload *off, int layer, const int *need, int nneed, int b, int rb, q3_err *e)
{
	CUDA_CHECK(e, cudaStreamWaitEvent(off->copy_st, off->raw[rb].free_ev, 0));
	return stage_copies(off, &off->raw[rb], layer, need + b * OFF_STAGE, Q3_MIN(OFF_STAGE, nneed - b * OFF_STAGE),
			    b, e);
}

extern "C" int q3_off_prefill(struct q3_offload *off, int layer, float *h, const uint16_t *xb, const int *idx,
			      const float *w, int *sidx, const struct q3g_mat *gate, const struct q3g_mat *up,
			      const struct q3g_mat *down, const struct q3g_mat *sgate, const struct q3g_mat *sup,
			      const struct q3g_mat *sdown, int R, const struct q3g_dims *d, void *ws, q3g_stream stream,
			      q3_err *e)
{
	cudaStream_t st = (cudaStream_t)stream;
	const struct off_layer *ol = &off->layers[layer];
	int S = off->k + 1, P = R * S, need[4096], nneed = 0, err;
	bool used[4096];
	/* enough rows that all experts are used: stream every missing one, and let the host run on
	 * (the copies of the next layer queue up behind these) instead of waiting for the routing */
	bool all = (long)R * off->k >= (long)OFF_ALL_USED * off->E;

	if (!q3_off_layer_cpu(off, layer))
		return q3g_moe_prefill(h, xb, idx, w, gate, up, down, sgate, sup, sdown, R, d, ws, stream, e);
	if (R > off->pf_rows || off->E > 4096)
		return q3_errf(e, -EINVAL, "offload: %d rows in a prefill call (at most %d)", R, off->pf_rows);
	off->prof->cur ^= 1;
	prof_read(off->prof, off->prof->cur);
	CUDA_CHECK(e, cudaEventRecord(pev(off, 0), st));
	CUDA_CHECK(e, cudaMemcpyAsync(off->pidx_h, idx, (size_t)P * 4, cudaMemcpyDeviceToHost, st));
	CUDA_CHECK(e, cudaEventRecord(off->idx_ev, st));
	if (all) {
		for (int x = 0; x < off->E; x++)
			if (ol->slot_of_h[x] < 0)
				need[nneed++] = x;
	} else { /* the routing, on the host: which missing experts the rows use */
		CUDA_CHECK(e, cudaEventSynchronize(off->idx_ev));
		memset(used, 0, sizeof(used));
		route_count(off, layer, R, used);
		for (int x = 0; x < off->E; x++)
			if (used[x])
				need[nneed++] = x;
	}
	/* batches of OFF_STAGE missing experts through the ring of raw buffers: the copies of the
	 * first nraw batches are queued now (each once its buffer's last batch is repacked), batch
	 * b + nraw's once batch b's raw bytes are repacked */
	int nb = (nneed + OFF_STAGE - 1) / OFF_STAGE;
	unsigned r0 = off->raw_next;
	int16_t *maps_h = off->maps_h + (size_t)(off->calls++ & 1) * (off->E / OFF_STAGE + 2) * off->E;

	off->raw_next += nb;
	for (int b = 0; b < nb && b < off->nraw; b++)
		if ((err = stage_batch(off, layer, need, nneed, b, (r0 + b) % off->nraw, e)))
			return err;
	/* pass 1: resident experts and the shared one */
	off_remap_kernel<<<cdiv(P, 256), 256, 0, st>>>(sidx, idx, ol->slot_of_d, P, false);
	CUDA_CHECK_LAUNCH(e);
	if ((err = q3g_moe_prefill(h, xb, sidx, w, gate, up, down, sgate, sup, sdown, R, d, ws, stream, e)))
		return err;
	CUDA_CHECK(e, cudaEventRecord(pev(off, 1), st));
	/* pass 2 and on: the streamed experts */
	for (int b = 0; b < nb; b++) {
		struct stage_raw *sr = &off->raw[(r0 + b) % off->nraw];
		struct stage_pack *sp = &off->pack[b % 2];
		int16_t *map_h = maps_h + (size_t)b * off->E, *map_d = off->maps_d + (size_t)b * off->E;
		int n = Q3_MIN(OFF_STAGE, nneed - b * OFF_STAGE);

		CUDA_CHECK(e, cudaStreamWaitEvent(st, sr->copied, 0));
		CUDA_CHECK(e, cudaEventRecord(pev(off, 2 + 5 * b), st));
		for (int x = 0; x < off->E; x++)
			map_h[x] = -1;
		for (int j = 0; j < n; j++)
			map_h[need[b * OFF_STAGE + j]] = (int16_t)j;
		if ((err = stage_repack(off, sr, sp, layer, need + b * OFF_STAGE, n, st, e)))
			return err;
		off->uploads += n;
		CUDA_CHECK(e, cudaEventRecord(pev(off, 2 + 5 * b + 1), st));
		CUDA_CHECK(e, cudaEventRecord(sr->free_ev, st)); /* the raw bytes are consumed */
		if (b + off->nraw < nb &&
		    (err = stage_batch(off, layer, need, nneed, b + off->nraw, (r0 + b) % off->nraw, e)))
			return err;
		CUDA_CHECK(e, cudaMemcpyAsync(map_d, map_h, (size_t)off->E * 2, cudaMemcpyHostToDevice, st));
		off_remap_kernel<<<cdiv(P, 256), 256, 0, st>>>(sidx, idx, map_d, P, true);
		CUDA_CHECK_LAUNCH(e);
		if ((err = q3g_moe_prefill(h, xb, sidx, w, &sp->gate, &sp->up, &sp->down, sgate, sup, sdown, R, d, ws,
					   stream, e)))
			return err;
		CUDA_CHECK(e, cudaEventRecord(pev(off, 2 + 5 * b + 2), st));
	}
	if (all) { /* the statistics; this also keeps the host at most a layer ahead (maps_h halves) */
		CUDA_CHECK(e, cudaEventSynchronize(off->idx_ev));
		route_count(off, layer, R, NULL);
	}
	prof_read(off->prof, off->prof->cur ^ 1);
	off->prof->pending[off->prof->cur] = nb;
	return 0;
}

/* ---- re-balancing ------------------------------------------------------------------------------ */

/* Whether expert x of layer l could become the CPU's: it needs a view (a packed copy exists only
 * for experts that were never resident; the stored layout serves the others, unless act-order). */
static bool evictable(const struct q3_offload *off, int l, int x)
{
	struct q3_xexpert v;

	return off->views[(size_t)l * off->E + x].H || !q3_xexpert_gptq(&v, &off->m->layers[l].experts[x], NULL);
}

extern "C" int q3_off_rebalance_plan(struct q3_offload *off, struct q3_swap *swaps, int max, uint64_t max_bytes)
{
	size_t n = (size_t)off->L * off->E;
	uint8_t *res;
	uint64_t *bytes;
	int ns = 0;

	if (!q3_off_active(off) || !off->xs || off->cache == Q3_CACHE_STATIC)
		return 0;
	res = (uint8_t *)malloc(n);
	bytes = (uint64_t *)malloc(n * sizeof(uint64_t));
	if (res && bytes) {
		struct q3_rebalance_opts ro;

		for (size_t i = 0; i < n; i++) {
			int l = (int)(i / off->E), x = (int)(i % off->E);

			res[i] = off->layers[l].slot_of_h[x] >= 0;
			bytes[i] = off->expert_bytes;
			/* a resident expert the CPU could not compute (no packed copy and act-order: no
			 * view) is never evicted: 0 bytes make no room, so it is never proposed, and a
			 * round that would only propose it does not repeat forever */
			if (res[i] && !evictable(off, l, x))
				bytes[i] = 0;
		}
		memset(&ro, 0, sizeof(ro));
		ro.hysteresis = 0.25;
		ro.z = 3;
		const char *mt = getenv("QWEN3D_REBALANCE_MIN_TOKENS"); /* tests: act on little evidence */

		ro.min_tokens = mt && atof(mt) >= 0 ? atof(mt) : 1000;
		ro.max_bytes = max_bytes;
		ro.same_layer = true;
		ns = q3_xstats_rebalance(off->xs, res, bytes, &ro, swaps, max);
	}
	free(res);
	free(bytes);
	return ns;
}

extern "C" int q3_off_swap_slot(const struct q3_offload *off, int layer, int x_in, int x_out)
{
	const struct off_layer *ol = &off->layers[layer];

	if (ol->slot_of_h[x_out] < 0 || ol->slot_of_h[x_in] >= 0 || !evictable(off, layer, x_out))
		return -1;
	return ol->slot_of_h[x_out];
}

extern "C" int q3_off_swap_commit(struct q3_offload *off, int layer, int x_in, int x_out, q3_err *e)
{
	struct off_layer *ol = &off->layers[layer];
	struct q3_xexpert *v = &off->views[(size_t)layer * off->E + x_out];
	int slot = ol->slot_of_h[x_out], err;

	if (slot < 0 || ol->slot_of_h[x_in] >= 0)
		return q3_errf(e, -EINVAL, "offload: swap of layer %d: expert %d not resident or %d already", layer,
			       x_out, x_in);
	if (!v->H && (err = q3_xexpert_gptq(v, &off->m->layers[layer].experts[x_out], e)))
		return err;
	ol->slot_of_h[x_in] = (int16_t)slot;
	ol->slot_of_h[x_out] = -1;
	ol->slot_expert[slot] = x_in;
	ol->table[x_in] = NULL;
	ol->table[x_out] = v;
	CUDA_CHECK(e, cudaMemcpy(ol->slot_of_d, ol->slot_of_h, sizeof(int16_t) * off->E, cudaMemcpyHostToDevice));
	return 0;
}

extern "C" void q3_off_stats(const struct q3_offload *off, struct q3_off_stats *s)
{
	struct q3_cpu_moe_stats cs;

	memset(s, 0, sizeof(*s));
	if (!off)
		return;
	s->active = off->active;
	s->experts_total = off->L * off->E;
	s->budget_bytes = off->budget;
	for (int l = 0; l < off->L && off->layers; l++)
		s->experts_vram += off->E - off->layers[l].ncpu;
	s->pcie_bytes = off->pcie;
	s->uploads = off->uploads;
	s->tokens = off->tokens;
	s->pairs_gpu = off->pairs_gpu;
	s->pairs_cpu = off->pairs_cpu;
	s->cpu_threads = off->nthreads;
	s->cpu_node = off->node;
	s->pcie_experts = off->hx_max;
	s->pcie_experts_now = off->hx_cur;
	snprintf(s->isa, sizeof(s->isa), "%s", off->active ? q3_xisa_name(off->isa) : "-");
	if (off->moe) {
		q3_cpu_moe_stats(off->moe, &cs);
		s->pairs_cpu += cs.pairs;
		s->pairs_gpu += cs.skipped;
		s->pairs_pcie = cs.elsewhere;
		s->pcie_bytes += cs.elsewhere * off->hx_bytes;
		s->cpu_bytes = cs.bytes;
		s->cpu_busy_s = cs.busy_s;
		s->cpu_phase_s[0] = cs.act_s;
		s->cpu_phase_s[1] = cs.gateup_s;
		s->cpu_phase_s[2] = cs.down_s;
	}
	if (off->prof) {
		prof_read(off->prof, 0);
		prof_read(off->prof, 1);
		for (int i = 0; i < PF_N; i++)
			s->prefill_phase_s[i] = off->prof->s[i];
		s->prefill_layers = off->prof->calls;
	}
	s->copy_alone_gbps = off->copy_alone_gbps;
}
