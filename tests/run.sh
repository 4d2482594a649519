#!/bin/bash
# tests/run.sh BUILD SUITE... - runs test programs with a timeout and prints one line each.
#   unit: every BUILD/tests/test_* program (cmocka; exit 0 pass, 77 skip, else fail)
#   cli:  every tests/cli/*.sh script, with QWEN3D=BUILD/qwen3d in the environment
# Exits 1 if anything failed.
set -u
BUILD=${1:?usage: tests/run.sh BUILD SUITE...}
shift
TIMEOUT=${TEST_TIMEOUT:-900}
pass=0 fail=0 skip=0 failed=()
export QWEN3D="$PWD/$BUILD/qwen3d" BUILD

run_one() { # name, command...
	local name=$1 t0 rc log
	shift
	log=$(mktemp)
	t0=$(date +%s.%N)
	timeout --kill-after=10 "$TIMEOUT" "$@" >"$log" 2>&1
	rc=$?
	local dt
	dt=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
	case $rc in
	0) pass=$((pass + 1)); echo "PASS  $name (${dt}s)" ;;
	77) skip=$((skip + 1)); echo "SKIP  $name: $(tail -n 1 "$log")" ;;
	*) fail=$((fail + 1)); failed+=("$name")
	   [ $rc = 124 ] && echo "FAIL  $name: timed out after ${TIMEOUT}s" || echo "FAIL  $name (exit $rc)"
	   tail -n 40 "$log" | sed 's/^/      /' ;;
	esac
	rm -f "$log"
}

for suite in "$@"; do
	case $suite in
	unit) for t in "$BUILD"/tests/test_*; do
		[ -x "$t" ] || continue
		run_one "$(basename "$t")" "$t"
	done ;;
	cli) for t in tests/cli/*.sh; do [ -f "$t" ] && run_one "cli/$(basename "$t" .sh)" bash "$t"; done ;;
	*) echo "tests/run.sh: unknown suite $suite" >&2; exit 2 ;;
	esac
done
echo "== $BUILD: $pass passed, $fail failed, $skip skipped"
[ $fail = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
