"""An HTTP byte source that opens its server only when a chunk is first needed from it.

With a local cache (``bootkit.fetch.diskcache``) the size and chunk size of a file come from its pinned
manifest, so a boot whose every chunk is in the cache never contacts the image server: it boots with the
server down, without waiting for it at all.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence

from bootkit.fetch.lazy import HTTPSource
from bootkit.fetch.manifest import Manifest
from bootkit.fetch.options import FetchOptions


class DeferredRemote:
    """The :class:`HTTPSource` interface stream mode uses (``name``, ``size``, ``chunk_size``, ``stats``,
    ``pread``, ``fetch_chunk``, ``release``, ``close``), the HTTPSource made on first ``pread``/``fetch_chunk``
    (which probes the server, retrying as usual, and checks its size against the manifest)."""

    def __init__(self, url: str, options: FetchOptions, manifest: Manifest, mirrors: Sequence[str] = ()) -> None:
        self.name = url
        self.options = options
        self.manifest = manifest
        self.mirrors = tuple(mirrors)
        self.chunk_size = manifest.chunk_size
        self.size = manifest.size
        self._remote: Optional[HTTPSource] = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def opened(self) -> bool:
        """Whether the server was contacted."""
        return self._remote is not None

    @property
    def stats(self) -> Dict[str, int]:
        return dict(self._remote.stats) if self._remote is not None else {}

    def _open(self) -> HTTPSource:
        with self._lock:
            if self._remote is None:
                self._remote = HTTPSource(self.name, self.options, manifest=self.manifest, mirrors=self.mirrors)
            return self._remote

    def pread(self, offset: int, length: int) -> bytes:
        return self._open().pread(offset, length)

    def fetch_chunk(self, index: int) -> bytes:
        return self._open().fetch_chunk(index)

    def release(self) -> None:
        if self._remote is not None:
            self._remote.release()

    def close(self) -> None:
        with self._lock:
            remote, self._remote = self._remote, None
        if remote is not None:
            remote.close()

    def __repr__(self) -> str:
        return f"DeferredRemote({self.name!r})"
