#!/bin/bash
# tools/gpu_ab_run.sh [BATCH ...] - on the GPU test machine: decode tok/s of every build of
# build/ab (tools/gpu_ab.sh: other revisions) and of the working tree's (build/gpu, from
# tools/gpu_pack.sh: "change") on the full-size 80b-a3b synthetic checkpoint made here (~25 s),
# ROUNDS times each per batch size (default: 1 16), each round starting one build later so that no
# build always runs first; then `bench_kernels --gdn R --dense bf16` of each build for each R of
# GDN, rounds interleaved the same way.  Environment: MODEL (an existing checkpoint instead), WORK
# (scratch, default /var/tmp), ROUNDS (2), CTX (1024), TOKENS (64), GDN (default "16 1"),
# MKMODEL_ARGS (more mkmodel options for the checkpoint made here, e.g. --act-order), TESTS=1
# (first test_ops and test_model of the change: a speed measured on a build that fails them says
# nothing), ENV_CHANGE (environment words for the change's runs alone, e.g. a diagnostic switch).
# Every program's whole output goes under $OUT, packed at the end into one ab_logs.tar.gz (a
# call brings back a few files); the terminal gets the summary lines.
set -u
cd "$(dirname "$0")/.." || exit 1
. tools/gpu_common.sh
unpack gpu && unpack ab || exit 1
[ -x build/gpu/qwen3d ] && [ -d build/ab ] || { echo "gpu_ab_run: carry build/gpu.tar.xz and build/ab.tar.xz" >&2; exit 1; }
export LD_LIBRARY_PATH=$PWD/build/gpu/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
WORK=${WORK:-/var/tmp}
ROUNDS=${ROUNDS:-2}
CTX=${CTX:-1024}
TOKENS=${TOKENS:-64}
GDN=${GDN:-16 1}
BATCHES=${*:-1 16}
M=${MODEL:-$WORK/qwen3d-ab-80b}
O=${OUT:-$WORK/qwen3d-ab-out}/logs
mkdir -p "$O"
BUILDS=()
for d in build/ab/*/; do
	[ -x "$d/qwen3d" ] && BUILDS+=("${d%/}")
done
BUILDS+=(build/gpu)
name() { [ "$1" = build/gpu ] && echo change || basename "$1"; }
# run BUILD PROG ARGS...: the program of that build, with ENV_CHANGE for the change
run() {
	local b=$1 p=$2
	shift 2
	# shellcheck disable=SC2086 # ENV_CHANGE: words
	if [ "$b" = build/gpu ]; then env ${ENV_CHANGE:-} "$b/$p" "$@"; else "$b/$p" "$@"; fi
}
for b in "${BUILDS[@]}"; do
	printf '%-8s %s\n' "$(name "$b")" "$(cat "$b/COMMIT" 2>/dev/null)"
done
if [ -z "${MODEL:-}" ]; then
	# shellcheck disable=SC2086 # MKMODEL_ARGS: words
	(build/gpu/qwen3d mkmodel --preset 80b-a3b --out "$M" --force --quiet ${MKMODEL_ARGS:-} &&
		cat "$M"/*.safetensors >/dev/null) >"$O/mkmodel.log" 2>&1 & # the page cache: every load then takes the same
fi
if [ "${TESTS:-0}" = 1 ]; then
	run build/gpu test_ops >"$O/test_ops.log" 2>&1
	grep -E "^FAIL|^== test_ops" "$O/test_ops.log" | tail -6
	run build/gpu test_model >"$O/test_model.log" 2>&1
	grep -E "^FAIL|^== test_model" "$O/test_model.log" | tail -6
fi
wait
[ -z "${MODEL:-}" ] && { tail -1 "$O/mkmodel.log"; [ -f "$M/config.json" ] || exit 1; }
n=${#BUILDS[@]}
for B in $BATCHES; do
	for ((i = 0; i < ROUNDS; i++)); do
		for ((j = 0; j < n; j++)); do
			b=${BUILDS[$(((i + j) % n))]}
			printf '%-8s batch %-3s' "$(name "$b")" "$B"
			run "$b" qwen3d bench decode --model "$M" --backend cuda --batch "$B" --ctx "$CTX" \
				--tokens "$TOKENS" >"$O/decode_$(name "$b")_b${B}_$i.log" 2>&1
			grep -E "tok/s|rror" "$O/decode_$(name "$b")_b${B}_$i.log" | tail -1
		done
	done
done
for R in $GDN; do
	for ((i = 0; i < ROUNDS; i++)); do
		for ((j = 0; j < n; j++)); do
			b=${BUILDS[$(((i + j) % n))]}
			run "$b" bench_kernels --gdn "$R" --dense bf16 >"$O/gdn${R}_$(name "$b")_$i.log" 2>&1
		done
	done
done
# the launches side by side: one column a build and round (the whole outputs are in $O)
for R in $GDN; do
	echo "== bench_kernels --gdn $R --dense bf16, us per layer"
	python3 - "$O" "$R" "$ROUNDS" "${BUILDS[@]}" <<'PY'
import re, sys
o, R, rounds, builds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
names = ["change" if b == "build/gpu" else b.rsplit("/", 1)[-1] for b in builds]
cols, rows = [], {}
for n in names:
    for i in range(rounds):
        cols.append(f"{n}.{i}")
        try:
            lines = open(f"{o}/gdn{R}_{n}_{i}.log").read().splitlines()
        except OSError:
            continue
        for l in lines:
            # a launch ("name R=16 20.31 us per layer") or a whole layer ("... 148.40 us  3.1 GB/s")
            m = re.match(r"\s*(.*?)\s+(?:R=\d+\s+)?([0-9.]+) us(?: per layer|\s)", l)
            if m:
                rows.setdefault(m.group(1)[:56], {})[cols[-1]] = m.group(2)
print(f"{'':56s}" + "".join(f"{c:>11s}" for c in cols))
for k, v in rows.items():
    print(f"{k:56s}" + "".join(f"{v.get(c, '-'):>11s}" for c in cols))
PY
done
tar czf "$O/../ab_logs.tar.gz" -C "$O/.." logs && rm -rf "$O"
