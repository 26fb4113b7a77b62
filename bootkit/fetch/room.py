"""Does a file fit where it goes? Free space, RAM for tmpfs/ramfs, and local write errors.

A download into a RAM-backed filesystem (tmpfs, ramfs: /run in the initramfs) is bounded by the RAM the
kernel calls available, minus a reserve that must stay free (dracut's ``rd.minmem``), as well as by the
filesystem's own free space. The same rule applies to the background fill of lazy mode.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import errno
import os
from typing import List, Optional, Tuple

from bootkit.errors import FetchError
from bootkit.fetch.errors import NotEnoughSpace
from bootkit.log import human_size

RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def filesystem_type(path: str) -> str:
    """The type (``tmpfs``, ``ext4``, ...) of the filesystem holding ``path``, from /proc/self/mounts."""
    path = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fields[2]
    except OSError:
        pass
    return best_type


def mem_available() -> Optional[int]:
    """``MemAvailable`` from /proc/meminfo in bytes (None if the kernel does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def space_budget(directory: str, reserve: int) -> Tuple[int, str]:
    """How many bytes may be written under ``directory``, and what limits it (for the error message)."""
    fstype = filesystem_type(directory)
    limits: List[Tuple[int, str]] = []
    if fstype != "ramfs":  # ramfs reports no size: only RAM bounds it
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        limits.append((free, f"{human_size(free)} free on {directory} ({fstype})"))
    if fstype in RAM_FILESYSTEMS:
        available = mem_available()
        if available is not None:
            limits.append(
                (
                    available - reserve,
                    f"{human_size(max(available - reserve, 0))} of RAM available after keeping "
                    f"{human_size(reserve)} in reserve (MemAvailable {human_size(available)})",
                )
            )
    if not limits:
        return 1 << 62, "no limit known"
    return min(limits)


def check_fits(url: str, size: int, dest: str, reserve: int) -> int:
    """Raise NotEnoughSpace unless ``size`` bytes fit; returns the budget (also enforced while streaming)."""
    budget, why = space_budget(os.path.dirname(os.path.abspath(dest)), reserve)
    if size > budget:
        raise NotEnoughSpace(
            f"{url}: image is {human_size(size)} but only {why}; use lazy mode, more RAM, a smaller reserve"
            " or a larger filesystem"
        )
    return budget


def local_error(e: BaseException, url: str, what: str) -> BaseException:
    """A failure of the local file (not the network): never retried; ENOSPC is NotEnoughSpace."""
    if not isinstance(e, OSError):
        return e
    kind = NotEnoughSpace if e.errno in (errno.ENOSPC, errno.EDQUOT) else FetchError
    return kind(f"{url}: {what}: {e.strerror}")
