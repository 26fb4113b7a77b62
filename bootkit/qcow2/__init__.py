"""A read-only QCOW2 reader that returns exactly the bytes QEMU would return.

References: QEMU docs/interop/qcow2.rst (the format), block/qcow2.h, block/qcow2.c, block/qcow2-cluster.c,
block/qcow2-threads.c, block/qcow2-snapshot.c (what QEMU checks and how it decodes).

    with bootkit.qcow2.open("disk.qcow2") as image:
        image.virtual_size, image.cluster_size
        image.pread(offset, length)        # bytes; also readinto(offset, buf)
        for ext in image.extents():        # like qemu-img map
            ...
        image.raw()                        # io.RawIOBase view

Every image is validated eagerly at open (header, extensions, feature bits, table bounds) and tables are read
lazily, through caches bounded in bytes. Errors are ``bootkit.errors.ImageError`` subclasses naming the field,
offset or feature at fault. Runs inside the initramfs: standard library only (zstandard for zstd images).
"""

from __future__ import annotations

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

__all__ = [
    "COMPRESSED",
    "DATA",
    "DEFAULT_CLUSTER_CACHE_BYTES",
    "DEFAULT_L2_CACHE_BYTES",
    "DEFAULT_MAX_CHAIN_DEPTH",
    "UNALLOCATED",
    "ZERO",
    "Extent",
    "Image",
    "RawView",
    "Resolver",
    "Snapshot",
    "UnsafePath",
    "open",
]
