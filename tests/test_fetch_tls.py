"""HTTPS: a CA and a server certificate made by the test (openssl); bootkit serve-http serves TLS with them.

Verification succeeds with the CA given (--cacert), fails with a one-line TLSError for an unknown CA (the
system bundle, or another CA), and --insecure opts out for self-signed lab servers. Also through nginx.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import fault_server
from fetch_fixtures import fast_options, make_data, make_tls, nginx

from bootkit.fetch import HTTPSource, TLSError, download
from bootkit.host.httpserve import http_server

DATA = make_data(1024 * 1024 + 3, seed=31)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_url(tls: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("www")
    (root / "img").write_bytes(DATA)
    with http_server(str(root), certfile=str(tls["cert"]), keyfile=str(tls["key"])) as url:
        assert url.startswith("https://127.0.0.1:")
        yield url + "img"


def test_verified_with_cacert(https_url: str, tls: dict[str, Path], tmp_path: Path) -> None:
    options = fast_options(verify="pinned", sha256=SHA, cacert=str(tls["ca"]))
    result = download(https_url, str(tmp_path / "img"), options)
    assert result.sha256 == SHA
    assert (tmp_path / "img").read_bytes() == DATA


def test_unknown_ca_fails_with_one_line(https_url: str, tmp_path: Path) -> None:
    with pytest.raises(TLSError) as info:
        download(https_url, str(tmp_path / "img"), fast_options())
    message = str(info.value)
    assert message.startswith(f"{https_url}: TLS certificate verification failed: ")
    assert "self-signed certificate in certificate chain" in message or "unable to get local issuer" in message
    assert "--cacert" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_other_ca_fails(https_url: str, tls: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TLSError, match="TLS certificate verification failed"):
        download(https_url, str(tmp_path / "img"), fast_options(cacert=str(tls["other_ca"]), retries=5))
    assert list(tmp_path.iterdir()) == []


def test_insecure_opt_out(https_url: str, tmp_path: Path) -> None:
    download(https_url, str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA, insecure=True))
    assert (tmp_path / "img").read_bytes() == DATA


def test_https_proxy_is_honoured(
    https_url: str, tls: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fault_server() as (proxy_url, state):
        monkeypatch.setenv("https_proxy", proxy_url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        options = fast_options(verify="pinned", sha256=SHA, cacert=str(tls["ca"]))
        download(https_url, str(tmp_path / "img"), options)
        tunnels = [r for r in state.requests if r.method == "CONNECT"]
    assert (tmp_path / "img").read_bytes() == DATA
    port = https_url.split(":")[2].split("/")[0]
    assert [r.path for r in tunnels] == [f"127.0.0.1:{port}"]


def test_lazy_source_over_https(https_url: str, tls: dict[str, Path]) -> None:
    with HTTPSource(https_url, fast_options(cacert=str(tls["ca"])), chunk_size=65536) as source:
        assert source.pread(1000, 200_000) == DATA[1000:201_000]
    with pytest.raises(TLSError):
        HTTPSource(https_url, fast_options())


def test_cli_cacert(https_url: str, tls: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "img"
    cmd = [sys.executable, "-m", "bootkit", "fetch", https_url, "-o", str(out), "--sha256", SHA, "--retries", "1"]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1].startswith(f"error: {https_url}: TLS certificate verification failed")
    ok = subprocess.run([*cmd, "--cacert", str(tls["ca"])], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{SHA}  {out}\n"


def test_nginx_tls(tls: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "img").write_bytes(DATA)
    ssl = f"listen 127.0.0.1:{{port}} ssl; ssl_certificate {tls['cert']}; ssl_certificate_key {tls['key']};"
    with nginx(root, tmp_path / "nginx", tls=ssl) as url:
        https = url.replace("http://", "https://") + "/img"
        download(https, str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA, cacert=str(tls["ca"])))
        assert (tmp_path / "img").read_bytes() == DATA
        with pytest.raises(TLSError):
            download(https, str(tmp_path / "img2"), fast_options())
