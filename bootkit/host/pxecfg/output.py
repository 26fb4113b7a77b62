"""Write the output directory of ``pxe-config``: rendered files, GRUB's netboot tree, iPXE binaries.

Layout (also in docs/pxe.md, "Output directory")::

    OUT/dnsmasq.conf                            when the description has a [dhcp] table
    OUT/tftp/                                   the TFTP root (dnsmasq's tftp-root, QEMU's tftp=)
    OUT/tftp/boot.ipxe                          iPXE script: menu, per-MAC sections
    OUT/tftp/undionly.kpxe, ipxe.efi            iPXE for firmware PXE ROMs (dhcp loader ipxe; package ipxe)
    OUT/tftp/boot/grub/grub.cfg                 GRUB menu; grub.cfg-01-<mac> per machine
    OUT/tftp/boot/grub/i386-pc/core.0           BIOS GRUB netboot image (grub-mknetdir)
    OUT/tftp/boot/grub/x86_64-efi/core.efi      UEFI GRUB netboot image (grub-mknetdir)
    OUT/tftp/shimx64.efi, grubx64.efi           Debian's signed shim and network GRUB ([dhcp] loader = "shim")
    OUT/tftp/grub/grub.cfg                      the signed GRUB's menus, every machine in one file
    OUT/tftp/grub/entries/<entry>/              each entry's kernel and initramfs, which the signed GRUB reads
                                                over TFTP (it has no http)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bootkit.host.pxecfg import grub, shim
from bootkit.host.pxecfg.model import Bootloader, Config, Firmware, PxeLoader
from bootkit.host.pxecfg.render import render_all
from bootkit.log import log

#: where Debian's ``ipxe`` package installs the chain-loadable builds
IPXE_LIB = Path("/usr/lib/ipxe")


def write(config: Config, out: Path, *, grub_images: bool = True, ipxe_lib: Path = IPXE_LIB) -> list[Path]:
    """Render ``config`` into ``out`` (created if needed); return the paths written, netboot trees last."""
    out = out.resolve()
    tftp = out / "tftp"
    files = render_all(config, str(tftp))
    # a per-MAC file left from an earlier run would still win over grub.cfg for that machine: remove it
    grub_dir = tftp / "boot" / "grub"
    for stale in sorted(grub_dir.glob("grub.cfg-01-*")):
        if stale.relative_to(out).as_posix() not in {str(p) for p in files}:
            stale.unlink()
            log.info("pxe-config: removed %s (no such machine any more)", stale)
    written = []
    for relative, text in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
        log.info("pxe-config: wrote %s", path)
    tftp.mkdir(parents=True, exist_ok=True)
    if Bootloader.grub in config.bootloaders and grub_images:
        for firmware in Firmware:
            image = grub.make_netdir(tftp, firmware)
            if image is not None:
                written.append(image)
    if config.dhcp is not None and config.dhcp.loader is PxeLoader.shim:
        written += shim.install(config, tftp)
    if config.dhcp is not None and config.dhcp.loader is PxeLoader.ipxe:
        for firmware in Firmware:
            source = ipxe_lib / firmware.ipxe_binary()
            if not source.is_file():
                log.warning("pxe-config: %s not found: install the Debian package ipxe for dnsmasq's %s clients",
                            source, firmware.name.upper())
                continue
            shutil.copyfile(source, tftp / source.name)
            written.append(tftp / source.name)
            log.info("pxe-config: copied %s", source)
    return written
