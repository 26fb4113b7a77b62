"""Ram-mode downloads against nginx: a real server's Range, If-Range and ETag, not only our own.

Faults come from a TCP relay in front of nginx that cuts connections after N bytes (tests/faultserver.py),
so resumes and restarts are negotiated with nginx itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import DroppingRelay
from fetch_fixtures import fast_options, make_data, nginx

from bootkit.fetch import ChecksumMismatch, NotFound, download

SIZE = 4 * 1024 * 1024 + 77
DATA = make_data(SIZE, seed=21)
NEW_DATA = make_data(SIZE, seed=22)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "img").write_bytes(DATA)
    with nginx(root, tmp_path / "nginx") as url:
        yield url, root


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_download_and_sidecar(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    (root / "SHA256SUMS").write_text(f"{SHA}  img\n")
    out = tmp_path / "out"
    out.mkdir()
    result = download(f"{url}/img", str(out / "img"), fast_options(verify="sidecar"))
    assert result.sha256 == SHA
    assert (out / "img").read_bytes() == DATA
    assert leftovers(out) == ["img"]


def test_404(site: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = site
    with pytest.raises(NotFound, match=rf"^{url}/nothing: HTTP 404 Not Found$"):
        download(f"{url}/nothing", str(tmp_path / "x"), fast_options())
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


def test_resume_after_drops(site: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = site
    port = int(url.rsplit(":", 1)[1])
    with DroppingRelay(port, [300_000, 1_000_000, 2_500_000]) as relay:
        out = tmp_path / "img"
        download(f"http://127.0.0.1:{relay.port}/img", str(out), fast_options(verify="pinned", sha256=SHA))
        assert relay.connections == 4
    assert out.read_bytes() == DATA
    log = (tmp_path / "nginx" / "access.log").read_text().splitlines()
    # nginx answered the first request in full and each resume with 206 Partial Content
    assert [line.split('"')[2].split()[0] for line in log] == ["200", "206", "206", "206"]


def test_file_replaced_on_nginx_mid_download(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    port = int(url.rsplit(":", 1)[1])

    def replace(k: int) -> None:
        if k == 1:  # between the dropped first attempt and the resume
            tmp = root / "img.new"
            tmp.write_bytes(NEW_DATA)
            os.utime(tmp, (1_000_000_000, 1_000_000_000))  # another mtime: another ETag
            tmp.rename(root / "img")

    out = tmp_path / "img"
    with DroppingRelay(port, [1_000_000]) as relay:
        relay.before_connection = replace
        download(f"http://127.0.0.1:{relay.port}/img", str(out), fast_options())
    assert out.read_bytes() == NEW_DATA  # If-Range made nginx send the new file whole: no splice

    # with the old hash pinned, the same story ends in a loud failure and no file
    (root / "img").write_bytes(DATA)
    with DroppingRelay(port, [1_000_000]) as relay:
        relay.before_connection = replace
        relayed = f"http://127.0.0.1:{relay.port}/img"
        with pytest.raises(ChecksumMismatch):
            download(relayed, str(tmp_path / "img2"), fast_options(verify="pinned", sha256=SHA))
    assert not (tmp_path / "img2").exists() and not (tmp_path / "img2.part").exists()
