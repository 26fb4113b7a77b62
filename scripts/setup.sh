#!/usr/bin/env bash
# Installs everything bootkit's demo and test suite need on a fresh Debian 12 machine (run as root):
# Debian packages, and a virtualenv in .venv with bootkit and its development tools.
# Idempotent: a second run installs nothing and takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(
    # reference images and real NBD clients
    qemu-utils qemu-block-extra libnbd-bin python3-libnbd nbdkit fio
    # libdeflate: twice zlib's speed for deflate clusters (bootkit falls back to zlib without it)
    libdeflate0
    # guests, firmware and boot loaders for the end-to-end boots
    qemu-system-x86 ovmf ipxe-qemu grub-pc-bin grub-efi-amd64-bin grub-common dnsmasq-base
    # iPXE builds (undionly.kpxe, ipxe.efi) that pxe-config copies into the TFTP tree for dnsmasq clients
    ipxe
    # initramfs and root images
    dracut-core dracut-network kmod isc-dhcp-client cpio debootstrap busybox-static fdisk e2fsprogs
    dosfstools zstd
    # dracut's own network roots that bench/boot.py compares bootkit with: nbd (dracut-network + nbd-client)
    # and livenet (dracut-live, a squashfs of the root tree)
    nbd-client dracut-live squashfs-tools
    # a real container tool for the OCI/docker-archive cross-check of image build
    skopeo
    # a filesystem with reflink (XFS) for the convert test that shares blocks instead of copying them
    xfsprogs
    # servers and tools the tests drive
    nginx-light curl openssl shellcheck python3-venv
    # pipx: the wheel test installs bootkit the way users install Python tools
    pipx
    # build-uki: systemd's EFI stub, objcopy to add the UKI's sections, sbsign/sbverify for the site's key
    systemd-boot-efi binutils sbsigntool
    # pxe-config's loader "shim" (Secure Boot with Debian's signatures): the signed shim and network GRUB
    shim-signed grub-efi-amd64-signed
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

# The virtualenv is made from Debian's python3 and sees only what is installed into it. Not the system
# site-packages: their .pth files run at every interpreter start and cost each bootkit command ~20 ms, a
# tenth of a whole `bootkit convert` of an uncompressed GiB. libnbd's Python binding, a Debian package
# (python3-libnbd) used by the interop tests, is linked in by itself below.
if [ -f .venv/pyvenv.cfg ] && grep -q '^include-system-site-packages = true' .venv/pyvenv.cfg; then
    echo "setup: recreating .venv without the system site-packages"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.bootkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing bootkit and its development tools into .venv"
    .venv/bin/pip install -q --upgrade pip
    # compat: a plain path entry, no import hook run at every start (the default mode's hook costs 10 ms);
    # setuptools calls that mode transitional: should it be gone, the default mode works the same, slower
    .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat ||
        .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-*.so; do
    ln -sfn "$f" "$site_packages/"
done
