#!/bin/bash
# tools/gpu_pack.sh - builds what tools/gpu_session.sh runs on the GPU test machine, small enough
# to travel with the tree: the CUDA code for sm_90 only (H100 / H200) in build/sm90, then the four
# programs and the shared libraries the machine may lack (libjansson, libpcre2) in build/gpu:
#   build/gpu/qwen3d  build/gpu/test_ops  build/gpu/test_model  build/gpu/bench_kernels  build/gpu/lib/
# and all of it as build/gpu.tar.xz (~2.6 MB, stripped).  Run it on the build machine (needs nvcc
# and the Debian build dependencies), then carry build/gpu.tar.xz (gpu_session.sh unpacks it).
# For a change measured against the code before it: tools/gpu_ab.sh as well.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${GPU_PACK_ARCH:--gencode arch=compute_90,code=sm_90}
JOBS=${JOBS:-2}
# what the programs are built from: HEAD, the changes to it, the untracked files.  make goes by
# times: a source edited while its object was compiling looked up to date afterwards, and a pack
# of the old kernel once passed for the new one.  So the changed files are touched first (their
# objects are rebuilt), and a tree that changed during the build fails the pack.
tree_stamp() { { git rev-parse HEAD; git diff HEAD; git ls-files -o --exclude-standard | xargs -r cat; } | sha1sum; }
{ git diff --name-only HEAD; git ls-files -o --exclude-standard; } | xargs -r touch -c
STAMP=$(tree_stamp)
make -j"$JOBS" BUILD=build/sm90 CUDA_ARCH="$ARCH" build/sm90/qwen3d \
	build/sm90/tests/gpu/test_ops build/sm90/tests/gpu/test_model build/sm90/tests/gpu/bench_kernels \
	build/sm90/tests/gpu/test_offload build/sm90/tests/test_cpu_expert build/sm90/tests/test_cpu_moe \
	build/sm90/tests/test_xpool
rm -rf build/gpu
mkdir -p build/gpu/lib
cp build/sm90/qwen3d build/sm90/tests/gpu/test_ops build/sm90/tests/gpu/test_model \
	build/sm90/tests/gpu/bench_kernels build/sm90/tests/gpu/test_offload build/sm90/tests/test_cpu_expert \
	build/sm90/tests/test_cpu_moe build/sm90/tests/test_xpool build/gpu/
for lib in libjansson.so.4 libpcre2-8.so.0 libhwloc.so.15 libnuma.so.1 libcmocka.so.0 libudev.so.1; do
	p=$( (ldd build/gpu/qwen3d; ldd build/gpu/test_cpu_expert) | awk -v l="$lib" '$1 == l { print $3; exit }')
	[ -n "$p" ] && cp -L "$p" build/gpu/lib/
done
# host symbols and debug info off (the device code, its line info and kernel names stay in the
# fat binaries): 16.6 -> 11.6 MB of xz, which a GPU call's 64 MiB must also fit the tree in;
# xz -9's 64 MiB window then finds the programs' shared CUDA code once: 11.7 -> 2.6 MB
for f in build/gpu/*; do
	[ -f "$f" ] && [ -x "$f" ] && strip "$f"
done
if [ "$(tree_stamp)" != "$STAMP" ]; then
	echo "gpu_pack: the tree changed while building: run it again" >&2
	exit 1
fi
{
	git rev-parse --short HEAD
	git diff --quiet HEAD && [ -z "$(git ls-files -o --exclude-standard)" ] || echo "with uncommitted changes"
} | paste -sd' ' > build/gpu/COMMIT
XZ_OPT=-9 tar cJf build/gpu.tar.xz -C build gpu
du -sh build/gpu build/gpu.tar.xz
echo "carry build/gpu.tar.xz; on the GPU machine: bash tools/gpu_session.sh"
