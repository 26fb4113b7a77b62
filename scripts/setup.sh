#!/usr/bin/env bash
# Installs everything bootkit's demo and test suite need on a fresh Debian 12 machine (run as root):
# Debian packages, and a virtualenv in .venv with bootkit and its development tools.
# Idempotent: a second run installs nothing and takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(
    # reference images and real NBD clients
    qemu-utils qemu-block-extra libnbd-bin python3-libnbd nbdkit fio
    # guests, firmware and boot loaders for the end-to-end boots
    qemu-system-x86 ovmf ipxe-qemu grub-pc-bin grub-efi-amd64-bin grub-common dnsmasq-base
    # iPXE builds (undionly.kpxe, ipxe.efi) that pxe-config copies into the TFTP tree for dnsmasq clients
    ipxe
    # initramfs and root images
    dracut-core dracut-network kmod isc-dhcp-client cpio debootstrap busybox-static fdisk e2fsprogs
    dosfstools zstd
    # servers and tools the tests drive
    nginx-light curl openssl shellcheck python3-venv
)

missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The virtualenv is made from Debian's python3 with the system site-packages visible, so that libnbd's
# Python binding (python3-libnbd, a Debian package) can be imported by the interop tests.
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.bootkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing bootkit and its development tools into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
