#!/bin/bash
# tests/cli/logits.sh - `qwen3d logits` on every model fixture against Hugging Face's logits
# (tests/cli/compare_logits.py: relative L2 <= 1e-4, same argmax everywhere), `qwen3d generate`
# reproducing the fixtures' greedy continuations, and the one-line errors of both.
set -u
: "${QWEN3D:?QWEN3D must name the qwen3d binary}"
FIX=tests/fixtures/models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# ids FILE NAME: an I32 tensor of a safetensors file as "1,2,3"
ids() {
	python3 - "$1" "$2" <<'PY'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
t = json.loads(b[8:8 + n])[sys.argv[2]]
s, e = t["data_offsets"]
print(",".join(map(str, struct.unpack("<%di" % ((e - s) // 4), b[8 + n + s:8 + n + e]))))
PY
}

for f in tiny-sym tiny-actorder tiny-mixed; do
	ref=$FIX/$f/reference.safetensors
	P=$(ids "$ref" prompt_ids) G=$(ids "$ref" gen_ids)
	"$QWEN3D" logits --model "$FIX/$f" --prompt-ids "$P" --feed-ids "$G" --out "$tmp/$f.safetensors" \
		--backend cpu --threads 2 || fail "$f: qwen3d logits exited $?"
	python3 tests/cli/compare_logits.py "$tmp/$f.safetensors" "$ref" | sed "s/^/$f /"
	[ "${PIPESTATUS[0]}" = 0 ] || fail "$f: logits differ from the reference"
done

# prefill only: the file holds prefill_logits and nothing else
ref=$FIX/tiny-sym/reference.safetensors
P=$(ids "$ref" prompt_ids) G=$(ids "$ref" gen_ids)
"$QWEN3D" logits --model $FIX/tiny-sym --prompt-ids "$P" --out "$tmp/pre.safetensors" || fail "prefill only"
python3 tests/cli/compare_logits.py "$tmp/pre.safetensors" "$ref" >/dev/null || fail "prefill only: logits differ"
python3 -c "
import json, struct, sys
b = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', b[:8])[0]
k = sorted(x for x in json.loads(b[8:8 + n]) if x != '__metadata__')
sys.exit(0 if k == ['prefill_logits'] else 1)" "$tmp/pre.safetensors" || fail "prefill only: unexpected tensors"

# greedy generation reproduces the reference's continuation (gen_ids are HF's greedy tokens)
out=$("$QWEN3D" generate --model $FIX/tiny-sym --prompt-ids "$P" --max-tokens 16 --threads 2 2>/dev/null) ||
	fail "generate exited $?"
[ "$out" = "${G//,/ }" ] || fail "generate: got '$out', expected '${G//,/ }'"
echo "generate reproduces gen_ids"

# --prompt: the chat template and the tokenizer around the same greedy run as --prompt-ids
"$QWEN3D" mkmodel --preset tiny --vocab 151936 --out "$tmp/tok" --quiet --no-direct >/dev/null || fail "mkmodel exited $?"
cp tests/fixtures/tokenizer/tokenizer.json tests/fixtures/tokenizer/tokenizer_config.json "$tmp/tok/"
text=$("$QWEN3D" generate --model "$tmp/tok" --prompt "Hello, world" --max-tokens 6 --threads 2 2>/dev/null) ||
	fail "generate --prompt exited $?"
ids=$(echo '{"messages": [{"role": "user", "content": "Hello, world"}]}' | "$QWEN3D" render |
	"$QWEN3D" tokenize --model "$tmp/tok" | tr -s ' \n' ',' | sed 's/,$//')
gen=$("$QWEN3D" generate --model "$tmp/tok" --prompt-ids "$ids" --max-tokens 6 --threads 2 2>/dev/null) ||
	fail "generate --prompt-ids (rendered) exited $?"
want=$(echo "$gen" | "$QWEN3D" detokenize --model "$tmp/tok")
[ -n "$text" ] && [ "$text" = "$want" ] || fail "generate --prompt: '$text', the same ids detokenized: '$want'"
echo "generate --prompt = render | tokenize | generate --prompt-ids | detokenize"

# expect STATUS PATTERN ARGS...: exit status STATUS and exactly one stderr line matching PATTERN
expect() {
	local want=$1 pat=$2 rc
	shift 2
	"$QWEN3D" "$@" >"$tmp/out" 2>"$tmp/err"
	rc=$?
	[ "$rc" = "$want" ] || fail "qwen3d $*: exit $rc, expected $want ($(head -c 300 "$tmp/err"))"
	[ "$(wc -l <"$tmp/err")" = 1 ] || fail "qwen3d $*: expected one line on stderr, got: $(cat "$tmp/err")"
	grep -q -- "$pat" "$tmp/err" || fail "qwen3d $*: stderr '$(cat "$tmp/err")' lacks '$pat'"
}
M=$FIX/tiny-sym
O=$tmp/x.safetensors
expect 1 "prompt-ids" logits --model $M --prompt-ids 1,x,3 --out $O
expect 1 "prompt-ids" logits --model $M --prompt-ids "1,,3" --out $O
expect 1 "prompt-ids" logits --model $M --prompt-ids -1 --out $O
expect 1 "empty" logits --model $M --prompt-ids "" --out $O
expect 1 "outside the vocabulary" logits --model $M --prompt-ids 1,4096 --out $O
expect 1 "feed-ids.*outside the vocabulary" logits --model $M --prompt-ids 1 --feed-ids 2,99999 --out $O
expect 1 "no-such-model" logits --model $FIX/no-such-model --prompt-ids 1 --out $O
mkdir "$tmp/broken" && cp $M/*.json "$tmp/broken/" && echo '{"vocab_size": ' >"$tmp/broken/config.json"
expect 1 "config.json" logits --model "$tmp/broken" --prompt-ids 1 --out $O
expect 1 "backend 'tpu'" logits --model $M --prompt-ids 1 --out $O --backend tpu
expect 1 "$tmp/nodir" logits --model $M --prompt-ids 1 --out "$tmp/nodir/x.safetensors"
expect 2 "required" logits --model $M --prompt-ids 1
expect 2 "unknown" logits --model $M --prompt-ids 1 --out $O --bogus
expect 2 "threads" logits --model $M --prompt-ids 1 --out $O --threads 0
expect 1 "tokenizer" generate --model $M --prompt "hello"
expect 1 "outside the vocabulary" generate --model $M --prompt-ids 4096
[ ! -e $O ] || fail "a failed run left $O behind"
echo "errors: ok"
