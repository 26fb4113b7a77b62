"""``bootkit serve-http``: Range (206, 416, suffix and open ranges), HEAD, ETag, Last-Modified, If-Range,
conditional GETs, keep-alive, and no path escape out of the served directory. Checked on the wire with
http.client, and once with curl as an independent client.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fetch_fixtures import make_data

from bootkit.errors import UsageError
from bootkit.host.httpconns import ADMITTING
from bootkit.host.httpserve import http_server, make_server, parse_bind, parse_range

DATA = make_data(100_000, seed=41)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[http.client.HTTPConnection, Path]]:
    base = tmp_path_factory.mktemp("site")
    root = base / "www"
    (root / "sub").mkdir(parents=True)
    (root / "img").write_bytes(DATA)
    (root / "sub" / "a b.txt").write_bytes(b"spaced\n")
    (root / "empty").write_bytes(b"")
    (base / "secret").write_bytes(b"outside\n")
    os.symlink(base / "secret", root / "link-out")
    with http_server(str(root)) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        yield conn, root
        conn.close()


def get(
    conn: http.client.HTTPConnection, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
    response = conn.getresponse()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_whole_file(site: tuple[http.client.HTTPConnection, Path]) -> None:
    conn, _ = site
    status, headers, body = get(conn, "/img")
    assert (status, body) == (200, DATA)
    assert headers["content-length"] == str(len(DATA))
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"].startswith('"') and "last-modified" in headers


def test_ranges(site: tuple[http.client.HTTPConnection, Path]) -> None:
    conn, _ = site
    n = len(DATA)
    cases = {
        "bytes=10-19": (10, 19),
        "bytes=99990-": (99990, n - 1),
        "bytes=-100": (n - 100, n - 1),
        "bytes=-200000": (0, n - 1),
        "bytes=99000-200000": (99000, n - 1),
    }
    for header, (first, last) in cases.items():
        status, headers, body = get(conn, "/img", Range=header)
        assert status == 206, header
        assert headers["content-range"] == f"bytes {first}-{last}/{n}", header
        assert body == DATA[first : last + 1], header


def test_unsatisfiable_and_ignored_ranges(site: tuple[http.client.HTTPConnection, Path]) -> None:
    conn, _ = site
    status, headers, _ = get(conn, "/img", Range=f"bytes={len(DATA)}-")
    assert status == 416 and headers["content-range"] == f"bytes */{len(DATA)}"
    assert get(conn, "/img", Range="bytes=-0")[0] == 416
    assert get(conn, "/empty", Range="bytes=0-")[0] == 416
    # multiple ranges and malformed headers: the whole file, as RFC 9110 allows
    assert get(conn, "/img", Range="bytes=0-1,5-6")[:1] == (200,)
    assert get(conn, "/img", Range="lines=1-2")[0] == 200


def test_head(site: tuple[http.client.HTTPConnection, Path]) -> None:
    conn, _ = site
    status, headers, body = get(conn, "/img", "HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(DATA)))
    status, headers, body = get(conn, "/img", "HEAD", Range="bytes=5-9")
    assert (status, body, headers["content-range"]) == (206, b"", f"bytes 5-9/{len(DATA)}")


def test_if_range_and_conditionals(site: tuple[http.client.HTTPConnection, Path]) -> None:
    conn, _ = site
    _, headers, _ = get(conn, "/img", "HEAD")
    etag, modified = headers["etag"], headers["last-modified"]
    assert get(conn, "/img", Range="bytes=0-9", If_Range=etag)[0] == 206
    assert get(conn, "/img", Range="bytes=0-9", If_Range=modified)[0] == 206
    status, _, body = get(conn, "/img", Range="bytes=0-9", If_Range='"other"')
    assert (status, body) == (200, DATA)  # the file "changed": all of it
    assert get(conn, "/img", If_None_Match=etag)[0] == 304
    assert get(conn, "/img", If_Modified_Since=modified)[0] == 304
    assert get(conn, "/img", If_None_Match='"other"')[0] == 200


def test_paths(site: tuple[http.client.HTTPConnection, Path]) -> None:
    conn, _ = site
    assert get(conn, "/sub/a%20b.txt")[2] == b"spaced\n"
    assert get(conn, "/img?x=1")[2] == DATA
    for path in ["/../secret", "/sub/../../secret", "/%2e%2e/secret", "/link-out", "/sub", "/", "/nothing"]:
        status, _, body = get(conn, path)
        assert status == 404, path
        assert b"outside" not in body


def test_curl_agrees(site: tuple[http.client.HTTPConnection, Path], tmp_path: Path) -> None:
    conn, _ = site
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url = f"http://127.0.0.1:{conn.port}/img"
    out = tmp_path / "part"
    subprocess.run(["curl", "-sSf", "-r", "1000-1999", "-o", str(out), url], check=True, timeout=60)
    assert out.read_bytes() == DATA[1000:2000]
    out.write_bytes(DATA[:5000])
    subprocess.run(["curl", "-sSf", "-C", "-", "-o", str(out), url], check=True, timeout=60)  # resume
    assert out.read_bytes() == DATA


def test_parse_helpers() -> None:
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_bind("[::1]:0") == ("::1", 0)
    with pytest.raises(UsageError):
        parse_bind("host")
    assert parse_range("bytes=5-", 10) == (5, 9)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=7-3", 10) is None


def test_cli_serve_http(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(DATA)
    cmd = [
        sys.executable, "-m", "bootkit", "serve-http", str(tmp_path),
        "--bind", "127.0.0.1:0",
        "--timeout", "5",
        "--max-connections", "8",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rstrip("/").rsplit(":", 1)[1]), timeout=30)
        assert get(conn, "/img", Range="bytes=-3")[2] == DATA[-3:]
        conn.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "bootkit", "serve-http", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'nope'}: not a directory"
    bad = subprocess.run(
        [sys.executable, "-m", "bootkit", "serve-http", str(tmp_path), "--max-connections", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --max-connections 0: must be >= 1"


def test_ipv6_loopback(tmp_path: Path) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    from bootkit.fetch import FetchOptions, HTTPSource, download

    (tmp_path / "img").write_bytes(DATA)
    with http_server(str(tmp_path), "[::1]:0") as url:
        assert url.startswith("http://[::1]:")
        result = download(url + "img", str(tmp_path / "copy"), FetchOptions(verify="none"))
        assert (tmp_path / "copy").read_bytes() == DATA and result.size == len(DATA)
        with HTTPSource(url + "img", FetchOptions(verify="none"), chunk_size=65536) as source:
            assert source.pread(60_000, 10_000) == DATA[60_000:70_000]


# -- hostile clients ------------------------------------------------------------------------------------


def test_huge_range_numbers_get_416(site: tuple[http.client.HTTPConnection, Path]) -> None:
    """A Range number of 5000 digits was a traceback and no answer (int() refuses over 4300 digits)."""
    conn, _ = site
    huge = "9" * 5000
    for header in [f"bytes=0-{huge}", f"bytes={huge}-", f"bytes=-{huge}", f"bytes={'1' * 21}-"]:
        status, headers, _ = get(conn, "/img", Range=header)
        assert (status, headers["content-range"]) == (416, f"bytes */{len(DATA)}"), header[:30]
    # 20 digits is still a number: beyond the end of the file
    assert get(conn, "/img", Range=f"bytes={'9' * 20}-")[0] == 416
    assert get(conn, "/img", If_Modified_Since=f"Mon, 01 Jan {huge} 00:00:00 GMT")[0] == 200
    assert get(conn, "/img", Range="bytes=0-9")[2] == DATA[:10]  # the same connection still works


@contextlib.contextmanager
def small_server(root: Path, timeout: float) -> Iterator[tuple[int, Any]]:
    """A server with a short timeout and few connections, and the server object to look inside."""
    (root / "img").write_bytes(DATA)
    server, url = make_server(str(root), timeout=timeout, max_connections=64, workers=4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(url.rstrip("/").rsplit(":", 1)[1]), server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_slowloris_is_shrugged_off(tmp_path: Path) -> None:
    """300 clients send half a request each and wait: the server holds at most 64 of them, in no thread,
    answers a normal request meanwhile, and drops the slow ones (408 after the timeout, 503 when full)."""
    with small_server(tmp_path, timeout=10) as (port, server):
        _slowloris(port, server)


def _slowloris(port: int, server: Any) -> None:
    threads_before = threading.active_count()
    slow: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /img HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        deadline = time.monotonic() + 10
        while server.connections.accepted < 300 and time.monotonic() < deadline:
            assert server.connections.admitting() <= ADMITTING  # the flood waits in the kernel's backlog
            time.sleep(0.05)
        while server.connections.admitting() and time.monotonic() < deadline:
            time.sleep(0.05)  # the gate takes the last accepted ones (and drops the oldest for them)
        assert 0 < server.connections.held() <= 64
        assert threading.active_count() <= threads_before  # no thread per connection
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert get(conn, "/img", Range="bytes=0-99")[2] == DATA[:100]
        # answered while the slow ones are still held (they time out after 10 s)
        assert server.connections.held() >= 60
        conn.close()
        answers = set()
        for s in slow:
            answer = s.recv(100)  # 503 (dropped when full) or 408 (timed out); then the server closes
            answers.add(answer.split(b"\r\n")[0])
            assert s.recv(100) == b""
        assert answers == {b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 408 Request Timeout"}
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + 5
    while server.connections.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections.held() == 0


def test_keep_alive_pipelining_and_limits(tmp_path: Path) -> None:
    with small_server(tmp_path, timeout=1.5) as (port, server):
        _keep_alive_pipelining_and_limits(port, server)


def _keep_alive_pipelining_and_limits(port: int, server: Any) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # two requests in one packet: both answered, in order, on the same connection
        request = "GET /img HTTP/1.1\r\nHost: x\r\nRange: bytes={}\r\n\r\n"
        s.sendall((request.format("0-2") + request.format("3-5")).encode())
        f = s.makefile("rb")
        for first in (0, 3):
            status = f.readline()
            assert status == b"HTTP/1.1 206 Partial Content\r\n"
            headers: dict[str, str] = {}
            while (line := f.readline()) != b"\r\n":
                k, _, v = line.decode().partition(":")
                headers[k.lower()] = v.strip()
            assert f.read(int(headers["content-length"])) == DATA[first : first + 3]
        # idle longer than the timeout: the server closes the connection
        assert f.read(1) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /img HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /img HTTP/1.1\r\nHost: x\r\nRange: bytes=0-2\r\n")
        time.sleep(2.5)  # the head never ends: 408 after the timeout
        assert s.recv(100).startswith(b"HTTP/1.1 408 ")
    assert server.connections.held() == 0
