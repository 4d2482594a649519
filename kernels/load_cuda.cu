/* load_cuda.cu - the loader's host-to-device copies (see load_gpu.h): a VRAM arena, a registered
 * host staging ring, streams and one event per ring slot.  Deliberately plain: cudaMemcpyAsync
 * from pinned memory runs on the copy engines at PCIe speed, and several streams keep more than
 * one copy in flight while the CPU submits reads. */
#include <cuda_runtime.h>
#include <errno.h>
#include <stdlib.h>

#include "load_gpu.h"

struct q3_h2d {
	int gpu;
	void *vram;
	void *ring;
	int registered;
	int nslots, nstreams;
	cudaStream_t *streams;
	cudaEvent_t *events;
	unsigned char *pending; /* [nslots]: a copy was started from this slot since its last wait */
};

/* One line naming the call that failed; the sticky error state is the caller's to end. */
#define CU(call, e)                                                                                \
	do {                                                                                       \
		cudaError_t err_ = (call);                                                         \
		if (err_ != cudaSuccess)                                                           \
			return q3_errf(e, -EIO, "%s: %s (%s:%d)", #call, cudaGetErrorString(err_), \
				       __FILE__, __LINE__);                                        \
	} while (0)

extern "C" int q3_h2d_devices(void)
{
	int n = 0;

	if (cudaGetDeviceCount(&n) != cudaSuccess) {
		cudaGetLastError(); /* "no driver" / "no device" is not an error here */
		return 0;
	}
	return n;
}

extern "C" void q3_h2d_close(struct q3_h2d *h, int keep_vram)
{
	if (!h)
		return;
	cudaSetDevice(h->gpu);
	for (int i = 0; h->events && i < h->nslots; i++)
		if (h->events[i])
			cudaEventDestroy(h->events[i]);
	for (int i = 0; h->streams && i < h->nstreams; i++)
		if (h->streams[i]) {
			cudaStreamSynchronize(h->streams[i]);
			cudaStreamDestroy(h->streams[i]);
		}
	if (h->registered)
		cudaHostUnregister(h->ring);
	if (h->vram && !keep_vram)
		cudaFree(h->vram);
	free(h->events);
	free(h->streams);
	free(h->pending);
	free(h);
}

static int open_h2d(struct q3_h2d *h, uint64_t vram_bytes, size_t ring_bytes, q3_err *e)
{
	CU(cudaSetDevice(h->gpu), e);
	if (vram_bytes)
		CU(cudaMalloc(&h->vram, vram_bytes), e);
	if (ring_bytes) {
		CU(cudaHostRegister(h->ring, ring_bytes, cudaHostRegisterDefault), e);
		h->registered = 1;
	}
	for (int i = 0; i < h->nstreams; i++)
		CU(cudaStreamCreateWithFlags(&h->streams[i], cudaStreamNonBlocking), e);
	for (int i = 0; i < h->nslots; i++)
		CU(cudaEventCreateWithFlags(&h->events[i], cudaEventDisableTiming), e);
	return 0;
}

extern "C" int q3_h2d_open(int gpu, uint64_t vram_bytes, void *ring, size_t ring_bytes, int nslots,
			   int nstreams, struct q3_h2d **out, q3_err *e)
{
	struct q3_h2d *h = (struct q3_h2d *)calloc(1, sizeof(*h));
	int err;

	*out = NULL;
	if (!h)
		return q3_errf(e, -ENOMEM, "out of memory");
	h->gpu = gpu;
	h->ring = ring;
	h->nslots = nslots;
	h->nstreams = nstreams > 0 ? nstreams : 1;
	h->streams = (cudaStream_t *)calloc((size_t)h->nstreams, sizeof(cudaStream_t));
	h->events = (cudaEvent_t *)calloc((size_t)(nslots > 0 ? nslots : 1), sizeof(cudaEvent_t));
	h->pending = (unsigned char *)calloc((size_t)(nslots > 0 ? nslots : 1), 1);
	if (!h->streams || !h->events || !h->pending) {
		q3_h2d_close(h, 0);
		return q3_errf(e, -ENOMEM, "out of memory");
	}
	err = open_h2d(h, vram_bytes, ring_bytes, e);
	if (err) {
		q3_h2d_close(h, 0);
		return err;
	}
	*out = h;
	return 0;
}

extern "C" void *q3_h2d_vram(struct q3_h2d *h)
{
	return h->vram;
}

extern "C" int q3_h2d_copy(struct q3_h2d *h, int slot, uint64_t vram_off, const void *src, size_t len,
			   q3_err *e)
{
	cudaStream_t s = h->streams[slot % h->nstreams];

	/* the current device is per host thread, and the thread engine copies from many */
	CU(cudaSetDevice(h->gpu), e);
	CU(cudaMemcpyAsync((char *)h->vram + vram_off, src, len, cudaMemcpyHostToDevice, s), e);
	CU(cudaEventRecord(h->events[slot], s), e);
	h->pending[slot] = 1;
	return 0;
}

extern "C" int q3_h2d_busy(struct q3_h2d *h, int slot, q3_err *e)
{
	cudaError_t r;

	if (!h->pending[slot])
		return 0;
	r = cudaEventQuery(h->events[slot]);
	if (r == cudaErrorNotReady)
		return 1;
	CU(r, e);
	h->pending[slot] = 0;
	return 0;
}

extern "C" int q3_h2d_wait(struct q3_h2d *h, int slot, q3_err *e)
{
	if (!h->pending[slot])
		return 0;
	CU(cudaEventSynchronize(h->events[slot]), e);
	h->pending[slot] = 0;
	return 0;
}

extern "C" int q3_h2d_finish(struct q3_h2d *h, q3_err *e)
{
	CU(cudaSetDevice(h->gpu), e);
	for (int i = 0; i < h->nstreams; i++)
		CU(cudaStreamSynchronize(h->streams[i]), e);
	for (int i = 0; i < h->nslots; i++)
		h->pending[i] = 0;
	return 0;
}

extern "C" int q3_h2d_read(struct q3_h2d *h, const void *dev, void *dst, size_t n, q3_err *e)
{
	CU(cudaSetDevice(h->gpu), e);
	CU(cudaMemcpy(dst, dev, n, cudaMemcpyDeviceToHost), e);
	return 0;
}
