"""``bootkit build-image --base OLD.qcow2``: an overlay holding only the clusters that changed, checked with real tools.

Every overlay is checked with ``qemu-img check`` (no errors, no leaks), read through its backing file by
``qemu-img convert`` and its file system by ``e2fsck -fn`` and ``debugfs`` (the changed file has its new
content, an unchanged one its old); the number of clusters it holds is what a user would look at.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from testtools import require_tools

from bootkit.host.cli import main

EPOCH = "1700000000"
MIB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="build-image keeps root-owned files: needs root")


@pytest.fixture(autouse=True)
def _tools(monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools("mke2fs", "debugfs", "sfdisk", "qemu-img", "e2fsck")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root: Path) -> Path:
    """A tree of 120 files of incompressible data (about 6 MiB): changed clusters show as they are."""
    r = random.Random(7)
    for d in range(6):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (root / f"d{d}/f{f:02d}").write_bytes(_noise(r.randrange(1000, 100_000), d * 100 + f))
    return root


def build(*args: object) -> None:
    assert main(["build-image", "--no-kernel", *[str(a) for a in args]]) == 0


def check(image: Path) -> dict[str, object]:
    proc = subprocess.run(["qemu-img", "check", "--output=json", image], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    return report


def info(image: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", image], check=True, capture_output=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def root_fs(image: Path, work: Path) -> Path:
    """The root partition's file system as QEMU reads it through the backing chain, fsck'd."""
    raw = work / f"{image.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, raw], check=True)
    part = json.loads(subprocess.run(["sfdisk", "--json", raw], check=True, capture_output=True).stdout)
    (p,) = part["partitiontable"]["partitions"]
    fs = work / f"{image.stem}.ext4"
    subprocess.run(["dd", f"if={raw}", f"of={fs}", "bs=512", f"skip={p['start']}", f"count={p['size']}",
                    "status=none"], check=True)
    raw.unlink()
    fsck = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    return fs


def cat(fs: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", fs], check=True, capture_output=True).stdout


def test_overlay_holds_only_the_changed_file_and_reads_as_the_new_tree(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    build(src, "-o", out / "v1.qcow2", "--headroom", "8M")
    changed = _noise((src / "d3/f07").stat().st_size, 999)  # same size: the same blocks
    (src / "d3/f07").write_bytes(changed)
    build(src, "-o", out / "v2.qcow2", "--base", out / "v1.qcow2")

    v1, v2 = info(out / "v1.qcow2"), info(out / "v2.qcow2")
    assert v2["backing-filename"] == "v1.qcow2"  # a plain name: bootkit's path rules
    assert v2["backing-filename-format"] == "qcow2"
    assert v2["cluster-size"] == v1["cluster-size"] == 65536
    assert v2["virtual-size"] == v1["virtual-size"]
    allocated = check(out / "v2.qcow2")["allocated-clusters"]
    data_clusters = -(-len(changed) // 65536)
    # the file's data (one more cluster when it straddles a boundary); nothing of the metadata moved
    assert isinstance(allocated, int) and allocated <= data_clusters + 1, allocated
    assert (out / "v2.qcow2").stat().st_size < (out / "v1.qcow2").stat().st_size // 4

    fs = root_fs(out / "v2.qcow2", tmp_path)
    assert cat(fs, "/d3/f07") == changed
    assert cat(fs, "/d5/f19") == (src / "d5/f19").read_bytes()
    # same UUID as the base: the identifiers come from it, not from the (changed) tree's digest
    uuid_line = re.compile(rb"^Filesystem UUID:.*$", re.M)
    head = subprocess.run(["dumpe2fs", "-h", fs], check=True, capture_output=True).stdout
    old = subprocess.run(["dumpe2fs", "-h", root_fs(out / "v1.qcow2", tmp_path)], check=True,
                         capture_output=True).stdout
    assert uuid_line.search(head).group(0) == uuid_line.search(old).group(0)  # type: ignore[union-attr]


def new_raw_disk(src: Path, base: Path, work: Path) -> Path:
    """The raw disk build-image makes of ``src`` on ``base``, made here step by step with the same library
    calls (staging, identity, times, ext4 with the base's geometry and identifiers, GPT): what the overlay,
    read through its backing file, must equal byte for byte."""
    from bootkit.host.image import delta, disk, tree

    info = delta.read_base(base, base.with_name("overlay.qcow2"))
    root = work / "stage"
    root.mkdir()
    tree.stage_tree(src, root)
    tree.strip_identity(root)
    tree.settle_times(root, int(EPOCH))
    entries, data = tree.count_entries(root)
    fs_size, inodes = delta.fs_geometry(info, data=data, entries=entries, headroom=256 * MIB, size=None)
    fs = work / "new.ext4"
    disk.make_ext4(root, fs, size=fs_size, inodes=inodes, label="root", ids=info.ids, epoch=int(EPOCH))
    raw = work / "new.raw"
    disk.assemble_gpt(fs, raw, ids=info.ids, label="root")
    return raw


def test_overlay_with_its_backing_file_is_the_new_raw_disk(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    build(src, "-o", out / "v1.qcow2", "--headroom", "8M")
    (src / "d2/f03").write_bytes(_noise((src / "d2/f03").stat().st_size, 4242))
    (src / "d4/new").write_bytes(b"a new file\n")
    build(src, "-o", out / "v2.qcow2", "--base", out / "v1.qcow2")
    check(out / "v2.qcow2")
    raw = new_raw_disk(src, out / "v1.qcow2", tmp_path)
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, out / "v2.qcow2"],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # and it is not the base: the compare can fail
    differs = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, out / "v1.qcow2"],
                             capture_output=True, text=True)
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_overlay_is_reproducible(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    build(src, "-o", out / "v1.qcow2", "--headroom", "8M")
    (src / "d1/new-file").write_bytes(b"added\n")
    build(src, "-o", out / "a.qcow2", "--base", out / "v1.qcow2")
    build(src, "-o", out / "b.qcow2", "--base", out / "v1.qcow2")
    check(out / "a.qcow2")
    assert (out / "a.qcow2").read_bytes() == (out / "b.qcow2").read_bytes()
    assert cat(root_fs(out / "a.qcow2", tmp_path), "/d1/new-file") == b"added\n"


def test_a_tree_that_outgrows_the_base_grows_the_disk(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    build(src, "-o", out / "v1.qcow2", "--headroom", "1M")
    big = _noise(40 * MIB, 5)
    (src / "d0/big").write_bytes(big)
    build(src, "-o", out / "v2.qcow2", "--base", out / "v1.qcow2", "--headroom", "1M")
    v1, v2 = info(out / "v1.qcow2"), info(out / "v2.qcow2")
    assert isinstance(v1["virtual-size"], int) and isinstance(v2["virtual-size"], int)
    assert v2["virtual-size"] > v1["virtual-size"]
    check(out / "v2.qcow2")
    assert cat(root_fs(out / "v2.qcow2", tmp_path), "/d0/big") == big
    # bootkit's own reader agrees with QEMU past the end of the smaller backing image
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert main(["convert", str(out / "v2.qcow2"), str(ours)]) == 0
    subprocess.run(["qemu-img", "convert", "-O", "raw", out / "v2.qcow2", theirs], check=True)
    assert subprocess.run(["cmp", ours, theirs]).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base", "OUT/missing.qcow2"], "error: --base OUT/missing.qcow2: no such file\n"),
        (["--base", "ELSEWHERE/v1.qcow2"],
         "error: --base ELSEWHERE/v1.qcow2: must be in the output's directory OUT (the overlay names its base by"
         " plain file name)\n"),
        (["--base", "OUT/v1.qcow2", "--cluster-size", "128K"],
         "error: --cluster-size 131072: the base v1.qcow2 has 65536-byte clusters; an overlay must use the"
         " same\n"),
        (["--base", "OUT/v1.qcow2", "--seed", "x"],
         "error: --seed and --base contradict each other: an overlay keeps its base's identifiers\n"),
        (["--base", "OUT/blank.qcow2"],
         "error: --base OUT/blank.qcow2: no GPT partition table: not an image of bootkit build-image\n"),
        (["--base", "OUT/v1.qcow2", "--size", "8M"],
         "error: --size 8388608: smaller than the base's file system (BASEFS bytes)\n"),
    ],
    ids=["missing", "other-directory", "cluster-size", "seed", "not-a-build", "size-shrinks"],
)
def test_bad_base_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                    message: str) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    build(src, "-o", out / "v1.qcow2", "--headroom", "8M")
    (tmp_path / "elsewhere").mkdir()
    shutil.copyfile(out / "v1.qcow2", tmp_path / "elsewhere/v1.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", out / "blank.qcow2", "64M"], check=True)
    subst = {"OUT": str(out), "ELSEWHERE": str(tmp_path / "elsewhere")}
    argv = [re.sub(r"^(OUT|ELSEWHERE)", lambda m: subst[m.group(1)], a) for a in args]
    capsys.readouterr()
    assert main(["build-image", "--no-kernel", str(src), "-o", str(out / "v2.qcow2"), *argv]) == 2
    err = capsys.readouterr().err
    expected = message.replace("ELSEWHERE", subst["ELSEWHERE"]).replace("OUT", subst["OUT"])
    if "BASEFS" in expected:
        m = re.search(r"\((\d+) bytes\)", err)
        assert m is not None, err
        expected = expected.replace("BASEFS", m.group(1))
    assert err == expected
    assert sorted(p.name for p in out.iterdir()) == ["blank.qcow2", "v1.qcow2"]
