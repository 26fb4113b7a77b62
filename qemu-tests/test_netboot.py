"""End-to-end netboots: firmware PXE -> bootloader -> kernel + bootkit initramfs over HTTP -> the QCOW2 image
over HTTP -> bootkit's reader and NBD server -> root mounted under an overlay -> switch root -> the test root
proves what it sees -> clean power-off. One test per row of the matrix in issue 7.

Each boot's stage timeline goes to artifacts/timeline.json; a failed test keeps its serial log under
artifacts/qemu-tests/<test>/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.guest import Firmware
from bkharness.images import RootImage, file_sha256, modified_copy, qcow2_image
from bkharness.netboot import netboot
from bkharness.pieces import bootkit

#: a netboot under TCG takes 25-40 s on an idle machine and about 60 s on a busy one (2 cores shared)
BOOT_TIMEOUT = 300.0


def test_ipxe_bios_ram_deflate_busybox(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                       boot_dir: BootDir) -> None:
    """BIOS iPXE, whole image downloaded into RAM, deflate-compressed, shell initramfs, busybox root."""
    image = qcow2_image(busybox_root.raw, compression="deflate")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="bios-ipxe-deflate",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram",
                       compression="deflate", root="busybox", initrd="shell")


def test_ipxe_bios_ram_zstd_debian_systemd_nginx(kernel: Any, systemd_initrd: Path, debian_root: RootImage,
                                                 boot_dir: BootDir) -> None:
    """BIOS iPXE, zstd image into RAM from a stock nginx, systemd initramfs, Debian root with systemd."""
    image = qcow2_image(debian_root.raw, compression="zstd")
    with netboot(kernel, systemd_initrd, image, work=boot_dir.path, server="nginx", name="bios-ipxe-zstd-debian",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, debian_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram",
                       compression="zstd", root="debian", initrd="systemd", server="nginx")
        # systemd in the real root kept the server through its default-target isolate and its shutdown
        assert not boot.vm.seen(r"bootkit-root\.service.*not-found")


def test_lazy_range_requests_with_verified_manifest(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                                   boot_dir: BootDir) -> None:
    """Lazy mode: the image is read with HTTP range requests, every chunk checked against a pinned manifest."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    manifest = boot_dir.path / "disk.qcow2.manifest"
    bootkit("manifest", "-o", manifest, image)
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="bios-ipxe-lazy",
                 also_serve={"disk.qcow2.manifest": manifest},
                 pxe_args=["--mode", "lazy", "--manifest", "disk.qcow2.manifest"],
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="lazy",
                       compression="zstd", root="busybox", initrd="shell")
        assert boot.vm.seen(r"read lazily"), "the boot code did not report lazy mode"
    # the server answered partial content: the image was read in ranges, not downloaded whole
    assert re.search(r'"GET /disk\.qcow2 HTTP/1\.[01]" 206', boot.web.requests_log())


def test_grub_bios_loads_kernel_and_initrd_over_http(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                                      boot_dir: BootDir) -> None:
    """BIOS PXE -> GRUB's core.0 (grub-mknetdir) over TFTP -> kernel and initrd over HTTP from grub.cfg."""
    image = qcow2_image(busybox_root.raw, compression="deflate")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, loader="grub", name="bios-grub",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot.vm.expect(r"bootkit: loading qcow2", 300)  # grub.cfg's menu entry ran
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="grub", mode="ram",
                       compression="deflate", root="busybox", initrd="shell")


def test_uefi_ipxe(kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir) -> None:
    """OVMF with QEMU's EFI iPXE ROM (efi-virtio.rom): the iPXE script's named initrd on the EFI stub path."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, firmware=Firmware.uefi, name="uefi-ipxe",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot.vm.expect(r"iPXE", 300)  # OVMF mirrors the console: the EFI ROM's banner shows on serial
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="uefi", loader="ipxe", mode="ram",
                       compression="zstd", root="busybox", initrd="shell")


def test_uefi_grub(kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir) -> None:
    """OVMF -> iPXE EFI ROM -> GRUB's core.efi over TFTP -> kernel and initrd over HTTP (works under TCG)."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, firmware=Firmware.uefi, loader="grub",
                 name="uefi-grub", boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="uefi", loader="grub", mode="ram",
                       compression="zstd", root="busybox", initrd="shell")


def test_extended_l2_image(kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir) -> None:
    """An image with extended L2 entries (subclusters), zstd-compressed."""
    image = qcow2_image(busybox_root.raw, compression="zstd", extended_l2=True)
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="bios-ipxe-l2ext",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram",
                       compression="zstd", extended_l2=True, root="busybox", initrd="shell")


def test_two_level_backing_chain(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                 boot_dir: BootDir) -> None:
    """A per-lab overlay on a site-wide base: both fetched from the same URL directory, both pinned; the
    known file was changed in the overlay, so the right checksum proves the guest read both layers."""
    images_dir = boot_dir.path / "images"
    images_dir.mkdir()
    base = qcow2_image(busybox_root.raw, compression="zstd", out=images_dir / "base.qcow2")
    changed = modified_copy(busybox_root, images_dir / "lab.raw", seed="lab overlay")
    top = qcow2_image(changed.raw, compression="zstd", backing=base, out=images_dir / "lab.qcow2")
    with netboot(kernel, shell_initrd, top, work=boot_dir.path, name="bios-ipxe-chain",
                 also_serve={"base.qcow2": base},
                 kernel_args=[f"rd.qcow2.sha256.base.qcow2={file_sha256(base)}"],
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, changed, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram", compression="zstd",
                       backing_chain=2, root="busybox", initrd="shell")
    assert changed.known_sha256 != busybox_root.known_sha256
