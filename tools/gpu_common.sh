# tools/gpu_common.sh - helpers the GPU-machine scripts source (gpu_session.sh,
# gpu_offload_session.sh; gpu_ab_run.sh and gpu_profile.sh for unpack alone).  For the rest the
# caller sets T0 and T_END (seconds since the epoch), LOGS, and an empty array SUMMARY, and may
# set ADD_WIDTH (the summary's name column, default 44).

note() { echo "[$(($(date +%s) - T0))s] $*"; }
left() { echo $((T_END - $(date +%s))); }
# cap MAX [RESERVE]: a timeout of at most MAX seconds that leaves RESERVE for what follows
cap() { local l=$(($(left) - ${2:-0})); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }
add() { SUMMARY+=("$(printf "%-${ADD_WIDTH:-44}s %s" "$1" "$2")"); }
# unpack NAME: build/NAME.tar.xz, where this call carried one, into a fresh build/NAME (a warm
# machine keeps the ignored folders of earlier calls: their builds would pass for this one's)
unpack() { [ -f "build/$1.tar.xz" ] || return 0; rm -rf "build/$1" && tar xJf "build/$1.tar.xz" -C build; }

# rcword RC: a step's exit status in words for the summary
rcword() {
	case $1 in
	124 | 137) echo "timed out" ;;
	125) echo "not run: no time left" ;;
	*) echo "exit $1" ;;
	esac
}

# step NAME TIMEOUT CMD...: runs CMD with a timeout, output to $LOGS/NAME.log and to stdout.  A
# timeout under STEP_MIN seconds (default 20: what is left of the session's budget) does not
# start a run that cannot finish: it returns 125 (rcword: "not run").
step() {
	local name=$1 to=$2 t=$(date +%s) rc
	shift 2
	if [ "$to" -lt "${STEP_MIN:-20}" ]; then
		note "skip $name: only ${to}s of the session's budget left for it"
		echo "not run: only ${to}s of the session's budget left" >"$LOGS/$name.log"
		return 125
	fi
	note "start $name (timeout ${to}s): $*"
	timeout --kill-after=5 "$to" "$@" >"$LOGS/$name.log" 2>&1
	rc=$?
	note "end $name: exit $rc after $(($(date +%s) - t))s"
	return $rc
}
