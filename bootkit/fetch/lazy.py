"""Lazy mode: a byte source for the QCOW2 reader backed by HTTP range requests.

The image is read in fixed chunks (1 MiB by default, the manifest's chunk size when there is one). Chunks live
in an in-RAM LRU cache bounded in bytes; concurrent readers of one chunk share a single request; sequential
access triggers read-ahead on a few keep-alive connections. Each request is retried like a download, and each
chunk is checked against the ``Manifest`` before anyone sees it: a bad chunk is fetched once more, then
reported as ``ChunkError`` (the NBD server answers EIO) -- never served.

``start_background_fill(path)`` streams the whole image into a local file meanwhile; chunks already written
are read from it, and once it is complete every read comes from it and the network is no longer needed.

With ``mirrors`` (the same file on other servers), chunk requests go to the healthy mirror with the fewest
requests in flight, and a mirror that fails, is slow or serves a chunk that fails the manifest is left alone
for a while (``bootkit.fetch.mirrors``): a bad chunk costs a request to another mirror, never a wrong byte.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import os
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from bootkit.errors import BootkitError, UsageError
from bootkit.fetch import client
from bootkit.fetch.errors import ChunkError, SizeMismatch, TransientError
from bootkit.fetch.manifest import DEFAULT_CHUNK_SIZE, Manifest
from bootkit.fetch.mirrors import Mirror, MirrorSet
from bootkit.fetch.options import FetchOptions
from bootkit.fetch.progress import Progress, human_duration
from bootkit.fetch.rangeclient import RangeClient
from bootkit.fetch.room import check_fits, local_error
from bootkit.log import human_size, log

DEFAULT_CACHE_BYTES = 64 << 20
DEFAULT_READAHEAD = 8
DEFAULT_CONNECTIONS = 4


def _settle(future: Future[bytes], data: bytes = b"", error: Optional[BaseException] = None) -> None:
    """Resolve ``future`` unless close() already failed it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(data)
    except InvalidStateError:
        pass


class HTTPSource:
    """A read-only, thread-safe ByteSource (``name``, ``size``, ``pread``, ``close``) over HTTP range requests.

    ``manifest`` is required unless ``options.verify == "none"``; ``options.sha256`` is not used here (the
    boot configuration pins the manifest's hash instead, see ``Manifest.load``). ``mirrors``: URLs of the same
    file on other servers (only with a manifest: without one nothing could tell a mirror's bytes from any other
    file's); ``self.mirrors`` holds their state and counters.
    """

    def __init__(
        self,
        url: str,
        options: FetchOptions,
        *,
        chunk_size: Optional[int] = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        manifest: Optional[Manifest] = None,
        readahead: int = DEFAULT_READAHEAD,
        connections: int = DEFAULT_CONNECTIONS,
        mirrors: Sequence[str] = (),
    ) -> None:
        if mirrors and manifest is None:
            raise UsageError(f"{url}: mirrors need a manifest: every chunk from a mirror must be verified")
        if manifest is None and options.verify != "none":
            raise UsageError(f"{url}: lazy mode verifies chunks with a manifest; give one, or use verify=none")
        if manifest is not None:
            if chunk_size is not None and chunk_size != manifest.chunk_size:
                raise UsageError(f"{url}: chunk size {chunk_size} differs from the manifest's {manifest.chunk_size}")
            chunk_size = manifest.chunk_size
        self.name = url
        self.options = options
        self.chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
        self.manifest = manifest
        self.readahead = readahead
        self.cache_bytes = cache_bytes
        self.stats: Dict[str, int] = collections.Counter()
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cached_bytes = 0
        self._inflight: Dict[int, Future[bytes]] = {}
        self._last_chunk = -2
        self._closed = False
        self.mirrors = MirrorSet([url, *mirrors])
        self._clients: Dict[str, RangeClient] = {}
        self._size = self._open_first().size
        if manifest is not None and manifest.size != self._size:
            raise SizeMismatch(f"{url}: the server has {self._size} bytes, the manifest says {manifest.size}")
        self._executor = ThreadPoolExecutor(max_workers=max(1, connections), thread_name_prefix="fetch-ahead")
        self._chunks = (self._size + self.chunk_size - 1) // self.chunk_size
        # background fill: which chunks are in the local file, and the file once complete
        self._have = bytearray(self._chunks)
        self._fill_fd = -1
        self._fill_part = ""
        self._fill_thread: Optional[threading.Thread] = None
        self._fill_conn: Optional[http.client.HTTPConnection] = None
        self._fill_error: Optional[BaseException] = None
        self._local = False
        self.fill_done = threading.Event()
        log.info(
            "fetch: reading %s lazily (%s, chunks of %s, %s)",
            url,
            human_size(self._size),
            human_size(self.chunk_size),
            "verified by manifest" if manifest else "NOT verified",
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def cached_bytes(self) -> int:
        """Bytes held in the chunk cache now (at most ``cache_bytes``, or one chunk if that is smaller)."""
        return self._cached_bytes

    # -- the ByteSource interface --

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"{self.name}: negative offset or length")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        if self._local:
            return os.pread(self._fill_fd, end - offset, offset)
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        self._read_ahead(first, last)
        if first == last:
            base = first * self.chunk_size
            return self._chunk(first)[offset - base : end - base]
        parts = []
        for index in range(first, last + 1):
            base = index * self.chunk_size
            data = self._chunk(index)
            parts.append(data[max(offset - base, 0) : end - base])
        return b"".join(parts)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._lock:
            clients = list(self._clients.values())
        for rc in clients:
            rc.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # read-ahead cancelled before it started: nobody else will answer its waiters
            pending = list(self._inflight.values())
        for future in pending:
            _settle(future, error=TransientError(f"{self.name}: source closed"))
        fill_conn = self._fill_conn
        if fill_conn is not None and fill_conn.sock is not None:
            try:
                fill_conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the fill thread out of its read
            except OSError:
                pass
        if self._fill_thread is not None:
            self._fill_thread.join()
        if self._fill_fd >= 0:
            os.close(self._fill_fd)
            self._fill_fd = -1
            if not self._local:
                try:
                    os.unlink(self._fill_part)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> HTTPSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPSource({self.name!r})"

    # -- background fill --

    def start_background_fill(self, path: str) -> None:
        """Start copying the whole image to ``path`` (via ``path.part``) in a background thread.

        Raises NotEnoughSpace at once if it cannot fit (same rule as ``download``). ``fill_done`` is set when
        the copy is complete (``filled`` is then True) or has failed (``wait_filled`` raises the error; reads
        carry on over the network).
        """
        with self._lock:
            if self._fill_thread is not None:
                raise UsageError(f"{self.name}: background fill already started")
            check_fits(self.name, self._size, path, self.options.reserve_bytes)
            self._fill_part = path + ".part"
            try:
                fd = os.open(self._fill_part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                os.ftruncate(fd, self._size)
            except OSError as e:
                raise local_error(e, self.name, f"cannot create {self._fill_part}") from e
            self._fill_fd = fd
            self._fill_thread = threading.Thread(target=self._fill, args=(path,), name="fetch-fill", daemon=True)
        self._fill_thread.start()

    @property
    def filled(self) -> bool:
        """True once every read comes from the complete local copy."""
        return self._local

    def wait_filled(self, timeout: Optional[float] = None) -> bool:
        """Wait for the background fill; True when complete, False on timeout; raises the fill's error."""
        if self._fill_thread is None:
            raise UsageError(f"{self.name}: no background fill was started")
        if not self.fill_done.wait(timeout):
            return False
        if self._fill_error is not None:
            raise self._fill_error
        return True

    # -- for stream mode's fill (bootkit.fetch.stream) --

    def fetch_chunk(self, index: int) -> bytes:
        """Chunk ``index`` straight from the server, checked against the manifest like every read (raises
        ``ChunkError`` when it fails twice), without touching the cache or the read-ahead."""
        return self._fetch_chunk(index)

    def release(self) -> None:
        """Drop the chunk cache and the idle connections: every read is served from elsewhere from now on."""
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
            clients = list(self._clients.values())
        for rc in clients:
            rc.drop_idle()

    # -- chunks --

    def _chunk(self, index: int) -> bytes:
        """Chunk ``index``: from the cache, the local copy, a request already on its way, or a new request."""
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                self.stats["cache_hits"] += 1
                return data
            local = bool(self._have[index])
            waiting = self._inflight.get(index)
            if not local and waiting is None:
                mine: Future[bytes] = Future()
                self._inflight[index] = mine
        if local:
            offset, length = self._span(index)
            return os.pread(self._fill_fd, length, offset)
        if waiting is not None:
            return waiting.result()
        return self._fetch_as_owner(index, mine)

    def _fetch_as_owner(self, index: int, future: Future[bytes]) -> bytes:
        try:
            data = self._fetch_chunk(index)
        except BaseException as e:
            with self._lock:
                self._inflight.pop(index, None)
            _settle(future, error=e)
            raise
        with self._lock:
            self._inflight.pop(index, None)
            self._cache_put(index, data)
        _settle(future, data)
        return data

    def _cache_put(self, index: int, data: bytes) -> None:
        """Insert under the lock, evicting the least recently used chunks beyond ``cache_bytes``."""
        if index in self._cache:
            return
        self._cache[index] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def _read_ahead(self, first: int, last: int) -> None:
        """After sequential access, fetch the next ``readahead`` chunks on the worker threads."""
        with self._lock:
            sequential = first in (self._last_chunk, self._last_chunk + 1)
            self._last_chunk = last
            if not sequential or not self.readahead or self._closed:
                return
            claimed = []
            for index in range(last + 1, min(last + 1 + self.readahead, self._chunks)):
                if index in self._cache or index in self._inflight or self._have[index]:
                    continue
                future: Future[bytes] = Future()
                self._inflight[index] = future
                claimed.append((index, future))
        for index, future in claimed:
            try:
                self._executor.submit(self._prefetch, index, future)
            except RuntimeError:  # closed meanwhile
                with self._lock:
                    self._inflight.pop(index, None)
                _settle(future, error=TransientError(f"{self.name}: source closed"))

    def _prefetch(self, index: int, future: Future[bytes]) -> None:
        try:
            self._fetch_as_owner(index, future)
            with self._lock:
                self.stats["readahead"] += 1
        except BaseException as e:  # the reader that needs the chunk will see it again
            log.debug("fetch: read-ahead of chunk %d failed: %s", index, e)

    def _span(self, index: int) -> Tuple[int, int]:
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self._size - offset)

    def _fetch_chunk(self, index: int) -> bytes:
        """One chunk, retried on transient errors, checked against the manifest.

        One server: a bad chunk is fetched once more, then ChunkError. Mirrors: each bad chunk demotes the mirror
        that sent it and is asked of another one, until every mirror (at least two requests) sent it bad.
        """
        offset, length = self._span(index)
        retry = client.Retry(self.name, self.options)
        bad: List[Mirror] = []
        error: Optional[BootkitError] = None
        while True:
            mirror = self.mirrors.pick(avoid=bad)
            if mirror is None:
                if error is not None:  # every server failed a request: wait (and count the attempt)
                    retry.failed(self._all_failed(error))
                mirror = self.mirrors.pick(avoid=bad, force=True)
                assert mirror is not None
            started = time.monotonic()
            try:
                data = self._client(mirror).get(offset, length)
            except Exception as e:  # classify decides what is retried
                error = client.classify(e, mirror.url, self.options.timeout)
                self.mirrors.failed(mirror, error)
                continue
            error = None
            with self._lock:
                self.stats["requests"] += 1
                self.stats["bytes"] += length
            if self.manifest is None or self.manifest.check(index, data):
                self.mirrors.succeeded(mirror, length, time.monotonic() - started)
                return data
            bad.append(mirror)
            with self._lock:
                self.stats["bad_chunks"] += 1
            what = f"{mirror.url}: chunk {index} (bytes {offset}-{offset + length - 1}) does not match the manifest"
            self.mirrors.corrupt(mirror, what)
            if len(bad) >= max(2, len(self.mirrors)):
                raise ChunkError(f"{what}, also when fetched again{self._from_all()}; not served")
            log.warning("fetch: %s; fetching it again", what)

    def _from_all(self) -> str:
        return f" from all {len(self.mirrors)} mirrors" if len(self.mirrors) > 1 else ""

    def _all_failed(self, error: BootkitError) -> BootkitError:
        """The error that ends a fetch: with mirrors, of the same kind, naming every mirror's last error."""
        if len(self.mirrors) == 1:
            return error
        return type(error)(f"all {len(self.mirrors)} servers of {self.name} failed: {self.mirrors.summary()}")

    # -- servers --

    def _open_first(self) -> RangeClient:
        """Probe the servers in order until one answers; its size is the file's. One server retries as always;
        with mirrors each probe is one attempt, and a round in which none answered counts as a failed attempt."""
        if len(self.mirrors) == 1:
            rc = RangeClient(self.name, self.options)
            self._clients[self.name] = rc
            return rc
        retry = client.Retry(self.name, self.options)
        once = dataclasses.replace(self.options, retries=0)
        while True:
            error: Optional[BootkitError] = None
            for mirror in self.mirrors.mirrors:
                try:
                    rc = RangeClient(mirror.url, once)
                except BootkitError as e:
                    error = e
                    self.mirrors.failed(mirror, e)
                    continue
                self._clients[mirror.url] = rc
                return rc
            assert error is not None
            retry.failed(self._all_failed(error if isinstance(error, TransientError) else TransientError(str(error))))

    def _client(self, mirror: Mirror) -> RangeClient:
        """The range client of ``mirror``, probed on first use: it must have the same size as the first."""
        with self._lock:
            rc = self._clients.get(mirror.url)
        if rc is not None:
            return rc
        rc = RangeClient(mirror.url, dataclasses.replace(self.options, retries=0))
        if rc.size != self._size:
            rc.close()
            raise SizeMismatch(f"{mirror.url}: has {rc.size} bytes, {self.name} has {self._size}: not the same file")
        with self._lock:
            closed = self._closed
            existing = self._clients.setdefault(mirror.url, rc) if not closed else rc
        if closed or existing is not rc:
            rc.close()
        if closed:
            raise TransientError(f"{self.name}: source closed")
        return existing

    def _drop_idle(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for rc in clients:
            rc.drop_idle()

    # -- background fill thread --

    def _fill(self, path: str) -> None:
        progress = Progress(self.name, self._size, self.options.progress_interval, label="fill")
        try:
            with self._lock:  # what the cache holds already need not be fetched again
                cached = list(self._cache.items())
            for index, data in cached:
                self._store(index, data)
            retry = client.Retry(self.name, self.options)
            index = 0
            while index < self._chunks:
                if self._closed:
                    return
                if self._have[index]:
                    index += 1
                    continue
                before = index
                try:
                    index = self._fill_stream(index, progress)
                except Exception as e:  # classify decides what is retried
                    if self._closed:
                        return
                    error = client.classify(e, self.name, self.options.timeout)
                    if len(self.mirrors) == 1 or self.mirrors.pick_url(()) is None:
                        retry.failed(self._all_failed(error), progressed=index > before)
                    index = before
                    while index < self._chunks and self._have[index]:
                        index += 1
            os.fsync(self._fill_fd)
            os.rename(self._fill_part, path)
            with self._lock:
                self._local = True
                self._cache.clear()
                self._cached_bytes = 0
            self._drop_idle()
            log.info(
                "fill: %s complete in %s: reads now come from %s (%s)",
                human_size(self._size),
                human_duration(progress.elapsed()),
                path,
                self.name,
            )
        except BaseException as e:  # reported through wait_filled
            self._fill_error = e if isinstance(e, BootkitError) else client.classify(e, self.name, self.options.timeout)
            if not self._closed:
                log.error("fill: %s; reads carry on over the network", self._fill_error)
        finally:
            self.fill_done.set()

    def _store(self, index: int, data: bytes) -> None:
        if not self._have[index]:
            try:
                os.pwrite(self._fill_fd, data, index * self.chunk_size)
            except OSError as e:
                raise local_error(e, self.name, f"cannot write {self._fill_part}") from e
            self._have[index] = 1

    def _fill_stream(self, index: int, progress: Progress) -> int:
        """Stream from chunk ``index`` to the end into the local file; returns the next chunk to fetch."""
        offset = index * self.chunk_size
        mirror = self.mirrors.pick(force=True)
        assert mirror is not None
        try:
            server = self._client(mirror)
            conn = server.connect()
        except Exception as e:
            self.mirrors.failed(mirror, client.classify(e, mirror.url, self.options.timeout))
            raise
        self._fill_conn = conn
        try:
            response = server.open_from(conn, offset)
            buf = bytearray(self.chunk_size)
            while index < self._chunks and not self._closed:
                _, length = self._span(index)
                view = memoryview(buf)[:length]
                got = 0
                while got < length:
                    n = response.readinto(view[got:])
                    if not n:
                        raise TransientError(f"{mirror.url}: connection closed early in chunk {index}")
                    got += n
                if not self._have[index]:
                    if self.manifest is not None and hashlib.sha256(view).digest() != self.manifest.chunks[index]:
                        with self._lock:
                            self.stats["bad_chunks"] += 1
                        what = f"{mirror.url}: chunk {index} does not match the manifest"
                        self.mirrors.corrupt(mirror, what)  # the stream ends here: its server is demoted
                        log.warning("fill: %s; fetching it again", what)
                        self._store(index, self._fetch_chunk(index))  # fetched again, or ChunkError
                        return index + 1
                    else:
                        self._store(index, view)  # type: ignore[arg-type]
                        self.mirrors.add_bytes(mirror, length)
                index += 1
                progress.update(index * self.chunk_size if index < self._chunks else self._size)
        except Exception as e:
            self.mirrors.failed(mirror, client.classify(e, mirror.url, self.options.timeout))
            raise
        else:
            self.mirrors.released(mirror)
            return index
        finally:
            self._fill_conn = None
            conn.close()
