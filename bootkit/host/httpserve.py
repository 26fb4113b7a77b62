"""``bootkit serve-http``: a small threaded static file server for demos and tests.

Python's ``http.server`` has no ``Range`` support; this one has what bootkit's fetcher relies on: single
byte ranges (``206``, ``416``, suffix ``bytes=-N`` and open ``bytes=N-`` ranges), ``HEAD``, a strong ``ETag``,
``Last-Modified``, ``If-Range``, ``If-None-Match``/``If-Modified-Since``, keep-alive, ``sendfile``, optional
TLS, and no path escape out of the served directory (``..``, symlinks pointing outside). Multi-range
requests get the whole file (``200``), as RFC 9110 allows; a range number of more than 20 digits gets
``416``. Connections are bounded in number, threads and time (``bootkit.host.httpconns``), so a slowloris
client cannot exhaust the server. In production, use nginx or any web server.

Host side (not in the initramfs), standard library only.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import io
import os
import posixpath
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from bootkit.errors import UsageError
from bootkit.host.httpconns import Connections, close_socket
from bootkit.log import log

#: seconds for a request head to arrive, for an idle keep-alive connection, and for each send of an answer
DEFAULT_TIMEOUT = 30.0
#: connections held at once (waiting for a request, queued, being answered)
DEFAULT_MAX_CONNECTIONS = 256
#: threads answering requests (a connection waiting for its request holds none)
DEFAULT_WORKERS = 16
#: digits of a byte position: 20 hold any 64-bit size (and int() of over 4300 digits raises ValueError)
MAX_DIGITS = 20

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` -> (host, port); the host defaults to 127.0.0.1."""
    m = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]*)):(\d+)|(\d+)", bind)
    if not m:
        raise UsageError(f"--bind {bind}: expected HOST:PORT, [IPV6]:PORT or PORT")
    host = m.group(1) or m.group(2) or "127.0.0.1"
    port = int(m.group(3) or m.group(4))
    if port > 65535:
        raise UsageError(f"--bind {bind}: port {port} out of range")
    return host, port


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """A single byte range -> (first, last) inclusive; None: serve the whole file; "unsatisfiable": 416."""
    m = _RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: ignore the header
    if len(m.group(1)) > MAX_DIGITS or len(m.group(2)) > MAX_DIGITS:
        return "unsatisfiable"  # no file is that large
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(size - n, 0), size - 1
    first = int(m.group(1))
    if m.group(2) and int(m.group(2)) < first:
        return None  # invalid: ignored
    if first >= size:
        return "unsatisfiable"
    last = int(m.group(2)) if m.group(2) else size - 1
    return first, min(last, size - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers one request whose head the gate has read (``head``), or a TLS connection's requests."""

    protocol_version = "HTTP/1.1"
    server_version = "bootkit-serve-http"
    server: _Server

    def __init__(self, request: Any, client_address: Any, server: _Server, head: bytes | None = None) -> None:
        self._head = head
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        if self._head is not None:
            self.rfile.close()
            self.rfile = io.BytesIO(self._head)

    def handle(self) -> None:
        if self._head is None:
            super().handle()  # TLS: the usual keep-alive loop, each read bounded by the socket's timeout
            return
        self.close_connection = True
        self.handle_one_request()  # the gate waits for the next request

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("serve-http: %s %s", self.address_string(), format % args)

    def _resolve(self) -> str | None:
        """The file the request names, or None if it is outside the served directory or not a file."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if "\0" in path or not path.startswith("/"):
            return None
        if any(part == ".." for part in path.split("/")):
            return None
        full = os.path.realpath(os.path.join(self.server.root, posixpath.normpath(path).lstrip("/")))
        if full != self.server.root and not full.startswith(self.server.root + os.sep):
            return None
        return full if os.path.isfile(full) else None

    def _error(self, status: int, extra: dict[str, str] | None = None) -> None:
        body = f"{status} {http.HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True  # a request body is never read: it must not pass for the next request
        path = self._resolve()
        if path is None:
            self._error(404)
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._error(404)
            return
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}"'
            modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            common = {"ETag": etag, "Last-Modified": modified, "Accept-Ranges": "bytes"}
            if self._not_modified(etag, st.st_mtime):
                self._error_free(304, common)
                return
            span: tuple[int, int] | str | None = None
            range_header = self.headers.get("Range")
            if range_header and self._if_range_holds(etag, modified):
                span = parse_range(range_header, size)
            if span == "unsatisfiable":
                self._error(416, {"Content-Range": f"bytes */{size}", **common})
                return
            if isinstance(span, tuple):
                first, last = span
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                first, last = 0, size - 1
                self.send_response(200)
            count = last - first + 1
            for k, v in common.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(count))
            self.end_headers()
            if body and count > 0:
                self.wfile.flush()
                self.connection.sendfile(f, first, count)

    def _error_free(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _not_modified(self, etag: str, mtime: float) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            return inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]
        ims = self.headers.get("If-Modified-Since")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError, OverflowError, IndexError):
                return False
            return int(mtime) <= since
        return False

    def _if_range_holds(self, etag: str, modified: str) -> bool:
        """Whether ``If-Range`` (if any) still matches: a strong ETag, or the exact Last-Modified date."""
        cond = self.headers.get("If-Range")
        if cond is None:
            return True
        cond = cond.strip()
        return cond == etag if cond.startswith(('"', "W/")) else cond == modified


class _Server(http.server.HTTPServer):
    # the listen backlog: socketserver's 5 makes the kernel drop the SYNs of a burst (retried after 1 s)
    request_queue_size = 128

    def __init__(
        self,
        root: str,
        address: tuple[Any, ...],
        context: ssl.SSLContext | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        self.root = os.path.realpath(root)
        self.context = context
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.connections = Connections(
            self._answer, workers=workers, max_connections=max_connections, timeout=timeout, tls=context is not None
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        # accept() only: the request is read at the gate and answered by a worker
        self.connections.accept(request, client_address)

    def _answer(self, sock: socket.socket, client_address: Any, head: bytes | None) -> bool:
        """Answer one request (or, for TLS, the connection); True: wait for the next request."""
        if head is not None:
            return not _Handler(sock, client_address, self, head).close_connection
        assert self.context is not None
        try:
            # the TLS handshake runs in a worker, bounded by the timeout, so a slow client cannot stall accept()
            tls = self.context.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.debug("serve-http: TLS handshake with %s failed: %s", client_address, e)
            close_socket(sock)
            return False
        try:
            _Handler(tls, client_address, self)
        finally:
            close_socket(tls)
        return False

    def server_close(self) -> None:
        super().server_close()
        # socketserver calls this when bind() fails, before __init__ made the connections
        connections: Connections | None = getattr(self, "connections", None)
        if connections is not None:
            connections.close()


def _sockaddr(host: str, port: int) -> tuple[Any, ...]:
    """What ``bind()`` takes for ``host``: an IPv6 literal as (address, port, flow, scope), so that the zone of
    a link-local address (``fe80::1%eth0``) is kept (a 2-tuple loses it and bind fails with EINVAL)."""
    if ":" not in host:
        return host, port
    try:
        found = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror as e:
        raise UsageError(f"--bind [{host}]:{port}: not an IPv6 address ({e.strerror})") from e
    return tuple(found[0][4])


def _context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--cert {certfile}: cannot load certificate/key: {e}") from e
    return context


def make_server(
    root: str,
    bind: str = "127.0.0.1:0",
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    workers: int = DEFAULT_WORKERS,
) -> tuple[http.server.HTTPServer, str]:
    """A server for ``root`` (not yet serving) and its base URL, e.g. ``http://127.0.0.1:41234/``.

    ``timeout`` bounds the wait for a request head, an idle keep-alive connection and each send of an
    answer; at most ``max_connections`` are held at once and ``workers`` threads answer requests.
    """
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory")
    if not timeout > 0:
        raise UsageError(f"--timeout {timeout}: must be > 0")
    if max_connections < 1:
        raise UsageError(f"--max-connections {max_connections}: must be >= 1")
    if workers < 1:
        raise UsageError(f"workers={workers}: must be >= 1")
    host, port = parse_bind(bind)
    try:
        server = _Server(
            root,
            _sockaddr(host, port),
            _context(certfile, keyfile),
            timeout=timeout,
            max_connections=max_connections,
            workers=workers,
        )
    except OSError as e:
        raise UsageError(f"--bind {bind}: {e.strerror}") from e
    port = server.server_address[1]
    scheme = "https" if certfile else "http"
    # an IPv6 literal in brackets; a zone (fe80::1%eth0) written %25eth0 in the URL (RFC 6874)
    shown = f"[{host.replace('%', '%25')}]" if ":" in host else host
    return server, f"{scheme}://{shown}:{port}/"


@contextlib.contextmanager
def http_server(
    root: str,
    bind: str = "127.0.0.1:0",
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[str]:
    """Serve ``root`` in a background thread; yields the base URL; stops on exit (see ``make_server``)."""
    server, url = make_server(
        root,
        bind,
        certfile=certfile,
        keyfile=keyfile,
        timeout=timeout,
        max_connections=max_connections,
        workers=workers,
    )
    thread = threading.Thread(target=server.serve_forever, name="serve-http", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
