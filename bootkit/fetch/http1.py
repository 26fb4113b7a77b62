"""A small HTTP/1.1 client connection: what bootkit's fetch code asks of ``http.client``, and no more.

One request at a time on a keep-alive connection (``request``, then ``getresponse``, then read the body),
TLS when given a context, a ``CONNECT`` tunnel through a proxy, and bodies delimited by Content-Length,
chunked transfer coding or the end of the connection. Why not ``http.client``: it imports the ``email``
package to parse headers, and with it ``calendar``, ``locale``, ``datetime`` and ``ssl`` (whether or not a URL
is HTTPS). On a real CPU that is a few milliseconds; in the initramfs under an emulated CPU it was about a
second of the boot before anything was fetched (docs/initramfs.md, "One Python process").

Everything here comes from the network and is bounded: the status line and each header line (64 KiB, as
``http.client``), the number of header lines (100), each chunk-size line, and a body is never read past
what the caller asks for. A malformed answer raises :class:`BadResponse` with a short, printable reason;
an answer that ends early raises :class:`IncompleteRead` (whole reads) or reads short (partial reads, as
``http.client``), and a connection closed before any answer raises :class:`RemoteDisconnected`.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

#: longest status, header or chunk-size line, and most header lines, accepted (http.client's limits)
MAX_LINE = 65536
MAX_HEADERS = 100

HTTP_PORT = 80
HTTPS_PORT = 443


class HTTPException(Exception):
    """A protocol error: the server's answer is not HTTP/1.x as this client reads it."""


class BadResponse(HTTPException):
    """A malformed status line, header or chunk."""


class IncompleteRead(HTTPException):
    """The body ended before its announced end; ``expected`` bytes are missing (None: unknown)."""

    def __init__(self, partial: bytes, expected: Optional[int] = None) -> None:
        super().__init__(f"{len(partial)} bytes read, {expected if expected is not None else 'more'} expected")
        self.partial = partial
        self.expected = expected


class RemoteDisconnected(ConnectionResetError, HTTPException):
    """The server closed the connection without answering (a keep-alive connection it had dropped)."""


def _shown(raw: bytes) -> str:
    """A piece of a bad answer, fit for a one-line message: printable ASCII, at most 40 characters."""
    text = "".join(chr(c) if 32 <= c < 127 else "?" for c in raw[:40])
    return repr(text + ("..." if len(raw) > 40 else ""))


def _line(fp: Any, what: str) -> bytes:
    line: bytes = fp.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise BadResponse(f"{what} longer than {MAX_LINE} bytes")
    return line


class HTTPResponse:
    """The answer to one request: ``status``, ``reason``, headers (``getheader``), and the body."""

    def __init__(self, fp: Any, method: str) -> None:
        self._fp: Any = fp
        self.status, self.reason, self.version = self._status_line()
        while 100 <= self.status < 200 and self.status != 101:
            # interim answers (100 Continue, 103 Early Hints): their headers are skipped
            self._read_headers()
            self.status, self.reason, self.version = self._status_line()
        self.headers = self._read_headers()
        self.chunked = "chunked" in (self.getheader("Transfer-Encoding") or "").lower()
        connection = (self.getheader("Connection") or "").lower()
        self.will_close = "close" in connection or (self.version == 10 and "keep-alive" not in connection)
        #: bytes left of a Content-Length body; None: chunked or until the connection closes
        self.length: Optional[int] = None
        self._chunk_left: Optional[int] = None
        if method == "HEAD" or self.status in (204, 304):
            self.length = 0
        elif not self.chunked:
            length = self.getheader("Content-Length")
            if length is not None:
                if not length.strip().isdigit():
                    raise BadResponse(f"bad Content-Length {_shown(length.encode('latin-1'))}")
                self.length = int(length)
            else:
                # the body ends with the connection
                self.will_close = True
        if self.length == 0:
            self._finish()

    def _status_line(self) -> Tuple[int, str, int]:
        line = _line(self._fp, "status line")
        if not line:
            raise RemoteDisconnected("the server closed the connection without an answer")
        parts = line.rstrip(b"\r\n").split(None, 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit() or len(parts[1]) != 3:
            raise BadResponse(f"bad status line {_shown(line)}")
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        return int(parts[1]), reason, 11 if parts[0] == b"HTTP/1.1" else 10

    def _read_headers(self) -> List[Tuple[str, str]]:
        headers: List[Tuple[str, str]] = []
        while True:
            line = _line(self._fp, "header line")
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise BadResponse("the connection closed inside the headers")
            if len(headers) == MAX_HEADERS:
                raise BadResponse(f"more than {MAX_HEADERS} header lines")
            if line[:1] in (b" ", b"\t") and headers:
                # an obsolete folded line continues the previous value
                last_name, last_value = headers[-1]
                headers[-1] = (last_name, last_value + " " + line.strip().decode("latin-1"))
                continue
            raw_name, colon, raw_value = line.partition(b":")
            if not colon or not raw_name or raw_name != raw_name.strip():
                raise BadResponse(f"bad header line {_shown(line)}")
            headers.append((raw_name.decode("latin-1"), raw_value.strip().decode("latin-1")))

    def getheader(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The header's value (repeated headers joined with ", "), or ``default``."""
        name = name.lower()
        values = [v for n, v in self.headers if n.lower() == name]
        return ", ".join(values) if values else default

    def isclosed(self) -> bool:
        """True once the body has been read to its end (or the response closed)."""
        return self._fp is None

    def close(self) -> None:
        self._finish()

    def _finish(self) -> None:
        fp, self._fp = self._fp, None
        if fp is not None:
            fp.close()

    def read(self, amt: Optional[int] = None) -> bytes:
        """Up to ``amt`` bytes of the body (all of it without ``amt``): fewer only at its end. Reading the
        whole body raises IncompleteRead when it ends before its announced end."""
        if amt is None:
            parts = []
            while True:
                data = self.read(1 << 20)
                if not data:
                    break
                parts.append(data)
            body = b"".join(parts)
            if self.length:
                raise IncompleteRead(body, self.length)
            return body
        buf = bytearray(amt)
        view = memoryview(buf)
        n = 0
        while n < amt:
            got = self.readinto(view[n:])
            if not got:
                break
            n += got
        view.release()
        return bytes(buf[:n])

    def readinto(self, b: Any) -> int:
        """Read body bytes into the writable buffer ``b``; 0 at the end of the body."""
        if self._fp is None or not len(b):
            return 0
        if self.chunked:
            return self._readinto_chunked(b)
        view = memoryview(b).cast("B")
        if self.length is not None:
            view = view[: self.length]
        n: int = self._fp.readinto(view)
        if not n:
            # the connection ended (early, when a length was announced: ``read()`` raises, a partial read
            # returns short, as in http.client)
            self._finish()
            return 0
        if self.length is not None:
            self.length -= n
            if self.length == 0:
                self._finish()
        return n

    def _readinto_chunked(self, b: Any) -> int:
        if self._chunk_left is None or self._chunk_left == 0:
            if self._chunk_left == 0 and _line(self._fp, "chunk end") not in (b"\r\n", b"\n"):
                raise BadResponse("chunk not followed by CRLF")
            size_line = _line(self._fp, "chunk-size line")
            if not size_line:
                self._finish()
                raise IncompleteRead(b"")
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16:
                    raise ValueError
                size = int(size_text, 16)
            except ValueError:
                raise BadResponse(f"bad chunk size {_shown(size_line)}") from None
            if size == 0:
                # the last chunk; trailer lines until an empty one
                self._read_headers()
                self._finish()
                return 0
            self._chunk_left = size
        view = memoryview(b).cast("B")[: self._chunk_left]
        n: int = self._fp.readinto(view)
        if not n:
            self._finish()
            raise IncompleteRead(b"", self._chunk_left)
        self._chunk_left -= n
        return n


class HTTPConnection:
    """One connection to ``host``:``port`` (TLS with ``context``), opened at the first request, and again
    at a request after ``close``. ``create_connection`` is how the socket is made (``socket.create_connection``
    unless replaced: ``bootkit.fetch.client.Pins``)."""

    default_port = HTTP_PORT

    def __init__(self, host: str, port: Optional[int] = None, timeout: Optional[float] = None,
                 context: Any = None) -> None:  # fmt: skip
        self.host = host
        self.port = port or (HTTPS_PORT if context is not None else HTTP_PORT)
        self.timeout = timeout
        self.context = context
        self.sock: Optional[socket.socket] = None
        self.create_connection: Callable[..., socket.socket] = socket.create_connection
        self._tunnel: Optional[Tuple[str, int]] = None
        self._fp: Any = None
        self._method = "GET"

    def set_tunnel(self, host: str, port: int) -> None:
        """Go through ``host``:``port`` by ``CONNECT`` (this connection's own address is the proxy's)."""
        self._tunnel = (host, port)

    def connect(self) -> None:
        sock = self.create_connection((self.host, self.port), self.timeout)
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            server = self.host
            if self._tunnel is not None:
                server = self._tunnel[0]
                self._connect_tunnel(sock)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=server)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._fp = sock.makefile("rb")

    def _connect_tunnel(self, sock: socket.socket) -> None:
        assert self._tunnel is not None
        authority = _authority(*self._tunnel)
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii"))
        fp = sock.makefile("rb")
        try:
            answer = HTTPResponse(fp, "CONNECT")
        finally:
            fp.close()
        if answer.status != 200:
            raise OSError(f"proxy tunnel to {authority} refused: HTTP {answer.status} {answer.reason}".rstrip())

    def close(self) -> None:
        sock, fp, self.sock, self._fp = self.sock, self._fp, None, None
        if fp is not None:
            fp.close()
        if sock is not None:
            sock.close()

    def request(self, method: str, target: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> None:  # fmt: skip
        """Send a request; ``Host`` comes from the target's authority (an absolute URL, for a plain-HTTP
        proxy) or this connection's, unless ``headers`` has it."""
        all_headers = dict(headers or {})
        if not any(k.lower() == "host" for k in all_headers):
            all_headers["Host"] = self._host_field(target)
        if body is not None:
            all_headers["Content-Length"] = str(len(body))
        lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in all_headers.items()]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"request line or header with a line break: {line[:40]!r}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(data)
        self._method = method

    def getresponse(self) -> HTTPResponse:
        """The answer to the last request. With ``will_close`` (or an error) the connection is closed here;
        the response still reads its body."""
        if self._fp is None:
            raise RemoteDisconnected("not connected")
        fp = self._fp
        try:
            response = HTTPResponse(fp, self._method)
        except BaseException:
            self.close()
            raise
        if response.will_close:
            # the response keeps the reader; the connection lets go of the socket
            self._fp = None
            sock, self.sock = self.sock, None
            if sock is not None:
                sock.close()
        else:
            # the reader stays the connection's: the response must not close it
            response._fp = _Borrowed(fp) if response._fp is not None else None
        return response

    def _host_field(self, target: str) -> str:
        if target.startswith(("http://", "https://")):
            authority = target.split("//", 1)[1].split("/", 1)[0]
            return authority
        if self._tunnel is not None:
            return _authority(*self._tunnel, default=HTTPS_PORT)
        return _authority(self.host, self.port, default=self.default_port)


class _Borrowed:
    """The connection's reader, lent to one response: closing it only ends the loan."""

    __slots__ = ("_fp",)

    def __init__(self, fp: Any) -> None:
        self._fp = fp

    def readline(self, limit: int) -> bytes:
        line: bytes = self._fp.readline(limit)
        return line

    def readinto(self, b: Any) -> int:
        n: int = self._fp.readinto(b)
        return n

    def close(self) -> None:
        self._fp = None


def _authority(host: str, port: int, default: int = HTTPS_PORT) -> str:
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        host = host.encode("idna").decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    return host if port == default else f"{host}:{port}"


class HTTPSConnection(HTTPConnection):
    """:class:`HTTPConnection` over TLS (``context``: an ``ssl.SSLContext``)."""

    default_port = HTTPS_PORT

    def __init__(self, host: str, port: Optional[int] = None, timeout: Optional[float] = None,
                 context: Any = None) -> None:  # fmt: skip
        super().__init__(host, port or HTTPS_PORT, timeout, context)
