#!/usr/bin/env bash
# Installs everything vublk's tests need, idempotently:
#   - Debian packages: QEMU (the real frontend), qemu-storage-daemon (reference backend),
#     busybox-static, fio, e2fsprogs and the tools to build an initramfs;
#   - the Debian 6.1 guest kernel, downloaded with apt-get download and unpacked into .cache/kernel;
#   - a Debian 13 (trixie) root with QEMU 10.0, qemu-storage-daemon 10.0 and libblkio 1.5, made once
#     per machine with debootstrap at $VUBLK_TRIXIE_ROOT (default /var/lib/vublk/trixie), from the
#     mirror of the host's apt sources; the host's apt sources are not changed. scripts/trixie-run
#     runs its programs;
#   - the Go modules of go.mod.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-system-common qemu-utils
  busybox-static fio e2fsprogs util-linux cpio kmod zstd xz-utils debootstrap
  libvirt-clients libxml2-utils
  # RBD: librbd to build vublk with, a single-node cluster for the tests (scripts/ceph-cluster.sh),
  # and qemu-storage-daemon's rbd driver for make bench.
  librbd-dev librados-dev ceph-mon ceph-osd ceph-common qemu-block-extra
)

need=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

updated=""
apt_update() {
  if [ -z "$updated" ]; then
    $sudo apt-get update -q
    updated=1
  fi
}

if [ "${#need[@]}" -gt 0 ]; then
  echo "deps: installing ${need[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# Guest kernel: newest linux-image-6.1.*-amd64 in the archive, unpacked (not installed).
kdir=.cache/kernel
if ! ls "$kdir"/root/boot/vmlinuz-* "$kdir"/root/lib/modules/*/modules.dep >/dev/null 2>&1; then
  apt_update
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9.-]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
  if [ -z "$pkg" ]; then
    echo "deps: no linux-image-6.1.*-amd64 package found in the apt archive" >&2
    exit 1
  fi
  echo "deps: fetching guest kernel $pkg"
  rm -rf "$kdir"
  mkdir -p "$kdir/deb"
  (cd "$kdir/deb" && apt-get download "$pkg")
  dpkg -x "$kdir"/deb/*.deb "$kdir/root"
  kver=$(basename "$(ls -d "$kdir"/root/lib/modules/*)")
  /sbin/depmod -b "$kdir/root" "$kver"
  rm -rf "$kdir/deb"
fi
echo "deps: guest kernel $(basename "$(ls "$kdir"/root/boot/vmlinuz-* | head -n 1)")"

# The Debian 13 root: QEMU 10.0 for the front-end matrix, libblkio 1.5 as a second front-end.
trixie=${VUBLK_TRIXIE_ROOT:-/var/lib/vublk/trixie}
trixie_pkgs=qemu-system-x86,qemu-system-common,qemu-utils,qemu-block-extra,fio
if [ ! -x "$trixie/usr/bin/qemu-system-x86_64" ] || [ ! -e "$trixie/.vublk-complete" ]; then
  mirror=$(sed -n 's|^URIs:[[:space:]]*\([^[:space:]]*/debian\)/*$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  if [ -z "$mirror" ]; then
    echo "deps: no Debian mirror found in the host's apt sources" >&2
    exit 1
  fi
  echo "deps: building the Debian 13 root at $trixie from $mirror (once per machine, about a minute)"
  rm -rf "$trixie.tmp"
  mkdir -p "$(dirname "$trixie")"
  if ! debootstrap --variant=minbase --include="$trixie_pkgs" trixie "$trixie.tmp" "$mirror" > "$trixie.log" 2>&1; then
    tail -n 20 "$trixie.log" >&2
    echo "deps: debootstrap trixie failed (log: $trixie.log)" >&2
    exit 1
  fi
  rm -rf "$trixie"
  mv "$trixie.tmp" "$trixie"
  touch "$trixie/.vublk-complete"
fi
echo "deps: $(scripts/trixie-run qemu-system-x86_64 --version | head -n 1) in $trixie"

# VDUSE guest kernel: Debian 13's newest linux-image-6.12.*-amd64 (Debian 12's 6.1 and this host's
# kernel have no vDPA), downloaded inside the Debian 13 root and unpacked, not installed, into
# .cache/kernel-vduse. The VDUSE e2e test boots it.
vdir=.cache/kernel-vduse
if ! ls "$vdir"/root/boot/vmlinuz-* "$vdir"/root/lib/modules/*/modules.dep >/dev/null 2>&1; then
  scripts/trixie-run apt-get update -q >/dev/null
  vpkg=$(scripts/trixie-run apt-cache search --names-only '^linux-image-6\.12\.[0-9.+a-z]+-amd64$' | awk '{print $1}' | { grep -E -- '-amd64$' || true; } | sort -V | tail -n 1)
  if [ -z "$vpkg" ]; then
    echo "deps: no linux-image-6.12.*-amd64 package in the Debian 13 archive" >&2
    exit 1
  fi
  echo "deps: fetching VDUSE guest kernel $vpkg"
  vtmp=$(mktemp -d /tmp/vublk-kernel-vduse.XXXXXX)
  chmod 0777 "$vtmp"
  scripts/trixie-run sh -c "cd $vtmp && apt-get download -q $vpkg" >/dev/null
  rm -rf "$vdir"
  mkdir -p "$vdir"
  dpkg -x "$vtmp"/*.deb "$vdir/root"
  rm -rf "$vtmp"
  # Debian 13 keeps modules in usr/lib; depmod -b and the harness look in lib.
  [ -e "$vdir/root/lib" ] || ln -s usr/lib "$vdir/root/lib"
  vver=$(basename "$(ls -d "$vdir"/root/lib/modules/*)")
  /sbin/depmod -b "$vdir/root" "$vver"
fi
echo "deps: VDUSE guest kernel $(basename "$(ls "$vdir"/root/boot/vmlinuz-* | head -n 1)")"

export PATH="/usr/local/go/bin:$PATH"
go mod download
# gotestsum formats the e2e output: one line per test, logs only for failures.
[ -x bin/gotestsum ] || GOBIN="$PWD/bin" go install gotest.tools/gotestsum@v1.13.0
echo "deps: ok"
