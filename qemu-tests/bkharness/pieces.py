"""The bootkit pieces an end-to-end boot is made of, called the way a user calls them.

Kernel: ``bootkit.host.kernelpkg.ensure_kernel`` (a Debian kernel package unpacked into the cache). Initramfs:
``bootkit build-initrd``. Boot configuration: ``bootkit pxe-config``. Each runs as a separate
``python -m bootkit`` process, exactly like the README tells a user. A piece that does not exist yet raises
:class:`MissingPiece`, which the tests turn into a skip naming it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from bootkit.run import run


class MissingPiece(Exception):
    """A part of bootkit the test needs is not there (yet); the message names it."""


@cache
def bootkit_commands() -> frozenset[str]:
    """The subcommands ``python -m bootkit`` offers right now."""
    from bootkit.host.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return frozenset(action.choices)
    return frozenset()


def require_command(name: str) -> None:
    if name not in bootkit_commands():
        raise MissingPiece(f"'bootkit {name}' does not exist yet")


def bootkit(*args: str | Path, timeout: float = 900) -> str:
    """Run ``python -m bootkit ARGS``; return its stdout (its stderr is in the failure message)."""
    proc = run([sys.executable, "-m", "bootkit", *args], capture=True, timeout=timeout)
    return proc.stdout.decode()


def kernel() -> Any:
    """The cached Debian kernel (``bootkit.host.kernelpkg.Kernel``: kver, vmlinuz, kmoddir), fetched if needed."""
    try:
        kernelpkg = importlib.import_module("bootkit.host.kernelpkg")
    except ModuleNotFoundError as e:
        raise MissingPiece("bootkit.host.kernelpkg (the kernel cache, issue 5)") from e
    return kernelpkg.ensure_kernel()


def signed_kernel() -> Any:
    """The same Debian kernel from its signed package (``linux-image-<kver>``: vmlinuz signed for shim), fetched if
    needed; its signature is checked with ``sbverify --list`` when it is unpacked."""
    kernelpkg = importlib.import_module("bootkit.host.kernelpkg")
    return kernelpkg.ensure_kernel(flavour=kernelpkg.Flavour.signed)


def initrd(out: Path, *, systemd: bool, drivers: Sequence[str] = ("virtio_net",),
           extra: Sequence[str] = ()) -> Path:
    """``bootkit build-initrd -o OUT`` for the cached kernel: a systemd or a shell (network-legacy) initramfs.

    ``drivers`` trims the network drivers to what the test guests have (virtio-net), as a user building
    for VMs would; empty, the build is the default one (every NIC driver). ``extra`` are passed to dracut.
    Cached by the caller for the whole run.
    """
    require_command("build-initrd")
    k = kernel()
    args: list[str | Path] = [
        "build-initrd",
        "-o", out,
        "--kver", k.kver,
        "--kmoddir", k.kmoddir,
        "--systemd" if systemd else "--no-systemd",
    ]  # fmt: skip
    if drivers:
        args += ["--drivers", ",".join(drivers)]
    for a in extra:
        args += ["--dracut-arg", a]
    bootkit(*args)
    if not out.exists():
        raise MissingPiece(f"bootkit build-initrd wrote no {out}")
    return out


def pxe_tree(
    out: Path,
    *,
    base_url: str,
    docroot: Path,
    kernel_name: str = "vmlinuz",
    initrd_name: str = "initrd.img",
    image_name: str = "disk.qcow2",
    sha256: str = "compute",
    grub: bool = False,
    kernel_args: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> Path:
    """``bootkit pxe-config --out OUT`` from flags alone (the single-image case); returns the TFTP root.

    The entry boots at once (menu timeout 0) with the serial console; ``kernel_args`` are added to the
    kernel line after GUEST_BOOT_ARGS. With ``grub``, GRUB's netboot images are made too.
    """
    require_command("pxe-config")
    args: list[str | Path] = [
        "pxe-config",
        "--out", out,
        "--base-url", base_url,
        "--docroot", docroot,
        "--timeout", "0",
        "--bootloaders", "ipxe",
        "--kernel", kernel_name,
        "--initrd", initrd_name,
        "--image", image_name,
        "--sha256", sha256,
        "--console", "ttyS0,115200",
        "--grub-serial-speed", "115200",
    ]  # fmt: skip
    if grub:
        args += ["--bootloaders", "grub"]
    else:
        args.append("--no-grub-images")
    for a in (*GUEST_BOOT_ARGS, *kernel_args):
        args += ["--args", a]
    bootkit(*args, *extra)
    return out / "tftp"


#: on every test guest's kernel line: a panic ends the run (QEMU runs with -no-reboot), a failed boot
#: powers off instead of waiting in dracut's emergency shell, and the root is mounted read-write ("rw", as
#: dracut's own network-root tests do): without it the overlay is mounted read-only and only an fstab entry
#: for / would make systemd remount it (systemd-remount-fs leaves a root without one alone)
GUEST_BOOT_ARGS = ("rw", "panic=-1", "rd.shell=0", "rd.emergency=poweroff")


def require_boot_code() -> None:
    """The initramfs side of bootkit must exist for a netboot test to mean anything."""
    for module, what in (
        ("bootkit.boot.main", "the initramfs boot code bootkit.boot.main (issue 5)"),
        ("bootkit.nbd.kernel", "the NBD kernel attach bootkit.nbd.kernel"),
        ("bootkit.qcow2.image", "the QCOW2 reader bootkit.qcow2"),
        ("bootkit.fetch", "the HTTP fetcher bootkit.fetch"),
    ):
        if importlib.util.find_spec(module) is None:
            raise MissingPiece(what)
