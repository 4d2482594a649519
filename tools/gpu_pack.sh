#!/bin/bash
# tools/gpu_pack.sh - builds what tools/gpu_session.sh runs on the GPU test machine, small enough
# to travel with the tree: the CUDA code for sm_90 only (H100 / H200) in build/sm90, then the four
# programs and the shared libraries the machine may lack (libjansson, libpcre2) in build/gpu:
#   build/gpu/qwen3d  build/gpu/test_ops  build/gpu/test_model  build/gpu/bench_kernels  build/gpu/lib/
# Run it on the build machine (needs nvcc and the Debian build dependencies), then carry build/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${GPU_PACK_ARCH:--gencode arch=compute_90,code=sm_90}
JOBS=${JOBS:-2}
make -j"$JOBS" BUILD=build/sm90 CUDA_ARCH="$ARCH" build/sm90/qwen3d \
	build/sm90/tests/gpu/test_ops build/sm90/tests/gpu/test_model build/sm90/tests/gpu/bench_kernels
rm -rf build/gpu
mkdir -p build/gpu/lib
cp build/sm90/qwen3d build/sm90/tests/gpu/test_ops build/sm90/tests/gpu/test_model \
	build/sm90/tests/gpu/bench_kernels build/gpu/
for lib in libjansson.so.4 libpcre2-8.so.0; do
	p=$(ldd build/gpu/qwen3d | awk -v l="$lib" '$1 == l { print $3 }')
	[ -n "$p" ] && cp -L "$p" build/gpu/lib/
done
git rev-parse --short HEAD > build/gpu/COMMIT 2>/dev/null || true
du -sh build/gpu
echo "carry build/gpu; on the GPU machine: bash tools/gpu_session.sh"
