#!/bin/bash
# tests/cli/daemon.sh - qwen3d start/stop/status refuse bad input with one line and the right exit
# status, without a model (the API suite, tests/api/run.sh, runs the daemon itself).
set -u
Q=${QWEN3D:?}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
expect() { # name want-exit want-text command...
	local name=$1 want=$2 text=$3 out rc
	shift 3
	out=$("$@" 2>&1)
	rc=$?
	if [ "$rc" != "$want" ] || [[ "$out" != *"$text"* ]]; then
		echo "FAIL $name: exit $rc (want $want), output: $out"
		fails=$((fails + 1))
	elif [ "$want" != 0 ] && [ "$want" != 2 ] && [ "$(printf '%s\n' "$out" | wc -l)" != 1 ]; then
		echo "FAIL $name: more than one line: $out"
		fails=$((fails + 1))
	else
		echo "ok   $name"
	fi
}
export QWEN3D_CONFIG=$T/none.json # no /etc/qwen3d/config.json of this machine
export QWEN3D_KNOBS_DIR=$T/knobs   # nor its qwen3mm knobs
mkdir -p "$T/knobs" && echo 3000 >"$T/knobs/read_chunk_kb"
expect bad-knob 1 "read_chunk_kb: '3000' is not a power of two" "$Q" status --run-dir "$T/r"
rm "$T/knobs/read_chunk_kb"
echo '{}' >"$T/none.json"
expect no-model 1 "no model" "$Q" start --run-dir "$T/r"
expect missing-model 1 "No such file" "$Q" start --model "$T/missing" --run-dir "$T/r"
mkdir -p "$T/empty"
expect not-a-model 1 "no readable config.json" "$Q" start --model "$T/empty" --run-dir "$T/r"
expect bad-port 1 "port: 'http' is not an integer" "$Q" start --model "$T/empty" --port http --run-dir "$T/r"
expect port-range 1 "port: 0 is outside [1, 65535]" "$Q" start --model "$T/empty" --port 0 --run-dir "$T/r"
expect unknown-flag 2 "unknown argument '--bogus'" "$Q" start --bogus
expect flag-without-value 2 "--port needs a value" "$Q" start --port
echo '{"prot": 1}' >"$T/bad.json"
expect config-unknown-key 1 "unknown key 'prot'" "$Q" start --config "$T/bad.json"
echo '{"port": 1,' >"$T/broken.json"
expect config-broken 1 "broken.json: line" "$Q" status --config "$T/broken.json"
expect status-not-running 3 "not running" "$Q" status --run-dir "$T/r"
expect stop-not-running 0 "not running" "$Q" stop --run-dir "$T/r"
echo 999999 >"$T/stale.pid"
mkdir -p "$T/s" && cp "$T/stale.pid" "$T/s/qwen3d.pid"
expect status-stale-pid 3 "stale pid file for pid 999999" "$Q" status --run-dir "$T/s"
expect help 0 "--max-batch" "$Q" start --help
[ $fails = 0 ]
