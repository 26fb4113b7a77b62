"""Decode a whole image to raw: ``bootkit convert``.

The extent map drives the work. Holes (unallocated, zero clusters) are never read: a regular output file is
sized up front and keeps them sparse; a stream gets zeros. Uncompressed data goes file to file with
``copy_file_range`` (in the kernel, a reflink where the filesystem can). Compressed clusters are decoded by a
pool of threads: zlib and zstandard release the GIL, so decoding scales with cores. Decoded chunks that are
all zeros are skipped in a regular file (as ``qemu-img convert``'s sparse detection does).
"""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterator, List, NamedTuple, Optional, Tuple, Union

from bootkit.log import human_size, log
from bootkit.qcow2.image import COMPRESSED, DATA, Extent, Image
from bootkit.source import FileSource

CHUNK = 4 << 20  # guest bytes per decoding task
COPY_CHUNK = 64 << 20
_ZERO_CHUNK = bytes(CHUNK)


def _is_zero(buf: bytearray, length: int) -> bool:
    # bytearray == bytes is a memcmp; memoryview comparison is element by element (10x slower)
    if length == len(buf):
        return buf == _ZERO_CHUNK
    return buf[:length] == _ZERO_CHUNK[:length]


class ConvertStats(NamedTuple):
    virtual_size: int
    copied: int  # uncompressed data bytes copied
    decoded: int  # compressed guest bytes decoded
    holes: int  # bytes never read (unallocated or zero)
    seconds: float


class _Task(NamedTuple):
    offset: int
    length: int
    kind: str  # "read": decode through the image; "copy": file-to-file; "zero": a hole
    extent: Optional[Extent]


def _tasks(image: Image) -> Iterator[_Task]:
    """Cut the extent map into tasks of at most CHUNK (decoding) or COPY_CHUNK (copying) bytes."""
    pending: Optional[Tuple[int, int]] = None  # a run of guest bytes to decode: (offset, length)
    for ext in image.extents():
        if ext.kind == COMPRESSED or (ext.kind == DATA and not isinstance(ext.source, FileSource)):
            if pending and pending[0] + pending[1] == ext.offset:
                pending = (pending[0], pending[1] + ext.length)
            else:
                if pending:
                    yield from _split(pending[0], pending[1], "read", None, CHUNK)
                pending = (ext.offset, ext.length)
            continue
        if pending:
            yield from _split(pending[0], pending[1], "read", None, CHUNK)
            pending = None
        if ext.kind == DATA:
            yield from _split(ext.offset, ext.length, "copy", ext, COPY_CHUNK)
        else:
            yield _Task(ext.offset, ext.length, "zero", ext)
    if pending:
        yield from _split(pending[0], pending[1], "read", None, CHUNK)


def _split(offset: int, length: int, kind: str, ext: Optional[Extent], size: int) -> Iterator[_Task]:
    end = offset + length
    while offset < end:
        n = min(size, end - offset)
        yield _Task(offset, n, kind, ext)
        offset += n


def convert(image: Image, out_fd: int, *, threads: Optional[int] = None, progress: float = 5.0) -> ConvertStats:
    """Write the guest disk of ``image`` to ``out_fd`` (a regular file, a block device or a stream)."""
    st = os.fstat(out_fd)
    seekable = stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
    regular = stat.S_ISREG(st.st_mode)
    if regular:
        # Empty it only when it has data: on ext4 a truncate to zero arms auto_da_alloc, which makes the final
        # close() write back the whole file synchronously (0.3 s per GiB measured).
        if st.st_size:
            os.ftruncate(out_fd, 0)
        os.ftruncate(out_fd, image.virtual_size)
    workers = threads or min(8, os.cpu_count() or 1)
    started = time.monotonic()
    counters = {"copied": 0, "decoded": 0, "holes": 0}
    meter = _Progress(image.virtual_size, progress, image.name)
    # Decoded chunks go back to this thread, which does every write: concurrent buffered writes to one file
    # serialize on its inode lock in the kernel and burn CPU spinning (measured: twice qemu-img's system time).
    spare: List[bytearray] = []  # reused buffers: fresh 4 MiB buffers would cost a page fault per page

    def decode(task: _Task, buf: bytearray) -> Tuple[_Task, bytearray]:
        image.readinto(task.offset, memoryview(buf)[: task.length])
        return task, buf

    def account(key: str, n: int) -> None:
        counters[key] += n
        meter.add(n)

    def finish(fut: Future[Tuple[_Task, bytearray]]) -> None:
        task, buf = fut.result()  # re-raises a worker's error (CorruptImage) here
        view = memoryview(buf)[: task.length]
        if not seekable:
            _write_all(out_fd, view)
        elif not (regular and _is_zero(buf, task.length)):
            _pwrite(out_fd, task.offset, view)
        account("decoded" if task.kind == "read" else "copied", task.length)
        spare.append(buf)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool:
        inflight: Deque[Future[Tuple[_Task, bytearray]]] = deque()
        limit = workers * 2  # bounds memory: at most this many chunks decoded but not written
        for task in _tasks(image):
            if task.kind == "zero":
                account("holes", task.length)
                if regular:
                    continue
                if seekable:  # a block device must be overwritten with zeros
                    _pwrite_zeros(out_fd, task.offset, task.length)
                else:  # a stream: in order, after what is being decoded
                    while inflight:
                        finish(inflight.popleft())
                    _write_zeros(out_fd, task.length)
            elif task.kind == "copy" and seekable:
                assert task.extent is not None and isinstance(task.extent.source, FileSource)
                host = task.extent.host_offset
                assert host is not None
                _copy_range(task.extent.source, host + task.offset - task.extent.offset, out_fd, task.offset,
                            task.length)
                account("copied", task.length)
            else:
                inflight.append(pool.submit(decode, task, spare.pop() if spare else bytearray(CHUNK)))
                while len(inflight) >= limit:
                    finish(inflight.popleft())
        while inflight:
            finish(inflight.popleft())
    elapsed = time.monotonic() - started
    meter.done()
    return ConvertStats(image.virtual_size, counters["copied"], counters["decoded"], counters["holes"], elapsed)


def _write_all(fd: int, data: memoryview) -> None:
    view = data
    while view:
        view = view[os.write(fd, view) :]


def _write_zeros(fd: int, length: int) -> None:
    while length:
        n = min(length, CHUNK)
        _write_all(fd, memoryview(_ZERO_CHUNK)[:n])
        length -= n


def _pwrite(fd: int, offset: int, data: Union[bytearray, memoryview]) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pwrite_zeros(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        _pwrite(fd, offset, bytearray(n))
        offset += n


_copy_file_range: Optional[Callable[..., int]] = getattr(os, "copy_file_range", None)


def _copy_range(src: FileSource, src_off: int, out_fd: int, dst_off: int, length: int) -> None:
    """Copy file to file in the kernel; bytes past the source's end are left as holes (they read as zeros)."""
    length = max(0, min(length, src.size - src_off))
    while length:
        n = 0
        if _copy_file_range is not None:
            try:
                n = _copy_file_range(src.fd, out_fd, length, src_off, dst_off)
            except OSError:
                n = -1
        if n <= 0:  # no copy_file_range here, or it cannot cross these files: read and write
            data = os.pread(src.fd, min(length, COPY_CHUNK), src_off)
            if not data:
                return
            _pwrite(out_fd, dst_off, bytearray(data))
            n = len(data)
        src_off += n
        dst_off += n
        length -= n


class _Progress:
    """A log line every ``interval`` seconds: percent, bytes, rate, time left."""

    def __init__(self, total: int, interval: float, name: str) -> None:
        self.total = total
        self.interval = interval
        self.name = name
        self.done_bytes = 0
        self.started = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done_bytes += n
        now = time.monotonic()
        if self.interval <= 0 or now - self.last < self.interval:
            return
        self.last = now
        rate = self.done_bytes / max(now - self.started, 1e-9)
        left = (self.total - self.done_bytes) / rate if rate else 0.0
        log.info(
            "convert: %d%% %s of %s at %s/s, %.0f s left (%s)",
            100 * self.done_bytes // max(self.total, 1),
            human_size(self.done_bytes),
            human_size(self.total),
            human_size(rate),
            left,
            self.name,
        )

    def done(self) -> None:
        elapsed = time.monotonic() - self.started
        log.info(
            "convert: %s in %.1f s (%s/s of guest data)",
            human_size(self.total),
            elapsed,
            human_size(self.total / max(elapsed, 1e-9)),
        )


__all__: List[str] = ["ConvertStats", "convert"]
