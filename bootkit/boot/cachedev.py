"""The local cache device at boot: find it, check it, format it when allowed, mount it, open the cache.

``rd.qcow2.cache=<LABEL=|PARTLABEL=|UUID=|PARTUUID=|/dev/...>`` names the device. The boot waits for it at most
:data:`DEVICE_WAIT` seconds; a device that is missing, too small (under :data:`MIN_CACHE_BYTES`), holds
something other than ext4, holds an ext4 that is not a bootkit cache, or cannot be mounted is one warning,
and the boot goes on without a cache. Only with ``rd.qcow2.cache.format=auto`` is anything formatted, and
only a GPT partition that is bootkit's own (type :data:`~bootkit.boot.cacheopts.CACHE_TYPE_GUID` or
PARTLABEL ``bootkit-cache``) and has no filesystem, or whose bootkit ext4 cannot be mounted any more (a
repair, said on the console). A whole disk, an MBR partition or any other partition is never formatted.

The cache is mounted ``nodev,nosuid,noexec`` on a private directory under ``/run/bootkit`` (0700), which moves
into the booted system with ``/run``; the serving daemon keeps a directory fd of it.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Optional

from bootkit.boot.cacheopts import CACHE_PARTLABEL, CACHE_TYPE_GUID, CacheFormat, cache_max_bytes, device_path
from bootkit.boot.cmdline import BootConfig
from bootkit.boot.partitions import SECTOR, Reader, RootNotFound, probe_filesystem, read_gpt
from bootkit.boot.stages import Stages
from bootkit.boot.status import RUN_DIR
from bootkit.errors import BootkitError
from bootkit.fetch.diskcache import CacheError, DiskCache
from bootkit.log import human_size
from bootkit.run import run

CACHE_DIR = RUN_DIR + "/cache"
#: how long the boot waits for the cache device to appear (udev has usually made its links long before)
DEVICE_WAIT = 10.0
#: a cache smaller than this is not used (it could not hold the chunks of even a small image)
MIN_CACHE_BYTES = 64 << 20
MOUNT_OPTIONS = "nodev,nosuid,noexec,noatime"


class FileReader:
    """``pread`` over a block device or file, for the partition-table and superblock probes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    @property
    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def close(self) -> None:
        os.close(self.fd)


def gpt_partition_identity(disk: Reader, number: int) -> Optional[tuple[str, str]]:
    """(type GUID, name) of GPT partition ``number`` of ``disk``; None without a valid GPT or that entry."""
    try:
        parts = read_gpt(disk)  # checks both CRCs
    except RootNotFound:
        return None
    part = next((p for p in parts or () if p.number == number), None)
    if part is None:
        return None
    header = disk.pread(SECTOR, SECTOR)
    entries_lba, _count, entry_size = struct.unpack_from("<QII", header, 72)
    entry = disk.pread(entries_lba * SECTOR + (number - 1) * entry_size, 128)
    name = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
    return part.type, name


def why_not_formattable(disk: Reader, number: int) -> Optional[str]:
    """None when partition ``number`` of ``disk`` is a bootkit cache partition (its GPT type or PARTLABEL
    says so), else why it must not be formatted."""
    if number < 1:
        return "it is a whole disk, not a partition"
    identity = gpt_partition_identity(disk, number)
    if identity is None:
        return f"partition {number} is not in a valid GPT"
    ptype, name = identity
    if ptype == CACHE_TYPE_GUID or name == CACHE_PARTLABEL:
        return None
    return (f"partition {number} has type {ptype} and PARTLABEL {name[:36]!r}, not bootkit's cache type "
            f"{CACHE_TYPE_GUID} or PARTLABEL {CACHE_PARTLABEL}")  # fmt: skip


def open_cache(cfg: BootConfig, stages: Stages, *, mount_dir: str = CACHE_DIR,
               wait: float = DEVICE_WAIT) -> Optional[DiskCache]:  # fmt: skip
    """The local cache ``cfg`` names, mounted and opened; None (after one warning) when it cannot be used."""
    if cfg.cache is None:
        return None
    stages.begin("cache", f"rd.qcow2.cache={cfg.cache}")
    try:
        cache = _open(cfg, cfg.cache, mount_dir, wait)
    except BootkitError as e:
        stages.warn(f"{e}: booting without the local cache")
        return None
    stages.done(f"{cache.where}: {human_size(cache.used)} of chunks stored, at most {human_size(cache.max_bytes)}")
    return cache


def _open(cfg: BootConfig, spec: str, mount_dir: str, wait: float) -> DiskCache:
    device = _wait_for(device_path(spec), wait)
    reader = FileReader(device)
    try:
        size = reader.size
        if size < MIN_CACHE_BYTES:
            raise CacheError(f"{device}: {human_size(size)} is too small for a cache (at least "
                             f"{human_size(MIN_CACHE_BYTES)})")  # fmt: skip
        fs = probe_filesystem(reader)
    finally:
        reader.close()
    formattable = cfg.cache_format is CacheFormat.auto
    if fs is None:
        if not formattable:
            raise CacheError(f"{device}: no filesystem (rd.qcow2.cache.format=auto formats a bootkit cache "
                             "partition)")  # fmt: skip
        _format(device, "it has no filesystem")
    elif fs.type != "ext4":
        raise CacheError(f"{device}: holds {fs.type}, not a bootkit cache (ext4); left alone")
    os.makedirs(mount_dir, mode=0o700, exist_ok=True)
    os.chmod(mount_dir, 0o700)
    try:
        run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, device, mount_dir], capture=True, timeout=60)
    except BootkitError as e:
        if not formattable or fs is None:
            raise CacheError(f"{device}: cannot mount: {e}") from e
        _format(device, "its filesystem cannot be mounted")
        run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, device, mount_dir], capture=True, timeout=60)
    try:
        st = os.statvfs(mount_dir)
        limit = cache_max_bytes(cfg.cache_max, st.f_blocks * st.f_frsize) if cfg.cache_max else None
        return DiskCache.open(mount_dir, limit)
    except BaseException:
        run(["umount", mount_dir], check=False, capture=True)
        raise


def _wait_for(path: str, wait: float) -> str:
    deadline = time.monotonic() + wait
    while True:
        if os.path.exists(path):
            return os.path.realpath(path)
        if time.monotonic() >= deadline:
            raise CacheError(f"{path}: no such device after {wait:.0f} s")
        time.sleep(0.2)


def _partition_of(device: str) -> tuple[str, int]:
    """(whole-disk device, partition number) of a block device; number 0 for a whole disk."""
    name = os.path.basename(device)
    sys_dir = os.path.realpath(f"/sys/class/block/{name}")
    try:
        with open(os.path.join(sys_dir, "partition"), encoding="ascii") as f:
            number = int(f.read().strip())
    except (OSError, ValueError):
        return device, 0
    return "/dev/" + os.path.basename(os.path.dirname(sys_dir)), number


def _format(device: str, why: str) -> None:
    """mkfs.ext4 on ``device`` if it is a bootkit cache partition; else CacheError (nothing is written)."""
    disk, number = _partition_of(device)
    reader = FileReader(disk)
    try:
        refusal = why_not_formattable(reader, number)
    finally:
        reader.close()
    if refusal is not None:
        raise CacheError(f"{device}: {why}, but {refusal}: not formatted (rd.qcow2.cache.format=auto formats only "
                         "bootkit cache partitions)")  # fmt: skip
    from bootkit.log import log

    log.warning("[%8.2f] cache: formatting %s (a bootkit cache partition; %s)", time.monotonic(), device, why)
    try:
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", CACHE_PARTLABEL, device], capture=True, timeout=300)
    except BootkitError as e:
        raise CacheError(f"{device}: formatting failed: {e}") from e
