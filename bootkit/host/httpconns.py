"""Connections of ``bootkit serve-http``: bounded in number, in threads and in time.

``http.server.ThreadingHTTPServer`` gives every connection a thread with no timeout: 300 clients that send
half a request each (slowloris) hold 300 threads forever. Here a connection first waits at the ``Gate``
-- one thread with a selector for all of them -- until its whole request head has arrived; only then is
it handed to one of a fixed number of workers, which answer it from the head in memory and give the
connection back to the gate for the next request (keep-alive). So a slow client costs a socket and a
buffer, not a thread, and:

- a request head must arrive within ``timeout`` seconds (else 408), an idle keep-alive connection is
  closed after ``timeout`` seconds, and every socket operation of an answer is bounded by ``timeout``;
- at most ``max_connections`` connections are held (waiting, queued or being answered); when full, the
  connection that has waited longest for its request head is dropped (503), so a new client always gets
  in; when every held connection is being answered or queued, the new one gets 503;
- a request head larger than ``MAX_HEAD`` bytes gets 431;
- new connections wait in the kernel's listen backlog, not in a list of ours, while ``ADMITTING`` accepted
  ones have not reached the gate yet: a flood of connections costs at most ``max_connections`` +
  ``ADMITTING`` sockets, however slowly the gate runs.

TLS connections do their handshake and reading in the worker (the gate cannot see inside TLS), bounded by
the timeout and the worker count.

Host side (not in the initramfs), standard library only.
"""

from __future__ import annotations

import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bootkit.log import log

#: largest request head (request line and headers) accepted
MAX_HEAD = 32 * 1024
#: the end of a request head: an empty line (http.server accepts bare LF line ends too)
_HEAD_END = re.compile(rb"\r?\n\r?\n")

#: answers the gate itself sends before it closes a connection (best effort, never blocking)
_REFUSALS = {
    408: b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    503: b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n",
}

#: answers one request: (socket, client address, the request head or None for TLS) -> keep the connection?
Answer = Callable[[socket.socket, Any, "bytes | None"], bool]


@dataclass
class _Waiting:
    address: Any
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)


#: accepted connections the gate has not taken yet, at most (see the module docstring)
ADMITTING = 8


class Connections:
    """The gate and the workers of one server: ``accept`` every new socket, ``close`` at the end."""

    def __init__(
        self,
        answer: Answer,
        *,
        workers: int,
        max_connections: int,
        timeout: float,
        tls: bool = False,
        with_body: bool = False,
    ) -> None:
        """``with_body``: the answer gets the bytes the gate read past the head too (the start of a request
        body), and the connection is closed after it (one request per connection)."""
        self._answer = answer
        self._with_body = with_body
        self.timeout = timeout
        self.max_connections = max_connections
        self._tls = tls
        self._lock = threading.Lock()
        self._taken = threading.Condition(self._lock)  # the gate took the incoming connections
        self._busy = 0  # queued for or held by a worker
        #: connections taken since the start (keep-alive returns not counted)
        self.accepted = 0
        self._incoming: list[tuple[socket.socket, Any, bytes]] = []
        self._waiting: dict[socket.socket, _Waiting] = {}  # insertion order: oldest deadline first
        self._closed = False
        self._jobs: queue.Queue[tuple[socket.socket, Any, bytes | None, bytes] | None] = queue.Queue()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._threads = [threading.Thread(target=self._gate, name="serve-http-gate", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"serve-http-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- any thread --

    def accept(self, sock: socket.socket, address: Any) -> None:
        """Take a new connection; the accepting thread waits while ADMITTING others wait for the gate."""
        with self._lock:
            self.accepted += 1
            while len(self._incoming) >= ADMITTING and not self._closed:
                self._taken.wait(self.timeout)
        self.admit(sock, address)

    def admit(self, sock: socket.socket, address: Any, buffered: bytes = b"") -> None:
        """Take a connection: it waits at the gate for its next request head (TLS: straight to a worker)."""
        if self._tls:
            with self._lock:
                full = self._busy >= self.max_connections
                if not full:
                    self._busy += 1
            if full:
                close_socket(sock)
                return
            self._jobs.put((sock, address, None, b""))
            return
        with self._lock:
            if self._closed:
                close_socket(sock)
                return
            self._incoming.append((sock, address, buffered))
        self._wake()

    def admitting(self) -> int:
        """Accepted connections the gate has not taken yet (at most ADMITTING from ``accept``)."""
        with self._lock:
            return len(self._incoming)

    def held(self) -> int:
        """Connections held now: waiting at the gate, queued or being answered."""
        with self._lock:
            return len(self._waiting) + len(self._incoming) + self._busy

    def close(self) -> None:
        """Drop every waiting connection and stop the threads (answers under way finish on their own)."""
        with self._lock:
            self._closed = True
            self._taken.notify_all()
        self._wake()
        self._threads[0].join()
        for _ in self._threads[1:]:
            self._jobs.put(None)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (the pipe is full) or closed

    # -- the gate thread --

    def _gate(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
            if closed:
                break
            first = next(iter(self._waiting.values()), None)
            wait = None if first is None else max(first.deadline - time.monotonic(), 0.0)
            for key, _ in self._selector.select(wait):
                if key.fileobj is self._wake_r:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                else:
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        self._readable(sock)
                    except Exception as e:  # one connection's trouble must not stop the gate
                        log.warning("serve-http: dropped a connection: %s: %s", type(e).__name__, e)
                        self._drop(sock, None)
            self._take_incoming()
            self._expire()
        for waiting in list(self._waiting):
            self._drop(waiting, None)
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for new, _, _ in incoming:
            close_socket(new)

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            self._taken.notify_all()
        for sock, address, buffered in incoming:
            with self._lock:
                full = len(self._waiting) + self._busy >= self.max_connections
            if full and self._waiting:
                oldest = next(iter(self._waiting))
                log.debug(
                    "serve-http: %s: dropped, %d connections held", self._waiting[oldest].address, len(self._waiting)
                )
                self._drop(oldest, 503)
            elif full:
                log.debug("serve-http: %s: refused: %d connections held", address, self.max_connections)
                _refuse(sock, 503)
                continue
            sock.setblocking(False)
            waiting = _Waiting(address, time.monotonic() + self.timeout, bytearray(buffered))
            with self._lock:
                self._waiting[sock] = waiting
            if not self._dispatch_if_complete(sock, waiting):
                self._selector.register(sock, selectors.EVENT_READ)

    def _readable(self, sock: socket.socket) -> None:
        waiting = self._waiting[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock, None)
            return
        waiting.buffer += data
        if self._dispatch_if_complete(sock, waiting, registered=True):
            return
        if len(waiting.buffer) > MAX_HEAD:
            self._drop(sock, 431)

    def _dispatch_if_complete(self, sock: socket.socket, waiting: _Waiting, registered: bool = False) -> bool:
        m = _HEAD_END.search(waiting.buffer, 0, MAX_HEAD + 4)
        if m is None:
            return False
        if registered:
            self._selector.unregister(sock)
        head, rest = bytes(waiting.buffer[: m.end()]), bytes(waiting.buffer[m.end() :])
        with self._lock:
            del self._waiting[sock]
            self._busy += 1
        self._jobs.put((sock, waiting.address, head, rest))
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            sock, waiting = next(iter(self._waiting.items()))
            if waiting.deadline > now:
                return
            # a half-sent head gets 408; an idle keep-alive connection is simply closed
            self._drop(sock, 408 if waiting.buffer else None)

    def _drop(self, sock: socket.socket, status: int | None) -> None:
        with self._lock:
            self._waiting.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if status is None:
            close_socket(sock)
        else:
            _refuse(sock, status)

    # -- the worker threads --

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            sock, address, head, rest = job
            keep = False
            try:
                sock.setblocking(True)
                sock.settimeout(self.timeout)
                keep = self._answer(sock, address, head + rest if self._with_body and head is not None else head)
            except OSError as e:  # the client went away or timed out: routine
                log.debug("serve-http: %s: %s", address, e)
            except Exception as e:  # one connection's failure is logged, never the server's end
                log.warning("serve-http: %s: %s: %s", address, type(e).__name__, e)
                log.debug("serve-http: traceback", exc_info=True)
            finally:
                with self._lock:
                    self._busy -= 1
            if keep and head is not None and not self._with_body:
                self.admit(sock, address, rest)
            elif head is not None:
                close_socket(sock)
            # TLS: the answer closes its own TLS socket (``sock`` was detached from it)


def drain(sock: socket.socket) -> None:
    """Read what is left of a request (bounded, without waiting): unread bytes at close() make the kernel send
    RST, which can destroy the answer before the client reads it."""
    try:
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(65536):
                break
    except OSError:
        pass


def _refuse(sock: socket.socket, status: int) -> None:
    """Send a short error answer without blocking, then close."""
    drain(sock)
    try:
        sock.send(_REFUSALS[status])
    except OSError:
        pass
    close_socket(sock)


def close_socket(sock: socket.socket) -> None:
    """Shut down and close, ignoring a peer that is gone already."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
