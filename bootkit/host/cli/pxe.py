"""``bootkit pxe-config``: iPXE, GRUB and dnsmasq configuration from one description."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bootkit.errors import UsageError

# the setting tables are plain data: importing them keeps the CLI fast (jinja2 and requests load later)
from bootkit.host.pxecfg.settings import FLAG_SETTINGS, flag_dest, flag_name

DESCRIPTION = """\
Write the boot configuration for network-booting QCOW2 images: an iPXE script, GRUB network configs (plus
GRUB's netboot images via grub-mknetdir when installed) and a dnsmasq configuration, all from one TOML
description, or from flags alone for a single image. See the README section "PXE configuration".
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pxe-config",
        help="generate iPXE/GRUB/dnsmasq boot configuration",
        description=DESCRIPTION,
    )
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG", help="TOML description (see examples/pxe.toml)")
    p.add_argument("-o", "--out", type=Path, metavar="DIR", help="output directory (created if needed)")
    p.add_argument(
        "--check",
        action="store_true",
        help="verify over HTTP that every URL answers, sizes match and pinned hashes match the served bytes, and "
        "that each initramfs knows every rd.qcow2 option its entries pass (with --out: nothing is written if not)",
    )
    p.add_argument(
        "--no-grub-images",
        action="store_true",
        help="write grub.cfg files but do not run grub-mknetdir",
    )
    flags = p.add_argument_group("single-image description (instead of CONFIG)")
    for table, setting in FLAG_SETTINGS:
        kwargs: dict[str, Any] = {"dest": flag_dest(table, setting), "metavar": setting.metavar, "help": setting.help}
        if setting.kind == "list":
            kwargs["action"] = "append"
        elif setting.kind == "int":
            kwargs["type"] = int
        flags.add_argument(flag_name(table, setting), *setting.aliases, **kwargs)
    p.set_defaults(handler=pxe_config)


def pxe_config(args: argparse.Namespace) -> int:
    from bootkit.host.pxecfg import load, output
    from bootkit.log import log

    flag_values = {flag_dest(t, s): getattr(args, flag_dest(t, s)) for t, s in FLAG_SETTINGS}
    given = [flag_name(t, s) for t, s in FLAG_SETTINGS if flag_values[flag_dest(t, s)] not in (None, [])]
    if args.config is not None:
        if given:
            raise UsageError(f"{given[0]}: describe the boot in {args.config} or with flags, not both")
        config = load.load_file(args.config)
    elif given:
        config = load.from_flags(flag_values)
    else:
        raise UsageError("pxe-config: give a CONFIG file, or --kernel, --initrd and --image (see --help)")
    if args.out is None and not args.check:
        raise UsageError("pxe-config: give --out DIR (and/or --check)")

    initrd_problems: list[str] = []
    if args.check:
        from bootkit.host.pxecfg.check import check_initrds

        # an initramfs that does not know an option would stop the boot: refuse to write such a configuration
        initrd_problems = check_initrds(config)
        if initrd_problems and args.out is not None:
            for line in initrd_problems:
                print(line)
            log.error("check: %d problem%s with the initramfs images: nothing written to %s", len(initrd_problems),
                      "" if len(initrd_problems) == 1 else "s", args.out)  # fmt: skip
            return 1
    if args.out is not None:
        written = output.write(config, args.out, grub_images=not args.no_grub_images)
        log.info("pxe-config: %d files in %s", len(written), args.out)
    if args.check:
        from bootkit.host.pxecfg.check import check

        problems = initrd_problems + check(config)
        for line in problems:
            print(line)
        if problems:
            log.error("check: %d problem%s", len(problems), "" if len(problems) == 1 else "s")
            return 1
        log.info("check: every URL answered as described")
    return 0
