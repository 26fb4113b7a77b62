"""The cache device: ``bootkit cache prepare`` on disk image files, and what the initramfs does with a device
(``bootkit.boot.cachedev``): formats only bootkit's own partitions, refuses everything else with one warning.

The device tests use real loop devices (root and losetup needed; skipped with the reason otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootkit.boot.cachedev import FileReader, open_cache, why_not_formattable
from bootkit.boot.cacheopts import CACHE_PARTLABEL, CACHE_TYPE_GUID
from bootkit.boot.cmdline import parse_cmdline
from bootkit.boot.partitions import probe_filesystem
from bootkit.boot.stages import Stages
from bootkit.host.cli import main
from bootkit.run import run

LINUX_TYPE = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def disk_with(path: Path, line: str, label: str = "gpt", size: int = 96 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    run(["sfdisk", "--quiet", path], input=f"label: {label}\n{line}\n".encode(), capture=True)
    return path


def identity_ok(disk: Path, number: int = 1) -> str | None:
    reader = FileReader(str(disk))
    try:
        return why_not_formattable(reader, number)
    finally:
        reader.close()


# -- bootkit cache prepare --


def test_prepare_makes_a_bootkit_cache_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "cache.img"
    assert main(["cache", "prepare", str(disk), "--size", "100M"]) == 0
    assert "rd.qcow2.cache=PARTLABEL=bootkit-cache" in capsys.readouterr().out
    assert identity_ok(disk) is None
    dump = run(["sfdisk", "--dump", disk], capture=True).stdout.decode()
    assert f"type={CACHE_TYPE_GUID.upper()}" in dump and f'name="{CACHE_PARTLABEL}"' in dump

    class At:
        def pread(self, offset: int, length: int) -> bytes:
            with open(disk, "rb") as f:
                f.seek((1 << 20) + offset)
                return f.read(length)

    fs = probe_filesystem(At())
    assert fs is not None and fs.type == "ext4" and fs.label == CACHE_PARTLABEL


@pytest.mark.parametrize("what", ["gpt", "ext4"])
def test_prepare_refuses_a_disk_that_is_not_blank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    disk = tmp_path / "used.img"
    if what == "gpt":
        disk_with(disk, f"type={LINUX_TYPE}")
    else:
        with open(disk, "wb") as f:
            f.truncate(96 << 20)
        run(["mkfs.ext4", "-q", "-F", disk], capture=True)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    assert main(["cache", "prepare", str(disk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {disk}: already carries ") and "--force wipes it" in err
    assert err.count("\n") == 1
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    assert main(["cache", "prepare", "--force", str(disk)]) == 0
    assert identity_ok(disk) is None


def test_prepare_refuses_a_tiny_disk_and_a_missing_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prepare", str(tmp_path / "absent.img")]) == 2
    assert "no such disk or file (give --size" in capsys.readouterr().err
    assert main(["cache", "prepare", str(tmp_path / "tiny.img"), "--size", "8M"]) == 2
    assert "too small for a cache" in capsys.readouterr().err


# -- which partitions rd.qcow2.cache.format=auto may format --


def test_format_auto_takes_bootkit_type_or_partlabel_only(tmp_path: Path) -> None:
    assert identity_ok(disk_with(tmp_path / "a.img", f"type={CACHE_TYPE_GUID}")) is None
    assert identity_ok(disk_with(tmp_path / "b.img", f'type={LINUX_TYPE}, name="{CACHE_PARTLABEL}"')) is None
    why = identity_ok(disk_with(tmp_path / "c.img", f'type={LINUX_TYPE}, name="home"'))
    assert why == (f"partition 1 has type {LINUX_TYPE} and PARTLABEL 'home', not bootkit's cache type "
                   f"{CACHE_TYPE_GUID} or PARTLABEL {CACHE_PARTLABEL}")  # fmt: skip
    assert identity_ok(disk_with(tmp_path / "d.img", "type=83", label="dos")) == "partition 1 is not in a valid GPT"
    assert identity_ok(tmp_path / "a.img", 0) == "it is a whole disk, not a partition"
    assert identity_ok(tmp_path / "a.img", 2) == "partition 2 is not in a valid GPT"


# -- the initramfs side on real block devices --


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup (util-linux)")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(128 << 20)
    proc = subprocess.run(["losetup", "--find", "--show", "--partscan", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {proc.stderr.strip()}")
    loop = proc.stdout.strip()
    try:
        yield disk, loop
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)
        subprocess.run(["losetup", "--detach", loop], capture_output=True)


def partition(disk: Path, loop: str, line: str) -> str:
    run(["sfdisk", "--quiet", loop], input=f"label: gpt\n{line}\n".encode(), capture=True)
    run(["partx", "--update", loop], check=False, capture=True)
    part = loop + "p1"
    for _ in range(50):
        if os.path.exists(part):
            return part
        run(["sleep", "0.1"])
    pytest.skip(f"{part} did not appear (no partition scanning on this loop device)")


def cfg(device: str, fmt: bool = True, extra: str = "") -> object:
    line = f"root=qcow2:http://h/i.qcow2 rd.qcow2.mode=lazy rd.qcow2.verify=sidecar rd.qcow2.cache={device} {extra}"
    return parse_cmdline(line + (" rd.qcow2.cache.format=auto" if fmt else ""))


def test_format_auto_formats_a_bootkit_partition_and_mounts_it(
    loop_disk: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk, loop = loop_disk
    part = partition(disk, loop, f"type={CACHE_TYPE_GUID}")
    with caplog.at_level(logging.INFO, logger="bootkit"):
        cache = open_cache(cfg(part, extra="rd.qcow2.cache.max=50%"), Stages(),  # type: ignore[arg-type]
                           mount_dir=str(tmp_path / "mnt"), wait=1)  # fmt: skip
    assert cache is not None
    assert f"cache: formatting {part} (a bootkit cache partition; it has no filesystem)" in caplog.text
    assert (tmp_path / "mnt" / "bootkit-cache").read_bytes() == b"bootkit-cache 1\n"
    assert 50 << 20 < cache.max_bytes < 64 << 20
    mounts = Path("/proc/self/mounts").read_text()
    assert f"{tmp_path / 'mnt'} ext4 rw,nosuid,nodev,noexec,noatime" in mounts
    cache.close()


def test_format_auto_never_touches_another_partition(
    loop_disk: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk, loop = loop_disk
    part = partition(disk, loop, f'type={LINUX_TYPE}, name="data"')
    with open(part, "r+b") as f:
        f.write(b"precious" * 1000)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        assert open_cache(cfg(part), Stages(), mount_dir=str(tmp_path / "mnt"), wait=1) is None  # type: ignore[arg-type]
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "not bootkit's cache type" in lines[0] and "booting without the local cache" in lines[0]


def test_a_foreign_ext4_and_an_unformatted_device_are_left_alone(
    loop_disk: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk, loop = loop_disk
    part = partition(disk, loop, f"type={CACHE_TYPE_GUID}")
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        assert open_cache(cfg(part, fmt=False), Stages(), mount_dir=str(tmp_path / "mnt"), wait=1) is None  # type: ignore[arg-type]
    assert "no filesystem (rd.qcow2.cache.format=auto formats a bootkit cache partition)" in caplog.text
    run(["mkfs.ext4", "-q", "-F", part], capture=True)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    run(["mount", part, tmp_path / "mnt"])
    (tmp_path / "mnt" / "home").mkdir()
    run(["umount", tmp_path / "mnt"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        assert open_cache(cfg(part), Stages(), mount_dir=str(tmp_path / "mnt"), wait=1) is None  # type: ignore[arg-type]
    assert "not a bootkit cache (holds home, lost+found)" in caplog.text
    assert str(tmp_path / "mnt") not in Path("/proc/self/mounts").read_text()  # unmounted again


def test_a_missing_device_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        c = cfg("PARTLABEL=no-such-cache-here")
        assert open_cache(c, Stages(), mount_dir=str(tmp_path / "mnt"), wait=0.3) is None  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "[" + caplog.records[0].getMessage().split("[", 1)[1].split("]", 1)[0] + "] cache: WARNING: "
        "/dev/disk/by-partlabel/no-such-cache-here: no such device after 0 s: booting without the local cache"
    ]
