#!/bin/bash
# tools/gpu_ab.sh [REV] - the baseline of an A/B run on the GPU test machine: qwen3d and
# bench_kernels of revision REV (default HEAD~1) built for sm_90 in a scratch worktree, stripped,
# packed as build/ab.tar.xz (~6 MB, unpacking to build/ab/base).  Carry it beside build/gpu.tar.xz
# (tools/gpu_pack.sh: the change); there `bash tools/gpu_ab_run.sh` runs the two builds' decode
# benchmarks alternately in one call (machines differ by a few percent: only a side-by-side run
# tells a 2% change).
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD~1}
ARCH=${GPU_PACK_ARCH:--gencode arch=compute_90,code=sm_90}
SHA=$(git rev-parse --short "$REV")
WT=$(mktemp -d "${TMPDIR:-/tmp}/qwen3d-ab.XXXXXX")
trap 'git worktree remove --force "$WT" 2>/dev/null || rm -rf "$WT"' EXIT
git worktree add -q --detach "$WT" "$SHA"
make -C "$WT" -j"${JOBS:-2}" BUILD=build/sm90 CUDA_ARCH="$ARCH" build/sm90/qwen3d build/sm90/tests/gpu/bench_kernels
rm -rf build/ab
mkdir -p build/ab/base
cp "$WT/build/sm90/qwen3d" "$WT/build/sm90/tests/gpu/bench_kernels" build/ab/base/
strip build/ab/base/qwen3d build/ab/base/bench_kernels
echo "$SHA" > build/ab/base/COMMIT
tar cJf build/ab.tar.xz -C build ab
du -sh build/ab.tar.xz
echo "carry build/gpu.tar.xz and build/ab.tar.xz; on the GPU machine: bash tools/gpu_ab_run.sh"
