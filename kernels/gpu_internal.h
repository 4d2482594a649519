/* gpu_internal.h - what the CUDA files of kernels/ share beyond gpu.h: the facts of the current
 * device (read once by q3g_init) and each file's one-time setup. */
#pragma once
#include "common.cuh"
#include "gpu.h"

struct q3g_device {
	int id;
	int sms;
	int cc;		   /* compute capability, 10 * major + minor */
	size_t smem_optin; /* shared memory a block may opt in to (static + dynamic) */
	size_t smem_dyn;   /* dynamic shared memory the kernels here may ask for: the opt-in limit
			    * less Q3G_SMEM_STATIC_MAX for their own static __shared__ arrays */
	size_t smem_sm;	   /* shared memory of an SM, all its blocks together */
	size_t l2;
	bool clusters;	   /* thread-block clusters: sm_90 and newer, unless QWEN3D_NO_CLUSTERS is set */
};

extern struct q3g_device q3g_dev;

/* Whether m's scale groups are whole 64-input chunks (or it has none): the kernels' WHOLE
 * instances test a group's end once a chunk (run_chunks). */
static inline bool q3g_whole_groups(const struct q3g_mat *m)
{
	return m->fmt == Q3G_F16 || !(m->gsteps & 3);
}

/* The most static __shared__ memory a kernel with a large dynamic area may declare (checked at
 * init): cudaFuncSetAttribute refuses a dynamic limit that, with the static part, passes the
 * opt-in limit. */
#define Q3G_SMEM_STATIC_MAX 4096

/* Lets func take q3g_dev.smem_dyn bytes of dynamic shared memory. */
template <typename F>
static inline int q3g_allow_dyn_smem(F *func, const char *name, q3_err *e)
{
	cudaFuncAttributes a;

	CUDA_CHECK(e, cudaFuncGetAttributes(&a, (const void *)func));
	if (a.sharedSizeBytes > Q3G_SMEM_STATIC_MAX)
		return q3_errf(e, -EINVAL, "%s: %zu bytes of static shared memory, more than the %d reserved", name,
			       (size_t)a.sharedSizeBytes, Q3G_SMEM_STATIC_MAX);
	CUDA_CHECK(e, cudaFuncSetAttribute((const void *)func, cudaFuncAttributeMaxDynamicSharedMemorySize,
					   (int)q3g_dev.smem_dyn));
	return 0;
}

/* Puts cuBLAS handle h on stream st unless it is there already (cublasSetStream also drops the
 * workspace set with cublasSetWorkspace, so calling it every time makes cuBLAS allocate its own). */
int q3g_cublas_stream(void *h, cudaStream_t st);

int q3g_mmv_init(q3_err *e);
int q3g_moe_init(q3_err *e);
int q3g_moe_down_init(q3_err *e); /* gpu_moe_down.cu, called by q3g_moe_init */
/* gpu_moe_down_regs.cu: q3g_moe_down before sm_90, where a tile does not fit its ring, or forced
 * (called by q3g_moe_down with checked arguments and R >= 1) */
struct q3g_down_args { /* q3g_moe_down's arguments (gpu.h), as both its kernels take them */
	struct q3g_mat mat[2]; /* the routed experts' down stack, the shared expert's down */
	const uint16_t *act;
	const int *idx;
	const float *w;
	float *h;
	int k, H, lda, R;
};
int q3g_moe_down_regs(const struct q3g_down_args *a, cudaStream_t st, q3_err *e);
int q3g_moe_down_regs_init(q3_err *e);
int q3g_mm_init(q3_err *e);
int q3g_delta_init(q3_err *e);
int q3g_attn_init(q3_err *e);
