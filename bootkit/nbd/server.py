"""A read-only NBD server for one image: what it serves, its limits, and one connection from start to end.

References: NetworkBlockDevice/nbd doc/proto.md (NBDP); the kernel client (drivers/block/nbd.c) speaks only
the transmission phase with simple replies, so ``serve_connection(sock, handshake=False)`` serves a socket
handed to the kernel.

A connection goes through ``handshake`` (negotiation, under one deadline), then ``scheduler`` (the threads
that read and work on its requests) and ``replies`` (the answers and how they are sent). Threads, not
asyncio: the decoders release the GIL, and the design keeps thread hand-offs below one per request.
Measured (bench/nbd.py), random 4 KiB reads, zstd: 1.2-1.3x qemu-nbd's rate at depth 16 (63-69 us of
server CPU per read, qemu-nbd 65-70), 1.35-1.6x at depth 1.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Iterator, List, Optional, Protocol

from bootkit.errors import NBDError
from bootkit.log import log
from bootkit.nbd import protocol as p
from bootkit.nbd.budget import Budget
from bootkit.nbd.handshake import Session, negotiate
from bootkit.nbd.receiver import Receiver
from bootkit.nbd.scheduler import Connection

if TYPE_CHECKING:
    from bootkit.qcow2.image import Extent, Run

#: how long an idle connection looks for its next request before sleeping (NBDServer poll_us)
DEFAULT_POLL_US = 50
MAX_POLL_US = 10000
#: the largest reply built in a buffer: a read of the largest payload, with its structured reply header
_LARGEST_REPLY = p.MAX_PAYLOAD + 64


class Image(Protocol):
    """What the server needs from an open image (``bootkit.qcow2.Image`` has it)."""

    @property
    def virtual_size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview, plan: Optional[List[Run]] = None) -> int: ...

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]: ...

    def plan(self, offset: int, length: int) -> List[Run]: ...

    def clusters_to_decode(self, plan: List[Run]) -> int: ...


class NBDServer:
    """Serves one open image, read-only, to any number of connections.

    ``threads`` is the number of threads serving one connection; ``poll_us`` how long an otherwise idle
    connection keeps looking for the next request before its thread sleeps (0: never); a client that has
    not finished negotiating after ``handshake_timeout`` seconds is dropped (it would hold a thread).
    Replies larger than 1 MiB take buffers from ``buffer_limit`` bytes, a quarter of it at most per
    connection; when a read has waited ``buffer_wait`` seconds for one, the connections that have held
    theirs that long are dropped (None: never; see ``budget``).
    """

    def __init__(
        self,
        image: Image,
        *,
        name: str = "",
        description: str = "",
        threads: int = 4,
        poll_us: int = DEFAULT_POLL_US,
        buffer_limit: int = 4 * p.MAX_PAYLOAD,
        buffer_wait: Optional[float] = 30.0,
        handshake_timeout: Optional[float] = 60.0,
    ) -> None:
        if threads < 1:
            raise NBDError(f"threads: must be at least 1, not {threads}")
        if not 0 <= poll_us <= MAX_POLL_US:
            raise NBDError(f"poll_us: must be 0 to {MAX_POLL_US}, not {poll_us}")
        self.image = image
        self.name = name
        self.description = description
        self.size: int = image.virtual_size
        self.threads = threads
        self.poll = poll_us / 1e6
        self.handshake_timeout = handshake_timeout
        # room for one maximum-size read (and its reply header) per connection, and four in all by default
        limit = max(buffer_limit, _LARGEST_REPLY)
        self.budget = Budget(limit, max(limit // 4, _LARGEST_REPLY), buffer_wait)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    def serve_connection(self, sock: socket.socket, *, handshake: bool = True) -> None:
        """Serve one connected socket until the client disconnects; never raises for a peer's fault."""
        with self._lock:
            self._connections.add(sock)
        rx = Receiver(sock)
        try:
            if handshake:
                session = negotiate(self, sock, rx, self.handshake_timeout)
                if session is None:
                    return
            else:
                session = Session()
            Connection(self, sock, rx, session).run()
        except p.PeerClosed:
            log.debug("nbd: client closed the connection")
        except p.ProtocolError as e:
            log.warning("nbd: dropping connection: %s", e)
        except OSError as e:
            log.debug("nbd: connection error: %s", e)
        finally:
            with self._lock:
                self._connections.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def shutdown_connections(self) -> None:
        """Make every connection's threads return (used when the server stops)."""
        with self._lock:
            socks = list(self._connections)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def matches(self, name: str) -> bool:
        """The default export ("") and the configured name both select the image."""
        return name in ("", self.name)
