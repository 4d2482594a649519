#!/bin/bash
# tests/cli/tokenize.sh - `qwen3d tokenize`, `detokenize` and `render` from the outside: exact
# output on the fixtures, and one-line errors with exit 1 (2 for usage) on bad input.
set -u
Q=${QWEN3D:?set QWEN3D to the qwen3d binary}
T=tests/fixtures/tokenizer
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() { # name, got, want
	if [ "$2" != "$3" ]; then
		echo "FAIL $1: got [$2], want [$3]"
		fail=1
	fi
}

# expect_error name exit-status stderr-substring command... (stdin from $tmp/in)
expect_error() {
	local name=$1 want_rc=$2 want_msg=$3
	shift 3
	"$@" <"$tmp/in" >"$tmp/out" 2>"$tmp/err"
	local rc=$?
	[ $rc = "$want_rc" ] || { echo "FAIL $name: exit $rc, want $want_rc"; fail=1; }
	[ "$(wc -l <"$tmp/err")" = 1 ] || { echo "FAIL $name: stderr is not one line:"; cat "$tmp/err"; fail=1; }
	grep -qF -- "$want_msg" "$tmp/err" || { echo "FAIL $name: stderr lacks \"$want_msg\":"; cat "$tmp/err"; fail=1; }
	[ -s "$tmp/out" ] && { echo "FAIL $name: wrote to stdout"; fail=1; }
	return 0
}

# tokenize: ids on one line
check "tokenize" "$(printf 'Hello world' | "$Q" tokenize --tokenizer $T)" "9707 1879"
check "tokenize --model" "$(printf ' Hello world' | "$Q" tokenize --model $T)" "21927 1879"
check "tokenize special" "$(printf '<|im_start|>user\nhi<|im_end|>' | "$Q" tokenize --tokenizer $T)" \
	"151644 872 198 6023 151645"
check "tokenize empty" "$("$Q" tokenize --tokenizer $T </dev/null | od -c | head -1)" "0000000  \\n"

# detokenize: exact bytes, ids separated by spaces, commas or newlines
printf '151644,872 198\n6023\t151645\n' | "$Q" detokenize --tokenizer $T >"$tmp/out"
printf '<|im_start|>user\nhi<|im_end|>' >"$tmp/want"
cmp -s "$tmp/out" "$tmp/want" || { echo "FAIL detokenize: $(od -c "$tmp/out" | head -3)"; fail=1; }
check "detokenize empty" "$(printf '' | "$Q" detokenize --tokenizer $T | wc -c)" "0"
# a lone byte 0xff decodes to U+FFFD
check "detokenize invalid utf-8" "$(printf '187' | "$Q" detokenize --tokenizer $T | od -An -tx1 | tr -d ' ')" "efbfbd"

# round trip of a multi-line, multi-script text
printf 'def f(x):\n    return x ** 2  # 平方 😀\n\n\tdone\n' >"$tmp/text"
"$Q" tokenize --tokenizer $T <"$tmp/text" | "$Q" detokenize --tokenizer $T >"$tmp/back"
cmp -s "$tmp/text" "$tmp/back" || { echo "FAIL round trip"; fail=1; }

# render: byte-exact prompt; the folder's template is checked when given
printf '%s' '{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "add_generation_prompt": true}' >"$tmp/req"
"$Q" render <"$tmp/req" >"$tmp/out"
printf '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n' >"$tmp/want"
cmp -s "$tmp/out" "$tmp/want" || { echo "FAIL render: $(od -c "$tmp/out" | head -5)"; fail=1; }
"$Q" render --model $T <"$tmp/req" >"$tmp/out2" 2>"$tmp/err"
cmp -s "$tmp/out2" "$tmp/want" && [ ! -s "$tmp/err" ] || { echo "FAIL render --model"; fail=1; }
# a folder with another template: rendered anyway, with one warning line
mkdir "$tmp/other" && printf '{"chat_template": "{{ messages }}"}' >"$tmp/other/tokenizer_config.json"
"$Q" render --model "$tmp/other" <"$tmp/req" >"$tmp/out2" 2>"$tmp/err" || fail=1
cmp -s "$tmp/out2" "$tmp/want" || { echo "FAIL render --model other"; fail=1; }
grep -q "warning: .*differs from the Qwen3-Instruct-2507" "$tmp/err" || { echo "FAIL render warning: $(cat "$tmp/err")"; fail=1; }
# render | tokenize gives transformers' ids (first record of chat.jsonl)
python3 - "$T/chat.jsonl" "$tmp" <<'PY' || fail=1
import json, subprocess, sys, os
rec = json.loads(open(sys.argv[1], encoding="utf-8").readline())
q = os.environ["QWEN3D"]
req = json.dumps({k: rec[k] for k in ("messages", "tools", "add_generation_prompt")}).encode()
text = subprocess.run([q, "render"], input=req, capture_output=True, check=True).stdout
ids = subprocess.run([q, "tokenize", "--tokenizer", "tests/fixtures/tokenizer"], input=text,
                     capture_output=True, check=True).stdout.split()
if text.decode() != rec["text"] or [int(i) for i in ids] != rec["ids"]:
    print("FAIL render | tokenize differs from chat.jsonl"); sys.exit(1)
PY

# --bench prints a speed line and can write the ids
head -c 20000 $T/encode.jsonl >"$tmp/corpus"
"$Q" tokenize --tokenizer $T --bench "$tmp/corpus" --seconds 0.2 --ids-out "$tmp/ids" >"$tmp/out" || fail=1
grep -q "MB/s" "$tmp/out" || { echo "FAIL bench: $(cat "$tmp/out")"; fail=1; }
check "bench ids" "$(cat "$tmp/ids")" "$("$Q" tokenize --tokenizer $T <"$tmp/corpus")"

# --bench --docs: NUL-separated documents, one encode call and one line of ids each
printf 'Hello world\0\0 hi there\0' >"$tmp/docs"
"$Q" tokenize --tokenizer $T --bench "$tmp/docs" --docs --seconds 0.1 --ids-out "$tmp/ids" >"$tmp/out" || fail=1
check "bench docs ids" "$(cat "$tmp/ids")" "$(printf '9707 1879\n\n15588 1052\n')"
grep -q "^qwen3d tokenize: 20 bytes -> 4 tokens" "$tmp/out" || { echo "FAIL bench docs: $(cat "$tmp/out")"; fail=1; }

# errors: one line on stderr, nothing on stdout, exit 1 (2 for usage)
printf 'x' >"$tmp/in"
expect_error "no folder" 1 "needs --tokenizer DIR or --model DIR" "$Q" tokenize
expect_error "bad folder" 1 "/nonexistent: no tokenizer.json" "$Q" tokenize --tokenizer /nonexistent
expect_error "usage" 2 "usage: qwen3d tokenize" "$Q" tokenize --bogus
expect_error "usage detokenize" 2 "usage: qwen3d detokenize" "$Q" detokenize --bench x
expect_error "extra argument" 2 "usage: qwen3d render" "$Q" render extra
expect_error "bench missing file" 1 "/nonexistent/corpus" "$Q" tokenize --tokenizer $T --bench /nonexistent/corpus
printf 'ab\xffcd' >"$tmp/in"
expect_error "invalid utf-8" 1 "text is not valid UTF-8 (byte 2)" "$Q" tokenize --tokenizer $T
printf '12 abc' >"$tmp/in"
expect_error "detokenize garbage" 1 "byte 3: expected token ids" "$Q" detokenize --tokenizer $T
printf '9707 151669' >"$tmp/in"
expect_error "detokenize range" 1 "id 151669 (item 1) is outside the vocabulary" "$Q" detokenize --tokenizer $T
printf '99999999999' >"$tmp/in"
expect_error "detokenize huge" 1 "id too large" "$Q" detokenize --tokenizer $T
printf '{"messages": [' >"$tmp/in"
expect_error "render bad json" 1 "stdin: line 1 column" "$Q" render
printf '{"messages": [{"role": "user"}, {"content": "x"}]}' >"$tmp/in"
expect_error "render bad role" 1 "messages[1].role: expected a string" "$Q" render
printf '{"messages": [{"role": "user"}]}' >"$tmp/in"
mkdir "$tmp/badmodel" && printf '{' >"$tmp/badmodel/tokenizer_config.json"
expect_error "render bad folder" 1 "tokenizer_config.json: line 1" "$Q" render --model "$tmp/badmodel"
mkdir "$tmp/badtok" && printf '{"model": {"type": "Unigram"}}' >"$tmp/badtok/tokenizer.json"
expect_error "bad tokenizer.json" 1 "only BPE is supported" "$Q" tokenize --tokenizer "$tmp/badtok"

exit $fail
