"""Byte sources: where the QCOW2 reader gets its bytes from.

The reader never seeks: it calls ``pread(offset, n)`` on a source, from many threads at once. A source may
return fewer bytes than asked for only at its end (like ``os.pread``). Sources in this module: a local file
(``FileSource``) and a buffer in RAM (``BytesSource``); ``bootkit.fetch`` adds HTTP range requests.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol, Union, runtime_checkable

from bootkit.errors import ImageError


@runtime_checkable
class ByteSource(Protocol):
    """What the reader needs from the bytes of one file."""

    #: a name for error messages (a path or a URL)
    name: str

    @property
    def size(self) -> int:
        """Total length in bytes."""

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short only at end of source. Thread-safe."""

    def close(self) -> None:
        """Release what the source holds."""


class FileSource:
    """A local file read with ``os.pread`` (no shared seek position: thread-safe)."""

    def __init__(self, path: Union[str, os.PathLike[str]], *, fd: Optional[int] = None) -> None:
        self.name = os.fspath(path)
        if fd is None:
            try:
                fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ImageError(f"{self.name}: cannot open: {e.strerror}") from e
        self.fd: int = fd
        self._size = os.fstat(fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Read into ``buf`` without an intermediate copy; returns the count read (short at end of file)."""
        return os.preadv(self.fd, [buf], offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"FileSource({self.name!r})"


class BytesSource:
    """A buffer in RAM, for tests and small images."""

    def __init__(self, data: Union[bytes, bytearray, memoryview], name: str = "<memory>") -> None:
        self.name = name
        self._data = memoryview(data).cast("B")

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + length])

    def close(self) -> None:
        pass
