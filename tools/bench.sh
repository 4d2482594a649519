#!/bin/bash
# tools/bench.sh BUILD - the benchmarks that run on this machine (`make bench`).  CSV rows go to
# BUILD/bench/*.csv; tables to stdout.
#
#   load   a mid-size synthetic checkpoint (80b-a3b shapes, BENCH_LAYERS layers, ~1.5 GB per
#          layer pair + 1.2 GB of embeddings; default 2 layers = 3.1 GB) written to BENCH_DIR, then
#          `qwen3d bench load` cold and warm with every baseline.  Needs the space on BENCH_DIR's
#          file system (tmpfs is refused: it has no cold start).
#
# Environment: BENCH_DIR (default /var/tmp/qwen3d-bench), BENCH_LAYERS (default 2), BENCH_KEEP=1
# keeps the model for the next run, BENCH_ONLY=load to pick sections.
set -u
BUILD=${1:-build}
Q=$PWD/$BUILD/qwen3d
OUT=$BUILD/bench
DIR=${BENCH_DIR:-/var/tmp/qwen3d-bench}
LAYERS=${BENCH_LAYERS:-2}
ONLY=${BENCH_ONLY:-load}
mkdir -p "$OUT"
[ -x "$Q" ] || { echo "bench.sh: $Q not built (make first)"; exit 1; }
status=0

bench_load() {
	local model=$DIR/80b-a3b-L$LAYERS need fs
	mkdir -p "$DIR" || return 1
	fs=$(df --output=fstype "$DIR" | tail -1)
	if [ "$fs" = tmpfs ]; then
		echo "bench load: $DIR is on tmpfs (no cold start there): set BENCH_DIR"; return 1
	fi
	need=$("$Q" mkmodel --preset 80b-a3b --layers "$LAYERS" --dry-run | awk '/^file_bytes/ {print $2}')
	[ -n "$need" ] || { echo "bench.sh: mkmodel --dry-run failed" >&2; return 1; }
	if [ ! -f "$model/model.safetensors.index.json" ]; then
		local free=$(($(df --output=avail -B1 "$DIR" | tail -1)))
		[ "$free" -gt $((need + (1 << 30))) ] ||
			{ echo "bench load: $DIR has $((free >> 30)) GiB free, the model needs $((need >> 30)) GiB"; return 1; }
		"$Q" mkmodel --preset 80b-a3b --layers "$LAYERS" --out "$model" --force || return 1
	fi
	echo "== bench load: cold ($(uname -r), $(nproc) CPUs, $(($(awk '/MemTotal/ {print $2}' /proc/meminfo) >> 20)) GiB RAM, $fs)"
	"$Q" bench load --model "$model" --cold --only direct,direct1,buffered,mmap,peer,loader \
		--loader-io auto,direct --verify --csv "$OUT/load.csv" || status=1
	echo "== bench load: warm"
	"$Q" bench load --model "$model" --only buffered,mmap,peer,loader --raw-threads "$(nproc)" \
		--loader-io auto,mmap --verify --csv "$OUT/load.csv" || status=1
	echo "== bench load: warm, the arena from a pre-faulted pool"
	"$Q" bench load --model "$model" --only loader --loader-io auto --pool --csv "$OUT/load.csv" || status=1
	[ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$model"
}

for s in ${ONLY//,/ }; do
	case $s in
	load) bench_load || status=1 ;;
	*) echo "bench.sh: unknown section $s"; status=1 ;;
	esac
done
echo "bench.sh: CSV in $OUT/"
exit $status
