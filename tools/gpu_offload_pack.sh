#!/bin/bash
# tools/gpu_offload_pack.sh - builds what tools/gpu_offload_session.sh runs on the GPU test machine
# (issue 8: experts beyond VRAM), small enough to travel with the tree: the CUDA code for sm_90
# only (H100 / H200) in build/sm90, then in build/gpuo:
#   qwen3d                                   the CLI (bench experts / offload, mkmodel, logits)
#   test_offload test_model                  GPU tests (forced offload vs the fixtures)
#   test_cpu_expert test_cpu_moe test_xpool  CPU expert kernels and threads on that machine's CPU
#                                            (AVX-512 VNNI / AMX where it has them)
#   lib/                                     shared libraries the machine may lack
# Run it on the build machine (nvcc and the Debian build dependencies), then carry build/gpuo.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${GPU_PACK_ARCH:--gencode arch=compute_90,code=sm_90}
JOBS=${JOBS:-2}
B=build/sm90
make -j"$JOBS" BUILD=$B CUDA_ARCH="$ARCH" $B/qwen3d $B/tests/gpu/test_offload $B/tests/gpu/test_model \
	$B/tests/test_cpu_expert $B/tests/test_cpu_moe $B/tests/test_xpool
rm -rf build/gpuo
mkdir -p build/gpuo/lib
cp $B/qwen3d $B/tests/gpu/test_offload $B/tests/gpu/test_model $B/tests/test_cpu_expert $B/tests/test_cpu_moe \
	$B/tests/test_xpool build/gpuo/
for lib in libjansson.so.4 libpcre2-8.so.0 libhwloc.so.15 libnuma.so.1 libcmocka.so.0 libudev.so.1; do
	p=$( (ldd build/gpuo/qwen3d; ldd build/gpuo/test_cpu_expert) | awk -v l="$lib" '$1 == l { print $3; exit }')
	[ -n "$p" ] && cp -L "$p" build/gpuo/lib/
done
git rev-parse --short HEAD > build/gpuo/COMMIT 2>/dev/null || true
du -sh build/gpuo
echo "carry build/gpuo; on the GPU machine: bash tools/gpu_offload_session.sh"
