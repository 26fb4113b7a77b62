"""Decode a whole image to raw: ``bootkit convert``.

The extent map drives the work. Holes (unallocated, zero clusters) are never read: a regular output file is
sized up front and keeps them sparse; a stream gets zeros. A pool of threads fills buffers: compressed
clusters are decoded (zlib, libdeflate and zstandard release the GIL, so decoding scales with cores) and
uncompressed ones read; one thread does every write. Uncompressed data is reflinked instead where the
filesystem can share blocks (XFS, btrfs). Decoded chunks that are all zeros are skipped in a regular file (as
``qemu-img convert``'s sparse detection does).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Iterator, List, NamedTuple, Optional, Tuple, Union

from bootkit.log import human_size, log
from bootkit.qcow2.image import COMPRESSED, DATA, Extent, Image
from bootkit.source import FileSource

CHUNK = 2 << 20  # guest bytes per task
#: linux/fs.h: _IOW(0x94, 13, struct file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset})
FICLONERANGE = 0x4020940D
_ZERO_CHUNK = bytes(CHUNK)


def _buffer() -> mmap.mmap:
    """A task buffer: anonymous memory, page-aligned. The kernel copies between a page-aligned buffer and the
    page cache a page at a time; from a bytearray (malloc'd, 16 bytes off) every page spans two, which
    measured 20-50% slower writes, and worse with larger chunks."""
    return mmap.mmap(-1, CHUNK)


def _is_zero(buf: mmap.mmap, length: int) -> bool:
    # slicing an mmap copies: look at the first page before comparing the whole chunk (bytes == bytes is a
    # memcmp; a memoryview comparison goes element by element, 50x slower)
    head = min(length, 4096)
    if buf[:head] != _ZERO_CHUNK[:head]:
        return False
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
    kind: str  # "read": decode through the image; "copy": uncompressed data in a local file; "zero": a hole
    extent: Optional[Extent]


def _tasks(image: Image) -> Iterator[_Task]:
    """Cut the extent map into tasks of at most CHUNK bytes."""
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
            yield from _split(ext.offset, ext.length, "copy", ext, CHUNK)
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
    spare: List[mmap.mmap] = []  # reused buffers: fresh ones would cost a page fault per page

    def decode(task: _Task, buf: mmap.mmap) -> Tuple[_Task, mmap.mmap]:
        image.readinto(task.offset, memoryview(buf)[: task.length])
        return task, buf

    def account(key: str, n: int) -> None:
        counters[key] += n
        meter.add(n)

    def finish(fut: Future[Tuple[_Task, mmap.mmap]]) -> None:
        task, buf = fut.result()  # re-raises a worker's error (CorruptImage) here
        view = memoryview(buf)[: task.length]
        if not seekable:
            _write_all(out_fd, view)
        elif not (regular and _is_zero(buf, task.length)):
            _pwrite(out_fd, task.offset, view)
        account("decoded" if task.kind == "read" else "copied", task.length)
        spare.append(buf)

    reflink = True  # until the first refusal
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool:
        inflight: Deque[Future[Tuple[_Task, mmap.mmap]]] = deque()
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
            elif task.kind == "copy" and regular and reflink and _reflink(task, out_fd):
                account("copied", task.length)
            else:
                if task.kind == "copy":
                    reflink = False  # the filesystem cannot share these blocks: read and write them
                inflight.append(pool.submit(decode, task, spare.pop() if spare else _buffer()))
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


def _reflink(task: _Task, out_fd: int) -> bool:
    """Share the blocks of a "copy" task with the output (FICLONERANGE); False where that cannot be done.

    Only whole filesystem blocks can be shared: a filesystem without reflink (ext4, tmpfs) or unaligned
    offsets refuse, and the caller reads and writes the task instead (and stops trying).
    """
    ext = task.extent
    assert ext is not None and isinstance(ext.source, FileSource) and ext.host_offset is not None
    host = ext.host_offset + task.offset - ext.offset
    if host + task.length > ext.source.size:
        return False  # a truncated image file: let the reader decide what that reads as
    try:
        fcntl.ioctl(out_fd, FICLONERANGE, struct.pack("=qQQQ", ext.source.fd, host, task.length, task.offset))
    except OSError as e:
        if e.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
            raise
        return False
    return True


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
