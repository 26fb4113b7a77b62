"""``bootkit publish``: an image with its kernel and initramfs into a docroot, and its pxe-config entry."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from bootkit.errors import UsageError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_duration(text: str) -> float:
    """``--grace``: seconds, or a number with s, m, h or d."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90m, 12h or 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "publish",
        help="copy an image, its kernel and initramfs into a docroot under content-addressed names",
        description="Publish NAME.qcow2 (and NAME.vmlinuz, NAME.initrd next to it) into DOCROOT as "
        "NAME-<sha256 prefix>.qcow2 etc., never replacing a file a machine may be reading, with .sha256 "
        "sidecars and the lazy-mode manifest; with --toml, write the [[entry]] pxe-config boots it from.",
    )
    p.add_argument("image", type=Path, metavar="NAME.qcow2", help="image to publish (from bootkit build-image)")
    p.add_argument("docroot", type=Path, metavar="DOCROOT", help="directory the web server serves (stays flat)")
    p.add_argument("--name", metavar="NAME", help="name of the published files (default: --entry, else the"
                   " image's stem)")
    p.add_argument("--toml", type=Path, metavar="FILE", help="pxe-config description to write the entry into")
    p.add_argument("--entry", metavar="NAME", help="the [[entry]] to write (default: NAME)")
    p.add_argument("--mode", choices=("lazy", "stream", "ram"),
                   help="the entry's boot mode (default: the entry's current mode, else lazy)")
    p.add_argument("--base-url", metavar="URL", help="creating --toml: the URL DOCROOT is served at")
    p.add_argument("--prune", type=int, metavar="N", help="remove versions of NAME beyond the newest N that no"
                   " entry references and that have been unreferenced for --grace")
    p.add_argument("--grace", type=parse_duration, default=None, metavar="TIME",
                   help="how long a version stays after its last reference went (default: 1d)")
    p.add_argument("--sign", type=Path, metavar="KEY", help="Ed25519 private key (openssl genpkey -algorithm "
                   "ed25519): also write DOCROOT/CHANNEL.json pointing at the image, and its signature "
                   "CHANNEL.json.sig, for machines booting root=qcow2:channel:URL")
    p.add_argument("--channel", metavar="CHANNEL", help="with --sign: the channel's name (default: NAME)")
    p.add_argument("--valid-for", type=parse_duration, default=None, metavar="TIME",
                   help="with --sign: how long this channel version is valid (default: 30d)")
    p.add_argument("--channel-version", type=int, metavar="N",
                   help="with --sign: the version to write (default: the current one + 1); never lower")
    p.set_defaults(handler=_publish)


def _publish(args: argparse.Namespace) -> int:
    from bootkit.host.publish import prune
    from bootkit.host.publish.publish import PublishOptions, publish

    if args.grace is not None and args.prune is None:
        raise UsageError("--grace is about --prune")
    channel = None
    if args.sign is not None:
        from bootkit.host.publish.channel import DEFAULT_VALID_FOR, ChannelOptions

        channel = ChannelOptions(
            key=args.sign,
            name=args.channel or args.name or args.entry or args.image.name.removesuffix(".qcow2"),
            valid_for=DEFAULT_VALID_FOR if args.valid_for is None else args.valid_for,
            version=args.channel_version,
        )
    else:
        for flag, value in (("--channel", args.channel), ("--valid-for", args.valid_for),
                            ("--channel-version", args.channel_version)):  # fmt: skip
            if value is not None:
                raise UsageError(f"{flag} is about --sign (the signed channel)")
    opts = PublishOptions(
        image=args.image,
        docroot=args.docroot,
        name=args.name,
        toml=args.toml,
        entry=args.entry,
        mode=args.mode,
        base_url=args.base_url,
        prune_keep=args.prune,
        grace=prune.DEFAULT_GRACE if args.grace is None else args.grace,
        channel=channel,
    )
    result = publish(opts)
    for line in result.lines(args.toml):
        print(line)
    return 0
