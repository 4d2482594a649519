#!/bin/bash
# tools/gpu_profile.sh - per-kernel times of a decode step and a prefill on the GPU machine, with
# Nsight Compute (graphs off so that ncu sees each launch), on a 4-layer model of the real shapes.
# Profiling starts at the first forward pass (cuda_backend.cu calls cudaProfilerStart there):
# profiled one by one, the load's ~25,000 repacking launches alone took ncu past 7 minutes.
# Needs build/gpu.tar.xz (tools/gpu_pack.sh).  Writes $OUT/ncu_*.csv and prints a per-kernel table.
# Environment: DENSE (bf16, q4 or q8), MKMODEL_ARGS (more mkmodel options, e.g. --act-order).
set -u
OUT=${OUT:-/tmp/gpu_profile_out}
mkdir -p "$OUT"
. tools/gpu_common.sh
unpack gpu || exit 1
Q=$PWD/build/gpu/qwen3d
M=/tmp/m4
DENSE=${DENSE:-bf16}
# shellcheck disable=SC2086 # MKMODEL_ARGS: more mkmodel options (--act-order), words
timeout 60 "$Q" mkmodel --preset 80b-a3b --layers 4 --dense "$DENSE" --out $M --force --quiet ${MKMODEL_ARGS:-} || exit 1
NCU="ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv --print-units base"
for run in "b1:decode --batch 1 --ctx 0 --tokens 2 --warmup 0" "b16:decode --batch 16 --ctx 0 --tokens 1 --warmup 0" \
	   "p4096:prefill --tokens 4096 --reps 1"; do
	name=${run%%:*}
	QWEN3D_NO_GRAPHS=1 timeout 70 $NCU "$Q" bench ${run#*:} --model $M --backend cuda \
		>"$OUT/ncu_$name.csv" 2>"$OUT/ncu_$name.err"
	echo "== $name (exit $?): kernel, launches, total us (all launches of the run)"
	python3 - "$OUT/ncu_$name.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print("  no rows"); sys.exit()
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    k = r[ki].split("(")[0][:60]
    try: tot[k] += float(r[vi].replace(",", "")) / 1e3; cnt[k] += 1
    except ValueError: pass
for k, v in sorted(tot.items(), key=lambda x: -x[1])[:25]:
    print(f"  {k:60s} {cnt[k]:5d} {v:10.1f}")
PY
done
