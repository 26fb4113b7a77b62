"""A read-only QCOW2 reader that returns exactly the bytes QEMU would return.

References: QEMU docs/interop/qcow2.rst (the format), block/qcow2.h, block/qcow2.c, block/qcow2-cluster.c,
block/qcow2-threads.c, block/qcow2-snapshot.c (what QEMU checks and how it decodes).

    with bootkit.qcow2.open("disk.qcow2") as image:
        image.virtual_size, image.cluster_size
        image.pread(offset, length)        # bytes; also readinto(offset, buf)
        for ext in image.extents():        # like qemu-img map
            ...
        image.raw()                        # io.RawIOBase view

    bootkit.qcow2.write_qcow2("disk.raw", "disk.qcow2", compression="zstd")   # the writer


Every image is validated eagerly at open (header, extensions, feature bits, table bounds) and tables are read
lazily, through caches bounded in bytes. Errors are ``bootkit.errors.ImageError`` subclasses naming the field,
offset or feature at fault. Runs inside the initramfs: standard library only (zstandard for zstd images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bootkit.qcow2.chain import (
    DEFAULT_CLUSTER_CACHE_BYTES,
    DEFAULT_L2_CACHE_BYTES,
    DEFAULT_MAX_CHAIN_DEPTH,
    Resolver,
    UnsafePath,
    open,
)
from bootkit.qcow2.image import COMPRESSED, DATA, UNALLOCATED, ZERO, Extent, Image, RawView
from bootkit.qcow2.snapshot import Snapshot

if TYPE_CHECKING:
    from bootkit.qcow2.writer import Compression, WriteProgress, WriteResult, write_qcow2

#: the writer's names, imported on first use: a reader (the NBD server in the initramfs) never pays for them
_WRITER_NAMES = ("Compression", "WriteProgress", "WriteResult", "write_qcow2")


def __getattr__(name: str) -> Any:
    if name in _WRITER_NAMES:
        from bootkit.qcow2 import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COMPRESSED",
    "DATA",
    "DEFAULT_CLUSTER_CACHE_BYTES",
    "DEFAULT_L2_CACHE_BYTES",
    "DEFAULT_MAX_CHAIN_DEPTH",
    "UNALLOCATED",
    "ZERO",
    "Compression",
    "Extent",
    "Image",
    "RawView",
    "Resolver",
    "Snapshot",
    "UnsafePath",
    "WriteProgress",
    "WriteResult",
    "open",
    "write_qcow2",
]
