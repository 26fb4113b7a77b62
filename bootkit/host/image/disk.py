"""From a staged root tree to a raw GPT disk: ext4 made by ``mke2fs -d``, no loop device, no mount.

The file system is made in a partition-sized sparse file, the GPT by ``sfdisk`` on a sparse disk file, and the
file system copied to its partition's offset with ``copy_file_range`` over its data extents only
(``SEEK_DATA``/``SEEK_HOLE``), so the disk stays sparse.

Reproducible: every UUID comes from a seed (the tree's digest, or ``--seed``), mke2fs runs with
``E2FSPROGS_FAKE_TIME`` (superblock and creation times) and e2fsprogs 1.47.0 copies each inode's ctime from
the staging tree, where it is the time of extraction (atimes move while mke2fs reads): ``debugfs`` sets every
used inode's ctime and atime to the build epoch afterwards.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from bootkit.errors import UsageError
from bootkit.log import log
from bootkit.run import CommandFailed, run

SECTOR = 512
MIB = 1 << 20
#: Discoverable Partitions Specification: root partition, x86-64
ROOT_TYPE_X86_64 = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
#: first partition at 1 MiB (alignment); the backup GPT needs 33 sectors at the end, rounded to 1 MiB
PART_START = MIB
GPT_TAIL = MIB
UUID_NAMESPACE = uuid.UUID("8a4c3b1e-2f52-4c4b-9d3e-6b6f6f746b69")


class NoRoom(UsageError):
    """The tree does not fit in the requested file system size."""


@dataclass(frozen=True)
class DiskIds:
    """Every identifier the image records, derived from one seed."""

    fs_uuid: str
    hash_seed: str
    disk_guid: str
    part_guid: str

    @classmethod
    def from_seed(cls, seed: str) -> DiskIds:
        def make(what: str) -> str:
            return str(uuid.uuid5(UUID_NAMESPACE, f"{seed}:{what}"))

        return cls(make("fs"), make("hash"), make("disk"), make("part"))


def make_ext4(tree: Path, fs_image: Path, *, size: int, inodes: int, label: str, ids: DiskIds,
              epoch: int) -> None:
    """Make an ext4 file system of ``size`` bytes in ``fs_image`` holding ``tree``."""
    with fs_image.open("wb") as f:
        f.truncate(size)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch), MKE2FS_CONFIG="/etc/mke2fs.conf")
    cmd: list[str | os.PathLike[str]] = [
        "mke2fs", "-q", "-F",
        "-t", "ext4",
        "-b", "4096",
        "-L", label,
        "-U", ids.fs_uuid,
        "-N", str(inodes),
        "-E", f"root_owner=0:0,hash_seed={ids.hash_seed}",
        "-d", tree,
        fs_image,
    ]  # fmt: skip
    try:
        run(cmd, env=env)
    except CommandFailed as e:
        if re.search(r"Could not allocate|No space left|too small|Could not allocate inode", str(e)):
            raise NoRoom(f"the tree does not fit in a {size // MIB} MiB file system: use a larger --size"
                         " or --headroom") from e
        raise
    _fix_ctimes(fs_image, epoch, env)


def _fix_ctimes(fs_image: Path, epoch: int, env: dict[str, str]) -> None:
    """Set ctime and atime of every used inode to ``epoch``.

    mke2fs copied the staging tree's: ctimes are the time of extraction, and reading a directory or a
    symlink while mke2fs walks it moves its atime (relatime): both would differ from build to build.
    """
    used = [ino for ino in used_inodes(fs_image) if ino == 2 or ino >= 11]  # 1, 3-10: reserved, unused
    script = "".join(f"sif <{ino}> ctime @{epoch}\nsif <{ino}> atime @{epoch}\n" for ino in used)
    cmds = fs_image.with_name(fs_image.name + ".debugfs")
    cmds.write_text(script)
    try:
        # with the fake time too: when debugfs rewrites the superblock it stamps the last write time
        run(["debugfs", "-w", "-f", cmds, fs_image], capture=True, env=env)
    finally:
        cmds.unlink(missing_ok=True)


def used_inodes(fs_image: Path) -> list[int]:
    """Inode numbers in use, from the inode bitmaps as ``dumpe2fs`` prints them (per group free ranges)."""
    text = run(["dumpe2fs", fs_image], capture=True).stdout.decode(errors="replace")
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    used: list[int] = []
    for group, free_text in enumerate(re.findall(r"^  Free inodes: ?(.*)$", text, re.M)):
        free = [False] * per_group
        for item in filter(None, (t.strip() for t in free_text.split(","))):
            first, _, last = item.partition("-")
            for ino in range(int(first), int(last or first) + 1):
                free[ino - 1 - group * per_group] = True
        used += [group * per_group + i + 1 for i, is_free in enumerate(free) if not is_free]
    return used


def assemble_gpt(fs_image: Path, disk: Path, *, ids: DiskIds, label: str) -> int:
    """Write ``disk``: GPT with one root partition (x86-64) holding ``fs_image``; returns the disk size."""
    fs_size = fs_image.stat().st_size
    total = PART_START + fs_size + GPT_TAIL
    with disk.open("wb") as f:
        f.truncate(total)
    table = (
        "label: gpt\n"
        f"label-id: {ids.disk_guid}\n"
        f"start={PART_START // SECTOR}, size={fs_size // SECTOR}, type={ROOT_TYPE_X86_64}, "
        f"uuid={ids.part_guid}, name=\"{label}\"\n"
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=table.encode(), capture=True)
    _copy_sparse(fs_image, disk, PART_START)
    return total


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy the data extents of ``src`` into ``dst`` at ``offset``; holes stay holes."""
    with src.open("rb") as fin, dst.open("r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole is left
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            done = start
            while done < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - done, done, offset + done)
                if n == 0:
                    raise OSError(f"{src}: short copy at {done}")
                done += n
            pos = end


def fs_size_for(data: int, inodes: int, headroom: int) -> int:
    """A file system size for ``data`` bytes in ``inodes`` inodes plus ``headroom`` bytes free."""
    # ext4 overhead: 256-byte inodes, a journal (mke2fs: 64 MiB from 1 GiB up, less below), metadata ~2%
    need = data + inodes * 256 + headroom
    need += need // 50 + 64 * MIB
    return (need + MIB - 1) // MIB * MIB


def log_fs(fs_image: Path) -> None:
    head = run(["dumpe2fs", "-h", fs_image], capture=True).stdout.decode(errors="replace")
    fields = dict(re.findall(r"^([A-Za-z ]+):\s+(\d+)$", head, re.M))
    block = int(fields.get("Block size", "4096"))
    free = int(fields.get("Free blocks", "0")) * block
    log.info("build-image: ext4 of %d MiB, %d MiB free", fs_image.stat().st_size // MIB, free // MIB)
