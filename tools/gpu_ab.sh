#!/bin/bash
# tools/gpu_ab.sh [REV ...] - the other sides of an A/B(/C...) run on the GPU test machine: qwen3d,
# bench_kernels and test_ops of each revision REV (default HEAD~1) built for sm_90 in a scratch worktree,
# stripped, packed together as build/ab.tar.xz (unpacking to build/ab/<sha>; xz -9's window finds
# what the revisions share: four in 2.8 MB, 11.9 with the default window).
# Carry it beside build/gpu.tar.xz (tools/gpu_pack.sh: the working tree); there `bash
# tools/gpu_ab_run.sh` runs every build's decode benchmarks in turn in one call (machines differ by
# a few percent: only a side-by-side run tells a 2% change).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${GPU_PACK_ARCH:--gencode arch=compute_90,code=sm_90}
[ $# -gt 0 ] || set -- HEAD~1
WT=
trap '[ -z "$WT" ] || git worktree remove --force "$WT" 2>/dev/null || rm -rf "$WT"' EXIT
rm -rf build/ab
mkdir -p build/ab
for REV in "$@"; do
	SHA=$(git rev-parse --short "$REV")
	WT=$(mktemp -d "${TMPDIR:-/tmp}/qwen3d-ab.XXXXXX")
	git worktree add -q --detach "$WT" "$SHA"
	make -C "$WT" -j"${JOBS:-2}" BUILD=build/sm90 CUDA_ARCH="$ARCH" build/sm90/qwen3d \
		build/sm90/tests/gpu/bench_kernels build/sm90/tests/gpu/test_ops ||
		{ echo "gpu_ab: $REV ($SHA) does not build" >&2; exit 1; }
	mkdir -p "build/ab/$SHA"
	cp "$WT/build/sm90/qwen3d" "$WT/build/sm90/tests/gpu/bench_kernels" "$WT/build/sm90/tests/gpu/test_ops" \
		"build/ab/$SHA/"
	strip "build/ab/$SHA/qwen3d" "build/ab/$SHA/bench_kernels" "build/ab/$SHA/test_ops"
	git log -1 --format='%h %s' "$SHA" | cut -c1-100 > "build/ab/$SHA/COMMIT"
	git worktree remove --force "$WT"
	WT=
done
XZ_OPT=-9 tar cJf build/ab.tar.xz -C build ab
du -sh build/ab.tar.xz
echo "carry build/gpu.tar.xz and build/ab.tar.xz; on the GPU machine: bash tools/gpu_ab_run.sh"
