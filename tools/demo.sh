#!/bin/bash
# tools/demo.sh [BUILD] - serves a small demo model so that qwen3d runs with no checkpoint at hand.
#
# Generates (once) a tiny Qwen3-Next with random weights and the real Qwen3 tokenizer (151,936 ids,
# so decoded text is real text) in demo/qwen3-next-tiny-random, then runs `qwen3d start --foreground` on it.
# Its answers are noise: the weights were never trained.  Environment: QWEN3D_DEMO_DIR (default
# demo/), PORT (default 8000), HOST (default 127.0.0.1); extra arguments go to qwen3d start.
set -eu
BUILD=${1:-build}
[ $# -gt 0 ] && shift
Q=$BUILD/qwen3d
DIR=${QWEN3D_DEMO_DIR:-demo}
PORT=${PORT:-8000}
MODEL=$DIR/qwen3-next-tiny-random # its folder name is the model id the API reports
HOST=${HOST:-127.0.0.1}

[ -x "$Q" ] || { echo "tools/demo.sh: $Q is missing: run make first" >&2; exit 1; }
if [ ! -f "$MODEL/config.json" ] || [ ! -f "$MODEL/tokenizer.json" ]; then
	mkdir -p "$DIR"
	echo "demo: writing a tiny random-weight model with the real tokenizer to $MODEL ..."
	"$Q" mkmodel --preset tiny --vocab 151936 --out "$MODEL" --force --no-direct --quiet
	cp tests/fixtures/tokenizer/tokenizer.json tests/fixtures/tokenizer/tokenizer_config.json "$MODEL/"
fi

cat <<EOF

  qwen3d demo: a tiny Qwen3-Next with RANDOM weights and the real tokenizer.
  Its answers are noise - this shows the server, the API and the tooling, not the model.

  Try, in another terminal:
    curl -s http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'
    curl -sN http://$HOST:$PORT/v1/chat/completions \\
         -d '{"messages":[{"role":"user","content":"Hello!"}],"max_tokens":16,"stream":true}'
    curl -s http://$HOST:$PORT/metrics
    $Q status --run-dir $DIR/run

  The real model: download a GPTQ int4 Qwen3-Next-80B-A3B-Instruct checkpoint (config.json,
  *.safetensors, tokenizer.json, tokenizer_config.json in one folder) and run
    $Q start --model /path/to/Qwen3-Next-80B-A3B-Instruct-int4
  Ctrl-C stops the demo.

EOF
exec "$Q" start --foreground --model "$MODEL" --run-dir "$DIR/run" --host "$HOST" --port "$PORT" "$@"
