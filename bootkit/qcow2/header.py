"""QCOW2 header, header extensions and feature bits: parsed and validated eagerly at open.

References: QEMU docs/interop/qcow2.rst ("Header", "Header extensions", "Feature name table"), block/qcow2.h
(``QCowHeader``, feature masks, limits) and block/qcow2.c ``qcow2_do_open``/``qcow2_read_extensions``, whose
checks are mirrored here in the same order so that a broken image fails on the same field QEMU names.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

from bootkit.errors import InvalidImage, UnsupportedFeature
from bootkit.source import ByteSource

QCOW_MAGIC = b"QFI\xfb"

# The version 2 header (72 bytes) and the version 3 additional fields (32 bytes), QCowHeader in block/qcow2.h.
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
HEADER_V3 = struct.Struct(">QQQII")
V2_HEADER_LENGTH = HEADER_V2.size  # 72
V3_HEADER_LENGTH = HEADER_V2.size + HEADER_V3.size  # 104
COMPRESSION_TYPE_OFFSET = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_L2_CLUSTER_BITS_EXTL2 = 14  # subclusters (cluster_size / 32) must be at least 512 bytes
QCOW_MAX_L1_SIZE = 0x2000000  # bytes of L1 table (32 MiB)
QCOW_MAX_REFTABLE_SIZE = 0x800000
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_BACKING_NAME = 1023
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

# Incompatible feature bits (QCOW2_INCOMPAT_*)
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = 0x1F
# Autoclear feature bits
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1

KNOWN_INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
KNOWN_COMPAT_NAMES = {0: "lazy refcounts"}
KNOWN_AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

# Header extension types
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441
EXTENSION_NAMES = {
    QCOW2_EXT_MAGIC_BACKING_FORMAT: "backing file format",
    QCOW2_EXT_MAGIC_FEATURE_TABLE: "feature name table",
    QCOW2_EXT_MAGIC_CRYPTO_HEADER: "full disk encryption header pointer",
    QCOW2_EXT_MAGIC_BITMAPS: "bitmaps",
    QCOW2_EXT_MAGIC_DATA_FILE: "external data file name",
}

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "deflate", COMPRESSION_ZSTD: "zstd"}
CRYPT_NAMES = {0: "none", 1: "AES", 2: "LUKS"}


class Header(NamedTuple):
    """The header fields, with the spec's names; v3 fields are their v2 defaults in a v2 image."""

    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE


class Extension(NamedTuple):
    type: int
    offset: int  # of the extension's data in the file
    data: bytes


class HeaderInfo(NamedTuple):
    """Everything read from the first cluster: header, extensions and what they name."""

    header: Header
    extensions: Tuple[Extension, ...]
    backing_file: Optional[str]
    backing_format: Optional[str]
    data_file: Optional[str]
    feature_names: Dict[Tuple[int, int], str]  # (type, bit) -> name, from the feature name table

    @property
    def cluster_size(self) -> int:
        return 1 << self.header.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.header.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    def feature_list(self, kind: int, bits: int) -> List[str]:
        """Names of the set ``bits`` of feature ``kind`` (0 incompatible, 1 compatible, 2 autoclear)."""
        known = (KNOWN_INCOMPAT_NAMES, KNOWN_COMPAT_NAMES, KNOWN_AUTOCLEAR_NAMES)[kind]
        names = []
        for bit in range(64):
            if bits & (1 << bit):
                names.append(self.feature_names.get((kind, bit)) or known.get(bit) or f"unknown bit {bit}")
        return names


def size_to_l1(size: int, cluster_bits: int, l2_bits: int) -> int:
    """Number of L1 entries needed to map ``size`` bytes (QEMU's size_to_l1)."""
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def validate_table(
    what: str, offset: int, entries: int, entry_len: int, max_size_bytes: int, cluster_size: int
) -> None:
    """QEMU's qcow2_validate_table: a table's size and offset must be sane before anything reads it."""
    if entries > max_size_bytes // entry_len:
        raise InvalidImage(f"{what} too large: {entries} entries")
    size = entries * entry_len
    if INT64_MAX - size < offset or offset % cluster_size:
        raise InvalidImage(f"{what} offset invalid: {offset:#x}")


def _decode_name(raw: bytes) -> str:
    # Names are not NUL-terminated in the file, but a NUL ends them for QEMU (strings are C strings there).
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def read_header(source: ByteSource) -> HeaderInfo:
    """Read and validate the header and its extensions; raises InvalidImage / UnsupportedFeature."""
    name = source.name
    first = source.pread(0, V2_HEADER_LENGTH)
    if len(first) < 4 or first[:4] != QCOW_MAGIC:
        raise InvalidImage(f"{name}: not a qcow2 image (magic is {first[:4]!r}, expected {QCOW_MAGIC!r})")
    if len(first) < V2_HEADER_LENGTH:
        raise InvalidImage(f"{name}: file too short for a qcow2 header ({len(first)} bytes)")
    v2 = HEADER_V2.unpack(first)
    version = v2[1]
    if version not in (2, 3):
        raise UnsupportedFeature(f"{name}: unsupported qcow2 version {version} (field version at offset 4)")
    cluster_bits = v2[4]
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImage(
            f"{name}: unsupported cluster size 2^{cluster_bits} (field cluster_bits at offset 20 must be "
            f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
        )
    cluster_size = 1 << cluster_bits

    if version == 2:
        header = Header(*v2)
    else:
        rest = source.pread(V2_HEADER_LENGTH, HEADER_V3.size)
        if len(rest) < HEADER_V3.size:
            raise InvalidImage(f"{name}: file too short for a version 3 qcow2 header")
        incompat, compat, autoclear, refcount_order, header_length = HEADER_V3.unpack(rest)
        if header_length < V3_HEADER_LENGTH:
            raise InvalidImage(f"{name}: qcow2 header too short (header_length {header_length} < 104)")
        if header_length > cluster_size:
            raise InvalidImage(f"{name}: qcow2 header exceeds cluster size (header_length {header_length})")
        if header_length % 8:
            raise InvalidImage(f"{name}: header_length {header_length} is not a multiple of 8")
        compression_type = COMPRESSION_DEFLATE
        if header_length > COMPRESSION_TYPE_OFFSET:
            byte = source.pread(COMPRESSION_TYPE_OFFSET, 1)
            if len(byte) != 1:
                raise InvalidImage(f"{name}: file too short for header_length {header_length}")
            compression_type = byte[0]
        header = Header(*v2, incompat, compat, autoclear, refcount_order, header_length, compression_type)  # type: ignore[call-arg]

    if header.backing_file_offset > cluster_size:
        raise InvalidImage(f"{name}: invalid backing file offset {header.backing_file_offset:#x}")

    extensions, feature_names = _read_extensions(source, header, cluster_size)
    info_kw = _interpret_extensions(name, header, extensions)
    info_kw["backing_file"] = read_backing_name(source, header)

    unknown = header.incompatible_features & ~QCOW2_INCOMPAT_MASK
    if unknown:
        partial = HeaderInfo(header, extensions, None, None, None, feature_names)
        names = ", ".join(partial.feature_list(0, unknown))
        raise UnsupportedFeature(f"{name}: unsupported incompatible qcow2 feature(s): {names}")
    if header.refcount_order > 6:
        raise InvalidImage(f"{name}: reference count entry width too large (refcount_order {header.refcount_order})")
    if header.crypt_method:
        method = CRYPT_NAMES.get(header.crypt_method)
        if method is None:
            raise InvalidImage(f"{name}: unsupported encryption method {header.crypt_method} (field crypt_method)")
        raise UnsupportedFeature(
            f"{name}: {method}-encrypted images are not supported; decrypt with 'qemu-img convert' first"
        )
    _validate_compression(name, header)
    if header.incompatible_features & QCOW2_INCOMPAT_EXTL2 and cluster_bits < MIN_L2_CLUSTER_BITS_EXTL2:
        raise InvalidImage(
            f"{name}: unsupported subcluster size {cluster_size // 32} (extended L2 needs clusters >= 16 KiB)"
        )
    if header.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW and not (
        header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE
    ):
        raise InvalidImage(f"{name}: data-file-raw autoclear bit requires a data file")

    # Tables, in qcow2_do_open's order.
    if header.refcount_table_clusters == 0:
        raise InvalidImage(f"{name}: image does not contain a reference count table")
    try:
        validate_table(
            "Reference count table",
            header.refcount_table_offset,
            header.refcount_table_clusters,
            cluster_size,
            QCOW_MAX_REFTABLE_SIZE,
            cluster_size,
        )
    except InvalidImage as e:
        raise InvalidImage(f"{name}: {e}") from None
    if header.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise InvalidImage(f"{name}: snapshot table too large ({header.nb_snapshots} snapshots)")
    if header.snapshots_offset % cluster_size or header.snapshots_offset > INT64_MAX:
        raise InvalidImage(f"{name}: snapshot table offset invalid: {header.snapshots_offset:#x}")
    l2_bits = cluster_bits - (4 if header.incompatible_features & QCOW2_INCOMPAT_EXTL2 else 3)
    try:
        validate_table(
            "Active L1 table", header.l1_table_offset, header.l1_size, 8, QCOW_MAX_L1_SIZE, cluster_size
        )
    except InvalidImage as e:
        raise InvalidImage(f"{name}: {e}") from None
    needed = size_to_l1(header.size, cluster_bits, l2_bits)
    if needed > INT_MAX:
        raise InvalidImage(f"{name}: image is too big (virtual size {header.size})")
    if header.l1_size < needed:
        raise InvalidImage(
            f"{name}: L1 table is too small: l1_size {header.l1_size} covers less than the virtual size "
            f"{header.size} (needs {needed})"
        )
    return HeaderInfo(header, extensions, feature_names=feature_names, **info_kw)


def _read_extensions(
    source: ByteSource, header: Header, cluster_size: int
) -> Tuple[Tuple[Extension, ...], Dict[Tuple[int, int], str]]:
    """Walk the extension area [header_length, backing_file_offset or cluster_size) (qcow2_read_extensions)."""
    name = source.name
    # Version 2 images have extensions too, right after the 72-byte header: QEMU writes the backing format
    # there for compat=0.10 images and qcow2_do_open reads them whatever the version. Skipping them would
    # mean probing a backing file that the image says is raw.
    start = header.header_length
    end = header.backing_file_offset if header.backing_file_offset else cluster_size
    size = max(0, end - start)
    # Read the area as far as the extensions go (4 KiB first, then doubling), not the whole first cluster:
    # opening an image over HTTP should not fetch 2 MiB because its clusters are 2 MiB.
    area = bytearray()

    def need(n: int) -> None:
        if len(area) < n:
            want = min(size, max(n, 2 * len(area), 4096))
            area.extend(source.pread(start + len(area), want - len(area)))
            area.extend(bytes(want - len(area)))  # past the end of the file QEMU's block layer reads zeros

    extensions: List[Extension] = []
    seen = set()
    pos = 0
    while pos < size:
        # qcow2_read_extensions checks the bounds before looking at the type: an end marker whose length
        # field reaches past the area, or a header cut by the area's end, is "Header extension too large".
        if pos + 8 > size:
            raise InvalidImage(f"{name}: header extension too large (header at offset {start + pos:#x} is cut "
                               f"by the end of the extension area at {end:#x})")
        need(pos + 8)
        ext_type, ext_len = struct.unpack_from(">II", area, pos)
        data_off = start + pos + 8
        if ext_len > end - data_off:
            raise InvalidImage(
                f"{name}: header extension too large (type {ext_type:#x} at offset {start + pos:#x}, "
                f"length {ext_len})"
            )
        if ext_type == QCOW2_EXT_MAGIC_END:
            break
        if ext_type in seen:
            raise InvalidImage(f"{name}: duplicate header extension type {ext_type:#x} at offset {start + pos:#x}")
        seen.add(ext_type)
        need(pos + 8 + ext_len)
        data = bytes(area[pos + 8 : pos + 8 + ext_len])
        extensions.append(Extension(ext_type, data_off, data))
        pos += 8 + ((ext_len + 7) & ~7)
    feature_names: Dict[Tuple[int, int], str] = {}
    for ext in extensions:
        if ext.type == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            for i in range(len(ext.data) // 48):
                ftype, bit = ext.data[i * 48], ext.data[i * 48 + 1]
                feature_names[(ftype, bit)] = _decode_name(ext.data[i * 48 + 2 : i * 48 + 48])
    return tuple(extensions), feature_names


def _interpret_extensions(
    name: str, header: Header, extensions: Tuple[Extension, ...]
) -> Dict[str, Optional[str]]:
    backing_file = None
    if header.backing_file_offset and (
        header.backing_file_size > QCOW_MAX_BACKING_NAME
        or header.backing_file_size > (1 << header.cluster_bits) - header.backing_file_offset
    ):
        raise InvalidImage(f"{name}: backing file name too long (backing_file_size {header.backing_file_size})")
    backing_format = None
    data_file = None
    for ext in extensions:
        if ext.type == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if len(ext.data) >= 16:  # QEMU: must fit bs->backing_format[16] with its NUL
                raise InvalidImage(f"{name}: backing format header extension too long ({len(ext.data)} bytes)")
            backing_format = _decode_name(ext.data)
        elif ext.type == QCOW2_EXT_MAGIC_DATA_FILE:
            data_file = _decode_name(ext.data)
        elif ext.type == QCOW2_EXT_MAGIC_CRYPTO_HEADER:
            if header.crypt_method != 2:
                raise InvalidImage(f"{name}: full disk encryption header extension is only valid with LUKS")
            if len(ext.data) != 16:
                raise InvalidImage(f"{name}: invalid full disk encryption header extension length {len(ext.data)}")
        elif ext.type == QCOW2_EXT_MAGIC_BITMAPS:
            # qcow2_read_extensions checks the length first, even when a cleared autoclear bit says the
            # bitmaps are stale ("bitmaps_ext: Invalid extension length"); the rest only if they are live.
            if len(ext.data) != 24:
                raise InvalidImage(f"{name}: bitmaps header extension has length {len(ext.data)}, expected 24")
            if header.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
                _check_bitmaps_extension(name, ext, 1 << header.cluster_bits)
    return {"backing_file": backing_file, "backing_format": backing_format, "data_file": data_file}


def _check_bitmaps_extension(name: str, ext: Extension, cluster_size: int) -> None:
    if len(ext.data) != 24:
        raise InvalidImage(f"{name}: bitmaps header extension has length {len(ext.data)}, expected 24")
    nb_bitmaps, reserved, dir_size, dir_offset = struct.unpack(">IIQQ", ext.data)
    if reserved:
        raise InvalidImage(f"{name}: bitmaps header extension: reserved field is not zero")
    if not 1 <= nb_bitmaps <= 65535:
        raise InvalidImage(f"{name}: bitmaps header extension: invalid nb_bitmaps {nb_bitmaps}")
    if dir_size > 1024 * 65535:
        raise InvalidImage(f"{name}: bitmaps header extension: bitmap directory too large ({dir_size})")
    if dir_offset % cluster_size:
        raise InvalidImage(f"{name}: bitmaps header extension: bitmap directory offset {dir_offset:#x} unaligned")


def _validate_compression(name: str, header: Header) -> None:
    """qcow2.c validate_compression_type: the incompatible bit 3 is set iff the type is not deflate."""
    bit = bool(header.incompatible_features & QCOW2_INCOMPAT_COMPRESSION)
    if header.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeature(f"{name}: unknown compression type {header.compression_type} (field compression_type)")
    if header.compression_type == COMPRESSION_DEFLATE and bit:
        raise InvalidImage(f"{name}: compression type incompatible feature bit must not be set for deflate")
    if header.compression_type != COMPRESSION_DEFLATE and not bit:
        raise InvalidImage(f"{name}: compression type incompatible feature bit must be set for compression_type "
                           f"{header.compression_type}")


def read_backing_name(source: ByteSource, header: Header) -> Optional[str]:
    """The backing file name stored at backing_file_offset (not NUL-terminated), or None."""
    if not header.backing_file_offset or not header.backing_file_size:
        return None
    raw = source.pread(header.backing_file_offset, header.backing_file_size)
    if len(raw) < header.backing_file_size:
        raise InvalidImage(f"{source.name}: backing file name reaches past end of file")
    # QEMU keeps the name as a C string: a NUL ends it (and a NUL would make os.open raise ValueError).
    return _decode_name(raw) or None
