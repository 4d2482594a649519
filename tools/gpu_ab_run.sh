#!/bin/bash
# tools/gpu_ab_run.sh [BATCH ...] - on the GPU test machine: decode tok/s of every build of
# build/ab (tools/gpu_ab.sh: other revisions) and of the working tree's (build/gpu, from
# tools/gpu_pack.sh: "change") on the full-size 80b-a3b synthetic checkpoint made here (~25 s),
# ROUNDS times each per batch size (default: 1 16), each round starting one build later so that no
# build always runs first; then `bench_kernels --gdn 1` of each.  Environment: MODEL (an existing
# checkpoint instead), WORK (scratch, default /var/tmp), ROUNDS (2), CTX (1024), TOKENS (64),
# MKMODEL_ARGS (more mkmodel options for the checkpoint made here, e.g. --act-order).
set -u
cd "$(dirname "$0")/.."
. tools/gpu_common.sh
unpack gpu && unpack ab || exit 1
[ -x build/gpu/qwen3d ] && [ -d build/ab ] || { echo "gpu_ab_run: carry build/gpu.tar.xz and build/ab.tar.xz" >&2; exit 1; }
export LD_LIBRARY_PATH=$PWD/build/gpu/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
WORK=${WORK:-/var/tmp}
ROUNDS=${ROUNDS:-2}
CTX=${CTX:-1024}
TOKENS=${TOKENS:-64}
BATCHES=${*:-1 16}
M=${MODEL:-$WORK/qwen3d-ab-80b}
BUILDS=()
for d in build/ab/*/; do
	[ -x "$d/qwen3d" ] && BUILDS+=("${d%/}")
done
BUILDS+=(build/gpu)
name() { [ "$1" = build/gpu ] && echo change || basename "$1"; }
for b in "${BUILDS[@]}"; do
	printf '%-8s %s\n' "$(name "$b")" "$(cat "$b/COMMIT" 2>/dev/null)"
done
if [ -z "${MODEL:-}" ]; then
	# shellcheck disable=SC2086 # MKMODEL_ARGS: words
	build/gpu/qwen3d mkmodel --preset 80b-a3b --out "$M" --force --quiet ${MKMODEL_ARGS:-} || exit 1
	cat "$M"/*.safetensors >/dev/null # into the page cache: every load then takes the same
fi
n=${#BUILDS[@]}
for B in $BATCHES; do
	for ((i = 0; i < ROUNDS; i++)); do
		for ((j = 0; j < n; j++)); do
			b=${BUILDS[$(((i + j) % n))]}
			printf '%-8s batch %-3s' "$(name "$b")" "$B"
			"$b/qwen3d" bench decode --model "$M" --backend cuda --batch "$B" --ctx "$CTX" \
				--tokens "$TOKENS" 2>&1 | grep -E "tok/s|rror" | tail -1
		done
	done
done
for b in "${BUILDS[@]}"; do
	echo "== bench_kernels --gdn 1 ($(name "$b"))"
	"$b/bench_kernels" --gdn 1 2>&1 | grep -E "us per layer|PDL off"
done
