"""Hostile images: every case listed in docs/qcow2.md, "Hostile images".

Each case patches one field of a real image made by qemu-img/qemu-io (offsets from QCowHeader, the L1/L2
tables and the compressed descriptor), then asserts the exact exception class and the words of its message
that name the field or offset. Where QEMU's own behaviour is cheap to ask, the test asks it too: an image
QEMU refuses is refused, an image QEMU reads is read to the same bytes.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import pytest
import zstandard
from qcow2_refimages import (
    KiB,
    MiB,
    append_payload,
    compressed_descriptor,
    convert,
    create,
    extensions,
    l1_entry_offset,
    l2_entry_offset,
    parse_compressed,
    pattern,
    peek,
    poke,
    poke_field,
    qemu_io,
    qemu_io_read_fails,
    qemu_raw,
    read_field,
    tool,
)

import bootkit.qcow2
from bootkit.errors import CorruptImage, ImageError, InvalidImage, UnsupportedFeature
from bootkit.qcow2 import UnsafePath, compress
from bootkit.source import BytesSource, FileSource

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io (Debian package qemu-utils) not installed")

CLUSTER = 64 * KiB
QCOW_OFLAG_COPIED = 1 << 63
EXT_FEATURE_TABLE = 0x6803F857
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_BITMAPS = 0x23852875
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")

TEXT = b"".join(f"{i:05d} the quick brown fox jumps over the lazy dog\n".encode() for i in range(2000))


# --- base images, made once per module and copied for each case ------------------------------------------


class Bases(NamedTuple):
    plain: Path  # v3, 64 KiB clusters, 1 MiB; data at guest 0..128 KiB (L1 0x30000, L2 0x40000, data 0x50000)
    snap: Path  # like plain, with snapshot "one" taken after the first write
    v2: Path  # compat=0.10, data at 0..128 KiB
    extl2: Path  # extended L2, one cluster partly written, one compressed cluster
    deflate: Path  # cluster 0 compressed (text: several sectors), cluster 1 plain
    zstd: Path  # same, zstd


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    d = tmp_path_factory.mktemp("hostile-bases")
    plain = create(d / "plain.qcow2", 1 * MiB)
    qemu_io(plain, "write -P 0x11 0 128k")
    snap = create(d / "snap.qcow2", 1 * MiB)
    qemu_io(snap, "write -P 0x21 0 64k")
    tool("qemu-img", "snapshot", "-c", "one", snap)
    qemu_io(snap, "write -P 0x22 0 128k")
    v2 = create(d / "v2.qcow2", 1 * MiB, options=["compat=0.10"])
    qemu_io(v2, "write -P 0x31 0 128k")
    extl2 = create(d / "extl2.qcow2", 1 * MiB, options=["extended_l2=on"])
    qemu_io(extl2, "write -P 0x41 2k 4k", "write -c -P 0x42 128k 64k")
    src = d / "text.raw"
    with open(src, "wb") as f:
        f.write(TEXT[:CLUSTER] + pattern(5, CLUSTER))
        f.truncate(1 * MiB)
    deflate = convert(src, compress=True, dst=d / "deflate.qcow2")
    zstd_img = convert(src, compress=True, options=["compression_type=zstd"], dst=d / "zstd.qcow2")
    return Bases(plain, snap, v2, extl2, deflate, zstd_img)


def copy(base: Path, tmp_path: Path, name: Optional[str] = None) -> Path:
    dst = tmp_path / (name or base.name)
    shutil.copyfile(base, dst)
    return dst


def open_fails(path: Path | FileSource, exc: type[Exception], *words: str, **kwargs: Any) -> str:
    """Open must raise exactly ``exc`` with every word in its message (case-insensitive); returns it."""
    with pytest.raises(ImageError) as info:
        bootkit.qcow2.open(path, **kwargs)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in {message!r}"
    return message


def read_fails(path: Path, offset: int, length: int, exc: type[Exception], *words: str, **kwargs: Any) -> str:
    """Open succeeds, reading [offset, offset+length) raises exactly ``exc`` naming ``words``."""
    with bootkit.qcow2.open(path, **kwargs) as image, pytest.raises(ImageError) as info:
        image.pread(offset, length)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in {message!r}"
    return message


def qemu_refuses(path: Path) -> bool:
    """Whether QEMU fails to open the image and read its first sector."""
    return qemu_io_read_fails(path, 0, 512)


def reads_like_qemu(path: Path, **kwargs: Any) -> bytes:
    """Every guest byte equals ``qemu-img convert -O raw`` of the same (patched) image."""
    expected = qemu_raw(path)
    with bootkit.qcow2.open(path, **kwargs) as image:
        got = image.pread(0, image.virtual_size)
    assert got == expected
    return got


# --- header fields (iotest 080 and friends) ---------------------------------------------------------------


class HeaderCase(NamedTuple):
    id: str
    patches: tuple[tuple[str, object], ...]  # (header field, value)
    exc: type[Exception]
    words: tuple[str, ...]
    qemu_refuses: bool = True


HEADER_CASES = [
    HeaderCase("magic", (("magic", b"QFI\xfa"),), InvalidImage, ("not a qcow2 image",)),
    HeaderCase("version-1", (("version", 1),), UnsupportedFeature, ("version 1", "offset 4")),
    HeaderCase("version-4", (("version", 4),), UnsupportedFeature, ("version 4",)),
    HeaderCase("cluster-bits-8", (("cluster_bits", 8),), InvalidImage, ("cluster size 2^8", "cluster_bits")),
    HeaderCase("cluster-bits-22", (("cluster_bits", 22),), InvalidImage, ("cluster size 2^22", "cluster_bits")),
    HeaderCase("cluster-bits-huge", (("cluster_bits", 0xFFFFFFFF),), InvalidImage, ("cluster_bits",)),
    HeaderCase("header-length-ffffffff", (("header_length", 0xFFFFFFFF),), InvalidImage,
               ("header exceeds cluster size", "header_length")),
    HeaderCase("header-length-7fffffff", (("header_length", 0x7FFFFFFF),), InvalidImage,
               ("header exceeds cluster size",)),
    HeaderCase("header-length-short", (("header_length", 96),), InvalidImage, ("header too short", "96")),
    HeaderCase("header-length-unaligned", (("header_length", 108),), InvalidImage, ("header_length 108",
                                                                                     "multiple of 8"), False),
    HeaderCase("backing-offset-max", (("backing_file_offset", (1 << 64) - 1),), InvalidImage,
               ("invalid backing file offset", "0xffffffffffffffff")),
    HeaderCase("backing-size-ffffffff", (("backing_file_offset", 0x1000), ("backing_file_size", 0xFFFFFFFF)),
               InvalidImage, ("backing file name too long", "4294967295")),
    HeaderCase("refcount-clusters-ffffffff", (("refcount_table_clusters", 0xFFFFFFFF),), InvalidImage,
               ("reference count table too large",)),
    HeaderCase("refcount-clusters-20001", (("refcount_table_clusters", 0x20001),), InvalidImage,
               ("reference count table too large",)),
    HeaderCase("refcount-clusters-0", (("refcount_table_clusters", 0),), InvalidImage,
               ("does not contain a reference count table",)),
    HeaderCase("refcount-offset-misaligned", (("refcount_table_offset", 0x10001),), InvalidImage,
               ("reference count table offset invalid", "0x10001")),
    HeaderCase("refcount-offset-huge", (("refcount_table_offset", 0xFFFFFFFFFFFF0000),), InvalidImage,
               ("reference count table offset invalid", "0xffffffffffff0000")),
    HeaderCase("nb-snapshots-ffffffff", (("nb_snapshots", 0xFFFFFFFF),), InvalidImage,
               ("snapshot table too large",)),
    HeaderCase("nb-snapshots-7fffffff", (("nb_snapshots", 0x7FFFFFFF),), InvalidImage,
               ("snapshot table too large",)),
    HeaderCase("snapshots-offset-huge", (("nb_snapshots", 1), ("snapshots_offset", 0xFFFFFFFFFFFF0000)),
               InvalidImage, ("snapshot table offset invalid", "0xffffffffffff0000")),
    HeaderCase("snapshots-offset-misaligned", (("nb_snapshots", 1), ("snapshots_offset", 0x12345)),
               InvalidImage, ("snapshot table offset invalid", "0x12345")),
    HeaderCase("l1-size-ffffffff", (("l1_size", 0xFFFFFFFF),), InvalidImage, ("active l1 table too large",)),
    HeaderCase("l1-size-7fffffff", (("l1_size", 0x7FFFFFFF),), InvalidImage, ("active l1 table too large",)),
    HeaderCase("l1-offset-huge", (("l1_table_offset", 0xFFFFFFFFFFFF0000),), InvalidImage,
               ("active l1 table offset invalid", "0xffffffffffff0000")),
    HeaderCase("l1-offset-misaligned", (("l1_table_offset", 0x30200),), InvalidImage,
               ("active l1 table offset invalid", "0x30200")),
    HeaderCase("l1-size-0", (("l1_size", 0),), InvalidImage, ("l1 table is too small", "l1_size 0")),
    HeaderCase("size-huge-small-l1", (("size", 1 << 40),), InvalidImage,
               ("l1 table is too small", "l1_size 1", str(1 << 40))),
    HeaderCase("size-too-big", (("size", 1 << 61),), InvalidImage, ("image is too big", str(1 << 61))),
    HeaderCase("crypt-aes", (("crypt_method", 1),), UnsupportedFeature, ("aes",), False),
    HeaderCase("crypt-luks", (("crypt_method", 2),), UnsupportedFeature, ("luks",)),
    HeaderCase("crypt-unknown", (("crypt_method", 3),), InvalidImage, ("encryption method 3", "crypt_method")),
    HeaderCase("refcount-order-7", (("refcount_order", 7),), InvalidImage, ("refcount_order 7",)),
    HeaderCase("unknown-incompat-bit", (("incompatible_features", 1 << 10),), UnsupportedFeature,
               ("unsupported incompatible", "unknown bit 10")),
    HeaderCase("zstd-without-bit", (("compression_type", 1),), InvalidImage,
               ("compression type incompatible feature bit must be set",)),
    HeaderCase("bit-with-deflate", (("incompatible_features", 1 << 3),), InvalidImage,
               ("compression type incompatible feature bit must not be set",)),
    HeaderCase("unknown-compression", (("incompatible_features", 1 << 3), ("compression_type", 2)),
               UnsupportedFeature, ("unknown compression type 2", "compression_type")),
    HeaderCase("extl2-small-clusters", (("incompatible_features", 1 << 4), ("cluster_bits", 13)),
               InvalidImage, ("subcluster size 256",)),
    HeaderCase("data-file-raw-without-data-file", (("autoclear_features", 1 << 1),), InvalidImage,
               ("data-file-raw", "requires a data file")),
    HeaderCase("data-file-bit-no-name", (("incompatible_features", 1 << 2),), UnsupportedFeature,
               ("external data file but names none",)),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c.id for c in HEADER_CASES])
def test_header_field(bases: Bases, tmp_path: Path, case: HeaderCase) -> None:
    img = copy(bases.plain, tmp_path)
    for field, value in case.patches:
        poke_field(img, field, value)
    open_fails(img, case.exc, *case.words)
    if case.qemu_refuses:
        assert qemu_refuses(img), f"QEMU opens {case.id}"
    # the same bytes through a non-file source fail the same way
    with pytest.raises(case.exc):
        bootkit.qcow2.open(BytesSource(img.read_bytes()))


def test_unknown_incompatible_bit_named_from_the_feature_table(bases: Bases, tmp_path: Path) -> None:
    """The message uses the image's own feature name table for bits bootkit does not know."""
    img = copy(bases.plain, tmp_path)
    ((_, ext_at, length),) = [e for e in extensions(img) if e[0] == EXT_FEATURE_TABLE]
    for i in range(length // 48):
        entry = ext_at + 8 + 48 * i
        if peek(img, entry, ">BB") == (0, 4):
            poke(img, entry, ">BB46s", 0, 12, b"frobnicated clusters")
    poke_field(img, "incompatible_features", 1 << 12)
    open_fails(img, UnsupportedFeature, "frobnicated clusters")
    assert qemu_refuses(img)


def _end_of_extensions(img: Path) -> int:
    _, last_at, last_len = extensions(img)[-1]
    return last_at + 8 + ((last_len + 7) & ~7)


def test_unknown_extension_too_large(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    poke(img, _end_of_extensions(img), ">II", 0x12345678, 0x7FFFFFFF)
    open_fails(img, InvalidImage, "header extension too large", "0x12345678")
    assert qemu_refuses(img)


@pytest.mark.parametrize("version", [2, 3])
def test_end_marker_with_a_length_too_large(bases: Bases, tmp_path: Path, version: int) -> None:
    """QEMU checks an extension's length before its type, even for the end marker (v2 images too)."""
    img = copy(bases.v2 if version == 2 else bases.plain, tmp_path)
    end = _end_of_extensions(img) if version == 3 else 72
    poke(img, end, ">II", 0, 0x00B10000)
    open_fails(img, InvalidImage, "header extension too large", f"offset {end:#x}")
    assert qemu_refuses(img)
    poke(img, end, ">II", 0, 16)  # a length that fits is fine: the list ends there
    reads_like_qemu(img)


def test_extension_header_cut_by_the_backing_name(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", 1 * MiB)
    top = create(tmp_path / "top.qcow2", 1 * MiB, backing="base.qcow2")
    end = _end_of_extensions(top)  # where the end marker is
    name = read_field(top, "backing_file_offset")
    poke(top, end + 4, f">{read_field(top, 'backing_file_size')}s", (tmp_path / "base.qcow2").name.encode())
    poke_field(top, "backing_file_offset", end + 4)
    assert name != end + 4
    open_fails(top, InvalidImage, "header extension too large", f"offset {end:#x}")
    assert qemu_refuses(top)


def test_unknown_extension_is_skipped(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    poke(img, _end_of_extensions(img), ">II5s", 0x12345678, 5, b"hello")
    reads_like_qemu(img)


def test_extensions_longer_than_the_first_read(bases: Bases, tmp_path: Path) -> None:
    """The extension area is read as far as it goes (4 KiB first): a 10 KiB extension and one after it."""
    img = copy(bases.plain, tmp_path)
    end = _end_of_extensions(img)
    poke(img, end, ">II10000s", 0x12345678, 10000, pattern(3, 10000))
    poke(img, end + 8 + 10000, ">II4sII", 0x12345679, 4, b"tail", 0, 0)
    reads_like_qemu(img)
    with bootkit.qcow2.open(img) as image:
        found = {e.type: e.data for e in image.info.extensions}
    assert found[0x12345678] == pattern(3, 10000) and found[0x12345679] == b"tail"
    assert EXT_FEATURE_TABLE in found


def test_duplicate_extension(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    poke(img, _end_of_extensions(img), ">II", EXT_FEATURE_TABLE, 0)
    open_fails(img, InvalidImage, "duplicate header extension", hex(EXT_FEATURE_TABLE))


def test_bitmaps_extension(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    end = _end_of_extensions(img)
    # a wrong length is refused whether or not the autoclear bit says the bitmaps are live (as QEMU does)
    poke(img, end, ">IIQ", EXT_BITMAPS, 8, 1)
    for autoclear in (0, 1):
        poke_field(img, "autoclear_features", autoclear)
        open_fails(img, InvalidImage, "bitmaps header extension", "length 8")
        assert qemu_refuses(img)
    # live bitmaps are checked field by field
    poke(img, end, ">IIIIQQ", EXT_BITMAPS, 24, 1, 0, 0, 0x12345)
    open_fails(img, InvalidImage, "bitmap directory offset 0x12345 unaligned")
    assert qemu_refuses(img)
    # stale ones (autoclear bit clear: a program without bitmap support wrote the image) are ignored
    poke_field(img, "autoclear_features", 0)
    reads_like_qemu(img)


def test_virtual_size_not_a_multiple_of_512(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    poke_field(img, "size", 1 * MiB - 100)
    got = reads_like_qemu(img)  # QEMU counts whole sectors: the last partial sector does not exist
    assert len(got) == 1 * MiB - 512


def test_dirty_and_corrupt_bits_read_only_with_a_warning(
    bases: Bases, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for bit, word in ((0, "dirty"), (1, "corrupt")):
        img = copy(bases.plain, tmp_path, f"bit{bit}.qcow2")
        poke_field(img, "incompatible_features", 1 << bit)
        # a broken refcount table does not matter to a read-only reader (iotest 060: RO open succeeds)
        poke(img, read_field(img, "refcount_table_offset"), ">Q", 0x22A00)
        with caplog.at_level(logging.WARNING):
            reads_like_qemu(img)
        assert word in caplog.text


# --- snapshots (iotests 080, 261) -------------------------------------------------------------------------


def _snapshot_entry(img: Path) -> int:
    return read_field(img, "snapshots_offset")


def test_snapshot_extra_data_too_large(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.snap, tmp_path)
    poke(img, _snapshot_entry(img) + 36, ">I", 1025)
    open_fails(img, InvalidImage, "too much extra metadata in snapshot table entry 0")
    assert qemu_refuses(img)


def test_snapshot_extra_data_incomplete_in_v3(
    bases: Bases, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Less than the 16 bytes v3 requires: QEMU opens the image (only 'qemu-img check' complains)."""
    img = copy(bases.snap, tmp_path)
    entry = _snapshot_entry(img)
    poke(img, entry + 36, ">I", 0)
    with caplog.at_level(logging.WARNING):
        reads_like_qemu(img)
    assert "snapshot table entries are incomplete" in caplog.text
    with bootkit.qcow2.open(img) as image:
        # the id and name now start where the extra data was: still parsed, the disk size defaults
        assert [s.disk_size for s in image.snapshots] == [1 * MiB]


def test_snapshot_table_past_end_of_file(bases: Bases, tmp_path: Path) -> None:
    """QEMU's block layer reads zeros past the end of the file: the table has empty entries, and opens."""
    img = copy(bases.plain, tmp_path)
    poke_field(img, "nb_snapshots", 3)
    poke_field(img, "snapshots_offset", 0x7FFF0000)
    reads_like_qemu(img)
    with bootkit.qcow2.open(img) as image:
        assert [(s.id, s.name, s.l1_size) for s in image.snapshots] == [("", "", 0)] * 3
    poke_field(img, "snapshots_offset", 0x7FFFFFFFFFFF0000)  # 2000 empty entries (40 bytes) end past 2^63
    poke_field(img, "nb_snapshots", 2000)
    open_fails(img, InvalidImage, "snapshot table entry 1638", "out of range")
    assert qemu_refuses(img)


def test_snapshot_name_padded_with_nuls(bases: Bases, tmp_path: Path) -> None:
    """QEMU reads id and name as C strings: a name_len that takes in the NUL padding still names 'one'."""
    img = copy(bases.snap, tmp_path)
    entry = _snapshot_entry(img)
    _, _, id_len, name_len, *_, extra = peek(img, entry, SNAPSHOT_HEADER.format)
    used = SNAPSHOT_HEADER.size + extra + id_len + name_len
    assert (id_len, name_len) == (1, 3) and used % 8  # there is NUL padding to take in
    poke(img, entry + 14, ">H", name_len + (-used % 8))
    expected = qemu_raw_snapshot(img, "one")
    with bootkit.qcow2.open(img, snapshot="one") as image:
        assert image.snapshot is not None and image.snapshot.name == "one"
        assert image.pread(0, image.virtual_size) == expected


def qemu_raw_snapshot(img: Path, name: str) -> bytes:
    out = img.with_name("snapshot.raw")
    tool("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", img, out)
    return out.read_bytes()


def test_snapshot_table_too_big(bases: Bases, tmp_path: Path) -> None:
    """> 64 MiB of snapshot table (iotest 261): entries with maximal id/name/extra sizes in a sparse file."""
    img = copy(bases.plain, tmp_path)
    table = 0x100000
    entry_size = SNAPSHOT_HEADER.size + 1024 + 65535 + 65535
    count = (64 * MiB) // entry_size + 2
    with open(img, "r+b") as f:
        offset = table
        for _ in range(count):
            offset = (offset + 7) & ~7
            f.seek(offset)
            f.write(SNAPSHOT_HEADER.pack(0x30000, 1, 65535, 65535, 0, 0, 0, 0, 1024))
            offset += entry_size
        f.truncate(offset + 8)
    poke_field(img, "nb_snapshots", count)
    poke_field(img, "snapshots_offset", table)
    open_fails(img, InvalidImage, "snapshot table is too big")


@pytest.mark.parametrize(
    ("field", "fmt", "value", "words", "qemu_fails"),
    [
        ("l1_table_offset", ">Q", 0x30200, ("snapshot 1", "snapshot l1 table offset invalid", "0x30200"), True),
        ("l1_size", ">I", 0x10000000, ("snapshot 1", "snapshot l1 table too large"), True),
        # stricter than QEMU, whose load_tmp reads zeros past a short snapshot L1: a snapshot whose L1 cannot
        # map its own disk_size is not something QEMU writes
        ("l1_size", ">I", 0, ("snapshot 1", "l1 table is too small"), False),
    ],
)
def test_snapshot_l1(
    bases: Bases, tmp_path: Path, field: str, fmt: str, value: int, words: tuple[str, ...], qemu_fails: bool
) -> None:
    img = copy(bases.snap, tmp_path)
    poke(img, _snapshot_entry(img) + (0 if field == "l1_table_offset" else 8), fmt, value)
    # the active disk is fine: only the snapshot's own L1 is checked, when it is chosen
    reads_like_qemu(img)
    open_fails(img, InvalidImage, *words, snapshot="one")
    qemu = tool("qemu-img", "convert", "-l", "one", "-O", "raw", img, tmp_path / "out.raw", check=False)
    assert bool(qemu.returncode) == qemu_fails


# --- L1 / L2 entries (iotest 060, 271) --------------------------------------------------------------------


def test_l2_table_offset_unaligned(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    poke(img, l1_entry_offset(img, 0), ">Q", 0x80000000_00042A00)
    read_fails(img, 0, 512, CorruptImage, "l2 table offset 0x42a00 unaligned", "l1 index: 0x0")
    assert qemu_io_read_fails(img, 0, 512)


@pytest.mark.parametrize("entry", [0x80000000_00052A00, 0x80000000_00052A01], ids=["data", "zero-alloc"])
def test_cluster_offset_unaligned(bases: Bases, tmp_path: Path, entry: int) -> None:
    img = copy(bases.plain, tmp_path)
    poke(img, l2_entry_offset(img, 0), ">Q", entry)
    read_fails(img, 0, 512, CorruptImage, "cluster allocation offset 0x52a00 unaligned", "l2 offset: 0x40000",
               "l2 index: 0x0")
    assert qemu_io_read_fails(img, 0, 512)
    # the neighbouring cluster still reads (the NBD server answers EIO for this request only)
    with bootkit.qcow2.open(img) as image:
        assert image.pread(CLUSTER, 512) == b"\x11" * 512


def test_l1_entry_pointing_at_the_l1_table_itself(bases: Bases, tmp_path: Path) -> None:
    """Overlapping metadata (iotest 060): a read-only open still reads whatever the tables say, like QEMU."""
    img = copy(bases.plain, tmp_path)
    l1 = read_field(img, "l1_table_offset")
    poke(img, l1, ">Q", QCOW_OFLAG_COPIED | l1)
    reads_like_qemu(img)


def test_l1_entry_pointing_at_an_inactive_l2_table(bases: Bases, tmp_path: Path) -> None:
    """The active L1 borrowing the snapshot's L2 table (iotest 060 'inactive L2'): read as it says."""
    img = copy(bases.snap, tmp_path)
    (snap_l1,) = peek(img, _snapshot_entry(img), ">Q")
    (snap_l1e,) = peek(img, snap_l1, ">Q")
    assert snap_l1e & 0x00FFFFFFFFFFFE00 != peek(img, l1_entry_offset(img, 0), ">Q")[0] & 0x00FFFFFFFFFFFE00
    poke(img, l1_entry_offset(img, 0), ">Q", QCOW_OFLAG_COPIED | (snap_l1e & 0x00FFFFFFFFFFFE00))
    got = reads_like_qemu(img)
    assert got[:CLUSTER] == b"\x21" * CLUSTER and got[CLUSTER : 2 * CLUSTER] == bytes(CLUSTER)


def test_l2_entry_pointing_into_the_refcount_block_and_bad_reftable(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.plain, tmp_path)
    (refblock,) = peek(img, read_field(img, "refcount_table_offset"), ">Q")
    poke(img, l2_entry_offset(img, CLUSTER), ">Q", QCOW_OFLAG_COPIED | refblock)
    poke(img, read_field(img, "refcount_table_offset"), ">Q", 0x22A00)  # unaligned refblock: write path only
    got = reads_like_qemu(img)
    assert got[CLUSTER : CLUSTER + 2] == b"\x00\x01"  # the first refcount (16 bits) of the header cluster


@pytest.mark.parametrize("where", ["l2-table", "data-cluster"])
def test_offsets_past_end_of_file_read_as_zeros(bases: Bases, tmp_path: Path, where: str) -> None:
    img = copy(bases.plain, tmp_path)
    if where == "l2-table":
        poke(img, l1_entry_offset(img, 0), ">Q", QCOW_OFLAG_COPIED | 0x10_0000_0000)
    else:
        poke(img, l2_entry_offset(img, 0), ">Q", QCOW_OFLAG_COPIED | 0xFF_FFFF_FFFF_0000)  # the largest offset
    got = reads_like_qemu(img)
    assert got[:512] == bytes(512)


def test_reserved_bits_of_table_entries_are_ignored(bases: Bases, tmp_path: Path) -> None:
    """QEMU masks L1/L2 entries on reads; only 'qemu-img check' looks at reserved bits."""
    img = copy(bases.plain, tmp_path)
    (l1e,) = peek(img, l1_entry_offset(img, 0), ">Q")
    poke(img, l1_entry_offset(img, 0), ">Q", l1e | 0x7F000000_000001FF)
    at = l2_entry_offset(img, CLUSTER)
    (l2e,) = peek(img, at, ">Q")
    poke(img, at, ">Q", l2e | 0x3F000000_000001FE)
    got = reads_like_qemu(img)
    assert got[: 2 * CLUSTER] == b"\x11" * (2 * CLUSTER)


@pytest.mark.parametrize("cut", ["in-data", "in-l2-table"])
def test_truncated_file_reads_zeros_past_its_end(bases: Bases, tmp_path: Path, cut: str) -> None:
    img = copy(bases.plain, tmp_path)
    data_host = l2_entry_offset(img, 0)  # the L2 table
    size = 0x50000 + 1000 if cut == "in-data" else data_host + 4  # first data cluster / first L2 entry
    with open(img, "r+b") as f:
        f.truncate(size)
    got = reads_like_qemu(img)
    if cut == "in-data":
        assert got[:1000] == b"\x11" * 1000 and got[1000:CLUSTER] == bytes(CLUSTER - 1000)


def test_header_length_104_has_no_compression_type_field(bases: Bases, tmp_path: Path) -> None:
    """Fields past header_length are absent: byte 104 is not the compression type then (zstd without the
    incompatible bit would be refused) but the start of the extension area (an unknown, empty extension)."""
    img = copy(bases.plain, tmp_path)
    poke_field(img, "header_length", 104)
    poke_field(img, "compression_type", 1)
    reads_like_qemu(img)
    with bootkit.qcow2.open(img) as image:
        assert image.compression == "deflate"


def test_zero_flag_in_a_v2_image(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.v2, tmp_path)
    at = l2_entry_offset(img, 0)
    (entry,) = peek(img, at, ">Q")
    poke(img, at, ">Q", entry | 1)
    read_fails(img, 0, 512, CorruptImage, "zero cluster entry found in pre-v3 image", "l2 index: 0x0")
    assert qemu_io_read_fails(img, 0, 512)


def _extl2_entry(img: Path, guest: int) -> tuple[int, int, int]:
    at = l2_entry_offset(img, guest, extended=True)
    entry, bitmap = peek(img, at, ">QQ")
    return at, entry, bitmap


def test_extl2_alloc_and_zero_bit_on_the_same_subcluster(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.extl2, tmp_path)
    at, _, bitmap = _extl2_entry(img, 0)
    assert bitmap & 0b110 == 0b110  # subclusters 1 and 2 written (2 KiB each)
    poke(img, at + 8, ">Q", bitmap | (1 << 33))
    read_fails(img, 0, 512, CorruptImage, "invalid cluster entry found", "l2 index: 0x0")
    assert qemu_io_read_fails(img, 0, 512)


def test_extl2_alloc_bit_in_an_unallocated_cluster(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.extl2, tmp_path)
    at, entry, bitmap = _extl2_entry(img, CLUSTER)
    assert entry == 0 and bitmap == 0
    poke(img, at + 8, ">Q", 1 << 5)
    read_fails(img, CLUSTER, 512, CorruptImage, "invalid cluster entry found", "l2 index: 0x1")
    assert qemu_io_read_fails(img, CLUSTER, 512)


def test_extl2_ignored_bits_read_normally(bases: Bases, tmp_path: Path) -> None:
    """iotest 271: bit 0 of a standard descriptor and the bitmap of a compressed cluster are ignored."""
    img = copy(bases.extl2, tmp_path)
    at, entry, _ = _extl2_entry(img, 0)
    poke(img, at, ">Q", entry | 1)
    at, entry, _ = _extl2_entry(img, 128 * KiB)
    assert entry & (1 << 62)
    poke(img, at + 8, ">Q", 0xFFFF0000_0000FFFF)
    got = reads_like_qemu(img)
    assert got[2 * KiB : 6 * KiB] == b"\x41" * (4 * KiB) and got[128 * KiB : 192 * KiB] == b"\x42" * CLUSTER


# --- compressed clusters (iotest 214 and zstd) -------------------------------------------------------------


def _compressed_entry(img: Path, guest: int = 0) -> tuple[int, int, int]:
    at = l2_entry_offset(img, guest)
    (entry,) = peek(img, at, ">Q")
    assert entry & (1 << 62), "not a compressed cluster"
    coffset, nb = parse_compressed(16, entry)
    return at, coffset, nb


def test_deflate_size_field_shrunk(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.deflate, tmp_path)
    at, coffset, nb = _compressed_entry(img)
    assert nb > 2, "the text cluster should take several sectors"
    poke(img, at, ">Q", compressed_descriptor(16, coffset, 1))
    read_fails(img, 0, 512, CorruptImage, f"compressed cluster at host offset {coffset:#x}", "guest offset 0x0",
               "deflate")
    assert qemu_io_read_fails(img, 0, 512)


def test_deflate_size_field_max_past_end_of_file(bases: Bases, tmp_path: Path) -> None:
    img = copy(bases.deflate, tmp_path)
    at, coffset, nb = _compressed_entry(img)
    # move the compressed data to the end of the file, then give it the largest size field: 128 KiB,
    # reaching far past the end of the file
    (payload,) = peek(img, coffset, f">{nb * 512}s")
    offset = append_payload(img, bytes(payload))
    poke(img, at, ">Q", compressed_descriptor(16, offset, 256))
    assert offset + 256 * 512 > img.stat().st_size
    got = reads_like_qemu(img)
    assert got[:CLUSTER] == TEXT[:CLUSTER]


def _cluster_patched(img: Path, payload: bytes) -> Path:
    """Point guest cluster 0 of a real compressed image at ``payload`` appended to the file."""
    at, _, _ = _compressed_entry(img)
    offset = append_payload(img, payload)
    poke(img, at, ">Q", compressed_descriptor(16, offset, (len(payload) + 511) // 512))
    return img


def _frame(data: bytes, **kwargs: Any) -> bytes:
    return bytes(zstandard.ZstdCompressor(level=3, **kwargs).compress(data))


def _stream_frame(data: bytes) -> bytes:
    """A frame without a content size in its header (as a streaming compressor writes it)."""
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    out = cctx.compressobj()
    return bytes(out.compress(data) + out.flush())


SKIPPABLE = struct.pack("<II", 0x184D2A50, 6) + b"bootkt"

ZSTD_GOOD = {
    "two-frames": _frame(TEXT[: CLUSTER // 2]) + _frame(TEXT[CLUSTER // 2 : CLUSTER]),
    "three-frames-uneven": _frame(TEXT[:1000]) + _stream_frame(TEXT[1000:40000]) + _frame(TEXT[40000:CLUSTER]),
    "trailing-garbage": _frame(TEXT[:CLUSTER]) + pattern(9, 3000),
    "checksum": _frame(TEXT[:CLUSTER], write_checksum=True),
    "no-content-size": _stream_frame(TEXT[:CLUSTER]),
    "skippable-frame-first": SKIPPABLE + _frame(TEXT[:CLUSTER]),
}


@pytest.mark.parametrize("name", list(ZSTD_GOOD))
def test_zstd_payloads_qemu_reads(bases: Bases, tmp_path: Path, name: str, zstd_decoder: str) -> None:
    img = _cluster_patched(copy(bases.zstd, tmp_path), ZSTD_GOOD[name])
    got = reads_like_qemu(img)
    assert got[:CLUSTER] == TEXT[:CLUSTER]


ZSTD_BAD = {
    # a frame that claims (and holds) twice the cluster: a decompression bomb, refused before decoding
    "bomb-content-size": (_frame(bytes(2 * CLUSTER)), ("overflows the cluster",)),
    # the same without a content size: decoding stops at one cluster and the unfinished frame is an error
    "bomb-streamed": (_stream_frame(bytes(2 * CLUSTER)), ("zstd",)),
    "huge-bomb-streamed": (_stream_frame(bytes(8 * MiB)), ("zstd",)),
    # the second frame does not end where the cluster ends
    "frames-overshoot": (_frame(TEXT[: CLUSTER // 2]) + _frame(TEXT[:CLUSTER]), ("overflows the cluster",)),
    "truncated": (_frame(TEXT[:CLUSTER])[:-200], ("zstd",)),
    "short": (_frame(TEXT[: CLUSTER - 512]), ("zstd",)),
    "not-zstd": (pattern(11, 4000), ("zstd: bad frame magic",)),
    "zeros": (bytes(1024), ("zstd",)),
}


@pytest.mark.parametrize("name", list(ZSTD_BAD))
def test_zstd_payloads_qemu_refuses(bases: Bases, tmp_path: Path, name: str, zstd_decoder: str) -> None:
    payload, words = ZSTD_BAD[name]
    img = _cluster_patched(copy(bases.zstd, tmp_path), payload)
    read_fails(img, 100, 512, CorruptImage, "compressed cluster at host offset", "guest offset 0x0", *words)
    assert qemu_io_read_fails(img, 0, 512)
    # the other cluster is unaffected
    with bootkit.qcow2.open(img) as image:
        assert image.pread(CLUSTER, CLUSTER) == pattern(5, CLUSTER)


def test_zstd_empty_frame_before_the_data(bases: Bases, tmp_path: Path, zstd_decoder: str) -> None:
    """An empty frame makes input progress, so QEMU's ZSTD_decompressStream loop goes on to the next one."""
    img = _cluster_patched(copy(bases.zstd, tmp_path), _frame(b"") + _frame(TEXT[:CLUSTER]))
    got = reads_like_qemu(img)
    assert got[:CLUSTER] == TEXT[:CLUSTER]


# deflate payloads other writers may produce, each checked against QEMU, through both of bootkit's inflaters
# (libdeflate when the system has it, zlib otherwise; zlib also decides whatever libdeflate does not accept)


def _deflate(data: bytes, wbits: int = -12, zdict: bytes = b"", finish: bool = True) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, wbits, zdict=zdict) if zdict else zlib.compressobj(6, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)


def _blocks(data: bytes) -> bytes:
    """Stored, fixed-Huffman and dynamic blocks in one stream: pieces ended by full flushes, concatenated."""
    stored = zlib.compressobj(0, zlib.DEFLATED, -12)
    fixed = zlib.compressobj(1, zlib.DEFLATED, -12, 8, zlib.Z_FIXED)
    dynamic = zlib.compressobj(9, zlib.DEFLATED, -12)
    return (
        stored.compress(data[:5000]) + stored.flush(zlib.Z_FULL_FLUSH)
        + fixed.compress(data[5000:30000]) + fixed.flush(zlib.Z_FULL_FLUSH)
        + dynamic.compress(data[30000:]) + dynamic.flush()
    )


#: 8 KiB of text repeated: a 32 KiB window reaches 8 KiB back, a 4 KiB one cannot
REPEATS = TEXT[:8192] * 8
LONG = TEXT[: 2 * CLUSTER]

DEFLATE_GOOD = {
    # written with zlib's default 32 KiB window (QEMU inflates a cluster in one call: every distance inside
    # the cluster's output is valid, whatever windowBits it was opened with)
    "window-32k": (_deflate(REPEATS, wbits=-15), REPEATS),
    "trailing-garbage": (_deflate(TEXT[:CLUSTER]) + pattern(9, 3000), TEXT[:CLUSTER]),
    # a stream that goes on past the cluster: QEMU stops when the buffer is full (Z_BUF_ERROR is fine)
    "longer-than-the-cluster": (_deflate(LONG), LONG[:CLUSTER]),
    "stored-fixed-dynamic-blocks": (_blocks(TEXT[:CLUSTER]), TEXT[:CLUSTER]),
}

DEFLATE_BAD = {
    "short": (_deflate(TEXT[: CLUSTER - 512]), "ends after 65024 of 65536 bytes"),
    # distances into a preset dictionary: before the start of the cluster
    "distance-before-the-start": (_deflate(TEXT[:CLUSTER], zdict=TEXT[:CLUSTER]), "invalid distance too far back"),
    "not-deflate": (pattern(11, 4000), "deflate"),
    "zeros": (bytes(1024), "deflate"),
}



def _flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


_VALID = _deflate(TEXT[:CLUSTER])

#: payloads judged by QEMU alone: bootkit must fail where it fails and read what it reads
DEFLATE_AS_QEMU = {
    # no final block: after the full output QEMU's inflate() reads on into the sector padding
    "no-final-block": _deflate(TEXT[:CLUSTER], finish=False),
    "truncated": _VALID[:-300],
    **{f"bit-{bit}-flipped": _flipped(_VALID, bit) for bit in (0, 1, 2, 9, 40, 77, 130, 300, 1000, 4000)},
    **{f"bit-{bit}-from-the-end-flipped": _flipped(_VALID, 8 * len(_VALID) - bit) for bit in (1, 9, 17, 33)},
}


def _decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, library: Any, fallback: str,
             which: Callable[[], str]) -> str:
    """Run the test through ``request.param``: the C library (setup.sh installs it), or the fallback."""
    if request.param == fallback:
        monkeypatch.setattr(library, "api", False)
    else:
        assert library.load(), f"{library.soname} is not loadable"
    assert which() == request.param
    return str(request.param)


@pytest.fixture(params=["libdeflate", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return _decoder(request, monkeypatch, compress.LIBDEFLATE, "zlib", compress.inflater)


@pytest.fixture(params=["libzstd", "zstandard"])
def zstd_decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return _decoder(request, monkeypatch, compress.LIBZSTD, "zstandard", compress.zstd_decoder)


@pytest.mark.parametrize("name", list(DEFLATE_GOOD))
def test_deflate_payloads_qemu_reads(bases: Bases, tmp_path: Path, name: str, inflater: str) -> None:
    payload, data = DEFLATE_GOOD[name]
    img = _cluster_patched(copy(bases.deflate, tmp_path), payload)
    got = reads_like_qemu(img)  # whole clusters: decoded in place
    assert got[:CLUSTER] == data[:CLUSTER]
    with bootkit.qcow2.open(img) as image:  # part of a cluster: through the decoded-cluster cache
        assert image.pread(100, 5000) == data[100:5100]


@pytest.mark.parametrize("name", list(DEFLATE_BAD))
def test_deflate_payloads_qemu_refuses(bases: Bases, tmp_path: Path, name: str, inflater: str) -> None:
    payload, words = DEFLATE_BAD[name]
    img = _cluster_patched(copy(bases.deflate, tmp_path), payload)
    assert qemu_io_read_fails(img, 0, 512)
    read_fails(img, 100, 512, CorruptImage, "compressed cluster at host offset", "guest offset 0x0", words)
    read_fails(img, 0, CLUSTER, CorruptImage, "compressed cluster at host offset", words)
    with bootkit.qcow2.open(img) as image:
        assert image.pread(CLUSTER, CLUSTER) == pattern(5, CLUSTER)


@pytest.mark.parametrize("name", list(DEFLATE_AS_QEMU))
def test_deflate_payloads_as_qemu(bases: Bases, tmp_path: Path, name: str, inflater: str) -> None:
    img = _cluster_patched(copy(bases.deflate, tmp_path), DEFLATE_AS_QEMU[name])
    if qemu_io_read_fails(img, 0, 512):
        read_fails(img, 0, CLUSTER, CorruptImage, "compressed cluster at host offset", "deflate")
        read_fails(img, 100, 512, CorruptImage, "compressed cluster at host offset", "deflate")
    else:
        reads_like_qemu(img)


def _damaged_zstd(seed: int) -> bytes:
    """A real frame with one to four bytes changed (header, first blocks or anywhere)."""
    rng = random.Random(seed)
    frame = bytearray(_frame(TEXT[:CLUSTER], write_checksum=bool(seed & 1), write_content_size=bool(seed & 2)))
    for _ in range(rng.choice((1, 1, 2, 4))):
        pos = rng.randrange(min(len(frame), rng.choice((8, 32, 400, len(frame)))))
        frame[pos] = rng.randrange(256) if rng.random() < 0.5 else frame[pos] ^ (1 << rng.randrange(8))
    return bytes(frame)


@pytest.mark.parametrize("seed", range(40))
def test_damaged_zstd_payloads_as_qemu(bases: Bases, tmp_path: Path, seed: int) -> None:
    """Through libzstd bootkit runs QEMU's own decoding loop: a damaged frame reads, or fails, as in QEMU
    (with the zstandard module, which decodes frames whole with its own zstd, it often did not)."""
    assert compress.zstd_decoder() == "libzstd"
    img = _cluster_patched(copy(bases.zstd, tmp_path), _damaged_zstd(seed))
    if qemu_io_read_fails(img, 0, 512):
        read_fails(img, 0, CLUSTER, CorruptImage, "compressed cluster at host offset", "zstd")
    else:
        reads_like_qemu(img)


def test_compressed_cluster_in_an_image_with_a_data_file(tmp_path: Path) -> None:
    img = create(tmp_path / "df.qcow2", 1 * MiB, options=["data_file=df.data"])
    qemu_io(img, "write -P 0x55 0 128k")
    poke(img, l2_entry_offset(img, 0), ">Q", compressed_descriptor(16, 0x50000, 1))
    poke(img, l2_entry_offset(img, CLUSTER), ">Q", QCOW_OFLAG_COPIED | 0x20000)  # host != guest offset
    poke(img, l2_entry_offset(img, 3 * CLUSTER), ">Q", QCOW_OFLAG_COPIED | 0x20000 | 1)  # zero, allocated
    read_fails(img, 0, 512, CorruptImage, "compressed cluster", "external data file")
    read_fails(img, CLUSTER, 512, CorruptImage, "host offset 0x20000 does not match guest offset 0x10000")
    read_fails(img, 3 * CLUSTER, 512, CorruptImage, "host offset 0x20000 does not match guest offset 0x30000")
    assert all(qemu_io_read_fails(img, off, 512) for off in (0, CLUSTER, 3 * CLUSTER))


# --- path rules: backing files and data files --------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the image's, holding a perfectly good qcow2 base image."""
    d = tmp_path / "outside"
    d.mkdir()
    base = create(d / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x99 0 64k")
    return d


@pytest.fixture
def imgdir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def _top(imgdir: Path, backing: str, fmt: str = "qcow2", name: str = "top.qcow2") -> Path:
    # -u: no check that the name resolves (it is written verbatim, as an attacker would)
    img = create(imgdir / name, 1 * MiB)
    tool("qemu-img", "rebase", "-u", "-b", backing, "-F", fmt, img)
    return img


def test_backing_absolute_path_outside_the_directory(imgdir: Path, outside: Path) -> None:
    top = _top(imgdir, str(outside / "base.qcow2"))
    open_fails(top, UnsafePath, "backing file", str(outside / "base.qcow2"), "outside the image's directory")
    # what the caller allows or names explicitly is followed
    with bootkit.qcow2.open(top, allow_dirs=(str(outside),)) as image:
        assert image.pread(0, 64 * KiB) == b"\x99" * (64 * KiB)
    with bootkit.qcow2.open(top, backing=outside / "base.qcow2") as image:
        assert image.pread(0, 64 * KiB) == b"\x99" * (64 * KiB)
    assert reads_like_qemu(top, backing=outside / "base.qcow2")[:1] == b"\x99"
    # an absolute name inside the image's own directory is fine
    shutil.copyfile(outside / "base.qcow2", imgdir / "base.qcow2")
    inside = _top(imgdir, str(imgdir / "base.qcow2"), name="inside.qcow2")
    assert reads_like_qemu(inside)[:1] == b"\x99"


def test_backing_dotdot_escape(imgdir: Path, outside: Path) -> None:
    top = _top(imgdir, "../outside/base.qcow2")
    open_fails(top, UnsafePath, "'../outside/base.qcow2'", "outside the image's directory")
    # ".." that ends next to the image is fine
    (imgdir / "layers").mkdir()
    shutil.copyfile(outside / "base.qcow2", imgdir / "base.qcow2")
    inside = _top(imgdir, "layers/../base.qcow2", name="inside.qcow2")
    assert reads_like_qemu(inside)[:1] == b"\x99"


def test_backing_in_a_subdirectory_needs_allow_dir(imgdir: Path) -> None:
    """An image in a home directory names .ssh/id_rsa as its raw backing file: not followed by default
    (bootkit convert would print the key), only with --allow-dir or --backing."""
    key = b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n"
    (imgdir / ".ssh").mkdir()
    (imgdir / ".ssh" / "id_rsa").write_bytes(key.ljust(64 * KiB, b"\0"))
    shutil.copyfile(imgdir / ".ssh" / "id_rsa", imgdir / "decoy.raw")
    top = create(imgdir / "top.qcow2", 64 * KiB, backing="decoy.raw", backing_fmt="raw")
    tool("qemu-img", "rebase", "-u", "-b", ".ssh/id_rsa", "-F", "raw", top)
    assert qemu_raw(top)[: len(key)] == key  # QEMU itself follows it
    message = open_fails(top, UnsafePath)
    assert message == (
        f"{top}: backing file '.ssh/id_rsa' is in a subdirectory of the image's directory; only files right"
        f" next to the image are followed: pass it explicitly (--backing) or allow its directory"
        f" (--allow-dir {imgdir / '.ssh'})"
    )
    # the same through the command line: one line, exit status 2, nothing of the key on stdout
    out = subprocess.run(
        [sys.executable, "-m", "bootkit", "convert", str(top), "-"], capture_output=True, timeout=120
    )
    assert (out.returncode, out.stdout, out.stderr.decode()) == (2, b"", f"error: {message}\n")
    # an absolute name into the subdirectory is the same thing
    tool("qemu-img", "rebase", "-u", "-b", str(imgdir / ".ssh" / "id_rsa"), "-F", "raw", top)
    open_fails(top, UnsafePath, "in a subdirectory", "--allow-dir")
    # what the caller allows or names is followed
    with bootkit.qcow2.open(top, allow_dirs=(str(imgdir / ".ssh"),)) as image:
        assert image.pread(0, len(key)) == key
    with bootkit.qcow2.open(top, allow_dirs=(str(imgdir),)) as image:
        assert image.pread(0, len(key)) == key
    with bootkit.qcow2.open(top, backing=imgdir / ".ssh" / "id_rsa") as image:
        assert image.pread(0, len(key)) == key


def test_data_file_in_a_subdirectory_needs_allow_dir(imgdir: Path) -> None:
    (imgdir / "data").mkdir()
    img = create(imgdir / "df.qcow2", 1 * MiB, options=["data_file=data/disk.data"])
    qemu_io(img, "write -P 0x5d 0 64k")
    open_fails(img, UnsafePath, "data file 'data/disk.data' is in a subdirectory", "(--data-file)", "--allow-dir")
    with bootkit.qcow2.open(img, allow_dirs=(str(imgdir / "data"),)) as image:
        assert image.pread(0, 64 * KiB) == b"\x5d" * (64 * KiB)


def test_backing_symlink_escape(imgdir: Path, outside: Path) -> None:
    (imgdir / "base.qcow2").symlink_to(outside / "base.qcow2")
    top = _top(imgdir, "base.qcow2")
    open_fails(top, UnsafePath, "'base.qcow2'", "outside the image's directory")
    # a symlink whose target is inside the directory is followed
    shutil.copyfile(outside / "base.qcow2", imgdir / "real.qcow2")
    (imgdir / "alias.qcow2").symlink_to("real.qcow2")
    inside = _top(imgdir, "alias.qcow2", name="inside.qcow2")
    assert reads_like_qemu(inside)[:1] == b"\x99"


def test_backing_directory_prefix_is_not_the_directory(tmp_path: Path) -> None:
    """/x/images-evil is not inside /x/images (a string-prefix check would say it is)."""
    imgdir = tmp_path / "images"
    evil = tmp_path / "images-evil"
    imgdir.mkdir()
    evil.mkdir()
    create(evil / "base.qcow2", 1 * MiB)
    top = _top(imgdir, "../images-evil/base.qcow2")
    open_fails(top, UnsafePath, "outside the image's directory")


def test_backing_loop(imgdir: Path) -> None:
    a = create(imgdir / "a.qcow2", 1 * MiB)
    b = create(imgdir / "b.qcow2", 1 * MiB)
    tool("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    tool("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b)
    open_fails(a, InvalidImage, "backing chain loop", "a.qcow2")
    selfref = create(imgdir / "self.qcow2", 1 * MiB)
    tool("qemu-img", "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", selfref)
    open_fails(selfref, InvalidImage, "backing chain loop")
    # the same file under another name is the same file
    os.link(imgdir / "self.qcow2", imgdir / "hardlink.qcow2")
    h = create(imgdir / "h.qcow2", 1 * MiB)
    tool("qemu-img", "rebase", "-u", "-b", "hardlink.qcow2", "-F", "qcow2", h)
    tool("qemu-img", "rebase", "-u", "-b", "h.qcow2", "-F", "qcow2", imgdir / "hardlink.qcow2")
    open_fails(h, InvalidImage, "backing chain loop")


def test_chain_deeper_than_the_cap(imgdir: Path) -> None:
    create(imgdir / "l0.qcow2", 1 * MiB)
    qemu_io(imgdir / "l0.qcow2", "write -P 0x77 0 4k")
    for i in range(1, 18):
        create(imgdir / f"l{i}.qcow2", 1 * MiB, backing=f"l{i - 1}.qcow2")
    # l16 has 16 backing files below it: the default cap; l17 has one more
    with bootkit.qcow2.open(imgdir / "l16.qcow2") as image:
        assert len(image.chain()) == 17
        assert image.pread(0, 4 * KiB) == b"\x77" * (4 * KiB)
    open_fails(imgdir / "l17.qcow2", InvalidImage, "backing chain is deeper than 16")
    open_fails(imgdir / "l3.qcow2", InvalidImage, "deeper than 2", max_chain_depth=2)


def test_backing_format_foo(imgdir: Path) -> None:
    create(imgdir / "base.qcow2", 1 * MiB)
    top = create(imgdir / "top.qcow2", 1 * MiB, backing="base.qcow2")
    ((_, at, _),) = [e for e in extensions(top) if e[0] == EXT_BACKING_FORMAT]
    poke(top, at, ">II8s", EXT_BACKING_FORMAT, 3, b"foo")
    open_fails(top, UnsupportedFeature, "backing file format 'foo'")
    assert qemu_io_read_fails(top, 0, 512)


def test_backing_format_too_long(imgdir: Path) -> None:
    create(imgdir / "base.qcow2", 1 * MiB)
    top = create(imgdir / "top.qcow2", 1 * MiB, backing="base.qcow2")
    ((_, at, _),) = [e for e in extensions(top) if e[0] == EXT_BACKING_FORMAT]
    poke(top, at, ">II16sII", EXT_BACKING_FORMAT, 16, b"qcow2qcow2qcow2q", 0, 0)  # and end the list there
    open_fails(top, InvalidImage, "backing format header extension too long")


def test_extension_area_overlapping_the_backing_name(imgdir: Path) -> None:
    create(imgdir / "base.qcow2", 1 * MiB)
    top = create(imgdir / "top.qcow2", 1 * MiB, backing="base.qcow2")
    (_, first_at, _) = extensions(top)[0]
    poke_field(top, "backing_file_offset", first_at + 8)  # the name now starts inside the first extension
    open_fails(top, InvalidImage, "header extension too large", f"offset {first_at:#x}")
    assert qemu_refuses(top)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_format_raw_on_a_qcow2_file_is_read_as_raw(imgdir: Path, compat: str) -> None:
    """The backing-format extension is obeyed: a qcow2 file named as raw is served as its raw bytes.

    Version 2 images carry the extension too (bootkit ignored it there and probed the file before)."""
    base = create(imgdir / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x99 0 64k")
    top = create(imgdir / "top.qcow2", 2 * MiB, backing="base.qcow2", backing_fmt="raw",
                 options=[f"compat={compat}"])
    assert read_field(top, "version") == (2 if compat == "0.10" else 3)
    got = reads_like_qemu(top)
    assert got[:4] == b"QFI\xfb"
    assert got[: base.stat().st_size] == base.read_bytes()


def test_backing_without_format_extension_is_probed(imgdir: Path) -> None:
    base = create(imgdir / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x99 0 64k")
    top = create(imgdir / "top.qcow2", 1 * MiB, backing="base.qcow2")
    ((_, at, _),) = [e for e in extensions(top) if e[0] == EXT_BACKING_FORMAT]
    poke(top, at, ">II", 0x12345678, 5)  # now an unknown extension: no format given
    with bootkit.qcow2.open(top) as image:
        assert image.pread(0, 4) == b"\x99" * 4


def test_backing_name_with_a_nul(imgdir: Path) -> None:
    """QEMU keeps the name as a C string: the NUL ends it (bootkit raised ValueError from os.open before)."""
    base = create(imgdir / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x99 0 64k")
    top = create(imgdir / "top.qcow2", 1 * MiB, backing="base.qcow2")
    offset = read_field(top, "backing_file_offset")
    poke(top, offset, ">13s", b"base.qcow2\0/x")
    poke_field(top, "backing_file_size", 13)
    assert reads_like_qemu(top)[:1] == b"\x99"
    # a name that is empty as a C string is no backing file at all, for QEMU and for bootkit
    poke(top, offset, ">1s", b"\0")
    got = reads_like_qemu(top)
    assert got == bytes(len(got))


def test_missing_backing_file(imgdir: Path) -> None:
    top = _top(imgdir, "nonexistent.qcow2")
    open_fails(top, ImageError, "nonexistent.qcow2", "cannot open")
    assert qemu_io_read_fails(top, 0, 512)


def test_data_file_outside_the_directory(imgdir: Path, outside: Path) -> None:
    data = outside / "disk.data"
    img = create(imgdir / "df.qcow2", 1 * MiB, options=[f"data_file={data}"])
    qemu_io(img, "write -P 0x5d 0 64k")
    open_fails(img, UnsafePath, "data file", str(data), "outside the image's directory")
    with bootkit.qcow2.open(img, data_file=data) as image:
        assert image.pread(0, 64 * KiB) == b"\x5d" * (64 * KiB)
    with bootkit.qcow2.open(img, allow_dirs=(str(outside),)) as image:
        assert image.pread(0, 64 * KiB) == b"\x5d" * (64 * KiB)
    # the same through "../"
    ((_, at, length),) = [e for e in extensions(img) if e[0] == EXT_DATA_FILE]
    rel = b"../outside/disk.data"
    assert len(rel) <= length
    poke(img, at, f">II{(length + 7) & ~7}s", EXT_DATA_FILE, len(rel), rel)
    open_fails(img, UnsafePath, "'../outside/disk.data'")


def test_data_file_missing(imgdir: Path) -> None:
    img = create(imgdir / "df.qcow2", 1 * MiB, options=["data_file=df.data"])
    (imgdir / "df.data").unlink()
    open_fails(img, ImageError, "df.data", "cannot open")
    assert qemu_io_read_fails(img, 0, 512)


def test_resolver_sees_every_named_file(imgdir: Path) -> None:
    base = create(imgdir / "base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x99 0 64k")
    top = create(imgdir / "top.qcow2", 1 * MiB, backing="base.qcow2")
    asked: list[tuple[str, str]] = []

    def resolver(name: str, what: str, referrer: Any) -> BytesSource:
        asked.append((name, what))
        return BytesSource((imgdir / name).read_bytes(), name=f"mem:{name}")

    with bootkit.qcow2.open(BytesSource(top.read_bytes(), name="mem:top"), resolver=resolver) as image:
        assert image.pread(0, 4) == b"\x99" * 4
    assert asked == [("base.qcow2", "backing file")]

