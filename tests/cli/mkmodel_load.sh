#!/bin/bash
# qwen3d mkmodel and qwen3d bench load: a tiny synthetic model round-trips through inspect, the
# full-size plan has the spec's byte count, bench load loads it byte-identical (cold and warm,
# every loader mode) and writes CSV; bad options exit 2 with one line.
set -u
Q=${QWEN3D:?}
fail() { echo "FAIL: $*"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

"$Q" mkmodel --preset tiny --out "$tmp/m" --zipf 0.8 --dense q8 --shard-size 3MB --quiet >"$tmp/out" ||
	fail "mkmodel exited $?"
grep -q "^mkmodel: $tmp/m: .* in 3 shards" "$tmp/out" || fail "no summary line: $(cat "$tmp/out")"
for f in config.json quantize_config.json generation_config.json model.safetensors.index.json \
	model-00001-of-00003.safetensors model-00003-of-00003.safetensors; do
	[ -s "$tmp/m/$f" ] || fail "missing $f"
done
"$Q" inspect --model "$tmp/m" --check-data >"$tmp/inspect" || fail "inspect of the tiny model exited $?"
grep -q "self_attn.q_proj .* int8 g128" "$tmp/inspect" || fail "q8 dense not seen by inspect"
grep -q "mlp.experts.\*.up_proj .* int4 g128" "$tmp/inspect" || fail "int4 experts not seen by inspect"
python3 - "$tmp/m" <<'EOF' || fail "index / config inconsistent"
import json, os, sys
d = sys.argv[1]
idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
cfg = json.load(open(os.path.join(d, "config.json")))
assert cfg["quantization_config"]["quant_method"] == "gptq"
assert cfg["quantization_config"]["dynamic"], cfg["quantization_config"]
assert len(set(idx["weight_map"].values())) == 3
total = 0
for shard in set(idx["weight_map"].values()):
    f = open(os.path.join(d, shard), "rb")
    n = int.from_bytes(f.read(8), "little")
    h = json.loads(f.read(n))
    total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")
assert total == idx["metadata"]["total_size"], (total, idx["metadata"]["total_size"])
EOF

# the full-size plan: qwen3next.md section 7, scheme A
"$Q" mkmodel --preset 80b-a3b --no-g-idx --dry-run | grep -qx "tensor_bytes 44894615040" ||
	fail "80b-a3b scheme A is not 44,894,615,040 bytes"

# bench load: every row, cold then warm, verified, CSV
"$Q" bench load --model "$tmp/m" --cold --only direct,buffered,mmap,loader --loader-io auto,direct,mmap \
	--verify --csv "$tmp/b.csv" --quiet >"$tmp/cold" || fail "bench load --cold exited $?: $(cat "$tmp/cold")"
"$Q" bench load --model "$tmp/m" --only buffered,loader --loader-io auto,buffered --engine threads \
	--verify=full --csv "$tmp/b.csv" --quiet >"$tmp/warm" || fail "bench load (warm) exited $?: $(cat "$tmp/warm")"
for f in cold warm; do
	grep -q "^qwen3d loader (auto) " "$tmp/$f" || fail "$f: no loader row: $(cat "$tmp/$f")"
	! grep -q "verify.*differs" "$tmp/$f" || fail "$f: verify failed: $(grep verify "$tmp/$f")"
	[ "$(grep -c 'every tensor matches the files' "$tmp/$f")" -ge 2 ] || fail "$f: verify lines missing"
done
if grep -q "NOT cold" "$tmp/cold" && [ "$(id -u)" != 0 ]; then
	echo "SKIP  cold auto load uses O_DIRECT: the page cache cannot be dropped without root"
else
	grep -q "auto.*cold: .*O_DIRECT 3 files" "$tmp/cold" ||
		fail "cold auto load did not use O_DIRECT: $(grep 'loader (auto)' "$tmp/cold")"
fi
grep -q "loader (auto).*buffered 3 (3 cached)" "$tmp/warm" || fail "warm auto load did not read the cache"
# into a caller's pool, three lanes of requests, verified
"$Q" bench load --model "$tmp/m" --only loader --loader-io auto,direct --pool --lanes 3 --qd 4 --req-size 64K \
	--verify=full --quiet >"$tmp/pool" || fail "bench load --pool exited $?: $(cat "$tmp/pool")"
[ "$(grep -c '^qwen3d loader (\(auto\|direct\), pool) .* in 3 lanes' "$tmp/pool")" = 2 ] ||
	fail "--pool --lanes 3: expected two pool rows in 3 lanes: $(cat "$tmp/pool")"
[ "$(grep -c 'every tensor matches the files' "$tmp/pool")" = 2 ] || fail "--pool: verify lines missing: $(cat "$tmp/pool")"
"$Q" bench load --model "$tmp/m" --only loader --lanes 0 >/dev/null 2>&1 && fail "--lanes 0 accepted"
[ "$(head -1 "$tmp/b.csv")" = "method,cache,bytes,seconds,gbps,notes" ] || fail "no CSV header"
[ "$(grep -c ',cold,' "$tmp/b.csv")" = 6 ] || fail "CSV: expected 6 cold rows: $(cat "$tmp/b.csv")"

# bad input: exit 2 (usage) or 1 (failure), one line on stderr
"$Q" mkmodel --preset tiny --out "$tmp/m" --quiet >/dev/null 2>"$tmp/err"
[ $? = 1 ] && grep -q "already holds a model" "$tmp/err" || fail "existing model not refused"
"$Q" mkmodel --preset nope --out "$tmp/x" >/dev/null 2>"$tmp/err"
[ $? = 2 ] && [ "$(wc -l <"$tmp/err")" = 1 ] || fail "unknown preset: $(cat "$tmp/err")"
"$Q" bench load --model /nonexistent >/dev/null 2>"$tmp/err"
[ $? = 1 ] && [ "$(wc -l <"$tmp/err")" = 1 ] || fail "bench load of a missing model: $(cat "$tmp/err")"
"$Q" bench load --model "$tmp/m" --qd 0 >/dev/null 2>&1; [ $? = 2 ] || fail "--qd 0 should exit 2"
"$Q" bench nope >/dev/null 2>&1; [ $? = 2 ] || fail "unknown benchmark should exit 2"
echo "mkmodel_load: ok"
