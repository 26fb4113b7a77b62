"""The boot code with a local cache (bootkit.boot.serve.prepare with a DiskCache): a first boot against a real
server fills the cache; a second with the server gone opens the same QCOW2, finds the same root and reads the
same bytes, the manifest taken from the cache by its pinned hash, the server never contacted."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from bootkit.boot.cmdline import parse_cmdline
from bootkit.boot.serve import _say_if_local, prepare
from bootkit.boot.stages import Stages
from bootkit.fetch import Manifest
from bootkit.fetch.diskcache import DiskCache
from bootkit.host.httpserve import http_server
from bootkit.run import run

CHUNK = 64 * 1024


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, bytes, str]:
    """A bare ext4 filesystem as a compressed QCOW2 with its manifest: (directory, the raw disk, manifest pin)."""
    if shutil.which("qemu-img") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("qemu-img (qemu-utils) and mkfs.ext4 (e2fsprogs) are needed")
    www = tmp_path / "www"
    www.mkdir()
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "root", raw], capture=True)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", raw, www / "disk.qcow2"], capture=True)
    pin = Manifest.build(str(www / "disk.qcow2"), CHUNK).write(str(www / "disk.qcow2.manifest"))
    return www, raw.read_bytes(), pin


def test_second_boot_from_the_cache_with_the_server_gone(
    served: tuple[Path, bytes, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    www, disk, pin = served
    (tmp_path / "cache").mkdir()
    with http_server(str(www)) as base:
        line = f"root=qcow2:{base}disk.qcow2 rd.qcow2.mode=lazy rd.qcow2.manifest-sha256={pin} rd.qcow2.cache=/dev/x"
        cfg = parse_cmdline(line)
        assert cfg is not None
        first = prepare(cfg, Stages(), str(tmp_path / "images"), cache=DiskCache.open(str(tmp_path / "cache")))
        for source in first.fetcher.sources:
            source.pread(0, source.size)  # every chunk: what stream mode's fill does
        assert first.image.pread(0, len(disk)) == disk
        assert not first.fetcher.offline
        # what bootkit status shows: every chunk now on the cache disk, the server asked for them
        assert first.source() == {"cache": {"device": "/dev/x", "complete": True, "server_contacted": True}}
        first.close()
    # the server is gone (its port closed); the same command line
    cache = DiskCache.open(str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="bootkit"):
        second = prepare(cfg, Stages(), str(tmp_path / "images"), cache=cache)
        _say_if_local(second.fetcher)
    try:
        assert second.root.number == 0 and second.root.fs is not None and second.root.fs.label == "root"
        assert second.image.pread(0, len(disk)) == disk
        assert second.fetcher.offline
        assert second.source() == {"cache": {"device": "/dev/x", "complete": True, "server_contacted": False}}
        assert cache.stats["cache_misses"] == 0 and cache.stats["cache_hits"] > 0
    finally:
        second.close()
    assert f"manifest {pin} from the local cache" in caplog.text
    assert "booted from the local cache: every chunk is local, the image server is not needed, and was not " \
        "contacted" in caplog.text  # fmt: skip


def test_a_manifest_in_the_cache_that_is_not_the_pinned_one_is_not_used(
    served: tuple[Path, bytes, str], tmp_path: Path
) -> None:
    www, _disk, pin = served
    (tmp_path / "cache").mkdir()
    cache = DiskCache.open(str(tmp_path / "cache"))
    other = Manifest.build(str(www / "disk.qcow2"), CHUNK * 2)
    cache.put_manifest(other.dumps())
    manifests = tmp_path / "cache" / "manifests"
    (manifests / other.digest).rename(manifests / pin)  # a manifest under a false name
    with http_server(str(www)) as base:
        cfg = parse_cmdline(f"root=qcow2:{base}disk.qcow2 rd.qcow2.mode=lazy rd.qcow2.manifest-sha256={pin} "
                            "rd.qcow2.cache=/dev/x")  # fmt: skip
        assert cfg is not None
        ready = prepare(cfg, Stages(), str(tmp_path / "images"), cache=cache)
        try:
            # the false one was removed, the real one fetched (and now kept under its name)
            assert ready.fetcher.remotes[0].manifest.chunk_size == CHUNK
            assert cache.get_manifest(pin) == (www / "disk.qcow2.manifest").read_bytes()
            assert cache.stats["cache_repaired"] == 1
        finally:
            ready.close()
