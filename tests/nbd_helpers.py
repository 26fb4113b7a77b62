"""Shared fixtures for the NBD tests: a raw-file test double, servers in threads, reference images."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from bootkit.nbd import transport
from bootkit.nbd.server import NBDServer
from bootkit.qcow2.image import Extent, Run
from bootkit.source import FileSource


class RawFileDouble:
    """TEST DOUBLE for protocol tests only: serves a raw file through the ``bootkit.qcow2.Image`` API.

    Every byte is one "data" extent backed by the file (so the os.sendfile path is used), except ranges
    listed in ``zero_ranges``, reported as "zero" (and read as the file's bytes, which tests keep zero there),
    ``compressed_ranges``, reported as "compressed" (so the server queues small reads there as it does reads
    that decode a cluster) and read as the file's bytes, and ``corrupt_ranges``, reported as "compressed"
    and raising CorruptImage when read, like a broken compressed cluster.
    """

    def __init__(
        self,
        path: str,
        *,
        zero_ranges: tuple[tuple[int, int], ...] = (),
        corrupt_ranges: tuple[tuple[int, int], ...] = (),
        compressed_ranges: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.source = FileSource(path)
        self.virtual_size = self.source.size
        self.cluster_size = 65536
        self.zero_ranges = zero_ranges
        self.corrupt_ranges = corrupt_ranges
        self.compressed_ranges = compressed_ranges

    def _check(self, offset: int, length: int) -> None:
        from bootkit.errors import CorruptImage

        for start, n in self.corrupt_ranges:
            if offset < start + n and start < offset + length:
                raise CorruptImage(f"test double: corrupt range at offset {start}")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.source.pread(offset, length)

    def readinto(self, offset: int, buf: memoryview, plan: Optional[list[Run]] = None) -> int:
        self._check(offset, len(buf))
        return self.source.preadinto(offset, buf)

    def plan(self, offset: int, length: int) -> list[Run]:
        extents = self.extents(offset, max(0, min(length, self.virtual_size - offset)))
        return [Run(e.kind, e.offset, e.length, -1 if e.host_offset is None else e.host_offset, 0) for e in extents]

    def clusters_to_decode(self, plan: list[Run]) -> int:
        return sum(r.kind == "compressed" for r in plan)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self.virtual_size if length is None else offset + length
        special = sorted(
            [(a, n, "zero") for a, n in self.zero_ranges]
            + [(a, n, "compressed") for a, n in self.corrupt_ranges + self.compressed_ranges]
        )
        pos = offset
        for start, n, kind in special:
            if start + n <= pos or start >= end:
                continue
            if start > pos:
                yield Extent("data", pos, start - pos, pos, 0, self.source)
            stop = min(start + n, end)
            yield Extent(kind, max(start, pos), stop - max(start, pos), None, 0, None)
            pos = stop
        if pos < end:
            yield Extent("data", pos, end - pos, pos, 0, self.source)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> RawFileDouble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def serve_unix(image: Any, sock_path: str, **kwargs: Any) -> Iterator[NBDServer]:
    """An NBDServer on a Unix socket in background threads, for the duration of the block."""
    server = NBDServer(image, **kwargs)
    listener = transport.unix_listener(sock_path)
    acceptor = transport.Acceptor([listener], server.serve_connection)
    t = threading.Thread(target=acceptor.run, daemon=True)
    t.start()
    try:
        yield server
    finally:
        acceptor.stop()
        t.join(30)
        server.shutdown_connections()
        listener.close()
        os.unlink(sock_path)


def uri(sock_path: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock_path}"


def connect_raw(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock_path)
    return s
