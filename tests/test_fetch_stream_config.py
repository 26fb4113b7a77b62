"""Stream mode's configuration: ``rd.qcow2.mode=stream`` and ``rd.qcow2.fill-rate`` on the kernel command line,
``mode = "stream"`` in pxe-config (a manifest like lazy mode), and the boot code's fetcher making stream
sources of every file of the chain."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest

from bootkit.boot.cmdline import DEFAULT_FILL_RATE, BootConfig, Mode, join_args, parse_cmdline
from bootkit.boot.images import ImageFetcher
from bootkit.boot.stages import Stages
from bootkit.errors import ConfigError
from bootkit.fetch import Manifest
from bootkit.fetch.stream import StreamSource
from bootkit.host.httpserve import http_server
from bootkit.host.pxecfg.cmdline import kernel_args
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.model import Config

URL = "http://10.0.0.1/disk.qcow2"
H1 = "a" * 64


def parse(extra: str) -> BootConfig:
    cfg = parse_cmdline(f"root=qcow2:{URL} {extra}")
    assert cfg is not None
    return cfg


def test_stream_mode_and_fill_rate() -> None:
    cfg = parse(f"rd.qcow2.mode=stream rd.qcow2.manifest-sha256={H1}")
    assert (cfg.mode, cfg.verify, cfg.manifest_sha256, cfg.fill_rate) == ("stream", "pinned", H1, DEFAULT_FILL_RATE)
    assert cfg.mode.reads_ranges and Mode.lazy.reads_ranges and not Mode.ram.reads_ranges
    assert parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=20M").fill_rate == 20 << 20
    assert parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=500k").fill_rate == 500 << 10
    assert parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=0").fill_rate == 0
    assert parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=1g").fill_rate == 1 << 30
    # written back only when not the default, as bytes per second
    assert "rd.qcow2.fill-rate=20971520" in parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=20M").to_args()
    assert not any("fill-rate" in a for a in parse("rd.qcow2.mode=stream").to_args())
    again = parse_cmdline(join_args(parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=3k").to_args()))
    assert again == parse("rd.qcow2.mode=stream rd.qcow2.fill-rate=3k")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("rd.qcow2.mode=stream rd.qcow2.verify=pinned",
         "rd.qcow2.verify=pinned with rd.qcow2.mode=stream needs rd.qcow2.manifest-sha256=<hex>"),
        ("rd.qcow2.fill-rate=20M", "rd.qcow2.fill-rate is only used with rd.qcow2.mode=stream"),
        ("rd.qcow2.mode=lazy rd.qcow2.fill-rate=20M", "rd.qcow2.fill-rate is only used with rd.qcow2.mode=stream"),
        ("rd.qcow2.mode=stream rd.qcow2.fill-rate=fast",
         "rd.qcow2.fill-rate=fast: expected bytes per second, e.g. 20M, 500k or 0 (no cap)"),
        ("rd.qcow2.mode=stream rd.qcow2.fill-rate=-1", "rd.qcow2.fill-rate=-1: expected bytes per second"),
        ("rd.qcow2.mode=stream rd.qcow2.fill-rate=2T", "rd.qcow2.fill-rate=2T: expected bytes per second"),
        (f"rd.qcow2.manifest-sha256={H1}", "only used with rd.qcow2.mode=lazy or stream"),
    ],
)  # fmt: skip
def test_bad_stream_options(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(extra)
    assert message in str(info.value)


# -- pxe-config --

ENTRY = """\
base_url = "http://10.0.0.1:8080/"
docroot = "www"

[[entry]]
name = "a"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "images/disk.qcow2"
mode = "stream"
"""


@pytest.fixture
def pxe_dir(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "images").mkdir(parents=True)
    (root / "vmlinuz").write_bytes(b"kernel\n")
    (root / "initrd.img").write_bytes(b"initrd\n")
    (root / "images" / "disk.qcow2").write_bytes(os.urandom(1 << 20))
    (root / "images" / "disk.manifest").write_bytes(b"manifest\n")
    return tmp_path


def _load(pxe_dir: Path, text: str) -> Config:
    path = pxe_dir / "pxe.toml"
    path.write_text(textwrap.dedent(text))
    return load_file(path)


def test_pxe_config_stream_entry_pins_its_manifest(pxe_dir: Path) -> None:
    config = _load(pxe_dir, ENTRY + 'manifest = "images/disk.manifest"\n')
    entry = config.entries[0]
    assert entry.mode is Mode.stream and entry.sha256 is None
    assert entry.manifest_sha256 == hashlib.sha256(b"manifest\n").hexdigest()
    args = kernel_args(entry)
    assert "rd.qcow2.mode=stream" in args
    assert f"rd.qcow2.manifest-sha256={entry.manifest_sha256}" in args
    assert "rd.qcow2.manifest=http://10.0.0.1:8080/images/disk.manifest" in args
    # without a manifest key, like lazy mode: <image>.manifest, checked by its .sha256 sidecar
    bare = _load(pxe_dir, ENTRY).entries[0]
    assert "rd.qcow2.verify=sidecar" in kernel_args(bare) and "rd.qcow2.mode=stream" in kernel_args(bare)


def test_pxe_config_stream_refuses_an_image_pin_without_manifest(pxe_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"entry\.a\.sha256.*cannot be checked in stream mode"):
        _load(pxe_dir, ENTRY + 'sha256 = "compute"\n')


# -- the boot code's fetcher --


def test_fetcher_makes_stream_sources(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "disk.qcow2").write_bytes(data)
    digest = Manifest.build(str(tmp_path / "disk.qcow2"), 65536).write(str(tmp_path / "disk.qcow2.manifest"))
    with http_server(str(tmp_path)) as base:
        cfg = parse_cmdline(f"root=qcow2:{base}disk.qcow2 rd.qcow2.mode=stream rd.qcow2.manifest-sha256={digest}")
        assert cfg is not None
        fetcher = ImageFetcher(cfg, Stages(), str(tmp_path / "images"))
        try:
            top = fetcher.top()
            assert isinstance(top, StreamSource) and fetcher.streams == [top]
            assert top.pread(70_000, 100) == data[70_000:70_100]
            assert fetcher.verified[base + "disk.qcow2"] == f"manifest {digest}"
        finally:
            fetcher.close()
