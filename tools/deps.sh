#!/bin/bash
# tools/deps.sh - installs the Debian 12 packages qwen3d's build and tests need.
# The CUDA toolkit is not a Debian package: install NVIDIA's (nvcc, cuBLAS) to get the GPU backend.
set -eu
PKGS=(
	# build
	build-essential clang libclang-rt-14-dev pkg-config bc
	# libraries (JSON, regex, Unicode, HTTP, io_uring, NUMA, topology, tests)
	libjansson-dev libpcre2-dev libutf8proc-dev libmicrohttpd-dev libgnutls28-dev
	liburing-dev libnuma-dev libhwloc-dev libcmocka-dev
	# tests
	python3 curl valgrind
)
if [ "$(id -u)" != 0 ]; then
	echo "tools/deps.sh: needs root; run: sudo apt-get update && sudo apt-get install -y ${PKGS[*]}" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# apt_wait ARGS...: apt-get ARGS, waiting up to five minutes while another apt holds its locks
# (a fresh Debian runs apt-daily / unattended-upgrades at boot; two `make deps` at once) rather
# than failing (DPkg::Lock::Timeout covers dpkg's lock, not apt-get update's lists lock)
apt_wait() {
	local err i rc
	err=$(mktemp)
	for i in $(seq 60); do
		rc=0
		apt-get -o DPkg::Lock::Timeout=5 "$@" 2>"$err" || rc=$?
		[ $rc != 0 ] && grep -q 'Could not get lock' "$err" || break
		[ "$i" = 1 ] && echo "tools/deps.sh: another apt holds its lock ($(grep -m1 -o 'held by process [0-9]* ([^)]*)' "$err")); waiting" >&2
		sleep 5
	done
	cat "$err" >&2
	rm -f "$err"
	return $rc
}
apt_wait update -qq
apt_wait install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
echo "tools/deps.sh: installed ${#PKGS[@]} packages"
