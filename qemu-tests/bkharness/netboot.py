"""One netboot, end to end: files on a web server, the PXE tree, the firmware, the console.

:func:`netboot` is the whole story as one context manager, for tests that vary only the details
(firmware, bootloader, web server, image, kernel arguments)::

    with netboot(k, initrd, image, work=d) as boot:
        proof = expect_proof(boot.vm)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bkharness.guest import Firmware, Guest, LineHandler, Nic, qemu_pxe
from bkharness.pieces import pxe_tree, require_boot_code
from bkharness.servers import WebServer, http_server, nginx_server


@dataclass(frozen=True)
class Netboot:
    """A running netboot: the guest, the web server it fetches from, and the PXE tree it booted."""

    vm: Guest
    web: WebServer
    tftp: Path
    bootfile: str


def publish(www: Path, files: Mapping[str, Path]) -> Path:
    """Put ``files`` (name in the web root -> file) into ``www`` as hard links (copies across file systems).

    Not symlinks: a careful web server (bootkit serve-http is one) refuses links that leave its root.
    """
    www.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dest = www / name
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    return www


def bootfile(firmware: Firmware, loader: str) -> str:
    """What QEMU's DHCP hands out: the iPXE script, or GRUB's netboot image for the firmware."""
    if loader == "ipxe":
        return "boot.ipxe"
    if loader == "grub":
        return "boot/grub/x86_64-efi/core.efi" if firmware is Firmware.uefi else "boot/grub/i386-pc/core.0"
    raise ValueError(f"unknown loader {loader!r} (ipxe, grub)")


@contextmanager
def netboot(
    kernel: Any,
    initrd: Path,
    image: Path,
    *,
    work: Path,
    firmware: Firmware = Firmware.bios,
    loader: str = "ipxe",
    server: str = "bootkit",
    also_serve: Mapping[str, Path] | None = None,
    sha256: str = "compute",
    kernel_args: Sequence[str] = (),
    pxe_args: Sequence[str] = (),
    memory_mib: int = 1024,
    boot_timeout: float = 600.0,
    name: str = "guest",
    on_line: LineHandler | None = None,
    nic: Nic = Nic.virtio,
    writable_disks: Sequence[Path] = (),
) -> Iterator[Netboot]:
    """Serve kernel, initrd and ``image`` (as ``disk.qcow2``), render the PXE tree, boot QEMU from the network.

    ``also_serve`` adds files next to the image (backing files, manifests); ``server`` is ``bootkit``
    (serve-http) or ``nginx``; ``loader`` is ``ipxe`` or ``grub``; ``nic`` is the guest's network card.
    """
    require_boot_code()
    files = {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": initrd, "disk.qcow2": image, **(also_serve or {})}
    www = publish(work / "www", files)
    serve = {"bootkit": http_server, "nginx": nginx_server}[server]
    with serve(www, log_dir=work) as web:
        tftp = pxe_tree(work / "pxe", base_url=web.guest_url + "/", docroot=www, sha256=sha256,
                        grub=loader == "grub", kernel_args=kernel_args, extra=pxe_args)
        boot = bootfile(firmware, loader)
        with qemu_pxe(tftp, boot, log_dir=work, firmware=firmware, memory_mib=memory_mib, name=name,
                      boot_timeout=boot_timeout, on_line=on_line, nic=nic, writable_disks=writable_disks) as vm:
            yield Netboot(vm, web, tftp, boot)
