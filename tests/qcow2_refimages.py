"""Reference images made by the real tools (qemu-img, qemu-io), and what QEMU says about them.

The QCOW2 tests compare bootkit's reader with QEMU on images QEMU itself wrote: the guest bytes with
``qemu-img convert -O raw``, the mapping with ``qemu-img map --output=json``. This module holds the small
vocabulary those tests share: running the tools, patching header fields of a real image (hostile cases), and
turning both ``qemu-img map`` rows and ``Image.extents()`` into one comparable form.

How ``qemu-img map`` (QEMU 7.2, qemu-img.c get_block_status + block/io.c bdrv_co_block_status) reports a
chain, found by experiment (tests/test_qcow2_reference.py pins every rule below):

- ``depth`` is the index of the layer that answered. A layer answers when its block status says DATA or ZERO;
  an unallocated layer passes the question down. The bottom layer of a chain, and any layer asked past the
  end of its (shorter) backing file, answers ZERO without being "present": so an area unallocated all the way
  down reports the depth of the *last* layer asked, ``present: false, zero: true``.
- qcow2 data clusters: ``data: true`` with ``offset`` (host offset, in the external data file if any);
  compressed clusters: ``data: true`` without ``offset``; zero clusters: ``zero: true, present: true``, with
  ``offset`` only if the cluster keeps its allocation (written with ``write -z`` without ``-u``).
- raw layers: SEEK_DATA/SEEK_HOLE: data with ``offset`` = guest offset, holes ``zero: true`` with ``offset``.
- extended L2: an unallocated subcluster of an allocated cluster reports the cluster's host ``offset`` when
  nothing lies below (``present: false``). bootkit's ``Extent`` keeps no host offset for unallocated areas
  (nothing is read from there), so the normal form drops ``offset`` on rows that are not present.

bootkit's ``Extent.depth`` is the level that answered; for ``unallocated`` and for the zeros past a shorter
backing file (``kind == "zero"``, ``source is None``) it is one past the last layer asked, hence ``depth - 1``
in the normal form.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

from bootkit.qcow2 import COMPRESSED, DATA, UNALLOCATED, ZERO, Extent

QEMU_TIMEOUT = 120  # seconds; generous for a busy 2-core machine

KiB = 1024
MiB = 1024 * 1024

# Header field offsets (QCowHeader, block/qcow2.h), for patching real images field by field.
HEADER_FIELDS = {
    "magic": (0, ">4s"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}


def tool(
    *argv: str | os.PathLike[str], check: bool = True, cwd: Optional[Path] = None
) -> subprocess.CompletedProcess[str]:
    """Run qemu-img / qemu-io; a failure quotes the command and its output.

    Runs in the directory of the last image named (unless ``cwd`` says otherwise): QEMU resolves a relative
    external data file name against its working directory, bootkit against the image's directory.
    """
    args = [os.fspath(a) for a in argv]
    if cwd is None:
        cwd = next((a.parent for a in reversed(argv) if isinstance(a, Path)), None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def create(
    path: Path,
    size: int,
    *,
    fmt: str = "qcow2",
    cluster_size: Optional[int] = None,
    backing: Optional[Path | str] = None,
    backing_fmt: Optional[str] = None,
    options: Sequence[str] = (),
) -> Path:
    """``qemu-img create``, in the image's directory (where a relative data_file= name is created)."""
    cmd: list[str | os.PathLike[str]] = ["qemu-img", "create", "-q", "-f", fmt]
    opts = list(options)
    if cluster_size is not None:
        opts.append(f"cluster_size={cluster_size}")
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing is not None:
        cmd += ["-b", os.fspath(backing), "-F", backing_fmt or "qcow2"]
    cmd += [path, str(size)]
    tool(*cmd)
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2", read_only: bool = False) -> str:
    """Run qemu-io commands (``write -P 0x5a 0 64k``, ``write -z ...``, ``discard ...``) on an image."""
    cmd: list[str | os.PathLike[str]] = ["qemu-io", "-f", fmt]
    if read_only:
        cmd.append("-r")
    for c in commands:
        cmd += ["-c", c]
    proc = tool(*cmd, path)
    out = proc.stdout + proc.stderr
    if "failed" in out or "error" in out.lower():
        raise AssertionError(f"qemu-io {commands} on {path}: {out.strip()}")
    return out


def qemu_io_read_fails(path: Path, offset: int, length: int) -> bool:
    """Whether QEMU reports an error reading guest bytes [offset, offset+length) of ``path``."""
    proc = tool("qemu-io", "-r", "-f", "qcow2", "-c", f"read {offset} {length}", path, check=False)
    out = proc.stdout + proc.stderr
    return proc.returncode != 0 or "failed" in out


def convert(
    src: Path,
    *,
    options: Sequence[str] = (),
    fmt: str = "qcow2",
    compress: bool = False,
    dst: Path,
) -> Path:
    """``qemu-img convert`` a raw or qcow2 file into a qcow2 image (``-c`` compresses every cluster)."""
    cmd: list[str | os.PathLike[str]] = ["qemu-img", "convert", "-q", "-O", fmt]
    if compress:
        cmd.append("-c")
    if options:
        cmd += ["-o", ",".join(options)]
    tool(*cmd, src, dst)
    return dst


def qemu_raw(path: Path, *, snapshot_param: Optional[str] = None, fmt: str = "qcow2") -> bytes:
    """The guest disk as QEMU reads it: ``qemu-img convert -O raw`` (``-l snapshot.name=X``, ``-l ID_OR_NAME``)."""
    out = path.with_name(f"{path.name}.out.raw")
    cmd: list[str | os.PathLike[str]] = ["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw"]
    if snapshot_param is not None:
        cmd += ["-l", snapshot_param]
    tool(*cmd, path, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def virtual_size(path: Path) -> int:
    info = json.loads(tool("qemu-img", "info", "--output=json", path).stdout)
    return int(info["virtual-size"])


def snapshot_ids(path: Path) -> dict[str, str]:
    """Snapshot name -> id, as ``qemu-img info`` lists them."""
    info = json.loads(tool("qemu-img", "info", "--output=json", path).stdout)
    return {sn["name"]: sn["id"] for sn in info.get("snapshots", [])}


# --- patching real images, field by field ---------------------------------------------------------------


def read_field(path: Path, field: str) -> int:
    offset, fmt = HEADER_FIELDS[field]
    with open(path, "rb") as f:
        f.seek(offset)
        value = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    assert isinstance(value, int)
    return value


def poke(path: Path, offset: int, fmt: str, *values: object) -> None:
    """``struct.pack_into`` at a file offset (like iotests' poke_file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def poke_field(path: Path, field: str, value: object) -> None:
    offset, fmt = HEADER_FIELDS[field]
    poke(path, offset, fmt, value)


def peek(path: Path, offset: int, fmt: str) -> tuple[int, ...]:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def l1_entry_offset(path: Path, l1_index: int) -> int:
    return read_field(path, "l1_table_offset") + 8 * l1_index


def l2_table_offset(path: Path, l1_index: int = 0) -> int:
    """Host offset of the L2 table an L1 slot points to."""
    (entry,) = peek(path, l1_entry_offset(path, l1_index), ">Q")
    return entry & 0x00FFFFFFFFFFFE00


def l2_entry_offset(path: Path, guest_offset: int, *, extended: bool = False) -> int:
    """File offset of the L2 entry that maps ``guest_offset`` (its L2 table must exist)."""
    cluster_bits = read_field(path, "cluster_bits")
    l2_bits = cluster_bits - (4 if extended else 3)
    l1_index = guest_offset >> (cluster_bits + l2_bits)
    l2_index = (guest_offset >> cluster_bits) & ((1 << l2_bits) - 1)
    return l2_table_offset(path, l1_index) + l2_index * (16 if extended else 8)


def extensions(path: Path) -> list[tuple[int, int, int]]:
    """Header extensions of a v3 image as (type, file offset of the type field, length)."""
    header_length = read_field(path, "header_length")
    out = []
    with open(path, "rb") as f:
        f.seek(header_length)
        area = f.read(64 * KiB)
    pos = 0
    while pos + 8 <= len(area):
        ext_type, length = struct.unpack_from(">II", area, pos)
        if ext_type == 0:
            break
        out.append((ext_type, header_length + pos, length))
        pos += 8 + ((length + 7) & ~7)
    return out


def compressed_descriptor(cluster_bits: int, coffset: int, nb_csectors: int) -> int:
    """An L2 entry for a compressed cluster (docs/interop/qcow2.rst "Compressed Clusters Descriptor")."""
    csize_shift = 62 - (cluster_bits - 8)
    return (1 << 62) | ((nb_csectors - 1) << csize_shift) | coffset


def parse_compressed(cluster_bits: int, entry: int) -> tuple[int, int]:
    """(coffset, nb_csectors) of a compressed L2 entry."""
    csize_shift = 62 - (cluster_bits - 8)
    desc = entry & ((1 << 62) - 1)
    coffset = desc & ((1 << csize_shift) - 1)
    nb = ((desc >> csize_shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return coffset, nb


def append_payload(path: Path, payload: bytes) -> int:
    """Append ``payload`` at a sector boundary after the end of the file; returns its offset."""
    size = path.stat().st_size
    offset = (size + 511) & ~511
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)
        f.write(bytes(-len(payload) % 512))
    return offset


# --- qemu-img map and Image.extents() in one normal form ---------------------------------------------------


class MapRow(NamedTuple):
    """One ``qemu-img map --output=json`` row."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: Optional[int]


def merge(rows: Iterable[MapRow]) -> list[MapRow]:
    """Merge adjacent rows as qemu-img.c entry_mergeable does (same flags and depth, offsets contiguous)."""
    out: list[MapRow] = []
    for row in rows:
        if row.length == 0:
            continue
        if out:
            last = out[-1]
            same = (last.depth, last.present, last.zero, last.data) == (row.depth, row.present, row.zero, row.data)
            if same and last.start + last.length == row.start:
                if last.offset is None and row.offset is None:
                    out[-1] = last._replace(length=last.length + row.length)
                    continue
                if last.offset is not None and row.offset is not None and last.offset + last.length == row.offset:
                    out[-1] = last._replace(length=last.length + row.length)
                    continue
        out.append(row)
    return out


def _drop_offset_if_absent(row: MapRow) -> MapRow:
    return row if row.present else row._replace(offset=None)


def qemu_map(path: Path, fmt: str = "qcow2") -> list[MapRow]:
    """``qemu-img map --output=json`` in the normal form."""
    rows = json.loads(tool("qemu-img", "map", "-f", fmt, "--output=json", path).stdout)
    return merge(
        _drop_offset_if_absent(
            MapRow(r["start"], r["length"], r["depth"], r["present"], r["zero"], r["data"], r.get("offset"))
        )
        for r in rows
    )


def extent_row(e: Extent) -> MapRow:
    """What ``qemu-img map`` would print for one bootkit extent."""
    if e.kind == DATA:
        return MapRow(e.offset, e.length, e.depth, True, False, True, e.host_offset)
    if e.kind == COMPRESSED:
        return MapRow(e.offset, e.length, e.depth, True, False, True, None)
    if e.kind == ZERO and e.source is not None:
        return MapRow(e.offset, e.length, e.depth, True, True, False, e.host_offset)
    if e.kind in (ZERO, UNALLOCATED):  # nothing below answered: the last layer asked says "zero"
        return MapRow(e.offset, e.length, e.depth - 1, False, True, False, None)
    raise AssertionError(f"unknown extent kind {e.kind!r}")


def bootkit_map(extents: Iterable[Extent]) -> list[MapRow]:
    return merge(extent_row(e) for e in extents)


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, poorly compressible bytes (for expected contents written by tests themselves)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])
