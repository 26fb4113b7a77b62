"""A Debian root tree with its own kernel, for the build-image → publish → boot pipeline; cached.

``debootstrap --variant=minbase --include=systemd-sysv,linux-image-amd64 bookworm``, trimmed like the harness's
other Debian root (:mod:`bkharness.images`: same mirror rule, same trim list), under
``$BOOTKIT_CACHE/rootfs/debian-bookworm-minbase-kernel/`` (``.complete`` written last). Unlike the harness's
images, the pipeline test gives this tree to ``bootkit build-image``, which takes the kernel from it.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from bkharness.images import _DEBIAN_TRIM, DEBIAN_SUITE, debian_mirror
from bkharness.paths import cache_dir
from bootkit.log import log
from bootkit.run import run

PACKAGES = "systemd-sysv,linux-image-amd64"


def debootstrap_kernel_tree() -> Path:
    """The cached tree (debootstrapped once, a few minutes; then taken from the cache)."""
    tree = cache_dir() / "rootfs" / f"debian-{DEBIAN_SUITE}-minbase-kernel"
    tree.parent.mkdir(parents=True, exist_ok=True)
    with (tree.parent / f".{tree.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (tree / ".complete").exists():
            return tree
        if shutil.which("debootstrap") is None:
            raise FileNotFoundError("debootstrap not found: install the Debian package 'debootstrap'")
        shutil.rmtree(tree, ignore_errors=True)
        mirror = debian_mirror()
        log.info("image: debootstrap %s (%s) from %s (a few minutes)", DEBIAN_SUITE, PACKAGES, mirror)
        run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", DEBIAN_SUITE, tree, mirror],
            capture=True)
        for rel in _DEBIAN_TRIM:
            target = tree / rel
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        (tree / ".complete").write_text(f"{DEBIAN_SUITE} {mirror} {PACKAGES}\n")
    return tree
