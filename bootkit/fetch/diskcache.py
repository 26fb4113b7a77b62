"""The persistent local chunk cache: verified chunks on a local filesystem, content-addressed by SHA-256.

A cache is a directory (the root of bootkit's own ext4 partition, mounted by the initramfs on a private
directory, ``bootkit.boot.cachedev``) laid out as::

    bootkit-cache            "bootkit-cache 1\\n": the layout marker; a directory without it is not a cache
    chunks/<2 hex>/<64 hex>  one chunk, named by the SHA-256 of its bytes (the manifest's chunk hash)
    manifests/<64 hex>       a manifest file, named by its own SHA-256 (what the command line pins)
    meta/<name>              small metadata blobs (:meth:`DiskCache.put_meta`), checksummed
    tmp/                     files being written; emptied on open

Chunks are stored by content, so a chunk shared by two image versions, or by an image and its backing file,
is stored and fetched once. Nothing in the cache is trusted: every read hashes the file and compares it with
the name it was asked for (the manifest's hash, which the pinned manifest vouches for); a file that does not
match is deleted and the read is a miss (the chunk is fetched again). Every write goes to ``tmp/`` first, is
fsynced and renamed into place, so a power cut leaves whole chunks or nothing under ``chunks/``.

Size is bounded (``max_bytes``: ``rd.qcow2.cache.max=``, default 90 % of the filesystem). When a new chunk
would not fit, chunks that none of the :data:`RECENT_MANIFESTS` most recently used manifests needs are
evicted, least recently written first; if that is not enough, the chunk is not stored (one warning).

Every access goes through a directory fd opened before the root switch, never a path: after switch_root the
daemon's own root is empty (docs/initramfs.md, "After the root switch").

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import threading
from typing import Dict, Iterator, List, Optional, Set, Tuple

from bootkit.errors import BootkitError
from bootkit.fetch.manifest import MAX_CHUNK_SIZE, Manifest
from bootkit.log import human_size, log

MARKER = "bootkit-cache"
MARKER_TEXT = b"bootkit-cache 1\n"
#: how many manifests the cache remembers; chunks none of them needs may be evicted
RECENT_MANIFESTS = 8
#: the largest manifest the cache keeps (one line of 65 bytes per chunk: 1 TiB in 1 MiB chunks is 68 MB)
MAX_MANIFEST = 64 << 20
#: metadata blobs: names and sizes the cache accepts (``put_meta``)
MAX_META = 64 << 10
MAX_META_BLOBS = 64
_META_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX2 = re.compile(r"^[0-9a-f]{2}$")
#: default share of the filesystem the cache may fill when no ``max`` is given
DEFAULT_SHARE = 0.9
#: an eviction removes chunks until the cache is at most this share of its bound
LOW_WATER = 0.9
#: per-boot warning lines about individual bad chunks before the rest are only counted
MAX_REPAIR_LINES = 5
_DIRS = ("chunks", "manifests", "meta", "tmp")


class CacheError(BootkitError):
    """The cache directory cannot be used (not a bootkit cache, unreadable): the boot goes on without it."""


class DiskCache:
    """A bootkit cache directory, open through a directory fd. Thread-safe.

    ``open`` checks the layout (or creates it in an empty directory) and counts what is stored; the counters
    in :attr:`stats` (``cache_hits``, ``cache_misses``, ``cache_stored``, ``cache_repaired``, ...) go to
    ``bootkit status``.
    """

    def __init__(self, fd: int, where: str, max_bytes: int) -> None:
        self.fd = fd
        self.where = where
        self.max_bytes = max_bytes
        self.used = 0
        self.stats: Dict[str, int] = {k: 0 for k in ("cache_hits", "cache_misses", "cache_stored", "cache_repaired",
                                                     "cache_evicted", "cache_full")}  # fmt: skip
        self._lock = threading.Lock()
        self._tmp_seq = 0
        self._warned_full = False
        #: an eviction found nothing to remove: not tried again this boot (every chunk is needed)
        self._evict_fruitless = False

    # -- opening --

    @classmethod
    def open(cls, directory: str, max_bytes: Optional[int] = None) -> DiskCache:
        """The cache in ``directory``: a bootkit cache, or an empty directory made into one (``lost+found``
        of a fresh ext4 does not count). Anything else raises :class:`CacheError`: a foreign filesystem is
        never written to."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CacheError(f"{directory}: cannot open the cache directory: {e.strerror}") from e
        try:
            if max_bytes is None:
                st = os.fstatvfs(fd)
                max_bytes = int(st.f_blocks * st.f_frsize * DEFAULT_SHARE)
            cache = cls(fd, directory, max_bytes)
            cache._check_layout()
            cache._scan()
        except BaseException:
            os.close(fd)
            raise
        return cache

    def _check_layout(self) -> None:
        names = set(self._ls(""))
        if MARKER in names:
            if self._read_small(MARKER, 64) != MARKER_TEXT:
                raise CacheError(f"{self.where}: {MARKER} is not a bootkit cache marker of version 1")
        elif names - {"lost+found"}:
            shown = ", ".join(sorted(names)[:3])
            raise CacheError(f"{self.where}: not a bootkit cache (holds {shown}{', ...' if len(names) > 3 else ''})")
        for name in _DIRS:
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
            except FileExistsError:
                pass
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise CacheError(f"{self.where}: {name} is not a directory")
        if MARKER not in names:
            self._write_file(MARKER, MARKER_TEXT)

    def _scan(self) -> None:
        """Count the stored bytes; remove what has no place in the layout (a repair, said once)."""
        removed = 0
        for name in self._ls("tmp"):
            removed += self._remove(f"tmp/{name}")
        for sub in self._ls("chunks"):
            path = f"chunks/{sub}"
            if not _HEX2.match(sub) or not stat.S_ISDIR(os.stat(path, dir_fd=self.fd, follow_symlinks=False).st_mode):
                removed += self._remove(path)
                continue
            for name in self._ls(path):
                st = os.stat(f"{path}/{name}", dir_fd=self.fd, follow_symlinks=False)
                if not _HEX64.match(name) or name[:2] != sub or not stat.S_ISREG(st.st_mode):
                    removed += self._remove(f"{path}/{name}")
                else:
                    self.used += st.st_size
        for name in self._ls("manifests"):
            if not _HEX64.match(name):
                removed += self._remove(f"manifests/{name}")
        if removed:
            self.stats["cache_repaired"] += removed
            log.warning("cache: %s: removed %d file(s) that are not part of a bootkit cache", self.where, removed)

    # -- chunks --

    def has(self, digest: bytes) -> bool:
        """Whether a file for chunk ``digest`` exists (its bytes are checked when read)."""
        try:
            os.stat(_chunk_path(digest), dir_fd=self.fd)
        except OSError:
            return False
        return True

    def get(self, digest: bytes) -> Optional[bytes]:
        """The chunk whose SHA-256 is ``digest``, verified; None if absent or if it failed verification (then
        the file is deleted and the read counts as a miss)."""
        path = _chunk_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError:
            self._count("cache_misses")
            return None
        try:
            # a file larger than any chunk cannot be one: not read (memory stays bounded)
            data = _read_all(fd) if os.fstat(fd).st_size <= MAX_CHUNK_SIZE else b""
        except OSError as e:
            log.warning("cache: %s: cannot read chunk %s: %s", self.where, digest.hex(), e.strerror)
            data = b""
        finally:
            os.close(fd)
        if hashlib.sha256(data).digest() == digest:
            self._count("cache_hits")
            return data
        self._count("cache_misses")
        with self._lock:
            self.stats["cache_repaired"] += 1
            repaired = self.stats["cache_repaired"]
        if repaired <= MAX_REPAIR_LINES:
            log.warning("cache: WARNING: chunk %s in %s does not match its hash (%d bytes): removed, fetching it "
                        "again", digest.hex(), self.where, len(data))  # fmt: skip
        elif repaired == MAX_REPAIR_LINES + 1:
            log.warning("cache: WARNING: more bad chunks removed; counted in bootkit status (cache_repaired)")
        self._remove(path, counted=True)
        return None

    def put(self, digest: bytes, data: bytes) -> bool:
        """Store a chunk (its hash is checked again here: the cache never holds an unverified chunk); False
        when it was not stored (the cache is full, or the write failed: one warning)."""
        if hashlib.sha256(data).digest() != digest:
            raise CacheError(f"cache: refusing to store a chunk that does not hash to {digest.hex()}")
        if self.has(digest):
            return True
        if not self._make_room(len(data)):
            return False
        try:
            os.mkdir(f"chunks/{digest.hex()[:2]}", 0o700, dir_fd=self.fd)
        except FileExistsError:
            pass
        except OSError as e:
            return self._write_failed(e)
        try:
            self._write_file(_chunk_path(digest), data)
        except OSError as e:
            return self._write_failed(e)
        with self._lock:
            self.used += len(data)
            self.stats["cache_stored"] += 1
        return True

    # -- manifests --

    def put_manifest(self, data: bytes) -> str:
        """Keep a manifest file (already verified by its caller) under its SHA-256, as the most recently used;
        forget manifests beyond :data:`RECENT_MANIFESTS`. Returns the hash."""
        digest = hashlib.sha256(data).hexdigest()
        if len(data) > MAX_MANIFEST:
            return digest
        name = f"manifests/{digest}"
        try:
            if self._read_small(name, MAX_MANIFEST) != data:
                self._write_file(name, data)
            os.utime(name, dir_fd=self.fd)  # the most recently used
            for old in self._manifests()[RECENT_MANIFESTS:]:
                self._remove(f"manifests/{old}")
        except OSError as e:
            self._write_failed(e)
        return digest

    def get_manifest(self, sha256: str) -> Optional[bytes]:
        """The manifest file whose SHA-256 is ``sha256`` (checked), or None."""
        name = f"manifests/{sha256.lower()}"
        if not _HEX64.match(sha256.lower()):
            return None
        try:
            data = self._read_small(name, MAX_MANIFEST)
        except OSError:
            return None
        if data is not None and hashlib.sha256(data).hexdigest() == sha256.lower():
            return data
        if data is not None:
            log.warning("cache: WARNING: manifest %s in %s does not match its hash: removed", sha256, self.where)
            self._remove(name)
            self._count("cache_repaired")
        return None

    def _manifests(self) -> List[str]:
        """Manifest hashes, most recently used first."""
        items = []
        for name in self._ls("manifests"):
            if _HEX64.match(name):
                items.append((os.stat(f"manifests/{name}", dir_fd=self.fd).st_mtime_ns, name))
        return [name for _, name in sorted(items, reverse=True)]

    # -- metadata blobs --

    def put_meta(self, name: str, data: bytes) -> None:
        """Keep a small blob (at most :data:`MAX_META` bytes) under ``name`` (``[a-z0-9][a-z0-9._-]{0,63}``),
        with a SHA-256 so that :meth:`get_meta` notices a damaged one. The cache does not know what it means:
        a caller that trusts a blob verifies it itself (e.g. a signature), as with everything on this disk."""
        if not _META_NAME.match(name):
            raise CacheError(f"cache: metadata name {name!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
        if len(data) > MAX_META:
            raise CacheError(f"cache: metadata {name}: {len(data)} bytes, at most {MAX_META}")
        if name not in self._ls("meta") and len(self._ls("meta")) >= MAX_META_BLOBS:
            raise CacheError(f"cache: metadata {name}: already {MAX_META_BLOBS} blobs")
        self._write_file(f"meta/{name}", hashlib.sha256(data).hexdigest().encode("ascii") + b"\n" + data)

    def get_meta(self, name: str) -> Optional[bytes]:
        """The blob stored under ``name``, or None (absent, or damaged: then removed)."""
        if not _META_NAME.match(name):
            return None
        try:
            raw = self._read_small(f"meta/{name}", MAX_META + 65)
        except OSError:
            return None
        if raw is None:
            return None
        head, _, data = raw.partition(b"\n")
        if head == hashlib.sha256(data).hexdigest().encode("ascii"):
            return data
        log.warning("cache: WARNING: metadata %s in %s is damaged: removed", name, self.where)
        self._remove(f"meta/{name}")
        return None

    # -- room --

    def _make_room(self, n: int) -> bool:
        with self._lock:
            if self.used + n <= self.max_bytes:
                return True
            fruitless = self._evict_fruitless
        # down to a low-water mark, so that the next puts do not each scan the cache again
        if not fruitless and not self.evict(int(self.max_bytes * LOW_WATER) - n):
            self._evict_fruitless = True
        with self._lock:
            if self.used + n <= self.max_bytes:
                return True
            self.stats["cache_full"] += 1
            warn, self._warned_full = not self._warned_full, True
        if warn:
            log.warning("cache: WARNING: %s is full (%s of at most %s, all needed by recent manifests): new chunks "
                        "are not kept", self.where, human_size(self.used), human_size(self.max_bytes))  # fmt: skip
        return False

    def needed(self) -> Set[str]:
        """Hashes (hex) of every chunk a remembered manifest names."""
        keep: Set[str] = set()
        for name in self._manifests()[:RECENT_MANIFESTS]:
            data = self.get_manifest(name)
            if data is None:
                continue
            try:
                keep.update(c.hex() for c in Manifest.parse(data, f"{self.where}/manifests/{name}").chunks)
            except BootkitError as e:
                log.warning("cache: %s", e)
        return keep

    def evict(self, target: int) -> int:
        """Remove chunks no remembered manifest needs, least recently written first, until at most ``target``
        bytes are stored; returns the bytes removed."""
        keep = self.needed()
        candidates = []
        for sub, name, st in self._chunk_files():
            if name not in keep:
                candidates.append((st.st_mtime_ns, f"chunks/{sub}/{name}", st.st_size))
        removed = 0
        for _, path, size in sorted(candidates):
            if self.used <= target:
                break
            self._remove(path, counted=True)
            removed += size
            self._count("cache_evicted")
        if removed:
            log.info("cache: evicted %s of chunks no recent manifest needs", human_size(removed))
        return removed

    def _chunk_files(self) -> Iterator[Tuple[str, str, os.stat_result]]:
        for sub in self._ls("chunks"):
            for name in self._ls(f"chunks/{sub}"):
                try:
                    yield sub, name, os.stat(f"chunks/{sub}/{name}", dir_fd=self.fd, follow_symlinks=False)
                except OSError:
                    continue

    # -- files --

    def _write_file(self, name: str, data: bytes) -> None:
        """``data`` into ``name``: a file in tmp/, fsynced, renamed into place (whole or not at all)."""
        with self._lock:
            self._tmp_seq += 1
            tmp = f"tmp/{os.getpid()}.{self._tmp_seq}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._remove(tmp)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def _ls(self, path: str) -> List[str]:
        """The names in directory ``path`` of the cache ("" for its top)."""
        if not path:
            return os.listdir(self.fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def _read_small(self, name: str, limit: int) -> Optional[bytes]:
        """A file of at most ``limit`` bytes (None if absent or larger)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size > limit:
                return None
            return _read_all(fd)
        finally:
            os.close(fd)

    def _remove(self, path: str, counted: bool = False) -> int:
        """Remove a file or a whole directory under the cache; 1 if something was removed. ``counted``: a chunk
        file whose size is in :attr:`used`."""
        try:
            st = os.stat(path, dir_fd=self.fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                for name in self._ls(path):
                    self._remove(f"{path}/{name}")
                os.rmdir(path, dir_fd=self.fd)
            else:
                os.unlink(path, dir_fd=self.fd)
        except OSError:
            return 0
        if counted:
            with self._lock:
                self.used -= st.st_size
        return 1

    def _write_failed(self, e: OSError) -> bool:
        with self._lock:
            self.stats["cache_full"] += 1
            warn, self._warned_full = not self._warned_full, True
        if warn:
            what = "is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"cannot be written ({e.strerror})"
            log.warning("cache: WARNING: %s %s: new chunks are not kept", self.where, what)
        return False

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"DiskCache({self.where!r})"


class CacheStore:
    """A :class:`~bootkit.fetch.stream.ChunkStore` over a :class:`DiskCache` for one image: chunk ``index`` is
    the cache's chunk with the manifest's hash for it. Which chunks are present is looked up once, here."""

    def __init__(self, cache: DiskCache, chunk_hashes: Tuple[bytes, ...]) -> None:
        self.cache = cache
        self.hashes = chunk_hashes
        self._have = bytearray(1 if cache.has(h) else 0 for h in chunk_hashes)
        self._count = sum(self._have)
        self._lock = threading.Lock()

    @property
    def present(self) -> int:
        """Chunks of this image in the cache (as far as the file names say)."""
        return self._count

    def has(self, index: int) -> bool:
        return bool(self._have[index])

    def read(self, index: int) -> Optional[bytes]:
        data = self.cache.get(self.hashes[index])
        if data is None:
            with self._lock:
                if self._have[index]:
                    self._have[index] = 0
                    self._count -= 1
        return data

    def put(self, index: int, data: bytes) -> None:
        if self.cache.put(self.hashes[index], data):
            with self._lock:
                if not self._have[index]:
                    self._have[index] = 1
                    self._count += 1

    def complete(self) -> bool:
        return self._count == len(self.hashes)

    def close(self) -> None:
        pass  # the cache is shared by every file of the chain; its owner closes it


def _chunk_path(digest: bytes) -> str:
    h = digest.hex()
    return f"chunks/{h[:2]}/{h}"


def _read_all(fd: int) -> bytes:
    parts: List[bytes] = []
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)
