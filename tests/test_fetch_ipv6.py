"""IPv6 literal URLs end to end on the host: ``http://[::1]:PORT/...`` for downloads (pinned and sidecar), lazy
mode with a manifest, a redirect from an IPv4 server to an IPv6 one, backing files fetched next to the image by
the boot code's ``prepare()``, ``bootkit fetch`` against ``bootkit serve-http --bind [::1]:0``, and
``bootkit pxe-config`` with an IPv6 base URL. Real servers on ::1; skipped when the host has IPv6 disabled.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fetch_fixtures import fast_options, make_data

# a fixture: the images tests/test_boot_prepare.py serves (a layered GPT disk: ESP + root), as layered_images
from test_boot_prepare import images as layered_images  # noqa: F401

from bootkit.boot.cmdline import parse_cmdline
from bootkit.boot.serve import prepare
from bootkit.boot.stages import Stages
from bootkit.errors import UsageError
from bootkit.fetch import HTTPSource, Manifest, download
from bootkit.fetch.client import Pins, get_small, parse_url
from bootkit.fetch.errors import GaveUp, RedirectError
from bootkit.host.httpserve import http_server


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="IPv6 is disabled on this host (cannot bind ::1)")

DATA = make_data(3 * 1024 * 1024 + 17, seed=6)
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """img.bin, its ``.sha256`` sidecar and its manifest (with the manifest's own sidecar)."""
    root = tmp_path_factory.mktemp("v6root")
    (root / "img.bin").write_bytes(DATA)
    (root / "img.bin.sha256").write_text(f"{SHA}  img.bin\n")
    digest = Manifest.build(str(root / "img.bin"), CHUNK).write(str(root / "img.bin.manifest"))
    (root / "img.bin.manifest.sha256").write_text(f"{digest}  img.bin.manifest\n")
    return root


@pytest.fixture(scope="module")
def v6_url(served: Path) -> Iterator[str]:
    with http_server(str(served), "[::1]:0") as url:
        yield url


class _Recorder(http.server.ThreadingHTTPServer):
    """An IPv6 server that answers every GET with a redirect to ``location`` (or a small body) and keeps the
    ``Host`` headers it was sent."""

    address_family = socket.AF_INET6

    def __init__(self, address: tuple[str, int], location: str | None = None) -> None:
        if ":" not in address[0]:
            self.address_family = socket.AF_INET
        self.location = location
        self.hosts: list[str | None] = []
        super().__init__(address, _RecorderHandler)


class _RecorderHandler(http.server.BaseHTTPRequestHandler):
    server: _Recorder

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host"))
        if self.server.location is not None:
            self.send_response(302)
            self.send_header("Location", self.server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@contextmanager
def recorder(host: str, location: str | None = None) -> Iterator[_Recorder]:
    server = _Recorder((host, 0), location)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- the client --------------------------------------------------------------------------------------


def test_download_pinned_and_sidecar(v6_url: str, tmp_path: Path) -> None:
    assert v6_url.startswith("http://[::1]:")
    pinned = download(v6_url + "img.bin", str(tmp_path / "a"), fast_options(verify="pinned", sha256=SHA))
    assert (pinned.sha256, pinned.url, (tmp_path / "a").read_bytes()) == (SHA, v6_url + "img.bin", DATA)
    # the sidecar URL is built next to the image's: http://[::1]:P/img.bin.sha256
    sidecar = download(v6_url + "img.bin", str(tmp_path / "b"), fast_options(verify="sidecar"))
    assert sidecar.sha256 == SHA and (tmp_path / "b").read_bytes() == DATA


def test_lazy_mode_with_a_manifest(v6_url: str) -> None:
    manifest = Manifest.load(v6_url + "img.bin.manifest", fast_options())
    with HTTPSource(v6_url + "img.bin", fast_options(), manifest=manifest) as source:
        assert source.pread(CHUNK - 5, 3 * CHUNK) == DATA[CHUNK - 5 : 4 * CHUNK - 5]
        assert source.pread(len(DATA) - 100, 100) == DATA[-100:]


def test_host_header_carries_the_brackets() -> None:
    with recorder("::1") as server:
        port = server.server_address[1]
        assert get_small(f"http://[::1]:{port}/x", fast_options()) == b"ok"
        assert server.hosts == [f"[::1]:{port}"]


def test_redirect_from_ipv4_to_ipv6(v6_url: str, tmp_path: Path) -> None:
    with recorder("127.0.0.1", location=v6_url + "img.bin") as v4:
        url = f"http://127.0.0.1:{v4.server_address[1]}/img.bin"
        result = download(url, str(tmp_path / "img"), fast_options(verify="pinned", sha256=SHA))
        assert result.sha256 == SHA and (tmp_path / "img").read_bytes() == DATA
        # lazy mode follows the same redirect and then reads ranges from the IPv6 server
        with HTTPSource(url, fast_options()) as source:
            assert source.pread(10, 20) == DATA[10:30]
    # a relative redirect on the IPv6 server stays on it, brackets and all
    with recorder("::1", location="/elsewhere") as v6:
        port = v6.server_address[1]
        with pytest.raises(RedirectError) as e:
            get_small(f"http://[::1]:{port}/x", fast_options(retries=0))
        assert f"redirect loop: http://[::1]:{port}/elsewhere -> http://[::1]:{port}/elsewhere" in str(e.value)
        assert v6.hosts and set(v6.hosts) == {f"[::1]:{port}"}


def test_errors_name_the_url_with_brackets(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        url = f"http://[::1]:{port}/img.bin"
        with pytest.raises(GaveUp) as e:
            download(url, str(tmp_path / "x"), fast_options(retries=0))
    assert str(e.value).startswith(f"{url}: ") and "\n" not in str(e.value)
    for bad, why in [
        ("http://[::1/img.bin", "malformed IPv6 literal"),
        ("http://[::1]x/img.bin", "malformed IPv6 literal"),
        ("http://::1/img.bin", "an IPv6 address must be in brackets"),
        ("http://[fe80::1%eth0]/img.bin", "zone id"),
    ]:
        with pytest.raises(UsageError) as u:
            download(bad, str(tmp_path / "x"), fast_options())
        assert str(u.value).startswith(f"{bad}: ") and why in str(u.value)


def test_zone_id_is_looked_up_but_not_sent() -> None:
    """``%25lo`` reaches getaddrinfo as the scope of a link-local address; the Host header leaves it out."""
    url = parse_url("http://[fe80::1%25lo]:8080/img.bin")
    assert (url.host, url.port, url.host_field()) == ("fe80::1%lo", 8080, "[fe80::1]:8080")
    scope = Pins().addresses(url.host, url.port)[0][4][3]
    assert scope == socket.if_nametoindex("lo")
    assert parse_url("https://[2001:db8::1]/x").host_field() == "[2001:db8::1]"


# -- the boot code ---------------------------------------------------------------------------------------


def test_prepare_fetches_the_backing_file_next_to_an_ipv6_image(layered_images: Path, tmp_path: Path) -> None:  # noqa: F811
    """``root=qcow2:http://[::1]:P/top.qcow2``: base.qcow2 comes from ``http://[::1]:P/base.qcow2`` and the
    chain serves what qemu-img reads (images from tests/test_boot_prepare.py: GPT, ESP + root)."""
    images = layered_images
    sums = {name: hashlib.sha256((images / name).read_bytes()).hexdigest() for name in ("top.qcow2", "base.qcow2")}
    with http_server(str(images), "[::1]:0") as url:
        cfg = parse_cmdline(f"root=qcow2:{url}top.qcow2 rd.qcow2.sha256={sums['top.qcow2']} "
                            f"rd.qcow2.sha256.base.qcow2={sums['base.qcow2']} rd.qcow2.retries=0")  # fmt: skip
        assert cfg is not None and cfg.url == f"{url}top.qcow2"
        ready = prepare(cfg, Stages(), str(tmp_path / "images"))
        try:
            assert ready.fetcher.verified == {f"{url}top.qcow2": sums["top.qcow2"],
                                              f"{url}base.qcow2": sums["base.qcow2"]}  # fmt: skip
            expected = (images / "expected.raw").read_bytes()
            assert ready.image.pread(0, len(expected)) == expected
            assert ready.root.number == 2
        finally:
            ready.close()
        # lazy mode: the backing file's manifest URL is built next to it too
        lazy = parse_cmdline(f"root=qcow2:{url}top.qcow2 rd.qcow2.mode=lazy rd.qcow2.verify=none rd.qcow2.retries=0")
        assert lazy is not None
        ready = prepare(lazy, Stages(), str(tmp_path / "lazy"))
        try:
            assert set(ready.fetcher.verified) == {f"{url}top.qcow2", f"{url}base.qcow2"}
            assert ready.image.pread(10 << 20, 4096) == expected[10 << 20 : (10 << 20) + 4096]
        finally:
            ready.close()


# -- the command line ------------------------------------------------------------------------------------


def test_cli_fetch_against_serve_http_on_ipv6(served: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bootkit", "serve-http", str(served), "--bind", "[::1]:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://[::1]:") and url.endswith("/")
        out = tmp_path / "img"
        fetched = subprocess.run(
            [sys.executable, "-m", "bootkit", "fetch", url + "img.bin", "-o", str(out), "--verify", "sidecar"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert SHA in fetched.stdout and out.read_bytes() == DATA
        bad = subprocess.run(
            [sys.executable, "-m", "bootkit", "fetch", url.replace("]", "") + "img.bin", "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: http://[::1:")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _pxe_config_ipv6(tmp_path: Path, base: str, sha: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "bootkit", "pxe-config",
            "-o", str(tmp_path),
            "--no-grub-images",
            "--base-url", base + "/",
            "--kernel", base + "/vmlinuz",
            "--initrd", base + "/initrd.img",
            "--image", base + "/disk.qcow2",
            "--sha256", sha,
            "--dhcp-mode", "proxy",
            "--dhcp-subnet", "10.0.0.0",
            *extra,
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip


def test_pxe_config_keeps_ipv6_base_url_brackets(tmp_path: Path) -> None:
    """iPXE lines as pxe-config writes them for an IPv6 literal base URL (golden lines); GRUB 2.06 has no
    bracket form for ``(http,HOST:PORT)``, so a description that includes GRUB is refused with one line."""
    base = "http://[2001:db8::1]:8080/boot"
    sha = "1" * 64
    refused = _pxe_config_ipv6(tmp_path / "both", base, sha)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: --kernel: {base}/vmlinuz: GRUB 2.06 cannot fetch from an IPv6 literal host; use a host name, "
        "or leave grub out of bootloaders (iPXE fetches from IPv6 literals)"
    ]
    run = _pxe_config_ipv6(tmp_path, base, sha, "--bootloaders", "ipxe", "--ip", "auto6")
    assert run.returncode == 0, run.stderr
    args = f"root=qcow2:{base}/disk.qcow2 rd.qcow2.sha256={sha} rd.qcow2.overlay=tmpfs rw ip=auto6 rd.neednet=1"
    ipxe = (tmp_path / "tftp" / "boot.ipxe").read_text().splitlines()
    assert f"kernel {base}/vmlinuz initrd=initrd.img {args} || goto failed" in ipxe
    assert f"initrd --name initrd.img {base}/initrd.img || goto failed" in ipxe
    assert not (tmp_path / "tftp" / "boot" / "grub").exists()
    # the initramfs reads back what the loader was given
    cfg = parse_cmdline(args)
    assert cfg is not None and cfg.url == f"{base}/disk.qcow2"
    # dnsmasq chains boot.ipxe over TFTP: no URL there to mangle
    assert "2001:db8" not in (tmp_path / "dnsmasq.conf").read_text()


def test_serve_http_bind_failure_is_one_line() -> None:
    """An address this host does not have: one line naming --bind, not a traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "bootkit", "serve-http", ".", "--bind", "[2001:db8::1]:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "error: --bind [2001:db8::1]:0: Cannot assign requested address"


_ZONE_SCRIPT = """
import hashlib, os, sys
from bootkit.fetch import download
from bootkit.fetch.options import FetchOptions
from bootkit.host.httpserve import http_server

root = sys.argv[1]
data = open(os.path.join(root, "img.bin"), "rb").read()
with http_server(root, "[fe80::1%lo]:0") as url:
    assert url.startswith("http://[fe80::1%25lo]:"), url
    options = FetchOptions(verify="pinned", sha256=hashlib.sha256(data).hexdigest(), retries=0)
    result = download(url + "img.bin", os.path.join(root, "copy"), options)
    assert open(result.path, "rb").read() == data
    print(url)
"""


def test_link_local_with_a_zone_id_in_a_network_namespace(served: Path, tmp_path: Path) -> None:
    """``--bind [fe80::1%lo]:0`` serves on a link-local address and prints ``http://[fe80::1%25lo]:P/``; the
    client connects to it through the zone. In a network namespace of its own, where lo gets fe80::1."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip to give lo a link-local address in a network namespace")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(served / "img.bin", root / "img.bin")
    setup = 'ip link set lo up && ip addr add fe80::1/64 dev lo nodad && exec "$0" -c "$1" "$2"'
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        ["unshare", "-n", "sh", "-c", setup, sys.executable, _ZONE_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if run.returncode != 0 and "unshare failed" in run.stderr:
        pytest.skip(f"cannot make a network namespace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("http://[fe80::1%25lo]:")
