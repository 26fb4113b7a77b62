"""``bootkit serve-http``: a small threaded static file server for demos and tests.

Python's ``http.server`` has no ``Range`` support; this one has what bootkit's fetcher relies on: single
byte ranges (``206``, ``416``, suffix ``bytes=-N`` and open ``bytes=N-`` ranges), ``HEAD``, a strong ``ETag``,
``Last-Modified``, ``If-Range``, ``If-None-Match``/``If-Modified-Since``, keep-alive, ``sendfile``, optional
TLS, and no path escape out of the served directory (``..``, symlinks pointing outside). Multi-range
requests get the whole file (``200``), as RFC 9110 allows. In production, use nginx or any web server.

Host side (not in the initramfs), standard library only.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.server
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
from bootkit.log import log

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


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
    protocol_version = "HTTP/1.1"
    server_version = "bootkit-serve-http"
    server: _Server

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
            except (TypeError, ValueError):
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


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, root: str, address: tuple[str, int], context: ssl.SSLContext | None) -> None:
        self.root = os.path.realpath(root)
        self.context = context
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the TLS handshake runs in the request's own thread, so a slow client cannot stall accept()
        if self.context is not None:
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                log.debug("serve-http: TLS handshake with %s failed: %s", client_address, e)
                return
        super().finish_request(request, client_address)


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
    root: str, bind: str = "127.0.0.1:0", *, certfile: str | None = None, keyfile: str | None = None
) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A server for ``root`` (not yet serving) and its base URL, e.g. ``http://127.0.0.1:41234/``."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory")
    host, port = parse_bind(bind)
    try:
        server = _Server(root, (host, port), _context(certfile, keyfile))
    except OSError as e:
        raise UsageError(f"--bind {bind}: {e.strerror}") from e
    port = server.server_address[1]
    scheme = "https" if certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    return server, f"{scheme}://{shown}:{port}/"


@contextlib.contextmanager
def http_server(
    root: str, bind: str = "127.0.0.1:0", *, certfile: str | None = None, keyfile: str | None = None
) -> Iterator[str]:
    """Serve ``root`` in a background thread; yields the base URL; stops on exit."""
    server, url = make_server(root, bind, certfile=certfile, keyfile=keyfile)
    thread = threading.Thread(target=server.serve_forever, name="serve-http", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
