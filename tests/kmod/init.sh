#!/bin/busybox sh
# tests/kmod/init.sh - /init of the test VM's initramfs (tests/kmod/run.sh packs it): mounts the
# basics, loads the virtio and ext4 modules, mounts the test disk, reserves huge pages for the
# hugetlb checks, runs /vmtest and prints QWEN3MM-VM-RESULT: PASS or FAIL, then powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1 # keep kernel messages off the console; vmtest reads dmesg itself

result=FAIL
for m in $(cat /modules.list); do
	insmod "/lib/modules/$m" 2>/dev/null || echo "# insmod $m failed (the disk mount below tells if it mattered)"
done
# the disk appears asynchronously after virtio_blk probes it
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 1; done
if mount -t ext4 -o ro /dev/vda /mnt; then
	echo 8 >/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages
	echo 8 >/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages
	echo "# huge pages: $(cat /proc/sys/vm/nr_hugepages) free"
	/vmtest run /qwen3mm.ko /mnt/data.bin && result=PASS
	umount /mnt
else
	echo "not ok - mount the test disk /dev/vda"
fi
echo "QWEN3MM-VM-RESULT: $result"
sync
poweroff -f
