#!/bin/bash
# tests/kmod/run.sh - builds qwen3mm for Debian's 6.1 and 6.12 kernels and tests it under qemu.
#
# For each kernel: download (apt-get download, nothing installed) its headers, kbuild and image
# packages into build/kmod-vm/, unpack them there, build kmod/ against the headers with -Werror,
# build tests/kmod/vmtest.c static, pack a busybox initramfs with the module, the test program and
# the virtio/ext4 modules, boot it under qemu (TCG software emulation) with two NUMA
# nodes and an ext4 virtio disk holding a pattern file, and read the results off the serial console.
# Prints every check per kernel; exits non-zero on any failure.
#
# Needs: apt-get, qemu-system-x86, busybox-static, cpio, kmod, e2fsprogs, gcc, liburing-dev,
# libnuma-dev (installed here when missing and running as root).
# Environment: KMOD_KERNELS   meta packages naming the kernels (default below)
#              KMOD_VM_DIR    work folder (default build/kmod-vm; downloads are cached there)
#              KMOD_VM_TIMEOUT seconds one VM may run (default 480)
#              KMOD_VM_ACCEL  qemu accelerator (default tcg)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=${KMOD_VM_DIR:-build/kmod-vm}
KERNELS=${KMOD_KERNELS:-"linux-headers-amd64 linux-headers-6.12-amd64"}
VM_TIMEOUT=${KMOD_VM_TIMEOUT:-480}
mkdir -p "$WORK/tmp"
WORK=$(cd "$WORK" && pwd)
export TMPDIR=$WORK/tmp # compilers' scratch files stay out of a shared /tmp

say() { echo "test-kmod: $*"; }
die() { echo "test-kmod: $*" >&2; exit 1; }

# ---- host tools ---------------------------------------------------------------------------
need_pkgs=()
for t in qemu-system-x86_64:qemu-system-x86 cpio:cpio depmod:kmod mkfs.ext4:e2fsprogs \
	 xz:xz-utils gcc:gcc; do
	command -v "${t%%:*}" >/dev/null || need_pkgs+=("${t#*:}")
done
[ -x /bin/busybox ] && file_static=$(ldd /bin/busybox 2>&1 || true) || file_static=missing
case $file_static in *"not a dynamic"*) ;; *) need_pkgs+=(busybox-static) ;; esac
[ -f /usr/lib/x86_64-linux-gnu/liburing.a ] || need_pkgs+=(liburing-dev)
[ -f /usr/lib/x86_64-linux-gnu/libnuma.a ] || need_pkgs+=(libnuma-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing packages: ${need_pkgs[*]} (run as root or install them)"
	say "installing ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# depends NAME: the names NAME's package depends on (first alternative of each)
depends() { apt-cache depends "$1" 2>/dev/null | awk '$1 == "Depends:" {print $2}'; }

# ---- per kernel: packages, build, initramfs ------------------------------------------------
# fetch_kernel META: sets ABI, KROOT (unpacked headers+kbuild), VMLINUZ, MODROOT (image modules)
fetch_kernel() {
	local meta=$1 hdr pkgs p dir try
	for try in 1 2; do
		hdr=$(depends "$meta" | grep -m1 '^linux-headers-' || true)
		ABI=${hdr#linux-headers-}
		dir=$WORK/$ABI
		KROOT=$dir/hdr
		[ -n "$hdr" ] && { [ -f "$dir/.unpacked-hdr" ] || download_kernel "$hdr" "$dir"; } && break
		# stale or missing package lists: refresh once (root only)
		[ $try = 1 ] && [ "$(id -u)" = 0 ] || die "cannot get the packages of $meta (apt-get update?)"
		say "refreshing the package lists"
		apt-get update -qq
	done
	VMLINUZ=$dir/image/boot/vmlinuz-$ABI
	MODROOT=$dir/image
	[ -f "$VMLINUZ" ] || die "$ABI: no kernel image in the package"
}

# download_kernel HEADERS-PKG DIR: headers, -common, kbuild and image, unpacked under DIR
download_kernel() {
	local hdr=$1 dir=$2 pkgs p
	pkgs=("$hdr" "linux-image-$ABI")
	for p in $(depends "$hdr"); do
		case $p in linux-headers-*-common | linux-kbuild-*) pkgs+=("$p") ;; esac
	done
	say "$ABI: downloading ${pkgs[*]}"
	rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/hdr" "$dir/image"
	(cd "$dir/debs" && apt-get download -q "${pkgs[@]}" >download.log 2>&1) || {
		cat "$dir/debs/download.log"
		return 1
	}
	for p in "$dir"/debs/linux-headers-*.deb "$dir"/debs/linux-kbuild-*.deb; do
		dpkg-deb -x "$p" "$dir/hdr"
	done
	dpkg-deb -x "$dir"/debs/linux-image-*.deb "$dir/image"
	# the headers' Makefile includes the -common tree by absolute path
	sed -i "s#include /usr/src/#include $dir/hdr/usr/src/#" \
		"$dir/hdr/usr/src/linux-headers-$ABI/Makefile"
	depmod -b "$dir/image" "$ABI"
	rm -rf "$dir/debs"
	touch "$dir/.unpacked-hdr"
}

# modules_for ABI: the .ko files (dependencies first) for virtio disks and ext4
modules_for() {
	local m
	for m in virtio_pci virtio_blk crc32c_generic ext4; do
		modprobe -d "$MODROOT" -S "$1" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
	done | awk '!seen[$0]++'
}

build_module() { # ABI OUT
	local src=$WORK/$1/kmod log=$WORK/$1/kmod-build.log
	rm -rf "$src" && mkdir -p "$src" && cp kmod/*.c kmod/*.h kmod/Kbuild kmod/Makefile "$src/"
	# no BTF for the module: Debian's 6.12 headers ask pahole (dwarves) for it, which a fresh
	# Debian 12 lacks, and the test loads the module without it
	if ! make -C "$KROOT/usr/src/linux-headers-$1" M="$src" KCFLAGS=-Werror CONFIG_DEBUG_INFO_BTF_MODULES= \
		modules >"$log" 2>&1; then
		cat "$log"
		die "$1: the module does not build"
	fi
	cp "$src/qwen3mm.ko" "$2"
}

make_initramfs() { # ABI VMTEST OUT
	local abi=$1 dir=$WORK/$1/initramfs m name
	rm -rf "$dir" && mkdir -p "$dir"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
	cp /bin/busybox "$dir/bin/busybox"
	cp "$2" "$dir/vmtest"
	build_module "$abi" "$dir/qwen3mm.ko"
	: >"$dir/modules.list"
	for m in $(modules_for "$abi"); do
		name=$(basename "$m")
		case $name in
		*.xz) xz -dc "$m" >"$dir/lib/modules/${name%.xz}"; name=${name%.xz} ;;
		*.zst) zstd -qdc "$m" >"$dir/lib/modules/${name%.zst}"; name=${name%.zst} ;;
		*) cp "$m" "$dir/lib/modules/" ;;
		esac
		echo "$name" >>"$dir/modules.list"
	done
	cp tests/kmod/init.sh "$dir/init"
	cp udev/qwen3mm-knobs "$dir/qwen3mm-knobs"
	chmod +x "$dir/init" "$dir/qwen3mm-knobs"
	(cd "$dir" && find . | cpio -o -H newc --quiet | gzip -1) >"$3"
}

# ---- shared pieces -------------------------------------------------------------------------
VMTEST=$WORK/vmtest
say "building the test program (static)"
CFLAGS_T=(-O2 -g -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare
	  -Wno-format-truncation -Ikmod -Iuserspace)
SRC_T=(tests/kmod/vmtest.c userspace/memprov.c userspace/knobs.c userspace/util.c)
rm -f "$VMTEST" "$WORK/vmtest-host"
gcc "${CFLAGS_T[@]}" -o "$WORK/vmtest-host" "${SRC_T[@]}" -luring -lnuma
# (libnuma.a makes ld warn about getaddrinfo in static programs; nothing here calls it)
gcc -static "${CFLAGS_T[@]}" -o "$VMTEST" "${SRC_T[@]}" -luring -lnuma >"$WORK/vmtest-build.log" 2>&1 ||
	{ cat "$WORK/vmtest-build.log"; die "the static test program does not build"; }

DISK=$WORK/disk.img
if [ ! -f "$DISK" ]; then
	say "making the ext4 disk with a 16 MiB pattern file"
	rm -rf "$WORK/disk" && mkdir -p "$WORK/disk"
	"$WORK/vmtest-host" gen "$WORK/disk/data.bin" $((16 << 20))
	mkfs.ext4 -q -F -O ^metadata_csum -d "$WORK/disk" "$DISK.tmp" 64M
	mv "$DISK.tmp" "$DISK"
fi

# TCG by default: it behaves the same everywhere (nested KVM, where offered, can fail to boot
# these kernels); KMOD_VM_ACCEL=kvm to try it
accel=${KMOD_VM_ACCEL:-tcg}

# ---- run ----------------------------------------------------------------------------------
failed=()
summary=()
total_pass=0
total_fail=0
for meta in $KERNELS; do
	fetch_kernel "$meta"
	say "$ABI: building the module and the initramfs"
	make_initramfs "$ABI" "$VMTEST" "$WORK/$ABI/initrd.gz"
	log=$WORK/$ABI/console.log
	say "$ABI: booting under qemu ($accel, 2 NUMA nodes, timeout ${VM_TIMEOUT}s)"
	t0=$(date +%s)
	rc=0
	timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 -accel "$accel" -nographic -no-reboot \
		-m 768M -smp 2,sockets=2,cores=1,threads=1 \
		-object memory-backend-ram,id=m0,size=384M -object memory-backend-ram,id=m1,size=384M \
		-numa node,nodeid=0,cpus=0,memdev=m0 -numa node,nodeid=1,cpus=1,memdev=m1 \
		-kernel "$VMLINUZ" -initrd "$WORK/$ABI/initrd.gz" \
		-append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init" \
		-drive "file=$DISK,if=virtio,format=raw,snapshot=on" \
		</dev/null >"$log" 2>&1 || rc=$?
	dt=$(($(date +%s) - t0))
	tr -d '\r' <"$log" >"$log.txt"
	echo "== $ABI (${dt}s)"
	grep -E '^(ok|not ok|#) ' "$log.txt" | sed 's/^/   /' || true
	res=$(grep -m1 -o 'QWEN3MM-VM-RESULT: [A-Z]*' "$log.txt" || true)
	npass=$(grep -c '^ok ' "$log.txt" || true)
	nfail=$(grep -c '^not ok ' "$log.txt" || true)
	if [ "$res" != "QWEN3MM-VM-RESULT: PASS" ] || [ "$nfail" != 0 ] || [ "$npass" = 0 ]; then
		[ $rc = 124 ] && echo "   the VM timed out after ${VM_TIMEOUT}s"
		echo "   --- last console lines ($log.txt) ---"
		tail -n 40 "$log.txt" | sed 's/^/   /'
		failed+=("$ABI")
		[ "$nfail" != 0 ] || nfail=1 # a VM that died counts as one failure
	fi
	summary+=("$ABI: $npass passed, $nfail failed")
	total_pass=$((total_pass + npass))
	total_fail=$((total_fail + nfail))
done

echo "== test-kmod summary"
for s in "${summary[@]}"; do echo "   $s"; done
[ ${#failed[@]} -gt 0 ] && echo "test-kmod: FAILED on ${failed[*]}"
echo "test-kmod: $total_pass passed, $total_fail failed"
[ ${#failed[@]} = 0 ]
