"""Progress as log lines, readable on a serial console (no carriage-return meters).

``fetch: 45% 123.0 MiB of 273.1 MiB at 18.2 MiB/s, 8 s left (http://...)`` every ``interval`` seconds; the
rate is measured over the last few intervals, so it follows a network that slows down or recovers.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import collections
import time
from typing import Deque, Optional, Tuple

from bootkit.log import human_size, log

#: how many past samples the rate is measured over
_WINDOW = 4


def human_duration(seconds: float) -> str:
    """8 -> '8 s', 125 -> '2 min 5 s', 7384 -> '2 h 3 min'."""
    s = int(seconds + 0.5)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """Logs ``done`` of ``total`` bytes at most once per ``interval`` seconds; ``update`` is cheap to call."""

    def __init__(self, url: str, total: Optional[int], interval: float, label: str = "fetch") -> None:
        self.url = url
        self.total = total
        self.interval = interval
        self.label = label
        self.started = time.monotonic()
        self._next = self.started + interval
        self._samples: Deque[Tuple[float, int]] = collections.deque(maxlen=_WINDOW + 1)
        self._samples.append((self.started, 0))

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        if done < self._samples[-1][1]:  # restarted from zero
            self._samples.clear()
        self._samples.append((now, done))
        log.info("%s", self.line(done, now))

    def line(self, done: int, now: float) -> str:
        t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if self.total:
            text = f"{self.label}: {100 * done // self.total}% {human_size(done)} of {human_size(self.total)}"
        else:
            text = f"{self.label}: {human_size(done)}"
        text += f" at {human_size(rate)}/s"
        if self.total and rate > 0:
            text += f", {human_duration((self.total - done) / rate)} left"
        return f"{text} ({self.url})"

    def elapsed(self) -> float:
        return time.monotonic() - self.started
