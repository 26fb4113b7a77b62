"""``bootkit build-initrd``: an initramfs that boots ``root=qcow2:URL``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "build-initrd",
        help="build an initramfs that boots root=qcow2:URL (dracut + bootkit's module)",
        description="Build an initramfs with dracut and bootkit's dracut module: Python with just the "
        "standard library the boot code imports, bootkit's runtime, zstandard, and the kernel modules "
        "for NBD, the overlay, common filesystems and network drivers. Without --kver/--kmoddir, the "
        "current Debian bookworm kernel package is downloaded into the cache and used.",
    )
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="initramfs to write")
    p.add_argument("--kver", metavar="VER", help="kernel version (default: the cached Debian kernel)")
    p.add_argument("--kmoddir", type=Path, metavar="DIR", help="kernel modules, .../lib/modules/VER")
    p.add_argument("--signed-kernel", action="store_true",
                   help="Debian's signed kernel package (linux-image-VER, for shim under Secure Boot) instead of "
                   "the unsigned one; with --kmoddir: refuse unless the vmlinuz next to it is signed")
    flavour = p.add_mutually_exclusive_group()
    flavour.add_argument("--systemd", dest="systemd", action="store_true",
                         help="systemd initramfs, network through systemd-networkd")
    flavour.add_argument("--no-systemd", dest="systemd", action="store_false",
                         help="shell initramfs, network through network-legacy (default)")
    p.add_argument("--drivers", metavar="LIST",
                   help="comma-separated NIC drivers to include (default: every network driver), "
                   "e.g. virtio_net,e1000")
    p.add_argument("--dracut-arg", dest="dracut_args", action="append", default=[], metavar="ARG",
                   help="extra argument passed to dracut (repeatable); write --dracut-arg=--flag for a flag")
    p.add_argument("--trust-key", dest="trust_keys", action="append", default=[], type=Path, metavar="PUB",
                   help="Ed25519 public key (PEM, or the raw key in base64) whose signed channels the initramfs "
                   "boots with root=qcow2:channel:URL (repeatable: key rotation)")
    p.set_defaults(handler=_build_initrd, systemd=False)


def _build_initrd(args: argparse.Namespace) -> int:
    from bootkit.boot.cmdline import describe_contract
    from bootkit.host.initrd import InitrdOptions, build_initrd, describe, read_trust_key

    drivers = None
    if args.drivers is not None:
        drivers = tuple(d.strip() for d in args.drivers.split(",") if d.strip())
    result = build_initrd(
        InitrdOptions(
            output=args.output,
            kver=args.kver,
            kmoddir=args.kmoddir,
            systemd=args.systemd,
            drivers=drivers,
            dracut_args=tuple(args.dracut_args),
            trust_keys=tuple(read_trust_key(p) for p in args.trust_keys),
            signed_kernel=args.signed_kernel,
        )
    )
    print(describe(result))
    print(describe_contract())
    if result.trust_keys:
        from bootkit.boot.ed25519 import fingerprint

        names = ", ".join(map(fingerprint, result.trust_keys))
        print(f"signed channels (root=qcow2:channel:) trusted from keys {names}")
    return 0
