/* common.cuh - what every CUDA file of kernels/ shares: the one error check (CUDA_CHECK), bf16
 * helpers, warp reductions, the tensor-core mma wrapper and the streaming weight load.
 *
 * Error handling follows the project's rule (library code returns -errno with a one-line reason):
 * CUDA_CHECK(e, stmt) runs a CUDA runtime call and, if it fails, fills *e with the statement,
 * the function, file:line and the device, and returns -EIO from the enclosing function.
 */
#pragma once
#include <cuda_bf16.h>
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

static __device__ __forceinline__ float dev_sigmoid(float x)
{
	return 1.0f / (1.0f + __expf(-x));
}

static __device__ __forceinline__ float dev_silu(float x)
{
	return x / (1.0f + __expf(-x));
}

/* d += a * b: one m16n8k16 tensor-core product, bf16 inputs, fp32 accumulators.
 * a: 4 words (rows g, g+8 x k pairs 2t, 2t+8), b: 2 words (k pairs 2t, 2t+8 of token g),
 * d: rows g, g+8 x tokens 2t, 2t+1 (g = lane / 4, t = lane % 4). */
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

/* bf16x2 a - b (exact when both are small integers, as in the dequantization below). */
static __device__ __forceinline__ uint32_t bf2_sub(uint32_t a, uint32_t b)
{
	bf162 r = __hsub2(*reinterpret_cast<bf162 *>(&a), *reinterpret_cast<bf162 *>(&b));
	return *reinterpret_cast<uint32_t *>(&r);
}

static __host__ __device__ __forceinline__ int cdiv(int a, int b)
{
	return (a + b - 1) / b;
}
