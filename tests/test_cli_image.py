"""``bootkit inspect | map | convert | check`` as a user runs them, against images made by qemu-img/qemu-io."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from testtools import require_tools

pytestmark = pytest.mark.usefixtures("qemu_tools")


@pytest.fixture(scope="module")
def qemu_tools() -> None:
    require_tools("qemu-img", "qemu-io")


def bootkit(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "bootkit", *args], capture_output=True, input=input, check=False)


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    base = d / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    qemu_io(base, "write -P 0x11 0 3M", "write -P 0x22 5M 64k", "write -z 8M 1M", "write -P 0x33 30M 2M")
    out = {"plain": base}
    for name, opts in (("deflate", []), ("zstd", ["-o", "compression_type=zstd"])):
        path = d / f"{name}.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", *opts, str(base), str(path)], check=True)
        out[name] = path
    raw = d / "reference.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True)
    out["raw"] = raw
    return out


@pytest.mark.parametrize("kind", ["plain", "deflate", "zstd"])
def test_convert_matches_qemu_img(images: dict[str, Path], kind: str, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    proc = bootkit("convert", str(images[kind]), str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == images["raw"].read_bytes()
    # holes stay holes: far fewer blocks than the 32 MiB virtual size
    assert os.stat(out).st_blocks * 512 < 16 << 20


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A small XFS with reflink, loop-mounted (root, mkfs.xfs from xfsprogs): a filesystem that shares blocks."""
    require_tools("mkfs.xfs", "filefrag")
    if os.geteuid() != 0:
        pytest.skip("mounting a loop filesystem needs root")
    fs, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(fs, "wb") as f:
        f.truncate(400 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(fs)], check=True)
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


_EXTENT = re.compile(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+):.*\bshared\b")


def _shared_bytes(path: Path) -> int:
    """Bytes of ``path`` in extents that filefrag flags as shared (reflinked)."""
    out = subprocess.run(["filefrag", "-v", "-b1", str(path)], capture_output=True, text=True, check=True).stdout
    return sum(int(m.group(1)) for m in map(_EXTENT.match, out.splitlines()) if m)


@pytest.mark.parametrize("cluster", ["64k", "512"])
def test_convert_reflinks_uncompressed_data_where_the_filesystem_can(xfs: Path, cluster: str) -> None:
    """On XFS the uncompressed clusters are shared with the image, not copied; where the filesystem refuses
    (512-byte clusters: host offsets off its 4 KiB blocks) they are read and written instead. The bytes are
    qemu-img's either way."""
    image, out, ref = xfs / "disk.qcow2", xfs / "out.raw", xfs / "ref.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(image), "24M"],
                   check=True)
    qemu_io(image, "write -P 0x11 0 8M", "write -P 0x22 12M 3M", "write -c -P 0x33 20M 64k")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(ref)], check=True)
    proc = bootkit("convert", str(image), str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == ref.read_bytes()
    if cluster == "64k":
        assert _shared_bytes(out) >= 11 << 20


def test_convert_to_stdout(images: dict[str, Path]) -> None:
    proc = bootkit("convert", str(images["zstd"]), "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == images["raw"].read_bytes()


def test_inspect_json(images: dict[str, Path]) -> None:
    proc = bootkit("inspect", "--json", str(images["zstd"]))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    qemu = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(images["zstd"])],
                                     capture_output=True, check=True).stdout)
    assert info["virtual-size"] == qemu["virtual-size"]
    assert info["cluster-size"] == qemu["cluster-size"]
    assert info["compression-type"] == "zstd" and qemu["format-specific"]["data"]["compression-type"] == "zstd"
    assert info["allocation"]["data"] == 0
    assert info["allocation"]["compressed"] > 0
    assert info["features"]["incompatible"] == ["compression type"]


def test_inspect_text_names_the_essentials(images: dict[str, Path]) -> None:
    proc = bootkit("inspect", str(images["deflate"]))
    text = proc.stdout.decode()
    assert proc.returncode == 0
    for needle in ("virtual size: 32.0 MiB (33554432 bytes)", "cluster size: 65536", "compression type: deflate"):
        assert needle in text


def test_map_json_agrees_with_qemu_img_map(images: dict[str, Path]) -> None:
    ours = json.loads(bootkit("map", "--json", str(images["plain"])).stdout)
    theirs = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(images["plain"])],
                                       capture_output=True, check=True).stdout)
    keys = ("start", "length", "present", "zero", "data", "offset")
    assert [{k: e.get(k) for k in keys} for e in ours] == [{k: e.get(k) for k in keys} for e in theirs]


def test_map_offset_says_where_a_byte_lives(images: dict[str, Path]) -> None:
    proc = bootkit("map", "--offset", str(5 << 20), str(images["zstd"]))
    assert proc.returncode == 0
    line = proc.stdout.decode()
    assert line.startswith(f"guest offset {5 << 20:#x}: compressed cluster at host offset 0x")
    assert "bytes compressed, 65536 decoded" in line
    proc = bootkit("map", "--offset", str(20 << 20), str(images["zstd"]))
    assert "unallocated (reads as zeros)" in proc.stdout.decode()


def test_check_clean_image(images: dict[str, Path]) -> None:
    proc = bootkit("check", str(images["deflate"]))
    assert proc.returncode == 0, proc.stderr
    assert "no problems found" in proc.stdout.decode()


def test_check_reports_each_bad_cluster(images: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(images["deflate"].read_bytes())
    # find two compressed clusters and overwrite their payloads with garbage
    rows = json.loads(bootkit("map", "--json", str(bad)).stdout)
    compressed = [r for r in rows if r["kind"] == "compressed"]
    targets = [compressed[0], compressed[len(compressed) // 2]]
    with bad.open("r+b") as f:
        for r in targets:
            f.seek(r["offset"])
            f.write(b"\xff" * 64)
    proc = bootkit("check", str(bad))
    assert proc.returncode == 1
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2
    for line, r in zip(lines, targets, strict=True):
        assert f"guest offset {r['start']:#x}" in line and f"host offset {r['offset']:#x}" in line
        assert "deflate" in line
    assert proc.stderr.decode() == f"error: {bad}: 2 bad cluster(s) or table(s) found\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "/nonexistent.qcow2"], "error: /nonexistent.qcow2: cannot open: No such file or directory\n"),
        (["convert"], None),
        (["map", "--offset", "x", "IMG"], None),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str | None) -> None:
    proc = bootkit(*args)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    if message:
        assert err == message


def test_invalid_image_is_exit_2(images: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "v9.qcow2"
    data = bytearray(images["plain"].read_bytes()[:1 << 20])
    struct.pack_into(">I", data, 4, 9)
    bad.write_bytes(data)
    proc = bootkit("convert", str(bad), str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.decode() == f"error: {bad}: unsupported qcow2 version 9 (field version at offset 4)\n"
