/* load_gpu.h - the loader's host-to-device copy engine (kernels/load_cuda.cu), C linkage.
 *
 * One VRAM arena (cudaMalloc), a host staging ring registered with cudaHostRegister (the loader
 * allocates it and reads file data into its slots), several streams, one event per slot.  A slot
 * whose read has completed is copied to the arena with cudaMemcpyAsync on stream slot % nstreams
 * and its event recorded; the loader reuses the slot once the event has fired.
 *
 * Without CUDA (no nvcc at build time) every call fails with -ENODEV and q3_h2d_devices says 0.
 * Errors: 0 or -errno, one line naming the CUDA call and its error string.
 */
#pragma once
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "util.h" /* C declarations: inside the extern "C" block for nvcc */

struct q3_h2d;

#ifdef HAVE_CUDA
/* Number of CUDA devices, 0 if none (or the driver is missing). */
int q3_h2d_devices(void);
/* Selects device gpu, allocates vram_bytes of VRAM, registers the ring [ring, ring + ring_bytes)
 * of nslots equal slots, creates nstreams streams. */
int q3_h2d_open(int gpu, uint64_t vram_bytes, void *ring, size_t ring_bytes, int nslots,
		int nstreams, struct q3_h2d **out, q3_err *e);
/* The VRAM arena. */
void *q3_h2d_vram(struct q3_h2d *h);
/* Starts the copy of len bytes at src (inside the ring slot `slot`) to arena + vram_off. */
int q3_h2d_copy(struct q3_h2d *h, int slot, uint64_t vram_off, const void *src, size_t len, q3_err *e);
/* 1 while slot's last copy runs, 0 once done, -errno on a CUDA error. */
int q3_h2d_busy(struct q3_h2d *h, int slot, q3_err *e);
/* Waits for slot's last copy. */
int q3_h2d_wait(struct q3_h2d *h, int slot, q3_err *e);
/* Waits for every copy. */
int q3_h2d_finish(struct q3_h2d *h, q3_err *e);
/* Synchronous device-to-host copy of n bytes at dev (anywhere in the arena): for checks. */
int q3_h2d_read(struct q3_h2d *h, const void *dev, void *dst, size_t n, q3_err *e);
/* Unregisters the ring, destroys streams and events; frees the arena unless keep_vram. */
void q3_h2d_close(struct q3_h2d *h, int keep_vram);
#else
static inline int q3_h2d_devices(void)
{
	return 0;
}
static inline int q3_h2d_open(int gpu, uint64_t vram_bytes, void *ring, size_t ring_bytes, int nslots,
			      int nstreams, struct q3_h2d **out, q3_err *e)
{
	return q3_errf(e, -ENODEV, "VRAM homes need CUDA: this qwen3d was built without nvcc");
}
static inline void *q3_h2d_vram(struct q3_h2d *h)
{
	return NULL;
}
static inline int q3_h2d_copy(struct q3_h2d *h, int slot, uint64_t vram_off, const void *src, size_t len,
			      q3_err *e)
{
	return -ENODEV;
}
static inline int q3_h2d_busy(struct q3_h2d *h, int slot, q3_err *e)
{
	return -ENODEV;
}
static inline int q3_h2d_wait(struct q3_h2d *h, int slot, q3_err *e)
{
	return -ENODEV;
}
static inline int q3_h2d_finish(struct q3_h2d *h, q3_err *e)
{
	return -ENODEV;
}
static inline int q3_h2d_read(struct q3_h2d *h, const void *dev, void *dst, size_t n, q3_err *e)
{
	return q3_errf(e, -ENODEV, "built without CUDA");
}
static inline void q3_h2d_close(struct q3_h2d *h, int keep_vram)
{
}
#endif

/* The same calls as a table: the loader uses q3_h2d_cuda unless it is given another one (tests
 * pass a host-memory fake that exercises the ring without a GPU). */
struct q3_h2d_ops {
	int (*devices)(void);
	int (*open)(int gpu, uint64_t vram_bytes, void *ring, size_t ring_bytes, int nslots, int nstreams,
		    struct q3_h2d **out, q3_err *e);
	void *(*vram)(struct q3_h2d *h);
	int (*copy)(struct q3_h2d *h, int slot, uint64_t vram_off, const void *src, size_t len, q3_err *e);
	int (*busy)(struct q3_h2d *h, int slot, q3_err *e);
	int (*wait)(struct q3_h2d *h, int slot, q3_err *e);
	int (*finish)(struct q3_h2d *h, q3_err *e);
	int (*read)(struct q3_h2d *h, const void *dev, void *dst, size_t n, q3_err *e);
	void (*close)(struct q3_h2d *h, int keep_vram);
};

#ifdef __cplusplus
}
#endif
