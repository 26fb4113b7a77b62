"""Buffered reads from one NBD client: the handshake and the transmission phase share one buffer.

With many requests queued (fio at depth 16, the kernel) one ``recv`` brings in several 28-byte request
headers instead of one syscall each; bytes a client sends right after its last option wait in the same
buffer for the transmission phase.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import socket
import time
from typing import Optional

from bootkit.nbd.protocol import PeerClosed

#: most bytes asked of one recv (at least what the caller needs)
_RECV_CHUNK = 64 * 1024


class Receiver:
    """Reads whole messages from ``sock``; only one thread at a time (the leader) uses it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rbuf = bytearray()
        self._rpos = 0
        #: the socket was read since the leader last cleared this (see Connection.worker)
        self.looked = False

    def recv_exact(self, n: int, wait: Optional[bool] = True) -> Optional[bytes]:
        """Exactly ``n`` bytes from the peer (raises PeerClosed at EOF).

        Unless ``wait``, None when fewer than ``n`` bytes have arrived (what did arrive stays buffered);
        with ``wait`` None, the socket is not even looked at.
        """
        buf = self._rbuf
        while len(buf) - self._rpos < n:
            if wait is None:
                return None
            if self._rpos:
                del buf[: self._rpos]
                self._rpos = 0
            self.looked = True
            try:
                chunk = self.sock.recv(max(n - len(buf), _RECV_CHUNK), 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not chunk:
                raise PeerClosed()
            buf += chunk
            if not wait and len(buf) < n:
                return None
        out = bytes(buf[self._rpos : self._rpos + n])
        self._rpos += n
        if self._rpos == len(buf):
            buf.clear()
            self._rpos = 0
        return out

    def recv_all(self, n: int) -> bytes:
        data = self.recv_exact(n)
        assert data is not None
        return data

    def recv_by(self, n: int, deadline: Optional[float]) -> bytes:
        """Exactly ``n`` bytes that must all have arrived by ``deadline`` (``time.monotonic()``; None: no
        limit); ``socket.timeout`` after it. Each recv waits only for the time left, so a client trickling
        one byte at a time cannot stretch the deadline."""
        if deadline is None:
            return self.recv_all(n)
        buf = self._rbuf
        while len(buf) - self._rpos < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(max(n - (len(buf) - self._rpos), _RECV_CHUNK))
            if not chunk:
                raise PeerClosed()
            buf += chunk
        return self.recv_all(n)

    def discard(self, n: int) -> None:
        while n > 0:
            n -= len(self.recv_all(min(n, 1024 * 1024)))

    def buffered(self) -> bool:
        """Bytes of a further request have arrived already."""
        return self._rpos != len(self._rbuf)
