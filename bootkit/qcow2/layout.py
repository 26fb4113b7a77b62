"""Where the writer puts each host cluster, and the metadata that describes it: L2/L1 entries, refcounts, header.

References: QEMU docs/interop/qcow2.rst ("Header", "Host cluster management", "Cluster mapping"),
block/qcow2.h (``QCOW_OFLAG_*``, ``csize_shift``), block/qcow2-cluster.c
``qcow2_alloc_compressed_cluster_offset`` (the compressed descriptor), block/qcow2-refcount.c
``qcow2_alloc_bytes`` (compressed data packed byte by byte, straddling host clusters) and
``check_refcounts_l2`` (what ``qemu-img check`` counts: every host cluster a compressed cluster's
sector-rounded range touches gets one reference per compressed cluster).

The file is laid out in one pass, in guest order, so its bytes depend only on the input:

    cluster 0            header, header extensions, backing file name (written last)
    clusters 1..         data: compressed clusters packed end to end, uncompressed clusters and L2 tables
                         cluster-aligned (the partial cluster they skip is filled by later compressed data
                         that fits, as qcow2_alloc_bytes does)
    then                 L1 table, refcount blocks, refcount table

Runs inside the initramfs package: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import struct
import sys
from array import array
from typing import List, NamedTuple, Optional, Tuple

from bootkit.qcow2.header import (
    COMPRESSION_DEFLATE,
    HEADER_V2,
    HEADER_V3,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_END,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW_MAGIC,
    size_to_l1,
)
from bootkit.qcow2.image import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO

#: QEMU's header length for version 3 since 5.1: the compression_type byte at 104, padded to 8 bytes
HEADER_LENGTH = 112
#: 16-bit refcounts, QEMU's default
REFCOUNT_ORDER = 4
MAX_REFCOUNT = (1 << (1 << REFCOUNT_ORDER)) - 1
SECTOR = 512


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class Layout:
    """Host space of the file being written: hands out offsets and counts references to each cluster.

    ``place_*`` return where the caller must write the bytes; ``end`` is the first byte past everything
    placed so far. Refcounts are kept for every host cluster (two bytes each: 32 MiB for 1 TiB of output in
    64 KiB clusters), exactly as ``qemu-img check`` will count them.
    """

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        #: QEMU's csize_shift: the compressed descriptor's sector count starts at this bit
        self.csize_shift = 62 - (cluster_bits - 8)
        self.refcounts = array("H", [1])  # cluster 0: the header
        self.end = self.cluster_size
        # The unused tail of a cluster that a cluster-aligned placement skipped: (start, end); compressed
        # data that fits goes there first.
        self._gap: Optional[Tuple[int, int]] = None

    def _ref(self, first: int, last: int) -> None:
        """One more reference to each host cluster from ``first`` to ``last`` (cluster indexes, inclusive)."""
        refs = self.refcounts
        if last >= len(refs):
            refs.frombytes(bytes(2 * (last + 1 - len(refs))))
        for i in range(first, last + 1):
            refs[i] += 1

    def place_cluster(self) -> int:
        """A whole, cluster-aligned host cluster (an uncompressed data cluster or an L2 table): refcount 1."""
        start = align_up(self.end, self.cluster_size)
        if start != self.end:
            self._gap = (self.end, start)
        self.end = start + self.cluster_size
        self._ref(start >> self.cluster_bits, start >> self.cluster_bits)
        return start

    def place_compressed(self, size: int) -> int:
        """Room for ``size`` bytes of one compressed cluster (QEMU's qcow2_alloc_bytes); returns its offset.

        Every host cluster its sector-rounded range touches gets a reference (check_refcounts_l2 counts the
        range ``coffset .. coffset + nb_csectors * 512 - (coffset & 511)``).
        """
        gap = self._gap
        if gap is not None and gap[1] - gap[0] >= size and self.refcounts_at(gap[0]) < MAX_REFCOUNT:
            start = gap[0]
            self._gap = (start + size, gap[1]) if gap[1] - start - size >= SECTOR else None
        else:
            start = self.end
            if self.refcounts_at(start) >= MAX_REFCOUNT:  # tiny clusters: never overflow a 16-bit refcount
                start = align_up(start, self.cluster_size)
            self.end = start + size
        # the sector-rounded end never reaches another cluster than the last byte's: clusters are whole sectors
        self._ref(start >> self.cluster_bits, (start + size - 1) >> self.cluster_bits)
        return start

    def share_compressed(self, offset: int, size: int) -> bool:
        """One more reference to the compressed cluster placed at ``offset`` (another guest cluster with the
        same bytes points at it); False, and nothing counted, when a host cluster it touches is at
        MAX_REFCOUNT."""
        first, last = offset >> self.cluster_bits, (offset + size - 1) >> self.cluster_bits
        if any(self.refcounts[i] >= MAX_REFCOUNT for i in range(first, last + 1)):
            return False
        self._ref(first, last)
        return True

    def refcounts_at(self, offset: int) -> int:
        index = offset >> self.cluster_bits
        return self.refcounts[index] if index < len(self.refcounts) else 0

    def compressed_entry(self, offset: int, size: int) -> int:
        """The L2 entry of a compressed cluster (qcow2_alloc_compressed_cluster_offset)."""
        nb_csectors = ((offset + size - 1) >> 9) - (offset >> 9)  # sectors after the first
        return QCOW_OFLAG_COMPRESSED | (nb_csectors << self.csize_shift) | offset

    def place_tables(self, l1_size: int) -> Tuple[int, int, int, int]:
        """Place the L1 table, then the refcount blocks and table after everything else.

        Returns (l1_offset, refcount_table_offset, refcount_table_clusters, first refcount block offset).
        The refcount blocks must count themselves and the table: grow both until they cover it all.
        """
        cs = self.cluster_size
        l1_offset = 0
        start = align_up(self.end, cs)
        if l1_size:
            l1_offset = start
            start += align_up(l1_size * 8, cs)
        first = start >> self.cluster_bits
        per_block = cs * 8 >> REFCOUNT_ORDER
        blocks = table = 0
        while True:
            total = first + blocks + table
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // cs)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        for index in range((l1_offset >> self.cluster_bits) if l1_size else first, first + blocks + table):
            self._ref(index, index)
        blocks_offset = first << self.cluster_bits
        self.end = blocks_offset + (blocks + table) * cs
        return l1_offset, blocks_offset + blocks * cs, table, blocks_offset

    def refcount_table(self, blocks_offset: int, table_offset: int, table_clusters: int) -> bytes:
        """The refcount table: one entry per refcount block, zero-padded to ``table_clusters`` clusters."""
        cs = self.cluster_size
        entries = array("Q", range(blocks_offset, table_offset, cs))
        entries.extend([0] * (table_clusters * cs // 8 - len(entries)))
        return table_bytes(entries)

    def refcount_blocks(self) -> bytes:
        """All refcount blocks, big-endian, zero-padded to whole clusters."""
        refs = array("H", self.refcounts)
        if sys.byteorder == "little":
            refs.byteswap()
        data = refs.tobytes()
        return data + bytes(align_up(len(data), self.cluster_size) - len(data))


class HeaderFields(NamedTuple):
    """What the header says beyond the layout: the disk, its compression and its backing file."""

    virtual_size: int
    compression_type: int
    backing_file: Optional[str]
    backing_format: Optional[str]


def l1_entries(virtual_size: int, cluster_bits: int) -> int:
    """size_to_l1 for standard (not extended) L2 entries: cluster_size / 8 entries per L2 table."""
    return size_to_l1(virtual_size, cluster_bits, cluster_bits - 3)


def l2_entry_data(offset: int) -> int:
    """An uncompressed cluster with refcount 1: QCOW_OFLAG_COPIED, as QEMU and qemu-img check expect."""
    return offset | QCOW_OFLAG_COPIED


L2_ZERO = QCOW_OFLAG_ZERO  # reads as zeros, no host cluster (QCOW2_CLUSTER_ZERO_PLAIN, version 3)
L1_ENTRY_COPIED = QCOW_OFLAG_COPIED


def header_cluster(
    fields: HeaderFields, cluster_bits: int, l1_size: int, l1_offset: int, reftable_offset: int, reftable_clusters: int
) -> bytes:
    """Cluster 0: the version 3 header, the backing format extension, the end marker, the backing name."""
    incompatible = 0 if fields.compression_type == COMPRESSION_DEFLATE else QCOW2_INCOMPAT_COMPRESSION
    extensions = b""
    if fields.backing_format is not None:
        fmt = fields.backing_format.encode()
        extensions += struct.pack(">II", QCOW2_EXT_MAGIC_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    extensions += struct.pack(">II", QCOW2_EXT_MAGIC_END, 0)
    name = fields.backing_file.encode() if fields.backing_file is not None else b""
    backing_offset = HEADER_LENGTH + len(extensions) if name else 0
    head = HEADER_V2.pack(
        QCOW_MAGIC,
        3,
        backing_offset,
        len(name),
        cluster_bits,
        fields.virtual_size,
        0,  # crypt_method
        l1_size,
        l1_offset,
        reftable_offset,
        reftable_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
    ) + HEADER_V3.pack(incompatible, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
    head += bytes([fields.compression_type]) + bytes(HEADER_LENGTH - len(head) - 1)
    data = head + extensions + name
    assert len(data) <= 1 << cluster_bits
    return data


def table_bytes(entries: "array[int]") -> bytes:
    """A table of 64-bit entries, big-endian, as stored on disk."""
    table = array("Q", entries)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


__all__: List[str] = ["HeaderFields", "Layout", "header_cluster", "l1_entries", "table_bytes"]
