"""Debian's signed boot chain for Secure Boot: shim -> signed network GRUB -> signed kernel (``loader = "shim"``).

A stock PC with Secure Boot on trusts Microsoft's UEFI CA. Debian's ``shimx64.efi.signed`` (package
``shim-signed``) is signed by it and carries Debian's CA; Debian's signed network GRUB,
``grubnetx64.efi.signed`` (package ``grub-efi-amd64-signed``), and the kernel of ``linux-image-<kver>``
(not ``-unsigned``) are signed by Debian's keys, which shim checks. bootkit's initramfs and the kernel command
line are not signed by anyone (docs/secure-boot.md, "Debian's signed chain").

What the binaries fix, and so the layout of the TFTP root (read from the images: the prefix module holds
``/grub``, the built-in memdisk config sources ``$prefix/x86_64-efi/grub.cfg`` if it exists, else
``$prefix/grub.cfg``):

* shim fetches ``grubx64.efi`` over TFTP from the directory of its own boot file name: GRUB goes next to shim
  under that name;
* GRUB's prefix is ``(tftp,<server>)/grub``: the server it was loaded from, the absolute path ``/grub``. It
  never tries per-MAC files (``grub.cfg-01-<mac>``): its built-in config names the file. So the per-machine
  menus are branches of that one ``grub/grub.cfg``, chosen by ``$net_default_mac`` (the MAC GRUB booted from,
  lower case with colons, compared as text with the MACs of the description, which :mod:`.values` validated);
* the signed GRUB has ``tftp`` built in but not ``http``, and loads no module under Secure Boot (a boot showed
  ``disk `http,...' not found``): kernel and initramfs come from the same TFTP server, so each entry's files
  (local files under ``docroot``) are copied into the tree. The image is still fetched over HTTP by the
  initramfs.

Layout::

    tftp/shimx64.efi                     shim: the boot file of x86-64 UEFI PXE clients (dnsmasq.conf)
    tftp/grubx64.efi                     Debian's signed network GRUB, under the name shim loads
    tftp/grub/grub.cfg                   menus of every machine, dispatched on $net_default_mac
    tftp/grub/entries/<entry>/vmlinuz    each entry's kernel (signed) and initramfs, read by GRUB over TFTP
    tftp/grub/entries/<entry>/initrd
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bootkit.errors import ConfigError
from bootkit.host.kernelpkg import KernelPackageError, check_signed, signature_signers
from bootkit.host.pxecfg.model import Artifact, Config, Entry
from bootkit.host.pxecfg.values import BadValue
from bootkit.log import log

#: names in the TFTP root, fixed by the binaries (see the module's docstring)
SHIM_NAME = "shimx64.efi"
GRUB_NAME = "grubx64.efi"
#: GRUB's built-in prefix, relative to the TFTP root
PREFIX = PurePosixPath("grub")
#: the rendered configuration, relative to the output directory
CONFIG = PurePosixPath("tftp") / PREFIX / "grub.cfg"
#: each entry's kernel and initramfs, relative to the TFTP root
ENTRIES = PREFIX / "entries"


def entry_files(entry: Entry) -> tuple[tuple[Artifact, PurePosixPath], ...]:
    """(artifact, path in the TFTP root) of the kernel and initramfs of ``entry`` (whose name is a safe label)."""
    return ((entry.kernel, ENTRIES / entry.name / "vmlinuz"), (entry.initrd, ENTRIES / entry.name / "initrd"))


@dataclass(frozen=True)
class Sources:
    """Where the signed binaries are on this machine, and the Debian package of each."""

    shim: Path
    grub: Path

    def packages(self) -> tuple[tuple[Path, str, str], ...]:
        """(path, name in the TFTP root, Debian package) of each binary."""
        return ((self.shim, SHIM_NAME, "shim-signed"), (self.grub, GRUB_NAME, "grub-efi-amd64-signed"))


#: Debian 12's installed packages
DEBIAN = Sources(
    shim=Path("/usr/lib/shim/shimx64.efi.signed"),
    grub=Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
)


def check_sources(sources: Sources) -> Sources:
    """``sources`` when every binary is there; :class:`BadValue` naming the missing file and its package."""
    for path, _, package in sources.packages():
        if not path.is_file():
            raise BadValue(f"'shim' needs {path}: install the Debian package {package}")
    return sources


def check_local(artifact: Artifact) -> Artifact:
    """``artifact`` when it is a local file; the signed GRUB reads it over TFTP, so pxe-config must copy it."""
    if artifact.path is None:
        raise BadValue(
            f"{artifact.url}: with loader 'shim' it is served over TFTP (Debian's signed GRUB has no http): "
            "give a file under docroot"
        )
    return artifact


def check_kernel(kernel: Artifact) -> Artifact:
    """``kernel`` when it is a local, signed file; :class:`BadValue` when not."""
    check_local(kernel)
    assert kernel.path is not None
    try:
        check_signed(kernel.path)
    except KernelPackageError as e:
        raise BadValue(f"{e} (loader 'shim'; build-initrd --signed-kernel fetches a signed kernel)") from None
    return kernel


def render(config: Config) -> str:
    """``grub/grub.cfg`` of the signed GRUB: every machine's menu behind an ``if`` on its MAC, then the default."""
    from bootkit.host.pxecfg.render import environment, menus  # render imports this module

    # GRUB reads each entry's files from the TFTP server it was loaded from ($root), not over HTTP
    tftp_paths = {e.name: tuple(f"/{path}" for _, path in entry_files(e)) for e in config.entries}
    all_menus = tuple(
        dataclasses.replace(menu, boots=tuple(
            dataclasses.replace(b, grub_kernel=tftp_paths[b.entry.name][0], grub_initrd=tftp_paths[b.entry.name][1])
            for b in menu.boots
        ))
        for menu in menus(config)
    )  # fmt: skip
    return environment().get_template("grub-shim.cfg.j2").render(
        source=config.source, default_menu=all_menus[0], machine_menus=all_menus[1:]
    )


def install(config: Config, tftp: Path, sources: Sources = DEBIAN) -> list[Path]:
    """Copy shim and the signed GRUB into ``tftp`` under the names the chain loads (refusing unsigned copies), and
    each entry's kernel and initramfs where ``grub/grub.cfg`` names them."""
    written = []
    stale = tftp / ENTRIES
    if stale.is_dir():
        shutil.rmtree(stale)  # entries no longer described must not stay reachable
    for entry in config.entries:
        for artifact, relative in entry_files(entry):
            if artifact.path is None:
                raise ConfigError(f"entry {entry.name!r}: {artifact.url} is not a local file to serve over TFTP")
            dest = tftp / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(artifact.path, dest)  # kernels and initramfs images are large: share the blocks
            except OSError:
                shutil.copyfile(artifact.path, dest)
            written.append(dest)
            log.info("pxe-config: %s -> %s (TFTP, for the signed GRUB)", artifact.path, dest)
    for path, name, package in sources.packages():
        if not path.is_file():
            raise ConfigError(f"[dhcp] loader = 'shim': {path} not found: install the Debian package {package}")
        try:
            signers = signature_signers(path)
        except KernelPackageError as e:
            raise ConfigError(f"[dhcp] loader = 'shim': {e}") from None
        if not signers:
            raise ConfigError(f"[dhcp] loader = 'shim': {path} has no Authenticode signature (sbverify --list)")
        shutil.copyfile(path, tftp / name)
        written.append(tftp / name)
        log.info("pxe-config: copied %s as %s (signed by %s)", path, name, "; ".join(signers))
    return written
