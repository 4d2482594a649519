/* gpu_device.cu - the device as the kernels see it: q3g_init (read the device's facts once,
 * configure the kernels that opt in to large shared memory), the measured copy bandwidth, and
 * q3g_gemm (a Linear on many rows through cuBLAS). */
#include <cublas_v2.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_internal.h"

struct q3g_device q3g_dev;
bool q3g_pdl;

extern "C" int q3_cuda_fail(q3_err *e, cudaError_t err, const char *stmt, const char *func,
			    const char *file, int line)
{
	int dev = -1;
	char name[256] = "?";
	cudaDeviceProp prop;

	if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&prop, dev) == cudaSuccess)
		snprintf(name, sizeof(name), "%s", prop.name);
	return q3_errf(e, -EIO, "%s:%d %s: %s: %s (%s) on device %d (%s)", file, line, func, stmt,
		       cudaGetErrorName(err), cudaGetErrorString(err), dev, name);
}

extern "C" int q3g_init(q3_err *e)
{
	cudaDeviceProp prop;
	const char *env;
	int dev, optin = 0, err;

	CUDA_CHECK(e, cudaGetDevice(&dev));
	CUDA_CHECK(e, cudaGetDeviceProperties(&prop, dev));
	CUDA_CHECK(e, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
	q3g_dev.id = dev;
	q3g_dev.sms = prop.multiProcessorCount;
	q3g_dev.cc = prop.major * 10 + prop.minor;
	q3g_dev.smem_optin = (size_t)optin;
	q3g_dev.smem_dyn = (size_t)optin - Q3G_SMEM_STATIC_MAX;
	q3g_dev.smem_sm = (size_t)prop.sharedMemPerMultiprocessor;
	q3g_dev.l2 = (size_t)prop.l2CacheSize;
	q3g_dev.clusters = q3g_dev.cc >= 90 && !getenv("QWEN3D_NO_CLUSTERS");
	if (q3g_dev.cc < 80)
		return q3_errf(e, -ENOTSUP, "device %d (%s): compute capability %d.%d, the kernels need 8.0 or newer",
			       dev, prop.name, prop.major, prop.minor);
	/* programmatic dependent launch: sm_90 and newer, where QWEN3D_PDL=1 asks for it (decode on
	 * the H200 was 3-4% faster without it: CUDA.md) */
	q3g_pdl = q3g_dev.cc >= 90 && (env = getenv("QWEN3D_PDL")) && !strcmp(env, "1");
	if ((err = q3g_mmv_init(e)) || (err = q3g_moe_init(e)) || (err = q3g_mm_init(e)) || (err = q3g_delta_init(e)) ||
	    (err = q3g_attn_init(e)))
		return err;
	return 0;
}

extern "C" double q3g_copy_bandwidth(size_t bytes, int reps, q3_err *e)
{
	void *a = NULL, *b = NULL;
	cudaEvent_t t0 = NULL, t1 = NULL;
	float ms = 0.0f;
	double gbs = -EIO;

	if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess ||
	    cudaMemset(a, 1, bytes) != cudaSuccess || cudaEventCreate(&t0) != cudaSuccess ||
	    cudaEventCreate(&t1) != cudaSuccess) {
		q3_errf(e, -ENOMEM, "copy bandwidth: cannot allocate 2 x %zu bytes", bytes);
		goto out;
	}
	cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice); /* warm up */
	cudaEventRecord(t0);
	for (int i = 0; i < reps; i++)
		cudaMemcpyAsync(i & 1 ? a : b, i & 1 ? b : a, bytes, cudaMemcpyDeviceToDevice);
	cudaEventRecord(t1);
	if (cudaEventSynchronize(t1) != cudaSuccess || cudaEventElapsedTime(&ms, t0, t1) != cudaSuccess) {
		q3_errf(e, -EIO, "copy bandwidth: %s", cudaGetErrorString(cudaGetLastError()));
		goto out;
	}
	gbs = 2.0 * (double)bytes * reps / (ms * 1e-3) / 1e9;
out:
	if (t0)
		cudaEventDestroy(t0);
	if (t1)
		cudaEventDestroy(t1);
	cudaFree(a);
	cudaFree(b);
	return gbs;
}

int q3g_cublas_stream(void *h, cudaStream_t st)
{
	cudaStream_t cur = NULL;

	if (cublasGetStream((cublasHandle_t)h, &cur) == CUBLAS_STATUS_SUCCESS && cur == st)
		return CUBLAS_STATUS_SUCCESS;
	return (int)cublasSetStream((cublasHandle_t)h, st);
}

extern "C" int q3g_gemm(void *cublas, const struct q3g_job *job, int R, uint16_t *wtmp, q3g_stream st, q3_err *e)
{
	const struct q3g_mat *m = &job->w;
	cublasHandle_t h = (cublasHandle_t)cublas;
	const float one = 1.0f, zero = 0.0f;
	cublasStatus_t cs;
	int err;

	if ((err = q3g_mat_expand(m, 0, wtmp, st, e)))
		return err;
	if ((cs = (cublasStatus_t)q3g_cublas_stream(h, (cudaStream_t)st)) != CUBLAS_STATUS_SUCCESS)
		return q3_errf(e, -EIO, "gemm: cublasSetStream: status %d", (int)cs);
	/* Y col-major [N][R] (ld ldy) = W (T of col-major [K][N]) · X (col-major [K][R], ld ldx) */
	cs = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m->N, R, m->K, &one, wtmp, CUDA_R_16F, m->K, job->x,
			  CUDA_R_16F, job->ldx, job->epi == Q3G_EPI_ADD ? &one : &zero, job->y, CUDA_R_32F,
			  job->ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
	if (cs != CUBLAS_STATUS_SUCCESS)
		return q3_errf(e, -EIO, "gemm: cublasGemmEx [%d x %d x %d]: status %d", R, m->N, m->K, (int)cs);
	return 0;
}
