"""``bootkit cache prepare``: a blank disk (or disk image file) made into a bootkit local cache.

One GPT partition over the whole disk, of bootkit's cache type (:data:`~bootkit.boot.cacheopts.CACHE_TYPE_GUID`)
and named ``bootkit-cache``, with an ext4 filesystem labelled ``bootkit-cache`` on it. The initramfs finds it
with ``rd.qcow2.cache=PARTLABEL=bootkit-cache`` and lays the cache out on first use.

A disk that carries any partition table or filesystem signature (``wipefs`` finds one) is refused unless
``force``; a disk with a mounted filesystem is refused always. The filesystem is made through the disk itself
at the partition's offset, so a disk image file needs no loop device.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bootkit.boot.cacheopts import CACHE_PARTLABEL, CACHE_TYPE_GUID
from bootkit.errors import UsageError
from bootkit.log import human_size, log
from bootkit.run import run

#: the smallest disk worth a cache (the initramfs refuses a cache filesystem smaller than 64 MiB)
MIN_DISK = 80 << 20
#: ext4 block size; the partition starts at 1 MiB (sfdisk's default alignment)
BLOCK = 4096


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made: the partition's byte offset and size on ``disk``."""

    disk: Path
    offset: int
    size: int


def signatures(disk: Path) -> list[str]:
    """Partition-table and filesystem signatures on ``disk`` (``wipefs``' TYPE column: gpt, dos, ext4, ...)."""
    out = run(["wipefs", "--no-act", "--noheadings", "--output", "TYPE", disk], capture=True).stdout
    return [line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()]


def _mounted(disk: Path) -> bool:
    """Whether ``disk`` or a partition of it is mounted (block devices only)."""
    real = os.path.realpath(disk)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        sources = [os.path.realpath(line.split()[0]) for line in f if line.startswith("/")]
    return any(s == real or s.startswith(real) for s in sources)


def prepare(disk: Path, *, force: bool = False, size: int | None = None) -> Prepared:
    """Make ``disk`` a bootkit cache disk (see the module doc); ``size`` creates a disk image file of that size
    when ``disk`` does not exist."""
    if not disk.exists():
        if size is None:
            raise UsageError(f"{disk}: no such disk or file (give --size to create a disk image file)")
        with open(disk, "wb") as f:
            f.truncate(size)
    mode = disk.stat().st_mode
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise UsageError(f"{disk}: neither a block device nor a disk image file")
    if stat.S_ISBLK(mode) and _mounted(disk):
        raise UsageError(f"{disk}: it or one of its partitions is mounted; not touching it")
    with open(disk, "rb") as f:
        total = f.seek(0, os.SEEK_END)
    if total < MIN_DISK:
        raise UsageError(f"{disk}: {human_size(total)} is too small for a cache (at least {human_size(MIN_DISK)})")
    found = signatures(disk)
    if found and not force:
        raise UsageError(f"{disk}: already carries {', '.join(sorted(set(found)))}; not a blank disk "
                         "(--force wipes it)")  # fmt: skip
    if found:
        log.warning("%s: wiping %s (--force)", disk, ", ".join(sorted(set(found))))
        run(["wipefs", "--all", "--quiet", disk], capture=True)
    script = f'label: gpt\nstart=2048, type={CACHE_TYPE_GUID}, name="{CACHE_PARTLABEL}"\n'
    run(["sfdisk", "--quiet", "--wipe", "always", disk], input=script.encode(), capture=True)
    table = json.loads(run(["sfdisk", "--json", disk], capture=True).stdout)["partitiontable"]
    part = table["partitions"][0]
    sector = int(table.get("sectorsize", 512))
    offset, length = int(part["start"]) * sector, int(part["size"]) * sector
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", CACHE_PARTLABEL, "-b", str(BLOCK), "-E", f"offset={offset}",
         disk, str(length // BLOCK)], capture=True)  # fmt: skip
    if stat.S_ISBLK(mode):  # let the kernel and udev see the new partition (by-partlabel link)
        run(["partx", "--update", disk], check=False, capture=True)
    log.info("%s: bootkit cache partition 1 (%s, PARTLABEL %s, ext4): boot with rd.qcow2.cache=PARTLABEL=%s",
             disk, human_size(length), CACHE_PARTLABEL, CACHE_PARTLABEL)  # fmt: skip
    return Prepared(disk, offset, length)
