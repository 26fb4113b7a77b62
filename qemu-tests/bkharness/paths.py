"""Where the harness keeps things: the source tree, the build cache, and the artifacts of failed boots."""

from __future__ import annotations

import os
from pathlib import Path

from bootkit.host import kernelpkg

#: top of the bootkit source tree (qemu-tests/bkharness/paths.py -> ../..)
REPO = Path(__file__).resolve().parent.parent.parent

#: files that go into the guests' root filesystems
ROOTFS_FILES = REPO / "qemu-tests" / "rootfs"


def cache_dir() -> Path:
    """bootkit's own cache, where it keeps the kernels it downloads: the images go next to them.

    ``$BOOTKIT_CACHE``, else ``cache/`` of the checkout bootkit runs from, else ``~/.cache/bootkit``: the rule
    is :func:`bootkit.host.kernelpkg.cache_dir`'s, not a copy of it, so the two cannot disagree.
    """
    return kernelpkg.cache_dir()


def artifacts_dir() -> Path:
    """``$BOOTKIT_ARTIFACTS`` or ``artifacts/`` at the top of the tree (gitignored): serial logs, timelines."""
    env = os.environ.get("BOOTKIT_ARTIFACTS")
    return Path(env) if env else REPO / "artifacts"
