#!/bin/busybox sh
# /init of the VDUSE e2e guest (Debian 13's 6.12 kernel): vublk runs inside the guest and serves a
# file on the guest's tmpfs to the guest's own kernel as a VDUSE device; the checks run against
# the /dev/vda that virtio_vdpa and virtio_blk make of it. Each check prints one line:
#   E2E ok <check> <detail>
#   E2E FAIL <check> <detail>
# and the run ends with "E2E done vduse".

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
T=/tools
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run

for m in $(cat /modules.order); do
	insmod "/modules/$m" || echo "insmod $m failed"
done

ok() { echo "E2E ok $*"; }
fail() { echo "E2E FAIL $*"; }
expect() {
	if [ "$2" = "$3" ]; then ok "$1" "$2"; else fail "$1" "got '$2', want '$3'"; fi
}
run() {
	name=$1
	shift
	if out=$("$@" 2>&1); then
		ok "$name"
	else
		rc=$?
		echo "$out" | tail -n 20
		fail "$name" "exit status $rc: $*"
	fi
}
zeros_md5() { dd if=/dev/zero bs=1M count="$1" 2>/dev/null | md5sum | cut -d' ' -f1; }
dev_md5() { dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }
wait_for() { # wait_for TEST-ARGS...: up to 60 s
	i=0
	while ! test "$@" && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
	test "$@"
}
# leftovers: what a stopped export left behind (vdpa devices, VDUSE devices other than control).
leftovers() {
	echo "$(ls /sys/bus/vdpa/devices 2>/dev/null) $(ls /dev/vduse 2>/dev/null | grep -v '^control$')" | tr -s ' \n' ' ' | sed 's/^ *//;s/ *$//'
}
# serve NAME LOG ARGS...: start vublk for /tmp/disk.img as VDUSE device NAME; VUBLK is its pid.
serve() {
	name=$1 log=$2
	shift 2
	/vublk serve --vduse "$name" --blk-file /tmp/disk.img --num-queues 2 --lanes 2 \
		--log-format json "$@" 2>>"$log" &
	VUBLK=$!
}
# stop_vublk CHECK LOG: SIGTERM, exit 0, nothing left behind.
stop_vublk() {
	kill -TERM $VUBLK
	wait $VUBLK
	expect "$1_exit" "$?" 0
	expect "$1_nothing_left" "$(leftovers)" ""
}

expect vduse_control "$(test -c /dev/vduse/control && echo yes)" yes
dd if=/dev/zero of=/tmp/disk.img bs=1M count=0 seek=160 2>/dev/null

# --- A writable export bound to virtio_vdpa.
serve vd0 /tmp/vd0.log
if wait_for -b /dev/vda; then ok vda_appeared; else fail vda_appeared "no /dev/vda"; cat /tmp/vd0.log | tail -n 20; fi
expect vdpa_driver "$(basename "$(readlink /sys/bus/vdpa/devices/vd0/driver)")" virtio_vdpa
expect size "$(blockdev --getsize64 /dev/vda)" $((160 << 20))
expect serial "$(cat /sys/block/vda/serial)" disk.img
expect queues "$(ls /sys/block/vda/mq | wc -l)" 2
expect write_cache "$(cat /sys/block/vda/queue/write_cache)" "write back"

run fio_randwrite_verify $T/fio --name=randwrite --filename=/dev/vda --thread --direct=1 \
	--ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k --size=16M --numjobs=2 \
	--offset_increment=16M --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting
run fio_seq_1m_verify $T/fio --name=seq1m --filename=/dev/vda --thread --direct=1 \
	--ioengine=libaio --iodepth=4 --rw=write --bs=1M --offset=40M --size=24M \
	--verify=crc32c --verify_fatal=1 --do_verify=1

dd if=/dev/urandom of=/dev/vda bs=1M seek=100 count=8 oflag=direct 2>/dev/null
run discard $T/blkdiscard -o $((100 << 20)) -l $((4 << 20)) /dev/vda
expect discard_reads_zeros "$(dev_md5 /dev/vda 100 4)" "$(zeros_md5 4)"
run write_zeroes $T/blkdiscard -z -o $((104 << 20)) -l $((4 << 20)) /dev/vda
expect write_zeroes_reads_zeros "$(dev_md5 /dev/vda 104 4)" "$(zeros_md5 4)"

# Flushes: a write with fdatasync, and the file system's own; vublk counts them (host side).
dd if=/dev/urandom of=/dev/vda bs=4k count=4 seek=30000 oflag=direct conv=fdatasync 2>/dev/null
run mkfs_ext4 $T/mke2fs -q -F -t ext4 /dev/vda
run e2fsck $T/e2fsck -f -n /dev/vda
stop_vublk vd0
stopped=$(grep '"msg":"export stopped"' /tmp/vd0.log | head -n 1)
echo "E2E log vd0 $stopped"
flushes=$(echo "$stopped" | sed -n 's/.*"flushes":\([0-9]*\).*/\1/p')
if [ "${flushes:-0}" -gt 0 ]; then ok flushes_reach_vublk "$flushes"; else fail flushes_reach_vublk "flushes=${flushes:-none}"; fi
expect vd0_no_vda "$(test -b /dev/vda && echo present || echo gone)" gone

# --- A read-only export refuses writes.
serve vdro /tmp/vdro.log --read-only
if wait_for -b /dev/vda; then ok ro_vda_appeared; else fail ro_vda_appeared "no /dev/vda"; tail -n 20 /tmp/vdro.log; fi
expect ro_flag "$(cat /sys/block/vda/ro)" 1
if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null; then
	fail ro_write_refused "a write to the read-only disk succeeded"
else
	ok ro_write_refused
fi
run ro_e2fsck $T/e2fsck -f -n /dev/vda
stop_vublk vdro

# --- vublk killed with SIGKILL in the middle of verified writes, three times, and started again
# each time: it takes the device over, resubmits what was in flight, and the writes go on without
# an I/O error.
serve vdk /tmp/vdk.log
if wait_for -b /dev/vda; then ok kill_vda_appeared; else fail kill_vda_appeared "no /dev/vda"; tail -n 20 /tmp/vdk.log; fi
dmesg -c >/dev/null
# 2 x 64 MiB of 4k writes: on an idle host fio ran through 2 x 32 MiB before the third kill.
$T/fio --name=killed --filename=/dev/vda --thread --direct=1 --ioengine=libaio --iodepth=16 \
	--rw=randwrite --bs=4k --size=64M --numjobs=2 --offset_increment=64M --verify=crc32c \
	--verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio-kill.out 2>&1 &
FIO=$!
# A request lost in a take-over would make fio wait for ever: give up after 400 s.
( sleep 400; kill -KILL $FIO 2>/dev/null && echo "fio still waiting after 400 s: killed" >>/tmp/fio-kill.out ) &
WATCHDOG=$!
waited=yes kept=yes kills=0
for k in 1 2 3; do
	sleep 2
	kill -0 $FIO 2>/dev/null || break
	kill -KILL $VUBLK
	wait $VUBLK 2>/dev/null
	kills=$((kills + 1))
	sleep 1
	kill -0 $FIO 2>/dev/null || waited="fio ended while vublk was dead: $(tail -n 5 /tmp/fio-kill.out)"
	[ "$(ls /sys/bus/vdpa/devices) $(ls /dev/vduse | grep -v control)" = "vdk vdk" ] || kept="after kill $k: $(leftovers)"
	serve vdk /tmp/vdk$k.log
done
echo "E2E log killed vublk $kills times with I/O in flight"
expect kill_count "$kills" 3
expect kill_io_waits "$waited" yes
expect kill_device_kept "$kept" yes
if wait $FIO; then ok kill_fio_verify; else tail -n 20 /tmp/fio-kill.out; fail kill_fio_verify "fio failed"; fi
kill $WATCHDOG 2>/dev/null
echo "E2E log take-overs: $(cat /tmp/vdk[123].log | grep -o '"resubmitted":[0-9]*,"time":"[^"]*","vduse"' | tr '\n' ' ')"
expect kill_takeover "$(cat /tmp/vdk[123].log | grep -c 'took the device over from a vublk that died')" 3
expect kill_no_io_errors "$(dmesg | grep -ci 'I/O error')" 0
stop_vublk vdk

# --- Bound to vhost_vdpa: a /dev/vhost-vdpa-N for QEMU, and no block device on this kernel.
serve vdv /tmp/vdv.log --vduse-bus vhost
if wait_for -c /dev/vhost-vdpa-0; then ok vhost_dev_appeared; else fail vhost_dev_appeared "no /dev/vhost-vdpa-0"; tail -n 20 /tmp/vdv.log; fi
expect vhost_driver "$(basename "$(readlink /sys/bus/vdpa/devices/vdv/driver)")" vhost_vdpa
expect vhost_no_vda "$(test -b /dev/vda && echo present || echo none)" none
# A user-space driver on /dev/vhost-vdpa-0: QEMU 10's qemu-io through libblkio
# (virtio-blk-vhost-vdpa) maps its memory with vhost IOTLB messages, which VDUSE passes to vublk
# as IOTLB updates; a pattern written and read back through it, and found in the file.
for d in dev proc sys; do mount -o bind /$d /trixie/$d; done
run vhost_qemu_io chroot /trixie /usr/bin/qemu-io --image-opts \
	driver=virtio-blk-vhost-vdpa,path=/dev/vhost-vdpa-0,cache.direct=on \
	-c 'write -P 0xa5 0 1M' -c 'flush' -c 'read -P 0xa5 0 1M' -c 'write -z 4096 4096' -c 'read -P 0 4096 4096'
for d in dev proc sys; do umount /trixie/$d; done
stop_vublk vdv
expect vhost_data_in_file "$(od -An -tx1 -N4 /tmp/disk.img | tr -d ' ')" a5a5a5a5
expect vhost_zeroes_in_file "$(od -An -tx1 -j 4096 -N4 /tmp/disk.img | tr -d ' ')" 00000000

# --- The same from a configuration file, and a live resize on SIGHUP.
cat >/tmp/vublk.toml <<EOT
[global]
log_format = "json"
lanes = 2
[[export]]
name = "svc"
file = "/tmp/svc.img"
size = "64M"
num_queues = 2
vduse = "vds"
EOT
/vublk serve --config /tmp/vublk.toml 2>>/tmp/svc.log &
VUBLK=$!
if wait_for -b /dev/vda; then ok svc_vda_appeared; else fail svc_vda_appeared "no /dev/vda"; tail -n 20 /tmp/svc.log; fi
expect svc_size "$(blockdev --getsize64 /dev/vda)" $((64 << 20))
sed -i 's/size = "64M"/size = "96M"/' /tmp/vublk.toml
kill -HUP $VUBLK
i=0
while [ "$(blockdev --getsize64 /dev/vda)" != $((96 << 20)) ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
expect svc_resized "$(blockdev --getsize64 /dev/vda)" $((96 << 20))
stop_vublk svc

echo "E2E done vduse"
echo o > /proc/sysrq-trigger
sleep 10
