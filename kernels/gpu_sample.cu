/* gpu_sample.cu - sampling on the device, one block per row of logits, with the rules of the C
 * reference sampler (userspace/sampler.h, server branch), penalties excepted (the caller applies
 * them to the logits first):
 *   greedy      temperature < 1e-5 or top_k == 1: the argmax, lowest id on ties, NaN never wins;
 *   candidates  z = logit / temperature for every logit that is not -inf or NaN (+inf logits
 *               share all the mass: they become 0 and every other candidate -inf);
 *   top_k       the k best in the order (z desc, id asc);
 *   top_p       of those, the shortest prefix in that order whose mass sum(exp(z - zmax)) reaches
 *               top_p of the total (at least one);
 *   min_p       drop exp(z - zmax) < min_p;
 *   draw        u = splitmix64 uniform(seed, step); walk the kept ids in ascending order,
 *               accumulating exp(z - zmax) in double; the first whose running sum exceeds
 *               u · total.
 * Ranks are found without sorting: every candidate gets the 64-bit key (z as an orderable
 * integer, then the complement of its id), so "better" is "larger key" and keys are distinct;
 * a radix select over 8-bit digits finds the k-th key (by count) and the top_p cut (by mass).
 * Output -1 where no logit is a candidate (the reference's -EDOM).
 */
#include "gpu_internal.h"

#define SAMPLE_THREADS 1024

static __device__ __forceinline__ uint64_t cand_key(float z, int id)
{
	uint32_t b = __float_as_uint(z);

	b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
	return ((uint64_t)b << 32) | (uint32_t)(0xFFFFFFFFu - (uint32_t)id);
}

/* The candidate value of logit l (NaN: not a candidate). */
static __device__ __forceinline__ float cand_z(float l, float temp, bool infmode)
{
	float z = l / temp;

	if (!(z > -INFINITY))
		return NAN;
	if (infmode)
		return isinf(z) ? 0.0f : -INFINITY;
	return z;
}

static __device__ __forceinline__ uint64_t splitmix_u53(uint64_t seed, uint64_t step)
{
	uint64_t z = seed + (step + 1) * 0x9E3779B97F4A7C15ull;

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	z ^= z >> 31;
	return z >> 11;
}

struct sample_smem {
	unsigned long long cnt[256];
	double mass[256];
	double scan[SAMPLE_THREADS];
	uint64_t pick_key;
	double acc;
	int pick_bin;
	float fred[32];
	int ired[32];
	double dred[32];
	int out;
};

static __device__ double block_sum_d(double v, double *red)
{
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5;

#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	__syncthreads();
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0;
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

static __device__ int block_max_i(int v, int *red)
{
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5;

#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
	__syncthreads();
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < (int)(blockDim.x >> 5) ? red[lane] : INT_MIN;
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

/* Radix select over the candidates with key >= lo: by count (the need-th largest key) when
 * by_mass is false, else by mass (the key at which the running mass, in descending order,
 * first reaches need).  Returns 0 when the mass never reaches need. */
static __device__ uint64_t radix_select(const float *l, int V, float temp, bool infmode, float zmax, uint64_t lo,
					bool by_mass, double need, sample_smem &sm)
{
	uint64_t prefix = 0, mask = 0;
	double above = 0.0;

	for (int shift = 56; shift >= 0; shift -= 8) {
		for (int b = threadIdx.x; b < 256; b += blockDim.x) {
			sm.cnt[b] = 0;
			sm.mass[b] = 0.0;
		}
		__syncthreads();
		for (int id = threadIdx.x; id < V; id += blockDim.x) {
			float z = cand_z(l[id], temp, infmode);

			if (isnan(z))
				continue;
			uint64_t key = cand_key(z, id);

			if (key < lo || (key & mask) != prefix)
				continue;
			int bin = (int)((key >> shift) & 255);

			if (by_mass)
				atomicAdd(&sm.mass[bin], (double)expf(z - zmax));
			else
				atomicAdd(&sm.cnt[bin], 1ull);
		}
		__syncthreads();
		if (threadIdx.x == 0) {
			double acc = by_mass ? above : 0.0;
			int pick = -1;

			for (int b = 255; b >= 0; b--) {
				double v = by_mass ? sm.mass[b] : (double)sm.cnt[b];

				if (acc + v >= need) {
					pick = b;
					break;
				}
				acc += v;
			}
			sm.pick_bin = pick;
			sm.acc = acc;
		}
		__syncthreads();
		int pick = sm.pick_bin;

		if (pick < 0)
			return 0;
		if (by_mass)
			above = sm.acc;
		else
			need -= sm.acc;
		prefix |= (uint64_t)pick << shift;
		mask |= (uint64_t)255 << shift;
		__syncthreads();
	}
	return prefix;
}

/* The weight exp(z - zmax) of id if it is kept (key >= thr, and >= min_p), else -1. */
static __device__ __forceinline__ float kept_weight(const float *l, int id, float temp, bool infmode, float zmax,
						    uint64_t thr, float min_p)
{
	float z = cand_z(l[id], temp, infmode);

	if (isnan(z) || cand_key(z, id) < thr)
		return -1.0f;
	float w = expf(z - zmax);

	return min_p > 0.0f && !(w >= min_p) ? -1.0f : w;
}

/* A row's maximum over SAMPLE_PARTS blocks (one block reading 600 KB of logits alone took 64 us
 * of a 4 ms decode step): each block's best candidate (lowest id on ties) and its count of
 * candidates, which sample_kernel merges in place of a pass over the row. */
#define SAMPLE_PARTS 64
#define SAMPLE_PART_THREADS 256
struct sample_part {
	float best;
	int id, ncand;
};

/* sampler.h's greedy rule (Q3_SAMPLER_GREEDY_T): then the raw logits, no temperature. */
static __device__ __forceinline__ bool is_greedy(const struct q3g_sampling &p)
{
	return p.temperature < 1e-5f || p.top_k == 1;
}

static __device__ __forceinline__ void take_better(float &best, int &bid, float ob, int oi)
{
	if (ob > best || (ob == best && oi >= 0 && (bid < 0 || oi < bid))) {
		best = ob;
		bid = oi;
	}
}

/* The warp's best (value, id) by take_better, in every lane. */
static __device__ __forceinline__ void warp_take_best(float &best, int &bid)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		take_better(best, bid, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, bid, o));
}

__global__ void __launch_bounds__(SAMPLE_PART_THREADS) sample_max_kernel(struct sample_part *part, const float *logits,
									  const struct q3g_sampling *params, int V)
{
	__shared__ struct sample_part red[SAMPLE_PART_THREADS / 32];
	const int row = blockIdx.y, tid = threadIdx.x, span = (V + SAMPLE_PARTS - 1) / SAMPLE_PARTS;
	const int id1 = min(V, ((int)blockIdx.x + 1) * span);
	const float *l = logits + (size_t)row * V;
	const struct q3g_sampling p = params[row];
	const bool greedy = is_greedy(p);
	const float temp = greedy ? 1.0f : p.temperature;
	float best = -INFINITY;
	int bid = -1, ncand = 0;

	/* four loads a thread in flight before the compares (one a round trip left the row's
	 * ~9 logits a thread nine round trips to L2) */
	for (int i0 = blockIdx.x * span + tid; i0 < id1; i0 += 4 * blockDim.x) {
		float v[4];

#pragma unroll
		for (int u = 0; u < 4; u++)
			if (i0 + u * (int)blockDim.x < id1)
				v[u] = l[i0 + u * blockDim.x];
#pragma unroll
		for (int u = 0; u < 4; u++) {
			const int id = i0 + u * blockDim.x;

			if (id >= id1)
				break;
			const float z = greedy ? v[u] : cand_z(v[u], temp, false);

			if (z > best) { /* NaN never wins; ascending ids keep the lowest on ties */
				best = z;
				bid = id;
			}
			ncand += !isnan(z) && !(greedy && !(z > -INFINITY));
		}
	}
	warp_take_best(best, bid);
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		ncand += __shfl_xor_sync(0xffffffffu, ncand, o);
	if ((tid & 31) == 0)
		red[tid >> 5] = (struct sample_part){ best, bid, ncand };
	__syncthreads();
	if (tid == 0) {
		for (int w = 1; w < SAMPLE_PART_THREADS / 32; w++) {
			take_better(best, bid, red[w].best, red[w].id);
			ncand += red[w].ncand;
		}
		part[(size_t)row * SAMPLE_PARTS + blockIdx.x] = (struct sample_part){ best, bid, ncand };
	}
}

__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(int32_t *out, const float *logits,
								const struct q3g_sampling *params,
								const struct sample_part *parts, int V)
{
	__shared__ sample_smem sm;
	const int row = blockIdx.x, tid = threadIdx.x;
	const float *l = logits + (size_t)row * V;
	const struct q3g_sampling p = params[row];
	const bool greedy = is_greedy(p);
	const float temp = greedy ? 1.0f : p.temperature;

	/* the maximum (and, for greedy, its lowest id) from sample_max_kernel's parts */
	float best = -INFINITY;
	int bid = -1, ncand = 0;

	if (tid < SAMPLE_PARTS) {
		const struct sample_part sp = parts[(size_t)row * SAMPLE_PARTS + tid];

		best = sp.best;
		bid = sp.id;
		ncand = sp.ncand;
	}
	warp_take_best(best, bid);
	if ((tid & 31) == 0) {
		sm.fred[tid >> 5] = best;
		sm.ired[tid >> 5] = bid;
	}
	__syncthreads();
	if (tid == 0) {
		for (int w = 1; w < (int)(blockDim.x >> 5); w++)
			take_better(best, bid, sm.fred[w], sm.ired[w]);
		sm.fred[0] = best;
		sm.out = bid;
	}
	__syncthreads();
	best = sm.fred[0];
	if (greedy) {
		if (tid == 0)
			out[row] = best > -INFINITY ? sm.out : -1;
		return;
	}
	ncand = (int)block_sum_d((double)ncand, sm.dred);
	if (ncand == 0) {
		if (tid == 0)
			out[row] = -1;
		return;
	}
	const bool infmode = isinf(best) && best > 0;
	const float zmax = infmode ? 0.0f : best;
	uint64_t thr = 1; /* every candidate's key is > 0 */

	if (p.top_k > 0 && p.top_k < ncand)
		thr = radix_select(l, V, temp, infmode, zmax, 1, false, (double)p.top_k, sm);
	if (p.top_p < 1.0f) {
		double total = 0.0;

		for (int id = tid; id < V; id += blockDim.x) {
			float z = cand_z(l[id], temp, infmode);

			if (!isnan(z) && cand_key(z, id) >= thr)
				total += (double)expf(z - zmax);
		}
		total = block_sum_d(total, sm.dred);
		uint64_t t2 = radix_select(l, V, temp, infmode, zmax, thr, true, (double)p.top_p * total, sm);

		if (t2 > thr)
			thr = t2;
	}
	/* the draw: each thread owns a run of ids; kept weights summed per run, scanned */
	const int run = (V + blockDim.x - 1) / blockDim.x, id0 = tid * run, id1 = min(V, id0 + run);
	double part = 0.0;
	int last = -1;

	for (int id = id0; id < id1; id++) {
		float w = kept_weight(l, id, temp, infmode, zmax, thr, p.min_p);

		if (w >= 0.0f) {
			part += (double)w;
			last = id;
		}
	}
	sm.scan[tid] = part;
	__syncthreads();
	for (int o = 1; o < (int)blockDim.x; o <<= 1) { /* inclusive scan */
		double v = tid >= o ? sm.scan[tid - o] : 0.0;

		__syncthreads();
		sm.scan[tid] += v;
		__syncthreads();
	}
	const double total = sm.scan[blockDim.x - 1], pre = sm.scan[tid] - part;
	const double r = (double)splitmix_u53(p.seed, p.step) * 0x1.0p-53 * total;
	const int lastk = block_max_i(last, sm.ired);

	if (tid == 0)
		sm.out = lastk; /* rounding never reached r: the last kept id, as the reference */
	__syncthreads();
	if (pre <= r && pre + part > r) {
		double cum = pre;

		for (int id = id0; id < id1; id++) {
			float w = kept_weight(l, id, temp, infmode, zmax, thr, p.min_p);

			if (w < 0.0f)
				continue;
			cum += (double)w;
			if (cum > r) {
				sm.out = id;
				break;
			}
		}
	}
	__syncthreads();
	if (tid == 0)
		out[row] = sm.out;
}

extern "C" size_t q3g_sample_scratch(int R)
{
	return (size_t)Q3_MAX(R, 1) * SAMPLE_PARTS * sizeof(struct sample_part);
}

extern "C" int q3g_sample(int32_t *out, const float *logits, const struct q3g_sampling *params, int R, int V,
			  void *ws, q3g_stream st, q3_err *e)
{
	if (R < 1)
		return 0;
	sample_max_kernel<<<dim3(SAMPLE_PARTS, R), SAMPLE_PART_THREADS, 0, (cudaStream_t)st>>>(
		(struct sample_part *)ws, logits, params, V);
	CUDA_CHECK_LAUNCH(e);
	sample_kernel<<<R, SAMPLE_THREADS, 0, (cudaStream_t)st>>>(out, logits, params, (const struct sample_part *)ws, V);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

/* A block a row: the bias entries in parallel, then (after the barrier, which orders the block's
 * global writes) the penalties; within a part ids are distinct, so no two threads add to one
 * logit, and a logit in both parts gets its bias first, as the host sampler does. */
__global__ void logits_adjust_kernel(float *logits, int V, const struct q3g_adjust_row *rows)
{
	const struct q3g_adjust_row a = rows[blockIdx.x];
	float *l = logits + (size_t)blockIdx.x * V;

	for (int i = threadIdx.x; i < a.nbias; i += blockDim.x)
		if ((unsigned)a.adj[i].id < (unsigned)V) /* the planner drops others; never write outside the row */
			l[a.adj[i].id] += a.adj[i].v;
	__syncthreads();
	for (int i = a.nbias + threadIdx.x; i < a.nbias + a.npen; i += blockDim.x)
		if ((unsigned)a.adj[i].id < (unsigned)V)
			l[a.adj[i].id] += a.adj[i].v;
}

extern "C" int q3g_logits_adjust(float *logits, int V, const struct q3g_adjust_row *rows, int R, q3g_stream st,
				 q3_err *e)
{
	if (R < 1)
		return 0;
	logits_adjust_kernel<<<R, 256, 0, (cudaStream_t)st>>>(logits, V, rows);
	CUDA_CHECK_LAUNCH(e);
	return 0;
}

