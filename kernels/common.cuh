/* common.cuh - what every CUDA file of kernels/ shares: the one error check (CUDA_CHECK), fp16/bf16
 * helpers, warp reductions, the tensor-core mma wrapper and the streaming weight load.
 *
 * Error handling follows the project's rule (library code returns -errno with a one-line reason):
 * CUDA_CHECK(e, stmt) runs a CUDA runtime call and, if it fails, fills *e with the statement,
 * the function, file:line and the device, and returns -EIO from the enclosing function.
 */
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "gpu_config.h"

extern "C" {
#include "util.h"
}

/* Fills e with "FILE:LINE FUNC: STMT: cudaErrorX (text) on device N (name)"; returns -EIO. */
extern "C" int q3_cuda_fail(q3_err *e, cudaError_t err, const char *stmt, const char *func, const char *file,
		 int line);

#define CUDA_CHECK(e, stmt)                                                                        \
	do {                                                                                       \
		cudaError_t cuda_check_err_ = (stmt);                                              \
		if (cuda_check_err_ != cudaSuccess)                                                \
			return q3_cuda_fail((e), cuda_check_err_, #stmt, __func__, __FILE__, __LINE__); \
	} while (0)

/* After a kernel launch: the launch's own error (bad configuration, too much shared memory). */
#define CUDA_CHECK_LAUNCH(e) CUDA_CHECK(e, cudaGetLastError())

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

static __device__ __forceinline__ float bf2f(bf16 x)
{
	return __bfloat162float(x);
}

static __device__ __forceinline__ bf16 f2bf(float x)
{
	return __float2bfloat16_rn(x);
}

/* Two floats as one bf16x2 word (lo = a, the lower index). */
static __device__ __forceinline__ uint32_t pack_bf2(float a, float b)
{
	bf162 v = __floats2bfloat162_rn(a, b);
	return *reinterpret_cast<uint32_t *>(&v);
}

/* fp16 is what the tensor-core path carries (11 significant bits: activations rounded 8x less
 * than bf16); values beyond its range saturate to +-65504 instead of becoming infinite (NaN
 * stays NaN). */
static __device__ __forceinline__ float sat_f16(float x)
{
	return x > 65504.0f ? 65504.0f : x < -65504.0f ? -65504.0f : x;
}

/* Two floats as one fp16x2 word (lo = a, the lower index), saturating. */
static __device__ __forceinline__ uint32_t pack_h2(float a, float b)
{
	__half2 v = __floats2half2_rn(sat_f16(a), sat_f16(b));
	return *reinterpret_cast<uint32_t *>(&v);
}

/* One float as fp16 bits, saturating. */
static __device__ __forceinline__ uint16_t f2h_bits(float x)
{
	return __half_as_ushort(__float2half_rn(sat_f16(x)));
}

static __device__ __forceinline__ float h_bits2f(uint16_t h)
{
	return __half2float(__ushort_as_half(h));
}

/* n / d and n % d for 0 <= n < 2^20 and 1 <= d < 2^20 by d's reciprocal, a few instructions where
 * an integer division by a value known only at run time is ~25 (ncu: a fifth of experts up's
 * instructions at 16 rows outside its k-steps were such divisions).  Exact: (n + 1/2) / d is at
 * least 1 / (2d) from an integer, and the product's relative error (the reciprocal's rounding and
 * its own) is under 2^-23, so under 1 / (8d) for n < 2^20 (checked on the host for every n < 2^20
 * and d <= 4096). */
struct small_div {
	float r;
	int d;

	__device__ __forceinline__ explicit small_div(int d_) : r(1.0f / (float)d_), d(d_) {}
	__device__ __forceinline__ int div(int n) const { return (int)(((float)n + 0.5f) * r); }
	__device__ __forceinline__ int mod(int n, int q) const { return n - q * d; } /* q = div(n) */
};

static __device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

static __device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

/* rs[r] = rsqrt(mean(h[r]²) + eps) for rows r < R, one warp a row: a row's sum is formed in the
 * same order whatever R and the block size (a row's results must not depend on its batch; and
 * q3g_add_rmsnorm uses it too, so that a norm folded into staging and one written out first give
 * the same fp16 inputs), and a warp's loads (16 bytes a lane where rows are aligned) are in
 * flight together instead of one round trip per row (U loads a lane a round trip: 16 take a row
 * of 2048 in one, where registers allow; the order of the sum is the same).  rows (optional): row r
 * is h's row rows[r].  No barrier inside. */
template <int U = 8>
static __device__ __forceinline__ void row_rsqrt(float *rs, const float *h, int ldh, int R, int K, float eps,
						 const int *rows = nullptr)
{
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
	const bool vec = (K & 3) == 0 && (ldh & 3) == 0 && ((uintptr_t)h & 15) == 0;

	for (int r = warp; r < R; r += nw) {
		const float *hr = h + (size_t)(rows ? rows[r] : r) * ldh;
		float ss = 0.0f;

		/* explicit fmaf: the same rounding wherever this is inlined (q3g_add_rmsnorm too) */
		if (vec) {
#pragma unroll U
			for (int i = lane; i < (K >> 2); i += 32) {
				float4 v = ((const float4 *)hr)[i];

				ss = fmaf(v.w, v.w, fmaf(v.z, v.z, fmaf(v.y, v.y, fmaf(v.x, v.x, ss))));
			}
		} else {
#pragma unroll 8
			for (int i = lane; i < K; i += 32)
				ss = fmaf(hr[i], hr[i], ss);
		}
		ss = warp_sum(ss);
		if (lane == 0)
			rs[r] = rsqrtf(ss / (float)K + eps);
	}
}

/* Sum over a block whose size is a multiple of 32 (<= 1024); red: 32 floats of shared memory.
 * Every thread gets the total.  Contains __syncthreads: call from every thread. */
static __device__ __forceinline__ float block_sum(float v, float *red)
{
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;

	v = warp_sum(v);
	__syncthreads(); /* red may still be read by a previous call */
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < nw ? red[lane] : 0.0f;
	return warp_sum(v);
}

/* Max over a block, like block_sum: every thread gets it. */
static __device__ __forceinline__ float block_max(float v, float *red)
{
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;

	v = warp_max(v);
	__syncthreads(); /* red may still be read by a previous call */
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < nw ? red[lane] : -INFINITY;
	return warp_max(v);
}

static __device__ __forceinline__ float dev_sigmoid(float x)
{
	return 1.0f / (1.0f + __expf(-x));
}

static __device__ __forceinline__ float dev_silu(float x)
{
	return x / (1.0f + __expf(-x));
}

/* silu with the fast division (two instructions, not an IEEE division's ten: the experts' down
 * projections run it for every activation); 0 where exp(-x) overflows, as the limit is. */
static __device__ __forceinline__ float silu_fast(float x)
{
	return __fdividef(x, 1.0f + __expf(-x));
}

/* d += a * b: one m16n8k16 tensor-core product, fp16 inputs, fp32 accumulators.
 * a: 4 words (rows g, g+8 x k pairs 2t, 2t+8), b: 2 words (k pairs 2t, 2t+8 of token g),
 * d: rows g, g+8 x tokens 2t, 2t+1 (g = lane / 4, t = lane % 4). */
static __device__ __forceinline__ void mma_f16(float d[4], const uint32_t a[4], const uint32_t b[2])
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
		     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* The same with bf16 inputs. */
static __device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], const uint32_t b[2])
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
		     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* A 16-byte weight load that is used once: read-only path, no L1 allocation. */
static __device__ __forceinline__ uint4 ldg_stream(const void *p)
{
	uint4 v;
	asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
		     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
		     : "l"(p));
	return v;
}

/* lop3: (a & b) | c. */
static __device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c)
{
	uint32_t r;
	asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
	return r;
}

/* fp16x2 a - b (exact when both are small integers, as in the dequantization). */
static __device__ __forceinline__ uint32_t h2_sub(uint32_t a, uint32_t b)
{
	__half2 r = __hsub2(*reinterpret_cast<__half2 *>(&a), *reinterpret_cast<__half2 *>(&b));
	return *reinterpret_cast<uint32_t *>(&r);
}

/* a · b + c in fp16x2, one rounding */
static __device__ __forceinline__ uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c)
{
	__half2 r = __hfma2(*reinterpret_cast<__half2 *>(&a), *reinterpret_cast<__half2 *>(&b),
			    *reinterpret_cast<__half2 *>(&c));
	return *reinterpret_cast<uint32_t *>(&r);
}

/* ---- programmatic dependent launch (sm_90, opt-in: QWEN3D_PDL=1) --------------------------------
 * Kernels of the decode path are launched with q3g_launch, which (where enabled) lets a kernel
 * start while the previous one finishes.  Every such kernel therefore begins with pdl_trigger()
 * (its own dependents may launch) and calls pdl_wait() - which returns once the previous kernel
 * has completed and its writes are visible - before it reads or writes anything another kernel
 * touches, in every block (an early-exiting block waits first too, so that completion stays
 * transitive).  Work that touches no such memory (loading weights into registers) goes between
 * the two.  Without the launch attribute both are no-ops.  Off by default: on the H200 a decode
 * step was faster without it (CUDA.md). */
static __device__ __forceinline__ void pdl_trigger(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static __device__ __forceinline__ void pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Asynchronous copies from global to shared memory (sm_80+), completed by groups: 16 bytes
 * (both addresses 16-byte aligned, L1 bypassed) or 4. */
static __device__ __forceinline__ void cp_async16(void *smem, const void *g)
{
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
		     "l"(g) : "memory");
}

/* 16 bytes from g, or zeros where !valid (cp.async's source size 0: nothing read) */
static __device__ __forceinline__ void cp_async16_or0(void *smem, const void *g, bool valid)
{
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
		     "l"(g), "r"(valid ? 16 : 0) : "memory");
}

static __device__ __forceinline__ void cp_async4(void *smem, const void *g)
{
	asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
		     "l"(g) : "memory");
}

static __device__ __forceinline__ void cp_async_commit(void)
{
	asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N> static __device__ __forceinline__ void cp_async_wait(void)
{
	asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* ---- mbarriers (sm_90) ---------------------------------------------------------------------- */

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
static __device__ __forceinline__ uint32_t smem_u32(const void *p)
{
	return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void bar_init(uint64_t *b, int count)
{
	asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}

/* This thread's mbarrier inits seen by the copy engine and the cluster's other blocks (the async
 * proxy) before any of them signals one. */
static __device__ __forceinline__ void bar_init_fence(void)
{
	asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

static __device__ __forceinline__ void bar_arrive(uint64_t *b)
{
	asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_u32(b)) : "memory");
}

/* Arrives on b and adds bytes to the transfer count its phase waits for. */
static __device__ __forceinline__ void bar_expect(uint64_t *b, uint32_t bytes)
{
	asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(smem_u32(b)),
		     "r"(bytes)
		     : "memory");
}

/* Waits for the phase of the given parity to complete (try_wait: the hardware suspends the warp
 * for a while rather than spinning on the issue slots the others need). */
static __device__ __forceinline__ void bar_wait(uint64_t *b, uint32_t parity)
{
	uint32_t done;

	do {
		asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
			     " selp.u32 %0, 1, 0, p;\n}\n"
			     : "=r"(done)
			     : "r"(smem_u32(b)), "r"(parity)
			     : "memory");
	} while (!done);
}
#endif

/* ---- thread-block clusters (sm_90; CL = 1: none, the block alone) ---------------------------- */

/* The wait that matches cluster_sum::init's arrival, where no cluster_sum::send waits first: after
 * it every block's barriers are set up (cluster_gather::send may start). */
template <int CL> static __device__ __forceinline__ void cluster_ready()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	if constexpr (CL > 1)
		asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* Block b's counterpart of this block's shared address p. */
static __device__ __forceinline__ uint32_t cluster_map(const void *p, uint32_t b)
{
	uint32_t r;

	asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(smem_u32(p)), "r"(b));
	return r;
}

/* x into block b's counterpart of this block's shared word slot, counted (4 bytes) by block b's
 * counterpart of bar: st.async, no barrier over the cluster (cluster_sum, cluster_gather) */
static __device__ __forceinline__ void st_async_at(uint32_t b, float *slot, uint64_t *bar, float x)
{
	const uint32_t rv = cluster_map(slot, b), rb = cluster_map(bar, b);

	asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(rv),
		     "r"(__float_as_uint(x)), "r"(rb)
		     : "memory");
}

/* ... and 16 bytes (slot 16-byte aligned), counted as 16 (xs_push) */
static __device__ __forceinline__ void st_async_v4_at(uint32_t b, void *slot, uint64_t *bar, const uint4 &v)
{
	const uint32_t rv = cluster_map(slot, b), rb = cluster_map(bar, b);

	asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(rv),
		     "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(rb)
		     : "memory");
}
#endif

/* The sums over a cluster of N values a block, each added in rank order (deterministic), without
 * a barrier over the cluster in their path: each block stores its values into its rank's slots of
 * every block with st.async, which counts the bytes into the receiver's mbarrier, and a block goes
 * on once its CL · N slots have landed.  (Two cluster barriers in its place, each a fence to the
 * whole GPU and an L1 invalidation, were 21% of the delta rule's stall samples at 16 rows.)  Every
 * thread calls init() first thing in the kernel, then either sum() (N = 1) or send() and then
 * total() for each value it needs; CL == 1: the values themselves. */
template <int CL, int N = 1> struct cluster_sum {
	float v[CL][N];
	uint64_t bar;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	/* x into this block's slot i of block b's v, counted by b's bar */
	__device__ __forceinline__ void put(uint32_t b, uint32_t i, float x)
	{
		st_async_at(b, &v[cooperative_groups::this_cluster().block_rank()][i], &bar, x);
	}
#endif

	__device__ __forceinline__ void init()
	{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		if constexpr (CL > 1) {
			if (threadIdx.x == 0) {
				bar_init(&bar, 1);
				bar_expect(&bar, CL * N * sizeof(float)); /* the one arrival; the bytes to come */
				bar_init_fence();
			}
			/* the others' stores wait (in send) for this arrival of every thread */
			asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
		}
#endif
	}

	/* x[0 .. N): the block's values, in its shared memory (threads 0 .. CL · N - 1 send them);
	 * every thread calls it */
	__device__ __forceinline__ void send(const float *x)
	{
		if constexpr (CL == 1) {
			if ((int)threadIdx.x < N)
				v[0][threadIdx.x] = x[threadIdx.x];
			__syncthreads();
		} else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
			cluster_ready<CL>(); /* every block's bar is set up */
			if ((int)threadIdx.x < CL * N)
				put(threadIdx.x / N, threadIdx.x % N, x[threadIdx.x % N]);
#else
			__trap(); /* the host launches clusters on sm_90 only */
#endif
		}
	}

	/* value i's sum over the cluster's blocks (after send) */
	__device__ __forceinline__ float total(int i)
	{
		if constexpr (CL > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
			bar_wait(&bar, 0);
#endif
		}
		float t = 0.0f;

#pragma unroll
		for (int b = 0; b < CL; b++)
			t += v[b][i];
		return t;
	}

	/* The sum of every block's N values x[0 .. N), in (block rank, i) order: threads 0 .. CL · N - 1
	 * send them; every thread calls it and gets the sum */
	__device__ __forceinline__ float sum_all(const float (&x)[N])
	{
		if constexpr (CL == 1) {
			float t = x[0];

#pragma unroll
			for (int i = 1; i < N; i++)
				t += x[i];
			return t;
		} else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
			cluster_ready<CL>(); /* every block's bar is set up */
			if ((int)threadIdx.x < CL * N) {
				float xi = x[0];

#pragma unroll
				for (int i = 1; i < N; i++) /* x[threadIdx.x % N], without a local array */
					if ((int)threadIdx.x % N == i)
						xi = x[i];
				put(threadIdx.x / N, threadIdx.x % N, xi);
			}
			bar_wait(&bar, 0);
			float t = 0.0f;

#pragma unroll
			for (int b = 0; b < CL; b++)
#pragma unroll
				for (int i = 0; i < N; i++)
					t += v[b][i];
			return t;
#else
			__trap(); /* the host launches clusters on sm_90 only */
			return x[0];
#endif
		}
	}
};

/* N values a block added over a cluster at rank 0, in rank order: the k-slices of one tile, which
 * only rank 0 stores.  Ranks 1 .. CL - 1 send theirs by st.async into rank 0's shared memory,
 * counted by its mbarrier, and may leave at once; rank 0 keeps its own in registers (the slots of
 * the others fit the 4 KB of static shared memory a kernel has).  Two cluster barriers in its
 * place, each a fence to the whole GPU behind the block's stores, were ~10% of the router's stall
 * samples at 16 rows (ncu).  init(n) first thing, before cluster_sum::init (whose fence and arrival
 * publish this barrier too: the two share the cluster's one arrival); send after that arrival's
 * wait (cluster_sum::send or cluster_ready); rank 0's threads wait, then total(i, own).  CL == 1:
 * the block's own values. */
template <int CL, int N> struct cluster_gather {
	float v[CL > 1 ? CL - 1 : 1][N]; /* rank b's value i in v[b - 1][i] */
	uint64_t bar;

	/* n: the values each block sends (<= N) */
	__device__ __forceinline__ void init(int n)
	{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		if (CL > 1 && threadIdx.x == 0) {
			bar_init(&bar, 1);
			bar_expect(&bar, (uint32_t)((CL - 1) * n * sizeof(float)));
		}
#endif
	}

	/* value i (< n) of this block, rank b > 0 */
	__device__ __forceinline__ void send(int b, int i, float x)
	{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		if constexpr (CL > 1) {
			st_async_at(0, &v[b - 1][i], &bar, x);
			return;
		}
#endif
		__trap(); /* no other rank without clusters (sm_90 only) */
	}

	/* rank 0: the others' values have landed */
	__device__ __forceinline__ void wait()
	{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
		if constexpr (CL > 1)
			bar_wait(&bar, 0);
#endif
	}

	/* value i's sum over the blocks from zero, rank 0's own first (after wait) */
	__device__ __forceinline__ float total(int i, float own) const
	{
		float t = 0.0f + own;

#pragma unroll
		for (int b = 0; b < CL - 1; b++)
			t += v[b][i];
		return t;
	}
};

/* rs[r] = row_rsqrt's value of row r < R, the rows split over a cluster of CL blocks (rank takes
 * rows rank, rank + CL, ..) and gathered with cluster_sum cs (one value and zeros add up to the
 * value: the same bits as row_rsqrt of every row), where every block read the whole rows (the
 * router at 16 rows: 17 MB from L2).  Every thread calls it after cs.init(); rs is complete
 * after a barrier of the block. */
template <int U, int CL, int N>
static __device__ __forceinline__ void cluster_row_rsqrt(float *rs, cluster_sum<CL, N> &cs, const float *h, int ldh,
							 int R, int K, float eps, int rank)
{
	__shared__ float own[(N + CL - 1) / CL], mine[N];

	row_rsqrt<U>(own, h + (size_t)rank * ldh, CL * ldh, (R - rank + CL - 1) / CL, K, eps);
	__syncthreads();
	if ((int)threadIdx.x < N)
		mine[threadIdx.x] = (int)threadIdx.x < R && (int)threadIdx.x % CL == rank ? own[threadIdx.x / CL] : 0.0f;
	__syncthreads();
	cs.send(mine);
	if ((int)threadIdx.x < R)
		rs[threadIdx.x] = cs.total(threadIdx.x);
}

/* Whether q3g_launch asks for programmatic dependent launch (set by q3g_init). */
extern bool q3g_pdl;

/* kernel<<<grid, block, smem, st>>>(args...) in clusters of the given shape (sm_90: (1, 1, 1) is
 * none), with programmatic stream serialization when q3g_pdl. */
template <typename... KArgs, typename... Args>
static cudaError_t q3g_launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
				      dim3 cluster, Args &&...args)
{
	cudaLaunchConfig_t cfg = {};
	cudaLaunchAttribute attr[2];

	cfg.gridDim = grid;
	cfg.blockDim = block;
	cfg.dynamicSmemBytes = smem;
	cfg.stream = st;
	cfg.attrs = attr;
	if (cluster.x * cluster.y * cluster.z > 1) {
		attr[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
		attr[cfg.numAttrs].val.clusterDim.x = cluster.x;
		attr[cfg.numAttrs].val.clusterDim.y = cluster.y;
		attr[cfg.numAttrs].val.clusterDim.z = cluster.z;
		cfg.numAttrs++;
	}
	if (q3g_pdl && st) { /* not on the legacy default stream */
		attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
		attr[cfg.numAttrs].val.programmaticStreamSerializationAllowed = 1;
		cfg.numAttrs++;
	}
	return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

/* kernel<<<grid, block, smem, st>>>(args...), with programmatic stream serialization when q3g_pdl. */
template <typename... KArgs, typename... Args>
static cudaError_t q3g_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
			      Args &&...args)
{
	return q3g_launch_cluster(kernel, grid, block, smem, st, dim3(1, 1, 1), static_cast<Args &&>(args)...);
}

static __host__ __device__ __forceinline__ int cdiv(int a, int b)
{
	return (a + b - 1) / b;
}
