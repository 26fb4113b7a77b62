"""Stream mode: lazy reads for the boot, and the whole image filled into RAM behind it.

A :class:`StreamSource` is the byte source the QCOW2 reader opens: a chunk the :class:`ChunkStore` holds is
read from it, any other chunk comes from the lazy :class:`~bootkit.fetch.lazy.HTTPSource` (verified against
the manifest there) and is kept in the store on its way. :class:`Fill` walks the image in the background and
fetches every chunk the store lacks, one request at a time, verified before it is stored:

* the boot's own reads go first: the fill starts no request while a read is waiting for the network, nor
  within ``QUIET`` seconds of the last one (a request already on its way is not interrupted: one chunk);
* a :class:`Pacer` caps the fill's rate (``rd.qcow2.fill-rate``), so that it leaves room on a shared link;
* a chunk that fails its manifest hash is fetched again, a bounded number of times, and never stored;
* progress goes to the console at every 10 % (at most ten lines) and to ``status`` (for ``bootkit status``).

Once every chunk is in the store, reads never touch the network again: the server may go away.

Where verified chunks go is the :class:`ChunkStore` interface; :class:`RamStore` (a file on a RAM filesystem,
``/run``) is the one there is. A store must fit (the same room rule as ram mode, ``bootkit.fetch.room``);
if the image does not, the machine stays lazy with one warning.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Union

from bootkit.errors import BootkitError
from bootkit.fetch.deferred import DeferredRemote
from bootkit.fetch.lazy import HTTPSource
from bootkit.fetch.room import local_error, space_budget
from bootkit.log import human_size, log

#: seconds without a foreground read before the fill may start its next request
QUIET = 0.05
#: how often a chunk is fetched for the fill at most (each fetch is itself retried on transient errors and
#: refetched once on a bad hash by the lazy source), before the fill gives up and the machine stays lazy
FILL_ATTEMPTS = 3
#: progress lines: one per this share of the image
PROGRESS_STEP_PERCENT = 10
#: how often a fill held back by its gate (the root not mounted yet) looks again, seconds
GATE_POLL = 0.1


class ChunkStore(Protocol):
    """Where verified chunks go: the stream fill's destination (:class:`RamStore`, or a local cache disk:
    ``bootkit.fetch.diskcache.CacheStore``)."""

    def has(self, index: int) -> bool:
        """Whether chunk ``index`` is stored (and verified: nothing else is ever put)."""

    def read(self, index: int) -> Optional[bytes]:
        """The stored chunk ``index`` (only after ``has(index)``); None when the store lost it (a disk cache
        whose copy failed verification): the caller fetches it again."""

    def put(self, index: int, data: bytes) -> None:
        """Store chunk ``index``; ``data`` was verified against the manifest by the caller."""

    def complete(self) -> bool:
        """Whether every chunk of the image is stored."""

    def close(self) -> None:
        """Release the store (the stored bytes stay where they are, e.g. a file on /run)."""


class RamStore:
    """Chunks in a file on a RAM filesystem (``/run``), one bit of bookkeeping per chunk.

    The file is created at the image's full size (sparse) and filled in any order; it holds only chunks
    ``put`` was given, which its caller verified. ``path`` must be on a filesystem :func:`fits` was asked
    about.
    """

    def __init__(self, path: str, size: int, chunk_size: int) -> None:
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = (size + chunk_size - 1) // chunk_size
        self._have = bytearray(self.chunks)
        self._count = 0
        self._lock = threading.Lock()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, size)
        except OSError as e:
            raise local_error(e, path, "cannot create the stream mode copy") from e
        self._fd = fd

    def has(self, index: int) -> bool:
        return bool(self._have[index])

    def read(self, index: int) -> Optional[bytes]:
        offset = index * self.chunk_size
        return os.pread(self._fd, min(self.chunk_size, self.size - offset), offset)

    def put(self, index: int, data: bytes) -> None:
        with self._lock:
            if self._have[index]:
                return
            try:
                os.pwrite(self._fd, data, index * self.chunk_size)
            except OSError as e:
                raise local_error(e, self.path, f"cannot store chunk {index}") from e
            self._have[index] = 1
            self._count += 1

    def complete(self) -> bool:
        return self._count == self.chunks

    @property
    def stored_bytes(self) -> int:
        """Bytes stored so far (every stored chunk is full-size but the last)."""
        if not self._count:
            return 0
        short = self.size - (self.chunks - 1) * self.chunk_size
        return self._count * self.chunk_size - (self.chunk_size - short if self._have[-1] else 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamSource:
    """A ByteSource (``name``, ``size``, ``pread``, ``close``) over a lazy HTTPSource and, once attached, a
    :class:`ChunkStore`: stored chunks are read locally, other chunks come from ``remote`` and are stored.

    ``busy`` and ``last_read`` tell the fill whether the boot is waiting for the network.
    """

    def __init__(self, remote: Union[HTTPSource, DeferredRemote]) -> None:
        self.remote = remote
        self.name = remote.name
        self.chunk_size = remote.chunk_size
        self.store: Optional[ChunkStore] = None
        self.busy = 0
        self.last_read = 0.0
        self._lock = threading.Lock()
        self._complete = False

    @property
    def size(self) -> int:
        return self.remote.size

    @property
    def chunks(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    @property
    def stats(self) -> Dict[str, int]:
        """The lazy source's request counters (``bootkit status`` shows them as ``http_*``)."""
        return dict(self.remote.stats)

    def attach(self, store: ChunkStore) -> None:
        """From now on, chunks the boot reads from the network are kept in ``store`` too."""
        self.store = store

    def mark_complete(self) -> None:
        """Every chunk is in the store: the network is not needed any more."""
        self._complete = True
        self.remote.release()

    @property
    def complete(self) -> bool:
        return self._complete

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"{self.name}: negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        parts = []
        for index in range(first, last + 1):
            base = index * self.chunk_size
            data = self._chunk(index)
            parts.append(data[max(offset - base, 0) : end - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _chunk(self, index: int) -> bytes:
        store = self.store
        if store is not None and (self._complete or store.has(index)):
            local = store.read(index)
            if local is not None:
                return local
        base = index * self.chunk_size
        with self._lock:
            self.busy += 1
        try:
            data = self.remote.pread(base, min(self.chunk_size, self.size - base))  # verified there
        finally:
            with self._lock:
                self.busy -= 1
                self.last_read = time.monotonic()
        if store is not None:
            try:
                store.put(index, data)
            except BootkitError as e:  # the boot's read has its data; the fill reports a store that fails
                log.debug("stream: keeping chunk %d failed: %s", index, e)
        return data

    def close(self) -> None:
        self.remote.close()
        if self.store is not None:
            self.store.close()

    def __repr__(self) -> str:
        return f"StreamSource({self.name!r})"


class Pacer:
    """The fill's rate cap: how long to wait before sending ``n`` more bytes at ``rate`` bytes per second.

    A schedule, not a meter: each request is due when the bytes before it have had their time; up to
    ``burst`` bytes may go at once after a pause (the time lost while the boot's reads had the link is not
    made up for in a rush). ``rate`` 0 means no cap.
    """

    def __init__(self, rate: int, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._due: Optional[float] = None

    def delay(self, n: int, now: float) -> float:
        """Seconds to wait from ``now`` before sending ``n`` bytes (and book them)."""
        if self.rate <= 0:
            return 0.0
        earliest = now - self.burst / self.rate
        due = earliest if self._due is None else max(self._due, earliest)
        start = max(due, now)
        self._due = due + n / self.rate
        return start - now


class FillState(str, enum.Enum):
    """Where the background fill is: ``bootkit status`` shows the word."""

    waiting = "waiting"
    filling = "filling"
    complete = "complete"
    failed = "failed"
    #: the image does not fit in RAM: reads stay lazy (one warning said so)
    lazy = "lazy"


def fits(sources: Sequence[StreamSource], directory: str, reserve: int) -> Optional[str]:
    """None when every source fits into ``directory`` (free space, and RAM minus ``reserve`` on a RAM
    filesystem: ram mode's rule); else why not, for the one warning."""
    total = sum(s.size for s in sources)
    budget, why = space_budget(directory, reserve)
    if total > budget:
        return f"the image is {human_size(total)} but only {why}"
    return None


class Fill:
    """Fills every chunk of ``sources`` into their stores, one thread, in image order, behind the boot.

    ``rate`` caps the fill (bytes per second, 0: none); ``report`` is called with :meth:`status` whenever the
    state changes and at every progress step (it must not raise into the fill: it is guarded).
    """

    def __init__(
        self,
        sources: Sequence[StreamSource],
        rate: int,
        *,
        report: Optional[Callable[[Dict[str, Any]], None]] = None,
        quiet: float = QUIET,
        attempts: int = FILL_ATTEMPTS,
        gate: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.sources = list(sources)
        #: the fill starts once this says so (the boot: once the root is mounted); None: at once
        self.gate = gate
        self.rate = rate
        self.quiet = quiet
        self.attempts = attempts
        self.total = sum(s.size for s in self.sources)
        self.state = FillState.waiting
        self.error: Optional[str] = None
        self.filled = 0
        #: the pacing decisions, for the record: seconds the cap made the fill wait, and the yields to the boot
        self.paced_seconds = 0.0
        self.yields = 0
        self.refetched = 0
        self.done = threading.Event()
        #: where the chunks go, for the console: RAM, or the local cache (``start_fill``)
        self.where = "RAM"
        self._report = report
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0
        self._step = 0
        chunk = max((s.chunk_size for s in self.sources), default=1)
        self.pacer = Pacer(rate, burst=chunk)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="stream-fill", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def status(self) -> Dict[str, Any]:
        """``state``, ``bytes`` filled of ``total``, ``rate`` cap, and ``error`` when it failed."""
        out: Dict[str, Any] = {"state": self.state.value, "bytes": self.filled, "total": self.total,
                               "rate": self.rate}  # fmt: skip
        if self.error:
            out["error"] = self.error
        return out

    def may_go(self, now: float) -> bool:
        """Whether the fill may start a request at ``now``: no boot read waits for the network, and none
        finished within ``quiet`` seconds (the boot is likely to read again at once)."""
        return all(s.busy == 0 and now - s.last_read >= self.quiet for s in self.sources)

    # -- the thread --

    def _run(self) -> None:
        try:
            if self.gate is not None:
                # the boot's reads up to the root are the ones a machine waits for: on a shared uplink every
                # fill request would slow down the other machines' (docs/fetch.md, "Stream mode")
                while not self.gate():
                    if self._stop.wait(GATE_POLL):
                        return
                log.info("[%8.2f] fill: the root is mounted: filling %s into %s", time.monotonic(),
                         human_size(self.total), self.where)  # fmt: skip
                self._started = time.monotonic()
            self._set(FillState.filling)
            for source in self.sources:
                self._fill_source(source)
                if self._stop.is_set():
                    return
            kept = [s for s in self.sources if s.store is not None and s.store.complete()]
            if len(kept) < len(self.sources):  # a full disk cache: what it could not keep stays lazy
                self.error = "the local cache could not keep every chunk"
                self._set(FillState.lazy)
                log.warning("[%8.2f] fill: WARNING: %s: reads of the rest still need the server", time.monotonic(),
                            self.error)  # fmt: skip
                return
            for source in self.sources:
                source.mark_complete()
            elapsed = time.monotonic() - self._started
            self._set(FillState.complete)
            log.info("[%8.2f] fill complete: %s in %s in %.1f s (%s); reads no longer need the server",
                     time.monotonic(), human_size(self.total), self.where, elapsed,
                     ", ".join(os.path.basename(s.name) for s in self.sources))  # fmt: skip
        except BaseException as e:  # one line; the machine carries on reading lazily
            self.error = str(e) if isinstance(e, BootkitError) else f"{type(e).__name__}: {e}"
            self._set(FillState.failed)
            log.error("[%8.2f] fill: FAILED: %s; reads carry on over the network", time.monotonic(), self.error)
        finally:
            self.done.set()

    def _fill_source(self, source: StreamSource) -> None:
        store = source.store
        assert store is not None, "Fill needs stores attached (start_fill does that)"
        for index in range(source.chunks):
            if self._stop.is_set():
                return
            if not store.has(index):
                self._wait_turn(min(source.chunk_size, source.size - index * source.chunk_size))
                if self._stop.is_set():
                    return
                store.put(index, self._fetch(source, index))
            self.filled += min(source.chunk_size, source.size - index * source.chunk_size)
            self._progress()

    def _wait_turn(self, n: int) -> None:
        """Let the boot's reads go first, then keep to the rate cap."""
        while not self.may_go(time.monotonic()):
            self.yields += 1
            if self._stop.wait(self.quiet):
                return
        delay = self.pacer.delay(n, time.monotonic())
        if delay > 0:
            self.paced_seconds += delay
            self._stop.wait(delay)

    def _fetch(self, source: StreamSource, index: int) -> bytes:
        """A verified chunk: the lazy source checks it against the manifest (and fetches it once more if it
        does not match); a chunk that still fails is fetched again here, ``attempts`` times in all."""
        for attempt in range(1, self.attempts + 1):
            try:
                return source.remote.fetch_chunk(index)
            except BootkitError as e:
                if attempt == self.attempts or self._stop.is_set():
                    raise
                self.refetched += 1
                log.warning("[%8.2f] fill: chunk %d of %s: %s; fetching it again", time.monotonic(), index,
                            os.path.basename(source.name), e)  # fmt: skip
        raise AssertionError("unreachable")

    def _progress(self) -> None:
        step = 100 * self.filled // self.total // PROGRESS_STEP_PERCENT if self.total else 0
        if step <= self._step or self.filled >= self.total:
            return
        self._step = step
        elapsed = max(time.monotonic() - self._started, 1e-3)
        log.info("[%8.2f] fill: %d%% %s of %s at %s/s", time.monotonic(), step * PROGRESS_STEP_PERCENT,
                 human_size(self.filled), human_size(self.total), human_size(self.filled / elapsed))  # fmt: skip
        self._send()

    def _set(self, state: FillState) -> None:
        self.state = state
        self._send()

    def _send(self) -> None:
        if self._report is not None:
            try:
                self._report(self.status())
            except Exception as e:  # a status file must never stop the fill
                log.debug("fill: status report failed: %s", e)


def start_fill(
    sources: Sequence[StreamSource],
    directory: str,
    *,
    rate: int,
    reserve: int,
    report: Optional[Callable[[Dict[str, Any]], None]] = None,
    gate: Optional[Callable[[], bool]] = None,
) -> Fill:
    """Attach a :class:`RamStore` under ``directory`` (made if missing) to each source and start the fill (with a
    local cache attached to every source already, the fill goes into the cache instead); when
    the image does not fit or the copy cannot be made, warn once and leave the sources lazy (the returned fill
    is in state ``lazy`` and never runs)."""
    fill = Fill(sources, rate, report=report, gate=gate)
    if sources and all(s.store is not None for s in sources):
        # a local cache is attached already (bootkit.fetch.diskcache): the fill goes there, not into RAM
        fill.where = "the local cache"
        log.info("[%8.2f] fill: filling %s into the local cache behind the boot (%s)", time.monotonic(),
                 human_size(fill.total), f"at most {human_size(rate)}/s" if rate else "no rate cap")  # fmt: skip
        fill.start()
        return fill
    stores: List[RamStore] = []
    try:
        # root's only, like ram mode's images: the copy holds every file of the root filesystem
        os.makedirs(directory, mode=0o700, exist_ok=True)
        why = fits(sources, directory, reserve)
    except OSError as e:
        why = f"{directory}: {e.strerror}"
    if why is None:
        try:
            for i, source in enumerate(sources):
                # a name of our own making: the URL's last segment is only a hint for people, never a path
                name = f"stream-{i}-" + os.path.basename(source.name.split("?", 1)[0])[:100]
                stores.append(RamStore(os.path.join(directory, name), source.size, source.chunk_size))
        except BootkitError as e:
            for store in stores:
                store.close()
            why = str(e)
    if why is not None:
        fill.error = why
        fill.state = FillState.lazy
        log.warning("[%8.2f] fill: WARNING: %s: stream mode stays lazy (reads keep needing the server)",
                    time.monotonic(), why)  # fmt: skip
        fill.done.set()
        fill._send()
        return fill
    for i, source in enumerate(sources):
        source.attach(stores[i])
    log.info("[%8.2f] fill: filling %s into RAM behind the boot (%s)", time.monotonic(),
             human_size(fill.total), f"at most {human_size(rate)}/s" if rate else "no rate cap")  # fmt: skip
    fill.start()
    return fill
