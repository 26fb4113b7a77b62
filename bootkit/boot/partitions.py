"""Which partition or filesystem of a disk holds the root: GPT, MBR or a bare filesystem.

Reads the partition table and the filesystem superblocks itself, from anything with ``pread(offset, n)``
(the QCOW2 image's guest view, a raw disk file, a block device), so the choice is made from the image the
boot code has verified, without blkid and without a round trip through the kernel NBD device.

References: UEFI 2.10 §5.3 (GPT header and entries), the MBR layout (partition table at 0x1BE, logical
partitions in an EBR chain numbered from 5, Linux's ``PARTUUID=<signature>-<NN>``), the Discoverable
Partitions Specification (root x86-64 type 4f68bce3-e8cd-4db1-96e7-fbcaf984b709, attribute bit 63
"no-auto"), and the superblock layouts blkid reads: ext2/3/4 (``s_magic`` 0xEF53 at 1024+0x38), XFS
("XFSB"), btrfs ("_BHRfS_M" at 64 KiB+0x40), FAT12/16/32 boot sectors, squashfs ("hsqs"), EROFS
(0xE0F5E1E2 at 1024).

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import struct
import zlib
from typing import List, Optional, Protocol, Set

from bootkit.boot.cmdline import RootSpec
from bootkit.errors import BootkitError
from bootkit.record import record

SECTOR = 512

#: Discoverable Partitions Specification: root partition, x86-64
DPS_ROOT_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
#: GPT partition attribute: do not mount automatically (DPS)
GPT_ATTR_NO_AUTO = 1 << 63

#: filesystems a Linux root can be; vfat is not one (an EFI system partition is never the root)
LINUX_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "squashfs", "erofs")

_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_MBR_EXTENDED = (0x05, 0x0F, 0x85)


class RootNotFound(BootkitError):
    """No partition or filesystem matches what the root should be."""


class Reader(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...


@record
class Filesystem:
    type: str
    uuid: str = ""
    label: str = ""


@record
class Partition:
    """A partition (``number`` >= 1) or, with number 0, the whole disk holding a bare filesystem."""

    number: int
    start: int
    size: int
    #: "gpt", "mbr" or "none" (bare filesystem)
    table: str
    #: GPT type GUID (lower case) or MBR type as two hex digits
    type: str = ""
    partuuid: str = ""
    attributes: int = 0
    fs: Optional[Filesystem] = None

    def describe(self) -> str:
        where = "whole disk" if self.number == 0 else f"partition {self.number}"
        fs = self.fs.type if self.fs else "no filesystem"
        label = f" LABEL={self.fs.label}" if self.fs and self.fs.label else ""
        return f"{where} ({fs}{label})"


class _At:
    """A reader shifted to a partition's start."""

    def __init__(self, reader: Reader, base: int) -> None:
        self.reader, self.base = reader, base

    def pread(self, offset: int, length: int) -> bytes:
        return self.reader.pread(self.base + offset, length)


def _uuid(raw: bytes) -> str:
    """The 8-4-4-4-12 text form of 16 bytes in network order (filesystem UUIDs); the uuid module is not
    imported for it: it brings platform with it, and every module costs boot time under an emulated CPU."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _guid(raw: bytes) -> str:
    """The same for a GPT GUID, whose first three fields are little-endian."""
    return _uuid(raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:16])


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def probe_filesystem(reader: Reader) -> Optional[Filesystem]:
    """The filesystem at offset 0 of ``reader``, with its UUID and label, or None."""
    head = reader.pread(0, 4096)
    if len(head) < 2048:
        return None
    # ext2/3/4: superblock at 1024
    sb = head[1024:2048]
    if struct.unpack_from("<H", sb, 0x38)[0] == 0xEF53:
        compat, incompat = struct.unpack_from("<II", sb, 0x5C)
        kind = "ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2"  # extents|64bit|flex_bg
        return Filesystem(kind, _uuid(sb[0x68:0x78]), _cstr(sb[0x78:0x88]))
    if head[:4] == b"XFSB":
        return Filesystem("xfs", _uuid(head[32:48]), _cstr(head[108:120]))
    if head[:4] == b"hsqs":
        return Filesystem("squashfs")
    if struct.unpack_from("<I", head, 1024)[0] == 0xE0F5E1E2:
        return Filesystem("erofs", _uuid(head[1024 + 0x30 : 1024 + 0x40]), _cstr(head[1024 + 0x40 : 1024 + 0x50]))
    fat = _probe_fat(head)
    if fat is not None:
        return fat
    bt = reader.pread(0x10000, 0x1000)
    if len(bt) >= 0x22B and bt[0x40:0x48] == b"_BHRfS_M":
        return Filesystem("btrfs", _uuid(bt[0x20:0x30]), _cstr(bt[0x12B:0x22B]))
    return None


def _probe_fat(boot: bytes) -> Optional[Filesystem]:
    if boot[510:512] != b"\x55\xaa" or boot[0] not in (0xEB, 0xE9):
        return None
    bytes_per_sector = struct.unpack_from("<H", boot, 11)[0]
    if bytes_per_sector not in (512, 1024, 2048, 4096):
        return None
    if boot[0x52:0x57] == b"FAT32":
        serial, label = struct.unpack_from("<I", boot, 0x43)[0], boot[0x47:0x52]
    elif boot[0x36:0x39] == b"FAT":
        serial, label = struct.unpack_from("<I", boot, 0x27)[0], boot[0x2B:0x36]
    else:
        return None
    text = label.decode("ascii", "replace").strip()
    return Filesystem("vfat", f"{serial >> 16:04X}-{serial & 0xFFFF:04X}", "" if text == "NO NAME" else text)


def read_gpt(reader: Reader) -> Optional[List[Partition]]:
    """GPT partitions (non-empty entries), or None when LBA 1 holds no valid GPT header."""
    raw = reader.pread(SECTOR, SECTOR)
    if len(raw) < _GPT_HEADER.size or raw[:8] != b"EFI PART":
        return None
    (_sig, _rev, header_size, header_crc, _r, _cur, _backup, _first, _last, _disk_guid, entries_lba,
     count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)  # fmt: skip
    if not 92 <= header_size <= SECTOR:
        raise RootNotFound(f"GPT header: header_size {header_size} out of range")
    check = bytearray(raw[:header_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(bytes(check)) != header_crc:
        raise RootNotFound("GPT header: CRC mismatch")
    if entry_size < _GPT_ENTRY.size or count > 4096:
        raise RootNotFound(f"GPT header: {count} entries of {entry_size} bytes is not a partition array")
    table = reader.pread(entries_lba * SECTOR, count * entry_size)
    if zlib.crc32(table) != entries_crc:
        raise RootNotFound("GPT partition entries: CRC mismatch")
    parts = []
    for i in range(count):
        type_raw, unique, first, last, attrs, _name = _GPT_ENTRY.unpack_from(table, i * entry_size)
        if type_raw == bytes(16):
            continue
        start, size = first * SECTOR, (last - first + 1) * SECTOR
        parts.append(Partition(i + 1, start, size, "gpt", _guid(type_raw), _guid(unique), attrs,
                               probe_filesystem(_At(reader, start))))  # fmt: skip
    return parts


def read_mbr(reader: Reader) -> Optional[List[Partition]]:
    """MBR partitions (primary 1-4, logical from 5), or None without a boot signature."""
    mbr = reader.pread(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    signature = struct.unpack_from("<I", mbr, 0x1B8)[0]
    parts: List[Partition] = []

    def add(number: int, ptype: int, lba: int, sectors: int) -> None:
        start = lba * SECTOR
        fs = probe_filesystem(_At(reader, start))
        parts.append(Partition(number, start, sectors * SECTOR, "mbr", f"{ptype:02x}",
                               f"{signature:08x}-{number:02x}", 0, fs))  # fmt: skip

    extended = []
    for i in range(4):
        _status, _chs, ptype, _chs2, lba, sectors = _MBR_ENTRY.unpack_from(mbr, 0x1BE + 16 * i)
        if ptype == 0 or sectors == 0:
            continue
        if ptype in _MBR_EXTENDED:
            extended.append(lba)
        else:
            add(i + 1, ptype, lba, sectors)
    number = 5
    for ext_base in extended[:1]:
        ebr_lba = ext_base
        seen: Set[int] = set()
        while ebr_lba not in seen and len(seen) < 128:
            seen.add(ebr_lba)
            ebr = reader.pread(ebr_lba * SECTOR, SECTOR)
            if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
                break
            _s, _c, ptype, _c2, rel, sectors = _MBR_ENTRY.unpack_from(ebr, 0x1BE)
            if ptype and sectors:
                add(number, ptype, ebr_lba + rel, sectors)
                number += 1
            _s, _c, ntype, _c2, nrel, nsectors = _MBR_ENTRY.unpack_from(ebr, 0x1CE)
            if ntype not in _MBR_EXTENDED or not nsectors:
                break
            ebr_lba = ext_base + nrel
    return parts


def read_disk(reader: Reader, size: int) -> List[Partition]:
    """The partitions of a disk, or one pseudo-partition 0 for a bare filesystem; [] when it is neither."""
    fs = probe_filesystem(reader)
    if fs is not None and fs.type != "vfat":
        # a filesystem superblock at the start of the disk: no partition table (ext4's is at 1024, after
        # where an MBR would be, but an MBR disk never has one there)
        return [Partition(0, 0, size, "none", fs=fs)]
    gpt = read_gpt(reader)
    if gpt is not None:
        return gpt
    if fs is not None:  # a bare FAT: its boot sector has the MBR signature too
        return [Partition(0, 0, size, "none", fs=fs)]
    mbr = read_mbr(reader)
    return mbr if mbr is not None else []


def choose_root(parts: List[Partition], spec: RootSpec) -> Partition:
    """The partition ``spec`` names; by default the DPS root partition, else the only Linux filesystem."""
    if not parts:
        raise RootNotFound("no partition table and no filesystem on the disk")
    summary = ", ".join(p.describe() for p in parts)
    if spec.kind == "number":
        for p in parts:
            if p.number == int(spec.value):
                if p.fs is None:
                    raise RootNotFound(f"rd.qcow2.root={spec}: partition {p.number} holds no known filesystem")
                return p
        raise RootNotFound(f"rd.qcow2.root={spec}: no such partition (disk has: {summary})")
    if spec.kind in ("label", "uuid", "partuuid"):
        matches = [p for p in parts if _matches(p, spec)]
        if not matches:
            raise RootNotFound(f"rd.qcow2.root={spec}: no partition or filesystem matches (disk has: {summary})")
        if len(matches) > 1:
            raise RootNotFound(f"rd.qcow2.root={spec}: matches {len(matches)} partitions")
        if matches[0].fs is None:
            raise RootNotFound(f"rd.qcow2.root={spec}: partition {matches[0].number} holds no known filesystem")
        return matches[0]
    dps = [p for p in parts if p.type == DPS_ROOT_X86_64 and not p.attributes & GPT_ATTR_NO_AUTO]
    if dps:
        if dps[0].fs is None:
            raise RootNotFound(f"root partition {dps[0].number} (DPS root type) holds no known filesystem")
        return dps[0]
    linux = [p for p in parts if p.fs is not None and (p.number == 0 or p.fs.type in LINUX_FILESYSTEMS)]
    if len(linux) == 1:
        return linux[0]
    if not linux:
        raise RootNotFound(f"no root filesystem found (disk has: {summary})")
    raise RootNotFound(
        f"no partition has the root type and {len(linux)} hold Linux filesystems ({summary}): "
        "choose one with rd.qcow2.root="
    )


def _matches(p: Partition, spec: RootSpec) -> bool:
    if spec.kind == "partuuid":
        return p.partuuid.lower() == spec.value.lower()
    if p.fs is None:
        return False
    if spec.kind == "label":
        return p.fs.label == spec.value
    return p.fs.uuid.lower() == spec.value.lower()
