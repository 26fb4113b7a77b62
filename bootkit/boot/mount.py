"""Mounting the root: the partition read-only, and unless ``rd.qcow2.overlay=none`` a tmpfs overlayfs over it.

The parent process of the boot code does this once the daemon has attached the NBD device: it waits for the
partition's device node, mounts the filesystem read-only under ``/run/bootkit/lower``, a tmpfs under
``/run/bootkit/overlay`` for the writable layer, and the overlay at the new root. ``/run`` moves into the new
root at switch_root, so both stay reachable from the booted system.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import List, Optional, Sequence

from bootkit.boot.cmdline import BootConfig
from bootkit.boot.stages import BootFailed
from bootkit.boot.status import RUN_DIR
from bootkit.log import log
from bootkit.run import run

#: mount(2) flags of the options the boot code itself passes; anything else goes through mount(8)
_FLAGS = {"ro": 1, "rw": 0}  # MS_RDONLY

#: what mount(8) says for the errors mount(2) gives (util-linux's wording, shortened)
_ERRORS = {
    errno.EINVAL: "wrong fs type, bad option or bad superblock",
    errno.ENODEV: "unknown filesystem type",
    errno.ENOENT: "mount point or device does not exist",
    errno.ENOTBLK: "not a block device",
    errno.ENXIO: "no such device",
    errno.EACCES: "permission denied or write-protected",
    errno.EBUSY: "already mounted or busy",
}


def _mount(fstype: str, options: str, source: str, target: str) -> None:
    """Mount through mount(2) when the options are the boot code's own (no process to start: each one costs
    a large fraction of a second on an emulated CPU), through mount(8) otherwise (``rd.qcow2.rootflags``,
    a filesystem type to detect). Either way a failure is one line naming the command and the cause."""
    words = options.split(",")
    known = [w for w in words if w in _FLAGS]
    data = [w for w in words if w not in _FLAGS]
    what = f"mount -t {fstype} -o {options} {source} {target}"
    if fstype == "auto" or any("=" not in w for w in data):
        # a word such as noatime is a flag mount(8) knows and this does not; key=value goes to the filesystem
        _mount_command(["-t", fstype, "-o", options, source, target])
        return
    flags = 0
    for w in known:
        flags |= _FLAGS[w]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                  ",".join(data).encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise BootFailed(f"{what}: {_ERRORS.get(err, os.strerror(err))} ({errno.errorcode.get(err, err)})")


def _mount_command(args: Sequence[str]) -> None:
    proc = run(["mount", *args], check=False, capture=True)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BootFailed(f"mount {' '.join(args)}: {msg[-1] if msg else 'exit status %d' % proc.returncode}")


def wait_for(path: str, timeout: float) -> None:
    """Wait until ``path`` (the partition's device node) exists; BootFailed after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BootFailed(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _unmount(path: str) -> None:
    """Best effort: the mount that failed is the cause to report, not a cleanup that could not finish."""
    proc = run(["umount", path], check=False, capture=True)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        log.warning("mount: could not unmount %s after the failure: %s", path, msg[-1] if msg else proc.returncode)


#: made in the run directory once the root is mounted: stream mode's fill waits for it (``root_mounted``)
MOUNTED_FLAG = "root-mounted"


def mark_root_mounted(run_dir: str = RUN_DIR) -> None:
    """Tell the root storage daemon that the root is mounted (the boot's own reads are done)."""
    with open(os.path.join(run_dir, MOUNTED_FLAG), "w"):
        pass


def root_mounted(run_dir: str = RUN_DIR) -> bool:
    return os.path.exists(os.path.join(run_dir, MOUNTED_FLAG))


def mount_root(cfg: BootConfig, device: str, fstype: Optional[str], newroot: str, run_dir: str = RUN_DIR) -> str:
    """Mount ``device`` read-only and, unless ``rd.qcow2.overlay=none``, a tmpfs overlayfs at ``newroot``.

    The lower filesystem and the tmpfs go under ``run_dir``. When a step fails, what was mounted before it
    is unmounted again, in reverse order, so that dracut's failure path finds nothing of bootkit mounted.
    """
    fstype = cfg.rootfstype or fstype or "auto"
    flags = ",".join(["ro", *([cfg.rootflags] if cfg.rootflags else [])])
    os.makedirs(newroot, exist_ok=True)
    if cfg.overlay.kind == "none":
        _mount(fstype, flags, device, newroot)
        return f"{device} ({fstype}) read-only at {newroot}"
    lower, overlay = run_dir + "/lower", run_dir + "/overlay"
    os.makedirs(lower, exist_ok=True)
    os.makedirs(overlay, exist_ok=True)
    size = f",size={cfg.overlay.size}" if cfg.overlay.size else ""
    mounted: List[str] = []
    try:
        _mount(fstype, flags, device, lower)
        mounted.append(lower)
        _mount("tmpfs", f"mode=0755{size}", "bootkit-overlay", overlay)
        mounted.append(overlay)
        os.makedirs(overlay + "/upper", exist_ok=True)
        os.makedirs(overlay + "/work", exist_ok=True)
        options = f"lowerdir={lower},upperdir={overlay}/upper,workdir={overlay}/work"
        _mount("overlay", ("rw," if cfg.rw else "ro,") + options, "overlay", newroot)
    except BaseException:
        for path in reversed(mounted):
            _unmount(path)
        raise
    return f"{device} ({fstype}, read-only) under a tmpfs overlay{size.replace(',', ' ')} at {newroot}"
