"""A web server's docroot as a flat store of immutable, content-addressed files.

A published file is named after its content (``NAME-<first 16 hex digits of its SHA-256>.qcow2``) and never
changes once it has that name: a booting machine may be reading it (lazy mode reads ranges for as long as the
machine runs). So every file is written under a hidden temporary name, fsync'd, and then given its final name
with ``link()``, which fails rather than replace an existing file; an existing file of that name is accepted
only when it has the same bytes (publishing twice is a no-op), otherwise refused.

The bytes come from the source by reflink (``FICLONE``: shares blocks, independent afterwards), else a hard
link (same file system, and only a world-readable source; build-image replaces its outputs by rename, so the
published inode is never rewritten), else a copy; published files are world-readable (0644). A QCOW2
overlay is always copied: its backing file name is rewritten to the base's published name first
(:mod:`bootkit.host.publish.backing`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootkit.errors import UsageError

#: hex digits of the SHA-256 in a published name: 64 bits, no collision among versions of one image
HASH_PREFIX = 16
#: linux/fs.h: _IOW(0x94, 9, int)
FICLONE = 0x40049409
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_CHUNK = 1 << 20


class PublishError(UsageError):
    """A file cannot be published (bad name, a different file already under the name, ...)."""


def check_name(name: str, what: str) -> str:
    """A NAME for published files: letters, digits and ``. _ + -`` (what a kernel command-line pin can name)."""
    if not _NAME.fullmatch(name):
        raise PublishError(f"{what} {name[:80]!r}: 1-64 characters of A-Z a-z 0-9 . _ + -, starting with a letter"
                           " or digit")
    return name


def content_name(name: str, sha256: str, suffix: str) -> str:
    """``NAME-<hash prefix><suffix>``: ``web-0123456789abcdef.qcow2``."""
    return f"{name}-{sha256[:HASH_PREFIX]}{suffix}"


def version_pattern(name: str, suffix: str) -> re.Pattern[str]:
    """Matches the published names of every version of ``name`` with ``suffix``."""
    return re.compile(re.escape(name) + f"-[0-9a-f]{{{HASH_PREFIX}}}" + re.escape(suffix))


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Placed:
    """One file in the docroot: its name, size, and how it got there."""

    path: Path
    size: int
    #: reflinked | linked | copied | written | unchanged (already there, same bytes)
    how: str

    def line(self) -> str:
        return f"{self.how} {self.path} ({self.size} bytes)"


def place_file(src: Path, dst: Path, sha256: str) -> Placed:
    """Put ``src`` (whose SHA-256 is ``sha256``) at ``dst``, sharing its blocks where the file system can."""
    existing = _existing(dst, sha256)
    if existing is not None:
        return existing
    tmp = _tmp_name(dst)
    how = "copied"
    try:
        try:
            with src.open("rb") as fin, tmp.open("xb") as fout:
                fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            how = "reflinked"
        except OSError:
            tmp.unlink(missing_ok=True)
            try:
                if src.stat().st_mode & 0o444 != 0o444:
                    raise PermissionError  # a link would publish it unreadable for the web server
                os.link(src, tmp)
                how = "linked"
            except OSError:
                _copy(src, tmp)
        if how != "linked":
            os.chmod(tmp, 0o644)  # the web server (another user) reads it; build-initrd writes 0600
            _fsync(tmp)
        return _commit(tmp, dst, sha256, how)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(dst: Path, sha256: str, fill: Callable[[int], None]) -> Placed:
    """Publish bytes produced by ``fill(fd)`` (which must write exactly the content of hash ``sha256``)."""
    existing = _existing(dst, sha256)
    if existing is not None:
        return existing
    tmp = _tmp_name(dst)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: the web server reads it
            fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        if sha256_file(tmp) != sha256:
            raise PublishError(f"{dst.name}: the bytes written do not have the SHA-256 they were named after"
                               " (did the source change while publishing?)")
        return _commit(tmp, dst, sha256, "written")
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dst: Path, data: bytes) -> Placed:
    return write_file(dst, hashlib.sha256(data).hexdigest(), lambda fd: _write_all(fd, data))


def _existing(dst: Path, sha256: str) -> Placed | None:
    if not os.path.lexists(dst):
        return None
    if dst.is_symlink() or not dst.is_file():
        raise PublishError(f"{dst}: exists and is not a regular file: refusing to replace it")
    if sha256_file(dst) != sha256:
        raise PublishError(f"{dst}: exists with different bytes: refusing to replace a published file (a machine"
                           " may be reading it)")
    return Placed(dst, dst.stat().st_size, "unchanged")


def _commit(tmp: Path, dst: Path, sha256: str, how: str) -> Placed:
    """Give ``tmp`` its final name without ever replacing a file (link fails on an existing name)."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        # published meanwhile by someone else: fine if it is the same content
        placed = _existing(dst, sha256)
        assert placed is not None
        return placed
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        # a file system without hard links: rename, after checking once more that the name is free
        if os.path.lexists(dst):
            placed = _existing(dst, sha256)
            assert placed is not None
            return placed
        os.rename(tmp, dst)
    _fsync_dir(dst.parent)
    return Placed(dst, dst.stat().st_size, how)


def _tmp_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{os.getpid()}.tmp")


def _copy(src: Path, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        while done < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), min(size - done, 1 << 30))
            if n == 0:
                raise PublishError(f"{src}: shrank while being copied (at byte {done})")
            done += n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(path: Path, data: bytes) -> None:
    """Replace a file that only this tool reads and writes (the TOML description, the prune state): temp
    file, fsync, rename."""
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def hash_stream(chunks: Callable[[], bytes]) -> str:
    """SHA-256 of the bytes ``chunks()`` returns until it returns b""."""
    h = hashlib.sha256()
    while True:
        data = chunks()
        if not data:
            return h.hexdigest()
        h.update(data)


__all__ = ["HASH_PREFIX", "Placed", "PublishError", "atomic_replace", "check_name", "content_name", "place_file",
           "sha256_file", "version_pattern", "write_bytes", "write_file"]
