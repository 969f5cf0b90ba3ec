#!/usr/bin/env bash
# Side-by-side benchmark: the same jobs against qemu-storage-daemon and vublk serving the same
# file on tmpfs, the two servers alternating, ROUNDS rounds, then a table of the medians and the
# ratios vublk/QSD (make bench; needs qemu-storage-daemon, which make deps installs).
#
# Every job is a vublk bench run: a vhost-user front-end in a separate process that shares memfd
# memory with the server and keeps IODEPTH requests in flight per queue, with no guest kernel.
# Server CPU per request comes from /proc/PID/stat of the server.
#
# Environment: ROUNDS (3), RUNTIME (5s per job), RAMP (1s warm-up per job), SIZE_MB (1024),
# QUEUES (2: both servers are started with this many queues), OUT (bin/bench-results.jsonl),
# SERVERS ("qsd vublk vublk-packed": vublk-packed is vublk driven on packed rings; add vublk-uring
# for vublk with --io-engine uring, vublk-limited for vublk with I/O limits far above what it can
# do, so that every request goes through the throttle and none waits: the cost of the limits
# themselves; vublk-ref for the vublk binary VUBLK_REF, e.g. one built from an older commit),
# BASE (qsd: the server the others are compared with).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5s}
RAMP=${RAMP:-1s}
SIZE_MB=${SIZE_MB:-1024}
QUEUES=${QUEUES:-2}
OUT=${OUT:-bin/bench-results.jsonl}
SERVERS=${SERVERS:-qsd vublk vublk-packed}
BASE=${BASE:-qsd}
VUBLK=bin/vublk
QSD=$(command -v qemu-storage-daemon || true)

if [ -z "$QSD" ]; then
  echo "bench: qemu-storage-daemon is not installed (make deps installs it)" >&2
  exit 1
fi
[ -x "$VUBLK" ] || { echo "bench: $VUBLK is missing (make build)" >&2; exit 1; }

# The jobs, as vublk bench options (each run is named from them, e.g. randread-4k-qd32-q2).
jobs=(
  "--rw randread  --bs 4k  --iodepth 1  --queues 1"
  "--rw randread  --bs 4k  --iodepth 32 --queues 1"
  "--rw randread  --bs 4k  --iodepth 32 --queues 2"
  "--rw randwrite --bs 4k  --iodepth 1  --queues 1"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 1"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 2"
  "--rw read      --bs 64k --iodepth 8  --queues 1"
  "--rw write     --bs 64k --iodepth 8  --queues 1"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 1 --flush-every 32"
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
  case $1 in
  qsd)
    "$QSD" \
      --blockdev "driver=file,node-name=f,filename=$img,cache.direct=off" \
      --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES" \
      >"$dir/qsd.log" 2>&1 &
    ;;
  vublk)
    "$VUBLK" serve --socket-path "$sock" --blk-file "$img" --num-queues "$QUEUES" --log-level warn \
      >"$dir/vublk.log" 2>&1 &
    ;;
  vublk-uring)
    "$VUBLK" serve --socket-path "$sock" --blk-file "$img" --num-queues "$QUEUES" --log-level warn \
      --io-engine uring >"$dir/vublk-uring.log" 2>&1 &
    ;;
  vublk-limited)
    "$VUBLK" serve --socket-path "$sock" --blk-file "$img" --num-queues "$QUEUES" --log-level warn \
      --iops-total 100000000 --bps-total 1000G >"$dir/vublk-limited.log" 2>&1 &
    ;;
  vublk-ref)
    "${VUBLK_REF:?vublk-ref needs VUBLK_REF, a vublk binary}" serve --socket-path "$sock" --blk-file "$img" \
      --num-queues "$QUEUES" --log-level warn >"$dir/vublk-ref.log" 2>&1 &
    ;;
  vublk-packed) # the same server as vublk; the front-end drives packed rings (vublk bench --packed)
    "$VUBLK" serve --socket-path "$sock" --blk-file "$img" --num-queues "$QUEUES" --log-level warn \
      >"$dir/vublk-packed.log" 2>&1 &
    ;;
  *)
    echo "bench: unknown server $1 (SERVERS: qsd, vublk, vublk-uring, vublk-packed, vublk-limited, vublk-ref)" >&2
    exit 2
    ;;
  esac
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

# A fully allocated file, so that reads do not hit holes.
dd if=/dev/zero of="$img" bs=1M count="$SIZE_MB" status=none
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

echo "bench: $($QSD --version | head -n 1) vs vublk ($(git describe --always --dirty 2>/dev/null || echo unknown)), $(nproc) CPUs"
echo "bench: ${SIZE_MB} MiB file on tmpfs, $QUEUES queues per server, ${#jobs[@]} jobs x $RUNTIME (+$RAMP warm-up), $ROUNDS rounds"
for round in $(seq "$ROUNDS"); do
  # Alternate which server goes first, so that neither always runs on a warmer machine.
  if [ $((round % 2)) -eq 1 ]; then order=$SERVERS; else order=$(tr ' ' '\n' <<<"$SERVERS" | tac | xargs); fi
  for server in $order; do
    start_server "$server"
    ring=
    [ "$server" = vublk-packed ] && ring=--packed
    for job in "${jobs[@]}"; do
      # shellcheck disable=SC2086 # the job's options are words
      line=$("$VUBLK" bench --socket "$sock" --server-pid "$server_pid" --label "$server" --json \
        --runtime "$RUNTIME" --ramp "$RAMP" $ring $job)
      echo "$line" >>"$OUT"
      name=$(grep -o '"name":"[^"]*"' <<<"$line" | head -n 1 | cut -d'"' -f4)
      iops=$(grep -o '"iops":[0-9.]*' <<<"$line" | cut -d: -f2)
      printf 'bench: round %d/%d %-6s %-30s %8.0f IOPS\n' "$round" "$ROUNDS" "$server" "$name" "$iops"
    done
    stop_server
  done
done

echo
"$VUBLK" bench summary --base "$BASE" "$OUT"
echo
echo "bench: every run is in $OUT"
