"""docs/deploy-nginx.md's origin and rack-cache configurations, run as written, with bootkit's lazy fetch code.

The blocks marked ``<!-- tested: ... -->`` are taken from the document; only the listen address and the paths
are changed (each change is asserted to apply, so the document cannot drift from what is tested). Two clients
read the whole image through the rack cache; the origin's access log must show one copy of the image sent.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fetch_fixtures import NGINX_HEAD, fast_options, free_port, make_data, wait_for_port

from bootkit.fetch import HTTPSource, Manifest

DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy-nginx.md"
SLICE = 1 << 20
SIZE = 6 * SLICE + 12345
DATA = make_data(SIZE, seed=41)


def doc_block(name: str) -> str:
    """The nginx block of docs/deploy-nginx.md marked ``<!-- tested: NAME -->``."""
    m = re.search(rf"<!-- tested: {name} -->\n```nginx\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"no tested block {name!r} in {DOC}"
    return m.group(1)


def substitute(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert old in text, f"{old!r} is not in the documented configuration"
        text = text.replace(old, new)
    return text


@contextmanager
def nginx_with(prefix: Path, body: str, port: int) -> Iterator[str]:
    """nginx in the foreground with ``body`` inside ``http { }``, listening on ``port``; stopped by PID."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.skip("nginx is not installed (Debian package nginx-light)")
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read pytest's 0700 temp directories
    conf.write_text(NGINX_HEAD.format(user=user, prefix=prefix, body=body))
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        if not wait_for_port(port, proc):
            _, err = proc.communicate(timeout=30)
            raise RuntimeError(f"nginx did not start: {err.decode(errors='replace')}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def image_bytes_sent(log: Path) -> tuple[int, int]:
    """(requests, body bytes) for the image in a combined-format access log."""
    requests = sent = 0
    for line in log.read_text().splitlines():
        if "/images/disk.qcow2 " in line:
            requests += 1
            sent += int(line.split('"')[2].split()[1])
    return requests, sent


def read_through(url: str, manifest: Manifest) -> None:
    with HTTPSource(url, fast_options(), manifest=manifest) as source:
        got = b"".join(source.pread(offset, 256 * 1024) for offset in range(0, source.size, 256 * 1024))
    assert got == DATA


def test_rack_cache_serves_the_second_client(tmp_path: Path) -> None:
    www = tmp_path / "www" / "images"
    www.mkdir(parents=True)
    (www / "disk.qcow2").write_bytes(DATA)
    manifest = Manifest.build(str(www / "disk.qcow2"))
    assert manifest.chunk_size == SLICE
    origin_port, cache_port = free_port(), free_port()
    origin_conf = substitute(doc_block("origin"), {
        "listen 80;": f"listen 127.0.0.1:{origin_port};",
        "/srv/bootkit": str(tmp_path / "www"),
    })  # fmt: skip
    cache_conf = substitute(doc_block("rack-cache"), {
        "listen 80;": f"listen 127.0.0.1:{cache_port};",
        "origin.example:80": f"127.0.0.1:{origin_port}",
        "/var/cache/nginx/bootkit": str(tmp_path / "cache" / "store"),
        "/var/log/nginx/": str(tmp_path / "cache") + "/",
    })  # fmt: skip
    with (
        nginx_with(tmp_path / "origin", origin_conf, origin_port) as origin,
        nginx_with(tmp_path / "cache", cache_conf, cache_port) as cache,
    ):
        # the origin marks the image immutable, for any cache on the way
        with HTTPSource(f"{origin}/images/disk.qcow2", fast_options(), manifest=manifest) as direct:
            assert direct.size == SIZE
        origin_log = tmp_path / "origin" / "access.log"
        before = image_bytes_sent(origin_log)
        read_through(f"{cache}/images/disk.qcow2", manifest)
        first = image_bytes_sent(origin_log)
        cache_log = tmp_path / "cache" / "bootkit-cache.log"
        first_lines = len(cache_log.read_text().splitlines())
        read_through(f"{cache}/images/disk.qcow2", manifest)
        second = image_bytes_sent(origin_log)
    first_bytes = first[1] - before[1]
    # one copy: every slice once (the slices are whole MiB; the last one is short)
    assert SIZE <= first_bytes <= SIZE + 4096, first_bytes
    assert second == first, "the second client's reads reached the origin"
    statuses = [re.search(r"cache=(\S*)", line).group(1) for line in cache_log.read_text().splitlines()]  # type: ignore[union-attr]
    assert "MISS" in statuses[:first_lines]
    assert len(statuses) > first_lines and set(statuses[first_lines:]) == {"HIT"}, statuses


def test_origin_says_immutable(tmp_path: Path) -> None:
    www = tmp_path / "www" / "images"
    www.mkdir(parents=True)
    (www / "disk.qcow2").write_bytes(DATA[:1000])
    port = free_port()
    conf = substitute(doc_block("origin"), {"listen 80;": f"listen 127.0.0.1:{port};",
                                            "/srv/bootkit": str(tmp_path / "www")})  # fmt: skip
    with nginx_with(tmp_path / "origin", conf, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/images/disk.qcow2", headers={"Range": "bytes=10-19"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
    assert response.status == 206 and body == DATA[10:20]
    assert response.getheader("Cache-Control") == "public, max-age=31536000, immutable"
    assert response.getheader("ETag")
