#!/usr/bin/env bash
# Installs everything vublk's tests need, idempotently:
#   - Debian packages: QEMU (the real frontend), qemu-storage-daemon (reference backend),
#     busybox-static, fio, e2fsprogs and the tools to build an initramfs;
#   - the Debian 6.1 guest kernel, downloaded with apt-get download and unpacked into .cache/kernel;
#   - the Go modules of go.mod.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-system-common qemu-utils
  busybox-static fio e2fsprogs util-linux cpio kmod zstd xz-utils
  libvirt-clients libxml2-utils
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

export PATH="/usr/local/go/bin:$PATH"
go mod download
echo "deps: ok"
