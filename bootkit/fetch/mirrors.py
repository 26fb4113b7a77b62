"""Several servers of one image: which mirror answers the next request, and what each one has done so far.

The boot configuration names the image once (``root=qcow2:URL``) and may add mirrors (``rd.qcow2.mirror=``):
the same file -- the same pinned hash or manifest -- on other servers. Every byte is checked against the pin,
so a mirror may be an untrusted cache; what a mirror can cost is time, never a wrong byte.

:class:`MirrorSet` keeps, per mirror, the bytes, requests, errors and chunks that failed verification, a
latency estimate (an exponentially weighted moving average of the seconds per chunk request), and a state:

- ``healthy``: asked. Requests go to the healthy mirror with the fewest requests in flight, the fastest on a
  tie, so read-ahead spreads over the mirrors.
- ``dropped``: it failed, or it is *slow* (its latency is more than ``SLOW_FACTOR`` times the best mirror's,
  after ``MIN_SAMPLES`` requests each). Not asked until its back-off has passed (5 s, doubled after each drop up
  to 2 min); then one request on probation decides.
- ``demoted``: it served bytes that failed verification. Like dropped, with a back-off that starts at 1 min.

When every mirror is in back-off the caller sleeps its own retry delay (``client.Retry``, which bounds the
attempts) and then asks the one whose back-off ends first.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from typing import Callable, Deque, Dict, Iterable, Optional, Sequence

from bootkit.log import log, safe_text

#: a mirror is slow when its latency is more than this many times the best mirror's
SLOW_FACTOR = 4.0
#: ... and more than this many seconds worse: two fast mirrors on loopback differ by noise only
SLOW_MARGIN = 0.05
#: requests a mirror must have answered before its latency is compared
MIN_SAMPLES = 3
#: weight of the newest sample in the moving average
EWMA_WEIGHT = 0.3
DROP_BACKOFF = 5.0
DEMOTE_BACKOFF = 60.0
MAX_BACKOFF = 120.0
#: successful requests in a row after which a mirror's back-off starts small again
FORGIVE_AFTER = 16
#: how much of a server's error text a status line keeps
_ERROR_CHARS = 200


class MirrorState(str, enum.Enum):
    """Whether a mirror is asked: ``healthy``, ``dropped`` (failed or slow), ``demoted`` (served bad bytes)."""

    healthy = "healthy"
    dropped = "dropped"
    demoted = "demoted"

    def __str__(self) -> str:
        return str(self.value)


class Mirror:
    """One server of the image and its counters; changed only under the owning :class:`MirrorSet`'s lock."""

    def __init__(self, url: str, index: int) -> None:
        self.url = url
        self.index = index
        self.state = MirrorState.healthy
        self.bytes = 0
        self.requests = 0
        self.errors = 0
        self.bad_chunks = 0
        #: moving average of the seconds per request; None until the first answer
        self.latency: Optional[float] = None
        self.samples = 0
        self.inflight = 0
        self.retry_at = 0.0
        self.backoff = 0.0
        self.streak = 0
        self.last_error = ""

    def usable(self, now: float) -> bool:
        return self.state is MirrorState.healthy or now >= self.retry_at

    def describe(self) -> Dict[str, object]:
        """What ``bootkit status`` shows for this mirror."""
        info: Dict[str, object] = {
            "state": str(self.state),
            "bytes": self.bytes,
            "requests": self.requests,
            "errors": self.errors,
            "bad_chunks": self.bad_chunks,
        }
        if self.latency is not None:
            info["latency_ms"] = round(self.latency * 1000, 1)
        if self.last_error:
            info["last_error"] = self.last_error
        return info

    def __repr__(self) -> str:
        return f"Mirror({self.url!r}, {self.state})"


class MirrorSet:
    """The servers of one file (the first is the one ``root=`` names); thread-safe.

    ``clock`` is ``time.monotonic``; tests keep it, and assert the decisions (``decisions``), not timings.
    """

    def __init__(self, urls: Sequence[str], clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("a mirror set needs at least one URL")
        self.mirrors = [Mirror(url, i) for i, url in enumerate(urls)]
        self._clock = clock
        self._lock = threading.Lock()
        #: the last state changes, one line each, in order: what a test checks (bounded: a source lives for days)
        self.decisions: Deque[str] = collections.deque(maxlen=64)

    def __len__(self) -> int:
        return len(self.mirrors)

    @property
    def primary(self) -> Mirror:
        return self.mirrors[0]

    def pick(self, avoid: Iterable[Mirror] = (), force: bool = False) -> Optional[Mirror]:
        """The mirror for the next request, counted in flight; None when all are in back-off (unless ``force``:
        then the one whose back-off ends first). ``avoid`` is left out while any other mirror is usable."""
        avoided = set(id(m) for m in avoid)
        with self._lock:
            now = self._clock()
            usable = [m for m in self.mirrors if m.usable(now)]
            preferred = [m for m in usable if id(m) not in avoided] or usable
            if preferred:
                # unmeasured mirrors count as fast: the first request measures them
                chosen = min(preferred, key=lambda m: (m.inflight, m.latency or 0.0, m.index))
            elif force:
                chosen = min(self.mirrors, key=lambda m: (id(m) in avoided, m.retry_at, m.index))
            else:
                return None
            chosen.inflight += 1
            return chosen

    def pick_url(self, tried: Iterable[str]) -> Optional[Mirror]:
        """The first mirror in configured order, not in ``tried`` and usable; not counted in flight."""
        done = set(tried)
        with self._lock:
            now = self._clock()
            for m in self.mirrors:
                if m.url not in done and m.usable(now):
                    return m
        return None

    def next_after(self, current: Mirror, dead: Iterable[str]) -> Optional[Mirror]:
        """Ram mode, after ``current`` failed: the next mirror in configured order (``current`` itself last)
        that is not ``dead``, a usable one first; None when all are dead."""
        excluded = set(dead)
        n = len(self.mirrors)
        order = [self.mirrors[(current.index + k) % n] for k in range(1, n + 1)]
        candidates = [m for m in order if m.url not in excluded]
        with self._lock:
            now = self._clock()
            usable = [m for m in candidates if m.usable(now)]
        chosen = usable or candidates
        return chosen[0] if chosen else None

    def succeeded(self, mirror: Mirror, nbytes: int, seconds: Optional[float] = None) -> None:
        """A request to ``mirror`` delivered ``nbytes`` (verified) in ``seconds`` (None: not a timed request)."""
        with self._lock:
            mirror.inflight = max(mirror.inflight - 1, 0)
            mirror.bytes += nbytes
            mirror.requests += 1
            mirror.streak += 1
            if mirror.streak >= FORGIVE_AFTER:
                mirror.backoff = 0.0
            if mirror.state is not MirrorState.healthy:
                # back from its back-off: measured afresh, so an old slow average does not drop it again at once
                self._change(mirror, MirrorState.healthy, "answered again")
                mirror.latency, mirror.samples = None, 0
            if seconds is None:
                return
            mirror.latency = (
                seconds if mirror.latency is None else (EWMA_WEIGHT * seconds + (1 - EWMA_WEIGHT) * mirror.latency)
            )
            mirror.samples += 1
            self._drop_if_slow(mirror)

    def failed(self, mirror: Mirror, error: object) -> None:
        """A request to ``mirror`` failed (connection, timeout, HTTP error): drop it for its back-off."""
        with self._lock:
            mirror.inflight = max(mirror.inflight - 1, 0)
            mirror.errors += 1
            mirror.last_error = safe_text(str(error))[:_ERROR_CHARS]
            self._back_off(mirror, MirrorState.dropped, DROP_BACKOFF, f"failed: {mirror.last_error}")

    def corrupt(self, mirror: Mirror, what: str) -> None:
        """``mirror`` sent bytes that failed verification (``what``): demote it."""
        with self._lock:
            mirror.inflight = max(mirror.inflight - 1, 0)
            mirror.bad_chunks += 1
            mirror.last_error = safe_text(what)[:_ERROR_CHARS]
            self._back_off(mirror, MirrorState.demoted, DEMOTE_BACKOFF, f"served bad data: {mirror.last_error}")

    def add_bytes(self, mirror: Mirror, nbytes: int) -> None:
        """``mirror`` delivered ``nbytes`` of a longer, still running stream (the background fill)."""
        with self._lock:
            mirror.bytes += nbytes

    def released(self, mirror: Mirror) -> None:
        """A picked mirror was not asked after all."""
        with self._lock:
            mirror.inflight = max(mirror.inflight - 1, 0)

    def summary(self) -> str:
        """Each mirror's last error, for the one line that says all of them failed."""
        with self._lock:
            # errors name their URL already
            return "; ".join(m.last_error if m.last_error.startswith(m.url) else f"{m.url}: {m.last_error or m.state}"
                             for m in self.mirrors)  # fmt: skip

    def describe(self) -> Dict[str, Dict[str, object]]:
        """Per-mirror state and counters, by URL: the ``mirrors`` entry of ``bootkit status``."""
        with self._lock:
            return {m.url: m.describe() for m in self.mirrors}

    # -- under the lock --

    def _drop_if_slow(self, mirror: Mirror) -> None:
        measured = [m for m in self.mirrors if m.state is MirrorState.healthy and m.samples >= MIN_SAMPLES]
        if mirror.samples < MIN_SAMPLES or len(measured) < 2 or mirror.latency is None:
            return
        best = min(m.latency or 0.0 for m in measured)
        if mirror.latency > SLOW_FACTOR * best and mirror.latency - best > SLOW_MARGIN:
            self._back_off(
                mirror,
                MirrorState.dropped,
                DROP_BACKOFF,
                f"slow: {mirror.latency * 1000:.0f} ms per request, the best mirror takes {best * 1000:.0f} ms",
            )

    def _back_off(self, mirror: Mirror, state: MirrorState, first: float, why: str) -> None:
        mirror.streak = 0
        mirror.backoff = min(max(mirror.backoff * 2, first), MAX_BACKOFF)
        mirror.retry_at = self._clock() + mirror.backoff
        self._change(mirror, state, f"{why} (asked again in {mirror.backoff:.0f} s)")

    def _change(self, mirror: Mirror, state: MirrorState, why: str) -> None:
        mirror.state = state
        line = f"{state} {mirror.url}: {why}"
        self.decisions.append(line)
        if len(self.mirrors) > 1:
            log.warning("fetch: mirror %s", line)
