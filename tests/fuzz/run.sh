#!/bin/bash
# tests/fuzz/run.sh BUILDDIR SECONDS - runs every libFuzzer target for SECONDS each, starting from
# its seed corpus tests/fuzz/corpus/<target>/ (copied, so the committed corpus never changes).
set -eu
BUILD=${1:?}; SECS=${2:?}
status=0
for f in "$BUILD"/fuzz/fuzz_*; do
	[ -x "$f" ] || continue
	name=$(basename "$f")
	work=$(mktemp -d)
	[ -d "tests/fuzz/corpus/$name" ] && cp -r "tests/fuzz/corpus/$name/." "$work/"
	echo "fuzz: $name for ${SECS}s (seeds: $(ls "$work" | wc -l))"
	if ! "$f" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=0 \
	      -artifact_prefix="$BUILD/fuzz/$name-" "$work" >"$BUILD/fuzz/$name.log" 2>&1; then
		echo "fuzz: $name FAILED; last lines of $BUILD/fuzz/$name.log:"; tail -n 30 "$BUILD/fuzz/$name.log"
		status=1
	else
		grep -E '^#[0-9]+.*(DONE|pulse)' "$BUILD/fuzz/$name.log" | tail -n 1 || true
	fi
	rm -rf "$work"
done
exit $status
