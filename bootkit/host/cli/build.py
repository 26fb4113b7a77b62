"""``bootkit image build`` (alias ``build-image``): a root tree, tar archive or OCI image to a bootable QCOW2 image."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bootkit.errors import UsageError
from bootkit.host.cli import parse_size

DESCRIPTION = (
    "Build NAME.qcow2 from a root tree: a GPT disk with one x86-64 root partition (Discoverable Partitions type)"
    " holding an ext4 file system made by mke2fs -d (no loop device, no mount), written with bootkit's QCOW2"
    " writer. SOURCE is a directory, a tar archive of one, an OCI image layout or a docker/podman save archive"
    " (layers applied in order). The tree's kernel is copied to NAME.vmlinuz and NAME.initrd is built with"
    " build-initrd. The same tree gives the same bytes."
)


def register(sub: Any) -> None:
    image = sub.add_parser("image", help="build images: bootkit image build SOURCE -o NAME.qcow2",
                           description="Image commands.")
    image_sub = image.add_subparsers(dest="image_command", metavar="COMMAND")
    image_sub.required = True
    _options(image_sub.add_parser(
        "build",
        help="build a bootable QCOW2 image (GPT, ext4 root) from a root tree, tar archive or OCI image",
        description=DESCRIPTION,
    ))
    # the first spelling, kept: the same options and code
    _options(sub.add_parser(
        "build-image",
        help="alias of 'bootkit image build'",
        description=DESCRIPTION + " Alias of 'bootkit image build'.",
    ))


def _options(p: Any) -> None:
    """The options of ``bootkit image build`` (and its alias ``build-image``), defined once."""
    p.add_argument("source", type=Path, metavar="SOURCE",
                   help="root tree: a directory, a .tar, .tar.gz, .tar.xz or .tar.zst archive, an OCI image"
                   " layout (directory or tar) or a docker-archive (docker save / podman save)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="NAME.qcow2",
                   help="image to write; NAME.vmlinuz and NAME.initrd go next to it")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which image of an OCI index or docker-archive (default: linux/amd64)")
    p.add_argument("--label", default="root", help="ext4 label and GPT partition name (default: root)")
    p.add_argument("--size", type=parse_size, metavar="SIZE",
                   help="file system size, e.g. 2G (default: the content plus --headroom)")
    p.add_argument("--headroom", type=parse_size, default=None, metavar="SIZE",
                   help="free space to leave when --size is not given (default: 256M)")
    p.add_argument("--compress", default="zstd", choices=("zstd", "deflate", "none"), help="default: zstd")
    p.add_argument("--cluster-size", type=parse_size, default=None, metavar="SIZE",
                   help="QCOW2 cluster size, 4K to 2M, a power of two (default: 64K; with --base: the base's)")
    p.add_argument("--base", type=Path, metavar="OLD.qcow2",
                   help="write an overlay on OLD (in the output's directory): only the clusters that differ;"
                   " OLD's identifiers and file-system size are kept")
    p.add_argument("--seed", metavar="TEXT",
                   help="seed for the file system UUID, hash seed and GPT GUIDs (default: the tree's digest)")
    p.add_argument("--keep-identity", action="store_true",
                   help="keep /etc/machine-id and the SSH host keys (default: emptied / removed)")
    p.add_argument("--no-kernel", dest="kernel", action="store_false",
                   help="only the image: no NAME.vmlinuz / NAME.initrd (for a tree without a kernel)")
    p.add_argument("--systemd", action="store_true", help="systemd initramfs (see build-initrd)")
    p.add_argument("--drivers", metavar="LIST",
                   help="NIC drivers for the initramfs, comma-separated (default: every network driver)")
    p.set_defaults(handler=_build_image)


def _epoch() -> int | None:
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if text is None:
        return None
    if not text.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={text[:40]!r}: not a number of seconds")
    return int(text)


def _build_image(args: argparse.Namespace) -> int:
    from bootkit.host.image.build import DEFAULT_HEADROOM, BuildOptions, build_image, describe
    from bootkit.host.image.oci import Platform
    from bootkit.qcow2.writer import Compression

    if args.size is not None and args.headroom is not None:
        raise UsageError("--size and --headroom contradict each other: give one")
    drivers = None
    if args.drivers is not None:
        drivers = tuple(d.strip() for d in args.drivers.split(",") if d.strip())
    if not args.kernel and (args.systemd or drivers is not None):
        raise UsageError("--systemd/--drivers are about the initramfs, which --no-kernel does not build")
    result = build_image(
        BuildOptions(
            source=args.source,
            output=args.output,
            label=args.label,
            size=args.size,
            headroom=DEFAULT_HEADROOM if args.headroom is None else args.headroom,
            compression=Compression(args.compress),
            cluster_size=args.cluster_size,
            seed=args.seed,
            keep_identity=args.keep_identity,
            kernel=args.kernel,
            drivers=drivers,
            systemd=args.systemd,
            epoch=_epoch(),
            platform=None if args.platform is None else Platform.parse(args.platform),
            base=args.base,
        )
    )
    print(describe(result))
    return 0
