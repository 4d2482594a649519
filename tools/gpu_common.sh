# tools/gpu_common.sh - helpers the GPU-machine session scripts source (gpu_session.sh,
# gpu_offload_session.sh).  The caller sets T0 and T_END (seconds since the epoch), LOGS, and
# an empty array SUMMARY, and may set ADD_WIDTH (the summary's name column, default 44).

note() { echo "[$(($(date +%s) - T0))s] $*"; }
left() { echo $((T_END - $(date +%s))); }
# cap MAX [RESERVE]: a timeout of at most MAX seconds that leaves RESERVE for what follows
cap() { local l=$(($(left) - ${2:-0})); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }
add() { SUMMARY+=("$(printf "%-${ADD_WIDTH:-44}s %s" "$1" "$2")"); }

# step NAME TIMEOUT CMD...: runs CMD with a timeout, output to $LOGS/NAME.log and to stdout
step() {
	local name=$1 to=$2 t=$(date +%s) rc
	shift 2
	note "start $name (timeout ${to}s): $*"
	timeout --kill-after=5 "$to" "$@" >"$LOGS/$name.log" 2>&1
	rc=$?
	note "end $name: exit $rc after $(($(date +%s) - t))s"
	return $rc
}
