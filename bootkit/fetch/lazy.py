"""Lazy mode: a byte source for the QCOW2 reader backed by HTTP range requests.

The image is read in fixed chunks (1 MiB by default, the manifest's chunk size when there is one). Chunks live
in an in-RAM cache bounded in bytes; concurrent readers of one chunk share a single request; a read that moves
on into the next chunk triggers read-ahead on a few keep-alive connections. Each request is retried like a
download, and each chunk is checked against the ``Manifest`` before anyone sees it: a bad chunk is fetched once
more, then reported as ``ChunkError`` (the NBD server answers EIO) -- never served.

The cache has two parts within one byte budget, so that guessing never costs what was read: chunks someone
read (least recently used evicted first), and read-ahead chunks nobody read yet (at most half the budget; a
reader moves them to the first part). Read-ahead never evicts another read-ahead chunk that lies ahead of a
reader, and never claims a chunk that is cached or on its way. So a chunk is fetched again only after it left
the cache, which needs more distinct chunks read than the budget holds.

With ``mirrors`` (the same file on other servers), chunk requests go to the healthy mirror with the fewest
requests in flight, and a mirror that fails, is slow or serves a chunk that fails the manifest is left alone
for a while (``bootkit.fetch.mirrors``): a bad chunk costs a request to another mirror, never a wrong byte.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import collections
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
from bootkit.fetch.rangeclient import RangeClient
from bootkit.log import human_size, log
from bootkit.record import replace

DEFAULT_CACHE_BYTES = 64 << 20
DEFAULT_READAHEAD = 8
DEFAULT_CONNECTIONS = 4
#: how many recent readers' positions read-ahead follows (the NBD server reads on several threads)
STREAMS = 16


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
        # chunks someone read, least recently used first; read-ahead chunks nobody read yet, oldest first
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._ahead: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cached_bytes = 0
        self._inflight: Dict[int, Future[bytes]] = {}
        self._ahead_inflight = 0
        # the last chunk of each recent read -> how many chunks in a row led there; most recent last
        self._recent: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._closed = False
        self.mirrors = MirrorSet([url, *mirrors])
        self._clients: Dict[str, RangeClient] = {}
        self._size = self._open_first().size
        if manifest is not None and manifest.size != self._size:
            raise SizeMismatch(f"{url}: the server has {self._size} bytes, the manifest says {manifest.size}")
        self._executor = ThreadPoolExecutor(max_workers=max(1, connections), thread_name_prefix="fetch-ahead")
        self._chunks = (self._size + self.chunk_size - 1) // self.chunk_size
        #: read-ahead chunks fetched or on their way but not read yet: at most half of the cache
        self.ahead_limit = min(readahead, cache_bytes // self.chunk_size // 2)
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

    def __enter__(self) -> HTTPSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPSource({self.name!r})"

    # -- for stream mode's fill (bootkit.fetch.stream) --

    def fetch_chunk(self, index: int) -> bytes:
        """Chunk ``index`` for a copy kept elsewhere: from the cache or a request on its way if it is there (a
        read-ahead chunk leaves the cache: the copy has it now), else straight from the server, checked against
        the manifest like every read (raises ``ChunkError`` when it fails twice), without caching it."""
        with self._lock:
            data = self._cache.get(index)
            if data is None:
                data = self._ahead.pop(index, None)
                if data is not None:
                    self._cached_bytes -= len(data)
            if data is not None:
                self.stats["cache_hits"] += 1
                return data
            waiting = self._inflight.get(index)
        if waiting is not None:
            try:
                data = waiting.result()
            except BootkitError:  # a read-ahead that failed: this caller asks again
                return self._fetch_chunk(index)
            with self._lock:
                dropped = self._ahead.pop(index, None)
                if dropped is not None:
                    self._cached_bytes -= len(dropped)
            return data
        return self._fetch_chunk(index)

    def release(self) -> None:
        """Drop the chunk cache and the idle connections: every read is served from elsewhere from now on."""
        with self._lock:
            self._cache.clear()
            self._ahead.clear()
            self._cached_bytes = 0
            clients = list(self._clients.values())
        for rc in clients:
            rc.drop_idle()

    # -- chunks --

    def _chunk(self, index: int) -> bytes:
        """Chunk ``index``: from the cache, a request already on its way, or a new request."""
        with self._lock:
            data = self._use(index)
            if data is not None:
                self.stats["cache_hits"] += 1
                return data
            waiting = self._inflight.get(index)
            if waiting is None:
                mine: Future[bytes] = Future()
                self._inflight[index] = mine
        if waiting is None:
            return self._fetch_as_owner(index, mine, ahead=False)
        data = waiting.result()
        with self._lock:  # a read-ahead chunk that arrived for this reader: it is read now
            self._use(index)
        return data

    def _use(self, index: int) -> Optional[bytes]:
        """Under the lock: chunk ``index`` from the cache, now the most recently read one; None if absent."""
        data = self._cache.get(index)
        if data is not None:
            self._cache.move_to_end(index)
            return data
        data = self._ahead.pop(index, None)
        if data is not None:
            self._cache[index] = data  # its bytes are counted already
            self.stats["readahead_used"] += 1
        return data

    def _fetch_as_owner(self, index: int, future: Future[bytes], ahead: bool) -> bytes:
        try:
            data = self._fetch_chunk(index)
        except BaseException as e:
            with self._lock:
                self._inflight.pop(index, None)
                if ahead:
                    self._ahead_inflight -= 1
            _settle(future, error=e)
            raise
        with self._lock:
            self._inflight.pop(index, None)
            if ahead:
                self._ahead_inflight -= 1
            if not self._closed:
                self._cache_put(index, data, ahead)
        _settle(future, data)
        return data

    def _cache_put(self, index: int, data: bytes, ahead: bool) -> None:
        """Insert under the lock; beyond ``cache_bytes``, evict the least recently read chunks (never the
        unread read-ahead ones: there are at most ``ahead_limit`` of them, and one chunk always stays)."""
        if index in self._cache or index in self._ahead:
            return
        (self._ahead if ahead else self._cache)[index] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > (0 if ahead else 1):
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)
        while self._cached_bytes > self.cache_bytes and len(self._ahead) > (1 if ahead else 0):
            _, old = self._ahead.popitem(last=False)  # a cache smaller than two chunks
            self._cached_bytes -= len(old)

    def _read_ahead(self, first: int, last: int) -> None:
        """When a read moves on from a chunk read just before into the next one, fetch the chunks after it on the
        worker threads (1, 2, 4, ... as the run grows, at most ``ahead_limit``): those not cached, not on their
        way, and within the read-ahead budget."""
        with self._lock:
            before = [self._recent[i] for i in range(first - 1, last) if i in self._recent]
            onward = last not in self._recent and bool(before)
            run = self._recent.pop(last, 0) or (max(before, default=0) + last - first + 1)
            self._recent[last] = run
            if len(self._recent) > STREAMS:
                self._recent.popitem(last=False)
            if not onward or not self.ahead_limit or self._closed:
                return
            # the window doubles with the run (1, 2, 4, ... chunks): a short run cannot fetch much it won't read
            depth = min(self.ahead_limit, 1 << min(run - 2, 16))
            window = range(last + 1, min(last + 1 + depth, self._chunks))
            claimed = []
            for index in window:
                if index in self._cache:
                    self._cache.move_to_end(index)  # about to be read: evict others first
                    continue
                if index in self._ahead or index in self._inflight:
                    continue
                if len(self._ahead) + self._ahead_inflight >= self.ahead_limit and not self._retire_stale(window):
                    break
                future: Future[bytes] = Future()
                self._inflight[index] = future
                self._ahead_inflight += 1
                claimed.append((index, future))
        for index, future in claimed:
            try:
                self._executor.submit(self._prefetch, index, future)
            except RuntimeError:  # closed meanwhile
                with self._lock:
                    self._inflight.pop(index, None)
                    self._ahead_inflight -= 1
                _settle(future, error=TransientError(f"{self.name}: source closed"))

    def _retire_stale(self, window: range) -> bool:
        """Under the lock: move the oldest unread read-ahead chunk that lies ahead of no recent reader (a guess
        that did not come true yet) to the cache's least recently read end, where it stays until the budget
        needs its room; False if every one is still ahead of a reader."""
        for index in self._ahead:
            if index in window or any(index - d in self._recent for d in range(1, self.ahead_limit + 1)):
                continue
            self._cache[index] = self._ahead.pop(index)
            self._cache.move_to_end(index, last=False)
            self.stats["readahead_retired"] += 1
            return True
        return False

    def _prefetch(self, index: int, future: Future[bytes]) -> None:
        try:
            self._fetch_as_owner(index, future, ahead=True)
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
        once = replace(self.options, retries=0)
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
        rc = RangeClient(mirror.url, replace(self.options, retries=0))
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
