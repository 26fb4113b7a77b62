"""Cluster mapping and reads: the L1/L2 walk of one image, and reads through its backing chain.

References: QEMU docs/interop/qcow2.rst "Cluster mapping" and "Extended L2 Entries"; block/qcow2.h
``qcow2_get_cluster_type``/``qcow2_get_subcluster_type``; block/qcow2-cluster.c ``qcow2_get_host_offset``
(the checks done at read time, with QEMU's messages) and ``qcow2_parse_compressed_l2_entry``.

The seam between mapping and I/O is ``_layer_runs``: a generator of runs ``(kind, guest offset, length, host
offset, compressed size)`` of one layer. Reads, ``extents`` (``bootkit map``, NBD block status) and ``check``
all consume it.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from array import array
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar, Union

from bootkit.errors import CorruptImage, ImageError
from bootkit.log import log
from bootkit.qcow2.compress import Decoder, decoder_for
from bootkit.qcow2.header import (
    COMPRESSION_NAMES,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    HeaderInfo,
)
from bootkit.qcow2.snapshot import Snapshot
from bootkit.source import ByteSource, FileSource

# L1/L2 entry bits (block/qcow2.h)
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_SUBCLUSTERS = 32

# Run kinds of one layer, and the extent kinds of a whole chain (strings: they are part of the API)
DATA = "data"
ZERO = "zero"
UNALLOCATED = "unallocated"
COMPRESSED = "compressed"


class Run(NamedTuple):
    """A stretch of guest bytes that one layer maps the same way."""

    kind: str
    offset: int  # guest offset
    length: int
    host: int  # DATA: host offset of ``offset``; ZERO: host offset or -1; COMPRESSED: cluster's coffset
    csize: int  # COMPRESSED: compressed size in bytes (else 0)


class Extent(NamedTuple):
    """A stretch of the disk as the whole chain answers it (like one row of ``qemu-img map``)."""

    kind: str  # data | zero | unallocated | compressed
    offset: int
    length: int
    host_offset: Optional[int]  # in ``source``: data runs; zero clusters that keep an allocation
    depth: int  # chain level that answered (0: this image); for unallocated: the number of levels
    source: Optional[ByteSource]
    compressed_size: int = 0


_ZEROS = bytes(1 << 20)
#: most compressed bytes read with one pread for the whole clusters of one read
_BATCH_MAX = 4 << 20


def zero_fill(dst: memoryview) -> None:
    n = len(dst)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        dst[pos : pos + step] = _ZEROS[:step]
        pos += step


def read_into(source: ByteSource, offset: int, dst: memoryview) -> None:
    """Fill ``dst`` from ``source`` at ``offset``; bytes past the source's end read as zeros (QEMU block/io.c)."""
    if isinstance(source, FileSource):
        got = source.preadinto(offset, dst) if offset < source.size else 0
    elif isinstance(source, Image):
        got = source.readinto(offset, dst)
    else:
        data = source.pread(offset, len(dst))
        got = len(data)
        dst[:got] = data
    if got < len(dst):
        zero_fill(dst[got:])


class _LRU:
    """A thread-safe LRU cache bounded in bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._items: OrderedDict[int, Tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: int) -> object:
        with self._lock:
            return self._hit(key)

    def _hit(self, key: int) -> object:
        """The value cached at ``key`` (now the most recently used), or None; counts the hit or miss. The
        caller holds the lock."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: int, value: object, cost: int) -> List[object]:
        """Cache ``value``; returns the values evicted to make room."""
        evicted: List[object] = []
        if cost > self.budget:
            return evicted
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
                evicted.append(old[0])
            self._items[key] = (value, cost)
            self.used += cost
            while self.used > self.budget:
                _, (v, c) = self._items.popitem(last=False)
                self.used -= c
                evicted.append(v)
        return evicted


class _ClusterCache(_LRU):
    """Decoded clusters. Values are only ever read under the lock (``copy``), so an evicted buffer is in
    nobody's hands and is reused for the next decode: a fresh 64 KiB bytearray is memory to zero and fault
    in (about 5 us a cluster, measured, against a 50 us zstd decode)."""

    def __init__(self, budget: int, cluster_size: int) -> None:
        super().__init__(budget)
        self._cluster_size = cluster_size
        self._spare: List[bytearray] = []

    def copy(self, key: int, start: int, dst: memoryview) -> bool:
        """Copy ``len(dst)`` bytes at ``start`` of the cluster cached at ``key`` into ``dst``; False on a miss."""
        with self._lock:
            data = self._hit(key)
            if data is None:
                return False
            dst[:] = memoryview(data)[start : start + len(dst)]  # type: ignore[arg-type]
            return True

    def buffer(self) -> bytearray:
        """A buffer for one decoded cluster: an evicted one when there is one."""
        with self._lock:
            if self._spare:
                return self._spare.pop()
        return bytearray(self._cluster_size)

    def keep(self, key: int, data: bytearray) -> None:
        """Cache a decoded cluster; the caller lets go of ``data``."""
        evicted = self.put(key, data, self._cluster_size)
        if evicted:
            with self._lock:
                room = 4 - len(self._spare)
                self._spare.extend(b for b in evicted[:room] if isinstance(b, bytearray))


class Image:
    """An open QCOW2 image (read-only): a disk of ``virtual_size`` bytes, itself a byte source.

    Thread-safe: any number of threads may call ``pread``/``readinto``/``extents`` at once.
    """

    def __init__(
        self,
        source: ByteSource,
        info: HeaderInfo,
        *,
        l1: array,  # type: ignore[type-arg]
        virtual_size: int,
        snapshots: List[Snapshot],
        snapshot: Optional[Snapshot],
        backing: Optional[ByteSource],
        data_file: Optional[ByteSource],
        l2_cache_bytes: int,
        cluster_cache_bytes: int,
        owned: Tuple[ByteSource, ...] = (),
    ) -> None:
        h = info.header
        self.source = source
        self.name = source.name
        self.info = info
        self.header = h
        self.snapshots = snapshots
        self.snapshot = snapshot
        self.backing = backing
        self.data_file = data_file
        self.virtual_size = virtual_size
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.extended_l2 = info.extended_l2
        self.compression = COMPRESSION_NAMES[h.compression_type]
        self._owned = owned
        self._l1 = l1
        self._entry_words = 2 if self.extended_l2 else 1
        self.l2_bits = self.cluster_bits - (4 if self.extended_l2 else 3)
        self._l2_entries = 1 << self.l2_bits
        self._l1_shift = self.cluster_bits + self.l2_bits
        self.subcluster_bits = self.cluster_bits - (5 if self.extended_l2 else 0)
        # compressed descriptor layout (qcow2.c qcow2_do_open)
        self._csize_shift = 62 - (self.cluster_bits - 8)
        self._csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._decode: Optional[Decoder] = decoder_for(h.compression_type)
        self._l2_cache = _LRU(l2_cache_bytes)
        self._cluster_cache = _ClusterCache(cluster_cache_bytes, self.cluster_size)
        self._v2 = h.version == 2
        if h.incompatible_features & QCOW2_INCOMPAT_DIRTY:
            log.warning("%s: the dirty bit is set (refcounts may be stale); reading read-only", self.name)
        if h.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
            log.warning("%s: the image is marked corrupt; reading read-only with every entry bounds-checked",
                        self.name)

    # -- byte source interface ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.virtual_size

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` guest bytes at ``offset``; short only at the end of the disk."""
        n = max(0, min(length, self.virtual_size - offset))
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: Union[bytearray, memoryview], plan: Optional[List[Run]] = None) -> int:
        """Fill ``buf`` with guest bytes from ``offset``; returns the count (short only at end of disk).

        ``plan``: what ``plan(offset, len(buf))`` returned, so that a caller who looked at it first (a server
        choosing the thread for a request) does not pay for the mapping twice. Raises CorruptImage for a
        broken table entry or compressed cluster inside the range.
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self.virtual_size - offset))
        # whole compressed clusters are decoded straight into place (the cache is for partial reads), and
        # those whose data lie together in the file are read with one pread: a batch
        batch: List[Run] = []
        low = high = 0
        for run in self._layer_runs(offset, n) if plan is None else plan:
            kind = run.kind
            if kind == COMPRESSED and run.length == self.cluster_size:
                if batch and low <= run.host <= high and run.host + run.csize - low <= _BATCH_MAX:
                    high = max(high, run.host + run.csize)
                else:
                    if batch:
                        self._decode_batch(batch, mv, offset)
                    batch, low, high = [], run.host, run.host + run.csize
                batch.append(run)
                continue
            if batch:
                self._decode_batch(batch, mv, offset)
                batch = []
            dst = mv[run.offset - offset : run.offset - offset + run.length]
            if kind == DATA:
                read_into(self.data_file or self.source, run.host, dst)
            elif kind == COMPRESSED:
                self._cluster_into(run, dst)
            elif kind == ZERO or self.backing is None:
                zero_fill(dst)
            else:
                read_into(self.backing, run.offset, dst)
        if batch:
            self._decode_batch(batch, mv, offset)
        return n

    def _decode_batch(self, batch: List[Run], mv: memoryview, offset: int) -> None:
        """Decode whole clusters whose compressed data lie together in the file into their places: those not
        in the cache, from one read of the span they cover."""
        misses = []
        for run in batch:
            dst = mv[run.offset - offset : run.offset - offset + run.length]
            if not self._cluster_cache.copy(run.host, 0, dst):
                misses.append((run, dst))
        if not misses:
            return
        low = min(run.host for run, _ in misses)
        raw = self._read_compressed(low, max(run.host + run.csize for run, _ in misses) - low)
        for run, dst in misses:
            self._decode_checked(raw[run.host - low : run.host - low + run.csize], run, dst)

    def plan(self, offset: int, length: int) -> List[Run]:
        """This layer's runs over ``length`` bytes at ``offset`` (clamped to the disk): the work of a read."""
        n = max(0, min(length, self.virtual_size - offset))
        if n and not (offset ^ (offset + n - 1)) >> self.cluster_bits:
            # inside one cluster (most small reads): straight to its L2 entry, no generator chain to merge runs
            table, l2_offset = self._l2_table(offset >> self._l1_shift)
            if table is None:
                return [Run(UNALLOCATED, offset, n, -1, 0)]
            runs = self._runs_extended if self.extended_l2 else self._runs_standard
            return list(runs(table, l2_offset, offset, offset + n))
        return list(self._layer_runs(offset, n))

    def clusters_to_decode(self, plan: List[Run]) -> int:
        """How many compressed clusters reading ``plan`` decodes (here; a range left to a backing file counts
        as many, since what it holds is not looked up)."""
        below = self.backing is not None
        n = 0
        for r in plan:
            if r.kind == COMPRESSED:
                n += 1
            elif below and r.kind == UNALLOCATED:
                return sys.maxsize
        return n

    def close(self) -> None:
        for s in self._owned:
            s.close()
        self._owned = ()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<qcow2.Image {self.name!r} size={self.virtual_size}>"

    # -- chain ----------------------------------------------------------------------------------------------

    def chain(self) -> List[ByteSource]:
        """This image and its backing files, top first."""
        out: List[ByteSource] = [self]
        b = self.backing
        while b is not None:
            out.append(b)
            b = b.backing if isinstance(b, Image) else None
        return out

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        """How the whole chain maps [offset, offset+length), merged like ``qemu-img map``."""
        if length is None:
            length = self.virtual_size - offset
        length = max(0, min(length, self.virtual_size - offset))
        return _coalesce(self._extents(offset, length, 0), _mergeable)

    def _extents(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        for run in self._layer_runs(offset, length):
            if run.kind == DATA:
                yield Extent(DATA, run.offset, run.length, run.host, depth, self.data_file or self.source)
            elif run.kind == ZERO:
                host = None if run.host < 0 else run.host
                yield Extent(ZERO, run.offset, run.length, host, depth, self.data_file or self.source)
            elif run.kind == COMPRESSED:
                yield Extent(COMPRESSED, run.offset, run.length, run.host, depth, self.source, run.csize)
            elif self.backing is None:
                yield Extent(UNALLOCATED, run.offset, run.length, None, depth + 1, None)
            else:
                yield from _backing_extents(self.backing, run.offset, run.length, depth + 1)

    # -- the L1/L2 walk -----------------------------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> Tuple[Optional[array], int]:  # type: ignore[type-arg]
        """The L2 table for an L1 slot as an array of entries, and its offset (None, 0 if unallocated)."""
        if l1_index >= len(self._l1):
            return None, 0
        l2_offset = self._l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return None, 0
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImage(
                f"{self.name}: L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})"
            )
        table = self._l2_cache.get(l2_offset)
        if table is None:
            raw = self.source.pread(l2_offset, self.cluster_size)
            if len(raw) < self.cluster_size:  # past end of file: QEMU reads zeros there
                raw = raw + bytes(self.cluster_size - len(raw))
            table = array("Q", raw)
            if sys.byteorder == "little":
                table.byteswap()
            self._l2_cache.put(l2_offset, table, self.cluster_size)
        return table, l2_offset  # type: ignore[return-value]

    def _layer_runs(self, offset: int, length: int) -> Iterator[Run]:
        """Runs of this layer alone over [offset, offset+length), adjacent equal runs merged."""
        return _coalesce(self._table_runs(offset, length), _runs_join)

    def _table_runs(self, offset: int, length: int) -> Iterator[Run]:
        """Runs of this layer, L2 table by L2 table."""
        end = offset + length
        while offset < end:
            l1_index = offset >> self._l1_shift
            table_end = min(end, (l1_index + 1) << self._l1_shift)
            table, l2_offset = self._l2_table(l1_index)
            if table is None:
                pieces: Iterator[Run] = iter((Run(UNALLOCATED, offset, table_end - offset, -1, 0),))
            elif self.extended_l2:
                pieces = self._runs_extended(table, l2_offset, offset, table_end)
            else:
                pieces = self._runs_standard(table, l2_offset, offset, table_end)
            yield from pieces
            offset = table_end

    def _runs_standard(self, table: array, l2_offset: int, offset: int, end: int) -> Iterator[Run]:  # type: ignore[type-arg]
        cs = self.cluster_size
        bits = self.cluster_bits
        mask = self._l2_entries - 1
        last_index = ((end - 1) >> bits) & mask  # [offset, end) lies within this one L2 table
        while offset < end:
            in_cluster = offset & (cs - 1)
            l2_index = (offset >> bits) & mask
            entry = table[l2_index]
            if entry & QCOW_OFLAG_COMPRESSED:
                n = min(cs - in_cluster, end - offset)
                yield self._compressed_run(entry, offset, n)
                offset += n
                continue
            host = entry & L2E_OFFSET_MASK
            if entry & QCOW_OFLAG_ZERO:
                if self._v2:
                    raise CorruptImage(
                        f"{self.name}: zero cluster entry found in pre-v3 image "
                        f"(L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})"
                    )
                kind = ZERO
            elif host or (self.data_file is not None and entry & QCOW_OFLAG_COPIED):
                kind = DATA
            else:
                kind = UNALLOCATED
            if host or kind == DATA:  # ZERO_ALLOC is checked like a data cluster (qcow2_get_host_offset)
                self._check_aligned(host, l2_offset, l2_index)
                self._check_data_file(host, offset - in_cluster, l2_offset, l2_index)
            # The clusters that follow continue this run when their entries are the same but for a host offset
            # one cluster further: same flags, contiguous (hence aligned, and host == guest for a data file).
            # One integer comparison per cluster instead of a Run each (a 1 GiB image has 16384 clusters).
            allocated = kind == DATA or host != 0
            step = cs if allocated else 0
            last = last_index if not step else min(last_index, l2_index + (L2E_OFFSET_MASK + 1 - host) // cs - 1)
            j = l2_index + 1
            expected = entry + step
            while j <= last and table[j] == expected:
                j += 1
                expected += step
            n = min(end, offset - in_cluster + (j - l2_index) * cs) - offset
            yield Run(kind, offset, n, host + in_cluster if allocated else -1, 0)
            offset += n

    def _runs_extended(self, table: array, l2_offset: int, offset: int, end: int) -> Iterator[Run]:  # type: ignore[type-arg]
        """Extended L2 entries: 32 subclusters with allocation/zero bitmaps (qcow2_get_subcluster_type)."""
        cs = self.cluster_size
        sc_bits = self.subcluster_bits
        sc = 1 << sc_bits
        mask = self._l2_entries - 1
        while offset < end:
            in_cluster = offset & (cs - 1)
            l2_index = (offset >> self.cluster_bits) & mask
            entry, bitmap = table[2 * l2_index], table[2 * l2_index + 1]
            cluster_end = min(end, offset - in_cluster + cs)
            if entry & QCOW_OFLAG_COMPRESSED:  # the bitmap is reserved; QEMU ignores it
                yield self._compressed_run(entry, offset, cluster_end - offset)
                offset = cluster_end
                continue
            host = entry & L2E_OFFSET_MASK
            alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
            allocated = bool(host) or (self.data_file is not None and bool(entry & QCOW_OFLAG_COPIED))
            if (allocated and alloc & zero) or (not allocated and alloc):
                raise CorruptImage(
                    f"{self.name}: invalid cluster entry found (L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})"
                )
            if allocated:
                self._check_aligned(host, l2_offset, l2_index)
                self._check_data_file(host, offset - in_cluster, l2_offset, l2_index)
            while offset < cluster_end:
                sub = (offset & (cs - 1)) >> sc_bits
                bit = 1 << sub
                sub_end = min(cluster_end, (offset | (sc - 1)) + 1)
                pos = offset & (cs - 1)
                if zero & bit:
                    yield Run(ZERO, offset, sub_end - offset, host + pos if allocated else -1, 0)
                elif alloc & bit:
                    yield Run(DATA, offset, sub_end - offset, host + pos, 0)
                else:
                    yield Run(UNALLOCATED, offset, sub_end - offset, -1, 0)
                offset = sub_end

    def _compressed_run(self, entry: int, offset: int, n: int) -> Run:
        if self.data_file is not None:
            raise CorruptImage(f"{self.name}: compressed cluster at guest offset {offset:#x} in an image with an "
                               "external data file")
        desc = entry & ~(QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_COPIED)
        coffset = desc & self._coffset_mask
        nb_csectors = ((desc >> self._csize_shift) & self._csize_mask) + 1
        csize = nb_csectors * 512 - (coffset & 511)
        return Run(COMPRESSED, offset, n, coffset, csize)

    def _check_aligned(self, host: int, l2_offset: int, l2_index: int) -> None:
        if host & (self.cluster_size - 1):
            raise CorruptImage(
                f"{self.name}: cluster allocation offset {host:#x} unaligned "
                f"(L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})"
            )

    def _check_data_file(self, host: int, guest: int, l2_offset: int, l2_index: int) -> None:
        if self.data_file is not None and host != guest:
            raise CorruptImage(
                f"{self.name}: external data file host offset {host:#x} does not match guest offset {guest:#x} "
                f"(L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})"
            )

    def _cluster_into(self, run: Run, dst: memoryview) -> None:
        """Part of a compressed cluster into ``dst``, through the decoded-cluster cache."""
        start = run.offset & (self.cluster_size - 1)
        if self._cluster_cache.copy(run.host, start, dst):
            return
        data = self._cluster_cache.buffer()
        self._decode_checked(self._read_compressed(run.host, run.csize), run, memoryview(data))
        dst[:] = memoryview(data)[start : start + len(dst)]
        self._cluster_cache.keep(run.host, data)

    def decompress(self, coffset: int, csize: int, guest: int) -> bytes:
        """Decode the compressed cluster at host ``coffset`` (raises CorruptImage naming its offsets)."""
        out = bytearray(self.cluster_size)
        run = Run(COMPRESSED, guest, self.cluster_size, coffset, csize)
        self._decode_checked(self._read_compressed(coffset, csize), run, memoryview(out))
        return bytes(out)

    def _read_compressed(self, offset: int, length: int) -> bytes:
        """Compressed data; the read is clamped at end of file and the rest reads as zeros, as QEMU's block
        layer does (iotest 214: a size field reaching past EOF is fine)."""
        raw = self.source.pread(offset, length)
        return raw if len(raw) == length else raw + bytes(length - len(raw))

    def _decode_checked(self, raw: bytes, run: Run, dst: memoryview) -> None:
        assert self._decode is not None
        try:
            self._decode(raw, dst)
        except CorruptImage as e:
            raise CorruptImage(
                f"{self.name}: compressed cluster at host offset {run.host:#x} (guest offset "
                f"{run.offset & ~(self.cluster_size - 1):#x}, {run.csize} bytes): {e}"
            ) from None

    # -- file-like view -----------------------------------------------------------------------------------

    def raw(self) -> RawView:
        """A read-only, seekable ``io.RawIOBase`` over the guest disk."""
        return RawView(self)

    def cache_stats(self) -> dict[str, int]:
        return {
            "l2_hits": self._l2_cache.hits,
            "l2_misses": self._l2_cache.misses,
            "cluster_hits": self._cluster_cache.hits,
            "cluster_misses": self._cluster_cache.misses,
        }


_T = TypeVar("_T", Run, Extent)


def _coalesce(items: Iterable[_T], joins: Callable[[_T, _T], bool]) -> Iterator[_T]:
    """Merge each item into the one before it when ``joins`` says that it continues it."""
    pending: Optional[_T] = None
    for item in items:
        if pending is None:
            pending = item
        elif joins(pending, item):
            pending = pending._replace(length=pending.length + item.length)
        else:
            yield pending
            pending = item
    if pending is not None:
        yield pending


def _runs_join(a: Run, b: Run) -> bool:
    """Whether run ``b`` continues run ``a`` (same kind; host offsets contiguous where they exist)."""
    if a.kind != b.kind or a.kind == COMPRESSED:
        return False
    if a.kind == UNALLOCATED or (a.host < 0 and b.host < 0):
        return True
    return a.host >= 0 and b.host >= 0 and a.host + a.length == b.host


def _mergeable(a: Extent, b: Extent) -> bool:
    if a.kind != b.kind or a.depth != b.depth or a.source is not b.source or a.kind == COMPRESSED:
        return False
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return a.host_offset + a.length == b.host_offset


def _backing_extents(backing: ByteSource, offset: int, length: int, depth: int) -> Iterator[Extent]:
    """Extents that a backing layer answers; past its end the disk reads as zeros."""
    # QEMU sizes every layer in whole sectors (bs->total_sectors): a raw backing file of 100 bytes past a
    # sector boundary still answers for the rest of that sector (as a hole), like qemu-img map shows.
    size = backing.size if isinstance(backing, Image) else (backing.size + 511) & ~511
    inside = max(0, min(length, size - offset))
    if inside:
        if isinstance(backing, Image):
            yield from backing._extents(offset, inside, depth)
        else:
            yield from _raw_extents(backing, offset, inside, depth)
    if inside < length:
        yield Extent(ZERO, offset + inside, length - inside, None, depth, None)


def _raw_extents(source: ByteSource, offset: int, length: int, depth: int) -> Iterator[Extent]:
    """A raw layer: data where the file has data, zero in its holes (SEEK_DATA/SEEK_HOLE, like file-posix)."""
    end = offset + length
    if not isinstance(source, FileSource):
        yield Extent(DATA, offset, length, offset, depth, source)
        return
    pos = offset
    while pos < end:
        try:
            data = os.lseek(source.fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole up to the end of the file
            data = end
        data = min(data, end)
        if data > pos:
            yield Extent(ZERO, pos, data - pos, pos, depth, source)
            pos = data
            continue
        try:
            hole = os.lseek(source.fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        hole = min(hole, end)
        yield Extent(DATA, pos, hole - pos, pos, depth, source)
        pos = hole


class RawView(io.RawIOBase):
    """The guest disk as a read-only binary file."""

    def __init__(self, image: Image) -> None:
        super().__init__()
        self._image = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._image.virtual_size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: object) -> int:
        n = self._image.readinto(self._pos, memoryview(b))  # type: ignore[arg-type]
        self._pos += n
        return n


__all__ = ["COMPRESSED", "DATA", "UNALLOCATED", "ZERO", "Extent", "Image", "ImageError", "Run"]
