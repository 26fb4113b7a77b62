"""Mounting the root: the partition read-only, and unless ``rd.qcow2.overlay=none`` a tmpfs overlayfs over it.

The parent process of the boot code does this once the daemon has attached the NBD device: it waits for the
partition's device node, mounts the filesystem read-only under ``/run/bootkit/lower``, a tmpfs under
``/run/bootkit/overlay`` for the writable layer, and the overlay at the new root. ``/run`` moves into the new
root at switch_root, so both stay reachable from the booted system.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

from bootkit.boot.cmdline import BootConfig
from bootkit.boot.stages import BootFailed
from bootkit.boot.status import RUN_DIR
from bootkit.run import run

LOWER_DIR = RUN_DIR + "/lower"
OVERLAY_DIR = RUN_DIR + "/overlay"


def _mount(args: Sequence[str]) -> None:
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


def mount_root(cfg: BootConfig, device: str, fstype: Optional[str], newroot: str) -> str:
    """Mount ``device`` read-only and, unless ``rd.qcow2.overlay=none``, a tmpfs overlayfs at ``newroot``."""
    fstype = cfg.rootfstype or fstype or "auto"
    flags = ",".join(["ro", *([cfg.rootflags] if cfg.rootflags else [])])
    os.makedirs(newroot, exist_ok=True)
    if cfg.overlay.kind == "none":
        _mount(["-t", fstype, "-o", flags, device, newroot])
        return f"{device} ({fstype}) read-only at {newroot}"
    os.makedirs(LOWER_DIR, exist_ok=True)
    os.makedirs(OVERLAY_DIR, exist_ok=True)
    _mount(["-t", fstype, "-o", flags, device, LOWER_DIR])
    size = f",size={cfg.overlay.size}" if cfg.overlay.size else ""
    _mount(["-t", "tmpfs", "-o", f"mode=0755{size}", "bootkit-overlay", OVERLAY_DIR])
    os.makedirs(OVERLAY_DIR + "/upper", exist_ok=True)
    os.makedirs(OVERLAY_DIR + "/work", exist_ok=True)
    options = f"lowerdir={LOWER_DIR},upperdir={OVERLAY_DIR}/upper,workdir={OVERLAY_DIR}/work"
    _mount(["-t", "overlay", "-o", ("rw," if cfg.rw else "ro,") + options, "overlay", newroot])
    return f"{device} ({fstype}, read-only) under a tmpfs overlay{size.replace(',', ' ')} at {newroot}"
