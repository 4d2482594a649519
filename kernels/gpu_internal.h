/* gpu_internal.h - what the CUDA files of kernels/ share beyond gpu.h: the facts of the current
 * device (read once by q3g_init) and each file's one-time setup. */
#pragma once
#include "common.cuh"
#include "gpu.h"

struct q3g_device {
	int id;
	int sms;
	int cc;		   /* compute capability, 10 * major + minor */
	size_t smem_optin; /* shared memory a block may opt in to */
	size_t l2;
};

extern struct q3g_device q3g_dev;

int q3g_mmv_init(q3_err *e);
int q3g_moe_init(q3_err *e);
int q3g_mm_init(q3_err *e);
int q3g_attn_init(q3_err *e);
int q3g_delta_init(q3_err *e);
