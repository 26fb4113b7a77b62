"""bootkit's HTTP/1.1 client connection (bootkit/fetch/http1.py) against a server that answers with canned
bytes: bodies by Content-Length, chunks and the end of the connection, keep-alive, and answers that are
malformed or hostile (each refused with one short, printable reason, never more memory than the limits).
The fetch tests (nginx, the fault server, TLS, proxies, IPv6) run the same client end to end."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence

import pytest

from bootkit.fetch import client, http1

REQUEST_END = b"\r\n\r\n"


class Canned:
    """A one-connection server: for each request that arrives, the next answer in ``answers`` is sent;
    then the connection is closed. ``requests`` holds what arrived."""

    def __init__(self, answers: Sequence[bytes]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            pending = b""
            for answer in self.answers:
                while REQUEST_END not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                head, _, pending = pending.partition(REQUEST_END)
                self.requests.append(head)
                conn.sendall(answer)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def canned() -> Iterator[list[Canned]]:
    servers: list[Canned] = []
    yield servers
    for s in servers:
        s.close()


def ask(servers: list[Canned], answers: Sequence[bytes], method: str = "GET") -> tuple[http1.HTTPConnection,
                                                                                      http1.HTTPResponse]:
    server = Canned(answers)
    servers.append(server)
    conn = http1.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(method, "/disk.qcow2", headers={"User-Agent": "test"})
    return conn, conn.getresponse()


def test_content_length_body_and_keep_alive(canned: list[Canned]) -> None:
    conn, r = ask(canned, [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nETag: \"a\"\r\n\r\n0123456789",
                           b"HTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\n\r\nabc"])
    assert (r.status, r.reason, r.getheader("etag"), r.will_close) == (200, "OK", '"a"', False)
    assert r.read(4) == b"0123" and not r.isclosed()
    assert r.read(100) == b"456789" and r.isclosed()
    assert r.read(1) == b""
    # the same socket carries the next request
    sock = conn.sock
    conn.request("GET", "/disk.qcow2", headers={"Range": "bytes=0-2"})
    r2 = conn.getresponse()
    assert conn.sock is sock and (r2.status, r2.read()) == (206, b"abc")
    request = canned[0].requests[0].decode()
    assert request.startswith("GET /disk.qcow2 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{canned[0].port}" in request
    conn.close()


def test_chunked_body_with_extensions_and_trailers(canned: list[Canned]) -> None:
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: yes\r\n\r\n"
    conn, r = ask(canned, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body])
    assert r.read() == b"Wikipedia" and r.isclosed()
    conn.close()


def test_body_until_the_connection_closes(canned: list[Canned]) -> None:
    conn, r = ask(canned, [b"HTTP/1.0 200 OK\r\n\r\nall of it"])
    assert r.will_close and conn.sock is None
    assert r.read() == b"all of it"


def test_head_and_no_content_have_no_body(canned: list[Canned]) -> None:
    conn, r = ask(canned, [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], method="HEAD")
    assert r.isclosed() and r.read() == b"" and r.getheader("Content-Length") == "99"
    conn.close()
    conn, r = ask(canned, [b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert r.read() == b""
    conn.close()


def test_interim_answers_are_skipped(canned: list[Canned]) -> None:
    conn, r = ask(canned, [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    assert (r.status, r.read()) == (200, b"ok")
    conn.close()


def test_a_body_cut_short(canned: list[Canned]) -> None:
    _, r = ask(canned, [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123"])
    with pytest.raises(http1.IncompleteRead) as e:
        r.read()
    assert e.value.expected == 6
    error = client.classify(e.value, "http://srv/disk.qcow2", 30)
    assert str(error) == "http://srv/disk.qcow2: connection closed early (6 bytes missing)"
    # a partial read just reads short, as http.client's does (the caller counts)
    _, r = ask(canned, [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123"])
    assert r.read(10) == b"0123"


def test_a_dropped_keep_alive_connection(canned: list[Canned]) -> None:
    conn, r = ask(canned, [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"])
    assert r.read() == b"x"
    # the server closes after its one answer: the next request finds no answer (an empty read, or a reset
    # when the request arrived after the close; RangeClient retries both once on a new connection)
    conn.request("GET", "/disk.qcow2")
    with pytest.raises(ConnectionResetError):
        conn.getresponse()
    assert conn.sock is None


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "bad status line 'SSH-2.0-OpenSSH_9.2??'"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X" * 70000 + b"\r\n\r\n", "header line longer than 65536 bytes"),
        (b"HTTP/1.1 200 " + b"A" * 70000 + b"\r\n\r\n", "status line longer than 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", "more than 100 header lines"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line 'no colon here??'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length '-5'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", "the connection closed inside the headers"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size 'zz??'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", "chunk not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nX: \x1b[31mred\x07\r\nno colon \x1b]0;title\x07\r\n\r\n",
         "bad header line 'no colon ?]0;title???'"),
    ],
)
def test_malformed_answers_are_refused_in_one_printable_line(canned: list[Canned], answer: bytes, reason: str) -> None:
    server = Canned([answer])
    canned.append(server)
    conn = http1.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/")
    with pytest.raises(http1.BadResponse) as e:
        r = conn.getresponse()
        r.read()
    assert str(e.value).startswith(reason)
    line = str(client.classify(e.value, "http://srv/", 30))
    assert line.startswith("http://srv/: bad HTTP response: BadResponse ") and "\n" not in line
    assert all(32 <= ord(c) < 127 for c in line) and len(line) < 200
    conn.close()


def test_a_request_line_break_is_refused() -> None:
    conn = http1.HTTPConnection("127.0.0.1", 9, timeout=1)
    with pytest.raises(ValueError, match="line break"):
        conn.request("GET", "/x HTTP/1.1\r\nEvil: 1")
    assert conn.sock is None


def test_host_field_forms() -> None:
    assert http1.HTTPConnection("example.org", 80)._host_field("/") == "example.org"
    assert http1.HTTPConnection("::1", 8080)._host_field("/") == "[::1]:8080"
    assert http1.HTTPSConnection("example.org", 443)._host_field("/") == "example.org"
    assert http1.HTTPSConnection("example.org", 8443)._host_field("/") == "example.org:8443"
    # a plain-HTTP proxy gets the absolute URL; Host names the origin
    assert http1.HTTPConnection("proxy", 3128)._host_field("http://srv:8080/d.qcow2") == "srv:8080"
    tunnel = http1.HTTPSConnection("proxy", 3128)
    tunnel.set_tunnel("srv", 443)
    assert tunnel._host_field("/d.qcow2") == "srv"
