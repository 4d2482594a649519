#!/bin/bash
# qwen3d inspect: a summary on every fixture (exit 0); one line and exit 1 on broken input.
set -u
Q=${QWEN3D:?}
F=tests/fixtures/models
fail() { echo "FAIL: $*"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

for m in tiny-sym tiny-actorder tiny-mixed; do
	out=$("$Q" inspect --model $F/$m --check-data) || fail "inspect $m exited $?"
	echo "$out" | grep -q "^layers      .*linear_attention" || fail "$m: no layer line"
	echo "$out" | grep -q "^per expert  " || fail "$m: no per-expert size"
	"$Q" inspect --model $F/$m --json | python3 -c '
import json,sys
j=json.load(sys.stdin); b=j["bytes"]
assert b["experts"]+b["dense"]+b["embeddings"]+b["lm_head"]+b["other"]+b["mtp"]==b["total"], b
assert len(j["layers"])>=4' || fail "$m: --json output inconsistent"
done
"$Q" inspect --model $F/tiny-mixed | grep -q "mlp.experts.\*.up_proj .* int4 g32 sym" || fail "mixed: experts not int4 g32"
"$Q" inspect --model $F/tiny-mixed | grep -q "self_attn.q_proj .* int8 g128" || fail "mixed: q_proj not int8"
"$Q" inspect --model $F/tiny-actorder | grep -q "act-order" || fail "actorder: no act-order"

# broken inputs: exit 1, exactly one line on stderr, naming the culprit
expect_fail() { # name, needle, args...
	local name=$1 needle=$2; shift 2
	"$Q" inspect "$@" >"$tmp/out" 2>"$tmp/err"; rc=$?
	[ $rc = 1 ] || fail "$name: exit $rc, wanted 1"
	[ "$(wc -l <"$tmp/err")" = 1 ] || fail "$name: stderr is not one line: $(cat "$tmp/err")"
	grep -q -- "$needle" "$tmp/err" || fail "$name: '$needle' not in: $(cat "$tmp/err")"
}
expect_fail missing-dir "No such file" --model /nonexistent
cp -r $F/tiny-sym "$tmp/m"
truncate -s -1000 "$tmp/m/model-00002-of-00002.safetensors"
expect_fail truncated "model-00002-of-00002.safetensors" --model "$tmp/m"
cp $F/tiny-sym/model-00002-of-00002.safetensors "$tmp/m/"
echo '{"model_type": "qwen3_next"' >"$tmp/m/config.json"
expect_fail bad-json "config.json" --model "$tmp/m"
"$Q" inspect >/dev/null 2>&1; [ $? = 2 ] || fail "no arguments should exit 2"
echo "inspect: ok"
