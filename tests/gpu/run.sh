#!/bin/bash
# tests/gpu/run.sh BUILD [MODEL_DIR...] - the GPU tests: every op against the CPU reference
# (BUILD/tests/gpu/test_ops), then the whole model on every fixture (BUILD/tests/gpu/test_model,
# plus any extra model folders given), and the ops that take thread-block clusters on sm_90 again
# without them (QWEN3D_NO_CLUSTERS=1: the path of earlier GPUs).  Needs a CUDA device; exits 77
# (skip) without one.
set -u
BUILD=${1:?usage: tests/gpu/run.sh BUILD [MODEL_DIR...]}
shift
TIMEOUT=${GPU_TEST_TIMEOUT:-600}
rc=0
for t in test_ops test_model test_offload test_ops_no_clusters; do
	bin="$BUILD/tests/gpu/${t%_no_clusters}"
	[ -x "$bin" ] || { echo "FAIL  $t: $bin not built (make gpu)"; rc=1; continue; }
	case $t in
	test_ops) timeout --kill-after=10 "$TIMEOUT" "$bin" ;;
	test_ops_no_clusters) QWEN3D_NO_CLUSTERS=1 timeout --kill-after=10 "$TIMEOUT" "$bin" router,delta ;;
	*) timeout --kill-after=10 "$TIMEOUT" "$bin" "$@" ;;
	esac
	r=$?
	case $r in
	0) echo "PASS  $t" ;;
	77) echo "SKIP  $t (no CUDA device)"; [ $rc = 0 ] && rc=77 ;;
	124) echo "FAIL  $t: timed out after ${TIMEOUT}s"; rc=1 ;;
	*) echo "FAIL  $t (exit $r)"; rc=1 ;;
	esac
done
exit $rc
