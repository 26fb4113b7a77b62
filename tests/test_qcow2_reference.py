"""bootkit.qcow2 against QEMU on images QEMU wrote: every guest byte, and the extent map.

Each reference image is made by qemu-img/qemu-io at test time; the expected bytes are ``qemu-img convert -O
raw`` of it and the expected map is ``qemu-img map --output=json`` (normal form: tests/qcow2_refimages.py).
The images are a few MiB and built once per module.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from qcow2_refimages import (
    KiB,
    MapRow,
    MiB,
    bootkit_map,
    convert,
    create,
    merge,
    pattern,
    qemu_io,
    qemu_map,
    qemu_raw,
    read_field,
    snapshot_ids,
    tool,
    virtual_size,
)

import bootkit.qcow2
from bootkit.errors import InvalidImage
from bootkit.qcow2 import UnsafePath
from bootkit.source import BytesSource, FileSource

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io (Debian package qemu-utils) not installed")


class Case(NamedTuple):
    path: Path  # the top image (its backing files and data file lie next to it)


def _mixed_raw(path: Path, size: int = 4 * MiB) -> Path:
    """A sparse raw disk with text (compresses well), noise (does not), sector-sized bits and holes."""
    text = b"".join(f"line {i}: the quick brown fox jumps over the lazy dog\n".encode() for i in range(6000))
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(text[: 256 * KiB])
        f.seek(320 * KiB)
        f.write(pattern(1, 200 * KiB))  # crosses 64 KiB clusters, ends mid-cluster
        f.seek(1 * MiB + 512)
        f.write(pattern(2, 512))
        f.seek(2 * MiB - 4 * KiB)
        f.write(text[: 12 * KiB])  # crosses the 2 MiB boundary (one L2 table with 4 KiB clusters)
        f.seek(3 * MiB)
        f.write(b"\x5a" * (128 * KiB))  # a run of one byte value, not zeros
        f.seek(size - 4 * KiB)
        f.write(pattern(3, 4 * KiB))  # the last sector of the disk
    return path


# Writes that every cluster size sees: unaligned to the cluster, zero writes with and without unmap,
# a discard, a rewrite of part of a zeroed range.
_WRITES = (
    "write -P 0xa1 512 3k",
    "write -P 0xa2 100k 70k",
    "write -z 192k 64k",
    "write -z -u 1536k 512k",
    "discard 2560k 256k",
    "write -P 0xa3 2600k 8k",
    "write -P 0xa4 5m 1m",
    "write -z 5632k 128k",
)


def _build_plain(d: Path, cluster_size: int) -> Case:
    raw = _mixed_raw(d / f"plain-{cluster_size}.src")
    img = convert(raw, options=[f"cluster_size={cluster_size}"], dst=d / f"plain-{cluster_size}.qcow2")
    raw.unlink()
    ext = 8 * MiB if cluster_size == 2 * MiB else 6 * MiB
    tool("qemu-img", "resize", "-q", img, str(ext))
    qemu_io(img, *_WRITES)
    return Case(img)


def _build_compressed(d: Path, kind: str, cluster_size: int) -> Case:
    raw = _mixed_raw(d / f"{kind}-{cluster_size}.src")
    options = [f"cluster_size={cluster_size}"]
    if kind == "zstd":
        options.append("compression_type=zstd")
    img = convert(raw, options=options, compress=True, dst=d / f"{kind}-{cluster_size}.qcow2")
    raw.unlink()
    # grow the disk by 6 clusters, then: compressed writes into the existing image (whole clusters only),
    # a normal write of part of a cluster and a zero write; the last cluster stays unallocated
    c = cluster_size
    base = 4 * MiB
    tool("qemu-img", "resize", "-q", img, str(base + 6 * c))
    qemu_io(
        img,
        f"write -c -P 0x6b {base} {c}",
        f"write -c -P 0x00 {base + c} {c}",
        f"write -c -P 0x6c {base + 2 * c} {c}",
        f"write -P 0x6d {base + 3 * c} {max(c // 2, 512)}",
        f"write -z {base + 4 * c} {c}",
    )
    return Case(img)


def _build_extl2(d: Path) -> Case:
    img = create(d / "extl2.qcow2", 4 * MiB, cluster_size=64 * KiB, options=["extended_l2=on"])
    qemu_io(
        img,
        "write -P 0x31 2k 4k",  # subclusters 1-2 of cluster 0
        "write -z 8k 2k",  # a zero subcluster in an allocated cluster
        "write -P 0x32 126k 4k",  # last subcluster of cluster 1, first of cluster 2
        "write -z -u 256k 6k",  # zero subclusters in an unallocated cluster
        "write -c -P 0x33 512k 64k",  # compressed cluster (bitmap reserved)
        "write -P 0x34 1m 64k",
        "write -z 1m 2k",
        "discard 1028k 2k",
    )
    return Case(img)


def _build_extl2_2m(d: Path) -> Case:
    """2 MiB clusters: 64 KiB subclusters, and one L2 table covering 256 GiB of an 8 MiB disk."""
    img = create(d / "extl2-2m.qcow2", 8 * MiB, cluster_size=2 * MiB, options=["extended_l2=on"])
    qemu_io(
        img,
        "write -P 0x35 64k 64k",
        "write -P 0x36 1984k 128k",  # last subcluster of cluster 0, first of cluster 1
        "write -z 2176k 192k",
        "write -c -P 0x37 4m 2m",
        "write -z -u 6m 64k",
    )
    return Case(img)


def _build_extl2_backed(d: Path) -> Case:
    base = create(d / "extl2-base.qcow2", 2 * MiB, cluster_size=64 * KiB)
    qemu_io(base, "write -P 0x41 0 2m")
    img = create(d / "extl2-top.qcow2", 3 * MiB, cluster_size=64 * KiB, backing=base, options=["extended_l2=on"])
    qemu_io(
        img,
        "write -P 0x42 2k 2k",  # the rest of cluster 0 comes from the base (unallocated subclusters)
        "write -z 70k 4k",
        "write -z -u 200k 2k",
        "write -P 0x43 1984k 128k",  # straddles the end of the shorter base
    )
    return Case(img)


def _build_v2(d: Path) -> Case:
    img = create(d / "v2.qcow2", 4 * MiB, options=["compat=0.10"])
    qemu_io(
        img,
        "write -P 0x51 0 200k",
        "write -z 64k 64k",
        "write -c -P 0x52 256k 64k",
        "write -P 0x53 1m 4k",
        "discard 0 64k",
    )
    return Case(img)


def _build_amended_v2(d: Path) -> Case:
    """A v3 image with zero clusters downgraded by ``qemu-img amend -o compat=0.10`` (zero flags expanded)."""
    base = create(d / "amend-base.qcow2", 2 * MiB)
    qemu_io(base, "write -P 0x55 0 2m")
    img = create(d / "amended.qcow2", 2 * MiB, backing=base.name)
    qemu_io(img, "write -P 0x56 64k 64k", "write -z 256k 128k", "write -z -u 512k 64k", "write -z 1m 4k")
    tool("qemu-img", "amend", "-q", "-f", "qcow2", "-o", "compat=0.10", img)
    assert read_field(img, "version") == 2
    return Case(img)


def _build_rebased(d: Path) -> Case:
    """``qemu-img rebase`` (safe mode) onto another base: the differences are copied into the top."""
    old = create(d / "old-base.qcow2", 2 * MiB)
    qemu_io(old, "write -P 0x57 0 1m")
    new = create(d / "new-base.qcow2", 2 * MiB)
    qemu_io(new, "write -P 0x57 0 512k", "write -P 0x58 1m 512k")
    img = create(d / "rebased.qcow2", 2 * MiB, backing=old.name)
    qemu_io(img, "write -P 0x59 128k 64k")
    tool("qemu-img", "rebase", "-q", "-f", "qcow2", "-b", new.name, "-F", "qcow2", img)
    assert json.loads(tool("qemu-img", "info", "--output=json", img).stdout)["backing-filename"] == new.name
    return Case(img)


def _build_chain(d: Path, base_fmt: str) -> Case:
    """Three deep: base (2 MiB, shorter; raw: 300 bytes less) <- mid (4 MiB) <- top (6 MiB)."""
    base = d / f"chain-{base_fmt}-base.{base_fmt}"
    create(base, 2 * MiB, fmt=base_fmt)
    qemu_io(base, "write -P 0x61 0 1m", "write -P 0x62 1536k 4k", fmt=base_fmt)
    if base_fmt == "raw":  # a raw file need not end on a sector: QEMU still sizes it in whole sectors
        with open(base, "r+b") as f:
            f.truncate(2 * MiB - 300)
            f.seek(2 * MiB - 400)
            f.write(b"\x63" * 100)
    mid = create(d / f"chain-{base_fmt}-mid.qcow2", 4 * MiB, backing=base.name, backing_fmt=base_fmt,
                 cluster_size=4 * KiB)
    qemu_io(mid, "write -P 0x63 64k 64k", "write -z 256k 128k", "write -P 0x64 1984k 128k", "write -z -u 3m 64k",
            "write -c -P 0x67 768k 4k", "write -c -P 0x68 3200k 4k")  # compressed, over the base and past it
    top = create(d / f"chain-{base_fmt}-top.qcow2", 6 * MiB, backing=mid.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x65 96k 64k", "write -z 512k 64k", "write -P 0x66 4m 64k", "discard 96k 32k")
    return Case(top)


def _build_data_file(d: Path, raw_flag: bool) -> Case:
    name = "datafile-raw" if raw_flag else "datafile"
    options = [f"data_file={name}.data"]
    if raw_flag:
        options.append("data_file_raw=on")
    img = create(d / f"{name}.qcow2", 4 * MiB, options=options)
    qemu_io(img, "write -P 0x71 0 100k", "write -z 64k 64k", "write -P 0x72 2m 512k", "discard 2m 64k")
    return Case(img)


def _build_snapshots(d: Path) -> Case:
    img = create(d / "snap.qcow2", 4 * MiB)
    qemu_io(img, "write -P 0x81 0 1m")
    tool("qemu-img", "snapshot", "-c", "one", img)
    qemu_io(img, "write -P 0x82 512k 1m", "write -z 0 64k")
    tool("qemu-img", "snapshot", "-c", "two", img)
    tool("qemu-img", "resize", "-q", img, str(6 * MiB))  # the snapshots keep their smaller disk size
    qemu_io(img, "write -P 0x83 5m 64k", "discard 512k 64k")
    tool("qemu-img", "snapshot", "-c", "1", img)  # a name that is also the id of another snapshot
    qemu_io(img, "write -P 0x84 0 4k")
    return Case(img)


CLUSTER_SIZES = {"512": 512, "4k": 4 * KiB, "64k": 64 * KiB, "2m": 2 * MiB}

BUILDERS: dict[str, Callable[[Path], Case]] = {
    **{f"plain-{n}": functools.partial(_build_plain, cluster_size=cs) for n, cs in CLUSTER_SIZES.items()},
    **{
        f"{kind}-{n}": functools.partial(_build_compressed, kind=kind, cluster_size=cs)
        for kind in ("deflate", "zstd")
        for n, cs in CLUSTER_SIZES.items()
    },
    "extl2": _build_extl2,
    "extl2-2m": _build_extl2_2m,
    "extl2-backed": _build_extl2_backed,
    "v2": _build_v2,
    "v2-amended": _build_amended_v2,
    "rebased": _build_rebased,
    "chain-qcow2": lambda d: _build_chain(d, "qcow2"),
    "chain-raw": lambda d: _build_chain(d, "raw"),
    "datafile": lambda d: _build_data_file(d, False),
    "datafile-raw": lambda d: _build_data_file(d, True),
    "snapshots": _build_snapshots,
}


class RefImages:
    """Builds each reference image the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: dict[str, Case] = {}

    def __getitem__(self, name: str) -> Case:
        if name not in self.cases:
            d = self.root / name
            d.mkdir()
            self.cases[name] = BUILDERS[name](d)
        return self.cases[name]


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> RefImages:
    return RefImages(tmp_path_factory.mktemp("qcow2ref"))


def read_all(image: bootkit.qcow2.Image, chunk: int = 1 * MiB) -> bytes:
    return b"".join(image.pread(off, chunk) for off in range(0, image.virtual_size, chunk))


# --- bytes and map, image by image ----------------------------------------------------------------------

MAPPED = [name for name in BUILDERS if name != "snapshots"]


@pytest.mark.parametrize("name", [*MAPPED, "snapshots"])
def test_bytes_equal_qemu_img_convert(refs: RefImages, name: str) -> None:
    case = refs[name]
    expected = qemu_raw(case.path)
    with bootkit.qcow2.open(case.path) as image:
        assert image.virtual_size == virtual_size(case.path) == len(expected)
        got = read_all(image)
    assert got == expected


@pytest.mark.parametrize("name", MAPPED)
def test_extents_equal_qemu_img_map(refs: RefImages, name: str) -> None:
    case = refs[name]
    with bootkit.qcow2.open(case.path) as image:
        ours = bootkit_map(image.extents())
        # extents of an arbitrary window agree with the whole map cut to that window
        window = bootkit_map(image.extents(image.virtual_size // 3 + 512, image.virtual_size // 3))
    assert ours == qemu_map(case.path)
    lo, hi = window[0].start, window[-1].start + window[-1].length
    assert (lo, hi) == (image.virtual_size // 3 + 512, image.virtual_size // 3 * 2 + 512)
    assert window == _cut(ours, lo, hi)


def _cut(rows: list[MapRow], lo: int, hi: int) -> list[MapRow]:
    out = []
    for r in rows:
        s, e = max(r.start, lo), min(r.start + r.length, hi)
        if s < e:
            off = None if r.offset is None else r.offset + (s - r.start)
            out.append(r._replace(start=s, length=e - s, offset=off))
    return out


def test_extents_cover_the_disk_with_the_right_kinds(refs: RefImages) -> None:
    """The kinds themselves (the normal form above folds compressed into data): one image has them all."""
    with bootkit.qcow2.open(refs["deflate-64k"].path) as image:
        extents = list(image.extents())
    pos = 0
    for e in extents:
        assert e.offset == pos and e.length > 0
        pos += e.length
    assert pos == image.virtual_size
    kinds = {e.kind for e in extents}
    assert kinds == {"data", "compressed", "zero", "unallocated"}
    for e in extents:
        if e.kind == "compressed":
            assert e.host_offset is not None and 0 < e.compressed_size <= 2 * image.cluster_size
            assert e.length <= image.cluster_size


def test_qemu_map_depth_rules(refs: RefImages) -> None:
    """Pins the experiment behind the normal form: how qemu-img map reports depth and presence."""
    top = refs["chain-raw"].path
    rows = qemu_map(top)
    by_start = {r.start: r for r in rows}
    # raw base hole inside the base: answered by the raw layer (depth 2), present, with an offset
    hole = next(r for r in rows if r.depth == 2 and r.zero)
    assert hole.present and hole.offset == hole.start
    # past the end of the 2 MiB base, below mid: mid (depth 1) answers zero, not present
    past_base = [r for r in rows if r.start >= 2 * MiB and r.start + r.length <= 4 * MiB and not r.present]
    assert past_base and all(r.depth == 1 and r.zero for r in past_base)
    # past the end of the 4 MiB mid: top answers, depth 0, not present
    assert by_start[4 * MiB + 64 * KiB] == MapRow(4 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, 0, False, True, False, None)
    # a zero cluster that keeps its allocation has an offset; a plain one has none
    plain = qemu_map(refs["plain-64k"].path)
    zero_rows = [r for r in plain if r.zero and r.present]
    assert any(r.offset is not None for r in zero_rows) and any(r.offset is None for r in zero_rows)
    # unallocated in an image without a backing file: the image itself answers zero, not present
    assert any(r == r._replace(depth=0, present=False, zero=True, data=False, offset=None) for r in plain)
    # the sector tail of a raw base that does not end on a sector still belongs to it: a present hole
    base = refs.root / "odd.raw"
    base.write_bytes(b"\x01" * (100 * KiB + 100))
    odd = create(refs.root / "odd.qcow2", 1 * MiB, backing=base.name, backing_fmt="raw")
    assert qemu_map(odd)[:2] == [
        MapRow(0, 100 * KiB + 100, 1, True, False, True, 0),
        MapRow(100 * KiB + 100, 412, 1, True, True, False, 100 * KiB + 100),
    ]
    with bootkit.qcow2.open(odd) as image:
        assert bootkit_map(image.extents()) == qemu_map(odd)
    # the one place qemu-img map gives an offset to an area that is not present: unallocated subclusters
    # of an allocated extended-L2 cluster with nothing below (the normal form drops it)
    raw_rows = json.loads(tool("qemu-img", "map", "--output=json", refs["extl2"].path).stdout)
    assert any(not r["present"] and "offset" in r for r in raw_rows)
    raw_rows = json.loads(tool("qemu-img", "map", "--output=json", refs["plain-64k"].path).stdout)
    assert not any(not r["present"] and "offset" in r for r in raw_rows)


def test_metadata_preallocation(tmp_path: Path) -> None:
    """preallocation=metadata: every cluster allocated, most of them holes in the file.

    The bytes are QEMU's. The map is QEMU's except for one thing bootkit does not do: qemu-img map probes
    the file under preallocated data clusters (qcow2_detect_metadata_preallocation, BDRV_BLOCK_RECURSE) and
    flags holes there ``zero: true`` while keeping ``data: true``; bootkit reports them as plain data.
    """
    img = create(tmp_path / "prealloc.qcow2", 4 * MiB, options=["preallocation=metadata"])
    qemu_io(img, "write -P 0x91 64k 64k", "write -z 1m 64k")
    with bootkit.qcow2.open(img) as image:
        assert read_all(image) == qemu_raw(img)
        ours = bootkit_map(image.extents())
    qemu = qemu_map(img)
    assert any(r.data and r.zero for r in qemu)  # the probing this test is about
    assert ours == merge(r._replace(zero=False) if r.data else r for r in qemu)


# --- snapshots -----------------------------------------------------------------------------------------


# Reading "as of" a snapshot: bootkit gives the snapshot's own disk size, as ``qemu-img snapshot -a`` does
# (qcow2_snapshot_goto resizes to sn->disk_size). ``qemu-img convert -l`` (qcow2_snapshot_load_tmp) only swaps
# the L1 table and keeps the active size, so its output is bootkit's followed by zeros when the disk grew.


def _as_of_snapshot_applied(path: Path, ident: str) -> bytes:
    """The disk after ``qemu-img snapshot -a`` on a copy of the image."""
    copy = path.with_name(f"applied-{ident}.qcow2")
    shutil.copyfile(path, copy)
    try:
        tool("qemu-img", "snapshot", "-a", ident, copy)
        return qemu_raw(copy)
    finally:
        copy.unlink()


@pytest.mark.parametrize(("param", "wanted", "expect_id"), [
    ("snapshot.name=one", "one", "1"),
    ("snapshot.name=two", "two", "2"),
    ("snapshot.id=2", "2", "2"),
    ("snapshot.id=3", "3", "3"),
    ("1", "1", "1"),  # id or name: the id wins over the snapshot *named* "1" (id 3), in both
])
def test_snapshot_equals_qemu(refs: RefImages, param: str, wanted: str, expect_id: str) -> None:
    path = refs["snapshots"].path
    load_tmp = qemu_raw(path, snapshot_param=param)
    applied = _as_of_snapshot_applied(path, expect_id)
    with bootkit.qcow2.open(path, snapshot=wanted) as image:
        assert image.snapshot is not None and image.snapshot.id == expect_id
        got = read_all(image)
    assert got == applied
    assert load_tmp[: len(got)] == got and load_tmp[len(got) :] == bytes(len(load_tmp) - len(got))


def test_snapshot_list_and_sizes(refs: RefImages) -> None:
    path = refs["snapshots"].path
    assert snapshot_ids(path) == {"one": "1", "two": "2", "1": "3"}
    with bootkit.qcow2.open(path) as image:
        listed = [(s.id, s.name, s.disk_size) for s in image.snapshots]
        assert image.virtual_size == 6 * MiB and image.snapshot is None
    assert listed == [("1", "one", 4 * MiB), ("2", "two", 4 * MiB), ("3", "1", 6 * MiB)]
    with pytest.raises(InvalidImage, match="no snapshot 'nope'"):
        bootkit.qcow2.open(path, snapshot="nope")


# --- the reader as a byte source -----------------------------------------------------------------------


def test_many_threads_pread_equals_raw(refs: RefImages) -> None:
    case = refs["zstd-4k"]
    expected = qemu_raw(case.path)
    errors: list[BaseException] = []
    with bootkit.qcow2.open(case.path, cluster_cache_bytes=64 * KiB, l2_cache_bytes=8 * KiB) as image:
        size = image.virtual_size

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    off = rng.randrange(size)
                    n = rng.choice((1, 511, 4096, 9000, 70000))
                    assert image.pread(off, n) == expected[off : off + n]
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_raw_view_with_copyfileobj(refs: RefImages) -> None:
    case = refs["chain-qcow2"]
    expected = qemu_raw(case.path)
    with bootkit.qcow2.open(case.path) as image:
        view = image.raw()
        assert isinstance(view, io.RawIOBase) and view.readable() and view.seekable()
        out = io.BytesIO()
        shutil.copyfileobj(view, out, 100_000)  # a length that is not a sector multiple
        assert out.getvalue() == expected
        assert view.read(10) == b""
        view.seek(-5000, io.SEEK_END)
        assert view.read() == expected[-5000:]
        view.seek(12345)
        buffered = io.BufferedReader(view)
        assert buffered.read(7) == expected[12345:12352]


def test_reads_at_and_after_the_virtual_size(refs: RefImages) -> None:
    case = refs["chain-raw"]
    expected = qemu_raw(case.path)
    with bootkit.qcow2.open(case.path) as image:
        size = image.virtual_size
        assert image.size == size
        assert image.pread(size, 10) == b""
        assert image.pread(size + 10 * MiB, 10) == b""
        assert image.pread(size - 3, 10) == expected[-3:]
        buf = bytearray(b"\xee" * 100)
        assert image.readinto(size - 40, buf) == 40
        assert buf[:40] == expected[-40:] and buf[40:] == b"\xee" * 60
        assert image.readinto(size, bytearray(8)) == 0
        assert image.pread(0, 0) == b""
        assert list(image.extents(size, 100)) == []
        with pytest.raises(ValueError):
            image.pread(-1, 10)


@pytest.mark.parametrize("name", ["plain-4k", "deflate-64k", "extl2", "v2"])
def test_bytes_source_reads_the_same(refs: RefImages, name: str) -> None:
    case = refs[name]
    data = case.path.read_bytes()
    with bootkit.qcow2.open(case.path) as from_file:
        want_map = list(e[:5] for e in from_file.extents())
        want = read_all(from_file)
    with bootkit.qcow2.open(BytesSource(data, name="in-memory")) as image:
        assert read_all(image, chunk=333_333) == want
        assert [e[:5] for e in image.extents()] == want_map


def test_bytes_source_chain_needs_an_explicit_backing(refs: RefImages) -> None:
    """A non-file source has no directory: its backing file is refused unless the caller names it."""
    top = refs["chain-qcow2"].path
    with pytest.raises(UnsafePath, match="not opened from a local file"):
        bootkit.qcow2.open(BytesSource(top.read_bytes(), name="top-in-memory"))
    mid = top.with_name("chain-qcow2-mid.qcow2")
    with bootkit.qcow2.open(BytesSource(top.read_bytes(), name="top-in-memory"), backing=mid) as image:
        assert read_all(image) == qemu_raw(top)
    with bootkit.qcow2.open(BytesSource(top.read_bytes()), backing=False) as image:
        assert image.backing is None
        assert image.pread(0, 64 * KiB) == bytes(64 * KiB)  # unallocated in top alone


# --- what opening and reading cost ---------------------------------------------------------------------


def _run_python(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_zstandard_is_imported_only_for_zstd_images(refs: RefImages) -> None:
    code = """
        import sys, bootkit.qcow2
        with bootkit.qcow2.open(sys.argv[1] if len(sys.argv) > 1 else {path!r}) as im:
            for off in range(0, im.virtual_size, 1 << 20):
                im.pread(off, 1 << 20)
            list(im.extents())
        print("zstandard" in sys.modules)
    """
    assert _run_python(code.format(path=str(refs["deflate-64k"].path))) == "False"
    assert _run_python(code.format(path=str(refs["chain-raw"].path))) == "False"
    # with the system's libzstd, zstd images do without it too
    assert _run_python(code.format(path=str(refs["zstd-64k"].path))) == "False"
    # the check can fail: a zstd image read without libzstd does import it
    assert _run_python(code.format(path=str(refs["zstd-64k"].path)), BOOTKIT_ZSTD="zstandard") == "True"


@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 GiB image with data scattered over it (plain, compressed, zero) and a 4 KiB-cluster variant."""
    d = tmp_path_factory.mktemp("qcow2big")
    img = create(d / "big.qcow2", 3 << 30, cluster_size=4 * KiB)
    cmds = []
    for i in range(48):
        off = i * (64 * MiB) + 4 * KiB * (i % 7)
        if i % 3 == 0:
            cmds.append(f"write -c -P {0x10 + i} {off - off % (4 * KiB)} 4k")
        elif i % 3 == 1:
            cmds.append(f"write -P {0x10 + i} {off} 256k")
        else:
            cmds.append(f"write -z {off} 1m")
    qemu_io(img, *cmds)
    return img


def test_memory_stays_small_reading_a_multi_gib_image(big_sparse: Path) -> None:
    code = f"""
        import resource, bootkit.qcow2
        image = bootkit.qcow2.open({str(big_sparse)!r})
        zeros = bytes(4 << 20)
        buf = bytearray(4 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        nonzero = 0
        for off in range(0, image.virtual_size, len(buf)):
            n = image.readinto(off, buf)
            if buf[:n] != zeros[:n]:
                nonzero += 1
        extents = sum(1 for _ in image.extents())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(image.virtual_size, nonzero, extents, after - before)
    """
    size, nonzero, extents, grown_kib = map(int, _run_python(code).split())
    assert size == 3 << 30
    assert nonzero == 32  # the 16 compressed and 16 plain writes, each inside one 4 MiB chunk
    assert extents == 96  # each write and the gap after it
    # caches are bounded (8 MiB of L2 tables + 16 MiB of clusters by default): nothing grows with the disk
    assert grown_kib < 48 * 1024, f"RSS grew by {grown_kib} KiB reading a 3 GiB image"


class CountingSource:
    """Wraps a FileSource and counts what the reader asks of it."""

    def __init__(self, inner: FileSource) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.bytes = 0
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        with self.lock:
            self.calls += 1
            self.bytes += len(data)
        return data

    def close(self) -> None:
        self.inner.close()


def test_opening_a_2_mib_cluster_image_reads_a_few_kib(refs: RefImages) -> None:
    """The extension area runs to the end of the first cluster; only the part that holds extensions is read."""
    src = CountingSource(FileSource(refs["plain-2m"].path))
    with bootkit.qcow2.open(src):
        assert src.bytes <= 8 * KiB, (src.calls, src.bytes)


def test_opening_a_1_tib_image_reads_a_few_kib(tmp_path: Path) -> None:
    img = create(tmp_path / "huge.qcow2", 1 << 40)
    qemu_io(img, f"write -P 0x99 {(1 << 40) - 64 * KiB} 64k", "write -P 0x98 700g 4k")
    src = CountingSource(FileSource(img))
    with bootkit.qcow2.open(src) as image:
        assert image.virtual_size == 1 << 40
        opened = (src.calls, src.bytes)
        # the header, the extensions (read 4 KiB at a time, as far as they go) and the 16 KiB L1 table
        # (2048 entries): 20585 bytes in 5 reads when this was written
        assert opened[0] <= 8, opened
        assert opened[1] <= 16 * KiB + 4 * KiB + 512, opened
        assert image.pread((1 << 40) - 64 * KiB, 64 * KiB) == b"\x99" * (64 * KiB)
        assert image.pread(700 << 30, 8 * KiB) == b"\x98" * (4 * KiB) + bytes(4 * KiB)
        # one L2 table and one data run per read
        assert src.calls - opened[0] <= 4, src.calls
        # the map of a 1 TiB disk: a handful of extents, no table read for unallocated L1 slots
        before = src.calls
        kinds = [(e.kind, e.length) for e in image.extents()]
        assert [k for k, _ in kinds] == ["unallocated", "data", "unallocated", "data"]
        assert src.calls == before  # both L2 tables are cached

