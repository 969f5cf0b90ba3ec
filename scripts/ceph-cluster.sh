#!/usr/bin/env bash
# A single-node Ceph cluster for vublk's RBD tests and for trying vublk on RBD, from Debian 12's
# packages (ceph-mon, ceph-osd, ceph-common; make deps installs them):
#   scripts/ceph-cluster.sh start   one monitor and one BlueStore OSD (a sparse file), cephx on,
#                                   pool "rbd" (size 1), bound to 127.0.0.1 only; prints the env
#   scripts/ceph-cluster.sh stop    stops the daemons (by PID) and removes the cluster's directory
#   scripts/ceph-cluster.sh env     prints VUBLK_CEPH_CONF, VUBLK_CEPH_KEYRING, VUBLK_CEPH_POOL
#   scripts/ceph-cluster.sh status  ceph -s
#   scripts/ceph-cluster.sh osd-stop | osd-start   stop the OSD (SIGTERM, waits for the exit) or
#                                   start it again (for the tests' cluster faults)
#   scripts/ceph-cluster.sh run CMD...  start a cluster, run CMD with its env, stop it (also when
#                                   CMD fails or is interrupted); exits with CMD's status
# Everything lives in CEPH_DIR (default /tmp/vublk-ceph): a private ceph.conf, the keyrings, the
# monitor's store, the OSD's 4 GiB sparse block file, logs and PID files. There is no systemd: the
# daemons are started and stopped by PID. MON_PORT (default 40330) is the monitor's msgr2 port.
set -euo pipefail

dir=${CEPH_DIR:-/tmp/vublk-ceph}
port=${MON_PORT:-40330}
pool=${CEPH_POOL:-rbd}
conf=$dir/ceph.conf
keyring=$dir/ceph.client.admin.keyring

print_env() {
  echo "export VUBLK_CEPH_CONF=$conf"
  echo "export VUBLK_CEPH_KEYRING=$keyring"
  echo "export VUBLK_CEPH_POOL=$pool"
}

running() { # pid file
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {
  local pidf pid i
  for pidf in "$dir"/osd.*.pid "$dir"/mon.*.pid; do
    [ -e "$pidf" ] || continue
    if running "$pidf"; then
      pid=$(cat "$pidf")
      kill "$pid" 2>/dev/null || true
      for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}

cephcli() { ceph -c "$conf" -k "$keyring" -n client.admin --connect-timeout 10 "$@"; }

start() {
  command -v ceph-mon >/dev/null || { echo "ceph-cluster: ceph-mon is not installed (run make deps)" >&2; exit 1; }
  if running "$dir/osd.0.pid" && running "$dir/mon.a.pid"; then
    echo "ceph-cluster: already running in $dir" >&2
    print_env
    return
  fi
  stop
  mkdir -p "$dir/mon.a" "$dir/osd.0"
  local t0=$SECONDS fsid osd_uuid osd_secret
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat > "$conf" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$port
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $keyring
run_dir = $dir
pid_file = $dir/\$name.pid
admin_socket = $dir/\$name.asok
log_file = $dir/\$name.log
crash_dir = $dir/crash
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mon_osd_full_ratio = .99
mon_osd_backfillfull_ratio = .98
mon_osd_nearfull_ratio = .97
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0

[mon]
mon_data = $dir/mon.\$id

[osd]
osd_data = $dir/osd.\$id
osd_objectstore = bluestore
bluestore_block_path = $dir/osd.\$id.block
bluestore_block_create = true
bluestore_block_size = 4294967296
osd_memory_target = 1073741824
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
EOF
  # Keys: the monitor's, the admin client's (also the monitor's keyring), then the monitor store.
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
  # The daemons fork into the background; they must not keep the caller's descriptors (a make
  # target's pipes, a test's lock) open.
  ceph-mon -c "$conf" -i a </dev/null >/dev/null 2>&1 9>&-
  # The OSD: registered with the monitor, then its BlueStore made on the sparse block file.
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  osd_secret=$(ceph-authtool --gen-print-key)
  local id
  id=$(echo "{\"cephx_secret\": \"$osd_secret\"}" | cephcli osd new "$osd_uuid" -i -)
  [ "$id" = 0 ] || { echo "ceph-cluster: expected OSD id 0, got $id" >&2; exit 1; }
  ceph-authtool --create-keyring "$dir/osd.0/keyring" --name osd.0 --add-key "$osd_secret" >/dev/null
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" --keyring "$dir/osd.0/keyring" >"$dir/osd-mkfs.log" 2>&1 ||
    { cat "$dir/osd-mkfs.log" >&2; exit 1; }
  osd_start
  # The pool, once the OSD is up.
  local i
  for i in $(seq 300); do
    cephcli osd dump 2>/dev/null | grep -q '^osd.0 up' && break
    sleep 0.2
  done
  cephcli osd dump | grep -q '^osd.0 up' || { echo "ceph-cluster: osd.0 did not come up (log: $dir/osd.0.log)" >&2; exit 1; }
  # Size 1 comes from osd_pool_default_size; rbd pool init enables the rbd application.
  cephcli osd pool create "$pool" 8 8 >/dev/null 2>&1
  rbd -c "$conf" -k "$keyring" pool init "$pool"
  echo "ceph-cluster: up in $((SECONDS - t0)) s in $dir (monitor 127.0.0.1:$port, pool $pool)" >&2
  print_env
}

osd_start() {
  ceph-osd -c "$conf" -i 0 --keyring "$dir/osd.0/keyring" </dev/null >/dev/null 2>&1 9>&-
}

osd_stop() {
  local pid i
  running "$dir/osd.0.pid" || return 0
  pid=$(cat "$dir/osd.0.pid")
  kill "$pid"
  for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

run() {
  # A cluster of its own for CMD, in a fresh directory, stopped whatever happens.
  dir=$(mktemp -d /tmp/vublk-ceph-run.XXXXXX)
  conf=$dir/ceph.conf
  keyring=$dir/ceph.client.admin.keyring
  # A monitor port nothing listens on (another cluster may run on the default).
  if [ -z "${MON_PORT:-}" ]; then
    for port in $(seq 40331 40399); do
      ss -Hltn "sport = :$port" 2>/dev/null | grep -q . || break
    done
  fi
  trap 'stop' EXIT
  trap 'exit 130' INT TERM
  eval "$(start)"
  export VUBLK_CEPH_CONF VUBLK_CEPH_KEYRING VUBLK_CEPH_POOL VUBLK_CEPH_REQUIRED=1
  local code=0
  "$@" || code=$?
  return $code
}

case "${1:-}" in
  start) start ;;
  run) shift; [ $# -gt 0 ] || { echo "usage: $0 run CMD..." >&2; exit 2; }; run "$@" ;;
  stop) stop ;;
  env) print_env ;;
  status) cephcli -s ;;
  osd-stop) osd_stop ;;
  osd-start) osd_start ;;
  *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
