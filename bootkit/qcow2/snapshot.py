"""Internal snapshots: the snapshot table (QEMU docs/interop/qcow2.rst "Snapshots"; block/qcow2-snapshot.c
``qcow2_do_read_snapshots``). A snapshot is a saved L1 table; reading the disk "as of" a snapshot means
mapping through that L1 instead of the active one. VM state stored after the disk is never exposed.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Sequence

from bootkit.errors import InvalidImage
from bootkit.log import log
from bootkit.qcow2.header import INT64_MAX, Header
from bootkit.source import ByteSource

# QCowSnapshotHeader (block/qcow2.h): l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024


class Snapshot(NamedTuple):
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int  # -1: not recorded


def read_snapshots(source: ByteSource, header: Header) -> List[Snapshot]:
    """Parse and validate the whole snapshot table."""
    snapshots: List[Snapshot] = []
    incomplete: List[int] = []
    offset = header.snapshots_offset
    for i in range(header.nb_snapshots):
        offset = (offset + 7) & ~7
        if offset - header.snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise InvalidImage(f"{source.name}: snapshot table is too big")
        raw = _pread_table(source, offset, SNAPSHOT_HEADER.size, i)
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state_size, extra_size) = (
            SNAPSHOT_HEADER.unpack(raw)
        )
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise InvalidImage(f"{source.name}: too much extra metadata in snapshot table entry {i}")
        if header.version >= 3 and extra_size < 16:
            # The spec requires 16 bytes of extra data in v3, but QEMU only reports this in 'qemu-img check'
            # and opens the image (the disk size then defaults to the image's): so do we.
            incomplete.append(i)
        body_len = extra_size + id_len + name_len
        body = _pread_table(source, offset + SNAPSHOT_HEADER.size, body_len, i)
        extra = body[:extra_size]
        vm_state_large = struct.unpack_from(">Q", extra, 0)[0] if extra_size >= 8 else vm_state_size
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16 else header.size
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_size >= 24 else -1
        if icount == (1 << 64) - 1:
            icount = -1
        # QEMU keeps id and name as C strings: a NUL inside ends them (and "s2\0\0" is found as "s2").
        ident = body[extra_size : extra_size + id_len].split(b"\0", 1)[0].decode("utf-8", "replace")
        name = body[extra_size + id_len :].split(b"\0", 1)[0].decode("utf-8", "replace")
        snapshots.append(
            Snapshot(ident, name, l1_offset, l1_size, disk_size, vm_state_large, date_sec, date_nsec, vm_clock, icount)
        )
        offset += SNAPSHOT_HEADER.size + body_len
    if offset - header.snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE:
        raise InvalidImage(f"{source.name}: snapshot table is too big")
    if incomplete:
        log.warning("%s: %d snapshot table entries are incomplete (v3 needs 16 bytes of extra data), first: %d",
                    source.name, len(incomplete), incomplete[0])
    return snapshots


def _pread_table(source: ByteSource, offset: int, length: int, index: int) -> bytes:
    """Bytes of the snapshot table; past the end of the file they read as zeros, as QEMU's block layer
    returns them (an image whose table lies past its end opens in QEMU, with empty entries)."""
    if offset + length > INT64_MAX:  # bdrv_check_request: EIO ("Failed to read snapshot table")
        raise InvalidImage(f"{source.name}: snapshot table entry {index} at offset {offset:#x} is out of range")
    data = source.pread(offset, length)
    return data + bytes(length - len(data)) if len(data) < length else data


def find_snapshot(snapshots: Sequence[Snapshot], wanted: str, image_name: str) -> Snapshot:
    """Pick a snapshot by id or name, as ``qemu-img convert -l`` does: an exact id wins, then a name."""
    for sn in snapshots:
        if sn.id == wanted:
            return sn
    matches = [sn for sn in snapshots if sn.name == wanted]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidImage(f"{image_name}: snapshot name {wanted!r} is ambiguous; use its id")
    known = ", ".join(f"{sn.id}:{sn.name}" for sn in snapshots) or "none"
    raise InvalidImage(f"{image_name}: no snapshot {wanted!r} (snapshots: {known})")
