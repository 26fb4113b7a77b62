"""GRUB's network-boot tree, built with ``grub-mknetdir`` (docs/pxe.md).

For each firmware whose GRUB platform files are installed (Debian ``grub-pc-bin`` for BIOS,
``grub-efi-amd64-bin`` for UEFI), ``grub-mknetdir`` writes ``boot/grub/<platform>/`` into the TFTP root:
the modules and the netboot image (``core.0`` for BIOS, ``core.efi`` for UEFI). Its embedded prefix is
``(tftp,<next-server>)/boot/grub``, so GRUB then reads ``boot/grub/grub.cfg-01-<mac>`` or ``grub.cfg``
from the same TFTP server.
"""

from __future__ import annotations

from pathlib import Path

from bootkit.host.pxecfg.model import Firmware
from bootkit.log import log
from bootkit.run import run

#: where Debian's GRUB packages put each platform
GRUB_LIB = Path("/usr/lib/grub")
#: the TFTP subdirectory GRUB's prefix points to; grub.cfg lives there
SUBDIR = "boot/grub"


def platform_dir(firmware: Firmware, grub_lib: Path = GRUB_LIB) -> Path | None:
    """GRUB's platform directory for ``firmware``, or None when its package is not installed."""
    d = grub_lib / firmware.grub_platform()
    # moddep.lst is what grub-mkimage needs to resolve modules; its absence means no usable platform
    return d if (d / "moddep.lst").is_file() else None


def make_netdir(tftp_root: Path, firmware: Firmware, grub_lib: Path = GRUB_LIB) -> Path | None:
    """Build ``boot/grub/<platform>/`` under ``tftp_root``; return the netboot image, or None if not installed."""
    source = platform_dir(firmware, grub_lib)
    if source is None:
        package = {"bios": "grub-pc-bin", "uefi": "grub-efi-amd64-bin"}[firmware]
        log.warning("pxe-config: no GRUB netboot image for %s: install %s", firmware.name.upper(), package)
        return None
    cmd = [
        "grub-mknetdir",
        f"--net-directory={tftp_root}",
        f"--subdir={SUBDIR}",
        "--directory", str(source),
    ]
    run(cmd, capture=True)
    image = tftp_root / SUBDIR / firmware.grub_platform() / firmware.grub_image()
    log.info("pxe-config: GRUB %s netboot image %s", firmware.name.upper(), image)
    return image
