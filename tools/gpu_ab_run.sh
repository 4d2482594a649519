#!/bin/bash
# tools/gpu_ab_run.sh [BATCH ...] - on the GPU test machine: decode tok/s of the baseline
# (build/ab/base from tools/gpu_ab.sh) and of the change (build/gpu from tools/gpu_pack.sh),
# alternately, on the full-size 80b-a3b synthetic checkpoint made here (~25 s), ROUNDS times each
# per batch size (default: 1 16), then `bench_kernels --gdn 1` of both.  Environment: MODEL (an
# existing checkpoint instead), WORK (scratch, default /var/tmp), ROUNDS (2), CTX (1024),
# TOKENS (64).
set -u
cd "$(dirname "$0")/.."
[ -x build/gpu/qwen3d ] || tar xJf build/gpu.tar.xz -C build || exit 1
[ -x build/ab/base/qwen3d ] || tar xJf build/ab.tar.xz -C build || exit 1
export LD_LIBRARY_PATH=$PWD/build/gpu/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
WORK=${WORK:-/var/tmp}
ROUNDS=${ROUNDS:-2}
CTX=${CTX:-1024}
TOKENS=${TOKENS:-64}
BATCHES=${*:-1 16}
M=${MODEL:-$WORK/qwen3d-ab-80b}
if [ -z "${MODEL:-}" ]; then
	build/gpu/qwen3d mkmodel --preset 80b-a3b --out "$M" --force --quiet || exit 1
	cat "$M"/*.safetensors >/dev/null # into the page cache: every load then takes the same
fi
echo "base $(cat build/ab/base/COMMIT 2>/dev/null), change $(cat build/gpu/COMMIT 2>/dev/null)"
for B in $BATCHES; do
	for ((i = 0; i < ROUNDS; i++)); do
		for b in ab/base gpu; do
			printf '%-6s batch %-3s' "$([ "$b" = gpu ] && echo change || echo base)" "$B"
			build/$b/qwen3d bench decode --model "$M" --backend cuda --batch "$B" --ctx "$CTX" \
				--tokens "$TOKENS" 2>&1 | grep -E "tok/s|rror" | tail -1
		done
	done
done
for b in ab/base gpu; do
	echo "== bench_kernels --gdn 1 ($b)"
	build/$b/bench_kernels --gdn 1 2>&1 | grep -E "us per layer|PDL off"
done
