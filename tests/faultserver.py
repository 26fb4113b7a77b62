"""A fault-injecting HTTP server for the fetch tests.

A correct HTTP/1.1 server for files held in memory (``Range`` with 206/416, ``If-Range``, strong ``ETag``,
keep-alive, and a plain-HTTP proxy mode for absolute request URLs) that misbehaves on request: each path has
a queue of ``Fault``s, one consumed per request, and permanent ``redirects``. Every request is recorded, so a
test can assert what the client asked for (a ``Range`` when resuming, ``If-Range`` with the old ETag, ...).
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Fault:
    """What one request to a path gets instead of a plain answer (fields combine where that makes sense)."""

    #: answer with this status and an empty body
    status: int | None = None
    #: replace the file's content before answering (new ETag), e.g. "file changed on the server"
    replace: bytes | None = None
    #: send only this many body bytes, then drop the connection
    drop_after: int | None = None
    #: announce this many more bytes in Content-Length than are sent, then close
    lie_length: int = 0
    #: send the body in blocks of ``trickle`` bytes with ``trickle_delay`` seconds between them
    trickle: int | None = None
    trickle_delay: float = 0.0
    #: after ``stall_after`` body bytes, go silent for ``stall`` seconds, then drop the connection
    stall_after: int | None = None
    stall: float = 0.0
    #: flip one byte at this offset into the body sent
    corrupt_at: int | None = None
    #: answer with a 302 to this location
    redirect: str | None = None
    #: send this many bytes more than the answer should have (announced in Content-Length unless chunked)
    extra_body: int = 0
    #: send the body with Transfer-Encoding: chunked (no Content-Length)
    chunked: bool = False
    #: ignore the Range header (answer 200 with the whole file)
    ignore_range: bool = False
    #: honour Range even when If-Range no longer matches (a server that ignores If-Range)
    ignore_if_range: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    proxied: bool


@dataclass
class FaultState:
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: send ETag (and honour If-Range); False: a server that gives no validator at all
    validators: bool = True
    #: a dead server: every request (also on a kept-alive connection) is dropped unanswered
    down: bool = False

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'

    def add_faults(self, path: str, *faults: Fault) -> None:
        with self.lock:
            self.faults.setdefault(path, []).extend(faults)

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_CONNECT(self) -> None:
        """Proxy mode for HTTPS: tunnel to a loopback port (the only place tests may connect to)."""
        state = self.server.state
        with state.lock:
            state.requests.append(Request("CONNECT", self.path, dict(self.headers.items()), True))
        host, _, port = self.path.rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            self._empty(403)
            return
        upstream = socket.create_connection(("127.0.0.1", int(port)))
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        relay(self.connection, upstream)

    def _answer(self, body: bool) -> None:
        state = self.server.state
        proxied = self.path.startswith("http://")
        path = urllib.parse.urlsplit(self.path).path
        with state.lock:
            state.requests.append(Request(self.command, path, dict(self.headers.items()), proxied))
            if state.down:
                self._drop()
                return
            queue = state.faults.get(path)
            fault = queue.pop(0) if queue else Fault()
            if fault.replace is not None:
                state.files[path] = fault.replace
            redirect = fault.redirect or state.redirects.get(path)
            data = state.files.get(path)
            etag = state.etag(path) if data is not None and state.validators else ""
        if redirect is not None:
            self._empty(302, {"Location": redirect})
            return
        if fault.status is not None:
            self._empty(fault.status)
            return
        if data is None:
            self._empty(404)
            return
        size = len(data)
        first, last, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if range_header and not fault.ignore_range and (
            if_range is None or if_range == etag or fault.ignore_if_range
        ):
            m = _RANGE.fullmatch(range_header)
            if m and m.group(1):
                first = int(m.group(1))
                last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                status = 206
            elif m and m.group(2):
                first, last, status = max(size - int(m.group(2)), 0), size - 1, 206
            if status == 206 and first >= size:
                self._empty(416, {"Content-Range": f"bytes */{size}", **({"ETag": etag} if etag else {})})
                return
        payload = bytearray(data[first : last + 1])
        if fault.lie_length < 0:  # announce and send fewer bytes than the file has
            del payload[fault.lie_length :]
        if fault.corrupt_at is not None and fault.corrupt_at < len(payload):
            payload[fault.corrupt_at] ^= 0xFF
        self.send_response(status)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if fault.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(payload) + max(fault.lie_length, 0) + fault.extra_body))
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if not body:
            return
        if fault.chunked or fault.extra_body:
            self._send_oversized(bytes(payload), fault)
            return
        self._send_body(bytes(payload), fault)

    def _send_oversized(self, payload: bytes, fault: Fault) -> None:
        """The payload, then ``extra_body`` more bytes (chunked if asked), sent from one small block."""
        block = bytes(64 * 1024)
        left = fault.extra_body
        try:
            if payload:
                self._write_piece(payload, fault.chunked)
            while left > 0:
                self._write_piece(block[: min(left, len(block))], fault.chunked)
                left -= len(block)
            if fault.chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # the client hung up (as it should)
        self._drop()

    def _write_piece(self, piece: bytes, chunked: bool) -> None:
        if chunked:
            self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
        else:
            self.wfile.write(piece)

    def _send_body(self, payload: bytes, fault: Fault) -> None:
        limit = len(payload) if fault.drop_after is None else min(fault.drop_after, len(payload))
        stall_at = fault.stall_after if fault.stall_after is not None else None
        block = fault.trickle or len(payload) or 1
        sent = 0
        try:
            while sent < limit:
                end = min(sent + block, limit)
                if stall_at is not None and sent <= stall_at < end:
                    end = stall_at
                self.wfile.write(payload[sent:end])
                self.wfile.flush()
                sent = end
                if stall_at is not None and sent == stall_at:
                    time.sleep(fault.stall)
                    self._drop()
                    return
                if fault.trickle and sent < limit:
                    time.sleep(fault.trickle_delay)
        except OSError:
            self.close_connection = True
            return
        if sent < len(payload) or fault.lie_length > 0:
            self._drop()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join()
    b.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, state: FaultState) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)


@contextmanager
def fault_server() -> Iterator[tuple[str, FaultState]]:
    """Yields (base URL, state); put files in ``state.files["/name"]`` and faults with ``add_faults``."""
    state = FaultState()
    server = _Server(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class DroppingRelay:
    """A TCP relay in front of a real server (nginx) that cuts connection k after ``drops[k]`` bytes.

    ``before_connection(k)``, if set, runs before connection k is relayed (e.g. to replace the file on the
    server's disk between two attempts). Connections beyond ``drops`` are relayed untouched.
    """

    def __init__(self, target_port: int, drops: list[int]) -> None:
        self.target_port = target_port
        self.drops = drops
        self.connections = 0
        self.before_connection: Any = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # close() does not wake accept(): poll _stop instead
        self.port: int = self._listener.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> DroppingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            k = self.connections
            self.connections += 1
            if self.before_connection is not None:
                self.before_connection(k)
            limit = self.drops[k] if k < len(self.drops) else None
            threading.Thread(target=self._relay, args=(client, limit), daemon=True).start()

    def _relay(self, client: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def upward() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_RDWR)  # the client hung up: so does the server side
            except OSError:
                pass

        threading.Thread(target=upward, daemon=True).start()
        sent = 0
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    client.sendall(data[: limit - sent])
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
