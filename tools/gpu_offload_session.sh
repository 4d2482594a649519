#!/bin/bash
# tools/gpu_offload_session.sh - one run on the GPU test machine (H100 / H200) for issue 8, routed
# experts beyond VRAM, at most ~8 minutes, results under $OUT, the summary table printed last:
#   1. the machine: GPU, CPU (AVX-512 VNNI? AMX?), NUMA, memory;
#   2. the CPU expert kernels and threads on this CPU (every ISA it has, against the reference),
#      and their weight bandwidth next to this machine's measured memory bandwidth
#      (`qwen3d bench experts`, the GPU node's cores);
#   3. parity with a small budget that forces offload: every fixture with half and with none of
#      the experts in VRAM against Hugging Face's logits and the all-in-VRAM engine
#      (test_offload), and test_model's engine-level promises with offload on;
#   4. a full-size synthetic 80b-a3b checkpoint (`qwen3d mkmodel`, made in the background during
#      1-3, routing skew ZIPF), with --vram-budget 20GiB: decode batch 1 and prefill of 4096
#      tokens (`qwen3d bench offload`: tok/s, ms per layer, hit rate, PCIe bytes per token, CPU
#      expert GB/s), and the same model with every expert in VRAM for comparison where it fits.
#      With ZIPF > 0 the first run records expert statistics and a second run plans the VRAM
#      cache from them (the frequency-planned cache).
#
# Environment: OUT (default /tmp/gpu_offload_out), WORK (scratch, default /tmp/q3off), ZIPF
# (routing skew of the 80B model, default 0: uniform; run again with ZIPF=1.0 for the skewed
# numbers), BUDGET_GIB (default 20), STEPS (all | bench: only 1 and 4), SECONDS_MAX (default 470).
# Programs: build/gpuo from tools/gpu_offload_pack.sh (or build/ of a full build).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_offload_out}
WORK=${WORK:-/tmp/q3off}
ZIPF=${ZIPF:-0}
BUDGET_GIB=${BUDGET_GIB:-20}
STEPS=${STEPS:-all}
T0=$(date +%s)
T_END=$((T0 + ${SECONDS_MAX:-470}))
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS" "$WORK"
# results of an earlier run on a warm machine must not pass for this run's
rm -f "$OUT"/*.csv
SUMMARY=()

ADD_WIDTH=46
. tools/gpu_common.sh
finish() {
	tar czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
	add "elapsed" "$(($(date +%s) - T0)) s"
	echo
	echo "==== summary: issue 8 offload, ZIPF=$ZIPF ($(date -u +%FT%TZ)) ===="
	printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
}

# ---- 1. the machine ----------------------------------------------------------------------------------
{
	date -u
	nvidia-smi --query-gpu=name,memory.total,pci.bus_id --format=csv
	lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Socket|NUMA|L3'
	grep -o -w -E 'avx512f|avx512_vnni|avx512vnni|amx_tile|amx_int8|avx_vnni' /proc/cpuinfo | sort | uniq -c
	free -g
	df -h "$WORK"
} >"$LOGS/machine.log" 2>&1
cat "$LOGS/machine.log"
add "GPU" "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
add "CPU" "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, $(lscpu | sed -n 's/^NUMA node(s): *//p') NUMA node(s)"

BIN=""
unpack gpu
for d in build/gpuo build/gpu build; do
	[ -x "$d/qwen3d" ] && { BIN=$d; break; }
done
if [ -z "$BIN" ]; then
	add "programs" "MISSING: carry build/gpuo (tools/gpu_offload_pack.sh)"
	finish
	exit 1
fi
prog() { for p in "$BIN/$1" "$BIN/tests/$1" "$BIN/tests/gpu/$1"; do [ -x "$p" ] && { echo "$p"; return; }; done; echo "$BIN/$1"; }
Q=$ROOT/$BIN/qwen3d
[ -f "$BIN/COMMIT" ] && add "programs" "$BIN (commit $(cat "$BIN/COMMIT"))" || add "programs" "$BIN"
# the bundled libraries last: only what the machine lacks (libcmocka for the CPU tests) comes from them
if [ -d "$BIN/lib" ]; then
	export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$ROOT/$BIN/lib
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
	$(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) + "/lib")' 2>/dev/null); do
	if ldd "$Q" | grep -q "libcublas.*not found" && [ -e "$d/libcublas.so.13" ]; then
		export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$d
	fi
done
ldd "$Q" | grep "not found" && add "libraries" "MISSING: $(ldd "$Q" | grep 'not found' | awk '{print $1}' | tr '\n' ' ')"

# ---- 2. CPU expert kernels on this CPU, before anything else loads it ---------------------------
if [ "$STEPS" = all ]; then
	for t in test_cpu_expert test_cpu_moe test_xpool; do
		step "$t" "$(cap 120 200)" "$(prog $t)"
		rc=$?
		grep -E '^#|FAILED|ERROR' "$LOGS/$t.log" | head -12
		add "$t" "$([ $rc = 0 ] && echo PASS || echo "FAIL ($(rcword $rc))")$([ $t = test_cpu_expert ] && echo "; $(grep -E '^# (avx512|amx|best)' "$LOGS/$t.log" | tr '\n' ' ')")"
	done
	step bench_experts "$(cap 90 200)" "$Q" bench experts --seconds 2 --pool 256 --mem-mb 2048 \
		--rows 1x10:int8:packed,1x10:int8:gptq,1x10:fp32:packed,4x10:int8:packed,16x10:int8:packed \
		--csv "$OUT/experts.csv"
	cat "$LOGS/bench_experts.log"
	BW=$(sed -n 's/^memory read bandwidth.*: \([0-9.]*\) GB\/s/\1/p' "$LOGS/bench_experts.log")
	add "memory read bandwidth (bench threads)" "${BW:-?} GB/s ($(head -1 "$LOGS/bench_experts.log" | sed 's/^# CPU experts: //' | cut -c1-60))"
	# experts.csv: experts,T,k,act,layout,isa,threads,us/call,GB/s,bandwidth
	awk -F, '$1=="experts" { print $2, $3, $4, $5, $9 }' "$OUT/experts.csv" >"$LOGS/experts_rows.txt" 2>/dev/null
	while read -r T K act lay gbs; do
		add "CPU experts T=$T k=$K $act $lay (>= 80% bw)" "$gbs GB/s = $(awk -v a="$gbs" -v b="${BW:-0}" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b }') of bandwidth"
	done <"$LOGS/experts_rows.txt"
	if grep -q amx_int8 /proc/cpuinfo; then
		step bench_experts_avx512 "$(cap 40 200)" "$Q" bench experts --seconds 2 --pool 256 --mem-mb 2048 --isa avx512 \
			--rows 16x10:int8:packed
		add "CPU experts T=16 with AVX-512 (vs AMX above)" "$(awk '/^batch/ {print $6 " GB/s"}' "$LOGS/bench_experts_avx512.log")"
	fi
fi

# ---- background: the 80B checkpoint (kept between runs of a warm machine) ------------------------
BIG=$WORK/m80_z$ZIPF
PID_BIG=""
if [ -f "$BIG/.complete" ]; then
	note "reusing $BIG"
	(cat "$BIG"/*.safetensors >/dev/null) &
	PID_BIG=$!
elif ! "$Q" mkmodel --help >/dev/null 2>&1; then
	add "80b-a3b checkpoint" "NOT MADE: this build has no mkmodel"
else
	rm -rf "$WORK"/m80_z* 2>/dev/null # one at a time: ~45 GB each
	FREE_GB=$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)
	if [ "${FREE_GB:-0}" -lt 50 ]; then
		add "80b-a3b checkpoint" "NOT MADE: ${FREE_GB} GB free in $WORK"
	else
		ZARG=()
		[ "$ZIPF" != 0 ] && ZARG=(--zipf "$ZIPF")
		( timeout 300 "$Q" mkmodel --preset 80b-a3b "${ZARG[@]}" --out "$BIG" --force &&
		  touch "$BIG/.complete" &&
		  cat "$BIG"/*.safetensors >/dev/null ) >"$LOGS/mkmodel.log" 2>&1 & # written O_DIRECT: warm the cache
		PID_BIG=$!
		note "mkmodel --preset 80b-a3b ${ZARG[*]} in the background (pid $PID_BIG)"
	fi
fi

if [ "$STEPS" = all ]; then
	# ---- 3. parity with offload forced (while the checkpoint is written) ----------------------
	step test_offload "$(cap 150 150)" "$(prog test_offload)"
	rc=$?
	grep -E '^(FAIL|ok|skip|test_offload)' "$LOGS/test_offload.log" | head -60
	add "test_offload (fixtures, 50% / 0% in VRAM)" "$(tail -1 "$LOGS/test_offload.log") $(rcword $rc)"
	QWEN3D_OFFLOAD_FRACTION=0.5 step test_model_offload "$(cap 120 120)" "$(prog test_model)"
	rc=$?
	grep -E '^(FAIL|==)' "$LOGS/test_model_offload.log" | head -20
	add "test_model with 50% of experts in VRAM" "$(grep -m1 '^== test_model' "$LOGS/test_model_offload.log" | sed 's/== test_model: //') $(rcword $rc)"
fi

# ---- 4. the 80B model ----------------------------------------------------------------------------------
bench_row() { # NAME CSV-ROW-KIND -> "tok/s (ms/layer, hit, PCIe, CPU GB/s)"
	awk -F, -v w="$2" '$1=="offload" && $2==w { printf "%.1f tok/s, %.3f ms/layer, hit %.1f%%, PCIe %.0f KB/tok, CPU %.1f GB/s (%.3f ms/layer busy)", $4, $6, 100*$7, $8/1e3, $9, $10 }' "$1" | tail -1
}
if [ -n "$PID_BIG" ]; then
	note "waiting for the 80B checkpoint"
	wait $PID_BIG
	rc=$?
	tail -n 3 "$LOGS/mkmodel.log" 2>/dev/null
	if [ $rc = 0 ] && [ -f "$BIG/.complete" ]; then
		STATS=$WORK/experts_z$ZIPF.stats
		rm -f "$STATS"
		export QWEN3D_EXPERT_STATS=$STATS
		if [ "$ZIPF" != 0 ]; then
			# record routing statistics (prefill of 4096 tokens), saved at close
			step bench_stats "$(cap 120 150)" "$Q" bench offload --model "$BIG" --backend cuda \
				--vram-budget "${BUDGET_GIB}GiB" --prefill 4096 --tokens 0 --csv "$OUT/offload_stats.csv"
			rc=$?
			tail -n 4 "$LOGS/bench_stats.log"
			if [ $rc = 0 ]; then
				add "stats run (uniform plan)" "$(bench_row "$OUT/offload_stats.csv" prefill4096)"
			else
				add "stats run (uniform plan)" "$(rcword $rc): the run below has no statistics (a uniform plan)"
			fi
		fi
		step bench_offload "$(cap 200 60)" "$Q" bench offload --model "$BIG" --backend cuda \
			--vram-budget "${BUDGET_GIB}GiB" --prefill 4096 --tokens 64 --ctx 256 --batch 1 --csv "$OUT/offload.csv"
		rc=$?
		grep -vE 'layers on the device' "$LOGS/bench_offload.log" | tail -n 12
		add "budget ${BUDGET_GIB} GiB: experts in VRAM" "$(sed -n 's/^# backend.*offload \(.*\); [0-9]* CPU.*/\1/p' "$LOGS/bench_offload.log")"
		add "decode b1, ${BUDGET_GIB} GiB (>= $([ "$ZIPF" = 0 ] && echo 90 || echo 120) tok/s)" "$(bench_row "$OUT/offload.csv" decode-b1)"
		add "prefill 4096, ${BUDGET_GIB} GiB (>= 4000 tok/s)" "$(bench_row "$OUT/offload.csv" prefill4096)"
		add "  a streamed layer's GPU time, ms" "$(sed -n 's/.*streamed layer calls, ms each: //p' "$LOGS/bench_offload.log" | head -1)"
		[ $rc = 0 ] || add "bench offload" "$(rcword $rc) (see bench_offload.log)"
		unset QWEN3D_EXPERT_STATS
		if [ "$(left)" -gt 100 ]; then
			step bench_vram "$(cap 150 10)" "$Q" bench offload --model "$BIG" --backend cuda --prefill 4096 \
				--tokens 64 --ctx 256 --batch 1 --csv "$OUT/offload_vram.csv"
			grep -vE 'layers on the device' "$LOGS/bench_vram.log" | tail -n 4
			add "decode b1, every expert in VRAM" "$(bench_row "$OUT/offload_vram.csv" decode-b1)"
			add "prefill 4096, every expert in VRAM" "$(bench_row "$OUT/offload_vram.csv" prefill4096)"
		else
			add "all-in-VRAM comparison" "NOT RUN: $(left) s left"
		fi
	else
		add "80b-a3b benchmarks" "NOT RUN: mkmodel exit $rc (see mkmodel.log)"
	fi
fi
finish
