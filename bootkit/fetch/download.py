"""Ram mode: download a whole image into a file (under a tmpfs at boot), verified before it gets its name.

The bytes stream to ``DEST.part`` and are hashed as they arrive; only a verified file is renamed to ``DEST``.
Before the first byte, the announced size is compared with what fits: the free space of DEST's filesystem
and, when that filesystem lives in RAM (tmpfs, ramfs), ``MemAvailable`` minus a reserve (dracut's
``rd.minmem``). Connection drops, timeouts and 5xx are retried with backoff and resumed with ``Range`` +
``If-Range``, so a file that changed on the server restarts from zero instead of being spliced; a server that
sends neither ETag nor Last-Modified gives nothing to put in ``If-Range``, so its downloads restart from zero.

With mirrors (the same file on other servers, only with a pinned hash), a failed attempt moves on to the next
mirror, and so does a file that hashes wrong (each mirror is blamed at most once). ``If-Range`` cannot carry
over (each server has its own ETags), so the bytes already received are kept only when a manifest can check
them, chunk by chunk, up to the last good chunk; without one the next mirror starts from zero. The attempts
stay bounded by the same retry limit, and the pinned hash checks the whole file.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from bootkit.errors import BootkitError, UsageError
from bootkit.fetch import client
from bootkit.fetch.checksums import sidecar_checksum as sidecar_checksum  # re-exported: boot.main uses it
from bootkit.fetch.errors import (
    ChecksumMismatch,
    NotEnoughSpace,
    RemoteChanged,
    SizeMismatch,
    TransientError,
)
from bootkit.fetch.manifest import Manifest
from bootkit.fetch.mirrors import Mirror, MirrorSet
from bootkit.fetch.options import FetchOptions
from bootkit.fetch.progress import Progress, human_duration
from bootkit.fetch.ranges import content_range, if_range_validator
from bootkit.fetch.room import check_fits, local_error
from bootkit.log import human_size, log
from bootkit.record import field, record

#: bytes read from the network per block; each block is hashed and written while the next one is read
BLOCK_SIZE = 1 << 20
#: bytes asked of the socket at a time while a block fills
READ_SLICE = 256 << 10
#: blocks in flight between the network reader and the hash-and-write thread
PIPELINE_DEPTH = 4
#: restarts from zero (file changed on the server) before giving up
MAX_RESTARTS = 3


@record
class DownloadResult:
    """A verified file: where it is, how big, its SHA-256 and the URL it came from (the mirror that finished)."""

    path: str
    size: int
    sha256: str
    url: str
    #: per-mirror state and counters (``MirrorSet.describe``), when mirrors were given
    mirrors: Dict[str, Dict[str, object]] = field(default_factory=dict)


# -- the hash-and-write stage ------------------------------------------------------------------------------


class _Sink:
    """Writes each block as it arrives and hashes it in a worker thread while the next block is read.

    The reading thread writes the block itself, while it is still in that core's cache; the worker only
    hashes. hashlib, os.write and socket reads release the GIL, so receiving and hashing overlap on two cores.
    (Measured alternatives: the worker writing too, hashing inline, and a memory-mapped .part file that the
    socket reads land in -- each cost more CPU or time; the mmap because fallocate or page faults zero every
    page that write() simply fills.)
    """

    def __init__(self, fd: int, url: str, path: str) -> None:
        self.fd = fd
        self.url = url
        self.path = path
        self.hasher = hashlib.sha256()
        self.written = 0
        self._free: List[bytearray] = [bytearray(BLOCK_SIZE) for _ in range(PIPELINE_DEPTH)]
        self._queue: List[Tuple[bytearray, int]] = []
        self._cond = threading.Condition()
        self._error: Optional[BaseException] = None
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._work, name="fetch-sink", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        with self._cond:
            while not self._free and self._error is None:
                self._cond.wait()
            self._raise()
            return self._free.pop()

    def give_back(self, buf: bytearray) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify_all()

    def submit(self, buf: bytearray, n: int) -> None:
        """The first ``n`` bytes of ``buf`` arrived: write them now, hash them in the worker."""
        view = memoryview(buf)[:n]
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            self.give_back(buf)
            raise local_error(e, self.url, f"cannot write {self.path}") from e
        finally:
            view.release()
        with self._cond:
            self._raise()
            self._queue.append((buf, n))
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every submitted block is hashed (``written`` then counts every byte in the file)."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()
            self._raise()

    def restart(self) -> None:
        """Forget everything written: the file starts again from zero."""
        self.rewind(0, hashlib.sha256())

    def rewind(self, size: int, hasher: Any) -> None:
        """Keep only the first ``size`` bytes, whose hash so far is ``hasher``."""
        self.flush()
        os.ftruncate(self.fd, size)
        os.lseek(self.fd, size, os.SEEK_SET)
        self.hasher = hasher
        self.written = size

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                buf, n = self._queue.pop(0)
                self._busy = True
            try:
                with memoryview(buf)[:n] as view:
                    self.hasher.update(view)
                self.written += n
            except BaseException as e:  # handed to the reading thread
                with self._cond:
                    self._error = e
            with self._cond:
                self._busy = False
                self._free.append(buf)
                self._cond.notify_all()


# -- the download ------------------------------------------------------------------------------------------


class _Download:
    """The state of one download: the .part file, what has been written, what the server announced."""

    def __init__(
        self, url: str, dest: str, options: FetchOptions, mirrors: MirrorSet, manifest: Optional[Manifest] = None
    ) -> None:
        self.url = url
        self.mirrors = mirrors
        self.mirror = mirrors.primary
        #: mirrors that answered with an error no retry mends (404, another file)
        self.dead: Set[str] = set()
        #: mirrors that failed since the last counted attempt: a round of all of them counts as one
        self.round: Set[str] = set()
        self.manifest = manifest
        #: the bytes in the file were checked against the manifest when the download moved to another mirror
        self.prefix_checked = False
        self.dest = dest
        self.part = dest + ".part"
        self.options = options
        self.size: Optional[int] = None
        self.validator: Optional[str] = None
        self.budget: Optional[int] = None
        self.restarts = 0
        self.progress = Progress(url, None, options.progress_interval)
        #: the file's size when the current mirror took over (its byte counter starts there)
        self.mirror_start = 0

    def run(self, expected: Optional[str], expected_from: str) -> DownloadResult:
        try:
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise local_error(e, self.url, f"cannot create {self.part}") from e
        sink = _Sink(fd, self.url, self.part)
        try:
            self._transfer(sink)
            sink.flush()
            while expected is not None and sink.hasher.hexdigest() != expected and self._after_mismatch(sink):
                self._transfer(sink)
                sink.flush()
        finally:
            sink.close()
        try:
            os.fsync(fd)
        except OSError as e:
            raise local_error(e, self.url, f"cannot write {self.part}") from e
        finally:
            os.close(fd)
        digest = sink.hasher.hexdigest()
        if expected is not None and digest != expected:
            raise ChecksumMismatch(
                f"{self.url}: SHA-256 mismatch: got {digest}, expected {expected} ({expected_from});"
                " the download was deleted"
            )
        try:
            os.replace(self.part, self.dest)
        except OSError as e:
            raise local_error(e, self.url, f"cannot rename {self.part} to {self.dest}") from e
        elapsed = self.progress.elapsed()
        log.info(
            "fetch: %s in %s (%s/s), SHA-256 %s: %s (%s)",
            human_size(sink.written),
            human_duration(elapsed),
            human_size(sink.written / elapsed if elapsed > 0 else 0),
            "verified" if expected else "not verified",
            self.dest,
            self.url,
        )
        self.mirrors.add_bytes(self.mirror, sink.written - self.mirror_start)
        mirrors = self.mirrors.describe() if len(self.mirrors) > 1 else {}
        return DownloadResult(self.dest, sink.written, digest, self.url, mirrors)

    def _transfer(self, sink: _Sink) -> None:
        retry = client.Retry(self.url, self.options)
        while True:
            before = sink.written
            try:
                if self._attempt(sink, retry):
                    return
            except Exception as e:  # classify decides what is retried
                retry.check_deadline()
                error = client.classify(e, self.url, self.options.timeout)
                if len(self.mirrors) > 1:
                    counted = self._next_mirror(sink, error)
                    if counted is None:
                        continue
                    error = counted
                if not isinstance(error, TransientError):
                    raise error from e
                sink.flush()  # count what reached the file before deciding on progress
                retry.failed(error, progressed=sink.written > before)

    def _after_mismatch(self, sink: _Sink) -> bool:
        """The whole file hashed wrong: with another mirror left, blame the current one (the bytes before it took
        over were checked against the manifest, or there were none) and start again from zero on the next."""
        if len(self.mirrors) == 1:
            return False
        self.dead.add(self.mirror.url)
        following = self.mirrors.next_after(self.mirror, self.dead)
        if following is None:
            return False
        self.mirrors.add_bytes(self.mirror, sink.written - self.mirror_start)
        what = f"{self.url}: the file does not match the pinned SHA-256"
        self.mirrors.corrupt(self.mirror, what)
        self._restart(sink, f"{what}; asking mirror {following.url}", changed=False)
        self.mirror, self.url = following, following.url
        return True

    def _next_mirror(self, sink: _Sink, error: BootkitError) -> Optional[BootkitError]:
        """After a failed attempt: move to the next mirror. None: it has not failed in this round, ask it at once;
        else the error that counts as one failed attempt (a round of all mirrors: transient while a mirror is left
        that no permanent error ruled out, else the last error), naming every mirror's last error."""
        sink.flush()
        self.mirrors.add_bytes(self.mirror, max(sink.written - self.mirror_start, 0))
        self.mirrors.failed(self.mirror, error)
        self.round.add(self.mirror.url)
        if not isinstance(error, TransientError):
            self.dead.add(self.mirror.url)
        servers = f"{len(self.mirrors)} servers of {self.mirrors.primary.url}"
        following = self.mirrors.next_after(self.mirror, self.dead)
        if following is None:
            return type(error)(f"all {servers} failed: {self.mirrors.summary()}")
        if following is not self.mirror:
            self._switch(sink, following)
        if following.url not in self.round:
            return None
        self.round = set()
        # the line that ends the download, if this was the last attempt, names every mirror's last error
        return TransientError(f"{servers}: {self.mirrors.summary()}")

    def _switch(self, sink: _Sink, mirror: Mirror) -> None:
        """Continue on ``mirror``: from the last chunk the manifest vouches for, else from zero."""
        log.warning("fetch: moving from %s to mirror %s", self.url, mirror.url)
        if sink.written and self.manifest is not None:
            kept = self._check_prefix(sink, self.manifest)
            log.info("fetch: %s received earlier match the manifest; the rest comes from %s", human_size(kept),
                     mirror.url)  # fmt: skip
            self.validator = None
            self.prefix_checked = True
        elif sink.written:
            self._restart(sink, "another mirror's copy cannot be spliced to these bytes without a manifest", False)
        self.mirror = mirror
        self.url = mirror.url
        self.mirror_start = sink.written

    def _check_prefix(self, sink: _Sink, manifest: Manifest) -> int:
        """Cut the file back to its longest prefix of whole chunks that match ``manifest``; returns its size."""
        sink.flush()
        hasher = hashlib.sha256()
        kept = 0
        with open(self.part, "rb") as f:
            for index in range(manifest.chunk_count):
                offset, length = manifest.chunk_span(index)
                if offset + length > sink.written:
                    break
                data = f.read(length)
                if not manifest.check(index, data):
                    log.warning("fetch: chunk %d received earlier does not match the manifest", index)
                    break
                hasher.update(data)
                kept = offset + length
        sink.rewind(kept, hasher)
        return kept

    def _attempt(self, sink: _Sink, retry: client.Retry) -> bool:
        """One request; True when the whole file is in. False: ask again at once (restart from zero)."""
        sink.flush()
        if sink.written and not self.validator and not self.prefix_checked:
            # without If-Range, a file replaced by one of the same size would be spliced: half of each version
            self._restart(sink, "the server sends neither ETag nor Last-Modified, so it cannot resume safely", False)
        offset = sink.written
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator:
                headers["If-Range"] = self.validator
        opened = client.open_url(self.url, self.options, headers)
        watchdog = threading.Timer(max(retry.deadline - time.monotonic(), 0.0), _cut, (opened.conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            response = opened.response
            if offset and response.status == 206:
                changed = self._changed(response, offset)
                if changed:
                    self._restart(sink, changed)
                    return False
                if self.validator is None:  # resumed on another mirror: its own validator from now on
                    self.validator = if_range_validator(response)
                log.info("fetch: resuming at %s of %s (%s)", human_size(offset), human_size(self.size or 0), self.url)
            elif offset and response.status == 416:
                return self._restart_after_416(response, sink)
            else:
                client.check_status(response, opened.url)
                if offset:
                    if self.validator is not None and if_range_validator(response) == self.validator:
                        self._restart(sink, "the server ignores Range requests", changed=False)
                    else:
                        self._restart(sink, "the file changed on the server")
                self._start(response)
            self._stream(response, sink, retry)
        finally:
            watchdog.cancel()
            opened.conn.close()
        sink.flush()
        if self.size is not None and sink.written != self.size:
            raise TransientError(
                f"{self.url}: connection closed after {sink.written} of {self.size} bytes"
            )
        return True

    def _start(self, response: Any) -> None:
        """A 200 answer: learn size and validator, check that the file fits."""
        length = response.getheader("Content-Length")
        self.size = int(length) if length and length.isdigit() else None
        self.validator = if_range_validator(response)
        self.progress.total = self.size
        if self.size is not None:
            self.budget = check_fits(self.url, self.size, self.dest, self.options.reserve_bytes)
            log.info("fetch: downloading %s (%s) to %s", self.url, human_size(self.size), self.dest)
        else:
            self.budget = check_fits(self.url, 0, self.dest, self.options.reserve_bytes)
            log.info("fetch: downloading %s (size not announced) to %s", self.url, self.dest)

    def _changed(self, response: Any, offset: int) -> Optional[str]:
        """Why a 206 answer belongs to another version of the file (a server that ignores If-Range), or None.

        Two versions are never spliced: the caller restarts from zero.
        """
        first, total = content_range(response)
        if first != offset:
            raise TransientError(f"{self.url}: asked for bytes from {offset}, got Content-Range from {first}")
        if self.size is not None and total is not None and total != self.size:
            return f"the size changed from {self.size} to {total} bytes"
        new_validator = if_range_validator(response)
        if self.validator and new_validator and new_validator != self.validator:
            return f"the validator changed from {self.validator} to {new_validator}"
        return None

    def _restart_after_416(self, response: Any, sink: _Sink) -> bool:
        _, total = content_range(response)
        same = self.validator is not None and if_range_validator(response) == self.validator
        if same and total is not None and self.size is not None and total < self.size:
            raise SizeMismatch(
                f"{self.url}: server announced {self.size} bytes but the file has {total}"
                " (Content-Length does not match the file)"
            )
        self._restart(sink, "the server has fewer bytes than before (the file changed)")
        return False

    def _restart(self, sink: _Sink, why: str, changed: bool = True) -> None:
        if changed:
            self.restarts += 1
            if self.restarts > MAX_RESTARTS:
                raise RemoteChanged(f"{self.url}: changed on the server {self.restarts} times during the download")
        log.warning("fetch: restarting from zero: %s (%s)", why, self.url)
        sink.restart()
        self.mirror_start = 0
        self.prefix_checked = False
        self.size = None
        self.validator = None

    def _stream(self, response: Any, sink: _Sink, retry: client.Retry) -> None:
        """Copy the body into the sink; bytes that arrived before a failure are kept (the resume starts there)."""
        done = sink.written
        budget = self.budget if self.budget is not None else 1 << 62
        limit = min(budget, self.size if self.size is not None else budget)
        eof = False
        while not eof:
            buf = sink.buffer()
            view = memoryview(buf)
            n = 0
            try:
                while n < BLOCK_SIZE:
                    # slices, so that progress, the deadline and a failure are seen at a fine grain
                    got = response.readinto(view[n : n + READ_SLICE])
                    if not got:
                        eof = True
                        break
                    n += got
                    if done + n > limit:
                        n = 0
                        raise self._too_much(budget)
                    self.progress.update(done + n)
                    retry.check_deadline()
            finally:
                view.release()
                if n:
                    sink.submit(buf, n)
                else:
                    sink.give_back(buf)
            done += n

    def _too_much(self, budget: int) -> BootkitError:
        if self.size is not None and budget >= self.size:
            return SizeMismatch(f"{self.url}: server sent more than the announced {self.size} bytes")
        return NotEnoughSpace(
            f"{self.url}: more than {human_size(budget)} arrived, which is all that fits under"
            f" {os.path.dirname(os.path.abspath(self.dest))}"
        )


def _cut(conn: Any) -> None:
    """Watchdog: end a transfer that outlives the total time limit (a trickle never trips the read timeout)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def download(
    url: str,
    dest: str,
    options: FetchOptions,
    *,
    mirrors: Sequence[str] = (),
    manifest: Optional[Manifest] = None,
) -> DownloadResult:
    """Download ``url`` to ``dest``, verified as ``options`` says; raises a FetchError subclass on failure.

    The bytes go to ``dest + ".part"``, which is renamed to ``dest`` only once verified; on failure it is
    removed. Progress lines go to the ``bootkit`` logger every ``options.progress_interval`` seconds.
    ``mirrors``: the same file on other servers (only with a pinned hash); ``manifest``: lets a download that
    moves to another mirror keep the bytes it has (checked chunk by chunk) instead of starting from zero.
    """
    client.parse_url(url)
    for mirror in mirrors:
        client.parse_url(mirror)
    if mirrors and options.verify != "pinned":
        raise UsageError(f"{url}: mirrors need a pinned hash (verify=pinned): a mirror could serve any file")
    if manifest is not None and options.sha256 is not None and manifest.sha256 != options.sha256:
        raise UsageError(f"{url}: the manifest describes sha256 {manifest.sha256}, not the pinned {options.sha256}")
    expected: Optional[str] = None
    expected_from = "not verified"
    if options.verify == "pinned":
        expected, expected_from = options.sha256, "pinned"
    elif options.verify == "sidecar":
        expected, sidecar = sidecar_checksum(url, options)
        expected_from = f"from {sidecar}"
        log.info("fetch: expecting SHA-256 %s %s", expected, expected_from)
    else:
        log.warning("fetch: %s will not be verified (verify=none)", url)
    job = _Download(url, dest, options, MirrorSet([url, *mirrors]), manifest)
    try:
        return job.run(expected, expected_from)
    except BaseException:
        try:
            os.unlink(job.part)
        except FileNotFoundError:
            pass
        raise
