"""Rewriting an overlay's backing file name to the base's published, content-addressed name.

``build-image --base`` records the base by its local plain name (``web-1.qcow2``); in the docroot the base is
``web-<hash>.qcow2``. The name is a field of the header cluster (QEMU docs/interop/qcow2.rst: the
``backing_file_offset`` and ``backing_file_size`` header fields, the name not NUL-terminated), so the published
overlay is the local file with that field rewritten: the new name at the same offset, ``backing_file_size``
updated, the bytes the old name used beyond the new one zeroed. The new name must fit in the first cluster
over bytes that are zero (nothing else of the header lives there), else the image is refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from bootkit.errors import BootkitError
from bootkit.host.publish.docroot import PublishError
from bootkit.qcow2.header import QCOW_MAX_BACKING_NAME, read_header
from bootkit.source import FileSource

#: header fields (big-endian): backing_file_offset u64 at 8, backing_file_size u32 at 16
_BACKING_SIZE_AT = 16
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Rewrite:
    """The published form of an image: ``head`` replaces the file's first ``len(head)`` bytes."""

    path: Path
    head: bytes

    def sha256(self) -> str:
        h = hashlib.sha256(self.head)
        with self.path.open("rb") as f:
            f.seek(len(self.head))
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def write_to(self, fd: int) -> None:
        """Write the published bytes to ``fd`` (a new, empty file)."""
        view = memoryview(self.head)
        while view:
            view = view[os.write(fd, view) :]
        with self.path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = len(self.head)
            while offset < size:
                n = os.copy_file_range(f.fileno(), fd, size - offset, offset)
                if n == 0:
                    raise PublishError(f"{self.path}: shrank while being published (at byte {offset})")
                offset += n


def backing_name(path: Path) -> tuple[str | None, str | None]:
    """(backing file name, backing format) recorded in the QCOW2 image ``path``."""
    try:
        with closing(FileSource(str(path))) as src:
            info = read_header(src)
    except BootkitError as e:
        raise PublishError(f"{path}: {e}") from None
    if info.data_file is not None:
        raise PublishError(f"{path}: has an external data file ({info.data_file!r}): publish a self-contained image")
    return info.backing_file, info.backing_format


def rewrite(path: Path, new_name: str) -> Rewrite:
    """The published form of ``path`` with its backing file name set to ``new_name``."""
    encoded = new_name.encode()
    if not 0 < len(encoded) <= QCOW_MAX_BACKING_NAME:
        raise PublishError(f"{path}: backing file name {new_name!r} too long")
    with closing(FileSource(str(path))) as src:
        info = read_header(src)
        header = info.header
        if not header.backing_file_offset:
            raise PublishError(f"{path}: has no backing file to rename")
        offset, old_size = header.backing_file_offset, header.backing_file_size
        end = max(offset + old_size, offset + len(encoded))
        if end > info.cluster_size:
            raise PublishError(f"{path}: no room for backing file name {new_name!r} in the header cluster")
        head = bytearray(src.pread(0, end))
    if len(head) < end or any(head[offset + old_size : end]):
        raise PublishError(f"{path}: the bytes after the backing file name are in use: cannot lengthen it to"
                           f" {new_name!r}")
    head[offset:end] = encoded + bytes(end - offset - len(encoded))
    struct.pack_into(">I", head, _BACKING_SIZE_AT, len(encoded))
    return Rewrite(path, bytes(head))
