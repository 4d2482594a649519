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
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
echo "tools/deps.sh: installed ${#PKGS[@]} packages"
