"""Chunk manifests (``bootkit manifest``) and the ``bootkit fetch`` command line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultState, fault_server
from fetch_fixtures import fast_options, make_data

from bootkit.errors import ConfigError, UsageError
from bootkit.fetch import Manifest

DATA = make_data(3 * 65536 + 100, seed=51)


def bootkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootkit", *args], capture_output=True, text=True, timeout=120)


def test_build_dump_parse(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(DATA)
    manifest = Manifest.build(str(image), 65536)
    assert (manifest.size, manifest.chunk_size, manifest.chunk_count) == (len(DATA), 65536, 4)
    assert manifest.sha256 == hashlib.sha256(DATA).hexdigest()
    assert manifest.chunks[3] == hashlib.sha256(DATA[3 * 65536 :]).digest()
    assert manifest.chunk_span(3) == (3 * 65536, 100)
    text = manifest.dumps().decode()
    assert text.splitlines()[:5] == [
        "bootkit-manifest 1",
        f"size {len(DATA)}",
        "chunk-size 65536",
        f"sha256 {manifest.sha256}",
        "chunks 4",
    ]
    digest = manifest.write(str(tmp_path / "m"))
    assert digest == hashlib.sha256((tmp_path / "m").read_bytes()).hexdigest() == manifest.digest
    assert Manifest.load(str(tmp_path / "m"), sha256=digest) == manifest
    assert manifest.check(1, DATA[65536 : 2 * 65536]) and not manifest.check(1, DATA[:65536])


def test_pinned_manifest_hash(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(DATA)
    data = Manifest.build(str(image), 65536).dumps()
    last_digit = data[-2:-1]
    tampered = data[:-2] + (b"0" if last_digit != b"0" else b"1") + b"\n"  # one chunk hash altered
    with pytest.raises(ConfigError, match=r"^m: manifest SHA-256 is [0-9a-f]{64}, but " + "a" * 64 + " is pinned$"):
        Manifest.parse(data, "m", sha256="a" * 64)
    with pytest.raises(ConfigError, match="is pinned"):
        Manifest.parse(tampered, "m", sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"hello\n", "not a bootkit manifest"),
        (b"bootkit-manifest 1\nsize 10\n", "line 3: expected 'chunk-size VALUE'"),
        (b"bootkit-manifest 1\nsize 10\nchunk-size 4096\nsha256 " + b"a" * 64 + b"\nchunks 1\n", "0 chunk lines"),
        (b"bootkit-manifest 1\nsize 10\nchunk-size 4096\nsha256 " + b"a" * 64 + b"\nchunks 2\n", "do not cover"),
        (b"bootkit-manifest 1\nsize 10\nchunk-size 1000\nsha256 " + b"a" * 64 + b"\nchunks 1\n", "multiple of 4096"),
        (b"bootkit-manifest 1\nsize 10\nchunk-size 4096\nsha256 " + b"a" * 64 + b"\nchunks 1\n" + b"A" * 64 + b"\n",
         "line 6: not 64 lowercase hex"),
        (b"bootkit-manifest 1\nsize 10\nchunk-size 4096\nsha256 " + b"a" * 64 + b"\nchunks 1\n" + b"a" * 64,
         "does not end with a newline"),
    ],
)
def test_malformed_manifests(text: bytes, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Manifest.parse(text, "m")


def test_manifest_over_http(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(DATA)
    manifest = Manifest.build(str(image), 65536)
    with fault_server() as (url, state):
        state.files["/img.manifest"] = manifest.dumps()
        assert Manifest.load(f"{url}/img.manifest", fast_options(), sha256=manifest.digest) == manifest


def test_cli_manifest(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(DATA)
    result = bootkit("manifest", str(image), "--chunk-size", "64K")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "img.manifest"
    assert result.stdout == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {out}\n"
    assert Manifest.load(str(out)).chunk_size == 65536
    bad = bootkit("manifest", str(image), "--chunk-size", "1000")
    assert bad.returncode == 2 and "chunk size 1000 must be a multiple of 4096" in bad.stderr


# -- bootkit fetch --


@pytest.fixture
def site() -> Iterator[tuple[str, FaultState]]:
    with fault_server() as (url, state):
        state.files["/img"] = DATA
        yield url, state


def test_cli_fetch(site: tuple[str, FaultState], tmp_path: Path) -> None:
    url, _ = site
    sha = hashlib.sha256(DATA).hexdigest()
    out = tmp_path / "img"
    ok = bootkit("fetch", f"{url}/img", "-o", str(out), "--sha256", sha, "--progress-interval", "0.01")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{sha}  {out}\n"
    assert out.read_bytes() == DATA
    assert "fetch: downloading" in ok.stderr and "SHA-256 verified" in ok.stderr


def test_cli_fetch_failures(site: tuple[str, FaultState], tmp_path: Path) -> None:
    url, _ = site
    out = tmp_path / "img"
    wrong = bootkit("fetch", f"{url}/img", "-o", str(out), "--sha256", "0" * 64)
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1].startswith(f"error: {url}/img: SHA-256 mismatch: got ")
    missing = bootkit("fetch", f"{url}/nope", "-o", str(out))
    assert (missing.returncode, missing.stderr.splitlines()[-1]) == (1, f"error: {url}/nope: HTTP 404 Not Found")
    bad = bootkit("fetch", f"{url}/img", "-o", str(out), "--sha256", "xyz")
    assert (bad.returncode, bad.stderr.strip()) == (2, "error: sha256='xyz': not 64 hexadecimal digits")
    scheme = bootkit("fetch", "ftp://host/img", "-o", str(out))
    assert (scheme.returncode, scheme.stderr.strip()) == (
        2,
        "error: ftp://host/img: only http:// and https:// URLs can be fetched",
    )
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_bootkit_errors() -> None:
    with pytest.raises(UsageError):
        Manifest.build("/dev/null", 100)
