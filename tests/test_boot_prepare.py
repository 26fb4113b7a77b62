"""The boot code's first half on the host: fetch and verify over HTTP, open the chain, choose the root.

``bootkit.boot.serve.prepare`` is exactly what the initramfs daemon runs before it attaches /dev/nbd0 (which
needs a kernel NBD driver, so the attach is left to tests/test_boot_qemu.py). Images are made by qemu-img,
qemu-io and sfdisk and served by bootkit's HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from boot_fixtures import DPS_ROOT_X86_64, ESP_TYPE, Part, make_disk, make_ext4, make_vfat, need

from bootkit.boot.cmdline import BootConfig, parse_cmdline
from bootkit.boot.partitions import RootNotFound
from bootkit.boot.serve import Prepared, prepare
from bootkit.boot.stages import BootFailed, Stages
from bootkit.errors import ConfigError, FetchError, ImageError
from bootkit.host.httpserve import http_server
from bootkit.record import replace


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.qcow2 (GPT: ESP + DPS root), top.qcow2 on it with a write, a snapshot; their sidecars."""
    need("qemu-img", "qemu-io", "sfdisk", "mke2fs", "mkfs.vfat")
    d = tmp_path_factory.mktemp("served")
    esp = make_vfat(d / "esp.vfat", 4, label="EFI")
    root = make_ext4(d / "root.ext4", 8, label="layered")
    raw = make_disk(d / "base.raw", [Part(esp, ESP_TYPE), Part(root, DPS_ROOT_X86_64)])
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(d / "base.qcow2"))
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 10M 64k", str(d / "top.qcow2")], check=True, capture_output=True)
    qemu_img("snapshot", "-c", "before", str(d / "top.qcow2"))
    subprocess.run(["qemu-io", "-c", "write -P 0xa5 10M 4k", str(d / "top.qcow2")], check=True, capture_output=True)
    # a backing file whose name needs %-encoding in a URL ('+'), and an image on it
    shutil.copy(d / "base.qcow2", d / "base+v2.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base+v2.qcow2", "-F", "qcow2", str(d / "plus.qcow2"))
    for name in ("base.qcow2", "top.qcow2", "base+v2.qcow2", "plus.qcow2"):
        (d / f"{name}.sha256").write_text(f"{sha256(d / name)}  {name}\n")
    qemu_img("convert", "-O", "raw", str(d / "top.qcow2"), str(d / "expected.raw"))
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=before", str(d / "top.qcow2"), str(d / "before.raw"))
    for f in (esp, root, raw):
        f.unlink()
    return d


@pytest.fixture(scope="module")
def base_url(images: Path) -> Iterator[str]:
    with http_server(str(images)) as url:
        yield url


def config(text: str) -> BootConfig:
    cfg = parse_cmdline(text + " rd.qcow2.retries=0 rd.qcow2.timeout=10")
    assert cfg is not None
    return cfg


def run_prepare(cfg: BootConfig, tmp_path: Path) -> Prepared:
    return prepare(cfg, Stages(), str(tmp_path / "images"))


def assert_serves(ready: Prepared, expected: Path) -> None:
    data = expected.read_bytes()
    assert ready.image.virtual_size == len(data)
    assert ready.image.pread(0, len(data)) == data


def test_layered_image_both_pinned(images: Path, base_url: str, tmp_path: Path) -> None:
    cfg = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.sha256={sha256(images / 'top.qcow2')} "
                 f"rd.qcow2.sha256.base.qcow2={sha256(images / 'base.qcow2')}")  # fmt: skip
    ready = run_prepare(cfg, tmp_path)
    try:
        assert_serves(ready, images / "expected.raw")
        assert [Path(s.name).name for s in ready.image.chain()] == ["top.qcow2", "base.qcow2"]
        assert (ready.root.number, ready.root.fs and ready.root.fs.label) == (2, "layered")
        assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["base.qcow2", "top.qcow2"]
        assert ready.fetcher.verified == {f"{base_url}top.qcow2": sha256(images / "top.qcow2"),
                                          f"{base_url}base.qcow2": sha256(images / "base.qcow2")}  # fmt: skip
    finally:
        ready.close()


def test_layered_image_sidecar(images: Path, base_url: str, tmp_path: Path) -> None:
    ready = run_prepare(config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.verify=sidecar"), tmp_path)
    try:
        assert_serves(ready, images / "expected.raw")
    finally:
        ready.close()


def test_pinned_top_needs_pinned_backing(images: Path, base_url: str, tmp_path: Path) -> None:
    cfg = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.sha256={sha256(images / 'top.qcow2')}")
    with pytest.raises(ConfigError, match=r"backing file base\.qcow2 has no pinned hash: add rd\.qcow2\.sha256\.base"):
        run_prepare(cfg, tmp_path)


def test_wrong_backing_hash(images: Path, base_url: str, tmp_path: Path) -> None:
    cfg = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.sha256={sha256(images / 'top.qcow2')} "
                 f"rd.qcow2.sha256.base.qcow2={'0' * 64}")  # fmt: skip
    with pytest.raises(FetchError, match=r"base\.qcow2: SHA-256 mismatch"):
        run_prepare(cfg, tmp_path)
    assert not (tmp_path / "images" / "base.qcow2").exists()


def test_snapshot(images: Path, base_url: str, tmp_path: Path) -> None:
    ready = run_prepare(config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.verify=sidecar rd.qcow2.snapshot=before"),
                        tmp_path)  # fmt: skip
    try:
        assert_serves(ready, images / "before.raw")
    finally:
        ready.close()


@pytest.fixture(scope="module")
def manifests(images: Path) -> dict[str, str]:
    """``NAME.manifest`` and its sidecar for top.qcow2 and base.qcow2; the manifests' hashes by image name."""
    from bootkit.fetch import Manifest

    pins = {}
    for name in ("top.qcow2", "base.qcow2"):
        pins[name] = Manifest.build(str(images / name), 64 * 1024).write(str(images / f"{name}.manifest"))
        (images / f"{name}.manifest.sha256").write_text(f"{pins[name]}  {name}.manifest\n")
    return pins


def test_lazy_with_pinned_manifests(images: Path, base_url: str, tmp_path: Path, manifests: dict[str, str]) -> None:
    pins = manifests
    cfg = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.mode=lazy rd.qcow2.manifest-sha256={pins['top.qcow2']} "
                 f"rd.qcow2.sha256.base.qcow2.manifest={pins['base.qcow2']}")  # fmt: skip
    ready = run_prepare(cfg, tmp_path)
    try:
        assert_serves(ready, images / "expected.raw")
        assert not (tmp_path / "images").exists()  # nothing was downloaded whole
    finally:
        ready.close()
    bad = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.mode=lazy rd.qcow2.manifest-sha256={'1' * 64}")
    pinned_wrong = rf"top\.qcow2\.manifest: manifest SHA-256 is [0-9a-f]{{64}}, but {'1' * 64} is pinned"
    with pytest.raises(ConfigError, match=pinned_wrong):
        run_prepare(bad, tmp_path)


def test_backing_file_outside_the_url_directory(images: Path, base_url: str, tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-u", "-b", "../etc/base.qcow2", "-F", "qcow2", str(images / "evil.qcow2"), "64M")
    with pytest.raises(ImageError, match=r"backing file '\.\./etc/base\.qcow2' is not a plain file name"):
        run_prepare(config(f"root=qcow2:{base_url}evil.qcow2 rd.qcow2.verify=none"), tmp_path)


def test_no_root_filesystem(images: Path, base_url: str, tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(images / "blank.qcow2"), "16M")
    with pytest.raises(RootNotFound, match="no partition table and no filesystem on the disk"):
        run_prepare(config(f"root=qcow2:{base_url}blank.qcow2 rd.qcow2.verify=none"), tmp_path)


def test_not_found(base_url: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"nosuch\.qcow2.*404"):
        run_prepare(config(f"root=qcow2:{base_url}nosuch.qcow2 rd.qcow2.verify=none"), tmp_path)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    need("openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    cmd = [
        "openssl", "req", "-x509",
        "-newkey", "rsa:2048",
        "-nodes",
        "-days", "2",
        "-subj", "/CN=bootkit-test",
        "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key),
        "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return cert, key


def test_https_with_cacert_and_insecure(images: Path, tls_cert: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = tls_cert
    with http_server(str(images), certfile=str(cert), keyfile=str(key)) as url:
        assert url.startswith("https://")
        base = f"root=qcow2:{url}base.qcow2 rd.qcow2.sha256={sha256(images / 'base.qcow2')}"
        ready = run_prepare(config(f"{base} rd.qcow2.cacert={cert}"), tmp_path / "a")
        ready.close()
        ready = run_prepare(config(f"{base} rd.qcow2.insecure"), tmp_path / "b")
        ready.close()
        # the system's CA bundle does not know the test CA
        with pytest.raises(FetchError, match=r"base\.qcow2: TLS certificate verification failed: self-signed"):
            run_prepare(config(base), tmp_path / "c")


# -- pins on backing files: looked up by the decoded name, checked in every mode, none left unmatched ------


def test_pinned_backing_file_whose_name_needs_encoding(images: Path, base_url: str, tmp_path: Path) -> None:
    """``base+v2.qcow2`` is fetched as ``base%2Bv2.qcow2``; its pin names it as the image does."""
    cfg = config(f"root=qcow2:{base_url}plus.qcow2 rd.qcow2.sha256={sha256(images / 'plus.qcow2')} "
                 f"rd.qcow2.sha256.base+v2.qcow2={sha256(images / 'base+v2.qcow2')}")  # fmt: skip
    ready = run_prepare(cfg, tmp_path)
    try:
        assert ready.fetcher.verified[f"{base_url}base%2Bv2.qcow2"] == sha256(images / "base+v2.qcow2")
        assert (ready.root.number, ready.root.fs and ready.root.fs.label) == (2, "layered")
    finally:
        ready.close()


def test_wrong_pin_is_not_replaced_by_the_sidecar(images: Path, base_url: str, tmp_path: Path) -> None:
    cfg = config(f"root=qcow2:{base_url}plus.qcow2 rd.qcow2.verify=sidecar rd.qcow2.sha256.base+v2.qcow2={'0' * 64}")
    with pytest.raises(FetchError, match=r"base%2Bv2\.qcow2: SHA-256 mismatch"):
        run_prepare(cfg, tmp_path)


def test_unpinnable_backing_name_is_named(images: Path, base_url: str, tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-u", "-b", "base v2.qcow2", "-F", "qcow2", str(images / "space.qcow2"), "64M")
    cfg = config(f"root=qcow2:{base_url}space.qcow2 rd.qcow2.sha256={sha256(images / 'space.qcow2')}")
    with pytest.raises(ConfigError, match=r"backing file 'base v2\.qcow2' has no pinned hash, and "
                                          r"rd\.qcow2\.sha256\.<file> cannot name it"):  # fmt: skip
        run_prepare(cfg, tmp_path)


def test_wrong_backing_pin_fails_in_lazy_mode(images: Path, base_url: str, tmp_path: Path,
                                              manifests: dict[str, str]) -> None:  # fmt: skip
    """Lazy mode checks chunks against the manifest; a pin of the file itself must match the manifest's
    whole-image hash (before, it was ignored while the console said 'verify pinned')."""
    cfg = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.mode=lazy "
                 f"rd.qcow2.manifest-sha256={manifests['top.qcow2']} "
                 f"rd.qcow2.sha256.base.qcow2.manifest={manifests['base.qcow2']} "
                 f"rd.qcow2.sha256.base.qcow2={'0' * 64}")  # fmt: skip
    wrong = (rf"base\.qcow2\.manifest: describes an image with sha256 {sha256(images / 'base.qcow2')}, "
             rf"rd\.qcow2\.sha256\.base\.qcow2 pins 0{{64}}$")  # fmt: skip
    with pytest.raises(BootFailed, match=wrong):
        run_prepare(cfg, tmp_path)
    right = cfg.backing_sha256 | {"base.qcow2": sha256(images / "base.qcow2")}
    ready = run_prepare(replace(cfg, backing_sha256=right), tmp_path)
    try:
        assert_serves(ready, images / "expected.raw")
    finally:
        ready.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("rd.qcow2.verify=sidecar rd.qcow2.sha256.bsae.qcow2=" + "1" * 64,
         r"rd\.qcow2\.sha256\.bsae\.qcow2: matches no file bootkit fetched \(the image's chain is "
         r"top\.qcow2 <- base\.qcow2\)"),
        ("rd.qcow2.verify=sidecar rd.qcow2.sha256.top.qcow2=" + "1" * 64,
         r"rd\.qcow2\.sha256\.top\.qcow2: matches no file bootkit fetched \(that is the image itself, whose "
         r"hash is pinned with rd\.qcow2\.sha256=\)"),
        ("rd.qcow2.verify=sidecar rd.qcow2.sha256.base.qcow2.manifest=" + "1" * 64,
         r"rd\.qcow2\.sha256\.base\.qcow2\.manifest: matches no file bootkit fetched \(manifests are only read "
         r"with rd\.qcow2\.mode=lazy or stream\)"),
    ],
)  # fmt: skip
def test_pin_that_matches_nothing(images: Path, base_url: str, tmp_path: Path, options: str, message: str) -> None:
    """A mistyped pin would otherwise leave the file it meant to pin trusted on the server's word."""
    with pytest.raises(ConfigError, match=message):
        run_prepare(config(f"root=qcow2:{base_url}top.qcow2 {options}"), tmp_path)


# -- honest integrity: a hash from the image's own server over an unauthenticated channel -----------------


@pytest.fixture
def console() -> Iterator[list[str]]:
    """The boot code's console lines (the ``bootkit`` logger), as the initramfs prints them."""
    from bootkit.log import ConsoleFormatter, log

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(ConsoleFormatter("bootkit: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


SIDECAR_WARNING = (
    r"^bootkit: \[ *\d+\.\d\d\] fetch: WARNING: hashes fetched over {channel} catch corruption, not an "
    r"attacker who can replace image and hash together: pin rd\.qcow2\.{pin} on the command line, or use "
    r"https with a verified certificate$"
)


def warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if "WARNING" in line]


@pytest.mark.parametrize("mode", ["ram", "lazy"])
def test_sidecar_over_http_warns_once(images: Path, base_url: str, tmp_path: Path, console: list[str],
                                      manifests: dict[str, str], mode: str) -> None:  # fmt: skip
    ready = run_prepare(config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.verify=sidecar rd.qcow2.mode={mode}"),
                        tmp_path)  # fmt: skip
    ready.close()
    [line] = warnings(console)
    pin = "manifest-sha256" if mode == "lazy" else "sha256"
    assert re.match(SIDECAR_WARNING.format(channel="http://", pin=pin), line), line


def test_pinned_over_http_does_not_warn(images: Path, base_url: str, tmp_path: Path, console: list[str]) -> None:
    cfg = config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.sha256={sha256(images / 'top.qcow2')} "
                 f"rd.qcow2.sha256.base.qcow2={sha256(images / 'base.qcow2')}")  # fmt: skip
    run_prepare(cfg, tmp_path).close()
    assert warnings(console) == []
    assert any("fetch: " in line for line in console)  # the console lines were collected


# -- the downloaded images are private to root --------------------------------------------------------------


def test_images_are_readable_by_root_only(images: Path, base_url: str, tmp_path: Path) -> None:
    """/run moves into the booted system: an image there holds every file of the root, whatever their modes."""
    (tmp_path / "images").mkdir(mode=0o755)  # as an older boot code left it
    ready = run_prepare(config(f"root=qcow2:{base_url}top.qcow2 rd.qcow2.verify=sidecar"), tmp_path)
    ready.close()
    assert stat.S_IMODE((tmp_path / "images").stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "images").iterdir()}
    assert modes == {"top.qcow2": 0o600, "base.qcow2": 0o600}


def test_sidecar_over_https_warns_only_when_insecure(images: Path, tls_cert: tuple[Path, Path], tmp_path: Path,
                                                     console: list[str]) -> None:  # fmt: skip
    cert, key = tls_cert
    with http_server(str(images), certfile=str(cert), keyfile=str(key)) as url:
        base = f"root=qcow2:{url}base.qcow2 rd.qcow2.verify=sidecar"
        run_prepare(config(f"{base} rd.qcow2.cacert={cert}"), tmp_path / "a").close()
        assert warnings(console) == []
        run_prepare(config(f"{base} rd.qcow2.insecure"), tmp_path / "b").close()
    [line] = warnings(console)
    assert re.match(SIDECAR_WARNING.format(channel=r"https with rd\.qcow2\.insecure", pin="sha256"), line), line


# -- mirrors (rd.qcow2.mirror=): the primary is dead, the mirror serves the image and its backing file --


def dead_base_url() -> str:
    from fetch_fixtures import free_port

    return f"http://127.0.0.1:{free_port()}/"


def test_ram_mode_from_a_mirror(images: Path, base_url: str, tmp_path: Path) -> None:
    from bootkit.boot.serve import counters
    from bootkit.boot.status import format_status

    dead = dead_base_url()
    cfg = config(f"root=qcow2:{dead}top.qcow2 rd.qcow2.mirror={base_url}top.qcow2 "
                 f"rd.qcow2.sha256={sha256(images / 'top.qcow2')} "
                 f"rd.qcow2.sha256.base.qcow2={sha256(images / 'base.qcow2')}")  # fmt: skip
    ready = run_prepare(cfg, tmp_path)
    try:
        assert_serves(ready, images / "expected.raw")
        status = counters(ready.image, ready.fetcher)["mirrors"]
        # the backing file came from the mirror's directory too: its counters are the last ones recorded
        assert status[f"{dead}base.qcow2"]["state"] == "dropped"
        assert status[f"{base_url}base.qcow2"]["bytes"] == (images / "base.qcow2").stat().st_size
        assert status[f"{base_url}top.qcow2"]["bytes"] == (images / "top.qcow2").stat().st_size
        text = format_status({"counters": {"mirrors": status}})
        # the mirrors are listed sorted by URL, and the dead port may sort either side of the live one
        assert "\n  mirrors:\n    http://" in text
        assert f"\n    {base_url}base.qcow2:\n      bad_chunks: 0\n      bytes: " in text
    finally:
        ready.close()


def test_lazy_mode_from_a_mirror(images: Path, base_url: str, tmp_path: Path, manifests: dict[str, str]) -> None:
    from bootkit.boot.serve import counters

    dead = dead_base_url()
    pins = manifests
    cfg = config(f"root=qcow2:{dead}top.qcow2 rd.qcow2.mirror={base_url}top.qcow2 rd.qcow2.mode=lazy "
                 f"rd.qcow2.manifest-sha256={pins['top.qcow2']} "
                 f"rd.qcow2.sha256.base.qcow2.manifest={pins['base.qcow2']}")  # fmt: skip
    ready = run_prepare(cfg, tmp_path)
    try:
        assert_serves(ready, images / "expected.raw")
        status = counters(ready.image, ready.fetcher)["mirrors"]
        assert {url: info["state"] for url, info in status.items()} == {
            f"{dead}top.qcow2": "dropped",
            f"{base_url}top.qcow2": "healthy",
            f"{dead}base.qcow2": "dropped",
            f"{base_url}base.qcow2": "healthy",
        }
        assert status[f"{base_url}base.qcow2"]["bytes"] > 0
    finally:
        ready.close()
