"""Read one small file out of an initramfs image, as the kernel unpacks it (Documentation/driver-api/
early-userspace/buffer-format.rst): one or more "newc" cpio archives, each possibly compressed, with NUL
padding between them. dracut writes an uncompressed early-microcode archive first unless told not to
(``--no-early-microcode``, as ``bootkit build-initrd`` does), then the main archive compressed as asked
(``--zstd``; dracut's default is gzip).

Used by ``pxe-config --check`` to read which command-line contract an initramfs understands, and by it and
``build-uki`` to read which channel keys it trusts (:func:`read_trust_keys`). The image is
read as a stream (a local file or an HTTP body), never whole into memory, and everything in it is hostile:
names and sizes are bounded, a malformed archive is one :class:`UnreadableInitramfs` line.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

from bootkit.errors import BootkitError

NEWC_MAGICS = (b"070701", b"070702")
_HEADER = 110
_ZSTD = b"\x28\xb5\x2f\xfd"
_GZIP = b"\x1f\x8b"
_TRAILER = "TRAILER!!!"
#: bounds for hostile images: a name longer than PATH_MAX, NUL padding of more than this between archives
_MAX_NAME = 4096
_MAX_PADDING = 1 << 20
_CHUNK = 1 << 20


class UnreadableInitramfs(BootkitError):
    """Not an initramfs this reader understands, or a corrupt one."""


class _Stream:
    """Exact reads over a ``read(n)`` function, with bytes pushed back."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._buf = b""
        self.offset = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end."""
        out = bytearray(self._buf[:n])
        self._buf = self._buf[n:]
        while len(out) < n:
            chunk = self._read(min(max(n - len(out), 1 << 16), _CHUNK))
            if not chunk:
                break
            need = n - len(out)
            out += chunk[:need]
            self._buf = chunk[need:]
        self.offset += len(out)
        return bytes(out)

    def unread(self, data: bytes) -> None:
        self._buf = data + self._buf
        self.offset -= len(data)


class _Raw(io.RawIOBase):
    """A :class:`_Stream` as a file object, for the decompressors."""

    def __init__(self, s: _Stream) -> None:
        self._s = s

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b).cast("B")
        data = self._s.read(len(view))
        view[: len(data)] = data
        return len(data)


def _exact(s: _Stream, n: int, what: str, where: str) -> bytes:
    data = s.read(n)
    if len(data) != n:
        raise UnreadableInitramfs(f"{what}: truncated {where}")
    return data


def _skip(s: _Stream, n: int, what: str, where: str) -> None:
    while n > 0:
        step = min(n, _CHUNK)
        _exact(s, step, what, where)
        n -= step


def _scan_archive(s: _Stream, name: str, what: str, limit: int) -> bytes | None:
    """The data of ``name`` in the cpio archive at ``s``, or None when the trailer comes first."""
    while True:
        header = _exact(s, _HEADER, what, f"cpio header at offset {s.offset}")
        if header[:6] not in NEWC_MAGICS:
            raise UnreadableInitramfs(f"{what}: corrupt cpio archive (no newc header at offset {s.offset - _HEADER})")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise UnreadableInitramfs(f"{what}: corrupt cpio header at offset {s.offset - _HEADER}") from None
        filesize, namesize = fields[6], fields[11]
        if not 0 < namesize <= _MAX_NAME:
            raise UnreadableInitramfs(f"{what}: corrupt cpio header (name of {namesize} bytes)")
        raw_name = _exact(s, namesize, what, "cpio entry name")
        _skip(s, -(_HEADER + namesize) % 4, what, "cpio padding")
        entry = raw_name.rstrip(b"\0").decode("utf-8", "replace")
        if entry == _TRAILER:
            return None
        if entry.removeprefix("./").lstrip("/") == name:
            if filesize > limit:
                raise UnreadableInitramfs(f"{what}: {name} is {filesize} bytes, more than the {limit} expected")
            return _exact(s, filesize, what, name)
        _skip(s, filesize + (-filesize % 4), what, "cpio entry data")


def read_member(read: Callable[[int], bytes], name: str, *, what: str, limit: int = 1 << 16) -> bytes | None:
    """The content of file ``name`` (``usr/lib/...``) of the initramfs that ``read(n)`` streams, or None when
    no archive in it has that file. ``what`` names the image in messages."""
    import zstandard

    try:
        return _read_member(_Stream(read), name, what, limit)
    except (zstandard.ZstdError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UnreadableInitramfs(f"{what}: corrupt compressed data: {e}") from None


def _read_member(s: _Stream, name: str, what: str, limit: int) -> bytes | None:
    compressed = False
    #: an archive must follow: at the start, and in what a decompressor yields (a truncated zstd frame
    #: yields nothing, without an error)
    expect_archive = True
    while True:
        skipped = 0
        while (byte := s.read(1)) == b"\0":
            skipped += 1
            if skipped > _MAX_PADDING:
                raise UnreadableInitramfs(f"{what}: more than {_MAX_PADDING} NUL bytes at offset {s.offset}")
        if not byte:
            if expect_archive:
                raise UnreadableInitramfs(f"{what}: empty or truncated{' compressed' if compressed else ''} archive")
            return None
        s.unread(byte)
        magic = s.read(6)
        s.unread(magic)
        if magic in NEWC_MAGICS:
            found = _scan_archive(s, name, what, limit)
            if found is not None:
                return found
            expect_archive = False
            continue  # the next archive: the main one after an early-microcode prefix
        if compressed:
            raise UnreadableInitramfs(f"{what}: unexpected data after the compressed archive (offset {s.offset})")
        if magic.startswith(_ZSTD):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(_Raw(s)), read_across_frames=True)
            s = _Stream(reader.read)
        elif magic.startswith(_GZIP):
            s = _Stream(gzip.GzipFile(fileobj=io.BufferedReader(_Raw(s))).read)
        else:
            raise UnreadableInitramfs(
                f"{what}: not an initramfs bootkit can read (neither a cpio archive nor zstd- or "
                f"gzip-compressed; starts with {magic.hex()})"
            )
        compressed = expect_archive = True


def read_trust_keys(read: Callable[[int], bytes], *, what: str) -> tuple[bytes, ...]:
    """The Ed25519 keys whose signed channels the initramfs boots (``build-initrd --trust-key``): its
    ``channel-keys`` file, one key a line; () when it has none."""
    from bootkit.boot.channel import TRUST_FILE
    from bootkit.boot.ed25519 import BadKey, parse_public_key

    data = read_member(read, TRUST_FILE, what=what)
    if data is None:
        return ()
    try:
        text = data.decode("ascii")
        return tuple(parse_public_key(line, f"{what}: {TRUST_FILE}") for line in text.splitlines() if line.strip())
    except (UnicodeDecodeError, BadKey) as e:
        raise UnreadableInitramfs(f"{what}: {TRUST_FILE}: not a list of keys ({e})") from None
