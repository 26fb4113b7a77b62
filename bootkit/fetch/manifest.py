"""Chunk manifests: what lazy mode checks every chunk it fetches against.

``bootkit manifest IMAGE -o IMAGE.manifest`` writes one; the boot configuration pins the SHA-256 of the
manifest file itself, so one pinned hash covers every byte of the image. The format is plain text, one item
per line, ASCII, ``\\n`` line ends::

    bootkit-manifest 1
    size 10737418240
    chunk-size 1048576
    sha256 <64 hex digits: the whole image>
    chunks 10240
    <64 hex digits: SHA-256 of chunk 0, bytes [0, chunk-size)>
    <... one line per chunk, in order; the last chunk may be short>

Parsing is strict: any other line, count or order is an error.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional, Tuple

from bootkit.errors import ConfigError, UsageError
from bootkit.fetch.options import FetchOptions
from bootkit.record import record

MAGIC = "bootkit-manifest 1"
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_chunk_size(chunk_size: int, where: str) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % MIN_CHUNK_SIZE:
        raise UsageError(
            f"{where}: chunk size {chunk_size} must be a multiple of {MIN_CHUNK_SIZE} between"
            f" {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )


@record
class Manifest:
    """The size, chunk size, whole-image SHA-256 and per-chunk SHA-256 digests (raw 32 bytes) of an image."""

    size: int
    chunk_size: int
    sha256: str
    chunks: Tuple[bytes, ...]

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_span(self, index: int) -> Tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def check(self, index: int, data: bytes) -> bool:
        """Whether ``data`` is exactly chunk ``index``."""
        return hashlib.sha256(data).digest() == self.chunks[index]

    # -- writing --

    @classmethod
    def build(cls, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
        """Hash the image at ``path`` chunk by chunk."""
        _check_chunk_size(chunk_size, path)
        whole = hashlib.sha256()
        chunks = []
        size = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk_size)
                if not data:
                    break
                whole.update(data)
                chunks.append(hashlib.sha256(data).digest())
                size += len(data)
        return cls(size, chunk_size, whole.hexdigest(), tuple(chunks))

    def dumps(self) -> bytes:
        lines = [
            MAGIC,
            f"size {self.size}",
            f"chunk-size {self.chunk_size}",
            f"sha256 {self.sha256}",
            f"chunks {len(self.chunks)}",
            *(c.hex() for c in self.chunks),
        ]
        return ("\n".join(lines) + "\n").encode("ascii")

    @property
    def digest(self) -> str:
        """SHA-256 of the manifest file: what the boot configuration pins."""
        return hashlib.sha256(self.dumps()).hexdigest()

    def write(self, path: str) -> str:
        """Write the manifest file (atomically); returns its SHA-256."""
        data = self.dumps()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return hashlib.sha256(data).hexdigest()

    # -- reading --

    @classmethod
    def parse(cls, data: bytes, name: str = "manifest", sha256: Optional[str] = None) -> Manifest:
        """Parse a manifest file; with ``sha256``, the file must hash to it (checked before parsing)."""
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256.strip().lower():
                raise ConfigError(f"{name}: manifest SHA-256 is {actual}, but {sha256} is pinned")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name}: not a bootkit manifest (not ASCII at byte {e.start})") from e
        lines = text.split("\n")
        if lines[-1] != "":
            raise ConfigError(f"{name}: manifest does not end with a newline (truncated?)")
        lines.pop()
        if not lines or lines[0] != MAGIC:
            raise ConfigError(f"{name}: not a bootkit manifest (first line is not {MAGIC!r})")
        header = {}
        for number, key in enumerate(("size", "chunk-size", "sha256", "chunks"), start=2):
            words = lines[number - 1].split(" ") if len(lines) >= number else []
            if len(words) != 2 or words[0] != key:
                raise ConfigError(f"{name}: line {number}: expected '{key} VALUE'")
            header[key] = words[1]
        try:
            size, chunk_size, count = int(header["size"]), int(header["chunk-size"]), int(header["chunks"])
        except ValueError as e:
            raise ConfigError(f"{name}: size, chunk-size and chunks must be decimal numbers") from e
        try:
            _check_chunk_size(chunk_size, name)
        except UsageError as e:
            raise ConfigError(str(e)) from e
        if size < 0 or count != (size + chunk_size - 1) // chunk_size:
            raise ConfigError(f"{name}: {count} chunks do not cover size {size} in chunks of {chunk_size}")
        if not _HEX64.fullmatch(header["sha256"]):
            raise ConfigError(f"{name}: line 4: sha256 is not 64 lowercase hex digits")
        hashes = lines[5:]
        if len(hashes) != count:
            raise ConfigError(f"{name}: {len(hashes)} chunk lines, header says {count}")
        for i, h in enumerate(hashes):
            if not _HEX64.fullmatch(h):
                raise ConfigError(f"{name}: line {6 + i}: not 64 lowercase hex digits")
        return cls(size, chunk_size, header["sha256"], tuple(bytes.fromhex(h) for h in hashes))

    @classmethod
    def load(cls, location: str, options: Optional[FetchOptions] = None, sha256: Optional[str] = None) -> Manifest:
        """Read a manifest from a path or an http(s) URL (with ``options``' retries and TLS settings)."""
        if location.startswith(("http://", "https://")):
            from bootkit.fetch import client

            data = client.get_small(location, options or FetchOptions(verify="none"), limit=64 << 20)
        else:
            try:
                with open(location, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ConfigError(f"{location}: cannot read manifest: {e.strerror}") from e
        return cls.parse(data, location, sha256)
