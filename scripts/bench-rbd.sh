#!/usr/bin/env bash
# The RBD rows of make bench: the same vublk bench jobs against qemu-storage-daemon's rbd driver
# (Debian's qemu-block-extra) and vublk --blk-rbd, serving the same image of the same cluster,
# alternating, ROUNDS rounds, then the medians and the ratios vublk/QSD.
#
# It needs a cluster: with VUBLK_CEPH_CONF set (eval $(scripts/ceph-cluster.sh start)) it uses
# that one; make bench runs it inside `scripts/ceph-cluster.sh run`, a cluster of its own.
#
# Environment: ROUNDS (3), RUNTIME (5s per job), RAMP (1s), SIZE_MB (512: the image, written
# once before the runs so that reads hit data), QUEUES (2), OUT (bin/bench-rbd-results.jsonl),
# CACHE (off: librbd's cache off in both servers, QSD's cache.direct=on and vublk's default; on:
# on in both, QSD's cache.direct=off and vublk --rbd-cache), PRIO (unset: the servers and the OSD
# compete with the rest of the machine as they are; a nice value such as -10: this script's session,
# i.e. the server and the load generator, and the OSD, each a scheduler autogroup of its own, run at
# that priority, for both servers alike; both are set back to 0 at the end), KEEP (unset: each round
# starts one server, runs every job on it and stops it, then the other; 1: both servers run all the
# time, on the same image, and each job runs on one, then at once on the other, which puts the two
# runs of a pair closer in time), SERVERS ("qsd vublk", in this order in odd rounds and reversed in
# even ones; vublk-conf is bin/vublk with VUBLK_RBD_CONF=$ALT_CONF, more client options such as
# "rbd_non_blocking_aio=true", and vublk-ref the vublk binary VUBLK_REF), JOBS (the jobs' vublk
# bench options, separated by ";": the six below by default).
#
# Besides vublk bench's summary it prints, per job and server, the medians with min-max of the
# IOPS, of the server's CPU per I/O and of the OSD's (the OSD process's CPU time over the warm-up
# and the measured phase, per I/O at the measured rate: what each server's requests cost the
# cluster; RUNTIME and RAMP in seconds for it, 3s or 0.5s); the runs are in OUT's -osd.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5s}
RAMP=${RAMP:-1s}
SIZE_MB=${SIZE_MB:-512}
QUEUES=${QUEUES:-2}
OUT=${OUT:-bin/bench-rbd-results.jsonl}
CACHE=${CACHE:-off}
case $CACHE in
off) qsd_direct=on vublk_cache=() ;;
on) qsd_direct=off vublk_cache=(--rbd-cache) ;;
*) echo "bench-rbd: CACHE must be off or on, not $CACHE" >&2; exit 1 ;;
esac
VUBLK=bin/vublk
QSD=$(command -v qemu-storage-daemon || true)
: "${VUBLK_CEPH_CONF:?no cluster: eval \$(scripts/ceph-cluster.sh start) first, or run make bench}"
: "${VUBLK_CEPH_KEYRING:?}" "${VUBLK_CEPH_POOL:?}"

[ -n "$QSD" ] || { echo "bench-rbd: qemu-storage-daemon is not installed (make deps)" >&2; exit 1; }
[ -x "$VUBLK" ] || { echo "bench-rbd: $VUBLK is missing (make build)" >&2; exit 1; }
osd_pid=$(cat "$(dirname "$VUBLK_CEPH_CONF")/osd.0.pid" 2>/dev/null || true)
[ -n "$osd_pid" ] && [ -r "/proc/$osd_pid/stat" ] || osd_pid=""
tck=$(getconf CLK_TCK)
# The OSD's user+system CPU time in clock ticks (0 without its PID).
osd_ticks() { if [ -n "$osd_pid" ]; then awk '{print $14 + $15}' "/proc/$osd_pid/stat" 2>/dev/null || echo 0; else echo 0; fi; }

jobs=(
  "--rw randread  --bs 4k  --iodepth 1  --queues 1"
  "--rw randread  --bs 4k  --iodepth 32 --queues 2"
  "--rw randwrite --bs 4k  --iodepth 1  --queues 1"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 2"
  "--rw randwrite --bs 4k  --iodepth 32 --queues 1 --flush-every 32"
  "--rw read      --bs 64k --iodepth 8  --queues 1"
)
[ -z "${JOBS:-}" ] || IFS=';' read -r -a jobs <<<"$JOBS"
SERVERS=${SERVERS:-qsd vublk}
for s in $SERVERS; do
  case $s in
  qsd | vublk) ;;
  vublk-conf) : "${ALT_CONF:?vublk-conf needs ALT_CONF, client options key=value}" ;;
  vublk-ref) [ -x "${VUBLK_REF:-}" ] || { echo "bench-rbd: vublk-ref needs VUBLK_REF, a vublk binary" >&2; exit 1; } ;;
  *) echo "bench-rbd: unknown server $s (SERVERS: qsd, vublk, vublk-conf, vublk-ref)" >&2; exit 1 ;;
  esac
done

dir=$(mktemp -d /tmp/vublk-bench-rbd.XXXXXX)
name=bench-$$
image=$VUBLK_CEPH_POOL/$name
declare -A pids # server -> PID while it runs
rbdcli() { rbd -c "$VUBLK_CEPH_CONF" -k "$VUBLK_CEPH_KEYRING" "$@"; }

stop_servers() {
  local s
  for s in "${!pids[@]}"; do
    kill -TERM "${pids[$s]}" 2>/dev/null || true
    wait "${pids[$s]}" 2>/dev/null || true
    unset "pids[$s]"
    rm -f "$dir/$s.sock"
  done
}
set_prio() { # nice value
  [ -n "${PRIO:-}" ] || return 0
  echo "$1" >"/proc/$$/autogroup" || true
  [ -z "$osd_pid" ] || echo "$1" >"/proc/$osd_pid/autogroup" 2>/dev/null || true
}
cleanup() {
  stop_servers
  set_prio 0
  rbdcli rm --no-progress "$image" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_server() {
  local sock=$dir/$1.sock
  case $1 in
  qsd)
    # cache.direct=on makes QEMU's rbd driver set rbd_cache=false (vublk's default), off true.
    "$QSD" \
      --blockdev "driver=rbd,node-name=r,pool=$VUBLK_CEPH_POOL,image=$name,conf=$VUBLK_CEPH_CONF,user=admin,cache.direct=$qsd_direct" \
      --export "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES" \
      >"$dir/qsd.log" 2>&1 &
    ;;
  vublk | vublk-conf | vublk-ref)
    local bin=$VUBLK conf=""
    [ "$1" != vublk-conf ] || conf=$ALT_CONF
    [ "$1" != vublk-ref ] || bin=$VUBLK_REF
    VUBLK_RBD_CONF=$conf "$bin" serve --socket-path "$sock" --blk-rbd "$image" --ceph-conf "$VUBLK_CEPH_CONF" \
      --ceph-keyring "$VUBLK_CEPH_KEYRING" --num-queues "$QUEUES" "${vublk_cache[@]}" --log-level warn >"$dir/$1.log" 2>&1 &
    ;;
  esac
  pids[$1]=$!
  for _ in $(seq 100); do
    [ -S "$sock" ] && return 0
    kill -0 "${pids[$1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench-rbd: $1 did not start:" >&2
  cat "$dir/$1.log" >&2
  exit 1
}

rbdcli create --size "${SIZE_MB}M" --image-feature layering "$image"
rbdcli bench --io-type write --io-pattern seq --io-size 4M --io-total "${SIZE_MB}M" "$image" >/dev/null
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
osd_out=${OUT%.jsonl}-osd.tsv
: >"$osd_out"
set_prio "${PRIO:-0}"

echo "bench-rbd: servers $SERVERS${ALT_CONF:+ (vublk-conf: $ALT_CONF)}${VUBLK_REF:+ (vublk-ref: $VUBLK_REF)}"
echo "bench-rbd: $($QSD --version | head -n 1) vs vublk ($(git describe --always --dirty 2>/dev/null || echo unknown)), $(nproc) CPUs"
echo "bench-rbd: ${SIZE_MB} MiB RBD image, one OSD, $QUEUES queues per server, librbd cache $CACHE, ${#jobs[@]} jobs x $RUNTIME (+$RAMP warm-up), $ROUNDS rounds, priority ${PRIO:-as is}"
# run_job ROUND SERVER JOB: one run, its line in OUT and in osd_out.
run_job() {
  local round=$1 server=$2 job=$3 t0 t1 line jname iops srv osd
  t0=$(osd_ticks)
  # shellcheck disable=SC2086 # the job's options are words
  line=$("$VUBLK" bench --socket "$dir/$server.sock" --server-pid "${pids[$server]}" --label "$server" --json \
    --runtime "$RUNTIME" --ramp "$RAMP" --size "$((SIZE_MB / 2))M" $job)
  t1=$(osd_ticks)
  echo "$line" >>"$OUT"
  jname=$(grep -o '"name":"[^"]*"' <<<"$line" | head -n 1 | cut -d'"' -f4)
  iops=$(grep -o '"iops":[0-9.]*' <<<"$line" | cut -d: -f2)
  srv=$(grep -o '"server_cpu":{[^}]*}' <<<"$line" | grep -o '"us_per_io":[0-9.]*' | cut -d: -f2)
  # The OSD's CPU time from t0 to t1 covers the warm-up too: per I/O at the measured rate.
  osd=$(awk -v d=$((t1 - t0)) -v tck="$tck" -v iops="$iops" -v rt="${RUNTIME%s}" -v ramp="${RAMP%s}" \
    'BEGIN { printf "%.1f", (iops > 0 ? d / tck * 1e6 / (iops * (rt + ramp)) : 0) }')
  printf '%s\t%s\t%d\t%.1f\t%.1f\t%s\n' "$jname" "$server" "$round" "$iops" "$srv" "$osd" >>"$osd_out"
  printf 'bench-rbd: round %d/%d %-6s %-30s %8.0f IOPS %7.1f us/IO server %7.1f us/IO OSD\n' \
    "$round" "$ROUNDS" "$server" "$jname" "$iops" "$srv" "$osd"
}

[ -z "${KEEP:-}" ] || for server in $SERVERS; do start_server "$server"; done
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then order=$SERVERS; else order=$(tr ' ' '\n' <<<"$SERVERS" | tac | xargs); fi
  if [ -n "${KEEP:-}" ]; then
    # Both servers keep running: each job runs on one, then at once on the other.
    for job in "${jobs[@]}"; do
      for server in $order; do run_job "$round" "$server" "$job"; done
    done
    continue
  fi
  for server in $order; do
    start_server "$server"
    for job in "${jobs[@]}"; do run_job "$round" "$server" "$job"; done
    stop_servers
  done
done
stop_servers

echo
"$VUBLK" bench summary --base qsd "$OUT"
echo
# medmm COLUMN < values: "median (min-max)" of that column of $osd_out's lines on stdin.
medmm() {
  cut -f "$1" | sort -n | awk '{ v[NR] = $1 } END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%7.0f (%5.0f-%5.0f)", m, v[1], v[NR] }'
}
printf '%-30s %-6s %-22s %-22s %-22s\n' job server "IOPS med (min-max)" "CPUus/IO server" "CPUus/IO OSD"
for job in $(cut -f 1 "$osd_out" | awk '!seen[$0]++'); do
  for server in $SERVERS; do
    rows=$(awk -F '\t' -v j="$job" -v s="$server" '$1 == j && $2 == s' "$osd_out")
    [ -n "$rows" ] || continue
    printf '%-30s %-6s %s  %s  %s\n' "$job" "$server" "$(medmm 4 <<<"$rows")" "$(medmm 5 <<<"$rows")" "$(medmm 6 <<<"$rows")"
  done
done
echo
echo "bench-rbd: every run is in $OUT, the OSD figures in $osd_out"
