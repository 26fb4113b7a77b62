"""``bootkit inspect | map | convert | check | compress``: the QCOW2 reader and writer from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from bootkit.errors import UsageError
from bootkit.log import human_size, log


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="show what a QCOW2 image contains (like qemu-img info)")
    _image_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=inspect)

    p = sub.add_parser("map", help="guest-to-host extent map (like qemu-img map)")
    _image_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--offset", type=_size, metavar="N", help="only say where guest byte N lives")
    p.set_defaults(handler=map_)

    p = sub.add_parser("convert", help="decode an image to a raw disk (sparse where the image has holes)")
    _image_args(p)
    p.add_argument("output", metavar="OUTPUT", help="raw output file, or - for standard output")
    p.add_argument("--threads", type=int, metavar="N", help="decoding threads (default: one per core, at most 8)")
    p.set_defaults(handler=convert)

    p = sub.add_parser("check", help="decode every allocated cluster and report each bad one")
    _image_args(p)
    p.add_argument("--threads", type=int, metavar="N", help="decoding threads (default: one per core, at most 8)")
    p.set_defaults(handler=check)

    p = sub.add_parser("compress", help="write a raw disk as a compressed QCOW2 image (like qemu-img convert -c)")
    p.add_argument("raw", metavar="RAW", help="raw disk image (holes of a sparse file are skipped unread)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="QCOW2 image to write (replaced atomically)")
    p.add_argument("--compress", default="zstd", choices=("zstd", "deflate", "none"), help="default: zstd")
    p.add_argument("--cluster-size", type=_cluster_size, default=65536, metavar="SIZE",
                   help="4K to 2M, a power of two (default: 64K)")
    p.add_argument("--level", type=int, metavar="N",
                   help="compression level (default: zstd 2; deflate 2 with libdeflate, else zlib 6)")
    p.add_argument("--threads", type=int, metavar="N", help="compressing threads (default: one per core)")
    p.add_argument("--base", metavar="OLD", help="backing QCOW2 image of the same size: write only what differs")
    p.add_argument("--base-name", metavar="NAME",
                   help="backing file name to record (default: OLD relative to OUT's directory)")
    p.set_defaults(handler=compress)


def _cluster_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20}
    suffix = text[-1:].upper() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(suffix)]
    if suffix not in units or not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 2M)")
    return int(number) * units[suffix]


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="QCOW2 image file")
    p.add_argument("--snapshot", metavar="NAME", help="read the disk as of this internal snapshot (name or id)")
    p.add_argument("--backing", metavar="PATH", help="backing file of IMAGE (overrides the name in the image)")
    p.add_argument("--no-backing", action="store_true", help="ignore the backing file: unallocated reads as zeros")
    p.add_argument("--data-file", metavar="PATH", help="external data file of IMAGE")
    p.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also follow backing/data file names that point into DIR or below it (default: only files right"
        " next to the image)",
    )


def _size(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte offset: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative offset: {text}")
    return value


def _open(args: argparse.Namespace) -> Any:
    from bootkit import qcow2

    if args.backing and args.no_backing:
        raise UsageError("--backing and --no-backing contradict each other")
    backing: Any = False if args.no_backing else args.backing
    return qcow2.open(
        args.image,
        snapshot=args.snapshot,
        backing=backing,
        data_file=args.data_file,
        allow_dirs=tuple(args.allow_dir),
    )


# -- inspect -----------------------------------------------------------------------------------------------


def describe(image: Any) -> dict[str, Any]:
    """Everything ``inspect`` reports, as plain data."""
    from bootkit import qcow2
    from bootkit.qcow2.header import CRYPT_NAMES, EXTENSION_NAMES

    h = image.header
    info = image.info
    counts = {qcow2.DATA: 0, qcow2.COMPRESSED: 0, qcow2.ZERO: 0, qcow2.UNALLOCATED: 0}
    compressed_bytes = 0
    for ext in image.extents():
        if ext.depth == 0:
            counts[ext.kind] += ext.length
            compressed_bytes += ext.compressed_size
        else:
            counts[qcow2.UNALLOCATED] += ext.length
    chain = []
    for layer in image.chain():
        if isinstance(layer, qcow2.Image):
            chain.append({"filename": layer.name, "format": "qcow2", "virtual-size": layer.virtual_size})
        else:
            chain.append({"filename": layer.name, "format": "raw", "virtual-size": layer.size})
    return {
        "filename": image.name,
        "format": "qcow2",
        "version": h.version,
        "compat": "1.1" if h.version == 3 else "0.10",
        "virtual-size": image.virtual_size,
        "file-size": image.source.size,
        "cluster-size": image.cluster_size,
        "compression-type": image.compression,
        "extended-l2": image.extended_l2,
        "refcount-bits": 1 << h.refcount_order,
        "encryption": CRYPT_NAMES.get(h.crypt_method, str(h.crypt_method)),
        "features": {
            "incompatible": info.feature_list(0, h.incompatible_features),
            "compatible": info.feature_list(1, h.compatible_features),
            "autoclear": info.feature_list(2, h.autoclear_features),
        },
        "dirty": bool(h.incompatible_features & 1),
        "corrupt": bool(h.incompatible_features & 2),
        "backing-file": info.backing_file,
        "backing-format": info.backing_format,
        "data-file": info.data_file,
        "header-extensions": [EXTENSION_NAMES.get(e.type, f"{e.type:#x}") for e in info.extensions],
        "backing-chain": chain,
        "snapshot": None if image.snapshot is None else image.snapshot.id,
        "snapshots": [
            {
                "id": s.id,
                "name": s.name,
                "disk-size": s.disk_size,
                "vm-state-size": s.vm_state_size,
                "date-sec": s.date_sec,
                "date-nsec": s.date_nsec,
                "vm-clock-nsec": s.vm_clock_nsec,
            }
            for s in image.snapshots
        ],
        "allocation": {
            "data": counts[qcow2.DATA],
            "compressed": counts[qcow2.COMPRESSED],
            "compressed-bytes": compressed_bytes,
            "zero": counts[qcow2.ZERO],
            "unallocated": counts[qcow2.UNALLOCATED],
        },
    }


def inspect(args: argparse.Namespace) -> int:
    with _open(args) as image:
        d = describe(image)
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    out = [
        f"image: {d['filename']}",
        f"file format: qcow2 (version {d['version']}, compat {d['compat']})",
        f"virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)",
        f"file size: {human_size(d['file-size'])} ({d['file-size']} bytes)",
        f"cluster size: {d['cluster-size']}",
        f"compression type: {d['compression-type']}",
        f"extended l2: {'yes' if d['extended-l2'] else 'no'}",
        f"refcount bits: {d['refcount-bits']}",
        f"encryption: {d['encryption']}",
    ]
    for kind in ("incompatible", "compatible", "autoclear"):
        out.append(f"{kind} features: {', '.join(d['features'][kind]) or 'none'}")
    if d["backing-file"]:
        fmt = d["backing-format"] or "not recorded; probed"
        out.append(f"backing file: {d['backing-file']} (format: {fmt})")
    if d["data-file"]:
        out.append(f"data file: {d['data-file']}")
    if len(d["backing-chain"]) > 1:
        out.append("backing chain: " + " -> ".join(f"{c['filename']} ({c['format']})" for c in d["backing-chain"]))
    if d["snapshots"]:
        out.append("snapshots:")
        out.append(f"  {'ID':<6}{'TAG':<24}{'DISK SIZE':>14}{'VM SIZE':>12}  DATE")
        for s in d["snapshots"]:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
            out.append(f"  {s['id']:<6}{s['name']:<24}{human_size(s['disk-size']):>14}"
                       f"{human_size(s['vm-state-size']):>12}  {date}")
    a = d["allocation"]
    out.append(
        f"allocation: data {human_size(a['data'])}, compressed {human_size(a['compressed'])} "
        f"(stored in {human_size(a['compressed-bytes'])}), zero {human_size(a['zero'])}, "
        f"unallocated {human_size(a['unallocated'])}"
    )
    sys.stdout.write("\n".join(out) + "\n")
    return 0


# -- map ---------------------------------------------------------------------------------------------------


def _extent_dict(ext: Any) -> dict[str, Any]:
    from bootkit import qcow2

    d: dict[str, Any] = {
        "start": ext.offset,
        "length": ext.length,
        "kind": ext.kind,
        "depth": ext.depth,
        "present": ext.kind != qcow2.UNALLOCATED,
        "zero": ext.kind in (qcow2.ZERO, qcow2.UNALLOCATED),
        "data": ext.kind in (qcow2.DATA, qcow2.COMPRESSED),
        "compressed": ext.kind == qcow2.COMPRESSED,
    }
    if ext.host_offset is not None:
        d["offset"] = ext.host_offset
    if ext.compressed_size:
        d["compressed-size"] = ext.compressed_size
    if ext.source is not None:
        d["filename"] = ext.source.name
    return d


def map_(args: argparse.Namespace) -> int:
    with _open(args) as image:
        if args.offset is not None:
            if args.offset >= image.virtual_size:
                raise UsageError(f"--offset {args.offset} is past the end of the disk ({image.virtual_size} bytes)")
            ext = next(image.extents(args.offset, 1))
            d = _extent_dict(ext)
            if args.json:
                json.dump(d, sys.stdout, indent=2)
                sys.stdout.write("\n")
                return 0
            where = {
                "data": "data cluster",
                "compressed": "compressed cluster",
                "zero": "zero cluster",
                "unallocated": "unallocated (reads as zeros)",
            }[ext.kind]
            line = f"guest offset {args.offset:#x}: {where}"
            if ext.host_offset is not None:
                host = ext.host_offset + (args.offset - ext.offset if ext.kind != "compressed" else 0)
                line += f" at host offset {host:#x}"
            if ext.compressed_size:
                line += f" ({ext.compressed_size} bytes compressed, {image.cluster_size} decoded)"
            if ext.source is not None:
                line += f" in {ext.source.name}"
            line += f" (depth {ext.depth})"
            sys.stdout.write(line + "\n")
            return 0
        rows = (_extent_dict(e) for e in image.extents())
        if args.json:
            sys.stdout.write("[" + ",\n".join(json.dumps(r) for r in rows) + "]\n")
            return 0
        sys.stdout.write(f"{'Offset':<20}{'Length':<20}{'Kind':<12}{'Depth':<6}{'Mapped to':<20}File\n")
        for r in rows:
            mapped = f"{r['offset']:#x}" if "offset" in r else "-"
            sys.stdout.write(
                f"{r['start']:<#20x}{r['length']:<#20x}{r['kind']:<12}{r['depth']:<6}{mapped:<20}"
                f"{r.get('filename', '-')}\n"
            )
    return 0


# -- convert and check -------------------------------------------------------------------------------------


def convert(args: argparse.Namespace) -> int:
    from bootkit.qcow2.convert import convert as do_convert

    with _open(args) as image:
        if args.output == "-":
            if sys.stdout.isatty():
                raise UsageError("refusing to write a disk image to a terminal; redirect standard output")
            sys.stdout.flush()
            stats = do_convert(image, sys.stdout.fileno(), threads=args.threads)
        else:
            if os.path.exists(args.output) and os.path.samefile(args.output, args.image):
                raise UsageError(f"output {args.output} is the input image")
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                stats = do_convert(image, fd, threads=args.threads)
            finally:
                os.close(fd)
    log.info(
        "converted %s: %s copied, %s decompressed, %s of holes",
        args.image,
        human_size(stats.copied),
        human_size(stats.decoded),
        human_size(stats.holes),
    )
    return 0


def check(args: argparse.Namespace) -> int:
    from bootkit.qcow2.check import CheckResult
    from bootkit.qcow2.check import check as do_check

    problems = 0
    stats: list[CheckResult] = []
    with _open(args) as image:
        for problem in do_check(image, threads=args.threads, stats=stats):
            problems += 1
            sys.stdout.write(f"{problem}\n")
    clusters = sum(s.clusters_checked for s in stats)
    compressed = sum(s.compressed_checked for s in stats)
    if problems:
        sys.stderr.write(f"error: {args.image}: {problems} bad cluster(s) or table(s) found\n")
        return 1
    sys.stdout.write(f"{args.image}: no problems found ({clusters} allocated clusters, {compressed} compressed, "
                     "all decoded)\n")
    return 0


# -- compress ----------------------------------------------------------------------------------------------


class _CompressMeter:
    """A progress line on stderr every ``interval`` seconds: clusters done, input MiB/s, output so far."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last = time.monotonic()

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        log.info(
            "compress: %d of %d clusters (%d%%), read %s at %.0f MiB/s, wrote %s",
            p.clusters_done,
            p.clusters_total,
            100 * p.clusters_done // max(p.clusters_total, 1),
            human_size(p.bytes_read),
            p.bytes_read / max(p.seconds, 1e-9) / (1 << 20),
            human_size(p.file_size),
        )


def compress(args: argparse.Namespace) -> int:
    from bootkit.qcow2.writer import write_qcow2

    r = write_qcow2(
        args.raw,
        args.output,
        compression=args.compress,
        cluster_size=args.cluster_size,
        level=args.level,
        threads=args.threads,
        backing=args.base,
        backing_name=args.base_name,
        progress=_CompressMeter(),
    )
    zero = f", {r.clusters_zero} zero" if args.base else ""
    same = f", {r.clusters_same} same as the base" if args.base else ""
    sys.stdout.write(
        f"{args.output}: {human_size(r.file_size)} ({r.file_size} bytes) for a {human_size(r.virtual_size)} disk, "
        f"{r.compression} ({r.encoder}), {r.cluster_size}-byte clusters: {r.clusters_compressed} compressed, "
        f"{r.clusters_uncompressed} uncompressed{zero}, {r.clusters_unallocated} unallocated{same}; "
        f"{r.seconds:.1f} s, {r.bytes_read / max(r.seconds, 1e-9) / (1 << 20):.0f} MiB/s read\n"
    )
    return 0
