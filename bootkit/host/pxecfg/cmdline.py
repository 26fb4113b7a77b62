"""The kernel command line of a boot entry: built here and nowhere else.

The iPXE script and every GRUB configuration print what :func:`kernel_args` returns, so the two bootloaders
always hand the kernel the same options. The ``rd.qcow2.*`` names are the contract with bootkit's dracut
module (which parses exactly these); the README lists them.
"""

from __future__ import annotations

from bootkit.host.pxecfg.model import Entry, Machine, Mode, Overlay

#: x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): longer lines are cut by the kernel
MAX_CMDLINE = 2048


def kernel_args(entry: Entry, machine: Machine | None = None, *, initrd_name: str | None = None) -> tuple[str, ...]:
    """The kernel arguments of ``entry`` as ``machine`` boots it, one string per argument.

    ``initrd_name`` adds ``initrd=NAME`` first: iPXE on UEFI hands initrds to the kernel's EFI stub by that
    name (see ../shared/reference/netboot.md §6); GRUB passes initrds itself and leaves it out.
    """
    args: list[str] = []
    if initrd_name is not None:
        args.append(f"initrd={initrd_name}")
    args.append(f"root=qcow2:{entry.image.url}")
    if entry.sha256 is not None:
        args.append(f"rd.qcow2.sha256={entry.sha256}")
    elif entry.manifest is None:
        args.append("rd.qcow2.verify=sidecar")
    # else: lazy mode with a manifest; rd.qcow2.manifest-sha256 below pins it (verify=pinned is implied)
    if entry.mode is not Mode.ram:
        args.append(f"rd.qcow2.mode={entry.mode}")
    if entry.root is not None:
        args.append(f"rd.qcow2.root={entry.root}")
    overlay = str(entry.overlay)
    if entry.overlay is Overlay.tmpfs and entry.overlay_size is not None:
        overlay += f":size={entry.overlay_size}"
    args.append(f"rd.qcow2.overlay={overlay}")
    # The image itself is always read-only (a read-only NBD device); rw/ro is how the root is mounted on top
    # of it. With a tmpfs overlay the root is writable, so say so: without rw, dracut mounts it read-only and
    # systemd leaves a root that has no fstab entry as it found it.
    args.append("rw" if entry.overlay is Overlay.tmpfs else "ro")
    if entry.manifest is not None:
        args.append(f"rd.qcow2.manifest={entry.manifest.url}")
        args.append(f"rd.qcow2.manifest-sha256={entry.manifest_sha256}")
    if entry.snapshot is not None:
        args.append(f"rd.qcow2.snapshot={entry.snapshot}")
    args += ["ip=dhcp", "rd.neednet=1"]
    args += [f"console={c}" for c in entry.console]
    args += entry.args
    if machine is not None:
        args += machine.args
    return tuple(args)


def kernel_cmdline(entry: Entry, machine: Machine | None = None, *, initrd_name: str | None = None) -> str:
    """:func:`kernel_args` joined with spaces, as the kernel sees it."""
    return " ".join(kernel_args(entry, machine, initrd_name=initrd_name))
