#!/bin/bash
# tests/gpu/run.sh BUILD [MODEL_DIR...] - the GPU tests: every op against the CPU reference
# (BUILD/tests/gpu/test_ops), then the whole model on every fixture (BUILD/tests/gpu/test_model,
# plus any extra model folders given).  Needs a CUDA device; exits 77 (skip) without one.
set -u
BUILD=${1:?usage: tests/gpu/run.sh BUILD [MODEL_DIR...]}
shift
TIMEOUT=${GPU_TEST_TIMEOUT:-600}
rc=0
for t in test_ops test_model test_offload; do
	bin="$BUILD/tests/gpu/$t"
	[ -x "$bin" ] || { echo "FAIL  $t: $bin not built (make gpu)"; rc=1; continue; }
	if [ "$t" != test_ops ]; then
		timeout --kill-after=10 "$TIMEOUT" "$bin" "$@"
	else
		timeout --kill-after=10 "$TIMEOUT" "$bin"
	fi
	r=$?
	case $r in
	0) echo "PASS  $t" ;;
	77) echo "SKIP  $t (no CUDA device)"; [ $rc = 0 ] && rc=77 ;;
	124) echo "FAIL  $t: timed out after ${TIMEOUT}s"; rc=1 ;;
	*) echo "FAIL  $t (exit $r)"; rc=1 ;;
	esac
done
exit $rc
