"""Write a raw disk as a compressed QCOW2 (version 3) image: bootkit's own ``qemu-img convert -c -O qcow2``.

    result = write_qcow2("disk.raw", "disk.qcow2")                       # zstd, 64 KiB clusters
    result = write_qcow2("new.raw", "new.qcow2", backing="old.qcow2")   # only what differs from old.qcow2

The input is read in chunks of whole clusters by a pool of threads, which also compress (libdeflate and
libzstd, through ctypes, release the GIL: compression runs on every core). The calling thread takes the
results in guest order and alone decides where each cluster goes (``bootkit.qcow2.layout``), so the same input
gives the same bytes whatever the number of threads or their timing: builds are reproducible. At most two
chunks per thread are in flight, so memory stays bounded whatever the disk's size.

What each guest cluster becomes:

- all zeros: not written (unallocated; holes of a sparse input are skipped without being read, found with
  SEEK_DATA/SEEK_HOLE);
- with a backing image: identical to what the backing image reads there: not written (reads through);
  zero here but not in the backing image: a zero cluster (L2 zero flag);
- otherwise compressed when that makes it smaller than a cluster (QEMU's rule), else stored as is.

Every host cluster has the refcount ``qemu-img check`` counts for it (1, or the number of compressed
clusters sharing it): no errors, no leaks. Errors are ``bootkit.errors`` exceptions with one clear line.

References: QEMU docs/interop/qcow2.rst; block/qcow2.c ``qcow2_co_pwritev_compressed_task`` (compress or
write normally); qemu-img.c ``convert`` (zero detection, backing comparison with ``-B``).

Lives in the initramfs package (next to the reader) but is used on the host: standard library only (ctypes
for the compressors), Python >= 3.9.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
import time
import zlib
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from bootkit.errors import ImageError, UsageError
from bootkit.log import log
from bootkit.qcow2.encode import Buffer, Encoder, encoder_for, encoder_name
from bootkit.qcow2.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD, QCOW_MAX_BACKING_NAME, QCOW_MAX_L1_SIZE
from bootkit.qcow2.image import Image
from bootkit.qcow2.layout import (
    L1_ENTRY_COPIED,
    L2_ZERO,
    HeaderFields,
    Layout,
    align_up,
    header_cluster,
    l1_entries,
    l2_entry_data,
    table_bytes,
)
from bootkit.source import ByteSource, FileSource

DEFAULT_CLUSTER_SIZE = 64 << 10
MIN_CLUSTER_SIZE = 4 << 10
MAX_CLUSTER_SIZE = 2 << 20
#: guest bytes per task (at least one cluster): small enough to keep every thread busy, large enough that
#: the per-task overhead in Python does not show
CHUNK = 1 << 20
#: contiguous output gathered into one pwritev (at most _IOV_MAX pieces)
WRITE_BUFFER = 8 << 20
_IOV_MAX = 1024
#: compressed clusters remembered for sharing (a dict entry each, ~150 bytes): past this, the oldest half goes
SHARED_MAX = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]


class Compression(str, enum.Enum):
    """How data clusters are stored."""

    zstd = "zstd"
    deflate = "deflate"
    none = "none"

    @property
    def compression_type(self) -> int:
        """The header's compression_type field (an uncompressed image says deflate, as QEMU's do)."""
        return COMPRESSION_ZSTD if self is Compression.zstd else COMPRESSION_DEFLATE


class WriteProgress(NamedTuple):
    """Where a write is: passed to the ``progress`` callback after each chunk, in the calling thread."""

    clusters_done: int  # guest clusters decided so far (holes skipped unread count as done)
    clusters_total: int
    bytes_read: int  # input bytes read and examined
    file_size: int  # bytes placed in the output so far
    seconds: float


class WriteResult(NamedTuple):
    """What ``write_qcow2`` wrote."""

    virtual_size: int
    cluster_size: int
    compression: str  # zstd | deflate | none
    encoder: str  # libzstd | zstandard | libdeflate | zlib | none
    file_size: int
    clusters_total: int  # guest clusters of the disk
    clusters_compressed: int  # written compressed
    clusters_uncompressed: int  # written as is (compression off, or it would not have made them smaller)
    clusters_zero: int  # written as zero clusters: zero here, not zero in the backing image
    clusters_unallocated: int  # not written: all zeros (and zeros in the backing image, if any)
    clusters_same: int  # not written: identical to the backing image
    bytes_read: int
    seconds: float

    @property
    def clusters_written(self) -> int:
        return self.clusters_compressed + self.clusters_uncompressed


# What one guest cluster becomes (the workers decide, the calling thread places)
_SKIP, _SAME, _ZERO, _COMPRESSED, _RAW = range(5)
_ZEROS = bytes(MAX_CLUSTER_SIZE)


class _Task(NamedTuple):
    first: int  # first guest cluster
    nclusters: int
    has_data: bool  # False: a hole of the input (zeros, not read), examined only against the backing image


#: what a cluster becomes, and where its bytes are in the task's output buffer: (kind, start, length, the
#: sharing key of a compressed cluster)
Cluster = Tuple[int, int, int, Optional[Tuple[int, int]]]
_SKIP_CLUSTER: Cluster = (_SKIP, 0, 0, None)
_SAME_CLUSTER: Cluster = (_SAME, 0, 0, None)
_ZERO_CLUSTER: Cluster = (_ZERO, 0, 0, None)


class _Input:
    """The raw disk: a file (holes found with SEEK_DATA/SEEK_HOLE) or any ByteSource (no hole detection)."""

    def __init__(self, src: Union[PathLike, ByteSource]) -> None:
        self.owned = not isinstance(src, ByteSource)
        if self.owned:
            path = os.fspath(src)  # type: ignore[arg-type]
            if os.path.isdir(path):
                raise ImageError(f"{path}: is a directory, not a raw disk image")
            self.source: ByteSource = FileSource(path)
            # a block device's size is where its end is, not st_size
            self.size = os.lseek(self.source.fd, 0, os.SEEK_END) if self.source.size == 0 else self.source.size
        else:
            self.source = src  # type: ignore[assignment]
            self.size = self.source.size
        self.name = self.source.name

    def data_runs(self) -> Iterator[Tuple[int, int]]:
        """Byte ranges (start, end) that may hold data; the rest of the input is holes (zeros)."""
        fd = self.source.fd if isinstance(self.source, FileSource) else -1
        pos = 0
        while pos < self.size:
            if fd < 0:
                yield pos, self.size
                return
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = min(os.lseek(fd, start, os.SEEK_HOLE), self.size)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return
                fd = -1  # the filesystem or device cannot tell: everything may be data
                continue
            if start >= self.size:
                return
            yield start, end
            pos = end

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``; past the input's end (the last cluster) reads as zeros."""
        n = max(0, min(len(view), self.size - offset))
        if isinstance(self.source, FileSource):
            got = 0
            while got < n:
                k = self.source.preadinto(offset + got, view[got:n])
                if k == 0:
                    raise ImageError(f"{self.name}: input shrank while being read (at byte {offset + got})")
                got += k
        elif n:
            data = self.source.pread(offset, n)
            if len(data) != n:
                raise ImageError(f"{self.name}: short read at byte {offset} ({len(data)} of {n} bytes)")
            view[:n] = data
        if n < len(view):
            view[n:] = _ZEROS[: len(view) - n]

    def close(self) -> None:
        if self.owned:
            self.source.close()


class _Output:
    """The output file, written with pwritev: contiguous pieces are gathered into one call, never copied."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pieces: List[Union[bytes, memoryview]] = []
        self._start = 0
        self._end = 0

    def write(self, offset: int, data: Union[bytes, memoryview]) -> None:
        if self._pieces and offset != self._end:
            self.flush()
        if not self._pieces:
            self._start = self._end = offset
        self._pieces.append(data)
        self._end += len(data)
        if self._end - self._start >= WRITE_BUFFER or len(self._pieces) >= _IOV_MAX:
            self.flush()

    def flush(self) -> None:
        pieces, offset = self._pieces, self._start
        while pieces:
            n = os.pwritev(self.fd, pieces, offset)
            offset += n
            while pieces and n >= len(pieces[0]):
                n -= len(pieces[0])
                pieces.pop(0)
            if n:
                pieces[0] = memoryview(pieces[0])[n:]
        self._start = self._end = offset

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes written at ``offset`` (what is still gathered is written first)."""
        if self._pieces and offset + n > self._start:
            self.flush()
        return os.pread(self.fd, n, offset)


def write_qcow2(
    src: Union[PathLike, ByteSource],
    dst: PathLike,
    *,
    compression: Union[str, Compression] = Compression.zstd,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    level: Optional[int] = None,
    threads: Optional[int] = None,
    backing: Optional[PathLike] = None,
    backing_name: Optional[str] = None,
    progress: Optional[Callable[[WriteProgress], None]] = None,
) -> WriteResult:
    """Write the raw disk ``src`` (a path, or a ``ByteSource``) as the QCOW2 image ``dst``.

    ``compression``: zstd (default), deflate or none. ``level``: the compressor's level (None: zstd 2, 1.5%
    larger and a third faster than QEMU's 3; deflate: libdeflate 2, smaller and faster than QEMU's zlib 6, or
    zlib 6 without libdeflate).
    ``cluster_size``: a power of two from 4 KiB to 2 MiB. ``threads``: compressing threads (None: one per
    core). ``backing``: an existing QCOW2 image of at most the input's virtual size, read with
    ``bootkit.qcow2.open``; only clusters that differ from it are written, and the image records it as its
    backing file (format qcow2) under ``backing_name`` (default: its path relative to ``dst``'s directory, a
    plain name when both are in one directory). ``progress`` is called after each chunk.

    ``dst`` appears complete or not at all: the image is written to a temporary file next to it, then
    renamed. The virtual size is the input's size rounded up to 512 bytes (as QEMU reads a raw file).
    """
    try:
        comp = Compression(compression)
    except ValueError:
        raise UsageError(f"unknown compression {compression!r} (zstd, deflate or none)") from None
    if not MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE or cluster_size & (cluster_size - 1):
        raise UsageError(f"cluster size {cluster_size} is not a power of two from 4 KiB to 2 MiB")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, not {threads}")
    encoder: Optional[Encoder] = None
    if comp is Compression.none:
        if level is not None:
            raise UsageError("a compression level needs compression (zstd or deflate)")
    else:
        encoder = encoder_for(comp.compression_type, level)
    started = time.monotonic()
    dst_path = os.fspath(dst)
    inp = _Input(src)
    try:
        if inp.owned and os.path.exists(dst_path) and os.path.samefile(dst_path, inp.name):
            raise UsageError(f"output {dst_path} is the input")
        if os.path.isdir(dst_path):
            raise UsageError(f"output {dst_path} is a directory")
        virtual_size = align_up(inp.size, 512)
        cluster_bits = cluster_size.bit_length() - 1
        l1_size = l1_entries(virtual_size, cluster_bits)
        if l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise UsageError(f"{inp.name}: disk of {virtual_size} bytes is too large for {cluster_size}-byte clusters")
        base, fields = _open_backing(backing, backing_name, dst_path, virtual_size, comp)
        try:
            job = _Job(inp, base, encoder, cluster_bits, virtual_size, threads, progress, started)
            with _TempFile(dst_path) as fd:
                job.run(fd, fields, l1_size)
        finally:
            if base is not None:
                base.close()
    finally:
        inp.close()
    result = WriteResult(
        virtual_size=virtual_size,
        cluster_size=cluster_size,
        compression=comp.value,
        encoder="none" if encoder is None else encoder_name(comp.compression_type),
        file_size=job.layout.end,
        clusters_total=job.clusters_total,
        clusters_compressed=job.counts[_COMPRESSED],
        clusters_uncompressed=job.counts[_RAW],
        clusters_zero=job.counts[_ZERO],
        clusters_unallocated=job.clusters_total - job.counts[_COMPRESSED] - job.counts[_RAW] - job.counts[_ZERO]
        - job.counts[_SAME],
        clusters_same=job.counts[_SAME],
        bytes_read=job.bytes_read,
        seconds=time.monotonic() - started,
    )
    log.debug("wrote %s: %s", dst_path, result)
    return result


def _open_backing(
    backing: Optional[PathLike], backing_name: Optional[str], dst: str, virtual_size: int, comp: Compression
) -> Tuple[Optional[Image], HeaderFields]:
    if backing is None:
        if backing_name is not None:
            raise UsageError("a backing file name needs a backing image")
        return None, HeaderFields(virtual_size, comp.compression_type, None, None)
    from bootkit.qcow2.chain import open as open_image

    path = os.fspath(backing)
    if os.path.exists(dst) and os.path.exists(path) and os.path.samefile(dst, path):
        raise UsageError(f"output {dst} is the backing image")
    name = backing_name if backing_name is not None else os.path.relpath(path, os.path.dirname(os.path.abspath(dst)))
    encoded = name.encode("utf-8", "surrogateescape")
    if not encoded or len(encoded) > QCOW_MAX_BACKING_NAME or b"\0" in encoded:
        raise UsageError(f"backing file name {name!r} must be 1..{QCOW_MAX_BACKING_NAME} bytes without NUL")
    base = open_image(path)
    if base.virtual_size > virtual_size:
        size = base.virtual_size
        base.close()
        # a smaller overlay would cut the disk short; a larger one reads zeros past the backing image's end
        raise UsageError(
            f"backing image {path} has a virtual size of {size} bytes, more than the input's {virtual_size}"
        )
    if "/" in name:
        # bootkit's reader follows a backing name only inside the image's directory (unless told otherwise)
        log.warning("backing file name %r is not a plain name: bootkit reads it only with --allow-dir", name)
    return base, HeaderFields(virtual_size, comp.compression_type, name, "qcow2")


class _TempFile:
    """A new file next to ``path``, renamed to ``path`` on success and removed on failure."""

    def __init__(self, path: str) -> None:
        directory, name = os.path.split(os.path.abspath(path))
        self.path = path
        self.tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        self.fd = -1

    def __enter__(self) -> int:
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise UsageError(f"{self.path}: cannot create: {e.strerror}") from None
        return self.fd

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        os.close(self.fd)
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.lexists(self.tmp):
                os.unlink(self.tmp)


class _Job:
    """One write: the pool that reads and compresses, and the in-order placement of what comes back."""

    def __init__(
        self,
        inp: _Input,
        base: Optional[Image],
        encoder: Optional[Encoder],
        cluster_bits: int,
        virtual_size: int,
        threads: Optional[int],
        progress: Optional[Callable[[WriteProgress], None]],
        started: float,
    ) -> None:
        self.inp = inp
        self.base = base
        self.encoder = encoder
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.virtual_size = virtual_size
        self.threads = threads or _cores()
        self.progress = progress
        self.started = started
        self.clusters_total = (virtual_size + self.cluster_size - 1) >> cluster_bits
        self.layout = Layout(cluster_bits)
        self.counts = [0] * 5
        self.shared = 0  # compressed clusters that point at an earlier one's bytes
        self.bytes_read = 0
        self.l2_bits = cluster_bits - 3
        self.per_task = max(1, CHUNK // self.cluster_size)
        self._local = threading.local()

    # -- the workers' side -------------------------------------------------------------------------------

    def tasks(self) -> Iterator[_Task]:
        """Chunks of whole clusters, in guest order: the input's data runs; with a backing image also its holes
        (a hole must still be compared with the backing image)."""
        cs = self.cluster_size
        per_task = self.per_task
        pos = 0  # first cluster not yet covered
        for start, end in self.inp.data_runs():
            first = max(pos, start >> self.cluster_bits)
            last = (end + cs - 1) >> self.cluster_bits
            if self.base is not None:
                yield from _split(pos, first, per_task, False)
            yield from _split(first, last, per_task, True)
            pos = max(pos, last)
        if self.base is not None:
            yield from _split(pos, self.clusters_total, per_task, False)

    def work(self, task: _Task, out: Buffer) -> List[Cluster]:
        """Read one chunk (and the backing image's bytes there) and decide each cluster, compressing into
        ``out`` (this task's output buffer, written by the calling thread); runs in a worker."""
        cs = self.cluster_size
        offset = task.first * cs
        size = task.nclusters * cs
        src, old = self._buffers()
        buf = src.data
        if task.has_data:
            self.inp.readinto(offset, memoryview(buf)[:size])
        if self.base is not None:
            # past the end of a smaller backing image the disk reads as zeros (QEMU's rule)
            n = max(0, min(size, self.base.virtual_size - offset))
            self.base.readinto(offset, memoryview(old)[:n])
            old[n:size] = _ZEROS[: size - n]
        result: List[Cluster] = []
        zero = _ZEROS[:cs]
        head = _ZEROS[:64]
        encode = self.encoder
        dst = out.data
        view = memoryview(dst)
        at = 0  # where the next cluster's bytes go in ``out``
        for i in range(task.nclusters):
            a, b = i * cs, (i + 1) * cs
            # bytearray slices compare with memcmp (a memoryview compares item by item, far slower); the
            # first bytes settle most data clusters without copying the whole cluster
            is_zero = not task.has_data or (buf[a : a + 64] == head and buf[a:b] == zero)
            if self.base is not None:
                if (is_zero and old[a:b] == zero) or (not is_zero and buf[a:b] == old[a:b]):
                    result.append(_SAME_CLUSTER)
                    continue
                if is_zero:
                    result.append(_ZERO_CLUSTER)
                    continue
            elif is_zero:
                result.append(_SKIP_CLUSTER)
                continue
            n = encode(src, a, cs, out, at) if encode is not None else 0
            if n:
                # the key under which identical compressed clusters are found (compared in full before one is
                # shared): its length and CRC-32, computed here, in parallel (zlib releases the GIL), not by the
                # calling thread (3% of the CPU time). A CRC of only its first and last bytes shared fewer.
                key = (n, zlib.crc32(view[at : at + n]))
                result.append((_COMPRESSED, at, n, key))
            else:
                dst[at : at + cs] = buf[a:b]
                result.append((_RAW, at, cs, None))
                n = cs
            at += n
        return result

    def _buffers(self) -> Tuple[Buffer, bytearray]:
        """This thread's chunk buffers (input, backing image), reused task after task: a fresh megabyte per
        task costs a page fault per page and a memset, a quarter of the CPU time besides compression."""
        bufs: Optional[Tuple[Buffer, bytearray]] = getattr(self._local, "bufs", None)
        if bufs is None:
            size = self.per_task * self.cluster_size
            bufs = self._local.bufs = (Buffer(size), bytearray(size if self.base is not None else 0))
        return bufs

    # -- the calling thread's side -----------------------------------------------------------------------

    def run(self, fd: int, fields: HeaderFields, l1_size: int) -> None:
        output = _Output(fd)
        layout = self.layout
        l1 = array("Q", bytes(8 * l1_size))
        l2_entries = 1 << self.l2_bits
        empty = array("Q", bytes(8 * l2_entries))
        l2 = array("Q", empty)
        l2_index = -1  # the L2 table being filled
        l2_used = False
        # Compressed clusters by (length, CRC-32) -> (offset, L2 entry): a later cluster that compresses to the
        # same bytes (compared in full, read back from the file) points at the first copy, refcount > 1. On
        # an ext4 of /usr 5% of the data clusters repeat another one; a file 3% smaller.
        shared: Dict[Tuple[int, int], Tuple[int, int]] = {}

        def flush_l2() -> None:
            if l2_used:
                offset = layout.place_cluster()
                output.write(offset, table_bytes(l2))
                l1[l2_index] = offset | L1_ENTRY_COPIED
                l2[:] = empty

        # bounds memory: chunks read or compressed but not yet written, each with its output buffer (a
        # cluster's compressed bytes go straight there and from there to the file: no copy per cluster)
        limit = 2 * self.threads
        free = [Buffer(self.per_task * self.cluster_size) for _ in range(limit)]
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="qcow2-write") as pool:
            inflight: Deque[Tuple[_Task, Buffer, Future[List[Cluster]]]] = deque()
            tasks = self.tasks()
            while True:
                for task in tasks:
                    out = free.pop()
                    inflight.append((task, out, pool.submit(self.work, task, out)))
                    if not free:
                        break
                if not inflight:
                    break
                task, out, fut = inflight.popleft()
                clusters = fut.result()  # re-raises a worker's error here
                chunk = memoryview(out.data)
                for i, (kind, at, length, key) in enumerate(clusters):
                    index = task.first + i
                    if index >> self.l2_bits != l2_index:
                        flush_l2()
                        l2_index, l2_used = index >> self.l2_bits, False
                    self.counts[kind] += 1
                    if kind == _COMPRESSED:
                        assert key is not None
                        hit = shared.get(key)
                        if (
                            hit is not None
                            and output.read(hit[0], length) == out.data[at : at + length]
                            and layout.share_compressed(hit[0], length)
                        ):
                            self.shared += 1
                            entry = hit[1]
                        else:
                            offset = layout.place_compressed(length)
                            entry = layout.compressed_entry(offset, length)
                            output.write(offset, chunk[at : at + length])
                            if len(shared) >= SHARED_MAX:
                                for old in list(shared)[: SHARED_MAX // 2]:
                                    del shared[old]
                            shared[key] = (offset, entry)
                    elif kind == _RAW:
                        offset = layout.place_cluster()
                        entry = l2_entry_data(offset)
                        output.write(offset, chunk[at : at + length])
                    elif kind == _ZERO:
                        entry = L2_ZERO
                    else:
                        continue
                    l2[index & (l2_entries - 1)] = entry
                    l2_used = True
                # the buffer goes back to the free list: what it holds must be in the file first
                output.flush()
                free.append(out)
                if task.has_data:
                    self.bytes_read += task.nclusters * self.cluster_size
                if self.progress is not None:
                    self.progress(WriteProgress(
                        task.first + task.nclusters,
                        self.clusters_total,
                        self.bytes_read,
                        layout.end,
                        time.monotonic() - self.started,
                    ))
        flush_l2()
        l1_offset, table_offset, table_clusters, blocks_offset = layout.place_tables(l1_size)
        if l1_size:
            output.write(l1_offset, table_bytes(l1))
        output.write(blocks_offset, layout.refcount_blocks())
        output.write(table_offset, layout.refcount_table(blocks_offset, table_offset, table_clusters))
        output.write(0, header_cluster(fields, self.cluster_bits, l1_size, l1_offset, table_offset, table_clusters))
        output.flush()
        # the last table may end in a hole that was never written: the file must reach the end of it
        os.ftruncate(fd, layout.end)


def _split(first: int, end: int, per_task: int, has_data: bool) -> Iterator[_Task]:
    while first < end:
        n = min(per_task, end - first)
        yield _Task(first, n, has_data)
        first += n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


__all__: List[str] = ["Compression", "WriteProgress", "WriteResult", "write_qcow2"]
