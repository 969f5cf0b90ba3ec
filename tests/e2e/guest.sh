#!/bin/busybox sh
# /init of the e2e guest: a busybox initramfs that loads the virtio and ext4 modules and runs the
# checks of one phase against the vhost-user-blk disks served by vublk.
#
# Each check prints one line the host test parses:
#   E2E ok <check> <detail>
#   E2E FAIL <check> <detail>
# and the phase ends with "E2E done <phase>". The host knows which checks each phase must report,
# so a script that stops early fails the test. Parameters come on the kernel command line:
#   vublk.phase=  main | reconnect | verify | crashwork | service | restart | bench | options |
#                 interop | migrate | ...
#   vublk.size=   expected size of /dev/vda in bytes
#   vublk.serial= expected serial of /dev/vda
#   vublk.rosize= expected size of the read-only /dev/vdb
#   vublk.newsize= the size /dev/vda grows to (service phase)
#   vublk.seconds= how long the restart phase writes and verifies; how long each bench job runs

/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
# The real tools copied from the host (fio, mke2fs, e2fsck, blkdiscard) are in /tools, called by
# full path: this busybox runs its own applets before anything on PATH.
T=/tools
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

for m in $(cat /modules.order); do
	insmod "/modules/$m" 2>/dev/null || echo "insmod $m failed (built in?)"
done

param() { sed -n "s/.*vublk\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
PHASE=$(param phase)
SIZE=$(param size)
SERIAL=$(param serial)
ROSIZE=$(param rosize)

ok() { echo "E2E ok $*"; }
fail() { echo "E2E FAIL $*"; }
# expect CHECK GOT WANT
expect() {
	if [ "$2" = "$3" ]; then ok "$1" "$2"; else fail "$1" "got '$2', want '$3'"; fi
}
# run CHECK COMMAND...: the check passes when the command exits 0; its output is shown on failure.
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

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done

phase_main() {
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	expect logical_block_size "$(cat /sys/block/vda/queue/logical_block_size)" 512
	expect queues "$(ls /sys/block/vda/mq | wc -l)" 2
	expect serial "$(cat /sys/block/vda/serial)" "$SERIAL"
	expect write_cache "$(cat /sys/block/vda/queue/write_cache)" "write back"

	# Random 4 KiB writes from two jobs, each on its own 16 MiB, verified with crc32c.
	run fio_randwrite_verify $T/fio --name=randwrite --filename=/dev/vda --thread --direct=1 \
		--ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k --size=16M --numjobs=2 \
		--offset_increment=16M --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting
	# Large sequential writes: 1 MiB requests, more pages than seg_max, verified.
	run fio_seq_1m_verify $T/fio --name=seq1m --filename=/dev/vda --thread --direct=1 \
		--ioengine=libaio --iodepth=4 --rw=write --bs=1M --offset=64M --size=48M \
		--verify=crc32c --verify_fatal=1 --do_verify=1

	# DISCARD and WRITE_ZEROES must read back as zeros.
	dd if=/dev/urandom of=/dev/vda bs=1M seek=128 count=8 oflag=direct 2>/dev/null
	run discard $T/blkdiscard -o $((128 << 20)) -l $((4 << 20)) /dev/vda
	expect discard_reads_zeros "$(dev_md5 /dev/vda 128 4)" "$(zeros_md5 4)"
	run write_zeroes $T/blkdiscard -z -o $((132 << 20)) -l $((4 << 20)) /dev/vda
	expect write_zeroes_reads_zeros "$(dev_md5 /dev/vda 132 4)" "$(zeros_md5 4)"

	# CONFIG_WCE: the guest switches the disk to write through (each write durable before it
	# completes) and back.
	echo "write through" > /sys/block/vda/cache_type
	expect cache_write_through "$(cat /sys/block/vda/queue/write_cache)" "write through"
	run write_through_io dd if=/dev/urandom of=/dev/vda bs=64k seek=3000 count=16 oflag=direct
	echo "write back" > /sys/block/vda/cache_type
	expect cache_write_back "$(cat /sys/block/vda/queue/write_cache)" "write back"

	# ext4: make, fill, sync, check, and read back from the disk after dropping caches.
	run mkfs_ext4 $T/mke2fs -F -q -t ext4 /dev/vda
	run mount_ext4 mount -t ext4 /dev/vda /mnt
	mkdir -p /mnt/dir
	for n in 1 2 3 4 5 6 7 8; do
		dd if=/dev/urandom of=/mnt/dir/file$n bs=64k count=$((n * 5)) 2>/dev/null
	done
	dd if=/dev/urandom of=/mnt/big bs=1M count=24 2>/dev/null
	(cd /mnt && md5sum big dir/*) > /tmp/sums
	cp /tmp/sums /mnt/SUMS
	run sync sync
	run umount_ext4 umount /mnt
	run e2fsck_clean $T/e2fsck -fn /dev/vda
	echo 3 > /proc/sys/vm/drop_caches
	run remount_ext4 mount -t ext4 -o ro /dev/vda /mnt
	run checksums_after_drop_caches sh -c 'grep -q " /mnt " /proc/mounts && cd /mnt && md5sum -c /tmp/sums'
	umount /mnt

	# The read-only export: the guest sees it read-only, reads work and writes fail.
	expect ro_size "$(blockdev --getsize64 /dev/vdb)" "$ROSIZE"
	expect ro_flag "$(cat /sys/block/vdb/ro)" 1
	run ro_read dd if=/dev/vdb of=/dev/null bs=1M count=4 iflag=direct
	# Linux refuses writes to a disk with VIRTIO_BLK_F_RO itself (EPERM) before they reach the
	# device; vublk's own IOERR for a write that does reach it is tested with the Go frontend.
	if out=$(dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct 2>&1); then
		fail ro_write_fails "a write to the read-only disk succeeded"
	else
		ok ro_write_fails "$(echo "$out" | grep -i error | head -n 1)"
	fi
}

phase_reconnect() {
	# A second VM on the same vublk process: the disk is still there with its data; then the host
	# kills this VM while writes are in flight.
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	run mount_ext4 mount -t ext4 /dev/vda /mnt
	run checksums sh -c 'grep -q " /mnt " /proc/mounts && cd /mnt && md5sum -c SUMS'
	echo "E2E writing"
	while true; do
		dd if=/dev/urandom of=/mnt/scratch bs=64k count=64 conv=fsync 2>/dev/null
	done
}

phase_verify() {
	# A third VM after the second one was killed mid-write: journal recovery, then clean.
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	run mount_ext4 mount -t ext4 /dev/vda /mnt
	run checksums sh -c 'grep -q " /mnt " /proc/mounts && cd /mnt && md5sum -c SUMS'
	run umount_ext4 umount /mnt
	run e2fsck_clean $T/e2fsck -fn /dev/vda
}

# crash_worker ROUND WORKER: creates files with fsync, rename and a directory fsync, each
# announced as durable once the guest has been told it is; then unlinks its files of two rounds ago.
# The content of a file is its name repeated, so the host can check it in any crash state.
crash_worker() {
	r=$1
	w=$2
	for i in 1 2 3 4 5; do
		name=r$r-w$w-$i
		size=$(((w * 7 + i * 13) % 32 * 4096 + 123))
		yes "$name" | head -c $size > /mnt/data/tmp.$name
		sync /mnt/data/tmp.$name || fail "fsync_$name" "fsync failed"
		mv /mnt/data/tmp.$name /mnt/data/$name
		sync /mnt/data || fail "dirsync_$name" "fsync of the directory failed"
		echo "E2E durable $name $size"
	done
	rm -f /mnt/data/r$((r - 2))-w$w-*
}

# A journaled ext4 workload that flushes a lot, with vublk logging every write and flush; the host
# replays the log into crash states and checks them.
phase_crashwork() {
	run mount_ext4 mount -t ext4 /dev/vda /mnt
	mkdir -p /mnt/data
	sync /mnt
	for r in 1 2 3 4 5 6; do
		for w in 1 2 3 4; do
			crash_worker $r $w &
		done
		wait
		sync
		echo "E2E synced $r"
	done
	run umount_ext4 umount /mnt
}

# A disk of the host service: I/O, then the host grows it live (SIGHUP with a bigger size in the
# configuration) and the guest must see the new size without a reboot.
phase_service() {
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	expect serial "$(cat /sys/block/vda/serial)" "$SERIAL"
	run write dd if=/dev/urandom of=/tmp/data bs=64k count=64
	run write_disk dd if=/tmp/data of=/dev/vda bs=64k count=64 oflag=direct conv=fsync
	run read_back sh -c "dd if=/dev/vda bs=64k count=64 iflag=direct 2>/dev/null | cmp - /tmp/data"
	echo "E2E waiting-resize"
	NEWSIZE=$(param newsize)
	i=0
	while [ "$(blockdev --getsize64 /dev/vda)" != "$NEWSIZE" ] && [ $i -lt 600 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	expect resized "$(blockdev --getsize64 /dev/vda)" "$NEWSIZE"
	last=$(((NEWSIZE >> 16) - 1))
	run write_grown dd if=/tmp/data of=/dev/vda bs=64k seek=$last count=1 oflag=direct conv=fsync
	run read_grown sh -c "dd if=/dev/vda bs=64k skip=$last count=1 iflag=direct 2>/dev/null | cmp -n 65536 - /tmp/data"
}

# The host SIGKILLs vublk and restarts it on the same socket and file several times while this
# runs; QEMU reconnects (-chardev socket,reconnect=1) and the new vublk resubmits the requests that
# were in flight. Every request must succeed, every byte must verify, and the kernel must log no
# I/O error.
phase_restart() {
	secs=$(param seconds)
	end=$(($(date +%s) + ${secs:-30}))
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	if [ -n "$(param packed)" ]; then
		expect restart_packed "$(cut -c35 /sys/block/vda/device/features)" "$(param packed)"
	fi
	echo "E2E restart-running"
	# Random 4 KiB writes from two jobs with 16 in flight each and a flush after every four,
	# verified with crc32c, run after run on the first 16 MiB ...
	(
		n=0
		while [ "$(date +%s)" -lt $end ]; do
			if ! $T/fio --name=restart --filename=/dev/vda --thread --direct=1 --ioengine=libaio \
				--iodepth=16 --rw=randwrite --bs=4k --size=8M --numjobs=2 --offset_increment=8M --fsync=4 \
				--verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio.out 2>&1; then
				tail -n 20 /tmp/fio.out
				echo "fio run $n failed"
				exit 1
			fi
			n=$((n + 1))
		done
		echo "$n fio runs"
	) >/tmp/fio.log 2>&1 &
	fiopid=$!
	# ... while 4 MiB direct writes of two alternating patterns go to overlapping places from
	# 64 MiB on, each read back and compared: a lost write, or an old one run again, shows.
	dd if=/dev/urandom of=/tmp/p0 bs=1M count=4 2>/dev/null
	dd if=/dev/urandom of=/tmp/p1 bs=1M count=4 2>/dev/null
	i=0
	ddfail=
	while [ "$(date +%s)" -lt $end ]; do
		off=$((64 + i % 64))
		p=/tmp/p$((i % 2))
		if ! dd if=$p of=/dev/vda bs=1M seek=$off count=4 oflag=direct conv=fsync 2>/tmp/dd.err; then
			ddfail="write $i at $off MiB: $(tail -n 1 /tmp/dd.err)"
			break
		fi
		if ! dd if=/dev/vda bs=1M skip=$off count=4 iflag=direct 2>/dev/null | cmp -s - $p; then
			ddfail="read back $i at $off MiB differs"
			break
		fi
		i=$((i + 1))
	done
	if [ -z "$ddfail" ]; then ok restart_dd "$i rounds"; else fail restart_dd "$ddfail"; fi
	if wait $fiopid; then
		ok restart_fio "$(tail -n 1 /tmp/fio.log)"
	else
		tail -n 20 /tmp/fio.log
		fail restart_fio "fio failed"
	fi
	expect restart_io_errors "$(dmesg | grep -ci 'i/o error')" 0
}

# A benchmark, not a check: fio jobs against /dev/vda, each between "E2E bench-start JOB" and
# "E2E bench-end JOB" lines (the host reads the server's CPU time at each), then one line
#   E2E bench JOB IOS IOPS LAT_P50_US
# from fio's JSON output (read and write summed; the completion latency median of the direction
# that did I/O). The disk must be fully allocated, so that reads do not hit holes.
bench_job() {
	job=$1
	shift
	echo "E2E bench-start $job"
	if ! $T/fio --name="$job" --filename=/dev/vda --thread --direct=1 --ioengine=libaio \
		--time_based --runtime="$BENCH_SECONDS" --group_reporting --output-format=json "$@" \
		>/tmp/bench.json 2>/tmp/bench.err; then
		echo "E2E bench-end $job"
		tail -n 20 /tmp/bench.err
		fail "bench_$job" "fio failed"
		return
	fi
	echo "E2E bench-end $job"
	awk -v job="$job" '
		/^ *"(read|write|trim|sync)" : [{]/ { sec = $1; gsub(/"/, "", sec) }
		/^ *"(total_ios|iops|50\.000000)" : / {
			key = $1; gsub(/"/, "", key); v = $3; sub(/,$/, "", v)
			if (!((sec "/" key) in val)) val[sec "/" key] = v
		}
		END {
			ios = val["read/total_ios"] + val["write/total_ios"]
			iops = val["read/iops"] + val["write/iops"]
			d = val["read/total_ios"] > 0 ? "read" : "write"
			printf "E2E bench %s %d %.1f %.1f\n", job, ios, iops, val[d "/50.000000"] / 1000
		}' /tmp/bench.json
	ok "bench_$job"
}

phase_bench() {
	BENCH_SECONDS=$(param seconds)
	BENCH_SECONDS=${BENCH_SECONDS:-10}
	expect queues "$(ls /sys/block/vda/mq | wc -l)" 2
	# Feature bit 34 (VIRTIO_F_RING_PACKED) is character 35: the ring the server is measured on.
	expect ring_packed "$(cut -c35 /sys/block/vda/device/features)" "$(param packed)"
	bench_job randread-4k-qd1 --rw=randread --bs=4k --iodepth=1
	bench_job randread-4k-qd32-j2 --rw=randread --bs=4k --iodepth=32 --numjobs=2
	bench_job randwrite-4k-qd32-j2 --rw=randwrite --bs=4k --iodepth=32 --numjobs=2
	bench_job read-64k-qd8 --rw=read --bs=64k --iodepth=8
}

# The host kills QEMU in the middle of this phase's background I/O and boots it again, many times,
# against the same vublk. Each boot first reads back the 1 MiB regions the earlier boots flushed
# (vublk.sums: their md5s, "none" first), then writes and flushes region vublk.iter from 256 MiB
# on, reports its md5, and keeps random writes in flight below 128 MiB until it is killed.
# vublk.final=1: only verify, then finish.
phase_qemukill() {
	iter=$(param iter)
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	j=0
	bad=
	for s in $(param sums | tr , ' '); do
		[ "$s" = none ] && continue
		got=$(dev_md5 /dev/vda $((256 + j)) 1)
		[ "$got" = "$s" ] || bad="$bad region$j:$got"
		j=$((j + 1))
	done
	if [ -z "$bad" ]; then ok qk_verify "$j flushed regions read back"; else fail qk_verify "differ:$bad"; fi
	[ "$(param final)" = 1 ] && return
	dd if=/dev/urandom of=/tmp/region bs=64k count=16 2>/dev/null
	run qk_write dd if=/tmp/region of=/dev/vda bs=64k seek=$((4096 + iter * 16)) count=16 oflag=direct conv=fsync
	ok qk_flushed "$(md5sum </tmp/region | cut -d' ' -f1)"
	$T/fio --name=busy --filename=/dev/vda --thread --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randwrite --bs=4k --size=64M --numjobs=2 --offset_increment=64M --time_based \
		--runtime=120 >/dev/null 2>&1 &
	sleep 0.5
	echo "E2E qemukill-busy"
	wait
}

# The guest reboots itself (QEMU resets the machine: the driver resets the device and vublk sees
# the rings stop and start again) and the second boot, finding the marker the first wrote and
# flushed, verifies the data. An unclean path: reboot -f without unmounting or syncing.
phase_reboot() {
	expect size "$(blockdev --getsize64 /dev/vda)" "$SIZE"
	# on both boots: the driver negotiated packed rings again after the reset
	expect reboot_packed "$(cut -c35 /sys/block/vda/device/features)" 1
	marker=$(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -c 12)
	if [ "$marker" != "vublk-reboot" ]; then
		dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
		run reboot_write dd if=/tmp/data of=/dev/vda bs=1M seek=16 count=8 oflag=direct
		md5=$(md5sum </tmp/data | cut -d' ' -f1)
		printf 'vublk-reboot %s' "$md5" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null
		ok reboot_first "$md5"
		echo "E2E rebooting"
		reboot -f
		sleep 60
	fi
	md5=$(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | cut -c14-45)
	ok reboot_second
	expect reboot_data "$(dev_md5 /dev/vda 16 8)" "$md5"
	run reboot_write_again dd if=/dev/zero of=/dev/vda bs=1M seek=16 count=8 oflag=direct conv=fsync
}

# Live migration: the host migrates this VM between QEMU processes (each with its own back-end on
# the same image) while fio randwrite verifies one region and the guest reads another, of
# vublk.mibs MiB at vublk.mig_off MiB, through the page cache. Each round:
#   the guest drops the page cache (init_on_free=1: the freed pages hold zeros), starts a dirtier:
#     "E2E mig-ready R";
#   the host starts the migration (slowed down) and writes "read" on the console; the guest reads
#     the region into the page cache: "E2E mig-read-done R"; the host lets the migration finish
#     and writes "go" or "fio";
#   then, without dropping caches, the region's checksum from the page cache, against vublk.sum:
#     a back-end that wrote a guest page after QEMU sent it and did not log it leaves the page
#     stale on the destination.
#   "E2E ok|FAIL mig_R warm=SUM".
# "fio" also stops the fio loop and reports it (mig_fio) and the kernel's I/O errors (mig_dmesg);
# "end" (instead of "read") finishes the phase.
phase_migrate() {
	off=$(param mig_off)
	mibs=$(param mibs)
	want=$(param sum)
	# Feature bit 34 (VIRTIO_F_RING_PACKED) is character 35: 1 where the host asked for packed=on.
	expect mig_ring_packed "$(cut -c35 /sys/block/vda/device/features)" "$(param packed)"
	# Hold /dev/vda open for the whole phase: when its last opener closes it, Linux drops the
	# block device's page cache (blkdev_put -> kill_bdev), and the checksum below would read the
	# region from the destination's back-end instead of from the page cache the migration
	# brought over. For the same reason fio runs with --invalidate=0: by default each fio run
	# starts with BLKFLSBUF, which drops the whole device's page cache.
	exec 3</dev/vda
	(
		n=0
		while [ ! -f /tmp/stopfio ]; do
			if ! $T/fio --name=mig --filename=/dev/vda --thread --direct=1 --ioengine=libaio \
				--iodepth=8 --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 \
				--do_verify=1 --invalidate=0 >/tmp/fio.out 2>&1; then
				tail -n 20 /tmp/fio.out
				echo "fio run $n failed"
				exit 1
			fi
			n=$((n + 1))
		done
		echo "$n fio runs"
	) >/tmp/fio.log 2>&1 &
	fiopid=$!
	# The dirtier's data: random, so that QEMU must send each page it dirties in full.
	dd if=/dev/urandom of=/tmp/dirt-src bs=1M count=16 2>/dev/null
	cp /tmp/dirt-src /tmp/dirt
	r=1
	while true; do
		# Before the migration, the page cache goes: the kernel runs with init_on_free=1, so the
		# pages the region lands in next hold zeros when QEMU sends them (a re-read of the same
		# data into the same page would hide a page the back-end does not log).
		echo 1 >/proc/sys/vm/drop_caches
		# While QEMU sends memory and the guest reads its region, the dirtier rewrites 16 MiB
		# with the CPU faster than the host lets the migration send it, so that QEMU never finds
		# so little left to send that it switches over (see migrate in migration_test.go).
		rm -f /tmp/stopdirt
		(
			while [ ! -f /tmp/stopdirt ]; do
				dd if=/tmp/dirt-src of=/tmp/dirt bs=1M conv=notrunc 2>/dev/null
			done
		) &
		dirtpid=$!
		echo "E2E mig-ready $r"
		# The host starts the migration and says "read" ("end" ends the phase). A background
		# job's stdin is /dev/null: read the console.
		read -r cmd </dev/ttyS0
		if [ "$cmd" = end ]; then
			touch /tmp/stopdirt
			wait $dirtpid
			break
		fi
		# The region, into the page cache, while QEMU sends memory: a page it had sent before the
		# back-end filled it goes again only if the back-end logged it. Nothing drops the cache
		# from here to the checksum.
		bad=0
		dd if=/dev/vda of=/dev/null bs=1M skip="$off" count="$mibs" 2>/tmp/dd.err || bad=1
		touch /tmp/stopdirt
		wait $dirtpid
		echo "E2E mig-read-done $r"
		# After the switch-over the host says "go" (or "fio": then stop fio and check it).
		read -r cmd </dev/ttyS0
		# Buffers: the block device's page cache, which must still hold the region.
		buffers=$(sed -n 's/^Buffers: *\([0-9]*\) kB/\1/p' /proc/meminfo)
		# coreutils' cksum: busybox's md5sum takes half a minute for the region under TCG.
		warm=$(dd if=/dev/vda bs=1M skip="$off" count="$mibs" 2>/dev/null | $T/cksum | cut -d' ' -f1)
		if [ "$bad" = 0 ] && [ "$warm" = "$want" ]; then
			ok "mig_$r" "buffers_kb=$buffers warm=$warm"
		else
			tail -n 2 /tmp/dd.err
			dmesg | tail -n 3
			fail "mig_$r" "buffers_kb=$buffers failed_read=$bad warm=$warm want=$want"
		fi
		case "$cmd" in
		fio)
			touch /tmp/stopfio
			if wait $fiopid; then
				ok mig_fio "$(tail -n 1 /tmp/fio.log)"
			else
				tail -n 20 /tmp/fio.log
				fail mig_fio "fio failed"
			fi
			expect mig_dmesg "$(dmesg | grep -ci -e 'i/o error' -e 'virtio_blk.*err')" 0
			;;
		esac
		r=$((r + 1))
	done
}

# pattern_md5 BYTE_OCTAL MIB: the md5 of MIB MiB of one repeated byte (qemu-io write -P).
pattern_md5() { dd if=/dev/zero bs=1M count="$2" 2>/dev/null | tr '\000' "\\$1" | md5sum | cut -d' ' -f1; }

phase_options() {
	# One disk per device option set (the host names them in vublk.optdisks, with the queue count
	# each must have in vublk.optqueues): each passes the same data checks.
	i=1
	for d in $(echo "$(param optdisks)" | tr , ' '); do
		q=$(echo "$(param optqueues)" | cut -d, -f$i)
		p=$(echo "$(param optpacked)" | cut -d, -f$i)
		i=$((i + 1))
		expect "${d}_size" "$(blockdev --getsize64 /dev/$d)" "$SIZE"
		expect "${d}_queues" "$(ls /sys/block/$d/mq | wc -l)" "$q"
		# Feature bit 34 (VIRTIO_F_RING_PACKED) is character 35: 1 where QEMU has packed=on.
		echo "E2E features $d $(cat /sys/block/$d/device/features)"
		expect "${d}_ring_packed" "$(cut -c35 /sys/block/$d/device/features)" "$p"
		run "${d}_fio_verify" $T/fio --name=v --filename=/dev/$d --thread --direct=1 --ioengine=libaio \
			--iodepth=32 --rw=randwrite --bs=4k --size=8M --numjobs=2 --offset_increment=8M \
			--verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting
		dd if=/dev/urandom of=/dev/$d bs=1M seek=32 count=4 oflag=direct 2>/dev/null
		run "${d}_discard" $T/blkdiscard -o $((32 << 20)) -l $((2 << 20)) /dev/$d
		expect "${d}_discard_zeros" "$(dev_md5 /dev/$d 32 2)" "$(zeros_md5 2)"
		run "${d}_write_zeroes" $T/blkdiscard -z -o $((34 << 20)) -l $((2 << 20)) /dev/$d
		expect "${d}_write_zeroes_zeros" "$(dev_md5 /dev/$d 34 2)" "$(zeros_md5 2)"
		run "${d}_flush" dd if=/dev/urandom of=/dev/$d bs=64k seek=1000 count=16 conv=fsync
	done
}

phase_interop() {
	# libblkio (qemu-io on the host) wrote 4 MiB of 0x5a at 0; this guest reads it, then writes
	# 4 MiB of 0xa5 at 4 MiB for libblkio to read back.
	expect interop_read "$(dev_md5 /dev/vda 0 4)" "$(pattern_md5 132 4)"
	run interop_write sh -c "dd if=/dev/zero bs=1M count=4 2>/dev/null | tr '\\000' '\\245' | dd of=/dev/vda bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null"
}

# disk_by_serial SERIAL: the vdX whose serial is SERIAL (the export's name).
disk_by_serial() {
	for s in /sys/block/vd*/serial; do
		if [ "$(cat "$s")" = "$1" ]; then
			d=${s%/serial}
			echo "${d##*/}"
			return
		fi
	done
}

# qos_rate NAME FIO_ARGS...: runs fio (JSON output) and prints
#   E2E rate NAME IOPS BW_BYTES_PER_S
# with read and write summed, as the guest measured them (the host checks its own figures).
qos_rate() {
	name=$1
	shift
	if ! $T/fio --name="$name" --clocksource=clock_gettime --thread --direct=1 --ioengine=libaio --time_based \
		--group_reporting --output-format=json "$@" >/tmp/$name.json 2>/tmp/$name.err; then
		tail -n 20 /tmp/$name.err
		fail "qos_$name" "fio failed"
		return
	fi
	awk -v name="$name" '
		/^ *"(read|write|trim|sync)" : [{]/ { sec = $1; gsub(/"/, "", sec) }
		/^ *"(iops|bw_bytes)" : / {
			key = $1; gsub(/"/, "", key); v = $3; sub(/,$/, "", v)
			if (!((sec "/" key) in val)) val[sec "/" key] = v
		}
		END {
			printf "E2E rate %s %.1f %.0f\n", name, val["read/iops"] + val["write/iops"], val["read/bw_bytes"] + val["write/bw_bytes"]
		}' /tmp/$name.json
	ok "qos_$name"
}

# qos_together JOB... : runs the jobs (each "NAME FIO_ARGS...", one word list) at once and prints
# their results when all are done. A job "sleep N" waits N seconds before it starts the next ones.
qos_together() {
	pids=
	for job in "$@"; do
		case $job in
		sleep*) $job; continue ;;
		esac
		# shellcheck disable=SC2086
		qos_rate $job >/tmp/${job%% *}.line 2>&1 &
		pids="$pids $!"
	done
	wait $pids
	for job in "$@"; do
		case $job in
		sleep*) ;;
		*) cat /tmp/${job%% *}.line ;;
		esac
	done
}

phase_qos() {
	# The host serves five exports (their serials are their names) with these limits:
	#   lim: iops_total 150 (300 after the host's SIGHUP);  burst: iops_total 100, max 400 for 2 s,
	#   bps_read 2M;  free: none;  g1, g2: the io_group "g", iops_total 120.
	# The host tells the jobs apart by the idle gaps between them on each disk (the pauses below),
	# and measures every rate on its own clock from vublk's metrics.
	S=$(param seconds)
	cs=/sys/devices/system/clocksource/clocksource0
	if grep -qw hpet $cs/available_clocksource; then
		echo hpet > $cs/current_clocksource
	fi
	expect qos_clocksource "$(cat $cs/current_clocksource)" hpet
	lim=$(disk_by_serial lim)
	burst=$(disk_by_serial burst)
	free=$(disk_by_serial free)
	g1=$(disk_by_serial g1)
	g2=$(disk_by_serial g2)
	expect qos_disks "$(echo $lim $burst $free $g1 $g2 | wc -w)" 5
	# A limited job keeps 128 requests queued (the ring's size), so that the limit, not the emulated
	# guest's pauses on a busy host, sets its rate: while the guest stops for a while, vublk goes on
	# with the requests that wait for the limit (at 300 IOPS, 0.4 s of them) instead of idling. The
	# free disk's fio runs flat out on a vCPU of its own, so that it cannot starve the limited jobs of
	# CPU.
	L="--rw=randwrite --bs=4k --iodepth=128 --size=32M"
	F="--rw=randwrite --bs=4k --iodepth=16 --size=32M --cpus_allowed=1"
	# The free disk alone: what this guest does with no limit, now.
	qos_rate free_alone --filename=/dev/$free --runtime=3 $F
	sleep 2
	# The limited disk and the free one at once: the free one does not slow down to the limit.
	qos_together "lim_iops --filename=/dev/$lim --runtime=$S $L --cpus_allowed=0" \
		"free_busy --filename=/dev/$free --runtime=$S $F"
	sleep 2
	# The two disks of the group g sharing its 120 IOPS (their requests wait in one FIFO: 32 each,
	# so that each disk's turn comes often; 2 s longer, as fio starting at once in a starved guest
	# start up to seconds apart), and reads on the burst disk held to its bandwidth limit (32 of
	# 64 KiB: 1 s of it).
	qos_together "g1 --filename=/dev/$g1 --runtime=$((S + 2)) $L --iodepth=32 --cpus_allowed=0" \
		"g2 --filename=/dev/$g2 --runtime=$((S + 2)) $L --iodepth=32 --cpus_allowed=1" \
		"bps --filename=/dev/$burst --runtime=$S --rw=read --bs=64k --iodepth=32 --size=32M --cpus_allowed=0"
	sleep 2
	# A burst (400 IOPS for 2 s, then 100, for 8 s), and 3 s into it (a starting fio stalls this
	# guest for a while: not in the burst) the limit the host raises to 300 IOPS with a SIGHUP once
	# it has seen 3 s of this job's I/O on lim.
	qos_together "burst --filename=/dev/$burst --runtime=8 $L --cpus_allowed=0" "sleep 3" \
		"sighup --filename=/dev/$lim --runtime=7 $L --cpus_allowed=1"
}

case "$PHASE" in
main) phase_main ;;
qos) phase_qos ;;
options) phase_options ;;
interop) phase_interop ;;
reconnect) phase_reconnect ;;
verify) phase_verify ;;
crashwork) phase_crashwork ;;
service) phase_service ;;
restart) phase_restart ;;
qemukill) phase_qemukill ;;
reboot) phase_reboot ;;
bench) phase_bench ;;
migrate) phase_migrate ;;
*) fail phase "unknown phase '$PHASE'" ;;
esac
echo "E2E done $PHASE"
sync
poweroff -f
