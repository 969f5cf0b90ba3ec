#!/usr/bin/env bash
# Side-by-side benchmark: the same jobs against qemu-storage-daemon (QSD) and vublk serving the same
# file on tmpfs, the servers alternating, ROUNDS rounds, then tables of the medians: every server
# against BASE, and vublk against the better QSD 10.0 configuration and against the kernel's floor
# (make bench; needs make deps: qemu-storage-daemon, fio and the Debian 13 root).
#
# Servers (SERVERS, in this order in odd rounds and reversed in even ones):
#   qsd10       qemu-storage-daemon 10.0 from the Debian 13 root, default configuration
#   qsd10-iot   the same with --object iothread,id=t0, aio=io_uring on the blockdev, iothread=t0
#               on the export
#   vublk       vublk serve (the lane engine)
#   vublk-uring vublk serve --io-engine uring
#   vublk-direct vublk serve --direct (O_DIRECT: tmpfs takes it from Linux 6.6)
#   vublk-poll  vublk serve --poll-max 32us (polls the ring for up to 32 us before waiting for a kick)
#   vublk-pollN vublk serve --poll-max Nus (e.g. vublk-poll8), to compare poll times side by side
#   vublk-packed vublk serve, driven on packed rings by vublk bench --packed (libblkio drives split
#               rings only, so the blkio client skips it)
#   vublk-limited vublk serve with I/O limits far above what it can do, so that every request goes
#               through the throttle and none waits: the cost of the limits themselves
#   vublk-ref   the vublk binary VUBLK_REF (e.g. one built from an older commit), served the same way
#   qsd         the host's qemu-storage-daemon (7.2 on Debian 12)
#
# Two clients drive each server, neither of them a guest:
#   - vublk bench: vublk's load generator, a vhost-user front-end in its own process with memfd
#     memory, IODEPTH requests in flight per queue (jobs named like randread-4k-qd32-q1);
#   - qemu-img bench from the Debian 13 root: libblkio 1.5's virtio-blk-vhost-user driver, a
#     client nobody here wrote (jobs named blkio-...; qemu-img bench runs a count of sequential
#     requests, BLKIO_SECONDS worth at a nominal rate, and reports the time they took).
# Server CPU per request comes from /proc/PID/stat of the server, before and after each run.
#
# The floor: fio --ioengine=psync, one thread, the same file, block sizes and patterns (jobs named
# floor-...): the CPU one thread of plain pread/pwrite calls spends per I/O, which any server pays
# at least. Each server's CPU per I/O is printed as a ratio to the floor of its job's size and
# pattern: random (vublk bench's rand* jobs) or sequential (qemu-img bench's, the 64k read).
#
# Environment: ROUNDS (3), RUNTIME (3s per vublk bench and fio job), RAMP (1s warm-up per vublk
# bench job), BLKIO_SECONDS (3), SIZE_MB (1024), QUEUES (2: every server is started with this
# many queues; the jobs use one), BASE (qsd10-iot), OUT (bin/bench-results.jsonl), SERVERS
# ("qsd10 qsd10-iot vublk vublk-uring vublk-packed"), CLIENTS ("vublk blkio"), JOBS (an
# extended regular expression: only the jobs whose line below matches it run, e.g. JOBS=flush).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-3s}
RAMP=${RAMP:-1s}
BLKIO_SECONDS=${BLKIO_SECONDS:-3}
SIZE_MB=${SIZE_MB:-1024}
QUEUES=${QUEUES:-2}
BASE=${BASE:-qsd10-iot}
OUT=${OUT:-bin/bench-results.jsonl}
SERVERS=${SERVERS:-qsd10 qsd10-iot vublk vublk-uring vublk-packed}
CLIENTS=${CLIENTS:-vublk blkio}
VUBLK=bin/vublk
TRIXIE=scripts/trixie-run
QSD=$(command -v qemu-storage-daemon || true)

[ -x "$VUBLK" ] || { echo "bench: $VUBLK is missing (make build)" >&2; exit 1; }
command -v fio >/dev/null || { echo "bench: fio is not installed (make deps installs it)" >&2; exit 1; }
for s in $SERVERS; do
  case $s in
  qsd) [ -n "$QSD" ] || { echo "bench: qemu-storage-daemon is not installed (make deps installs it)" >&2; exit 1; } ;;
  qsd10*) $TRIXIE true || { echo "bench: no Debian 13 root for $s (make deps builds it)" >&2; exit 1; } ;;
  esac
done
runtime_s=${RUNTIME%s}
JOBS=${JOBS:-}
# want LINE: whether the job described by LINE is selected by JOBS.
want() { [ -z "$JOBS" ] || grep -Eq -- "$JOBS" <<<"$1"; }

# vublk bench jobs (each run is named from them, e.g. randread-4k-qd32-q1).
jobs=(
  "--rw randread  --bs 4k  --iodepth 1  --queues 1"
  "--rw randread  --bs 4k  --iodepth 32 --queues 1"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 1"
  "--rw read      --bs 64k --iodepth 8  --queues 1"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 1 --flush-every 32"
  "--rw randrw    --bs 4k  --iodepth 32 --queues 2"
  "--rw randrw    --bs 4k  --iodepth 32 --queues 2 --flush-every 32"
)
# qemu-img bench jobs: name, rw, block size, depth, flush interval (0: none), nominal IOPS (the
# request count is BLKIO_SECONDS times it). Flushes do not wait for the queue to drain
# (--no-drain), so the server's barrier is what they measure.
blkio_jobs=(
  "blkio-read-4k-qd1          read  4096  1  0  20000"
  "blkio-read-4k-qd32         read  4096  32 0  250000"
  "blkio-write-4k-qd32        write 4096  32 0  250000"
  "blkio-read-64k-qd8         read  65536 8  0  50000"
  "blkio-write-4k-qd32-flush32 write 4096 32 32 200000"
)
# The floor: fio psync jobs (name, rw, block size).
floor_jobs=(
  "floor-randread-4k  randread  4k"
  "floor-randwrite-4k randwrite 4k"
  "floor-read-4k      read      4k"
  "floor-write-4k     write     4k"
  "floor-read-64k     read      64k"
)

dir=$(mktemp -d /dev/shm/vublk-bench.XXXXXX)
img=$dir/disk.img
sock=$dir/server.sock
server_pid=""

stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
  rm -f "$sock"
}
cleanup() {
  stop_server
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_server() {
  local export="type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES"
  local vublk=("$VUBLK" serve --socket-path "$sock" --blk-file "$img" --num-queues "$QUEUES" --log-level warn)
  case $1 in
  qsd) exec "$QSD" --blockdev "driver=file,node-name=f,filename=$img,cache.direct=off" --export "$export" ;;
  qsd10) exec $TRIXIE qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$img,cache.direct=off" \
    --export "$export" ;;
  qsd10-iot) exec $TRIXIE qemu-storage-daemon --object iothread,id=t0 \
    --blockdev "driver=file,node-name=f,filename=$img,cache.direct=off,aio=io_uring" --export "$export,iothread=t0" ;;
  vublk) exec "${vublk[@]}" ;;
  vublk-uring) exec "${vublk[@]}" --io-engine uring ;;
  vublk-direct) exec "${vublk[@]}" --direct ;;
  vublk-poll) exec "${vublk[@]}" --poll-max 32us ;;
  vublk-poll[0-9]*) exec "${vublk[@]}" --poll-max "${1#vublk-poll}us" ;;
  vublk-packed) exec "${vublk[@]}" ;;
  vublk-limited) exec "${vublk[@]}" --iops-total 100000000 --bps-total 1000G ;;
  vublk-ref) exec "${VUBLK_REF:?vublk-ref needs VUBLK_REF, a vublk binary}" "${vublk[@]:1}" ;;
  *)
    echo "bench: unknown server $1 (SERVERS: qsd10, qsd10-iot, vublk, vublk-uring, vublk-direct, vublk-poll, vublk-pollN, vublk-packed, vublk-limited, vublk-ref, qsd)" >&2
    exit 2
    ;;
  esac >"$dir/$1.log" 2>&1 &
  # Every branch execs, so that this is the server's PID (trixie-run execs all the way down too).
  server_pid=$!
  for _ in $(seq 100); do
    [ -S "$sock" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench: $1 did not start:" >&2
  cat "$dir/$1.log" >&2
  exit 1
}

# cpu_ticks PID: the process's user plus system time, in clock ticks.
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# A result line in vublk bench --json's format (the fields vublk bench summary reads).
result_line() { # label name rw bs depth flush seconds ios cpu_seconds pid
  awk -v label="$1" -v name="$2" -v rw="$3" -v bs="$4" -v qd="$5" -v fl="$6" -v secs="$7" -v ios="$8" \
    -v cpu="$9" -v pid="${10}" 'BEGIN {
      iops = secs > 0 ? ios / secs : 0
      printf "{\"label\":\"%s\",\"job\":{\"name\":\"%s\",\"rw\":\"%s\",\"bs\":%d,\"iodepth\":%d,\"queues\":1,\"flush_every\":%d},", label, name, rw, bs, qd, fl
      printf "\"seconds\":%.6f,\"ios\":%d,\"iops\":%.1f,\"mib_per_s\":%.2f,", secs, ios, iops, iops * bs / 1048576
      printf "\"server_cpu\":{\"pid\":%d,\"seconds\":%.4f,\"us_per_io\":%.4f}}\n", pid, cpu, (ios > 0 ? cpu * 1e6 / ios : 0)
    }'
}

run_vublk_bench() { # server job...
  local server=$1 ring=()
  shift
  [ "$server" = vublk-packed ] && ring=(--packed)
  "$VUBLK" bench --socket "$sock" --server-pid "$server_pid" --label "$server" --json \
    --runtime "$RUNTIME" --ramp "$RAMP" "${ring[@]}" "$@"
}

run_blkio_bench() { # server name rw bs depth flush nominal
  local server=$1 name=$2 rw=$3 bs=$4 qd=$5 fl=$6 nominal=$7 count t0 t1 out secs
  count=$((BLKIO_SECONDS * nominal))
  local args=(-c "$count" -d "$qd" -s "$bs" -t none)
  [ "$rw" = write ] && args+=(-w)
  [ "$fl" -gt 0 ] && args+=(--flush-interval="$fl" --no-drain)
  t0=$(cpu_ticks "$server_pid")
  out=$($TRIXIE qemu-img bench "${args[@]}" --image-opts "driver=virtio-blk-vhost-user,path=$sock,cache.direct=on" 2>&1) || {
    echo "bench: qemu-img bench against $server failed: $out" >&2
    exit 1
  }
  t1=$(cpu_ticks "$server_pid")
  secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
  [ -n "$secs" ] || { echo "bench: qemu-img bench printed no time: $out" >&2; exit 1; }
  result_line "$server" "$name" "$rw" "$bs" "$qd" "$fl" "$secs" "$count" "$(awk -v t=$((t1 - t0)) -v hz="$hz" 'BEGIN { print t / hz }')" "$server_pid"
}

run_floor() { # name rw bs
  local out ios
  out=$(fio --name=floor --filename="$img" --ioengine=psync --rw="$2" --bs="$3" --numjobs=1 --thread \
    --runtime="$runtime_s" --time_based --output-format=json)
  # fio's JSON lists the read, then the write totals; usr_cpu and sys_cpu are percentages of
  # job_runtime (ms).
  if [[ $2 == *write* ]]; then ios=$(grep -m2 '"total_ios"' <<<"$out" | tail -n 1); else ios=$(grep -m1 '"total_ios"' <<<"$out"); fi
  ios=$(tr -dc 0-9 <<<"$ios")
  awk -v rt="$(grep -m1 '"job_runtime"' <<<"$out" | tr -dc 0-9)" \
    -v usr="$(grep -m1 '"usr_cpu"' <<<"$out" | sed 's/.*: *//; s/,//')" \
    -v sys="$(grep -m1 '"sys_cpu"' <<<"$out" | sed 's/.*: *//; s/,//')" \
    'BEGIN { printf "%.6f %.6f\n", rt / 1000, (usr + sys) / 100 * rt / 1000 }' | {
    read -r secs cpu
    local bs=$3
    bs=${bs%k}
    result_line floor "$1" "$2" $((bs * 1024)) 1 0 "$secs" "$ios" "$cpu" 0
  }
}

report() { # line
  local name iops label
  label=$(grep -o '"label":"[^"]*"' <<<"$1" | head -n 1 | cut -d'"' -f4)
  name=$(grep -o '"name":"[^"]*"' <<<"$1" | head -n 1 | cut -d'"' -f4)
  iops=$(grep -o '"iops":[0-9.]*' <<<"$1" | cut -d: -f2)
  printf 'bench: round %d/%d %-12s %-30s %8.0f IOPS\n' "$round" "$ROUNDS" "$label" "$name" "$iops"
  echo "$1" >>"$OUT"
}

# A fully allocated file, so that reads do not hit holes.
dd if=/dev/zero of="$img" bs=1M count="$SIZE_MB" status=none
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

versions="vublk $(git describe --always --dirty 2>/dev/null || echo unknown)"
for s in $SERVERS; do
  case $s in
  qsd) versions+=", qsd: $($QSD --version | head -n 1)" ;;
  qsd10) versions+=", qsd10: $($TRIXIE qemu-storage-daemon --version | head -n 1)" ;;
  esac
done
echo "bench: $versions; $(fio --version); $(nproc) CPUs"
echo "bench: ${SIZE_MB} MiB file on tmpfs, $QUEUES queues per server, servers: $SERVERS; clients: $CLIENTS;"
echo "bench: ${#jobs[@]} vublk bench jobs x $RUNTIME (+$RAMP warm-up), ${#blkio_jobs[@]} qemu-img bench jobs of about ${BLKIO_SECONDS}s, ${#floor_jobs[@]} fio floor jobs x $RUNTIME, $ROUNDS rounds"
for round in $(seq "$ROUNDS"); do
  for f in "${floor_jobs[@]}"; do
    want "$f" || continue
    # shellcheck disable=SC2086 # the job's fields are words
    report "$(run_floor $f)"
  done
  # Alternate which server goes first, so that neither always runs on a warmer machine.
  if [ $((round % 2)) -eq 1 ]; then order=$SERVERS; else order=$(tr ' ' '\n' <<<"$SERVERS" | tac | xargs); fi
  for server in $order; do
    start_server "$server"
    for client in $CLIENTS; do
      case $client in
      vublk)
        for job in "${jobs[@]}"; do
          want "$job" || continue
          # shellcheck disable=SC2086 # the job's options are words
          report "$(run_vublk_bench "$server" $job)"
        done
        ;;
      blkio)
        [ "$server" = vublk-packed ] && continue
        for job in "${blkio_jobs[@]}"; do
          want "$job" || continue
          # shellcheck disable=SC2086 # the job's fields are words
          report "$(run_blkio_bench "$server" $job)"
        done
        ;;
      *) echo "bench: unknown client $client (CLIENTS: vublk, blkio)" >&2; exit 2 ;;
      esac
    done
    stop_server
  done
done

refs=$(tr ' ' '\n' <<<"$SERVERS" | grep '^qsd10' | paste -sd, || true)
echo
"$VUBLK" bench summary --base "$BASE" ${refs:+--refs "$refs"} "$OUT"
echo
echo "bench: every run is in $OUT"
