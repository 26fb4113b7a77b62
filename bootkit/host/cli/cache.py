"""``bootkit cache prepare DEVICE``: make a blank disk a bootkit local cache (``bootkit.host.cachedisk``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bootkit.host.cli import parse_size


def register(sub: Any) -> None:
    c = sub.add_parser("cache", help="local chunk cache disks (rd.qcow2.cache=)")
    csub = c.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    csub.required = True
    p = csub.add_parser(
        "prepare",
        help="make a blank disk (or disk image file) a bootkit cache: one GPT partition of bootkit's cache type, "
        "PARTLABEL bootkit-cache, ext4",
    )
    p.add_argument("device", type=Path, metavar="DEVICE", help="block device or disk image file")
    p.add_argument("--force", action="store_true",
                   help="wipe a disk that carries a partition table or filesystem (all its data is lost)")  # fmt: skip
    p.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                   help="create DEVICE as a disk image file of this size if it does not exist (e.g. 2G)")  # fmt: skip
    p.set_defaults(handler=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from bootkit.host.cachedisk import prepare

    done = prepare(args.device, force=args.force, size=args.size)
    print(f"{done.disk}: partition 1 at {done.offset}, {done.size} bytes: rd.qcow2.cache=PARTLABEL=bootkit-cache")
    return 0
