"""The kernel command line of a boot entry: built here and nowhere else.

The iPXE script and every GRUB configuration print what :func:`kernel_args` returns, so the two bootloaders
always hand the kernel the same options. The ``rd.qcow2.*`` part is the command-line contract with bootkit's
initramfs, owned by :mod:`bootkit.boot.cmdline`: an entry becomes a :class:`~bootkit.boot.cmdline.BootConfig`
(:func:`boot_config`) whose ``to_args()`` writes exactly what the initramfs parses back.
"""

from __future__ import annotations

from bootkit.boot.cmdline import BootConfig, Loader, OverlayKind, Verify, join_args
from bootkit.host.pxecfg.model import Entry, Machine, Network

#: x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): longer lines are cut by the kernel
MAX_CMDLINE = 2048


def network(entry: Entry, machine: Machine | None = None) -> Network:
    """The network ``machine`` boots ``entry`` with: the machine's keys over the entry's (over the top's ``ip``)."""
    return entry.network if machine is None else machine.network.over(entry.network)


def boot_config(entry: Entry, machine: Machine | None = None) -> BootConfig:
    """What the initramfs is asked for when ``machine`` (None: any machine) boots ``entry``."""
    return BootConfig(
        url=entry.image.url,
        sha256=entry.sha256,
        # lazy mode with a manifest: rd.qcow2.manifest-sha256 pins it; without a hash, the .sha256 sidecar
        verify=Verify.pinned if entry.sha256 is not None or entry.manifest_sha256 is not None else Verify.sidecar,
        mode=entry.mode,
        root=entry.root,
        overlay=entry.overlay,
        manifest=None if entry.manifest is None else entry.manifest.url,
        manifest_sha256=entry.manifest_sha256,
        snapshot=entry.snapshot,
        # With a tmpfs overlay the root is writable, so say so: without rw, dracut mounts it read-only and
        # systemd leaves a root that has no fstab entry as it found it.
        rw=entry.overlay.kind is OverlayKind.tmpfs,
        # dracut's ip=, vlan=, bond= (bootkit/host/pxecfg/network.py): plain ip=dhcp without VLAN or bond
        network=network(entry, machine).args(),
    )


def kernel_args(
    entry: Entry, machine: Machine | None = None, *, initrd_name: str | None = None, loader: Loader | None = None
) -> tuple[str, ...]:
    """The kernel arguments of ``entry`` as ``machine`` boots it, one string per argument.

    ``initrd_name`` adds ``initrd=NAME`` first: iPXE on UEFI hands initrds to the kernel's EFI stub by that
    name (docs/pxe.md, "iPXE facts"); GRUB passes initrds itself and leaves it out. ``loader``
    renders values the boot loader fills in (none yet: the network part is ``ip=dhcp``).
    """
    args: list[str] = []
    if initrd_name is not None:
        args.append(f"initrd={initrd_name}")
    args += boot_config(entry, machine).to_args(loader)
    args += [f"console={c}" for c in entry.console]
    args += entry.args
    if machine is not None:
        args += machine.args
    return tuple(args)


def kernel_cmdline(entry: Entry, machine: Machine | None = None, *, initrd_name: str | None = None) -> str:
    """:func:`kernel_args` as the kernel sees the line."""
    return join_args(kernel_args(entry, machine, initrd_name=initrd_name))
