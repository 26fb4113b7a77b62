"""Root selection on disks made with real tools: sfdisk (GPT, MBR), mke2fs, mkfs.vfat, qemu-img.

Expected identifiers (UUIDs, labels, PARTUUIDs) come from blkid and sfdisk, never from bootkit itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from boot_fixtures import DPS_ROOT_X86_64, ESP_TYPE, LINUX_DATA, MiB, Part, make_disk, make_ext4, make_vfat, need

from bootkit import qcow2
from bootkit.boot.cmdline import RootSpec, parse_root
from bootkit.boot.partitions import Partition, RootNotFound, choose_root, read_disk
from bootkit.source import FileSource


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("sfdisk", "mke2fs", "mkfs.vfat", "blkid")


def blkid(path: Path, tag: str) -> str:
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


def part_uuid(disk: Path, n: int) -> str:
    """The PARTUUID Linux gives partition ``n``: the GPT entry's GUID, or <MBR disk id>-<NN> for MBR."""
    def sfdisk(*args: str) -> str:
        return subprocess.run(["sfdisk", *args], check=True, capture_output=True, text=True).stdout.strip()

    if "dos" in sfdisk("--dump", str(disk)).split("label:", 1)[1].splitlines()[0]:
        return f"{sfdisk('--disk-id', str(disk))[2:]}-{n:02x}"
    return sfdisk("--part-uuid", str(disk), str(n))


def disk_parts(disk: Path) -> list[Partition]:
    src = FileSource(disk)
    try:
        return read_disk(src, src.size)
    finally:
        src.close()


def spec(text: str) -> RootSpec:
    return parse_root("rd.qcow2.root", text)


@pytest.fixture()
def fs(tmp_path: Path) -> dict[str, Path]:
    return {
        "esp": make_vfat(tmp_path / "esp.vfat", 4, label="EFI"),
        "root": make_ext4(tmp_path / "root.ext4", 8, label="rootfs"),
        "home": make_ext4(tmp_path / "home.ext4", 8, label="home"),
    }


def test_gpt_with_root_type(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "d.raw", [Part(fs["esp"], ESP_TYPE), Part(fs["home"], LINUX_DATA),
                                          Part(fs["root"], DPS_ROOT_X86_64)])  # fmt: skip
    parts = disk_parts(disk)
    assert [(p.number, p.table, p.fs.type if p.fs else None) for p in parts] == [
        (1, "gpt", "vfat"), (2, "gpt", "ext4"), (3, "gpt", "ext4")]  # fmt: skip
    root = choose_root(parts, RootSpec())
    assert root.number == 3
    assert root.start == 1 * MiB + 4 * MiB + 8 * MiB
    assert root.fs is not None
    assert (root.fs.label, root.fs.uuid) == ("rootfs", blkid(fs["root"], "UUID"))
    assert root.partuuid == part_uuid(disk, 3).lower()
    esp = parts[0]
    assert esp.fs is not None and (esp.fs.label, esp.fs.uuid) == ("EFI", blkid(fs["esp"], "UUID"))


def test_gpt_root_type_with_no_auto_attribute_is_skipped(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "d.raw", [Part(fs["root"], DPS_ROOT_X86_64), Part(fs["esp"], ESP_TYPE)])
    subprocess.run(["sfdisk", "-q", "--part-attrs", str(disk), "1", "63"], check=True, capture_output=True)
    parts = disk_parts(disk)
    assert parts[0].attributes == 1 << 63
    # no usable root type, so the only Linux filesystem is chosen: the same partition
    assert choose_root(parts, RootSpec()).number == 1


def test_gpt_without_root_type_takes_the_only_linux_filesystem(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "d.raw", [Part(fs["esp"], ESP_TYPE), Part(fs["root"], LINUX_DATA)])
    assert choose_root(disk_parts(disk), RootSpec()).number == 2


def test_gpt_without_root_type_and_two_linux_filesystems_needs_a_choice(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "d.raw", [Part(fs["esp"], ESP_TYPE), Part(fs["home"], LINUX_DATA),
                                          Part(fs["root"], LINUX_DATA)])  # fmt: skip
    parts = disk_parts(disk)
    with pytest.raises(RootNotFound, match=r"2 hold Linux filesystems .*choose one with rd.qcow2.root="):
        choose_root(parts, RootSpec())
    assert choose_root(parts, spec("3")).number == 3
    assert choose_root(parts, spec("LABEL=rootfs")).number == 3
    assert choose_root(parts, spec("LABEL=home")).number == 2
    assert choose_root(parts, spec("UUID=" + blkid(fs["root"], "UUID").upper())).number == 3
    assert choose_root(parts, spec("PARTUUID=" + part_uuid(disk, 2))).number == 2
    assert choose_root(parts, spec("UUID=" + blkid(fs["esp"], "UUID"))).number == 1
    with pytest.raises(RootNotFound, match=r"rd.qcow2.root=LABEL=nope: no partition or filesystem matches"):
        choose_root(parts, spec("LABEL=nope"))
    with pytest.raises(RootNotFound, match=r"rd.qcow2.root=4: no such partition \(disk has: partition 1 "):
        choose_root(parts, spec("4"))


def test_mbr(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "d.raw", [Part(fs["esp"], "ef"), Part(fs["root"], "83")], label="dos")
    parts = disk_parts(disk)
    assert [(p.number, p.table, p.type) for p in parts] == [(1, "mbr", "ef"), (2, "mbr", "83")]
    root = choose_root(parts, RootSpec())
    assert root.number == 2 and root.fs is not None and root.fs.label == "rootfs"
    assert root.partuuid == part_uuid(disk, 2).lower()
    assert choose_root(parts, spec("PARTUUID=" + part_uuid(disk, 2))).number == 2


def test_mbr_logical_partitions(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = tmp_path / "d.raw"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)
    script = "label: dos\nstart=2048, size=10240, type=ef\nstart=14336, size=40960, type=5\n" \
             "start=16384, size=18432, type=83\n"  # fmt: skip
    subprocess.run(["sfdisk", "-q", str(disk)], input=script.encode(), check=True, capture_output=True)
    subprocess.run(["dd", f"if={fs['root']}", f"of={disk}", "bs=512", "seek=16384", "conv=notrunc", "status=none"],
                   check=True)  # fmt: skip
    parts = disk_parts(disk)
    assert [(p.number, p.type) for p in parts] == [(1, "ef"), (5, "83")]
    assert parts[1].start == 16384 * 512
    assert choose_root(parts, RootSpec()).number == 5
    assert parts[1].partuuid == part_uuid(disk, 5).lower()


def test_bare_filesystems(tmp_path: Path, fs: dict[str, Path]) -> None:
    parts = disk_parts(fs["root"])
    assert [(p.number, p.table) for p in parts] == [(0, "none")]
    assert choose_root(parts, RootSpec()) == parts[0]
    assert choose_root(parts, spec("LABEL=rootfs")) == parts[0]
    # a bare FAT has the MBR boot signature too: it is still a filesystem, not a partition table
    vfat = disk_parts(fs["esp"])
    assert [(p.number, p.table, p.fs.type if p.fs else None) for p in vfat] == [(0, "none", "vfat")]


def test_no_root_found(tmp_path: Path, fs: dict[str, Path]) -> None:
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 * MiB)
    with pytest.raises(RootNotFound, match="no partition table and no filesystem on the disk"):
        choose_root(disk_parts(blank), RootSpec())
    only_esp = make_disk(tmp_path / "esp-only.raw", [Part(fs["esp"], ESP_TYPE)])
    with pytest.raises(RootNotFound, match=r"no root filesystem found \(disk has: partition 1 \(vfat LABEL=EFI\)\)"):
        choose_root(disk_parts(only_esp), RootSpec())
    empty_root = tmp_path / "empty.img"
    with open(empty_root, "wb") as f:
        f.truncate(4 * MiB)
    disk = make_disk(tmp_path / "d.raw", [Part(fs["esp"], ESP_TYPE), Part(empty_root, DPS_ROOT_X86_64)])
    with pytest.raises(RootNotFound, match=r"root partition 2 \(DPS root type\) holds no known filesystem"):
        choose_root(disk_parts(disk), RootSpec())


def test_corrupt_gpt_is_reported(tmp_path: Path, fs: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "d.raw", [Part(fs["root"], DPS_ROOT_X86_64)])
    with open(disk, "r+b") as f:
        f.seek(512 + 24)  # current_lba in the header: covered by its CRC
        f.write(b"\x07")
    with pytest.raises(RootNotFound, match="GPT header: CRC mismatch"):
        disk_parts(disk)


def test_through_the_qcow2_reader(tmp_path: Path, fs: dict[str, Path]) -> None:
    """The boot code chooses the root from the verified image itself, through bootkit's reader."""
    need("qemu-img")
    raw = make_disk(tmp_path / "d.raw", [Part(fs["esp"], ESP_TYPE), Part(fs["root"], DPS_ROOT_X86_64)])
    image_path = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(image_path)], check=True)
    with qcow2.open(image_path) as image:
        parts = read_disk(image, image.virtual_size)
    assert parts == disk_parts(raw)
    assert choose_root(parts, RootSpec()).number == 2
