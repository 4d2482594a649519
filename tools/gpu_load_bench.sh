#!/bin/bash
# tools/gpu_load_bench.sh - cold start of the full-size model on the GPU test machine, in one call
# that fits 8 minutes.  Needs only the prebuilt build/qwen3d (liburing etc. are linked into it).
#
#   1. facts: CPUs, RAM, kernel, THP / huge pages, the disk and file system, GPU, python peer
#   2. qwen3d mkmodel --preset 80b-a3b (45.4 GB, scheme A: int4 experts with g_idx, BF16 rest)
#      onto a local disk with room (not tmpfs), unless a complete one is already there
#   3. cold (page cache dropped before each row): raw O_DIRECT x4 (= four dd iflag=direct
#      bs=16M, on huge-page buffers) and x32 (a deep queue), the loader (auto = O_DIRECT, and
#      buffered), the loader into a populated pool with io_uring fixed buffers (what the qwen3mm
#      module's pool gives it), buffered read() x4
#   4. warm (the cold buffered pass leaves the files cached): baselines, the loader into fresh
#      memory, into the page cache (mmap), into a pre-faulted pool; with --vram-budget; the whole
#      model in VRAM; the safetensors peer on the first PEER_FILES shards
#   5. cold again: the peer, the loader with --vram-budget, mmap + copy
#   6. a summary: weights-ready times against the targets (cold <= 32 s and <= 1.05x the best raw
#      read, warm <= 1.5 s, >= 5x the peer)
# Every step checks the time left (BUDGET_S, default 450 s) and is skipped, saying so, when it
# would not fit.  Output: stdout (the summary last), and $OUT/gpu_load_bench.{log,csv} when $OUT is
# set.  Environment: QWEN3D (default build/qwen3d), MODEL_DIR (default: the first of /var/tmp,
# /tmp, $HOME with room and not tmpfs), VRAM_BUDGET (default 20G: dense + experts as on a 24 GB card),
# PEER_FILES (default 2), KEEP=0 removes the model at the end, MKMODEL_ARGS (default
# "--preset 80b-a3b"; e.g. "--preset 80b-a3b --layers 2" to try the script on a small machine).
set -u
T0=$(date +%s)
BUDGET=${BUDGET_S:-450}
Q=${QWEN3D:-$PWD/build/qwen3d}
VRAM=${VRAM_BUDGET:-20G}
PEER_FILES=${PEER_FILES:-2}
LOG=${OUT:+$OUT/gpu_load_bench.log}
CSV=${OUT:-/tmp}/gpu_load_bench.csv
LOG=${LOG:-/tmp/gpu_load_bench.log}
: >"$LOG"
rm -f "$CSV"

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
# run NAME SECONDS_NEEDED CMD...: runs CMD if the budget allows, output to stdout and the log
run() {
	local name=$1 need=$2
	shift 2
	if [ "$(left)" -lt "$need" ]; then
		say "-- skipped $name: needs ~${need}s, $(left)s left"
		return 1
	fi
	say "-- $name ($(left)s left)"
	timeout --kill-after=5 $(($(left) - 5)) "$@" 2>&1 | tee -a "$LOG"
	return "${PIPESTATUS[0]}"
}

[ -x "$Q" ] || { say "gpu_load_bench: $Q missing: build qwen3d first (make) and carry build/"; exit 1; }
if ldd "$Q" 2>/dev/null | grep -q "not found"; then
	say "gpu_load_bench: $Q lacks shared libraries here:"; ldd "$Q" | grep "not found" | tee -a "$LOG"; exit 1
fi

say "== facts"
say "host       $(uname -r), $(nproc) CPUs, $(($(awk '/MemTotal/ {print $2}' /proc/meminfo) >> 20)) GiB RAM, user $(id -un)"
say "thp        $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null), hugepages $(cat /proc/sys/vm/nr_hugepages), io_uring_disabled $(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo n/a)"
say "gpu        $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo none)"
say "peer       $(python3 -c 'import torch, safetensors; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "safetensors", safetensors.__version__)' 2>&1 | tail -1)"

# the model folder: a local file system with room for 45.4 GB (tmpfs would make "cold" meaningless)
MK=(${MKMODEL_ARGS:---preset 80b-a3b})
NAME=qwen3d-$(echo "${MK[*]}" | tr -c 'a-z0-9\n' - | sed 's/--*/-/g; s/^-//')
NEED=$("$Q" mkmodel "${MK[@]}" --dry-run | awk '/^file_bytes/ {print $2}')
[ -n "$NEED" ] || { echo "gpu_load_bench.sh: mkmodel --dry-run failed" >&2; exit 1; }
pick_dir() {
	# outside the repository: a copy of the work tree (and a carried build/) is replaced on
	# every call, a model under /var/tmp survives while the machine stays up
	for d in ${MODEL_DIR:-} /var/tmp /tmp "$HOME"; do
		[ -n "$d" ] || continue
		mkdir -p "$d" 2>/dev/null || continue
		local fs free
		fs=$(df --output=fstype "$d" | tail -1)
		free=$(($(df --output=avail -B1 "$d" | tail -1)))
		[ -f "$d/$NAME/model.safetensors.index.json" ] && { echo "$d"; return; }
		[ "$fs" != tmpfs ] && [ "$free" -gt $((NEED + (2 << 30))) ] && { echo "$d"; return; }
	done
}
D=$(pick_dir)
[ -n "$D" ] || { say "gpu_load_bench: no local file system with $((NEED >> 30)) GiB free (df below)"; df -h | tee -a "$LOG"; exit 1; }
M=$D/$NAME
say "disk       $M on $(df --output=source,fstype "$D" | tail -1) ($(lsblk -dno NAME,MODEL,SIZE 2>/dev/null | head -3 | tr '\n' ';'))"

if ! "$Q" inspect --model "$M" >/dev/null 2>&1; then
	run "mkmodel ${MK[*]}" 240 "$Q" mkmodel "${MK[@]}" --out "$M" --force ||
		{ say "gpu_load_bench: mkmodel failed"; exit 1; }
else
	say "-- model already there: $M"
fi
"$Q" inspect --model "$M" | sed -n '1,3p;/^total/p' | tee -a "$LOG"

B=("$Q" bench load --model "$M" --csv "$CSV" --quiet)
COLD=70 # seconds one cold pass over 45 GB may take at ~1 GB/s (with margin)

# Most important first: the cold loader against the raw reads, then (the cold buffered pass
# leaves the files in the page cache) everything warm, then the remaining cold rows.
say "== cold"
run "cold: raw O_DIRECT x4 and x32, the loader (auto = O_DIRECT when cold; buffered)" $((4 * COLD)) \
	"${B[@]}" --cold --only direct,directq,loader --loader-io auto,buffered
run "cold: the loader into a populated pool with fixed buffers (the qwen3mm module's path)" $((COLD + 15)) \
	"${B[@]}" --cold --only loader --pool --register-arena
run "cold: buffered read() x4 (leaves the files cached for the warm rows)" $COLD \
	"${B[@]}" --cold --only buffered

say "== warm"
run "warm: baselines, the loader into fresh memory and into the page cache (mmap)" 90 \
	"${B[@]}" --only buffered,mmap,loader --raw-threads "$(nproc)" --loader-io auto,mmap --verify
run "warm: the loader into a pre-faulted pool (fixed buffers)" 60 "${B[@]}" --only loader --pool --register-arena
run "warm: --vram-budget $VRAM" 60 "${B[@]}" --only loader --loader-io auto,mmap --vram-budget "$VRAM" --verify
run "warm: the whole model in VRAM" 40 "${B[@]}" --only loader --loader-io mmap --vram-budget 60G
run "warm: safetensors peer ($PEER_FILES files)" 40 "${B[@]}" --only peer --peer-files "$PEER_FILES"

say "== cold, continued"
run "cold: safetensors peer ($PEER_FILES files)" 40 "${B[@]}" --cold --only peer --peer-files "$PEER_FILES"
run "cold: the loader with --vram-budget $VRAM" $COLD "${B[@]}" --cold --only loader --vram-budget "$VRAM"
run "cold: mmap + copy x4" $COLD "${B[@]}" --cold --only mmap

say "== summary (seconds to weights-ready; GB/s)"
python3 - "$CSV" <<'EOF' 2>&1 | tee -a "$LOG" || awk -F, 'NR > 1 {print $2, $1, $4, $5}' "$CSV" | tee -a "$LOG"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def best(cache, pred):
    r = [x for x in rows if x["cache"] == cache and x["seconds"] and pred(x)]
    return min(r, key=lambda x: float(x["seconds"])) if r else None
for x in rows:
    if x["seconds"]:
        print(f'{x["cache"]:5} {x["method"]:28} {float(x["seconds"]):8.2f} s {float(x["gbps"]):7.2f} GB/s  {x["notes"][:90]}')
    else:
        print(f'{x["cache"]:5} {x["method"]:28}        -            {x["notes"][:90]}')
raw = best("cold", lambda x: x["method"].startswith(("raw", "buffered", "mmap")))
first = [x for x in rows if x["cache"] == "cold" and x["seconds"] and x["method"] == "qwen3d loader (auto)"]
if raw and first:
    t, r = float(first[0]["seconds"]), float(raw["seconds"])
    print(f'cold start, the first load of a fresh process: {t:.1f} s, {t / r:.2f}x the best raw read')
pool = best("cold", lambda x: x["method"].startswith("qwen3d") and ", pool" in x["method"])
if raw and pool:
    t, r = float(pool["seconds"]), float(raw["seconds"])
    print(f'cold, into a populated pool with fixed buffers (the module\'s path): {t:.1f} s, {t / r:.2f}x the best raw read')
ld = best("cold", lambda x: x["method"].startswith("qwen3d") and "VRAM" not in x["method"])
if raw and ld:
    t, r = float(ld["seconds"]), float(raw["seconds"])
    print(f'cold: loader {t:.1f} s (target <= 32 s), {t / r:.2f}x the best raw read ({raw["method"]}, {r:.1f} s; target <= 1.05)')
for w in ("warm",):
    l = best(w, lambda x: x["method"].startswith("qwen3d"))
    if l:
        print(f'{w}: fastest loader row {l["method"]} {float(l["seconds"]):.2f} s (target <= 1.5 s): {l["notes"][:80]}')
for cache in ("cold", "warm"):
    p = best(cache, lambda x: x["method"] == "safetensors peer")
    l = best(cache, lambda x: x["method"].startswith("qwen3d"))
    if p and l:
        print(f'{cache}: loader {float(l["gbps"]):.2f} GB/s vs safetensors peer {float(p["gbps"]):.2f} GB/s: {float(l["gbps"]) / float(p["gbps"]):.1f}x (target >= 5x)')
EOF
say "elapsed $(($(date +%s) - T0)) s; log $LOG, csv $CSV"
[ "${KEEP:-1}" = 1 ] || rm -rf "$M"
