"""The memory of large reply buffers, bounded over all connections and shared out between them.

A read reply up to about 1 MiB is built in a buffer its thread keeps; a larger one (up to NBDP's 32 MiB
payload) gets a buffer of its own for as long as it is being read and sent, and those count here. A client
that sends large reads and never reads the replies keeps its buffers: without shares, two such clients held
the whole bound and every other client's large read waited until they left (issue 12 §3).

So each connection holds at most ``share`` bytes (a quarter of the bound: one maximum-size read) and what it
asks beyond waits for its own earlier replies: a client that does not read stalls itself. Should more such
clients than shares fill the bound anyway, a read that has waited ``patience`` seconds has every
connection dropped that has held a buffer at least that long: a client that reads its replies holds one for
milliseconds.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Protocol


class Holder(Protocol):
    """What holds buffers: one connection's reply writer."""

    def evict(self, reason: str) -> None:
        """Drop the connection (its threads then release what they hold)."""


class Budget:
    """Bounds the bytes of large reply buffers in flight over all connections, and shares them out."""

    def __init__(self, limit: int, share: int, patience: Optional[float]) -> None:
        self.limit = limit
        self.share = share
        self.patience = patience
        self._free = limit
        self._held: Dict[Holder, int] = {}
        #: when each buffer a holder has now was taken (time.monotonic())
        self._taken: Dict[Holder, List[float]] = {}
        self._cond = threading.Condition()

    def acquire(self, n: int, holder: Holder) -> float:
        """Take ``n`` bytes for ``holder`` (at most ``share``), waiting as long as it takes; returns the token
        to give back to ``release``."""
        assert n <= self.share
        deadline: Optional[float] = None
        with self._cond:
            while True:
                held = self._held.get(holder, 0)
                if held + n > self.share:
                    self._cond.wait()  # this connection's own earlier replies first
                    continue
                if self._free >= n:
                    break
                if self.patience is None:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.patience
                elif now >= deadline:
                    self._evict(now - self.patience, holder)
                    deadline = now + self.patience
                self._cond.wait(deadline - now)
            self._free -= n
            self._held[holder] = held + n
            token = time.monotonic()
            self._taken.setdefault(holder, []).append(token)
            return token

    def release(self, n: int, holder: Holder, token: float) -> None:
        with self._cond:
            self._free += n
            left = self._held[holder] - n
            taken = self._taken[holder]
            taken.remove(token)
            if left:
                self._held[holder] = left
            else:
                del self._held[holder], self._taken[holder]
            self._cond.notify_all()

    def _evict(self, before: float, waiter: Holder) -> None:
        """Drop the connections that have held a buffer since ``before`` or longer (not ``waiter``)."""
        for holder, taken in list(self._taken.items()):
            if holder is not waiter and min(taken) <= before:
                holder.evict(
                    f"it has not read a reply for {self.patience:g} s while other connections wait for "
                    f"reply buffer memory ({self.limit} bytes in all)"
                )
